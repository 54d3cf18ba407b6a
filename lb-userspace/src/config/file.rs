//! The config file as written: Sluice's YAML, or MetalLB's legacy ConfigMap (the whole ConfigMap
//! or just its `config` string). Only parsing here; `model` validates. Field names follow
//! MetalLB's CRDs (IPAddressPool, L2Advertisement, BGPPeer, BGPAdvertisement).

use serde::Deserialize;

use super::FileError;

/// Sluice's own format.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SluiceFile {
    #[serde(default)]
    pub dataplane: Option<DataplaneSection>,
    #[serde(default)]
    pub pools: Vec<PoolSpec>,
    #[serde(default)]
    pub l2_advertisements: Vec<L2AdvertisementSpec>,
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    #[serde(default)]
    pub peers: Vec<PeerSpec>,
    #[serde(default)]
    pub bgp_advertisements: Vec<BgpAdvertisementSpec>,
    #[serde(default)]
    pub bfd_profiles: Vec<BfdProfileSpec>,
    /// Where the items were in a MetalLB legacy ConfigMap (`None`: Sluice's format, whose paths
    /// are its own).
    #[serde(skip)]
    pub legacy: Option<LegacyPaths>,
    /// What was read differently from how it is written, with paths in the file's own terms.
    #[serde(skip)]
    pub warnings: Vec<FileError>,
}

/// Each item's path in the legacy ConfigMap it was read from, by list and index: the pool that
/// `pools[2]` was read from is `data.config.address-pools[2]`, the L2 advertisement a layer2
/// pool gave is that pool's path.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LegacyPaths {
    pub pools: Vec<String>,
    pub l2_advertisements: Vec<String>,
    pub peers: Vec<String>,
    pub bgp_advertisements: Vec<String>,
    pub bfd_profiles: Vec<String>,
}

impl LegacyPaths {
    /// The path of item `index` of Sluice's list `list` (`pools`, `peers`, ...).
    pub fn get(&self, list: &str, index: usize) -> Option<&str> {
        let paths = match list {
            "pools" => &self.pools,
            "l2Advertisements" => &self.l2_advertisements,
            "peers" => &self.peers,
            "bgpAdvertisements" => &self.bgp_advertisements,
            "bfdProfiles" => &self.bfd_profiles,
            _ => return None,
        };
        paths.get(index).map(String::as_str)
    }
}

/// A field of Sluice's format by its name in MetalLB's legacy ConfigMap.
pub fn legacy_field(name: &str) -> String {
    match name {
        "peerASN" => "peer-asn".into(),
        "myASN" => "my-asn".into(),
        "routerID" => "router-id".into(),
        "avoidBuggyIPs" => "avoid-buggy-ips".into(),
        "ebgpMultiHop" => "ebgp-multihop".into(),
        "localPref" => "localpref".into(),
        "aggregationLengthV6" => "aggregation-length-v6".into(),
        other => {
            let mut out = String::new();
            for c in other.chars() {
                if c.is_ascii_uppercase() {
                    out.push('-');
                    out.push(c.to_ascii_lowercase());
                } else {
                    out.push(c);
                }
            }
            out
        }
    }
}

/// MetalLB's BFDProfile fields; intervals in milliseconds. The legacy ConfigMap's
/// `bfd-profiles` use the same fields in kebab-case (the aliases).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BfdProfileSpec {
    pub name: String,
    #[serde(default, alias = "receive-interval")]
    pub receive_interval: Option<i64>,
    #[serde(default, alias = "transmit-interval")]
    pub transmit_interval: Option<i64>,
    #[serde(default, alias = "detect-multiplier")]
    pub detect_multiplier: Option<i64>,
    #[serde(default, alias = "echo-interval")]
    pub echo_interval: Option<i64>,
    #[serde(default, alias = "echo-mode")]
    pub echo_mode: Option<bool>,
    #[serde(default, alias = "passive-mode")]
    pub passive_mode: Option<bool>,
    #[serde(default, alias = "minimum-ttl")]
    pub minimum_ttl: Option<i64>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DataplaneSection {
    /// Interfaces to balance on (XDP ingress + TC egress). The L2 advertisements' interfaces are
    /// added to these.
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// Veths whose peer runs an XDP program: flows may be redirected into them in XDP.
    #[serde(default)]
    pub redirect_veths: Vec<String>,
    pub maglev_table_size: Option<u32>,
    /// Where /metrics, /healthz and /readyz are served (default 127.0.0.1:9120).
    pub metrics_address: Option<String>,
    /// Where allocations are remembered across restarts (default /var/lib/sluice/allocations.json).
    pub state_file: Option<String>,
    /// bpffs directory for the pinned maps (default /sys/fs/bpf/sluice).
    pub pin_dir: Option<String>,
    /// This node's IPv6 address: the next hop of IPv6 routes sent over IPv4 BGP sessions.
    #[serde(default, rename = "nodeIPv6")]
    pub node_ipv6: Option<String>,
    /// The flood guard: per CPU and second, new flows past this many are balanced but not
    /// tracked, so a flood cannot evict established flows (default 125000; 0: no limit).
    #[serde(default)]
    pub flood_guard_new_flows_per_second: Option<i64>,
    /// Backends on other hosts, reached through tunnels (IPIP, IPv6 in IPv6).
    #[serde(default)]
    pub tunnels: Option<TunnelsSection>,
}

/// `dataplane.tunnels`: this host's end of the tunnels to backends on other hosts
/// (`services[].backends[].node`), and the hosts it accepts tunnelled flows from.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TunnelsSection {
    /// This host's addresses (one per family) on the network between the hosts.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The other hosts' addresses: tunnelled flows are accepted from these only.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// The network's MTU (default 1500).
    #[serde(default)]
    pub mtu: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PoolSpec {
    pub name: String,
    pub addresses: Vec<String>,
    #[serde(default, rename = "avoidBuggyIPs")]
    pub avoid_buggy_ips: bool,
    #[serde(default = "yes")]
    pub auto_assign: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct L2AdvertisementSpec {
    /// Pools whose IPs are announced; empty: every pool.
    #[serde(default, alias = "pools")]
    pub ip_address_pools: Vec<String>,
    /// Interfaces to answer ARP/NDP on; empty: the data plane's interfaces.
    #[serde(default)]
    pub interfaces: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    pub name: String,
    /// A requested IP; otherwise one is allocated from `pool` (or the first auto-assign pool).
    #[serde(default, alias = "loadBalancerIP")]
    pub ip: Option<String>,
    #[serde(default, alias = "addressPool")]
    pub pool: Option<String>,
    pub ports: Vec<PortSpec>,
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
    #[serde(default)]
    pub health_check: Option<HealthCheckSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortSpec {
    pub port: i64,
    #[serde(default)]
    pub protocol: Option<String>,
    /// The backends' port (default: `port`).
    #[serde(default)]
    pub target_port: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendSpec {
    pub ip: String,
    /// Only with a single service port; otherwise use `ports[].targetPort`.
    #[serde(default)]
    pub port: Option<i64>,
    #[serde(default)]
    pub weight: Option<i64>,
    /// The host the backend runs on, when not this one: its flows are tunnelled there, and
    /// its replies go from there straight to the client.
    #[serde(default)]
    pub node: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthCheckSpec {
    /// `tcp` (connect) or `http` (GET, 2xx expected).
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub path: Option<String>,
    /// Probe this port instead of the backend's.
    #[serde(default)]
    pub port: Option<i64>,
    #[serde(default)]
    pub interval_seconds: Option<f64>,
    #[serde(default)]
    pub timeout_seconds: Option<f64>,
    #[serde(default)]
    pub rise: Option<i64>,
    #[serde(default)]
    pub fall: Option<i64>,
}

/// MetalLB's BGPPeer fields.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerSpec {
    pub peer_address: String,
    #[serde(rename = "peerASN")]
    pub peer_asn: i64,
    #[serde(rename = "myASN")]
    pub my_asn: i64,
    #[serde(default)]
    pub peer_port: Option<i64>,
    #[serde(default)]
    pub source_address: Option<String>,
    #[serde(default)]
    pub hold_time: Option<Duration>,
    #[serde(default)]
    pub keepalive_time: Option<Duration>,
    #[serde(default)]
    pub connect_time: Option<Duration>,
    #[serde(default, rename = "routerID")]
    pub router_id: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub ebgp_multi_hop: bool,
    /// The name of a BFD profile: BFD runs with this peer and takes the session down with it.
    #[serde(default)]
    pub bfd_profile: Option<String>,
}

/// MetalLB's BGPAdvertisement fields.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BgpAdvertisementSpec {
    #[serde(default, alias = "pools")]
    pub ip_address_pools: Vec<String>,
    #[serde(default)]
    pub communities: Vec<String>,
    #[serde(default)]
    pub large_communities: Vec<String>,
    #[serde(default)]
    pub local_pref: Option<i64>,
    #[serde(default)]
    pub aggregation_length: Option<i64>,
    #[serde(default, rename = "aggregationLengthV6")]
    pub aggregation_length_v6: Option<i64>,
    #[serde(default)]
    pub peers: Vec<String>,
}

/// A duration as MetalLB writes it ("90s", "1m30s", "500ms") or a number of seconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Duration {
    Seconds(f64),
    Text(String),
}

impl Duration {
    pub fn seconds(&self) -> Result<f64, String> {
        match self {
            Self::Seconds(s) => Ok(*s),
            Self::Text(t) => parse_go_duration(t),
        }
    }
}

/// Go's duration syntax, the subset MetalLB users write: numbers with h, m, s, ms units.
pub fn parse_go_duration(text: &str) -> Result<f64, String> {
    let mut total = 0.0;
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err("an empty duration".into());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{text:?} has a number without a unit (s, m, h, ms)"))?;
        let value: f64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{text:?} is not a duration like 90s or 1m30s"))?;
        rest = &rest[digits..];
        let (factor, len) = if rest.starts_with("ms") {
            (0.001, 2)
        } else if rest.starts_with('s') {
            (1.0, 1)
        } else if rest.starts_with('m') {
            (60.0, 1)
        } else if rest.starts_with('h') {
            (3600.0, 1)
        } else {
            return Err(format!("{text:?} is not a duration like 90s or 1m30s"));
        };
        total += value * factor;
        rest = &rest[len..];
    }
    Ok(total)
}

/// MetalLB's legacy `config` (the string inside its ConfigMap).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LegacyConfig {
    #[serde(default)]
    pub peers: Vec<LegacyPeer>,
    #[serde(default)]
    pub address_pools: Vec<LegacyPool>,
    #[serde(default)]
    pub bgp_communities: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub bfd_profiles: Vec<BfdProfileSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LegacyPeer {
    pub peer_address: String,
    pub peer_asn: i64,
    pub my_asn: i64,
    #[serde(default)]
    pub peer_port: Option<i64>,
    #[serde(default)]
    pub source_address: Option<String>,
    #[serde(default)]
    pub hold_time: Option<Duration>,
    #[serde(default)]
    pub keepalive_time: Option<Duration>,
    #[serde(default)]
    pub router_id: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub ebgp_multihop: bool,
    /// Accepted for compatibility; Sluice's standalone mode has no nodes to select.
    #[serde(default)]
    pub node_selectors: Option<yaml_serde::Value>,
    #[serde(default)]
    pub bfd_profile: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LegacyPool {
    pub name: String,
    pub protocol: String,
    pub addresses: Vec<String>,
    #[serde(default)]
    pub avoid_buggy_ips: bool,
    #[serde(default = "yes")]
    pub auto_assign: bool,
    #[serde(default)]
    pub bgp_advertisements: Vec<LegacyBgpAdvertisement>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LegacyBgpAdvertisement {
    #[serde(default)]
    pub aggregation_length: Option<i64>,
    #[serde(default, rename = "aggregation-length-v6")]
    pub aggregation_length_v6: Option<i64>,
    #[serde(default)]
    pub localpref: Option<i64>,
    #[serde(default)]
    pub communities: Vec<String>,
}

/// Parses one file: Sluice's format, a MetalLB ConfigMap, or a bare MetalLB `config`.
pub fn parse(text: &str) -> Result<SluiceFile, FileError> {
    if let Some((legacy, prefix)) = legacy(text)? {
        return from_legacy(legacy, &prefix);
    }
    let value: yaml_serde::Value = yaml_serde::from_str(text).map_err(|e| FileError {
        path: String::new(),
        message: format!("not valid YAML: {e}"),
    })?;
    if value.is_null() {
        return Ok(SluiceFile::default());
    }
    deserialize::<SluiceFile>(value, "")
}

/// MetalLB's legacy configuration, when the text is one (a ConfigMap, or its `config` string
/// alone), with the prefix of its paths (`data.config.`); `None` for anything else.
pub fn legacy(text: &str) -> Result<Option<(LegacyConfig, String)>, FileError> {
    let Ok(value) = yaml_serde::from_str::<yaml_serde::Value>(text) else {
        return Ok(None);
    };
    if value.get("kind").and_then(|k| k.as_str()) == Some("ConfigMap") {
        let config = value
            .get("data")
            .and_then(|d| d.get("config"))
            .and_then(|c| c.as_str())
            .ok_or_else(|| FileError {
                path: "data.config".into(),
                message: "a MetalLB ConfigMap needs its configuration in data.config".into(),
            })?;
        return parse_legacy(config, "data.config.").map(Some);
    }
    if value.get("address-pools").is_some()
        || (value.get("peers").is_some() && has_kebab_peer(&value))
    {
        return parse_legacy(text, "").map(Some);
    }
    Ok(None)
}

fn has_kebab_peer(value: &yaml_serde::Value) -> bool {
    value
        .get("peers")
        .and_then(|p| p.as_sequence())
        .and_then(|p| p.first())
        .is_some_and(|p| p.get("peer-address").is_some())
}

fn parse_legacy(text: &str, prefix: &str) -> Result<(LegacyConfig, String), FileError> {
    let value: yaml_serde::Value = yaml_serde::from_str(text).map_err(|e| FileError {
        path: prefix.trim_end_matches('.').to_string(),
        message: format!("not valid YAML: {e}"),
    })?;
    let legacy: LegacyConfig = deserialize(value, prefix)?;
    Ok((legacy, prefix.to_string()))
}

/// MetalLB's legacy configuration in Sluice's terms: layer2 pools get an L2 advertisement that
/// answers on-link; bgp pools get their BGP advertisements. `prefix` is where the legacy
/// configuration sits in the file (`data.config.`): every item's path says it.
pub fn from_legacy(legacy: LegacyConfig, prefix: &str) -> Result<SluiceFile, FileError> {
    let mut file = SluiceFile::default();
    let mut paths = LegacyPaths::default();
    for (i, peer) in legacy.peers.into_iter().enumerate() {
        let at = format!("{prefix}peers[{i}]");
        if peer.node_selectors.is_some() {
            file.warnings.push(FileError {
                path: format!("{at}.node-selectors"),
                message: "sluice run has no nodes to select: this host peers (in Kubernetes, write the peer as a BGPPeer with nodeSelectors)".into(),
            });
        }
        paths.peers.push(at);
        file.peers.push(PeerSpec {
            peer_address: peer.peer_address,
            peer_asn: peer.peer_asn,
            my_asn: peer.my_asn,
            peer_port: peer.peer_port,
            source_address: peer.source_address,
            hold_time: peer.hold_time,
            keepalive_time: peer.keepalive_time,
            connect_time: None,
            router_id: peer.router_id,
            password: peer.password,
            ebgp_multi_hop: peer.ebgp_multihop,
            bfd_profile: peer.bfd_profile,
        });
    }
    paths.bfd_profiles = (0..legacy.bfd_profiles.len())
        .map(|i| format!("{prefix}bfd-profiles[{i}]"))
        .collect();
    file.bfd_profiles = legacy.bfd_profiles;
    for (i, pool) in legacy.address_pools.into_iter().enumerate() {
        let at = format!("{prefix}address-pools[{i}]");
        match pool.protocol.as_str() {
            "bgp" => {
                let advertisements = if pool.bgp_advertisements.is_empty() {
                    paths.bgp_advertisements.push(at.clone());
                    vec![LegacyBgpAdvertisement {
                        aggregation_length: None,
                        aggregation_length_v6: None,
                        localpref: None,
                        communities: Vec::new(),
                    }]
                } else {
                    for j in 0..pool.bgp_advertisements.len() {
                        paths
                            .bgp_advertisements
                            .push(format!("{at}.bgp-advertisements[{j}]"));
                    }
                    pool.bgp_advertisements.clone()
                };
                for adv in advertisements {
                    let communities = adv
                        .communities
                        .iter()
                        .map(|c| legacy.bgp_communities.get(c).cloned().unwrap_or(c.clone()))
                        .collect();
                    file.bgp_advertisements.push(BgpAdvertisementSpec {
                        ip_address_pools: vec![pool.name.clone()],
                        communities,
                        large_communities: Vec::new(),
                        local_pref: adv.localpref,
                        aggregation_length: adv.aggregation_length,
                        aggregation_length_v6: adv.aggregation_length_v6,
                        peers: Vec::new(),
                    });
                }
            }
            "layer2" => {
                paths.l2_advertisements.push(at.clone());
                file.l2_advertisements.push(L2AdvertisementSpec {
                    ip_address_pools: vec![pool.name.clone()],
                    interfaces: Vec::new(),
                });
            }
            other => {
                return Err(FileError {
                    path: format!("{at}.protocol"),
                    message: format!("{other:?} is neither layer2 nor bgp"),
                })
            }
        }
        paths.pools.push(at);
        file.pools.push(PoolSpec {
            name: pool.name,
            addresses: pool.addresses,
            avoid_buggy_ips: pool.avoid_buggy_ips,
            auto_assign: pool.auto_assign,
        });
    }
    file.legacy = Some(paths);
    Ok(file)
}

/// Deserializes with the failing field's path, and for an unknown field the closest known name.
fn deserialize<T: for<'de> Deserialize<'de>>(
    value: yaml_serde::Value,
    prefix: &str,
) -> Result<T, FileError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = format!("{prefix}{}", e.path())
            .trim_end_matches('.')
            .to_string();
        let message = e.inner().to_string();
        FileError {
            path: if path == "." { String::new() } else { path },
            message: with_hint(&message),
        }
    })
}

/// Adds "did you mean `x`?" to serde's "unknown field `y`, expected one of `a`, `b`".
fn with_hint(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_string();
    };
    let Some((unknown, expected)) = rest.split_once('`') else {
        return message.to_string();
    };
    let candidates: Vec<&str> = expected
        .split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s)
        .collect();
    let best = candidates
        .iter()
        .map(|c| {
            (
                edit_distance(&unknown.to_lowercase(), &c.to_lowercase()),
                *c,
            )
        })
        .min();
    match best {
        Some((d, name)) if d <= 3 || name.to_lowercase().contains(&unknown.to_lowercase()) => {
            format!("{message}; did you mean `{name}`?")
        }
        _ => message.to_string(),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            current.push(
                (previous[j] + cost)
                    .min(previous[j + 1] + 1)
                    .min(current[j] + 1),
            );
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_name_their_path_and_the_closest_known_name() {
        let err = parse(
            "services:\n- name: web\n  ports: [{port: 80}]\n  healthCheck: {type: tcp, fal: 3}\n",
        )
        .unwrap_err();
        assert_eq!(err.path, "services[0].healthCheck.fal");
        assert!(
            err.message.contains("unknown field `fal`"),
            "{}",
            err.message
        );
        assert!(
            err.message.contains("did you mean `fall`?"),
            "{}",
            err.message
        );
        let err = parse("pool:\n- name: x\n").unwrap_err();
        assert!(
            err.message.contains("did you mean `pools`?"),
            "{}",
            err.message
        );
    }

    #[test]
    fn go_durations_parse_like_metallb_writes_them() {
        assert_eq!(parse_go_duration("90s").unwrap(), 90.0);
        assert_eq!(parse_go_duration("1m30s").unwrap(), 90.0);
        assert_eq!(parse_go_duration("500ms").unwrap(), 0.5);
        assert!(parse_go_duration("90").is_err());
        assert!(parse_go_duration("ten").is_err());
    }

    #[test]
    fn metallb_configmap_and_bare_config_give_the_same_pools_and_peers() {
        let bare = "peers:\n- peer-address: 192.0.2.1\n  peer-asn: 64501\n  my-asn: 64500\n  hold-time: 90s\naddress-pools:\n- name: l2\n  protocol: layer2\n  addresses: [198.51.100.240-198.51.100.250]\n  avoid-buggy-ips: true\n- name: bgp\n  protocol: bgp\n  addresses: [203.0.113.0/28]\n  auto-assign: false\n  bgp-advertisements:\n  - aggregation-length: 32\n    localpref: 100\n    communities: [no-advertise]\nbgp-communities:\n  no-advertise: 65535:65282\n";
        let indented: String = bare.lines().map(|l| format!("    {l}\n")).collect();
        let configmap = format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  namespace: metallb-system\n  name: config\ndata:\n  config: |\n{indented}");
        for text in [bare.to_string(), configmap] {
            let file = parse(&text).unwrap();
            assert_eq!(file.pools.len(), 2);
            assert_eq!(file.pools[0].name, "l2");
            assert!(file.pools[0].avoid_buggy_ips);
            assert!(!file.pools[1].auto_assign);
            assert_eq!(file.l2_advertisements.len(), 1);
            assert_eq!(file.l2_advertisements[0].ip_address_pools, ["l2"]);
            assert_eq!(file.bgp_advertisements.len(), 1);
            assert_eq!(file.bgp_advertisements[0].communities, ["65535:65282"]);
            assert_eq!(file.bgp_advertisements[0].local_pref, Some(100));
            assert_eq!(file.peers.len(), 1);
            assert_eq!(file.peers[0].peer_asn, 64501);
            assert_eq!(
                file.peers[0].hold_time.as_ref().unwrap().seconds().unwrap(),
                90.0
            );
        }
    }

    #[test]
    fn a_configmap_without_data_config_is_refused_by_path() {
        let err = parse("kind: ConfigMap\ndata: {}\n").unwrap_err();
        assert_eq!(err.path, "data.config");
    }
}
