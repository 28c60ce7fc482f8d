//! List continue tokens: the last returned key, opaque to clients.

use super::*;

/// Continue tokens: the last returned key, opaque to clients.
pub(super) fn encode_continue(key: &str, rev: u64) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"k": key, "rv": rev}).to_string())
}

pub(crate) fn decode_continue(token: &str) -> Result<String, ApiError> {
    let bad = || ApiError::BadRequest("invalid continue token".into());
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    v["k"].as_str().map(String::from).ok_or_else(bad)
}
