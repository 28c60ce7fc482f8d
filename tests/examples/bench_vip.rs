//! VIP failover on real interfaces: `./task bench-vip`.
//!
//! The topology of `tests/tests/proxy_vip_host.rs` (block 72): three masters on a bridge,
//! three proxy hosts and a client host, each its own network namespace, the VIP
//! `10.233.72.100/24` on the holder's `eth0`. Three fronts in turn, each killed
//! `BENCH_KILLS` times (default 20) with SIGKILL of every process on the holder host:
//! - **ballast**: `ballast proxy` on each host (`[vip]` on `eth0`, default lease 3 s);
//! - **keepalived default** + HAProxy: keepalived 2.x VRRPv2 `advert_int 1` on each host and
//!   HAProxy `mode tcp` (TLS passed through, `/readyz` checks every 100 ms) on `*:6443`;
//! - **keepalived tuned** + HAProxy: VRRPv3 `advert_int 0.01`, the lowest it takes.
//!
//! A client in its own host asks `GET https://VIP:6443/readyz` on a new connection every
//! 10 ms (timeout 250 ms). A checker reads every proxy host's addresses every 20 ms. Per
//! front it prints kill → the first success of a request sent after the kill
//! (min / p50 / p99 / max), the failed requests, in how many rounds the killed host still
//! had the VIP when another answered on it (then it is removed by hand before the restart),
//! and the checker's samples with two hosts holding it.
//!
//! Run with a release build: `BALLAST_BIN=$CARGO_TARGET_DIR/release/ballast`.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ballast_tests::bench::{env_or, min_p50_p99_max, sorted_millis};
use ballast_tests::netns::{addresses_in, enter, vip_cluster, HostProcs, Segment};
use ballast_tests::*;
use nix::sys::signal::Signal;

const BLOCK: u8 = 72;
const HOSTS: [&str; 3] = ["p1", "p2", "p3"];
const LONG: Duration = Duration::from_secs(60);
/// How long a round waits for the VIP to answer again.
const GIVE_UP: Duration = Duration::from_secs(15);

/// One request of the client: when it was sent, when it ended, whether it got 200.
#[derive(Clone, Copy)]
struct Sample {
    sent: Instant,
    done: Instant,
    ok: bool,
}

fn client_loop(ns: String, vip: Ipv4Addr, stop: Arc<AtomicBool>, log: Arc<Mutex<Vec<Sample>>>) {
    enter(&ns);
    let http = test_pki()
        .admin_builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_millis(250))
        .build()
        .unwrap();
    let url = format!("https://{vip}:6443/readyz");
    while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        let ok = http
            .get(&url)
            .send()
            .is_ok_and(|r| r.status().as_u16() == 200);
        log.lock().unwrap().push(Sample {
            sent,
            done: Instant::now(),
            ok,
        });
        thread::sleep(Duration::from_millis(10));
    }
}

/// Which proxy hosts have `vip` on `eth0`.
fn holders(seg: &Segment, vip: Ipv4Addr) -> Vec<&'static str> {
    HOSTS
        .into_iter()
        .filter(|h| seg.addresses(h).contains(&vip))
        .collect()
}

/// Every process in host `h`'s namespace gets SIGKILL.
fn kill_host_processes(seg: &Segment, h: &str) {
    let out = run("ip", &["netns", "pids", &seg.ns(h)]);
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<i32>() {
            // it may be gone already (a child of one killed first)
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// A front on the three proxy hosts.
trait Front {
    fn name(&self) -> &str;
    fn start(&mut self, seg: &Segment, c: &Cluster, host: &str);
    /// After a kill: forget (reap) what ran on `host`.
    fn killed(&mut self, host: &str);
    /// How long to wait after a restart before the next kill.
    fn settle(&self) -> Duration;
}

struct Ballast {
    procs: HostProcs,
}

impl Front for Ballast {
    fn name(&self) -> &str {
        "ballast (lease 3 s)"
    }
    fn start(&mut self, seg: &Segment, c: &Cluster, host: &str) {
        self.procs.start_proxy(seg, c, host);
    }
    fn killed(&mut self, host: &str) {
        self.procs.reap(host);
    }
    fn settle(&self) -> Duration {
        Duration::from_secs(2)
    }
}

struct Keepalived {
    name: &'static str,
    /// VRRP version and advert interval.
    version: u8,
    advert: &'static str,
    dir: std::path::PathBuf,
    procs: HostProcs,
    settle: Duration,
}

impl Keepalived {
    fn config(&self, seg: &Segment, host: &str, priority: u32) -> String {
        let vip = seg.addr(100);
        format!(
            "global_defs {{\n  router_id {host}\n  vrrp_version {}\n  vrrp_garp_master_delay 0\n  \
             script_user root\n}}\n\
             vrrp_instance VI {{\n  state BACKUP\n  interface eth0\n  virtual_router_id 72\n  \
             priority {priority}\n  advert_int {}\n  virtual_ipaddress {{\n    {vip}/24\n  }}\n}}\n",
            self.version, self.advert
        )
    }
}

/// HAProxy `mode tcp` on `*:6443`, to the active master (`/readyz` checks every 100 ms).
fn haproxy_config(c: &Cluster, pem: &Path) -> String {
    let ca = c.pki_dir().join("ca.crt");
    let mut s = format!(
        "global\n    maxconn 2048\n\ndefaults\n    mode tcp\n    timeout connect 1s\n    \
         timeout client 30s\n    timeout server 30s\n\n\
         frontend fe\n    bind *:6443\n    default_backend be\n\n\
         backend be\n    option httpchk GET /readyz\n    http-check expect status 200\n    \
         default-server inter 100ms fall 1 rise 1 check-ssl verify required ca-file {} crt {}\n",
        ca.display(),
        pem.display()
    );
    for id in c.master_ids() {
        let _ = writeln!(s, "    server {id} {} check", c.master_api(&id));
    }
    s
}

impl Front for Keepalived {
    fn name(&self) -> &str {
        self.name
    }
    fn start(&mut self, seg: &Segment, c: &Cluster, host: &str) {
        let i = HOSTS.iter().position(|h| *h == host).unwrap() as u32;
        let conf = self.dir.join(format!("{host}-keepalived.conf"));
        std::fs::write(&conf, self.config(seg, host, 101 + i)).unwrap();
        let pem = self.dir.join(format!("{host}.pem"));
        let pki = c.pki_dir();
        let mut both = std::fs::read(pki.join(format!("{host}.crt"))).unwrap();
        both.extend(std::fs::read(pki.join(format!("{host}.key"))).unwrap());
        std::fs::write(&pem, both).unwrap();
        let hcfg = self.dir.join(format!("{host}-haproxy.cfg"));
        std::fs::write(&hcfg, haproxy_config(c, &pem)).unwrap();
        let log = |what: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join(format!("{host}-{what}.log")))
                .unwrap()
        };
        let mut h = seg.command(host, Path::new("haproxy"));
        h.arg("-db")
            .arg("-f")
            .arg(&hcfg)
            .stdout(log("haproxy"))
            .stderr(log("haproxy-err"));
        self.procs.start(&format!("{host}-haproxy"), &mut h);
        // a killed keepalived leaves its pid files, and with pids reused fast (the checker
        // runs `ip` 150 times a second) a new one may think it runs already
        for f in [format!("{host}.pid"), format!("{host}-vrrp.pid")] {
            let _ = std::fs::remove_file(self.dir.join(f));
        }
        let mut k = seg.command(host, Path::new("keepalived"));
        k.args(["-n", "-l", "-P", "-f"])
            .arg(&conf)
            .arg("-p")
            .arg(self.dir.join(format!("{host}.pid")))
            .arg("-r")
            .arg(self.dir.join(format!("{host}-vrrp.pid")))
            .stdout(log("keepalived"))
            .stderr(log("keepalived-err"));
        self.procs.start(&format!("{host}-keepalived"), &mut k);
    }
    fn killed(&mut self, host: &str) {
        self.procs.reap(&format!("{host}-haproxy"));
        self.procs.reap(&format!("{host}-keepalived"));
    }
    fn settle(&self) -> Duration {
        self.settle
    }
}

struct Round {
    /// `None`: not answering within [`GIVE_UP`].
    gap: Option<Duration>,
    failed: u64,
    /// The killed host still had the VIP when another answered on it.
    stale: bool,
}

fn summary(samples: &[Duration]) -> String {
    min_p50_p99_max(&sorted_millis(samples))
}

fn measure(front: &mut dyn Front, seg: &Segment, c: &Cluster, kills: usize) {
    let vip = seg.addr(100);
    for h in HOSTS {
        front.start(seg, c, h);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let two = Arc::new(AtomicU64::new(0));
    let checker = {
        let (stop, two) = (stop.clone(), two.clone());
        let ns: Vec<String> = HOSTS.iter().map(|h| seg.ns(h)).collect();
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let n = ns
                    .iter()
                    .filter(|ns| addresses_in(ns).contains(&vip))
                    .count();
                if n > 1 {
                    two.fetch_add(1, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let log = Arc::new(Mutex::new(Vec::new()));
    let client = {
        let (ns, stop, log) = (seg.ns("c"), stop.clone(), log.clone());
        thread::spawn(move || client_loop(ns, vip, stop, log))
    };
    let first_ok_after = |t: Instant| -> Option<Instant> {
        let log = log.lock().unwrap();
        log.iter().find(|s| s.sent >= t && s.ok).map(|s| s.done)
    };
    let mut rounds = Vec::new();
    for k in 0..kills {
        // one holder, and the client served for a second
        // the same one holder for two seconds (keepalived preempts to the highest priority)
        let deadline = Instant::now() + LONG;
        let mut stable: Option<(&str, Instant)> = None;
        let holder = loop {
            let last = holders(seg, vip);
            match (last.as_slice(), stable) {
                ([h], Some((s, since))) if *h == s => {
                    if since.elapsed() >= Duration::from_secs(2) {
                        break s;
                    }
                }
                ([h], _) => stable = Some((h, Instant::now())),
                _ => stable = None,
            }
            assert!(
                Instant::now() < deadline,
                "not one VIP holder for a minute: {last:?}"
            );
            thread::sleep(Duration::from_millis(20));
        };
        let since = Instant::now();
        wait_until("the client served for a second", LONG, || {
            first_ok_after(since)
                .filter(|t| t.elapsed() >= Duration::from_secs(1))
                .map(|_| ())
        });
        // the clock starts once the holder's processes are gone (a dying process may still
        // answer for a few milliseconds after kill(2) returns)
        kill_host_processes(seg, holder);
        front.killed(holder);
        let t = Instant::now();
        let deadline = t + GIVE_UP;
        let back = loop {
            match first_ok_after(t) {
                Some(b) => break Some(b),
                None if Instant::now() > deadline => break None,
                None => thread::sleep(Duration::from_millis(5)),
            }
        };
        let end = back.unwrap_or(deadline);
        let failed = log
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.done >= t && s.done <= end && !s.ok)
            .count() as u64;
        let gap = back.map(|b| b - t);
        let now_holders = holders(seg, vip);
        // the killed host still has the VIP beside the new holder: keepalived leaves it there
        // (ballast's address runs out by its kernel lifetime); cleared by hand, as an operator
        // would, so the next round starts with one holder
        let stale = now_holders.len() > 1 && now_holders.contains(&holder);
        // whose MAC the client sends VIP traffic to
        let neighbour = seg.neighbour("c", vip);
        let via = HOSTS
            .into_iter()
            .find(|h| neighbour.as_deref() == Some(seg.mac(h).as_str()))
            .unwrap_or("-");
        let took = gap.map_or(format!("not within {GIVE_UP:?}"), |g| {
            format!("after {:7.1} ms", g.as_secs_f64() * 1e3)
        });
        println!(
            "  kill {:2} of {holder}: answering again {took}, {failed} failed, holders then {now_holders:?}, client's neighbour entry: {via}",
            k + 1,
        );
        if stale {
            seg.remove_address(holder, vip, 24);
        }
        rounds.push(Round { gap, failed, stale });
        front.start(seg, c, holder);
        thread::sleep(front.settle());
    }
    stop.store(true, Ordering::Relaxed);
    checker.join().unwrap();
    client.join().unwrap();
    let gaps: Vec<Duration> = rounds.iter().filter_map(|r| r.gap).collect();
    let lost = rounds.iter().filter(|r| r.gap.is_none()).count();
    let failed: u64 = rounds.iter().map(|r| r.failed).sum();
    let total = log.lock().unwrap().len();
    let stale = rounds.iter().filter(|r| r.stale).count();
    println!(
        "{:20} kill -9 → answering: {} (not within {GIVE_UP:?}: {lost}); failed {failed} of {total}; two hosts with the VIP: in {stale} of {} rounds, {} checker samples",
        front.name(),
        summary(&gaps),
        rounds.len(),
        two.load(Ordering::Relaxed)
    );
    for h in HOSTS {
        kill_host_processes(seg, h);
    }
    for h in HOSTS {
        front.killed(h);
    }
    // a killed keepalived leaves its address behind: clear every host for the next front
    for h in HOSTS {
        if seg.addresses(h).contains(&vip) {
            seg.remove_address(h, vip, 24);
        }
    }
}

fn main() {
    require("keepalived");
    require("haproxy");
    require("nft");
    let kills: usize = env_or("BENCH_KILLS", 20);
    let mut seg = Segment::new(BLOCK);
    let c = vip_cluster(&mut seg, &HOSTS);
    c.wait_one_active(LONG);
    println!(
        "VIP failover, {kills} kills per front; binary {}; {}",
        ballast_bin().display(),
        String::from_utf8_lossy(
            &Command::new("keepalived")
                .arg("--version")
                .output()
                .unwrap()
                .stderr
        )
        .lines()
        .next()
        .unwrap_or_default()
    );
    let dir = tempfile::Builder::new()
        .prefix("bench-vip-")
        .tempdir()
        .unwrap()
        .keep();
    println!(
        "keepalived and HAProxy files and logs (kept): {}",
        dir.display()
    );
    let mut fronts: Vec<Box<dyn Front>> = vec![
        Box::new(Ballast {
            procs: HostProcs::default(),
        }),
        Box::new(Keepalived {
            name: "keepalived default",
            version: 2,
            advert: "1",
            dir: dir.clone(),
            procs: HostProcs::default(),
            settle: Duration::from_secs(4),
        }),
        Box::new(Keepalived {
            name: "keepalived tuned",
            version: 3,
            advert: "0.01",
            dir: dir.clone(),
            procs: HostProcs::default(),
            settle: Duration::from_secs(1),
        }),
    ];
    // BENCH_FRONTS: a comma-separated subset of ballast,default,tuned
    let only: String = env_or("BENCH_FRONTS", "ballast,default,tuned".to_string());
    for (f, key) in fronts.iter_mut().zip(["ballast", "default", "tuned"]) {
        if !only.split(',').any(|k| k == key) {
            continue;
        }
        println!("{}:", f.name());
        measure(f.as_mut(), &seg, &c, kills);
    }
}
