//! `cargo xtask soak bfd`: repeats BGP's failure paths against BIRD and FRR with BFD at
//! 100 ms × 3 (see `sluice_tests::bfd_lab`) and prints the figures (median and worst of N runs):
//! time from a node's failure to the router's kernel route through it going away, for a link cut
//! behind the switch and for `kill -9` of `sluice run`; and for a planned restart (SIGUSR2, then
//! a new `sluice run`), whether the route stayed and how many datagrams of a 1000/s flow were
//! lost. One baseline run without BFD shows what the BGP hold time alone gives. Needs root.
//!
//! Usage: bfd-soak [RUNS] (default 10)

use std::time::Duration;

use sluice_tests::bfd_lab::{BfdLab, Flow, RouterKind};

const GIVE_UP: Duration = Duration::from_secs(30);

fn summary(mut d: Vec<Duration>) -> String {
    if d.is_empty() {
        return "no run".into();
    }
    d.sort();
    let s = |x: Duration| format!("{:.3}", x.as_secs_f64());
    format!(
        "median {} s, best {} s, worst {} s ({} runs)",
        s(d[d.len() / 2]),
        s(d[0]),
        s(d[d.len() - 1]),
        d.len()
    )
}

/// Time until the route is gone, or `None` when it outlived `GIVE_UP`.
fn until_gone(lab: &BfdLab) -> Option<Duration> {
    let start = std::time::Instant::now();
    while lab.route_present() {
        if start.elapsed() > GIVE_UP {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Some(start.elapsed())
}

fn link_cuts(kind: RouterKind, runs: usize) -> Vec<Duration> {
    let lab = BfdLab::new(kind, 100);
    let mut out = Vec::new();
    for _ in 0..runs {
        lab.set_link(false);
        let gone = until_gone(&lab);
        lab.set_link(true);
        out.extend(gone);
        lab.wait_bfd_up(GIVE_UP);
        lab.wait_route(true, Duration::from_secs(60));
    }
    out
}

/// (times to withdrawal, runs where the route outlived GIVE_UP)
fn kills(mut lab: BfdLab, runs: usize) -> (Vec<Duration>, usize) {
    let mut out = Vec::new();
    let mut kept = 0;
    for _ in 0..runs {
        lab.stop_node(libc::SIGKILL);
        match until_gone(&lab) {
            Some(d) => out.push(d),
            None => kept += 1,
        }
        lab.start_node();
        lab.wait_route(true, Duration::from_secs(60));
        lab.wait_bfd_up(GIVE_UP);
        if kept > 0 {
            // The route outlives the kill (graceful restart): once is enough to show it.
            break;
        }
    }
    (out, kept)
}

/// (datagrams lost per restart, runs where the route went away)
fn restarts(mut lab: BfdLab, runs: usize) -> (Vec<u64>, usize) {
    let mut lost = Vec::new();
    let mut dropped = 0;
    for _ in 0..runs {
        lab.wait_route(true, Duration::from_secs(60));
        let flow = Flow::start(&lab);
        std::thread::sleep(Duration::from_millis(200));
        lab.stop_node(libc::SIGUSR2);
        let mut gone = false;
        for _ in 0..25 {
            gone |= !lab.route_present();
            std::thread::sleep(Duration::from_millis(20));
        }
        lab.start_node();
        for _ in 0..25 {
            gone |= !lab.route_present();
            std::thread::sleep(Duration::from_millis(20));
        }
        let (sent, received, _) = flow.finish();
        lost.push(sent - received as u64);
        dropped += usize::from(gone);
        lab.wait_bfd_up(GIVE_UP);
    }
    (lost, dropped)
}

fn main() {
    sluice_tests::require_root();
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    println!("BFD 100 ms × 3 (detection 300 ms), {runs} runs each");
    for kind in [RouterKind::Bird, RouterKind::Frr] {
        println!("{kind:?}");
        println!(
            "  link cut behind the switch → route gone: {}",
            summary(link_cuts(kind, runs))
        );
        let (times, kept) = kills(BfdLab::new(kind, 100), runs);
        if kept > 0 {
            println!(
                "  kill -9 of sluice run → route kept by graceful restart (> {} s); the data plane keeps forwarding",
                GIVE_UP.as_secs()
            );
        } else {
            println!("  kill -9 of sluice run → route gone: {}", summary(times));
        }
        let (lost, gone) = restarts(BfdLab::new(kind, 100), runs);
        println!(
            "  planned restart (SIGUSR2, 0.5 s away) → route withdrawn in {gone} of {runs} runs; datagrams lost of ~1200 per run: {:?}",
            lost
        );
    }
    println!("Frr with `neighbor … graceful-restart-disable`");
    let (times, kept) = kills(BfdLab::new_frr_without_graceful_restart(100), runs);
    if kept > 0 {
        println!(
            "  kill -9 of sluice run → route kept (> {} s)",
            GIVE_UP.as_secs()
        );
    } else {
        println!("  kill -9 of sluice run → route gone: {}", summary(times));
    }
    let (lost, gone) = restarts(BfdLab::new_frr_without_graceful_restart(100), runs);
    println!(
        "  planned restart (SIGUSR2, 0.5 s away) → route withdrawn in {gone} of {runs} runs; datagrams lost of ~1200 per run: {:?}",
        lost
    );
    let baseline = BfdLab::new_with(RouterKind::Bird, 100, false);
    baseline.set_link(false);
    let gone = until_gone(&baseline);
    println!(
        "Baseline, BIRD without BFD (hold time 9 s): link cut → route gone after {}",
        gone.map(|d| format!("{:.3} s", d.as_secs_f64()))
            .unwrap_or_else(|| format!("more than {} s", GIVE_UP.as_secs()))
    );
}
