//! Which IP each service gets. Pure and deterministic: the same pools, services and previous
//! allocations always give the same answer, and a service keeps its IP for as long as its entry
//! stays and the IP stays in an allowed pool (no churn across restarts and reloads).
//!
//! Order of decisions: requested IPs first, then previous allocations, then the lowest free
//! address of the service's pool (or of the first auto-assign pool with a free address of the
//! right family), skipping .0 and .255 in pools that avoid buggy IPs.

use std::{collections::BTreeMap, collections::BTreeSet, net::IpAddr};

use crate::config::{
    address::{from_u128, to_u128},
    Pool, ServiceDef,
};

/// One service's address and the pool it came from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Allocation {
    pub ip: IpAddr,
    pub pool: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("services[{service}].ip: {message}")]
pub struct IpamError {
    pub service: String,
    pub message: String,
}

/// Addresses in use and in total, per pool (like MetalLB's allocator metrics).
#[derive(Debug, Clone, PartialEq)]
pub struct PoolUsage {
    pub pool: String,
    pub in_use: u64,
    pub total: f64,
}

fn buggy(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => matches!(v4.octets()[3], 0 | 255),
        IpAddr::V6(_) => false,
    }
}

/// Whether a pool may hand out this IP (in its ranges, and not .0/.255 when it avoids those).
pub fn usable(pool: &Pool, ip: IpAddr) -> bool {
    pool.contains(ip) && !(pool.avoid_buggy_ips && buggy(ip))
}

/// The lowest usable address of the family in the pool that `taken` does not claim.
pub fn lowest_free(pool: &Pool, ipv4: bool, taken: impl Fn(&IpAddr) -> bool) -> Option<IpAddr> {
    lowest_free_from(pool, ipv4, (0, None), taken).map(|(ip, _)| ip)
}

/// A position in a pool's walk: the index of a range (ranges in config order) and an address
/// in it (`None`: the range's first).
type Position = (usize, Option<u128>);

/// [`lowest_free`] starting the walk at `from`; also returns where the address was found.
fn lowest_free_from(
    pool: &Pool,
    ipv4: bool,
    from: Position,
    taken: impl Fn(&IpAddr) -> bool,
) -> Option<(IpAddr, Position)> {
    for (index, range) in pool.ranges.iter().enumerate().skip(from.0) {
        if range.is_ipv4() != ipv4 {
            continue;
        }
        let end = to_u128(range.end);
        let mut n = match from {
            (i, Some(n)) if i == index => n,
            _ => to_u128(range.start),
        };
        loop {
            let ip = from_u128(n, ipv4);
            if !taken(&ip) && usable(pool, ip) {
                return Some((ip, (index, Some(n))));
            }
            if n == end {
                break;
            }
            n += 1;
        }
    }
    None
}

/// [`lowest_free`] for many allocations in a row, each costing what it finds rather than every
/// address taken before it: remembers, per pool and family, where the last walk ended, below
/// which nothing is free. Valid while the set `taken` describes only grows (allocations in one
/// pass); an address found but then not taken is found again.
#[derive(Debug, Default)]
pub struct FreeCursor(std::collections::HashMap<(String, bool), Option<Position>>);

impl FreeCursor {
    pub fn lowest_free(
        &mut self,
        pool: &Pool,
        ipv4: bool,
        taken: impl Fn(&IpAddr) -> bool,
    ) -> Option<IpAddr> {
        let key = (pool.name.clone(), ipv4);
        let from = match self.0.get(&key) {
            Some(None) => return None, // exhausted, and nothing is freed in a pass
            Some(Some(position)) => *position,
            None => (0, None),
        };
        let found = lowest_free_from(pool, ipv4, from, taken);
        self.0.insert(key, found.map(|(_, position)| position));
        found.map(|(ip, _)| ip)
    }
}

/// Allocates an IP to every service. `previous` maps service names to the IPs they had.
pub fn allocate(
    pools: &[Pool],
    services: &[ServiceDef],
    previous: &BTreeMap<String, IpAddr>,
) -> Result<BTreeMap<String, Allocation>, Vec<IpamError>> {
    let mut out = BTreeMap::new();
    let mut used = BTreeSet::new();
    let mut errors = Vec::new();
    let pool_of = |ip: IpAddr, service: &ServiceDef| {
        pools
            .iter()
            .filter(|p| service.pool.as_ref().is_none_or(|n| &p.name == n))
            .find(|p| usable(p, ip))
            .map(|p| p.name.clone())
    };

    // 1. Requested IPs.
    for s in services {
        let Some(ip) = s.requested_ip else { continue };
        match pool_of(ip, s) {
            Some(pool) if used.insert(ip) => {
                out.insert(s.name.clone(), Allocation { ip, pool });
            }
            Some(_) => errors.push(IpamError {
                service: s.name.clone(),
                message: format!("{ip} is already taken"),
            }),
            None => errors.push(IpamError {
                service: s.name.clone(),
                message: format!("{ip} is not a usable address of an allowed pool"),
            }),
        }
    }
    // 2. What services had before, while still allowed and free.
    for s in services.iter().filter(|s| s.requested_ip.is_none()) {
        let Some(ip) = previous.get(&s.name).copied() else {
            continue;
        };
        if ip.is_ipv4() != s.ipv4 || used.contains(&ip) {
            continue;
        }
        let allowed = pools
            .iter()
            .filter(|p| match &s.pool {
                Some(name) => &p.name == name,
                None => p.auto_assign,
            })
            .find(|p| usable(p, ip));
        if let Some(pool) = allowed {
            used.insert(ip);
            out.insert(
                s.name.clone(),
                Allocation {
                    ip,
                    pool: pool.name.clone(),
                },
            );
        }
    }
    // 3. The lowest free address for the rest, in config order.
    let mut cursor = FreeCursor::default();
    for s in services {
        if out.contains_key(&s.name) || s.requested_ip.is_some() {
            continue;
        }
        let candidates: Vec<&Pool> = pools
            .iter()
            .filter(|p| match &s.pool {
                Some(name) => &p.name == name,
                None => p.auto_assign,
            })
            .collect();
        let found = candidates.iter().find_map(|p| {
            cursor
                .lowest_free(p, s.ipv4, |ip| used.contains(ip))
                .map(|ip| (ip, p.name.clone()))
        });
        match found {
            Some((ip, pool)) => {
                used.insert(ip);
                out.insert(s.name.clone(), Allocation { ip, pool });
            }
            None => {
                let family = if s.ipv4 { "IPv4" } else { "IPv6" };
                let message = match &s.pool {
                    Some(name) => format!("pool {name:?} has no free {family} address"),
                    None if candidates.is_empty() => {
                        "no pool has autoAssign: name one with `pool`".to_string()
                    }
                    None => format!("no auto-assign pool has a free {family} address"),
                };
                errors.push(IpamError {
                    service: s.name.clone(),
                    message,
                });
            }
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// How many addresses each pool has in use and in total.
pub fn usage(pools: &[Pool], allocations: &BTreeMap<String, Allocation>) -> Vec<PoolUsage> {
    pools
        .iter()
        .map(|p| {
            let mut total = 0f64;
            for r in &p.ranges {
                let size = r.size() as f64;
                let skipped = if p.avoid_buggy_ips && r.is_ipv4() {
                    let (s, e) = (to_u128(r.start), to_u128(r.end));
                    // Numbers n in [s, e] with n % 256 == residue.
                    let count = |residue: u128| {
                        let upto = |x: u128| {
                            if x < residue {
                                0
                            } else {
                                (x - residue) / 256 + 1
                            }
                        };
                        upto(e) - if s == 0 { 0 } else { upto(s - 1) }
                    };
                    (count(0) + count(255)) as f64
                } else {
                    0.0
                };
                total += size - skipped;
            }
            PoolUsage {
                pool: p.name.clone(),
                in_use: allocations.values().filter(|a| a.pool == p.name).count() as u64,
                total,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::address::AddrRange;

    fn pool(name: &str, ranges: &[&str], avoid: bool, auto: bool) -> Pool {
        Pool {
            name: name.into(),
            ranges: ranges
                .iter()
                .map(|r| AddrRange::parse(r).unwrap())
                .collect(),
            avoid_buggy_ips: avoid,
            auto_assign: auto,
        }
    }

    fn svc(name: &str, ip: Option<&str>, pool: Option<&str>, ipv4: bool) -> ServiceDef {
        ServiceDef {
            name: name.into(),
            requested_ip: ip.map(|i| i.parse().unwrap()),
            pool: pool.map(String::from),
            ipv4,
            ports: Vec::new(),
            backends: Vec::new(),
            health_check: None,
        }
    }

    fn ips(a: &BTreeMap<String, Allocation>) -> Vec<(String, String)> {
        a.iter()
            .map(|(k, v)| (k.clone(), v.ip.to_string()))
            .collect()
    }

    #[test]
    fn the_cursor_finds_what_a_walk_from_the_start_finds_while_allocations_only_grow() {
        let mut seed: u64 = 0x1dea;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..300 {
            // Two or three small ranges in any order, some IPv6, .0/.255 avoided or not.
            let ranges: Vec<String> = (0..2 + next(2))
                .map(|_| {
                    if next(4) == 0 {
                        let a = next(40);
                        format!("fd00::{a:x}-fd00::{:x}", a + next(20))
                    } else {
                        let (c, a) = (next(3), 240 + next(10));
                        format!("10.0.{c}.{a}-10.0.{}.{}", c + 1, next(12))
                    }
                })
                .collect();
            let refs: Vec<&str> = ranges.iter().map(String::as_str).collect();
            let p = pool("p", &refs, next(2) == 0, true);
            let mut taken: BTreeSet<IpAddr> = BTreeSet::new();
            let mut cursor = FreeCursor::default();
            for _ in 0..80 {
                let ipv4 = next(3) != 0;
                let want = lowest_free(&p, ipv4, |ip| taken.contains(ip));
                let got = cursor.lowest_free(&p, ipv4, |ip| taken.contains(ip));
                assert_eq!(
                    got, want,
                    "round {round}, ranges {ranges:?}, taken {taken:?}"
                );
                // Most finds are taken; some are not (a Service that failed on another family).
                if let Some(ip) = got.filter(|_| next(5) != 0) {
                    taken.insert(ip);
                }
            }
        }
    }

    #[test]
    fn requested_ips_are_honoured_and_the_rest_get_the_lowest_free() {
        let pools = [pool("p", &["198.51.100.0/29"], false, true)];
        let services = [
            svc("a", None, None, true),
            svc("b", Some("198.51.100.0"), None, true),
            svc("c", None, None, true),
        ];
        let a = allocate(&pools, &services, &BTreeMap::new()).unwrap();
        assert_eq!(
            ips(&a),
            [
                ("a".into(), "198.51.100.1".into()),
                ("b".into(), "198.51.100.0".into()),
                ("c".into(), "198.51.100.2".into())
            ]
        );
    }

    #[test]
    fn buggy_ips_are_skipped_only_where_asked() {
        let avoid = [pool("p", &["198.51.100.255-198.51.101.1"], true, true)];
        let a = allocate(&avoid, &[svc("a", None, None, true)], &BTreeMap::new()).unwrap();
        assert_eq!(a["a"].ip.to_string(), "198.51.101.1");
        let keep = [pool("p", &["198.51.100.255-198.51.101.1"], false, true)];
        let a = allocate(&keep, &[svc("a", None, None, true)], &BTreeMap::new()).unwrap();
        assert_eq!(a["a"].ip.to_string(), "198.51.100.255");
        assert_eq!(usage(&avoid, &a)[0].total, 1.0);
        let big = [pool("p", &["10.0.0.0/8"], true, true)];
        assert_eq!(
            usage(&big, &BTreeMap::new())[0].total,
            (16_777_216 - 2 * 65_536) as f64
        );
    }

    #[test]
    fn ipv6_services_get_ipv6_addresses_from_mixed_pools() {
        let pools = [pool(
            "p",
            &["198.51.100.0/30", "2001:db8::/126"],
            false,
            true,
        )];
        let a = allocate(
            &pools,
            &[svc("v6", None, None, false), svc("v4", None, None, true)],
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(a["v6"].ip.to_string(), "2001:db8::");
        assert_eq!(a["v4"].ip.to_string(), "198.51.100.0");
    }

    #[test]
    fn previous_allocations_survive_changes_elsewhere() {
        let pools = [pool("p", &["198.51.100.0/29"], false, true)];
        let first = allocate(
            &pools,
            &[svc("a", None, None, true), svc("b", None, None, true)],
            &BTreeMap::new(),
        )
        .unwrap();
        let previous: BTreeMap<String, IpAddr> =
            first.iter().map(|(k, v)| (k.clone(), v.ip)).collect();
        // "a" goes away and "c" comes first in the file: "b" keeps its IP, "c" gets a's.
        let second = allocate(
            &pools,
            &[svc("c", None, None, true), svc("b", None, None, true)],
            &previous,
        )
        .unwrap();
        assert_eq!(second["b"].ip, first["b"].ip);
        assert_eq!(second["c"].ip, first["a"].ip);
        assert_eq!(
            allocate(
                &pools,
                &[svc("c", None, None, true), svc("b", None, None, true)],
                &previous
            )
            .unwrap(),
            second
        );
    }

    #[test]
    fn a_previous_ip_outside_the_pool_now_is_replaced() {
        let pools = [pool("p", &["198.51.100.8/29"], false, true)];
        let previous = BTreeMap::from([("a".to_string(), "198.51.100.1".parse().unwrap())]);
        let a = allocate(&pools, &[svc("a", None, None, true)], &previous).unwrap();
        assert_eq!(a["a"].ip.to_string(), "198.51.100.8");
    }

    #[test]
    fn named_pools_and_auto_assign() {
        let pools = [
            pool("auto", &["198.51.100.0/31"], false, true),
            pool("manual", &["203.0.113.0/31"], false, false),
        ];
        let a = allocate(
            &pools,
            &[
                svc("a", None, Some("manual"), true),
                svc("b", None, None, true),
            ],
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(a["a"].ip.to_string(), "203.0.113.0");
        assert_eq!(a["a"].pool, "manual");
        assert_eq!(a["b"].pool, "auto");
        let none = [pool("manual", &["203.0.113.0/31"], false, false)];
        let err = allocate(&none, &[svc("b", None, None, true)], &BTreeMap::new()).unwrap_err();
        assert!(
            err[0].to_string().contains("no pool has autoAssign"),
            "{}",
            err[0]
        );
    }

    #[test]
    fn exhaustion_and_conflicts_are_errors_naming_the_service() {
        let pools = [pool("p", &["198.51.100.0/31"], false, true)];
        let services = [
            svc("a", None, None, true),
            svc("b", None, None, true),
            svc("c", None, None, true),
        ];
        let err = allocate(&pools, &services, &BTreeMap::new()).unwrap_err();
        assert_eq!(err.len(), 1);
        assert_eq!(
            err[0].to_string(),
            "services[c].ip: no auto-assign pool has a free IPv4 address"
        );
        let taken = [
            svc("a", Some("198.51.100.0"), None, true),
            svc("b", Some("198.51.100.0"), None, true),
        ];
        let err = allocate(&pools, &taken, &BTreeMap::new()).unwrap_err();
        assert!(err[0].to_string().contains("already taken"));
        let named = [svc("a", None, Some("p"), false)];
        let err = allocate(&pools, &named, &BTreeMap::new()).unwrap_err();
        assert!(err[0]
            .to_string()
            .contains("pool \"p\" has no free IPv6 address"));
    }

    #[test]
    fn many_pools_fill_in_order_and_usage_counts() {
        let pools = [
            pool("one", &["198.51.100.0/32"], false, true),
            pool("two", &["198.51.100.8/30"], false, true),
        ];
        let services: Vec<ServiceDef> = (0..3)
            .map(|i| svc(&format!("s{i}"), None, None, true))
            .collect();
        let a = allocate(&pools, &services, &BTreeMap::new()).unwrap();
        assert_eq!(a["s0"].pool, "one");
        assert_eq!(a["s1"].ip.to_string(), "198.51.100.8");
        let u = usage(&pools, &a);
        assert_eq!((u[0].in_use, u[0].total), (1, 1.0));
        assert_eq!((u[1].in_use, u[1].total), (2, 4.0));
    }
}
