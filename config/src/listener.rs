//! A TLS listener for axum: TCP accepts, TLS handshakes (each in its own task, bounded in
//! time and number, so a slow or silent client never holds up the others), and the
//! verified client identity of each connection as axum's connect info ([`PeerInfo`]).
//!
//! A server that must refuse some verified clients outright (the masters' peer port
//! accepts masters only) passes an `admit` check: a refused connection is closed right
//! after the handshake, before any application code reads a byte of it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::tls::{peer_identity, Identity};

/// A handshake not done in this long is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many handshakes run at once; further connections wait in the kernel's
/// accept queue.
pub const MAX_HANDSHAKES: usize = 1024;

/// Who is at the other end of a connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    /// The verified client certificate's identity; `None` without a certificate.
    pub identity: Option<Arc<Identity>>,
}

/// Decides whether a verified connection may reach the application.
pub type Admit = Arc<dyn Fn(&PeerInfo) -> bool + Send + Sync>;

/// Accepts TLS connections on a TCP listener (see the module docs).
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, PeerInfo)>,
    local: SocketAddr,
    accept_task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl TlsListener {
    /// Serve TLS with `config` on `tcp`. `what` names the listener in logs.
    pub fn new(
        tcp: TcpListener,
        config: Arc<ServerConfig>,
        what: &'static str,
        admit: Option<Admit>,
    ) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let accept_task =
            tokio::spawn(accept_loop(tcp, TlsAcceptor::from(config), what, admit, tx));
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
    tx: mpsc::Sender<(TlsStream<TcpStream>, PeerInfo)>,
) {
    let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (stream, addr) = match tcp.accept().await {
            Ok(s) => s,
            Err(e) => {
                // e.g. out of file descriptors: back off instead of spinning
                tracing::warn!(listener = what, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(listener = what, error = %e, "cannot set TCP_NODELAY");
        }
        let (acceptor, admit, tx) = (acceptor.clone(), admit.clone(), tx.clone());
        tokio::spawn(async move {
            let _permit = permit;
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
            // the receiver is gone only when the server stopped
            let _ = tx.send((tls, info)).await;
        });
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = PeerInfo;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // the accept loop ended (the semaphore never closes): serve nothing more
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<PeerInfo> {
        Ok(PeerInfo {
            addr: self.local,
            identity: None,
        })
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for PeerInfo {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}
