//! The replicated state store: what the API layer sees of the cluster state.
//!
//! - [`kv`]: the pure state machine (revisions, compare-and-swap, history window).
//! - [`Store`]: the async interface the API, controllers and scheduler use. The real
//!   implementation replicates through Raft (see `crate::raft`); [`MemStore`] is a
//!   single-node in-memory implementation for unit tests.
//! - [`Applied`]: the applied state plus the watch hub, which routes each applied event
//!   only to the watches whose key prefix it falls under ([`WatchReceiver`]).
//!
//! Errors split like openraft's `RaftError`: [`StoreError::is_retryable`] tells a caller
//! whether trying again (possibly on another master) can help.

pub(crate) mod kv;
pub(crate) mod unacted;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub(crate) use kv::{
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
    /// Every key under `prefix` as applied on this master, active or not: may lag the
    /// cluster on a standby. For caches that tolerate that (the RBAC policy), never for
    /// answering API reads.
    fn range_local(&self, prefix: &str) -> RangeResult;
}

/// Shared state of a store: the state machine plus the watchers of applied events.
/// Used by both [`MemStore`] and the Raft state machine.
///
/// Events are routed to watchers by key prefix as they are applied: a write wakes
/// only the watches whose prefix it falls under, so thousands of nodes each watching
/// their pods are not woken by every lease renewal.
pub struct Applied {
    pub state: Mutex<KvState>,
    hub: Mutex<WatchHub>,
}

impl Applied {
    pub fn new(history: u64) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(KvState::new(history)),
            hub: Mutex::new(WatchHub::default()),
        })
    }

    /// Apply a command and publish its events.
    pub fn apply(&self, cmd: &Command) -> CommandResult {
        self.publish(|st| st.apply(cmd))
    }

    /// Apply one Raft entry's command; one result per command of a [`Command::Batch`].
    pub fn apply_entry(&self, cmd: &Command) -> Vec<CommandResult> {
        self.publish(|st| st.apply_entry(cmd))
    }

    fn publish<T>(&self, apply: impl FnOnce(&mut KvState) -> (T, Vec<Event>)) -> T {
        let mut st = self.state.lock().expect("kv state lock");
        let (res, events) = apply(&mut st);
        if !events.is_empty() {
            // Dispatch under the state lock so watchers see events in revision order
            // and a watch registered under that lock misses none.
            let mut hub = self.hub.lock().expect("watch hub lock");
            for ev in &events {
                hub.dispatch(ev);
            }
        }
        res
    }

    /// Start a watch: replay history after `after`, then follow live events.
    pub fn watch(&self, prefix: &str, after: u64) -> Result<WatchReceiver, StoreError> {
        let (tx, live) = mpsc::channel(WATCH_BUFFER);
        let lagged = Arc::new(AtomicBool::new(false));
        let st = self.state.lock().expect("kv state lock");
        let backlog = st.events_since(prefix, after)?;
        self.hub.lock().expect("watch hub lock").add(
            prefix,
            Watcher {
                tx,
                lagged: lagged.clone(),
            },
        );
        Ok(WatchReceiver {
            backlog: backlog.into(),
            live,
            last: st.revision().max(after),
            lagged,
            end: None,
            done: false,
        })
    }

    /// How many watches are registered (closed ones are swept lazily).
    pub fn watchers(&self) -> usize {
        self.hub.lock().expect("watch hub lock").count
    }
}

/// Most live events a watcher may have queued; one that falls further behind is
/// ended with [`StoreError::Compacted`] so that its client re-lists.
const WATCH_BUFFER: usize = 8192;

struct Watcher {
    tx: mpsc::Sender<Event>,
    lagged: Arc<AtomicBool>,
}

/// Watchers by key prefix.
#[derive(Default)]
struct WatchHub {
    by_prefix: HashMap<String, Vec<Watcher>>,
    /// Distinct prefix lengths in use, with how many prefixes have each.
    lengths: BTreeMap<usize, usize>,
    count: usize,
    added_since_sweep: usize,
}

impl WatchHub {
    fn add(&mut self, prefix: &str, w: Watcher) {
        self.added_since_sweep += 1;
        if self.added_since_sweep > self.count.max(64) {
            self.sweep();
        }
        let list = self.by_prefix.entry(prefix.to_string()).or_default();
        if list.is_empty() {
            *self.lengths.entry(prefix.len()).or_default() += 1;
        }
        list.push(w);
        self.count += 1;
    }

    /// Drop watchers whose receiver is gone. Amortized: runs after as many adds as
    /// there are watchers, so watches on keys that never change do not pile up.
    fn sweep(&mut self) {
        self.added_since_sweep = 0;
        let mut emptied = Vec::new();
        for (p, list) in self.by_prefix.iter_mut() {
            let before = list.len();
            list.retain(|w| !w.tx.is_closed());
            self.count -= before - list.len();
            if list.is_empty() {
                emptied.push(p.clone());
            }
        }
        for p in emptied {
            self.remove_prefix(&p);
        }
    }

    fn remove_prefix(&mut self, p: &str) {
        self.by_prefix.remove(p);
        if let Some(n) = self.lengths.get_mut(&p.len()) {
            *n -= 1;
            if *n == 0 {
                self.lengths.remove(&p.len());
            }
        }
    }

    fn dispatch(&mut self, ev: &Event) {
        let key = ev.key();
        let lens: Vec<usize> = self
            .lengths
            .range(..=key.len())
            .map(|(l, _)| *l)
            .filter(|l| key.is_char_boundary(*l))
            .collect();
        for l in lens {
            let p = &key[..l];
            let Some(list) = self.by_prefix.get_mut(p) else {
                continue;
            };
            let before = list.len();
            list.retain(|w| match w.tx.try_send(ev.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    w.lagged.store(true, Ordering::Release);
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
            self.count -= before - list.len();
            if list.is_empty() {
                let p = p.to_string();
                self.remove_prefix(&p);
            }
        }
    }
}

/// A stream of store events (revision order) for one watch: the history after the
/// requested revision first, then live events as they are applied.
pub struct WatchReceiver {
    backlog: VecDeque<Event>,
    live: mpsc::Receiver<Event>,
    /// Live events up to this revision were in the backlog (or not asked for).
    last: u64,
    lagged: Arc<AtomicBool>,
    /// Ends the stream with an error once the token is cancelled (leadership lost).
    end: Option<(CancellationToken, NotActiveError)>,
    done: bool,
}

type NotActiveError = Box<dyn Fn() -> StoreError + Send + Sync>;

impl WatchReceiver {
    /// End this stream with `err()` as soon as `token` is cancelled.
    pub fn ended_by(
        mut self,
        token: CancellationToken,
        err: impl Fn() -> StoreError + Send + Sync + 'static,
    ) -> Self {
        self.end = Some((token, Box::new(err)));
        self
    }

    /// Discard every event already queued (for callers that only need "something
    /// changed"). A lag or a cancelled token still shows on the next [`Self::recv`].
    pub fn discard_queued(&mut self) {
        self.backlog.clear();
        while let Ok(ev) = self.live.try_recv() {
            self.last = self.last.max(ev.revision());
        }
    }

    /// The next event; `None` once the stream has ended (after its error, if any).
    pub async fn recv(&mut self) -> Option<Result<Event, StoreError>> {
        if self.done {
            return None;
        }
        if let Some((token, err)) = &self.end {
            if token.is_cancelled() {
                self.done = true;
                return Some(Err(err()));
            }
        }
        if let Some(ev) = self.backlog.pop_front() {
            return Some(Ok(ev));
        }
        loop {
            let next = match &self.end {
                Some((token, err)) => tokio::select! {
                    biased;
                    _ = token.cancelled() => {
                        self.done = true;
                        return Some(Err(err()));
                    }
                    ev = self.live.recv() => ev,
                },
                None => self.live.recv().await,
            };
            match next {
                Some(ev) if ev.revision() <= self.last => continue,
                Some(ev) => {
                    self.last = ev.revision();
                    return Some(Ok(ev));
                }
                None => {
                    self.done = true;
                    // Fell behind the live buffer: end with 410 so the client re-lists.
                    return self.lagged.load(Ordering::Acquire).then_some(Err(
                        StoreError::Compacted {
                            requested: self.last,
                            oldest: self.last,
                        },
                    ));
                }
            }
        }
    }
}

/// A single-node, in-memory store for unit tests of the API and controllers.
#[cfg(test)]
pub(crate) struct MemStore {
    applied: Arc<Applied>,
}

#[cfg(test)]
impl MemStore {
    pub(crate) fn new() -> Self {
        Self {
            applied: Applied::new(100_000),
        }
    }
}

#[cfg(test)]
impl Default for MemStore {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
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
    fn range_local(&self, prefix: &str) -> RangeResult {
        self.applied.state.lock().unwrap().range(prefix, None, 0)
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

#[cfg(test)]
mod hub_tests {
    use super::*;

    fn put(a: &Applied, key: &str) {
        a.apply(&Command::Put {
            key: key.into(),
            value: vec![],
            expect: Precondition::Any,
        });
    }

    #[tokio::test]
    async fn events_reach_only_watches_under_their_prefix() {
        let a = Applied::new(100);
        let mut pods = a.watch("/registry/pods/", 0).unwrap();
        let mut one = a.watch("/registry/pods/ns/p1", 0).unwrap();
        let mut leases = a.watch("/registry/leases/", 0).unwrap();
        put(&a, "/registry/leases/n1");
        put(&a, "/registry/pods/ns/p1");
        put(&a, "/registry/pods/ns/p2");
        assert_eq!(pods.recv().await.unwrap().unwrap().revision(), 2);
        assert_eq!(pods.recv().await.unwrap().unwrap().revision(), 3);
        assert_eq!(
            one.recv().await.unwrap().unwrap().key(),
            "/registry/pods/ns/p1"
        );
        assert_eq!(leases.recv().await.unwrap().unwrap().revision(), 1);
        // Nothing else is queued for the lease or single-pod watches.
        assert!(one.live.try_recv().is_err());
        assert!(leases.live.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_watcher_that_falls_behind_ends_with_compacted() {
        let a = Applied::new(100);
        let mut w = a.watch("/k/", 0).unwrap();
        for i in 0..=WATCH_BUFFER {
            put(&a, &format!("/k/{i}"));
        }
        assert_eq!(
            a.watchers(),
            0,
            "the lagging watcher was dropped from the hub"
        );
        let mut n = 0;
        let end = loop {
            match w.recv().await {
                Some(Ok(_)) => n += 1,
                other => break other,
            }
        };
        assert_eq!(n, WATCH_BUFFER);
        assert!(matches!(end, Some(Err(StoreError::Compacted { .. }))));
        assert!(w.recv().await.is_none());
    }

    #[tokio::test]
    async fn dropped_watches_are_swept() {
        let a = Applied::new(100);
        for i in 0..200 {
            drop(a.watch(&format!("/never/changes/{i}"), 0).unwrap());
        }
        let _kept = a.watch("/kept/", 0).unwrap();
        assert!(
            a.watchers() < 200,
            "closed watchers swept: {}",
            a.watchers()
        );
    }

    #[tokio::test]
    async fn a_cancelled_token_ends_the_stream_with_its_error() {
        let a = Applied::new(100);
        put(&a, "/k/1");
        let token = CancellationToken::new();
        let mut w = a
            .watch("/k/", 0)
            .unwrap()
            .ended_by(token.clone(), || StoreError::NotActive { leader: None });
        assert!(w.recv().await.unwrap().is_ok(), "backlog first");
        token.cancel();
        put(&a, "/k/2");
        assert!(matches!(
            w.recv().await,
            Some(Err(StoreError::NotActive { .. }))
        ));
        assert!(w.recv().await.is_none());
    }
}
