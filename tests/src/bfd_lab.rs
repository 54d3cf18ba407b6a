//! A BGP router with BFD (BIRD's `protocol bfd`, or FRR's bgpd + bfdd + zebra) and one Sluice
//! node (`sluice run`) behind a switch, with a backend behind the node and a steady UDP flow from
//! the router to the service: what `tests/tests/bfd_interop.rs` and `cargo xtask soak bfd` use.
//!
//! ```text
//! router [r1 198.18.179.1] ── switch (bridge: s1, s2) ── [n1 198.18.179.2] node [n2 198.18.200.1] ── [b0 198.18.200.2] backend
//! ```
//!
//! The switch lets a test cut the node's link without the router seeing its own link go down,
//! as a failed node or cable behind a real switch looks. [`BfdLab::new_multihop`] makes the
//! switch a router instead (r1 198.18.178.1 ── 198.18.178.2 hop 198.18.179.1 ── n1), for eBGP
//! multi-hop and multi-hop BFD (RFC 5883). The node's mount namespace is held by a
//! process of its own, so the pinned data plane outlives a `sluice run` that restarts.

use std::{
    net::UdpSocket,
    path::PathBuf,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crate::{
    netns::{spawn_command, veth, NetNs, Process},
    sluice_bin,
};

pub const VIP: &str = "198.51.100.10";
pub const PORT: u16 = 9000;
pub const NODE: &str = "198.18.179.2";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterKind {
    Bird,
    Frr,
}

pub struct BfdLab {
    pub kind: RouterKind,
    /// The router's address on the BGP session.
    pub router_ip: &'static str,
    /// The next hop the router's kernel route to the service goes through.
    next_hop: &'static str,
    /// The node's address on the BGP session (as the router shows its BFD session).
    node_ip: &'static str,
    /// The service's prefix the router learns.
    prefix: &'static str,
    pub node_proc: Option<Process>,
    _router: Vec<Process>,
    holder: Process,
    pub dir: PathBuf,
    config: PathBuf,
    pub backend: NetNs,
    pub node: NetNs,
    pub switch: NetNs,
    pub router: NetNs,
}

impl Drop for BfdLab {
    fn drop(&mut self) {
        self.node_proc = None;
        self._router.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How the router reaches the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Switched,
    RoutedHop,
    SwitchedIpv6,
}

fn bird_conf(interval_ms: u32, bfd: bool, shape: Shape) -> String {
    let multihop = shape == Shape::RoutedHop;
    let v6 = shape == Shape::SwitchedIpv6;
    let timers = format!(
        "min rx interval {interval_ms} ms; min tx interval {interval_ms} ms; multiplier 3;"
    );
    let (local, hop) = if multihop {
        (
            "198.18.178.1",
            "protocol static {{ ipv4; route 198.18.179.0/24 via 198.18.178.2; }}\n"
                .replace("{{", "{")
                .replace("}}", "}"),
        )
    } else {
        ("198.18.179.1", String::new())
    };
    let multihop_bgp = if multihop { "  multihop 2;\n" } else { "" };
    let (router_id, local, neighbor, channel) = if v6 {
        ("198.18.179.1", "fd53:179::1", "fd53:179::2", "ipv6")
    } else {
        (local, local, NODE, "ipv4")
    };
    format!(
        "log stderr all;
router id {router_id};
protocol device {{ scan time 10; }}
protocol direct {{ ipv4; ipv6; }}
protocol kernel kernel4 {{ ipv4 {{ export all; }}; }}
protocol kernel kernel6 {{ ipv6 {{ export all; }}; }}
{hop}protocol bfd {{
  interface \"r1\" {{ {timers} }};
  multihop {{ {timers} }};
}}
protocol bgp speaker {{
  local {local} as 64500;
  neighbor {neighbor} as 64512;
{multihop_bgp}
  hold time 9; keepalive time 3;
  connect delay time 1; connect retry time 1; error wait time 1, 5;
  graceful restart on;
  bfd {bfd};
  {channel} {{ import all; export none; }};
}}
",
        bfd = if bfd { "on" } else { "off" }
    )
}

fn frr_confs(interval_ms: u32, bfd: bool, graceful_restart: bool) -> [(&'static str, String); 4] {
    let mut bfd = if bfd {
        format!(" neighbor {NODE} bfd\n neighbor {NODE} bfd profile fast\n")
    } else {
        String::new()
    };
    if !graceful_restart {
        bfd.push_str(&format!(" neighbor {NODE} graceful-restart-disable\n"));
    }
    [
        ("vtysh.conf", String::new()),
        ("zebra.conf", "hostname router\n".into()),
        (
            "bfdd.conf",
            format!(
                "bfd\n profile fast\n  receive-interval {interval_ms}\n  transmit-interval {interval_ms}\n  detect-multiplier 3\n !\n!\n"
            ),
        ),
        (
            "bgpd.conf",
            format!(
                "frr defaults traditional
hostname router
log stdout informational
router bgp 64500
 bgp router-id 198.18.179.1
 no bgp ebgp-requires-policy
 no bgp default ipv4-unicast
 bgp graceful-restart
 neighbor {NODE} remote-as 64512
 neighbor {NODE} timers 3 9
 neighbor {NODE} timers connect 1
{bfd} address-family ipv4 unicast
  neighbor {NODE} activate
 exit-address-family
"
            ),
        ),
    ]
}

impl BfdLab {
    /// Builds the namespaces, starts the router and the node; BFD at `interval_ms` × 3 on both
    /// sides. Waits until the router has the service's route and BFD is up.
    pub fn new(kind: RouterKind, interval_ms: u32) -> BfdLab {
        Self::new_with(kind, interval_ms, true)
    }

    /// [`BfdLab::new`], with BFD configured on both sides or on neither (a baseline).
    pub fn new_with(kind: RouterKind, interval_ms: u32, bfd: bool) -> BfdLab {
        Self::build(kind, interval_ms, bfd, Shape::Switched, true)
    }

    /// FRR with its graceful-restart helper off for the node (`neighbor … graceful-restart-disable`).
    pub fn new_frr_without_graceful_restart(interval_ms: u32) -> BfdLab {
        Self::build(RouterKind::Frr, interval_ms, true, Shape::Switched, false)
    }

    /// BIRD one routed hop away: eBGP multi-hop and multi-hop BFD (UDP 4784, RFC 5883).
    pub fn new_multihop(interval_ms: u32) -> BfdLab {
        Self::build(RouterKind::Bird, interval_ms, true, Shape::RoutedHop, true)
    }

    /// BIRD over IPv6 (fd53:179::1 ── fd53:179::2), announcing the service's /128.
    pub fn new_ipv6(interval_ms: u32) -> BfdLab {
        Self::build(
            RouterKind::Bird,
            interval_ms,
            true,
            Shape::SwitchedIpv6,
            true,
        )
    }

    fn build(
        kind: RouterKind,
        interval_ms: u32,
        bfd: bool,
        shape: Shape,
        graceful_restart: bool,
    ) -> BfdLab {
        let multihop = shape == Shape::RoutedHop;
        let v6 = shape == Shape::SwitchedIpv6;
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sluice-bfd-{}-{kind:?}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let router = NetNs::new("rtr");
        let switch = NetNs::new("sw");
        let node = NetNs::new("node");
        let backend = NetNs::new("be");
        veth(&router, "r1", &switch, "s1");
        veth(&switch, "s2", &node, "n1");
        veth(&node, "n2", &backend, "b0");
        let router_ip = if multihop {
            switch.ip(&["addr", "add", "198.18.178.2/24", "dev", "s1"]);
            switch.ip(&["addr", "add", "198.18.179.1/24", "dev", "s2"]);
            for port in ["s1", "s2"] {
                switch.ip(&["link", "set", port, "up"]);
            }
            switch.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            router.ip(&["addr", "add", "198.18.178.1/24", "dev", "r1"]);
            router.ip(&["link", "set", "r1", "up"]);
            router.ip(&["route", "add", "198.18.179.0/24", "via", "198.18.178.2"]);
            "198.18.178.1"
        } else {
            switch.ip(&["link", "add", "br0", "type", "bridge"]);
            for port in ["s1", "s2"] {
                switch.ip(&["link", "set", port, "master", "br0"]);
                switch.ip(&["link", "set", port, "up"]);
            }
            switch.ip(&["link", "set", "br0", "up"]);
            router.ip(&["addr", "add", "198.18.179.1/24", "dev", "r1"]);
            router.ip(&["link", "set", "r1", "up"]);
            "198.18.179.1"
        };
        node.ip(&["addr", "add", "198.18.179.2/24", "dev", "n1"]);
        node.ip(&["addr", "add", "198.18.200.1/24", "dev", "n2"]);
        node.ip(&["link", "set", "n1", "up"]);
        node.ip(&["link", "set", "n2", "up"]);
        if multihop {
            node.ip(&["route", "add", "198.18.178.0/24", "via", "198.18.179.1"]);
        }
        if v6 {
            router.ip(&["addr", "add", "fd53:179::1/64", "dev", "r1", "nodad"]);
            node.ip(&["addr", "add", "fd53:179::2/64", "dev", "n1", "nodad"]);
            node.ip(&["addr", "add", "fd53:200::1/64", "dev", "n2", "nodad"]);
            backend.ip(&["addr", "add", "fd53:200::2/64", "dev", "b0", "nodad"]);
            node.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
        }
        node.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        backend.ip(&["addr", "add", "198.18.200.2/24", "dev", "b0"]);
        backend.ip(&["link", "set", "b0", "up"]);
        backend.ip(&["route", "add", "default", "via", "198.18.200.1"]);

        let router_procs = match kind {
            RouterKind::Bird => {
                let conf = dir.join("bird.conf");
                std::fs::write(&conf, bird_conf(interval_ms, bfd, shape)).unwrap();
                let socket = dir.join("bird.ctl");
                let log = dir.join("bird.log");
                let p = router.spawn(&[
                    "sh",
                    "-c",
                    &format!(
                        "exec bird -f -c {} -s {} > {} 2>&1",
                        conf.display(),
                        socket.display(),
                        log.display()
                    ),
                ]);
                vec![p]
            }
            RouterKind::Frr => {
                let frr = dir.join("frr");
                std::fs::create_dir_all(&frr).unwrap();
                for (name, text) in frr_confs(interval_ms, bfd, graceful_restart) {
                    std::fs::write(frr.join(name), text).unwrap();
                }
                Command::new("chown")
                    .args(["-R", "frr:frr", frr.to_str().unwrap()])
                    .status()
                    .expect("chown (FRR runs as the frr user)");
                Command::new("chmod")
                    .args(["755", dir.to_str().unwrap(), frr.to_str().unwrap()])
                    .status()
                    .unwrap();
                let f = frr.display().to_string();
                let daemon = |name: &str, extra: &str| {
                    router.spawn(&[
                        "sh",
                        "-c",
                        &format!(
                            "exec /usr/lib/frr/{name} -f {f}/{name}.conf -i {f}/{name}.pid --vty_socket {f} \
                             -z {f}/zserv.api -u frr -g frr {extra} > {f}/{name}.log 2>&1"
                        ),
                    ])
                };
                let zebra = daemon("zebra", "");
                let deadline = Instant::now() + Duration::from_secs(10);
                while !frr.join("zserv.api").exists() {
                    assert!(Instant::now() < deadline, "FRR zebra did not start");
                    std::thread::sleep(Duration::from_millis(20));
                }
                let bfdd = daemon("bfdd", &format!("--bfdctl {f}/bfdd.sock"));
                let bgpd = daemon("bgpd", "-P 0");
                vec![zebra, bfdd, bgpd]
            }
        };
        let config = dir.join("node.yaml");
        std::fs::write(
            &config,
            format!(
                "dataplane:
  interfaces: [n1]
  maglevTableSize: 1009
  stateFile: {state}
  metricsAddress: 127.0.0.1:9120
pools:
- {{name: bgp, addresses: [{VIP}/32, \"2001:db8::10/128\"]}}
services:
- {{name: sink, ports: [{{port: {PORT}, protocol: UDP}}], backends: [{{ip: 198.18.200.2}}]}}
- {{name: sink6, ports: [{{port: {PORT}, protocol: UDP}}], backends: [{{ip: \"fd53:200::2\"}}]}}
bfdProfiles:
- {{name: fast, receiveInterval: {interval_ms}, transmitInterval: {interval_ms}, detectMultiplier: 3{min_ttl}}}
peers:
- peerAddress: \"{peer_address}\"
  ebgpMultiHop: {multihop}
  peerASN: 64500
  myASN: 64512
  holdTime: 9s
  connectTime: 1s
{peer_bfd}bgpAdvertisements:
- {{ipAddressPools: [bgp]}}
",
                state = dir.join("allocations.json").display(),
                peer_bfd = if bfd { "  bfdProfile: fast\n" } else { "" },
                peer_address = if v6 { "fd53:179::1" } else { router_ip },
                // BIRD sends multi-hop BFD with the system's default TTL (64), not 255.
                min_ttl = if multihop { ", minimumTtl: 60" } else { "" },
            ),
        )
        .unwrap();
        let mut holder = node.spawn(&["sh", "-c", "echo holding >&2; exec sleep 3600"]);
        holder.wait_for_stderr("holding");
        let mut lab = BfdLab {
            kind,
            router_ip,
            next_hop: match shape {
                Shape::Switched => NODE,
                Shape::RoutedHop => "198.18.178.2",
                Shape::SwitchedIpv6 => "fd53:179::2",
            },
            node_ip: if v6 { "fd53:179::2" } else { NODE },
            prefix: if v6 {
                "2001:db8::10/128"
            } else {
                "198.51.100.10/32"
            },
            node_proc: None,
            _router: router_procs,
            holder,
            dir,
            config,
            backend,
            node,
            switch,
            router,
        };
        lab.start_node();
        lab.wait_route(true, Duration::from_secs(60));
        if bfd {
            lab.wait_bfd_up(Duration::from_secs(30));
        }
        lab
    }

    /// Starts `sluice run` in the node (its mount namespace held across restarts).
    pub fn start_node(&mut self) {
        let bin = sluice_bin();
        let target = self.holder.pid().to_string();
        let log = self.dir.join("node.log");
        let mut p = spawn_command(&[
            "nsenter",
            "--target",
            &target,
            "--mount",
            "--net",
            &bin,
            "run",
            "--config",
            self.config.to_str().unwrap(),
        ]);
        p.wait_for_stderr_then_log("ready", Some(log));
        self.node_proc = Some(p);
    }

    /// Rewrites the node's config file (`sluice run` reloads it when it changes).
    pub fn edit_config(&self, edit: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let new = edit(text.clone());
        assert_ne!(new, text, "the test's edit changes the file");
        std::fs::write(&self.config, new).unwrap();
    }

    /// The router's line for its BFD session with the node.
    pub fn router_bfd_line(&self) -> String {
        let text = match self.kind {
            RouterKind::Bird => self.birdc("show bfd sessions"),
            RouterKind::Frr => self.vtysh("show bfd peers brief"),
        };
        text.lines()
            .find(|l| l.contains(self.node_ip))
            .unwrap_or_default()
            .to_string()
    }

    /// Sends `signal` to `sluice run` and waits for it to end.
    pub fn stop_node(&mut self, signal: i32) {
        if let Some(p) = self.node_proc.take() {
            p.stop(signal);
        }
    }

    /// Cuts (or restores) the node's port on the switch: the router's own link stays up.
    pub fn set_link(&self, up: bool) {
        self.switch
            .ip(&["link", "set", "s2", if up { "up" } else { "down" }]);
    }

    fn vtysh(&self, command: &str) -> String {
        let f = self.dir.join("frr");
        let out =
            self.router
                .exec_output(&["vtysh", "--vty_socket", f.to_str().unwrap(), "-c", command]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn birdc(&self, command: &str) -> String {
        let out = Command::new("birdc")
            .args(["-s", self.dir.join("bird.ctl").to_str().unwrap(), command])
            .output()
            .expect("birdc (cargo xtask setup installs bird2)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The router forwards to the service through the node (its kernel FIB, which both
    /// routers program from BGP).
    pub fn route_present(&self) -> bool {
        let out =
            self.router
                .exec_output(&["ip", family(self.prefix), "route", "show", self.prefix]);
        String::from_utf8_lossy(&out.stdout).contains(self.next_hop)
    }

    /// Polls until the route is (or is not) there; how long that took.
    pub fn wait_route(&self, present: bool, within: Duration) -> Duration {
        let start = Instant::now();
        while self.route_present() != present {
            assert!(
                start.elapsed() < within,
                "{:?}: the route to {} never became {}:\n{}{}",
                self.kind,
                self.prefix,
                if present { "present" } else { "absent" },
                self.router_bgp_state(),
                self.birdc("show route all")
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        start.elapsed()
    }

    /// The router's BFD session with the node is Up.
    pub fn bfd_up(&self) -> bool {
        match self.kind {
            RouterKind::Bird => self
                .birdc("show bfd sessions")
                .lines()
                .any(|l| l.contains(self.node_ip) && l.contains(" Up ")),
            RouterKind::Frr => self
                .vtysh("show bfd peers brief")
                .lines()
                .any(|l| l.contains(self.node_ip) && l.contains(" up")),
        }
    }

    pub fn wait_bfd_up(&self, within: Duration) {
        let start = Instant::now();
        while !self.bfd_up() {
            assert!(
                start.elapsed() < within,
                "{:?}: BFD never came up:\n{}",
                self.kind,
                self.router_bgp_state()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the router says of the BGP session (state, last error or reset reason).
    pub fn router_bgp_state(&self) -> String {
        match self.kind {
            RouterKind::Bird => {
                self.birdc("show protocols all speaker") + &self.birdc("show bfd sessions")
            }
            RouterKind::Frr => {
                self.vtysh(&format!("show bgp neighbors {NODE}"))
                    + &self.vtysh("show bfd peers brief")
            }
        }
    }

    /// `sluice inspect --json` in the node.
    pub fn inspect(&self) -> serde_json::Value {
        self.inspect_with(&["--config", self.config.to_str().unwrap()])
    }

    /// `sluice inspect --json ARGS` in the node.
    pub fn inspect_with(&self, args: &[&str]) -> serde_json::Value {
        let out = Command::new("nsenter")
            .args([
                "--target",
                &self.holder.pid().to_string(),
                "--mount",
                "--net",
            ])
            .args([sluice_bin().as_str(), "inspect", "--json"])
            .args(args)
            .output()
            .expect("nsenter");
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("inspect --json: {}", String::from_utf8_lossy(&out.stderr)))
    }

    /// The node's /metrics.
    pub fn metrics(&self) -> String {
        self.node
            .run(|| crate::http_get("127.0.0.1:9120".parse().unwrap(), "/metrics"))
            .map(|(_, body)| body)
            .unwrap_or_default()
    }
}

/// A steady UDP flow from the router to the service, one numbered datagram per millisecond,
/// counted by a sink on the backend: what a restart must not interrupt.
pub struct Flow {
    stop: Arc<AtomicBool>,
    sender: Option<std::thread::JoinHandle<u64>>,
    sink: Option<std::thread::JoinHandle<Vec<u64>>>,
}

impl Flow {
    pub fn start(lab: &BfdLab) -> Flow {
        let stop = Arc::new(AtomicBool::new(false));
        let path = format!("/var/run/netns/{}", lab.backend.name);
        let sink_stop = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let sink = std::thread::spawn(move || {
            enter(&path);
            let socket = UdpSocket::bind(("198.18.200.2", PORT)).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let _ = ready_tx.send(());
            let mut seen = Vec::new();
            let mut buf = [0u8; 64];
            let mut quiet_since: Option<Instant> = None;
            loop {
                match socket.recv(&mut buf) {
                    Ok(n) if n >= 8 => {
                        seen.push(u64::from_be_bytes(buf[..8].try_into().unwrap()));
                        quiet_since = None;
                    }
                    _ => {
                        if sink_stop.load(Ordering::Relaxed) {
                            let since = *quiet_since.get_or_insert_with(Instant::now);
                            if since.elapsed() > Duration::from_millis(300) {
                                return seen;
                            }
                        }
                    }
                }
            }
        });
        ready_rx.recv().unwrap();
        let path = format!("/var/run/netns/{}", lab.router.name);
        let send_stop = stop.clone();
        let source = lab.router_ip;
        let sender = std::thread::spawn(move || {
            enter(&path);
            let socket = UdpSocket::bind((source, 0)).unwrap();
            let mut n = 0u64;
            let start = Instant::now();
            while !send_stop.load(Ordering::Relaxed) {
                let _ = socket.send_to(&n.to_be_bytes(), (VIP, PORT));
                n += 1;
                let next = start + Duration::from_millis(n);
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            n
        });
        Flow {
            stop,
            sender: Some(sender),
            sink: Some(sink),
        }
    }

    /// Stops the flow: (datagrams sent, datagrams received, the longest run of missing ones).
    pub fn finish(mut self) -> (u64, usize, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.sender.take().unwrap().join().unwrap();
        let mut seen = self.sink.take().unwrap().join().unwrap();
        seen.sort_unstable();
        seen.dedup();
        let mut longest = 0;
        let mut expected = 0;
        for s in &seen {
            longest = longest.max(s.saturating_sub(expected));
            expected = s + 1;
        }
        longest = longest.max(sent.saturating_sub(expected));
        (sent, seen.len(), longest)
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn family(prefix: &str) -> &'static str {
    if prefix.contains(':') {
        "-6"
    } else {
        "-4"
    }
}

fn enter(path: &str) {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}");
}
