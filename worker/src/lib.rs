//! The Ballast worker: the node agent.
//!
//! - [`node`]: registers the Node, renews its Lease, keeps `Ready` true.
//! - [`watch`] + [`pods`]: the pods bound to this node run as local processes
//!   ([`process`]), restarted per policy ([`backoff`]), probed ([`probe`]), with
//!   size-bounded logs ([`logs`]); their status ([`pod_status`]) goes to the API through a
//!   latest-wins queue ([`status_upload`]) that rides out control-plane outages.
//! - [`checkpoint`]: what survives a worker restart (pod → container → pid), so processes are
//!   adopted, never duplicated.
//! - [`route`]: the API is reached by URL or by a DNS name resolved at the configured
//!   server ([`api`]).
//! - [`server`]: `/livez`, `/metrics`, `/containerLogs/...` on the worker's address, over
//!   TLS; [`access`] decides who may read what.
//! - [`hollow`]: many simulated nodes in one process (no processes), like kubemark.

mod access;
mod api;
mod backoff;
mod cgroup;
mod checkpoint;
mod confine;
mod confiner;
mod events;
mod hollow;
mod logs;
mod metrics;
mod node;
mod pod_status;
mod pods;
mod probe;
mod process;
mod route;
mod server;
mod status_upload;
mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ballast_config::{LoadedConfig, WorkerConfig};
use tokio_util::sync::CancellationToken;

use crate::api::Api;
use crate::metrics::Metrics;
use crate::route::Route;

/// Errors that end a worker process.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("unknown worker id `{0}` (not in the config's [[workers]])")]
    UnknownId(String),
    #[error("cannot bind address {addr}: {source} (is another worker running there?)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot use the data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] checkpoint::StateError),
    #[error("the HTTPS server failed: {0}")]
    Serve(#[from] ballast_config::tls::TlsError),
    #[error("{0}")]
    Other(String),
}

fn node_info(config: &LoadedConfig, me: &WorkerConfig, name: String) -> node::NodeInfo {
    let boot = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    node::NodeInfo {
        name,
        ip: me.address.ip(),
        port: me.address.port(),
        zone: me.zone.clone(),
        capacity: me.capacity.clone(),
        lease_interval: config.config.worker.lease_interval,
        lease_duration: config.config.control.node_grace_period,
        boot_id: format!("{:x}-{:x}", std::process::id(), boot.as_nanos()),
    }
}

/// Create `dir` (and its parents) and make it 0700: pod logs, process state.
fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, WorkerError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| WorkerError::Bind { addr, source })
}

/// Run worker `id` until `shutdown` is cancelled; then stop its pods' processes
/// gracefully and exit.
pub async fn run(
    config: LoadedConfig,
    id: String,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let me = config
        .config
        .worker(&id)
        .ok_or_else(|| WorkerError::UnknownId(id.clone()))?
        .clone();
    let data_dir = config.worker_data_dir(&me);
    // Absolute: container processes run in their own working directories.
    let data_dir = private_dir(&data_dir)
        .and_then(|()| std::fs::canonicalize(&data_dir))
        .map_err(|source| WorkerError::DataDir {
            path: data_dir.clone(),
            source,
        })?;
    let listener = bind(me.address).await?;
    let metrics = Metrics::new();
    let route = Route::new(me.route());
    tracing::info!(id = %id, address = %me.address, route = %route.describe(), data_dir = %data_dir.display(), "worker starting");
    let tls = config.node_tls(&id)?;
    let api = Arc::new(Api::new(
        route,
        metrics.clone(),
        &tls,
        ballast_config::source_ip(me.address),
    )?);
    let state = Arc::new(checkpoint::StateFile::load(data_dir.join("state.json"))?);
    let statuses = status_upload::StatusSync::new();
    let ctx = pods::Ctx::new(
        id.clone(),
        me.address.ip(),
        data_dir.clone(),
        config.config.worker.max_log_bytes,
        api.clone(),
        state,
        statuses.clone(),
        metrics.clone(),
        backoff::BackoffConfig::from_config(&config.config.worker),
        shutdown.clone(),
        confiner::Confiner::new(
            &id,
            config.config.worker.pod_open_files,
            config.config.worker.pod_pids_limit,
        ),
    );

    // Background work that outlives the pods' shutdown.
    let bg = CancellationToken::new();
    let access = Arc::new(access::Access::new(api.clone()));
    let app = server::router(metrics.clone(), Some(ctx.clone()), access);
    let server = tokio::spawn({
        let (bg, tls) = (bg.clone(), tls.clone());
        let limits = config.config.limits.clone();
        async move { server::serve(listener, &tls, &limits, app, bg).await }
    });
    let node_task = tokio::spawn(node::run(
        api.clone(),
        node_info(&config, &me, id.clone()),
        metrics.clone(),
        shutdown.clone(),
    ));
    let sync_task = tokio::spawn(statuses.clone().run(api.clone(), bg.clone()));
    let rotate_task = tokio::spawn(pods::rotate_logs_loop(ctx.clone(), bg.clone()));

    let mut manager = pods::Manager::new(ctx.clone());
    watch::run(&api, &id, &mut manager, &shutdown).await;

    tracing::info!("stopping the pods' processes");
    manager.wait_all().await;
    if !statuses.is_empty() {
        match tokio::time::timeout(Duration::from_secs(1), statuses.send_all(&api)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot upload the last pod statuses"),
            Err(_) => tracing::warn!("pod statuses not all uploaded within 1 s of stopping"),
        }
    }
    bg.cancel();
    // In-flight API calls are not worth waiting for.
    node_task.abort();
    sync_task.abort();
    if let Err(e) = rotate_task.await {
        tracing::error!(error = %e, "the log rotation task ended abnormally");
    }
    match tokio::time::timeout(Duration::from_secs(1), server).await {
        Ok(Ok(Err(e))) => return Err(WorkerError::Serve(e)),
        Ok(_) => {}
        Err(_) => tracing::warn!("HTTP server did not stop in time"),
    }
    tracing::info!("worker stopped");
    Ok(())
}

/// Run `count` hollow nodes named `{base_id}-hollow-{i}` (i = 1..=count) in this process:
/// real registration, leases and pod status (bound pods are reported Running), but no
/// processes. Their starts are spread over one `lease_interval`, at most 100 a second.
/// They use worker
/// `base_id`'s config (route, address, capacity); `/metrics`
/// and `/livez` are served on its address.
pub async fn run_hollow(
    config: LoadedConfig,
    base_id: String,
    count: usize,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let me = config
        .config
        .worker(&base_id)
        .ok_or_else(|| WorkerError::UnknownId(base_id.clone()))?
        .clone();
    let listener = bind(me.address).await?;
    let metrics = Metrics::new();
    // The worker's certificate serves its address; the API calls of every hollow node go
    // as `admin` (like kubemark's hollow nodes, which share one kubeconfig): a certificate
    // per simulated node would only exercise the PKI.
    let tls = config.node_tls(&base_id)?;
    let admin = config.node_tls("admin")?;
    let api = Arc::new(Api::new(
        Route::new(me.route()),
        metrics.clone(),
        &admin,
        ballast_config::source_ip(me.address),
    )?);
    let statuses = status_upload::StatusSync::new();
    tracing::info!(base = %base_id, count, address = %me.address, "hollow nodes starting");
    let access = Arc::new(access::Access::new(api.clone()));
    let app = server::router(metrics.clone(), None, access);
    let server = tokio::spawn({
        let (s, tls) = (shutdown.clone(), tls.clone());
        let limits = config.config.limits.clone();
        async move { server::serve(listener, &tls, &limits, app, s).await }
    });
    let mut tasks = vec![tokio::spawn(
        statuses.clone().run(api.clone(), shutdown.clone()),
    )];
    // Start the nodes spread evenly over one lease interval, and at most 100 a second,
    // as a real fleet boots over time: registration (~3 writes a node) does not arrive
    // as one storm, and the nodes' lease renewals stay spread out afterwards.
    let spread = (config.config.worker.lease_interval / count.max(1) as u32)
        .max(std::time::Duration::from_millis(10));
    for i in 1..=count {
        let name = format!("{base_id}-hollow-{i}");
        let info = node_info(&config, &me, name.clone());
        let delay = spread * (i - 1) as u32;
        let pods = hollow::HollowNode::new(
            name,
            me.address.ip(),
            api.clone(),
            statuses.clone(),
            metrics.clone(),
            shutdown.clone(),
        );
        tasks.push(tokio::spawn({
            let (api, metrics, shutdown) = (api.clone(), metrics.clone(), shutdown.clone());
            async move {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                tokio::join!(node::run(api, info, metrics, shutdown), pods.run());
            }
        }));
    }
    shutdown.cancelled().await;
    // Nothing to stop gracefully (no processes): in-flight API calls are dropped.
    for t in tasks {
        t.abort();
    }
    match server.await {
        Ok(Err(e)) => Err(WorkerError::Serve(e)),
        _ => Ok(()),
    }
}

/// The wall-clock time now, at whole seconds (what Kubernetes `Time` carries).
pub fn now() -> k8s_openapi::jiff::Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    k8s_openapi::jiff::Timestamp::from_second(d.as_secs() as i64).unwrap_or_default()
}

/// The wall-clock time now, at microseconds (what `MicroTime` carries).
pub fn now_micro() -> k8s_openapi::jiff::Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    k8s_openapi::jiff::Timestamp::from_microsecond(d.as_micros() as i64).unwrap_or_default()
}
