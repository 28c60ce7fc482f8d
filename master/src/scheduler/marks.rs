//! Telling users why a pod waits: `PodScheduled=False` (reason `Unschedulable`, the
//! scheduler's message) on the pod and a `FailedScheduling` Event, as kube-scheduler
//! writes them, apart from binding so that binding never waits behind them.
//!
//! A scheduling cycle submits a mark per pod that fits nowhere and goes on; a writer
//! task writes the marks in submission order, at most [`IN_FLIGHT`] at once and
//! [`PER_SECOND`] a second. Marks are coalesced by pod: a newer message replaces one not
//! yet written, and binding a pod withdraws its mark. So 10 000 pods waiting cost at
//! most 10 000 marks queued, written at a bounded share of the store's writes. A mark
//! written late changes nothing on a pod bound or deleted meanwhile (checked inside the
//! compare-and-swap).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::queue::PodRef;
use crate::api::events::{self, Involved, Severity, Source};
use crate::api::registry::Registry;
use crate::api::resources::ResourceDef;

/// Marks being written at once.
const IN_FLIGHT: usize = 4;
/// Most marks started a second (each is a pod status write and an Event).
const PER_SECOND: u32 = 250;

#[derive(Debug, Clone)]
struct Mark {
    uid: Option<String>,
    message: String,
}

#[derive(Default)]
struct Pending {
    marks: HashMap<PodRef, Mark>,
    /// Submission order; may hold pods whose mark was withdrawn (skipped when popped).
    order: VecDeque<PodRef>,
}

impl Pending {
    fn pop(&mut self) -> Option<(PodRef, Mark)> {
        while let Some(pod) = self.order.pop_front() {
            if let Some(mark) = self.marks.remove(&pod) {
                return Some((pod, mark));
            }
        }
        None
    }
}

/// The marks not yet written, shared by the scheduling cycle and the writer.
#[derive(Clone, Default)]
pub(crate) struct Marks {
    pending: Arc<Mutex<Pending>>,
    wake: Arc<Notify>,
}

impl Marks {
    /// `pod` fits nowhere, for `message`.
    pub(crate) fn submit(&self, pod: PodRef, uid: Option<String>, message: String) {
        let mut p = self.pending.lock().expect("marks lock");
        if p.marks.insert(pod.clone(), Mark { uid, message }).is_none() {
            p.order.push_back(pod);
        }
        // Withdrawn pods leave stale entries in `order`; drop them before they pile up.
        if p.order.len() > 2 * p.marks.len() + 1024 {
            let Pending { marks, order } = &mut *p;
            order.retain(|pod| marks.contains_key(pod));
        }
        drop(p);
        self.wake.notify_one();
    }

    /// `pod` was bound (or is gone): its mark, if not yet written, is not wanted.
    pub(crate) fn withdraw(&self, pod: &PodRef) {
        self.pending.lock().expect("marks lock").marks.remove(pod);
    }

    /// Marks not yet written.
    pub(crate) fn len(&self) -> usize {
        self.pending.lock().expect("marks lock").marks.len()
    }

    fn pop(&self) -> Option<(PodRef, Mark)> {
        self.pending.lock().expect("marks lock").pop()
    }

    /// Write marks until `cancel` fires.
    pub(crate) async fn run(self, reg: Arc<Registry>, cancel: CancellationToken) {
        let mut writes = FuturesUnordered::new();
        let mut pace = tokio::time::interval(Duration::from_secs(1) / PER_SECOND);
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !cancel.is_cancelled() {
            if writes.len() >= IN_FLIGHT {
                writes.next().await;
                continue;
            }
            match self.pop() {
                Some((pod, mark)) => {
                    pace.tick().await;
                    writes.push(write(&reg, pod, mark));
                }
                None => tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = self.wake.notified() => {}
                    Some(()) = writes.next(), if !writes.is_empty() => {}
                },
            }
        }
    }
}

async fn write(reg: &Registry, pod: PodRef, mark: Mark) {
    let pods = ResourceDef::find("", "pods").expect("built-in resource");
    let condition = json!({
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": mark.message,
        "lastTransitionTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            crate::clock::now()
        ),
    });
    let mut changed = false;
    let r = reg
        .update_with(pods, Some(&pod.namespace), &pod.name, |o| {
            changed = apply(o, &condition);
            Ok(())
        })
        .await;
    match r {
        Ok(_) if changed => {
            let about = Involved {
                kind: "Pod",
                namespace: &pod.namespace,
                name: &pod.name,
                uid: mark.uid.as_deref(),
            };
            let (sev, src) = (Severity::Warning, Source::Scheduler);
            events::record(reg, src, about, sev, "FailedScheduling", &mark.message).await;
        }
        Ok(_) => {}
        // Deleted meanwhile, or a conflict storm: the next cycle decides again.
        Err(e) => tracing::debug!(pod = %pod.name, "cannot mark pod unschedulable: {e}"),
    }
}

/// Put `condition` on pod object `o` unless the pod was bound or is being deleted
/// meanwhile, or already says the same. Returns whether `o` changed.
fn apply(o: &mut Value, condition: &Value) -> bool {
    let bound = o
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    if bound || o.pointer("/metadata/deletionTimestamp").is_some() {
        return false;
    }
    let st = &mut o["status"];
    if !st.is_object() {
        *st = json!({});
    }
    let mut conds: Vec<Value> = st["conditions"].as_array().cloned().unwrap_or_default();
    let same = conds.iter().any(|c| {
        c["type"] == "PodScheduled"
            && c["status"] == "False"
            && c["message"] == condition["message"]
    });
    if same {
        return false;
    }
    conds.retain(|c| c["type"] != "PodScheduled");
    conds.push(condition.clone());
    st["phase"] = json!("Pending");
    st["conditions"] = Value::Array(conds);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> PodRef {
        PodRef::in_default(name)
    }

    #[test]
    fn marks_are_coalesced_by_pod_and_withdrawn_on_bind() {
        let m = Marks::default();
        m.submit(pod("a"), None, "0/1 nodes".into());
        m.submit(pod("b"), None, "0/1 nodes".into());
        m.submit(pod("a"), None, "0/2 nodes".into());
        assert_eq!(m.len(), 2);
        m.withdraw(&pod("b"));
        let (p, mark) = m.pop().unwrap();
        assert_eq!((p.name.as_str(), mark.message.as_str()), ("a", "0/2 nodes"));
        assert!(m.pop().is_none());
        for i in 0..5000 {
            m.submit(pod(&i.to_string()), None, "x".into());
            m.withdraw(&pod(&i.to_string()));
        }
        assert!(
            m.pending.lock().unwrap().order.len() <= 1024 + 1,
            "stale entries dropped"
        );
    }

    #[test]
    fn a_late_mark_leaves_bound_and_deleted_pods_alone() {
        let cond = json!({"type": "PodScheduled", "status": "False", "message": "0/1 nodes"});
        let mut bound = json!({"spec": {"nodeName": "n1"}, "status": {"phase": "Running"}});
        assert!(!apply(&mut bound, &cond));
        let mut deleting = json!({"metadata": {"deletionTimestamp": "t"}, "spec": {}});
        assert!(!apply(&mut deleting, &cond));
        let mut waiting = json!({"spec": {}, "status": {"conditions": [
            {"type": "PodScheduled", "status": "False", "message": "0/0 nodes"}]}});
        assert!(apply(&mut waiting, &cond));
        assert_eq!(waiting["status"]["conditions"].as_array().unwrap().len(), 1);
        assert!(
            !apply(&mut waiting, &cond),
            "the same message is not written twice"
        );
    }
}
