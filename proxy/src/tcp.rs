//! L4 passthrough (`proxy.mode = "tcp"`, the kubeadm guide's HAProxy `mode tcp`): each
//! client connection is joined byte for byte to the active master, and TLS runs end to
//! end between the client and that master (whose certificate carries the proxy's names).
//!
//! What the proxy still does: it picks the active master per connection, holds a new
//! connection while no master is active (`proxy.hold`, like a request in HTTP mode), tries
//! the next active master when a connect is refused, and closes its connections to a
//! master that is no longer the active one (clients reconnect, and reach the new one).
//! What it cannot do, since it never sees a request: retry a read that was in flight when
//! a master died, tell a read from a write, or answer 503 with `Retry-After`: such a
//! client sees its connection close and retries by itself (kubectl does).

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::state::Shared;

/// How long connecting to a master may take before the next one is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Accept connections on `listener` until `cancel`.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        let (client, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                () = forward(&shared, client) => {}
            }
            tracing::trace!(%peer, "connection done");
        });
    }
}

/// Connect to `to` from `source` (the proxy's own address) when given.
async fn connect(source: Option<IpAddr>, to: SocketAddr) -> std::io::Result<TcpStream> {
    let Some(ip) = source else {
        return TcpStream::connect(to).await;
    };
    let socket = if to.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(ip, 0))?;
    socket.connect(to).await
}

/// Join one client connection to the active master.
async fn forward(shared: &Shared, mut client: TcpStream) {
    let _in_flight = shared.request_guard();
    let metrics = &shared.metrics;
    if let Err(e) = client.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    let deadline = tokio::time::Instant::now() + shared.settings().proxy.hold.timeout;
    let (master, mut upstream) = loop {
        let active = match shared.wait_active(deadline).await {
            Ok(a) => a,
            Err(e) => {
                tracing::info!(error = %e, "held connection closed");
                metrics.hold_timeouts.inc();
                metrics.count_connection("no_active_master");
                return;
            }
        };
        match tokio::time::timeout(
            CONNECT_TIMEOUT,
            connect(shared.settings().source_ip(), active.addr),
        )
        .await
        {
            Ok(Ok(up)) => break (active, up),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                // the master's process is gone: route away now, try the next one
                shared.mark_down(&active.id);
            }
            Ok(Err(_)) | Err(_) => {
                shared.suspect(&active.id);
                if tokio::time::Instant::now() >= deadline {
                    metrics.count_connection("connect_failed");
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        metrics
            .upstream_retries
            .with_label_values(&["connect"])
            .inc();
    };
    if let Err(e) = upstream.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    let fd = upstream.as_raw_fd();
    // every connection is a stream here: closed when another master becomes active
    shared.conns.begin(fd, &master.id, master.addr, true);
    metrics.count_connection("forwarded");
    let copied = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    shared.conns.forget(fd);
    if let Err(e) = copied {
        tracing::debug!(master = %master.id, error = %e, "connection ended");
    }
}
