//! List + watch of the pods bound to one node (`fieldSelector=spec.nodeName=NODE`):
//! resumes from the last resourceVersion after a dropped stream, relists on 410 Gone, and
//! never gives up.

use std::collections::HashSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ListMeta;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::api::{retry, Api, ApiError, RetryDelay};

/// Who gets the pods.
pub(crate) trait PodSink {
    /// A pod bound to the node was added or changed.
    fn upsert(&mut self, pod: Pod);
    /// A pod is no longer bound to the node (deleted, or missing from a relist).
    fn gone(&mut self, uid: &str);
    /// The uids the sink knows.
    fn known(&self) -> Vec<String>;
}

#[derive(Deserialize)]
struct PodList {
    #[serde(default)]
    metadata: ListMeta,
    #[serde(default)]
    items: Vec<Pod>,
}

#[derive(Deserialize)]
struct Event {
    #[serde(rename = "type")]
    type_: String,
    object: serde_json::Value,
}

/// One parsed watch line.
#[derive(Debug)]
pub(crate) enum WatchEvent {
    Upsert(Box<Pod>),
    Deleted(Box<Pod>),
    Bookmark(String),
    /// `410 Gone`: the resourceVersion is too old; list again.
    Expired,
    Other,
}

/// Parse one line of a watch stream.
pub(crate) fn parse_event(line: &[u8]) -> Result<WatchEvent, serde_json::Error> {
    let ev: Event = serde_json::from_slice(line)?;
    Ok(match ev.type_.as_str() {
        "ADDED" | "MODIFIED" => WatchEvent::Upsert(Box::new(serde_json::from_value(ev.object)?)),
        "DELETED" => WatchEvent::Deleted(Box::new(serde_json::from_value(ev.object)?)),
        "BOOKMARK" => WatchEvent::Bookmark(
            ev.object
                .pointer("/metadata/resourceVersion")
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string(),
        ),
        "ERROR" if ev.object.get("code").and_then(|c| c.as_u64()) == Some(410) => {
            WatchEvent::Expired
        }
        _ => WatchEvent::Other,
    })
}

fn rv_of(p: &Pod) -> Option<String> {
    p.metadata.resource_version.clone()
}

/// Feed `sink` until `shutdown`.
pub(crate) async fn run(
    api: &Api,
    node: &str,
    sink: &mut impl PodSink,
    shutdown: &CancellationToken,
) {
    let selector = format!("fieldSelector=spec.nodeName%3D{node}");
    let mut rv: Option<String> = None;
    let mut delay = RetryDelay::default();
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let from = match &rv {
            Some(r) => r.clone(),
            None => {
                let list = match list_all(api, &selector, shutdown).await {
                    Ok(l) => l,
                    Err(ApiError::Cancelled) => return,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot list pods");
                        sleep_or(shutdown, delay.next(None)).await;
                        continue;
                    }
                };
                let seen: HashSet<String> = list
                    .items
                    .iter()
                    .filter_map(|p| p.metadata.uid.clone())
                    .collect();
                for uid in sink.known() {
                    if !seen.contains(&uid) {
                        sink.gone(&uid);
                    }
                }
                for p in list.items {
                    sink.upsert(p);
                }
                let r = list.metadata.resource_version.unwrap_or_default();
                rv = Some(r.clone());
                r
            }
        };
        let timeout = 25 + (rand_u64() % 10);
        let path = format!(
            "/api/v1/pods?{selector}&watch=true&resourceVersion={from}&allowWatchBookmarks=true&timeoutSeconds={timeout}"
        );
        let generation = api.route().generation();
        let mut resp = tokio::select! {
            r = api.watch(&path) => match r {
                Ok(r) => r,
                Err(e) if e.is_gone() => {
                    rv = None;
                    continue;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "watch failed");
                    sleep_or(shutdown, delay.next(None)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        delay.reset();
        let mut buf: Vec<u8> = Vec::new();
        let read_timeout = Duration::from_secs(timeout + 15);
        let mut moved = tokio::time::interval(Duration::from_secs(1));
        let mut deadline = tokio::time::Instant::now() + read_timeout;
        'stream: loop {
            let chunk = tokio::select! {
                c = tokio::time::timeout_at(deadline, resp.chunk()) => c,
                _ = moved.tick() => {
                    if api.route().generation() != generation {
                        tracing::info!("the API moved to another address; watching there");
                        break 'stream;
                    }
                    continue 'stream;
                }
                _ = shutdown.cancelled() => return,
            };
            match chunk {
                Ok(Ok(Some(bytes))) => {
                    deadline = tokio::time::Instant::now() + read_timeout;
                    buf.extend_from_slice(&bytes);
                    while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=nl).collect();
                        let line = line.trim_ascii();
                        if line.is_empty() {
                            continue;
                        }
                        match parse_event(line) {
                            Ok(WatchEvent::Upsert(p)) => {
                                rv = rv_of(&p).or(rv.take());
                                sink.upsert(*p);
                            }
                            Ok(WatchEvent::Deleted(p)) => {
                                rv = rv_of(&p).or(rv.take());
                                if let Some(uid) = &p.metadata.uid {
                                    sink.gone(uid);
                                }
                            }
                            Ok(WatchEvent::Bookmark(r)) => {
                                if !r.is_empty() {
                                    rv = Some(r);
                                }
                            }
                            Ok(WatchEvent::Expired) => {
                                tracing::info!("watch expired (410); relisting");
                                rv = None;
                                break 'stream;
                            }
                            Ok(WatchEvent::Other) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "undecodable watch event; relisting");
                                rv = None;
                                break 'stream;
                            }
                        }
                    }
                }
                Ok(Ok(None)) => break 'stream, // the server ended the watch: resume
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "watch stream broke");
                    api.stream_failed();
                    break 'stream;
                }
                Err(_) => {
                    tracing::debug!("watch stream silent for too long; reconnecting");
                    api.stream_failed();
                    break 'stream;
                }
            }
        }
    }
}

/// List every page (a partial list would make pods look deleted).
async fn list_all(
    api: &Api,
    selector: &str,
    shutdown: &CancellationToken,
) -> Result<PodList, ApiError> {
    let first = format!("/api/v1/pods?{selector}&limit=500");
    let mut list: PodList = retry("list pods", shutdown, || api.get(&first)).await?;
    while let Some(token) = list.metadata.continue_.take().filter(|t| !t.is_empty()) {
        let path = format!("{first}&continue={}", urlencode(&token));
        let page: PodList = retry("list pods", shutdown, || api.get(&path)).await?;
        list.items.extend(page.items);
        list.metadata.continue_ = page.metadata.continue_;
    }
    Ok(list)
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn sleep_or(shutdown: &CancellationToken, d: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = shutdown.cancelled() => {}
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_events() {
        let up = br#"{"type":"ADDED","object":{"apiVersion":"v1","kind":"Pod","metadata":{"name":"a","uid":"u","resourceVersion":"5"}}}"#;
        match parse_event(up).unwrap() {
            WatchEvent::Upsert(p) => assert_eq!(p.metadata.resource_version.as_deref(), Some("5")),
            e => panic!("{e:?}"),
        }
        let bm = br#"{"type":"BOOKMARK","object":{"kind":"Pod","apiVersion":"v1","metadata":{"resourceVersion":"9"}}}"#;
        assert!(matches!(parse_event(bm).unwrap(), WatchEvent::Bookmark(r) if r == "9"));
        let gone = br#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","status":"Failure","code":410,"reason":"Expired"}}"#;
        assert!(matches!(parse_event(gone).unwrap(), WatchEvent::Expired));
        let del = br#"{"type":"DELETED","object":{"metadata":{"name":"a","uid":"u","resourceVersion":"7"}}}"#;
        assert!(matches!(parse_event(del).unwrap(), WatchEvent::Deleted(_)));
        assert!(parse_event(b"{").is_err());
    }
}

#[cfg(test)]
mod loop_tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::route::Route;
    use axum::extract::{Query, State};
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    use ballast_config::ApiRoute;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    type Log = Arc<Mutex<Vec<String>>>;

    fn pod(name: &str, rv: &str) -> serde_json::Value {
        serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"), "resourceVersion": rv},
            "spec": {"nodeName": "w1", "containers": []}})
    }

    /// A fake API: list (RV 5: a, b), watch from 5 (b modified at 7, then the stream
    /// ends), watch from 7 answers 410, relist (RV 9: b, c), then idle watches.
    async fn pods(
        State(log): State<Log>,
        Query(q): Query<HashMap<String, String>>,
    ) -> axum::response::Response {
        assert_eq!(
            q.get("fieldSelector").map(String::as_str),
            Some("spec.nodeName=w1")
        );
        let watch = q.contains_key("watch");
        let rv = q.get("resourceVersion").cloned().unwrap_or_default();
        let lists = log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("list"))
            .count();
        log.lock()
            .unwrap()
            .push(format!("{} {rv}", if watch { "watch" } else { "list" }));
        match (watch, rv.as_str()) {
            (false, _) if lists == 0 => {
                axum::Json(serde_json::json!({"kind": "PodList", "apiVersion": "v1",
                "metadata": {"resourceVersion": "5"}, "items": [pod("a", "3"), pod("b", "4")]}))
                .into_response()
            }
            (false, _) => axum::Json(serde_json::json!({"kind": "PodList", "apiVersion": "v1",
                "metadata": {"resourceVersion": "9"}, "items": [pod("b", "8"), pod("c", "9")]}))
            .into_response(),
            (true, "5") => format!(
                "{}\n",
                serde_json::json!({"type": "MODIFIED", "object": pod("b", "7")})
            )
            .into_response(),
            (true, "7") => (
                StatusCode::GONE,
                axum::Json(serde_json::json!({"kind": "Status", "code": 410})),
            )
                .into_response(),
            _ => {
                tokio::time::sleep(Duration::from_secs(60)).await;
                "".into_response()
            }
        }
    }

    #[derive(Default)]
    struct Sink {
        pods: HashMap<String, String>,
        events: Vec<String>,
    }

    impl PodSink for Sink {
        fn upsert(&mut self, pod: Pod) {
            let uid = pod.metadata.uid.clone().unwrap();
            self.events.push(format!("up {uid}"));
            self.pods
                .insert(uid, pod.metadata.resource_version.unwrap());
        }
        fn gone(&mut self, uid: &str) {
            self.events.push(format!("gone {uid}"));
            self.pods.remove(uid);
        }
        fn known(&self) -> Vec<String> {
            self.pods.keys().cloned().collect()
        }
    }

    #[tokio::test]
    async fn resumes_from_the_last_version_and_relists_on_410() {
        let log: Log = Arc::default();
        let app = axum::Router::new()
            .route("/api/v1/pods", axum::routing::get(pods))
            .with_state(log.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        let api = Api::plain(
            Route::new(ApiRoute::Url(format!("http://{addr}"))),
            Metrics::new(),
        );
        let stop = CancellationToken::new();
        let mut sink = Sink::default();
        let s2 = stop.clone();
        let l2 = log.clone();
        tokio::spawn(async move {
            for _ in 0..100 {
                if l2.lock().unwrap().len() >= 5 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            s2.cancel();
        });
        run(&api, "w1", &mut sink, &stop).await;
        let calls = log.lock().unwrap().clone();
        assert_eq!(
            calls,
            vec!["list ", "watch 5", "watch 7", "list ", "watch 9"]
        );
        assert_eq!(
            sink.events,
            vec![
                "up uid-a",
                "up uid-b",
                "up uid-b",
                "gone uid-a",
                "up uid-b",
                "up uid-c"
            ]
        );
        assert_eq!(sink.pods.get("uid-b").map(String::as_str), Some("8"));
    }
}
