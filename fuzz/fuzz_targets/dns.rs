//! A DNS packet at the proxy's responder.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ballast_proxy::fuzzing::dns(data);
});
