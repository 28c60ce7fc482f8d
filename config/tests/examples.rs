//! Every sample config under `examples/` parses and validates without warnings.

use std::path::PathBuf;

#[test]
fn sample_configs_parse() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let loaded = ballast_config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert!(!loaded.config.masters.is_empty());
        n += 1;
    }
    assert!(n >= 2, "expected sample configs in {}", dir.display());
}

#[test]
fn full_sample_matches_documented_defaults() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/ballast.toml");
    let c = ballast_config::load(dir).unwrap().config;
    let d = ballast_config::local::local_cluster(3, 2, Default::default());
    // The sample spells out the defaults of every optional key.
    assert_eq!(c.raft, d.raft);
    assert_eq!(c.proxy, d.proxy);
    assert_eq!(c.control, ballast_config::ControlConfig::default());
    assert_eq!(c.worker, ballast_config::WorkerDefaults::default());
    assert_eq!(c.masters.len(), 3);
    assert_eq!(c.workers[1].route(), d.workers[1].route());
}
