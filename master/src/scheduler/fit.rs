//! The scheduler's decision, as a pure function: filter the nodes a pod fits on (Ready,
//! schedulable, taints tolerated, nodeSelector, cpu / memory / pod count against
//! allocatable minus what bound pods request), then score them (least requested,
//! spreading replicas of one owner across nodes and zones) and pick the best.
//! [`rooms`] sums up what each node offers, so the queue can tell which changes may
//! help a pod that fitted nowhere.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};

use ballast_config::validate::parse_quantity;
use k8s_openapi::api::core::v1::{Node, Pod, Taint};

use crate::controllers::{controller_uid, is_active};

pub(crate) const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Requests of a pod: (cpu cores, memory bytes).
pub(crate) fn requests(p: &Pod) -> (f64, f64) {
    let mut cpu = 0.0;
    let mut mem = 0.0;
    for c in p
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or(&[])
    {
        if let Some(r) = c.resources.as_ref().and_then(|r| r.requests.as_ref()) {
            cpu += r
                .get("cpu")
                .and_then(|q| parse_quantity(&q.0))
                .unwrap_or(0.0);
            mem += r
                .get("memory")
                .and_then(|q| parse_quantity(&q.0))
                .unwrap_or(0.0);
        }
    }
    (cpu, mem)
}

fn allocatable(n: &Node, key: &str) -> f64 {
    n.status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref().or(s.capacity.as_ref()))
        .and_then(|a| a.get(key))
        .and_then(|q| parse_quantity(&q.0))
        .unwrap_or(0.0)
}

fn is_node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn tolerates(p: &Pod, t: &Taint) -> bool {
    if t.effect == "PreferNoSchedule" {
        return true;
    }
    let tols = p.spec.as_ref().and_then(|s| s.tolerations.as_ref());
    tols.is_some_and(|tols| {
        tols.iter().any(|tol| {
            let effect_ok = tol
                .effect
                .as_deref()
                .is_none_or(|e| e.is_empty() || e == t.effect);
            let op = tol.operator.as_deref().unwrap_or("Equal");
            let key_ok = match &tol.key {
                None => op == "Exists",
                Some(k) if k.is_empty() => op == "Exists",
                Some(k) => *k == t.key,
            };
            let value_ok = op == "Exists"
                || tol.value.as_deref().unwrap_or("") == t.value.as_deref().unwrap_or("");
            effect_ok && key_ok && value_ok
        })
    })
}

/// Why a node was filtered out (message fragments as kube-scheduler words them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Reject {
    NotReady,
    Unschedulable,
    Taint,
    Selector,
    Pods,
    Cpu,
    Memory,
}

impl Reject {
    fn text(self) -> &'static str {
        match self {
            Reject::NotReady => "node(s) were not ready",
            Reject::Unschedulable => "node(s) were unschedulable",
            Reject::Taint => "node(s) had untolerated taint",
            Reject::Selector => "node(s) didn't match Pod's node affinity/selector",
            Reject::Pods => "Too many pods",
            Reject::Cpu => "Insufficient cpu",
            Reject::Memory => "Insufficient memory",
        }
    }
}

/// What the pods already placed take, computed once for a whole scheduling pass (not
/// once per pending pod: with 10 000 pending pods that was 10⁸ pod visits a pass, and
/// the pass held an API thread for minutes).
#[derive(Debug, Default)]
pub(crate) struct Usage {
    /// Per node: cpu, memory, pod count.
    nodes: HashMap<String, (f64, f64, usize)>,
    /// Pods per (controller uid, node).
    peers: HashMap<(String, String), usize>,
    /// Pods per (controller uid, zone).
    zone_peers: HashMap<(String, String), usize>,
    zone_of: HashMap<String, String>,
}

impl Usage {
    /// `pods` are all pods in the cluster (bound ones count against their node).
    pub(crate) fn new<P: Borrow<Pod>>(
        nodes: &[impl Borrow<Node>],
        pods: impl IntoIterator<Item = P>,
    ) -> Self {
        let mut u = Usage {
            zone_of: nodes
                .iter()
                .map(Borrow::borrow)
                .filter_map(|n: &Node| {
                    let zone = n.metadata.labels.as_ref()?.get(ZONE_LABEL)?;
                    Some((n.metadata.name.clone()?, zone.clone()))
                })
                .collect(),
            ..Default::default()
        };
        for p in pods {
            let p: &Pod = p.borrow();
            if let Some(node) = takes_room(p) {
                u.add(p, node);
            }
        }
        u
    }

    /// Count `pod` on `node` (a bind made in this pass).
    pub(crate) fn add(&mut self, pod: &Pod, node: &str) {
        let (c, m) = requests(pod);
        let e = self.nodes.entry(node.to_string()).or_default();
        e.0 += c;
        e.1 += m;
        e.2 += 1;
        if let Some(owner) = controller_uid(&pod.metadata) {
            *self
                .peers
                .entry((owner.to_string(), node.to_string()))
                .or_default() += 1;
            if let Some(z) = self.zone_of.get(node) {
                *self
                    .zone_peers
                    .entry((owner.to_string(), z.clone()))
                    .or_default() += 1;
            }
        }
    }
}

/// What one node offers waiting pods: everything [`schedule_with`]'s filters read.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Room {
    /// Ready and not cordoned.
    pub(crate) open: bool,
    /// A hash of the node's labels and taints (what selectors and tolerations match).
    pub(crate) shape: u64,
    /// Allocatable minus what bound pods take: cpu cores, memory bytes, pod slots.
    pub(crate) free: [f64; 3],
}

/// Each node's [`Room`] (by node name) given `usage`.
pub(crate) fn rooms(nodes: &[impl Borrow<Node>], usage: &Usage) -> HashMap<String, Room> {
    nodes
        .iter()
        .map(Borrow::borrow)
        .map(|n: &Node| {
            let name = n.metadata.name.clone().unwrap_or_default();
            let (cpu, mem, count) = usage.nodes.get(&name).copied().unwrap_or_default();
            let taints = n.spec.as_ref().and_then(|s| s.taints.as_ref());
            let shape = serde_json::to_vec(&(&n.metadata.labels, taints))
                .map(|b| crate::controllers::fnv1a(&b))
                .unwrap_or_default();
            let room = Room {
                open: is_node_ready(n)
                    && n.spec.as_ref().and_then(|s| s.unschedulable) != Some(true),
                shape,
                free: [
                    allocatable(n, "cpu") - cpu,
                    allocatable(n, "memory") - mem,
                    allocatable(n, "pods") - count as f64,
                ],
            };
            (name, room)
        })
        .collect()
}

/// The node whose room `p` takes: bound, and running or still being deleted (a pod that
/// finished takes none).
pub(crate) fn takes_room(p: &Pod) -> Option<&str> {
    let node = p.spec.as_ref()?.node_name.as_deref()?;
    (is_active(p) || p.metadata.deletion_timestamp.is_some()).then_some(node)
}

/// Whether `a` and `b` (two states of one node) look the same to the filters, leaving
/// usage aside: readiness, cordon, labels, taints and allocatable. Heartbeats change none.
pub(crate) fn same_fit(a: &Node, b: &Node) -> bool {
    let view = |n: &Node| {
        let spec = n.spec.as_ref();
        let status = n.status.as_ref();
        (
            is_node_ready(n),
            spec.and_then(|s| s.unschedulable),
            spec.and_then(|s| s.taints.clone()),
            n.metadata.labels.clone(),
            status.and_then(|s| s.allocatable.clone().or_else(|| s.capacity.clone())),
        )
    };
    view(a) == view(b)
}

/// Choose a node for `pod`; `Err` carries the `PodScheduled=False` message.
/// `pods` are all pods in the cluster (bound ones count against their node).
#[cfg(test)]
pub(crate) fn schedule(pod: &Pod, nodes: &[Node], pods: &[Pod]) -> Result<String, String> {
    schedule_with(pod, nodes, &Usage::new(nodes, pods))
}

/// [`schedule`] against a precomputed [`Usage`].
pub(crate) fn schedule_with(
    pod: &Pod,
    nodes: &[impl Borrow<Node>],
    usage: &Usage,
) -> Result<String, String> {
    let (cpu, mem) = requests(pod);
    let selector = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_selector.clone())
        .unwrap_or_default();
    let owner = controller_uid(&pod.metadata);
    // pods of the same controller counted at a node or zone
    let peers = |counts: &HashMap<(String, String), usize>, at: &str| -> usize {
        owner.map_or(0, |o| {
            counts
                .get(&(o.to_string(), at.to_string()))
                .copied()
                .unwrap_or(0)
        })
    };
    let mut rejects: BTreeMap<Reject, usize> = BTreeMap::new();
    let mut best: Option<(i64, String)> = None;
    for n in nodes {
        let n: &Node = n.borrow();
        // borrowed, not cloned: this runs for every pending pod × every node
        let name = n.metadata.name.as_deref().unwrap_or_default();
        let label = |k: &str| n.metadata.labels.as_ref().and_then(|l| l.get(k));
        let (ucpu, umem, ucount) = usage.nodes.get(name).copied().unwrap_or_default();
        let u = (ucpu, umem, ucount, peers(&usage.peers, name));
        let (acpu, amem) = (allocatable(n, "cpu"), allocatable(n, "memory"));
        let reject = if !is_node_ready(n) {
            Some(Reject::NotReady)
        } else if n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
            Some(Reject::Unschedulable)
        } else if n
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|ts| ts.iter().any(|t| !tolerates(pod, t)))
        {
            Some(Reject::Taint)
        } else if selector.iter().any(|(k, v)| label(k) != Some(v)) {
            Some(Reject::Selector)
        } else if (u.2 + 1) as f64 > allocatable(n, "pods") {
            Some(Reject::Pods)
        } else if u.0 + cpu > acpu + 1e-9 {
            Some(Reject::Cpu)
        } else if u.1 + mem > amem + 1e-9 {
            Some(Reject::Memory)
        } else {
            None
        };
        if let Some(r) = reject {
            *rejects.entry(r).or_default() += 1;
            continue;
        }
        let free = |used: f64, alloc: f64| {
            if alloc > 0.0 {
                (1.0 - used / alloc).max(0.0)
            } else {
                0.0
            }
        };
        let least = (free(u.0 + cpu, acpu) + free(u.1 + mem, amem)) * 50.0;
        let zone = label(ZONE_LABEL).map_or(0, |z| peers(&usage.zone_peers, z));
        let score = least as i64 - 1000 * u.3 as i64 - 300 * zone as i64 - u.2 as i64;
        if best
            .as_ref()
            .is_none_or(|(s, b)| score > *s || (score == *s && name < b.as_str()))
        {
            best = Some((score, name.to_string()));
        }
    }
    match best {
        Some((_, n)) => Ok(n),
        None => {
            let parts: Vec<String> = rejects
                .iter()
                .map(|(r, c)| format!("{c} {}", r.text()))
                .collect();
            Err(format!(
                "0/{} nodes are available: {}.",
                nodes.len(),
                if parts.is_empty() {
                    "no nodes registered".to_string()
                } else {
                    parts.join(", ")
                }
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{
        NodeCondition, NodeSpec, NodeStatus, ResourceRequirements, Toleration,
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::controllers::tests::pod;

    const NO_PODS: &[Pod] = &[];

    fn node(name: &str, zone: &str, cpu: &str, ready: bool) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some([(ZONE_LABEL.to_string(), zone.to_string())].into()),
                ..Default::default()
            },
            spec: None,
            status: Some(NodeStatus {
                allocatable: Some(
                    [
                        ("cpu".to_string(), Quantity(cpu.into())),
                        ("memory".to_string(), Quantity("8Gi".into())),
                        ("pods".to_string(), Quantity("110".into())),
                    ]
                    .into(),
                ),
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    fn requesting(mut p: Pod, cpu: &str) -> Pod {
        p.spec.as_mut().unwrap().containers[0].resources = Some(ResourceRequirements {
            requests: Some([("cpu".to_string(), Quantity(cpu.into()))].into()),
            ..Default::default()
        });
        p
    }

    #[test]
    fn spreads_replicas_across_nodes() {
        let nodes = [node("w1", "a", "4", true), node("w2", "b", "4", true)];
        let bound = pod("p1", Some("rs"), Some("w1"), true);
        let new = pod("p2", Some("rs"), None, false);
        assert_eq!(schedule(&new, &nodes, &[bound]).unwrap(), "w2");
    }

    #[test]
    fn binds_of_one_pass_count_in_its_usage() {
        let nodes = [
            node("w1", "a", "1", true),
            node("w2", "b", "1", true),
            node("w3", "b", "1", true),
        ];
        let mut usage = Usage::new(&nodes, NO_PODS);
        let mut placed = Vec::new();
        for i in 0..4 {
            let p = requesting(pod(&format!("p{i}"), Some("rs"), None, false), "400m");
            let n = schedule_with(&p, &nodes, &usage).unwrap();
            usage.add(&p, &n);
            placed.push(n);
        }
        // one per node first (zone a first: zone b already has a peer after w2), then
        // the least used
        assert_eq!(placed[..3], ["w1", "w2", "w3"]);
        // a fifth and sixth fit (400m + 400m of 1 cpu), a seventh no more on any node
        for i in 4..6 {
            let p = requesting(pod(&format!("p{i}"), Some("rs"), None, false), "400m");
            let n = schedule_with(&p, &nodes, &usage).unwrap();
            usage.add(&p, &n);
        }
        let p = requesting(pod("p6", Some("rs"), None, false), "400m");
        assert_eq!(
            schedule_with(&p, &nodes, &usage).unwrap_err(),
            "0/3 nodes are available: 3 Insufficient cpu."
        );
    }

    #[test]
    fn respects_cpu_and_readiness() {
        let nodes = [node("w1", "a", "1", true), node("w2", "b", "8", false)];
        let big = requesting(pod("p", None, None, false), "2");
        let err = schedule(&big, &nodes, &[]).unwrap_err();
        assert_eq!(
            err,
            "0/2 nodes are available: 1 node(s) were not ready, 1 Insufficient cpu."
        );
        let small = requesting(pod("p", None, None, false), "500m");
        assert_eq!(schedule(&small, &nodes, &[]).unwrap(), "w1");
    }

    #[test]
    fn node_selector_and_taints() {
        let mut w1 = node("w1", "a", "4", true);
        w1.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: "dedicated".into(),
                value: Some("db".into()),
                effect: "NoSchedule".into(),
                time_added: None,
            }]),
            ..Default::default()
        });
        let w2 = node("w2", "b", "4", true);
        let mut p = pod("p", None, None, false);
        p.spec.as_mut().unwrap().node_selector =
            Some([(ZONE_LABEL.to_string(), "a".to_string())].into());
        let err = schedule(&p, &[w1.clone(), w2.clone()], &[]).unwrap_err();
        assert!(
            err.contains("1 node(s) had untolerated taint")
                && err.contains("1 node(s) didn't match"),
            "{err}"
        );
        p.spec.as_mut().unwrap().tolerations = Some(vec![Toleration {
            key: Some("dedicated".into()),
            operator: Some("Equal".into()),
            value: Some("db".into()),
            effect: Some("NoSchedule".into()),
            toleration_seconds: None,
        }]);
        assert_eq!(schedule(&p, &[w1, w2], &[]).unwrap(), "w1");
    }
}
