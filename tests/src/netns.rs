//! Test hosts in network namespaces on one bridge: each host its own namespace with an
//! `eth0` (a veth whose other end is on the bridge) and addresses in `10.233.K.0/24` and
//! `fd00:233:K::/64` for the test's block `K`. The bridge itself, in the test's own namespace, carries
//! further addresses on demand, so nodes run there are reachable from every host.
//! Everything is deleted in `Drop`, and left-overs of a killed run with the same block are
//! deleted first.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Child, Command};

use ballast_config::{ProxyNode, VipConfig};
use nix::sys::signal::Signal;

use crate::{ballast_bin, run, spawn_tied, Cluster, ClusterOpts};

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

    /// `fd00:233:K::i`.
    pub fn addr6(&self, i: u8) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x233, self.block as u16, 0, 0, 0, 0, i as u16)
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

    /// A host: namespace `bK-name` with `lo` and `eth0` (`10.233.K.i/24`,
    /// `fd00:233:K::i/64`) up.
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
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/64", self.addr6(i)),
            "dev",
            "eth0",
            "nodad",
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
        addresses_in(&self.ns(name))
    }

    /// The addresses of both families on host `name`'s `eth0` now.
    pub fn all_addresses(&self, name: &str) -> Vec<IpAddr> {
        all_addresses_in(&self.ns(name))
    }

    /// Remove `addr/prefix` from host `name`'s `eth0` (it must be there).
    pub fn remove_address(&self, name: &str, addr: Ipv4Addr, prefix: u8) {
        ip(&[
            "-n",
            &self.ns(name),
            "addr",
            "del",
            &format!("{addr}/{prefix}"),
            "dev",
            "eth0",
        ]);
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
    pub fn neighbour(&self, name: &str, addr: impl Into<IpAddr>) -> Option<String> {
        let addr: IpAddr = addr.into();
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
        crate::nft_in(Some(&self.ns(name)), script);
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
        // A deleted namespace lives on while the kernel still holds it (closing sockets),
        // and its veths with it: delete our ends, which takes the pair, and wait until the
        // names are free.
        let ours = format!("v{}", self.block);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            let out = run("ip", &["-br", "link"]);
            let left: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.split(['@', ' ']).next())
                .filter(|n| n.starts_with(&ours))
                .map(String::from)
                .collect();
            if left.is_empty() {
                break;
            }
            for name in left {
                let _ = run("ip", &["link", "del", &name]);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
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

/// Move the calling thread into host `ns` (a namespace name): the sockets it and the
/// threads it starts make from now on are that host's.
pub fn enter(ns: &str) {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
}

/// A cluster for the VIP on real interfaces, on `seg`: three masters on the bridge's
/// addresses `10.233.K.11–13` (the caller's own namespace), proxies `ids` as hosts
/// `10.233.K.21…`, a client host `c` (`10.233.K.30`), and the VIP `10.233.K.100/24` added to
/// the holder's `eth0`. The masters are started, the proxies not ([`HostProcs`]).
pub fn vip_cluster(seg: &mut Segment, ids: &[&str]) -> Cluster {
    let vip = seg.addr(100);
    vip_cluster_at(seg, ids, vip.into(), 24)
}

/// [`vip_cluster`] with the VIP `vip/prefix` (of either family).
pub fn vip_cluster_at(seg: &mut Segment, ids: &[&str], vip: IpAddr, prefix: u8) -> Cluster {
    for i in 1..=3u8 {
        seg.add_bridge_address(10 + i);
    }
    for (i, id) in ids.iter().enumerate() {
        seg.host(id, 21 + i as u8);
    }
    seg.host("c", 30);
    let (m_addr, p_addr) = (
        |i: usize| seg.addr(11 + i as u8),
        |i: usize| seg.addr(21 + i as u8),
    );
    let mut c = Cluster::configure(ClusterOpts::new(seg.block).masters(3), |cfg| {
        for (i, m) in cfg.masters.iter_mut().enumerate() {
            m.api = (m_addr(i), 6443).into();
            m.peer = (m_addr(i), 2380).into();
        }
        cfg.proxy.api = (vip, 6443).into();
        cfg.proxy.dns = (vip, 5353).into();
        cfg.proxy.admin = (vip, 9180).into();
        cfg.proxies = ids
            .iter()
            .enumerate()
            .map(|(i, id)| ProxyNode {
                id: id.to_string(),
                api: (p_addr(i), 6443).into(),
                dns: (p_addr(i), 5353).into(),
                admin: (p_addr(i), 9180).into(),
                tls: Default::default(),
            })
            .collect();
        let mut v = VipConfig::new(vip);
        v.interface = Some("eth0".into());
        v.prefix = Some(prefix);
        cfg.vip = Some(v);
    });
    for m in ["m1", "m2", "m3"] {
        c.start_node(m);
    }
    c
}

/// Processes run inside hosts, by name, killed in `Drop`.
#[derive(Default)]
pub struct HostProcs {
    children: BTreeMap<String, Child>,
}

impl HostProcs {
    /// `ballast proxy --id id` inside host `id`, its output appended to `logs/<id>.log`.
    pub fn start_proxy(&mut self, seg: &Segment, c: &Cluster, id: &str) {
        let config = c.config_path().display().to_string();
        self.start_ballast(seg, c, id, &["proxy", "--config", &config, "--id", id]);
    }

    /// Node `id` of `c` (a master or a worker) inside host `id`, its output appended to
    /// `logs/<id>.log`.
    pub fn start_node(&mut self, seg: &Segment, c: &Cluster, id: &str) {
        let args = c.args_for(id);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.start_ballast(seg, c, id, &args);
    }

    fn start_ballast(&mut self, seg: &Segment, c: &Cluster, id: &str, args: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(c.log_path(id))
            .unwrap();
        let mut cmd = seg.command(id, &ballast_bin());
        cmd.args(args)
            .current_dir(c.dir())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.start(id, &mut cmd);
    }

    /// Start `cmd` under `name` (which must not be running).
    pub fn start(&mut self, name: &str, cmd: &mut Command) {
        assert!(!self.children.contains_key(name), "{name} runs already");
        let child = spawn_tied(cmd).unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        self.children.insert(name.to_string(), child);
    }

    pub fn signal(&self, name: &str, sig: Signal) {
        let pid = self.children[name].id() as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
    }

    /// Wait for `name` to exit (after a signal) and forget it.
    pub fn reap(&mut self, name: &str) {
        let mut child = self.children.remove(name).unwrap();
        child.wait().unwrap();
    }
}

impl Drop for HostProcs {
    fn drop(&mut self) {
        for child in self.children.values_mut() {
            // one the caller killed already is fine
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The IPv4 addresses on `eth0` in namespace `ns` now (callable from any thread, e.g. a
/// checker polling every host).
pub fn addresses_in(ns: &str) -> Vec<Ipv4Addr> {
    let out = run("ip", &["-n", ns, "-4", "-o", "addr", "show", "dev", "eth0"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.find(|x| *x == "inet")?;
            w.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

/// The addresses of both families on `eth0` in namespace `ns` now.
pub fn all_addresses_in(ns: &str) -> Vec<IpAddr> {
    let out = run("ip", &["-n", ns, "-o", "addr", "show", "dev", "eth0"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.find(|x| *x == "inet" || *x == "inet6")?;
            w.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}
