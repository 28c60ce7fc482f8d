//! Readiness and liveness probes (exec, HTTP GET, TCP), each run by its own task while
//! the container runs, with `initialDelaySeconds`, `periodSeconds`, `timeoutSeconds`,
//! `successThreshold` and `failureThreshold`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerPort, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The consecutive-result counter of one probe (pure logic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counter {
    successes: i32,
    failures: i32,
    /// The probe's verdict: passing (ready / alive).
    pub ok: bool,
}

impl Counter {
    /// Readiness starts failing, liveness starts passing.
    pub(crate) fn new(initially_ok: bool) -> Self {
        Self {
            successes: 0,
            failures: 0,
            ok: initially_ok,
        }
    }

    /// Record one result; returns the verdict.
    pub(crate) fn record(
        &mut self,
        success: bool,
        success_threshold: i32,
        failure_threshold: i32,
    ) -> bool {
        if success {
            self.failures = 0;
            self.successes += 1;
            if self.successes >= success_threshold.max(1) {
                self.ok = true;
            }
        } else {
            self.successes = 0;
            self.failures += 1;
            if self.failures >= failure_threshold.max(1) {
                self.ok = false;
            }
        }
        self.ok
    }
}

/// Where a probe runs: the container's environment and the pod's address.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub host: IpAddr,
    pub ports: Vec<ContainerPort>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<PathBuf>,
    /// Exec probes run as the container does, in its cgroup.
    pub confine: crate::process::Confine,
}

/// A running probe task; aborted on drop.
pub(crate) struct ProbeTask {
    pub verdict: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl Drop for ProbeTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn secs(v: Option<i32>, default: i32) -> Duration {
    Duration::from_secs(v.unwrap_or(default).max(0) as u64)
}

/// Start probing. `initially_ok`: false for readiness, true for liveness.
pub(crate) fn spawn(probe: Probe, target: Target, initially_ok: bool) -> ProbeTask {
    let (tx, rx) = watch::channel(initially_ok);
    let task = tokio::spawn(async move {
        let period = secs(probe.period_seconds, 10).max(Duration::from_secs(1));
        let timeout = secs(probe.timeout_seconds, 1).max(Duration::from_secs(1));
        let st = probe.success_threshold.unwrap_or(1);
        let ft = probe.failure_threshold.unwrap_or(3);
        tokio::time::sleep(secs(probe.initial_delay_seconds, 0)).await;
        let mut counter = Counter::new(initially_ok);
        loop {
            let success = run_once(&probe, &target, timeout).await;
            let v = counter.record(success, st, ft);
            tx.send_if_modified(|cur| {
                let changed = *cur != v;
                *cur = v;
                changed
            });
            tokio::time::sleep(period).await;
        }
    });
    ProbeTask { verdict: rx, task }
}

fn port_of(p: &IntOrString, ports: &[ContainerPort]) -> Option<u16> {
    match p {
        IntOrString::Int(i) => u16::try_from(*i).ok(),
        IntOrString::String(s) => s.parse().ok().or_else(|| {
            ports
                .iter()
                .find(|cp| cp.name.as_deref() == Some(s))
                .and_then(|cp| u16::try_from(cp.container_port).ok())
        }),
    }
}

/// One probe attempt.
pub(crate) async fn run_once(probe: &Probe, t: &Target, timeout: Duration) -> bool {
    if let Some(exec) = &probe.exec {
        let argv = exec.command.clone().unwrap_or_default();
        let Some(cmd) = argv.first() else {
            return false;
        };
        let mut c = tokio::process::Command::new(cmd);
        c.args(&argv[1..])
            .env_clear()
            .envs(t.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if !t.env.iter().any(|(k, _)| k == "PATH") {
            c.env("PATH", crate::process::DEFAULT_PATH);
        }
        if let Some(d) = &t.working_dir {
            c.current_dir(d);
        }
        if let Err(e) = t.confine.apply(&mut c) {
            tracing::warn!(error = %e, "exec probe not run");
            return false;
        }
        let Ok(mut child) = c.spawn() else {
            return false;
        };
        let pid = child.id();
        let ok = match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(s)) => s.success(),
            _ => false,
        };
        // The probe ran in its own session: whatever it started (and did not wait for,
        // or was still running at the timeout) ends with it.
        if let Some(pid) = pid {
            crate::process::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
        }
        return ok;
    }
    if let Some(h) = &probe.http_get {
        let Some(port) = port_of(&h.port, &t.ports) else {
            return false;
        };
        let host = h
            .host
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| t.host.to_string());
        let path = h.path.as_deref().unwrap_or("/");
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        let url = format!("http://{host}:{port}{path}");
        let Ok(client) = reqwest::Client::builder()
            .no_proxy()
            .timeout(timeout)
            .build()
        else {
            return false;
        };
        let mut req = client.get(&url);
        for hd in h.http_headers.iter().flatten() {
            req = req.header(hd.name.as_str(), hd.value.as_str());
        }
        return match req.send().await {
            Ok(r) => (200..400).contains(&r.status().as_u16()),
            Err(_) => false,
        };
    }
    if let Some(tcp) = &probe.tcp_socket {
        let Some(port) = port_of(&tcp.port, &t.ports) else {
            return false;
        };
        let host: IpAddr = tcp
            .host
            .as_deref()
            .and_then(|h| h.parse().ok())
            .unwrap_or(t.host);
        return matches!(
            tokio::time::timeout(
                timeout,
                tokio::net::TcpStream::connect(SocketAddr::new(host, port))
            )
            .await,
            Ok(Ok(_))
        );
    }
    // No handler (e.g. gRPC): treat as passing rather than killing the container.
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ExecAction, HTTPGetAction};

    #[test]
    fn thresholds() {
        let mut ready = Counter::new(false);
        assert!(!ready.record(true, 2, 3));
        assert!(ready.record(true, 2, 3));
        assert!(ready.record(false, 2, 3));
        assert!(ready.record(false, 2, 3));
        assert!(!ready.record(false, 2, 3));
        let mut live = Counter::new(true);
        assert!(live.record(false, 1, 2));
        assert!(live.record(true, 1, 2));
        assert!(live.record(false, 1, 2));
        assert!(!live.record(false, 1, 2));
    }

    fn target() -> Target {
        Target {
            host: "127.0.0.1".parse().unwrap(),
            ports: vec![ContainerPort {
                name: Some("web".into()),
                container_port: 1,
                ..Default::default()
            }],
            env: vec![],
            working_dir: None,
            confine: Default::default(),
        }
    }

    #[tokio::test]
    async fn exec_and_http_probes() {
        let exec = |cmd: &str| Probe {
            exec: Some(ExecAction {
                command: Some(vec!["sh".into(), "-c".into(), cmd.into()]),
            }),
            ..Default::default()
        };
        let t = target();
        let to = Duration::from_secs(2);
        assert!(run_once(&exec("true"), &t, to).await);
        assert!(!run_once(&exec("exit 1"), &t, to).await);
        assert!(!run_once(&exec("sleep 5"), &t, Duration::from_millis(200)).await);

        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let app = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok" }));
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        let http = |path: &str, p: IntOrString| Probe {
            http_get: Some(HTTPGetAction {
                path: Some(path.into()),
                port: p,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(run_once(&http("/healthz", IntOrString::Int(port as i32)), &t, to).await);
        assert!(!run_once(&http("/missing", IntOrString::Int(port as i32)), &t, to).await);
        assert!(!run_once(&http("/healthz", IntOrString::String("web".into())), &t, to).await);
    }
}
