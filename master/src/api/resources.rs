//! The served resource types and the discovery documents built from them.

use serde_json::{json, Value};

/// A served resource (one REST collection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceDef {
    /// API group; empty for the core (`v1`) group.
    pub group: &'static str,
    pub version: &'static str,
    /// Plural, as in URLs and store keys.
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// Served subresources (`status`, `scale`, `binding`, `log`).
    pub subresources: &'static [&'static str],
    pub categories: &'static [&'static str],
    /// A review (SelfSubjectAccessReview...): create-only, answered, never stored.
    pub review: bool,
}

/// The verbs of every stored resource (discovery lists them; the bootstrap roles grant
/// them).
pub(crate) const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

macro_rules! def {
    ($g:expr, $p:expr, $s:expr, $k:expr, $ns:expr, $short:expr, $sub:expr, $cat:expr) => {
        ResourceDef {
            group: $g,
            version: "v1",
            plural: $p,
            singular: $s,
            kind: $k,
            namespaced: $ns,
            short_names: $short,
            subresources: $sub,
            categories: $cat,
            review: false,
        }
    };
}

macro_rules! review {
    ($g:expr, $p:expr, $s:expr, $k:expr) => {
        ResourceDef {
            group: $g,
            version: "v1",
            plural: $p,
            singular: $s,
            kind: $k,
            namespaced: false,
            short_names: &[],
            subresources: &[],
            categories: &[],
            review: true,
        }
    };
}

const RBAC: &str = "rbac.authorization.k8s.io";

pub(crate) const ROLES: ResourceDef = def!(RBAC, "roles", "role", "Role", true, &[], &[], &[]);
pub(crate) const CLUSTERROLES: ResourceDef = def!(
    RBAC,
    "clusterroles",
    "clusterrole",
    "ClusterRole",
    false,
    &[],
    &[],
    &[]
);
pub(crate) const ROLEBINDINGS: ResourceDef = def!(
    RBAC,
    "rolebindings",
    "rolebinding",
    "RoleBinding",
    true,
    &[],
    &[],
    &[]
);
pub(crate) const CLUSTERROLEBINDINGS: ResourceDef = def!(
    RBAC,
    "clusterrolebindings",
    "clusterrolebinding",
    "ClusterRoleBinding",
    false,
    &[],
    &[],
    &[]
);
pub(crate) const SELFSUBJECTACCESSREVIEWS: ResourceDef = review!(
    "authorization.k8s.io",
    "selfsubjectaccessreviews",
    "selfsubjectaccessreview",
    "SelfSubjectAccessReview"
);
pub(crate) const SUBJECTACCESSREVIEWS: ResourceDef = review!(
    "authorization.k8s.io",
    "subjectaccessreviews",
    "subjectaccessreview",
    "SubjectAccessReview"
);
pub(crate) const TOKENREVIEWS: ResourceDef = review!(
    "authentication.k8s.io",
    "tokenreviews",
    "tokenreview",
    "TokenReview"
);
pub(crate) const SELFSUBJECTREVIEWS: ResourceDef = review!(
    "authentication.k8s.io",
    "selfsubjectreviews",
    "selfsubjectreview",
    "SelfSubjectReview"
);

pub(crate) const NAMESPACES: ResourceDef = def!(
    "",
    "namespaces",
    "namespace",
    "Namespace",
    false,
    &["ns"],
    &["status", "finalize"],
    &[]
);
pub(crate) const NODES: ResourceDef = def!(
    "",
    "nodes",
    "node",
    "Node",
    false,
    &["no"],
    &["status"],
    &[]
);
pub(crate) const PODS: ResourceDef = def!(
    "",
    "pods",
    "pod",
    "Pod",
    true,
    &["po"],
    &["status", "binding", "log"],
    &["all"]
);
pub(crate) const EVENTS: ResourceDef =
    def!("", "events", "event", "Event", true, &["ev"], &[], &[]);
pub(crate) const SERVICES: ResourceDef = def!(
    "",
    "services",
    "service",
    "Service",
    true,
    &["svc"],
    &["status"],
    &["all"]
);
pub(crate) const CONFIGMAPS: ResourceDef = def!(
    "",
    "configmaps",
    "configmap",
    "ConfigMap",
    true,
    &["cm"],
    &[],
    &[]
);
pub(crate) const SECRETS: ResourceDef =
    def!("", "secrets", "secret", "Secret", true, &[], &[], &[]);
pub(crate) const LEASES: ResourceDef = def!(
    "coordination.k8s.io",
    "leases",
    "lease",
    "Lease",
    true,
    &[],
    &[],
    &[]
);
pub(crate) const DEPLOYMENTS: ResourceDef = def!(
    "apps",
    "deployments",
    "deployment",
    "Deployment",
    true,
    &["deploy"],
    &["status", "scale"],
    &["all"]
);
pub(crate) const REPLICASETS: ResourceDef = def!(
    "apps",
    "replicasets",
    "replicaset",
    "ReplicaSet",
    true,
    &["rs"],
    &["status", "scale"],
    &["all"]
);

/// Every served resource.
pub(crate) const ALL: &[ResourceDef] = &[
    NAMESPACES,
    NODES,
    PODS,
    EVENTS,
    SERVICES,
    CONFIGMAPS,
    SECRETS,
    LEASES,
    DEPLOYMENTS,
    REPLICASETS,
    ROLES,
    CLUSTERROLES,
    ROLEBINDINGS,
    CLUSTERROLEBINDINGS,
    SELFSUBJECTACCESSREVIEWS,
    SUBJECTACCESSREVIEWS,
    TOKENREVIEWS,
    SELFSUBJECTREVIEWS,
];

/// The served API groups (besides core), with their one version.
pub(crate) const GROUPS: &[&str] = &[
    "apps",
    "coordination.k8s.io",
    "rbac.authorization.k8s.io",
    "authorization.k8s.io",
    "authentication.k8s.io",
];

impl ResourceDef {
    /// `v1` or `apps/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
    /// `pods` or `deployments.apps` (as Kubernetes names resources in messages).
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
    /// `Pod` or `Deployment.apps` (as Kubernetes names kinds in 422 messages).
    pub fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.to_string()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }
    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }
    pub fn has_subresource(&self, sub: &str) -> bool {
        self.subresources.contains(&sub)
    }
    /// Whether `status` is only written through the `status` subresource.
    pub fn has_status(&self) -> bool {
        self.has_subresource("status")
    }

    /// Find by group and plural.
    pub fn find(group: &str, plural: &str) -> Option<&'static ResourceDef> {
        ALL.iter().find(|d| d.group == group && d.plural == plural)
    }

    /// Find by group and kind.
    pub fn find_kind(group: &str, kind: &str) -> Option<&'static ResourceDef> {
        ALL.iter().find(|d| d.group == group && d.kind == kind)
    }
}

/// `GET /api`.
pub(crate) fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

fn group_json(group: &str) -> Value {
    let gv = json!({"groupVersion": format!("{group}/v1"), "version": "v1"});
    json!({"name": group, "versions": [gv.clone()], "preferredVersion": gv})
}

/// `GET /apis`.
pub(crate) fn api_group_list() -> Value {
    json!({
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": GROUPS.iter().map(|g| group_json(g)).collect::<Vec<_>>(),
    })
}

/// `GET /apis/{group}`.
pub(crate) fn api_group(group: &str) -> Option<Value> {
    GROUPS.contains(&group).then(|| {
        let mut g = group_json(group);
        g["kind"] = json!("APIGroup");
        g["apiVersion"] = json!("v1");
        g
    })
}

/// `GET /api/v1` or `GET /apis/{group}/v1`.
pub(crate) fn api_resource_list(group: &str, version: &str) -> Option<Value> {
    if version != "v1" || !(group.is_empty() || GROUPS.contains(&group)) {
        return None;
    }
    let gv = if group.is_empty() {
        "v1".to_string()
    } else {
        format!("{group}/{version}")
    };
    let mut resources = Vec::new();
    for d in ALL.iter().filter(|d| d.group == group) {
        let verbs: &[&str] = if d.review { &["create"] } else { VERBS };
        let mut r = json!({
            "name": d.plural,
            "singularName": d.singular,
            "namespaced": d.namespaced,
            "kind": d.kind,
            "verbs": verbs,
        });
        if !d.short_names.is_empty() {
            r["shortNames"] = json!(d.short_names);
        }
        if !d.categories.is_empty() {
            r["categories"] = json!(d.categories);
        }
        resources.push(r);
        for sub in d.subresources {
            let (kind, verbs, extra): (&str, &[&str], Option<(&str, &str)>) = match *sub {
                "status" => (d.kind, &["get", "patch", "update"], None),
                "scale" => (
                    "Scale",
                    &["get", "patch", "update"],
                    Some(("autoscaling", "v1")),
                ),
                "binding" => ("Binding", &["create"], None),
                "log" => ("Pod", &["get"], None),
                "finalize" => (d.kind, &["update"], None),
                _ => continue,
            };
            let mut r = json!({
                "name": format!("{}/{}", d.plural, sub),
                "singularName": "",
                "namespaced": d.namespaced,
                "kind": kind,
                "verbs": verbs,
            });
            if let Some((g, v)) = extra {
                r["group"] = json!(g);
                r["version"] = json!(v);
            }
            resources.push(r);
        }
    }
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": gv,
        "resources": resources,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_has_namespaced_and_short_names() {
        let core = api_resource_list("", "v1").unwrap();
        let pods = core["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "pods")
            .unwrap();
        assert_eq!(pods["namespaced"], true);
        assert_eq!(pods["shortNames"][0], "po");
        let apps = api_resource_list("apps", "v1").unwrap();
        assert_eq!(apps["groupVersion"], "apps/v1");
        let scale = apps["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "deployments/scale")
            .unwrap();
        assert_eq!(scale["kind"], "Scale");
        assert!(api_resource_list("nope", "v1").is_none());
        assert_eq!(DEPLOYMENTS.qualified(), "deployments.apps");
    }
}
