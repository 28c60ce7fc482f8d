//! The proxy's DNS responder, asked with `dig` (UDP and TCP), against real masters.
//!
//! Address block 23. Every wait is on a condition with a generous deadline.

use std::time::Duration;

use ballast_tests::{http_timeout, require, run, wait_until, Cluster, ClusterOpts};

const LONG: Duration = Duration::from_secs(30);

/// `dig` output (full text) for one question.
fn dig(c: &Cluster, extra: &[&str]) -> String {
    let dns = c.proxy_dns();
    let server = format!("@{}", dns.ip());
    let port = dns.port().to_string();
    let mut args = vec![
        server.as_str(),
        "-p",
        port.as_str(),
        "+time=2",
        "+tries=2",
        "+norec",
    ];
    args.extend_from_slice(extra);
    let out = run("dig", &args);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn short(c: &Cluster, name: &str, rtype: &str) -> Vec<String> {
    let mut v: Vec<String> = dig(c, &["+short", name, rtype])
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    v.sort();
    v
}

#[test]
fn dns_answers_follow_the_cluster() {
    require("dig");
    let c = Cluster::start(ClusterOpts::new(23).proxy(true), |_| {});
    let (active, _) = c.wait_one_active(LONG);
    let active_ip = c.master_api(&active).ip().to_string();
    wait_until("api.ballast.local names the active master", LONG, || {
        (short(&c, "api.ballast.local", "A") == vec![active_ip.clone()]).then_some(())
    });

    // every healthy master, and each by name
    let mut all: Vec<String> = c
        .master_ids()
        .iter()
        .map(|id| c.master_api(id).ip().to_string())
        .collect();
    all.sort();
    wait_until(
        "masters.ballast.local lists every healthy master",
        LONG,
        || (short(&c, "masters.ballast.local", "A") == all).then_some(()),
    );
    for id in c.master_ids() {
        assert_eq!(
            short(&c, &format!("{id}.ballast.local"), "A"),
            vec![c.master_api(&id).ip().to_string()]
        );
    }
    assert_eq!(
        short(&c, "proxy.ballast.local", "A"),
        vec![c.proxy_api().ip().to_string()]
    );

    // SRV: the active master's name and API port
    let port = c.master_api(&active).port();
    assert_eq!(
        short(&c, "_api._tcp.ballast.local", "SRV"),
        vec![format!("0 0 {port} {active}.ballast.local.")]
    );

    // SOA at the apex, authoritative, TTL from the config (default 1 s)
    let soa = dig(&c, &["ballast.local", "SOA"]);
    assert!(soa.contains("status: NOERROR"), "{soa}");
    assert!(soa.contains(" aa"), "not authoritative: {soa}");
    assert!(soa.contains("IN\tSOA"), "{soa}");
    let a = dig(&c, &["api.ballast.local", "A"]);
    assert!(a.contains("api.ballast.local.\t1\tIN\tA"), "{a}");

    // NXDOMAIN with the SOA in the authority section
    let nx = dig(&c, &["nothing-here.ballast.local", "A"]);
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    assert!(nx.contains("AUTHORITY SECTION"), "{nx}");
    assert!(nx.contains("SOA"), "{nx}");

    // outside the zone: REFUSED
    let refused = dig(&c, &["example.com", "A"]);
    assert!(refused.contains("status: REFUSED"), "{refused}");

    // TCP too
    assert_eq!(
        dig(&c, &["+tcp", "+short", "api.ballast.local", "A"]).trim(),
        active_ip
    );

    // no IPv6 on these masters: AAAA is an empty NOERROR, not NXDOMAIN
    let aaaa = dig(&c, &["api.ballast.local", "AAAA"]);
    assert!(aaaa.contains("status: NOERROR"), "{aaaa}");
    assert!(aaaa.contains("ANSWER: 0"), "{aaaa}");

    // garbage packets do not hurt the responder
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for junk in [&b"\x00"[..], b"garbage garbage garbage", &[0xffu8; 600]] {
        sock.send_to(junk, c.proxy_dns()).unwrap();
    }
    assert_eq!(short(&c, "api.ballast.local", "A"), vec![active_ip.clone()]);

    // the queries were counted
    let metrics = http_timeout(
        "GET",
        &format!("http://{}/metrics", c.proxy_admin()),
        None,
        Duration::from_secs(5),
    )
    .unwrap()
    .body;
    for rcode in ["NOERROR", "NXDOMAIN", "REFUSED"] {
        assert!(
            metrics.contains(&format!("ballast_dns_queries_total{{rcode=\"{rcode}\"}}")),
            "{rcode} not counted"
        );
    }
}
