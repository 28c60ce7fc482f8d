//! End-to-end tests of the router over a `MemStore`, through real HTTP.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};

use super::registry::DeleteOptions;
use super::resources::{DEPLOYMENTS, REPLICASETS};
use super::*;
use crate::store::{
    Command, CommandResult, KeyValue, MemStore, RangeResult, StoreError, WatchReceiver,
};
use ballast_config::schema::LimitsConfig;

const TABLE: &str = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";

struct Api {
    base: String,
    http: reqwest::Client,
    store: Arc<dyn Store>,
}

/// The API as `user` (the server's authentication layer, which puts the user in each
/// request, is not part of these tests).
async fn start_as(store: Arc<dyn Store>, user: crate::auth::Identity) -> Api {
    start_info(store, user, ApiInfo::new("m1")).await
}

async fn start_info(store: Arc<dyn Store>, user: crate::auth::Identity, info: ApiInfo) -> Api {
    let auth = crate::auth::Auth {
        authn: Arc::new(crate::auth::Authenticator::default()),
        authz: Arc::new(crate::auth::Authorizer::new(store.clone())),
    };
    let app = router(store.clone(), info, auth).layer(axum::Extension(user));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    Api {
        base,
        http: reqwest::Client::new(),
        store,
    }
}

async fn start_with(store: Arc<dyn Store>) -> Api {
    let admin = crate::auth::Identity {
        user: "admin".into(),
        groups: vec!["system:masters".into(), "system:authenticated".into()],
    };
    start_as(store, admin).await
}

async fn start() -> Api {
    start_with(Arc::new(MemStore::new())).await
}

impl Api {
    async fn call(
        &self,
        method: &str,
        path: &str,
        ct: &str,
        body: Option<Vec<u8>>,
        accept: Option<&str>,
    ) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut r = self
            .http
            .request(m, format!("{}{path}", self.base))
            .header("Content-Type", ct);
        if let Some(a) = accept {
            r = r.header("Accept", a);
        }
        if let Some(b) = body {
            r = r.body(b);
        }
        let resp = r.send().await.unwrap();
        let code = resp.status().as_u16();
        let h = resp.headers().clone();
        (code, h, resp.bytes().await.unwrap().to_vec())
    }

    async fn req(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.req_ct(method, path, "application/json", body).await
    }

    async fn req_ct(
        &self,
        method: &str,
        path: &str,
        ct: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let (code, h, b) = self
            .call(
                method,
                path,
                ct,
                body.map(|b| b.to_string().into_bytes()),
                None,
            )
            .await;
        if !b.is_empty() {
            assert_eq!(
                h.get("content-type").unwrap(),
                "application/json",
                "{method} {path}"
            );
        }
        (code, serde_json::from_slice(&b).unwrap_or(Value::Null))
    }
}

fn pod(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
}

fn deployment(name: &str) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}})
}

const PODS: &str = "/api/v1/namespaces/default/pods";

#[tokio::test]
async fn discovery_version_openapi() {
    let a = start().await;
    let (c, v) = a.req("GET", "/api", None).await;
    assert_eq!((c, v["versions"][0].as_str()), (200, Some("v1")));
    let (_, v) = a.req("GET", "/apis", None).await;
    let groups: Vec<&str> = v["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert!(groups.contains(&"apps") && groups.contains(&"coordination.k8s.io"));
    let (_, v) = a.req("GET", "/api/v1", None).await;
    assert!(v["resources"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["name"] == "pods/binding"));
    let (c, v) = a.req("GET", "/version", None).await;
    assert_eq!((c, v["minor"].as_str()), (200, Some("33")));
    let (c, h, b) = a
        .call("GET", "/openapi/v2", "application/json", None, None)
        .await;
    assert_eq!((c, b.len()), (200, 0));
    assert_eq!(h.get("content-type").unwrap(), "application/octet-stream");
    let (c, _) = a.req("GET", "/openapi/v3", None).await;
    assert_eq!(c, 404);
    let (c, v) = a.req("GET", "/apis/nope/v1", None).await;
    assert_eq!((c, v["kind"].as_str()), (404, Some("Status")));
}

#[tokio::test]
async fn pod_crud_conflicts_and_errors() {
    let a = start().await;
    let (c, p) = a.req("POST", PODS, Some(pod("p1"))).await;
    assert_eq!(c, 201, "{p}");
    assert!(p["metadata"]["uid"].as_str().is_some());
    assert!(p["metadata"]["creationTimestamp"].as_str().is_some());
    assert_eq!(p["status"]["phase"], "Pending");
    let rv = p["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();

    let (c, s) = a.req("POST", PODS, Some(pod("p1"))).await;
    assert_eq!((c, s["reason"].as_str()), (409, Some("AlreadyExists")));
    let (c, s) = a.req("GET", &format!("{PODS}/nope"), None).await;
    assert_eq!((c, s["reason"].as_str()), (404, Some("NotFound")));
    assert_eq!(s["message"], "pods \"nope\" not found");
    let (c, s) = a
        .req("POST", "/api/v1/namespaces/ghost/pods", Some(pod("x")))
        .await;
    assert_eq!((c, s["reason"].as_str()), (404, Some("NotFound")));

    // Update: label change with the current RV works; the stale RV then conflicts.
    let mut upd = p.clone();
    upd["metadata"]["labels"]["x"] = json!("y");
    let (c, u) = a.req("PUT", &format!("{PODS}/p1"), Some(upd.clone())).await;
    assert_eq!(c, 200, "{u}");
    assert_ne!(u["metadata"]["resourceVersion"].as_str().unwrap(), rv);
    let (c, s) = a.req("PUT", &format!("{PODS}/p1"), Some(upd)).await;
    assert_eq!((c, s["reason"].as_str()), (409, Some("Conflict")));

    // A replace without the defaulted fields is fine (defaults apply on update too);
    // changing an immutable pod field is 422 Forbidden.
    let (c, u) = a.req("PUT", &format!("{PODS}/p1"), Some(pod("p1"))).await;
    assert_eq!(c, 200, "{u}");
    let mut imm = pod("p1");
    imm["spec"]["containers"][0]["command"] = json!(["sh"]);
    let (c, s) = a.req("PUT", &format!("{PODS}/p1"), Some(imm)).await;
    assert_eq!(
        (c, s["details"]["causes"][0]["field"].as_str()),
        (422, Some("spec"))
    );

    // Validation: 422 with field paths.
    let mut bad = pod("p2");
    bad["spec"]["containers"][0]["image"] = json!("");
    let (c, s) = a.req("POST", PODS, Some(bad)).await;
    assert_eq!((c, s["reason"].as_str()), (422, Some("Invalid")));
    assert_eq!(
        s["details"]["causes"][0]["field"],
        "spec.containers[0].image"
    );
    let (c, _) = a.req("POST", PODS, Some(json!({"spec": 1}))).await;
    assert_eq!(c, 400);
    let (c, _, _) = a
        .call(
            "POST",
            PODS,
            "application/x-nope",
            Some(b"{}".to_vec()),
            None,
        )
        .await;
    assert_eq!(c, 415);

    // generateName.
    let mut g = pod("");
    g["metadata"]["generateName"] = json!("gen-");
    let (c, p) = a.req("POST", PODS, Some(g)).await;
    assert_eq!(c, 201);
    assert!(p["metadata"]["name"].as_str().unwrap().starts_with("gen-"));
    assert_eq!(p["metadata"]["name"].as_str().unwrap().len(), 9);
}

#[tokio::test]
async fn list_paging_and_selectors() {
    let a = start().await;
    for i in 0..5 {
        let mut p = pod(&format!("p{i}"));
        p["metadata"]["labels"]["tier"] = json!(if i % 2 == 0 { "even" } else { "odd" });
        a.req("POST", PODS, Some(p)).await;
    }
    let (_, l) = a.req("GET", &format!("{PODS}?limit=2"), None).await;
    assert_eq!(l["kind"], "PodList");
    assert_eq!(l["items"].as_array().unwrap().len(), 2);
    let cont = l["metadata"]["continue"].as_str().unwrap().to_string();
    assert!(l["metadata"]["resourceVersion"].as_str().is_some());
    let (_, l2) = a
        .req("GET", &format!("{PODS}?limit=2&continue={cont}"), None)
        .await;
    assert_eq!(l2["items"][0]["metadata"]["name"], "p2");
    let (_, l) = a
        .req(
            "GET",
            &format!("{PODS}?labelSelector=tier%20in%20(even),app!=p0"),
            None,
        )
        .await;
    let names: Vec<&str> = l["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["p2", "p4"]);
    let (_, l) = a
        .req(
            "GET",
            "/api/v1/pods?fieldSelector=status.phase!=Failed,metadata.name=p3",
            None,
        )
        .await;
    assert_eq!(l["items"].as_array().unwrap().len(), 1);
    let (c, _) = a
        .req("GET", &format!("{PODS}?labelSelector=a%20in%20b"), None)
        .await;
    assert_eq!(c, 400);

    // Server-side table.
    let (_, _, b) = a
        .call(
            "GET",
            &format!("{PODS}?limit=500"),
            "application/json",
            None,
            Some(TABLE),
        )
        .await;
    let t: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(t["kind"], "Table");
    assert_eq!(t["columnDefinitions"][1]["name"], "Ready");
    assert_eq!(t["rows"][0]["cells"][2], "Pending");
    assert_eq!(t["rows"][0]["object"]["metadata"]["namespace"], "default");
}

#[tokio::test]
async fn graceful_pod_deletion_and_finalizers() {
    let a = start().await;
    // Unbound: deleted at once.
    a.req("POST", PODS, Some(pod("u"))).await;
    let (c, _) = a
        .req(
            "DELETE",
            &format!("{PODS}/u"),
            Some(json!({"propagationPolicy": "Background"})),
        )
        .await;
    assert_eq!(c, 200);
    assert_eq!(a.req("GET", &format!("{PODS}/u"), None).await.0, 404);

    // Bound: marked; the worker confirms with gracePeriodSeconds=0.
    a.req("POST", PODS, Some(pod("b"))).await;
    let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "b"},
        "target": {"kind": "Node", "name": "w1"}});
    let (c, _) = a
        .req("POST", &format!("{PODS}/b/binding"), Some(binding.clone()))
        .await;
    assert_eq!(c, 201);
    let (c, s) = a
        .req("POST", &format!("{PODS}/b/binding"), Some(binding))
        .await;
    assert_eq!((c, s["reason"].as_str()), (409, Some("Conflict")));
    let (_, p) = a.req("DELETE", &format!("{PODS}/b"), None).await;
    assert!(p["metadata"]["deletionTimestamp"].as_str().is_some());
    assert_eq!(p["metadata"]["deletionGracePeriodSeconds"], 30);
    let (c, p) = a.req("GET", &format!("{PODS}/b"), None).await;
    assert_eq!(c, 200);
    assert!(p["metadata"]["deletionTimestamp"].as_str().is_some());
    a.req("DELETE", &format!("{PODS}/b?gracePeriodSeconds=0"), None)
        .await;
    assert_eq!(a.req("GET", &format!("{PODS}/b"), None).await.0, 404);

    // Finalizers block removal until cleared.
    let mut f = pod("f");
    f["metadata"]["finalizers"] = json!(["example.com/hold"]);
    a.req("POST", PODS, Some(f)).await;
    a.req("DELETE", &format!("{PODS}/f"), None).await;
    assert_eq!(a.req("GET", &format!("{PODS}/f"), None).await.0, 200);
    let (c, _) = a
        .req_ct(
            "PATCH",
            &format!("{PODS}/f"),
            "application/merge-patch+json",
            Some(json!({"metadata": {"finalizers": null}})),
        )
        .await;
    assert_eq!(c, 200);
    assert_eq!(a.req("GET", &format!("{PODS}/f"), None).await.0, 404);
}

#[tokio::test]
async fn deployments_generation_scale_patches() {
    let a = start().await;
    let deps = "/apis/apps/v1/namespaces/default/deployments";
    let (c, d) = a.req("POST", deps, Some(deployment("web"))).await;
    assert_eq!(c, 201, "{d}");
    assert_eq!(d["metadata"]["generation"], 1);
    // Status writes don't bump generation; main writes ignore status.
    let mut st = d.clone();
    st["status"] = json!({"replicas": 1, "observedGeneration": 1});
    let (c, d2) = a.req("PUT", &format!("{deps}/web/status"), Some(st)).await;
    assert_eq!(c, 200, "{d2}");
    assert_eq!(
        (
            d2["metadata"]["generation"].as_i64(),
            d2["status"]["replicas"].as_i64()
        ),
        (Some(1), Some(1))
    );
    // Scale.
    let (c, s) = a.req("GET", &format!("{deps}/web/scale"), None).await;
    assert_eq!(
        (c, s["kind"].as_str(), s["apiVersion"].as_str()),
        (200, Some("Scale"), Some("autoscaling/v1"))
    );
    assert_eq!(s["status"]["selector"], "app=web");
    let (c, s) = a
        .req_ct(
            "PATCH",
            &format!("{deps}/web/scale"),
            "application/merge-patch+json",
            Some(json!({"spec": {"replicas": 3}})),
        )
        .await;
    assert_eq!((c, s["spec"]["replicas"].as_i64()), (200, Some(3)));
    let (_, d) = a.req("GET", &format!("{deps}/web"), None).await;
    assert_eq!(d["spec"]["replicas"], 3);
    assert_eq!(d["metadata"]["generation"], 2);
    assert_eq!(d["status"]["replicas"], 1);
    // Strategic merge patch with directives: nothing with `$` is stored.
    let patch = json!({"spec": {"template": {"spec": {
        "$setElementOrder/containers": [{"name": "c"}],
        "containers": [{"name": "c", "image": "busybox:2", "env": [{"name": "A", "value": "1"}]}]}}}});
    let (c, d) = a
        .req_ct(
            "PATCH",
            &format!("{deps}/web"),
            "application/strategic-merge-patch+json",
            Some(patch),
        )
        .await;
    assert_eq!(c, 200, "{d}");
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        "busybox:2"
    );
    assert!(!d.to_string().contains("$setElementOrder"));
    assert_eq!(d["metadata"]["generation"], 3);
    // JSON patch.
    let (c, d) = a
        .req_ct(
            "PATCH",
            &format!("{deps}/web"),
            "application/json-patch+json",
            Some(json!([{"op": "replace", "path": "/spec/replicas", "value": 1}])),
        )
        .await;
    assert_eq!((c, d["spec"]["replicas"].as_i64()), (200, Some(1)));
    // Server-side apply creates, then merges.
    let mut applied = deployment("ssa");
    applied["metadata"]["labels"] = json!({"k": "v"});
    let (c, _) = a
        .req_ct(
            "PATCH",
            &format!("{deps}/ssa?fieldManager=kubectl&force=false"),
            "application/apply-patch+yaml",
            Some(applied.clone()),
        )
        .await;
    assert_eq!(c, 201);
    applied["spec"]["replicas"] = json!(4);
    let (c, d) = a
        .req_ct(
            "PATCH",
            &format!("{deps}/ssa?fieldManager=kubectl&force=false"),
            "application/apply-patch+yaml",
            Some(applied),
        )
        .await;
    assert_eq!((c, d["spec"]["replicas"].as_i64()), (200, Some(4)));
    // Invalid selector.
    let mut bad = deployment("bad");
    bad["spec"]["template"]["metadata"]["labels"] = json!({"app": "other"});
    let (c, s) = a.req("POST", deps, Some(bad)).await;
    assert_eq!(c, 422);
    assert_eq!(
        s["details"]["causes"][0]["field"],
        "spec.template.metadata.labels"
    );
}

#[tokio::test]
async fn protobuf_create_deployment() {
    use k8s_pb::api::apps::v1 as apps;
    use k8s_pb::api::core::v1 as core;
    use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
    let a = start().await;
    let labels: std::collections::BTreeMap<String, String> =
        [("app".to_string(), "pb".to_string())].into();
    let d = apps::Deployment {
        metadata: Some(meta::ObjectMeta {
            name: Some("pb".into()),
            labels: labels.clone(),
            ..Default::default()
        }),
        spec: Some(apps::DeploymentSpec {
            replicas: Some(1),
            selector: Some(meta::LabelSelector {
                match_labels: labels.clone(),
                ..Default::default()
            }),
            template: Some(core::PodTemplateSpec {
                metadata: Some(meta::ObjectMeta {
                    labels,
                    ..Default::default()
                }),
                spec: Some(core::PodSpec {
                    containers: vec![core::Container {
                        name: Some("busybox".into()),
                        image: Some("busybox".into()),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
        status: None,
    };
    let body = protobuf::encode("apps/v1", "Deployment", &d);
    let (c, _, b) = a
        .call(
            "POST",
            "/apis/apps/v1/namespaces/default/deployments?fieldManager=kubectl-create",
            "application/vnd.kubernetes.protobuf",
            Some(body),
            Some("application/vnd.kubernetes.protobuf,application/json"),
        )
        .await;
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(c, 201, "{v}");
    assert_eq!(
        v["spec"]["template"]["spec"]["containers"][0]["image"],
        "busybox"
    );
}

async fn next_line(resp: &mut reqwest::Response, buf: &mut Vec<u8>) -> Option<Value> {
    loop {
        if let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            return Some(serde_json::from_slice(&line).unwrap());
        }
        match tokio::time::timeout(Duration::from_secs(5), resp.chunk()).await {
            Ok(Ok(Some(c))) => buf.extend_from_slice(&c),
            _ => return None,
        }
    }
}

#[tokio::test]
async fn watch_stream_from_list_revision() {
    let a = start().await;
    a.req("POST", PODS, Some(pod("w0"))).await;
    let (_, l) = a.req("GET", PODS, None).await;
    let rv = l["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let mut resp = a
        .http
        .get(format!(
            "{}{PODS}?watch=true&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=5",
            a.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "application/json"
    );
    a.req("POST", PODS, Some(pod("w1"))).await;
    a.req_ct(
        "PATCH",
        &format!("{PODS}/w1"),
        "application/merge-patch+json",
        Some(json!({"metadata": {"labels": {"z": "1"}}})),
    )
    .await;
    a.req("DELETE", &format!("{PODS}/w1"), None).await;
    let mut buf = Vec::new();
    let mut types = Vec::new();
    for _ in 0..3 {
        let e = next_line(&mut resp, &mut buf).await.unwrap();
        assert_eq!(e["object"]["metadata"]["name"], "w1");
        types.push(e["type"].as_str().unwrap().to_string());
    }
    assert_eq!(types, vec!["ADDED", "MODIFIED", "DELETED"]);

    // Table watch: one-row tables; no RV = initial state as ADDED.
    let mut resp = a
        .http
        .get(format!("{}{PODS}?watch=true&timeoutSeconds=2", a.base))
        .header("Accept", TABLE)
        .send()
        .await
        .unwrap();
    let mut buf = Vec::new();
    let e = next_line(&mut resp, &mut buf).await.unwrap();
    assert_eq!(e["type"], "ADDED");
    assert_eq!(e["object"]["kind"], "Table");
    assert_eq!(e["object"]["rows"][0]["cells"][0], "w0");
    // The stream ends at timeoutSeconds.
    assert!(next_line(&mut resp, &mut buf).await.is_none());

    // Label-selected watch: leaving the selection is a DELETED.
    let mut resp = a
        .http
        .get(format!(
            "{}{PODS}?watch=1&labelSelector=app%3Dw0&resourceVersion={}",
            a.base,
            a.store.revision()
        ))
        .send()
        .await
        .unwrap();
    a.req_ct(
        "PATCH",
        &format!("{PODS}/w0"),
        "application/merge-patch+json",
        Some(json!({"metadata": {"labels": {"app": "other"}}})),
    )
    .await;
    let mut buf = Vec::new();
    let e = next_line(&mut resp, &mut buf).await.unwrap();
    assert_eq!(e["type"], "DELETED");
}

/// A store that is never active.
struct Inactive;

#[async_trait]
impl Store for Inactive {
    async fn write(&self, _: Command) -> Result<CommandResult, StoreError> {
        Err(StoreError::NotActive {
            leader: Some("m2".into()),
        })
    }
    async fn get(&self, _: &str) -> Result<Option<KeyValue>, StoreError> {
        Err(StoreError::NotActive {
            leader: Some("m2".into()),
        })
    }
    async fn range(&self, _: &str, _: Option<&str>, _: usize) -> Result<RangeResult, StoreError> {
        Err(StoreError::NotActive {
            leader: Some("m2".into()),
        })
    }
    async fn watch(&self, _: &str, _: u64) -> Result<WatchReceiver, StoreError> {
        Err(StoreError::NotActive {
            leader: Some("m2".into()),
        })
    }
    fn revision(&self) -> u64 {
        0
    }
    fn range_local(&self, _: &str) -> RangeResult {
        RangeResult::default()
    }
}

#[tokio::test]
async fn not_active_is_503_status_naming_the_leader() {
    let a = start_with(Arc::new(Inactive)).await;
    let (c, h, b) = a.call("GET", PODS, "application/json", None, None).await;
    assert_eq!(c, 503);
    assert_eq!(h.get("retry-after").unwrap(), "1");
    assert_eq!(h.get("content-type").unwrap(), "application/json");
    let s: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(s["reason"], "ServiceUnavailable");
    assert!(s["message"].as_str().unwrap().contains("m2"));
}

#[tokio::test]
async fn garbage_collection_by_owner_references() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    ensure_defaults(store.as_ref()).await.unwrap();
    let reg = Registry::new(store.clone());
    let d = reg
        .create(&DEPLOYMENTS, Some("default"), deployment("d"), false)
        .await
        .unwrap();
    let owned = |name: &str, owner: &Value, kind: &str| {
        let mut o = deployment(name);
        o["kind"] = json!("ReplicaSet");
        o["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": kind,
            "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"], "controller": true}]);
        o
    };
    let rs = reg
        .create(
            &REPLICASETS,
            Some("default"),
            owned("d-1", &d, "Deployment"),
            false,
        )
        .await
        .unwrap();
    let mut p = pod("d-1-x");
    p["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet",
        "name": "d-1", "uid": rs["metadata"]["uid"], "controller": true}]);
    reg.create(&super::resources::PODS, Some("default"), p, false)
        .await
        .unwrap();

    // Foreground: the owner waits for its dependents.
    let fg = DeleteOptions {
        propagation_policy: Some("Foreground".into()),
        ..Default::default()
    };
    reg.delete(&DEPLOYMENTS, Some("default"), "d", &fg)
        .await
        .unwrap();
    assert!(reg.get(&DEPLOYMENTS, Some("default"), "d").await.is_ok());
    for _ in 0..4 {
        gc::collect_once(&reg).await.unwrap();
    }
    assert!(reg
        .get(&DEPLOYMENTS, Some("default"), "d")
        .await
        .unwrap_err()
        .is_not_found());
    assert!(reg
        .get(&REPLICASETS, Some("default"), "d-1")
        .await
        .unwrap_err()
        .is_not_found());
    assert!(reg
        .get(&super::resources::PODS, Some("default"), "d-1-x")
        .await
        .unwrap_err()
        .is_not_found());

    // Orphan: dependents stay without the ownerReference.
    let d = reg
        .create(&DEPLOYMENTS, Some("default"), deployment("o"), false)
        .await
        .unwrap();
    reg.create(
        &REPLICASETS,
        Some("default"),
        owned("o-1", &d, "Deployment"),
        false,
    )
    .await
    .unwrap();
    let orphan = DeleteOptions {
        propagation_policy: Some("Orphan".into()),
        ..Default::default()
    };
    reg.delete(&DEPLOYMENTS, Some("default"), "o", &orphan)
        .await
        .unwrap();
    gc::collect_once(&reg).await.unwrap();
    assert!(reg
        .get(&DEPLOYMENTS, Some("default"), "o")
        .await
        .unwrap_err()
        .is_not_found());
    let rs = reg.get(&REPLICASETS, Some("default"), "o-1").await.unwrap();
    assert!(rs["metadata"].get("ownerReferences").is_none());

    // Background: the owner goes at once, dependents on the next pass.
    let d = reg
        .create(&DEPLOYMENTS, Some("default"), deployment("b"), false)
        .await
        .unwrap();
    reg.create(
        &REPLICASETS,
        Some("default"),
        owned("b-1", &d, "Deployment"),
        false,
    )
    .await
    .unwrap();
    reg.delete(
        &DEPLOYMENTS,
        Some("default"),
        "b",
        &DeleteOptions::default(),
    )
    .await
    .unwrap();
    assert!(reg
        .get(&DEPLOYMENTS, Some("default"), "b")
        .await
        .unwrap_err()
        .is_not_found());
    gc::collect_once(&reg).await.unwrap();
    assert!(reg
        .get(&REPLICASETS, Some("default"), "b-1")
        .await
        .unwrap_err()
        .is_not_found());
}

/// A store with a tiny history window, to see 410 Gone.
struct SmallHistory(Arc<crate::store::Applied>);

#[async_trait]
impl Store for SmallHistory {
    async fn write(&self, cmd: Command) -> Result<CommandResult, StoreError> {
        Ok(self.0.apply(&cmd))
    }
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.0.state.lock().unwrap().get(key).cloned())
    }
    async fn range(&self, p: &str, s: Option<&str>, l: usize) -> Result<RangeResult, StoreError> {
        Ok(self.0.state.lock().unwrap().range(p, s, l))
    }
    async fn watch(&self, prefix: &str, after: u64) -> Result<WatchReceiver, StoreError> {
        self.0.watch(prefix, after)
    }
    fn revision(&self) -> u64 {
        self.0.state.lock().unwrap().revision()
    }
    fn range_local(&self, p: &str) -> RangeResult {
        self.0.state.lock().unwrap().range(p, None, 0)
    }
}

#[tokio::test]
async fn watch_from_compacted_revision_is_410_expired() {
    let a = start_with(Arc::new(SmallHistory(crate::store::Applied::new(3)))).await;
    for i in 0..8 {
        a.req("POST", PODS, Some(pod(&format!("c{i}")))).await;
    }
    let mut resp = a
        .http
        .get(format!("{}{PODS}?watch=true&resourceVersion=2", a.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut buf = Vec::new();
    let e = next_line(&mut resp, &mut buf).await.unwrap();
    assert_eq!(e["type"], "ERROR");
    assert_eq!(e["object"]["code"], 410);
    assert_eq!(e["object"]["reason"], "Expired");
    assert!(next_line(&mut resp, &mut buf).await.is_none());
}

#[tokio::test]
async fn namespace_deletion_waits_for_graceful_pods() {
    let a = start().await;
    a.req(
        "POST",
        "/api/v1/namespaces",
        Some(json!({"metadata": {"name": "t"}})),
    )
    .await;
    let tp = "/api/v1/namespaces/t/pods";
    a.req("POST", tp, Some(pod("a"))).await;
    a.req("POST", tp, Some(pod("b"))).await;
    a.req(
        "POST",
        &format!("{tp}/b/binding"),
        Some(json!({"target": {"kind": "Node", "name": "w1"}})),
    )
    .await;
    let (c, b) = a.req("GET", &format!("{tp}/b"), None).await;
    assert_eq!(
        (c, b["spec"]["nodeName"].as_str()),
        (200, Some("w1")),
        "{b}"
    );
    let (c, n) = a.req("DELETE", "/api/v1/namespaces/t", None).await;
    let (c2, b) = a.req("GET", &format!("{tp}/b"), None).await;
    assert_eq!(c2, 200, "{b}");
    assert_eq!(
        (c, n["status"]["phase"].as_str()),
        (200, Some("Terminating"))
    );
    assert_eq!(a.req("GET", &format!("{tp}/a"), None).await.0, 404);
    assert_eq!(a.req("GET", "/api/v1/namespaces/t", None).await.0, 200);
    let (c, s) = a.req("POST", tp, Some(pod("c"))).await;
    assert_eq!((c, s["reason"].as_str()), (403, Some("Forbidden")));
    // The worker confirms the last pod: the namespace goes.
    a.req("DELETE", &format!("{tp}/b?gracePeriodSeconds=0"), None)
        .await;
    assert_eq!(a.req("GET", "/api/v1/namespaces/t", None).await.0, 404);
    let (c, _) = a.req("DELETE", "/api/v1/namespaces/default", None).await;
    assert_eq!(c, 403);
}

#[tokio::test]
async fn node_name_watch_sees_binds_and_deletes_of_its_pods_only() {
    let a = start().await;
    let mut resp = a
        .http
        .get(format!(
            "{}/api/v1/pods?watch=true&fieldSelector=spec.nodeName%3Dn1&timeoutSeconds=5",
            a.base
        ))
        .send()
        .await
        .unwrap();
    let bind = |node: &str| {
        json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "x"},
            "target": {"kind": "Node", "name": node}})
    };
    a.req("POST", PODS, Some(pod("mine"))).await;
    a.req("POST", PODS, Some(pod("other"))).await;
    a.req("POST", &format!("{PODS}/other/binding"), Some(bind("n10")))
        .await;
    a.req("POST", &format!("{PODS}/mine/binding"), Some(bind("n1")))
        .await;
    a.req("DELETE", &format!("{PODS}/other"), None).await;
    a.req("DELETE", &format!("{PODS}/mine"), None).await;
    let mut buf = Vec::new();
    let mut seen = Vec::new();
    while let Some(e) = next_line(&mut resp, &mut buf).await {
        seen.push(format!(
            "{} {}",
            e["type"].as_str().unwrap(),
            e["object"]["metadata"]["name"].as_str().unwrap()
        ));
    }
    // Graceful deletion of a bound pod first sets deletionTimestamp (MODIFIED).
    assert_eq!(
        seen.first().map(String::as_str),
        Some("ADDED mine"),
        "{seen:?}"
    );
    assert!(seen.iter().all(|s| s.ends_with(" mine")), "{seen:?}");
}

#[tokio::test]
async fn rbac_decides_for_ordinary_users() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    ensure_defaults(store.as_ref()).await.unwrap();
    let admin = start_with(store.clone()).await;
    for ns in ["a", "b"] {
        let (c, _) = admin
            .req(
                "POST",
                "/api/v1/namespaces",
                Some(json!({"metadata": {"name": ns}})),
            )
            .await;
        assert_eq!(c, 201);
    }
    let binding = json!({
        "metadata": {"name": "alice-view"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
        "subjects": [{"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": "alice"}],
    });
    let (c, b) = admin
        .req(
            "POST",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/a/rolebindings",
            Some(binding),
        )
        .await;
    assert_eq!(c, 201, "{b}");
    let alice = start_as(
        store.clone(),
        crate::auth::Identity {
            user: "alice".into(),
            groups: vec!["system:authenticated".into()],
        },
    )
    .await;
    assert_eq!(
        alice.req("GET", "/api/v1/namespaces/a/pods", None).await.0,
        200
    );
    let (c, b) = alice.req("GET", "/api/v1/namespaces/b/pods", None).await;
    assert_eq!(c, 403);
    assert_eq!(b["reason"], "Forbidden");
    assert_eq!(
        b["message"],
        r#"pods is forbidden: User "alice" cannot list resource "pods" in API group "" in the namespace "b""#
    );
    let (c, _) = alice
        .req("POST", "/api/v1/namespaces/a/pods", Some(pod("x")))
        .await;
    assert_eq!(c, 403);
    // discovery is open to every authenticated user
    assert_eq!(alice.req("GET", "/apis/apps/v1", None).await.0, 200);
    // a SelfSubjectAccessReview answers both ways
    let review = |ns: &str| {
        json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": {"namespace": ns, "verb": "list", "resource": "pods"}}})
    };
    let path = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews";
    let (c, b) = alice.req("POST", path, Some(review("a"))).await;
    assert_eq!(c, 201, "{b}");
    assert_eq!(b["status"]["allowed"], true);
    assert_eq!(
        alice.req("POST", path, Some(review("b"))).await.1["status"]["allowed"],
        false
    );
}

#[tokio::test]
async fn rbac_objects_cannot_grant_more_than_their_writer_holds() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    ensure_defaults(store.as_ref()).await.unwrap();
    let admin = start_with(store.clone()).await;
    admin
        .req(
            "POST",
            "/api/v1/namespaces",
            Some(json!({"metadata": {"name": "a"}})),
        )
        .await;
    let bind = |name: &str, role: &str, user: &str| {
        json!({
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": user}],
        })
    };
    let rb = "/apis/rbac.authorization.k8s.io/v1/namespaces/a/rolebindings";
    assert_eq!(
        admin
            .req("POST", rb, Some(bind("bob-admin", "admin", "bob")))
            .await
            .0,
        201
    );
    let bob = start_as(
        store.clone(),
        crate::auth::Identity {
            user: "bob".into(),
            groups: vec!["system:authenticated".into()],
        },
    )
    .await;
    // bob administers namespace a: he may hand out `view` there...
    let (c, b) = bob
        .req("POST", rb, Some(bind("carol-view", "view", "carol")))
        .await;
    assert_eq!(c, 201, "{b}");
    // ...but not cluster-admin, which he does not hold
    let (c, b) = bob
        .req("POST", rb, Some(bind("bob-root", "cluster-admin", "bob")))
        .await;
    assert_eq!(c, 403, "{b}");
    assert!(
        b["message"]
            .as_str()
            .unwrap()
            .contains("not currently held"),
        "{b}"
    );
    // nor a Role with rights he lacks
    let role = json!({"metadata": {"name": "nodes"}, "rules": [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["delete"]}]});
    let (c, _) = bob
        .req(
            "POST",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/a/roles",
            Some(role),
        )
        .await;
    assert_eq!(c, 403);
}

#[tokio::test]
async fn requests_without_a_user_are_unauthorized() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let auth = crate::auth::Auth {
        authn: Arc::new(crate::auth::Authenticator::default()),
        authz: Arc::new(crate::auth::Authorizer::new(store.clone())),
    };
    let app = router(store.clone(), ApiInfo::new("m1"), auth);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    let r = reqwest::get(format!("{base}/api/v1/pods")).await.unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn a_watch_timeout_near_u64_max_is_capped_not_a_panic() {
    let a = start().await;
    let r = a
        .http
        .get(format!(
            "{}{PODS}?watch=true&timeoutSeconds=18446744073709551615",
            a.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // the server is still serving
    assert_eq!(a.req("GET", PODS, None).await.0, 200);
}

#[tokio::test]
async fn a_patch_that_grows_the_object_past_the_limit_is_413_and_changes_nothing() {
    let a = start().await;
    assert_eq!(a.req("POST", PODS, Some(pod("big"))).await.0, 201);
    // a 2 KB value, then 30 copies of everything so far into itself: doubling each time
    let ops: Vec<Value> = std::iter::once(json!({"op": "add", "path": "/metadata/annotations", "value": {"pad": "x".repeat(2000)}}))
        .chain((0..30).map(|i| json!({"op": "copy", "from": "/metadata/annotations", "path": format!("/metadata/annotations/c{i}")})))
        .collect();
    let (code, body) = a
        .req_ct(
            "PATCH",
            &format!("{PODS}/big"),
            "application/json-patch+json",
            Some(Value::Array(ops)),
        )
        .await;
    assert_eq!(code, 413, "{body}");
    assert_eq!(body["reason"], "RequestEntityTooLarge");
    let (_, got) = a.req("GET", &format!("{PODS}/big"), None).await;
    assert!(got["metadata"]["annotations"].is_null(), "{got}");
}

#[tokio::test]
async fn configured_limits_hold_and_exceeding_one_changes_nothing() {
    let mut info = ApiInfo::new("m1");
    info.limits = LimitsConfig {
        max_request_body: 4096,
        max_object_bytes: 2048,
        max_patch_operations: 3,
        max_selector_terms: 2,
        max_list_page: 2,
        ..LimitsConfig::default()
    };
    let admin = crate::auth::Identity {
        user: "admin".into(),
        groups: vec!["system:masters".into()],
    };
    let a = start_info(Arc::new(MemStore::new()), admin, info).await;
    for n in ["a", "b", "c"] {
        assert_eq!(a.req("POST", PODS, Some(pod(n))).await.0, 201);
    }
    // a body over max_request_body
    let mut big = pod("big");
    big["metadata"]["annotations"] = json!({"pad": "x".repeat(5000)});
    let (code, body) = a.req("POST", PODS, Some(big)).await;
    assert_eq!(code, 413, "{body}");
    assert_eq!(body["kind"], "Status");
    assert!(body["message"].as_str().unwrap().contains("4096"), "{body}");
    // an object over max_object_bytes
    let mut big = pod("big");
    big["metadata"]["annotations"] = json!({"pad": "x".repeat(3000)});
    let (code, body) = a.req("POST", PODS, Some(big)).await;
    assert_eq!(code, 413, "{body}");
    assert!(body["message"].as_str().unwrap().contains("2048"), "{body}");
    assert_eq!(a.req("GET", &format!("{PODS}/big"), None).await.0, 404);
    // a JSON patch over max_patch_operations
    let ops: Vec<Value> = (0..4)
        .map(|i| json!({"op": "add", "path": format!("/metadata/labels/l{i}"), "value": "v"}))
        .collect();
    let (code, body) = a
        .req_ct(
            "PATCH",
            &format!("{PODS}/a"),
            "application/json-patch+json",
            Some(Value::Array(ops)),
        )
        .await;
    assert_eq!(code, 413, "{body}");
    let (_, got) = a.req("GET", &format!("{PODS}/a"), None).await;
    assert!(got["metadata"]["labels"]["l0"].is_null(), "{got}");
    // selectors over max_selector_terms (values of a set count one each)
    let (code, body) = a
        .req(
            "GET",
            &format!("{PODS}?labelSelector=app%20in%20(a,b,c)"),
            None,
        )
        .await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("3 terms"),
        "{body}"
    );
    let (code, _) = a
        .req(
            "GET",
            &format!("{PODS}?labelSelector=app%20in%20(a,b)"),
            None,
        )
        .await;
    assert_eq!(code, 200);
    // a page larger than max_list_page is lowered, with a continue token
    let (code, body) = a.req("GET", &format!("{PODS}?limit=500"), None).await;
    assert_eq!(code, 200);
    assert_eq!(body["items"].as_array().unwrap().len(), 2, "{body}");
    assert!(body["metadata"]["continue"].is_string(), "{body}");
    let (_, all) = a.req("GET", PODS, None).await;
    assert_eq!(
        all["items"].as_array().unwrap().len(),
        3,
        "no limit: no paging"
    );
}

#[tokio::test]
async fn raw_lists_are_the_bytes_of_decoded_lists() {
    use crate::api::registry::{raw_item, ListOptions, Registry};
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let reg = Registry::new(store.clone());
    let pods = crate::api::resources::PODS;
    for n in ["a", "b", "c"] {
        let mut p = pod(n);
        p["metadata"]["labels"] = json!({"app": "x", "tier": n});
        p["status"] = json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False"}]});
        reg.create(&pods, Some("default"), p, false).await.unwrap();
    }
    let kvs = store.range("/registry/pods/", None, 0).await.unwrap().kvs;
    assert_eq!(kvs.len(), 3);
    for kv in &kvs {
        let decoded = serde_json::to_vec(&Registry::decode(&pods, kv).unwrap()).unwrap();
        assert_eq!(
            String::from_utf8(raw_item(&pods, kv).unwrap()).unwrap(),
            String::from_utf8(decoded).unwrap()
        );
    }
    // The whole list answer, both ways, page by page.
    let opts = ListOptions {
        limit: 2,
        ..ListOptions::default()
    };
    let (items, rev, token) = reg
        .list_json(&pods, Some("default"), &opts)
        .await
        .unwrap()
        .unwrap();
    let decoded = reg.list(&pods, Some("default"), &opts).await.unwrap();
    assert_eq!((rev, &token), (decoded.revision, &decoded.continue_token));
    let as_bytes: Vec<Vec<u8>> = decoded
        .items
        .iter()
        .map(|o| serde_json::to_vec(o).unwrap())
        .collect();
    assert_eq!(items, as_bytes);
    // With a selector the raw path declines.
    let selective = ListOptions {
        label_selector: crate::api::selector::LabelSelector::parse("tier=a").unwrap(),
        ..ListOptions::default()
    };
    assert!(reg
        .list_json(&pods, Some("default"), &selective)
        .await
        .unwrap()
        .is_none());
}
