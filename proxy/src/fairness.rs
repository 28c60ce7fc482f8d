//! The proxy's first line of fairness: each identity's ordinary API requests in flight
//! through this proxy, bounded by `[limits] max_requests_in_flight_per_user`, the masters'
//! own bound (`master/src/auth/fairness.rs`). Over it the proxy answers 429 itself, on a
//! connection it keeps open, so a flood's refusals cost neither a hop to the active master
//! nor that master's time. The masters still count: with several proxies each admits up to
//! the bound, and the active master holds the identity to it in total.
//!
//! As on the masters, only Kubernetes API paths (`/api`, `/apis`) count, `system:masters`
//! is exempt, and streams (watches, followed logs, upgraded connections) are not requests
//! in flight; anonymous calls reach only public paths and are not counted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ballast_config::pki::SUPERUSER_GROUP;
use ballast_config::tls::Identity;

/// Requests in flight per identity.
#[derive(Debug, Default)]
pub(crate) struct Fairness {
    in_flight: Mutex<HashMap<String, usize>>,
}

/// One admitted request's place; given back on drop.
#[derive(Debug)]
pub(crate) struct Share {
    owner: Arc<Fairness>,
    user: String,
}

impl Drop for Share {
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
    /// Counted: keep the share until the request is done.
    Counted(Share),
    /// Not counted (an exempt identity).
    Exempt,
    /// Over the bound: answer 429 with this message.
    Refused(String),
}

impl Fairness {
    /// Admit one request of `id` when it holds fewer than `limit`.
    pub(crate) fn admit(self: &Arc<Self>, id: &Identity, limit: usize) -> Admission {
        if id.groups.iter().any(|g| g == SUPERUSER_GROUP) {
            return Admission::Exempt;
        }
        let mut m = self.in_flight.lock().expect("fairness lock");
        let n = m.entry(id.user.clone()).or_default();
        if *n >= limit {
            return Admission::Refused(format!(
                "too many requests in flight for user {:?}, please try again later",
                id.user
            ));
        }
        *n += 1;
        Admission::Counted(Share {
            owner: self.clone(),
            user: id.user.clone(),
        })
    }
}

/// Whether a request counts: a Kubernetes API request that is answered, not one that
/// streams (a watch, `?watch=` or a `/watch/` path; a followed log; an upgrade for exec,
/// attach or port-forward), nor a health or metrics path.
pub(crate) fn counted(path: &str, query: Option<&str>, upgrade: bool) -> bool {
    let kube_api = path == "/api"
        || path.starts_with("/api/")
        || path == "/apis"
        || path.starts_with("/apis/");
    let streams = upgrade || path.contains("/watch/") || crate::proxy::is_stream(query);
    kube_api && !streams
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(user: &str, groups: &[&str]) -> Identity {
        Identity {
            user: user.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    #[test]
    fn each_identity_gets_its_bound_and_gets_it_back() {
        let f = Arc::new(Fairness::default());
        let alice = id("alice", &["team"]);
        let a1 = f.admit(&alice, 2);
        let a2 = f.admit(&alice, 2);
        assert!(matches!(a1, Admission::Counted(_)));
        assert!(matches!(a2, Admission::Counted(_)));
        match f.admit(&alice, 2) {
            Admission::Refused(m) => assert!(m.contains("alice"), "{m}"),
            other => panic!("{other:?}"),
        }
        // another identity is not held back by alice
        assert!(matches!(
            f.admit(&id("system:node:w1", &["system:nodes"]), 2),
            Admission::Counted(_)
        ));
        drop(a1);
        assert!(matches!(f.admit(&alice, 2), Admission::Counted(_)));
        assert!(matches!(
            f.admit(&id("admin", &[SUPERUSER_GROUP]), 0),
            Admission::Exempt
        ));
    }

    #[test]
    fn api_requests_count_and_streams_and_health_paths_do_not() {
        assert!(counted("/api/v1/pods", Some("limit=5"), false));
        assert!(counted("/apis/apps/v1/deployments", None, false));
        assert!(counted("/api", None, false));
        assert!(!counted("/api/v1/pods", Some("watch=true"), false));
        assert!(!counted("/api/v1/watch/pods", None, false));
        assert!(!counted(
            "/api/v1/namespaces/d/pods/p/log",
            Some("follow=true"),
            false
        ));
        assert!(!counted(
            "/api/v1/namespaces/d/pods/p/exec",
            Some("command=sh"),
            true
        ));
        assert!(!counted("/readyz", None, false));
        assert!(!counted("/apiary", None, false));
    }
}
