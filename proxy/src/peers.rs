//! Which proxies are alive, for DNS: with several proxies every one answers the zone, and
//! `proxy.<zone>` and the zone's NS records list the live ones. Each proxy asks the
//! others' admin `/livez` every [`INTERVAL`]; [`crate::liveness`] keeps who answers. A proxy always counts itself alive.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::state::Shared;

/// How often the other proxies are asked.
pub(crate) const INTERVAL: Duration = Duration::from_millis(500);

/// Ask every other proxy's `/livez` every [`INTERVAL`] until `cancel`.
pub(crate) async fn run(shared: Arc<Shared>, cancel: CancellationToken) {
    let http = match reqwest::Client::builder()
        .no_proxy()
        .local_address(shared.settings().source_ip())
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
