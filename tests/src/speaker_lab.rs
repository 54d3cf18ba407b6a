//! A lab for `sluice speaker` end to end: speaker processes as "nodes", each in its own network
//! namespace with its own interfaces, against the fake API server; real ARP, real TCP, real XDP.
//!
//! ```text
//!                       data segment (bridge br0 in `seg`)
//!   client [c0 198.18.50.100] ── br0 ── [eth1 198.18.50.1] node-a [pa 10.244.1.1] ── pod-a 10.244.1.2
//!                                 ├──── [eth1 198.18.50.2] node-b [pb 10.244.2.1] ── pod-b 10.244.2.2
//!                                 └──── [eth1 198.18.50.3] node-c ... (with three nodes)
//!                       management segment (bridge brm in `seg`)
//!   api [m0 198.18.60.254] ── brm ── [eth0 198.18.60.1] node-a
//!   (fake API server)         └───── [eth0 198.18.60.2] node-b
//! ```
//! The Service's IP 198.18.50.200 is announced on eth1 only (the L2Advertisement's interfaces),
//! although each speaker's program is attached to eth0 too. Each pod serves its name on TCP and
//! UDP 8080, and its name and the client's address as it sees it on TCP 8081. The Nodes'
//! InternalIPs are their data-segment addresses (where cluster-wide balancing tunnels to).

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{
    bird::{Neighbor, Router},
    fakeapi::FakeApi,
    frames::{self, Mac},
    lab::{napi_keeper, Conn},
    netns::{veth, NetNs, Process},
    rawsock::RawSocket,
    require_root, servers, sluice_bin,
};
use lb_userspace::dataplane::Dataplane;
use serde_json::{json, Value};

pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 50, 200);
pub const VIP6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd53, 0x50, 0, 0, 0, 0, 0, 0x200);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 50, 100);
pub const NS: &str = "sluice-system";
pub const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/sluice-system/leases";
pub const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

/// Fields drop in order: processes, programs, then namespaces.
pub struct Lab {
    pub speakers: Vec<Option<Process>>,
    /// Per node, a process that holds the node's mount namespace, and with it the bpffs the
    /// speakers pin into, across speaker restarts (as a host's /sys/fs/bpf would).
    holders: Vec<Option<Process>>,
    _keepers: Vec<Dataplane>,
    pub api: FakeApi,
    pub client: NetNs,
    pub mgmt: NetNs,
    pub nodes: Vec<NetNs>,
    _pods: Vec<NetNs>,
    pub seg: NetNs,
    pin_dirs: Vec<PathBuf>,
    pub kubeconfig: PathBuf,
    /// The mesh's shared secret, as the Secret would be mounted.
    pub mesh_secret: PathBuf,
    logs: Vec<PathBuf>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.speakers.clear();
        self.holders.clear();
        for dir in &self.pin_dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
        let _ = std::fs::remove_file(&self.kubeconfig);
        let _ = std::fs::remove_file(&self.mesh_secret);
        for node in &self.nodes {
            let status = self.status_path_of(&node.name);
            let _ = std::fs::remove_file(status.with_extension("mesh-peers.json"));
            let _ = std::fs::remove_file(status);
        }
        for log in &self.logs {
            if std::thread::panicking() || std::env::var_os("SLUICE_KEEP_LOGS").is_some() {
                eprintln!("speaker log kept: {}", log.display());
            } else {
                let _ = std::fs::remove_file(log);
            }
        }
    }
}

/// A lab of `count` nodes (1 to 4), each with one pod serving its name on port 8080.
pub fn lab(count: usize) -> Lab {
    assert!((1..=NAMES.len()).contains(&count));
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
    for (i, name) in ["a", "b", "c", "d"].iter().take(count).enumerate() {
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
        servers::spawn_peer_server(&pod, &format!("pod-{name}"), 8081);
        nodes.push(node);
        pods.push(pod);
    }
    let listener =
        mgmt.run(|| TcpListener::bind("198.18.60.254:0").expect("bind in the api namespace"));
    let api = FakeApi::serve(listener);
    // Unique per lab: tests run in parallel in one process.
    let kubeconfig = std::env::temp_dir().join(format!("{}.kubeconfig", mgmt.name));
    api.write_kubeconfig(&kubeconfig);
    let mesh_secret = std::env::temp_dir().join(format!("{}.mesh-secret", mgmt.name));
    std::fs::write(&mesh_secret, "a shared secret for this lab\n").expect("write the mesh secret");
    Lab {
        mesh_secret,
        speakers: (0..count).map(|_| None).collect(),
        holders: (0..count).map(|_| None).collect(),
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

pub const NAMES: [&str; 4] = ["node-a", "node-b", "node-c", "node-d"];

impl Lab {
    pub fn objects(&self, policy: &str) {
        self.objects_with(policy, &[VIP.to_string()]);
    }

    pub fn objects_with(&self, policy: &str, ips: &[String]) {
        self.cluster_with(policy, ips);
        self.pool();
        let api = &self.api;
        let crds = "/apis/sluice.dev/v1alpha1/namespaces/sluice-system";
        api.create(
            &format!("{crds}/l2advertisements"),
            json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "L2Advertisement",
                   "metadata": {"name": "data"}, "spec": {"interfaces": ["eth1"]}}),
        )
        .unwrap();
    }

    /// The IPAddressPool `lab`: 198.18.50.200/29 and fd53:50::200/125.
    pub fn pool(&self) {
        self.api
            .create(
                "/apis/sluice.dev/v1alpha1/namespaces/sluice-system/ipaddresspools",
                json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "IPAddressPool",
                       "metadata": {"name": "lab"}, "spec": {"addresses": ["198.18.50.200/29", "fd53:50::200/125"]}}),
            )
            .unwrap();
    }

    /// The cluster without Sluice's objects: namespaces, Ready nodes, the Service `web` (with
    /// `ips` in its status) and its EndpointSlice with a ready pod on every node.
    pub fn cluster_with(&self, policy: &str, ips: &[String]) {
        let ingress: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
        let api = &self.api;
        for ns in ["default", NS] {
            api.create("/api/v1/namespaces", json!({"metadata": {"name": ns}}))
                .unwrap();
        }
        let names = &NAMES[..self.nodes.len()];
        for (i, name) in names.iter().enumerate() {
            // Its InternalIPs: its addresses on the data segment (where tunnels go).
            let n = i + 1;
            api.create(
                "/api/v1/nodes",
                json!({"apiVersion": "v1", "kind": "Node",
                       "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
                       "status": {"conditions": [{"type": "Ready", "status": "True"}],
                                  "addresses": [
                                      {"type": "InternalIP", "address": format!("198.18.50.{n}")},
                                      {"type": "InternalIP", "address": format!("fd53:50::{n}")},
                                      {"type": "Hostname", "address": name}]}}),
            )
            .unwrap();
        }
        api.create(
            "/api/v1/namespaces/default/services",
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": "web"},
                   "spec": {"type": "LoadBalancer", "externalTrafficPolicy": policy,
                            "ports": [{"name": "tcp", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
                   "status": {"loadBalancer": {"ingress": ingress}}}),
        )
        .unwrap();
        let endpoints: Vec<Value> = names
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

    /// BIRD as the router on the data segment (198.18.50.254, AS 64512), peering with every
    /// node (AS 64513), and the BGPPeer and BGPAdvertisement that make the speakers peer with it
    /// and announce every service IP. The router's namespace comes with it.
    pub fn start_bird(&self, tag: &str) -> (Router, NetNs) {
        self.start_bird_with(tag, false)
    }

    /// [`Lab::start_bird`] with BFD on both sides: BIRD's `protocol bfd` (300 ms × 3) and a
    /// BFDProfile `fast` the BGPPeer names.
    pub fn start_bird_with_bfd(&self, tag: &str) -> (Router, NetNs) {
        self.start_bird_with(tag, true)
    }

    /// BIRD as in [`Lab::start_bird`], without Sluice's BGPPeer and BGPAdvertisement (the test
    /// writes its own).
    pub fn start_bird_router(&self, tag: &str) -> (Router, NetNs) {
        self.bird_router(tag, false)
    }

    /// BIRD in its namespace on the data segment, a neighbour per node, BFD on `r0` or not.
    fn bird_router(&self, tag: &str, bfd: bool) -> (Router, NetNs) {
        self.router_with(|ns, neighbors| {
            if bfd {
                Router::start_with_bfd(ns, tag, neighbors, "r0")
            } else {
                Router::start(ns, tag, neighbors)
            }
        })
    }

    /// The router's namespace on the data segment (198.18.50.254/24 on `r0`), BIRD started in
    /// it by `start` with a neighbour per node (AS 64512 here, 64513 on the nodes).
    fn router_with(&self, start: impl FnOnce(&NetNs, &[Neighbor]) -> Router) -> (Router, NetNs) {
        let ns = NetNs::new("router");
        veth(&ns, "r0", &self.seg, "rt");
        self.seg.ip(&["link", "set", "rt", "master", "br0"]);
        ns.ip(&["addr", "add", "198.18.50.254/24", "dev", "r0"]);
        let addresses: Vec<String> = (1..=self.nodes.len())
            .map(|n| format!("198.18.50.{n}"))
            .collect();
        let neighbors: Vec<Neighbor> = addresses
            .iter()
            .map(|address| Neighbor {
                local: "198.18.50.254",
                router_as: 64512,
                address,
                peer_as: 64513,
                password: None,
            })
            .collect();
        let router = start(&ns, &neighbors);
        (router, ns)
    }

    /// Starts `sluice controller` against the fake API (in the API's namespace) and waits until
    /// it runs.
    pub fn start_controller(&self) -> Process {
        let kubeconfig = format!("KUBECONFIG={}", self.kubeconfig.display());
        let mut controller = self.mgmt.spawn(&[
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
        controller
    }

    fn start_bird_with(&self, tag: &str, bfd: bool) -> (Router, NetNs) {
        let (router, ns) = self.bird_router(tag, bfd);
        self.bgp_objects(bfd);
        (router, ns)
    }

    /// BIRD as in [`Lab::start_bird`], installing what it learns into its kernel as multipath
    /// routes (ECMP, hashed on the 5-tuple), with the client `far` behind it (198.18.70.100,
    /// the router 198.18.70.1): its flows to the VIP are spread over the nodes that announce
    /// it. Every node routes 198.18.70.0/24 through the router (replies leave straight from
    /// the pod's node). Returns the router, its namespace and the far client's.
    pub fn start_bird_ecmp(&self, tag: &str) -> (Router, NetNs, NetNs) {
        let (router, ns) = self.router_with(|ns, neighbors| Router::start_ecmp(ns, tag, neighbors));
        ns.exec(&["sysctl", "-qw", "net.ipv4.conf.all.forwarding=1"]);
        ns.exec(&["sysctl", "-qw", "net.ipv4.fib_multipath_hash_policy=1"]);
        let far = NetNs::new("far");
        veth(&ns, "r1", &far, "f0");
        ns.ip(&["addr", "add", "198.18.70.1/24", "dev", "r1"]);
        far.ip(&["addr", "add", "198.18.70.100/24", "dev", "f0"]);
        far.ip(&["route", "add", "default", "via", "198.18.70.1"]);
        // Whole checksums, as on a wire: a veth hands a partial one along, which the XDP
        // program's redirect does not carry over.
        far.exec(&["ethtool", "-K", "f0", "tx", "off"]);
        for node in &self.nodes {
            node.ip(&["route", "add", "198.18.70.0/24", "via", "198.18.50.254"]);
        }
        self.bgp_objects(false);
        (router, ns, far)
    }

    /// kube-proxy's work for the Service `web` (port 80) of policy Cluster, done the way it
    /// does it, in every node: a random pod among `pods` (iptables DNAT with `statistic`),
    /// traffic to another node's pod masqueraded, and a route to each node's pod subnet (a
    /// CNI's). What Services of policy Cluster get without cluster-wide balancing.
    pub fn emulate_kube_proxy(&self, pods: &[usize]) {
        for (i, node) in self.nodes.iter().enumerate() {
            for (j, _) in self.nodes.iter().enumerate().filter(|(j, _)| *j != i) {
                node.ip(&[
                    "route",
                    "add",
                    &format!("10.244.{}.0/24", j + 1),
                    "via",
                    &format!("198.18.50.{}", j + 1),
                ]);
            }
            let ipt = |args: &[&str]| {
                let mut cmd = vec!["iptables", "-w", "-t", "nat"];
                cmd.extend_from_slice(args);
                node.exec(&cmd);
            };
            ipt(&["-N", "WEB"]);
            ipt(&[
                "-A",
                "PREROUTING",
                "-d",
                &VIP.to_string(),
                "-p",
                "tcp",
                "--dport",
                "80",
                "-j",
                "WEB",
            ]);
            for (k, pod) in pods.iter().enumerate() {
                let to = format!("10.244.{}.2:8080", pod + 1);
                let left = pods.len() - k;
                if left > 1 {
                    let p = format!("{:.5}", 1.0 / left as f64);
                    ipt(&[
                        "-A",
                        "WEB",
                        "-p",
                        "tcp",
                        "-m",
                        "statistic",
                        "--mode",
                        "random",
                        "--probability",
                        &p,
                        "-j",
                        "DNAT",
                        "--to-destination",
                        &to,
                    ]);
                } else {
                    ipt(&[
                        "-A",
                        "WEB",
                        "-p",
                        "tcp",
                        "-j",
                        "DNAT",
                        "--to-destination",
                        &to,
                    ]);
                }
            }
            ipt(&[
                "-A",
                "POSTROUTING",
                "-d",
                "10.244.0.0/16",
                "-o",
                "eth1",
                "-j",
                "MASQUERADE",
            ]);
        }
    }

    /// The BGPPeer `tor` (the router, 198.18.50.254, AS 64512; this side AS 64513) and the
    /// BGPAdvertisement `all`; with BFD, the BFDProfile `fast` the peer names.
    fn bgp_objects(&self, bfd: bool) {
        let crds = "/apis/sluice.dev/v1alpha1/namespaces/sluice-system";
        let mut spec = json!({"peerAddress": "198.18.50.254", "peerASN": 64512, "myASN": 64513,
                              "connectTime": "1s"});
        if bfd {
            spec["bfdProfile"] = json!("fast");
            self.api
                .create(
                    &format!("{crds}/bfdprofiles"),
                    json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "BFDProfile",
                           "metadata": {"name": "fast"},
                           "spec": {"receiveInterval": 300, "transmitInterval": 300, "detectMultiplier": 3}}),
                )
                .unwrap();
        }
        self.api
            .create(
                &format!("{crds}/bgppeers"),
                json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "BGPPeer", "metadata": {"name": "tor"},
                       "spec": spec}),
            )
            .unwrap();
        self.api
            .create(
                &format!("{crds}/bgpadvertisements"),
                json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "BGPAdvertisement",
                       "metadata": {"name": "all"}, "spec": {}}),
            )
            .unwrap();
    }

    /// Waits until node i alone answers ARP for the VIP.
    pub fn wait_answered_by(&self, i: usize, within: Duration) {
        let mac = self.node_mac(i, "eth1");
        wait_for(
            &format!("{} alone to answer ARP for the VIP", NAMES[i]),
            within,
            || (arp_answerers(self, Duration::from_millis(300)) == [mac]).then_some(()),
        );
    }

    /// Starts node i's speaker with liveness from the Leases alone (no mesh), 3 s Leases.
    pub fn start_speaker(&mut self, i: usize) {
        self.start_speaker_with(i, &["--no-mesh", "--lease-duration", "3"]);
    }

    /// Starts node i's speaker in the mesh, which runs over the management segment
    /// (198.18.60.N:7947), with Leases of `lease_duration` seconds and the default failure
    /// timeout, then `extra`.
    pub fn start_mesh_speaker(&mut self, i: usize, lease_duration: &str, extra: &[&str]) {
        let secret = self.mesh_secret.to_str().unwrap().to_string();
        let address = format!("198.18.60.{}", i + 1);
        let mut args = vec![
            "--mesh-secret-file",
            &secret,
            "--mesh-address",
            &address,
            "--lease-duration",
            lease_duration,
        ];
        args.extend_from_slice(extra);
        self.start_speaker_with(i, &args);
    }

    /// `sluice inspect --json --flows 1000` on node i, as an operator runs it there (its
    /// speaker's status file and pinned maps).
    pub fn inspect(&self, i: usize) -> Value {
        let status = self.status_path_of(&self.nodes[i].name);
        let pin_dir = self.pin_dir(i);
        self.speakers[i]
            .as_ref()
            .expect("a running speaker")
            .inspect_json_with(
                &sluice_bin(),
                &[
                    "--status-file",
                    status.to_str().unwrap(),
                    "--pin-dir",
                    pin_dir.to_str().unwrap(),
                    "--flows",
                    "1000",
                ],
            )
    }

    fn status_path_of(&self, node: &str) -> PathBuf {
        std::env::temp_dir().join(format!("{node}.status.json"))
    }

    /// The status node i's speaker last wrote (mesh members, BGP sessions), `Null` if none.
    pub fn status(&self, i: usize) -> Value {
        std::fs::read_to_string(self.status_path_of(&self.nodes[i].name))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null)
    }

    /// Waits until every node's mesh counts every other node alive.
    pub fn wait_mesh_whole(&self) {
        let n = self.nodes.len();
        wait_for("the mesh to be whole", Duration::from_secs(20), || {
            (0..n).all(|i| self.mesh_alive(i) == n - 1).then_some(())
        });
    }

    /// Restarts node i's speaker as a rolling update does: SIGTERM (a clean exit), `pause`,
    /// then a new speaker with `lease_duration` and `extra`; returns once the mesh is whole.
    pub fn restart_mesh_speaker(
        &mut self,
        i: usize,
        pause: Duration,
        lease_duration: &str,
        extra: &[&str],
    ) {
        let old = self.speakers[i].take().expect("a running speaker");
        let status = old.stop(libc::SIGTERM);
        assert!(status.success(), "{}: {status}", NAMES[i]);
        std::thread::sleep(pause);
        self.start_mesh_speaker(i, lease_duration, extra);
        self.wait_mesh_whole();
    }

    /// How many other speakers node i's mesh counts alive.
    pub fn mesh_alive(&self, i: usize) -> usize {
        self.status(i)["mesh"]["members"]
            .as_array()
            .map(|m| m.iter().filter(|m| m["countedAlive"] == true).count())
            .unwrap_or(0)
    }

    /// Node i's pin directory.
    pub fn pin_dir(&self, i: usize) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/{}", self.nodes[i].name))
    }

    /// Starts node i's speaker with `extra` arguments after the lab's own.
    pub fn start_speaker_with(&mut self, i: usize, extra: &[&str]) {
        let pin_dir = self.pin_dir(i);
        if !self.pin_dirs.contains(&pin_dir) {
            self.pin_dirs.push(pin_dir.clone());
        }
        let kubeconfig = format!("KUBECONFIG={}", self.kubeconfig.display());
        let status = self.status_path_of(&self.nodes[i].name);
        let status = status.to_str().unwrap().to_string();
        let bin = sluice_bin();
        let mut args = vec![
            "env",
            &kubeconfig,
            "RUST_LOG=info",
            &bin,
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
            "--resync-seconds",
            "1",
            "--metrics-address",
            "127.0.0.1:9465",
            "--status-file",
            &status,
        ];
        args.extend_from_slice(extra);
        if self.holders[i].is_none() {
            let mut holder =
                self.nodes[i].spawn(&["sh", "-c", "echo holding >&2; exec sleep 3600"]);
            holder.wait_for_stderr("holding");
            self.holders[i] = Some(holder);
        }
        let target = self.holders[i].as_ref().unwrap().pid().to_string();
        let mut command = vec!["nsenter", "--target", &target, "--mount", "--net"];
        command.extend_from_slice(&args);
        let mut p = crate::netns::spawn_command(&command);
        let runs = self
            .logs
            .iter()
            .filter(|l| l.to_string_lossy().contains(&self.nodes[i].name))
            .count();
        let log = std::env::temp_dir().join(format!("{}.{runs}.log", self.nodes[i].name));
        self.logs.push(log.clone());
        p.wait_for_stderr_then_log("speakerStarting", Some(log));
        self.speakers[i] = Some(p);
    }

    /// The log of node i's latest speaker.
    pub fn log_of(&self, i: usize) -> Option<PathBuf> {
        self.logs
            .iter()
            .rev()
            .find(|l| l.to_string_lossy().contains(&self.nodes[i].name))
            .cloned()
    }

    /// Does node i's Lease say it answers for the VIP?
    pub fn announces(&self, i: usize) -> bool {
        self.api
            .get(&format!("{LEASES}/sluice-speaker-{}", NAMES[i]))
            .and_then(|l| {
                l["metadata"]["annotations"]["sluice.dev/announcing"]
                    .as_str()
                    .map(String::from)
            })
            .is_some_and(|a| a.split(',').any(|ip| ip == VIP.to_string()))
    }

    /// Which node's Lease says it answers for the VIP (while the others are alive).
    pub fn announcer(&self) -> Option<usize> {
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

    pub fn node_mac(&self, i: usize, ifname: &str) -> Mac {
        self.nodes[i].mac(ifname)
    }
}

/// ARP replies for the VIP sent to this asker (gratuitous ARPs, broadcast, are not answers).
pub fn ask_arp(ns: &NetNs, ifname: &'static str, sender: Ipv4Addr) -> Vec<Vec<u8>> {
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
pub fn takeover(lab: &Lab, new_mac: Mac, act: impl FnOnce()) -> (Duration, Duration) {
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

/// What one failover took, from the act that caused it.
#[derive(Debug, Clone, Copy)]
pub struct Failover {
    /// The node that took the VIP.
    pub winner: usize,
    /// Until the client's segment saw the winner's gratuitous ARP.
    pub garp: Duration,
    /// Until a new TCP connection through the VIP was answered by the winner's pod.
    pub connected: Duration,
}

/// Does `act`, then waits for one of `candidates` to send a gratuitous ARP for the VIP, and for
/// a new TCP connection from the client through the VIP to be answered by its pod.
pub fn failover(lab: &Lab, candidates: &[usize], act: impl FnOnce()) -> Failover {
    let macs: Vec<(usize, Mac)> = candidates
        .iter()
        .map(|&i| (i, lab.node_mac(i, "eth1")))
        .collect();
    std::thread::scope(|scope| {
        let listener = {
            let macs = macs.clone();
            let client = &lab.client;
            scope.spawn(move || {
                client.run(move || {
                    let sock = RawSocket::open("c0").unwrap();
                    sock.first(Duration::from_secs(20), |f| {
                        f.len() >= 42
                            && f[12..14] == [0x08, 0x06]
                            && f[28..32] == VIP.octets()
                            && f[38..42] == VIP.octets()
                            && macs.iter().any(|(_, m)| f[22..28] == *m)
                    })
                })
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        let start = Instant::now();
        act();
        let (at, frame) = listener
            .join()
            .unwrap()
            .expect("no gratuitous ARP from another node within 20 s");
        let winner = macs
            .iter()
            .find(|(_, m)| frame[22..28] == *m)
            .map(|(i, _)| *i)
            .unwrap();
        let pod = format!("pod-{}", ["a", "b", "c"][winner]);
        let connected = wait_for(
            "a connection through the VIP answered by the new owner's pod",
            Duration::from_secs(20),
            || {
                let answered = Conn::open_within(
                    &lab.client,
                    SocketAddr::from((VIP, 80)),
                    Duration::from_millis(300),
                )
                .and_then(|mut c| c.ask())
                .ok()?;
                (answered == pod).then(Instant::now)
            },
        );
        Failover {
            winner,
            garp: at - start,
            connected: connected - start,
        }
    })
}

/// The MACs that answer an ARP request for the VIP from the client within `within`.
pub fn arp_answerers(lab: &Lab, within: Duration) -> Vec<Mac> {
    let my_mac = lab.client.mac("c0");
    lab.client.run(move || {
        let sock = RawSocket::open("c0").unwrap();
        sock.send(&frames::arp_request(my_mac, CLIENT_IP, VIP))
            .unwrap();
        sock.collect(within, |f| {
            f.len() >= 42
                && f[12..14] == [0x08, 0x06]
                && f[20..22] == [0, 2]
                && f[28..32] == VIP.octets()
                && f[0..6] == my_mac
        })
        .into_iter()
        .map(|f| {
            let mut mac = [0u8; 6];
            mac.copy_from_slice(&f[6..12]);
            mac
        })
        .collect()
    })
}

/// A lab of `nodes` speakers in the mesh, Leases of `lease` seconds, a Local service with a pod
/// on every node; returns it once the mesh has formed, with the VIP's owner.
pub fn mesh_lab(nodes: usize, lease: &str) -> (Lab, usize) {
    mesh_lab_with(nodes, lease, &[], |_| {})
}

/// [`mesh_lab`], the speakers started with `extra` arguments, and `before` run once the objects
/// exist and before the speakers start.
pub fn mesh_lab_with(
    nodes: usize,
    lease: &str,
    extra: &[&str],
    before: impl FnOnce(&Lab),
) -> (Lab, usize) {
    let mut lab = lab(nodes);
    lab.objects("Local");
    before(&lab);
    for i in 0..nodes {
        lab.start_mesh_speaker(i, lease, extra);
    }
    lab.wait_mesh_whole();
    let owner = wait_for(
        "one node to announce the VIP",
        Duration::from_secs(20),
        || lab.announcer(),
    );
    wait_for(
        "the owner alone to answer ARP",
        Duration::from_secs(10),
        || {
            (arp_answerers(&lab, Duration::from_millis(300)) == [lab.node_mac(owner, "eth1")])
                .then_some(())
        },
    );
    (lab, owner)
}

pub fn others(lab: &Lab, but: usize) -> Vec<usize> {
    (0..lab.nodes.len()).filter(|&i| i != but).collect()
}

/// Polls ARP for the VIP every ~150 ms for `during`: the polls not answered by `mac` alone.
pub fn answers_lost(lab: &Lab, mac: [u8; 6], during: Duration) -> (usize, usize) {
    let end = Instant::now() + during;
    let (mut polls, mut lost) = (0, 0);
    while Instant::now() < end {
        polls += 1;
        if arp_answerers(lab, Duration::from_millis(150)) != [mac] {
            lost += 1;
        }
    }
    (polls, lost)
}

pub fn wait_for<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn ask_vip(client: &NetNs) -> Option<String> {
    Conn::open(client, SocketAddr::from((VIP, 80)))
        .and_then(|mut c| c.ask())
        .ok()
}
