//! `sluice controller` at scale, against the in-process fake API server (part of `cargo xtask
//! bench`): 10,000 LoadBalancer Services in 50 namespaces over 20 pools, none with a status.
//!
//! Prints, for the default write limit and for no limit: the time from the controller's start to
//! its watches' listing, to its first pass's plan, and to the last status written; then the time
//! from one new Service to its IP; the PATCH requests a restart sends with every status present
//! (0 expected); and the controller's peak RSS. Growth is shown from 1,000 to 10,000.
//!
//! `controller-bench [SERVICES]` runs one size, with the default limit only.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sluice_tests::{fakeapi::FakeApi, sluice_bin};

const NS: &str = "sluice-system";
const NAMESPACES: usize = 50;
const POOLS: usize = 20;

fn setup(api: &FakeApi, services: usize) -> Result<()> {
    for i in 0..NAMESPACES {
        api.create(
            "/api/v1/namespaces",
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": format!("team-{i}")}}),
        )
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    api.create(
        "/api/v1/namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
    )
    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    for p in 0..POOLS {
        api.create(
            &format!("/apis/sluice.dev/v1alpha1/namespaces/{NS}/ipaddresspools"),
            json!({
                "apiVersion": "sluice.dev/v1alpha1", "kind": "IPAddressPool",
                "metadata": {"name": format!("pool-{p}")},
                "spec": {"addresses": [format!("10.{p}.0.0/20")]},
            }),
        )
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    for i in 0..services {
        create_service(api, i)?;
    }
    Ok(())
}

fn create_service(api: &FakeApi, i: usize) -> Result<()> {
    let ns = format!("team-{}", i % NAMESPACES);
    api.create(
        &format!("/api/v1/namespaces/{ns}/services"),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {
                "name": format!("svc-{i}"),
                "annotations": {"sluice.dev/address-pool": format!("pool-{}", i % POOLS)},
            },
            "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "protocol": "TCP"}]},
        }),
    )
    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(())
}

struct Controller {
    child: Child,
}

impl Controller {
    fn start(dir: &Path, api: &FakeApi, writes_per_second: u32, log: &Path) -> Result<Self> {
        let kubeconfig = dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig);
        let child = Command::new(sluice_bin())
            .args(["controller", "--namespace", NS, "--identity", "bench"])
            .args(["--metrics-address", "127.0.0.1:0"])
            .args(["--resync-seconds", "600"])
            .args(["--api-writes-per-second", &writes_per_second.to_string()])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info")
            .args(["--log-format", "json"])
            .env_remove("POD_NAMESPACE")
            .env_remove("POD_NAME")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .context("start sluice controller")?;
        Ok(Self { child })
    }

    fn peak_rss_mb(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    fn stop(mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn with_ip(api: &FakeApi) -> usize {
    api.count("/api/v1/services", |s| {
        s["status"]["loadBalancer"]["ingress"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
    })
}

fn patches(api: &FakeApi) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.starts_with("PATCH /api/v1/namespaces/") && r.contains("/services/"))
        .count()
}

/// Polls `f` every `every` until it holds.
fn wait(
    what: &str,
    within: Duration,
    every: Duration,
    mut f: impl FnMut() -> bool,
) -> Result<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        if f() {
            return Ok(started.elapsed());
        }
        std::thread::sleep(every);
    }
    bail!("timed out waiting for {what}")
}

struct Figures {
    synced: f64,
    planned_ms: f64,
    last_patch: f64,
    one_service_ms: f64,
    restart_patches: usize,
    rss_mb: f64,
}

fn run(services: usize, writes_per_second: u32) -> Result<Figures> {
    let dir = std::env::temp_dir().join(format!(
        "sluice-controller-bench-{}-{services}-{writes_per_second}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let api = FakeApi::start();
    setup(&api, services)?;
    let log = dir.join("controller.log");
    let started = Instant::now();
    let controller = Controller::start(&dir, &api, writes_per_second, &log)?;
    let log_has =
        |log: &Path, message: &str| std::fs::read_to_string(log).is_ok_and(|t| t.contains(message));
    let synced = wait(
        "the watches' listing",
        Duration::from_secs(120),
        Duration::from_millis(5),
        || log_has(&log, "watchesSynced"),
    )?
    .as_secs_f64();
    // (listing the fake API's Services holds its lock: not polled faster than this)
    wait(
        "every Service's IP",
        Duration::from_secs(600),
        Duration::from_millis(100),
        || with_ip(&api) == services,
    )?;
    let last_patch = started.elapsed().as_secs_f64();
    // One more Service, once the first pass is over (its last writes are pools' statuses):
    // time to its IP.
    wait(
        "the end of the first pass",
        Duration::from_secs(600),
        Duration::from_millis(20),
        || log_has(&log, "passWritten"),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let created = Instant::now();
    create_service(&api, services)?;
    let name = format!("svc-{services}");
    let ns = format!("team-{}", services % NAMESPACES);
    wait(
        "the new Service's IP",
        Duration::from_secs(60),
        Duration::from_millis(2),
        || {
            api.get(&format!("/api/v1/namespaces/{ns}/services/{name}"))
                .is_some_and(|s| {
                    s["status"]["loadBalancer"]["ingress"]
                        .as_array()
                        .is_some_and(|a| !a.is_empty())
                })
        },
    )?;
    let one_service_ms = created.elapsed().as_secs_f64() * 1e3;
    let mut rss_mb = controller.peak_rss_mb();
    controller.stop();
    let text = std::fs::read_to_string(&log)?;
    let planned_ms = text
        .lines()
        .filter(|l| l.contains("passWritten"))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["fields"]["planned_ms"].as_f64())
        .next()
        .unwrap_or(f64::NAN);

    // A restart with every status present writes none.
    let before = patches(&api);
    let log2 = dir.join("controller-restart.log");
    let controller = Controller::start(&dir, &api, writes_per_second, &log2)?;
    wait(
        "the restarted controller's watches",
        Duration::from_secs(120),
        Duration::from_millis(20),
        || log_has(&log2, "watchesSynced"),
    )?;
    std::thread::sleep(Duration::from_secs(3));
    let restart_patches = patches(&api) - before;
    rss_mb = rss_mb.max(controller.peak_rss_mb());
    controller.stop();
    if std::env::var_os("KEEP_LOGS").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(Figures {
        synced,
        planned_ms,
        last_patch,
        one_service_ms,
        restart_patches,
        rss_mb,
    })
}

fn main() -> Result<()> {
    let sizes: Vec<usize> = match std::env::args().nth(1) {
        Some(n) => vec![n.parse().context("SERVICES must be a number")?],
        None => vec![1_000, 10_000],
    };
    let default = lb_userspace::k8s::limit::DEFAULT_WRITES_PER_SECOND;
    println!(
        "sluice controller vs the fake API server: Services in {NAMESPACES} namespaces, {POOLS} pools, no statuses at start"
    );
    println!(
        "{:>9} {:>12} {:>9} {:>10} {:>11} {:>12} {:>10} {:>9}",
        "services", "writes/s", "listed", "1st plan", "last IP", "one more", "restart", "peak RSS"
    );
    let mut runs = vec![];
    for &n in &sizes {
        runs.push((n, default));
    }
    if sizes.len() > 1 {
        runs.push((*sizes.last().unwrap(), 0));
    }
    for (n, limit) in runs {
        let f = run(n, limit)?;
        println!(
            "{n:>9} {:>12} {:>7.2} s {:>7.0} ms {:>9.2} s {:>9.0} ms {:>4} PATCH {:>6.0} MB",
            if limit == 0 {
                "no limit".to_string()
            } else {
                limit.to_string()
            },
            f.synced,
            f.planned_ms,
            f.last_patch,
            f.one_service_ms,
            f.restart_patches,
            f.rss_mb
        );
    }
    println!("(listed: start → watches listed; last IP: start → every Service has its IP; one more: a new Service → its IP)");
    Ok(())
}
