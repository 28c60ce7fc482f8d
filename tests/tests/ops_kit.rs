//! The operations kit under `examples/`: the Prometheus alert rules pass `promtool check
//! rules` and their unit tests (`promtool test rules`), and the systemd units verify.

use std::path::PathBuf;

use ballast_tests::{require, run};

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn ok(out: std::process::Output, what: &str) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what}: {text}");
    text
}

#[test]
fn alert_rules_check_and_pass_their_unit_tests() {
    require("promtool");
    let dir = examples().join("prometheus");
    let rules = dir.join("ballast-rules.yml");
    let text = ok(
        run("promtool", &["check", "rules", rules.to_str().unwrap()]),
        "promtool check rules",
    );
    assert!(text.contains("8 rules found"), "{text}");
    let tests = dir.join("ballast-rules-test.yml");
    ok(
        run("promtool", &["test", "rules", tests.to_str().unwrap()]),
        "promtool test rules",
    );
}

#[test]
fn systemd_units_verify() {
    require("systemd-analyze");
    for unit in [
        "ballast-master@.service",
        "ballast-proxy@.service",
        "ballast-worker@.service",
    ] {
        let path = examples().join("systemd").join(unit);
        let out = run(
            "systemd-analyze",
            &["verify", "--man=no", path.to_str().unwrap()],
        );
        let text = String::from_utf8_lossy(&out.stderr).to_string();
        // the binary is not installed here: that one complaint is expected, nothing else
        let other: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.contains("is not executable"))
            .collect();
        assert!(other.is_empty(), "{unit}: {text}");
    }
}
