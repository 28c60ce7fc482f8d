//! Authorization: the superuser group, then the node authorizer, then RBAC over the RBAC
//! objects of the store (kube-apiserver's `--authorization-mode=Node,RBAC`).
//!
//! The RBAC objects are read from this master's applied state, which may lag on a standby
//! (as kube's informer caches lag): the active master serves the API from the latest
//! state; a standby uses it only for its own `/metrics`. They are decoded again only when
//! one of them changed (a fingerprint of their keys and mod revisions).

use std::sync::{Arc, Mutex};

use ballast_config::pki;
use ballast_config::tls::Identity;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::attributes::Attributes;
use super::node::{self, NodeDecision};
use super::rbac::{self, Policy};
use crate::api::registry::Registry;
use crate::api::resources::{self, ResourceDef};
use crate::api::ApiError;
use crate::store::{KeyValue, Store};

/// The outcome of authorizing one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Why not (empty when allowed, or when nothing more specific than "no rule" is known).
    pub reason: String,
}

impl Decision {
    fn allow() -> Self {
        Self {
            allowed: true,
            reason: String::new(),
        }
    }
}

/// Authorizes requests against the store's RBAC objects.
pub struct Authorizer {
    store: Arc<dyn Store>,
    cache: Mutex<Option<(u64, Arc<Policy>)>>,
}

const RBAC_DEFS: [&ResourceDef; 4] = [
    &resources::CLUSTERROLES,
    &resources::ROLES,
    &resources::CLUSTERROLEBINDINGS,
    &resources::ROLEBINDINGS,
];

fn decode_all<T: DeserializeOwned>(kvs: &[KeyValue]) -> Vec<T> {
    kvs.iter()
        .filter_map(|kv| match serde_json::from_slice(&kv.value) {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::warn!(key = %kv.key, error = %e, "skipping an undecodable RBAC object");
                None
            }
        })
        .collect()
}

impl Authorizer {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            cache: Mutex::new(None),
        }
    }

    /// The current RBAC policy (decoded again only when an RBAC object changed).
    pub fn policy(&self) -> Arc<Policy> {
        let lists: Vec<Vec<KeyValue>> = RBAC_DEFS
            .iter()
            .map(|d| self.store.range_local(&Registry::prefix(d, None)).kvs)
            .collect();
        let fingerprint = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            for kv in lists.iter().flatten() {
                kv.key.hash(&mut h);
                kv.mod_revision.hash(&mut h);
            }
            h.finish()
        };
        let mut cache = self.cache.lock().expect("policy cache lock");
        if let Some((f, p)) = cache.as_ref() {
            if *f == fingerprint {
                return p.clone();
            }
        }
        let policy = Arc::new(Policy::new(
            &decode_all::<ClusterRole>(&lists[0]),
            &decode_all::<Role>(&lists[1]),
            &decode_all::<ClusterRoleBinding>(&lists[2]),
            &decode_all::<RoleBinding>(&lists[3]),
        ));
        *cache = Some((fingerprint, policy.clone()));
        policy
    }

    /// Decide whether `user` may do `attrs`.
    pub async fn authorize(
        &self,
        user: &Identity,
        attrs: &Attributes,
    ) -> Result<Decision, ApiError> {
        if user.in_group(pki::SUPERUSER_GROUP) {
            return Ok(Decision::allow());
        }
        let mut reason = String::new();
        if let Some(node) = node::node_name(user) {
            let mut decision = node::decide(node, attrs, None);
            if let NodeDecision::NeedPod { namespace, name } = &decision {
                let key = Registry::key(&resources::PODS, Some(namespace), name);
                let bound = match self.store.get(&key).await? {
                    Some(kv) => serde_json::from_slice::<Value>(&kv.value)
                        .ok()
                        .and_then(|p| p.pointer("/spec/nodeName")?.as_str().map(String::from)),
                    None => None,
                };
                decision = node::decide(node, attrs, Some(bound.as_deref()));
            }
            match decision {
                NodeDecision::Allow => return Ok(Decision::allow()),
                NodeDecision::NoOpinion(why) => reason = why,
                NodeDecision::NeedPod { .. } => reason = "pod lookup failed".into(),
            }
        }
        if self.policy().allows(user, attrs) {
            return Ok(Decision::allow());
        }
        Ok(Decision {
            allowed: false,
            reason,
        })
    }

    /// The escalation check for writing an RBAC object `obj` of `def` in `namespace`:
    /// `Err(message)` when `user` would grant more than it holds there (kube-apiserver's
    /// rule: a Role or ClusterRole only with rules the user holds, a binding only to a role
    /// whose rules the user holds, unless it may `escalate` / `bind` them).
    pub async fn check_escalation(
        &self,
        user: &Identity,
        def: &ResourceDef,
        namespace: &str,
        obj: &Value,
    ) -> Result<(), String> {
        if user.in_group(pki::SUPERUSER_GROUP) {
            return Ok(());
        }
        let policy = self.policy();
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let (special_verb, requested): (&str, Vec<PolicyRule>) = match def.kind {
            "Role" | "ClusterRole" => {
                let rules = obj.get("rules").cloned().unwrap_or(Value::Array(vec![]));
                let rules: Vec<PolicyRule> =
                    serde_json::from_value(rules).map_err(|e| e.to_string())?;
                ("escalate", rules)
            }
            "RoleBinding" | "ClusterRoleBinding" => {
                let kind = obj
                    .pointer("/roleRef/kind")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let role = obj
                    .pointer("/roleRef/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let rules = policy
                    .role_rules(kind, role, namespace)
                    .map(<[PolicyRule]>::to_vec)
                    .unwrap_or_default();
                ("bind", rules)
            }
            _ => return Ok(()),
        };
        let mut special = Attributes::resource(special_verb, def.group, def.plural, namespace);
        if let Attributes::Resource { name: n, .. } = &mut special {
            *n = name.to_string();
        }
        if policy.allows(user, &special) {
            return Ok(());
        }
        let held = policy.rules_for(user, namespace);
        match requested.iter().find(|r| !rbac::covers(&held, r)) {
            None => Ok(()),
            Some(r) => Err(format!(
                "user {:?} (groups {:?}) is attempting to grant RBAC permissions not currently held: {}",
                user.user,
                user.groups,
                serde_json::to_string(r).unwrap_or_default()
            )),
        }
    }
}
