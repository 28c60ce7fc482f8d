//! Server-side `Table` rendering (what `kubectl get` prints), per kind.

use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};

use super::resources::{
    ResourceDef, CONFIGMAPS, DEPLOYMENTS, EVENTS, LEASES, NAMESPACES, NODES, PODS, REPLICASETS,
    SECRETS, SERVICES,
};
use super::selector::LabelSelector;

/// What each row carries as `object` (`includeObject` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum IncludeObject {
    None,
    #[default]
    Metadata,
    Object,
}

impl IncludeObject {
    pub(crate) fn parse(s: Option<&str>) -> Self {
        match s {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

/// Kubernetes' short human duration (`5s`, `3m20s`, `5h`, `2d3h`, `3y`).
pub(crate) fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    if secs < 0 {
        return "0s".into();
    }
    if secs < 120 {
        return format!("{secs}s");
    }
    let minutes = secs / 60;
    if minutes < 10 {
        let s = secs % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = secs / 3600;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let dy = (hours / 24) % 365;
        return if dy == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{dy}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

/// Age of an RFC 3339 timestamp relative to `now`, `<unknown>` when missing.
pub(crate) fn age(ts: Option<&Value>, now: Timestamp) -> String {
    match ts
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<Timestamp>().ok())
    {
        Some(t) => human_duration(now.as_second() - t.as_second()),
        None => "<unknown>".into(),
    }
}

fn s(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(x)) => x.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        _ => String::new(),
    }
}

fn or_none(x: String) -> String {
    if x.is_empty() {
        "<none>".into()
    } else {
        x
    }
}

fn int(v: Option<&Value>) -> i64 {
    v.and_then(Value::as_i64).unwrap_or(0)
}

/// (name, type, priority, description)
type Col = (&'static str, &'static str, u8);

fn columns(def: &ResourceDef) -> Vec<Col> {
    match *def {
        PODS => vec![
            ("Name", "string", 0),
            ("Ready", "string", 0),
            ("Status", "string", 0),
            ("Restarts", "string", 0),
            ("Age", "string", 0),
            ("IP", "string", 1),
            ("Node", "string", 1),
            ("Nominated Node", "string", 1),
            ("Readiness Gates", "string", 1),
        ],
        NODES => vec![
            ("Name", "string", 0),
            ("Status", "string", 0),
            ("Roles", "string", 0),
            ("Age", "string", 0),
            ("Version", "string", 0),
            ("Internal-IP", "string", 1),
            ("External-IP", "string", 1),
            ("OS-Image", "string", 1),
            ("Kernel-Version", "string", 1),
            ("Container-Runtime", "string", 1),
        ],
        DEPLOYMENTS => vec![
            ("Name", "string", 0),
            ("Ready", "string", 0),
            ("Up-to-date", "integer", 0),
            ("Available", "integer", 0),
            ("Age", "string", 0),
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        REPLICASETS => vec![
            ("Name", "string", 0),
            ("Desired", "integer", 0),
            ("Current", "integer", 0),
            ("Ready", "integer", 0),
            ("Age", "string", 0),
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        NAMESPACES => vec![
            ("Name", "string", 0),
            ("Status", "string", 0),
            ("Age", "string", 0),
        ],
        EVENTS => vec![
            ("Last Seen", "string", 0),
            ("Type", "string", 0),
            ("Reason", "string", 0),
            ("Object", "string", 0),
            ("Subobject", "string", 1),
            ("Source", "string", 1),
            ("Message", "string", 0),
            ("First Seen", "string", 1),
            ("Count", "string", 1),
            ("Name", "string", 1),
        ],
        LEASES => vec![
            ("Name", "string", 0),
            ("Holder", "string", 0),
            ("Age", "string", 0),
        ],
        CONFIGMAPS => vec![
            ("Name", "string", 0),
            ("Data", "string", 0),
            ("Age", "string", 0),
        ],
        SECRETS => vec![
            ("Name", "string", 0),
            ("Type", "string", 0),
            ("Data", "string", 0),
            ("Age", "string", 0),
        ],
        SERVICES => vec![
            ("Name", "string", 0),
            ("Type", "string", 0),
            ("Cluster-IP", "string", 0),
            ("External-IP", "string", 0),
            ("Port(s)", "string", 0),
            ("Age", "string", 0),
            ("Selector", "string", 1),
        ],
        _ => vec![("Name", "string", 0), ("Age", "string", 0)],
    }
}

/// The `columnDefinitions` of `kind`.
pub(crate) fn column_definitions(def: &ResourceDef) -> Value {
    Value::Array(
        columns(def)
            .into_iter()
            .map(|(name, ty, priority)| {
                let mut c = json!({"name": name, "type": ty, "format": "", "description": name, "priority": priority});
                if name == "Name" {
                    c["format"] = json!("name");
                }
                c
            })
            .collect(),
    )
}

fn pod_cells(p: &Value, now: Timestamp) -> Vec<Value> {
    let spec = &p["spec"];
    let st = &p["status"];
    let total = spec["containers"].as_array().map_or(0, Vec::len);
    let mut reason = s(st.get("phase"));
    if let Some(r) = st.get("reason").and_then(Value::as_str) {
        if !r.is_empty() {
            reason = r.into();
        }
    }
    if reason.is_empty() {
        reason = "Pending".into();
    }
    let mut restarts = 0;
    let mut last_restart: Option<String> = None;
    let mut note_restart = |cs: &Value| {
        restarts += int(cs.get("restartCount"));
        if let Some(t) = cs
            .pointer("/lastState/terminated/finishedAt")
            .and_then(Value::as_str)
        {
            if last_restart.as_deref().is_none_or(|l| l < t) {
                last_restart = Some(t.to_string());
            }
        }
    };
    let init_total = spec["initContainers"].as_array().map_or(0, Vec::len);
    let mut initializing = false;
    for (i, cs) in st["initContainerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        note_restart(cs);
        if let Some(t) = cs.pointer("/state/terminated") {
            if int(t.get("exitCode")) == 0 {
                continue;
            }
            let r = s(t.get("reason"));
            reason = if r.is_empty() {
                format!("Init:ExitCode:{}", int(t.get("exitCode")))
            } else {
                format!("Init:{r}")
            };
        } else if let Some(w) = cs.pointer("/state/waiting") {
            let r = s(w.get("reason"));
            reason = if r.is_empty() || r == "PodInitializing" {
                format!("Init:{i}/{init_total}")
            } else {
                format!("Init:{r}")
            };
        } else {
            reason = format!("Init:{i}/{init_total}");
        }
        initializing = true;
        break;
    }
    let mut ready = 0;
    if !initializing {
        let mut has_running = false;
        let statuses: Vec<&Value> = st["containerStatuses"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        for cs in statuses.iter().rev() {
            note_restart(cs);
            if let Some(w) = cs.pointer("/state/waiting") {
                let r = s(w.get("reason"));
                if !r.is_empty() {
                    reason = r;
                }
            } else if let Some(t) = cs.pointer("/state/terminated") {
                let r = s(t.get("reason"));
                reason = if !r.is_empty() {
                    r
                } else if int(t.get("signal")) != 0 {
                    format!("Signal:{}", int(t.get("signal")))
                } else {
                    format!("ExitCode:{}", int(t.get("exitCode")))
                };
            } else if cs.pointer("/state/running").is_some() && cs["ready"] == json!(true) {
                has_running = true;
                ready += 1;
            } else if cs.pointer("/state/running").is_some() {
                has_running = true;
            }
        }
        if reason == "Completed" && has_running {
            let pod_ready = st["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            reason = if pod_ready { "Running" } else { "NotReady" }.into();
        }
    }
    if p.pointer("/metadata/deletionTimestamp").is_some() {
        reason = if st["reason"] == "NodeLost" {
            "Unknown".into()
        } else {
            "Terminating".into()
        };
    }
    let restarts_text = match last_restart {
        Some(t) if restarts > 0 => format!("{restarts} ({} ago)", age(Some(&json!(t)), now)),
        _ => restarts.to_string(),
    };
    let gates = spec["readinessGates"].as_array().map_or(0, Vec::len);
    let gates_text = if gates == 0 {
        "<none>".to_string()
    } else {
        let conds = st["conditions"].as_array().cloned().unwrap_or_default();
        let ok = spec["readinessGates"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|g| {
                conds
                    .iter()
                    .any(|c| c["type"] == g["conditionType"] && c["status"] == "True")
            })
            .count();
        format!("{ok}/{gates}")
    };
    vec![
        json!(s(p.pointer("/metadata/name"))),
        json!(format!("{ready}/{total}")),
        json!(reason),
        json!(restarts_text),
        json!(age(p.pointer("/metadata/creationTimestamp"), now)),
        json!(or_none(s(st.get("podIP")))),
        json!(or_none(s(spec.get("nodeName")))),
        json!(or_none(s(st.get("nominatedNodeName")))),
        json!(gates_text),
    ]
}

fn node_cells(n: &Value, now: Timestamp) -> Vec<Value> {
    let st = &n["status"];
    let mut status = "Unknown".to_string();
    for c in st["conditions"].as_array().into_iter().flatten() {
        if c["type"] == "Ready" {
            status = match c["status"].as_str() {
                Some("True") => "Ready",
                Some("False") => "NotReady",
                _ => "Unknown",
            }
            .into();
        }
    }
    if n.pointer("/spec/unschedulable") == Some(&json!(true)) {
        status.push_str(",SchedulingDisabled");
    }
    let mut roles: Vec<String> = Vec::new();
    if let Some(labels) = n.pointer("/metadata/labels").and_then(Value::as_object) {
        for (k, v) in labels {
            if let Some(r) = k.strip_prefix("node-role.kubernetes.io/") {
                if !r.is_empty() {
                    roles.push(r.to_string());
                }
            } else if k == "kubernetes.io/role" {
                roles.push(s(Some(v)));
            }
        }
    }
    roles.sort();
    roles.dedup();
    let addr = |ty: &str| {
        st["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["type"] == ty)
            .map(|a| s(a.get("address")))
            .unwrap_or_default()
    };
    let info = &st["nodeInfo"];
    vec![
        json!(s(n.pointer("/metadata/name"))),
        json!(status),
        json!(if roles.is_empty() {
            "<none>".into()
        } else {
            roles.join(",")
        }),
        json!(age(n.pointer("/metadata/creationTimestamp"), now)),
        json!(s(info.get("kubeletVersion"))),
        json!(or_none(addr("InternalIP"))),
        json!(or_none(addr("ExternalIP"))),
        json!(or_none(s(info.get("osImage")))),
        json!(or_none(s(info.get("kernelVersion")))),
        json!(or_none(s(info.get("containerRuntimeVersion")))),
    ]
}

fn containers_images_selector(o: &Value) -> (String, String, String) {
    let cs = o
        .pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let names: Vec<String> = cs.iter().map(|c| s(c.get("name"))).collect();
    let images: Vec<String> = cs.iter().map(|c| s(c.get("image"))).collect();
    let sel = o
        .pointer("/spec/selector")
        .and_then(|sel| LabelSelector::from_object(sel).ok())
        .map(|s| s.to_string())
        .unwrap_or_default();
    (names.join(","), images.join(","), or_none(sel))
}

fn event_cells(e: &Value, now: Timestamp) -> Vec<Value> {
    let last = e
        .get("lastTimestamp")
        .filter(|v| !v.is_null())
        .or_else(|| e.pointer("/series/lastObservedTime"))
        .or_else(|| e.get("eventTime").filter(|v| !v.is_null()))
        .or_else(|| e.get("firstTimestamp").filter(|v| !v.is_null()))
        .or_else(|| e.pointer("/metadata/creationTimestamp"));
    let first = e
        .get("firstTimestamp")
        .filter(|v| !v.is_null())
        .or_else(|| e.get("eventTime").filter(|v| !v.is_null()))
        .or_else(|| e.pointer("/metadata/creationTimestamp"));
    let io = &e["involvedObject"];
    let object = format!("{}/{}", s(io.get("kind")).to_lowercase(), s(io.get("name")));
    let mut source = s(e.pointer("/source/component"));
    if source.is_empty() {
        source = s(e.get("reportingComponent"));
    }
    let host = s(e.pointer("/source/host"));
    if !host.is_empty() {
        source = format!("{source}, {host}");
    }
    let count = e.get("count").and_then(Value::as_i64).unwrap_or(1);
    vec![
        json!(age(last, now)),
        json!(s(e.get("type"))),
        json!(s(e.get("reason"))),
        json!(object),
        json!(s(io.get("fieldPath"))),
        json!(source),
        json!(s(e.get("message")).trim()),
        json!(age(first, now)),
        json!(count.to_string()),
        json!(s(e.pointer("/metadata/name"))),
    ]
}

fn service_cells(svc: &Value, now: Timestamp) -> Vec<Value> {
    let spec = &svc["spec"];
    let ty = {
        let t = s(spec.get("type"));
        if t.is_empty() {
            "ClusterIP".into()
        } else {
            t
        }
    };
    let ports: Vec<String> = spec["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let proto = {
                let x = s(p.get("protocol"));
                if x.is_empty() {
                    "TCP".into()
                } else {
                    x
                }
            };
            match p.get("nodePort").and_then(Value::as_i64) {
                Some(np) => format!("{}:{np}/{proto}", int(p.get("port"))),
                None => format!("{}/{proto}", int(p.get("port"))),
            }
        })
        .collect();
    let external: Vec<String> = svc
        .pointer("/status/loadBalancer/ingress")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|i| s(i.get("ip")))
        .chain(
            spec["externalIPs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|i| s(Some(i))),
        )
        .collect();
    let selector: Vec<String> = spec["selector"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", s(Some(v))))
                .collect()
        })
        .unwrap_or_default();
    vec![
        json!(s(svc.pointer("/metadata/name"))),
        json!(ty),
        json!(or_none(s(spec.get("clusterIP")))),
        json!(or_none(external.join(","))),
        json!(or_none(ports.join(","))),
        json!(age(svc.pointer("/metadata/creationTimestamp"), now)),
        json!(or_none(selector.join(","))),
    ]
}

/// The cells of one object's row.
pub(crate) fn cells(def: &ResourceDef, o: &Value, now: Timestamp) -> Vec<Value> {
    let name = json!(s(o.pointer("/metadata/name")));
    let created = json!(age(o.pointer("/metadata/creationTimestamp"), now));
    match *def {
        PODS => pod_cells(o, now),
        NODES => node_cells(o, now),
        DEPLOYMENTS => {
            let (c, i, sel) = containers_images_selector(o);
            let desired = o
                .pointer("/spec/replicas")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            vec![
                name,
                json!(format!(
                    "{}/{desired}",
                    int(o.pointer("/status/readyReplicas"))
                )),
                json!(int(o.pointer("/status/updatedReplicas"))),
                json!(int(o.pointer("/status/availableReplicas"))),
                created,
                json!(c),
                json!(i),
                json!(sel),
            ]
        }
        REPLICASETS => {
            let (c, i, sel) = containers_images_selector(o);
            vec![
                name,
                json!(o
                    .pointer("/spec/replicas")
                    .and_then(Value::as_i64)
                    .unwrap_or(1)),
                json!(int(o.pointer("/status/replicas"))),
                json!(int(o.pointer("/status/readyReplicas"))),
                created,
                json!(c),
                json!(i),
                json!(sel),
            ]
        }
        NAMESPACES => vec![name, json!(s(o.pointer("/status/phase"))), created],
        EVENTS => event_cells(o, now),
        LEASES => vec![name, json!(s(o.pointer("/spec/holderIdentity"))), created],
        CONFIGMAPS => {
            let n = |k: &str| o.get(k).and_then(Value::as_object).map_or(0, |m| m.len());
            vec![name, json!(n("data") + n("binaryData")), created]
        }
        SECRETS => {
            let n = o
                .get("data")
                .and_then(Value::as_object)
                .map_or(0, |m| m.len());
            let ty = o.get("type").and_then(Value::as_str).unwrap_or("Opaque");
            vec![name, json!(ty), json!(n), created]
        }
        SERVICES => service_cells(o, now),
        _ => vec![name, created],
    }
}

/// One table row for `o`.
pub(crate) fn row(def: &ResourceDef, o: &Value, include: IncludeObject, now: Timestamp) -> Value {
    let mut r = json!({"cells": cells(def, o, now)});
    match include {
        IncludeObject::None => {}
        IncludeObject::Object => r["object"] = o.clone(),
        IncludeObject::Metadata => {
            r["object"] = json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": o.get("metadata").cloned().unwrap_or(json!({})),
            })
        }
    }
    r
}

/// A `Table` of `items` (all of the kind of `def`).
pub(crate) fn table(
    def: &ResourceDef,
    items: &[Value],
    resource_version: &str,
    cont: Option<&str>,
    include: IncludeObject,
) -> Value {
    let now = crate::clock::now();
    let mut meta = json!({"resourceVersion": resource_version});
    if let Some(c) = cont {
        meta["continue"] = json!(c);
    }
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": meta,
        "columnDefinitions": column_definitions(def),
        "rows": items.iter().map(|o| row(def, o, include, now)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(119), "119s");
        assert_eq!(human_duration(200), "3m20s");
        assert_eq!(human_duration(600), "10m");
        assert_eq!(human_duration(3 * 3600 + 60), "3h1m");
        assert_eq!(human_duration(30 * 3600), "30h");
        assert_eq!(human_duration(3 * 86400 + 3600), "3d1h");
        assert_eq!(human_duration(30 * 86400), "30d");
    }

    #[test]
    fn pod_row() {
        let now: Timestamp = "2026-01-01T00:10:00Z".parse().unwrap();
        let p = json!({"metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"nodeName": "w1", "containers": [{"name": "a"}, {"name": "b"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.1", "containerStatuses": [
            {"name": "a", "ready": true, "restartCount": 0, "state": {"running": {}}},
            {"name": "b", "ready": false, "restartCount": 2, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}
        ]}});
        let c = cells(&PODS, &p, now);
        assert_eq!(c[0], "p");
        assert_eq!(c[1], "1/2");
        assert_eq!(c[2], "CrashLoopBackOff");
        assert_eq!(c[3], "2");
        assert_eq!(c[4], "10m");
        assert_eq!(c[5], "10.0.0.1");
        assert_eq!(c[6], "w1");
        let mut t = p.clone();
        t["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:11:00Z");
        assert_eq!(cells(&PODS, &t, now)[2], "Terminating");
        let pending = json!({"metadata": {"name": "q"}, "spec": {"containers": [{"name": "a"}]}});
        let c = cells(&PODS, &pending, now);
        assert_eq!(
            (c[1].as_str(), c[2].as_str(), c[6].as_str()),
            (Some("0/1"), Some("Pending"), Some("<none>"))
        );
    }

    #[test]
    fn node_deploy_event_rows() {
        let now = crate::clock::now();
        let n = json!({"metadata": {"name": "w1", "labels": {"node-role.kubernetes.io/worker": ""}},
            "spec": {"unschedulable": true},
            "status": {"conditions": [{"type": "Ready", "status": "True"}],
                "nodeInfo": {"kubeletVersion": "v1.33.0-ballast"},
                "addresses": [{"type": "InternalIP", "address": "127.0.2.1"}]}});
        let c = cells(&NODES, &n, now);
        assert_eq!(c[1], "Ready,SchedulingDisabled");
        assert_eq!(c[2], "worker");
        assert_eq!(c[4], "v1.33.0-ballast");
        assert_eq!(c[5], "127.0.2.1");
        let d = json!({"metadata": {"name": "d"}, "spec": {"replicas": 3,
            "selector": {"matchLabels": {"app": "d"}},
            "template": {"spec": {"containers": [{"name": "c", "image": "busybox"}]}}},
            "status": {"readyReplicas": 2, "updatedReplicas": 3, "availableReplicas": 2}});
        let c = cells(&DEPLOYMENTS, &d, now);
        assert_eq!(c[1], "2/3");
        assert_eq!(c[2], 3);
        assert_eq!(c[7], "app=d");
        let e = json!({"metadata": {"name": "e1"}, "type": "Normal", "reason": "Scheduled",
            "involvedObject": {"kind": "Pod", "name": "p"}, "message": "ok "});
        let c = cells(&EVENTS, &e, now);
        assert_eq!(c[3], "pod/p");
        assert_eq!(c[6], "ok");
        let t = table(
            &LEASES,
            &[json!({"metadata": {"name": "w1"}, "spec": {"holderIdentity": "w1"}})],
            "7",
            None,
            IncludeObject::Metadata,
        );
        assert_eq!(t["rows"][0]["cells"][1], "w1");
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        assert_eq!(
            t["columnDefinitions"].as_array().unwrap().len(),
            columns(&LEASES).len()
        );
        for k in [
            PODS,
            NODES,
            DEPLOYMENTS,
            REPLICASETS,
            NAMESPACES,
            EVENTS,
            LEASES,
            SERVICES,
            CONFIGMAPS,
            SECRETS,
        ] {
            let (cells, columns) = (cells(&k, &json!({}), now), columns(&k));
            assert_eq!(cells.len(), columns.len(), "{}", k.kind);
        }
    }
}
