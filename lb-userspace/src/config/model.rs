//! The validated model: what the operator asked for, checked in full. Built from one or more
//! parsed files; every problem is reported with its field path and value, all at once.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    str::FromStr,
    time::Duration,
};

use super::{
    address::AddrRange,
    file::{self, SluiceFile},
    validate_interface_name, validate_service_ip, FileError, Protocol,
};

pub const DEFAULT_METRICS_ADDRESS: &str = "127.0.0.1:9120";
pub const DEFAULT_STATE_FILE: &str = "/var/lib/sluice/allocations.json";
/// The flood guard's default limit: new flows per CPU and second (Katran's default rate).
pub const DEFAULT_FLOOD_GUARD: u64 = 125_000;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub dataplane: DataplaneSettings,
    pub pools: Vec<Pool>,
    pub l2_advertisements: Vec<L2Advertisement>,
    pub services: Vec<ServiceDef>,
    pub peers: Vec<Peer>,
    pub bgp_advertisements: Vec<BgpAdvertisement>,
    /// What was read differently from how it is written (a legacy CIDR with host bits), each
    /// with its path in the file's own terms and what Sluice made of it.
    pub warnings: Vec<FileError>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DataplaneSettings {
    /// Interfaces to balance on: `dataplane.interfaces` plus every L2 advertisement's.
    pub interfaces: Vec<String>,
    pub redirect_veths: Vec<String>,
    pub maglev_table_size: u32,
    pub metrics_address: SocketAddr,
    pub state_file: PathBuf,
    pub pin_dir: PathBuf,
    pub node_ipv6: Option<std::net::Ipv6Addr>,
    /// New flows per CPU and second past which new flows are not tracked (0: no limit).
    pub flood_guard_new_flows_per_second: u64,
    /// This host's end of the tunnels to backends on other hosts (`None`: no tunnels).
    pub tunnels: Option<crate::dataplane::Tunnels>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    pub ranges: Vec<AddrRange>,
    pub avoid_buggy_ips: bool,
    pub auto_assign: bool,
}

impl Pool {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.ranges.iter().any(|r| r.contains(ip))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L2Advertisement {
    /// Pool names (all pools when the file named none).
    pub pools: Vec<String>,
    /// Where to answer ARP/NDP. Empty: on-link, on the interfaces whose own subnets hold the
    /// address (`onlink::interfaces_for`).
    pub interfaces: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceDef {
    pub name: String,
    pub requested_ip: Option<IpAddr>,
    pub pool: Option<String>,
    pub ipv4: bool,
    pub ports: Vec<PortDef>,
    pub backends: Vec<BackendDef>,
    pub health_check: Option<HealthCheck>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortDef {
    pub port: u16,
    pub protocol: Protocol,
    pub target_port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendDef {
    pub ip: IpAddr,
    /// Overrides the port's target port (single-port services only).
    pub port: Option<u16>,
    pub weight: u32,
    /// The host it runs on, when not this one (reached through a tunnel).
    pub node: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum HealthProbe {
    Tcp,
    Http { path: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    pub probe: HealthProbe,
    pub port: Option<u16>,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    pub peer_address: IpAddr,
    pub peer_asn: u32,
    pub my_asn: u32,
    pub peer_port: u16,
    pub source_address: Option<IpAddr>,
    pub hold_time: Duration,
    pub keepalive_time: Duration,
    pub connect_time: Duration,
    pub router_id: Option<std::net::Ipv4Addr>,
    pub password: Option<String>,
    pub ebgp_multi_hop: bool,
    /// BFD with this peer, from the named profile.
    pub bfd: Option<BfdProfile>,
}

/// A BFD profile (MetalLB's BFDProfile): how fast BFD detects that a peer is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BfdProfile {
    pub name: String,
    /// The slowest rate at which we accept the peer's packets.
    pub receive_interval: Duration,
    /// The rate at which we would like to send.
    pub transmit_interval: Duration,
    pub detect_multiplier: u8,
    /// Wait for the peer to start the session.
    pub passive_mode: bool,
    /// Multi-hop sessions: the lowest TTL accepted.
    pub minimum_ttl: u8,
}

impl BfdProfile {
    pub fn detection_time(&self) -> Duration {
        self.receive_interval * u32::from(self.detect_multiplier)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BgpAdvertisement {
    pub pools: Vec<String>,
    pub communities: Vec<(u16, u16)>,
    pub large_communities: Vec<(u32, u32, u32)>,
    pub local_pref: Option<u32>,
    pub aggregation_length: u8,
    pub aggregation_length_v6: u8,
    pub peers: Vec<IpAddr>,
}

/// Collects problems; each names a field path and says what is wrong with its value.
#[derive(Default)]
struct Problems(Vec<FileError>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FileError {
            path: path.into(),
            message: message.into(),
        });
    }
}

fn ranged(problems: &mut Problems, path: &str, value: i64, min: i64, max: i64) -> Option<i64> {
    if value < min || value > max {
        problems.add(path, format!("{value} is out of range ({min}..={max})"));
        None
    } else {
        Some(value)
    }
}

fn ip(problems: &mut Problems, path: &str, text: &str) -> Option<IpAddr> {
    match IpAddr::from_str(text.trim()) {
        Ok(ip) => Some(ip),
        Err(_) => {
            problems.add(path, format!("{text:?} is not an IP address"));
            None
        }
    }
}

/// Well-known BGP communities (RFC 1997, RFC 7999, RFC 8326), by the names MetalLB accepts.
fn well_known_community(name: &str) -> Option<(u16, u16)> {
    match name {
        "no-export" => Some((0xffff, 0xff01)),
        "no-advertise" => Some((0xffff, 0xff02)),
        "no-export-subconfed" => Some((0xffff, 0xff03)),
        "nopeer" => Some((0xffff, 0xff04)),
        "blackhole" => Some((0xffff, 0x029a)),
        "graceful-shutdown" => Some((0xffff, 0x0000)),
        _ => None,
    }
}

/// Where each item of the merged lists came from: its file and its path there, in the file's
/// own terms, and whether that file is a MetalLB legacy ConfigMap.
#[derive(Debug, Default)]
pub struct Origins {
    /// Sluice's list name (`pools`) → per merged index, (path with file name, legacy).
    lists: BTreeMap<&'static str, Vec<(String, bool)>>,
    /// The file that holds the `dataplane` section.
    dataplane: Option<String>,
}

const LISTS: [&str; 6] = [
    "pools",
    "l2Advertisements",
    "services",
    "peers",
    "bgpAdvertisements",
    "bfdProfiles",
];

impl Origins {
    fn add(&mut self, name: &str, f: &SluiceFile) {
        let lens = [
            f.pools.len(),
            f.l2_advertisements.len(),
            f.services.len(),
            f.peers.len(),
            f.bgp_advertisements.len(),
            f.bfd_profiles.len(),
        ];
        for (list, len) in LISTS.into_iter().zip(lens) {
            let entries = self.lists.entry(list).or_default();
            for k in 0..len {
                let legacy = f.legacy.as_ref().and_then(|l| l.get(list, k));
                entries.push(match legacy {
                    Some(at) => (format!("{name}: {at}"), true),
                    None => (format!("{name}: {list}[{k}]"), false),
                });
            }
        }
        if f.dataplane.is_some() && self.dataplane.is_none() {
            self.dataplane = Some(name.to_string());
        }
    }

    /// Was item `index` of `list` read from a legacy ConfigMap?
    fn is_legacy(&self, list: &str, index: usize) -> bool {
        self.lists
            .get(list)
            .and_then(|l| l.get(index))
            .is_some_and(|(_, legacy)| *legacy)
    }

    /// A path in the merged file's terms (`pools[3].avoidBuggyIPs`) in its own file's terms
    /// (`metallb.yaml: data.config.address-pools[1].avoid-buggy-ips`).
    pub fn translate(&self, path: &str) -> String {
        if path.starts_with("dataplane") {
            return match &self.dataplane {
                Some(name) => format!("{name}: {path}"),
                None => path.to_string(),
            };
        }
        let Some((list, rest)) = path.split_once('[') else {
            return path.to_string();
        };
        let Some((index, rest)) = rest.split_once(']') else {
            return path.to_string();
        };
        let Some((at, legacy)) = index
            .parse::<usize>()
            .ok()
            .and_then(|i| self.lists.get(list)?.get(i))
        else {
            return path.to_string();
        };
        if !legacy {
            return format!("{at}{rest}");
        }
        let mut out = at.clone();
        for segment in rest.split('.').filter(|s| !s.is_empty()) {
            let (field, suffix) = segment.split_at(segment.find('[').unwrap_or(segment.len()));
            out.push('.');
            out.push_str(&file::legacy_field(field));
            out.push_str(suffix);
        }
        out
    }
}

/// Builds the model from parsed files (`(name, file)` for error messages); every problem and
/// warning names its file and its path in the file's own terms.
pub fn build(files: Vec<(String, SluiceFile)>) -> Result<Config, Vec<FileError>> {
    let mut origins = Origins::default();
    let mut read_warnings = Vec::new();
    for (name, f) in &files {
        origins.add(name, f);
        read_warnings.extend(f.warnings.iter().map(|w| FileError {
            path: format!("{name}: {}", w.path),
            message: w.message.clone(),
        }));
    }
    let translate = |errors: Vec<FileError>| -> Vec<FileError> {
        errors
            .into_iter()
            .map(|e| FileError {
                path: origins.translate(&e.path),
                message: e.message,
            })
            .collect()
    };
    match build_merged(files, &origins) {
        Ok(mut config) => {
            read_warnings.extend(translate(std::mem::take(&mut config.warnings)));
            config.warnings = read_warnings;
            Ok(config)
        }
        Err(errors) => Err(translate(errors)),
    }
}

/// [`build`] with paths in the terms of the merged lists (`pools[3].addresses[0]`), for a
/// caller that maps them back itself (the Kubernetes objects' validity).
pub fn build_in_merged_terms(files: Vec<(String, SluiceFile)>) -> Result<Config, Vec<FileError>> {
    build_merged(files, &Origins::default())
}

fn build_merged(
    files: Vec<(String, SluiceFile)>,
    origins: &Origins,
) -> Result<Config, Vec<FileError>> {
    let mut p = Problems::default();
    let mut dataplane_section: Option<(String, file::DataplaneSection)> = None;
    let mut merged = SluiceFile::default();
    for (name, f) in files {
        if let Some(section) = f.dataplane {
            if let Some((first, _)) = &dataplane_section {
                p.add(
                    "dataplane",
                    format!("set in both {first} and {name}; set it in one file"),
                );
            } else {
                dataplane_section = Some((name.clone(), section));
            }
        }
        merged.pools.extend(f.pools);
        merged.l2_advertisements.extend(f.l2_advertisements);
        merged.services.extend(f.services);
        merged.peers.extend(f.peers);
        merged.bgp_advertisements.extend(f.bgp_advertisements);
        merged.bfd_profiles.extend(f.bfd_profiles);
    }
    let section = dataplane_section.map(|(_, s)| s).unwrap_or_default();

    // dataplane
    for (i, name) in section.interfaces.iter().enumerate() {
        if let Err(e) = validate_interface_name(&format!("dataplane.interfaces[{i}]"), name) {
            p.add(format!("dataplane.interfaces[{i}]"), e.to_string());
        }
    }
    for (i, name) in section.redirect_veths.iter().enumerate() {
        if let Err(e) = validate_interface_name(&format!("dataplane.redirectVeths[{i}]"), name) {
            p.add(format!("dataplane.redirectVeths[{i}]"), e.to_string());
        }
    }
    let maglev_table_size = section
        .maglev_table_size
        .unwrap_or(crate::maglev::DEFAULT_TABLE_SIZE);
    if let Err(e) = crate::maglev::validate_table_size(maglev_table_size, 1) {
        p.add("dataplane.maglevTableSize", e.to_string());
    }
    let metrics_text = section
        .metrics_address
        .clone()
        .unwrap_or_else(|| DEFAULT_METRICS_ADDRESS.into());
    let metrics_address = SocketAddr::from_str(&metrics_text).unwrap_or_else(|_| {
        p.add(
            "dataplane.metricsAddress",
            format!("{metrics_text:?} is not an address:port"),
        );
        SocketAddr::from_str(DEFAULT_METRICS_ADDRESS).unwrap()
    });

    let node_ipv6 =
        section
            .node_ipv6
            .as_deref()
            .and_then(|t| match std::net::Ipv6Addr::from_str(t) {
                Ok(ip) => Some(ip),
                Err(_) => {
                    p.add(
                        "dataplane.nodeIPv6",
                        format!("{t:?} is not an IPv6 address"),
                    );
                    None
                }
            });

    let flood_guard = match section.flood_guard_new_flows_per_second {
        None => DEFAULT_FLOOD_GUARD,
        Some(n) => ranged(
            &mut p,
            "dataplane.floodGuardNewFlowsPerSecond",
            n,
            0,
            1_000_000_000,
        )
        .unwrap_or(0) as u64,
    };

    let tunnels = section.tunnels.as_ref().map(|t| tunnels(&mut p, t));

    // pools
    let mut pools: Vec<Pool> = Vec::new();
    let mut warnings: Vec<FileError> = Vec::new();
    let mut seen_pools = BTreeSet::new();
    for (i, spec) in merged.pools.iter().enumerate() {
        let path = format!("pools[{i}]");
        if spec.name.trim().is_empty() {
            p.add(format!("{path}.name"), "a pool needs a name");
        } else if !seen_pools.insert(spec.name.clone()) {
            p.add(
                format!("{path}.name"),
                format!("{:?} is used by two pools", spec.name),
            );
        }
        if spec.addresses.is_empty() {
            p.add(
                format!("{path}.addresses"),
                "a pool needs at least one CIDR or range",
            );
        }
        let mut ranges = Vec::new();
        for (j, text) in spec.addresses.iter().enumerate() {
            // A legacy ConfigMap's CIDRs are read as MetalLB reads them.
            let parsed = if origins.is_legacy("pools", i) {
                AddrRange::parse_masking_host_bits(text)
            } else {
                AddrRange::parse(text).map(|r| (r, None))
            };
            match parsed {
                Ok((r, note)) => {
                    ranges.push(r);
                    if let Some(note) = note {
                        warnings.push(FileError {
                            path: format!("{path}.addresses[{j}]"),
                            message: note,
                        });
                    }
                }
                Err(e) => p.add(format!("{path}.addresses[{j}]"), format!("{text:?}: {e}")),
            }
        }
        pools.push(Pool {
            name: spec.name.clone(),
            ranges,
            avoid_buggy_ips: spec.avoid_buggy_ips,
            auto_assign: spec.auto_assign,
        });
    }
    for (i, a) in pools.iter().enumerate() {
        for b in pools.iter().skip(i + 1) {
            for ra in &a.ranges {
                for rb in &b.ranges {
                    if ra.overlaps(rb) {
                        p.add(
                            format!(
                                "pools[{}].addresses",
                                pools.iter().position(|x| x.name == b.name).unwrap()
                            ),
                            format!("{rb} (pool {:?}) overlaps {ra} (pool {:?})", b.name, a.name),
                        );
                    }
                }
            }
        }
    }
    let pool_names: BTreeSet<&str> = pools.iter().map(|x| x.name.as_str()).collect();

    // L2 advertisements
    let mut interfaces: Vec<String> = section.interfaces.clone();
    let mut l2 = Vec::new();
    for (i, spec) in merged.l2_advertisements.iter().enumerate() {
        let path = format!("l2Advertisements[{i}]");
        for (j, name) in spec.ip_address_pools.iter().enumerate() {
            if !pool_names.contains(name.as_str()) {
                p.add(
                    format!("{path}.ipAddressPools[{j}]"),
                    format!("no pool is named {name:?}"),
                );
            }
        }
        for (j, name) in spec.interfaces.iter().enumerate() {
            if let Err(e) = validate_interface_name(&format!("{path}.interfaces[{j}]"), name) {
                p.add(format!("{path}.interfaces[{j}]"), e.to_string());
            }
        }
        // Naming none: on-link (see `onlink`), decided where the interfaces are known.
        let ifaces = spec.interfaces.clone();
        interfaces.extend(ifaces.iter().cloned());
        l2.push(L2Advertisement {
            pools: if spec.ip_address_pools.is_empty() {
                pools.iter().map(|x| x.name.clone()).collect()
            } else {
                spec.ip_address_pools.clone()
            },
            interfaces: ifaces,
        });
    }
    let mut seen_if = BTreeSet::new();
    interfaces.retain(|i| seen_if.insert(i.clone()));

    // services
    let mut services = Vec::new();
    let mut seen_services = BTreeSet::new();
    for (i, spec) in merged.services.iter().enumerate() {
        if let Some(s) = service(&mut p, i, spec, &pools, &mut seen_services) {
            // A backend on another host needs this host's end of a tunnel of its family.
            for (j, b) in s.backends.iter().enumerate() {
                let Some(node) = b.node else { continue };
                if !tunnels.as_ref().is_some_and(|t| t.reaches(&node)) {
                    p.add(
                        format!("services[{i}].backends[{j}].node"),
                        format!(
                            "{node} is another host: dataplane.tunnels.addresses needs this host's {} address",
                            if node.is_ipv4() { "IPv4" } else { "IPv6" }
                        ),
                    );
                }
            }
            services.push(s);
        }
    }
    let mut requested: BTreeMap<IpAddr, &str> = BTreeMap::new();
    for (i, s) in services.iter().enumerate() {
        if let Some(ip) = s.requested_ip {
            if let Some(other) = requested.insert(ip, &s.name) {
                p.add(
                    format!("services[{i}].ip"),
                    format!("{ip} is already requested by service {other:?}"),
                );
            }
        }
    }

    // BGP
    let mut bfd_profiles: BTreeMap<String, BfdProfile> = BTreeMap::new();
    for (i, spec) in merged.bfd_profiles.iter().enumerate() {
        if let Some(profile) = bfd_profile(&mut p, i, spec) {
            if bfd_profiles.contains_key(&profile.name) {
                p.add(
                    format!("bfdProfiles[{i}].name"),
                    format!("{:?} is defined twice", profile.name),
                );
            }
            bfd_profiles.insert(profile.name.clone(), profile);
        }
    }
    let peers: Vec<Peer> = merged
        .peers
        .iter()
        .enumerate()
        .filter_map(|(i, spec)| peer(&mut p, i, spec, &bfd_profiles))
        .collect();
    let bgp_advertisements = merged
        .bgp_advertisements
        .iter()
        .enumerate()
        .map(|(i, spec)| bgp_advertisement(&mut p, i, spec, &pool_names, &peers, &pools))
        .collect();

    if !p.0.is_empty() {
        return Err(p.0);
    }
    Ok(Config {
        dataplane: DataplaneSettings {
            interfaces,
            redirect_veths: section.redirect_veths.clone(),
            maglev_table_size,
            metrics_address,
            state_file: PathBuf::from(
                section
                    .state_file
                    .clone()
                    .unwrap_or_else(|| DEFAULT_STATE_FILE.into()),
            ),
            pin_dir: section
                .pin_dir
                .clone()
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(super::DEFAULT_PIN_DIR)),
            node_ipv6,
            flood_guard_new_flows_per_second: flood_guard,
            tunnels,
        },
        pools,
        l2_advertisements: l2,
        services,
        peers,
        bgp_advertisements,
        warnings,
    })
}

fn service(
    p: &mut Problems,
    i: usize,
    spec: &file::ServiceSpec,
    pools: &[Pool],
    seen: &mut BTreeSet<String>,
) -> Option<ServiceDef> {
    let path = format!("services[{i}]");
    let before = p.0.len();
    if spec.name.trim().is_empty() {
        p.add(format!("{path}.name"), "a service needs a name");
    } else if !seen.insert(spec.name.clone()) {
        p.add(
            format!("{path}.name"),
            format!("{:?} is used by two services", spec.name),
        );
    }
    let pool = spec.pool.clone();
    if let Some(name) = &pool {
        if !pools.iter().any(|x| &x.name == name) {
            p.add(format!("{path}.pool"), format!("no pool is named {name:?}"));
        }
    }
    let requested_ip = spec
        .ip
        .as_deref()
        .and_then(|t| ip(p, &format!("{path}.ip"), t));
    if let Some(addr) = requested_ip {
        if let Err(e) = validate_service_ip(&format!("{path}.ip"), addr) {
            p.add(format!("{path}.ip"), e.to_string());
        }
        let allowed: Vec<&Pool> = pools
            .iter()
            .filter(|x| pool.as_ref().is_none_or(|n| &x.name == n))
            .collect();
        if !allowed.iter().any(|x| x.contains(addr)) {
            let where_ = match &pool {
                Some(n) => format!("pool {n:?}"),
                None => "every pool".to_string(),
            };
            p.add(format!("{path}.ip"), format!("{addr} is outside {where_}"));
        }
    }
    if spec.ports.is_empty() {
        p.add(format!("{path}.ports"), "a service needs at least one port");
    }
    let mut ports = Vec::new();
    let mut seen_ports = BTreeSet::new();
    for (j, port) in spec.ports.iter().enumerate() {
        let pp = format!("{path}.ports[{j}]");
        let number = ranged(p, &format!("{pp}.port"), port.port, 1, 65535);
        let protocol = match port
            .protocol
            .as_deref()
            .unwrap_or("TCP")
            .to_ascii_uppercase()
            .as_str()
        {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            other => {
                p.add(
                    format!("{pp}.protocol"),
                    format!("{other:?} is neither TCP nor UDP"),
                );
                None
            }
        };
        let target = match port.target_port {
            Some(t) => ranged(p, &format!("{pp}.targetPort"), t, 1, 65535),
            None => number,
        };
        if let (Some(n), Some(protocol), Some(t)) = (number, protocol, target) {
            if !seen_ports.insert((n, protocol)) {
                p.add(
                    format!("{pp}.port"),
                    format!("{n}/{protocol} is listed twice"),
                );
            }
            ports.push(PortDef {
                port: n as u16,
                protocol,
                target_port: t as u16,
            });
        }
    }
    let mut backends = Vec::new();
    let mut seen_backends = BTreeSet::new();
    for (j, b) in spec.backends.iter().enumerate() {
        let bp = format!("{path}.backends[{j}]");
        let Some(addr) = ip(p, &format!("{bp}.ip"), &b.ip) else {
            continue;
        };
        if let Err(e) = validate_service_ip(&format!("{bp}.ip"), addr) {
            p.add(format!("{bp}.ip"), e.to_string());
        }
        let port = match b.port {
            Some(v) => {
                if spec.ports.len() > 1 {
                    p.add(
                        format!("{bp}.port"),
                        "a backend port only goes with a single service port; use ports[].targetPort",
                    );
                }
                ranged(p, &format!("{bp}.port"), v, 1, 65535).map(|v| v as u16)
            }
            None => None,
        };
        let weight =
            ranged(p, &format!("{bp}.weight"), b.weight.unwrap_or(1), 0, 65535).unwrap_or(1) as u32;
        if !seen_backends.insert((addr, port)) {
            p.add(
                format!("{bp}.ip"),
                format!("backend {addr} is listed twice"),
            );
        }
        let node = b.node.as_ref().and_then(|n| {
            let at = ip(p, &format!("{bp}.node"), n)?;
            if at.is_ipv4() != addr.is_ipv4() {
                p.add(
                    format!("{bp}.node"),
                    format!(
                        "{at} is not of the backend's address family: it cannot be tunnelled there"
                    ),
                );
            }
            Some(at)
        });
        backends.push(BackendDef {
            ip: addr,
            port,
            weight,
            node,
        });
    }
    let ipv4 = requested_ip
        .map(|a| a.is_ipv4())
        .or_else(|| backends.first().map(|b| b.ip.is_ipv4()))
        .or_else(|| {
            let named = pools.iter().find(|x| pool.as_ref() == Some(&x.name));
            named.and_then(|x| x.ranges.first()).map(|r| r.is_ipv4())
        })
        .unwrap_or(true);
    for (j, b) in backends.iter().enumerate() {
        if b.ip.is_ipv4() != ipv4 {
            p.add(
                format!("{path}.backends[{j}].ip"),
                format!(
                    "{} is not of the service's address family (no NAT46/64)",
                    b.ip
                ),
            );
        }
    }
    let health_check = spec
        .health_check
        .as_ref()
        .and_then(|h| health_check(p, &format!("{path}.healthCheck"), h));
    if p.0.len() > before {
        return None;
    }
    Some(ServiceDef {
        name: spec.name.clone(),
        requested_ip,
        pool,
        ipv4,
        ports,
        backends,
        health_check,
    })
}

/// `dataplane.tunnels`: at most one address per family, the other hosts, the MTU.
fn tunnels(p: &mut Problems, t: &file::TunnelsSection) -> crate::dataplane::Tunnels {
    let mut out = crate::dataplane::Tunnels {
        mtu: ranged(
            p,
            "dataplane.tunnels.mtu",
            t.mtu.unwrap_or(1500),
            576,
            65535,
        )
        .unwrap_or(1500) as u32,
        ..Default::default()
    };
    for (i, a) in t.addresses.iter().enumerate() {
        let path = format!("dataplane.tunnels.addresses[{i}]");
        match ip(p, &path, a) {
            Some(IpAddr::V4(v4)) if out.local_v4.is_none() => out.local_v4 = Some(v4),
            Some(IpAddr::V6(v6)) if out.local_v6.is_none() => out.local_v6 = Some(v6),
            Some(other) => p.add(path, format!("{other}: one address per family")),
            None => {}
        }
    }
    for (i, n) in t.nodes.iter().enumerate() {
        if let Some(at) = ip(p, &format!("dataplane.tunnels.nodes[{i}]"), n) {
            out.peers.insert(at);
        }
    }
    out
}

fn seconds(p: &mut Problems, path: &str, value: Option<f64>, default: f64) -> Duration {
    let v = value.unwrap_or(default);
    if !(v > 0.0 && v <= 3600.0) {
        p.add(path, format!("{v} is not a number of seconds in (0, 3600]"));
        return Duration::from_secs_f64(default);
    }
    Duration::from_secs_f64(v)
}

fn health_check(p: &mut Problems, path: &str, h: &file::HealthCheckSpec) -> Option<HealthCheck> {
    let probe = match h.kind.as_str() {
        "tcp" | "TCP" => HealthProbe::Tcp,
        "http" | "HTTP" => {
            let path_text = h.path.clone().unwrap_or_else(|| "/".into());
            if !path_text.starts_with('/') || path_text.chars().any(char::is_whitespace) {
                p.add(
                    format!("{path}.path"),
                    format!("{path_text:?} is not an HTTP path (it starts with /)"),
                );
            }
            HealthProbe::Http { path: path_text }
        }
        other => {
            p.add(
                format!("{path}.type"),
                format!("{other:?} is neither tcp nor http"),
            );
            return None;
        }
    };
    let interval = seconds(
        p,
        &format!("{path}.intervalSeconds"),
        h.interval_seconds,
        2.0,
    );
    let timeout = seconds(p, &format!("{path}.timeoutSeconds"), h.timeout_seconds, 1.0);
    if timeout > interval {
        p.add(
            format!("{path}.timeoutSeconds"),
            format!(
                "{} s is longer than the interval ({} s)",
                timeout.as_secs_f64(),
                interval.as_secs_f64()
            ),
        );
    }
    let rise = ranged(p, &format!("{path}.rise"), h.rise.unwrap_or(2), 1, 100).unwrap_or(2) as u32;
    let fall = ranged(p, &format!("{path}.fall"), h.fall.unwrap_or(3), 1, 100).unwrap_or(3) as u32;
    let port = h
        .port
        .and_then(|v| ranged(p, &format!("{path}.port"), v, 1, 65535))
        .map(|v| v as u16);
    Some(HealthCheck {
        probe,
        port,
        interval,
        timeout,
        rise,
        fall,
    })
}

fn duration(
    p: &mut Problems,
    path: &str,
    value: &Option<file::Duration>,
    default: f64,
) -> Duration {
    match value.as_ref().map(|d| d.seconds()) {
        None => Duration::from_secs_f64(default),
        Some(Ok(s)) if (0.0..=65535.0).contains(&s) => Duration::from_secs_f64(s),
        Some(Ok(s)) => {
            p.add(path, format!("{s} s is out of range (0..=65535 s)"));
            Duration::from_secs_f64(default)
        }
        Some(Err(e)) => {
            p.add(path, e);
            Duration::from_secs_f64(default)
        }
    }
}

/// MetalLB's BFDProfile limits and defaults (milliseconds).
fn bfd_profile(p: &mut Problems, i: usize, spec: &file::BfdProfileSpec) -> Option<BfdProfile> {
    let path = format!("bfdProfiles[{i}]");
    let before = p.0.len();
    if spec.name.trim().is_empty() {
        p.add(format!("{path}.name"), "a BFD profile needs a name");
    }
    let mut ms = |field: &str, value: Option<i64>, default: i64| {
        ranged(
            p,
            &format!("{path}.{field}"),
            value.unwrap_or(default),
            10,
            60_000,
        )
        .map(|v| Duration::from_millis(v as u64))
    };
    let receive_interval = ms("receiveInterval", spec.receive_interval, 300);
    let transmit_interval = ms("transmitInterval", spec.transmit_interval, 300);
    let _echo_interval = ms("echoInterval", spec.echo_interval, 50);
    let detect_multiplier = ranged(
        p,
        &format!("{path}.detectMultiplier"),
        spec.detect_multiplier.unwrap_or(3),
        2,
        255,
    );
    let minimum_ttl = ranged(
        p,
        &format!("{path}.minimumTtl"),
        spec.minimum_ttl.unwrap_or(254),
        1,
        254,
    );
    if spec.echo_mode == Some(true) {
        p.add(
            format!("{path}.echoMode"),
            "true: Sluice runs BFD in asynchronous mode only (RFC 5880 §6.1), without echo; \
             set echoMode: false (detection is transmitInterval × detectMultiplier either way)",
        );
    }
    if p.0.len() > before {
        return None;
    }
    Some(BfdProfile {
        name: spec.name.clone(),
        receive_interval: receive_interval?,
        transmit_interval: transmit_interval?,
        detect_multiplier: detect_multiplier? as u8,
        passive_mode: spec.passive_mode.unwrap_or(false),
        minimum_ttl: minimum_ttl? as u8,
    })
}

fn peer(
    p: &mut Problems,
    i: usize,
    spec: &file::PeerSpec,
    bfd_profiles: &BTreeMap<String, BfdProfile>,
) -> Option<Peer> {
    let path = format!("peers[{i}]");
    let before = p.0.len();
    let bfd = match spec.bfd_profile.as_deref() {
        None | Some("") => None,
        Some(name) => match bfd_profiles.get(name) {
            Some(profile) => Some(profile.clone()),
            None => {
                let known: Vec<&str> = bfd_profiles.keys().map(String::as_str).collect();
                p.add(
                    format!("{path}.bfdProfile"),
                    format!(
                        "{name:?} names no BFD profile (defined: {})",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
                None
            }
        },
    };
    let peer_address = ip(p, &format!("{path}.peerAddress"), &spec.peer_address);
    let asn = |p: &mut Problems, field: &str, value: i64| {
        let v = ranged(p, &format!("{path}.{field}"), value, 1, u32::MAX as i64)?;
        if v == 23456 {
            p.add(
                format!("{path}.{field}"),
                "23456 is AS_TRANS (RFC 6793), a placeholder, not an ASN",
            );
            return None;
        }
        Some(v)
    };
    let peer_asn = asn(p, "peerASN", spec.peer_asn);
    let my_asn = asn(p, "myASN", spec.my_asn);
    let peer_port = ranged(
        p,
        &format!("{path}.peerPort"),
        spec.peer_port.unwrap_or(179),
        1,
        65535,
    );
    let source_address = spec
        .source_address
        .as_deref()
        .and_then(|t| ip(p, &format!("{path}.sourceAddress"), t));
    let hold_time = duration(p, &format!("{path}.holdTime"), &spec.hold_time, 90.0);
    if hold_time.as_secs_f64() > 0.0 && hold_time.as_secs_f64() < 3.0 {
        p.add(
            format!("{path}.holdTime"),
            "must be 0 or at least 3 s (RFC 4271 §4.2)",
        );
    }
    let keepalive_time = duration(
        p,
        &format!("{path}.keepaliveTime"),
        &spec.keepalive_time,
        hold_time.as_secs_f64() / 3.0,
    );
    if hold_time.as_secs_f64() > 0.0 && keepalive_time >= hold_time {
        p.add(
            format!("{path}.keepaliveTime"),
            "must be shorter than holdTime",
        );
    }
    let connect_time = duration(p, &format!("{path}.connectTime"), &spec.connect_time, 10.0);
    let router_id = spec
        .router_id
        .as_deref()
        .and_then(|t| match std::net::Ipv4Addr::from_str(t) {
            Ok(id) => Some(id),
            Err(_) => {
                p.add(
                    format!("{path}.routerID"),
                    format!("{t:?} is not an IPv4 address"),
                );
                None
            }
        });
    if let Some(pw) = &spec.password {
        if pw.is_empty() || pw.len() > 80 {
            p.add(
                format!("{path}.password"),
                "a TCP MD5 key has 1 to 80 characters",
            );
        }
    }
    if p.0.len() > before {
        return None;
    }
    Some(Peer {
        peer_address: peer_address?,
        peer_asn: peer_asn? as u32,
        my_asn: my_asn? as u32,
        peer_port: peer_port? as u16,
        source_address,
        hold_time,
        keepalive_time,
        connect_time,
        router_id,
        password: spec.password.clone(),
        ebgp_multi_hop: spec.ebgp_multi_hop,
        bfd,
    })
}

fn bgp_advertisement(
    p: &mut Problems,
    i: usize,
    spec: &file::BgpAdvertisementSpec,
    pool_names: &BTreeSet<&str>,
    peers: &[Peer],
    pools: &[Pool],
) -> BgpAdvertisement {
    let path = format!("bgpAdvertisements[{i}]");
    for (j, name) in spec.ip_address_pools.iter().enumerate() {
        if !pool_names.contains(name.as_str()) {
            p.add(
                format!("{path}.ipAddressPools[{j}]"),
                format!("no pool is named {name:?}"),
            );
        }
    }
    let mut communities = Vec::new();
    for (j, c) in spec.communities.iter().enumerate() {
        let parsed = well_known_community(c).or_else(|| {
            let (a, b) = c.split_once(':')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        });
        match parsed {
            Some(v) => communities.push(v),
            None => p.add(
                format!("{path}.communities[{j}]"),
                format!("{c:?} is neither ASN:VALUE (16 bits each) nor a well-known name like no-export"),
            ),
        }
    }
    let mut large_communities = Vec::new();
    for (j, c) in spec.large_communities.iter().enumerate() {
        let parts: Vec<Option<u32>> = c.split(':').map(|x| x.parse().ok()).collect();
        match parts.as_slice() {
            [Some(a), Some(b), Some(c)] => large_communities.push((*a, *b, *c)),
            _ => p.add(
                format!("{path}.largeCommunities[{j}]"),
                format!("{c:?} is not GLOBAL:LOCAL1:LOCAL2 (32 bits each, RFC 8092)"),
            ),
        }
    }
    let local_pref = spec
        .local_pref
        .and_then(|v| ranged(p, &format!("{path}.localPref"), v, 0, u32::MAX as i64))
        .map(|v| v as u32);
    let aggregation_length = spec
        .aggregation_length
        .and_then(|v| ranged(p, &format!("{path}.aggregationLength"), v, 0, 32))
        .unwrap_or(32) as u8;
    let aggregation_length_v6 = spec
        .aggregation_length_v6
        .and_then(|v| ranged(p, &format!("{path}.aggregationLengthV6"), v, 0, 128))
        .unwrap_or(128) as u8;
    let mut peer_ips = Vec::new();
    for (j, text) in spec.peers.iter().enumerate() {
        if let Some(addr) = ip(p, &format!("{path}.peers[{j}]"), text) {
            if !peers.iter().any(|x| x.peer_address == addr) {
                p.add(
                    format!("{path}.peers[{j}]"),
                    format!("no peer has peerAddress {addr}"),
                );
            }
            peer_ips.push(addr);
        }
    }
    BgpAdvertisement {
        pools: if spec.ip_address_pools.is_empty() {
            pools.iter().map(|x| x.name.clone()).collect()
        } else {
            spec.ip_address_pools.clone()
        },
        communities,
        large_communities,
        local_pref,
        aggregation_length,
        aggregation_length_v6,
        peers: peer_ips,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_text;

    fn build_one(text: &str) -> Result<Config, Vec<String>> {
        let f = parse_text("test.yaml", text).map_err(|e| e.problems)?;
        build(vec![("test.yaml".into(), f)]).map_err(|e| e.iter().map(|x| x.to_string()).collect())
    }

    const GOOD: &str = r#"
dataplane:
  interfaces: [eth1]
  maglevTableSize: 1009
pools:
- name: web
  addresses: [198.51.100.0/29, 2001:db8::/126]
  avoidBuggyIPs: true
- name: manual
  addresses: [203.0.113.10-203.0.113.20]
  autoAssign: false
l2Advertisements:
- ipAddressPools: [web]
  interfaces: [eth2]
services:
- name: shop
  ports: [{port: 80, targetPort: 8080}, {port: 443, protocol: TCP, targetPort: 8443}]
  backends: [{ip: 10.0.0.11}, {ip: 10.0.0.12, weight: 2}]
  healthCheck: {type: http, path: /healthz, intervalSeconds: 1, timeoutSeconds: 0.5, rise: 2, fall: 2}
- name: dns
  ip: 203.0.113.10
  pool: manual
  ports: [{port: 53, protocol: UDP}]
  backends: [{ip: 10.0.0.53}]
peers:
- peerAddress: 192.0.2.1
  peerASN: 64501
  myASN: 64500
  holdTime: 90s
bgpAdvertisements:
- ipAddressPools: [manual]
  communities: [no-export, "64500:100"]
  largeCommunities: ["64500:1:2"]
  localPref: 100
"#;

    #[test]
    fn a_complete_file_builds_the_model() {
        let c = build_one(GOOD).unwrap();
        assert_eq!(c.dataplane.interfaces, ["eth1", "eth2"]);
        assert_eq!(c.dataplane.maglev_table_size, 1009);
        assert_eq!(c.pools.len(), 2);
        assert_eq!(c.services[0].ports[1].target_port, 8443);
        assert_eq!(c.services[0].backends[1].weight, 2);
        assert!(matches!(
            c.services[0].health_check.as_ref().unwrap().probe,
            HealthProbe::Http { .. }
        ));
        assert_eq!(c.services[1].ports[0].protocol, Protocol::Udp);
        assert_eq!(c.peers[0].hold_time, Duration::from_secs(90));
        assert_eq!(c.peers[0].keepalive_time, Duration::from_secs(30));
        assert_eq!(
            c.bgp_advertisements[0].communities,
            [(0xffff, 0xff01), (64500, 100)]
        );
        assert_eq!(c.bgp_advertisements[0].aggregation_length, 32);
    }

    #[test]
    fn every_problem_is_reported_with_its_field_path_and_value() {
        let cases: &[(&str, &str)] = &[
            ("pools: [{name: a, addresses: [198.51.100.9-198.51.100.1]}]", "pools[0].addresses[0]: \"198.51.100.9-198.51.100.1\": the range ends"),
            ("pools: [{name: a, addresses: [198.51.100.0/24]}, {name: b, addresses: [198.51.100.128/25]}]", "pools[1].addresses: 198.51.100.128-198.51.100.255 (pool \"b\") overlaps"),
            ("pools: [{name: a, addresses: [198.51.100.0/24]}, {name: a, addresses: [203.0.113.0/24]}]", "pools[1].name: \"a\" is used by two pools"),
            ("pools: [{name: a, addresses: [198.51.100.0/24]}]\nservices: [{name: s, ip: 203.0.113.1, ports: [{port: 80}]}]", "services[0].ip: 203.0.113.1 is outside every pool"),
            ("pools: [{name: a, addresses: [198.51.100.0/24]}]\nservices: [{name: s, ports: [{port: 80}]}, {name: s, ports: [{port: 81}]}]", "services[1].name: \"s\" is used by two services"),
            ("services: [{name: s, ports: [{port: 70000}]}]", "services[0].ports[0].port: 70000 is out of range (1..=65535)"),
            ("services: [{name: s, ports: [{port: 80, protocol: SCTP}]}]", "services[0].ports[0].protocol: \"SCTP\" is neither TCP nor UDP"),
            ("services: [{name: s, ports: [{port: 80}], backends: [{ip: 10.0.0.1}, {ip: 10.0.0.1}]}]", "services[0].backends[1].ip: backend 10.0.0.1 is listed twice"),
            ("services: [{name: s, ports: [{port: 80}], backends: [{ip: 10.0.0.1}, {ip: \"2001:db8::1\"}]}]", "services[0].backends[1].ip: 2001:db8::1 is not of the service's address family"),
            ("services: [{name: s, ports: [{port: 80}, {port: 81}], backends: [{ip: 10.0.0.1, port: 8080}]}]", "services[0].backends[0].port: a backend port only goes with a single service port"),
            ("services: [{name: s, ports: [{port: 80}], backends: [{ip: 10.0.0.1, node: 192.0.2.7}]}]", "services[0].backends[0].node: 192.0.2.7 is another host: dataplane.tunnels.addresses needs this host's IPv4 address"),
            ("dataplane: {tunnels: {addresses: [192.0.2.1]}}\nservices: [{name: s, ports: [{port: 80}], backends: [{ip: 10.0.0.1, node: \"2001:db8::7\"}]}]", "services[0].backends[0].node: 2001:db8::7 is not of the backend's address family"),
            ("dataplane: {tunnels: {addresses: [192.0.2.1, 192.0.2.2]}}", "dataplane.tunnels.addresses[1]: 192.0.2.2: one address per family"),
            ("dataplane: {tunnels: {mtu: 100}}", "dataplane.tunnels.mtu"),
            ("services: [{name: s, ports: [{port: 80}], healthCheck: {type: icmp}}]", "services[0].healthCheck.type: \"icmp\" is neither tcp nor http"),
            ("services: [{name: s, ports: [{port: 80}], healthCheck: {type: tcp, intervalSeconds: 1, timeoutSeconds: 2}}]", "services[0].healthCheck.timeoutSeconds: 2 s is longer than the interval"),
            ("l2Advertisements: [{ipAddressPools: [nope], interfaces: [eth0]}]", "l2Advertisements[0].ipAddressPools[0]: no pool is named \"nope\""),
            ("peers: [{peerAddress: 192.0.2.1, peerASN: 0, myASN: 64500}]", "peers[0].peerASN: 0 is out of range"),
            ("peers: [{peerAddress: 192.0.2.1, peerASN: 64501, myASN: 64500, holdTime: 2s}]", "peers[0].holdTime: must be 0 or at least 3 s"),
            ("peers: [{peerAddress: 192.0.2.1, peerASN: 23456, myASN: 64500}]", "peers[0].peerASN: 23456 is AS_TRANS"),
            ("peers: [{peerAddress: 192.0.2.1, peerASN: 64501, myASN: 64500, holdTime: 9s, keepaliveTime: 10s}]", "peers[0].keepaliveTime: must be shorter than holdTime"),
            ("peers: [{peerAddress: 192.0.2.1, peerASN: 64501, myASN: 64500, routerID: \"2001:db8::1\"}]", "peers[0].routerID: \"2001:db8::1\" is not an IPv4 address"),
            ("bgpAdvertisements: [{communities: [\"70000:1\"]}]", "bgpAdvertisements[0].communities[0]: \"70000:1\" is neither ASN:VALUE"),
            ("bgpAdvertisements: [{aggregationLength: 33}]", "bgpAdvertisements[0].aggregationLength: 33 is out of range (0..=32)"),
            ("dataplane: {maglevTableSize: 1000}", "dataplane.maglevTableSize: table size 1000 is not prime"),
            ("dataplane: {metricsAddress: localhost}", "dataplane.metricsAddress: \"localhost\" is not an address:port"),
            ("dataplane: {floodGuardNewFlowsPerSecond: -1}", "dataplane.floodGuardNewFlowsPerSecond: -1 is out of range"),
            ("services: [{name: s, ports: [{port: 80}], helthCheck: {type: tcp}}]", "did you mean `healthCheck`?"),
            ("peers: [{peerAddress: 192.0.2.1, peerASN: 64501, myASN: 64500, bfdProfile: fast}]", "peers[0].bfdProfile: \"fast\" names no BFD profile (defined: none)"),
            ("bfdProfiles: [{name: slow}]\npeers: [{peerAddress: 192.0.2.1, peerASN: 64501, myASN: 64500, bfdProfile: fast}]", "(defined: slow)"),
            ("bfdProfiles: [{name: a, receiveInterval: 5}]", "bfdProfiles[0].receiveInterval: 5 is out of range (10..=60000)"),
            ("bfdProfiles: [{name: a, transmitInterval: 60001}]", "bfdProfiles[0].transmitInterval: 60001 is out of range (10..=60000)"),
            ("bfdProfiles: [{name: a, detectMultiplier: 1}]", "bfdProfiles[0].detectMultiplier: 1 is out of range (2..=255)"),
            ("bfdProfiles: [{name: a, minimumTtl: 255}]", "bfdProfiles[0].minimumTtl: 255 is out of range (1..=254)"),
            ("bfdProfiles: [{name: a, echoMode: true}]", "bfdProfiles[0].echoMode: true: Sluice runs BFD in asynchronous mode only"),
            ("bfdProfiles: [{name: a}, {name: a}]", "bfdProfiles[1].name: \"a\" is defined twice"),
            ("bfdProfiles: [{name: a, recieveInterval: 100}]", "did you mean `receiveInterval`?"),
        ];
        for (text, expected) in cases {
            let errors = build_one(text).unwrap_err();
            assert!(
                errors.iter().any(|e| e.contains(expected)),
                "{text}\n  expected {expected:?}\n  got {errors:#?}"
            );
        }
    }

    #[test]
    fn backends_on_other_hosts_come_with_this_hosts_end_of_the_tunnels() {
        let c = build_one(
            "dataplane:\n  tunnels: {addresses: [192.0.2.1, \"2001:db8::1\"], nodes: [192.0.2.7, 192.0.2.8], mtu: 9000}\npools: [{name: p, addresses: [198.51.100.0/24]}]\nservices: [{name: s, ip: 198.51.100.1, ports: [{port: 80}], backends: [{ip: 10.0.0.1}, {ip: 10.0.7.1, node: 192.0.2.7}]}]\n",
        )
        .unwrap();
        let t = c.dataplane.tunnels.unwrap();
        assert_eq!(t.local_v4, Some("192.0.2.1".parse().unwrap()));
        assert_eq!(t.local_v6, Some("2001:db8::1".parse().unwrap()));
        assert_eq!(t.mtu, 9000);
        assert_eq!(t.peers.len(), 2);
        let backends = &c.services[0].backends;
        assert_eq!(backends[0].node, None);
        assert_eq!(backends[1].node, Some("192.0.2.7".parse().unwrap()));
    }

    #[test]
    fn a_peer_naming_a_bfd_profile_gets_its_timers_and_metallb_defaults_fill_the_rest() {
        let c = build_one(
            "bfdProfiles:\n- {name: fast, receiveInterval: 100, transmitInterval: 150, detectMultiplier: 5, passiveMode: true, echoMode: false, echoInterval: 50}\n- {name: defaults}\npeers:\n- {peerAddress: 192.0.2.1, peerASN: 64501, myASN: 64500, bfdProfile: fast}\n- {peerAddress: 192.0.2.2, peerASN: 64501, myASN: 64500, bfdProfile: defaults, ebgpMultiHop: true}\n- {peerAddress: 192.0.2.3, peerASN: 64501, myASN: 64500}\n",
        )
        .unwrap();
        let fast = c.peers[0].bfd.as_ref().unwrap();
        assert_eq!(
            (
                fast.receive_interval,
                fast.transmit_interval,
                fast.detect_multiplier,
                fast.passive_mode
            ),
            (
                Duration::from_millis(100),
                Duration::from_millis(150),
                5,
                true
            )
        );
        assert_eq!(fast.detection_time(), Duration::from_millis(500));
        let defaults = c.peers[1].bfd.as_ref().unwrap();
        assert_eq!(
            (
                defaults.receive_interval,
                defaults.transmit_interval,
                defaults.detect_multiplier,
                defaults.minimum_ttl
            ),
            (
                Duration::from_millis(300),
                Duration::from_millis(300),
                3,
                254
            )
        );
        assert!(c.peers[2].bfd.is_none());
    }

    #[test]
    fn a_legacy_configmap_with_bfd_profiles_gives_the_same_peers() {
        let legacy = "peers:\n- peer-address: 192.0.2.1\n  peer-asn: 64501\n  my-asn: 64500\n  bfd-profile: full1\nbfd-profiles:\n- name: full1\n  receive-interval: 179\n  transmit-interval: 180\n  detect-multiplier: 4\n  echo-interval: 62\n  echo-mode: false\n  passive-mode: false\n  minimum-ttl: 254\n";
        let c = build(vec![(
            "metallb.yaml".into(),
            parse_text("metallb.yaml", legacy).unwrap(),
        )])
        .unwrap();
        let p = c.peers[0].bfd.as_ref().unwrap();
        assert_eq!(p.name, "full1");
        assert_eq!(
            (p.receive_interval, p.transmit_interval, p.detect_multiplier),
            (Duration::from_millis(179), Duration::from_millis(180), 4)
        );
        let err = build(vec![(
            "metallb.yaml".into(),
            parse_text(
                "metallb.yaml",
                &legacy.replace("bfd-profile: full1", "bfd-profile: nope"),
            )
            .unwrap(),
        )])
        .unwrap_err();
        assert!(
            err[0]
                .to_string()
                .contains("metallb.yaml: peers[0].bfd-profile: \"nope\" names no BFD profile"),
            "{err:?}"
        );
    }

    #[test]
    fn problems_in_a_legacy_configmap_name_the_file_and_the_path_in_its_own_terms() {
        let configmap = "apiVersion: v1\nkind: ConfigMap\ndata:\n  config: |\n    peers:\n    - peer-address: 192.0.2.1\n      peer-asn: 0\n      my-asn: 64500\n      hold-time: 2s\n    address-pools:\n    - name: l2\n      protocol: layer2\n      addresses: [198.51.100.0/28]\n    - name: bgp\n      protocol: bgp\n      addresses: [203.0.113.0/28, nonsense]\n      bgp-advertisements:\n      - aggregation-length: 24\n      - aggregation-length: 40\n        localpref: -1\n        communities: [unknown-name]\n";
        let errors: Vec<String> = build(vec![(
            "cm.yaml".into(),
            parse_text("cm.yaml", configmap).unwrap(),
        )])
        .unwrap_err()
        .iter()
        .map(|e| e.to_string())
        .collect();
        for expected in [
            "cm.yaml: data.config.peers[0].peer-asn: 0 is out of range",
            "cm.yaml: data.config.peers[0].hold-time: must be 0 or at least 3 s",
            "cm.yaml: data.config.address-pools[1].addresses[1]: \"nonsense\"",
            "cm.yaml: data.config.address-pools[1].bgp-advertisements[1].aggregation-length: 40 is out of range",
            "cm.yaml: data.config.address-pools[1].bgp-advertisements[1].localpref: -1",
            "cm.yaml: data.config.address-pools[1].bgp-advertisements[1].communities[0]: \"unknown-name\"",
        ] {
            assert!(
                errors.iter().any(|e| e.starts_with(expected)),
                "expected {expected:?} in {errors:#?}"
            );
        }
        // A protocol MetalLB does not know is refused where it is written.
        let err = parse_text(
            "cm.yaml",
            "address-pools: [{name: x, protocol: layer3, addresses: [198.51.100.0/28]}]",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "cm.yaml: address-pools[0].protocol: \"layer3\" is neither layer2 nor bgp"
        );
        // Sluice's own format: the file and the path in it, also for a second file.
        let errors = build(vec![
            (
                "a.yaml".into(),
                parse_text("a.yaml", "pools: [{name: a, addresses: [198.51.100.0/28]}]").unwrap(),
            ),
            (
                "b.yaml".into(),
                parse_text(
                    "b.yaml",
                    "dataplane: {maglevTableSize: 1000}\npools: [{name: b, addresses: [bad]}]",
                )
                .unwrap(),
            ),
        ])
        .unwrap_err();
        let errors: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("b.yaml: pools[0].addresses[0]: \"bad\"")),
            "{errors:#?}"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("b.yaml: dataplane.maglevTableSize:")),
            "{errors:#?}"
        );
    }

    #[test]
    fn node_selectors_of_a_legacy_peer_are_accepted_with_a_warning() {
        let legacy = "peers:\n- peer-address: 192.0.2.1\n  peer-asn: 64501\n  my-asn: 64500\n  node-selectors:\n  - match-labels:\n      rack: frontend\n";
        let c = build(vec![(
            "m.yaml".into(),
            parse_text("m.yaml", legacy).unwrap(),
        )])
        .unwrap();
        assert_eq!(c.peers.len(), 1);
        assert!(
            c.warnings[0]
                .to_string()
                .starts_with("m.yaml: peers[0].node-selectors: sluice run has no nodes to select"),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn a_legacy_cidr_with_host_bits_is_read_as_metallb_reads_it_with_a_warning_naming_its_path() {
        let configmap = "apiVersion: v1\nkind: ConfigMap\ndata:\n  config: |\n    address-pools:\n    - name: a\n      protocol: bgp\n      addresses: [198.51.100.0/28]\n    - name: b\n      protocol: bgp\n      addresses: [192.168.122.1/24, \"2001:db8::1/64\"]\n";
        let c = build(vec![(
            "metallb.yaml".into(),
            parse_text("metallb.yaml", configmap).unwrap(),
        )])
        .unwrap();
        assert_eq!(
            c.pools[1].ranges[0].to_string(),
            "192.168.122.0-192.168.122.255"
        );
        let warnings: Vec<String> = c.warnings.iter().map(|w| w.to_string()).collect();
        assert_eq!(
            warnings,
            [
                "metallb.yaml: data.config.address-pools[1].addresses[0]: \"192.168.122.1/24\" has host bits set; read as 192.168.122.0/24, as MetalLB does",
                "metallb.yaml: data.config.address-pools[1].addresses[1]: \"2001:db8::1/64\" has host bits set; read as 2001:db8::/64, as MetalLB does",
            ]
        );
        // Sluice's own format stays strict: the same CIDR is an error there.
        let errors = build_one("pools: [{name: b, addresses: [192.168.122.1/24]}]").unwrap_err();
        assert!(
            errors[0].contains("did you mean 192.168.122.0/24?"),
            "{errors:?}"
        );
    }

    #[test]
    fn all_problems_come_at_once() {
        let errors =
            build_one("services: [{name: s, ports: [{port: 0}, {port: 70000}]}]").unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
    }

    #[test]
    fn two_files_merge_and_only_one_may_set_the_dataplane() {
        let a = parse_text(
            "a.yaml",
            "dataplane: {interfaces: [eth0]}\npools: [{name: p, addresses: [198.51.100.0/24]}]",
        )
        .unwrap();
        let b = parse_text(
            "b.yaml",
            "services: [{name: s, pool: p, ports: [{port: 80}]}]",
        )
        .unwrap();
        let c = build(vec![("a.yaml".into(), a), ("b.yaml".into(), b)]).unwrap();
        assert_eq!(c.services[0].pool.as_deref(), Some("p"));
        let a = parse_text("a.yaml", "dataplane: {interfaces: [eth0]}").unwrap();
        let b = parse_text("b.yaml", "dataplane: {interfaces: [eth1]}").unwrap();
        let errors = build(vec![("a.yaml".into(), a), ("b.yaml".into(), b)]).unwrap_err();
        assert!(errors[0]
            .to_string()
            .contains("set in both a.yaml and b.yaml"));
    }

    #[test]
    fn a_legacy_layer2_pool_announces_on_link_whatever_the_dataplane_interfaces() {
        let legacy = parse_text("metallb.yaml", "address-pools:\n- name: default\n  protocol: layer2\n  addresses: [198.51.100.240-198.51.100.250]\n").unwrap();
        let ours = parse_text("sluice.yaml", "dataplane: {interfaces: [eth1]}\nservices: [{name: s, ports: [{port: 80}], backends: [{ip: 10.0.0.1}]}]").unwrap();
        let c = build(vec![
            ("metallb.yaml".into(), legacy),
            ("sluice.yaml".into(), ours),
        ])
        .unwrap();
        assert!(c.l2_advertisements[0].interfaces.is_empty(), "on-link");
        assert_eq!(c.l2_advertisements[0].pools, ["default"]);
        // Alone, without a data plane section, it is valid too.
        let legacy = parse_text("metallb.yaml", "address-pools:\n- name: default\n  protocol: layer2\n  addresses: [198.51.100.240-198.51.100.250]\n").unwrap();
        build(vec![("metallb.yaml".into(), legacy)]).unwrap();
    }
}
