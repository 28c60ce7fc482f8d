//! The operations kit under `examples/`: the Prometheus alert rules pass `promtool check
//! rules` and their unit tests (`promtool test rules`), the Grafana dashboard's queries
//! are valid PromQL over metrics the components register, and the systemd units verify.

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

/// Every metric name in `expr` (histogram series names reduced to the histogram's).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("ballast_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.push(base.to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn grafana_dashboard_queries_are_valid_over_registered_metrics() {
    require("promtool");
    let path = examples().join("grafana/ballast-dashboard.json");
    let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .expect("the dashboard is JSON");
    let exprs: Vec<String> = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| {
            t["expr"]
                .as_str()
                .expect("every target has an expr")
                .to_string()
        })
        .collect();
    assert!(exprs.len() >= 20, "{} queries", exprs.len());
    // every metric is one a component registers (a typo would show an empty panel)
    let root = examples().join("..");
    let mut sources = String::new();
    for dir in ["master/src", "proxy/src", "worker/src"] {
        for f in walk(&root.join(dir)) {
            sources.push_str(&std::fs::read_to_string(f).unwrap());
        }
    }
    for e in &exprs {
        for name in metric_names(e) {
            assert!(
                sources.contains(&format!("\"{name}\"")),
                "{name} (in `{e}`) is not a metric any component registers"
            );
        }
    }
    // and each query parses: promtool checks them as recording rules
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard:q{i}\n        expr: {}\n",
            serde_json::to_string(e).unwrap()
        ));
    }
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("dashboard-rules.yml");
    std::fs::write(&file, rules).unwrap();
    ok(
        run("promtool", &["check", "rules", file.to_str().unwrap()]),
        "promtool check rules (the dashboard's queries)",
    );
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
    out
}
