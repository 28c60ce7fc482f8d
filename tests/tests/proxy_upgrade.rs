//! Replacing the running proxy (a restart or a binary upgrade) with `ballast proxy
//! --upgrade`: the new process takes the listening sockets over, the old one answers its
//! open connections with `Connection: close`, drains and exits, and no client request
//! fails, neither on kept-alive connections nor on new ones. Block 34.

use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ballast_tests::*;

const LONG: Duration = Duration::from_secs(30);

/// Requests in a loop until `stop`: failures are recorded with what they were.
fn load(
    client: reqwest::blocking::Client,
    method: &'static str,
    url: impl Fn(usize) -> String + Send + 'static,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<Mutex<Vec<String>>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let body = (method == "PUT").then_some("v");
            match request(&client, method, &url(n), body) {
                Ok(r) if r.status == 200 => {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                other => failed.lock().unwrap().push(format!(
                    "{method} {}: {:?}",
                    url(n),
                    other.map(|r| (r.status, r.body))
                )),
            }
            thread::sleep(Duration::from_millis(5));
        }
    })
}

/// Start the successor of the running proxy and wait for the old one to stop by itself.
fn upgrade(c: &mut Cluster) -> Duration {
    let old_log = std::fs::read_to_string(c.log_path("proxy")).unwrap_or_default();
    let t = Instant::now();
    let mut old = c.start_successor("proxy", &["--upgrade"]);
    let status = wait_until("the old proxy stops by itself", LONG, || {
        old.try_wait().unwrap()
    });
    assert!(status.success(), "the old proxy exited with {status}");
    let log = std::fs::read_to_string(c.log_path("proxy")).unwrap();
    let new_part = &log[old_log.len()..];
    assert!(
        new_part.contains("took the listening sockets over from the previous proxy"),
        "{new_part}"
    );
    assert!(
        new_part.contains("a new proxy took the sockets over"),
        "{new_part}"
    );
    t.elapsed()
}

#[test]
fn an_upgraded_proxy_takes_the_sockets_over_and_no_request_fails() {
    let mut c = Cluster::start(ClusterOpts::new(34).masters(3).proxy(true), |_| {});
    c.wait_one_active(LONG);
    let proxy = c.proxy_url();
    wait_until("the proxy serves", LONG, || {
        (status_of(&format!("{proxy}/api/v1/namespaces")) == 200).then_some(())
    });

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let kept_alive = || test_pki().admin_builder().build().unwrap();
    let mut loads = Vec::new();
    for i in 0..2 {
        let p = proxy.clone();
        loads.push(load(
            kept_alive(),
            "GET",
            move |_| format!("{p}/api/v1/namespaces"),
            stop.clone(),
            ok.clone(),
            failed.clone(),
        ));
        let p = proxy.clone();
        loads.push(load(
            kept_alive(),
            "PUT",
            move |n| format!("{p}/internal/kv/upgrade/{i}-{n}"),
            stop.clone(),
            ok.clone(),
            failed.clone(),
        ));
    }
    // a new connection per request: they land in the accept queue at any moment
    let p = proxy.clone();
    loads.push(load(
        client().clone(),
        "GET",
        move |_| format!("{p}/readyz"),
        stop.clone(),
        ok.clone(),
        failed.clone(),
    ));
    thread::sleep(Duration::from_secs(1));

    for round in 1..=2 {
        let before = ok.load(Ordering::Relaxed);
        let took = upgrade(&mut c);
        println!("upgrade {round}: the old proxy stopped {took:?} after the new one started");
        let at_exit = ok.load(Ordering::Relaxed);
        wait_until("requests answered by the new proxy alone", LONG, || {
            (ok.load(Ordering::Relaxed) > at_exit + 50).then_some(())
        });
        assert!(
            at_exit > before,
            "no request answered during upgrade {round}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for l in loads {
        l.join().unwrap();
    }
    let failed = failed.lock().unwrap();
    assert!(
        failed.is_empty(),
        "{} failed requests: {failed:?}",
        failed.len()
    );
    println!("{} requests, none failed", ok.load(Ordering::Relaxed));

    // As systemd's ExecReload= runs it: `--detach` returns once the new proxy serves, and
    // the new proxy names itself the service's main process on NOTIFY_SOCKET.
    let notify_path = c.dir().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let old_pid = c.pid("proxy").unwrap();
    let out = c
        .node_command("proxy", &["--upgrade", "--detach"])
        .env("NOTIFY_SOCKET", &notify_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut buf = [0u8; 512];
    let n = notify.recv(&mut buf).unwrap();
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    let main_pid: i32 = message
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no MAINPID in {message:?}"));
    let _detached = KillOnDrop(main_pid);
    assert!(message.lines().any(|l| l == "READY=1"), "{message:?}");
    assert_ne!(main_pid, old_pid as i32);
    wait_until(
        "the old proxy stops after the detached upgrade",
        LONG,
        || (!c.is_running("proxy")).then_some(()),
    );
    assert_eq!(status_of(&format!("{proxy}/readyz")), 200);
    assert!(
        std::fs::read_to_string(format!("/proc/{main_pid}/cmdline"))
            .unwrap()
            .contains("--upgrade"),
        "MAINPID names the new proxy"
    );

    // The upgrade socket is the proxy's alone (0600), and an upgrade that cannot reach a
    // running proxy fails with a clear error and leaves the running one serving.
    let socket = c.dir().join("proxy-proxy.upgrade.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    // Another user cannot connect, even where it can reach the directory: the socket's
    // mode refuses it (an upgrade socket hands out the proxy's listening sockets).
    require("python3");
    let dir_mode = std::fs::metadata(c.dir()).unwrap().permissions();
    std::fs::set_permissions(c.dir(), std::os::unix::fs::PermissionsExt::from_mode(0o711)).unwrap();
    let other_user = std::process::Command::new("python3")
        .args([
            "-c",
            "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])",
        ])
        .arg(&socket)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    std::fs::set_permissions(c.dir(), dir_mode).unwrap();
    assert!(!other_user.status.success());
    let stderr = String::from_utf8_lossy(&other_user.stderr);
    assert!(stderr.contains("PermissionError"), "{stderr}");

    let out = c
        .node_command(
            "proxy",
            &["--upgrade", "--upgrade-socket", "/nonexistent.sock"],
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    let log = std::fs::read_to_string(c.log_path("proxy")).unwrap();
    assert!(
        log.contains("cannot reach the running proxy's upgrade socket /nonexistent.sock"),
        "{log}"
    );
    assert_eq!(status_of(&format!("{proxy}/readyz")), 200);
}

/// A process the harness does not know (the detached proxy), killed at the end.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0);
        if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL) {
            eprintln!("cannot kill the detached proxy {}: {e}", self.0);
        }
    }
}
