//! BFD against real routers (BIRD 2's `protocol bfd`, FRR's bfdd), with `sluice run` as the node
//! (see `sluice_tests::bfd_lab`): a node that fails is withdrawn by BFD, not by the BGP hold
//! time or graceful restart; a planned restart keeps the route and the traffic. Timing figures
//! come from `cargo xtask soak bfd`, not from here.

use std::time::Duration;

use sluice_tests::{
    bfd_lab::{BfdLab, Flow, RouterKind},
    require_root,
};

/// Longer than BFD needs (0.9 s here) and far shorter than what BGP alone would take (9 s hold
/// time, 120 s graceful restart).
const WITHDRAWN_WITHIN: Duration = Duration::from_secs(5);

/// MetalLB's default (300 ms × 3): loose enough that a loaded CI machine never flaps a session
/// (the soak measures 100 ms × 3).
const INTERVAL_MS: u32 = 300;

/// One lab at a time: several routers and nodes at once would compete for two cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn link_failure_is_withdrawn_by_bfd(kind: RouterKind) {
    require_root();
    let _serial = serial();
    let lab = BfdLab::new(kind, INTERVAL_MS);
    lab.set_link(false);
    lab.wait_route(false, WITHDRAWN_WITHIN);
    let said = lab.router_bgp_state();
    match kind {
        RouterKind::Bird => assert!(said.contains("BFD session down"), "{said}"),
        // "Notification sent (Cease/BFD Down)" (RFC 9384).
        RouterKind::Frr => assert!(said.contains("BFD Down"), "{said}"),
    }
    // Back: BFD and the route return.
    lab.set_link(true);
    lab.wait_bfd_up(Duration::from_secs(30));
    lab.wait_route(true, Duration::from_secs(60));
}

#[test]
fn bird_withdraws_a_node_whose_link_fails_by_bfd() {
    link_failure_is_withdrawn_by_bfd(RouterKind::Bird);
}

#[test]
fn frr_withdraws_a_node_whose_link_fails_by_bfd() {
    link_failure_is_withdrawn_by_bfd(RouterKind::Frr);
}

#[test]
fn bird_withdraws_a_killed_node_by_bfd_despite_graceful_restart() {
    require_root();
    let _serial = serial();
    let mut lab = BfdLab::new(RouterKind::Bird, INTERVAL_MS);
    lab.stop_node(libc::SIGKILL);
    lab.wait_route(false, WITHDRAWN_WITHIN);
    let said = lab.router_bgp_state();
    assert!(said.contains("BFD session down"), "{said}");
}

fn planned_restart_keeps_route_and_traffic(kind: RouterKind) {
    require_root();
    let _serial = serial();
    let mut lab = BfdLab::new(kind, INTERVAL_MS);
    let flow = Flow::start(&lab);
    std::thread::sleep(Duration::from_millis(300));
    lab.stop_node(libc::SIGUSR2);
    // Away for 2 s: ten times BFD's detection time.
    for _ in 0..100 {
        assert!(
            lab.route_present(),
            "{kind:?} dropped the route during the restart:\n{}",
            lab.router_bgp_state()
        );
        assert!(
            lab.bfd_up(),
            "{kind:?}: BFD went down during the restart:\n{}",
            lab.router_bgp_state()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    lab.start_node();
    for _ in 0..100 {
        assert!(
            lab.route_present(),
            "{kind:?} dropped the route after the restart"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (sent, received, longest_gap) = flow.finish();
    eprintln!("{kind:?}: {sent} datagrams sent, {received} received, longest gap {longest_gap}");
    assert_eq!(
        longest_gap, 0,
        "{kind:?}: datagrams lost during the restart"
    );
    assert_eq!(received as u64, sent);
    // The status reaches `sluice inspect` with the daemon's next tick (once a second).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while lab.inspect()["bfd"]["sessions"][0]["state"] != "Up" {
        assert!(std::time::Instant::now() < deadline, "{}", lab.inspect());
        std::thread::sleep(Duration::from_millis(100));
    }
    if kind == RouterKind::Bird {
        // The new process took the data plane over: its OPEN says it restarted (R) with
        // forwarding kept (F), as BIRD shows under the neighbour's graceful-restart capability.
        let said = lab.router_bgp_state();
        let preserved = said
            .lines()
            .filter(|l| l.contains("AF preserved:"))
            .any(|l| l.contains("ipv4"));
        assert!(preserved, "{said}");
        assert!(said.contains("Restart recovery"), "{said}");
    }
}

#[test]
fn bird_keeps_the_route_and_the_traffic_through_a_planned_restart() {
    planned_restart_keeps_route_and_traffic(RouterKind::Bird);
}

#[test]
fn frr_keeps_the_route_and_the_traffic_through_a_planned_restart() {
    planned_restart_keeps_route_and_traffic(RouterKind::Frr);
}

/// Bad BFD packets from the router's segment: each is dropped and counted under its reason, and
/// the session with the real router never leaves Up.
#[test]
fn malformed_bfd_packets_are_counted_by_reason_and_never_flap_the_session() {
    require_root();
    let _serial = serial();
    let lab = BfdLab::new(RouterKind::Bird, INTERVAL_MS);
    let good = |state_bits: u8, your: u32| {
        let mut p = vec![0x20, state_bits << 6, 3, 24];
        p.extend(0x1234_5678u32.to_be_bytes());
        p.extend(your.to_be_bytes());
        p.extend(100_000u32.to_be_bytes());
        p.extend(100_000u32.to_be_bytes());
        p.extend(0u32.to_be_bytes());
        p
    };
    let with = |mut p: Vec<u8>, at: usize, value: u8| {
        p[at] = value;
        p
    };
    // (bytes, TTL, reason)
    let cases: Vec<(Vec<u8>, u32, &str)> = vec![
        (good(1, 0), 64, "ttl"),
        (with(good(1, 0), 0, 0x40), 255, "version"),
        (good(1, 0)[..10].to_vec(), 255, "length"),
        (with(good(1, 0), 3, 200), 255, "length"),
        (with(good(1, 0), 2, 0), 255, "detect_mult"),
        (with(good(1, 0), 1, 0x41), 255, "multipoint"),
        (with(good(3, 0), 1, 0xc0), 255, "discriminator"),
        (
            {
                let mut p = with(good(1, 0), 1, 0x44);
                p[3] = 26;
                p.extend([1, 2]);
                p
            },
            255,
            "authentication",
        ),
        (good(3, 0xdead_beef), 255, "unknown_session"),
    ];
    let sent: Vec<(Vec<u8>, u32)> = cases.iter().map(|(b, t, _)| (b.clone(), *t)).collect();
    lab.router.run(move || {
        for (bytes, ttl) in sent {
            let socket = std::net::UdpSocket::bind("198.18.179.1:0").unwrap();
            socket.set_ttl(ttl).unwrap();
            for _ in 0..5 {
                socket.send_to(&bytes, ("198.18.179.2", 3784)).unwrap();
            }
        }
    });
    // The counters reach /metrics with the daemon's next status tick (once a second).
    let count = |metrics: &str, reason: &str| -> u64 {
        let line = format!("sluice_bfd_packets_dropped_total{{reason=\"{reason}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = lab.metrics();
        let short: Vec<_> = cases
            .iter()
            .filter(|(_, _, reason)| count(&metrics, reason) < 5)
            .map(|(_, _, reason)| *reason)
            .collect();
        if short.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "fewer than 5 dropped for {short:?}:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(lab.bfd_up());
    let doc = lab.inspect();
    let session = &doc["bfd"]["sessions"][0];
    assert_eq!(session["state"], "Up", "{doc}");
    let downs: Vec<_> = session["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t[0] == "Down")
        .collect();
    assert!(downs.is_empty(), "the session flapped: {doc}");
}

/// eBGP multi-hop: BFD runs multi-hop (UDP 4784, RFC 5883), its packets arriving with TTL 254
/// (at least the profile's `minimumTtl`), and withdraws a node cut off behind the routed hop.
#[test]
fn bird_one_hop_away_runs_multihop_bfd_and_withdraws_a_node_cut_off_behind_the_hop() {
    require_root();
    let _serial = serial();
    let lab = BfdLab::new_multihop(INTERVAL_MS);
    // The status reaches `sluice inspect` with the daemon's next tick (once a second).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let doc = lab.inspect();
        let session = &doc["bfd"]["sessions"][0];
        if session["state"] == "Up" {
            assert_eq!(session["multihop"], true, "{doc}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{doc}");
        std::thread::sleep(Duration::from_millis(100));
    }
    lab.set_link(false);
    lab.wait_route(false, WITHDRAWN_WITHIN);
    let said = lab.router_bgp_state();
    assert!(said.contains("BFD session down"), "{said}");
}

/// BGP and BFD over IPv6: packets leave and must arrive with hop limit 255, and a node cut off
/// behind the switch loses its /128 by BFD.
#[test]
fn bird_over_ipv6_runs_bfd_and_withdraws_a_cut_node() {
    require_root();
    let _serial = serial();
    let lab = BfdLab::new_ipv6(INTERVAL_MS);
    lab.set_link(false);
    lab.wait_route(false, WITHDRAWN_WITHIN);
    let said = lab.router_bgp_state();
    assert!(said.contains("BFD session down"), "{said}");
}

/// A profile changed in a running `sluice run` (the file is reloaded): the new intervals reach
/// the router by a Poll Sequence, and the session never leaves Up.
#[test]
fn new_bfd_timers_reach_bird_without_taking_the_session_down() {
    require_root();
    let _serial = serial();
    let lab = BfdLab::new(RouterKind::Bird, INTERVAL_MS);
    // BIRD: "Interval" is its transmit interval (max of its own and our receive interval),
    // "Timeout" its detection time for us (our multiplier × max(its receive, our transmit)).
    assert!(
        lab.router_bfd_line().ends_with("0.300    0.900"),
        "{}",
        lab.router_bfd_line()
    );
    lab.edit_config(|t| {
        t.replace(
            "receiveInterval: 300, transmitInterval: 300, detectMultiplier: 3",
            "receiveInterval: 400, transmitInterval: 400, detectMultiplier: 5",
        )
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !lab.router_bfd_line().ends_with("0.400    2.000") {
        assert!(
            std::time::Instant::now() < deadline,
            "BIRD never took the new timers: {}",
            lab.router_bfd_line()
        );
        assert!(
            lab.bfd_up(),
            "the session went down: {}",
            lab.router_bfd_line()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Without --config too: `sluice run` left where its status is for its pin directory.
    let doc = lab.inspect_with(&[]);
    assert_eq!(doc["bgpSessions"][0]["state"], "Established", "{doc}");
    let session = &doc["bfd"]["sessions"][0];
    let downs = session["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t[0] == "Down" || t[0] == "AdminDown")
        .count();
    assert_eq!(downs, 0, "{doc}");
}

/// A reload that drops a peer's profile stops BFD (the sockets close); one that brings it back
/// starts it again on the same ports.
#[test]
fn a_peer_that_loses_and_regains_its_bfd_profile_on_reload_gets_bfd_back() {
    require_root();
    let _serial = serial();
    let lab = BfdLab::new(RouterKind::Bird, INTERVAL_MS);
    let sessions = |lab: &BfdLab| lab.inspect()["bfd"]["sessions"].clone();
    lab.edit_config(|t| t.replace("  bfdProfile: fast\n", ""));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !sessions(&lab).is_null() {
        assert!(std::time::Instant::now() < deadline, "{}", sessions(&lab));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!lab.bfd_up());
    lab.edit_config(|t| {
        t.replace(
            "  connectTime: 1s\n",
            "  connectTime: 1s\n  bfdProfile: fast\n",
        )
    });
    lab.wait_bfd_up(Duration::from_secs(30));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = sessions(&lab);
        if s[0]["state"] == "Up" {
            assert!(s[0]["error"].is_null(), "{s}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{s}");
        std::thread::sleep(Duration::from_millis(100));
    }
    lab.wait_route(true, Duration::from_secs(30));
}
