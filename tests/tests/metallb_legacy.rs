//! MetalLB users' legacy ConfigMaps as they are: every documented shape in
//! `tests/fixtures/metallb/` passes `sluice validate`, and a layer2 one runs with `sluice run` in
//! network namespaces, answered on-link: ARP for a service IP is answered on the interface whose
//! subnet holds it, not on another interface of another subnet, though the program runs there too.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use sluice_tests::{
    frames,
    lab::{names, Lab},
    netns::NetNs,
    rawsock::RawSocket,
    sluice_bin,
};

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/metallb");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_documented_legacy_configmap_shape_validates_as_it_is() {
    let files = fixtures();
    assert!(files.len() >= 10, "{files:?}");
    for file in &files {
        let out = Command::new(sluice_bin())
            .args(["validate", "--config", file.to_str().unwrap()])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: {}{}",
            file.display(),
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(": valid: "), "{stdout}");
        let name = file.file_name().unwrap().to_str().unwrap();
        // What Sluice reads differently is said, with the file and the path in it.
        if name == "layer2-host-bits.yaml" {
            assert!(
                stdout.contains("layer2-host-bits.yaml: data.config.address-pools[0].addresses[0]: \"192.168.122.1/24\" has host bits set; read as 192.168.122.0/24"),
                "{stdout}"
            );
        }
        if name == "bgp-node-selectors.yaml" {
            assert!(
                stdout.contains("data.config.peers[1].node-selectors: sluice run has no nodes"),
                "{stdout}"
            );
        }
    }
}

#[test]
fn a_broken_legacy_configmap_is_refused_naming_the_file_and_the_path_in_its_terms() {
    let dir = std::env::temp_dir().join(format!("sluice-legacy-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("metallb.yaml");
    let text = std::fs::read_to_string(
        fixtures()
            .iter()
            .find(|f| f.ends_with("bgp-advanced.yaml"))
            .unwrap(),
    )
    .unwrap()
    .replace("aggregation-length: 24", "aggregation-length: 40");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(sluice_bin())
        .args(["validate", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("metallb.yaml: data.config.address-pools[0].bgp-advertisements[1].aggregation-length: 40 is out of range"),
        "{stderr}"
    );
}

/// Sends an ARP request for `target` from `ns`'s `ifname` (as `me`); the replies seen.
fn ask_arp(ns: &NetNs, ifname: &'static str, me: Ipv4Addr, target: Ipv4Addr) -> Vec<Vec<u8>> {
    let my_mac = ns.mac(ifname);
    ns.run(move || {
        let sock = RawSocket::open(ifname).unwrap();
        sock.send(&frames::arp_request(my_mac, me, target)).unwrap();
        sock.collect(Duration::from_millis(1000), |f| {
            f.len() >= 42
                && f[12..14] == [8, 6]
                && f[20..22] == [0, 2]
                && f[28..32] == target.octets()
        })
    })
}

/// Polls (up to 10 s) until ARP for `target` from `ns` gets `want` replies.
fn wait_arp(ns: &NetNs, ifname: &'static str, me: Ipv4Addr, target: Ipv4Addr, want: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = ask_arp(ns, ifname, me, target).len();
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "ARP for {target} from {ifname}: {got} replies, expected {want}"
        );
    }
}

/// A node running `sluice run` on a legacy ConfigMap as it is, plus a file with one service
/// (web → backend 1) whose data plane also runs on nx: nx must still not answer ARP.
struct Layer2Run {
    lab: Lab,
    _run: sluice_tests::netns::Process,
    dir: PathBuf,
    vip: Ipv4Addr,
}

impl Drop for Layer2Run {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The IPv4 address `sluice validate` says the service gets from these files.
fn allocated(configs: &[&Path]) -> Ipv4Addr {
    let mut args = vec!["validate".to_string()];
    for c in configs {
        args.push("--config".into());
        args.push(c.display().to_string());
    }
    let out = Command::new(sluice_bin()).args(&args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("web → "))
        .unwrap_or_else(|| panic!("no allocation in {text}"));
    line.trim_start()["web → ".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn run_layer2(fixture: &Path, tag: &str) -> Layer2Run {
    let dir = std::env::temp_dir().join(format!("sluice-legacy-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let services = dir.join("services.yaml");
    std::fs::write(
        &services,
        format!(
            "dataplane:\n  interfaces: [nx]\n  maglevTableSize: 1009\n  stateFile: {}\nservices:\n- name: web\n  ports: [{{port: 80, targetPort: 8080}}]\n  backends: [{{ip: 198.18.11.2}}]\n",
            dir.join("allocations.json").display()
        ),
    )
    .unwrap();
    let vip = allocated(&[fixture, &services]);
    // The node's n0 holds the VIP's /24; nx holds another subnet, and its neighbour asks anyway
    // (a misconfigured or hostile segment).
    let [a, b, c, _] = vip.octets();
    let lab = Lab::new(1);
    lab.serve(1);
    for (ns, ifname, host) in [
        (&lab.node, "n0", 254),
        (&lab.client, "c0", 253),
        (&lab.other, "o0", 252),
    ] {
        ns.ip(&[
            "addr",
            "add",
            &format!("{a}.{b}.{c}.{host}/24"),
            "dev",
            ifname,
        ]);
    }
    let mut run = lab.node.spawn(&[
        &sluice_bin(),
        "run",
        "--config",
        fixture.to_str().unwrap(),
        "--config",
        services.to_str().unwrap(),
    ]);
    run.wait_for_stderr("ready");
    Layer2Run {
        lab,
        _run: run,
        dir,
        vip,
    }
}

impl Layer2Run {
    fn client_ip(&self) -> Ipv4Addr {
        let [a, b, c, _] = self.vip.octets();
        Ipv4Addr::new(a, b, c, 253)
    }

    fn other_ip(&self) -> Ipv4Addr {
        let [a, b, c, _] = self.vip.octets();
        Ipv4Addr::new(a, b, c, 252)
    }

    /// ARP from the client (n0's segment) is answered by n0; from nx's segment, by no one.
    fn assert_answered_on_link_only(&self, fixture: &Path) {
        let replies = ask_arp(&self.lab.client, "c0", self.client_ip(), self.vip);
        assert_eq!(
            replies.len(),
            1,
            "{}: on-link n0 answers for {}: {replies:02x?}",
            fixture.display(),
            self.vip
        );
        assert_eq!(&replies[0][22..28], &self.lab.node.mac("n0"));
        assert!(
            ask_arp(&self.lab.other, "o0", self.other_ip(), self.vip).is_empty(),
            "{}: nx's subnet does not hold {}: no answer there",
            fixture.display(),
            self.vip
        );
        assert!(
            self.lab.node.has_xdp("nx"),
            "the program runs on nx all the same"
        );
    }
}

fn fixture(name: &str) -> PathBuf {
    fixtures().into_iter().find(|f| f.ends_with(name)).unwrap()
}

#[test]
fn a_legacy_layer2_configmap_runs_as_it_is_and_answers_arp_only_on_link() {
    let file = fixture("layer2.yaml");
    let run = run_layer2(&file, "layer2");
    assert_eq!(run.vip, Ipv4Addr::new(192, 168, 1, 240));
    run.assert_answered_on_link_only(&file);
    let counts = names(&run.lab.client, "192.168.1.240:80".parse().unwrap(), 5);
    assert_eq!(counts.get("b1"), Some(&5), "{counts:?}");

    // An address added to nx puts the IP on-link there too; removed, it goes again.
    let lab = &run.lab;
    lab.node.ip(&["addr", "add", "192.168.1.9/24", "dev", "nx"]);
    wait_arp(&lab.other, "o0", run.other_ip(), run.vip, 1);
    lab.node.ip(&["addr", "del", "192.168.1.9/24", "dev", "nx"]);
    wait_arp(&lab.other, "o0", run.other_ip(), run.vip, 0);
}

#[test]
fn every_layer2_fixture_runs_as_it_is_and_is_answered_on_link_only() {
    let layer2: Vec<PathBuf> = fixtures()
        .into_iter()
        .filter(|f| !f.ends_with("layer2.yaml"))
        .filter(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .contains("protocol: layer2")
        })
        .collect();
    assert!(layer2.len() >= 4, "{layer2:?}");
    for (i, file) in layer2.iter().enumerate() {
        let run = run_layer2(file, &format!("l2-{i}"));
        run.assert_answered_on_link_only(file);
    }
}

#[test]
fn sluice_migrate_turns_every_fixture_into_sluice_manifests_that_check_manifests_accepts() {
    let dir = std::env::temp_dir().join(format!("sluice-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let crs = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/metallb-crs/objects.yaml");
    let mut inputs = fixtures();
    inputs.push(crs.clone());
    for file in &inputs {
        let out = Command::new(sluice_bin())
            .args(["migrate", file.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{}: {stderr}", file.display());
        let yaml = String::from_utf8(out.stdout).unwrap();
        assert!(yaml.contains("apiVersion: sluice.dev/v1alpha1"), "{yaml}");
        assert!(!yaml.contains("metallb.io"), "{yaml}");
        let migrated = dir.join("migrated.yaml");
        std::fs::write(&migrated, &yaml).unwrap();
        let check = Command::new(sluice_bin())
            .args(["check-manifests", migrated.to_str().unwrap()])
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&check.stdout);
        assert!(
            check.status.success() && !report.contains("Invalid"),
            "{}:\n{yaml}\n{report}{}",
            file.display(),
            String::from_utf8_lossy(&check.stderr)
        );
        if file == &crs {
            // The peer in a VRF is left out, and said so; the Community alias is resolved.
            assert!(
                stderr.contains(
                    "BGPPeer in-a-vrf: spec.vrf: Sluice peers from the default routing table only"
                ),
                "{stderr}"
            );
            assert!(
                !yaml.contains("in-a-vrf") && yaml.contains("1234:1"),
                "{yaml}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
