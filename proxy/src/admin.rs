//! The admin endpoint: `/metrics`, `/status`, `/livez`, `/readyz`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::health::Routing;
use crate::state::Shared;

/// The `/status` document.
#[derive(Debug, Serialize, PartialEq)]
pub(crate) struct Status {
    /// The answering proxy's id.
    pub id: String,
    /// Whether it holds the VIP (absent without a `[vip]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vip_holder: Option<bool>,
    pub active: Option<String>,
    pub masters: Vec<StatusMaster>,
    pub failovers: u64,
    /// Requests waiting for an active master now.
    pub held: usize,
}

#[derive(Debug, Serialize, PartialEq)]
pub(crate) struct StatusMaster {
    pub id: String,
    pub address: String,
    pub healthy: bool,
    pub active: bool,
    pub term: Option<u64>,
}

impl Status {
    pub(crate) fn new(id: &str, r: &Routing, held: usize, vip_holder: Option<bool>) -> Self {
        Self {
            id: id.to_string(),
            vip_holder,
            active: r.active.as_ref().map(|a| a.id.clone()),
            masters: r
                .masters
                .iter()
                .map(|m| StatusMaster {
                    id: m.id.clone(),
                    address: m.addr.to_string(),
                    healthy: m.healthy,
                    active: m.active,
                    term: m.term,
                })
                .collect(),
            failovers: r.failovers,
            held,
        }
    }
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

async fn readyz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    if s.current().active.is_some() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no active master\n")
    }
}

async fn status(State(s): State<Arc<Shared>>) -> Json<Status> {
    let settings = s.settings();
    let vip_holder = settings
        .vip
        .as_ref()
        .map(|_| s.metrics.vip_holder.get() == 1);
    Json(Status::new(
        &settings.proxy.id,
        &s.current(),
        s.held(),
        vip_holder,
    ))
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{ActiveMaster, MasterView};

    #[test]
    fn status_json_has_the_contract_shape() {
        let r = Routing {
            active: Some(ActiveMaster {
                id: "m1".into(),
                addr: "127.0.1.1:6443".parse().unwrap(),
                term: 7,
            }),
            masters: vec![MasterView {
                id: "m1".into(),
                addr: "127.0.1.1:6443".parse().unwrap(),
                healthy: true,
                active: true,
                term: Some(7),
            }],
            failovers: 0,
        };
        let v = serde_json::to_value(Status::new("proxy", &r, 0, None)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id":"proxy","active":"m1","masters":[{"id":"m1","address":"127.0.1.1:6443",
                "healthy":true,"active":true,"term":7}],"failovers":0,"held":0})
        );
        let v = serde_json::to_value(Status::new("p2", &r, 0, Some(true))).unwrap();
        assert_eq!(v["vip_holder"], true);
    }
}
