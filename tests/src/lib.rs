//! Support for Sluice's packet tests, end-to-end tests and benchmark: frame builders written
//! from the RFCs, network namespaces that clean up after themselves, and a raw-socket
//! ARP/NDP client.

pub mod bfd_lab;
pub mod bird;
pub mod cluster_lab;
pub mod fakeapi;
pub mod frames;
pub mod frr;
pub mod lab;
pub mod netns;
pub mod rawsock;
pub mod servers;
pub mod speaker_lab;

/// An HTTP/1.0 GET of `path` on `address`, from the calling thread's network namespace:
/// (status code, body), or `None` when nothing answers there.
pub fn http_get(address: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut conn =
        std::net::TcpStream::connect_timeout(&address, std::time::Duration::from_secs(3)).ok()?;
    conn.set_read_timeout(Some(std::time::Duration::from_secs(3)))
        .ok()?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: sluice\r\n\r\n").ok()?;
    let mut text = String::new();
    conn.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Some((code, body))
}

/// Pins the calling thread, and every thread it starts afterwards, to one CPU: a veth's
/// receive processing runs on the sender's CPU, so per-CPU behaviour (the flood guard's
/// limit, the kernel's per-CPU LRU lists) then shows as on a one-CPU node.
pub fn pin_to_cpu(cpu: usize) {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Fails loudly (CI runs as root) when the test cannot do what it must.
pub fn require_root() {
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "this test loads XDP programs and builds network namespaces: run it as root (CI does)"
    );
}

/// The `sluice` binary of this build (target/<profile>/sluice next to the test executable's
/// deps/ directory), or $SLUICE_BIN.
pub fn sluice_bin() -> String {
    if let Ok(bin) = std::env::var("SLUICE_BIN") {
        return bin;
    }
    // Tests run from target/<profile>/deps/, binaries (the demo) from target/<profile>/.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let bin = if dir.join("sluice").exists() {
        dir.join("sluice")
    } else {
        dir.parent().unwrap().join("sluice")
    };
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo xtask test` does)",
        bin.display()
    );
    bin.display().to_string()
}

/// Runs `sluice SUBCOMMAND ARGS...` in `ns` and asserts it is refused: exit code 1, `expected`
/// in its stderr, and no XDP program left on `interface`.
pub fn assert_refused(
    ns: &netns::NetNs,
    subcommand: &str,
    args: &[&str],
    expected: &str,
    interface: &str,
) {
    let bin = sluice_bin();
    let mut full = vec![bin.as_str(), subcommand];
    full.extend_from_slice(args);
    let out = ns.exec_output(&full);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(stderr.contains(expected), "{args:?}: {stderr}");
    assert!(
        !ns.has_xdp(interface),
        "{args:?} left a program attached on {interface}"
    );
}

/// A data plane loaded unpinned with `capacities` and Maglev table size `table_size`, in a
/// private network namespace set up by [`balancer_namespace_setup`]; `f` gets it, veth0's
/// ifindex and veth1's MAC. `allow_veth1`: veth1 is a redirect target (BPF_PROG_TEST_RUN never
/// transmits, so its peer does not matter).
pub fn balancer_lab<T: Send + 'static>(
    allow_veth1: bool,
    capacities: lb_userspace::dataplane::Capacities,
    table_size: u32,
    f: impl FnOnce(&mut lb_userspace::dataplane::Dataplane, u32, [u8; 6]) -> T + Send + 'static,
) -> T {
    use lb_userspace::dataplane::{self, Dataplane, DataplaneOptions};
    require_root();
    netns::in_private_netns_with_veth(move |veth0, veth1| {
        balancer_namespace_setup();
        let veth1_mac = dataplane::interface("veth1").unwrap().mac;
        let mut dp = Dataplane::load(&DataplaneOptions {
            pin_dir: None,
            capacities,
            maglev_table_size: table_size,
            ..DataplaneOptions::default()
        })
        .expect("load the data plane");
        if allow_veth1 {
            dp.allow_redirect(veth1).unwrap();
        }
        f(&mut dp, veth0, veth1_mac)
    })
}

/// Addresses, forwarding and permanent neighbours for balancer tests and benchmarks, in the
/// caller's (private) network namespace, which holds the veth pair veth0/veth1: veth0 faces the
/// clients (198.18.1.1/24, fd53:1::1/64), veth1 the backends (198.18.2.1/24, fd53:2::1/64), and
/// backends 198.18.2.10..=19 and fd53:2::a..=13 (the same numbers, in hex) have neighbour entries
/// with MAC 02:be:00:00:00:NN.
pub fn balancer_namespace_setup() {
    for args in [
        vec!["ip", "link", "set", "veth0", "up"],
        vec!["ip", "link", "set", "veth1", "up"],
        vec!["ip", "addr", "add", "198.18.1.1/24", "dev", "veth0"],
        vec!["ip", "addr", "add", "198.18.2.1/24", "dev", "veth1"],
        vec!["ip", "addr", "add", "fd53:1::1/64", "dev", "veth0", "nodad"],
        vec!["ip", "addr", "add", "fd53:2::1/64", "dev", "veth1", "nodad"],
        vec!["sysctl", "-qw", "net.ipv4.conf.all.forwarding=1"],
        vec!["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"],
    ] {
        netns::sh(&args);
    }
    for last in 10..20u8 {
        let mac = format!("02:be:00:00:00:{last:02x}");
        let v4 = format!("198.18.2.{last}");
        let v6 = format!("fd53:2::{last:x}");
        for (family, ip) in [("-4", v4.as_str()), ("-6", v6.as_str())] {
            netns::sh(&[
                "ip",
                family,
                "neigh",
                "replace",
                ip,
                "lladdr",
                &mac,
                "dev",
                "veth1",
                "nud",
                "permanent",
            ]);
        }
    }
}
