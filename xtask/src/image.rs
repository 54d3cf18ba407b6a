//! `cargo xtask image`: the `sluice` OCI image, written without a container engine.
//!
//! One layer: the binary (eBPF objects embedded) at /usr/local/bin/sluice, the few shared
//! libraries `ldd` says it loads (glibc's), and an /etc/passwd naming the unprivileged user
//! 65532 it runs as by default (the speaker's DaemonSet runs it as root with a handful of
//! capabilities). The archive is an OCI image layout in a tar (`oci-layout`, `index.json`,
//! `blobs/sha256/…`) with Docker's `manifest.json` beside it, so `ctr images import`,
//! `podman load`, `docker load` and `skopeo copy oci-archive:…` all take it. The same commit
//! gives the same bytes (every timestamp is the commit's), hence the same digest.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::staging::{self, need, sha256, Scratch};

/// Where the binary goes inside the image (the Dockerfile puts it there too).
pub const BINARY: &str = "/usr/local/bin/sluice";
/// The user the image runs as unless a pod says otherwise (the Dockerfile's too).
pub const USER: &str = "65532:65532";

const PASSWD: &str = "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n";
const GROUP: &str = "root:x:0:\nnonroot:x:65532:\n";

/// A written image archive.
#[derive(Debug)]
pub struct Image {
    pub path: PathBuf,
    /// The manifest's digest (`sha256:…`): what a registry and `ctr` call the image.
    pub digest: String,
    pub reference: String,
    pub size: u64,
}

const USAGE: &str =
    "cargo xtask image [--tag NAME:TAG] [--out FILE] [--binary FILE (instead of a release build)] [--fast (gzip -1)]";

/// `cargo xtask image`: see [`USAGE`].
pub fn main(args: &[String]) -> Result<()> {
    let o = staging::options(args, USAGE, true)?;
    let root = crate::root();
    let (binary, version) = staging::binary_and_version(&root, o.binary)?;
    let level = if o.fast { 1 } else { 6 };
    let (tag, out) = (o.tag, o.out);
    let reference = tag.unwrap_or_else(|| format!("sluice:{version}"));
    let out = out.unwrap_or_else(|| {
        root.join("target/image")
            .join(format!("{}.oci.tar", reference.replace([':', '/'], "_")))
    });
    let image = build(
        &binary,
        &out,
        &reference,
        staging::source_epoch(&root),
        level,
    )?;
    println!("image    {}", image.reference);
    println!("digest   {}", image.digest);
    println!(
        "archive  {} ({:.1} MB)",
        image.path.display(),
        image.size as f64 / 1e6
    );
    println!("load it: ctr -n k8s.io images import {0}   |   docker load -i {0}   |   podman load -i {0}", image.path.display());
    println!(
        "push it: skopeo copy oci-archive:{} docker://REGISTRY/sluice:{version}",
        image.path.display()
    );
    Ok(())
}

/// Writes the image archive of `binary` to `out` (through a temporary file beside it).
/// `gzip_level`: 1 (fast) to 9.
pub fn build(
    binary: &Path,
    out: &Path,
    reference: &str,
    epoch: u64,
    gzip_level: u32,
) -> Result<Image> {
    need("gzip", "gzip")?;
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let scratch = Scratch::new(dir, "image")?;
    let rootfs = scratch.path.join("rootfs");
    let layout = scratch.path.join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).context("cannot create the image layout")?;

    // The root filesystem.
    staging::install(binary, &rootfs.join(&BINARY[1..]), 0o755)?;
    for lib in libraries(binary)? {
        let inside = lib.strip_prefix("/").unwrap_or(&lib);
        staging::install(&lib, &rootfs.join(inside), 0o755)?;
    }
    staging::write(&rootfs.join("etc/passwd"), PASSWD, 0o644)?;
    staging::write(&rootfs.join("etc/group"), GROUP, 0o644)?;
    std::fs::create_dir_all(rootfs.join("tmp"))?;
    std::fs::set_permissions(
        rootfs.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )?;

    // The layer (what the root filesystem holds): its tar's digest is the config's diff_id,
    // its gzip's the manifest's.
    let mut top: Vec<String> = std::fs::read_dir(&rootfs)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    top.sort();
    let top: Vec<&str> = top.iter().map(String::as_str).collect();
    let layer_tar = scratch.path.join("layer.tar");
    staging::tar(&rootfs, &top, &layer_tar, epoch)?;
    let diff_id = sha256(&layer_tar)?;
    let layer_gz = scratch.path.join("layer.tar.gz");
    let gz = std::fs::File::create(&layer_gz).context("cannot create the layer")?;
    let status = Command::new("gzip")
        .arg(format!("-{}", gzip_level.clamp(1, 9)))
        .arg("-n")
        .arg("-c")
        .arg(&layer_tar)
        .stdout(gz)
        .status()
        .context("cannot start gzip")?;
    if !status.success() {
        bail!("gzip of the layer failed ({status}): is the disk full?");
    }
    let layer = blob(&blobs, &layer_gz)?;

    let created = staging::rfc3339(epoch);
    let config = json!({
        "created": created,
        "architecture": arch(),
        "os": "linux",
        "config": {
            "User": USER,
            "Entrypoint": [BINARY],
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "WorkingDir": "/",
            "Labels": {
                "org.opencontainers.image.title": "sluice",
                "org.opencontainers.image.description": "Sluice: a load balancer for bare-metal Kubernetes and Linux hosts (XDP, L2 and BGP)",
                "org.opencontainers.image.version": reference.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest"),
                "org.opencontainers.image.licenses": "Apache-2.0",
            },
        },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{diff_id}")] },
        "history": [{ "created": created, "created_by": "cargo xtask image" }],
    });
    let config = blob_of(&blobs, &scratch.path, "config.json", &config)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config.0,
            "size": config.1,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": layer.0,
            "size": layer.1,
        }],
    });
    let manifest = blob_of(&blobs, &scratch.path, "manifest.json", &manifest)?;
    let (name, tag) = reference
        .rsplit_once(':')
        .filter(|(_, t)| !t.contains('/'))
        .unwrap_or((reference, "latest"));
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest.0,
            "size": manifest.1,
            "annotations": {
                "org.opencontainers.image.ref.name": tag,
                "io.containerd.image.name": format!("{}:{tag}", normalized(name)),
            },
        }],
    });
    staging::write(&layout.join("index.json"), &index.to_string(), 0o644)?;
    staging::write(
        &layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
        0o644,
    )?;
    // Docker before 25 reads only this.
    let docker = json!([{
        "Config": format!("blobs/sha256/{}", &config.0["sha256:".len()..]),
        "RepoTags": [format!("{name}:{tag}")],
        "Layers": [format!("blobs/sha256/{}", &layer.0["sha256:".len()..])],
    }]);
    staging::write(&layout.join("manifest.json"), &docker.to_string(), 0o644)?;

    let archive = scratch.path.join("image.tar");
    staging::tar(
        &layout,
        &["blobs", "index.json", "manifest.json", "oci-layout"],
        &archive,
        epoch,
    )?;
    let size = std::fs::metadata(&archive)?.len();
    staging::publish(&archive, out)?;
    Ok(Image {
        path: out.to_path_buf(),
        digest: manifest.0,
        reference: format!("{name}:{tag}"),
        size,
    })
}

/// Moves `file` into `blobs` under its digest; (digest, size).
fn blob(blobs: &Path, file: &Path) -> Result<(String, u64)> {
    let hex = sha256(file)?;
    let size = std::fs::metadata(file)?.len();
    staging::publish(file, &blobs.join(&hex))?;
    Ok((format!("sha256:{hex}"), size))
}

fn blob_of(
    blobs: &Path,
    scratch: &Path,
    name: &str,
    value: &serde_json::Value,
) -> Result<(String, u64)> {
    let file = scratch.join(name);
    staging::write(&file, &value.to_string(), 0o644)?;
    blob(blobs, &file)
}

/// The shared libraries `binary` loads, as `ldd` resolves them here (none when static).
fn libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    need("ldd", "libc-bin")?;
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("cannot start ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        match path {
            Some("not") => bail!(
                "{} needs a library this machine lacks: {}",
                binary.display(),
                line.trim()
            ),
            Some(p) if p.starts_with('/') => libs.push(PathBuf::from(p)),
            _ => {}
        }
    }
    Ok(libs)
}

/// The image architecture's OCI name.
fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// A name as containerd and the kubelet spell it in full: `sluice` → `docker.io/library/sluice`.
fn normalized(name: &str) -> String {
    match name.split_once('/') {
        None => format!("docker.io/library/{name}"),
        Some((host, _)) if host.contains(['.', ':']) || host == "localhost" => name.to_string(),
        Some(_) => format!("docker.io/{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_are_normalized_as_containerd_does() {
        assert_eq!(normalized("sluice"), "docker.io/library/sluice");
        assert_eq!(normalized("me/sluice"), "docker.io/me/sluice");
        assert_eq!(
            normalized("registry.lan:5000/lb/sluice"),
            "registry.lan:5000/lb/sluice"
        );
        assert_eq!(normalized("localhost/sluice"), "localhost/sluice");
    }
}
