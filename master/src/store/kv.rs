//! The pure, deterministic key-value state machine (etcd-like) that every master
//! replicates. It knows nothing about Raft or I/O: Raft feeds it committed
//! [`Command`]s in log order; the API reads from it.
//!
//! - One global `revision`, bumped by every committed write (also by a failed
//!   compare-and-swap? no: only successful writes bump it, like etcd).
//! - Per key: `create_revision` and `mod_revision`.
//! - A bounded history of events for watches; asking for revisions older than the
//!   window gives [`KvError::Compacted`]. The history is indexed by resource
//!   (`/registry/<resource>/`), so a watch starting from an old revision reads only its
//!   own resource's events, not every write since.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Serde of stored values in the Raft log, its messages and snapshots: raw bytes in
/// binary formats (the MessagePack log and RPCs); in JSON (snapshots, older logs) a
/// string when the value is UTF-8 (every Kubernetes object is JSON text), else bytes. A
/// `Vec<u8>` would be a JSON array of numbers: ~3.5× the size and far slower to encode
/// and parse. Reads strings, bytes and arrays of numbers (logs written before this format).
mod text_bytes {
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer, T: AsRef<[u8]>>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        let v = v.as_ref();
        if !s.is_human_readable() {
            // binary formats (the Raft log and RPCs): the bytes as they are
            return s.serialize_bytes(v);
        }
        match std::str::from_utf8(v) {
            Ok(t) => s.serialize_str(t),
            Err(_) => s.serialize_bytes(v),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>, T: From<Vec<u8>>>(
        d: D,
    ) -> Result<T, D::Error> {
        d.deserialize_any(TextOrBytes).map(T::from)
    }

    struct TextOrBytes;

    /// The most a sequence's declared length reserves up front.
    const PREALLOCATE: usize = 64 * 1024;

    impl<'de> Visitor<'de> for TextOrBytes {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string or bytes")
        }
        fn visit_str<E: Error>(self, v: &str) -> Result<Vec<u8>, E> {
            Ok(v.as_bytes().to_vec())
        }
        fn visit_string<E: Error>(self, v: String) -> Result<Vec<u8>, E> {
            Ok(v.into_bytes())
        }
        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            // The length is what the message declares, not what it holds: reserve no more
            // than a small start (a 3 GB claim in a 100-byte entry must not allocate 3 GB).
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(PREALLOCATE));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use serde::de::value::{Error as ValueError, U8Deserializer};
        use serde::de::{DeserializeSeed, IntoDeserializer};

        /// A sequence that declares far more elements than it holds.
        struct Claims(std::vec::IntoIter<u8>);

        impl<'de> SeqAccess<'de> for Claims {
            type Error = ValueError;
            fn next_element_seed<T: DeserializeSeed<'de>>(
                &mut self,
                seed: T,
            ) -> Result<Option<T::Value>, ValueError> {
                self.0
                    .next()
                    .map(|b| {
                        let d: U8Deserializer<ValueError> = b.into_deserializer();
                        seed.deserialize(d)
                    })
                    .transpose()
            }
            fn size_hint(&self) -> Option<usize> {
                Some(isize::MAX as usize)
            }
        }

        #[test]
        fn a_declared_length_reserves_no_more_than_a_small_start() {
            // (found by the raft_log_entry fuzz target: a 131-byte entry declaring a
            // 3.3 GB value aborted on the allocation)
            let out = TextOrBytes
                .visit_seq(Claims(vec![1, 2].into_iter()))
                .unwrap();
            assert_eq!(out, vec![1, 2]);
            assert!(out.capacity() <= PREALLOCATE);
        }
    }
}

/// A stored key with its revisions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    /// Shared, so that the history, watch events and snapshots do not copy values.
    #[serde(with = "text_bytes")]
    pub value: Bytes,
    pub create_revision: u64,
    pub mod_revision: u64,
}

/// What a write expects to find (optimistic concurrency).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Precondition {
    /// No check.
    Any,
    /// The key must not exist (create).
    Absent,
    /// The key must exist (any revision).
    Exists,
    /// The key must exist with exactly this mod revision (compare-and-swap).
    ModRevision(u64),
}

/// A replicated write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Put {
        key: String,
        #[serde(with = "text_bytes")]
        value: Vec<u8>,
        expect: Precondition,
    },
    Delete {
        key: String,
        expect: Precondition,
    },
    /// Several writes applied atomically at one revision, all preconditions checked first.
    Txn {
        ops: Vec<Command>,
    },
    /// No change; used to confirm leadership / advance nothing.
    Noop,
    /// Independent writes proposed together in one Raft entry (group commit): each is
    /// applied in turn with its own precondition, revision and result, exactly as if
    /// each were an entry of its own. Never nested.
    Batch {
        cmds: Vec<Command>,
    },
}

impl Command {
    /// Bytes of keys and values it carries (what its log entry's size grows with).
    pub fn size(&self) -> usize {
        match self {
            Command::Put { key, value, .. } => key.len() + value.len(),
            Command::Delete { key, .. } => key.len(),
            Command::Txn { ops } => ops.iter().map(Command::size).sum(),
            Command::Batch { cmds } => cmds.iter().map(Command::size).sum(),
            Command::Noop => 0,
        }
    }
}

/// The outcome of applying one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// Applied; `revision` is the store revision after it; `prev` the old values.
    Ok {
        revision: u64,
        prev: Vec<Option<KeyValue>>,
    },
    /// A precondition failed; nothing changed. `current` is the key's current value.
    Conflict {
        key: String,
        current: Option<KeyValue>,
        revision: u64,
    },
}

/// One change, as watchers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    Put {
        kv: KeyValue,
        prev: Option<KeyValue>,
    },
    Delete {
        prev: KeyValue,
        revision: u64,
    },
}

impl Event {
    pub fn revision(&self) -> u64 {
        match self {
            Event::Put { kv, .. } => kv.mod_revision,
            Event::Delete { revision, .. } => *revision,
        }
    }
    pub fn key(&self) -> &str {
        match self {
            Event::Put { kv, .. } => &kv.key,
            Event::Delete { prev, .. } => &prev.key,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// The requested revision is older than the kept history (410 Gone in the API).
    #[error("revision {requested} is compacted; oldest available is {oldest}")]
    Compacted { requested: u64, oldest: u64 },
}

/// A page of a range read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeResult {
    pub kvs: Vec<KeyValue>,
    /// More keys follow the last one returned.
    pub more: bool,
    /// The store revision the page was read at.
    pub revision: u64,
}

/// The whole state, serializable as a snapshot.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KvState {
    revision: u64,
    data: BTreeMap<String, KeyValue>,
    /// Events in revision order (a Txn's events share one revision).
    history: VecDeque<Event>,
    /// Number of revisions of history to keep.
    history_limit: u64,
    /// Lowest revision from which a watch can still start (exclusive start).
    compacted: u64,
    /// Derived, not serialized: see [`HistoryIndex`].
    #[serde(skip)]
    index: HistoryIndex,
}

/// The positions in the history of each resource's events (`/registry/pods/` → ...), so
/// that starting a watch from an old revision reads only that resource's events. When
/// thousands of watches start at once (nodes re-watching after a failover) and most writes
/// are to other resources (lease renewals), scanning every event since each watch's
/// revision under the state lock held up writes for seconds.
///
/// A position is a sequence number: `history[i]` has position `base + i`. Rebuilt from the
/// history when it does not cover it (a state loaded from a snapshot); until then watches
/// scan the whole history, which is correct, only slower.
#[derive(Debug, Clone, Default)]
struct HistoryIndex {
    by_resource: HashMap<Box<str>, VecDeque<u64>>,
    /// Position of `history[0]`.
    base: u64,
    /// Events indexed; equal to the history's length when the index is usable.
    len: usize,
}

/// `/registry/<resource>/` of a key or key prefix; `""` for keys outside that layout and
/// for prefixes that name no single resource.
fn resource_of(key: &str) -> &str {
    const ROOT: &str = "/registry/";
    key.strip_prefix(ROOT)
        .and_then(|rest| rest.find('/'))
        .map_or("", |i| &key[..ROOT.len() + i + 1])
}

impl HistoryIndex {
    fn rebuild(history: &VecDeque<Event>) -> Self {
        let mut index = Self::default();
        for e in history {
            index.push(e.key());
        }
        index
    }

    fn push(&mut self, key: &str) {
        let pos = self.base + self.len as u64;
        let resource = resource_of(key);
        match self.by_resource.get_mut(resource) {
            Some(q) => q.push_back(pos),
            None => {
                self.by_resource
                    .insert(resource.into(), VecDeque::from([pos]));
            }
        }
        self.len += 1;
    }

    /// The oldest event (with `key`) left the history.
    fn pop_front(&mut self, key: &str) {
        let resource = resource_of(key);
        if let Some(q) = self.by_resource.get_mut(resource) {
            debug_assert_eq!(q.front(), Some(&self.base));
            q.pop_front();
            if q.is_empty() {
                self.by_resource.remove(resource);
            }
        }
        self.base += 1;
        self.len -= 1;
    }
}

impl KvState {
    pub fn new(history_limit: u64) -> Self {
        Self {
            history_limit: history_limit.max(1),
            ..Self::default()
        }
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Number of revisions of history kept for watches.
    pub fn history_limit(&self) -> u64 {
        self.history_limit
    }

    /// Change the history window (e.g. after loading a snapshot written with another one).
    /// A smaller window takes effect at the next write.
    pub fn set_history_limit(&mut self, limit: u64) {
        self.history_limit = limit.max(1);
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&KeyValue> {
        self.data.get(key)
    }

    /// Keys starting with `prefix`, strictly after `start_after` when given, at most `limit`
    /// (0 = unlimited).
    pub fn range(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> RangeResult {
        use std::ops::Bound;
        let lower = match start_after {
            Some(k) if k >= prefix => Bound::Excluded(k.to_string()),
            _ => Bound::Included(prefix.to_string()),
        };
        let mut iter = self
            .data
            .range((lower, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v);
        let mut kvs = Vec::new();
        let mut more = false;
        for kv in iter.by_ref() {
            if limit != 0 && kvs.len() == limit {
                more = true;
                break;
            }
            kvs.push(kv.clone());
        }
        RangeResult {
            kvs,
            more,
            revision: self.revision,
        }
    }

    /// Events with revision > `after` whose key starts with `prefix`.
    pub fn events_since(&self, prefix: &str, after: u64) -> Result<Vec<Event>, KvError> {
        if after < self.compacted {
            return Err(KvError::Compacted {
                requested: after,
                oldest: self.compacted,
            });
        }
        // The history is in revision order: skip to the first event after `after`
        // (binary search) instead of scanning the whole window under the state lock —
        // thousands of watches start at once when nodes register or re-watch.
        let resource = resource_of(prefix);
        if resource.is_empty() || self.index.len != self.history.len() {
            let start = self.history.partition_point(|e| e.revision() <= after);
            return Ok(self
                .history
                .range(start..)
                .filter(|e| e.key().starts_with(prefix))
                .cloned()
                .collect());
        }
        let Some(positions) = self.index.by_resource.get(resource) else {
            return Ok(Vec::new());
        };
        let at = |pos: &u64| &self.history[(*pos - self.index.base) as usize];
        let start = positions.partition_point(|p| at(p).revision() <= after);
        Ok(positions
            .range(start..)
            .map(at)
            .filter(|e| e.key().starts_with(prefix))
            .cloned()
            .collect())
    }

    /// Oldest revision a watch may start after.
    pub fn compacted_revision(&self) -> u64 {
        self.compacted
    }

    fn check(&self, key: &str, expect: Precondition) -> bool {
        let cur = self.data.get(key);
        match expect {
            Precondition::Any => true,
            Precondition::Absent => cur.is_none(),
            Precondition::Exists => cur.is_some(),
            Precondition::ModRevision(r) => cur.map(|kv| kv.mod_revision) == Some(r),
        }
    }

    fn flatten(cmd: &Command) -> Vec<&Command> {
        match cmd {
            Command::Txn { ops } => ops.iter().flat_map(Self::flatten).collect(),
            // not produced by the API; a batch inside a transaction changes nothing
            Command::Noop | Command::Batch { .. } => vec![],
            other => vec![other],
        }
    }

    /// Apply one Raft entry's command: a [`Command::Batch`] yields one result per command
    /// in it, anything else one result. Returns the results and the events produced.
    pub fn apply_entry(&mut self, cmd: &Command) -> (Vec<CommandResult>, Vec<Event>) {
        match cmd {
            Command::Batch { cmds } => {
                let mut results = Vec::with_capacity(cmds.len());
                let mut events = Vec::with_capacity(cmds.len());
                for c in cmds {
                    let (r, mut ev) = self.apply(c);
                    results.push(r);
                    events.append(&mut ev);
                }
                (results, events)
            }
            other => {
                let (r, ev) = self.apply(other);
                (vec![r], ev)
            }
        }
    }

    /// Apply a committed command; returns the result and the events it produced. For a
    /// [`Command::Batch`] (see [`Self::apply_entry`]) the result is its last command's.
    pub fn apply(&mut self, cmd: &Command) -> (CommandResult, Vec<Event>) {
        if let Command::Batch { .. } = cmd {
            let (mut results, events) = self.apply_entry(cmd);
            let last = results.pop().unwrap_or(CommandResult::Ok {
                revision: self.revision,
                prev: vec![],
            });
            return (last, events);
        }
        let ops = Self::flatten(cmd);
        for op in &ops {
            let (key, expect) = match op {
                Command::Put { key, expect, .. } | Command::Delete { key, expect } => {
                    (key, *expect)
                }
                _ => unreachable!("flattened"),
            };
            if !self.check(key, expect) {
                return (
                    CommandResult::Conflict {
                        key: key.clone(),
                        current: self.data.get(key).cloned(),
                        revision: self.revision,
                    },
                    vec![],
                );
            }
        }
        if ops.is_empty() {
            return (
                CommandResult::Ok {
                    revision: self.revision,
                    prev: vec![],
                },
                vec![],
            );
        }
        let rev = self.revision + 1;
        let mut prevs = Vec::with_capacity(ops.len());
        let mut events = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Command::Put { key, value, .. } => {
                    let prev = self.data.get(key).cloned();
                    let kv = KeyValue {
                        key: key.clone(),
                        value: Bytes::copy_from_slice(value),
                        create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
                        mod_revision: rev,
                    };
                    self.data.insert(key.clone(), kv.clone());
                    events.push(Event::Put {
                        kv,
                        prev: prev.clone(),
                    });
                    prevs.push(prev);
                }
                Command::Delete { key, .. } => {
                    let prev = self.data.remove(key);
                    if let Some(p) = &prev {
                        events.push(Event::Delete {
                            prev: p.clone(),
                            revision: rev,
                        });
                    }
                    prevs.push(prev);
                }
                _ => unreachable!("flattened"),
            }
        }
        if events.is_empty() {
            // Deletes of missing keys change nothing and do not bump the revision.
            return (
                CommandResult::Ok {
                    revision: self.revision,
                    prev: prevs,
                },
                vec![],
            );
        }
        self.revision = rev;
        if self.index.len != self.history.len() {
            self.index = HistoryIndex::rebuild(&self.history);
        }
        for e in &events {
            self.index.push(e.key());
            self.history.push_back(e.clone());
        }
        while let Some(front) = self.history.front() {
            if front.revision() + self.history_limit <= self.revision {
                self.compacted = front.revision();
                self.index.pop_front(front.key());
                self.history.pop_front();
            } else {
                break;
            }
        }
        (
            CommandResult::Ok {
                revision: rev,
                prev: prevs,
            },
            events,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str, v: &str, expect: Precondition) -> Command {
        Command::Put {
            key: k.into(),
            value: v.as_bytes().to_vec(),
            expect,
        }
    }

    #[test]
    fn revisions_and_cas() {
        let mut s = KvState::new(100);
        let (r, ev) = s.apply(&put("/a", "1", Precondition::Absent));
        assert!(matches!(r, CommandResult::Ok { revision: 1, .. }));
        assert_eq!(ev.len(), 1);
        let (r, _) = s.apply(&put("/a", "2", Precondition::Absent));
        assert!(matches!(r, CommandResult::Conflict { .. }));
        assert_eq!(s.revision(), 1);
        let (r, _) = s.apply(&put("/a", "2", Precondition::ModRevision(1)));
        assert!(matches!(r, CommandResult::Ok { revision: 2, .. }));
        let kv = s.get("/a").unwrap();
        assert_eq!((kv.create_revision, kv.mod_revision), (1, 2));
        let (r, _) = s.apply(&put("/a", "3", Precondition::ModRevision(1)));
        assert!(matches!(r, CommandResult::Conflict { .. }));
    }

    #[test]
    fn range_pages_with_limit_and_continue() {
        let mut s = KvState::new(100);
        for k in ["/p/a", "/p/b", "/p/c", "/q/a"] {
            s.apply(&put(k, "x", Precondition::Any));
        }
        let r = s.range("/p/", None, 2);
        assert_eq!(r.kvs.len(), 2);
        assert!(r.more);
        let r2 = s.range("/p/", Some(&r.kvs[1].key), 2);
        assert_eq!(r2.kvs.len(), 1);
        assert_eq!(r2.kvs[0].key, "/p/c");
        assert!(!r2.more);
        assert_eq!(s.range("/", None, 0).kvs.len(), 4);
    }

    #[test]
    fn batch_applies_each_command_on_its_own() {
        let mut s = KvState::new(100);
        s.apply(&put("/a", "1", Precondition::Any));
        let batch = Command::Batch {
            cmds: vec![
                put("/b", "1", Precondition::Absent),
                // conflicts: only this one fails, the others still apply
                put("/a", "2", Precondition::Absent),
                put("/c", "1", Precondition::Absent),
                Command::Delete {
                    key: "/b".into(),
                    expect: Precondition::ModRevision(2),
                },
            ],
        };
        let (results, events) = s.apply_entry(&batch);
        assert_eq!(results.len(), 4);
        assert!(matches!(results[0], CommandResult::Ok { revision: 2, .. }));
        assert!(matches!(
            results[1],
            CommandResult::Conflict { revision: 2, .. }
        ));
        assert!(matches!(results[2], CommandResult::Ok { revision: 3, .. }));
        // sees the write made earlier in the same batch
        assert!(matches!(results[3], CommandResult::Ok { revision: 4, .. }));
        let revs: Vec<u64> = events.iter().map(Event::revision).collect();
        assert_eq!(revs, [2, 3, 4]);
        assert!(s.get("/b").is_none());
        assert_eq!(s.get("/a").unwrap().value.as_ref(), b"1");
        // a plain command is one result; a batch given to `apply` answers with its last
        let (results, _) = s.apply_entry(&put("/d", "1", Precondition::Any));
        assert!(matches!(
            results[..],
            [CommandResult::Ok { revision: 5, .. }]
        ));
        let (last, _) = s.apply(&Command::Batch {
            cmds: vec![put("/e", "1", Precondition::Any)],
        });
        assert!(matches!(last, CommandResult::Ok { revision: 6, .. }));
        let (empty, ev) = s.apply(&Command::Batch { cmds: vec![] });
        assert!(matches!(empty, CommandResult::Ok { revision: 6, .. }));
        assert!(ev.is_empty());
    }

    #[test]
    fn txn_is_atomic() {
        let mut s = KvState::new(100);
        s.apply(&put("/a", "1", Precondition::Any));
        let txn = Command::Txn {
            ops: vec![
                put("/b", "1", Precondition::Absent),
                put("/a", "2", Precondition::Absent),
            ],
        };
        let (r, _) = s.apply(&txn);
        assert!(matches!(r, CommandResult::Conflict { .. }));
        assert!(s.get("/b").is_none());
    }

    #[test]
    fn history_window_and_compaction() {
        let mut s = KvState::new(3);
        for i in 0..10 {
            s.apply(&put("/k", &i.to_string(), Precondition::Any));
        }
        assert_eq!(s.revision(), 10);
        assert!(s.events_since("/", 9).unwrap().len() == 1);
        assert_eq!(s.events_since("/", 7).unwrap().len(), 3);
        assert!(matches!(
            s.events_since("/", 2),
            Err(KvError::Compacted { .. })
        ));
    }

    /// What `events_since` must return: every kept event after `after` under `prefix`.
    fn scan(s: &KvState, prefix: &str, after: u64) -> Vec<Event> {
        s.history
            .iter()
            .filter(|e| e.revision() > after && e.key().starts_with(prefix))
            .cloned()
            .collect()
    }

    #[test]
    fn history_index_agrees_with_a_full_scan() {
        let mut s = KvState::new(40);
        let keys = [
            "/registry/leases/kube-node-lease/n1",
            "/registry/pods/default/p1",
            "/registry/leases/kube-node-lease/n2",
            "/registry/pods/kube-system/p2",
            "/registry/nodes/n1",
            "/other",
            "/registry/podtemplates/default/t",
        ];
        let prefixes = [
            "/registry/pods/",
            "/registry/pods/default/",
            "/registry/pods/default/p1",
            "/registry/leases/",
            "/registry/nodes/",
            "/registry/podtemplates/",
            "/registry/services/",
            "/registry/",
            "/registry/pods",
            "/",
            "",
        ];
        let check = |s: &KvState| {
            for p in prefixes {
                for after in [
                    s.compacted_revision(),
                    s.revision().saturating_sub(7),
                    s.revision(),
                ] {
                    assert_eq!(
                        s.events_since(p, after).unwrap(),
                        scan(s, p, after),
                        "{p} after {after}"
                    );
                }
            }
        };
        for i in 0..100 {
            let key = keys[i % keys.len()];
            if i % 11 == 10 {
                s.apply(&Command::Delete {
                    key: key.into(),
                    expect: Precondition::Any,
                });
            } else {
                s.apply(&put(key, &i.to_string(), Precondition::Any));
            }
            check(&s);
        }
        assert!(s.compacted_revision() > 0, "the window moved");
        assert_eq!(s.index.len, s.history.len());
        // A state read back from a snapshot has no index: correct answers at once, and
        // the index is rebuilt by the next write.
        let mut back: KvState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back.index.len, 0);
        check(&back);
        back.apply(&put("/registry/pods/default/p9", "x", Precondition::Any));
        assert_eq!(back.index.len, back.history.len());
        check(&back);
    }

    #[test]
    fn delete_emits_event_and_missing_delete_is_noop() {
        let mut s = KvState::new(10);
        s.apply(&put("/a", "1", Precondition::Any));
        let (_, ev) = s.apply(&Command::Delete {
            key: "/a".into(),
            expect: Precondition::Any,
        });
        assert!(matches!(ev[0], Event::Delete { revision: 2, .. }));
        let (r, ev) = s.apply(&Command::Delete {
            key: "/a".into(),
            expect: Precondition::Any,
        });
        assert!(ev.is_empty());
        assert!(matches!(r, CommandResult::Ok { revision: 2, .. }));
    }

    #[test]
    fn values_are_text_on_the_wire_and_old_arrays_still_read() {
        let put = Command::Put {
            key: "/k".into(),
            value: br#"{"a":"b"}"#.to_vec(),
            expect: Precondition::Any,
        };
        let json = serde_json::to_string(&put).unwrap();
        assert!(json.contains(r#""value":"{\"a\":\"b\"}""#), "{json}");
        assert_eq!(serde_json::from_str::<Command>(&json).unwrap(), put);
        // Not UTF-8: bytes (an array in JSON), read back the same.
        let bin = Command::Put {
            key: "/k".into(),
            value: vec![0xff, 0, 1],
            expect: Precondition::Any,
        };
        let json = serde_json::to_string(&bin).unwrap();
        assert!(json.contains("[255,0,1]"), "{json}");
        assert_eq!(serde_json::from_str::<Command>(&json).unwrap(), bin);
        // A log entry written by an earlier version (value as an array of numbers).
        let old = r#"{"Put":{"key":"/k","value":[104,105],"expect":"Any"}}"#;
        match serde_json::from_str::<Command>(old).unwrap() {
            Command::Put { value, .. } => assert_eq!(value, b"hi"),
            other => panic!("{other:?}"),
        }
    }
}
