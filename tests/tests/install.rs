//! The install paths, checked with the tools users load them with: the OCI image archive
//! (`cargo xtask image`) read by skopeo and umoci, run by runc, imported into and run by
//! containerd (`ctr`, as on a Kubernetes node), loaded by podman, and the Debian package
//! (`cargo xtask deb`) installed by dpkg into a scratch root, its unit checked by
//! `systemd-analyze verify`. Both are built from this build's `sluice` (`--binary`): the same
//! code as a release build, without a second build of the tree.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;
use sluice_tests::{require_root, sluice_bin};

/// A directory removed when the test ends, pass or fail.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Self {
        let path = std::env::temp_dir().join(format!("sluice-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// target/<profile>/xtask, built beside `sluice` by `cargo build --workspace`.
fn xtask() -> PathBuf {
    let bin = Path::new(&sluice_bin()).with_file_name("xtask");
    assert!(
        bin.exists(),
        "{} is missing: `cargo build --workspace` builds it",
        bin.display()
    );
    bin
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `cmd`; its stdout when it succeeds, else a failure with its stderr.
fn ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256(file: &Path) -> String {
    let out = ok(Command::new("sha256sum").arg(file));
    out.split_whitespace().next().unwrap().to_string()
}

fn json(file: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(file).unwrap())
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", file.display()))
}

fn version() -> String {
    let out = ok(Command::new(sluice_bin()).arg("--version"));
    out.split_whitespace().nth(1).unwrap().to_string()
}

fn build_image(out: &Path) -> String {
    let printed = ok(Command::new(xtask())
        .args(["image", "--fast", "--binary"])
        .arg(sluice_bin())
        .arg("--out")
        .arg(out));
    printed
        .lines()
        .find_map(|l| l.strip_prefix("digest"))
        .map(|d| d.trim().to_string())
        .unwrap_or_else(|| panic!("xtask image printed no digest: {printed}"))
}

/// Runs the unpacked image's bundle with runc, its process's arguments set to `args`.
fn runc(bundle: &Path, id: &str, args: &[&str]) -> (String, Value) {
    let path = bundle.join("config.json");
    let mut config = json(&path);
    let process = config["process"].as_object_mut().unwrap();
    process.insert(
        "args".into(),
        args.iter().map(|a| Value::from(*a)).collect(),
    );
    process.insert("terminal".into(), false.into());
    let user = config["process"]["user"].clone();
    std::fs::write(&path, config.to_string()).unwrap();
    let _ = Command::new("runc")
        .args(["delete", "--force", id])
        .output();
    let out = ok(Command::new("runc")
        .arg("run")
        .arg("--bundle")
        .arg(bundle)
        .arg(id));
    (out, user)
}

#[test]
fn the_image_archive_is_an_oci_image_whose_binary_runs_under_runc_as_an_unprivileged_user() {
    require_root();
    let tmp = TempDir::new("image");
    let archive = tmp.0.join("sluice.oci.tar");
    let digest = build_image(&archive);

    // The layout: every blob is what its name says, the index points at the manifest.
    let layout = tmp.0.join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    ok(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&layout));
    assert_eq!(
        json(&layout.join("oci-layout"))["imageLayoutVersion"],
        "1.0.0"
    );
    let blobs = layout.join("blobs/sha256");
    for blob in std::fs::read_dir(&blobs).unwrap() {
        let path = blob.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(
            sha256(&path),
            name,
            "blob {name}'s content has another digest"
        );
    }
    let index = json(&layout.join("index.json"));
    let entry = &index["manifests"][0];
    assert_eq!(
        entry["digest"],
        digest.as_str(),
        "index.json names another manifest"
    );
    let tag = version();
    assert_eq!(
        entry["annotations"]["org.opencontainers.image.ref.name"],
        tag.as_str()
    );
    assert_eq!(
        entry["annotations"]["io.containerd.image.name"],
        format!("docker.io/library/sluice:{tag}").as_str()
    );
    let blob = |digest: &Value| blobs.join(digest.as_str().unwrap().trim_start_matches("sha256:"));
    let manifest = json(&blob(&entry["digest"]));
    assert_eq!(manifest["schemaVersion"], 2);
    let config = json(&blob(&manifest["config"]["digest"]));
    assert_eq!(config["os"], "linux");
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/sluice"])
    );
    assert_eq!(config["config"]["User"], "65532:65532");
    // The config's diff_id is the digest of the uncompressed layer.
    let layer = blob(&manifest["layers"][0]["digest"]);
    let tar = tmp.0.join("layer.tar");
    let file = std::fs::File::create(&tar).unwrap();
    assert!(Command::new("gzip")
        .arg("-dc")
        .arg(&layer)
        .stdout(file)
        .status()
        .unwrap()
        .success());
    assert_eq!(
        config["rootfs"]["diff_ids"][0],
        format!("sha256:{}", sha256(&tar)).as_str()
    );
    // Docker's manifest.json, for `docker load` before 25.
    let docker = json(&layout.join("manifest.json"));
    assert_eq!(docker[0]["RepoTags"][0], format!("sluice:{tag}").as_str());

    // skopeo reads the archive as a registry would get it.
    let inspected: Value = serde_json::from_str(&ok(Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci-archive:{}", archive.display()))))
    .unwrap();
    assert_eq!(inspected["Digest"], digest.as_str());

    // umoci unpacks it into a runtime bundle; runc runs the binary inside, as 65532.
    let bundle = tmp.0.join("bundle");
    ok(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{tag}", layout.display()))
        .arg(&bundle));
    let id = format!("sluice-image-test-{}", std::process::id());
    let (out, user) = runc(&bundle, &id, &["/usr/local/bin/sluice", "--version"]);
    assert_eq!(out.trim(), format!("sluice {tag}"));
    assert_eq!(user["uid"], 65532);
    let etc = bundle.join("rootfs/etc/sluice");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::copy(
        repo().join("deploy/host/sluice.yaml"),
        etc.join("sluice.yaml"),
    )
    .unwrap();
    let (out, _) = runc(
        &bundle,
        &id,
        &[
            "/usr/local/bin/sluice",
            "validate",
            "--config",
            "/etc/sluice/sluice.yaml",
        ],
    );
    assert!(
        out.contains("valid: 1 pool(s), 1 service(s)"),
        "validate in the image said: {out}"
    );

    // The same binary and commit give the same bytes.
    let again = tmp.0.join("again.oci.tar");
    assert_eq!(
        build_image(&again),
        digest,
        "a second build has another digest"
    );
    assert_eq!(sha256(&again), sha256(&archive));
}

/// A containerd of the test's own (its root, state and socket in `dir`), stopped by PID and its
/// mounts undone when dropped.
struct Containerd {
    child: std::process::Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Containerd {
    fn start(dir: &Path) -> Self {
        let socket = dir.join("containerd.sock");
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg("/dev/null")
            .arg("--root")
            .arg(dir.join("root"))
            .arg("--state")
            .arg(dir.join("state"))
            .arg("--address")
            .arg(&socket)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd (Debian package containerd; cargo xtask setup installs it)");
        let me = Self {
            child,
            dir: dir.to_path_buf(),
            socket,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while me.ctr(&["version"]).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "containerd did not answer: {}",
                std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        me
    }

    /// `ctr -n k8s.io ARGS` against this containerd: stdout, or stdout and stderr as the error.
    fn ctr(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let dir = self.dir.display().to_string();
        for target in mounts.lines().filter_map(|l| l.split_whitespace().nth(1)) {
            if target.starts_with(&dir) {
                let _ = Command::new("umount").arg("-l").arg(target).status();
            }
        }
    }
}

#[test]
fn containerd_imports_the_image_under_the_name_the_manifests_use_and_runs_it() {
    require_root();
    let tmp = TempDir::new("containerd");
    let archive = tmp.0.join("sluice.oci.tar");
    let digest = build_image(&archive);
    let containerd = Containerd::start(&tmp.0);
    let archive = archive.display().to_string();
    containerd
        .ctr(&["images", "import", &archive])
        .unwrap_or_else(|e| panic!("ctr images import: {e}"));
    // The kubelet looks `image: sluice:0.1.0` up as docker.io/library/sluice:0.1.0.
    let name = format!("docker.io/library/sluice:{}", version());
    let listed = containerd.ctr(&["images", "ls"]).unwrap();
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&format!("{name} ")) && l.contains(&digest)),
        "{name} with {digest} is not among containerd's images:\n{listed}"
    );
    let id = format!("sluice-ctr-test-{}", std::process::id());
    let out = containerd
        .ctr(&[
            "run",
            "--rm",
            &name,
            &id,
            "/usr/local/bin/sluice",
            "--version",
        ])
        .unwrap_or_else(|e| panic!("ctr run: {e}"));
    assert_eq!(out.trim(), format!("sluice {}", version()));
}

#[test]
fn podman_loads_the_image_archive_under_the_same_name() {
    require_root();
    let tmp = TempDir::new("podman");
    let archive = tmp.0.join("sluice.oci.tar");
    build_image(&archive);
    // A storage of the test's own (vfs: no mounts), not the machine's.
    let podman = |args: &[&str]| {
        ok(Command::new("podman")
            .arg("--root")
            .arg(tmp.0.join("root"))
            .arg("--runroot")
            .arg(tmp.0.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args))
    };
    let loaded = podman(&["load", "--input", archive.to_str().unwrap()]);
    let name = format!("docker.io/library/sluice:{}", version());
    assert!(loaded.contains(&name), "podman load said: {loaded}");
    let inspected: Value = serde_json::from_str(&podman(&["image", "inspect", &name])).unwrap();
    assert_eq!(
        inspected[0]["Config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/sluice"])
    );
    assert_eq!(inspected[0]["Config"]["User"], "65532:65532");
}

#[test]
fn image_and_package_builds_that_fail_name_the_cause_and_leave_nothing_behind() {
    let tmp = TempDir::new("bad-build");
    for (what, args, named) in [
        (
            "image",
            vec!["--binary", "/nonexistent/sluice"],
            "/nonexistent/sluice",
        ),
        (
            "deb",
            vec!["--binary", "/nonexistent/sluice"],
            "/nonexistent/sluice",
        ),
        ("image", vec!["--tag"], "--tag needs a value"),
        (
            "image",
            vec!["--colour", "blue"],
            "unknown argument \"--colour\"",
        ),
    ] {
        let out = tmp.0.join(format!("{what}.out"));
        let result = Command::new(xtask())
            .arg(what)
            .arg("--out")
            .arg(&out)
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(!result.status.success(), "{args:?} succeeded");
        assert!(
            stderr.contains(named),
            "{what} {args:?}: the error does not name {named:?}: {stderr}"
        );
        let left = entries(&tmp.0);
        assert!(left.is_empty(), "{args:?} left {left:?} behind");
    }
}

/// What a directory holds, by name.
fn entries(dir: &Path) -> Vec<std::ffi::OsString> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect()
}

/// A small tmpfs mounted for a test, unmounted when dropped.
struct SmallDisk(PathBuf);

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_fails_image_and_package_builds_by_name_and_leaves_the_disk_empty() {
    require_root();
    let tmp = TempDir::new("full-disk");
    let disk = SmallDisk(tmp.0.join("disk"));
    std::fs::create_dir_all(&disk.0).unwrap();
    ok(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&disk.0));
    for what in ["image", "deb"] {
        let result = Command::new(xtask())
            .args([what, "--fast", "--binary", &sluice_bin(), "--out"])
            .arg(disk.0.join("out"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(!result.status.success(), "{what} succeeded on a 4 MB disk");
        assert!(
            stderr.contains("No space left on device") || stderr.contains("disk full"),
            "{what}: the error does not say the disk is full: {stderr}"
        );
        let left = entries(&disk.0);
        assert!(left.is_empty(), "{what} left {left:?} on the full disk");
    }
}

#[test]
fn the_debian_package_installs_three_files_its_unit_verifies_and_a_purge_removes_everything() {
    require_root();
    let tmp = TempDir::new("deb");
    let package = tmp.0.join("sluice.deb");
    ok(Command::new(xtask())
        .args(["deb", "--fast", "--binary"])
        .arg(sluice_bin())
        .arg("--out")
        .arg(&package));

    let info = ok(Command::new("dpkg-deb").args(["--field"]).arg(&package));
    assert!(info.contains("Package: sluice\n"), "{info}");
    assert!(
        info.contains(&format!("Version: {}\n", version())),
        "{info}"
    );
    assert!(
        info.contains("Depends: libc6 (>= 2."),
        "no glibc dependency: {info}"
    );
    let files: Vec<String> = ok(Command::new("dpkg-deb").arg("--contents").arg(&package))
        .lines()
        .filter(|l| !l.ends_with('/'))
        .map(|l| l.split_whitespace().last().unwrap().to_string())
        .collect();
    assert_eq!(
        files,
        [
            "./etc/sluice/sluice.yaml",
            "./usr/bin/sluice",
            "./usr/lib/systemd/system/sluice.service"
        ]
    );

    // dpkg installs it into a scratch root (maintainer scripts run outside it, and do nothing
    // there: no systemctl on another root).
    let root = tmp.0.join("root");
    for dir in ["var/lib/dpkg/updates", "var/lib/dpkg/info", "var/log"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    let dpkg = |args: &[&str]| {
        ok(Command::new("dpkg")
            .arg(format!("--root={}", root.display()))
            .args([
                "--force-script-chrootless",
                "--force-depends",
                "--log=/dev/null",
            ])
            .args(args))
    };
    dpkg(&["--install", package.to_str().unwrap()]);
    let status = ok(Command::new("dpkg-query")
        .arg(format!(
            "--admindir={}",
            root.join("var/lib/dpkg").display()
        ))
        .args(["-W", "-f=${Status} ${Conffiles}", "sluice"]));
    assert!(status.starts_with("install ok installed"), "{status}");
    assert!(
        status.contains("/etc/sluice/sluice.yaml"),
        "the config is not a conffile: {status}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| {
        std::fs::metadata(root.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("usr/bin/sluice"), 0o755);
    assert_eq!(mode("usr/lib/systemd/system/sluice.service"), 0o644);
    assert_eq!(
        std::fs::read(root.join("etc/sluice/sluice.yaml")).unwrap(),
        std::fs::read(repo().join("deploy/host/sluice.yaml")).unwrap()
    );
    let installed = root.join("usr/bin/sluice");
    assert!(ok(Command::new(&installed).arg("--version")).starts_with("sluice "));
    let valid = ok(Command::new(&installed)
        .args(["validate", "--config"])
        .arg(root.join("etc/sluice/sluice.yaml")));
    assert!(valid.contains("valid"), "{valid}");

    // systemd-analyze verify on the unit as installed: in a private mount namespace, the scratch
    // root's /usr/bin and unit directory lie over this machine's (which stays untouched), so
    // ExecStart's /usr/bin/sluice exists and the targets it needs are the machine's own.
    let script = format!(
        "mount -t overlay overlay -o lowerdir={r}/usr/bin:/usr/bin /usr/bin && \
         mount -t overlay overlay -o lowerdir={r}/usr/lib/systemd/system:/usr/lib/systemd/system /usr/lib/systemd/system && \
         systemd-analyze verify sluice.service",
        r = root.display()
    );
    let verify = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );

    // A purge removes the files, the conffile and the state.
    std::fs::create_dir_all(root.join("var/lib/sluice")).unwrap();
    std::fs::write(root.join("var/lib/sluice/allocations.json"), "{}").unwrap();
    dpkg(&["--purge", "sluice"]);
    for gone in [
        "usr/bin/sluice",
        "usr/lib/systemd/system/sluice.service",
        "etc/sluice/sluice.yaml",
        "var/lib/sluice",
    ] {
        assert!(
            !root.join(gone).exists(),
            "{gone} is still there after a purge"
        );
    }
}

#[test]
fn the_dockerfile_builds_what_xtask_image_builds_and_the_kustomization_names_that_image() {
    let dockerfile = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    for line in [
        "FROM scratch",
        "USER 65532:65532",
        r#"ENTRYPOINT ["/usr/local/bin/sluice"]"#,
        "cp target/release/sluice /rootfs/usr/local/bin/sluice",
    ] {
        assert!(
            dockerfile
                .lines()
                .any(|l| l.trim().trim_start_matches("&& ").trim_end_matches(" \\") == line),
            "the Dockerfile lacks {line:?}, which `xtask image` builds"
        );
    }
    let kustomization: yaml_serde::Value = yaml_serde::from_str(
        &std::fs::read_to_string(repo().join("deploy/kustomization.yaml")).unwrap(),
    )
    .unwrap();
    let images = &kustomization["images"][0];
    assert_eq!(images["name"].as_str(), Some("sluice"));
    assert_eq!(images["newTag"].as_str(), Some(version().as_str()));
    for manifest in ["controller/deployment.yaml", "speaker/daemonset.yaml"] {
        let text = std::fs::read_to_string(repo().join("deploy").join(manifest)).unwrap();
        assert!(
            text.contains(&format!("image: sluice:{}", version())),
            "{manifest} does not run the image the kustomization retags"
        );
    }
}
