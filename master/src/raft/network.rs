//! Inter-master Raft RPC over HTTP/1.1 on the peer address only: MessagePack bodies
//! ([`Msgpack`]) for append, vote and snapshot; `GET /raft/status` answers JSON.
//!
//! - client: [`Network`] (openraft's `RaftNetworkFactory`) with one pooled `reqwest`
//!   client; every RPC has a timeout (the smaller of openraft's and `raft.rpc_timeout`),
//!   after which its exchange still finishes in the background to keep its connection.
//!   Accepted `AppendEntries` of this master's own term feed the lease in [`Fence`].
//! - server: [`peer_router`] with `POST /raft/append`, `/raft/vote`, `/raft/snapshot`.
//!   Vote requests pass the [`Fence`] vote gate before reaching openraft.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use ballast_config::listener::PeerInfo;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{Backoff, RPCOption};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{Raft, RaftNetwork, RaftNetworkFactory};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::leadership::{Fence, LeaderContact, RaftView};
use super::{Node, NodeId, TypeConfig};
use crate::metrics::MasterMetrics;

/// Error of one HTTP exchange, before mapping to openraft's `RPCError`.
#[derive(Debug, thiserror::Error)]
enum HttpError {
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("request to {url} failed: {source}")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered {status}: {body}")]
    Status {
        url: String,
        status: StatusCode,
        body: String,
    },
    #[error("cannot {what} a MessagePack body for {url}: {message}")]
    Codec {
        url: String,
        what: &'static str,
        message: String,
    },
    #[error("no answer from {url} within {after:?} (it may still come, and is then dropped)")]
    TimedOut { url: String, after: Duration },
    #[error("the request to {url} failed in its task: {message}")]
    Task { url: String, message: String },
}

/// Peer RPC bodies are MessagePack (named fields): a command's value travels as raw
/// bytes, where JSON escaped every quote of the object it carries, and re-parsed it on
/// every follower.
const MSGPACK: &str = "application/msgpack";

/// A MessagePack request body (extractor) or response body.
pub(crate) struct Msgpack<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for Msgpack<T> {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Response> {
        let body = bytes::Bytes::from_request(req, state)
            .await
            .map_err(IntoResponse::into_response)?;
        rmp_serde::from_slice(&body).map(Msgpack).map_err(|e| {
            let msg = format!("invalid MessagePack body: {e}");
            (StatusCode::BAD_REQUEST, msg).into_response()
        })
    }
}

impl<T: Serialize> IntoResponse for Msgpack<T> {
    fn into_response(self) -> Response {
        match rmp_serde::to_vec_named(&self.0) {
            Ok(body) => ([(axum::http::header::CONTENT_TYPE, MSGPACK)], body).into_response(),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        }
    }
}

/// Builds peer clients.
#[derive(Clone)]
pub(crate) struct Network {
    me: NodeId,
    http: reqwest::Client,
    rpc_timeout: Duration,
    fence: Arc<Fence>,
    metrics: Arc<MasterMetrics>,
}

impl Network {
    /// Peer RPCs leave from `local_ip` (the master's own peer address), as they would
    /// from a real host, so a network fault between two masters can be aimed at them.
    pub(crate) fn new(
        me: NodeId,
        local_ip: std::net::IpAddr,
        tls: rustls::ClientConfig,
        rpc_timeout: Duration,
        fence: Arc<Fence>,
        metrics: Arc<MasterMetrics>,
    ) -> Self {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .no_proxy()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(30))
            .connect_timeout(rpc_timeout)
            .local_address(local_ip)
            .build()
            .expect("reqwest client");
        Self {
            me,
            http,
            rpc_timeout,
            fence,
            metrics,
        }
    }
}

impl Network {
    /// The pooled HTTP client (for status polls).
    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.http
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerClient {
        PeerClient {
            net: self.clone(),
            target,
            base: format!("https://{}/raft", node.addr),
        }
    }
}

/// RPC client to one peer.
pub(crate) struct PeerClient {
    net: Network,
    target: NodeId,
    base: String,
}

impl PeerClient {
    /// One exchange, answered within `timeout`.
    ///
    /// The exchange itself runs in a task of its own, bounded by `raft.rpc_timeout` (or
    /// `timeout`, if longer): when the caller stops waiting (openraft bounds every
    /// AppendEntries by the heartbeat interval), the request still completes in the
    /// background and its connection goes back to the pool. Dropped midway instead, an
    /// HTTP/1.1 connection must close, and on a link whose round trip nears the heartbeat
    /// every retry then pays TCP and TLS handshakes again and never fits in time: with
    /// 20 ms each way, that cost an election every half second (`slow_links.rs`).
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        what: &'static str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, HttpError> {
        let url = format!("{}/{what}", self.base);
        let started = Instant::now();
        let res = async {
            let body = rmp_serde::to_vec_named(req).map_err(|e| HttpError::Codec {
                url: url.clone(),
                what: "encode",
                message: e.to_string(),
            })?;
            let exchange = tokio::spawn(exchange(
                self.net.http.clone(),
                url.clone(),
                body,
                self.net.rpc_timeout.max(timeout),
            ));
            let body = match tokio::time::timeout(timeout, exchange).await {
                Ok(Ok(answer)) => answer?,
                Ok(Err(join)) => {
                    return Err(HttpError::Task {
                        url: url.clone(),
                        message: join.to_string(),
                    })
                }
                Err(_) => {
                    return Err(HttpError::TimedOut {
                        url: url.clone(),
                        after: timeout,
                    })
                }
            };
            rmp_serde::from_slice::<Resp>(&body).map_err(|e| HttpError::Codec {
                url: url.clone(),
                what: "decode",
                message: e.to_string(),
            })
        }
        .await;
        self.net
            .metrics
            .observe_rpc(what, started.elapsed(), res.is_ok());
        res
    }

    fn timeout(&self, option: &RPCOption) -> Duration {
        option
            .hard_ttl()
            .min(self.net.rpc_timeout)
            .max(Duration::from_millis(1))
    }
}

/// POST `body` to `url` and read the whole answer, within `timeout`.
async fn exchange(
    http: reqwest::Client,
    url: String,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<bytes::Bytes, HttpError> {
    let resp = http
        .post(&url)
        .timeout(timeout)
        .header(reqwest::header::CONTENT_TYPE, MSGPACK)
        .body(body)
        .send()
        .await
        .map_err(|source| {
            if source.is_connect() {
                HttpError::Connect {
                    url: url.clone(),
                    source,
                }
            } else {
                HttpError::Request {
                    url: url.clone(),
                    source,
                }
            }
        })?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        return Err(HttpError::Status { url, status, body });
    }
    resp.bytes()
        .await
        .map_err(|source| HttpError::Request { url, source })
}

fn to_rpc_error<E: std::error::Error>(e: HttpError) -> RPCError<NodeId, Node, E> {
    match e {
        HttpError::Connect { .. } => RPCError::Unreachable(Unreachable::new(&e)),
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let term = rpc.vote.leader_id.term;
        let mine = rpc.vote.committed && rpc.vote.leader_id.node_id == self.net.me;
        // Taken before the request leaves: the follower accepts it later, never earlier.
        let sent = Instant::now();
        let timeout = self.timeout(&option);
        let res: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> = self
            .call("append", &rpc, timeout)
            .await
            .map_err(to_rpc_error)?;
        let resp = res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))?;
        if mine
            && matches!(
                resp,
                AppendEntriesResponse::Success
                    | AppendEntriesResponse::PartialSuccess(_)
                    | AppendEntriesResponse::Conflict
            )
        {
            self.net.fence.record_ack(term, self.target, sent);
        }
        Ok(resp)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        // Snapshot chunks may be large: openraft's own (longer) timeout applies.
        let res: Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> =
            self.call("snapshot", &rpc, option.hard_ttl())
                .await
                .map_err(to_rpc_error)?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let timeout = self.timeout(&option);
        let res: Result<VoteResponse<NodeId>, RaftError<NodeId>> = self
            .call("vote", &rpc, timeout)
            .await
            .map_err(to_rpc_error)?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    fn backoff(&self) -> Backoff {
        // A restarted peer is retried soon; 500 ms (openraft's default) delays rejoining.
        Backoff::new(std::iter::repeat(Duration::from_millis(100)))
    }
}

/// State of the peer RPC server.
#[derive(Clone)]
pub(crate) struct PeerState {
    pub me: NodeId,
    pub raft: Raft<TypeConfig>,
    pub fence: Arc<Fence>,
    /// For the last log id in refused votes.
    pub log: super::durable_log::LogStore,
    /// When a leader's `AppendEntries` was last accepted here.
    pub contact: Arc<LeaderContact>,
    /// Certificate user (`master:mI`) → Raft id of every configured master.
    pub peers: Arc<BTreeMap<String, NodeId>>,
}

impl PeerState {
    /// Refuse a request whose claimed sender (the leader or candidate it names) is not
    /// the master whose certificate made the connection: one master cannot speak for
    /// another, let alone anything else (the listener admits masters only).
    fn refuse_impostor(&self, peer: &PeerInfo, claimed: NodeId) -> Option<Response> {
        let caller = peer
            .identity
            .as_ref()
            .and_then(|i| self.peers.get(&i.user).copied());
        if caller == Some(claimed) {
            return None;
        }
        tracing::warn!(peer = %peer.addr, ?caller, claimed, "peer RPC refused: sender and claim differ");
        Some(
            (
                StatusCode::FORBIDDEN,
                format!("this connection is master {caller:?}'s, not master {claimed}'s"),
            )
                .into_response(),
        )
    }
}

/// The router served on the peer address.
pub(crate) fn peer_router(state: PeerState) -> Router {
    Router::new()
        .route("/raft/append", post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/snapshot", post(snapshot))
        .route("/raft/status", axum::routing::get(status))
        .route("/raft/takeover", post(takeover))
        // AppendEntries carry at most 16 entries of at most 64 KiB each, snapshots come in
        // 1 MiB chunks: 16 MiB is room to spare
        .layer(DefaultBodyLimit::max(16 * 1024 * 1024))
        .with_state(state)
}

/// What `GET /raft/status` on the peer address answers (used by a master that starts
/// with an empty data dir to tell first formation from a lost data dir).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub(crate) struct PeerStatus {
    pub id: NodeId,
    /// Has a membership (initialized or replicated to).
    pub initialized: bool,
    /// Highest log index (0 when empty).
    pub last_log_index: u64,
    pub term: u64,
    /// Term of the last log entry.
    #[serde(default)]
    pub last_log_term: u64,
    /// Milliseconds since it last accepted an `AppendEntries` from a leader (0 when it
    /// is the leader; `None` when neither since it started).
    #[serde(default)]
    pub leader_contact_ms: Option<u64>,
}

impl PeerStatus {
    /// Past first formation: holds an entry beyond the initial membership (index 0).
    pub(crate) fn formed(&self) -> bool {
        self.last_log_index >= 1
    }
}

async fn status(State(st): State<PeerState>) -> Response {
    let m = st.raft.metrics().borrow().clone();
    let mut log = st.log.clone();
    let last = match openraft::storage::RaftLogStorage::get_log_state(&mut log).await {
        Ok(s) => s.last_log_id,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let leader = m.state == openraft::ServerState::Leader && m.vote.committed;
    Json(PeerStatus {
        id: st.me,
        initialized: m
            .membership_config
            .membership()
            .voter_ids()
            .next()
            .is_some(),
        last_log_index: last.map(|l| l.index).unwrap_or(0),
        term: m.current_term,
        last_log_term: last.map(|l| l.leader_id.term).unwrap_or(0),
        leader_contact_ms: if leader {
            Some(0)
        } else {
            st.contact.age_ms(Instant::now())
        },
    })
    .into_response()
}

/// `GET /raft/status` of a peer, `None` when it does not answer in time.
pub(crate) async fn peer_status(
    http: &reqwest::Client,
    addr: &str,
    timeout: Duration,
) -> Option<PeerStatus> {
    http.get(format!("https://{addr}/raft/status"))
        .timeout(timeout)
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

async fn append(
    State(st): State<PeerState>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    Msgpack(req): Msgpack<AppendEntriesRequest<TypeConfig>>,
) -> Response {
    if let Some(refused) = st.refuse_impostor(&peer, req.vote.leader_id.node_id) {
        return refused;
    }
    let res = st.raft.append_entries(req).await;
    if matches!(
        res,
        Ok(AppendEntriesResponse::Success
            | AppendEntriesResponse::PartialSuccess(_)
            | AppendEntriesResponse::Conflict)
    ) {
        // After openraft took it: its leader lease started no later than this.
        st.contact.record(Instant::now());
    }
    Msgpack(res).into_response()
}

async fn snapshot(
    State(st): State<PeerState>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    Msgpack(req): Msgpack<InstallSnapshotRequest<TypeConfig>>,
) -> Response {
    if let Some(refused) = st.refuse_impostor(&peer, req.vote.leader_id.node_id) {
        return refused;
    }
    let res: Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> =
        st.raft.install_snapshot(req).await;
    Msgpack(res).into_response()
}

/// The leader hands over (see `handover.rs`): campaign now. Only the leader of the
/// current term may ask, over its own connection.
async fn takeover(
    State(st): State<PeerState>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    Msgpack(req): Msgpack<super::handover::TakeoverRequest>,
) -> Response {
    if let Some(refused) = st.refuse_impostor(&peer, req.leader) {
        return refused;
    }
    let (leader, term) = {
        let m = st.raft.metrics().borrow().clone();
        (m.current_leader, m.current_term)
    };
    if leader != Some(req.leader) || term != req.term {
        return (
            StatusCode::CONFLICT,
            format!("master {} does not lead term {} here", req.leader, req.term),
        )
            .into_response();
    }
    tracing::info!(from = req.leader, term, "taking over the leadership");
    match st.raft.trigger().elect().await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

async fn vote(
    State(st): State<PeerState>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    Msgpack(req): Msgpack<VoteRequest<NodeId>>,
) -> Response {
    if let Some(refused) = st.refuse_impostor(&peer, req.vote.leader_id.node_id) {
        return refused;
    }
    let (view, view_vote) = {
        let rx = st.raft.metrics();
        let m = rx.borrow();
        (RaftView::from_metrics(st.me, &m), m.vote)
    };
    if st
        .fence
        .begin_vote(&view, req.vote.leader_id.term, Instant::now())
        .is_err()
    {
        // Refuse like openraft's own lease check does: not granted, with this master's
        // vote and last log id (a candidate with a shorter log then backs off).
        let mut log = st.log.clone();
        let last_log_id = match openraft::storage::RaftLogStorage::get_log_state(&mut log).await {
            Ok(s) => s.last_log_id,
            Err(e) => {
                return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
            }
        };
        tracing::debug!(
            candidate = req.vote.leader_id.node_id,
            term = req.vote.leader_id.term,
            "vote refused by the fence"
        );
        let resp: Result<VoteResponse<NodeId>, RaftError<NodeId>> = Ok(VoteResponse {
            vote: view_vote,
            vote_granted: false,
            last_log_id,
        });
        return Msgpack(resp).into_response();
    }
    // Run the vote to completion even if the caller goes away, so the gate is always
    // closed with the real outcome.
    let raft = st.raft.clone();
    let fence = st.fence.clone();
    let cand = (req.vote.leader_id.node_id, req.vote.leader_id.term);
    let task = tokio::spawn(async move {
        let res = raft.vote(req).await;
        let granted = match &res {
            Ok(r) if r.vote_granted => Some(cand),
            Ok(_) => None,
            // Unknown outcome: assume granted (only makes this master more careful).
            Err(_) => Some(cand),
        };
        fence.end_vote(granted);
        res
    });
    match task.await {
        Ok(res) => Msgpack(res).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
