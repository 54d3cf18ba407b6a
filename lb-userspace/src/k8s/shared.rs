//! What both sides read: a Service's key and the IPs in its status, label selectors, and the
//! valid subset of Sluice's objects. The controller side (`controller`, `reconcile`,
//! `allocate`) and the speaker side (`speaker`, `announce`, `liveness`) both build on this and
//! on `request`, `validity`, `crd`, `watch` and `metallb`, never on each other.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::{api::core::v1::Service, apimachinery::pkg::apis::meta::v1::LabelSelector};
use kube::ResourceExt;

use super::validity::{self, ObjectRef, Objects};

/// The ingress IPs in a Service's status.
pub fn status_ips(service: &Service) -> Vec<IpAddr> {
    service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect()
}

/// A Service's key in plans and Events: `namespace/name`.
pub fn service_key(service: &Service) -> String {
    format!(
        "{}/{}",
        service.namespace().unwrap_or_default(),
        service.name_any()
    )
}

/// Drops invalid objects until what is left validates (an object that referred to a dropped
/// one becomes invalid in turn). Returns every object's problems and the valid set's config.
pub fn valid_subset(
    objects: &Objects,
) -> (
    BTreeMap<ObjectRef, Vec<String>>,
    Option<crate::config::Config>,
    Objects,
) {
    let mut all_problems = BTreeMap::new();
    let mut current = objects.clone();
    // Each pass either validates or drops at least one object, so this ends.
    loop {
        let verdict = validity::validate(&current);
        let bad: BTreeSet<ObjectRef> = verdict
            .problems
            .iter()
            .filter(|(_, p)| !p.is_empty())
            .map(|(o, _)| o.clone())
            .collect();
        for (o, p) in verdict.problems {
            if !p.is_empty() || !all_problems.contains_key(&o) {
                all_problems.insert(o, p);
            }
        }
        if bad.is_empty() {
            return (all_problems, verdict.config, current);
        }
        let keep = |kind: &'static str, name: String| !bad.contains(&ObjectRef { kind, name });
        current
            .pools
            .retain(|o| keep("IPAddressPool", o.name_any()));
        current
            .l2_advertisements
            .retain(|o| keep("L2Advertisement", o.name_any()));
        current.peers.retain(|o| keep("BGPPeer", o.name_any()));
        current
            .bgp_advertisements
            .retain(|o| keep("BGPAdvertisement", o.name_any()));
        current
            .bfd_profiles
            .retain(|o| keep("BFDProfile", o.name_any()));
    }
}

/// Does a label selector match these labels? (`matchLabels` and `matchExpressions`.)
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            _ => false,
        }
    });
    labels_ok && expressions_ok
}
