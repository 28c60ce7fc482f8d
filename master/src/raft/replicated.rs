//! [`RaftStore`]: the [`Store`] the API uses, backed by the Raft group.
//!
//! - Writes go through `client_write` on the active master only; they return once the
//!   command is committed on a quorum and applied here. Concurrent writes are grouped
//!   into one Raft entry ([`Command::Batch`], group commit): openraft 0.9 appends (and
//!   fsyncs) every `client_write` on its own, inside its core loop, which capped the
//!   store at one local fsync per write. A batch is proposed as soon as the previous
//!   one is answered ([`IN_FLIGHT_BATCHES`]), carrying every write queued meanwhile, so
//!   a lone write waits for nothing and a busy store sends fewer, larger entries.
//! - Reads are served from the local state machine **only while this master is active**,
//!   checked before and after reading. By the lease argument in
//!   [`super::leadership`], no other master can have been elected (let alone have
//!   committed a write) while the lease holds, and the active master has applied every
//!   entry committed before its term and every write it acknowledged in its term; so the
//!   state read is the latest committed state at some instant inside the read: reads are
//!   linearizable without a round trip per read.
//! - Watches follow the applied events and end with `NotActive` when leadership is lost.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use openraft::error::{ClientWriteError, RaftError};
use openraft::Raft;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::leadership::Leadership;
use super::TypeConfig;
use crate::store::{
    Applied, Command, CommandResult, KeyValue, RangeResult, Store, StoreError, WatchReceiver,
};

/// Batches proposed at once; more writes wait for a slot and go in the next batch. One
/// is best with openraft 0.9, whose core appends each proposal on its own: a second
/// batch in flight only splits the writes over more fsyncs (`wrk -c16` pod creates
/// through the proxy: 2 200/s with one, 1 900/s with two, 1 340/s with eight).
pub(crate) const IN_FLIGHT_BATCHES: usize = 1;
/// Most writes in one batch (one Raft entry).
pub(crate) const MAX_BATCH: usize = 128;
/// A batch is closed once its keys and values reach this many bytes.
pub(crate) const MAX_BATCH_BYTES: usize = 64 * 1024;
/// Writes waiting for a batch; callers wait for room beyond this.
const QUEUE: usize = 4096;

type Reply = oneshot::Sender<Result<CommandResult, StoreError>>;

/// The Raft-backed store.
#[derive(Clone)]
pub struct RaftStore {
    raft: Raft<TypeConfig>,
    applied: Arc<Applied>,
    leadership: Leadership,
    proposals: mpsc::Sender<(Command, Reply)>,
}

/// Proposes batches of writes (the batcher task owns one; it ends when every
/// [`RaftStore`], so every sender, is gone).
#[derive(Clone)]
struct Proposer {
    raft: Raft<TypeConfig>,
    leadership: Leadership,
    write_timeout: Duration,
    /// Writes per proposed entry.
    batch_writes: prometheus::Histogram,
}

impl RaftStore {
    /// Starts the write batcher on the current tokio runtime.
    pub fn new(
        raft: Raft<TypeConfig>,
        applied: Arc<Applied>,
        leadership: Leadership,
        write_timeout: Duration,
        batch_writes: prometheus::Histogram,
    ) -> Self {
        let (proposals, rx) = mpsc::channel(QUEUE);
        let proposer = Proposer {
            raft: raft.clone(),
            leadership: leadership.clone(),
            write_timeout,
            batch_writes,
        };
        tokio::spawn(proposer.batcher(rx));
        Self {
            raft,
            applied,
            leadership,
            proposals,
        }
    }

    /// Copy openraft's metrics into the Prometheus gauges.
    pub fn refresh_raft_metrics(&self, m: &crate::metrics::MasterMetrics) {
        let r = self.raft.metrics().borrow().clone();
        let idx = |l: Option<openraft::LogId<super::NodeId>>| l.map_or(0, |l| l.index as i64);
        m.term.set(r.current_term as i64);
        m.raft_last_log_index
            .set(r.last_log_index.unwrap_or(0) as i64);
        m.raft_applied_index.set(idx(r.last_applied));
        m.raft_snapshot_index.set(idx(r.snapshot));
        m.raft_purged_index.set(idx(r.purged));
        m.raft_is_leader
            .set((r.state == openraft::ServerState::Leader) as i64);
    }

    /// The leadership handle of this master.
    pub fn leadership(&self) -> &Leadership {
        &self.leadership
    }

    fn not_active(&self) -> StoreError {
        StoreError::NotActive {
            leader: self.leadership.status().leader,
        }
    }

    fn ensure_active(&self) -> Result<(), StoreError> {
        if self.leadership.is_active() {
            Ok(())
        } else {
            Err(self.not_active())
        }
    }

    /// Read `f(state)` linearizably: only while active, checked before and after.
    fn read<T>(&self, f: impl FnOnce(&crate::store::KvState) -> T) -> Result<T, StoreError> {
        self.ensure_active()?;
        let out = f(&self.applied.state.lock().expect("kv state lock"));
        self.ensure_active()?;
        Ok(out)
    }
}

impl Proposer {
    /// Collect queued writes into batches and propose them, at most
    /// [`IN_FLIGHT_BATCHES`] at a time. Ends when every `RaftStore` is dropped.
    async fn batcher(self, mut rx: mpsc::Receiver<(Command, Reply)>) {
        let slots = Arc::new(Semaphore::new(IN_FLIGHT_BATCHES));
        while let Some(first) = rx.recv().await {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            // everything that queued up while waiting for the slot goes in this batch
            let mut bytes = first.0.size();
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(p) => {
                        bytes += p.0.size();
                        batch.push(p);
                    }
                    Err(_) => break,
                }
            }
            let me = self.clone();
            tokio::spawn(async move {
                me.propose(batch).await;
                drop(slot);
            });
        }
    }

    /// Propose one batch and answer each of its writers.
    async fn propose(&self, batch: Vec<(Command, Reply)>) {
        let (cmds, replies): (Vec<Command>, Vec<Reply>) = batch.into_iter().unzip();
        // queued while active, but no longer (e.g. handing over): never proposed, so the
        // writer may retry anywhere
        if !self.leadership.is_active() {
            let e = StoreError::NotActive {
                leader: self.leadership.status().leader,
            };
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
            return;
        }
        let n = cmds.len();
        self.batch_writes.observe(n as f64);
        let cmd = if n == 1 {
            cmds.into_iter().next().expect("one command")
        } else {
            Command::Batch { cmds }
        };
        match self.client_write(cmd).await {
            Ok(results) if results.len() == n => {
                for (reply, r) in replies.into_iter().zip(results) {
                    let _ = reply.send(Ok(r));
                }
            }
            Ok(results) => {
                let e = StoreError::Fatal(format!(
                    "a batch of {n} writes was applied with {} results",
                    results.len()
                ));
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    async fn client_write(&self, cmd: Command) -> Result<Vec<CommandResult>, StoreError> {
        match tokio::time::timeout(self.write_timeout, self.raft.client_write(cmd)).await {
            Err(_) => Err(StoreError::Timeout),
            Ok(Ok(resp)) => Ok(resp.data),
            // Returned before the entry was proposed or after it was truncated: it is not
            // and will never be committed.
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(StoreError::NotActive {
                    leader: f
                        .leader_id
                        .and_then(|id| self.leadership.name_of(id))
                        .filter(|n| *n != self.leadership.my_name()),
                })
            }
            Ok(Err(RaftError::APIError(e))) => Err(StoreError::Fatal(format!(
                "unexpected membership error on a plain write: {e}"
            ))),
            Ok(Err(RaftError::Fatal(e))) => Err(StoreError::Fatal(format!("raft stopped: {e}"))),
        }
    }
}

#[async_trait]
impl Store for RaftStore {
    async fn write(&self, cmd: Command) -> Result<CommandResult, StoreError> {
        self.ensure_active()?;
        let (reply, answer) = oneshot::channel();
        if self.proposals.send((cmd, reply)).await.is_err() {
            return Err(StoreError::Fatal("the write batcher stopped".into()));
        }
        // The batcher answers every write it took (its proposal has its own timeout);
        // no answer means it was dropped mid-proposal: the outcome is unknown.
        let res = answer.await.unwrap_or(Err(StoreError::Timeout));
        if res.is_ok() {
            crate::store::unacted::committed();
        }
        res
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.read(|st| st.get(key).cloned())
    }

    async fn range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<RangeResult, StoreError> {
        self.read(|st| st.range(prefix, start_after, limit))
    }

    async fn watch(&self, prefix: &str, after: u64) -> Result<WatchReceiver, StoreError> {
        let token = self.leadership.token().ok_or_else(|| self.not_active())?;
        let inner = self.applied.watch(prefix, after)?;
        self.ensure_active()?;
        let me = self.clone();
        Ok(inner.ended_by(token.cancellation(), move || me.not_active()))
    }

    fn revision(&self) -> u64 {
        self.applied.state.lock().expect("kv state lock").revision()
    }

    fn range_local(&self, prefix: &str) -> RangeResult {
        self.applied
            .state
            .lock()
            .expect("kv state lock")
            .range(prefix, None, 0)
    }
}
