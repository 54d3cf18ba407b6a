//! The links users have, end to end with `sluice run`: bonds (active-backup with a failover,
//! balance-xor against a static LAG), a bridge over a bond with an unrelated management
//! interface, VLAN devices named `eth0.100` and `vlan200`.
//!
//! This machine's kernel has no bonding, 802.1Q or module loading: these tests are ignored here
//! and `cargo xtask kernels` runs them (`--include-ignored`) in a QEMU guest on each kernel of
//! the matrix, where Debian's modules are loaded. Each segment has a switch namespace (a
//! bridge, its ports' far ends running a pass-through XDP program so that XDP_TX into their
//! veths is delivered) and a client namespace; the node namespace runs `sluice run` with one
//! config file, and the backends are `sluice_tests::lab`'s.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use lb_userspace::dataplane::Dataplane;
use sluice_tests::{
    frames,
    lab::{http_get, napi_keeper, Lab},
    netns::{veth, NetNs, Process},
    rawsock::RawSocket,
    sluice_bin,
};

/// A client's segment: the switch namespace and the client namespace behind it.
struct Segment {
    keepers: Vec<Dataplane>,
    client: NetNs,
    /// The client's interface: `c0`, or its VLAN device.
    client_if: String,
    sw: NetNs,
}

/// A switch namespace with bridge `br0`, and a client at `client_ip/24` on it.
fn segment(tag: &str, client_ip: &str, gateway: &str) -> Segment {
    segment_on_vlan(tag, client_ip, gateway, None)
}

/// [`segment`], the client's address on VLAN `vlan` of its link (`c0.VLAN`) when given: the
/// switch's bridge carries the tagged frames as they are.
fn segment_on_vlan(tag: &str, client_ip: &str, gateway: &str, vlan: Option<u16>) -> Segment {
    let sw = NetNs::new(&format!("{tag}-sw"));
    let client = NetNs::new(&format!("{tag}-cl"));
    sw.ip(&["link", "add", "br0", "type", "bridge"]);
    sw.ip(&["link", "set", "br0", "up"]);
    veth(&sw, "sc", &client, "c0");
    sw.ip(&["link", "set", "sc", "master", "br0"]);
    let client_if = match vlan {
        Some(id) => {
            let name = format!("c0.{id}");
            let id = id.to_string();
            client.ip(&[
                "link", "add", "link", "c0", "name", &name, "type", "vlan", "id", &id,
            ]);
            client.ip(&["link", "set", &name, "up"]);
            name
        }
        None => "c0".to_string(),
    };
    client.ip(&["addr", "add", &format!("{client_ip}/24"), "dev", &client_if]);
    client.ip(&["route", "add", "default", "via", gateway]);
    client.exec(&["ethtool", "-K", "c0", "tx", "off"]);
    Segment {
        keepers: vec![napi_keeper(&client, "c0")],
        client,
        client_if,
        sw,
    }
}

/// A veth from the node (`node_if`) to the switch (`sw_if`, a port of its `br0` unless told),
/// with a pass-through program on the switch's end.
fn cable(lab: &Lab, seg: &mut Segment, node_if: &str, sw_if: &str, on_bridge: bool) {
    veth(&lab.node, node_if, &seg.sw, sw_if);
    if on_bridge {
        seg.sw.ip(&["link", "set", sw_if, "master", "br0"]);
    }
    seg.sw.ip(&["link", "set", sw_if, "up"]);
}

/// `sluice run` in the node namespace with `interfaces` and one service per (pool, VIP,
/// interface): HTTP on port 80 to both backends' 8081.
struct Run {
    process: Process,
    dir: PathBuf,
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run_sluice(lab: &Lab, tag: &str, interfaces: &[&str], vips: &[(&str, &str)]) -> Run {
    let dir = std::env::temp_dir().join(format!("sluice-links-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut config = format!(
        "dataplane:\n  interfaces: [{}]\n  maglevTableSize: 1009\n  stateFile: {}\npools:\n",
        interfaces.join(", "),
        dir.join("allocations.json").display()
    );
    for (i, (vip, _)) in vips.iter().enumerate() {
        config.push_str(&format!("- name: p{i}\n  addresses: [{vip}-{vip}]\n"));
    }
    config.push_str("l2Advertisements:\n");
    for (i, (_, iface)) in vips.iter().enumerate() {
        config.push_str(&format!(
            "- ipAddressPools: [p{i}]\n  interfaces: [{iface}]\n"
        ));
    }
    config.push_str("services:\n");
    for i in 0..vips.len() {
        config.push_str(&format!(
            "- name: web{i}\n  pool: p{i}\n  ports: [{{port: 80, targetPort: 8081}}]\n  backends: [{{ip: 198.18.11.2}}, {{ip: 198.18.12.2}}]\n"
        ));
    }
    let path = dir.join("sluice.yaml");
    std::fs::write(&path, config).unwrap();
    let mut process = lab.node.spawn(&[
        &sluice_bin(),
        "run",
        "--config",
        path.to_str().unwrap(),
        "--node",
        "node-1",
    ]);
    process.wait_for_stderr("ready");
    Run { process, dir }
}

/// Asks ARP for `vip` from the client once; the replies for it heard within 1.5 s.
fn arp_replies(seg: &Segment, me: &str, vip: &str) -> Vec<Vec<u8>> {
    arp_replies_within(seg, me, vip, Duration::from_millis(1500))
}

/// Asks ARP for `vip` from the client once; the replies for it heard within `window`.
fn arp_replies_within(seg: &Segment, me: &str, vip: &str, window: Duration) -> Vec<Vec<u8>> {
    let me: Ipv4Addr = me.parse().unwrap();
    let vip: Ipv4Addr = vip.parse().unwrap();
    let my_mac = seg.client.mac(&seg.client_if);
    let client_if = seg.client_if.clone();
    seg.client.run(move || {
        let sock = RawSocket::open(&client_if).unwrap();
        sock.send(&frames::arp_request(my_mac, me, vip)).unwrap();
        sock.collect(window, |f| {
            f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 2] && f[28..32] == vip.octets()
        })
    })
}

/// `n` HTTP requests to the VIP, each on a new connection: answers per backend name.
fn http_names(client: &NetNs, vip: &str, n: usize) -> std::collections::BTreeMap<String, usize> {
    let to: SocketAddr = format!("{vip}:80").parse().unwrap();
    let mut counts = std::collections::BTreeMap::new();
    for i in 0..n {
        let name = http_get(client, to).unwrap_or_else(|e| panic!("request {i} to {to}: {e}"));
        *counts.entry(name.trim().to_string()).or_insert(0) += 1;
    }
    counts
}

/// 30 requests, both backends answer; ARP for the VIP answered exactly once, at `mac`.
fn serves_and_answers_once(seg: &Segment, me: &str, vip: &str, mac: [u8; 6], what: &str) {
    for ask in 0..5 {
        let replies = arp_replies(seg, me, vip);
        assert_eq!(
            replies.len(),
            1,
            "{what}: ARP request {ask}: {replies:02x?}"
        );
        assert_eq!(
            &replies[0][22..28],
            &mac,
            "{what}: answered at the node's MAC"
        );
    }
    let counts = http_names(&seg.client, vip, 30);
    assert_eq!(counts.values().sum::<usize>(), 30, "{what}: {counts:?}");
    assert_eq!(counts.len(), 2, "{what}: every backend serves: {counts:?}");
    println!(
        "figure: {what}: ARP answered once per request (5 of 5); 30 requests served: {counts:?}"
    );
}

/// The interfaces `inspect` lists, by name: (mode, role fields).
fn inspected(run: &Run) -> serde_json::Value {
    run.process.inspect_json(&sluice_bin())["interfaces"].clone()
}

fn entry<'a>(interfaces: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    interfaces
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {interfaces}"))
}

/// Node: bond0 over p0 and p1 in `mode`; the switch's ends s0 and s1.
fn bonded_node(lab: &Lab, seg: &mut Segment, mode: &str, switch_lag: bool) {
    cable(lab, seg, "p0", "s0", !switch_lag);
    cable(lab, seg, "p1", "s1", !switch_lag);
    lab.node.ip(&[
        "link", "add", "bond0", "type", "bond", "mode", mode, "miimon", "100",
    ]);
    for port in ["p0", "p1"] {
        lab.node.ip(&["link", "set", port, "down"]);
        lab.node.ip(&["link", "set", port, "master", "bond0"]);
    }
    lab.node.ip(&["link", "set", "bond0", "up"]);
    if switch_lag {
        // A static LAG on the switch: one logical port, so a broadcast leaves by one of them.
        seg.sw.ip(&[
            "link",
            "add",
            "lag0",
            "type",
            "bond",
            "mode",
            "balance-xor",
            "miimon",
            "100",
        ]);
        for port in ["s0", "s1"] {
            seg.sw.ip(&["link", "set", port, "down"]);
            seg.sw.ip(&["link", "set", port, "master", "lag0"]);
        }
        seg.sw.ip(&["link", "set", "lag0", "master", "br0"]);
        seg.sw.ip(&["link", "set", "lag0", "up"]);
        seg.keepers.push(napi_keeper(&seg.sw, "lag0"));
    } else {
        seg.keepers.push(napi_keeper(&seg.sw, "s0"));
        seg.keepers.push(napi_keeper(&seg.sw, "s1"));
    }
}

/// A bonded node in `mode` serving 198.18.5.100 on `bond0` (address 198.18.5.1) to a client
/// at 198.18.5.2, both backends serving; the switch's side a static LAG when `switch_lag`.
struct BondLab {
    run: Run,
    seg: Segment,
    _servers: [(sluice_tests::lab::Switch, sluice_tests::lab::Switch); 2],
    lab: Lab,
}

fn bond_lab(tag: &str, mode: &str, switch_lag: bool) -> BondLab {
    let lab = Lab::new(2);
    let servers = [lab.serve_with_http(1), lab.serve_with_http(2)];
    let mut seg = segment(tag, "198.18.5.2", "198.18.5.1");
    bonded_node(&lab, &mut seg, mode, switch_lag);
    lab.node
        .ip(&["addr", "add", "198.18.5.1/24", "dev", "bond0"]);
    let run = run_sluice(&lab, tag, &["bond0"], &[("198.18.5.100", "bond0")]);
    BondLab {
        run,
        seg,
        _servers: servers,
        lab,
    }
}

fn active_port(node: &NetNs) -> String {
    node.exec(&["cat", "/sys/class/net/bond0/bonding/active_slave"])
        .trim()
        .to_string()
}

#[test]
#[ignore = "needs bonding and 802.1Q: `cargo xtask kernels` runs it in a QEMU guest"]
fn an_active_backup_bond_answers_arp_once_from_its_active_port_and_follows_a_failover() {
    let BondLab {
        run,
        seg,
        lab,
        _servers,
    } = bond_lab("ab", "active-backup", false);
    let mac = lab.node.mac("bond0");
    let first = active_port(&lab.node);
    serves_and_answers_once(&seg, "198.18.5.2", "198.18.5.100", mac, "active-backup");

    let interfaces = inspected(&run);
    assert_eq!(
        entry(&interfaces, "bond0")["mode"],
        "native",
        "{interfaces}"
    );
    let standby = if first == "p0" { "p1" } else { "p0" };
    assert_eq!(entry(&interfaces, &first)["standby"], false, "{interfaces}");
    assert_eq!(entry(&interfaces, standby)["standby"], true, "{interfaces}");
    assert_eq!(
        entry(&interfaces, standby)["portOf"],
        "bond0",
        "{interfaces}"
    );
    assert!(
        entry(&interfaces, standby)["standbyFrames"]
            .as_u64()
            .unwrap()
            > 0,
        "the standby port saw the broadcasts and passed them: {interfaces}"
    );
    println!(
        "figure: active-backup: XDP native on bond0's ports, {first} answering, {standby} standby ({} frames passed there)",
        entry(&interfaces, standby)["standbyFrames"]
    );
    // What an operator sees (kept in the guest's console).
    let text = std::process::Command::new("nsenter")
        .args([
            "--target",
            &run.process.pid().to_string(),
            "--mount",
            "--net",
        ])
        .args([sluice_bin().as_str(), "inspect"])
        .output()
        .expect("nsenter (util-linux)");
    let text = String::from_utf8_lossy(&text.stdout);
    println!(
        "sluice inspect:\n{}",
        text.split("\n\n").next().unwrap_or("")
    );

    // The active port's link fails: the bond moves to the other port, and so do the answers.
    let cut = if first == "p0" { "s0" } else { "s1" };
    let started = Instant::now();
    seg.sw.ip(&["link", "set", cut, "down"]);
    // A request every 200 ms: the first answered once, by the new active port, tells the
    // failover's time (to within the 200 ms between requests).
    let answered_after = loop {
        let sent = started.elapsed();
        let replies = arp_replies_within(
            &seg,
            "198.18.5.2",
            "198.18.5.100",
            Duration::from_millis(200),
        );
        if replies.len() == 1 && active_port(&lab.node) != first {
            break sent;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no single answer after the failover: {replies:02x?}"
        );
    };
    println!(
        "figure: active-backup failover: answered once from {} {:.2} s after {first}'s link went down",
        active_port(&lab.node),
        answered_after.as_secs_f64()
    );
    serves_and_answers_once(
        &seg,
        "198.18.5.2",
        "198.18.5.100",
        mac,
        "active-backup after failover",
    );
    drop(run);
}

#[test]
#[ignore = "needs bonding and 802.1Q: `cargo xtask kernels` runs it in a QEMU guest"]
fn a_balance_xor_bond_against_a_static_lag_answers_arp_once_and_balances() {
    let BondLab {
        run,
        seg,
        lab,
        _servers,
    } = bond_lab("xor", "balance-xor", true);
    let mac = lab.node.mac("bond0");
    serves_and_answers_once(&seg, "198.18.5.2", "198.18.5.100", mac, "balance-xor");
    let interfaces = inspected(&run);
    for port in ["p0", "p1"] {
        assert_eq!(entry(&interfaces, port)["standby"], false, "{interfaces}");
        assert_eq!(entry(&interfaces, port)["mode"], "native", "{interfaces}");
    }
}

#[test]
#[ignore = "needs bonding and 802.1Q: `cargo xtask kernels` runs it in a QEMU guest"]
fn a_bridge_over_a_bond_answers_on_the_bridge_and_never_on_the_management_interface() {
    let lab = Lab::new(2);
    let _servers = [lab.serve_with_http(1), lab.serve_with_http(2)];
    let mut seg = segment("br", "198.18.5.2", "198.18.5.1");
    bonded_node(&lab, &mut seg, "active-backup", false);
    // The Proxmox layout: the bond is a port of vmbr0, which holds the address.
    lab.node.ip(&["link", "add", "vmbr0", "type", "bridge"]);
    lab.node.ip(&["link", "set", "bond0", "master", "vmbr0"]);
    lab.node.ip(&["link", "set", "vmbr0", "up"]);
    lab.node
        .ip(&["addr", "add", "198.18.5.1/24", "dev", "vmbr0"]);
    // A management interface on another segment, where nobody may hear of the VIP.
    let mgmt = segment("mg", "198.18.6.2", "198.18.6.1");
    veth(&lab.node, "mgmt", &mgmt.sw, "sm");
    mgmt.sw.ip(&["link", "set", "sm", "master", "br0"]);
    mgmt.sw.ip(&["link", "set", "sm", "up"]);
    lab.node
        .ip(&["addr", "add", "198.18.6.1/24", "dev", "mgmt"]);

    let run = run_sluice(&lab, "br", &["vmbr0"], &[("198.18.5.100", "vmbr0")]);
    let mac = lab.node.mac("vmbr0");
    serves_and_answers_once(&seg, "198.18.5.2", "198.18.5.100", mac, "bridge over bond");
    for _ in 0..3 {
        let heard = arp_replies(&mgmt, "198.18.6.2", "198.18.5.100");
        assert!(
            heard.is_empty(),
            "the management segment got an answer: {heard:02x?}"
        );
    }
    let interfaces = inspected(&run);
    let vmbr0 = entry(&interfaces, "vmbr0");
    assert_eq!(vmbr0["mode"], "generic", "{interfaces}");
    assert_eq!(vmbr0["kind"], "bridge", "{interfaces}");
    assert!(vmbr0["note"].as_str().is_some_and(|n| n.contains("bridge")));
    println!(
        "figure: bridge over bond: XDP mode {} ({})",
        vmbr0["mode"], vmbr0["note"]
    );
}

#[test]
#[ignore = "needs bonding and 802.1Q: `cargo xtask kernels` runs it in a QEMU guest"]
fn vlan_devices_named_eth0_100_and_vlan200_each_answer_their_own_segment_only() {
    let lab = Lab::new(2);
    let _servers = [lab.serve_with_http(1), lab.serve_with_http(2)];
    // The trunk: the node's eth0 to the switch's up0; one bridge per VLAN on the switch.
    let mut v100 = segment("v100", "198.18.7.2", "198.18.7.1");
    let v200 = segment("v200", "198.18.8.2", "198.18.8.1");
    cable(&lab, &mut v100, "eth0", "up0", false);
    let sw = &v100.sw;
    veth(sw, "t200", &v200.sw, "u200");
    v200.sw.ip(&["link", "set", "u200", "master", "br0"]);
    v200.sw.ip(&["link", "set", "u200", "up"]);
    sw.ip(&["link", "set", "t200", "up"]);
    sw.ip(&[
        "link", "add", "link", "up0", "name", "up0.100", "type", "vlan", "id", "100",
    ]);
    sw.ip(&["link", "set", "up0.100", "master", "br0", "up"]);
    sw.ip(&[
        "link", "add", "link", "up0", "name", "up0.200", "type", "vlan", "id", "200",
    ]);
    sw.ip(&["link", "add", "br200", "type", "bridge"]);
    sw.ip(&["link", "set", "up0.200", "master", "br200", "up"]);
    sw.ip(&["link", "set", "t200", "master", "br200"]);
    sw.ip(&["link", "set", "br200", "up"]);
    lab.node.ip(&["link", "set", "eth0", "up"]);
    lab.node.ip(&[
        "link", "add", "link", "eth0", "name", "eth0.100", "type", "vlan", "id", "100",
    ]);
    lab.node.ip(&[
        "link", "add", "link", "eth0", "name", "vlan200", "type", "vlan", "id", "200",
    ]);
    for (dev, addr) in [("eth0.100", "198.18.7.1/24"), ("vlan200", "198.18.8.1/24")] {
        lab.node.ip(&["link", "set", dev, "up"]);
        lab.node.ip(&["addr", "add", addr, "dev", dev]);
    }
    let run = run_sluice(
        &lab,
        "vlan",
        &["eth0.100", "vlan200"],
        &[("198.18.7.100", "eth0.100"), ("198.18.8.100", "vlan200")],
    );
    let mac = lab.node.mac("eth0");
    serves_and_answers_once(&v100, "198.18.7.2", "198.18.7.100", mac, "eth0.100");
    serves_and_answers_once(&v200, "198.18.8.2", "198.18.8.100", mac, "vlan200");
    // Each VIP on its own segment only.
    assert!(arp_replies(&v100, "198.18.7.2", "198.18.8.100").is_empty());
    assert!(arp_replies(&v200, "198.18.8.2", "198.18.7.100").is_empty());
    let interfaces = inspected(&run);
    for dev in ["eth0.100", "vlan200"] {
        assert_eq!(entry(&interfaces, dev)["mode"], "generic", "{interfaces}");
        assert_eq!(entry(&interfaces, dev)["kind"], "vlan", "{interfaces}");
    }
    println!("figure: VLAN devices eth0.100 and vlan200: XDP generic, each VIP answered on its own VLAN only");
    // The links were pinned under names bpffs takes (a dot it does not), in the bpffs of
    // sluice's own mount namespace.
    let out = std::process::Command::new("nsenter")
        .args(["--target", &run.process.pid().to_string(), "--mount"])
        .args(["ls", "/sys/fs/bpf/sluice/links"])
        .output()
        .expect("nsenter (util-linux)");
    let links = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        links.lines().any(|l| l == "xdp-eth0%2e100"),
        "{links} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "needs bonding and 802.1Q: `cargo xtask kernels` runs it in a QEMU guest"]
fn a_vlan_on_an_active_backup_bond_answers_once_on_its_vlan() {
    let lab = Lab::new(2);
    let _servers = [lab.serve_with_http(1), lab.serve_with_http(2)];
    let mut seg = segment_on_vlan("bv", "198.18.9.2", "198.18.9.1", Some(100));
    bonded_node(&lab, &mut seg, "active-backup", false);
    lab.node.ip(&[
        "link",
        "add",
        "link",
        "bond0",
        "name",
        "bond0.100",
        "type",
        "vlan",
        "id",
        "100",
    ]);
    lab.node.ip(&["link", "set", "bond0.100", "up"]);
    lab.node
        .ip(&["addr", "add", "198.18.9.1/24", "dev", "bond0.100"]);
    let run = run_sluice(&lab, "bv", &["bond0.100"], &[("198.18.9.100", "bond0.100")]);
    let mac = lab.node.mac("bond0.100");
    serves_and_answers_once(&seg, "198.18.9.2", "198.18.9.100", mac, "bond0.100");
    let interfaces = inspected(&run);
    assert_eq!(
        entry(&interfaces, "bond0.100")["kind"],
        "vlan",
        "{interfaces}"
    );
}
