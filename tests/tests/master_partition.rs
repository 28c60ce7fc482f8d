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
