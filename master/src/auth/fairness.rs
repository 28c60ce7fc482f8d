//! Fairness: a bound on each identity's Kubernetes API requests in flight (a small cousin
//! of kube-apiserver's API Priority and Fairness). One client's flood is answered 429 with
//! `Retry-After: 1` once it holds its share, while every other identity (each worker is
//! its own `system:node:*` user, so its lease renewals) goes through as usual.
//!
//! As in APF, `system:masters` is exempt (the cluster's operators and the hollow-node
//! fleet of the benchmarks act as `admin`), and long-running requests (watches, followed
//! logs) do not count: they hold a connection, not the API's attention.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ballast_config::pki::SUPERUSER_GROUP;

use super::Identity;

/// Each identity's requests in flight, up to a limit.
#[derive(Debug)]
pub(crate) struct Fairness {
    limit: usize,
    in_flight: Mutex<HashMap<String, usize>>,
}

/// One admitted request; its slot is given back on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    owner: Arc<Fairness>,
    user: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.owner.in_flight.lock().expect("fairness lock");
        if let Some(n) = m.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.user);
            }
        }
    }
}

/// What [`Fairness::admit`] decided.
#[derive(Debug)]
pub(crate) enum Admission {
    /// Counted: hold the slot until the answer is sent.
    Counted(Slot),
    /// Not counted (exempt identity or long-running request).
    Exempt,
    /// Over the identity's limit: answer 429.
    Refused,
}

impl Fairness {
    /// At most `limit` requests in flight per identity.
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            in_flight: Mutex::new(HashMap::new()),
        })
    }

    pub(crate) fn admit(self: &Arc<Self>, user: &Identity, long_running: bool) -> Admission {
        if long_running || user.in_group(SUPERUSER_GROUP) {
            return Admission::Exempt;
        }
        let mut m = self.in_flight.lock().expect("fairness lock");
        let n = m.entry(user.user.clone()).or_default();
        if *n >= self.limit {
            return Admission::Refused;
        }
        *n += 1;
        Admission::Counted(Slot {
            owner: self.clone(),
            user: user.user.clone(),
        })
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

    #[test]
    fn each_identity_gets_its_share_and_gets_it_back() {
        let f = Fairness::new(2);
        let alice = user("alice", &[]);
        let a1 = f.admit(&alice, false);
        let a2 = f.admit(&alice, false);
        assert!(matches!(f.admit(&alice, false), Admission::Refused));
        assert!(matches!(
            f.admit(&user("bob", &[]), false),
            Admission::Counted(_)
        ));
        assert!(
            matches!(f.admit(&alice, true), Admission::Exempt),
            "a watch is not counted"
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
