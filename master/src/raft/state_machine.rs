//! The replicated state machine: [`Applied`] (the in-memory [`KvState`] plus the event
//! broadcast the API watches) driven by committed Raft entries, with snapshots in files.
//!
//! Durability: the state machine itself lives in memory. A snapshot is written to
//! `snapshot.tmp`, fsynced, renamed over `snapshot.json` and the directory fsynced, so a
//! crash leaves either the old or the new snapshot, never a torn one. On start the last
//! snapshot is loaded and openraft re-applies the committed log after it (the log keeps
//! every entry not covered by the snapshot on disk).
//!
//! Integrity: the file starts with a header line giving the JSON's length and CRC-32, so a
//! file damaged on disk (cut short, a flipped bit that still parses) is refused with an
//! error naming it instead of being loaded as the cluster's state. Transfers to followers
//! carry the bare JSON (the peer channel is TLS; the follower writes its own header).

// openraft's storage traits fix the error type (`StorageError`, ~200 bytes).
#![allow(clippy::result_large_err)]

use std::fs;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::RaftStateMachine;
use openraft::{
    AnyError, EntryPayload, ErrorSubject, ErrorVerb, LogId, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::{Entry, Node, NodeId, TypeConfig};
use crate::store::{Applied, CommandResult, KvState};

type SResult<T> = Result<T, StorageError<NodeId>>;
type Meta = SnapshotMeta<NodeId, Node>;

const SNAPSHOT_FILE: &str = "snapshot.json";
const SNAPSHOT_TMP: &str = "snapshot.tmp";
/// First word of the header line: `ballast-snapshot 1 <json length> <crc32 hex>\n`.
const MAGIC: &str = "ballast-snapshot";
const FORMAT: u32 = 1;

/// The header line followed by `json`: what a snapshot file holds on disk.
fn seal(json: &[u8]) -> Vec<u8> {
    let header = format!(
        "{MAGIC} {FORMAT} {} {:08x}\n",
        json.len(),
        crc32fast::hash(json)
    );
    let mut out = Vec::with_capacity(header.len() + json.len());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(json);
    out
}

/// The JSON inside a snapshot file, once its header vouches for it; otherwise why not.
fn unseal(file: &[u8]) -> Result<&[u8], String> {
    const ADVICE: &str = "the file is damaged and cannot be trusted: move the data dir away and \
                          start again, and the master rejoins as one with a lost data dir";
    let nl = file
        .iter()
        .take(128)
        .position(|b| *b == b'\n')
        .ok_or_else(|| format!("no snapshot header; {ADVICE}"))?;
    let header = std::str::from_utf8(&file[..nl]).map_err(|_| format!("bad header; {ADVICE}"))?;
    let body = &file[nl + 1..];
    let fields: Vec<&str> = header.split(' ').collect();
    let (len, crc) = match fields.as_slice() {
        [MAGIC, v, len, crc] if v.parse() == Ok(FORMAT) => (
            len.parse::<usize>()
                .map_err(|_| format!("bad length in header; {ADVICE}"))?,
            u32::from_str_radix(crc, 16)
                .map_err(|_| format!("bad checksum in header; {ADVICE}"))?,
        ),
        [MAGIC, v, ..] => return Err(format!("snapshot format {v}, this master reads {FORMAT}")),
        _ => return Err(format!("no snapshot header; {ADVICE}")),
    };
    if body.len() != len {
        return Err(format!(
            "{} bytes where the header says {len}; {ADVICE}",
            body.len()
        ));
    }
    let actual = crc32fast::hash(body);
    if actual != crc {
        return Err(format!(
            "checksum {actual:08x} where the header says {crc:08x}; {ADVICE}"
        ));
    }
    Ok(body)
}

fn snap_err(verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageError::IO {
        source: openraft::StorageIOError::new(
            ErrorSubject::Snapshot(None),
            verb,
            AnyError::error(e.to_string()),
        ),
    }
}

/// What a snapshot file (and a snapshot transfer) holds.
#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<NodeId, Node>,
    state: KvState,
}

/// Snapshot files shared by the state machine and its builders.
struct SnapshotDir {
    dir: PathBuf,
    /// Serialises file replacement; holds the meta of the current file.
    current: Mutex<Option<SnapshotMeta<NodeId, Node>>>,
    seq: AtomicU64,
}

impl SnapshotDir {
    fn path(&self) -> PathBuf {
        self.dir.join(SNAPSHOT_FILE)
    }

    /// Atomically replace the snapshot file unless it already covers a later log id.
    fn store(&self, meta: &SnapshotMeta<NodeId, Node>, bytes: &[u8]) -> SResult<()> {
        let mut cur = self.current.lock().expect("snapshot lock");
        if let Some(c) = cur.as_ref() {
            if c.last_log_id > meta.last_log_id {
                return Ok(());
            }
        }
        write_atomic(&self.dir, &seal(bytes)).map_err(|e| snap_err(ErrorVerb::Write, e))?;
        *cur = Some(meta.clone());
        Ok(())
    }

    fn load(&self) -> SResult<Option<(Meta, Vec<u8>)>> {
        let _g = self.current.lock().expect("snapshot lock");
        match fs::read(self.path()) {
            Ok(file) => {
                let named = |e: &dyn std::fmt::Display| {
                    snap_err(ErrorVerb::Read, format!("{}: {e}", self.path().display()))
                };
                let json = unseal(&file).map_err(|e| named(&e))?;
                let f: SnapshotFile = serde_json::from_slice(json).map_err(|e| named(&e))?;
                Ok(Some((f.meta, json.to_vec())))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(snap_err(
                ErrorVerb::Read,
                format!("{}: {e}", self.path().display()),
            )),
        }
    }
}

/// Write `bytes` as the snapshot file in `dir`: temp file, fsync, rename, fsync dir.
fn write_atomic(dir: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(SNAPSHOT_TMP);
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(SNAPSHOT_FILE))?;
    fs::File::open(dir)?.sync_all()
}

/// The state machine handed to openraft.
pub(crate) struct StateMachine {
    applied: Arc<Applied>,
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
    snapshots: Arc<SnapshotDir>,
}

impl StateMachine {
    /// Open the state machine in `dir`, loading the last snapshot if there is one.
    pub(crate) fn open(dir: &Path, applied: Arc<Applied>) -> SResult<Self> {
        fs::create_dir_all(dir)
            .map_err(|e| snap_err(ErrorVerb::Write, format!("{}: {e}", dir.display())))?;
        let snapshots = Arc::new(SnapshotDir {
            dir: dir.to_path_buf(),
            current: Mutex::new(None),
            seq: AtomicU64::new(0),
        });
        let mut sm = Self {
            applied,
            last_applied: None,
            membership: StoredMembership::default(),
            snapshots,
        };
        if let Some((meta, bytes)) = sm.snapshots.load()? {
            let f: SnapshotFile =
                serde_json::from_slice(&bytes).map_err(|e| snap_err(ErrorVerb::Read, e))?;
            sm.install_state(&meta, f.state);
            *sm.snapshots.current.lock().expect("snapshot lock") = Some(meta);
        }
        Ok(sm)
    }

    fn install_state(&mut self, meta: &SnapshotMeta<NodeId, Node>, mut state: KvState) {
        // Keep this master's configured history window.
        let limit = self
            .applied
            .state
            .lock()
            .expect("kv state lock")
            .history_limit();
        state.set_history_limit(limit);
        *self.applied.state.lock().expect("kv state lock") = state;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
    }
}

/// Builds a snapshot from a copy of the state taken when the builder was created.
pub(crate) struct SnapshotBuilder {
    state: KvState,
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
    snapshots: Arc<SnapshotDir>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> SResult<Snapshot<TypeConfig>> {
        let seq = self.snapshots.seq.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match self.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, seq),
            None => format!("0-0-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        let file = SnapshotFile {
            meta: meta.clone(),
            state: std::mem::take(&mut self.state),
        };
        let snapshots = self.snapshots.clone();
        let meta2 = meta.clone();
        let bytes = tokio::task::spawn_blocking(move || -> SResult<Vec<u8>> {
            let bytes = serde_json::to_vec(&file).map_err(|e| snap_err(ErrorVerb::Write, e))?;
            snapshots.store(&meta2, &bytes)?;
            Ok(bytes)
        })
        .await
        .map_err(|e| snap_err(ErrorVerb::Write, e))??;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> SResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>)> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> SResult<Vec<Vec<CommandResult>>>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        for e in entries {
            self.last_applied = Some(e.log_id);
            let res = match e.payload {
                EntryPayload::Blank => vec![CommandResult::Ok {
                    revision: self.applied.state.lock().expect("kv state lock").revision(),
                    prev: vec![],
                }],
                EntryPayload::Normal(cmd) => self.applied.apply_entry(&cmd),
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(e.log_id), m);
                    vec![CommandResult::Ok {
                        revision: self.applied.state.lock().expect("kv state lock").revision(),
                        prev: vec![],
                    }]
                }
            };
            out.push(res);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            state: self.applied.state.lock().expect("kv state lock").clone(),
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            snapshots: self.snapshots.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> SResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> SResult<()> {
        let bytes = snapshot.into_inner();
        let mut f: SnapshotFile =
            serde_json::from_slice(&bytes).map_err(|e| snap_err(ErrorVerb::Read, e))?;
        // Store it under the leader's meta, which is authoritative.
        f.meta = meta.clone();
        let bytes = serde_json::to_vec(&f).map_err(|e| snap_err(ErrorVerb::Write, e))?;
        let snapshots = self.snapshots.clone();
        let meta2 = meta.clone();
        tokio::task::spawn_blocking(move || snapshots.store(&meta2, &bytes))
            .await
            .map_err(|e| snap_err(ErrorVerb::Write, e))??;
        self.install_state(meta, f.state);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> SResult<Option<Snapshot<TypeConfig>>> {
        let snapshots = self.snapshots.clone();
        let loaded = tokio::task::spawn_blocking(move || snapshots.load())
            .await
            .map_err(|e| snap_err(ErrorVerb::Read, e))??;
        Ok(loaded.map(|(meta, bytes)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_snapshot_opens_and_a_damaged_one_is_refused() {
        let json = br#"{"meta":{},"state":{"key":"value"}}"#;
        let file = seal(json);
        assert_eq!(unseal(&file).unwrap(), json);

        // A flipped bit that still parses as JSON.
        let mut flipped = file.clone();
        let at = flipped.len() - 4;
        flipped[at] ^= 0x01;
        let e = unseal(&flipped).unwrap_err();
        assert!(e.contains("checksum"), "{e}");

        // Cut short, and a file with no header at all.
        let e = unseal(&file[..file.len() - 3]).unwrap_err();
        assert!(e.contains("bytes where the header says"), "{e}");
        let e = unseal(json).unwrap_err();
        assert!(e.contains("no snapshot header"), "{e}");
        assert!(e.contains("lost data dir"), "{e}");
    }
}
