//! One identity's flood is answered 429 once it has its maximum of requests in flight
//! (`[limits] max_requests_in_flight_per_user`, 2 here), while another user and a worker
//! go through as usual; the flooder is served again as soon as it slows down.
//! Address block 32.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ballast_tests::{client, request, test_pki, wait_until, Cluster, ClusterOpts};

const FLOOD_THREADS: usize = 24;
const FLOOD_EACH: usize = 40;

fn bind(proxy: &str, user: &str, role: &str) {
    let body = serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": format!("{user}-{role}")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    })
    .to_string();
    let url = format!("{proxy}/apis/rbac.authorization.k8s.io/v1/clusterrolebindings");
    let r = request(client(), "POST", &url, Some(&body)).expect("create the binding");
    assert_eq!(r.status, 201, "{}", r.body);
}

#[test]
fn a_flooding_identity_gets_429_while_others_go_through() {
    let c = Cluster::start(ClusterOpts::new(32).workers(1).proxy(true), |cfg| {
        cfg.limits.max_requests_in_flight_per_user = 2;
    });
    let (active, _) = c.wait_one_active(Duration::from_secs(60));
    let proxy = c.proxy_url();
    let pods = format!("{proxy}/api/v1/namespaces/default/pods");
    // The flood writes (each waits for a Raft commit, so many are in flight at once).
    bind(&proxy, "flood", "edit");
    bind(&proxy, "calm", "view");
    let configmaps = format!("{proxy}/api/v1/namespaces/default/configmaps");
    let flood = test_pki().client_as("flood", "flood", &[]);
    let calm = test_pki().client_as("calm", "calm", &[]);
    wait_until("the bindings apply", Duration::from_secs(30), || {
        let ok = |cl| request(cl, "GET", &pods, None).is_ok_and(|r| r.status == 200);
        (ok(&flood) && ok(&calm)).then_some(())
    });
    let w1 = c.node_client("w1");
    let own_node = format!("{proxy}/api/v1/nodes/w1");
    wait_until("w1 registered", Duration::from_secs(30), || {
        request(&w1, "GET", &own_node, None)
            .ok()
            .filter(|r| r.status == 200)
    });

    // The calm user's and the worker's latency, alone and then beside the flood (printed:
    // figures, not goals; the goal is that every one of them is served).
    let timed =
        |cl: &reqwest::blocking::Client, url: &str, what: &str, times: &mut Vec<Duration>| {
            let t0 = Instant::now();
            let r = request(cl, "GET", url, None).expect(what);
            times.push(t0.elapsed());
            assert_eq!(r.status, 200, "{what}: {}", r.body);
        };
    let (mut calm_alone, mut worker_alone) = (Vec::new(), Vec::new());
    for _ in 0..30 {
        timed(&calm, &pods, "calm request", &mut calm_alone);
        timed(&w1, &own_node, "worker request", &mut worker_alone);
    }
    // A control: as many threads asking the public `/readyz` (no identity, no limit), so
    // that what the machine's two cores cost the others shows apart from the fairness.
    let (mut calm_busy, mut worker_busy) = (Vec::new(), Vec::new());
    let readyz = format!("{proxy}/readyz");
    std::thread::scope(|s| {
        for _ in 0..FLOOD_THREADS {
            let (flood, readyz) = (&flood, &readyz);
            s.spawn(move || {
                for _ in 0..FLOOD_EACH {
                    request(flood, "GET", readyz, None).expect("readyz");
                }
            });
        }
        for _ in 0..30 {
            timed(&calm, &pods, "calm request", &mut calm_busy);
            timed(&w1, &own_node, "worker request", &mut worker_busy);
        }
    });
    let (mut calm_flood, mut worker_flood) = (Vec::new(), Vec::new());
    let (ok, throttled) = (AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|s| {
        for t in 0..FLOOD_THREADS {
            let (flood, configmaps, ok, throttled) = (&flood, &configmaps, &ok, &throttled);
            s.spawn(move || {
                for i in 0..FLOOD_EACH {
                    let body =
                        serde_json::json!({"metadata": {"name": format!("f-{t}-{i}")}}).to_string();
                    let r = request(flood, "POST", configmaps, Some(&body)).expect("flood request");
                    match r.status {
                        201 => ok.fetch_add(1, Ordering::Relaxed),
                        429 => {
                            assert_eq!(r.header("retry-after"), Some("1"));
                            assert_eq!(r.json()["reason"], "TooManyRequests", "{}", r.body);
                            throttled.fetch_add(1, Ordering::Relaxed)
                        }
                        other => panic!("flood: {other} {}", r.body),
                    };
                }
            });
        }
        // Meanwhile, another user and the worker are served every time.
        for _ in 0..30 {
            timed(&calm, &pods, "calm request", &mut calm_flood);
            timed(&w1, &own_node, "worker request", &mut worker_flood);
        }
    });
    let p = |v: &mut Vec<Duration>, q: usize| {
        v.sort();
        v[(v.len() * q / 100).min(v.len() - 1)].as_secs_f64() * 1e3
    };
    println!(
        "latency, ms, alone / beside a /readyz flood / beside the create flood: calm user p50 {:.1} / {:.1} / {:.1}, p99 {:.1} / {:.1} / {:.1}; worker p50 {:.1} / {:.1} / {:.1}, p99 {:.1} / {:.1} / {:.1}",
        p(&mut calm_alone, 50),
        p(&mut calm_busy, 50),
        p(&mut calm_flood, 50),
        p(&mut calm_alone, 99),
        p(&mut calm_busy, 99),
        p(&mut calm_flood, 99),
        p(&mut worker_alone, 50),
        p(&mut worker_busy, 50),
        p(&mut worker_flood, 50),
        p(&mut worker_alone, 99),
        p(&mut worker_busy, 99),
        p(&mut worker_flood, 99),
    );
    let (ok, throttled) = (ok.into_inner(), throttled.into_inner());
    println!("flood: {ok} answered 201, {throttled} answered 429");
    assert!(
        throttled > 0,
        "the flood was never throttled ({ok} answered 201)"
    );
    assert!(ok > 0, "the flood got nothing through");
    let r = request(&flood, "GET", &pods, None).unwrap();
    assert_eq!(r.status, 200, "served again after the flood: {}", r.body);
    // Refused by the proxy, which knows the identity already, or by the active master.
    let by_master = c
        .master_gauge(&active, "ballast_master_api_throttled_total")
        .expect("the master's throttled counter");
    let metrics =
        ballast_tests::http("GET", &format!("http://{}/metrics", c.proxy_admin()), None).unwrap();
    let by_proxy: usize = metrics
        .body
        .lines()
        .find_map(|l| l.strip_prefix("ballast_proxy_throttled_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the proxy's throttled counter");
    println!("429s: {by_proxy} from the proxy, {by_master} from the master");
    assert!(by_proxy > 0, "the proxy refused nothing");
    assert_eq!(by_proxy + by_master as usize, throttled);
}

/// `[limits]` from the config file hold on a real master: watches per identity (the
/// third is answered 429 with a Status and `Retry-After`; served again once one ends),
/// and the request body (413 with a Status; nothing created), straight and through the
/// proxy. Address block 36.
#[test]
fn configured_watch_and_body_limits_hold() {
    let c = Cluster::start(ClusterOpts::new(36).proxy(true), |cfg| {
        cfg.limits.max_watches_per_user = 2;
        cfg.limits.max_request_body = 64 * 1024;
    });
    let (active, _) = c.wait_one_active(Duration::from_secs(60));
    let proxy = c.proxy_url();
    bind(&proxy, "watcher", "edit");
    let watcher = test_pki().client_as("watcher", "watcher", &[]);
    let cms = format!(
        "{}/api/v1/namespaces/default/configmaps",
        c.master_url(&active)
    );
    wait_until("the binding applies", Duration::from_secs(30), || {
        request(&watcher, "GET", &cms, None)
            .ok()
            .filter(|r| r.status == 200)
    });
    let watch = format!("{cms}?watch=true");
    let open = || watcher.get(&watch).send().expect("watch");
    let w1 = open();
    let w2 = open();
    assert_eq!((w1.status().as_u16(), w2.status().as_u16()), (200, 200));
    let r = request(&watcher, "GET", &watch, None).expect("a third watch");
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["reason"], "TooManyRequests", "{}", r.body);
    assert!(r.body.contains("too many watches"), "{}", r.body);
    // admin (system:masters) is not bound by the per-identity limit
    let admin = client().get(&watch).send().expect("admin watch");
    assert_eq!(admin.status().as_u16(), 200);
    drop(w1);
    // the closed watch is noticed at its next event
    let mut n = 0;
    let w3 = wait_until("a watch is served again", Duration::from_secs(20), || {
        n += 1;
        let body = serde_json::json!({"metadata": {"name": format!("nudge-{n}")}}).to_string();
        request(&watcher, "POST", &cms, Some(&body)).expect("nudge");
        let r = watcher.get(&watch).send().ok()?;
        (r.status().as_u16() == 200).then_some(r)
    });

    let big = serde_json::json!({"metadata": {"name": "big"}, "data": {"x": "y".repeat(100_000)}})
        .to_string();
    let proxied = format!("{proxy}/api/v1/namespaces/default/configmaps");
    for url in [&cms, &proxied] {
        let r = request(&watcher, "POST", url, Some(&big)).expect("a big body");
        assert_eq!(r.status, 413, "{url}: {}", r.body);
        assert_eq!(r.json()["reason"], "RequestEntityTooLarge", "{}", r.body);
        assert!(r.body.contains("65536"), "{}", r.body);
    }
    let r = request(&watcher, "GET", &format!("{cms}/big"), None).unwrap();
    assert_eq!(r.status, 404, "nothing was created: {}", r.body);
    drop((w2, w3, admin));
}
