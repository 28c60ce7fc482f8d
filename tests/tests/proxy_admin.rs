//! The proxy's admin endpoint, robustness against bad HTTP, config reload (SIGHUP) and
//! shutdown (SIGTERM), with real processes.
//!
//! Address block 24. Every wait is on a condition with a generous deadline.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use ballast_tests::{http_timeout, raw_tls, wait_until, Cluster, ClusterOpts};
use nix::sys::signal::Signal;

const LONG: Duration = Duration::from_secs(30);

fn get(url: &str) -> Option<ballast_tests::Response> {
    http_timeout("GET", url, None, Duration::from_secs(5)).ok()
}

fn status(c: &Cluster) -> Option<serde_json::Value> {
    let r = get(&format!("http://{}/status", c.proxy_admin()))?;
    (r.status == 200).then(|| r.json())
}

/// Send raw bytes, return what came back (possibly nothing: the proxy may just close).
fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

fn is_4xx_or_closed(answer: &str) -> bool {
    answer.is_empty() || answer.starts_with("HTTP/1.1 4") || answer.starts_with("HTTP/1.0 4")
}

#[test]
fn admin_bad_http_reload_and_shutdown() {
    let mut c = Cluster::start(ClusterOpts::new(24).proxy(true), |_| {});
    let (active, term) = c.wait_one_active(LONG);

    // /status
    let s = wait_until("/status names the active master", LONG, || {
        let s = status(&c)?;
        (s["active"] == active.as_str()).then_some(s)
    });
    let masters = s["masters"].as_array().unwrap();
    assert_eq!(masters.len(), 3);
    let me = masters.iter().find(|m| m["id"] == active.as_str()).unwrap();
    assert_eq!(me["address"], c.master_api(&active).to_string());
    assert_eq!(me["healthy"], true);
    assert_eq!(me["active"], true);
    assert!(me["term"].as_u64().unwrap() >= term);
    assert!(s["failovers"].is_u64());
    assert_eq!(
        get(&format!("http://{}/livez", c.proxy_admin()))
            .unwrap()
            .status,
        200
    );

    // traffic, so every metric has samples
    for _ in 0..5 {
        assert_eq!(
            get(&format!("{}/readyz", c.proxy_url())).unwrap().status,
            200
        );
    }

    // /metrics: contract names, valid exposition format
    let metrics = get(&format!("http://{}/metrics", c.proxy_admin()))
        .unwrap()
        .body;
    for name in [
        &format!("ballast_proxy_active_master{{master=\"{active}\"}} 1") as &str,
        "ballast_proxy_failovers_total",
        "ballast_proxy_failover_seconds_bucket",
        "ballast_proxy_requests_total{code=\"200\"}",
        "ballast_proxy_request_duration_seconds_bucket",
        &format!("ballast_proxy_upstream_healthy{{master=\"{active}\"}} 1"),
        "ballast_proxy_streams_closed_total",
        "ballast_proxy_held_requests",
    ] {
        assert!(metrics.contains(name), "missing {name}");
    }
    {
        ballast_tests::require("promtool");
        let path = c.dir().join("proxy-metrics.txt");
        std::fs::write(&path, &metrics).unwrap();
        let out = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::fs::File::open(&path).unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // plain HTTP or garbage instead of TLS: the handshake fails, no HTTP is answered
    let api = c.proxy_api();
    for junk in [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"garbage garbage garbage\r\n\r\n".to_vec(),
    ] {
        let answer = raw(api, &junk);
        assert!(!answer.contains("HTTP/1."), "{answer}");
    }
    // bad HTTP inside TLS gets a 4xx (or a closed connection), and the proxy keeps serving
    for junk in [
        b"garbage garbage garbage\r\n\r\n".to_vec(),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(),
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n".to_vec(),
        {
            let mut v = b"GET / HTTP/1.1\r\nHost: x\r\nX-Huge: ".to_vec();
            v.extend(std::iter::repeat_n(b'a', 2 * 1024 * 1024));
            v.extend(b"\r\n\r\n");
            v
        },
    ] {
        let answer = raw_tls(api, &junk);
        assert!(
            is_4xx_or_closed(&answer),
            "{}",
            &answer[..answer.len().min(200)]
        );
    }
    let too_big = raw_tls(
        api,
        b"POST /api/v1/namespaces HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n",
    );
    assert!(too_big.starts_with("HTTP/1.1 413"), "{too_big}");
    assert_eq!(
        get(&format!("{}/readyz", c.proxy_url())).unwrap().status,
        200
    );

    // SIGHUP: a master removed from the config disappears, requests keep flowing
    let drop_id = c.master_ids().into_iter().find(|id| *id != active).unwrap();
    c.rewrite_config(|cfg| cfg.masters.retain(|m| m.id != drop_id));
    c.signal("proxy", Signal::SIGHUP);
    wait_until("reloaded master list", LONG, || {
        let s = status(&c)?;
        (s["masters"].as_array()?.len() == 2).then_some(())
    });
    assert_eq!(
        get(&format!("{}/readyz", c.proxy_url())).unwrap().status,
        200
    );
    // a broken config is refused; the running one is kept
    std::fs::write(c.config_path(), "this is [not toml").unwrap();
    c.signal("proxy", Signal::SIGHUP);
    wait_until("reload error counted", LONG, || {
        let m = get(&format!("http://{}/metrics", c.proxy_admin()))?.body;
        m.contains("ballast_proxy_config_reloads_total{result=\"error\"} 1")
            .then_some(())
    });
    let s = status(&c).expect("still serving");
    assert_eq!(s["masters"].as_array().unwrap().len(), 2);
    assert_eq!(
        get(&format!("{}/readyz", c.proxy_url())).unwrap().status,
        200
    );

    // SIGTERM: the proxy stops by itself within its shutdown grace (2 s by default)
    let (exit, by_itself) = c.terminate("proxy", Duration::from_secs(15));
    assert!(by_itself, "proxy did not stop on SIGTERM");
    assert!(exit.success(), "proxy exit status {exit:?}");
}
