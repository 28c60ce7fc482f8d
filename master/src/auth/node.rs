//! The node authorizer (kube's Node authorizer + NodeRestriction, in one pure function):
//! a worker (`system:node:<name>` in `system:nodes`) may
//! - read every Node, and create, update or patch its own (and its status);
//! - list and watch pods only with `fieldSelector=spec.nodeName=<name>`; get, delete and
//!   write the status of pods bound to it;
//! - get, create, update and patch its own Lease in `kube-node-lease`;
//! - create, update and patch Events;
//! - create TokenReviews and SubjectAccessReviews (to check who scrapes its `/metrics`).
//!
//! Anything else gets no opinion here (RBAC decides; by default nothing grants nodes
//! more). In particular a node cannot create pods, nor touch another node's Node, Lease
//! or pods.

use ballast_config::pki;
use ballast_config::tls::Identity;

use super::attributes::Attributes;

/// The namespace of node Leases.
pub(crate) const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";

/// The decision of the node authorizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NodeDecision {
    Allow,
    /// Not allowed here; the reason is added to a 403 when RBAC says no too.
    NoOpinion(String),
    /// Ask again with the node the pod `namespace/name` is bound to.
    NeedPod {
        namespace: String,
        name: String,
    },
}

/// The node name of a node identity.
pub(crate) fn node_name(user: &Identity) -> Option<&str> {
    if !user.in_group(pki::NODES_GROUP) {
        return None;
    }
    user.user
        .strip_prefix("system:node:")
        .filter(|n| !n.is_empty())
}

/// Whether `selector` (a `fieldSelector`) restricts to pods of `node`.
fn selects_node(selector: &str, node: &str) -> bool {
    selector.split(',').any(|term| {
        term.trim()
            .strip_prefix("spec.nodeName")
            .and_then(|rest| rest.strip_prefix("==").or_else(|| rest.strip_prefix('=')))
            .is_some_and(|v| v == node)
    })
}

/// Decide for node `node`. `pod_node` is `None` on the first call; after a `NeedPod`,
/// `Some(the pod's spec.nodeName)` (`Some(None)`: no such pod, or not bound).
pub(crate) fn decide(
    node: &str,
    attrs: &Attributes,
    pod_node: Option<Option<&str>>,
) -> NodeDecision {
    let no = |why: &str| NodeDecision::NoOpinion(format!("node {node:?} {why}"));
    let Attributes::Resource {
        verb,
        api_group,
        resource,
        subresource,
        namespace,
        name,
        field_selector,
    } = attrs
    else {
        return no("may not reach this path");
    };
    let verb = verb.as_str();
    let writes = matches!(verb, "create" | "update" | "patch");
    match (api_group.as_str(), resource.as_str(), subresource.as_str()) {
        ("", "nodes", "" | "status") => match verb {
            "get" | "list" | "watch" if subresource.is_empty() => NodeDecision::Allow,
            _ if writes && name == node => NodeDecision::Allow,
            _ => no("may only write its own Node object"),
        },
        ("", "pods", "") if matches!(verb, "list" | "watch") => {
            if selects_node(field_selector, node) {
                NodeDecision::Allow
            } else {
                no("may only list and watch pods with fieldSelector=spec.nodeName=<its name>")
            }
        }
        ("", "pods", "" | "status")
            if !name.is_empty()
                && (matches!(verb, "update" | "patch") && subresource == "status"
                    || matches!(verb, "get" | "delete") && subresource.is_empty()) =>
        {
            match pod_node {
                None => NodeDecision::NeedPod {
                    namespace: namespace.clone(),
                    name: name.clone(),
                },
                Some(Some(n)) if n == node => NodeDecision::Allow,
                Some(_) => no("may only reach pods bound to it"),
            }
        }
        ("", "pods", _) => no("may not create or change pods"),
        ("coordination.k8s.io", "leases", "") => {
            if namespace == NODE_LEASE_NAMESPACE && name == node && (writes || verb == "get") {
                NodeDecision::Allow
            } else {
                no("may only reach its own Lease in kube-node-lease")
            }
        }
        ("" | "events.k8s.io", "events", "") if writes => NodeDecision::Allow,
        ("authorization.k8s.io", "subjectaccessreviews", "")
        | ("authentication.k8s.io", "tokenreviews", "")
            if verb == "create" =>
        {
            NodeDecision::Allow
        }
        _ => no("has no node permission for this"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(verb: &str, group: &str, res: &str, sub: &str, ns: &str, name: &str) -> Attributes {
        Attributes::Resource {
            verb: verb.into(),
            api_group: group.into(),
            resource: res.into(),
            subresource: sub.into(),
            namespace: ns.into(),
            name: name.into(),
            field_selector: String::new(),
        }
    }

    fn allowed(a: &Attributes, pod_node: Option<Option<&str>>) -> bool {
        decide("w1", a, pod_node) == NodeDecision::Allow
    }

    #[test]
    fn own_node_and_lease_only() {
        assert!(allowed(&attrs("create", "", "nodes", "", "", "w1"), None));
        assert!(allowed(
            &attrs("update", "", "nodes", "status", "", "w1"),
            None
        ));
        assert!(!allowed(&attrs("update", "", "nodes", "", "", "w2"), None));
        assert!(!allowed(&attrs("delete", "", "nodes", "", "", "w1"), None));
        assert!(allowed(&attrs("get", "", "nodes", "", "", "w2"), None));
        let lease = |name: &str| {
            attrs(
                "update",
                "coordination.k8s.io",
                "leases",
                "",
                NODE_LEASE_NAMESPACE,
                name,
            )
        };
        assert!(allowed(&lease("w1"), None));
        assert!(!allowed(&lease("w2"), None));
    }

    #[test]
    fn pods_bound_to_it_only() {
        assert!(!allowed(
            &attrs("create", "", "pods", "", "default", ""),
            None
        ));
        let status = attrs("update", "", "pods", "status", "default", "web");
        assert_eq!(
            decide("w1", &status, None),
            NodeDecision::NeedPod {
                namespace: "default".into(),
                name: "web".into()
            }
        );
        assert!(allowed(&status, Some(Some("w1"))));
        assert!(!allowed(&status, Some(Some("w2"))));
        assert!(!allowed(&status, Some(None)));
        assert!(!allowed(
            &attrs("update", "", "pods", "", "default", "web"),
            Some(Some("w1"))
        ));
    }

    #[test]
    fn pod_lists_need_its_field_selector() {
        let mut a = attrs("watch", "", "pods", "", "", "");
        assert!(!allowed(&a, None));
        if let Attributes::Resource { field_selector, .. } = &mut a {
            *field_selector = "spec.nodeName=w1".into();
        }
        assert!(allowed(&a, None));
        if let Attributes::Resource { field_selector, .. } = &mut a {
            *field_selector = "spec.nodeName=w2".into();
        }
        assert!(!allowed(&a, None));
    }

    #[test]
    fn node_identity_needs_the_nodes_group() {
        let id = |u: &str, g: &[&str]| Identity {
            user: u.into(),
            groups: g.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(
            node_name(&id("system:node:w1", &["system:nodes"])),
            Some("w1")
        );
        assert_eq!(node_name(&id("system:node:w1", &[])), None);
        assert_eq!(node_name(&id("alice", &["system:nodes"])), None);
    }
}
