//! The TOML schema. Every table denies unknown keys; every optional key has a
//! documented default (see `examples/ballast.toml`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The whole cluster, as one file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    #[serde(default)]
    pub cluster: ClusterSection,
    /// Consensus timings shared by all masters.
    #[serde(default)]
    pub raft: RaftConfig,
    /// Behaviour of the active master's API, controllers and scheduler.
    #[serde(default)]
    pub control: ControlConfig,
    /// The master nodes; keep their number odd.
    pub masters: Vec<MasterConfig>,
    /// The proxy + DNS responder + admin endpoint: the one proxy, or, with `[[proxies]]`,
    /// the settings they share and the addresses served on the VIP.
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// Several proxies, each with its own addresses (optional; without it `[proxy]` is
    /// the one proxy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proxies: Vec<ProxyNode>,
    /// A virtual IP held by exactly one of the `[[proxies]]` at a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<VipConfig>,
    /// Settings shared by every worker.
    #[serde(default)]
    pub worker: WorkerDefaults,
    /// The worker nodes.
    #[serde(default)]
    pub workers: Vec<WorkerConfig>,
    /// Where every node finds the cluster CA and its own certificate.
    #[serde(default)]
    pub tls: TlsConfig,
    /// How the API authenticates clients besides certificates.
    #[serde(default)]
    pub auth: AuthConfig,
    /// What one client can hold of a server (masters' and workers' HTTPS listeners).
    #[serde(default)]
    pub limits: LimitsConfig,
}

impl ClusterConfig {
    pub fn master(&self, id: &str) -> Option<&MasterConfig> {
        self.masters.iter().find(|m| m.id == id)
    }
    pub fn worker(&self, id: &str) -> Option<&WorkerConfig> {
        self.workers.iter().find(|w| w.id == id)
    }
    /// The Raft node id of a master: its explicit `raft_id`, or its 1-based position in
    /// `masters` when absent.
    pub fn raft_id(&self, id: &str) -> Option<u64> {
        self.masters
            .iter()
            .position(|m| m.id == id)
            .map(|i| self.masters[i].raft_id.unwrap_or(i as u64 + 1))
    }
}

/// The cluster's PKI files. Every listener speaks TLS with a certificate from one CA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Directory of `ca.crt` and every identity's `<id>.crt` / `<id>.key` (what
    /// `ballast pki init` writes). Default `pki`.
    #[serde(default = "d_pki_dir")]
    pub dir: PathBuf,
    /// The cluster CA every node trusts. Default `<dir>/ca.crt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
}

fn d_pki_dir() -> PathBuf {
    PathBuf::from("pki")
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            dir: d_pki_dir(),
            ca: None,
        }
    }
}

/// Client authentication of the API besides x509 client certificates.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Bearer tokens, in kube-apiserver's `--token-auth-file` format: CSV lines
    /// `token,user,uid[,"group1,group2"]`. Read by the masters at start. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

/// A node's own certificate and key, when not at the default `<tls.dir>/<id>.crt|.key`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertFiles {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

impl CertFiles {
    pub fn is_default(&self) -> bool {
        self.cert.is_none() && self.key.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Cluster name, shown in the kubeconfig and `/version`. Default `ballast`.
    #[serde(default = "default_cluster_name")]
    pub name: String,
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            name: default_cluster_name(),
        }
    }
}

fn default_cluster_name() -> String {
    "ballast".into()
}

/// Raft timings. Defaults suit a noisy 2-core machine on loopback: no spurious elections
/// under load, a new leader well under a second after the old one dies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaftConfig {
    /// Leader heartbeat interval. Default `60ms`.
    #[serde(with = "humantime_serde", default = "d_heartbeat")]
    pub heartbeat_interval: Duration,
    /// Lower bound of the randomized election timeout. Default `400ms`.
    #[serde(with = "humantime_serde", default = "d_elect_min")]
    pub election_timeout_min: Duration,
    /// Upper bound of the randomized election timeout. Default `700ms`.
    #[serde(with = "humantime_serde", default = "d_elect_max")]
    pub election_timeout_max: Duration,
    /// Timeout of one peer RPC. Default `500ms`.
    #[serde(with = "humantime_serde", default = "d_rpc_timeout")]
    pub rpc_timeout: Duration,
    /// Build a snapshot (and compact the log) after this many applied entries. Default 10000.
    #[serde(default = "d_snapshot_logs")]
    pub snapshot_after_logs: u64,
    /// Revisions of history kept for watches before "too old" (410 Gone). Default 100000.
    #[serde(default = "d_watch_window")]
    pub watch_history: u64,
}

fn d_heartbeat() -> Duration {
    Duration::from_millis(60)
}
fn d_elect_min() -> Duration {
    Duration::from_millis(400)
}
fn d_elect_max() -> Duration {
    Duration::from_millis(700)
}
fn d_rpc_timeout() -> Duration {
    Duration::from_millis(500)
}
fn d_snapshot_logs() -> u64 {
    10_000
}
fn d_watch_window() -> u64 {
    100_000
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: d_heartbeat(),
            election_timeout_min: d_elect_min(),
            election_timeout_max: d_elect_max(),
            rpc_timeout: d_rpc_timeout(),
            snapshot_after_logs: d_snapshot_logs(),
            watch_history: d_watch_window(),
        }
    }
}

/// Control-plane behaviour of the active master.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// A node whose lease is not renewed for this long becomes `Ready=Unknown`. Default `40s`.
    #[serde(with = "humantime_serde", default = "d_node_grace")]
    pub node_grace_period: Duration,
    /// Pods on a not-ready node are evicted after this long. Default `300s`.
    #[serde(with = "humantime_serde", default = "d_eviction")]
    pub pod_eviction_timeout: Duration,
    /// Serve the internal key-value endpoint `/internal/kv` (tests only). Default false.
    #[serde(default)]
    pub internal_kv: bool,
}

fn d_node_grace() -> Duration {
    Duration::from_secs(40)
}
fn d_eviction() -> Duration {
    Duration::from_secs(300)
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            node_grace_period: d_node_grace(),
            pod_eviction_timeout: d_eviction(),
            internal_kv: false,
        }
    }
}

/// What one client can hold of a server: connections on the masters' (API and peer) and
/// the workers' HTTPS listeners, and requests in flight on the Kubernetes API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// A connection that does not send a whole request head within this long, after it
    /// opened or after its previous answer, is closed: both the slowloris bound and the
    /// keep-alive idle timeout (clients' pools drop idle connections after 30–60 s, so
    /// keep this above 60 s). Default `90s`.
    #[serde(with = "humantime_serde", default = "d_header_read")]
    pub header_read_timeout: Duration,
    /// Connections one listener holds at once, TLS handshakes included; a connection
    /// beyond it is closed as soon as it is accepted. Default `8192` (a process may open
    /// 20 000 files on the reference machine).
    #[serde(default = "d_max_connections")]
    pub max_connections: usize,
    /// Kubernetes API requests one identity may have in flight on the active master
    /// (watches and followed logs not counted, `system:masters` exempt); more are
    /// answered 429 with `Retry-After: 1`. Default `64`.
    #[serde(default = "d_per_user")]
    pub max_requests_in_flight_per_user: usize,
    /// Bytes of one Kubernetes API request body (kube-apiserver: 3 MiB); a larger body is
    /// answered 413 before it is read further. Default `3145728`.
    #[serde(default = "d_request_body")]
    pub max_request_body: usize,
    /// Bytes of one stored object as JSON (the 1.5 MiB etcd request limit
    /// kube-apiserver lives with); a create, update or patch that would store more is
    /// answered 413 and changes nothing. Default `1572864`.
    #[serde(default = "d_object_bytes")]
    pub max_object_bytes: usize,
    /// Operations in one JSON patch (kube-apiserver: 10 000); more: 413. A patch that
    /// copies the document into itself is stopped as soon as the result passes
    /// `max_object_bytes`. Default `10000`.
    #[serde(default = "d_patch_ops")]
    pub max_patch_operations: usize,
    /// Requirements in one label or field selector; more: 400. Default `64`.
    #[serde(default = "d_selector_terms")]
    pub max_selector_terms: usize,
    /// Items in one page of a list: a larger `limit` is lowered to it (the answer carries a
    /// `continue` token, as the API allows). A list without `limit` is not paged.
    /// Default `5000`.
    #[serde(default = "d_list_page")]
    pub max_list_page: usize,
    /// Watches and followed logs one identity holds on a master at once
    /// (`system:masters` exempt); more: 429 with `Retry-After`. Default `500`.
    #[serde(default = "d_watches_per_user")]
    pub max_watches_per_user: usize,
    /// Watches and followed logs a master serves at once, everyone counted; more: 429.
    /// Below `max_connections`, so that a flood of watches still leaves connections for
    /// other requests. Default: 15/16 of `max_connections` (`7680`); see
    /// [`LimitsConfig::watches`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_watches: Option<usize>,
}

impl LimitsConfig {
    /// `max_watches`, or its default.
    pub fn watches(&self) -> usize {
        self.max_watches
            .unwrap_or(self.max_connections - (self.max_connections / 16).max(1))
    }
}

fn d_request_body() -> usize {
    3 * 1024 * 1024
}
fn d_object_bytes() -> usize {
    1536 * 1024
}
fn d_patch_ops() -> usize {
    10_000
}
fn d_selector_terms() -> usize {
    64
}
fn d_list_page() -> usize {
    5000
}
fn d_watches_per_user() -> usize {
    500
}

fn d_header_read() -> Duration {
    Duration::from_secs(90)
}
fn d_max_connections() -> usize {
    8192
}
fn d_per_user() -> usize {
    64
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            header_read_timeout: d_header_read(),
            max_connections: d_max_connections(),
            max_requests_in_flight_per_user: d_per_user(),
            max_request_body: d_request_body(),
            max_object_bytes: d_object_bytes(),
            max_patch_operations: d_patch_ops(),
            max_selector_terms: d_selector_terms(),
            max_list_page: d_list_page(),
            max_watches_per_user: d_watches_per_user(),
            max_watches: None,
        }
    }
}

/// One master node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasterConfig {
    /// Unique node id, e.g. `m1`. Must be a DNS label.
    pub id: String,
    /// Availability zone, e.g. `zone-a`. Default `default`.
    #[serde(default = "default_zone")]
    pub zone: String,
    /// Address of the API (`/livez`, `/readyz`, `/active`, `/metrics`, Kubernetes API).
    pub api: SocketAddr,
    /// Address of the Raft peer RPC; never serves the API.
    pub peer: SocketAddr,
    /// Data directory; relative paths resolve against the config file's directory. Default: the id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Raft node id. Default: 1-based position in `masters`. Set it explicitly when a master
    /// is replaced by a new member (a lost data dir).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raft_id: Option<u64>,
    /// This master's certificate and key. Default `<tls.dir>/<id>.crt|.key`.
    #[serde(default, skip_serializing_if = "CertFiles::is_default")]
    pub tls: CertFiles,
}

fn default_zone() -> String {
    "default".into()
}

/// The proxy, DNS responder and admin endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// The proxy's id: the name of its certificate. Default `proxy`.
    #[serde(default = "d_proxy_id")]
    pub id: String,
    /// `http`: terminate TLS, authenticate clients, route each request (hold, replay
    /// rules); `tcp`: pass TLS through to the active master, routing per connection.
    /// Default `http`.
    #[serde(default)]
    pub mode: ProxyMode,
    /// Where workers and kubectl reach the API. Default `127.0.0.1:6443`.
    #[serde(default = "d_proxy_api")]
    pub api: SocketAddr,
    /// DNS responder, UDP and TCP. Default `127.0.0.1:5353`.
    #[serde(default = "d_proxy_dns")]
    pub dns: SocketAddr,
    /// Admin endpoint: `/metrics`, `/status`. Default `127.0.0.1:9180`.
    #[serde(default = "d_proxy_admin")]
    pub admin: SocketAddr,
    /// The DNS zone served. Default `ballast.local`.
    #[serde(default = "d_zone")]
    pub dns_zone: String,
    /// TTL of the records. Default `1s`.
    #[serde(with = "humantime_serde", default = "d_ttl")]
    pub dns_ttl: Duration,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub hold: HoldConfig,
    /// How long SIGTERM waits for open requests before the proxy exits. Default `2s`.
    #[serde(with = "humantime_serde", default = "d_shutdown_grace")]
    pub shutdown_grace: Duration,
    /// The proxy's certificate and key. Default `<tls.dir>/<id>.crt|.key`.
    #[serde(default, skip_serializing_if = "CertFiles::is_default")]
    pub tls: CertFiles,
}

/// One of several proxies: its id and its own addresses (the rest of its settings are
/// `[proxy]`'s).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyNode {
    /// Unique id, e.g. `p1` (a DNS label; the name of its certificate).
    pub id: String,
    /// Its own API address.
    pub api: SocketAddr,
    /// Its own DNS responder (UDP and TCP).
    pub dns: SocketAddr,
    /// Its own admin endpoint.
    pub admin: SocketAddr,
    /// Its certificate and key. Default `<tls.dir>/<id>.crt|.key`.
    #[serde(default, skip_serializing_if = "CertFiles::is_default")]
    pub tls: CertFiles,
}

/// The VIP of several proxies: its holder also serves `[proxy]`'s API, DNS and admin
/// addresses (which must be on the VIP).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipConfig {
    /// The virtual IP.
    pub address: std::net::IpAddr,
    /// Prefix length when the VIP is added to `interface`. Default 32 (128 for IPv6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<u8>,
    /// The interface the holder adds the VIP to (needs CAP_NET_ADMIN). Without it the
    /// VIP is an address every proxy host already has (loopback: `127.0.0.0/8`), and
    /// holding it means serving on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// How long a lease version must stand before another proxy may take the VIP.
    /// Default `2s`; with an `interface`, default `3s` and at least `2500ms`: the
    /// kernel removes a dead or paused holder's address only 1–2 s after its last renewal
    /// (see [`VipConfig::lease`]).
    #[serde(
        with = "humantime_serde",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub lease: Option<Duration>,
    /// How often the holder renews (and every proxy reads the lease). Default `100ms`.
    #[serde(with = "humantime_serde", default = "d_vip_renew")]
    pub renew: Duration,
}

impl VipConfig {
    /// A VIP at `address` with the default timings, added to no interface.
    pub fn new(address: std::net::IpAddr) -> Self {
        Self {
            address,
            prefix: None,
            interface: None,
            lease: None,
            renew: d_vip_renew(),
        }
    }

    /// The lease in force: as configured, else `2s` without an interface and `3s` with
    /// one. The holder cannot renew while the masters elect a new active one (0.4 s
    /// typically, over a second on a starved host), and a master failover must not cost it
    /// the VIP: a 900 ms lease did, on a 2-core host running the whole test suite.
    pub fn lease(&self) -> Duration {
        self.lease.unwrap_or(if self.interface.is_some() {
            Duration::from_secs(3)
        } else {
            Duration::from_secs(2)
        })
    }

    /// Prefix length of the VIP on its interface: as configured, else a host address.
    pub fn prefix(&self) -> u8 {
        self.prefix.unwrap_or(match self.address {
            std::net::IpAddr::V4(_) => 32,
            std::net::IpAddr::V6(_) => 128,
        })
    }
}

/// The shortest VIP lease with an interface: a renewal of the address right after a claim
/// must have run out (up to 2.2 s later, by the kernel) before `lease - lease/10`.
pub const MIN_INTERFACE_VIP_LEASE: Duration = Duration::from_millis(2_500);
fn d_vip_renew() -> Duration {
    Duration::from_millis(100)
}

/// How the proxy forwards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    /// Terminate TLS and proxy HTTP (the default).
    #[default]
    Http,
    /// Layer 4: pass each TLS connection through to the active master.
    Tcp,
}

fn d_proxy_id() -> String {
    "proxy".into()
}

fn d_proxy_api() -> SocketAddr {
    "127.0.0.1:6443".parse().unwrap()
}
fn d_proxy_dns() -> SocketAddr {
    "127.0.0.1:5353".parse().unwrap()
}
fn d_proxy_admin() -> SocketAddr {
    "127.0.0.1:9180".parse().unwrap()
}
fn d_zone() -> String {
    "ballast.local".into()
}
fn d_ttl() -> Duration {
    Duration::from_secs(1)
}
fn d_shutdown_grace() -> Duration {
    Duration::from_secs(2)
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            id: d_proxy_id(),
            mode: ProxyMode::default(),
            api: d_proxy_api(),
            dns: d_proxy_dns(),
            admin: d_proxy_admin(),
            dns_zone: d_zone(),
            dns_ttl: d_ttl(),
            health: HealthConfig::default(),
            hold: HoldConfig::default(),
            shutdown_grace: d_shutdown_grace(),
            tls: CertFiles::default(),
        }
    }
}

/// How the proxy checks each master's `/active`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Interval between checks of one master. Default `100ms`.
    #[serde(with = "humantime_serde", default = "d_hc_interval")]
    pub interval: Duration,
    /// Timeout of one check. Default `300ms`.
    #[serde(with = "humantime_serde", default = "d_hc_timeout")]
    pub timeout: Duration,
    /// Consecutive successes before a master counts as healthy. Default 1.
    #[serde(default = "d_rise")]
    pub rise: u32,
    /// Consecutive failures before a master counts as unhealthy. Default 2.
    #[serde(default = "d_fall")]
    pub fall: u32,
}

fn d_hc_interval() -> Duration {
    Duration::from_millis(100)
}
fn d_hc_timeout() -> Duration {
    Duration::from_millis(300)
}
fn d_rise() -> u32 {
    1
}
fn d_fall() -> u32 {
    2
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval: d_hc_interval(),
            timeout: d_hc_timeout(),
            rise: d_rise(),
            fall: d_fall(),
        }
    }
}

/// Requests held while no master is active.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldConfig {
    /// How long a request waits for an active master before 503. Default `10s`.
    #[serde(with = "humantime_serde", default = "d_hold_timeout")]
    pub timeout: Duration,
    /// How many requests may wait at once; more get 503 at once. Default 8192.
    #[serde(default = "d_hold_max")]
    pub max_requests: usize,
}

fn d_hold_timeout() -> Duration {
    Duration::from_secs(10)
}
fn d_hold_max() -> usize {
    // every node of a 5 000-node cluster re-opens its watch during a failover
    8192
}

impl Default for HoldConfig {
    fn default() -> Self {
        Self {
            timeout: d_hold_timeout(),
            max_requests: d_hold_max(),
        }
    }
}

/// Settings shared by all workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerDefaults {
    /// How often a worker renews its node Lease. Default `10s`.
    #[serde(with = "humantime_serde", default = "d_lease_interval")]
    pub lease_interval: Duration,
    /// Bytes kept per container log file before rotation. Default 10 MiB.
    #[serde(default = "d_log_bytes")]
    pub max_log_bytes: u64,
    /// First restart delay of a crashing container (doubles each time). Default `10s`.
    #[serde(with = "humantime_serde", default = "d_backoff_base")]
    pub restart_backoff_base: Duration,
    /// Longest restart delay (CrashLoopBackOff). Default `5m`.
    #[serde(with = "humantime_serde", default = "d_backoff_max")]
    pub restart_backoff_max: Duration,
    /// Files a pod's process may have open (`RLIMIT_NOFILE`, soft and hard; never above
    /// the worker's own hard limit). Default `65536`.
    #[serde(default = "d_pod_open_files")]
    pub pod_open_files: u64,
    /// Processes and threads one container may run at once (cgroup v2 `pids.max`, where
    /// the worker may use the pids controller), so a fork bomb stays inside its
    /// container. Default `4096`.
    #[serde(default = "d_pod_pids")]
    pub pod_pids_limit: u64,
}

fn d_pod_open_files() -> u64 {
    65536
}
fn d_pod_pids() -> u64 {
    4096
}

fn d_backoff_base() -> Duration {
    Duration::from_secs(10)
}
fn d_backoff_max() -> Duration {
    Duration::from_secs(300)
}

fn d_lease_interval() -> Duration {
    Duration::from_secs(10)
}
fn d_log_bytes() -> u64 {
    10 * 1024 * 1024
}

impl Default for WorkerDefaults {
    fn default() -> Self {
        Self {
            lease_interval: d_lease_interval(),
            max_log_bytes: d_log_bytes(),
            restart_backoff_base: d_backoff_base(),
            restart_backoff_max: d_backoff_max(),
            pod_open_files: d_pod_open_files(),
            pod_pids_limit: d_pod_pids(),
        }
    }
}

/// One worker node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Unique node id (the Node's name), e.g. `w1`.
    pub id: String,
    /// Availability zone label. Default `default`.
    #[serde(default = "default_zone")]
    pub zone: String,
    /// Where the worker serves logs and metrics.
    pub address: SocketAddr,
    /// Route to the API through a URL (normally the proxy), e.g. `https://127.0.0.1:6443`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_url: Option<String>,
    /// Route to the API through a DNS name, e.g. `api.ballast.local`, resolved at `dns_server`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_dns: Option<String>,
    /// The DNS server that resolves `api_dns`, e.g. `127.0.0.1:5353`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_server: Option<SocketAddr>,
    /// Several DNS servers for `api_dns` (e.g. every proxy's responder), tried in turn
    /// when one does not answer; instead of `dns_server`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_servers: Vec<SocketAddr>,
    /// Port of the API behind `api_dns`. Default 6443.
    #[serde(default = "d_api_port")]
    pub api_port: u16,
    #[serde(default)]
    pub capacity: Capacity,
    /// Data directory (pod logs, process state). Default: the id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// This worker's certificate and key. Default `<tls.dir>/<id>.crt|.key`.
    #[serde(default, skip_serializing_if = "CertFiles::is_default")]
    pub tls: CertFiles,
}

fn d_api_port() -> u16 {
    6443
}

/// How a worker reaches the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRoute {
    Url(String),
    Dns {
        name: String,
        /// Tried in turn until one answers (never empty).
        servers: Vec<SocketAddr>,
        port: u16,
    },
}

impl WorkerConfig {
    /// The validated route; `validate()` guarantees exactly one is set.
    pub fn route(&self) -> ApiRoute {
        match (&self.api_url, &self.api_dns) {
            (Some(url), _) => ApiRoute::Url(url.clone()),
            (None, Some(name)) => ApiRoute::Dns {
                name: name.clone(),
                servers: if self.dns_servers.is_empty() {
                    vec![self
                        .dns_server
                        .unwrap_or_else(|| "127.0.0.1:5353".parse().unwrap())]
                } else {
                    self.dns_servers.clone()
                },
                port: self.api_port,
            },
            (None, None) => ApiRoute::Url("https://127.0.0.1:6443".into()),
        }
    }
}

/// Resources a worker offers to the scheduler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    /// CPU in Kubernetes quantity form (`"2"`, `"1500m"`). Default `"4"`.
    #[serde(default = "d_cpu")]
    pub cpu: String,
    /// Memory in Kubernetes quantity form (`"8Gi"`). Default `"8Gi"`.
    #[serde(default = "d_mem")]
    pub memory: String,
    /// Max pods. Default 110.
    #[serde(default = "d_pods")]
    pub pods: u32,
}

fn d_cpu() -> String {
    "4".into()
}
fn d_mem() -> String {
    "8Gi".into()
}
fn d_pods() -> u32 {
    110
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            cpu: d_cpu(),
            memory: d_mem(),
            pods: d_pods(),
        }
    }
}
