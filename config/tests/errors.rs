//! Config errors point at the file, line and column of the offending key.

use std::path::Path;

fn err(text: &str) -> String {
    ballast_config::parse_str(Path::new("c.toml"), text)
        .map(|_| ())
        .unwrap_err()
        .to_string()
}

const ONE: &str = "[[masters]]\nid = \"m1\"\napi = \"127.0.0.1:1\"\npeer = \"127.0.0.1:2\"\n";

#[test]
fn unknown_key_names_line_and_column() {
    let e = err(&format!("{ONE}bogus = 1\n"));
    assert!(e.starts_with("c.toml:5:1: "), "{e}");
    assert!(e.contains("bogus"), "{e}");
}

#[test]
fn wrong_type_names_line() {
    let e = err("[[masters]]\nid = \"m1\"\napi = 5\npeer = \"127.0.0.1:2\"\n");
    assert!(e.starts_with("c.toml:3:"), "{e}");
}

#[test]
fn bad_duration_names_line() {
    let e = err(&format!("{ONE}[proxy.health]\ninterval = \"fast\"\n"));
    assert!(e.starts_with("c.toml:6:"), "{e}");
}

#[test]
fn duplicate_id_points_at_second_id() {
    let e = err(&format!(
        "{ONE}\n[[masters]]\nid = \"m1\"\napi = \"127.0.0.1:3\"\npeer = \"127.0.0.1:4\"\n"
    ));
    assert!(
        e.starts_with("c.toml:7:1: masters[1].id: duplicate id `m1`"),
        "{e}"
    );
}

#[test]
fn duplicate_address_is_refused() {
    let e = err(&format!(
        "{ONE}\n[[masters]]\nid = \"m2\"\napi = \"127.0.0.1:1\"\npeer = \"127.0.0.1:4\"\n"
    ));
    assert!(
        e.starts_with(
            "c.toml:8:1: masters[1].api: address 127.0.0.1:1 is already used by master m1"
        ),
        "{e}"
    );
}

#[test]
fn missing_field_is_named() {
    let e = err("[[masters]]\nid = \"m1\"\napi = \"127.0.0.1:1\"\n");
    assert!(e.contains("peer"), "{e}");
}

#[test]
fn worker_without_route_is_refused() {
    let e = err(&format!(
        "{ONE}[[workers]]\nid = \"w1\"\naddress = \"127.0.0.2:1\"\n"
    ));
    assert!(e.contains("workers[0]") && e.contains("api_url"), "{e}");
}

#[test]
fn even_masters_warn_with_quorum_math() {
    let text =
        format!("{ONE}[[masters]]\nid = \"m2\"\napi = \"127.0.0.1:3\"\npeer = \"127.0.0.1:4\"\n");
    let (_, w) = ballast_config::parse_str(Path::new("c.toml"), &text).unwrap();
    assert_eq!(w.len(), 1);
    assert!(
        w[0].contains("quorum is 2") && w[0].contains("loss of 0"),
        "{}",
        w[0]
    );
}

#[test]
fn election_timeout_must_exceed_heartbeats() {
    let e = err(&format!("{ONE}[raft]\nheartbeat_interval = \"300ms\"\n"));
    assert!(e.contains("raft.election_timeout_min"), "{e}");
}

const TWO_PROXIES: &str = "[proxy]\napi = \"10.0.0.100:6443\"\ndns = \"10.0.0.100:5353\"\nadmin = \"10.0.0.100:9180\"\n\n[[proxies]]\nid = \"p1\"\napi = \"10.0.0.21:6443\"\ndns = \"10.0.0.21:5353\"\nadmin = \"10.0.0.21:9180\"\n\n[[proxies]]\nid = \"p2\"\napi = \"10.0.0.22:6443\"\ndns = \"10.0.0.22:5353\"\nadmin = \"10.0.0.22:9180\"\n";

#[test]
fn a_vip_on_an_interface_needs_a_lease_the_kernel_can_fence() {
    let vip = "\n[vip]\naddress = \"10.0.0.100\"\ninterface = \"eth0\"\nprefix = 24\n";
    let ok = format!("{ONE}{TWO_PROXIES}{vip}");
    let c = ballast_config::parse_str(Path::new("c.toml"), &ok).unwrap();
    let v = c.0.vip.unwrap();
    assert_eq!(v.lease(), std::time::Duration::from_secs(3), "the default");
    assert_eq!(v.prefix(), 24);
    let e = err(&format!("{ok}lease = \"900ms\"\n"));
    assert!(
        e.contains("vip.lease: with an interface, must be at least 2500ms"),
        "{e}"
    );
    let e = err(&format!("{ok}lease = \"900ms\"\n"));
    assert!(e.starts_with("c.toml:"), "{e}");
    let e = err(&format!(
        "{ONE}{TWO_PROXIES}\n[vip]\naddress = \"10.0.0.100\"\ninterface = \"eth0\"\nprefix = 33\n"
    ));
    assert!(e.contains("vip.prefix: must be 1..=32"), "{e}");
    let e = err(&format!(
        "{ONE}{TWO_PROXIES}\n[vip]\naddress = \"10.0.0.100\"\ninterface = \"a/b\"\n"
    ));
    assert!(
        e.contains("vip.interface: must be an interface name"),
        "{e}"
    );
}

#[test]
fn limits_have_defaults_and_bad_ones_are_named() {
    let c = ballast_config::parse_str(Path::new("c.toml"), ONE).unwrap();
    let l = &c.0.limits;
    assert_eq!(
        (
            l.max_request_body,
            l.max_object_bytes,
            l.max_patch_operations
        ),
        (3 * 1024 * 1024, 1536 * 1024, 10_000)
    );
    assert_eq!(
        (
            l.max_selector_terms,
            l.max_list_page,
            l.max_watches_per_user
        ),
        (64, 5000, 500)
    );
    assert_eq!(l.watches(), 7680, "15/16 of max_connections");
    let e = err(&format!(
        "{ONE}[limits]\nmax_connections = 100\nmax_watches = 100\n"
    ));
    assert!(
        e.contains("limits.max_watches: must be below max_connections (100)"),
        "{e}"
    );
    assert!(e.starts_with("c.toml:"), "{e}");
    let e = err(&format!("{ONE}[limits]\nmax_list_page = 0\n"));
    assert!(
        e.contains("limits.max_list_page: must be at least 1"),
        "{e}"
    );
    let small = format!("{ONE}[limits]\nmax_connections = 100\n");
    let c = ballast_config::parse_str(Path::new("c.toml"), &small).unwrap();
    assert_eq!(c.0.limits.watches(), 94);
}
