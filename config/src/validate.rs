//! Semantic validation of a parsed [`ClusterConfig`].

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;

use crate::locate::PathSeg;
use crate::schema::*;

/// What is wrong, independent of where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationErrorKind {
    #[error("at least one master is required")]
    NoMasters,
    #[error("duplicate id `{0}` (ids must be unique across masters and workers)")]
    DuplicateId(String),
    #[error("address {addr} is already used by {other}")]
    DuplicateAddress { addr: SocketAddr, other: String },
    #[error("duplicate raft_id {0}")]
    DuplicateRaftId(u64),
    #[error("invalid id `{0}`: use a lowercase DNS label (a-z, 0-9, '-'), at most 63 characters")]
    BadId(String),
    #[error("{0}")]
    Invalid(String),
}

/// A validation error with the TOML path of the offending key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    pub path: Vec<PathSeg>,
    pub kind: ValidationErrorKind,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}",
            crate::locate::display_path(&self.path),
            self.kind
        )
    }
}

impl std::error::Error for ValidationError {}

/// A warning: the config works, but probably not as intended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub path: Vec<PathSeg>,
    pub message: String,
}

fn key(k: &str) -> PathSeg {
    PathSeg::Key(k.to_string())
}

fn err(path: Vec<PathSeg>, kind: ValidationErrorKind) -> ValidationError {
    ValidationError { path, kind }
}

fn invalid(path: Vec<PathSeg>, msg: impl Into<String>) -> ValidationError {
    err(path, ValidationErrorKind::Invalid(msg.into()))
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Check a parsed config; returns warnings when it is usable.
pub fn validate(c: &ClusterConfig) -> Result<Vec<Warning>, ValidationError> {
    let mut claims = Claims::default();
    claims.masters(c)?;
    check_limits(c)?;
    check_raft(&c.raft)?;
    claims.proxies(c)?;
    if let Some(v) = &c.vip {
        check_vip(c, v)?;
    }
    for (i, w) in c.workers.iter().enumerate() {
        claims.worker(i, w)?;
    }
    Ok(claims.warnings)
}

/// The ids and addresses the nodes checked so far took (no two may share either), and
/// the warnings so far.
#[derive(Default)]
struct Claims<'c> {
    ids: HashSet<&'c str>,
    /// Address → who took it, for the error.
    addrs: HashMap<SocketAddr, String>,
    warnings: Vec<Warning>,
}

impl<'c> Claims<'c> {
    /// A node's id: a DNS label no other node has.
    fn id(&mut self, id: &'c str, path: Vec<PathSeg>) -> Result<(), ValidationError> {
        if !is_dns_label(id) {
            return Err(err(path, ValidationErrorKind::BadId(id.into())));
        }
        if !self.ids.insert(id) {
            return Err(err(path, ValidationErrorKind::DuplicateId(id.into())));
        }
        Ok(())
    }

    /// An address a node listens on. Port 0 means "any free port": never a conflict.
    fn addr(
        &mut self,
        addr: SocketAddr,
        who: String,
        path: Vec<PathSeg>,
    ) -> Result<(), ValidationError> {
        if addr.port() == 0 {
            return Ok(());
        }
        if let Some(other) = self.addrs.get(&addr) {
            let other = other.clone();
            return Err(err(
                path,
                ValidationErrorKind::DuplicateAddress { addr, other },
            ));
        }
        self.addrs.insert(addr, who);
        Ok(())
    }

    fn masters(&mut self, c: &'c ClusterConfig) -> Result<(), ValidationError> {
        if c.masters.is_empty() {
            return Err(err(vec![key("masters")], ValidationErrorKind::NoMasters));
        }
        let mut raft_ids = HashSet::new();
        for (i, m) in c.masters.iter().enumerate() {
            let p = |k: &str| vec![key("masters"), PathSeg::Index(i), key(k)];
            self.id(&m.id, p("id"))?;
            self.addr(m.api, format!("master {} (api)", m.id), p("api"))?;
            self.addr(m.peer, format!("master {} (peer)", m.id), p("peer"))?;
            let rid = m.raft_id.unwrap_or(i as u64 + 1);
            if rid == 0 {
                return Err(invalid(p("raft_id"), "raft_id must be at least 1"));
            }
            if !raft_ids.insert(rid) {
                return Err(err(p("raft_id"), ValidationErrorKind::DuplicateRaftId(rid)));
            }
        }
        if c.masters.len() % 2 == 0 {
            let n = c.masters.len();
            let quorum = n / 2 + 1;
            self.warnings.push(Warning {
            path: vec![key("masters")],
            message: format!(
                "{n} masters (an even number): a quorum is {quorum}, so the cluster tolerates the loss of {} master(s), \
                 the same as {} masters; use an odd number",
                n - quorum,
                n - 1
            ),
        });
        }
        Ok(())
    }

    /// `[proxy]` (its addresses, DNS zone, health checks and hold queue) and `[[proxies]]`.
    fn proxies(&mut self, c: &'c ClusterConfig) -> Result<(), ValidationError> {
        let px = &c.proxy;
        let pp = |k: &str| vec![key("proxy"), key(k)];
        self.id(&px.id, pp("id"))?;
        self.addr(px.api, "proxy (api)".into(), pp("api"))?;
        self.addr(px.admin, "proxy (admin)".into(), pp("admin"))?;
        // DNS is UDP+TCP; a TCP API on the same address would still clash on TCP.
        self.addr(px.dns, "proxy (dns)".into(), pp("dns"))?;
        let zone = px.dns_zone.trim_end_matches('.');
        if px.dns_zone.trim_matches('.').is_empty() || !zone.split('.').all(is_dns_label) {
            let msg = "must be a DNS name like `ballast.local`";
            return Err(invalid(pp("dns_zone"), msg));
        }
        for (i, pn) in c.proxies.iter().enumerate() {
            let p = |k: &str| vec![key("proxies"), PathSeg::Index(i), key(k)];
            self.id(&pn.id, p("id"))?;
            self.addr(pn.api, format!("proxy {} (api)", pn.id), p("api"))?;
            self.addr(pn.admin, format!("proxy {} (admin)", pn.id), p("admin"))?;
            self.addr(pn.dns, format!("proxy {} (dns)", pn.id), p("dns"))?;
        }
        let hp = |k: &str| vec![key("proxy"), key("health"), key(k)];
        if px.health.interval.is_zero() {
            return Err(invalid(hp("interval"), "must be greater than zero"));
        }
        if px.health.timeout.is_zero() {
            return Err(invalid(hp("timeout"), "must be greater than zero"));
        }
        if px.health.rise == 0 {
            return Err(invalid(hp("rise"), "must be at least 1"));
        }
        if px.health.fall == 0 {
            return Err(invalid(hp("fall"), "must be at least 1"));
        }
        if px.hold.max_requests == 0 {
            self.warnings.push(Warning {
                path: vec![key("proxy"), key("hold"), key("max_requests")],
                message: "0 disables holding: requests fail at once while no master is active"
                    .into(),
            });
        }
        Ok(())
    }

    fn worker(&mut self, i: usize, w: &'c WorkerConfig) -> Result<(), ValidationError> {
        let p = |k: &str| vec![key("workers"), PathSeg::Index(i), key(k)];
        self.id(&w.id, p("id"))?;
        self.addr(w.address, format!("worker {}", w.id), p("address"))?;
        match (&w.api_url, &w.api_dns) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    p("api_dns"),
                    "set either api_url or api_dns, not both",
                ))
            }
            (None, None) => return Err(invalid(
                vec![key("workers"), PathSeg::Index(i)],
                "missing route to the API: set api_url (e.g. the proxy) or api_dns + dns_server",
            )),
            (Some(url), None) if !url.starts_with("https://") => {
                return Err(invalid(
                    p("api_url"),
                    "must be an https:// URL (every Ballast listener speaks TLS)",
                ));
            }
            (Some(_), None) => {}
            (None, Some(_)) => match (w.dns_server, w.dns_servers.is_empty()) {
                (None, true) => {
                    let msg = "api_dns needs dns_server (or dns_servers)";
                    return Err(invalid(p("api_dns"), msg));
                }
                (Some(_), false) => {
                    let msg = "set either dns_server or dns_servers, not both";
                    return Err(invalid(p("dns_servers"), msg));
                }
                _ => {}
            },
        }
        let cp = |k: &str| vec![key("workers"), PathSeg::Index(i), key("capacity"), key(k)];
        if w.capacity.pods == 0 {
            return Err(invalid(cp("pods"), "must be at least 1"));
        }
        for (k, v) in [("cpu", &w.capacity.cpu), ("memory", &w.capacity.memory)] {
            if parse_quantity(v).is_none() {
                return Err(invalid(
                    cp(k),
                    format!("`{v}` is not a Kubernetes quantity (e.g. \"2\", \"500m\", \"8Gi\")"),
                ));
            }
        }
        Ok(())
    }
}

fn check_limits(c: &ClusterConfig) -> Result<(), ValidationError> {
    let lp = |k: &str| vec![key("limits"), key(k)];
    if c.limits.max_connections == 0 {
        return Err(invalid(lp("max_connections"), "must be at least 1"));
    }
    if c.limits.max_requests_in_flight_per_user == 0 {
        let path = lp("max_requests_in_flight_per_user");
        return Err(invalid(path, "must be at least 1"));
    }
    if c.limits.header_read_timeout.is_zero() {
        let path = lp("header_read_timeout");
        return Err(invalid(path, "must be longer than 0s"));
    }
    let l = &c.limits;
    for (k, v) in [
        ("max_request_body", l.max_request_body),
        ("max_object_bytes", l.max_object_bytes),
        ("max_patch_operations", l.max_patch_operations),
        ("max_selector_terms", l.max_selector_terms),
        ("max_list_page", l.max_list_page),
        ("max_watches_per_user", l.max_watches_per_user),
        ("max_watches", l.watches()),
    ] {
        if v == 0 {
            return Err(invalid(lp(k), "must be at least 1"));
        }
    }
    if l.watches() >= l.max_connections {
        let msg = format!(
            "must be below max_connections ({}), or watches alone could take every connection",
            l.max_connections
        );
        return Err(invalid(lp("max_watches"), &msg));
    }
    Ok(())
}

fn check_raft(r: &RaftConfig) -> Result<(), ValidationError> {
    let rp = |k: &str| vec![key("raft"), key(k)];
    if r.heartbeat_interval.is_zero() {
        return Err(invalid(
            rp("heartbeat_interval"),
            "must be greater than zero",
        ));
    }
    if r.election_timeout_min <= r.heartbeat_interval * 2 {
        let msg = "must be more than twice heartbeat_interval";
        return Err(invalid(rp("election_timeout_min"), msg));
    }
    if r.election_timeout_max <= r.election_timeout_min {
        let msg = "must be greater than election_timeout_min";
        return Err(invalid(rp("election_timeout_max"), msg));
    }
    if r.snapshot_after_logs == 0 {
        return Err(invalid(rp("snapshot_after_logs"), "must be at least 1"));
    }
    Ok(())
}

fn check_vip(c: &ClusterConfig, v: &VipConfig) -> Result<(), ValidationError> {
    let vp = |k: &str| vec![key("vip"), key(k)];
    if c.proxies.is_empty() {
        let msg = "a VIP needs several proxies: add [[proxies]]";
        return Err(invalid(vec![key("vip")], msg));
    }
    let px = &c.proxy;
    for (k, addr) in [("api", px.api), ("dns", px.dns), ("admin", px.admin)] {
        if addr.ip() != v.address {
            return Err(invalid(
                vec![key("proxy"), key(k)],
                format!(
                    "with a [vip], [proxy] addresses are the ones served on the VIP: use {}",
                    v.address
                ),
            ));
        }
    }
    if let Some(name) = &v.interface {
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
            return Err(invalid(
                vp("interface"),
                "must be an interface name (1–15 characters, no `/` or space)",
            ));
        }
        let max = if v.address.is_ipv4() { 32 } else { 128 };
        if v.prefix() == 0 || v.prefix() > max {
            return Err(invalid(vp("prefix"), format!("must be 1..={max}")));
        }
        if v.lease() < crate::schema::MIN_INTERFACE_VIP_LEASE {
            return Err(invalid(
                vp("lease"),
                "with an interface, must be at least 2500ms: the kernel removes a dead or paused holder's address only 1–2 s after its last renewal (address lifetimes are whole seconds), and no other proxy may add it before then; the default is 3s",
            ));
        }
    }
    if v.renew.is_zero() || v.lease() < v.renew * 3 {
        return Err(invalid(
            vp("lease"),
            "must be at least three times vip.renew (and renew more than zero)",
        ));
    }
    Ok(())
}

/// Parse a Kubernetes quantity into its value in base units (cpu cores or bytes), as f64.
pub fn parse_quantity(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0f64.powi(4),
        _ => return None,
    };
    Some(n * mult)
}
