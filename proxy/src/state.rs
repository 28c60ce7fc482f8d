//! State shared by the HTTP proxy, the DNS responder, the admin endpoint and the
//! health checkers: the settings (swapped on reload), the health table and the
//! published [`Routing`], the hold queue and the registry of upstream connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tokio::sync::{watch, Notify};

use crate::health::{ActiveMaster, ActiveReport, HealthTable, Routing, Transition};
use crate::metrics::Metrics;
use crate::settings::Settings;

/// Why a held request was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HoldError {
    /// No master became active within the hold timeout. Retrying later helps.
    #[error("no active master within the hold timeout")]
    Timeout,
    /// Too many requests already wait. Retrying later helps.
    #[error("hold queue full ({0} requests already waiting for an active master)")]
    Full(usize),
    /// The proxy is shutting down.
    #[error("proxy shutting down")]
    Closed,
}

/// Everything shared, behind one `Arc`.
pub struct Shared {
    settings: RwLock<Arc<Settings>>,
    table: Mutex<TableState>,
    routing_tx: watch::Sender<Routing>,
    pub metrics: Metrics,
    held: AtomicUsize,
    in_flight: Arc<AtomicUsize>,
    /// Wakes every checker for an immediate re-check (a request saw a master fail).
    pub recheck: Notify,
    /// Wakes the checker supervisor after a reload changed the masters or timings.
    pub reconfigured: Notify,
    pub conns: ConnRegistry,
    /// Which of the other proxies are alive (for DNS).
    pub(crate) peers: crate::liveness::Peers,
    /// A successor serves on this proxy's sockets ([`crate::upgrade`]).
    handing_over: AtomicBool,
    /// Ends the watches [`crate::resume`] serves (the proxy stops).
    pub(crate) streams_end: tokio_util::sync::CancellationToken,
    /// Each identity's requests in flight through this proxy.
    pub(crate) fairness: Arc<crate::fairness::Fairness>,
}

struct TableState {
    table: HealthTable,
    /// Since when no master is active (for the failover histogram).
    down_since: Option<Instant>,
}

impl Shared {
    pub fn new(settings: Settings) -> Arc<Self> {
        let table = HealthTable::new(settings.masters.iter().cloned());
        let (routing_tx, _) = watch::channel(Routing::default());
        let metrics = Metrics::new();
        metrics.info.with_label_values(&[&settings.proxy.id]).set(1);
        let shared = Arc::new(Self {
            settings: RwLock::new(Arc::new(settings)),
            table: Mutex::new(TableState {
                table,
                down_since: Some(Instant::now()),
            }),
            routing_tx,
            metrics,
            held: AtomicUsize::new(0),
            in_flight: Arc::new(AtomicUsize::new(0)),
            recheck: Notify::new(),
            reconfigured: Notify::new(),
            conns: ConnRegistry::default(),
            peers: crate::liveness::Peers::default(),
            handing_over: AtomicBool::new(false),
            streams_end: tokio_util::sync::CancellationToken::new(),
            fairness: Arc::default(),
        });
        shared.publish_with(|_| ());
        shared
    }

    /// From now on every response closes its connection (a successor took over).
    pub(crate) fn hand_over(&self) {
        self.handing_over.store(true, Ordering::Relaxed);
    }

    pub(crate) fn handing_over(&self) -> bool {
        self.handing_over.load(Ordering::Relaxed)
    }

    pub fn settings(&self) -> Arc<Settings> {
        self.settings.read().expect("settings lock").clone()
    }

    /// Swap in reloaded settings; the checkers pick up masters and timings.
    pub fn set_settings(&self, s: Settings) {
        let masters = s.masters.clone();
        *self.settings.write().expect("settings lock") = Arc::new(s);
        self.publish_with(|t| t.set_masters(masters));
        self.reconfigured.notify_waiters();
    }

    pub fn routing(&self) -> watch::Receiver<Routing> {
        self.routing_tx.subscribe()
    }

    pub fn current(&self) -> Routing {
        self.routing_tx.borrow().clone()
    }

    /// Record one health check result.
    pub fn observe(&self, id: &str, started: Instant, result: Result<ActiveReport, ()>) {
        let hc = self.settings().proxy.health.clone();
        self.publish_with(|t| t.observe(id, started, result, hc.rise, hc.fall));
    }

    /// A request could not reach `id`: route away from it at once and re-check all.
    pub fn mark_down(&self, id: &str) {
        tracing::warn!(
            master = id,
            "master unreachable from a request, marked down"
        );
        self.publish_with(|t| t.mark_down(id, Instant::now()));
        self.recheck.notify_waiters();
    }

    /// A request to `id` failed in a way that may be load rather than death: re-check
    /// every master now, keep routing as the checks say.
    pub fn suspect(&self, id: &str) {
        tracing::debug!(master = id, "request to the master failed; re-checking");
        self.recheck.notify_waiters();
    }

    /// `id` answered "not active": route away from it at once and re-check all.
    pub fn mark_not_active(&self, id: &str) {
        tracing::info!(master = id, "master answered not active, re-routing");
        self.publish_with(|t| t.mark_not_active(id, Instant::now()));
        self.recheck.notify_waiters();
    }

    fn publish_with(&self, f: impl FnOnce(&mut HealthTable)) {
        let mut st = self.table.lock().expect("table lock");
        f(&mut st.table);
        let (routing, transition) = st.table.routing();
        let now = Instant::now();
        match transition {
            Some(Transition::Down) => st.down_since = Some(now),
            Some(Transition::Up { failover }) => {
                if let Some(since) = st.down_since.take() {
                    if failover {
                        self.metrics
                            .failover_seconds
                            .observe(now.duration_since(since).as_secs_f64());
                    }
                }
                if failover {
                    self.metrics.failovers.inc();
                }
            }
            Some(Transition::Switch) => {
                self.metrics.failover_seconds.observe(0.0);
                self.metrics.failovers.inc();
            }
            None => {}
        }
        if let Some(t) = &transition {
            match &routing.active {
                Some(a) => {
                    tracing::info!(master = %a.id, term = a.term, addr = %a.addr, ?t, "routing to master")
                }
                None => tracing::warn!("no active master; holding requests"),
            }
        }
        self.routing_tx.send_if_modified(|old| {
            if *old != routing {
                self.metrics.set_routing(old, &routing);
                *old = routing;
                true
            } else {
                false
            }
        });
    }

    /// Wait until a master is active (at most until `deadline`), bounded by the
    /// configured number of concurrent waiters. Returns at once when one is active.
    pub async fn wait_active(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<ActiveMaster, HoldError> {
        let mut rx = self.routing();
        if let Some(a) = rx.borrow_and_update().active.clone() {
            return Ok(a);
        }
        let max = self.settings().proxy.hold.max_requests;
        let _slot = HoldSlot::acquire(self, max)?;
        let res = tokio::time::timeout_at(deadline, rx.wait_for(|r| r.active.is_some())).await;
        match res {
            Ok(Ok(r)) => Ok(r.active.clone().expect("waited for Some")),
            Ok(Err(_)) => Err(HoldError::Closed),
            Err(_) => Err(HoldError::Timeout),
        }
    }

    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// API requests being served now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Count one API request until the guard drops.
    pub fn request_guard(&self) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.in_flight.clone())
    }
}

/// Counts an API request in flight while alive.
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct HoldSlot<'a>(&'a Shared);

impl<'a> HoldSlot<'a> {
    fn acquire(shared: &'a Shared, max: usize) -> Result<Self, HoldError> {
        let prev = shared.held.fetch_add(1, Ordering::AcqRel);
        if prev >= max {
            shared.held.fetch_sub(1, Ordering::AcqRel);
            return Err(HoldError::Full(max));
        }
        shared.metrics.held_requests.inc();
        Ok(Self(shared))
    }
}

impl Drop for HoldSlot<'_> {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.held_requests.dec();
    }
}

/// One upstream connection the proxy opened to a master.
#[derive(Debug, Clone)]
struct ConnEntry {
    master: String,
    addr: SocketAddr,
    /// A request is using it now.
    in_flight: bool,
    /// That request is a stream (watch, follow).
    stream: bool,
}

/// Upstream connections by socket fd, so they can be closed when the active master
/// changes (open watches and idle pooled connections to the old master).
#[derive(Default)]
pub struct ConnRegistry {
    conns: Mutex<HashMap<RawFd, ConnEntry>>,
}

impl ConnRegistry {
    pub fn begin(&self, fd: RawFd, master: &str, addr: SocketAddr, stream: bool) {
        let mut conns = self.conns.lock().expect("conns lock");
        match conns.get_mut(&fd) {
            // a pooled connection used again: no new entry
            Some(e) if e.master == master && e.addr == addr => {
                e.in_flight = true;
                e.stream = stream;
            }
            _ => {
                conns.insert(
                    fd,
                    ConnEntry {
                        master: master.to_string(),
                        addr,
                        in_flight: true,
                        stream,
                    },
                );
            }
        }
    }

    /// The connection of `fd` is closed: forget it.
    pub fn forget(&self, fd: RawFd) {
        self.conns.lock().expect("conns lock").remove(&fd);
    }

    pub fn end(&self, fd: RawFd) {
        if let Some(e) = self.conns.lock().expect("conns lock").get_mut(&fd) {
            e.in_flight = false;
            e.stream = false;
        }
    }

    /// Shut down every registered connection to a master other than `keep`: idle ones
    /// and streams, and with `in_flight` also ordinary requests still waiting for their
    /// answer (a frozen master never answers). Each one is counted in `closed_total`
    /// before its socket is shut down, so whoever sees the stream end already sees it
    /// counted. Returns how many were closed.
    pub fn close_except(
        &self,
        keep: Option<&str>,
        in_flight: bool,
        closed_total: &prometheus::IntCounter,
    ) -> u64 {
        let mut conns = self.conns.lock().expect("conns lock");
        let mut closed = 0;
        conns.retain(|fd, e| {
            if keep == Some(e.master.as_str()) {
                return true;
            }
            if e.in_flight && !e.stream && !in_flight {
                return true;
            }
            // The fd may have been closed and reused since it was registered: only
            // shut it down if it is still connected to that master's address.
            let still = nix::sys::socket::getpeername::<nix::sys::socket::SockaddrStorage>(*fd)
                .ok()
                .and_then(|a| sockaddr_to_std(&a))
                == Some(e.addr);
            if still {
                closed_total.inc();
                closed += 1;
                if let Err(e) = nix::sys::socket::shutdown(*fd, nix::sys::socket::Shutdown::Both) {
                    // the peer went away between the two calls: closed all the same
                    tracing::debug!(fd, error = %e, "shutdown of a master connection");
                }
            }
            false
        });
        closed
    }
}

pub(crate) fn sockaddr_to_std(a: &nix::sys::socket::SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::from((v4.ip(), v4.port())));
    }
    if let Some(v6) = a.as_sockaddr_in6() {
        return Some(SocketAddr::from((v6.ip(), v6.port())));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_config::ProxyConfig;
    use std::time::Duration;

    fn settings(max: usize, hold: Duration) -> Settings {
        let mut proxy = ProxyConfig::default();
        proxy.hold.max_requests = max;
        proxy.hold.timeout = hold;
        Settings {
            proxy,
            masters: vec![
                ("m1".into(), "127.0.1.1:6443".parse().unwrap()),
                ("m2".into(), "127.0.1.2:6443".parse().unwrap()),
            ],
            vip: None,
            proxies: Vec::new(),
            requests_in_flight_per_user: 400,
        }
    }

    fn active(id: &str, term: u64) -> Result<ActiveReport, ()> {
        Ok(ActiveReport {
            id: id.into(),
            term,
            active: true,
            leader: None,
        })
    }

    #[tokio::test]
    async fn hold_then_release_on_failover() {
        let s = Shared::new(settings(10, Duration::from_secs(5)));
        s.observe("m1", Instant::now(), active("m1", 1));
        assert_eq!(s.current().active.unwrap().id, "m1");
        s.mark_down("m1");
        assert!(s.current().active.is_none());
        let s2 = s.clone();
        let waiter = tokio::spawn(async move {
            s2.wait_active(tokio::time::Instant::now() + Duration::from_secs(5))
                .await
        });
        // wait until the request is held
        for _ in 0..100 {
            if s.held() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(s.held(), 1);
        s.observe("m2", Instant::now(), active("m2", 2));
        let got = waiter.await.unwrap().unwrap();
        assert_eq!(got.id, "m2");
        assert_eq!(s.held(), 0);
        assert_eq!(s.current().failovers, 1);
        assert_eq!(s.metrics.failovers.get(), 1);
        assert_eq!(s.metrics.failover_seconds.get_sample_count(), 1);
    }

    #[tokio::test]
    async fn hold_times_out_and_is_bounded() {
        let s = Shared::new(settings(1, Duration::from_millis(100)));
        let s2 = s.clone();
        let first = tokio::spawn(async move {
            s2.wait_active(tokio::time::Instant::now() + Duration::from_millis(200))
                .await
        });
        for _ in 0..100 {
            if s.held() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let second = s
            .wait_active(tokio::time::Instant::now() + Duration::from_millis(200))
            .await;
        assert_eq!(second, Err(HoldError::Full(1)));
        assert_eq!(first.await.unwrap(), Err(HoldError::Timeout));
        assert_eq!(s.held(), 0);
    }
}
