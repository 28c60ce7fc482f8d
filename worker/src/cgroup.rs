//! A cgroup v2 per container: `<the worker's cgroup>/ballast-<node>/<pod uid>/<container>`.
//!
//! The cgroup is what makes "stop the container" exact: every process the container
//! started is in it whatever it did with sessions and process groups, and
//! `cgroup.kill` ends them all at once. Its limits (`memory.max`, `cpu.max`,
//! `pids.max`) apply where the worker may enable those controllers; where it may not
//! (cgroup v1 hosts, a hybrid layout whose controllers are bound to v1, a container
//! without delegation) the worker says so at start and on each pod that asks for limits,
//! and runs pods without them.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::confine::Limits;

/// The controllers the worker enables for its pods.
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// Why pods cannot be placed in cgroups at all.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CgroupError {
    #[error("no cgroup v2 hierarchy is mounted")]
    NotMounted,
    #[error("this process has no cgroup v2 path in /proc/self/cgroup")]
    NoPath,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The worker's cgroups.
#[derive(Debug)]
pub(crate) struct Cgroups {
    base: PathBuf,
    /// The controllers enabled for containers (a subset of [`CONTROLLERS`]).
    enabled: Vec<&'static str>,
    /// Why the others are not, for logs and events.
    missing: Option<String>,
}

/// The cgroup v2 mount point, from `/proc/self/mountinfo` (field 5 of the line whose
/// filesystem type, after the `-` separator, is `cgroup2`).
fn mount_point(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// This process's cgroup v2 path (the `0::` line of `/proc/self/cgroup`).
fn own_path(cgroup: &str) -> Option<&str> {
    cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

fn write_file(path: &Path, value: &str) -> io::Result<()> {
    fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all(value.as_bytes())
}

fn mkdir(path: &Path) -> io::Result<()> {
    match fs::create_dir(path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        r => r,
    }
}

/// Enable `wanted` controllers for the children of `dir`; returns those enabled.
fn enable(dir: &Path, wanted: &[&'static str]) -> Vec<&'static str> {
    let file = dir.join("cgroup.subtree_control");
    wanted
        .iter()
        .copied()
        .filter(|c| write_file(&file, &format!("+{c}")).is_ok())
        .collect()
}

fn available(dir: &Path) -> Vec<String> {
    fs::read_to_string(dir.join("cgroup.controllers"))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Remove the empty pod and container cgroups below `base` (left by a worker that was
/// killed, or by pods gone meanwhile). A cgroup that holds a process cannot be removed,
/// so running pods keep theirs.
fn remove_empty(base: &Path) {
    let Ok(pods) = fs::read_dir(base) else {
        return;
    };
    for pod in pods.flatten().map(|e| e.path()).filter(|p| p.is_dir()) {
        if let Ok(containers) = fs::read_dir(&pod) {
            for c in containers
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
            {
                let _busy = fs::remove_dir(&c);
            }
        }
        let _busy = fs::remove_dir(&pod);
    }
}

impl Cgroups {
    /// Set up `ballast-<node>` under this process's cgroup and enable what controllers
    /// it can.
    pub(crate) fn open(node: &str) -> Result<Self, CgroupError> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(io_at(Path::new("/proc/self/mountinfo")))?;
        let mount = mount_point(&mountinfo).ok_or(CgroupError::NotMounted)?;
        let mine = fs::read_to_string("/proc/self/cgroup")
            .map_err(io_at(Path::new("/proc/self/cgroup")))?;
        let own = mount.join(
            own_path(&mine)
                .ok_or(CgroupError::NoPath)?
                .trim_start_matches('/'),
        );
        let base = own.join(format!("ballast-{node}"));
        mkdir(&base).map_err(io_at(&base))?;
        remove_empty(&base);
        let there = available(&own);
        let wanted: Vec<&'static str> = CONTROLLERS
            .into_iter()
            .filter(|c| there.iter().any(|t| t == c))
            .collect();
        // A cgroup other than the root may not both hold processes and give controllers
        // to children; a worker alone in its (delegated) cgroup, e.g. a systemd unit with
        // `Delegate=yes`, moves itself into a leaf beside its pods first.
        let mut parent_ok = enable(&own, &wanted);
        if parent_ok.len() < wanted.len() && own != mount {
            let leaf = own.join(format!("ballast-{node}-worker"));
            if mkdir(&leaf).is_ok() && write_file(&leaf.join("cgroup.procs"), "0").is_ok() {
                parent_ok = enable(&own, &wanted);
            }
        }
        let enabled = enable(&base, &parent_ok);
        let missing: Vec<&str> = CONTROLLERS
            .into_iter()
            .filter(|c| !enabled.contains(c))
            .collect();
        let missing = (!missing.is_empty()).then(|| {
            format!(
                "cgroup v2 controller(s) {} not available to the worker at {} (available there: {}); pods run without those limits",
                missing.join(", "),
                own.display(),
                if there.is_empty() { "none".to_string() } else { there.join(" ") }
            )
        });
        Ok(Self {
            base,
            enabled,
            missing,
        })
    }

    /// Why some limits are not applied, if so.
    pub(crate) fn missing(&self) -> Option<&str> {
        self.missing.as_deref()
    }

    fn pod_dir(&self, pod_uid: &str) -> PathBuf {
        self.base.join(pod_uid)
    }

    /// The cgroup of one container.
    pub(crate) fn dir(&self, pod_uid: &str, container: &str) -> PathBuf {
        self.pod_dir(pod_uid).join(container)
    }

    /// Create container `container`'s cgroup with `limits`; returns its directory. Limits
    /// whose controller is not enabled are left out (see [`Self::missing`]); the rest
    /// must apply, or the container does not start.
    pub(crate) fn prepare(
        &self,
        pod_uid: &str,
        container: &str,
        limits: &Limits,
    ) -> Result<PathBuf, CgroupError> {
        let pod = self.pod_dir(pod_uid);
        mkdir(&pod).map_err(io_at(&pod))?;
        enable(&pod, &self.enabled);
        let dir = self.dir(pod_uid, container);
        mkdir(&dir).map_err(io_at(&dir))?;
        for (controller, file, value) in limits.files() {
            if !self.enabled.contains(&controller) {
                continue;
            }
            let path = dir.join(file);
            match write_file(&path, &value) {
                // no swap accounting on this kernel: the memory limit still holds
                Err(e) if file == "memory.swap.max" && e.kind() == io::ErrorKind::NotFound => {}
                r => r.map_err(io_at(&path))?,
            }
        }
        Ok(dir)
    }

    /// The processes in a container's cgroup now.
    pub(crate) fn procs(&self, pod_uid: &str, container: &str) -> Vec<u32> {
        fs::read_to_string(self.dir(pod_uid, container).join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Send `sig` to every process of a container.
    pub(crate) fn signal(&self, pod_uid: &str, container: &str, sig: Signal) {
        for pid in self.procs(pod_uid, container) {
            match kill(Pid::from_raw(pid as i32), sig) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => {
                    tracing::warn!(pid, signal = %sig, error = %e, "cannot signal a container process")
                }
            }
        }
    }

    /// SIGKILL every process of a container at once (`cgroup.kill`; signalled one by one
    /// on kernels before 5.14).
    pub(crate) fn kill(&self, pod_uid: &str, container: &str) {
        let dir = self.dir(pod_uid, container);
        match write_file(&dir.join("cgroup.kill"), "1") {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound && !dir.exists() => {}
            Err(_) => self.signal(pod_uid, container, Signal::SIGKILL),
        }
    }

    /// Kill what is left of a pod and remove its cgroups. A cgroup whose killed
    /// processes have not been reaped yet is busy; its removal is retried for a moment.
    pub(crate) async fn remove_pod(&self, pod_uid: &str) {
        let pod = self.pod_dir(pod_uid);
        let Ok(entries) = fs::read_dir(&pod) else {
            return;
        };
        let containers: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        for c in &containers {
            if let Some(name) = c.file_name().and_then(|n| n.to_str()) {
                self.kill(pod_uid, name);
            }
        }
        for attempt in 0..50 {
            let left: Vec<&PathBuf> = containers.iter().filter(|c| c.exists()).collect();
            let done =
                left.iter().all(|c| fs::remove_dir(c).is_ok()) && fs::remove_dir(&pod).is_ok();
            if done {
                return;
            }
            if attempt == 49 {
                tracing::warn!(cgroup = %pod.display(), "cannot remove the pod's cgroup; processes remain in it");
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_unified_mount_in_a_hybrid_layout() {
        let info = "\
25 1 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
33 25 0:28 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 25 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            mount_point(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            mount_point("25 1 0:23 / /sys/fs/cgroup rw - cgroup cgroup rw,cpu\n"),
            None
        );
        // an optional field before the separator does not shift the mount point
        let pure =
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(mount_point(pure), Some(PathBuf::from("/sys/fs/cgroup")));
    }

    #[test]
    fn reads_the_v2_line_of_proc_self_cgroup() {
        let s = "4:memory:/x\n0::/system.slice/ballast-worker@w1.service\n";
        assert_eq!(own_path(s), Some("/system.slice/ballast-worker@w1.service"));
        assert_eq!(own_path("4:memory:/x\n"), None);
    }
}
