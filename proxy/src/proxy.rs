//! The HTTP proxy (pingora): every request goes to the active master; failover is
//! hidden by holding requests while no master is active and by re-sending requests
//! that provably did not reach a master (or are safe to repeat).

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ballast_config::tls::Identity;
use bytes::Bytes;
use pingora::connectors::l4::BindTo;
use pingora::http::{Method, RequestHeader, ResponseHeader};
use pingora::protocols::Digest;
use pingora::proxy::{FailToProxy, ProxyHttp, ProxyWarnLogContext, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::CertKey;
use pingora::{Error, ErrorSource, ErrorType, Result};

use crate::checker::ActiveCheck;
use crate::fairness::Admission;
use crate::health::ActiveMaster;
use crate::state::Shared;

/// Request bodies larger than this are refused with 413 (the Kubernetes API itself
/// caps request bodies at 3 MiB).
pub(crate) const MAX_REQUEST_BODY: u64 = 16 * 1024 * 1024;

/// How long connecting to a master may take before it counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Idle pooled connections to a master are closed after this long.
const UPSTREAM_IDLE: Duration = Duration::from_secs(60);

/// See `ballast_master::server::REJECTED_HEADER`.
const REJECTED_HEADER: &str = "x-ballast-rejected";
const NOT_ACTIVE: ErrorType = ErrorType::Custom("MasterNotActive");

/// The request headers that carry a verified identity to the masters (kube-apiserver's
/// request-header authentication). A client's own are always removed.
const REMOTE_USER: &str = "x-remote-user";
const REMOTE_GROUP: &str = "x-remote-group";
const REMOTE_EXTRA_PREFIX: &str = "x-remote-extra-";

/// The pingora proxy logic.
pub(crate) struct BallastProxy {
    pub shared: Arc<Shared>,
    /// Used to confirm that a master answering 503 is no longer active.
    pub check: Arc<dyn ActiveCheck>,
    /// The proxy's own certificate, presented to the masters (mutual TLS).
    pub client_cert: Arc<CertKey>,
    /// The client for the watches [`crate::resume`] serves (same identity).
    pub watch_client: reqwest::Client,
}

impl BallastProxy {
    /// The headers a watch served by [`crate::resume`] sends to the masters: the
    /// client's, without hop-by-hop ones and identity headers it sent itself, with the
    /// verified identity of its certificate (as [`ProxyHttp::upstream_request_filter`]
    /// does for everything else).
    fn forwarded_headers(
        &self,
        req: &RequestHeader,
        client: Option<&Identity>,
    ) -> reqwest::header::HeaderMap {
        let mut out = reqwest::header::HeaderMap::new();
        for (k, v) in &req.headers {
            let name = k.as_str();
            let hop = matches!(
                name,
                "connection" | "keep-alive" | "te" | "transfer-encoding" | "upgrade" | "host"
            );
            let identity = name == REMOTE_USER
                || name == REMOTE_GROUP
                || name.starts_with(REMOTE_EXTRA_PREFIX);
            if !hop && !identity {
                out.append(k.clone(), v.clone());
            }
        }
        if let Some(id) = client {
            if let Ok(v) = http::HeaderValue::from_str(&id.user) {
                out.insert(REMOTE_USER, v);
            }
            for g in &id.groups {
                if let Ok(v) = http::HeaderValue::from_str(g) {
                    out.append(REMOTE_GROUP, v);
                }
            }
        }
        out
    }
}

/// Per-request state.
pub(crate) struct Ctx {
    start: Instant,
    /// When a held request gives up.
    hold_deadline: Option<tokio::time::Instant>,
    /// The master of the current attempt.
    master: Option<ActiveMaster>,
    attempts: u32,
    /// A watch or a followed log: passes through unbuffered, closed on failover.
    stream: bool,
    /// The upstream response header arrived (and will go downstream): no more retries.
    response_started: bool,
    /// The master answered "not active": send the request again elsewhere.
    reroute: bool,
    body_bytes: u64,
    /// The upstream connection of the current attempt.
    fd: Option<RawFd>,
    /// Status sent by `fail_to_proxy`.
    error_code: Option<u16>,
    /// The client's verified certificate (its user and groups go to the master).
    client: Option<Identity>,
    /// Its place among its identity's requests in flight ([`crate::fairness`]).
    _share: Option<crate::fairness::Share>,
    _in_flight: crate::state::InFlight,
}

/// The identity the proxy's TLS handshake verified (see `lib.rs`'s `IdentityCallback`).
fn client_identity(session: &Session) -> Option<Identity> {
    session
        .digest()?
        .ssl_digest
        .as_ref()?
        .extension
        .get::<Identity>()
        .cloned()
}

impl BallastProxy {
    fn release_fd(&self, ctx: &mut Ctx) {
        if let Some(fd) = ctx.fd.take() {
            self.shared.conns.end(fd);
        }
    }
}

fn is_safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// `?watch=true` (also `watch=1`) or `?follow=true`: a long-lived stream.
pub(crate) fn is_stream(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&').any(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, "true"));
            (k == "watch" || k == "follow") && (v == "true" || v == "1" || v.is_empty())
        })
    })
}

/// A Kubernetes `Status` body.
pub(crate) fn status_body(code: u16, reason: &str, message: &str) -> Bytes {
    let mut v = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if code == 503 || code == 429 {
        v["details"] = serde_json::json!({ "retryAfterSeconds": 1 });
    }
    Bytes::from(serde_json::to_vec(&v).expect("json"))
}

fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        408 => "Timeout",
        413 => "RequestEntityTooLarge",
        429 => "TooManyRequests",
        431 => "RequestHeaderFieldsTooLarge",
        503 => "ServiceUnavailable",
        500 => "InternalError",
        _ => "Unknown",
    }
}

#[async_trait]
impl ProxyHttp for BallastProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            hold_deadline: None,
            master: None,
            attempts: 0,
            stream: false,
            response_started: false,
            reroute: false,
            body_bytes: 0,
            fd: None,
            error_code: None,
            client: None,
            _share: None,
            _in_flight: self.shared.request_guard(),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        if self.shared.handing_over() {
            // answered with `Connection: close`: the client's next request opens a
            // connection to the proxy that took over
            session.set_keepalive(None);
        }
        ctx.client = client_identity(session);
        let req = session.req_header();
        ctx.stream = is_stream(req.uri.query());
        let too_big = req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|n| n > MAX_REQUEST_BODY);
        if too_big {
            return Error::e_explain(
                ErrorType::HTTPStatus(413),
                format!("request body larger than {MAX_REQUEST_BODY} bytes"),
            );
        }
        let upgrade = req.headers.contains_key(http::header::UPGRADE);
        if let Some(id) = &ctx.client {
            if crate::fairness::counted(req.uri.path(), req.uri.query(), upgrade) {
                let limit = self.shared.settings().requests_in_flight_per_user;
                match self.shared.fairness.admit(id, limit) {
                    Admission::Counted(share) => ctx._share = Some(share),
                    Admission::Exempt => {}
                    Admission::Refused(why) => {
                        self.shared.metrics.throttled.inc();
                        return Error::e_explain(ErrorType::HTTPStatus(429), why);
                    }
                }
            }
        }
        if req.method == http::Method::GET {
            let accept = req
                .headers
                .get(http::header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            if let Some(rv) = crate::resume::resumable(req.uri.query(), accept) {
                let path = req.uri.path().to_string();
                let query = req.uri.query().unwrap_or_default().to_string();
                let headers = self.forwarded_headers(req, ctx.client.as_ref());
                crate::resume::serve(
                    session,
                    &self.shared,
                    &self.watch_client,
                    &path,
                    &query,
                    headers,
                    rv,
                )
                .await?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(b) = body {
            ctx.body_bytes += b.len() as u64;
            if ctx.body_bytes > MAX_REQUEST_BODY {
                return Error::e_explain(
                    ErrorType::HTTPStatus(413),
                    format!("request body larger than {MAX_REQUEST_BODY} bytes"),
                );
            }
        }
        Ok(())
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        self.release_fd(ctx);
        ctx.attempts += 1;
        ctx.reroute = false;
        let settings = self.shared.settings();
        let deadline = *ctx
            .hold_deadline
            .get_or_insert_with(|| tokio::time::Instant::now() + settings.proxy.hold.timeout);
        let active = match self.shared.wait_active(deadline).await {
            Ok(a) => a,
            Err(e) => {
                tracing::info!(error = %e, "held request answered 503");
                self.shared.metrics.hold_timeouts.inc();
                return Error::e_explain(ErrorType::HTTPStatus(503), e.to_string());
            }
        };
        // TLS to the master, verified against the cluster CA and the master's address,
        // with the proxy's certificate (the masters trust its X-Remote-* headers).
        let mut peer = HttpPeer::new(active.addr, true, active.addr.ip().to_string());
        peer.client_cert_key = Some(self.client_cert.clone());
        peer.options.connection_timeout = Some(CONNECT_TIMEOUT);
        peer.options.total_connection_timeout = Some(CONNECT_TIMEOUT);
        peer.options.idle_timeout = Some(UPSTREAM_IDLE);
        peer.options.bind_to = settings.source_ip().map(|ip| {
            let mut bind = BindTo::default();
            bind.addr = Some(SocketAddr::new(ip, 0));
            bind
        });
        ctx.master = Some(active);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let extras: Vec<_> = req
            .headers
            .keys()
            .filter(|k| k.as_str().starts_with(REMOTE_EXTRA_PREFIX))
            .cloned()
            .collect();
        for k in extras {
            req.remove_header(&k);
        }
        req.remove_header(REMOTE_USER);
        req.remove_header(REMOTE_GROUP);
        if let Some(id) = &ctx.client {
            req.insert_header(REMOTE_USER, id.user.as_str())?;
            for g in &id.groups {
                req.append_header(REMOTE_GROUP, g.as_str())?;
            }
        }
        Ok(())
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        fd: RawFd,
        _digest: Option<&Digest>,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(m) = &ctx.master {
            self.shared.conns.begin(fd, &m.id, m.addr, ctx.stream);
            ctx.fd = Some(fd);
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing reached the master: any request may be sent again, to the next active.
        // A refused connect means the master process is gone: route away at once. Other
        // failures (a timeout, a full accept queue) can be load: re-check the master now
        // and let the health check's hysteresis decide, rather than fail over (and hold
        // every request) on one slow connect.
        if let Some(m) = &ctx.master {
            if matches!(e.etype(), ErrorType::ConnectRefused) {
                self.shared.mark_down(&m.id);
            } else {
                self.shared.suspect(&m.id);
            }
        }
        self.shared
            .metrics
            .upstream_retries
            .with_label_values(&["connect"])
            .inc();
        e.set_retry(true);
        e
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if resp.status.as_u16() == 503 {
            // A master that was not active rejects a request before acting on it and says
            // so; any other 503 to a write may follow a commit, so it is never replayed.
            let rejected_unacted = resp
                .headers
                .get(REJECTED_HEADER)
                .is_some_and(|v| v.as_bytes() == b"not-active");
            let replayable = rejected_unacted || is_safe(&session.req_header().method);
            if let Some(m) = ctx.master.clone() {
                // Did the master lose leadership since the last check? Ask it.
                let timeout = self.shared.settings().proxy.health.timeout;
                let still_active = match self.check.check(m.addr, timeout).await {
                    Ok(r) if r.active && r.term >= m.term => true,
                    Ok(_) => {
                        self.shared.mark_not_active(&m.id);
                        false
                    }
                    Err(_) => {
                        self.shared.mark_down(&m.id);
                        false
                    }
                };
                if !still_active && replayable {
                    ctx.reroute = true;
                    self.shared
                        .metrics
                        .upstream_retries
                        .with_label_values(&["not_active"])
                        .inc();
                    let mut e = Error::explain(
                        NOT_ACTIVE,
                        format!("master {} answered 503 and is not active", m.id),
                    );
                    e.as_up();
                    return Err(e);
                }
            }
        }
        ctx.response_started = true;
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(m) = &ctx.master {
            let _ = resp.insert_header("X-Ballast-Master", m.id.as_str());
        }
        Ok(())
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        let truncated = session.as_ref().retry_buffer_truncated();
        let safe = is_safe(&session.req_header().method);
        let retry = if ctx.reroute {
            // it never acted on the request: send it again, if we still have the body
            !truncated
        } else if ctx.response_started || *e.esource() != ErrorSource::Upstream {
            false
        } else if safe {
            // the master died mid-request before answering: GET/HEAD/OPTIONS repeat
            // safely. Whether it is gone shows on the retry's connect (refused) or on the
            // re-check; an error on one connection alone does not fail it over.
            if !client_reused {
                if let Some(m) = &ctx.master {
                    self.shared.suspect(&m.id);
                }
            }
            !truncated
        } else {
            // an unsafe request that may have reached a master is never replayed
            false
        };
        if retry {
            self.shared
                .metrics
                .upstream_retries
                .with_label_values(&[if ctx.reroute {
                    "not_active"
                } else {
                    "upstream_error"
                }])
                .inc();
        }
        e.set_retry(retry);
        e
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let code = match e.etype() {
            ErrorType::HTTPStatus(c) => *c,
            ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed
                if *e.esource() == ErrorSource::Downstream =>
            {
                0 // the client is gone
            }
            ErrorType::InvalidHTTPHeader | ErrorType::H1Error | ErrorType::H2Error
                if *e.esource() == ErrorSource::Downstream =>
            {
                400
            }
            ErrorType::ReadTimedout if *e.esource() == ErrorSource::Downstream => 408,
            _ if *e.esource() == ErrorSource::Downstream => 400,
            // upstream trouble that could not be hidden, internal errors
            _ => 503,
        };
        // A refusal for fairness is an answer like any other: the connection stays open
        // (its body is drained), so a refused client does not pay a new handshake.
        let keep_alive = code == 429;
        let mut written = 0;
        if code > 0 && session.response_written().is_none() {
            let message = match code {
                503 => format!("no active master could take the request: {e}"),
                _ => e.to_string(),
            };
            let body = status_body(code, reason_for(code), &message);
            let mut resp = match ResponseHeader::build(code, Some(4)) {
                Ok(r) => r,
                Err(_) => ResponseHeader::build(500, Some(4)).expect("500 is valid"),
            };
            let _ = resp.insert_header("Content-Type", "application/json");
            let _ = resp.insert_header("Content-Length", body.len().to_string());
            if code == 503 || code == 429 {
                let _ = resp.insert_header("Retry-After", "1");
            }
            let _ = resp.insert_header("Cache-Control", "no-store");
            if !keep_alive {
                session.set_keepalive(None);
            }
            let ok = session
                .write_response_header(Box::new(resp), false)
                .await
                .is_ok()
                && session.write_response_body(Some(body), true).await.is_ok();
            if ok {
                written = code;
            }
        }
        ctx.error_code = Some(if written > 0 { written } else { code });
        FailToProxy {
            error_code: code,
            can_reuse_downstream: keep_alive && written > 0,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        self.release_fd(ctx);
        let code = session
            .response_written()
            .map(|r| r.status.as_u16())
            .or(ctx.error_code)
            .unwrap_or(0);
        let m = &self.shared.metrics;
        m.count_request(code);
        m.request_duration
            .observe(ctx.start.elapsed().as_secs_f64());
        if let Some(e) = e {
            tracing::debug!(code, error = %e, attempts = ctx.attempts, "request failed");
        }
    }

    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        ctx: &Ctx,
        error: &Error,
        context: ProxyWarnLogContext,
    ) -> bool {
        // retries are the normal way failover is hidden: counted in
        // ballast_proxy_upstream_retries_total, logged at debug only
        if matches!(context, ProxyWarnLogContext::UpstreamRetry) {
            tracing::debug!(attempt = ctx.attempts, error = %error, "retrying on the next active master");
            return true;
        }
        false
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &Ctx, error: &Error) -> bool {
        // answered by us (413, held-request 503: logged and counted elsewhere), the
        // client went away, or a stream cut on failover/shutdown (counted in metrics)
        (matches!(error.etype(), ErrorType::HTTPStatus(_)) && ctx.error_code.is_some())
            || ctx.error_code == Some(0)
            || (ctx.stream && ctx.response_started)
    }
}

/// Ordinary requests still in flight to a master this long after it stopped being the
/// routed one are cut (reads are then retried on the new master; writes get 503).
pub(crate) const IN_FLIGHT_GRACE: Duration = Duration::from_secs(2);

/// Close open streams and idle upstream connections to the former active master when
/// another master becomes the active one; cut requests still waiting on the former one
/// after [`IN_FLIGHT_GRACE`] (it may be frozen and never answer).
///
/// A spell with no active master closes nothing by itself: if the same master is routed
/// to again (a health check that timed out under load), its streams are still good. A
/// dead master's connections are dead anyway, and a deposed one ends its own watches
/// when it loses its leader token. (Closing on every "no active" made an overloaded new
/// active flap: 5 000 nodes' watches closed, re-opened at once, the master's health
/// check timed out again, and so on, for ~8 s after a failover.)
pub(crate) async fn close_stale_connections(
    shared: Arc<Shared>,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut rx = shared.routing();
    let mut last: Option<String> = rx.borrow_and_update().active.as_ref().map(|a| a.id.clone());
    loop {
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = cancel.cancelled() => return,
        }
        let Some(now) = rx.borrow_and_update().active.as_ref().map(|a| a.id.clone()) else {
            continue;
        };
        if last.as_ref() == Some(&now) {
            continue;
        }
        if last.is_some() {
            let closed = close_others(&shared, &now, false);
            if closed > 0 {
                tracing::info!(
                    closed,
                    "closed streams and idle connections to the old master"
                );
            }
            let shared = shared.clone();
            let cancel = cancel.clone();
            let switched_to = now.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(IN_FLIGHT_GRACE) => {}
                    _ = cancel.cancelled() => return,
                }
                let keep = shared.current().active.map_or(switched_to, |a| a.id);
                let closed = close_others(&shared, &keep, true);
                if closed > 0 {
                    tracing::warn!(
                        closed,
                        "cut requests still waiting on a former active master"
                    );
                }
            });
        }
        last = Some(now);
    }
}

/// Close connections to masters other than `keep` (see `Conns::close_except`) and
/// count them in `ballast_proxy_streams_closed_total`.
fn close_others(shared: &Shared, keep: &str, in_flight: bool) -> u64 {
    shared
        .conns
        .close_except(Some(keep), in_flight, &shared.metrics.streams_closed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_detection() {
        assert!(is_stream(Some("watch=true")));
        assert!(is_stream(Some("labelSelector=a&watch=1")));
        assert!(is_stream(Some("follow=true&container=c")));
        assert!(!is_stream(Some("watch=false")));
        assert!(!is_stream(Some("limit=500")));
        assert!(!is_stream(None));
    }

    #[test]
    fn status_body_is_a_kubernetes_status() {
        let b = status_body(503, "ServiceUnavailable", "no master");
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["kind"], "Status");
        assert_eq!(v["code"], 503);
        assert_eq!(v["reason"], "ServiceUnavailable");
        assert_eq!(v["details"]["retryAfterSeconds"], 1);
    }
}
