//! Masters as hosts: each master runs in its own network namespace on one bridge
//! (`10.233.38.0/24`), the proxy and the test on the bridge itself. The active's host is cut
//! off by nftables inside its own namespace (every packet through its `eth0` dropped, as a
//! pulled cable would), then only its outgoing packets (it hears, nobody hears it), then
//! only its incoming ones. Each time another master takes over, the cut-off one stops
//! reporting active by its own clock (an observer inside its host asks it every 20 ms), and
//! after healing it catches up. Throughout: a writer through the proxy, and at the end every
//! acknowledged write is there and no two masters were ever active in one term.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballast_tests::netns::{enter, HostProcs, Segment};
use ballast_tests::*;

const BLOCK: u8 = 38;
const T: Duration = Duration::from_secs(60);
const MASTERS: [&str; 3] = ["m1", "m2", "m3"];

/// An answer "active" from a master, in a term, seen at a time.
type Seen = (Instant, String, u64);

/// Inside host `id`: ask its master's `/active` every 20 ms until `stop`.
fn observe(ns: String, id: String, url: String, stop: Arc<AtomicBool>, log: Arc<Mutex<Vec<Seen>>>) {
    enter(&ns);
    // built here, so its sockets are the host's
    let http = test_pki()
        .admin_builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    while !stop.load(Ordering::Relaxed) {
        if let Ok(r) = http.get(&url).send() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&r.text().unwrap_or_default())
            {
                if v["active"] == true {
                    let term = v["term"].as_u64().unwrap_or(0);
                    log.lock().unwrap().push((Instant::now(), id.clone(), term));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The cuts, as nftables rules inside the cut-off host.
#[derive(Clone, Copy, Debug)]
enum Cut {
    Both,
    Outgoing,
    Incoming,
}

impl Cut {
    fn script(self) -> String {
        let (input, output) = match self {
            Cut::Both => (true, true),
            Cut::Outgoing => (false, true),
            Cut::Incoming => (true, false),
        };
        let mut s = String::from("table inet cut {\n");
        if input {
            s += "  chain in { type filter hook input priority 0; iifname \"eth0\" drop; }\n";
        }
        if output {
            s += "  chain out { type filter hook output priority 0; oifname \"eth0\" drop; }\n";
        }
        s + "}\n"
    }
}

#[test]
fn a_master_host_cut_off_hands_over_and_loses_nothing() {
    let mut seg = Segment::new(BLOCK);
    for (i, m) in MASTERS.iter().enumerate() {
        seg.host(m, 11 + i as u8);
    }
    seg.add_bridge_address(20);
    let (m_addr, p_addr) = (|i: usize| seg.addr(11 + i as u8), seg.addr(20));
    let c = Cluster::configure(ClusterOpts::new(BLOCK).masters(3).proxy(true), |cfg| {
        for (i, m) in cfg.masters.iter_mut().enumerate() {
            m.api = (m_addr(i), 6443).into();
            m.peer = (m_addr(i), 2380).into();
        }
        cfg.proxy.api = (p_addr, 6443).into();
        cfg.proxy.dns = (p_addr, 5353).into();
        cfg.proxy.admin = (p_addr, 9180).into();
    });
    let mut hosts = HostProcs::default();
    for m in MASTERS {
        hosts.start_node(&seg, &c, m);
    }
    let mut c = c;
    c.start_node("proxy");
    let (mut active, mut term) = c.wait_one_active(T);

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut threads = Vec::new();
    for m in MASTERS {
        let url = format!("{}/active", c.master_url(m));
        let (ns, stop, seen) = (seg.ns(m), stop.clone(), seen.clone());
        let id = m.to_string();
        threads.push(std::thread::spawn(move || observe(ns, id, url, stop, seen)));
    }
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let (proxy, stop, acked) = (c.proxy_url(), stop.clone(), acked.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let url = format!("{proxy}/internal/kv/hosts/{n:06}");
                let r = http_timeout("PUT", &url, Some(&format!("v{n}")), Duration::from_secs(10));
                if r.is_ok_and(|r| r.status == 200) {
                    acked.lock().unwrap().push(n);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };

    for cut in [Cut::Both, Cut::Outgoing, Cut::Incoming] {
        let writes_before = acked.lock().unwrap().len();
        let cut_at = Instant::now();
        seg.nft(&active, &cut.script());
        // From the bridge the cut-off master is silent or stale: wait for another.
        let (next, next_term) = wait_until("another master active", T, || {
            let a = c.active_masters();
            a.iter().find(|(m, t)| *m != active && *t > term).cloned()
        });
        let took_over = cut_at.elapsed();
        // The cut-off master, asked from inside its own host, has let go.
        let let_go = wait_until("the cut-off master stops reporting active", T, || {
            let s = seen.lock().unwrap();
            let last = s
                .iter()
                .filter(|(_, m, _)| *m == active)
                .map(|(at, _, _)| *at)
                .max()?;
            (last.elapsed() > Duration::from_millis(500))
                .then(|| last.saturating_duration_since(cut_at))
        });
        wait_until("writes through the proxy again", T, || {
            (acked.lock().unwrap().len() > writes_before + 20).then_some(())
        });
        println!(
            "{cut:?} cut of {active}'s host: {next} active (term {next_term}) after {:.2} s; \
             {active} last answered active {:.2} s after the cut",
            took_over.as_secs_f64(),
            let_go.as_secs_f64()
        );
        // No overlap: it had let go before the other could be elected.
        assert!(
            let_go < took_over,
            "{active} still answered active {let_go:?} after the cut, {next} was active after {took_over:?}"
        );
        seg.nft(&active, "delete table inet cut\n");
        let applied = |id: &str| c.master_gauge(id, "ballast_master_raft_applied_index");
        let (leader, _) = c.wait_one_active(T);
        let healed = active.clone();
        wait_until("the healed master caught up", T, || {
            (applied(&healed)? >= applied(&leader)?).then_some(())
        });
        (active, term) = c.wait_one_active(T);
    }

    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    for t in threads {
        t.join().unwrap();
    }

    // No two masters active in one term, as every host saw it.
    let mut by_term: BTreeMap<u64, String> = BTreeMap::new();
    for (_, m, t) in seen.lock().unwrap().iter() {
        let first = by_term.entry(*t).or_insert_with(|| m.clone());
        assert_eq!(first, m, "two masters active in term {t}");
    }
    println!("active terms seen: {by_term:?}");
    assert!(by_term.len() >= 4, "three takeovers: {by_term:?}");

    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 60,
        "only {} writes acknowledged",
        acked.len()
    );
    for n in &acked {
        let r = c.read_kv(&format!("hosts/{n:06}"));
        assert_eq!(r.status, 200, "acknowledged write {n} lost: {}", r.body);
        assert_eq!(r.json()["value"], format!("v{n}"), "write {n}");
    }
    println!("{} acknowledged writes, every one there", acked.len());
}
