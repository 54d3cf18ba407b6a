//! The control plane's part of `cargo xtask bench`: how `sluice validate` (parse, validate,
//! allocate every service an IP), the Maglev tables `sluice run` then builds, and writing every
//! service into the data plane's maps grow from 1,000 to 10,000 services (one pool, two backends
//! each). The maps part needs root (it loads the data plane, attached nowhere).

use std::{collections::BTreeMap, net::IpAddr, time::Instant};

use anyhow::Result;
use lb_userspace::{
    dataplane::{Backend, Dataplane, DataplaneOptions, Protocol, Service},
    maglev,
};

const SIZES: [usize; 4] = [1_000, 2_500, 5_000, 10_000];
/// The default Maglev table size.
const TABLE_SIZE: u32 = 16_381;

fn config(services: usize) -> String {
    let mut text = String::from("pools:\n- name: big\n  addresses: [10.0.0.0/16]\nservices:\n");
    for i in 0..services {
        let (a, b) = (i % 250 + 1, (i + 1) % 250 + 1);
        let net = (i / 250) % 250;
        text.push_str(&format!(
            "- name: s{i}\n  ports: [{{port: 80, targetPort: 8080}}]\n  backends: [{{ip: 192.168.{net}.{a}}}, {{ip: 192.168.{net}.{b}}}]\n"
        ));
    }
    text
}

fn main() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("sluice-control-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!("Control plane, one CPU: validate = parse + check + allocate (what `sluice validate` does);");
    println!("tables = one Maglev table (M = {TABLE_SIZE}) per service, as `sluice run` builds them at start");
    println!(
        "{:>9} {:>12} {:>14} {:>12} {:>14}",
        "services", "validate", "per service", "tables", "per service"
    );
    let mut per_service: Vec<f64> = Vec::new();
    for n in SIZES {
        let path = dir.join(format!("{n}.yaml"));
        let state = dir.join(format!("{n}-state.json"));
        std::fs::write(
            &path,
            format!(
                "dataplane:\n  stateFile: {}\n{}",
                state.display(),
                config(n)
            ),
        )?;
        let started = Instant::now();
        lb_userspace::standalone::validate(std::slice::from_ref(&path))?;
        let validate = started.elapsed().as_secs_f64();
        let started = Instant::now();
        for i in 0..n {
            let backends = [
                maglev::Backend {
                    key: format!("192.168.{}.{}:8080", (i / 250) % 250, i % 250 + 1),
                    weight: 1,
                },
                maglev::Backend {
                    key: format!("192.168.{}.{}:8080", (i / 250) % 250, (i + 1) % 250 + 1),
                    weight: 1,
                },
            ];
            maglev::build(&backends, TABLE_SIZE)?;
        }
        let tables = started.elapsed().as_secs_f64();
        let per = validate / n as f64 * 1e6;
        println!(
            "{n:>9} {:>10.3} s {:>11.1} µs {:>10.3} s {:>11.1} µs",
            validate,
            per,
            tables,
            tables / n as f64 * 1e6
        );
        per_service.push(per);
    }
    if let (Some(first), Some(last)) = (per_service.first(), per_service.last()) {
        println!(
            "validate per service at 10,000 / at 1,000: {:.2}× (1.0 is linear growth)",
            last / first
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    if unsafe { libc::geteuid() } == 0 {
        maps()?;
    } else {
        println!("(not root: the maps part is skipped)");
    }
    Ok(())
}

fn backend(i: usize, j: usize) -> Backend {
    let host = (i + j) % 250 + 1;
    Backend {
        ip: IpAddr::from([192, 168, ((i / 250) % 250) as u8, host as u8]),
        port: 8080,
        weight: 1,
    }
}

fn services(n: usize) -> BTreeMap<Service, Vec<Backend>> {
    (0..n)
        .map(|i| {
            let service = Service {
                vip: IpAddr::from([10, 0, (i / 256) as u8, (i % 256) as u8]),
                port: 80,
                protocol: Protocol::Tcp,
            };
            (service, vec![backend(i, 0), backend(i, 1)])
        })
        .collect()
}

/// Peak resident memory of this process so far, in MB.
fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Every service written into a freshly loaded data plane (tables built on every core, each
/// written through one mapping), then one service's backend list changed.
fn maps() -> Result<()> {
    println!();
    println!(
        "Data plane maps, as `sluice run` and the speaker fill them (tables built on {} cores):",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:>9} {:>12} {:>14} {:>16} {:>12}",
        "services", "write all", "per service", "one change", "peak RSS"
    );
    for n in SIZES {
        let mut dataplane = Dataplane::load(&DataplaneOptions {
            pin_dir: None,
            ..DataplaneOptions::default()
        })?;
        let mut wanted = services(n);
        let started = Instant::now();
        dataplane.sync(&[], &wanted, &[])?;
        let all = started.elapsed().as_secs_f64();
        let (service, backends) = wanted.iter_mut().nth(n / 2).expect("n > 0");
        backends[1] = backend(n / 2, 7);
        let started = Instant::now();
        dataplane.set_backends(service, backends)?;
        let one = started.elapsed().as_secs_f64();
        println!(
            "{n:>9} {:>10.3} s {:>11.1} µs {:>13.2} ms {:>9.0} MB",
            all,
            all / n as f64 * 1e6,
            one * 1e3,
            peak_rss_mb()
        );
    }
    Ok(())
}
