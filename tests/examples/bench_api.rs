//! API benchmark (issue 5): `./task bench-api`.
//!
//! In one run, on loopback, one after the other (never both at once):
//!
//! 1. **etcd 3.4** (Debian `etcd-server`): 3 members on `127.81.0.1..3`, data dirs in a temp
//!    dir (fsync on, etcd's default). `BENCH_CLIENTS` threads (default 16), each with its own
//!    keep-alive connection to the leader's v3 JSON gateway, send `POST /v3/kv/put` of
//!    `BENCH_PODS` keys (default 10000) `/registry/pods/default/bench-W-N`, the value being
//!    the very pod JSON Ballast gets below. Puts/s and per-request latency.
//! 2. **Ballast**: 3 masters (durable: redb log, fsync per append) + the proxy in
//!    `127.80.0.0/16`. The same clients `POST /api/v1/namespaces/default/pods` (a small pod:
//!    one container, requests 10m cpu / 16Mi) through the proxy: pods created/s (201s) and
//!    latency. No node exists yet, so the scheduler marks each pod `Unschedulable` (a status
//!    write and an Event) meanwhile, as kube-scheduler would. Then the ratio ballast/etcd.
//! 3. Once the store is quiet: `BENCH_LIST_RUNS` (default 20) `GET /api/v1/pods` of all the
//!    pods through the proxy, one at a time: p50 / p99 latency and size.
//! 4. Scheduler A: one `ballast worker --id w1 --hollow BENCH_NODES` (default 100) process
//!    joins that cluster with every pod above pending: pods bound (`GET /api/v1/pods?
//!    fieldSelector=spec.nodeName=` empty) in the `BENCH_BIND_WINDOW_SECS` (default 30 s)
//!    after it started, as binds/s.
//!    Scheduler B: a fresh cluster in `127.89.0.0/16`, the hollow nodes first, then
//!    `BENCH_SCHED_PODS` (default 1000) pods created by the same clients: time from the
//!    first create until every pod is bound (at most `BENCH_SCHED_SECS`, default 150 s).
//!    The scheduler binds one pod per reconcile pass and a pass lists every object, so the
//!    time grows with the square of the pending count: 10k in one go does not fit here.
//!
//! Run with a release build: `BALLAST_BIN=$CARGO_TARGET_DIR/release/ballast`.

use std::fs::OpenOptions;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ballast_tests::bench::{client, env_or, rank, sorted_millis};
use ballast_tests::{ballast_bin, spawn_tied, wait_until, Cluster, ClusterOpts};

const BLOCK: u8 = 80;
const ETCD_BLOCK: u8 = 81;
const SCHED_BLOCK: u8 = 89;

/// p50 / p99 / max by nearest rank, in milliseconds.
fn summary(samples: &[Duration]) -> String {
    if samples.is_empty() {
        return "no samples".into();
    }
    let v = sorted_millis(samples);
    let rank = |p: f64| rank(&v, p);
    format!(
        "p50 {:7.1}  p99 {:7.1}  max {:7.1} ms (n={})",
        rank(0.50),
        rank(0.99),
        v[v.len() - 1],
        v.len()
    )
}

fn b64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for ch in data.chunks(3) {
        let n = (u32::from(ch[0]) << 16)
            | (u32::from(*ch.get(1).unwrap_or(&0)) << 8)
            | u32::from(*ch.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= ch.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn pod_name(w: usize, n: usize) -> String {
    format!("bench-{w}-{n}")
}

fn pod_json(name: &str) -> String {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "bench"}},
        "spec": {"containers": [{
            "name": "c",
            "image": "busybox",
            "command": ["sleep", "3600"],
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}
        }]}
    })
    .to_string()
}

/// A closed-loop load: `clients` threads send `total` requests (`send(w, n)` for the n-th
/// request of client w, n = w, w + clients, ...). Returns (ok count, errors, wall time,
/// latencies of the successful requests).
struct LoadResult {
    ok: u64,
    errors: u64,
    wall: Duration,
    lat: Vec<Duration>,
}

fn closed_loop(
    clients: usize,
    total: usize,
    send: impl Fn(&reqwest::blocking::Client, usize, usize) -> Result<(), String>
        + Send
        + Sync
        + 'static,
) -> LoadResult {
    let send = Arc::new(send);
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_err: Arc<Mutex<Option<String>>> = Arc::default();
    let lat: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let start = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|w| {
            let (send, ok, errors, lat, first_err) = (
                send.clone(),
                ok.clone(),
                errors.clone(),
                lat.clone(),
                first_err.clone(),
            );
            thread::spawn(move || {
                let http = client(Duration::from_secs(10));
                let mut mine = Vec::with_capacity(total / clients + 1);
                let mut n = w;
                while n < total {
                    let t0 = Instant::now();
                    match send(&http, w, n) {
                        Ok(()) => {
                            mine.push(t0.elapsed());
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            first_err.lock().unwrap().get_or_insert(e);
                        }
                    }
                    n += clients;
                }
                lat.lock().unwrap().extend(mine);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let wall = start.elapsed();
    if let Some(e) = first_err.lock().unwrap().as_ref() {
        println!("  first error: {e}");
    }
    let lat = std::mem::take(&mut *lat.lock().unwrap());
    LoadResult {
        ok: ok.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        wall,
        lat,
    }
}

/// A child process killed (and reaped) on drop.
struct Tied(Child);

impl Drop for Tied {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------------------
// etcd

fn etcd_url(i: usize) -> String {
    format!("http://127.{ETCD_BLOCK}.0.{i}:2379")
}

fn start_etcd(dir: &Path) -> Vec<Tied> {
    let cluster: Vec<String> = (1..=3)
        .map(|i| format!("e{i}=http://127.{ETCD_BLOCK}.0.{i}:2380"))
        .collect();
    let cluster = cluster.join(",");
    (1..=3)
        .map(|i| {
            let peer = format!("http://127.{ETCD_BLOCK}.0.{i}:2380");
            let log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(format!("e{i}.log")))
                .unwrap();
            let mut cmd = Command::new("etcd");
            cmd.args(["--name", &format!("e{i}")])
                .arg("--data-dir")
                .arg(dir.join(format!("e{i}")))
                .args(["--listen-client-urls", &etcd_url(i)])
                .args(["--advertise-client-urls", &etcd_url(i)])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &cluster])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "ballast-bench"])
                .args(["--log-level", "warn"])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log);
            Tied(spawn_tied(&mut cmd).expect("run etcd (apt-get install etcd-server)"))
        })
        .collect()
}

/// The leader's client URL.
fn etcd_leader() -> Option<String> {
    let http = client(Duration::from_secs(1));
    (1..=3).find_map(|i| {
        let v: serde_json::Value = http
            .post(format!("{}/v3/maintenance/status", etcd_url(i)))
            .body("{}")
            .send()
            .ok()?
            .json()
            .ok()?;
        let me = v["header"]["member_id"].as_str()?;
        (Some(me) == v["leader"].as_str()).then(|| etcd_url(i))
    })
}

fn bench_etcd(clients: usize, total: usize) -> Option<f64> {
    if !ballast_tests::have("etcd") {
        println!("etcd not installed (apt-get install etcd-server): skipped");
        return None;
    }
    let dir = tempfile::Builder::new()
        .prefix("ballast-bench-etcd-")
        .tempdir()
        .unwrap();
    let _procs = start_etcd(dir.path());
    let leader = wait_until("an etcd leader", Duration::from_secs(30), etcd_leader);
    println!("\n== etcd 3.4: 3 members, {clients} clients -> leader {leader} /v3/kv/put ==");
    // Warm-up: one put per client connection.
    let url = Arc::new(format!("{leader}/v3/kv/put"));
    let put = {
        let url = url.clone();
        move |http: &reqwest::blocking::Client, key: &str, val: &str| -> Result<(), String> {
            let body = format!(
                r#"{{"key":"{}","value":"{}"}}"#,
                b64(key.as_bytes()),
                b64(val.as_bytes())
            );
            let r = http
                .post(url.as_str())
                .body(body)
                .send()
                .map_err(|e| e.to_string())?;
            let st = r.status().as_u16();
            let text = r.text().unwrap_or_default();
            if st == 200 && text.contains("header") {
                Ok(())
            } else {
                Err(format!("{st}: {text}"))
            }
        }
    };
    let warm = put.clone();
    closed_loop(clients, clients, move |h, w, _| {
        warm(h, &format!("/warm/{w}"), "x")
    });
    let r = closed_loop(clients, total, move |h, w, n| {
        let name = pod_name(w, n);
        put(
            h,
            &format!("/registry/pods/default/{name}"),
            &pod_json(&name),
        )
    });
    let rate = r.ok as f64 / r.wall.as_secs_f64();
    println!(
        "etcd puts: {} ok, {} errors in {:.2} s = {rate:.0} puts/s; latency {}",
        r.ok,
        r.errors,
        r.wall.as_secs_f64(),
        summary(&r.lat)
    );
    Some(rate)
}

// ---------------------------------------------------------------------------------------
// Ballast

fn store_revision(c: &Cluster, id: &str) -> Option<u64> {
    c.master_gauge(id, "ballast_master_store_revision")
}

/// Wait until the store revision has not moved for `quiet`; returns how long that took.
fn wait_quiet(c: &Cluster, active: &str, quiet: Duration, max: Duration) -> Duration {
    let start = Instant::now();
    let mut last = (store_revision(c, active), Instant::now());
    while start.elapsed() < max {
        thread::sleep(Duration::from_millis(250));
        let rev = store_revision(c, active);
        if rev != last.0 {
            last = (rev, Instant::now());
        } else if last.1.elapsed() >= quiet {
            return last.1 - start;
        }
    }
    start.elapsed()
}

/// The proxy's count of active-master changes (`/status` of its admin address).
fn proxy_failovers(c: &Cluster) -> u64 {
    ballast_tests::http_timeout(
        "GET",
        &format!("http://{}/status", c.proxy_admin()),
        None,
        Duration::from_secs(2),
    )
    .ok()
    .and_then(|r| r.json()["failovers"].as_u64())
    .unwrap_or(0)
}

fn unbound_pods(http: &reqwest::blocking::Client, proxy: &str) -> Option<usize> {
    let v: serde_json::Value = http
        .get(format!(
            "{proxy}/api/v1/pods?fieldSelector=spec.nodeName%3D"
        ))
        .send()
        .ok()?
        .json()
        .ok()?;
    v["items"].as_array().map(Vec::len)
}

fn hollow_metric(addr: &str, name: &str) -> Option<f64> {
    let body = ballast_tests::http_timeout(
        "GET",
        &format!("http://{addr}/metrics"),
        None,
        Duration::from_secs(2),
    )
    .ok()?
    .body;
    body.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

fn start_ballast(block: u8) -> (Cluster, String, String) {
    let mut c = Cluster::configure(ClusterOpts::new(block).proxy(true).workers(1), |cfg| {
        cfg.control.internal_kv = false;
        cfg.worker.lease_interval = Duration::from_secs(10);
        cfg.control.node_grace_period = Duration::from_secs(40);
    });
    for id in c.master_ids() {
        c.start_node(&id);
    }
    c.start_node("proxy");
    let (active, _term) = c.wait_one_active(Duration::from_secs(60));
    let proxy = c.proxy_url();
    wait_until("the proxy routes", Duration::from_secs(30), || {
        let r = ballast_tests::http("GET", &format!("{proxy}/api/v1/namespaces/default"), None);
        r.ok().filter(|r| r.status == 200)
    });
    (c, active, proxy)
}

/// `ballast worker --id w1 --hollow N`, its output appended to the cluster's `logs/w1.log`.
fn start_hollow(c: &Cluster, nodes: usize) -> Tied {
    let mut cmd = c.node_command("w1", &["--hollow", &nodes.to_string()]);
    Tied(spawn_tied(&mut cmd).expect("spawn hollow worker"))
}

fn lease_count(proxy: &str) -> Option<usize> {
    ballast_tests::http(
        "GET",
        &format!("{proxy}/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"),
        None,
    )
    .ok()
    .and_then(|r| r.json()["items"].as_array().map(Vec::len))
}

/// Poll the unbound pods every second from `t0` until none is left or `deadline`; returns
/// (all bound at, bound count, when every node had a lease).
fn wait_bound(
    c: &Cluster,
    proxy: &str,
    total: usize,
    nodes: usize,
    t0: Instant,
    deadline: Instant,
) -> (Option<Duration>, usize, Option<Duration>) {
    let w1 = c.config().worker("w1").unwrap().address.to_string();
    let http = client(Duration::from_secs(30));
    let mut nodes_ready = None;
    let mut last_report = Instant::now();
    let mut unbound = total;
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(1000));
        if nodes_ready.is_none() && lease_count(proxy).is_some_and(|n| n >= nodes) {
            nodes_ready = Some(t0.elapsed());
        }
        if let Some(u) = unbound_pods(&http, proxy) {
            unbound = u;
        }
        if unbound == 0 {
            return (Some(t0.elapsed()), total, nodes_ready);
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            let running = hollow_metric(&w1, "ballast_worker_pods_running").unwrap_or(0.0);
            println!(
                "  t={:5.1} s: {} bound, {unbound} unbound, {running} reported running",
                t0.elapsed().as_secs_f64(),
                total.saturating_sub(unbound),
            );
        }
    }
    (None, total.saturating_sub(unbound), nodes_ready)
}

fn pod_creator(
    proxy: &str,
) -> impl Fn(&reqwest::blocking::Client, &str) -> Result<(), String> + Clone + Send + Sync + 'static
{
    let url = Arc::new(format!("{proxy}/api/v1/namespaces/default/pods"));
    move |http: &reqwest::blocking::Client, name: &str| -> Result<(), String> {
        let r = http
            .post(url.as_str())
            .header("content-type", "application/json")
            .body(pod_json(name))
            .send()
            .map_err(|e| e.to_string())?;
        let st = r.status().as_u16();
        let text = r.text().unwrap_or_default();
        if st == 201 {
            Ok(())
        } else {
            Err(format!(
                "{st}: {}",
                text.chars().take(300).collect::<String>()
            ))
        }
    }
}

fn main() {
    let clients: usize = env_or("BENCH_CLIENTS", 16);
    let pods: usize = env_or("BENCH_PODS", 10_000);
    let list_runs: usize = env_or("BENCH_LIST_RUNS", 20);
    let nodes: usize = env_or("BENCH_NODES", 100);
    let bind_window: u64 = env_or("BENCH_BIND_WINDOW_SECS", 30);
    let sched_pods: usize = env_or("BENCH_SCHED_PODS", 1000);
    let sched_secs: u64 = env_or("BENCH_SCHED_SECS", 150);
    println!(
        "bench-api: {clients} clients, {pods} pods, {list_runs} list runs, {nodes} hollow nodes, \
         scheduler run of {sched_pods} pods; binary {}",
        ballast_bin().display()
    );

    // 1. etcd.
    let etcd_rate = bench_etcd(clients, pods);

    // 2. Ballast: masters + proxy (the worker is started later, hollow).
    let (c, active, proxy) = start_ballast(BLOCK);
    println!(
        "\n== ballast: 3 masters (active {active}) + proxy {proxy}, {clients} clients \
         POST /api/v1/namespaces/default/pods =="
    );
    let create = pod_creator(&proxy);
    let warm = create.clone();
    closed_loop(clients, clients, move |h, w, _| {
        warm(h, &format!("warm-{w}"))
    });
    let rev0 = store_revision(&c, &active).unwrap_or(0);
    let fo0 = proxy_failovers(&c);
    let r = closed_loop(clients, pods, move |h, w, n| create(h, &pod_name(w, n)));
    let rev1 = store_revision(&c, &active).unwrap_or(0);
    let fo1 = proxy_failovers(&c);
    let rate = r.ok as f64 / r.wall.as_secs_f64();
    println!(
        "ballast pod creates: {} created, {} errors in {:.2} s = {rate:.0} pods/s; latency {}",
        r.ok,
        r.errors,
        r.wall.as_secs_f64(),
        summary(&r.lat)
    );
    println!(
        "  store writes meanwhile (creates + the scheduler's Unschedulable status + Events): \
         {} = {:.0} writes/s",
        rev1.saturating_sub(rev0),
        rev1.saturating_sub(rev0) as f64 / r.wall.as_secs_f64()
    );
    println!(
        "  active-master changes seen by the proxy during the creates: {}",
        fo1 - fo0
    );
    match etcd_rate {
        Some(e) => println!(
            "ratio ballast pods/s / etcd puts/s = {:.2}x (goal >= 1.0x: {})",
            rate / e,
            if rate >= e { "met" } else { "NOT met" }
        ),
        None => println!("ratio: no etcd figure"),
    }
    let total_pods = r.ok as usize + clients;

    // 3. List latency, once the controllers are done marking the pods unschedulable.
    let settled = wait_quiet(
        &c,
        &active,
        Duration::from_secs(2),
        Duration::from_secs(120),
    );
    println!(
        "store quiet {:.1} s after the last create (scheduler marked {} pods Unschedulable)",
        settled.as_secs_f64(),
        total_pods
    );
    let http = client(Duration::from_secs(60));
    let mut lat = Vec::new();
    let mut size = 0;
    let mut items = 0;
    for _ in 0..list_runs {
        let t0 = Instant::now();
        let resp = http
            .get(format!("{proxy}/api/v1/pods"))
            .send()
            .and_then(|r| r.bytes());
        match resp {
            Ok(body) => {
                lat.push(t0.elapsed());
                size = body.len();
                items = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["items"].as_array().map(Vec::len))
                    .unwrap_or(0);
            }
            Err(e) => println!("  list failed: {e}"),
        }
    }
    let fo2 = proxy_failovers(&c);
    println!(
        "  active-master changes while settling and listing: {}",
        fo2 - fo1
    );
    println!(
        "list GET /api/v1/pods ({items} pods, {:.1} MB): {}",
        size as f64 / 1e6,
        summary(&lat)
    );

    // 4a. Bind rate with all those pods pending.
    println!(
        "\n== scheduler A: {total_pods} pending pods, {nodes} hollow nodes join; \
         {bind_window} s window =="
    );
    let t0 = Instant::now();
    let hollow = start_hollow(&c, nodes);
    let (done, bound, ready) = wait_bound(
        &c,
        &proxy,
        total_pods,
        nodes,
        t0,
        t0 + Duration::from_secs(bind_window),
    );
    let el = done.unwrap_or_else(|| t0.elapsed());
    println!(
        "{bound} of {total_pods} bound {:.1} s after the hollow worker started = {:.1} binds/s{}; \
         nodes registered after {}",
        el.as_secs_f64(),
        bound as f64 / el.as_secs_f64(),
        if done.is_some() { " (all)" } else { "" },
        ready.map_or("(not all)".to_string(), |d| format!(
            "{:.1} s",
            d.as_secs_f64()
        )),
    );
    println!(
        "  active-master changes meanwhile: {}",
        proxy_failovers(&c) - fo2
    );
    drop(hollow);
    drop(c);

    // 4b. A fresh cluster: nodes first, then create pods and time until all are bound.
    println!(
        "\n== scheduler B: fresh cluster, {nodes} hollow nodes, then {sched_pods} pods created \
         by {clients} clients; time from the first create to all bound =="
    );
    let (c, _active, proxy) = start_ballast(SCHED_BLOCK);
    let _hollow = start_hollow(&c, nodes);
    let t_nodes = Instant::now();
    wait_until(
        "every hollow node's lease",
        Duration::from_secs(120),
        || lease_count(&proxy).filter(|n| *n >= nodes),
    );
    println!(
        "  {nodes} nodes registered in {:.1} s",
        t_nodes.elapsed().as_secs_f64()
    );
    thread::sleep(Duration::from_secs(2));
    let create = pod_creator(&proxy);
    let t0 = Instant::now();
    let r = closed_loop(clients, sched_pods, move |h, w, n| {
        create(h, &pod_name(w, n))
    });
    println!(
        "  {} created in {:.2} s ({} errors)",
        r.ok,
        r.wall.as_secs_f64(),
        r.errors
    );
    // A create answered 503 may still have been committed: count the pods.
    let total = ballast_tests::http("GET", &format!("{proxy}/api/v1/pods"), None)
        .ok()
        .and_then(|r| r.json()["items"].as_array().map(Vec::len))
        .unwrap_or(r.ok as usize);
    let (done, bound, _) = wait_bound(
        &c,
        &proxy,
        total,
        0,
        t0,
        t0 + Duration::from_secs(sched_secs),
    );
    match done {
        Some(d) => println!(
            "all {total} pods bound {:.1} s after the first create = {:.1} pods/s scheduled",
            d.as_secs_f64(),
            total as f64 / d.as_secs_f64()
        ),
        None => {
            let el = t0.elapsed().as_secs_f64();
            println!(
                "NOT all bound: {bound} of {total} in {el:.1} s = {:.1} binds/s (cut at \
                 BENCH_SCHED_SECS={sched_secs})",
                bound as f64 / el
            )
        }
    }
    println!(
        "  active-master changes seen by the proxy in this part: {}",
        proxy_failovers(&c)
    );
    let w1 = c.config().worker("w1").unwrap().address.to_string();
    let running = hollow_metric(&w1, "ballast_worker_pods_running").unwrap_or(0.0);
    println!("  hollow nodes report {running} pods running");
}
