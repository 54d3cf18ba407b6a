//! This node's end of the tunnels of cluster-wide balancing: its own addresses (the tunnels'
//! source, and the only destination accepted), the node network's MTU, and the other nodes'
//! addresses, the only sources tunnelled packets are accepted from. See lb-ebpf's `tunnel`.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::maps::{Array, MapData, PerCpuHashMap, PerCpuValues};
use lb_common::{
    NodeKey, TunnelSettings, TunnelStats, FAMILY_IPV4, FAMILY_IPV6, MAP_TUNNEL_PEERS,
    MAP_TUNNEL_SETTINGS,
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

/// Every node's counters, summed over CPUs.
pub(super) fn read_peers<T: std::borrow::Borrow<MapData>>(
    map: &PerCpuHashMap<T, NodeKey, TunnelStats>,
) -> Result<Vec<(IpAddr, TunnelStats)>> {
    let mut out = Vec::new();
    for entry in map.iter() {
        let (key, values) = entry.map_err(map_error(MAP_TUNNEL_PEERS))?;
        let sum = values
            .iter()
            .fold(TunnelStats::default(), |a, v| TunnelStats {
                packets: a.packets + v.packets,
                bytes: a.bytes + v.bytes,
            });
        out.push((node_ip(&key), sum));
    }
    out.sort_by_key(|(ip, _)| *ip);
    Ok(out)
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
        let map = self
            .ebpf
            .map_mut(MAP_TUNNEL_PEERS)
            .ok_or(DataplaneError::MissingMap(MAP_TUNNEL_PEERS))?;
        let mut peers: PerCpuHashMap<&mut MapData, NodeKey, TunnelStats> =
            PerCpuHashMap::try_from(map).map_err(map_error(MAP_TUNNEL_PEERS))?;
        // What the map holds (it may have been pinned by an earlier process).
        let held: BTreeSet<IpAddr> = peers
            .keys()
            .filter_map(|k| k.ok())
            .map(|k| node_ip(&k))
            .collect();
        for gone in held.difference(&tunnels.peers) {
            peers
                .remove(&node_key(gone))
                .map_err(map_error(MAP_TUNNEL_PEERS))?;
        }
        for new in tunnels.peers.difference(&held) {
            let zeros = PerCpuValues::try_from(vec![TunnelStats::default(); cpus])
                .map_err(|e| DataplaneError::Cpus(std::io::Error::other(e.to_string())))?;
            peers
                .insert(node_key(new), zeros, 0)
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
        read_peers(&PerCpuHashMap::try_from(map).map_err(map_error(MAP_TUNNEL_PEERS))?)
    }

    /// A backend on another node needs this node's end of a tunnel of its family.
    pub(super) fn check_tunnels(&self, service: &Service, backends: &[Backend]) -> Result<()> {
        for b in backends {
            let Some(node) = b.node else { continue };
            let local = self.tunnels.as_ref().and_then(|t| match node {
                IpAddr::V4(_) => t.local_v4.map(IpAddr::from),
                IpAddr::V6(_) => t.local_v6.map(IpAddr::from),
            });
            if local.is_none() {
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
