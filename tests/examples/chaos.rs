//! The fault campaign (issue 14): `./task chaos [--seed S] [--minutes M | --seconds S]
//! [--masters 3|5]`.
//!
//! Starts real masters, a proxy and a worker in `127.46.0.0/16`, then for the given time:
//! - 8 clients create, get, update with a `resourceVersion` precondition (compare and
//!   swap) and delete ConfigMaps on a few keys, 6 through the proxy and 2 straight to the
//!   masters, recording when each call began and ended and what it was told (a value is
//!   unique per write);
//! - one observer per master polls `/active` every 20 ms;
//! - a watch on ConfigMaps, opened through the proxy before the first call, records
//!   every event (reopened from the last one it saw if it ends);
//! - a pod runs on the worker;
//! - a seeded schedule injects one fault at a time, then heals it: kill -9 of the active
//!   master or of a follower (its data kept, or lost), of the proxy; SIGSTOP of the active;
//!   the active cut off from the other masters, from the proxy, from every node; one-way
//!   cuts from and to the active; 10–40 % of its packets lost; its links delayed 100–500
//!   ms each way with 0–20 % loss, or every link 5–25 ms (this kernel has no `sch_netem`:
//!   TCP relays delay, `tests/src/delay.rs`); the active's data dir (a 256 MiB tmpfs) full.
//! - the worker's wall clock runs a minute behind the masters' (libfaketime).
//!
//! After healing it checks: the history is linearizable (the checker of
//! `ballast_tests::linearize`, with a final read of every key); the watch saw every
//! acknowledged write, in order, none twice, nothing nobody wrote; no two masters active
//! in one term and no answer "active" in a lower term after a higher one was seen; the pod
//! ran untouched; no process died but those killed. On a failure it prints the seed, the
//! shortest failing sub-history, and keeps the cluster's directory; it exits 1.

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ballast_tests::linearize::{self, Call, Op, Outcome};
use ballast_tests::{http_timeout, pod_processes, sleep_pod, test_pki, Cluster, ClusterOpts};

const BLOCK: u8 = 46;
/// Keys in use at once; every [`GENERATION`] the clients move to fresh ones, so that
/// each key's history is short (the checker's search grows fast with a key's calls of
/// unknown outcome, as Jepsen's independent keys also avoid).
const KEYS: usize = 6;
const GENERATION: Duration = Duration::from_secs(10);
const CLIENTS: usize = 8;
/// Clients `0..DIRECT` talk to the masters themselves, the others to the proxy.
const DIRECT: usize = 2;
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const RECOVERY: Duration = Duration::from_secs(60);
const NS: &str = "default";

struct Args {
    /// `--check FILE`: check a history a failed run kept, and nothing else.
    check: Option<PathBuf>,
    seed: u64,
    run: Duration,
    masters: usize,
}

fn args() -> Args {
    let mut a = Args {
        check: None,
        seed: 1,
        run: Duration::from_secs(120),
        masters: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || -> u64 {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| usage(&format!("{flag} needs a number")))
        };
        if flag == "--check" {
            a.check = Some(
                it.next()
                    .unwrap_or_else(|| usage("--check needs a file"))
                    .into(),
            );
            continue;
        }
        match flag.as_str() {
            "--seed" => a.seed = value(),
            "--minutes" => a.run = Duration::from_secs(value() * 60),
            "--seconds" => a.run = Duration::from_secs(value()),
            "--masters" => a.masters = value() as usize,
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if a.masters != 3 && a.masters != 5 {
        usage("--masters is 3 or 5");
    }
    a
}

fn usage(why: &str) -> ! {
    eprintln!("chaos: {why}\nusage: ./task chaos [--seed S] [--minutes M | --seconds S] [--masters 3|5] | --check HISTORY");
    std::process::exit(2);
}

/// Nanoseconds since the campaign began: the history's clock.
#[derive(Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn ns(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

/// Slot `k`'s key in the generation of `now`.
fn key_name(k: usize, now: u64) -> String {
    format!("chaos-{}-{k}", now / GENERATION.as_nanos() as u64)
}

fn collection(base: &str) -> String {
    format!("{base}/api/v1/namespaces/{NS}/configmaps")
}

/// One call over HTTP, and what its answer says (anything that does not say whether
/// the call took effect is [`Outcome::Unknown`]); `None` when it was certainly not
/// acted on: no connection, or a master's refusal for not being active (marked
/// `x-ballast-rejected: not-active`), which is given before anything is proposed.
fn send(base: &str, key: &str, call: Call) -> Option<Outcome> {
    let item = format!("{}/{key}", collection(base));
    let cm = |value: u64, rv: Option<u64>| {
        let mut meta = serde_json::json!({"name": key, "namespace": NS});
        if let Some(rv) = rv {
            meta["resourceVersion"] = rv.to_string().into();
        }
        serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
            "data": {"v": value.to_string()}})
        .to_string()
    };
    let r = match call {
        Call::Create(v) => {
            http_timeout("POST", &collection(base), Some(&cm(v, None)), CALL_TIMEOUT)
        }
        Call::Get => http_timeout("GET", &item, None, CALL_TIMEOUT),
        Call::Update { value, expect } => {
            http_timeout("PUT", &item, Some(&cm(value, Some(expect))), CALL_TIMEOUT)
        }
        Call::Delete => http_timeout("DELETE", &item, None, CALL_TIMEOUT),
    };
    let r = match r {
        Ok(r) => r,
        Err(e) if e.is_connect() => return None,
        Err(_) => return Some(Outcome::Unknown),
    };
    if r.header("x-ballast-rejected") == Some("not-active") {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
    let rv = || {
        v["metadata"]["resourceVersion"]
            .as_str()?
            .parse::<u64>()
            .ok()
    };
    let value = || v["data"]["v"].as_str()?.parse::<u64>().ok();
    let reason = v["reason"].as_str().unwrap_or("");
    let about_key = v["details"]["name"].as_str() == Some(key);
    Some(match (call, r.status) {
        (Call::Create(_), 201) => rv().map_or(Outcome::Unknown, Outcome::Created),
        (Call::Create(_), 409) if reason == "AlreadyExists" => Outcome::Exists,
        (Call::Get, 200) => match (value(), rv()) {
            (Some(x), Some(r)) => Outcome::Found(x, r),
            _ => Outcome::Unknown,
        },
        (Call::Update { .. }, 200) => rv().map_or(Outcome::Unknown, Outcome::Updated),
        (Call::Update { .. }, 409) if reason == "Conflict" => Outcome::Conflict,
        (Call::Delete, 200 | 202) => Outcome::Deleted,
        (Call::Get | Call::Update { .. } | Call::Delete, 404)
            if reason == "NotFound" && about_key =>
        {
            Outcome::NotFound
        }
        _ => Outcome::Unknown,
    })
}

/// One client's loop until `stop`.
fn client(
    idx: usize,
    bases: Vec<String>,
    seed: u64,
    clock: Clock,
    stop: &AtomicBool,
    history: &Mutex<Vec<Op>>,
) {
    let mut rng = fastrand::Rng::with_seed(seed ^ ((idx as u64 + 1) * 0x9e37_79b9));
    let mut versions: HashMap<String, u64> = HashMap::new();
    let mut n = 0u64;
    let mut base = rng.usize(..bases.len());
    while !stop.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(rng.u64(5..25)));
        let key = key_name(rng.usize(..KEYS), clock.ns());
        n += 1;
        let value = ((idx as u64 + 1) << 40) | n;
        let call = match rng.u8(..100) {
            0..35 => Call::Get,
            35..55 => Call::Create(value),
            55..85 => Call::Update {
                value,
                expect: versions.get(&key).copied().unwrap_or(1),
            },
            _ => Call::Delete,
        };
        let invoked = clock.ns();
        let Some(outcome) = send(&bases[base], &key, call) else {
            base = (base + 1) % bases.len();
            continue; // not acted on
        };
        let done = clock.ns();
        match outcome {
            Outcome::Created(rv) | Outcome::Found(_, rv) | Outcome::Updated(rv) => {
                versions.insert(key.clone(), rv);
            }
            Outcome::Unknown => base = (base + 1) % bases.len(),
            _ => {}
        }
        if call == Call::Get && outcome == Outcome::Unknown {
            continue; // tells nothing
        }
        history.lock().unwrap().push(Op {
            client: idx,
            key,
            call,
            outcome,
            invoked,
            completed: (outcome != Outcome::Unknown).then_some(done),
        });
    }
}

/// A watch event on one of the campaign's keys.
#[derive(Debug, Clone)]
struct Event {
    kind: String,
    key: String,
    value: Option<u64>,
    rv: u64,
}

#[derive(Default)]
struct WatchLog {
    events: Vec<Event>,
    /// Streams that ended (and were opened again from the last event seen).
    reopened: usize,
    /// Why the watch could not go on without a gap (410 Gone, an error event).
    broken: Vec<String>,
}

/// Watch ConfigMaps from `rv` through the proxy, forever (a detached thread).
fn watch(proxy: String, mut rv: u64, log: Arc<Mutex<WatchLog>>) {
    let http = test_pki()
        .admin_builder()
        .timeout(None)
        .build()
        .expect("watch client");
    loop {
        let url = format!(
            "{}?watch=1&resourceVersion={rv}&timeoutSeconds=3600",
            collection(&proxy)
        );
        if let Ok(r) = http.get(&url).send() {
            if r.status() == 200 {
                for line in std::io::BufReader::new(r).lines() {
                    let Ok(line) = line else { break };
                    let Ok(e) = serde_json::from_str::<serde_json::Value>(&line) else {
                        continue;
                    };
                    let kind = e["type"].as_str().unwrap_or("").to_string();
                    let o = &e["object"];
                    if kind == "ERROR" {
                        log.lock().unwrap().broken.push(line.clone());
                        break;
                    }
                    let Some(at) = o["metadata"]["resourceVersion"]
                        .as_str()
                        .and_then(|v| v.parse().ok())
                    else {
                        continue;
                    };
                    rv = at;
                    let key = o["metadata"]["name"].as_str().unwrap_or("").to_string();
                    if kind == "BOOKMARK" || !key.starts_with("chaos-") {
                        continue;
                    }
                    let value = o["data"]["v"].as_str().and_then(|v| v.parse().ok());
                    log.lock().unwrap().events.push(Event {
                        kind,
                        key,
                        value,
                        rv: at,
                    });
                }
                log.lock().unwrap().reopened += 1;
            } else if r.status() == 410 {
                log.lock().unwrap().broken.push(format!("410 Gone at {rv}"));
                return;
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// An `/active` answer "active" from one master: asked at `sent`, answered by `got`.
#[derive(Clone, Copy)]
struct Sample {
    master: usize,
    term: u64,
    sent: u64,
    got: u64,
}

/// Poll one master's `/active` every 20 ms until `stop`.
fn observe(master: usize, url: String, clock: Clock, stop: &AtomicBool, out: &Mutex<Vec<Sample>>) {
    while !stop.load(Ordering::Relaxed) {
        let sent = clock.ns();
        if let Ok(r) = http_timeout("GET", &url, None, Duration::from_millis(300)) {
            let got = clock.ns();
            let v: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
            if v["active"] == true {
                let term = v["term"].as_u64().unwrap_or(0);
                out.lock().unwrap().push(Sample {
                    master,
                    term,
                    sent,
                    got,
                });
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The faults, one at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillActive,
    KillActiveLoseData,
    KillFollower,
    /// A follower killed and started again with its data dir gone (the leader had
    /// replicated to it: its log goes back to nothing).
    KillFollowerLoseData,
    KillProxy,
    /// The active's data dir (a small tmpfs) filled up, then freed.
    DiskFullActive,
    PauseActive,
    IsolateFromMasters,
    IsolateFromProxy,
    IsolateFromAll,
    OneWayFromActive,
    OneWayToActive,
    /// 10–40 % of the packets between the active and every other node lost.
    LossyActive,
    /// Every TCP link of the active delayed 100–500 ms each way, with 0–20 % of its
    /// packets lost (far past what replication waits for: a slow partition).
    SlowActive,
    /// Every TCP link between any two nodes delayed 5–25 ms each way.
    SlowLinks,
}

const FAULTS: [Fault; 15] = [
    Fault::KillActive,
    Fault::KillActiveLoseData,
    Fault::KillFollower,
    Fault::KillFollowerLoseData,
    Fault::KillProxy,
    Fault::DiskFullActive,
    Fault::PauseActive,
    Fault::IsolateFromMasters,
    Fault::IsolateFromProxy,
    Fault::IsolateFromAll,
    Fault::OneWayFromActive,
    Fault::OneWayToActive,
    Fault::LossyActive,
    Fault::SlowActive,
    Fault::SlowLinks,
];

/// Each master's data dir is a tmpfs of this size, so a fault can fill it.
const DATA_DIR_SIZE: &str = "256m";
/// The worker runs with its wall clock this far behind the masters' (libfaketime).
const WORKER_SKEW: &str = "-60s";
const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Mount a tmpfs on each master's data dir.
fn mount_data_dirs(c: &Cluster) -> Vec<PathBuf> {
    c.master_ids()
        .iter()
        .map(|m| {
            let dir = c.dir().join(m);
            std::fs::create_dir_all(&dir).expect("data dir");
            let out = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={DATA_DIR_SIZE},mode=0700"))
                .arg("tmpfs")
                .arg(&dir)
                .output()
                .expect("mount");
            assert!(
                out.status.success(),
                "mount a tmpfs on {}: {out:?}",
                dir.display()
            );
            dir
        })
        .collect()
}

fn unmount(dirs: &[PathBuf]) {
    for d in dirs {
        let ok = std::process::Command::new("umount")
            .arg(d)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("cannot unmount {}", d.display());
        }
    }
}

/// Remove everything in a data dir (a mount point, which itself stays).
fn wipe(dir: &std::path::Path) {
    for e in std::fs::read_dir(dir).expect("read the data dir").flatten() {
        let p = e.path();
        let r = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.unwrap_or_else(|e| panic!("cannot remove {}: {e}", p.display()));
    }
}

/// Write zeros to `file` until its file system is full.
fn fill_disk(file: &std::path::Path) {
    use std::io::Write as _;
    let mut f = std::fs::File::create(file).expect("the fill file");
    let block = vec![0u8; 256 * 1024];
    loop {
        if let Err(e) = f.write_all(&block) {
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "filling: {e}");
            return;
        }
    }
}

/// Inject `fault` for `hold`, then heal it.
fn inject(c: &mut Cluster, fault: Fault, hold: Duration, rng: &mut fastrand::Rng) -> String {
    let masters = c.master_ids();
    let active = c
        .active_masters()
        .first()
        .map(|(id, _)| id.clone())
        .unwrap_or_else(|| masters[rng.usize(..masters.len())].clone());
    let others: Vec<String> = masters.iter().filter(|m| **m != active).cloned().collect();
    let others: Vec<&str> = others.iter().map(String::as_str).collect();
    let everyone: Vec<String> = c.node_ids().into_iter().filter(|n| *n != active).collect();
    let everyone: Vec<&str> = everyone.iter().map(String::as_str).collect();
    let a = active.as_str();
    let target = match fault {
        Fault::KillActive | Fault::KillActiveLoseData => {
            c.kill(a);
            if fault == Fault::KillActiveLoseData {
                wipe(&c.dir().join(a));
            }
            thread::sleep(hold);
            c.start_node(a);
            a.to_string()
        }
        Fault::KillFollower | Fault::KillFollowerLoseData => {
            let f = others[rng.usize(..others.len())].to_string();
            c.kill(&f);
            if fault == Fault::KillFollowerLoseData {
                wipe(&c.dir().join(&f));
            }
            thread::sleep(hold);
            c.start_node(&f);
            f
        }
        Fault::KillProxy => {
            c.kill("proxy");
            thread::sleep(hold);
            c.start_node("proxy");
            "proxy".into()
        }
        Fault::DiskFullActive => {
            let fill = c.dir().join(a).join("fill");
            fill_disk(&fill);
            thread::sleep(hold);
            std::fs::remove_file(&fill)
                .unwrap_or_else(|e| panic!("cannot remove {}: {e}", fill.display()));
            // its Raft stopped and the process exited, as it must: start it again, as
            // `Restart=on-failure` would
            let exited = !c.is_running(a);
            if exited {
                c.start_node(a);
            }
            format!("{a}{}", if exited { ", exited and restarted" } else { "" })
        }
        Fault::PauseActive => {
            c.pause(a);
            thread::sleep(hold);
            c.resume(a);
            a.to_string()
        }
        Fault::IsolateFromMasters | Fault::IsolateFromProxy | Fault::IsolateFromAll => {
            let from: &[&str] = match fault {
                Fault::IsolateFromMasters => &others,
                Fault::IsolateFromProxy => &["proxy"],
                _ => &everyone,
            };
            c.partition(&[a], from);
            thread::sleep(hold);
            c.heal();
            a.to_string()
        }
        Fault::LossyActive => {
            let percent = rng.u8(10..=40);
            c.lossy(&[a], &everyone, percent);
            thread::sleep(hold);
            c.heal();
            format!("{a}, {percent} % lost")
        }
        Fault::SlowActive => {
            let (ms, percent) = (rng.u64(100..=500), rng.u8(0..=20));
            c.delay(&[a], &everyone, Duration::from_millis(ms));
            if percent > 0 {
                c.lossy(&[a], &everyone, percent);
            }
            thread::sleep(hold);
            c.heal();
            format!("{a}, {ms} ms each way, {percent} % lost")
        }
        Fault::SlowLinks => {
            let ms = rng.u64(5..=25);
            let all = c.node_ids();
            let all: Vec<&str> = all.iter().map(String::as_str).collect();
            c.delay(&all, &all, Duration::from_millis(ms));
            thread::sleep(hold);
            c.heal();
            format!("every link, {ms} ms each way")
        }
        Fault::OneWayFromActive | Fault::OneWayToActive => {
            if fault == Fault::OneWayFromActive {
                c.cut_one_way(&[a], &everyone);
            } else {
                c.cut_one_way(&everyone, &[a]);
            }
            thread::sleep(hold);
            c.heal();
            a.to_string()
        }
    };
    target
}

/// Wait (up to [`RECOVERY`]) until the cluster is whole again: one active master and
/// every master's log applied up to where the active's was when it was first seen (a
/// master back from a lost data dir has caught up and votes again). One fault at a time
/// means this: a second data dir lost before the first has caught up is a lost majority,
/// and the cluster then stays unavailable rather than risk being wrong.
fn recover(c: &Cluster) -> bool {
    let applied = |id: &str| c.master_gauge(id, "ballast_master_raft_applied_index");
    let until = Instant::now() + RECOVERY;
    let mut target = None;
    while Instant::now() < until {
        let active = c.active_masters();
        if let [(id, _)] = &active[..] {
            if target.is_none() {
                target = applied(id);
            }
            if let Some(t) = target {
                if c.master_ids()
                    .iter()
                    .all(|m| applied(m).is_some_and(|a| a >= t))
                {
                    return true;
                }
            }
        }
        thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Keep the cluster's directory and the history, say where, and exit 1.
fn report_failure(mut c: Cluster, history: &[Op], data_dirs: &[PathBuf]) -> ! {
    let kept: PathBuf = c.keep_dir();
    let file = kept.join("history.json");
    let json = serde_json::to_string(history).expect("history as JSON");
    if let Err(e) = std::fs::write(&file, json) {
        eprintln!("cannot write {}: {e}", file.display());
    }
    println!(
        "kept {} (configs, data, logs; the history: ./task chaos --check {})",
        kept.display(),
        file.display()
    );
    drop(c);
    println!(
        "the masters' data dirs stay mounted (tmpfs) for a look: umount {}",
        data_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    std::process::exit(1);
}

/// What went wrong, for the report.
#[derive(Default)]
struct Anomalies(Vec<String>);

impl Anomalies {
    fn add(&mut self, what: impl Into<String>) {
        let what = what.into();
        eprintln!("ANOMALY: {what}");
        self.0.push(what);
    }
}

fn check_observer(samples: &[Sample], names: &[String], found: &mut Anomalies) -> String {
    let mut by_term: BTreeMap<u64, usize> = BTreeMap::new();
    for s in samples {
        if let Some(&other) = by_term.get(&s.term) {
            if other != s.master {
                found.add(format!(
                    "two masters active in term {}: {} and {}",
                    s.term, names[other], names[s.master]
                ));
            }
        }
        by_term.entry(s.term).or_insert(s.master);
    }
    // an answer "active" in a lower term given after one in a higher term arrived: the
    // highest term among the answers that arrived before each one was asked
    let mut by_got = samples.to_vec();
    by_got.sort_by_key(|s| s.got);
    let mut best: Vec<Sample> = Vec::with_capacity(by_got.len());
    for s in &by_got {
        let top = match best.last() {
            Some(b) if b.term >= s.term => *b,
            _ => *s,
        };
        best.push(top);
    }
    for s in samples {
        let before = by_got.partition_point(|h| h.got < s.sent);
        if let Some(h) = before.checked_sub(1).map(|i| best[i]) {
            if h.term > s.term {
                found.add(format!(
                    "{} answered active in term {} at {:.3} s after {} had in term {} at {:.3} s",
                    names[s.master],
                    s.term,
                    s.sent as f64 / 1e9,
                    names[h.master],
                    h.term,
                    h.got as f64 / 1e9
                ));
            }
        }
    }
    let terms: Vec<&u64> = by_term.keys().collect();
    format!(
        "{} active answers in {} terms ({}..{}): at most one active per term, terms never went back",
        samples.len(),
        terms.len(),
        terms.first().map_or(0, |t| **t),
        terms.last().map_or(0, |t| **t)
    )
}

fn check_watch(log: &WatchLog, history: &[Op], found: &mut Anomalies) -> String {
    for b in &log.broken {
        found.add(format!("the watch could not go on without a gap: {b}"));
    }
    let mut last = 0;
    let mut seen_values: HashMap<u64, u64> = HashMap::new();
    let mut present: HashMap<&str, bool> = HashMap::new();
    for e in &log.events {
        if e.rv <= last {
            found.add(format!("watch event at {} after {last}: {e:?}", e.rv));
        }
        last = e.rv;
        let was = present.get(e.key.as_str()).copied().unwrap_or(false);
        let ok = match e.kind.as_str() {
            "ADDED" => !was,
            "MODIFIED" | "DELETED" => was,
            _ => false,
        };
        if !ok {
            found.add(format!(
                "watch event {e:?} with the key {}",
                if was { "present" } else { "absent" }
            ));
        }
        present.insert(&e.key, e.kind != "DELETED");
        if e.kind != "DELETED" {
            if let Some(v) = e.value {
                if let Some(rv) = seen_values.insert(v, e.rv) {
                    found.add(format!("value {v} written twice: at {rv} and at {}", e.rv));
                }
            }
        }
    }
    let written: HashMap<u64, &Op> = history
        .iter()
        .filter_map(|o| match o.call {
            Call::Create(v) | Call::Update { value: v, .. } => Some((v, o)),
            _ => None,
        })
        .collect();
    for v in seen_values.keys() {
        if !written.contains_key(v) {
            found.add(format!("the watch shows value {v}, which nobody wrote"));
        }
    }
    let mut acked = 0;
    for o in history {
        let (v, rv) = match (o.call, o.outcome) {
            (Call::Create(v), Outcome::Created(rv))
            | (Call::Update { value: v, .. }, Outcome::Updated(rv)) => (v, rv),
            _ => continue,
        };
        acked += 1;
        if seen_values.get(&v) != Some(&rv) {
            found.add(format!("acknowledged write missing from the watch: {o}"));
        }
    }
    format!(
        "{} events ({} reopenings): in order, {acked} acknowledged writes all seen, none twice, none unwritten",
        log.events.len(),
        log.reopened
    )
}

fn main() {
    let a = args();
    if let Some(file) = &a.check {
        let text = std::fs::read_to_string(file)
            .unwrap_or_else(|e| usage(&format!("{}: {e}", file.display())));
        let history: Vec<Op> = serde_json::from_str(&text)
            .unwrap_or_else(|e| usage(&format!("{}: {e}", file.display())));
        let report = linearize::check(&history);
        println!("{report}");
        std::process::exit(if report.linearizable() { 0 } else { 1 });
    }
    let started = Instant::now();
    println!(
        "chaos: seed {}, {} masters, {} s of faults",
        a.seed,
        a.masters,
        a.run.as_secs()
    );
    assert!(
        std::path::Path::new(FAKETIME).exists(),
        "{FAKETIME} (Debian faketime) is required: ./task deps"
    );
    let mut c = Cluster::configure(
        ClusterOpts::new(BLOCK)
            .masters(a.masters)
            .workers(1)
            .proxy(true),
        |_| {},
    );
    let data_dirs = mount_data_dirs(&c);
    for id in c.node_ids() {
        if id == "w1" {
            let skew = [
                ("LD_PRELOAD", FAKETIME),
                ("FAKETIME", WORKER_SKEW),
                ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            ];
            c.start_node_env(&id, &skew);
        } else {
            c.start_node(&id);
        }
    }
    c.wait_one_active(RECOVERY);
    let proxy = c.proxy_url();
    let masters = c.master_ids();
    let clock = Clock(Instant::now());
    let mut found = Anomalies::default();

    // the pod that must run untouched
    let pod = sleep_pod("chaos-pod", NS, "w1", 4646);
    let r = http_timeout(
        "POST",
        &format!("{proxy}/api/v1/namespaces/{NS}/pods"),
        Some(&pod.to_string()),
        CALL_TIMEOUT,
    )
    .expect("create the pod");
    assert_eq!(r.status, 201, "create the pod: {}", r.body);
    let pod_pid = ballast_tests::wait_until("the pod running", RECOVERY, || {
        pod_processes(c.dir()).get("chaos-pod").copied()
    });

    // the watch, from the collection's version before the first call
    let list = http_timeout("GET", &collection(&proxy), None, CALL_TIMEOUT).expect("list");
    let rv0: u64 = list.json()["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .expect("the list's resourceVersion");
    let watch_log = Arc::new(Mutex::new(WatchLog::default()));
    thread::spawn({
        let (p, log) = (proxy.clone(), watch_log.clone());
        move || watch(p, rv0, log)
    });

    let stop = AtomicBool::new(false);
    let history = Mutex::new(Vec::new());
    let samples = Mutex::new(Vec::new());
    let master_urls: Vec<String> = masters.iter().map(|m| c.master_url(m)).collect();
    let mut faults: BTreeMap<Fault, usize> = BTreeMap::new();
    let mut rng = fastrand::Rng::with_seed(a.seed);
    thread::scope(|s| {
        for (i, url) in master_urls.iter().enumerate() {
            let (stop, samples) = (&stop, &samples);
            let url = format!("{url}/active");
            s.spawn(move || observe(i, url, clock, stop, samples));
        }
        for idx in 0..CLIENTS {
            let bases = if idx < DIRECT {
                master_urls.clone()
            } else {
                vec![proxy.clone()]
            };
            let (stop, history) = (&stop, &history);
            s.spawn(move || client(idx, bases, a.seed, clock, stop, history));
        }
        let until = Instant::now() + a.run;
        while Instant::now() < until {
            thread::sleep(Duration::from_millis(rng.u64(1000..4000)));
            for id in c.node_ids() {
                if !c.is_running(&id) {
                    found.add(format!("{id} died (not killed by the campaign)"));
                    if id != "w1" {
                        c.start_node(&id);
                    }
                }
            }
            let fault = FAULTS[rng.usize(..FAULTS.len())];
            let hold = Duration::from_millis(rng.u64(1000..5000));
            let t = clock.ns() as f64 / 1e9;
            let target = inject(&mut c, fault, hold, &mut rng);
            *faults.entry(fault).or_default() += 1;
            let healed = Instant::now();
            let recovered = recover(&c);
            println!(
                "{t:8.3} s  {fault:?} ({target}) for {:.1} s; recovered {:.1} s after healing",
                hold.as_secs_f64(),
                healed.elapsed().as_secs_f64()
            );
            if !recovered {
                found.add(format!(
                    "not recovered {RECOVERY:?} after healing {fault:?}"
                ));
                break;
            }
        }
        thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
    });

    // after healing: every node still running, a final read of every key
    for id in c.node_ids() {
        if !c.is_running(&id) {
            found.add(format!("{id} is not running at the end"));
        }
    }
    if !recover(&c) {
        found.add(format!("not recovered {RECOVERY:?} after the campaign"));
        println!("chaos: seed {}, {} anomalies", a.seed, found.0.len());
        report_failure(c, &history.into_inner().unwrap(), &data_dirs);
    }
    let mut history = history.into_inner().unwrap();
    let mut keys: Vec<String> = history.iter().map(|o| o.key.clone()).collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        let invoked = clock.ns();
        let outcome = ballast_tests::wait_until("a final read", RECOVERY, || {
            send(&proxy, &key, Call::Get).filter(|o| *o != Outcome::Unknown)
        });
        history.push(Op {
            client: CLIENTS,
            key,
            call: Call::Get,
            outcome,
            invoked,
            completed: Some(clock.ns()),
        });
    }
    // the watch caught up: a last write it must show
    let end = Op {
        client: CLIENTS,
        key: "chaos-end".into(),
        call: Call::Create(u64::MAX),
        outcome: Outcome::Unknown,
        invoked: clock.ns(),
        completed: None,
    };
    let outcome = send(&proxy, "chaos-end", end.call).unwrap_or(Outcome::Unknown);
    history.push(Op {
        outcome,
        completed: Some(clock.ns()),
        ..end
    });
    let caught_up = Instant::now();
    while !watch_log
        .lock()
        .unwrap()
        .events
        .iter()
        .any(|e| e.key == "chaos-end")
    {
        if caught_up.elapsed() > RECOVERY {
            found.add("the watch never showed the last write");
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }

    let count = |f: &dyn Fn(&Op) -> bool| history.iter().filter(|o| f(o)).count();
    println!(
        "ops: {} ({} through the proxy, {} straight to masters); acknowledged writes {}, failed as told {}, unknown {}",
        history.len(),
        count(&|o| o.client >= DIRECT),
        count(&|o| o.client < DIRECT),
        count(&|o| matches!(o.outcome, Outcome::Created(_) | Outcome::Updated(_) | Outcome::Deleted)),
        count(&|o| matches!(o.outcome, Outcome::Exists | Outcome::Conflict)
            || (o.call != Call::Get && o.outcome == Outcome::NotFound)),
        count(&|o| o.outcome == Outcome::Unknown),
    );
    println!(
        "faults: {}",
        faults
            .iter()
            .map(|(f, n)| format!("{f:?} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let t0 = Instant::now();
    let report = linearize::check(&history);
    println!(
        "linearizability: {report} (checked in {:.1} s)",
        t0.elapsed().as_secs_f64()
    );
    if !report.linearizable() {
        found.add("the history is not linearizable (above)");
    }
    println!(
        "watch: {}",
        check_watch(&watch_log.lock().unwrap(), &history, &mut found)
    );
    let samples = samples.into_inner().unwrap();
    println!(
        "observer: {}",
        check_observer(&samples, &masters, &mut found)
    );
    let pods = pod_processes(c.dir());
    if pods.get("chaos-pod") != Some(&pod_pid) || !ballast_tests::pid_alive(pod_pid) {
        found.add(format!(
            "the pod's process {pod_pid} did not run untouched: {pods:?}"
        ));
    } else {
        println!("pod: process {pod_pid} ran untouched");
    }
    println!(
        "chaos: seed {}, {} anomalies, {:.0} s in all",
        a.seed,
        found.0.len(),
        started.elapsed().as_secs_f64()
    );
    if !found.0.is_empty() {
        report_failure(c, &history, &data_dirs);
    }
    drop(c);
    unmount(&data_dirs);
}
