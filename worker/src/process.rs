//! Container processes: spawn in their own session and process group, confined as
//! [`crate::confine`] decides (cgroup, user and group, resource limits), with output to a
//! log file; identify them across worker restarts (pid + start time from
//! `/proc/PID/stat`), signal the whole group, and learn the exit code even of a process
//! the worker did not start.
//!
//! Every container runs under a tiny `/bin/sh` wrapper, the leader of the container's
//! process group: it runs the command (`"$@"`, no shell interpretation of the command),
//! then writes the exit code to a file. So a worker that restarts and adopts the process
//! still learns how it ended (restartPolicy `OnFailure` needs it). The wrapper traps
//! TERM/INT/HUP (without ignoring them, so the command keeps the default actions) and so
//! outlives the command long enough to record its code.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{Gid, Pid, Uid};

use crate::confine::RunAs;
use crate::logs;

const WRAPPER: &str = "trap : TERM INT HUP QUIT; \"$@\"; c=$?; echo $c > \"$0\"; exit $c";

/// Errors starting a container process; none of them go away by retrying at once.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SpawnError {
    #[error("exec: {0:?}: executable file not found in $PATH")]
    NotFound(String),
    #[error("cannot open the log file {path}: {source}")]
    Log {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the previous exit file {path}: {source}")]
    StaleExitFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot prepare the exit file {path} for the container's user: {source}")]
    ExitFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot join the container's cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start {command:?}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
}

/// What to run.
#[derive(Debug, Clone)]
pub(crate) struct ProcSpec {
    /// `command` followed by `args`, after `$(VAR)` expansion.
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<PathBuf>,
    pub log: PathBuf,
    pub exit_file: PathBuf,
    pub confine: Confine,
}

/// How a process is confined (see [`crate::confine`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct Confine {
    pub run_as: RunAs,
    /// `RLIMIT_NOFILE`, soft and hard; `None` inherits the worker's.
    pub open_files: Option<u64>,
    /// The cgroup directory to start in.
    pub cgroup: Option<PathBuf>,
}

impl Confine {
    /// Confine `c`: in the child between fork and exec, join the cgroup (through a file
    /// opened here, so no allocation happens there), start a new session, set the
    /// resource limits, then drop to the user and group. Every call there is one
    /// async-signal-safe system call.
    #[allow(unsafe_code)]
    pub(crate) fn apply(&self, c: &mut tokio::process::Command) -> Result<(), SpawnError> {
        let procs = match &self.cgroup {
            Some(dir) => {
                let path = dir.join("cgroup.procs");
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|source| SpawnError::Cgroup { path, source })?;
                Some(f)
            }
            None => None,
        };
        let open_files = self.open_files;
        let RunAs { uid, gid } = self.run_as;
        // SAFETY: the closure only makes system calls (write, setsid, setrlimit,
        // setgroups, setgid, setuid) on values prepared before the fork.
        unsafe {
            c.pre_exec(move || {
                use std::os::fd::AsFd;
                if let Some(f) = &procs {
                    // "0": the writing process itself
                    nix::unistd::write(f.as_fd(), b"0")?;
                }
                nix::unistd::setsid()?;
                setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
                if let Some(n) = open_files {
                    setrlimit(Resource::RLIMIT_NOFILE, n, n)?;
                }
                if let Some(g) = gid {
                    nix::unistd::setgroups(&[])?;
                    nix::unistd::setgid(Gid::from_raw(g))?;
                }
                if let Some(u) = uid {
                    nix::unistd::setuid(Uid::from_raw(u))?;
                }
                Ok(())
            });
        }
        Ok(())
    }
}

/// A started process (the wrapper, leader of its group).
#[derive(Debug)]
pub(crate) struct Started {
    pub pid: u32,
    pub start_ticks: u64,
    pub child: tokio::process::Child,
}

/// Find `cmd` like `execvp` would, with the container's `PATH`.
pub(crate) fn resolve(cmd: &str, path_var: &str, cwd: Option<&Path>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let exec = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if cmd.contains('/') {
        let p = match cwd {
            Some(d) if !cmd.starts_with('/') => d.join(cmd),
            _ => PathBuf::from(cmd),
        };
        return exec(&p).then_some(p);
    }
    path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(cmd))
        .find(|p| exec(p))
}

pub(crate) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Start a container process.
pub(crate) fn spawn(spec: &ProcSpec) -> Result<Started, SpawnError> {
    let cmd = spec.argv.first().cloned().unwrap_or_default();
    let path_var = spec
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or(DEFAULT_PATH);
    if resolve(&cmd, path_var, spec.working_dir.as_deref()).is_none() {
        return Err(SpawnError::NotFound(cmd));
    }
    let log = logs::open_for_append(&spec.log).map_err(|source| SpawnError::Log {
        path: spec.log.clone(),
        source,
    })?;
    let log2 = log.try_clone().map_err(|source| SpawnError::Log {
        path: spec.log.clone(),
        source,
    })?;
    if let Err(e) = std::fs::remove_file(&spec.exit_file) {
        if e.kind() != std::io::ErrorKind::NotFound {
            // A stale exit file would report the previous run's exit as this one's.
            return Err(SpawnError::StaleExitFile {
                path: spec.exit_file.clone(),
                source: e,
            });
        }
    }
    if spec.confine.run_as.uid.is_some() {
        // The wrapper records the exit code as the container's user, in a directory
        // that user may not write: the file is there, empty, and theirs.
        prepare_exit_file(&spec.exit_file, spec.confine.run_as).map_err(|source| {
            SpawnError::ExitFile {
                path: spec.exit_file.clone(),
                source,
            }
        })?;
    }
    let mut c = tokio::process::Command::new("/bin/sh");
    c.arg("-c")
        .arg(WRAPPER)
        .arg(spec.exit_file.as_os_str())
        .args(spec.argv.iter().map(OsStr::new))
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .kill_on_drop(false);
    spec.confine.apply(&mut c)?;
    if !spec.env.iter().any(|(k, _)| k == "PATH") {
        c.env("PATH", DEFAULT_PATH);
    }
    if let Some(d) = &spec.working_dir {
        c.current_dir(d);
    }
    let child = c.spawn().map_err(|source| SpawnError::Spawn {
        command: cmd.clone(),
        source,
    })?;
    let pid = child.id().unwrap_or(0);
    // Read in any state: a child that already exited is a zombie until it is reaped, and
    // until then its pid is still this process's (no other process can reuse it).
    let start_ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| parse_stat(&s))
        .map_or(0, |(_, t)| t);
    Ok(Started {
        pid,
        start_ticks,
        child,
    })
}

fn prepare_exit_file(path: &Path, run_as: RunAs) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    std::os::unix::fs::chown(path, run_as.uid, run_as.gid)
}

/// Parse the start time (field 22, clock ticks since boot) and state of a `/proc/PID/stat`.
pub(crate) fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // rest starts at field 3 (state); field 22 is 19 further.
    let ticks = fields.nth(18)?.parse().ok()?;
    Some((state, ticks))
}

/// The start time of a live (not zombie) process.
pub(crate) fn start_ticks(pid: u32) -> Option<u64> {
    if pid == 0 {
        return None;
    }
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    match parse_stat(&s)? {
        ('Z' | 'X' | 'x', _) => None,
        (_, t) => Some(t),
    }
}

/// Whether the process `pid` that started at `ticks` still runs (not a reused pid). An
/// unknown start time (0) proves nothing: such a pid is never taken for the process.
pub(crate) fn alive(pid: u32, ticks: u64) -> bool {
    ticks != 0 && start_ticks(pid) == Some(ticks)
}

/// Signal a container's whole process group. A group already gone (ESRCH) is what
/// stopping wants; anything else is logged.
pub(crate) fn signal_group(pid: u32, sig: Signal) {
    if pid > 1 {
        match kill(Pid::from_raw(-(pid as i32)), sig) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => {
                tracing::warn!(pid, signal = %sig, error = %e, "cannot signal the process group")
            }
        }
    }
}

/// The exit code the wrapper recorded, if it finished normally.
pub(crate) fn read_exit_file(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Expand `$(VAR)` references like Kubernetes: `$$` escapes, unknown references stay.
pub(crate) fn expand(s: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' && i + 1 < b.len() {
            if b[i + 1] == b'$' {
                out.push('$');
                i += 2;
                continue;
            }
            if b[i + 1] == b'(' {
                if let Some(end) = s[i + 2..].find(')') {
                    let name = &s[i + 2..i + 2 + end];
                    if let Some(v) = lookup(name) {
                        out.push_str(&v);
                        i += end + 3;
                        continue;
                    }
                }
            }
        }
        let ch = s[i..].chars().next().unwrap();
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stat_parsing() {
        let s = "1234 (my (odd) proc) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100";
        assert_eq!(parse_stat(s), Some(('S', 987654)));
        assert_eq!(parse_stat("garbage"), None);
        let me = std::process::id();
        assert!(start_ticks(me).is_some());
        assert!(alive(me, start_ticks(me).unwrap()));
        assert!(!alive(me, start_ticks(me).unwrap() + 1));
        // an unknown start time never proves it is the same process
        assert!(!alive(me, 0));
    }

    #[test]
    fn expansion() {
        let env = |k: &str| (k == "A").then(|| "x".to_string());
        assert_eq!(expand("$(A)-$(B)-$$(A)-$", env), "x-$(B)-$(A)-$");
        assert_eq!(expand("héllo $(A", env), "héllo $(A");
    }

    #[test]
    fn resolution() {
        assert!(resolve("sh", DEFAULT_PATH, None).is_some());
        assert!(resolve("no-such-binary-xyz", DEFAULT_PATH, None).is_none());
        assert!(resolve("/bin/sh", "", None).is_some());
    }

    #[tokio::test]
    async fn wrapper_records_the_exit_code_and_output() {
        let d = tempfile::tempdir().unwrap();
        let spec = ProcSpec {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "echo out; echo err >&2; exit 3".into(),
            ],
            env: vec![("X".into(), "1".into())],
            working_dir: Some(d.path().to_path_buf()),
            log: d.path().join("c.log"),
            exit_file: d.path().join("c.exit"),
            confine: Confine::default(),
        };
        let mut s = spawn(&spec).unwrap();
        assert!(s.start_ticks > 0);
        let st = s.child.wait().await.unwrap();
        assert_eq!(st.code(), Some(3));
        assert_eq!(read_exit_file(&spec.exit_file), Some(3));
        assert_eq!(std::fs::read_to_string(&spec.log).unwrap(), "out\nerr\n");
        let bad = ProcSpec {
            argv: vec!["no-such-binary-xyz".into()],
            ..spec.clone()
        };
        assert!(matches!(spawn(&bad), Err(SpawnError::NotFound(_))));
    }

    #[tokio::test]
    async fn sigterm_to_the_group_is_recorded_as_143() {
        let d = tempfile::tempdir().unwrap();
        let spec = ProcSpec {
            argv: vec!["sleep".into(), "30".into()],
            env: vec![],
            working_dir: None,
            log: d.path().join("c.log"),
            exit_file: d.path().join("c.exit"),
            confine: Confine::default(),
        };
        let mut s = spawn(&spec).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        signal_group(s.pid, Signal::SIGTERM);
        let st = tokio::time::timeout(Duration::from_secs(5), s.child.wait())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(st.code(), Some(143));
        assert_eq!(read_exit_file(&spec.exit_file), Some(143));
        assert!(!alive(s.pid, s.start_ticks));
    }
}
