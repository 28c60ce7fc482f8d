//! Starting one master's Raft node from the cluster config.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ballast_config::listener::{Admit, PeerInfo, TlsListener};
use ballast_config::tls::{ClientAuth, NodeTls, TlsError};
use ballast_config::{pki, LoadedConfig, RaftConfig};
use openraft::error::{InitializeError, RaftError};
use openraft::{Config, Raft, SnapshotPolicy};
use tokio_util::sync::CancellationToken;

use super::campaign::{self, CampaignConfig};
use super::durable_log::LogStore;
use super::leadership::{Fence, LeaderContact, Leadership};
use super::network::{peer_router, Network, PeerState};
use super::state_machine::StateMachine;
use super::{Node, NodeId, TypeConfig};
use crate::metrics::MasterMetrics;
use crate::store::Applied;

/// Why a Raft node could not start. None of these are helped by retrying at once,
/// except [`RaftStartError::Bind`] when the old process still holds the port.
#[derive(Debug, thiserror::Error)]
pub enum RaftStartError {
    #[error("unknown master id `{0}` (not in the config's [[masters]])")]
    UnknownId(String),
    #[error("invalid [raft] timings: {0}")]
    Config(String),
    #[error("cannot create data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the Raft log {path}: {source} (a damaged log cannot be trusted: move the data dir away and start again, and the master rejoins as one with a lost data dir)")]
    LogStore {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },
    #[error("cannot load the state machine snapshot in {path}: {message}")]
    StateMachine { path: PathBuf, message: String },
    #[error("cannot bind peer address {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("Raft failed to start: {0}")]
    Raft(String),
    #[error("peer TLS: {0}")]
    Tls(#[from] TlsError),
}

/// Raft timings derived from the `[raft]` config.
#[derive(Debug, Clone)]
pub(crate) struct Timings {
    /// openraft's config.
    pub openraft: Config,
    /// How long a quorum ack keeps this master active (< openraft's leader lease).
    pub active_lease: Duration,
    /// How long a write waits for commit before answering `Timeout`.
    pub write_timeout: Duration,
}

/// Map Ballast's `[raft]` settings onto openraft.
///
/// Ballast's `election_timeout_min..max` is the time a follower that stops hearing from
/// the leader waits before campaigning. In openraft 0.9 that wait is
/// `leader_lease + rand(election_timeout_min', election_timeout_max')` where
/// `leader_lease = election_timeout_max'`. So `max' = max / 2` and
/// `min' = max(min - max/2, 2 * heartbeat)` (kept below `max'`): with the defaults
/// (60 ms, 400–700 ms) followers campaign 470–700 ms after the last heartbeat, the
/// leader lease followers honour is 350 ms, and the active lease is 315 ms.
pub(crate) fn timings(rc: &RaftConfig) -> Result<Timings, RaftStartError> {
    let ms = |d: Duration| d.as_millis() as u64;
    let hb = ms(rc.heartbeat_interval).max(1);
    let lease = (ms(rc.election_timeout_max) / 2).max(2);
    let mut min = ms(rc.election_timeout_min)
        .saturating_sub(lease)
        .max(2 * hb);
    if min >= lease {
        min = (lease * 2 / 3).max(hb + 1);
    }
    let openraft = Config {
        cluster_name: "ballast".into(),
        heartbeat_interval: hb,
        election_timeout_min: min,
        election_timeout_max: lease,
        install_snapshot_timeout: ms(rc.rpc_timeout).max(1) * 20,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(rc.snapshot_after_logs.max(1)),
        max_in_snapshot_log_to_keep: rc.snapshot_after_logs.min(1000),
        snapshot_max_chunk_size: 1024 * 1024,
        // openraft 0.9 gives every AppendEntries one heartbeat interval to complete:
        // keep batches small enough to be sent, fsynced and answered in that time. An
        // entry can be a batch of writes (up to `super::replicated::MAX_BATCH_BYTES`): at most
        // ~1 MiB per AppendEntries.
        max_payload_entries: 16,
        ..Default::default()
    }
    .validate()
    .map_err(|e| RaftStartError::Config(e.to_string()))?;
    Ok(Timings {
        openraft,
        active_lease: Duration::from_millis(lease * 9 / 10),
        // Long enough for a slow fsync on a busy disk (2.1 s was seen to run out under a
        // full test suite on 2 cores): a lost quorum is noticed sooner anyway, by the
        // active lease, which turns writes away at once.
        write_timeout: (5 * rc.election_timeout_max).max(Duration::from_secs(5)),
    })
}

/// A running Raft node of one master.
pub(crate) struct RaftNode {
    pub id: NodeId,
    pub raft: Raft<TypeConfig>,
    pub applied: Arc<Applied>,
    pub leadership: Leadership,
    pub timings: Timings,
    /// Hands the leadership over before a planned stop.
    pub handover: super::handover::Handover,
    /// Stops the peer server. Not `shutdown`: a master that stops keeps answering its
    /// peers until Raft stops, so that a write it proposed before handing over learns
    /// its commit from the next leader and is answered, not cut off.
    pub peer_stop: CancellationToken,
}

impl RaftNode {
    /// Open the data dir, start Raft and serve the peer address until `peer_stop`.
    /// Initializes the group on first start (see `guard_pristine`).
    pub(crate) async fn start(
        loaded: &LoadedConfig,
        name: &str,
        tls: &NodeTls,
        metrics: Arc<MasterMetrics>,
        shutdown: CancellationToken,
        peer_stop: CancellationToken,
    ) -> Result<Self, RaftStartError> {
        let cfg = &loaded.config;
        let me = cfg
            .master(name)
            .ok_or_else(|| RaftStartError::UnknownId(name.to_string()))?
            .clone();
        let id = cfg
            .raft_id(name)
            .ok_or_else(|| RaftStartError::UnknownId(name.to_string()))?;
        let mut members = BTreeMap::new();
        let mut names = BTreeMap::new();
        for m in &cfg.masters {
            let rid = cfg.raft_id(&m.id).expect("listed master");
            members.insert(
                rid,
                Node {
                    addr: m.peer.to_string(),
                },
            );
            names.insert(rid, m.id.clone());
        }
        let timings = timings(&cfg.raft)?;

        let dir = loaded.master_data_dir(&me);
        // 0700: the Raft log holds every object, secrets included
        std::fs::create_dir_all(&dir)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|source| RaftStartError::DataDir {
                path: dir.clone(),
                source,
            })?;
        let log_path = dir.join("raft.redb");
        let log_store = LogStore::open(&log_path).map_err(|source| RaftStartError::LogStore {
            path: log_path.clone(),
            source,
        })?;
        demote_restored_leadership(&log_store, id).await?;
        let pristine = is_pristine(&log_store).await?;
        let applied = Applied::new(cfg.raft.watch_history);
        let snap_dir = dir.join("snapshots");
        let sm = StateMachine::open(&snap_dir, applied.clone()).map_err(|e| {
            RaftStartError::StateMachine {
                path: snap_dir.clone(),
                message: e.to_string(),
            }
        })?;

        let pristine = pristine && sm_is_empty(&snap_dir);
        let fence = Fence::new(id, timings.active_lease);
        fence.set_pristine_guard(pristine);
        // openraft's follower lease lives in memory: after a restart, honour it anyway.
        fence.set_quiet_until(
            std::time::Instant::now()
                + Duration::from_millis(timings.openraft.election_timeout_max),
        );
        let network = Network::new(
            id,
            me.peer.ip(),
            tls.client_config()?,
            cfg.raft.rpc_timeout,
            fence.clone(),
            metrics.clone(),
        );
        let http = network.http().clone();

        let listener = tokio::net::TcpListener::bind(me.peer)
            .await
            .map_err(|source| RaftStartError::Bind {
                addr: me.peer,
                source,
            })?;

        let log_reader = log_store.clone();
        let raft = Raft::new(
            id,
            Arc::new(timings.openraft.clone()),
            network,
            log_store,
            sm,
        )
        .await
        .map_err(|e| RaftStartError::Raft(e.to_string()))?;

        // Same for campaigning: no election of its own before the lease it may have
        // acknowledged has run out (openraft would campaign at its first tick); the
        // campaign loop turns elections on when that is safe (see `campaign::run`).
        raft.runtime_config().elect(false);

        let contact = Arc::new(LeaderContact::default());
        tokio::spawn(campaign::run(
            CampaignConfig {
                me: id,
                peers: members
                    .iter()
                    .filter(|(rid, _)| **rid != id)
                    .map(|(rid, n)| (*rid, n.addr.clone()))
                    .collect(),
                lease: Duration::from_millis(timings.openraft.election_timeout_max),
                heartbeat: Duration::from_millis(timings.openraft.heartbeat_interval),
                rpc_timeout: cfg.raft.rpc_timeout,
            },
            raft.clone(),
            fence.clone(),
            contact.clone(),
            log_reader.clone(),
            http.clone(),
            shutdown.clone(),
        ));
        let peers: BTreeMap<String, NodeId> = names
            .iter()
            .map(|(rid, n)| (pki::master_user(n), *rid))
            .collect();
        let router = peer_router(PeerState {
            me: id,
            raft: raft.clone(),
            fence: fence.clone(),
            log: log_reader,
            contact,
            peers: Arc::new(peers.clone()),
        });
        // Mutual TLS, and only the configured masters' certificates: anything else is
        // dropped after the handshake, before the peer router reads a byte.
        let admit: Admit = Arc::new(move |p: &PeerInfo| {
            p.identity
                .as_ref()
                .is_some_and(|i| i.in_group(pki::MASTERS_GROUP) && peers.contains_key(&i.user))
        });
        let listener = TlsListener::new(
            listener,
            tls.server_config(ClientAuth::Required)?,
            "peer",
            Some(admit),
            cfg.limits.max_connections,
        )
        .map_err(|source| RaftStartError::Bind {
            addr: me.peer,
            source,
        })?;
        let header_read = cfg.limits.header_read_timeout;
        tokio::spawn(ballast_config::listener::serve(
            listener,
            router,
            header_read,
            peer_stop.clone(),
        ));

        let leadership = Leadership::new(id, names.clone(), &raft, fence.clone());
        let handover = super::handover::Handover {
            me: id,
            raft: raft.clone(),
            fence: fence.clone(),
            http: http.clone(),
            peers: members
                .iter()
                .filter(|(rid, _)| **rid != id)
                .map(|(rid, n)| (*rid, n.addr.clone()))
                .collect(),
            rpc_timeout: cfg.raft.rpc_timeout,
        };
        let node = Self {
            id,
            raft,
            applied,
            leadership,
            timings,
            handover,
            peer_stop,
        };
        if pristine {
            node.guard_pristine(members, http, cfg.raft.rpc_timeout, fence, shutdown.clone());
        }
        tracing::info!(id = %name, raft_id = id, peer = %me.peer, data_dir = %dir.display(), "raft node started");
        Ok(node)
    }

    /// A master whose data dir was empty at start (first start, or a lost data dir)
    /// refuses every vote until it can tell which case it is in (see
    /// [`guard_pristine`]); the master with the lowest Raft id forms the group.
    fn guard_pristine(
        &self,
        members: BTreeMap<NodeId, Node>,
        http: reqwest::Client,
        timeout: Duration,
        fence: Arc<Fence>,
        shutdown: CancellationToken,
    ) {
        tokio::spawn(guard_pristine(
            self.id,
            self.raft.clone(),
            members,
            http,
            timeout,
            fence,
            shutdown,
        ));
    }
}

/// The safety of a master that starts with an empty data dir.
///
/// An empty data dir is either the very first start or a **lost data dir**. A master that
/// lost its data has forgotten the votes it granted and the entries it acknowledged;
/// voting again could elect a second leader in a term it already voted in, or a leader
/// missing entries that were committed with its help. So it refuses every vote (the
/// *pristine guard*) until one of:
///
/// - **first formation**: every peer answered `/raft/status` in one round, none holding
///   an entry beyond the initial membership (index 0). No leader was ever elected, so no
///   vote and no acknowledged entry can have been lost. The master with the lowest Raft id
///   then calls `initialize` (the others get the membership from it);
/// - **caught up**: some peer is past formation; the master waits until the leader has
///   replicated to it (from a snapshot when the log is compacted) everything up to the
///   highest log index any peer reported when it first looked, and it will never vote in
///   a term up to the highest term it saw reported (the vote floor). It then holds every
///   entry committed before it lost its data, and votes only in terms it cannot have voted
///   in before.
///
/// No operator command is needed: restart the master with an empty data dir (same id,
/// same `raft_id`) and it catches up and rejoins by itself. If no leader can replicate to
/// it (e.g. the other masters lack a quorum without it) it stays out of elections: the
/// cluster is unavailable rather than wrong.
async fn guard_pristine(
    me: NodeId,
    raft: Raft<TypeConfig>,
    members: BTreeMap<NodeId, Node>,
    http: reqwest::Client,
    timeout: Duration,
    fence: Arc<Fence>,
    shutdown: CancellationToken,
) {
    let lowest = members.keys().next().copied() == Some(me);
    let peers: Vec<(NodeId, String)> = members
        .iter()
        .filter(|(id, _)| **id != me)
        .map(|(id, n)| (*id, n.addr.clone()))
        .collect();
    let mut catch_up_to: Option<u64> = None;
    let mut announced = false;
    loop {
        let mut answers = Vec::new();
        for (_, addr) in &peers {
            answers.push(super::network::peer_status(&http, addr, timeout));
        }
        let answers = futures::future::join_all(answers).await;
        let all_answered = answers.iter().all(Option::is_some);
        let formed: Vec<_> = answers.iter().flatten().filter(|s| s.formed()).collect();
        if formed.is_empty() && all_answered {
            fence.set_pristine_guard(false);
            tracing::info!("first start of the cluster: every master is pristine");
            if lowest {
                match raft.initialize(members.clone()).await {
                    Ok(()) => tracing::info!("initialized the Raft group"),
                    Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                    Err(e) => tracing::warn!(error = %e, "initialize failed"),
                }
            }
            return;
        }
        if !formed.is_empty() {
            let max_term = answers.iter().flatten().map(|s| s.term).max().unwrap_or(0);
            fence.raise_vote_floor(max_term);
            let target = *catch_up_to
                .get_or_insert_with(|| formed.iter().map(|s| s.last_log_index).max().unwrap_or(0));
            if !announced {
                announced = true;
                tracing::warn!(
                    catch_up_to = target,
                    vote_floor = max_term,
                    "this master started with an empty data dir but the cluster exists: \
                     treating it as a lost data dir; no votes until it has caught up"
                );
            }
            let applied = raft.metrics().borrow().last_applied.map_or(0, |l| l.index);
            if applied >= target {
                fence.set_pristine_guard(false);
                tracing::info!(applied, "caught up after an empty data dir; voting again");
                return;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// A master that restarts with its own *committed* vote would resume as leader of its
/// old term at once (openraft restores leadership on start-up), with a state machine that
/// may lag entries it committed before the crash: it could report active and serve a
/// stale read before re-applying them. So the persisted vote is lowered to the same
/// term's *uncommitted* self-vote: the master still never votes for anyone else in that
/// term (votes of one term for different candidates are incomparable), cannot lead that
/// term again, and becomes active only by winning a new term, whose blank entry it
/// applies after everything committed before it.
async fn demote_restored_leadership(log: &LogStore, id: NodeId) -> Result<(), RaftStartError> {
    use openraft::storage::RaftLogStorage;
    let mut log = log.clone();
    let err = |e: openraft::StorageError<NodeId>| RaftStartError::Raft(format!("vote: {e}"));
    if let Some(v) = log.read_vote().await.map_err(err)? {
        if v.committed && v.leader_id.node_id == id {
            let lowered = openraft::Vote::new(v.leader_id.term, id);
            log.save_vote(&lowered).await.map_err(err)?;
            tracing::info!(
                term = v.leader_id.term,
                "was leader before restart; will campaign for a new term"
            );
        }
    }
    Ok(())
}

/// No vote and no log entry: an empty (new or lost) data dir.
async fn is_pristine(log: &LogStore) -> Result<bool, RaftStartError> {
    use openraft::storage::RaftLogStorage;
    let mut log = log.clone();
    let err = |e: openraft::StorageError<NodeId>| RaftStartError::Raft(format!("log: {e}"));
    let vote = log.read_vote().await.map_err(err)?;
    let state = log.get_log_state().await.map_err(err)?;
    Ok(vote.is_none() && state.last_log_id.is_none())
}

fn sm_is_empty(snap_dir: &std::path::Path) -> bool {
    !snap_dir.join("snapshot.json").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_timings_map_onto_openraft() {
        let t = timings(&RaftConfig::default()).unwrap();
        assert_eq!(t.openraft.heartbeat_interval, 60);
        // Followers campaign after lease + rand(min', max') = 350 + [120, 350) ms.
        assert_eq!(t.openraft.election_timeout_max, 350);
        assert_eq!(t.openraft.election_timeout_min, 120);
        assert_eq!(t.active_lease, Duration::from_millis(315));
        assert!(t.active_lease < Duration::from_millis(t.openraft.election_timeout_max));
        assert_eq!(t.write_timeout, Duration::from_secs(5));
    }

    #[test]
    fn tight_timings_stay_valid() {
        let rc = RaftConfig {
            heartbeat_interval: Duration::from_millis(50),
            election_timeout_min: Duration::from_millis(150),
            election_timeout_max: Duration::from_millis(200),
            ..RaftConfig::default()
        };
        let t = timings(&rc).unwrap();
        assert!(t.openraft.election_timeout_min < t.openraft.election_timeout_max);
        assert!(t.openraft.election_timeout_min > t.openraft.heartbeat_interval);
    }
}
