//! Who is active, and the fencing that makes "exactly one active master" hold.
//!
//! # Definition
//!
//! Master `L` is **active** at instant `t` when all of these hold:
//!
//! 1. openraft reports `L` as the leader of term `T` (its own committed vote);
//! 2. `L` has applied an entry of term `T` (its blank "no-op" entry). Raft commits
//!    entries in order, so everything committed before term `T` is applied on `L`;
//! 3. **lease**: a quorum of voters (counting `L`; of each config during a membership
//!    change) accepted an `AppendEntries` of term `T`
//!    that `L` *sent* at or after `t - active_lease` (the send instant is taken before the
//!    request leaves, so any delay only shortens the lease);
//! 4. `L` has no vote request in flight and never granted its vote to another candidate
//!    in a term above `T` (see the vote gate below).
//!
//! # Why a deposed leader stops being active before anyone else can be elected
//!
//! openraft 0.9 followers refuse to vote while their *leader lease* runs: a follower that
//! accepted an `AppendEntries` from `L` at instant `r` rejects every vote request until
//! `r + leader_lease` (`leader_lease` = openraft's `election_timeout_max`). Let a new leader
//! `L'` of a term above `T` be elected by quorum `Q'`, and let `Q` be the quorum behind
//! `L`'s lease, whose oldest counted request was sent at `s`; `L` reports active only
//! before `s + active_lease`. `Q` and `Q'` intersect in some master `v`:
//!
//! - if `v != L`: `v` accepted `L`'s request (sent at `s_v >= s`) at `r >= s_v`, before it
//!   voted for `L'` (after voting for a higher term it would have answered `HigherVote`,
//!   which does not count as an ack). So `v` granted its vote no earlier than
//!   `r + leader_lease >= s + leader_lease > s + active_lease`, and `L'` was elected
//!   after `L`'s lease ended;
//!   (`v` campaigning itself waits even longer: its election timer is
//!   `leader_lease + election_timeout` since its last ack.) openraft keeps that lease in
//!   memory only, so after a start a master neither grants votes
//!   ([`Fence::set_quiet_until`]) nor campaigns for `leader_lease`: a follower that acked
//!   and then crashed and restarted still honours the lease;
//! - if `v == L`: `L` voted for `L'`. Vote requests reach openraft only through
//!   [`Fence::begin_vote`], which refuses them while `L` is active and, atomically with
//!   that check, marks a vote in flight (so `L` cannot turn active meanwhile); a granted
//!   vote fences term `T` for good.
//!
//! After `L'` is elected `L` can never again collect a quorum of acks in term `T`: every
//! quorum contains a voter of `L'`, whose vote is now higher and answers `HigherVote`.
//! Hence a paused (SIGSTOP) leader that resumes never reports active again for its term.
//!
//! All instants are `CLOCK_MONOTONIC` (`std::time::Instant`), which keeps running while a
//! process is stopped. Masters on one host share the clock; across hosts `active_lease`
//! keeps a 10 % margin below `leader_lease` for clock-rate drift.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::{Raft, RaftMetrics, ServerState};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::{Node, NodeId, TypeConfig};

/// Acks of `AppendEntries`, kept per voter for the newest term seen.
#[derive(Debug, Default)]
struct FenceState {
    term: u64,
    acks: BTreeMap<NodeId, Instant>,
    votes_in_flight: u32,
    /// Highest term in which this master granted its vote to another candidate.
    granted_term: u64,
    /// Refuse every vote (a master that started with an empty data dir, see
    /// `node::guard_pristine`).
    pristine_guard: bool,
    /// Refuse votes for terms up to this one (terms a lost data dir may have voted in).
    vote_floor: u64,
    /// Refuse votes before this instant (a restarted master honours the lease of a
    /// leader it may have acknowledged just before it stopped).
    quiet_until: Option<Instant>,
    /// Handing over before a planned stop: never active again (see `handover.rs`).
    retired: bool,
}

impl FenceState {
    fn record_ack(&mut self, term: u64, from: NodeId, sent: Instant) {
        if term < self.term {
            return;
        }
        if term > self.term {
            self.term = term;
            self.acks.clear();
        }
        let e = self.acks.entry(from).or_insert(sent);
        if *e < sent {
            *e = sent;
        }
    }

    /// Until when the acks give `me` a quorum lease in `term` (`None`: no lease). With a
    /// joint membership (during a change) a majority of every config must ack.
    fn lease_until(
        &self,
        term: u64,
        me: NodeId,
        configs: &[BTreeSet<NodeId>],
        lease: Duration,
        now: Instant,
    ) -> Option<Instant> {
        if configs.is_empty() {
            return None;
        }
        let mut until = now + Duration::from_secs(3600);
        for voters in configs {
            let majority = voters.len() / 2 + 1;
            let need = majority - usize::from(voters.contains(&me));
            if need == 0 {
                continue;
            }
            if term != self.term {
                return None;
            }
            let mut times: Vec<Instant> = self
                .acks
                .iter()
                .filter(|(id, _)| **id != me && voters.contains(id))
                .map(|(_, t)| *t)
                .collect();
            times.sort_unstable_by(|a, b| b.cmp(a));
            until = until.min(*times.get(need - 1)? + lease);
        }
        Some(until)
    }
}

/// Lease bookkeeping shared by the peer network (acks, vote gate) and [`Leadership`].
pub(crate) struct Fence {
    me: NodeId,
    active_lease: Duration,
    state: Mutex<FenceState>,
    changed: Notify,
}

/// The openraft facts the active check needs, read from the metrics.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct RaftView {
    pub leader_here: bool,
    pub term: u64,
    pub applied_own_term: bool,
    pub leader: Option<NodeId>,
    /// Voter sets of the effective membership (two during a joint change).
    pub voters: Vec<BTreeSet<NodeId>>,
}

impl RaftView {
    pub(crate) fn from_metrics(me: NodeId, m: &RaftMetrics<NodeId, Node>) -> Self {
        let leader_here = m.state == ServerState::Leader
            && m.vote.committed
            && m.vote.leader_id.node_id == me
            && m.current_leader == Some(me);
        Self {
            leader_here,
            term: m.current_term,
            applied_own_term: m.last_applied.map(|l| l.leader_id.term) == Some(m.current_term),
            leader: m.current_leader,
            voters: m.membership_config.membership().get_joint_config().clone(),
        }
    }
}

impl Fence {
    pub(crate) fn new(me: NodeId, active_lease: Duration) -> Arc<Self> {
        Arc::new(Self {
            me,
            active_lease,
            state: Mutex::new(FenceState::default()),
            changed: Notify::new(),
        })
    }

    /// A voter accepted an `AppendEntries` of `term` that this master sent at `sent`.
    pub(crate) fn record_ack(&self, term: u64, from: NodeId, sent: Instant) {
        self.state
            .lock()
            .expect("fence lock")
            .record_ack(term, from, sent);
        self.changed.notify_one();
    }

    /// `Some(deadline)` while this master is active (see the module docs), else `None`.
    pub(crate) fn active_until(&self, view: &RaftView, now: Instant) -> Option<Instant> {
        let st = self.state.lock().expect("fence lock");
        Self::active_until_locked(&st, self, view, now)
    }

    fn active_until_locked(
        st: &FenceState,
        f: &Fence,
        view: &RaftView,
        now: Instant,
    ) -> Option<Instant> {
        if st.retired
            || !view.leader_here
            || !view.applied_own_term
            || st.votes_in_flight > 0
            || st.granted_term >= view.term
        {
            return None;
        }
        st.lease_until(view.term, f.me, &view.voters, f.active_lease, now)
            .filter(|until| *until > now)
    }

    /// Gate for an incoming vote request. `Err(())` while this master is active (the
    /// request is refused, like a follower inside its leader lease refuses); otherwise
    /// marks a vote in flight, which keeps this master inactive until [`Fence::end_vote`].
    /// Also refused: every vote while the pristine guard is up, and votes for terms up
    /// to the vote floor.
    #[allow(clippy::result_unit_err)]
    pub(crate) fn begin_vote(
        &self,
        view: &RaftView,
        req_term: u64,
        now: Instant,
    ) -> Result<(), ()> {
        let mut st = self.state.lock().expect("fence lock");
        if st.pristine_guard || req_term <= st.vote_floor || st.quiet_until.is_some_and(|q| now < q)
        {
            return Err(());
        }
        if Self::active_until_locked(&st, self, view, now).is_some() {
            return Err(());
        }
        st.votes_in_flight += 1;
        Ok(())
    }

    /// Stop being active, for good: this master hands its leadership over and stops.
    /// Votes are no longer refused for being active.
    pub(crate) fn retire(&self) {
        self.state.lock().expect("fence lock").retired = true;
        self.changed.notify_one();
    }

    /// Whether this master retired (it hands over and stops; it must not campaign).
    pub(crate) fn retired(&self) -> bool {
        self.state.lock().expect("fence lock").retired
    }

    /// Refuse every vote until `until`.
    pub(crate) fn set_quiet_until(&self, until: Instant) {
        self.state.lock().expect("fence lock").quiet_until = Some(until);
    }

    /// Raise or lower the pristine guard (refusing every vote).
    pub(crate) fn set_pristine_guard(&self, on: bool) {
        self.state.lock().expect("fence lock").pristine_guard = on;
    }

    /// Refuse votes for terms `<= term` from now on.
    pub(crate) fn raise_vote_floor(&self, term: u64) {
        let mut st = self.state.lock().expect("fence lock");
        st.vote_floor = st.vote_floor.max(term);
    }

    /// The vote request begun by [`Fence::begin_vote`] ended. `granted_to` is the
    /// candidate and term when this master granted its vote (or the outcome is unknown).
    pub(crate) fn end_vote(&self, granted_to: Option<(NodeId, u64)>) {
        let mut st = self.state.lock().expect("fence lock");
        st.votes_in_flight = st.votes_in_flight.saturating_sub(1);
        if let Some((cand, term)) = granted_to {
            if cand != self.me {
                st.granted_term = st.granted_term.max(term);
            }
        }
        drop(st);
        self.changed.notify_one();
    }
}

/// Proof of being the active master, for work only the active may do. Revoked (its
/// cancellation token cancelled) the moment this master stops being active.
#[derive(Debug, Clone)]
pub struct LeaderToken {
    term: u64,
    cancel: CancellationToken,
}

impl LeaderToken {
    /// The Raft term of this leadership.
    pub fn term(&self) -> u64 {
        self.term
    }
    /// Whether leadership still holds.
    pub fn is_valid(&self) -> bool {
        !self.cancel.is_cancelled()
    }
    /// Resolves when leadership is lost.
    pub async fn revoked(&self) {
        self.cancel.cancelled().await
    }
    /// A child token cancelled when leadership is lost (to hand to spawned tasks).
    pub fn cancellation(&self) -> CancellationToken {
        self.cancel.child_token()
    }
}

/// What `/active` reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ActiveStatus {
    pub id: String,
    pub term: u64,
    pub active: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
}

struct Inner {
    me: NodeId,
    names: BTreeMap<NodeId, String>,
    metrics: watch::Receiver<RaftMetrics<NodeId, Node>>,
    fence: Arc<Fence>,
    tokens: watch::Sender<Option<LeaderToken>>,
}

/// Handle on this master's leadership. Cheap to clone.
#[derive(Clone)]
pub struct Leadership {
    inner: Arc<Inner>,
}

impl Leadership {
    pub(crate) fn new(
        me: NodeId,
        names: BTreeMap<NodeId, String>,
        raft: &Raft<TypeConfig>,
        fence: Arc<Fence>,
    ) -> Self {
        let (tokens, _) = watch::channel(None);
        Self {
            inner: Arc::new(Inner {
                me,
                names,
                metrics: raft.metrics(),
                fence,
                tokens,
            }),
        }
    }

    pub(crate) fn view(&self) -> RaftView {
        RaftView::from_metrics(self.inner.me, &self.inner.metrics.borrow())
    }

    /// The master id of a Raft node id.
    pub fn name_of(&self, id: NodeId) -> Option<String> {
        self.inner.names.get(&id).cloned()
    }

    /// This master's id.
    pub fn my_name(&self) -> String {
        self.name_of(self.inner.me).unwrap_or_default()
    }

    /// Whether this master is active right now (computed at the call, not cached).
    pub fn is_active(&self) -> bool {
        self.inner
            .fence
            .active_until(&self.view(), Instant::now())
            .is_some()
    }

    /// The active master as far as this one knows (itself when active).
    pub fn leader(&self) -> Option<String> {
        self.view().leader.and_then(|id| self.name_of(id))
    }

    /// `/active` report.
    pub fn status(&self) -> ActiveStatus {
        let view = self.view();
        let active = self
            .inner
            .fence
            .active_until(&view, Instant::now())
            .is_some();
        ActiveStatus {
            id: self.my_name(),
            term: view.term,
            active,
            leader: if active {
                None
            } else {
                view.leader
                    .filter(|l| *l != self.inner.me)
                    .and_then(|id| self.name_of(id))
            },
        }
    }

    /// Watch leadership: `Some(token)` while active, `None` otherwise.
    pub fn subscribe(&self) -> watch::Receiver<Option<LeaderToken>> {
        self.inner.tokens.subscribe()
    }

    /// The current token, if this master is active right now.
    pub fn token(&self) -> Option<LeaderToken> {
        let t = self.inner.tokens.borrow().clone()?;
        (t.is_valid() && self.is_active()).then_some(t)
    }

    /// Run `work(token)` every time this master becomes active, until `shutdown`.
    /// `work` must return soon after `token.revoked()` resolves (hand
    /// `token.cancellation()` to whatever it spawns); a run still going at `shutdown` is
    /// aborted. At most one run is alive at a time.
    pub async fn run_while_active<F, Fut>(&self, shutdown: CancellationToken, mut work: F)
    where
        F: FnMut(LeaderToken) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut rx = self.subscribe();
        loop {
            let token = rx.borrow_and_update().clone().filter(LeaderToken::is_valid);
            if let Some(token) = token {
                let mut run = tokio::spawn(work(token.clone()));
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        run.abort();
                        return;
                    }
                    res = &mut run => {
                        if let Err(e) = res {
                            tracing::warn!(error = %e, "leader-only work failed");
                        }
                        // Ended on its own while active: wait until leadership ends.
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = token.revoked() => {}
                        }
                    }
                    _ = token.revoked() => {
                        if let Err(e) = run.await {
                            tracing::warn!(error = %e, "leader-only work failed");
                        }
                    }
                }
                // A new token may already be published.
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
        }
    }

    /// Keep the token channel in step with [`Leadership::is_active`] until `shutdown`.
    /// Returns a closure-free future the caller spawns. `on_change(active, term)` is
    /// called on every transition (metrics hooks).
    pub(crate) async fn drive(
        self,
        shutdown: CancellationToken,
        on_change: impl Fn(bool, u64) + Send + 'static,
    ) {
        let mut metrics = self.inner.metrics.clone();
        let fence = self.inner.fence.clone();
        loop {
            let view = self.view();
            let now = Instant::now();
            let until = fence.active_until(&view, now);
            let current = self.inner.tokens.borrow().clone();
            match (until, current) {
                (Some(_), Some(t)) if t.term == view.term && t.is_valid() => {}
                (Some(_), old) => {
                    if let Some(old) = old {
                        old.cancel.cancel();
                    }
                    tracing::info!(term = view.term, "this master is now active");
                    self.inner.tokens.send_replace(Some(LeaderToken {
                        term: view.term,
                        cancel: CancellationToken::new(),
                    }));
                    on_change(true, view.term);
                }
                (None, Some(old)) => {
                    old.cancel.cancel();
                    self.inner.tokens.send_replace(None);
                    tracing::info!(term = old.term, "this master is no longer active");
                    on_change(false, view.term);
                }
                (None, None) => {}
            }
            let sleep_until = until.unwrap_or(now + Duration::from_secs(1));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = metrics.changed() => if r.is_err() { break },
                _ = fence.changed.notified() => {}
                _ = tokio::time::sleep_until(sleep_until.into()) => {}
            }
        }
        if let Some(old) = self.inner.tokens.send_replace(None) {
            old.cancel.cancel();
        }
    }
}

/// When this master last accepted an `AppendEntries` from a leader (a follower's view
/// of openraft's leader lease, recorded after openraft processed the request).
#[derive(Debug, Default)]
pub(crate) struct LeaderContact(Mutex<Option<Instant>>);

impl LeaderContact {
    pub(crate) fn record(&self, at: Instant) {
        let mut c = self.0.lock().expect("leader contact lock");
        if c.is_none_or(|p| p < at) {
            *c = Some(at);
        }
    }
    pub(crate) fn last(&self) -> Option<Instant> {
        *self.0.lock().expect("leader contact lock")
    }
    /// Milliseconds since the last contact (`None`: none since this process started).
    pub(crate) fn age_ms(&self, now: Instant) -> Option<u64> {
        self.last()
            .map(|t| now.saturating_duration_since(t).as_millis() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn voters(n: u64) -> BTreeSet<NodeId> {
        (1..=n).collect()
    }

    fn view_n(term: u64, n: u64) -> RaftView {
        RaftView {
            leader_here: true,
            term,
            applied_own_term: true,
            leader: Some(1),
            voters: vec![voters(n)],
        }
    }

    fn leader_view(term: u64) -> RaftView {
        view_n(term, 3)
    }

    const LEASE: Duration = Duration::from_millis(300);

    #[test]
    fn lease_needs_a_quorum_of_acks_in_the_term() {
        let f = Fence::new(1, LEASE);
        let t0 = Instant::now();
        let v = leader_view(5);
        assert!(f.active_until(&v, t0).is_none(), "no acks yet");
        f.record_ack(4, 2, t0);
        assert!(f.active_until(&v, t0).is_none(), "ack of an older term");
        f.record_ack(5, 2, t0);
        assert_eq!(f.active_until(&v, t0), Some(t0 + LEASE));
        assert!(f.active_until(&v, t0 + LEASE).is_none(), "lease expired");
        // An older term's ack arriving late changes nothing.
        f.record_ack(4, 3, t0 + LEASE);
        assert!(f.active_until(&v, t0 + LEASE).is_none());
    }

    #[test]
    fn five_voters_need_two_acks_and_use_the_older() {
        let f = Fence::new(1, LEASE);
        let t0 = Instant::now();
        let v = view_n(2, 5);
        f.record_ack(2, 2, t0 + Duration::from_millis(50));
        assert!(f.active_until(&v, t0).is_none());
        f.record_ack(2, 3, t0);
        f.record_ack(2, 4, t0 + Duration::from_millis(10));
        // The 2nd most recent send counts.
        assert_eq!(
            f.active_until(&v, t0),
            Some(t0 + Duration::from_millis(10) + LEASE)
        );
    }

    #[test]
    fn not_active_without_own_term_applied_or_when_not_leader() {
        let f = Fence::new(1, LEASE);
        let t0 = Instant::now();
        f.record_ack(3, 2, t0);
        let mut v = leader_view(3);
        v.applied_own_term = false;
        assert!(f.active_until(&v, t0).is_none());
        let mut v = leader_view(3);
        v.leader_here = false;
        assert!(f.active_until(&v, t0).is_none());
    }

    #[test]
    fn vote_gate_refuses_while_active_and_fences_after_granting() {
        let f = Fence::new(1, LEASE);
        let t0 = Instant::now();
        let v = leader_view(3);
        f.record_ack(3, 2, t0);
        assert!(
            f.begin_vote(&v, 4, t0).is_err(),
            "active leader refuses votes"
        );
        let later = t0 + LEASE;
        assert!(f.begin_vote(&v, 4, later).is_ok());
        // A fresh ack while the vote is in flight does not make it active.
        f.record_ack(3, 2, later);
        assert!(f.active_until(&v, later).is_none());
        f.end_vote(Some((2, 4)));
        // Granted a vote in term 4: term 3 is over for good.
        f.record_ack(3, 3, later);
        assert!(f.active_until(&v, later).is_none());
        // Winning a later term works again.
        let v5 = leader_view(5);
        f.record_ack(5, 2, later);
        assert!(f.active_until(&v5, later).is_some());
    }

    #[test]
    fn refused_vote_does_not_fence() {
        let f = Fence::new(1, LEASE);
        let t0 = Instant::now();
        let v = leader_view(3);
        assert!(f.begin_vote(&v, 4, t0).is_ok());
        f.end_vote(None);
        f.record_ack(3, 2, t0);
        assert!(f.active_until(&v, t0).is_some());
    }

    #[test]
    fn joint_membership_needs_a_majority_of_both_configs() {
        let f = Fence::new(1, LEASE);
        let t0 = Instant::now();
        let mut v = leader_view(4);
        // {1,2,3} -> {1,3,4}: acks from 2 alone satisfy only the old config.
        v.voters = vec![[1, 2, 3].into(), [1, 3, 4].into()];
        f.record_ack(4, 2, t0);
        assert!(f.active_until(&v, t0).is_none());
        f.record_ack(4, 4, t0 + Duration::from_millis(5));
        assert_eq!(f.active_until(&v, t0), Some(t0 + LEASE));
        // Uninitialized (no membership): never active.
        v.voters.clear();
        assert!(f.active_until(&v, t0).is_none());
    }

    #[test]
    fn pristine_guard_and_vote_floor_refuse_votes() {
        let f = Fence::new(1, LEASE);
        let v = RaftView::default();
        let now = Instant::now();
        f.set_pristine_guard(true);
        assert!(f.begin_vote(&v, 9, now).is_err());
        f.set_pristine_guard(false);
        f.raise_vote_floor(9);
        assert!(f.begin_vote(&v, 9, now).is_err());
        assert!(f.begin_vote(&v, 10, now).is_ok());
        f.end_vote(None);
        f.set_quiet_until(now + LEASE);
        assert!(f.begin_vote(&v, 10, now).is_err());
        assert!(f.begin_vote(&v, 10, now + LEASE).is_ok());
    }

    #[test]
    fn single_master_is_its_own_quorum() {
        let f = Fence::new(1, LEASE);
        let now = Instant::now();
        assert!(f.active_until(&view_n(1, 1), now).is_some());
    }
}
