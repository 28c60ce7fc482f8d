//! Kubernetes Events about pods (`Started`, `Killing`, `BackOff`, `Unhealthy`, `Failed`),
//! as the kubelet posts them, so `kubectl describe pod` tells what happened. Best effort:
//! a bounded queue, one attempt each, dropped when the API is unreachable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use tokio::sync::mpsc;

use crate::api::Api;

/// The event queue of one node.
pub(crate) struct Events {
    node: String,
    tx: mpsc::Sender<Event>,
    seq: AtomicU64,
}

impl Events {
    /// Start the sender task (it ends when the queue is dropped).
    pub(crate) fn new(api: Arc<Api>, node: String) -> Self {
        let (tx, mut rx) = mpsc::channel::<Event>(256);
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                let ns = ev.metadata.namespace.clone().unwrap_or_default();
                let path = format!("/api/v1/namespaces/{ns}/events");
                if let Err(e) = api.post::<serde_json::Value>(&path, &ev).await {
                    tracing::debug!(error = %e, "event dropped");
                }
            }
        });
        Self {
            node,
            tx,
            seq: AtomicU64::new(0),
        }
    }

    /// Record an event about `container` of `pod` (`warning` for type `Warning`).
    pub(crate) fn pod(
        &self,
        pod: &Pod,
        container: Option<&str>,
        warning: bool,
        reason: &str,
        message: String,
    ) {
        let ev = event(
            pod,
            container,
            &self.node,
            warning,
            reason,
            message,
            self.seq.fetch_add(1, Ordering::Relaxed),
        );
        let _ = self.tx.try_send(ev);
    }
}

/// The Event object.
pub(crate) fn event(
    pod: &Pod,
    container: Option<&str>,
    node: &str,
    warning: bool,
    reason: &str,
    message: String,
    seq: u64,
) -> Event {
    let now = crate::now();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let ns = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let unique = format!(
        "{:x}{:04x}",
        crate::now_micro().as_microsecond(),
        seq & 0xffff
    );
    Event {
        metadata: ObjectMeta {
            name: Some(format!("{name}.{unique}")),
            namespace: Some(ns.clone()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(name),
            namespace: Some(ns),
            uid: pod.metadata.uid.clone(),
            field_path: container.map(|c| format!("spec.containers{{{c}}}")),
            ..Default::default()
        },
        reason: Some(reason.into()),
        message: Some(message),
        type_: Some(if warning { "Warning" } else { "Normal" }.into()),
        source: Some(EventSource {
            component: Some("kubelet".into()),
            host: Some(node.into()),
        }),
        reporting_component: Some("kubelet".into()),
        reporting_instance: Some(node.into()),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(crate::now_micro())),
        count: Some(1),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_pod_and_container() {
        let mut p = Pod::default();
        p.metadata.name = Some("web-1".into());
        p.metadata.uid = Some("u".into());
        let e = event(&p, Some("main"), "w1", true, "BackOff", "x".into(), 1);
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["kind"], "Event");
        assert_eq!(v["involvedObject"]["uid"], "u");
        assert_eq!(v["involvedObject"]["fieldPath"], "spec.containers{main}");
        assert_eq!(v["type"], "Warning");
        assert_eq!(v["source"]["host"], "w1");
        assert!(v["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("web-1."));
        assert_eq!(v["metadata"]["namespace"], "default");
    }
}
