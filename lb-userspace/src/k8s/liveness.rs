//! Which speakers are alive, from their Leases and from the mesh; pure.
//!
//! Each speaker writes a Lease (`sluice-speaker-<node>`) whose annotations say which interfaces
//! the node has, where its mesh listens and what it announces. The mesh says within about a
//! second that a speaker stopped answering. When they disagree:
//! - **The mesh wins** for a node it knows: a node the mesh holds alive (or restarting within its
//!   grace) is alive even when its Lease has expired (the API server may be down: an outage of
//!   the control plane must not withdraw anything), and a node the mesh declared down is dead
//!   even though its Lease has not expired yet (that is what makes failover fast).
//! - **Unless its Lease proves it alive**: a node the mesh declared down whose Lease was renewed
//!   *after* that (its renew time changed since) is alive but unreachable on the mesh (a
//!   firewall on the mesh port, say). Counting it dead would make two nodes answer for its IPs.
//! - A node the mesh has never heard of (its mesh is off or cannot form) is judged by its Lease
//!   alone, as before the mesh.
//!
//! Lease expiry is read on the *lease clock*: now while the API server answers, frozen at the
//! last moment it answered while it does not, so that Leases nobody can renew during an outage do
//! not expire in every speaker's eyes at once.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use k8s_openapi::{
    api::{coordination::v1::Lease, core::v1::Node},
    jiff::Timestamp,
};
use kube::ResourceExt;

use super::{announce::NodeView, lease};

/// Lease annotation: the node's interfaces, comma-separated.
pub const INTERFACES_ANNOTATION: &str = "sluice.dev/interfaces";
/// Lease annotation: its interfaces' own subnets, `eth0=192.0.2.0/24,eth0=2001:db8::/64`.
pub const SUBNETS_ANNOTATION: &str = "sluice.dev/subnets";
/// Lease annotation: the IPs the node answers ARP/NDP for, comma-separated.
pub const ANNOUNCING_ANNOTATION: &str = "sluice.dev/announcing";
/// Lease annotation: the IPs the node announces to its BGP peers, comma-separated.
pub const BGP_ANNOTATION: &str = "sluice.dev/bgp-announcing";
/// Lease annotation: where the node's speaker listens for the mesh (`IP:port`).
pub const MESH_ANNOTATION: &str = "sluice.dev/mesh";
/// Speakers' Leases are named this, then the node name.
pub const LEASE_PREFIX: &str = "sluice-speaker-";

/// What the mesh says of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeshVerdict {
    /// Active in the mesh, or restarting within its grace.
    Alive,
    /// Active again after the mesh declared it down, when its Lease's renew time was
    /// `renew_at_down`. Alive; but while its Lease has not been renewed since, what the Lease
    /// says it announces is from before (a node back from a partition, its IPs taken over
    /// meanwhile) and counts for nothing.
    Returned { renew_at_down: Option<String> },
    /// Declared down; `renew_at_down` is its Lease's renew time when the speaker first saw it
    /// down (a later renew time proves it alive after all).
    Down { renew_at_down: Option<String> },
}

/// Is a node alive? `lease_live`: its Lease has not expired on the lease clock; `renew`: its
/// Lease's renew time now; `verdict`: what the mesh says (`None`: the mesh does not know it).
pub fn alive(lease_live: bool, renew: Option<&str>, verdict: Option<&MeshVerdict>) -> bool {
    match verdict {
        None => lease_live,
        // The Lease is the record of the node's interfaces and announcements: a node without
        // one (deleted by an operator to move its IPs away) is out, whatever the mesh says.
        Some(MeshVerdict::Alive | MeshVerdict::Returned { .. }) => renew.is_some(),
        Some(MeshVerdict::Down { renew_at_down }) => {
            lease_live && renew.is_some() && renew != renew_at_down.as_deref()
        }
    }
}

/// A Node's addresses other nodes reach it at: its InternalIPs, else its ExternalIPs.
pub fn node_addresses(node: &Node) -> Vec<IpAddr> {
    let listed = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let of = |kind: &str| -> Vec<IpAddr> {
        listed
            .iter()
            .filter(|a| a.type_ == kind)
            .filter_map(|a| a.address.parse().ok())
            .collect()
    };
    let internal = of("InternalIP");
    if internal.is_empty() {
        of("ExternalIP")
    } else {
        internal
    }
}

fn split(list: Option<&String>) -> impl Iterator<Item = &str> {
    list.into_iter()
        .flat_map(|l| l.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

fn lease_of<'a>(leases: &'a [Lease], node: &str) -> Option<&'a Lease> {
    leases
        .iter()
        .find(|l| l.name_any() == format!("{LEASE_PREFIX}{node}"))
}

/// A Lease's renew time, as written (compared, never parsed).
pub fn renew_time(lease: &Lease) -> Option<String> {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.renew_time.as_ref())
        .map(|t| t.0.to_string())
}

/// The renew time of `node`'s Lease.
pub fn renew_time_of(leases: &[Lease], node: &str) -> Option<String> {
    lease_of(leases, node).and_then(renew_time)
}

/// The nodes as the speakers see them, and who announces which IP now (alive nodes only).
/// `lease_clock`: see the module's notes; `mesh`: the mesh's verdicts (`None`: no mesh).
pub fn node_views(
    nodes: &[Node],
    leases: &[Lease],
    lease_clock: Timestamp,
    mesh: Option<&BTreeMap<String, MeshVerdict>>,
) -> (Vec<NodeView>, BTreeMap<IpAddr, String>) {
    let mut announcers = BTreeMap::new();
    let mut views = Vec::new();
    for node in nodes {
        let name = node.name_any();
        let ready = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let lease = lease_of(leases, &name);
        let lease_live = lease
            .and_then(|l| l.spec.as_ref())
            .and_then(|s| lease::expiry(s, 15))
            .is_some_and(|end| lease_clock < end);
        let renew = lease.and_then(renew_time);
        let verdict = mesh.and_then(|m| m.get(&name));
        let live = alive(lease_live, renew.as_deref(), verdict);
        let stale_claims = matches!(verdict, Some(MeshVerdict::Returned { renew_at_down })
            if *renew_at_down == renew);
        let annotations = lease.map(|l| l.annotations().clone()).unwrap_or_default();
        if live && !stale_claims {
            for ip in split(annotations.get(ANNOUNCING_ANNOTATION)) {
                if let Ok(ip) = ip.parse() {
                    announcers.insert(ip, name.clone());
                }
            }
        }
        views.push(NodeView {
            addresses: node_addresses(node),
            name,
            labels: node.labels().clone(),
            ready,
            alive: live,
            interfaces: split(annotations.get(INTERFACES_ANNOTATION))
                .map(String::from)
                .collect(),
            subnets: crate::onlink::parse(
                annotations
                    .get(SUBNETS_ANNOTATION)
                    .map_or("", String::as_str),
            ),
        });
    }
    (views, announcers)
}

/// Who last claimed each L2 IP in its Lease, alive or not (to say whose IP moved, and why).
pub fn claims(leases: &[Lease]) -> BTreeMap<IpAddr, String> {
    let mut out = BTreeMap::new();
    for l in leases {
        let Some(node) = l.name_any().strip_prefix(LEASE_PREFIX).map(String::from) else {
            continue;
        };
        for ip in split(l.annotations().get(ANNOUNCING_ANNOTATION)) {
            if let Ok(ip) = ip.parse() {
                out.insert(ip, node.clone());
            }
        }
    }
    out
}

/// Where each node's speaker listens for the mesh, from the Leases.
pub fn mesh_addresses(leases: &[Lease]) -> BTreeMap<String, SocketAddr> {
    leases
        .iter()
        .filter_map(|l| {
            let node = l.name_any().strip_prefix(LEASE_PREFIX)?.to_string();
            let addr = l.annotations().get(MESH_ANNOTATION)?.parse().ok()?;
            Some((node, addr))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::SignedDuration;
    use serde_json::json;

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    fn node(name: &str, ready: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"zone": "a"}},
            "status": {"conditions": [{"type": "Ready", "status": ready}]},
        }))
        .unwrap()
    }

    fn lease(node: &str, renewed_ago: i64, announcing: &str) -> Lease {
        let renew = now()
            .checked_sub(SignedDuration::from_secs(renewed_ago))
            .unwrap();
        serde_json::from_value(json!({
            "metadata": {"name": format!("{LEASE_PREFIX}{node}"), "annotations": {
                INTERFACES_ANNOTATION: "eth0, eth1", ANNOUNCING_ANNOTATION: announcing,
                SUBNETS_ANNOTATION: "eth1=198.51.100.0/24,eth1=2001:db8::/64",
                MESH_ANNOTATION: format!("192.0.2.{}:7947", node.len())}},
            "spec": {"holderIdentity": node, "leaseDurationSeconds": 10,
                     "renewTime": renew.to_string()},
        }))
        .unwrap()
    }

    #[test]
    fn node_views_read_readiness_lease_liveness_interfaces_and_announcers() {
        let (views, announcers) = node_views(
            &[
                node("a", "True"),
                node("b", "True"),
                node("c", "False"),
                node("d", "True"),
            ],
            &[
                lease("a", 2, "198.51.100.1"),
                lease("b", 11, "198.51.100.2"),
                lease("c", 1, ""),
            ],
            now(),
            None,
        );
        let by: BTreeMap<&str, &NodeView> = views.iter().map(|v| (v.name.as_str(), v)).collect();
        assert!(by["a"].ready && by["a"].alive);
        assert!(!by["b"].alive, "expired");
        assert!(!by["c"].ready && by["c"].alive);
        assert!(!by["d"].alive, "no Lease");
        assert_eq!(
            by["a"].interfaces,
            ["eth0".to_string(), "eth1".to_string()].into()
        );
        assert_eq!(
            crate::onlink::format(&by["a"].subnets),
            "eth1=198.51.100.0/24,eth1=2001:db8::/64"
        );
        assert_eq!(by["a"].labels["zone"], "a");
        assert_eq!(
            announcers,
            [("198.51.100.1".parse().unwrap(), "a".to_string())].into(),
            "a dead node's announcements do not count"
        );
    }

    #[test]
    fn the_mesh_wins_over_the_lease_unless_the_lease_is_renewed_after_the_mesh_gave_up() {
        let down = |renew: Option<&str>| MeshVerdict::Down {
            renew_at_down: renew.map(String::from),
        };
        // name, lease live, renew now, mesh verdict → alive
        type Case<'a> = (&'a str, bool, Option<&'a str>, Option<MeshVerdict>, bool);
        let cases: &[Case] = &[
            ("no mesh, live lease", true, Some("t1"), None, true),
            ("no mesh, expired lease", false, Some("t1"), None, false),
            (
                "mesh alive, expired lease (API down)",
                false,
                Some("t1"),
                Some(MeshVerdict::Alive),
                true,
            ),
            (
                "mesh down, lease not yet expired (killed)",
                true,
                Some("t1"),
                Some(down(Some("t1"))),
                false,
            ),
            (
                "mesh down, lease renewed since (mesh blocked)",
                true,
                Some("t2"),
                Some(down(Some("t1"))),
                true,
            ),
            (
                "mesh down, renewed since but expired now",
                false,
                Some("t2"),
                Some(down(Some("t1"))),
                false,
            ),
            (
                "mesh down, no lease at all",
                false,
                None,
                Some(down(None)),
                false,
            ),
            (
                "mesh down, lease created after",
                true,
                Some("t1"),
                Some(down(None)),
                true,
            ),
            (
                "mesh alive, lease deleted by an operator",
                false,
                None,
                Some(MeshVerdict::Alive),
                false,
            ),
        ];
        for (name, live, renew, verdict, want) in cases {
            assert_eq!(alive(*live, *renew, verdict.as_ref()), *want, "{name}");
        }
    }

    #[test]
    fn during_an_api_outage_leases_are_read_at_the_last_moment_the_api_answered() {
        let nodes = [node("a", "True")];
        let leases = [lease("a", 2, "198.51.100.1")];
        let later = now().checked_add(SignedDuration::from_secs(60)).unwrap();
        let (views, _) = node_views(&nodes, &leases, later, None);
        assert!(
            !views[0].alive,
            "read at the real time, the Lease is long expired"
        );
        let (views, announcers) = node_views(&nodes, &leases, now(), None);
        assert!(views[0].alive, "read on the frozen lease clock");
        assert_eq!(announcers.len(), 1);
        let mesh: BTreeMap<String, MeshVerdict> = [("a".to_string(), MeshVerdict::Alive)].into();
        let (views, _) = node_views(&nodes, &leases, later, Some(&mesh));
        assert!(
            views[0].alive,
            "the mesh holds it alive whatever the Lease says"
        );
    }

    #[test]
    fn a_node_back_from_a_partition_is_alive_but_its_old_claims_count_once_it_renews() {
        let nodes = [node("a", "True")];
        let leases = [lease("a", 2, "198.51.100.1")];
        let renew = renew_time(&leases[0]);
        let back: BTreeMap<String, MeshVerdict> = [(
            "a".to_string(),
            MeshVerdict::Returned {
                renew_at_down: renew.clone(),
            },
        )]
        .into();
        let (views, announcers) = node_views(&nodes, &leases, now(), Some(&back));
        assert!(views[0].alive);
        assert!(announcers.is_empty(), "claims from before it went down");
        let renewed_since: BTreeMap<String, MeshVerdict> = [(
            "a".to_string(),
            MeshVerdict::Returned {
                renew_at_down: Some("an older renew time".into()),
            },
        )]
        .into();
        let (_, announcers) = node_views(&nodes, &leases, now(), Some(&renewed_since));
        assert_eq!(
            announcers.len(),
            1,
            "its Lease was renewed since: its claims count"
        );
    }

    #[test]
    fn claims_and_mesh_addresses_come_from_every_lease_alive_or_not() {
        let leases = [
            lease("a", 2, "198.51.100.1"),
            lease("bb", 99, "198.51.100.2"),
        ];
        let claims = claims(&leases);
        assert_eq!(claims[&"198.51.100.2".parse::<IpAddr>().unwrap()], "bb");
        let addrs = mesh_addresses(&leases);
        assert_eq!(addrs["a"], "192.0.2.1:7947".parse().unwrap());
        assert_eq!(addrs["bb"], "192.0.2.2:7947".parse().unwrap());
    }
}
