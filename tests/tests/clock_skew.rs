//! Clocks that are wrong (libfaketime):
//! - workers whose wall clocks are a minute off: the masters judge a node's silence by
//!   their own clock, from when they saw its lease move, so a worker a minute behind stays
//!   Ready with its pod, and one a minute ahead that dies is marked after the grace
//!   period, not a minute later;
//! - masters whose wall clocks jump hours forward and back (as `settimeofday` or a bad NTP
//!   step would): leadership, fencing and node liveness run on monotonic clocks, so no
//!   leadership decision changes and no node or pod is touched.

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
        let body = sleep_pod(pod, "default", node, 4949);
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

/// The masters' wall clocks jump while the cluster runs: libfaketime reads each master's
/// offset from a file it re-reads every second, the monotonic clock untouched.
#[test]
fn masters_wall_clocks_jumping_change_no_leadership_decision() {
    assert!(
        std::path::Path::new(FAKETIME).exists(),
        "{FAKETIME} (Debian faketime) is required: ./task deps"
    );
    let mut c = Cluster::configure(ClusterOpts::new(59).workers(1).proxy(true), |cfg| {
        cfg.worker.lease_interval = Duration::from_secs(1);
        cfg.control.node_grace_period = Duration::from_secs(6);
    });
    let dir = c.dir().to_path_buf();
    let offset_file = |id: &str| dir.join(format!("faketime-{id}"));
    let files: Vec<(String, std::path::PathBuf)> = c
        .master_ids()
        .into_iter()
        .map(|id| {
            let f = offset_file(&id);
            (id, f)
        })
        .collect();
    for (id, file) in &files {
        std::fs::write(file, "+0\n").unwrap();
        let file = file.to_str().unwrap();
        c.start_node_env(
            id,
            &[
                ("LD_PRELOAD", FAKETIME),
                ("FAKETIME_TIMESTAMP_FILE", file),
                ("FAKETIME_CACHE_DURATION", "1"),
                ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
                ("FAKETIME_DONT_RESET", "1"),
            ],
        );
    }
    for id in ["proxy", "w1"] {
        c.start_node(id);
    }
    let (active, term) = c.wait_one_active(LONG);
    let pods = format!("{}/api/v1/namespaces/default/pods", c.proxy_url());
    let body = sleep_pod("steady", "default", "w1", 5959);
    let r = http("POST", &pods, Some(&body.to_string())).unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    wait_until("w1 Ready", LONG, || {
        (ready(&c, "w1")? == "True").then_some(())
    });
    let pids = wait_until("the pod running", LONG, || {
        let p = pod_processes(c.dir());
        (p.len() == 1).then_some(p)
    });

    let leases = format!(
        "{}/apis/coordination.k8s.io/v1/namespaces/default/leases",
        c.proxy_url()
    );
    let mut writes = 0;
    // (whose clock, offset, how far the active's timestamps should be from the truth)
    let followers: Vec<String> = c
        .master_ids()
        .into_iter()
        .filter(|m| *m != active)
        .collect();
    let steps: [(&[String], &str, i64); 4] = [
        (std::slice::from_ref(&active), "+6h", 6 * 3600),
        (&followers, "-50m", 6 * 3600),
        (std::slice::from_ref(&active), "-50m", -50 * 60),
        (&c.master_ids(), "+0", 0),
    ];
    for (who, offset, active_skew) in steps {
        for id in who {
            std::fs::write(offset_file(id), format!("{offset}\n")).unwrap();
        }
        // Past libfaketime's cache, then four election timeouts' worth of watching.
        let until = Instant::now() + Duration::from_secs(8);
        let mut seen_skew = None;
        while Instant::now() < until {
            assert_eq!(
                c.active_masters(),
                vec![(active.clone(), term)],
                "leadership changed after {who:?} jumped {offset}\n{}",
                c.logs(40)
            );
            assert_eq!(ready(&c, "w1").as_deref(), Some("True"), "after {offset}");
            writes += 1;
            let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": format!("jump-{writes}"), "namespace": "default"},
                "spec": {"holderIdentity": "test"}});
            let r = http("POST", &leases, Some(&lease.to_string())).unwrap();
            assert_eq!(r.status, 201, "a write after {offset}: {}", r.body);
            // The active's own clock stamps the object: proof the jump took effect.
            let stamped: jiff::Timestamp = r.json()["metadata"]["creationTimestamp"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            seen_skew = Some(stamped.as_second() - jiff::Timestamp::now().as_second());
            std::thread::sleep(Duration::from_millis(250));
        }
        let skew = seen_skew.unwrap();
        assert!(
            (skew - active_skew).abs() <= 5,
            "the active's clock is {skew} s off after {who:?} jumped {offset}, expected {active_skew} s"
        );
        println!(
            "{who:?} jumped {offset}: active {active} term {term} kept, active clock {skew:+} s"
        );
    }
    assert_eq!(pod_processes(c.dir()), pids, "a pod was restarted or lost");
    println!("{writes} writes, every one acknowledged");
}
