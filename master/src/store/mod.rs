//! The replicated state store: what the API layer sees of the cluster state.
//!
//! - [`kv`]: the pure state machine (revisions, compare-and-swap, history window).
//! - [`Store`]: the async interface the API, controllers and scheduler use. The real
//!   implementation replicates through Raft (see `crate::raft`); [`MemStore`] is a
//!   single-node in-memory implementation for unit tests.
//!
//! Errors split like openraft's `RaftError`: [`StoreError::is_retryable`] tells a caller
//! whether trying again (possibly on another master) can help.

pub mod kv;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::{broadcast, mpsc};

pub use kv::{
    Command, CommandResult, Event, KeyValue, KvError, KvState, Precondition, RangeResult,
};

/// Errors of store operations.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// This master is not the active one (or just lost leadership). Retry on the active.
    #[error("this master is not active{}", leader.as_ref().map(|l| format!("; the active master is {l}")).unwrap_or_default())]
    NotActive { leader: Option<String> },
    /// No quorum answered in time; the write may or may not be committed.
    #[error("timed out waiting for a quorum of masters")]
    Timeout,
    /// The watch/list revision is older than the kept history (410 Gone).
    #[error("revision {requested} is too old; the oldest available is {oldest}")]
    Compacted { requested: u64, oldest: u64 },
    /// A fatal error of this master's storage; the process should stop.
    #[error("storage failure: {0}")]
    Fatal(String),
}

impl StoreError {
    /// Whether trying again (after a pause, maybe on another master) can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::NotActive { .. } | StoreError::Timeout)
    }
}

impl From<KvError> for StoreError {
    fn from(e: KvError) -> Self {
        match e {
            KvError::Compacted { requested, oldest } => StoreError::Compacted { requested, oldest },
        }
    }
}

/// A stream of store events (revision order) for one watch.
pub type WatchReceiver = mpsc::Receiver<Result<Event, StoreError>>;

/// The cluster state as the API layer uses it. All reads are linearizable: they
/// fail with [`StoreError::NotActive`] on a master that is not active.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Replicate and apply a command; `Ok` once committed on a quorum and applied here.
    async fn write(&self, cmd: Command) -> Result<CommandResult, StoreError>;
    /// Read one key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// Read a page of keys under `prefix`, after `start_after`, at most `limit` (0 = all).
    async fn range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<RangeResult, StoreError>;
    /// Events under `prefix` with revision > `after`, then every later one, until the
    /// receiver is dropped or leadership is lost (then the stream ends with an error).
    async fn watch(&self, prefix: &str, after: u64) -> Result<WatchReceiver, StoreError>;
    /// The current store revision (applied on this master).
    fn revision(&self) -> u64;
}

/// Shared state of a store: the state machine plus a broadcast of applied events.
/// Used by both [`MemStore`] and the Raft state machine.
pub struct Applied {
    pub state: Mutex<KvState>,
    pub events: broadcast::Sender<Arc<Vec<Event>>>,
}

impl Applied {
    pub fn new(history: u64) -> Arc<Self> {
        let (events, _) = broadcast::channel(4096);
        Arc::new(Self {
            state: Mutex::new(KvState::new(history)),
            events,
        })
    }

    /// Apply a command and publish its events.
    pub fn apply(&self, cmd: &Command) -> CommandResult {
        let mut st = self.state.lock().expect("kv state lock");
        let (res, events) = st.apply(cmd);
        if !events.is_empty() {
            // Send under the lock so subscribers see events in revision order.
            let _ = self.events.send(Arc::new(events));
        }
        res
    }

    /// Start a watch: replay history after `after`, then follow live events.
    pub fn watch(&self, prefix: &str, after: u64) -> Result<WatchReceiver, StoreError> {
        let (tx, rx) = mpsc::channel(1024);
        let (backlog, mut live, mut last) = {
            let st = self.state.lock().expect("kv state lock");
            let backlog = st.events_since(prefix, after)?;
            (backlog, self.events.subscribe(), st.revision().max(after))
        };
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            for ev in backlog {
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            loop {
                match live.recv().await {
                    Ok(batch) => {
                        for ev in batch.iter() {
                            if ev.revision() <= last || !ev.key().starts_with(&prefix) {
                                continue;
                            }
                            if tx.send(Ok(ev.clone())).await.is_err() {
                                return;
                            }
                        }
                        if let Some(ev) = batch.last() {
                            last = last.max(ev.revision());
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // The watcher fell behind the live buffer: end it so the
                        // client re-watches from its last revision (or relists).
                        let _ = tx
                            .send(Err(StoreError::Compacted {
                                requested: last,
                                oldest: last,
                            }))
                            .await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(rx)
    }
}

/// A single-node, in-memory store for unit tests of the API and controllers.
pub struct MemStore {
    applied: Arc<Applied>,
}

impl MemStore {
    pub fn new() -> Self {
        Self {
            applied: Applied::new(100_000),
        }
    }
}

impl Default for MemStore {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Store for MemStore {
    async fn write(&self, cmd: Command) -> Result<CommandResult, StoreError> {
        Ok(self.applied.apply(&cmd))
    }
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.applied.state.lock().unwrap().get(key).cloned())
    }
    async fn range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<RangeResult, StoreError> {
        Ok(self
            .applied
            .state
            .lock()
            .unwrap()
            .range(prefix, start_after, limit))
    }
    async fn watch(&self, prefix: &str, after: u64) -> Result<WatchReceiver, StoreError> {
        self.applied.watch(prefix, after)
    }
    fn revision(&self) -> u64 {
        self.applied.state.lock().unwrap().revision()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memstore_watch_replays_then_follows() {
        let s = MemStore::new();
        for i in 0..3 {
            s.write(Command::Put {
                key: format!("/a/{i}"),
                value: vec![],
                expect: Precondition::Any,
            })
            .await
            .unwrap();
        }
        let mut w = s.watch("/a/", 1).await.unwrap();
        s.write(Command::Put {
            key: "/b/x".into(),
            value: vec![],
            expect: Precondition::Any,
        })
        .await
        .unwrap();
        s.write(Command::Put {
            key: "/a/9".into(),
            value: vec![],
            expect: Precondition::Any,
        })
        .await
        .unwrap();
        let revs: Vec<u64> = [
            w.recv().await.unwrap().unwrap(),
            w.recv().await.unwrap().unwrap(),
            w.recv().await.unwrap().unwrap(),
        ]
        .iter()
        .map(Event::revision)
        .collect();
        assert_eq!(revs, vec![2, 3, 5]);
    }
}
