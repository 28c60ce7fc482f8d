//! API errors and their Kubernetes `Status` form.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::store::StoreError;

/// One field-level cause of a 422 `Invalid` error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    /// `FieldValueRequired`, `FieldValueInvalid`, `FieldValueDuplicate`, `FieldValueForbidden`, ...
    pub reason: &'static str,
    /// Human text, e.g. `Required value`.
    pub message: String,
    /// Field path, e.g. `spec.containers[0].image`.
    pub field: String,
}

impl Cause {
    pub fn required(field: impl Into<String>) -> Self {
        Self {
            reason: "FieldValueRequired",
            message: "Required value".into(),
            field: field.into(),
        }
    }
    pub fn invalid(field: impl Into<String>, value: impl std::fmt::Display, why: &str) -> Self {
        Self {
            reason: "FieldValueInvalid",
            message: format!("Invalid value: \"{value}\": {why}"),
            field: field.into(),
        }
    }
    pub fn duplicate(field: impl Into<String>, value: impl std::fmt::Display) -> Self {
        Self {
            reason: "FieldValueDuplicate",
            message: format!("Duplicate value: \"{value}\""),
            field: field.into(),
        }
    }
    pub fn forbidden(field: impl Into<String>, why: impl Into<String>) -> Self {
        Self {
            reason: "FieldValueForbidden",
            message: format!("Forbidden: {}", why.into()),
            field: field.into(),
        }
    }
}

/// Errors of the Kubernetes-compatible API. Each maps to an HTTP code and a `Status` reason.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    /// 413: a request, or the object it would make, is larger than a limit.
    #[error("{0}")]
    TooLarge(String),
    /// 401: no credentials where they are needed, or credentials that do not check out.
    #[error("Unauthorized")]
    Unauthorized,
    /// `resource` is the qualified plural (`deployments.apps`, `pods`).
    #[error("{resource} \"{name}\" not found")]
    NotFound {
        group: String,
        resource: String,
        name: String,
    },
    #[error("the server could not find the requested resource")]
    NoRoute,
    #[error("{resource} \"{name}\" already exists")]
    AlreadyExists {
        group: String,
        resource: String,
        name: String,
    },
    #[error("Operation cannot be fulfilled on {resource} \"{name}\": {message}")]
    Conflict {
        group: String,
        resource: String,
        name: String,
        message: String,
    },
    /// `kind` is qualified like Kubernetes prints it: `Pod`, `Deployment.apps`.
    #[error("{kind} \"{name}\" is invalid: {}", causes_text(.causes))]
    Invalid {
        group: String,
        kind: String,
        name: String,
        causes: Vec<Cause>,
    },
    #[error("{0}")]
    Gone(String),
    #[error("the server does not allow this method on the requested resource")]
    MethodNotAllowed,
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    NotAcceptable(String),
    /// 503 with `Retry-After: 1`.
    #[error("{0}")]
    Unavailable(String),
    /// 503 with `Retry-After: 1`: the store refused a write for not being active (see
    /// `store::unacted`).
    #[error("{0}")]
    NotActive(String),
    /// 429 with `Retry-After: 1`: the client has too many requests in flight.
    #[error("{0}")]
    TooManyRequests(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Internal(String),
}

fn causes_text(causes: &[Cause]) -> String {
    let parts: Vec<String> = causes
        .iter()
        .map(|c| format!("{}: {}", c.field, c.message))
        .collect();
    if parts.len() == 1 {
        parts[0].clone()
    } else {
        format!("[{}]", parts.join(", "))
    }
}

impl ApiError {
    pub fn code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotFound { .. } | ApiError::NoRoute => StatusCode::NOT_FOUND,
            ApiError::AlreadyExists { .. } | ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            ApiError::Unavailable(_) | ApiError::NotActive(_) | ApiError::Timeout(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "BadRequest",
            ApiError::Forbidden(_) => "Forbidden",
            ApiError::Unauthorized => "Unauthorized",
            ApiError::TooLarge(_) => "RequestEntityTooLarge",
            ApiError::NotFound { .. } | ApiError::NoRoute => "NotFound",
            ApiError::AlreadyExists { .. } => "AlreadyExists",
            ApiError::Conflict { .. } => "Conflict",
            ApiError::Invalid { .. } => "Invalid",
            ApiError::Gone(_) => "Expired",
            ApiError::MethodNotAllowed => "MethodNotAllowed",
            ApiError::UnsupportedMediaType(_) => "UnsupportedMediaType",
            ApiError::NotAcceptable(_) => "NotAcceptable",
            ApiError::Unavailable(_) | ApiError::NotActive(_) => "ServiceUnavailable",
            ApiError::Timeout(_) => "Timeout",
            ApiError::TooManyRequests(_) => "TooManyRequests",
            ApiError::Internal(_) => "InternalError",
        }
    }

    /// Whether this is a 404 of an object.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ApiError::NotFound { .. })
    }

    /// Whether this is a 409 (already exists or stale resourceVersion).
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            ApiError::Conflict { .. } | ApiError::AlreadyExists { .. }
        )
    }

    /// The `Status` object (kind Status, apiVersion v1).
    pub fn status(&self) -> Value {
        let mut st = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.code().as_u16(),
        });
        let details = match self {
            ApiError::NotFound {
                group,
                resource,
                name,
            }
            | ApiError::AlreadyExists {
                group,
                resource,
                name,
            }
            | ApiError::Conflict {
                group,
                resource,
                name,
                ..
            } => Some(json!({
                "name": name,
                "group": group,
                "kind": resource.split('.').next().unwrap_or(resource),
            })),
            ApiError::Invalid {
                group,
                kind,
                name,
                causes,
            } => Some(json!({
                "name": name,
                "group": group,
                "kind": kind.split('.').next().unwrap_or(kind),
                "causes": causes.iter().map(|c| json!({
                    "reason": c.reason, "message": c.message, "field": c.field,
                })).collect::<Vec<_>>(),
            })),
            ApiError::Unavailable(_)
            | ApiError::NotActive(_)
            | ApiError::Timeout(_)
            | ApiError::TooManyRequests(_) => Some(json!({"retryAfterSeconds": 1})),
            _ => None,
        };
        if let Some(d) = details {
            st["details"] = d;
        }
        st
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotActive { .. } => ApiError::NotActive(e.to_string()),
            StoreError::Timeout => ApiError::Timeout(e.to_string()),
            StoreError::Compacted { requested, oldest } => {
                ApiError::Gone(format!("too old resource version: {requested} ({oldest})"))
            }
            StoreError::Fatal(m) => ApiError::Internal(m),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let refusal = matches!(self, ApiError::NotActive(_));
        let code = self.code();
        let body = serde_json::to_vec(&self.status()).unwrap_or_default();
        let mut resp = (code, body).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if code == StatusCode::SERVICE_UNAVAILABLE || code == StatusCode::TOO_MANY_REQUESTS {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if refusal {
            resp.extensions_mut()
                .insert(crate::store::unacted::NotActiveRefusal);
        }
        resp
    }
}

/// A success `Status` (used by DELETE of collections and by `binding`).
pub(crate) fn success_status(code: u16) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": code})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_status_lists_causes() {
        let e = ApiError::Invalid {
            group: "apps".into(),
            kind: "Deployment.apps".into(),
            name: "web".into(),
            causes: vec![Cause::required("spec.template.spec.containers[0].image")],
        };
        let st = e.status();
        assert_eq!(st["code"], 422);
        assert_eq!(st["reason"], "Invalid");
        assert_eq!(
            st["message"],
            "Deployment.apps \"web\" is invalid: spec.template.spec.containers[0].image: Required value"
        );
        assert_eq!(
            st["details"]["causes"][0]["field"],
            "spec.template.spec.containers[0].image"
        );
        assert_eq!(st["details"]["kind"], "Deployment");
    }

    #[test]
    fn store_errors_map() {
        let e: ApiError = StoreError::NotActive {
            leader: Some("m2".into()),
        }
        .into();
        assert_eq!(e.code(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(e.to_string().contains("m2"));
        let e: ApiError = StoreError::Compacted {
            requested: 3,
            oldest: 9,
        }
        .into();
        assert_eq!(e.code(), StatusCode::GONE);
        assert_eq!(e.reason(), "Expired");
    }
}
