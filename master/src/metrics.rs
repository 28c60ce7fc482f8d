//! Prometheus metrics of one master (its own [`Registry`], served at `/metrics`).

use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// All metrics of one master.
pub struct MasterMetrics {
    pub registry: Registry,
    pub active: IntGauge,
    pub term: IntGauge,
    pub store_revision: IntGauge,
    pub api_requests: IntCounterVec,
    pub raft_last_log_index: IntGauge,
    pub raft_applied_index: IntGauge,
    pub raft_snapshot_index: IntGauge,
    pub raft_purged_index: IntGauge,
    pub raft_is_leader: IntGauge,
    pub raft_elections: IntCounter,
    pub raft_leader_changes: IntCounter,
    pub raft_activations: IntCounter,
    pub raft_rpc_seconds: HistogramVec,
    pub raft_rpc_failures: IntCounterVec,
    pub store_batch_writes: Histogram,
    pub api_throttled: IntCounter,
}

impl MasterMetrics {
    pub fn new(master: &str) -> Self {
        let registry = Registry::new_custom(
            None,
            Some([("master".to_string(), master.to_string())].into()),
        )
        .expect("registry");
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("gauge");
            registry.register(Box::new(g.clone())).expect("register");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("counter");
            registry.register(Box::new(c.clone())).expect("register");
            c
        };
        let active = gauge(
            "ballast_master_active",
            "1 while this master is the active one",
        );
        let term = gauge(
            "ballast_master_term",
            "Current Raft term seen by this master",
        );
        let store_revision = gauge(
            "ballast_master_store_revision",
            "Store revision applied on this master",
        );
        let api_requests = IntCounterVec::new(
            Opts::new(
                "ballast_master_api_requests_total",
                "API requests served, by verb, resource and status code",
            ),
            &["verb", "resource", "code"],
        )
        .expect("counter vec");
        registry
            .register(Box::new(api_requests.clone()))
            .expect("register");
        let raft_rpc_seconds = HistogramVec::new(
            HistogramOpts::new(
                "ballast_master_raft_rpc_duration_seconds",
                "Latency of Raft RPCs sent to peers",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            ]),
            &["rpc"],
        )
        .expect("histogram");
        registry
            .register(Box::new(raft_rpc_seconds.clone()))
            .expect("register");
        let raft_rpc_failures = IntCounterVec::new(
            Opts::new(
                "ballast_master_raft_rpc_failures_total",
                "Raft RPCs to peers that failed (timeout, unreachable, refused)",
            ),
            &["rpc"],
        )
        .expect("counter vec");
        registry
            .register(Box::new(raft_rpc_failures.clone()))
            .expect("register");
        let store_batch_writes = Histogram::with_opts(
            HistogramOpts::new(
                "ballast_master_store_batch_writes",
                "Writes proposed together in one Raft entry (group commit), per entry",
            )
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
        )
        .expect("histogram");
        registry
            .register(Box::new(store_batch_writes.clone()))
            .expect("register");
        let api_throttled = counter(
            "ballast_master_api_throttled_total",
            "API requests answered 429: their identity had its maximum in flight",
        );
        Self {
            api_throttled,
            store_batch_writes,
            active,
            term,
            store_revision,
            api_requests,
            raft_last_log_index: gauge("ballast_master_raft_last_log_index", "Last Raft log index"),
            raft_applied_index: gauge(
                "ballast_master_raft_applied_index",
                "Last Raft log index applied to the state machine",
            ),
            raft_snapshot_index: gauge(
                "ballast_master_raft_snapshot_index",
                "Last Raft log index in the snapshot",
            ),
            raft_purged_index: gauge(
                "ballast_master_raft_purged_index",
                "Last Raft log index purged from the log",
            ),
            raft_is_leader: gauge(
                "ballast_master_raft_leader",
                "1 while this master is Raft leader",
            ),
            raft_elections: counter(
                "ballast_master_raft_term_changes_total",
                "Raft term increases (elections) seen by this master",
            ),
            raft_leader_changes: counter(
                "ballast_master_raft_leader_changes_total",
                "Changes of the Raft leader seen by this master",
            ),
            raft_activations: counter(
                "ballast_master_activations_total",
                "Times this master became active",
            ),
            raft_rpc_seconds,
            raft_rpc_failures,
            registry,
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let enc = TextEncoder::new();
        if let Err(e) = enc.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "cannot encode the metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    pub fn observe_rpc(&self, rpc: &str, took: Duration, ok: bool) {
        self.raft_rpc_seconds
            .with_label_values(&[rpc])
            .observe(took.as_secs_f64());
        if !ok {
            self.raft_rpc_failures.with_label_values(&[rpc]).inc();
        }
    }
}

/// `(verb, resource)` of a request, Kubernetes style where the path is a Kubernetes one.
pub(crate) fn classify(method: &http::Method, path: &str, query: Option<&str>) -> (String, String) {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // /api/v1/..., /apis/{group}/{version}/...
    let rest: Option<&[&str]> = match segs.as_slice() {
        ["api", _v, rest @ ..] => Some(rest),
        ["apis", _g, _v, rest @ ..] => Some(rest),
        _ => None,
    };
    // Labels come from a closed set, never from what a client wrote: a path or method
    // of the client's choosing must not make a new series each time.
    let Some(rest) = rest else {
        let resource = match segs.first().copied() {
            None => "root",
            Some(
                p @ ("livez" | "readyz" | "healthz" | "active" | "metrics" | "version" | "openapi"
                | "internal"),
            ) => p,
            Some(_) => "other",
        };
        let verb = match *method {
            http::Method::GET => "get",
            http::Method::HEAD => "head",
            http::Method::POST => "post",
            http::Method::PUT => "put",
            http::Method::PATCH => "patch",
            http::Method::DELETE => "delete",
            _ => "other",
        };
        return (verb.to_string(), resource.to_string());
    };
    let served = |res: &str| {
        if crate::api::resources::ALL.iter().any(|d| d.plural == res) {
            res.to_string()
        } else {
            "other".to_string()
        }
    };
    // namespaces/{ns}/{resource}/{name}/{sub} | {resource}/{name}/{sub}
    let (resource, name) = match rest {
        ["namespaces", _ns, res, tail @ ..] => (served(res), tail.first().copied()),
        [res, tail @ ..] => (served(res), tail.first().copied()),
        [] => ("discovery".to_string(), None),
    };
    let watch = query.is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let verb = match *method {
        http::Method::GET if watch => "watch",
        http::Method::GET if name.is_none() && resource != "discovery" => "list",
        http::Method::GET => "get",
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE if name.is_none() => "deletecollection",
        http::Method::DELETE => "delete",
        _ => "other",
    };
    (verb.to_string(), resource)
}

/// Middleware counting every request in `ballast_master_api_requests_total`.
pub(crate) async fn count_requests(
    State(metrics): State<std::sync::Arc<MasterMetrics>>,
    req: Request,
    next: Next,
) -> Response {
    let (verb, resource) = classify(req.method(), req.uri().path(), req.uri().query());
    let resp = next.run(req).await;
    metrics
        .api_requests
        .with_label_values(&[verb.as_str(), resource.as_str(), resp.status().as_str()])
        .inc();
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn labels_come_from_a_closed_set() {
        let c = |m: &str, p: &str| classify(&Method::from_bytes(m.as_bytes()).unwrap(), p, None);
        assert_eq!(c("GET", "/x-attacker-1"), ("get".into(), "other".into()));
        assert_eq!(c("FOO123", "/livez"), ("other".into(), "livez".into()));
        assert_eq!(
            c("GET", "/api/v1/whatever-1"),
            ("list".into(), "other".into())
        );
        assert_eq!(
            c("GET", "/apis/g/v1/namespaces/a/nope/x"),
            ("get".into(), "other".into())
        );
    }

    #[test]
    fn classify_kubernetes_paths() {
        let c = |m: Method, p: &str, q: Option<&str>| classify(&m, p, q);
        assert_eq!(
            c(Method::GET, "/api/v1/namespaces/default/pods", None),
            ("list".into(), "pods".into())
        );
        assert_eq!(
            c(
                Method::GET,
                "/api/v1/namespaces/default/pods",
                Some("watch=true")
            ),
            ("watch".into(), "pods".into())
        );
        assert_eq!(
            c(Method::GET, "/api/v1/nodes/w1", None),
            ("get".into(), "nodes".into())
        );
        assert_eq!(
            c(Method::POST, "/apis/apps/v1/namespaces/x/deployments", None),
            ("create".into(), "deployments".into())
        );
        assert_eq!(
            c(Method::DELETE, "/api/v1/namespaces/x/pods/p", None),
            ("delete".into(), "pods".into())
        );
        assert_eq!(
            c(Method::GET, "/api/v1", None),
            ("get".into(), "discovery".into())
        );
        assert_eq!(
            c(Method::GET, "/readyz", None),
            ("get".into(), "readyz".into())
        );
        assert_eq!(
            c(Method::PUT, "/internal/kv/a/b", None),
            ("put".into(), "internal".into())
        );
    }

    #[test]
    fn renders_required_names() {
        let m = MasterMetrics::new("m1");
        m.api_requests.with_label_values(&["get", "x", "200"]).inc();
        let text = m.render();
        for name in [
            "ballast_master_active",
            "ballast_master_term",
            "ballast_master_store_revision",
            "ballast_master_api_requests_total",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
    }
}
