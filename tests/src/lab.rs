//! A small network of namespaces for end-to-end tests and the demo:
//!
//! ```text
//! client [c0 198.18.1.2, fd53:1::2] ── [n0 198.18.1.1, fd53:1::1] node [n1..nN] ── [bx1..bxN] b1..bN
//! other  [o0 198.18.2.2]            ── [nx 198.18.2.1]            node
//! ```
//! Backend i has 198.18.1{i}.2 and fd53:1{i}::2 behind node's 198.18.1{i}.1. Every namespace
//! is deleted when the lab is dropped, also when a test fails.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use lb_userspace::dataplane::{self, Capacities, Dataplane, DataplaneOptions};

use crate::netns::{veth, NetNs};

/// Fields drop in order: programs first, then namespaces.
pub struct Lab {
    pub keepers: Vec<Dataplane>,
    pub client: NetNs,
    pub other: NetNs,
    pub node: NetNs,
    pub backends: Vec<NetNs>,
}

/// A pass-through XDP program on `ifname`, so the veth end runs NAPI: XDP_TX and XDP_REDIRECT
/// into its peer need that (on this kernel turning GRO on is not enough).
pub fn napi_keeper(ns: &NetNs, ifname: &str) -> Dataplane {
    let ifname = ifname.to_string();
    ns.run(move || {
        let mut dp = Dataplane::load(&DataplaneOptions {
            pin_dir: None,
            capacities: Capacities {
                services: 1,
                backends: 1,
                flows: 1,
            },
            ..DataplaneOptions::default()
        })
        .expect("load a pass-through XDP program");
        dp.attach_all(&[dataplane::interface(&ifname).unwrap()])
            .expect("attach it");
        dp
    })
}

pub fn backend_ip(i: usize, v6: bool) -> String {
    if v6 {
        format!("fd53:1{i}::2")
    } else {
        format!("198.18.1{i}.2")
    }
}

impl Lab {
    pub fn new(backends: usize) -> Lab {
        crate::require_root();
        let client = NetNs::new("client");
        let other = NetNs::new("other");
        let node = NetNs::new("node");
        veth(&node, "n0", &client, "c0");
        veth(&node, "nx", &other, "o0");
        client.ip(&["addr", "add", "198.18.1.2/24", "dev", "c0"]);
        client.ip(&["addr", "add", "fd53:1::2/64", "dev", "c0", "nodad"]);
        other.ip(&["addr", "add", "198.18.2.2/24", "dev", "o0"]);
        node.ip(&["addr", "add", "198.18.1.1/24", "dev", "n0"]);
        node.ip(&["addr", "add", "fd53:1::1/64", "dev", "n0", "nodad"]);
        node.ip(&["addr", "add", "198.18.2.1/24", "dev", "nx"]);
        // Complete checksums from the client, as from a physical wire (XDP never sees a veth's
        // deferred "hardware" checksum).
        client.exec(&["ethtool", "-K", "c0", "tx", "off"]);
        for key in [
            "net.ipv4.conf.all.forwarding=1",
            "net.ipv6.conf.all.forwarding=1",
        ] {
            node.exec(&["sysctl", "-qw", key]);
        }
        let mut keepers = vec![napi_keeper(&client, "c0"), napi_keeper(&other, "o0")];
        let mut namespaces = Vec::new();
        for i in 1..=backends {
            let b = NetNs::new(&format!("b{i}"));
            let (n, bx) = (format!("n{i}"), format!("bx{i}"));
            veth(&node, &n, &b, &bx);
            node.ip(&["addr", "add", &format!("198.18.1{i}.1/24"), "dev", &n]);
            node.ip(&[
                "addr",
                "add",
                &format!("fd53:1{i}::1/64"),
                "dev",
                &n,
                "nodad",
            ]);
            b.ip(&[
                "addr",
                "add",
                &format!("{}/24", backend_ip(i, false)),
                "dev",
                &bx,
            ]);
            b.ip(&[
                "addr",
                "add",
                &format!("{}/64", backend_ip(i, true)),
                "dev",
                &bx,
                "nodad",
            ]);
            b.ip(&["route", "add", "default", "via", &format!("198.18.1{i}.1")]);
            b.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd53:1{i}::1"),
            ]);
            keepers.push(napi_keeper(&b, &bx));
            namespaces.push(b);
        }
        Lab {
            keepers,
            client,
            other,
            node,
            backends: namespaces,
        }
    }

    /// Starts backend i's servers: TCP "name per line" and UDP "name per datagram" on 8080, and
    /// two that can be switched off: an HTTP server answering its name on 8081 (returned
    /// second) and a bare health port 9000 (returned first).
    pub fn serve(&self, i: usize) -> Switch {
        self.serve_with_http(i).0
    }

    /// [`Self::serve`], returning (health port switch, HTTP server switch).
    pub fn serve_with_http(&self, i: usize) -> (Switch, Switch) {
        let ns = &self.backends[i - 1];
        let name = format!("b{i}");
        crate::servers::spawn_name_servers(ns, &name, 8080);
        let http = spawn_http_name_server(ns, &name, 8081);
        (switchable_listener(ns, 9000), http)
    }
}

/// Turns a listener on and off: off, connections to its port are refused.
#[derive(Clone)]
pub struct Switch {
    on: Arc<AtomicBool>,
}

impl Switch {
    pub fn set(&self, on: bool) {
        self.on.store(on, Ordering::SeqCst);
    }
}

/// A TCP server on `port` in `ns` that hands each connection to `handle` while switched on;
/// switched off, its listener is closed and connections are refused.
pub fn switchable_server(
    ns: &NetNs,
    port: u16,
    handle: fn(std::net::TcpStream, &str),
    name: &str,
) -> Switch {
    let on = Arc::new(AtomicBool::new(true));
    let flag = on.clone();
    let path = format!("/var/run/netns/{}", ns.name);
    let name = name.to_string();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0);
        let mut listener: Option<TcpListener> = None;
        loop {
            if flag.load(Ordering::SeqCst) {
                if listener.is_none() {
                    match TcpListener::bind(("::", port)) {
                        Ok(l) => {
                            l.set_nonblocking(true).unwrap();
                            listener = Some(l);
                        }
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                    }
                }
                if let Some(l) = &listener {
                    while let Ok((conn, _)) = l.accept() {
                        let _ = conn.set_nonblocking(false);
                        let name = name.clone();
                        std::thread::spawn(move || handle(conn, &name));
                    }
                }
            } else {
                listener = None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    Switch { on }
}

/// A listener that accepts and closes: a health port.
pub fn switchable_listener(ns: &NetNs, port: u16) -> Switch {
    switchable_server(ns, port, |conn, _| drop(conn), "")
}

/// An HTTP/1.0 server on `port` in `ns` answering every request with 200 and its name.
pub fn spawn_http_name_server(ns: &NetNs, name: &str, port: u16) -> Switch {
    switchable_server(ns, port, answer_http, name)
}

fn answer_http(mut conn: std::net::TcpStream, name: &str) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
        if line == "\r\n" || line == "\n" {
            break;
        }
        line.clear();
    }
    let body = format!("{name}\n");
    let _ = write!(
        conn,
        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
        body.len()
    );
}

/// A UDP request from `ns` to `to`; the answer and where it came from.
pub fn udp_ask(
    ns: &NetNs,
    to: std::net::SocketAddr,
) -> std::io::Result<(String, std::net::SocketAddr)> {
    ns.run(move || {
        let bind = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let sock = UdpSocket::bind(bind)?;
        sock.set_read_timeout(Some(Duration::from_secs(3)))?;
        sock.send_to(b"who?", to)?;
        let mut buf = [0u8; 64];
        let (n, from) = sock.recv_from(&mut buf)?;
        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
    })
}

/// An HTTP GET from `ns` to `to`; the body.
pub fn http_get(ns: &NetNs, to: std::net::SocketAddr) -> std::io::Result<String> {
    ns.run(move || {
        let mut conn = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        conn.set_read_timeout(Some(Duration::from_secs(3)))?;
        write!(conn, "GET / HTTP/1.0\r\nHost: sluice\r\n\r\n")?;
        let mut text = String::new();
        conn.read_to_string(&mut text)?;
        Ok(text
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or("")
            .trim()
            .to_string())
    })
}

/// One TCP connection from a namespace to a service: a line out, the backend's name back.
pub struct Conn {
    reader: BufReader<std::net::TcpStream>,
    writer: std::net::TcpStream,
}

impl Conn {
    pub fn open(ns: &NetNs, to: std::net::SocketAddr) -> std::io::Result<Conn> {
        Self::open_within(ns, to, Duration::from_secs(3))
    }

    /// [`Self::open`], giving up on connecting and on each answer after `timeout`.
    pub fn open_within(
        ns: &NetNs,
        to: std::net::SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<Conn> {
        let stream = ns.run(move || std::net::TcpStream::connect_timeout(&to, timeout))?;
        stream.set_read_timeout(Some(timeout.max(Duration::from_secs(1))))?;
        Ok(Conn {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    pub fn ask(&mut self) -> std::io::Result<String> {
        writeln!(self.writer, "who?")?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        Ok(line.trim().to_string())
    }
}

/// `n` short connections to `to`, each asking once: answers per backend name.
pub fn names(
    ns: &NetNs,
    to: std::net::SocketAddr,
    n: usize,
) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for i in 0..n {
        let name = Conn::open(ns, to)
            .and_then(|mut c| c.ask())
            .unwrap_or_else(|e| panic!("connection {i} to {to}: {e}"));
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}
