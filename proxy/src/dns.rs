//! The DNS responder (hickory-server): answers for the cluster zone from the shared
//! health state. [`answer`] is the pure answer logic; [`DnsHandler`] plugs it into
//! hickory's server for UDP and TCP.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, NS, SOA, SRV};
use hickory_server::proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;

use crate::health::Routing;
use crate::state::Shared;

/// The zone's view of the cluster, everything [`answer`] needs.
pub(crate) struct ZoneView<'a> {
    /// Fully qualified, lower case, e.g. `ballast.local.`.
    pub zone: &'a Name,
    pub ttl: u32,
    pub routing: &'a Routing,
    /// The proxy's API address (`proxy.` in the zone, with one proxy).
    pub proxy_api: SocketAddr,
    /// With several proxies: each one's id, own API address and whether it is alive.
    /// `proxy.` and the zone's NS list the live ones; `<id>.proxy.` names each.
    pub proxies: &'a [(String, SocketAddr, bool)],
    /// The VIP (`vip.` in the zone), if any.
    pub vip: Option<IpAddr>,
}

impl ZoneView<'_> {
    /// The name servers of the zone, with their addresses: every live proxy
    /// (`<id>.proxy.`), or with one proxy `proxy.`.
    fn name_servers(&self) -> Vec<(Name, IpAddr)> {
        if self.proxies.is_empty() {
            return vec![(child(self.zone, "proxy"), self.proxy_api.ip())];
        }
        self.proxies
            .iter()
            .filter(|(_, _, live)| *live)
            .map(|(id, api, _)| {
                let name = child(self.zone, &format!("{}.proxy", id.to_lowercase()));
                (name, api.ip())
            })
            .collect()
    }
}

/// A computed DNS answer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Answer {
    pub rcode: ResponseCode,
    pub authoritative: bool,
    pub answers: Vec<Record>,
    pub authority: Vec<Record>,
    pub additional: Vec<Record>,
}

impl Answer {
    fn refused() -> Self {
        Self {
            rcode: ResponseCode::Refused,
            authoritative: false,
            answers: vec![],
            authority: vec![],
            additional: vec![],
        }
    }
}

/// Parse a configured zone name (`ballast.local` or `ballast.local.`) into an FQDN.
pub(crate) fn zone_name(zone: &str) -> Result<Name, hickory_server::proto::ProtoError> {
    let z = zone.trim().trim_end_matches('.');
    Ok(Name::from_ascii(format!("{z}."))?.to_lowercase())
}

fn ip_record(name: &Name, ttl: u32, ip: IpAddr) -> Record {
    let rdata = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name.clone(), ttl, rdata)
}

fn matches_type(ip: IpAddr, qtype: RecordType) -> bool {
    match qtype {
        RecordType::A => ip.is_ipv4(),
        RecordType::AAAA => ip.is_ipv6(),
        RecordType::ANY => true,
        _ => false,
    }
}

fn child(zone: &Name, label: &str) -> Name {
    Name::from_ascii(label)
        .and_then(|n| n.append_domain(zone))
        .unwrap_or_else(|_| zone.clone())
}

fn soa_record(v: &ZoneView<'_>) -> Record {
    let soa = SOA::new(
        child(v.zone, "proxy"),
        child(v.zone, "hostmaster"),
        // the serial moves with every failover, so secondaries would notice
        1 + v.routing.failovers as u32,
        60,
        10,
        600,
        v.ttl,
    );
    Record::from_rdata(v.zone.clone(), v.ttl, RData::SOA(soa))
}

fn ns_record(v: &ZoneView<'_>, server: &Name) -> Record {
    Record::from_rdata(v.zone.clone(), v.ttl, RData::NS(NS(server.clone())))
}

/// Answer one question. Pure: no I/O, no clock.
pub(crate) fn answer(
    v: &ZoneView<'_>,
    qname: &Name,
    qtype: RecordType,
    qclass: DNSClass,
) -> Answer {
    let qname = qname.to_lowercase();
    let mut fq = qname.clone();
    fq.set_fqdn(true);
    if !v.zone.zone_of(&fq) || !(qclass == DNSClass::IN || qclass == DNSClass::ANY) {
        return Answer::refused();
    }
    let extra = fq.num_labels() - v.zone.num_labels();
    let rel: Vec<String> = fq
        .iter()
        .take(extra as usize)
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    let rel = rel.join(".");

    let ttl = v.ttl;
    let mut answers = Vec::new();
    let mut additional = Vec::new();
    let exists = match rel.as_str() {
        "" => {
            if matches!(qtype, RecordType::SOA | RecordType::ANY) {
                answers.push(soa_record(v));
            }
            if matches!(qtype, RecordType::NS | RecordType::ANY) {
                for (server, ip) in v.name_servers() {
                    answers.push(ns_record(v, &server));
                    additional.push(ip_record(&server, ttl, ip));
                }
            }
            true
        }
        "api" => {
            if let Some(a) = &v.routing.active {
                if matches_type(a.addr.ip(), qtype) {
                    answers.push(ip_record(&fq, ttl, a.addr.ip()));
                }
            }
            true
        }
        "masters" => {
            let mut seen = Vec::new();
            for m in v.routing.masters.iter().filter(|m| m.healthy) {
                let ip = m.addr.ip();
                if matches_type(ip, qtype) && !seen.contains(&ip) {
                    seen.push(ip);
                    answers.push(ip_record(&fq, ttl, ip));
                }
            }
            true
        }
        "proxy" => {
            let mut seen = Vec::new();
            for (_, ip) in v.name_servers() {
                if matches_type(ip, qtype) && !seen.contains(&ip) {
                    seen.push(ip);
                    answers.push(ip_record(&fq, ttl, ip));
                }
            }
            true
        }
        "vip" if v.vip.is_some() => {
            if let Some(ip) = v.vip.filter(|ip| matches_type(*ip, qtype)) {
                answers.push(ip_record(&fq, ttl, ip));
            }
            true
        }
        "_api._tcp" => {
            if let Some(a) = &v.routing.active {
                if matches!(qtype, RecordType::SRV | RecordType::ANY) {
                    let target = child(v.zone, &a.id.to_lowercase());
                    answers.push(Record::from_rdata(
                        fq.clone(),
                        ttl,
                        RData::SRV(SRV::new(0, 0, a.addr.port(), target.clone())),
                    ));
                    additional.push(ip_record(&target, ttl, a.addr.ip()));
                }
            }
            true
        }
        // empty non-terminal above the SRV name
        "_tcp" => true,
        other if other.ends_with(".proxy") => {
            let id = other.trim_end_matches(".proxy");
            match v
                .proxies
                .iter()
                .find(|(p, _, _)| p.eq_ignore_ascii_case(id))
            {
                Some((_, api, _)) => {
                    if matches_type(api.ip(), qtype) {
                        answers.push(ip_record(&fq, ttl, api.ip()));
                    }
                    true
                }
                None => false,
            }
        }
        other => {
            if let Some(m) = v
                .routing
                .masters
                .iter()
                .find(|m| m.id.eq_ignore_ascii_case(other))
            {
                if matches_type(m.addr.ip(), qtype) {
                    answers.push(ip_record(&fq, ttl, m.addr.ip()));
                }
                true
            } else {
                false
            }
        }
    };
    let (rcode, authority) = if !exists {
        (ResponseCode::NXDomain, vec![soa_record(v)])
    } else if answers.is_empty() {
        // NODATA: the name exists, not with this type (or no active master right now)
        (ResponseCode::NoError, vec![soa_record(v)])
    } else {
        (ResponseCode::NoError, vec![])
    };
    Answer {
        rcode,
        authoritative: true,
        answers,
        authority,
        additional,
    }
}

/// hickory-server request handler for the zone.
pub(crate) struct DnsHandler {
    pub shared: Arc<Shared>,
}

impl DnsHandler {
    fn count(&self, rcode: ResponseCode) {
        let label = rcode_label(rcode);
        self.shared
            .metrics
            .dns_queries
            .with_label_values(&[label])
            .inc();
    }
}

/// Metric label of a response code: `NOERROR`, `NXDOMAIN`, `REFUSED`, ...
pub(crate) fn rcode_label(rcode: ResponseCode) -> &'static str {
    match rcode {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        _ => "OTHER",
    }
}

#[async_trait::async_trait]
impl RequestHandler for DnsHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let mut resp_edns = Edns::new();
        let edns = request.edns.as_ref().map(|req| {
            resp_edns.set_max_payload(req.max_payload().max(512));
            resp_edns.set_version(0);
            &resp_edns
        });
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = edns {
            builder.edns(e);
        }
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.recursion_available = false;

        let computed = if request.metadata.op_code != OpCode::Query {
            Err(ResponseCode::NotImp)
        } else {
            match request.request_info() {
                Ok(info) => {
                    let settings = self.shared.settings();
                    let routing = self.shared.current();
                    let proxies: Vec<(String, SocketAddr, bool)> = settings
                        .proxies
                        .iter()
                        .map(|p| (p.id.clone(), p.api, self.shared.peers.alive(&p.id)))
                        .collect();
                    match zone_name(&settings.proxy.dns_zone) {
                        Ok(zone) => {
                            let view = ZoneView {
                                zone: &zone,
                                ttl: settings.proxy.dns_ttl.as_secs().min(u32::MAX as u64) as u32,
                                routing: &routing,
                                proxy_api: settings.proxy.api,
                                proxies: &proxies,
                                vip: settings.vip.as_ref().map(|v| v.address),
                            };
                            let q = info.query.original();
                            Ok(answer(&view, q.name(), q.query_type(), q.query_class()))
                        }
                        Err(_) => Err(ResponseCode::ServFail),
                    }
                }
                // not exactly one question
                Err(_) => Err(ResponseCode::FormErr),
            }
        };

        let result = match computed {
            Ok(ans) => {
                meta.response_code = ans.rcode;
                meta.authoritative = ans.authoritative;
                let resp = builder.build(
                    meta,
                    ans.answers.iter(),
                    ans.authority.iter(),
                    std::iter::empty(),
                    ans.additional.iter(),
                );
                self.count(ans.rcode);
                response_handle.send_response(resp).await
            }
            Err(rcode) => {
                self.count(rcode);
                response_handle
                    .send_response(builder.error_msg(&request.metadata, rcode))
                    .await
            }
        };
        match result {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "sending DNS response failed");
                meta.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata: meta,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{ActiveMaster, MasterView};

    fn routing(active: Option<u8>) -> Routing {
        let masters: Vec<MasterView> = (1..=3u8)
            .map(|i| MasterView {
                id: format!("m{i}"),
                addr: SocketAddr::from(([127, 0, 1, i], 6443)),
                healthy: i != 3,
                active: Some(i) == active,
                term: Some(5),
            })
            .collect();
        Routing {
            active: active.map(|i| ActiveMaster {
                id: format!("m{i}"),
                addr: SocketAddr::from(([127, 0, 1, i], 6443)),
                term: 5,
            }),
            masters,
            failovers: 2,
        }
    }

    fn ask(r: &Routing, name: &str, t: RecordType) -> Answer {
        let zone = zone_name("ballast.local").unwrap();
        let v = ZoneView {
            zone: &zone,
            ttl: 1,
            routing: r,
            proxy_api: "127.0.0.1:6443".parse().unwrap(),
            proxies: &[],
            vip: None,
        };
        answer(&v, &Name::from_ascii(name).unwrap(), t, DNSClass::IN)
    }

    #[test]
    fn several_proxies_list_the_live_ones_and_the_vip_has_a_name() {
        let zone = zone_name("ballast.local").unwrap();
        let proxies = [
            ("p1".to_string(), "127.0.3.1:6443".parse().unwrap(), true),
            ("p2".to_string(), "127.0.3.2:6443".parse().unwrap(), false),
            ("p3".to_string(), "127.0.3.3:6443".parse().unwrap(), true),
        ];
        let r = routing(Some(1));
        let v = ZoneView {
            zone: &zone,
            ttl: 1,
            routing: &r,
            proxy_api: "127.0.3.1:6443".parse().unwrap(),
            proxies: &proxies,
            vip: Some("127.0.0.1".parse().unwrap()),
        };
        let q = |name: &str, t| answer(&v, &Name::from_ascii(name).unwrap(), t, DNSClass::IN);
        assert_eq!(
            ips(&q("proxy.ballast.local.", RecordType::A)),
            vec!["127.0.3.1", "127.0.3.3"]
        );
        assert_eq!(
            ips(&q("vip.ballast.local.", RecordType::A)),
            vec!["127.0.0.1"]
        );
        // a dead proxy keeps its own name
        assert_eq!(
            ips(&q("p2.proxy.ballast.local.", RecordType::A)),
            vec!["127.0.3.2"]
        );
        assert_eq!(
            q("p9.proxy.ballast.local.", RecordType::A).rcode,
            ResponseCode::NXDomain
        );
        let ns = q("ballast.local.", RecordType::NS);
        let servers: Vec<String> = ns
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::NS(n) => n.0.to_string(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            servers,
            vec!["p1.proxy.ballast.local.", "p3.proxy.ballast.local."]
        );
        assert_eq!(ns.additional.len(), 2, "glue for each");
        // without a VIP the name does not exist
        let one = ZoneView {
            vip: None,
            proxies: &[],
            ..v
        };
        let a = answer(
            &one,
            &Name::from_ascii("vip.ballast.local.").unwrap(),
            RecordType::A,
            DNSClass::IN,
        );
        assert_eq!(a.rcode, ResponseCode::NXDomain);
    }

    fn ips(a: &Answer) -> Vec<String> {
        a.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0.to_string()),
                RData::AAAA(a) => Some(a.0.to_string()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn api_points_at_the_active_master() {
        let r = routing(Some(2));
        let a = ask(&r, "api.ballast.local.", RecordType::A);
        assert_eq!(a.rcode, ResponseCode::NoError);
        assert!(a.authoritative);
        assert_eq!(ips(&a), vec!["127.0.1.2"]);
        assert_eq!(a.answers[0].ttl, 1);
        // case-insensitive, no trailing dot
        let a = ask(&r, "API.Ballast.Local", RecordType::A);
        assert_eq!(ips(&a), vec!["127.0.1.2"]);
    }

    #[test]
    fn api_without_active_is_nodata_with_soa() {
        let a = ask(&routing(None), "api.ballast.local.", RecordType::A);
        assert_eq!(a.rcode, ResponseCode::NoError);
        assert!(a.answers.is_empty());
        assert_eq!(a.authority[0].record_type(), RecordType::SOA);
    }

    #[test]
    fn masters_lists_healthy_ones_and_each_master_has_a_name() {
        let r = routing(Some(1));
        let a = ask(&r, "masters.ballast.local.", RecordType::A);
        assert_eq!(ips(&a), vec!["127.0.1.1", "127.0.1.2"]);
        let a = ask(&r, "m3.ballast.local.", RecordType::A);
        assert_eq!(ips(&a), vec!["127.0.1.3"]);
        let a = ask(&r, "proxy.ballast.local.", RecordType::A);
        assert_eq!(ips(&a), vec!["127.0.0.1"]);
        // no IPv6 address: AAAA is NODATA
        let a = ask(&r, "m1.ballast.local.", RecordType::AAAA);
        assert_eq!(a.rcode, ResponseCode::NoError);
        assert!(a.answers.is_empty());
    }

    #[test]
    fn srv_names_the_active_master() {
        let a = ask(
            &routing(Some(3)),
            "_api._tcp.ballast.local.",
            RecordType::SRV,
        );
        assert_eq!(a.rcode, ResponseCode::NoError);
        match &a.answers[0].data {
            RData::SRV(s) => {
                assert_eq!(s.port, 6443);
                assert_eq!(s.target.to_string(), "m3.ballast.local.");
            }
            other => panic!("not SRV: {other:?}"),
        }
        assert_eq!(
            ips(&Answer {
                answers: a.additional.clone(),
                ..a
            }),
            vec!["127.0.1.3"]
        );
    }

    #[test]
    fn apex_soa_nxdomain_and_refused() {
        let r = routing(Some(1));
        let a = ask(&r, "ballast.local.", RecordType::SOA);
        assert_eq!(a.rcode, ResponseCode::NoError);
        assert_eq!(a.answers[0].record_type(), RecordType::SOA);
        let a = ask(&r, "ballast.local.", RecordType::NS);
        assert_eq!(a.answers[0].record_type(), RecordType::NS);
        let a = ask(&r, "nope.ballast.local.", RecordType::A);
        assert_eq!(a.rcode, ResponseCode::NXDomain);
        assert_eq!(a.authority[0].record_type(), RecordType::SOA);
        let a = ask(&r, "x.api.ballast.local.", RecordType::A);
        assert_eq!(a.rcode, ResponseCode::NXDomain);
        let a = ask(&r, "example.com.", RecordType::A);
        assert_eq!(a.rcode, ResponseCode::Refused);
        assert!(!a.authoritative);
        let a = ask(&r, "local.", RecordType::A);
        assert_eq!(a.rcode, ResponseCode::Refused);
    }

    #[test]
    fn ipv6_masters_get_aaaa() {
        let mut r = routing(Some(1));
        r.active.as_mut().unwrap().addr = "[::1]:6443".parse().unwrap();
        let a = ask(&r, "api.ballast.local.", RecordType::AAAA);
        assert_eq!(ips(&a), vec!["::1"]);
        let a = ask(&r, "api.ballast.local.", RecordType::A);
        assert!(a.answers.is_empty());
    }
}
