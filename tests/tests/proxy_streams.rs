//! Watches through the proxy are closed when the active master changes, so clients
//! reconnect to the new one — even when the old master is frozen, not dead.
//!
//! Address block 26. Every wait is on a condition with a generous deadline.

use std::io::Read;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use ballast_tests::{http_timeout, test_pki, wait_until, Cluster, ClusterOpts};

const LONG: Duration = Duration::from_secs(30);

fn streaming_client() -> reqwest::blocking::Client {
    test_pki().admin_builder().timeout(None).build().unwrap()
}

fn proxy_metric(c: &Cluster, name: &str) -> Option<f64> {
    let body = http_timeout(
        "GET",
        &format!("http://{}/metrics", c.proxy_admin()),
        None,
        Duration::from_secs(5),
    )
    .ok()?
    .body;
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn watches_to_a_frozen_old_master_are_closed_on_failover() {
    let c = Cluster::start(ClusterOpts::new(26).proxy(true), |_| {});
    let (first, _) = c.wait_one_active(LONG);
    let url = format!("{}/api/v1/namespaces?watch=true", c.proxy_url());
    let resp = wait_until("a watch through the proxy", LONG, || {
        let r = streaming_client().get(&url).send().ok()?;
        (r.status() == 200).then_some(r)
    });
    assert_eq!(
        resp.headers()
            .get("x-ballast-master")
            .and_then(|v| v.to_str().ok()),
        Some(first.as_str())
    );
    let (tx, ended) = mpsc::channel();
    thread::spawn(move || {
        let mut resp = resp;
        let mut buf = [0u8; 4096];
        loop {
            match resp.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
        let _ = tx.send(());
    });

    // freeze the active master: its sockets stay open, it never ends the watch itself
    c.pause(&first);
    let second = wait_until("a new active master", LONG, || {
        let a = c.active_masters();
        a.iter()
            .find(|(id, _)| *id != first)
            .map(|(id, _)| id.clone())
    });
    ended
        .recv_timeout(LONG)
        .expect("the proxy did not close the watch to the old master");
    assert!(proxy_metric(&c, "ballast_proxy_streams_closed_total").unwrap_or(0.0) >= 1.0);

    // a new watch reaches the new active master
    wait_until("a watch on the new active", LONG, || {
        let r = streaming_client().get(&url).send().ok()?;
        let by = r
            .headers()
            .get("x-ballast-master")?
            .to_str()
            .ok()?
            .to_string();
        (r.status() == 200 && by == second).then_some(())
    });
    c.resume(&first);
}
