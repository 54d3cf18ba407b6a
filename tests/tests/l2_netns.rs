//! End to end, with real kernels on both ends: a node namespace with two interfaces on two
//! segments runs `sluice announce` with the program attached to both and the VIPs set for one.
//! Clients on each segment ask real ARP and NDP questions over veth with a raw socket.
//!
//! Topology (every namespace made here, deleted on drop, also on failure):
//!   client-a [ca 198.18.1.2, fd53:1::2] ── [na 198.18.1.1] node [nb 198.18.2.1] ── [cb 198.18.2.2] client-b
//! VIPs 198.18.1.100 and fd53:1::100 are announced on `na` only.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    process::Command,
    time::Duration,
};

use lb_userspace::dataplane::{self, Dataplane, DataplaneOptions};
use sluice_tests::{
    assert_refused,
    frames::{self, Mac},
    netns::{veth, NetNs},
    rawsock::RawSocket,
    require_root, sluice_bin,
};

const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 100);
const WAIT: Duration = Duration::from_millis(1500);

fn vip6() -> Ipv6Addr {
    "fd53:1::100".parse().unwrap()
}

struct Lab {
    /// XDP programs on the clients' interfaces, held for the lab's lifetime (see `lab`).
    _client_xdp: Vec<Dataplane>,
    node: NetNs,
    a: NetNs,
    b: NetNs,
}

fn lab() -> Lab {
    require_root();
    let mut lab = Lab {
        _client_xdp: Vec::new(),
        node: NetNs::new("node"),
        a: NetNs::new("ca"),
        b: NetNs::new("cb"),
    };
    veth(&lab.node, "na", &lab.a, "ca");
    veth(&lab.node, "nb", &lab.b, "cb");
    lab.node.ip(&["addr", "add", "198.18.1.1/24", "dev", "na"]);
    lab.node.ip(&["addr", "add", "198.18.2.1/24", "dev", "nb"]);
    lab.a.ip(&["addr", "add", "198.18.1.2/24", "dev", "ca"]);
    lab.b.ip(&["addr", "add", "198.18.2.2/24", "dev", "cb"]);
    lab.node
        .ip(&["addr", "add", "fd53:1::1/64", "dev", "na", "nodad"]);
    lab.a
        .ip(&["addr", "add", "fd53:1::2/64", "dev", "ca", "nodad"]);
    lab.b
        .ip(&["addr", "add", "fd53:2::2/64", "dev", "cb", "nodad"]);
    // XDP_TX on a veth delivers to the peer only when the peer runs NAPI, which on this kernel
    // means an XDP program on the peer (turning GRO on was not enough: measured, 0 of N frames
    // delivered). A physical NIC has no such condition. So each client runs Sluice's ingress
    // program with no VIPs: it passes every frame untouched.
    for (ns, ifname) in [(&lab.a, "ca"), (&lab.b, "cb")] {
        let dp = ns.run(move || {
            let mut dp = Dataplane::load(&DataplaneOptions {
                pin_dir: None,
                ..DataplaneOptions::default()
            })
            .expect("load a client-side XDP program");
            dp.attach_all(&[dataplane::interface(ifname).unwrap()])
                .expect("attach on the client side");
            dp
        });
        lab._client_xdp.push(dp);
    }
    lab
}

/// Sends an ARP request for `target` from the client's interface, returns the ARP replies that
/// say where `target` is.
fn ask_arp(
    ns: &NetNs,
    ifname: &'static str,
    sender_ip: Ipv4Addr,
    target: Ipv4Addr,
) -> Vec<Vec<u8>> {
    let my_mac = ns.mac(ifname);
    ns.run(move || {
        let sock = RawSocket::open(ifname).unwrap();
        sock.send(&frames::arp_request(my_mac, sender_ip, target))
            .unwrap();
        sock.collect(WAIT, |f| {
            f.len() >= 42
                && f[12..14] == [0x08, 0x06]
                && f[20..22] == [0, 2]
                && f[28..32] == target.octets()
        })
    })
}

/// Sends a Neighbor Solicitation for `target`, returns the Neighbor Advertisements for it.
fn ask_ndp(
    ns: &NetNs,
    ifname: &'static str,
    sender_ip: Ipv6Addr,
    target: Ipv6Addr,
) -> Vec<Vec<u8>> {
    let my_mac = ns.mac(ifname);
    ns.run(move || {
        let sock = RawSocket::open(ifname).unwrap();
        sock.send(&frames::neighbor_solicitation(my_mac, sender_ip, target))
            .unwrap();
        sock.collect(WAIT, |f| {
            f.len() >= 14 + 40 + 24
                && f[12..14] == [0x86, 0xdd]
                && f[54] == 136
                && f[62..78] == target.octets()
        })
    })
}

fn assert_one_arp_reply(replies: &[Vec<u8>], node_mac: Mac, asker: Mac) {
    assert_eq!(replies.len(), 1, "exactly one ARP reply: {replies:02x?}");
    let r = &replies[0];
    assert_eq!(&r[6..12], &node_mac, "Ethernet source is the node's MAC");
    assert_eq!(&r[0..6], &asker, "sent to the asker");
    assert_eq!(
        &r[22..28],
        &node_mac,
        "ARP sender hardware address is the node's MAC"
    );
    assert_eq!(&r[28..32], &VIP4.octets(), "ARP sender IP is the VIP");
}

#[test]
fn announce_answers_arp_and_ndp_on_the_chosen_interface_only_and_stops_when_stopped() {
    let lab = lab();
    let bin = sluice_bin();
    let node_mac = lab.node.mac("na");
    let mut sluice = lab.node.spawn(&[
        &bin,
        "announce",
        "--vip",
        "198.18.1.100@na",
        "--vip",
        "fd53:1::100@na",
        "--attach",
        "nb",
    ]);
    sluice.wait_for_stderr("ready");
    assert!(
        lab.node.has_xdp("na") && lab.node.has_xdp("nb"),
        "attached to both interfaces"
    );

    // Segment A: one reply, from the node's MAC.
    let replies = ask_arp(&lab.a, "ca", Ipv4Addr::new(198, 18, 1, 2), VIP4);
    assert_one_arp_reply(&replies, node_mac, lab.a.mac("ca"));
    let nas = ask_ndp(&lab.a, "ca", "fd53:1::2".parse().unwrap(), vip6());
    assert_eq!(nas.len(), 1, "exactly one NA: {nas:02x?}");
    assert_eq!(&nas[0][6..12], &node_mac);
    assert_eq!(
        &nas[0][80..86],
        &node_mac,
        "target link-layer address option"
    );
    assert_eq!(nas[0][58] & 0x40, 0x40, "solicited flag");
    assert!(frames::icmpv6_checksum_ok(&nas[0], 14));

    // Segment B: the same questions get no answer, though the program runs there too.
    assert!(ask_arp(&lab.b, "cb", Ipv4Addr::new(198, 18, 2, 2), VIP4).is_empty());
    assert!(ask_ndp(&lab.b, "cb", "fd53:2::2".parse().unwrap(), vip6()).is_empty());

    // A non-VIP on segment A: the program passes it, and nobody owns it.
    assert!(ask_arp(
        &lab.a,
        "ca",
        Ipv4Addr::new(198, 18, 1, 2),
        Ipv4Addr::new(198, 18, 1, 77)
    )
    .is_empty());
    // The node's own address is still answered, by the node's kernel (the program passed it).
    assert_eq!(
        ask_arp(
            &lab.a,
            "ca",
            Ipv4Addr::new(198, 18, 1, 2),
            Ipv4Addr::new(198, 18, 1, 1)
        )
        .len(),
        1
    );

    // `sluice inspect` reads the pinned maps (from the daemon's mount namespace, where its bpffs is).
    let doc = sluice.inspect_json(&bin);
    let vips = doc["l2Vips"].as_array().unwrap();
    assert_eq!(vips.len(), 2, "{doc}");
    for vip in vips {
        assert_eq!(vip["interface"], "na", "{doc}");
        assert_eq!(
            vip["mac"],
            lb_userspace::dataplane::format_mac(&node_mac),
            "{doc}"
        );
    }
    assert_eq!(
        doc["counters"]["arpReplies"], 1,
        "one ARP question on segment A: {doc}"
    );
    assert_eq!(
        doc["counters"]["naReplies"], 1,
        "one NS on segment A: {doc}"
    );
    assert_eq!(doc["counters"]["malformed"], 0, "{doc}");

    // Stopping detaches: no more answers, nothing left attached.
    let status = sluice.stop(libc::SIGTERM);
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    assert!(
        !lab.node.has_xdp("na") && !lab.node.has_xdp("nb"),
        "detached on exit"
    );
    assert!(ask_arp(&lab.a, "ca", Ipv4Addr::new(198, 18, 1, 2), VIP4).is_empty());
}

/// Listens on a client's interface, from a thread, while the caller starts things; until
/// [`Listener::heard`] (which waits 2 s more, for what was sent once ready). A slow machine (a
/// software-emulated guest) may take seconds to load the programs: no fixed window.
struct Listener {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<Vec<Vec<u8>>>,
}

impl Listener {
    fn heard(self) -> Vec<Vec<u8>> {
        std::thread::sleep(Duration::from_secs(2));
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
        self.handle.join().unwrap()
    }
}

fn listen(ns: &NetNs, ifname: &'static str) -> Listener {
    let path = format!("/var/run/netns/{}", ns.name);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = done.clone();
    let handle = std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0);
        let sock = RawSocket::open(ifname).unwrap();
        ready_tx.send(()).unwrap();
        let mut heard = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            heard.extend(sock.collect(Duration::from_millis(200), |_| true));
        }
        heard
    });
    ready_rx.recv().unwrap();
    Listener { done, handle }
}

#[test]
fn starting_to_answer_announces_the_vips_on_their_link_only() {
    let lab = lab();
    let bin = sluice_bin();
    let node_mac = lab.node.mac("na");
    let on_a = listen(&lab.a, "ca");
    let on_b = listen(&lab.b, "cb");
    let mut sluice = lab.node.spawn(&[
        &bin,
        "announce",
        "--vip",
        "198.18.1.100@na",
        "--vip",
        "fd53:1::100@na",
        "--attach",
        "nb",
    ]);
    sluice.wait_for_stderr("ready");
    let heard_a = on_a.heard();
    let heard_b = on_b.heard();
    let garp = heard_a.iter().find(|f| {
        f.len() >= 42
            && f[12..14] == [8, 6]
            && f[28..32] == VIP4.octets()
            && f[38..42] == VIP4.octets()
    });
    let garp = garp.unwrap_or_else(|| panic!("no gratuitous ARP on segment A: {heard_a:02x?}"));
    assert_eq!(&garp[22..28], &node_mac, "announced at the node's MAC");
    let na = heard_a
        .iter()
        .find(|f| {
            f.len() >= 86
                && f[12..14] == [0x86, 0xdd]
                && f[54] == 136
                && f[62..78] == vip6().octets()
        })
        .unwrap_or_else(|| panic!("no unsolicited NA on segment A"));
    assert_eq!(na[58] & 0x60, 0x20, "override set, solicited clear");
    assert!(frames::icmpv6_checksum_ok(na, 14));
    assert!(
        !heard_b
            .iter()
            .any(|f| f.windows(4).any(|w| w == VIP4.octets())),
        "segment B heard about the VIP"
    );
    assert!(sluice.stop(libc::SIGTERM).success());
}

#[test]
fn a_failed_attach_leaves_nothing_attached_and_names_the_interface() {
    let lab = lab();
    let bin = sluice_bin();
    // Another data plane already owns XDP on nb.
    let mut first = lab
        .node
        .spawn(&[&bin, "announce", "--vip", "198.18.2.100@nb"]);
    first.wait_for_stderr("ready");

    // This one attaches to na first (names are taken in order), then fails on nb.
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.node.name,
            &bin,
            "announce",
            "--vip",
            "198.18.1.100@na",
            "--attach",
            "nb",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must fail: {stderr}");
    assert!(
        stderr.contains("cannot attach the XDP program to nb"),
        "{stderr}"
    );
    assert!(!lab.node.has_xdp("na"), "na must not stay half-attached");

    // The first data plane is unharmed and still answers on its own segment.
    let replies = ask_arp(
        &lab.b,
        "cb",
        Ipv4Addr::new(198, 18, 2, 2),
        Ipv4Addr::new(198, 18, 2, 100),
    );
    assert_eq!(replies.len(), 1, "{replies:02x?}");
    assert!(first.stop(libc::SIGTERM).success());
}

#[test]
fn bad_input_is_refused_by_name_with_a_non_zero_exit_and_nothing_attached() {
    let lab = lab();
    for (args, expected) in [
        (
            vec!["--vip", "224.0.0.5@na"],
            "224.0.0.5 is not a valid unicast address",
        ),
        (
            vec!["--vip", "198.18.1.100"],
            "is not of the form IP@INTERFACE",
        ),
        (
            vec!["--vip", "198.18.1.300@na"],
            "\"198.18.1.300\" is not an IP address",
        ),
        (
            vec!["--vip", "198.18.1.100@nosuch0"],
            "no such interface: \"nosuch0\"",
        ),
        (
            vec!["--vip", "198.18.1.100@na", "--attach", "nosuch1"],
            "no such interface: \"nosuch1\"",
        ),
    ] {
        assert_refused(&lab.node, "announce", &args, expected, "na");
    }
}
