//! `cargo xtask bench e2e`: packets per second through a node core with the shared end-to-end
//! bench (`../shared/tools/e2e-bench`, or `E2E_BENCH_DIR`), Sluice as its project path, beside
//! iptables DNAT and the minimal XDP forwarders; then each XDP program's own cost in place
//! (`kernel.bpf_stats_enabled`: run_time_ns / run_cnt of the programs while traffic flows).
//!
//! The second figure is the one to compare changes by: this VM's slow phases slow the whole
//! packet path, the first figure with it, while a program's own ns per packet moves much less.

use std::{
    collections::BTreeMap,
    env, fs,
    path::PathBuf,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{build_release_sluice, root};

/// The configuration `sluice run` gets inside the bench's node namespace (its README's
/// variables: the VIP, the backend, the client-facing and backend-facing veths).
const CONFIG: &str = "\
dataplane:
  interfaces: [n-g]
  redirectVeths: [n-b]
  pinDir: /sys/fs/bpf/sluice-e2e-bench
  stateFile: STATE
  metricsAddress: 127.0.0.1:9120
pools: [{name: e2e, addresses: [10.77.9.0/24]}]
services:
- name: bench
  ip: 10.77.9.1
  ports: [{port: 80, protocol: UDP, targetPort: 8080}]
  backends: [{ip: 10.77.1.2}]
";

/// [`CONFIG`] with its backend on another host: this node (10.77.1.1 on the backend side)
/// tunnels every flow to the backend's namespace as if it were another node (its sink counts
/// the IPIP frames as "other": the check is off for this path).
fn tunnel_config() -> String {
    CONFIG
        .replace(
            "  metricsAddress: 127.0.0.1:9120\n",
            "  metricsAddress: 127.0.0.1:9120\n  tunnels: {addresses: [10.77.1.1], nodes: [10.77.1.2]}\n",
        )
        .replace(
            "backends: [{ip: 10.77.1.2}]",
            "backends: [{ip: 10.244.7.2, node: 10.77.1.2}]",
        )
}

/// Programs whose cost in place is reported, in this order.
const PROGRAMS: &[(&str, &str)] = &[
    ("xdp_fwd", "xdp-fwd: the minimal XDP forwarder"),
    ("sluice_ingress", "sluice: the ingress program"),
    ("xdp_sink", "the bench's sink (counts and drops)"),
];

pub fn bench_e2e() -> Result<()> {
    let dir = env::var_os("E2E_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared/tools/e2e-bench"));
    let script = dir.join("run.sh");
    if !script.exists() {
        bail!(
            "the end-to-end bench is not at {} (set E2E_BENCH_DIR to the folder holding run.sh)",
            dir.display()
        );
    }
    build_release_sluice()?;
    let work = env::temp_dir().join("sluice-e2e-bench");
    fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let state = work.join("allocations.json");
    let config = work.join("sluice.yaml");
    fs::write(
        &config,
        CONFIG.replace("STATE", &state.display().to_string()),
    )?;
    let tunnel_path = work.join("sluice-tunnel.yaml");
    fs::write(
        &tunnel_path,
        tunnel_config().replace("STATE", &state.display().to_string()),
    )?;
    let sluice = root().join("target/release/sluice");
    let bench_with = |config: &PathBuf, paths: &str, reps: &str| {
        let mut cmd = Command::new("bash");
        cmd.arg(&script)
            .env("E2E_PROJECT_NAME", "sluice")
            .env(
                "E2E_PROJECT_CMD",
                format!(
                    "exec {} run --config {}",
                    sluice.display(),
                    config.display()
                ),
            )
            .env("E2E_PROJECT_READY", "curl -sf http://127.0.0.1:9120/readyz")
            .env("E2E_PROJECT_STOP", format!("rm -f {}", state.display()))
            .env("E2E_PATHS", paths)
            .env("E2E_REPS", reps);
        cmd
    };
    let bench = |paths: &str, reps: &str| bench_with(&config, paths, reps);

    println!("== packets per second through the node's core (E2E_PATHS, E2E_REPS to change)");
    let paths = env::var("E2E_PATHS").unwrap_or_else(|_| "iptables xdp-fwd xdp-fib sluice".into());
    let reps = env::var("E2E_REPS").unwrap_or_else(|_| "3".into());
    let out = bench(&paths, &reps)
        .stderr(std::process::Stdio::piped())
        .output()
        .context("running the end-to-end bench")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprint!("{stderr}");
    if !out.status.success() {
        // Some machines refuse BPF_PROG_TEST_RUN with live frames (the generator's way of
        // sending): that is the machine, not Sluice; say so in one line and stop cleanly.
        if stderr.contains("live frames): Operation not permitted") {
            println!("bench e2e: this machine refuses BPF_PROG_TEST_RUN with live frames (EPERM): no end-to-end figures here");
            return Ok(());
        }
        bail!("the end-to-end bench failed: {}", out.status);
    }

    println!("\n== each XDP program's own cost in place (bpf_stats; one more round, stats on)");
    let stats = BpfStats::enable()?;
    let windows = costs_in_place(&stats, bench("xdp-fwd sluice", "2"))?;
    let median = |name: &str| median_of(&windows, name);
    for (name, what) in PROGRAMS {
        match median(name) {
            Some(ns) => println!(
                "{what:<40} {ns:6.1} ns per packet ({} windows of 2 s)",
                windows[*name].len()
            ),
            None => println!("{what:<40}      - (no window with traffic)"),
        }
    }
    if let (Some(fwd), Some(ours)) = (median("xdp_fwd"), median("sluice_ingress")) {
        println!(
            "sluice − xdp-fwd: {:.1} ns per packet (both include bpf_stats' own ~40 ns: compare differences)",
            ours - fwd
        );
    }

    println!(
        "\n== cluster-wide balancing: the ingress program's own cost per packet, its backend here \
         (DNAT) or on another node (IPIP), rounds interleaved (bpf_stats)"
    );
    let (mut local, mut tunnelled) = (BTreeMap::new(), BTreeMap::new());
    for _ in 0..2 {
        for (into, config) in [(&mut local, &config), (&mut tunnelled, &tunnel_path)] {
            let windows = costs_in_place(&stats, bench_with(config, "sluice", "1"))?;
            for (name, v) in windows {
                into.entry(name).or_insert_with(Vec::new).extend(v);
            }
        }
    }
    drop(stats);
    let (here, there) = (
        median_of(&local, "sluice_ingress"),
        median_of(&tunnelled, "sluice_ingress"),
    );
    match (here, there) {
        (Some(here), Some(there)) => println!(
            "backend here: {here:.1} ns per packet; on another node: {there:.1} ns ({:.2}×; both \
             include bpf_stats' own ~40 ns, so the programs' own ratio is higher: compare the \
             difference, {:.1} ns, with xdp-bench's)",
            there / here,
            there - here
        ),
        _ => println!("(no window with traffic)"),
    }
    Ok(())
}

/// Runs the bench `command` (its check off, its output hidden) with run statistics on, and
/// returns each program's ns per packet over 2-second windows with traffic all through.
fn costs_in_place(stats: &BpfStats, mut command: Command) -> Result<BTreeMap<String, Vec<f64>>> {
    let mut child = command
        .env("E2E_CHECK", "0")
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start the end-to-end bench")?;
    let mut previous = stats.sample();
    let mut windows: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    while child.try_wait()?.is_none() {
        thread::sleep(Duration::from_secs(2));
        let now = stats.sample();
        for (id, (name, time, count)) in &now {
            if let Some((_, time0, count0)) = previous.get(id) {
                // Only windows with traffic all through (a second's worth at ~1 Mpps or more).
                if count - count0 >= 1_000_000 {
                    let ns = (time - time0) as f64 / (count - count0) as f64;
                    windows.entry(name.clone()).or_default().push(ns);
                }
            }
        }
        previous = now;
    }
    Ok(windows)
}

fn median_of(windows: &BTreeMap<String, Vec<f64>>, name: &str) -> Option<f64> {
    let mut v = windows.get(name)?.clone();
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// `kernel.bpf_stats_enabled` on while it lives, back to what it was after.
struct BpfStats {
    was: String,
}

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Result<Self> {
        let was = fs::read_to_string(SYSCTL)
            .with_context(|| format!("cannot read {SYSCTL}"))?
            .trim()
            .to_string();
        fs::write(SYSCTL, "1").with_context(|| format!("cannot write {SYSCTL} (root?)"))?;
        Ok(Self { was })
    }

    /// Every program with run statistics: id → (name, run_time_ns, run_cnt), from `bpftool
    /// prog show` ("ID: TYPE  name NAME  tag … run_time_ns T run_cnt N").
    fn sample(&self) -> BTreeMap<u32, (String, u64, u64)> {
        let Ok(out) = Command::new("bpftool").args(["prog", "show"]).output() else {
            return BTreeMap::new();
        };
        parse_prog_show(&String::from_utf8_lossy(&out.stdout))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(SYSCTL, &self.was);
    }
}

fn parse_prog_show(text: &str) -> BTreeMap<u32, (String, u64, u64)> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some((id, rest)) = line.split_once(':') else {
            continue;
        };
        let Ok(id) = id.trim().parse::<u32>() else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        let after = |key: &str| {
            words
                .iter()
                .position(|w| *w == key)
                .and_then(|i| words.get(i + 1))
                .copied()
        };
        let (Some(name), Some(time), Some(count)) =
            (after("name"), after("run_time_ns"), after("run_cnt"))
        else {
            continue;
        };
        if let (Ok(time), Ok(count)) = (time.parse(), count.parse()) {
            out.insert(id, (name.to_string(), time, count));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tunnel_config_is_the_bench_config_with_its_backend_on_another_host() {
        let c = tunnel_config();
        assert!(
            c.contains("tunnels: {addresses: [10.77.1.1], nodes: [10.77.1.2]}"),
            "{c}"
        );
        assert!(
            c.contains("backends: [{ip: 10.244.7.2, node: 10.77.1.2}]"),
            "{c}"
        );
    }

    #[test]
    fn prog_show_lines_with_run_statistics_are_read_and_others_skipped() {
        let text = "\
42: xdp  name sluice_ingress  tag 0123456789abcdef  gpl run_time_ns 1000 run_cnt 10
\tloaded_at 2026-11-28T13:00:00+0000  uid 0
43: xdp  name xdp_sink  tag fedcba9876543210  gpl
";
        let parsed = parse_prog_show(text);
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[&42], ("sluice_ingress".to_string(), 1000, 10));
    }
}
