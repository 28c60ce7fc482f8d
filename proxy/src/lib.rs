//! The Ballast proxy: routes every API request to the active master (pingora), the
//! DNS responder for the cluster zone (hickory-server) and the admin endpoint
//! (`/metrics`, `/status`).
//!
//! Layout:
//! - [`health`]: pure health state (rise/fall hysteresis, term ordering) → [`health::Routing`];
//! - [`checker`]: the `/active` health checks feeding it;
//! - [`state`]: what everything shares (settings, published routing, hold queue, connections);
//! - [`proxy`]: the pingora `ProxyHttp` (hold, re-route, retry rules, stream closing);
//! - [`tcp`]: the L4 passthrough mode (`proxy.mode = "tcp"`);
//! - [`dns`]: zone answers and the hickory request handler;
//! - [`admin`]: the admin HTTP endpoint;
//! - this file: startup, signals (SIGTERM/SIGINT stop, SIGHUP reloads) and shutdown.

pub mod admin;
pub mod checker;
pub mod dns;
pub mod health;
pub mod metrics;
pub mod proxy;
pub mod state;
pub mod tcp;

#[cfg(test)]
mod e2e_tests;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ballast_config::tls::{ClientAuth, Identity, NodeTls, TlsError};
use ballast_config::ProxyMode;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{ListenerConfig, TlsAccept};
use pingora::protocols::l4::stream::L4BufferSettings;
use pingora::protocols::tls::TlsRef;
use pingora::server::configuration::ServerConf;
use pingora::services::Service as _;
use pingora::utils::tls::CertKey;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::checker::{ActiveCheck, HttpActiveCheck};
use crate::state::{Settings, Shared};

/// Errors that end (or refuse to start) the proxy. None of them goes away by retrying
/// at once, except a bind error whose address is released by another process.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Config(#[from] ballast_config::ConfigError),
    #[error("cannot bind the proxy {what} address {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("proxy {what} on {addr} did not start listening")]
    NotListening {
        what: &'static str,
        addr: SocketAddr,
    },
    #[error("invalid DNS zone {zone:?} in proxy.dns_zone: {message}")]
    Zone { zone: String, message: String },
    #[error("cannot start the proxy's async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signal(#[source] std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
}

impl ProxyError {
    /// Whether starting again (unchanged) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ProxyError::Bind { .. } | ProxyError::NotListening { .. }
        )
    }
}

/// Run the proxy from the config at `path` until SIGTERM/SIGINT. Blocking: the proxy
/// owns its runtime and signal handling. SIGHUP reloads the config.
pub fn run(path: &Path) -> Result<(), ProxyError> {
    let loaded = ballast_config::load(path)?;
    for w in &loaded.warnings {
        tracing::warn!(config = %path.display(), "{w}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ballast-proxy")
        .enable_all()
        .build()
        .map_err(ProxyError::Runtime)?;
    let path: PathBuf = path.to_path_buf();
    let result = rt.block_on(async move {
        let settings = Settings::from_cluster(&loaded.config);
        let grace = settings.proxy.shutdown_grace;
        let tls = loaded.node_tls(&loaded.config.proxy.id)?;
        let check = Arc::new(HttpActiveCheck::new(&tls)?);
        let running = Running::start(settings, check, tls).await?;
        signal_loop(&running, &path).await?;
        running.shutdown(grace).await;
        Ok(())
    });
    // streams still open after the grace period are cut here
    rt.shutdown_timeout(Duration::from_millis(200));
    result
}

async fn signal_loop(running: &Running, path: &Path) -> Result<(), ProxyError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(ProxyError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ProxyError::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(ProxyError::Signal)?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); return Ok(()) }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); return Ok(()) }
            _ = hup.recv() => { running.reload(path); }
        }
    }
}

/// A started proxy: API, DNS, admin, health checkers.
pub struct Running {
    pub shared: Arc<Shared>,
    /// Where each listener really is (the config's addresses).
    pub api: SocketAddr,
    pub dns: SocketAddr,
    pub admin: SocketAddr,
    cancel: CancellationToken,
    pingora_shutdown: tokio::sync::watch::Sender<bool>,
    dns_shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// The API proxy's threads (see [`spawn_io_threads`]).
    io_threads: Vec<std::thread::JoinHandle<()>>,
    /// Stops the API proxy's threads when the proxy is dropped without `shutdown`.
    _io_stop: tokio_util::sync::DropGuard,
}

impl Running {
    /// Bind everything and start serving on the current tokio runtime.
    pub async fn start(
        settings: Settings,
        check: Arc<dyn ActiveCheck>,
        tls: NodeTls,
    ) -> Result<Self, ProxyError> {
        let px = settings.proxy.clone();
        dns::zone_name(&px.dns_zone).map_err(|e| ProxyError::Zone {
            zone: px.dns_zone.clone(),
            message: e.to_string(),
        })?;
        let shared = Shared::new(settings);
        let cancel = CancellationToken::new();
        let mut tasks = Vec::new();

        // Admin endpoint.
        let admin_listener = tokio::net::TcpListener::bind(px.admin)
            .await
            .map_err(|source| ProxyError::Bind {
                what: "admin",
                addr: px.admin,
                source,
            })?;
        let admin_addr = admin_listener.local_addr().unwrap_or(px.admin);

        // DNS responder, UDP and TCP on the same port.
        let (udp, tcp, dns_addr) = bind_dns(px.dns).await?;

        // API: make sure the address is free before pingora binds it (pingora panics
        // in its own task instead of returning an error).
        let api_addr = {
            let probe = std::net::TcpListener::bind(px.api).map_err(|source| ProxyError::Bind {
                what: "API",
                addr: px.api,
                source,
            })?;
            probe.local_addr().unwrap_or(px.api)
        };

        // Health checkers and the stream closer.
        tasks.push(tokio::spawn(checker::run_checkers(
            shared.clone(),
            check.clone(),
            cancel.clone(),
        )));
        tasks.push(tokio::spawn(proxy::close_stale_connections(
            shared.clone(),
            cancel.clone(),
        )));

        let mut dns_server = hickory_server::Server::new(dns::DnsHandler {
            shared: shared.clone(),
        });
        dns_server.register_socket(udp);
        dns_server.register_listener(tcp, Duration::from_secs(5), 64 * 1024);
        let dns_shutdown = dns_server.shutdown_token().clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = dns_server.block_until_done().await {
                tracing::error!(error = %e, "DNS responder stopped");
            }
        }));

        let admin_cancel = cancel.clone();
        let app = admin::router(shared.clone());
        tasks.push(tokio::spawn(async move {
            let serve = axum::serve(admin_listener, app)
                .with_graceful_shutdown(admin_cancel.cancelled_owned())
                .into_future();
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "admin endpoint stopped");
            }
        }));

        // The pingora proxy service on its own threads, or the L4 forwarder.
        let (pingora_shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
        let io_stop = CancellationToken::new();
        let io_threads = match px.mode {
            ProxyMode::Http => spawn_io_threads(
                &shared,
                &check,
                &tls,
                api_addr,
                shutdown_rx,
                io_stop.clone(),
            )?,
            ProxyMode::Tcp => {
                let listener = tokio::net::TcpListener::bind(api_addr)
                    .await
                    .map_err(|source| ProxyError::Bind {
                        what: "API",
                        addr: api_addr,
                        source,
                    })?;
                tasks.push(tokio::spawn(tcp::serve(
                    listener,
                    shared.clone(),
                    io_stop.clone(),
                )));
                Vec::new()
            }
        };
        wait_listening(api_addr)
            .await
            .then_some(())
            .ok_or(ProxyError::NotListening {
                what: "API",
                addr: api_addr,
            })?;

        tracing::info!(api = %api_addr, dns = %dns_addr, admin = %admin_addr,
            zone = %px.dns_zone, mode = ?px.mode, "proxy serving");
        Ok(Self {
            shared,
            api: api_addr,
            dns: dns_addr,
            admin: admin_addr,
            cancel,
            pingora_shutdown,
            dns_shutdown,
            tasks,
            io_threads,
            _io_stop: io_stop.drop_guard(),
        })
    }

    /// Re-read the config (SIGHUP). A bad config is refused and the old one kept.
    pub fn reload(&self, path: &Path) {
        let loaded = match ballast_config::load(path) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "config reload refused; keeping the running config");
                self.shared
                    .metrics
                    .config_reloads
                    .with_label_values(&["error"])
                    .inc();
                return;
            }
        };
        let new = Settings::from_cluster(&loaded.config);
        if let Err(e) = dns::zone_name(&new.proxy.dns_zone) {
            tracing::error!(error = %e, "config reload refused: bad proxy.dns_zone");
            self.shared
                .metrics
                .config_reloads
                .with_label_values(&["error"])
                .inc();
            return;
        }
        self.apply(new);
        self.shared
            .metrics
            .config_reloads
            .with_label_values(&["ok"])
            .inc();
    }

    /// Apply new settings (masters, health timings, hold limits, DNS zone and TTL).
    /// Listener addresses cannot move without a restart.
    pub fn apply(&self, mut new: Settings) {
        let old = self.shared.settings();
        for (what, was, now) in [
            ("proxy.api", old.proxy.api, new.proxy.api),
            ("proxy.dns", old.proxy.dns, new.proxy.dns),
            ("proxy.admin", old.proxy.admin, new.proxy.admin),
        ] {
            if was != now {
                tracing::warn!(key = what, %was, %now, "address change needs a restart; keeping the old one");
            }
        }
        if old.proxy.mode != new.proxy.mode {
            tracing::warn!(was = ?old.proxy.mode, now = ?new.proxy.mode, "proxy.mode change needs a restart; keeping the old one");
        }
        new.proxy.api = old.proxy.api;
        new.proxy.dns = old.proxy.dns;
        new.proxy.admin = old.proxy.admin;
        new.proxy.mode = old.proxy.mode;
        if *old == new {
            tracing::info!("config reloaded, nothing changed");
            return;
        }
        tracing::info!(masters = new.masters.len(), "config reloaded");
        self.shared.set_settings(new);
    }

    /// Stop accepting, close streams, give open requests up to `grace`, then stop.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.pingora_shutdown.send(true);
        self.dns_shutdown.cancel();
        // streams never end on their own: close them now so clients reconnect elsewhere
        self.shared
            .conns
            .close_except(None, false, &self.shared.metrics.streams_closed);
        let deadline = tokio::time::Instant::now() + grace;
        while self.shared.in_flight() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.shared.in_flight() > 0 {
            tracing::warn!(
                open = self.shared.in_flight(),
                "shutdown grace over; cutting open requests"
            );
        }
        self.cancel.cancel();
        drop(self._io_stop);
        let io_threads = self.io_threads;
        let joined = tokio::task::spawn_blocking(move || {
            for t in io_threads {
                let _ = t.join();
            }
        });
        if tokio::time::timeout(Duration::from_millis(500), joined)
            .await
            .is_err()
        {
            tracing::debug!("an API proxy thread did not stop in time");
        }
        for t in self.tasks {
            if tokio::time::timeout(Duration::from_millis(200), t)
                .await
                .is_err()
            {
                tracing::debug!("a proxy task did not stop in time");
            }
        }
        tracing::info!("proxy stopped");
    }
}

/// Start the API proxy: one thread per core, each with its own single-threaded tokio
/// runtime, its own `SO_REUSEPORT` listener on `api` (the kernel spreads connections
/// over them) and its own pingora service, so its own upstream connection pool. A
/// request, and the pooled connection it reuses, never leave the thread that accepted
/// the client: no cross-thread wake-ups per request (pingora hands every connection it
/// returns to its pool to a new idle-watch task, and with a shared runtime or pool that
/// task and the next request using the connection run on different threads). Each
/// thread runs until `stop` (after the shutdown grace), so requests in flight when
/// `shutdown` flips can finish.
fn spawn_io_threads(
    shared: &Arc<Shared>,
    check: &Arc<dyn ActiveCheck>,
    tls: &NodeTls,
    api: SocketAddr,
    shutdown: tokio::sync::watch::Receiver<bool>,
    stop: CancellationToken,
) -> Result<Vec<std::thread::JoinHandle<()>>, ProxyError> {
    let conf = Arc::new(ServerConf {
        max_retries: 32,
        upstream_keepalive_pool_size: 256,
        // the masters' certificates are verified against the cluster CA only
        ca_file: Some(tls.ca_path.display().to_string()),
        ..ServerConf::default()
    });
    let client_cert = Arc::new(CertKey::new(tls.chain_der(), tls.key_der()));
    let verifier = tls.client_verifier(ClientAuth::Optional)?;
    let tls_settings = || -> Result<TlsSettings, ProxyError> {
        let bad = |what: &str, e: Box<pingora::Error>| {
            ProxyError::Tls(TlsError::Verifier(format!("{what}: {e}")))
        };
        let mut t = TlsSettings::with_callbacks(Box::new(IdentityCallback))
            .map_err(|e| bad("TLS settings", e))?;
        t.set_certificate_chain_file(&tls.cert_path.display().to_string())
            .map_err(|e| bad("certificate", e))?;
        t.set_private_key_file(&tls.key_path.display().to_string())
            .map_err(|e| bad("key", e))?;
        t.set_client_cert_verifier(verifier.clone());
        Ok(t)
    };
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 8));
    let mut handles = Vec::with_capacity(threads);
    for i in 0..threads {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ProxyError::Runtime)?;
        let mut service = pingora::proxy::http_proxy_service_with_name(
            &conf,
            proxy::BallastProxy {
                shared: shared.clone(),
                check: check.clone(),
                client_cert: client_cert.clone(),
            },
            "ballast-proxy",
        );
        let mut sock = pingora::listeners::TcpSocketOptions::default();
        sock.so_reuseport = Some(true);
        // No L4 read buffer on client connections: pingora's default (64 KiB each) sat
        // allocated under every idle watch — 1 000 hollow nodes' streams held 205 MB of
        // proxy RSS, 133 MB without — and requests are read into pingora's own header
        // and body buffers anyway (one copy less; throughput unchanged or better).
        let endpoint = ListenerConfig::tcp(api.to_string())
            .tcp_socket_options(sock)
            .tls(tls_settings()?)
            .l4_buffer(L4BufferSettings::default().read(0));
        service.add_listener(endpoint);
        let shutdown = shutdown.clone();
        let stop = stop.clone();
        let handle = std::thread::Builder::new()
            .name(format!("ballast-api-{i}"))
            .spawn(move || {
                rt.block_on(async move {
                    service.start_service(None, shutdown, 1).await;
                    // keep serving the requests already accepted until the grace is over
                    stop.cancelled().await;
                });
            })
            .map_err(ProxyError::Runtime)?;
        handles.push(handle);
    }
    Ok(handles)
}

/// Keeps the identity of a client certificate the handshake verified, for the request
/// phases (`proxy::client_identity`).
struct IdentityCallback;

#[async_trait::async_trait]
impl TlsAccept for IdentityCallback {
    async fn handshake_complete_callback(
        &self,
        tls: &TlsRef,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        let der = tls.peer_certificate_der()?;
        let id = Identity::from_certificate(&der.to_vec().into())?;
        Some(Arc::new(id))
    }
}

/// Bind UDP and TCP on the same address. Port 0 picks a port free for both.
async fn bind_dns(
    addr: SocketAddr,
) -> Result<(tokio::net::UdpSocket, tokio::net::TcpListener, SocketAddr), ProxyError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let udp = tokio::net::UdpSocket::bind(addr)
            .await
            .map_err(|source| ProxyError::Bind {
                what: "DNS (UDP)",
                addr,
                source,
            })?;
        let bound = udp.local_addr().unwrap_or(addr);
        match tokio::net::TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp, bound)),
            Err(e)
                if addr.port() == 0
                    && e.kind() == std::io::ErrorKind::AddrInUse
                    && attempts < 20 =>
            {
                continue
            }
            Err(source) => {
                return Err(ProxyError::Bind {
                    what: "DNS (TCP)",
                    addr: bound,
                    source,
                })
            }
        }
    }
}

async fn wait_listening(addr: SocketAddr) -> bool {
    let connect_to = if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(connect_to).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
