//! Controllers of the active master, as pure reconcile functions from observed state to
//! the actions that move it toward the desired state (no I/O here; the runner in
//! [`runner`] reads the store, calls these, and writes the results with
//! compare-and-swap so a stale view never overwrites newer data).
//!
//! - [`replicaset`]: keep `spec.replicas` pods per ReplicaSet.
//! - [`deployment`]: Deployment → ReplicaSets, rolling updates (maxSurge/maxUnavailable),
//!   the status fields `kubectl rollout status` reads.
//! - [`nodes`]: node lifecycle: lease not renewed → `Ready=Unknown` + unreachable taint;
//!   pods on such nodes evicted after their toleration.
//!
//! Garbage collection through ownerReferences is `crate::api::gc`, run beside these.

pub(crate) mod deployment;
pub(crate) mod nodes;
pub(crate) mod replicaset;
pub(crate) mod runner;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Actions for one owner object.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Plan {
    /// Pods to create (names already chosen).
    pub create_pods: Vec<Pod>,
    /// Names of pods (in the owner's namespace) to delete.
    pub delete_pods: Vec<String>,
    /// New status of the owner, when it changed.
    pub status: Option<serde_json::Value>,
}

/// Whether `meta` has a controller ownerReference to `uid`.
pub(crate) fn is_owned_by(meta: &ObjectMeta, uid: &str) -> bool {
    controller_uid(meta) == Some(uid)
}

/// The uid of the controlling owner.
pub(crate) fn controller_uid(meta: &ObjectMeta) -> Option<&str> {
    meta.owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

/// Not finished (Succeeded/Failed) and not being deleted.
pub(crate) fn is_active(p: &Pod) -> bool {
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    !matches!(phase, Some("Succeeded") | Some("Failed")) && !is_terminating(p)
}

pub(crate) fn is_terminating(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_some()
}

/// The pod's `Ready` condition is true.
pub(crate) fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        .unwrap_or(false)
}

/// A stable 64-bit FNV-1a hash (the pod-template-hash must agree across masters and
/// versions, which `std`'s hasher does not promise).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Kubernetes-style short random suffix alphabet (no vowels, no confusable digits).
const ALPHANUMS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// `prefix` + 5 random characters, as the API's generateName does.
pub(crate) fn random_name(prefix: &str) -> String {
    let u = uuid::Uuid::new_v4();
    let bytes = u.as_bytes();
    let suffix: String = bytes[..5]
        .iter()
        .map(|b| ALPHANUMS[*b as usize % ALPHANUMS.len()] as char)
        .collect();
    format!("{prefix}{suffix}")
}

/// Run the controllers whenever this master holds a leadership token,
/// and stop them the moment it is revoked.
pub(crate) fn spawn(
    store: std::sync::Arc<dyn crate::store::Store>,
    leadership: crate::raft::Leadership,
    control: ballast_config::ControlConfig,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let reg = std::sync::Arc::new(crate::api::registry::Registry::new(store));
    tokio::spawn(async move {
        leadership
            .run_while_active(shutdown, move |token| {
                let reg = reg.clone();
                let control = control.clone();
                async move {
                    if let Err(e) = crate::api::ensure_defaults(reg.store().as_ref()).await {
                        tracing::warn!("cannot create the default namespaces: {e}");
                    }
                    runner::run(reg, control, token.cancellation()).await;
                }
            })
            .await;
    });
}

#[cfg(test)]
pub(crate) mod tests {
    use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetSpec};
    use k8s_openapi::api::core::v1::{
        Container, PodCondition, PodSpec, PodStatus, PodTemplateSpec,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    use super::*;

    pub(crate) fn pod(name: &str, owner: Option<&str>, node: Option<&str>, ready: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                owner_references: owner.map(|uid| {
                    vec![OwnerReference {
                        api_version: "apps/v1".into(),
                        kind: "ReplicaSet".into(),
                        name: "x".into(),
                        uid: uid.into(),
                        controller: Some(true),
                        block_owner_deletion: None,
                    }]
                }),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: node.map(String::from),
                containers: vec![Container {
                    name: "c".into(),
                    image: Some("busybox".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(if node.is_some() { "Running" } else { "Pending" }.into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    pub(crate) fn rs(name: &str, uid: &str, replicas: i32) -> ReplicaSet {
        ReplicaSet {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                uid: Some(uid.into()),
                generation: Some(1),
                ..Default::default()
            },
            spec: Some(ReplicaSetSpec {
                replicas: Some(replicas),
                template: Some(PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some([("app".to_string(), name.to_string())].into()),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec {
                        containers: vec![Container {
                            name: "c".into(),
                            image: Some("busybox".into()),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }),
            status: None,
        }
    }

    #[test]
    fn random_names_have_prefix_and_suffix() {
        let n = random_name("web-");
        assert!(n.starts_with("web-") && n.len() == 9, "{n}");
        assert_ne!(random_name("a-"), random_name("a-"));
    }
}
