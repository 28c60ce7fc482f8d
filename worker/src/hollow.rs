//! Hollow nodes (like kubemark): real registration, leases and pod status, no processes.
//! A pod bound to a hollow node is reported Running with every container running and
//! ready; a deleted pod is confirmed at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use k8s_openapi::jiff::Timestamp;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::api::{retry, Api};
use crate::backoff::RestartPolicy;
use crate::metrics::Metrics;
use crate::pod_status::{self, CState, ContainerView, PodView};
use crate::status_upload::StatusSync;
use crate::watch::{self, PodSink};

/// The status a hollow node reports for a pod: Running, all containers ready.
pub(crate) fn running_status(pod: &Pod, ip: IpAddr, now: Timestamp) -> PodStatus {
    let spec = pod.spec.clone().unwrap_or_default();
    let view = PodView {
        containers: spec
            .containers
            .iter()
            .map(|c| ContainerView {
                name: c.name.clone(),
                image: c.image.clone().unwrap_or_default(),
                state: CState::Running { started_at: now },
                last: None,
                restart_count: 0,
                ready: true,
                started: true,
                container_id: Some(format!("hollow://{}", c.name)),
            })
            .collect(),
        init_containers: Vec::new(),
        initialized: true,
        restart_policy: RestartPolicy::parse(spec.restart_policy.as_deref()),
        host_ip: ip.to_string(),
        pod_ip: ip.to_string(),
        start_time: Some(now),
    };
    pod_status::compute(&view, None, now)
}

/// One hollow node's pods.
pub(crate) struct HollowNode {
    name: String,
    ip: IpAddr,
    api: Arc<Api>,
    statuses: Arc<StatusSync>,
    metrics: Metrics,
    shutdown: CancellationToken,
    /// uid → whether reported Running.
    pods: HashMap<String, bool>,
}

impl HollowNode {
    pub(crate) fn new(
        name: String,
        ip: IpAddr,
        api: Arc<Api>,
        statuses: Arc<StatusSync>,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            name,
            ip,
            api,
            statuses,
            metrics,
            shutdown,
            pods: HashMap::new(),
        }
    }

    pub(crate) async fn run(mut self) {
        let api = self.api.clone();
        let name = self.name.clone();
        let shutdown = self.shutdown.clone();
        watch::run(&api, &name, &mut self, &shutdown).await;
        let n = self.pods.values().filter(|r| **r).count() as i64;
        self.metrics.pods_running.sub(n);
    }
}

impl PodSink for HollowNode {
    fn upsert(&mut self, pod: Pod) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        let ns = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = pod.metadata.name.clone().unwrap_or_default();
        if pod.metadata.deletion_timestamp.is_some() {
            if self.pods.remove(&uid) == Some(true) {
                self.metrics.pods_running.dec();
            }
            self.statuses.forget(&uid);
            let api = self.api.clone();
            let stop = self.shutdown.clone();
            tokio::spawn(async move {
                let path = format!("/api/v1/namespaces/{ns}/pods/{name}?gracePeriodSeconds=0");
                let body = json!({"gracePeriodSeconds": 0, "preconditions": {"uid": uid}});
                let _ = retry("confirm hollow pod deletion", &stop, || {
                    api.delete(&path, &body)
                })
                .await;
            });
            return;
        }
        let reported = self.pods.entry(uid.clone()).or_insert(false);
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if !*reported && phase != Some("Running") {
            self.statuses.set(
                &uid,
                &ns,
                &name,
                running_status(&pod, self.ip, crate::now()),
            );
            *reported = true;
            self.metrics.pods_running.inc();
        } else if !*reported {
            *reported = true;
            self.metrics.pods_running.inc();
        }
    }

    fn gone(&mut self, uid: &str) {
        if self.pods.remove(uid) == Some(true) {
            self.metrics.pods_running.dec();
        }
        self.statuses.forget(uid);
    }

    fn known(&self) -> Vec<String> {
        self.pods.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec};

    #[test]
    fn hollow_pods_are_running_and_ready() {
        let pod = Pod {
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "c".into(),
                    image: Some("nginx".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let s = running_status(&pod, "127.0.2.9".parse().unwrap(), crate::now());
        assert_eq!(s.phase.as_deref(), Some("Running"));
        let cs = &s.container_statuses.unwrap()[0];
        assert!(cs.ready);
        assert_eq!(cs.image, "nginx");
    }
}
