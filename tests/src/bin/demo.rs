//! `cargo xtask demo`: Sluice on a small network of namespaces it builds and removes itself.
//! A client, a node running `sluice run --config examples/demo.yaml`, three backends serving
//! their names over HTTP. Ctrl-C at any point cleans up.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use sluice_tests::{lab::http_get, lab::Lab, require_root, sluice_bin};

fn step(title: &str) {
    println!("\n\x1b[1m== {title}\x1b[0m");
}

fn requests(
    lab: &Lab,
    vip: SocketAddr,
    n: usize,
    stop: &AtomicBool,
) -> Result<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::new();
    let mut line = String::new();
    for i in 1..=n {
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        let name = http_get(&lab.client, vip).unwrap_or_else(|e| format!("error: {e}"));
        line.push_str(&format!("#{i:<2} → {name:<4}  "));
        if i % 6 == 0 {
            println!("  {line}");
            line.clear();
        }
        *counts.entry(name).or_insert(0) += 1;
    }
    if !line.is_empty() {
        println!("  {line}");
    }
    println!("  answers per backend: {counts:?}");
    Ok(counts)
}

fn main() -> Result<()> {
    require_root();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let config = root.join("examples/demo.yaml");
    let _ = std::fs::remove_dir_all("/tmp/sluice-demo");

    step("Building the network: client ── node ── backends b1, b2, b3 (namespaces sl<pid>-*)");
    let lab = Lab::new(3);
    let switches: Vec<_> = (1..=3).map(|i| lab.serve_with_http(i).1).collect();
    println!("  each backend answers HTTP on :8081 with its name");

    step(&format!(
        "Starting: sluice run --config {}",
        config.display()
    ));
    let bin = sluice_bin();
    let mut sluice = lab
        .node
        .spawn(&[&bin, "run", "--config", config.to_str().unwrap()]);
    sluice.wait_for_stderr("ready");
    println!(
        "  {}",
        std::fs::read_to_string(&config)?
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    let vip: SocketAddr = "198.18.1.100:80".parse()?;
    println!(
        "  service web got {} (the pool's lowest free address)",
        vip.ip()
    );

    step("30 HTTP requests from the client to http://198.18.1.100/");
    requests(&lab, vip, 30, &stop)?;

    step("sluice inspect --config examples/demo.yaml");
    let out = std::process::Command::new("nsenter")
        .args(["--target", &sluice.pid().to_string(), "--mount", "--net"])
        .args([
            bin.as_str(),
            "inspect",
            "--config",
            config.to_str().unwrap(),
        ])
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));

    step("sluice trace --client 198.18.1.2 (one request; why did my packet go there?)");
    let mut trace = std::process::Command::new("nsenter")
        .args(["--target", &sluice.pid().to_string(), "--mount", "--net"])
        .args([bin.as_str(), "trace", "--client", "198.18.1.2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    // Forget the VIP's MAC, so the trace shows the ARP answer too.
    lab.client.ip(&["neigh", "flush", "dev", "c0"]);
    let _ = http_get(&lab.client, vip);
    std::thread::sleep(Duration::from_millis(500));
    unsafe { libc::kill(trace.id() as i32, libc::SIGINT) };
    let mut text = String::new();
    use std::io::Read;
    trace.stdout.take().unwrap().read_to_string(&mut text)?;
    trace.wait()?;
    for line in text.lines() {
        println!("  {line}");
    }

    step("Stopping backend b2's web server");
    switches[1].set(false);
    let started = Instant::now();
    loop {
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        let probe = http_get(&lab.client, vip);
        let metrics = lab.node.run(|| {
            use std::io::{Read, Write};
            let mut conn = std::net::TcpStream::connect("127.0.0.1:9120").ok()?;
            conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
            let mut text = String::new();
            conn.read_to_string(&mut text).ok()?;
            Some(text)
        });
        let _ = probe;
        if metrics.is_some_and(|m| m.contains("backend=\"198.18.12.2:8081\"} 0")) {
            break;
        }
        if started.elapsed() > Duration::from_secs(15) {
            bail!("the health check did not take b2 out");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "  the HTTP health check (fall 2 × 0.5 s) took b2 out after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    step("30 more requests: b2 gets none");
    requests(&lab, vip, 30, &stop)?;

    step("Cleaning up");
    let status = sluice.stop(libc::SIGTERM);
    println!("  sluice exited: {status}; namespaces deleted");
    drop(lab);
    let _ = std::fs::remove_dir_all("/tmp/sluice-demo");
    Ok(())
}
