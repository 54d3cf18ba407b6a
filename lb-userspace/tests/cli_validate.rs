//! `sluice validate` as a MetalLB user runs it first: their legacy ConfigMap as it is.

use std::process::Command;

#[test]
fn validate_accepts_a_legacy_cidr_with_host_bits_and_warns_with_the_file_and_path() {
    let dir = std::env::temp_dir().join(format!("sluice-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let configmap = dir.join("metallb.yaml");
    std::fs::write(
        &configmap,
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  namespace: metallb-system\n  name: config\ndata:\n  config: |\n    address-pools:\n    - name: default\n      protocol: bgp\n      addresses:\n      - 192.168.122.1/24\n",
    )
    .unwrap();
    let services = dir.join("services.yaml");
    std::fs::write(
        &services,
        format!(
            "dataplane: {{stateFile: {}}}\nservices:\n- {{name: web, ports: [{{port: 80}}], backends: [{{ip: 10.0.0.1}}]}}\n",
            dir.join("state.json").display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["validate", "--config"])
        .arg(&configmap)
        .arg("--config")
        .arg(&services)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = format!(
        "warning: {}: data.config.address-pools[0].addresses[0]: \"192.168.122.1/24\" has host bits set; read as 192.168.122.0/24, as MetalLB does",
        configmap.display()
    );
    assert!(stdout.contains(&expected), "{stdout}");
    assert!(
        stdout.contains("web → 192.168.122.0 (pool default)"),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
