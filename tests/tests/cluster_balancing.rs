//! Cluster-wide balancing end to end (see `sluice_tests::speaker_lab`): Services of
//! `externalTrafficPolicy: Cluster` balanced in XDP by every speaker over every pod of the
//! cluster, flows for another node's pod tunnelled to it, replies straight to the client.
//!
//! The tests of this file run one at a time: they are timing-sensitive labs of three nodes.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use serde_json::{json, Value};
use sluice_tests::{
    lab::Conn,
    speaker_lab::{self, wait_for, Lab, CLIENT_IP, NAMES, VIP},
};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

const SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices";

/// The Service `web` of policy Cluster, its ports 80 (each pod's name) and 81 (its name and
/// the client's address as the pod sees it), a pod on each of `pods` nodes.
fn cluster_service(lab: &Lab, pods: &[usize]) {
    lab.objects("Cluster");
    lab.api
        .patch(
            "/api/v1/namespaces/default/services/web",
            json!({"spec": {"ports": [
                {"name": "tcp", "port": 80, "protocol": "TCP", "targetPort": 8080},
                {"name": "who", "port": 81, "protocol": "TCP", "targetPort": 8081},
            ]}}),
        )
        .unwrap();
    set_pods(lab, pods);
}

/// The EndpointSlice of `web`: a ready pod on each of `pods` nodes.
fn set_pods(lab: &Lab, pods: &[usize]) {
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|&i| {
            json!({"addresses": [format!("10.244.{}.2", i + 1)], "nodeName": NAMES[i],
                   "conditions": {"ready": true}})
        })
        .collect();
    lab.api
        .patch(
            &format!("{SLICES}/web-abc"),
            json!({"endpoints": endpoints, "ports": [
                {"name": "tcp", "port": 8080, "protocol": "TCP"},
                {"name": "who", "port": 8081, "protocol": "TCP"},
            ]}),
        )
        .unwrap();
}

/// Three speakers in the mesh; returns the lab with the VIP's owner, once every speaker
/// balances `web` over `pods` (its own by DNAT, the others' through a tunnel).
fn three_nodes(pods: &[usize], extra: &[&str]) -> (Lab, usize) {
    let mut lab = speaker_lab::lab(3);
    cluster_service(&lab, pods);
    for i in 0..3 {
        lab.start_mesh_speaker(i, "15", extra);
    }
    lab.wait_mesh_whole();
    let owner = wait_for(
        "one node to announce the VIP",
        Duration::from_secs(20),
        || lab.announcer(),
    );
    for i in 0..3 {
        wait_for(
            "every speaker to balance web over every pod",
            Duration::from_secs(20),
            || (backends_of(&lab.inspect(i)).len() == pods.len()).then_some(()),
        );
    }
    (lab, owner)
}

/// `web`'s port 80 backends in `sluice inspect --json`: backend → its node (`None`: local).
fn backends_of(doc: &Value) -> BTreeMap<String, Option<String>> {
    doc["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["service"] == format!("{VIP}:80/tcp"))
        .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
        .map(|b| {
            (
                b["backend"].as_str().unwrap_or_default().to_string(),
                b["node"].as_str().map(String::from),
            )
        })
        .collect()
}

fn counter(doc: &Value, name: &str) -> u64 {
    doc["counters"][name].as_u64().unwrap_or(0)
}

fn tunnelled_in_from(doc: &Value, node: usize) -> u64 {
    let address = format!("198.18.50.{}", node + 1);
    doc["tunnels"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["node"] == address.as_str())
        .map(|t| t["inPackets"].as_u64().unwrap_or(0))
        .sum()
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
    let (mut lab, owner) = three_nodes(&[0, 1, 2], &[]);
    // The owner's node goes away with its speaker: its pod with it (Kubernetes would drop it
    // from the EndpointSlice). The flows to the other pods must live on.
    let pods: Vec<usize> = (0..3).filter(|&i| i != owner).collect();
    set_pods(&lab, &pods);
    for i in 0..3 {
        wait_for("the owner's pod to leave", Duration::from_secs(20), || {
            (backends_of(&lab.inspect(i)).len() == 2).then_some(())
        });
    }
    let mut conns: Vec<(Conn, String)> = (0..40)
        .map(|i| {
            let mut c = Conn::open(&lab.client, SocketAddr::from((VIP, 80)))
                .unwrap_or_else(|e| panic!("connection {i}: {e}"));
            let pod = c.ask().unwrap_or_else(|e| panic!("connection {i}: {e}"));
            (c, pod)
        })
        .collect();
    let reached: std::collections::BTreeSet<&String> = conns.iter().map(|(_, p)| p).collect();
    assert_eq!(reached.len(), 2, "both other pods: {reached:?}");
    let victim = lab.speakers[owner].take();
    let f = speaker_lab::failover(&lab, &pods, move || drop(victim));
    eprintln!(
        "L2 failover with cluster-wide balancing (SIGKILL): gratuitous ARP from {} after {:.2} s, a new connection answered after {:.2} s",
        NAMES[f.winner],
        f.garp.as_secs_f64(),
        f.connected.as_secs_f64()
    );
    for (i, (conn, pod)) in conns.iter_mut().enumerate() {
        let answer = conn
            .ask()
            .unwrap_or_else(|e| panic!("connection {i} (to {pod}) after the failover: {e}"));
        assert_eq!(&answer, pod, "connection {i} keeps its pod");
    }
}

/// What happened to 200 long-lived connections from behind an ECMP router while a fourth node
/// joined the multipath set and left it again.
struct EcmpRun {
    /// Connections that failed or reached another pod once node-d had joined.
    broken_after_join: usize,
    /// ... and once it had left again.
    broken_after_leave: usize,
    /// Packets node-d balanced while it was in the set.
    carried_by_d: u64,
}

/// The multipath route to the VIP in the router's kernel: its next hops.
fn next_hops(router: &sluice_tests::netns::NetNs) -> usize {
    router
        .exec(&["ip", "-4", "route", "show", &format!("{VIP}/32")])
        .matches("via 198.18.50.")
        .count()
}

/// Pods on nodes a, b and c; BIRD spreads the far client's flows over the nodes announcing
/// the VIP by BGP. `cluster_balancing`: the speakers balance the Service themselves (false:
/// kube-proxy's way, emulated with iptables).
fn ecmp_run(cluster_balancing: bool) -> EcmpRun {
    let mut lab = speaker_lab::lab(4);
    lab.cluster_with("Cluster", &[VIP.to_string()]);
    lab.pool();
    let (_bird, router, far) = lab.start_bird_ecmp(if cluster_balancing { "on" } else { "off" });
    if !cluster_balancing {
        lab.emulate_kube_proxy(&[0, 1, 2]);
    }
    set_pods(&lab, &[0, 1, 2]);
    let flag = if cluster_balancing { "true" } else { "false" };
    let extra = ["--cluster-balancing", flag, "--on-stop", "handover"];
    for i in 0..3 {
        lab.start_mesh_speaker(i, "15", &extra);
    }
    wait_for(
        "three next hops for the VIP",
        Duration::from_secs(30),
        || (next_hops(&router) == 3).then_some(()),
    );
    if cluster_balancing {
        for i in 0..3 {
            wait_for(
                "every speaker to balance web",
                Duration::from_secs(20),
                || (backends_of(&lab.inspect(i)).len() == 3).then_some(()),
            );
        }
    }
    let mut conns: Vec<(Conn, String)> = (0..200)
        .map(|i| {
            let mut c = Conn::open(&far, SocketAddr::from((VIP, 80)))
                .unwrap_or_else(|e| panic!("connection {i}: {e}"));
            let pod = c.ask().unwrap_or_else(|e| panic!("connection {i}: {e}"));
            (c, pod)
        })
        .collect();
    let still_answered = |conns: &mut Vec<(Conn, String)>| -> usize {
        let mut broken = 0;
        for (c, pod) in conns.iter_mut() {
            if c.ask().ok().as_ref() != Some(pod) {
                broken += 1;
            }
        }
        broken
    };
    assert_eq!(still_answered(&mut conns), 0, "before any change");

    // Node d joins: its speaker announces the VIP too, and the router re-hashes.
    lab.start_mesh_speaker(3, "15", &extra);
    wait_for(
        "four next hops for the VIP",
        Duration::from_secs(30),
        || (next_hops(&router) == 4).then_some(()),
    );
    let broken_after_join = still_answered(&mut conns);
    let carried_by_d = if cluster_balancing {
        counter(&lab.inspect(3), "tunnelled")
    } else {
        0
    };
    // Node d leaves (its speaker hands over and withdraws its routes).
    let d = lab.speakers[3].take().expect("node d's speaker");
    assert!(d.stop(libc::SIGTERM).success());
    wait_for("three next hops again", Duration::from_secs(30), || {
        (next_hops(&router) == 3).then_some(())
    });
    let broken_after_leave = still_answered(&mut conns);
    EcmpRun {
        broken_after_join,
        broken_after_leave,
        carried_by_d,
    }
}

#[test]
fn long_lived_connections_survive_a_node_joining_and_leaving_the_routers_ecmp_set() {
    let _serial = one_at_a_time();
    let run = ecmp_run(true);
    eprintln!(
        "ECMP with cluster-wide balancing: 200 connections; node d carried {} packets while in the set; broken after it joined: {}, after it left: {}",
        run.carried_by_d, run.broken_after_join, run.broken_after_leave
    );
    assert!(run.carried_by_d > 0, "the router moved flows to node d");
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
