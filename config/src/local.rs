//! The embedded default cluster of `ballast up`: N masters on `127.0.1.I`, the proxy on
//! `127.0.0.1`, M workers on `127.0.2.I` (w1 routed through the proxy, the others through
//! DNS), with short lease timings so failures show up quickly.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::schema::*;

/// Address plan of a local cluster: the third octet of the masters' and workers' blocks and
/// the proxy's address. The contract's defaults are `127.0.1.x`, `127.0.2.x`, `127.0.0.1`;
/// tests pick their own blocks so they can run in parallel.
#[derive(Debug, Clone, Copy)]
pub struct AddressPlan {
    pub master_block: u8,
    pub worker_block: u8,
    pub proxy_ip: Ipv4Addr,
    pub second_octet: u8,
}

impl Default for AddressPlan {
    fn default() -> Self {
        Self {
            second_octet: 0,
            master_block: 1,
            worker_block: 2,
            proxy_ip: Ipv4Addr::new(127, 0, 0, 1),
        }
    }
}

impl AddressPlan {
    /// A plan whose every address is inside `127.K.0.0/16`, for tests that run in parallel.
    pub fn block(k: u8) -> Self {
        Self {
            second_octet: k,
            master_block: 1,
            worker_block: 2,
            proxy_ip: Ipv4Addr::new(127, k, 0, 1),
        }
    }

    fn addr(&self, third: u8, fourth: u8, port: u16) -> SocketAddr {
        SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, self.second_octet, third, fourth)),
            port,
        )
    }

    fn proxy(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.proxy_ip), port)
    }
}

const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];

/// Build the config of a local cluster.
pub fn local_cluster(masters: usize, workers: usize, plan: AddressPlan) -> ClusterConfig {
    let masters = (1..=masters)
        .map(|i| MasterConfig {
            id: format!("m{i}"),
            zone: ZONES[(i - 1) % ZONES.len()].to_string(),
            api: plan.addr(plan.master_block, i as u8, 6443),
            peer: plan.addr(plan.master_block, i as u8, 2380),
            data_dir: None,
            raft_id: None,
            tls: CertFiles::default(),
        })
        .collect();
    let proxy = ProxyConfig {
        api: plan.proxy(6443),
        dns: plan.proxy(5353),
        admin: plan.proxy(9180),
        ..ProxyConfig::default()
    };
    let workers = (1..=workers)
        .map(|i| {
            let by_proxy = i == 1;
            WorkerConfig {
                id: format!("w{i}"),
                zone: ZONES[(i - 1) % ZONES.len()].to_string(),
                address: plan.addr(plan.worker_block, i as u8, 10250),
                api_url: by_proxy.then(|| format!("https://{}", proxy.api)),
                api_dns: (!by_proxy).then(|| format!("api.{}", proxy.dns_zone)),
                dns_server: (!by_proxy).then_some(proxy.dns),
                dns_servers: Vec::new(),
                api_port: 6443,
                capacity: Capacity::default(),
                data_dir: None,
                tls: CertFiles::default(),
            }
        })
        .collect();
    ClusterConfig {
        cluster: ClusterSection::default(),
        raft: RaftConfig::default(),
        control: ControlConfig {
            node_grace_period: Duration::from_secs(8),
            pod_eviction_timeout: Duration::from_secs(20),
            internal_kv: false,
        },
        masters,
        proxy,
        worker: WorkerDefaults {
            lease_interval: Duration::from_secs(2),
            restart_backoff_base: Duration::from_secs(1),
            restart_backoff_max: Duration::from_secs(30),
            ..WorkerDefaults::default()
        },
        workers,
        proxies: Vec::new(),
        vip: None,
        tls: TlsConfig::default(),
        auth: AuthConfig::default(),
        limits: crate::schema::LimitsConfig::default(),
    }
}

/// Give `c` `n` proxies `p1`..`pN` on `127.K.3.I` (their own API, DNS and admin
/// addresses) sharing a VIP: the `[proxy]` row's address (`127.0.0.1` by default), which
/// the holder serves besides its own. Workers that reach the API by URL keep that address;
/// those that resolve its name get every proxy's DNS responder.
pub fn with_proxies(c: &mut ClusterConfig, n: usize, plan: AddressPlan) {
    c.proxies = (1..=n)
        .map(|i| ProxyNode {
            id: format!("p{i}"),
            api: plan.addr(3, i as u8, 6443),
            dns: plan.addr(3, i as u8, 5353),
            admin: plan.addr(3, i as u8, 9180),
            tls: CertFiles::default(),
        })
        .collect();
    c.vip = Some(VipConfig::new(c.proxy.api.ip()));
    // workers that resolve the API name ask every proxy's own responder in turn
    let all: Vec<SocketAddr> = c.proxies.iter().map(|p| p.dns).collect();
    for w in c.workers.iter_mut().filter(|w| w.dns_server.is_some()) {
        w.dns_server = None;
        w.dns_servers = all.clone();
    }
}

/// Render a config as TOML with a header comment.
pub fn to_toml(c: &ClusterConfig) -> String {
    let body = toml::to_string_pretty(c).expect("config serializes");
    format!(
        "# Ballast cluster config written by `ballast up`; every node reads this file.\n\
         # Edit and restart, or check it with `ballast check-config FILE`.\n\n{body}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_local_cluster_uses_contract_addresses_and_round_trips() {
        let c = local_cluster(3, 2, AddressPlan::default());
        assert_eq!(c.masters[0].api.to_string(), "127.0.1.1:6443");
        assert_eq!(c.masters[2].peer.to_string(), "127.0.1.3:2380");
        assert_eq!(c.proxy.api.to_string(), "127.0.0.1:6443");
        assert_eq!(c.proxy.dns.to_string(), "127.0.0.1:5353");
        assert_eq!(c.proxy.admin.to_string(), "127.0.0.1:9180");
        assert_eq!(c.workers[1].address.to_string(), "127.0.2.2:10250");
        assert!(c.workers[0].api_url.is_some());
        assert_eq!(c.workers[1].api_dns.as_deref(), Some("api.ballast.local"));
        let text = to_toml(&c);
        let (back, warnings) =
            crate::parse_str(std::path::Path::new("ballast.toml"), &text).unwrap();
        assert_eq!(back, c);
        assert!(warnings.is_empty());
    }
}
