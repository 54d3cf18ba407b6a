//! The configuration examples users copy — the README's YAML blocks and examples/*.yaml — parse
//! and validate, and MetalLB's legacy ConfigMap gives the pools and peers it describes.

use std::path::{Path, PathBuf};

use lb_userspace::config::{self, build_from, parse_text};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn every_example_file_validates() {
    for name in ["sluice.yaml", "demo.yaml"] {
        let path = root().join("examples").join(name);
        config::load(std::slice::from_ref(&path))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    let metallb = [
        root().join("examples/metallb-configmap.yaml"),
        root().join("examples/metallb-services.yaml"),
    ];
    let c = config::load(&metallb).unwrap();
    assert_eq!(
        c.pools.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        ["default", "bgp-pool"]
    );
    assert!(c.pools[0].avoid_buggy_ips && !c.pools[1].auto_assign);
    assert_eq!(c.l2_advertisements[0].pools, ["default"]);
    assert!(c.l2_advertisements[0].interfaces.is_empty(), "on-link");
    assert_eq!(c.peers[0].peer_asn, 64501);
    assert_eq!(c.peers[0].my_asn, 64500);
    assert_eq!(c.bgp_advertisements[0].communities, [(65535, 65282)]);
    assert_eq!(c.services[0].name, "web");
}

/// The YAML code blocks of the README must parse and validate (a MetalLB ConfigMap together
/// with a file naming the interfaces, as the README says).
#[test]
fn the_readme_yaml_examples_parse_and_validate() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```yaml") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            _ => {}
        }
    }
    assert!(
        blocks.len() >= 2,
        "the README shows its config examples in ```yaml blocks"
    );
    for (i, block) in blocks.iter().enumerate() {
        let name = format!("README block {i}");
        let file = parse_text(&name, block).unwrap_or_else(|e| panic!("{e}\n{block}"));
        let mut files = vec![(name.clone(), file)];
        if block.contains("kind: ConfigMap") {
            files.push((
                "interfaces".to_string(),
                parse_text("x", "dataplane: {interfaces: [eth1]}").unwrap(),
            ));
        }
        build_from(files).unwrap_or_else(|e| panic!("{name}: {e}\n{block}"));
    }
}
