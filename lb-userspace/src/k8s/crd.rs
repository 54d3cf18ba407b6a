//! Sluice's custom resources, group `sluice.dev`, version `v1alpha1`. Field names follow MetalLB's
//! `metallb.io` CRDs, so moving over is a rename of the group. The CRD manifests in
//! `deploy/crds/` are generated from these types (`cargo xtask manifests`, or `sluice crds`).

use k8s_openapi::{
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector},
};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A pool of addresses that LoadBalancer Services get their IPs from.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "IPAddressPool",
    namespaced,
    status = "IPAddressPoolStatus",
    shortname = "ipp",
    printcolumn = r#"{"name":"Auto Assign","type":"boolean","jsonPath":".spec.autoAssign"}"#,
    printcolumn = r#"{"name":"Avoid Buggy IPs","type":"boolean","jsonPath":".spec.avoidBuggyIPs"}"#,
    printcolumn = r#"{"name":"Addresses","type":"string","jsonPath":".spec.addresses"}"#,
    printcolumn = r#"{"name":"In Use","type":"integer","jsonPath":".status.addressesInUse"}"#,
    printcolumn = r#"{"name":"Total","type":"integer","jsonPath":".status.addressesTotal"}"#,
    printcolumn = r#"{"name":"Valid","type":"string","jsonPath":".status.conditions[?(@.type==\"Valid\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct IPAddressPoolSpec {
    /// CIDRs (`192.0.2.0/28`, `2001:db8::/120`) and ranges (`192.0.2.10-192.0.2.20`).
    pub addresses: Vec<String>,
    /// Whether Services that ask for no pool may get addresses from this one (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_assign: Option<bool>,
    /// Skip IPv4 addresses ending in .0 and .255.
    #[serde(
        default,
        rename = "avoidBuggyIPs",
        skip_serializing_if = "Option::is_none"
    )]
    pub avoid_buggy_ips: Option<bool>,
    /// Which Services may use this pool, and in which order pools are tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_allocation: Option<ServiceAllocation>,
}

/// MetalLB's `serviceAllocation`: restricts a pool to some Services and orders the pools.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAllocation {
    /// Lower is tried first; pools without a priority come after those with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Namespaces whose Services may use the pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Labels of the namespaces whose Services may use the pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespace_selectors: Vec<LabelSelector>,
    /// Labels of the Services that may use the pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_selectors: Vec<LabelSelector>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IPAddressPoolStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Addresses in the pool (saturates at 2^63 - 1 for large IPv6 pools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses_total: Option<i64>,
    /// Addresses given to Services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses_in_use: Option<i64>,
}

/// The status of the other kinds: conditions only.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct Conditions {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Announces pools' addresses with ARP/NDP from one elected node, on chosen interfaces.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "L2Advertisement",
    namespaced,
    status = "Conditions",
    shortname = "l2adv",
    printcolumn = r#"{"name":"Pools","type":"string","jsonPath":".spec.ipAddressPools"}"#,
    printcolumn = r#"{"name":"Interfaces","type":"string","jsonPath":".spec.interfaces"}"#,
    printcolumn = r#"{"name":"Valid","type":"string","jsonPath":".status.conditions[?(@.type==\"Valid\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct L2AdvertisementSpec {
    /// Pools whose addresses are announced (with the selectors; neither: every pool).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_address_pools: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_address_pool_selectors: Vec<LabelSelector>,
    /// Nodes that may announce (none: every node).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_selectors: Vec<LabelSelector>,
    /// Interfaces to answer ARP/NDP on (none: those of the speaker's interfaces whose own
    /// subnets hold the address).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<String>,
}

/// A BGP router the speakers peer with.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "BGPPeer",
    namespaced,
    status = "Conditions",
    shortname = "bgpp",
    printcolumn = r#"{"name":"Address","type":"string","jsonPath":".spec.peerAddress"}"#,
    printcolumn = r#"{"name":"ASN","type":"integer","jsonPath":".spec.peerASN"}"#,
    printcolumn = r#"{"name":"My ASN","type":"integer","jsonPath":".spec.myASN"}"#,
    printcolumn = r#"{"name":"Valid","type":"string","jsonPath":".status.conditions[?(@.type==\"Valid\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BGPPeerSpec {
    pub peer_address: String,
    #[serde(rename = "peerASN")]
    pub peer_asn: i64,
    #[serde(rename = "myASN")]
    pub my_asn: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_port: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_address: Option<String>,
    /// Go duration syntax, as MetalLB: `90s`, `1m30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_time: Option<String>,
    #[serde(default, rename = "routerID", skip_serializing_if = "Option::is_none")]
    pub router_id: Option<String>,
    /// TCP MD5 password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ebgp_multi_hop: bool,
    /// Nodes that peer with this router (none: every node).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_selectors: Vec<LabelSelector>,
    /// The name of a BFDProfile in the same namespace: BFD runs with this router, and the
    /// session goes down when BFD does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bfd_profile: Option<String>,
}

/// How BFD runs with the BGP peers that name this profile (MetalLB's BFDProfile fields;
/// intervals in milliseconds).
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "BFDProfile",
    namespaced,
    status = "Conditions",
    shortname = "bfdp",
    printcolumn = r#"{"name":"Receive","type":"integer","jsonPath":".spec.receiveInterval"}"#,
    printcolumn = r#"{"name":"Transmit","type":"integer","jsonPath":".spec.transmitInterval"}"#,
    printcolumn = r#"{"name":"Multiplier","type":"integer","jsonPath":".spec.detectMultiplier"}"#,
    printcolumn = r#"{"name":"Valid","type":"string","jsonPath":".status.conditions[?(@.type==\"Valid\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BFDProfileSpec {
    /// The slowest rate (ms) at which this node accepts the router's packets (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receive_interval: Option<i64>,
    /// The rate (ms) at which this node would like to send (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transmit_interval: Option<i64>,
    /// Packets missed before the session is down (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect_multiplier: Option<i64>,
    /// Accepted for MetalLB manifests; echo is not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo_interval: Option<i64>,
    /// Must be false: Sluice runs BFD in asynchronous mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo_mode: Option<bool>,
    /// Wait for the router to start the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passive_mode: Option<bool>,
    /// Multi-hop sessions: the lowest TTL accepted (default 254).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_ttl: Option<i64>,
}

/// Announces pools' addresses to BGP peers.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "BGPAdvertisement",
    namespaced,
    status = "Conditions",
    shortname = "bgpadv",
    printcolumn = r#"{"name":"Pools","type":"string","jsonPath":".spec.ipAddressPools"}"#,
    printcolumn = r#"{"name":"Peers","type":"string","jsonPath":".spec.peers"}"#,
    printcolumn = r#"{"name":"Valid","type":"string","jsonPath":".status.conditions[?(@.type==\"Valid\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BGPAdvertisementSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_address_pools: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_address_pool_selectors: Vec<LabelSelector>,
    /// `65000:100` or a name from nowhere else: Sluice takes the numeric form only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<String>,
    /// `65000:1:2`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub large_communities: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_pref: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregation_length: Option<i64>,
    #[serde(
        default,
        rename = "aggregationLengthV6",
        skip_serializing_if = "Option::is_none"
    )]
    pub aggregation_length_v6: Option<i64>,
    /// Peer addresses to announce to (none: every peer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_selectors: Vec<LabelSelector>,
}

/// Every CRD Sluice defines.
pub fn definitions() -> Vec<CustomResourceDefinition> {
    vec![
        IPAddressPool::crd(),
        L2Advertisement::crd(),
        BGPPeer::crd(),
        BGPAdvertisement::crd(),
        BFDProfile::crd(),
    ]
}

/// The manifests as files: (`<plural>.sluice.dev.yaml`, text).
pub fn manifest_files() -> Vec<(String, String)> {
    definitions()
        .into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let yaml = yaml_serde::to_string(&crd).expect("a CRD serializes to YAML");
            let text = format!(
                "# Generated from lb-userspace/src/k8s/crd.rs by `cargo xtask manifests`; do not edit.\n{yaml}"
            );
            (format!("{name}.yaml"), text)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_crd_manifests_match_the_rust_types() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
        let generated = manifest_files();
        for (name, text) in &generated {
            let committed = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
            assert!(
                committed == *text,
                "deploy/crds/{name} differs from the Rust types: run `cargo xtask manifests`"
            );
        }
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".yaml"))
            .collect();
        on_disk.sort();
        let mut expected: Vec<String> = generated.into_iter().map(|(n, _)| n).collect();
        expected.sort();
        assert_eq!(
            on_disk, expected,
            "deploy/crds holds a CRD that is no longer generated"
        );
    }

    #[test]
    fn crds_use_metallb_field_names_and_carry_status_and_columns() {
        let pool = serde_json::to_value(IPAddressPool::crd()).unwrap();
        let version = &pool["spec"]["versions"][0];
        assert_eq!(pool["spec"]["group"], "sluice.dev");
        assert_eq!(version["name"], "v1alpha1");
        let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        for field in [
            "addresses",
            "autoAssign",
            "avoidBuggyIPs",
            "serviceAllocation",
        ] {
            assert!(spec.get(field).is_some(), "IPAddressPool lacks {field}");
        }
        assert!(version["subresources"]["status"].is_object());
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert!(columns.contains(&"Valid") && columns.contains(&"In Use"));

        let peer = serde_json::to_value(BGPPeer::crd()).unwrap();
        let spec = &peer["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"];
        for field in [
            "peerAddress",
            "peerASN",
            "myASN",
            "routerID",
            "ebgpMultiHop",
            "nodeSelectors",
            "bfdProfile",
        ] {
            assert!(spec.get(field).is_some(), "BGPPeer lacks {field}");
        }
    }

    #[test]
    fn a_metallb_pool_manifest_reads_as_a_sluice_pool_after_renaming_the_group() {
        let metallb = r#"
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {name: prod, namespace: metallb-system}
spec:
  addresses: [192.0.2.0/28, "192.0.2.100-192.0.2.110"]
  autoAssign: false
  avoidBuggyIPs: true
  serviceAllocation:
    priority: 50
    namespaces: [web]
    serviceSelectors:
    - matchExpressions: [{key: tier, operator: In, values: [front]}]
"#;
        let renamed = metallb.replace("metallb.io/v1beta1", "sluice.dev/v1alpha1");
        let pool: IPAddressPool = yaml_serde::from_str(&renamed).unwrap();
        assert_eq!(pool.spec.addresses.len(), 2);
        assert_eq!(pool.spec.auto_assign, Some(false));
        assert_eq!(pool.spec.avoid_buggy_ips, Some(true));
        let alloc = pool.spec.service_allocation.unwrap();
        assert_eq!(
            (alloc.priority, alloc.namespaces),
            (Some(50), vec!["web".to_string()])
        );
        assert_eq!(alloc.service_selectors.len(), 1);
    }
}
