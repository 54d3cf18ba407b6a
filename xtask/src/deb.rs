//! `cargo xtask deb`: the Debian package for a host running `sluice run`.
//!
//! It installs three files and nothing else: /usr/bin/sluice, the systemd unit
//! /usr/lib/systemd/system/sluice.service (deploy/host/), and the example config
//! /etc/sluice/sluice.yaml (a conffile: an upgrade never overwrites the operator's edits).
//! It does not start or enable anything: the config names interfaces and addresses only the
//! operator knows. Its maintainer scripts only tell a running systemd about the unit (and
//! restart an enabled Sluice after an upgrade); they do nothing when dpkg works on another root.

use std::{path::Path, process::Command};

use anyhow::{Context, Result};

use crate::staging::{self, need, quiet, Scratch};

const USAGE: &str = "cargo xtask deb [--out FILE] [--binary FILE (instead of a release build)]";

/// Files the package installs: (path inside the package, source in the repository, mode).
const FILES: &[(&str, &str, u32)] = &[
    (
        "usr/lib/systemd/system/sluice.service",
        "deploy/host/sluice.service",
        0o644,
    ),
    ("etc/sluice/sluice.yaml", "deploy/host/sluice.yaml", 0o644),
];

const POSTINST: &str = r#"#!/bin/sh
# Tells a running systemd about the unit; restarts Sluice after an upgrade if it was running.
set -e
if [ "$1" = configure ] && [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
    if [ -n "$2" ]; then
        systemctl try-restart sluice.service || true
    fi
fi
exit 0
"#;

const PRERM: &str = r#"#!/bin/sh
# Stops Sluice before its removal (not before an upgrade: postinst restarts it then).
set -e
if [ "$1" = remove ] && [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl stop sluice.service || true
fi
exit 0
"#;

const POSTRM: &str = r#"#!/bin/sh
# On purge, removes what Sluice kept: the allocations in /var/lib/sluice.
set -e
if [ "$1" = purge ]; then
    rm -rf "$DPKG_ROOT/var/lib/sluice"
fi
if [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
exit 0
"#;

/// `cargo xtask deb`: see [`USAGE`].
pub fn main(args: &[String]) -> Result<()> {
    let o = staging::options(args, USAGE, false)?;
    need("dpkg-deb", "dpkg")?;
    let root = crate::root();
    let (binary, version) = staging::binary_and_version(&root, o.binary)?;
    let (out, fast) = (o.out, o.fast);
    let arch = architecture()?;
    let out = out.unwrap_or_else(|| {
        root.join("target/deb")
            .join(format!("sluice_{version}_{arch}.deb"))
    });
    build(&root, &binary, &version, &arch, &out, fast)?;
    println!("package  {}", out.display());
    println!("install  apt-get install {}   (or dpkg -i)", out.display());
    println!("then     edit /etc/sluice/sluice.yaml; systemctl enable --now sluice");
    Ok(())
}

/// dpkg's name for this machine's architecture (amd64, arm64, …).
fn architecture() -> Result<String> {
    need("dpkg", "dpkg")?;
    Ok(quiet(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_string())
}

/// Writes the package to `out` (through a temporary file beside it).
/// `fast`: gzip -1 rather than xz (for tests of large debug binaries).
pub fn build(
    root: &Path,
    binary: &Path,
    version: &str,
    arch: &str,
    out: &Path,
    fast: bool,
) -> Result<()> {
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let scratch = Scratch::new(dir, "deb")?;
    let tree = scratch.path.join("tree");
    staging::install(binary, &tree.join("usr/bin/sluice"), 0o755)?;
    for (to, from, mode) in FILES {
        staging::install(&root.join(from), &tree.join(to), *mode)?;
    }
    let mut size = 0u64;
    let mut sums = String::new();
    for to in ["usr/bin/sluice"]
        .into_iter()
        .chain(FILES.iter().map(|f| f.0))
    {
        let path = tree.join(to);
        size += std::fs::metadata(&path)?.len().div_ceil(1024);
        if !to.starts_with("etc/") {
            need("md5sum", "coreutils")?;
            let sum = quiet(Command::new("md5sum").arg(&path))?;
            let sum = sum.split_whitespace().next().unwrap_or_default();
            sums.push_str(&format!("{sum}  {to}\n"));
        }
    }
    let glibc = glibc_needed(binary)?;
    let depends = match glibc {
        Some(v) => format!("libc6 (>= {v}), libgcc-s1"),
        None => "libgcc-s1".to_string(),
    };
    let control = format!(
        "Package: sluice
Version: {version}
Architecture: {arch}
Maintainer: Sluice developers <sluice@localhost>
Installed-Size: {size}
Depends: {depends}
Section: net
Priority: optional
Description: load balancer for bare-metal Kubernetes and Linux hosts, in XDP
 Sluice allocates service IPs from address pools, attracts their traffic
 (ARP/NDP on chosen interfaces only, or BGP with BFD) and balances every flow
 in XDP: Maglev hashing, a connection table, DNAT in and reverse NAT out.
 .
 This package runs it on a host without Kubernetes: `sluice run` from
 /etc/sluice/sluice.yaml, as the systemd unit sluice.service (not enabled
 on install: edit the config, then `systemctl enable --now sluice`).
"
    );
    let debian = tree.join("DEBIAN");
    staging::write(&debian.join("control"), &control, 0o644)?;
    staging::write(
        &debian.join("conffiles"),
        "/etc/sluice/sluice.yaml\n",
        0o644,
    )?;
    staging::write(&debian.join("md5sums"), &sums, 0o644)?;
    staging::write(&debian.join("postinst"), POSTINST, 0o755)?;
    staging::write(&debian.join("prerm"), PRERM, 0o755)?;
    staging::write(&debian.join("postrm"), POSTRM, 0o755)?;
    let package = scratch.path.join("package.deb");
    let epoch = staging::source_epoch(root);
    quiet(
        Command::new("dpkg-deb")
            .env("SOURCE_DATE_EPOCH", epoch.to_string())
            .arg("--root-owner-group")
            .args(if fast {
                ["-Zgzip", "-z1"]
            } else {
                ["-Zxz", "-z6"]
            })
            .arg("--build")
            .arg(&tree)
            .arg(&package),
    )
    .context("dpkg-deb could not build the package (is the disk full?)")?;
    staging::publish(&package, out)
}

/// The newest glibc symbol version `binary` asks for ("2.34"), from its version-needed
/// strings; `None` for a static binary.
fn glibc_needed(binary: &Path) -> Result<Option<String>> {
    let bytes =
        std::fs::read(binary).with_context(|| format!("cannot read {}", binary.display()))?;
    let mut best: Option<Vec<u32>> = None;
    let needle = b"GLIBC_";
    let mut i = 0;
    while let Some(at) = bytes[i..].windows(needle.len()).position(|w| w == needle) {
        let start = i + at + needle.len();
        let end = bytes[start..]
            .iter()
            .position(|b| !(b.is_ascii_digit() || *b == b'.'))
            .map_or(bytes.len(), |n| start + n);
        let version: Vec<u32> = std::str::from_utf8(&bytes[start..end])
            .unwrap_or_default()
            .split('.')
            .filter_map(|p| p.parse().ok())
            .collect();
        if version.len() >= 2 && best.as_ref().is_none_or(|b| version > *b) {
            best = Some(version);
        }
        i = end.max(start);
    }
    Ok(best.map(|v| v.iter().map(u32::to_string).collect::<Vec<_>>().join(".")))
}
