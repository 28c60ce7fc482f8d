//! `pods/{name}/log`: proxy to the worker's kubelet-style endpoint
//! `http://{InternalIP}:{daemonEndpoints.kubeletEndpoint.Port}/containerLogs/{ns}/{pod}/{container}`.

use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use serde_json::Value;

use super::error::ApiError;
use super::{LogRequest, PodLogs};

/// The default [`PodLogs`]: streams the worker's answer through.
#[derive(Clone)]
pub struct KubeletLogProxy {
    http: reqwest::Client,
}

impl Default for KubeletLogProxy {
    fn default() -> Self {
        Self::new()
    }
}

impl KubeletLogProxy {
    pub fn new() -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .build()
            .unwrap_or_default();
        Self { http }
    }
}

/// The URL of a container's logs on its node, from the Node object.
pub fn container_logs_url(node: &Value, req: &LogRequest) -> Option<String> {
    let addrs = node.pointer("/status/addresses")?.as_array()?;
    let pick = |ty: &str| {
        addrs
            .iter()
            .find(|a| a["type"] == ty)
            .and_then(|a| a["address"].as_str())
    };
    let addr = pick("InternalIP").or_else(|| pick("Hostname"))?;
    let port = node
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_u64)
        .unwrap_or(10250);
    let mut q = Vec::new();
    if req.follow {
        q.push("follow=true".to_string());
    }
    if let Some(t) = req.tail_lines {
        q.push(format!("tailLines={t}"));
    }
    if req.previous {
        q.push("previous=true".to_string());
    }
    if req.timestamps {
        q.push("timestamps=true".to_string());
    }
    if let Some(s) = req.since_seconds {
        q.push(format!("sinceSeconds={s}"));
    }
    let mut url = format!(
        "http://{addr}:{port}/containerLogs/{}/{}/{}",
        req.namespace, req.pod, req.container
    );
    if !q.is_empty() {
        url.push('?');
        url.push_str(&q.join("&"));
    }
    Some(url)
}

#[async_trait]
impl PodLogs for KubeletLogProxy {
    async fn logs(&self, req: LogRequest) -> Result<Response, ApiError> {
        let node = req.node.as_ref().ok_or_else(|| ApiError::NotFound {
            group: String::new(),
            resource: "nodes".into(),
            name: req.node_name.clone(),
        })?;
        let url = container_logs_url(node, &req).ok_or_else(|| {
            ApiError::Unavailable(format!("node {} has no address", req.node_name))
        })?;
        let resp = self.http.get(&url).send().await.map_err(|e| {
            ApiError::Unavailable(format!("cannot reach node {}: {e}", req.node_name))
        })?;
        let code = resp.status();
        if !code.is_success() {
            let text = resp.text().await.unwrap_or_default();
            let msg = text.trim().to_string();
            return Err(if code.is_client_error() {
                ApiError::BadRequest(msg)
            } else {
                ApiError::Internal(msg)
            });
        }
        let stream = futures::stream::unfold(resp, |mut r| async move {
            match r.chunk().await {
                Ok(Some(c)) => Some((Ok::<_, std::io::Error>(c), r)),
                _ => None,
            }
        });
        let mut out = Response::new(Body::from_stream(stream));
        *out.status_mut() = StatusCode::OK;
        out.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn url_from_node() {
        let node = json!({"status": {"addresses": [{"type": "InternalIP", "address": "127.0.2.1"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}}}});
        let req = LogRequest {
            namespace: "default".into(),
            pod: "p".into(),
            container: "c".into(),
            node_name: "w1".into(),
            node: None,
            follow: true,
            tail_lines: Some(5),
            previous: false,
            timestamps: false,
            since_seconds: None,
        };
        assert_eq!(
            container_logs_url(&node, &req).unwrap(),
            "http://127.0.2.1:10250/containerLogs/default/p/c?follow=true&tailLines=5"
        );
    }
}
