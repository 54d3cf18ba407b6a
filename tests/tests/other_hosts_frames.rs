//! Two hosts on one segment, both balancing the same service (one config, as for BGP's ECMP or
//! a highly available pair), behind a switch that floods every unicast frame to every port (a
//! hub: a switch whose MAC table is empty, or aged out), with promiscuous NICs (a bridge's or a
//! bond's port is). Each host sees the other's frames; each must balance only the frames to its
//! own MAC and leave the rest untouched: balancing another host's frame sends a second copy of
//! the client's packet to a backend.

use std::{net::SocketAddr, path::PathBuf};

use lb_userspace::dataplane::Dataplane;
use sluice_tests::{
    lab::{http_get, napi_keeper, spawn_http_name_server, Switch},
    netns::{veth, NetNs, Process},
    require_root, sluice_bin,
};

const VIP: &str = "198.18.1.100";

/// A host: its namespace, its `sluice run`, its own backend (same address on every host,
/// answering with the host's name), and the test's files.
struct Host {
    ns: NetNs,
    /// The interface whose MAC this host's frames carry (its address is there).
    mac_of: String,
    run: Process,
    dir: PathBuf,
    _backend: (NetNs, Switch, Dataplane),
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A host on the switch by its `eth0`; with `bridged`, `eth0` is a port of the host's bridge
/// `vmbr0` (a MAC of its own), which holds the address (the Proxmox layout), and Sluice is
/// still attached to `eth0`.
fn host(name: &str, sw: &NetNs, address: &str, bridged: bool) -> Host {
    let ns = NetNs::new(name);
    veth(&ns, "eth0", sw, &format!("p-{name}"));
    sw.ip(&["link", "set", &format!("p-{name}"), "master", "br0"]);
    let on = if bridged {
        ns.ip(&["link", "add", "vmbr0", "type", "bridge"]);
        ns.ip(&["link", "set", "vmbr0", "address", "02:b7:00:00:00:01"]);
        ns.ip(&["link", "set", "eth0", "master", "vmbr0"]);
        ns.ip(&["link", "set", "vmbr0", "up"]);
        "vmbr0"
    } else {
        "eth0"
    };
    ns.ip(&["addr", "add", &format!("{address}/24"), "dev", on]);
    ns.ip(&["link", "set", "eth0", "promisc", "on"]);
    ns.exec(&["sysctl", "-qw", "net.ipv4.conf.all.forwarding=1"]);
    let backend = NetNs::new(&format!("{name}-b"));
    veth(&ns, "n1", &backend, "bx");
    ns.ip(&["addr", "add", "198.18.11.1/24", "dev", "n1"]);
    backend.ip(&["addr", "add", "198.18.11.2/24", "dev", "bx"]);
    backend.ip(&["route", "add", "default", "via", "198.18.11.1"]);
    let server = spawn_http_name_server(&backend, name, 8081);
    let keeper = napi_keeper(&backend, "bx");

    let dir = std::env::temp_dir().join(format!("sluice-hub-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // The same service on every host.
    let config = format!(
        "dataplane:
  interfaces: [eth0]
  maglevTableSize: 1009
  stateFile: {}
pools:
- name: p
  addresses: [{VIP}-{VIP}]
l2Advertisements:
- ipAddressPools: [p]
  interfaces: [eth0]
services:
- name: web
  ports: [{{port: 80, targetPort: 8081}}]
  backends: [{{ip: 198.18.11.2}}]
",
        dir.join("allocations.json").display()
    );
    let path = dir.join("sluice.yaml");
    std::fs::write(&path, config).unwrap();
    let mut run = ns.spawn(&[
        &sluice_bin(),
        "run",
        "--config",
        path.to_str().unwrap(),
        "--node",
        name,
    ]);
    run.wait_for_stderr("ready");
    Host {
        ns,
        mac_of: on.to_string(),
        run,
        dir,
        _backend: (backend, server, keeper),
    }
}

/// A hub (a bridge that learns nothing: every unicast frame to every port) and a client on it
/// at 198.18.1.2.
fn hub(tag: &str) -> (NetNs, NetNs) {
    require_root();
    let sw = NetNs::new(tag);
    sw.ip(&["link", "add", "br0", "type", "bridge", "ageing_time", "0"]);
    sw.ip(&["link", "set", "br0", "up"]);
    let client = NetNs::new(&format!("{tag}-cl"));
    veth(&client, "c0", &sw, "p-cl");
    sw.ip(&["link", "set", "p-cl", "master", "br0"]);
    client.ip(&["addr", "add", "198.18.1.2/24", "dev", "c0"]);
    client.exec(&["ethtool", "-K", "c0", "tx", "off"]);
    (sw, client)
}

/// (packets the host's service counted, frames for other hosts its eth0 passed).
fn counted(host: &Host) -> (u64, u64) {
    let doc = host.run.inspect_json(&sluice_bin());
    let packets = doc["services"][0]["packets"].as_u64().unwrap_or(0);
    let other = doc["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "eth0")
        .unwrap_or_else(|| panic!("eth0 not in {doc}"))["otherHostFrames"]
        .as_u64()
        .unwrap();
    (packets, other)
}

#[test]
fn on_a_flooding_switch_each_host_balances_only_the_frames_to_its_own_mac() {
    let (sw, client) = hub("hub");
    let a = host("ha", &sw, "198.18.1.11", false);
    let b = host("hb", &sw, "198.18.1.12", false);
    let to: SocketAddr = format!("{VIP}:80").parse().unwrap();
    send_to(&client, &a, &b, to);
}

/// Sends 30 requests to each host's MAC in turn (the other host listening in): each host
/// balances its own, the other passes them.
fn send_to(client: &NetNs, a: &Host, b: &Host, to: SocketAddr) {
    // The client sends to one host's MAC at a time, as a router choosing a next hop does.
    for (to_host, other_host) in [(a, b), (b, a)] {
        let mac = to_host.ns.mac(&to_host.mac_of);
        let mac = mac
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        client.ip(&[
            "neigh",
            "replace",
            VIP,
            "lladdr",
            &mac,
            "dev",
            "c0",
            "nud",
            "permanent",
        ]);
        let (before_own, _) = counted(to_host);
        let (before_other, before_passed) = counted(other_host);
        let name = to_host.ns.name.rsplit('-').next().unwrap().to_string();
        for i in 0..30 {
            let answer = http_get(client, to).unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(
                answer, name,
                "request {i} balanced by the host it was sent to"
            );
        }
        let (own, _) = counted(to_host);
        let (other, passed) = counted(other_host);
        assert!(own > before_own, "{name} balanced its own frames");
        assert_eq!(
            other, before_other,
            "the other host balanced none of {name}'s frames"
        );
        assert!(
            passed > before_passed,
            "the other host saw {name}'s frames (the switch floods them) and passed them"
        );
        println!(
            "figure: 30 of 30 requests to {name}'s MAC balanced by {name} alone; the other host passed {} of its frames untouched",
            passed - before_passed
        );
    }
}

#[test]
fn a_host_attached_on_its_bridges_port_balances_the_frames_to_the_bridges_mac() {
    let (sw, client) = hub("hub2");
    // hc's address and MAC are its bridge's; Sluice runs on the bridge's port eth0.
    let c = host("hc", &sw, "198.18.1.13", true);
    let d = host("hd", &sw, "198.18.1.14", false);
    send_to(&client, &c, &d, format!("{VIP}:80").parse().unwrap());
}
