//! The worker's HTTPS endpoint on its address: `/livez`, `/metrics`, and
//! `/containerLogs/{namespace}/{pod}/{container}?tailLines=N&follow=true` (what the master
//! proxies `kubectl logs` to). Who may use which: [`crate::access`].

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;

use ballast_config::listener::{PeerInfo, TlsListener};
use ballast_config::tls::{ClientAuth, NodeTls, TlsError};

use crate::access::Access;
use crate::logs;
use crate::metrics::Metrics;
use crate::pods::Ctx;

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    /// None in hollow mode (no processes, no logs).
    pods: Option<Arc<Ctx>>,
    access: Arc<Access>,
}

/// Serve `app` over TLS on `listener` until `stop` (client certificates optional: a
/// scraper may come with a bearer token instead).
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    tls: &NodeTls,
    limits: &ballast_config::LimitsConfig,
    app: Router,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), TlsError> {
    let config = tls.server_config(ClientAuth::Optional)?;
    let listener = TlsListener::new(listener, config, "worker", None, limits.max_connections)
        .map_err(|e| TlsError::Verifier(format!("worker listener: {e}")))?;
    ballast_config::listener::serve(listener, app, limits.header_read_timeout, stop).await;
    Ok(())
}

/// The router.
pub(crate) fn router(metrics: Metrics, pods: Option<Arc<Ctx>>, access: Arc<Access>) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics_handler))
        .route(
            "/containerLogs/{namespace}/{pod}/{container}",
            get(logs_handler),
        )
        .with_state(AppState {
            metrics,
            pods,
            access,
        })
}

async fn metrics_handler(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    headers: HeaderMap,
) -> Response {
    if let Some((code, msg)) = st.access.metrics(&peer, &headers).await.refusal() {
        return text(code, msg.into());
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LogQuery {
    tail_lines: Option<i64>,
    follow: Option<String>,
}

fn truthy(v: &Option<String>) -> bool {
    matches!(v.as_deref(), Some("true" | "1" | ""))
}

fn text(code: StatusCode, msg: String) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        msg,
    )
        .into_response()
}

async fn logs_handler(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    Path((namespace, pod, container)): Path<(String, String, String)>,
    Query(q): Query<LogQuery>,
) -> Response {
    if let Some((code, msg)) = st.access.logs(&peer).refusal() {
        return text(code, msg.into());
    }
    let Some(ctx) = st.pods else {
        return text(
            StatusCode::NOT_FOUND,
            "hollow node: no container logs\n".into(),
        );
    };
    let entry = ctx
        .logs
        .lock()
        .unwrap()
        .get(&(namespace.clone(), pod.clone()))
        .cloned();
    let Some(entry) = entry else {
        return text(
            StatusCode::NOT_FOUND,
            format!("pod {namespace}/{pod} is not on this worker\n"),
        );
    };
    if !entry.writing.lock().unwrap().contains_key(&container) {
        return text(
            StatusCode::NOT_FOUND,
            format!("container {container:?} is not in pod {namespace}/{pod}\n"),
        );
    }
    let path = logs::container_log(&entry.dir, &container);
    let tail = q.tail_lines.filter(|n| *n >= 0).map(|n| n as usize);
    if truthy(&q.follow) {
        let writing = entry.writing.clone();
        let c = container.clone();
        let ctx2 = ctx.clone();
        let key = (namespace, pod);
        let uid = entry.uid.clone();
        let still: logs::StillWriting = Arc::new(move || {
            let present = ctx2
                .logs
                .lock()
                .unwrap()
                .get(&key)
                .is_some_and(|e| e.uid == uid);
            present
                && !ctx2.stopping.is_cancelled()
                && writing.lock().unwrap().get(&c).copied().unwrap_or(false)
        });
        let body = Body::from_stream(logs::follow(path, tail, still));
        return ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response();
    }
    match logs::read_log(&path, tail) {
        Ok((data, _)) => {
            ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], data).into_response()
        }
        // Not started yet: an empty log.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            Vec::new(),
        )
            .into_response(),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read {}: {e}\n", path.display()),
        ),
    }
}
