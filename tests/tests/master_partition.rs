//! A network partition isolates the active master: it stops reporting active, the
//! majority side elects a new active, no two masters are ever active in one term, a lower
//! term never reports active after a higher one did, and no acknowledged write is lost.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ballast_tests::*;

const LONG: Duration = Duration::from_secs(60);

/// Sample every master's `/active`; check the invariants against what was seen before.
struct Observer {
    /// term → the master that reported active in it.
    active_in_term: BTreeMap<u64, String>,
    highest: u64,
}

impl Observer {
    fn sample(&mut self, c: &Cluster) {
        for (id, term) in c.active_masters() {
            if let Some(other) = self.active_in_term.get(&term) {
                assert_eq!(other, &id, "two masters active in term {term}");
            }
            assert!(
                term >= self.highest,
                "{id} reported active in term {term} after term {} was active",
                self.highest
            );
            self.highest = term;
            self.active_in_term.insert(term, id);
        }
    }
}

#[test]
fn isolated_active_master_steps_down_and_majority_takes_over() {
    assert!(
        have("nft"),
        "nft (Debian nftables) is required: ./task deps"
    );
    let mut c = Cluster::start(ClusterOpts::new(18).proxy(true), |_| {});
    let (old, old_term) = c.wait_one_active(LONG);
    let mut obs = Observer {
        active_in_term: BTreeMap::new(),
        highest: 0,
    };
    obs.sample(&c);

    let proxy = c.proxy_url();
    let kv = |i: usize| format!("{proxy}/internal/kv/part/{i:04}");
    let mut acked = Vec::new();
    let put = |i: usize| -> bool {
        matches!(http("PUT", &kv(i), Some(&format!("v{i}"))), Ok(r) if r.status == 200)
    };
    for i in 0..20 {
        if put(i) {
            acked.push(i);
        }
    }
    assert!(!acked.is_empty());

    let others: Vec<String> = c.master_ids().into_iter().filter(|m| *m != old).collect();
    let others_ref: Vec<&str> = others.iter().map(String::as_str).collect();
    c.partition(&[old.as_str()], &others_ref);

    // The majority elects a new active; the isolated one stops reporting active.
    let deadline = Instant::now() + LONG;
    let new = loop {
        obs.sample(&c);
        let a = c.active_masters();
        if a.len() == 1 && a[0].0 != old {
            break a[0].clone();
        }
        assert!(Instant::now() < deadline, "no new active master: {a:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(new.1 > old_term);
    let r = http("GET", &format!("{}/active", c.master_url(&old)), None).unwrap();
    assert_eq!(r.status, 503, "isolated master still active: {}", r.body);

    // Writes go on through the proxy during the partition.
    let mut i = 20;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        obs.sample(&c);
        if put(i) {
            acked.push(i);
        }
        i += 1;
    }
    assert!(
        acked.iter().any(|&n| n >= 20),
        "no write succeeded during the partition"
    );

    // Heal: the old master rejoins as a follower; still exactly one active.
    c.heal();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        obs.sample(&c);
        std::thread::sleep(Duration::from_millis(20));
    }
    c.wait_one_active(LONG);
    for n in &acked {
        let r = wait_until("read through the proxy", LONG, || {
            http("GET", &kv(*n), None).ok().filter(|r| r.status != 503)
        });
        assert_eq!(r.status, 200, "acknowledged write {n} lost: {}", r.body);
        assert!(r.body.contains(&format!("v{n}")), "write {n}: {}", r.body);
    }
    // The old master caught up: it serves nothing stale (503) and its store has them all.
    obs.sample(&c);
}

/// Every node's connections leave from its own address, so a cut aimed at one node's
/// address isolates it from the others for real: the proxy's checks and forwarding, the
/// workers' API calls and the masters' peer traffic all carry their sender's address.
/// Cutting only the proxy from the active master leaves the masters as they were and
/// leaves the proxy without a route (503 once the hold ends: it never reaches the active
/// another way); cutting the active from every node makes the others elect, the proxy
/// follow and the worker's node stay Ready, and nothing acknowledged is lost.
#[test]
fn a_cut_aimed_at_a_node_address_isolates_that_node() {
    assert!(
        have("nft"),
        "nft (Debian nftables) is required: ./task deps"
    );
    let mut c = Cluster::start(ClusterOpts::new(45).workers(1).proxy(true), |cfg| {
        cfg.proxy.hold.timeout = Duration::from_secs(1);
    });
    let (old, old_term) = c.wait_one_active(LONG);
    let proxy = c.proxy_url();
    let kv = |i: usize| format!("{proxy}/internal/kv/cut/{i:04}");
    let put = |i: usize| http("PUT", &kv(i), Some(&format!("v{i}"))).map(|r| r.status);
    wait_until("a write through the proxy", LONG, || {
        (put(0).ok()? == 200).then_some(())
    });
    let w1 = c.node_client("w1");
    let node = format!("{proxy}/api/v1/nodes/w1");
    wait_until("w1 registered", LONG, || {
        request(&w1, "GET", &node, None)
            .ok()
            .filter(|r| r.status == 200)
    });
    let admin = format!("http://{}/status", c.proxy_admin());
    let status = || {
        http_timeout("GET", &admin, None, Duration::from_secs(5))
            .ok()
            .filter(|r| r.status == 200)
            .map(|r| r.json())
    };

    // The proxy alone cut from the active: it sees that master down and answers 503.
    c.partition(&["proxy"], &[old.as_str()]);
    wait_until("the proxy sees the active master unreachable", LONG, || {
        let s = status()?;
        let m = s["masters"]
            .as_array()?
            .iter()
            .find(|m| m["id"] == old.as_str())?
            .clone();
        (m["healthy"] == false && s["active"].is_null()).then_some(())
    });
    let r = put(1).expect("an answer from the proxy");
    assert_eq!(r, 503, "the proxy reached the master it is cut from");
    assert_eq!(
        c.active_masters(),
        vec![(old.clone(), old_term)],
        "the masters, not cut from each other, kept their active"
    );
    c.heal();
    wait_until("the proxy routes to the active again", LONG, || {
        (put(2).ok()? == 200).then_some(())
    });

    // The active cut from every node: the others elect, the proxy and the worker follow.
    let others: Vec<String> = c.node_ids().into_iter().filter(|n| *n != old).collect();
    let others: Vec<&str> = others.iter().map(String::as_str).collect();
    c.partition(&[old.as_str()], &others);
    let (new, _) = wait_until("a new active master", LONG, || {
        let a = c.active_masters();
        (a.len() == 1 && a[0].0 != old).then(|| a[0].clone())
    });
    wait_until("a write through the proxy at the new active", LONG, || {
        (put(3).ok()? == 200).then_some(())
    });
    let lease = format!("{proxy}/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/w1");
    let renewed = |after: &str| {
        let r = request(&w1, "GET", &lease, None).ok()?;
        let t = r.json()["spec"]["renewTime"].as_str()?.to_string();
        (r.status == 200 && t.as_str() > after).then_some(t)
    };
    let first = wait_until("w1's lease read at the new active", LONG, || renewed(""));
    wait_until("w1 renews its lease at the new active", LONG, || {
        renewed(&first)
    });
    let r = request(&w1, "GET", &node, None).unwrap();
    let ready = r.json()["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready").cloned())
        .expect("a Ready condition");
    assert_eq!(ready["status"], "True", "w1 after the cut: {ready}");
    assert_ne!(new, old);

    c.heal();
    c.wait_one_active(LONG);
    for i in [0, 2, 3] {
        let r = wait_until("read through the proxy", LONG, || {
            http("GET", &kv(i), None).ok().filter(|r| r.status != 503)
        });
        assert_eq!(r.status, 200, "acknowledged write {i} lost: {}", r.body);
    }
}
