//! `sluice controller` end to end: the real binary and its `kube` client against the in-process
//! fake API server (HTTP list, watch, get, patch, status subresource, Events, Leases).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use sluice_tests::{fakeapi::FakeApi, sluice_bin};

const NS: &str = "sluice-system";
const SVCS: &str = "/api/v1/namespaces/default/services";
const POOLS: &str = "/apis/sluice.dev/v1alpha1/namespaces/sluice-system/ipaddresspools";
const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/sluice-system/leases/sluice-controller";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

/// A running `sluice controller`; killed (by PID) when dropped.
struct Controller {
    child: Child,
    metrics_port: u16,
    log: PathBuf,
}

impl Controller {
    fn start(dir: &Path, api: &FakeApi, identity: &str, lease_duration: u32) -> Controller {
        let kubeconfig = dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig);
        let metrics_port = free_port();
        let log = dir.join(format!("controller-{identity}.log"));
        let child = Command::new(sluice_bin())
            .args(["controller", "--namespace", NS, "--identity", identity])
            .args(["--lease-duration", &lease_duration.to_string()])
            .args(["--metrics-address", &format!("127.0.0.1:{metrics_port}")])
            .args(["--resync-seconds", "2"])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info")
            .env_remove("POD_NAMESPACE")
            .env_remove("POD_NAME")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start sluice controller");
        Controller {
            child,
            metrics_port,
            log,
        }
    }

    fn metrics(&self) -> String {
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], self.metrics_port));
        sluice_tests::http_get(address, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// SIGTERM, as Kubernetes stops a pod; waits for the exit.
    fn stop(mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "the controller did not stop on SIGTERM:\n{}",
            self.log_text()
        );
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Polls `f` until it returns `Some`, for up to 20 s.
fn wait_for<T>(what: &str, logs: &[&Controller], mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = logs.iter().map(|c| c.log_text()).collect();
            panic!(
                "timed out waiting for {what}; controller logs:\n{}",
                logs.join("\n---\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ingress(api: &FakeApi, name: &str) -> Vec<String> {
    api.get(&format!("{SVCS}/{name}"))
        .and_then(|s| s["status"]["loadBalancer"]["ingress"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|i| i["ip"].as_str().map(String::from))
        .collect()
}

/// (reason, note) of the Events recorded on a Service.
fn events(api: &FakeApi, service: &str) -> Vec<(String, String)> {
    api.list(EVENTS)
        .iter()
        .filter(|e| e["regarding"]["name"] == service)
        .map(|e| {
            (
                e["reason"].as_str().unwrap_or_default().to_string(),
                e["note"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn has_event(api: &FakeApi, service: &str, reason: &str, note_contains: &str) -> bool {
    events(api, service)
        .iter()
        .any(|(r, n)| r == reason && n.contains(note_contains))
}

fn out_of_pool(api: &FakeApi, service: &str) -> Option<String> {
    let s = api.get(&format!("{SVCS}/{service}"))?;
    s["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "sluice.dev/IPOutOfPool")?["status"]
        .as_str()
        .map(String::from)
}

fn service(name: &str, annotations: Value, spec: Value) -> Value {
    let mut s = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "protocol": "TCP"}]},
    });
    sluice_tests::fakeapi::merge_patch(&mut s["spec"], &spec);
    s
}

fn pool(name: &str, addresses: &[&str]) -> Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "IPAddressPool",
        "metadata": {"name": name},
        "spec": {"addresses": addresses},
    })
}

fn setup(api: &FakeApi) {
    for ns in ["default", NS] {
        api.create(
            "/api/v1/namespaces",
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        )
        .unwrap();
    }
}

fn valid(api: &FakeApi, pool_name: &str) -> Option<(String, String)> {
    let p = api.get(&format!("{POOLS}/{pool_name}"))?;
    let c = p["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Valid")?
        .clone();
    Some((
        c["status"].as_str()?.to_string(),
        c["message"].as_str().unwrap_or_default().to_string(),
    ))
}

#[test]
fn controller_gives_services_ips_records_events_marks_pools_and_a_restart_renumbers_nothing() {
    let dir = tempdir("controller");
    let api = FakeApi::start();
    setup(&api);
    api.create(POOLS, pool("main", &["198.51.100.0/29"]))
        .unwrap();
    api.create(POOLS, pool("v6", &["2001:db8:5::/125"]))
        .unwrap();
    api.create(POOLS, pool("broken", &["198.51.100.300/32"]))
        .unwrap();
    let none = json!({});
    for s in [
        service("web", none.clone(), json!({})),
        service(
            "dual",
            none.clone(),
            json!({"ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack"}),
        ),
        service(
            "pinned",
            json!({"sluice.dev/loadBalancerIPs": "198.51.100.5"}),
            json!({}),
        ),
        service(
            "migrated",
            json!({"metallb.universe.tf/loadBalancerIPs": "198.51.100.6"}),
            json!({}),
        ),
        service(
            "garbage",
            json!({"sluice.dev/loadBalancerIPs": "198.51.100.x"}),
            json!({}),
        ),
        service(
            "taken",
            json!({"sluice.dev/loadBalancerIPs": "198.51.100.5"}),
            json!({}),
        ),
        service(
            "nopool",
            json!({"sluice.dev/address-pool": "missing"}),
            json!({}),
        ),
        service("internal", none.clone(), json!({"type": "ClusterIP"})),
        service(
            "foreign",
            none.clone(),
            json!({"loadBalancerClass": "example.com/other"}),
        ),
    ] {
        api.create(SVCS, s).unwrap();
    }

    let first = Controller::start(&dir, &api, "controller-a", 15);
    let c = &[&first];
    wait_for("web, dual, pinned and migrated to get IPs", c, || {
        ["web", "dual", "pinned", "migrated"]
            .iter()
            .all(|s| !ingress(&api, s).is_empty())
            .then_some(())
    });
    assert_eq!(ingress(&api, "pinned"), ["198.51.100.5"]);
    assert_eq!(ingress(&api, "migrated"), ["198.51.100.6"]);
    let web = ingress(&api, "web");
    assert_eq!(web.len(), 1);
    assert!(web[0].starts_with("198.51.100."), "{web:?}");
    let dual = ingress(&api, "dual");
    assert_eq!(dual.len(), 2, "{dual:?}");
    assert!(dual[0].starts_with("198.51.100.") && dual[1].starts_with("2001:db8:5::"));
    for quiet in ["garbage", "taken", "nopool", "internal", "foreign"] {
        assert!(ingress(&api, quiet).is_empty(), "{quiet} got an IP");
    }
    wait_for("the Events", c, || {
        (has_event(&api, "web", "IPAllocated", &web[0])
            && has_event(&api, "garbage", "AllocationFailed", "198.51.100.x")
            && has_event(&api, "taken", "AllocationFailed", "198.51.100.5")
            && has_event(&api, "nopool", "AllocationFailed", "missing"))
        .then_some(())
    });
    assert!(events(&api, "internal").is_empty() && events(&api, "foreign").is_empty());

    // Objects get Valid conditions; the broken pool's names the field and the value.
    let (status, message) = wait_for("the broken pool's condition", c, || valid(&api, "broken"));
    assert_eq!(status, "False");
    assert!(
        message.contains("spec.addresses[0]") && message.contains("198.51.100.300"),
        "{message}"
    );
    wait_for("the main pool's usage", c, || {
        let p = api.get(&format!("{POOLS}/main"))?;
        (valid(&api, "main")?.0 == "True"
            && p["status"]["addressesTotal"] == 8
            && p["status"]["addressesInUse"] == 4)
            .then_some(())
    });
    let lease = api.get(LEASE).expect("the Lease");
    assert_eq!(lease["spec"]["holderIdentity"], "controller-a");
    let metrics = wait_for("the metrics", c, || {
        let m = first.metrics();
        m.contains("sluice_pool_addresses_in_use{pool=\"main\"} 4")
            .then_some(m)
    });
    for line in [
        "sluice_controller_leader 1",
        "sluice_pool_addresses_in_use{pool=\"main\"} 4",
        "sluice_pool_addresses_total{pool=\"main\"} 8",
        "sluice_invalid_objects 1",
        "sluice_services_failing 3",
    ] {
        assert!(metrics.contains(line), "no {line:?} in\n{metrics}");
    }
    // A persisting failure is recorded once, not once per pass.
    std::thread::sleep(Duration::from_secs(3));
    let repeats = events(&api, "garbage").len();
    assert_eq!(repeats, 1, "{:?}", events(&api, "garbage"));

    // Stop; while no controller runs, a Service that sorts first arrives.
    first.stop();
    assert!(
        api.get(LEASE).unwrap()["spec"]["holderIdentity"].is_null(),
        "the Lease was not released on SIGTERM"
    );
    let before: Vec<(String, Vec<String>)> = ["web", "dual", "pinned", "migrated"]
        .iter()
        .map(|s| (s.to_string(), ingress(&api, s)))
        .collect();
    api.create(SVCS, service("aaa", none.clone(), json!({})))
        .unwrap();

    let second = Controller::start(&dir, &api, "controller-b", 15);
    let c = &[&second];
    let aaa = wait_for("aaa to get an IP", c, || {
        let ips = ingress(&api, "aaa");
        (!ips.is_empty()).then_some(ips)
    });
    let after: Vec<(String, Vec<String>)> = ["web", "dual", "pinned", "migrated"]
        .iter()
        .map(|s| (s.to_string(), ingress(&api, s)))
        .collect();
    assert_eq!(before, after, "a restart renumbered a Service");
    assert!(before.iter().all(|(_, ips)| !ips.contains(&aaa[0])));

    // A Service that stops being a LoadBalancer gives its IPs back; a deleted one too.
    api.patch(
        &format!("{SVCS}/dual"),
        json!({"spec": {"type": "ClusterIP"}}),
    )
    .unwrap();
    wait_for("dual's release", c, || {
        (ingress(&api, "dual").is_empty() && has_event(&api, "dual", "IPReleased", &dual[0]))
            .then_some(())
    });
    api.delete(&format!("{SVCS}/web")).unwrap();
    api.create(SVCS, service("late", none.clone(), json!({})))
        .unwrap();
    let late = wait_for("late to get an IP", c, || {
        let ips = ingress(&api, "late");
        (!ips.is_empty()).then_some(ips)
    });
    assert!(
        late == web || late == vec![dual[0].clone()],
        "late got {late:?}, not a released address ({web:?} or {})",
        dual[0]
    );

    // A pool edited so that an IP falls out: kept, with a warning, not renumbered.
    api.patch(
        &format!("{POOLS}/main"),
        json!({"spec": {"addresses": ["198.51.100.0/30"]}}),
    )
    .unwrap();
    wait_for("pinned's out-of-pool warning", c, || {
        has_event(&api, "pinned", "IPOutOfPool", "198.51.100.5").then_some(())
    });
    assert_eq!(ingress(&api, "pinned"), ["198.51.100.5"]);
    wait_for("pinned's IPOutOfPool condition", c, || {
        (out_of_pool(&api, "pinned")? == "True").then_some(())
    });
    api.patch(
        &format!("{POOLS}/main"),
        json!({"spec": {"addresses": ["198.51.100.0/29"]}}),
    )
    .unwrap();
    wait_for("pinned's condition to clear", c, || {
        (out_of_pool(&api, "pinned")? == "False").then_some(())
    });
    assert_eq!(ingress(&api, "pinned"), ["198.51.100.5"]);
    // The speaker mesh's key: created once, as the speakers' DaemonSet mounts it.
    let secret = wait_for("the mesh Secret", c, || {
        api.get("/api/v1/namespaces/sluice-system/secrets/sluice-mesh")
    });
    let key = secret["stringData"]["secret"].as_str().unwrap_or_default();
    assert_eq!(key.len(), 64, "32 random bytes in hex: {secret}");
    second.stop();
    api.assert_rbac_allows_every_request("controller");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn only_the_lease_holder_allocates_and_a_standby_takes_over_when_it_dies() {
    let dir = tempdir("controller-ha");
    let api = FakeApi::start();
    setup(&api);
    api.create(POOLS, pool("main", &["198.51.100.16/28"]))
        .unwrap();
    let a = Controller::start(&dir, &api, "replica-a", 2);
    let b = Controller::start(&dir, &api, "replica-b", 2);
    let both = &[&a, &b];
    let holder = wait_for("a leader", both, || {
        api.get(LEASE)?["spec"]["holderIdentity"]
            .as_str()
            .map(String::from)
    });
    api.create(SVCS, service("one", json!({}), json!({})))
        .unwrap();
    wait_for("one to get an IP", both, || {
        (!ingress(&api, "one").is_empty()).then_some(())
    });
    let (mut leader, standby) = if holder == "replica-a" {
        (a, b)
    } else {
        (b, a)
    };
    wait_for("the leader gauges", &[&leader, &standby], || {
        (leader.metrics().contains("sluice_controller_leader 1")
            && standby.metrics().contains("sluice_controller_leader 0"))
        .then_some(())
    });
    // The standby watched everything but wrote nothing: one Event, from the leader (Events
    // are published in the background, after the status).
    let recorded: Vec<Value> = wait_for("the leader's Event", &[&leader, &standby], || {
        let recorded: Vec<Value> = api
            .list(EVENTS)
            .into_iter()
            .filter(|e| e["regarding"]["name"] == "one")
            .collect();
        (!recorded.is_empty()).then_some(recorded)
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        api.list(EVENTS)
            .iter()
            .filter(|e| e["regarding"]["name"] == "one")
            .count(),
        1
    );
    assert_eq!(recorded[0]["reportingInstance"], holder.as_str());

    // The leader dies without releasing the Lease (SIGKILL).
    leader.child.kill().unwrap();
    leader.child.wait().unwrap();
    let killed = Instant::now();
    let new_holder = wait_for("the standby to take the Lease", &[&standby], || {
        let h = api.get(LEASE)?["spec"]["holderIdentity"]
            .as_str()?
            .to_string();
        (h != holder).then_some(h)
    });
    let takeover = killed.elapsed();
    api.create(SVCS, service("two", json!({}), json!({})))
        .unwrap();
    wait_for("two to get an IP from the new leader", &[&standby], || {
        (!ingress(&api, "two").is_empty()).then_some(())
    });
    let served = killed.elapsed();
    eprintln!(
        "failover: {new_holder} took the Lease {:.2} s after the leader was killed (lease 2 s); a new Service had its IP after {:.2} s",
        takeover.as_secs_f64(),
        served.as_secs_f64()
    );
    assert_ne!(ingress(&api, "one"), ingress(&api, "two"));
    drop(leader);
    standby.stop();
    api.assert_rbac_allows_every_request("controller");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_controller_whose_rbac_cannot_read_a_metallb_kind_says_so_and_serves_all_the_same() {
    let api = FakeApi::start();
    setup(&api);
    // RBAC from before Sluice read MetalLB's objects, for one kind.
    api.forbid("list", "communities");
    api.create(POOLS, pool("main", &["192.0.2.0/29"])).unwrap();
    api.create(SVCS, service("web", json!({}), json!({})))
        .unwrap();
    let dir = tempdir("metallb-forbidden");
    let c = Controller::start(&dir, &api, "c-0", 15);
    let ips = wait_for("web's IP", &[&c], || {
        let ips = ingress(&api, "web");
        (!ips.is_empty()).then_some(ips)
    });
    assert_eq!(ips, ["192.0.2.0"]);
    let log = c.log_text();
    assert!(log.contains("metallbNotReadable"), "{log}");
}
