//! On-link: where an address belongs. An L2 advertisement that names no interface answers
//! ARP/NDP for an address only on the interfaces whose own subnets hold it: the one place an ARP
//! request for it can legitimately come from. Not on every interface (MetalLB #277: bond slaves,
//! bridges, hairpins, a management network that happens to be up).
//!
//! Pure: the subnets come from the caller (`dataplane::subnets()` on this host, or a node's
//! Lease annotation in Kubernetes).

use std::{collections::BTreeSet, net::IpAddr};

use ipnet::IpNet;

/// An interface and one of its own subnets.
pub type Subnet = (String, IpNet);

/// The interfaces whose subnets hold `ip`. Loopback and full-length prefixes (a /32 or /128
/// says nothing about a link) hold nothing.
pub fn interfaces_for(ip: IpAddr, subnets: &[Subnet]) -> BTreeSet<String> {
    subnets
        .iter()
        .filter(|(name, net)| {
            name != "lo"
                && net.prefix_len() < net.max_prefix_len()
                && !net.addr().is_loopback()
                && net.contains(&ip)
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// The subnets, for messages: `eth0 192.0.2.0/24, eth1 2001:db8::/64` (loopback left out), or
/// `none` when there are none.
pub fn describe(subnets: &[Subnet]) -> String {
    let list: Vec<String> = subnets
        .iter()
        .filter(|(name, net)| name != "lo" && !net.addr().is_loopback())
        .map(|(name, net)| format!("{name} {net}"))
        .collect();
    if list.is_empty() {
        "none".into()
    } else {
        list.join(", ")
    }
}

/// Subnets as a Lease annotation: `eth0=192.0.2.0/24,eth0=2001:db8::/64`.
pub fn format(subnets: &[Subnet]) -> String {
    subnets
        .iter()
        .map(|(name, net)| format!("{name}={net}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Reads [`format`]'s text; entries that do not parse are left out (an annotation is not ours
/// to refuse).
pub fn parse(text: &str) -> Vec<Subnet> {
    text.split(',')
        .filter_map(|entry| {
            let (name, net) = entry.trim().split_once('=')?;
            Some((name.to_string(), net.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnets() -> Vec<Subnet> {
        parse("lo=127.0.0.0/8,eth0=192.0.2.0/24,eth1=198.51.100.0/24,eth1=2001:db8:1::/64,vip=203.0.113.7/32,br0=192.0.2.0/24")
    }

    #[test]
    fn an_address_belongs_on_the_interfaces_whose_subnets_hold_it() {
        let s = subnets();
        let on = |ip: &str| interfaces_for(ip.parse().unwrap(), &s);
        assert_eq!(on("198.51.100.7"), BTreeSet::from(["eth1".to_string()]));
        assert_eq!(on("2001:db8:1::7"), BTreeSet::from(["eth1".to_string()]));
        assert_eq!(
            on("192.0.2.50"),
            BTreeSet::from(["br0".to_string(), "eth0".to_string()])
        );
        assert!(on("10.9.9.9").is_empty(), "no subnet holds it");
        assert!(on("203.0.113.7").is_empty(), "a /32 is no link");
        assert!(on("127.0.0.5").is_empty(), "loopback is no link");
    }

    #[test]
    fn subnets_round_trip_through_the_annotation_and_bad_entries_are_left_out() {
        let s = subnets();
        assert_eq!(parse(&format(&s)), s);
        assert_eq!(
            parse("eth0=192.0.2.0/24,garbage,eth1=not-a-net,=,"),
            vec![("eth0".to_string(), "192.0.2.0/24".parse().unwrap())]
        );
        assert!(parse("").is_empty());
        assert_eq!(describe(&s[..3]), "eth0 192.0.2.0/24, eth1 198.51.100.0/24");
        assert_eq!(describe(&[]), "none");
    }
}
