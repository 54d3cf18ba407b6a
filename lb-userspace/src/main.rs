//! The `sluice` binary: parses the command line, sets up logging, and hands over to the library.
//! Errors become a message on stderr and a non-zero exit code here, nowhere else.

use std::{collections::BTreeMap, path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::{
    config::L2Announcement,
    dataplane::{self, Dataplane, DataplaneOptions, L2Vip, PinnedView},
};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Sluice: allocate, attract and balance service traffic, in XDP"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Answer ARP (IPv4) and NDP (IPv6) for service IPs, each on the interface named with it only,
    /// until interrupted (SIGINT/SIGTERM). Stopping detaches the program: the answers stop.
    Announce {
        /// A service IP and the one interface to answer for it on: IP@INTERFACE. Repeatable.
        #[arg(long = "vip", value_name = "IP@INTERFACE", required = true)]
        vips: Vec<String>,
        /// Also attach to this interface without announcing anything there (the program then
        /// passes every frame on it untouched). Repeatable.
        #[arg(long = "attach", value_name = "INTERFACE")]
        attach: Vec<String>,
        /// Where the maps are pinned (must be on a bpffs).
        #[arg(long, default_value_os_t = dataplane::default_pin_dir())]
        pin_dir: PathBuf,
    },
    /// Balance services in XDP on the interfaces named, until interrupted (SIGINT/SIGTERM):
    /// Maglev over the backends, a connection table, DNAT in, reverse NAT out. Optionally
    /// answer ARP/NDP for the VIPs too (--vip). Stopping detaches everything.
    Balance {
        /// VIP:PORT/tcp|udp=BACKEND:PORT[*WEIGHT],... e.g.
        /// 198.51.100.10:80/tcp=10.0.0.11:8080,10.0.0.12:8080 or
        /// [2001:db8::10]:53/udp=[2001:db8::53]:53. Repeatable.
        #[arg(long = "service", value_name = "SPEC", required = true)]
        services: Vec<String>,
        /// An interface to balance traffic arriving on (and to rewrite replies leaving by).
        /// Repeatable.
        #[arg(long = "attach", value_name = "INTERFACE")]
        attach: Vec<String>,
        /// Also answer ARP/NDP for this IP on this interface only: IP@INTERFACE. Repeatable.
        #[arg(long = "vip", value_name = "IP@INTERFACE")]
        vips: Vec<String>,
        /// Also redirect flows into this veth in XDP: only when its peer runs an XDP program (a
        /// veth drops redirected frames otherwise). Interfaces that are not veths are always
        /// redirect targets; for the others the kernel forwards the rewritten packets. Repeatable.
        #[arg(long = "redirect-veth", value_name = "INTERFACE")]
        redirect_veths: Vec<String>,
        /// M, the Maglev table size: a prime, at least 100 × backends for shares within 1 %.
        #[arg(long, default_value_t = lb_userspace::maglev::DEFAULT_TABLE_SIZE)]
        maglev_table_size: u32,
        /// Where the maps are pinned (must be on a bpffs).
        #[arg(long, default_value_os_t = dataplane::default_pin_dir())]
        pin_dir: PathBuf,
    },
    /// Show what the data plane holds, from its pinned maps (daemon running or not).
    Inspect {
        /// Where the maps are pinned.
        #[arg(long, default_value_os_t = dataplane::default_pin_dir())]
        pin_dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Announce {
            vips,
            attach,
            pin_dir,
        } => serve(
            &vips,
            &[],
            &attach,
            &[],
            pin_dir,
            lb_userspace::maglev::DEFAULT_TABLE_SIZE,
        ),
        Command::Balance {
            services,
            attach,
            vips,
            redirect_veths,
            maglev_table_size,
            pin_dir,
        } => {
            if attach.is_empty() && vips.is_empty() {
                Err(anyhow::anyhow!(
                    "--attach: name at least one interface to balance on"
                ))
            } else {
                serve(
                    &vips,
                    &services,
                    &attach,
                    &redirect_veths,
                    pin_dir,
                    maglev_table_size,
                )
            }
        }
        Command::Inspect { pin_dir, json } => inspect(pin_dir, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sluice: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn serve(
    vip_args: &[String],
    service_args: &[String],
    attach_args: &[String],
    redirect_veths: &[String],
    pin_dir: PathBuf,
    maglev_table_size: u32,
) -> Result<()> {
    // Validate everything before touching the kernel.
    let announcements = vip_args
        .iter()
        .map(|text| L2Announcement::parse("--vip", text))
        .collect::<Result<Vec<_>, _>>()?;
    let services = service_args
        .iter()
        .map(|text| lb_userspace::config::parse_service("--service", text))
        .collect::<Result<Vec<_>, _>>()?;
    for (service, backends) in &services {
        dataplane::validate_service(service, backends, maglev_table_size)?;
    }
    let mut seen = std::collections::BTreeSet::new();
    for (service, _) in &services {
        if !seen.insert(*service) {
            anyhow::bail!("--service: {service} is given twice");
        }
    }
    for name in attach_args {
        lb_userspace::config::validate_interface_name("--attach", name)?;
    }
    let mut names: Vec<&str> = announcements.iter().map(|a| a.interface.as_str()).collect();
    names.extend(attach_args.iter().map(String::as_str));
    names.sort_unstable();
    names.dedup();
    let interfaces = names
        .iter()
        .map(|name| dataplane::interface(name))
        .collect::<Result<Vec<_>, _>>()?;
    let by_name: BTreeMap<&str, &dataplane::Interface> =
        interfaces.iter().map(|i| (i.name.as_str(), i)).collect();
    let vips: Vec<L2Vip> = announcements
        .iter()
        .map(|a| {
            let iface = by_name[a.interface.as_str()];
            L2Vip {
                ifindex: iface.ifindex,
                ip: a.ip,
                mac: iface.mac,
            }
        })
        .collect();

    // Block the signals we wait for before anything is attached, so none is missed.
    let signals = SignalSet::block(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP])?;

    let mut dp = Dataplane::load(&DataplaneOptions {
        pin_dir: Some(pin_dir),
        maglev_table_size,
        ..DataplaneOptions::default()
    })?;
    // Services left pinned by an earlier run that are not asked for now: removed.
    for (stale, _) in dp.services() {
        if !services.iter().any(|(s, _)| *s == stale) {
            dp.remove_service(&stale)?;
        }
    }
    for (service, backends) in &services {
        dp.upsert_service(*service, backends)?;
    }
    let redirect = redirect_veths
        .iter()
        .map(|name| {
            lb_userspace::config::validate_interface_name("--redirect-veth", name)?;
            Ok(dataplane::interface(name)?)
        })
        .collect::<Result<Vec<_>>>()?;
    dp.attach_all(&interfaces)?;
    for iface in &redirect {
        dp.allow_redirect(iface.ifindex)?;
    }
    dp.set_l2_vips(&vips)?;
    for a in &announcements {
        tracing::info!(event = "l2Announcing", ip = %a.ip, interface = %a.interface);
    }
    eprintln!(
        "sluice: announcing {} address(es), balancing {} service(s); ready",
        vips.len(),
        services.len()
    );

    loop {
        let signal = signals.wait()?;
        if signal == libc::SIGHUP {
            tracing::info!(
                event = "signalIgnored",
                signal = "SIGHUP",
                reason = "nothing to reload in announce mode"
            );
            continue;
        }
        tracing::info!(event = "shuttingDown", signal);
        break;
    }
    let stats = dp.stats()?;
    dp.set_l2_vips(&[])?;
    for (service, _) in dp.services() {
        dp.remove_service(&service)?;
    }
    tracing::info!(
        event = "stopped",
        arp_replies = stats.arp_replies,
        na_replies = stats.na_replies,
        passed = stats.passed,
        malformed = stats.malformed
    );
    Ok(())
}

fn inspect(pin_dir: PathBuf, json: bool) -> Result<()> {
    let view = PinnedView::open(&pin_dir)
        .with_context(|| format!("inspecting the data plane pinned at {}", pin_dir.display()))?;
    let vips = view.l2_vips()?;
    let stats = view.stats()?;
    let services = view.services()?;
    let flows = view.flow_count();
    if json {
        let services: Vec<_> = services
            .iter()
            .map(|s| {
                serde_json::json!({
                    "service": s.service.to_string(),
                    "packets": s.traffic.packets,
                    "bytes": s.traffic.bytes,
                    "newFlows": s.traffic.new_flows,
                    "backends": s.backends.iter().map(|(b, t)| serde_json::json!({
                        "backend": b.maglev_key(),
                        "weight": b.weight,
                        "packets": t.packets,
                        "bytes": t.bytes,
                        "newFlows": t.new_flows,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let vips: Vec<_> = vips
            .iter()
            .map(|v| {
                serde_json::json!({
                    "ifindex": v.ifindex,
                    "interface": dataplane::interface_name(v.ifindex),
                    "ip": v.ip.to_string(),
                    "mac": dataplane::format_mac(&v.mac),
                })
            })
            .collect();
        let doc = serde_json::json!({
            "l2Vips": vips,
            "services": services,
            "trackedFlows": flows,
            "counters": {
                "arpReplies": stats.arp_replies,
                "naReplies": stats.na_replies,
                "passed": stats.passed,
                "malformed": stats.malformed,
                "forwarded": stats.lb_forwarded,
                "forwardedViaKernel": stats.lb_to_kernel,
                "droppedNoBackend": stats.lb_no_backend,
                "reverseNat": stats.reverse_nat,
            }
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!("L2 VIPs (answered by ARP/NDP on these interfaces only)");
    println!("  {:<16} {:<8} {:<40} MAC", "INTERFACE", "IFINDEX", "IP");
    if vips.is_empty() {
        println!("  (none)");
    }
    for v in &vips {
        let name = dataplane::interface_name(v.ifindex).unwrap_or_else(|| "?".to_string());
        println!(
            "  {:<16} {:<8} {:<40} {}",
            name,
            v.ifindex,
            v.ip,
            dataplane::format_mac(&v.mac)
        );
    }
    println!();
    println!("Services ({flows} tracked flows)");
    if services.is_empty() {
        println!("  (none)");
    }
    for s in &services {
        println!(
            "  {:<44} packets {:<10} bytes {:<12} new flows {}",
            s.service.to_string(),
            s.traffic.packets,
            s.traffic.bytes,
            s.traffic.new_flows
        );
        if s.backends.is_empty() {
            println!("    (no backend: new flows are dropped)");
        }
        for (b, t) in &s.backends {
            println!(
                "    → {:<40} packets {:<10} bytes {:<12} new flows {}{}",
                b.maglev_key(),
                t.packets,
                t.bytes,
                t.new_flows,
                if b.weight == 1 {
                    String::new()
                } else {
                    format!("  (weight {})", b.weight)
                }
            );
        }
    }
    println!();
    println!("Counters (all CPUs)");
    println!("  arp replies  {}", stats.arp_replies);
    println!("  na replies   {}", stats.na_replies);
    println!("  passed       {}", stats.passed);
    println!("  malformed    {}", stats.malformed);
    println!("  forwarded    {}", stats.lb_forwarded);
    println!("  via kernel   {}", stats.lb_to_kernel);
    println!("  no backend   {}", stats.lb_no_backend);
    println!("  reverse NAT  {}", stats.reverse_nat);
    Ok(())
}

/// Signals blocked for this process and waited for synchronously (no handler runs).
struct SignalSet(libc::sigset_t);

impl SignalSet {
    fn block(signals: &[libc::c_int]) -> Result<Self> {
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        unsafe { libc::sigemptyset(&mut set) };
        for signal in signals {
            unsafe { libc::sigaddset(&mut set, *signal) };
        }
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            anyhow::bail!(
                "cannot block signals: {}",
                std::io::Error::from_raw_os_error(rc)
            );
        }
        Ok(Self(set))
    }

    fn wait(&self) -> Result<libc::c_int> {
        let mut signal: libc::c_int = 0;
        let rc = unsafe { libc::sigwait(&self.0, &mut signal) };
        if rc != 0 {
            anyhow::bail!("sigwait failed: {}", std::io::Error::from_raw_os_error(rc));
        }
        Ok(signal)
    }
}
