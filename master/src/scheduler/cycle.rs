//! The scheduling loop. It keeps pods and nodes in [`Informer`]s (a local copy kept
//! current from the store's watch) and turns each change into queue work: a pod that
//! starts waiting for a node (or whose spec changed) is added to the [`Queue`]; one that
//! was bound, is being deleted or is gone leaves it (and its unwritten mark is
//! withdrawn); a node that appears or changes what the filters read, or a bound pod that
//! stops taking room, may help parked pods. A cycle runs on such changes (at most one per
//! [`MIN_CYCLE_INTERVAL`]) and every second, and does nothing unless the queue has pods
//! to try or room may have changed: while 10 000 pods wait and nothing changes, a cycle
//! costs nothing, and each change costs its own decode, not a relist.
//!
//! A cycle decides pod by pod ([`fit::schedule_with`], this cycle's binds counted in the
//! usage, so they never overcommit a node), binds up to [`BINDS_IN_FLIGHT`] at a time so
//! group commit carries them together, and parks the pods that fit nowhere with a mark
//! for [`Marks`] to write.

use std::collections::HashMap;
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
use crate::api::informer::{Change, Informer};
use crate::api::registry::Registry;

/// Least time between two cycles triggered by changes.
const MIN_CYCLE_INTERVAL: Duration = Duration::from_millis(50);
/// Binds in flight at once.
const BINDS_IN_FLIGHT: usize = 64;

/// Run until `cancel` fires.
pub(super) async fn run(reg: Arc<Registry>, cancel: CancellationToken) {
    tracing::info!("scheduler started");
    let mut s = match Scheduler::new(reg.clone()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("scheduler cannot start: {e}");
            return;
        }
    };
    tokio::spawn(s.marks.clone().run(reg, cancel.clone()));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last = tokio::time::Instant::now();
    loop {
        let woken = tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => false,
            c = s.pods.changed() => match c {
                Ok(c) => s.on_pods(c),
                Err(e) => { tracing::debug!("scheduler: {e}"); true }
            },
            c = s.nodes.changed() => match c {
                Ok(c) => s.on_nodes(c),
                Err(e) => { tracing::debug!("scheduler: {e}"); true }
            },
        };
        if woken {
            // Let a burst of changes land: at most one cycle per MIN_CYCLE_INTERVAL.
            let at = (last + MIN_CYCLE_INTERVAL).max(tokio::time::Instant::now());
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep_until(at) => {}
            }
        } else if !s.rooms_dirty && !s.queue.has_work(Instant::now()) && s.started {
            continue;
        }
        last = tokio::time::Instant::now();
        if let Err(e) = s.cycle(&cancel).await {
            tracing::debug!("scheduling cycle: {e}");
        }
    }
    tracing::info!("scheduler stopped");
}

/// What the scheduler keeps from one cycle to the next.
struct Scheduler {
    reg: Arc<Registry>,
    pods: Informer<Pod>,
    nodes: Informer<Node>,
    /// The pods waiting for a node (not bound, not being deleted).
    pending: HashMap<PodRef, Arc<Pod>>,
    /// Pods this scheduler bound that the informer does not show bound yet, as bound
    /// (kube-scheduler's "assumed" pods): they count against their node's room, and are
    /// not scheduled again, until the pod's own change arrives. Without this a cycle that
    /// starts before the watch delivered the last cycle's binds over-commits nodes.
    assumed: HashMap<PodRef, Arc<Pod>>,
    queue: Queue,
    marks: Marks,
    /// Some node or bound pod changed in a way that may give parked pods room.
    rooms_dirty: bool,
    /// The first cycle (the first list) ran.
    started: bool,
}

impl Scheduler {
    fn new(reg: Arc<Registry>) -> Result<Self, ApiError> {
        Ok(Self {
            reg,
            pods: Informer::new()?,
            nodes: Informer::new()?,
            pending: HashMap::new(),
            assumed: HashMap::new(),
            queue: Queue::default(),
            marks: Marks::default(),
            rooms_dirty: false,
            started: false,
        })
    }

    /// Apply pod changes to the pending set and the queue; whether a cycle may have work.
    /// An empty batch means the watch ended: the next cycle lists again.
    fn on_pods(&mut self, changes: Vec<Change<Pod>>) -> bool {
        let mut wake = changes.is_empty();
        for Change { old, new } in changes {
            let Some(any) = new.as_ref().or(old.as_ref()) else {
                continue;
            };
            let at = pod_ref(any);
            if new.as_deref().is_none_or(|p| !waits(p)) {
                // bound (by us or anyone) or gone: the informer shows the truth now
                self.assumed.remove(&at);
            }
            let was = old.as_deref().filter(|p| waits(p));
            match new.as_ref().filter(|p| waits(p)) {
                Some(now) => {
                    if was.is_none_or(|w| w.spec != now.spec) {
                        self.queue.add(at.clone());
                        wake = true;
                    }
                    self.pending.insert(at, now.clone());
                }
                None => {
                    if self.pending.remove(&at).is_some() {
                        self.queue.remove(&at);
                        self.marks.withdraw(&at);
                    }
                }
            }
            let took = old.as_deref().and_then(fit::takes_room).is_some();
            let takes = new.as_deref().and_then(fit::takes_room).is_some();
            if took && !takes {
                self.rooms_dirty = true;
                wake = true;
            }
        }
        wake
    }

    /// Note node changes that may help parked pods; whether a cycle may have work.
    fn on_nodes(&mut self, changes: Vec<Change<Node>>) -> bool {
        let mut wake = changes.is_empty();
        for Change { old, new } in changes {
            let helps = match (&old, &new) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(o), Some(n)) => !fit::same_fit(o, n),
            };
            if helps {
                self.rooms_dirty = true;
                wake = true;
            }
        }
        wake
    }

    /// One scheduling cycle.
    async fn cycle(&mut self, cancel: &CancellationToken) -> Result<(), ApiError> {
        let changes = self.pods.drain(&self.reg).await?;
        self.on_pods(changes);
        let changes = self.nodes.drain(&self.reg).await?;
        self.on_nodes(changes);
        self.started = true;
        let now = Instant::now();
        if !self.rooms_dirty && !self.queue.has_work(now) {
            return Ok(());
        }
        self.rooms_dirty = false;
        let nodes: Vec<Arc<Node>> = self.nodes.objects().cloned().collect();
        let assumed = &self.assumed;
        let mut usage = Usage::new(
            &nodes,
            self.pods
                .objects()
                .filter(|p| !assumed.contains_key(&pod_ref(p)))
                .chain(assumed.values())
                .map(|p| &**p),
        );
        let reg = self.reg.clone();
        let mut binds = FuturesUnordered::new();
        for at in self.queue.begin(&fit::rooms(&nodes, &usage), now) {
            if cancel.is_cancelled() {
                return Ok(());
            }
            let Some(pod) = self.pending.get(&at).cloned() else {
                continue;
            };
            if self.assumed.contains_key(&at) {
                continue;
            }
            match fit::schedule_with(&pod, &nodes, &usage) {
                Ok(node) => {
                    usage.add(&pod, &node);
                    self.marks.withdraw(&at);
                    self.assumed.insert(at.clone(), bound_to(&pod, &node));
                    binds.push(bind(&reg, at, pod.metadata.uid.clone(), node));
                    if binds.len() >= BINDS_IN_FLIGHT {
                        if let Some(Err(again)) = binds.next().await {
                            self.assumed.remove(&again);
                            self.queue.add(again);
                        }
                    }
                }
                Err(message) => {
                    if !says_already(&pod, &message) {
                        self.marks
                            .submit(at.clone(), pod.metadata.uid.clone(), message);
                    }
                    self.queue.park(at, now);
                }
            }
        }
        while let Some(r) = binds.next().await {
            if let Err(again) = r {
                self.assumed.remove(&again);
                self.queue.add(again);
            }
        }
        self.queue.end(fit::rooms(&nodes, &usage));
        tracing::trace!(
            pods = self.pods.len(),
            pending = self.pending.len(),
            parked = self.queue.parked(),
            marks = self.marks.len(),
            "scheduling cycle done"
        );
        Ok(())
    }
}

/// `pod` as it is once bound to `node`.
fn bound_to(pod: &Pod, node: &str) -> Arc<Pod> {
    let mut p = pod.clone();
    p.spec.get_or_insert_with(Default::default).node_name = Some(node.to_string());
    Arc::new(p)
}

/// Waits for a node: not bound and not being deleted.
fn waits(p: &Pod) -> bool {
    let bound = p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
    !bound && p.metadata.deletion_timestamp.is_none()
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

/// Bind `pod` to `node`; `Err(pod)` when it should be tried again.
async fn bind(
    reg: &Registry,
    pod: PodRef,
    uid: Option<String>,
    node: String,
) -> Result<(), PodRef> {
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
            Ok(())
        }
        // Bound or deleted meanwhile (the pod's change takes it out of the queue), or a
        // conflict storm or lost leadership: try again while it still waits.
        Err(e) => {
            tracing::debug!(pod = %pod.name, "bind failed: {e}");
            Err(pod)
        }
    }
}
