//! Entry points for the fuzz targets in `fuzz/` (`./task fuzz`): each takes raw input as a
//! client could send it and must never panic, only refuse. Not an API; hidden from the
//! docs. The unit tests below run each on a few hostile inputs, so `cargo test` keeps them
//! compiling and honest.

use serde_json::Value;

use crate::api::patch::{apply, PatchType};
use crate::api::selector::{FieldSelector, LabelSelector};

/// Apply `patch` to `target` (both JSON, as a PATCH request carries them) as each patch
/// type, within the API's limits. Returns how many applied.
pub fn patch(target: &[u8], patch: &[u8]) -> usize {
    let (Ok(t), Ok(p)) = (
        serde_json::from_slice::<Value>(target),
        serde_json::from_slice::<Value>(patch),
    ) else {
        return 0;
    };
    [PatchType::Json, PatchType::Merge, PatchType::StrategicMerge]
        .into_iter()
        .filter(|k| apply(&t, &p, *k).is_ok())
        .count()
}

/// Parse `s` as a label selector and as a field selector; a parsed one prints and parses
/// back to the same. Returns how many parsed.
pub fn selectors(s: &str) -> usize {
    let mut n = 0;
    if let Ok(l) = LabelSelector::parse(s) {
        let again = LabelSelector::parse(&l.to_string()).expect("a printed selector parses");
        assert_eq!(again.to_string(), l.to_string());
        n += 1;
    }
    if FieldSelector::parse(s).is_ok() {
        n += 1;
    }
    n
}

/// Decode a protobuf request body (`application/vnd.kubernetes.protobuf`).
pub fn protobuf(body: &[u8]) -> bool {
    crate::api::protobuf::decode(body).is_ok()
}

/// Decode a list's `continue` token.
pub fn continue_token(token: &str) -> bool {
    crate::api::registry::continue_token::decode_continue(token).is_ok()
}

/// A peer RPC body (MessagePack) as each request the peer server decodes: append, vote,
/// snapshot, takeover. Returns how many decoded.
pub fn raft_rpc(body: &[u8]) -> usize {
    use crate::raft::{NodeId, TypeConfig};
    use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
    let append = rmp_serde::from_slice::<AppendEntriesRequest<TypeConfig>>(body).is_ok();
    let vote = rmp_serde::from_slice::<VoteRequest<NodeId>>(body).is_ok();
    let snapshot = rmp_serde::from_slice::<InstallSnapshotRequest<TypeConfig>>(body).is_ok();
    let takeover = rmp_serde::from_slice::<crate::raft::handover::TakeoverRequest>(body).is_ok();
    [append, vote, snapshot, takeover]
        .into_iter()
        .filter(|ok| *ok)
        .count()
}

/// A stored Raft log entry as the log reads it back, and its command applied to an empty
/// key-value state (what every master does with a committed entry). Returns whether it
/// decoded.
pub fn raft_log_entry(bytes: &[u8]) -> bool {
    let Ok(entry) = crate::raft::durable_log::decode_entry(bytes) else {
        return false;
    };
    if let openraft::EntryPayload::Normal(cmd) = &entry.payload {
        crate::store::kv::KvState::new(16).apply_entry(cmd);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_inputs_are_refused_without_panicking() {
        assert_eq!(patch(b"{}", b"not json"), 0);
        let bomb: Vec<Value> = (0..30)
            .map(|i| serde_json::json!({"op": "copy", "from": "", "path": format!("/c{i}")}))
            .collect();
        let bomb = serde_json::to_vec(&bomb).unwrap();
        // the JSON patch is refused (too large); merge and strategic merge of an array
        // onto an object replace it
        assert!(patch(br#"{"a":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#, &bomb) < 3);
        assert_eq!(selectors("a in (b,c),!d,e!=f"), 1);
        assert_eq!(selectors("((("), 0);
        assert!(!protobuf(&[
            0x6b, 0x38, 0x73, 0x00, 0xff, 0xff, 0xff, 0xff, 0x0f
        ]));
        assert!(!continue_token("!!!"));
        assert_eq!(raft_rpc(b"\xc1"), 0);
        assert_eq!(
            raft_rpc(&[0xdc, 0xff, 0xff]),
            0,
            "an array that claims 65535 items"
        );
        assert!(!raft_log_entry(b"{not json"));
        assert!(
            !raft_log_entry(&[0xdf, 0xff, 0xff, 0xff, 0xff]),
            "a map that claims 4G entries"
        );
    }

    /// Real peer messages and log entries decode (the fuzz seeds are these bytes).
    pub(crate) fn seeds() -> Vec<(&'static str, Vec<u8>)> {
        use crate::raft::TypeConfig;
        use openraft::raft::{AppendEntriesRequest, VoteRequest};
        use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};
        let log_id = LogId::new(CommittedLeaderId::new(3, 1), 7);
        let entry: Entry<TypeConfig> = Entry {
            log_id,
            payload: EntryPayload::Normal(crate::store::Command::Put {
                key: "/registry/configmaps/default/a".into(),
                value: br#"{"metadata":{"name":"a"},"data":{"k":"v"}}"#.to_vec(),
                expect: crate::store::Precondition::Absent,
            }),
        };
        let append = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(LogId::new(CommittedLeaderId::new(3, 1), 6)),
            entries: vec![entry.clone()],
            leader_commit: Some(LogId::new(CommittedLeaderId::new(3, 1), 6)),
        };
        let vote = VoteRequest::new(Vote::new(4, 2), Some(log_id));
        vec![
            ("raft_rpc/append", rmp_serde::to_vec_named(&append).unwrap()),
            ("raft_rpc/vote", rmp_serde::to_vec_named(&vote).unwrap()),
            (
                "raft_log_entry/put",
                rmp_serde::to_vec_named(&entry).unwrap(),
            ),
        ]
    }

    #[test]
    fn real_peer_messages_and_entries_decode() {
        for (name, bytes) in seeds() {
            if let Some(dir) = std::env::var_os("BALLAST_FUZZ_SEEDS") {
                let path = std::path::Path::new(&dir).join(name);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(path, &bytes).unwrap();
            }
            match name.split('/').next() {
                Some("raft_rpc") => assert!(raft_rpc(&bytes) >= 1, "{name}"),
                _ => assert!(raft_log_entry(&bytes), "{name}"),
            }
        }
    }
}
