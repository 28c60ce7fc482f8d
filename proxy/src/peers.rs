//! Which proxies are alive, for DNS: with several proxies every one answers the zone, and
//! `proxy.<zone>` and the zone's NS records list the live ones. Each proxy asks the
//! others' admin `/livez` every [`INTERVAL`]; a proxy is dropped after [`FALL`] misses in a
//! row and listed again at its first answer. A proxy always counts itself alive.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::state::Shared;

/// How often the other proxies are asked.
pub(crate) const INTERVAL: Duration = Duration::from_millis(500);
/// Misses in a row before a proxy is no longer listed.
pub(crate) const FALL: u32 = 2;

/// One configured proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyPeer {
    pub id: String,
    /// Its own API address (what DNS lists).
    pub api: SocketAddr,
    /// Its admin address (`/livez`).
    pub admin: SocketAddr,
}

/// What is known of one other proxy: pure, fed by [`run`].
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

    fn observe(&self, id: &str, answered: bool) {
        self.state
            .write()
            .expect("peers lock")
            .entry(id.to_string())
            .or_insert_with(Liveness::new)
            .observe(answered);
    }
}

/// Ask every other proxy's `/livez` every [`INTERVAL`] until `cancel`.
pub(crate) async fn run(shared: Arc<Shared>, cancel: CancellationToken) {
    let http = match reqwest::Client::builder()
        .no_proxy()
        .timeout(INTERVAL)
        .build()
    {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the client for other proxies; listing every proxy in DNS");
            return;
        }
    };
    loop {
        let settings = shared.settings();
        let me = settings.proxy.id.clone();
        let asks = settings.proxies.iter().filter(|p| p.id != me).map(|p| {
            let http = http.clone();
            async move {
                let url = format!("http://{}/livez", p.admin);
                let ok = http
                    .get(&url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                (p.id.clone(), ok)
            }
        });
        for (id, ok) in futures::future::join_all(asks).await {
            let was = shared.peers.alive(&id);
            shared.peers.observe(&id, ok);
            let now = shared.peers.alive(&id);
            if was != now {
                tracing::info!(proxy = %id, alive = now, "another proxy changed state");
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(INTERVAL) => {}
        }
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
