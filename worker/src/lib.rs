//! The Ballast worker: the node agent.

use std::net::SocketAddr;

use axum::{routing::get, Router};
use ballast_config::LoadedConfig;
use tokio_util::sync::CancellationToken;

/// Errors that end a worker process.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("unknown worker id `{0}` (not in the config's [[workers]])")]
    UnknownId(String),
    #[error("cannot bind address {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

/// Run worker `id` until `shutdown` is cancelled.
pub async fn run(
    config: LoadedConfig,
    id: String,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let me = config
        .config
        .worker(&id)
        .ok_or_else(|| WorkerError::UnknownId(id.clone()))?
        .clone();
    let listener = tokio::net::TcpListener::bind(me.address)
        .await
        .map_err(|source| WorkerError::Bind {
            addr: me.address,
            source,
        })?;
    tracing::info!(id = %id, address = %me.address, "worker serving");
    let app = Router::new().route("/livez", get(|| async { "ok" }));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(|e| WorkerError::Other(e.to_string()))
}
