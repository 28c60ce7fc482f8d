//! A watch through the proxy outlives a failover: the proxy resumes it at the new active
//! master from the last resourceVersion it passed on, so the client's one stream misses
//! no event and repeats none. (A client whose stream ends anyway re-watches from there.)

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use ballast_tests::*;

const LONG: Duration = Duration::from_secs(60);
const N: usize = 60;

fn lease(name: &str) -> String {
    format!(
        r#"{{"apiVersion":"coordination.k8s.io/v1","kind":"Lease","metadata":{{"name":"{name}","namespace":"default"}},"spec":{{"holderIdentity":"t"}}}}"#
    )
}

/// Follow the lease watch from `rv`, recording ADDED names, until the stream ends;
/// returns the last resourceVersion seen.
fn follow(url_base: &str, rv: &str, seen: &Mutex<Vec<String>>) -> String {
    let client = test_pki().admin_builder().timeout(None).build().unwrap();
    let url = format!("{url_base}?watch=true&resourceVersion={rv}");
    let mut last = rv.to_string();
    let Ok(resp) = client.get(&url).send() else {
        return last;
    };
    if resp.status() != 200 {
        return last;
    }
    for line in BufReader::new(resp).lines() {
        let Ok(line) = line else { break };
        let Ok(ev) = serde_json::from_str::<serde_json::Value>(&line) else {
            break;
        };
        assert_ne!(ev["type"], "ERROR", "watch error: {line}");
        if let Some(r) = ev["object"]["metadata"]["resourceVersion"].as_str() {
            last = r.to_string();
        }
        if ev["type"] == "ADDED" {
            let name = ev["object"]["metadata"]["name"].as_str().unwrap_or("");
            seen.lock().unwrap().push(name.to_string());
        }
    }
    last
}

#[test]
fn rewatch_after_failover_misses_no_event() {
    let mut c = Cluster::start(ClusterOpts::new(29).proxy(true), |_| {});
    let (first, _) = c.wait_one_active(LONG);
    let base = format!(
        "{}/apis/coordination.k8s.io/v1/namespaces/default/leases",
        c.proxy_url()
    );
    let list = wait_until("list leases through the proxy", LONG, || {
        http("GET", &base, None).ok().filter(|r| r.status == 200)
    });
    let rv = list.json()["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();

    let seen = Arc::new(Mutex::new(Vec::new()));
    let watches = Arc::new(Mutex::new(0u32));
    let done = Arc::new(Mutex::new(false));
    let watcher = {
        let (seen, watches, done, base) =
            (seen.clone(), watches.clone(), done.clone(), base.clone());
        thread::spawn(move || {
            let mut rv = rv;
            // Re-watch from the last resourceVersion each time the stream ends.
            while !*done.lock().unwrap() {
                *watches.lock().unwrap() += 1;
                rv = follow(&base, &rv, &seen);
                thread::sleep(Duration::from_millis(50));
            }
        })
    };

    // Writes through the proxy; kill -9 the active master a third of the way in.
    let mut created = BTreeSet::new();
    for i in 0..N {
        if i == N / 3 {
            c.kill(&first);
        }
        let name = format!("l-{i:03}");
        wait_until(&format!("create {name}"), LONG, || {
            match http("POST", &base, Some(&lease(&name))) {
                Ok(r) if r.status == 201 || r.status == 200 => Some(()),
                // An earlier try that got 503 may have been committed.
                Ok(r) if r.status == 409 => Some(()),
                _ => None,
            }
        });
        created.insert(name);
    }
    let (second, _) = c.wait_one_active(LONG);
    assert_ne!(second, first);

    wait_until("the watcher saw every created lease", LONG, || {
        let s: BTreeSet<String> = seen.lock().unwrap().iter().cloned().collect();
        created.is_subset(&s).then_some(())
    });
    *done.lock().unwrap() = true;
    let seen = seen.lock().unwrap().clone();
    let distinct: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(distinct.len(), seen.len(), "an event came twice: {seen:?}");
    assert_eq!(
        *watches.lock().unwrap(),
        1,
        "the watch ended on failover instead of being resumed"
    );
    let metrics = http("GET", &format!("http://{}/metrics", c.proxy_admin()), None)
        .unwrap()
        .body;
    let resumed = metrics.lines().find_map(|l| {
        l.strip_prefix("ballast_proxy_watches_resumed_total ")?
            .parse::<u64>()
            .ok()
    });
    assert!(resumed >= Some(1), "{metrics}");
    // Stop the watcher: its current stream ends when the cluster goes away.
    drop(c);
    watcher.join().unwrap();
}
