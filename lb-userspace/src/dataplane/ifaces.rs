//! The interfaces the XDP program runs on, as it must see them (`IFACES`): each attached
//! interface, and for a bond in native mode each of its ports, which the program runs in and
//! whose ifindex it sees. A port answers ARP/NDP for its bond's service IPs, only frames to the
//! bond's MAC are balanced, and an active-backup bond's standby ports pass everything (the
//! bond drops it): one answer per request, from the active port, following its failovers.
//!
//! Facts are read from sysfs (`/sys/class/net/<bond>/bonding/`); the table is a pure function
//! of them ([`plan`]), written whole the first time and by difference afterwards.

use std::{collections::BTreeMap, fs, path::Path};

use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use lb_common::{
    iface_slot, IfaceEntry, IfaceStats, IFACE_BOND_PORT, IFACE_NATIVE, IFACE_SLOT_SHARED,
    IFACE_STANDBY,
};

use super::error::{DataplaneError, Result};

/// What sysfs says of a bond.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bond {
    /// The mode's name, as `/sys/class/net/<bond>/bonding/mode` gives it ("active-backup").
    pub mode: String,
    /// The active port's name (active-backup; `None` while there is none).
    pub active: Option<String>,
    /// The ports: (name, ifindex).
    pub ports: Vec<(String, u32)>,
}

/// Reads a bond's facts from sysfs; `None` when `name` is not a bond.
pub fn read_bond(name: &str) -> Option<Bond> {
    let dir = Path::new("/sys/class/net").join(name).join("bonding");
    let mode = fs::read_to_string(dir.join("mode")).ok()?;
    let mode = mode.split_whitespace().next().unwrap_or("").to_string();
    let active = fs::read_to_string(dir.join("active_slave"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    let ports = fs::read_to_string(dir.join("slaves"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|port| {
            let ifindex = fs::read_to_string(format!("/sys/class/net/{port}/ifindex")).ok()?;
            Some((port.to_string(), ifindex.trim().parse().ok()?))
        })
        .collect();
    Some(Bond {
        mode,
        active,
        ports,
    })
}

/// The MAC of the bridge `name` is a port of; `None` when it is not a bridge's port.
pub fn read_bridge_mac(name: &str) -> Option<[u8; 6]> {
    let class = Path::new("/sys/class/net").join(name);
    if !class.join("brport").exists() {
        return None;
    }
    parse_mac(
        fs::read_to_string(class.join("master/address"))
            .ok()?
            .trim(),
    )
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// An interface the program is attached to, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub ifindex: u32,
    pub mac: [u8; 6],
    /// The MAC of the bridge it is a port of, when it is one.
    pub bridge_mac: Option<[u8; 6]>,
    /// Native (driver) mode; generic (skb) otherwise.
    pub native: bool,
    /// Its bond facts, when it is a bond.
    pub bond: Option<Bond>,
}

/// The entries the program needs for one attached interface: its own, and in native mode on a
/// bond one per port (the program runs in the ports' drivers). In active-backup, every port but
/// the active one is a standby port. In generic mode the program runs on the bond itself,
/// after the bond has dropped what its standby ports received: the bond's entry is enough.
pub fn entries(attached: &Attached) -> Vec<IfaceEntry> {
    let native = if attached.native { IFACE_NATIVE } else { 0 };
    let upper_mac = attached.bridge_mac.unwrap_or(attached.mac);
    let mut out = vec![IfaceEntry {
        ifindex: attached.ifindex,
        l2_ifindex: attached.ifindex,
        mac: attached.mac,
        flags: native,
        upper_mac,
        _pad: [0; 2],
    }];
    if let (Some(bond), true) = (&attached.bond, attached.native) {
        let active_backup = bond.mode == "active-backup";
        for (name, ifindex) in &bond.ports {
            let standby = active_backup && bond.active.as_deref() != Some(name.as_str());
            out.push(IfaceEntry {
                ifindex: *ifindex,
                l2_ifindex: attached.ifindex,
                mac: attached.mac,
                flags: native | IFACE_BOND_PORT | if standby { IFACE_STANDBY } else { 0 },
                upper_mac,
                _pad: [0; 2],
            });
        }
    }
    out
}

/// `IFACES` and `IFACES_SHARED` as they must be.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    /// Slot → entry.
    pub slots: BTreeMap<u32, IfaceEntry>,
    /// Ifindex → entry, for the interfaces whose slot another holds.
    pub shared: BTreeMap<u32, IfaceEntry>,
}

/// Places every entry: the lowest ifindex of a slot holds it; the others go to the shared
/// hash, and the slot's entry says so.
pub fn plan(entries: &[IfaceEntry]) -> Table {
    let mut sorted: Vec<IfaceEntry> = entries.to_vec();
    sorted.sort_by_key(|e| e.ifindex);
    sorted.dedup_by_key(|e| e.ifindex);
    let mut table = Table::default();
    for entry in sorted {
        let slot = iface_slot(entry.ifindex);
        match table.slots.get_mut(&slot) {
            None => {
                table.slots.insert(slot, entry);
            }
            Some(holder) => {
                holder.flags |= IFACE_SLOT_SHARED;
                table.shared.insert(entry.ifindex, entry);
            }
        }
    }
    table
}

/// Writes `want` over `had` (everything, when `had` is `None`): changed entries first, then
/// the ones that went, so a packet never finds an interface missing that stays.
pub fn write(
    slots: &mut Array<&mut MapData, IfaceEntry>,
    shared: &mut HashMap<&mut MapData, u32, IfaceEntry>,
    had: Option<&Table>,
    want: &Table,
) -> Result<()> {
    let error = |what: &'static str| {
        move |e: aya::maps::MapError| DataplaneError::Map {
            map: what,
            source: e,
        }
    };
    for (ifindex, entry) in &want.shared {
        if had.and_then(|h| h.shared.get(ifindex)) != Some(entry) {
            shared
                .insert(ifindex, entry, 0)
                .map_err(error(lb_common::MAP_IFACES_SHARED))?;
        }
    }
    for slot in 0..lb_common::IFACE_SLOTS {
        let now = want.slots.get(&slot).copied().unwrap_or_default();
        let before = match had {
            Some(h) => h.slots.get(&slot).copied().unwrap_or_default(),
            None => IfaceEntry {
                ifindex: u32::MAX,
                ..IfaceEntry::default()
            },
        };
        if now != before {
            slots
                .set(slot, now, 0)
                .map_err(error(lb_common::MAP_IFACES))?;
        }
    }
    let gone: Vec<u32> = match had {
        Some(h) => h.shared.keys().copied().collect(),
        None => shared.keys().filter_map(|k| k.ok()).collect(),
    };
    for ifindex in gone.iter().filter(|k| !want.shared.contains_key(k)) {
        let _ = shared.remove(ifindex);
    }
    Ok(())
}

/// Reads the table back (every non-empty slot and the shared entries), for `inspect`.
pub fn read(
    slots: &Array<MapData, IfaceEntry>,
    shared: Option<&HashMap<MapData, u32, IfaceEntry>>,
) -> Vec<IfaceEntry> {
    let mut out: Vec<IfaceEntry> = slots
        .iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.ifindex != 0)
        .collect();
    if let Some(shared) = shared {
        out.extend(shared.iter().filter_map(|e| e.ok()).map(|(_, v)| v));
    }
    out.sort_by_key(|e| e.ifindex);
    out
}

/// An interface's counters, summed over CPUs (a shared slot's interfaces count together).
pub fn read_stats<T: std::borrow::Borrow<MapData>>(
    stats: &PerCpuArray<T, IfaceStats>,
    ifindex: u32,
) -> IfaceStats {
    stats
        .get(&iface_slot(ifindex), 0)
        .map(|per_cpu| {
            per_cpu
                .iter()
                .fold(IfaceStats::default(), |a, s| IfaceStats {
                    other_host: a.other_host + s.other_host,
                    standby: a.standby + s.standby,
                })
        })
        .unwrap_or_default()
}

/// What kind of interface `name` is, and so why the program runs there in the mode it does:
/// "bond", "bridge", "vlan", else its driver ("veth", "ixgbe", ...), else "device".
pub fn kind(name: &str) -> String {
    let class = Path::new("/sys/class/net").join(name);
    if class.join("bonding").exists() {
        "bond".into()
    } else if class.join("bridge").exists() {
        "bridge".into()
    } else if Path::new("/proc/net/vlan").join(name).exists() {
        "vlan".into()
    } else {
        super::system::driver(name).unwrap_or_else(|| "device".into())
    }
}

/// The note `inspect` gives an interface in generic mode: why, and what it costs.
pub fn generic_note(kind: &str) -> &'static str {
    match kind {
        "bridge" => "a bridge has no native XDP: the program runs on frames the bridge passes up, after an skb is built; attach to the bridge's ports' NICs, or accept it",
        "vlan" => "a VLAN device has no native XDP: the program runs after an skb is built; attaching to the parent NIC balances tagged frames natively",
        "bond" => "this bond's mode or a port's driver has no native XDP: generic mode on the bond",
        _ => "the driver has no native XDP: the program runs after an skb is built",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

    fn bond(mode: &str, active: Option<&str>) -> Attached {
        Attached {
            ifindex: 10,
            mac: MAC,
            bridge_mac: None,
            native: true,
            bond: Some(Bond {
                mode: mode.to_string(),
                active: active.map(str::to_string),
                ports: vec![("eth0".into(), 3), ("eth1".into(), 4)],
            }),
        }
    }

    fn flags_of(entries: &[IfaceEntry], ifindex: u32) -> u16 {
        entries.iter().find(|e| e.ifindex == ifindex).unwrap().flags
    }

    #[test]
    fn an_active_backup_bond_answers_on_its_active_port_only_and_follows_a_failover() {
        let before = entries(&bond("active-backup", Some("eth0")));
        assert_eq!(before.len(), 3);
        assert!(before.iter().all(|e| e.l2_ifindex == 10 && e.mac == MAC));
        assert_eq!(flags_of(&before, 3) & IFACE_STANDBY, 0);
        assert_ne!(flags_of(&before, 4) & IFACE_STANDBY, 0);
        let after = entries(&bond("active-backup", Some("eth1")));
        assert_ne!(flags_of(&after, 3) & IFACE_STANDBY, 0);
        assert_eq!(flags_of(&after, 4) & IFACE_STANDBY, 0);
        // No active port at all: nothing answers.
        let none = entries(&bond("active-backup", None));
        assert!(none
            .iter()
            .filter(|e| e.flags & IFACE_BOND_PORT != 0)
            .all(|e| e.flags & IFACE_STANDBY != 0));
    }

    #[test]
    fn a_lag_bond_answers_on_every_port_the_switch_chose() {
        for mode in ["balance-xor", "802.3ad", "balance-rr"] {
            let e = entries(&bond(mode, None));
            assert!(e.iter().all(|e| e.flags & IFACE_STANDBY == 0), "{mode}");
            assert!(e
                .iter()
                .filter(|e| e.ifindex != 10)
                .all(|e| e.flags & IFACE_BOND_PORT != 0 && e.l2_ifindex == 10));
        }
    }

    #[test]
    fn a_bond_in_generic_mode_needs_only_its_own_entry() {
        let mut b = bond("active-backup", Some("eth0"));
        b.native = false;
        assert_eq!(
            entries(&b),
            vec![IfaceEntry {
                ifindex: 10,
                l2_ifindex: 10,
                mac: MAC,
                flags: 0,
                upper_mac: MAC,
                _pad: [0; 2],
            }]
        );
    }

    #[test]
    fn a_bridge_ports_frames_to_the_bridges_mac_are_this_hosts_too() {
        let bridge = [2, 0, 0, 0, 0, 0xb7];
        let mut b = bond("active-backup", Some("eth0"));
        b.bridge_mac = Some(bridge);
        // The bond and its ports: their own MAC, and the bridge's.
        assert!(entries(&b)
            .iter()
            .all(|e| e.mac == MAC && e.upper_mac == bridge));
        assert_eq!(parse_mac("02:00:00:00:00:b7"), Some(bridge));
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        assert_eq!(parse_mac("02:00:00:00:00:b7:01"), None);
    }

    #[test]
    fn interfaces_sharing_a_slot_are_all_found_through_the_shared_hash() {
        let e = |ifindex| IfaceEntry {
            ifindex,
            l2_ifindex: ifindex,
            mac: MAC,
            flags: 0,
            upper_mac: MAC,
            _pad: [0; 2],
        };
        let slots = lb_common::IFACE_SLOTS;
        let table = plan(&[e(5 + slots), e(5), e(6), e(5 + 2 * slots)]);
        assert_eq!(table.slots.len(), 2);
        assert_eq!(table.slots[&5].ifindex, 5);
        assert_ne!(table.slots[&5].flags & IFACE_SLOT_SHARED, 0);
        assert_eq!(table.slots[&6].flags & IFACE_SLOT_SHARED, 0);
        assert_eq!(
            table.shared.keys().copied().collect::<Vec<_>>(),
            vec![5 + slots, 5 + 2 * slots]
        );
    }
}
