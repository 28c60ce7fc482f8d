//! A real Prometheus server (Debian's `prometheus`) scrapes the proxy, the masters (over
//! HTTPS with a bearer token of the group `system:monitoring`) and a worker (HTTPS with a
//! client certificate of that group, authorized through the API), and its query API
//! returns the contract's metrics. Anonymous scrapes are refused.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ballast_tests::*;

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn query(base: &str, q: &str) -> Vec<serde_json::Value> {
    let url = format!("{base}/api/v1/query?query={q}");
    match http("GET", &url, None) {
        Ok(r) if r.status == 200 => r.json()["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
        _ => vec![],
    }
}

#[test]
fn prometheus_scrapes_proxy_masters_and_workers() {
    assert!(
        have("prometheus"),
        "Debian's prometheus is required (./task deps)"
    );
    let mut c = Cluster::configure(ClusterOpts::new(28).workers(1).proxy(true), |c| {
        c.auth.token_file = Some("tokens.csv".into());
    });
    std::fs::write(
        c.dir().join("tokens.csv"),
        "scrape-token-1,prometheus,9001,\"system:monitoring\"\n",
    )
    .unwrap();
    for id in c.node_ids() {
        c.start_node(&id);
    }
    c.wait_one_active(Duration::from_secs(60));
    let token_file = c.dir().join("prometheus.token");
    std::fs::write(&token_file, "scrape-token-1").unwrap();
    let (scraper_crt, scraper_key) = test_pki().user("scraper", "scraper", &["system:monitoring"]);
    // Anonymous scrapes are refused, by the masters and by the worker.
    let anon = test_pki().anonymous_client();
    let m1_metrics = format!("https://{}/metrics", c.master_api("m1"));
    assert_eq!(
        request(&anon, "GET", &m1_metrics, None).unwrap().status,
        401
    );
    let w1_metrics = format!("https://{}/metrics", c.worker_addr("w1"));
    assert_eq!(
        request(&anon, "GET", &w1_metrics, None).unwrap().status,
        401
    );
    // An identity without the monitoring role is refused too.
    let nobody = test_pki().client_as("nobody", "nobody", &[]);
    assert_eq!(
        request(&nobody, "GET", &m1_metrics, None).unwrap().status,
        403
    );
    wait_until("the worker refuses nobody", Duration::from_secs(30), || {
        (request(&nobody, "GET", &w1_metrics, None).ok()?.status == 403).then_some(())
    });
    let masters: Vec<String> = c
        .master_ids()
        .iter()
        .map(|m| format!("'{}'", c.master_api(m)))
        .collect();
    let ca = test_pki().ca();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n\
         - job_name: proxy\n  static_configs:\n  - targets: ['{}']\n\
         - job_name: masters\n  scheme: https\n  authorization:\n    credentials_file: {}\n\
         \x20 tls_config:\n    ca_file: {}\n  static_configs:\n  - targets: [{}]\n\
         - job_name: workers\n  scheme: https\n  tls_config:\n    ca_file: {}\n\
         \x20   cert_file: {}\n    key_file: {}\n  static_configs:\n  - targets: ['{}']\n",
        c.proxy_admin(),
        token_file.display(),
        ca.display(),
        masters.join(", "),
        ca.display(),
        scraper_crt.display(),
        scraper_key.display(),
        c.worker_addr("w1"),
    );
    let dir = c.dir().join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let listen = "127.28.0.90:9090";
    let log = std::fs::File::create(c.dir().join("logs/prometheus.log")).unwrap();
    let child = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={listen}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start prometheus");
    let _prom = Prometheus(child);
    let base = format!("http://{listen}");

    // The proxy routes to exactly one master, the one that reports itself active (which
    // may have changed since the start on a loaded machine: compare with the one now).
    wait_until(
        "prometheus has ballast_proxy_active_master == 1 for the active master",
        Duration::from_secs(90),
        || {
            let r = query(&base, "ballast_proxy_active_master%3D%3D1");
            let routed =
                (r.len() == 1).then(|| r[0]["metric"]["master"].as_str().map(String::from))??;
            let now = c.active_masters();
            (now.len() == 1 && now[0].0 == routed).then_some(())
        },
    );

    // Every master is up and exactly one reports itself active.
    wait_until("all targets up", Duration::from_secs(60), || {
        let r = query(&base, "up%3D%3D1");
        (r.len() == 5).then_some(())
    });
    let actives = wait_until(
        "ballast_master_active scraped",
        Duration::from_secs(60),
        || {
            let r = query(&base, "ballast_master_active");
            (r.len() == 3).then_some(r)
        },
    );
    let sum: f64 = actives
        .iter()
        .map(|s| s["value"][1].as_str().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(sum, 1.0, "{actives:?}");
    // Traffic so that every labelled series exists: an API request through the proxy and
    // a DNS query.
    assert_eq!(
        status_of(&format!("{}/api/v1/namespaces", c.proxy_url())),
        200
    );
    let dns = c.proxy_dns();
    let out = run(
        "dig",
        &[
            &format!("@{}", dns.ip()),
            "-p",
            &dns.port().to_string(),
            "+short",
            "api.ballast.local",
        ],
    );
    assert!(out.status.success());
    // Every metric name the contract fixes.
    for metric in [
        "ballast_proxy_active_master",
        "ballast_proxy_failovers_total",
        "ballast_proxy_failover_seconds_count",
        "ballast_proxy_requests_total",
        "ballast_proxy_request_duration_seconds_count",
        "ballast_proxy_upstream_healthy",
        "ballast_dns_queries_total",
        "ballast_master_active",
        "ballast_master_term",
        "ballast_master_store_revision",
        "ballast_master_api_requests_total",
        "ballast_worker_pods_running",
        "ballast_worker_api_errors_total",
    ] {
        wait_until(metric, Duration::from_secs(60), || {
            (!query(&base, metric).is_empty()).then_some(())
        });
    }
}
