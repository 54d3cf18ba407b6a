//! Frame builders for tests and benchmarks, written from the RFCs independently of lb-ebpf, so
//! that the expected output of a test is never computed by the code under test.

use std::net::{Ipv4Addr, Ipv6Addr};

pub type Mac = [u8; 6];

pub const BROADCAST: Mac = [0xff; 6];
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86DD;

fn ethernet(dst: Mac, src: Mac, proto: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&proto.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Pads a frame with zeros to the Ethernet minimum of 60 bytes (without FCS).
pub fn pad_to_60(mut frame: Vec<u8>) -> Vec<u8> {
    if frame.len() < 60 {
        frame.resize(60, 0);
    }
    frame
}

/// Inserts an 802.1Q tag with VLAN `vid` after the MAC addresses.
pub fn with_vlan(frame: &[u8], vid: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&0x8100u16.to_be_bytes());
    f.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    f
}

/// An ARP packet (RFC 826) for Ethernet/IPv4 in an Ethernet frame: 42 bytes.
#[allow(clippy::too_many_arguments)]
pub fn arp(
    eth_dst: Mac,
    eth_src: Mac,
    op: u16,
    sha: Mac,
    spa: Ipv4Addr,
    tha: Mac,
    tpa: Ipv4Addr,
) -> Vec<u8> {
    let mut p = Vec::with_capacity(28);
    p.extend_from_slice(&1u16.to_be_bytes());
    p.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
    p.push(6);
    p.push(4);
    p.extend_from_slice(&op.to_be_bytes());
    p.extend_from_slice(&sha);
    p.extend_from_slice(&spa.octets());
    p.extend_from_slice(&tha);
    p.extend_from_slice(&tpa.octets());
    ethernet(eth_dst, eth_src, ETH_P_ARP, &p)
}

/// "Who has `target`? Tell `sender_ip`", broadcast.
pub fn arp_request(sender_mac: Mac, sender_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    arp(
        BROADCAST, sender_mac, 1, sender_mac, sender_ip, [0; 6], target,
    )
}

/// "`ip` is at `mac`", to `to_mac`/`to_ip`.
pub fn arp_reply(mac: Mac, ip: Ipv4Addr, to_mac: Mac, to_ip: Ipv4Addr) -> Vec<u8> {
    arp(to_mac, mac, 2, mac, ip, to_mac, to_ip)
}

/// RFC 1071 one's-complement checksum over `data` (odd length padded with a zero byte),
/// starting from `initial` (a pseudo-header sum).
pub fn internet_checksum(initial: u32, data: &[u8]) -> u16 {
    let mut sum = initial as u64;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += word as u64;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ipv6_pseudo_sum(src: &Ipv6Addr, dst: &Ipv6Addr, len: u32, next: u8) -> u32 {
    let mut sum = 0u32;
    for chunk in src.octets().chunks(2).chain(dst.octets().chunks(2)) {
        sum += u16::from_be_bytes([chunk[0], chunk[1]]) as u32;
    }
    sum += len >> 16;
    sum += len & 0xffff;
    sum + next as u32
}

fn ipv4_pseudo_sum(src: &Ipv4Addr, dst: &Ipv4Addr, len: u16, proto: u8) -> u32 {
    let mut sum = 0u32;
    for chunk in src.octets().chunks(2).chain(dst.octets().chunks(2)) {
        sum += u16::from_be_bytes([chunk[0], chunk[1]]) as u32;
    }
    sum + len as u32 + proto as u32
}

/// An IPv6 packet in an Ethernet frame; the upper-layer checksum (at `csum_offset` within the
/// payload, if any) is computed here.
#[allow(clippy::too_many_arguments)]
fn ipv6_frame(
    eth_dst: Mac,
    eth_src: Mac,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next: u8,
    hop_limit: u8,
    mut payload: Vec<u8>,
    csum_offset: Option<usize>,
) -> Vec<u8> {
    if let Some(at) = csum_offset {
        payload[at] = 0;
        payload[at + 1] = 0;
        let sum = internet_checksum(
            ipv6_pseudo_sum(&src, &dst, payload.len() as u32, next),
            &payload,
        );
        payload[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    }
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    ip.push(next);
    ip.push(hop_limit);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip.extend_from_slice(&payload);
    ethernet(eth_dst, eth_src, ETH_P_IPV6, &ip)
}

/// The solicited-node multicast address of `target` (RFC 4291 §2.7.1) and its MAC.
pub fn solicited_node(target: &Ipv6Addr) -> (Ipv6Addr, Mac) {
    let t = target.octets();
    let ip = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | t[13] as u16,
        u16::from_be_bytes([t[14], t[15]]),
    );
    (ip, [0x33, 0x33, 0xff, t[13], t[14], t[15]])
}

/// A Neighbor Solicitation (RFC 4861 §4.3) for `target` from `src` (`::` for DAD, which carries
/// no source link-layer option), to the target's solicited-node multicast address.
pub fn neighbor_solicitation(src_mac: Mac, src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let (dst, dst_mac) = solicited_node(&target);
    let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&target.octets());
    if !src.is_unspecified() {
        icmp.extend_from_slice(&[1, 1]);
        icmp.extend_from_slice(&src_mac);
    }
    ipv6_frame(dst_mac, src_mac, src, dst, 58, 255, icmp, Some(2))
}

/// A Neighbor Advertisement with a Target Link-Layer Address option (RFC 4861 §4.4).
pub fn neighbor_advertisement(
    eth_dst: Mac,
    mac: Mac,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    flags: u8,
    target: Ipv6Addr,
) -> Vec<u8> {
    let mut icmp = vec![136, 0, 0, 0, flags, 0, 0, 0];
    icmp.extend_from_slice(&target.octets());
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&mac);
    ipv6_frame(eth_dst, mac, src, dst, 58, 255, icmp, Some(2))
}

pub const NA_SOLICITED: u8 = 0x40;
pub const NA_OVERRIDE: u8 = 0x20;

/// True when the ICMPv6 checksum of the IPv6 packet at `l3` in `frame` verifies.
pub fn icmpv6_checksum_ok(frame: &[u8], l3: usize) -> bool {
    let ip = &frame[l3..];
    let len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
    let payload = &ip[40..40 + len];
    internet_checksum(ipv6_pseudo_sum(&src, &dst, len as u32, ip[6]), payload) == 0
}

fn ipv4_frame(
    eth_dst: Mac,
    eth_src: Mac,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    mut l4: Vec<u8>,
    csum_offset: usize,
) -> Vec<u8> {
    let total = 20 + l4.len();
    l4[csum_offset] = 0;
    l4[csum_offset + 1] = 0;
    let sum = internet_checksum(ipv4_pseudo_sum(&src, &dst, l4.len() as u16, proto), &l4);
    l4[csum_offset..csum_offset + 2].copy_from_slice(&sum.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(total as u16).to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let hsum = internet_checksum(0, &ip);
    ip[10..12].copy_from_slice(&hsum.to_be_bytes());
    ip.extend_from_slice(&l4);
    ethernet(eth_dst, eth_src, ETH_P_IPV4, &ip)
}

fn tcp_syn(sport: u16, dport: u16) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&1u32.to_be_bytes());
    t.extend_from_slice(&0u32.to_be_bytes());
    t.extend_from_slice(&[0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    t
}

fn udp(sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    u
}

pub fn ipv4_tcp_syn(
    eth_dst: Mac,
    eth_src: Mac,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    ipv4_frame(eth_dst, eth_src, src, dst, 6, tcp_syn(sport, dport), 16)
}

pub fn ipv4_udp(
    eth_dst: Mac,
    eth_src: Mac,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    data: &[u8],
) -> Vec<u8> {
    ipv4_frame(eth_dst, eth_src, src, dst, 17, udp(sport, dport, data), 6)
}

pub fn ipv6_tcp_syn(
    eth_dst: Mac,
    eth_src: Mac,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    ipv6_frame(
        eth_dst,
        eth_src,
        src,
        dst,
        6,
        64,
        tcp_syn(sport, dport),
        Some(16),
    )
}

pub fn ipv6_udp(
    eth_dst: Mac,
    eth_src: Mac,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
    data: &[u8],
) -> Vec<u8> {
    ipv6_frame(
        eth_dst,
        eth_src,
        src,
        dst,
        17,
        64,
        udp(sport, dport, data),
        Some(6),
    )
}

/// An ICMPv6 echo request (not ND: must pass untouched).
pub fn icmpv6_echo(eth_dst: Mac, eth_src: Mac, src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    ipv6_frame(
        eth_dst,
        eth_src,
        src,
        dst,
        58,
        64,
        vec![128, 0, 0, 0, 0, 1, 0, 1, 0xde, 0xad],
        Some(2),
    )
}

/// True when the IPv4 header checksum at `l3` verifies.
pub fn ipv4_header_checksum_ok(frame: &[u8], l3: usize) -> bool {
    let ihl = (frame[l3] & 0x0f) as usize * 4;
    internet_checksum(0, &frame[l3..l3 + ihl]) == 0
}

/// Recomputes the IPv4 header checksum at `l3` (after a test edits the header).
pub fn fix_ipv4_header_checksum(frame: &mut [u8], l3: usize) {
    let ihl = (frame[l3] & 0x0f) as usize * 4;
    frame[l3 + 10] = 0;
    frame[l3 + 11] = 0;
    let sum = internet_checksum(0, &frame[l3..l3 + ihl]);
    frame[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
}

/// True when the TCP or UDP checksum of the IPv4 or IPv6 packet at `l3` verifies (an IPv4 UDP
/// checksum of 0, "none", counts as valid).
pub fn l4_checksum_ok(frame: &[u8], l3: usize) -> bool {
    let ip = &frame[l3..];
    if ip[0] >> 4 == 4 {
        let ihl = (ip[0] & 0x0f) as usize * 4;
        let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        let proto = ip[9];
        let l4 = &ip[ihl..total];
        if proto == 17 && l4[6] == 0 && l4[7] == 0 {
            return true;
        }
        let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        internet_checksum(ipv4_pseudo_sum(&src, &dst, l4.len() as u16, proto), l4) == 0
    } else {
        let len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
        let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
        let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
        internet_checksum(
            ipv6_pseudo_sum(&src, &dst, len as u32, ip[6]),
            &ip[40..40 + len],
        ) == 0
    }
}

/// The IPv4 TCP frame (IP header at `l3`, no options) with its TCP flags set to `flags` and
/// its TCP checksum computed afresh: `0x14` makes a SYN an RST+ACK, `0x11` a FIN+ACK.
pub fn ipv4_with_tcp_flags(frame: &[u8], l3: usize, flags: u8) -> Vec<u8> {
    let mut out = frame.to_vec();
    let total = u16::from_be_bytes([out[l3 + 2], out[l3 + 3]]) as usize;
    let l4 = l3 + 20;
    out[l4 + 13] = flags;
    out[l4 + 16] = 0;
    out[l4 + 17] = 0;
    let src = Ipv4Addr::new(out[l3 + 12], out[l3 + 13], out[l3 + 14], out[l3 + 15]);
    let dst = Ipv4Addr::new(out[l3 + 16], out[l3 + 17], out[l3 + 18], out[l3 + 19]);
    let len = total - 20;
    let sum = internet_checksum(
        ipv4_pseudo_sum(&src, &dst, len as u16, 6),
        &out[l4..l3 + total],
    );
    out[l4 + 16..l4 + 18].copy_from_slice(&sum.to_be_bytes());
    out
}

/// An IPv4 UDP datagram with checksum 0 ("no checksum", allowed on IPv4).
pub fn ipv4_udp_no_checksum(
    eth_dst: Mac,
    eth_src: Mac,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    data: &[u8],
) -> Vec<u8> {
    let mut f = ipv4_udp(eth_dst, eth_src, src, dst, sport, dport, data);
    f[14 + 20 + 6] = 0;
    f[14 + 20 + 7] = 0;
    f
}

/// An IPv6 packet whose first header is a hop-by-hop options header (8 bytes, PadN), then TCP.
pub fn ipv6_tcp_behind_hop_by_hop(
    eth_dst: Mac,
    eth_src: Mac,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    let mut payload = vec![6, 0, 1, 4, 0, 0, 0, 0];
    payload.extend_from_slice(&tcp_syn(sport, dport));
    ipv6_frame(eth_dst, eth_src, src, dst, 0, 64, payload, None)
}

/// An ICMP error (`icmp_type`, `code`, the 4 bytes after the checksum in `rest`) from `src` to
/// `dst`, embedding `embedded` (an IP packet, whole or cut, as the error's sender saw it).
#[allow(clippy::too_many_arguments)]
pub fn ipv4_icmp_error(
    eth_dst: Mac,
    eth_src: Mac,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    icmp_type: u8,
    code: u8,
    rest: [u8; 4],
    embedded: &[u8],
) -> Vec<u8> {
    let mut icmp = vec![icmp_type, code, 0, 0];
    icmp.extend_from_slice(&rest);
    icmp.extend_from_slice(embedded);
    let sum = internet_checksum(0, &icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut ip = vec![0x45, 0xc0];
    ip.extend_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0x43, 0x21, 0, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let hsum = internet_checksum(0, &ip);
    ip[10..12].copy_from_slice(&hsum.to_be_bytes());
    ip.extend_from_slice(&icmp);
    ethernet(eth_dst, eth_src, ETH_P_IPV4, &ip)
}

/// An ICMPv6 error, as [`ipv4_icmp_error`].
#[allow(clippy::too_many_arguments)]
pub fn ipv6_icmp_error(
    eth_dst: Mac,
    eth_src: Mac,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    icmp_type: u8,
    code: u8,
    rest: [u8; 4],
    embedded: &[u8],
) -> Vec<u8> {
    let mut icmp = vec![icmp_type, code, 0, 0];
    icmp.extend_from_slice(&rest);
    icmp.extend_from_slice(embedded);
    ipv6_frame(eth_dst, eth_src, src, dst, 58, 64, icmp, Some(2))
}

/// True when the ICMP checksum of the IPv4 packet at `l3` (no options) verifies.
pub fn icmpv4_checksum_ok(frame: &[u8], l3: usize) -> bool {
    let total = u16::from_be_bytes([frame[l3 + 2], frame[l3 + 3]]) as usize;
    internet_checksum(0, &frame[l3 + 20..l3 + total]) == 0
}

/// A frame's IP packet (after its 14-byte Ethernet header) put in an outer IPv4 header (IPIP:
/// protocol 4, TTL 64, don't fragment), in a new Ethernet frame.
pub fn ipv4_in_ipv4(
    eth_dst: Mac,
    eth_src: Mac,
    outer_src: Ipv4Addr,
    outer_dst: Ipv4Addr,
    inner: &[u8],
) -> Vec<u8> {
    let packet = &inner[14..];
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + packet.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 4, 0, 0]);
    ip.extend_from_slice(&outer_src.octets());
    ip.extend_from_slice(&outer_dst.octets());
    let check = internet_checksum(0, &ip);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    ip.extend_from_slice(packet);
    ethernet(eth_dst, eth_src, ETH_P_IPV4, &ip)
}

/// A frame's IPv6 packet put in an outer IPv6 header (next header 41, hop limit 64).
pub fn ipv6_in_ipv6(
    eth_dst: Mac,
    eth_src: Mac,
    outer_src: Ipv6Addr,
    outer_dst: Ipv6Addr,
    inner: &[u8],
) -> Vec<u8> {
    let packet = &inner[14..];
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(packet.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[41, 64]);
    ip.extend_from_slice(&outer_src.octets());
    ip.extend_from_slice(&outer_dst.octets());
    ip.extend_from_slice(packet);
    ethernet(eth_dst, eth_src, ETH_P_IPV6, &ip)
}

/// A TCP segment with `flags` and one option, MSS `mss`, in IPv4 (checksums valid).
#[allow(clippy::too_many_arguments)]
pub fn ipv4_tcp_with_mss(
    eth_dst: Mac,
    eth_src: Mac,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    flags: u8,
    mss: u16,
) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&7u32.to_be_bytes());
    t.extend_from_slice(&2u32.to_be_bytes());
    t.extend_from_slice(&[0x60, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t.extend_from_slice(&[2, 4]);
    t.extend_from_slice(&mss.to_be_bytes());
    ipv4_frame(eth_dst, eth_src, src, dst, 6, t, 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_the_rfc_1071_example() {
        // RFC 1071 §3: words 0001 f203 f4f5 f6f7 sum to ddf2 (one's complement 220d).
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(internet_checksum(0, &data), !0xddf2);
    }

    #[test]
    fn built_neighbor_messages_carry_valid_checksums() {
        let ns = neighbor_solicitation(
            [2, 0, 0, 0, 0, 2],
            "fd53:1::2".parse().unwrap(),
            "fd53:1::100".parse().unwrap(),
        );
        assert!(icmpv6_checksum_ok(&ns, 14));
        assert_eq!(ns.len(), 14 + 40 + 32);
        let dad = neighbor_solicitation(
            [2, 0, 0, 0, 0, 2],
            Ipv6Addr::UNSPECIFIED,
            "fd53:1::100".parse().unwrap(),
        );
        assert_eq!(dad.len(), 14 + 40 + 24);
        assert!(icmpv6_checksum_ok(&dad, 14));
    }

    #[test]
    fn solicited_node_address_uses_the_low_24_bits() {
        let (ip, mac) = solicited_node(&"fd53:1::1:2345".parse().unwrap());
        assert_eq!(ip, "ff02::1:ff01:2345".parse::<Ipv6Addr>().unwrap());
        assert_eq!(mac, [0x33, 0x33, 0xff, 0x01, 0x23, 0x45]);
    }

    #[test]
    fn arp_request_is_42_bytes_and_broadcast() {
        let f = arp_request(
            [2, 0, 0, 0, 0, 2],
            Ipv4Addr::new(198, 18, 1, 2),
            Ipv4Addr::new(198, 18, 1, 100),
        );
        assert_eq!(f.len(), 42);
        assert_eq!(&f[..6], &BROADCAST);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
    }
}
