//! The proxy's L4 passthrough mode (`proxy.mode = "tcp"`): TLS end to end between clients
//! and the active master, which the proxy picks per connection. Address block 27.

use std::time::{Duration, Instant};

use ballast_tests::*;

const T: Duration = Duration::from_secs(60);

#[test]
fn l4_mode_passes_tls_through_to_the_active_master_and_follows_failover() {
    let mut c = Cluster::start(ClusterOpts::new(27).proxy(true), |c| {
        c.proxy.mode = ballast_config::ProxyMode::Tcp;
    });
    let (active, _) = c.wait_one_active(T);
    let url = format!("{}/api/v1/namespaces", c.proxy_url());
    wait_until("the proxy forwards", T, || {
        (http("GET", &url, None).ok()?.status == 200).then_some(())
    });
    // The client's certificate reaches the master itself: admin is admin, an anonymous
    // client is refused by the master (the proxy cannot tell).
    let anon = request(&test_pki().anonymous_client(), "GET", &url, None).unwrap();
    assert_eq!(anon.status, 401);
    // real kubectl through it
    let k = Kubectl::new("1.33", &c.proxy_url(), c.dir());
    k.ok(&["create", "namespace", "through-l4"]);
    assert!(k.ok(&["get", "namespaces"]).contains("through-l4"));
    let who = k.ok(&["auth", "whoami"]);
    assert!(who.contains("admin"), "{who}");

    // kill -9 of the active master: new connections reach the new active one
    let client = test_pki()
        .admin_builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(12))
        .build()
        .unwrap();
    c.kill(&active);
    let killed = Instant::now();
    let mut failed = Vec::new();
    let mut served_by = None;
    while killed.elapsed() < Duration::from_secs(30) {
        match request(&client, "GET", &url, None) {
            Ok(r) if r.status == 200 => {
                served_by = r.header("x-ballast-master").map(String::from);
                break;
            }
            Ok(r) => failed.push(format!("{} {}", r.status, r.body.trim())),
            Err(e) => failed.push(e.to_string()),
        }
    }
    println!(
        "L4 failover: first success {:?} after the kill; {} failed request(s) before it: {failed:?}",
        killed.elapsed(),
        failed.len()
    );
    let new = served_by.expect("a request succeeded after the kill");
    assert_ne!(new, active);
    let (now_active, _) = c.wait_one_active(T);
    assert_eq!(new, now_active);
    let m = http_timeout(
        "GET",
        &format!("http://{}/metrics", c.proxy_admin()),
        None,
        Duration::from_secs(5),
    )
    .unwrap()
    .body;
    assert!(
        m.contains("ballast_proxy_tcp_connections_total{result=\"forwarded\"}"),
        "{m}"
    );
}
