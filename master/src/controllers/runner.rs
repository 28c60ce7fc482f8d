//! Runs the controllers on the active master, for as long as its
//! leadership token lives: on every store change (debounced) and every second (for
//! time-based work), read the objects, call the pure reconcile functions, and write the
//! results through the API [`Registry`] (compare-and-swap, the same semantics as API
//! clients). The moment the token is revoked the loop stops, before its next write.

use std::sync::Arc;
use std::time::Duration;

use ballast_config::ControlConfig;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::{deployment, nodes, random_name, replicaset};
use crate::api::error::ApiError;
use crate::api::events::{self, Involved, Severity, Source};
use crate::api::informer::Informer;
use crate::api::registry::{DeleteOptions, Registry};
use crate::api::resources::{ResourceDef, DEPLOYMENTS, NODES, PODS, REPLICASETS};
use crate::store::Event;

/// Everything the controllers look at, read once per pass.
struct World {
    deployments: Vec<Arc<Deployment>>,
    replicasets: Vec<Arc<ReplicaSet>>,
    pods: Vec<Arc<Pod>>,
    nodes: Vec<Arc<Node>>,
    leases: Vec<Arc<Lease>>,
}

/// Every object the controllers look at, kept current from the store's watch (only
/// changed objects are decoded; a pass no longer lists 10 000 pods again).
struct Informers {
    deployments: Informer<Deployment>,
    replicasets: Informer<ReplicaSet>,
    pods: Informer<Pod>,
    nodes: Informer<Node>,
    leases: Informer<Lease>,
}

impl Informers {
    fn new() -> Result<Self, ApiError> {
        Ok(Self {
            deployments: Informer::new()?,
            replicasets: Informer::new()?,
            pods: Informer::new()?,
            nodes: Informer::new()?,
            leases: Informer::new()?,
        })
    }

    async fn observe(&mut self, reg: &Registry) -> Result<World, ApiError> {
        self.deployments.drain(reg).await?;
        self.replicasets.drain(reg).await?;
        self.pods.drain(reg).await?;
        self.nodes.drain(reg).await?;
        self.leases.drain(reg).await?;
        Ok(World {
            deployments: self.deployments.objects().cloned().collect(),
            replicasets: self.replicasets.objects().cloned().collect(),
            pods: self.pods.objects().cloned().collect(),
            nodes: self.nodes.objects().cloned().collect(),
            leases: self
                .leases
                .objects()
                .filter(|l| l.metadata.namespace.as_deref() == Some("kube-node-lease"))
                .cloned()
                .collect(),
        })
    }
}

fn ns_of(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    m.namespace.clone().unwrap_or_else(|| "default".into())
}

/// Least time between two passes triggered by store changes.
const MIN_PASS_INTERVAL: Duration = Duration::from_millis(100);

/// Whether a store change should trigger a reconcile pass. Lease renewals, events and
/// node heartbeats (a node status whose only change is `lastHeartbeatTime`) do not:
/// node lifecycle is time-based and runs on the tick, and with thousands of nodes
/// heartbeating they would keep the controllers relisting.
fn triggers_pass(ev: &Event) -> bool {
    let key = ev.key();
    if key.starts_with("/registry/leases/") || key.starts_with("/registry/events/") {
        return false;
    }
    match ev {
        Event::Put {
            kv,
            prev: Some(prev),
        } if key.starts_with("/registry/nodes/") => {
            nodes::changed_beyond_heartbeat(&prev.value, &kv.value)
        }
        _ => true,
    }
}

/// Run until `cancel` fires (leadership lost or shutdown).
pub(crate) async fn run(reg: Arc<Registry>, control: ControlConfig, cancel: CancellationToken) {
    tracing::info!("controllers and scheduler started");
    // Garbage collection (ownerReferences, deletion finalizers, namespaces) lives with the
    // API's object semantics; it runs under the same leadership token.
    tokio::spawn(crate::api::gc::run(
        (*reg).clone(),
        Duration::from_secs(2),
        cancel.clone(),
    ));
    let mut changes = match reg
        .store()
        .watch("/registry/", reg.store().revision())
        .await
    {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!("controllers: cannot watch the store ({e}); polling only");
            None
        }
    };
    let mut informers = match Informers::new() {
        Ok(i) => i,
        Err(e) => {
            tracing::error!("controllers cannot start: {e}");
            return;
        }
    };
    let mut heartbeats = nodes::Heartbeats::default();
    let mut tick = tokio::time::interval(Duration::from_millis(1000));
    let mut last_pass = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {},
            ev = async {
                match changes.as_mut() {
                    Some(c) => c.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                match ev {
                    // Lease renewals and events change nothing the controllers act on at
                    // once (node lifecycle is time-based and runs on the tick).
                    Some(Ok(e)) if !triggers_pass(&e) => continue,
                    Some(Ok(_)) => {}
                    // Ended (fell behind, or leadership lost): follow from now on.
                    _ => changes = reg.store().watch("/registry/", reg.store().revision()).await.ok(),
                }
                // Debounce: let a burst of writes land (at most one pass per
                // MIN_PASS_INTERVAL), then drain it.
                let wait = (last_pass + MIN_PASS_INTERVAL)
                    .max(tokio::time::Instant::now() + Duration::from_millis(20));
                tokio::time::sleep_until(wait).await;
                if let Some(c) = changes.as_mut() {
                    c.discard_queued();
                }
            }
        }
        if cancel.is_cancelled() {
            break;
        }
        last_pass = tokio::time::Instant::now();
        if let Err(e) = pass(&reg, &control, &cancel, &mut informers, &mut heartbeats).await {
            tracing::debug!("controller pass: {e}");
        }
    }
    tracing::info!("controllers and scheduler stopped");
}

/// One reconcile pass over everything; each step stops early when `cancel` fires.
async fn pass(
    reg: &Registry,
    control: &ControlConfig,
    cancel: &CancellationToken,
    informers: &mut Informers,
    heartbeats: &mut nodes::Heartbeats,
) -> Result<(), ApiError> {
    let w = informers.observe(reg).await?;
    let now = nodes::Now {
        wall: crate::clock::now(),
        mono: std::time::Instant::now(),
    };
    sync_deployments(reg, &w, now.wall, cancel).await;
    sync_replicasets(reg, &w, cancel).await;
    sync_nodes(reg, &w, control, heartbeats, now, cancel).await;
    Ok(())
}

/// Deployments → ReplicaSets.
async fn sync_deployments(reg: &Registry, w: &World, now: Timestamp, cancel: &CancellationToken) {
    for d in &w.deployments {
        if cancel.is_cancelled() {
            return;
        }
        let ns = ns_of(&d.metadata);
        let name = d.metadata.name.clone().unwrap_or_default();
        let rss: Vec<Arc<ReplicaSet>> = w
            .replicasets
            .iter()
            .filter(|r| ns_of(&r.metadata) == ns)
            .cloned()
            .collect();
        let plan = deployment::reconcile(d, &rss, &w.pods, Time(now));
        if let Some(rs) = plan.create_rs {
            let v = serde_json::to_value(&rs).expect("rs serializes");
            match reg.create(&REPLICASETS, Some(&ns), v, false).await {
                Ok(_) | Err(ApiError::AlreadyExists { .. }) => {}
                Err(e) => tracing::warn!(deployment = %name, "cannot create replicaset: {e}"),
            }
        }
        for (rs, replicas) in plan.scale {
            let r = reg
                .update_with(&REPLICASETS, Some(&ns), &rs, |o| {
                    o["spec"]["replicas"] = json!(replicas);
                    Ok(())
                })
                .await;
            if let Err(e) = r {
                tracing::debug!(replicaset = %rs, "cannot scale: {e}");
            }
        }
        let revision_annotation = |rev: i64| {
            move |o: &mut serde_json::Value| {
                o["metadata"]["annotations"][deployment::REVISION_ANNOTATION] =
                    json!(rev.to_string());
                Ok::<(), ApiError>(())
            }
        };
        if let Some((rs, rev)) = plan.revise_rs {
            let r = reg
                .update_with(&REPLICASETS, Some(&ns), &rs, revision_annotation(rev))
                .await;
            if let Err(e) = r {
                tracing::debug!(replicaset = %rs, "cannot renumber: {e}");
            }
        }
        if let Some(rev) = plan.revision {
            let r = reg
                .update_with(&DEPLOYMENTS, Some(&ns), &name, revision_annotation(rev))
                .await;
            if let Err(e) = r {
                tracing::debug!(deployment = %name, "cannot set its revision: {e}");
            }
        }
        if let Some(st) = plan.status {
            set_status(reg, &DEPLOYMENTS, &ns, &name, st).await;
        }
    }
}

/// ReplicaSets → Pods.
async fn sync_replicasets(reg: &Registry, w: &World, cancel: &CancellationToken) {
    for rs in &w.replicasets {
        if cancel.is_cancelled() {
            return;
        }
        let ns = ns_of(&rs.metadata);
        let name = rs.metadata.name.clone().unwrap_or_default();
        let plan = replicaset::reconcile(rs, &w.pods, random_name);
        for p in plan.create_pods {
            let v = serde_json::to_value(&p).expect("pod serializes");
            if let Err(e) = reg.create(&PODS, Some(&ns), v, false).await {
                tracing::warn!(replicaset = %name, "cannot create pod: {e}");
            }
        }
        for p in plan.delete_pods {
            match reg
                .delete(&PODS, Some(&ns), &p, &DeleteOptions::default())
                .await
            {
                // Gone already: what the plan wanted.
                Ok(_) | Err(ApiError::NotFound { .. }) => {}
                // The next pass plans again from what it reads then.
                Err(e) => tracing::warn!(replicaset = %name, pod = %p, "cannot delete pod: {e}"),
            }
        }
        if let Some(st) = plan.status {
            set_status(reg, &REPLICASETS, &ns, &name, st).await;
        }
    }
}

/// Node lifecycle: conditions and taints of nodes whose lease expired, and eviction of
/// their pods after the eviction timeout.
async fn sync_nodes(
    reg: &Registry,
    w: &World,
    control: &ControlConfig,
    heartbeats: &mut nodes::Heartbeats,
    now: nodes::Now,
    cancel: &CancellationToken,
) {
    let np = nodes::reconcile(
        &w.nodes,
        &w.leases,
        &w.pods,
        heartbeats,
        now,
        control.node_grace_period,
        control.pod_eviction_timeout,
    );
    for n in np.update_nodes {
        if cancel.is_cancelled() {
            return;
        }
        let name = n.metadata.name.clone().unwrap_or_default();
        let status = serde_json::to_value(&n.status).unwrap_or(Value::Null);
        let taints = serde_json::to_value(n.spec.as_ref().and_then(|s| s.taints.clone()))
            .unwrap_or(Value::Null);
        let r = reg
            .update_with(&NODES, None, &name, |o| {
                o["spec"]["taints"] = taints.clone();
                Ok(())
            })
            .await;
        if let Err(e) = r {
            // Retried by the next pass (node lifecycle runs every second).
            tracing::warn!(node = %name, "cannot update taints: {e}");
        }
        set_status(reg, &NODES, "", &name, status).await;
        tracing::info!(node = %name, "node lifecycle: updated condition/taints");
    }
    for (ns, pod) in np.evict_pods {
        evict(reg, &ns, &pod).await;
    }
}

/// Delete a pod of an unreachable node at once and record why.
async fn evict(reg: &Registry, ns: &str, pod: &str) {
    tracing::info!(pod = %pod, namespace = %ns, "evicting pod from unreachable node");
    let opts = DeleteOptions {
        grace_period_seconds: Some(0),
        ..DeleteOptions::default()
    };
    match reg.delete(&PODS, Some(ns), pod, &opts).await {
        Ok(_) => {}
        Err(ApiError::NotFound { .. }) => return,
        Err(e) => {
            tracing::warn!(pod = %pod, namespace = %ns, "cannot evict pod: {e}");
            return;
        }
    }
    let about = Involved {
        kind: PODS.kind,
        namespace: ns,
        name: pod,
        uid: None,
    };
    let (sev, src) = (Severity::Normal, Source::ControllerManager);
    let message = "Marking for deletion Pod";
    events::record(reg, src, about, sev, "TaintManagerEviction", message).await;
}

async fn set_status(reg: &Registry, d: &'static ResourceDef, ns: &str, name: &str, status: Value) {
    let ns = (!ns.is_empty()).then_some(ns);
    let r = reg
        .update_with(d, ns, name, |o| {
            o["status"] = status.clone();
            Ok(())
        })
        .await;
    if let Err(e) = r {
        tracing::debug!(kind = d.kind, name, "cannot update status: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::KeyValue;

    fn put(key: &str, prev: Option<Value>, new: Value) -> Event {
        let kv = |v: &Value| KeyValue {
            key: key.into(),
            value: serde_json::to_vec(v).unwrap().into(),
            create_revision: 1,
            mod_revision: 2,
        };
        Event::Put {
            kv: kv(&new),
            prev: prev.as_ref().map(kv),
        }
    }

    fn node(ready: &str, beat: &str) -> Value {
        json!({"metadata": {"name": "n1", "resourceVersion": beat},
            "status": {"conditions": [{"type": "Ready", "status": ready,
                "lastHeartbeatTime": beat, "lastTransitionTime": "t0"}]}})
    }

    #[test]
    fn heartbeats_leases_and_events_do_not_trigger_passes() {
        let k = "/registry/nodes/n1";
        assert!(!triggers_pass(&put(
            k,
            Some(node("True", "t1")),
            node("True", "t2")
        )));
        assert!(triggers_pass(&put(
            k,
            Some(node("True", "t1")),
            node("False", "t2")
        )));
        assert!(
            triggers_pass(&put(k, None, node("True", "t1"))),
            "a new node"
        );
        assert!(!triggers_pass(&put(
            "/registry/leases/kube-node-lease/n1",
            None,
            json!({})
        )));
        assert!(!triggers_pass(&put(
            "/registry/events/default/e",
            None,
            json!({})
        )));
        assert!(triggers_pass(&put(
            "/registry/pods/default/p",
            None,
            json!({})
        )));
    }
}
