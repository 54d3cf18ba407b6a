//! `cargo xtask soak cluster`: repeats cluster-wide balancing's failure paths and prints the
//! figures: 200 long-lived connections from behind BIRD's ECMP route while a fourth node joins
//! the multipath set and leaves it (with Sluice's cluster-wide balancing, and with kube-proxy's
//! way emulated), and the L2 owner's speaker SIGKILLed under 40 established connections.
//! Needs root; builds its own namespaces, as the tests do.
//!
//! Usage: cluster-soak [RUNS] (default 5)

use std::time::Duration;

use sluice_tests::{cluster_lab, speaker_lab::NAMES};

fn summary(mut v: Vec<f64>, unit: &str) -> String {
    v.sort_by(f64::total_cmp);
    let median = v[v.len() / 2];
    let worst = v[v.len() - 1];
    format!(
        "median {median:.2}{unit}, worst {worst:.2}{unit}, best {:.2}{unit}",
        v[0]
    )
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let (mut on_join, mut on_leave, mut carried) = (Vec::new(), Vec::new(), Vec::new());
    let (mut off_join, mut off_leave) = (Vec::new(), Vec::new());
    let (mut garp, mut connected, mut broken) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=runs {
        let on = cluster_lab::ecmp_run(true);
        let off = cluster_lab::ecmp_run(false);
        let (f, l2_broken) = cluster_lab::l2_failover_run();
        println!(
            "run {run}: ECMP, cluster-wide: {} / {} of 200 broken (join / leave), node d took {} of them; kube-proxy's way: {} / {}; L2 failover to {}: garp {:.2} s, new connection {:.2} s, {l2_broken} of 40 broken",
            on.broken_after_join,
            on.broken_after_leave,
            on.moved_to_d,
            off.broken_after_join,
            off.broken_after_leave,
            NAMES[f.winner],
            f.garp.as_secs_f64(),
            f.connected.as_secs_f64(),
        );
        on_join.push(on.broken_after_join as f64);
        on_leave.push(on.broken_after_leave as f64);
        carried.push(on.moved_to_d as f64);
        off_join.push(off.broken_after_join as f64);
        off_leave.push(off.broken_after_leave as f64);
        garp.push(f.garp.as_secs_f64());
        connected.push(f.connected.as_secs_f64());
        broken.push(l2_broken as f64);
        std::thread::sleep(Duration::from_millis(500));
    }
    println!();
    println!("{runs} runs:");
    println!(
        "ECMP join, cluster-wide balancing, connections broken of 200: {}",
        summary(on_join, "")
    );
    println!(
        "ECMP leave, cluster-wide balancing, connections broken of 200: {}",
        summary(on_leave, "")
    );
    println!(
        "  connections the joining node took: {}",
        summary(carried, "")
    );
    println!(
        "ECMP join, kube-proxy's way, connections broken of 200: {}",
        summary(off_join, "")
    );
    println!(
        "ECMP leave, kube-proxy's way, connections broken of 200: {}",
        summary(off_leave, "")
    );
    println!(
        "L2 owner SIGKILLed, gratuitous ARP from the new owner: {}",
        summary(garp, " s")
    );
    println!(
        "L2 owner SIGKILLed, first new connection answered: {}",
        summary(connected, " s")
    );
    println!(
        "L2 owner SIGKILLed, established connections broken of 40: {}",
        summary(broken, "")
    );
}
