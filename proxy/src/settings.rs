//! What a proxy runs with: the part of the cluster config it uses, resolved for its own
//! id (swapped whole on reload). Plain data; the tasks that act on it live elsewhere.

use std::net::{IpAddr, SocketAddr};

use ballast_config::{ClusterConfig, ProxyConfig};

use crate::lease::Timings;

/// The part of the cluster config the proxy uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// `[proxy]`, with this proxy's own id and addresses.
    pub proxy: ProxyConfig,
    /// `(id, api address)` of every master, in config order.
    pub masters: Vec<(String, SocketAddr)>,
    /// The VIP this proxy competes for, when the config has one.
    pub vip: Option<VipSettings>,
    /// Every proxy of `[[proxies]]` (this one included); empty with one `[proxy]`.
    pub proxies: Vec<ProxyPeer>,
    /// `[limits] max_requests_in_flight_per_user`: answered 429 here beyond it.
    pub requests_in_flight_per_user: usize,
}

/// The config names no proxy `id`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown proxy id `{0}` (not in the config's [[proxies]])")]
pub struct UnknownProxy(pub String);

impl Settings {
    /// This proxy's own addresses (not the VIP's).
    pub(crate) fn own_addrs(&self) -> Addrs {
        Addrs {
            api: self.proxy.api,
            dns: self.proxy.dns,
            admin: self.proxy.admin,
        }
    }

    /// The address this proxy's connections to masters and other proxies leave from: its
    /// own API address, never the VIP (which it may not hold).
    pub(crate) fn source_ip(&self) -> Option<IpAddr> {
        ballast_config::source_ip(self.proxy.api)
            .filter(|ip| self.vip.as_ref().is_none_or(|v| v.address != *ip))
    }

    /// The settings of proxy `id`: one of `[[proxies]]`, or the one `[proxy]` (`id`
    /// `None`, or its id).
    pub fn from_cluster(c: &ClusterConfig, id: Option<&str>) -> Result<Self, UnknownProxy> {
        let mut proxy = c.proxy.clone();
        let mine = match id {
            Some(id) => c.proxies.iter().find(|p| p.id == id),
            None => c.proxies.first().filter(|_| c.proxies.len() == 1),
        };
        match (mine, id) {
            (Some(p), _) => {
                proxy.id = p.id.clone();
                proxy.api = p.api;
                proxy.dns = p.dns;
                proxy.admin = p.admin;
                proxy.tls = p.tls.clone();
            }
            (None, Some(id)) if id != c.proxy.id => return Err(UnknownProxy(id.to_string())),
            (None, None) if !c.proxies.is_empty() => {
                return Err(UnknownProxy("(none given: use --id)".into()))
            }
            (None, _) => {}
        }
        let vip = c.vip.as_ref().map(|v| VipSettings {
            me: proxy.id.clone(),
            address: v.address,
            timings: Timings::new(v.lease(), v.renew),
            interface: v.interface.clone().map(|name| (name, v.prefix())),
            addrs: Addrs {
                api: c.proxy.api,
                dns: c.proxy.dns,
                admin: c.proxy.admin,
            },
        });
        Ok(Self {
            proxy,
            masters: c.masters.iter().map(|m| (m.id.clone(), m.api)).collect(),
            vip,
            proxies: c
                .proxies
                .iter()
                .map(|p| ProxyPeer {
                    id: p.id.clone(),
                    api: p.api,
                    admin: p.admin,
                })
                .collect(),
            requests_in_flight_per_user: c.limits.max_requests_in_flight_per_user,
        })
    }
}

/// What the VIP loop needs to know.
#[derive(Debug, Clone, PartialEq)]
pub struct VipSettings {
    /// This proxy's id (the lease's holder identity).
    pub me: String,
    pub address: IpAddr,
    pub timings: Timings,
    /// The VIP's API, DNS and admin addresses.
    pub addrs: Addrs,
    /// The interface (and prefix length) the holder adds the VIP to; `None`: the VIP is
    /// an address every proxy host already has, and holding it means serving on it.
    pub interface: Option<(String, u8)>,
}

/// One configured proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyPeer {
    pub id: String,
    /// Its own API address (what DNS lists).
    pub api: SocketAddr,
    /// Its admin address (`/livez`).
    pub admin: SocketAddr,
}

/// The addresses of one set of listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Addrs {
    pub api: SocketAddr,
    pub dns: SocketAddr,
    pub admin: SocketAddr,
}
