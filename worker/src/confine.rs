//! What a container process may be and use, decided from its pod (pure; the IO is in
//! [`crate::process`] and [`crate::cgroup`]).
//!
//! A process runtime has no namespaces to hide a pod in, so confinement is what the
//! kernel gives any process: its own session (a pod that calls `setsid` again still
//! stays in its cgroup), the user and group of `securityContext`, resource limits
//! (`RLIMIT_CORE` 0, `RLIMIT_NOFILE`), and a cgroup per container whose limits come from
//! `resources.limits` and which is killed whole when the container stops.

use k8s_openapi::api::core::v1::{Container, PodSecurityContext, SecurityContext};

/// Who a container runs as; `None` keeps the worker's own id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct RunAs {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl RunAs {
    /// Whether the process runs as a user other than the worker's (it then needs its own
    /// working directory and exit file, see [`crate::pods`]).
    pub(crate) fn differs_from(&self, worker_uid: u32) -> bool {
        self.uid.is_some_and(|u| u != worker_uid)
    }
}

/// A pod's `securityContext` that cannot be honoured. Retrying does not help until the
/// pod changes: the container waits with `CreateContainerConfigError`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RunAsError {
    #[error("{field} {value} is not a valid id (0..=4294967294)")]
    BadId { field: &'static str, value: i64 },
    #[error("container has runAsNonRoot and would run as root (uid 0): set runAsUser")]
    WouldRunAsRoot,
    #[error(
        "{field} {value} needs a worker running as root; this worker runs as uid {worker_uid}"
    )]
    NeedsRoot {
        field: &'static str,
        value: u32,
        worker_uid: u32,
    },
}

fn id(field: &'static str, v: Option<i64>) -> Result<Option<u32>, RunAsError> {
    v.map(|value| {
        u32::try_from(value)
            .ok()
            .filter(|&u| u != u32::MAX)
            .ok_or(RunAsError::BadId { field, value })
    })
    .transpose()
}

/// The user and group container `c` runs as: the container's `securityContext` first,
/// then the pod's, as the kubelet does. A worker that is not root can only run
/// processes as itself.
pub(crate) fn run_as(
    pod: Option<&PodSecurityContext>,
    c: Option<&SecurityContext>,
    worker: (u32, u32),
) -> Result<RunAs, RunAsError> {
    let uid = id(
        "runAsUser",
        c.and_then(|s| s.run_as_user)
            .or_else(|| pod.and_then(|s| s.run_as_user)),
    )?;
    let gid = id(
        "runAsGroup",
        c.and_then(|s| s.run_as_group)
            .or_else(|| pod.and_then(|s| s.run_as_group)),
    )?;
    let non_root = c
        .and_then(|s| s.run_as_non_root)
        .or_else(|| pod.and_then(|s| s.run_as_non_root))
        .unwrap_or(false);
    let (worker_uid, worker_gid) = worker;
    if non_root && uid.unwrap_or(worker_uid) == 0 {
        return Err(RunAsError::WouldRunAsRoot);
    }
    if worker_uid != 0 {
        for (field, value, mine) in [
            ("runAsUser", uid, worker_uid),
            ("runAsGroup", gid, worker_gid),
        ] {
            if let Some(value) = value.filter(|&v| v != mine) {
                return Err(RunAsError::NeedsRoot {
                    field,
                    value,
                    worker_uid,
                });
            }
        }
        return Ok(RunAs::default());
    }
    // A user without a group keeps root's group no more: as the kubelet does with an
    // image that names no group, the group is the user's id.
    Ok(RunAs {
        uid,
        gid: gid.or(uid),
    })
}

/// cgroup v2 limits of one container, in the files' own units.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Limits {
    /// `memory.max`, bytes.
    pub memory: Option<u64>,
    /// `cpu.max` quota per [`CPU_PERIOD_US`], microseconds.
    pub cpu_quota_us: Option<u64>,
    /// `pids.max`.
    pub pids: Option<u64>,
}

/// The `cpu.max` period (the kernel's default, as the kubelet uses).
pub(crate) const CPU_PERIOD_US: u64 = 100_000;
/// The smallest quota the kernel takes.
const MIN_CPU_QUOTA_US: u64 = 1_000;

impl Limits {
    /// From `resources.limits` (quantities the API validated; one it cannot read sets
    /// no limit) and the worker's per-container pids limit.
    pub(crate) fn of(c: &Container, pids: u64) -> Self {
        let limits = c.resources.as_ref().and_then(|r| r.limits.as_ref());
        let quantity = |name: &str| {
            limits
                .and_then(|l| l.get(name))
                .and_then(|q| ballast_config::validate::parse_quantity(&q.0))
                .filter(|v| v.is_finite() && *v > 0.0)
        };
        Self {
            memory: quantity("memory").map(|b| b.ceil() as u64),
            cpu_quota_us: quantity("cpu")
                .map(|cores| ((cores * CPU_PERIOD_US as f64).ceil() as u64).max(MIN_CPU_QUOTA_US)),
            pids: (pids > 0).then_some(pids),
        }
    }

    /// The files to write in the container's cgroup: (controller, file, value).
    pub(crate) fn files(&self) -> Vec<(&'static str, &'static str, String)> {
        let mut out = Vec::new();
        if let Some(m) = self.memory {
            out.push(("memory", "memory.max", m.to_string()));
            // no swap beyond the limit, as a container's memory limit means
            out.push(("memory", "memory.swap.max", "0".to_string()));
        }
        if let Some(q) = self.cpu_quota_us {
            out.push(("cpu", "cpu.max", format!("{q} {CPU_PERIOD_US}")));
        }
        if let Some(p) = self.pids {
            out.push(("pids", "pids.max", p.to_string()));
        }
        out
    }
}

/// The open-files limit a pod gets: the configured one, never above what the worker
/// itself may raise to.
pub(crate) fn open_files(configured: u64, worker_hard: u64) -> u64 {
    configured.min(worker_hard).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ResourceRequirements;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn sc(user: Option<i64>, group: Option<i64>, non_root: Option<bool>) -> SecurityContext {
        SecurityContext {
            run_as_user: user,
            run_as_group: group,
            run_as_non_root: non_root,
            ..Default::default()
        }
    }

    #[test]
    fn the_container_overrides_the_pod_and_the_group_defaults_to_the_user() {
        let pod = PodSecurityContext {
            run_as_user: Some(1000),
            run_as_group: Some(3000),
            ..Default::default()
        };
        let got = run_as(Some(&pod), Some(&sc(Some(2000), None, None)), (0, 0)).unwrap();
        assert_eq!(
            got,
            RunAs {
                uid: Some(2000),
                gid: Some(3000)
            }
        );
        let got = run_as(None, Some(&sc(Some(2000), None, None)), (0, 0)).unwrap();
        assert_eq!(
            got,
            RunAs {
                uid: Some(2000),
                gid: Some(2000)
            }
        );
        assert_eq!(run_as(None, None, (0, 0)).unwrap(), RunAs::default());
    }

    #[test]
    fn run_as_non_root_refuses_root() {
        assert_eq!(
            run_as(None, Some(&sc(None, None, Some(true))), (0, 0)),
            Err(RunAsError::WouldRunAsRoot)
        );
        assert_eq!(
            run_as(None, Some(&sc(Some(0), None, Some(true))), (0, 0)),
            Err(RunAsError::WouldRunAsRoot)
        );
        assert!(run_as(None, Some(&sc(Some(7), None, Some(true))), (0, 0)).is_ok());
        // a worker that is not root runs everything as itself
        assert!(run_as(None, Some(&sc(None, None, Some(true))), (1000, 1000)).is_ok());
    }

    #[test]
    fn a_worker_that_is_not_root_runs_only_as_itself() {
        let e = run_as(None, Some(&sc(Some(0), None, None)), (1000, 1000)).unwrap_err();
        assert!(
            e.to_string().contains("needs a worker running as root"),
            "{e}"
        );
        let ok = run_as(None, Some(&sc(Some(1000), Some(1000), None)), (1000, 1000)).unwrap();
        assert_eq!(ok, RunAs::default());
        assert!(run_as(None, Some(&sc(None, Some(5), None)), (1000, 1000)).is_err());
    }

    #[test]
    fn ids_out_of_range_are_refused() {
        for bad in [-1, 4_294_967_295, i64::MAX] {
            assert!(matches!(
                run_as(None, Some(&sc(Some(bad), None, None)), (0, 0)),
                Err(RunAsError::BadId { .. })
            ));
        }
    }

    #[test]
    fn limits_become_cgroup_files() {
        let mut c = Container {
            resources: Some(ResourceRequirements {
                limits: Some(
                    [
                        ("cpu".to_string(), Quantity("250m".into())),
                        ("memory".to_string(), Quantity("64Mi".into())),
                    ]
                    .into(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        let l = Limits::of(&c, 4096);
        assert_eq!(l.memory, Some(64 * 1024 * 1024));
        assert_eq!(l.cpu_quota_us, Some(25_000));
        let files = l.files();
        assert!(files.contains(&("cpu", "cpu.max", "25000 100000".to_string())));
        assert!(files.contains(&("memory", "memory.max", "67108864".to_string())));
        assert!(files.contains(&("pids", "pids.max", "4096".to_string())));
        // the kernel's smallest quota
        c.resources
            .as_mut()
            .unwrap()
            .limits
            .as_mut()
            .unwrap()
            .insert("cpu".into(), Quantity("1m".into()));
        assert_eq!(Limits::of(&c, 0).cpu_quota_us, Some(1_000));
        assert_eq!(Limits::of(&Container::default(), 0), Limits::default());
    }

    #[test]
    fn open_files_never_exceed_the_workers_hard_limit() {
        assert_eq!(open_files(65536, 20_000), 20_000);
        assert_eq!(open_files(1024, 20_000), 1024);
    }
}
