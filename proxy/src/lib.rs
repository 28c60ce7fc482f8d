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
//! - [`listeners`]: one set of API, DNS and admin listeners on one set of addresses;
//! - [`lease`]: who holds the VIP (pure); [`vip`]: the lease loop, serving on the VIP;
//!   [`vip_address`]: the VIP on a real interface (netlink, kernel lifetime, gratuitous ARP);
//! - [`dns`]: zone answers and the hickory request handler; [`peers`]: which of several
//!   proxies are alive (they all answer DNS and list each other);
//! - [`admin`]: the admin HTTP endpoint;
//! - this file: startup, signals (SIGTERM/SIGINT stop, SIGHUP reloads) and shutdown.

mod admin;
mod checker;
mod dns;
mod fairness;
#[doc(hidden)]
pub mod fuzzing;
mod health;
mod lease;
mod listeners;
mod liveness;
mod metrics;
mod peers;
mod proxy;
mod resume;
mod settings;
mod state;
mod tcp;
pub mod upgrade;
mod vip;
mod vip_address;

#[cfg(test)]
mod e2e_tests;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ballast_config::tls::{NodeTls, TlsError};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::checker::{ActiveCheck, HttpActiveCheck};
use crate::listeners::{Listeners, Serving};
use crate::settings::{Addrs, Settings};
use crate::state::Shared;

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
    #[error(transparent)]
    UnknownProxy(#[from] settings::UnknownProxy),
    #[error("cannot serve on the {what} socket handed over: {source}")]
    Adopt {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Upgrade(#[from] upgrade::UpgradeError),
    #[error("cannot listen for upgrades on {}: {source}", .path.display())]
    UpgradeSocket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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

/// After an upgrade, how long the old proxy keeps answering on its open connections
/// (each answer closing its connection) before it stops.
const HAND_OVER_WINDOW: Duration = Duration::from_secs(1);

/// How a proxy process starts with respect to one already running ([`upgrade`]).
pub struct Succession {
    /// Where this proxy listens for its successor (and, with `take_over`, where the
    /// running proxy it replaces listens).
    pub socket: PathBuf,
    /// Take the listening sockets of the proxy serving at `socket` instead of binding,
    /// and stop it once this one serves.
    pub take_over: bool,
    /// Called once this proxy serves (after the predecessor was told to stop).
    pub on_serving: Option<Box<dyn FnOnce() + Send>>,
}

/// Run proxy `id` (one of `[[proxies]]`; `None`: the one `[proxy]`) from the config at
/// `path` until SIGTERM/SIGINT, or until a successor took its sockets over. Blocking:
/// the proxy owns its runtime and signal handling. SIGHUP reloads the config.
pub fn run(path: &Path, id: Option<&str>, mut succession: Succession) -> Result<(), ProxyError> {
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
        let settings = Settings::from_cluster(&loaded.config, id)?;
        let grace = settings.proxy.shutdown_grace;
        let tls = loaded.node_tls(&settings.proxy.id)?;
        let check = Arc::new(HttpActiveCheck::new(&tls, settings.source_ip())?);
        let (inherited, predecessor) = if succession.take_over {
            let (path, mode) = (succession.socket.clone(), settings.proxy.mode);
            let want = settings.own_addrs();
            let received =
                tokio::task::spawn_blocking(move || upgrade::receive(&path, &want, mode))
                    .await
                    .map_err(|e| ProxyError::Runtime(std::io::Error::other(e)))??;
            (Some(received.0), Some(received.1))
        } else {
            (None, None)
        };
        let running = Running::start_with(settings, check, tls, inherited).await?;
        if let Some(stream) = predecessor {
            // The predecessor stops accepting once told; until then both accept.
            upgrade::confirm(stream).map_err(|source| ProxyError::UpgradeSocket {
                path: succession.socket.clone(),
                source,
            })?;
            tracing::info!("took the listening sockets over from the previous proxy");
        }
        // Under systemd (`Type=notify`, `NotifyAccess=all`): this process is the service's
        // main one now, whichever started it. Without NOTIFY_SOCKET this does nothing.
        let main_pid = sd_notify::NotifyState::MainPid(std::process::id());
        if let Err(e) = sd_notify::notify(false, &[main_pid, sd_notify::NotifyState::Ready]) {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
        if let Some(report) = succession.on_serving.take() {
            report();
        }
        let (upgraded_tx, upgraded) = tokio::sync::oneshot::channel();
        let stop_serving_upgrades = CancellationToken::new();
        let outgoing = running.listeners.outgoing();
        let upgrades = upgrade::serve(
            succession.socket.clone(),
            move || outgoing.clone(),
            upgraded_tx,
            stop_serving_upgrades.clone(),
        )
        .map_err(|source| ProxyError::UpgradeSocket {
            path: succession.socket.clone(),
            source,
        })?;
        signal_loop(&running, &path, id, upgraded).await?;
        stop_serving_upgrades.cancel();
        if let Err(e) = upgrades.await {
            tracing::debug!(error = %e, "upgrade listener task");
        }
        running.shutdown(grace).await;
        Ok(())
    });
    // streams still open after the grace period are cut here
    rt.shutdown_timeout(Duration::from_millis(200));
    result
}

async fn signal_loop(
    running: &Running,
    path: &Path,
    id: Option<&str>,
    mut upgraded: tokio::sync::oneshot::Receiver<()>,
) -> Result<(), ProxyError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(ProxyError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ProxyError::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(ProxyError::Signal)?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); return Ok(()) }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); return Ok(()) }
            _ = hup.recv() => { running.reload(path, id); }
            Ok(()) = &mut upgraded => {
                tracing::info!("a new proxy took the sockets over: closing kept-alive connections, then shutting down");
                running.listeners.leave_sockets();
                running.shared.hand_over();
                // Clients that keep a connection open send their next request within
                // this window, get `Connection: close` with the answer and reconnect to
                // the new proxy; only connections idle the whole window are cut.
                tokio::time::sleep(HAND_OVER_WINDOW).await;
                return Ok(());
            }
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
    tasks: Vec<JoinHandle<()>>,
    listeners: Listeners,
    /// The VIP loop (it lets go of the VIP when cancelled).
    vip: Option<(CancellationToken, JoinHandle<()>)>,
}

impl Running {
    /// Bind everything and start serving on the current tokio runtime.
    pub async fn start(
        settings: Settings,
        check: Arc<dyn ActiveCheck>,
        tls: NodeTls,
    ) -> Result<Self, ProxyError> {
        Self::start_with(settings, check, tls, None).await
    }

    /// [`Running::start`], on the sockets a previous proxy handed over when given.
    pub(crate) async fn start_with(
        settings: Settings,
        check: Arc<dyn ActiveCheck>,
        tls: NodeTls,
        inherited: Option<upgrade::Inherited>,
    ) -> Result<Self, ProxyError> {
        let px = settings.proxy.clone();
        dns::zone_name(&px.dns_zone).map_err(|e| ProxyError::Zone {
            zone: px.dns_zone.clone(),
            message: e.to_string(),
        })?;
        let vip_settings = settings.vip.clone();
        let shared = Shared::new(settings);
        let cancel = CancellationToken::new();
        let serving = Serving {
            shared: shared.clone(),
            check: check.clone(),
            tls,
            mode: px.mode,
        };
        let addrs = Addrs {
            api: px.api,
            dns: px.dns,
            admin: px.admin,
        };
        let listeners = Listeners::start("own", addrs, &serving, inherited).await?;
        // Health checkers and the stream closer.
        let tasks = vec![
            tokio::spawn(checker::run_checkers(
                shared.clone(),
                check.clone(),
                cancel.clone(),
            )),
            tokio::spawn(proxy::close_stale_connections(
                shared.clone(),
                cancel.clone(),
            )),
        ];
        let mut tasks = tasks;
        if shared.settings().proxies.len() > 1 {
            tasks.push(tokio::spawn(peers::run(shared.clone(), cancel.clone())));
        }
        let vip = vip_settings.map(|v| {
            let stop = CancellationToken::new();
            let task = tokio::spawn(vip::run(serving.clone(), v, stop.clone()));
            (stop, task)
        });
        tracing::info!(id = %px.id, zone = %px.dns_zone, "proxy serving");
        Ok(Self {
            shared,
            api: listeners.addrs.api,
            dns: listeners.addrs.dns,
            admin: listeners.addrs.admin,
            cancel,
            tasks,
            listeners,
            vip,
        })
    }

    /// Re-read the config (SIGHUP). A bad config is refused and the old one kept.
    pub fn reload(&self, path: &Path, id: Option<&str>) {
        let new = ballast_config::load(path)
            .map_err(|e| e.to_string())
            .and_then(|l| Settings::from_cluster(&l.config, id).map_err(|e| e.to_string()))
            .and_then(|s| match dns::zone_name(&s.proxy.dns_zone) {
                Ok(_) => Ok(s),
                Err(e) => Err(format!("bad proxy.dns_zone: {e}")),
            });
        let result = match new {
            Ok(new) => {
                self.apply(new);
                "ok"
            }
            Err(e) => {
                tracing::error!(error = %e, "config reload refused; keeping the running config");
                "error"
            }
        };
        self.shared
            .metrics
            .config_reloads
            .with_label_values(&[result])
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
        if old.vip != new.vip {
            tracing::warn!("a [vip] change needs a restart; keeping the old one");
        }
        new.vip = old.vip.clone();
        if *old == new {
            tracing::info!("config reloaded, nothing changed");
            return;
        }
        tracing::info!(masters = new.masters.len(), "config reloaded");
        self.shared.set_settings(new);
    }

    /// Stop accepting, close streams, give open requests up to `grace`, then stop.
    pub async fn shutdown(self, grace: Duration) {
        // the VIP first: the next holder takes over while this proxy drains
        if let Some((stop, task)) = self.vip {
            stop.cancel();
            if tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .is_err()
            {
                tracing::warn!("the VIP loop did not stop in time");
            }
        }
        self.listeners.stop_accepting();
        // streams never end on their own: close them now so clients reconnect elsewhere
        self.shared
            .conns
            .close_except(None, false, &self.shared.metrics.streams_closed);
        self.shared.streams_end.cancel();
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
        self.listeners.stop().await;
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
