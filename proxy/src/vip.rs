//! Holding the VIP: the lease loop around [`crate::lease`] (reads and compare-and-swap
//! writes of `kube-system/ballast-vip` at the active master), and serving the VIP's API,
//! DNS and admin addresses exactly while the lease says this proxy may.
//!
//! The proxy's own lease calls go to the active master over mutual TLS with the proxy's
//! certificate, naming the proxy itself as the request-header user (`proxy:<id>`, group
//! `ballast:proxies`): the masters trust that from proxies' certificates only, and RBAC
//! (the bootstrap role `system:ballast-proxy`) lets that group read and write this one
//! Lease.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_config::pki;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::lease::{Lease, Observed, Step};
use crate::listeners::{Listeners, Serving};
use crate::settings::VipSettings;
use crate::vip_address::{InterfaceVip, ANNOUNCE_AT, KERNEL_FENCE, LIFETIME_SECS};

/// Where the VIP lease lives.
pub(crate) const LEASE_NAMESPACE: &str = "kube-system";
pub(crate) const LEASE_NAME: &str = "ballast-vip";

/// A lease call that failed. All are transient: the next tick tries again.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("no active master")]
    NoActive,
    #[error("{0}")]
    Http(#[from] reqwest::Error),
    #[error("HTTP {status}: {body}")]
    Status { status: u16, body: String },
}

struct Client {
    http: reqwest::Client,
    me: String,
}

fn version_of(v: &Value) -> Option<u64> {
    v.pointer("/metadata/resourceVersion")?
        .as_str()?
        .parse()
        .ok()
}

/// `renewTime` / `acquireTime` (a `MicroTime`): informational only, never used to decide.
fn now_micro() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

impl Client {
    fn url(&self, shared: &crate::state::Shared, named: bool) -> Result<String, CallError> {
        let active = shared.current().active.ok_or(CallError::NoActive)?;
        let base = format!(
            "https://{}/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases",
            active.addr
        );
        Ok(if named {
            format!("{base}/{LEASE_NAME}")
        } else {
            base
        })
    }

    fn request(&self, m: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        self.http
            .request(m, url)
            .header("x-remote-user", pki::proxy_user(&self.me))
            .header("x-remote-group", pki::PROXIES_GROUP)
    }

    /// The lease: `Ok(None)` when it does not exist.
    async fn read(
        &self,
        shared: &crate::state::Shared,
    ) -> Result<Option<(Observed, Value)>, CallError> {
        let url = self.url(shared, true)?;
        let r = self.request(reqwest::Method::GET, &url).send().await?;
        match r.status().as_u16() {
            404 => Ok(None),
            200 => {
                let v: Value = r.json().await?;
                let holder = v
                    .pointer("/spec/holderIdentity")
                    .and_then(Value::as_str)
                    .filter(|h| !h.is_empty())
                    .map(String::from);
                let version = version_of(&v).unwrap_or(0);
                Ok(Some((Observed { holder, version }, v)))
            }
            status => Err(CallError::Status {
                status,
                body: r.text().await.unwrap_or_default(),
            }),
        }
    }

    /// Write the lease naming `holder` (empty: released): create it (`current: None`) or
    /// replace `current` at its version. Returns the object written; `Ok(None)`: someone
    /// else wrote first (409).
    async fn write(
        &self,
        shared: &crate::state::Shared,
        current: Option<&Value>,
        holder: &str,
        lease: Duration,
    ) -> Result<Option<Value>, CallError> {
        let now = now_micro();
        let secs = lease.as_secs_f64().ceil().max(1.0) as i64;
        let (method, url, body) = match current {
            None => (
                reqwest::Method::POST,
                self.url(shared, false)?,
                json!({
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": LEASE_NAME, "namespace": LEASE_NAMESPACE},
                    "spec": {"holderIdentity": holder, "leaseDurationSeconds": secs,
                        "acquireTime": now, "renewTime": now, "leaseTransitions": 0},
                }),
            ),
            Some(cur) => {
                let mut body = cur.clone();
                let was = cur
                    .pointer("/spec/holderIdentity")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let spec = &mut body["spec"];
                if was != holder {
                    let transitions = spec["leaseTransitions"].as_i64().unwrap_or(0);
                    spec["leaseTransitions"] = json!(transitions + 1);
                    spec["acquireTime"] = json!(now);
                }
                spec["holderIdentity"] = json!(holder);
                spec["leaseDurationSeconds"] = json!(secs);
                spec["renewTime"] = json!(now);
                (reqwest::Method::PUT, self.url(shared, true)?, body)
            }
        };
        let r = self.request(method, &url).json(&body).send().await?;
        match r.status().as_u16() {
            200 | 201 => Ok(Some(r.json::<Value>().await?)),
            409 => Ok(None),
            status => Err(CallError::Status {
                status,
                body: r.text().await.unwrap_or_default(),
            }),
        }
    }
}

/// Open the VIP's interface, and take away a VIP address a former run of this proxy may
/// have left there (a kill -9 leaves it until its lifetime runs out).
async fn open_interface(vip: &VipSettings) -> Result<Option<Arc<InterfaceVip>>, String> {
    let Some((name, prefix)) = &vip.interface else {
        return Ok(None);
    };
    let iface = InterfaceVip::open(name, vip.address, *prefix).map_err(|e| e.to_string())?;
    iface.remove().await.map_err(|e| e.to_string())?;
    Ok(Some(Arc::new(iface)))
}

/// The VIP's address on the interface while this proxy holds the lease.
struct AddressKeeper {
    iface: Arc<InterfaceVip>,
    /// When the address was last added or renewed.
    renewed: Option<Instant>,
    /// Gratuitous ARPs after the address was (re)added.
    announcer: Option<tokio::task::JoinHandle<()>>,
}

impl AddressKeeper {
    /// After a successful claim: renew the address if it would still be gone before
    /// anyone else may claim, and announce it when it was absent (new, or lapsed).
    async fn after_claim(&mut self, lease: &Lease) {
        if !lease.may_fence(Instant::now(), KERNEL_FENCE) {
            tracing::debug!("VIP claim answered too late to renew the address on it");
            return;
        }
        let lapsed = self
            .renewed
            .is_none_or(|r| r.elapsed() >= Duration::from_secs(LIFETIME_SECS.into()));
        match self.iface.renew().await {
            Ok(()) => self.renewed = Some(Instant::now()),
            Err(e) => {
                tracing::warn!(error = %e, "VIP: cannot add the address");
                return;
            }
        }
        if lapsed {
            if let Some(a) = self.announcer.take() {
                a.abort();
            }
            let iface = self.iface.clone();
            self.announcer = Some(tokio::spawn(async move {
                let t0 = tokio::time::Instant::now();
                for at in ANNOUNCE_AT {
                    tokio::time::sleep_until(t0 + at).await;
                    if let Err(e) = iface.announce().await {
                        tracing::warn!(error = %e, "VIP: cannot announce it");
                    }
                }
            }));
        }
    }

    /// Take the address away now.
    async fn remove(&mut self) {
        if let Some(a) = self.announcer.take() {
            a.abort();
        }
        self.renewed = None;
        if let Err(e) = self.iface.remove().await {
            tracing::warn!(error = %e, "VIP: cannot remove the address; the kernel drops it within its lifetime");
        }
    }
}

/// Run the VIP loop until `cancel`, then stop serving the VIP and release the lease.
pub(crate) async fn run(serving: Serving, vip: VipSettings, cancel: CancellationToken) {
    let shared = serving.shared.clone();
    let metrics = &shared.metrics;
    let t = vip.timings;
    let http = match serving.tls.client_config().map(|c| {
        reqwest::Client::builder()
            .use_preconfigured_tls(c)
            .no_proxy()
            .local_address(shared.settings().source_ip())
            .timeout(t.renew.max(Duration::from_millis(300)))
            .build()
    }) {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "VIP: cannot build the API client; not taking part");
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "VIP: cannot build the API client; not taking part");
            return;
        }
    };
    let mut address = match open_interface(&vip).await {
        Ok(iface) => iface.map(|iface| AddressKeeper {
            iface,
            renewed: None,
            announcer: None,
        }),
        Err(e) => {
            tracing::error!(error = %e, "VIP: cannot use its interface; not taking part");
            return;
        }
    };
    let client = Client {
        http,
        me: vip.me.clone(),
    };
    let mut lease = Lease::new(vip.me.clone(), t);
    let mut current: Option<Value> = None;
    let mut serving_vip: Option<Listeners> = None;
    metrics.vip_holder.set(0);
    loop {
        let now = Instant::now();
        match client.read(&shared).await {
            Ok(obs) => {
                current = obs.as_ref().map(|(_, v)| v.clone());
                lease.observe(obs.map(|(o, _)| o), now);
            }
            Err(e) => tracing::debug!(error = %e, "VIP: cannot read the lease"),
        }
        if let Step::Claim { expect } = lease.next(Instant::now()) {
            let started = Instant::now();
            let base = if expect.is_some() {
                current.as_ref()
            } else {
                None
            };
            match client.write(&shared, base, &vip.me, t.lease).await {
                Ok(Some(written)) => {
                    lease.claimed(started, version_of(&written).unwrap_or(0));
                    current = Some(written);
                    if let Some(a) = address.as_mut() {
                        a.after_claim(&lease).await;
                    }
                }
                Ok(None) => lease.claim_failed(),
                Err(e) => {
                    tracing::debug!(error = %e, "VIP: claim failed");
                    lease.claim_failed();
                }
            }
        }
        // serve exactly while the lease allows, by this proxy's own clock
        let holds = lease.holds(Instant::now());
        match (&serving_vip, holds) {
            (None, true) => {
                // said before the listeners answer, so whoever answers on the VIP says so
                metrics.vip_holder.set(1);
                match Listeners::start("vip", vip.addrs, &serving, None).await {
                    Ok(l) => {
                        tracing::info!(vip = %vip.address, "holding the VIP");
                        metrics.vip_changes.inc();
                        serving_vip = Some(l);
                    }
                    // e.g. a paused former holder still has the addresses: try again
                    Err(e) => {
                        metrics.vip_holder.set(0);
                        tracing::warn!(error = %e, "VIP: cannot serve on it yet");
                    }
                }
            }
            (Some(_), false) => {
                tracing::warn!(vip = %vip.address, "VIP lease over: letting go");
                if let Some(a) = address.as_mut() {
                    a.remove().await;
                }
                if let Some(l) = serving_vip.take() {
                    l.stop().await;
                }
                metrics.vip_holder.set(0);
                metrics.vip_changes.inc();
            }
            (None, false) if address.as_ref().is_some_and(|a| a.renewed.is_some()) => {
                // claimed, but never served (binding failed) and the hold ran out
                if let Some(a) = address.as_mut() {
                    a.remove().await;
                }
            }
            _ => {}
        }
        let next = Instant::now() + t.renew;
        let wake = lease.held_until().filter(|h| *h < next).unwrap_or(next);
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
    // SIGTERM: let go now, and tell the others so the next one takes over at its next read
    if let Some(a) = address.as_mut() {
        a.remove().await;
    }
    if let Some(l) = serving_vip.take() {
        l.stop().await;
        metrics.vip_holder.set(0);
        metrics.vip_changes.inc();
    }
    lease.released_now();
    let mine = current
        .as_ref()
        .and_then(|v| v.pointer("/spec/holderIdentity")?.as_str())
        == Some(vip.me.as_str());
    if mine {
        match client.write(&shared, current.as_ref(), "", t.lease).await {
            Ok(Some(_)) => tracing::info!("VIP lease released"),
            Ok(None) => tracing::info!("VIP lease changed meanwhile; not released"),
            Err(e) => tracing::warn!(error = %e, "VIP lease not released; it expires"),
        }
    }
}
