//! Slow links (this kernel has no `sch_netem`: the harness relays TCP with a delay, see
//! `tests/src/delay.rs`). Every link between the masters and from them to the proxy gets
//! 20 ms each way (the connections open before are reset, which may cost one election):
//! writes through the proxy go on, slower by at least the round trips they now make,
//! leadership stays put, nothing acknowledged is lost, never two actives in a term;
//! healed, they are fast again.
//! Block 61.
//!
//! openraft bounds each AppendEntries round trip by `[raft] heartbeat_interval` (60 ms by
//! default), so a link slower than that stalls replication altogether: with 60 ms each way
//! no write went through in a minute. Links that slow need a longer heartbeat (README).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ballast_tests::*;

const T: Duration = Duration::from_secs(60);
const DELAY: Duration = Duration::from_millis(20);

fn put(c: &Cluster, key: &str) -> Option<Duration> {
    let url = format!("{}/internal/kv/{key}", c.proxy_url());
    let t0 = Instant::now();
    let r = http_timeout("PUT", &url, Some(key), Duration::from_secs(10)).ok()?;
    (r.status == 200).then(|| t0.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn writes_go_on_over_slow_links_and_lose_nothing() {
    let mut c = Cluster::start(ClusterOpts::new(61).proxy(true), |_| {});
    let (active, term) = c.wait_one_active(T);
    let mut acked = Vec::new();
    let mut terms: BTreeMap<u64, String> = BTreeMap::new();
    terms.insert(term, active.clone());
    let mut round = |c: &Cluster, name: &str, acked: &mut Vec<String>| {
        let mut times = Vec::new();
        for i in 0..30 {
            let key = format!("slow/{name}/{i:03}");
            let took = wait_until("a write", T, || put(c, &key));
            times.push(took);
            acked.push(key);
            for (m, t) in c.active_masters() {
                let first = terms.entry(t).or_insert_with(|| m.clone());
                assert_eq!(*first, m, "two masters active in term {t}");
            }
        }
        median(times)
    };
    let before = round(&c, "before", &mut acked);

    let masters = c.master_ids();
    let masters: Vec<&str> = masters.iter().map(String::as_str).collect();
    let everyone: Vec<&str> = masters.iter().copied().chain(["proxy"]).collect();
    c.delay(&masters, &everyone, DELAY);
    let slow = round(&c, "slow", &mut acked);
    c.heal();
    let after = round(&c, "after", &mut acked);
    println!(
        "write through the proxy, median of 30: {:.1} ms, with {} ms each way on every link {:.1} ms, healed {:.1} ms; terms {terms:?}",
        before.as_secs_f64() * 1e3,
        DELAY.as_millis(),
        slow.as_secs_f64() * 1e3,
        after.as_secs_f64() * 1e3
    );
    // The proxy's round trip to the active and the active's to a follower are in every
    // write, whichever master is active.
    assert!(slow >= 2 * DELAY, "the delay did not apply: {slow:?}");
    assert!(
        after < slow,
        "healed writes ({after:?}) no faster than slow ones ({slow:?})"
    );
    // Slow is not dead: at most the one election the reset connections may cost (a peer
    // RPC that outlived openraft's wait once closed its connection, and with it every
    // retry paid new handshakes: 72 elections in this test).
    assert!(
        terms.len() <= 2,
        "leadership churned over slow links: terms {terms:?}"
    );

    c.kill(&active);
    let (now, _) = c.wait_one_active(T);
    for key in &acked {
        let r = c.read_kv(key);
        assert_eq!(
            r.status, 200,
            "acknowledged {key} lost at {now}: {}",
            r.body
        );
    }
}
