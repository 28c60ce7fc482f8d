//! Delayed links without `sch_netem` (this machine's kernel has none): nftables sends new
//! TCP connections between two sets of nodes to a relay, which forwards every byte after
//! a fixed delay, both ways, and connects from the initiating node's own address (so the
//! far end sees the usual source, and cuts by address still apply). The relay's own
//! sockets carry a firewall mark the redirect skips. Connections open before the delay
//! starts are reset, so every exchange from then on goes through a relay.
//!
//! What it delays is TCP (the API, Raft, health checks, log fetches); DNS over UDP is not.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};

/// The firewall mark on a relay's own connections (the redirect leaves them alone).
pub const RELAY_MARK: u32 = 0x0ba1_1a57;

/// One relay: accepts on a loopback address and forwards to `target` from `source`.
struct Relay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Every stream it holds, shut down when it stops.
    streams: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn start(listen_ip: IpAddr, target: SocketAddr, source: IpAddr, delay: Duration) -> Self {
        let listener = TcpListener::bind((listen_ip, 0)).expect("bind a relay");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let streams = Arc::new(Mutex::new(Vec::new()));
        let (s, held) = (stop.clone(), streams.clone());
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let Ok(server) = connect_marked(source, target) else {
                            let _ = client.shutdown(Shutdown::Both);
                            continue;
                        };
                        let mut h = held.lock().unwrap();
                        h.push(client.try_clone().unwrap());
                        h.push(server.try_clone().unwrap());
                        drop(h);
                        pump(
                            client.try_clone().unwrap(),
                            server.try_clone().unwrap(),
                            delay,
                        );
                        pump(server, client, delay);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            addr,
            stop,
            streams,
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in self.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// A TCP connection to `target` from `source` (any port), marked [`RELAY_MARK`].
fn connect_marked(source: IpAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let (IpAddr::V4(src), SocketAddr::V4(dst)) = (source, target) else {
        return Err(std::io::Error::other("IPv4 only"));
    };
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::setsockopt(&fd, sockopt::Mark, &RELAY_MARK)?;
    socket::bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(std::net::SocketAddrV4::new(src, 0)),
    )?;
    socket::connect(fd.as_raw_fd(), &SockaddrIn::from(dst))?;
    let s = TcpStream::from(fd);
    s.set_nodelay(true)?;
    Ok(s)
}

/// Copy `from` to `to`, each chunk written `delay` after it was read; the end of `from`
/// ends `to`'s writing side.
fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    });
    thread::spawn(move || {
        while let Ok((at, bytes)) = rx.recv() {
            let due = at + delay;
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// Links delayed by relays, with the nftables table that sends connections to them;
/// dropping it removes the table and resets every relayed connection.
pub struct DelayedLinks {
    table: String,
    _relays: Vec<Relay>,
}

impl DelayedLinks {
    /// Delay every TCP connection from an address of `from` to a listening address of
    /// `to` by `delay` each way. `pairs` is `(initiator ip, target address)`; `listen_ip`
    /// a loopback address of the test's own for the relays; `table` the nftables table
    /// to use (created here).
    pub fn start(
        table: &str,
        listen_ip: IpAddr,
        pairs: &[(IpAddr, SocketAddr)],
        delay: Duration,
    ) -> Self {
        let mut relays = Vec::new();
        let mut script = format!(
            "add table ip {table}\n\
             add chain ip {table} to_relay {{ type nat hook output priority -100 ; }}\n\
             add chain ip {table} old_conns {{ type filter hook output priority 10 ; }}\n"
        );
        let mut seen = BTreeMap::new();
        for (src, dst) in pairs {
            if seen.insert((*src, *dst), ()).is_some() {
                continue;
            }
            let relay = Relay::start(listen_ip, *dst, *src, delay);
            let (d_ip, d_port) = (dst.ip(), dst.port());
            script.push_str(&format!(
                "add rule ip {table} to_relay ip saddr {src} ip daddr {d_ip} tcp dport {d_port} \
                 meta mark != {RELAY_MARK} dnat to {}\n",
                relay.addr
            ));
            // What still goes straight there is a connection opened before: reset it.
            script.push_str(&format!(
                "add rule ip {table} old_conns ip saddr {src} ip daddr {d_ip} tcp dport {d_port} \
                 meta mark != {RELAY_MARK} reject with tcp reset\n"
            ));
            relays.push(relay);
        }
        crate::nft(&script);
        Self {
            table: table.to_string(),
            _relays: relays,
        }
    }
}

impl Drop for DelayedLinks {
    fn drop(&mut self) {
        crate::nft(&format!("delete table ip {}\n", self.table));
        // then the relays go (their fields drop after this), resetting what they held
    }
}
