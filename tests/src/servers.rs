//! Small servers that answer with their own name, run on threads inside a test's namespace:
//! TCP (one line in → the name and a newline out, for as long as the connection lasts) and UDP
//! (any datagram → the name). Both listen on [::]:PORT, dual-stack.

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, UdpSocket},
};

use crate::netns::NetNs;

/// Starts a TCP and a UDP name server on `port` inside `ns`. They live until the process ends
/// or the namespace is deleted.
pub fn spawn_name_servers(ns: &NetNs, name: &str, port: u16) {
    let name = name.to_string();
    let (tcp, udp) = ns.run(move || {
        (
            TcpListener::bind(("::", port)).expect("bind TCP"),
            UdpSocket::bind(("::", port)).expect("bind UDP"),
        )
    });
    let tcp_name = name.clone();
    std::thread::spawn(move || {
        for conn in tcp.incoming() {
            let Ok(conn) = conn else { return };
            let name = tcp_name.clone();
            std::thread::spawn(move || {
                let mut writer = conn.try_clone().unwrap();
                for line in BufReader::new(conn).lines() {
                    if line.is_err() || writeln!(writer, "{name}").is_err() {
                        return;
                    }
                }
            });
        }
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(name.as_bytes(), from);
        }
    });
}

/// Starts a TCP server on `port` inside `ns` that answers each line with its name and the
/// address the connection came from (`pod-a 198.18.50.100`): what a pod sees of its client.
pub fn spawn_peer_server(ns: &NetNs, name: &str, port: u16) {
    let name = name.to_string();
    let tcp = ns.run(move || TcpListener::bind(("::", port)).expect("bind TCP"));
    std::thread::spawn(move || {
        for conn in tcp.incoming() {
            let Ok(conn) = conn else { return };
            let name = name.clone();
            std::thread::spawn(move || {
                let peer = match conn.peer_addr() {
                    Ok(p) => p.ip().to_canonical().to_string(),
                    Err(_) => return,
                };
                let mut writer = conn.try_clone().unwrap();
                for line in BufReader::new(conn).lines() {
                    if line.is_err() || writeln!(writer, "{name} {peer}").is_err() {
                        return;
                    }
                }
            });
        }
    });
}
