//! `pods/{name}/log`: proxied to the worker that runs the pod, at
//! `https://{address}/containerLogs/{ns}/{pod}/{container}` over mutual TLS (the worker
//! serves logs to masters' certificates only).
//!
//! The address is the worker's from the cluster config, never one read from a Node
//! object: anyone allowed to write a Node could otherwise make the master dial an address
//! of their choosing and read the answer (server-side request forgery). The worker's
//! certificate must be valid for that address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use ballast_config::tls::{NodeTls, TlsError};
use ballast_config::ClusterConfig;

use super::error::ApiError;
use super::{LogRequest, PodLogs};

/// The default [`PodLogs`]: streams the worker's answer through.
#[derive(Clone)]
pub(crate) struct KubeletLogProxy {
    http: reqwest::Client,
    /// Worker id (the Node's name) → its address, from the config.
    workers: HashMap<String, SocketAddr>,
}

impl KubeletLogProxy {
    /// A client presenting this master's certificate to the config's workers.
    /// Fetches leave from `source` (the master's own address) when given.
    pub(crate) fn new(
        tls: &NodeTls,
        config: &ClusterConfig,
        source: Option<std::net::IpAddr>,
    ) -> Result<Self, TlsError> {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls.client_config()?)
            .no_proxy()
            .local_address(source)
            .connect_timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| TlsError::Verifier(format!("log client: {e}")))?;
        let workers = config
            .workers
            .iter()
            .map(|w| (w.id.clone(), w.address))
            .collect();
        Ok(Self { http, workers })
    }
}

/// The URL of a container's logs on the worker at `addr`.
pub(crate) fn container_logs_url(addr: SocketAddr, req: &LogRequest) -> String {
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
        "https://{addr}/containerLogs/{}/{}/{}",
        req.namespace, req.pod, req.container
    );
    if !q.is_empty() {
        url.push('?');
        url.push_str(&q.join("&"));
    }
    url
}

#[async_trait]
impl PodLogs for KubeletLogProxy {
    async fn logs(&self, req: LogRequest) -> Result<Response, ApiError> {
        let addr = self.workers.get(&req.node_name).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "node {} is not a worker of the cluster config: logs are fetched only from configured workers",
                req.node_name
            ))
        })?;
        let url = container_logs_url(*addr, &req);
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

    #[test]
    fn url_from_the_configured_address() {
        let req = LogRequest {
            namespace: "default".into(),
            pod: "p".into(),
            container: "c".into(),
            node_name: "w1".into(),
            follow: true,
            tail_lines: Some(5),
            previous: false,
            timestamps: false,
            since_seconds: None,
        };
        assert_eq!(
            container_logs_url("127.0.2.1:10250".parse().unwrap(), &req),
            "https://127.0.2.1:10250/containerLogs/default/p/c?follow=true&tailLines=5"
        );
    }
}
