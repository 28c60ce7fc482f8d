//! The VIP on real interfaces: three proxies, each a host in its own network namespace on
//! one bridge, and a client host. The holder adds the VIP to its `eth0` and announces it
//! by gratuitous ARP; kill -9, SIGSTOP past the lease, a cut from the masters and SIGTERM
//! each move it to another proxy, and the client's neighbour entry follows. A checker
//! reads every proxy host's addresses every 20 ms throughout: never two hosts with the
//! VIP. The masters run in the test's own namespace on the bridge's addresses. Block 39.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballast_tests::netns::{
    all_addresses_in, enter, vip_cluster, vip_cluster_at, HostProcs, Segment,
};
use ballast_tests::*;
use nix::sys::signal::Signal;

const BLOCK: u8 = 39;
const T: Duration = Duration::from_secs(60);
const PROXIES: [&str; 3] = ["p1", "p2", "p3"];

/// Who answered the client on the VIP, and when.
#[derive(Clone, Debug)]
struct Answer {
    at: Instant,
    from: Option<String>,
}

/// A client inside host `c`: asks the VIP's admin `/status` (which proxy answers) and the
/// VIP's API `/readyz`, every 50 ms until `stop`.
fn client_loop(ns: String, vip: IpAddr, stop: Arc<AtomicBool>, log: Arc<Mutex<Vec<Answer>>>) {
    enter(&ns);
    // built here, so their sockets are made in this namespace
    let api = test_pki()
        .admin_builder()
        .timeout(Duration::from_millis(800))
        .build()
        .unwrap();
    let admin = reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(800))
        .build()
        .unwrap();
    while !stop.load(Ordering::Relaxed) {
        let at = Instant::now();
        let id = admin
            .get(format!("http://{}/status", SocketAddr::new(vip, 9180)))
            .send()
            .ok()
            .and_then(|r| r.json::<serde_json::Value>().ok())
            .and_then(|s| s["id"].as_str().map(String::from));
        let ready = api
            .get(format!("https://{}/readyz", SocketAddr::new(vip, 6443)))
            .send()
            .is_ok_and(|r| r.status().as_u16() == 200);
        log.lock().unwrap().push(Answer {
            at,
            from: id.filter(|_| ready),
        });
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The VIP watched from outside while a test runs: a checker reading every proxy host's
/// addresses every 20 ms (the most hosts that had the VIP at once), and the client loop.
struct Watch {
    stop: Arc<AtomicBool>,
    most: Arc<AtomicUsize>,
    answers: Arc<Mutex<Vec<Answer>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Watch {
    fn start(seg: &Segment, hosts: &[&str], vip: IpAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let most = Arc::new(AtomicUsize::new(0));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let checker = {
            let (stop, most) = (stop.clone(), most.clone());
            let hosts: Vec<String> = hosts.iter().map(|p| seg.ns(p)).collect();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let n = hosts
                        .iter()
                        .filter(|ns| all_addresses_in(ns).contains(&vip))
                        .count();
                    most.fetch_max(n, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        let client = {
            let (ns, stop, log) = (seg.ns("c"), stop.clone(), answers.clone());
            std::thread::spawn(move || client_loop(ns, vip, stop, log))
        };
        Self {
            stop,
            most,
            answers,
            threads: vec![checker, client],
        }
    }

    /// Who answered the client last since `since`, if not one of `not`.
    fn answered_by(&self, since: Instant, not: &[&str]) -> Option<String> {
        let log = self.answers.lock().unwrap();
        let a = log.iter().rev().find(|a| a.at >= since)?;
        a.from.clone().filter(|f| !not.contains(&f.as_str()))
    }

    /// Stop watching; the most hosts that had the VIP at once.
    fn finish(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        self.most.load(Ordering::Relaxed)
    }
}

#[test]
fn one_host_holds_the_vip_and_it_moves_when_the_holder_fails() {
    require("nft");
    let mut seg = Segment::new(BLOCK);
    let vip = seg.addr(100);
    let c = vip_cluster(&mut seg, &PROXIES);
    c.wait_one_active(T);
    let mut proxies = HostProcs::default();
    for id in PROXIES {
        proxies.start_proxy(&seg, &c, id);
    }
    let (m_addr, p_addr) = (|i: u8| seg.addr(10 + i), |i: u8| seg.addr(20 + i));
    let own_status = |id: &str| -> Option<serde_json::Value> {
        let i = PROXIES.iter().position(|p| *p == id).unwrap() as u8 + 1;
        let r = http_timeout(
            "GET",
            &format!("http://{}:9180/status", p_addr(i)),
            None,
            Duration::from_millis(500),
        )
        .ok()?;
        (r.status == 200).then(|| r.json())
    };

    let watch = Watch::start(&seg, &PROXIES, vip.into());
    let answered_by = |since: Instant, not: &[&str]| watch.answered_by(since, not);
    let holders = |seg: &Segment| -> Vec<&'static str> {
        PROXIES
            .into_iter()
            .filter(|p| seg.addresses(p).contains(&vip))
            .collect()
    };
    // The client's neighbour entry for the VIP names the holder's MAC.
    let neighbour_follows = |seg: &Segment, holder: &str| {
        let mac = seg.mac(holder);
        wait_until("the client's neighbour entry names the holder", T, || {
            (seg.neighbour("c", vip).as_deref() == Some(mac.as_str())).then_some(())
        });
    };

    let t0 = Instant::now();
    let first = wait_until("the VIP answers the client", T, || answered_by(t0, &[]));
    assert_eq!(holders(&seg), vec![first.as_str()]);
    assert_eq!(own_status(&first).unwrap()["vip_holder"], true);
    neighbour_follows(&seg, &first);

    // kill -9 of the holder: another host adds the VIP, and the client follows it
    let t1 = Instant::now();
    proxies.signal(&first, Signal::SIGKILL);
    proxies.reap(&first);
    let second = wait_until("another proxy answers on the VIP", T, || {
        answered_by(t1, &[first.as_str()])
    });
    println!(
        "kill -9 of {first}: {second} answers on the VIP after {:?}",
        t1.elapsed()
    );
    neighbour_follows(&seg, &second);
    wait_until("the dead holder's address runs out", T, || {
        (holders(&seg) == vec![second.as_str()]).then_some(())
    });
    proxies.start_proxy(&seg, &c, &first);
    wait_until("the restarted proxy is up and not the holder", T, || {
        own_status(&first).filter(|s| s["vip_holder"] == false)
    });

    // SIGSTOP of the holder past its lease: another takes over; resumed, it holds nothing
    let t2 = Instant::now();
    proxies.signal(&second, Signal::SIGSTOP);
    let third = wait_until("a third proxy answers on the VIP", T, || {
        answered_by(t2, &[second.as_str()])
    });
    println!(
        "SIGSTOP of {second}: {third} answers on the VIP after {:?}",
        t2.elapsed()
    );
    std::thread::sleep(Duration::from_secs(1));
    proxies.signal(&second, Signal::SIGCONT);
    wait_until("the resumed proxy knows it is not the holder", T, || {
        own_status(&second).filter(|s| s["vip_holder"] == false)
    });
    assert!(!seg.addresses(&second).contains(&vip));
    neighbour_follows(&seg, &third);

    // the holder cut off from the masters lets go within its lease, and another takes over
    let t3 = Instant::now();
    let masters: Vec<String> = (1..=3).map(|i| m_addr(i).to_string()).collect();
    seg.nft(
        &third,
        &format!(
            "add table ip cut\nadd chain ip cut out {{ type filter hook output priority 0 ; }}\nadd rule ip cut out ip daddr {{ {} }} drop\n",
            masters.join(", ")
        ),
    );
    let fourth = wait_until("a proxy that reaches the masters answers", T, || {
        answered_by(t3, &[third.as_str()])
    });
    println!(
        "{third} cut from the masters: {fourth} answers on the VIP after {:?}",
        t3.elapsed()
    );
    assert!(!seg.addresses(&third).contains(&vip));
    neighbour_follows(&seg, &fourth);
    seg.nft(&third, "delete table ip cut\n");

    // SIGTERM: the holder releases at once, the next takes over at its next read
    let t4 = Instant::now();
    proxies.signal(&fourth, Signal::SIGTERM);
    proxies.reap(&fourth);
    let fifth = wait_until("the VIP answers after a SIGTERM", T, || {
        answered_by(t4, &[fourth.as_str()])
    });
    println!(
        "SIGTERM of {fourth}: {fifth} answers on the VIP after {:?}",
        t4.elapsed()
    );
    neighbour_follows(&seg, &fifth);

    assert_eq!(
        watch.finish(),
        1,
        "two proxy hosts had the VIP at once (0: never any)"
    );
    drop(proxies);
    drop(c);
}

/// An IPv6 VIP: the holder adds it without duplicate address detection and announces it
/// by an unsolicited neighbour advertisement with the override flag, so the client's
/// neighbour entry moves to the next holder at once (without it the client would keep
/// sending to the former holder's MAC until its entry went stale, 15–45 s). Never on two
/// hosts. Block 40.
#[test]
fn an_ipv6_vip_moves_and_the_client_follows_its_advertisement() {
    const IDS: [&str; 2] = ["p1", "p2"];
    let mut seg = Segment::new(40);
    let vip = IpAddr::V6(seg.addr6(100));
    let c = vip_cluster_at(&mut seg, &IDS, vip, 64);
    c.wait_one_active(T);
    let mut proxies = HostProcs::default();
    for id in IDS {
        proxies.start_proxy(&seg, &c, id);
    }
    let watch = Watch::start(&seg, &IDS, vip);
    let answered_by = |since: Instant, not: &[&str]| watch.answered_by(since, not);
    let t0 = Instant::now();
    let first = wait_until("the IPv6 VIP answers the client", T, || {
        answered_by(t0, &[])
    });
    assert!(seg.all_addresses(&first).contains(&vip));
    assert_eq!(seg.neighbour("c", vip), Some(seg.mac(&first)));

    // SIGTERM: the next holder takes over within a poll, and its advertisement moves the
    // client's entry long before the entry would have gone stale
    let other = IDS.into_iter().find(|p| *p != first).unwrap();
    let t1 = Instant::now();
    proxies.signal(&first, Signal::SIGTERM);
    proxies.reap(&first);
    let second = wait_until("the other proxy answers on the IPv6 VIP", T, || {
        answered_by(t1, &[first.as_str()])
    });
    assert_eq!(second, other);
    let took = t1.elapsed();
    println!("SIGTERM of {first}: {second} answers on the IPv6 VIP after {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "the client followed only after {took:?}"
    );
    assert_eq!(seg.neighbour("c", vip), Some(seg.mac(&second)));

    // kill -9: the first comes back, then the holder dies; the address of the dead one
    // runs out before the other adds it
    proxies.start_proxy(&seg, &c, &first);
    let t2 = Instant::now();
    proxies.signal(&second, Signal::SIGKILL);
    proxies.reap(&second);
    let third = wait_until("the restarted proxy answers on the IPv6 VIP", T, || {
        answered_by(t2, &[second.as_str()])
    });
    println!(
        "kill -9 of {second}: {third} answers on the IPv6 VIP after {:?}",
        t2.elapsed()
    );
    assert_eq!(seg.neighbour("c", vip), Some(seg.mac(&third)));

    assert_eq!(watch.finish(), 1, "two hosts had the IPv6 VIP at once");
    drop(proxies);
    drop(c);
}
