//! Watches that outlive a change of active master. A client's watch through the proxy is
//! one HTTP response; when the master serving it stops being active (a handover, a crash,
//! a partition), the proxy opens the same watch at the new active master from the last
//! resourceVersion the client received, and goes on writing its events into the same
//! response. The client sees one stream with no gap and no repeat: kubectl `get -w`,
//! which ends when its stream ends, keeps running across a rolling restart.
//!
//! Only a watch that names where it starts (`resourceVersion` other than `""`/`"0"`) in
//! JSON is resumed: without one, the stream opens with the whole state as ADDED events in
//! key order, and a stream cut in the middle of those has no resourceVersion to go on
//! from; a protobuf stream would need its frames decoded. Both still pass through
//! pingora as before and are closed on failover (clients watch again).
//!
//! Events are read line by line (the API writes one JSON event per line); each event's
//! resourceVersion (its object's, or for a server-side Table the row's object's) is
//! remembered, BOOKMARKs included. An ERROR event (410 Gone) is passed on and ends the
//! stream, as the master would. The client's `timeoutSeconds` still ends it.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use serde::Deserialize;

use crate::state::Shared;

/// Whether `query` asks for a watch this module can resume, and from where.
pub(crate) fn resumable(query: Option<&str>, accept: Option<&str>) -> Option<String> {
    let query = query?;
    let mut watch = false;
    let mut rv = None;
    for kv in query.split('&') {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "watch" => watch = matches!(v, "true" | "1" | ""),
            "resourceVersion" => rv = Some(v.to_string()),
            _ => {}
        }
    }
    let json = accept.is_none_or(|a| !a.contains("protobuf"));
    rv.filter(|rv| watch && json && !rv.is_empty() && rv != "0")
}

/// The parts of a watch event this module reads.
#[derive(Deserialize)]
struct Event {
    #[serde(rename = "type")]
    kind: String,
    object: Object,
}

#[derive(Deserialize)]
struct Object {
    #[serde(default)]
    metadata: Option<Meta>,
    /// A server-side Table (kubectl get -w): its one row carries the object.
    #[serde(default)]
    rows: Option<Vec<Row>>,
}

#[derive(Deserialize)]
struct Row {
    object: Option<Object>,
}

#[derive(Deserialize)]
struct Meta {
    #[serde(rename = "resourceVersion")]
    resource_version: Option<String>,
}

/// What one event line means for resuming.
#[derive(Debug, PartialEq)]
pub(crate) enum Seen {
    /// The stream is now at this resourceVersion.
    At(String),
    /// An ERROR: the stream ends after it.
    End,
    /// Nothing to learn (unparsable, or no resourceVersion).
    Nothing,
}

pub(crate) fn seen(line: &[u8]) -> Seen {
    let Ok(ev) = serde_json::from_slice::<Event>(line) else {
        return Seen::Nothing;
    };
    if ev.kind == "ERROR" {
        return Seen::End;
    }
    let object = match ev.object.rows.as_ref().and_then(|r| r.first()) {
        Some(row) => row.object.as_ref(),
        None => Some(&ev.object),
    };
    object
        .and_then(|o| o.metadata.as_ref())
        .and_then(|m| m.resource_version.clone())
        .map_or(Seen::Nothing, Seen::At)
}

/// Table events as the rest of a stream has them: a stream's first Table event carries
/// the column definitions, and a resumed stream is no stream's start.
fn without_table_columns(events: Bytes) -> Bytes {
    const COLUMNS: &[u8] = b"\"columnDefinitions\":[{";
    if !events.windows(COLUMNS.len()).any(|w| w == COLUMNS) {
        return events;
    }
    let mut out = Vec::with_capacity(events.len());
    for line in events.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        match serde_json::from_slice::<serde_json::Value>(line) {
            Ok(mut ev) if ev["object"]["kind"] == "Table" => {
                ev["object"]["columnDefinitions"] = serde_json::json!([]);
                out.extend_from_slice(ev.to_string().as_bytes());
            }
            _ => out.extend_from_slice(line),
        }
        out.push(b'\n');
    }
    out.into()
}

/// `query` with its `resourceVersion` replaced by `rv`.
pub(crate) fn with_resource_version(query: &str, rv: &str) -> String {
    query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some(("resourceVersion", _)) => format!("resourceVersion={rv}"),
            _ => kv.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The client's `timeoutSeconds`, if any.
fn timeout_of(query: &str) -> Option<Duration> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == "timeoutSeconds").then(|| v.parse().ok().map(Duration::from_secs))?
    })
}

/// How one upstream watch ended.
enum Ended {
    /// Passed an ERROR on, or the client's timeout came: the response is complete.
    Done,
    /// The master's stream broke or ended: resume elsewhere.
    Broken,
    /// The client went away.
    ClientGone,
}

/// Serve the watch `path?query` for the client of `session` on the active master,
/// moving to the next active master each time the stream breaks. `headers` are the
/// request headers to send (identity headers already set).
pub(crate) async fn serve(
    session: &mut Session,
    shared: &Shared,
    client: &reqwest::Client,
    path: &str,
    query: &str,
    headers: reqwest::header::HeaderMap,
    mut rv: String,
) -> pingora::Result<()> {
    let hold = shared.settings().proxy.hold.timeout;
    let deadline = timeout_of(query).map(|t| tokio::time::Instant::now() + t);
    let mut started = false;
    loop {
        let active = match shared.wait_active(tokio::time::Instant::now() + hold).await {
            Ok(a) => a,
            Err(e) => {
                tracing::info!(error = %e, "watch not resumed: no active master");
                break;
            }
        };
        let url = format!(
            "https://{}{path}?{}",
            active.addr,
            with_resource_version(query, &rv)
        );
        let mut request = client.get(&url).headers(headers.clone());
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            request = request.timeout(left);
        }
        let mut resp = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(master = %active.id, error = %e, "watch: cannot reach the active master");
                shared.recheck.notify_waiters();
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if resp.status() == 503
            && resp
                .headers()
                .get("x-ballast-rejected")
                .is_some_and(|v| v == "not-active")
        {
            shared.recheck.notify_waiters();
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let started_before = started;
        if !started {
            started = true;
            let ok = resp.status().is_success();
            write_header(session, &resp).await?;
            if !ok {
                // an error answer (bad selector, 410 for a too old version): as is
                while let Some(chunk) = resp.chunk().await.ok().flatten() {
                    session.write_response_body(Some(chunk), false).await?;
                }
                break;
            }
        } else if !resp.status().is_success() {
            // e.g. 410: the version is gone from the new master's history; the client
            // must list again, which the end of its stream makes it do
            tracing::info!(status = %resp.status(), rv, "watch not resumed");
            break;
        } else {
            shared.metrics.watches_resumed.inc();
            tracing::info!(master = %active.id, rv, "watch resumed at the new active master");
        }
        let resumed = started_before;
        match pump(session, shared, &active.id, &mut resp, &mut rv, resumed).await {
            Ended::Done | Ended::ClientGone => break,
            Ended::Broken => {
                if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    break;
                }
                shared.recheck.notify_waiters();
            }
        }
    }
    if !started {
        let body = crate::proxy::status_body(503, "ServiceUnavailable", "no active master");
        let mut h = ResponseHeader::build(503, None)?;
        h.insert_header("Content-Type", "application/json")?;
        h.insert_header("Retry-After", "1")?;
        h.insert_header("Content-Length", body.len().to_string())?;
        session.write_response_header(Box::new(h), false).await?;
        session.write_response_body(Some(body), true).await?;
        return Ok(());
    }
    session.write_response_body(None, true).await
}

async fn write_header(session: &mut Session, resp: &reqwest::Response) -> pingora::Result<()> {
    let mut h = ResponseHeader::build(resp.status().as_u16(), None)?;
    for (k, v) in resp.headers() {
        if matches!(
            k.as_str(),
            "connection" | "transfer-encoding" | "content-length" | "keep-alive"
        ) {
            continue;
        }
        h.append_header(k.clone(), v.clone())?;
    }
    h.insert_header("Transfer-Encoding", "chunked")?;
    session.write_response_header(Box::new(h), false).await
}

/// Copy whole event lines from `resp` (served by master `from`) to the client,
/// remembering where the stream is. A master that is no longer the routed one counts as
/// broken even while its connection stays open (a partitioned master's would, for a
/// while); the proxy stopping ends the stream, and a client that goes away ends it at
/// once (not at the next event, which for a narrow watch may be an hour away).
async fn pump(
    session: &mut Session,
    shared: &Shared,
    from: &str,
    resp: &mut reqwest::Response,
    rv: &mut String,
    resumed: bool,
) -> Ended {
    let mut routing = shared.routing();
    let mut pending = BytesMut::new();
    loop {
        let next = tokio::select! {
            c = resp.chunk() => c,
            // a watch request has no body: the client's side ends only when it goes away
            _ = session.read_body_or_idle(true) => return Ended::ClientGone,
            _ = routing.wait_for(|r| r.active.as_ref().is_some_and(|a| a.id != from)) => {
                return Ended::Broken;
            }
            _ = shared.streams_end.cancelled() => return Ended::Done,
        };
        let chunk = match next {
            Ok(Some(c)) => c,
            Ok(None) | Err(_) => return Ended::Broken,
        };
        pending.extend_from_slice(&chunk);
        // only whole events go on: a resumed stream must not follow half an event
        let Some(last_newline) = pending.iter().rposition(|b| *b == b'\n') else {
            continue;
        };
        let mut complete: Bytes = pending.split_to(last_newline + 1).freeze();
        let mut end = false;
        for line in complete.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            match seen(line) {
                Seen::At(v) => *rv = v,
                Seen::End => end = true,
                Seen::Nothing => {}
            }
        }
        if resumed {
            complete = without_table_columns(complete);
        }
        if session
            .write_response_body(Some(complete), false)
            .await
            .is_err()
        {
            return Ended::ClientGone;
        }
        if end {
            return Ended::Done;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_json_watches_from_a_version_are_resumed() {
        let q = Some("watch=true&resourceVersion=42&timeoutSeconds=5");
        assert_eq!(resumable(q, None), Some("42".into()));
        assert_eq!(resumable(q, Some("application/json")), Some("42".into()));
        assert_eq!(
            resumable(q, Some("application/vnd.kubernetes.protobuf;type=watch")),
            None
        );
        assert_eq!(resumable(Some("watch=true"), None), None);
        assert_eq!(resumable(Some("watch=true&resourceVersion=0"), None), None);
        assert_eq!(resumable(Some("watch=true&resourceVersion="), None), None);
        assert_eq!(resumable(Some("resourceVersion=42"), None), None);
        assert_eq!(
            resumable(Some("watch=false&resourceVersion=42"), None),
            None
        );
    }

    #[test]
    fn the_version_of_plain_table_and_bookmark_events() {
        let plain = br#"{"type":"MODIFIED","object":{"kind":"Pod","metadata":{"name":"p","resourceVersion":"17"}}}"#;
        assert_eq!(seen(plain), Seen::At("17".into()));
        let table = br#"{"type":"ADDED","object":{"kind":"Table","metadata":{"resourceVersion":"99"},"columnDefinitions":[],"rows":[{"cells":["x"],"object":{"kind":"PartialObjectMetadata","metadata":{"name":"x","resourceVersion":"23"}}}]}}"#;
        assert_eq!(seen(table), Seen::At("23".into()));
        let bookmark =
            br#"{"type":"BOOKMARK","object":{"kind":"Pod","metadata":{"resourceVersion":"31"}}}"#;
        assert_eq!(seen(bookmark), Seen::At("31".into()));
        let error = br#"{"type":"ERROR","object":{"kind":"Status","code":410}}"#;
        assert_eq!(seen(error), Seen::End);
        assert_eq!(seen(b"not json"), Seen::Nothing);
    }

    #[test]
    fn a_resumed_stream_drops_the_table_columns_only() {
        let ev = Bytes::from_static(b"{\"type\":\"ADDED\",\"object\":{\"kind\":\"Table\",\"columnDefinitions\":[{\"name\":\"Name\"}],\"rows\":[]}}\n{\"type\":\"DELETED\",\"object\":{\"kind\":\"Pod\"}}\n");
        let out = without_table_columns(ev);
        let lines: Vec<serde_json::Value> = out
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0]["object"]["columnDefinitions"],
            serde_json::json!([])
        );
        assert_eq!(lines[1]["type"], "DELETED");
        let plain = Bytes::from_static(b"{\"type\":\"ADDED\",\"object\":{}}\n");
        assert_eq!(without_table_columns(plain.clone()), plain);
    }

    #[test]
    fn the_resource_version_is_replaced_and_the_rest_kept() {
        assert_eq!(
            with_resource_version("labelSelector=a%3Db&watch=1&resourceVersion=5", "9"),
            "labelSelector=a%3Db&watch=1&resourceVersion=9"
        );
        assert_eq!(
            timeout_of("watch=1&timeoutSeconds=7"),
            Some(Duration::from_secs(7))
        );
        assert_eq!(timeout_of("watch=1"), None);
    }
}
