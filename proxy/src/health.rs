//! Health of the masters: what each master's `GET /active` said, flap hysteresis
//! (rise/fall), and the choice of the one master to route to, ordered by Raft term.
//!
//! [`HealthTable`] is pure (no I/O, time passed in) and unit-tested below; the checker
//! tasks in `checker.rs` feed it and publish the resulting [`Routing`].

use std::net::SocketAddr;
use std::time::Instant;

use serde::Deserialize;

/// The body of a master's `GET /active` (both the 200 and the 503 answer).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ActiveReport {
    pub id: String,
    pub term: u64,
    pub active: bool,
    #[serde(default)]
    pub leader: Option<String>,
}

/// Flap hysteresis: `rise` consecutive successes make a master healthy, `fall`
/// consecutive failures make it unhealthy. Starts unhealthy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Hysteresis {
    healthy: bool,
    /// Consecutive results that disagree with `healthy`.
    streak: u32,
}

impl Hysteresis {
    pub(crate) fn healthy(&self) -> bool {
        self.healthy
    }

    /// Record one check result; returns whether the health flipped.
    pub(crate) fn observe(&mut self, ok: bool, rise: u32, fall: u32) -> bool {
        if ok == self.healthy {
            self.streak = 0;
            return false;
        }
        self.streak += 1;
        let needed = if ok { rise.max(1) } else { fall.max(1) };
        if self.streak >= needed {
            self.healthy = ok;
            self.streak = 0;
            true
        } else {
            false
        }
    }

    /// Force unhealthy at once (a request saw the master refuse connections).
    pub(crate) fn force_down(&mut self) {
        self.healthy = false;
        self.streak = 0;
    }
}

/// One master as the proxy sees it.
#[derive(Debug, Clone)]
pub(crate) struct MasterState {
    pub id: String,
    pub addr: SocketAddr,
    pub health: Hysteresis,
    /// The last valid `/active` answer, if any.
    pub report: Option<ActiveReport>,
    /// Results of checks started before this instant are ignored (set when a request
    /// proved the master down or not active, so an in-flight stale check can't undo it).
    pub distrust_before: Option<Instant>,
}

impl MasterState {
    pub(crate) fn new(id: impl Into<String>, addr: SocketAddr) -> Self {
        Self {
            id: id.into(),
            addr,
            health: Hysteresis::default(),
            report: None,
            distrust_before: None,
        }
    }

    fn claims_active(&self) -> Option<u64> {
        match &self.report {
            Some(r) if r.active && self.health.healthy() => Some(r.term),
            _ => None,
        }
    }
}

/// The master that requests are routed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveMaster {
    pub id: String,
    pub addr: SocketAddr,
    pub term: u64,
}

/// One master in the published view (`/status`, DNS, metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterView {
    pub id: String,
    pub addr: SocketAddr,
    pub healthy: bool,
    pub active: bool,
    pub term: Option<u64>,
}

/// What the proxy, DNS responder and admin endpoint read (via a `watch`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routing {
    pub active: Option<ActiveMaster>,
    pub masters: Vec<MasterView>,
    /// Times the routed master changed to a different one.
    pub failovers: u64,
}

/// All masters' health plus the term ordering; computes [`Routing`].
#[derive(Debug, Clone, Default)]
pub(crate) struct HealthTable {
    pub masters: Vec<MasterState>,
    /// Highest term any healthy master has claimed to be active in. A claim with a
    /// lower term is never routed to again.
    pub max_active_term: u64,
    /// The master that claimed `max_active_term`.
    floor_holder: Option<String>,
    /// The master routed to now.
    routed: Option<ActiveMaster>,
    /// The last master routed to (survives gaps with no active master).
    last_routed: Option<String>,
    failovers: u64,
}

/// A change of the routed master, for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Transition {
    /// An active master appeared; `failover` when it differs from the last one.
    Up { failover: bool },
    /// The routed master went away and none replaced it.
    Down,
    /// Routed straight from one master to another.
    Switch,
}

impl HealthTable {
    pub(crate) fn new(masters: impl IntoIterator<Item = (String, SocketAddr)>) -> Self {
        Self {
            masters: masters
                .into_iter()
                .map(|(id, addr)| MasterState::new(id, addr))
                .collect(),
            ..Self::default()
        }
    }

    /// Replace the master list (config reload), keeping the state of masters whose id
    /// and address did not change.
    pub(crate) fn set_masters(&mut self, masters: impl IntoIterator<Item = (String, SocketAddr)>) {
        let old = std::mem::take(&mut self.masters);
        self.masters = masters
            .into_iter()
            .map(|(id, addr)| {
                old.iter()
                    .find(|m| m.id == id && m.addr == addr)
                    .cloned()
                    .unwrap_or_else(|| MasterState::new(id, addr))
            })
            .collect();
    }

    fn get_mut(&mut self, id: &str) -> Option<&mut MasterState> {
        self.masters.iter_mut().find(|m| m.id == id)
    }

    /// Record the result of a check of master `id` that started at `started`.
    /// `Ok(report)` for any valid `/active` answer (200 or 503), `Err(())` otherwise.
    pub(crate) fn observe(
        &mut self,
        id: &str,
        started: Instant,
        result: Result<ActiveReport, ()>,
        rise: u32,
        fall: u32,
    ) {
        let Some(m) = self.masters.iter_mut().find(|m| m.id == id) else {
            return;
        };
        if m.distrust_before.is_some_and(|t| started < t) {
            return;
        }
        match result {
            Ok(report) => {
                m.health.observe(true, rise, fall);
                if self.floor_holder.as_deref() == Some(m.id.as_str())
                    && report.term < self.max_active_term
                {
                    // A Raft node's term never goes down: this master lost its data
                    // (a new cluster). Forget the old floor rather than lock out forever.
                    tracing::warn!(master = %m.id, term = report.term, was = self.max_active_term,
                        "master reports a lower term than before; its state was reset");
                    self.max_active_term = report.term;
                }
                if report.active && m.health.healthy() && report.term >= self.max_active_term {
                    self.max_active_term = report.term;
                    self.floor_holder = Some(m.id.clone());
                }
                m.report = Some(report);
            }
            Err(()) => {
                m.health.observe(false, rise, fall);
                if !m.health.healthy() {
                    m.report = None;
                }
            }
        }
    }

    /// A request could not reach master `id` (connect refused/reset): down at once.
    pub(crate) fn mark_down(&mut self, id: &str, now: Instant) {
        if let Some(m) = self.get_mut(id) {
            m.health.force_down();
            m.report = None;
            m.distrust_before = Some(now);
        }
    }

    /// Master `id` answered a request with "not active": stop routing to it at once.
    pub(crate) fn mark_not_active(&mut self, id: &str, now: Instant) {
        if let Some(m) = self.get_mut(id) {
            if let Some(r) = m.report.as_mut() {
                r.active = false;
            }
            m.distrust_before = Some(now);
        }
    }

    /// Recompute who to route to. Returns the new routing and the transition, if the
    /// routed master changed.
    pub(crate) fn routing(&mut self) -> (Routing, Option<Transition>) {
        let floor = self.max_active_term;
        let best = self
            .masters
            .iter()
            .filter_map(|m| m.claims_active().map(|t| (m, t)))
            .filter(|(_, t)| *t >= floor)
            // Highest term wins; on a (theoretically impossible) tie keep the one
            // routed now, then the first in config order.
            .max_by(|(a, ta), (b, tb)| {
                let keep_a = self.routed.as_ref().is_some_and(|r| r.id == a.id);
                let keep_b = self.routed.as_ref().is_some_and(|r| r.id == b.id);
                ta.cmp(tb)
                    .then(keep_a.cmp(&keep_b))
                    .then_with(|| b.id.cmp(&a.id))
            })
            .map(|(m, term)| ActiveMaster {
                id: m.id.clone(),
                addr: m.addr,
                term,
            });

        let transition = match (&self.routed, &best) {
            (None, Some(new)) => {
                let failover = self.last_routed.as_ref().is_some_and(|l| *l != new.id);
                Some(Transition::Up { failover })
            }
            (Some(_), None) => Some(Transition::Down),
            (Some(old), Some(new)) if old.id != new.id => Some(Transition::Switch),
            _ => None,
        };
        match transition {
            Some(Transition::Up { failover: true }) | Some(Transition::Switch) => {
                self.failovers += 1
            }
            _ => {}
        }
        if let Some(b) = &best {
            self.last_routed = Some(b.id.clone());
        }
        self.routed = best.clone();

        let masters = self
            .masters
            .iter()
            .map(|m| MasterView {
                id: m.id.clone(),
                addr: m.addr,
                healthy: m.health.healthy(),
                active: best.as_ref().is_some_and(|b| b.id == m.id),
                term: m.report.as_ref().map(|r| r.term),
            })
            .collect();
        (
            Routing {
                active: best,
                masters,
                failovers: self.failovers,
            },
            transition,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 1, i], 6443))
    }

    fn table() -> HealthTable {
        HealthTable::new((1..=3).map(|i| (format!("m{i}"), addr(i))))
    }

    fn rep(id: &str, term: u64, active: bool) -> Result<ActiveReport, ()> {
        Ok(ActiveReport {
            id: id.into(),
            term,
            active,
            leader: None,
        })
    }

    #[test]
    fn hysteresis_rise_and_fall() {
        let mut h = Hysteresis::default();
        assert!(!h.healthy());
        assert!(!h.observe(true, 2, 3));
        assert!(!h.healthy());
        assert!(h.observe(true, 2, 3));
        assert!(h.healthy());
        // a single failure does not flip, a success resets the streak
        h.observe(false, 2, 3);
        h.observe(false, 2, 3);
        h.observe(true, 2, 3);
        h.observe(false, 2, 3);
        h.observe(false, 2, 3);
        assert!(h.healthy());
        assert!(h.observe(false, 2, 3));
        assert!(!h.healthy());
    }

    #[test]
    fn routes_to_the_active_master() {
        let mut t = table();
        let now = Instant::now();
        t.observe("m1", now, rep("m1", 3, false), 1, 2);
        t.observe("m2", now, rep("m2", 3, true), 1, 2);
        t.observe("m3", now, Err(()), 1, 2);
        let (r, tr) = t.routing();
        assert_eq!(r.active.as_ref().unwrap().id, "m2");
        assert_eq!(r.active.as_ref().unwrap().addr, addr(2));
        assert_eq!(tr, Some(Transition::Up { failover: false }));
        assert_eq!(r.failovers, 0);
        assert!(r.masters[0].healthy && !r.masters[0].active);
        assert!(r.masters[1].active);
        assert!(!r.masters[2].healthy);
    }

    #[test]
    fn higher_term_wins_and_lower_is_never_routed_again() {
        let mut t = table();
        let now = Instant::now();
        t.observe("m1", now, rep("m1", 7, true), 1, 2);
        assert_eq!(t.routing().0.active.unwrap().id, "m1");
        // m2 claims term 8 while m1 still claims 7: m2 wins
        t.observe("m2", now, rep("m2", 8, true), 1, 2);
        let (r, tr) = t.routing();
        assert_eq!(r.active.unwrap().id, "m2");
        assert_eq!(tr, Some(Transition::Switch));
        assert_eq!(r.failovers, 1);
        // m2 goes away; m1 still claims term 7 (partitioned): never routed to again
        t.mark_down("m2", Instant::now());
        let (r, tr) = t.routing();
        assert_eq!(r.active, None);
        assert_eq!(tr, Some(Transition::Down));
        t.observe("m1", Instant::now(), rep("m1", 7, true), 1, 2);
        assert_eq!(t.routing().0.active, None);
        // m3 wins term 9
        t.observe("m3", Instant::now(), rep("m3", 9, true), 1, 2);
        let (r, tr) = t.routing();
        assert_eq!(r.active.unwrap().id, "m3");
        assert_eq!(tr, Some(Transition::Up { failover: true }));
        assert_eq!(r.failovers, 2);
    }

    #[test]
    fn a_wiped_cluster_is_routed_again() {
        let mut t = table();
        let now = Instant::now();
        t.observe("m1", now, rep("m1", 9, true), 1, 2);
        assert_eq!(t.routing().0.active.unwrap().term, 9);
        // every master restarted with empty data: terms start again at 1
        t.observe("m1", now, rep("m1", 0, false), 1, 2);
        t.observe("m2", now, rep("m2", 1, true), 1, 2);
        assert_eq!(t.routing().0.active.unwrap().id, "m2");
    }

    #[test]
    fn fall_needs_consecutive_failures() {
        let mut t = table();
        let now = Instant::now();
        t.observe("m1", now, rep("m1", 1, true), 1, 2);
        assert!(t.routing().0.active.is_some());
        t.observe("m1", now, Err(()), 1, 2);
        assert!(t.routing().0.active.is_some(), "one failure is a flap");
        t.observe("m1", now, Err(()), 1, 2);
        assert!(t.routing().0.active.is_none());
    }

    #[test]
    fn stale_checks_cannot_undo_a_request_failure() {
        let mut t = table();
        let before = Instant::now();
        t.observe("m1", before, rep("m1", 1, true), 1, 2);
        assert!(t.routing().0.active.is_some());
        let failed = before + std::time::Duration::from_millis(5);
        t.mark_down("m1", failed);
        // a check that started before the failure still says active: ignored
        t.observe("m1", before, rep("m1", 1, true), 1, 2);
        assert!(t.routing().0.active.is_none());
        // a later check is believed
        t.observe(
            "m1",
            failed + std::time::Duration::from_millis(1),
            rep("m1", 1, true),
            1,
            2,
        );
        assert!(t.routing().0.active.is_some());
    }

    #[test]
    fn not_active_answer_reroutes_at_once() {
        let mut t = table();
        let now = Instant::now();
        t.observe("m1", now, rep("m1", 4, true), 1, 2);
        t.routing();
        t.mark_not_active("m1", now + std::time::Duration::from_millis(1));
        let (r, _) = t.routing();
        assert!(r.active.is_none());
        assert!(r.masters[0].healthy, "still healthy, just not active");
    }

    #[test]
    fn reload_keeps_state_of_unchanged_masters() {
        let mut t = table();
        let now = Instant::now();
        t.observe("m1", now, rep("m1", 4, true), 1, 2);
        t.set_masters(vec![
            ("m1".to_string(), addr(1)),
            ("m4".to_string(), addr(4)),
        ]);
        let (r, _) = t.routing();
        assert_eq!(r.active.unwrap().id, "m1");
        assert_eq!(r.masters.len(), 2);
        assert!(!r.masters[1].healthy);
    }
}
