//! Prompt, orderly elections after the leader is lost: one nominated candidate.
//!
//! openraft 0.9 lets every follower campaign on its own randomized timer. After a
//! leader dies, two followers whose timers fire close together split the vote, and a
//! follower with a shorter log campaigns in vain; either costs a whole second election
//! timeout (the slow tail of failover). openraft 0.9 has no pre-vote to avoid that.
//!
//! So each follower runs [`run`]: as soon as it has not heard from a leader for the
//! leader lease (plus a margin) — the earliest instant any election can succeed, see
//! `leadership.rs` — it asks the other voters for their `/raft/status` and [`decide`]s,
//! from the same facts on every follower, who should campaign:
//!
//! - a voter that still hears from a leader means the leader is alive (this follower
//!   is cut off): nobody is nominated (no disruption, like pre-vote);
//! - otherwise, among this follower and the voters that answered (at least a quorum),
//!   the one with the most up-to-date log (the only kind that can win), ties to the
//!   lowest id. It campaigns once every voter's lease has run out; the others hold
//!   their own timers for one lease meanwhile.
//!
//! openraft's own timers stay on as the fallback (nominee dead, a lost vote request):
//! this only makes the common case fast and free of split votes. Safety is Raft's own:
//! a nomination only chooses who asks first.

use std::cmp::Reverse;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::storage::RaftLogStorage;
use openraft::{Raft, ServerState};
use tokio_util::sync::CancellationToken;

use super::durable_log::LogStore;
use super::leadership::{Fence, LeaderContact};
use super::network::{peer_status, PeerStatus};
use super::{NodeId, TypeConfig};

/// One voter as the nomination sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Seen {
    pub id: NodeId,
    /// Last log id as (term, index).
    pub last_log: (u64, u64),
    /// Time since it last heard from a leader (`None`: not since it started).
    pub contact_age: Option<Duration>,
}

impl Seen {
    /// It heard from a leader within `alive_within`: the leader is alive.
    fn hears_leader(&self, alive_within: Duration) -> bool {
        self.contact_age.is_some_and(|a| a < alive_within)
    }

    fn from_status(s: &PeerStatus) -> Self {
        Self {
            id: s.id,
            last_log: (s.last_log_term, s.last_log_index),
            contact_age: s.leader_contact_ms.map(Duration::from_millis),
        }
    }
}

/// What a follower that lost its leader should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Campaign after this wait (until every answering voter's lease has run out).
    Campaign { after: Duration },
    /// Another voter is the nominee: hold this master's own timer for a while.
    Defer { to: NodeId },
    /// A voter still hears from a leader: do nothing.
    LeaderAlive,
    /// Fewer than a quorum answered: leave it to openraft's timers.
    NoQuorum,
}

/// Pure nomination rule. `alive_within`: a voter that heard from a leader this recently
/// is taken as proof the leader lives; `lease`: openraft's follower leader lease.
pub(crate) fn decide(
    me: &Seen,
    peers: &[Seen],
    voters: usize,
    lease: Duration,
    alive_within: Duration,
) -> Decision {
    if peers.iter().any(|p| p.hears_leader(alive_within)) {
        return Decision::LeaderAlive;
    }
    if 1 + peers.len() < voters / 2 + 1 {
        return Decision::NoQuorum;
    }
    let best = std::iter::once(me)
        .chain(peers)
        .max_by_key(|s| (s.last_log, Reverse(s.id)))
        .expect("at least me");
    if best.id != me.id {
        return Decision::Defer { to: best.id };
    }
    // Every voter refuses votes until its own lease (from its own last contact) ends.
    let margin = Duration::from_millis(5);
    let after = peers
        .iter()
        .filter_map(|p| p.contact_age)
        .map(|a| (lease + margin).saturating_sub(a))
        .max()
        .unwrap_or_default();
    Decision::Campaign { after }
}

/// Settings of the nomination loop.
pub(crate) struct CampaignConfig {
    pub me: NodeId,
    /// Peer addresses of the other voters.
    pub peers: Vec<(NodeId, String)>,
    /// openraft's follower leader lease.
    pub lease: Duration,
    pub heartbeat: Duration,
    pub rpc_timeout: Duration,
}

impl CampaignConfig {
    /// A voter that heard from a leader this recently proves the leader alive.
    fn alive_within(&self) -> Duration {
        self.heartbeat * 2
    }

    /// The other voters that answer `/raft/status` now (short timeout: a dead one
    /// must not delay the decision).
    async fn peers_seen(&self, http: &reqwest::Client) -> Vec<Seen> {
        let timeout = self.rpc_timeout.min(Duration::from_millis(150));
        futures::future::join_all(
            self.peers
                .iter()
                .map(|(_, addr)| peer_status(http, addr, timeout)),
        )
        .await
        .iter()
        .flatten()
        .map(Seen::from_status)
        .collect()
    }
}

/// Watch for a lost leader and nominate one candidate (see the module docs).
pub(crate) async fn run(
    cfg: CampaignConfig,
    raft: Raft<TypeConfig>,
    fence: Arc<Fence>,
    contact: Arc<LeaderContact>,
    mut log: LogStore,
    http: reqwest::Client,
    shutdown: CancellationToken,
) {
    let voters = cfg.peers.len() + 1;
    // A leader that sends heartbeats every `heartbeat` is silent this long only when
    // it is gone (or cut off from this master).
    let silent = cfg.lease + cfg.heartbeat / 2;
    rejoin(&cfg, &raft, &contact, &http, &shutdown).await;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut acted_for: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(last) = contact.last() else { continue };
        if acted_for == Some(last) || last.elapsed() < silent {
            continue;
        }
        if raft.metrics().borrow().state != ServerState::Follower || fence.retired() {
            continue;
        }
        acted_for = Some(last);
        let peers = cfg.peers_seen(&http).await;
        let last_log = match log.get_log_state().await {
            Ok(s) => s
                .last_log_id
                .map(|l| (l.leader_id.term, l.index))
                .unwrap_or_default(),
            Err(_) => continue,
        };
        let me = Seen {
            id: cfg.me,
            last_log,
            contact_age: Some(last.elapsed()),
        };
        let decision = decide(&me, &peers, voters, cfg.lease, cfg.alive_within());
        tracing::info!(
            ?decision,
            silent_ms = last.elapsed().as_millis() as u64,
            "leader lost"
        );
        match decision {
            Decision::Campaign { after } => {
                tokio::time::sleep(after).await;
                // Still leaderless here (no newer contact) and still a follower.
                if contact.last() == Some(last)
                    && raft.metrics().borrow().state == ServerState::Follower
                    && !fence.retired()
                {
                    if let Err(e) = raft.trigger().elect().await {
                        tracing::debug!(error = %e, "cannot start an election");
                    }
                }
            }
            Decision::Defer { .. } => {
                // Give the nominee one lease to win before this master's own timer may
                // fire and split the vote; then openraft's timers are the fallback.
                raft.runtime_config().elect(false);
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(cfg.lease) => {}
                }
                if !fence.retired() {
                    raft.runtime_config().elect(true);
                }
            }
            Decision::LeaderAlive | Decision::NoQuorum => {}
        }
    }
}

/// After a start, turn openraft's own elections on (they start off) once that cannot
/// disrupt a working leader: after one lease (one this master may have acknowledged
/// before it stopped), and then only when it has heard from a leader, or no other voter
/// has (the whole group is starting). Without this a restarted master whose first
/// `AppendEntries` is late campaigns with a higher term and deposes a healthy leader
/// (openraft 0.9 has no pre-vote). Bounded: after ~3 s elections are on regardless.
async fn rejoin(
    cfg: &CampaignConfig,
    raft: &Raft<TypeConfig>,
    contact: &LeaderContact,
    http: &reqwest::Client,
    shutdown: &CancellationToken,
) {
    let deadline = Instant::now() + cfg.lease + Duration::from_secs(3);
    let mut wait = cfg.lease;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = cfg.heartbeat;
        if contact.last().is_some() || Instant::now() >= deadline {
            break;
        }
        let peers = cfg.peers_seen(http).await;
        if !peers.iter().any(|p| p.hears_leader(cfg.alive_within())) {
            break;
        }
    }
    raft.runtime_config().elect(true);
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_millis(350);
    const ALIVE: Duration = Duration::from_millis(120);

    fn seen(id: NodeId, term: u64, index: u64, age_ms: Option<u64>) -> Seen {
        Seen {
            id,
            last_log: (term, index),
            contact_age: age_ms.map(Duration::from_millis),
        }
    }

    #[test]
    fn the_longest_log_campaigns_and_the_other_defers() {
        let a = seen(2, 3, 100, Some(385));
        let b = seen(3, 3, 101, Some(380));
        assert_eq!(
            decide(&a, std::slice::from_ref(&b), 3, LEASE, ALIVE),
            Decision::Defer { to: 3 }
        );
        assert_eq!(
            decide(&b, std::slice::from_ref(&a), 3, LEASE, ALIVE),
            Decision::Campaign {
                after: Duration::ZERO
            }
        );
    }

    #[test]
    fn equal_logs_go_to_the_lowest_id_and_both_agree() {
        let a = seen(2, 3, 100, Some(385));
        let b = seen(3, 3, 100, Some(385));
        assert_eq!(
            decide(&a, std::slice::from_ref(&b), 3, LEASE, ALIVE),
            Decision::Campaign {
                after: Duration::ZERO
            }
        );
        assert_eq!(
            decide(&b, std::slice::from_ref(&a), 3, LEASE, ALIVE),
            Decision::Defer { to: 2 }
        );
    }

    #[test]
    fn a_higher_last_term_beats_a_longer_log() {
        let a = seen(1, 4, 10, Some(400));
        let b = seen(2, 3, 50, Some(400));
        assert_eq!(
            decide(&b, std::slice::from_ref(&a), 3, LEASE, ALIVE),
            Decision::Defer { to: 1 }
        );
    }

    #[test]
    fn waits_for_the_peers_lease_to_end() {
        let me = seen(1, 3, 10, Some(380));
        let peer = seen(2, 3, 10, Some(300));
        assert_eq!(
            decide(&me, &[peer], 3, LEASE, ALIVE),
            Decision::Campaign {
                after: Duration::from_millis(55)
            }
        );
    }

    #[test]
    fn a_peer_hearing_the_leader_or_too_few_answers_stops_it() {
        let me = seen(1, 3, 10, Some(400));
        assert_eq!(
            decide(&me, &[seen(2, 3, 9, Some(30))], 3, LEASE, ALIVE),
            Decision::LeaderAlive
        );
        assert_eq!(decide(&me, &[], 3, LEASE, ALIVE), Decision::NoQuorum);
        assert_eq!(
            decide(&me, &[seen(2, 3, 9, None)], 5, LEASE, ALIVE),
            Decision::NoQuorum
        );
        assert_eq!(
            decide(
                &me,
                &[seen(2, 3, 9, None), seen(3, 3, 9, Some(500))],
                5,
                LEASE,
                ALIVE
            ),
            Decision::Campaign {
                after: Duration::ZERO
            }
        );
    }
}
