//! API and scheduler benchmark: `./task bench-api`.
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
//!    fieldSelector=spec.nodeName=` empty) in the `BENCH_BIND_WINDOW_SECS` (default 90 s)
//!    after it started, as binds/s, and the time from every node holding a lease to every
//!    pod bound.
//!    Scheduler B: a fresh cluster in `127.89.0.0/16`, the hollow nodes first, then
//!    `BENCH_SCHED_PODS` (default 1000) pods created by the same clients: time from the
//!    first create until every pod is bound (at most `BENCH_SCHED_SECS`, default 150 s).
//!
//! Each part runs `BENCH_ROUNDS` times (default 3), each round on fresh clusters; the end
//! prints each figure's median and spread, so one lucky or unlucky run cannot stand for the
//! result. Each create run also prints what explains its speed: every process's CPU (the
//! active master's split into its API runtime, its Raft runtime and the rest), how busy the
//! machine was, and the active master's group-commit batch sizes
//! (`ballast_master_store_batch_writes`).
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
        &format!("https://{addr}/metrics"),
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

/// What one round is run with (from the environment).
struct Params {
    clients: usize,
    pods: usize,
    list_runs: usize,
    nodes: usize,
    bind_window: u64,
    sched_pods: usize,
    sched_secs: u64,
}

/// The figures of one round.
#[derive(Debug, Default, Clone)]
struct Round {
    etcd_puts: Option<f64>,
    pods_per_s: f64,
    list_p99_ms: Option<f64>,
    /// Scheduler A: seconds from the hollow worker's start to every pod bound.
    sched_a: Option<f64>,
    /// Scheduler A: seconds from every node holding a lease to every pod bound.
    sched_a_after_nodes: Option<f64>,
    sched_a_bound: usize,
    /// Scheduler B: seconds from the first create to every pod bound.
    sched_b: Option<f64>,
}

/// CPU seconds (user + system) of each thread of `pid`, summed by role: the Raft
/// runtime (`raft`), the API runtime (`tokio-rt-worker`, tokio's default) and the rest.
fn cpu_by_role(pid: u32) -> [f64; 3] {
    let mut out = [0.0; 3];
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        // After the name: state is field 3 of stat(5); utime and stime are 14 and 15.
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<f64>().ok()))
            .sum();
        let role = match comm {
            c if c.starts_with("raft") => 0,
            c if c.starts_with("tokio-r") => 1,
            _ => 2,
        };
        out[role] += ticks / 100.0;
    }
    out
}

/// Busy and total jiffies of the whole machine.
fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

/// A snapshot of what explains a slow write run: each process's CPU and the active
/// master's group-commit counters.
struct Explain {
    cpu: Vec<(String, [f64; 3])>,
    machine: (f64, f64),
    batches: (u64, u64),
}

impl Explain {
    fn take(c: &Cluster, active: &str) -> Self {
        let mut ids = c.master_ids();
        ids.push("proxy".into());
        let cpu = ids
            .iter()
            .filter_map(|id| Some((id.clone(), cpu_by_role(c.pid(id)?))))
            .collect();
        let count = c.master_gauge(active, "ballast_master_store_batch_writes_count");
        let sum = c.master_gauge(active, "ballast_master_store_batch_writes_sum");
        Explain {
            cpu,
            machine: machine_cpu(),
            batches: (count.unwrap_or(0), sum.unwrap_or(0)),
        }
    }

    /// Print what happened between `self` and `after`, for `ops` operations.
    fn print(&self, after: &Explain, active: &str, ops: u64) {
        let mut parts = Vec::new();
        for ((id, b), (_, a)) in self.cpu.iter().zip(&after.cpu) {
            let d: Vec<f64> = (0..3).map(|i| a[i] - b[i]).collect();
            let total: f64 = d.iter().sum();
            let per_op = total * 1e6 / ops.max(1) as f64;
            if id == active {
                parts.push(format!(
                    "{id} (active) {total:.1} s = {per_op:.0} µs/op [api {:.1}, raft {:.1}, other {:.1}]",
                    d[1], d[0], d[2]
                ));
            } else {
                parts.push(format!("{id} {total:.1} s ({per_op:.0} µs/op)"));
            }
        }
        println!("  CPU meanwhile: {}", parts.join("; "));
        let busy = after.machine.0 - self.machine.0;
        let total = after.machine.1 - self.machine.1;
        println!(
            "  machine busy {:.0} % of {} cores",
            100.0 * busy / total.max(1.0),
            thread::available_parallelism().map_or(0, |n| n.get())
        );
        let entries = after.batches.0.saturating_sub(self.batches.0);
        let writes = after.batches.1.saturating_sub(self.batches.1);
        println!(
            "  group commit on {active}: {writes} writes in {entries} Raft entries = {:.1} writes/entry",
            writes as f64 / entries.max(1) as f64
        );
    }
}

/// Median, min and max of `v` (values present).
fn spread(v: &[Option<f64>]) -> Option<(f64, f64, f64)> {
    let mut x: Vec<f64> = v.iter().flatten().copied().collect();
    if x.is_empty() {
        return None;
    }
    x.sort_by(f64::total_cmp);
    Some((x[x.len() / 2], x[0], x[x.len() - 1]))
}

fn main() {
    let p = Params {
        clients: env_or("BENCH_CLIENTS", 16),
        pods: env_or("BENCH_PODS", 10_000),
        list_runs: env_or("BENCH_LIST_RUNS", 20),
        nodes: env_or("BENCH_NODES", 100),
        bind_window: env_or("BENCH_BIND_WINDOW_SECS", 90),
        sched_pods: env_or("BENCH_SCHED_PODS", 1000),
        sched_secs: env_or("BENCH_SCHED_SECS", 150),
    };
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    println!(
        "bench-api: {rounds} rounds of: {} clients, {} pods, {} list runs, {} hollow nodes, \
         scheduler run of {} pods; binary {}",
        p.clients,
        p.pods,
        p.list_runs,
        p.nodes,
        p.sched_pods,
        ballast_bin().display()
    );
    let mut results = Vec::new();
    for i in 1..=rounds {
        println!("\n################ round {i} of {rounds}");
        results.push(round(&p));
    }
    println!("\n################ summary over {rounds} rounds: median (min .. max)");
    let show = |name: &str, v: Vec<Option<f64>>, unit: &str| match spread(&v) {
        Some((m, lo, hi)) => println!("{name:<44} {m:9.2} ({lo:.2} .. {hi:.2}) {unit}"),
        None => println!("{name:<44} no figure"),
    };
    show(
        "etcd puts/s",
        results.iter().map(|r| r.etcd_puts).collect(),
        "",
    );
    show(
        "ballast pods/s",
        results.iter().map(|r| Some(r.pods_per_s)).collect(),
        "",
    );
    let ratios: Vec<Option<f64>> = results
        .iter()
        .map(|r| r.etcd_puts.map(|e| r.pods_per_s / e))
        .collect();
    show("ratio ballast/etcd (goal >= 1.0)", ratios, "x");
    show(
        "list p99 (goal <= 300)",
        results.iter().map(|r| r.list_p99_ms).collect(),
        "ms",
    );
    show(
        "scheduler A: hollow worker start -> all bound",
        results.iter().map(|r| r.sched_a).collect(),
        "s",
    );
    show(
        "scheduler A: all bound after nodes (goal <= 30)",
        results.iter().map(|r| r.sched_a_after_nodes).collect(),
        "s",
    );
    let not_all = results
        .iter()
        .filter(|r| r.sched_a_after_nodes.is_none())
        .count();
    if not_all > 0 {
        println!("  scheduler A: {not_all} round(s) did not bind every pod in the window");
    }
    show(
        "scheduler B: 1st create -> all bound",
        results.iter().map(|r| r.sched_b).collect(),
        "s",
    );
}

/// One round: etcd, then a fresh Ballast cluster (creates, list, scheduler A), then
/// another (scheduler B).
fn round(p: &Params) -> Round {
    let clients = p.clients;
    let nodes = p.nodes;
    let mut out = Round {
        etcd_puts: bench_etcd(clients, p.pods),
        ..Round::default()
    };

    // Ballast: masters + proxy (the worker is started later, hollow).
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
    let before = Explain::take(&c, &active);
    let r = closed_loop(clients, p.pods, move |h, w, n| create(h, &pod_name(w, n)));
    let after = Explain::take(&c, &active);
    let rev1 = store_revision(&c, &active).unwrap_or(0);
    let fo1 = proxy_failovers(&c);
    let rate = r.ok as f64 / r.wall.as_secs_f64();
    out.pods_per_s = rate;
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
    before.print(&after, &active, r.ok);
    println!(
        "  active-master changes seen by the proxy during the creates: {}",
        fo1 - fo0
    );
    match out.etcd_puts {
        Some(e) => println!(
            "ratio ballast pods/s / etcd puts/s = {:.2}x (goal >= 1.0x: {})",
            rate / e,
            if rate >= e { "met" } else { "NOT met" }
        ),
        None => println!("ratio: no etcd figure"),
    }
    let total_pods = r.ok as usize + clients;

    // List latency, once the scheduler is done marking the pods unschedulable.
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
    for _ in 0..p.list_runs {
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
    if !lat.is_empty() {
        let v = sorted_millis(&lat);
        out.list_p99_ms = Some(rank(&v, 0.99));
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

    // Scheduler A: every pod pending, then the nodes join.
    println!(
        "\n== scheduler A: {total_pods} pending pods, {nodes} hollow nodes join; \
         {} s window ==",
        p.bind_window
    );
    let t0 = Instant::now();
    let hollow = start_hollow(&c, nodes);
    let (done, bound, ready) = wait_bound(
        &c,
        &proxy,
        total_pods,
        nodes,
        t0,
        t0 + Duration::from_secs(p.bind_window),
    );
    let el = done.unwrap_or_else(|| t0.elapsed());
    out.sched_a_bound = bound;
    out.sched_a = done.map(|d| d.as_secs_f64());
    // All bound before the last node registered counts as 0.
    out.sched_a_after_nodes = done.map(|d| d.saturating_sub(ready.unwrap_or(d)).as_secs_f64());
    println!(
        "{bound} of {total_pods} bound {:.1} s after the hollow worker started = {:.1} binds/s{}; \
         every node held a lease after {}",
        el.as_secs_f64(),
        bound as f64 / el.as_secs_f64(),
        if done.is_some() { " (all)" } else { "" },
        ready.map_or("(not yet: all bound first)".to_string(), |d| format!(
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

    // Scheduler B: a fresh cluster, nodes first, then the pods.
    println!(
        "\n== scheduler B: fresh cluster, {nodes} hollow nodes, then {} pods created \
         by {clients} clients; time from the first create to all bound ==",
        p.sched_pods
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
    let r = closed_loop(clients, p.sched_pods, move |h, w, n| {
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
        t0 + Duration::from_secs(p.sched_secs),
    );
    out.sched_b = done.map(|d| d.as_secs_f64());
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
                 BENCH_SCHED_SECS={})",
                bound as f64 / el,
                p.sched_secs
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
    out
}
