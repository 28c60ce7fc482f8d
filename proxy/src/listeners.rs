//! One set of the proxy's listeners on one set of addresses: the API (pingora's threads,
//! or the L4 forwarder), the DNS responder (UDP and TCP) and the admin endpoint. A proxy
//! runs one set on its own addresses all the time and, while it holds the VIP, a second
//! one on the VIP's addresses ([`crate::vip`]).

use std::future::IntoFuture;
use std::net::SocketAddr;
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

use crate::checker::ActiveCheck;
use crate::settings::Addrs;
use crate::state::Shared;
use crate::{admin, dns, proxy, tcp, ProxyError};

/// What every set of listeners serves with.
#[derive(Clone)]
pub(crate) struct Serving {
    pub shared: Arc<Shared>,
    pub check: Arc<dyn ActiveCheck>,
    pub tls: NodeTls,
    pub mode: ProxyMode,
}

/// Running listeners (see the module docs).
pub(crate) struct Listeners {
    /// Where each one really is (port 0 resolved).
    pub addrs: Addrs,
    pingora_shutdown: tokio::sync::watch::Sender<bool>,
    dns_shutdown: CancellationToken,
    /// Stops the admin endpoint, the L4 forwarder and the API threads.
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// The API proxy's threads (see [`spawn_io_threads`]).
    io_threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.stop.cancel();
        self.dns_shutdown.cancel();
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Listeners {
    /// Bind all three (an address in use is an error, nothing is left bound) and serve
    /// on the current tokio runtime (the API on threads of its own).
    pub(crate) async fn start(
        what: &'static str,
        addrs: Addrs,
        s: &Serving,
    ) -> Result<Self, ProxyError> {
        let admin_listener =
            tokio::net::TcpListener::bind(addrs.admin)
                .await
                .map_err(|source| ProxyError::Bind {
                    what: "admin",
                    addr: addrs.admin,
                    source,
                })?;
        let admin_addr = admin_listener.local_addr().unwrap_or(addrs.admin);
        let (udp, tcp_dns, dns_addr) = bind_dns(addrs.dns).await?;
        // make sure the API address is free before pingora binds it (pingora panics in
        // its own task instead of returning an error)
        let api_addr = {
            let probe =
                std::net::TcpListener::bind(addrs.api).map_err(|source| ProxyError::Bind {
                    what: "API",
                    addr: addrs.api,
                    source,
                })?;
            probe.local_addr().unwrap_or(addrs.api)
        };

        let mut tasks = Vec::new();
        let stop = CancellationToken::new();
        let mut dns_server = hickory_server::Server::new(dns::DnsHandler {
            shared: s.shared.clone(),
        });
        dns_server.register_socket(udp);
        dns_server.register_listener(tcp_dns, Duration::from_secs(5), 64 * 1024);
        let dns_shutdown = dns_server.shutdown_token().clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = dns_server.block_until_done().await {
                tracing::error!(error = %e, "DNS responder stopped");
            }
        }));

        let app = admin::router(s.shared.clone());
        let admin_stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let serve = axum::serve(admin_listener, app)
                .with_graceful_shutdown(admin_stop.cancelled_owned())
                .into_future();
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "admin endpoint stopped");
            }
        }));

        let (pingora_shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
        let io_threads = match s.mode {
            ProxyMode::Http => spawn_io_threads(s, api_addr, shutdown_rx, stop.clone())?,
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
                    s.shared.clone(),
                    stop.clone(),
                )));
                Vec::new()
            }
        };
        let me = Self {
            addrs: Addrs {
                api: api_addr,
                dns: dns_addr,
                admin: admin_addr,
            },
            pingora_shutdown,
            dns_shutdown,
            stop,
            tasks,
            io_threads,
        };
        if !wait_listening(api_addr).await {
            return Err(ProxyError::NotListening {
                what: "API",
                addr: api_addr,
            });
        }
        tracing::info!(listeners = what, api = %api_addr, dns = %dns_addr, admin = %admin_addr,
            mode = ?s.mode, "serving");
        Ok(me)
    }

    /// Stop accepting new connections and DNS queries; what is open goes on.
    pub(crate) fn stop_accepting(&self) {
        let _ = self.pingora_shutdown.send(true);
        self.dns_shutdown.cancel();
    }

    /// Stop everything now, open connections included, and wait (briefly) for the
    /// threads.
    pub(crate) async fn stop(mut self) {
        self.stop_accepting();
        self.stop.cancel();
        let io_threads = std::mem::take(&mut self.io_threads);
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
        for t in std::mem::take(&mut self.tasks) {
            if tokio::time::timeout(Duration::from_millis(200), t)
                .await
                .is_err()
            {
                tracing::debug!("a proxy task did not stop in time");
            }
        }
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
    s: &Serving,
    api: SocketAddr,
    shutdown: tokio::sync::watch::Receiver<bool>,
    stop: CancellationToken,
) -> Result<Vec<std::thread::JoinHandle<()>>, ProxyError> {
    let tls = &s.tls;
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
                shared: s.shared.clone(),
                check: s.check.clone(),
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
