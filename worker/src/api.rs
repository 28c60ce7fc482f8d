//! A small Kubernetes API client: JSON over reqwest along the configured [`Route`], with
//! error classification (retry helps or not), the error counter, and a never-give-up
//! retry loop for the calls a worker must eventually make.

use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use ballast_config::tls::{NodeTls, TlsError};

use crate::metrics::Metrics;
use crate::route::{Route, RouteError};

/// A failed API call.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("{method} {url}: {source} (will retry)")]
    Transport {
        method: Method,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{method} {path}: HTTP {code}: {message}")]
    Status {
        method: Method,
        path: String,
        code: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("{method} {path}: cannot decode the answer: {source} (a retry will not help)")]
    Decode {
        method: Method,
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("stopped while waiting for the API")]
    Cancelled,
}

impl ApiError {
    /// Whether the same call may succeed later (connection trouble, no active master...).
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            ApiError::Route(_) | ApiError::Transport { .. } => true,
            ApiError::Status { code, .. } => *code >= 500 || *code == 429 || *code == 409,
            ApiError::Decode { .. } | ApiError::Cancelled => false,
        }
    }
    pub(crate) fn code(&self) -> Option<u16> {
        match self {
            ApiError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
    pub(crate) fn is_not_found(&self) -> bool {
        self.code() == Some(404)
    }
    pub(crate) fn is_conflict(&self) -> bool {
        self.code() == Some(409)
    }
    pub(crate) fn is_gone(&self) -> bool {
        self.code() == Some(410)
    }
    fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
    /// Whether this is worth counting as an API error (not a normal 404/409 answer).
    fn counts(&self) -> bool {
        !matches!(self.code(), Some(404 | 409 | 410)) && !matches!(self, ApiError::Cancelled)
    }
}

/// The API client of one worker (or of every hollow node of one process).
pub(crate) struct Api {
    route: Route,
    http: reqwest::Client,
    watch_http: reqwest::Client,
    metrics: Metrics,
}

/// Timeout of one ordinary call; the proxy holds calls while no master is active, and a
/// retry is cheap.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

impl Api {
    /// A client presenting `tls`'s certificate; it verifies the API's certificate against
    /// the cluster CA and the URL's host, or, on a DNS route, the route's name (the
    /// address is then a DNS answer: the active master, whose certificate carries the
    /// name).
    ///
    /// Calls leave from `source` (the worker's own address) when given.
    pub(crate) fn new(
        route: Route,
        metrics: Metrics,
        tls: &NodeTls,
        source: Option<IpAddr>,
    ) -> Result<Self, TlsError> {
        let config = match &route {
            Route::Url(_) => tls.client_config()?,
            Route::Dns { name, .. } => tls.client_config_for_name(name)?,
        };
        let base = || {
            reqwest::Client::builder()
                .use_preconfigured_tls(config.clone())
                .no_proxy()
                .local_address(source)
                .connect_timeout(Duration::from_secs(2))
                .pool_idle_timeout(Duration::from_secs(30))
                .user_agent("ballast-worker")
        };
        let build = |b: reqwest::ClientBuilder| {
            b.build()
                .map_err(|e| TlsError::Verifier(format!("API client: {e}")))
        };
        Ok(Self {
            route,
            http: build(base().timeout(CALL_TIMEOUT))?,
            watch_http: build(base())?,
            metrics,
        })
    }

    /// A client without TLS, for unit tests against in-process fakes.
    #[cfg(test)]
    pub(crate) fn plain(route: Route, metrics: Metrics) -> Self {
        Self {
            route,
            http: reqwest::Client::builder()
                .timeout(CALL_TIMEOUT)
                .build()
                .expect("http client"),
            watch_http: reqwest::Client::new(),
            metrics,
        }
    }

    pub(crate) fn route(&self) -> &Route {
        &self.route
    }

    fn note<T>(&self, r: Result<T, ApiError>) -> Result<T, ApiError> {
        if let Err(e) = &r {
            if e.counts() {
                self.metrics.api_errors.inc();
            }
            let reroute = match e {
                ApiError::Transport { .. } => true,
                ApiError::Status { code, .. } => *code == 503,
                _ => false,
            };
            if reroute {
                self.route.invalidate();
            }
        }
        r
    }

    async fn start(
        &self,
        client: &reqwest::Client,
        method: Method,
        path: &str,
        body: Option<(&'static str, Vec<u8>)>,
    ) -> Result<reqwest::Response, ApiError> {
        let base = self.route.base_url().await?;
        let url = format!("{base}{path}");
        let mut req = client
            .request(method.clone(), &url)
            .header("accept", "application/json");
        if let Some((ct, b)) = body {
            req = req.header("content-type", ct).body(b);
        }
        let resp = req.send().await.map_err(|source| ApiError::Transport {
            method: method.clone(),
            url: url.clone(),
            source,
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| {
                v.get("message")
                    .and_then(|m| m.as_str())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| text.chars().take(300).collect());
        Err(ApiError::Status {
            method,
            path: path.to_string(),
            code: status.as_u16(),
            message,
            retry_after,
        })
    }

    /// One call; the answer's body.
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Vec<u8>)>,
    ) -> Result<Bytes, ApiError> {
        let r = async {
            let resp = self.start(&self.http, method.clone(), path, body).await?;
            resp.bytes().await.map_err(|source| ApiError::Transport {
                method,
                url: path.to_string(),
                source,
            })
        }
        .await;
        self.note(r)
    }

    fn decode<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        b: &[u8],
    ) -> Result<T, ApiError> {
        let r = serde_json::from_slice(b).map_err(|source| ApiError::Decode {
            method,
            path: path.to_string(),
            source,
        });
        self.note(r)
    }

    pub(crate) async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let b = self.call(Method::GET, path, None).await?;
        self.decode(Method::GET, path, &b)
    }

    async fn send_json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        ct: &'static str,
        body: &impl Serialize,
    ) -> Result<T, ApiError> {
        let bytes = serde_json::to_vec(body).expect("serializable body");
        let b = self.call(method.clone(), path, Some((ct, bytes))).await?;
        self.decode(method, path, &b)
    }

    pub(crate) async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ApiError> {
        self.send_json(Method::POST, path, "application/json", body)
            .await
    }

    pub(crate) async fn put<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ApiError> {
        self.send_json(Method::PUT, path, "application/json", body)
            .await
    }

    pub(crate) async fn merge_patch<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ApiError> {
        self.send_json(Method::PATCH, path, "application/merge-patch+json", body)
            .await
    }

    pub(crate) async fn delete(&self, path: &str, body: &impl Serialize) -> Result<(), ApiError> {
        let bytes = serde_json::to_vec(body).expect("serializable body");
        self.call(Method::DELETE, path, Some(("application/json", bytes)))
            .await
            .map(|_| ())
    }

    /// Open a watch stream (no overall timeout: the caller bounds each read).
    pub(crate) async fn watch(&self, path: &str) -> Result<reqwest::Response, ApiError> {
        let r = self.start(&self.watch_http, Method::GET, path, None).await;
        self.note(r)
    }

    /// Count a failure seen while reading a stream.
    pub(crate) fn stream_failed(&self) {
        self.metrics.api_errors.inc();
        self.route.invalidate();
    }
}

/// Exponential back-off between retries: 100 ms doubling to 2 s.
#[derive(Debug, Clone)]
pub(crate) struct RetryDelay {
    next: Duration,
}

impl Default for RetryDelay {
    fn default() -> Self {
        Self {
            next: Duration::from_millis(100),
        }
    }
}

impl RetryDelay {
    pub(crate) const MAX: Duration = Duration::from_secs(2);

    /// The next delay (at least `hint`, e.g. a `Retry-After`).
    pub(crate) fn next(&mut self, hint: Option<Duration>) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        hint.map_or(d, |h| h.min(Self::MAX * 2).max(d))
    }
    pub(crate) fn reset(&mut self) {
        *self = Self::default();
    }
}

/// Run `f` until it succeeds or fails for good; retryable failures are retried with
/// back-off, forever (until `shutdown`).
pub(crate) async fn retry<T, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    mut f: F,
) -> Result<T, ApiError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ApiError>>,
{
    let mut delay = RetryDelay::default();
    let mut failures = 0u32;
    loop {
        if shutdown.is_cancelled() {
            return Err(ApiError::Cancelled);
        }
        let r = tokio::select! {
            r = f() => r,
            _ = shutdown.cancelled() => return Err(ApiError::Cancelled),
        };
        match r {
            Ok(v) => {
                if failures > 0 {
                    tracing::info!(what, failures, "API call succeeded after retries");
                }
                return Ok(v);
            }
            Err(e) if e.is_retryable() => {
                failures += 1;
                let d = delay.next(e.retry_after());
                if failures == 1 || failures % 20 == 0 {
                    tracing::warn!(what, error = %e, failures, "API call failed; retrying");
                }
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = shutdown.cancelled() => return Err(ApiError::Cancelled),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_and_honours_retry_after() {
        let mut d = RetryDelay::default();
        let v: Vec<u64> = (0..7).map(|_| d.next(None).as_millis() as u64).collect();
        assert_eq!(v, vec![100, 200, 400, 800, 1600, 2000, 2000]);
        d.reset();
        assert_eq!(d.next(Some(Duration::from_secs(1))), Duration::from_secs(1));
        assert_eq!(
            d.next(Some(Duration::from_secs(60))),
            Duration::from_secs(4)
        );
    }

    #[test]
    fn classification() {
        let st = |code| ApiError::Status {
            method: Method::GET,
            path: "/x".into(),
            code,
            message: String::new(),
            retry_after: None,
        };
        assert!(st(503).is_retryable());
        assert!(st(409).is_retryable());
        assert!(!st(404).is_retryable());
        assert!(!st(422).is_retryable());
        assert!(st(410).is_gone());
        assert!(!st(404).counts());
        assert!(st(503).counts());
    }
}
