//! What the worker must remember across its own restarts: each pod it runs (the Pod
//! object, so pods keep running and restarting even while the API is unreachable) and
//! each container's process (pid + start time), restart count and last exit. Written
//! atomically (temp file, fsync, rename) on every change.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::pod_status::Termination;

/// One container's record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct ContainerRecord {
    /// The running wrapper process (leader of the container's process group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default)]
    pub start_ticks: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    #[serde(default)]
    pub restart_count: i32,
    /// The previous run's end (`lastState`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Termination>,
    /// Set when the container has ended for good (its policy does not restart it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminated: Option<Termination>,
}

/// One pod's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct PodRecord {
    pub pod: Pod,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Timestamp>,
    #[serde(default)]
    pub containers: BTreeMap<String, ContainerRecord>,
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct NodeState {
    #[serde(default)]
    pub pods: BTreeMap<String, PodRecord>,
}

/// Errors of the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot write the worker state {path}: {source} (retried on the next change)")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the worker state {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The state file, shared by every pod runner.
pub(crate) struct StateFile {
    path: PathBuf,
    state: Mutex<NodeState>,
}

impl StateFile {
    /// Load `path` (missing = empty). A corrupt file is set aside (`.corrupt`) and ignored:
    /// the pods are then relisted from the API and their old processes are not adopted.
    pub(crate) fn load(path: PathBuf) -> Result<Self, StateError> {
        let state = match std::fs::read(&path) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "corrupt worker state; setting it aside");
                    let aside = path.with_extension("corrupt");
                    if let Err(e) = std::fs::rename(&path, &aside) {
                        tracing::error!(path = %aside.display(), error = %e, "cannot set the corrupt state aside");
                    }
                    NodeState::default()
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => NodeState::default(),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        Ok(Self {
            path,
            state: Mutex::new(state),
        })
    }

    pub(crate) fn snapshot(&self) -> NodeState {
        self.state.lock().unwrap().clone()
    }

    /// Replace one pod's record (when it changed) and write the file.
    pub(crate) fn put(&self, uid: &str, rec: &PodRecord) {
        let mut st = self.state.lock().unwrap();
        if st.pods.get(uid) == Some(rec) {
            return;
        }
        st.pods.insert(uid.to_string(), rec.clone());
        self.write(&st);
    }

    /// Forget a pod and write the file.
    pub(crate) fn remove(&self, uid: &str) {
        let mut st = self.state.lock().unwrap();
        if st.pods.remove(uid).is_some() {
            self.write(&st);
        }
    }

    fn write(&self, st: &NodeState) {
        if let Err(e) = write_atomic(&self.path, &serde_json::to_vec_pretty(st).unwrap()) {
            let e = StateError::Write {
                path: self.path.clone(),
                source: e,
            };
            tracing::error!(error = %e, "state not saved");
        }
    }
}

/// Write a file so that a crash leaves either the old or the new content.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(d) = path.parent() {
        // The rename is durable only once its directory is synced.
        std::fs::File::open(d)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_reload_and_sets_corrupt_files_aside() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("state.json");
        let s = StateFile::load(path.clone()).unwrap();
        let mut rec = PodRecord {
            pod: Pod::default(),
            start_time: None,
            containers: BTreeMap::new(),
        };
        rec.containers.insert(
            "c".into(),
            ContainerRecord {
                pid: Some(42),
                start_ticks: 7,
                restart_count: 2,
                ..Default::default()
            },
        );
        s.put("u1", &rec);
        let again = StateFile::load(path.clone()).unwrap().snapshot();
        assert_eq!(again.pods["u1"].containers["c"].pid, Some(42));
        assert_eq!(again.pods["u1"].containers["c"].restart_count, 2);
        s.remove("u1");
        assert!(StateFile::load(path.clone())
            .unwrap()
            .snapshot()
            .pods
            .is_empty());
        std::fs::write(&path, b"{not json").unwrap();
        assert!(StateFile::load(path.clone())
            .unwrap()
            .snapshot()
            .pods
            .is_empty());
        assert!(path.with_extension("corrupt").exists());
    }
}
