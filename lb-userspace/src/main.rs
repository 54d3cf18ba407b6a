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
        } => announce(&vips, &attach, pin_dir),
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

fn announce(vip_args: &[String], attach_args: &[String], pin_dir: PathBuf) -> Result<()> {
    // Validate everything before touching the kernel.
    let announcements = vip_args
        .iter()
        .map(|text| L2Announcement::parse("--vip", text))
        .collect::<Result<Vec<_>, _>>()?;
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
        ..DataplaneOptions::default()
    })?;
    dp.attach_all(&interfaces)?;
    dp.set_l2_vips(&vips)?;
    for a in &announcements {
        tracing::info!(event = "l2Announcing", ip = %a.ip, interface = %a.interface);
    }
    eprintln!("sluice: announcing {} address(es); ready", vips.len());

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
    if json {
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
            "counters": {
                "arpReplies": stats.arp_replies,
                "naReplies": stats.na_replies,
                "passed": stats.passed,
                "malformed": stats.malformed,
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
    println!("Counters (all CPUs)");
    println!("  arp replies  {}", stats.arp_replies);
    println!("  na replies   {}", stats.na_replies);
    println!("  passed       {}", stats.passed);
    println!("  malformed    {}", stats.malformed);
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
