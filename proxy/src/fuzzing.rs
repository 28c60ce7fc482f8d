//! Entry points for the fuzz targets in `fuzz/` (`./task fuzz`): raw input as a client
//! could send it; must never panic. Not an API; hidden from the docs.

use hickory_server::proto::op::Message;

use crate::dns::{answer, zone_name, ZoneView};
use crate::health::Routing;

/// Parse a DNS query packet and answer its first question for `ballast.local` with one
/// active master and three proxies. Returns whether it was a query with a question.
pub fn dns(packet: &[u8]) -> bool {
    let Ok(msg) = Message::from_vec(packet) else {
        return false;
    };
    let Some(q) = msg.queries.first() else {
        return false;
    };
    let zone = zone_name("ballast.local").expect("a valid zone");
    let routing = Routing::default();
    let proxies = [
        (
            "p1".to_string(),
            "127.0.3.1:6443".parse().expect("addr"),
            true,
        ),
        (
            "p2".to_string(),
            "127.0.3.2:6443".parse().expect("addr"),
            false,
        ),
    ];
    let view = ZoneView {
        zone: &zone,
        ttl: 1,
        routing: &routing,
        proxy_api: "127.0.0.1:6443".parse().expect("addr"),
        proxies: &proxies,
        vip: Some("127.0.0.1".parse().expect("addr")),
    };
    let a = answer(&view, q.name(), q.query_type(), q.query_class());
    // every answer encodes
    let mut out = Message::new(
        0,
        hickory_server::proto::op::MessageType::Response,
        hickory_server::proto::op::OpCode::Query,
    );
    out.answers.extend(a.answers);
    out.to_vec().is_ok()
}

/// Bytes a client sends on a connection: parsed as an HTTP/1 request by the same pingora
/// session the proxy serves with (smuggling shapes, obs-fold, bad chunk sizes and bare CR
/// or LF included), its body read to the end as framed, then the proxy's own decisions on
/// the head (long-running? resumable watch? its version replaced), and the body's lines
/// read as the watch events a resumed stream passes on. Returns whether a request parsed.
pub fn http_request(bytes: &[u8]) -> bool {
    use pingora::protocols::http::v1::server::HttpSession;
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
    }
    let stream = Box::new(std::io::Cursor::new(bytes.to_vec()));
    RT.with(|rt| {
        rt.block_on(async {
            let mut session = HttpSession::new(stream);
            let Ok(Some(_)) = session.read_request().await else {
                return false;
            };
            let head = session.req_header();
            let query = head.uri.query();
            let accept = head
                .headers
                .get(http::header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            crate::proxy::is_stream(query);
            if let Some(q) = crate::resume::resumable(query, accept) {
                crate::resume::with_resource_version(&q, "42");
            }
            let mut body = Vec::new();
            while let Ok(Some(chunk)) = session.read_body_bytes().await {
                body.extend_from_slice(&chunk);
                if body.len() > 1 << 20 {
                    break;
                }
            }
            for line in body.split(|b| *b == b'\n') {
                crate::resume::seen(line);
            }
            true
        })
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn requests_parse_and_smuggling_shapes_do_not_panic() {
        assert!(super::http_request(
            b"GET /api/v1/pods?watch=true&resourceVersion=5 HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\n\r\n"
        ));
        assert!(!super::http_request(b"\x16\x03\x01garbage\r\n\r\n"));
        for shape in [
            &b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"[..],
            b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffffff\r\n",
            b"GET /x HTTP/1.1\r\nHost: x\r\nX: a\r\n  folded\r\n\r\n",
            b"GET /x HTTP/1.1\rHost: x\r\n\r\n",
            b"GET /x HTTP/1.1\nHost: x\n\n",
        ] {
            super::http_request(shape);
        }
    }

    #[test]
    fn garbage_and_real_queries() {
        assert!(!super::dns(&[]));
        assert!(!super::dns(&[0xff; 7]));
        // dig api.ballast.local A
        let q = [
            0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 3, b'a', b'p', b'i', 7, b'b',
            b'a', b'l', b'l', b'a', b's', b't', 5, b'l', b'o', b'c', b'a', b'l', 0, 0, 1, 0, 1,
        ];
        assert!(super::dns(&q));
    }
}
