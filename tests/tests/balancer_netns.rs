//! End to end, with real kernels and real TCP/UDP: a client namespace, a node namespace running
//! Sluice's programs, and four backend namespaces each running servers that answer with their
//! own name. The client reaches the VIP through the node's ARP/NDP answers, the XDP balancer
//! forwards to a backend, and the TC program turns the backend's replies back into the VIP's.
//!
//!   client [c0 198.18.1.2] ── [n0 198.18.1.1] node [n1..n4 198.18.1x.1] ── [bx 198.18.1x.2] b1..b4
//!
//! VIP 198.18.1.100 (and fd53:1::100): TCP 80 and UDP 53 → backends' port 8080.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Duration,
};

use lb_userspace::dataplane::{
    self, Backend, Capacities, Dataplane, DataplaneOptions, L2Vip, Protocol, Service,
};
use sluice_tests::{
    assert_refused,
    lab::{backend_ip, Conn, Lab},
    netns::NetNs,
    sluice_bin,
};

const TIMEOUT: Duration = Duration::from_secs(3);

fn small() -> DataplaneOptions {
    DataplaneOptions {
        pin_dir: None,
        capacities: Capacities {
            services: 16,
            backends: 64,
            flows: 16_384,
        },
        ..DataplaneOptions::default()
    }
}

/// The lab (four backends, serving) with Sluice's data plane running in-process in the node
/// namespace. Drop order: the node's programs, then the lab.
struct Node {
    node_dp: Dataplane,
    lab: Lab,
}

fn backend(i: usize, v6: bool, port: u16) -> Backend {
    Backend {
        ip: backend_ip(i, v6).parse().unwrap(),
        port,
        weight: 1,
        node: None,
    }
}

fn service(v6: bool, port: u16, protocol: Protocol) -> Service {
    let vip: IpAddr = if v6 {
        "fd53:1::100".parse().unwrap()
    } else {
        "198.18.1.100".parse().unwrap()
    };
    Service {
        vip,
        port,
        protocol,
    }
}

fn topology() -> Lab {
    let lab = Lab::new(4);
    for i in 1..=4 {
        lab.serve(i);
    }
    lab
}

fn node() -> Node {
    node_with(small())
}

fn node_with(options: DataplaneOptions) -> Node {
    let lab = topology();
    let node_dp = lab.node.run(move || {
        let n0 = dataplane::interface("n0").unwrap();
        let mut dp = Dataplane::load(&options).unwrap();
        dp.attach_all(std::slice::from_ref(&n0)).unwrap();
        // The backends' veth ends run XDP (the lab's keepers), so redirecting into n1..n4 is safe.
        for n in ["n1", "n2", "n3", "n4"] {
            dp.allow_redirect(dataplane::interface(n).unwrap().ifindex)
                .unwrap();
        }
        dp.set_l2_vips(&[
            L2Vip {
                ifindex: n0.ifindex,
                ip: "198.18.1.100".parse().unwrap(),
                mac: n0.mac,
            },
            L2Vip {
                ifindex: n0.ifindex,
                ip: "fd53:1::100".parse().unwrap(),
                mac: n0.mac,
            },
        ])
        .unwrap();
        for v6 in [false, true] {
            let first3: Vec<Backend> = (1..=3).map(|i| backend(i, v6, 8080)).collect();
            dp.upsert_service(service(v6, 80, Protocol::Tcp), &first3)
                .unwrap();
            dp.upsert_service(service(v6, 53, Protocol::Udp), &first3)
                .unwrap();
        }
        dp
    });
    Node { node_dp, lab }
}

fn vip_addr(v6: bool, port: u16) -> SocketAddr {
    SocketAddr::new(service(v6, port, Protocol::Tcp).vip, port)
}

/// `n` short connections; returns answers per backend name.
fn spread(client: &NetNs, v6: bool, n: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let mut conn = Conn::open(client, vip_addr(v6, 80))
            .unwrap_or_else(|e| panic!("connection {i} to the VIP failed: {e}"));
        let name = conn
            .ask()
            .unwrap_or_else(|e| panic!("connection {i}: no answer: {e}"));
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

fn udp_ask(lab: &Node, v6: bool) -> String {
    let to = SocketAddr::new(service(v6, 53, Protocol::Udp).vip, 53);
    lab.lab.client.run(move || {
        let bind: SocketAddr = if v6 {
            "[::]:0".parse().unwrap()
        } else {
            "0.0.0.0:0".parse().unwrap()
        };
        let sock = UdpSocket::bind(bind).unwrap();
        sock.set_read_timeout(Some(TIMEOUT)).unwrap();
        sock.send_to(b"who?", to).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = sock.recv_from(&mut buf).expect("a UDP answer from the VIP");
        assert_eq!(from, to, "the answer comes from the VIP and service port");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    })
}

fn balances_and_keeps_long_lived_connections(v6: bool) {
    let mut lab = node();
    // Many connections: all succeed, all three backends answer, in roughly equal shares.
    // 150 connections over 3 backends: 50 each expected, σ = 5.8; the bounds are ±5.5 σ
    // (a false alarm about once in ten million runs).
    let n = 150;
    let counts = spread(&lab.lab.client, v6, n);
    assert_eq!(counts.values().sum::<usize>(), n);
    assert_eq!(
        counts.keys().cloned().collect::<Vec<_>>(),
        ["b1", "b2", "b3"],
        "{counts:?}"
    );
    for (name, c) in &counts {
        assert!((18..=82).contains(c), "{name} got {c} of {n}: {counts:?}");
    }

    // A long-lived connection keeps its backend while another is removed and a new one added.
    let mut long = Conn::open(&lab.lab.client, vip_addr(v6, 80)).unwrap();
    let home = long.ask().unwrap();
    let home_index: usize = home[1..].parse().unwrap();
    let removed = (1..=3).find(|i| *i != home_index).unwrap();
    let next: Vec<Backend> = (1..=4)
        .filter(|i| *i != removed)
        .map(|i| backend(i, v6, 8080))
        .collect();
    lab.node_dp
        .set_backends(&service(v6, 80, Protocol::Tcp), &next)
        .unwrap();
    for _ in 0..3 {
        assert_eq!(
            long.ask().unwrap(),
            home,
            "the long-lived connection kept its backend"
        );
    }
    let counts = spread(&lab.lab.client, v6, 60);
    assert!(
        !counts.contains_key(&format!("b{removed}")),
        "removed backend still gets flows: {counts:?}"
    );
    assert!(
        counts.contains_key("b4"),
        "the new backend gets new flows: {counts:?}"
    );
    assert_eq!(long.ask().unwrap(), home);

    // UDP request/response through the same VIP.
    let name = udp_ask(&lab, v6);
    assert!(["b1", "b2", "b3"].contains(&name.as_str()), "{name}");

    // Counters saw it all.
    let stats = lab.node_dp.service_stats().unwrap();
    let tcp = stats
        .iter()
        .find(|s| s.service == service(v6, 80, Protocol::Tcp))
        .unwrap();
    assert!(tcp.traffic.new_flows >= 211, "{:?}", tcp.traffic);
    let global = lab.node_dp.stats().unwrap();
    eprintln!("node counters: {global:?}");
    assert!(global.reverse_nat > 0, "{global:?}");
    assert!(
        global.lb_forwarded > global.lb_to_kernel,
        "most packets forwarded in XDP, not through the kernel: {global:?}"
    );
    drop(long);
}

#[test]
fn ipv4_tcp_and_udp_are_balanced_across_backends_and_long_connections_survive_changes() {
    balances_and_keeps_long_lived_connections(false);
}

#[test]
fn ipv6_tcp_and_udp_are_balanced_across_backends_and_long_connections_survive_changes() {
    balances_and_keeps_long_lived_connections(true);
}

#[test]
fn sluice_balance_serves_from_the_command_line_and_inspect_shows_its_services() {
    let topo = topology();
    let bin = sluice_bin();
    let mut sluice = topo.node.spawn(&[
        &bin,
        "balance",
        "--attach",
        "n0",
        "--vip",
        "198.18.1.100@n0",
        "--vip",
        "fd53:1::100@n0",
        "--service",
        "198.18.1.100:80/tcp=198.18.11.2:8080,198.18.12.2:8080",
        "--service",
        "[fd53:1::100]:80/tcp=[fd53:13::2]:8080",
        "--maglev-table-size",
        "1009",
    ]);
    sluice.wait_for_stderr("ready");
    let counts = spread(&topo.client, false, 30);
    assert_eq!(
        counts.keys().cloned().collect::<Vec<_>>(),
        ["b1", "b2"],
        "{counts:?}"
    );
    let counts = spread(&topo.client, true, 5);
    assert_eq!(
        counts.keys().cloned().collect::<Vec<_>>(),
        ["b3"],
        "{counts:?}"
    );

    let doc = sluice.inspect_json(&bin);
    let services = doc["services"].as_array().unwrap();
    assert_eq!(services.len(), 2, "{doc}");
    assert_eq!(services[0]["service"], "198.18.1.100:80/tcp", "{doc}");
    assert_eq!(services[0]["newFlows"], 30, "{doc}");
    assert_eq!(
        services[0]["backends"].as_array().unwrap().len(),
        2,
        "{doc}"
    );
    assert_eq!(doc["trackedFlows"], 35, "{doc}");
    // Backends sit behind veths not named with --redirect-veth: the kernel forwarded (safely).
    assert!(
        doc["counters"]["forwardedViaKernel"].as_u64().unwrap() > 0,
        "{doc}"
    );
    assert_eq!(doc["counters"]["forwarded"], 0, "{doc}");

    let status = sluice.stop(libc::SIGTERM);
    assert!(status.success(), "{status}");
    // Stopped: the VIP no longer answers.
    let refused = Conn::open(&topo.client, vip_addr(false, 80));
    assert!(
        refused.is_err(),
        "a connection to the VIP succeeded after sluice stopped"
    );
}

#[test]
fn sluice_balance_refuses_bad_services_by_name() {
    let topo = topology();
    for (args, expected) in [
        (
            vec!["--attach", "n0", "--service", "198.18.1.100:80/tcp"],
            "missing '='",
        ),
        (
            vec![
                "--attach",
                "n0",
                "--service",
                "198.18.1.100:80/tcp=198.18.11.2:8080,198.18.11.2:8080",
            ],
            "listed twice",
        ),
        (
            vec![
                "--attach",
                "n0",
                "--service",
                "198.18.1.100:80/tcp=198.18.11.2:8080",
                "--maglev-table-size",
                "1000",
            ],
            "not prime",
        ),
        (
            vec!["--service", "198.18.1.100:80/tcp=198.18.11.2:8080"],
            "--attach",
        ),
        (
            vec![
                "--attach",
                "nosuch0",
                "--service",
                "198.18.1.100:80/tcp=198.18.11.2:8080",
            ],
            "no such interface",
        ),
    ] {
        assert_refused(&topo.node, "balance", &args, expected, "n0");
    }
}

/// Packets the node's balancer has forwarded for the IPv4 TCP service.
fn packets(node: &Node) -> u64 {
    let tcp80 = service(false, 80, Protocol::Tcp);
    node.node_dp
        .service_stats()
        .unwrap()
        .into_iter()
        .find(|s| s.service == tcp80)
        .map_or(0, |s| s.traffic.packets)
}

/// 100 connections over `backends`, each with the backend that answered it.
fn established(node: &mut Node, backends: &[usize]) -> Vec<(Conn, String)> {
    let set: Vec<Backend> = backends.iter().map(|i| backend(*i, false, 8080)).collect();
    node.node_dp
        .set_backends(&service(false, 80, Protocol::Tcp), &set)
        .unwrap();
    (0..100)
        .map(|i| {
            let mut conn = Conn::open(&node.lab.client, vip_addr(false, 80))
                .unwrap_or_else(|e| panic!("connection {i}: {e}"));
            let name = conn.ask().unwrap();
            (conn, name)
        })
        .collect()
}

/// Sends at least a million SYNs from random sources to the VIP (as many more as needed until
/// the node has balanced a million), changing the service's backends to `during` once the
/// flood is under way. Returns the SYNs the node balanced.
fn syn_flood_changing_backends(node: &mut Node, during: &[usize]) -> u64 {
    let before = packets(node);
    let template = sluice_tests::frames::ipv4_tcp_syn(
        node.lab.node.mac("n0"),
        node.lab.client.mac("c0"),
        "10.0.0.1".parse().unwrap(),
        "198.18.1.100".parse().unwrap(),
        1,
        80,
    );
    let mut changed = false;
    for _round in 0..6 {
        let frames = template.clone();
        let flooder = node
            .lab
            .client
            .run_in_background(move || sluice_tests::rawsock::flood("c0", &frames, 1_000_000));
        if !changed {
            while packets(node) - before < 100_000 && !flooder.is_finished() {
                std::thread::sleep(Duration::from_millis(20));
            }
            let set: Vec<Backend> = during.iter().map(|i| backend(*i, false, 8080)).collect();
            node.node_dp
                .set_backends(&service(false, 80, Protocol::Tcp), &set)
                .unwrap();
            changed = true;
        }
        flooder.join().unwrap().unwrap();
        if packets(node) - before >= 1_000_000 {
            break;
        }
    }
    packets(node) - before
}

/// Asks on every connection: how many got no answer, or another backend's.
fn broken(conns: &mut [(Conn, String)]) -> usize {
    conns
        .iter_mut()
        .map(|(conn, name)| conn.ask().ok().as_ref() != Some(name))
        .filter(|lost| *lost)
        .count()
}

#[test]
fn established_connections_survive_a_million_syn_flood_and_a_backend_change() {
    // Every packet of this test is processed on one CPU (a veth receives on the sender's CPU):
    // the guard's limit is per CPU, and so are the kernel's LRU lists, on which entries made on
    // another CPU would escape the flood's evictions and make the control meaningless.
    sluice_tests::pin_to_cpu(0);
    let mut node = node_with(DataplaneOptions {
        capacities: Capacities {
            services: 16,
            backends: 64,
            flows: 65_536,
        },
        ..small()
    });
    // A low limit, so that what the guard lets in (≤ 1,000 a second per CPU) cannot fill the
    // table during the flood, while the flood alone would fill it many times over.
    node.node_dp.set_flood_guard(1_000).unwrap();
    let mut conns = established(&mut node, &[1, 2]);
    let flooded = syn_flood_changing_backends(&mut node, &[1, 2, 3]);
    assert!(
        flooded >= 1_000_000,
        "only {flooded} new flows reached the node"
    );
    let flood = node.node_dp.flood_stats().unwrap();
    assert!(flood.untracked >= 900_000, "{flood:?}");
    assert!(flood.activations > 0, "{flood:?}");
    assert_eq!(
        broken(&mut conns),
        0,
        "every established connection keeps its backend"
    );
    eprintln!(
        "guard on: {flooded} SYNs, {} untracked, {} activations; 100 of 100 connections kept",
        flood.untracked, flood.activations
    );

    // The control: the guard off, the same flood evicts the established flows from the LRU
    // table (each flood source sends twice, so the kernel's LRU cannot tell it from a used
    // flow), and those re-hashed onto the new backend break.
    node.node_dp.set_flood_guard(0).unwrap();
    let mut conns = established(&mut node, &[1, 2, 3]);
    let flooded = syn_flood_changing_backends(&mut node, &[1, 2, 3, 4]);
    let lost = broken(&mut conns);
    eprintln!("guard off: {flooded} SYNs; {lost} of 100 connections broken");
    assert!(
        lost > 0,
        "without the guard the flood must break some connections"
    );
}
