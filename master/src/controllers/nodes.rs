//! Node lifecycle: a node whose Lease is not renewed within the grace period becomes
//! `Ready=Unknown` and gets the `node.kubernetes.io/unreachable:NoExecute` taint; its pods
//! are evicted once their toleration of that taint (or the default eviction timeout)
//! runs out, so their ReplicaSets replace them on other nodes. When the node reports
//! `Ready=True` again the taint goes.
//!
//! "Renewed within the grace period" is judged by this master's monotonic clock, from when
//! it saw the renewal ([`Heartbeats`]), never from the time the worker wrote in it.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, NodeCondition, Pod, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

pub(crate) const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";

/// What the node lifecycle controller needs.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct NodesPlan {
    /// Nodes to write back (status and/or taints changed).
    pub update_nodes: Vec<Node>,
    /// Pods to delete at once: `(namespace, name)`.
    pub evict_pods: Vec<(String, String)>,
}

fn ready_condition(n: &Node) -> Option<&NodeCondition> {
    n.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
}

fn ts(t: &Time) -> Timestamp {
    t.0
}

/// When this master last saw each node's heartbeat move, by its own monotonic clock.
///
/// A node's Lease `renewTime` and Ready `lastHeartbeatTime` carry the *worker's* wall
/// clock: a worker 60 s behind would look 60 s stale at every renewal, one 60 s ahead would
/// look alive for a minute after it died. So, as kube-controller-manager's node lifecycle
/// controller does (its `probeTimestamp`), the reported value is only compared with the one
/// seen before: a change means "heard from now", and the grace period runs from there. A
/// master that has just become active has seen nothing yet and gives every node a full
/// grace period; a jump of its own wall clock changes nothing.
#[derive(Debug, Default)]
pub(crate) struct Heartbeats {
    seen: HashMap<String, (Beat, Instant)>,
}

/// What a node reports of itself: its Lease's `renewTime` and its Ready condition's
/// `lastHeartbeatTime` (each by its own clock; only compared for change).
type Beat = (Option<Timestamp>, Option<Timestamp>);

impl Heartbeats {
    /// When `node` was last heard from, given what it reports now.
    fn heard(&mut self, node: &str, reported: Beat, now: Instant) -> Instant {
        match self.seen.get(node) {
            Some((r, at)) if *r == reported => *at,
            _ => {
                self.seen.insert(node.to_string(), (reported, now));
                now
            }
        }
    }

    /// Forget nodes that are gone.
    fn keep_only<'a>(&mut self, names: impl Iterator<Item = &'a str>) {
        let names: std::collections::HashSet<&str> = names.collect();
        self.seen.retain(|n, _| names.contains(n.as_str()));
    }
}

/// The time now: the wall clock for what is written into objects (conditions, taints),
/// the monotonic clock for how long a node has been silent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    pub wall: Timestamp,
    pub mono: Instant,
}

/// What the node reports of itself now.
fn beat(n: &Node, lease: Option<&Lease>) -> Beat {
    let lease_t = lease
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.renew_time.as_ref())
        .map(|t| t.0);
    let hb = ready_condition(n).and_then(|c| c.last_heartbeat_time.as_ref().map(ts));
    (lease_t, hb)
}

fn elapsed(since: Timestamp, now: Timestamp) -> Duration {
    let d = now.duration_since(since);
    Duration::try_from(d).unwrap_or(Duration::ZERO)
}

/// Reconcile every node given the leases in `kube-node-lease` and all pods.
pub(crate) fn reconcile(
    nodes: &[impl Borrow<Node>],
    leases: &[impl Borrow<Lease>],
    pods: &[impl Borrow<Pod>],
    heartbeats: &mut Heartbeats,
    clock: Now,
    grace: Duration,
    eviction: Duration,
) -> NodesPlan {
    let mut plan = NodesPlan::default();
    let now = clock.wall;
    heartbeats.keep_only(
        nodes
            .iter()
            .filter_map(|n| n.borrow().metadata.name.as_deref()),
    );
    for n in nodes {
        let n: &Node = n.borrow();
        let name = n.metadata.name.clone().unwrap_or_default();
        let lease = leases
            .iter()
            .map(Borrow::borrow)
            .find(|l| l.metadata.name.as_deref() == Some(name.as_str()));
        let heard = heartbeats.heard(&name, beat(n, lease), clock.mono);
        let stale = clock.mono.saturating_duration_since(heard) > grace;
        let ready_status = ready_condition(n).map(|c| c.status.clone());
        let taints = n
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        let tainted = taints.iter().find(|t| t.key == UNREACHABLE_TAINT).cloned();
        let mut node = n.clone();
        let mut changed = false;
        if stale && ready_status.as_deref() != Some("Unknown") {
            let status = node.status.get_or_insert_with(Default::default);
            let conds = status.conditions.get_or_insert_with(Vec::new);
            let new = NodeCondition {
                type_: "Ready".into(),
                status: "Unknown".into(),
                reason: Some("NodeStatusUnknown".into()),
                message: Some("Kubelet stopped posting node status.".into()),
                last_transition_time: Some(Time(now)),
                last_heartbeat_time: conds
                    .iter()
                    .find(|c| c.type_ == "Ready")
                    .and_then(|c| c.last_heartbeat_time.clone()),
            };
            conds.retain(|c| c.type_ != "Ready");
            conds.push(new);
            changed = true;
        }
        let not_ready = stale || ready_status.as_deref() != Some("True");
        if not_ready && stale && tainted.is_none() {
            let spec = node.spec.get_or_insert_with(Default::default);
            spec.taints.get_or_insert_with(Vec::new).push(Taint {
                key: UNREACHABLE_TAINT.into(),
                effect: "NoExecute".into(),
                time_added: Some(Time(now)),
                value: None,
            });
            changed = true;
        }
        if !stale && ready_status.as_deref() == Some("True") && tainted.is_some() {
            if let Some(ts) = node.spec.as_mut().and_then(|s| s.taints.as_mut()) {
                ts.retain(|t| t.key != UNREACHABLE_TAINT);
            }
            changed = true;
        }
        if changed {
            plan.update_nodes.push(node);
        }
        // Evict pods from a node tainted unreachable for longer than their toleration.
        if let Some(t) = tainted.filter(|_| stale) {
            let since = t.time_added.as_ref().map(ts).unwrap_or(now);
            for p in pods {
                let p: &Pod = p.borrow();
                if p.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(name.as_str()) {
                    continue;
                }
                let tolerate = toleration_seconds(p)
                    .map(Duration::from_secs)
                    .unwrap_or(eviction);
                if elapsed(since, now) >= tolerate {
                    plan.evict_pods.push((
                        p.metadata.namespace.clone().unwrap_or_default(),
                        p.metadata.name.clone().unwrap_or_default(),
                    ));
                }
            }
        }
    }
    plan
}

/// The pod's `tolerationSeconds` for the unreachable taint, if it tolerates it.
fn toleration_seconds(p: &Pod) -> Option<u64> {
    let tols = p.spec.as_ref()?.tolerations.as_ref()?;
    tols.iter()
        .find(|t| {
            let key_ok = t.key.as_deref() == Some(UNREACHABLE_TAINT)
                || (t.key.is_none() && t.operator.as_deref() == Some("Exists"));
            let effect_ok = t.effect.as_deref().is_none_or(|e| e == "NoExecute");
            key_ok && effect_ok
        })
        .map(|t| t.toleration_seconds.unwrap_or(i64::MAX).max(0) as u64)
}

/// Whether a node object changed in more than a heartbeat does (`lastHeartbeatTime`,
/// `resourceVersion`): with thousands of nodes heartbeating, the controllers and the
/// scheduler must not wake for each.
pub(crate) fn changed_beyond_heartbeat(prev: &[u8], now: &[u8]) -> bool {
    node_beat(prev) != node_beat(now)
}

/// A node object without what a heartbeat changes (unparseable → `Null`, which makes
/// any change trigger).
fn node_beat(raw: &[u8]) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_slice(raw).unwrap_or_default();
    if let Some(m) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        m.remove("resourceVersion");
        m.remove("managedFields");
    }
    if let Some(cs) = v
        .pointer_mut("/status/conditions")
        .and_then(|c| c.as_array_mut())
    {
        for c in cs.iter_mut().filter_map(|c| c.as_object_mut()) {
            c.remove("lastHeartbeatTime");
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::api::core::v1::{NodeStatus, Toleration};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};

    use super::*;
    use crate::controllers::tests::pod;

    const NO_PODS: &[Pod] = &[];
    const NO_LEASES: &[Lease] = &[];

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    fn node(name: &str, ready: &str) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                creation_timestamp: Some(Time(at(0))),
                ..Default::default()
            },
            spec: None,
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    last_heartbeat_time: Some(Time(at(0))),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    fn lease(name: &str, renew: i64) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                renew_time: Some(MicroTime(at(renew))),
                ..Default::default()
            }),
        }
    }

    const G: Duration = Duration::from_secs(40);
    const E: Duration = Duration::from_secs(300);

    /// The master's clocks `secs` into a test (both start together).
    fn clock(base: Instant, secs: i64) -> Now {
        Now {
            wall: at(secs),
            mono: base + Duration::from_secs(secs as u64),
        }
    }

    #[test]
    fn fresh_lease_keeps_node_ready() {
        let (base, mut hb) = (Instant::now(), Heartbeats::default());
        let plan = reconcile(
            &[node("w1", "True")],
            &[lease("w1", 30)],
            NO_PODS,
            &mut hb,
            clock(base, 60),
            G,
            E,
        );
        assert!(plan.update_nodes.is_empty());
    }

    #[test]
    fn stale_lease_marks_unknown_and_taints() {
        let (base, mut hb) = (Instant::now(), Heartbeats::default());
        let nodes = [node("w1", "True")];
        let leases = [lease("w1", 10)];
        let plan = reconcile(&nodes, &leases, NO_PODS, &mut hb, clock(base, 10), G, E);
        assert!(plan.update_nodes.is_empty(), "heard from just now");
        let plan = reconcile(&nodes, &leases, NO_PODS, &mut hb, clock(base, 60), G, E);
        let n = &plan.update_nodes[0];
        assert_eq!(ready_condition(n).unwrap().status, "Unknown");
        let t = &n.spec.as_ref().unwrap().taints.as_ref().unwrap()[0];
        assert_eq!(
            (t.key.as_str(), t.effect.as_str()),
            (UNREACHABLE_TAINT, "NoExecute")
        );
    }

    #[test]
    fn pods_evicted_after_toleration() {
        let mut n = node("w1", "Unknown");
        n.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            taints: Some(vec![Taint {
                key: UNREACHABLE_TAINT.into(),
                effect: "NoExecute".into(),
                time_added: Some(Time(at(100))),
                value: None,
            }]),
            ..Default::default()
        });
        let mut short = pod("short", Some("r"), Some("w1"), true);
        short.spec.as_mut().unwrap().tolerations = Some(vec![Toleration {
            key: Some(UNREACHABLE_TAINT.into()),
            operator: Some("Exists".into()),
            effect: Some("NoExecute".into()),
            toleration_seconds: Some(5),
            value: None,
        }]);
        let long = pod("long", Some("r"), Some("w1"), true);
        let other = pod("other", Some("r"), Some("w2"), true);
        let pods = [short, long, other];
        let (base, mut hb) = (Instant::now(), Heartbeats::default());
        let nodes = std::slice::from_ref(&n);
        let plan = reconcile(nodes, NO_LEASES, &pods, &mut hb, clock(base, 60), G, E);
        assert!(
            plan.evict_pods.is_empty(),
            "not silent for the grace period yet"
        );
        let plan = reconcile(nodes, NO_LEASES, &pods, &mut hb, clock(base, 110), G, E);
        assert_eq!(
            plan.evict_pods,
            vec![("default".to_string(), "short".to_string())]
        );
        let plan = reconcile(nodes, NO_LEASES, &pods, &mut hb, clock(base, 400), G, E);
        assert_eq!(plan.evict_pods.len(), 2);
    }

    #[test]
    fn recovered_node_loses_taint() {
        let mut n = node("w1", "True");
        n.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            taints: Some(vec![Taint {
                key: UNREACHABLE_TAINT.into(),
                effect: "NoExecute".into(),
                time_added: Some(Time(at(0))),
                value: None,
            }]),
            ..Default::default()
        });
        let (base, mut hb) = (Instant::now(), Heartbeats::default());
        let plan = reconcile(
            &[n],
            &[lease("w1", 100)],
            NO_PODS,
            &mut hb,
            clock(base, 101),
            G,
            E,
        );
        assert!(plan.update_nodes[0]
            .spec
            .as_ref()
            .unwrap()
            .taints
            .as_ref()
            .unwrap()
            .is_empty());
        assert!(plan.evict_pods.is_empty());
    }

    /// A worker whose wall clock is a minute behind renews every 10 s: its renewTime is
    /// always 60 s old by the master's clock, and the node stays Ready. One a minute ahead
    /// that stops renewing is marked after the grace period, not a minute later.
    #[test]
    fn a_worker_clock_a_minute_off_changes_nothing() {
        let (base, mut hb) = (Instant::now(), Heartbeats::default());
        let nodes = [node("w1", "True")];
        for k in 0..12 {
            let leases = [lease("w1", k * 10 - 60)];
            let plan = reconcile(&nodes, &leases, NO_PODS, &mut hb, clock(base, k * 10), G, E);
            assert!(
                plan.update_nodes.is_empty(),
                "behind, at {} s: {plan:?}",
                k * 10
            );
        }
        let (base, mut hb) = (Instant::now(), Heartbeats::default());
        let ahead = [lease("w1", 60)];
        let plan = reconcile(&nodes, &ahead, NO_PODS, &mut hb, clock(base, 0), G, E);
        assert!(plan.update_nodes.is_empty());
        let plan = reconcile(&nodes, &ahead, NO_PODS, &mut hb, clock(base, 41), G, E);
        assert_eq!(
            ready_condition(&plan.update_nodes[0]).unwrap().status,
            "Unknown"
        );
    }
}
