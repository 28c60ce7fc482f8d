//! Pod status updates, decoupled from the pods: each pod's latest status waits here
//! (latest wins) until the API takes it, so pods never block on an unreachable API and a
//! status computed while every master was down is sent once one is back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::api::{Api, ApiError, RetryDelay};

#[derive(Debug, Clone, PartialEq)]
struct Pending {
    namespace: String,
    name: String,
    status: PodStatus,
}

/// The queue of pod statuses to send.
#[derive(Default)]
pub(crate) struct StatusSync {
    pending: Mutex<HashMap<String, Pending>>,
    notify: Notify,
}

impl StatusSync {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Queue `status` for pod `uid`, replacing any older one not yet sent.
    pub(crate) fn set(&self, uid: &str, namespace: &str, name: &str, status: PodStatus) {
        self.pending.lock().unwrap().insert(
            uid.to_string(),
            Pending {
                namespace: namespace.to_string(),
                name: name.to_string(),
                status,
            },
        );
        self.notify.notify_one();
    }

    /// Drop what is queued for `uid` (the pod is gone).
    pub(crate) fn forget(&self, uid: &str) {
        self.pending.lock().unwrap().remove(uid);
    }

    /// The status waiting for `uid`, if any.
    #[cfg(test)]
    pub(crate) fn pending_status(&self, uid: &str) -> Option<PodStatus> {
        self.pending
            .lock()
            .unwrap()
            .get(uid)
            .map(|p| p.status.clone())
    }

    /// How many statuses wait.
    pub(crate) fn len(&self) -> usize {
        self.pending.lock().unwrap().len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Send queued statuses until `shutdown`.
    pub(crate) async fn run(self: Arc<Self>, api: Arc<Api>, shutdown: CancellationToken) {
        let mut delay = RetryDelay::default();
        loop {
            tokio::select! {
                _ = self.notify.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.cancelled() => return,
            }
            match self.send_all(&api).await {
                Ok(()) => delay.reset(),
                Err(e) => {
                    tracing::debug!(error = %e, queued = self.len(), "pod status not sent yet");
                    tokio::select! {
                        _ = tokio::time::sleep(delay.next(None)) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }

    /// Try to send everything queued once; stops at the first retryable failure.
    pub(crate) async fn send_all(&self, api: &Api) -> Result<(), ApiError> {
        let batch: Vec<(String, Pending)> = self
            .pending
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (uid, p) in batch {
            match send(api, &uid, &p).await {
                Ok(()) => {}
                Err(e) if e.is_retryable() => return Err(e),
                Err(e) => {
                    if !e.is_not_found() {
                        tracing::warn!(pod = %p.name, error = %e, "pod status rejected; dropping it");
                    }
                }
            }
            let mut q = self.pending.lock().unwrap();
            if q.get(&uid) == Some(&p) {
                q.remove(&uid);
            }
        }
        Ok(())
    }
}

async fn send(api: &Api, uid: &str, p: &Pending) -> Result<(), ApiError> {
    let path = format!("/api/v1/namespaces/{}/pods/{}", p.namespace, p.name);
    let cur: Pod = api.get(&path).await?;
    if cur.metadata.uid.as_deref() != Some(uid) {
        return Ok(()); // a new pod with the same name: not ours to update
    }
    let body = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": p.name,
            "namespace": p.namespace,
            "resourceVersion": cur.metadata.resource_version,
        },
        "status": p.status,
    });
    let _: serde_json::Value = api.put(&format!("{path}/status"), &body).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_wins_per_pod() {
        let s = StatusSync::new();
        let st = |phase: &str| PodStatus {
            phase: Some(phase.into()),
            ..Default::default()
        };
        s.set("u1", "default", "a", st("Pending"));
        s.set("u1", "default", "a", st("Running"));
        s.set("u2", "default", "b", st("Running"));
        assert_eq!(s.len(), 2);
        assert_eq!(
            s.pending.lock().unwrap()["u1"].status.phase.as_deref(),
            Some("Running")
        );
        s.forget("u2");
        assert_eq!(s.len(), 1);
    }
}
