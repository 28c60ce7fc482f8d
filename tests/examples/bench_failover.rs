//! Master failover benchmark (issue 3): `./task bench-failover`.
//!
//! Starts 3 real masters (no proxy) in `127.70.0.0/16`, runs a closed-loop write load
//! (`BENCH_WRITERS` threads, default 8, each with its own keep-alive connection) of
//! `PUT /internal/kv/bench/{writer}/{n}` against the active master, and kills the active
//! master with SIGKILL `BENCH_KILLS` times (default 20). After each kill it restarts the killed
//! master, waits until it has rejoined (names the new active and has caught up to its store
//! revision) and lets the load run `BENCH_SETTLE_MS` (default 2000) with all 3 masters up.
//!
//! A writer sends to the master it believes active; a 503 names the leader (followed when it
//! differs), any other failure moves it to the next master, 5 ms later. So a writer is a
//! "smart client" that needs no proxy.
//!
//! Prints, per kill and as min / p50 / p99 / max (nearest rank):
//! - kill → a surviving master answers `GET /active` 200 (each polled every ~2 ms);
//! - kill → the first write acknowledged (200) by a master other than the killed one;
//! - restart → rejoined;
//!
//! and the write throughput: acknowledged writes/s with all 3 masters up (the settle windows)
//! and over the whole run (failovers included).
//!
//! `BENCH_SIGNAL=term` stops the active with SIGTERM instead (a planned stop: it hands
//! the leadership over first) and waits for it to exit before the restart.
//!
//! Run with a release build: `BALLAST_BIN=$CARGO_TARGET_DIR/release/ballast`.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ballast_tests::bench::{client, env_or, rank, sorted_millis};
use ballast_tests::{wait_until, Cluster, ClusterOpts};
use nix::sys::signal::Signal;

const BLOCK: u8 = 70;
const LONG: Duration = Duration::from_secs(30);

/// min / p50 / p99 / max by nearest rank, in milliseconds.
fn summary(samples: &[Duration]) -> String {
    if samples.is_empty() {
        return "no samples".into();
    }
    let v = sorted_millis(samples);
    let rank = |p: f64| rank(&v, p);
    format!(
        "min {:7.1}  p50 {:7.1}  p99 {:7.1}  max {:7.1}  ms  (n={})",
        v[0],
        rank(0.50),
        rank(0.99),
        v[v.len() - 1],
        v.len()
    )
}

/// One acknowledged write: when the answer arrived and which master (index) sent it.
#[derive(Clone, Copy)]
struct Ack {
    at: Instant,
    by: usize,
}

struct Load {
    stop: AtomicBool,
    /// Index of the master the writers currently send to.
    target: AtomicUsize,
    acks: Mutex<Vec<Ack>>,
    /// Acknowledged writes per master, for waiting without locking `acks`.
    acked_by: Vec<AtomicU64>,
    failed: AtomicU64,
}

fn writer(load: Arc<Load>, urls: Arc<Vec<String>>, ids: Arc<Vec<String>>, w: usize) {
    let http = client(Duration::from_secs(5));
    let value = "x".repeat(64);
    let mut n = 0u64;
    while !load.stop.load(Ordering::Relaxed) {
        let t = load.target.load(Ordering::Relaxed);
        let url = format!("{}/internal/kv/bench/{w}/{n}", urls[t]);
        let res = http.put(&url).body(value.clone()).send();
        let moved = match res {
            Ok(r) if r.status().as_u16() == 200 => {
                let _ = r.bytes();
                let at = Instant::now();
                load.acks.lock().unwrap().push(Ack { at, by: t });
                load.acked_by[t].fetch_add(1, Ordering::Relaxed);
                n += 1;
                continue;
            }
            Ok(r) => {
                let body = r.text().unwrap_or_default();
                let leader = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["leader"].as_str().map(str::to_string))
                    .and_then(|l| ids.iter().position(|i| *i == l));
                match leader {
                    Some(l) if l != t => load
                        .target
                        .compare_exchange(t, l, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok(),
                    _ => false,
                }
            }
            Err(_) => false,
        };
        load.failed.fetch_add(1, Ordering::Relaxed);
        if !moved {
            let _ = load.target.compare_exchange(
                t,
                (t + 1) % urls.len(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            thread::sleep(Duration::from_millis(5));
        }
    }
}

/// `ballast_master_store_revision` of one master.
fn revision(http: &reqwest::blocking::Client, base: &str) -> Option<u64> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .ok()?
        .text()
        .ok()?;
    // `ballast_master_store_revision{master="m1"} 123`
    text.lines()
        .filter(|l| l.starts_with("ballast_master_store_revision"))
        .find_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .map(|v| v as u64)
}

/// `GET /active` of one master: `(status, body)`.
fn active_of(http: &reqwest::blocking::Client, base: &str) -> Option<(u16, serde_json::Value)> {
    let r = http.get(format!("{base}/active")).send().ok()?;
    let status = r.status().as_u16();
    Some((status, r.json().ok()?))
}

/// Poll `/active` of every master but `skip`, each from its own thread every ~2 ms, until
/// one answers 200: its id, its term and when the answer arrived.
fn first_active(ids: &[String], urls: &[String], skip: usize) -> (String, u64, Instant) {
    let found: Mutex<Option<(String, u64, Instant)>> = Mutex::new(None);
    let deadline = Instant::now() + LONG;
    thread::scope(|s| {
        for (i, u) in urls.iter().enumerate().filter(|(i, _)| *i != skip) {
            let found = &found;
            s.spawn(move || {
                let http = client(Duration::from_millis(300));
                while found.lock().unwrap().is_none() && Instant::now() < deadline {
                    if let Some((200, v)) = active_of(&http, u) {
                        let at = Instant::now();
                        let term = v["term"].as_u64().unwrap_or(0);
                        let mut f = found.lock().unwrap();
                        if f.is_none() {
                            *f = Some((ids[i].clone(), term, at));
                        }
                        return;
                    }
                    thread::sleep(Duration::from_millis(2));
                }
            });
        }
    });
    found
        .into_inner()
        .unwrap()
        .expect("a new active master within 30 s")
}

struct Cycle {
    killed: String,
    new_active: String,
    to_active: Duration,
    to_write: Duration,
    /// The longest gap between two acknowledged writes around the kill.
    stall: Duration,
    to_rejoin: Duration,
}

fn main() {
    let kills: usize = env_or("BENCH_KILLS", 20);
    // BENCH_SIGNAL=term: a planned stop (SIGTERM, the handover) instead of SIGKILL
    let planned = env_or("BENCH_SIGNAL", "kill".to_string()) == "term";
    let writers: usize = env_or("BENCH_WRITERS", 8);
    let settle = Duration::from_millis(env_or("BENCH_SETTLE_MS", 2000));
    println!(
        "bench-failover: 3 masters in 127.{BLOCK}.0.0/16, {writers} writers, {kills} kills, \
         settle {settle:?}, binary {}",
        ballast_tests::ballast_bin().display()
    );

    let mut c = Cluster::start(ClusterOpts::new(BLOCK), |_| {});
    let ids: Arc<Vec<String>> = Arc::new(c.master_ids());
    let urls: Arc<Vec<String>> = Arc::new(ids.iter().map(|i| c.master_url(i)).collect());
    let (first, _) = c.wait_one_active(LONG);
    let idx = |id: &str| ids.iter().position(|i| i == id).unwrap();

    let load = Arc::new(Load {
        stop: AtomicBool::new(false),
        target: AtomicUsize::new(idx(&first)),
        acks: Mutex::new(Vec::new()),
        acked_by: ids.iter().map(|_| AtomicU64::new(0)).collect(),
        failed: AtomicU64::new(0),
    });
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let (load, urls, ids) = (load.clone(), urls.clone(), ids.clone());
            thread::spawn(move || writer(load, urls, ids, w))
        })
        .collect();
    let load_start = Instant::now();
    // Warm up, then a first steady window.
    thread::sleep(Duration::from_secs(1));
    let mut steady = vec![(Instant::now(), Instant::now() + settle)];
    thread::sleep(settle);

    let poll = client(Duration::from_millis(300));
    let mut cycles = Vec::new();
    for k in 0..kills {
        let (active, old_term) = c.wait_one_active(LONG);
        let a = idx(&active);
        let acked_before: Vec<u64> = load
            .acked_by
            .iter()
            .map(|x| x.load(Ordering::Relaxed))
            .collect();
        let kill_at = Instant::now();
        if planned {
            c.signal(&active, Signal::SIGTERM);
        } else {
            c.kill(&active);
        }
        // kill -> a surviving master reports active: one poller per survivor, every ~2 ms
        let (new_active, new_term, active_at) = first_active(&ids, &urls, a);
        // kill -> first write acknowledged by another master (exact time from the ack log)
        wait_until("a write acknowledged after the kill", LONG, || {
            (0..ids.len())
                .any(|i| i != a && load.acked_by[i].load(Ordering::Relaxed) > acked_before[i])
                .then_some(())
        });
        let write_at = {
            let acks = load.acks.lock().unwrap();
            acks.iter()
                .rev()
                .take_while(|x| x.at > kill_at)
                .filter(|x| x.by != a)
                .map(|x| x.at)
                .min()
                .expect("an ack after the kill")
        };
        // the longest gap between two acknowledged writes from the last one before the
        // kill to the first one after it at another master
        let stall = {
            let acks = load.acks.lock().unwrap();
            let mut times: Vec<Instant> = acks
                .iter()
                .map(|x| x.at)
                .filter(|t| *t + Duration::from_secs(2) > kill_at && *t <= write_at)
                .collect();
            times.sort();
            let first = times.iter().rposition(|t| *t <= kill_at).unwrap_or(0);
            times[first..]
                .windows(2)
                .map(|w| w[1] - w[0])
                .max()
                .unwrap_or_default()
        };
        if planned {
            wait_until(&format!("{active} stops after SIGTERM"), LONG, || {
                (!c.is_running(&active)).then_some(())
            });
        }
        // restart the killed master and wait until it has rejoined and caught up
        let restart_at = Instant::now();
        c.start_node(&active);
        let new_url = &urls[idx(&new_active)];
        wait_until(&format!("{active} rejoins"), LONG, || {
            let (_, v) = active_of(&poll, &urls[a])?;
            (v["leader"].as_str() == Some(new_active.as_str())).then_some(())
        });
        let target_rev = wait_until("active revision", LONG, || revision(&poll, new_url));
        wait_until(&format!("{active} catches up"), LONG, || {
            (revision(&poll, &urls[a])? >= target_rev).then_some(())
        });
        let rejoined_at = Instant::now();
        let cy = Cycle {
            killed: active.clone(),
            new_active: new_active.clone(),
            to_active: active_at - kill_at,
            to_write: write_at - kill_at,
            stall,
            to_rejoin: rejoined_at - restart_at,
        };
        println!(
            "kill {:2}: {} killed (term {old_term}), {} active (term {new_term}) after {:6.1} ms, \
             first write ack after {:6.1} ms, longest stall {:6.1} ms, {} rejoined {:6.1} ms after restart",
            k + 1,
            cy.killed,
            cy.new_active,
            cy.to_active.as_secs_f64() * 1e3,
            cy.to_write.as_secs_f64() * 1e3,
            cy.stall.as_secs_f64() * 1e3,
            cy.killed,
            cy.to_rejoin.as_secs_f64() * 1e3,
        );
        cycles.push(cy);
        let from = Instant::now();
        thread::sleep(settle);
        steady.push((from, Instant::now()));
    }
    load.stop.store(true, Ordering::Relaxed);
    let load_end = Instant::now();
    for h in handles {
        h.join().unwrap();
    }

    let acks = load.acks.lock().unwrap();
    let total = acks.len();
    let in_steady = |at: Instant| steady.iter().any(|(a, b)| at >= *a && at < *b);
    let steady_acks = acks.iter().filter(|x| in_steady(x.at)).count();
    let steady_secs: f64 = steady.iter().map(|(a, b)| (*b - *a).as_secs_f64()).sum();
    let run_secs = (load_end - load_start).as_secs_f64();
    let col = |f: fn(&Cycle) -> Duration| cycles.iter().map(f).collect::<Vec<_>>();

    println!();
    println!(
        "== master failover, {} {} of the active ==",
        cycles.len(),
        if planned {
            "SIGTERMs (planned handover)"
        } else {
            "SIGKILLs"
        }
    );
    println!(
        "kill -> new /active 200       {}",
        summary(&col(|c| c.to_active))
    );
    println!(
        "kill -> first write acked     {}",
        summary(&col(|c| c.to_write))
    );
    println!(
        "longest stall between acks    {}",
        summary(&col(|c| c.stall))
    );
    println!(
        "restart -> rejoined (caught up) {}",
        summary(&col(|c| c.to_rejoin))
    );
    println!(
        "write throughput, 3 masters up: {:.0} acked writes/s ({steady_acks} in {steady_secs:.1} s, \
         {writers} writers)",
        steady_acks as f64 / steady_secs
    );
    println!(
        "write throughput, whole run:    {:.0} acked writes/s ({total} in {run_secs:.1} s, \
         failovers included); {} failed/redirected attempts",
        total as f64 / run_secs,
        load.failed.load(Ordering::Relaxed)
    );
    let p99_ok = |v: Vec<Duration>| {
        let mut v = v;
        v.sort();
        v.get(((0.99 * v.len() as f64).ceil() as usize).saturating_sub(1))
            .is_some_and(|d| *d <= Duration::from_secs(1))
    };
    println!(
        "goal p99 <= 1 s: /active {}, first write {}",
        if p99_ok(col(|c| c.to_active)) {
            "met"
        } else {
            "NOT met"
        },
        if p99_ok(col(|c| c.to_write)) {
            "met"
        } else {
            "NOT met"
        },
    );
}
