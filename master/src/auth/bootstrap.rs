//! The default RBAC policy every cluster starts with (kube-apiserver's bootstrap roles,
//! trimmed to what Ballast serves), written by the active master when missing. Existing
//! objects are never overwritten: an operator's edits stay.

use serde_json::{json, Value};

use super::authn::{AUTHENTICATED, UNAUTHENTICATED};
use ballast_config::pki::SUPERUSER_GROUP;

/// The group whose members may read `/metrics` of every master and worker.
pub(crate) const MONITORING_GROUP: &str = "system:monitoring";

use crate::api::resources::VERBS as ALL_VERBS;

const READ: &[&str] = &["get", "list", "watch"];

/// Namespaced resources users work with, by API group.
const WORKLOADS: &[(&str, &[&str])] = &[
    (
        "",
        &[
            "pods",
            "pods/log",
            "pods/status",
            "services",
            "services/status",
            "events",
            "configmaps",
            "secrets",
        ],
    ),
    (
        "apps",
        &[
            "deployments",
            "deployments/scale",
            "deployments/status",
            "replicasets",
            "replicasets/scale",
            "replicasets/status",
        ],
    ),
    ("coordination.k8s.io", &["leases"]),
];

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> Value {
    json!({"apiGroups": groups, "resources": resources, "verbs": verbs})
}

fn workload_rules(verbs: &[&str]) -> Vec<Value> {
    WORKLOADS
        .iter()
        .map(|(g, res)| rule(&[g], res, verbs))
        .collect()
}

fn cluster_role(name: &str, rules: Vec<Value>) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
            "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"},
        },
        "rules": rules,
    })
}

fn binding(name: &str, role: &str, groups: &[&str]) -> Value {
    let subjects: Vec<Value> = groups
        .iter()
        .map(|g| json!({"kind": "Group", "apiGroup": "rbac.authorization.k8s.io", "name": g}))
        .collect();
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
            "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"},
        },
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": subjects,
    })
}

/// The bootstrap ClusterRoles.
pub(crate) fn cluster_roles() -> Vec<Value> {
    let rbac = rule(
        &["rbac.authorization.k8s.io"],
        &["roles", "rolebindings"],
        ALL_VERBS,
    );
    let local_review = rule(
        &["authorization.k8s.io"],
        &["localsubjectaccessreviews"],
        &["create"],
    );
    let mut admin = workload_rules(ALL_VERBS);
    admin.push(rbac);
    admin.push(local_review);
    let mut view = workload_rules(READ);
    // kube's view role reads secrets only through pods that mount them
    if let Some(core) = view.first_mut() {
        core["resources"] = json!([
            "pods",
            "pods/log",
            "pods/status",
            "services",
            "services/status",
            "events",
            "configmaps"
        ]);
    }
    view.push(rule(&[""], &["namespaces"], READ));
    let mut edit = workload_rules(ALL_VERBS);
    edit.push(rule(&[""], &["namespaces"], READ));
    admin.push(rule(&[""], &["namespaces"], READ));
    let urls = |urls: &[&str], verbs: &[&str]| json!({"nonResourceURLs": urls, "verbs": verbs});
    vec![
        cluster_role(
            "cluster-admin",
            vec![rule(&["*"], &["*"], &["*"]), urls(&["*"], &["*"])],
        ),
        cluster_role("admin", admin),
        cluster_role("edit", edit),
        cluster_role("view", view),
        cluster_role(
            "system:discovery",
            vec![urls(
                &[
                    "/api",
                    "/api/*",
                    "/apis",
                    "/apis/*",
                    "/openapi",
                    "/openapi/*",
                    "/version",
                    "/version/",
                ],
                &["get"],
            )],
        ),
        cluster_role(
            "system:public-info-viewer",
            vec![urls(
                &[
                    "/livez",
                    "/readyz",
                    "/healthz",
                    "/version",
                    "/version/",
                    "/active",
                ],
                &["get"],
            )],
        ),
        cluster_role(
            "system:basic-user",
            vec![
                rule(
                    &["authorization.k8s.io"],
                    &["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
                    &["create"],
                ),
                rule(
                    &["authentication.k8s.io"],
                    &["selfsubjectreviews"],
                    &["create"],
                ),
            ],
        ),
        cluster_role(
            "system:ballast-proxy",
            vec![
                json!({"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                    "resourceNames": ["ballast-vip"], "verbs": ["get", "update", "patch"]}),
                rule(&["coordination.k8s.io"], &["leases"], &["create"]),
            ],
        ),
        cluster_role(
            "system:monitoring",
            vec![urls(
                &["/metrics", "/livez", "/readyz", "/healthz"],
                &["get"],
            )],
        ),
    ]
}

/// The bootstrap ClusterRoleBindings.
pub(crate) fn cluster_role_bindings() -> Vec<Value> {
    vec![
        binding("cluster-admin", "cluster-admin", &[SUPERUSER_GROUP]),
        binding("system:discovery", "system:discovery", &[AUTHENTICATED]),
        binding("system:basic-user", "system:basic-user", &[AUTHENTICATED]),
        binding(
            "system:public-info-viewer",
            "system:public-info-viewer",
            &[AUTHENTICATED, UNAUTHENTICATED],
        ),
        binding(
            "system:monitoring",
            "system:monitoring",
            &[MONITORING_GROUP],
        ),
        binding(
            "system:ballast-proxy",
            "system:ballast-proxy",
            &[ballast_config::pki::PROXIES_GROUP],
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::attributes::Attributes;
    use crate::auth::rbac::Policy;
    use ballast_config::tls::Identity;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};

    fn policy() -> Policy {
        let roles: Vec<ClusterRole> = cluster_roles()
            .into_iter()
            .map(|v| serde_json::from_value(v).unwrap())
            .collect();
        let bindings: Vec<ClusterRoleBinding> = cluster_role_bindings()
            .into_iter()
            .map(|v| serde_json::from_value(v).unwrap())
            .collect();
        Policy::new(&roles, &[], &bindings, &[])
    }

    fn user(groups: &[&str]) -> Identity {
        Identity {
            user: "u".into(),
            groups: groups.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn the_defaults_grant_what_kube_grants() {
        let p = policy();
        let admin = user(&[SUPERUSER_GROUP, AUTHENTICATED]);
        let someone = user(&[AUTHENTICATED]);
        let scraper = user(&[MONITORING_GROUP, AUTHENTICATED]);
        let del = Attributes::resource("delete", "apps", "deployments", "x");
        assert!(p.allows(&admin, &del));
        assert!(!p.allows(&someone, &del));
        assert!(p.allows(&someone, &Attributes::non_resource("get", "/apis/apps/v1")));
        let ssar = Attributes::resource(
            "create",
            "authorization.k8s.io",
            "selfsubjectaccessreviews",
            "",
        );
        assert!(p.allows(&someone, &ssar));
        let metrics = Attributes::non_resource("get", "/metrics");
        assert!(!p.allows(&someone, &metrics));
        assert!(p.allows(&scraper, &metrics));
        assert!(p.allows(&admin, &metrics));
    }
}
