//! Path MTU discovery through a VIP, with real kernels and real TCP: a router on the client's
//! path has a link with a smaller MTU (576 for IPv4, 1280 for IPv6) than the rest (1500).
//!
//! ```text
//! client [f0 .4.2] ── [r0 .4.1, MTU small] router [r1 .3.2] ── [n0 .3.1] node [n1 .5.1] ── [b0 .5.2] backend
//! ```
//! (198.18.x.0/24 and fd53:x::/64.) The VIP 198.18.9.100 / fd53:9::100 is routed to the node,
//! whose XDP program balances it to the backend. The backend's full-size replies leave the node
//! as the VIP's (TC reverse NAT); the router cannot pass them and sends Fragmentation Needed /
//! Packet Too Big to their source, the VIP. Only Sluice's ICMP translation gets that error to
//! the backend, whose TCP then sends smaller segments.
//!
//! The way back too: a backend's own error about a client's packet (port unreachable) reaches
//! the client as the VIP's, so the client's connected socket sees it.
//!
//! The control: the same transfer with the router's errors dropped (nftables in the router)
//! stalls — the classic PMTU black hole, which shows the transfer depends on the error.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use lb_userspace::dataplane::{
    self, Backend, Capacities, Dataplane, DataplaneOptions, Protocol, Service,
};
use sluice_tests::{
    lab::napi_keeper,
    netns::{veth, NetNs},
    require_root,
};

const TRANSFER: usize = 10 * 1024 * 1024;
/// No byte at all for this long: the transfer stalled (a stall detector, not a speed limit).
const STALL: Duration = Duration::from_secs(5);

/// Fields drop in order: programs first, then namespaces.
struct Path {
    node_dp: Dataplane,
    _keeper: Dataplane,
    client: NetNs,
    router: NetNs,
    _node: NetNs,
    backend: NetNs,
    v6: bool,
}

fn vip(v6: bool) -> IpAddr {
    if v6 {
        "fd53:9::100".parse().unwrap()
    } else {
        "198.18.9.100".parse().unwrap()
    }
}

fn path(v6: bool, small_mtu: u32) -> Path {
    require_root();
    let client = NetNs::new("pmtu-client");
    let router = NetNs::new("pmtu-router");
    let node = NetNs::new("pmtu-node");
    let backend = NetNs::new("pmtu-backend");
    veth(&client, "f0", &router, "r0");
    veth(&router, "r1", &node, "n0");
    veth(&node, "n1", &backend, "b0");
    for (ns, dev, v4, v6addr) in [
        (&client, "f0", "198.18.4.2/24", "fd53:4::2/64"),
        (&router, "r0", "198.18.4.1/24", "fd53:4::1/64"),
        (&router, "r1", "198.18.3.2/24", "fd53:3::2/64"),
        (&node, "n0", "198.18.3.1/24", "fd53:3::1/64"),
        (&node, "n1", "198.18.5.1/24", "fd53:5::1/64"),
        (&backend, "b0", "198.18.5.2/24", "fd53:5::2/64"),
    ] {
        ns.ip(&["addr", "add", v4, "dev", dev]);
        ns.ip(&["addr", "add", v6addr, "dev", dev, "nodad"]);
    }
    for (ns, v4, v6via) in [
        (&client, "198.18.4.1", "fd53:4::1"),
        (&router, "198.18.3.1", "fd53:3::1"),
        (&backend, "198.18.5.1", "fd53:5::1"),
    ] {
        ns.ip(&["route", "add", "default", "via", v4]);
        ns.ip(&["-6", "route", "add", "default", "via", v6via]);
    }
    // After the addresses: below 1280 the kernel turns IPv6 off on the link.
    router.ip(&["link", "set", "r0", "mtu", &small_mtu.to_string()]);
    node.ip(&["route", "add", "198.18.4.0/24", "via", "198.18.3.2"]);
    node.ip(&["-6", "route", "add", "fd53:4::/64", "via", "fd53:3::2"]);
    for ns in [&router, &node] {
        ns.exec(&["sysctl", "-qw", "net.ipv4.conf.all.forwarding=1"]);
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    }
    // Complete checksums toward the node's XDP program, as from a physical wire.
    client.exec(&["ethtool", "-K", "f0", "tx", "off"]);
    router.exec(&["ethtool", "-K", "r1", "tx", "off"]);
    let keeper = napi_keeper(&backend, "b0");
    let node_dp = node.run(move || {
        let mut dp = Dataplane::load(&DataplaneOptions {
            pin_dir: None,
            capacities: Capacities {
                services: 4,
                backends: 4,
                flows: 1024,
            },
            ..DataplaneOptions::default()
        })
        .expect("load the data plane");
        dp.attach_all(&[dataplane::interface("n0").unwrap()])
            .unwrap();
        dp.allow_redirect(dataplane::interface("n1").unwrap().ifindex)
            .unwrap();
        let backend_ip: IpAddr = if v6 {
            "fd53:5::2".parse().unwrap()
        } else {
            "198.18.5.2".parse().unwrap()
        };
        for (port, protocol) in [(80, Protocol::Tcp), (53, Protocol::Udp)] {
            dp.upsert_service(
                Service {
                    vip: vip(v6),
                    port,
                    protocol,
                },
                &[Backend {
                    ip: backend_ip,
                    port: 8080,
                    weight: 1,
                    node: None,
                }],
            )
            .unwrap();
        }
        dp
    });
    Path {
        node_dp,
        _keeper: keeper,
        client,
        router,
        _node: node,
        backend,
        v6,
    }
}

impl Path {
    /// The backend sends `TRANSFER` bytes to one client connection through the VIP; returns how
    /// many arrived before the end or a stall.
    fn transfer(&self) -> usize {
        let bind: SocketAddr = if self.v6 {
            "[::]:8080".parse().unwrap()
        } else {
            "0.0.0.0:8080".parse().unwrap()
        };
        let listener = self.backend.run(move || TcpListener::bind(bind).unwrap());
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            // A stalled transfer must end this thread too.
            conn.set_write_timeout(Some(STALL)).unwrap();
            let chunk = vec![0x5au8; 64 * 1024];
            let mut sent = 0;
            while sent < TRANSFER {
                if conn.write_all(&chunk).is_err() {
                    break;
                }
                sent += chunk.len();
            }
        });
        let to = SocketAddr::new(vip(self.v6), 80);
        let received = self.client.run(move || {
            let mut conn = TcpStream::connect_timeout(&to, STALL).expect("connect to the VIP");
            conn.set_read_timeout(Some(STALL)).unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0;
            loop {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
                if total >= TRANSFER {
                    break;
                }
            }
            let _ = conn.shutdown(std::net::Shutdown::Both);
            total
        });
        let _ = server.join();
        received
    }

    /// Drops the router's own Fragmentation Needed / Packet Too Big errors (true), or stops.
    fn drop_router_errors(&self, on: bool) {
        if on {
            self.router.exec(&[
                "nft",
                "add table inet blackhole; \
                 add chain inet blackhole out { type filter hook output priority 0; }; \
                 add rule inet blackhole out icmp type destination-unreachable drop; \
                 add rule inet blackhole out icmpv6 type packet-too-big drop",
            ]);
        } else {
            self.router.exec(&["nft", "delete table inet blackhole"]);
        }
    }
}

fn a_large_transfer_through_the_vip_survives_a_small_mtu_link(v6: bool, small_mtu: u32) {
    let path = path(v6, small_mtu);
    // Control first (the backend must not have learnt the path MTU yet).
    path.drop_router_errors(true);
    let blackholed = path.transfer();
    assert!(
        blackholed < TRANSFER,
        "without the router's errors the transfer must stall: {blackholed} bytes arrived"
    );
    assert_eq!(path.node_dp.stats().unwrap().icmp_to_backend, 0);
    path.drop_router_errors(false);

    let received = path.transfer();
    let stats = path.node_dp.stats().unwrap();
    assert_eq!(
        received, TRANSFER,
        "the whole transfer arrives once the router's errors reach the backend ({stats:?})"
    );
    assert!(stats.icmp_to_backend > 0, "{stats:?}");
    eprintln!(
        "MTU {small_mtu}: {TRANSFER} bytes through the VIP; {blackholed} bytes with the errors \
         dropped; {} ICMP errors translated to the backend",
        stats.icmp_to_backend
    );
}

#[test]
fn a_10_mb_ipv4_transfer_through_the_vip_survives_a_576_byte_mtu_link() {
    a_large_transfer_through_the_vip_survives_a_small_mtu_link(false, 576);
}

#[test]
fn a_10_mb_ipv4_transfer_through_the_vip_survives_a_1280_byte_mtu_link() {
    a_large_transfer_through_the_vip_survives_a_small_mtu_link(false, 1280);
}

#[test]
fn a_10_mb_ipv6_transfer_through_the_vip_survives_a_1280_byte_mtu_link() {
    a_large_transfer_through_the_vip_survives_a_small_mtu_link(true, 1280);
}

/// A connected UDP socket learns that nothing listens behind the VIP: the backend's port
/// unreachable, rewritten on the way out, names the client's own datagram (client → VIP:53).
fn a_closed_udp_port_behind_the_vip_is_refused_to_the_client(v6: bool) {
    let path = path(v6, 1500);
    let to = SocketAddr::new(vip(v6), 53);
    let answer = path.client.run(move || {
        let bind: SocketAddr = if to.is_ipv6() {
            "[::]:0".parse().unwrap()
        } else {
            "0.0.0.0:0".parse().unwrap()
        };
        let sock = std::net::UdpSocket::bind(bind).unwrap();
        sock.connect(to).unwrap();
        sock.set_read_timeout(Some(STALL)).unwrap();
        sock.send(b"anyone?").unwrap();
        let mut buf = [0u8; 64];
        sock.recv(&mut buf).map_err(|e| e.kind())
    });
    assert_eq!(answer, Err(std::io::ErrorKind::ConnectionRefused));
    assert_eq!(path.node_dp.stats().unwrap().icmp_to_client, 1);
}

#[test]
fn a_closed_udp_port_behind_an_ipv4_vip_is_refused_to_the_client() {
    a_closed_udp_port_behind_the_vip_is_refused_to_the_client(false);
}

#[test]
fn a_closed_udp_port_behind_an_ipv6_vip_is_refused_to_the_client() {
    a_closed_udp_port_behind_the_vip_is_refused_to_the_client(true);
}
