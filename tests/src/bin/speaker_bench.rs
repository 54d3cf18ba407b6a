//! `sluice speaker` at scale (part of `cargo xtask bench`, root): one real speaker node in a
//! network namespace (see `sluice_tests::speaker_lab`) against the fake API server holding
//! 100 Nodes and N Services with externalTrafficPolicy Local (half in an L2 pool, half in a
//! BGP pool), each with an EndpointSlice of 5 ready endpoints on 5 nodes, one of them this one.
//!
//! Prints the time from the speaker's start to every service written into its maps, one
//! endpoint change to the maps updated (as the speaker logs it, and as seen from outside), and
//! the speaker's peak RSS. `speaker-bench [SERVICES]` runs one size.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sluice_tests::speaker_lab::{lab, Lab, NAMES, NS};

const NODES: usize = 100;
const NAMESPACES: usize = 50;

fn create(lab: &Lab, path: &str, object: Value) -> Result<()> {
    lab.api
        .create(path, object)
        .map_err(|e| anyhow::anyhow!("create in {path}: {e:?}"))?;
    Ok(())
}

fn node_name(k: usize) -> String {
    if k == 0 {
        NAMES[0].to_string()
    } else {
        format!("node-x{k}")
    }
}

fn endpoints(i: usize, local_address: &str) -> Vec<Value> {
    (0..5)
        .map(|j| {
            let node = if j == 0 { 0 } else { 1 + (i * 4 + j) % (NODES - 1) };
            let address = if j == 0 {
                local_address.to_string()
            } else {
                format!("10.{}.{}.{}", 100 + i / 250 % 100, i % 250, j + 1)
            };
            json!({"addresses": [address], "nodeName": node_name(node), "conditions": {"ready": true}})
        })
        .collect()
}

fn setup(lab: &Lab, services: usize) -> Result<()> {
    for ns in (0..NAMESPACES)
        .map(|i| format!("team-{i}"))
        .chain([NS.to_string()])
    {
        create(lab, "/api/v1/namespaces", json!({"metadata": {"name": ns}}))?;
    }
    for k in 0..NODES {
        let name = node_name(k);
        create(
            lab,
            "/api/v1/nodes",
            json!({"apiVersion": "v1", "kind": "Node",
                   "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
                   "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
        )?;
    }
    let crds = format!("/apis/sluice.dev/v1alpha1/namespaces/{NS}");
    for (pool, cidr) in [("l2", "10.90.0.0/16"), ("bgp", "10.91.0.0/16")] {
        create(
            lab,
            &format!("{crds}/ipaddresspools"),
            json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "IPAddressPool",
                   "metadata": {"name": pool}, "spec": {"addresses": [cidr]}}),
        )?;
    }
    create(
        lab,
        &format!("{crds}/l2advertisements"),
        json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "L2Advertisement",
               "metadata": {"name": "data"}, "spec": {"ipAddressPools": ["l2"], "interfaces": ["eth1"]}}),
    )?;
    create(
        lab,
        &format!("{crds}/bgppeers"),
        json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "BGPPeer",
               "metadata": {"name": "router"},
               "spec": {"myASN": 64513, "peerASN": 64512, "peerAddress": "198.18.50.254"}}),
    )?;
    create(
        lab,
        &format!("{crds}/bgpadvertisements"),
        json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "BGPAdvertisement",
               "metadata": {"name": "routes"}, "spec": {"ipAddressPools": ["bgp"]}}),
    )?;
    for i in 0..services {
        let ns = format!("team-{}", i % NAMESPACES);
        let half = i / 2;
        let ip = if i % 2 == 0 {
            format!("10.90.{}.{}", half / 250, half % 250 + 1)
        } else {
            format!("10.91.{}.{}", half / 250, half % 250 + 1)
        };
        create(
            lab,
            &format!("/api/v1/namespaces/{ns}/services"),
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": format!("svc-{i}")},
                   "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                            "ports": [{"name": "tcp", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
                   "status": {"loadBalancer": {"ingress": [{"ip": ip}]}}}),
        )?;
        create(
            lab,
            &format!("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"),
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": format!("svc-{i}-abc"), "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
                   "addressType": "IPv4", "endpoints": endpoints(i, "10.244.1.2"),
                   "ports": [{"name": "tcp", "port": 8080, "protocol": "TCP"}]}),
        )?;
    }
    Ok(())
}

/// The `planApplied` lines of a speaker log, as (services, planned ms, applied ms, L2 IPs).
fn applied(log: &Path) -> Vec<(u64, f64, f64, u64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("planApplied"))
        .map(|l| {
            let field = |name: &str| -> f64 {
                l.split(&format!(" {name}="))
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN)
            };
            (
                field("services") as u64,
                field("planned_ms"),
                field("applied_ms"),
                field("l2") as u64,
            )
        })
        .collect()
}

fn wait(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        if f() {
            return Ok(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    bail!("timed out waiting for {what}")
}

/// `VmHWM` (peak) or `VmRSS` (now) of a process, in MB.
fn rss_mb(pid: u32, which: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(which))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn run(services: usize) -> Result<()> {
    let mut lab = lab(1);
    setup(&lab, services)?;
    let started = Instant::now();
    lab.start_speaker(0);
    let log = lab.log_of(0).context("the speaker's log")?;
    wait(
        "every service in the maps",
        Duration::from_secs(300),
        || applied(&log).iter().any(|(n, ..)| *n as usize == services),
    )?;
    let initial = started.elapsed().as_secs_f64();
    let first = applied(&log)
        .into_iter()
        .find(|(n, ..)| *n as usize == services)
        .unwrap_or_default();
    // Then this node is elected for every L2 IP (its Lease says it is alive) and answers for
    // them; the endpoint change is measured once that has settled (no pass for 2 s).
    wait("the L2 IPs answered", Duration::from_secs(300), || {
        applied(&log)
            .iter()
            .any(|(_, _, _, l2)| *l2 as usize == services / 2)
    })?;
    let takeover = applied(&log)
        .into_iter()
        .find(|(_, _, _, l2)| *l2 as usize == services / 2)
        .unwrap_or_default();
    let mut before = applied(&log).len();
    loop {
        std::thread::sleep(Duration::from_secs(2));
        let now = applied(&log).len();
        if now == before {
            break;
        }
        before = now;
    }

    // One endpoint of one Service changes (its local pod is replaced).
    let i = services / 2;
    let ns = format!("team-{}", i % NAMESPACES);
    let changed = Instant::now();
    lab.api
        .patch(
            &format!("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices/svc-{i}-abc"),
            json!({"endpoints": endpoints(i, "10.244.1.3")}),
        )
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    wait("the change in the maps", Duration::from_secs(30), || {
        applied(&log).len() > before
    })?;
    let seen = changed.elapsed().as_secs_f64() * 1e3;
    let change = applied(&log)[before];
    let pid = lab.speakers[0].as_ref().map(|p| p.pid()).unwrap_or(0);
    let (rss, now) = (rss_mb(pid, "VmHWM:"), rss_mb(pid, "VmRSS:"));
    println!(
        "{services:>9} {:>9.2} s {:>10.0} ms {:>10.0} ms {:>13.0} ms {:>12.0} ms {:>9.0} ms {:>10.0} ms {:>7.0} MB {:>7.0} MB",
        initial, first.1, first.2, takeover.2, seen, change.1, change.2, rss, now
    );
    Ok(())
}

fn main() -> Result<()> {
    let sizes: Vec<usize> = match std::env::args().nth(1) {
        Some(n) => vec![n.parse().context("SERVICES must be a number")?],
        None => vec![1_000, 10_000],
    };
    println!(
        "sluice speaker, one node of {NODES}: Services with policy Local (half L2, half BGP), 5 endpoints each (one on this node)"
    );
    println!(
        "{:>9} {:>11} {:>13} {:>13} {:>16} {:>15} {:>12} {:>13} {:>10} {:>10}",
        "services",
        "to maps",
        "(its plan)",
        "(its writes)",
        "L2 takeover",
        "endpoint→maps",
        "(its plan)",
        "(its writes)",
        "peak RSS",
        "RSS after"
    );
    for n in sizes {
        run(n)?;
    }
    println!("(to maps: start → every service in the maps; L2 takeover: the pass that starts answering for every L2 IP, gratuitous ARPs included; endpoint→maps: an EndpointSlice patched → the maps updated, seen in the speaker's log)");
    Ok(())
}
