//! `ballast up`: a whole local HA cluster on loopback, in the foreground.
//!
//! Writes `DIR/ballast.toml` (once; a later run keeps it and the data), `DIR/kubeconfig`,
//! `DIR/<id>.pid`, `DIR/logs/<id>.log`, and starts every node as a child process of this
//! same binary. A child that exits is reported, never restarted (failover must stay
//! observable). SIGINT/SIGTERM stop every child: SIGTERM, then SIGKILL after a grace.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use ballast_config::local::{local_cluster, to_toml, with_proxies, AddressPlan};
use ballast_config::ClusterConfig;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::LogFormat;

/// Arguments of `ballast up`.
#[derive(clap::Args, Debug)]
pub(crate) struct UpArgs {
    /// Directory holding the cluster's config, kubeconfig, pidfiles, logs and data.
    #[arg(long, default_value = "./ballast-data")]
    dir: PathBuf,
    /// Number of masters (keep it odd). Only used when DIR has no config yet.
    #[arg(long, default_value_t = 3)]
    masters: usize,
    /// Number of workers. Only used when DIR has no config yet.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Number of proxies. With more than one, proxies p1..pN run on 127.0.3.I and share
    /// the VIP 127.0.0.1 (the one proxy's address), which exactly one of them serves.
    /// Only used when DIR has no config yet.
    #[arg(long, default_value_t = 1)]
    proxies: usize,
    /// Put every node in 127.K.0.0/16 instead of the default addresses (127.0.1.x masters,
    /// 127.0.0.1 proxy, 127.0.2.x workers), e.g. to run two clusters side by side.
    #[arg(long, value_name = "K")]
    address_block: Option<u8>,
    /// Seconds each child gets to stop after SIGTERM before SIGKILL.
    #[arg(long, default_value_t = 10)]
    grace: u64,
}

struct Node {
    id: String,
    args: Vec<String>,
    child: Option<Child>,
}

pub(crate) fn run(args: UpArgs, log_format: LogFormat) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(run_async(args, log_format))
}

async fn run_async(args: UpArgs, log_format: LogFormat) -> anyhow::Result<()> {
    let dir = args.dir.clone();
    fs::create_dir_all(dir.join("logs"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))?;
    let lock = lock_dir(&dir)?;
    let config_path = dir.join("ballast.toml");
    let config = load_or_write_config(&args, &config_path)?;
    check_addresses_free(&config)?;
    write_pki_and_kubeconfig(&dir, &config_path, &config)?;

    let exe = std::env::current_exe().context("cannot find the ballast binary")?;
    let mut nodes = nodes_of(&config, &config_path.display().to_string());
    for node in &mut nodes {
        node.child = Some(spawn(node, &exe, &dir, log_format)?);
    }
    print_summary(&dir, &config);
    supervise(&dir, &mut nodes).await?;
    stop_all(&dir, &mut nodes, Duration::from_secs(args.grace)).await;
    drop(lock);
    remove_if_there(&dir.join(LOCK_FILE));
    eprintln!("cluster stopped");
    Ok(())
}

const LOCK_FILE: &str = "ballast.lock";

/// One running cluster per DIR: an exclusive lock on `DIR/ballast.lock`, which names
/// the `ballast up` holding it.
fn lock_dir(dir: &Path) -> anyhow::Result<Flock<fs::File>> {
    let lock_path = dir.join(LOCK_FILE);
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    let mut lock = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((_, _)) => {
            let holder = fs::read_to_string(&lock_path).unwrap_or_default();
            bail!(
                "{} is in use by a running cluster (ballast up pid {}); stop it first or use another --dir",
                dir.display(),
                holder.trim()
            );
        }
    };
    lock.set_len(0)?;
    writeln!(&mut *lock, "{}", std::process::id())?;
    Ok(lock)
}

/// The config DIR already has (the sizing flags then do nothing, and say so), or a new
/// one of the asked size, validated exactly as a child will read it, then written.
fn load_or_write_config(args: &UpArgs, config_path: &Path) -> anyhow::Result<ClusterConfig> {
    if config_path.exists() {
        let loaded = ballast_config::load(config_path)?;
        if args.masters != 3
            || args.workers != 2
            || args.proxies != 1
            || args.address_block.is_some()
        {
            eprintln!(
                "note: {} exists; using it as is (--masters/--workers/--proxies/--address-block only apply to a new DIR)",
                config_path.display()
            );
        }
        return Ok(loaded.config);
    }
    if args.masters == 0 {
        bail!("--masters must be at least 1");
    }
    if args.masters > 254 || args.workers > 254 || args.proxies > 254 {
        bail!("at most 254 masters, 254 workers and 254 proxies fit in an address block");
    }
    if args.proxies == 0 {
        bail!("--proxies must be at least 1");
    }
    let plan = args
        .address_block
        .map(AddressPlan::block)
        .unwrap_or_default();
    let mut c = local_cluster(args.masters, args.workers, plan);
    if args.proxies > 1 {
        with_proxies(&mut c, args.proxies, plan);
    }
    let text = to_toml(&c);
    ballast_config::parse_str(config_path, &text)?;
    fs::write(config_path, text)
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    Ok(c)
}

/// The PKI and the kubeconfig: made once, kept by later runs (new nodes get theirs).
fn write_pki_and_kubeconfig(
    dir: &Path,
    config_path: &Path,
    config: &ClusterConfig,
) -> anyhow::Result<()> {
    let pki_dir = ballast_config::load(config_path)?.pki_dir();
    let report = ballast_config::pki::init(&pki_dir, config)?;
    if !report.issued.is_empty() {
        eprintln!(
            "{}: certificates for {}",
            pki_dir.display(),
            report.issued.join(", ")
        );
    }
    let server = format!("https://{}", config.proxy.api);
    let text = ballast_config::pki::kubeconfig(&pki_dir, "admin", &config.cluster.name, &server)?;
    ballast_config::pki::write_kubeconfig(&dir.join("kubeconfig"), &text)?;
    Ok(())
}

/// Every node of the config, in start order: masters, proxies, workers.
fn nodes_of(config: &ClusterConfig, cfg: &str) -> Vec<Node> {
    let node = |role: &str, id: &str, with_id: bool| {
        let mut args = vec![role.to_string(), "--config".into(), cfg.to_string()];
        if with_id {
            args.extend(["--id".to_string(), id.to_string()]);
        }
        Node {
            id: id.to_string(),
            args,
            child: None,
        }
    };
    let mut nodes: Vec<Node> = Vec::new();
    nodes.extend(config.masters.iter().map(|m| node("master", &m.id, true)));
    if config.proxies.is_empty() {
        nodes.push(node("proxy", "proxy", false));
    }
    nodes.extend(config.proxies.iter().map(|p| node("proxy", &p.id, true)));
    nodes.extend(config.workers.iter().map(|w| node("worker", &w.id, true)));
    nodes
}

/// Start one node with its output appended to `DIR/logs/<id>.log` and its pid in
/// `DIR/<id>.pid`.
fn spawn(node: &Node, exe: &Path, dir: &Path, log_format: LogFormat) -> anyhow::Result<Child> {
    let log_path = dir.join("logs").join(format!("{}.log", node.id));
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let fmt = match log_format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    };
    let mut cmd = Command::new(exe);
    cmd.args(&node.args)
        .arg("--log-format")
        .arg(fmt)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Own process group: a terminal's Ctrl-C reaches only `up`, which then stops
        // the children in order.
        .process_group(0)
        .kill_on_drop(true);
    die_with_parent(&mut cmd);
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", node.id))?;
    if let Some(pid) = child.id() {
        fs::write(pidfile(dir, &node.id), format!("{pid}\n"))?;
    }
    Ok(child)
}

fn pidfile(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.pid"))
}

/// Remove a file `up` wrote; one already gone is fine, any other failure is reported.
fn remove_if_there(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("cannot remove {}: {e}", path.display());
        }
    }
}

/// Report children that exit (never restarting them) until SIGTERM or SIGINT.
async fn supervise(dir: &Path, nodes: &mut [Node]) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = term.recv() => { eprintln!("SIGTERM: stopping the cluster"); return Ok(()); }
            _ = int.recv() => { eprintln!("interrupt: stopping the cluster"); return Ok(()); }
            _ = tick.tick() => {
                for node in nodes.iter_mut() {
                    let Some(child) = node.child.as_mut() else { continue };
                    if let Ok(Some(status)) = child.try_wait() {
                        eprintln!(
                            "{} exited ({status}); see {}/logs/{}.log. Not restarted: restart it with `ballast {}`",
                            node.id, dir.display(), node.id, node.args.join(" ")
                        );
                        remove_if_there(&pidfile(dir, &node.id));
                        node.child = None;
                    }
                }
            }
        }
    }
}

/// Ask every child to stop, then kill those still running after `grace`.
async fn stop_all(dir: &Path, nodes: &mut [Node], grace: Duration) {
    // Workers first (so they do not log errors about the masters going away), then the
    // proxy, then the masters.
    for node in nodes.iter().rev() {
        if let Some(pid) = node.child.as_ref().and_then(Child::id) {
            // A child that has just exited by itself is reaped below.
            if let Err(e) = kill(Pid::from_raw(pid as i32), Signal::SIGTERM) {
                eprintln!("cannot signal {} (pid {pid}): {e}", node.id);
            }
        }
    }
    let deadline = tokio::time::Instant::now() + grace;
    for node in nodes.iter_mut() {
        let Some(mut child) = node.child.take() else {
            continue;
        };
        if tokio::time::timeout_at(deadline, child.wait())
            .await
            .is_err()
        {
            eprintln!("{} did not stop within {grace:?}: killing it", node.id);
            if let Err(e) = child.kill().await {
                eprintln!("cannot kill {}: {e}", node.id);
            }
        }
        remove_if_there(&pidfile(dir, &node.id));
    }
}

/// Arrange for a child to get SIGKILL if `up` itself dies (even by kill -9), so no node
/// outlives the cluster it belongs to.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (prctl, getppid).
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may already be gone between fork and prctl.
            if libc::getppid() == 1 {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Refuse to start when any address the cluster needs is taken.
fn check_addresses_free(c: &ClusterConfig) -> anyhow::Result<()> {
    let mut tcp: Vec<(String, SocketAddr)> = Vec::new();
    for m in &c.masters {
        tcp.push((format!("master {} api", m.id), m.api));
        tcp.push((format!("master {} peer", m.id), m.peer));
    }
    tcp.push(("proxy api".into(), c.proxy.api));
    tcp.push(("proxy admin".into(), c.proxy.admin));
    tcp.push(("proxy dns (tcp)".into(), c.proxy.dns));
    for p in &c.proxies {
        tcp.push((format!("proxy {} api", p.id), p.api));
        tcp.push((format!("proxy {} admin", p.id), p.admin));
        tcp.push((format!("proxy {} dns (tcp)", p.id), p.dns));
    }
    for w in &c.workers {
        tcp.push((format!("worker {}", w.id), w.address));
    }
    for (what, addr) in tcp {
        if let Err(e) = std::net::TcpListener::bind(addr) {
            bail!("{what} address {addr} is busy ({e}); is another cluster or program running there? Stop it or use --address-block");
        }
    }
    if let Err(e) = std::net::UdpSocket::bind(c.proxy.dns) {
        bail!(
            "proxy dns (udp) address {} is busy ({e}); is another cluster or program running there?",
            c.proxy.dns
        );
    }
    Ok(())
}

fn print_summary(dir: &Path, c: &ClusterConfig) {
    let masters: Vec<String> = c
        .masters
        .iter()
        .map(|m| format!("{}={}", m.id, m.api))
        .collect();
    let workers: Vec<String> = c
        .workers
        .iter()
        .map(|w| format!("{}={}", w.id, w.address))
        .collect();
    println!(
        "ballast: cluster `{}` starting in {}",
        c.cluster.name,
        dir.display()
    );
    println!("  API (proxy):   https://{}", c.proxy.api);
    println!(
        "  DNS:           {} (udp+tcp), zone {}  e.g. dig @{} -p {} api.{}",
        c.proxy.dns,
        c.proxy.dns_zone,
        c.proxy.dns.ip(),
        c.proxy.dns.port(),
        c.proxy.dns_zone
    );
    println!(
        "  metrics:       http://{}/metrics   status: http://{}/status",
        c.proxy.admin, c.proxy.admin
    );
    if !c.proxies.is_empty() {
        let proxies: Vec<String> = c
            .proxies
            .iter()
            .map(|p| format!("{}={}", p.id, p.api))
            .collect();
        println!(
            "  proxies:       {} (one of them holds the VIP {} and serves the addresses above)",
            proxies.join(" "),
            c.proxy.api.ip()
        );
    }
    println!("  masters:       {}", masters.join(" "));
    println!("  workers:       {}", workers.join(" "));
    println!(
        "  kubeconfig:    export KUBECONFIG={}/kubeconfig",
        dir.display()
    );
    println!("  logs:          {}/logs/", dir.display());
    println!(
        "  certificates:  {}/pki/ (ca.crt; admin.crt is the kubeconfig's user)",
        dir.display()
    );
    println!("Ctrl-C stops the cluster.");
}
