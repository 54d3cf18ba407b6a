//! Labs for cluster-wide balancing (policy Cluster balanced by every speaker, tunnels to the
//! pods' nodes), shared by `tests/cluster_balancing.rs` and the `cluster-soak` program: three
//! (or four) speaker nodes of `speaker_lab`, the Service `web` with ports 80 (each pod's name)
//! and 81 (its name and the client's address as it sees it).

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use serde_json::{json, Value};

use crate::{
    lab::Conn,
    netns::NetNs,
    speaker_lab::{self, failover, wait_for, Failover, Lab, NAMES, VIP},
};

pub const SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices";

/// The Service `web` of policy Cluster, its ports 80 (each pod's name) and 81 (its name and
/// the client's address as the pod sees it), a pod on each of `pods` nodes.
pub fn cluster_service(lab: &Lab, pods: &[usize]) {
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
pub fn set_pods(lab: &Lab, pods: &[usize]) {
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
pub fn three_nodes(pods: &[usize], extra: &[&str]) -> (Lab, usize) {
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
pub fn backends_of(doc: &Value) -> BTreeMap<String, Option<String>> {
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

pub fn counter(doc: &Value, name: &str) -> u64 {
    doc["counters"][name].as_u64().unwrap_or(0)
}

pub fn tunnelled_in_from(doc: &Value, node: usize) -> u64 {
    let address = format!("198.18.50.{}", node + 1);
    doc["tunnels"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["node"] == address.as_str())
        .map(|t| t["inPackets"].as_u64().unwrap_or(0))
        .sum()
}

/// What happened to 200 long-lived connections from behind an ECMP router while a fourth node
/// joined the multipath set and left it again.
pub struct EcmpRun {
    /// Connections that failed or reached another pod once node-d had joined.
    pub broken_after_join: usize,
    /// ... and once it had left again.
    pub broken_after_leave: usize,
    /// Connections node-d took while it was in the set (cluster-wide balancing only).
    pub moved_to_d: u64,
}

/// The multipath route to the VIP in the router's kernel: its next hops.
fn next_hops(router: &NetNs) -> usize {
    router
        .exec(&["ip", "-4", "route", "show", &format!("{VIP}/32")])
        .matches("via 198.18.50.")
        .count()
}

/// Pods on nodes a, b and c; BIRD spreads the far client's flows over the nodes announcing
/// the VIP by BGP. `cluster_balancing`: the speakers balance the Service themselves (false:
/// kube-proxy's way, emulated with iptables).
pub fn ecmp_run(cluster_balancing: bool) -> EcmpRun {
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
    // The connections the router moved to node d: the flows node d tracks (it tunnels them to
    // their pods' nodes).
    let moved_to_d = if cluster_balancing {
        lab.inspect(3)["trackedFlows"].as_u64().unwrap_or(0)
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
        moved_to_d,
    }
}

/// Three nodes, L2 mode, pods on the two nodes that do not own the VIP; 40 connections open
/// (each through a tunnel or to the pod of the node it lands on), then the owner's speaker is
/// SIGKILLed. Returns the failover's figures and how many connections broke.
pub fn l2_failover_run() -> (Failover, usize) {
    let (mut lab, owner) = three_nodes(&[0, 1, 2], &[]);
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
    let f = failover(&lab, &pods, move || drop(victim));
    let mut broken = 0;
    for (conn, pod) in conns.iter_mut() {
        if conn.ask().ok().as_ref() != Some(pod) {
            broken += 1;
        }
    }
    (f, broken)
}
