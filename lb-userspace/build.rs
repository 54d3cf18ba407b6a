//! Embeds the eBPF objects that `cargo xtask build-ebpf` produced, so `sluice` is one file.

use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let objects = manifest.join("../lb-ebpf/target/bpfel-unknown-none/release");
    for name in ["sluice-dataplane", "sluice-bench"] {
        let src = objects.join(name);
        println!("cargo:rerun-if-changed={}", src.display());
        match fs::read(&src) {
            Ok(bytes) => fs::write(out.join(format!("{name}.o")), bytes).unwrap(),
            Err(error) => panic!(
                "the eBPF object {} is missing ({error}): run `cargo xtask build-ebpf` first \
                 (`cargo xtask test` and `cargo xtask setup` do it for you)",
                src.display()
            ),
        }
    }
}
