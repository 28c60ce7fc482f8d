//! The worker's Prometheus metrics, in its own registry.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every metric the worker exports on `GET /metrics`.
#[derive(Clone)]
pub(crate) struct Metrics {
    pub registry: Registry,
    /// Pods in phase Running on this worker.
    pub pods_running: IntGauge,
    /// Container processes alive.
    pub containers_running: IntGauge,
    /// Failed API calls (connection errors, 5xx, unexpected answers).
    pub api_errors: IntCounter,
    /// Round trip of one lease renewal.
    pub heartbeat: Histogram,
    /// Container restarts, by reason.
    pub restarts: IntCounterVec,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let registry = Registry::new();
        let pods_running = IntGauge::new(
            "ballast_worker_pods_running",
            "Pods in phase Running on this worker",
        )
        .unwrap();
        let containers_running = IntGauge::new(
            "ballast_worker_containers_running",
            "Container processes alive on this worker",
        )
        .unwrap();
        let api_errors = IntCounter::new(
            "ballast_worker_api_errors_total",
            "API calls that failed (connection errors, 5xx, unexpected answers)",
        )
        .unwrap();
        let heartbeat = Histogram::with_opts(
            HistogramOpts::new(
                "ballast_worker_heartbeat_latency_seconds",
                "Round trip of one node lease renewal",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )
        .unwrap();
        let restarts = IntCounterVec::new(
            Opts::new(
                "ballast_worker_container_restarts_total",
                "Container processes started again after an exit",
            ),
            &["reason"],
        )
        .unwrap();
        for c in [
            Box::new(pods_running.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(containers_running.clone()),
            Box::new(api_errors.clone()),
            Box::new(heartbeat.clone()),
            Box::new(restarts.clone()),
        ] {
            registry.register(c).unwrap();
        }
        Self {
            registry,
            pods_running,
            containers_running,
            api_errors,
            heartbeat,
            restarts,
        }
    }

    /// The text exposition format.
    pub(crate) fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .unwrap();
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

    #[test]
    fn renders_the_contract_names() {
        let m = Metrics::new();
        m.api_errors.inc();
        m.pods_running.set(2);
        m.heartbeat.observe(0.01);
        let t = m.render();
        assert!(t.contains("ballast_worker_api_errors_total 1"));
        assert!(t.contains("ballast_worker_pods_running 2"));
        assert!(t.contains("ballast_worker_heartbeat_latency_seconds_bucket"));
    }
}
