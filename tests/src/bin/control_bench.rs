//! The control plane's part of `cargo xtask bench`: how `sluice validate` (parse, validate,
//! allocate every service an IP), the Maglev tables `sluice run` then builds, and writing every
//! service into the data plane's maps grow from 1,000 to 10,000 services (one pool, two backends
//! each). The maps part needs root (it loads the data plane, attached nowhere).

use std::{collections::BTreeMap, net::IpAddr, time::Instant};

use anyhow::Result;
use lb_userspace::{
    dataplane::{Backend, Dataplane, DataplaneOptions, Protocol, Service},
    maglev,
};

const SIZES: [usize; 4] = [1_000, 2_500, 5_000, 10_000];
/// The default Maglev table size.
const TABLE_SIZE: u32 = 16_381;

fn config(services: usize) -> String {
    let mut text = String::from("pools:\n- name: big\n  addresses: [10.0.0.0/16]\nservices:\n");
    for i in 0..services {
        let (a, b) = (i % 250 + 1, (i + 1) % 250 + 1);
        let net = (i / 250) % 250;
        text.push_str(&format!(
            "- name: s{i}\n  ports: [{{port: 80, targetPort: 8080}}]\n  backends: [{{ip: 192.168.{net}.{a}}}, {{ip: 192.168.{net}.{b}}}]\n"
        ));
    }
    text
}

fn main() -> Result<()> {
    if std::env::var("CONTROL_BENCH").as_deref() == Ok("plans") {
        return plans();
    }
    let dir = std::env::temp_dir().join(format!("sluice-control-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!("Control plane, one CPU: validate = parse + check + allocate (what `sluice validate` does);");
    println!("tables = one Maglev table (M = {TABLE_SIZE}) per service, as `sluice run` builds them at start");
    println!(
        "{:>9} {:>12} {:>14} {:>12} {:>14}",
        "services", "validate", "per service", "tables", "per service"
    );
    let mut per_service: Vec<f64> = Vec::new();
    for n in SIZES {
        let path = dir.join(format!("{n}.yaml"));
        let state = dir.join(format!("{n}-state.json"));
        std::fs::write(
            &path,
            format!(
                "dataplane:\n  stateFile: {}\n{}",
                state.display(),
                config(n)
            ),
        )?;
        let started = Instant::now();
        lb_userspace::standalone::validate(std::slice::from_ref(&path))?;
        let validate = started.elapsed().as_secs_f64();
        let started = Instant::now();
        for i in 0..n {
            let backends = [
                maglev::Backend {
                    key: format!("192.168.{}.{}:8080", (i / 250) % 250, i % 250 + 1),
                    weight: 1,
                },
                maglev::Backend {
                    key: format!("192.168.{}.{}:8080", (i / 250) % 250, (i + 1) % 250 + 1),
                    weight: 1,
                },
            ];
            maglev::build(&backends, TABLE_SIZE)?;
        }
        let tables = started.elapsed().as_secs_f64();
        let per = validate / n as f64 * 1e6;
        println!(
            "{n:>9} {:>10.3} s {:>11.1} µs {:>10.3} s {:>11.1} µs",
            validate,
            per,
            tables,
            tables / n as f64 * 1e6
        );
        per_service.push(per);
    }
    if let (Some(first), Some(last)) = (per_service.first(), per_service.last()) {
        println!(
            "validate per service at 10,000 / at 1,000: {:.2}× (1.0 is linear growth)",
            last / first
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    plans()?;
    if unsafe { libc::geteuid() } == 0 {
        maps()?;
    } else {
        println!("(not root: the maps part is skipped)");
    }
    Ok(())
}

fn backend(i: usize, j: usize) -> Backend {
    let host = (i + j) % 250 + 1;
    Backend {
        ip: IpAddr::from([192, 168, ((i / 250) % 250) as u8, host as u8]),
        port: 8080,
        weight: 1,
        node: None,
    }
}

fn services(n: usize) -> BTreeMap<Service, Vec<Backend>> {
    (0..n)
        .map(|i| {
            let service = Service {
                vip: IpAddr::from([10, 0, (i / 256) as u8, (i % 256) as u8]),
                port: 80,
                protocol: Protocol::Tcp,
            };
            (service, vec![backend(i, 0), backend(i, 1)])
        })
        .collect()
}

/// Peak resident memory of this process so far, in MB.
fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Every service written into a freshly loaded data plane (tables built on every core, each
/// written through one mapping), then one service's backend list changed.
fn maps() -> Result<()> {
    println!();
    println!(
        "Data plane maps, as `sluice run` and the speaker fill them (tables built on {} cores):",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:>9} {:>12} {:>14} {:>18} {:>12}",
        "services", "write all", "per service", "resync, 1 changed", "peak RSS"
    );
    for n in SIZES {
        let mut dataplane = Dataplane::load(&DataplaneOptions {
            pin_dir: None,
            ..DataplaneOptions::default()
        })?;
        let mut wanted = services(n);
        let started = Instant::now();
        dataplane.sync(&[], &wanted, &[])?;
        let all = started.elapsed().as_secs_f64();
        // One service's backends change, and the whole wanted state is synced again (as the
        // speaker and `sluice run` do).
        if let Some(backends) = wanted.values_mut().nth(n / 2) {
            backends[1] = backend(n / 2, 7);
        }
        let started = Instant::now();
        dataplane.sync(&[], &wanted, &[])?;
        let one = started.elapsed().as_secs_f64();
        println!(
            "{n:>9} {:>10.3} s {:>11.1} µs {:>15.2} ms {:>9.0} MB",
            all,
            all / n as f64 * 1e6,
            one * 1e3,
            peak_rss_mb()
        );
    }
    Ok(())
}

/// One pass of each side's decision, pure, over a cluster of `n` Services with policy Local
/// (half in an L2 pool, half in a BGP pool), 5 ready endpoints each over 100 nodes.
fn plans() -> Result<()> {
    use lb_userspace::k8s::{announce, reconcile, validity::Objects};
    use serde_json::json;
    use std::sync::Arc;

    let objects = Objects {
        pools: vec![
            serde_json::from_value(
                json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "IPAddressPool",
                "metadata": {"name": "bgp", "namespace": "sluice-system"}, "spec": {"addresses": ["10.91.0.0/16"]}}),
            )?,
            serde_json::from_value(
                json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "IPAddressPool",
                "metadata": {"name": "l2", "namespace": "sluice-system"}, "spec": {"addresses": ["10.90.0.0/16"]}}),
            )?,
        ],
        l2_advertisements: vec![serde_json::from_value(
            json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "L2Advertisement",
            "metadata": {"name": "data", "namespace": "sluice-system"}, "spec": {"ipAddressPools": ["l2"], "interfaces": ["eth1"]}}),
        )?],
        peers: vec![serde_json::from_value(
            json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "BGPPeer",
            "metadata": {"name": "router", "namespace": "sluice-system"},
            "spec": {"myASN": 64513, "peerASN": 64512, "peerAddress": "198.18.50.254"}}),
        )?],
        bgp_advertisements: vec![serde_json::from_value(
            json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "BGPAdvertisement",
            "metadata": {"name": "routes", "namespace": "sluice-system"}, "spec": {"ipAddressPools": ["bgp"]}}),
        )?],
        bfd_profiles: vec![],
    };
    let node = |k: usize| {
        if k == 0 {
            "node-a".to_string()
        } else {
            format!("node-x{k}")
        }
    };
    let nodes: Vec<announce::NodeView> = (0..100)
        .map(|k| announce::NodeView {
            name: node(k),
            labels: [("kubernetes.io/hostname".to_string(), node(k))].into(),
            ready: true,
            alive: true,
            interfaces: ["eth1".to_string()].into(),
            subnets: vec![],
            addresses: vec![IpAddr::from([10, 1, (k / 250) as u8, (k % 250) as u8 + 1])],
        })
        .collect();
    println!();
    println!("One pass of each side's decision (pure; Services with policy Local, 5 endpoints over 100 nodes):");
    println!(
        "{:>9} {:>22} {:>22} {:>20} {:>20}",
        "services",
        "controller, first start",
        "controller, steady",
        "speaker, read all",
        "speaker, 1 changed"
    );
    for n in [1_000usize, 10_000] {
        let mut fresh = Vec::with_capacity(n);
        let mut settled = Vec::with_capacity(n);
        let mut slices = Vec::with_capacity(n);
        for i in 0..n {
            let ns = format!("team-{}", i % 50);
            let half = i / 2;
            let ip = if i % 2 == 0 {
                format!("10.90.{}.{}", half / 250, half % 250 + 1)
            } else {
                format!("10.91.{}.{}", half / 250, half % 250 + 1)
            };
            let pool = if i % 2 == 0 { "l2" } else { "bgp" };
            let service = json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": format!("svc-{i}"), "namespace": ns,
                             "annotations": {"sluice.dev/address-pool": pool}},
                "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                         "ports": [{"name": "tcp", "port": 80, "protocol": "TCP", "targetPort": 8080}]}});
            let mut with_ip = service.clone();
            with_ip["status"] = json!({"loadBalancer": {"ingress": [{"ip": ip}]}});
            fresh.push(serde_json::from_value::<k8s_openapi::api::core::v1::Service>(service)?);
            settled.push(Arc::new(serde_json::from_value::<
                k8s_openapi::api::core::v1::Service,
            >(with_ip)?));
            let endpoints: Vec<serde_json::Value> = (0..5)
                .map(|j| {
                    let k = if j == 0 { 0 } else { 1 + (i * 4 + j) % 99 };
                    json!({"addresses": [format!("10.{}.{}.{}", 100 + i / 250 % 100, i % 250, j + 1)],
                           "nodeName": node(k), "conditions": {"ready": true}})
                })
                .collect();
            slices.push(Arc::new(serde_json::from_value::<
                k8s_openapi::api::discovery::v1::EndpointSlice,
            >(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("svc-{i}-abc"), "namespace": ns,
                             "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
                "addressType": "IPv4", "endpoints": endpoints,
                "ports": [{"name": "tcp", "port": 8080, "protocol": "TCP"}]}))?));
        }
        let namespaces: BTreeMap<String, BTreeMap<String, String>> = (0..50)
            .map(|i| (format!("team-{i}"), BTreeMap::new()))
            .collect();
        let time = |f: &mut dyn FnMut()| {
            let mut runs: Vec<f64> = (0..5)
                .map(|_| {
                    let started = Instant::now();
                    f();
                    started.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            runs.sort_by(f64::total_cmp);
            runs[2]
        };
        let first = time(&mut || {
            let plan = reconcile::plan(&objects, &fresh, &namespaces, true);
            assert_eq!(plan.statuses.len(), n);
        });
        let settled_plain: Vec<k8s_openapi::api::core::v1::Service> =
            settled.iter().map(|s| (**s).clone()).collect();
        let steady = time(&mut || {
            let plan = reconcile::plan(&objects, &settled_plain, &namespaces, true);
            assert!(plan.statuses.is_empty());
        });
        let nobody = BTreeMap::new();
        let input = |announcers| announce::Input {
            cluster_wide: true,
            me: "node-a",
            objects: &objects,
            services: &settled,
            slices: &slices,
            nodes: &nodes,
            announcers,
            sticky: true,
            classless_is_ours: true,
        };
        let owners: BTreeMap<std::net::IpAddr, String> = announce::plan(input(&nobody))
            .l2_owners
            .into_iter()
            .filter_map(|(ip, owner)| Some((ip, owner?)))
            .collect();
        let speaker = time(&mut || {
            let plan = announce::plan(input(&owners));
            assert_eq!(plan.services.len(), n);
        });
        // As the speaker plans: what it read before is not read again; one slice changed.
        let mut cache = announce::ReadCache::default();
        announce::plan_with(input(&owners), &mut cache);
        let mut changed = slices.clone();
        let speaker_cached = time(&mut || {
            changed[n / 2] = Arc::new((*changed[n / 2]).clone());
            let plan = announce::plan_with(
                announce::Input {
                    slices: &changed,
                    ..input(&owners)
                },
                &mut cache,
            );
            assert_eq!(plan.services.len(), n);
        });
        println!(
            "{n:>9} {first:>19.1} ms {steady:>19.1} ms {speaker:>17.1} ms {speaker_cached:>17.1} ms"
        );
    }
    Ok(())
}
