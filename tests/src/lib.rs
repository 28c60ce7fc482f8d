//! Test support: start real `ballast` processes, wait on conditions, inject faults.
//!
//! - [`Cluster`] writes a cluster config into a temporary directory (every address inside
//!   `127.K.0.0/16` for the test's own block `K`, so tests run in parallel), starts each node
//!   as a separate `ballast` process, and kills them all in `Drop` — also when the test
//!   panics, after printing the nodes' logs. Processes also get `PR_SET_PDEATHSIG`, so a
//!   test runner that dies takes them along.
//! - Faults: [`Cluster::kill`] (SIGKILL), [`Cluster::pause`] / [`Cluster::resume`]
//!   (SIGSTOP / SIGCONT), [`Cluster::terminate`] (SIGTERM and wait), restart, and
//!   [`Cluster::partition`] / [`Cluster::heal`] (nftables rules between node addresses).
//! - [`wait_until`] polls a condition with a generous deadline; tests never assert timings.
//! - [`UpProcess`] runs `ballast up` itself.
//!
//! Address blocks in use (one per test): 10 harness self-tests and `ballast up`,
//! 11–19 master tests, 21–29 proxy tests (and 39, the VIP on real interfaces: [`netns`]), 31–38 API tests, 41–49 worker tests, 50 the
//! in-process Raft group test (`master/src/raft/group_tests.rs`), 51–59 security tests,
//! 70–79 the benchmarks (`examples/bench_*.rs`).

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ballast_config::local::{local_cluster, to_toml, AddressPlan};
use ballast_config::ClusterConfig;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub use ballast_config;

/// The `ballast` binary under test: `$BALLAST_BIN`, else `target/<profile>/ballast` next to
/// the test executable (cargo and nextest build it with the workspace).
pub fn ballast_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BALLAST_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let bin = profile_dir.join("ballast");
    assert!(
        bin.exists(),
        "{} does not exist: build it first (cargo build --bin ballast) or set BALLAST_BIN",
        bin.display()
    );
    // `cargo test -p ballast-tests` does not rebuild the binary: refuse a stale one.
    let built = fs::metadata(&bin).and_then(|m| m.modified()).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if let Some(newer) = newest_source(&root).filter(|(t, _)| *t > built) {
        panic!(
            "{} is older than {}: run `cargo build --bin ballast` first",
            bin.display(),
            newer.1.display()
        );
    }
    bin
}

fn newest_source(root: &Path) -> Option<(std::time::SystemTime, PathBuf)> {
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    let mut stack: Vec<PathBuf> = ["src", "config/src", "master/src", "worker/src", "proxy/src"]
        .iter()
        .map(|d| root.join(d))
        .collect();
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().and_then(|s| s.to_str()) == Some("rs")
                && !p.to_string_lossy().ends_with("tests.rs")
            {
                if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                    if best.as_ref().is_none_or(|(b, _)| t > *b) {
                        best = Some((t, p));
                    }
                }
            }
        }
    }
    best
}

/// Which nodes a [`Cluster`] has.
#[derive(Debug, Clone)]
pub struct ClusterOpts {
    /// Second octet of every address: nodes live in `127.block.0.0/16`.
    pub block: u8,
    pub masters: usize,
    pub workers: usize,
    pub proxy: bool,
}

impl ClusterOpts {
    /// Three masters, no proxy, no workers, in `127.block.0.0/16`.
    pub fn new(block: u8) -> Self {
        Self {
            block,
            masters: 3,
            workers: 0,
            proxy: false,
        }
    }
    pub fn masters(mut self, n: usize) -> Self {
        self.masters = n;
        self
    }
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }
    pub fn proxy(mut self, on: bool) -> Self {
        self.proxy = on;
        self
    }
}

struct Proc {
    child: Child,
}

/// A set of real `ballast` processes sharing one config file in a temporary directory.
pub struct Cluster {
    dir: tempfile::TempDir,
    config_path: PathBuf,
    config: ClusterConfig,
    opts: ClusterOpts,
    procs: BTreeMap<String, Proc>,
    partitioned: bool,
    delayed: Option<delay::DelayedLinks>,
}

impl Cluster {
    /// Write the config (after `edit`) and start every node.
    pub fn start(opts: ClusterOpts, edit: impl FnOnce(&mut ClusterConfig)) -> Self {
        let mut c = Self::configure(opts, edit);
        for id in c.node_ids() {
            c.start_node(&id);
        }
        c
    }

    /// Write the config (after `edit`) without starting anything.
    pub fn configure(opts: ClusterOpts, edit: impl FnOnce(&mut ClusterConfig)) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("ballast-test-{}-", opts.block))
            .tempdir()
            .expect("temp dir");
        fs::create_dir_all(dir.path().join("logs")).unwrap();
        // A killed run of a test in this block may have left its cut or delay behind.
        if have("nft") {
            for table in [
                format!("ip ballast_{}", opts.block),
                format!("ip ballast_delay_{}", opts.block),
            ] {
                let listed = Command::new("nft")
                    .args(["list", "table"])
                    .args(table.split(' '))
                    .output();
                if listed.is_ok_and(|o| o.status.success()) {
                    nft(&format!("delete table {table}\n"));
                }
            }
        }
        let mut config = local_cluster(opts.masters, opts.workers, AddressPlan::block(opts.block));
        config.control.internal_kv = true;
        edit(&mut config);
        let config_path = dir.path().join("ballast.toml");
        fs::write(&config_path, to_toml(&config)).unwrap();
        let pki = dir.path().join("pki");
        test_pki().seed(&pki);
        ballast_config::pki::init(&pki, &config).expect("cluster certificates");
        Self {
            dir,
            config_path,
            config,
            opts,
            procs: BTreeMap::new(),
            partitioned: false,
            delayed: None,
        }
    }

    /// Every node id: masters, then `proxy` (when enabled), then workers.
    pub fn node_ids(&self) -> Vec<String> {
        let mut ids = self.master_ids();
        if self.opts.proxy {
            ids.push("proxy".into());
        }
        ids.extend(self.config.workers.iter().map(|w| w.id.clone()));
        ids
    }

    pub fn master_ids(&self) -> Vec<String> {
        self.config.masters.iter().map(|m| m.id.clone()).collect()
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The cluster's PKI directory (certificates of every node, issued by the test CA).
    pub fn pki_dir(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    /// A client presenting node `id`'s own certificate (`m1`, `w1`, `proxy`...).
    pub fn node_client(&self, id: &str) -> reqwest::blocking::Client {
        let (crt, key) = ballast_config::pki::identity_paths(&self.pki_dir(), id);
        let tls = ballast_config::tls::NodeTls::load(&crt, &key, &test_pki().ca()).unwrap();
        reqwest::blocking::Client::builder()
            .use_preconfigured_tls(tls.client_config().unwrap())
            .no_proxy()
            .pool_max_idle_per_host(0)
            .build()
            .expect("https client")
    }

    /// Change the config file (e.g. before a proxy reload).
    pub fn rewrite_config(&mut self, edit: impl FnOnce(&mut ClusterConfig)) {
        edit(&mut self.config);
        fs::write(&self.config_path, to_toml(&self.config)).unwrap();
    }

    pub fn master_api(&self, id: &str) -> SocketAddr {
        self.config.master(id).expect("master id").api
    }

    pub fn master_url(&self, id: &str) -> String {
        format!("https://{}", self.master_api(id))
    }

    pub fn proxy_api(&self) -> SocketAddr {
        self.config.proxy.api
    }

    pub fn proxy_url(&self) -> String {
        format!("https://{}", self.proxy_api())
    }

    pub fn proxy_dns(&self) -> SocketAddr {
        self.config.proxy.dns
    }

    pub fn proxy_admin(&self) -> SocketAddr {
        self.config.proxy.admin
    }

    pub fn worker_addr(&self, id: &str) -> SocketAddr {
        self.config.worker(id).expect("worker id").address
    }

    pub fn log_path(&self, id: &str) -> PathBuf {
        self.dir.path().join("logs").join(format!("{id}.log"))
    }

    /// The arguments that run node `id` (`master --config … --id m1`).
    pub fn args_for(&self, id: &str) -> Vec<String> {
        let cfg = self.config_path.display().to_string();
        if id == "proxy" {
            vec!["proxy".into(), "--config".into(), cfg]
        } else if self.config.master(id).is_some() {
            vec![
                "master".into(),
                "--config".into(),
                cfg,
                "--id".into(),
                id.into(),
            ]
        } else if self.config.worker(id).is_some() {
            vec![
                "worker".into(),
                "--config".into(),
                cfg,
                "--id".into(),
                id.into(),
            ]
        } else {
            panic!("unknown node id {id}")
        }
    }

    /// Start (or start again) one node; its output is appended to `logs/<id>.log`.
    pub fn start_node(&mut self, id: &str) {
        self.start_node_env(id, &[]);
    }

    /// [`Cluster::start_node`] with extra environment variables (e.g. libfaketime's).
    pub fn start_node_env(&mut self, id: &str, env: &[(&str, &str)]) {
        if self.is_running(id) {
            panic!("{id} is already running");
        }
        let mut cmd = self.node_command(id, &[]);
        cmd.envs(env.iter().copied());
        die_with_parent(&mut cmd);
        let child = cmd.spawn().expect("spawn ballast");
        self.procs.insert(id.to_string(), Proc { child });
    }

    /// Start a second process for node `id` with `extra` arguments (e.g. the proxy's
    /// `--upgrade`) while the first runs, and manage the new one from now on. Returns
    /// the first, for the caller to watch it stop.
    pub fn start_successor(&mut self, id: &str, extra: &[&str]) -> Child {
        let old = self.procs.remove(id).expect("the node runs");
        let mut cmd = self.node_command(id, extra);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().expect("spawn ballast");
        self.procs.insert(id.to_string(), Proc { child });
        old.child
    }

    /// The command that runs node `id` (plus `extra` arguments, e.g. `--hollow N`) in the
    /// cluster's directory, its output appended to `logs/<id>.log`. For processes a
    /// caller manages itself; [`Cluster::start_node`] uses it too.
    pub fn node_command(&self, id: &str, extra: &[&str]) -> Command {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(id))
            .unwrap();
        let mut cmd = Command::new(ballast_bin());
        cmd.args(self.args_for(id))
            .args(extra)
            .current_dir(self.dir.path())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        cmd
    }

    /// Whether the node's process is alive (reaps it when it exited).
    pub fn is_running(&mut self, id: &str) -> bool {
        match self.procs.get_mut(id) {
            None => false,
            Some(p) => match p.child.try_wait() {
                Ok(None) => true,
                _ => {
                    self.procs.remove(id);
                    false
                }
            },
        }
    }

    pub fn pid(&self, id: &str) -> Option<u32> {
        self.procs.get(id).map(|p| p.child.id())
    }

    /// Send a signal to a node.
    pub fn signal(&self, id: &str, sig: Signal) {
        let pid = self
            .pid(id)
            .unwrap_or_else(|| panic!("{id} is not running"));
        kill(Pid::from_raw(pid as i32), sig).expect("kill");
    }

    /// SIGKILL a node and reap it.
    pub fn kill(&mut self, id: &str) {
        if let Some(mut p) = self.procs.remove(id) {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    /// SIGSTOP: the process freezes, its sockets stay open.
    pub fn pause(&self, id: &str) {
        self.signal(id, Signal::SIGSTOP);
    }

    /// SIGCONT after [`Cluster::pause`].
    pub fn resume(&self, id: &str) {
        self.signal(id, Signal::SIGCONT);
    }

    /// SIGTERM a node and wait for it to exit (SIGKILL after `timeout`); returns its status
    /// and whether it stopped by itself.
    pub fn terminate(&mut self, id: &str, timeout: Duration) -> (ExitStatus, bool) {
        let mut p = self
            .procs
            .remove(id)
            .unwrap_or_else(|| panic!("{id} is not running"));
        let _ = kill(Pid::from_raw(p.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = p.child.try_wait().unwrap() {
                return (st, true);
            }
            if Instant::now() > deadline {
                let _ = p.child.kill();
                return (p.child.wait().unwrap(), false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kill (if running) and start a node again with its data.
    pub fn restart(&mut self, id: &str) {
        self.kill(id);
        self.start_node(id);
    }

    /// Delay every TCP connection between the nodes of `a` and those of `b`, both ways, by
    /// `delay` each way ([`delay::DelayedLinks`]: relays, as this kernel has no
    /// `sch_netem`); undone by [`Cluster::heal`]. One delay at a time.
    pub fn delay(&mut self, a: &[&str], b: &[&str], delay: Duration) {
        assert!(self.delayed.is_none(), "one delay at a time");
        let mut pairs = Vec::new();
        for x in a {
            for y in b.iter().filter(|y| *y != x) {
                for (from, to) in [(x, y), (y, x)] {
                    let src = self.node_ip(from);
                    for port in self.listening(to) {
                        pairs.push((src, port));
                    }
                }
            }
        }
        let relay_ip = std::net::Ipv4Addr::new(127, self.opts.block, 250, 1).into();
        self.delayed = Some(delay::DelayedLinks::start(
            &format!("ballast_delay_{}", self.opts.block),
            relay_ip,
            &pairs,
            delay,
        ));
    }

    fn node_ip(&self, id: &str) -> std::net::IpAddr {
        if id == "proxy" {
            self.proxy_api().ip()
        } else if self.config.master(id).is_some() {
            self.master_api(id).ip()
        } else {
            self.worker_addr(id).ip()
        }
    }

    /// The TCP addresses node `id` listens on.
    fn listening(&self, id: &str) -> Vec<SocketAddr> {
        if id == "proxy" {
            vec![self.proxy_api(), self.proxy_admin()]
        } else if let Some(m) = self.config.master(id) {
            vec![m.api, m.peer]
        } else {
            vec![self.worker_addr(id)]
        }
    }

    /// Cut the network between the nodes of `a` and those of `b` (both directions, every
    /// port), with an nftables table of this cluster's own (`ballast_<block>`). Node
    /// traffic leaves from each node's own address, so this is a real partition. Other
    /// traffic (the test's own requests from 127.0.0.1) still flows. Needs `nft`.
    pub fn partition(&mut self, a: &[&str], b: &[&str]) {
        self.cut(a, b, true, "drop");
    }

    /// Lose `percent` of the packets between the nodes of `a` and those of `b`, both
    /// ways (nftables `numgen random`: this machine's kernel has no `sch_netem`, so a
    /// lossy link is what it can make; not a delay).
    pub fn lossy(&mut self, a: &[&str], b: &[&str], percent: u8) {
        self.cut(
            a,
            b,
            true,
            &format!("numgen random mod 100 < {percent} drop"),
        );
    }

    /// Drop what the nodes of `from` send to those of `to`, and nothing the other way:
    /// a one-way cut (TCP then fails both ways, but only after the first lost segment).
    pub fn cut_one_way(&mut self, from: &[&str], to: &[&str]) {
        self.cut(from, to, false, "drop");
    }

    fn cut(&mut self, a: &[&str], b: &[&str], both_ways: bool, verdict: &str) {
        let table = format!("ballast_{}", self.opts.block);
        let ip = |id: &str| self.node_ip(id).to_string();
        let mut script = format!(
            "add table ip {table}\nadd chain ip {table} out {{ type filter hook output priority 0 ; }}\n"
        );
        for x in a {
            for y in b {
                let (x, y) = (ip(x), ip(y));
                script.push_str(&format!(
                    "add rule ip {table} out ip saddr {x} ip daddr {y} {verdict}\n"
                ));
                if both_ways {
                    script.push_str(&format!(
                        "add rule ip {table} out ip saddr {y} ip daddr {x} {verdict}\n"
                    ));
                }
            }
        }
        nft(&script);
        self.partitioned = true;
    }

    /// Keep the cluster's directory (configs, data, logs) when it is dropped; returns it.
    pub fn keep_dir(&mut self) -> PathBuf {
        self.dir.disable_cleanup(true);
        self.dir.path().to_path_buf()
    }

    /// Undo every [`Cluster::partition`], [`Cluster::cut_one_way`], [`Cluster::lossy`] and
    /// [`Cluster::delay`].
    pub fn heal(&mut self) {
        self.delayed = None;
        if self.partitioned {
            nft(&format!("delete table ip ballast_{}\n", self.opts.block));
            self.partitioned = false;
        }
    }

    /// The value of an unlabelled gauge or counter on one master's `/metrics`.
    pub fn master_gauge(&self, id: &str, name: &str) -> Option<u64> {
        let url = format!("{}/metrics", self.master_url(id));
        let r = http_timeout("GET", &url, None, Duration::from_secs(5)).ok()?;
        r.body
            .lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| v as u64)
    }

    /// The masters whose `/active` currently reports `"active":true`, with their terms.
    pub fn active_masters(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for id in self.master_ids() {
            let url = format!("{}/active", self.master_url(&id));
            if let Ok(r) = http_timeout("GET", &url, None, Duration::from_millis(500)) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&r.body) {
                    if v["active"] == serde_json::Value::Bool(true) {
                        out.push((id.clone(), v["term"].as_u64().unwrap_or(0)));
                    }
                }
            }
        }
        out
    }

    /// Wait until exactly one master reports active; returns its id and term.
    pub fn wait_one_active(&self, timeout: Duration) -> (String, u64) {
        wait_until("exactly one active master", timeout, || {
            let a = self.active_masters();
            (a.len() == 1).then(|| a[0].clone())
        })
    }

    /// The last `lines` lines of every node's log.
    pub fn logs(&self, lines: usize) -> String {
        let mut out = String::new();
        let mut ids = self.node_ids();
        ids.sort();
        for id in ids {
            let text = fs::read_to_string(self.log_path(&id)).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            out.push_str(&format!(
                "----- {id} (last {} lines) -----\n",
                all.len() - start
            ));
            for l in &all[start..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "test failed; node logs from {}:\n{}",
                self.dir.path().display(),
                self.logs(80)
            );
        }
        self.heal();
        // Workers first; their pods deliberately outlive a killed worker, so stop the
        // pods' process groups from the workers' state files next.
        let workers: Vec<String> = self.config.workers.iter().map(|w| w.id.clone()).collect();
        for w in &workers {
            self.kill(w);
        }
        for pid in pod_processes(self.dir.path()).into_values() {
            let _ = kill(Pid::from_raw(-(pid as i32)), Signal::SIGKILL);
        }
        for p in self.procs.values_mut() {
            let _ = kill(Pid::from_raw(p.child.id() as i32), Signal::SIGCONT);
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        if std::env::var_os("BALLAST_KEEP_TEST_DIR").is_some() {
            let path = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap()).keep();
            eprintln!("kept {}", path.display());
        }
    }
}

/// A Pod bound to `node` whose one container sleeps `secs` seconds (the workers run
/// processes: the image is not pulled).
pub fn sleep_pod(name: &str, namespace: &str, node: &str, secs: u32) -> serde_json::Value {
    serde_json::json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "busybox",
            "command": ["sleep", secs.to_string()]}]}})
}

impl Cluster {
    /// `/internal/kv/KEY` read through the proxy, once an answer is not 503 (a failover
    /// in progress), within a minute.
    pub fn read_kv(&self, key: &str) -> Response {
        let url = format!("{}/internal/kv/{key}", self.proxy_url());
        wait_until("a read", Duration::from_secs(60), || {
            http("GET", &url, None).ok().filter(|r| r.status != 503)
        })
    }
}

/// Pod name → container pid, from the worker state files (`state.json`) in `dir` and its
/// subdirectories (each worker's data dir).
pub fn pod_processes(dir: &Path) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    let subdirs = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    for d in std::iter::once(dir.to_path_buf()).chain(subdirs) {
        let Ok(text) = fs::read_to_string(d.join("state.json")) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        for rec in v["pods"].as_object().into_iter().flat_map(|m| m.values()) {
            let name = rec["pod"]["metadata"]["name"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let containers = rec["containers"]
                .as_object()
                .into_iter()
                .flat_map(|m| m.values());
            for c in containers {
                if let Some(pid) = c["pid"].as_u64() {
                    out.insert(name.clone(), pid as u32);
                }
            }
        }
    }
    out
}

/// Run an nftables script (`nft -f -`), panicking on failure.
fn nft(script: &str) {
    nft_in(None, script);
}

/// Run an nftables script in network namespace `ns` (or the test's own), panicking on
/// failure.
pub(crate) fn nft_in(ns: Option<&str>, script: &str) {
    use std::io::Write as _;
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "nft"]);
            c
        }
        None => Command::new("nft"),
    };
    let mut child = cmd
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nft (Debian nftables) is needed for partitions: run ./task deps");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nft{} failed: {}\n{script}",
        ns.map(|n| format!(" in {n}")).unwrap_or_default(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Arrange for a child to get SIGKILL if the test process dies.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Spawn a helper program (e.g. a load balancer a benchmark compares with) that gets SIGKILL
/// when this process dies, like the nodes of a [`Cluster`].
pub fn spawn_tied(cmd: &mut Command) -> std::io::Result<Child> {
    die_with_parent(cmd);
    cmd.spawn()
}

/// Poll `f` every 25 ms until it returns `Some`, or panic naming `what` after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// The test process's PKI: one CA that every cluster the process starts is seeded with
/// ([`TestPki::seed`]), so one client ([`http`], as `admin`) works for all of them.
pub struct TestPki {
    dir: PathBuf,
    ca: ballast_config::pki::CertAuthority,
}

/// The process's [`TestPki`] (made on first use, in a temporary directory).
pub fn test_pki() -> &'static TestPki {
    static PKI: OnceLock<TestPki> = OnceLock::new();
    PKI.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("ballast-test-pki-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let (ca, _) =
            ballast_config::pki::CertAuthority::load_or_create(&dir, "test").expect("test CA");
        let admin = ballast_config::pki::IdentitySpec::client(
            "admin",
            "admin",
            &[ballast_config::pki::SUPERUSER_GROUP],
        );
        ca.issue_into(&dir, &admin).expect("admin certificate");
        TestPki { dir, ca }
    })
}

impl TestPki {
    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// Copy the CA (certificate and key) into a cluster's PKI directory before its
    /// certificates are made, so they are issued by it.
    pub fn seed(&self, pki_dir: &Path) {
        fs::create_dir_all(pki_dir).unwrap();
        for f in ["ca.crt", "ca.key"] {
            fs::copy(self.dir.join(f), pki_dir.join(f)).unwrap();
        }
    }

    /// The certificate and key of a client identity `name` (user, groups), issued once.
    pub fn user(&self, name: &str, user: &str, groups: &[&str]) -> (PathBuf, PathBuf) {
        let spec = ballast_config::pki::IdentitySpec::client(name, user, groups);
        self.ca
            .issue_into(&self.dir, &spec)
            .expect("user certificate");
        ballast_config::pki::identity_paths(&self.dir, name)
    }

    /// A client builder presenting identity `name` (see [`TestPki::user`]).
    pub fn builder_as(
        &self,
        name: &str,
        user: &str,
        groups: &[&str],
    ) -> reqwest::blocking::ClientBuilder {
        let (crt, key) = self.user(name, user, groups);
        let tls = ballast_config::tls::NodeTls::load(&crt, &key, &self.ca()).unwrap();
        reqwest::blocking::Client::builder()
            .use_preconfigured_tls(tls.client_config().unwrap())
            .no_proxy()
    }

    /// A blocking client presenting identity `name` (see [`TestPki::user`]).
    pub fn client_as(&self, name: &str, user: &str, groups: &[&str]) -> reqwest::blocking::Client {
        self.builder_as(name, user, groups)
            .pool_max_idle_per_host(0)
            .build()
            .expect("https client")
    }

    /// A client builder presenting `admin` (group `system:masters`).
    pub fn admin_builder(&self) -> reqwest::blocking::ClientBuilder {
        self.builder_as("admin", "admin", &[ballast_config::pki::SUPERUSER_GROUP])
    }

    /// Like [`TestPki::admin_builder`], but the server must prove `name` whatever address
    /// is dialed (a front that passes TLS through to a master: `api.ballast.local`).
    pub fn admin_builder_for_name(&self, name: &str) -> reqwest::blocking::ClientBuilder {
        let (crt, key) = self.user("admin", "admin", &[ballast_config::pki::SUPERUSER_GROUP]);
        let tls = ballast_config::tls::NodeTls::load(&crt, &key, &self.ca()).unwrap();
        reqwest::blocking::Client::builder()
            .use_preconfigured_tls(tls.client_config_for_name(name).unwrap())
            .no_proxy()
    }

    /// Issue a serving identity (certificate and key in this PKI's directory) for a
    /// program beside the cluster, e.g. a HAProxy on `ips`.
    pub fn server(
        &self,
        name: &str,
        user: &str,
        groups: &[&str],
        ips: &[std::net::IpAddr],
    ) -> (PathBuf, PathBuf) {
        let mut spec = ballast_config::pki::IdentitySpec::client(name, user, groups);
        spec.ips = ips.to_vec();
        self.ca
            .issue_into(&self.dir, &spec)
            .expect("server certificate");
        ballast_config::pki::identity_paths(&self.dir, name)
    }

    /// A blocking client without a certificate (it still trusts the CA).
    pub fn anonymous_client(&self) -> reqwest::blocking::Client {
        let config = ballast_config::tls::anonymous_client_config(&self.ca()).unwrap();
        reqwest::blocking::Client::builder()
            .use_preconfigured_tls(config)
            .no_proxy()
            .pool_max_idle_per_host(0)
            .build()
            .expect("https client")
    }
}

/// The client of [`http`]: `admin` (group `system:masters`) of the test CA.
pub fn client() -> &'static reqwest::blocking::Client {
    static CLIENT: OnceLock<reqwest::blocking::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        test_pki().client_as("admin", "admin", &[ballast_config::pki::SUPERUSER_GROUP])
    })
}

/// One request with `client` and a 10 s timeout, answered in full.
pub fn request(
    client: &reqwest::blocking::Client,
    method: &str,
    url: &str,
    body: Option<&str>,
) -> reqwest::Result<Response> {
    request_timeout(client, method, url, body, Duration::from_secs(10))
}

fn request_timeout(
    client: &reqwest::blocking::Client,
    method: &str,
    url: &str,
    body: Option<&str>,
    timeout: Duration,
) -> reqwest::Result<Response> {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut req = client.request(method, url).timeout(timeout);
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let r = req.send()?;
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.text()?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// One HTTP request with a 10 s timeout.
pub fn http(method: &str, url: &str, body: Option<&str>) -> reqwest::Result<Response> {
    http_timeout(method, url, body, Duration::from_secs(10))
}

/// One HTTP request with the given timeout.
pub fn http_timeout(
    method: &str,
    url: &str,
    body: Option<&str>,
    timeout: Duration,
) -> reqwest::Result<Response> {
    request_timeout(client(), method, url, body, timeout)
}

/// Send `bytes` over a TLS connection to `addr` (an anonymous client of the test CA) and
/// read the whole answer (10 s at most): for malformed HTTP that no client library sends.
pub fn raw_tls(addr: SocketAddr, bytes: &[u8]) -> String {
    use std::io::{Read, Write};
    let config = ballast_config::tls::anonymous_client_config(&test_pki().ca()).unwrap();
    let name = rustls::pki_types::ServerName::from(addr.ip());
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let _ = tls.write_all(bytes);
    let _ = tls.flush();
    let mut buf = Vec::new();
    let _ = tls.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// GET and return the status, or 0 when the request failed.
pub fn status_of(url: &str) -> u16 {
    http_timeout("GET", url, None, Duration::from_secs(2))
        .map(|r| r.status)
        .unwrap_or(0)
}

/// Run a command and capture its output (for dig, kubectl, promtool...).
pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Fail (never skip) when a program a test needs is missing: `./task deps` installs them.
pub fn require(program: &str) {
    assert!(
        have(program),
        "{program} is required and not installed: run ./task deps (the README's test command does)"
    );
}

/// Whether a program is on PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// `ballast up` as a process, stopped (SIGTERM, then SIGKILL of it and of every child it
/// recorded in a pidfile) on drop.
pub struct UpProcess {
    pub dir: PathBuf,
    child: Option<Child>,
    pub output: PathBuf,
}

impl UpProcess {
    /// Start `ballast up --dir DIR ARGS...`; stdout and stderr go to `DIR.out`. A new
    /// DIR is seeded with the test CA (`up` keeps a CA it finds and issues the rest), so
    /// [`http`] works against it.
    pub fn start(dir: &Path, args: &[&str]) -> Self {
        fs::create_dir_all(dir).unwrap();
        if !dir.join("pki").exists() {
            test_pki().seed(&dir.join("pki"));
        }
        let output = dir.with_extension("out");
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&output)
            .unwrap();
        let mut cmd = Command::new(ballast_bin());
        cmd.arg("up")
            .arg("--dir")
            .arg(dir)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().expect("spawn ballast up");
        Self {
            dir: dir.to_path_buf(),
            child: Some(child),
            output,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The pids `up` recorded for its children.
    pub fn child_pids(&self) -> BTreeMap<String, u32> {
        let mut out = BTreeMap::new();
        for e in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.extension().and_then(|s| s.to_str()) == Some("pid") {
                if let Ok(pid) = fs::read_to_string(&p).unwrap_or_default().trim().parse() {
                    out.insert(p.file_stem().unwrap().to_string_lossy().to_string(), pid);
                }
            }
        }
        out
    }

    pub fn output_text(&self) -> String {
        fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// Send a signal to `up` itself.
    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid() as i32), sig).unwrap();
    }

    /// Wait for `up` to exit.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .map(|rest| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

impl Drop for UpProcess {
    fn drop(&mut self) {
        let pids = self.child_pids();
        if let Some(mut child) = self.child.take() {
            if std::thread::panicking() {
                eprintln!("ballast up output:\n{}", self.output_text());
            }
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for pid in pids.values() {
            let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
    }
}

/// A real kubectl binary, pointed at a cluster's proxy through its own kubeconfig and an
/// empty HOME (no shared discovery cache).
pub struct Kubectl {
    pub bin: PathBuf,
    pub version: &'static str,
    kubeconfig: PathBuf,
    home: PathBuf,
}

impl Kubectl {
    /// kubectl `version` ("1.20" or "1.33") for `server` (e.g. the proxy URL); the binaries
    /// come from `$BALLAST_KUBECTL_120` / `$BALLAST_KUBECTL_133` (set by `./task`).
    pub fn new(version: &'static str, server: &str, dir: &Path) -> Self {
        let var = match version {
            "1.20" => "BALLAST_KUBECTL_120",
            "1.33" => "BALLAST_KUBECTL_133",
            v => panic!("no kubectl {v} configured"),
        };
        let bin = std::env::var_os(var)
            .map(PathBuf::from)
            .or_else(|| {
                let fallback = match version {
                    "1.20" => "/var/tmp/ballast-tools/k120/usr/bin/kubectl",
                    _ => "/usr/lib/google-cloud-sdk/bin/kubectl.1.33",
                };
                Path::new(fallback)
                    .exists()
                    .then(|| PathBuf::from(fallback))
            })
            .unwrap_or_else(|| panic!("kubectl {version} not found: set {var} or run ./task deps"));
        assert!(
            bin.exists(),
            "{} does not exist (run ./task deps)",
            bin.display()
        );
        let out = Command::new(&bin)
            .args(["version", "--client"])
            .env("HOME", dir)
            .output()
            .expect("kubectl version --client");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("v{version}.")),
            "{} is not kubectl {version}: {text}",
            bin.display()
        );
        let mut k = Self {
            bin,
            version,
            kubeconfig: PathBuf::new(),
            home: PathBuf::new(),
        };
        k.set_user(
            server,
            dir,
            "admin",
            "admin",
            &[ballast_config::pki::SUPERUSER_GROUP],
        );
        k
    }

    /// The same kubectl acting as `user` in `groups` (a client certificate of the test CA).
    pub fn as_user(&self, server: &str, dir: &Path, user: &str, groups: &[&str]) -> Self {
        let mut k = Self {
            bin: self.bin.clone(),
            version: self.version,
            kubeconfig: PathBuf::new(),
            home: PathBuf::new(),
        };
        k.set_user(server, dir, user, user, groups);
        k
    }

    fn set_user(&mut self, server: &str, dir: &Path, name: &str, user: &str, groups: &[&str]) {
        let pki = test_pki();
        let (crt, key) = pki.user(name, user, groups);
        let home = dir.join(format!("kubectl-home-{}-{name}", self.version));
        fs::create_dir_all(&home).unwrap();
        let kubeconfig = home.join("kubeconfig");
        fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
                 users:\n- name: u\n  user:\n    client-certificate: {crt}\n    client-key: {key}\n\
                 contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n    namespace: default\ncurrent-context: c\n",
                ca = pki.ca().display(),
                crt = crt.display(),
                key = key.display(),
            ),
        )
        .unwrap();
        self.kubeconfig = kubeconfig;
        self.home = home;
    }

    /// The kubeconfig it uses.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The kubectl's own HOME (a scratch directory for the test).
    pub fn home_dir(&self) -> &Path {
        &self.home
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", &self.home)
            .env_remove("KUBERNETES_SERVICE_HOST");
        cmd
    }

    /// Run kubectl with `args`; returns the output whatever the exit code.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()))
    }

    /// Start kubectl (e.g. `get -w`) with its stdout going to `out`; the caller kills it.
    pub fn spawn(&self, args: &[&str], out: &Path) -> Child {
        let f = fs::File::create(out).unwrap();
        let mut cmd = self.command(args);
        cmd.stdin(Stdio::null()).stdout(f).stderr(Stdio::null());
        die_with_parent(&mut cmd);
        cmd.spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()))
    }

    /// Run kubectl with `input` on its stdin.
    pub fn run_stdin(&self, args: &[&str], input: &str) -> Output {
        use std::io::Write as _;
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(input.as_bytes()).unwrap();
        drop(stdin);
        child.wait_with_output().unwrap()
    }

    fn require(&self, args: &[&str], out: Output) -> String {
        assert!(
            out.status.success(),
            "kubectl {} {:?} failed: {}{}",
            self.version,
            args,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Run and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        self.require(args, self.run(args))
    }

    /// Run with stdin and require success; returns stdout.
    pub fn ok_stdin(&self, args: &[&str], input: &str) -> String {
        self.require(args, self.run_stdin(args, input))
    }
}

/// Helpers the benchmark programs (`tests/examples/bench_*.rs`) share.
pub mod delay;
pub mod linearize;
pub mod netns;

pub mod bench {
    use std::str::FromStr;
    use std::time::Duration;

    /// `$name` parsed, or `default` when unset or unparsable.
    pub fn env_or<T: FromStr>(name: &str, default: T) -> T {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    /// A blocking HTTPS client for load loops, as `admin` of the test CA: no proxy,
    /// `TCP_NODELAY`, `timeout` per request.
    pub fn client(timeout: Duration) -> reqwest::blocking::Client {
        super::test_pki()
            .admin_builder()
            .tcp_nodelay(true)
            .timeout(timeout)
            .build()
            .expect("http client")
    }

    /// The samples in milliseconds, sorted (for [`rank`]).
    pub fn sorted_millis(samples: &[Duration]) -> Vec<f64> {
        let mut v: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v
    }

    /// `min / p50 / p99 / max` (nearest rank) of sorted milliseconds, or "no samples".
    pub fn min_p50_p99_max(sorted: &[f64]) -> String {
        if sorted.is_empty() {
            return "no samples".into();
        }
        format!(
            "min {:7.1}  p50 {:7.1}  p99 {:7.1}  max {:7.1}  ms",
            sorted[0],
            rank(sorted, 0.5),
            rank(sorted, 0.99),
            sorted[sorted.len() - 1]
        )
    }

    /// A process's resident memory in KiB (`VmRSS` of `/proc/PID/status`).
    pub fn rss_kib(pid: u32) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    /// Nearest-rank percentile `p` (0..=1) of sorted, non-empty samples.
    pub fn rank(sorted: &[f64], p: f64) -> f64 {
        sorted[((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
    }
}
