//! `sluice trace`: what to ask the programs for, and how their events read — the one place
//! events are formatted (text and JSON). Pure; the maps are `dataplane::TraceSession`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{anyhow, bail, Result};
use lb_common::{decision, TraceEvent, TraceFilter, FAMILY_IPV4, TRACE_HOOK_TC};
use serde::Serialize;

/// Which packets to trace. `None`: any.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    pub vip: Option<IpAddr>,
    pub vip_port: Option<u16>,
    pub client: Option<(IpAddr, u8)>,
    pub ifindex: u32,
}

/// `--vip`: `IP`, `IP:PORT` or `[IPv6]:PORT`.
pub fn parse_vip(text: &str) -> Result<(IpAddr, Option<u16>)> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok((ip, None));
    }
    let addr: std::net::SocketAddr = text
        .parse()
        .map_err(|_| anyhow!("--vip {text:?}: not an IP address, IP:PORT or [IPv6]:PORT"))?;
    Ok((addr.ip(), Some(addr.port())))
}

/// `--client`: `IP` or `IP/PREFIX`.
pub fn parse_client(text: &str) -> Result<(IpAddr, u8)> {
    let (ip, prefix) = match text.split_once('/') {
        Some((ip, prefix)) => (ip, Some(prefix)),
        None => (text, None),
    };
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| anyhow!("--client {text:?}: not an IP address or IP/PREFIX"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => match p.parse::<u8>() {
            Ok(p) if p <= max => p,
            _ => bail!("--client {text:?}: the prefix length must be 0 to {max}"),
        },
    };
    Ok((ip, prefix))
}

fn family(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() {
        FAMILY_IPV4
    } else {
        lb_common::FAMILY_IPV6
    }
}

fn addr16(ip: &IpAddr) -> [u8; 16] {
    let mut out = [0; 16];
    match ip {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out = v6.octets(),
    }
    out
}

/// The filter the programs apply (its lease is set when the trace starts).
pub fn filter(request: &Request) -> TraceFilter {
    let mut f: TraceFilter = bytemuck::Zeroable::zeroed();
    f.ifindex = request.ifindex;
    if let Some(vip) = &request.vip {
        f.vip_family = family(vip);
        f.vip = addr16(vip);
        f.vip_port = request.vip_port.unwrap_or(0).to_be_bytes();
    }
    if let Some((client, prefix)) = &request.client {
        f.client_family = family(client);
        f.client = addr16(client);
        f.client_prefix = *prefix;
    }
    f
}

/// One traced decision, decoded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// `CLOCK_MONOTONIC` ns.
    pub time_ns: u64,
    /// `xdp` (arriving) or `tc` (leaving).
    pub hook: &'static str,
    pub interface: String,
    pub protocol: &'static str,
    pub from: String,
    pub to: String,
    /// What the program did, as a word (`conntrack-hit`, `new-flow`, `reverse-nat`, ...).
    pub decision: &'static str,
    /// Where the packet went: the backend (or, for a reply, the VIP it now comes from).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maglev_slot: Option<u32>,
    /// Why, in words.
    pub detail: &'static str,
    /// Rewritten, then forwarded by the kernel rather than redirected in XDP.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub via_kernel: bool,
}

fn ip_of(family: u8, addr: &[u8; 16]) -> IpAddr {
    if family == FAMILY_IPV4 {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*addr))
    }
}

fn endpoint(family: u8, addr: &[u8; 16], port: Option<u16>) -> String {
    let ip = ip_of(family, addr);
    match (port, ip) {
        (None, ip) => ip.to_string(),
        (Some(p), IpAddr::V4(ip)) => format!("{ip}:{p}"),
        (Some(p), IpAddr::V6(ip)) => format!("[{ip}]:{p}"),
    }
}

/// The decision's word and what it means.
pub fn describe(code: u8) -> (&'static str, &'static str) {
    use decision::*;
    match code {
        PASSED_NOT_A_SERVICE => ("passed", "not a service's address and port"),
        PASSED_TTL => (
            "passed",
            "TTL or hop limit would expire: the kernel answers",
        ),
        PASSED_FRAGMENT_OR_OPTIONS => ("passed", "a fragment or IPv4 options: not balanced"),
        PASSED_OTHER_PROTOCOL => ("passed", "neither TCP nor UDP"),
        PASSED_ARP_NDP_NOT_OURS => (
            "passed",
            "ARP/NDP this node does not answer here (not a VIP it owns on this interface)",
        ),
        MALFORMED => ("passed", "malformed or truncated headers"),
        ARP_REPLY => ("arp-reply", "answered for the VIP (ARP)"),
        NA_REPLY => ("na-reply", "answered for the VIP (neighbour advertisement)"),
        CONNTRACK_HIT => ("conntrack-hit", "a tracked flow: to its backend"),
        NEW_FLOW => (
            "new-flow",
            "a new flow: Maglev picked the backend, flow tracked",
        ),
        NEW_FLOW_FLOOD_GUARD => (
            "new-flow",
            "a new flow past the flood guard's limit: Maglev picked the backend, not tracked",
        ),
        NO_BACKEND => ("dropped", "the service has no backend"),
        ICMP_TO_BACKEND => (
            "icmp-translated",
            "an ICMP error about a flow: to its backend",
        ),
        ICMP_UNMATCHED => ("passed", "an ICMP error naming no tracked flow"),
        REVERSE_NAT => ("reverse-nat", "a backend's reply: now from the VIP"),
        ICMP_TO_CLIENT => ("icmp-translated", "a backend's ICMP error: to the client"),
        TUNNELLED => (
            "tunnelled",
            "its backend is on another node: encapsulated to that node",
        ),
        TUNNEL_FORGED => (
            "dropped",
            "tunnelled to a service from an address that is not a node's",
        ),
        TUNNEL_MISMATCH => (
            "dropped",
            "tunnelled here, but this node's table sends the flow to another node (tables disagree for a moment)",
        ),
        TUNNEL_TOO_BIG => (
            "too-big",
            "too large for the node network once encapsulated: an ICMP error with the MTU that fits went back",
        ),
        PASSED_OTHER_HOST => (
            "passed",
            "a frame to another host's MAC (a promiscuous port or a flooding switch): not this host's",
        ),
        PASSED_STANDBY_PORT => (
            "passed",
            "arrived on a bond's standby port: the bond drops it, the active port answers",
        ),
        _ => (
            "unknown",
            "a decision this sluice does not know (newer programs?)",
        ),
    }
}

/// Decodes an event; `interface_name` names an interface index.
pub fn decode(ev: &TraceEvent, interface_name: impl Fn(u32) -> Option<String>) -> Event {
    let (decision, detail) = describe(ev.decision);
    let ports = ev.proto == lb_common::PROTO_TCP || ev.proto == lb_common::PROTO_UDP;
    let port = |p: [u8; 2]| ports.then_some(u16::from_be_bytes(p));
    let protocol = match ev.proto {
        0 => "arp",
        lb_common::PROTO_TCP => "tcp",
        lb_common::PROTO_UDP => "udp",
        1 => "icmp",
        58 => "icmpv6",
        _ => "other",
    };
    // Tunnelled: the node it went to (no port).
    let to_port = (ev.decision != decision::TUNNELLED)
        .then(|| port(ev.to_port))
        .flatten();
    let via = (ev.to_addr != [0; 16]).then(|| endpoint(ev.family, &ev.to_addr, to_port));
    Event {
        time_ns: ev.time,
        hook: if ev.hook == TRACE_HOOK_TC {
            "tc"
        } else {
            "xdp"
        },
        interface: interface_name(ev.ifindex).unwrap_or_else(|| format!("if{}", ev.ifindex)),
        protocol,
        from: endpoint(ev.family, &ev.src, port(ev.sport)),
        to: endpoint(ev.family, &ev.dst, port(ev.dport)),
        decision,
        via,
        maglev_slot: matches!(
            ev.decision,
            decision::NEW_FLOW | decision::NEW_FLOW_FLOOD_GUARD
        )
        .then_some(ev.slot),
        detail,
        via_kernel: ev.flags & lb_common::TRACE_VIA_KERNEL != 0,
    }
}

/// One line of text for an event.
pub fn line(event: &Event) -> String {
    let mut out = format!(
        "{:>12.6} {:<3} {:<10} {:<6} {} → {}  {}",
        event.time_ns as f64 / 1e9,
        event.hook,
        event.interface,
        event.protocol,
        event.from,
        event.to,
        event.decision
    );
    if let Some(slot) = event.maglev_slot {
        out.push_str(&format!(" slot {slot}"));
    }
    if let Some(via) = &event.via {
        out.push_str(&format!(" → {via}"));
    }
    out.push_str(&format!("  ({})", event.detail));
    if event.via_kernel {
        out.push_str(
            " [forwarded by the kernel: neighbour not resolved yet, or not a redirect target]",
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(decision: u8) -> TraceEvent {
        let mut ev: TraceEvent = bytemuck::Zeroable::zeroed();
        ev.time = 1_500_000_000;
        ev.ifindex = 7;
        ev.hook = lb_common::TRACE_HOOK_XDP;
        ev.decision = decision;
        ev.family = FAMILY_IPV4;
        ev.proto = lb_common::PROTO_TCP;
        ev.slot = u32::MAX;
        ev.src[..4].copy_from_slice(&[198, 51, 100, 7]);
        ev.dst[..4].copy_from_slice(&[203, 0, 113, 10]);
        ev.sport = 40000u16.to_be_bytes();
        ev.dport = 80u16.to_be_bytes();
        ev
    }

    #[test]
    fn vip_and_client_arguments_parse_or_say_what_is_wrong() {
        assert_eq!(
            parse_vip("203.0.113.10:80").unwrap(),
            ("203.0.113.10".parse().unwrap(), Some(80))
        );
        assert_eq!(
            parse_vip("[2001:db8::10]:443").unwrap(),
            ("2001:db8::10".parse().unwrap(), Some(443))
        );
        assert_eq!(parse_vip("2001:db8::10").unwrap().1, None);
        assert!(parse_vip("web:80")
            .unwrap_err()
            .to_string()
            .contains("--vip"));
        assert_eq!(
            parse_client("198.51.100.0/24").unwrap(),
            ("198.51.100.0".parse().unwrap(), 24)
        );
        assert_eq!(parse_client("2001:db8::1").unwrap().1, 128);
        let err = parse_client("198.51.100.0/33").unwrap_err().to_string();
        assert!(err.contains("0 to 32"), "{err}");
    }

    #[test]
    fn the_filter_carries_vip_port_and_client_prefix_and_zero_means_any() {
        let any = filter(&Request::default());
        assert_eq!((any.vip_family, any.client_family, any.ifindex), (0, 0, 0));
        let f = filter(&Request {
            vip: Some("203.0.113.10".parse().unwrap()),
            vip_port: Some(80),
            client: Some(("198.51.100.0".parse().unwrap(), 24)),
            ifindex: 3,
        });
        assert_eq!(f.vip_family, FAMILY_IPV4);
        assert_eq!(&f.vip[..4], &[203, 0, 113, 10]);
        assert_eq!(f.vip_port, [0, 80]);
        assert_eq!((f.client_prefix, f.ifindex, f.active), (24, 3, 0));
    }

    #[test]
    fn a_new_flow_reads_with_its_maglev_slot_and_backend() {
        let mut ev = event(decision::NEW_FLOW);
        ev.slot = 4242;
        ev.to_addr[..4].copy_from_slice(&[10, 0, 0, 2]);
        ev.to_port = 8080u16.to_be_bytes();
        let e = decode(&ev, |i| (i == 7).then(|| "eth1".to_string()));
        assert_eq!(e.from, "198.51.100.7:40000");
        assert_eq!(e.to, "203.0.113.10:80");
        assert_eq!(e.via.as_deref(), Some("10.0.0.2:8080"));
        assert_eq!(e.maglev_slot, Some(4242));
        let text = line(&e);
        assert!(
            text.contains("eth1")
                && text.contains("new-flow slot 4242 → 10.0.0.2:8080")
                && text.contains("Maglev"),
            "{text}"
        );
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["decision"], "new-flow");
        assert_eq!(json["maglevSlot"], 4242);
    }

    #[test]
    fn hits_passes_arp_and_replies_read_as_what_happened() {
        let mut tunnelled = event(decision::TUNNELLED);
        tunnelled.to_addr[..4].copy_from_slice(&[192, 0, 2, 7]);
        let t = decode(&tunnelled, |_| None);
        assert_eq!(t.via.as_deref(), Some("192.0.2.7"), "the node, no port");
        assert!(line(&t).contains("tunnelled → 192.0.2.7"), "{}", line(&t));
        let hit = decode(&event(decision::CONNTRACK_HIT), |_| None);
        assert_eq!((hit.decision, hit.maglev_slot), ("conntrack-hit", None));
        assert!(!line(&hit).contains("kernel"));
        let mut slow = event(decision::CONNTRACK_HIT);
        slow.flags = lb_common::TRACE_VIA_KERNEL;
        let slow = decode(&slow, |_| None);
        assert!(slow.via_kernel && line(&slow).contains("forwarded by the kernel"));
        assert_eq!(hit.interface, "if7");
        let passed = decode(&event(decision::PASSED_TTL), |_| None);
        assert_eq!(passed.decision, "passed");
        assert!(passed.detail.contains("TTL"));
        let mut arp = event(decision::ARP_REPLY);
        arp.proto = 0;
        let arp = decode(&arp, |_| None);
        assert_eq!((arp.protocol, arp.from.as_str()), ("arp", "198.51.100.7"));
        let mut reply = event(decision::REVERSE_NAT);
        reply.hook = TRACE_HOOK_TC;
        reply.to_addr[..4].copy_from_slice(&[203, 0, 113, 10]);
        reply.to_port = 80u16.to_be_bytes();
        let reply = decode(&reply, |_| None);
        assert_eq!(
            (reply.hook, reply.via.as_deref()),
            ("tc", Some("203.0.113.10:80"))
        );
        assert_eq!(describe(200).0, "unknown");
    }
}
