//! Who may use the worker's endpoint (kubelet-style delegated authorization):
//! - container logs: masters only (their certificates, group `ballast:masters`): a master
//!   proxies `kubectl logs` after the API authorized the user;
//! - `/metrics`: masters and `system:masters` at once; any other client certificate or
//!   bearer token is asked of the API (TokenReview, then a SubjectAccessReview for `get`
//!   on the non-resource URL `/metrics`), and the answer is cached for a minute;
//! - `/livez`, `/healthz`: anyone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap, StatusCode};
use ballast_config::listener::PeerInfo;
use ballast_config::pki;
use ballast_config::tls::Identity;
use serde_json::{json, Value};

use crate::api::Api;

/// How long the API's answer about a client counts.
const CACHE_FOR: Duration = Duration::from_secs(60);
/// At most this many cached answers (a scraper or two is the normal case).
const CACHE_MAX: usize = 1024;

/// The answer to a request for an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Allow,
    /// No credentials (401).
    Unauthenticated,
    /// Known, not allowed (403).
    Forbidden,
    /// The API could not be asked (503; try again).
    Unavailable,
}

impl Verdict {
    pub(crate) fn refusal(self) -> Option<(StatusCode, &'static str)> {
        match self {
            Verdict::Allow => None,
            Verdict::Unauthenticated => Some((StatusCode::UNAUTHORIZED, "Unauthorized\n")),
            Verdict::Forbidden => Some((StatusCode::FORBIDDEN, "Forbidden\n")),
            Verdict::Unavailable => Some((
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot check the client's permissions with the API now\n",
            )),
        }
    }
}

/// Decides access to the worker's endpoints.
pub(crate) struct Access {
    api: Arc<Api>,
    cache: Mutex<HashMap<String, (Instant, bool)>>,
}

fn trusted(id: &Identity) -> bool {
    id.in_group(pki::MASTERS_GROUP) || id.in_group(pki::SUPERUSER_GROUP)
}

impl Access {
    pub(crate) fn new(api: Arc<Api>) -> Self {
        Self {
            api,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Container logs: a master's certificate.
    pub(crate) fn logs(&self, peer: &PeerInfo) -> Verdict {
        match &peer.identity {
            None => Verdict::Unauthenticated,
            Some(id) if id.in_group(pki::MASTERS_GROUP) => Verdict::Allow,
            Some(_) => Verdict::Forbidden,
        }
    }

    /// `/metrics`: see the module docs.
    pub(crate) async fn metrics(&self, peer: &PeerInfo, headers: &HeaderMap) -> Verdict {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let key = match (&peer.identity, token) {
            (Some(id), _) if trusted(id) => return Verdict::Allow,
            (Some(id), _) => format!("cert:{}:{}", id.user, id.groups.join(",")),
            (None, Some(t)) => format!("token:{t}"),
            (None, None) => return Verdict::Unauthenticated,
        };
        if let Some((at, allowed)) = self.cache.lock().expect("access cache").get(&key) {
            if at.elapsed() < CACHE_FOR {
                return if *allowed {
                    Verdict::Allow
                } else {
                    Verdict::Forbidden
                };
            }
        }
        let user = match (&peer.identity, token) {
            (Some(id), _) => Some((**id).clone()),
            (None, Some(t)) => match self.token_review(t).await {
                Ok(u) => u,
                Err(()) => return Verdict::Unavailable,
            },
            (None, None) => None,
        };
        let allowed = match user {
            None => false,
            Some(u) => match self.access_review(&u, "/metrics").await {
                Ok(a) => a,
                Err(()) => return Verdict::Unavailable,
            },
        };
        let mut cache = self.cache.lock().expect("access cache");
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, (at, _)| at.elapsed() < CACHE_FOR);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(key, (Instant::now(), allowed));
        if allowed {
            Verdict::Allow
        } else {
            Verdict::Forbidden
        }
    }

    async fn token_review(&self, token: &str) -> Result<Option<Identity>, ()> {
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token},
        });
        let v: Value = self
            .api
            .post("/apis/authentication.k8s.io/v1/tokenreviews", &body)
            .await
            .map_err(|e| tracing::warn!(error = %e, "TokenReview failed"))?;
        if v.pointer("/status/authenticated") != Some(&Value::Bool(true)) {
            return Ok(None);
        }
        let user = v
            .pointer("/status/user/username")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let groups = v
            .pointer("/status/user/groups")
            .and_then(Value::as_array)
            .map(|g| {
                g.iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        Ok(Some(Identity { user, groups }))
    }

    async fn access_review(&self, user: &Identity, path: &str) -> Result<bool, ()> {
        let body = json!({
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": user.user,
                "groups": user.groups,
                "nonResourceAttributes": {"path": path, "verb": "get"},
            },
        });
        let v: Value = self
            .api
            .post("/apis/authorization.k8s.io/v1/subjectaccessreviews", &body)
            .await
            .map_err(|e| tracing::warn!(error = %e, "SubjectAccessReview failed"))?;
        Ok(v.pointer("/status/allowed") == Some(&Value::Bool(true)))
    }
}
