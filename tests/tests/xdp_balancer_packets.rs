//! The XDP balancer and the TC reverse NAT, frame by frame, through BPF_PROG_TEST_RUN.
//!
//! A private network namespace holds veth0 (the client side, 198.18.1.1/24, fd53:1::1/64) and
//! veth1 (the backends' side, 198.18.2.1/24, fd53:2::1/64) with permanent neighbour entries for
//! the backends, so the program's FIB lookups resolve. Which backend a flow must get is predicted
//! with `maglev::build` and `lb_common::flow_hash`, outside the program; checksums are recomputed
//! from scratch by `sluice_tests::frames`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{flow_hash, FlowKey, FAMILY_IPV4, FAMILY_IPV6, PROTO_TCP};
use lb_userspace::{
    dataplane::{
        self, Backend, Capacities, Dataplane, DataplaneError, DataplaneOptions, Protocol, Service,
        XdpAction,
    },
    maglev,
};
use sluice_tests::{frames::*, require_root};

const M: u32 = 1009;
const CLIENT_MAC: Mac = [0x02, 0xc1, 0, 0, 0, 2];
const NODE_MAC: Mac = [0x02, 0x5e, 0, 0, 0, 1];
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 100);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);

fn vip6() -> Ipv6Addr {
    "fd53:1::100".parse().unwrap()
}
fn client6() -> Ipv6Addr {
    "fd53:1::2".parse().unwrap()
}
fn backend_mac(last: u8) -> Mac {
    [0x02, 0xbe, 0, 0, 0, last]
}
fn b4(last: u8) -> Backend {
    Backend {
        ip: IpAddr::V4(Ipv4Addr::new(198, 18, 2, last)),
        port: 8080,
        weight: 1,
        node: None,
    }
}
fn b6(last: u16) -> Backend {
    Backend {
        ip: IpAddr::V6(Ipv6Addr::new(0xfd53, 2, 0, 0, 0, 0, 0, last)),
        port: 8080,
        weight: 1,
        node: None,
    }
}
fn tcp80() -> Service {
    Service {
        vip: IpAddr::V4(VIP4),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

/// Backends 198.18.2.10..=19 and fd53:2::10..=19 have neighbour entries; .99 does not.
fn lab<T: Send + 'static>(f: impl FnOnce(&mut Dataplane, u32, [u8; 6]) -> T + Send + 'static) -> T {
    lab_with(true, f)
}

/// `allow_veth1`: whether veth1 is a redirect target (a veth is one only when the operator says
/// its peer runs XDP; BPF_PROG_TEST_RUN never transmits, so the peer does not matter here).
fn lab_with<T: Send + 'static>(
    allow_veth1: bool,
    f: impl FnOnce(&mut Dataplane, u32, [u8; 6]) -> T + Send + 'static,
) -> T {
    lab_sized(
        allow_veth1,
        Capacities {
            services: 64,
            backends: 256,
            flows: 4096,
        },
        f,
    )
}

fn lab_sized<T: Send + 'static>(
    allow_veth1: bool,
    capacities: Capacities,
    f: impl FnOnce(&mut Dataplane, u32, [u8; 6]) -> T + Send + 'static,
) -> T {
    sluice_tests::balancer_lab(allow_veth1, capacities, M, f)
}

fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => {
            let mut a = [0; 16];
            a[..4].copy_from_slice(&v4.octets());
            a
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The backend Maglev gives a new flow, computed outside the program.
fn predict(
    backends: &[Backend],
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    proto: u8,
) -> Backend {
    let table = maglev::build(
        &backends
            .iter()
            .map(|b| maglev::Backend {
                key: b.maglev_key(),
                weight: b.weight,
            })
            .collect::<Vec<_>>(),
        M,
    )
    .unwrap();
    let key = FlowKey {
        src: addr16(src),
        dst: addr16(dst),
        sport: sport.to_be_bytes(),
        dport: dport.to_be_bytes(),
        proto,
        family: if src.is_ipv4() {
            FAMILY_IPV4
        } else {
            FAMILY_IPV6
        },
        _pad: [0; 2],
    };
    backends[table.slots[(flow_hash(&key) % M) as usize] as usize]
}

fn syn4(sport: u16, dport: u16) -> Vec<u8> {
    ipv4_tcp_syn(NODE_MAC, CLIENT_MAC, CLIENT4, VIP4, sport, dport)
}

/// Which backend (by IPv4 address and port) an IPv4 frame out of the program goes to.
fn dest4(frame: &[u8]) -> (IpAddr, u16) {
    (
        IpAddr::V4(Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33])),
        u16::from_be_bytes([frame[36], frame[37]]),
    )
}

/// Asserts a DNAT'd IPv4 frame: only MACs, TTL, destination, port and checksums changed, and
/// both checksums verify from scratch.
fn assert_dnat4(input: &[u8], out: &[u8], to: &Backend, dst_mac: Mac, src_mac: Mac) {
    assert_eq!(out.len(), input.len());
    assert_eq!(
        &out[0..6],
        &dst_mac,
        "destination MAC: the backend's neighbour entry"
    );
    assert_eq!(&out[6..12], &src_mac, "source MAC: the egress interface");
    assert_eq!(dest4(out), (to.ip, to.port));
    assert_eq!(out[22], input[22] - 1, "TTL decremented");
    assert!(ipv4_header_checksum_ok(out, 14), "IPv4 header checksum");
    assert!(l4_checksum_ok(out, 14), "TCP/UDP checksum");
    let l4_csum = if input[23] == 6 { 50 } else { 40 };
    let allowed: Vec<usize> = (0..12)
        .chain([22, 24, 25])
        .chain(30..34)
        .chain([36, 37, l4_csum, l4_csum + 1])
        .collect();
    for (i, (a, b)) in input.iter().zip(out).enumerate() {
        assert!(
            a == b || allowed.contains(&i),
            "byte {i} changed: {a:#04x} → {b:#04x}"
        );
    }
}

#[test]
fn new_tcp_flow_goes_to_the_backend_maglev_predicts_with_valid_checksums() {
    lab(|dp, veth0, veth1_mac| {
        let backends = [b4(10), b4(11), b4(12)];
        dp.upsert_service(tcp80(), &backends).unwrap();
        for sport in [40000u16, 40001, 40002, 51515, 60000] {
            let frame = syn4(sport, 80);
            let out = dp.run_ingress(veth0, &frame).unwrap();
            let want = predict(
                &backends,
                IpAddr::V4(CLIENT4),
                IpAddr::V4(VIP4),
                sport,
                80,
                PROTO_TCP,
            );
            let last = match want.ip {
                IpAddr::V4(v4) => v4.octets()[3],
                _ => unreachable!(),
            };
            assert_eq!(
                out.action,
                XdpAction::Redirect,
                "to veth1, not the ingress interface"
            );
            assert_dnat4(&frame, &out.frame, &want, backend_mac(last), veth1_mac);
        }
        assert_eq!(dp.flow_count().unwrap(), 5);
    });
}

/// Which backend an IPv4 SYN from the client's `sport` to the VIP's `port` is sent to.
fn backend_of(dp: &Dataplane, veth0: u32, sport: u16, port: u16) -> (IpAddr, u16) {
    let out = dp.run_ingress(veth0, &syn4(sport, port)).unwrap();
    assert_eq!(out.action, XdpAction::Redirect, "port {port}");
    dest4(&out.frame)
}

#[test]
fn a_sync_of_many_services_switches_in_every_table_across_batches_and_a_resync_changes_only_what_changed(
) {
    type Wanted = std::collections::BTreeMap<Service, Vec<Backend>>;
    lab_sized(
        true,
        Capacities {
            services: 700,
            backends: 2048,
            flows: 4096,
        },
        |dp, veth0, _| {
            // 600 services (tables switched in batches of 256), two of the ten backends each.
            let backends_of = |port: u16, shift: u8| {
                let first = (port % 10) as u8;
                vec![b4(10 + first), b4(10 + (first + 1 + shift) % 10)]
            };
            let service = |port: u16| Service { port, ..tcp80() };
            // New flows from `sport` to a sample of ports, spread over every batch, go where
            // Maglev over the wanted backends says.
            let check = |dp: &Dataplane, wanted: &Wanted, sport: u16| {
                let ports = (2..=600u16)
                    .step_by(37)
                    .chain([255, 256, 257, 511, 512, 513, 600]);
                for port in ports {
                    let want = predict(
                        &wanted[&service(port)],
                        IpAddr::V4(CLIENT4),
                        IpAddr::V4(VIP4),
                        sport,
                        port,
                        PROTO_TCP,
                    );
                    assert_eq!(
                        backend_of(dp, veth0, sport, port),
                        (want.ip, want.port),
                        "port {port}"
                    );
                }
            };
            let mut wanted: Wanted = (1..=600u16)
                .map(|port| (service(port), backends_of(port, 0)))
                .collect();
            dp.sync(&[], &wanted, &[]).unwrap();
            assert_eq!(dp.services().len(), 600);
            check(dp, &wanted, 41000);

            // Flows established to port 3 from many source ports; then every third service
            // (port 3 among them) swaps its second backend, and service 1 goes.
            let established: Vec<(u16, (IpAddr, u16))> = (50000..50040u16)
                .map(|sport| (sport, backend_of(dp, veth0, sport, 3)))
                .collect();
            for port in (3..=600u16).step_by(3) {
                wanted.insert(service(port), backends_of(port, 4));
            }
            wanted.remove(&service(1));
            dp.sync(&[], &wanted, &[]).unwrap();
            assert_eq!(dp.services().len(), 599);
            check(dp, &wanted, 42000);
            // Port 3's flows to the backend that stayed stay with it; the others moved.
            let stayed = backends_of(3, 0)[0];
            for (sport, before) in &established {
                let now = backend_of(dp, veth0, *sport, 3);
                if *before == (stayed.ip, stayed.port) {
                    assert_eq!(now, *before, "sport {sport}");
                } else {
                    assert_ne!(now, *before, "sport {sport}: its backend left");
                }
            }
            // A removed service is not balanced any more.
            let out = dp.run_ingress(veth0, &syn4(41000, 1)).unwrap();
            assert_eq!(out.action, XdpAction::Pass);
        },
    );
}

#[test]
fn syncing_change_after_change_leaves_the_same_tables_as_one_sync_of_the_end_state_on_random_changes(
) {
    type Wanted = std::collections::BTreeMap<Service, Vec<Backend>>;
    let capacities = Capacities {
        services: 128,
        backends: 1024,
        flows: 8192,
    };
    lab_sized(true, capacities, move |dp, veth0, _| {
        let mut seed = 0x51_u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as u32
        };
        let service = |port: u16| Service { port, ..tcp80() };
        let mut wanted = Wanted::new();
        for _ in 0..30 {
            // Each step adds, changes or removes a few of 80 possible services; backends are
            // 1 to 4 of the ten, with weights 1 to 3.
            for _ in 0..1 + next() % 12 {
                let port = 1 + (next() % 80) as u16;
                if next() % 4 == 0 {
                    wanted.remove(&service(port));
                } else {
                    let mut backends: Vec<Backend> = Vec::new();
                    for _ in 0..1 + next() % 4 {
                        let b = Backend {
                            weight: 1 + next() % 3,
                            node: None,
                            ..b4(10 + (next() % 10) as u8)
                        };
                        if !backends.iter().any(|x| x.ip == b.ip) {
                            backends.push(b);
                        }
                    }
                    wanted.insert(service(port), backends);
                }
            }
            dp.sync(&[], &wanted, &[]).unwrap();
        }
        let fresh = Dataplane::load(&DataplaneOptions {
            pin_dir: None,
            capacities,
            maglev_table_size: M,
            ..DataplaneOptions::default()
        })
        .unwrap();
        let mut fresh = fresh;
        fresh
            .allow_redirect(dataplane::interface("veth1").unwrap().ifindex)
            .unwrap();
        fresh.sync(&[], &wanted, &[]).unwrap();
        assert_eq!(dp.services(), fresh.services());
        // New flows (source ports no flow used) go to the same backend through both.
        let mut compared = 0;
        for port in 1..=80u16 {
            for sport in [61000u16, 61001, 61002] {
                let a = dp.run_ingress(veth0, &syn4(sport, port)).unwrap();
                let b = fresh.run_ingress(veth0, &syn4(sport, port)).unwrap();
                assert_eq!(a.action, b.action, "port {port}");
                if wanted.contains_key(&service(port)) {
                    assert_eq!(a.action, XdpAction::Redirect, "port {port}");
                    assert_eq!(
                        dest4(&a.frame),
                        dest4(&b.frame),
                        "port {port}, sport {sport}"
                    );
                    compared += 1;
                }
            }
        }
        assert!(compared > 60, "{compared}");
    });
}

#[test]
fn established_flows_keep_their_backend_when_the_set_changes_while_it_exists() {
    lab(|dp, veth0, _| {
        let first = [b4(10), b4(11), b4(12)];
        dp.upsert_service(tcp80(), &first).unwrap();
        let sports: Vec<u16> = (41000..41060).collect();
        let before: Vec<(IpAddr, u16)> = sports
            .iter()
            .map(|p| dest4(&dp.run_ingress(veth0, &syn4(*p, 80)).unwrap().frame))
            .collect();
        // Adding a backend moves no established flow.
        let grown = [b4(10), b4(11), b4(12), b4(13)];
        dp.set_backends(&tcp80(), &grown).unwrap();
        for (p, was) in sports.iter().zip(&before) {
            assert_eq!(
                dest4(&dp.run_ingress(veth0, &syn4(*p, 80)).unwrap().frame),
                *was,
                "sport {p}"
            );
        }
        // Removing backend .11 moves exactly its flows, to where Maglev now sends them.
        let shrunk = [b4(10), b4(12), b4(13)];
        dp.set_backends(&tcp80(), &shrunk).unwrap();
        let removed = b4(11);
        let mut moved = 0;
        for (p, was) in sports.iter().zip(&before) {
            let now = dest4(&dp.run_ingress(veth0, &syn4(*p, 80)).unwrap().frame);
            if *was == (removed.ip, removed.port) {
                let want = predict(
                    &shrunk,
                    IpAddr::V4(CLIENT4),
                    IpAddr::V4(VIP4),
                    *p,
                    80,
                    PROTO_TCP,
                );
                assert_eq!(now, (want.ip, want.port), "sport {p} re-balanced by Maglev");
                moved += 1;
            } else {
                assert_eq!(now, *was, "sport {p} kept its backend");
            }
        }
        assert!(moved > 0, "some of the 60 flows were on .11");
    });
}

#[test]
fn udp_ipv6_and_reverse_nat_rewrite_with_valid_checksums() {
    lab(|dp, veth0, veth1_mac| {
        let udp53 = Service {
            vip: IpAddr::V4(VIP4),
            port: 53,
            protocol: Protocol::Udp,
        };
        dp.upsert_service(udp53, &[b4(14)]).unwrap();
        let query = ipv4_udp(NODE_MAC, CLIENT_MAC, CLIENT4, VIP4, 33333, 53, b"query");
        let out = dp.run_ingress(veth0, &query).unwrap();
        assert_eq!(out.action, XdpAction::Redirect);
        assert_dnat4(
            &query,
            &out.frame,
            &Backend {
                port: 8080,
                ..b4(14)
            },
            backend_mac(14),
            veth1_mac,
        );

        // UDP checksum 0 ("none") stays 0.
        let bare = ipv4_udp_no_checksum(NODE_MAC, CLIENT_MAC, CLIENT4, VIP4, 33334, 53, b"query");
        let out = dp.run_ingress(veth0, &bare).unwrap();
        assert_eq!(&out.frame[40..42], &[0, 0], "no checksum stays no checksum");

        // The backend's reply, through the TC egress program: source back to VIP:53.
        let reply = ipv4_udp(
            CLIENT_MAC,
            backend_mac(14),
            Ipv4Addr::new(198, 18, 2, 14),
            CLIENT4,
            8080,
            33333,
            b"answer",
        );
        let rewritten = dp.run_egress(&reply).unwrap();
        assert_eq!(&rewritten[26..30], &VIP4.octets(), "source is the VIP");
        assert_eq!(
            u16::from_be_bytes([rewritten[34], rewritten[35]]),
            53,
            "source port is the service's"
        );
        assert!(ipv4_header_checksum_ok(&rewritten, 14));
        assert!(l4_checksum_ok(&rewritten, 14));
        // A reply with no checksum keeps none.
        let mut bare_reply = reply.clone();
        bare_reply[40] = 0;
        bare_reply[41] = 0;
        let mut bare_reply_flow = bare_reply.clone();
        bare_reply_flow[36..38].copy_from_slice(&33334u16.to_be_bytes());
        let rewritten = dp.run_egress(&bare_reply_flow).unwrap();
        assert_eq!(&rewritten[26..30], &VIP4.octets());
        assert_eq!(&rewritten[40..42], &[0, 0]);

        // TCP reply of the IPv4 TCP service.
        dp.upsert_service(tcp80(), &[b4(15)]).unwrap();
        let out = dp.run_ingress(veth0, &syn4(42000, 80)).unwrap();
        assert_eq!(dest4(&out.frame), (b4(15).ip, 8080));
        let synack = ipv4_tcp_syn(
            CLIENT_MAC,
            backend_mac(15),
            Ipv4Addr::new(198, 18, 2, 15),
            CLIENT4,
            8080,
            42000,
        );
        let rewritten = dp.run_egress(&synack).unwrap();
        assert_eq!(&rewritten[26..30], &VIP4.octets());
        assert_eq!(u16::from_be_bytes([rewritten[34], rewritten[35]]), 80);
        assert!(ipv4_header_checksum_ok(&rewritten, 14) && l4_checksum_ok(&rewritten, 14));

        // IPv6: TCP in, DNAT to the predicted backend; reply out, back to [VIP]:443.
        let svc6 = Service {
            vip: IpAddr::V6(vip6()),
            port: 443,
            protocol: Protocol::Tcp,
        };
        let backends6 = [b6(0x10), b6(0x11), b6(0x12)];
        dp.upsert_service(svc6, &backends6).unwrap();
        let syn6 = ipv6_tcp_syn(NODE_MAC, CLIENT_MAC, client6(), vip6(), 45000, 443);
        let out = dp.run_ingress(veth0, &syn6).unwrap();
        let want = predict(
            &backends6,
            IpAddr::V6(client6()),
            IpAddr::V6(vip6()),
            45000,
            443,
            PROTO_TCP,
        );
        assert_eq!(out.action, XdpAction::Redirect);
        assert_eq!(
            &out.frame[38..54],
            &addr16(want.ip),
            "IPv6 destination is the backend"
        );
        assert_eq!(u16::from_be_bytes([out.frame[56], out.frame[57]]), 8080);
        assert_eq!(out.frame[21], 63, "hop limit decremented");
        assert!(l4_checksum_ok(&out.frame, 14));
        let IpAddr::V6(want6) = want.ip else {
            unreachable!()
        };
        let reply6 = ipv6_tcp_syn(CLIENT_MAC, backend_mac(0x10), want6, client6(), 8080, 45000);
        let rewritten = dp.run_egress(&reply6).unwrap();
        assert_eq!(
            &rewritten[22..38],
            &vip6().octets(),
            "IPv6 source is the VIP"
        );
        assert_eq!(u16::from_be_bytes([rewritten[54], rewritten[55]]), 443);
        assert!(l4_checksum_ok(&rewritten, 14));
        // UDP over IPv6 (checksum mandatory).
        let udp6 = Service {
            vip: IpAddr::V6(vip6()),
            port: 53,
            protocol: Protocol::Udp,
        };
        dp.upsert_service(udp6, &[b6(0x13)]).unwrap();
        let q6 = ipv6_udp(NODE_MAC, CLIENT_MAC, client6(), vip6(), 45001, 53, b"q");
        let out = dp.run_ingress(veth0, &q6).unwrap();
        assert_eq!(out.action, XdpAction::Redirect);
        assert!(l4_checksum_ok(&out.frame, 14));

        // Traffic the balancer did not create is left alone on the way out.
        let stranger = ipv4_tcp_syn(
            CLIENT_MAC,
            backend_mac(16),
            Ipv4Addr::new(198, 18, 2, 16),
            CLIENT4,
            8080,
            42000,
        );
        assert_eq!(dp.run_egress(&stranger).unwrap(), stranger);

        let stats = dp.stats().unwrap();
        assert_eq!(stats.reverse_nat, 4);
    });
}

#[test]
fn traffic_that_is_not_a_service_flow_passes_untouched() {
    lab(|dp, veth0, _| {
        dp.upsert_service(tcp80(), &[b4(10), b4(11)]).unwrap();
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("TCP to the VIP on another port", syn4(40000, 81)),
            (
                "UDP to the VIP's TCP port",
                ipv4_udp(NODE_MAC, CLIENT_MAC, CLIENT4, VIP4, 40000, 80, b"x"),
            ),
            (
                "TCP to another address",
                ipv4_tcp_syn(
                    NODE_MAC,
                    CLIENT_MAC,
                    CLIENT4,
                    Ipv4Addr::new(198, 18, 1, 1),
                    40000,
                    80,
                ),
            ),
            (
                "IPv6 TCP to a VIP with no v6 service",
                ipv6_tcp_syn(NODE_MAC, CLIENT_MAC, client6(), vip6(), 40000, 80),
            ),
            (
                "IPv6 TCP behind a hop-by-hop header",
                ipv6_tcp_behind_hop_by_hop(NODE_MAC, CLIENT_MAC, client6(), vip6(), 40000, 80),
            ),
            (
                "ICMPv6 echo to a VIP",
                icmpv6_echo(NODE_MAC, CLIENT_MAC, client6(), vip6()),
            ),
        ];
        // ICMP echo to the VIP.
        let mut echo = syn4(0, 0);
        echo[23] = 1;
        fix_ipv4_header_checksum(&mut echo, 14);
        cases.push(("ICMP echo to the VIP", echo));
        // A fragment of a service flow (MF set), and a non-first fragment.
        for (name, flags) in [
            ("first fragment (MF)", [0x20u8, 0x00]),
            ("later fragment", [0x00, 0x10]),
        ] {
            let mut f = syn4(40000, 80);
            f[20] = flags[0];
            f[21] = flags[1];
            fix_ipv4_header_checksum(&mut f, 14);
            cases.push((name, f));
        }
        // IPv4 with options (IHL 6: a 4-byte NOP/EOL option).
        let mut opts = syn4(40000, 80);
        opts.splice(34..34, [1u8, 1, 1, 0]);
        opts[14] = 0x46;
        let total = u16::from_be_bytes([opts[16], opts[17]]) + 4;
        opts[16..18].copy_from_slice(&total.to_be_bytes());
        fix_ipv4_header_checksum(&mut opts, 14);
        cases.push(("IPv4 with options", opts));
        // Lying and short headers.
        let mut lying = syn4(40000, 80);
        lying[16..18].copy_from_slice(&1500u16.to_be_bytes());
        cases.push(("total length beyond the frame", lying));
        let mut tiny = syn4(40000, 80);
        tiny[16..18].copy_from_slice(&30u16.to_be_bytes());
        cases.push(("total length too short for TCP", tiny));
        cases.push(("truncated TCP header", syn4(40000, 80)[..40].to_vec()));
        let mut ihl4 = syn4(40000, 80);
        ihl4[14] = 0x44;
        cases.push(("IHL below 5", ihl4));
        // TTL 1: the kernel must answer with time exceeded, so it gets the packet as it came.
        let mut ttl1 = syn4(40000, 80);
        ttl1[22] = 1;
        fix_ipv4_header_checksum(&mut ttl1, 14);
        cases.push(("TTL 1", ttl1));

        for (name, frame) in &cases {
            let out = dp.run_ingress(veth0, frame).unwrap();
            assert_eq!(out.action, XdpAction::Pass, "{name}");
            assert_eq!(&out.frame, frame, "{name}: must be untouched");
        }
        assert_eq!(dp.flow_count().unwrap(), 0, "none of them created a flow");
    });
}

#[test]
fn unresolved_next_hop_passes_the_rewritten_packet_to_the_kernel() {
    lab(|dp, veth0, _| {
        // .99 has no neighbour entry: the kernel must resolve it.
        let far = Backend {
            ip: IpAddr::V4(Ipv4Addr::new(198, 18, 2, 99)),
            port: 8080,
            weight: 1,
            node: None,
        };
        dp.upsert_service(tcp80(), &[far]).unwrap();
        let frame = syn4(40000, 80);
        let out = dp.run_ingress(veth0, &frame).unwrap();
        assert_eq!(out.action, XdpAction::Pass);
        assert_eq!(
            dest4(&out.frame),
            (far.ip, 8080),
            "rewritten before the kernel sees it"
        );
        assert_eq!(
            &out.frame[..12],
            &frame[..12],
            "MACs left for the kernel to set"
        );
        assert!(ipv4_header_checksum_ok(&out.frame, 14) && l4_checksum_ok(&out.frame, 14));
        assert_eq!(dp.stats().unwrap().lb_to_kernel, 1);
    });
}

#[test]
fn a_veth_that_is_not_a_redirect_target_gets_the_flow_through_the_kernel() {
    lab_with(false, |dp, veth0, _| {
        dp.upsert_service(tcp80(), &[b4(10)]).unwrap();
        let frame = syn4(40000, 80);
        for _ in 0..2 {
            let out = dp.run_ingress(veth0, &frame).unwrap();
            assert_eq!(out.action, XdpAction::Pass, "never redirected into veth1");
            assert_eq!(
                dest4(&out.frame),
                (b4(10).ip, 8080),
                "DNAT done; the kernel routes it"
            );
            assert_eq!(&out.frame[..12], &frame[..12]);
            assert!(ipv4_header_checksum_ok(&out.frame, 14) && l4_checksum_ok(&out.frame, 14));
        }
        assert_eq!(dp.stats().unwrap().lb_to_kernel, 2);
        assert_eq!(dp.flow_count().unwrap(), 1);
    });
}

#[test]
fn a_service_without_backends_drops_new_flows_and_counts_them() {
    lab(|dp, veth0, _| {
        dp.upsert_service(tcp80(), &[]).unwrap();
        let out = dp.run_ingress(veth0, &syn4(40000, 80)).unwrap();
        assert_eq!(out.action, XdpAction::Drop);
        // Established flows whose backend is removed with the last one are dropped too.
        dp.set_backends(&tcp80(), &[b4(10)]).unwrap();
        assert_eq!(
            dp.run_ingress(veth0, &syn4(40001, 80)).unwrap().action,
            XdpAction::Redirect
        );
        dp.set_backends(&tcp80(), &[]).unwrap();
        assert_eq!(
            dp.run_ingress(veth0, &syn4(40001, 80)).unwrap().action,
            XdpAction::Drop
        );
        assert_eq!(dp.stats().unwrap().lb_no_backend, 2);
        // Removing the service: its traffic is the kernel's again.
        dp.remove_service(&tcp80()).unwrap();
        let frame = syn4(40000, 80);
        assert_eq!(dp.run_ingress(veth0, &frame).unwrap().frame, frame);
    });
}

#[test]
fn service_and_backend_counters_count_packets_bytes_and_new_flows_and_keep_departed_backends_share()
{
    lab(|dp, veth0, _| {
        dp.upsert_service(tcp80(), &[b4(10)]).unwrap();
        for _ in 0..3 {
            dp.run_ingress(veth0, &syn4(40000, 80)).unwrap();
        }
        dp.run_ingress(veth0, &syn4(40001, 80)).unwrap();
        let stats = dp.service_stats().unwrap();
        assert_eq!(stats.len(), 1);
        let len = syn4(40000, 80).len() as u64;
        assert_eq!(stats[0].traffic.packets, 4);
        assert_eq!(stats[0].traffic.bytes, 4 * len);
        assert_eq!(stats[0].traffic.new_flows, 2);
        assert_eq!(stats[0].backends[0].1.packets, 4);
        assert_eq!(stats[0].backends[0].1.new_flows, 2);

        // The XDP program counts per backend only; a backend that leaves keeps its share in
        // the service's counters, which never go backwards.
        dp.set_backends(&tcp80(), &[b4(11)]).unwrap();
        dp.run_ingress(veth0, &syn4(40002, 80)).unwrap();
        let stats = dp.service_stats().unwrap();
        assert_eq!(stats[0].traffic.packets, 5);
        assert_eq!(stats[0].traffic.bytes, 5 * len);
        assert_eq!(stats[0].traffic.new_flows, 3);
        assert_eq!(stats[0].backends.len(), 1);
        assert_eq!(stats[0].backends[0].1.packets, 1);
        // The departed backend's id, given to a newcomer, starts from zero.
        dp.set_backends(&tcp80(), &[b4(11), b4(12)]).unwrap();
        let stats = dp.service_stats().unwrap();
        assert_eq!(stats[0].traffic.packets, 5);
        let newcomer = stats[0]
            .backends
            .iter()
            .find(|(b, _)| *b == b4(12))
            .unwrap();
        assert_eq!(newcomer.1.packets, 0);
    });
}

#[test]
fn bad_backend_sets_are_refused_and_the_running_table_keeps_serving() {
    lab(|dp, veth0, _| {
        let good = [b4(10), b4(11), b4(12)];
        dp.upsert_service(tcp80(), &good).unwrap();
        let before = dest4(&dp.run_ingress(veth0, &syn4(40000, 80)).unwrap().frame);
        for (bad, expected) in [
            (vec![b4(10), b4(10)], "listed twice"),
            (vec![b4(10), b6(0x10)], "address family"),
            (
                vec![
                    b4(10),
                    Backend {
                        ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                        port: 8080,
                        weight: 1,
                        node: None,
                    },
                ],
                "loopback",
            ),
        ] {
            let err = dp.set_backends(&tcp80(), &bad).unwrap_err();
            assert!(
                matches!(err, DataplaneError::InvalidService { .. }),
                "{err}"
            );
            assert!(err.to_string().contains(expected), "{err}");
        }
        assert_eq!(
            dp.services(),
            vec![(tcp80(), good.to_vec())],
            "the registry is unchanged"
        );
        // A new flow still uses the old table; the established one keeps its backend.
        assert_eq!(
            dest4(&dp.run_ingress(veth0, &syn4(40000, 80)).unwrap().frame),
            before
        );
        let sport = 40123;
        let want = predict(
            &good,
            IpAddr::V4(CLIENT4),
            IpAddr::V4(VIP4),
            sport,
            80,
            PROTO_TCP,
        );
        assert_eq!(
            dest4(&dp.run_ingress(veth0, &syn4(sport, 80)).unwrap().frame),
            (want.ip, 8080)
        );
    });
}

#[test]
fn maglev_table_sizes_that_are_not_prime_or_too_large_are_refused_at_load() {
    require_root();
    for (m, expected) in [(1000u32, "not prime"), (262_147, "larger than the maximum")] {
        let err = Dataplane::load(&DataplaneOptions {
            pin_dir: None,
            maglev_table_size: m,
            capacities: Capacities {
                services: 4,
                backends: 16,
                flows: 64,
            },
            ..DataplaneOptions::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains(expected), "{m}: {err}");
    }
    let err = Dataplane::load(&DataplaneOptions {
        pin_dir: None,
        maglev_table_size: 7,
        capacities: Capacities {
            services: 4,
            backends: 16,
            flows: 64,
        },
        ..DataplaneOptions::default()
    })
    .map(|mut dp| dp.upsert_service(tcp80(), &(10..20).map(b4).collect::<Vec<_>>()))
    .unwrap()
    .unwrap_err();
    assert!(
        err.to_string().contains("too small for 10 backends"),
        "{err}"
    );
}

#[test]
fn removing_one_of_two_services_on_a_vip_keeps_the_other_balanced() {
    lab(|dp, veth0, _| {
        let udp53 = Service {
            vip: IpAddr::V4(VIP4),
            port: 53,
            protocol: Protocol::Udp,
        };
        dp.upsert_service(tcp80(), &[b4(10)]).unwrap();
        dp.upsert_service(udp53, &[b4(11)]).unwrap();
        dp.remove_service(&tcp80()).unwrap();
        let query = ipv4_udp(NODE_MAC, CLIENT_MAC, CLIENT4, VIP4, 33333, 53, b"q");
        let out = dp.run_ingress(veth0, &query).unwrap();
        assert_eq!(out.action, XdpAction::Redirect, "udp/53 still balanced");
        assert_eq!(dest4(&out.frame), (b4(11).ip, 8080));
        let syn = syn4(40000, 80);
        assert_eq!(
            dp.run_ingress(veth0, &syn).unwrap().frame,
            syn,
            "tcp/80 is the kernel's again"
        );
        dp.remove_service(&udp53).unwrap();
        assert_eq!(dp.run_ingress(veth0, &query).unwrap().frame, query);
    });
}

#[test]
fn a_tcp_rst_from_either_side_ends_the_flow_so_its_5_tuple_starts_afresh() {
    lab(|dp, veth0, _| {
        let first = [b4(10), b4(11), b4(12)];
        dp.upsert_service(tcp80(), &first).unwrap();
        let sports: Vec<u16> = (42000..42060).collect();
        let before: Vec<(IpAddr, u16)> = sports
            .iter()
            .map(|p| dest4(&dp.run_ingress(veth0, &syn4(*p, 80)).unwrap().frame))
            .collect();
        assert_eq!(dp.flow_count().unwrap(), 60);
        // More backends: established flows keep theirs; a new flow may be placed elsewhere.
        let grown = [b4(10), b4(11), b4(12), b4(13), b4(14), b4(15)];
        dp.set_backends(&tcp80(), &grown).unwrap();
        let fresh = |p: u16| {
            let b = predict(
                &grown,
                IpAddr::V4(CLIENT4),
                IpAddr::V4(VIP4),
                p,
                80,
                PROTO_TCP,
            );
            (b.ip, b.port)
        };
        let moves = sports
            .iter()
            .zip(&before)
            .filter(|(p, was)| fresh(**p) != **was)
            .count();
        assert!(moves > 0, "some flows would be placed elsewhere afresh");

        // The client resets the first 20: each RST still reaches its flow's backend, and the
        // flow is gone after it.
        for (p, was) in sports.iter().zip(&before).take(20) {
            let rst = ipv4_with_tcp_flags(&syn4(*p, 80), 14, 0x14);
            let out = dp.run_ingress(veth0, &rst).unwrap();
            assert_eq!(
                dest4(&out.frame),
                *was,
                "sport {p}: the RST goes to its backend"
            );
            assert!(l4_checksum_ok(&out.frame, 14));
        }
        assert_eq!(dp.flow_count().unwrap(), 40);
        // The backend resets the next 20 (its reply RST, rewritten back to the VIP as ever).
        for (p, was) in sports.iter().zip(&before).skip(20).take(20) {
            let IpAddr::V4(backend) = was.0 else {
                unreachable!()
            };
            let reply = ipv4_tcp_syn(CLIENT_MAC, backend_mac(0), backend, CLIENT4, was.1, *p);
            let rst = ipv4_with_tcp_flags(&reply, 14, 0x14);
            let out = dp.run_egress(&rst).unwrap();
            assert_eq!(
                &out[26..30],
                &VIP4.octets(),
                "sport {p}: rewritten to the VIP"
            );
            assert!(l4_checksum_ok(&out, 14));
        }
        assert_eq!(dp.flow_count().unwrap(), 20, "the last 20 were never reset");

        // A reset 5-tuple starts afresh (Maglev over the grown set); the others keep theirs.
        for (i, (p, was)) in sports.iter().zip(&before).enumerate() {
            let now = dest4(&dp.run_ingress(veth0, &syn4(*p, 80)).unwrap().frame);
            if i < 40 {
                assert_eq!(now, fresh(*p), "sport {p}: a new flow");
            } else {
                assert_eq!(now, *was, "sport {p}: still established");
            }
        }
        // An RST for no known flow opens nothing.
        let stray = ipv4_with_tcp_flags(&syn4(43000, 80), 14, 0x14);
        let out = dp.run_ingress(veth0, &stray).unwrap();
        assert_eq!(out.action, XdpAction::Redirect);
        assert_eq!(dp.flow_count().unwrap(), 60);
    });
}

#[test]
fn past_the_flood_guard_new_flows_are_balanced_but_not_tracked_and_established_ones_stay() {
    lab(|dp, veth0, _| {
        // One CPU: the limit counts per CPU.
        sluice_tests::pin_to_cpu(0);
        let backends = [b4(10), b4(11), b4(12)];
        dp.upsert_service(tcp80(), &backends).unwrap();
        // 50 established flows, before any flood.
        let established: Vec<(u16, (IpAddr, u16))> = (30000..30050)
            .map(|p| {
                (
                    p,
                    dest4(&dp.run_ingress(veth0, &syn4(p, 80)).unwrap().frame),
                )
            })
            .collect();
        dp.set_flood_guard(100).unwrap();
        // 400 new flows at once: within a second or two of one-second windows, at most
        // 100 per window are tracked; every one is still balanced where Maglev says.
        for p in 40000..40400u16 {
            let out = dp.run_ingress(veth0, &syn4(p, 80)).unwrap();
            assert_eq!(out.action, XdpAction::Redirect, "sport {p} balanced");
            let want = predict(
                &backends,
                IpAddr::V4(CLIENT4),
                IpAddr::V4(VIP4),
                p,
                80,
                PROTO_TCP,
            );
            assert_eq!(dest4(&out.frame), (want.ip, want.port), "sport {p}");
        }
        let tracked_new = dp.flow_count().unwrap() - 50;
        assert!(
            (100..=200).contains(&tracked_new),
            "{tracked_new} of 400 new flows tracked"
        );
        let flood = dp.flood_stats().unwrap();
        assert_eq!(flood.untracked as usize, 400 - tracked_new);
        assert!(flood.activations >= 1);
        // Every established flow is still tracked and keeps its backend, even after the set
        // changes (a re-hashed flow would move).
        dp.set_backends(&tcp80(), &[b4(10), b4(11), b4(12), b4(13), b4(14)])
            .unwrap();
        for (p, was) in &established {
            assert_eq!(
                dest4(&dp.run_ingress(veth0, &syn4(*p, 80)).unwrap().frame),
                *was,
                "sport {p}"
            );
        }
        // 0: no limit.
        dp.set_flood_guard(0).unwrap();
        let before = dp.flow_count().unwrap();
        for p in 50000..50300u16 {
            dp.run_ingress(veth0, &syn4(p, 80)).unwrap();
        }
        assert_eq!(dp.flow_count().unwrap(), before + 300);
    });
}

const ROUTER4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 254);
fn router6() -> Ipv6Addr {
    "fd53:1::fe".parse().unwrap()
}
/// Fragmentation Needed (type 3 code 4) / Packet Too Big's 4 bytes after the checksum: the MTU.
const MTU_576: [u8; 4] = [0, 0, 0x02, 0x40];
const MTU_1280: [u8; 4] = [0, 0, 0x05, 0x00];

/// A backend's reply as it left the node (VIP → client) and as the backend sent it, IP packets
/// without Ethernet; IPv4 and IPv6 alike.
fn reply_ip(frame: &[u8]) -> Vec<u8> {
    frame[14..].to_vec()
}

#[test]
fn an_icmp_error_about_a_reply_reaches_the_flows_backend_rewritten_with_valid_checksums() {
    lab(|dp, veth0, veth1_mac| {
        let backends = [b4(10), b4(11), b4(12)];
        dp.upsert_service(tcp80(), &backends).unwrap();
        let sport = 41000;
        let out = dp.run_ingress(veth0, &syn4(sport, 80)).unwrap();
        assert_eq!(out.action, XdpAction::Redirect);
        let (IpAddr::V4(backend), _) = dest4(&out.frame) else {
            unreachable!()
        };
        // A router on the way to the client cannot pass the reply (VIP:80 → client) and tells
        // its source, the VIP.
        let as_sent_to_client = ipv4_tcp_syn(CLIENT_MAC, NODE_MAC, VIP4, CLIENT4, 80, sport);
        let error = ipv4_icmp_error(
            NODE_MAC,
            CLIENT_MAC,
            ROUTER4,
            VIP4,
            3,
            4,
            MTU_576,
            &reply_ip(&as_sent_to_client),
        );
        let out = dp.run_ingress(veth0, &error).unwrap();
        assert_eq!(out.action, XdpAction::Redirect, "to the backend's next hop");
        let f = &out.frame;
        assert_eq!(&f[0..6], &backend_mac(backend.octets()[3]));
        assert_eq!(&f[6..12], &veth1_mac);
        assert_eq!(&f[26..30], &ROUTER4.octets(), "outer source kept");
        assert_eq!(
            &f[30..34],
            &backend.octets(),
            "outer destination: the backend"
        );
        assert_eq!(f[22], 63, "TTL decremented");
        assert!(ipv4_header_checksum_ok(f, 14), "outer IPv4 checksum");
        assert!(icmpv4_checksum_ok(f, 14), "ICMP checksum");
        assert_eq!(&f[34..36], &error[34..36], "type and code kept");
        assert_eq!(&f[38..42], &MTU_576, "MTU kept");
        // The embedded packet is now exactly what the backend sent.
        let as_sent_by_backend = ipv4_tcp_syn(CLIENT_MAC, NODE_MAC, backend, CLIENT4, 8080, sport);
        assert_eq!(&f[42..], &reply_ip(&as_sent_by_backend)[..]);
        assert!(ipv4_header_checksum_ok(f, 42), "embedded IPv4 checksum");
        assert!(l4_checksum_ok(f, 42), "embedded TCP checksum");
        assert_eq!(dp.stats().unwrap().icmp_to_backend, 1);

        // IPv6: Packet Too Big about a reply of an IPv6 TCP flow.
        let svc6 = Service {
            vip: IpAddr::V6(vip6()),
            port: 443,
            protocol: Protocol::Tcp,
        };
        dp.upsert_service(svc6, &[b6(0x10), b6(0x11)]).unwrap();
        let out = dp
            .run_ingress(
                veth0,
                &ipv6_tcp_syn(NODE_MAC, CLIENT_MAC, client6(), vip6(), 46000, 443),
            )
            .unwrap();
        let backend6 = Ipv6Addr::from(<[u8; 16]>::try_from(&out.frame[38..54]).unwrap());
        let as_sent_to_client = ipv6_tcp_syn(CLIENT_MAC, NODE_MAC, vip6(), client6(), 443, 46000);
        let error6 = ipv6_icmp_error(
            NODE_MAC,
            CLIENT_MAC,
            router6(),
            vip6(),
            2,
            0,
            MTU_1280,
            &reply_ip(&as_sent_to_client),
        );
        let out = dp.run_ingress(veth0, &error6).unwrap();
        assert_eq!(out.action, XdpAction::Redirect);
        let f = &out.frame;
        assert_eq!(&f[22..38], &router6().octets(), "outer source kept");
        assert_eq!(
            &f[38..54],
            &backend6.octets(),
            "outer destination: the backend"
        );
        assert_eq!(f[21], 63, "hop limit decremented");
        assert!(icmpv6_checksum_ok(f, 14), "ICMPv6 checksum");
        let as_sent_by_backend =
            ipv6_tcp_syn(CLIENT_MAC, NODE_MAC, backend6, client6(), 8080, 46000);
        assert_eq!(&f[62..], &reply_ip(&as_sent_by_backend)[..]);
        assert!(l4_checksum_ok(f, 62), "embedded TCP checksum");
        assert_eq!(dp.stats().unwrap().icmp_to_backend, 2);
    });
}

#[test]
fn a_backends_icmp_error_about_a_clients_packet_leaves_as_the_vips() {
    lab(|dp, veth0, _| {
        let udp53 = Service {
            vip: IpAddr::V4(VIP4),
            port: 53,
            protocol: Protocol::Udp,
        };
        dp.upsert_service(udp53, &[b4(14)]).unwrap();
        let query = ipv4_udp(NODE_MAC, CLIENT_MAC, CLIENT4, VIP4, 33333, 53, b"query");
        assert_eq!(
            dp.run_ingress(veth0, &query).unwrap().action,
            XdpAction::Redirect
        );
        let backend = Ipv4Addr::new(198, 18, 2, 14);
        // The backend has nothing on 8080: port unreachable, about the query as it got it.
        let as_received = ipv4_udp(
            NODE_MAC, CLIENT_MAC, CLIENT4, backend, 33333, 8080, b"query",
        );
        let error = ipv4_icmp_error(
            CLIENT_MAC,
            backend_mac(14),
            backend,
            CLIENT4,
            3,
            3,
            [0; 4],
            &reply_ip(&as_received),
        );
        let f = dp.run_egress(&error).unwrap();
        assert_eq!(&f[26..30], &VIP4.octets(), "outer source: the VIP");
        assert_eq!(&f[30..34], &CLIENT4.octets());
        assert!(ipv4_header_checksum_ok(&f, 14), "outer IPv4 checksum");
        assert!(icmpv4_checksum_ok(&f, 14), "ICMP checksum");
        // The embedded packet is what the client sent: the client's socket recognises it.
        assert_eq!(&f[42..], &reply_ip(&query)[..]);
        assert!(l4_checksum_ok(&f, 42), "embedded UDP checksum");

        // A router between the node and the backend keeps its own address as the source.
        let from_router = ipv4_icmp_error(
            CLIENT_MAC,
            backend_mac(14),
            Ipv4Addr::new(198, 18, 2, 254),
            CLIENT4,
            3,
            4,
            MTU_576,
            &reply_ip(&as_received),
        );
        let f = dp.run_egress(&from_router).unwrap();
        assert_eq!(&f[26..30], &[198, 18, 2, 254]);
        assert_eq!(&f[42..], &reply_ip(&query)[..]);
        assert!(ipv4_header_checksum_ok(&f, 14) && icmpv4_checksum_ok(&f, 14));

        // IPv6.
        let udp6 = Service {
            vip: IpAddr::V6(vip6()),
            port: 53,
            protocol: Protocol::Udp,
        };
        dp.upsert_service(udp6, &[b6(0x13)]).unwrap();
        let q6 = ipv6_udp(NODE_MAC, CLIENT_MAC, client6(), vip6(), 45001, 53, b"q");
        assert_eq!(
            dp.run_ingress(veth0, &q6).unwrap().action,
            XdpAction::Redirect
        );
        let backend6 = Ipv6Addr::new(0xfd53, 2, 0, 0, 0, 0, 0, 0x13);
        let as_received6 = ipv6_udp(NODE_MAC, CLIENT_MAC, client6(), backend6, 45001, 8080, b"q");
        let error6 = ipv6_icmp_error(
            CLIENT_MAC,
            backend_mac(0x13),
            backend6,
            client6(),
            1,
            4,
            [0; 4],
            &reply_ip(&as_received6),
        );
        let f = dp.run_egress(&error6).unwrap();
        assert_eq!(&f[22..38], &vip6().octets(), "outer source: the VIP");
        assert!(icmpv6_checksum_ok(&f, 14), "ICMPv6 checksum");
        assert_eq!(&f[62..], &reply_ip(&q6)[..]);
        assert_eq!(dp.stats().unwrap().icmp_to_client, 3);
    });
}

#[test]
fn icmp_errors_that_name_no_tracked_flow_or_are_malformed_pass_untouched() {
    lab(|dp, veth0, _| {
        dp.upsert_service(tcp80(), &[b4(10), b4(11)]).unwrap();
        let svc6 = Service {
            vip: IpAddr::V6(vip6()),
            port: 443,
            protocol: Protocol::Tcp,
        };
        dp.upsert_service(svc6, &[b6(0x10)]).unwrap();
        // One tracked flow each, so "no flow" below is about the embedded header, not an empty table.
        dp.run_ingress(veth0, &syn4(41000, 80)).unwrap();
        dp.run_ingress(
            veth0,
            &ipv6_tcp_syn(NODE_MAC, CLIENT_MAC, client6(), vip6(), 46000, 443),
        )
        .unwrap();
        let reply = reply_ip(&ipv4_tcp_syn(
            CLIENT_MAC, NODE_MAC, VIP4, CLIENT4, 80, 41000,
        ));
        let reply6 = reply_ip(&ipv6_tcp_syn(
            CLIENT_MAC,
            NODE_MAC,
            vip6(),
            client6(),
            443,
            46000,
        ));
        let to_vip = |embedded: &[u8]| {
            ipv4_icmp_error(NODE_MAC, CLIENT_MAC, ROUTER4, VIP4, 3, 4, MTU_576, embedded)
        };
        let to_vip6 = |embedded: &[u8]| {
            ipv6_icmp_error(
                NODE_MAC,
                CLIENT_MAC,
                router6(),
                vip6(),
                2,
                0,
                MTU_1280,
                embedded,
            )
        };
        let mut cases: Vec<(&str, Vec<u8>, bool)> = Vec::new();
        // (name, frame, counted as an ICMP error matching no flow)
        let other_port = reply_ip(&ipv4_tcp_syn(
            CLIENT_MAC, NODE_MAC, VIP4, CLIENT4, 80, 41001,
        ));
        cases.push(("embedded flow not tracked", to_vip(&other_port), true));
        let other_client = reply_ip(&ipv4_tcp_syn(
            CLIENT_MAC,
            NODE_MAC,
            VIP4,
            Ipv4Addr::new(198, 18, 1, 3),
            80,
            41000,
        ));
        cases.push(("embedded client not tracked", to_vip(&other_client), true));
        let mut spoofed = reply.clone();
        spoofed[12..16].copy_from_slice(&[198, 18, 1, 77]);
        cases.push((
            "embedded source is not the VIP the error is sent to",
            to_vip(&spoofed),
            true,
        ));
        cases.push((
            "embedded TCP header cut to 4 bytes",
            to_vip(&reply[..24]),
            false,
        ));
        cases.push(("embedded IPv4 header cut", to_vip(&reply[..12]), false));
        let mut with_options = reply.clone();
        with_options[0] = 0x46;
        with_options.splice(20..20, [1u8, 1, 1, 0]);
        cases.push(("embedded IPv4 options", to_vip(&with_options), false));
        let mut about_icmp = reply.clone();
        about_icmp[9] = 1;
        cases.push(("ICMP about ICMP", to_vip(&about_icmp), false));
        let mut about_fragment = reply.clone();
        about_fragment[7] = 0x10;
        cases.push(("about a later fragment", to_vip(&about_fragment), false));
        let mut echo = to_vip(&reply);
        echo[34] = 8;
        cases.push(("echo request, not an error", echo, false));
        let mut ttl1 = to_vip(&reply);
        ttl1[22] = 1;
        fix_ipv4_header_checksum(&mut ttl1, 14);
        cases.push(("TTL 1", ttl1, false));
        let mut short_total = to_vip(&reply);
        short_total[16..18].copy_from_slice(&40u16.to_be_bytes());
        fix_ipv4_header_checksum(&mut short_total, 14);
        cases.push((
            "IPv4 total length ends inside the embedded header",
            short_total,
            false,
        ));
        cases.push(("ICMP header cut", to_vip(&reply)[..38].to_vec(), false));
        let error_to_other = ipv4_icmp_error(
            NODE_MAC,
            CLIENT_MAC,
            ROUTER4,
            Ipv4Addr::new(198, 18, 1, 1),
            3,
            4,
            MTU_576,
            &reply,
        );
        cases.push(("error to an address that is no VIP", error_to_other, false));
        // IPv6.
        let mut other_port6 = reply6.clone();
        other_port6[42..44].copy_from_slice(&46001u16.to_be_bytes());
        cases.push((
            "IPv6: embedded flow not tracked",
            to_vip6(&other_port6),
            true,
        ));
        cases.push(("IPv6: embedded TCP cut", to_vip6(&reply6[..44]), false));
        let mut behind_ext = reply6.clone();
        behind_ext[6] = 0;
        cases.push((
            "IPv6: embedded extension header",
            to_vip6(&behind_ext),
            false,
        ));
        let mut hop1 = to_vip6(&reply6);
        hop1[21] = 1;
        cases.push(("IPv6: hop limit 1", hop1, false));
        let mut lying6 = to_vip6(&reply6);
        lying6[18..20].copy_from_slice(&1400u16.to_be_bytes());
        cases.push(("IPv6: payload length beyond the frame", lying6, false));

        let mut unmatched = 0;
        for (name, frame, counted) in &cases {
            let out = dp.run_ingress(veth0, frame).unwrap();
            assert_eq!(out.action, XdpAction::Pass, "{name}");
            assert_eq!(&out.frame, frame, "{name}: untouched");
            unmatched += u64::from(*counted);
            assert_eq!(dp.stats().unwrap().icmp_unmatched, unmatched, "{name}");
        }
        assert_eq!(dp.stats().unwrap().icmp_to_backend, 0);

        // On the way out: an error about a packet of no flow, and one about ICMP, untouched.
        let backend = Ipv4Addr::new(198, 18, 2, 10);
        let stranger = reply_ip(&ipv4_udp(
            NODE_MAC, CLIENT_MAC, CLIENT4, backend, 1, 8080, b"x",
        ));
        let out_error = ipv4_icmp_error(
            CLIENT_MAC, NODE_MAC, backend, CLIENT4, 3, 3, [0; 4], &stranger,
        );
        assert_eq!(dp.run_egress(&out_error).unwrap(), out_error);
        let cut = ipv4_icmp_error(
            CLIENT_MAC,
            NODE_MAC,
            backend,
            CLIENT4,
            3,
            3,
            [0; 4],
            &stranger[..22],
        );
        assert_eq!(dp.run_egress(&cut).unwrap(), cut);
        assert_eq!(dp.stats().unwrap().icmp_to_client, 0);
    });
}

#[test]
fn a_flow_closed_by_fins_from_both_sides_is_swept_after_its_grace_and_not_before() {
    use lb_userspace::dataplane::flows::FlowCensus;
    use std::time::Duration;
    lab(|dp, veth0, _| {
        dp.upsert_service(tcp80(), &[b4(10), b4(11), b4(12)])
            .unwrap();
        // Three flows: closed client first, closed backend first, and one left open.
        let sports = [44000u16, 44001, 44002];
        let homes: Vec<(IpAddr, u16)> = sports
            .iter()
            .map(|p| dest4(&dp.run_ingress(veth0, &syn4(*p, 80)).unwrap().frame))
            .collect();
        let client_fin = |dp: &mut Dataplane, p: u16| {
            let fin = ipv4_with_tcp_flags(&syn4(p, 80), 14, 0x11);
            dest4(&dp.run_ingress(veth0, &fin).unwrap().frame)
        };
        let backend_fin = |dp: &mut Dataplane, p: u16, home: (IpAddr, u16)| {
            let IpAddr::V4(backend) = home.0 else {
                unreachable!()
            };
            let reply = ipv4_tcp_syn(CLIENT_MAC, backend_mac(0), backend, CLIENT4, home.1, p);
            let out = dp
                .run_egress(&ipv4_with_tcp_flags(&reply, 14, 0x11))
                .unwrap();
            assert_eq!(&out[26..30], &VIP4.octets(), "the FIN leaves as the VIP's");
        };
        let census = |open, half_closed, closed| FlowCensus {
            open,
            half_closed,
            closed,
        };

        assert_eq!(client_fin(dp, sports[0]), homes[0]);
        backend_fin(dp, sports[1], homes[1]);
        assert_eq!(dp.flow_census().unwrap(), census(1, 2, 0));
        // Half-closed flows are never swept.
        assert_eq!(dp.sweep_closed_flows(Duration::ZERO).unwrap().1, 0);

        backend_fin(dp, sports[0], homes[0]);
        assert_eq!(client_fin(dp, sports[1]), homes[1]);
        assert_eq!(dp.flow_census().unwrap(), census(1, 0, 2));
        // Within the grace period: kept, and the last ACK still reaches the flow's backend.
        let (left, removed) = dp.sweep_closed_flows(Duration::from_secs(3600)).unwrap();
        assert_eq!((left, removed), (census(1, 0, 2), 0));
        let last_ack = ipv4_with_tcp_flags(&syn4(sports[0], 80), 14, 0x10);
        assert_eq!(
            dest4(&dp.run_ingress(veth0, &last_ack).unwrap().frame),
            homes[0]
        );

        // After it: both closed flows go, with their reverse-NAT entries; the open one stays.
        let (left, removed) = dp.sweep_closed_flows(Duration::ZERO).unwrap();
        assert_eq!((left, removed), (census(1, 0, 0), 2));
        assert_eq!(dp.flow_count().unwrap(), 1);
        let IpAddr::V4(backend) = homes[0].0 else {
            unreachable!()
        };
        let late_reply = ipv4_tcp_syn(
            CLIENT_MAC,
            backend_mac(0),
            backend,
            CLIENT4,
            homes[0].1,
            sports[0],
        );
        assert_eq!(
            dp.run_egress(&late_reply).unwrap(),
            late_reply,
            "no reverse-NAT entry is left behind"
        );
        let IpAddr::V4(open_backend) = homes[2].0 else {
            unreachable!()
        };
        let open_reply = ipv4_tcp_syn(
            CLIENT_MAC,
            backend_mac(0),
            open_backend,
            CLIENT4,
            homes[2].1,
            sports[2],
        );
        assert_eq!(&dp.run_egress(&open_reply).unwrap()[26..30], &VIP4.octets());
    });
}

#[test]
fn frames_to_another_hosts_mac_pass_untouched_and_are_counted_and_only_arp_ndp_is_read_from_group_frames(
) {
    lab(|dp, veth0, _| {
        let veth0_if = dataplane::interface("veth0").unwrap();
        // Attached, the program knows veth0's MAC: frames to it are this host's.
        dp.attach_all(std::slice::from_ref(&veth0_if)).unwrap();
        let ours = veth0_if.mac;
        dp.upsert_service(tcp80(), &[b4(10), b4(11)]).unwrap();
        dp.set_l2_vips(&[dataplane::L2Vip {
            ifindex: veth0,
            ip: IpAddr::V4(VIP4),
            mac: ours,
        }])
        .unwrap();
        let other: Mac = [0x02, 0x0f, 0, 0, 0, 9];

        // To another host's MAC (a promiscuous port, a flooding switch): untouched, counted.
        let for_other = [
            ipv4_tcp_syn(other, CLIENT_MAC, CLIENT4, VIP4, 40000, 80),
            ipv6_tcp_syn(other, CLIENT_MAC, client6(), vip6(), 40000, 80),
            {
                // A unicast ARP request to another host, for the VIP.
                let mut f = arp_request(CLIENT_MAC, CLIENT4, VIP4);
                f[0..6].copy_from_slice(&other);
                f
            },
        ];
        for frame in &for_other {
            let out = dp.run_ingress(veth0, frame).unwrap();
            assert_eq!(out.action, XdpAction::Pass);
            assert_eq!(&out.frame, frame, "another host's frame must be untouched");
        }
        assert_eq!(
            dp.flow_count().unwrap(),
            0,
            "no flow for another host's frames"
        );
        assert_eq!(
            dp.interface_stats(veth0).unwrap().other_host,
            for_other.len() as u64
        );

        // Broadcast: ARP is answered, nothing else is read.
        let out = dp
            .run_ingress(veth0, &arp_request(CLIENT_MAC, CLIENT4, VIP4))
            .unwrap();
        assert_eq!(
            out.action,
            XdpAction::Tx,
            "a broadcast ARP request is answered"
        );
        let broadcast_syn = ipv4_tcp_syn([0xff; 6], CLIENT_MAC, CLIENT4, VIP4, 40001, 80);
        let out = dp.run_ingress(veth0, &broadcast_syn).unwrap();
        assert_eq!(out.action, XdpAction::Pass);
        assert_eq!(
            out.frame, broadcast_syn,
            "a broadcast TCP frame is not balanced"
        );

        // To this host's MAC: balanced.
        let syn = ipv4_tcp_syn(ours, CLIENT_MAC, CLIENT4, VIP4, 40002, 80);
        let out = dp.run_ingress(veth0, &syn).unwrap();
        assert_ne!(out.frame, syn, "this host's frame is balanced");
        assert_eq!(dp.flow_count().unwrap(), 1);
        assert_eq!(
            dp.interface_stats(veth0).unwrap().other_host,
            for_other.len() as u64,
            "counted once each, and only those"
        );
    });
}
