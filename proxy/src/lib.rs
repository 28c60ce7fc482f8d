//! The Ballast proxy: routes every API request to the active master, DNS responder,
//! admin and metrics endpoint.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::Path;

use axum::{routing::get, Router};

/// Errors that end the proxy process.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Config(#[from] ballast_config::ConfigError),
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

/// Run the proxy from the config at `path` until SIGTERM/SIGINT. Blocking: the proxy
/// owns its runtimes and signal handling.
pub fn run(path: &Path) -> Result<(), ProxyError> {
    let config = ballast_config::load(path)?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| ProxyError::Other(e.to_string()))?;
    rt.block_on(async move {
        let px = config.config.proxy.clone();
        let bind = |what: &'static str, addr: SocketAddr| async move {
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ProxyError::Bind { what, addr, source })
        };
        let api = bind("api", px.api).await?;
        let admin = bind("admin", px.admin).await?;
        tracing::info!(api = %px.api, admin = %px.admin, "proxy serving");
        let app = Router::new()
            .route("/livez", get(|| async { "ok" }))
            .route("/metrics", get(|| async { "" }));
        let api_app = Router::new().route("/livez", get(|| async { "ok" }));
        let token = tokio_util::sync::CancellationToken::new();
        let a = tokio::spawn(
            axum::serve(admin, app)
                .with_graceful_shutdown(token.clone().cancelled_owned())
                .into_future(),
        );
        let b = tokio::spawn(
            axum::serve(api, api_app)
                .with_graceful_shutdown(token.clone().cancelled_owned())
                .into_future(),
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| ProxyError::Other(e.to_string()))?;
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        token.cancel();
        let _ = a.await;
        let _ = b.await;
        Ok(())
    })
}
