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

#[cfg(test)]
mod tests {
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
