//! Planned handover: a master told to stop (SIGTERM) while it is the leader hands the
//! leadership to its most up-to-date follower first, so clients wait for one election
//! round trip instead of a whole leader lease.
//!
//! openraft 0.9 has no leader transfer, and its followers refuse every vote for
//! `leader_lease` after the leader's last `AppendEntries`. The leader itself does not
//! (its vote was last modified when it was elected), so:
//!
//! 1. the leader **retires** ([`Fence::retire`]): it stops being active at once, for
//!    good, and no longer refuses votes (the fence refuses them only while active);
//! 2. it waits until a voter's replicated log matches its own last log id (no write is
//!    accepted any more, so the log stands still) and picks that voter ([`choose`]);
//! 3. it asks the voter to campaign now (`POST /raft/takeover`);
//! 4. the voter's vote request reaches the retiring leader, whose log it matches: granted.
//!    With three voters that is a quorum (the candidate's own vote and the leader's); with
//!    five it also needs a follower whose lease ran out, so there it saves nothing.
//!
//! Safety is Raft's and the fence's: the retired leader reports active never again (so
//! "exactly one active" holds as in `leadership.rs`, the vote it grants fencing its term),
//! and the candidate wins only with votes Raft would grant anyway. If anything fails the
//! master stops as before and the others elect a leader when the lease runs out.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::{LogId, Raft, ServerState};
use serde::{Deserialize, Serialize};

use super::leadership::Fence;
use super::{NodeId, TypeConfig};

/// How long a handover may take before the master stops anyway.
pub(crate) const HANDOVER_TIMEOUT: Duration = Duration::from_millis(1_500);

/// How long the leader's log must stand still before it picks the target.
const QUIET: Duration = Duration::from_millis(5);

/// The body of `POST /raft/takeover`: the leader asking, and its term.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TakeoverRequest {
    pub leader: NodeId,
    pub term: u64,
}

/// The voter to hand over to: one whose replicated log reaches the leader's last log
/// index (entries the leader replicated are the leader's, so its log then matches; only
/// such a candidate can win the leader's vote), the lowest id of them.
pub(crate) fn choose(
    me: NodeId,
    last_index: Option<u64>,
    matched: &BTreeMap<NodeId, Option<LogId<NodeId>>>,
    voters: &[NodeId],
) -> Option<NodeId> {
    let last = last_index?;
    voters
        .iter()
        .copied()
        .filter(|v| *v != me)
        .find(|v| matched.get(v).copied().flatten().map(|l| l.index) == Some(last))
}

/// What a handover came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Not the leader: nothing to hand over.
    NotLeader,
    /// `to` leads now.
    HandedOver { to: NodeId },
    /// Gave up (the others elect a leader after the lease).
    Failed(String),
}

/// What a handover needs of a running node.
#[derive(Clone)]
pub(crate) struct Handover {
    pub me: NodeId,
    pub raft: Raft<TypeConfig>,
    pub fence: Arc<Fence>,
    pub http: reqwest::Client,
    /// Peer address of every other voter.
    pub peers: BTreeMap<NodeId, String>,
    pub rpc_timeout: Duration,
}

impl Handover {
    /// Hand the leadership over if this master leads (see the module docs).
    pub(crate) async fn run(&self) -> Outcome {
        let deadline = Instant::now() + HANDOVER_TIMEOUT;
        let (term, leads) = {
            let m = self.raft.metrics().borrow().clone();
            (
                m.current_term,
                m.state == ServerState::Leader && m.current_leader == Some(self.me),
            )
        };
        if !leads {
            return Outcome::NotLeader;
        }
        self.fence.retire();
        // a retired master never campaigns: once it granted its vote it waits to stop
        self.raft.runtime_config().elect(false);
        let mut metrics = self.raft.metrics();
        // the log must stand still: writes that were proposed just before retiring land
        // first (a candidate behind the leader's last entry would lose its vote)
        let mut quiet: Option<(u64, Instant)> = None;
        let target = loop {
            let m = metrics.borrow_and_update().clone();
            let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
            let matched: BTreeMap<NodeId, Option<LogId<NodeId>>> = m
                .replication
                .as_ref()
                .map(|r| r.iter().map(|(k, v)| (*k, *v)).collect())
                .unwrap_or_default();
            let last = m.last_log_index.unwrap_or(0);
            match quiet {
                Some((l, _)) if l == last => {}
                _ => quiet = Some((last, Instant::now())),
            }
            let still = quiet.is_some_and(|(_, since)| since.elapsed() >= QUIET);
            if let Some(t) = choose(self.me, m.last_log_index, &matched, &voters).filter(|_| still)
            {
                break t;
            }
            if m.state != ServerState::Leader {
                return Outcome::Failed("no longer the leader".into());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Outcome::Failed("no follower caught up in time".into());
            }
            // metrics change at every replication progress; wake for the quiet check too
            let _ = tokio::time::timeout(left.min(QUIET), metrics.changed()).await;
        };
        let Some(addr) = self.peers.get(&target) else {
            return Outcome::Failed(format!("no peer address for {target}"));
        };
        let body = match rmp_serde::to_vec(&TakeoverRequest {
            leader: self.me,
            term,
        }) {
            Ok(b) => b,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        let asked = self
            .http
            .post(format!("https://{addr}/raft/takeover"))
            .header("content-type", "application/msgpack")
            .body(body)
            .timeout(self.rpc_timeout)
            .send()
            .await;
        match asked {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => return Outcome::Failed(format!("takeover refused: HTTP {}", r.status())),
            Err(e) => return Outcome::Failed(format!("takeover request: {e}")),
        }
        loop {
            let m = metrics.borrow_and_update().clone();
            if let Some(l) = m.current_leader.filter(|l| *l != self.me) {
                return Outcome::HandedOver { to: l };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Outcome::Failed(format!("{target} did not take over in time"));
            }
            let _ = tokio::time::timeout(left, metrics.changed()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn log(term: u64, index: u64) -> Option<LogId<NodeId>> {
        Some(LogId::new(CommittedLeaderId::new(term, 1), index))
    }

    #[test]
    fn the_target_is_a_voter_whose_log_matches_the_leaders() {
        let matched = BTreeMap::from([(1, log(3, 10)), (2, log(3, 9)), (3, log(3, 10))]);
        assert_eq!(choose(1, Some(10), &matched, &[1, 2, 3]), Some(3));
        // nobody caught up yet
        let behind = BTreeMap::from([(1, log(3, 10)), (2, log(3, 9)), (3, None)]);
        assert_eq!(choose(1, Some(10), &behind, &[1, 2, 3]), None);
        // a caught-up learner is not a voter
        assert_eq!(choose(1, Some(10), &matched, &[1, 2]), None);
        assert_eq!(choose(1, None, &matched, &[1, 2, 3]), None);
    }
}
