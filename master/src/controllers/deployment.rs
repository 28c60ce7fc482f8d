//! Deployment controller: one ReplicaSet per pod template; rolling updates bounded by
//! `maxSurge` / `maxUnavailable`; `Recreate` scales old to zero first; the status fields
//! `kubectl rollout status` reads (observedGeneration, updated/ready/available replicas,
//! the `Progressing` and `Available` conditions). Revisions as `kubectl rollout
//! history|undo` read them: each ReplicaSet's `deployment.kubernetes.io/revision`, the
//! newest for the current template (an old one the template returns to is renumbered),
//! copied to the Deployment. `spec.paused` holds a changed template back until resumed.

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
    /// An existing ReplicaSet that is the template's again (a rollback): its revision
    /// becomes the newest, as kube-controller-manager renumbers it.
    pub revise_rs: Option<(String, i64)>,
    /// The Deployment's own `deployment.kubernetes.io/revision`, when it must change.
    pub revision: Option<i64>,
}

/// The template hash that names the ReplicaSet of a template.
pub(crate) fn template_hash(t: &PodTemplateSpec) -> String {
    let json = serde_json::to_vec(&without_hash(t)).expect("template serializes");
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

/// `deployment.kubernetes.io/revision` of an object.
fn revision_of_meta(m: &ObjectMeta) -> Option<i64> {
    m.annotations
        .as_ref()?
        .get(REVISION_ANNOTATION)?
        .parse()
        .ok()
}

fn revision_of(rs: &ReplicaSet) -> Option<i64> {
    revision_of_meta(&rs.metadata)
}

fn rs_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

fn rs_name(rs: &ReplicaSet) -> String {
    rs.metadata.name.clone().unwrap_or_default()
}

/// A template without the hash label its ReplicaSet adds (what the hash is taken of).
fn without_hash(t: &PodTemplateSpec) -> PodTemplateSpec {
    let mut t = t.clone();
    if let Some(l) = t.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        l.remove(TEMPLATE_HASH_LABEL);
    }
    t
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
    let r = Rollout::new(d, all_rs, pods);
    let paused = d.spec.as_ref().and_then(|s| s.paused).unwrap_or(false);
    let revision = match r.new_rs {
        // Paused: a changed template waits for `rollout resume`.
        None if paused => None,
        None => {
            // First, create the new ReplicaSet (scaled up on a later pass).
            let uid = d.metadata.uid.clone().unwrap_or_default();
            let name = d.metadata.name.clone().unwrap_or_default();
            let hash = template_hash(&r.template);
            let initial = r.initial_new_replicas();
            let revision = r.max_revision() + 1;
            plan.create_rs = Some(new_replica_set(d, &name, &uid, &hash, initial, revision));
            Some(revision)
        }
        Some(nrs) => {
            let target = r.new_replicas_target(nrs);
            if target != rs_replicas(nrs) {
                plan.scale.insert(rs_name(nrs), target);
            }
            let older = r
                .old
                .iter()
                .filter_map(|o| revision_of(o))
                .max()
                .unwrap_or(0);
            match revision_of(nrs) {
                Some(rev) if rev > older => Some(rev),
                _ => {
                    plan.revise_rs = Some((rs_name(nrs), older + 1));
                    Some(older + 1)
                }
            }
        }
    };
    if !(paused && r.new_rs.is_none()) {
        plan.scale.extend(r.old_scaled_down());
    }
    if revision.is_some() && revision != revision_of_meta(&d.metadata) {
        plan.revision = revision;
    }
    let status = r.status(d, plan.create_rs.as_ref(), &now);
    if d.status.as_ref() != Some(&status) {
        plan.status = Some(serde_json::to_value(&status).expect("status serializes"));
    }
    plan
}

/// One Deployment's ReplicaSets and pods, and the bounds its strategy puts on a rollout.
struct Rollout<'a, P> {
    template: PodTemplateSpec,
    /// Desired replicas.
    replicas: i32,
    recreate: bool,
    max_surge: i32,
    max_unavailable: i32,
    /// Its ReplicaSets not being deleted.
    owned: Vec<&'a ReplicaSet>,
    /// The one of `owned` for the current template.
    new_rs: Option<&'a ReplicaSet>,
    /// The rest of `owned`.
    old: Vec<&'a ReplicaSet>,
    pods: &'a [P],
}

impl<'a, P: Borrow<Pod>> Rollout<'a, P> {
    fn new(d: &Deployment, all_rs: &'a [impl Borrow<ReplicaSet>], pods: &'a [P]) -> Self {
        let uid = d.metadata.uid.clone().unwrap_or_default();
        let spec = d.spec.clone().unwrap_or_default();
        let replicas = spec.replicas.unwrap_or(1).max(0);
        let owned: Vec<&ReplicaSet> = all_rs
            .iter()
            .map(Borrow::borrow)
            .filter(|r| is_owned_by(&r.metadata, &uid) && r.metadata.deletion_timestamp.is_none())
            .collect();
        let template = without_hash(&spec.template);
        let new_rs = owned
            .iter()
            .find(|r| {
                r.spec
                    .as_ref()
                    .and_then(|s| s.template.as_ref())
                    .map(without_hash)
                    .as_ref()
                    == Some(&template)
            })
            .copied();
        let old = owned
            .iter()
            .filter(|r| !new_rs.is_some_and(|n| std::ptr::eq(n, **r)))
            .copied()
            .collect();
        let recreate = spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate");
        let ru = spec.strategy.and_then(|s| s.rolling_update);
        let surge = ru.as_ref().and_then(|r| r.max_surge.as_ref());
        let mut max_surge = resolve(surge, replicas, true, 25);
        let unavailable = ru.as_ref().and_then(|r| r.max_unavailable.as_ref());
        let mut max_unavailable = resolve(unavailable, replicas, false, 25);
        if max_surge == 0 && max_unavailable == 0 {
            max_unavailable = 1;
        }
        if recreate {
            max_surge = 0;
        }
        Rollout {
            template: spec.template,
            replicas,
            recreate,
            max_surge,
            max_unavailable,
            owned,
            new_rs,
            old,
            pods,
        }
    }

    /// The live pods of a ReplicaSet.
    fn pods_of(&self, rs: &ReplicaSet) -> Vec<&Pod> {
        let ruid = rs.metadata.uid.clone().unwrap_or_default();
        self.pods
            .iter()
            .map(Borrow::borrow)
            .filter(|p| is_owned_by(&p.metadata, &ruid) && replicaset::counts(p))
            .collect()
    }

    fn available(&self, rs: &ReplicaSet) -> i32 {
        self.pods_of(rs)
            .iter()
            .filter(|p| super::is_ready(p))
            .count() as i32
    }

    fn max_revision(&self) -> i64 {
        self.owned
            .iter()
            .filter_map(|r| revision_of(r))
            .max()
            .unwrap_or(0)
    }

    /// Whether old ReplicaSets still want or have pods (`Recreate` waits for none).
    fn old_remain(&self) -> bool {
        let old_total: i32 = self.old.iter().map(|r| rs_replicas(r)).sum();
        let old_pods: usize = self.old.iter().map(|r| self.pods_of(r).len()).sum();
        old_total > 0 || old_pods > 0
    }

    /// Replicas of a ReplicaSet created for the template now.
    fn initial_new_replicas(&self) -> i32 {
        if self.recreate {
            return if self.old_remain() { 0 } else { self.replicas };
        }
        let old_total: i32 = self.old.iter().map(|r| rs_replicas(r)).sum();
        (self.replicas + self.max_surge - old_total).clamp(0, self.replicas)
    }

    /// Replicas of the existing new ReplicaSet: up by as much as the surge allows.
    fn new_replicas_target(&self, nrs: &ReplicaSet) -> i32 {
        let cur = rs_replicas(nrs);
        if self.recreate {
            return if self.old_remain() {
                cur
            } else {
                self.replicas
            };
        }
        if cur > self.replicas {
            return self.replicas;
        }
        let old_total: i32 = self.old.iter().map(|r| rs_replicas(r)).sum();
        let allowed = self.replicas + self.max_surge - old_total - cur;
        (cur + allowed.max(0)).min(self.replicas)
    }

    /// New replica counts of old ReplicaSets: `Recreate` takes them all to zero; a rolling
    /// update removes unavailable pods, then available ones, oldest first, as long as
    /// `replicas - maxUnavailable` stay available.
    fn old_scaled_down(&self) -> BTreeMap<String, i32> {
        let mut scale = BTreeMap::new();
        if self.recreate {
            for r in self.old.iter().filter(|r| rs_replicas(r) != 0) {
                scale.insert(rs_name(r), 0);
            }
            return scale;
        }
        let new_available = self.new_rs.map(|r| self.available(r)).unwrap_or(0);
        let old_available: i32 = self.old.iter().map(|r| self.available(r)).sum();
        let min_available = self.replicas - self.max_unavailable;
        let mut budget = (old_available + new_available - min_available).max(0);
        let mut old_sorted = self.old.clone();
        old_sorted.sort_by_key(|r| r.metadata.creation_timestamp.as_ref().map(|t| t.0));
        for r in old_sorted {
            let cur = rs_replicas(r);
            if cur == 0 {
                continue;
            }
            let unavailable_here = (cur - self.available(r)).max(0);
            let extra = (cur - unavailable_here).min(budget);
            budget -= extra;
            let down = unavailable_here + extra;
            if down > 0 {
                scale.insert(rs_name(r), cur - down);
            }
        }
        scale
    }

    /// The status `kubectl rollout status` reads. `created` is the ReplicaSet this pass
    /// creates, if any.
    fn status(&self, d: &Deployment, created: Option<&ReplicaSet>, now: &Time) -> DeploymentStatus {
        let total_pods: i32 = self
            .owned
            .iter()
            .map(|r| self.pods_of(r).len() as i32)
            .sum();
        let ready: i32 = self.owned.iter().map(|r| self.available(r)).sum();
        let updated = self
            .new_rs
            .map(|r| self.pods_of(r).len() as i32)
            .unwrap_or(0);
        let new_ready = self.new_rs.map(|r| self.available(r)).unwrap_or(0);
        let replicas = self.replicas;
        let complete = self.new_rs.is_some()
            && updated == replicas
            && total_pods == replicas
            && new_ready == replicas
            && created.is_none();
        let prev = d.status.clone().unwrap_or_default();
        let cond =
            |type_, status, reason, message| condition(&prev, now, type_, status, reason, message);
        let rs_name = self.new_rs.or(created).map(rs_name).unwrap_or_default();
        let available = ready >= replicas - self.max_unavailable;
        let conditions = vec![
            if available {
                cond(
                    "Available",
                    true,
                    "MinimumReplicasAvailable",
                    "Deployment has minimum availability.".into(),
                )
            } else {
                cond(
                    "Available",
                    false,
                    "MinimumReplicasUnavailable",
                    "Deployment does not have minimum availability.".into(),
                )
            },
            if complete {
                cond(
                    "Progressing",
                    true,
                    "NewReplicaSetAvailable",
                    format!("ReplicaSet \"{rs_name}\" has successfully progressed."),
                )
            } else {
                cond(
                    "Progressing",
                    true,
                    "ReplicaSetUpdated",
                    format!("ReplicaSet \"{rs_name}\" is progressing."),
                )
            },
        ];
        DeploymentStatus {
            observed_generation: d.metadata.generation,
            replicas: Some(total_pods),
            updated_replicas: Some(updated),
            ready_replicas: Some(ready),
            available_replicas: Some(ready),
            unavailable_replicas: Some((replicas - ready).max(0)),
            conditions: Some(conditions),
            collision_count: None,
            terminating_replicas: None,
        }
    }
}

/// A Deployment condition; its times stay those of `prev`'s condition of the same type
/// while the status (transition time) or status and reason (update time) stay.
fn condition(
    prev: &DeploymentStatus,
    now: &Time,
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
) -> DeploymentCondition {
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
    fn a_template_back_to_an_old_replica_set_renumbers_it_newest() {
        let (a, b) = (deploy(2, "a"), deploy(2, "b"));
        let rs_a = with_uid(
            reconcile(&a, NO_RS, NO_PODS, now()).create_rs.unwrap(),
            "r1",
        );
        let plan_b = reconcile(&b, std::slice::from_ref(&rs_a), NO_PODS, now());
        assert_eq!(plan_b.revision, Some(2));
        let rs_b = with_uid(plan_b.create_rs.unwrap(), "r2");
        assert_eq!(revision_of(&rs_b), Some(2));
        // `rollout undo`: the template is a's again.
        let plan = reconcile(&a, &[rs_a.clone(), rs_b], NO_PODS, now());
        assert!(plan.create_rs.is_none());
        assert_eq!(plan.revise_rs, Some((rs_name(&rs_a), 3)));
        assert_eq!(plan.revision, Some(3));
    }

    #[test]
    fn a_paused_deployment_holds_a_new_template_back() {
        let a = deploy(2, "a");
        let rs_a = with_uid(
            reconcile(&a, NO_RS, NO_PODS, now()).create_rs.unwrap(),
            "r1",
        );
        let mut b = deploy(2, "b");
        b.spec.as_mut().unwrap().paused = Some(true);
        let pods = vec![
            pod("p1", Some("r1"), Some("w1"), true),
            pod("p2", Some("r1"), Some("w1"), true),
        ];
        let plan = reconcile(&b, std::slice::from_ref(&rs_a), &pods, now());
        assert!(plan.create_rs.is_none(), "a paused rollout started");
        assert!(plan.scale.is_empty(), "{:?}", plan.scale);
        b.spec.as_mut().unwrap().paused = Some(false);
        assert!(reconcile(&b, &[rs_a], &pods, now()).create_rs.is_some());
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
