//! A Raft log entry as read back from `raft.redb`, and its command applied.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ballast_master::fuzzing::raft_log_entry(data);
});
