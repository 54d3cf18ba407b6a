//! Cluster-wide balancing, frame by frame through BPF_PROG_TEST_RUN: a flow whose backend is on
//! another node leaves encapsulated to that node (IPIP, IPv6 in IPv6), the inner packet as the
//! client sent it; a node decapsulates what the cluster's nodes tunnel to it and balances it to
//! its own backend, replies leaving from there (their SYN-ACK's MSS clamped for the tunnel);
//! tunnelled packets from any other address are dropped and counted.
//!
//! The namespace is `xdp_balancer_packets`'s: veth0 198.18.1.1/24 and fd53:1::1/64 (this node,
//! facing the client), veth1 198.18.2.1/24 and fd53:2::1/64 with neighbour entries for .10–.19
//! (other nodes, and backends).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_userspace::dataplane::{
    Backend, Capacities, Dataplane, Protocol, Service, Tunnels, XdpAction,
};
use sluice_tests::frames::*;

const CLIENT_MAC: Mac = [0x02, 0xc1, 0, 0, 0, 2];
const NODE_MAC: Mac = [0x02, 0x5e, 0, 0, 0, 1];
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 100);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
/// This node, and the other nodes (with neighbour entries on veth1).
const HERE4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const NODE_B4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 11);
const NODE_C4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 12);
const POD4: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);

fn vip6() -> Ipv6Addr {
    "fd53:1::100".parse().unwrap()
}
fn client6() -> Ipv6Addr {
    "fd53:1::2".parse().unwrap()
}
fn here6() -> Ipv6Addr {
    "fd53:1::1".parse().unwrap()
}
fn node_b6() -> Ipv6Addr {
    "fd53:2::11".parse().unwrap()
}
fn node_mac(last: u8) -> Mac {
    [0x02, 0xbe, 0, 0, 0, last]
}

fn tcp80(vip: IpAddr) -> Service {
    Service {
        vip,
        port: 80,
        protocol: Protocol::Tcp,
    }
}

fn on_node(ip: IpAddr, node: Option<IpAddr>) -> Backend {
    Backend {
        ip,
        port: 8080,
        weight: 1,
        node,
    }
}

fn tunnels(peers: &[IpAddr], mtu: u32) -> Tunnels {
    Tunnels {
        local_v4: Some(HERE4),
        local_v6: Some(here6()),
        mtu,
        peers: peers.iter().copied().collect(),
    }
}

fn lab<T: Send + 'static>(f: impl FnOnce(&mut Dataplane, u32, [u8; 6]) -> T + Send + 'static) -> T {
    let capacities = Capacities {
        services: 16,
        backends: 64,
        flows: 1024,
    };
    sluice_tests::balancer_lab(true, capacities, 1009, f)
}

#[test]
fn a_flow_to_a_backend_on_another_node_leaves_in_ipip_to_that_node_with_the_packet_as_sent() {
    lab(|dp, veth0, veth1_mac| {
        dp.set_tunnels(&tunnels(&[NODE_B4.into()], 1500)).unwrap();
        let service = tcp80(VIP4.into());
        dp.upsert_service(service, &[on_node(POD4.into(), Some(NODE_B4.into()))])
            .unwrap();
        let syn = ipv4_tcp_syn(NODE_MAC, CLIENT_MAC, CLIENT4, VIP4, 40000, 80);
        let out = dp.run_ingress(veth0, &syn).unwrap();
        assert_eq!(out.action, XdpAction::Redirect, "to node B's next hop");
        let f = &out.frame;
        assert_eq!(f.len(), syn.len() + 20, "one outer IPv4 header more");
        assert_eq!(&f[0..6], &node_mac(11), "to node B's MAC");
        assert_eq!(&f[6..12], &veth1_mac, "from the way out");
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        // The outer header: IPIP from this node to node B, DF, TTL 64, valid checksum.
        assert_eq!(f[14], 0x45);
        assert_eq!(
            u16::from_be_bytes([f[16], f[17]]) as usize,
            syn.len() - 14 + 20
        );
        assert_eq!(&f[20..22], &[0x40, 0x00], "don't fragment");
        assert_eq!((f[22], f[23]), (64, 4), "TTL 64, protocol IPIP");
        assert_eq!(&f[26..30], &HERE4.octets());
        assert_eq!(&f[30..34], &NODE_B4.octets());
        assert!(ipv4_header_checksum_ok(f, 14), "outer header checksum");
        // Inside: the client's packet, byte for byte (node B rewrites it).
        assert_eq!(&f[34..], &syn[14..]);

        // The flow is tracked: its next packet takes the same way (the flow cache's path).
        let out = dp.run_ingress(veth0, &syn).unwrap();
        assert_eq!(&out.frame[34..], &syn[14..]);
        assert_eq!(&out.frame[30..34], &NODE_B4.octets());
        let stats = dp.stats().unwrap();
        assert_eq!(stats.tunnel_out, 2);
        assert_eq!(stats.lb_forwarded, 0);
    });
}

#[test]
fn an_ipv6_flow_to_a_backend_on_another_node_leaves_in_ipv6_in_ipv6() {
    lab(|dp, veth0, _| {
        dp.set_tunnels(&tunnels(&[node_b6().into()], 1500)).unwrap();
        let pod6: Ipv6Addr = "fd00:10:244:2::2".parse().unwrap();
        dp.upsert_service(
            tcp80(vip6().into()),
            &[on_node(pod6.into(), Some(node_b6().into()))],
        )
        .unwrap();
        let mut syn = ipv6_tcp_syn(NODE_MAC, CLIENT_MAC, client6(), vip6(), 40000, 80);
        // A flow label (the IPv6 header has no checksum; the TCP one does not cover it).
        syn[15..18].copy_from_slice(&[0x0a, 0xbc, 0xde]);
        let out = dp.run_ingress(veth0, &syn).unwrap();
        assert_eq!(out.action, XdpAction::Redirect);
        let f = &out.frame;
        assert_eq!(f.len(), syn.len() + 40);
        assert_eq!(
            &f[14..18],
            &syn[14..18],
            "version, class and flow label of the inner"
        );
        assert_eq!(u16::from_be_bytes([f[18], f[19]]) as usize, syn.len() - 14);
        assert_eq!((f[20], f[21]), (41, 64), "next header IPv6, hop limit 64");
        assert_eq!(&f[22..38], &here6().octets());
        assert_eq!(&f[38..54], &node_b6().octets());
        assert_eq!(&f[54..], &syn[14..]);
    });
}

#[test]
fn a_node_decapsulates_what_another_node_tunnels_to_it_and_balances_it_to_its_own_backend() {
    lab(|dp, veth0, veth1_mac| {
        // This node (198.18.1.1) holds the backend 198.18.2.14; node B tunnels the flow here.
        dp.set_tunnels(&tunnels(&[NODE_B4.into()], 1500)).unwrap();
        let backend = Ipv4Addr::new(198, 18, 2, 14);
        dp.upsert_service(tcp80(VIP4.into()), &[on_node(backend.into(), None)])
            .unwrap();
        let syn = ipv4_tcp_syn(NODE_MAC, CLIENT_MAC, CLIENT4, VIP4, 40000, 80);
        let tunnelled = ipv4_in_ipv4(NODE_MAC, node_mac(11), NODE_B4, HERE4, &syn);
        let out = dp.run_ingress(veth0, &tunnelled).unwrap();
        assert_eq!(out.action, XdpAction::Redirect);
        let f = &out.frame;
        assert_eq!(f.len(), syn.len(), "the outer header is gone");
        assert_eq!(&f[0..6], &node_mac(14));
        assert_eq!(&f[6..12], &veth1_mac);
        assert_eq!(&f[26..30], &CLIENT4.octets(), "the client's own address");
        assert_eq!(&f[30..34], &backend.octets(), "DNAT to the backend");
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 8080);
        assert!(ipv4_header_checksum_ok(f, 14));
        assert!(l4_checksum_ok(f, 14));
        let peers = dp.tunnel_peers().unwrap();
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].0, IpAddr::from(NODE_B4));
        assert_eq!(peers[0].1.packets, 1, "counted as node B's");
        assert_eq!(peers[0].1.bytes, tunnelled.len() as u64);

        // The backend's SYN-ACK leaves from here, straight to the client, from the VIP, its
        // MSS clamped so that the client's segments fit the tunnel: 1500 − 20 − 20 − 20.
        let syn_ack = ipv4_tcp_with_mss(
            CLIENT_MAC,
            node_mac(14),
            backend,
            CLIENT4,
            8080,
            40000,
            0x12,
            1460,
        );
        let reply = dp.run_egress(&syn_ack).unwrap();
        assert_eq!(&reply[26..30], &VIP4.octets());
        assert_eq!(u16::from_be_bytes([reply[34], reply[35]]), 80);
        assert_eq!(u16::from_be_bytes([reply[56], reply[57]]), 1440, "MSS");
        assert!(l4_checksum_ok(&reply, 14), "TCP checksum after the clamp");
        // A smaller MSS stays as it is.
        let small = ipv4_tcp_with_mss(
            CLIENT_MAC,
            node_mac(14),
            backend,
            CLIENT4,
            8080,
            40000,
            0x12,
            1200,
        );
        let reply = dp.run_egress(&small).unwrap();
        assert_eq!(u16::from_be_bytes([reply[56], reply[57]]), 1200);
        assert!(l4_checksum_ok(&reply, 14));
    });
}

#[test]
fn a_flow_that_came_straight_here_keeps_its_mss() {
    lab(|dp, veth0, _| {
        dp.set_tunnels(&tunnels(&[NODE_B4.into()], 1500)).unwrap();
        let backend = Ipv4Addr::new(198, 18, 2, 14);
        dp.upsert_service(tcp80(VIP4.into()), &[on_node(backend.into(), None)])
            .unwrap();
        let syn = ipv4_tcp_syn(NODE_MAC, CLIENT_MAC, CLIENT4, VIP4, 40001, 80);
        dp.run_ingress(veth0, &syn).unwrap();
        let syn_ack = ipv4_tcp_with_mss(
            CLIENT_MAC,
            node_mac(14),
            backend,
            CLIENT4,
            8080,
            40001,
            0x12,
            1460,
        );
        let reply = dp.run_egress(&syn_ack).unwrap();
        assert_eq!(&reply[26..30], &VIP4.octets());
        assert_eq!(u16::from_be_bytes([reply[56], reply[57]]), 1460);
    });
}

#[test]
fn an_ipv6_packet_tunnelled_from_a_node_is_decapsulated_and_balanced() {
    lab(|dp, veth0, _| {
        dp.set_tunnels(&tunnels(&[node_b6().into()], 1500)).unwrap();
        // fd53:2::e: a backend with a neighbour entry (10–19 in hex).
        let backend: Ipv6Addr = "fd53:2::e".parse().unwrap();
        dp.upsert_service(tcp80(vip6().into()), &[on_node(backend.into(), None)])
            .unwrap();
        let syn = ipv6_tcp_syn(NODE_MAC, CLIENT_MAC, client6(), vip6(), 40000, 80);
        let tunnelled = ipv6_in_ipv6(NODE_MAC, node_mac(11), node_b6(), here6(), &syn);
        let out = dp.run_ingress(veth0, &tunnelled).unwrap();
        assert_eq!(out.action, XdpAction::Redirect);
        let f = &out.frame;
        assert_eq!(f.len(), syn.len());
        assert_eq!(&f[22..38], &client6().octets());
        assert_eq!(&f[38..54], &backend.octets());
        assert!(l4_checksum_ok(f, 14));
    });
}

#[test]
fn tunnelled_packets_from_an_address_that_is_not_a_node_are_dropped_and_counted() {
    lab(|dp, veth0, _| {
        dp.set_tunnels(&tunnels(&[NODE_B4.into(), node_b6().into()], 1500))
            .unwrap();
        dp.upsert_service(
            tcp80(VIP4.into()),
            &[on_node(Ipv4Addr::new(198, 18, 2, 14).into(), None)],
        )
        .unwrap();
        dp.upsert_service(
            tcp80(vip6().into()),
            &[on_node("fd53:2::14".parse().unwrap(), None)],
        )
        .unwrap();
        let forger = Ipv4Addr::new(198, 18, 1, 66);
        let syn = ipv4_tcp_syn(NODE_MAC, CLIENT_MAC, CLIENT4, VIP4, 40000, 80);
        let forged = ipv4_in_ipv4(NODE_MAC, CLIENT_MAC, forger, HERE4, &syn);
        let out = dp.run_ingress(veth0, &forged).unwrap();
        assert_eq!(out.action, XdpAction::Drop);
        let syn6 = ipv6_tcp_syn(NODE_MAC, CLIENT_MAC, client6(), vip6(), 40000, 80);
        let forged6 = ipv6_in_ipv6(
            NODE_MAC,
            CLIENT_MAC,
            "fd53:1::66".parse().unwrap(),
            here6(),
            &syn6,
        );
        assert_eq!(
            dp.run_ingress(veth0, &forged6).unwrap().action,
            XdpAction::Drop
        );
        assert_eq!(dp.stats().unwrap().tunnel_forged, 2);
        assert_eq!(dp.flow_count().unwrap(), 0, "nothing tracked");

        // Another tunnel's traffic (not to a service: Calico's IPIP, say) passes untouched,
        // from a node or not; so does a tunnel to another address than this node's.
        let other = ipv4_tcp_syn(
            NODE_MAC,
            CLIENT_MAC,
            CLIENT4,
            Ipv4Addr::new(10, 244, 1, 2),
            1,
            2,
        );
        for from in [forger, NODE_B4] {
            let frame = ipv4_in_ipv4(NODE_MAC, CLIENT_MAC, from, HERE4, &other);
            let out = dp.run_ingress(veth0, &frame).unwrap();
            assert_eq!(out.action, XdpAction::Pass);
            assert_eq!(out.frame, frame);
        }
        let elsewhere = ipv4_in_ipv4(NODE_MAC, CLIENT_MAC, NODE_B4, NODE_C4, &syn);
        let out = dp.run_ingress(veth0, &elsewhere).unwrap();
        assert_eq!((out.action, out.frame), (XdpAction::Pass, elsewhere));
        // Once node B leaves the cluster, its tunnelled packets are forged too.
        dp.set_tunnels(&tunnels(&[], 1500)).unwrap();
        let late = ipv4_in_ipv4(NODE_MAC, node_mac(11), NODE_B4, HERE4, &syn);
        assert_eq!(
            dp.run_ingress(veth0, &late).unwrap().action,
            XdpAction::Drop
        );
        assert_eq!(dp.stats().unwrap().tunnel_forged, 3);
    });
}

#[test]
fn a_tunnelled_packet_whose_flow_this_node_would_send_elsewhere_is_dropped_not_tunnelled_again() {
    lab(|dp, veth0, _| {
        // This node's table says node C: node B's says here. Tunnelling on could loop.
        dp.set_tunnels(&tunnels(&[NODE_B4.into(), NODE_C4.into()], 1500))
            .unwrap();
        dp.upsert_service(
            tcp80(VIP4.into()),
            &[on_node(POD4.into(), Some(NODE_C4.into()))],
        )
        .unwrap();
        let syn = ipv4_tcp_syn(NODE_MAC, CLIENT_MAC, CLIENT4, VIP4, 40000, 80);
        let tunnelled = ipv4_in_ipv4(NODE_MAC, node_mac(11), NODE_B4, HERE4, &syn);
        let out = dp.run_ingress(veth0, &tunnelled).unwrap();
        assert_eq!(out.action, XdpAction::Drop);
        let stats = dp.stats().unwrap();
        assert_eq!((stats.tunnel_mismatch, stats.tunnel_out), (1, 0));
    });
}

#[test]
fn a_packet_too_big_for_the_node_network_once_encapsulated_gets_an_icmp_error_with_the_mtu_that_fits(
) {
    lab(|dp, veth0, _| {
        dp.set_tunnels(&tunnels(&[NODE_B4.into(), node_b6().into()], 1500))
            .unwrap();
        let service = Service {
            vip: VIP4.into(),
            port: 53,
            protocol: Protocol::Udp,
        };
        dp.upsert_service(service, &[on_node(POD4.into(), Some(NODE_B4.into()))])
            .unwrap();
        // 1480 bytes of IP fit 1500 with the outer header; 1481 do not.
        let fits = ipv4_udp(
            NODE_MAC,
            CLIENT_MAC,
            CLIENT4,
            VIP4,
            5000,
            53,
            &[7; 1480 - 28],
        );
        let out = dp.run_ingress(veth0, &fits).unwrap();
        assert_eq!(out.action, XdpAction::Redirect);
        assert_eq!(out.frame.len(), 14 + 1500);
        let big = ipv4_udp(
            NODE_MAC,
            CLIENT_MAC,
            CLIENT4,
            VIP4,
            5000,
            53,
            &[7; 1481 - 28],
        );
        let out = dp.run_ingress(veth0, &big).unwrap();
        assert_eq!(out.action, XdpAction::Tx, "back to the sender");
        let f = &out.frame;
        assert_eq!(
            f.len(),
            14 + 20 + 8 + 28,
            "IP, ICMP, the quoted header and 8 bytes"
        );
        assert_eq!(&f[0..6], &CLIENT_MAC);
        assert_eq!(&f[6..12], &NODE_MAC);
        assert_eq!(f[23], 1, "ICMP");
        assert_eq!(&f[26..30], &VIP4.octets(), "from the service's address");
        assert_eq!(&f[30..34], &CLIENT4.octets());
        assert!(ipv4_header_checksum_ok(f, 14));
        assert_eq!((f[34], f[35]), (3, 4), "fragmentation needed");
        assert_eq!(
            u16::from_be_bytes([f[40], f[41]]),
            1480,
            "the MTU that fits"
        );
        assert_eq!(&f[42..70], &big[14..42], "the packet's header and 8 bytes");
        assert!(icmpv4_checksum_ok(f, 14));
        assert_eq!(dp.stats().unwrap().tunnel_too_big, 1);

        // IPv6: packet too big, quoting the header and 8 bytes.
        let pod6: Ipv6Addr = "fd00:10:244:2::2".parse().unwrap();
        let service6 = Service {
            vip: vip6().into(),
            ..service
        };
        dp.upsert_service(service6, &[on_node(pod6.into(), Some(node_b6().into()))])
            .unwrap();
        let big6 = ipv6_udp(
            NODE_MAC,
            CLIENT_MAC,
            client6(),
            vip6(),
            5000,
            53,
            &[7; 1461 - 48],
        );
        let out = dp.run_ingress(veth0, &big6).unwrap();
        assert_eq!(out.action, XdpAction::Tx);
        let f = &out.frame;
        assert_eq!(f.len(), 14 + 40 + 8 + 48);
        assert_eq!(&f[0..6], &CLIENT_MAC);
        assert_eq!(f[20], 58, "ICMPv6");
        assert_eq!(&f[22..38], &vip6().octets());
        assert_eq!(&f[38..54], &client6().octets());
        assert_eq!((f[54], f[55]), (2, 0), "packet too big");
        assert_eq!(u32::from_be_bytes([f[58], f[59], f[60], f[61]]), 1460);
        assert_eq!(&f[62..110], &big6[14..62]);
        assert!(icmpv6_checksum_ok(f, 14));
        assert_eq!(dp.stats().unwrap().tunnel_too_big, 2);
    });
}

#[test]
fn a_backend_on_another_node_needs_this_nodes_end_of_a_tunnel_of_its_family() {
    lab(|dp, _, _| {
        let service = tcp80(VIP4.into());
        let remote = [on_node(POD4.into(), Some(NODE_B4.into()))];
        let err = dp.upsert_service(service, &remote).unwrap_err().to_string();
        assert!(err.contains("no IPv4 address for tunnels"), "{err}");
        let mixed = [on_node(POD4.into(), Some(node_b6().into()))];
        dp.set_tunnels(&tunnels(&[], 1500)).unwrap();
        let err = dp.upsert_service(service, &mixed).unwrap_err().to_string();
        assert!(err.contains("another address family"), "{err}");
        assert!(dp.services().is_empty(), "nothing written");
        dp.upsert_service(service, &remote).unwrap();
        assert_eq!(
            dp.services()[0].1,
            remote.to_vec(),
            "read back with its node"
        );
    });
}

/// The first tunnel slot of an IPv4 node (lb-common's `tunnel_slot`).
fn first_slot(ip: Ipv4Addr) -> u32 {
    let words = [u32::from_ne_bytes(ip.octets()), 0, 0, 0];
    lb_common::tunnel_slot(&words, lb_common::FAMILY_IPV4)
}

#[test]
fn a_node_whose_slots_are_all_taken_is_still_accepted_and_counted_through_the_hash_of_nodes() {
    // As many nodes as there are probes, with node B's first slot and sorting before it, take
    // every slot node B could have: node B is checked in the hash of nodes alone.
    let target = first_slot(NODE_B4);
    let crowd: Vec<Ipv4Addr> = (0..1u32 << 24)
        .map(|n| Ipv4Addr::from(0x0a00_0000 + n))
        .filter(|ip| first_slot(*ip) == target)
        .take(lb_common::TUNNEL_SLOT_PROBES as usize)
        .collect();
    assert_eq!(crowd.len(), lb_common::TUNNEL_SLOT_PROBES as usize);
    lab(move |dp, veth0, _| {
        let mut peers: Vec<IpAddr> = crowd.iter().map(|ip| IpAddr::from(*ip)).collect();
        peers.push(NODE_B4.into());
        dp.set_tunnels(&tunnels(&peers, 1500)).unwrap();
        let backend = Ipv4Addr::new(198, 18, 2, 14);
        dp.upsert_service(tcp80(VIP4.into()), &[on_node(backend.into(), None)])
            .unwrap();
        let syn = ipv4_tcp_syn(NODE_MAC, CLIENT_MAC, CLIENT4, VIP4, 40000, 80);
        // From node B (no slot) and from one of the crowd (a slot): both balanced, each
        // counted as its own.
        for (from, port) in [(NODE_B4, 40000), (crowd[3], 40001)] {
            let syn = ipv4_tcp_syn(NODE_MAC, CLIENT_MAC, CLIENT4, VIP4, port, 80);
            let frame = ipv4_in_ipv4(NODE_MAC, node_mac(11), from, HERE4, &syn);
            let out = dp.run_ingress(veth0, &frame).unwrap();
            assert_eq!(out.action, XdpAction::Redirect, "from {from}");
            assert_eq!(&out.frame[30..34], &backend.octets());
        }
        let counted = dp.tunnel_peers().unwrap();
        let of = |ip: Ipv4Addr| {
            counted
                .iter()
                .find(|(n, _)| *n == IpAddr::from(ip))
                .map(|(_, s)| s.packets)
        };
        assert_eq!(of(NODE_B4), Some(1));
        assert_eq!(of(crowd[3]), Some(1));
        assert_eq!(of(crowd[0]), Some(0));
        assert_eq!(dp.stats().unwrap().tunnel_forged, 0);

        // One of the crowd leaves: its slot is cleared, its packets are forged; node B still
        // passes (a forged sender with node B's first slot is checked in the hash too).
        let gone = crowd[3];
        let fewer: Vec<IpAddr> = peers
            .iter()
            .filter(|p| **p != IpAddr::from(gone))
            .copied()
            .collect();
        dp.set_tunnels(&tunnels(&fewer, 1500)).unwrap();
        let late = ipv4_in_ipv4(NODE_MAC, node_mac(11), gone, HERE4, &syn);
        assert_eq!(
            dp.run_ingress(veth0, &late).unwrap().action,
            XdpAction::Drop
        );
        assert_eq!(dp.stats().unwrap().tunnel_forged, 1);
        let again = ipv4_in_ipv4(NODE_MAC, node_mac(11), NODE_B4, HERE4, &syn);
        assert_eq!(
            dp.run_ingress(veth0, &again).unwrap().action,
            XdpAction::Redirect
        );
    });
}
