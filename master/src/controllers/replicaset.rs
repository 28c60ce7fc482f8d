//! ReplicaSet controller: keep `spec.replicas` live pods matching the template.

use std::borrow::Borrow;

use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use super::{is_active, is_owned_by, is_ready, is_terminating, Plan};

/// At most this many pods are created or deleted for one ReplicaSet in one pass
/// (kube-controller-manager's `burstReplicas`): a huge `replicas` costs passes, not a pass
/// that builds millions of pods in memory.
pub(crate) const BURST_REPLICAS: usize = 500;

/// What the ReplicaSet needs.
pub(crate) fn reconcile(
    rs: &ReplicaSet,
    pods: &[impl Borrow<Pod>],
    mut new_name: impl FnMut(&str) -> String,
) -> Plan {
    let mut plan = Plan::default();
    if rs.metadata.deletion_timestamp.is_some() {
        return plan;
    }
    let uid = rs.metadata.uid.clone().unwrap_or_default();
    let owned: Vec<&Pod> = pods
        .iter()
        .map(Borrow::borrow)
        .filter(|p| is_owned_by(&p.metadata, &uid) && is_active(p))
        .collect();
    let want = rs
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1)
        .max(0) as usize;
    if owned.len() < want {
        for _ in 0..(want - owned.len()).min(BURST_REPLICAS) {
            plan.create_pods.push(pod_from_template(rs, &mut new_name));
        }
    } else if owned.len() > want {
        let mut victims = owned.clone();
        victims.sort_by_key(|p| deletion_rank(p));
        for p in victims
            .into_iter()
            .take((owned.len() - want).min(BURST_REPLICAS))
        {
            if let Some(n) = &p.metadata.name {
                plan.delete_pods.push(n.clone());
            }
        }
    }
    let ready = owned.iter().filter(|p| is_ready(p)).count() as i32;
    let status = ReplicaSetStatus {
        replicas: owned.len() as i32,
        fully_labeled_replicas: Some(owned.len() as i32),
        ready_replicas: Some(ready),
        available_replicas: Some(ready),
        observed_generation: rs.metadata.generation,
        conditions: None,
        terminating_replicas: None,
    };
    if rs.status.as_ref() != Some(&status) {
        plan.status = Some(serde_json::to_value(&status).expect("status serializes"));
    }
    plan
}

/// Lower ranks are deleted first: unscheduled, then pending, then not ready, then newest.
fn deletion_rank(p: &Pod) -> (u8, u8, u8, std::cmp::Reverse<String>) {
    let scheduled = p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
    let phase = p
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending");
    let created = p
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    (
        scheduled as u8,
        (phase == "Running") as u8,
        is_ready(p) as u8,
        std::cmp::Reverse(created),
    )
}

/// A new pod from the ReplicaSet's template, owned by it.
pub(crate) fn pod_from_template(rs: &ReplicaSet, new_name: &mut impl FnMut(&str) -> String) -> Pod {
    let rs_name = rs.metadata.name.clone().unwrap_or_default();
    let template = rs
        .spec
        .as_ref()
        .and_then(|s| s.template.clone())
        .unwrap_or_default();
    let tmeta = template.metadata.unwrap_or_default();
    Pod {
        metadata: ObjectMeta {
            name: Some(new_name(&format!("{rs_name}-"))),
            generate_name: Some(format!("{rs_name}-")),
            namespace: rs.metadata.namespace.clone(),
            labels: tmeta.labels,
            annotations: tmeta.annotations,
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: "ReplicaSet".into(),
                name: rs_name,
                uid: rs.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        },
        spec: template.spec,
        status: None,
    }
}

/// Whether the pod is counted against a ReplicaSet (not finished, not being deleted).
pub(crate) fn counts(p: &Pod) -> bool {
    is_active(p) && !is_terminating(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::tests::{pod, rs};

    #[test]
    fn creates_missing_pods_with_owner() {
        let r = rs("web", "u1", 3);
        let mut n = 0;
        let plan = reconcile(&r, &[pod("web-a", Some("u1"), None, true)], |p| {
            n += 1;
            format!("{p}{n}")
        });
        assert_eq!(plan.create_pods.len(), 2);
        let owner = &plan.create_pods[0]
            .metadata
            .owner_references
            .as_ref()
            .unwrap()[0];
        assert_eq!(owner.uid, "u1");
        assert_eq!(plan.create_pods[0].metadata.name.as_deref(), Some("web-1"));
        assert!(plan.delete_pods.is_empty());
    }

    #[test]
    fn a_huge_replica_count_is_created_a_burst_at_a_time() {
        let r = rs("web", "u1", i32::MAX);
        let mut n = 0;
        let plan = reconcile(&r, &[] as &[Pod], |p| {
            n += 1;
            format!("{p}{n}")
        });
        assert_eq!(plan.create_pods.len(), BURST_REPLICAS);
    }

    #[test]
    fn deletes_unscheduled_and_not_ready_first() {
        let r = rs("web", "u1", 1);
        let pods = vec![
            pod("ready", Some("u1"), Some("w1"), true),
            pod("unscheduled", Some("u1"), None, false),
            pod("notready", Some("u1"), Some("w1"), false),
        ];
        let plan = reconcile(&r, &pods, |p| p.to_string());
        assert_eq!(plan.delete_pods, vec!["unscheduled", "notready"]);
    }

    #[test]
    fn ignores_pods_of_others_and_reports_status() {
        let r = rs("web", "u1", 2);
        let pods = vec![
            pod("a", Some("u1"), Some("w1"), true),
            pod("b", Some("u1"), Some("w1"), true),
            pod("c", Some("other"), Some("w1"), true),
        ];
        let plan = reconcile(&r, &pods, |p| p.to_string());
        assert!(plan.create_pods.is_empty() && plan.delete_pods.is_empty());
        let st = plan.status.unwrap();
        assert_eq!(st["replicas"], 2);
        assert_eq!(st["readyReplicas"], 2);
    }
}
