//! Health checkers: ask every master's `GET /active` at `health.interval` and feed the
//! answers into the shared health table.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_config::tls::{NodeTls, TlsError};
use tokio_util::sync::CancellationToken;

use crate::health::ActiveReport;
use crate::state::Shared;

/// Why one check failed. Every variant is transient: the next check may succeed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("GET https://{addr}/active: {source}")]
    Request {
        addr: SocketAddr,
        #[source]
        source: reqwest::Error,
    },
    #[error("GET https://{addr}/active: timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("GET https://{addr}/active: unexpected status {status}")]
    Status { addr: SocketAddr, status: u16 },
    #[error("GET https://{addr}/active: bad body: {source}")]
    Body {
        addr: SocketAddr,
        #[source]
        source: serde_json::Error,
    },
}

/// Asks one master whether it is active.
#[async_trait::async_trait]
pub trait ActiveCheck: Send + Sync + 'static {
    async fn check(&self, addr: SocketAddr, timeout: Duration) -> Result<ActiveReport, CheckError>;
}

/// The one implementation: HTTPS `GET /active`, reading the JSON body (status 200 or
/// 503). The master's certificate is verified against the cluster CA and its address.
pub(crate) struct HttpActiveCheck {
    client: reqwest::Client,
}

impl HttpActiveCheck {
    /// Checks leave from `source` (the proxy's own address) when given.
    pub(crate) fn new(tls: &NodeTls, source: Option<IpAddr>) -> Result<Self, TlsError> {
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls.client_config()?)
            .no_proxy()
            .local_address(source)
            .pool_max_idle_per_host(1)
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| TlsError::Verifier(format!("health check client: {e}")))?;
        Ok(Self { client })
    }
}

#[async_trait::async_trait]
impl ActiveCheck for HttpActiveCheck {
    async fn check(&self, addr: SocketAddr, timeout: Duration) -> Result<ActiveReport, CheckError> {
        let fut = async {
            let resp = self
                .client
                .get(format!("https://{addr}/active"))
                .send()
                .await
                .map_err(|source| CheckError::Request { addr, source })?;
            let status = resp.status().as_u16();
            if status != 200 && status != 503 {
                return Err(CheckError::Status { addr, status });
            }
            let body = resp
                .bytes()
                .await
                .map_err(|source| CheckError::Request { addr, source })?;
            let report: ActiveReport = serde_json::from_slice(&body)
                .map_err(|source| CheckError::Body { addr, source })?;
            // a 503 never means active, whatever the body says
            Ok(ActiveReport {
                active: report.active && status == 200,
                ..report
            })
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(CheckError::Timeout { addr, timeout }),
        }
    }
}

/// Run one checker task per master until `cancel`; restart them when a reload
/// changes the masters or the health timings.
pub(crate) async fn run_checkers(
    shared: Arc<Shared>,
    check: Arc<dyn ActiveCheck>,
    cancel: CancellationToken,
) {
    loop {
        let round = cancel.child_token();
        let settings = shared.settings();
        let reconfigured = shared.reconfigured.notified();
        tokio::pin!(reconfigured);
        reconfigured.as_mut().enable();
        for (id, addr) in settings.masters.clone() {
            let shared = shared.clone();
            let check = check.clone();
            let round = round.clone();
            let hc = settings.proxy.health.clone();
            tokio::spawn(async move {
                check_loop(shared, check, id, addr, hc.interval, hc.timeout, round).await
            });
        }
        tokio::select! {
            _ = cancel.cancelled() => { round.cancel(); return; }
            _ = &mut reconfigured => {
                tracing::info!("health checkers restarting with reloaded settings");
                round.cancel();
            }
        }
    }
}

async fn check_loop(
    shared: Arc<Shared>,
    check: Arc<dyn ActiveCheck>,
    id: String,
    addr: SocketAddr,
    interval: Duration,
    timeout: Duration,
    cancel: CancellationToken,
) {
    let mut last_err: Option<String> = None;
    loop {
        let recheck = shared.recheck.notified();
        tokio::pin!(recheck);
        recheck.as_mut().enable();
        let started = Instant::now();
        let result = tokio::select! {
            r = check.check(addr, timeout) => r,
            _ = cancel.cancelled() => return,
        };
        match &result {
            Ok(_) => {
                if last_err.take().is_some() {
                    tracing::info!(master = %id, %addr, "health check ok again");
                }
            }
            Err(e) => {
                let msg = e.to_string();
                if last_err.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(master = %id, %addr, error = %msg, "health check failed");
                    last_err = Some(msg);
                }
            }
        }
        shared.observe(&id, started, result.map_err(|_| ()));
        let next = tokio::time::Instant::from_std(started) + interval;
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = &mut recheck => {
                // a request saw a master fail: check now, but not in a busy loop
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            _ = cancel.cancelled() => return,
        }
    }
}
