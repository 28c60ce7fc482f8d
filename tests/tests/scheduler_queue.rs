//! The scheduler binds pending pods as nodes join: pods created before any node exists
//! wait (marked `Unschedulable`), then bind onto the first nodes to register while later
//! ones are still joining, and all bind in the end without overcommitting a node.
//! Address block 30.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ballast_tests::{http, spawn_tied, wait_until, Cluster, ClusterOpts};

const PODS: usize = 2_000;
const NODES: usize = 20;
/// Pods a node takes (the worker's default `capacity.pods`).
const NODE_PODS: usize = 110;

fn pod_json(name: &str) -> String {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "3600"]}]}
    })
    .to_string()
}

/// Pods per node name (`""` for pods not bound), and nodes registered.
fn placement(proxy: &str) -> Option<(HashMap<String, usize>, usize)> {
    let pods = http(
        "GET",
        &format!("{proxy}/api/v1/namespaces/default/pods"),
        None,
    )
    .ok()?;
    let nodes = http("GET", &format!("{proxy}/api/v1/nodes"), None).ok()?;
    if pods.status != 200 || nodes.status != 200 {
        return None;
    }
    let mut by_node = HashMap::new();
    for p in pods.json()["items"].as_array()? {
        let node = p["spec"]["nodeName"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        *by_node.entry(node).or_default() += 1;
    }
    Some((by_node, nodes.json()["items"].as_array()?.len()))
}

#[test]
fn pending_pods_bind_while_nodes_are_still_joining() {
    let mut c = Cluster::configure(ClusterOpts::new(30).proxy(true).workers(1), |cfg| {
        // The hollow nodes start spread over one lease interval: ~1 s apart.
        cfg.worker.lease_interval = Duration::from_secs(20);
        cfg.control.node_grace_period = Duration::from_secs(60);
    });
    for id in c.master_ids() {
        c.start_node(&id);
    }
    c.start_node("proxy");
    c.wait_one_active(Duration::from_secs(60));
    let proxy = c.proxy_url();
    wait_until("the proxy routes", Duration::from_secs(30), || {
        let r = http("GET", &format!("{proxy}/api/v1/namespaces/default"), None);
        r.ok().filter(|r| r.status == 200)
    });

    // PODS pods, no node yet: 8 clients.
    let url = format!("{proxy}/api/v1/namespaces/default/pods");
    std::thread::scope(|s| {
        for w in 0..8 {
            let url = &url;
            s.spawn(move || {
                for n in (w..PODS).step_by(8) {
                    let body = pod_json(&format!("p-{n}"));
                    let r = http("POST", url, Some(&body)).expect("create pod");
                    assert_eq!(r.status, 201, "create p-{n}: {}", r.body);
                }
            });
        }
    });
    // The scheduler says why they wait.
    wait_until("p-0 marked Unschedulable", Duration::from_secs(60), || {
        let r = http("GET", &format!("{url}/p-0"), None).ok()?;
        let conds = r.json()["status"]["conditions"].as_array()?.clone();
        conds
            .iter()
            .any(|c| c["type"] == "PodScheduled" && c["reason"] == "Unschedulable")
            .then_some(())
    });
    let (by_node, nodes) = placement(&proxy).expect("list pods and nodes");
    assert_eq!((by_node.get("").copied(), nodes), (Some(PODS), 0));

    // NODES hollow nodes join one by one.
    let mut hollow = c.node_command("w1", &["--hollow", &NODES.to_string()]);
    let _hollow = KillOnDrop(spawn_tied(&mut hollow).expect("spawn the hollow worker"));
    let started = Instant::now();
    let mut first_bind_at_nodes = None;
    let done = wait_until("every pod bound", Duration::from_secs(180), || {
        let (by_node, nodes) = placement(&proxy)?;
        let unbound = by_node.get("").copied().unwrap_or(0);
        if unbound < PODS && first_bind_at_nodes.is_none() {
            first_bind_at_nodes = Some(nodes);
        }
        std::thread::sleep(Duration::from_millis(200));
        (unbound == 0 && nodes == NODES).then_some(by_node)
    });
    let first = first_bind_at_nodes.expect("pods were bound");
    assert!(
        first < NODES,
        "the first pods were bound only once all {NODES} nodes had joined ({first} registered)"
    );
    for (node, count) in &done {
        assert!(
            *count <= NODE_PODS,
            "{node} holds {count} pods (capacity {NODE_PODS})"
        );
    }
    let bound: usize = done.values().sum();
    assert_eq!(bound, PODS);
    println!(
        "{PODS} pods bound onto {NODES} nodes {:.1} s after the hollow worker started; \
         first binds seen with {first} nodes registered",
        started.elapsed().as_secs_f64()
    );
}

/// Kills the hollow worker when the test ends (pass or panic).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Err(e) = self.0.kill() {
            eprintln!("cannot kill the hollow worker: {e}");
        }
        let _reaped = self.0.wait();
    }
}
