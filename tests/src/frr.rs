//! FRR's bgpd as a test router: standalone (no zebra, no watchfrr, no /etc/frr), foreground, its
//! config and vty socket in a temp dir (see ../shared/docs/BGP-PEERS.md). Killed on drop.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use crate::netns::{NetNs, Process};

pub struct Frr {
    _process: Process,
    pub dir: PathBuf,
    ns: String,
}

impl Drop for Frr {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One neighbour of the router: address, AS, optional MD5 password.
pub struct FrrNeighbor<'a> {
    pub address: &'a str,
    pub peer_as: u32,
    pub password: Option<&'a str>,
}

impl Frr {
    pub fn start(
        ns: &NetNs,
        dir: &Path,
        router_id: &str,
        router_as: u32,
        neighbors: &[FrrNeighbor],
    ) -> Frr {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("vtysh.conf"), "").unwrap();
        let mut conf = format!(
            "frr defaults traditional\nhostname router\nlog stdout informational\nrouter bgp {router_as}\n \
             bgp router-id {router_id}\n no bgp ebgp-requires-policy\n no bgp default ipv4-unicast\n bgp graceful-restart\n"
        );
        for n in neighbors {
            conf.push_str(&format!(
                " neighbor {a} remote-as {as_}\n neighbor {a} timers 3 9\n neighbor {a} timers connect 1\n",
                a = n.address,
                as_ = n.peer_as
            ));
            if let Some(p) = n.password {
                conf.push_str(&format!(" neighbor {} password {p}\n", n.address));
            }
        }
        for family in ["ipv4", "ipv6"] {
            conf.push_str(&format!(" address-family {family} unicast\n"));
            for n in neighbors {
                conf.push_str(&format!("  neighbor {} activate\n", n.address));
            }
            conf.push_str(" exit-address-family\n");
        }
        std::fs::write(dir.join("bgpd.conf"), conf).unwrap();
        Command::new("chmod")
            .args(["755", dir.to_str().unwrap()])
            .status()
            .unwrap();
        let process = ns.spawn(&[
            "/usr/lib/frr/bgpd",
            "-f",
            dir.join("bgpd.conf").to_str().unwrap(),
            "-i",
            dir.join("bgpd.pid").to_str().unwrap(),
            "--vty_socket",
            dir.to_str().unwrap(),
            "-z",
            dir.join("zserv.api").to_str().unwrap(),
            "-Z",
            "-S",
            "-P",
            "0",
        ]);
        let frr = Frr {
            _process: process,
            dir: dir.to_path_buf(),
            ns: ns.name.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while frr.vtysh("show bgp summary").is_empty() {
            assert!(Instant::now() < deadline, "FRR bgpd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        frr
    }

    pub fn vtysh(&self, command: &str) -> String {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "vtysh",
                "--vty_socket",
                self.dir.to_str().unwrap(),
                "-c",
                command,
            ])
            .output()
            .expect("vtysh (cargo xtask setup installs frr)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `show bgp ipv4|ipv6 unicast PREFIX`.
    pub fn show(&self, prefix: &str) -> String {
        let family = if prefix.contains(':') { "ipv6" } else { "ipv4" };
        self.vtysh(&format!("show bgp {family} unicast {prefix}"))
    }

    /// Waits (up to `within`) until `show(prefix)` satisfies `ok`.
    pub fn wait(&self, prefix: &str, within: Duration, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            let text = self.show(prefix);
            if ok(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{prefix}: never as expected:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
