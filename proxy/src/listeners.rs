//! One set of the proxy's listeners on one set of addresses: the API (pingora's threads,
//! or the L4 forwarder), the DNS responder (UDP and TCP) and the admin endpoint. A proxy
//! runs one set on its own addresses all the time and, while it holds the VIP, a second
//! one on the VIP's addresses ([`crate::vip`]).

use std::future::IntoFuture;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use ballast_config::tls::{ClientAuth, Identity, NodeTls, TlsError};
use ballast_config::ProxyMode;
use nix::sys::socket::SockaddrStorage;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{ListenerConfig, TlsAccept};
use pingora::protocols::l4::stream::L4BufferSettings;
use pingora::protocols::tls::TlsRef;
use pingora::server::configuration::ServerConf;
use pingora::server::{Fds, ListenFds};
use pingora::services::Service as _;
use pingora::utils::tls::CertKey;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::checker::ActiveCheck;
use crate::settings::Addrs;
use crate::state::Shared;
use crate::upgrade::{Header, Inherited, Outgoing};
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
    /// Their sockets, for an upgrade.
    handed: Outgoing,
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

/// Bound (or inherited) listening sockets, not yet served.
struct Sockets {
    admin: tokio::net::TcpListener,
    dns_udp: tokio::net::UdpSocket,
    dns_tcp: tokio::net::TcpListener,
    /// One per API accept thread (HTTP mode), or the one L4 listener.
    api: Vec<OwnedFd>,
}

impl Sockets {
    /// Bind all three (an address in use is an error, nothing is left bound).
    async fn bind(addrs: Addrs, mode: ProxyMode) -> Result<Self, ProxyError> {
        let admin = tokio::net::TcpListener::bind(addrs.admin)
            .await
            .map_err(|source| ProxyError::Bind {
                what: "admin",
                addr: addrs.admin,
                source,
            })?;
        let (dns_udp, dns_tcp, _) = bind_dns(addrs.dns).await?;
        let bind_err = |source| ProxyError::Bind {
            what: "API",
            addr: addrs.api,
            source,
        };
        // Without SO_REUSEPORT first: the API sockets below share their address with
        // each other, and must not with any other process.
        let api_addr = {
            let probe = std::net::TcpListener::bind(addrs.api).map_err(bind_err)?;
            probe.local_addr().unwrap_or(addrs.api)
        };
        let count = match mode {
            ProxyMode::Http => api_threads(),
            ProxyMode::Tcp => 1,
        };
        let api = (0..count)
            .map(|_| api_socket(api_addr, mode == ProxyMode::Http))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(bind_err)?;
        Ok(Self {
            admin,
            dns_udp,
            dns_tcp,
            api,
        })
    }

    /// The sockets a previous proxy handed over.
    fn adopt(i: Inherited) -> Result<Self, ProxyError> {
        let err = |what| move |source| ProxyError::Adopt { what, source };
        let tcp = |fd: OwnedFd, what| {
            let l = std::net::TcpListener::from(fd);
            l.set_nonblocking(true).map_err(err(what))?;
            tokio::net::TcpListener::from_std(l).map_err(err(what))
        };
        let udp = std::net::UdpSocket::from(i.dns_udp);
        udp.set_nonblocking(true).map_err(err("DNS (UDP)"))?;
        Ok(Self {
            admin: tcp(i.admin, "admin")?,
            dns_udp: tokio::net::UdpSocket::from_std(udp).map_err(err("DNS (UDP)"))?,
            dns_tcp: tcp(i.dns_tcp, "DNS (TCP)")?,
            api: i.api,
        })
    }
}

/// Make descriptor `fd` refer to a fresh non-blocking socket on the loopback with an
/// ephemeral port (listening, for TCP), which no client knows.
#[allow(unsafe_code)]
fn replace_with_unreachable(fd: RawFd, udp: bool, v4: bool) -> std::io::Result<()> {
    let any: SocketAddr = if v4 {
        ([127, 0, 0, 1], 0).into()
    } else {
        (std::net::Ipv6Addr::LOCALHOST, 0).into()
    };
    let stand_in: OwnedFd = if udp {
        let s = std::net::UdpSocket::bind(any)?;
        s.set_nonblocking(true)?;
        s.into()
    } else {
        let l = std::net::TcpListener::bind(any)?;
        l.set_nonblocking(true)?;
        l.into()
    };
    // SAFETY: `fd` is open (its listener serves until this process stops) and dup2
    // atomically makes it refer to `stand_in`'s socket; the listener that owns `fd` keeps
    // owning it and closes it as before. `stand_in`'s own descriptor closes on drop.
    let r = unsafe { libc::dup2(stand_in.as_raw_fd(), fd) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// An API listening socket on `addr`, non-blocking; with `reuseport`, one of several.
fn api_socket(addr: SocketAddr, reuseport: bool) -> std::io::Result<OwnedFd> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(reuseport)?;
    socket.bind(addr)?;
    let listener = socket.listen(LISTEN_BACKLOG)?.into_std()?;
    listener.set_nonblocking(true)?;
    Ok(OwnedFd::from(listener))
}

/// The API's accept queue per socket (pingora's own default).
const LISTEN_BACKLOG: u32 = 65535;

/// One API accept thread per core, at most 8.
fn api_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 8))
}

impl Listeners {
    /// Serve on the current tokio runtime (the API on threads of its own): on `addrs`,
    /// or on the sockets a previous proxy handed over (`inherited`, see
    /// [`crate::upgrade`]).
    pub(crate) async fn start(
        what: &'static str,
        addrs: Addrs,
        s: &Serving,
        inherited: Option<Inherited>,
    ) -> Result<Self, ProxyError> {
        let sockets = match inherited {
            Some(i) => Sockets::adopt(i)?,
            None => Sockets::bind(addrs, s.mode).await?,
        };
        let admin_addr = sockets.admin.local_addr().unwrap_or(addrs.admin);
        let dns_addr = sockets.dns_udp.local_addr().unwrap_or(addrs.dns);
        let api_addr = sockets
            .api
            .first()
            .and_then(|fd| nix::sys::socket::getsockname::<SockaddrStorage>(fd.as_raw_fd()).ok())
            .and_then(|a| crate::state::sockaddr_to_std(&a))
            .unwrap_or(addrs.api);
        let handed = Outgoing {
            header: Header {
                addrs: Addrs {
                    api: api_addr,
                    dns: dns_addr,
                    admin: admin_addr,
                },
                mode: s.mode,
                api_sockets: sockets.api.len(),
            },
            fds: [
                sockets.admin.as_raw_fd(),
                sockets.dns_udp.as_raw_fd(),
                sockets.dns_tcp.as_raw_fd(),
            ]
            .into_iter()
            .chain(sockets.api.iter().map(AsRawFd::as_raw_fd))
            .collect(),
        };
        let Sockets {
            admin: admin_listener,
            dns_udp: udp,
            dns_tcp: tcp_dns,
            api,
        } = sockets;

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
            ProxyMode::Http => spawn_io_threads(s, api_addr, api, shutdown_rx, stop.clone())?,
            ProxyMode::Tcp => {
                let fd = api.into_iter().next().expect("one L4 listener");
                let listener = tokio::net::TcpListener::from_std(fd.into()).map_err(|source| {
                    ProxyError::Adopt {
                        what: "API",
                        source,
                    }
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
            addrs: handed.header.addrs,
            handed,
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

    /// Stop taking new connections and queries after a successor took these sockets
    /// over, while the connections already accepted go on. Each handed-over descriptor
    /// is replaced in place (`dup2`) by a socket nobody reaches: this process's accept
    /// loops then find nothing to accept, and the shared sockets, with their queues,
    /// belong to the successor alone. (Stopping pingora's accept loop instead would also
    /// drop every connection that was accepted but whose request has not arrived yet.)
    pub(crate) fn leave_sockets(&self) {
        for (i, &fd) in self.handed.fds.iter().enumerate() {
            // descriptor 1 is the DNS UDP socket (see `start`)
            let udp = i == 1;
            if let Err(e) = replace_with_unreachable(fd, udp, self.addrs.api.is_ipv4()) {
                tracing::warn!(fd, error = %e, "cannot leave a handed-over socket; it stays shared until exit");
            }
        }
    }

    /// What an upgrade hands over: these listeners' sockets (valid while they serve).
    pub(crate) fn outgoing(&self) -> Outgoing {
        Outgoing {
            header: self.handed.header.clone(),
            fds: self.handed.fds.clone(),
        }
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
    sockets: Vec<OwnedFd>,
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
    let mut handles = Vec::with_capacity(sockets.len());
    for (i, socket) in sockets.into_iter().enumerate() {
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
                watch_client: watch_client(tls, s.shared.settings().source_ip())?,
            },
            "ballast-proxy",
        );
        // pingora serves on the socket bound (or inherited) for this thread: it takes it
        // from the table by address instead of binding.
        let fds: ListenFds = Arc::new(parking_lot::Mutex::new(Fds::new()));
        fds.lock().add(api.to_string(), socket.into_raw_fd());
        // No L4 read buffer on client connections: pingora's default (64 KiB each) sat
        // allocated under every idle watch — 1 000 hollow nodes' streams held 205 MB of
        // proxy RSS, 133 MB without — and requests are read into pingora's own header
        // and body buffers anyway (one copy less; throughput unchanged or better).
        let endpoint = ListenerConfig::tcp(api.to_string())
            .tls(tls_settings()?)
            .l4_buffer(L4BufferSettings::default().read(0));
        service.add_listener(endpoint);
        let shutdown = shutdown.clone();
        let stop = stop.clone();
        let handle = std::thread::Builder::new()
            .name(format!("ballast-api-{i}"))
            .spawn(move || {
                rt.block_on(async move {
                    service.start_service(Some(fds), shutdown, 1).await;
                    // keep serving the requests already accepted until the grace is over
                    stop.cancelled().await;
                });
            })
            .map_err(ProxyError::Runtime)?;
        handles.push(handle);
    }
    Ok(handles)
}

/// The client of the resumed watches: the proxy's certificate, the cluster CA, and no
/// pooled connection left idle (a watch holds its connection for its whole life).
fn watch_client(tls: &NodeTls, source: Option<IpAddr>) -> Result<reqwest::Client, ProxyError> {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls.client_config()?)
        .no_proxy()
        .local_address(source)
        .pool_max_idle_per_host(0)
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .build()
        .map_err(|e| ProxyError::Tls(TlsError::Verifier(format!("watch client: {e}"))))
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
