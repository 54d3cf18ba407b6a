//! `cargo xtask bench`: nanoseconds per packet of the XDP ingress program, via BPF_PROG_TEST_RUN
//! with a large repeat count, side by side with the floor (a program that only returns XDP_PASS),
//! all measured in this run. Not a test: it prints figures, it asserts nothing about time.
//!
//! Paths that rewrite the frame (ARP reply, NA) are timed behind a wrapper that restores the
//! original frame each iteration; the wrapper's own cost, measured in front of the floor program,
//! is subtracted (see lb-userspace's dataplane::bench).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result};
use lb_userspace::dataplane::{bench::BenchHarness, Dataplane, DataplaneOptions, L2Vip};
use sluice_tests::frames::*;

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
    let ifindex = 1;
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
    let mut h = BenchHarness::new(dp)?;

    let arp = pad_to_60(arp_request(CLIENT_MAC, client4, vip4));
    let ns = neighbor_solicitation(CLIENT_MAC, client6, vip6);
    let tcp4 = ipv4_tcp_syn(NODE_MAC, CLIENT_MAC, client4, vip4, 40000, 80);
    let tcp6 = ipv6_tcp_syn(NODE_MAC, CLIENT_MAC, client6, vip6, 40000, 443);
    let arp_other = pad_to_60(arp_request(
        CLIENT_MAC,
        client4,
        Ipv4Addr::new(198, 18, 1, 7),
    ));

    let mut floor = Vec::new();
    let mut rows: Vec<(&str, &str, Vec<f64>)> = vec![
        ("pass-through: IPv4 TCP SYN", "direct", Vec::new()),
        ("pass-through: IPv6 TCP SYN", "direct", Vec::new()),
        ("pass-through: ARP for a non-VIP", "direct", Vec::new()),
        ("ARP request → ARP reply (XDP_TX)", "restored", Vec::new()),
        ("NS → NA (XDP_TX)", "restored", Vec::new()),
    ];
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
    println!(
        "(restored: the frame is written back before each run and the wrapper's own cost, \
         {:.1} ns, is subtracted; each wrapped run's action and output were checked against a direct run)",
        median(restore_overhead)
    );
    Ok(())
}
