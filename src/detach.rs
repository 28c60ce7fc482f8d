//! `ballast proxy --upgrade --detach`: return once the new proxy serves, leaving it
//! running in the background. systemd's `ExecReload=` waits for its command to end, so
//! the command that replaces the proxy must end while the replacement keeps running;
//! the replacement then tells systemd it is the service's main process (`MAINPID=`).
//!
//! The command starts itself again without `--detach`, with the write end of a pipe in
//! [`READY_FD_ENV`]; the child writes [`READY`] on it once it serves, and the command
//! exits 0 then, or with the child's failure when the child ends first.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};

/// The environment variable naming the pipe a detached proxy reports on.
const READY_FD_ENV: &str = "BALLAST_PROXY_READY_FD";
const READY: &[u8] = b"serving\n";

/// Run this command again in the background without `--detach`, and wait until it
/// serves.
pub(crate) fn detach() -> anyhow::Result<()> {
    let (read, write) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).context("cannot create the readiness pipe")?;
    // only the write end goes to the child
    fcntl(&write, FcntlArg::F_SETFD(FdFlag::empty())).context("readiness pipe")?;
    let args: Vec<OsString> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--detach")
        .collect();
    let exe = std::env::current_exe().context("cannot find the ballast binary")?;
    let mut child = Command::new(exe)
        .args(args)
        .env(READY_FD_ENV, write.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .spawn()
        .context("cannot start the proxy")?;
    drop(write);
    let mut line = Vec::new();
    BufReader::new(std::fs::File::from(read))
        .read_until(b'\n', &mut line)
        .context("readiness pipe")?;
    if line == READY {
        println!("proxy serving (pid {})", child.id());
        return Ok(());
    }
    let status = child.wait().context("waiting for the proxy")?;
    bail!("the new proxy did not start ({status}); the running one goes on serving");
}

/// In a proxy started by [`detach`]: the report to make once it serves.
pub(crate) fn readiness_report() -> Option<Box<dyn FnOnce() + Send>> {
    let fd: i32 = std::env::var(READY_FD_ENV).ok()?.parse().ok()?;
    // The descriptor is this process's from birth (the parent left it open for us) and
    // nothing else here uses it: take it before anything could open another.
    let pipe = adopt_fd(fd);
    Some(Box::new(move || {
        let mut f = std::fs::File::from(pipe);
        if let Err(e) = f.write_all(READY) {
            tracing::warn!(error = %e, "cannot report readiness to `ballast proxy --detach`");
        }
    }))
}

#[allow(unsafe_code)]
fn adopt_fd(fd: i32) -> OwnedFd {
    // SAFETY: `fd` is the pipe end `detach` passed down; no other owner exists in this
    // process (see `readiness_report`).
    unsafe { OwnedFd::from_raw_fd(fd) }
}
