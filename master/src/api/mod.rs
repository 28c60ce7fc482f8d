//! The Kubernetes-compatible API that unmodified `kubectl` uses, served from the [`Store`].
//!
//! - [`router`]: the axum `Router` (discovery, `/version`, `/openapi/v2`, the resources).
//! - [`registry::Registry`]: object semantics over the store (used by the router).
//! - [`informer::Informer`]: a decoded copy of every object of a kind, kept current from
//!   the store's watch, for in-master code (controllers, scheduler); [`objects`] maps
//!   k8s-openapi types to served resources.
//! - [`events`]: Events the master's own components record.
//! - [`gc`]: ownerReference garbage collection and namespace finalization passes.
//! - pure parts: [`selector`], [`patch`], [`table`], [`validate`], [`protobuf`].
//!
//! Wiring (active master): `router(store, info)` merged into the server's router;
//! [`ensure_defaults`] when becoming active (the router also does it lazily); a
//! [`gc::run`] task for Foreground/Orphan deletion finalizers and ownerless dependents.
//! Requests are counted by the server's middleware (`crate::metrics::count_requests`).
//!
//! Store layout: `/registry/{plural}/{namespace}/{name}` (namespaced) and
//! `/registry/{plural}/{name}` (cluster-scoped); values are the object JSON without
//! `resourceVersion`, which is the key's mod revision on every read.

pub(crate) mod error;
pub(crate) mod events;
pub(crate) mod gc;
pub(crate) mod handlers;
pub(crate) mod informer;
pub(crate) mod logs;
pub(crate) mod objects;
pub(crate) mod patch;
pub(crate) mod protobuf;
pub(crate) mod registry;
pub(crate) mod resources;
pub(crate) mod selector;
pub(crate) mod table;
pub(crate) mod validate;

use std::sync::Arc;

use async_trait::async_trait;
use axum::response::Response;
use axum::routing::{any, get};
use axum::Router;

pub(crate) use error::ApiError;
pub(crate) use registry::{ensure_defaults, Registry};

use crate::store::Store;
use ballast_config::schema::LimitsConfig;

/// A `pods/{name}/log` request, resolved to its container and node.
#[derive(Debug, Clone)]
pub(crate) struct LogRequest {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub node_name: String,
    pub follow: bool,
    pub tail_lines: Option<i64>,
    pub previous: bool,
    pub timestamps: bool,
    pub since_seconds: Option<i64>,
}

/// Serves pod logs (by proxying to the worker that runs the pod). Plugged into
/// [`ApiInfo::logs`]; without one the API answers `log` with 503.
#[async_trait]
pub(crate) trait PodLogs: Send + Sync + 'static {
    /// Return the response to send (text/plain, streamed when following).
    async fn logs(&self, req: LogRequest) -> Result<Response, ApiError>;
}

/// What the API reports about this master and the optional hooks it uses.
#[derive(Clone)]
pub(crate) struct ApiInfo {
    /// Sent as `X-Ballast-Master` on every resource response.
    pub master_id: String,
    /// `gitVersion` of `/version`; kubectl's dispatcher picks its minor version from it.
    pub git_version: String,
    /// The address clients should use (`serverAddressByClientCIDRs` of `/api`).
    pub server_address: String,
    /// Pod log source (a master uses [`logs::KubeletLogProxy`] to the worker); `None` → 503.
    pub logs: Option<Arc<dyn PodLogs>>,
    /// What one request may ask for (`[limits]`).
    pub limits: LimitsConfig,
}

impl ApiInfo {
    pub(crate) fn new(master_id: impl Into<String>) -> Self {
        Self {
            master_id: master_id.into(),
            git_version: "v1.33.0".into(),
            server_address: "127.0.0.1:6443".into(),
            logs: None,
            limits: LimitsConfig::default(),
        }
    }
}

/// The Kubernetes API router. Mount it on the active master (it assumes it is active:
/// store errors such as `NotActive` still map to 503 Status with `Retry-After: 1`).
pub(crate) fn router(store: Arc<dyn Store>, info: ApiInfo, auth: crate::auth::Auth) -> Router {
    let state = Arc::new(handlers::ApiState {
        registry: Registry::with_limits(store, patch::PatchLimits::of(&info.limits)),
        info,
        auth,
        defaults_ready: std::sync::atomic::AtomicBool::new(false),
    });
    Router::new()
        .route("/version", get(handlers::version))
        .route("/version/", get(handlers::version))
        .route("/openapi/v2", get(handlers::openapi_v2))
        .route("/openapi/v3", any(handlers::not_found))
        .route("/openapi/v3/{*rest}", any(handlers::not_found))
        .route("/api", any(handlers::dispatch))
        .route("/api/{*rest}", any(handlers::dispatch))
        .route("/apis", any(handlers::dispatch))
        .route("/apis/{*rest}", any(handlers::dispatch))
        .with_state(state)
}

#[cfg(test)]
mod tests;
