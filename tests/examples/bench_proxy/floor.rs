//! Reference forwarders for part A ("floors"): the least work an HTTP proxy can do per
//! request, to tell a codec's cost from the cost of the proxy's own logic.
//!
//! Each one is started as its own process (`bench_proxy --floor <kind> <listen> <upstream>`,
//! so its CPU time can be read from `/proc`), with one single-threaded runtime per core on
//! a `SO_REUSEPORT` listener, and pins every client connection to one upstream connection
//! to a fixed master (no pool, no health checks, no failover, no header changes: none of
//! what the ballast proxy must do):
//! - `tcp`: bytes copied both ways (`tokio::io::copy_bidirectional`), no HTTP parsing;
//! - `pingora`: pingora 0.9's own HTTP/1 sessions (`v1::server::HttpSession` downstream,
//!   `v1::client::HttpSession` upstream) in a `ServerApp` on pingora's `Server`: read a
//!   request, write it upstream, read the answer, write it back, reuse both connections;
//! - `hyper`: hyper 1's HTTP/1 server connection, each request sent on the client
//!   connection it owns.

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use pingora::apps::ServerApp;
use pingora::protocols::http::v1::client::HttpSession as UpSession;
use pingora::protocols::http::v1::server::HttpSession as DownSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use tokio::io::AsyncWriteExt;

/// Run the `kind` forwarder until killed.
pub fn run(kind: &str, listen: SocketAddr, upstream: SocketAddr) {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    match kind {
        "pingora" => run_pingora(listen, upstream, threads),
        "tcp" | "hyper" => {
            let hs: Vec<_> = (0..threads)
                .map(|_| {
                    let kind = kind.to_string();
                    std::thread::spawn(move || per_core(&kind, listen, upstream))
                })
                .collect();
            for h in hs {
                let _ = h.join();
            }
        }
        other => panic!("unknown floor {other:?} (tcp, pingora, hyper)"),
    }
}

async fn connect(upstream: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let u = tokio::net::TcpStream::connect(upstream).await?;
    u.set_nodelay(true)?;
    Ok(u)
}

fn per_core(kind: &str, listen: SocketAddr, upstream: SocketAddr) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.set_reuseaddr(true).expect("SO_REUSEADDR");
        sock.set_reuseport(true).expect("SO_REUSEPORT");
        sock.bind(listen).expect("bind the floor's address");
        let listener = sock.listen(1024).expect("listen");
        loop {
            let Ok((mut c, _)) = listener.accept().await else {
                continue;
            };
            let _ = c.set_nodelay(true);
            if kind == "tcp" {
                tokio::spawn(async move {
                    if let Ok(mut u) = connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                    }
                });
            } else {
                tokio::spawn(hyper_conn(c, upstream));
            }
        }
    });
}

async fn hyper_conn(c: tokio::net::TcpStream, upstream: SocketAddr) {
    let Ok(u) = connect(upstream).await else {
        return;
    };
    let Ok((send, conn)) =
        hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(u)).await
    else {
        return;
    };
    tokio::spawn(conn);
    // HTTP/1 without pipelining: one request at a time per client connection
    let send = Arc::new(tokio::sync::Mutex::new(send));
    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let send = send.clone();
        async move {
            let mut s = send.lock().await;
            s.ready().await?;
            s.send_request(req).await
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(c), svc)
        .await;
}

struct PingoraFloor {
    upstream: SocketAddr,
}

#[async_trait]
impl ServerApp for PingoraFloor {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        _shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let _ = pingora_conn(stream, self.upstream).await;
        None
    }
}

async fn pingora_conn(mut down: Stream, upstream: SocketAddr) -> pingora::Result<()> {
    let Ok(u) = connect(upstream).await else {
        return Ok(());
    };
    let mut up: Stream = Box::new(L4Stream::from(u));
    loop {
        let mut ds = DownSession::new(down);
        if ds.read_request().await?.is_none() {
            return Ok(());
        }
        let mut us = UpSession::new(up);
        us.write_request_header(Box::new(ds.req_header().clone()))
            .await?;
        while let Some(b) = ds.read_body_bytes().await? {
            us.write_body(&b).await?;
        }
        us.finish_body().await?;
        us.read_response().await?;
        us.respect_keepalive();
        let Some(resp) = us.resp_header().cloned() else {
            return Ok(());
        };
        ds.write_response_header(Box::new(resp)).await?;
        while let Some(b) = us.read_body_bytes().await? {
            ds.write_body(&b).await?;
        }
        ds.finish_body().await?;
        let (Some(u), Some(d)) = (us.reuse().await, ds.reuse().await?) else {
            return Ok(());
        };
        up = u;
        down = d.into_parts().0;
        // a response with a Content-Length is not flushed by the session itself
        down.flush()
            .await
            .map_err(|e| pingora::Error::because(pingora::ErrorType::WriteError, "flush", e))?;
    }
}

fn run_pingora(listen: SocketAddr, upstream: SocketAddr, threads: usize) {
    let mut server = pingora::server::Server::new(None).expect("pingora server");
    server.bootstrap();
    for i in 0..threads {
        let mut svc = pingora::services::listening::Service::new(
            format!("floor-{i}"),
            PingoraFloor { upstream },
        );
        let mut opts = pingora::listeners::TcpSocketOptions::default();
        opts.so_reuseport = Some(true);
        svc.add_tcp_with_settings(&listen.to_string(), opts);
        svc.threads = Some(1);
        server.add_service(svc);
    }
    server.run_forever();
}
