//! `bgp::wire` against a real router: BIRD 2 in a namespace takes our OPEN, our UPDATEs (IPv4
//! NLRI and IPv6 MP_REACH, communities, large communities, LOCAL_PREF), our withdrawals and our
//! Cease, and shows the result in its own table. The session here is a minimal one written for
//! the test (the product's state machine is the next step of the BGP work).

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    time::{Duration, Instant},
};

use lb_userspace::bgp::wire::{self, Attributes, BgpMessage, OpenParams, Reader};
use sluice_tests::{
    bird::{Neighbor, Router},
    netns::{veth, NetNs},
};

fn start_bird(ns: &NetNs, tag: &str, router_as: u32, speaker_as: u32) -> Router {
    Router::start(
        ns,
        tag,
        &[Neighbor {
            local: "198.18.179.1",
            router_as,
            address: "198.18.179.2",
            peer_as: speaker_as,
            password: None,
        }],
    )
}

/// A minimal session: OPEN both ways, KEEPALIVE both ways, then whatever the test sends.
struct Session {
    stream: TcpStream,
    reader: Reader,
}

impl Session {
    fn establish(ns: &NetNs, asn: u32, peer_asn: u32) -> Session {
        let stream = ns.run(|| {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match TcpStream::connect_timeout(
                    &"198.18.179.1:179".parse().unwrap(),
                    Duration::from_secs(1),
                ) {
                    Ok(s) => return s,
                    Err(e) => {
                        assert!(Instant::now() < deadline, "connect to BIRD: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        });
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut session = Session {
            stream,
            reader: Reader::new(true),
        };
        session.send(&wire::open(&OpenParams {
            asn,
            hold_time: 9,
            router_id: Ipv4Addr::new(198, 18, 179, 2),
            restart_time: 120,
            restarting: false,
            forwarding_preserved: false,
        }));
        let BgpMessage::Open(peer) = session.receive() else {
            panic!("BIRD did not answer with OPEN");
        };
        let peer = wire::check_open(&peer, peer_asn).expect("BIRD's OPEN");
        assert!(
            peer.four_octet_as && peer.ipv6_unicast && peer.graceful_restart,
            "{peer:?}"
        );
        session.send(&BgpMessage::KeepAlive);
        assert_eq!(session.receive(), BgpMessage::KeepAlive);
        session
    }

    fn send(&mut self, message: &BgpMessage) {
        let bytes = wire::encode(message, true).unwrap();
        self.stream.write_all(&bytes).unwrap();
    }

    fn receive(&mut self) -> BgpMessage {
        loop {
            if let Some(m) = self
                .reader
                .next_message()
                .expect("BIRD sends well-formed messages")
            {
                return m;
            }
            let mut buf = [0u8; 4096];
            let n = self.stream.read(&mut buf).expect("read from BIRD");
            assert!(n > 0, "BIRD closed the session");
            self.reader.feed(&buf[..n]);
        }
    }
}

fn lab() -> (NetNs, NetNs) {
    sluice_tests::require_root();
    let router = NetNs::new("rtr");
    let speaker = NetNs::new("spk");
    veth(&router, "rtr0", &speaker, "spk0");
    router.ip(&["addr", "add", "198.18.179.1/24", "dev", "rtr0"]);
    router.ip(&["addr", "add", "fd53:179::1/64", "dev", "rtr0", "nodad"]);
    speaker.ip(&["addr", "add", "198.18.179.2/24", "dev", "spk0"]);
    speaker.ip(&["addr", "add", "fd53:179::2/64", "dev", "spk0", "nodad"]);
    (router, speaker)
}

#[test]
fn bird_takes_our_ebgp_announcements_with_communities_over_ipv4_and_ipv6_and_our_withdrawals() {
    let (router_ns, speaker_ns) = lab();
    let router = start_bird(&router_ns, "ebgp", 64500, 64512);
    let mut session = Session::establish(&speaker_ns, 64512, 64500);
    let attrs = |next_hop: &str| Attributes {
        local_asn: 64512,
        ebgp: true,
        next_hop: next_hop.parse().unwrap(),
        communities: vec![(64512, 100), (0xffff, 0xff01)],
        large_communities: vec![(64512, 1, 2)],
        local_pref: None,
    };
    session.send(
        &wire::announce(
            &["198.51.100.10/32".parse().unwrap()],
            &attrs("198.18.179.2"),
        )
        .unwrap(),
    );
    session.send(
        &wire::announce(
            &["2001:db8::10/128".parse().unwrap()],
            &attrs("fd53:179::2"),
        )
        .unwrap(),
    );
    session.send(&wire::end_of_rib(false));
    session.send(&wire::end_of_rib(true));

    let v4 = router.wait_route("198.51.100.10/32", Duration::from_secs(5), |t| {
        t.contains("BGP.as_path")
    });
    assert!(v4.contains("BGP.as_path: 64512"), "{v4}");
    assert!(v4.contains("BGP.next_hop: 198.18.179.2"), "{v4}");
    assert!(
        v4.contains("(64512,100)") && v4.contains("(65535,65281)"),
        "{v4}"
    );
    assert!(v4.contains("(64512, 1, 2)"), "{v4}");
    let v6 = router.wait_route("2001:db8::10/128", Duration::from_secs(5), |t| {
        t.contains("BGP.as_path")
    });
    assert!(v6.contains("fd53:179::2"), "{v6}");

    session.send(
        &wire::withdraw(&[
            "198.51.100.10/32".parse().unwrap(),
            "2001:db8::10/128".parse().unwrap(),
        ])
        .unwrap(),
    );
    router.wait_route("198.51.100.10/32", Duration::from_secs(5), |t| {
        !t.contains("BGP.as_path")
    });
    router.wait_route("2001:db8::10/128", Duration::from_secs(5), |t| {
        !t.contains("BGP.as_path")
    });

    session.send(&wire::cease());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = router.birdc("show protocols all speaker");
        if text.contains("Administrative shutdown") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "BIRD never saw our Cease:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn bird_takes_an_ibgp_announcement_from_a_4_octet_asn_with_local_pref() {
    let (router_ns, speaker_ns) = lab();
    let asn = 4_200_000_001;
    let router = start_bird(&router_ns, "ibgp", asn, asn);
    let mut session = Session::establish(&speaker_ns, asn, asn);
    session.send(
        &wire::announce(
            &["198.51.100.20/32".parse().unwrap()],
            &Attributes {
                local_asn: asn,
                ebgp: false,
                next_hop: "198.18.179.2".parse().unwrap(),
                communities: vec![],
                large_communities: vec![(asn, 7, 8)],
                local_pref: Some(200),
            },
        )
        .unwrap(),
    );
    let text = router.wait_route("198.51.100.20/32", Duration::from_secs(5), |t| {
        t.contains("BGP.local_pref")
    });
    assert!(text.contains("BGP.local_pref: 200"), "{text}");
    assert!(text.contains("(4200000001, 7, 8)"), "{text}");
}
