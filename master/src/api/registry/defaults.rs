//! Field defaults applied on create and update (what kube-apiserver's defaulting
//! does for the served kinds), and which pod spec fields an update may change.

use super::*;
use crate::api::resources::{EVENTS, SERVICES};

pub(super) fn random_suffix(n: usize) -> String {
    // Kubernetes' alphabet for generated names (no vowels, no confusable digits).
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let bytes = uuid::Uuid::new_v4().into_bytes();
    bytes
        .iter()
        .take(n)
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

pub(super) fn image_pull_policy(image: &str) -> &'static str {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') {
        "IfNotPresent"
    } else {
        match last.split_once(':') {
            None => "Always",
            Some((_, "latest")) => "Always",
            Some(_) => "IfNotPresent",
        }
    }
}

/// Kubernetes' defaults of a pod spec (the fields the workers and kubectl rely on).
pub(crate) fn default_pod_spec(spec: &mut Value) {
    let Some(m) = spec.as_object_mut() else {
        return;
    };
    m.entry("restartPolicy").or_insert(json!("Always"));
    m.entry("terminationGracePeriodSeconds")
        .or_insert(json!(30));
    m.entry("dnsPolicy").or_insert(json!("ClusterFirst"));
    m.entry("schedulerName")
        .or_insert(json!("default-scheduler"));
    m.entry("securityContext").or_insert(json!({}));
    for list in ["containers", "initContainers"] {
        if let Some(cs) = m.get_mut(list).and_then(Value::as_array_mut) {
            for c in cs.iter_mut().filter_map(Value::as_object_mut) {
                let image = c.get("image").and_then(Value::as_str).unwrap_or_default();
                let policy = image_pull_policy(image);
                c.entry("imagePullPolicy").or_insert(json!(policy));
                c.entry("terminationMessagePath")
                    .or_insert(json!("/dev/termination-log"));
                c.entry("terminationMessagePolicy").or_insert(json!("File"));
                c.entry("resources").or_insert(json!({}));
                if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
                    for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                        p.entry("protocol").or_insert(json!("TCP"));
                    }
                }
            }
        }
    }
}

/// Spec defaults (applied on create and on every main-resource update, as Kubernetes does).
pub(super) fn apply_spec_defaults(def: &ResourceDef, o: &mut Value) {
    match *def {
        PODS => {
            if let Some(spec) = o.get_mut("spec") {
                default_pod_spec(spec);
            }
        }
        DEPLOYMENTS | REPLICASETS => {
            if let Some(spec) = o.get_mut("spec").and_then(Value::as_object_mut) {
                spec.entry("replicas").or_insert(json!(1));
                spec.entry("revisionHistoryLimit").or_insert(json!(10));
                if *def == DEPLOYMENTS {
                    spec.entry("progressDeadlineSeconds").or_insert(json!(600));
                    let strategy = spec.entry("strategy").or_insert(json!({}));
                    if strategy.get("type").is_none() {
                        strategy["type"] = json!("RollingUpdate");
                    }
                    if strategy["type"] == "RollingUpdate"
                        && strategy.get("rollingUpdate").is_none()
                    {
                        strategy["rollingUpdate"] =
                            json!({"maxUnavailable": "25%", "maxSurge": "25%"});
                    }
                }
                if let Some(ps) = spec.get_mut("template").and_then(|t| t.get_mut("spec")) {
                    default_pod_spec(ps);
                }
            }
        }
        SERVICES => {
            if let Some(spec) = o.get_mut("spec").and_then(Value::as_object_mut) {
                spec.entry("type").or_insert(json!("ClusterIP"));
                spec.entry("sessionAffinity").or_insert(json!("None"));
                if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
                    for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                        p.entry("protocol").or_insert(json!("TCP"));
                        if let Some(port) = p.get("port").cloned() {
                            p.entry("targetPort").or_insert(port);
                        }
                    }
                }
            }
        }
        _ => {}
    }
}

/// Defaults applied on create, per kind (spec defaults plus the initial status).
pub(super) fn apply_create_defaults(def: &ResourceDef, o: &mut Value) {
    apply_spec_defaults(def, o);
    match *def {
        PODS => o["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"}),
        DEPLOYMENTS | REPLICASETS => o["status"] = json!({}),
        NAMESPACES => {
            let name = o.pointer("/metadata/name").cloned().unwrap_or(Value::Null);
            if let Some(m) = o.pointer_mut("/metadata").and_then(Value::as_object_mut) {
                let labels = m.entry("labels").or_insert(json!({}));
                if let Some(l) = labels.as_object_mut() {
                    l.insert("kubernetes.io/metadata.name".into(), name);
                }
            }
            o["spec"] = json!({"finalizers": ["kubernetes"]});
            o["status"] = json!({"phase": "Active"});
        }
        EVENTS => {
            if let Some(m) = o.as_object_mut() {
                m.entry("count").or_insert(json!(1));
                if !m.contains_key("eventTime") {
                    let now = now_rfc3339();
                    m.entry("firstTimestamp").or_insert(json!(now.clone()));
                    m.entry("lastTimestamp").or_insert(json!(now));
                }
                m.entry("type").or_insert(json!("Normal"));
            }
        }
        _ => {}
    }
}

/// Pod spec fields a main-resource update may change (everything else is immutable).
pub(super) fn pod_spec_mutable_view(spec: &Value) -> Value {
    let mut s = spec.clone();
    for list in ["containers", "initContainers"] {
        if let Some(cs) = s.get_mut(list).and_then(Value::as_array_mut) {
            for c in cs.iter_mut().filter_map(Value::as_object_mut) {
                c.remove("image");
            }
        }
    }
    if let Some(m) = s.as_object_mut() {
        m.remove("activeDeadlineSeconds");
        m.remove("tolerations");
        m.remove("terminationGracePeriodSeconds");
    }
    s
}
