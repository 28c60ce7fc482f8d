//! Idle and half-sent connections cannot starve a master or the proxy: with 2 000 silent
//! TCP connections and 200 TLS connections that sent half a request head held open
//! against a master (and 2 000 silent ones against the proxy), both still answer
//! `/readyz` on fresh connections, and the master closes the half-sent requests once
//! its header read timeout (`[limits] header_read_timeout`, 2 s here) runs out.
//! Address block 31.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_tests::{request, test_pki, wait_until, Cluster, ClusterOpts};

const IDLE: usize = 2_000;
const HALF_SENT: usize = 200;

fn idle_connections(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| TcpStream::connect(addr).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect()
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection that sent the first lines of a request head and then goes quiet.
fn half_sent(addr: SocketAddr) -> Tls {
    let config = ballast_config::tls::anonymous_client_config(&test_pki().ca()).unwrap();
    let name = rustls::pki_types::ServerName::from(addr.ip());
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"GET /readyz HTTP/1.1\r\nHost: m1\r\nX-Slow: ")
        .expect("send half a request head");
    tls.flush().unwrap();
    tls
}

/// Whether the server closed `tls` (end of stream or reset), without waiting.
fn closed(tls: &mut Tls) -> bool {
    let mut buf = [0u8; 256];
    match tls.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// `GET url` on a fresh connection answers 200 within `within`.
fn answers(url: &str, within: Duration) {
    let client = ballast_tests::test_pki()
        .admin_builder()
        .pool_max_idle_per_host(0)
        .timeout(within)
        .build()
        .unwrap();
    let t0 = Instant::now();
    let r = request(&client, "GET", url, None).unwrap_or_else(|e| {
        panic!(
            "{url} did not answer within {within:?} ({:?}): {e}",
            t0.elapsed()
        )
    });
    assert_eq!(r.status, 200, "{url}: {}", r.body);
}

#[test]
fn idle_and_half_sent_connections_do_not_starve_masters_or_the_proxy() {
    // This process holds 4 200 sockets: lift its soft limit to the hard one.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("read the open files limit");
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)
        .expect("raise the open files limit");
    let mut c = Cluster::configure(ClusterOpts::new(31).proxy(true), |cfg| {
        cfg.limits.header_read_timeout = Duration::from_secs(2);
    });
    for id in c.master_ids() {
        c.start_node(&id);
    }
    c.start_node("proxy");
    c.wait_one_active(Duration::from_secs(60));
    let m1 = c.master_api("m1");
    let master_readyz = format!("{}/readyz", c.master_url("m1"));
    let proxy_readyz = format!("{}/readyz", c.proxy_url());
    wait_until("the proxy routes", Duration::from_secs(30), || {
        (ballast_tests::status_of(&proxy_readyz) == 200).then_some(())
    });

    let _idle_master = idle_connections(m1, IDLE);
    let _idle_proxy = idle_connections(c.proxy_api(), IDLE);
    // the first half-sent requests' header timers start here, not once all are sent
    let sent = Instant::now();
    let mut slow: Vec<Tls> = (0..HALF_SENT).map(|_| half_sent(m1)).collect();
    for _ in 0..5 {
        answers(&master_readyz, Duration::from_secs(3));
        answers(&proxy_readyz, Duration::from_secs(3));
    }
    // The half-sent requests are closed once the header read timeout has run out (and
    // not long before).
    assert!(
        slow.iter_mut().take(5).all(|t| !closed(t)) || sent.elapsed() >= Duration::from_secs(2),
        "half-sent requests were closed before the header read timeout"
    );
    wait_until(
        "every half-sent request closed",
        Duration::from_secs(20),
        || {
            slow.retain_mut(|t| !closed(t));
            slow.is_empty().then_some(())
        },
    );
    assert!(sent.elapsed() >= Duration::from_secs(2));
    answers(&master_readyz, Duration::from_secs(3));
}
