//! The control plane's part of `cargo xtask bench`: how `sluice validate` (parse, validate,
//! allocate every service an IP) and the Maglev tables `sluice run` then builds grow from 1,000
//! to 10,000 services (one pool, two backends each). No root needed; nothing is loaded.

use std::time::Instant;

use anyhow::Result;
use lb_userspace::maglev;

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
    Ok(())
}
