//! Closed TCP flows leave the connection table. The programs record each side's FIN in the
//! flow's entry (the client's in XDP, the backend's in TC) and, once both sides have sent one,
//! when (lb-common's `FlowValue`). The sweep here removes such flows a grace period later, with
//! their reverse-NAT entries, so closed connections hold no slots (an RST removes its flow at
//! once, in the programs). The same walk counts tracked flows by state, for /metrics and
//! `sluice inspect`.

use std::{
    borrow::{Borrow, BorrowMut},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::{
    BackendValue, FlowKey, FlowValue, ReverseNatValue, FLOW_BACKEND_FIN, FLOW_CLIENT_FIN,
    MAP_BACKENDS, MAP_CONNTRACK, MAP_REVERSE_NAT,
};

use super::{map_error, monotonic_ns, DataplaneError, Result};

/// How long a flow closed from both sides stays: its last ACK and any retransmitted FIN still
/// reach the same backend.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// How often `spawn_sweeper` walks the table. A closed flow leaves within
/// `CLOSE_GRACE + SWEEP_EVERY`.
pub const SWEEP_EVERY: Duration = Duration::from_secs(2);

/// Closed flows removed by sweeps in this process (for /metrics).
static REMOVED: AtomicU64 = AtomicU64::new(0);

/// Closed flows the sweeps of this process have removed.
pub fn removed_total() -> u64 {
    REMOVED.load(Ordering::Relaxed)
}

/// Tracked flows by state.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlowCensus {
    /// Neither side has sent a FIN (UDP flows are always open).
    pub open: usize,
    /// One side has sent a FIN.
    pub half_closed: usize,
    /// Both sides have: removed after the grace period.
    pub closed: usize,
}

impl FlowCensus {
    pub fn total(&self) -> usize {
        self.open + self.half_closed + self.closed
    }

    fn count(&mut self, value: &FlowValue) {
        let fins = value.flags & (FLOW_CLIENT_FIN | FLOW_BACKEND_FIN);
        if value.closed_at != 0 {
            self.closed += 1;
        } else if fins != 0 {
            self.half_closed += 1;
        } else {
            self.open += 1;
        }
    }
}

/// True when a flow closed from both sides has outlived the grace period at `now_ns`
/// (CLOCK_MONOTONIC, the programs' `bpf_ktime_get_ns`).
pub fn expired(value: &FlowValue, now_ns: u64, grace: Duration) -> bool {
    value.closed_at != 0 && now_ns.saturating_sub(value.closed_at) >= grace.as_nanos() as u64
}

/// The reverse-NAT key of a flow (backend → client), when its backend slot still holds the
/// backend the flow was given.
pub fn reverse_key(key: &FlowKey, value: &FlowValue, backend: &BackendValue) -> Option<FlowKey> {
    (backend.generation == value.generation).then_some(FlowKey {
        src: backend.addr,
        dst: key.src,
        sport: backend.port,
        dport: key.sport,
        proto: key.proto,
        family: key.family,
        _pad: [0; 2],
    })
}

/// One tracked flow as `sluice inspect --flows` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackedFlow {
    pub client: std::net::SocketAddr,
    /// The VIP and port.
    pub service: std::net::SocketAddr,
    pub protocol: &'static str,
    /// Its backend, while the backend's slot still holds it.
    pub backend: Option<std::net::SocketAddr>,
    /// The backend's node when it is another node (the flow is tunnelled there).
    pub node: Option<std::net::IpAddr>,
    /// `open`, `half-closed` or `closed`.
    pub state: &'static str,
}

fn ip_of(family: u8, addr: &[u8; 16]) -> std::net::IpAddr {
    if family == lb_common::FAMILY_IPV4 {
        std::net::IpAddr::from([addr[0], addr[1], addr[2], addr[3]])
    } else {
        std::net::IpAddr::from(*addr)
    }
}

/// Up to `limit` tracked flows, each with its backend and whether it goes to another node.
pub fn list<C: Borrow<MapData>, B: Borrow<MapData>>(
    conntrack: &HashMap<C, FlowKey, FlowValue>,
    backends: &Array<B, BackendValue>,
    limit: usize,
) -> Vec<TrackedFlow> {
    let mut out = Vec::new();
    for (key, value) in conntrack.iter().filter_map(|entry| entry.ok()).take(limit) {
        let backend = backends
            .get(&value.backend_id, 0)
            .ok()
            .filter(|b| b.generation == value.generation);
        let mut census = FlowCensus::default();
        census.count(&value);
        let state = if census.closed > 0 {
            "closed"
        } else if census.half_closed > 0 {
            "half-closed"
        } else {
            "open"
        };
        out.push(TrackedFlow {
            client: (ip_of(key.family, &key.src), u16::from_be_bytes(key.sport)).into(),
            service: (ip_of(key.family, &key.dst), u16::from_be_bytes(key.dport)).into(),
            protocol: if key.proto == lb_common::PROTO_TCP {
                "tcp"
            } else {
                "udp"
            },
            backend: backend.map(|b| (ip_of(b.family, &b.addr), u16::from_be_bytes(b.port)).into()),
            node: backend
                .filter(|b| b.flags & lb_common::BACKEND_REMOTE != 0)
                .map(|b| ip_of(b.family, &b.node)),
            state,
        });
    }
    out.sort_by_key(|f| (f.service, f.client));
    out
}

/// Counts tracked flows by state.
pub fn census<T: Borrow<MapData>>(conntrack: &HashMap<T, FlowKey, FlowValue>) -> FlowCensus {
    let mut census = FlowCensus::default();
    for (_, value) in conntrack.iter().filter_map(|entry| entry.ok()) {
        census.count(&value);
    }
    census
}

/// Removes the flows closed longer than `grace` ago, and their reverse-NAT entries. Returns the
/// census of what stays and how many were removed.
pub fn sweep<C, R, B>(
    conntrack: &mut HashMap<C, FlowKey, FlowValue>,
    reverse_nat: &mut HashMap<R, FlowKey, ReverseNatValue>,
    backends: &Array<B, BackendValue>,
    now_ns: u64,
    grace: Duration,
) -> (FlowCensus, usize)
where
    C: BorrowMut<MapData>,
    R: BorrowMut<MapData>,
    B: Borrow<MapData>,
{
    let mut census = FlowCensus::default();
    let mut done = Vec::new();
    for (key, value) in conntrack.iter().filter_map(|entry| entry.ok()) {
        if expired(&value, now_ns, grace) {
            done.push((key, value));
        } else {
            census.count(&value);
        }
    }
    let mut removed = 0;
    for (key, value) in &done {
        // Gone already (the client's RST, LRU eviction) is fine.
        if conntrack.remove(key).is_ok() {
            removed += 1;
        }
        if let Some(reverse) = backends
            .get(&value.backend_id, 0)
            .ok()
            .and_then(|backend| reverse_key(key, value, &backend))
        {
            let _ = reverse_nat.remove(&reverse);
        }
    }
    REMOVED.fetch_add(removed as u64, Ordering::Relaxed);
    (census, removed)
}

/// One sweep over the maps pinned in `pin_dir`.
pub fn sweep_pinned(pin_dir: &Path, grace: Duration) -> Result<(FlowCensus, usize)> {
    let open = |name: &'static str| {
        let path = pin_dir.join(name);
        MapData::from_pin(&path).map_err(|source| DataplaneError::Pinned { path, source })
    };
    let mut conntrack: HashMap<MapData, FlowKey, FlowValue> =
        HashMap::try_from(Map::LruHashMap(open(MAP_CONNTRACK)?))
            .map_err(map_error(MAP_CONNTRACK))?;
    let mut reverse_nat: HashMap<MapData, FlowKey, ReverseNatValue> =
        HashMap::try_from(Map::LruHashMap(open(MAP_REVERSE_NAT)?))
            .map_err(map_error(MAP_REVERSE_NAT))?;
    let backends: Array<MapData, BackendValue> =
        Array::try_from(Map::Array(open(MAP_BACKENDS)?)).map_err(map_error(MAP_BACKENDS))?;
    Ok(sweep(
        &mut conntrack,
        &mut reverse_nat,
        &backends,
        monotonic_ns(),
        grace,
    ))
}

/// Sweeps the maps pinned in `pin_dir` every `SWEEP_EVERY`, for as long as the process runs
/// (`sluice run` and the speaker). Reopens the maps each time, so a data plane reloaded with
/// fresh maps is swept too.
pub fn spawn_sweeper(pin_dir: PathBuf) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("flow-sweeper".into())
        .spawn(move || {
            let mut failing = false;
            loop {
                std::thread::sleep(SWEEP_EVERY);
                match sweep_pinned(&pin_dir, CLOSE_GRACE) {
                    Ok((census, removed)) => {
                        failing = false;
                        if removed > 0 {
                            tracing::debug!(
                                event = "closedFlowsRemoved",
                                removed,
                                open = census.open,
                                half_closed = census.half_closed,
                                closed = census.closed
                            );
                        }
                    }
                    Err(error) if !failing => {
                        failing = true;
                        tracing::warn!(event = "flowSweepFailed", error = %error);
                    }
                    Err(_) => {}
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::NextHop;

    fn value(flags: u32, closed_at: u64) -> FlowValue {
        FlowValue {
            backend_id: 1,
            generation: 7,
            next_hop: NextHop {
                ifindex: 2,
                src_mac: [0; 6],
                dst_mac: [0; 6],
            },
            flags,
            _pad: 0,
            closed_at,
        }
    }

    #[test]
    fn a_flow_closed_from_both_sides_expires_after_the_grace_period_and_no_other_does() {
        let grace = Duration::from_secs(5);
        let closed = value(FLOW_CLIENT_FIN | FLOW_BACKEND_FIN, 1_000_000_000);
        assert!(!expired(&closed, 5_999_999_999, grace));
        assert!(expired(&closed, 6_000_000_000, grace));
        assert!(!expired(&value(FLOW_CLIENT_FIN, 0), u64::MAX, grace));
        assert!(!expired(&value(0, 0), u64::MAX, grace));
        // A clock read before the program's (another CPU) is not a wrap-around.
        assert!(!expired(&closed, 0, grace));
    }

    #[test]
    fn the_census_counts_open_half_closed_and_closed_flows() {
        let mut census = FlowCensus::default();
        for v in [
            value(0, 0),
            value(FLOW_CLIENT_FIN, 0),
            value(FLOW_BACKEND_FIN, 0),
            value(FLOW_CLIENT_FIN | FLOW_BACKEND_FIN, 9),
        ] {
            census.count(&v);
        }
        assert_eq!(
            census,
            FlowCensus {
                open: 1,
                half_closed: 2,
                closed: 1
            }
        );
        assert_eq!(census.total(), 4);
    }

    #[test]
    fn a_reverse_key_is_only_built_while_the_backend_slot_holds_the_flows_backend() {
        let key = FlowKey {
            src: [1; 16],
            dst: [2; 16],
            sport: [0, 9],
            dport: [0, 80],
            proto: 6,
            family: 6,
            _pad: [0; 2],
        };
        let mut backend = BackendValue {
            addr: [3; 16],
            port: [0x1f, 0x90],
            ..bytemuck::Zeroable::zeroed()
        };
        backend.generation = 7;
        let reverse = reverse_key(&key, &value(0, 0), &backend).unwrap();
        assert_eq!(
            (reverse.src, reverse.dst, reverse.sport, reverse.dport),
            ([3; 16], [1; 16], [0x1f, 0x90], [0, 9])
        );
        backend.generation = 8;
        assert!(reverse_key(&key, &value(0, 0), &backend).is_none());
    }
}
