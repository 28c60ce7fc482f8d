//! A PATCH body against an object: JSON, merge and strategic merge, within the limits.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // the first line is the object, the rest the patch
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let (target, patch) = data.split_at(split);
    ballast_master::fuzzing::patch(target, patch.get(1..).unwrap_or_default());
});
