//! Who may do what, as kube-apiserver decides it.
//!
//! - [`authn`]: the user of a request: a trusted proxy's `X-Remote-User`, the client
//!   certificate, or a bearer token from [`tokens`]; otherwise anonymous, which reaches
//!   only the public paths ([`is_public`]).
//! - [`authorizer`]: superusers (`system:masters`), then the [`node`] authorizer, then
//!   [`rbac`] over the store's Role, ClusterRole, RoleBinding and ClusterRoleBinding
//!   objects ([`bootstrap`] writes the defaults); [`attributes`] is what is decided on.
//! - [`fairness`]: each identity's API requests in flight, bounded (429 beyond).
//! - [`review`]: SelfSubjectAccessReview (`kubectl auth can-i`), SubjectAccessReview,
//!   TokenReview, SelfSubjectReview (`kubectl auth whoami`).

pub(crate) mod attributes;
pub(crate) mod authn;
pub(crate) mod authorizer;
pub(crate) mod bootstrap;
pub(crate) mod fairness;
pub(crate) mod node;
pub(crate) mod rbac;
pub(crate) mod review;
pub(crate) mod tokens;

use std::sync::Arc;

pub(crate) use attributes::Attributes;
pub(crate) use authn::Authenticator;
pub(crate) use authorizer::Authorizer;
pub(crate) use ballast_config::tls::Identity;

/// Paths anonymous clients may reach (kube's `system:public-info-viewer`), so any load
/// balancer's health check works: `/livez`, `/readyz`, `/active`, `/version`.
pub(crate) fn is_public(path: &str) -> bool {
    matches!(
        path.trim_end_matches('/'),
        "/livez" | "/readyz" | "/healthz" | "/active" | "/version"
    )
}

/// Authentication and authorization together, shared by the server and the API.
#[derive(Clone)]
pub struct Auth {
    pub authn: Arc<Authenticator>,
    pub authz: Arc<Authorizer>,
}
