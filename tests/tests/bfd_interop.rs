//! BFD against real routers (BIRD 2's `protocol bfd`, FRR's bfdd), with `sluice run` as the node
//! (see `sluice_tests::bfd_lab`): a node that fails is withdrawn by BFD, not by the BGP hold
//! time or graceful restart; a planned restart keeps the route and the traffic. Timing figures
//! come from `cargo xtask soak bfd`, not from here.

use std::time::Duration;

use sluice_tests::{
    bfd_lab::{BfdLab, Flow, RouterKind},
    require_root,
};

/// Longer than BFD needs (0.3 s) and far shorter than what BGP alone would take (9 s hold time,
/// 120 s graceful restart).
const WITHDRAWN_WITHIN: Duration = Duration::from_secs(5);

fn link_failure_is_withdrawn_by_bfd(kind: RouterKind) {
    require_root();
    let lab = BfdLab::new(kind, 100);
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
    let mut lab = BfdLab::new(RouterKind::Bird, 100);
    lab.stop_node(libc::SIGKILL);
    lab.wait_route(false, WITHDRAWN_WITHIN);
    let said = lab.router_bgp_state();
    assert!(said.contains("BFD session down"), "{said}");
}

fn planned_restart_keeps_route_and_traffic(kind: RouterKind) {
    require_root();
    let mut lab = BfdLab::new(kind, 100);
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
    let doc = lab.inspect();
    let session = &doc["bfd"]["sessions"][0];
    assert_eq!(session["state"], "Up", "{doc}");
}

#[test]
fn bird_keeps_the_route_and_the_traffic_through_a_planned_restart() {
    planned_restart_keeps_route_and_traffic(RouterKind::Bird);
}

#[test]
fn frr_keeps_the_route_and_the_traffic_through_a_planned_restart() {
    planned_restart_keeps_route_and_traffic(RouterKind::Frr);
}
