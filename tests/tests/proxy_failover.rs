//! The proxy hides failover: real masters and the real proxy process.
//!
//! Address blocks 21–22. Every wait is on a condition with a generous deadline; no test
//! asserts a timing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use ballast_tests::{http_timeout, require, run, wait_until, Cluster, ClusterOpts};

const LONG: Duration = Duration::from_secs(30);

/// The proxy's `/status`, when it answers.
fn proxy_status(c: &Cluster) -> Option<serde_json::Value> {
    let r = http_timeout(
        "GET",
        &format!("http://{}/status", c.proxy_admin()),
        None,
        Duration::from_secs(2),
    )
    .ok()?;
    (r.status == 200).then(|| r.json())
}

/// The master the proxy routes to now.
fn proxy_active(c: &Cluster) -> Option<String> {
    proxy_status(c)?["active"].as_str().map(str::to_string)
}

fn dig_short(c: &Cluster, name: &str, rtype: &str) -> String {
    let dns = c.proxy_dns();
    let out = run(
        "dig",
        &[
            &format!("@{}", dns.ip()),
            "-p",
            &dns.port().to_string(),
            "+short",
            "+time=2",
            "+tries=2",
            name,
            rtype,
        ],
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn reads_through_the_proxy_survive_killing_the_active_master() {
    let mut c = Cluster::start(ClusterOpts::new(21).proxy(true), |_| {});
    let (first, _) = c.wait_one_active(LONG);
    wait_until("proxy routes to the active master", LONG, || {
        (proxy_active(&c).as_deref() == Some(first.as_str())).then_some(())
    });
    // a value to read back through the proxy
    let kv = format!("{}/internal/kv/proxy-test", c.proxy_url());
    wait_until("write through the proxy", LONG, || {
        let r = http_timeout("PUT", &kv, Some("hello"), Duration::from_secs(5)).ok()?;
        (r.status == 200).then_some(())
    });

    let stop = Arc::new(AtomicBool::new(false));
    let served_by = Arc::new(Mutex::new(Vec::<String>::new()));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let (stop, served_by, failures) = (stop.clone(), served_by.clone(), failures.clone());
        let readyz = format!("{}/readyz", c.proxy_url());
        let kv = kv.clone();
        thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                // alternate an endpoint only the active master answers 200 and a stored value
                let url = if n % 2 == 0 { &readyz } else { &kv };
                n += 1;
                match http_timeout("GET", url, None, Duration::from_secs(20)) {
                    Ok(r) if r.status == 200 => {
                        if url == &kv && !r.body.contains("hello") {
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("wrong value: {}", r.body));
                        }
                        let by = r.header("x-ballast-master").unwrap_or("?").to_string();
                        served_by.lock().unwrap().push(by);
                    }
                    Ok(r) => failures
                        .lock()
                        .unwrap()
                        .push(format!("GET {url}: {} {}", r.status, r.body)),
                    Err(e) => failures.lock().unwrap().push(format!("GET {url}: {e}")),
                }
                thread::sleep(Duration::from_millis(5));
            }
        })
    };
    wait_until("reads flowing", LONG, || {
        (served_by.lock().unwrap().len() >= 20).then_some(())
    });
    c.kill(&first);
    let second = wait_until("a new active master", LONG, || {
        let a = c.active_masters();
        (a.len() == 1 && a[0].0 != first).then(|| a[0].0.clone())
    });
    wait_until("reads served by the new active master", LONG, || {
        let by = served_by.lock().unwrap();
        (by.iter().rev().take(20).filter(|m| **m == second).count() == 20).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    reader.join().unwrap();
    let failures = failures.lock().unwrap();
    {
        let by = served_by.lock().unwrap();
        let old = by.iter().filter(|m| **m == first).count();
        eprintln!(
            "{} reads: {old} by {first}, {} by {second}, {} failed",
            by.len(),
            by.len() - old,
            failures.len()
        );
    }
    assert!(
        failures.is_empty(),
        "{} failed reads during failover: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );

    // the admin endpoint and DNS follow the new active master
    wait_until("/status follows the new active", LONG, || {
        let s = proxy_status(&c)?;
        (s["active"] == second.as_str() && s["failovers"].as_u64()? >= 1).then_some(())
    });
    {
        require("dig");
        let ip = c.master_api(&second).ip().to_string();
        wait_until("api.ballast.local follows the new active", LONG, || {
            (dig_short(&c, "api.ballast.local", "A") == ip).then_some(())
        });
    }
}

#[test]
fn with_every_master_down_requests_get_503_then_recover() {
    let mut c = Cluster::start(ClusterOpts::new(22).proxy(true), |cfg| {
        cfg.proxy.hold.timeout = Duration::from_secs(2);
    });
    c.wait_one_active(LONG);
    wait_until("proxy routes", LONG, || proxy_active(&c));
    for id in c.master_ids() {
        c.kill(&id);
    }
    wait_until("proxy sees no active master", LONG, || {
        proxy_status(&c)?["active"].is_null().then_some(())
    });
    // a read and a write: both held, then 503 with a Kubernetes Status and Retry-After
    for (method, body) in [("GET", None), ("POST", Some("{\"kind\":\"Namespace\"}"))] {
        let r = http_timeout(
            method,
            &format!("{}/api/v1/namespaces", c.proxy_url()),
            body,
            Duration::from_secs(20),
        )
        .expect("the proxy answers");
        assert_eq!(r.status, 503, "{method}: {}", r.body);
        assert_eq!(r.header("retry-after"), Some("1"));
        let v = r.json();
        assert_eq!(v["kind"], "Status");
        assert_eq!(v["reason"], "ServiceUnavailable");
    }
    // a request held while the masters come back is sent to the new active master
    let held = {
        let url = format!("{}/readyz", c.proxy_url());
        thread::spawn(move || http_timeout("GET", &url, None, Duration::from_secs(60)))
    };
    for id in c.master_ids() {
        c.start_node(&id);
    }
    c.wait_one_active(LONG);
    wait_until("requests flow again", LONG, || {
        let r = http_timeout(
            "GET",
            &format!("{}/readyz", c.proxy_url()),
            None,
            Duration::from_secs(20),
        )
        .ok()?;
        (r.status == 200).then_some(())
    });
    // the held one either got through or timed out cleanly: never hung, never dropped
    let r = held.join().unwrap().expect("held request answered");
    assert!(
        r.status == 200 || r.status == 503,
        "{} {}",
        r.status,
        r.body
    );
}

#[test]
fn writes_during_failover_are_answered_never_dropped() {
    let mut c = Cluster::start(ClusterOpts::new(25).proxy(true), |_| {});
    let (first, _) = c.wait_one_active(LONG);
    wait_until("proxy routes to the active master", LONG, || {
        (proxy_active(&c).as_deref() == Some(first.as_str())).then_some(())
    });
    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(Mutex::new(Vec::<(u16, Option<String>)>::new()));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let writer = {
        let (stop, answers, errors) = (stop.clone(), answers.clone(), errors.clone());
        let base = format!("{}/internal/kv/w", c.proxy_url());
        thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let url = format!("{base}{i}");
                match http_timeout("PUT", &url, Some("v"), Duration::from_secs(30)) {
                    Ok(r) => answers
                        .lock()
                        .unwrap()
                        .push((r.status, r.header("retry-after").map(str::to_string))),
                    Err(e) => errors.lock().unwrap().push(format!("PUT {url}: {e}")),
                }
                thread::sleep(Duration::from_millis(5));
            }
        })
    };
    wait_until("writes flowing", LONG, || {
        (answers.lock().unwrap().len() >= 20).then_some(())
    });
    c.kill(&first);
    let n = answers.lock().unwrap().len();
    wait_until("writes succeed on the new active master", LONG, || {
        let a = answers.lock().unwrap();
        (a.len() > n + 20 && a.iter().rev().take(10).all(|(s, _)| *s == 200)).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let errors = errors.lock().unwrap();
    assert!(errors.is_empty(), "requests without an answer: {errors:?}");
    let answers = answers.lock().unwrap();
    let not_ok: Vec<_> = answers.iter().filter(|(s, _)| *s != 200).collect();
    eprintln!("{} writes, not 200: {not_ok:?}", answers.len());
    for (status, retry_after) in answers.iter() {
        assert_ne!(*status, 502, "a bad gateway leaked through");
        if *status == 503 {
            assert_eq!(retry_after.as_deref(), Some("1"), "503 without Retry-After");
        }
    }
}
