//! Hollow-node benchmark (issue 6): `./task bench-hollow`.
//!
//! For each count in `BENCH_NODES` (default `1000,5000`), a fresh cluster: 3 masters + the
//! proxy in `127.82+k.0.0/16`, and one `ballast worker --id w1 --hollow N` process (N
//! simulated nodes: registration, a Lease renewed every `worker.lease_interval` —
//! `BENCH_LEASE_SECS`, default 10 s, Ballast's default — the node status every 3 leases, and
//! one pod watch per node, all through the proxy). Then:
//!
//! 1. registration: time until N leases exist (at most `BENCH_REGISTER_SECS`, default 150);
//! 2. after one lease interval of steady heartbeats, a `BENCH_WINDOW_SECS` (default 40)
//!    window in which a probe client sends, through the proxy, one request every 50 ms,
//!    alternately `GET /api/v1/namespaces/default` and a small write (`PUT` of a Lease in
//!    `default`): p50 / p99 latency; each master's CPU (utime + stime from /proc/PID/stat
//!    over the window, in cores) and RSS (max of samples every 5 s); the store's writes/s;
//! 3. failover at that load: SIGKILL of the active master while a probe writer sends
//!    `PUT`s back to back; kill → another master's `/active` is 200, and kill → the first
//!    write sent after the kill acknowledged through the proxy; then the probe's p50 / p99
//!    over the next `BENCH_AFTER_SECS` (default 20 s) while the nodes fail over.
//!
//! Run with a release build: `BALLAST_BIN=$CARGO_TARGET_DIR/release/ballast`.

use std::fs;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ballast_tests::bench::{client, env_or, rank, sorted_millis};
use ballast_tests::{ballast_bin, spawn_tied, wait_until, Cluster, ClusterOpts};

const FIRST_BLOCK: u8 = 82;

/// (p50, p99, max) in ms.
fn pcts(samples: &[Duration]) -> Option<(f64, f64, f64)> {
    if samples.is_empty() {
        return None;
    }
    let v = sorted_millis(samples);
    Some((rank(&v, 0.5), rank(&v, 0.99), v[v.len() - 1]))
}

fn summary(samples: &[Duration]) -> String {
    match pcts(samples) {
        None => "no samples".into(),
        Some((p50, p99, max)) => format!(
            "p50 {p50:7.1}  p99 {p99:7.1}  max {max:7.1} ms (n={})",
            samples.len()
        ),
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

fn clk_tck() -> f64 {
    ballast_tests::run("getconf", &["CLK_TCK"])
        .stdout
        .iter()
        .map(|b| *b as char)
        .collect::<String>()
        .trim()
        .parse()
        .unwrap_or(100.0)
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15 (1-based in proc(5)).
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn rss_mb(pid: u32) -> Option<f64> {
    ballast_tests::bench::rss_kib(pid).map(|kib| kib as f64 / 1024.0)
}

#[derive(Clone, Copy)]
struct Sample {
    sent: Instant,
    lat: Duration,
    write: bool,
    ok: bool,
}

/// One probe client through the proxy: a request every `every` (back to back when zero),
/// alternating GET and PUT, or only PUTs, until `stop`.
fn probe(
    proxy: String,
    every: Duration,
    writes_only: bool,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Vec<Sample>> {
    thread::spawn(move || {
        let http = client(Duration::from_secs(10));
        let lease = format!("{proxy}/apis/coordination.k8s.io/v1/namespaces/default/leases/probe");
        let ns = format!("{proxy}/api/v1/namespaces/default");
        let mut out = Vec::new();
        let mut i = 0u64;
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let write = writes_only || i % 2 == 1;
            i += 1;
            let sent = Instant::now();
            let res = if write {
                let body = serde_json::json!({
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": "probe", "namespace": "default"},
                    "spec": {"holderIdentity": format!("probe-{i}"), "leaseDurationSeconds": 10}
                });
                http.put(&lease)
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
            } else {
                http.get(&ns).send()
            };
            let ok = match res {
                Ok(r) => {
                    let good = r.status().is_success();
                    let _ = r.bytes();
                    good
                }
                Err(_) => false,
            };
            out.push(Sample {
                sent,
                lat: sent.elapsed(),
                write,
                ok,
            });
            if !every.is_zero() {
                next += every;
                let now = Instant::now();
                if next > now {
                    thread::sleep(next - now);
                } else {
                    next = now;
                }
            }
        }
        out
    })
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

fn lease_count(proxy: &str) -> Option<usize> {
    ballast_tests::http_timeout(
        "GET",
        &format!("{proxy}/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"),
        None,
        Duration::from_secs(30),
    )
    .ok()
    .and_then(|r| r.json()["items"].as_array().map(Vec::len))
}

fn store_revision(c: &Cluster, id: &str) -> Option<u64> {
    c.master_gauge(id, "ballast_master_store_revision")
}

struct Row {
    nodes: usize,
    registered: usize,
    register_secs: f64,
    probe: Option<(f64, f64, f64)>,
    probe_errors: usize,
    writes_per_sec: f64,
    active_cpu: f64,
    standby_cpu: f64,
    active_rss: f64,
    standby_rss: f64,
    proxy_cpu: f64,
    hollow_cpu: f64,
    to_active: Option<f64>,
    to_write: Option<f64>,
    after: Option<(f64, f64, f64)>,
    load: String,
    flaps: u64,
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn run_scale(block: u8, nodes: usize, lease: Duration) -> Row {
    let window = Duration::from_secs(env_or("BENCH_WINDOW_SECS", 40));
    let register_max = Duration::from_secs(env_or("BENCH_REGISTER_SECS", 150));
    let after = Duration::from_secs(env_or("BENCH_AFTER_SECS", 20));
    let tck = clk_tck();

    let mut c = Cluster::configure(ClusterOpts::new(block).proxy(true).workers(1), |cfg| {
        cfg.control.internal_kv = false;
        cfg.worker.lease_interval = lease;
        cfg.control.node_grace_period = Duration::from_secs(40);
    });
    for id in c.master_ids() {
        c.start_node(&id);
    }
    c.start_node("proxy");
    let (active, term) = c.wait_one_active(Duration::from_secs(60));
    let proxy = c.proxy_url();
    wait_until("the proxy routes", Duration::from_secs(30), || {
        let r = ballast_tests::http("GET", &format!("{proxy}/api/v1/namespaces/default"), None);
        r.ok().filter(|r| r.status == 200)
    });
    let created = ballast_tests::http(
        "POST",
        &format!("{proxy}/apis/coordination.k8s.io/v1/namespaces/default/leases"),
        Some(
            r#"{"apiVersion":"coordination.k8s.io/v1","kind":"Lease","metadata":{"name":"probe"},"spec":{"holderIdentity":"probe"}}"#,
        ),
    )
    .expect("create the probe lease");
    assert_eq!(created.status, 201, "probe lease: {}", created.body);
    println!(
        "\n== {nodes} hollow nodes, lease every {lease:?}, 3 masters (active {active}, term \
         {term}), proxy {proxy} =="
    );

    // 1. Registration.
    let mut cmd = c.node_command("w1", &["--hollow", &nodes.to_string()]);
    let t0 = Instant::now();
    let hollow = Tied(spawn_tied(&mut cmd).expect("spawn hollow worker"));
    let hollow_pid = hollow.0.id();
    let mut registered = 0;
    let mut last_print = Instant::now();
    while t0.elapsed() < register_max {
        thread::sleep(Duration::from_secs(2));
        registered = lease_count(&proxy).unwrap_or(registered);
        if registered >= nodes {
            break;
        }
        if last_print.elapsed() >= Duration::from_secs(15) {
            last_print = Instant::now();
            println!(
                "  t={:5.1} s: {registered} leases",
                t0.elapsed().as_secs_f64()
            );
        }
    }
    let register_secs = t0.elapsed().as_secs_f64();
    println!(
        "registration: {registered} of {nodes} nodes have a lease after {register_secs:.1} s{}",
        if registered < nodes {
            " (cut at BENCH_REGISTER_SECS)"
        } else {
            ""
        }
    );
    thread::sleep(lease);

    // 2. Steady-state window (the active may have changed since the start).
    let (active, _) = c.wait_one_active(Duration::from_secs(60));
    let pids: Vec<(String, u32)> = c
        .master_ids()
        .into_iter()
        .map(|id| {
            let pid = c.pid(&id).unwrap();
            (id, pid)
        })
        .collect();
    let proxy_pid = c.pid("proxy").unwrap();
    let cpu0: Vec<Option<u64>> = pids.iter().map(|(_, p)| cpu_ticks(*p)).collect();
    let proxy0 = cpu_ticks(proxy_pid);
    let hollow0 = cpu_ticks(hollow_pid);
    let rev0 = store_revision(&c, &active);
    let load = loadavg();
    let fo0 = proxy_failovers(&c);
    let stop = Arc::new(AtomicBool::new(false));
    let w_start = Instant::now();
    let h = probe(
        proxy.clone(),
        Duration::from_millis(50),
        false,
        stop.clone(),
    );
    let mut rss_max = vec![0.0f64; pids.len()];
    while w_start.elapsed() < window {
        for (i, (_, p)) in pids.iter().enumerate() {
            rss_max[i] = rss_max[i].max(rss_mb(*p).unwrap_or(0.0));
        }
        thread::sleep(Duration::from_secs(5).min(window.saturating_sub(w_start.elapsed())));
    }
    stop.store(true, Ordering::Relaxed);
    let samples = h.join().unwrap();
    let secs = w_start.elapsed().as_secs_f64();
    let rev1 = store_revision(&c, &active);
    let fo1 = proxy_failovers(&c);
    let cores = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => (b.saturating_sub(a)) as f64 / tck / secs,
        _ => f64::NAN,
    };
    let cpu: Vec<f64> = pids
        .iter()
        .zip(&cpu0)
        .map(|((_, p), a)| cores(*a, cpu_ticks(*p)))
        .collect();
    let proxy_cpu = cores(proxy0, cpu_ticks(proxy_pid));
    let hollow_cpu = cores(hollow0, cpu_ticks(hollow_pid));
    let writes_per_sec = match (rev0, rev1) {
        (Some(a), Some(b)) => b.saturating_sub(a) as f64 / secs,
        _ => f64::NAN,
    };
    let ok_lat = |f: &dyn Fn(&Sample) -> bool| -> Vec<Duration> {
        samples
            .iter()
            .filter(|s| s.ok && f(s))
            .map(|s| s.lat)
            .collect()
    };
    let errors = samples.iter().filter(|s| !s.ok).count();
    let all = ok_lat(&|_| true);
    println!("steady window {secs:.0} s (load avg at start {load}):");
    println!("  probe GET  {}", summary(&ok_lat(&|s| !s.write)));
    println!("  probe PUT  {}", summary(&ok_lat(&|s| s.write)));
    println!("  probe all  {}; {errors} errors", summary(&all));
    println!("  store writes: {writes_per_sec:.0}/s");
    println!(
        "  active-master changes seen by the proxy: {fo0} during registration, {} in the \
         window",
        fo1 - fo0
    );
    let ai = pids.iter().position(|(id, _)| *id == active).unwrap();
    for (i, (id, _)) in pids.iter().enumerate() {
        println!(
            "  {id}{}: cpu {:.2} cores, rss max {:.0} MB",
            if i == ai { " (active)" } else { "" },
            cpu[i],
            rss_max[i]
        );
    }
    println!(
        "  proxy cpu {proxy_cpu:.2} cores, rss {:.0} MB; hollow worker cpu {hollow_cpu:.2} \
         cores, rss {:.0} MB",
        rss_mb(proxy_pid).unwrap_or(0.0),
        rss_mb(hollow_pid).unwrap_or(0.0)
    );
    let standby: Vec<usize> = (0..pids.len()).filter(|i| *i != ai).collect();
    let standby_cpu = standby.iter().map(|i| cpu[*i]).fold(0.0, f64::max);
    let standby_rss = standby.iter().map(|i| rss_max[*i]).fold(0.0, f64::max);

    // 3. Failover under that load.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = probe(proxy.clone(), Duration::ZERO, true, stop.clone());
    thread::sleep(Duration::from_secs(2));
    let (active, _) = c.wait_one_active(Duration::from_secs(60));
    let others: Vec<String> = c
        .master_ids()
        .into_iter()
        .filter(|m| *m != active)
        .collect();
    let t_kill = Instant::now();
    c.kill(&active);
    let new_active = {
        let deadline = t_kill + Duration::from_secs(30);
        let mut found = None;
        while Instant::now() < deadline && found.is_none() {
            for m in &others {
                if ballast_tests::status_of(&format!("{}/active", c.master_url(m))) == 200 {
                    found = Some((m.clone(), t_kill.elapsed()));
                    break;
                }
            }
            if found.is_none() {
                thread::sleep(Duration::from_millis(5));
            }
        }
        found
    };
    // The writer goes on 3 s more (writes held by the proxy meanwhile complete then).
    thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    let first_ok = writes
        .iter()
        .filter(|s| s.ok && s.sent >= t_kill)
        .map(|s| s.sent + s.lat - t_kill)
        .min();
    let failed = writes
        .iter()
        .filter(|s| !s.ok && s.sent + s.lat >= t_kill)
        .count();
    match &new_active {
        Some((m, d)) => println!(
            "failover: kill -9 {active} -> {m} /active 200 after {:.0} ms",
            d.as_secs_f64() * 1e3
        ),
        None => println!("failover: no new active within 30 s"),
    }
    match first_ok {
        Some(d) => println!(
            "  kill -> first write through the proxy acknowledged after {:.0} ms ({failed} \
             writes failed meanwhile)",
            d.as_secs_f64() * 1e3
        ),
        None => println!("  no write acknowledged within the probe ({failed} failed)"),
    }
    // Latency while the nodes move to the new active.
    let stop = Arc::new(AtomicBool::new(false));
    let h = probe(
        proxy.clone(),
        Duration::from_millis(50),
        false,
        stop.clone(),
    );
    thread::sleep(after);
    stop.store(true, Ordering::Relaxed);
    let post = h.join().unwrap();
    let post_ok: Vec<Duration> = post.iter().filter(|s| s.ok).map(|s| s.lat).collect();
    println!(
        "  probe in the {after:?} after: {}; {} errors",
        summary(&post_ok),
        post.iter().filter(|s| !s.ok).count()
    );
    match lease_count(&proxy) {
        Some(n) => println!("  {n} leases after the failover"),
        None => println!("  listing the leases after the failover failed"),
    }
    drop(hollow);
    drop(c);
    Row {
        nodes,
        registered,
        register_secs,
        probe: pcts(&all),
        probe_errors: errors,
        writes_per_sec,
        active_cpu: cpu[ai],
        standby_cpu,
        active_rss: rss_max[ai],
        standby_rss,
        proxy_cpu,
        hollow_cpu,
        to_active: new_active.map(|(_, d)| d.as_secs_f64() * 1e3),
        to_write: first_ok.map(|d| d.as_secs_f64() * 1e3),
        after: pcts(&post_ok),
        load,
        flaps: fo1,
    }
}

fn main() {
    let counts: Vec<usize> = std::env::var("BENCH_NODES")
        .unwrap_or_else(|_| "1000,5000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let lease = Duration::from_secs(env_or("BENCH_LEASE_SECS", 10));
    println!(
        "bench-hollow: {counts:?} hollow nodes, lease interval {lease:?}; binary {}",
        ballast_bin().display()
    );
    let mut rows = Vec::new();
    for (k, n) in counts.iter().enumerate() {
        rows.push(run_scale(FIRST_BLOCK + k as u8, *n, lease));
    }
    let f = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.0}"));
    let p = |v: Option<(f64, f64, f64)>, i: usize| {
        v.map_or("-".to_string(), |t| format!("{:.1}", [t.0, t.1, t.2][i]))
    };
    println!(
        "\n| nodes | registered (s) | probe p50 / p99 / max ms | errors | store writes/s | \
         active cpu / rss | standby cpu / rss | proxy cpu | hollow cpu | kill->active ms | \
         kill->write ms | after p50 / p99 ms | load | unplanned failovers |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} ({:.0}) | {} / {} / {} | {} | {:.0} | {:.2} / {:.0} MB | {:.2} / {:.0} MB \
             | {:.2} | {:.2} | {} | {} | {} / {} | {} | {} |",
            r.nodes,
            r.registered,
            r.register_secs,
            p(r.probe, 0),
            p(r.probe, 1),
            p(r.probe, 2),
            r.probe_errors,
            r.writes_per_sec,
            r.active_cpu,
            r.active_rss,
            r.standby_cpu,
            r.standby_rss,
            r.proxy_cpu,
            r.hollow_cpu,
            f(r.to_active),
            f(r.to_write),
            p(r.after, 0),
            p(r.after, 1),
            r.load,
            r.flaps
        );
        let met = r.registered >= r.nodes && r.probe.is_some_and(|t| t.1 <= 200.0);
        println!(
            "goal ({} nodes, API p99 <= 200 ms): {}",
            r.nodes,
            if met { "met" } else { "NOT met" }
        );
    }
}
