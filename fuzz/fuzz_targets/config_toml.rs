//! A config file (`ballast check-config`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _refused_or_loaded = ballast_config::parse_str(std::path::Path::new("c.toml"), s);
    }
});
