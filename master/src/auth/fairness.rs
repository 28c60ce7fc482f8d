//! Fairness: a bound on each identity's Kubernetes API requests in flight (a small cousin
//! of kube-apiserver's API Priority and Fairness). One client's flood is answered 429 with
//! `Retry-After: 1` once it holds its share, while every other identity (each worker is
//! its own `system:node:*` user, so its lease renewals) goes through as usual.
//!
//! As in APF, `system:masters` is exempt (the cluster's operators and the hollow-node
//! fleet of the benchmarks act as `admin`). Long-running requests (watches, followed
//! logs) hold a connection, not the API's attention: they are counted apart, per identity
//! and in total, for as long as their answer streams.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ballast_config::pki::SUPERUSER_GROUP;
use ballast_config::schema::LimitsConfig;

use super::Identity;

/// Each identity's requests in flight and long-running requests, up to limits.
#[derive(Debug)]
pub(crate) struct Fairness {
    limit: usize,
    watches_per_user: usize,
    max_watches: usize,
    in_flight: Mutex<HashMap<String, usize>>,
    /// Long-running requests per identity (exempt identities counted in the total only).
    watches: Mutex<(HashMap<String, usize>, usize)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Request,
    Watch { per_user: bool },
}

/// One admitted request; its slot is given back on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    owner: Arc<Fairness>,
    user: String,
    kind: Kind,
}

fn give_back(m: &mut HashMap<String, usize>, user: &str) {
    if let Some(n) = m.get_mut(user) {
        *n -= 1;
        if *n == 0 {
            m.remove(user);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        match self.kind {
            Kind::Request => give_back(
                &mut self.owner.in_flight.lock().expect("fairness lock"),
                &self.user,
            ),
            Kind::Watch { per_user } => {
                let mut w = self.owner.watches.lock().expect("fairness lock");
                w.1 -= 1;
                if per_user {
                    give_back(&mut w.0, &self.user);
                }
            }
        }
    }
}

impl Slot {
    /// Whether it must be held for as long as the answer streams.
    pub(crate) fn long_running(&self) -> bool {
        matches!(self.kind, Kind::Watch { .. })
    }
}

/// What [`Fairness::admit`] decided.
#[derive(Debug)]
pub(crate) enum Admission {
    /// Counted: hold the slot until the answer is sent (a long-running one: until its
    /// stream ends).
    Counted(Slot),
    /// Not counted (an exempt identity's ordinary request).
    Exempt,
    /// Over a limit: answer 429 with this message.
    Refused(String),
}

impl Fairness {
    /// The limits of `[limits]`.
    pub(crate) fn new(l: &LimitsConfig) -> Arc<Self> {
        Arc::new(Self {
            limit: l.max_requests_in_flight_per_user,
            watches_per_user: l.max_watches_per_user,
            max_watches: l.watches(),
            in_flight: Mutex::new(HashMap::new()),
            watches: Mutex::new((HashMap::new(), 0)),
        })
    }

    pub(crate) fn admit(self: &Arc<Self>, user: &Identity, long_running: bool) -> Admission {
        let exempt = user.in_group(SUPERUSER_GROUP);
        if long_running {
            return self.admit_watch(user, exempt);
        }
        if exempt {
            return Admission::Exempt;
        }
        let mut m = self.in_flight.lock().expect("fairness lock");
        let n = m.entry(user.user.clone()).or_default();
        if *n >= self.limit {
            return Admission::Refused(format!(
                "too many requests in flight for user {:?}, please try again later",
                user.user
            ));
        }
        *n += 1;
        Admission::Counted(self.slot(user, Kind::Request))
    }

    fn admit_watch(self: &Arc<Self>, user: &Identity, exempt: bool) -> Admission {
        let mut w = self.watches.lock().expect("fairness lock");
        if w.1 >= self.max_watches {
            return Admission::Refused(format!(
                "this master serves {} watches, its limit; please try again later",
                w.1
            ));
        }
        if !exempt {
            let n = w.0.entry(user.user.clone()).or_default();
            if *n >= self.watches_per_user {
                return Admission::Refused(format!(
                    "too many watches for user {:?} ({}), please try again later",
                    user.user, self.watches_per_user
                ));
            }
            *n += 1;
        }
        w.1 += 1;
        Admission::Counted(self.slot(user, Kind::Watch { per_user: !exempt }))
    }

    fn slot(self: &Arc<Self>, user: &Identity, kind: Kind) -> Slot {
        Slot {
            owner: self.clone(),
            user: user.user.clone(),
            kind,
        }
    }
}

/// Whether a request to `path` with `query` is long-running: a watch, or a followed log.
pub(crate) fn is_long_running(path: &str, query: Option<&str>) -> bool {
    let q = query.unwrap_or_default();
    let flag = |name: &str| {
        q.split('&')
            .any(|kv| kv == format!("{name}=true") || kv == format!("{name}=1"))
    };
    path.contains("/watch/") || flag("watch") || (path.ends_with("/log") && flag("follow"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, groups: &[&str]) -> Identity {
        Identity {
            user: name.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    fn limits(requests: usize, watches_per_user: usize, watches: usize) -> LimitsConfig {
        LimitsConfig {
            max_requests_in_flight_per_user: requests,
            max_watches_per_user: watches_per_user,
            max_watches: Some(watches),
            ..LimitsConfig::default()
        }
    }

    #[test]
    fn each_identity_gets_its_share_and_gets_it_back() {
        let f = Fairness::new(&limits(2, 10, 100));
        let alice = user("alice", &[]);
        let a1 = f.admit(&alice, false);
        let a2 = f.admit(&alice, false);
        assert!(matches!(f.admit(&alice, false), Admission::Refused(_)));
        assert!(matches!(
            f.admit(&user("bob", &[]), false),
            Admission::Counted(_)
        ));
        assert!(
            matches!(f.admit(&alice, true), Admission::Counted(ref s) if s.long_running()),
            "a watch is counted apart"
        );
        let admin = user("admin", &[SUPERUSER_GROUP]);
        for _ in 0..5 {
            assert!(matches!(f.admit(&admin, false), Admission::Exempt));
        }
        drop(a1);
        assert!(matches!(f.admit(&alice, false), Admission::Counted(_)));
        drop(a2);
        assert!(
            f.in_flight.lock().unwrap().get("bob").is_none(),
            "bob's slot was given back"
        );
    }

    #[test]
    fn watches_are_bounded_per_identity_and_in_total() {
        let f = Fairness::new(&limits(1, 2, 3));
        let alice = user("alice", &[]);
        let admin = user("admin", &[SUPERUSER_GROUP]);
        let w1 = f.admit(&alice, true);
        let _w2 = f.admit(&alice, true);
        let Admission::Refused(why) = f.admit(&alice, true) else {
            panic!("a third watch of alice");
        };
        assert!(why.contains("too many watches"), "{why}");
        // the exempt identity counts in the total only
        let _w3 = f.admit(&admin, true);
        let Admission::Refused(why) = f.admit(&admin, true) else {
            panic!("a fourth watch in all");
        };
        assert!(why.contains("limit"), "{why}");
        // requests are not watches
        assert!(matches!(f.admit(&alice, false), Admission::Counted(_)));
        drop(w1);
        let w4 = f.admit(&admin, true);
        assert!(matches!(w4, Admission::Counted(_)));
        assert!(
            matches!(f.admit(&alice, true), Admission::Refused(_)),
            "the total is full again"
        );
    }

    #[test]
    fn watches_and_followed_logs_are_long_running() {
        assert!(is_long_running(
            "/api/v1/pods",
            Some("watch=true&resourceVersion=5")
        ));
        assert!(is_long_running("/api/v1/watch/pods", None));
        assert!(is_long_running(
            "/api/v1/namespaces/a/pods/p/log",
            Some("follow=true")
        ));
        assert!(!is_long_running("/api/v1/namespaces/a/pods/p/log", None));
        assert!(!is_long_running("/api/v1/pods", Some("watchful=true")));
    }
}
