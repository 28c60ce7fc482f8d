//! `application/vnd.kubernetes.protobuf` request bodies.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ballast_master::fuzzing::protobuf(data);
});
