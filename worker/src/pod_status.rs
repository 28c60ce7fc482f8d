//! Pod status computation (pure logic): from what the worker knows about each container
//! to the `PodStatus` it reports.

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::backoff::RestartPolicy;

/// How a container run ended; persisted, so it survives a worker restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Termination {
    pub exit_code: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// `Completed`, `Error`, `StartError`, `ContainerStatusUnknown`...
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    pub finished_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
}

impl Termination {
    /// The reason the kubelet gives an exit code.
    pub(crate) fn reason_for(exit_code: i32) -> &'static str {
        if exit_code == 0 {
            "Completed"
        } else {
            "Error"
        }
    }
}

/// The current state of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CState {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: Timestamp,
    },
    Terminated(Termination),
}

/// Everything the status needs about one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ContainerView {
    pub name: String,
    pub image: String,
    pub state: CState,
    pub last: Option<Termination>,
    pub restart_count: i32,
    /// Running and passing its readiness probe (if any).
    pub ready: bool,
    /// Running and past its startup probe (if any).
    pub started: bool,
    /// `ballast://PID` of the running process.
    pub container_id: Option<String>,
}

/// Everything the status needs about one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PodView {
    pub init_containers: Vec<ContainerView>,
    /// Every init container succeeded.
    pub initialized: bool,
    pub containers: Vec<ContainerView>,
    pub restart_policy: RestartPolicy,
    pub host_ip: String,
    pub pod_ip: String,
    pub start_time: Option<Timestamp>,
}

/// The pod phase, like the kubelet's `getPhase`.
pub(crate) fn phase(view: &PodView) -> &'static str {
    if !view.initialized {
        let failed_for_good = view.restart_policy == RestartPolicy::Never
            && view
                .init_containers
                .iter()
                .any(|c| matches!(&c.state, CState::Terminated(t) if t.exit_code != 0));
        return if failed_for_good { "Failed" } else { "Pending" };
    }
    let (mut running, mut waiting_first, mut waiting_again) = (0, 0, 0);
    let (mut succeeded, mut failed) = (0, 0);
    for c in &view.containers {
        match &c.state {
            CState::Running { .. } => running += 1,
            CState::Waiting { .. } if c.last.is_some() => waiting_again += 1,
            CState::Waiting { .. } => waiting_first += 1,
            CState::Terminated(t) if t.exit_code == 0 => succeeded += 1,
            CState::Terminated(_) => failed += 1,
        }
    }
    if view.containers.is_empty() || waiting_first > 0 {
        "Pending"
    } else if running > 0 || waiting_again > 0 {
        "Running"
    } else if view.restart_policy == RestartPolicy::Always {
        // Everything exited but will be started again.
        "Running"
    } else if failed > 0 {
        "Failed"
    } else {
        debug_assert!(succeeded > 0);
        "Succeeded"
    }
}

fn time(t: Timestamp) -> Time {
    Time(t)
}

fn terminated(t: &Termination) -> ContainerStateTerminated {
    ContainerStateTerminated {
        exit_code: t.exit_code,
        signal: t.signal,
        reason: Some(t.reason.clone()),
        message: t.message.clone(),
        started_at: t.started_at.map(time),
        finished_at: Some(time(t.finished_at)),
        container_id: t.container_id.clone(),
    }
}

fn state(s: &CState) -> ContainerState {
    match s {
        CState::Waiting { reason, message } => ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.clone()),
                message: message.clone(),
            }),
            ..Default::default()
        },
        CState::Running { started_at } => ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(time(*started_at)),
            }),
            ..Default::default()
        },
        CState::Terminated(t) => ContainerState {
            terminated: Some(terminated(t)),
            ..Default::default()
        },
    }
}

fn container_status(c: &ContainerView) -> ContainerStatus {
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone(),
        image_id: String::new(),
        container_id: c.container_id.clone(),
        state: Some(state(&c.state)),
        last_state: c.last.as_ref().map(|t| ContainerState {
            terminated: Some(terminated(t)),
            ..Default::default()
        }),
        ready: c.ready,
        restart_count: c.restart_count,
        started: Some(c.started),
        ..Default::default()
    }
}

fn condition(
    prev: Option<&PodStatus>,
    now: Timestamp,
    type_: &str,
    ok: bool,
    reason: Option<&str>,
) -> PodCondition {
    let status = if ok { "True" } else { "False" };
    let since = prev
        .and_then(|p| p.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    PodCondition {
        type_: type_.into(),
        status: status.into(),
        last_transition_time: Some(since),
        reason: if ok { None } else { reason.map(str::to_string) },
        ..Default::default()
    }
}

/// The status to report. `prev` (the last one reported) keeps condition transition times.
pub(crate) fn compute(view: &PodView, prev: Option<&PodStatus>, now: Timestamp) -> PodStatus {
    let phase = phase(view);
    let all_ready = !view.containers.is_empty() && view.containers.iter().all(|c| c.ready);
    let all_ready = all_ready && view.initialized;
    let not_ready_reason = if phase == "Succeeded" || phase == "Failed" {
        "PodCompleted"
    } else if !view.initialized {
        "ContainersNotInitialized"
    } else {
        "ContainersNotReady"
    };
    let conditions = vec![
        condition(prev, now, "PodReadyToStartContainers", true, None),
        condition(
            prev,
            now,
            "Initialized",
            view.initialized,
            Some("ContainersNotInitialized"),
        ),
        condition(prev, now, "Ready", all_ready, Some(not_ready_reason)),
        condition(
            prev,
            now,
            "ContainersReady",
            all_ready,
            Some(not_ready_reason),
        ),
        condition(prev, now, "PodScheduled", true, None),
    ];
    PodStatus {
        phase: Some(phase.into()),
        conditions: Some(conditions),
        container_statuses: Some(view.containers.iter().map(container_status).collect()),
        init_container_statuses: (!view.init_containers.is_empty())
            .then(|| view.init_containers.iter().map(container_status).collect()),
        host_ip: Some(view.host_ip.clone()),
        host_ips: Some(vec![HostIP {
            ip: view.host_ip.clone(),
        }]),
        pod_ip: Some(view.pod_ip.clone()),
        pod_ips: Some(vec![PodIP {
            ip: view.pod_ip.clone(),
        }]),
        start_time: view.start_time.map(time),
        qos_class: Some("BestEffort".into()),
        ..Default::default()
    }
}

/// Whether two statuses differ in anything but condition times (to skip no-op updates).
#[cfg(test)]
pub(crate) fn same(a: &PodStatus, b: &PodStatus) -> bool {
    a == b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    fn c(state: CState, last: Option<Termination>, ready: bool) -> ContainerView {
        ContainerView {
            name: "c".into(),
            image: "busybox".into(),
            state,
            last,
            restart_count: 0,
            ready,
            started: ready,
            container_id: None,
        }
    }

    fn term(code: i32) -> Termination {
        Termination {
            exit_code: code,
            signal: None,
            reason: Termination::reason_for(code).into(),
            message: None,
            started_at: Some(ts(0)),
            finished_at: ts(1),
            container_id: None,
        }
    }

    fn pod(policy: RestartPolicy, cs: Vec<ContainerView>) -> PodView {
        PodView {
            init_containers: Vec::new(),
            initialized: true,
            containers: cs,
            restart_policy: policy,
            host_ip: "127.0.2.1".into(),
            pod_ip: "127.0.2.1".into(),
            start_time: Some(ts(0)),
        }
    }

    fn waiting(reason: &str) -> CState {
        CState::Waiting {
            reason: reason.into(),
            message: None,
        }
    }

    #[test]
    fn phases() {
        use RestartPolicy::*;
        let running = CState::Running { started_at: ts(0) };
        assert_eq!(
            phase(&pod(
                Always,
                vec![c(waiting("ContainerCreating"), None, false)]
            )),
            "Pending"
        );
        assert_eq!(
            phase(&pod(Always, vec![c(waiting("NoCommand"), None, false)])),
            "Pending"
        );
        assert_eq!(
            phase(&pod(Always, vec![c(running.clone(), None, true)])),
            "Running"
        );
        assert_eq!(
            phase(&pod(
                Always,
                vec![c(waiting("CrashLoopBackOff"), Some(term(1)), false)]
            )),
            "Running"
        );
        assert_eq!(
            phase(&pod(
                Never,
                vec![c(CState::Terminated(term(0)), None, false)]
            )),
            "Succeeded"
        );
        assert_eq!(
            phase(&pod(
                OnFailure,
                vec![
                    c(CState::Terminated(term(0)), None, false),
                    c(CState::Terminated(term(2)), None, false)
                ]
            )),
            "Failed"
        );
        assert_eq!(
            phase(&pod(
                OnFailure,
                vec![
                    c(CState::Terminated(term(0)), None, false),
                    c(running, None, true)
                ]
            )),
            "Running"
        );
    }

    #[test]
    fn conditions_follow_readiness_and_keep_transition_times() {
        let running = CState::Running { started_at: ts(0) };
        let v = pod(RestartPolicy::Always, vec![c(running.clone(), None, false)]);
        let s1 = compute(&v, None, ts(5));
        let ready = |s: &PodStatus| {
            s.conditions
                .as_ref()
                .unwrap()
                .iter()
                .find(|c| c.type_ == "Ready")
                .unwrap()
                .clone()
        };
        assert_eq!(ready(&s1).status, "False");
        assert_eq!(ready(&s1).reason.as_deref(), Some("ContainersNotReady"));
        let s2 = compute(&v, Some(&s1), ts(9));
        assert_eq!(ready(&s2).last_transition_time, Some(Time(ts(5))));
        assert!(same(&s1, &s2));
        let v = pod(RestartPolicy::Always, vec![c(running, None, true)]);
        let s3 = compute(&v, Some(&s2), ts(10));
        assert_eq!(ready(&s3).status, "True");
        assert_eq!(ready(&s3).last_transition_time, Some(Time(ts(10))));
        let cs = &s3.container_statuses.as_ref().unwrap()[0];
        assert!(cs.ready);
        assert!(cs.state.as_ref().unwrap().running.is_some());
        assert_eq!(s3.pod_ip.as_deref(), Some("127.0.2.1"));
        assert_eq!(s3.phase.as_deref(), Some("Running"));
    }

    #[test]
    fn init_containers_gate_the_pod() {
        let mut v = pod(
            RestartPolicy::Always,
            vec![c(waiting("PodInitializing"), None, false)],
        );
        v.initialized = false;
        v.init_containers = vec![c(CState::Running { started_at: ts(0) }, None, false)];
        assert_eq!(phase(&v), "Pending");
        let s = compute(&v, None, ts(1));
        let init = s
            .conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == "Initialized")
            .unwrap()
            .clone();
        assert_eq!(init.status, "False");
        assert_eq!(s.init_container_statuses.as_ref().unwrap().len(), 1);
        v.restart_policy = RestartPolicy::Never;
        v.init_containers = vec![c(CState::Terminated(term(1)), None, false)];
        assert_eq!(phase(&v), "Failed");
    }

    #[test]
    fn last_state_and_restart_count() {
        let mut cv = c(waiting("CrashLoopBackOff"), Some(term(3)), false);
        cv.restart_count = 4;
        let s = compute(&pod(RestartPolicy::Always, vec![cv]), None, ts(0));
        let cs = &s.container_statuses.unwrap()[0];
        assert_eq!(cs.restart_count, 4);
        let last = cs.last_state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!(last.exit_code, 3);
        assert_eq!(last.reason.as_deref(), Some("Error"));
        let w = cs.state.as_ref().unwrap().waiting.as_ref().unwrap();
        assert_eq!(w.reason.as_deref(), Some("CrashLoopBackOff"));
    }
}
