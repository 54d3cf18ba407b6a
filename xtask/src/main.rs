//! `cargo xtask`: every Sluice workflow, one entry point.
//!
//! - `setup`      the toolchain pieces and Debian packages, idempotently (fast when present)
//! - `build-ebpf` builds lb-ebpf (nightly, -Z build-std=core, bpfel-unknown-none, bpf-linker)
//! - `test`       setup, build-ebpf, fmt and clippy checks, then every test (needs root)
//! - `bench`      setup, build-ebpf, then the XDP benchmark report (needs root); `bench e2e`
//!   runs the shared end-to-end bench with Sluice as a path, and each program's cost in place
//! - `soak`       setup, build-ebpf, then the speaker mesh's failovers, 10 runs each, with the
//!   figures (needs root; `cargo xtask soak -- RUNS` for another count); `soak bfd` does the
//!   same for BGP with BFD against BIRD and FRR; `soak cluster` for cluster-wide balancing
//!   (connections under ECMP changes and the L2 owner's failover, 5 runs)
//! - `manifests`  writes deploy/crds/ from the Rust CRD types (a test fails when they differ)
//! - `demo`       Sluice in network namespaces: a client, a node, three backends (needs root)
//! - `image`      the OCI image archive of `sluice`, without a container engine; prints its digest
//! - `deb`        the Debian package for hosts: the binary, a systemd unit, /etc/sluice/sluice.yaml
//! - `kernels`    the data plane's tests on Debian's stock kernels, each booted in a QEMU guest
//!   (`cargo xtask kernels [LABEL...] [-- FILTER]`); `test` runs it after the tests here

use std::{
    env,
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

mod deb;
mod e2e;
mod image;
mod kernels;
mod staging;

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the tests and the data plane need: (command that proves it is there, package).
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("nft", "nftables"),
    ("iptables", "iptables"),
    ("bird", "bird2"),
    ("vtysh", "frr"),
    ("gobgpd", "gobgpd"),
    // The install tests: the image read and run as users do, the package's tools.
    ("skopeo", "skopeo"),
    ("umoci", "umoci"),
    ("runc", "runc"),
    ("containerd", "containerd"),
    ("podman", "podman"),
    ("dpkg-deb", "dpkg"),
];

/// What the demo needs of them (a first demo on a fresh machine installs no more).
const DEMO_PACKAGES: &[(&str, &str)] = &[("ip", "iproute2"), ("ethtool", "ethtool")];

fn main() -> Result<()> {
    let mut args = env::args().skip(1);
    let command = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    match command.as_str() {
        "setup" => setup(),
        "build-ebpf" => build_ebpf(),
        "test" => {
            setup()?;
            build_ebpf()?;
            test(&rest)
        }
        "bench" => {
            setup()?;
            build_ebpf()?;
            match rest.first().map(String::as_str) {
                Some("e2e") => e2e::bench_e2e(),
                _ => bench(),
            }
        }
        "soak" => {
            setup()?;
            build_ebpf()?;
            soak(&rest)
        }
        "manifests" => manifests(),
        "image" => image::main(&rest),
        "deb" => deb::main(&rest),
        "kernels" => {
            setup()?;
            build_ebpf()?;
            kernels::main(&rest)
        }
        "demo" => {
            setup_with(DEMO_PACKAGES)?;
            build_ebpf()?;
            demo()
        }
        _ => {
            eprintln!("usage: cargo xtask <setup | build-ebpf | test [-- cargo test args] | kernels [LABEL...] [-- FILTER] | bench | soak [mesh|bfd|cluster] [-- RUNS] | manifests | demo | image | deb>");
            std::process::exit(2);
        }
    }
}

/// Regenerates deploy/crds/ with `sluice crds --out-dir`, removing CRDs no longer defined.
fn manifests() -> Result<()> {
    let dir = root().join("deploy/crds");
    if dir.exists() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "yaml") {
                std::fs::remove_file(&path)?;
            }
        }
    }
    let status = cargo()
        .args([
            "run",
            "-q",
            "-p",
            "lb-userspace",
            "--bin",
            "sluice",
            "--",
            "crds",
            "--out-dir",
        ])
        .arg(&dir)
        .status()
        .context("running sluice crds")?;
    if !status.success() {
        bail!("sluice crds failed");
    }
    Ok(())
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// A command with the variables of the cargo that runs xtask removed, so nested cargo and rustup
/// invocations pick their own toolchain.
fn clean_command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(command: &str) -> bool {
    [
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
        "/usr/local/sbin",
        "/usr/local/bin",
    ]
    .iter()
    .any(|dir| Path::new(dir).join(command).exists())
}

fn setup() -> Result<()> {
    let all: Vec<(&str, &str)> = DEBIAN_PACKAGES
        .iter()
        .chain(kernels::PACKAGES)
        .copied()
        .collect();
    setup_with(&all)
}

/// The toolchain pieces, and those of `packages` that are missing.
fn setup_with(packages: &[(&str, &str)]) -> Result<()> {
    // 1. nightly with rust-src, for -Z build-std=core.
    let toolchains =
        output(clean_command("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        bail!("the nightly toolchain is missing (`rustup toolchain install nightly`); lb-ebpf needs it");
    }
    let components = output(clean_command("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        run(clean_command("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    // 2. bpf-linker, linked against nightly's own libLLVM (see docs: TOOLCHAIN).
    let linker = output(clean_command("bpf-linker").arg("--version")).unwrap_or_default();
    if !linker.contains(BPF_LINKER_VERSION) {
        install_bpf_linker()?;
    }

    // 3. Debian packages.
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(command, _)| !have(command))
        .map(|(_, package)| *package)
        .collect();
    if !missing.is_empty() {
        run(Command::new("apt-get").arg("update").arg("-q"))
            .context("apt-get update (the Debian packages need root)")?;
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing))?;
    }
    eprintln!("xtask: setup complete");
    Ok(())
}

fn install_bpf_linker() -> Result<()> {
    let sysroot = output(clean_command("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("rustc +nightly --print sysroot")?;
    let lib_dir = PathBuf::from(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib_dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM-") && name.ends_with(".so"))
        .with_context(|| format!("no libLLVM-*.so in {}", lib_dir.display()))?;
    let lib = llvm
        .trim_start_matches("lib")
        .trim_end_matches(".so")
        .to_string();
    // "LLVM-22-rust-1.97.0-nightly" → 22
    let major = lib
        .split('-')
        .nth(1)
        .with_context(|| format!("cannot read the LLVM major version from {llvm}"))?;
    let rustflags = format!(
        "-L {dir} -l dylib={lib} -C link-arg=-Wl,-rpath,{dir}",
        dir = lib_dir.display()
    );
    run(clean_command("cargo").env("RUSTFLAGS", rustflags).args([
        "install",
        &format!("bpf-linker@{BPF_LINKER_VERSION}"),
        "--locked",
        "--no-default-features",
        "--features",
        &format!("llvm-{major},no-llvm-linking"),
    ]))
}

fn build_ebpf() -> Result<()> {
    if output(clean_command("bpf-linker").arg("--version")).is_none() {
        bail!("bpf-linker is not installed: run `cargo xtask setup`");
    }
    run(nightly_in_ebpf().args(["build", "--release"]))
}

fn cargo() -> Command {
    let mut cmd = clean_command(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn nightly_in_ebpf() -> Command {
    let mut cmd = clean_command("rustup");
    cmd.args(["run", "nightly", "cargo"])
        .current_dir(root().join("lb-ebpf"));
    cmd
}

fn test(extra: &[String]) -> Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(nightly_in_ebpf().args(["fmt", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(nightly_in_ebpf().args(["clippy", "--release", "--", "-D", "warnings"]))?;
    // Build everything (the e2e tests run the `sluice` binary) before running anything.
    run(cargo().args(["build", "--workspace", "--all-targets"]))?;
    run_tests(cargo().args(["test", "--workspace"]).args(extra))?;
    // The same data-plane tests on Debian's stock kernels, each in a QEMU guest (a filtered
    // run of the tests here is a developer's quick loop: it skips them).
    if !extra.is_empty() {
        eprintln!("xtask: kernel matrix skipped: the tests were filtered ({extra:?}); `cargo xtask kernels` runs it");
        return Ok(());
    }
    if !kernels::available() {
        eprintln!(
            "xtask: kernel matrix SKIPPED: QEMU is not installed (`cargo xtask setup` installs it)"
        );
        return Ok(());
    }
    kernels::main(&[])
}

/// Runs cargo test, passing its output through, and ends with one plain summary line
/// ("N passed, N failed") added up over every test binary.
fn run_tests(cmd: &mut Command) -> Result<()> {
    use std::io::{BufRead, BufReader};
    eprintln!("xtask: {cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let counts = libtest_counts(rest);
            passed += counts.passed;
            failed += counts.failed;
        }
    }
    let status = child.wait()?;
    println!("{passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    Ok(())
}

/// What a libtest summary line ("ok. 4 passed; 0 failed; 1 ignored; ...") counts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct TestCounts {
    passed: u64,
    failed: u64,
    ignored: u64,
}

fn libtest_counts(summary: &str) -> TestCounts {
    let mut counts = TestCounts::default();
    for part in summary.split(';') {
        let mut words = part.split_whitespace().rev();
        let (Some(what), Some(n)) = (words.next(), words.next()) else {
            continue;
        };
        let n: u64 = n.parse().unwrap_or(0);
        match what {
            "passed" => counts.passed += n,
            "failed" => counts.failed += n,
            "ignored" => counts.ignored += n,
            _ => {}
        }
    }
    counts
}

/// `target/release/sluice`, built.
fn build_release_sluice() -> Result<()> {
    run(cargo().args([
        "build",
        "--release",
        "--package",
        "lb-userspace",
        "--bin",
        "sluice",
    ]))
}

/// The demo in the dev profile, built by one cargo invocation: the same dependency artifacts
/// as `cargo xtask test` (the workspace has no dev-dependencies, so features are the same), so
/// a demo after the tests, or the tests after a demo, compiles only Sluice's own crates.
fn demo() -> Result<()> {
    run(cargo().args([
        "build",
        "--package",
        "lb-userspace",
        "--bin",
        "sluice",
        "--package",
        "sluice-tests",
        "--bin",
        "demo",
    ]))?;
    let demo = root().join("target/debug/demo");
    run(&mut clean_command(&demo))
}

/// `soak [mesh|bfd|cluster] [-- RUNS]`: the speaker mesh's failovers (the default), BGP's with
/// BFD, or cluster-wide balancing's (ECMP changes, the L2 owner's failover).
fn soak(extra: &[String]) -> Result<()> {
    let (bin, rest) = match extra.first().map(String::as_str) {
        Some("bfd") => ("bfd-soak", &extra[1..]),
        Some("mesh") => ("mesh-soak", &extra[1..]),
        Some("cluster") => ("cluster-soak", &extra[1..]),
        _ => ("mesh-soak", extra),
    };
    run(cargo().args(["build", "--package", "lb-userspace", "--bin", "sluice"]))?;
    run(cargo()
        .args(["run", "--package", "sluice-tests", "--bin", bin, "--"])
        .args(rest.iter().filter(|a| *a != "--")))
}

/// `cargo run --release` of one of sluice-tests' programs.
fn run_release_bin(name: &str) -> Result<()> {
    run(cargo().args([
        "run",
        "--release",
        "--package",
        "sluice-tests",
        "--bin",
        name,
    ]))
}

fn bench() -> Result<()> {
    run_release_bin("xdp-bench")?;
    run_release_bin("control-bench")?;
    build_release_sluice()?;
    run_release_bin("controller-bench")?;
    run_release_bin("speaker-bench")
}
