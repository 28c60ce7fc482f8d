//! Events the active master's own components record about objects (the scheduler's
//! `Scheduled` / `FailedScheduling`, node lifecycle's evictions), written through the
//! registry like a client's. A failed write is logged and dropped: an Event is a hint
//! for people, and nothing reads it back.

use serde_json::json;

use super::registry::Registry;
use super::resources::ResourceDef;
use crate::controllers::random_name;

/// Which component reports (`source.component`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Source {
    Scheduler,
    ControllerManager,
}

impl Source {
    fn component(self) -> &'static str {
        match self {
            Source::Scheduler => "default-scheduler",
            Source::ControllerManager => "ballast-controller-manager",
        }
    }
}

/// `Normal` or `Warning`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Severity {
    Normal,
    Warning,
}

/// The object an Event is about (a namespaced core/v1 object).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Involved<'a> {
    pub(crate) kind: &'static str,
    pub(crate) namespace: &'a str,
    pub(crate) name: &'a str,
    pub(crate) uid: Option<&'a str>,
}

/// Record one Event.
pub(crate) async fn record(
    reg: &Registry,
    source: Source,
    about: Involved<'_>,
    severity: Severity,
    reason: &str,
    message: &str,
) {
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(crate::clock::now());
    let ns = about.namespace;
    let v = json!({
        "metadata": {"name": random_name(&format!("{}.", about.name)), "namespace": ns},
        "involvedObject": {"kind": about.kind, "name": about.name, "namespace": ns,
            "apiVersion": "v1", "uid": about.uid},
        "reason": reason,
        "message": message,
        "type": match severity { Severity::Normal => "Normal", Severity::Warning => "Warning" },
        "source": {"component": source.component()},
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    });
    let events = ResourceDef::find("", "events").expect("built-in resource");
    if let Err(e) = reg.create(events, Some(ns), v, false).await {
        tracing::debug!(reason, object = about.name, "cannot record event: {e}");
    }
}
