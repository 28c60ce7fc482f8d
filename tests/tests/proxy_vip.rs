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

/// `dig +short NAME TYPE` at `server` (`ip:port`), sorted.
fn dig_at(server: &str, name: &str, rtype: &str) -> Vec<String> {
    let (ip, port) = server.split_once(':').unwrap();
    let out = run(
        "dig",
        &[
            &format!("@{ip}"),
            "-p",
            port,
            "+time=1",
            "+tries=1",
            "+norec",
            "+short",
            name,
            rtype,
        ],
    );
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty() && !l.starts_with(';'))
        .collect();
    v.sort();
    v
}

/// Every proxy answers DNS and lists the live ones; a worker that resolves the API name at
/// both keeps following the active master when the first of them dies. Block 57.
#[test]
fn every_proxy_answers_dns_and_a_worker_resolves_at_the_other_when_one_dies() {
    require("dig");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    let up = UpProcess::start(&dir, &["--address-block", "57", "--proxies", "2"]);
    let (d1, d2) = ("127.57.3.1:5353", "127.57.3.2:5353");
    let both = vec!["127.57.3.1".to_string(), "127.57.3.2".to_string()];
    for d in [d1, d2] {
        wait_until("each proxy lists both", T, || {
            (dig_at(d, "proxy.ballast.local", "A") == both).then_some(())
        });
        assert_eq!(dig_at(d, "vip.ballast.local", "A"), vec!["127.57.0.1"]);
        assert_eq!(
            dig_at(d, "ballast.local", "NS"),
            vec!["p1.proxy.ballast.local.", "p2.proxy.ballast.local."]
        );
        assert_eq!(dig_at(d, "p2.proxy.ballast.local", "A"), vec!["127.57.3.2"]);
    }
    // w2 resolves the API name at p1, then p2 (ballast.toml)
    let config: toml::Value =
        toml::from_str(&std::fs::read_to_string(dir.join("ballast.toml")).unwrap()).unwrap();
    assert_eq!(
        config["workers"][1]["dns_servers"],
        toml::Value::Array(vec![d1.into(), d2.into()]),
        "{config}"
    );

    // p1 dies: p2 stops listing it
    let pids = up.child_pids();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids["p1"] as i32),
        Signal::SIGKILL,
    )
    .unwrap();
    wait_until("p2 lists only itself", T, || {
        (dig_at(d2, "proxy.ballast.local", "A") == vec!["127.57.3.2"]).then_some(())
    });
    assert_eq!(
        dig_at(d2, "ballast.local", "NS"),
        vec!["p2.proxy.ballast.local."]
    );

    // the active master dies too: w2 must find the new one through p2's responder
    let active = wait_until("p2 names the active master", T, || {
        status("127.57.3.2:9180")?["active"]
            .as_str()
            .map(String::from)
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[&active] as i32),
        Signal::SIGKILL,
    )
    .unwrap();
    let new_active = wait_until("a new active master", T, || {
        let a = status("127.57.3.2:9180")?["active"].as_str()?.to_string();
        (a != active).then_some(a)
    });
    let api = test_pki()
        .admin_builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let lease_url =
        "https://127.57.3.2:6443/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/w2";
    let renewed = || -> Option<String> {
        let r = api.get(lease_url).send().ok()?;
        let v: serde_json::Value = r.json().ok()?;
        v.pointer("/spec/renewTime")?.as_str().map(String::from)
    };
    let first = wait_until("w2's lease readable at the new active", T, renewed);
    let second = wait_until("w2 renews its lease at the new active", T, || {
        renewed().filter(|r| *r != first)
    });
    wait_until("w2 renews it again", T, || {
        renewed().filter(|r| *r != second)
    });
    let log = std::fs::read_to_string(dir.join("logs/w2.log")).unwrap_or_default();
    assert!(
        log.contains("now resolving at this DNS server"),
        "w2 never moved to p2's responder (new active {new_active}):\n{log}"
    );
}
