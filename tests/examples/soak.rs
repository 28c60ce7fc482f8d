//! The long run (issue 14): `./task soak [--minutes M]` (default 30) on the release build.
//!
//! Starts three masters, a proxy and a worker with three pods in `127.60.0.0/16`, then for
//! the given time:
//! - 4 readers through the proxy (a pod list, a ConfigMap get) and 2 writers (ConfigMap
//!   updates on 20 keys), every call timed out after 5 s;
//! - a watch on ConfigMaps through the proxy, reopened from its last event when it ends;
//! - every 30 s a failover of the active master, in turn by SIGTERM (the planned handover),
//!   kill -9, and SIGSTOP for 3 s; a stopped or killed master starts again 3 s later with
//!   its data;
//! - every minute a line per process: resident memory (VmRSS) and open fds, beside the
//!   calls made and failed so far.
//!
//! Verdict (exit 1 otherwise): no read failed; no pod restarted; for each node, the most
//! memory and fds seen in the last third of the run are within 15 % + 8 MiB and 16 fds of
//! the most seen in the middle third (flat after warm-up; a master restarted by the
//! schedule starts low again, which the maximum over a third absorbs).

use std::collections::BTreeMap;
use std::io::BufRead;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ballast_tests::{http_timeout, pod_processes, sleep_pod, test_pki, Cluster, ClusterOpts};

const BLOCK: u8 = 60;
const READERS: usize = 4;
const WRITERS: usize = 2;
const KEYS: usize = 20;
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const FAILOVER_EVERY: Duration = Duration::from_secs(30);
const SAMPLE_EVERY: Duration = Duration::from_secs(60);
const DOWN_FOR: Duration = Duration::from_secs(3);
const RECOVERY: Duration = Duration::from_secs(60);
const NS: &str = "default";

fn minutes() -> u64 {
    let mut it = std::env::args().skip(1);
    let mut m = 30;
    while let Some(flag) = it.next() {
        match (flag.as_str(), it.next().and_then(|v| v.parse().ok())) {
            ("--minutes", Some(v)) if v >= 3 => m = v,
            _ => {
                eprintln!("usage: ./task soak [--minutes M] (M >= 3)");
                std::process::exit(2);
            }
        }
    }
    m
}

#[derive(Default)]
struct Counts {
    reads: AtomicU64,
    reads_failed: AtomicU64,
    writes: AtomicU64,
    writes_failed: AtomicU64,
    watch_events: AtomicU64,
    watch_reopened: AtomicU64,
}

/// What the run saw go wrong, printed as it happens and counted for the verdict.
fn failed(counter: &AtomicU64, what: &str) {
    let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
    if n <= 20 {
        println!("  ! {what}");
    }
}

fn read_loop(proxy: &str, i: usize, stop: &AtomicBool, n: &Counts) {
    let urls = [
        format!("{proxy}/api/v1/namespaces/{NS}/pods"),
        format!("{proxy}/api/v1/namespaces/{NS}/configmaps/soak-{i}"),
    ];
    let mut k = 0;
    while !stop.load(Ordering::Relaxed) {
        let url = &urls[k % urls.len()];
        k += 1;
        n.reads.fetch_add(1, Ordering::Relaxed);
        match http_timeout("GET", url, None, CALL_TIMEOUT) {
            Ok(r) if r.status == 200 => {}
            Ok(r) => failed(
                &n.reads_failed,
                &format!("read {url}: {} {}", r.status, r.body),
            ),
            Err(e) => failed(&n.reads_failed, &format!("read {url}: {e}")),
        }
        thread::sleep(Duration::from_millis(5));
    }
}

fn write_loop(proxy: &str, w: usize, stop: &AtomicBool, n: &Counts) {
    let mut v = 0u64;
    while !stop.load(Ordering::Relaxed) {
        v += 1;
        let key = format!("soak-{}", (v as usize * WRITERS + w) % KEYS);
        let url = format!("{proxy}/api/v1/namespaces/{NS}/configmaps/{key}");
        let body = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": key, "namespace": NS}, "data": {"v": format!("{w}-{v}")}});
        n.writes.fetch_add(1, Ordering::Relaxed);
        match http_timeout("PUT", &url, Some(&body.to_string()), CALL_TIMEOUT) {
            Ok(r) if r.status == 200 || r.status == 201 => {}
            Ok(r) => failed(
                &n.writes_failed,
                &format!("write {key}: {} {}", r.status, r.body),
            ),
            Err(e) => failed(&n.writes_failed, &format!("write {key}: {e}")),
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn watch_loop(proxy: &str, stop: &AtomicBool, n: &Counts) {
    let http = test_pki()
        .admin_builder()
        .timeout(None)
        .build()
        .expect("watch client");
    let mut rv = String::new();
    while !stop.load(Ordering::Relaxed) {
        let url = format!(
            "{proxy}/api/v1/namespaces/{NS}/configmaps?watch=1&timeoutSeconds=120&resourceVersion={rv}"
        );
        if let Ok(r) = http.get(&url).send() {
            if r.status() == 200 {
                for line in std::io::BufReader::new(r).lines() {
                    let Ok(line) = line else { break };
                    let Ok(e) = serde_json::from_str::<serde_json::Value>(&line) else {
                        continue;
                    };
                    if let Some(at) = e["object"]["metadata"]["resourceVersion"].as_str() {
                        rv = at.to_string();
                    }
                    n.watch_events.fetch_add(1, Ordering::Relaxed);
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                }
            } else if r.status() == 410 {
                rv.clear();
            }
        }
        n.watch_reopened.fetch_add(1, Ordering::Relaxed);
        thread::sleep(Duration::from_millis(100));
    }
}

/// Resident memory (KiB) and open fds of a process, from `/proc`.
fn usage(pid: u32) -> Option<(u64, usize)> {
    let rss = ballast_tests::bench::rss_kib(pid)?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((rss, fds))
}

/// The failover kinds the schedule cycles through.
#[derive(Clone, Copy, Debug)]
enum Failover {
    Terminate,
    Kill,
    Pause,
}

fn failover(c: &mut Cluster, kind: Failover) -> String {
    let (active, term) = c.wait_one_active(RECOVERY);
    match kind {
        Failover::Terminate => {
            c.terminate(&active, Duration::from_secs(10));
        }
        Failover::Kill => c.kill(&active),
        Failover::Pause => c.pause(&active),
    }
    let (next, _) = ballast_tests::wait_until("another active", RECOVERY, || {
        let a = c.active_masters();
        (a.len() == 1 && a[0].0 != active && a[0].1 > term).then(|| a[0].clone())
    });
    thread::sleep(DOWN_FOR);
    match kind {
        Failover::Pause => c.resume(&active),
        _ => c.start_node(&active),
    }
    format!("{kind:?} {active} (term {term}) -> {next}")
}

fn main() {
    let minutes = minutes();
    let run = Duration::from_secs(minutes * 60);
    println!(
        "soak: {minutes} min, a failover every {} s, a sample every {} s",
        FAILOVER_EVERY.as_secs(),
        SAMPLE_EVERY.as_secs()
    );
    let mut c = Cluster::start(
        ClusterOpts::new(BLOCK).masters(3).workers(1).proxy(true),
        |_| {},
    );
    c.wait_one_active(RECOVERY);
    let proxy = c.proxy_url();
    let create = |plural: &str, body: serde_json::Value| {
        let url = format!("{proxy}/api/v1/namespaces/{NS}/{plural}");
        let r = http_timeout("POST", &url, Some(&body.to_string()), CALL_TIMEOUT)
            .unwrap_or_else(|e| panic!("create in {plural}: {e}"));
        assert_eq!(r.status, 201, "create in {plural}: {}", r.body);
    };
    for i in 0..3 {
        create("pods", sleep_pod(&format!("soak-pod-{i}"), NS, "w1", 6060));
    }
    for k in 0..KEYS {
        create(
            "configmaps",
            serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": format!("soak-{k}"), "namespace": NS}, "data": {"v": "0"}}),
        );
    }
    let pods = ballast_tests::wait_until("the pods running", RECOVERY, || {
        let p = pod_processes(c.dir());
        (p.len() == 3).then_some(p)
    });

    let n = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let ids = c.node_ids();
    // (minute, id) -> (pid, rss KiB, fds)
    let mut samples: BTreeMap<(u64, String), (u32, u64, usize)> = BTreeMap::new();
    let started = Instant::now();
    thread::scope(|s| {
        for i in 0..READERS {
            let (proxy, stop, n) = (&proxy, &*stop, &*n);
            s.spawn(move || read_loop(proxy, i % KEYS, stop, n));
        }
        for w in 0..WRITERS {
            let (proxy, stop, n) = (&proxy, &*stop, &*n);
            s.spawn(move || write_loop(proxy, w, stop, n));
        }
        // Detached: a quiet watch blocks in its read until its timeout, and the run
        // should not wait for it.
        thread::spawn({
            let (proxy, stop, n) = (proxy.clone(), stop.clone(), n.clone());
            move || watch_loop(&proxy, &stop, &n)
        });

        let kinds = [Failover::Terminate, Failover::Kill, Failover::Pause];
        let mut next_failover = started + FAILOVER_EVERY;
        let mut next_sample = started;
        let mut minute = 0;
        let mut done = 0;
        println!(
            "{:>4} {}  {:>9} {:>6} {:>8} {:>6} {:>7}",
            "min",
            ids.iter()
                .map(|id| format!("{:>16}", format!("{id} MiB/fds")))
                .collect::<String>(),
            "reads",
            "failed",
            "writes",
            "failed",
            "events"
        );
        while started.elapsed() < run {
            let now = Instant::now();
            if now >= next_sample {
                let mut line = format!("{minute:>4} ");
                for id in &ids {
                    let cell = c.pid(id).and_then(|pid| usage(pid).map(|u| (pid, u)));
                    match cell {
                        Some((pid, (rss, fds))) => {
                            samples.insert((minute, id.clone()), (pid, rss, fds));
                            line += &format!("{:>16}", format!("{:.1}/{fds}", rss as f64 / 1024.0));
                        }
                        None => line += &format!("{:>16}", "down"),
                    }
                }
                line += &format!(
                    "  {:>9} {:>6} {:>8} {:>6} {:>7}",
                    n.reads.load(Ordering::Relaxed),
                    n.reads_failed.load(Ordering::Relaxed),
                    n.writes.load(Ordering::Relaxed),
                    n.writes_failed.load(Ordering::Relaxed),
                    n.watch_events.load(Ordering::Relaxed)
                );
                println!("{line}");
                minute += 1;
                next_sample += SAMPLE_EVERY;
            }
            if now >= next_failover {
                let what = failover(&mut c, kinds[done % kinds.len()]);
                done += 1;
                println!(
                    "  {:>6.1} s  failover {done}: {what}",
                    started.elapsed().as_secs_f64()
                );
                next_failover += FAILOVER_EVERY;
            }
            thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::Relaxed);
        println!("{done} failovers");
    });

    // Verdict.
    let mut bad = Vec::new();
    let reads_failed = n.reads_failed.load(Ordering::Relaxed);
    if reads_failed > 0 {
        bad.push(format!("{reads_failed} reads failed"));
    }
    let now_pods = pod_processes(c.dir());
    if now_pods != pods {
        bad.push(format!("pods changed: {pods:?} -> {now_pods:?}"));
    }
    let third = minutes / 3;
    for id in &ids {
        let peak = |from: u64, to: u64| {
            samples
                .range((from, id.clone())..(to, String::new()))
                .filter(|((_, i), _)| i == id)
                .fold((0u64, 0usize), |(r, f), (_, (_, rss, fds))| {
                    (r.max(*rss), f.max(*fds))
                })
        };
        let (mid_rss, mid_fds) = peak(third, 2 * third);
        let (end_rss, end_fds) = peak(2 * third, minutes + 1);
        let restarts = {
            let mut pids: Vec<u32> = samples
                .iter()
                .filter(|((_, i), _)| i == id)
                .map(|(_, (pid, _, _))| *pid)
                .collect();
            pids.dedup();
            pids.len() - 1
        };
        println!(
            "{id}: peak {:.1} MiB / {mid_fds} fds in the middle third, {:.1} MiB / {end_fds} fds in the last ({restarts} restarts seen)",
            mid_rss as f64 / 1024.0,
            end_rss as f64 / 1024.0
        );
        if end_rss as f64 > mid_rss as f64 * 1.15 + 8.0 * 1024.0 {
            bad.push(format!(
                "{id}: memory grew from {mid_rss} KiB to {end_rss} KiB"
            ));
        }
        if end_fds > mid_fds + 16 {
            bad.push(format!("{id}: fds grew from {mid_fds} to {end_fds}"));
        }
    }
    println!(
        "calls: {} reads ({reads_failed} failed), {} writes ({} failed), {} watch events, watch reopened {} times",
        n.reads.load(Ordering::Relaxed),
        n.writes.load(Ordering::Relaxed),
        n.writes_failed.load(Ordering::Relaxed),
        n.watch_events.load(Ordering::Relaxed),
        n.watch_reopened.load(Ordering::Relaxed)
    );
    if bad.is_empty() {
        println!("soak: flat, 0 failed reads");
    } else {
        for b in &bad {
            println!("soak: FAILED: {b}");
        }
        let dir = c.keep_dir();
        println!("soak: cluster directory kept at {}", dir.display());
        std::process::exit(1);
    }
}
