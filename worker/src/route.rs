//! How the worker reaches the API: a fixed URL, or a DNS name resolved at the configured
//! DNS servers (the proxies' responders: the one that answered last first, then the
//! others in turn), cached for the record's TTL and resolved again on expiry or after a
//! connection failure. If no DNS server answers, the last known address is used (stale
//! beats nothing while the proxies restart).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ballast_config::ApiRoute;
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

/// Resolution failures; all are worth retrying.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RouteError {
    #[error("resolving {name} at DNS server {server}: {message} (will retry)")]
    Dns {
        name: String,
        server: SocketAddr,
        message: String,
    },
}

/// A resolved address and when it expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cached {
    ip: IpAddr,
    expires: Instant,
}

/// What to do for a request, given the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Use(IpAddr),
    /// Resolve; fall back to the stale address if resolution fails.
    Resolve {
        stale: Option<IpAddr>,
    },
}

fn decide(cache: Option<Cached>, now: Instant) -> Decision {
    match cache {
        Some(c) if now < c.expires => Decision::Use(c.ip),
        Some(c) => Decision::Resolve { stale: Some(c.ip) },
        None => Decision::Resolve { stale: None },
    }
}

/// The route to the API.
#[derive(Debug)]
pub(crate) enum Route {
    Url(String),
    Dns {
        name: String,
        servers: Vec<SocketAddr>,
        /// The server asked first: the one that answered last.
        preferred: AtomicUsize,
        port: u16,
        cache: Mutex<Option<Cached>>,
        /// Bumped whenever the name resolves to a different address.
        generation: AtomicU64,
    },
}

impl Route {
    pub(crate) fn new(r: ApiRoute) -> Self {
        match r {
            ApiRoute::Url(u) => Route::Url(u.trim_end_matches('/').to_string()),
            ApiRoute::Dns {
                name,
                servers,
                port,
            } => Route::Dns {
                name,
                servers,
                preferred: AtomicUsize::new(0),
                port,
                cache: Mutex::new(None),
                generation: AtomicU64::new(0),
            },
        }
    }

    /// A description for logs.
    pub(crate) fn describe(&self) -> String {
        match self {
            Route::Url(u) => u.clone(),
            Route::Dns {
                name,
                servers,
                port,
                ..
            } => {
                let at: Vec<String> = servers.iter().map(ToString::to_string).collect();
                format!("{name}:{port} (DNS at {})", at.join(", "))
            }
        }
    }

    /// The base URL (`https://host:port`) to use now.
    pub(crate) async fn base_url(&self) -> Result<String, RouteError> {
        match self {
            Route::Url(u) => Ok(u.clone()),
            Route::Dns {
                name,
                servers,
                preferred,
                port,
                cache,
                generation,
            } => {
                let now = Instant::now();
                let cached = *cache.lock().unwrap();
                let ip = match decide(cached, now) {
                    Decision::Use(ip) => ip,
                    Decision::Resolve { stale } => {
                        match resolve_any(name, servers, preferred).await {
                            Ok((ip, ttl)) => {
                                *cache.lock().unwrap() = Some(Cached {
                                    ip,
                                    expires: Instant::now() + ttl,
                                });
                                if cached.map(|c| c.ip) != Some(ip) {
                                    generation.fetch_add(1, Ordering::SeqCst);
                                    tracing::info!(%name, %ip, "API name resolves to a new address");
                                }
                                ip
                            }
                            Err(e) => match stale {
                                Some(ip) => {
                                    tracing::debug!(error = %e, %ip, "using the stale address");
                                    ip
                                }
                                None => return Err(e),
                            },
                        }
                    }
                };
                Ok(format!("https://{}", SocketAddr::new(ip, *port)))
            }
        }
    }

    /// Changes whenever the API moves to another address (long-lived streams to the old
    /// one should be reopened).
    pub(crate) fn generation(&self) -> u64 {
        match self {
            Route::Url(_) => 0,
            Route::Dns { generation, .. } => generation.load(Ordering::SeqCst),
        }
    }

    /// A connection failed: resolve again before the next request.
    pub(crate) fn invalidate(&self) {
        if let Route::Dns { cache, .. } = self {
            if let Some(c) = cache.lock().unwrap().as_mut() {
                c.expires = Instant::now();
            }
        }
    }
}

/// Ask `servers` in turn, starting with `preferred`, until one answers; the one that
/// answered becomes `preferred`. The last error when none does.
async fn resolve_any(
    name: &str,
    servers: &[SocketAddr],
    preferred: &AtomicUsize,
) -> Result<(IpAddr, Duration), RouteError> {
    let first = preferred.load(Ordering::Relaxed) % servers.len().max(1);
    let mut last = None;
    for k in 0..servers.len() {
        let i = (first + k) % servers.len();
        match resolve_a(name, servers[i]).await {
            Ok(found) => {
                if i != first {
                    tracing::info!(server = %servers[i], %name, "now resolving at this DNS server");
                    preferred.store(i, Ordering::Relaxed);
                }
                return Ok(found);
            }
            Err(e) => {
                tracing::debug!(error = %e, "DNS server did not answer; trying the next");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| RouteError::Dns {
        name: name.to_string(),
        server: "0.0.0.0:0".parse().unwrap(),
        message: "no DNS server configured".into(),
    }))
}

/// One A query at `server` over UDP; returns the first address and its TTL.
pub(crate) async fn resolve_a(
    name: &str,
    server: SocketAddr,
) -> Result<(IpAddr, Duration), RouteError> {
    let err = |message: String| RouteError::Dns {
        name: name.to_string(),
        server,
        message,
    };
    let fqdn = if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    };
    let qname = Name::from_ascii(&fqdn).map_err(|e| err(format!("bad name: {e}")))?;
    let mut msg = Message::query();
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(qname, RecordType::A));
    let id = msg.metadata.id;
    let wire = msg.to_vec().map_err(|e| err(e.to_string()))?;
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let sock = tokio::net::UdpSocket::bind(bind)
        .await
        .map_err(|e| err(e.to_string()))?;
    sock.connect(server).await.map_err(|e| err(e.to_string()))?;
    let mut buf = vec![0u8; 4096];
    for _attempt in 0..2 {
        sock.send(&wire).await.map_err(|e| err(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(700);
        loop {
            let n = match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                Err(_) => break,
                Ok(Err(e)) => return Err(err(e.to_string())),
                Ok(Ok(n)) => n,
            };
            let Ok(resp) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            if resp.metadata.id != id {
                continue;
            }
            return answer(&resp).map_err(err);
        }
    }
    Err(err("no answer".into()))
}

fn answer(resp: &Message) -> Result<(IpAddr, Duration), String> {
    if resp.metadata.response_code != ResponseCode::NoError {
        return Err(format!("rcode {}", resp.metadata.response_code));
    }
    resp.answers
        .iter()
        .find_map(|r| match &r.data {
            RData::A(a) => Some((IpAddr::V4(a.0), Duration::from_secs(r.ttl.into()))),
            RData::AAAA(a) => Some((IpAddr::V6(a.0), Duration::from_secs(r.ttl.into()))),
            _ => None,
        })
        .ok_or_else(|| "no address in the answer".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{MessageType, OpCode};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::Record;
    use std::net::Ipv4Addr;

    #[test]
    fn cache_policy_honours_the_ttl_and_keeps_a_stale_fallback() {
        let now = Instant::now();
        let ip: IpAddr = "127.0.1.2".parse().unwrap();
        assert_eq!(decide(None, now), Decision::Resolve { stale: None });
        let fresh = Cached {
            ip,
            expires: now + Duration::from_secs(1),
        };
        assert_eq!(decide(Some(fresh), now), Decision::Use(ip));
        assert_eq!(
            decide(Some(fresh), now + Duration::from_secs(1)),
            Decision::Resolve { stale: Some(ip) }
        );
    }

    #[tokio::test]
    async fn invalidate_forces_a_new_resolution() {
        let r = Route::new(ApiRoute::Dns {
            name: "api.ballast.local".into(),
            servers: vec!["127.0.0.1:9".parse().unwrap()],
            port: 6443,
        });
        let ip: IpAddr = "127.0.1.3".parse().unwrap();
        if let Route::Dns { cache, .. } = &r {
            *cache.lock().unwrap() = Some(Cached {
                ip,
                expires: Instant::now() + Duration::from_secs(60),
            });
        }
        assert_eq!(r.base_url().await.unwrap(), "https://127.0.1.3:6443");
        r.invalidate();
        // Nothing answers at port 9: the stale address is used.
        assert_eq!(r.base_url().await.unwrap(), "https://127.0.1.3:6443");
        let url = Route::new(ApiRoute::Url("https://127.0.0.1:6443/".into()));
        assert_eq!(url.base_url().await.unwrap(), "https://127.0.0.1:6443");
    }

    /// A DNS server answering `answers` queries with `127.0.1.2`, TTL 7.
    async fn fake_server(answers: usize) -> SocketAddr {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server = sock.local_addr().unwrap();
        tokio::spawn(async move {
            for _ in 0..answers {
                let mut buf = vec![0u8; 512];
                let (n, from) = sock.recv_from(&mut buf).await.unwrap();
                let q = Message::from_vec(&buf[..n]).unwrap();
                let mut resp = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
                resp.add_query(q.queries[0].clone());
                resp.answers.push(Record::from_rdata(
                    q.queries[0].name().clone(),
                    7,
                    RData::A(A(Ipv4Addr::new(127, 0, 1, 2))),
                ));
                sock.send_to(&resp.to_vec().unwrap(), from).await.unwrap();
            }
        });
        server
    }

    #[tokio::test]
    async fn a_dead_dns_server_is_passed_over_and_the_answering_one_asked_first() {
        // nothing listens on a port just freed: the query is refused at once
        let dead = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap()
        };
        let live = fake_server(2).await;
        let preferred = AtomicUsize::new(0);
        let (ip, _) = resolve_any("api.ballast.local", &[dead, live], &preferred)
            .await
            .unwrap();
        assert_eq!(ip, "127.0.1.2".parse::<IpAddr>().unwrap());
        assert_eq!(preferred.load(Ordering::Relaxed), 1);
        let t = Instant::now();
        resolve_any("api.ballast.local", &[dead, live], &preferred)
            .await
            .unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "the live one is asked first"
        );
        assert!(
            resolve_any("api.ballast.local", &[dead], &AtomicUsize::new(0))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn resolves_at_the_configured_server_only() {
        let server = fake_server(1).await;
        let (ip, ttl) = resolve_a("api.ballast.local", server).await.unwrap();
        assert_eq!(ip, "127.0.1.2".parse::<IpAddr>().unwrap());
        assert_eq!(ttl, Duration::from_secs(7));
    }
}
