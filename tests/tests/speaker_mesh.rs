//! The speaker mesh end to end (see `sluice_tests::speaker_lab`): speakers in node namespaces
//! that talk to each other over the management segment, against the fake API server; real
//! ARP, real TCP, real XDP. Each test proves one failure path once; `cargo xtask soak`
//! repeats them and prints the figures.
//!
//! The tests of this file run one at a time: the mesh's timing is what they prove, and two labs
//! on two cores would measure each other.

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use lb_userspace::mesh::envelope::{Kind, Sealer};
use sluice_tests::{
    fakeapi::Outage,
    lab::{napi_keeper, Conn},
    netns::{veth, NetNs},
    speaker_lab::{
        answers_lost, arp_answerers, failover, mesh_lab, mesh_lab_with, others, wait_for, EVENTS,
        LEASES, NAMES, VIP,
    },
};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn killing_the_owners_speaker_moves_its_ip_on_the_meshs_word_long_before_its_lease_expires() {
    let _serial = one_at_a_time();
    // Leases of 60 s: a failover seen within the 20 s the lab waits is the mesh's doing.
    let (mut lab, owner) = mesh_lab(3, "60");
    let victim = lab.speakers[owner].take();
    let f = failover(&lab, &others(&lab, owner), move || drop(victim));
    eprintln!(
        "mesh failover (3 nodes, SIGKILL): gratuitous ARP from {} after {:.2} s, first TCP connection answered by its pod after {:.2} s",
        NAMES[f.winner],
        f.garp.as_secs_f64(),
        f.connected.as_secs_f64()
    );
    // The dead speaker's node stops answering by itself (the deadline): one answer only.
    lab.wait_answered_by(f.winner, Duration::from_secs(5));
    // An Event on the Service names the dead node and how long the mesh took to notice.
    let event = wait_for("the nodeFailedOver Event", Duration::from_secs(10), || {
        lab.api
            .list(EVENTS)
            .into_iter()
            .find(|e| e["reason"] == "nodeFailedOver")
    });
    let note = event["note"].as_str().unwrap();
    assert!(
        note.contains(&format!("from node {}", NAMES[owner]))
            && note.contains("stopped answering the speaker mesh (noticed"),
        "{note}"
    );
    // The survivors see it down in the mesh, with the time to notice, on their status.
    let member = wait_for(
        "the winner's view of the dead node",
        Duration::from_secs(5),
        || {
            lab.status(f.winner)["mesh"]["members"]
                .as_array()?
                .iter()
                .find(|m| m["node"] == NAMES[owner] && m["state"] == "down")
                .cloned()
        },
    );
    assert!(member["noticedAfterSeconds"].as_f64().is_some(), "{member}");
    // And `sluice inspect` on the winner's node says so too, beside the VIP it now answers for.
    let doc = lab.inspect(f.winner);
    let members = doc["mesh"]["members"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        members
            .iter()
            .any(|m| m["node"] == NAMES[owner] && m["state"] == "down"),
        "{doc}"
    );
    assert!(
        doc["l2Vips"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["ip"] == VIP.to_string()),
        "{doc}"
    );
}

#[test]
fn the_owners_data_link_going_down_moves_its_ip_and_nothing_moves_back_when_it_returns() {
    let _serial = one_at_a_time();
    let (lab, owner) = mesh_lab(2, "60");
    let port = format!("{}1", ["a", "b"][owner]);
    let f = failover(&lab, &others(&lab, owner), || {
        lab.seg.ip(&["link", "set", &port, "down"]);
    });
    eprintln!(
        "data link down (2 nodes): gratuitous ARP from {} after {:.2} s, first TCP connection answered by its pod after {:.2} s",
        NAMES[f.winner],
        f.garp.as_secs_f64(),
        f.connected.as_secs_f64()
    );
    lab.seg.ip(&["link", "set", &port, "up"]);
    let winner_mac = lab.node_mac(f.winner, "eth1");
    std::thread::sleep(Duration::from_secs(2));
    let (polls, lost) = answers_lost(&lab, winner_mac, Duration::from_secs(3));
    assert_eq!(
        lost, 0,
        "{lost} of {polls} ARP polls not answered by the new owner alone"
    );
}

#[test]
fn an_api_server_outage_withdraws_nothing_and_a_speaker_killed_during_one_still_fails_over() {
    let _serial = one_at_a_time();
    // Leases of 3 s: an outage of 12 s lasts four of them. BIRD peers with both nodes, which
    // both announce the VIP (a pod on each, policy Local).
    let mut router = None;
    let (mut lab, owner) =
        mesh_lab_with(2, "3", &[], |lab| router = Some(lab.start_bird("outage")));
    let (router, _router_ns) = router.as_ref().unwrap();
    let prefix = format!("{VIP}/32");
    let both = |t: &str| t.contains("via 198.18.50.1") && t.contains("via 198.18.50.2");
    router.wait_route(&prefix, Duration::from_secs(30), both);
    let owner_mac = lab.node_mac(owner, "eth1");
    for outage in [Outage::Refuse, Outage::Hang] {
        lab.api.set_outage(outage);
        // The route, every ~100 ms, while the ARP polls run.
        let stop = AtomicBool::new(false);
        let ((polls, lost), (checks, missing)) = std::thread::scope(|scope| {
            let routes = scope.spawn(|| {
                let (mut checks, mut missing) = (0, 0);
                while !stop.load(Ordering::SeqCst) {
                    checks += 1;
                    if !both(&router.birdc(&format!("show route {prefix} all"))) {
                        missing += 1;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                (checks, missing)
            });
            let arp = answers_lost(&lab, owner_mac, Duration::from_secs(12));
            stop.store(true, Ordering::SeqCst);
            (arp, routes.join().unwrap())
        });
        lab.api.set_outage(Outage::None);
        assert_eq!(lost, 0, "{outage:?}: {lost} of {polls} ARP polls lost");
        assert_eq!(
            missing, 0,
            "{outage:?}: BIRD lacked a node's route in {missing} of {checks} checks"
        );
        eprintln!(
            "API server outage ({outage:?}, 12 s): BIRD had both routes in all {checks} checks"
        );
        let (polls, lost) = answers_lost(&lab, owner_mac, Duration::from_secs(3));
        assert_eq!(
            lost, 0,
            "after {outage:?}: {lost} of {polls} ARP polls lost"
        );
        eprintln!("API server outage ({outage:?}, 12 s): {polls} ARP polls after it, none lost; none lost during it either");
    }
    // The API server hangs again, and the owner's speaker dies meanwhile: the other node takes
    // the IP over, on the mesh's word alone.
    lab.api.set_outage(Outage::Hang);
    std::thread::sleep(Duration::from_secs(4));
    let victim = lab.speakers[owner].take();
    let f = failover(&lab, &others(&lab, owner), move || drop(victim));
    eprintln!(
        "failover during an API outage (hang): gratuitous ARP after {:.2} s, first TCP connection after {:.2} s",
        f.garp.as_secs_f64(),
        f.connected.as_secs_f64()
    );
    // The dead speaker's node falls silent by itself within the failure timeout (its answers'
    // deadline), API server or not.
    lab.wait_answered_by(f.winner, Duration::from_secs(5));
    let winner_mac = lab.node_mac(f.winner, "eth1");
    lab.api.set_outage(Outage::None);
    // When the API server is back, nothing moves.
    let (polls, lost) = answers_lost(&lab, winner_mac, Duration::from_secs(5));
    assert_eq!(
        lost, 0,
        "after the outage: {lost} of {polls} ARP polls moved"
    );
    wait_for(
        "the new owner's Lease to say so once the API server is back",
        Duration::from_secs(10),
        || lab.announces(f.winner).then_some(()),
    );
}

#[test]
fn a_node_cut_off_from_everything_falls_silent_and_one_node_answers_after_it_rejoins() {
    let _serial = one_at_a_time();
    let (lab, owner) = mesh_lab(3, "3");
    // Its management link goes: no API server, no mesh. Its data link stays up.
    let port = format!("{}0", ["a", "b", "c"][owner]);
    let f = failover(&lab, &others(&lab, owner), || {
        lab.seg.ip(&["link", "set", &port, "down"]);
    });
    eprintln!(
        "split brain: the others took the IP after {:.2} s (gratuitous ARP)",
        f.garp.as_secs_f64()
    );
    let winner_mac = lab.node_mac(f.winner, "eth1");
    let silent = Instant::now();
    wait_for(
        "the cut-off node to stop answering",
        Duration::from_secs(15),
        || (arp_answerers(&lab, Duration::from_millis(300)) == [winner_mac]).then_some(()),
    );
    eprintln!(
        "split brain: the cut-off node stopped answering {:.2} s after the new owner's gratuitous ARP",
        silent.elapsed().as_secs_f64()
    );
    lab.seg.ip(&["link", "set", &port, "up"]);
    lab.wait_mesh_whole();
    let (polls, lost) = answers_lost(&lab, winner_mac, Duration::from_secs(4));
    assert_eq!(
        lost, 0,
        "after the rejoin: {lost} of {polls} ARP polls not answered by one node (the new owner)"
    );
}

#[test]
fn forged_mesh_datagrams_are_dropped_counted_and_change_nothing() {
    let _serial = one_at_a_time();
    let (lab, owner) = mesh_lab(2, "60");
    let forger = NetNs::new("forger");
    veth(&forger, "f0", &lab.seg, "fg");
    lab.seg.ip(&["link", "set", "fg", "master", "brm"]);
    let _keeper = napi_keeper(&lab.seg, "fg");
    forger.ip(&["addr", "add", "198.18.60.200/24", "dev", "f0"]);
    let secret = std::fs::read(&lab.mesh_secret).unwrap();
    let secret = secret.trim_ascii().to_vec();
    let sent = forger.run(move || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let mut unknown = Sealer::new(&secret, "node-z", now);
        // Resolve both neighbours first: a burst to an unresolved one would be cut short.
        for n in 1..=2 {
            sock.send_to(b"hello?", format!("198.18.60.{n}:7947"))
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
        let mut sent = 0;
        for (n, other) in [(1, "node-b"), (2, "node-a")] {
            let to: SocketAddr = format!("198.18.60.{n}:7947").parse().unwrap();
            let mut wrong_key = Sealer::new(b"not the secret", other, now);
            // The other node's datagram from an older run of its speaker: a replay.
            let mut replayed = Sealer::new(&secret, other, 1);
            for _ in 0..50 {
                for d in [
                    b"garbage that is no mesh datagram at all".to_vec(),
                    b"SLM1".to_vec(),
                    wrong_key.seal(Kind::Swim, b"node-a is down", now),
                    unknown.seal(Kind::Swim, b"hello", now),
                    replayed.seal(Kind::Restarting, &60_000u32.to_be_bytes(), now),
                ] {
                    sock.send_to(&d, to).unwrap();
                    sent += 1;
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
        sent
    });
    assert_eq!(sent, 500, "datagrams sent");
    for (i, name) in NAMES.iter().enumerate().take(2) {
        let dropped = wait_for("the drops on the status", Duration::from_secs(5), || {
            let d = lab.status(i)["mesh"]["dropped"].clone();
            [
                "bad_magic",
                "truncated",
                "bad_tag",
                "unknown_node",
                "replayed",
            ]
            .iter()
            .all(|r| d[r].as_u64().unwrap_or(0) >= 50)
            .then_some(d)
        });
        eprintln!("{name}: forged datagrams dropped: {dropped}");
    }
    let (polls, lost) = answers_lost(&lab, lab.node_mac(owner, "eth1"), Duration::from_secs(3));
    assert_eq!(lost, 0, "{lost} of {polls} ARP polls moved");
    assert!(
        (0..2).all(|i| lab.mesh_alive(i) == 1),
        "a member was declared down"
    );
    let lease = lab
        .api
        .get(&format!("{LEASES}/sluice-speaker-{}", NAMES[owner]))
        .unwrap();
    assert_eq!(
        lease["metadata"]["annotations"]["sluice.dev/announcing"],
        VIP.to_string()
    );
}

#[test]
fn a_rolling_restart_of_every_speaker_keeps_100_streaming_connections() {
    let _serial = one_at_a_time();
    let (mut lab, owner) = mesh_lab(2, "60");
    let pod = format!("pod-{}", ["a", "b"][owner]);
    let mut conns: Vec<Conn> = (0..100)
        .map(|i| {
            let mut c = Conn::open(&lab.client, SocketAddr::from((VIP, 80)))
                .unwrap_or_else(|e| panic!("connection {i}: {e}"));
            assert_eq!(c.ask().unwrap(), pod);
            c
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let asked = Arc::new(AtomicU64::new(0));
    let streaming = {
        let (stop, asked, pod) = (stop.clone(), asked.clone(), pod.clone());
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                for (i, c) in conns.iter_mut().enumerate() {
                    match c.ask() {
                        Ok(name) if name == pod => {}
                        other => failures.push(format!("connection {i}: {other:?}")),
                    }
                    asked.fetch_add(1, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            failures
        })
    };
    // The DaemonSet's rolling update: each speaker in turn gets SIGTERM, and its pod comes back
    // a second later; the owner last.
    for i in [1 - owner, owner] {
        lab.restart_mesh_speaker(i, Duration::from_secs(1), "60", &[]);
        std::thread::sleep(Duration::from_secs(2));
    }
    stop.store(true, Ordering::SeqCst);
    let failures = streaming.join().unwrap();
    let asked = asked.load(Ordering::SeqCst);
    eprintln!(
        "rolling restart: {asked} requests on 100 connections, {} failed",
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:?}");
    assert!(asked > 1000, "the connections streamed ({asked} requests)");
    assert_eq!(
        arp_answerers(&lab, Duration::from_millis(300)),
        [lab.node_mac(owner, "eth1")],
        "the IP stayed where it was"
    );
    // The speaker that came back adopted the data plane and, once the grace is over, still
    // counts its peer alive: nothing moves later either.
    let (polls, lost) = answers_lost(&lab, lab.node_mac(owner, "eth1"), Duration::from_secs(2));
    assert_eq!(lost, 0, "{lost} of {polls} ARP polls moved");
    let restarted = lab.api.list(EVENTS);
    assert!(
        !restarted.iter().any(|e| e["reason"] == "nodeFailedOver"),
        "a restart was taken for a failure"
    );
}

#[test]
fn a_speaker_stopped_for_handover_gives_its_ip_away_at_once_and_detaches() {
    let _serial = one_at_a_time();
    let (mut lab, owner) = mesh_lab(2, "60");
    // The owner is restarted with --on-stop handover (a restart keeps its IP where it is).
    lab.restart_mesh_speaker(owner, Duration::ZERO, "60", &["--on-stop", "handover"]);
    lab.wait_answered_by(owner, Duration::from_secs(5));
    assert!(lab.nodes[owner].has_xdp("eth1"));
    let victim = lab.speakers[owner].take().unwrap();
    let f = failover(&lab, &others(&lab, owner), move || {
        assert!(victim.stop(libc::SIGTERM).success());
    });
    eprintln!(
        "handover on SIGTERM: gratuitous ARP from the other node after {:.2} s",
        f.garp.as_secs_f64()
    );
    lab.wait_answered_by(f.winner, Duration::from_secs(5));
    assert!(
        !lab.nodes[owner].has_xdp("eth1"),
        "the programs were detached"
    );
}

#[test]
fn a_speaker_restarted_while_the_api_server_is_away_rejoins_the_mesh_and_keeps_its_ip() {
    let _serial = one_at_a_time();
    let grace = ["--restart-grace-seconds", "3"];
    let (mut lab, owner) = mesh_lab_with(2, "60", &grace, |_| {});
    let owner_mac = lab.node_mac(owner, "eth1");
    lab.api.set_outage(Outage::Refuse);
    // No API server: it finds its peers in what the previous run saved, and rejoins.
    lab.restart_mesh_speaker(owner, Duration::ZERO, "60", &grace);
    // Past the restart grace, it keeps its IP: the mesh holds it alive, and it answers.
    let (polls, lost) = answers_lost(&lab, owner_mac, Duration::from_secs(6));
    assert_eq!(
        lost, 0,
        "{lost} of {polls} ARP polls not answered by the owner alone"
    );
    lab.api.set_outage(Outage::None);
    let (polls, lost) = answers_lost(&lab, owner_mac, Duration::from_secs(3));
    assert_eq!(
        lost, 0,
        "after the outage: {lost} of {polls} ARP polls moved"
    );
}

#[test]
fn a_node_cut_off_during_an_api_outage_rejoins_without_taking_its_ip_back() {
    let _serial = one_at_a_time();
    let (lab, owner) = mesh_lab(3, "3");
    // The API server is away for everyone; then the owner is cut off from the others too.
    lab.api.set_outage(Outage::Refuse);
    std::thread::sleep(Duration::from_secs(2));
    let port = format!("{}0", ["a", "b", "c"][owner]);
    let f = failover(&lab, &others(&lab, owner), || {
        lab.seg.ip(&["link", "set", &port, "down"]);
    });
    lab.wait_answered_by(f.winner, Duration::from_secs(15));
    // It comes back while the API server is still away: nobody can read the Leases, and its own
    // still claims the IP. The IP stays with the node that took it, one answer at a time.
    lab.seg.ip(&["link", "set", &port, "up"]);
    lab.wait_mesh_whole();
    let winner_mac = lab.node_mac(f.winner, "eth1");
    let (polls, lost) = answers_lost(&lab, winner_mac, Duration::from_secs(5));
    assert_eq!(
        lost, 0,
        "during the outage: {lost} of {polls} ARP polls not the new owner alone"
    );
    lab.api.set_outage(Outage::None);
    let (polls, lost) = answers_lost(&lab, winner_mac, Duration::from_secs(5));
    assert_eq!(
        lost, 0,
        "after it: {lost} of {polls} ARP polls not the new owner alone"
    );
}
