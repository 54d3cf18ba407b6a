//! A MetalLB user swaps MetalLB's controller and speakers for Sluice's and changes nothing else:
//! their metallb.io objects stay as they are, their Services keep the IPs MetalLB gave them, and
//! the IPs are answered in L2 (on-link: the L2Advertisement names no interface) and announced to
//! BIRD by BGP. What Sluice does not do is reported as an Event on the object concerned. Against
//! the fake API server (see `sluice_tests::fakeapi`), with real speakers in namespaces.

use std::time::Duration;

use serde_json::{json, Value};
use sluice_tests::speaker_lab::{ask_vip, lab, wait_for, VIP};

const METALLB: &str = "/apis/metallb.io/v1beta1/namespaces/metallb-system";
const METALLB_V2: &str = "/apis/metallb.io/v1beta2/namespaces/metallb-system";
const METALLB_EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/metallb-system/events";

fn create(lab: &sluice_tests::speaker_lab::Lab, collection: &str, object: Value) {
    lab.api.create(collection, object).unwrap();
}

#[test]
fn metallb_objects_and_their_services_ips_work_as_they_are_after_swapping_in_sluice() {
    let mut lab = lab(2);
    // What MetalLB left: the Service "web" has 198.18.50.200; "other" has .205, which a fresh
    // allocation would not give it (it would get .201).
    lab.cluster_with("Local", &[VIP.to_string()]);
    create(
        &lab,
        "/api/v1/namespaces",
        json!({"metadata": {"name": "metallb-system"}}),
    );
    create(
        &lab,
        "/api/v1/namespaces/default/services",
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "other", "annotations": {"metallb.universe.tf/address-pool": "lab"}},
               "spec": {"type": "LoadBalancer", "ports": [{"port": 81, "protocol": "TCP"}]},
               "status": {"loadBalancer": {"ingress": [{"ip": "198.18.50.205"}]}}}),
    );
    create(
        &lab,
        &format!("{METALLB}/ipaddresspools"),
        json!({"apiVersion": "metallb.io/v1beta1", "kind": "IPAddressPool",
               "metadata": {"name": "lab", "namespace": "metallb-system"},
               "spec": {"addresses": ["198.18.50.200/29"], "autoAssign": true}}),
    );
    create(
        &lab,
        &format!("{METALLB}/l2advertisements"),
        json!({"apiVersion": "metallb.io/v1beta1", "kind": "L2Advertisement",
               "metadata": {"name": "l2", "namespace": "metallb-system"},
               "spec": {"ipAddressPools": ["lab"]}}),
    );
    create(
        &lab,
        &format!("{METALLB}/communities"),
        json!({"apiVersion": "metallb.io/v1beta1", "kind": "Community",
               "metadata": {"name": "aliases", "namespace": "metallb-system"},
               "spec": {"communities": [{"name": "lab-routes", "value": "64513:77"}]}}),
    );
    create(
        &lab,
        &format!("{METALLB}/bgpadvertisements"),
        json!({"apiVersion": "metallb.io/v1beta1", "kind": "BGPAdvertisement",
               "metadata": {"name": "all", "namespace": "metallb-system"},
               "spec": {"ipAddressPools": ["lab"], "communities": ["lab-routes"]}}),
    );
    create(
        &lab,
        &format!("{METALLB_V2}/bgppeers"),
        json!({"apiVersion": "metallb.io/v1beta2", "kind": "BGPPeer",
               "metadata": {"name": "tor", "namespace": "metallb-system"},
               "spec": {"peerAddress": "198.18.50.254", "peerASN": 64512, "myASN": 64513,
                        "connectTime": "1s", "enableGracefulRestart": true}}),
    );
    create(
        &lab,
        &format!("{METALLB_V2}/bgppeers"),
        json!({"apiVersion": "metallb.io/v1beta2", "kind": "BGPPeer",
               "metadata": {"name": "in-vrf", "namespace": "metallb-system"},
               "spec": {"peerAddress": "198.18.50.253", "peerASN": 64512, "myASN": 64513,
                        "vrf": "red"}}),
    );
    let (router, _router_ns) = lab.start_bird_router("swap");

    let controller = lab.start_controller();
    lab.start_speaker(0);
    lab.start_speaker(1);

    // L2: one node answers for the IP on its on-link interface, and traffic reaches a pod.
    let owner = wait_for("one node to announce it", Duration::from_secs(20), || {
        lab.announcer()
    });
    let name = wait_for("an answer through the IP", Duration::from_secs(10), || {
        ask_vip(&lab.client)
    });
    assert_eq!(name, format!("pod-{}", ["a", "b"][owner]));
    // BGP: both nodes (both have a ready pod) announce it to BIRD, with the Community alias.
    let route = router.wait_route(&format!("{VIP}/32"), Duration::from_secs(30), |t| {
        t.contains("via 198.18.50.1") && t.contains("via 198.18.50.2")
    });
    assert!(route.contains("(64513,77)"), "{route}");

    // What Sluice does not do is said on the object; the pool is read as it is.
    let notes = wait_for(
        "Events on MetalLB's objects",
        Duration::from_secs(20),
        || {
            let events = lab.api.list(METALLB_EVENTS);
            let note = |kind: &str, name: &str, reason: &str| {
                events
                    .iter()
                    .find(|e| {
                        e["regarding"]["kind"] == kind
                            && e["regarding"]["name"] == name
                            && e["reason"] == reason
                    })
                    .and_then(|e| e["note"].as_str().map(String::from))
            };
            Some((
                note("BGPPeer", "in-vrf", "SluiceProblem")?,
                note("BGPPeer", "tor", "SluiceProblem")?,
                note("IPAddressPool", "lab", "ReadBySluice")?,
            ))
        },
    );
    assert!(
        notes
            .0
            .contains("spec.vrf: Sluice peers from the default routing table only"),
        "{notes:?}"
    );
    assert!(notes.1.contains("spec.enableGracefulRestart"), "{notes:?}");
    assert!(notes.2.contains("metallb.io/v1beta1"), "{notes:?}");

    // No IP changed, and nothing was written to MetalLB's objects.
    for (service, ip) in [("web", VIP.to_string()), ("other", "198.18.50.205".into())] {
        let s = lab
            .api
            .get(&format!("/api/v1/namespaces/default/services/{service}"))
            .unwrap();
        assert_eq!(
            s["status"]["loadBalancer"]["ingress"][0]["ip"], ip,
            "{service}: {s}"
        );
    }
    let writes: Vec<String> = lab
        .api
        .requests()
        .into_iter()
        .filter(|r| r.contains("/apis/metallb.io/") && !r.starts_with("GET "))
        .collect();
    assert!(writes.is_empty(), "{writes:?}");
    drop(controller);
    drop(router);
}
