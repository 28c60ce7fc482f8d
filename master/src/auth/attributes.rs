//! What a request asks to do, in the terms authorization decides on (kube-apiserver's
//! authorizer attributes), and the message of a refusal.

/// A request's verb and target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attributes {
    /// A resource request (`/api/...`, `/apis/...` with a resource).
    Resource {
        verb: String,
        api_group: String,
        resource: String,
        /// `status`, `log`, `binding`, `scale`... or empty.
        subresource: String,
        /// Empty for cluster-scoped resources and for requests across all namespaces.
        namespace: String,
        /// Empty for collections (list, watch, create, deletecollection).
        name: String,
        /// The request's `fieldSelector` (the node authorizer reads `spec.nodeName`).
        field_selector: String,
    },
    /// Any other path (`/metrics`, `/version`, `/api` discovery...).
    NonResource { verb: String, path: String },
}

impl Attributes {
    pub fn verb(&self) -> &str {
        match self {
            Attributes::Resource { verb, .. } | Attributes::NonResource { verb, .. } => verb,
        }
    }

    /// A resource request without a name or field selector (tests, reviews).
    pub fn resource(verb: &str, api_group: &str, resource: &str, namespace: &str) -> Self {
        Attributes::Resource {
            verb: verb.into(),
            api_group: api_group.into(),
            resource: resource.into(),
            subresource: String::new(),
            namespace: namespace.into(),
            name: String::new(),
            field_selector: String::new(),
        }
    }

    pub fn non_resource(verb: &str, path: &str) -> Self {
        Attributes::NonResource {
            verb: verb.into(),
            path: path.into(),
        }
    }

    /// kube-apiserver's 403 message for `user`, e.g. `pods "web" is forbidden: User
    /// "alice" cannot get resource "pods" in API group "" in the namespace "b"`.
    pub fn forbidden_message(&self, user: &str, reason: &str) -> String {
        let mut m = match self {
            Attributes::Resource {
                verb,
                api_group,
                resource,
                subresource,
                namespace,
                name,
                ..
            } => {
                let qualified = if api_group.is_empty() {
                    resource.clone()
                } else {
                    format!("{resource}.{api_group}")
                };
                let what = if subresource.is_empty() {
                    format!("resource {resource:?}")
                } else {
                    format!("resource \"{resource}/{subresource}\"")
                };
                let subject = if name.is_empty() {
                    format!("{qualified} is forbidden")
                } else {
                    format!("{qualified} {name:?} is forbidden")
                };
                let scope = if namespace.is_empty() {
                    "at the cluster scope".to_string()
                } else {
                    format!("in the namespace {namespace:?}")
                };
                format!("{subject}: User {user:?} cannot {verb} {what} in API group {api_group:?} {scope}")
            }
            Attributes::NonResource { verb, path } => {
                format!("forbidden: User {user:?} cannot {verb} path {path:?}")
            }
        };
        if !reason.is_empty() {
            m.push_str(": ");
            m.push_str(reason);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_like_kube_apiserver() {
        let a = Attributes::resource("list", "", "pods", "b");
        assert_eq!(
            a.forbidden_message("alice", ""),
            r#"pods is forbidden: User "alice" cannot list resource "pods" in API group "" in the namespace "b""#
        );
        let a = Attributes::resource("create", "apps", "deployments", "");
        assert_eq!(
            a.forbidden_message("bob", ""),
            r#"deployments.apps is forbidden: User "bob" cannot create resource "deployments" in API group "apps" at the cluster scope"#
        );
        let a = Attributes::non_resource("get", "/metrics");
        assert_eq!(
            a.forbidden_message("x", ""),
            r#"forbidden: User "x" cannot get path "/metrics""#
        );
    }
}
