//! Durable Raft log + vote in a redb database.
//!
//! Every write that openraft must see durable (append, vote, truncate, purge) is a redb
//! write transaction with `Durability::Immediate`: `commit()` returns only after fsync, so
//! an entry is acknowledged to the leader only once it survives `kill -9` or power loss.
//! Purges are the exception (see [`LogStore::purge`]). The committed pointer is not
//! saved: a master serves nothing until it has applied an entry of its own term.
//!
//! redb is blocking; all I/O runs on tokio's blocking pool so the Raft core never stalls a
//! runtime worker.

// openraft's storage traits fix the error type (`StorageError`, ~200 bytes).
#![allow(clippy::result_large_err)]

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    AnyError, ErrorSubject, ErrorVerb, LogId, LogState, RaftLogReader, StorageError, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Entry, NodeId, TypeConfig};

const LOGS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("logs");
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");

const KEY_VOTE: &str = "vote";
const KEY_PURGED: &str = "purged";

type SResult<T> = Result<T, StorageError<NodeId>>;

fn io_err(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    e: impl std::fmt::Display,
) -> StorageError<NodeId> {
    StorageError::IO {
        source: openraft::StorageIOError::new(subject, verb, AnyError::error(e.to_string())),
    }
}

fn read_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    io_err(ErrorSubject::Logs, ErrorVerb::Read, e)
}

fn write_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    io_err(ErrorSubject::Logs, ErrorVerb::Write, e)
}

/// The Raft log store. Cheap to clone: clones share the database (the clone is also the
/// log reader used by replication tasks).
#[derive(Clone)]
pub(crate) struct LogStore {
    db: Arc<Database>,
    /// Held by the background deletion of purged entries (one at a time).
    purging: Arc<tokio::sync::Mutex<()>>,
    /// The newest durable entries, for the replication reads that follow each append.
    tail: Arc<Mutex<Tail>>,
}

/// redb's page cache. Its default (1 GiB) kept every page the log ever wrote: a busy
/// master's memory grew by the log's size, and faulting in that fresh memory was ~10 % of
/// its CPU. The log is written once, read back from [`Tail`], and purged.
const CACHE_BYTES: usize = 64 << 20;

/// Entries kept in [`Tail`]: at most this many, of at most this many encoded bytes.
const TAIL_ENTRIES: usize = 1024;
const TAIL_BYTES: usize = 32 << 20;

/// The newest entries of the log, contiguous, exactly as written to redb: a leader's
/// replication tasks read every entry right after it is appended, and reading it back
/// from redb and decoding its JSON again was ~5 % of a busy leader's CPU. Only entries
/// whose write transaction committed are here; truncation and purges remove theirs.
#[derive(Default)]
struct Tail {
    /// Each entry with its encoded size.
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
}

impl Tail {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.log_id.index)
    }

    /// Add entries just made durable; a gap (or an overlap) starts the tail afresh.
    fn push(&mut self, written: Vec<(Entry, usize)>) {
        for (e, size) in written {
            if self.last_index().is_some_and(|l| l + 1 != e.log_id.index) {
                self.entries.clear();
                self.bytes = 0;
            }
            self.bytes += size;
            self.entries.push_back((e, size));
            while self.entries.len() > TAIL_ENTRIES || self.bytes > TAIL_BYTES {
                match self.entries.pop_front() {
                    Some((_, n)) => self.bytes -= n,
                    None => break,
                }
            }
        }
    }

    /// Forget entries at `index` and after (truncation).
    fn truncate(&mut self, index: u64) {
        while self.last_index().is_some_and(|l| l >= index) {
            if let Some((_, n)) = self.entries.pop_back() {
                self.bytes -= n;
            }
        }
    }

    /// Forget entries at `index` and before (purge).
    fn purge(&mut self, index: u64) {
        while self.first_index().is_some_and(|f| f <= index) {
            if let Some((_, n)) = self.entries.pop_front() {
                self.bytes -= n;
            }
        }
    }

    /// Entries `[start, end)` when every one of them is here.
    fn get(&self, start: u64, end: u64) -> Option<Vec<Entry>> {
        let first = self.first_index()?;
        let last = self.last_index()?;
        if start >= end || start < first || end > last + 1 {
            return None;
        }
        let from = (start - first) as usize;
        let to = (end - first) as usize;
        Some(
            self.entries
                .range(from..to)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }
}

/// An entry as stored: MessagePack with named fields (a value is raw bytes in it; JSON
/// escaped every quote of the object a value carries, on every append and every read).
fn encode_entry(e: &Entry) -> SResult<Vec<u8>> {
    rmp_serde::to_vec_named(e).map_err(write_err)
}

/// A stored entry: MessagePack, or JSON as written by earlier versions (a JSON entry
/// starts with `{`, which never starts a MessagePack map).
pub(crate) fn decode_entry(bytes: &[u8]) -> SResult<Entry> {
    if bytes.first() == Some(&b'{') {
        serde_json::from_slice(bytes).map_err(read_err)
    } else {
        rmp_serde::from_slice(bytes).map_err(read_err)
    }
}

/// `[start, end)` of a range of log indexes.
fn index_span(lo: Bound<u64>, hi: Bound<u64>) -> (u64, u64) {
    let start = match lo {
        Bound::Included(i) => i,
        Bound::Excluded(i) => i.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match hi {
        Bound::Included(i) => i.saturating_add(1),
        Bound::Excluded(i) => i,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl LogStore {
    /// Open (or create) `path`, creating the tables.
    ///
    /// A damaged file is an error, never a panic: redb asserts on some damage (a file cut
    /// shorter than its header's layout), and that assertion is turned into
    /// [`redb::Error::Corrupted`] here so the caller can name the file.
    pub(crate) fn open(path: &Path) -> Result<Self, redb::Error> {
        let opened = std::panic::catch_unwind(|| {
            Database::builder().set_cache_size(CACHE_BYTES).create(path)
        });
        let db = match opened {
            Ok(db) => db?,
            Err(panic) => {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "the file is damaged".into());
                return Err(redb::Error::Corrupted(why));
            }
        };
        let tx = db.begin_write()?;
        {
            tx.open_table(LOGS)?;
            tx.open_table(META)?;
        }
        tx.commit()?;
        Ok(Self {
            db: Arc::new(db),
            purging: Arc::default(),
            tail: Arc::default(),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> SResult<T> + Send + 'static,
    ) -> SResult<T> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| write_err(format!("log store task failed: {e}")))?
    }

    fn read_meta<T: serde::de::DeserializeOwned>(db: &Database, key: &str) -> SResult<Option<T>> {
        let tx = db.begin_read().map_err(read_err)?;
        let t = tx.open_table(META).map_err(read_err)?;
        match t.get(key).map_err(read_err)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(read_err)?)),
            None => Ok(None),
        }
    }

    fn write_meta<T: serde::Serialize>(
        db: &Database,
        key: &str,
        value: &T,
        durable: bool,
    ) -> SResult<()> {
        let bytes = serde_json::to_vec(value).map_err(write_err)?;
        let mut tx = db.begin_write().map_err(write_err)?;
        if !durable {
            tx.set_durability(redb::Durability::None)
                .map_err(write_err)?;
        }
        {
            let mut t = tx.open_table(META).map_err(write_err)?;
            t.insert(key, bytes.as_slice()).map_err(write_err)?;
        }
        tx.commit().map_err(write_err)
    }
}

impl LogStore {
    /// Durably write entries (fsync before returning).
    async fn write_entries(&self, entries: impl IntoIterator<Item = Entry>) -> SResult<()> {
        let mut rows = Vec::new();
        let mut written = Vec::new();
        for e in entries {
            let bytes = encode_entry(&e)?;
            written.push((e.clone(), bytes.len()));
            rows.push((e.log_id.index, bytes));
        }
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(write_err)?;
            {
                let mut t = tx.open_table(LOGS).map_err(write_err)?;
                for (i, bytes) in &rows {
                    t.insert(*i, bytes.as_slice()).map_err(write_err)?;
                }
            }
            tx.commit().map_err(write_err)
        })
        .await?;
        self.tail.lock().expect("log tail lock").push(written);
        Ok(())
    }

    /// Append without openraft's flush callback (tests).
    #[cfg(test)]
    pub(crate) async fn append_for_test(&self, entries: Vec<Entry>) -> SResult<()> {
        self.write_entries(entries).await
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> SResult<Vec<Entry>> {
        let lo: Bound<u64> = range.start_bound().cloned();
        let hi: Bound<u64> = range.end_bound().cloned();
        let (start, end) = index_span(lo, hi);
        if let Some(entries) = self.tail.lock().expect("log tail lock").get(start, end) {
            return Ok(entries);
        }
        self.blocking(move |db| {
            // Purged entries not deleted yet are not part of the log.
            let purged = Self::read_meta::<LogId<NodeId>>(db, KEY_PURGED)?.map(|p| p.index);
            let tx = db.begin_read().map_err(read_err)?;
            let t = tx.open_table(LOGS).map_err(read_err)?;
            let mut out = Vec::new();
            for item in t.range::<u64>((lo, hi)).map_err(read_err)? {
                let (k, v) = item.map_err(read_err)?;
                if purged.is_some_and(|p| k.value() <= p) {
                    continue;
                }
                out.push(decode_entry(v.value())?);
            }
            Ok(out)
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> SResult<LogState<TypeConfig>> {
        self.blocking(|db| {
            let purged: Option<LogId<NodeId>> = Self::read_meta(db, KEY_PURGED)?;
            let tx = db.begin_read().map_err(read_err)?;
            let t = tx.open_table(LOGS).map_err(read_err)?;
            // Entries at or below the purge point may linger until the background
            // deletion reaches them: the last log id is never below the purge point.
            let last = match t.last().map_err(read_err)? {
                Some((_, v)) => Some(decode_entry(v.value())?.log_id),
                None => None,
            }
            .max(purged);
            Ok(LogState {
                last_purged_log_id: purged,
                last_log_id: last,
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> SResult<()> {
        let vote = *vote;
        self.blocking(move |db| {
            Self::write_meta(db, KEY_VOTE, &vote, true)
                .map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, e))
        })
        .await
    }

    async fn read_vote(&mut self) -> SResult<Option<Vote<NodeId>>> {
        self.blocking(|db| Self::read_meta(db, KEY_VOTE)).await
    }

    // `save_committed` keeps openraft's default (not saved): writing the committed
    // pointer was one more redb transaction per commit on every master, serialized with
    // the appends. After a restart a master applies what the leader tells it is
    // committed; it serves nothing before it has applied an entry of its own term.

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> SResult<()>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let res = self.write_entries(entries).await;
        match &res {
            Ok(()) => callback.log_io_completed(Ok(())),
            Err(e) => callback.log_io_completed(Err(std::io::Error::other(e.to_string()))),
        }
        res
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> SResult<()> {
        self.tail
            .lock()
            .expect("log tail lock")
            .truncate(log_id.index);
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(write_err)?;
            {
                let mut t = tx.open_table(LOGS).map_err(write_err)?;
                t.retain_in(log_id.index.., |_, _| false)
                    .map_err(write_err)?;
            }
            tx.commit().map_err(write_err)
        })
        .await
    }

    /// Records the purge point at once and deletes the entries in the background, in
    /// small transactions: openraft runs `purge` inline in its core loop, and deleting a
    /// whole snapshot's worth of entries (10 000 by default) in one fsynced transaction
    /// stalled heartbeats and appends for ~0.4 s — long enough to lose the active lease.
    /// The purge point is not fsynced (the next durable append carries it; a crash before
    /// that only keeps entries that are already in a snapshot).
    async fn purge(&mut self, log_id: LogId<NodeId>) -> SResult<()> {
        self.tail.lock().expect("log tail lock").purge(log_id.index);
        self.blocking(move |db| Self::write_meta(db, KEY_PURGED, &log_id, false))
            .await?;
        let db = self.db.clone();
        let lock = self.purging.clone();
        tokio::spawn(async move {
            let _one_at_a_time = lock.lock().await;
            loop {
                let db = db.clone();
                match tokio::task::spawn_blocking(move || delete_purged_chunk(&db)).await {
                    // Leave the log to appends between chunks.
                    Ok(Ok(true)) => tokio::time::sleep(PURGE_PAUSE).await,
                    Ok(Ok(false)) => break,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "deleting purged log entries failed");
                        break;
                    }
                    Err(_) => break,
                }
            }
        });
        Ok(())
    }
}

/// Entries deleted per background purge transaction, and the pause between two.
const PURGE_CHUNK: u64 = 256;
const PURGE_PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

/// Delete up to [`PURGE_CHUNK`] entries at or below the recorded purge point; `true`
/// when more remain.
fn delete_purged_chunk(db: &Database) -> SResult<bool> {
    let Some(purged) = LogStore::read_meta::<LogId<NodeId>>(db, KEY_PURGED)? else {
        return Ok(false);
    };
    // Durable: a run of non-durable deletes makes the next durable append carry all
    // their freed pages at once.
    let tx = db.begin_write().map_err(write_err)?;
    let more;
    {
        let mut t = tx.open_table(LOGS).map_err(write_err)?;
        let first = t.first().map_err(write_err)?.map(|(k, _)| k.value());
        match first {
            Some(f) if f <= purged.index => {
                let end = (f + PURGE_CHUNK - 1).min(purged.index);
                t.retain_in(f..=end, |_, _| false).map_err(write_err)?;
                more = end < purged.index;
            }
            _ => more = false,
        }
    }
    tx.commit().map_err(write_err)?;
    Ok(more)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u64) -> Entry {
        openraft::Entry {
            log_id: openraft::testing::log_id(1, 1, i),
            payload: openraft::EntryPayload::Normal(crate::store::Command::Put {
                key: format!("/k{i}"),
                value: vec![b'v'; 10],
                expect: crate::store::Precondition::Any,
            }),
        }
    }

    fn indexes(v: &[Entry]) -> Vec<u64> {
        v.iter().map(|e| e.log_id.index).collect()
    }

    #[test]
    fn tail_keeps_a_bounded_contiguous_run() {
        let mut t = Tail::default();
        t.push((1..=3).map(|i| (entry(i), 100)).collect());
        assert_eq!(t.get(1, 4).map(|v| indexes(&v)), Some(vec![1, 2, 3]));
        assert_eq!(t.get(2, 3).map(|v| indexes(&v)), Some(vec![2]));
        assert!(t.get(0, 2).is_none() && t.get(2, 5).is_none() && t.get(3, 3).is_none());
        // a gap starts afresh
        t.push(vec![(entry(7), 100)]);
        assert_eq!(
            (t.first_index(), t.last_index(), t.bytes),
            (Some(7), Some(7), 100)
        );
        // the byte cap drops the oldest
        t.push((8..=10).map(|i| (entry(i), TAIL_BYTES / 2)).collect());
        assert_eq!(t.first_index(), Some(9));
        assert!(t.bytes <= TAIL_BYTES);
        t.truncate(10);
        assert_eq!(t.last_index(), Some(9));
        t.purge(9);
        assert_eq!((t.first_index(), t.bytes), (None, 0));
    }

    #[test]
    fn entries_are_messagepack_and_json_ones_still_read() {
        let mut e = entry(1);
        e.payload = openraft::EntryPayload::Normal(crate::store::Command::Put {
            key: "/k".into(),
            value: br#"{"a":"quoted \"x\"","b":[1,2]}"#.to_vec(),
            expect: crate::store::Precondition::Any,
        });
        let packed = encode_entry(&e).unwrap();
        assert_ne!(packed.first(), Some(&b'{'));
        assert_eq!(decode_entry(&packed).unwrap(), e);
        let json = serde_json::to_vec(&e).unwrap();
        assert_eq!(json.first(), Some(&b'{'));
        assert_eq!(decode_entry(&json).unwrap(), e);
        assert!(decode_entry(b"\xc1garbage").is_err());
        // a value is carried as raw bytes, not as an escaped string
        assert!(packed.len() < json.len());
    }

    /// A file cut short made redb panic inside `open` (an assertion on the header's
    /// layout); it is an error now, so the master can name the file.
    #[tokio::test]
    async fn a_log_file_cut_short_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        let log = LogStore::open(&path).unwrap();
        log.append_for_test((1..=50).map(entry).collect())
            .await
            .unwrap();
        drop(log);
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len / 2).unwrap();
        drop(f);
        match LogStore::open(&path) {
            Err(redb::Error::Corrupted(_)) => {}
            Err(other) => panic!("another error: {other}"),
            Ok(_) => panic!("a log cut in half opened"),
        }
    }

    #[tokio::test]
    async fn reads_agree_with_the_database_across_truncate_and_purge() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = LogStore::open(&dir.path().join("raft.redb")).unwrap();
        log.append_for_test((1..=6).map(entry).collect())
            .await
            .unwrap();
        let all = log.try_get_log_entries(1..=6).await.unwrap();
        assert_eq!(all, (1..=6).map(entry).collect::<Vec<_>>());
        log.truncate(openraft::testing::log_id(1, 1, 5))
            .await
            .unwrap();
        assert_eq!(
            indexes(&log.try_get_log_entries(1..10).await.unwrap()),
            [1, 2, 3, 4]
        );
        assert_eq!(
            indexes(&log.try_get_log_entries(3..5).await.unwrap()),
            [3, 4]
        );
        log.purge(openraft::testing::log_id(1, 1, 2)).await.unwrap();
        assert_eq!(indexes(&log.try_get_log_entries(..).await.unwrap()), [3, 4]);
        // a restart reads the same from the database alone (once the background purge,
        // which holds the database too, is done)
        drop(log);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut log = loop {
            match LogStore::open(&dir.path().join("raft.redb")) {
                Ok(l) => break l,
                Err(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => panic!("reopen: {e}"),
            }
        };
        assert_eq!(indexes(&log.try_get_log_entries(..).await.unwrap()), [3, 4]);
    }
}
