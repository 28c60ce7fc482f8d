//! Typed decoding (through the k8s-openapi types) and validation of objects.

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Namespace, Node, Pod, Secret, Service};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::error::{ApiError, Cause};
use super::resources::{
    ResourceDef, CLUSTERROLEBINDINGS, CLUSTERROLES, CONFIGMAPS, DEPLOYMENTS, EVENTS, LEASES,
    NAMESPACES, NODES, PODS, REPLICASETS, ROLEBINDINGS, ROLES, SECRETS, SERVICES,
};
use super::selector::{labels_of, LabelSelector};

const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const PATH_SEGMENT_MSG: &str = "may not be '.' or '..' and may not contain '/' or '%'";
const DNS1035_MSG: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";

/// RFC 1123 label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters.
pub(crate) fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 characters.
pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn is_dns1035_label(s: &str) -> bool {
    is_dns_label(s) && s.as_bytes()[0].is_ascii_lowercase()
}

fn is_label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && v.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && v.chars().last().is_some_and(|c| c.is_ascii_alphanumeric()))
}

fn is_qualified_name(k: &str) -> bool {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    prefix.is_none_or(is_dns_subdomain) && !name.is_empty() && is_label_value(name)
}

/// Resource quantities written as JSON numbers (`cpu: 1` in YAML) become strings,
/// as Kubernetes accepts both.
fn coerce_quantities(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, child) in m.iter_mut() {
                if matches!(
                    k.as_str(),
                    "limits" | "requests" | "capacity" | "allocatable" | "hard" | "used"
                ) {
                    if let Value::Object(q) = child {
                        for qv in q.values_mut() {
                            if let Value::Number(n) = qv {
                                *qv = Value::String(n.to_string());
                            }
                        }
                    }
                }
                coerce_quantities(child);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(coerce_quantities),
        _ => {}
    }
}

fn roundtrip<T: DeserializeOwned + Serialize>(v: Value) -> Result<Value, String> {
    let typed: T = serde_json::from_value(v).map_err(|e| e.to_string())?;
    serde_json::to_value(&typed).map_err(|e| e.to_string())
}

/// Decode `obj` as the k8s-openapi type of `def` and encode it back: rejects ill-typed
/// objects (400) and drops unknown fields, like the Kubernetes API server.
pub(crate) fn normalize(def: &ResourceDef, mut obj: Value) -> Result<Value, ApiError> {
    if !obj.is_object() {
        return Err(ApiError::BadRequest(
            "the body must be a JSON object".into(),
        ));
    }
    coerce_quantities(&mut obj);
    obj["kind"] = Value::String(def.kind.into());
    obj["apiVersion"] = Value::String(def.api_version());
    let r = match *def {
        PODS => roundtrip::<Pod>(obj),
        NODES => roundtrip::<Node>(obj),
        NAMESPACES => roundtrip::<Namespace>(obj),
        EVENTS => roundtrip::<Event>(obj),
        SERVICES => roundtrip::<Service>(obj),
        LEASES => roundtrip::<Lease>(obj),
        CONFIGMAPS => roundtrip::<ConfigMap>(obj),
        SECRETS => roundtrip::<Secret>(secret_string_data(obj)),
        DEPLOYMENTS => roundtrip::<Deployment>(obj),
        REPLICASETS => roundtrip::<ReplicaSet>(obj),
        ROLES => roundtrip::<Role>(obj),
        CLUSTERROLES => roundtrip::<ClusterRole>(obj),
        ROLEBINDINGS => roundtrip::<RoleBinding>(obj),
        CLUSTERROLEBINDINGS => roundtrip::<ClusterRoleBinding>(obj),
        _ => Ok(obj),
    };
    r.map_err(|e| ApiError::BadRequest(format!("error decoding {}: {e}", def.kind)))
}

/// A Secret's `stringData` is a write-only convenience: merged into `data` (base64) and
/// dropped, as kube-apiserver does.
fn secret_string_data(mut obj: Value) -> Value {
    use base64::Engine as _;
    let Some(Value::Object(plain)) = obj.as_object_mut().and_then(|o| o.remove("stringData"))
    else {
        return obj;
    };
    if !obj["data"].is_object() {
        obj["data"] = Value::Object(Default::default());
    }
    for (k, v) in plain {
        if let Some(text) = v.as_str() {
            obj["data"][k] = Value::String(base64::engine::general_purpose::STANDARD.encode(text));
        }
    }
    obj
}

/// Check an object about to be stored; `Err` is a 422 with every cause.
pub(crate) fn validate(def: &ResourceDef, obj: &Value) -> Result<(), ApiError> {
    let mut causes = Vec::new();
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if name.is_empty() {
        causes.push(Cause::required("metadata.name"));
    } else {
        let (ok, msg) = match *def {
            NAMESPACES => (is_dns_label(name), LABEL_MSG),
            SERVICES => (is_dns1035_label(name), DNS1035_MSG),
            // RBAC names are path segments (`system:node`, `cluster-admin`)
            ROLES | CLUSTERROLES | ROLEBINDINGS | CLUSTERROLEBINDINGS => (
                !matches!(name, "." | "..") && !name.contains(['/', '%']),
                PATH_SEGMENT_MSG,
            ),
            // Events are named `<object>.<hex>`, leases after nodes: subdomains.
            _ => (is_dns_subdomain(name), SUBDOMAIN_MSG),
        };
        if !ok {
            causes.push(Cause::invalid("metadata.name", name, msg));
        }
    }
    validate_labels(
        obj.pointer("/metadata/labels"),
        "metadata.labels",
        &mut causes,
    );
    match *def {
        PODS => match obj.get("spec") {
            Some(spec) => validate_pod_spec(spec, "spec", false, &mut causes),
            None => causes.push(Cause::required("spec")),
        },
        DEPLOYMENTS | REPLICASETS => validate_workload(obj, &mut causes),
        _ => {}
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Invalid {
            group: def.group.into(),
            kind: def.qualified_kind(),
            name: name.into(),
            causes,
        })
    }
}

fn validate_labels(labels: Option<&Value>, path: &str, causes: &mut Vec<Cause>) {
    let Some(m) = labels.and_then(Value::as_object) else {
        return;
    };
    for (k, v) in m {
        if !is_qualified_name(k) {
            causes.push(Cause::invalid(
                path,
                k,
                "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
            ));
        }
        let v = v.as_str().unwrap_or_default();
        if !is_label_value(v) {
            causes.push(Cause::invalid(
                path,
                v,
                "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
            ));
        }
    }
}

fn validate_pod_spec(spec: &Value, path: &str, template: bool, causes: &mut Vec<Cause>) {
    let containers = spec
        .get("containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if containers.is_empty() {
        causes.push(Cause::required(format!("{path}.containers")));
    }
    let init = spec
        .get("initContainers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    // names are unique across both lists (the worker keys files and logs by them)
    let mut seen = Vec::new();
    let lists = [("initContainers", &init), ("containers", &containers)];
    for (field, list) in lists {
        for (i, c) in list.iter().enumerate() {
            let cpath = format!("{path}.{field}[{i}]");
            validate_container(c, &cpath, &mut seen, causes);
        }
    }
    if let Some(rp) = spec.get("restartPolicy").and_then(Value::as_str) {
        let allowed: &[&str] = if template {
            &["Always"]
        } else {
            &["Always", "OnFailure", "Never"]
        };
        if !allowed.contains(&rp) {
            causes.push(Cause {
                reason: "FieldValueNotSupported",
                message: format!(
                    "Unsupported value: \"{rp}\": supported values: {}",
                    allowed
                        .iter()
                        .map(|a| format!("\"{a}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                field: format!("{path}.restartPolicy"),
            });
        }
    }
}

/// One container of `initContainers` or `containers`; `seen` holds the names so far.
fn validate_container<'a>(
    c: &'a Value,
    cpath: &str,
    seen: &mut Vec<&'a str>,
    causes: &mut Vec<Cause>,
) {
    let name = c.get("name").and_then(Value::as_str).unwrap_or_default();
    if name.is_empty() {
        causes.push(Cause::required(format!("{cpath}.name")));
    } else if !is_dns_label(name) {
        causes.push(Cause::invalid(format!("{cpath}.name"), name, LABEL_MSG));
    } else if seen.contains(&name) {
        causes.push(Cause::duplicate(format!("{cpath}.name"), name));
    } else {
        seen.push(name);
    }
    if c.get("image")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .trim()
        .is_empty()
    {
        causes.push(Cause::required(format!("{cpath}.image")));
    }
    for (j, p) in c
        .get("ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let port = p.get("containerPort").and_then(Value::as_i64).unwrap_or(0);
        if !(1..=65535).contains(&port) {
            causes.push(Cause::invalid(
                format!("{cpath}.ports[{j}].containerPort"),
                port,
                "must be between 1 and 65535, inclusive",
            ));
        }
    }
}

fn validate_workload(obj: &Value, causes: &mut Vec<Cause>) {
    let spec = obj.get("spec").cloned().unwrap_or(Value::Null);
    if let Some(r) = spec.get("replicas").and_then(Value::as_i64) {
        if r < 0 {
            causes.push(Cause::invalid(
                "spec.replicas",
                r,
                "must be greater than or equal to 0",
            ));
        }
    }
    let template_labels = labels_of(spec.get("template").unwrap_or(&Value::Null));
    match spec.get("selector") {
        None | Some(Value::Null) => causes.push(Cause::required("spec.selector")),
        Some(sel) => match LabelSelector::from_object(sel) {
            Ok(s) if s.is_empty() => causes.push(Cause::invalid(
                "spec.selector",
                "{}",
                "empty selector is invalid for deployment",
            )),
            Ok(s) => {
                if !s.matches(&template_labels) {
                    let shown: Vec<String> = template_labels
                        .iter()
                        .map(|(k, v)| format!("\"{k}\":\"{v}\""))
                        .collect();
                    causes.push(Cause {
                        reason: "FieldValueInvalid",
                        message: format!(
                            "Invalid value: map[string]string{{{}}}: `selector` does not match template `labels`",
                            shown.join(", ")
                        ),
                        field: "spec.template.metadata.labels".into(),
                    });
                }
            }
            Err(e) => causes.push(Cause::invalid("spec.selector", "", &e.to_string())),
        },
    }
    validate_labels(
        spec.pointer("/template/metadata/labels"),
        "spec.template.metadata.labels",
        causes,
    );
    match spec.pointer("/template/spec") {
        Some(ps) => validate_pod_spec(ps, "spec.template.spec", true, causes),
        None => causes.push(Cause::required("spec.template.spec.containers")),
    }
}

#[cfg(test)]
mod tests {
    use super::super::resources::{DEPLOYMENTS, NAMESPACES, PODS};
    use super::*;
    use serde_json::json;

    fn causes(def: &ResourceDef, v: Value) -> Vec<String> {
        match validate(def, &v) {
            Ok(()) => vec![],
            Err(ApiError::Invalid { causes, .. }) => causes.into_iter().map(|c| c.field).collect(),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn names() {
        assert!(is_dns_subdomain("a.b-c.d"));
        assert!(!is_dns_subdomain("A"));
        assert!(!is_dns_subdomain("-a"));
        assert!(!is_dns_label("a.b"));
        assert_eq!(
            causes(&NAMESPACES, json!({"metadata": {"name": "a.b"}})),
            vec!["metadata.name"]
        );
    }

    #[test]
    fn pod_needs_named_containers_with_images() {
        let f = causes(
            &PODS,
            json!({"metadata": {"name": "p"}, "spec": {"containers": [
                {"name": "a", "image": "x"}, {"name": "a", "image": ""}, {"image": "y"}]}}),
        );
        assert_eq!(
            f,
            vec![
                "spec.containers[1].name",
                "spec.containers[1].image",
                "spec.containers[2].name"
            ]
        );
        assert_eq!(
            causes(
                &PODS,
                json!({"metadata": {"name": "p"}, "spec": {"containers": []}})
            ),
            vec!["spec.containers"]
        );
    }

    #[test]
    fn init_container_names_are_labels_like_the_others() {
        // the worker joins container names into file paths
        let f = causes(
            &PODS,
            json!({"metadata": {"name": "p"}, "spec": {
                "initContainers": [{"name": "../../etc/x", "image": "i"}, {"name": "a", "image": "i"}],
                "containers": [{"name": "a", "image": "x"}]}}),
        );
        assert_eq!(
            f,
            vec!["spec.initContainers[0].name", "spec.containers[0].name"]
        );
    }

    #[test]
    fn deployment_selector_must_match() {
        let d = json!({"metadata": {"name": "d"}, "spec": {
            "selector": {"matchLabels": {"app": "x"}},
            "template": {"metadata": {"labels": {"app": "y"}},
                "spec": {"containers": [{"name": "c", "image": "i"}]}}}});
        assert_eq!(
            causes(&DEPLOYMENTS, d),
            vec!["spec.template.metadata.labels"]
        );
        let d = json!({"metadata": {"name": "d"}, "spec": {"template": {"spec": {"containers": [{"name": "c"}]}}}});
        assert_eq!(
            causes(&DEPLOYMENTS, d),
            vec!["spec.selector", "spec.template.spec.containers[0].image"]
        );
    }

    #[test]
    fn normalize_roundtrips_and_coerces_quantities() {
        let p = json!({"metadata": {"name": "p"}, "unknown": 1, "spec": {"containers": [
            {"name": "c", "image": "i", "resources": {"limits": {"cpu": 1, "memory": "64Mi"}}}]}});
        let n = normalize(&PODS, p).unwrap();
        assert_eq!(n["kind"], "Pod");
        assert!(n.get("unknown").is_none());
        assert_eq!(
            n["spec"]["containers"][0]["resources"]["limits"]["cpu"],
            "1"
        );
        assert!(matches!(
            normalize(&PODS, json!({"spec": {"containers": "nope"}})),
            Err(ApiError::BadRequest(_))
        ));
    }
}
