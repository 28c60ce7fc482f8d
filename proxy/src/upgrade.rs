//! Restart or binary upgrade without dropping a connection: the running proxy hands its
//! listening sockets to its successor over a Unix socket (`SCM_RIGHTS`, as pingora's
//! graceful upgrade does), and stops only once the successor serves on them.
//!
//! Why passing sockets rather than binding again: a listening socket owns the queue of
//! connections the kernel has completed but nobody has accepted yet. Closing it resets
//! them; handing it over keeps the queue, so a connection that arrives at any moment of
//! the switch is accepted by one process or the other. UDP queries waiting in the DNS
//! socket's buffer survive the same way.
//!
//! The exchange, one connection to the old proxy's upgrade socket:
//! 1. the new proxy connects; the old one sends one message: a JSON [`Header`] naming
//!    the addresses and mode, with the file descriptors (admin, DNS UDP, DNS TCP, then
//!    one per API accept thread) attached;
//! 2. the new proxy checks the header against its own config, serves on the sockets
//!    (both processes accept meanwhile, which is harmless: each serves what it accepts),
//!    and writes [`READY`];
//! 3. the old proxy then shuts down as on SIGTERM: lets go of the VIP, stops accepting,
//!    closes streams, drains open requests for `proxy.shutdown_grace` and exits.
//!
//! The new proxy then takes the upgrade socket's path for itself, so the next upgrade
//! finds it.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ballast_config::ProxyMode;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::settings::Addrs;

/// What the successor writes once it serves.
const READY: &[u8] = b"ready\n";
/// How long either side waits for the other at each step.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this many sockets are handed over (3 + the API accept threads, ≤ 8).
const MAX_FDS: usize = 16;

/// Why an upgrade failed. The old proxy keeps serving in every case, so retrying is
/// safe once the cause is fixed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("cannot reach the running proxy's upgrade socket {}: {source} (is it running, with the same --upgrade-socket?)", .path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("upgrade socket {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("upgrade socket {}: the running proxy sent {message}", .path.display())]
    Protocol { path: PathBuf, message: String },
    #[error("the running proxy serves {theirs}, this config says {ours}: addresses and mode must match for an upgrade (restart instead)")]
    Mismatch { theirs: String, ours: String },
}

/// The sockets of one set of listeners, as they travel.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct Header {
    pub addrs: Addrs,
    pub mode: ProxyMode,
    /// How many API sockets follow the first three.
    pub api_sockets: usize,
}

/// Listening sockets taken over from the previous proxy.
#[derive(Debug)]
pub(crate) struct Inherited {
    pub admin: OwnedFd,
    pub dns_udp: OwnedFd,
    pub dns_tcp: OwnedFd,
    /// One per API accept thread (one in L4 mode).
    pub api: Vec<OwnedFd>,
}

/// The raw descriptors a running set of listeners hands over (they stay owned by the
/// listeners; they are only duplicated into the message).
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub header: Header,
    pub fds: Vec<RawFd>,
}

/// The default upgrade socket of proxy `id`: in `$RUNTIME_DIRECTORY` (systemd's
/// `RuntimeDirectory=`) when set, else in the working directory.
pub fn default_socket(id: &str) -> PathBuf {
    let dir = std::env::var_os("RUNTIME_DIRECTORY")
        .map(PathBuf::from)
        .unwrap_or_default();
    dir.join(format!("proxy-{id}.upgrade.sock"))
}

/// Take the sockets of the proxy serving at `path`. Blocking (before the runtime serves).
#[allow(unsafe_code)]
pub(crate) fn receive(
    path: &Path,
    want: &Addrs,
    mode: ProxyMode,
) -> Result<(Inherited, UnixStream), UpgradeError> {
    let io = |source| UpgradeError::Io {
        path: path.to_path_buf(),
        source,
    };
    let stream = UnixStream::connect(path).map_err(|source| UpgradeError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    stream.set_read_timeout(Some(STEP_TIMEOUT)).map_err(io)?;
    let mut buf = vec![0u8; 4096];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (len, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| io(e.into()))?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(|e| io(e.into()))? {
            if let ControlMessageOwned::ScmRights(rights) = c {
                // SAFETY: the kernel just installed these descriptors in this process
                // for this message; nothing else refers to them.
                fds.extend(
                    rights
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        (msg.bytes, fds)
    };
    let protocol = |message: String| UpgradeError::Protocol {
        path: path.to_path_buf(),
        message,
    };
    let header: Header = serde_json::from_slice(&buf[..len])
        .map_err(|e| protocol(format!("an unreadable header: {e}")))?;
    if fds.len() != 3 + header.api_sockets || header.api_sockets == 0 {
        return Err(protocol(format!(
            "{} sockets for {} API sockets",
            fds.len(),
            header.api_sockets
        )));
    }
    if header.addrs != *want || header.mode != mode {
        return Err(UpgradeError::Mismatch {
            theirs: format!("{:?} in {:?} mode", header.addrs, header.mode),
            ours: format!("{want:?} in {mode:?} mode"),
        });
    }
    let mut fds = fds.into_iter();
    let mut next = || fds.next().expect("counted above");
    let inherited = Inherited {
        admin: next(),
        dns_udp: next(),
        dns_tcp: next(),
        api: (0..header.api_sockets).map(|_| next()).collect(),
    };
    Ok((inherited, stream))
}

/// Tell the previous proxy this one serves: it stops accepting and drains.
pub(crate) fn confirm(mut stream: UnixStream) -> std::io::Result<()> {
    stream.write_all(READY)
}

/// Serve upgrade requests at `path` until `cancel`: each hands the sockets `outgoing`
/// gives over, and once the successor confirms, `upgraded` fires (the caller shuts down).
pub(crate) fn serve(
    path: PathBuf,
    outgoing: impl Fn() -> Outgoing + Send + Sync + 'static,
    upgraded: oneshot::Sender<()>,
    cancel: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    // A file left by a proxy that died, or by the one this one replaced (which keeps its
    // listener open on the unlinked name until it exits).
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let mut upgraded = Some(upgraded);
    Ok(tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => break,
                a = listener.accept() => a,
            };
            let stream = match accepted.and_then(|(s, _)| s.into_std()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "upgrade socket");
                    continue;
                }
            };
            let out = outgoing();
            let handed = tokio::task::spawn_blocking(move || hand_over(stream, &out)).await;
            match handed {
                Ok(Ok(())) => {
                    tracing::info!("the new proxy serves on the handed-over sockets: stopping");
                    if let Some(tx) = upgraded.take() {
                        // The receiver is gone only when the proxy already stops.
                        tx.send(()).ok();
                    }
                    break;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "upgrade did not complete; serving on");
                }
                Err(e) => tracing::error!(error = %e, "upgrade task failed; serving on"),
            }
        }
    }))
}

/// Send the sockets and wait for the successor's [`READY`].
fn hand_over(mut stream: UnixStream, out: &Outgoing) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    let header = serde_json::to_vec(&out.header).map_err(std::io::Error::other)?;
    let iov = [IoSlice::new(&header)];
    let rights = [ControlMessage::ScmRights(&out.fds)];
    sendmsg::<()>(stream.as_raw_fd(), &iov, &rights, MsgFlags::empty(), None)?;
    tracing::info!(
        sockets = out.fds.len(),
        "listening sockets handed to a new proxy"
    );
    let mut answer = [0u8; READY.len()];
    stream.read_exact(&mut answer)?;
    if answer != READY {
        return Err(std::io::Error::other("the new proxy did not confirm"));
    }
    Ok(())
}
