//! Who holds the VIP, as a pure state machine (the IO is in [`crate::vip`]).
//!
//! The VIP lease is a `Lease` object (`kube-system/ballast-vip`) in the masters' store:
//! every write is a compare-and-swap on its resourceVersion, so the masters' Raft stays
//! the only consensus in the system, and of two proxies claiming the same version one
//! wins. Time is never read from the object: each proxy measures with its own monotonic
//! clock.
//!
//! **Holder.** A claim (acquire or renew) whose write succeeded lets its proxy serve the
//! VIP until `started + lease - margin`, `started` being the instant the proxy *began*
//! the claim (before it left, so every delay only shortens the hold). It renews every
//! `renew`, and stops serving the VIP at that deadline unless a later claim succeeded.
//!
//! **Candidate.** A proxy that sees the lease held by another remembers when it first saw
//! its current version (`first_seen`), and claims it only when that version has stood for
//! a whole `lease` by its own clock (or at once when the holder released it).
//!
//! **Why never two holders.** Let H's last successful claim begin at `s`; it wrote version
//! `v`. A candidate C can only see `v` after `v` was written, so `first_seen(v) ≥ s`, and
//! C claims no earlier than `first_seen(v) + lease ≥ s + lease`, while H stopped serving at
//! `s + lease - margin`. A newer successful claim by H changes the version and restarts
//! C's count. C's claim is a compare-and-swap on `v`: it fails if H renewed meanwhile.
//! Clocks of different hosts may run at slightly different rates: the margin (at least
//! 10 % of the lease) covers that. A paused holder resumes past its deadline and serves
//! nothing before its next successful claim: its hold is checked against the clock at
//! every decision, not by a timer that a pause could delay.

use std::time::{Duration, Instant};

/// The lease timings (from `[vip]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// How long a version must stand before another proxy may claim it.
    pub lease: Duration,
    /// How often the holder renews (and everyone looks at the lease).
    pub renew: Duration,
    /// How much earlier than `lease` the holder lets go.
    pub margin: Duration,
}

impl Timings {
    /// `margin` is a tenth of the lease, at least 50 ms.
    pub fn new(lease: Duration, renew: Duration) -> Self {
        Self {
            lease,
            renew,
            margin: (lease / 10).max(Duration::from_millis(50)),
        }
    }
}

/// The lease object as read from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Observed {
    /// `spec.holderIdentity`; `None` (or empty) when released.
    pub holder: Option<String>,
    /// `metadata.resourceVersion`.
    pub version: u64,
}

/// What to write next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// Write the lease naming this proxy: create it (`expect: None`) or compare-and-swap
    /// on `expect`.
    Claim { expect: Option<u64> },
    /// Nothing to write now.
    Wait,
}

/// This proxy's view of the lease.
#[derive(Debug, Clone)]
pub(crate) struct Lease {
    me: String,
    t: Timings,
    /// Until when this proxy may serve the VIP.
    held_until: Option<Instant>,
    /// When the last successful claim began.
    last_claim: Option<Instant>,
    /// The version last seen, whether it names this proxy, and when it was first seen.
    seen: Option<(Observed, Instant)>,
    /// The lease object does not exist (a first claim creates it).
    absent: bool,
}

impl Lease {
    pub(crate) fn new(me: impl Into<String>, t: Timings) -> Self {
        Self {
            me: me.into(),
            t,
            held_until: None,
            last_claim: None,
            seen: None,
            absent: false,
        }
    }

    /// Record a read of the lease at `now` (`None`: the object does not exist).
    pub(crate) fn observe(&mut self, obs: Option<Observed>, now: Instant) {
        self.absent = obs.is_none();
        match obs {
            None => self.seen = None,
            Some(o) => {
                let same = self
                    .seen
                    .as_ref()
                    .is_some_and(|(s, _)| s.version == o.version);
                if !same {
                    self.seen = Some((o, now));
                }
            }
        }
    }

    fn holder_is_me(&self) -> bool {
        self.seen
            .as_ref()
            .and_then(|(o, _)| o.holder.as_deref())
            .is_some_and(|h| h == self.me)
    }

    fn released(o: &Observed) -> bool {
        o.holder.as_deref().is_none_or(str::is_empty)
    }

    /// What to do at `now`.
    pub(crate) fn next(&self, now: Instant) -> Step {
        if self.absent {
            return Step::Claim { expect: None };
        }
        let Some((o, first_seen)) = &self.seen else {
            return Step::Wait;
        };
        if self.holder_is_me() {
            let due = self
                .last_claim
                .is_none_or(|c| now.duration_since(c) >= self.t.renew);
            return if due {
                Step::Claim {
                    expect: Some(o.version),
                }
            } else {
                Step::Wait
            };
        }
        if Self::released(o) || now.duration_since(*first_seen) >= self.t.lease {
            Step::Claim {
                expect: Some(o.version),
            }
        } else {
            Step::Wait
        }
    }

    /// A claim that began at `started` succeeded and wrote `version`.
    pub(crate) fn claimed(&mut self, started: Instant, version: u64) {
        let until = started + self.t.lease.saturating_sub(self.t.margin);
        self.held_until = Some(self.held_until.map_or(until, |h| h.max(until)));
        self.last_claim = Some(started);
        self.absent = false;
        self.seen = Some((
            Observed {
                holder: Some(self.me.clone()),
                version,
            },
            started,
        ));
    }

    /// A claim failed (a conflict: someone else wrote first; or an error). Nothing
    /// changes: the hold, if any, still ends at its deadline.
    pub(crate) fn claim_failed(&mut self) {}

    /// This proxy released the lease (it wrote an empty holder, or gave up): it stops
    /// serving now.
    pub(crate) fn released_now(&mut self) {
        self.held_until = None;
        self.last_claim = None;
    }

    /// Whether this proxy may serve the VIP at `now`.
    pub(crate) fn holds(&self, now: Instant) -> bool {
        self.held_until.is_some_and(|h| now < h)
    }

    /// Whether, at `now`, something this proxy sets up that outlives it by up to `fence`
    /// (the VIP's address, which the kernel removes only that long after its last
    /// renewal) is still gone before any other proxy may claim: `now + fence` is within
    /// the hold, which ends before the lease lets anyone else in.
    pub(crate) fn may_fence(&self, now: Instant, fence: Duration) -> bool {
        self.held_until.is_some_and(|h| now + fence <= h)
    }

    /// When the current hold ends, if holding.
    pub(crate) fn held_until(&self) -> Option<Instant> {
        self.held_until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn t() -> Timings {
        Timings::new(900 * MS, 100 * MS)
    }

    fn obs(holder: &str, version: u64) -> Option<Observed> {
        Some(Observed {
            holder: (!holder.is_empty()).then(|| holder.to_string()),
            version,
        })
    }

    #[test]
    fn the_first_proxy_creates_the_lease_and_renews_it() {
        let t0 = Instant::now();
        let mut p1 = Lease::new("p1", t());
        p1.observe(None, t0);
        assert_eq!(p1.next(t0), Step::Claim { expect: None });
        p1.claimed(t0, 5);
        assert!(p1.holds(t0 + 799 * MS));
        assert!(
            !p1.holds(t0 + 810 * MS),
            "lets go lease - margin after the claim began"
        );
        assert_eq!(p1.next(t0 + 50 * MS), Step::Wait);
        p1.observe(obs("p1", 5), t0 + 100 * MS);
        assert_eq!(p1.next(t0 + 100 * MS), Step::Claim { expect: Some(5) });
        p1.claimed(t0 + 100 * MS, 6);
        assert!(p1.holds(t0 + 850 * MS));
    }

    #[test]
    fn a_candidate_waits_a_whole_lease_after_it_first_saw_a_version() {
        let t0 = Instant::now();
        let mut p2 = Lease::new("p2", t());
        p2.observe(obs("p1", 5), t0);
        assert_eq!(p2.next(t0 + 899 * MS), Step::Wait);
        // a renewal restarts the count
        p2.observe(obs("p1", 6), t0 + 500 * MS);
        assert_eq!(p2.next(t0 + 1200 * MS), Step::Wait);
        assert_eq!(p2.next(t0 + 1400 * MS), Step::Claim { expect: Some(6) });
        assert!(!p2.holds(t0 + 1400 * MS), "a claim holds only once written");
    }

    #[test]
    fn a_released_lease_is_claimed_at_once() {
        let t0 = Instant::now();
        let mut p2 = Lease::new("p2", t());
        p2.observe(obs("", 9), t0);
        assert_eq!(p2.next(t0), Step::Claim { expect: Some(9) });
    }

    /// The invariant, over every interleaving of a holder's claim and a candidate's
    /// first sight of the version it wrote: the holder has let go before the candidate
    /// may claim.
    #[test]
    fn never_two_holders() {
        let t0 = Instant::now();
        for claim_began in [0u32, 10, 100] {
            for seen_after in [0u32, 1, 50, 400] {
                let s = t0 + claim_began * MS;
                let mut h = Lease::new("p1", t());
                h.claimed(s, 7);
                let mut c = Lease::new("p2", t());
                // the candidate sees version 7 no earlier than the claim began
                let seen = s + seen_after * MS;
                c.observe(obs("p1", 7), seen);
                let mut now = seen;
                while c.next(now) == Step::Wait {
                    now += MS;
                }
                assert!(!h.holds(now), "claim at {claim_began}, seen +{seen_after}");
            }
        }
    }

    #[test]
    fn the_address_is_renewed_only_while_it_would_be_gone_before_the_lease_ends() {
        let t0 = Instant::now();
        let t = Timings::new(3000 * MS, 100 * MS);
        let mut p1 = Lease::new("p1", t);
        assert!(!p1.may_fence(t0, 2200 * MS), "not holding");
        p1.claimed(t0, 1);
        // held until t0 + 2.7 s
        assert!(p1.may_fence(t0 + 400 * MS, 2200 * MS));
        assert!(
            !p1.may_fence(t0 + 600 * MS, 2200 * MS),
            "a claim answered late"
        );
        // and a candidate claims no earlier than t0 + 3 s, after the fence
        let mut c = Lease::new("p2", t);
        c.observe(obs("p1", 1), t0);
        assert_eq!(c.next(t0 + 2999 * MS), Step::Wait);
    }

    #[test]
    fn a_failed_renewal_keeps_the_deadline_and_a_release_ends_the_hold() {
        let t0 = Instant::now();
        let mut p1 = Lease::new("p1", t());
        p1.claimed(t0, 1);
        p1.claim_failed();
        assert!(p1.holds(t0 + 700 * MS));
        assert!(!p1.holds(t0 + 900 * MS));
        p1.claimed(t0 + 100 * MS, 2);
        p1.released_now();
        assert!(!p1.holds(t0 + 101 * MS));
    }
}
