//! Workers whose wall clocks are a minute off (libfaketime): the masters judge a node's
//! silence by their own clock, from when they saw its lease move, so a worker a minute
//! behind stays Ready with its pod, and one a minute ahead that dies is marked after the
//! grace period, not a minute later.

use std::process::Child;
use std::time::{Duration, Instant};

use ballast_tests::*;
use serde_json::json;

const LONG: Duration = Duration::from_secs(60);
const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Start worker `id` with its wall clock moved by `offset` ("-60s", "+60s"); its
/// monotonic clock is left alone.
fn start_skewed(c: &Cluster, id: &str, offset: &str) -> Child {
    let mut cmd = c.node_command(id, &[]);
    cmd.env("LD_PRELOAD", FAKETIME)
        .env("FAKETIME", offset)
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env("FAKETIME_DONT_RESET", "1");
    spawn_tied(&mut cmd).expect("start a skewed worker")
}

fn ready(c: &Cluster, node: &str) -> Option<String> {
    let r = http(
        "GET",
        &format!("{}/api/v1/nodes/{node}", c.proxy_url()),
        None,
    )
    .ok()?;
    (r.status == 200).then_some(())?;
    r.json()["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")
        .and_then(|c| c["status"].as_str().map(str::to_string))
}

#[test]
fn workers_a_minute_off_keep_their_nodes_and_pods() {
    assert!(
        std::path::Path::new(FAKETIME).exists(),
        "{FAKETIME} (Debian faketime) is required: ./task deps"
    );
    let mut c = Cluster::configure(ClusterOpts::new(49).workers(2).proxy(true), |cfg| {
        cfg.worker.lease_interval = Duration::from_secs(1);
        cfg.control.node_grace_period = Duration::from_secs(6);
    });
    for id in c.master_ids().into_iter().chain(["proxy".to_string()]) {
        c.start_node(&id);
    }
    c.wait_one_active(LONG);
    let mut behind = start_skewed(&c, "w1", "-60s");
    let mut ahead = start_skewed(&c, "w2", "+60s");
    for (pod, node) in [("behind", "w1"), ("ahead", "w2")] {
        let body = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "namespace": "default"},
            "spec": {"nodeName": node, "containers": [{"name": "main", "image": "busybox",
                "command": ["sleep", "4949"]}]}});
        let url = format!("{}/api/v1/namespaces/default/pods", c.proxy_url());
        let r = http("POST", &url, Some(&body.to_string())).unwrap();
        assert_eq!(r.status, 201, "{}", r.body);
    }
    wait_until("both nodes Ready", LONG, || {
        (ready(&c, "w1")? == "True" && ready(&c, "w2")? == "True").then_some(())
    });
    let pids = wait_until("both pods running", LONG, || {
        let p = pod_processes(c.dir());
        (p.len() == 2).then_some(p)
    });

    // Three grace periods: both stay Ready, nothing is evicted or restarted.
    let until = Instant::now() + Duration::from_secs(18);
    while Instant::now() < until {
        for node in ["w1", "w2"] {
            assert_eq!(ready(&c, node).as_deref(), Some("True"), "{node}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(pod_processes(c.dir()), pids, "a pod was restarted or lost");
    for pid in pids.values() {
        assert!(pid_alive(*pid));
    }

    // The worker a minute ahead dies: its node is marked after the grace period.
    ahead.kill().unwrap();
    ahead.wait().unwrap();
    let died = Instant::now();
    wait_until("w2 marked not ready", Duration::from_secs(30), || {
        (ready(&c, "w2")? == "Unknown").then_some(())
    });
    println!(
        "w2 (a minute ahead) marked Unknown {:.1} s after it died (grace 6 s)",
        died.elapsed().as_secs_f64()
    );
    assert_eq!(ready(&c, "w1").as_deref(), Some("True"));
    behind.kill().unwrap();
    behind.wait().unwrap();
}
