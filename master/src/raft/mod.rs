//! The masters' Raft group (openraft 0.9): durable log in redb, the key-value state
//! machine with file snapshots, HTTP peer RPC, and the active-master fencing.
//!
//! - [`durable_log`]: log + vote (redb, fsync before acknowledging; purges in the background).
//! - [`state_machine`]: [`crate::store::Applied`] driven by committed entries; snapshots.
//! - [`network`]: peer RPC client and server (peer address only).
//! - [`leadership`]: the definition of *active*, its lease/fencing argument, and
//!   [`LeaderToken`]s.
//! - [`replicated`]: [`RaftStore`], the [`crate::store::Store`] the API uses, replicated
//!   through the group (group commit; reads only while active).
//! - [`campaign`]: after the leader is lost, the survivors nominate one candidate (no
//!   split votes); a restarted master does not depose a working leader.
//! - [`handover`]: a planned stop of the active master hands the leadership to the most
//!   up-to-date follower first.
//! - [`node`]: starting a master's Raft node from the cluster config.

pub(crate) mod campaign;
pub(crate) mod durable_log;
#[cfg(test)]
mod group_tests;
pub(crate) mod handover;
pub(crate) mod leadership;
pub(crate) mod network;
pub(crate) mod node;
pub(crate) mod replicated;
pub(crate) mod state_machine;

pub(crate) use leadership::Leadership;
pub(crate) use node::{RaftNode, RaftStartError};
pub(crate) use replicated::RaftStore;

use crate::store::{Command, CommandResult};

/// Raft node id (the config's `raft_id`).
pub(crate) type NodeId = u64;
/// What openraft knows of a member: its peer address.
pub(crate) type Node = openraft::BasicNode;

openraft::declare_raft_types!(
    /// The masters' Raft types.
    pub TypeConfig:
        D = Command,
        // one result per command of the entry (several for a `Command::Batch`)
        R = Vec<CommandResult>,
        NodeId = NodeId,
        Node = Node,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = std::io::Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A log entry.
pub(crate) type Entry = openraft::Entry<TypeConfig>;

#[cfg(test)]
mod suite_tests {

    use openraft::testing::{StoreBuilder, Suite};
    use openraft::StorageError;

    use super::durable_log::LogStore;
    use super::state_machine::StateMachine;
    use super::{NodeId, TypeConfig};
    use crate::store::Applied;

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<NodeId>> {
            let dir = tempfile::tempdir().expect("tempdir");
            let log = LogStore::open(&dir.path().join("raft.redb")).expect("open log");
            let sm = StateMachine::open(&dir.path().join("snapshots"), Applied::new(1000))?;
            Ok((dir, log, sm))
        }
    }

    /// openraft's own storage conformance suite against our log store and state machine.
    #[test]
    fn openraft_storage_suite() {
        Suite::test_all(Builder).expect("storage suite");
    }

    /// Log, vote and snapshot survive reopening (what a restart after kill -9 sees).
    #[tokio::test]
    async fn log_vote_and_snapshot_survive_reopen() {
        use openraft::storage::{RaftLogStorage, RaftStateMachine};
        use openraft::{RaftLogReader, RaftSnapshotBuilder, Vote};

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        let snaps = dir.path().join("snapshots");
        let entries: Vec<super::Entry> = (1..=3)
            .map(|i| openraft::Entry {
                log_id: openraft::testing::log_id(1, 1, i),
                payload: openraft::EntryPayload::Normal(crate::store::Command::Put {
                    key: format!("/k{i}"),
                    value: b"v".to_vec(),
                    expect: crate::store::Precondition::Any,
                }),
            })
            .collect();
        {
            let mut log = LogStore::open(&path).unwrap();
            log.save_vote(&Vote::new_committed(1, 1)).await.unwrap();
            log.append_for_test(entries.clone()).await.unwrap();
            let applied = Applied::new(100);
            let mut sm = StateMachine::open(&snaps, applied.clone()).unwrap();
            sm.apply(entries[..2].to_vec()).await.unwrap();
            sm.get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .unwrap();
        }
        let mut log = LogStore::open(&path).unwrap();
        assert_eq!(
            log.read_vote().await.unwrap(),
            Some(Vote::new_committed(1, 1))
        );
        assert_eq!(log.try_get_log_entries(1..4).await.unwrap().len(), 3);
        let applied = Applied::new(100);
        let mut sm = StateMachine::open(&snaps, applied.clone()).unwrap();
        let (last, _) = sm.applied_state().await.unwrap();
        assert_eq!(last, Some(openraft::testing::log_id(1, 1, 2)));
        assert_eq!(applied.state.lock().unwrap().revision(), 2);
        assert!(applied.state.lock().unwrap().get("/k2").is_some());
    }
}
