//! `sluice run` end to end: the real binary in the lab's node namespace, driven by a config file,
//! with real clients and backends (see `sluice_tests::lab`).

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use sluice_tests::{
    bird::{Neighbor, Router},
    frames,
    frr::{Frr, FrrNeighbor},
    lab::{names, udp_ask, Conn, Lab},
    netns::{NetNs, Process},
    rawsock::RawSocket,
    sluice_bin,
};

const METRICS: &str = "127.0.0.1:9120";

struct Run {
    process: Process,
    config: PathBuf,
    dir: PathBuf,
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The config, with this test's state file.
fn config_text(dir: &std::path::Path, body: &str) -> String {
    format!(
        "dataplane:\n  interfaces: [n0, nx]\n  maglevTableSize: 1009\n  stateFile: {}\n{body}",
        dir.join("allocations.json").display()
    )
}

fn start(lab: &Lab, tag: &str, body: &str) -> Run {
    let dir = temp_dir(tag);
    let config = dir.join("sluice.yaml");
    std::fs::write(&config, config_text(&dir, body)).unwrap();
    let bin = sluice_bin();
    let mut process = lab.node.spawn(&[
        &bin,
        "run",
        "--config",
        config.to_str().unwrap(),
        "--node",
        "node-1",
    ]);
    process.wait_for_stderr("ready");
    Run {
        process,
        config,
        dir,
    }
}

fn rewrite(run: &Run, body: &str) {
    let tmp = run.dir.join("next.yaml");
    std::fs::write(&tmp, config_text(&run.dir, body)).unwrap();
    std::fs::rename(&tmp, &run.config).unwrap();
}

fn metrics(lab: &Lab) -> String {
    http_get_raw(&lab.node, "/metrics").1
}

/// GET on the daemon's metrics address inside the node namespace: (status code, body).
fn http_get_raw(ns: &NetNs, path: &'static str) -> (u16, String) {
    ns.run(move || {
        sluice_tests::http_get(METRICS.parse().unwrap(), path).expect("metrics endpoint")
    })
}

/// Waits (up to 10 s) until a metrics line equals `line`.
fn wait_for_metric(lab: &Lab, line: &str) {
    wait_for_metric_within(lab, line, Duration::from_secs(10));
}

/// Waits (up to `within`) until a metrics line equals `line`.
fn wait_for_metric_within(lab: &Lab, line: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let text = metrics(lab);
        if text.lines().any(|l| l == line) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{line:?} never appeared in\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

const BASE: &str = r#"pools:
- name: default
  addresses: [198.18.1.100-198.18.1.110, "fd53:1::100-fd53:1::110"]
l2Advertisements:
- ipAddressPools: [default]
  interfaces: [n0]
"#;

#[test]
fn run_allocates_ips_answers_arp_only_where_configured_and_balances_tcp_udp_ipv6() {
    let lab = Lab::new(2);
    lab.serve(1);
    lab.serve(2);
    let body = format!(
        "{BASE}services:
- name: web
  ports: [{{port: 80, targetPort: 8080}}]
  backends: [{{ip: 198.18.11.2}}, {{ip: 198.18.12.2}}]
- name: dns
  ports: [{{port: 53, protocol: UDP, targetPort: 8080}}]
  backends: [{{ip: 198.18.11.2}}]
- name: web6
  ports: [{{port: 80, targetPort: 8080}}]
  backends: [{{ip: \"fd53:11::2\"}}, {{ip: \"fd53:12::2\"}}]
"
    );
    let mut run = start(&lab, "basic", &body);

    // Lowest free addresses, in file order, per family.
    let counts = names(&lab.client, addr("198.18.1.100:80"), 20);
    assert_eq!(
        counts.keys().cloned().collect::<Vec<_>>(),
        ["b1", "b2"],
        "{counts:?}"
    );
    let (answer, from) = udp_ask(&lab.client, addr("198.18.1.101:53")).unwrap();
    assert_eq!((answer.as_str(), from), ("b1", addr("198.18.1.101:53")));
    let counts = names(&lab.client, addr("[fd53:1::100]:80"), 10);
    assert_eq!(counts.values().sum::<usize>(), 10, "{counts:?}");

    // ARP for the VIP: answered on n0 (the client's segment), not on nx, though the program
    // runs there too.
    let node_mac = lab.node.mac("n0");
    let asked = |ns: &NetNs, ifname: &'static str, me: [u8; 4]| {
        let my_mac = ns.mac(ifname);
        ns.run(move || {
            let sock = RawSocket::open(ifname).unwrap();
            sock.send(&frames::arp_request(
                my_mac,
                me.into(),
                [198, 18, 1, 100].into(),
            ))
            .unwrap();
            sock.collect(Duration::from_millis(1500), |f| {
                f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 2]
            })
        })
    };
    let replies = asked(&lab.client, "c0", [198, 18, 1, 2]);
    assert_eq!(replies.len(), 1, "{replies:02x?}");
    assert_eq!(&replies[0][22..28], &node_mac);
    assert!(asked(&lab.other, "o0", [198, 18, 2, 2]).is_empty());

    // Metrics, health endpoints and inspect.
    let text = metrics(&lab);
    for line in [
        "sluice_allocator_addresses_in_use_total{pool=\"default\"} 3",
        "sluice_allocator_addresses_total{pool=\"default\"} 28",
        "sluice_config_last_reload_successful 1",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
    }
    assert!(
        text.contains(
            "sluice_service_flows_total{name=\"web\",service=\"198.18.1.100:80/tcp\"} 20"
        ),
        "{text}"
    );
    assert_eq!(http_get_raw(&lab.node, "/readyz").0, 200);
    assert_eq!(http_get_raw(&lab.node, "/healthz").0, 200);
    let doc = run
        .process
        .inspect_json_with(&sluice_bin(), &["--config", run.config.to_str().unwrap()]);
    let services = doc["services"].as_array().unwrap();
    assert!(
        services
            .iter()
            .any(|s| s["name"] == "web" && s["service"] == "198.18.1.100:80/tcp"),
        "{doc}"
    );
    // Pool sizes are whole numbers in JSON (not 32.0).
    let total = &doc["pools"][0]["total"];
    assert!(total.is_u64(), "{doc}");

    // The allocation is remembered: a restart gives the same IPs.
    let status = run.process.take().stop(libc::SIGTERM);
    assert!(status.success(), "{status}");
    let state = std::fs::read_to_string(run.dir.join("allocations.json")).unwrap();
    assert!(state.contains("\"web\": \"198.18.1.100\""), "{state}");
    run.process = lab.node.spawn(&[
        &sluice_bin(),
        "run",
        "--config",
        run.config.to_str().unwrap(),
    ]);
    run.process.wait_for_stderr("ready");
    assert_eq!(
        names(&lab.client, addr("198.18.1.100:80"), 4)
            .values()
            .sum::<usize>(),
        4
    );
}

/// `BASE` and the service `web` (TCP 80 → 8080) with backend b1 alone.
fn one_web_backend() -> String {
    format!(
        "{BASE}services:
- name: web
  ports: [{{port: 80, targetPort: 8080}}]
  backends: [{{ip: 198.18.11.2}}]
"
    )
}

#[test]
fn closed_connections_leave_the_connection_table_and_open_ones_stay() {
    let lab = Lab::new(1);
    lab.serve(1);
    let body = one_web_backend();
    let _run = start(&lab, "fin-sweep", &body);
    let vip = addr("198.18.1.100:80");
    let mut open = Conn::open(&lab.client, vip).unwrap();
    assert_eq!(open.ask().unwrap(), "b1");
    // 20 connections, each closed by both sides (client first, then the server on EOF).
    let counts = names(&lab.client, vip, 20);
    assert_eq!(counts.values().sum::<usize>(), 20, "{counts:?}");
    // The sweeper removes them a grace period (5 s) after their second FIN; a sweep every 2 s.
    // The deadline only bounds a failing run.
    wait_for_metric_within(
        &lab,
        "sluice_closed_flows_removed_total 20",
        Duration::from_secs(60),
    );
    let text = metrics(&lab);
    for line in [
        "sluice_tracked_flows 1",
        "sluice_tracked_flows_by_state{state=\"open\"} 1",
        "sluice_tracked_flows_by_state{state=\"closed\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
    }
    // The open connection was never touched.
    assert_eq!(open.ask().unwrap(), "b1");
}

#[test]
fn reload_applies_only_differences_and_a_broken_config_keeps_the_old_one_serving() {
    let lab = Lab::new(3);
    for i in 1..=3 {
        lab.serve(i);
    }
    let web = |backends: &str| {
        format!(
            "{BASE}services:
- name: web
  ports: [{{port: 80, targetPort: 8080}}]
  backends: [{backends}]
"
        )
    };
    let dns = "- name: dns\n  ports: [{port: 53, protocol: UDP, targetPort: 8080}]\n  backends: [{ip: 198.18.13.2}]\n";
    let run = start(
        &lab,
        "reload",
        &format!("{}{dns}", web("{ip: 198.18.11.2}, {ip: 198.18.12.2}")),
    );
    assert!(udp_ask(&lab.client, addr("198.18.1.101:53")).is_ok());
    let mut long = Conn::open(&lab.client, addr("198.18.1.100:80")).unwrap();
    let home = long.ask().unwrap();
    let other = if home == "b1" {
        "198.18.12.2"
    } else {
        "198.18.11.2"
    };
    let home_ip = if home == "b1" {
        "198.18.11.2"
    } else {
        "198.18.12.2"
    };

    // A file change: web loses the other backend and gains b3; dns goes; api comes.
    let api =
        "- name: api\n  ports: [{port: 81, targetPort: 8080}]\n  backends: [{ip: 198.18.13.2}]\n";
    rewrite(
        &run,
        &format!(
            "{}{api}",
            web(&format!("{{ip: {home_ip}}}, {{ip: 198.18.13.2}}"))
        ),
    );
    wait_for_metric(&lab, "sluice_config_reloads_total{result=\"success\"} 1");
    assert_eq!(
        long.ask().unwrap(),
        home,
        "the open connection kept its backend"
    );
    let counts = names(&lab.client, addr("198.18.1.100:80"), 20);
    assert!(
        !counts.contains_key(if other.ends_with("11.2") { "b1" } else { "b2" }),
        "{counts:?}"
    );
    assert!(counts.contains_key("b3"), "{counts:?}");
    // web kept its IP; api got the lowest free one (dns's, now released).
    assert_eq!(
        names(&lab.client, addr("198.18.1.101:81"), 2)
            .keys()
            .collect::<Vec<_>>(),
        ["b3"]
    );
    assert!(
        udp_ask(&lab.client, addr("198.18.1.101:53")).is_err(),
        "dns is gone"
    );

    // A broken file: rejected, reported, and the running configuration keeps serving.
    std::fs::write(
        &run.config,
        "services:\n- name: web\n  ports: [{port: 99999}]\n",
    )
    .unwrap();
    wait_for_metric(&lab, "sluice_config_reloads_total{result=\"failure\"} 1");
    let (code, body) = http_get_raw(&lab.node, "/readyz");
    assert_eq!(code, 503);
    assert!(
        body.contains("services[0].ports[0].port: 99999 is out of range"),
        "{body}"
    );
    assert_eq!(long.ask().unwrap(), home);
    assert_eq!(
        names(&lab.client, addr("198.18.1.100:80"), 5)
            .values()
            .sum::<usize>(),
        5
    );

    // Fixed, and reloaded by SIGHUP as well as by the file change: ready again.
    rewrite(
        &run,
        &format!(
            "{}{api}",
            web(&format!("{{ip: {home_ip}}}, {{ip: 198.18.13.2}}"))
        ),
    );
    unsafe { libc::kill(run.process.pid() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get_raw(&lab.node, "/readyz").0 != 200 {
        assert!(Instant::now() < deadline, "never ready again");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(long.ask().unwrap(), home);
}

#[test]
fn a_failing_backend_leaves_within_its_fall_threshold_and_comes_back_after_rise() {
    let lab = Lab::new(2);
    let switch = lab.serve(1);
    lab.serve(2);
    let body = format!(
        "{BASE}services:
- name: web
  ports: [{{port: 80, targetPort: 8080}}]
  backends: [{{ip: 198.18.11.2}}, {{ip: 198.18.12.2}}]
  healthCheck: {{type: tcp, port: 9000, intervalSeconds: 0.2, timeoutSeconds: 0.1, rise: 2, fall: 2}}
"
    );
    let _run = start(&lab, "health", &body);
    let vip = addr("198.18.1.100:80");
    assert_eq!(names(&lab.client, vip, 20).len(), 2);

    switch.set(false);
    let started = Instant::now();
    wait_for_metric(
        &lab,
        "sluice_backend_healthy{name=\"web\",backend=\"198.18.11.2:8080\"} 0",
    );
    let took = started.elapsed();
    eprintln!("b1 left after {took:?} (fall 2 × interval 0.2 s)");
    assert!(took < Duration::from_secs(3), "{took:?}");
    let counts = names(&lab.client, vip, 20);
    assert_eq!(counts.keys().collect::<Vec<_>>(), ["b2"], "{counts:?}");

    switch.set(true);
    wait_for_metric(
        &lab,
        "sluice_backend_healthy{name=\"web\",backend=\"198.18.11.2:8080\"} 1",
    );
    let counts = names(&lab.client, vip, 20);
    assert!(counts.contains_key("b1"), "{counts:?}");
}

#[test]
fn a_bad_config_at_startup_exits_non_zero_naming_every_problem() {
    let lab = Lab::new(0);
    let dir = temp_dir("bad");
    let config = dir.join("bad.yaml");
    std::fs::write(
        &config,
        "pools:\n- name: a\n  addresses: [198.18.1.20-198.18.1.10]\nservices:\n- name: s\n  ip: 203.0.113.1\n  ports: [{port: 80}]\n",
    )
    .unwrap();
    for subcommand in ["run", "validate"] {
        let out = lab.node.exec_output(&[
            &sluice_bin(),
            subcommand,
            "--config",
            config.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{subcommand}: {stderr}");
        assert!(stderr.contains("pools[0].addresses[0]"), "{stderr}");
        assert!(
            stderr.contains("services[0].ip: 203.0.113.1 is outside every pool"),
            "{stderr}"
        );
        assert!(!lab.node.has_xdp("n0"));
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn forwarding_goes_on_while_sluice_run_restarts_and_detach_stops_it() {
    let lab = Lab::new(2);
    lab.serve(1);
    lab.serve(2);
    let dir = temp_dir("restart");
    let config = dir.join("sluice.yaml");
    let body = format!(
        "{BASE}services:\n- name: web\n  ports: [{{port: 80, targetPort: 8080}}]\n  backends: [{{ip: 198.18.11.2}}, {{ip: 198.18.12.2}}]\n"
    );
    std::fs::write(&config, config_text(&dir, &body)).unwrap();
    // A process that keeps the node's mount namespace (and the bpffs sluice mounts in it) alive
    // between two runs of sluice, as a host's /sys/fs/bpf would.
    let mut holder = lab
        .node
        .spawn(&["sh", "-c", "echo holding >&2; exec sleep 600"]);
    holder.wait_for_stderr("holding");
    let target = holder.pid().to_string();
    let bin = sluice_bin();
    let in_node = |args: &[&str]| {
        let mut cmd = vec![
            "nsenter",
            "--target",
            target.as_str(),
            "--mount",
            "--net",
            bin.as_str(),
        ];
        cmd.extend_from_slice(args);
        cmd.iter().map(|s| s.to_string()).collect::<Vec<String>>()
    };
    let start_run = || {
        let args = in_node(&["run", "--config", config.to_str().unwrap()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut p = sluice_tests::netns::spawn_command(&args);
        p.wait_for_stderr("ready");
        p
    };
    let vip = addr("198.18.1.100:80");

    let first = start_run();
    let mut long = Conn::open(&lab.client, vip).unwrap();
    let home = long.ask().unwrap();
    assert!(first.stop(libc::SIGTERM).success());

    // No daemon: the pinned programs and maps keep balancing, established flow included.
    assert!(lab.node.has_xdp("n0"));
    assert_eq!(long.ask().unwrap(), home);
    assert_eq!(names(&lab.client, vip, 10).values().sum::<usize>(), 10);

    // A new daemon adopts the links (no second attach, no gap).
    let second = start_run();
    assert_eq!(long.ask().unwrap(), home);
    assert_eq!(names(&lab.client, vip, 10).values().sum::<usize>(), 10);
    assert!(second.stop(libc::SIGTERM).success());

    // `sluice detach` ends it: nothing attached, the VIP is gone.
    let args = in_node(&["detach", "--config", config.to_str().unwrap()]);
    let out = std::process::Command::new(&args[0])
        .args(&args[1..])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("xdp-n0"),
        "{out:?}"
    );
    assert!(!lab.node.has_xdp("n0"), "detached");
    assert!(Conn::open(&lab.client, vip)
        .and_then(|mut c| c.ask())
        .is_err());
    drop(holder);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn run_announces_service_ips_over_bgp_while_a_backend_is_healthy_and_ceases_on_stop() {
    let lab = Lab::new(2);
    let health: Vec<_> = (1..=2).map(|i| lab.serve(i)).collect();
    let rtr = NetNs::new("rtr");
    sluice_tests::netns::veth(&lab.node, "nr", &rtr, "r0");
    lab.node
        .ip(&["addr", "add", "198.18.179.2/24", "dev", "nr"]);
    rtr.ip(&["addr", "add", "198.18.179.1/24", "dev", "r0"]);
    let router = Router::start(
        &rtr,
        "run",
        &[Neighbor {
            local: "198.18.179.1",
            router_as: 64500,
            address: "198.18.179.2",
            peer_as: 64512,
            password: Some("s3cret"),
        }],
    );
    let body = format!(
        "{BASE}services:
- name: web
  ports: [{{port: 80, targetPort: 8080}}]
  backends: [{{ip: 198.18.11.2}}, {{ip: 198.18.12.2}}]
  healthCheck: {{type: tcp, port: 9000, intervalSeconds: 0.2, timeoutSeconds: 0.1, rise: 2, fall: 2}}
peers:
- {{peerAddress: 198.18.179.1, peerASN: 64500, myASN: 64512, holdTime: 9s, keepaliveTime: 3s,
   connectTime: 1s, routerID: 198.18.179.2, password: s3cret}}
bgpAdvertisements:
- {{ipAddressPools: [default], communities: [\"64512:100\", no-export]}}
"
    );
    let started = Instant::now();
    let mut run = start(&lab, "bgp", &body);
    let route = router.wait_route("198.18.1.100/32", Duration::from_secs(10), |t| {
        t.contains("BGP.as_path")
    });
    eprintln!("sluice run start → route in BIRD: {:?}", started.elapsed());
    assert!(route.contains("BGP.next_hop: 198.18.179.2"), "{route}");
    assert!(
        route.contains("(64512,100)") && route.contains("(65535,65281)"),
        "{route}"
    );
    wait_for_metric(&lab, "sluice_bgp_session_up{peer=\"198.18.179.1\"} 1");
    wait_for_metric(&lab, "sluice_bgp_prefixes_sent{peer=\"198.18.179.1\"} 1");
    let doc = run
        .process
        .inspect_json_with(&sluice_bin(), &["--config", run.config.to_str().unwrap()]);
    assert_eq!(doc["bgpSessions"][0]["state"], "Established", "{doc}");

    // The router asks for our routes again (ROUTE-REFRESH, RFC 2918): we send them again.
    let sent = doc["bgpSessions"][0]["updatesSent"].as_u64().unwrap();
    router.birdc("reload in speaker");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let doc = run
            .process
            .inspect_json_with(&sluice_bin(), &["--config", run.config.to_str().unwrap()]);
        if doc["bgpSessions"][0]["updatesSent"].as_u64().unwrap_or(0) > sent {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no updates after a route refresh: {doc}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The last healthy backend goes: the route is withdrawn; one comes back: announced again.
    let lost = Instant::now();
    for switch in &health {
        switch.set(false);
    }
    router.wait_route("198.18.1.100/32", Duration::from_secs(10), |t| {
        !t.contains("BGP.as_path")
    });
    eprintln!(
        "backends lost → route withdrawn: {:?} (fall 2 × 0.2 s)",
        lost.elapsed()
    );
    health[0].set(true);
    router.wait_route("198.18.1.100/32", Duration::from_secs(10), |t| {
        t.contains("BGP.as_path")
    });

    // Stopped: Cease, and the route is gone.
    assert!(run.process.take().stop(libc::SIGTERM).success());
    router.wait_protocol("speaker", "Administrative shutdown", Duration::from_secs(5));
    router.wait_route("198.18.1.100/32", Duration::from_secs(5), |t| {
        !t.contains("BGP.as_path")
    });
}

/// A lab with a BIRD router on the node's `nr` interface expecting AS 64512 with password s3cret.
fn bgp_lab(tag: &str) -> (Lab, NetNs, Router) {
    let lab = Lab::new(1);
    lab.serve(1);
    let rtr = NetNs::new("rtr");
    sluice_tests::netns::veth(&lab.node, "nr", &rtr, "r0");
    lab.node
        .ip(&["addr", "add", "198.18.179.2/24", "dev", "nr"]);
    rtr.ip(&["addr", "add", "198.18.179.1/24", "dev", "r0"]);
    let router = Router::start(
        &rtr,
        tag,
        &[Neighbor {
            local: "198.18.179.1",
            router_as: 64500,
            address: "198.18.179.2",
            peer_as: 64512,
            password: Some("s3cret"),
        }],
    );
    (lab, rtr, router)
}

fn bgp_body(my_asn: u32, password: &str) -> String {
    format!(
        "{BASE}services:
- name: web
  ports: [{{port: 80, targetPort: 8080}}]
  backends: [{{ip: 198.18.11.2}}]
peers:
- {{peerAddress: 198.18.179.1, peerASN: 64500, myASN: {my_asn}, holdTime: 9s, connectTime: 1s,
   routerID: 198.18.179.2, password: {password}}}
bgpAdvertisements:
- {{ipAddressPools: [default]}}
"
    )
}

/// Waits until the daemon's status shows a BGP last error containing `text`.
fn wait_bgp_error(run: &Run, text: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let doc = run
            .process
            .inspect_json_with(&sluice_bin(), &["--config", run.config.to_str().unwrap()]);
        let error = doc["bgpSessions"][0]["lastError"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if error.contains(text) {
            return doc;
        }
        assert!(
            Instant::now() < deadline,
            "no BGP error with {text:?}: {doc}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_wrong_asn_or_password_never_establishes_and_is_reported() {
    let (lab, _rtr, router) = bgp_lab("wrong-asn");
    let run = start(&lab, "wrong-asn", &bgp_body(64513, "s3cret"));
    // BIRD answers our OPEN with Bad Peer AS (2/2).
    let doc = wait_bgp_error(&run, "2/2");
    assert_ne!(doc["bgpSessions"][0]["state"], "Established", "{doc}");
    assert!(!router
        .birdc("show protocols speaker")
        .contains("Established"));
    drop(run);
    drop(router);
    drop(lab);

    let (lab, _rtr, router) = bgp_lab("wrong-pw");
    let run = start(&lab, "wrong-pw", &bgp_body(64512, "not-it"));
    // TCP-MD5 mismatch: the router drops our SYNs; we time out and say so.
    let doc = wait_bgp_error(&run, "timed out");
    assert_ne!(doc["bgpSessions"][0]["state"], "Established", "{doc}");
    assert!(!router
        .birdc("show protocols speaker")
        .contains("Established"));
}

#[test]
fn bgp_routes_come_back_after_a_router_restart_and_survive_a_sigkill_by_graceful_restart() {
    let (lab, rtr, router) = bgp_lab("restart");
    let mut run = start(&lab, "restart", &bgp_body(64512, "s3cret"));
    let present = |t: &str| t.contains("BGP.as_path");
    router.wait_route("198.18.1.100/32", Duration::from_secs(10), present);

    // The router restarts: the session comes back and the route is announced again.
    drop(router);
    let router = Router::start(
        &rtr,
        "restart2",
        &[Neighbor {
            local: "198.18.179.1",
            router_as: 64500,
            address: "198.18.179.2",
            peer_as: 64512,
            password: Some("s3cret"),
        }],
    );
    let back = Instant::now();
    router.wait_route("198.18.1.100/32", Duration::from_secs(15), present);
    eprintln!("router restarted → route back: {:?}", back.elapsed());

    // Sluice is killed without a word: the router keeps the route (graceful restart helper).
    let process = run.process.take();
    unsafe { libc::kill(process.pid() as i32, libc::SIGKILL) };
    drop(process);
    std::thread::sleep(Duration::from_secs(2));
    let kept = router.birdc("show route 198.18.1.100/32 all");
    assert!(present(&kept), "the route was dropped at once:\n{kept}");
    assert!(router
        .birdc("show protocols all speaker")
        .to_lowercase()
        .contains("graceful restart"));

    // Sluice, restarted, takes over again.
    run.process = lab.node.spawn(&[
        &sluice_bin(),
        "run",
        "--config",
        run.config.to_str().unwrap(),
    ]);
    run.process.wait_for_stderr("ready");
    router.wait_protocol("speaker", "Established", Duration::from_secs(10));
    router.wait_route("198.18.1.100/32", Duration::from_secs(10), present);
}

#[test]
fn a_peer_that_connects_to_sluice_is_answered() {
    let (lab, _rtr, router) = bgp_lab("passive");
    // Sluice's own attempts go to a port nobody listens on; only BIRD's connection can work.
    let body =
        bgp_body(64512, "s3cret").replace("connectTime: 1s,", "connectTime: 1s, peerPort: 1179,");
    let _run = start(&lab, "passive", &body);
    router.wait_protocol("speaker", "Established", Duration::from_secs(15));
    router.wait_route("198.18.1.100/32", Duration::from_secs(10), |t| {
        t.contains("BGP.as_path")
    });
}

/// A one-node lab with FRR on the node's `nr` interface expecting AS 64512, password s3cret.
fn frr_lab(tag: &str) -> (Lab, NetNs, std::path::PathBuf) {
    let lab = Lab::new(1);
    lab.serve(1);
    let rtr = NetNs::new("rtr");
    sluice_tests::netns::veth(&lab.node, "nr", &rtr, "r0");
    lab.node
        .ip(&["addr", "add", "198.18.179.2/24", "dev", "nr"]);
    rtr.ip(&["addr", "add", "198.18.179.1/24", "dev", "r0"]);
    (lab, rtr, temp_dir(&format!("{tag}-router")))
}

fn start_frr(rtr: &NetNs, dir: &std::path::Path) -> Frr {
    Frr::start(
        rtr,
        dir,
        "198.18.179.1",
        64500,
        &[FrrNeighbor {
            address: "198.18.179.2",
            peer_as: 64512,
            password: Some("s3cret"),
        }],
    )
}

#[test]
fn frr_gets_routes_back_after_its_restart_keeps_them_over_a_sigkill_and_gets_cease_on_stop() {
    let (lab, rtr, dir) = frr_lab("frr-life");
    let present = |t: &str| t.contains("198.18.179.2 from ");
    let frr = start_frr(&rtr, &dir);
    let mut run = start(&lab, "frr-life", &bgp_body(64512, "s3cret"));
    frr.wait("198.18.1.100/32", Duration::from_secs(10), present);

    // FRR restarts: the session and the route come back.
    drop(frr);
    let frr = start_frr(&rtr, &dir);
    frr.wait("198.18.1.100/32", Duration::from_secs(15), present);

    // Sluice killed without a word: FRR keeps the route (graceful restart helper).
    let process = run.process.take();
    unsafe { libc::kill(process.pid() as i32, libc::SIGKILL) };
    drop(process);
    std::thread::sleep(Duration::from_secs(2));
    let kept = frr.show("198.18.1.100/32");
    assert!(present(&kept), "FRR dropped the route at once:\n{kept}");

    // Sluice back: it takes over; then stopped: Cease, and the route goes.
    run.process = lab.node.spawn(&[
        &sluice_bin(),
        "run",
        "--config",
        run.config.to_str().unwrap(),
    ]);
    run.process.wait_for_stderr("ready");
    wait_for_metric(&lab, "sluice_bgp_session_up{peer=\"198.18.179.1\"} 1");
    frr.wait("198.18.1.100/32", Duration::from_secs(10), present);
    assert!(run.process.take().stop(libc::SIGTERM).success());
    frr.wait("198.18.1.100/32", Duration::from_secs(10), |t| !present(t));
    let neighbor = frr.vtysh("show bgp neighbor 198.18.179.2");
    assert!(neighbor.contains("Administrative Shutdown"), "{neighbor}");
}

#[test]
fn frr_never_establishes_with_a_wrong_asn_or_password_and_sluice_says_so() {
    let (lab, rtr, dir) = frr_lab("frr-wrong-asn");
    let frr = start_frr(&rtr, &dir);
    let run = start(&lab, "frr-wrong-asn", &bgp_body(64513, "s3cret"));
    wait_bgp_error(&run, "2/2");
    assert!(!frr.vtysh("show bgp summary").contains("Established"));
    drop(run);
    drop(frr);
    drop(lab);

    let (lab, rtr, dir) = frr_lab("frr-wrong-pw");
    let frr = start_frr(&rtr, &dir);
    let run = start(&lab, "frr-wrong-pw", &bgp_body(64512, "not-it"));
    wait_bgp_error(&run, "timed out");
    assert!(
        frr.show("198.18.1.100/32").is_empty() || !frr.show("198.18.1.100/32").contains(" from ")
    );
}

#[test]
fn a_malformed_message_from_one_peer_gets_its_notification_and_other_sessions_stay_up() {
    let (lab, rtr, router) = bgp_lab("garbage");
    // A second, fake peer on the router's link.
    rtr.ip(&["addr", "add", "198.18.179.3/24", "dev", "r0"]);
    let body = bgp_body(64512, "s3cret").replace(
        "bgpAdvertisements:",
        "- {peerAddress: 198.18.179.3, peerASN: 64999, myASN: 64512, holdTime: 9s, connectTime: 1s, routerID: 198.18.179.2}\nbgpAdvertisements:",
    );
    assert!(body.contains("198.18.179.3"), "the test's own edit applies");
    let run = start(&lab, "garbage", &body);
    router.wait_route("198.18.1.100/32", Duration::from_secs(10), |t| {
        t.contains("BGP.as_path")
    });

    // The fake peer connects to Sluice and sends a message with a broken marker.
    let reply = rtr.run(|| {
        use std::io::Read;
        // std cannot bind a source address, and 198.18.179.1 is the primary one: bind by hand.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        let mut src: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        src.sin_family = libc::AF_INET as u16;
        src.sin_addr.s_addr = u32::from_ne_bytes([198, 18, 179, 3]);
        assert_eq!(
            unsafe { libc::bind(fd, &src as *const _ as *const libc::sockaddr, 16) },
            0
        );
        let mut dst = src;
        dst.sin_addr.s_addr = u32::from_ne_bytes([198, 18, 179, 2]);
        dst.sin_port = 179u16.to_be();
        assert_eq!(
            unsafe { libc::connect(fd, &dst as *const _ as *const libc::sockaddr, 16) },
            0
        );
        let mut stream =
            unsafe { <std::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut garbage = vec![0xffu8; 16];
        garbage[3] = 0; // not the all-ones marker
        garbage.extend_from_slice(&[0, 19, 4]);
        std::io::Write::write_all(&mut stream, &garbage).unwrap();
        let mut got = Vec::new();
        let _ = stream.read_to_end(&mut got);
        got
    });
    // Our OPEN, then NOTIFICATION 1/1 (message header error / connection not synchronized).
    let notification = reply
        .windows(21)
        .find(|w| w[..16] == [0xff; 16] && w[18] == 3)
        .unwrap_or_else(|| panic!("no NOTIFICATION in {reply:02x?}"));
    assert_eq!((notification[19], notification[20]), (1, 1));

    // The BIRD session never noticed.
    assert!(router
        .birdc("show protocols speaker")
        .contains("Established"));
    let route = router.birdc("show route 198.18.1.100/32 all");
    assert!(route.contains("BGP.as_path"), "{route}");
    wait_for_metric(&lab, "sluice_bgp_session_up{peer=\"198.18.179.1\"} 1");
    drop(run);
}

/// `sluice trace` started in the daemon's mount and network namespaces (where its maps are
/// pinned), stdout piped; stderr's first line ("tracing ...") read, so the filter is on.
fn start_trace(run: &Run, args: &[&str]) -> std::process::Child {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new("nsenter")
        .args([
            "--target",
            &run.process.pid().to_string(),
            "--mount",
            "--net",
        ])
        .args([&sluice_bin(), "trace"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("nsenter (util-linux)");
    let mut reader = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("tracing"), "sluice trace said: {line}");
    // Keep its stderr open: the last line (how many events) goes there.
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    child
}

/// The pinned trace filter's `active` word, as bpftool reads it in the daemon's namespaces.
fn trace_active(run: &Run) -> u64 {
    let out = std::process::Command::new("nsenter")
        .args([
            "--target",
            &run.process.pid().to_string(),
            "--mount",
            "--net",
        ])
        .args(["bpftool", "-j", "map", "dump", "pinned"])
        .arg(lb_userspace::dataplane::default_pin_dir().join(lb_common::MAP_TRACE_FILTER))
        .output()
        .expect("bpftool");
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    dump[0]["formatted"]["value"]["active"]
        .as_u64()
        .unwrap_or_else(|| panic!("no active field in {dump}"))
}

#[test]
fn a_trace_shows_one_clients_arp_new_flow_hits_and_replies_and_a_killed_trace_turns_itself_off() {
    let lab = Lab::new(1);
    lab.serve(1);
    let body = one_web_backend();
    let run = start(&lab, "trace", &body);
    let vip = addr("198.18.1.100:80");
    // The second client reaches the VIP through the node's other interface.
    lab.other
        .ip(&["route", "add", "198.18.1.100/32", "via", "198.18.2.1"]);
    lab.client.ip(&["neigh", "flush", "dev", "c0"]);
    assert_eq!(trace_active(&run), 0);

    let trace = start_trace(&run, &["--client", "198.18.1.2", "--json"]);
    let mut conn = Conn::open(&lab.client, vip).unwrap();
    for _ in 0..3 {
        assert_eq!(conn.ask().unwrap(), "b1");
    }
    let mut other = Conn::open(&lab.other, vip).unwrap();
    assert_eq!(other.ask().unwrap(), "b1");
    drop((conn, other));
    std::thread::sleep(Duration::from_millis(300));
    unsafe { libc::kill(trace.id() as i32, libc::SIGINT) };
    let out = trace.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let has = |decision: &str, check: &dyn Fn(&serde_json::Value) -> bool| {
        events.iter().any(|e| e["decision"] == decision && check(e))
    };
    assert!(
        has("arp-reply", &|e| e["from"] == "198.18.1.2"
            && e["to"] == "198.18.1.100"),
        "no ARP answer for the client in\n{text}"
    );
    assert!(
        has("new-flow", &|e| e["maglevSlot"].is_u64()
            && e["via"] == "198.18.11.2:8080"
            && e["to"] == "198.18.1.100:80"),
        "no new flow with its Maglev slot and backend in\n{text}"
    );
    assert!(
        has("conntrack-hit", &|e| e["via"] == "198.18.11.2:8080"),
        "no conntrack hit in\n{text}"
    );
    assert!(
        has("reverse-nat", &|e| e["hook"] == "tc"
            && e["to"].as_str().unwrap().starts_with("198.18.1.2:")
            && e["via"] == "198.18.1.100:80"),
        "no reverse NAT of a reply in\n{text}"
    );
    assert!(
        !text.contains("198.18.2.2"),
        "the other client's packets were traced:\n{text}"
    );
    assert_eq!(trace_active(&run), 0, "Ctrl-C left the trace on");

    // SIGKILL: nobody turns the trace off, its lease (2 s) runs out and the next packet the
    // program sees turns it off.
    let mut killed = start_trace(&run, &[]);
    assert_eq!(trace_active(&run), 1);
    killed.kill().unwrap();
    killed.wait().unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let mut conn = Conn::open(&lab.client, vip).unwrap();
    assert_eq!(conn.ask().unwrap(), "b1");
    assert_eq!(trace_active(&run), 0, "a killed trace stayed on");
}

/// The capabilities `deploy/host/sluice.service` bounds `sluice run` to, as setpriv names them
/// ("bpf", "net_admin", ...).
fn unit_capabilities() -> Vec<String> {
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/host/sluice.service"),
    )
    .unwrap();
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit bounds its capabilities");
    line.split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect()
}

/// `sluice run` as root but bounded to `caps`, without new privileges, as the unit runs it:
/// bpffs is mounted first with every capability, as systemd mounts it at boot (`ip netns exec`
/// gives each command a /sys of its own, without one).
fn bounded(caps: &[String], bin: &str, config: &str) -> Vec<String> {
    let set = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    let script = format!(
        "mount -t bpf bpf /sys/fs/bpf && exec setpriv --bounding-set {set} --no-new-privs -- \
         {bin} run --config {config} --node node-1"
    );
    ["sh", "-c", &script]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[test]
fn the_host_units_capabilities_are_enough_to_serve_and_one_fewer_is_refused_by_name() {
    let caps = unit_capabilities();
    assert!(!caps.iter().any(|c| c == "sys_admin"), "{caps:?}");
    let lab = Lab::new(1);
    lab.serve(1);
    let dir = temp_dir("unit-caps");
    let config = dir.join("sluice.yaml");
    std::fs::write(&config, config_text(&dir, &one_web_backend())).unwrap();
    let bin = sluice_bin();
    let config = config.to_str().unwrap();

    // Without CAP_NET_ADMIN it cannot attach: it says so and exits, leaving nothing attached.
    let fewer: Vec<String> = caps.iter().filter(|c| *c != "net_admin").cloned().collect();
    let args = bounded(&fewer, &bin, config);
    let out = lab
        .node
        .exec_output(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "it ran without CAP_NET_ADMIN: {stderr}"
    );
    assert!(
        stderr.contains("operation not permitted; it needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN"),
        "the error does not name the capabilities: {stderr}"
    );
    assert!(!lab.node.has_xdp("n0"));

    // With the unit's set it serves: allocates, answers ARP, balances.
    let args = bounded(&caps, &bin, config);
    let mut process = lab
        .node
        .spawn(&args.iter().map(String::as_str).collect::<Vec<_>>());
    process.wait_for_stderr("ready");
    let status = std::fs::read_to_string(format!("/proc/{}/status", process.pid())).unwrap();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    assert_eq!(effective & (1 << 21), 0, "CAP_SYS_ADMIN is effective");
    let vip = addr("198.18.1.100:80");
    assert_eq!(Conn::open(&lab.client, vip).unwrap().ask().unwrap(), "b1");
    // Its bpffs (and so its pins) goes with its mount namespace: stopping it detaches all.
    drop(process);
    let _ = std::fs::remove_dir_all(dir);
}
