//! Announcing a service IP on a link: a gratuitous ARP (IPv4, RFC 5227 announcement) or an
//! unsolicited Neighbor Advertisement (IPv6, RFC 4861 §7.2.6), sent when Sluice starts answering
//! for an IP, so neighbours with a stale entry (say, after a failover) update it at once.
//!
//! Building the frames is pure; sending them (a raw AF_PACKET socket) is the only effect.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const BROADCAST: [u8; 6] = [0xff; 6];
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// A gratuitous ARP announcing `ip` at `mac`: an ARP request whose sender and target IP are
/// both `ip`, broadcast (RFC 5227 §2.3).
pub fn gratuitous_arp(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&BROADCAST);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip.octets());
    f
}

fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += word as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An unsolicited Neighbor Advertisement for `ip` at `mac` to all nodes: override flag set,
/// solicited flag clear, with the target link-layer address option.
pub fn unsolicited_na(mac: [u8; 6], ip: Ipv6Addr) -> Vec<u8> {
    let mut icmp = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    icmp.extend_from_slice(&ip.octets());
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&mac);
    let mut pseudo = Vec::with_capacity(40);
    pseudo.extend_from_slice(&ip.octets());
    pseudo.extend_from_slice(&ALL_NODES.octets());
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    let partial = pseudo
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
        .sum();
    let sum = checksum(&icmp, partial);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());

    let mut f = Vec::with_capacity(14 + 40 + icmp.len());
    f.extend_from_slice(&ALL_NODES_MAC);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&ALL_NODES.octets());
    f.extend_from_slice(&icmp);
    f
}

/// The announcement frame for `ip` at `mac`.
pub fn announcement(mac: [u8; 6], ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => gratuitous_arp(mac, v4),
        IpAddr::V6(v6) => unsolicited_na(mac, v6),
    }
}

/// Sends the announcement for `ip` out of interface `ifindex` (current network namespace).
pub fn announce(ifindex: u32, mac: [u8; 6], ip: IpAddr) -> std::io::Result<()> {
    announce_all(&[(ifindex, mac, ip)]).remove(0)
}

/// Sends each announcement (interface, MAC, IP) through one packet socket, in order; one
/// result each. One socket for all: closing a packet socket waits for an RCU grace period
/// (milliseconds), so a node taking 5,000 IPs over would otherwise spend a minute in closes.
pub fn announce_all(announcements: &[(u32, [u8; 6], IpAddr)]) -> Vec<std::io::Result<()>> {
    // SAFETY: plain socket(2); the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return announcements
            .iter()
            .map(|_| Err(std::io::Error::new(e.kind(), e.to_string())))
            .collect();
    }
    let results = announcements
        .iter()
        .map(|(ifindex, mac, ip)| {
            let frame = announcement(*mac, *ip);
            // SAFETY: zeroed sockaddr_ll is a valid value, filled in below.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = *ifindex as i32;
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(&frame[..6]);
            // SAFETY: the frame and the address outlive the call; lengths are theirs.
            let rc = unsafe {
                libc::sendto(
                    fd,
                    frame.as_ptr() as *const libc::c_void,
                    frame.len(),
                    0,
                    &addr as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if rc < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        })
        .collect();
    // SAFETY: the fd is ours and closed once.
    unsafe { libc::close(fd) };
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [2, 0x5e, 0, 0, 0, 1];

    #[test]
    fn gratuitous_arp_names_the_ip_as_sender_and_target() {
        let f = gratuitous_arp(MAC, Ipv4Addr::new(198, 51, 100, 10));
        assert_eq!(f.len(), 42);
        assert_eq!(&f[0..6], &BROADCAST);
        assert_eq!(
            &f[20..22],
            &[0, 1],
            "an ARP request (RFC 5227 announcement)"
        );
        assert_eq!(&f[22..28], &MAC);
        assert_eq!(&f[28..32], &[198, 51, 100, 10]);
        assert_eq!(&f[38..42], &[198, 51, 100, 10]);
    }

    #[test]
    fn unsolicited_na_goes_to_all_nodes_with_override_and_a_valid_checksum() {
        let ip: Ipv6Addr = "2001:db8::10".parse().unwrap();
        let f = unsolicited_na(MAC, ip);
        assert_eq!(&f[0..6], &ALL_NODES_MAC);
        assert_eq!(f[21], 255, "hop limit 255");
        assert_eq!(&f[38..54], &ALL_NODES.octets());
        assert_eq!(f[54], 136);
        assert_eq!(f[58], 0x20, "override, not solicited, not router");
        assert_eq!(&f[62..78], &ip.octets());
        assert_eq!(&f[80..86], &MAC, "target link-layer address option");
        // Verify from scratch: the sum over pseudo-header and message is 0xffff.
        let mut sum: u32 = 0;
        for c in f[22..54].chunks(2) {
            sum += u16::from_be_bytes([c[0], c[1]]) as u32;
        }
        sum += 32 + 58;
        assert_eq!(checksum(&f[54..], sum), 0);
    }
}
