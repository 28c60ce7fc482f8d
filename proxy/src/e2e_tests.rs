//! In-process tests of the whole proxy (pingora, DNS, admin) against fake masters.
//! Each fake master runs on its own runtime in its own thread, so `kill()` drops every
//! socket at once, like `kill -9`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;

use ballast_config::listener::{serve, PeerInfo, TlsListener};
use ballast_config::tls::{ClientAuth, NodeTls};

use crate::checker::HttpActiveCheck;
use crate::settings::Settings;
use crate::Running;

/// Certificates for fake masters `m1`..`m3` and the proxy, all on 127.0.0.1, and `admin`
/// (made once per test binary).
fn pki() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let mut c = ballast_config::local::local_cluster(
            3,
            0,
            ballast_config::local::AddressPlan::default(),
        );
        for m in &mut c.masters {
            m.api = "127.0.0.1:0".parse().unwrap();
            m.peer = "127.0.0.1:0".parse().unwrap();
        }
        ballast_config::pki::init(&dir, &c).unwrap();
        dir
    })
}

fn node_tls(id: &str) -> NodeTls {
    let (crt, key) = ballast_config::pki::identity_paths(pki(), id);
    NodeTls::load(&crt, &key, &pki().join("ca.crt")).unwrap()
}

struct FakeState {
    id: String,
    active: AtomicBool,
    term: AtomicU64,
    posts: AtomicUsize,
    gets: AtomicUsize,
}

struct FakeMaster {
    addr: SocketAddr,
    state: Arc<FakeState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeMaster {
    fn start(id: &str, active: bool, term: u64) -> Self {
        Self::start_on(id, active, term, "127.0.0.1:0".parse().unwrap())
    }

    fn start_on(id: &str, active: bool, term: u64, addr: SocketAddr) -> Self {
        let state = Arc::new(FakeState {
            id: id.to_string(),
            active: AtomicBool::new(active),
            term: AtomicU64::new(term),
            posts: AtomicUsize::new(0),
            gets: AtomicUsize::new(0),
        });
        let std_listener = std::net::TcpListener::bind(addr).unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                let tls = node_tls(&st.id)
                    .server_config(ClientAuth::Optional)
                    .unwrap();
                let listener = TlsListener::new(listener, tls, "fake master", None, 1024).unwrap();
                let app = Router::new().fallback(fake_handler).with_state(st);
                let never = tokio_util::sync::CancellationToken::new();
                let limits = ballast_config::LimitsConfig::default();
                tokio::select! {
                    _ = serve(listener, app, limits.header_read_timeout, never) => {}
                    _ = stopped => {}
                }
            });
            // dropping the runtime drops every connection task: like kill -9
            drop(rt);
        });
        Self {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn kill(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }

    fn set(&self, active: bool, term: u64) {
        self.state.term.store(term, Ordering::SeqCst);
        self.state.active.store(active, Ordering::SeqCst);
    }
}

impl Drop for FakeMaster {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn fake_handler(State(st): State<Arc<FakeState>>, req: Request) -> Response {
    let active = st.active.load(Ordering::SeqCst);
    let term = st.term.load(Ordering::SeqCst);
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let method = req.method().clone();
    if path == "/active" {
        let body = serde_json::json!({"id": st.id, "term": term, "active": active});
        let code = if active {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        return (code, axum::Json(body)).into_response();
    }
    if !active {
        let body = serde_json::json!({"kind":"Status","apiVersion":"v1","status":"Failure",
            "reason":"ServiceUnavailable","code":503,"message":"not the active master"});
        // like a real master's gate: rejected before acting on it
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [("x-ballast-rejected", "not-active")],
            axum::Json(body),
        )
            .into_response();
    }
    if method != axum::http::Method::POST {
        st.gets.fetch_add(1, Ordering::SeqCst);
    } else {
        st.posts.fetch_add(1, Ordering::SeqCst);
    }
    if path == "/lost-mid-write" && method == axum::http::Method::POST {
        // leadership lost while the write was in flight: it may have been committed
        st.active.store(false, Ordering::SeqCst);
        let body = serde_json::json!({"kind":"Status","apiVersion":"v1","status":"Failure",
            "reason":"ServiceUnavailable","code":503,"message":"leadership lost"});
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    }
    if path == "/whoami" {
        // what the proxy says about the client, and who the proxy itself is
        let h = |n: &str| {
            req.headers()
                .get_all(n)
                .iter()
                .map(|v| v.to_str().unwrap_or("").to_string())
                .collect::<Vec<_>>()
        };
        let proxy = req
            .extensions()
            .get::<axum::extract::ConnectInfo<PeerInfo>>()
            .and_then(|c| c.0.identity.as_ref().map(|i| i.user.clone()));
        let body = serde_json::json!({"user": h("x-remote-user"), "groups": h("x-remote-group"),
            "connection": proxy});
        return axum::Json(body).into_response();
    }
    if path == "/hang" && st.id == "m1" {
        // a frozen master: accepts, never answers
        std::future::pending::<()>().await;
    }
    if path == "/slow" {
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    if query.contains("watch=true") {
        let id = st.id.clone();
        let stream = futures::stream::unfold(0u64, move |n| {
            let id = id.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Some((Ok::<_, std::io::Error>(format!("{id} event {n}\n")), n + 1))
            }
        });
        return Response::new(Body::from_stream(stream));
    }
    (StatusCode::OK, format!("{} {} {}", st.id, method, path)).into_response()
}

fn settings(masters: &[&FakeMaster], hold: Duration) -> Settings {
    let mut proxy = ballast_config::ProxyConfig {
        api: "127.0.0.1:0".parse().unwrap(),
        dns: "127.0.0.1:0".parse().unwrap(),
        admin: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    proxy.health.interval = Duration::from_millis(50);
    proxy.health.timeout = Duration::from_millis(300);
    proxy.hold.timeout = hold;
    Settings {
        proxy,
        masters: masters
            .iter()
            .map(|m| (m.state.id.clone(), m.addr))
            .collect(),
        vip: None,
        proxies: Vec::new(),
        requests_in_flight_per_user: 400,
    }
}

/// A client with `admin`'s certificate.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(node_tls("admin").client_config().unwrap())
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

async fn start(settings: Settings) -> Running {
    let tls = node_tls("proxy");
    Running::start(
        settings,
        Arc::new(HttpActiveCheck::new(&tls, None).unwrap()),
        tls,
    )
    .await
    .unwrap()
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A pod watch through the proxy.
async fn open_watch(c: &reqwest::Client, p: &Running) -> reqwest::Response {
    c.get(format!("https://{}/api/v1/pods?watch=true", p.api))
        .send()
        .await
        .unwrap()
}

async fn wait_active(p: &Running, id: &str) {
    let s = p.shared.clone();
    let id = id.to_string();
    wait_until("active master", move || {
        s.current().active.as_ref().map(|a| a.id.as_str()) == Some(id.as_str())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_to_the_active_master_and_serves_admin() {
    let m1 = FakeMaster::start("m1", false, 3);
    let m2 = FakeMaster::start("m2", true, 3);
    let p = start(settings(&[&m1, &m2], Duration::from_secs(5))).await;
    wait_active(&p, "m2").await;
    let c = client();
    let r = c
        .get(format!("https://{}/api/v1/pods", p.api))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ballast-master"], "m2");
    assert_eq!(r.text().await.unwrap(), "m2 GET /api/v1/pods");
    let r = c
        .post(format!("https://{}/api/v1/pods", p.api))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(m2.state.posts.load(Ordering::SeqCst), 1);
    assert_eq!(m1.state.posts.load(Ordering::SeqCst), 0);

    let status: serde_json::Value = c
        .get(format!("http://{}/status", p.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["active"], "m2");
    assert_eq!(status["masters"][0]["id"], "m1");
    assert_eq!(status["masters"][0]["healthy"], true);
    assert_eq!(status["masters"][0]["active"], false);
    assert_eq!(status["masters"][1]["term"], 3);
    // requests are counted in pingora's logging phase, after the answer went out
    let m = p.shared.clone();
    wait_until("both requests counted", move || {
        m.metrics.requests.with_label_values(&["200"]).get() == 2
    })
    .await;
    let metrics = c
        .get(format!("http://{}/metrics", p.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("ballast_proxy_active_master{master=\"m2\"} 1"));
    assert!(metrics.contains("ballast_proxy_active_master{master=\"m1\"} 0"));
    assert!(metrics.contains("ballast_proxy_requests_total{code=\"200\"} 2"));
    let live = c
        .get(format!("http://{}/livez", p.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
    p.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_is_hidden_from_a_get_loop() {
    let mut m1 = FakeMaster::start("m1", true, 1);
    let m2 = FakeMaster::start("m2", false, 1);
    let p = start(settings(&[&m1, &m2], Duration::from_secs(10))).await;
    wait_active(&p, "m1").await;
    let c = client();
    let url = format!("https://{}/api/v1/nodes", p.api);
    let loop_task = tokio::spawn({
        let c = c.clone();
        async move {
            let mut by: Vec<String> = Vec::new();
            for _ in 0..60 {
                let r = c.get(&url).send().await.expect("request failed");
                assert_eq!(r.status(), 200, "a read failed during failover");
                by.push(r.text().await.unwrap());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            by
        }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    m1.kill();
    // the election takes a while: requests are held meanwhile
    tokio::time::sleep(Duration::from_millis(300)).await;
    m2.set(true, 2);
    let by = loop_task.await.unwrap();
    assert!(by.first().unwrap().starts_with("m1"));
    assert!(by.last().unwrap().starts_with("m2"));
    wait_active(&p, "m2").await;
    assert_eq!(p.shared.current().failovers, 1);
    assert_eq!(p.shared.metrics.failovers.get(), 1);
    assert_eq!(p.shared.metrics.failover_seconds.get_sample_count(), 1);
    p.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_timeout_answers_503_status_with_retry_after_then_recovers() {
    let m1 = FakeMaster::start("m1", false, 1);
    let p = start(settings(&[&m1], Duration::from_millis(300))).await;
    let c = client();
    let r = c
        .post(format!("https://{}/api/v1/namespaces", p.api))
        .body("{\"kind\":\"Namespace\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["kind"], "Status");
    assert_eq!(v["reason"], "ServiceUnavailable");
    assert_eq!(m1.state.posts.load(Ordering::SeqCst), 0);
    // a master comes back: requests flow again
    m1.set(true, 2);
    wait_active(&p, "m1").await;
    let r = c
        .get(format!("https://{}/api", p.api))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(p.shared.metrics.hold_timeouts.get() >= 1);
    p.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_active_answer_is_rerouted_even_for_writes() {
    let m1 = FakeMaster::start("m1", true, 1);
    let m2 = FakeMaster::start("m2", false, 1);
    let mut s = settings(&[&m1, &m2], Duration::from_secs(10));
    // checks so rare the proxy can't notice the change by itself
    s.proxy.health.interval = Duration::from_secs(30);
    let p = start(s).await;
    wait_active(&p, "m1").await;
    // leadership moves between two checks
    m1.set(false, 2);
    m2.set(true, 2);
    let c = client();
    let r = c
        .post(format!("https://{}/api/v1/namespaces", p.api))
        .body("{\"kind\":\"Namespace\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "m2 POST /api/v1/namespaces");
    assert_eq!(m2.state.posts.load(Ordering::SeqCst), 1);
    assert_eq!(p.shared.current().active.unwrap().id, "m2");
    p.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_answered_503_after_reaching_a_master_is_not_replayed() {
    let m1 = FakeMaster::start("m1", true, 1);
    let m2 = FakeMaster::start("m2", false, 1);
    let mut s = settings(&[&m1, &m2], Duration::from_secs(10));
    s.proxy.health.interval = Duration::from_secs(30);
    let p = start(s).await;
    wait_active(&p, "m1").await;
    // m2's first check answered (not active) before it claims a higher term: with checks
    // 30 s apart the proxy then keeps routing to m1
    let shared = p.shared.clone();
    wait_until("m2 checked", move || {
        shared
            .current()
            .masters
            .iter()
            .any(|m| m.id == "m2" && m.term.is_some())
    })
    .await;
    m2.set(true, 2);
    let r = client()
        .post(format!("https://{}/lost-mid-write", p.api))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body = r.text().await.unwrap();
    assert_eq!(m1.state.posts.load(Ordering::SeqCst), 1, "{body}");
    assert_eq!(m2.state.posts.load(Ordering::SeqCst), 0, "never replayed");
    p.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_dying_mid_request_retries_reads_but_not_writes() {
    let mut m1 = FakeMaster::start("m1", true, 1);
    let m2 = FakeMaster::start("m2", false, 1);
    let p = start(settings(&[&m1, &m2], Duration::from_secs(10))).await;
    wait_active(&p, "m1").await;
    let c = client();
    let get = tokio::spawn({
        let c = c.clone();
        let url = format!("https://{}/slow", p.api);
        async move { c.get(url).send().await.unwrap() }
    });
    let post = tokio::spawn({
        let c = c.clone();
        let url = format!("https://{}/slow", p.api);
        async move { c.post(url).body("x").send().await.unwrap() }
    });
    let st = m1.state.clone();
    wait_until("both requests at m1", move || {
        st.gets.load(Ordering::SeqCst) == 1 && st.posts.load(Ordering::SeqCst) == 1
    })
    .await;
    m1.kill();
    m2.set(true, 2);
    let get = get.await.unwrap();
    assert_eq!(get.status(), 200);
    assert_eq!(get.text().await.unwrap(), "m2 GET /slow");
    let post = post.await.unwrap();
    assert_eq!(
        post.status(),
        503,
        "a write that reached a master is not replayed"
    );
    assert_eq!(post.headers()["retry-after"], "1");
    assert_eq!(m2.state.posts.load(Ordering::SeqCst), 0);
    p.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_are_closed_when_the_active_master_changes() {
    let m1 = FakeMaster::start("m1", true, 1);
    let m2 = FakeMaster::start("m2", false, 1);
    let p = start(settings(&[&m1, &m2], Duration::from_secs(10))).await;
    wait_active(&p, "m1").await;
    let c = client();
    let mut r = open_watch(&c, &p).await;
    assert_eq!(r.status(), 200);
    let first = r.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("m1 event"));
    m1.set(false, 2);
    m2.set(true, 2);
    // the stream ends (cleanly or with an error) soon after the switch
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = r.chunk().await {}
    })
    .await;
    assert!(ended.is_ok(), "watch to the old master was not closed");
    assert!(p.shared.metrics.streams_closed.get() >= 1);
    // a new watch goes to the new master
    let mut r = open_watch(&c, &p).await;
    let first = r.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("m2 event"));
    drop(r);
    p.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spell_without_an_active_master_keeps_the_streams_of_one_that_returns() {
    let m1 = FakeMaster::start("m1", true, 1);
    let p = start(settings(&[&m1], Duration::from_secs(10))).await;
    wait_active(&p, "m1").await;
    let c = client();
    let mut r = open_watch(&c, &p).await;
    assert_eq!(r.status(), 200);
    assert!(r.chunk().await.unwrap().is_some());
    // its health check fails for a while (a busy master), then it is back, same term
    m1.set(false, 1);
    wait_until("no active master", || p.shared.current().active.is_none()).await;
    m1.set(true, 1);
    wait_active(&p, "m1").await;
    // the stream was not cut: it goes on delivering events
    for _ in 0..3 {
        let chunk = tokio::time::timeout(Duration::from_secs(5), r.chunk())
            .await
            .expect("events keep coming")
            .unwrap()
            .expect("stream still open");
        assert!(String::from_utf8_lossy(&chunk).starts_with("m1 event"));
    }
    assert_eq!(p.shared.metrics.streams_closed.get(), 0);
    drop(r);
    p.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_http_gets_4xx_and_the_proxy_keeps_serving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let m1 = FakeMaster::start("m1", true, 1);
    let p = start(settings(&[&m1], Duration::from_secs(5))).await;
    wait_active(&p, "m1").await;
    async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
        let config = ballast_config::tls::anonymous_client_config(&pki().join("ca.crt")).unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::from(addr.ip());
        let mut s = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        let _ = s.write_all(bytes).await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        String::from_utf8_lossy(&buf).into_owned()
    }
    // not TLS at all: the handshake fails, nothing is answered
    {
        let mut s = tokio::net::TcpStream::connect(p.api).await.unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(
            !String::from_utf8_lossy(&buf).contains("HTTP/1.1"),
            "plain HTTP answered"
        );
    }
    let garbage = raw(p.api, b"\x16\x03\x01garbage garbage\r\n\r\n").await;
    assert!(
        garbage.is_empty() || garbage.starts_with("HTTP/1.1 4"),
        "{garbage}"
    );
    let bad = raw(p.api, b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n").await;
    assert!(bad.is_empty() || bad.starts_with("HTTP/1.1 4"), "{bad}");
    let mut huge = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 2 * 1024 * 1024));
    huge.extend(b"\r\n\r\n");
    let big = raw(p.api, &huge).await;
    assert!(big.is_empty() || big.starts_with("HTTP/1.1 4"), "{big}");
    let too_long = raw(
        p.api,
        b"POST /api/v1/pods HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999999\r\n\r\n",
    )
    .await;
    assert!(too_long.starts_with("HTTP/1.1 413"), "{too_long}");
    // Transfer-Encoding with Content-Length: framed by Transfer-Encoding only (RFC 9112)
    let both = raw(
        p.api,
        b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(!both.contains("/smuggled"), "{both}");
    let r = client()
        .get(format!("https://{}/api", p.api))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    p.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_answers_over_udp_and_tcp() {
    use hickory_proto::op::{Message, Query, ResponseCode};
    use hickory_proto::rr::{Name, RData, RecordType};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let m1 = FakeMaster::start("m1", false, 1);
    let m2 = FakeMaster::start("m2", true, 1);
    let p = start(settings(&[&m1, &m2], Duration::from_secs(5))).await;
    wait_active(&p, "m2").await;
    let query = |name: &str, t: RecordType| {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    };
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let ask = |q: Vec<u8>| {
        let udp = &udp;
        let dns = p.dns;
        async move {
            udp.send_to(&q, dns).await.unwrap();
            let mut buf = vec![0u8; 4096];
            let (n, _) = tokio::time::timeout(Duration::from_secs(5), udp.recv_from(&mut buf))
                .await
                .expect("DNS answer")
                .unwrap();
            Message::from_vec(&buf[..n]).unwrap()
        }
    };
    let a = ask(query("api.ballast.local.", RecordType::A)).await;
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    match &a.answers[0].data {
        RData::A(ip) => assert_eq!(std::net::IpAddr::V4(ip.0), m2.addr.ip()),
        other => panic!("{other:?}"),
    }
    let a = ask(query("nothing.ballast.local.", RecordType::A)).await;
    assert_eq!(a.metadata.response_code, ResponseCode::NXDomain);
    let a = ask(query("example.org.", RecordType::A)).await;
    assert_eq!(a.metadata.response_code, ResponseCode::Refused);
    // garbage is answered FORMERR or dropped, and the responder keeps serving
    udp.send_to(b"\x12\x34garbage-garbage-garbage", p.dns)
        .await
        .unwrap();
    udp.send_to(b"\x01", p.dns).await.unwrap();
    let a = ask(query("_api._tcp.ballast.local.", RecordType::SRV)).await;
    // skip a possible FORMERR answer to the garbage
    let a = if a.metadata.id == 4242 {
        a
    } else {
        ask(query("_api._tcp.ballast.local.", RecordType::SRV)).await
    };
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    assert_eq!(a.answers[0].record_type(), RecordType::SRV);

    // TCP
    let mut tcp = tokio::net::TcpStream::connect(p.dns).await.unwrap();
    let q = query("masters.ballast.local.", RecordType::A);
    tcp.write_all(&(q.len() as u16).to_be_bytes())
        .await
        .unwrap();
    tcp.write_all(&q).await.unwrap();
    let mut len = [0u8; 2];
    tcp.read_exact(&mut len).await.unwrap();
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    tcp.read_exact(&mut buf).await.unwrap();
    let a = Message::from_vec(&buf).unwrap();
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    // both fake masters listen on 127.0.0.1: one address, listed once
    assert_eq!(a.answers.len(), 1);
    assert!(
        p.shared
            .metrics
            .dns_queries
            .with_label_values(&["NOERROR"])
            .get()
            >= 3
    );
    p.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_masters() {
    let m1 = FakeMaster::start("m1", true, 1);
    let m2 = FakeMaster::start("m2", false, 1);
    let p = start(settings(&[&m1], Duration::from_secs(5))).await;
    wait_active(&p, "m1").await;
    let mut s = (*p.shared.settings()).clone();
    s.masters = vec![(m2.state.id.clone(), m2.addr)];
    m2.set(true, 2);
    p.apply(s);
    wait_active(&p, "m2").await;
    assert_eq!(p.shared.current().masters.len(), 1);
    p.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_stuck_on_a_former_active_master_is_retried_on_the_new_one() {
    let m1 = FakeMaster::start("m1", true, 1);
    let m2 = FakeMaster::start("m2", false, 1);
    let p = start(settings(&[&m1, &m2], Duration::from_secs(10))).await;
    wait_active(&p, "m1").await;
    let get = tokio::spawn({
        let url = format!("https://{}/hang", p.api);
        async move { client().get(url).send().await.unwrap() }
    });
    let st = m1.state.clone();
    wait_until("request at m1", move || st.gets.load(Ordering::SeqCst) == 1).await;
    m1.set(false, 2);
    m2.set(true, 2);
    let r = get.await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "m2 GET /hang");
    p.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_verified_client_identity_goes_to_the_master_and_a_forged_one_does_not() {
    let m1 = FakeMaster::start("m1", true, 1);
    let p = start(settings(&[&m1], Duration::from_secs(5))).await;
    wait_active(&p, "m1").await;
    let url = format!("https://{}/whoami", p.api);
    let forged = |c: reqwest::Client| {
        let url = url.clone();
        async move {
            c.get(url)
                .header("X-Remote-User", "root")
                .header("X-Remote-Group", "system:masters")
                .header("X-Remote-Extra-Scopes", "all")
                .send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    // with admin's certificate: admin, whatever the client claims
    let v = forged(client()).await;
    assert_eq!(v["user"], serde_json::json!(["admin"]));
    assert_eq!(v["groups"], serde_json::json!(["system:masters"]));
    assert_eq!(
        v["connection"], "proxy:proxy",
        "the proxy's own certificate"
    );
    // without a certificate: nobody (the master then judges the bearer token, or 401)
    let anon = reqwest::Client::builder()
        .use_preconfigured_tls(
            ballast_config::tls::anonymous_client_config(&pki().join("ca.crt")).unwrap(),
        )
        .build()
        .unwrap();
    let v = forged(anon).await;
    assert_eq!(v["user"], serde_json::json!([]));
    assert_eq!(v["groups"], serde_json::json!([]));
    p.shutdown(Duration::from_millis(100)).await;
}
