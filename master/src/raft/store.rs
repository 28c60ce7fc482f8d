//! [`RaftStore`]: the [`Store`] the API uses, backed by the Raft group.
//!
//! - Writes go through `client_write` on the active master only; they return once the
//!   command is committed on a quorum and applied here.
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

use super::leadership::Leadership;
use super::TypeConfig;
use crate::store::{
    Applied, Command, CommandResult, KeyValue, RangeResult, Store, StoreError, WatchReceiver,
};

/// The Raft-backed store.
#[derive(Clone)]
pub struct RaftStore {
    raft: Raft<TypeConfig>,
    applied: Arc<Applied>,
    leadership: Leadership,
    write_timeout: Duration,
}

impl RaftStore {
    pub fn new(
        raft: Raft<TypeConfig>,
        applied: Arc<Applied>,
        leadership: Leadership,
        write_timeout: Duration,
    ) -> Self {
        Self {
            raft,
            applied,
            leadership,
            write_timeout,
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

#[async_trait]
impl Store for RaftStore {
    async fn write(&self, cmd: Command) -> Result<CommandResult, StoreError> {
        self.ensure_active()?;
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
}
