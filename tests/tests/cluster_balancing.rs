//! Cluster-wide balancing end to end (see `sluice_tests::speaker_lab`): Services of
//! `externalTrafficPolicy: Cluster` balanced in XDP by every speaker over every pod of the
//! cluster, flows for another node's pod tunnelled to it, replies straight to the client.
//!
//! The labs are `sluice_tests::cluster_lab`'s (`cargo xtask soak cluster` repeats them and
//! prints the figures). The tests of this file run one at a time: they are timing-sensitive
//! labs of three and four nodes.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Mutex, MutexGuard},
};

use serde_json::Value;
use sluice_tests::{
    cluster_lab::{
        backends_of, counter, ecmp_run, l2_failover_run, three_nodes, tunnelled_in_from,
    },
    lab::Conn,
    speaker_lab::{CLIENT_IP, NAMES, VIP},
};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn every_pod_of_a_cluster_service_answers_through_the_owner_sees_the_client_and_replies_straight_to_it(
) {
    let _serial = one_at_a_time();
    let (lab, owner) = three_nodes(&[0, 1, 2], &[]);
    // Every speaker builds the same table: the same backends, each node's own local.
    let views: Vec<BTreeMap<String, Option<String>>> =
        (0..3).map(|i| backends_of(&lab.inspect(i))).collect();
    for (i, view) in views.iter().enumerate() {
        assert_eq!(
            view.keys().collect::<Vec<_>>(),
            views[0].keys().collect::<Vec<_>>()
        );
        let local: Vec<&String> = view
            .iter()
            .filter(|(_, node)| node.is_none())
            .map(|(b, _)| b)
            .collect();
        assert_eq!(
            local,
            [&format!("10.244.{}.2:8080", i + 1)],
            "on {}",
            NAMES[i]
        );
    }

    // 30 connections through the owner reach all three pods.
    let mut pods = BTreeMap::new();
    for i in 0..30 {
        let name = Conn::open(&lab.client, SocketAddr::from((VIP, 80)))
            .and_then(|mut c| c.ask())
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        *pods.entry(name).or_insert(0) += 1;
    }
    assert_eq!(pods.len(), 3, "every pod answers: {pods:?}");

    // The replies left from the pods' own nodes: each other node rewrote replies (reverse
    // NAT) of the flows the owner tunnelled to it (at least one per connection), and counted
    // the owner's tunnelled packets in.
    let docs: Vec<Value> = (0..3).map(|i| lab.inspect(i)).collect();
    assert!(counter(&docs[owner], "tunnelled") > 0);
    for i in (0..3).filter(|&i| i != owner) {
        assert!(
            tunnelled_in_from(&docs[i], owner) > 0,
            "{}: {}",
            NAMES[i],
            docs[i]["tunnels"]
        );
        let pod = format!("pod-{}", ["a", "b", "c"][i]);
        let connections = pods.get(&pod).copied().unwrap_or(0) as u64;
        assert!(
            counter(&docs[i], "reverseNat") >= connections,
            "{}: {} replies rewritten for {connections} connections",
            NAMES[i],
            counter(&docs[i], "reverseNat")
        );
    }
    // `sluice inspect --flows` on the owner: each flow to another node's pod is tunnelled to
    // that node; on the pods' nodes, the same flows go to their own pod.
    let flows = docs[owner]["flows"].as_array().cloned().unwrap_or_default();
    let own_pod = format!("10.244.{}.2:8080", owner + 1);
    let tunnelled: Vec<&Value> = flows.iter().filter(|f| f["via"] == "tunnel").collect();
    assert!(!tunnelled.is_empty(), "{flows:?}");
    for f in &tunnelled {
        let backend = f["backend"].as_str().unwrap();
        let node = f["node"].as_str().unwrap();
        let n: usize = node.trim_start_matches("198.18.50.").parse().unwrap();
        assert_eq!(backend, format!("10.244.{n}.2:8080"), "{f}");
    }
    assert!(flows
        .iter()
        .filter(|f| f["via"] == "local")
        .all(|f| f["backend"] == own_pod.as_str()));
    for i in (0..3).filter(|&i| i != owner) {
        let here = docs[i]["flows"].as_array().cloned().unwrap_or_default();
        assert!(
            here.iter().any(|f| f["via"] == "local"
                && f["client"]
                    .as_str()
                    .unwrap()
                    .starts_with(&CLIENT_IP.to_string())),
            "{}: {here:?}",
            NAMES[i]
        );
    }
    let replies: Vec<u64> = docs.iter().map(|d| counter(d, "reverseNat")).collect();
    eprintln!(
        "replies rewritten per node (owner {}): {replies:?}; connections per pod: {pods:?}",
        NAMES[owner]
    );
    assert!(
        replies[owner] < replies.iter().sum::<u64>(),
        "not every reply went through the owner: {replies:?}"
    );

    // Every pod sees the client's own address.
    let mut seen = BTreeMap::new();
    for i in 0..30 {
        let line = Conn::open(&lab.client, SocketAddr::from((VIP, 81)))
            .and_then(|mut c| c.ask())
            .unwrap_or_else(|e| panic!("connection {i} to port 81: {e}"));
        let (pod, peer) = line.split_once(' ').expect("name and address");
        seen.insert(pod.to_string(), peer.to_string());
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    for (pod, peer) in &seen {
        assert_eq!(peer, &CLIENT_IP.to_string(), "{pod} sees the client");
    }
}

#[test]
fn established_connections_survive_the_l2_owners_failover() {
    let _serial = one_at_a_time();
    let (f, broken) = l2_failover_run();
    eprintln!(
        "L2 failover with cluster-wide balancing (SIGKILL): gratuitous ARP from {} after {:.2} s, a new connection answered after {:.2} s; {broken} of 40 established connections broken",
        NAMES[f.winner],
        f.garp.as_secs_f64(),
        f.connected.as_secs_f64()
    );
    assert_eq!(broken, 0, "every established connection keeps its pod");
}

#[test]
fn long_lived_connections_survive_a_node_joining_and_leaving_the_routers_ecmp_set() {
    let _serial = one_at_a_time();
    let run = ecmp_run(true);
    eprintln!(
        "ECMP with cluster-wide balancing: 200 connections; node d took {} of them while in the set; broken after it joined: {}, after it left: {}",
        run.moved_to_d, run.broken_after_join, run.broken_after_leave
    );
    assert!(run.moved_to_d > 0, "the router moved flows to node d");
    assert_eq!(run.broken_after_join, 0);
    assert_eq!(run.broken_after_leave, 0);
}

#[test]
fn without_cluster_wide_balancing_the_connections_the_router_moves_break() {
    let _serial = one_at_a_time();
    let run = ecmp_run(false);
    eprintln!(
        "ECMP with kube-proxy's way (cluster-wide balancing off): 200 connections; broken after node d joined: {}, after it left: {}",
        run.broken_after_join, run.broken_after_leave
    );
    assert!(run.broken_after_join > 0, "moved connections break");
}
