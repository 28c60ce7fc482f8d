//! RBAC (`rbac.authorization.k8s.io/v1`), pure: which rules bind a user, whether they
//! allow a request, and whether one set of rules covers another (the escalation check).
//!
//! Semantics follow kube-apiserver's RBAC authorizer:
//! - a ClusterRoleBinding grants its ClusterRole everywhere; a RoleBinding grants its Role
//!   (or a ClusterRole) in its own namespace only;
//! - a rule matches when its verbs, API groups and resources (`*`, exact, `res/*`,
//!   `*/sub`) match, and its `resourceNames` are empty or name the object (so a rule with
//!   names never allows list, watch, create or deletecollection);
//! - non-resource URLs match exactly or by a trailing `*` prefix.

use std::collections::HashMap;

use ballast_config::tls::Identity;
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject,
};

use super::attributes::Attributes;

/// Every RBAC object, indexed for evaluation.
#[derive(Debug, Default)]
pub struct Policy {
    cluster_roles: HashMap<String, Vec<PolicyRule>>,
    roles: HashMap<(String, String), Vec<PolicyRule>>,
    cluster_bindings: Vec<ClusterRoleBinding>,
    /// RoleBindings by namespace.
    bindings: HashMap<String, Vec<RoleBinding>>,
}

fn ns_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

impl Policy {
    pub fn new(
        cluster_roles: &[ClusterRole],
        roles: &[Role],
        cluster_bindings: &[ClusterRoleBinding],
        bindings: &[RoleBinding],
    ) -> Self {
        let mut p = Policy::default();
        for r in cluster_roles {
            let (_, name) = ns_name(&r.metadata);
            p.cluster_roles
                .insert(name, r.rules.clone().unwrap_or_default());
        }
        for r in roles {
            p.roles
                .insert(ns_name(&r.metadata), r.rules.clone().unwrap_or_default());
        }
        p.cluster_bindings = cluster_bindings.to_vec();
        for b in bindings {
            let (ns, _) = ns_name(&b.metadata);
            p.bindings.entry(ns).or_default().push(b.clone());
        }
        p
    }

    /// Every rule granted to `user` in `namespace` (cluster-wide rules included; with an
    /// empty namespace, cluster-wide rules only).
    pub fn rules_for<'a>(&'a self, user: &Identity, namespace: &str) -> Vec<&'a PolicyRule> {
        let mut out = Vec::new();
        for b in &self.cluster_bindings {
            if subjects_match(b.subjects.as_deref(), user, "") {
                if let Some(rules) = self.cluster_roles.get(&b.role_ref.name) {
                    out.extend(rules.iter());
                }
            }
        }
        if namespace.is_empty() {
            return out;
        }
        for b in self.bindings.get(namespace).into_iter().flatten() {
            if !subjects_match(b.subjects.as_deref(), user, namespace) {
                continue;
            }
            let rules = match b.role_ref.kind.as_str() {
                "ClusterRole" => self.cluster_roles.get(&b.role_ref.name),
                "Role" => self
                    .roles
                    .get(&(namespace.to_string(), b.role_ref.name.clone())),
                _ => None,
            };
            out.extend(rules.into_iter().flatten());
        }
        out
    }

    /// Whether RBAC allows `attrs` to `user`.
    pub fn allows(&self, user: &Identity, attrs: &Attributes) -> bool {
        let ns = match attrs {
            Attributes::Resource { namespace, .. } => namespace.as_str(),
            Attributes::NonResource { .. } => "",
        };
        self.rules_for(user, ns)
            .into_iter()
            .any(|r| rule_allows(r, attrs))
    }

    /// The rules of the role a binding refers to (`kind` `Role` in `namespace`, or
    /// `ClusterRole`); `None` when it does not exist (yet).
    pub fn role_rules(&self, kind: &str, name: &str, namespace: &str) -> Option<&[PolicyRule]> {
        match kind {
            "ClusterRole" => self.cluster_roles.get(name).map(Vec::as_slice),
            "Role" => self
                .roles
                .get(&(namespace.to_string(), name.to_string()))
                .map(Vec::as_slice),
            _ => None,
        }
    }
}

fn subjects_match(subjects: Option<&[Subject]>, user: &Identity, binding_ns: &str) -> bool {
    subjects
        .unwrap_or_default()
        .iter()
        .any(|s| match s.kind.as_str() {
            "User" => s.name == user.user,
            "Group" => user.in_group(&s.name),
            "ServiceAccount" => {
                let ns = s.namespace.as_deref().unwrap_or(binding_ns);
                user.user == format!("system:serviceaccount:{ns}:{}", s.name)
            }
            _ => false,
        })
}

fn has(list: &[String], v: &str) -> bool {
    list.iter().any(|x| x == "*" || x == v)
}

/// `resources` of a rule against `resource` + `subresource`.
fn resource_matches(resources: &[String], resource: &str, sub: &str) -> bool {
    resources.iter().any(|r| {
        if r == "*" {
            return true;
        }
        if sub.is_empty() {
            return r == resource;
        }
        match r.split_once('/') {
            Some((res, s)) => (res == resource || res == "*") && (s == sub || s == "*"),
            None => false,
        }
    })
}

fn url_matches(urls: &[String], path: &str) -> bool {
    urls.iter().any(|u| {
        u == path
            || u == "*"
            || u.strip_suffix('*')
                .is_some_and(|prefix| path.starts_with(prefix))
    })
}

/// Whether one rule allows `attrs`.
pub(crate) fn rule_allows(rule: &PolicyRule, attrs: &Attributes) -> bool {
    if !has(&rule.verbs, attrs.verb()) {
        return false;
    }
    match attrs {
        Attributes::Resource {
            api_group,
            resource,
            subresource,
            name,
            ..
        } => {
            let groups = rule.api_groups.as_deref().unwrap_or_default();
            let resources = rule.resources.as_deref().unwrap_or_default();
            let names = rule.resource_names.as_deref().unwrap_or_default();
            has(groups, api_group)
                && resource_matches(resources, resource, subresource)
                && (names.is_empty() || (!name.is_empty() && names.iter().any(|n| n == name)))
        }
        Attributes::NonResource { path, .. } => {
            url_matches(rule.non_resource_urls.as_deref().unwrap_or_default(), path)
        }
    }
}

/// Whether `owner` grants everything `requested` grants: each of its atomic rules (one
/// verb, one group, one resource, one name or URL) is covered by some owner rule, where
/// a requested `*` is covered only by an owner `*`. A user may create or bind a role only
/// when they hold what it grants (kube-apiserver's escalation check).
pub(crate) fn covers(owner: &[&PolicyRule], requested: &PolicyRule) -> bool {
    let names = requested.resource_names.clone().unwrap_or_default();
    for verb in &requested.verbs {
        if let Some(urls) = requested.non_resource_urls.as_deref() {
            for url in urls {
                let ok = owner.iter().any(|o| {
                    has(&o.verbs, verb)
                        && o.non_resource_urls
                            .as_deref()
                            .is_some_and(|u| url_matches(u, url))
                });
                if !ok {
                    return false;
                }
            }
        }
        for group in requested.api_groups.as_deref().unwrap_or_default() {
            for res in requested.resources.as_deref().unwrap_or_default() {
                let name_list: Vec<Option<&str>> = if names.is_empty() {
                    vec![None]
                } else {
                    names.iter().map(|n| Some(n.as_str())).collect()
                };
                for name in name_list {
                    let ok = owner.iter().any(|o| {
                        let og = o.api_groups.as_deref().unwrap_or_default();
                        let or = o.resources.as_deref().unwrap_or_default();
                        let on = o.resource_names.as_deref().unwrap_or_default();
                        has(&o.verbs, verb)
                            && has(og, group)
                            && (or.iter().any(|r| r == "*") || or.contains(res) || {
                                let (r, s) = res.split_once('/').unwrap_or((res, ""));
                                !s.is_empty() && resource_matches(or, r, s)
                            })
                            && (on.is_empty() || name.is_some_and(|n| on.iter().any(|x| x == n)))
                    });
                    if !ok {
                        return false;
                    }
                }
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::rbac::v1::RoleRef;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn rule(verbs: &[&str], groups: &[&str], resources: &[&str]) -> PolicyRule {
        let v = |x: &[&str]| Some(x.iter().map(|s| s.to_string()).collect());
        PolicyRule {
            verbs: verbs.iter().map(|s| s.to_string()).collect(),
            api_groups: v(groups),
            resources: v(resources),
            ..Default::default()
        }
    }

    fn meta(ns: &str, name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: (!ns.is_empty()).then(|| ns.into()),
            ..Default::default()
        }
    }

    fn user(name: &str, groups: &[&str]) -> Identity {
        Identity {
            user: name.into(),
            groups: groups.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn view_in(ns: &str, subject: Subject) -> Policy {
        let view = ClusterRole {
            metadata: meta("", "view"),
            rules: Some(vec![rule(
                &["get", "list", "watch"],
                &[""],
                &["pods", "pods/log"],
            )]),
            ..Default::default()
        };
        let binding = RoleBinding {
            metadata: meta(ns, "alice-view"),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "ClusterRole".into(),
                name: "view".into(),
            },
            subjects: Some(vec![subject]),
        };
        Policy::new(&[view], &[], &[], &[binding])
    }

    fn user_subject(name: &str) -> Subject {
        Subject {
            kind: "User".into(),
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_role_binding_grants_in_its_namespace_only() {
        let p = view_in("a", user_subject("alice"));
        let alice = user("alice", &[]);
        assert!(p.allows(&alice, &Attributes::resource("list", "", "pods", "a")));
        assert!(!p.allows(&alice, &Attributes::resource("list", "", "pods", "b")));
        assert!(!p.allows(&alice, &Attributes::resource("list", "", "pods", "")));
        assert!(!p.allows(&alice, &Attributes::resource("create", "", "pods", "a")));
        assert!(!p.allows(
            &user("bob", &[]),
            &Attributes::resource("list", "", "pods", "a")
        ));
        let mut log = Attributes::resource("get", "", "pods", "a");
        if let Attributes::Resource { subresource, .. } = &mut log {
            *subresource = "log".into();
        }
        assert!(p.allows(&alice, &log));
    }

    #[test]
    fn groups_and_cluster_bindings() {
        let admin = ClusterRole {
            metadata: meta("", "cluster-admin"),
            rules: Some(vec![
                rule(&["*"], &["*"], &["*"]),
                PolicyRule {
                    verbs: vec!["*".into()],
                    non_resource_urls: Some(vec!["*".into()]),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        let b = ClusterRoleBinding {
            metadata: meta("", "cluster-admin"),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "ClusterRole".into(),
                name: "cluster-admin".into(),
            },
            subjects: Some(vec![Subject {
                kind: "Group".into(),
                name: "ops".into(),
                ..Default::default()
            }]),
        };
        let p = Policy::new(&[admin], &[], &[b], &[]);
        let ops = user("carol", &["ops"]);
        assert!(p.allows(
            &ops,
            &Attributes::resource("delete", "apps", "deployments", "x")
        ));
        assert!(p.allows(&ops, &Attributes::non_resource("get", "/metrics")));
        assert!(!p.allows(
            &user("dave", &[]),
            &Attributes::non_resource("get", "/metrics")
        ));
    }

    #[test]
    fn resource_names_never_allow_collections() {
        let mut r = rule(&["get", "list"], &[""], &["pods"]);
        r.resource_names = Some(vec!["web".into()]);
        let named = Attributes::Resource {
            verb: "get".into(),
            api_group: "".into(),
            resource: "pods".into(),
            subresource: "".into(),
            namespace: "a".into(),
            name: "web".into(),
            field_selector: "".into(),
        };
        assert!(rule_allows(&r, &named));
        assert!(!rule_allows(
            &r,
            &Attributes::resource("list", "", "pods", "a")
        ));
    }

    #[test]
    fn non_resource_prefixes() {
        let r = PolicyRule {
            verbs: vec!["get".into()],
            non_resource_urls: Some(vec!["/apis/*".into(), "/version".into()]),
            ..Default::default()
        };
        assert!(rule_allows(
            &r,
            &Attributes::non_resource("get", "/apis/apps/v1")
        ));
        assert!(rule_allows(
            &r,
            &Attributes::non_resource("get", "/version")
        ));
        assert!(!rule_allows(
            &r,
            &Attributes::non_resource("get", "/metrics")
        ));
    }

    #[test]
    fn covering_refuses_escalation() {
        let view = rule(&["get", "list"], &[""], &["pods"]);
        let star = rule(&["*"], &["*"], &["*"]);
        assert!(covers(&[&view], &rule(&["get"], &[""], &["pods"])));
        assert!(!covers(&[&view], &rule(&["create"], &[""], &["pods"])));
        assert!(!covers(&[&view], &rule(&["get"], &["*"], &["pods"])));
        assert!(!covers(&[&view], &star));
        assert!(covers(&[&star], &star));
        assert!(covers(&[&star], &rule(&["get"], &[""], &["pods/log"])));
        let sub = rule(&["get"], &[""], &["pods/*"]);
        assert!(covers(&[&sub], &rule(&["get"], &[""], &["pods/log"])));
    }
}
