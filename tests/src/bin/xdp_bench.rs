//! `cargo xtask bench`: nanoseconds per packet of the XDP ingress program, via BPF_PROG_TEST_RUN
//! with a large repeat count, side by side with the floor (a program that only returns XDP_PASS),
//! all measured in this run. Not a test: it prints figures, it asserts nothing about time.
//!
//! Paths that rewrite the frame (ARP reply, NA) are timed behind a wrapper that restores the
//! original frame each iteration; the wrapper's own cost, measured in front of the floor program,
//! is subtracted (see lb-userspace's dataplane::bench).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result};
use lb_userspace::dataplane::{
    bench::BenchHarness, Backend, Dataplane, DataplaneOptions, L2Vip, Protocol, Service,
};
use sluice_tests::{frames::*, netns::sh};

const REPEAT: u32 = 2_000_000;
/// Samples per path: enough that some fall in a fast phase of the machine.
const ROUNDS: usize = 9;
const CANARY_REPEAT: u32 = 500_000;
const NODE_MAC: Mac = [0x02, 0x5e, 0, 0, 0, 1];
const CLIENT_MAC: Mac = [0x02, 0xc1, 0, 0, 0, 2];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// One timed sample and the slower of the canaries around it.
#[derive(Clone, Copy)]
struct Sample {
    ns: f64,
    canary: f64,
}

/// The median of the samples taken in a fast phase (canary ≤ `fast`), and "kept/taken"; all
/// samples when none was.
fn fast_median(samples: &[Sample], fast: f64) -> (f64, String) {
    let kept: Vec<f64> = samples
        .iter()
        .filter(|s| s.canary <= fast)
        .map(|s| s.ns)
        .collect();
    let label = format!("{}/{}", kept.len(), samples.len());
    if kept.is_empty() {
        (median(samples.iter().map(|s| s.ns).collect()), label)
    } else {
        (median(kept), label)
    }
}

fn main() -> Result<()> {
    sluice_tests::require_root();
    // A private network namespace: its loopback (ifindex 1) is the ingress device of every run.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        anyhow::bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    }
    // veth0 faces the clients, veth1 the backends (with permanent neighbour entries), so the
    // balancer's FIB lookups resolve as on a real node.
    sh(&[
        "ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
    ]);
    // veth0 has the MAC the frames are sent to: attached, the program checks it as on a node.
    sh(&["ip", "link", "set", "veth0", "address", "02:5e:00:00:00:01"]);
    sluice_tests::balancer_namespace_setup();
    let veth0 = lb_userspace::dataplane::interface("veth0")?;
    anyhow::ensure!(veth0.mac == NODE_MAC, "veth0 has not taken NODE_MAC");
    let ifindex = veth0.ifindex;
    let vip4 = Ipv4Addr::new(198, 18, 1, 100);
    let vip6: Ipv6Addr = "fd53:1::100".parse()?;
    let client4 = Ipv4Addr::new(198, 18, 1, 2);
    let client6: Ipv6Addr = "fd53:1::2".parse()?;

    let mut dp = Dataplane::load(&DataplaneOptions {
        pin_dir: None,
        ..DataplaneOptions::default()
    })
    .context("load the data plane")?;
    // Attached, as on a node: the interface table holds veth0 (its MAC, its slot), so every
    // path below pays the check that a frame is this host's.
    dp.attach_all(std::slice::from_ref(&veth0))?;
    dp.set_l2_vips(&[
        L2Vip {
            ifindex,
            ip: IpAddr::V4(vip4),
            mac: NODE_MAC,
        },
        L2Vip {
            ifindex,
            ip: IpAddr::V6(vip6),
            mac: NODE_MAC,
        },
    ])?;
    dp.upsert_service(
        Service {
            vip: IpAddr::V4(vip4),
            port: 80,
            protocol: Protocol::Tcp,
        },
        &[Backend {
            ip: "198.18.2.10".parse()?,
            port: 8080,
            weight: 1,
            node: None,
        }],
    )?;
    dp.upsert_service(
        Service {
            vip: IpAddr::V6(vip6),
            port: 443,
            protocol: Protocol::Tcp,
        },
        &[Backend {
            ip: "fd53:2::10".parse()?,
            port: 8080,
            weight: 1,
            node: None,
        }],
    )?;
    // Cluster-wide balancing: this node is 198.18.1.1; the other node 198.18.2.11 (a
    // neighbour on veth1) holds the backend of port 81, and tunnels flows of port 80 here.
    let here = Ipv4Addr::new(198, 18, 1, 1);
    let node_b = Ipv4Addr::new(198, 18, 2, 11);
    dp.set_tunnels(&lb_userspace::dataplane::Tunnels {
        local_v4: Some(here),
        local_v6: None,
        mtu: 1500,
        peers: [IpAddr::V4(node_b)].into(),
    })?;
    dp.upsert_service(
        Service {
            vip: IpAddr::V4(vip4),
            port: 81,
            protocol: Protocol::Tcp,
        },
        &[Backend {
            ip: "10.244.2.2".parse()?,
            port: 8080,
            weight: 1,
            node: Some(IpAddr::V4(node_b)),
        }],
    )?;
    // Time the XDP redirect path (a real NIC's case); test runs never transmit into veth1.
    dp.allow_redirect(lb_userspace::dataplane::interface("veth1")?.ifindex)?;
    let mut h = BenchHarness::new(dp)?;

    let arp = pad_to_60(arp_request(CLIENT_MAC, client4, vip4));
    let ns = neighbor_solicitation(CLIENT_MAC, client6, vip6);
    let tcp4 = ipv4_tcp_syn(
        NODE_MAC,
        CLIENT_MAC,
        client4,
        Ipv4Addr::new(198, 18, 1, 7),
        40000,
        80,
    );
    let tcp6 = ipv6_tcp_syn(
        NODE_MAC,
        CLIENT_MAC,
        client6,
        "fd53:1::7".parse()?,
        40000,
        443,
    );
    let svc4 = ipv4_tcp_syn(NODE_MAC, CLIENT_MAC, client4, vip4, 40000, 80);
    let other_host = ipv4_tcp_syn([2, 0x0f, 0, 0, 0, 9], CLIENT_MAC, client4, vip4, 40000, 80);
    let svc6 = ipv6_tcp_syn(NODE_MAC, CLIENT_MAC, client6, vip6, 40000, 443);
    let remote4 = ipv4_tcp_syn(NODE_MAC, CLIENT_MAC, client4, vip4, 40000, 81);
    let from_b = ipv4_in_ipv4(
        NODE_MAC,
        [2, 0xbe, 0, 0, 0, 11],
        node_b,
        here,
        &ipv4_tcp_syn(NODE_MAC, CLIENT_MAC, client4, vip4, 40001, 80),
    );
    let reply4 = ipv4_tcp_syn(
        CLIENT_MAC,
        [2, 0xbe, 0, 0, 0, 10],
        "198.18.2.10".parse()?,
        client4,
        8080,
        40000,
    );
    const MISS_REPEAT: u32 = 60_000;
    let arp_other = pad_to_60(arp_request(
        CLIENT_MAC,
        client4,
        Ipv4Addr::new(198, 18, 1, 7),
    ));

    // Every sample is (ns/packet, the slower of the canaries timed just before and after it).
    let mut floor: Vec<Sample> = Vec::new();
    let mut rows: Vec<(&str, &str, Vec<Sample>)> = [
        ("pass-through: IPv4 TCP, not a service", "direct"),
        ("pass-through: IPv6 TCP, not a service", "direct"),
        ("pass-through: ARP for a non-VIP", "direct"),
        ("ARP request → ARP reply (XDP_TX)", "restored"),
        ("NS → NA (XDP_TX)", "restored"),
        ("IPv4 conntrack hit → DNAT, redirect", "restored"),
        ("IPv6 conntrack hit → DNAT, redirect", "restored"),
        (
            "IPv4 conntrack miss → Maglev, DNAT",
            "restored, new flow each run",
        ),
        (
            "IPv4 hit → IPIP to another node",
            "restored, head moved back",
        ),
        (
            "IPIP from a node → decap, hit, DNAT",
            "restored, head moved back",
        ),
        (
            "IPv4 hit, a trace on (other client)",
            "restored, trace filter on",
        ),
        (
            "IPv4 hit, a trace on (this client)",
            "restored, event each run",
        ),
        ("pass-through: a frame to another MAC", "direct"),
    ]
    .into_iter()
    .map(|(name, method)| (name, method, Vec::new()))
    .collect();
    let mut tc_floor: Vec<Sample> = Vec::new();
    let mut reverse: Vec<Sample> = Vec::new();
    let mut restore_overhead = Vec::new();
    let mut head_moves = Vec::new();
    let mut canaries = Vec::new();
    // Times `f` between two canaries.
    let mut sample = |h: &mut BenchHarness,
                      f: &mut dyn FnMut(&mut BenchHarness) -> Result<f64>|
     -> Result<Sample> {
        let before = h.canary(ifindex, &tcp4, CANARY_REPEAT)?;
        let ns = f(h)?;
        let after = h.canary(ifindex, &tcp4, CANARY_REPEAT)?;
        canaries.push(before.max(after));
        Ok(Sample {
            ns,
            canary: before.max(after),
        })
    };
    // XDP_BENCH_ROUNDS=3 for a quicker look while working on the programs.
    let rounds: usize = std::env::var("XDP_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(ROUNDS);
    for _ in 0..rounds {
        floor.push(sample(&mut h, &mut |h| {
            Ok(h.floor(ifindex, &tcp4, REPEAT)?.ns_per_packet)
        })?);
        rows[0].2.push(sample(&mut h, &mut |h| {
            Ok(h.ingress_direct(ifindex, &tcp4, REPEAT)?.ns_per_packet)
        })?);
        rows[1].2.push(sample(&mut h, &mut |h| {
            Ok(h.ingress_direct(ifindex, &tcp6, REPEAT)?.ns_per_packet)
        })?);
        rows[2].2.push(sample(&mut h, &mut |h| {
            Ok(h.ingress_direct(ifindex, &arp_other, REPEAT)?.ns_per_packet)
        })?);
        rows[3].2.push(sample(&mut h, &mut |h| {
            let (t, overhead) = h.ingress_restored(ifindex, &arp, REPEAT)?;
            restore_overhead.push(overhead);
            Ok(t.ns_per_packet)
        })?);
        rows[4].2.push(sample(&mut h, &mut |h| {
            Ok(h.ingress_restored(ifindex, &ns, REPEAT)?.0.ns_per_packet)
        })?);
        // The first (checking) run creates the flow; every timed run then hits it.
        rows[5].2.push(sample(&mut h, &mut |h| {
            Ok(h.ingress_restored(ifindex, &svc4, REPEAT)?.0.ns_per_packet)
        })?);
        rows[6].2.push(sample(&mut h, &mut |h| {
            Ok(h.ingress_restored(ifindex, &svc6, REPEAT)?.0.ns_per_packet)
        })?);
        // The TCP source port (bytes 34..36) changes every run: each is a new flow.
        rows[7].2.push(sample(&mut h, &mut |h| {
            Ok(h.ingress_restored_varying(ifindex, &svc4, MISS_REPEAT, 34)?
                .0
                .ns_per_packet)
        })?);
        // Cluster-wide balancing: a hit whose backend is on another node (encapsulated), and
        // a flow another node tunnelled here (decapsulated, then DNAT).
        rows[8].2.push(sample(&mut h, &mut |h| {
            let (t, one_move) = h.ingress_restored_moving(ifindex, &remote4, REPEAT, true)?;
            head_moves.push(one_move);
            Ok(t.ns_per_packet)
        })?);
        rows[9].2.push(sample(&mut h, &mut |h| {
            Ok(h.ingress_restored_moving(ifindex, &from_b, REPEAT, false)?
                .0
                .ns_per_packet)
        })?);
        // A trace running: once for another client (the filter's cost), once for this one (an
        // event per packet; once the ring buffer is full, unread, each is counted as lost).
        for (row, client) in [(10, Ipv4Addr::new(198, 18, 9, 9)), (11, client4)] {
            let mut filter = lb_userspace::trace::filter(&lb_userspace::trace::Request {
                client: Some((IpAddr::V4(client), 32)),
                ..Default::default()
            });
            filter.active = 1;
            filter.until = lb_userspace::dataplane::monotonic_ns() + 3_600_000_000_000;
            h.dataplane().set_trace_filter(filter)?;
            rows[row].2.push(sample(&mut h, &mut |h| {
                Ok(h.ingress_restored(ifindex, &svc4, REPEAT)?.0.ns_per_packet)
            })?);
            h.dataplane()
                .set_trace_filter(lb_userspace::trace::filter(&Default::default()))?;
        }
        // A promiscuous port: a service's packet for another host's MAC, passed and counted.
        rows[12].2.push(sample(&mut h, &mut |h| {
            Ok(h.ingress_direct(ifindex, &other_host, REPEAT)?
                .ns_per_packet)
        })?);
        let mut tc_floor_now = 0.0;
        reverse.push(sample(&mut h, &mut |h| {
            let (ns_rev, out, floor_tc) = h.egress_restored(&reply4, REPEAT)?;
            anyhow::ensure!(
                out[26..30] == vip4.octets(),
                "reverse NAT did not rewrite the reply"
            );
            tc_floor_now = floor_tc;
            Ok(ns_rev)
        })?);
        let canary = reverse.last().map_or(0.0, |s| s.canary);
        tc_floor.push(Sample {
            ns: tc_floor_now,
            canary,
        });
    }
    // A fast phase: canaries within 15 % of the fastest one seen in this run.
    let fastest = canaries.iter().cloned().fold(f64::INFINITY, f64::min);
    let fast = fastest * 1.15;
    let (floor, floor_kept) = fast_median(&floor, fast);
    println!(
        "XDP ingress, BPF_PROG_TEST_RUN, {REPEAT} runs per sample, {rounds} samples per path, one CPU"
    );
    println!(
        "{:<36} {:>10} {:>14} {:>6}  method",
        "path", "ns/packet", "ratio to floor", "kept"
    );
    println!(
        "{:<36} {floor:>10.1} {:>14.2} {floor_kept:>6}  direct",
        "floor: XDP_PASS and nothing else", 1.0
    );
    for (name, method, samples) in &rows {
        let (ns, kept) = fast_median(samples, fast);
        println!(
            "{name:<36} {ns:>10.1} {:>14.2} {kept:>6}  {method}",
            ns / floor
        );
    }
    let local = fast_median(&rows[5].2, fast).0;
    let tunnelled = fast_median(&rows[8].2, fast).0;
    let decap = fast_median(&rows[9].2, fast).0;
    println!(
        "cluster-wide balancing: a hit to another node's backend costs {:.2}× a local one ({:.1} vs {:.1} ns; the target is ≤ 1.3×); a flow tunnelled here costs {:.2}× a local one",
        tunnelled / local,
        tunnelled,
        local,
        decap / local
    );
    let (tc_floor, tc_kept) = fast_median(&tc_floor, fast);
    println!();
    println!("TC egress, BPF_PROG_TEST_RUN, same method");
    println!(
        "{:<36} {tc_floor:>10.1} {:>14.2} {tc_kept:>6}  direct",
        "floor: TC_ACT_OK and nothing else", 1.0
    );
    let (rev, rev_kept) = fast_median(&reverse, fast);
    println!(
        "{:<36} {rev:>10.1} {:>14.2} {rev_kept:>6}  restored",
        "reverse NAT of a reply (IPv4 TCP)",
        rev / tc_floor
    );
    println!();
    println!(
        "canary: the restore wrapper in front of the floor, {CANARY_REPEAT} runs, timed before and \
         after every sample: fastest {fastest:.1} ns, slowest {:.1} ns; kept: the samples whose \
         canaries stayed within 15 % of the fastest (a fast phase of the machine), as kept/taken. \
         A row with none kept shows the median of all its samples, marked 0/N.",
        canaries.iter().cloned().fold(0.0, f64::max)
    );
    println!(
        "restored: the frame is written back before each run and the wrapper's own cost ({:.1} ns \
         in front of the XDP floor) is subtracted; each wrapped run's action (and, for fixed \
         flows, its output) was checked against a direct run. Conntrack-miss runs: {MISS_REPEAT} \
         per sample, a new source port each.",
        median(restore_overhead)
    );
    println!(
        "head moved back: the wrapper also undoes the tunnel's head move each run; one move \
         ({:.1} ns, half of the wrapper in front of a floor that moves the head, less the \
         wrapper in front of the floor) is subtracted as well.",
        median(head_moves)
    );
    Ok(())
}
