//! Which node announces which service IP in L2 mode. Pure and deterministic: every speaker
//! runs it over the same inputs (what the API server shows) and reaches the same answer, so
//! exactly one node answers ARP/NDP for an IP once their views agree.
//!
//! - Only eligible nodes are candidates (the caller decides eligibility: Ready, a live Lease,
//!   the advertisement's `nodeSelectors`, one of its `interfaces`, a ready local endpoint for
//!   `externalTrafficPolicy: Local`).
//! - Sticky: an IP stays with its current announcer while that node is eligible, so a node
//!   that comes back does not take IPs back (unless stickiness is turned off).
//! - Even: every other IP goes to the eligible node that announces the fewest so far; ties go
//!   to the node with the lowest hash of (IP, node), which spreads IPs without any node being
//!   everybody's first choice.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

/// One IP to place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ballot {
    pub ip: IpAddr,
    /// The nodes that may announce it.
    pub eligible: BTreeSet<String>,
    /// The node announcing it now, if any.
    pub current: Option<String>,
}

/// FNV-1a over the IP and the node name: stable across processes, versions and machines.
fn rank(ip: IpAddr, node: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let ip_bytes: Vec<u8> = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    for b in ip_bytes
        .iter()
        .chain([0xffu8].iter())
        .chain(node.as_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Elects one node per IP (`None`: no node is eligible). `sticky`: keep current announcers
/// that are still eligible.
pub fn elect(ballots: &[Ballot], sticky: bool) -> BTreeMap<IpAddr, Option<String>> {
    let mut sorted: Vec<&Ballot> = ballots.iter().collect();
    sorted.sort_by_key(|b| b.ip);
    let mut load: BTreeMap<&str, usize> = BTreeMap::new();
    let mut out: BTreeMap<IpAddr, Option<String>> = BTreeMap::new();
    if sticky {
        for b in &sorted {
            if let Some(node) = b.current.as_deref().filter(|n| b.eligible.contains(*n)) {
                *load.entry(node).or_default() += 1;
                out.insert(b.ip, Some(node.to_string()));
            }
        }
    }
    for b in &sorted {
        if out.contains_key(&b.ip) {
            continue;
        }
        let winner = b
            .eligible
            .iter()
            .min_by_key(|n| (load.get(n.as_str()).copied().unwrap_or(0), rank(b.ip, n)))
            .cloned();
        if let Some(node) = &winner {
            *load
                .entry(b.eligible.get(node).unwrap().as_str())
                .or_default() += 1;
        }
        out.insert(b.ip, winner);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(i: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(0xc633_6400 + i))
    }

    fn nodes(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    fn ballots(n: u32, eligible: &[&str]) -> Vec<Ballot> {
        (0..n)
            .map(|i| Ballot {
                ip: ip(i),
                eligible: nodes(eligible),
                current: None,
            })
            .collect()
    }

    fn counts(result: &BTreeMap<IpAddr, Option<String>>) -> BTreeMap<String, usize> {
        let mut c = BTreeMap::new();
        for n in result.values().flatten() {
            *c.entry(n.clone()).or_default() += 1;
        }
        c
    }

    #[test]
    fn only_eligible_nodes_win_and_no_eligible_node_means_no_announcer() {
        let b = vec![
            Ballot {
                ip: ip(1),
                eligible: nodes(&["b"]),
                current: Some("a".into()),
            },
            Ballot {
                ip: ip(2),
                eligible: nodes(&[]),
                current: Some("a".into()),
            },
        ];
        let r = elect(&b, true);
        assert_eq!(r[&ip(1)].as_deref(), Some("b"));
        assert_eq!(r[&ip(2)], None);
    }

    #[test]
    fn ips_spread_evenly_over_eligible_nodes() {
        for (n, names) in [
            (9, vec!["a", "b", "c"]),
            (10, vec!["a", "b", "c"]),
            (100, vec!["n1", "n2", "n3", "n4", "n5", "n6", "n7"]),
        ] {
            let c = counts(&elect(&ballots(n, &names), true));
            let (min, max) = (c.values().min().unwrap(), c.values().max().unwrap());
            assert!(max - min <= 1, "{n} IPs over {names:?}: {c:?}");
            assert_eq!(c.len(), names.len());
        }
    }

    #[test]
    fn the_result_does_not_depend_on_the_order_of_the_ballots_or_of_the_nodes() {
        let mut b = ballots(20, &["a", "b", "c"]);
        let r1 = elect(&b, true);
        b.reverse();
        let r2 = elect(&b, true);
        assert_eq!(r1, r2);
        let b3: Vec<Ballot> = ballots(20, &["c", "a", "b"]);
        assert_eq!(elect(&b3, true), r1);
    }

    #[test]
    fn a_node_leaving_moves_only_its_own_ips() {
        let before = elect(&ballots(30, &["a", "b", "c"]), true);
        let mut after_ballots = ballots(30, &["a", "b"]);
        for b in &mut after_ballots {
            b.current = before[&b.ip].clone();
        }
        let after = elect(&after_ballots, true);
        for (ip, node) in &before {
            if node.as_deref() != Some("c") {
                assert_eq!(&after[ip], node, "{ip} moved although its node stayed");
            } else {
                assert!(after[ip].is_some());
            }
        }
        let c = counts(&after);
        assert!(c["a"].abs_diff(c["b"]) <= 1, "{c:?}");
    }

    #[test]
    fn a_returning_node_takes_nothing_back_unless_stickiness_is_off() {
        let two = elect(&ballots(12, &["a", "b"]), true);
        let mut back = ballots(12, &["a", "b", "c"]);
        for b in &mut back {
            b.current = two[&b.ip].clone();
        }
        let sticky = elect(&back, true);
        assert_eq!(sticky, two);
        assert!(!counts(&sticky).contains_key("c"));
        let rebalanced = elect(&back, false);
        assert_eq!(counts(&rebalanced)["c"], 4);
    }

    #[test]
    fn new_ips_go_to_the_least_loaded_node() {
        let mut b = ballots(5, &["a", "b"]);
        for x in &mut b {
            x.current = Some("a".into());
        }
        b.extend((5..9).map(|i| Ballot {
            ip: ip(i),
            eligible: nodes(&["a", "b"]),
            current: None,
        }));
        let c = counts(&elect(&b, true));
        assert_eq!((c["a"], c["b"]), (5, 4));
    }
}
