//! The Ballast master: replicated state store, Kubernetes-compatible API,
//! controllers, scheduler, and the `/active` report.
//!
//! Module layout:
//! - [`store`]: the etcd-like key-value state machine and the [`store::Store`] interface.
//! - [`raft`]: the Raft group (openraft), [`raft::RaftStore`], and the active-master
//!   fencing with [`raft::Leadership`] / [`raft::LeaderToken`].
//! - [`server`]: `/livez`, `/readyz`, `/active`, `/metrics`, `/internal/kv`, and the
//!   active-only gate in front of the Kubernetes API.
//! - [`metrics`]: the Prometheus registry.
//!
//! Starting a master: [`Master::start`] opens the data dir, starts Raft and the peer
//! server, and returns a [`MasterHandle`]; build the Kubernetes API router from
//! [`MasterHandle::store`] (an `Arc<dyn Store>`) and pass it to [`MasterHandle::serve`].

mod api;
mod auth;
mod clock;
mod controllers;
#[doc(hidden)]
pub mod fuzzing;
mod metrics;
mod raft;
mod scheduler;
mod server;
mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use ballast_config::listener::TlsListener;
use ballast_config::tls::{ClientAuth, NodeTls, TlsError};
use ballast_config::LoadedConfig;
use tokio_util::sync::CancellationToken;

use crate::metrics::MasterMetrics;
use crate::raft::{Leadership, RaftNode, RaftStartError, RaftStore};
use crate::server::{build_router, ServerState};
use crate::store::Store;

/// Errors that end a master process.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error("unknown master id `{0}` (not in the config's [[masters]])")]
    UnknownId(String),
    #[error("cannot bind {what} address {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("raft: {0}")]
    Raft(#[from] RaftStartError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// Raft stopped by itself (its storage failed: a full disk, an I/O error). The
    /// process ends with it; a service manager starts it again (`Restart=on-failure`),
    /// and it rejoins from what it had persisted once the fault is gone.
    #[error("{0}")]
    RaftStopped(String),
    #[error("{0}")]
    Other(String),
}

/// Entry point to start a master.
pub struct Master;

/// A started master (Raft running, peer address served); call [`MasterHandle::serve`]
/// to serve the API address.
pub struct MasterHandle {
    /// This master's id (`m1`).
    pub id: String,
    /// The Raft-backed store.
    pub raft_store: Arc<RaftStore>,
    /// Leadership: `is_active()`, `subscribe()` to [`raft::LeaderToken`]s.
    pub leadership: Leadership,
    /// This master's Prometheus metrics (register more in `metrics.registry`).
    pub metrics: Arc<MasterMetrics>,
    /// The loaded cluster config.
    pub config: LoadedConfig,
    /// Cancelled when the master must stop.
    pub shutdown: CancellationToken,
    /// This master's certificate, key and the cluster CA.
    pub tls: NodeTls,
    /// Authentication (token file) and authorization (RBAC over this store).
    pub auth: auth::Auth,
    /// Each identity's API requests in flight (`[limits] max_requests_in_flight_per_user`).
    fairness: Arc<auth::fairness::Fairness>,
    /// Why Raft stopped by itself, once it has (then `shutdown` is cancelled).
    raft_stopped: Arc<std::sync::OnceLock<String>>,
    /// API requests whose handlers are running (drained before Raft stops).
    in_flight: server::InFlight,
    node: RaftNode,
    api_listener: tokio::net::TcpListener,
}

impl Master {
    /// Bind the API address, open the data dir and start Raft (and the peer server, which
    /// stops with `shutdown` too).
    pub async fn start(
        config: LoadedConfig,
        id: String,
        shutdown: CancellationToken,
    ) -> Result<MasterHandle, MasterError> {
        Self::start_with(config, id, shutdown.clone(), shutdown).await
    }

    /// [`Master::start`] with the peer server stopped by `peer_stop` (or by
    /// [`MasterHandle::serve`] just before Raft stops).
    pub async fn start_with(
        config: LoadedConfig,
        id: String,
        shutdown: CancellationToken,
        peer_stop: CancellationToken,
    ) -> Result<MasterHandle, MasterError> {
        let me = config
            .config
            .master(&id)
            .ok_or_else(|| MasterError::UnknownId(id.clone()))?
            .clone();
        let api_listener = listen(me.api).map_err(|source| MasterError::Bind {
            what: "api",
            addr: me.api,
            source,
        })?;
        let tls = config.node_tls(&id)?;
        let tokens = match config.token_file() {
            Some(path) => auth::tokens::TokenFile::load(&path)
                .map_err(|e| MasterError::Other(format!("auth.token_file: {e}")))?,
            None => auth::tokens::TokenFile::default(),
        };
        let metrics = Arc::new(MasterMetrics::new(&id));
        // Raft (core, peer server, peer clients, lease bookkeeping) runs on a runtime of its
        // own, so a busy API cannot delay heartbeats and cost the active master its lease.
        let rt = raft_runtime();
        let node = {
            let (config, id, tls, metrics, shutdown) = (
                config.clone(),
                id.clone(),
                tls.clone(),
                metrics.clone(),
                shutdown.clone(),
            );
            rt.spawn(async move {
                RaftNode::start(&config, &id, &tls, metrics, shutdown, peer_stop).await
            })
            .await
            .map_err(|e| MasterError::Other(format!("raft start task failed: {e}")))??
        };
        let leadership = node.leadership.clone();
        let raft_store = Arc::new(RaftStore::new(
            node.raft.clone(),
            node.applied.clone(),
            leadership.clone(),
            node.timings.write_timeout,
            metrics.store_batch_writes.clone(),
        ));
        let raft_stopped = Arc::new(std::sync::OnceLock::new());
        {
            let _raft = rt.enter();
            let data = config.master_data_dir(&me);
            let stopped = StopOnFatal {
                why: raft_stopped.clone(),
                data,
                stop: shutdown.clone(),
            };
            spawn_watchers(&node, &metrics, shutdown.clone(), stopped);
        }
        let auth = auth::Auth {
            authn: Arc::new(auth::Authenticator::new(tokens)),
            authz: Arc::new(auth::Authorizer::new(raft_store.clone())),
        };
        let fairness = auth::fairness::Fairness::new(&config.config.limits);
        Ok(MasterHandle {
            fairness,
            raft_stopped,
            in_flight: server::InFlight::default(),
            id,
            raft_store,
            leadership,
            metrics,
            config,
            shutdown,
            tls,
            auth,
            node,
            api_listener,
        })
    }
}

/// The process-wide runtime Raft runs on (two threads of its own; never dropped).
fn raft_runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("raft")
            .enable_all()
            .build()
            .expect("cannot start the Raft runtime")
    })
}

/// What to do when Raft stops by itself: record why and stop the master.
struct StopOnFatal {
    why: Arc<std::sync::OnceLock<String>>,
    /// The data dir, named in the error (its `raft.redb` is what failed, or the disk).
    data: std::path::PathBuf,
    stop: CancellationToken,
}

impl StopOnFatal {
    fn raft_stopped(&self, fatal: &impl std::fmt::Display) {
        let why = format!(
            "raft stopped: {fatal} (data dir {}); the master stops",
            self.data.display()
        );
        tracing::error!("{why}");
        // the first cause is the one to report
        let _first = self.why.set(why);
        self.stop.cancel();
    }
}

/// Keep the leadership tokens and the election/leader-change counters up to date, and
/// stop the master when Raft stops by itself.
fn spawn_watchers(
    node: &RaftNode,
    metrics: &Arc<MasterMetrics>,
    shutdown: CancellationToken,
    on_fatal: StopOnFatal,
) {
    let m = metrics.clone();
    let leadership = node.leadership.clone();
    tokio::spawn(leadership.drive(shutdown.clone(), move |active, term| {
        m.active.set(active as i64);
        m.term.set(term as i64);
        if active {
            m.raft_activations.inc();
        }
    }));
    let m = metrics.clone();
    let mut rx = node.raft.metrics();
    tokio::spawn(async move {
        let (mut term, mut leader) = {
            let r = rx.borrow();
            (r.current_term, r.current_leader)
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
            let r = rx.borrow().clone();
            if let Err(fatal) = &r.running_state {
                if !shutdown.is_cancelled() {
                    on_fatal.raft_stopped(fatal);
                }
                return;
            }
            if r.current_term > term {
                m.raft_elections.inc_by(r.current_term - term);
                term = r.current_term;
            }
            if r.current_leader != leader {
                if r.current_leader.is_some() {
                    m.raft_leader_changes.inc();
                }
                tracing::info!(term = r.current_term, leader = ?r.current_leader, state = ?r.state, "raft leader changed");
                leader = r.current_leader;
            }
            m.term.set(r.current_term as i64);
        }
    });
}

impl MasterHandle {
    /// The store as the API layer takes it.
    pub fn store(&self) -> Arc<dyn Store> {
        self.raft_store.clone()
    }

    /// The state the built-in endpoints use (for [`server::build_router`]).
    pub fn server_state(&self) -> ServerState {
        ServerState {
            leadership: self.leadership.clone(),
            store: self.raft_store.clone(),
            metrics: self.metrics.clone(),
            internal_kv: self.config.config.control.internal_kv,
            auth: self.auth.clone(),
            fairness: self.fairness.clone(),
            in_flight: self.in_flight.clone(),
        }
    }

    /// Serve the API address until `shutdown`: the built-in endpoints plus `extra` (the
    /// Kubernetes API; answered only while active). Then stop Raft.
    pub async fn serve(self, extra: Router) -> Result<(), MasterError> {
        let app = build_router(self.server_state(), extra);
        let api = self.api_listener.local_addr().ok();
        tracing::info!(id = %self.id, api = ?api, "master serving");
        // Client certificates are optional here: bearer tokens, the proxy's forwarded
        // identities and anonymous health checks arrive without one.
        let config = self.tls.server_config(ClientAuth::Optional)?;
        let limits = &self.config.config.limits;
        let listener = TlsListener::new(
            self.api_listener,
            config,
            "api",
            None,
            limits.max_connections,
        )
        .map_err(|e| MasterError::Other(format!("api listener: {e}")))?;
        let sd = self.shutdown.clone();
        let server =
            ballast_config::listener::serve(listener, app, limits.header_read_timeout, sd.clone());
        // Requests being handled finish (a write waits at most `write_timeout` for its
        // commit), then their answers get a moment to be written; long-lived streams
        // (watches) do not hold the process: they end with it (the proxy resumes them).
        let (in_flight, drain) = (self.in_flight.clone(), self.node.timings.write_timeout);
        tokio::select! {
            _ = server => {}
            _ = async {
                sd.cancelled().await;
                if !in_flight.drained(drain + Duration::from_secs(1)).await {
                    tracing::warn!("requests still running after {drain:?}; stopping anyway");
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            } => {}
        };
        let res = match self.raft_stopped.get() {
            Some(why) => Err(MasterError::RaftStopped(why.clone())),
            None => Ok(()),
        };
        tracing::info!(id = %self.id, "api server stopped; stopping raft");
        // peers were served until now: a write this master proposed before handing over
        // learned its commit from the next leader
        self.node.peer_stop.cancel();
        if let Err(e) = self.node.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        tracing::info!(id = %self.id, "raft stopped");
        res
    }
}

/// Run master `id` until `shutdown` is cancelled: Raft, the built-in endpoints and the
/// Kubernetes API (answered only while active).
pub async fn run(
    config: LoadedConfig,
    id: String,
    shutdown: CancellationToken,
) -> Result<(), MasterError> {
    // Everything stops on `stop`; a signal (`shutdown`) first hands the leadership over
    // while the peer address still serves (see `raft/handover.rs`).
    let stop = CancellationToken::new();
    let handle = Master::start_with(config, id, stop.clone(), CancellationToken::new()).await?;
    {
        let handover = handle.node.handover.clone();
        let id = handle.id.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            let started = std::time::Instant::now();
            match handover.run().await {
                raft::handover::Outcome::NotLeader => {}
                raft::handover::Outcome::HandedOver { to } => tracing::info!(
                    id = %id,
                    to,
                    ms = started.elapsed().as_millis() as u64,
                    "handed the leadership over before stopping"
                ),
                raft::handover::Outcome::Failed(why) => tracing::warn!(
                    id = %id,
                    %why,
                    "could not hand the leadership over; the others elect after the lease"
                ),
            }
            stop.cancel();
        });
    }
    let cfg = &handle.config.config;
    let mut info = api::ApiInfo::new(handle.id.clone());
    info.server_address = cfg.proxy.api.to_string();
    let own_api = cfg.master(&handle.id).map(|m| m.api);
    info.logs = Some(Arc::new(api::logs::KubeletLogProxy::new(
        &handle.tls,
        cfg,
        own_api.and_then(ballast_config::source_ip),
    )?));
    info.limits = cfg.limits.clone();
    let kube = api::router(handle.store(), info, handle.auth.clone());
    scheduler::spawn(
        handle.store(),
        handle.leadership.clone(),
        handle.shutdown.clone(),
    );
    controllers::spawn(
        handle.store(),
        handle.leadership.clone(),
        cfg.control.clone(),
        handle.shutdown.clone(),
    );
    handle.serve(kube).await
}

/// Bind a listener with a deep accept queue: thousands of nodes (re)connecting through
/// the proxy at once must not overflow it (tokio's `bind` uses 1024; the kernel caps it
/// at `net.core.somaxconn`).
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(8192)
}
