//! A body at a master's peer RPC endpoints (after mutual TLS): MessagePack.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ballast_master::fuzzing::raft_rpc(data);
});
