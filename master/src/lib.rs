//! The Ballast master: replicated state store, Kubernetes-compatible API,
//! controllers, scheduler, and the `/active` report.
//!
//! Module layout:
//! - [`store`]: the etcd-like key-value state machine and the [`store::Store`] interface.

pub mod store;

use std::net::SocketAddr;

use axum::{routing::get, Router};
use ballast_config::LoadedConfig;
use tokio_util::sync::CancellationToken;

/// Errors that end a master process.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error("unknown master id `{0}` (not in the config's [[masters]])")]
    UnknownId(String),
    #[error("cannot bind {what} address {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

/// Run master `id` until `shutdown` is cancelled.
pub async fn run(
    config: LoadedConfig,
    id: String,
    shutdown: CancellationToken,
) -> Result<(), MasterError> {
    let me = config
        .config
        .master(&id)
        .ok_or_else(|| MasterError::UnknownId(id.clone()))?
        .clone();
    let listener = tokio::net::TcpListener::bind(me.api)
        .await
        .map_err(|source| MasterError::Bind {
            what: "api",
            addr: me.api,
            source,
        })?;
    tracing::info!(id = %id, api = %me.api, "master serving");
    let app = Router::new().route("/livez", get(|| async { "ok" }));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(|e| MasterError::Other(e.to_string()))
}
