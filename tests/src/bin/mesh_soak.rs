//! `cargo xtask soak`: repeats the speaker mesh's failure paths and prints the figures (median
//! and worst of N runs each): time from the failure to the new owner's gratuitous ARP on the
//! client's segment, and to the first new TCP connection through the VIP answered by the new
//! owner's pod. Default settings (failure timeout 1 s); Leases of 60 s, so the Leases play no
//! part. Needs root; builds its own namespaces, as the tests do.
//!
//! Usage: mesh-soak [RUNS] (default 10)

use std::time::Duration;

use sluice_tests::speaker_lab::{failover, mesh_lab, others, Failover};

#[derive(Clone, Copy)]
enum Failure {
    Kill,
    LinkDown,
}

fn run(nodes: usize, failure: Failure) -> Failover {
    let (mut lab, owner) = mesh_lab(nodes, "60");
    let candidates = others(&lab, owner);
    match failure {
        Failure::Kill => {
            let victim = lab.speakers[owner].take();
            failover(&lab, &candidates, move || drop(victim))
        }
        Failure::LinkDown => {
            let port = format!("{}1", ["a", "b", "c"][owner]);
            let seg = &lab.seg;
            failover(&lab, &candidates, || {
                seg.ip(&["link", "set", &port, "down"]);
            })
        }
    }
}

/// Datagrams per second one node sends and receives on a quiet mesh of `nodes`, over 10 s.
fn rate(nodes: usize) -> (f64, f64) {
    let (lab, _) = mesh_lab(nodes, "60");
    let read = |i: usize| {
        let m = &lab.status(i)["mesh"];
        (
            m["sent"].as_u64().unwrap_or(0),
            m["received"].as_u64().unwrap_or(0),
        )
    };
    let before: Vec<(u64, u64)> = (0..nodes).map(read).collect();
    let window = Duration::from_secs(10);
    std::thread::sleep(window);
    let after: Vec<(u64, u64)> = (0..nodes).map(read).collect();
    let per = |f: fn(&(u64, u64)) -> u64| {
        let total: u64 = after.iter().zip(&before).map(|(a, b)| f(a) - f(b)).sum();
        total as f64 / nodes as f64 / window.as_secs_f64()
    };
    (per(|x| x.0), per(|x| x.1))
}

fn summary(mut d: Vec<Duration>) -> String {
    d.sort();
    let s = |x: Duration| format!("{:.2}", x.as_secs_f64());
    format!(
        "median {} s, worst {} s, best {} s",
        s(d[d.len() / 2]),
        s(d[d.len() - 1]),
        s(d[0])
    )
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    for nodes in [2, 3] {
        let (sent, received) = rate(nodes);
        println!(
            "mesh traffic, {nodes} nodes, quiet: {sent:.1} datagrams/s sent and {received:.1} received per node"
        );
    }
    println!("speaker mesh failover, {runs} runs each (failure timeout 1 s, Leases 60 s)");
    for (nodes, failure, what) in [
        (2, Failure::Kill, "SIGKILL of the owner's speaker"),
        (3, Failure::Kill, "SIGKILL of the owner's speaker"),
        (2, Failure::LinkDown, "the owner's data link down"),
        (3, Failure::LinkDown, "the owner's data link down"),
    ] {
        let results: Vec<Failover> = (0..runs).map(|_| run(nodes, failure)).collect();
        println!("{nodes} nodes, {what}:");
        println!(
            "  gratuitous ARP from the new owner: {}",
            summary(results.iter().map(|r| r.garp).collect())
        );
        println!(
            "  first TCP connection answered by the new owner's pod: {}",
            summary(results.iter().map(|r| r.connected).collect())
        );
    }
}
