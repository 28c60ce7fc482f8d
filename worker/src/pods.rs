//! Pods as local processes: one task per pod runs its containers, restarts them per the
//! restart policy with back-off, runs probes, reports status, stops them on deletion and
//! confirms the deletion. Processes are remembered in the state file and adopted again
//! by the next worker, so a worker crash neither kills nor duplicates them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod, PodStatus};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::{retry, Api, ApiError};
use crate::backoff::{Backoff, BackoffConfig, RestartPolicy};
use crate::checkpoint::{PodRecord, StateFile};
use crate::confiner::{Confiner, PrepareError, Prepared};
use crate::events::Events;
use crate::logs;
use crate::metrics::Metrics;
use crate::pod_status::{self, CState, ContainerView, PodView, Termination};
use crate::probe::{self, ProbeTask};
use crate::process::{self, ProcSpec};
use crate::status_upload::StatusSync;
use crate::watch::PodSink;

/// How long a worker that is shutting down waits for a pod's processes before SIGKILL
/// (`ballast up` gives each child 10 s before it kills it, and the pods with it).
const SHUTDOWN_GRACE_CAP: Duration = Duration::from_secs(5);
/// How long to wait for a process group after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(2);
const TICK: Duration = Duration::from_millis(250);

/// The logs of one pod, for the log endpoint.
#[derive(Clone)]
pub(crate) struct PodLogs {
    pub uid: String,
    pub dir: PathBuf,
    /// Per container: whether its log may still grow (running or going to restart).
    pub writing: Arc<Mutex<HashMap<String, bool>>>,
}

/// What every pod task shares.
pub(crate) struct Ctx {
    pub node: String,
    pub ip: IpAddr,
    pub data_dir: PathBuf,
    pub max_log_bytes: u64,
    pub api: Arc<Api>,
    pub state: Arc<StateFile>,
    pub statuses: Arc<StatusSync>,
    pub metrics: Metrics,
    pub backoff: BackoffConfig,
    /// Cancelled when the worker stops: pods stop their processes.
    pub stopping: CancellationToken,
    /// (namespace, pod name) → logs.
    pub logs: Mutex<HashMap<(String, String), PodLogs>>,
    pub events: Events,
    pub confiner: Confiner,
    running_pods: Mutex<HashSet<String>>,
}

impl Ctx {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        node: String,
        ip: IpAddr,
        data_dir: PathBuf,
        max_log_bytes: u64,
        api: Arc<Api>,
        state: Arc<StateFile>,
        statuses: Arc<StatusSync>,
        metrics: Metrics,
        backoff: BackoffConfig,
        stopping: CancellationToken,
        confiner: Confiner,
    ) -> Arc<Self> {
        Arc::new(Self {
            events: Events::new(api.clone(), node.clone()),
            node,
            ip,
            data_dir,
            max_log_bytes,
            api,
            state,
            statuses,
            metrics,
            backoff,
            stopping,
            confiner,
            logs: Mutex::new(HashMap::new()),
            running_pods: Mutex::new(HashSet::new()),
        })
    }

    fn set_running(&self, uid: &str, running: bool) {
        let mut r = self.running_pods.lock().unwrap();
        if running {
            r.insert(uid.to_string());
        } else {
            r.remove(uid);
        }
        self.metrics.pods_running.set(r.len() as i64);
    }

    /// Rotate every container log that grew too large.
    pub(crate) fn rotate_logs(&self) {
        let entries: Vec<PodLogs> = self.logs.lock().unwrap().values().cloned().collect();
        for e in entries {
            let names: Vec<String> = e.writing.lock().unwrap().keys().cloned().collect();
            for c in names {
                let path = logs::container_log(&e.dir, &c);
                if let Err(err) = logs::rotate_if_needed(&path, self.max_log_bytes) {
                    tracing::warn!(path = %path.display(), error = %err, "cannot rotate a log");
                }
            }
        }
    }
}

#[derive(Clone)]
enum Desired {
    Present(Arc<Pod>),
    Gone,
}

struct Handle {
    tx: watch::Sender<Desired>,
    task: JoinHandle<()>,
}

/// All pods of this worker.
pub(crate) struct Manager {
    ctx: Arc<Ctx>,
    pods: HashMap<String, Handle>,
}

fn uid_of(p: &Pod) -> String {
    p.metadata.uid.clone().unwrap_or_default()
}

impl Manager {
    /// Start the pods remembered in the state file (adopting their processes).
    pub(crate) fn new(ctx: Arc<Ctx>) -> Self {
        let mut m = Self {
            ctx: ctx.clone(),
            pods: HashMap::new(),
        };
        for (uid, rec) in ctx.state.snapshot().pods {
            tracing::info!(pod = ?rec.pod.metadata.name, %uid, "resuming a pod from the state file");
            m.start(uid, Arc::new(rec.pod.clone()), Some(rec));
        }
        m
    }

    fn start(&mut self, uid: String, pod: Arc<Pod>, rec: Option<PodRecord>) {
        let (tx, rx) = watch::channel(Desired::Present(pod.clone()));
        let ctx = self.ctx.clone();
        let u = uid.clone();
        let task = tokio::spawn(async move { Runner::new(ctx, u, pod, rec).run(rx).await });
        self.pods.insert(uid, Handle { tx, task });
    }

    fn reap(&mut self) {
        self.pods.retain(|_, h| !h.task.is_finished());
    }

    /// Wait for every pod task (after `ctx.stopping`).
    pub(crate) async fn wait_all(mut self) {
        for (_, h) in self.pods.drain() {
            if let Err(e) = h.task.await {
                tracing::error!(error = %e, "a pod task ended abnormally");
            }
        }
    }
}

impl PodSink for Manager {
    fn upsert(&mut self, pod: Pod) {
        self.reap();
        let uid = uid_of(&pod);
        if uid.is_empty() {
            return;
        }
        if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(&self.ctx.node) {
            self.gone(&uid);
            return;
        }
        if let Some(bad) = unsafe_container_name(&pod) {
            // the API refuses such names; a pod stored before it did is never run, since
            // the names become file names under the pod's directory
            tracing::warn!(pod = ?pod.metadata.name, container = %bad, "container name is not a DNS label; not running the pod");
            return;
        }
        match self.pods.get(&uid) {
            Some(h) => {
                h.tx.send_replace(Desired::Present(Arc::new(pod)));
            }
            None => self.start(uid, Arc::new(pod), None),
        }
    }

    fn gone(&mut self, uid: &str) {
        if let Some(h) = self.pods.get(uid) {
            h.tx.send_replace(Desired::Gone);
        }
    }

    fn known(&self) -> Vec<String> {
        self.pods
            .iter()
            .filter(|(_, h)| !h.task.is_finished())
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// A container process the runner watches.
struct Proc {
    pid: u32,
    ticks: u64,
    child: Option<tokio::process::Child>,
    since: Instant,
    /// Counted in `containers_running`.
    counted: bool,
}

struct Ctr {
    spec: Container,
    /// An init container: runs to completion, in order, before the others start.
    init: bool,
    proc: Option<Proc>,
    backoff: Backoff,
    readiness: Option<ProbeTask>,
    liveness: Option<ProbeTask>,
    waiting: Option<(String, Option<String>)>,
    /// Its limits were reported as not enforced (once per pod).
    warned_limits: bool,
}

struct Runner {
    ctx: Arc<Ctx>,
    uid: String,
    pod: Arc<Pod>,
    rec: PodRecord,
    ctrs: Vec<Ctr>,
    policy: RestartPolicy,
    dir: PathBuf,
    writing: Arc<Mutex<HashMap<String, bool>>>,
    last_status: Option<PodStatus>,
    /// Terminal in the API and unknown locally: never start anything.
    inert: bool,
}

/// The first container name (init containers included) that is not a DNS label.
fn unsafe_container_name(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let label = |n: &str| {
        !n.is_empty()
            && n.len() <= 63
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .map(|c| c.name.as_str())
        .find(|n| !label(n))
        .map(String::from)
}

fn grace_of(pod: &Pod) -> Duration {
    let secs = pod
        .metadata
        .deletion_grace_period_seconds
        .or_else(|| {
            pod.spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
        })
        .unwrap_or(30);
    Duration::from_secs(secs.max(0) as u64)
}

impl Runner {
    fn new(ctx: Arc<Ctx>, uid: String, pod: Arc<Pod>, rec: Option<PodRecord>) -> Self {
        let inert = rec.is_none()
            && matches!(
                pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            );
        let mut rec = rec.unwrap_or_else(|| PodRecord {
            pod: (*pod).clone(),
            start_time: Some(crate::now()),
            containers: BTreeMap::new(),
        });
        let ns = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = pod.metadata.name.clone().unwrap_or_default();
        let dir = logs::pod_dir(&ctx.data_dir, &ns, &name, &uid);
        let spec = pod.spec.clone().unwrap_or_default();
        let policy = RestartPolicy::parse(spec.restart_policy.as_deref());
        let mut ctrs = Vec::new();
        let writing = Arc::new(Mutex::new(HashMap::new()));
        let all = spec
            .init_containers
            .unwrap_or_default()
            .into_iter()
            .map(|c| (true, c))
            .chain(spec.containers.into_iter().map(|c| (false, c)));
        for (init, c) in all {
            let r = rec.containers.entry(c.name.clone()).or_default();
            let proc = match r.pid {
                Some(pid) if process::alive(pid, r.start_ticks) => {
                    tracing::info!(pod = %name, container = %c.name, pid, "adopted a running container process");
                    ctx.metrics.containers_running.inc();
                    Some(Proc {
                        pid,
                        ticks: r.start_ticks,
                        child: None,
                        since: Instant::now(),
                        counted: true,
                    })
                }
                // Exited while no worker watched: handled as an exit on the first tick.
                Some(pid) => Some(Proc {
                    pid,
                    ticks: r.start_ticks,
                    child: None,
                    since: Instant::now(),
                    counted: false,
                }),
                None => None,
            };
            writing.lock().unwrap().insert(c.name.clone(), !inert);
            ctrs.push(Ctr {
                spec: c,
                init,
                proc,
                backoff: Backoff::new(ctx.backoff),
                readiness: None,
                liveness: None,
                waiting: None,
                warned_limits: false,
            });
        }
        ctx.logs.lock().unwrap().insert(
            (ns, name),
            PodLogs {
                uid: uid.clone(),
                dir: dir.clone(),
                writing: writing.clone(),
            },
        );
        if !inert {
            ctx.state.put(&uid, &rec);
        }
        let mut r = Self {
            ctx,
            uid,
            pod,
            rec,
            ctrs,
            policy,
            dir,
            writing,
            last_status: None,
            inert,
        };
        for i in 0..r.ctrs.len() {
            if r.ctrs[i]
                .proc
                .as_ref()
                .is_some_and(|p| process::alive(p.pid, p.ticks))
            {
                r.start_probes(i);
            }
        }
        r
    }

    fn ns(&self) -> String {
        self.pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into())
    }

    fn name(&self) -> String {
        self.pod.metadata.name.clone().unwrap_or_default()
    }

    fn event(&self, container: Option<&str>, warning: bool, reason: &str, message: String) {
        self.ctx
            .events
            .pod(&self.pod, container, warning, reason, message);
    }

    fn persist(&self) {
        if !self.inert {
            self.ctx.state.put(&self.uid, &self.rec);
        }
    }

    async fn run(mut self, mut rx: watch::Receiver<Desired>) {
        loop {
            let desired = rx.borrow_and_update().clone();
            match desired {
                Desired::Gone => {
                    tracing::info!(pod = %self.name(), "pod no longer bound here; stopping it");
                    self.stop_all(grace_of(&self.pod), false).await;
                    self.cleanup().await;
                    return;
                }
                Desired::Present(p) => {
                    if p.metadata.deletion_timestamp.is_some()
                        && self.pod.metadata.deletion_timestamp.is_none()
                    {
                        self.rec.pod = (*p).clone();
                        self.persist();
                    }
                    self.pod = p;
                }
            }
            if self.ctx.stopping.is_cancelled() {
                self.stop_all(grace_of(&self.pod).min(SHUTDOWN_GRACE_CAP), true)
                    .await;
                self.publish();
                self.ctx.set_running(&self.uid, false);
                return;
            }
            if self.pod.metadata.deletion_timestamp.is_some() {
                self.delete(&mut rx).await;
                return;
            }
            self.tick().await;
            self.publish();
            tokio::select! {
                r = rx.changed() => {
                    if r.is_err() {
                        // No manager any more (only in tests): keep the pace.
                        tokio::time::sleep(TICK).await;
                    }
                }
                _ = tokio::time::sleep(TICK) => {}
                _ = self.ctx.stopping.cancelled() => {}
            }
        }
    }

    /// Graceful deletion: stop the processes within the grace period, then confirm.
    async fn delete(&mut self, rx: &mut watch::Receiver<Desired>) {
        let grace = grace_of(&self.pod);
        tracing::info!(pod = %self.name(), grace = ?grace, "pod is being deleted; stopping its processes");
        self.stop_all(grace, false).await;
        self.publish();
        let path = format!(
            "/api/v1/namespaces/{}/pods/{}?gracePeriodSeconds=0",
            self.ns(),
            self.name()
        );
        let body = json!({
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": self.uid},
        });
        let stop = self.ctx.stopping.clone();
        let api = self.ctx.api.clone();
        let confirm = retry("confirm pod deletion", &stop, || api.delete(&path, &body));
        tokio::pin!(confirm);
        loop {
            tokio::select! {
                r = &mut confirm => {
                    match r {
                        Ok(()) => tracing::info!(pod = %self.name(), "pod deletion confirmed"),
                        Err(e) if e.is_not_found() || e.is_conflict() => {}
                        Err(ApiError::Cancelled) => return, // the next worker confirms it
                        Err(e) => tracing::warn!(pod = %self.name(), error = %e, "deletion not confirmed"),
                    }
                    break;
                }
                c = rx.changed() => {
                    if c.is_err() || matches!(*rx.borrow(), Desired::Gone) {
                        break;
                    }
                }
            }
        }
        self.cleanup().await;
    }

    /// Forget the pod: state, queued status, logs, cgroups.
    async fn cleanup(&mut self) {
        self.ctx.confiner.remove_pod(&self.uid).await;
        self.ctx.state.remove(&self.uid);
        self.ctx.statuses.forget(&self.uid);
        self.ctx.set_running(&self.uid, false);
        let key = (self.ns(), self.name());
        let mut l = self.ctx.logs.lock().unwrap();
        if l.get(&key).is_some_and(|e| e.uid == self.uid) {
            l.remove(&key);
        }
        drop(l);
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove the pod's directory");
            }
        }
    }

    /// The init container to run now, or None once every one has succeeded.
    fn pending_init(&self) -> Option<usize> {
        (0..self.ctrs.len()).find(|&i| {
            let c = &self.ctrs[i];
            c.init
                && self
                    .rec
                    .containers
                    .get(&c.spec.name)
                    .and_then(|r| r.terminated.as_ref())
                    .is_none_or(|t| t.exit_code != 0)
        })
    }

    /// The restart policy of container `i` (init containers restart only on failure).
    fn policy_for(&self, i: usize) -> RestartPolicy {
        match (self.ctrs[i].init, self.policy) {
            (true, RestartPolicy::Never) => RestartPolicy::Never,
            (true, _) => RestartPolicy::OnFailure,
            (false, p) => p,
        }
    }

    /// One round: notice exits, act on liveness, start what should run.
    async fn tick(&mut self) {
        for i in 0..self.ctrs.len() {
            self.check_exit(i);
        }
        let pending_init = self.pending_init();
        for i in 0..self.ctrs.len() {
            if pending_init.is_some_and(|p| p != i) {
                continue;
            }
            let dead = self.ctrs[i]
                .liveness
                .as_ref()
                .is_some_and(|p| !*p.verdict.borrow());
            if dead && self.ctrs[i].proc.is_some() {
                let name = self.ctrs[i].spec.name.clone();
                tracing::info!(pod = %self.name(), container = %name, "liveness probe failed; restarting the container");
                self.ctx
                    .metrics
                    .restarts
                    .with_label_values(&["liveness"])
                    .inc();
                self.event(
                    Some(&name),
                    true,
                    "Unhealthy",
                    "Liveness probe failed".into(),
                );
                self.event(
                    Some(&name),
                    false,
                    "Killing",
                    format!("Container {name} failed liveness probe, will be restarted"),
                );
                self.ctrs[i].liveness = None;
                self.stop_one(i, grace_of(&self.pod)).await;
            }
            if self.ctrs[i].proc.is_none() && !self.inert {
                self.maybe_start(i);
            }
        }
        let mut w = self.writing.lock().unwrap();
        for c in &self.ctrs {
            let done = self
                .rec
                .containers
                .get(&c.spec.name)
                .is_some_and(|r| r.terminated.is_some());
            w.insert(c.spec.name.clone(), !self.inert && !done);
        }
    }

    /// Notice whether container `i`'s process ended; record it.
    fn check_exit(&mut self, i: usize) {
        let Some(p) = self.ctrs[i].proc.as_mut() else {
            return;
        };
        let waited = match p.child.as_mut() {
            Some(ch) => match ch.try_wait() {
                Ok(Some(st)) => Some(Some(st)),
                Ok(None) => None,
                Err(_) => (!process::alive(p.pid, p.ticks)).then_some(None),
            },
            None => (!process::alive(p.pid, p.ticks)).then_some(None),
        };
        let Some(status) = waited else {
            return;
        };
        let code = self.exit_file_code(i).or_else(|| {
            status.map(|st| {
                use std::os::unix::process::ExitStatusExt;
                st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(9))
            })
        });
        self.on_exit(i, code, None);
    }

    fn exit_file(&self, i: usize) -> PathBuf {
        self.dir.join(format!("{}.exit", self.ctrs[i].spec.name))
    }

    fn exit_file_code(&self, i: usize) -> Option<i32> {
        process::read_exit_file(&self.exit_file(i))
    }

    /// Record the end of container `i`'s run and decide about a restart.
    fn on_exit(&mut self, i: usize, code: Option<i32>, start_error: Option<String>) {
        let now = Instant::now();
        let name = self.ctrs[i].spec.name.clone();
        let c = &mut self.ctrs[i];
        let (pid, ran) = match c.proc.take() {
            Some(p) => {
                // Whatever the command left behind, in its group or its cgroup, goes with it.
                self.ctx.confiner.kill(&self.uid, &name, Some(p.pid));
                if p.counted {
                    self.ctx.metrics.containers_running.dec();
                }
                (Some(p.pid), now.duration_since(p.since))
            }
            None => (None, Duration::ZERO),
        };
        c.readiness = None;
        c.liveness = None;
        let r = self.rec.containers.entry(name.clone()).or_default();
        let (exit_code, reason, message) = match (&start_error, code) {
            (Some(msg), _) => (128, "StartError".to_string(), Some(msg.clone())),
            (None, Some(code)) => (code, Termination::reason_for(code).to_string(), None),
            (None, None) => (
                137,
                "ContainerStatusUnknown".to_string(),
                Some("The container could not be located when the worker checked it".into()),
            ),
        };
        let term = Termination {
            exit_code,
            signal: None,
            reason,
            message,
            started_at: if start_error.is_some() {
                None
            } else {
                r.started_at
            },
            finished_at: crate::now(),
            container_id: pid.map(|p| format!("ballast://{p}")),
        };
        tracing::info!(pod = %self.pod.metadata.name.as_deref().unwrap_or(""), container = %name, exit_code, reason = %term.reason, "container exited");
        r.pid = None;
        r.start_ticks = 0;
        let policy = self.policy_for(i);
        let c = &mut self.ctrs[i];
        let r = self.rec.containers.entry(name.clone()).or_default();
        if policy.restarts(exit_code) && !self.ctx.stopping.is_cancelled() {
            r.last = Some(term);
            r.terminated = None;
            let at = c.backoff.on_exit(now, ran);
            if at > now {
                self.ctx.events.pod(
                    &self.pod,
                    Some(&name),
                    true,
                    "BackOff",
                    format!(
                        "Back-off restarting failed container {name} in pod {}",
                        self.pod.metadata.name.as_deref().unwrap_or("")
                    ),
                );
            }
            c.waiting = (at > now).then(|| {
                (
                    "CrashLoopBackOff".to_string(),
                    Some(format!(
                        "back-off {} restarting failed container={} pod={}",
                        humantime::format_duration(c.backoff.current_delay()),
                        name,
                        self.pod.metadata.name.as_deref().unwrap_or("")
                    )),
                )
            });
        } else if policy.restarts(exit_code) {
            // Stopped by the worker's shutdown: the next worker starts it again.
            r.last = Some(term);
            r.terminated = None;
        } else {
            r.terminated = Some(term);
        }
        self.persist();
    }

    fn env(&self, c: &Container) -> Vec<(String, String)> {
        let meta = &self.pod.metadata;
        let field = |path: &str| -> String {
            match path {
                "metadata.name" => meta.name.clone().unwrap_or_default(),
                "metadata.namespace" => self.ns(),
                "metadata.uid" => self.uid.clone(),
                "spec.nodeName" => self.ctx.node.clone(),
                "spec.serviceAccountName" => self
                    .pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_default(),
                "status.hostIP" | "status.podIP" => self.ctx.ip.to_string(),
                p => {
                    let label = p
                        .strip_prefix("metadata.labels['")
                        .and_then(|s| s.strip_suffix("']"));
                    let ann = p
                        .strip_prefix("metadata.annotations['")
                        .and_then(|s| s.strip_suffix("']"));
                    match (label, ann) {
                        (Some(k), _) => meta.labels.as_ref().and_then(|l| l.get(k).cloned()),
                        (_, Some(k)) => meta.annotations.as_ref().and_then(|l| l.get(k).cloned()),
                        _ => None,
                    }
                    .unwrap_or_default()
                }
            }
        };
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), process::DEFAULT_PATH.into()),
            ("HOME".into(), "/".into()),
            ("HOSTNAME".into(), meta.name.clone().unwrap_or_default()),
        ];
        for e in c.env.iter().flatten() {
            let v = if let Some(v) = &e.value {
                let known = env.clone();
                process::expand(v, |k| {
                    known
                        .iter()
                        .rev()
                        .find(|(n, _)| n == k)
                        .map(|(_, v)| v.clone())
                })
            } else if let Some(fr) = e.value_from.as_ref().and_then(|f| f.field_ref.as_ref()) {
                field(&fr.field_path)
            } else {
                String::new()
            };
            env.retain(|(n, _)| n != &e.name);
            env.push((e.name.clone(), v));
        }
        env
    }

    /// Start container `i` unless it finished, has no command, waits out a back-off or
    /// cannot be confined as its pod asks.
    fn maybe_start(&mut self, i: usize) {
        let name = self.ctrs[i].spec.name.clone();
        let r = self.rec.containers.entry(name.clone()).or_default();
        if r.terminated.is_some() {
            return;
        }
        let Some(command) = self.command(i) else {
            return;
        };
        if self.ctrs[i].backoff.in_backoff(Instant::now()) {
            return;
        }
        let prepared =
            match self
                .ctx
                .confiner
                .prepare(&self.pod, &self.uid, &self.dir, &self.ctrs[i].spec)
            {
                Err(PrepareError::Config(e)) => {
                    self.config_error(i, e.to_string());
                    return;
                }
                r => r,
            };
        if let Some(why) = prepared.as_ref().ok().and_then(|p| p.unenforced.clone()) {
            self.warn_limits(i, &why);
        }
        let restart = self
            .rec
            .containers
            .get(&name)
            .is_some_and(|r| r.last.is_some());
        let spawned = prepared.map_err(|e| e.to_string()).and_then(|p| {
            process::spawn(&self.proc_spec(i, command, p)).map_err(|e| e.to_string())
        });
        match spawned {
            Ok(s) => self.started(i, s, restart),
            Err(e) => {
                tracing::warn!(pod = %self.name(), container = %name, error = %e, "container cannot start");
                self.event(Some(&name), true, "Failed", format!("Error: {e}"));
                if restart {
                    self.rec.containers.entry(name).or_default().restart_count += 1;
                }
                self.on_exit(i, None, Some(e));
            }
        }
    }

    /// Container `i`'s command: `command` then `args`. With no image entrypoint to run,
    /// `args` alone are the command (`kubectl run x --image=busybox -- echo once` sends
    /// args only). None (the container waits, saying why) when both are empty.
    fn command(&mut self, i: usize) -> Option<Vec<String>> {
        let c = &mut self.ctrs[i];
        let command: Vec<String> = c
            .spec
            .command
            .iter()
            .flatten()
            .chain(c.spec.args.iter().flatten())
            .cloned()
            .collect();
        if !command.is_empty() {
            return Some(command);
        }
        let name = c.spec.name.clone();
        if c.waiting.as_ref().is_none_or(|(r, _)| r != "NoCommand") {
            self.ctx.events.pod(
                &self.pod,
                Some(&name),
                true,
                "Failed",
                "Error: the container has no command".into(),
            );
        }
        c.waiting = Some((
            "NoCommand".into(),
            Some(format!(
                "container {name:?} has no command: ballast runs processes and does not pull or run image {:?}; set `command` or `args`",
                c.spec.image.as_deref().unwrap_or("")
            )),
        ));
        None
    }

    /// Say once per pod that container `i`'s limits are not enforced, and why.
    fn warn_limits(&mut self, i: usize, why: &str) {
        if std::mem::replace(&mut self.ctrs[i].warned_limits, true) {
            return;
        }
        let name = self.ctrs[i].spec.name.clone();
        self.event(
            Some(&name),
            true,
            "LimitsNotEnforced",
            format!("resources.limits of container {name} are not enforced: {why}"),
        );
    }

    /// What to run for container `i`: `command` with `$(VAR)` expanded in its
    /// environment, in its working directory, confined as prepared.
    fn proc_spec(&self, i: usize, command: Vec<String>, p: Prepared) -> ProcSpec {
        let spec = &self.ctrs[i].spec;
        let env = self.env(spec);
        let lookup = |k: &str| {
            env.iter()
                .rev()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
        };
        let argv = command.iter().map(|a| process::expand(a, lookup)).collect();
        let working_dir = spec
            .working_dir
            .as_ref()
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or(p.default_dir);
        ProcSpec {
            argv,
            env,
            working_dir: Some(working_dir),
            log: logs::container_log(&self.dir, &spec.name),
            exit_file: self.exit_file(i),
            confine: p.confine,
        }
    }

    /// Container `i` started as `s`: record it, then probe it.
    fn started(&mut self, i: usize, s: process::Started, restart: bool) {
        let name = self.ctrs[i].spec.name.clone();
        let r = self.rec.containers.entry(name.clone()).or_default();
        if restart {
            r.restart_count += 1;
            self.ctx.metrics.restarts.with_label_values(&["exit"]).inc();
        }
        r.pid = Some(s.pid);
        r.start_ticks = s.start_ticks;
        r.started_at = Some(crate::now());
        self.ctx.metrics.containers_running.inc();
        tracing::info!(pod = %self.name(), container = %name, pid = s.pid, restart, "container started");
        self.event(
            Some(&name),
            false,
            "Started",
            format!("Started container {name}"),
        );
        let c = &mut self.ctrs[i];
        c.backoff.started();
        c.waiting = None;
        c.proc = Some(Proc {
            pid: s.pid,
            ticks: s.start_ticks,
            child: Some(s.child),
            since: Instant::now(),
            counted: true,
        });
        self.persist();
        self.start_probes(i);
    }

    /// Container `i` cannot start as its pod asks: it waits, saying why (once in events).
    fn config_error(&mut self, i: usize, message: String) {
        let c = &mut self.ctrs[i];
        if c.waiting
            .as_ref()
            .is_none_or(|(_, m)| m.as_deref() != Some(message.as_str()))
        {
            let name = c.spec.name.clone();
            self.ctx.events.pod(
                &self.pod,
                Some(&name),
                true,
                "Failed",
                format!("Error: {message}"),
            );
        }
        self.ctrs[i].waiting = Some(("CreateContainerConfigError".into(), Some(message)));
    }

    fn start_probes(&mut self, i: usize) {
        let spec = self.ctrs[i].spec.clone();
        let (confine, default_dir) = self
            .ctx
            .confiner
            .for_probe(&self.pod, &self.uid, &self.dir, &spec);
        let target = probe::Target {
            host: self.ctx.ip,
            ports: spec.ports.clone().unwrap_or_default(),
            env: self.env(&spec),
            working_dir: spec
                .working_dir
                .as_ref()
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
                .or(Some(default_dir)),
            confine,
        };
        let c = &mut self.ctrs[i];
        c.readiness = spec
            .readiness_probe
            .map(|p| probe::spawn(p, target.clone(), false));
        c.liveness = spec.liveness_probe.map(|p| probe::spawn(p, target, true));
    }

    /// SIGTERM container `i`'s group, SIGKILL after `grace`, record the exit.
    async fn stop_one(&mut self, i: usize, grace: Duration) {
        let Some(p) = self.ctrs[i].proc.as_ref() else {
            return;
        };
        let name = self.ctrs[i].spec.name.clone();
        self.ctx.confiner.terminate(&self.uid, &name, p.pid);
        self.wait_exit(&[i], grace).await;
        if let Some(p) = self.ctrs[i].proc.as_ref() {
            self.ctx.confiner.kill(&self.uid, &name, Some(p.pid));
            self.wait_exit(&[i], KILL_WAIT).await;
        }
        if self.ctrs[i].proc.is_some() {
            // Still there after SIGKILL (unkillable): give up on it, record the loss.
            self.on_exit(i, Some(137), None);
        }
    }

    /// Poll until the listed containers exited (recording each) or `limit` passed.
    async fn wait_exit(&mut self, which: &[usize], limit: Duration) {
        // a grace period of ~i64::MAX seconds has no representable deadline: no deadline
        let deadline = Instant::now().checked_add(limit);
        loop {
            for &i in which {
                self.check_exit(i);
            }
            let over = deadline.is_some_and(|d| Instant::now() >= d);
            if which.iter().all(|&i| self.ctrs[i].proc.is_none()) || over {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stop every container (SIGTERM, `grace`, SIGKILL). With `keep` the pod stays known
    /// (worker shutdown); otherwise nothing is started again.
    async fn stop_all(&mut self, grace: Duration, keep: bool) {
        if !keep {
            self.inert = true;
        }
        let running: Vec<usize> = (0..self.ctrs.len())
            .filter(|&i| self.ctrs[i].proc.is_some())
            .collect();
        for &i in &running {
            self.ctrs[i].readiness = None;
            self.ctrs[i].liveness = None;
            let name = self.ctrs[i].spec.name.clone();
            self.event(
                Some(&name),
                false,
                "Killing",
                format!("Stopping container {name}"),
            );
            if let Some(p) = &self.ctrs[i].proc {
                self.ctx.confiner.terminate(&self.uid, &name, p.pid);
            }
        }
        self.wait_exit(&running, grace).await;
        for &i in &running {
            if let Some(p) = &self.ctrs[i].proc {
                let name = &self.ctrs[i].spec.name;
                tracing::info!(pod = %self.name(), container = %name, "grace period over; SIGKILL");
                self.ctx.confiner.kill(&self.uid, name, Some(p.pid));
            }
        }
        self.wait_exit(&running, KILL_WAIT).await;
        for &i in &running {
            if self.ctrs[i].proc.is_some() {
                self.on_exit(i, Some(137), None);
            }
        }
        if !keep {
            // Final: nothing restarts; show the containers as terminated.
            for c in &self.ctrs {
                let r = self.rec.containers.entry(c.spec.name.clone()).or_default();
                if r.terminated.is_none() {
                    if let Some(last) = r.last.clone() {
                        r.terminated = Some(last);
                    }
                }
            }
            self.persist();
        }
    }

    fn view(&self) -> PodView {
        let initialized = self.pending_init().is_none();
        let (init_containers, containers): (Vec<_>, Vec<_>) = self
            .ctrs
            .iter()
            .map(|c| {
                let r = self
                    .rec
                    .containers
                    .get(&c.spec.name)
                    .cloned()
                    .unwrap_or_default();
                let running = c.proc.is_some();
                let state = if running {
                    CState::Running {
                        started_at: r.started_at.unwrap_or_else(crate::now),
                    }
                } else if let Some(t) = &r.terminated {
                    CState::Terminated(t.clone())
                } else if let Some((reason, message)) = &c.waiting {
                    CState::Waiting {
                        reason: reason.clone(),
                        message: message.clone(),
                    }
                } else if !c.init && !initialized {
                    CState::Waiting {
                        reason: "PodInitializing".into(),
                        message: None,
                    }
                } else {
                    CState::Waiting {
                        reason: "ContainerCreating".into(),
                        message: None,
                    }
                };
                let ready = running && c.readiness.as_ref().is_none_or(|p| *p.verdict.borrow());
                let last = match &state {
                    CState::Terminated(t) if r.last.as_ref() == Some(t) => None,
                    _ => r.last.clone(),
                };
                let view = ContainerView {
                    name: c.spec.name.clone(),
                    image: c.spec.image.clone().unwrap_or_default(),
                    state,
                    last,
                    restart_count: r.restart_count,
                    ready: ready
                        || (c.init && r.terminated.as_ref().is_some_and(|t| t.exit_code == 0)),
                    started: running,
                    container_id: c.proc.as_ref().map(|p| format!("ballast://{}", p.pid)),
                };
                (c.init, view)
            })
            .partition(|(init, _)| *init);
        PodView {
            init_containers: init_containers.into_iter().map(|(_, v)| v).collect(),
            initialized,
            containers: containers.into_iter().map(|(_, v)| v).collect(),
            restart_policy: self.policy,
            host_ip: self.ctx.ip.to_string(),
            pod_ip: self.ctx.ip.to_string(),
            start_time: self.rec.start_time,
        }
    }

    /// Queue the status if it changed.
    fn publish(&mut self) {
        if self.inert
            && self.last_status.is_none()
            && self
                .rec
                .containers
                .values()
                .all(|r| r.terminated.is_none() && r.last.is_none())
        {
            return;
        }
        let view = self.view();
        let st = pod_status::compute(&view, self.last_status.as_ref(), crate::now());
        self.ctx
            .set_running(&self.uid, st.phase.as_deref() == Some("Running"));
        if self.last_status.as_ref() == Some(&st) {
            return;
        }
        self.ctx
            .statuses
            .set(&self.uid, &self.ns(), &self.name(), st.clone());
        self.last_status = Some(st);
    }
}

/// Keep log files within bounds, every second, until `shutdown`.
pub(crate) async fn rotate_logs_loop(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => ctx.rotate_logs(),
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::Route;
    use ballast_config::ApiRoute;
    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    /// A context whose API is unreachable (the pods must not need it).
    fn ctx(dir: &std::path::Path, stopping: CancellationToken) -> Arc<Ctx> {
        let metrics = Metrics::new();
        let api = Arc::new(Api::plain(
            Route::new(ApiRoute::Url("http://127.0.0.1:1".into())),
            metrics.clone(),
        ));
        let state = Arc::new(StateFile::load(dir.join("state.json")).unwrap());
        Ctx::new(
            "w1".into(),
            "127.0.0.1".parse().unwrap(),
            dir.to_path_buf(),
            1 << 20,
            api,
            state,
            StatusSync::new(),
            metrics,
            BackoffConfig::new(Duration::from_millis(100), Duration::from_millis(400)),
            stopping,
            Confiner::plain(),
        )
    }

    fn pod(uid: &str, script: &str, policy: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(format!("p-{uid}")),
                namespace: Some("default".into()),
                uid: Some(uid.into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("w1".into()),
                restart_policy: Some(policy.into()),
                termination_grace_period_seconds: Some(2),
                containers: vec![Container {
                    name: "c".into(),
                    image: Some("busybox".into()),
                    command: Some(vec!["sh".into(), "-c".into(), script.into()]),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_grace_period_near_i64_max_does_not_panic_the_worker() {
        let d = tempfile::tempdir().unwrap();
        let stop = CancellationToken::new();
        let c = ctx(d.path(), stop.clone());
        let mut m = Manager::new(c.clone());
        // ignores SIGTERM: the worker waits out the grace (forever, here) without panicking
        let script = "trap '' TERM; exec sleep 30";
        m.upsert(pod("g1", script, "Always"));
        let pid = wait("g1 started", || pid_of(&c, "g1")).await;
        let mut deleting = pod("g1", script, "Always");
        deleting.metadata.deletion_timestamp = Some(Time(crate::now()));
        deleting.metadata.deletion_grace_period_seconds = Some(i64::MAX - 1);
        m.upsert(deleting);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !m.pods["g1"].task.is_finished(),
            "the pod's task ended (panicked?)"
        );
        assert!(process::start_ticks(pid).is_some(), "SIGKILL came early");
        nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }

    #[test]
    fn container_names_that_are_not_labels_are_never_run() {
        let mut p = pod("n1", "true", "Never");
        assert_eq!(unsafe_container_name(&p), None);
        p.spec.as_mut().unwrap().init_containers = Some(vec![Container {
            name: "../../x".into(),
            ..Default::default()
        }]);
        assert_eq!(unsafe_container_name(&p).as_deref(), Some("../../x"));
    }

    fn pid_of(ctx: &Ctx, uid: &str) -> Option<u32> {
        ctx.state.snapshot().pods.get(uid)?.containers.get("c")?.pid
    }

    async fn wait<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        for _ in 0..200 {
            if let Some(v) = f() {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_adopts_restarts_and_stops_without_an_api() {
        let d = tempfile::tempdir().unwrap();
        let stop1 = CancellationToken::new();
        let c1 = ctx(d.path(), stop1.clone());
        let mut m = Manager::new(c1.clone());
        m.upsert(pod("u1", "echo hi; exec sleep 30", "Always"));
        m.upsert(pod("u2", "exit 3", "OnFailure"));
        let pid = wait("u1 started", || pid_of(&c1, "u1")).await;
        assert!(process::start_ticks(pid).is_some());
        // OnFailure with exit 3: restarted with back-off, restart count grows.
        wait("u2 restarted twice", || {
            let r = c1
                .state
                .snapshot()
                .pods
                .get("u2")?
                .containers
                .get("c")?
                .clone();
            (r.restart_count >= 2 && r.last.as_ref()?.exit_code == 3).then_some(())
        })
        .await;

        // The worker "crashes": its tasks vanish, the process stays.
        for (_, h) in m.pods.drain() {
            h.task.abort();
        }
        // Nothing may kill it meanwhile (a wait for something that must not happen).
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(process::start_ticks(pid).is_some());

        // The next worker adopts the process: same pid, no second one.
        let stop2 = CancellationToken::new();
        let c2 = ctx(d.path(), stop2.clone());
        let mut m2 = Manager::new(c2.clone());
        wait(
            "the next worker adopts u1 (and no second process runs)",
            || {
                let running = c2.metrics.containers_running.get();
                let want = 1 + i64::from(pid_of(&c2, "u2").is_some());
                (pid_of(&c2, "u1") == Some(pid) && running == want).then_some(())
            },
        )
        .await;
        let log = logs::container_log(&logs::pod_dir(d.path(), "default", "p-u1", "u1"), "c");
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "hi\n");

        // Graceful deletion stops the process (confirming fails: no API; it keeps trying).
        let mut deleting = pod("u1", "echo hi; exec sleep 30", "Always");
        deleting.metadata.deletion_timestamp = Some(Time(crate::now()));
        deleting.metadata.deletion_grace_period_seconds = Some(1);
        m2.upsert(deleting);
        wait("u1 stopped", || {
            process::start_ticks(pid).is_none().then_some(())
        })
        .await;
        // Gone from the API: forgotten.
        m2.gone("u1");
        wait("u1 forgotten, its logs too", || {
            (!c2.state.snapshot().pods.contains_key("u1") && !log.exists()).then_some(())
        })
        .await;

        // Worker shutdown stops the remaining processes but remembers the pod.
        m2.upsert(pod("u3", "exec sleep 30", "Always"));
        let pid3 = wait("u3 started", || pid_of(&c2, "u3")).await;
        stop2.cancel();
        tokio::time::timeout(Duration::from_secs(10), m2.wait_all())
            .await
            .unwrap();
        assert!(process::start_ticks(pid3).is_none());
        let rec = c2.state.snapshot().pods["u3"].containers["c"].clone();
        assert_eq!(rec.pid, None);
        assert_eq!(rec.last.unwrap().exit_code, 143);
        assert_eq!(c2.metrics.containers_running.get(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn args_without_a_command_are_the_command() {
        let d = tempfile::tempdir().unwrap();
        let c = ctx(d.path(), CancellationToken::new());
        let mut m = Manager::new(c.clone());
        let mut p = pod("a1", "", "Never");
        let ctr = &mut p.spec.as_mut().unwrap().containers[0];
        ctr.command = None;
        ctr.args = Some(vec!["sh".into(), "-c".into(), "echo once".into()]);
        m.upsert(p);
        let log = logs::container_log(&logs::pod_dir(d.path(), "default", "p-a1", "a1"), "c");
        wait("the args ran", || {
            (std::fs::read_to_string(&log).ok()? == "once\n").then_some(())
        })
        .await;
    }

    #[tokio::test]
    async fn a_container_without_a_command_waits_with_a_reason() {
        let d = tempfile::tempdir().unwrap();
        let c = ctx(d.path(), CancellationToken::new());
        let mut m = Manager::new(c.clone());
        let mut p = pod("n1", "", "Always");
        p.spec.as_mut().unwrap().containers[0].command = None;
        p.spec.as_mut().unwrap().containers[0].args = None;
        m.upsert(p);
        let st = wait("a status", || {
            let st = c.statuses.pending_status("n1")?;
            let w = st.container_statuses.as_ref()?[0]
                .state
                .as_ref()?
                .waiting
                .clone()?;
            Some((st.phase.clone(), w.reason))
        })
        .await;
        assert_eq!(st, (Some("Pending".into()), Some("NoCommand".into())));
    }
}
