//! The XDP ingress program's ARP/NDP responder, frame by frame, through BPF_PROG_TEST_RUN:
//! a table of frames in → expected action and expected frame out, byte for byte. The expected
//! frames are built by `sluice_tests::frames` from the RFCs, never by the program under test.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::GlobalStats;
use lb_userspace::dataplane::{Dataplane, DataplaneOptions, L2Vip, XdpAction};
use sluice_tests::{frames::*, netns::in_private_netns_with_veth, require_root};

const NODE_MAC: Mac = [0x02, 0x5e, 0x00, 0x00, 0x00, 0x01];
const CLIENT_MAC: Mac = [0x02, 0xc1, 0x00, 0x00, 0x00, 0x02];
const OTHER_MAC: Mac = [0x02, 0xc1, 0x00, 0x00, 0x00, 0x03];
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 100);
const OTHER4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 101);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);

fn vip6() -> Ipv6Addr {
    "fd53:1::100".parse().unwrap()
}
fn other6() -> Ipv6Addr {
    "fd53:1::101".parse().unwrap()
}
fn client6() -> Ipv6Addr {
    "fd53:1::2".parse().unwrap()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Counted {
    ArpReply,
    NaReply,
    Passed,
    Malformed,
}

struct Case {
    name: String,
    /// 0: the VIP's interface; 1: another interface with the program attached.
    on: usize,
    frame: Vec<u8>,
    /// `None`: XDP_PASS with the frame untouched.
    reply: Option<Vec<u8>>,
    counted: Counted,
}

fn pass(name: &str, on: usize, frame: Vec<u8>, counted: Counted) -> Case {
    Case {
        name: name.to_string(),
        on,
        frame,
        reply: None,
        counted,
    }
}

fn tx(name: &str, frame: Vec<u8>, reply: Vec<u8>, counted: Counted) -> Case {
    Case {
        name: name.to_string(),
        on: 0,
        frame,
        reply: Some(reply),
        counted,
    }
}

fn with_dataplane<T: Send + 'static>(
    f: impl FnOnce(&mut Dataplane, [u32; 2]) -> T + Send + 'static,
) -> T {
    require_root();
    in_private_netns_with_veth(|vip_if, other_if| {
        let mut dp = Dataplane::load(&DataplaneOptions {
            pin_dir: None,
            ..DataplaneOptions::default()
        })
        .expect("load the data plane");
        dp.set_l2_vips(&[
            L2Vip {
                ifindex: vip_if,
                ip: IpAddr::V4(VIP4),
                mac: NODE_MAC,
            },
            L2Vip {
                ifindex: vip_if,
                ip: IpAddr::V6(vip6()),
                mac: NODE_MAC,
            },
        ])
        .expect("set VIPs");
        f(&mut dp, [vip_if, other_if])
    })
}

fn run_table(dp: &Dataplane, ifindexes: [u32; 2], cases: &[Case]) -> GlobalStats {
    let mut failures = Vec::new();
    let mut expected = GlobalStats::default();
    for case in cases {
        let out = dp
            .run_ingress(ifindexes[case.on], &case.frame)
            .unwrap_or_else(|e| panic!("{}: test run failed: {e}", case.name));
        let (want_action, want_frame) = match &case.reply {
            Some(reply) => (XdpAction::Tx, reply),
            None => (XdpAction::Pass, &case.frame),
        };
        if out.action != want_action || &out.frame != want_frame {
            failures.push(format!(
                "{}: got {:?} {:02x?}\n   want {:?} {:02x?}",
                case.name, out.action, out.frame, want_action, want_frame
            ));
        }
        match case.counted {
            Counted::ArpReply => expected.arp_replies += 1,
            Counted::NaReply => expected.na_replies += 1,
            Counted::Passed => expected.passed += 1,
            Counted::Malformed => expected.malformed += 1,
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let stats = dp.stats().expect("stats");
    assert_eq!(
        stats, expected,
        "every packet counted once, in the right counter"
    );
    stats
}

/// Turns an 802.1Q tag into an 802.1ad (service) tag.
fn qinq_outer(mut frame: Vec<u8>) -> Vec<u8> {
    frame[12..14].copy_from_slice(&0x88a8u16.to_be_bytes());
    frame
}

fn arp_request_for_vip() -> Vec<u8> {
    arp_request(CLIENT_MAC, CLIENT4, VIP4)
}

fn arp_reply_to_client() -> Vec<u8> {
    arp_reply(NODE_MAC, VIP4, CLIENT_MAC, CLIENT4)
}

#[test]
fn responder_answers_arp_and_ns_for_vips_on_their_interface_only_and_passes_everything_else() {
    let cases = vec![
        tx(
            "ARP request for the VIP on its interface → exact reply",
            arp_request_for_vip(),
            arp_reply_to_client(),
            Counted::ArpReply,
        ),
        tx(
            "ARP request padded to 60 bytes → reply, padding kept",
            pad_to_60(arp_request_for_vip()),
            pad_to_60(arp_reply_to_client()),
            Counted::ArpReply,
        ),
        pass(
            "the same ARP request on another interface → untouched",
            1,
            arp_request_for_vip(),
            Counted::Passed,
        ),
        pass(
            "ARP request for a non-VIP → untouched",
            0,
            arp_request(CLIENT_MAC, CLIENT4, OTHER4),
            Counted::Passed,
        ),
        pass(
            "ARP reply (not a request) naming the VIP → untouched",
            0,
            arp_reply(CLIENT_MAC, CLIENT4, NODE_MAC, VIP4),
            Counted::Passed,
        ),
        pass(
            "gratuitous ARP claiming the VIP → untouched (an announcement, not a question)",
            0,
            arp(BROADCAST, OTHER_MAC, 1, OTHER_MAC, VIP4, [0; 6], VIP4),
            Counted::Passed,
        ),
        pass(
            "gratuitous ARP reply for the VIP → untouched",
            0,
            arp(BROADCAST, OTHER_MAC, 2, OTHER_MAC, VIP4, BROADCAST, VIP4),
            Counted::Passed,
        ),
        tx(
            "ARP probe (RFC 5227, sender 0.0.0.0) for the VIP → reply defends it",
            arp_request(CLIENT_MAC, Ipv4Addr::UNSPECIFIED, VIP4),
            arp_reply(NODE_MAC, VIP4, CLIENT_MAC, Ipv4Addr::UNSPECIFIED),
            Counted::ArpReply,
        ),
        pass(
            "ARP request from a multicast sender MAC → never answered",
            0,
            arp(
                BROADCAST,
                [0x01, 0, 0x5e, 0, 0, 1],
                1,
                [0x01, 0, 0x5e, 0, 0, 1],
                CLIENT4,
                [0; 6],
                VIP4,
            ),
            Counted::Malformed,
        ),
        pass(
            "ARP for a non-IPv4 protocol type → untouched",
            0,
            {
                let mut f = arp_request_for_vip();
                f[16] = 0x86;
                f[17] = 0xdd;
                f
            },
            Counted::Malformed,
        ),
        tx(
            "802.1Q-tagged ARP request for the VIP → tagged reply",
            with_vlan(&arp_request_for_vip(), 100),
            with_vlan(&arp_reply_to_client(), 100),
            Counted::ArpReply,
        ),
        tx(
            "802.1ad-tagged ARP request for the VIP → tagged reply",
            qinq_outer(with_vlan(&arp_request_for_vip(), 100)),
            qinq_outer(with_vlan(&arp_reply_to_client(), 100)),
            Counted::ArpReply,
        ),
        pass(
            "802.1Q-tagged ARP request on another interface → untouched",
            1,
            with_vlan(&arp_request_for_vip(), 100),
            Counted::Passed,
        ),
        tx(
            "NS for the v6 VIP → solicited NA with target link-layer address",
            neighbor_solicitation(CLIENT_MAC, client6(), vip6()),
            neighbor_advertisement(
                CLIENT_MAC,
                NODE_MAC,
                vip6(),
                client6(),
                NA_SOLICITED | NA_OVERRIDE,
                vip6(),
            ),
            Counted::NaReply,
        ),
        tx(
            "DAD NS (from ::) for the v6 VIP → NA to all-nodes, not solicited, frame grown",
            neighbor_solicitation(CLIENT_MAC, Ipv6Addr::UNSPECIFIED, vip6()),
            neighbor_advertisement(
                [0x33, 0x33, 0, 0, 0, 1],
                NODE_MAC,
                vip6(),
                "ff02::1".parse().unwrap(),
                NA_OVERRIDE,
                vip6(),
            ),
            Counted::NaReply,
        ),
        tx(
            "802.1Q-tagged NS for the v6 VIP → tagged NA",
            with_vlan(&neighbor_solicitation(CLIENT_MAC, client6(), vip6()), 42),
            with_vlan(
                &neighbor_advertisement(
                    CLIENT_MAC,
                    NODE_MAC,
                    vip6(),
                    client6(),
                    NA_SOLICITED | NA_OVERRIDE,
                    vip6(),
                ),
                42,
            ),
            Counted::NaReply,
        ),
        pass(
            "NS for another address → untouched",
            0,
            neighbor_solicitation(CLIENT_MAC, client6(), other6()),
            Counted::Passed,
        ),
        pass(
            "NS for the v6 VIP on another interface → untouched",
            1,
            neighbor_solicitation(CLIENT_MAC, client6(), vip6()),
            Counted::Passed,
        ),
        pass(
            "NS for the v6 VIP with a bad checksum → never answered",
            0,
            {
                let mut f = neighbor_solicitation(CLIENT_MAC, client6(), vip6());
                f[14 + 40 + 2] ^= 0x55;
                f
            },
            Counted::Malformed,
        ),
        pass(
            "NS for the v6 VIP with hop limit 64 (not on-link) → never answered",
            0,
            {
                let mut f = neighbor_solicitation(CLIENT_MAC, client6(), vip6());
                f[14 + 7] = 64;
                f
            },
            Counted::Malformed,
        ),
        pass(
            "NS whose IPv6 payload length runs past the frame → never answered",
            0,
            {
                let mut f = neighbor_solicitation(CLIENT_MAC, client6(), vip6());
                f[14 + 5] += 8;
                f
            },
            Counted::Malformed,
        ),
        pass(
            "IPv4 TCP SYN to the VIP → untouched",
            0,
            ipv4_tcp_syn(NODE_MAC, CLIENT_MAC, CLIENT4, VIP4, 40000, 80),
            Counted::Passed,
        ),
        pass(
            "IPv4 UDP to the VIP → untouched",
            0,
            ipv4_udp(NODE_MAC, CLIENT_MAC, CLIENT4, VIP4, 40000, 53, b"hello"),
            Counted::Passed,
        ),
        pass(
            "IPv6 TCP SYN to the v6 VIP → untouched",
            0,
            ipv6_tcp_syn(NODE_MAC, CLIENT_MAC, client6(), vip6(), 40000, 443),
            Counted::Passed,
        ),
        pass(
            "IPv6 UDP to the v6 VIP → untouched",
            0,
            ipv6_udp(NODE_MAC, CLIENT_MAC, client6(), vip6(), 40000, 53, b"hello"),
            Counted::Passed,
        ),
        pass(
            "ICMPv6 echo request to the v6 VIP → untouched",
            0,
            icmpv6_echo(NODE_MAC, CLIENT_MAC, client6(), vip6()),
            Counted::Passed,
        ),
        pass(
            "an EtherType nobody handles (LLDP) → untouched",
            0,
            pad_to_60(vec![
                0x01, 0x80, 0xc2, 0, 0, 0x0e, 2, 0, 0, 0, 0, 9, 0x88, 0xcc,
            ]),
            Counted::Passed,
        ),
    ];
    with_dataplane(move |dp, ifindexes| {
        let stats = run_table(dp, ifindexes, &cases);
        assert_eq!(stats.arp_replies, 5);
        assert_eq!(stats.na_replies, 3);
    });
}

#[test]
fn neighbor_advertisements_carry_checksums_that_verify_from_scratch() {
    with_dataplane(|dp, [vip_if, _]| {
        for (ns, l3) in [
            (neighbor_solicitation(CLIENT_MAC, client6(), vip6()), 14),
            (
                neighbor_solicitation(CLIENT_MAC, Ipv6Addr::UNSPECIFIED, vip6()),
                14,
            ),
            (
                with_vlan(&neighbor_solicitation(CLIENT_MAC, client6(), vip6()), 7),
                18,
            ),
        ] {
            let out = dp.run_ingress(vip_if, &ns).unwrap();
            assert_eq!(out.action, XdpAction::Tx);
            assert!(icmpv6_checksum_ok(&out.frame, l3), "{:02x?}", out.frame);
            assert_eq!(out.frame[l3 + 40], 136, "an NA");
            assert_eq!(out.frame[l3 + 7], 255, "hop limit 255");
        }
    });
}

/// Every prefix (0..=60 bytes) of the frames the responder answers: none may be answered unless
/// it holds the whole question. The kernel itself refuses frames shorter than an Ethernet header.
#[test]
fn truncated_frames_of_every_length_are_never_answered() {
    let arp = pad_to_60(arp_request_for_vip());
    let arp_vlan = pad_to_60(with_vlan(&arp_request_for_vip(), 100));
    let ns = neighbor_solicitation(CLIENT_MAC, client6(), vip6());
    let mut cases = Vec::new();
    let mut refused = Vec::new();
    for len in 0..=60usize {
        if len < 14 {
            refused.push(arp[..len].to_vec());
            continue;
        }
        // ARP: complete at 42 bytes (anything after is padding).
        if len < 42 {
            cases.push(pass(
                &format!("ARP request cut to {len} bytes"),
                0,
                arp[..len].to_vec(),
                Counted::Malformed,
            ));
        } else {
            let mut reply = pad_to_60(arp_reply_to_client());
            reply.truncate(len);
            cases.push(tx(
                &format!("ARP request of {len} bytes"),
                arp[..len].to_vec(),
                reply,
                Counted::ArpReply,
            ));
        }
        if len < 46 {
            cases.push(pass(
                &format!("tagged ARP request cut to {len} bytes"),
                0,
                arp_vlan[..len].to_vec(),
                Counted::Malformed,
            ));
        } else {
            let mut reply = pad_to_60(with_vlan(&arp_reply_to_client(), 100));
            reply.truncate(len);
            cases.push(tx(
                &format!("tagged ARP request of {len} bytes"),
                arp_vlan[..len].to_vec(),
                reply,
                Counted::ArpReply,
            ));
        }
    }
    // The NS is 86 bytes: every cut is truncated.
    for len in 14..ns.len() {
        cases.push(pass(
            &format!("NS cut to {len} bytes"),
            0,
            ns[..len].to_vec(),
            Counted::Malformed,
        ));
    }
    with_dataplane(move |dp, [vip_if, other_if]| {
        for frame in &refused {
            assert!(
                dp.run_ingress(vip_if, frame).is_err(),
                "the kernel runs XDP on {} bytes: the test's premise is wrong",
                frame.len()
            );
        }
        run_table(dp, [vip_if, other_if], &cases);
    });
}

#[test]
fn answers_stop_at_their_deadline_and_come_back_when_it_is_pushed_forward() {
    with_dataplane(|dp, [vip_if, _]| {
        let ns = neighbor_solicitation(CLIENT_MAC, client6(), vip6());
        let answers = |dp: &Dataplane| {
            [arp_request_for_vip(), ns.clone()]
                .iter()
                .map(|f| dp.run_ingress(vip_if, f).unwrap().action)
                .collect::<Vec<_>>()
        };
        // No deadline (`sluice run`): answered.
        assert_eq!(dp.l2_time_left().unwrap(), None);
        assert_eq!(answers(dp), [XdpAction::Tx, XdpAction::Tx]);
        // A deadline ahead: answered.
        dp.set_l2_deadline(Some(std::time::Duration::from_secs(60)))
            .unwrap();
        assert!(dp.l2_time_left().unwrap().unwrap() > std::time::Duration::from_secs(50));
        assert_eq!(answers(dp), [XdpAction::Tx, XdpAction::Tx]);
        // Past it (the speaker died and nothing renewed it): left to the kernel, unanswered.
        dp.set_l2_deadline(Some(std::time::Duration::ZERO)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert_eq!(dp.l2_time_left().unwrap(), Some(std::time::Duration::ZERO));
        assert_eq!(answers(dp), [XdpAction::Pass, XdpAction::Pass]);
        // Renewed: answered again.
        dp.set_l2_deadline(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        assert_eq!(answers(dp), [XdpAction::Tx, XdpAction::Tx]);
    });
}
