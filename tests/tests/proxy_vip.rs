//! Several proxies and one VIP on loopback (`ballast up --proxies 2`): exactly one proxy
//! serves the VIP's addresses, another takes over when it dies or stops, and a checker
//! polling every proxy throughout never sees two holders. Address block 58.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_tests::*;
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(60);
const VIP: &str = "127.58.0.1";

fn status(admin: &str) -> Option<serde_json::Value> {
    let r = http_timeout(
        "GET",
        &format!("http://{admin}/status"),
        None,
        Duration::from_millis(500),
    )
    .ok()?;
    (r.status == 200).then(|| r.json())
}

/// Which proxy answers on the VIP now (its `/status` id), if any.
fn vip_answer() -> Option<String> {
    let s = status(&format!("{VIP}:9180"))?;
    let api = http_timeout(
        "GET",
        &format!("https://{VIP}:6443/readyz"),
        None,
        Duration::from_millis(500),
    )
    .ok()?;
    (api.status == 200).then(|| s["id"].as_str().unwrap_or_default().to_string())
}

#[test]
fn exactly_one_proxy_serves_the_vip_and_another_takes_over() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    let up = UpProcess::start(&dir, &["--address-block", "58", "--proxies", "2"]);
    let admins = ["127.58.3.1:9180", "127.58.3.2:9180"];
    let holder = wait_until("the VIP answers", T, vip_answer);
    assert!(holder == "p1" || holder == "p2", "{holder}");
    // both proxies serve their own addresses; one says it holds the VIP
    let statuses: Vec<serde_json::Value> = admins.iter().map(|a| status(a).unwrap()).collect();
    assert_eq!(statuses[0]["id"], "p1");
    assert_eq!(statuses[1]["id"], "p2");
    let holders: Vec<&str> = statuses
        .iter()
        .filter(|s| s["vip_holder"] == true)
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(holders, vec![holder.as_str()]);
    for a in &admins {
        let r = http(
            "GET",
            &format!("https://{}/readyz", a.replace(":9180", ":6443")),
            None,
        );
        assert_eq!(r.unwrap().status, 200, "{a}'s own API");
    }

    // A checker polls both proxies every 20 ms until the end: never two holders.
    let stop = Arc::new(AtomicBool::new(false));
    let both = Arc::new(AtomicUsize::new(0));
    let checker = {
        let (stop, both) = (stop.clone(), both.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let n = admins
                    .iter()
                    .filter_map(|a| status(a))
                    .filter(|s| s["vip_holder"] == true)
                    .count();
                if n > 1 {
                    both.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    // A master failover does not cost the holder the VIP: kill -9 of the active master.
    let pids = up.child_pids();
    let changes = |admin: &str| -> u64 {
        let m = http("GET", &format!("http://{admin}/metrics"), None)
            .unwrap()
            .body;
        m.lines()
            .find_map(|l| l.strip_prefix("ballast_proxy_vip_changes_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(u64::MAX)
    };
    let holder_admin = admins[if holder == "p1" { 0 } else { 1 }];
    let before = changes(holder_admin);
    let active = status(holder_admin).unwrap()["active"]
        .as_str()
        .unwrap()
        .to_string();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[&active] as i32),
        Signal::SIGKILL,
    )
    .unwrap();
    wait_until("a new active master behind the VIP", T, || {
        let s = status(&format!("{VIP}:9180"))?;
        (s["active"].as_str()? != active).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(vip_answer().as_deref(), Some(holder.as_str()));
    assert_eq!(
        changes(holder_admin),
        before,
        "the holder let go during a master failover"
    );

    // SIGTERM of the holder: it releases the lease, the other takes over at its next read
    let other = if holder == "p1" { "p2" } else { "p1" };
    let t0 = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[&holder] as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    wait_until("the other proxy serves the VIP", T, || {
        (vip_answer().as_deref() == Some(other)).then_some(())
    });
    println!(
        "SIGTERM of the VIP holder {holder}: {other} answers on the VIP after {:?}",
        t0.elapsed()
    );

    // the stopped proxy back, then kill -9 of the new holder: the first one takes over
    let config = dir.join("ballast.toml");
    let mut restarted = std::process::Command::new(ballast_bin());
    restarted
        .args(["proxy", "--config"])
        .arg(&config)
        .args(["--id", &holder])
        .current_dir(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("logs/{holder}-again.log"))).unwrap());
    let mut again = spawn_tied(&mut restarted).unwrap();
    let own = admins[if holder == "p1" { 0 } else { 1 }];
    wait_until("the restarted proxy serves its own addresses", T, || {
        status(own).map(|s| s["vip_holder"] == false).filter(|b| *b)
    });
    let t1 = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[other] as i32),
        Signal::SIGKILL,
    )
    .unwrap();
    wait_until("the restarted proxy serves the VIP", T, || {
        (vip_answer().as_deref() == Some(holder.as_str())).then_some(())
    });
    println!(
        "kill -9 of the VIP holder {other}: {holder} answers on the VIP after {:?}",
        t1.elapsed()
    );
    let m = http("GET", &format!("http://{own}/metrics"), None)
        .unwrap()
        .body;
    assert!(m.contains("ballast_proxy_vip_holder 1"), "{m}");

    stop.store(true, Ordering::Relaxed);
    checker.join().unwrap();
    assert_eq!(
        both.load(Ordering::Relaxed),
        0,
        "two proxies held the VIP at once"
    );
    let _ = again.kill();
    let _ = again.wait();
}
