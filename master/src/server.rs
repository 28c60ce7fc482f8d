//! The master's HTTP server on its API address: health, `/active`, `/metrics`, the
//! test-only internal key-value endpoint, and (served only while active) the Kubernetes
//! API router passed in as `extra`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::json;

use ballast_config::listener::PeerInfo;

use crate::api::ApiError;
use crate::auth::authn::{anonymous, strip_remote_headers};
use crate::auth::fairness::{is_long_running, Admission, Fairness};
use crate::auth::{is_public, Attributes, Auth};
use crate::metrics::{count_requests, MasterMetrics};
use crate::raft::{Leadership, RaftStore};
use crate::store::{Command, CommandResult, KeyValue, Precondition, Store, StoreError};

/// What the handlers share.
#[derive(Clone)]
pub struct ServerState {
    pub leadership: Leadership,
    pub store: Arc<RaftStore>,
    pub metrics: Arc<MasterMetrics>,
    /// Serve `/internal/kv` (tests only; `control.internal_kv`).
    pub internal_kv: bool,
    pub auth: Auth,
    /// Each identity's API requests in flight.
    pub(crate) fairness: Arc<Fairness>,
    /// Requests whose handlers are running.
    pub(crate) in_flight: InFlight,
}

/// The requests whose handlers are running (a watch only until its stream begins): what a
/// stopping master lets finish before it closes its connections, so that a write it
/// took is answered (committed, or refused) instead of cut.
#[derive(Debug, Clone, Default)]
pub(crate) struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

/// One running handler; counted until dropped (answered, or cancelled).
struct Running(InFlight);

impl Drop for Running {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl InFlight {
    fn start(&self) -> Running {
        self.0.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Running(self.clone())
    }

    /// Wait until no handler runs, or `max`; whether none does.
    pub(crate) async fn drained(&self, max: std::time::Duration) -> bool {
        let until = tokio::time::Instant::now() + max;
        while self.0.load(std::sync::atomic::Ordering::Acquire) > 0 {
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        true
    }
}

async fn track_in_flight(State(f): State<InFlight>, req: Request, next: Next) -> Response {
    let _running = f.start();
    next.run(req).await
}

/// The whole API-address router: health/active/metrics (+ internal KV when enabled),
/// plus `extra` (the Kubernetes API), which answers only on the active master and
/// otherwise 503 with a Kubernetes `Status` and `Retry-After: 1`. Every request is
/// counted in `ballast_master_api_requests_total`.
pub(crate) fn build_router(state: ServerState, extra: Router) -> Router {
    let gated = extra.layer(middleware::from_fn_with_state(
        state.clone(),
        require_active,
    ));
    let mut base = Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/active", get(active))
        .route("/metrics", get(metrics));
    if state.internal_kv {
        base = base.route("/internal/kv", get(kv_list)).route(
            "/internal/kv/{*key}",
            get(kv_get).put(kv_put).delete(kv_delete),
        );
    }
    base.with_state(state.clone())
        .merge(gated)
        .layer(middleware::from_fn(mark_unacted))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            count_requests,
        ))
        .layer(middleware::from_fn_with_state(
            state.in_flight.clone(),
            track_in_flight,
        ))
}

/// Authenticate every request (see [`crate::auth::authn`]); anonymous requests reach only
/// the public paths (401 elsewhere). Paths outside `/api` and `/apis` (`/metrics`,
/// `/openapi/v2`...) are authorized here as non-resource URLs; the Kubernetes API
/// authorizes its own requests. The user goes on in the request's extensions.
async fn authenticate(State(st): State<ServerState>, mut req: Request, next: Next) -> Response {
    let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<PeerInfo>>().cloned() else {
        return ApiError::Unauthorized.into_response();
    };
    let result = st.auth.authn.authenticate(&peer, req.headers());
    strip_remote_headers(req.headers_mut());
    let path = req.uri().path().to_string();
    let path = path.as_str();
    let public = is_public(path);
    let user = match result {
        Ok(Some(user)) => user,
        Ok(None) if public => anonymous(),
        Ok(None) => return ApiError::Unauthorized.into_response(),
        Err(e) => {
            tracing::debug!(peer = %peer.addr, error = %e, "authentication failed");
            return ApiError::Unauthorized.into_response();
        }
    };
    let user = match impersonate(&st, user, req.headers_mut()).await {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    let kube_api = path == "/api"
        || path.starts_with("/api/")
        || path == "/apis"
        || path.starts_with("/apis/");
    if !public && !kube_api {
        let attrs = Attributes::non_resource(&req.method().as_str().to_ascii_lowercase(), path);
        match st.auth.authz.authorize(&user, &attrs).await {
            Ok(d) if d.allowed => {}
            Ok(d) => {
                return ApiError::Forbidden(attrs.forbidden_message(&user.user, &d.reason))
                    .into_response()
            }
            Err(e) => return e.into_response(),
        }
    }
    // Fairness: a bounded share of the API per identity (429 beyond it).
    let slot = if kube_api {
        match st
            .fairness
            .admit(&user, is_long_running(path, req.uri().query()))
        {
            Admission::Counted(slot) => Some(slot),
            Admission::Exempt => None,
            Admission::Refused(why) => {
                st.metrics.api_throttled.inc();
                return ApiError::TooManyRequests(why).into_response();
            }
        }
    } else {
        None
    };
    req.extensions_mut().insert(user);
    let resp = next.run(req).await;
    match slot {
        // a watch counts until its stream ends, not when its head is sent
        Some(slot) if slot.long_running() => resp.map(|body| {
            Body::from_stream(body.into_data_stream().map(move |chunk| {
                let _held = &slot;
                chunk
            }))
        }),
        _ => resp,
    }
}

const IMPERSONATE_USER: &str = "impersonate-user";
const IMPERSONATE_GROUP: &str = "impersonate-group";
const IMPERSONATE_UID: &str = "impersonate-uid";
const IMPERSONATE_EXTRA_PREFIX: &str = "impersonate-extra-";

/// kubectl's `--as` / `--as-group` (kube-apiserver's impersonation): the request acts as
/// the named user and groups when its sender may `impersonate` each of them; otherwise
/// 403. The headers are removed either way.
async fn impersonate(
    st: &ServerState,
    user: crate::auth::Identity,
    headers: &mut axum::http::HeaderMap,
) -> Result<crate::auth::Identity, ApiError> {
    let target = headers
        .get(IMPERSONATE_USER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let groups: Vec<String> = headers
        .get_all(IMPERSONATE_GROUP)
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    let others: Vec<_> = headers
        .keys()
        .filter(|k| {
            k.as_str() == IMPERSONATE_UID || k.as_str().starts_with(IMPERSONATE_EXTRA_PREFIX)
        })
        .cloned()
        .collect();
    for k in &others {
        headers.remove(k);
    }
    headers.remove(IMPERSONATE_USER);
    headers.remove(IMPERSONATE_GROUP);
    let Some(target) = target else {
        if groups.is_empty() && others.is_empty() {
            return Ok(user);
        }
        return Err(ApiError::BadRequest(
            "impersonating groups, uids or extras requires Impersonate-User".into(),
        ));
    };
    if !others.is_empty() {
        return Err(ApiError::BadRequest(
            "Impersonate-Uid and Impersonate-Extra-* are not supported".into(),
        ));
    }
    let checks = std::iter::once(("users", target.as_str()))
        .chain(groups.iter().map(|g| ("groups", g.as_str())));
    for (resource, name) in checks {
        let attrs = Attributes::Resource {
            verb: "impersonate".into(),
            api_group: String::new(),
            resource: resource.into(),
            subresource: String::new(),
            namespace: String::new(),
            name: name.into(),
            field_selector: String::new(),
        };
        let d = st.auth.authz.authorize(&user, &attrs).await?;
        if !d.allowed {
            return Err(ApiError::Forbidden(
                attrs.forbidden_message(&user.user, &d.reason),
            ));
        }
    }
    let mut groups = groups;
    groups.push(crate::auth::authn::AUTHENTICATED.into());
    Ok(crate::auth::Identity {
        user: target,
        groups,
    })
}

/// Header on the 503 a non-active master answers *before* acting on a request: the
/// request never reached the store, so a proxy may send it (even a write) elsewhere.
/// A 503 without it (e.g. leadership lost during a write) may have been committed.
pub(crate) const REJECTED_HEADER: &str = "x-ballast-rejected";

/// The Kubernetes `Status` a non-active master answers with, before acting on a request.
pub(crate) fn not_active_status(me: &str, leader: Option<&str>) -> Response {
    let message = match leader {
        Some(l) => format!("master {me} is not active; the active master is {l}"),
        None => format!("master {me} is not active; no active master is known"),
    };
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": "ServiceUnavailable",
        "code": 503,
    });
    let mut resp = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp.headers_mut()
        .insert(REJECTED_HEADER, HeaderValue::from_static("not-active"));
    resp
}

async fn require_active(State(st): State<ServerState>, req: Request, next: Next) -> Response {
    let status = st.leadership.status();
    if !status.active {
        return not_active_status(&status.id, status.leader.as_deref());
    }
    next.run(req).await
}

async fn readyz(State(st): State<ServerState>) -> Response {
    if st.leadership.is_active() {
        (StatusCode::OK, "ok").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not active").into_response()
    }
}

async fn active(State(st): State<ServerState>) -> Response {
    let status = st.leadership.status();
    let code = if status.active {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(status)).into_response()
}

async fn metrics(State(st): State<ServerState>) -> Response {
    let m = &st.metrics;
    m.active.set(st.leadership.is_active() as i64);
    m.store_revision.set(st.store.revision() as i64);
    st.store.refresh_raft_metrics(m);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        m.render(),
    )
        .into_response()
}

fn store_error(e: StoreError) -> Response {
    let (code, leader) = match &e {
        StoreError::NotActive { leader } => (StatusCode::SERVICE_UNAVAILABLE, leader.clone()),
        StoreError::Timeout => (StatusCode::GATEWAY_TIMEOUT, None),
        StoreError::Compacted { .. } => (StatusCode::GONE, None),
        StoreError::Fatal(_) => (StatusCode::INTERNAL_SERVER_ERROR, None),
    };
    let mut body = json!({ "error": e.to_string(), "retryable": e.is_retryable() });
    if let Some(l) = leader {
        body["leader"] = json!(l);
    }
    let mut resp = (code, Json(body)).into_response();
    if code == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if matches!(e, StoreError::NotActive { .. }) {
        resp.extensions_mut()
            .insert(crate::store::unacted::NotActiveRefusal);
    }
    resp
}

/// Run the request counting its committed writes; a "not active" refusal of a write by the
/// store, in a request that committed nothing, is marked as refused before acting (see
/// `store::unacted`), so a proxy sends it again to the new active master.
async fn mark_unacted(req: Request, next: Next) -> Response {
    let (mut resp, committed) = crate::store::unacted::track(next.run(req)).await;
    if !committed
        && resp
            .extensions()
            .get::<crate::store::unacted::NotActiveRefusal>()
            .is_some()
    {
        resp.headers_mut()
            .insert(REJECTED_HEADER, HeaderValue::from_static("not-active"));
    }
    resp
}

fn kv_json(kv: &KeyValue) -> serde_json::Value {
    json!({
        "key": kv.key,
        "value": String::from_utf8_lossy(&kv.value),
        "create_revision": kv.create_revision,
        "mod_revision": kv.mod_revision,
    })
}

/// `?expect=absent|exists|rev:N` (default: no check).
fn parse_expect(q: &HashMap<String, String>) -> Result<Precondition, Box<Response>> {
    match q.get("expect").map(String::as_str) {
        None | Some("") | Some("any") => Ok(Precondition::Any),
        Some("absent") => Ok(Precondition::Absent),
        Some("exists") => Ok(Precondition::Exists),
        Some(s) => match s.strip_prefix("rev:").and_then(|n| n.parse().ok()) {
            Some(n) => Ok(Precondition::ModRevision(n)),
            None => Err(Box::new(
                (
                    StatusCode::BAD_REQUEST,
                    Json(
                        json!({"error": format!("bad expect `{s}`: use absent, exists or rev:N")}),
                    ),
                )
                    .into_response(),
            )),
        },
    }
}

fn write_result(res: Result<CommandResult, StoreError>) -> Response {
    match res {
        Ok(CommandResult::Ok { revision, prev }) => (
            StatusCode::OK,
            Json(json!({
                "revision": revision,
                "prev": prev.first().cloned().flatten().as_ref().map(kv_json),
            })),
        )
            .into_response(),
        Ok(CommandResult::Conflict {
            key,
            current,
            revision,
        }) => (
            StatusCode::CONFLICT,
            Json(json!({
                "error": "precondition failed",
                "key": key,
                "current": current.as_ref().map(kv_json),
                "revision": revision,
            })),
        )
            .into_response(),
        Err(e) => store_error(e),
    }
}

async fn kv_put(
    State(st): State<ServerState>,
    Path(key): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let expect = match parse_expect(&q) {
        Ok(e) => e,
        Err(r) => return *r,
    };
    write_result(
        st.store
            .write(Command::Put {
                key: format!("/{key}"),
                value: body.to_vec(),
                expect,
            })
            .await,
    )
}

async fn kv_delete(
    State(st): State<ServerState>,
    Path(key): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let expect = match parse_expect(&q) {
        Ok(e) => e,
        Err(r) => return *r,
    };
    write_result(
        st.store
            .write(Command::Delete {
                key: format!("/{key}"),
                expect,
            })
            .await,
    )
}

async fn kv_get(State(st): State<ServerState>, Path(key): Path<String>) -> Response {
    let key = format!("/{key}");
    match st.store.get(&key).await {
        Ok(Some(kv)) => {
            let mut body = kv_json(&kv);
            body["revision"] = json!(st.store.revision());
            (StatusCode::OK, Json(body)).into_response()
        }
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "not found", "key": key, "revision": st.store.revision()})),
        )
            .into_response(),
        Err(e) => store_error(e),
    }
}

async fn kv_list(
    State(st): State<ServerState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let prefix = q.get("prefix").cloned().unwrap_or_else(|| "/".into());
    let limit = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(0);
    match st
        .store
        .range(&prefix, q.get("start_after").map(String::as_str), limit)
        .await
    {
        Ok(r) => (
            StatusCode::OK,
            Json(json!({
                "revision": r.revision,
                "more": r.more,
                "kvs": r.kvs.iter().map(kv_json).collect::<Vec<_>>(),
            })),
        )
            .into_response(),
        Err(e) => store_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn not_active_answers_a_kubernetes_status_with_retry_after() {
        let resp = not_active_status("m2", Some("m1"));
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        assert_eq!(resp.headers()[REJECTED_HEADER], "not-active");
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["kind"], "Status");
        assert_eq!(v["apiVersion"], "v1");
        assert_eq!(v["status"], "Failure");
        assert_eq!(v["reason"], "ServiceUnavailable");
        assert_eq!(v["code"], 503);
        assert_eq!(
            v["message"],
            "master m2 is not active; the active master is m1"
        );
    }

    #[test]
    fn expect_parameter() {
        let q = |s: &str| HashMap::from([("expect".to_string(), s.to_string())]);
        assert_eq!(parse_expect(&HashMap::new()).unwrap(), Precondition::Any);
        assert_eq!(parse_expect(&q("absent")).unwrap(), Precondition::Absent);
        assert_eq!(
            parse_expect(&q("rev:7")).unwrap(),
            Precondition::ModRevision(7)
        );
        assert!(parse_expect(&q("rev:x")).is_err());
    }
}
