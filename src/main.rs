//! `ballast`: the one binary. A thin command-line front that dispatches to the
//! library crates (`ballast-master`, `ballast-proxy`, `ballast-worker`) and runs
//! `ballast up`, a whole local HA cluster as child processes.

mod detach;
mod pki;
mod up;

/// mimalloc instead of glibc malloc: the proxy and the API allocate per request, and glibc's
/// malloc showed up as ~12 % of the proxy's profile under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "ballast",
    version,
    about = "Highly-available control plane: replicated masters, a failover-hiding proxy and DNS responder, workers",
    long_about = None
)]
struct Cli {
    /// Log format on stderr. The level comes from RUST_LOG (default `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a whole local HA cluster on loopback, in the foreground: N masters, the proxy,
    /// M workers, each a separate process. Ctrl-C / SIGTERM stops them all.
    Up(up::UpArgs),
    /// Run one master node.
    Master {
        /// The cluster config file.
        #[arg(long, short)]
        config: PathBuf,
        /// This master's id in the config (e.g. `m1`).
        #[arg(long)]
        id: String,
    },
    /// Run the proxy, DNS responder and admin endpoint.
    Proxy {
        /// The cluster config file.
        #[arg(long, short)]
        config: PathBuf,
        /// This proxy's id in the config's `[[proxies]]` (e.g. `p1`); not needed with one
        /// `[proxy]`.
        #[arg(long)]
        id: Option<String>,
        /// Replace the proxy of this id running on this host without dropping a
        /// connection: take its listening sockets, serve, then let it drain and exit
        /// (a restart or a binary upgrade).
        #[arg(long)]
        upgrade: bool,
        /// The Unix socket over which a running proxy hands its sockets to the next
        /// [default: proxy-ID.upgrade.sock in $RUNTIME_DIRECTORY, else in the working
        /// directory].
        #[arg(long, value_name = "PATH")]
        upgrade_socket: Option<PathBuf>,
        /// With --upgrade: return once the new proxy serves and leave it running in the
        /// background (for systemd's `ExecReload=`; it reports itself as the service's
        /// main process).
        #[arg(long, requires = "upgrade")]
        detach: bool,
    },
    /// Run one worker node.
    Worker {
        /// The cluster config file.
        #[arg(long, short)]
        config: PathBuf,
        /// This worker's id in the config (e.g. `w1`).
        #[arg(long)]
        id: String,
        /// Run N simulated nodes (`<id>-hollow-1` .. `<id>-hollow-N`) in this one process:
        /// real registration, leases and pod status, no processes (like kubemark).
        #[arg(long, value_name = "N")]
        hollow: Option<usize>,
    },
    /// The cluster's certificates: `init` (CA + every node + admin), `issue` (a user).
    #[command(subcommand)]
    Pki(pki::PkiCmd),
    /// Validate a config file: exit 0, or 1 with `FILE:LINE:COL: message`.
    CheckConfig {
        /// The config file to check.
        file: PathBuf,
    },
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    raise_open_files_limit();
    match cli.command {
        Cmd::CheckConfig { file } => match ballast_config::load(&file) {
            Ok(loaded) => {
                for w in &loaded.warnings {
                    eprintln!("{w}");
                }
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        cmd => {
            init_logging(cli.log_format);
            match run(cmd, cli.log_format) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ballast: {}", describe(&e));
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn load_config(path: &PathBuf) -> anyhow::Result<ballast_config::LoadedConfig> {
    let loaded = ballast_config::load(path)?;
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    Ok(loaded)
}

fn run(cmd: Cmd, log_format: LogFormat) -> anyhow::Result<()> {
    match cmd {
        Cmd::Up(args) => up::run(args, log_format),
        Cmd::Pki(cmd) => pki::run(cmd),
        Cmd::Proxy { detach: true, .. } => detach::detach(),
        Cmd::Proxy {
            config,
            id,
            upgrade,
            upgrade_socket,
            detach: false,
        } => {
            no_transparent_huge_pages();
            let socket = upgrade_socket.unwrap_or_else(|| {
                ballast_proxy::upgrade::default_socket(id.as_deref().unwrap_or("proxy"))
            });
            let succession = ballast_proxy::Succession {
                socket,
                take_over: upgrade,
                on_serving: detach::readiness_report(),
            };
            // The proxy owns its runtimes and signal handling (pingora).
            ballast_proxy::run(&config, id.as_deref(), succession).context("proxy failed")
        }
        Cmd::Master { config, id } => {
            no_transparent_huge_pages();
            let loaded = load_config(&config)?;
            runtime()?.block_on(async move {
                let shutdown = shutdown_on_signal();
                ballast_master::run(loaded, id.clone(), shutdown)
                    .await
                    .with_context(|| format!("master {id} failed"))
            })
        }
        Cmd::Worker { config, id, hollow } => {
            let loaded = load_config(&config)?;
            runtime()?.block_on(async move {
                let shutdown = shutdown_on_signal();
                match hollow {
                    Some(n) => ballast_worker::run_hollow(loaded, id.clone(), n, shutdown)
                        .await
                        .with_context(|| format!("hollow workers {id} failed")),
                    None => ballast_worker::run(loaded, id.clone(), shutdown)
                        .await
                        .with_context(|| format!("worker {id} failed")),
                }
            })
        }
        Cmd::CheckConfig { .. } => unreachable!("handled in main"),
    }
}

/// Servers hold a file per connection: lift the soft limit on open files to the hard one
/// (distributions often start processes at 1 024; `[limits] max_connections` assumes
/// thousands). Where it cannot be raised, the soft limit stays.
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                eprintln!("cannot raise the open files limit from {soft} to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => eprintln!("cannot read the open files limit: {e}"),
    }
}

/// Masters and the proxy run without transparent huge pages. Their heaps grow and churn
/// (objects, log entries, connection buffers), and every first touch of a fresh 2 MiB huge
/// page zeroed all of it: `clear_page_erms` was ~8 % of both cores under pod creates, 0.2 %
/// with THP off (the advice databases such as Redis give too). Not for workers: pods
/// inherit the flag. A kernel without the flag just keeps THP.
fn no_transparent_huge_pages() {
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        tracing::debug!(error = %e, "cannot disable transparent huge pages");
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// A token cancelled on SIGTERM or SIGINT (the first one; a second one exits at once).
fn shutdown_on_signal() -> CancellationToken {
    use tokio::signal::unix::{signal, SignalKind};
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        t.cancel();
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::warn!("second signal: exiting at once");
        std::process::exit(130);
    });
    token
}

/// An error and its causes on one line, each cause once: many of our errors already
/// quote their source in their own message, which `{:#}` would print again.
fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::describe;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open {0}: disk on fire")]
    struct Inner(&'static str);

    #[derive(Debug, thiserror::Error)]
    #[error("raft: {0}")]
    struct Outer(#[from] Inner);

    #[test]
    fn each_cause_is_said_once() {
        let e = anyhow::Error::from(Outer(Inner("raft.redb"))).context("master m1 failed");
        assert_eq!(
            describe(&e),
            "master m1 failed: raft: cannot open raft.redb: disk on fire"
        );
    }
}
