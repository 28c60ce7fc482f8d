//! Authentication: who sent a request, from its connection and headers.
//!
//! In order (the first that applies decides, as kube-apiserver's union authenticator):
//! 1. **request header**: on a connection authenticated with a proxy's certificate
//!    (group `ballast:proxies`), `X-Remote-User` and every `X-Remote-Group` name the user
//!    the proxy verified. From any other connection these headers are ignored (and
//!    stripped before the request goes on);
//! 2. **x509**: the connection's verified client certificate (user = CN, groups = O);
//! 3. **bearer token**: `Authorization: Bearer T` looked up in the token file; an unknown
//!    token is refused (401), never treated as anonymous;
//! 4. otherwise the request is anonymous.
//!
//! A proxy's own certificate never becomes the user: a request it forwards without
//! `X-Remote-User` is judged by its token, or is anonymous.

use axum::http::{header, HeaderMap};
use ballast_config::listener::PeerInfo;
use ballast_config::pki;
use ballast_config::tls::Identity;

use super::tokens::TokenFile;

/// The request headers a trusted proxy sets (kube-apiserver's request-header names).
pub(crate) const REMOTE_USER: &str = "x-remote-user";
pub(crate) const REMOTE_GROUP: &str = "x-remote-group";
/// Kube's `X-Remote-Extra-*` prefix: stripped like the others (no extras are used).
const REMOTE_EXTRA_PREFIX: &str = "x-remote-extra-";

/// Every authenticated user is in this group.
pub(crate) const AUTHENTICATED: &str = "system:authenticated";
/// The anonymous user and its group.
pub(crate) const ANONYMOUS_USER: &str = "system:anonymous";
pub(crate) const UNAUTHENTICATED: &str = "system:unauthenticated";

/// Why a request's credentials were refused (401). A retry with the same credentials
/// never helps.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthnError {
    #[error("invalid bearer token")]
    InvalidToken,
    #[error("malformed Authorization header")]
    MalformedAuthorization,
    #[error("X-Remote-User is not valid UTF-8")]
    MalformedRemoteUser,
}

/// Authenticates requests (see the module docs).
#[derive(Debug, Default)]
pub struct Authenticator {
    tokens: TokenFile,
}

impl Authenticator {
    pub fn new(tokens: TokenFile) -> Self {
        Self { tokens }
    }

    /// The user of a request, `Ok(None)` when anonymous. Does not look at the path:
    /// which paths anonymous users may reach is the caller's rule.
    pub fn authenticate(
        &self,
        peer: &PeerInfo,
        headers: &HeaderMap,
    ) -> Result<Option<Identity>, AuthnError> {
        let cert = peer.identity.as_deref();
        if let Some(proxy) = cert.filter(|i| i.in_group(pki::PROXIES_GROUP)) {
            if let Some(user) = headers.get(REMOTE_USER) {
                let user = user
                    .to_str()
                    .map_err(|_| AuthnError::MalformedRemoteUser)?
                    .trim();
                if !user.is_empty() {
                    let groups = headers
                        .get_all(REMOTE_GROUP)
                        .iter()
                        .filter_map(|g| g.to_str().ok())
                        .map(|g| g.trim().to_string())
                        .filter(|g| !g.is_empty())
                        .collect();
                    tracing::trace!(proxy = %proxy.user, user, "identity forwarded by the proxy");
                    return Ok(Some(authenticated(Identity {
                        user: user.to_string(),
                        groups,
                    })));
                }
            }
        } else if let Some(id) = cert {
            return Ok(Some(authenticated(id.clone())));
        }
        match headers.get(header::AUTHORIZATION) {
            None => Ok(None),
            Some(v) => {
                let v = v.to_str().map_err(|_| AuthnError::MalformedAuthorization)?;
                let (scheme, token) = v
                    .split_once(' ')
                    .ok_or(AuthnError::MalformedAuthorization)?;
                if !scheme.eq_ignore_ascii_case("bearer") {
                    return Err(AuthnError::MalformedAuthorization);
                }
                self.tokens
                    .lookup(token.trim())
                    .map(|id| Some(authenticated(id.clone())))
                    .ok_or(AuthnError::InvalidToken)
            }
        }
    }
}

/// Remove the request-header identity headers (after authentication, and always from
/// connections that may not set them).
pub(crate) fn strip_remote_headers(headers: &mut HeaderMap) {
    headers.remove(REMOTE_USER);
    headers.remove(REMOTE_GROUP);
    let extras: Vec<_> = headers
        .keys()
        .filter(|k| k.as_str().starts_with(REMOTE_EXTRA_PREFIX))
        .cloned()
        .collect();
    for k in extras {
        headers.remove(k);
    }
}

fn authenticated(mut id: Identity) -> Identity {
    if !id.in_group(AUTHENTICATED) {
        id.groups.push(AUTHENTICATED.into());
    }
    id
}

/// The identity of an anonymous request.
pub(crate) fn anonymous() -> Identity {
    Identity {
        user: ANONYMOUS_USER.into(),
        groups: vec![UNAUTHENTICATED.into()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn peer(identity: Option<(&str, &[&str])>) -> PeerInfo {
        PeerInfo {
            addr: "127.0.0.1:1".parse().unwrap(),
            identity: identity.map(|(u, g)| {
                Arc::new(Identity {
                    user: u.into(),
                    groups: g.iter().map(|s| s.to_string()).collect(),
                })
            }),
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    fn authn() -> Authenticator {
        Authenticator::new(TokenFile::parse("sekret,alice,1,\"dev\"\n").unwrap())
    }

    #[test]
    fn remote_user_headers_count_only_from_a_proxy() {
        let h = headers(&[
            (REMOTE_USER, "bob"),
            (REMOTE_GROUP, "system:masters"),
            (REMOTE_GROUP, "ops"),
        ]);
        let proxy = peer(Some(("proxy:proxy", &[pki::PROXIES_GROUP])));
        let got = authn().authenticate(&proxy, &h).unwrap().unwrap();
        assert_eq!(got.user, "bob");
        assert_eq!(got.groups, ["system:masters", "ops", AUTHENTICATED]);

        // a worker's certificate cannot claim to be someone else
        let worker = peer(Some(("system:node:w1", &[pki::NODES_GROUP])));
        let got = authn().authenticate(&worker, &h).unwrap().unwrap();
        assert_eq!(got.user, "system:node:w1");
        // nor can an anonymous client
        assert_eq!(authn().authenticate(&peer(None), &h).unwrap(), None);
    }

    #[test]
    fn a_proxy_without_remote_user_is_not_a_user() {
        let proxy = peer(Some(("proxy:proxy", &[pki::PROXIES_GROUP])));
        assert_eq!(
            authn().authenticate(&proxy, &HeaderMap::new()).unwrap(),
            None
        );
        let h = headers(&[("authorization", "Bearer sekret")]);
        let got = authn().authenticate(&proxy, &h).unwrap().unwrap();
        assert_eq!(got.user, "alice");
    }

    #[test]
    fn tokens_are_checked() {
        let anon = peer(None);
        let ok = headers(&[("authorization", "Bearer sekret")]);
        assert_eq!(
            authn().authenticate(&anon, &ok).unwrap().unwrap().groups,
            ["dev", AUTHENTICATED]
        );
        let bad = headers(&[("authorization", "Bearer nope")]);
        assert_eq!(
            authn().authenticate(&anon, &bad),
            Err(AuthnError::InvalidToken)
        );
        let basic = headers(&[("authorization", "Basic YTpi")]);
        assert_eq!(
            authn().authenticate(&anon, &basic),
            Err(AuthnError::MalformedAuthorization)
        );
    }

    #[test]
    fn stripping_removes_every_remote_header() {
        let mut h = headers(&[
            (REMOTE_USER, "x"),
            (REMOTE_GROUP, "y"),
            ("x-remote-extra-scopes", "z"),
            ("accept", "application/json"),
        ]);
        strip_remote_headers(&mut h);
        assert_eq!(h.len(), 1);
    }
}
