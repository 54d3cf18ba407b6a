//! BIRD 2 as a test router: a foreground process in a namespace with its config and control
//! socket in a temp dir (see ../shared/docs/BGP-PEERS.md). Deleted with the namespace.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use crate::netns::{NetNs, Process};

pub struct Router {
    _process: Process,
    pub socket: PathBuf,
    dir: PathBuf,
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One BGP neighbour of the router.
pub struct Neighbor<'a> {
    pub local: &'a str,
    pub router_as: u32,
    pub address: &'a str,
    pub peer_as: u32,
    pub password: Option<&'a str>,
}

impl Router {
    /// Starts BIRD in `ns` with one `protocol bgp speaker` per neighbour (named speaker,
    /// speaker2, ...), importing everything, graceful-restart helper on.
    pub fn start(ns: &NetNs, tag: &str, neighbors: &[Neighbor]) -> Router {
        Self::start_with(ns, tag, neighbors, None, true)
    }

    /// [`Router::start`], and the routes learned installed into the namespace's kernel, the
    /// equal ones from several neighbours merged into one multipath (ECMP) route.
    pub fn start_ecmp(ns: &NetNs, tag: &str, neighbors: &[Neighbor]) -> Router {
        Self::start_full(ns, tag, neighbors, None, true, true)
    }

    /// [`Router::start`] with an IPv4 channel only: the sessions negotiate IPv4 unicast alone.
    pub fn start_ipv4_only(ns: &NetNs, tag: &str, neighbors: &[Neighbor]) -> Router {
        Self::start_with(ns, tag, neighbors, None, false)
    }

    /// [`Router::start`] with BFD (300 ms × 3) on `interface` for every neighbour (`bfd on`).
    pub fn start_with_bfd(
        ns: &NetNs,
        tag: &str,
        neighbors: &[Neighbor],
        interface: &str,
    ) -> Router {
        Self::start_with(ns, tag, neighbors, Some(interface), true)
    }

    fn start_with(
        ns: &NetNs,
        tag: &str,
        neighbors: &[Neighbor],
        bfd: Option<&str>,
        ipv6: bool,
    ) -> Router {
        Self::start_full(ns, tag, neighbors, bfd, ipv6, false)
    }

    fn start_full(
        ns: &NetNs,
        tag: &str,
        neighbors: &[Neighbor],
        bfd: Option<&str>,
        ipv6: bool,
        kernel_ecmp: bool,
    ) -> Router {
        let dir = std::env::temp_dir().join(format!("sluice-bird-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut conf = format!(
            "log \"{}\" all;\nrouter id {};\nprotocol device {{ scan time 10; }}\nprotocol direct {{ ipv4; ipv6; }}\n",
            dir.join("bird.log").display(),
            neighbors[0].local
        );
        if kernel_ecmp {
            conf.push_str(
                "protocol kernel { ipv4 { export all; }; merge paths on; learn off; scan time 10; }\n",
            );
        }
        if let Some(interface) = bfd {
            conf.push_str(&format!(
                "protocol bfd {{\n  interface \"{interface}\" {{ min rx interval 300 ms; min tx interval 300 ms; multiplier 3; }};\n}}\n"
            ));
        }
        let bfd_on = if bfd.is_some() { "  bfd on;\n" } else { "" };
        let ipv6_channel = if ipv6 {
            "  ipv6 { import all; export none; };\n"
        } else {
            ""
        };
        for (i, n) in neighbors.iter().enumerate() {
            let name = if i == 0 {
                "speaker".to_string()
            } else {
                format!("speaker{}", i + 1)
            };
            let password = n
                .password
                .map(|p| format!("  password \"{p}\";\n"))
                .unwrap_or_default();
            conf.push_str(&format!(
                "protocol bgp {name} {{\n  local {} as {};\n  neighbor {} as {};\n{password}  \
                 hold time 9; keepalive time 3;\n  connect delay time 1; connect retry time 1; \
                 error wait time 1, 5;\n  graceful restart on;\n{bfd_on}  \
                 ipv4 {{ import all; export none; }};\n{ipv6_channel}}}\n",
                n.local, n.router_as, n.address, n.peer_as
            ));
        }
        let path = dir.join("bird.conf");
        std::fs::write(&path, conf).unwrap();
        let socket = dir.join("bird.ctl");
        let process = ns.spawn(&[
            "bird",
            "-f",
            "-c",
            path.to_str().unwrap(),
            "-s",
            socket.to_str().unwrap(),
        ]);
        let router = Router {
            _process: process,
            socket,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !router.birdc("show status").contains("Daemon is up") {
            assert!(Instant::now() < deadline, "bird did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        router
    }

    /// Everything BIRD logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("bird.log")).unwrap_or_default()
    }

    pub fn birdc(&self, command: &str) -> String {
        let out = Command::new("birdc")
            .args(["-s", self.socket.to_str().unwrap(), command])
            .output()
            .expect("birdc (cargo xtask setup installs bird2)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits (up to `within`) until `show route PREFIX all` satisfies `ok`; the output.
    pub fn wait_route(&self, prefix: &str, within: Duration, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            let text = self.birdc(&format!("show route {prefix} all"));
            if ok(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{prefix}: never as expected:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until `show protocols all NAME` contains `text`.
    pub fn wait_protocol(&self, name: &str, text: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let out = self.birdc(&format!("show protocols all {name}"));
            if out.contains(text) {
                return;
            }
            assert!(Instant::now() < deadline, "{name}: never {text:?}:\n{out}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
