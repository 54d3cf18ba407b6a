//! `sluice speaker` end to end: two speaker processes as two "nodes", each in its own network
//! namespace with its own interfaces, against the fake API server; real ARP, real TCP, real XDP.
//!
//! ```text
//!                       data segment (bridge br0 in `seg`)
//!   client [c0 198.18.50.100] ── br0 ── [eth1 198.18.50.1] node-a [pa 10.244.1.1] ── pod-a 10.244.1.2
//!                                 └──── [eth1 198.18.50.2] node-b [pb 10.244.2.1] ── pod-b 10.244.2.2
//!                       management segment (bridge brm in `seg`)
//!   api [m0 198.18.60.254] ── brm ── [eth0 198.18.60.1] node-a
//!   (fake API server)         └───── [eth0 198.18.60.2] node-b
//! ```
//! The Service's IP 198.18.50.200 is announced on eth1 only (the L2Advertisement's interfaces),
//! although each speaker's program is attached to eth0 too.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use lb_userspace::dataplane::Dataplane;
use serde_json::{json, Value};
use sluice_tests::{
    bird::{Neighbor, Router},
    fakeapi::FakeApi,
    frames::{self, Mac},
    lab::{napi_keeper, Conn},
    netns::{veth, NetNs, Process},
    rawsock::RawSocket,
    require_root, servers, sluice_bin,
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 50, 200);
const VIP6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd53, 0x50, 0, 0, 0, 0, 0, 0x200);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 50, 100);
const NS: &str = "sluice-system";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/sluice-system/leases";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

/// Fields drop in order: processes, programs, then namespaces.
struct Lab {
    speakers: Vec<Option<Process>>,
    _keepers: Vec<Dataplane>,
    api: FakeApi,
    client: NetNs,
    mgmt: NetNs,
    nodes: Vec<NetNs>,
    _pods: Vec<NetNs>,
    seg: NetNs,
    pin_dirs: Vec<PathBuf>,
    kubeconfig: PathBuf,
    logs: Vec<PathBuf>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.speakers.clear();
        for dir in &self.pin_dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
        let _ = std::fs::remove_file(&self.kubeconfig);
        for log in &self.logs {
            if std::thread::panicking() || std::env::var_os("SLUICE_KEEP_LOGS").is_some() {
                eprintln!("speaker log kept: {}", log.display());
            } else {
                let _ = std::fs::remove_file(log);
            }
        }
    }
}

fn lab() -> Lab {
    require_root();
    let seg = NetNs::new("seg");
    seg.ip(&["link", "add", "br0", "type", "bridge"]);
    seg.ip(&["link", "add", "brm", "type", "bridge"]);
    seg.ip(&["link", "set", "br0", "up"]);
    seg.ip(&["link", "set", "brm", "up"]);
    let client = NetNs::new("client");
    let mgmt = NetNs::new("api");
    let mut keepers = Vec::new();
    let port = |ns: &NetNs, inside: &str, outside: &str, bridge: &str| {
        veth(ns, inside, &seg, outside);
        seg.ip(&["link", "set", outside, "master", bridge]);
        // XDP_TX from `inside` reaches the bridge only when this end runs NAPI.
        napi_keeper(&seg, outside)
    };
    keepers.push(port(&client, "c0", "cl", "br0"));
    keepers.push(port(&mgmt, "m0", "ap", "brm"));
    client.ip(&["addr", "add", "198.18.50.100/24", "dev", "c0"]);
    client.ip(&["addr", "add", "fd53:50::100/64", "dev", "c0", "nodad"]);
    client.exec(&["ethtool", "-K", "c0", "tx", "off"]);
    mgmt.ip(&["addr", "add", "198.18.60.254/24", "dev", "m0"]);
    keepers.push(napi_keeper(&client, "c0"));
    keepers.push(napi_keeper(&mgmt, "m0"));
    let mut nodes = Vec::new();
    let mut pods = Vec::new();
    for (i, name) in ["a", "b"].iter().enumerate() {
        let n = i + 1;
        let node = NetNs::new(&format!("node-{name}"));
        keepers.push(port(&node, "eth1", &format!("{name}1"), "br0"));
        keepers.push(port(&node, "eth0", &format!("{name}0"), "brm"));
        node.ip(&["addr", "add", &format!("198.18.50.{n}/24"), "dev", "eth1"]);
        node.ip(&["addr", "add", &format!("198.18.60.{n}/24"), "dev", "eth0"]);
        node.ip(&[
            "addr",
            "add",
            &format!("fd53:50::{n}/64"),
            "dev",
            "eth1",
            "nodad",
        ]);
        node.exec(&["sysctl", "-qw", "net.ipv4.conf.all.forwarding=1"]);
        let pod = NetNs::new(&format!("pod-{name}"));
        veth(&node, &format!("p{name}"), &pod, "eth0");
        node.ip(&[
            "addr",
            "add",
            &format!("10.244.{n}.1/24"),
            "dev",
            &format!("p{name}"),
        ]);
        pod.ip(&["addr", "add", &format!("10.244.{n}.2/24"), "dev", "eth0"]);
        pod.ip(&["route", "add", "default", "via", &format!("10.244.{n}.1")]);
        servers::spawn_name_servers(&pod, &format!("pod-{name}"), 8080);
        nodes.push(node);
        pods.push(pod);
    }
    let listener =
        mgmt.run(|| TcpListener::bind("198.18.60.254:0").expect("bind in the api namespace"));
    let api = FakeApi::serve(listener);
    // Unique per lab: tests run in parallel in one process.
    let kubeconfig = std::env::temp_dir().join(format!("{}.kubeconfig", mgmt.name));
    api.write_kubeconfig(&kubeconfig);
    Lab {
        speakers: vec![None, None],
        _keepers: keepers,
        api,
        client,
        mgmt,
        nodes,
        _pods: pods,
        seg,
        pin_dirs: Vec::new(),
        kubeconfig,
        logs: Vec::new(),
    }
}

const NAMES: [&str; 2] = ["node-a", "node-b"];

impl Lab {
    fn objects(&self, policy: &str) {
        self.objects_with(policy, &[VIP.to_string()]);
    }

    fn objects_with(&self, policy: &str, ips: &[String]) {
        let ingress: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
        let api = &self.api;
        for ns in ["default", NS] {
            api.create("/api/v1/namespaces", json!({"metadata": {"name": ns}}))
                .unwrap();
        }
        for name in NAMES {
            api.create(
                "/api/v1/nodes",
                json!({"apiVersion": "v1", "kind": "Node",
                       "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
                       "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
            )
            .unwrap();
        }
        let crds = "/apis/sluice.dev/v1alpha1/namespaces/sluice-system";
        api.create(
            &format!("{crds}/ipaddresspools"),
            json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "IPAddressPool",
                   "metadata": {"name": "lab"}, "spec": {"addresses": ["198.18.50.200/29", "fd53:50::200/125"]}}),
        )
        .unwrap();
        api.create(
            &format!("{crds}/l2advertisements"),
            json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "L2Advertisement",
                   "metadata": {"name": "data"}, "spec": {"interfaces": ["eth1"]}}),
        )
        .unwrap();
        api.create(
            "/api/v1/namespaces/default/services",
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": "web"},
                   "spec": {"type": "LoadBalancer", "externalTrafficPolicy": policy,
                            "ports": [{"name": "tcp", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
                   "status": {"loadBalancer": {"ingress": ingress}}}),
        )
        .unwrap();
        let endpoints: Vec<Value> = NAMES
            .iter()
            .enumerate()
            .map(|(i, node)| {
                json!({"addresses": [format!("10.244.{}.2", i + 1)], "nodeName": node,
                                     "conditions": {"ready": true}})
            })
            .collect();
        api.create(
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": "web-abc", "labels": {"kubernetes.io/service-name": "web"}},
                   "addressType": "IPv4", "endpoints": endpoints,
                   "ports": [{"name": "tcp", "port": 8080, "protocol": "TCP"}]}),
        )
        .unwrap();
    }

    fn start_speaker(&mut self, i: usize) {
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", self.nodes[i].name));
        self.pin_dirs.push(pin_dir.clone());
        let kubeconfig = format!("KUBECONFIG={}", self.kubeconfig.display());
        let mut p = self.nodes[i].spawn(&[
            "env",
            &kubeconfig,
            "RUST_LOG=info",
            &sluice_bin(),
            "speaker",
            "--node-name",
            NAMES[i],
            "--namespace",
            NS,
            "--interface",
            "eth1",
            "--interface",
            "eth0",
            "--pin-dir",
            pin_dir.to_str().unwrap(),
            "--lease-duration",
            "3",
            "--resync-seconds",
            "1",
            "--metrics-address",
            "127.0.0.1:9465",
        ]);
        let log = std::env::temp_dir().join(format!("{}.log", self.nodes[i].name));
        self.logs.push(log.clone());
        p.wait_for_stderr_then_log("speakerStarting", Some(log));
        self.speakers[i] = Some(p);
    }

    /// Does node i's Lease say it answers for the VIP?
    fn announces(&self, i: usize) -> bool {
        self.api
            .get(&format!("{LEASES}/sluice-speaker-{}", NAMES[i]))
            .and_then(|l| {
                l["metadata"]["annotations"]["sluice.dev/announcing"]
                    .as_str()
                    .map(String::from)
            })
            .is_some_and(|a| a.split(',').any(|ip| ip == VIP.to_string()))
    }

    /// Which node's Lease says it answers for the VIP (while both are alive).
    fn announcer(&self) -> Option<usize> {
        let holders: Vec<usize> = self
            .api
            .list(LEASES)
            .iter()
            .filter(|l| {
                l["metadata"]["annotations"]["sluice.dev/announcing"]
                    .as_str()
                    .is_some_and(|a| a.split(',').any(|ip| ip == VIP.to_string()))
            })
            .filter_map(|l| NAMES.iter().position(|n| l["spec"]["holderIdentity"] == *n))
            .collect();
        (holders.len() == 1).then(|| holders[0])
    }

    fn node_mac(&self, i: usize, ifname: &str) -> Mac {
        self.nodes[i].mac(ifname)
    }
}

/// ARP replies for the VIP sent to this asker (gratuitous ARPs, broadcast, are not answers).
fn ask_arp(ns: &NetNs, ifname: &'static str, sender: Ipv4Addr) -> Vec<Vec<u8>> {
    let my_mac = ns.mac(ifname);
    ns.run(move || {
        let sock = RawSocket::open(ifname).unwrap();
        sock.send(&frames::arp_request(my_mac, sender, VIP))
            .unwrap();
        sock.collect(Duration::from_millis(400), |f| {
            f.len() >= 42
                && f[12..14] == [0x08, 0x06]
                && f[20..22] == [0, 2]
                && f[28..32] == VIP.octets()
                && f[0..6] == my_mac
        })
    })
}

/// Does `act`, then waits for the node with `new_mac` to send a gratuitous ARP for the VIP and
/// to answer ARP for it alone; returns how long each took.
fn takeover(lab: &Lab, new_mac: Mac, act: impl FnOnce()) -> (Duration, Duration) {
    let seen: Arc<Mutex<Option<Instant>>> = Arc::default();
    std::thread::scope(|scope| {
        let listener = {
            let seen = seen.clone();
            let client = &lab.client;
            scope.spawn(move || {
                client.run(move || {
                    let sock = RawSocket::open("c0").unwrap();
                    sock.collect(Duration::from_secs(12), |f| {
                        let gratuitous = f.len() >= 42
                            && f[12..14] == [0x08, 0x06]
                            && f[28..32] == VIP.octets()
                            && f[38..42] == VIP.octets()
                            && f[22..28] == new_mac;
                        if gratuitous {
                            seen.lock().unwrap().get_or_insert_with(Instant::now);
                        }
                        gratuitous
                    })
                })
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        let start = Instant::now();
        act();
        let answered = wait_for(
            "the new owner to answer ARP alone",
            Duration::from_secs(15),
            // When the request the new owner alone answered was sent (polled every ~0.5 s).
            || {
                let asked = Instant::now();
                let r = ask_arp(&lab.client, "c0", CLIENT_IP);
                (r.len() == 1 && r[0][6..12] == new_mac).then_some(asked)
            },
        );
        let frames = listener.join().unwrap();
        assert!(!frames.is_empty(), "no gratuitous ARP from the new owner");
        let garp = seen.lock().unwrap().expect("seen");
        (garp - start, answered - start)
    })
}

fn wait_for<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ask_vip(client: &NetNs) -> Option<String> {
    Conn::open(client, SocketAddr::from((VIP, 80)))
        .and_then(|mut c| c.ask())
        .ok()
}

#[test]
fn one_elected_speaker_answers_arp_on_the_chosen_interface_balances_to_its_pod_and_hands_over_when_killed(
) {
    let mut lab = lab();
    lab.objects("Local");
    lab.start_speaker(0);
    lab.start_speaker(1);

    let owner = wait_for(
        "one node to announce the VIP",
        Duration::from_secs(20),
        || lab.announcer(),
    );
    let other = 1 - owner;
    // Both speakers agree: exactly one ARP reply on the data segment, from the owner's eth1.
    let owner_mac = lab.node_mac(owner, "eth1");
    let replies = wait_for(
        "an ARP reply on the data segment",
        Duration::from_secs(5),
        || {
            let r = ask_arp(&lab.client, "c0", CLIENT_IP);
            (!r.is_empty()).then_some(r)
        },
    );
    assert_eq!(replies.len(), 1, "one node answers: {replies:02x?}");
    assert_eq!(&replies[0][6..12], &owner_mac, "the elected node answers");
    // Not on the management segment, although the program runs on eth0 too.
    let on_mgmt = ask_arp(&lab.mgmt, "m0", Ipv4Addr::new(198, 18, 60, 254));
    assert!(
        on_mgmt.is_empty(),
        "answered on a segment not chosen: {on_mgmt:02x?}"
    );

    // Traffic to the VIP reaches the owner's own pod (policy Local), balanced in XDP.
    let expected = format!("pod-{}", ["a", "b"][owner]);
    let name = wait_for("an answer through the VIP", Duration::from_secs(10), || {
        ask_vip(&lab.client)
    });
    assert_eq!(name, expected);
    let event = wait_for("the nodeAssigned Event", Duration::from_secs(5), || {
        lab.api
            .list(EVENTS)
            .into_iter()
            .find(|e| e["reason"] == "nodeAssigned")
    });
    assert!(
        event["note"].as_str().unwrap().contains(&format!(
            "node {} announces 198.18.50.200 by L2 (ARP/NDP) on eth1",
            NAMES[owner]
        )),
        "{event}"
    );

    // The operator deletes the owner's Lease: the other node takes the IP over, and the owner
    // stops answering (its new Lease claims nothing).
    let first_mac = owner_mac;
    let second_mac = lab.node_mac(other, "eth1");
    let (took, answered) = takeover(&lab, second_mac, || {
        lab.api
            .delete(&format!("{LEASES}/sluice-speaker-{}", NAMES[owner]))
            .unwrap();
    });
    eprintln!(
        "L2 move on Lease deletion: gratuitous ARP from the new owner after {:.2} s; the first ARP request it alone answered was sent after {:.2} s (polled every ~0.5 s)",
        took.as_secs_f64(),
        answered.as_secs_f64()
    );
    wait_for(
        "the new owner's Lease to say so",
        Duration::from_secs(5),
        || lab.announces(other).then_some(()),
    );
    wait_for(
        "the old owner to be back, claiming nothing",
        Duration::from_secs(5),
        || {
            lab.api
                .get(&format!("{LEASES}/sluice-speaker-{}", NAMES[owner]))
                .filter(|_| !lab.announces(owner))
        },
    );
    let r = ask_arp(&lab.client, "c0", CLIENT_IP);
    assert!(
        r.len() == 1 && r[0][6..12] == second_mac,
        "one answer, from the new owner: {r:02x?}"
    );
    let name = wait_for(
        "an answer through the VIP after the move",
        Duration::from_secs(10),
        || ask_vip(&lab.client),
    );
    assert_eq!(name, format!("pod-{}", ["a", "b"][other]));

    // The new owner's speaker dies (SIGKILL: no goodbye): the first node takes the IP back.
    let victim = lab.speakers[other].take();
    let (took, answered) = takeover(&lab, first_mac, move || drop(victim));
    eprintln!(
        "L2 failover: gratuitous ARP from the new owner {:.2} s after the owner's speaker was killed; the first ARP request it alone answered was sent after {:.2} s (polled every ~0.5 s; lease 3 s)",
        took.as_secs_f64(),
        answered.as_secs_f64()
    );
    wait_for(
        "the first node's Lease to say so",
        Duration::from_secs(5),
        || lab.announces(owner).then_some(()),
    );
    let name = wait_for(
        "an answer through the VIP after failover",
        Duration::from_secs(10),
        || ask_vip(&lab.client),
    );
    assert_eq!(name, format!("pod-{}", ["a", "b"][owner]));
    lab.api.assert_rbac_allows_every_request("speaker");
}

#[test]
fn with_bird_as_the_router_both_nodes_announce_a_local_service_until_one_loses_its_endpoint() {
    let mut lab = lab();
    let router_ns = NetNs::new("router");
    veth(&router_ns, "r0", &lab.seg, "rt");
    lab.seg.ip(&["link", "set", "rt", "master", "br0"]);
    router_ns.ip(&["addr", "add", "198.18.50.254/24", "dev", "r0"]);
    let neighbors: Vec<Neighbor> = ["198.18.50.1", "198.18.50.2"]
        .iter()
        .map(|address| Neighbor {
            local: "198.18.50.254",
            router_as: 64512,
            address,
            peer_as: 64513,
            password: None,
        })
        .collect();
    let router = Router::start(&router_ns, "speaker", &neighbors);
    lab.objects("Local");
    let crds = "/apis/sluice.dev/v1alpha1/namespaces/sluice-system";
    lab.api
        .create(
            &format!("{crds}/bgppeers"),
            json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "BGPPeer", "metadata": {"name": "tor"},
                   "spec": {"peerAddress": "198.18.50.254", "peerASN": 64512, "myASN": 64513,
                            "connectTime": "1s"}}),
        )
        .unwrap();
    lab.api
        .create(
            &format!("{crds}/bgpadvertisements"),
            json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "BGPAdvertisement",
                   "metadata": {"name": "all"}, "spec": {}}),
        )
        .unwrap();
    lab.start_speaker(0);
    lab.start_speaker(1);
    let prefix = format!("{VIP}/32");
    router.wait_route(&prefix, Duration::from_secs(30), |t| {
        t.contains("via 198.18.50.1") && t.contains("via 198.18.50.2")
    });
    let metrics = wait_for(
        "the session on node-a's /metrics",
        Duration::from_secs(5),
        || {
            let (_, m) = http(&lab.nodes[0], "/metrics");
            m.contains("sluice_bgp_session_up{peer=\"198.18.50.254\"} 1")
                .then_some(m)
        },
    );
    assert!(
        metrics.contains("sluice_bgp_updates_sent_total"),
        "{metrics}"
    );
    let announced = wait_for("the announced Events", Duration::from_secs(5), || {
        let notes: Vec<String> = lab
            .api
            .list(EVENTS)
            .iter()
            .filter(|e| e["reason"] == "announced")
            .filter_map(|e| e["note"].as_str().map(String::from))
            .collect();
        (notes.len() == 2).then_some(notes)
    });
    assert!(
        announced
            .iter()
            .any(|n| n.contains("node node-b announces 198.18.50.200 by BGP to 198.18.50.254")),
        "{announced:?}"
    );

    // node-b's pod goes away: node-b withdraws, node-a keeps announcing.
    let removed = Instant::now();
    lab.api
        .patch(
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/web-abc",
            json!({"endpoints": [{"addresses": ["10.244.1.2"], "nodeName": "node-a", "conditions": {"ready": true}}]}),
        )
        .unwrap();
    router.wait_route(&prefix, Duration::from_secs(10), |t| {
        t.contains("via 198.18.50.1") && !t.contains("via 198.18.50.2")
    });
    wait_for(
        "node-b's Lease to say it announces nothing by BGP",
        Duration::from_secs(5),
        || {
            let l = lab.api.get(&format!("{LEASES}/sluice-speaker-node-b"))?;
            (l["metadata"]["annotations"]["sluice.dev/bgp-announcing"] == "").then_some(())
        },
    );
    let a = lab
        .api
        .get(&format!("{LEASES}/sluice-speaker-node-a"))
        .unwrap();
    assert_eq!(
        a["metadata"]["annotations"]["sluice.dev/bgp-announcing"],
        VIP.to_string()
    );
    eprintln!(
        "BGP: node-b's route withdrawn {:.2} s after its last local endpoint left the EndpointSlice",
        removed.elapsed().as_secs_f64()
    );
    let withdrawn = wait_for("the withdrawn Event", Duration::from_secs(5), || {
        lab.api
            .list(EVENTS)
            .into_iter()
            .find(|e| e["reason"] == "withdrawn")
    });
    assert!(
        withdrawn["note"]
            .as_str()
            .unwrap()
            .contains("node node-b withdrew 198.18.50.200"),
        "{withdrawn}"
    );
    // Traffic through the VIP still reaches a pod (node-a's).
    let name = wait_for("an answer through the VIP", Duration::from_secs(10), || {
        ask_vip(&lab.client)
    });
    assert_eq!(name, "pod-a");
    lab.api.assert_rbac_allows_every_request("speaker");
    drop(router);
}

/// GET on the speaker's metrics address inside its node namespace: (status code, body).
fn http(node: &NetNs, path: &'static str) -> (u16, String) {
    node.run(move || {
        sluice_tests::http_get(SocketAddr::from(([127, 0, 0, 1], 9465)), path).unwrap_or_default()
    })
}

fn readyz(node: &NetNs) -> (u16, String) {
    http(node, "/readyz")
}

#[test]
fn a_speaker_without_lease_permission_says_why_it_is_not_ready_announces_nothing_and_recovers() {
    let mut lab = lab();
    lab.objects_with("Cluster", &[VIP.to_string(), VIP6.to_string()]);
    lab.api.forbid("create", "leases");
    lab.api.forbid("update", "leases");
    lab.start_speaker(1);
    let why = wait_for("/readyz to say why", Duration::from_secs(10), || {
        let (code, body) = readyz(&lab.nodes[1]);
        (code == 503 && body.contains("Lease")).then_some(body)
    });
    assert!(
        why.contains("cannot write the Lease sluice-system/sluice-speaker-node-b")
            && why.contains(
                "RBAC: the speaker needs get, create and update on coordination.k8s.io leases"
            ),
        "{why}"
    );
    assert!(
        ask_arp(&lab.client, "c0", CLIENT_IP).is_empty(),
        "a node nobody sees alive answered"
    );
    lab.api.allow_all();
    wait_for(
        "the node to announce once allowed",
        Duration::from_secs(10),
        || {
            let r = ask_arp(&lab.client, "c0", CLIENT_IP);
            (r.len() == 1 && r[0][6..12] == lab.node_mac(1, "eth1")).then_some(())
        },
    );
    assert_eq!(readyz(&lab.nodes[1]).0, 200);
    // The Service's IPv6 address is answered by NDP, by the same node, on the same interface.
    let na = ask_ndp(&lab.client);
    assert_eq!(na.len(), 1, "one Neighbor Advertisement: {na:02x?}");
    assert_eq!(&na[0][6..12], &lab.node_mac(1, "eth1"));
}

/// Neighbor Advertisements for VIP6 to a solicitation sent from the client.
fn ask_ndp(client: &NetNs) -> Vec<Vec<u8>> {
    let my_mac = client.mac("c0");
    let me: std::net::Ipv6Addr = "fd53:50::100".parse().unwrap();
    client.run(move || {
        let sock = RawSocket::open("c0").unwrap();
        sock.send(&frames::neighbor_solicitation(my_mac, me, VIP6))
            .unwrap();
        sock.collect(Duration::from_millis(500), |f| {
            f.len() >= 78 && f[12..14] == [0x86, 0xdd] && f[54] == 136 && f[62..78] == VIP6.octets()
        })
    })
}

#[test]
fn the_controller_gives_a_new_service_its_ip_and_the_elected_speaker_serves_it() {
    let mut lab = lab();
    // As a user would: a Service with no status yet; the controller (in the API's namespace)
    // allocates, the speakers announce and balance.
    lab.objects_with("Local", &[]);
    let kubeconfig = format!("KUBECONFIG={}", lab.kubeconfig.display());
    let mut controller = lab.mgmt.spawn(&[
        "env",
        &kubeconfig,
        "RUST_LOG=info",
        &sluice_bin(),
        "controller",
        "--namespace",
        NS,
        "--identity",
        "controller-0",
        "--metrics-address",
        "127.0.0.1:9464",
    ]);
    controller.wait_for_stderr("controllerStarting");
    lab.start_speaker(0);
    lab.start_speaker(1);
    let ip = wait_for(
        "the controller to write the ingress IP",
        Duration::from_secs(20),
        || {
            let s = lab.api.get("/api/v1/namespaces/default/services/web")?;
            s["status"]["loadBalancer"]["ingress"][0]["ip"]
                .as_str()
                .map(String::from)
        },
    );
    assert_eq!(ip, VIP.to_string(), "the pool's first address");
    let owner = wait_for("one node to announce it", Duration::from_secs(20), || {
        lab.announcer()
    });
    let name = wait_for("an answer through the IP", Duration::from_secs(10), || {
        ask_vip(&lab.client)
    });
    assert_eq!(name, format!("pod-{}", ["a", "b"][owner]));
    let reasons: Vec<String> = lab
        .api
        .list(EVENTS)
        .iter()
        .filter_map(|e| e["reason"].as_str().map(String::from))
        .collect();
    assert!(
        reasons.contains(&"IPAllocated".to_string())
            && reasons.contains(&"nodeAssigned".to_string()),
        "{reasons:?}"
    );
    drop(controller);
}
