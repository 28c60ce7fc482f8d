//! The HTTPS servers of masters and workers: TCP accepts, TLS handshakes (each in its
//! own task, bounded in time, so a slow or silent client never holds up the others), the
//! verified client identity of each connection as axum's connect info ([`PeerInfo`]), and
//! HTTP/1.1 served by [`serve`] with a header read timeout.
//!
//! What one client can hold is bounded (`[limits]` in the config): a listener holds at
//! most `max_connections` connections, handshakes included, and closes any beyond that as
//! soon as it accepts it (so the kernel's accept queue never fills behind idle sockets
//! and new clients are still answered); a connection that does not complete a request
//! head within `header_read_timeout` (half-sent requests, idle keep-alive) is closed.
//!
//! A server that must refuse some verified clients outright (the masters' peer port
//! accepts masters only) passes an `admit` check: a refused connection is closed right
//! after the handshake, before any application code reads a byte of it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::tls::{peer_identity, Identity};

/// A handshake not done in this long is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is at the other end of a connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    /// The verified client certificate's identity; `None` without a certificate.
    pub identity: Option<Arc<Identity>>,
}

/// Decides whether a verified connection may reach the application.
pub type Admit = Arc<dyn Fn(&PeerInfo) -> bool + Send + Sync>;

/// A TLS connection that holds one of its listener's connection slots while it lives.
pub struct Conn {
    tls: TlsStream<TcpStream>,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

/// Accepts TLS connections on a TCP listener (see the module docs).
pub struct TlsListener {
    ready: mpsc::Receiver<(Conn, PeerInfo)>,
    local: SocketAddr,
    accept_task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl TlsListener {
    /// Serve TLS with `config` on `tcp`, at most `max_connections` at once. `what` names
    /// the listener in logs.
    pub fn new(
        tcp: TcpListener,
        config: Arc<ServerConfig>,
        what: &'static str,
        admit: Option<Admit>,
        max_connections: usize,
    ) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let slots = Arc::new(Semaphore::new(max_connections));
        let acceptor = TlsAcceptor::from(config);
        let accept_task = tokio::spawn(accept_loop(tcp, acceptor, what, admit, slots, tx));
        Ok(Self {
            ready,
            local,
            accept_task,
        })
    }
}

async fn accept_loop(
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    what: &'static str,
    admit: Option<Admit>,
    slots: Arc<Semaphore>,
    tx: mpsc::Sender<(Conn, PeerInfo)>,
) {
    let mut refused: u64 = 0;
    loop {
        let (stream, addr) = match tcp.accept().await {
            Ok(s) => s,
            Err(e) => {
                // e.g. out of file descriptors: back off instead of spinning
                tracing::warn!(listener = what, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Full: close it now rather than leave it (and everyone behind it) waiting.
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(listener = what, peer = %addr, refused,
                    "connection refused: the listener holds its maximum of connections");
            }
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(listener = what, error = %e, "cannot set TCP_NODELAY");
        }
        let (acceptor, admit, tx) = (acceptor.clone(), admit.clone(), tx.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(listener = what, peer = %addr, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(listener = what, peer = %addr, "TLS handshake timed out");
                    return;
                }
            };
            let info = PeerInfo {
                addr,
                identity: peer_identity(tls.get_ref().1).map(Arc::new),
            };
            if let Some(admit) = &admit {
                if !admit(&info) {
                    tracing::warn!(listener = what, peer = %addr,
                        user = info.identity.as_ref().map(|i| i.user.as_str()),
                        "connection refused: not an allowed identity");
                    return;
                }
            }
            // The receiver is gone only when the server stopped: nothing to serve then.
            let conn = Conn { tls, _slot: slot };
            if tx.send((conn, info)).await.is_err() {
                tracing::debug!(listener = what, "connection dropped: the server stopped");
            }
        });
    }
}

impl TlsListener {
    /// The next verified connection; pending forever once the accept loop ended.
    async fn next(&mut self) -> (Conn, PeerInfo) {
        match self.ready.recv().await {
            Some(conn) => conn,
            None => std::future::pending().await,
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

/// Serve `app` over HTTP/1.1 on `listener` until `shutdown` fires, then stop accepting,
/// let every connection finish its request in flight, and return once all have closed.
/// Each request carries its connection's [`PeerInfo`] as `ConnectInfo<PeerInfo>`.
pub async fn serve(
    mut listener: TlsListener,
    app: Router,
    header_read_timeout: Duration,
    shutdown: CancellationToken,
) {
    let conns = TaskTracker::new();
    loop {
        let (conn, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            c = listener.next() => c,
        };
        let (app, shutdown) = (app.clone(), shutdown.clone());
        conns.spawn(async move {
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(peer.clone()));
                    let mut app = app.clone();
                    tower_service::Service::call(&mut app, req.map(axum::body::Body::new))
                },
            );
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .keep_alive(true);
            let conn = http
                .serve_connection(TokioIo::new(conn), service)
                .with_upgrades();
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    conns.close();
    conns.wait().await;
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    fn server_config() -> Arc<ServerConfig> {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let config = ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
        Arc::new(config)
    }

    #[tokio::test]
    async fn a_connection_beyond_the_limit_is_closed_at_once() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let _listener = TlsListener::new(tcp, server_config(), "test", None, 2).unwrap();
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        // The two silent connections hold both slots (their handshakes wait): a third
        // is closed without a byte, long before the handshake timeout.
        let mut third = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
            .await
            .expect("the third connection is closed at once");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        // The held ones are still open.
        let mut first = held.remove(0);
        let still_open =
            tokio::time::timeout(Duration::from_millis(200), first.read(&mut buf)).await;
        assert!(
            still_open.is_err(),
            "the first connection is still waiting for its handshake"
        );
    }
}
