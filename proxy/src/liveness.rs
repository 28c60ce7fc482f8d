//! Which of the other proxies answer, for DNS: a proxy is dropped after [`FALL`] missed
//! `/livez` checks in a row and listed again at its first answer (the checks are in
//! [`crate::peers`]). Pure, behind a lock.

use std::collections::BTreeMap;
use std::sync::RwLock;

/// Misses in a row before a proxy is no longer listed.
pub(crate) const FALL: u32 = 2;

/// What is known of one other proxy: pure, fed by [`crate::peers::run`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Liveness {
    misses: u32,
}

impl Liveness {
    /// Alive until proven otherwise: a proxy that starts lists every configured one, and
    /// drops the dead within `FALL` checks.
    pub(crate) fn new() -> Self {
        Self { misses: 0 }
    }

    pub(crate) fn observe(&mut self, answered: bool) {
        self.misses = if answered {
            0
        } else {
            self.misses.saturating_add(1)
        };
    }

    pub(crate) fn alive(&self) -> bool {
        self.misses < FALL
    }
}

/// The live set, shared with DNS.
#[derive(Debug, Default)]
pub(crate) struct Peers {
    state: RwLock<BTreeMap<String, Liveness>>,
}

impl Peers {
    /// Whether `id` counts as alive (unknown ids do: this proxy itself, or one not yet
    /// asked).
    pub(crate) fn alive(&self, id: &str) -> bool {
        self.state
            .read()
            .expect("peers lock")
            .get(id)
            .is_none_or(Liveness::alive)
    }

    pub(crate) fn observe(&self, id: &str, answered: bool) {
        self.state
            .write()
            .expect("peers lock")
            .entry(id.to_string())
            .or_insert_with(Liveness::new)
            .observe(answered);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_is_dropped_after_two_misses_and_back_at_its_first_answer() {
        let mut l = Liveness::new();
        assert!(l.alive());
        l.observe(false);
        assert!(l.alive(), "one miss is not enough");
        l.observe(false);
        assert!(!l.alive());
        l.observe(true);
        assert!(l.alive());
    }

    #[test]
    fn unknown_proxies_count_as_alive() {
        let p = Peers::default();
        assert!(p.alive("p1"));
        p.observe("p2", false);
        p.observe("p2", false);
        assert!(!p.alive("p2"));
        assert!(p.alive("p1"));
    }
}
