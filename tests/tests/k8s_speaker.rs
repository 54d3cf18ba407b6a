//! `sluice speaker` end to end (see `sluice_tests::speaker_lab`): two speaker processes as two
//! "nodes", with liveness from the Leases alone (`--no-mesh`); the mesh has its own tests
//! (`speaker_mesh`).

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use serde_json::json;
use sluice_tests::{
    frames,
    netns::NetNs,
    rawsock::RawSocket,
    speaker_lab::{
        ask_arp, ask_vip, lab, takeover, wait_for, CLIENT_IP, EVENTS, LEASES, NAMES, VIP, VIP6,
    },
};

#[test]
fn one_elected_speaker_answers_arp_on_the_chosen_interface_balances_to_its_pod_and_hands_over_when_killed(
) {
    let mut lab = lab(2);
    lab.objects("Local");
    lab.start_speaker(0);
    lab.start_speaker(1);

    let owner = wait_for(
        "one node to announce the VIP",
        Duration::from_secs(20),
        || lab.announcer(),
    );
    let other = 1 - owner;
    // Both speakers agree: exactly one ARP reply on the data segment, from the owner's eth1.
    let owner_mac = lab.node_mac(owner, "eth1");
    let replies = wait_for(
        "an ARP reply on the data segment",
        Duration::from_secs(5),
        || {
            let r = ask_arp(&lab.client, "c0", CLIENT_IP);
            (!r.is_empty()).then_some(r)
        },
    );
    assert_eq!(replies.len(), 1, "one node answers: {replies:02x?}");
    assert_eq!(&replies[0][6..12], &owner_mac, "the elected node answers");
    // Not on the management segment, although the program runs on eth0 too.
    let on_mgmt = ask_arp(&lab.mgmt, "m0", Ipv4Addr::new(198, 18, 60, 254));
    assert!(
        on_mgmt.is_empty(),
        "answered on a segment not chosen: {on_mgmt:02x?}"
    );

    // Traffic to the VIP reaches the owner's own pod (policy Local), balanced in XDP.
    let expected = format!("pod-{}", ["a", "b"][owner]);
    let name = wait_for("an answer through the VIP", Duration::from_secs(10), || {
        ask_vip(&lab.client)
    });
    assert_eq!(name, expected);
    // The speaker sweeps closed flows as `sluice run` does: that connection, closed by both
    // sides, leaves the owner's connection table (5 s after its second FIN, swept every 2 s).
    wait_for(
        "the closed flow swept on the owner",
        Duration::from_secs(30),
        || {
            let (_, m) = http(&lab.nodes[owner], "/metrics");
            m.lines()
                .any(|l| {
                    l.starts_with("sluice_closed_flows_removed_total ")
                        && l != "sluice_closed_flows_removed_total 0"
                })
                .then_some(())
        },
    );
    let event = wait_for("the nodeAssigned Event", Duration::from_secs(5), || {
        lab.api
            .list(EVENTS)
            .into_iter()
            .find(|e| e["reason"] == "nodeAssigned")
    });
    assert!(
        event["note"].as_str().unwrap().contains(&format!(
            "node {} announces 198.18.50.200 by L2 (ARP/NDP) on eth1",
            NAMES[owner]
        )),
        "{event}"
    );

    // The operator deletes the owner's Lease: the other node takes the IP over, and the owner
    // stops answering (its new Lease claims nothing).
    let first_mac = owner_mac;
    let second_mac = lab.node_mac(other, "eth1");
    let (took, answered) = takeover(&lab, second_mac, || {
        lab.api
            .delete(&format!("{LEASES}/sluice-speaker-{}", NAMES[owner]))
            .unwrap();
    });
    eprintln!(
        "L2 move on Lease deletion: gratuitous ARP from the new owner after {:.2} s; the first ARP request it alone answered was sent after {:.2} s (polled every ~0.5 s)",
        took.as_secs_f64(),
        answered.as_secs_f64()
    );
    wait_for(
        "the new owner's Lease to say so",
        Duration::from_secs(5),
        || lab.announces(other).then_some(()),
    );
    wait_for(
        "the old owner to be back, claiming nothing",
        Duration::from_secs(5),
        || {
            lab.api
                .get(&format!("{LEASES}/sluice-speaker-{}", NAMES[owner]))
                .filter(|_| !lab.announces(owner))
        },
    );
    let r = ask_arp(&lab.client, "c0", CLIENT_IP);
    assert!(
        r.len() == 1 && r[0][6..12] == second_mac,
        "one answer, from the new owner: {r:02x?}"
    );
    let name = wait_for(
        "an answer through the VIP after the move",
        Duration::from_secs(10),
        || ask_vip(&lab.client),
    );
    assert_eq!(name, format!("pod-{}", ["a", "b"][other]));

    // The new owner's speaker dies (SIGKILL: no goodbye): the first node takes the IP back.
    let victim = lab.speakers[other].take();
    let (took, answered) = takeover(&lab, first_mac, move || drop(victim));
    eprintln!(
        "L2 failover: gratuitous ARP from the new owner {:.2} s after the owner's speaker was killed; the first ARP request it alone answered was sent after {:.2} s (polled every ~0.5 s; lease 3 s)",
        took.as_secs_f64(),
        answered.as_secs_f64()
    );
    wait_for(
        "the first node's Lease to say so",
        Duration::from_secs(5),
        || lab.announces(owner).then_some(()),
    );
    let name = wait_for(
        "an answer through the VIP after failover",
        Duration::from_secs(10),
        || ask_vip(&lab.client),
    );
    assert_eq!(name, format!("pod-{}", ["a", "b"][owner]));
    lab.api.assert_rbac_allows_every_request("speaker");
}

#[test]
fn with_bird_as_the_router_both_nodes_announce_a_local_service_until_one_loses_its_endpoint() {
    let mut lab = lab(2);
    lab.objects("Local");
    let (router, _router_ns) = lab.start_bird("speaker");
    lab.start_speaker(0);
    lab.start_speaker(1);
    let prefix = format!("{VIP}/32");
    router.wait_route(&prefix, Duration::from_secs(30), |t| {
        t.contains("via 198.18.50.1") && t.contains("via 198.18.50.2")
    });
    let metrics = wait_for(
        "the session on node-a's /metrics",
        Duration::from_secs(5),
        || {
            let (_, m) = http(&lab.nodes[0], "/metrics");
            m.contains("sluice_bgp_session_up{peer=\"198.18.50.254\"} 1")
                .then_some(m)
        },
    );
    assert!(
        metrics.contains("sluice_bgp_updates_sent_total"),
        "{metrics}"
    );
    let announced = wait_for("the announced Events", Duration::from_secs(5), || {
        let notes: Vec<String> = lab
            .api
            .list(EVENTS)
            .iter()
            .filter(|e| e["reason"] == "announced")
            .filter_map(|e| e["note"].as_str().map(String::from))
            .collect();
        (notes.len() == 2).then_some(notes)
    });
    assert!(
        announced
            .iter()
            .any(|n| n.contains("node node-b announces 198.18.50.200 by BGP to 198.18.50.254")),
        "{announced:?}"
    );

    // node-b's pod goes away: node-b withdraws, node-a keeps announcing.
    let removed = Instant::now();
    lab.api
        .patch(
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/web-abc",
            json!({"endpoints": [{"addresses": ["10.244.1.2"], "nodeName": "node-a", "conditions": {"ready": true}}]}),
        )
        .unwrap();
    router.wait_route(&prefix, Duration::from_secs(10), |t| {
        t.contains("via 198.18.50.1") && !t.contains("via 198.18.50.2")
    });
    wait_for(
        "node-b's Lease to say it announces nothing by BGP",
        Duration::from_secs(5),
        || {
            let l = lab.api.get(&format!("{LEASES}/sluice-speaker-node-b"))?;
            (l["metadata"]["annotations"]["sluice.dev/bgp-announcing"] == "").then_some(())
        },
    );
    let a = lab
        .api
        .get(&format!("{LEASES}/sluice-speaker-node-a"))
        .unwrap();
    assert_eq!(
        a["metadata"]["annotations"]["sluice.dev/bgp-announcing"],
        VIP.to_string()
    );
    eprintln!(
        "BGP: node-b's route withdrawn {:.2} s after its last local endpoint left the EndpointSlice",
        removed.elapsed().as_secs_f64()
    );
    let withdrawn = wait_for("the withdrawn Event", Duration::from_secs(5), || {
        lab.api
            .list(EVENTS)
            .into_iter()
            .find(|e| e["reason"] == "withdrawn")
    });
    assert!(
        withdrawn["note"]
            .as_str()
            .unwrap()
            .contains("node node-b withdrew 198.18.50.200"),
        "{withdrawn}"
    );
    // Traffic through the VIP still reaches a pod (node-a's).
    let name = wait_for("an answer through the VIP", Duration::from_secs(10), || {
        ask_vip(&lab.client)
    });
    assert_eq!(name, "pod-a");
    lab.api.assert_rbac_allows_every_request("speaker");
    drop(router);
}

/// GET on the speaker's metrics address inside its node namespace: (status code, body).
fn http(node: &NetNs, path: &'static str) -> (u16, String) {
    node.run(move || {
        sluice_tests::http_get(SocketAddr::from(([127, 0, 0, 1], 9465)), path).unwrap_or_default()
    })
}

fn readyz(node: &NetNs) -> (u16, String) {
    http(node, "/readyz")
}

#[test]
fn a_speaker_without_lease_permission_says_why_it_is_not_ready_announces_nothing_and_recovers() {
    let mut lab = lab(2);
    lab.objects_with("Cluster", &[VIP.to_string(), VIP6.to_string()]);
    lab.api.forbid("create", "leases");
    lab.api.forbid("update", "leases");
    lab.start_speaker(1);
    let why = wait_for("/readyz to say why", Duration::from_secs(10), || {
        let (code, body) = readyz(&lab.nodes[1]);
        (code == 503 && body.contains("Lease")).then_some(body)
    });
    assert!(
        why.contains("cannot write the Lease sluice-system/sluice-speaker-node-b")
            && why.contains(
                "RBAC: the speaker needs get, create and update on coordination.k8s.io leases"
            ),
        "{why}"
    );
    assert!(
        ask_arp(&lab.client, "c0", CLIENT_IP).is_empty(),
        "a node nobody sees alive answered"
    );
    lab.api.allow_all();
    wait_for(
        "the node to announce once allowed",
        Duration::from_secs(10),
        || {
            let r = ask_arp(&lab.client, "c0", CLIENT_IP);
            (r.len() == 1 && r[0][6..12] == lab.node_mac(1, "eth1")).then_some(())
        },
    );
    assert_eq!(readyz(&lab.nodes[1]).0, 200);
    // The Service's IPv6 address is answered by NDP, by the same node, on the same interface.
    let na = ask_ndp(&lab.client);
    assert_eq!(na.len(), 1, "one Neighbor Advertisement: {na:02x?}");
    assert_eq!(&na[0][6..12], &lab.node_mac(1, "eth1"));
}

/// Neighbor Advertisements for VIP6 to a solicitation sent from the client.
fn ask_ndp(client: &NetNs) -> Vec<Vec<u8>> {
    let my_mac = client.mac("c0");
    let me: std::net::Ipv6Addr = "fd53:50::100".parse().unwrap();
    client.run(move || {
        let sock = RawSocket::open("c0").unwrap();
        sock.send(&frames::neighbor_solicitation(my_mac, me, VIP6))
            .unwrap();
        sock.collect(Duration::from_millis(500), |f| {
            f.len() >= 78 && f[12..14] == [0x86, 0xdd] && f[54] == 136 && f[62..78] == VIP6.octets()
        })
    })
}

#[test]
fn the_controller_gives_a_new_service_its_ip_and_the_elected_speaker_serves_it() {
    let mut lab = lab(2);
    // As a user would: a Service with no status yet; the controller (in the API's namespace)
    // allocates, the speakers announce and balance.
    lab.objects_with("Local", &[]);
    let controller = lab.start_controller();
    lab.start_speaker(0);
    lab.start_speaker(1);
    let ip = wait_for(
        "the controller to write the ingress IP",
        Duration::from_secs(20),
        || {
            let s = lab.api.get("/api/v1/namespaces/default/services/web")?;
            s["status"]["loadBalancer"]["ingress"][0]["ip"]
                .as_str()
                .map(String::from)
        },
    );
    assert_eq!(ip, VIP.to_string(), "the pool's first address");
    let owner = wait_for("one node to announce it", Duration::from_secs(20), || {
        lab.announcer()
    });
    let name = wait_for("an answer through the IP", Duration::from_secs(10), || {
        ask_vip(&lab.client)
    });
    assert_eq!(name, format!("pod-{}", ["a", "b"][owner]));
    let reasons: Vec<String> = lab
        .api
        .list(EVENTS)
        .iter()
        .filter_map(|e| e["reason"].as_str().map(String::from))
        .collect();
    assert!(
        reasons.contains(&"IPAllocated".to_string())
            && reasons.contains(&"nodeAssigned".to_string()),
        "{reasons:?}"
    );
    drop(controller);
}

#[test]
fn a_bfdprofile_makes_speakers_run_bfd_so_a_cut_link_is_withdrawn_by_bfd_and_a_rolling_restart_keeps_the_route(
) {
    let mut lab = lab(2);
    lab.objects("Local");
    let (router, _router_ns) = lab.start_bird_with_bfd("speaker-bfd");
    lab.start_speaker(0);
    lab.start_speaker(1);
    let prefix = format!("{VIP}/32");
    let via = |n: usize| format!("via 198.18.50.{n}");
    router.wait_route(&prefix, Duration::from_secs(30), |t| {
        t.contains(&via(1)) && t.contains(&via(2))
    });
    wait_for("BFD up with both nodes", Duration::from_secs(30), || {
        (router.birdc("show bfd sessions").matches(" Up ").count() == 2).then_some(())
    });
    let status = wait_for(
        "node-b's status to show BFD up",
        Duration::from_secs(5),
        || {
            let s = lab.status(1);
            (s["bfd"]["sessions"][0]["state"] == "Up").then_some(s)
        },
    );
    assert_eq!(status["bfd"]["sessions"][0]["profile"], "fast", "{status}");

    // A rolling update: node-b's speaker gets SIGTERM (--on-stop restart, the default) and a new
    // one starts. BIRD keeps node-b's route and its BFD session all along.
    let old = lab.speakers[1].take().unwrap();
    old.stop(libc::SIGTERM);
    for _ in 0..50 {
        let t = router.birdc(&format!("show route {prefix} all"));
        assert!(
            t.contains(&via(2)),
            "node-b's route left during its restart:\n{t}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    lab.start_speaker(1);
    // The new speaker carries the BFD session on (BIRD's timeout for it is back to 3 × 300 ms)
    // and its BGP session is back.
    router.wait_protocol("speaker2", "Established", Duration::from_secs(10));
    wait_for(
        "node-b's BFD session carried on at its own pace",
        Duration::from_secs(10),
        || {
            let t = router.birdc("show bfd sessions");
            t.lines()
                .any(|l| l.contains("198.18.50.2 ") && l.contains(" Up ") && l.ends_with("0.900"))
                .then_some(())
        },
    );
    // The new speaker's status file says so at its next write.
    wait_for(
        "node-b's status to show BFD up again",
        Duration::from_secs(5),
        || (lab.status(1)["bfd"]["sessions"][0]["state"] == "Up").then_some(()),
    );
    let t = router.birdc(&format!("show route {prefix} all"));
    assert!(t.contains(&via(2)), "{t}");
    assert_eq!(
        router.birdc("show bfd sessions").matches(" Up ").count(),
        2,
        "{}",
        router.birdc("show bfd sessions")
    );

    // node-b's link is cut at the switch: BFD takes its session, and its route, away.
    lab.seg.ip(&["link", "set", "b1", "down"]);
    router.wait_route(&prefix, Duration::from_secs(5), |t| {
        t.contains(&via(1)) && !t.contains(&via(2))
    });
    assert!(
        router
            .birdc("show protocols all speaker2")
            .contains("BFD session down"),
        "{}",
        router.birdc("show protocols all speaker2")
    );
}
