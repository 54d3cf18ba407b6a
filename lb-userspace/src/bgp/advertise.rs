//! What each BGP peer should be told: pure. A service IP is announced while the service has at
//! least one healthy backend, to the peers of every BGP advertisement that covers its pool, as
//! the advertisement's prefix (`aggregationLength`, /32 and /128 by default) with its
//! communities, large communities, and LOCAL_PREF (iBGP peers only). MetalLB's semantics.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;

use crate::{config::Config, ipam::Allocation};

/// The attributes a prefix is announced with to one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteAttributes {
    pub communities: BTreeSet<(u16, u16)>,
    pub large_communities: BTreeSet<(u32, u32, u32)>,
    pub local_pref: Option<u32>,
}

/// Per peer address: the prefixes to announce and how.
pub type Advertisements = BTreeMap<IpAddr, BTreeMap<IpNet, RouteAttributes>>;

/// `live`: the service IPs that have at least one healthy backend now.
pub fn advertisements(
    config: &Config,
    allocations: &BTreeMap<String, Allocation>,
    live: &BTreeSet<IpAddr>,
) -> Advertisements {
    let mut out: Advertisements = config
        .peers
        .iter()
        .map(|p| (p.peer_address, BTreeMap::new()))
        .collect();
    for allocation in allocations.values().filter(|a| live.contains(&a.ip)) {
        for adv in config
            .bgp_advertisements
            .iter()
            .filter(|adv| adv.pools.contains(&allocation.pool))
        {
            let len = match allocation.ip {
                IpAddr::V4(_) => adv.aggregation_length,
                IpAddr::V6(_) => adv.aggregation_length_v6,
            };
            let Ok(prefix) = IpNet::new(allocation.ip, len).map(|n| n.trunc()) else {
                continue;
            };
            for peer in config
                .peers
                .iter()
                .filter(|p| adv.peers.is_empty() || adv.peers.contains(&p.peer_address))
            {
                let route = out
                    .entry(peer.peer_address)
                    .or_default()
                    .entry(prefix)
                    .or_default();
                route.communities.extend(adv.communities.iter().copied());
                route
                    .large_communities
                    .extend(adv.large_communities.iter().copied());
                if peer.peer_asn == peer.my_asn && route.local_pref.is_none() {
                    route.local_pref = adv.local_pref;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{build_from, parse_text};

    fn config(text: &str) -> Config {
        build_from(vec![("t.yaml".into(), parse_text("t.yaml", text).unwrap())]).unwrap()
    }

    const TEXT: &str = r#"
pools:
- {name: bgp, addresses: [198.51.100.0/24, "2001:db8::/64"]}
- {name: quiet, addresses: [203.0.113.0/24]}
peers:
- {peerAddress: 192.0.2.1, peerASN: 64501, myASN: 64500}
- {peerAddress: 192.0.2.2, peerASN: 64500, myASN: 64500}
bgpAdvertisements:
- ipAddressPools: [bgp]
  communities: [no-export]
  localPref: 150
- ipAddressPools: [bgp]
  communities: ["64500:7"]
  largeCommunities: ["64500:1:2"]
  aggregationLength: 24
  aggregationLengthV6: 64
  peers: [192.0.2.1]
"#;

    fn allocation(ip: &str, pool: &str) -> Allocation {
        Allocation {
            ip: ip.parse().unwrap(),
            pool: pool.into(),
        }
    }

    #[test]
    fn prefixes_attributes_and_peers_follow_the_advertisements() {
        let c = config(TEXT);
        let allocations = BTreeMap::from([
            ("a".to_string(), allocation("198.51.100.10", "bgp")),
            ("b".to_string(), allocation("2001:db8::10", "bgp")),
            ("c".to_string(), allocation("203.0.113.5", "quiet")),
        ]);
        let live = allocations.values().map(|a| a.ip).collect();
        let ads = advertisements(&c, &allocations, &live);
        let ebgp = &ads[&"192.0.2.1".parse::<IpAddr>().unwrap()];
        let ibgp = &ads[&"192.0.2.2".parse::<IpAddr>().unwrap()];
        // eBGP peer: the /32 and /128, plus the aggregates of the second advertisement.
        let keys: Vec<String> = ebgp.keys().map(|k| k.to_string()).collect();
        assert_eq!(
            keys,
            [
                "198.51.100.0/24",
                "198.51.100.10/32",
                "2001:db8::/64",
                "2001:db8::10/128"
            ]
        );
        let host = &ebgp[&"198.51.100.10/32".parse::<IpNet>().unwrap()];
        assert_eq!(host.communities, BTreeSet::from([(0xffff, 0xff01)]));
        assert_eq!(host.local_pref, None, "LOCAL_PREF is for iBGP only");
        let aggregate = &ebgp[&"198.51.100.0/24".parse::<IpNet>().unwrap()];
        assert_eq!(aggregate.large_communities, BTreeSet::from([(64500, 1, 2)]));
        // iBGP peer: only the first advertisement (the second names 192.0.2.1), with LOCAL_PREF.
        let keys: Vec<String> = ibgp.keys().map(|k| k.to_string()).collect();
        assert_eq!(keys, ["198.51.100.10/32", "2001:db8::10/128"]);
        assert_eq!(
            ibgp[&"198.51.100.10/32".parse::<IpNet>().unwrap()].local_pref,
            Some(150)
        );
    }

    #[test]
    fn a_service_without_a_healthy_backend_is_withdrawn() {
        let c = config(TEXT);
        let allocations = BTreeMap::from([
            ("a".to_string(), allocation("198.51.100.10", "bgp")),
            ("d".to_string(), allocation("198.51.100.11", "bgp")),
        ]);
        let live = BTreeSet::from(["198.51.100.11".parse().unwrap()]);
        let ads = advertisements(&c, &allocations, &live);
        let ibgp = &ads[&"192.0.2.2".parse::<IpAddr>().unwrap()];
        let keys: Vec<String> = ibgp.keys().map(|k| k.to_string()).collect();
        assert_eq!(keys, ["198.51.100.11/32"]);
        // Nothing live: every peer still listed, with nothing to announce.
        let none = advertisements(&c, &allocations, &BTreeSet::new());
        assert_eq!(none.len(), 2);
        assert!(none.values().all(|routes| routes.is_empty()));
    }
}
