//! The scheduling loop: on pod and node changes (debounced to one cycle per
//! [`MIN_CYCLE_INTERVAL`]) and every second, read pods and nodes, and for each pending
//! pod the [`Queue`] lets through decide a node ([`fit::schedule_with`]) and bind it, or
//! park the pod and submit its Unschedulable mark. Binds go out up to [`BINDS_IN_FLIGHT`]
//! at a time, so group commit carries them together; placement is decided pod by pod
//! with this cycle's binds counted in the usage, so they never overcommit a node.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use tokio_util::sync::CancellationToken;

use super::fit::{self, Usage};
use super::marks::Marks;
use super::queue::{PodRef, Queue};
use crate::api::error::ApiError;
use crate::api::events::{self, Involved, Severity, Source};
use crate::api::objects::{DecodeCache, Objects};
use crate::api::registry::Registry;
use crate::controllers::nodes::changed_beyond_heartbeat;
use crate::store::Event;

/// Least time between two cycles triggered by changes.
const MIN_CYCLE_INTERVAL: Duration = Duration::from_millis(50);
/// Binds in flight at once.
const BINDS_IN_FLIGHT: usize = 64;

/// Pods and nodes as decoded by earlier cycles (only changed objects decode again).
#[derive(Default)]
struct Decoded {
    pods: DecodeCache<Arc<Pod>>,
    nodes: DecodeCache<Arc<Node>>,
}

/// Run until `cancel` fires.
pub(super) async fn run(reg: Arc<Registry>, cancel: CancellationToken) {
    tracing::info!("scheduler started");
    let marks = Marks::default();
    tokio::spawn(marks.clone().run(reg.clone(), cancel.clone()));
    let follow = || async {
        let store = reg.store();
        match store.watch("/registry/", store.revision()).await {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!("scheduler: cannot watch the store ({e}); polling only");
                None
            }
        }
    };
    let mut changes = follow().await;
    let mut queue = Queue::default();
    let mut decoded = Decoded::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last = tokio::time::Instant::now();
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
                    Some(Ok(e)) if !wakes(&e) => continue,
                    Some(Ok(_)) => {}
                    // Ended (fell behind, or leadership lost): follow from now on.
                    _ => changes = follow().await,
                }
                let at = (last + MIN_CYCLE_INTERVAL).max(tokio::time::Instant::now());
                tokio::time::sleep_until(at).await;
                if let Some(c) = changes.as_mut() {
                    c.discard_queued();
                }
            }
        }
        if cancel.is_cancelled() {
            break;
        }
        last = tokio::time::Instant::now();
        if let Err(e) = cycle(&reg, &cancel, &mut queue, &marks, &mut decoded).await {
            tracing::debug!("scheduling cycle: {e}");
        }
    }
    tracing::info!("scheduler stopped");
}

/// Whether a store change may give the scheduler work: any pod change (a new pending
/// pod, or room freed), and node changes other than heartbeats and lease renewals.
fn wakes(ev: &Event) -> bool {
    let key = ev.key();
    if key.starts_with("/registry/pods/") {
        return true;
    }
    if !key.starts_with("/registry/nodes/") {
        return false;
    }
    match ev {
        Event::Put {
            kv,
            prev: Some(prev),
        } => changed_beyond_heartbeat(&prev.value, &kv.value),
        _ => true,
    }
}

/// One scheduling cycle.
async fn cycle(
    reg: &Registry,
    cancel: &CancellationToken,
    queue: &mut Queue,
    marks: &Marks,
    decoded: &mut Decoded,
) -> Result<(), ApiError> {
    let objs = Objects::from_registry(reg.clone());
    let pods = objs.list_all_cached(None, &mut decoded.pods).await?;
    let nodes = objs.list_all_cached(None, &mut decoded.nodes).await?;
    let mut usage = Usage::new(&nodes, &pods);
    let pending: Vec<(PodRef, &Arc<Pod>)> = pods
        .iter()
        .filter(|p| {
            let bound = p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
            !bound && p.metadata.deletion_timestamp.is_none()
        })
        .map(|p| (pod_ref(p), p))
        .collect();
    let now = Instant::now();
    queue.begin(
        pending.iter().map(|(r, _)| r),
        &fit::rooms(&nodes, &usage),
        now,
    );
    let mut binds = FuturesUnordered::new();
    for (at, pod) in pending {
        if cancel.is_cancelled() {
            return Ok(());
        }
        if !queue.should_try(&at) {
            continue;
        }
        match fit::schedule_with(pod, &nodes, &usage) {
            Ok(node) => {
                usage.add(pod, &node);
                marks.withdraw(&at);
                binds.push(bind(reg, at, pod.metadata.uid.clone(), node));
                if binds.len() >= BINDS_IN_FLIGHT {
                    binds.next().await;
                }
            }
            Err(message) => {
                if !says_already(pod, &message) {
                    marks.submit(at.clone(), pod.metadata.uid.clone(), message);
                }
                queue.park(at, now);
            }
        }
    }
    while binds.next().await.is_some() {}
    queue.end(fit::rooms(&nodes, &usage));
    tracing::trace!(
        parked = queue.parked(),
        marks = marks.len(),
        "scheduling cycle done"
    );
    Ok(())
}

fn pod_ref(p: &Pod) -> PodRef {
    PodRef {
        namespace: p
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: p.metadata.name.clone().unwrap_or_default(),
    }
}

/// The pod's `PodScheduled=False` condition already carries `message`.
fn says_already(p: &Pod, message: &str) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.message.as_deref() == Some(message)
            })
        })
}

async fn bind(reg: &Registry, pod: PodRef, uid: Option<String>, node: String) {
    match reg.bind(&pod.namespace, &pod.name, &node).await {
        Ok(_) => {
            let about = Involved {
                kind: "Pod",
                namespace: &pod.namespace,
                name: &pod.name,
                uid: uid.as_deref(),
            };
            let message = format!(
                "Successfully assigned {}/{} to {node}",
                pod.namespace, pod.name
            );
            let (sev, src) = (Severity::Normal, Source::Scheduler);
            events::record(reg, src, about, sev, "Scheduled", &message).await;
        }
        // Bound or deleted meanwhile, or a conflict storm: the next cycle sees the pod as
        // it is now (it is not parked, so it is tried again while it still waits).
        Err(e) => tracing::debug!(pod = %pod.name, "bind failed: {e}"),
    }
}
