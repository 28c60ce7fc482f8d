//! Deployment controller: one ReplicaSet per pod template; rolling updates bounded by
//! `maxSurge` / `maxUnavailable`; `Recreate` scales old to zero first; the status fields
//! `kubectl rollout status` reads (observedGeneration, updated/ready/available replicas,
//! the `Progressing` and `Available` conditions).

use std::borrow::Borrow;
use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentCondition, DeploymentStatus, ReplicaSet, ReplicaSetSpec,
};
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, ObjectMeta, OwnerReference, Time,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{fnv1a, is_owned_by, replicaset};

pub(crate) const TEMPLATE_HASH_LABEL: &str = "pod-template-hash";
pub(crate) const REVISION_ANNOTATION: &str = "deployment.kubernetes.io/revision";

/// What the Deployment needs.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct DeploymentPlan {
    /// A new ReplicaSet for the current template.
    pub create_rs: Option<ReplicaSet>,
    /// Existing ReplicaSets (by name) whose `spec.replicas` must change.
    pub scale: BTreeMap<String, i32>,
    /// New status, when it changed.
    pub status: Option<serde_json::Value>,
}

/// The template hash that names the ReplicaSet of a template.
pub(crate) fn template_hash(t: &PodTemplateSpec) -> String {
    let mut t = t.clone();
    if let Some(l) = t.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        l.remove(TEMPLATE_HASH_LABEL);
    }
    let json = serde_json::to_vec(&t).expect("template serializes");
    let h = fnv1a(&json);
    // Kubernetes renders the hash with its safe alphabet; any stable short form works.
    let alphabet = b"bcdfghjklmnpqrstvwxz2456789";
    let mut n = h;
    let mut s = String::new();
    for _ in 0..10 {
        s.push(alphabet[(n % alphabet.len() as u64) as usize] as char);
        n /= alphabet.len() as u64;
    }
    s
}

fn resolve(v: Option<&IntOrString>, total: i32, round_up: bool, default_pct: i32) -> i32 {
    match v {
        Some(IntOrString::Int(i)) => (*i).max(0),
        Some(IntOrString::String(s)) => {
            let pct: i32 = s.trim_end_matches('%').parse().unwrap_or(default_pct);
            pct_of(pct, total, round_up)
        }
        None => pct_of(default_pct, total, round_up),
    }
}

fn pct_of(pct: i32, total: i32, round_up: bool) -> i32 {
    let x = pct as i64 * total as i64;
    (if round_up { (x + 99) / 100 } else { x / 100 }) as i32
}

fn rs_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

fn template_without_hash(rs: &ReplicaSet) -> Option<PodTemplateSpec> {
    let mut t = rs.spec.as_ref()?.template.clone()?;
    if let Some(l) = t.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        l.remove(TEMPLATE_HASH_LABEL);
    }
    Some(t)
}

/// Reconcile one Deployment given every ReplicaSet and pod of its namespace.
pub(crate) fn reconcile(
    d: &Deployment,
    all_rs: &[impl Borrow<ReplicaSet>],
    pods: &[impl Borrow<Pod>],
    now: Time,
) -> DeploymentPlan {
    let mut plan = DeploymentPlan::default();
    if d.metadata.deletion_timestamp.is_some() {
        return plan;
    }
    let uid = d.metadata.uid.clone().unwrap_or_default();
    let name = d.metadata.name.clone().unwrap_or_default();
    let spec = d.spec.clone().unwrap_or_default();
    let replicas = spec.replicas.unwrap_or(1).max(0);
    let owned: Vec<&ReplicaSet> = all_rs
        .iter()
        .map(Borrow::borrow)
        .filter(|r| is_owned_by(&r.metadata, &uid) && r.metadata.deletion_timestamp.is_none())
        .collect();
    let hash = template_hash(&spec.template);
    let new_rs = owned
        .iter()
        .find(|r| template_without_hash(r).as_ref() == Some(&strip(&spec.template)))
        .copied();
    let old: Vec<&ReplicaSet> = owned
        .iter()
        .filter(|r| Some(r.metadata.name.as_ref()) != new_rs.map(|n| n.metadata.name.as_ref()))
        .copied()
        .collect();
    let max_revision = owned
        .iter()
        .filter_map(|r| {
            r.metadata
                .annotations
                .as_ref()?
                .get(REVISION_ANNOTATION)?
                .parse::<i64>()
                .ok()
        })
        .max()
        .unwrap_or(0);

    let recreate = spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate");
    let ru = spec
        .strategy
        .as_ref()
        .and_then(|s| s.rolling_update.clone());
    let mut max_surge = resolve(
        ru.as_ref().and_then(|r| r.max_surge.as_ref()),
        replicas,
        true,
        25,
    );
    let mut max_unavailable = resolve(
        ru.as_ref().and_then(|r| r.max_unavailable.as_ref()),
        replicas,
        false,
        25,
    );
    if max_surge == 0 && max_unavailable == 0 {
        max_unavailable = 1;
    }
    if recreate {
        max_surge = 0;
    }

    // Pods per ReplicaSet (by uid).
    let pods_of = |rs: &ReplicaSet| -> Vec<&Pod> {
        let ruid = rs.metadata.uid.clone().unwrap_or_default();
        pods.iter()
            .map(Borrow::borrow)
            .filter(|p| is_owned_by(&p.metadata, &ruid) && replicaset::counts(p))
            .collect()
    };
    let available =
        |rs: &ReplicaSet| pods_of(rs).iter().filter(|p| super::is_ready(p)).count() as i32;

    let old_total: i32 = old.iter().map(|r| rs_replicas(r)).sum();
    let old_pods: i32 = old.iter().map(|r| pods_of(r).len() as i32).sum();

    match new_rs {
        None => {
            // First, create the new ReplicaSet (scaled up on a later pass).
            let initial = if recreate {
                if old_total > 0 || old_pods > 0 {
                    0
                } else {
                    replicas
                }
            } else {
                let total = old_total;
                (replicas + max_surge - total).clamp(0, replicas)
            };
            plan.create_rs = Some(new_replica_set(
                d,
                &name,
                &uid,
                &hash,
                initial,
                max_revision + 1,
            ));
        }
        Some(nrs) => {
            let cur = rs_replicas(nrs);
            let target = if recreate {
                if old_total > 0 || old_pods > 0 {
                    cur
                } else {
                    replicas
                }
            } else if cur > replicas {
                replicas
            } else {
                let total = old_total + cur;
                let allowed = replicas + max_surge - total;
                (cur + allowed.max(0)).min(replicas)
            };
            if target != cur {
                plan.scale
                    .insert(nrs.metadata.name.clone().unwrap_or_default(), target);
            }
        }
    }

    // Scale old ReplicaSets down.
    if recreate {
        for r in &old {
            if rs_replicas(r) != 0 {
                plan.scale
                    .insert(r.metadata.name.clone().unwrap_or_default(), 0);
            }
        }
    } else {
        let new_available = new_rs.map(available).unwrap_or(0);
        let old_available: i32 = old.iter().map(|r| available(r)).sum();
        let min_available = replicas - max_unavailable;
        // Old pods that are not available can always go.
        let mut budget = (old_available + new_available - min_available).max(0);
        let mut old_sorted = old.clone();
        old_sorted.sort_by_key(|r| r.metadata.creation_timestamp.as_ref().map(|t| t.0));
        for r in old_sorted {
            let cur = rs_replicas(r);
            if cur == 0 {
                continue;
            }
            let unavailable_here = (cur - available(r)).max(0);
            let mut down = unavailable_here;
            let extra = (cur - down).min(budget);
            down += extra;
            budget -= extra;
            if down > 0 {
                plan.scale
                    .insert(r.metadata.name.clone().unwrap_or_default(), cur - down);
            }
        }
    }

    // Status.
    let sum = |f: &dyn Fn(&ReplicaSet) -> i32| owned.iter().map(|r| f(r)).sum::<i32>();
    let total_pods = sum(&|r| pods_of(r).len() as i32);
    let ready = sum(&|r| available(r));
    let updated = new_rs.map(|r| pods_of(r).len() as i32).unwrap_or(0);
    let new_ready = new_rs.map(available).unwrap_or(0);
    let complete = new_rs.is_some()
        && updated == replicas
        && total_pods == replicas
        && new_ready == replicas
        && plan.create_rs.is_none();
    let prev = d.status.clone().unwrap_or_default();
    let cond = |type_: &str, status: bool, reason: &str, message: String| {
        let old = prev
            .conditions
            .as_ref()
            .and_then(|cs| cs.iter().find(|c| c.type_ == type_));
        let status = if status { "True" } else { "False" };
        let same = old.is_some_and(|o| o.status == status && o.reason.as_deref() == Some(reason));
        DeploymentCondition {
            type_: type_.into(),
            status: status.into(),
            reason: Some(reason.into()),
            message: Some(message),
            last_update_time: if same {
                old.and_then(|o| o.last_update_time.clone())
            } else {
                Some(now.clone())
            },
            last_transition_time: if old.is_some_and(|o| o.status == status) {
                old.and_then(|o| o.last_transition_time.clone())
            } else {
                Some(now.clone())
            },
        }
    };
    let rs_name = new_rs
        .and_then(|r| r.metadata.name.clone())
        .or_else(|| {
            plan.create_rs
                .as_ref()
                .and_then(|r| r.metadata.name.clone())
        })
        .unwrap_or_default();
    let conditions = vec![
        cond(
            "Available",
            ready >= replicas - max_unavailable,
            if ready >= replicas - max_unavailable {
                "MinimumReplicasAvailable"
            } else {
                "MinimumReplicasUnavailable"
            },
            if ready >= replicas - max_unavailable {
                "Deployment has minimum availability.".into()
            } else {
                "Deployment does not have minimum availability.".into()
            },
        ),
        cond(
            "Progressing",
            true,
            if complete {
                "NewReplicaSetAvailable"
            } else {
                "ReplicaSetUpdated"
            },
            if complete {
                format!("ReplicaSet \"{rs_name}\" has successfully progressed.")
            } else {
                format!("ReplicaSet \"{rs_name}\" is progressing.")
            },
        ),
    ];
    let status = DeploymentStatus {
        observed_generation: d.metadata.generation,
        replicas: Some(total_pods),
        updated_replicas: Some(updated),
        ready_replicas: Some(ready),
        available_replicas: Some(ready),
        unavailable_replicas: Some((replicas - ready).max(0)),
        conditions: Some(conditions),
        collision_count: None,
        terminating_replicas: None,
    };
    if d.status.as_ref() != Some(&status) {
        plan.status = Some(serde_json::to_value(&status).expect("status serializes"));
    }
    plan
}

fn strip(t: &PodTemplateSpec) -> PodTemplateSpec {
    let mut t = t.clone();
    if let Some(l) = t.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        l.remove(TEMPLATE_HASH_LABEL);
    }
    t
}

fn new_replica_set(
    d: &Deployment,
    name: &str,
    uid: &str,
    hash: &str,
    replicas: i32,
    revision: i64,
) -> ReplicaSet {
    let spec = d.spec.clone().unwrap_or_default();
    let mut template = spec.template.clone();
    let tmeta = template.metadata.get_or_insert_with(ObjectMeta::default);
    tmeta
        .labels
        .get_or_insert_with(Default::default)
        .insert(TEMPLATE_HASH_LABEL.into(), hash.into());
    let mut selector: LabelSelector = spec.selector.clone();
    selector
        .match_labels
        .get_or_insert_with(Default::default)
        .insert(TEMPLATE_HASH_LABEL.into(), hash.into());
    let mut labels = tmeta.labels.clone().unwrap_or_default();
    labels.insert(TEMPLATE_HASH_LABEL.into(), hash.into());
    ReplicaSet {
        metadata: ObjectMeta {
            name: Some(format!("{name}-{hash}")),
            namespace: d.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: Some([(REVISION_ANNOTATION.to_string(), revision.to_string())].into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: "Deployment".into(),
                name: name.into(),
                uid: uid.into(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        },
        spec: Some(ReplicaSetSpec {
            replicas: Some(replicas),
            min_ready_seconds: spec.min_ready_seconds,
            selector,
            template: Some(template),
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
    use k8s_openapi::api::core::v1::{Container, PodSpec};

    use super::*;
    use crate::controllers::tests::pod;

    const NO_RS: &[ReplicaSet] = &[];
    const NO_PODS: &[Pod] = &[];

    fn deploy(replicas: i32, image: &str) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                uid: Some("d1".into()),
                generation: Some(1),
                ..Default::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(replicas),
                selector: LabelSelector {
                    match_labels: Some([("app".to_string(), "web".to_string())].into()),
                    ..Default::default()
                },
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some([("app".to_string(), "web".to_string())].into()),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec {
                        containers: vec![Container {
                            name: "c".into(),
                            image: Some(image.into()),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                },
                strategy: Some(DeploymentStrategy {
                    type_: Some("RollingUpdate".into()),
                    rolling_update: Some(RollingUpdateDeployment {
                        max_surge: Some(IntOrString::Int(1)),
                        max_unavailable: Some(IntOrString::Int(0)),
                    }),
                }),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn now() -> Time {
        Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
    }

    fn with_uid(mut rs: ReplicaSet, uid: &str) -> ReplicaSet {
        rs.metadata.uid = Some(uid.into());
        rs
    }

    #[test]
    fn creates_replica_set_with_hash_and_owner() {
        let d = deploy(3, "a");
        let plan = reconcile(&d, NO_RS, NO_PODS, now());
        let rs = plan.create_rs.expect("new rs");
        assert_eq!(rs.spec.as_ref().unwrap().replicas, Some(3));
        let hash = template_hash(&d.spec.as_ref().unwrap().template);
        assert_eq!(
            rs.metadata.name.as_deref(),
            Some(format!("web-{hash}").as_str())
        );
        assert_eq!(rs.metadata.owner_references.as_ref().unwrap()[0].uid, "d1");
        assert_eq!(
            rs.spec
                .as_ref()
                .unwrap()
                .selector
                .match_labels
                .as_ref()
                .unwrap()[TEMPLATE_HASH_LABEL],
            hash
        );
    }

    #[test]
    fn steady_state_reports_complete_rollout() {
        let d = deploy(2, "a");
        let rs = with_uid(
            reconcile(&d, NO_RS, NO_PODS, now()).create_rs.unwrap(),
            "r1",
        );
        let pods = vec![
            pod("p1", Some("r1"), Some("w1"), true),
            pod("p2", Some("r1"), Some("w2"), true),
        ];
        let plan = reconcile(&d, &[rs], &pods, now());
        assert!(plan.create_rs.is_none() && plan.scale.is_empty());
        let st = plan.status.unwrap();
        assert_eq!(st["updatedReplicas"], 2);
        assert_eq!(st["availableReplicas"], 2);
        assert_eq!(st["observedGeneration"], 1);
        let prog = st["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Progressing")
            .unwrap()
            .clone();
        assert_eq!(prog["reason"], "NewReplicaSetAvailable");
    }

    #[test]
    fn rolling_update_surges_then_scales_old_down() {
        let d1 = deploy(2, "a");
        let old = with_uid(
            reconcile(&d1, NO_RS, NO_PODS, now()).create_rs.unwrap(),
            "r1",
        );
        let pods = vec![
            pod("p1", Some("r1"), Some("w1"), true),
            pod("p2", Some("r1"), Some("w2"), true),
        ];
        let d2 = deploy(2, "b");
        // maxSurge 1: the new RS starts with 1 replica; maxUnavailable 0: old stays at 2.
        let plan = reconcile(&d2, std::slice::from_ref(&old), &pods, now());
        let new = plan.create_rs.clone().unwrap();
        assert_eq!(new.spec.as_ref().unwrap().replicas, Some(1));
        assert!(plan.scale.is_empty());
        // Once the new pod is ready, one old pod may go.
        let new = with_uid(new, "r2");
        let mut pods2 = pods.clone();
        pods2.push(pod("n1", Some("r2"), Some("w1"), true));
        let plan = reconcile(&d2, &[old.clone(), new.clone()], &pods2, now());
        assert_eq!(
            plan.scale.get(old.metadata.name.as_deref().unwrap()),
            Some(&1)
        );
        let st = plan.status.unwrap();
        assert_eq!(st["updatedReplicas"], 1);
    }

    #[test]
    fn recreate_scales_old_to_zero_before_new() {
        let mut d = deploy(2, "a");
        let old = with_uid(
            reconcile(&d, NO_RS, NO_PODS, now()).create_rs.unwrap(),
            "r1",
        );
        let pods = vec![pod("p1", Some("r1"), Some("w1"), true)];
        let spec = d.spec.as_mut().unwrap();
        spec.template.spec.as_mut().unwrap().containers[0].image = Some("b".into());
        spec.strategy = Some(DeploymentStrategy {
            type_: Some("Recreate".into()),
            rolling_update: None,
        });
        let plan = reconcile(&d, std::slice::from_ref(&old), &pods, now());
        assert_eq!(plan.create_rs.unwrap().spec.unwrap().replicas, Some(0));
        assert_eq!(
            plan.scale.get(old.metadata.name.as_deref().unwrap()),
            Some(&0)
        );
    }

    #[test]
    fn percentages_round_like_kubernetes() {
        assert_eq!(
            resolve(Some(&IntOrString::String("25%".into())), 3, true, 25),
            1
        );
        assert_eq!(
            resolve(Some(&IntOrString::String("25%".into())), 3, false, 25),
            0
        );
        assert_eq!(resolve(None, 10, true, 25), 3);
    }
}
