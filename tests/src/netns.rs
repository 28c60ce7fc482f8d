//! Test hosts in network namespaces on one bridge: each host its own namespace with an
//! `eth0` (a veth whose other end is on the bridge) and an address in `10.233.K.0/24`
//! for the test's block `K`. The bridge itself, in the test's own namespace, carries
//! further addresses on demand, so nodes run there are reachable from every host.
//! Everything is deleted in `Drop`, and left-overs of a killed run with the same block are
//! deleted first.

use std::net::Ipv4Addr;
use std::process::Command;

use crate::run;

/// A bridge and the hosts on it.
pub struct Segment {
    block: u8,
    hosts: Vec<String>,
}

fn ip(args: &[&str]) {
    let out = run("ip", args);
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Segment {
    /// The bridge of block `block`, up, with `10.233.K.1/24`.
    pub fn new(block: u8) -> Self {
        crate::require("ip");
        let s = Self {
            block,
            hosts: Vec::new(),
        };
        s.clean();
        ip(&["link", "add", &s.bridge(), "type", "bridge"]);
        ip(&["link", "set", &s.bridge(), "up"]);
        s.add_bridge_address(1);
        s
    }

    fn bridge(&self) -> String {
        format!("br-b{}", self.block)
    }

    /// The namespace of host `name`.
    pub fn ns(&self, name: &str) -> String {
        format!("b{}-{name}", self.block)
    }

    /// `10.233.K.i`.
    pub fn addr(&self, i: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 233, self.block, i)
    }

    /// Give the bridge (the test's own namespace) the address `10.233.K.i` too.
    pub fn add_bridge_address(&self, i: u8) {
        ip(&[
            "addr",
            "add",
            &format!("{}/24", self.addr(i)),
            "dev",
            &self.bridge(),
        ]);
    }

    /// A host: namespace `bK-name` with `lo` and `eth0` (`10.233.K.i/24`) up.
    pub fn host(&mut self, name: &str, i: u8) {
        let ns = self.ns(name);
        let outside = format!("v{}{name}", self.block);
        ip(&["netns", "add", &ns]);
        self.hosts.push(ns.clone());
        ip(&[
            "link", "add", &outside, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["link", "set", &outside, "master", &self.bridge(), "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", self.addr(i)),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
    }

    /// `program` run inside host `name`'s namespace.
    pub fn command(&self, name: &str, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(name)]).arg(program);
        cmd
    }

    /// The IPv4 addresses on host `name`'s `eth0` now.
    pub fn addresses(&self, name: &str) -> Vec<Ipv4Addr> {
        let out = run(
            "ip",
            &[
                "-n",
                &self.ns(name),
                "-4",
                "-o",
                "addr",
                "show",
                "dev",
                "eth0",
            ],
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                w.find(|x| *x == "inet")?;
                w.next()?.split('/').next()?.parse().ok()
            })
            .collect()
    }

    /// Host `name`'s `eth0` MAC address.
    pub fn mac(&self, name: &str) -> String {
        let out = run(
            "ip",
            &["-n", &self.ns(name), "-o", "link", "show", "dev", "eth0"],
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut w = text.split_whitespace();
        w.find(|x| *x == "link/ether")
            .and_then(|_| w.next())
            .unwrap_or_else(|| panic!("no MAC in {text}"))
            .to_string()
    }

    /// The MAC host `name` has for `addr` in its neighbour table, if any.
    pub fn neighbour(&self, name: &str, addr: Ipv4Addr) -> Option<String> {
        let out = run(
            "ip",
            &["-n", &self.ns(name), "neigh", "show", &addr.to_string()],
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut w = text.split_whitespace();
        w.find(|x| *x == "lladdr")
            .and_then(|_| w.next())
            .map(String::from)
    }

    /// Run an nft script inside host `name` (its tables go with the namespace).
    pub fn nft(&self, name: &str, script: &str) {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns(name), "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("nft");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nft in {name} failed: {}\n{script}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn clean(&self) {
        let prefix = format!("b{}-", self.block);
        let out = run("ip", &["netns", "list"]);
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(ns) = line.split_whitespace().next() {
                if ns.starts_with(&prefix) {
                    let _ = run("ip", &["netns", "del", ns]);
                }
            }
        }
        let _ = run("ip", &["link", "del", &self.bridge()]);
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        for ns in &self.hosts {
            let _ = run("ip", &["netns", "del", ns]);
        }
        let _ = run("ip", &["link", "del", &self.bridge()]);
    }
}
