//! The wall clock as Kubernetes writes it: timestamps in whole seconds, RFC 3339 with `Z`.
//! (Fencing and leases never read it: they use monotonic clocks.)

use k8s_openapi::jiff::Timestamp;

/// The current time, whole seconds (Kubernetes timestamps have second precision).
pub(crate) fn now() -> Timestamp {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Timestamp::from_second(i64::try_from(secs).unwrap_or(0)).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// The current time as Kubernetes formats it (RFC 3339, seconds, `Z`).
pub(crate) fn now_rfc3339() -> String {
    now().to_string()
}

/// `secs` from now, formatted like [`now_rfc3339`].
pub(crate) fn rfc3339_after(secs: i64) -> String {
    let t = now();
    Timestamp::from_second(t.as_second().saturating_add(secs))
        .unwrap_or(t)
        .to_string()
}
