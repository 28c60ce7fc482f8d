//! The review resources: create-only, never stored. `kubectl auth can-i` sends a
//! SelfSubjectAccessReview, `kubectl auth whoami` a SelfSubjectReview; a worker checking
//! who scrapes its `/metrics` sends a TokenReview and a SubjectAccessReview.

use ballast_config::tls::Identity;
use serde_json::{json, Value};

use super::attributes::Attributes;
use super::authn::{Authenticator, AuthnError, AUTHENTICATED};
use super::authorizer::Authorizer;
use crate::api::resources::ResourceDef;
use crate::api::ApiError;

/// Which review a create is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Review {
    SelfSubjectAccess,
    SubjectAccess,
    Token,
    SelfSubject,
}

impl Review {
    pub(crate) fn of(def: &ResourceDef) -> Option<Self> {
        match (def.group, def.kind) {
            ("authorization.k8s.io", "SelfSubjectAccessReview") => Some(Self::SelfSubjectAccess),
            ("authorization.k8s.io", "SubjectAccessReview") => Some(Self::SubjectAccess),
            ("authentication.k8s.io", "TokenReview") => Some(Self::Token),
            ("authentication.k8s.io", "SelfSubjectReview") => Some(Self::SelfSubject),
            _ => None,
        }
    }
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// The attributes of a review's `spec` (`resourceAttributes` or `nonResourceAttributes`).
fn attributes(spec: &Value) -> Result<Attributes, ApiError> {
    if let Some(r) = spec.get("resourceAttributes") {
        return Ok(Attributes::Resource {
            verb: s(r, "verb").into(),
            api_group: s(r, "group").into(),
            resource: s(r, "resource").into(),
            subresource: s(r, "subresource").into(),
            namespace: s(r, "namespace").into(),
            name: s(r, "name").into(),
            field_selector: r
                .pointer("/fieldSelector/rawSelector")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .into(),
        });
    }
    if let Some(n) = spec.get("nonResourceAttributes") {
        return Ok(Attributes::non_resource(s(n, "verb"), s(n, "path")));
    }
    Err(ApiError::BadRequest(
        "spec: exactly one of resourceAttributes or nonResourceAttributes is required".into(),
    ))
}

fn user_info(id: &Identity) -> Value {
    json!({"username": id.user, "groups": id.groups})
}

/// Answer a review create by `user`: the request body with `status` filled in.
pub(crate) async fn review(
    kind: Review,
    user: &Identity,
    mut body: Value,
    authn: &Authenticator,
    authz: &Authorizer,
) -> Result<Value, ApiError> {
    if !body.is_object() {
        return Err(ApiError::BadRequest(
            "the body must be a JSON object".into(),
        ));
    }
    let spec = body.get("spec").cloned().unwrap_or(json!({}));
    let status = match kind {
        Review::SelfSubjectAccess | Review::SubjectAccess => {
            let subject = if kind == Review::SelfSubjectAccess {
                user.clone()
            } else {
                let name = s(&spec, "user");
                if name.is_empty() {
                    return Err(ApiError::BadRequest("spec.user is required".into()));
                }
                Identity {
                    user: name.into(),
                    groups: spec
                        .get("groups")
                        .and_then(Value::as_array)
                        .map(|g| {
                            g.iter()
                                .filter_map(Value::as_str)
                                .map(String::from)
                                .collect()
                        })
                        .unwrap_or_default(),
                }
            };
            let d = authz.authorize(&subject, &attributes(&spec)?).await?;
            let mut st = json!({"allowed": d.allowed});
            if !d.reason.is_empty() {
                st["reason"] = json!(d.reason);
            }
            st
        }
        Review::Token => {
            let token = s(&spec, "token");
            let mut headers = axum::http::HeaderMap::new();
            if let Ok(v) = format!("Bearer {token}").parse() {
                headers.insert(axum::http::header::AUTHORIZATION, v);
            }
            let anonymous = ballast_config::listener::PeerInfo {
                addr: ([0, 0, 0, 0], 0).into(),
                identity: None,
            };
            match authn.authenticate(&anonymous, &headers) {
                Ok(Some(id)) => json!({"authenticated": true, "user": user_info(&id)}),
                Ok(None) | Err(AuthnError::InvalidToken | AuthnError::MalformedAuthorization) => {
                    json!({"authenticated": false, "error": "invalid bearer token"})
                }
                Err(e) => json!({"authenticated": false, "error": e.to_string()}),
            }
        }
        Review::SelfSubject => {
            let mut id = user.clone();
            if !id.in_group(AUTHENTICATED) {
                id.groups.push(AUTHENTICATED.into());
            }
            json!({"userInfo": user_info(&id)})
        }
    };
    body["status"] = status;
    let meta = body
        .as_object_mut()
        .expect("checked above")
        .entry("metadata")
        .or_insert(json!({}));
    if let Some(m) = meta.as_object_mut() {
        m.insert("creationTimestamp".into(), Value::Null);
    }
    Ok(body)
}
