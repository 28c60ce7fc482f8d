//! The worker's side of confinement: prepares each container's identity, directories and
//! cgroup before it starts ([`crate::confine`] decides, [`crate::process`] applies in the
//! child), and stops containers through both their process group and their cgroup.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, Pod};
use nix::sys::signal::Signal;

use crate::cgroup::Cgroups;
use crate::confine::{self, Limits, RunAs, RunAsError};
use crate::process::{self, Confine};

/// Why a container cannot start confined.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PrepareError {
    /// The pod asks for what cannot be: it waits with `CreateContainerConfigError`.
    #[error(transparent)]
    Config(#[from] RunAsError),
    /// The host refused (a directory, a cgroup): a start error, retried with back-off.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
}

/// A container ready to start.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub confine: Confine,
    /// The working directory when the pod names none: the pod's directory, or for a
    /// container running as another user, a directory of its own inside it.
    pub default_dir: PathBuf,
    /// The limits the container asked for that this host cannot apply.
    pub unenforced: Option<String>,
}

/// Confinement settings of one worker.
pub(crate) struct Confiner {
    cgroups: Option<Cgroups>,
    open_files: u64,
    pids: u64,
    /// The worker's own user and group.
    worker: (u32, u32),
}

fn chmod(path: &Path, mode: u32) -> io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

impl Confiner {
    /// Set up the worker's cgroups (logging what it cannot) from `[worker]`.
    pub(crate) fn new(node: &str, open_files: u64, pids: u64) -> Self {
        let cgroups = match Cgroups::open(node) {
            Ok(c) => {
                if let Some(why) = c.missing() {
                    tracing::warn!("{why}");
                }
                Some(c)
            }
            Err(e) => {
                tracing::warn!(error = %e, "pods are not placed in cgroups: no resource limits, and a process that leaves its session survives its container");
                None
            }
        };
        let worker_hard =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map_or(open_files, |(_, hard)| hard);
        Self {
            cgroups,
            open_files: confine::open_files(open_files, worker_hard),
            pids,
            worker: (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            ),
        }
    }

    /// A confiner that only gives sessions and resource limits (unit tests).
    #[cfg(test)]
    pub(crate) fn plain() -> Self {
        Self {
            cgroups: None,
            open_files: 1024,
            pids: 0,
            worker: (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            ),
        }
    }

    /// Who container `c` of `pod` runs as.
    pub(crate) fn run_as(&self, pod: &Pod, c: &Container) -> Result<RunAs, RunAsError> {
        let pod_sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
        confine::run_as(pod_sc, c.security_context.as_ref(), self.worker)
    }

    /// Prepare container `c` of pod `pod_uid`, whose directory is `pod_dir`.
    pub(crate) fn prepare(
        &self,
        pod: &Pod,
        pod_uid: &str,
        pod_dir: &Path,
        c: &Container,
    ) -> Result<Prepared, PrepareError> {
        let run_as = self.run_as(pod, c)?;
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| PrepareError::Io { what, path, source }
        };
        // private to the worker unless a container runs as another user (below)
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(pod_dir)
            .map_err(io("cannot create the pod's directory", pod_dir))?;
        let default_dir = if run_as.differs_from(self.worker.0) {
            // The pod's directory holds the worker's files (logs it rotates, exit codes):
            // the container's user may pass through it, never own it, or a symlink in
            // place of a log would have the worker write where that user cannot.
            for dir in pod_dir.ancestors().take(3) {
                chmod(dir, 0o711).map_err(io("cannot open the way to", dir))?;
            }
            let own = pod_dir.join(format!("{}.work", c.name));
            std::fs::create_dir_all(&own).map_err(io("cannot create", &own))?;
            chmod(&own, 0o700).map_err(io("cannot restrict", &own))?;
            std::os::unix::fs::chown(&own, run_as.uid, run_as.gid)
                .map_err(io("cannot give the container's user", &own))?;
            own
        } else {
            pod_dir.to_path_buf()
        };
        let limits = Limits::of(c, self.pids);
        let asked = limits.memory.is_some() || limits.cpu_quota_us.is_some();
        let (cgroup, unenforced) = match &self.cgroups {
            Some(cg) => (
                Some(cg.prepare(pod_uid, &c.name, &limits)?),
                cg.missing().filter(|_| asked).map(str::to_string),
            ),
            None => (
                None,
                asked.then(|| "pods are not placed in cgroups on this worker".to_string()),
            ),
        };
        Ok(Prepared {
            confine: Confine {
                run_as,
                open_files: Some(self.open_files),
                cgroup,
            },
            default_dir,
            unenforced,
        })
    }

    /// How a probe of a running container is confined (as the container, in its cgroup)
    /// and the working directory it gets when the container names none.
    pub(crate) fn for_probe(
        &self,
        pod: &Pod,
        pod_uid: &str,
        pod_dir: &Path,
        c: &Container,
    ) -> (Confine, PathBuf) {
        let run_as = self.run_as(pod, c).unwrap_or_default();
        let dir = if run_as.differs_from(self.worker.0) {
            pod_dir.join(format!("{}.work", c.name))
        } else {
            pod_dir.to_path_buf()
        };
        let confine = Confine {
            run_as,
            open_files: Some(self.open_files),
            cgroup: self
                .cgroups
                .as_ref()
                .map(|cg| cg.dir(pod_uid, &c.name))
                .filter(|d| d.exists()),
        };
        (confine, dir)
    }

    /// Ask a container to stop: SIGTERM to its process group and to every process in
    /// its cgroup (those that left the group too).
    pub(crate) fn terminate(&self, pod_uid: &str, container: &str, pid: u32) {
        process::signal_group(pid, Signal::SIGTERM);
        if let Some(cg) = &self.cgroups {
            cg.signal(pod_uid, container, Signal::SIGTERM);
        }
    }

    /// End a container and everything it started.
    pub(crate) fn kill(&self, pod_uid: &str, container: &str, pid: Option<u32>) {
        if let Some(pid) = pid {
            process::signal_group(pid, Signal::SIGKILL);
        }
        if let Some(cg) = &self.cgroups {
            cg.kill(pod_uid, container);
        }
    }

    /// Kill whatever is left of a pod and remove its cgroups.
    pub(crate) async fn remove_pod(&self, pod_uid: &str) {
        if let Some(cg) = &self.cgroups {
            cg.remove_pod(pod_uid).await;
        }
    }
}
