//! The `ballast` command line and `ballast up`: real processes on loopback.

use std::time::Duration;

use ballast_tests::*;
use nix::sys::signal::Signal;

#[test]
fn help_lists_every_command() {
    let out = run(ballast_bin().to_str().unwrap(), &["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["up", "master", "proxy", "worker", "pki", "check-config"] {
        assert!(text.contains(cmd), "--help lacks {cmd}:\n{text}");
    }
}

#[test]
fn check_config_accepts_sample_and_points_at_broken_key() {
    let bin = ballast_bin();
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/ballast.toml");
    let out = run(bin.to_str().unwrap(), &["check-config", sample]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(sample)
        .unwrap()
        .replace("rise = 1 ", "rise = 1\nrisee = 2 ");
    std::fs::write(&bad, &text).unwrap();
    let line = text.lines().position(|l| l.starts_with("risee")).unwrap() + 1;
    let out = run(
        bin.to_str().unwrap(),
        &["check-config", bad.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!("{}:{line}:1: ", bad.display())),
        "expected FILE:{line}:1: ..., got {err}"
    );
    assert!(err.contains("risee"), "{err}");
}

#[test]
fn master_with_unknown_id_fails_clearly() {
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/ballast.toml");
    let out = run(
        ballast_bin().to_str().unwrap(),
        &["master", "--config", sample, "--id", "m9"],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown master id `m9`"), "{err}");
}

/// `addrs` are URLs (`https://` for every node, `http://` for the proxy's admin).
fn livez_all(up: &UpProcess, addrs: &[String]) {
    for a in addrs {
        wait_until(&format!("{a}/livez"), Duration::from_secs(60), || {
            (status_of(&format!("{a}/livez")) == 200).then_some(())
        });
    }
    assert!(up.child_pids().len() >= addrs.len());
}

/// `ballast up` on an address block of its own: files, children, refusal of a second run,
/// clean stop on SIGTERM with no process left, data kept across runs.
#[test]
fn up_writes_files_starts_nodes_and_stops_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let addrs: Vec<String> = [
        "https://127.10.1.1:6443",
        "https://127.10.1.2:6443",
        "https://127.10.1.3:6443",
        "http://127.10.0.1:9180",
        "https://127.10.2.1:10250",
        "https://127.10.2.2:10250",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut up = UpProcess::start(&dir, &["--address-block", "10"]);
    livez_all(&up, &addrs);
    for f in [
        "ballast.toml",
        "kubeconfig",
        "m1.pid",
        "m2.pid",
        "m3.pid",
        "proxy.pid",
        "w1.pid",
        "w2.pid",
    ] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    for id in ["m1", "m2", "m3", "proxy", "w1", "w2"] {
        assert!(
            dir.join("logs").join(format!("{id}.log")).exists(),
            "log of {id} missing"
        );
    }
    let kubeconfig = std::fs::read_to_string(dir.join("kubeconfig")).unwrap();
    assert!(
        kubeconfig.contains("server: https://127.10.0.1:6443"),
        "{kubeconfig}"
    );
    for field in [
        "certificate-authority-data:",
        "client-certificate-data:",
        "client-key-data:",
    ] {
        assert!(kubeconfig.contains(field), "{field} missing: {kubeconfig}");
    }
    let summary = up.output_text();
    assert!(summary.contains("https://127.10.0.1:6443"), "{summary}");
    // The PKI of the contract: the CA (kept: the test seeded it) and every identity.
    let pki = dir.join("pki");
    for name in ["ca", "m1", "m2", "m3", "proxy", "w1", "w2", "admin"] {
        assert!(
            pki.join(format!("{name}.crt")).exists(),
            "{name}.crt missing"
        );
        let key = pki.join(format!("{name}.key"));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&key).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{}", key.display());
    }
    let m1_cert = std::fs::read(pki.join("m1.crt")).unwrap();

    // A second cluster on the same DIR is refused, and changes nothing.
    let config_before = std::fs::read_to_string(dir.join("ballast.toml")).unwrap();
    let out = run(
        ballast_bin().to_str().unwrap(),
        &["up", "--dir", dir.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use by a running cluster"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A killed child is reported and not restarted.
    let pids = up.child_pids();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids["w2"] as i32),
        Signal::SIGKILL,
    )
    .unwrap();
    wait_until("up reports w2's exit", Duration::from_secs(30), || {
        up.output_text().contains("w2 exited").then_some(())
    });

    up.signal(Signal::SIGTERM);
    let status = up
        .wait(Duration::from_secs(60))
        .expect("up stops after SIGTERM");
    assert!(status.success(), "{status}");
    for (id, pid) in &pids {
        wait_until(
            &format!("{id} (pid {pid}) gone"),
            Duration::from_secs(10),
            || (!pid_alive(*pid)).then_some(()),
        );
    }
    for a in &addrs {
        assert_eq!(status_of(&format!("{a}/livez")), 0, "{a} still answers");
    }

    // Running again keeps the config (and so the data dirs).
    let mut up = UpProcess::start(&dir, &[]);
    livez_all(&up, &addrs[..3]);
    assert_eq!(
        std::fs::read_to_string(dir.join("ballast.toml")).unwrap(),
        config_before
    );
    assert_eq!(
        std::fs::read(pki.join("m1.crt")).unwrap(),
        m1_cert,
        "PKI kept"
    );
    up.signal(Signal::SIGINT);
    assert!(up
        .wait(Duration::from_secs(60))
        .expect("stops on SIGINT")
        .success());
}

/// A busy address is refused before anything starts.
#[test]
fn up_refuses_busy_address() {
    let tmp = tempfile::tempdir().unwrap();
    let _hold = std::net::TcpListener::bind("127.9.1.2:2380").unwrap();
    let out = run(
        ballast_bin().to_str().unwrap(),
        &[
            "up",
            "--dir",
            tmp.path().join("c").to_str().unwrap(),
            "--address-block",
            "9",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("127.9.1.2:2380 is busy"), "{err}");
    assert!(!tmp.path().join("c/m1.pid").exists());
}

/// The contract's default addresses (the only test that uses them; it runs alone).
#[test]
fn up_default_addresses() {
    let tmp = tempfile::tempdir().unwrap();
    let mut up = UpProcess::start(&tmp.path().join("c"), &[]);
    let addrs: Vec<String> = [
        "https://127.0.1.1:6443",
        "https://127.0.1.2:6443",
        "https://127.0.1.3:6443",
        "http://127.0.0.1:9180",
        "https://127.0.2.1:10250",
        "https://127.0.2.2:10250",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    livez_all(&up, &addrs);
    up.signal(Signal::SIGTERM);
    assert!(up.wait(Duration::from_secs(60)).expect("stops").success());
}

/// `ballast pki` for real hosts: `init` makes the CA and every identity of a config
/// (keys 0600), keeps what exists, and `issue` adds a user with a kubeconfig.
#[test]
fn pki_init_and_issue_from_a_config() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("ballast.toml");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/ballast.toml"),
        &config,
    )
    .unwrap();
    let bin = ballast_bin();
    let bin = bin.to_str().unwrap();
    let cfg = config.to_str().unwrap();
    let out = run(bin, &["pki", "init", "--config", cfg]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pki = tmp.path().join("pki");
    let id = |name: &str| {
        let (crt, key) = ballast_config::pki::identity_paths(&pki, name);
        ballast_config::tls::NodeTls::load(&crt, &key, &pki.join("ca.crt"))
            .unwrap()
            .identity()
            .unwrap()
    };
    assert_eq!(id("m2").user, "master:m2");
    assert_eq!(id("w1").user, "system:node:w1");
    assert_eq!(id("w1").groups, ["system:nodes"]);
    assert_eq!(id("admin").groups, ["system:masters"]);
    let ca = std::fs::read(pki.join("ca.crt")).unwrap();
    let again = run(bin, &["pki", "init", "--config", cfg]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to do"));
    assert_eq!(std::fs::read(pki.join("ca.crt")).unwrap(), ca);

    let kc = tmp.path().join("alice.kubeconfig");
    let out = run(
        bin,
        &[
            "pki",
            "issue",
            "--config",
            cfg,
            "--name",
            "alice",
            "--group",
            "dev",
            "--kubeconfig",
            kc.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(id("alice").user, "alice");
    assert_eq!(id("alice").groups, ["dev"]);
    let text = std::fs::read_to_string(&kc).unwrap();
    assert!(text.contains("server: https://127.0.0.1:6443"), "{text}");
    // issuing the same name again is refused, and keeps the first
    let out = run(bin, &["pki", "issue", "--config", cfg, "--name", "alice"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists"));
}
