//! Two Sluice nodes (`sluice run`, each in its own namespace) peer with one real router: BIRD
//! and FRR across eBGP/iBGP × 2-/4-octet ASNs × with/without TCP-MD5, and GoBGP once. The
//! router must hold the service /32 and /128 from both nodes (two next hops: ECMP-ready) with
//! the communities sent.
//!
//! ```text
//! node1 [n1 198.18.179.2, fd53:179::2] ── [r1 .179.1, ::1] router [r2 .180.1, ::1] ── [n2 198.18.180.2, fd53:180::2] node2
//! ```

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use sluice_tests::{
    bird::{Neighbor, Router},
    netns::{veth, NetNs, Process},
    require_root, sluice_bin,
};

#[derive(Clone, Copy, Debug)]
enum Kind {
    Bird,
    Frr,
    GoBgp,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    kind: Kind,
    ibgp: bool,
    four_octet: bool,
    md5: bool,
    /// The router negotiates IPv4 unicast only: Sluice must send it nothing IPv6 (no UPDATE,
    /// no End-of-RIB), though it has IPv6 routes.
    ipv4_only: bool,
}

impl Case {
    fn asns(&self) -> (u32, u32) {
        match (self.ibgp, self.four_octet) {
            (false, false) => (64500, 64512),
            (true, false) => (64512, 64512),
            (false, true) => (4_200_000_000, 4_200_000_001),
            (true, true) => (4_200_000_001, 4_200_000_001),
        }
    }
}

struct Lab {
    _nodes: Vec<Process>,
    _router: RouterProcess,
    dir: PathBuf,
    _ns: Vec<NetNs>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

enum RouterProcess {
    Bird(Router),
    Other(#[allow(dead_code)] Process),
}

fn node_config(
    dir: &std::path::Path,
    i: usize,
    case: &Case,
    router_as: u32,
    node_as: u32,
) -> PathBuf {
    let net = 178 + i;
    let password = if case.md5 { "\n  password: s3cret" } else { "" };
    let text = format!(
        "dataplane:
  interfaces: [n{i}]
  maglevTableSize: 1009
  stateFile: {state}
  nodeIPv6: \"fd53:{net}::2\"
pools:
- {{name: bgp, addresses: [198.51.100.10/32, \"2001:db8::10/128\"]}}
services:
- {{name: web, ports: [{{port: 80}}], backends: [{{ip: 198.18.{net}.99}}]}}
- {{name: web6, ports: [{{port: 80}}], backends: [{{ip: \"fd53:{net}::99\"}}]}}
peers:
- peerAddress: 198.18.{net}.1
  peerASN: {router_as}
  myASN: {node_as}
  holdTime: 9s
  connectTime: 1s
  routerID: 198.18.{net}.2{password}
bgpAdvertisements:
- {{ipAddressPools: [bgp], communities: [\"64512:100\"], largeCommunities: [\"64512:1:2\"]}}
",
        state = dir.join(format!("node{i}/allocations.json")).display()
    );
    let path = dir.join(format!("node{i}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn start_router(kind: Kind, ns: &NetNs, dir: &std::path::Path, case: &Case) -> RouterProcess {
    let (router_as, node_as) = case.asns();
    match kind {
        Kind::Bird => {
            let n = |i: usize| Neighbor {
                local: if i == 1 {
                    "198.18.179.1"
                } else {
                    "198.18.180.1"
                },
                router_as,
                address: if i == 1 {
                    "198.18.179.2"
                } else {
                    "198.18.180.2"
                },
                peer_as: node_as,
                password: case.md5.then_some("s3cret"),
            };
            let tag = format!("interop-{}", std::process::id());
            RouterProcess::Bird(if case.ipv4_only {
                Router::start_ipv4_only(ns, &tag, &[n(1), n(2)])
            } else {
                Router::start(ns, &tag, &[n(1), n(2)])
            })
        }
        Kind::Frr => {
            let frr = dir.join("frr");
            std::fs::create_dir_all(&frr).unwrap();
            std::fs::write(frr.join("vtysh.conf"), "").unwrap();
            let mut conf = format!(
                "frr defaults traditional\nhostname router\nlog file {} informational\nrouter bgp {router_as}\n \
                 bgp router-id 198.18.179.1\n no bgp ebgp-requires-policy\n no bgp default ipv4-unicast\n bgp graceful-restart\n",
                frr.join("bgpd.log").display()
            );
            for peer in ["198.18.179.2", "198.18.180.2"] {
                conf.push_str(&format!(" neighbor {peer} remote-as {node_as}\n neighbor {peer} timers 3 9\n neighbor {peer} timers connect 1\n"));
                if case.md5 {
                    conf.push_str(&format!(" neighbor {peer} password s3cret\n"));
                }
            }
            let families: &[&str] = if case.ipv4_only {
                &["ipv4"]
            } else {
                &["ipv4", "ipv6"]
            };
            for family in families {
                conf.push_str(&format!(" address-family {family} unicast\n"));
                for peer in ["198.18.179.2", "198.18.180.2"] {
                    conf.push_str(&format!("  neighbor {peer} activate\n"));
                }
                conf.push_str(" exit-address-family\n");
            }
            std::fs::write(frr.join("bgpd.conf"), conf).unwrap();
            Command::new("chmod")
                .args(["755", frr.to_str().unwrap()])
                .status()
                .unwrap();
            let p = ns.spawn(&[
                "/usr/lib/frr/bgpd",
                "-f",
                frr.join("bgpd.conf").to_str().unwrap(),
                "-i",
                frr.join("bgpd.pid").to_str().unwrap(),
                "--vty_socket",
                frr.to_str().unwrap(),
                "-z",
                frr.join("zserv.api").to_str().unwrap(),
                "-Z",
                "-S",
                "-P",
                "0",
            ]);
            let deadline = Instant::now() + Duration::from_secs(10);
            while !ns
                .exec_output(&[
                    "vtysh",
                    "--vty_socket",
                    frr.to_str().unwrap(),
                    "-c",
                    "show bgp summary",
                ])
                .status
                .success()
            {
                assert!(Instant::now() < deadline, "FRR bgpd did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
            RouterProcess::Other(p)
        }
        Kind::GoBgp => {
            let mut conf = format!(
                "[global.config]\n  as = {router_as}\n  router-id = \"198.18.179.1\"\n  local-address-list = [\"198.18.179.1\", \"198.18.180.1\"]\n"
            );
            for peer in ["198.18.179.2", "198.18.180.2"] {
                conf.push_str(&format!(
                    "[[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"{peer}\"\n    peer-as = {node_as}\n{}  [neighbors.timers.config]\n    connect-retry = 1\n    hold-time = 9\n    keepalive-interval = 3\n  [[neighbors.afi-safis]]\n    [neighbors.afi-safis.config]\n      afi-safi-name = \"ipv4-unicast\"\n  [[neighbors.afi-safis]]\n    [neighbors.afi-safis.config]\n      afi-safi-name = \"ipv6-unicast\"\n",
                    if case.md5 { "    auth-password = \"s3cret\"\n" } else { "" }
                ));
            }
            let path = dir.join("gobgpd.toml");
            std::fs::write(&path, conf).unwrap();
            // Its log (stdout) into a file the test reads.
            let command = format!(
                "exec gobgpd -f {} --api-hosts 127.0.0.1:50051 --pprof-disable --log-plain --log-level info > {} 2>&1",
                path.display(),
                dir.join("gobgpd.log").display()
            );
            let p = ns.spawn(&["sh", "-c", &command]);
            RouterProcess::Other(p)
        }
    }
}

/// The router's view of a prefix, as text.
fn show(
    kind: Kind,
    router: &RouterProcess,
    ns: &NetNs,
    dir: &std::path::Path,
    prefix: &str,
) -> String {
    let v6 = prefix.contains(':');
    match (kind, router) {
        (Kind::Bird, RouterProcess::Bird(r)) => r.birdc(&format!("show route {prefix} all")),
        (Kind::Frr, _) => {
            let family = if v6 { "ipv6" } else { "ipv4" };
            let out = ns.exec_output(&[
                "vtysh",
                "--vty_socket",
                dir.join("frr").to_str().unwrap(),
                "-c",
                &format!("show bgp {family} unicast {prefix}"),
            ]);
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
        _ => {
            let mut args = vec!["gobgp", "-p", "50051", "global", "rib"];
            if v6 {
                args.extend(["-a", "ipv6"]);
            }
            args.push(prefix);
            let out = ns.exec_output(&args);
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    }
}

/// Whether the router's output shows a path through `hop` (each router prints paths its way;
/// FRR also lists the peers it advertised to, which must not count).
fn has_path(kind: Kind, text: &str, hop: &str) -> bool {
    match kind {
        Kind::Bird => text.contains(&format!("via {hop}")),
        Kind::Frr => text.contains(&format!("{hop} from ")),
        Kind::GoBgp => text.lines().any(|l| l.split_whitespace().any(|w| w == hop)),
    }
}

fn run_case(case: Case) {
    require_root();
    let dir = std::env::temp_dir().join(
        format!("sluice-interop-{}-{:?}", std::process::id(), case)
            .replace([' ', '{', '}', ':', ','], ""),
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let rtr = NetNs::new("rtr");
    let mut namespaces = Vec::new();
    for i in 1..=2 {
        let node = NetNs::new(&format!("node{i}"));
        let net = 178 + i;
        veth(&rtr, &format!("r{i}"), &node, &format!("n{i}"));
        rtr.ip(&[
            "addr",
            "add",
            &format!("198.18.{net}.1/24"),
            "dev",
            &format!("r{i}"),
        ]);
        rtr.ip(&[
            "addr",
            "add",
            &format!("fd53:{net}::1/64"),
            "dev",
            &format!("r{i}"),
            "nodad",
        ]);
        node.ip(&[
            "addr",
            "add",
            &format!("198.18.{net}.2/24"),
            "dev",
            &format!("n{i}"),
        ]);
        node.ip(&[
            "addr",
            "add",
            &format!("fd53:{net}::2/64"),
            "dev",
            &format!("n{i}"),
            "nodad",
        ]);
        namespaces.push(node);
    }
    let router = start_router(case.kind, &rtr, &dir, &case);
    let (router_as, node_as) = case.asns();
    let bin = sluice_bin();
    let mut nodes = Vec::new();
    let started = Instant::now();
    for (i, node) in namespaces.iter().enumerate() {
        let config = node_config(&dir, i + 1, &case, router_as, node_as);
        let mut p = node.spawn(&[&bin, "run", "--config", config.to_str().unwrap()]);
        p.wait_for_stderr("ready");
        nodes.push(p);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let prefixes: &[(&str, [&str; 2])] = if case.ipv4_only {
        &[("198.51.100.10/32", ["198.18.179.2", "198.18.180.2"])]
    } else {
        &[
            ("198.51.100.10/32", ["198.18.179.2", "198.18.180.2"]),
            ("2001:db8::10/128", ["fd53:179::2", "fd53:180::2"]),
        ]
    };
    for (prefix, hops) in prefixes {
        loop {
            let text = show(case.kind, &router, &rtr, &dir, prefix);
            let has_both = hops.iter().all(|h| has_path(case.kind, &text, h));
            let communities = match case.kind {
                Kind::Bird => text.contains("(64512,100)") && text.contains("(64512, 1, 2)"),
                Kind::Frr => text.contains("64512:100") && text.contains("64512:1:2"),
                Kind::GoBgp => text.contains("64512:100"),
            };
            if has_both && communities {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{case:?} {prefix}: not from both nodes with communities:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    eprintln!(
        "{case:?}: both nodes' /32 and /128 in the router after {:?}",
        started.elapsed()
    );

    {
        // Node 1 loses its last backend (a reload with none): its route goes, node 2's stays.
        let config = dir.join("node1.yaml");
        let text = std::fs::read_to_string(&config)
            .unwrap()
            .replace("backends: [{ip: 198.18.179.99}]", "backends: []");
        assert!(text.contains("backends: []"), "the test's own edit applies");
        std::fs::write(&config, text).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = show(case.kind, &router, &rtr, &dir, "198.51.100.10/32");
            if !has_path(case.kind, &text, "198.18.179.2")
                && has_path(case.kind, &text, "198.18.180.2")
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{case:?}: node 1's route should go, node 2's stay:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    if case.ipv4_only {
        let text = show(case.kind, &router, &rtr, &dir, "2001:db8::10/128");
        assert!(
            !has_path(case.kind, &text, "fd53:179::2")
                && !has_path(case.kind, &text, "fd53:180::2"),
            "{case:?}: no IPv6 route over an IPv4-only session:\n{text}"
        );
    }
    // Nothing the router complained of: no UPDATE or End-of-RIB of a family it did not
    // negotiate (RFC 4760 §7), nothing malformed.
    let log = match &router {
        RouterProcess::Bird(r) => r.log(),
        RouterProcess::Other(_) => {
            let name = match case.kind {
                Kind::Frr => "frr/bgpd.log",
                _ => "gobgpd.log",
            };
            std::fs::read_to_string(dir.join(name)).unwrap_or_default()
        }
    };
    assert!(!log.is_empty(), "{case:?}: the router's log is empty");
    for line in log.lines() {
        let l = line.to_ascii_lowercase();
        assert!(
            !(l.contains("unexpected af")
                || l.contains("non-enabled afi")
                || l.contains("malformed")
                || l.contains("unrecognized")),
            "{case:?}: the router logged {line:?}"
        );
    }
    let lab = Lab {
        _nodes: nodes,
        _router: router,
        dir,
        _ns: namespaces,
    };
    drop(lab);
    drop(rtr);
}

#[test]
fn bird_holds_both_nodes_routes_across_ebgp_ibgp_asn_widths_and_md5() {
    for ibgp in [false, true] {
        for four_octet in [false, true] {
            for md5 in [false, true] {
                run_case(Case {
                    kind: Kind::Bird,
                    ibgp,
                    four_octet,
                    md5,
                    ipv4_only: false,
                });
            }
        }
    }
}

#[test]
fn frr_holds_both_nodes_routes_across_ebgp_ibgp_asn_widths_and_md5() {
    for ibgp in [false, true] {
        for four_octet in [false, true] {
            for md5 in [false, true] {
                run_case(Case {
                    kind: Kind::Frr,
                    ibgp,
                    four_octet,
                    md5,
                    ipv4_only: false,
                });
            }
        }
    }
}

#[test]
fn gobgp_holds_both_nodes_routes() {
    run_case(Case {
        kind: Kind::GoBgp,
        ibgp: false,
        four_octet: false,
        md5: true,
        ipv4_only: false,
    });
}

#[test]
fn routers_that_negotiate_ipv4_only_get_no_ipv6_update_or_end_of_rib_and_log_no_complaint() {
    for kind in [Kind::Bird, Kind::Frr] {
        run_case(Case {
            kind,
            ibgp: false,
            four_octet: false,
            md5: false,
            ipv4_only: true,
        });
    }
}
