//! Proxy benchmarks: `./task bench-proxy`.
//!
//! One cluster (3 real masters + `ballast proxy`, in `127.71.0.0/16`, TLS everywhere) and, in
//! front of the same masters, HAProxy 2.6 terminating TLS with the ballast proxy's own
//! certificate and re-encrypting to the masters with it (`verify required` against the
//! cluster CA; client certificates verified and passed on as `X-Remote-User` /
//! `X-Remote-Group`, as the ballast proxy does): frontends with default checks
//! (`inter 2s fall 3 rise 2`, `127.71.0.2:8080`), tuned checks (`inter 100ms fall 1 rise 1`,
//! `:8081`), tuned + retries (`:8082`), all `option httpchk GET /readyz` over TLS; and a
//! `mode tcp` frontend (`:8443`, tuned checks) beside a second ballast proxy in L4 mode
//! (`proxy.mode = "tcp"`, `127.71.0.5:6443`). The HAProxy config is written to
//! `<cluster dir>/haproxy/haproxy.cfg`.
//!
//! Part A, throughput (`BENCH_PARTS` contains `a`): every proxy is pinned to core 0 and wrk
//! to core 1 (`taskset`), the masters float. `wrk $BENCH_WRK_ARGS` (default
//! `-t1 -c50 -d10s --latency`) against `/readyz` (a public path) of the active master
//! directly, through ballast and through HAProxy (keep-alive, TLS terminated); then with
//! `Connection: close` (a new TLS connection per request) through both; then through the L4
//! ballast and HAProxy `mode tcp`. `BENCH_ROUNDS` rounds (default 3) interleaved; prints
//! req/s and p50/p99 per run, the median over rounds, the ballast/HAProxy ratios, and each
//! path's CPU time per request (its processes' user + system time from `/proc`).
//!
//! Part B, failover seen by clients (`BENCH_PARTS` contains `b`): four client loops run at
//! once, each `GET /api/v1/namespaces` (as `admin`, a client certificate) every 10 ms on its
//! own keep-alive connection, through ballast, HAProxy-default, HAProxy-tuned and
//! HAProxy-tuned-retry (`option redispatch 1`, `retries 20`, `retry-on
//! all-retryable-errors`), while the active master is killed with SIGKILL `BENCH_KILLS` times
//! (default 20; the killed master is restarted and rejoins each time). Per kill and front:
//! the longest client-visible stall (a request's start → the first 200 answer to it or to a
//! later request), the longest single request, and the failed requests (non-200 or
//! transport error).
//!
//! Run with a release build: `BALLAST_BIN=$CARGO_TARGET_DIR/release/ballast`.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ballast_tests::bench::{client, env_or, min_p50_p99_max, rank};
use ballast_tests::{spawn_tied, test_pki, wait_until, Cluster, ClusterOpts};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BLOCK: u8 = 71;
const LONG: Duration = Duration::from_secs(30);
const HAPROXY_DEFAULT: &str = "127.71.0.2:8080";
const HAPROXY_TUNED: &str = "127.71.0.2:8081";
const HAPROXY_RETRY: &str = "127.71.0.2:8082";
const HAPROXY_TCP: &str = "127.71.0.2:8443";
/// The second ballast proxy, in L4 mode.
const BALLAST_L4: &str = "127.71.0.5:6443";

/// min / p50 / p99 / max by nearest rank, in milliseconds.
fn summary(samples: &[f64]) -> String {
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    min_p50_p99_max(&v)
}

/// A helper process (haproxy, nginx) stopped with SIGTERM (then SIGKILL) on drop.
struct Helper {
    name: &'static str,
    child: Child,
}

impl Helper {
    fn start(name: &'static str, cmd: &mut Command, log: &Path) -> Self {
        let out = fs::File::create(log).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let child = spawn_tied(cmd).unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self { name, child }
    }

    fn check_running(&mut self, log: &Path) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!(
                "{} exited ({st}): {}",
                self.name,
                fs::read_to_string(log).unwrap_or_default()
            );
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// HAProxy as the ballast proxy is: TLS with the proxy's certificate (`proxy.pem`: chain
/// and key), client certificates verified and forwarded as the request-header identity,
/// TLS with the same certificate to the masters.
fn haproxy_config(c: &Cluster, pem: &Path) -> String {
    let ca = test_pki().ca();
    let (ca, pem) = (ca.display(), pem.display());
    let mut s = String::from(
        "global\n    maxconn 4096\n\n\
         defaults\n    mode http\n    timeout connect 2s\n    timeout client 60s\n    \
         timeout server 60s\n    timeout http-keep-alive 60s\n\n",
    );
    for (name, bind, checks, extra) in [
        ("default", HAPROXY_DEFAULT, "inter 2s fall 3 rise 2", ""),
        ("tuned", HAPROXY_TUNED, "inter 100ms fall 1 rise 1", ""),
        (
            "retry",
            HAPROXY_RETRY,
            "inter 100ms fall 1 rise 1",
            "    option redispatch 1\n    retries 20\n    retry-on all-retryable-errors\n",
        ),
    ] {
        let _ = write!(
            s,
            "frontend fe_{name}\n    bind {bind} ssl crt {pem} ca-file {ca} verify optional\n    \
             http-request del-header X-Remote-User\n    http-request del-header X-Remote-Group\n    \
             http-request set-header X-Remote-User %[ssl_c_s_dn(CN)] if {{ ssl_c_used }}\n    \
             http-request set-header X-Remote-Group %[ssl_c_s_dn(O)] if {{ ssl_c_used }}\n    \
             default_backend be_{name}\n\n\
             backend be_{name}\n    option httpchk GET /readyz\n    \
             http-check expect status 200\n    \
             default-server {checks} ssl verify required ca-file {ca} crt {pem} check-ssl\n{extra}"
        );
        for id in c.master_ids() {
            let _ = writeln!(s, "    server {id} {} check", c.master_api(&id));
        }
        s.push('\n');
    }
    let _ = write!(
        s,
        "frontend fe_tcp\n    mode tcp\n    bind {HAPROXY_TCP}\n    default_backend be_tcp\n\n\
         backend be_tcp\n    mode tcp\n    option httpchk GET /readyz\n    \
         http-check expect status 200\n    \
         default-server inter 100ms fall 1 rise 1 check-ssl verify required ca-file {ca} crt {pem}\n"
    );
    for id in c.master_ids() {
        let _ = writeln!(s, "    server {id} {} check", c.master_api(&id));
    }
    s
}

/// Pin every thread of `pid` to `cpu`.
fn pin(pid: u32, cpu: u32) {
    let out = Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .output()
        .expect("taskset (util-linux)");
    assert!(
        out.status.success(),
        "taskset: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The master the ballast proxy routes to now.
fn proxy_active(c: &Cluster) -> Option<String> {
    let r = ballast_tests::http_timeout(
        "GET",
        &format!("http://{}/status", c.proxy_admin()),
        None,
        Duration::from_secs(2),
    )
    .ok()?;
    let v: serde_json::Value = serde_json::from_str(&r.body).ok()?;
    v["active"].as_str().map(str::to_string)
}

/// `n` consecutive 200s for `url` (from a client verifying the server's certificate
/// against `name` when given, else against the address dialed).
fn wait_streak(url: &str, n: usize) {
    wait_streak_with(url, n, client(Duration::from_secs(2)));
}

fn wait_streak_with(url: &str, n: usize, http: reqwest::blocking::Client) {
    let mut streak = 0;
    wait_until(&format!("{n} consecutive 200s from {url}"), LONG, || {
        let ok = http
            .get(url)
            .send()
            .map(|r| r.status().as_u16() == 200)
            .unwrap_or(false);
        streak = if ok { streak + 1 } else { 0 };
        if !ok {
            thread::sleep(Duration::from_millis(50));
        }
        (streak >= n).then_some(())
    });
}

// ---------------------------------------------------------------------------------------
// Part A: wrk

#[derive(Debug, Clone, Default)]
struct Wrk {
    rps: f64,
    requests: u64,
    p50_ms: f64,
    p99_ms: f64,
    non2xx: u64,
    errors: String,
}

fn parse_duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    for (suffix, scale) in [("us", 1e-3), ("ms", 1.0), ("m", 60e3), ("s", 1e3)] {
        if let Some(n) = s.strip_suffix(suffix) {
            return n.parse::<f64>().ok().map(|v| v * scale);
        }
    }
    None
}

fn parse_wrk(out: &str) -> Wrk {
    let mut w = Wrk::default();
    for line in out.lines() {
        let t = line.trim();
        if t.contains(" requests in ") {
            w.requests = t
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        } else if let Some(v) = t.strip_prefix("Requests/sec:") {
            w.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("50%") {
            w.p50_ms = parse_duration_ms(v).unwrap_or(f64::NAN);
        } else if let Some(v) = t.strip_prefix("99%") {
            w.p99_ms = parse_duration_ms(v).unwrap_or(f64::NAN);
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            w.non2xx = v.trim().parse().unwrap_or(0);
        } else if t.starts_with("Socket errors:") {
            w.errors = t.to_string();
        }
    }
    w
}

fn run_wrk(args: &[String], url: &str) -> Wrk {
    // wrk on core 1, every proxy on core 0 (see `pin`)
    let out = Command::new("taskset")
        .args(["-c", "1", "wrk"])
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .expect("run wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wrk failed: {text}");
    parse_wrk(&text)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// User + system CPU seconds used so far by `pid` and its child processes. `/proc`
/// counts in USER_HZ, 100 per second on Linux.
fn cpu_seconds(pid: u32) -> f64 {
    let own = fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // fields after the parenthesised command name; utime and stime are 14 and 15
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .unwrap_or(0.0)
        / 100.0;
    let children: f64 = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|c| c.parse::<u32>().ok())
        .map(cpu_seconds)
        .sum();
    own + children
}

/// One wrk target of part A: a name, a URL, the process to count CPU of, extra wrk args.
struct Target {
    name: &'static str,
    url: String,
    pid: u32,
    extra: &'static [&'static str],
}

fn part_a(c: &Cluster, active: &str, haproxy: u32, l4: u32) {
    let args: Vec<String> = std::env::var("BENCH_WRK_ARGS")
        .unwrap_or_else(|_| "-t1 -c50 -d10s --latency".into())
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let proxy = c.pid("proxy").unwrap_or(0);
    let close: &[&str] = &["-H", "Connection: close"];
    let targets = [
        Target {
            name: "direct",
            url: format!("{}/readyz", c.master_url(active)),
            pid: c.pid(active).unwrap_or(0),
            extra: &[],
        },
        Target {
            name: "ballast",
            url: format!("{}/readyz", c.proxy_url()),
            pid: proxy,
            extra: &[],
        },
        Target {
            name: "haproxy",
            url: format!("https://{HAPROXY_DEFAULT}/readyz"),
            pid: haproxy,
            extra: &[],
        },
        Target {
            name: "ballast-newconn",
            url: format!("{}/readyz", c.proxy_url()),
            pid: proxy,
            extra: close,
        },
        Target {
            name: "haproxy-newconn",
            url: format!("https://{HAPROXY_DEFAULT}/readyz"),
            pid: haproxy,
            extra: close,
        },
        Target {
            name: "ballast-l4",
            url: format!("https://{BALLAST_L4}/readyz"),
            pid: l4,
            extra: &[],
        },
        Target {
            name: "haproxy-tcp",
            url: format!("https://{HAPROXY_TCP}/readyz"),
            pid: haproxy,
            extra: &[],
        },
    ];
    for pid in [proxy, haproxy, l4] {
        pin(pid, 0);
    }
    println!(
        "\n== part A: wrk {} against /readyz of the active master ({active}); proxies on core 0, wrk on core 1 ==",
        args.join(" ")
    );
    let with = |t: &Target, base: &[String]| -> Vec<String> {
        base.iter()
            .cloned()
            .chain(t.extra.iter().map(|s| s.to_string()))
            .collect()
    };
    // warm up every path (connection pools, page cache)
    let warm: Vec<String> = ["-t1", "-c50", "-d2s"].map(String::from).to_vec();
    for t in &targets {
        run_wrk(&with(t, &warm), &t.url);
    }
    let mut results: Vec<Vec<(Wrk, f64)>> = vec![Vec::new(); targets.len()];
    for round in 1..=rounds {
        for (i, t) in targets.iter().enumerate() {
            thread::sleep(Duration::from_millis(500));
            let cpu0 = cpu_seconds(t.pid);
            let w = run_wrk(&with(t, &args), &t.url);
            let us = (cpu_seconds(t.pid) - cpu0) * 1e6 / w.requests.max(1) as f64;
            println!(
                "round {round} {:16} {:9.0} req/s  p50 {:6.2} ms  p99 {:6.2} ms  cpu {us:6.1} us/req  non-2xx {}  {}",
                t.name, w.rps, w.p50_ms, w.p99_ms, w.non2xx, w.errors
            );
            results[i].push((w, us));
        }
    }
    let (now, _) = c.wait_one_active(LONG);
    if now != active {
        println!("WARNING: the active master changed during part A ({active} -> {now})");
    }
    println!("\nmedian over {rounds} round(s):");
    println!("| path | req/s | p50 ms | p99 ms | CPU us/req |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let med: Vec<(f64, f64, f64, f64)> = results
        .iter()
        .map(|r| {
            (
                median(r.iter().map(|(w, _)| w.rps).collect()),
                median(r.iter().map(|(w, _)| w.p50_ms).collect()),
                median(r.iter().map(|(w, _)| w.p99_ms).collect()),
                median(r.iter().map(|(_, us)| *us).collect()),
            )
        })
        .collect();
    for (t, (rps, p50, p99, us)) in targets.iter().zip(&med) {
        println!("| {} | {rps:.0} | {p50:.2} | {p99:.2} | {us:.1} |", t.name);
    }
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    for (what, b, h) in [
        ("keep-alive TLS", 1, 2),
        ("new TLS connections", 3, 4),
        ("L4 passthrough", 5, 6),
    ] {
        let (b, h) = (med[b], med[h]);
        println!(
            "ballast/haproxy {what}: req/s {:.2}x (goal >= 1.0: {}), p99 {:.2}x (goal <= 1.0: {}), CPU per request {:.2}x",
            b.0 / h.0,
            verdict(b.0 >= h.0),
            b.2 / h.2,
            verdict(b.2 <= h.2),
            b.3 / h.3,
        );
    }
}

// ---------------------------------------------------------------------------------------
// Part B: failover seen by clients

#[derive(Clone)]
struct Req {
    start: Instant,
    end: Instant,
    ok: bool,
}

struct Front {
    name: &'static str,
    url: String,
    log: Mutex<Vec<Req>>,
    errors: Mutex<Vec<String>>,
}

fn client_loop(front: Arc<Front>, stop: Arc<AtomicBool>) {
    let http = client(Duration::from_secs(15));
    let pace = Duration::from_millis(10);
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        let res = http.get(&front.url).send().and_then(|r| {
            let status = r.status().as_u16();
            r.bytes().map(|_| status)
        });
        let end = Instant::now();
        let ok = matches!(res, Ok(200));
        if !ok {
            let what = match res {
                Ok(s) => format!("HTTP {s}"),
                Err(e) => format!("{e}"),
            };
            front.errors.lock().unwrap().push(what);
        }
        front.log.lock().unwrap().push(Req { start, end, ok });
        if let Some(rest) = (start + pace).checked_duration_since(Instant::now()) {
            thread::sleep(rest);
        }
    }
}

/// Whether the last `n` requests of a front all succeeded and started after `after`.
fn recent_ok(f: &Front, n: usize, after: Instant) -> bool {
    let log = f.log.lock().unwrap();
    log.len() >= n && log[log.len() - n..].iter().all(|r| r.ok && r.start > after)
}

fn ok_after(f: &Front, after: Instant) -> bool {
    f.log
        .lock()
        .unwrap()
        .iter()
        .rev()
        .take_while(|r| r.start > after)
        .any(|r| r.ok)
}

/// Per kill window `[kills[i] - 1 s, kills[i+1] - 1 s)` (by request start, so a request
/// sent just before the kill counts for it): (longest stall, longest request, failed
/// requests).
fn per_kill(log: &[Req], kills: &[Instant], end: Instant) -> Vec<(f64, f64, usize)> {
    let lead = Duration::from_secs(1);
    // next_ok[i]: completion of the first successful request at or after i
    let mut next_ok = vec![None; log.len()];
    let mut nxt: Option<Instant> = None;
    for i in (0..log.len()).rev() {
        if log[i].ok {
            nxt = Some(log[i].end);
        }
        next_ok[i] = nxt;
    }
    kills
        .iter()
        .enumerate()
        .map(|(k, kill_at)| {
            let from = *kill_at - lead;
            let to = kills.get(k + 1).map(|t| *t - lead).unwrap_or(end);
            let (mut stall, mut longest, mut failed) = (0f64, 0f64, 0usize);
            for (i, r) in log.iter().enumerate() {
                if r.start < from || r.start >= to {
                    continue;
                }
                let until = next_ok[i].unwrap_or(end);
                stall = stall.max((until - r.start).as_secs_f64() * 1e3);
                longest = longest.max((r.end - r.start).as_secs_f64() * 1e3);
                failed += usize::from(!r.ok);
            }
            (stall, longest, failed)
        })
        .collect()
}

fn part_b(c: &mut Cluster) {
    let kills: usize = env_or("BENCH_KILLS", 20);
    let path = "/api/v1/namespaces";
    let fronts: Vec<Arc<Front>> = [
        ("ballast", format!("{}{path}", c.proxy_url())),
        (
            "haproxy-default",
            format!("https://{HAPROXY_DEFAULT}{path}"),
        ),
        ("haproxy-tuned", format!("https://{HAPROXY_TUNED}{path}")),
        (
            "haproxy-tuned-retry",
            format!("https://{HAPROXY_RETRY}{path}"),
        ),
    ]
    .into_iter()
    .map(|(name, url)| {
        Arc::new(Front {
            name,
            url,
            log: Mutex::new(Vec::new()),
            errors: Mutex::new(Vec::new()),
        })
    })
    .collect();
    println!(
        "\n== part B: GET {path} every 10 ms through each front, {kills} kills of the active ==",
    );
    for f in &fronts {
        wait_streak(&f.url, 20);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = fronts
        .iter()
        .map(|f| {
            let (f, stop) = (f.clone(), stop.clone());
            thread::spawn(move || client_loop(f, stop))
        })
        .collect();
    let poll = client(Duration::from_millis(300));
    let ids = c.master_ids();
    let mut kill_times = Vec::new();
    let mut to_active = Vec::new();
    let settle_min = Duration::from_millis(env_or("BENCH_SETTLE_MS", 1000));
    thread::sleep(Duration::from_secs(1));
    for k in 0..kills {
        let (active, _) = c.wait_one_active(LONG);
        let kill_at = Instant::now();
        c.kill(&active);
        kill_times.push(kill_at);
        let new_active = wait_until("a new active master", LONG, || {
            for id in ids.iter().filter(|i| **i != active) {
                let r = poll.get(format!("{}/active", c.master_url(id))).send().ok();
                if r.is_some_and(|r| r.status().as_u16() == 200) {
                    return Some(id.clone());
                }
            }
            thread::sleep(Duration::from_millis(5));
            None
        });
        let t_active = kill_at.elapsed();
        to_active.push(t_active.as_secs_f64() * 1e3);
        // every client served again (bounded: a front may never recover by itself)
        let deadline = Instant::now() + Duration::from_secs(20);
        while !fronts.iter().all(|f| ok_after(f, kill_at)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        c.start_node(&active);
        wait_until(&format!("{active} rejoins"), LONG, || {
            let r = poll
                .get(format!("{}/active", c.master_url(&active)))
                .send()
                .ok()?;
            let v: serde_json::Value = r.json().ok()?;
            (v["leader"].as_str() == Some(new_active.as_str())).then_some(())
        });
        let rejoined = Instant::now();
        thread::sleep(settle_min);
        // settled: the last 50 requests (~0.5 s) of every front succeeded
        let deadline = Instant::now() + Duration::from_secs(30);
        while !fronts.iter().all(|f| recent_ok(f, 50, rejoined)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        println!(
            "kill {:2}: {active} killed, {new_active} active after {:6.1} ms, cycle {:5.1} s",
            k + 1,
            t_active.as_secs_f64() * 1e3,
            kill_at.elapsed().as_secs_f64()
        );
    }
    stop.store(true, Ordering::Relaxed);
    let end = Instant::now();
    for h in handles {
        h.join().unwrap();
    }

    println!("\nkill -> new /active 200: {}", summary(&to_active));
    println!("\n| front | stall per kill (min / p50 / p99 / max ms) | longest request per kill (max ms) | failed requests (total; kills with failures) | requests |");
    println!("| --- | --- | ---: | --- | ---: |");
    for f in &fronts {
        let log = f.log.lock().unwrap();
        let pk = per_kill(&log, &kill_times, end);
        let stalls: Vec<f64> = pk.iter().map(|x| x.0).collect();
        let longest = pk.iter().map(|x| x.1).fold(0f64, f64::max);
        let failed: usize = pk.iter().map(|x| x.2).sum();
        let kills_failed = pk.iter().filter(|x| x.2 > 0).count();
        let mut s = stalls.clone();
        s.sort_by(|a, b| a.total_cmp(b));
        println!(
            "| {} | {:.0} / {:.0} / {:.0} / {:.0} | {longest:.0} | {failed}; {kills_failed} of {} | {} |",
            f.name,
            s[0],
            rank(&s, 0.5),
            rank(&s, 0.99),
            s[s.len() - 1],
            pk.len(),
            log.len()
        );
    }
    println!();
    for f in &fronts {
        let errors = f.errors.lock().unwrap();
        let mut kinds: Vec<(String, usize)> = Vec::new();
        for e in errors.iter() {
            match kinds.iter_mut().find(|(k, _)| k == e) {
                Some((_, n)) => *n += 1,
                None => kinds.push((e.clone(), 1)),
            }
        }
        kinds.sort_by_key(|k| std::cmp::Reverse(k.1));
        for (k, n) in kinds.iter().take(4) {
            println!("{}: {n} x {k}", f.name);
        }
    }
    let b = per_kill(&fronts[0].log.lock().unwrap(), &kill_times, end);
    let mut s: Vec<f64> = b.iter().map(|x| x.0).collect();
    s.sort_by(|a, b| a.total_cmp(b));
    let failed: usize = b.iter().map(|x| x.2).sum();
    println!(
        "ballast goals: stall p99 <= 1 s {}; zero failed reads {}",
        if rank(&s, 0.99) <= 1000.0 {
            "met"
        } else {
            "NOT met"
        },
        if failed == 0 { "met" } else { "NOT met" },
    );
}

/// A second ballast proxy in L4 mode on [`BALLAST_L4`], from a copy of the cluster's
/// config (its own DNS and admin addresses).
fn start_l4_proxy(c: &Cluster) -> Helper {
    let mut cfg = c.config().clone();
    cfg.proxy.mode = ballast_config::ProxyMode::Tcp;
    cfg.proxy.api = BALLAST_L4.parse().unwrap();
    cfg.proxy.dns = "127.71.0.5:5353".parse().unwrap();
    cfg.proxy.admin = "127.71.0.5:9180".parse().unwrap();
    let path = c.dir().join("ballast-l4.toml");
    fs::write(&path, ballast_config::local::to_toml(&cfg)).unwrap();
    let log = c.dir().join("logs/proxy-l4.log");
    let mut cmd = Command::new(ballast_tests::ballast_bin());
    cmd.args(["proxy", "--config"])
        .arg(&path)
        .current_dir(c.dir());
    Helper::start("ballast proxy (L4)", &mut cmd, &log)
}

fn main() {
    let parts = std::env::var("BENCH_PARTS").unwrap_or_else(|_| "ab".into());
    println!(
        "bench-proxy: 3 masters + ballast proxy in 127.{BLOCK}.0.0/16 (TLS), haproxy {HAPROXY_DEFAULT} \
         (default checks) / {HAPROXY_TUNED} (tuned) / {HAPROXY_TCP} (mode tcp), ballast L4 {BALLAST_L4}; binary {}",
        ballast_tests::ballast_bin().display()
    );
    let mut c = Cluster::start(ClusterOpts::new(BLOCK).proxy(true), |_| {});
    let (active, _) = c.wait_one_active(LONG);
    wait_until("the proxy routes to the active master", LONG, || {
        (proxy_active(&c).as_deref() == Some(active.as_str())).then_some(())
    });

    let hdir = c.dir().join("haproxy");
    fs::create_dir_all(&hdir).unwrap();
    // HAProxy's certificate: a proxy's (user `proxy:haproxy`, group `ballast:proxies`, so
    // the masters believe its X-Remote-* headers), for its own address, from the same CA
    // and of the same kind (ECDSA P-256) as the ballast proxy's; `crt` takes the chain
    // and its key in one file.
    let haproxy_ip: std::net::IpAddr = HAPROXY_DEFAULT.split(':').next().unwrap().parse().unwrap();
    let (crt, key) = test_pki().server(
        "haproxy-71",
        "proxy:haproxy",
        &[ballast_config::pki::PROXIES_GROUP],
        &[haproxy_ip],
    );
    let pem = hdir.join("proxy.pem");
    fs::write(
        &pem,
        [fs::read(&crt).unwrap(), fs::read(&key).unwrap()].concat(),
    )
    .unwrap();
    fs::write(hdir.join("haproxy.cfg"), haproxy_config(&c, &pem)).unwrap();
    let hlog = hdir.join("haproxy.log");
    let mut haproxy = Helper::start(
        "haproxy",
        Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(hdir.join("haproxy.cfg")),
        &hlog,
    );
    let l4_log = c.dir().join("logs/proxy-l4.log");
    let mut l4 = start_l4_proxy(&c);
    thread::sleep(Duration::from_millis(500));
    haproxy.check_running(&hlog);
    l4.check_running(&l4_log);
    for front in [HAPROXY_DEFAULT, HAPROXY_TUNED, HAPROXY_RETRY] {
        wait_streak(&format!("https://{front}/readyz"), 20);
    }
    // L4 fronts show the active master's certificate, valid for `api.<zone>`
    for front in [HAPROXY_TCP, BALLAST_L4] {
        let http = test_pki()
            .admin_builder_for_name("api.ballast.local")
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        wait_streak_with(&format!("https://{front}/readyz"), 20, http);
    }

    if parts.contains('a') {
        part_a(&c, &active, haproxy.child.id(), l4.child.id());
    }
    drop(l4);
    if parts.contains('b') {
        part_b(&mut c);
    }
    haproxy.check_running(&hlog);
}
