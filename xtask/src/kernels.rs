//! `cargo xtask kernels`: the data plane's tests on the kernels users run, each booted in a
//! QEMU guest.
//!
//! The matrix is Debian's stock kernels: Debian 12's (6.1), Debian 13's (6.12) and the newest
//! of Debian 13's backports. Each comes from Debian's own packages (`apt-get download`, through
//! a private apt state under `target/kernels/`, cached there), and boots under QEMU with this
//! machine's root filesystem, read-only over 9p with a tmpfs overlay on top, and the kernel's
//! own modules beside it (bonding, 802.1Q, bridge, veth are modules in Debian's kernels). The
//! guest runs the test binaries built on this machine, as root, and powers off; what they print
//! comes back on the serial console.
//!
//! `/dev/kvm` here runs only specially built guests, so the guest runs under software
//! emulation (TCG): a guest run takes a few minutes. This machine's own kernel is the fourth
//! column of the matrix: `cargo xtask test` runs the same tests on it directly.
//!
//! `cargo xtask kernels [LABEL...] [-- FILTER]`: every kernel of the matrix, or those named;
//! FILTER names a test binary (`kernel_links`) to run alone, or filters test names.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{cargo, have, libtest_counts, root, run};

/// One kernel of the matrix: a label, and the Debian suite whose `linux-image-amd64` it is.
pub struct Kernel {
    pub label: &'static str,
    pub suite: &'static str,
    pub what: &'static str,
}

pub const MATRIX: &[Kernel] = &[
    Kernel {
        label: "debian-12",
        suite: "bookworm",
        what: "Debian 12's stock kernel",
    },
    Kernel {
        label: "debian-13",
        suite: "trixie",
        what: "Debian 13's stock kernel",
    },
    Kernel {
        label: "debian-13-backports",
        suite: "trixie-backports",
        what: "the newest Debian backports kernel",
    },
];

/// The test binaries the guest runs, each with the tests of it to run (none named: all): the
/// data plane's packet tests, its namespace tests (L2 and balancing), `sluice run` restarting
/// over its pinned links, and the link lab (bonds, VLANs, bridges) that only a guest can run.
/// Tests ignored on this machine's kernel run too (`--include-ignored`).
pub const GUEST_TESTS: &[(&str, &[&str])] = &[
    ("xdp_l2_packets", &[]),
    ("xdp_balancer_packets", &[]),
    ("xdp_tunnel_packets", &[]),
    ("l2_netns", &[]),
    // IPv6 balanced through namespaces (the link lab balances IPv4); not the million-SYN
    // flood, which alone takes minutes under software emulation.
    ("balancer_netns", &["ipv6_tcp_and_udp_are_balanced"]),
    (
        "standalone_netns",
        &["forwarding_goes_on_while_sluice_run_restarts_and_detach_stops_it"],
    ),
    ("kernel_links", &[]),
];

/// How long one guest may run before it is stopped and counted as failed.
const GUEST_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Modules the initramfs loads to reach the root filesystem (when they are not built in).
const BOOT_MODULES: &[&str] = &[
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/net/9p/9pnet_virtio.ko",
    "kernel/fs/9p/9p.ko",
    "kernel/fs/overlayfs/overlay.ko",
];

/// The Debian packages a guest run needs on this machine.
pub const PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    ("depmod", "kmod"),
    ("cpio", "cpio"),
];

/// True when this machine can boot the guests (QEMU and the tools to build their initramfs).
pub fn available() -> bool {
    PACKAGES.iter().all(|(command, _)| have(command))
}

/// `cargo xtask kernels [LABEL...] [-- FILTER]`.
pub fn main(args: &[String]) -> Result<()> {
    let (labels, filter) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], args.get(i + 1).cloned()),
        None => (args, None),
    };
    let kernels: Vec<&Kernel> = if labels.is_empty() {
        MATRIX.iter().collect()
    } else {
        labels
            .iter()
            .map(|l| {
                MATRIX.iter().find(|k| k.label == l).with_context(|| {
                    let known: Vec<&str> = MATRIX.iter().map(|k| k.label).collect();
                    format!("no kernel {l:?} in the matrix (it has {known:?})")
                })
            })
            .collect::<Result<_>>()?
    };
    if !available() {
        bail!(
            "QEMU or the initramfs tools are missing: `cargo xtask setup` installs {:?}",
            PACKAGES.iter().map(|(_, p)| *p).collect::<Vec<_>>()
        );
    }
    let binaries = snapshot(&build_test_binaries()?)?;
    let mut results = Vec::new();
    for kernel in kernels {
        let started = Instant::now();
        let outcome = fetch(kernel).and_then(|k| run_guest(kernel, &k, &binaries, &filter));
        results.push((kernel, outcome, started.elapsed()));
    }
    println!();
    println!("kernel matrix (QEMU guests, software emulation):");
    println!(
        "{:<22} {:<26} {:>7} {:>7} {:>8} {:>6}  result",
        "kernel", "release", "passed", "failed", "ignored", "time"
    );
    let mut failed = false;
    for (kernel, outcome, took) in &results {
        match outcome {
            Ok(run) => {
                let ok = run.failed == 0 && run.binaries_ok && run.passed > 0;
                failed |= !ok;
                println!(
                    "{:<22} {:<26} {:>7} {:>7} {:>8} {:>5}s  {}",
                    kernel.label,
                    run.release,
                    run.passed,
                    run.failed,
                    run.ignored,
                    took.as_secs(),
                    if ok { "ok" } else { "FAILED" }
                );
                for line in &run.failures {
                    println!("    {line}");
                }
                for line in &run.figures {
                    println!("    measured: {line}");
                }
            }
            Err(error) => {
                failed = true;
                println!("{:<22} {error:#}", kernel.label);
            }
        }
    }
    if failed {
        bail!("the data plane's tests failed on a kernel of the matrix (console logs under target/kernels/)");
    }
    Ok(())
}

/// Copies the test binaries and `sluice` to `target/kernels/bin/`, so that a build on this
/// machine while a guest runs (the guest reads them over 9p) cannot change them under it.
/// The guest finds `sluice` through `SLUICE_BIN`.
fn snapshot(binaries: &[(String, PathBuf)]) -> Result<Vec<(String, PathBuf)>> {
    let dir = cache_dir().join("bin");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    fs::copy(root().join("target/debug/sluice"), dir.join("sluice"))
        .context("copying target/debug/sluice")?;
    binaries
        .iter()
        .map(|(name, path)| {
            let copy = dir.join(name);
            fs::copy(path, &copy).with_context(|| format!("copying {}", path.display()))?;
            Ok((name.clone(), copy))
        })
        .collect()
}

/// The guest test binaries, built for this machine, and the `sluice` binary they run; their
/// paths.
fn build_test_binaries() -> Result<Vec<(String, PathBuf)>> {
    // The workspace as `cargo xtask test` builds it (the same features, so nothing is built
    // twice), then the test binaries' paths.
    run(cargo().args(["build", "--workspace", "--all-targets"]))?;
    let mut cmd = cargo();
    cmd.args([
        "test",
        "--workspace",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    eprintln!("xtask: {cmd:?}");
    let out = cmd.stderr(Stdio::inherit()).output()?;
    if !out.status.success() {
        bail!("building the guest's test binaries failed");
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(exe), Some(name)) = (msg["executable"].as_str(), msg["target"]["name"].as_str())
        else {
            continue;
        };
        if GUEST_TESTS.iter().any(|(n, _)| *n == name)
            && !found.iter().any(|(n, _): &(String, PathBuf)| n == name)
        {
            found.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    if found.len() != GUEST_TESTS.len() {
        bail!("expected the test binaries {GUEST_TESTS:?}, cargo built {found:?}");
    }
    Ok(found)
}

/// A kernel fetched and made bootable.
pub struct Fetched {
    pub release: String,
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
    pub initramfs: PathBuf,
}

fn cache_dir() -> PathBuf {
    root().join("target/kernels")
}

/// apt with a private state for one suite: its own sources, lists and cache under `dir`.
fn apt(dir: &Path, program: &str) -> Command {
    let mut cmd = Command::new(program);
    for (key, value) in [
        ("Dir::Etc::SourceList", dir.join("sources.list")),
        ("Dir::Etc::SourceParts", PathBuf::from("/dev/null")),
        ("Dir::State::Lists", dir.join("lists")),
        ("Dir::Cache", dir.join("cache")),
        ("Dir::State::status", PathBuf::from("/dev/null")),
    ] {
        cmd.arg("-o").arg(format!("{key}={}", value.display()));
    }
    cmd.args(["-o", "APT::Architecture=amd64", "-o", "Debug::NoLocking=1"]);
    cmd.args(["-o", "APT::Sandbox::User=root", "-q"]);
    cmd
}

/// The `Depends:` of a package in the private apt state, by name.
fn depends(dir: &Path, package: &str) -> Result<Vec<String>> {
    let out = apt(dir, "apt-cache")
        .args(["show", "--no-all-versions", package])
        .output()?;
    if !out.status.success() {
        bail!(
            "apt-cache show {package}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("Depends:"))
        .unwrap_or("");
    Ok(line
        .split(',')
        .filter_map(|d| d.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Downloads (once) and unpacks the kernel of `kernel.suite`, with its modules indexed and an
/// initramfs that mounts this machine's root over 9p.
pub fn fetch(kernel: &Kernel) -> Result<Fetched> {
    let dir = cache_dir().join(kernel.label);
    let ready = dir.join("ready");
    if let Ok(release) = fs::read_to_string(&ready) {
        let release = release.trim().to_string();
        if let Some(fetched) = bootable(&dir, &release) {
            return Ok(fetched);
        }
    }
    let _ = fs::remove_dir_all(&dir);
    let apt_dir = dir.join("apt");
    for sub in ["lists/partial", "cache/archives/partial", "debs"] {
        fs::create_dir_all(apt_dir.join(sub))?;
    }
    fs::write(
        apt_dir.join("sources.list"),
        format!(
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian {} main\n",
            kernel.suite
        ),
    )?;
    with_retries(|| run(apt(&apt_dir, "apt-get").arg("update")))
        .with_context(|| format!("reading Debian's {} package index", kernel.suite))?;
    let image = depends(&apt_dir, "linux-image-amd64")?
        .into_iter()
        .find(|d| d.starts_with("linux-image-"))
        .with_context(|| format!("{}'s linux-image-amd64 names no kernel", kernel.suite))?;
    let flavour = image.trim_start_matches("linux-image-").to_string();
    let mut packages = vec![image.clone()];
    packages.extend(depends(&apt_dir, &image)?.into_iter().filter(|d| {
        d == &format!("linux-binary-{flavour}") || d == &format!("linux-modules-{flavour}")
    }));
    let debs = apt_dir.join("debs");
    with_retries(|| {
        run(apt(&apt_dir, "apt-get")
            .current_dir(&debs)
            .arg("download")
            .args(&packages))
    })
    .with_context(|| format!("downloading {packages:?}"))?;
    let unpacked = dir.join("root");
    for entry in fs::read_dir(&debs)? {
        let deb = entry?.path();
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    }
    // Debian 13 keeps modules (and 7.x the kernel) under /usr/lib/modules; depmod -b and the
    // guest want them under lib/modules.
    let usr_modules = unpacked.join("usr/lib/modules");
    if usr_modules.is_dir() {
        fs::create_dir_all(unpacked.join("lib"))?;
        fs::rename(&usr_modules, unpacked.join("lib/modules"))?;
    }
    let release = fs::read_dir(unpacked.join("lib/modules"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .context("the kernel package holds no modules")?;
    run(Command::new("depmod")
        .arg("-b")
        .arg(&unpacked)
        .arg(&release))?;
    write_initramfs(&dir, &unpacked.join("lib/modules").join(&release))?;
    fs::write(&ready, &release)?;
    bootable(&dir, &release).context("the unpacked kernel has no vmlinuz")
}

/// `f`, tried up to three times 5 s apart (the mirror may stumble).
fn with_retries(mut f: impl FnMut() -> Result<()>) -> Result<()> {
    let mut attempt = 1;
    loop {
        match f() {
            Ok(()) => return Ok(()),
            Err(error) if attempt < 3 => {
                eprintln!("xtask: attempt {attempt} failed ({error:#}); again in 5 s");
                std::thread::sleep(Duration::from_secs(5));
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    }
}

/// The paths of a fetched kernel, when they are all there.
fn bootable(dir: &Path, release: &str) -> Option<Fetched> {
    let unpacked = dir.join("root");
    let modules = unpacked.join("lib/modules");
    let vmlinuz = [
        unpacked.join(format!("boot/vmlinuz-{release}")),
        modules.join(release).join("vmlinuz"),
    ]
    .into_iter()
    .find(|p| p.exists())?;
    let initramfs = dir.join("initramfs.cpio.gz");
    (initramfs.exists() && modules.join(release).join("modules.dep").exists()).then(|| Fetched {
        release: release.to_string(),
        vmlinuz,
        modules,
        initramfs,
    })
}

/// `module` and what it needs, in load order (dependencies first), from modules.dep.
fn load_order(dep: &str, module: &str, out: &mut Vec<String>) {
    let Some(line) = dep
        .lines()
        .find(|l| l.split(':').next().is_some_and(|m| m.starts_with(module)))
    else {
        return; // built in
    };
    let (name, needs) = line.split_once(':').unwrap_or((line, ""));
    for need in needs.split_whitespace() {
        load_order(dep, need, out);
    }
    if !out.iter().any(|m| m == name) {
        out.push(name.to_string());
    }
}

/// The guest's first init: busybox, the modules that reach the root filesystem (decompressed:
/// busybox's insmod reads plain ELF), and the script that mounts the host's root read-only
/// under a tmpfs overlay and hands over to the job.
fn write_initramfs(dir: &Path, modules: &Path) -> Result<()> {
    let stage = dir.join("initramfs");
    let _ = fs::remove_dir_all(&stage);
    for sub in ["bin", "modules", "proc", "sys", "dev"] {
        fs::create_dir_all(stage.join(sub))?;
    }
    fs::copy(which("busybox")?, stage.join("bin/busybox"))?;
    let dep = fs::read_to_string(modules.join("modules.dep"))?;
    let mut order = Vec::new();
    for module in BOOT_MODULES {
        load_order(&dep, module, &mut order);
    }
    for (i, module) in order.iter().enumerate() {
        let source = modules.join(module);
        let base = Path::new(module)
            .file_name()
            .and_then(|n| n.to_str())
            .context("module name")?;
        let plain = base
            .trim_end_matches(".xz")
            .trim_end_matches(".zst")
            .to_string();
        let target = stage.join(format!("modules/{i:02}-{plain}"));
        let data = if base.ends_with(".xz") {
            Command::new("xz").arg("-dc").arg(&source).output()?.stdout
        } else if base.ends_with(".zst") {
            Command::new("zstd")
                .arg("-dc")
                .arg(&source)
                .output()?
                .stdout
        } else {
            fs::read(&source)?
        };
        if data.is_empty() {
            bail!("cannot read the module {}", source.display());
        }
        fs::write(target, data)?;
    }
    let init = stage.join("init");
    fs::write(&init, INIT)?;
    make_executable(&init)?;
    let archive = dir.join("initramfs.cpio.gz");
    let status = Command::new("sh")
        .arg("-c")
        .arg("find . | cpio -o -H newc --quiet | gzip -1 > \"$0\"")
        .arg(&archive)
        .current_dir(&stage)
        .status()?;
    if !status.success() {
        bail!("cpio could not write {}", archive.display());
    }
    Ok(())
}

fn make_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn which(command: &str) -> Result<PathBuf> {
    ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(command))
        .find(|p| p.exists())
        .with_context(|| format!("{command} is not installed"))
}

/// The initramfs's init (busybox sh): the modules, the overlay root, then the job.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in /modules/*.ko; do insmod "$m" || echo "xtask-guest: insmod $m failed"; done
mkdir -p /lower /rw /newroot
fail() { echo "xtask-guest: $*"; echo "xtask-guest-status: 125"; echo o > /proc/sysrq-trigger; sleep 60; }
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower || fail "cannot mount the host's root"
mount -t tmpfs tmpfs /rw; mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot || fail "cannot mount the overlay"
mkdir -p /newroot/usr/lib/modules /newroot/xtask-job
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 modules /newroot/usr/lib/modules || fail "cannot mount the modules"
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 job /newroot/xtask-job || fail "cannot mount the job"
umount /proc /sys /dev
exec switch_root /newroot /bin/sh /xtask-job/job.sh
"#;

/// What a guest run reported.
pub struct GuestRun {
    pub release: String,
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    /// Every binary exited, and with success.
    pub binaries_ok: bool,
    /// The failed tests' names and the binaries that did not finish.
    pub failures: Vec<String>,
    /// What the tests measured: their output lines that start with `figure: `.
    pub figures: Vec<String>,
}

/// Boots `fetched` and runs every test binary in it, as root, one test at a time.
fn run_guest(
    kernel: &Kernel,
    fetched: &Fetched,
    binaries: &[(String, PathBuf)],
    filter: &Option<String>,
) -> Result<GuestRun> {
    let dir = cache_dir().join(kernel.label);
    let job = dir.join("job");
    let _ = fs::remove_dir_all(&job);
    fs::create_dir_all(&job)?;
    let mut script = String::from(JOB_PREAMBLE);
    script.push_str(&format!(
        "cd {}\n",
        shell_quote(&root().display().to_string())
    ));
    // A filter that names a test binary runs that binary alone; another filters test names.
    let binary_only = filter
        .as_deref()
        .filter(|f| binaries.iter().any(|(n, _)| n == f));
    let filter = if binary_only.is_some() { &None } else { filter };
    for (name, path) in binaries {
        if binary_only.is_some_and(|b| b != name) {
            continue;
        }
        // The developer's filter, else the tests this binary runs in the guest (none: all).
        let only = GUEST_TESTS
            .iter()
            .find(|(n, _)| n == name)
            .map_or(&[][..], |(_, only)| *only);
        let filters: Vec<String> = match filter {
            Some(f) => vec![shell_quote(f)],
            None => only.iter().map(|t| shell_quote(t)).collect(),
        };
        script.push_str(&format!(
            "echo 'xtask-guest-binary: {name}'\n{} --include-ignored --test-threads=1 --color never --show-output {}\necho \"xtask-guest-binary-status: {name} $?\"\n",
            path.display(),
            filters.join(" "),
        ));
    }
    script.push_str("echo 'xtask-guest-status: 0'\nsync\necho o > /proc/sysrq-trigger\nsleep 60\n");
    fs::write(job.join("job.sh"), script)?;

    let console = dir.join("console.log");
    eprintln!(
        "xtask: booting {} ({}, {}) under QEMU; console in {}",
        kernel.label,
        kernel.what,
        fetched.release,
        console.display()
    );
    let share = |path: &Path, tag: &str| {
        format!(
            "local,path={},mount_tag={tag},security_model=none,readonly=on,multidevs=remap",
            path.display()
        )
    };
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-machine", "q35,accel=tcg", "-cpu", "max", "-smp", "2"])
        .args(["-m", "4096", "-nographic", "-no-reboot", "-nodefaults"])
        .args(["-serial", "stdio", "-kernel"])
        .arg(&fetched.vmlinuz)
        .arg("-initrd")
        .arg(&fetched.initramfs)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .arg("-virtfs")
        .arg(share(Path::new("/"), "hostroot"))
        .arg("-virtfs")
        .arg(share(&fetched.modules, "modules"))
        .arg("-virtfs")
        .arg(share(&job, "job"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start qemu-system-x86_64")?;
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        let started = Instant::now();
        while started.elapsed() < GUEST_TIMEOUT {
            std::thread::sleep(Duration::from_secs(1));
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return false;
            }
        }
        kill_now(pid);
        true
    });
    let mut log = fs::File::create(&console)?;
    let mut run = GuestRun {
        release: fetched.release.clone(),
        passed: 0,
        failed: 0,
        ignored: 0,
        binaries_ok: true,
        failures: Vec::new(),
        figures: Vec::new(),
    };
    let mut finished = false;
    let mut current = String::new();
    let stdout = child.stdout.take().context("qemu's console")?;
    for line in BufReader::new(stdout).split(b'\n') {
        let line = String::from_utf8_lossy(&line?)
            .trim_end_matches('\r')
            .to_string();
        writeln!(log, "{line}")?;
        if let Some(name) = line.strip_prefix("xtask-guest-binary: ") {
            current = name.trim().to_string();
            eprintln!("xtask: [{}] {current}", kernel.label);
        } else if let Some(rest) = line.strip_prefix("xtask-guest-binary-status: ") {
            if rest.split_whitespace().nth(1) != Some("0") {
                run.binaries_ok = false;
                run.failures.push(format!("{current}: exited with {rest}"));
            }
        } else if line.starts_with("xtask-guest-status:") {
            finished = true;
        } else if let Some(figure) = line.strip_prefix("figure: ") {
            run.figures.push(figure.to_string());
        } else if line.starts_with("xtask-guest:") {
            eprintln!("{line}");
        } else if let Some(rest) = line.strip_prefix("test result: ") {
            let counts = libtest_counts(rest);
            run.passed += counts.passed;
            run.failed += counts.failed;
            run.ignored += counts.ignored;
        } else if line.starts_with("test ") && line.ends_with("... FAILED") {
            run.failures.push(format!(
                "{current}: {}",
                line.trim_start_matches("test ")
                    .trim_end_matches(" ... FAILED")
            ));
        }
        if line.starts_with("test ") && (line.ends_with(" ok") || line.ends_with("FAILED")) {
            eprintln!("xtask: [{}] {line}", kernel.label);
        }
    }
    let _ = child.wait();
    let timed_out = watchdog.join().unwrap_or(false);
    if timed_out {
        bail!(
            "the guest did not finish within {} minutes (console: {})",
            GUEST_TIMEOUT.as_secs() / 60,
            console.display()
        );
    }
    if !finished {
        bail!(
            "the guest stopped before its job ended (console: {})",
            console.display()
        );
    }
    Ok(run)
}

fn kill_now(pid: u32) {
    let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The job's start, in the guest's real root: the filesystems, the modules, loopback. `/tmp`
/// stays the overlay's (writable, in the guest's memory): a checkout under /tmp stays visible.
const JOB_PREAMBLE: &str = r#"mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /dev/pts; mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run; mkdir -p /run/netns
mount -t bpf bpf /sys/fs/bpf; mount -t cgroup2 cgroup2 /sys/fs/cgroup
export PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
export SLUICE_GUEST=1
ulimit -n 65536
ip link set lo up; hostname sluice-guest
for m in veth bridge bonding 8021q sch_ingress cls_bpf; do modprobe "$m" || echo "xtask-guest: modprobe $m failed"; done
echo "xtask-guest-kernel: $(uname -r)"
"#;
