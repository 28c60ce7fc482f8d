//! Bytes a client sends to the proxy's API listener, after TLS: an HTTP/1 request.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ballast_proxy::fuzzing::http_request(data);
});
