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
const ROUNDS: usize = 5;
const NODE_MAC: Mac = [0x02, 0x5e, 0, 0, 0, 1];
const CLIENT_MAC: Mac = [0x02, 0xc1, 0, 0, 0, 2];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
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
    sluice_tests::balancer_namespace_setup();
    let ifindex = lb_userspace::dataplane::interface("veth0")?.ifindex;
    let vip4 = Ipv4Addr::new(198, 18, 1, 100);
    let vip6: Ipv6Addr = "fd53:1::100".parse()?;
    let client4 = Ipv4Addr::new(198, 18, 1, 2);
    let client6: Ipv6Addr = "fd53:1::2".parse()?;

    let mut dp = Dataplane::load(&DataplaneOptions {
        pin_dir: None,
        ..DataplaneOptions::default()
    })
    .context("load the data plane")?;
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
    let svc6 = ipv6_tcp_syn(NODE_MAC, CLIENT_MAC, client6, vip6, 40000, 443);
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

    let mut floor = Vec::new();
    let mut rows: Vec<(&str, &str, Vec<f64>)> = vec![
        (
            "pass-through: IPv4 TCP, not a service",
            "direct",
            Vec::new(),
        ),
        (
            "pass-through: IPv6 TCP, not a service",
            "direct",
            Vec::new(),
        ),
        ("pass-through: ARP for a non-VIP", "direct", Vec::new()),
        ("ARP request → ARP reply (XDP_TX)", "restored", Vec::new()),
        ("NS → NA (XDP_TX)", "restored", Vec::new()),
        (
            "IPv4 conntrack hit → DNAT, redirect",
            "restored",
            Vec::new(),
        ),
        (
            "IPv6 conntrack hit → DNAT, redirect",
            "restored",
            Vec::new(),
        ),
        (
            "IPv4 conntrack miss → Maglev, DNAT",
            "restored, new flow each run",
            Vec::new(),
        ),
    ];
    let mut tc_floor = Vec::new();
    let mut reverse = Vec::new();
    let mut restore_overhead = Vec::new();
    for _ in 0..ROUNDS {
        floor.push(h.floor(ifindex, &tcp4, REPEAT)?.ns_per_packet);
        rows[0]
            .2
            .push(h.ingress_direct(ifindex, &tcp4, REPEAT)?.ns_per_packet);
        rows[1]
            .2
            .push(h.ingress_direct(ifindex, &tcp6, REPEAT)?.ns_per_packet);
        rows[2]
            .2
            .push(h.ingress_direct(ifindex, &arp_other, REPEAT)?.ns_per_packet);
        let (t, overhead) = h.ingress_restored(ifindex, &arp, REPEAT)?;
        rows[3].2.push(t.ns_per_packet);
        restore_overhead.push(overhead);
        let (t, overhead) = h.ingress_restored(ifindex, &ns, REPEAT)?;
        rows[4].2.push(t.ns_per_packet);
        restore_overhead.push(overhead);
        // The first (checking) run creates the flow; every timed run then hits it.
        rows[5]
            .2
            .push(h.ingress_restored(ifindex, &svc4, REPEAT)?.0.ns_per_packet);
        rows[6]
            .2
            .push(h.ingress_restored(ifindex, &svc6, REPEAT)?.0.ns_per_packet);
        // The TCP source port (bytes 34..36) changes every run: each is a new flow.
        rows[7].2.push(
            h.ingress_restored_varying(ifindex, &svc4, MISS_REPEAT, 34)?
                .0
                .ns_per_packet,
        );
        let (ns_rev, out, floor_tc) = h.egress_restored(&reply4, REPEAT)?;
        anyhow::ensure!(
            out[26..30] == vip4.octets(),
            "reverse NAT did not rewrite the reply"
        );
        reverse.push(ns_rev);
        tc_floor.push(floor_tc);
    }
    let floor = median(floor);
    println!("XDP ingress, BPF_PROG_TEST_RUN, {REPEAT} runs x {ROUNDS} rounds (median), one CPU");
    println!(
        "{:<36} {:>10} {:>14}  method",
        "path", "ns/packet", "ratio to floor"
    );
    println!(
        "{:<36} {floor:>10.1} {:>14.2}  direct",
        "floor: XDP_PASS and nothing else", 1.0
    );
    for (name, method, values) in rows {
        let ns = median(values);
        println!("{name:<36} {ns:>10.1} {:>14.2}  {method}", ns / floor);
    }
    let tc_floor = median(tc_floor);
    println!();
    println!("TC egress, BPF_PROG_TEST_RUN, same method");
    println!(
        "{:<36} {tc_floor:>10.1} {:>14.2}  direct",
        "floor: TC_ACT_OK and nothing else", 1.0
    );
    let rev = median(reverse);
    println!(
        "{:<36} {rev:>10.1} {:>14.2}  restored",
        "reverse NAT of a reply (IPv4 TCP)",
        rev / tc_floor
    );
    println!();
    println!(
        "restored: the frame is written back before each run and the wrapper's own cost ({:.1} ns \
         in front of the XDP floor) is subtracted; each wrapped run's action (and, for fixed \
         flows, its output) was checked against a direct run. Conntrack-miss runs: {MISS_REPEAT} \
         per round, a new source port each.",
        median(restore_overhead)
    );
    Ok(())
}
