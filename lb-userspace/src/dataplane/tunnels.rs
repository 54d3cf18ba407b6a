//! This node's end of the tunnels of cluster-wide balancing: its own addresses (the tunnels'
//! source, and the only destination accepted), the node network's MTU, and the other nodes'
//! addresses, the only sources tunnelled packets are accepted from. See lb-ebpf's `tunnel`.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::maps::{Array, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues};
use lb_common::{
    tunnel_probes, NodeKey, TunnelSettings, TunnelSlot, TunnelStats, FAMILY_IPV4, FAMILY_IPV6,
    MAP_TUNNEL_PEERS, MAP_TUNNEL_SETTINGS, MAP_TUNNEL_SLOTS, TUNNEL_SLOTS,
};

use super::{map_error, Backend, Dataplane, DataplaneError, Result, Service};

/// What the tunnels need to know.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tunnels {
    /// This node's IPv4 address on the node network (IPIP's source). `None`: no IPv4 tunnel.
    pub local_v4: Option<Ipv4Addr>,
    /// This node's IPv6 address (IPv6 in IPv6). `None`: no IPv6 tunnel.
    pub local_v6: Option<Ipv6Addr>,
    /// The node network's MTU (0: no limit).
    pub mtu: u32,
    /// The other nodes' addresses.
    pub peers: BTreeSet<IpAddr>,
}

impl Tunnels {
    /// This node has its end of a tunnel of `node`'s family.
    pub fn reaches(&self, node: &IpAddr) -> bool {
        match node {
            IpAddr::V4(_) => self.local_v4.is_some(),
            IpAddr::V6(_) => self.local_v6.is_some(),
        }
    }
}

fn node_key(ip: &IpAddr) -> NodeKey {
    let mut addr = [0u8; 16];
    let family = match ip {
        IpAddr::V4(v4) => {
            addr[..4].copy_from_slice(&v4.octets());
            FAMILY_IPV4
        }
        IpAddr::V6(v6) => {
            addr = v6.octets();
            FAMILY_IPV6
        }
    };
    NodeKey {
        addr,
        family,
        _pad: [0; 3],
    }
}

fn node_ip(key: &NodeKey) -> IpAddr {
    if key.family == FAMILY_IPV4 {
        IpAddr::from([key.addr[0], key.addr[1], key.addr[2], key.addr[3]])
    } else {
        IpAddr::from(key.addr)
    }
}

/// The traffic between this node and one other through the tunnels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunnelTraffic {
    pub node: Option<IpAddr>,
    /// Tunnelled here by that node (outer headers included).
    pub in_packets: u64,
    pub in_bytes: u64,
    /// Tunnelled there by this node: the traffic of the backends on that node (inner bytes).
    pub out_packets: u64,
    pub out_bytes: u64,
}

/// Per other node, what came in (`peers`, from the map of nodes) and what went out (the
/// counters of the backends on that node), by node address.
pub fn traffic_by_node(
    services: &[super::ServiceStats],
    peers: &[(IpAddr, TunnelStats)],
) -> Vec<TunnelTraffic> {
    let mut by: std::collections::BTreeMap<IpAddr, TunnelTraffic> = Default::default();
    for (node, stats) in peers {
        let t = by.entry(*node).or_default();
        t.in_packets += stats.packets;
        t.in_bytes += stats.bytes;
    }
    for s in services {
        for (backend, traffic) in &s.backends {
            if let Some(node) = backend.node {
                let t = by.entry(node).or_default();
                t.out_packets += traffic.packets;
                t.out_bytes += traffic.bytes;
            }
        }
    }
    by.into_iter()
        .map(|(node, t)| TunnelTraffic {
            node: Some(node),
            ..t
        })
        .collect()
}

/// Sends an empty UDP datagram to the discard port (9) of each node, so that the kernel
/// resolves its next hop: the XDP program finds a flow's next hop in the kernel's neighbour
/// table, and a tunnelled packet it cannot send itself cannot be left to the kernel (its source
/// is this node's own address, which the kernel refuses on input).
pub fn warm(peers: &[IpAddr]) {
    let (v4, v6) = (
        std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)),
        std::net::UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)),
    );
    for peer in peers {
        let socket = if peer.is_ipv4() { &v4 } else { &v6 };
        if let Ok(socket) = socket {
            let _ = socket.send_to(&[], (*peer, 9));
        }
    }
}

/// Every node's counters, summed over CPUs: its entry in the hash of nodes, plus its slot's
/// (`slots`: absent in pin directories of versions before the slots).
pub(super) fn read_peers<T: std::borrow::Borrow<MapData>, S: std::borrow::Borrow<MapData>>(
    map: &PerCpuHashMap<T, NodeKey, TunnelStats>,
    slots: Option<&PerCpuArray<S, TunnelSlot>>,
) -> Result<Vec<(IpAddr, TunnelStats)>> {
    let add = |a: TunnelStats, v: &TunnelStats| TunnelStats {
        packets: a.packets + v.packets,
        bytes: a.bytes + v.bytes,
    };
    let mut by: std::collections::BTreeMap<NodeKey, TunnelStats> = Default::default();
    for entry in map.iter() {
        let (key, values) = entry.map_err(map_error(MAP_TUNNEL_PEERS))?;
        by.insert(key, values.iter().fold(TunnelStats::default(), add));
    }
    // A node's slot, if it has one, is among its probes: only those are read.
    if let Some(slots) = slots {
        for (key, sum) in by.iter_mut() {
            for index in tunnel_probes(key) {
                let values = slots.get(&index, 0).map_err(map_error(MAP_TUNNEL_SLOTS))?;
                if values[0].key == *key {
                    *sum = values.iter().map(|v| &v.stats).fold(*sum, add);
                    break;
                }
            }
        }
    }
    let mut out: Vec<(IpAddr, TunnelStats)> =
        by.into_iter().map(|(k, v)| (node_ip(&k), v)).collect();
    out.sort_by_key(|(ip, _)| *ip);
    Ok(out)
}

/// The slot writes that make `slots` (each slot's key now; all zero: free) hold the nodes of
/// `wanted`: a slot whose node is not wanted is cleared, and a wanted node without a slot goes
/// to the first free one of its [`TUNNEL_SLOT_PROBES`] (none free: it is checked in the hash
/// alone). A node keeps its slot, so its counters stay. Pure.
pub fn place_in_slots(slots: &[NodeKey], wanted: &BTreeSet<NodeKey>) -> Vec<(u32, NodeKey)> {
    let free = NodeKey::default();
    let mut now: Vec<NodeKey> = slots.to_vec();
    let mut writes = Vec::new();
    for (index, key) in now.iter_mut().enumerate() {
        if *key != free && !wanted.contains(key) {
            *key = free;
            writes.push((index as u32, free));
        }
    }
    for key in wanted {
        if now.contains(key) {
            continue;
        }
        if let Some(i) = tunnel_probes(key).find(|i| now.get(*i as usize) == Some(&free)) {
            now[i as usize] = *key;
            writes.push((i, *key));
        }
    }
    writes
}

impl Dataplane {
    /// Sets this node's end of the tunnels. Nodes that stay keep their counters.
    pub fn set_tunnels(&mut self, tunnels: &Tunnels) -> Result<()> {
        if self.tunnels.as_ref() == Some(tunnels) {
            return Ok(());
        }
        {
            let map = self
                .ebpf
                .map_mut(MAP_TUNNEL_SETTINGS)
                .ok_or(DataplaneError::MissingMap(MAP_TUNNEL_SETTINGS))?;
            let mut array: Array<&mut MapData, TunnelSettings> =
                Array::try_from(map).map_err(map_error(MAP_TUNNEL_SETTINGS))?;
            let settings = TunnelSettings {
                src_v4: tunnels.local_v4.map_or([0; 4], |ip| ip.octets()),
                mtu: tunnels.mtu,
                src_v6: tunnels.local_v6.map_or([0; 16], |ip| ip.octets()),
            };
            array
                .set(0, settings, 0)
                .map_err(map_error(MAP_TUNNEL_SETTINGS))?;
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Cpus(e))?;
        let mut peers = self.peers_map()?;
        // What the map holds (it may have been pinned by an earlier process).
        let held: BTreeSet<IpAddr> = peers
            .keys()
            .filter_map(|k| k.ok())
            .map(|k| node_ip(&k))
            .collect();
        for new in tunnels.peers.difference(&held) {
            let zeros = PerCpuValues::try_from(vec![TunnelStats::default(); cpus])
                .map_err(|e| DataplaneError::Cpus(std::io::Error::other(e.to_string())))?;
            peers
                .insert(node_key(new), zeros, 0)
                .map_err(map_error(MAP_TUNNEL_PEERS))?;
        }
        // The slots: after a new node is in the hash, before a gone one leaves it (a packet
        // checked meanwhile finds the node in one or the other, or is refused once it is gone).
        {
            let map = self
                .ebpf
                .map_mut(MAP_TUNNEL_SLOTS)
                .ok_or(DataplaneError::MissingMap(MAP_TUNNEL_SLOTS))?;
            let mut slots: PerCpuArray<&mut MapData, TunnelSlot> =
                PerCpuArray::try_from(map).map_err(map_error(MAP_TUNNEL_SLOTS))?;
            let mut now = Vec::with_capacity(TUNNEL_SLOTS as usize);
            for index in 0..TUNNEL_SLOTS {
                let values = slots.get(&index, 0).map_err(map_error(MAP_TUNNEL_SLOTS))?;
                now.push(values[0].key);
            }
            let wanted: BTreeSet<NodeKey> = tunnels.peers.iter().map(node_key).collect();
            for (index, key) in place_in_slots(&now, &wanted) {
                let slot = TunnelSlot {
                    key,
                    ..Default::default()
                };
                let values = PerCpuValues::try_from(vec![slot; cpus])
                    .map_err(|e| DataplaneError::Cpus(std::io::Error::other(e.to_string())))?;
                slots
                    .set(index, values, 0)
                    .map_err(map_error(MAP_TUNNEL_SLOTS))?;
            }
        }
        let mut peers = self.peers_map()?;
        for gone in held.difference(&tunnels.peers) {
            peers
                .remove(&node_key(gone))
                .map_err(map_error(MAP_TUNNEL_PEERS))?;
        }
        let added: Vec<IpAddr> = tunnels.peers.difference(&held).copied().collect();
        warm(&added);
        tracing::info!(
            event = "tunnelsSet",
            local_v4 = ?tunnels.local_v4,
            local_v6 = ?tunnels.local_v6,
            mtu = tunnels.mtu,
            nodes = tunnels.peers.len()
        );
        self.tunnels = Some(tunnels.clone());
        Ok(())
    }

    fn peers_map(&mut self) -> Result<PerCpuHashMap<&mut MapData, NodeKey, TunnelStats>> {
        let map = self
            .ebpf
            .map_mut(MAP_TUNNEL_PEERS)
            .ok_or(DataplaneError::MissingMap(MAP_TUNNEL_PEERS))?;
        PerCpuHashMap::try_from(map).map_err(map_error(MAP_TUNNEL_PEERS))
    }

    /// Has the kernel resolve (again) the next hop toward every other node; see [`warm`].
    pub fn warm_tunnel_peers(&self) {
        if let Some(tunnels) = &self.tunnels {
            warm(&tunnels.peers.iter().copied().collect::<Vec<_>>());
        }
    }

    /// The packets each other node tunnelled here.
    pub fn tunnel_peers(&self) -> Result<Vec<(IpAddr, TunnelStats)>> {
        let map = self
            .ebpf
            .map(MAP_TUNNEL_PEERS)
            .ok_or(DataplaneError::MissingMap(MAP_TUNNEL_PEERS))?;
        let peers = PerCpuHashMap::try_from(map).map_err(map_error(MAP_TUNNEL_PEERS))?;
        let slots = self
            .ebpf
            .map(MAP_TUNNEL_SLOTS)
            .ok_or(DataplaneError::MissingMap(MAP_TUNNEL_SLOTS))?;
        let slots = PerCpuArray::try_from(slots).map_err(map_error(MAP_TUNNEL_SLOTS))?;
        read_peers(&peers, Some(&slots))
    }

    /// A backend on another node needs this node's end of a tunnel of its family.
    pub(super) fn check_tunnels(&self, service: &Service, backends: &[Backend]) -> Result<()> {
        for b in backends {
            let Some(node) = b.node else { continue };
            if !self.tunnels.as_ref().is_some_and(|t| t.reaches(&node)) {
                return Err(DataplaneError::InvalidService {
                    service: service.to_string(),
                    reason: format!(
                        "backend {} is on node {node}, but this node has no {} address for tunnels",
                        b.maglev_key(),
                        if node.is_ipv4() { "IPv4" } else { "IPv6" }
                    ),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{node_words, tunnel_slot, TUNNEL_SLOT_PROBES};

    fn key(ip: &str) -> NodeKey {
        node_key(&ip.parse().unwrap())
    }

    fn apply(slots: &mut [NodeKey], writes: &[(u32, NodeKey)]) {
        for (i, k) in writes {
            slots[*i as usize] = *k;
        }
    }

    fn first(k: &NodeKey) -> u32 {
        tunnel_slot(&node_words(k), k.family)
    }

    #[test]
    fn nodes_go_to_a_free_slot_among_their_probes_keep_it_and_leave_it_when_gone() {
        let mut slots = vec![NodeKey::default(); TUNNEL_SLOTS as usize];
        let nodes: BTreeSet<NodeKey> = ["192.0.2.1", "192.0.2.2", "fd00::3", "10.1.2.3"]
            .iter()
            .map(|ip| key(ip))
            .collect();
        let writes = place_in_slots(&slots, &nodes);
        assert_eq!(writes.len(), 4);
        apply(&mut slots, &writes);
        for n in &nodes {
            let at = slots.iter().position(|s| s == n).expect("placed") as u32;
            let distance = (at + TUNNEL_SLOTS - first(n)) % TUNNEL_SLOTS;
            assert!(
                distance < TUNNEL_SLOT_PROBES,
                "{n:?} at {at}, first {}",
                first(n)
            );
        }
        // The same set again: nothing to write. One node fewer: only its slot is cleared.
        assert!(place_in_slots(&slots, &nodes).is_empty());
        let gone = key("192.0.2.2");
        let fewer: BTreeSet<NodeKey> = nodes.iter().filter(|k| **k != gone).copied().collect();
        let before = slots.clone();
        let writes = place_in_slots(&slots, &fewer);
        let at = before.iter().position(|s| *s == gone).unwrap() as u32;
        assert_eq!(writes, vec![(at, NodeKey::default())]);
    }

    #[test]
    fn nodes_beyond_their_probes_get_no_slot_and_the_rest_keep_theirs() {
        // More nodes whose first slot is the same than there are probes.
        let mut same = Vec::new();
        let target = first(&key("10.0.0.1"));
        for n in 0..1_000_000u32 {
            let k = key(&std::net::Ipv4Addr::from(0x0a00_0000 + n).to_string());
            if first(&k) == target {
                same.push(k);
                if same.len() == TUNNEL_SLOT_PROBES as usize + 2 {
                    break;
                }
            }
        }
        assert_eq!(same.len(), TUNNEL_SLOT_PROBES as usize + 2);
        let slots = vec![NodeKey::default(); TUNNEL_SLOTS as usize];
        let wanted: BTreeSet<NodeKey> = same.iter().copied().collect();
        let writes = place_in_slots(&slots, &wanted);
        assert_eq!(writes.len(), TUNNEL_SLOT_PROBES as usize);
        for (i, _) in &writes {
            let distance = (i + TUNNEL_SLOTS - target) % TUNNEL_SLOTS;
            assert!(distance < TUNNEL_SLOT_PROBES);
        }
    }

    #[test]
    fn a_slot_holding_a_node_no_longer_wanted_is_cleared_even_when_the_map_came_pinned() {
        let mut slots = vec![NodeKey::default(); TUNNEL_SLOTS as usize];
        slots[5] = key("198.51.100.9");
        let writes = place_in_slots(&slots, &BTreeSet::new());
        assert_eq!(writes, vec![(5, NodeKey::default())]);
    }
}
