//! The proxy's Prometheus metrics, in their own registry (names fixed by the contract).

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::health::Routing;

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    pub active_master: IntGaugeVec,
    pub upstream_healthy: IntGaugeVec,
    pub master_term: IntGaugeVec,
    pub failovers: IntCounter,
    pub failover_seconds: Histogram,
    pub requests: IntCounterVec,
    /// `requests` by status code, looked up once per code (not hashed per request).
    requests_by_code: Box<[std::sync::OnceLock<IntCounter>]>,
    pub request_duration: Histogram,
    pub dns_queries: IntCounterVec,
    pub held_requests: IntGauge,
    pub hold_timeouts: IntCounter,
    /// Requests answered 429 by this proxy (an identity over its bound in flight).
    pub throttled: IntCounter,
    pub streams_closed: IntCounter,
    pub watches_resumed: IntCounter,
    pub upstream_retries: IntCounterVec,
    pub config_reloads: IntCounterVec,
    /// L4 mode: client connections by outcome.
    pub tcp_connections: IntCounterVec,
    /// 1 while this proxy serves the VIP.
    pub vip_holder: IntGauge,
    /// How often this proxy started or stopped serving the VIP.
    pub vip_changes: IntCounter,
    /// `ballast_proxy_info{id}` 1: which proxy this is (several may be scraped).
    pub info: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let active_master = IntGaugeVec::new(
            Opts::new(
                "ballast_proxy_active_master",
                "1 on the master the proxy routes to, 0 on the others",
            ),
            &["master"],
        )
        .expect("valid metric");
        let upstream_healthy = IntGaugeVec::new(
            Opts::new(
                "ballast_proxy_upstream_healthy",
                "1 while the master passes its health check (after rise/fall hysteresis)",
            ),
            &["master"],
        )
        .expect("valid metric");
        let master_term = IntGaugeVec::new(
            Opts::new(
                "ballast_proxy_master_term",
                "The Raft term each master last reported on /active",
            ),
            &["master"],
        )
        .expect("valid metric");
        let failovers = IntCounter::new(
            "ballast_proxy_failovers_total",
            "Times the routed master changed to a different master",
        )
        .expect("valid metric");
        let failover_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "ballast_proxy_failover_seconds",
                "Time with no active master to route to, per gap",
            )
            .buckets(vec![
                0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0,
            ]),
        )
        .expect("valid metric");
        let requests = IntCounterVec::new(
            Opts::new(
                "ballast_proxy_requests_total",
                "API requests answered by the proxy, by HTTP status code",
            ),
            &["code"],
        )
        .expect("valid metric");
        let request_duration = Histogram::with_opts(
            HistogramOpts::new(
                "ballast_proxy_request_duration_seconds",
                "Time from request start to the end of the response, holding included",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )
        .expect("valid metric");
        let dns_queries = IntCounterVec::new(
            Opts::new(
                "ballast_dns_queries_total",
                "DNS queries answered, by response code",
            ),
            &["rcode"],
        )
        .expect("valid metric");
        let held_requests = IntGauge::new(
            "ballast_proxy_held_requests",
            "Requests waiting for an active master now",
        )
        .expect("valid metric");
        let hold_timeouts = IntCounter::new(
            "ballast_proxy_hold_rejected_total",
            "Held requests answered 503 (hold timeout or hold queue full)",
        )
        .expect("valid metric");
        let throttled = IntCounter::new(
            "ballast_proxy_throttled_total",
            "Requests answered 429 by this proxy: their identity held its bound of requests in flight",
        )
        .expect("valid metric");
        let streams_closed = IntCounter::new(
            "ballast_proxy_streams_closed_total",
            "Open streams and idle upstream connections closed because the active master changed",
        )
        .expect("valid metric");
        let watches_resumed = IntCounter::new(
            "ballast_proxy_watches_resumed_total",
            "Client watches continued at a new active master from their last resourceVersion",
        )
        .expect("valid metric");
        let upstream_retries = IntCounterVec::new(
            Opts::new(
                "ballast_proxy_upstream_retries_total",
                "Requests sent again to a master, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "ballast_proxy_config_reloads_total",
                "SIGHUP config reloads, by result",
            ),
            &["result"],
        )
        .expect("valid metric");
        let tcp_connections = IntCounterVec::new(
            Opts::new(
                "ballast_proxy_tcp_connections_total",
                "L4 mode: client connections by outcome (forwarded, no_active_master, connect_failed)",
            ),
            &["result"],
        )
        .expect("valid metric");
        let vip_holder = IntGauge::new(
            "ballast_proxy_vip_holder",
            "1 while this proxy holds the VIP (serves its addresses), 0 otherwise",
        )
        .expect("valid metric");
        let vip_changes = IntCounter::new(
            "ballast_proxy_vip_changes_total",
            "How often this proxy took or let go of the VIP",
        )
        .expect("valid metric");
        let info = IntGaugeVec::new(
            Opts::new("ballast_proxy_info", "Always 1; the label names this proxy"),
            &["id"],
        )
        .expect("valid metric");
        for c in [
            Box::new(active_master.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(info.clone()),
            Box::new(tcp_connections.clone()),
            Box::new(vip_holder.clone()),
            Box::new(vip_changes.clone()),
            Box::new(upstream_healthy.clone()),
            Box::new(master_term.clone()),
            Box::new(failovers.clone()),
            Box::new(failover_seconds.clone()),
            Box::new(requests.clone()),
            Box::new(request_duration.clone()),
            Box::new(dns_queries.clone()),
            Box::new(held_requests.clone()),
            Box::new(hold_timeouts.clone()),
            Box::new(throttled.clone()),
            Box::new(streams_closed.clone()),
            Box::new(watches_resumed.clone()),
            Box::new(upstream_retries.clone()),
            Box::new(config_reloads.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        Self {
            registry,
            active_master,
            upstream_healthy,
            master_term,
            failovers,
            failover_seconds,
            requests,
            requests_by_code: (0..600).map(|_| std::sync::OnceLock::new()).collect(),
            request_duration,
            dns_queries,
            held_requests,
            hold_timeouts,
            throttled,
            streams_closed,
            watches_resumed,
            upstream_retries,
            config_reloads,
            tcp_connections,
            vip_holder,
            vip_changes,
            info,
        }
    }

    /// Count one L4 client connection by outcome.
    pub fn count_connection(&self, result: &str) {
        self.tcp_connections.with_label_values(&[result]).inc();
    }

    /// Count one answered request (`code` 0: no answer, labelled "000").
    pub fn count_request(&self, code: u16) {
        let label = || {
            if code == 0 {
                "000".to_string()
            } else {
                code.to_string()
            }
        };
        match self.requests_by_code.get(usize::from(code)) {
            Some(slot) => slot
                .get_or_init(|| self.requests.with_label_values(&[label().as_str()]))
                .inc(),
            None => self.requests.with_label_values(&[label().as_str()]).inc(),
        }
    }

    /// Mirror the per-master gauges from the routing view (masters removed by a reload
    /// disappear from the output).
    pub fn set_routing(&self, old: &Routing, r: &Routing) {
        for gone in old
            .masters
            .iter()
            .filter(|o| !r.masters.iter().any(|m| m.id == o.id))
        {
            let l = [gone.id.as_str()];
            let _ = self.active_master.remove_label_values(&l);
            let _ = self.upstream_healthy.remove_label_values(&l);
            let _ = self.master_term.remove_label_values(&l);
        }
        for m in &r.masters {
            self.active_master
                .with_label_values(&[m.id.as_str()])
                .set(i64::from(m.active));
            self.upstream_healthy
                .with_label_values(&[m.id.as_str()])
                .set(i64::from(m.healthy));
            if let Some(t) = m.term {
                self.master_term
                    .with_label_values(&[m.id.as_str()])
                    .set(t as i64);
            }
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let families = self.registry.gather();
        if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
            tracing::error!(error = %e, "encoding metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::MasterView;

    #[test]
    fn renders_contract_names() {
        let m = Metrics::new();
        m.set_routing(
            &Routing::default(),
            &Routing {
                active: None,
                masters: vec![MasterView {
                    id: "m1".into(),
                    addr: "127.0.1.1:6443".parse().unwrap(),
                    healthy: true,
                    active: true,
                    term: Some(3),
                }],
                failovers: 0,
            },
        );
        m.requests.with_label_values(&["200"]).inc();
        m.request_duration.observe(0.01);
        m.dns_queries.with_label_values(&["NOERROR"]).inc();
        let text = m.render();
        for name in [
            "ballast_proxy_active_master{master=\"m1\"} 1",
            "ballast_proxy_upstream_healthy{master=\"m1\"} 1",
            "ballast_proxy_failovers_total 0",
            "ballast_proxy_failover_seconds_bucket",
            "ballast_proxy_requests_total{code=\"200\"} 1",
            "ballast_proxy_request_duration_seconds_bucket",
            "ballast_dns_queries_total{rcode=\"NOERROR\"} 1",
            "ballast_proxy_streams_closed_total 0",
            "ballast_proxy_held_requests 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
