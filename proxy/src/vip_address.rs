//! The VIP on a real interface: adding and removing the address over netlink, and telling
//! the segment where it now lives (gratuitous ARP for IPv4, an unsolicited neighbour
//! advertisement with the override flag for IPv6).
//!
//! **The kernel is the last fence.** A holder that is paused (SIGSTOP, a stalled VM) or
//! killed cannot take its address away, yet the next holder adds the same address on
//! another host. So the address is never added for good: it carries a kernel lifetime of
//! [`LIFETIME_SECS`] (`valid_lft`), renewed only after a successful lease claim, and the
//! kernel removes it when nobody renews it. Address lifetimes are whole seconds and the
//! kernel's expiry worker runs at most once a second, so an address outlives its last
//! renewal by 1–2 s ([`KERNEL_FENCE`], measured on Linux 6.18: 1.0–1.2 s when nothing
//! else touches addresses). A renewal is therefore made only when the address it sets up
//! is gone before the lease lets anyone else claim (see [`crate::lease::Lease::may_fence`]),
//! which is why a VIP on an interface needs a lease of at least
//! [`ballast_config::schema::MIN_INTERFACE_VIP_LEASE`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, CacheInfo};
use pnet_datalink::{Channel, MacAddr, NetworkInterface};
use pnet_packet::arp::{ArpHardwareTypes, ArpOperations, MutableArpPacket};
use pnet_packet::ethernet::{EtherTypes, MutableEthernetPacket};
use pnet_packet::ip::IpNextHeaderProtocols;
use pnet_packet::ipv6::MutableIpv6Packet;

/// The address's kernel lifetime (`valid_lft` and `preferred_lft`), renewed on every
/// successful lease claim: the smallest the kernel takes.
pub(crate) const LIFETIME_SECS: u32 = 1;

/// How long the kernel may keep an address after its last renewal: its lifetime, plus up
/// to a second until the expiry worker runs again (it runs at most once a second, and any
/// address change on the host reschedules it), plus slack for a busy host.
pub(crate) const KERNEL_FENCE: Duration = Duration::from_millis(2_200);

/// When the holder announces the VIP after adding it: at once, then while a former
/// holder's address may still linger on its host (up to [`KERNEL_FENCE`]) and answer ARP.
pub(crate) const ANNOUNCE_AT: [Duration; 4] = [
    Duration::ZERO,
    Duration::from_millis(200),
    Duration::from_millis(1_000),
    Duration::from_millis(2_500),
];

/// A netlink or packet-socket call that failed. Each is retried at the next lease tick.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AddressError {
    #[error("no interface named {0:?} on this host")]
    NoInterface(String),
    #[error("interface {0:?} has no MAC address to announce the VIP from")]
    NoMac(String),
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("cannot open a netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("announcing the VIP on {iface}: {error}")]
    Announce {
        iface: String,
        error: std::io::Error,
    },
}

/// The VIP's address on one interface of this host.
pub(crate) struct InterfaceVip {
    handle: rtnetlink::Handle,
    iface: NetworkInterface,
    mac: MacAddr,
    address: IpAddr,
    prefix: u8,
}

impl InterfaceVip {
    /// Find `name` and open a netlink connection (its task runs on the current runtime).
    pub(crate) fn open(name: &str, address: IpAddr, prefix: u8) -> Result<Self, AddressError> {
        let iface = pnet_datalink::interfaces()
            .into_iter()
            .find(|i| i.name == name)
            .ok_or_else(|| AddressError::NoInterface(name.to_string()))?;
        let mac = iface
            .mac
            .filter(|m| !m.is_zero())
            .ok_or_else(|| AddressError::NoMac(name.to_string()))?;
        let (conn, handle, _) = rtnetlink::new_connection().map_err(AddressError::Socket)?;
        tokio::spawn(conn);
        Ok(Self {
            handle,
            iface,
            mac,
            address,
            prefix,
        })
    }

    /// Add the address, or renew its lifetime when it is there.
    pub(crate) async fn renew(&self) -> Result<(), AddressError> {
        let mut req = self
            .handle
            .address()
            .add(self.iface.index, self.address, self.prefix)
            .replace();
        let mut lifetime = CacheInfo::default();
        lifetime.ifa_preferred = LIFETIME_SECS;
        lifetime.ifa_valid = LIFETIME_SECS;
        let attributes = &mut req.message_mut().attributes;
        attributes.push(AddressAttribute::CacheInfo(lifetime));
        if self.address.is_ipv6() {
            // Usable at once: duplicate address detection would hold the address tentative
            // for a second, and a former holder's lingering copy would make it fail. The
            // lease, not DAD, keeps the VIP on one host.
            attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        req.execute().await?;
        Ok(())
    }

    /// Remove the address; `Ok` when it was not there (e.g. the kernel expired it).
    pub(crate) async fn remove(&self) -> Result<(), AddressError> {
        let mut found = self
            .handle
            .address()
            .get()
            .set_link_index_filter(self.iface.index)
            .set_address_filter(self.address)
            .execute();
        while let Some(msg) = found.try_next().await? {
            match self.handle.address().del(msg).execute().await {
                Ok(()) => {}
                // gone meanwhile (its lifetime ran out)
                Err(rtnetlink::Error::NetlinkError(e))
                    if e.raw_code().abs() == nix::errno::Errno::EADDRNOTAVAIL as i32 => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Tell the segment the VIP now lives at this interface's MAC, so neighbours update
    /// their caches: a gratuitous ARP request (IPv4) or an unsolicited neighbour
    /// advertisement with the override flag to all nodes (IPv6).
    pub(crate) async fn announce(&self) -> Result<(), AddressError> {
        let iface = self.iface.clone();
        let frame = match self.address {
            IpAddr::V4(a) => garp_frame(self.mac, a),
            IpAddr::V6(a) => unsolicited_na_frame(self.mac, a),
        };
        let name = iface.name.clone();
        let sent = tokio::task::spawn_blocking(move || send_frame(&iface, &frame))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        sent.map_err(|error| AddressError::Announce { iface: name, error })
    }
}

fn send_frame(iface: &NetworkInterface, frame: &[u8]) -> std::io::Result<()> {
    let config = pnet_datalink::Config {
        read_timeout: Some(Duration::from_millis(1)),
        ..Default::default()
    };
    match pnet_datalink::channel(iface, config)? {
        Channel::Ethernet(mut tx, _rx) => tx
            .send_to(frame, None)
            .unwrap_or_else(|| Err(std::io::Error::other("no room in the send buffer"))),
        _ => Err(std::io::Error::other("not an Ethernet channel")),
    }
}

const ETHERNET_HEADER: usize = 14;
const ARP_IPV4: usize = 28;

/// A gratuitous ARP request: who-has VIP tell VIP, from `mac`, to everyone.
fn garp_frame(mac: MacAddr, vip: Ipv4Addr) -> Vec<u8> {
    let mut buf = vec![0u8; ETHERNET_HEADER + ARP_IPV4];
    {
        let mut arp = MutableArpPacket::new(&mut buf[ETHERNET_HEADER..]).expect("28 bytes");
        arp.set_hardware_type(ArpHardwareTypes::Ethernet);
        arp.set_protocol_type(EtherTypes::Ipv4);
        arp.set_hw_addr_len(6);
        arp.set_proto_addr_len(4);
        arp.set_operation(ArpOperations::Request);
        arp.set_sender_hw_addr(mac);
        arp.set_sender_proto_addr(vip);
        arp.set_target_hw_addr(MacAddr::zero());
        arp.set_target_proto_addr(vip);
    }
    let mut eth = MutableEthernetPacket::new(&mut buf).expect("42 bytes");
    eth.set_destination(MacAddr::broadcast());
    eth.set_source(mac);
    eth.set_ethertype(EtherTypes::Arp);
    buf
}

const IPV6_HEADER: usize = 40;
const NA_WITH_LLADDR: usize = 32;
/// ICMPv6 neighbour advertisement, and its override flag (RFC 4861 4.4).
const ICMPV6_NA: u8 = 136;
const NA_OVERRIDE: u8 = 0x20;
/// The target link-layer address option, 8 bytes long (length 1).
const OPT_TARGET_LLADDR: u8 = 2;

/// An unsolicited neighbour advertisement: the VIP is at `mac`, overriding any cached
/// address, from the VIP to all nodes (ff02::1), hop limit 255 as receivers require.
fn unsolicited_na_frame(mac: MacAddr, vip: Ipv6Addr) -> Vec<u8> {
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut buf = vec![0u8; ETHERNET_HEADER + IPV6_HEADER + NA_WITH_LLADDR];
    {
        let mut eth = MutableEthernetPacket::new(&mut buf).expect("86 bytes");
        eth.set_destination(MacAddr::new(0x33, 0x33, 0, 0, 0, 1));
        eth.set_source(mac);
        eth.set_ethertype(EtherTypes::Ipv6);
    }
    {
        let mut ip = MutableIpv6Packet::new(&mut buf[ETHERNET_HEADER..]).expect("72 bytes");
        ip.set_version(6);
        ip.set_payload_length(NA_WITH_LLADDR as u16);
        ip.set_next_header(IpNextHeaderProtocols::Icmpv6);
        ip.set_hop_limit(255);
        ip.set_source(vip);
        ip.set_destination(all_nodes);
    }
    let icmp = &mut buf[ETHERNET_HEADER + IPV6_HEADER..];
    icmp[0] = ICMPV6_NA;
    icmp[4] = NA_OVERRIDE;
    icmp[8..24].copy_from_slice(&vip.octets());
    icmp[24] = OPT_TARGET_LLADDR;
    icmp[25] = 1;
    icmp[26..32].copy_from_slice(&mac.octets());
    let sum = pnet_packet::util::ipv6_checksum(
        icmp,
        1,
        &[],
        &vip,
        &all_nodes,
        IpNextHeaderProtocols::Icmpv6,
    );
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use pnet_packet::arp::ArpPacket;
    use pnet_packet::ethernet::EthernetPacket;
    use pnet_packet::Packet;

    #[test]
    fn gratuitous_arp_names_the_vip_as_sender_and_target() {
        let mac = MacAddr::new(2, 0, 0, 0, 0, 7);
        let vip = Ipv4Addr::new(10, 0, 0, 100);
        let frame = garp_frame(mac, vip);
        assert_eq!(frame.len(), 42);
        let eth = EthernetPacket::new(&frame).unwrap();
        assert_eq!(eth.get_destination(), MacAddr::broadcast());
        assert_eq!(eth.get_source(), mac);
        assert_eq!(eth.get_ethertype(), EtherTypes::Arp);
        let arp = ArpPacket::new(eth.payload()).unwrap();
        assert_eq!(arp.get_operation(), ArpOperations::Request);
        assert_eq!(arp.get_sender_hw_addr(), mac);
        assert_eq!(arp.get_sender_proto_addr(), vip);
        assert_eq!(arp.get_target_proto_addr(), vip);
    }

    #[test]
    fn an_unsolicited_advertisement_overrides_from_the_vip_to_all_nodes() {
        use pnet_packet::icmpv6::{checksum, Icmpv6Packet};
        use pnet_packet::ipv6::Ipv6Packet;
        let mac = MacAddr::new(2, 0, 0, 0, 0, 9);
        let vip: Ipv6Addr = "fd00:233::100".parse().unwrap();
        let frame = unsolicited_na_frame(mac, vip);
        assert_eq!(frame.len(), 86);
        let eth = EthernetPacket::new(&frame).unwrap();
        assert_eq!(eth.get_destination(), MacAddr::new(0x33, 0x33, 0, 0, 0, 1));
        assert_eq!(eth.get_ethertype(), EtherTypes::Ipv6);
        let ip = Ipv6Packet::new(eth.payload()).unwrap();
        assert_eq!((ip.get_hop_limit(), ip.get_payload_length()), (255, 32));
        assert_eq!(ip.get_source(), vip);
        assert_eq!(ip.get_destination(), "ff02::1".parse::<Ipv6Addr>().unwrap());
        let icmp = Icmpv6Packet::new(ip.payload()).unwrap();
        assert_eq!(icmp.get_icmpv6_type().0, 136);
        assert_eq!(
            icmp.get_checksum(),
            checksum(&icmp, &vip, &ip.get_destination())
        );
        let body = ip.payload();
        assert_eq!(body[4], 0x20, "override, not solicited, not a router");
        assert_eq!(&body[8..24], &vip.octets());
        assert_eq!(&body[24..26], &[2, 1]);
        assert_eq!(&body[26..32], &mac.octets());
    }

    #[test]
    fn the_fence_fits_in_the_shortest_lease() {
        // a renewal right after a claim leaves the address gone before lease - margin
        let min = ballast_config::schema::MIN_INTERFACE_VIP_LEASE;
        assert!(KERNEL_FENCE < min - min / 10);
    }
}
