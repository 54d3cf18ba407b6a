//! The `sluice` binary: parses the command line, sets up logging, and hands over to the library.
//! Errors become a message on stderr and a non-zero exit code here, nowhere else.

use std::{collections::BTreeMap, path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::{
    config::L2Announcement,
    dataplane::{self, Dataplane, DataplaneOptions, L2Vip, PinnedView},
    signals::SignalSet,
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
    /// Run the standalone load balancer from config files (Sluice's YAML or MetalLB's legacy
    /// ConfigMap): allocate service IPs, answer ARP/NDP for them, balance their traffic, check
    /// backends' health, serve metrics. Reloads on SIGHUP and when a file changes.
    Run {
        /// A config file; repeat to combine (e.g. MetalLB's ConfigMap and a file of services).
        #[arg(long = "config", value_name = "FILE", required = true)]
        configs: Vec<PathBuf>,
        /// This node's name (used in logs; BGP and elections use it later).
        #[arg(long)]
        node: Option<String>,
        /// What SIGTERM and SIGINT do to the BGP sessions: `stop` withdraws the routes (BFD
        /// AdminDown, Cease); `restart` keeps them on the routers while the next `sluice run`
        /// starts (graceful restart). SIGUSR2 always means restart.
        #[arg(long, value_enum, default_value_t = lb_userspace::standalone::OnStop::Stop)]
        on_stop: lb_userspace::standalone::OnStop,
    },
    /// Check config files without touching the kernel: parse, validate, allocate.
    Validate {
        #[arg(long = "config", value_name = "FILE", required = true)]
        configs: Vec<PathBuf>,
    },
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
    /// Stop a data plane that `sluice run` left running (its XDP and TC programs stay attached
    /// across restarts): removes the pinned links, which detaches the programs.
    Detach {
        /// Where the maps and links are pinned (default: the config's, else /sys/fs/bpf/sluice).
        #[arg(long)]
        pin_dir: Option<PathBuf>,
        /// The config `sluice run` used (for its pinDir).
        #[arg(long = "config", value_name = "FILE")]
        configs: Vec<PathBuf>,
    },
    /// Run the Kubernetes controller: gives every Service of type LoadBalancer (ours by class)
    /// IPs from the IPAddressPools, writes status.loadBalancer.ingress, records Events, marks
    /// Sluice's objects Valid or not. One replica leads through a Lease; the others wait.
    Controller {
        /// The namespace of Sluice's objects (IPAddressPool, ...) and of the Lease.
        #[arg(long, env = "POD_NAMESPACE", default_value = "sluice-system")]
        namespace: String,
        /// This replica's name in the Lease (default: $POD_NAME, else the host name).
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// The Lease's name.
        #[arg(long, default_value = "sluice-controller")]
        lease_name: String,
        /// Seconds the Lease stays valid unless renewed (renewed every third of it): how long
        /// a crashed leader's replicas wait before one takes over.
        #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(i32).range(1..=3600))]
        lease_duration: i32,
        /// Also take Services of type LoadBalancer that set no spec.loadBalancerClass (those
        /// with class sluice.dev/lb are always ours). Set it to false when another load
        /// balancer owns the class-less ones.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        classless: bool,
        /// Where /metrics, /healthz and /readyz are served.
        #[arg(long, default_value = "0.0.0.0:9464")]
        metrics_address: std::net::SocketAddr,
        /// A full pass this often, in seconds, even when no watch event came.
        #[arg(long, default_value_t = 60)]
        resync_seconds: u64,
        /// Writes to the API server (status patches, conditions, Events) per second, at most;
        /// 16 are in flight at once. 0: no limit.
        #[arg(long, default_value_t = lb_userspace::k8s::limit::DEFAULT_WRITES_PER_SECOND)]
        api_writes_per_second: u32,
        /// The namespace of MetalLB's objects (metallb.io IPAddressPool, L2Advertisement,
        /// BGPAdvertisement, BGPPeer, BFDProfile, Community), read as they are when MetalLB's
        /// CRDs are installed. Empty: read none.
        #[arg(long, default_value = "metallb-system")]
        metallb_namespace: String,
    },
    /// Run the per-node speaker (Kubernetes): balance Services with externalTrafficPolicy Local
    /// over this node's ready endpoints in XDP, answer ARP/NDP for the service IPs this node is
    /// elected for (only on the advertisement's interfaces), announce them to BGP peers. The
    /// speakers form a mesh that fails a dead node's IPs over within the failure timeout.
    /// Stopping keeps everything for the restart grace (--on-stop restart) or hands the IPs over
    /// and detaches (--on-stop handover).
    Speaker {
        /// This node's name, as in the Node object (the DaemonSet passes spec.nodeName).
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        /// The namespace of Sluice's objects and of the speakers' Leases.
        #[arg(long, env = "POD_NAMESPACE", default_value = "sluice-system")]
        namespace: String,
        /// An interface to balance on and announce from. Repeatable.
        #[arg(long = "interface", value_name = "INTERFACE", required = true)]
        interfaces: Vec<String>,
        /// Also redirect flows into this veth in XDP (its peer must run an XDP program).
        /// Repeatable.
        #[arg(long = "redirect-veth", value_name = "INTERFACE")]
        redirect_veths: Vec<String>,
        /// Where the maps are pinned (must be on a bpffs).
        #[arg(long, default_value_os_t = dataplane::default_pin_dir())]
        pin_dir: PathBuf,
        /// Seconds this node's Lease stays valid unless renewed (renewed every third of it):
        /// how long the others wait before taking over the IPs of a node that died.
        #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(i32).range(1..=3600))]
        lease_duration: i32,
        /// Keep an IP on the node that announces it while that node stays eligible (a node that
        /// comes back takes nothing back). false: spread afresh on every change.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        sticky: bool,
        /// Also take Services without spec.loadBalancerClass (as the controller's flag).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        classless: bool,
        /// Where /metrics, /healthz and /readyz are served.
        #[arg(long, default_value = "0.0.0.0:9465")]
        metrics_address: std::net::SocketAddr,
        /// A full pass this often, in seconds, even when no watch event came.
        #[arg(long, default_value_t = 60)]
        resync_seconds: u64,
        /// The namespace of MetalLB's objects (metallb.io IPAddressPool, L2Advertisement,
        /// BGPAdvertisement, BGPPeer, BFDProfile, Community), read as they are when MetalLB's
        /// CRDs are installed. Empty: read none.
        #[arg(long, default_value = "metallb-system")]
        metallb_namespace: String,
        /// The mesh's UDP port, the same on every node (MetalLB's memberlist uses 7946).
        #[arg(long, env = "SLUICE_MESH_PORT", default_value_t = lb_userspace::mesh::DEFAULT_PORT)]
        mesh_port: u16,
        /// This node's address on the mesh (the DaemonSet passes status.hostIP); default: the
        /// first IPv4 address of the first --interface.
        #[arg(long, env = "NODE_IP")]
        mesh_address: Option<std::net::IpAddr>,
        /// The file holding the mesh's shared secret (the Secret sluice-system/sluice-mesh,
        /// mounted). While it is missing, liveness comes from the Leases alone.
        #[arg(long, default_value = "/etc/sluice/mesh/secret")]
        mesh_secret_file: PathBuf,
        /// Run without the mesh: liveness from the Leases alone (failover after
        /// --lease-duration).
        #[arg(long)]
        no_mesh: bool,
        /// Milliseconds: the mesh declares a silent speaker down within this, and a dead
        /// speaker's node stops answering ARP/NDP within it.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
        failure_timeout_ms: u64,
        /// Seconds the other speakers keep a restarting speaker's IPs on its node (--on-stop
        /// restart), and its node keeps answering.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
        restart_grace_seconds: u64,
        /// Re-send gratuitous ARP / unsolicited NA for the IPs this node answers for every this
        /// many seconds (switches' FDB entries age out, often after 300 s); 0: only on takeover.
        #[arg(long, default_value_t = 30)]
        garp_interval_seconds: u64,
        /// What SIGTERM and SIGINT do: `restart` keeps serving for the restart grace (rolling
        /// updates drop nothing), `handover` moves the IPs away now and detaches.
        #[arg(long, value_enum, default_value_t = lb_userspace::k8s::speaker::OnStop::Restart)]
        on_stop: lb_userspace::k8s::speaker::OnStop,
        /// The flood guard: per CPU and second, new flows past this many are balanced but not
        /// tracked, so a flood of new flows cannot evict established ones (0: no limit).
        #[arg(long, default_value_t = lb_userspace::config::DEFAULT_FLOOD_GUARD)]
        flood_guard_new_flows_per_second: u64,
        /// Balance Services of externalTrafficPolicy Cluster in XDP on every node, over every
        /// ready endpoint in the cluster: a flow for another node's endpoint is tunnelled there
        /// (IPIP, IPv6 in IPv6) and its replies go straight to the client. false: leave them to
        /// kube-proxy (as MetalLB does).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        cluster_balancing: bool,
        /// The node network's MTU, for the tunnels: larger packets are not tunnelled, and
        /// tunnelled TCP flows get their MSS clamped below it. Default: the smallest MTU of the
        /// --interfaces.
        #[arg(long)]
        tunnel_mtu: Option<u32>,
        /// Where the speaker writes its status (mesh members, BGP sessions) for `sluice inspect`.
        #[arg(long, default_value = "/var/lib/sluice/status.json")]
        status_file: PathBuf,
    },
    /// Print Sluice's CustomResourceDefinitions (group sluice.dev) as YAML, ready for
    /// `kubectl apply -f -`, or write one file per CRD into a directory.
    Crds {
        /// Write `<plural>.sluice.dev.yaml` files here instead of printing.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
    /// Check IPAddressPool, L2Advertisement, BGPPeer, BGPAdvertisement and BFDProfile manifests (Sluice's,
    /// or MetalLB's metallb.io ones) offline: prints each object's Valid verdict, with the field
    /// and value of every problem; exits non-zero when one is invalid.
    CheckManifests {
        /// A YAML file (several documents allowed). Repeatable.
        #[arg(value_name = "FILE", required = true)]
        files: Vec<PathBuf>,
    },
    /// Turn MetalLB's configuration — a legacy ConfigMap (or its `config` string) or metallb.io
    /// manifests — into sluice.dev manifests on stdout, for `kubectl apply -f -`. What Sluice
    /// reads differently or does not do is printed on stderr.
    Migrate {
        /// A file to migrate. Repeatable.
        #[arg(value_name = "FILE", required = true)]
        files: Vec<PathBuf>,
        /// The namespace of the objects written (Sluice's namespace).
        #[arg(long, default_value = "sluice-system")]
        namespace: String,
    },
    /// Show what the data plane decides for matching packets, one line per decision, as it
    /// happens (a running `sluice run` or speaker, through its pinned maps). Stops on Ctrl-C or
    /// after --count events; leaves nothing enabled (if killed, within 2 s).
    Trace {
        /// Only packets for this VIP: IP, IP:PORT or [IPv6]:PORT.
        #[arg(long, value_name = "IP[:PORT]")]
        vip: Option<String>,
        /// Only packets from (and replies to) this client: IP or IP/PREFIX.
        #[arg(long, value_name = "IP[/PREFIX]")]
        client: Option<String>,
        /// Only packets arriving on (XDP) or leaving through (TC) this interface.
        #[arg(long, value_name = "IF")]
        interface: Option<String>,
        /// Stop after this many events.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// Where the maps are pinned.
        #[arg(long, default_value_os_t = dataplane::default_pin_dir())]
        pin_dir: PathBuf,
    },
    /// Show what the data plane holds, from its pinned maps (daemon running or not).
    Inspect {
        /// Where the maps are pinned (default: the config's, else /sys/fs/bpf/sluice).
        #[arg(long)]
        pin_dir: Option<PathBuf>,
        /// The config `sluice run` uses: adds service names and backend health.
        #[arg(long = "config", value_name = "FILE")]
        configs: Vec<PathBuf>,
        /// The status file the daemon or speaker writes (default: the config's, else
        /// /var/lib/sluice/status.json): adds BGP sessions and the speaker mesh.
        #[arg(long, value_name = "FILE")]
        status_file: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also list up to this many tracked flows: each one's backend, and whether it goes
        /// to this node's pod or through a tunnel to another node.
        #[arg(long, value_name = "N", default_value_t = 0)]
        flows: usize,
    },
}

fn check_manifests(files: &[PathBuf]) -> anyhow::Result<()> {
    use lb_userspace::k8s::{manifests, validity};
    let mut all = validity::Objects::default();
    for path in files {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let parsed =
            manifests::parse(&path.display().to_string(), &text).map_err(anyhow::Error::msg)?;
        for note in &parsed.notes {
            println!("note: {note}");
        }
        all.extend(parsed.objects);
    }
    let verdict = validity::validate(&all);
    if verdict.problems.is_empty() {
        anyhow::bail!(
            "no IPAddressPool, L2Advertisement, BGPPeer, BGPAdvertisement or BFDProfile found"
        );
    }
    let mut invalid = 0;
    for (object, problems) in &verdict.problems {
        if problems.is_empty() {
            println!("{} {}: Valid", object.kind, object.name);
        } else {
            invalid += 1;
            println!("{} {}: Invalid", object.kind, object.name);
            for p in problems {
                println!("  {p}");
            }
        }
    }
    if invalid > 0 {
        anyhow::bail!("{invalid} invalid object(s)");
    }
    Ok(())
}

fn migrate(files: &[PathBuf], namespace: &str) -> anyhow::Result<()> {
    let mut texts = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        texts.push((path.display().to_string(), text));
    }
    let migrated =
        lb_userspace::k8s::migrate::migrate(&texts, namespace).map_err(anyhow::Error::msg)?;
    for note in &migrated.notes {
        eprintln!("note: {note}");
    }
    print!("{}", migrated.yaml);
    Ok(())
}

fn crds(out_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let files = lb_userspace::k8s::crd::manifest_files();
    match out_dir {
        None => {
            let docs: Vec<&str> = files.iter().map(|(_, text)| text.as_str()).collect();
            print!("{}", docs.join("---\n"));
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("--out-dir: cannot create {}", dir.display()))?;
            for (name, text) in files {
                let path = dir.join(name);
                std::fs::write(&path, text)
                    .with_context(|| format!("--out-dir: cannot write {}", path.display()))?;
                println!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "sluice-controller".into())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Controller {
            namespace,
            identity,
            lease_name,
            lease_duration,
            classless,
            metrics_address,
            resync_seconds,
            api_writes_per_second,
            metallb_namespace,
        } => lb_userspace::k8s::controller::run(lb_userspace::k8s::controller::Options {
            api_writes_per_second,
            metallb_namespace: (!metallb_namespace.is_empty()).then_some(metallb_namespace),
            namespace,
            identity: identity.unwrap_or_else(host_name),
            lease_name,
            lease_duration,
            classless_is_ours: classless,
            metrics_address,
            resync: std::time::Duration::from_secs(resync_seconds.max(1)),
        })
        .map_err(anyhow::Error::from),
        Command::Speaker {
            node_name,
            namespace,
            interfaces,
            redirect_veths,
            pin_dir,
            lease_duration,
            sticky,
            classless,
            metrics_address,
            resync_seconds,
            metallb_namespace,
            mesh_port,
            mesh_address,
            mesh_secret_file,
            no_mesh,
            failure_timeout_ms,
            restart_grace_seconds,
            garp_interval_seconds,
            on_stop,
            status_file,
            flood_guard_new_flows_per_second,
            cluster_balancing,
            tunnel_mtu,
        } => lb_userspace::k8s::speaker::run(lb_userspace::k8s::speaker::Options {
            flood_guard_new_flows_per_second,
            cluster_balancing,
            tunnel_mtu,
            metallb_namespace: (!metallb_namespace.is_empty()).then_some(metallb_namespace),
            node_name,
            namespace,
            interfaces,
            redirect_veths,
            pin_dir,
            lease_duration,
            sticky,
            classless_is_ours: classless,
            metrics_address,
            resync: std::time::Duration::from_secs(resync_seconds.max(1)),
            mesh: (!no_mesh).then_some(lb_userspace::k8s::speaker::MeshSettings {
                port: mesh_port,
                address: mesh_address,
                secret_file: mesh_secret_file,
            }),
            failure_timeout: std::time::Duration::from_millis(failure_timeout_ms),
            restart_grace: std::time::Duration::from_secs(restart_grace_seconds),
            garp_interval: (garp_interval_seconds > 0)
                .then(|| std::time::Duration::from_secs(garp_interval_seconds)),
            on_stop,
            status_file: Some(status_file),
        })
        .map_err(anyhow::Error::from),
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
        Command::Inspect {
            pin_dir,
            configs,
            json,
            status_file,
            flows,
        } => inspect(pin_dir, &configs, status_file, json, flows),
        Command::Trace {
            vip,
            client,
            interface,
            count,
            json,
            pin_dir,
        } => trace(&pin_dir, vip, client, interface, count, json),
        Command::Run {
            configs,
            node,
            on_stop,
        } => {
            if let Some(node) = &node {
                tracing::info!(event = "starting", node = %node);
            }
            lb_userspace::standalone::run(configs, on_stop)
        }
        Command::Detach { pin_dir, configs } => detach(pin_dir, &configs),
        Command::Crds { out_dir } => crds(out_dir),
        Command::CheckManifests { files } => check_manifests(&files),
        Command::Migrate { files, namespace } => migrate(&files, &namespace),
        Command::Validate { configs } => {
            lb_userspace::standalone::validate(&configs).map(|summary| println!("{summary}"))
        }
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
    // Colour only on a terminal: logs written to a file, a pipe or a journal stay plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
    for (vip, a) in vips.iter().zip(&announcements) {
        // Tell the link at once (gratuitous ARP / unsolicited NA); answers follow from XDP.
        if let Err(error) = lb_userspace::l2::announce(vip.ifindex, vip.mac, vip.ip) {
            tracing::warn!(event = "l2AnnounceFailed", ip = %a.ip, interface = %a.interface, %error);
        }
        tracing::info!(event = "l2Announcing", ip = %a.ip, interface = %a.interface);
    }
    eprintln!(
        "sluice: announcing {} address(es), balancing {} service(s); ready",
        vips.len(),
        services.len()
    );

    loop {
        // Between signals: a bond's failover moves the answers to its new active port.
        let Some(signal) = signals.wait_for(dataplane::INTERFACE_REFRESH)? else {
            if let Err(error) = dp.refresh_interfaces() {
                tracing::warn!(event = "interfacesNotRefreshed", %error);
            }
            continue;
        };
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

fn detach(pin_dir: Option<PathBuf>, configs: &[PathBuf]) -> Result<()> {
    let pin_dir = match pin_dir {
        Some(dir) => dir,
        None if !configs.is_empty() => lb_userspace::config::load(configs)?.dataplane.pin_dir,
        None => dataplane::default_pin_dir(),
    };
    let removed = dataplane::detach_pinned(&pin_dir)?;
    if removed.is_empty() {
        println!(
            "nothing pinned under {}/links: no data plane left running",
            pin_dir.display()
        );
    } else {
        println!("detached: {}", removed.join(", "));
    }
    Ok(())
}

/// A count as JSON: an integer while it is one (pool sizes are kept as f64, for IPv6 pools
/// past 2^64), a float past 2^53.
fn whole(count: f64) -> serde_json::Value {
    if count.fract() == 0.0 && (0.0..=9_007_199_254_740_992.0).contains(&count) {
        serde_json::json!(count as u64)
    } else {
        serde_json::json!(count)
    }
}

/// `sluice trace`: starts the trace, prints events until Ctrl-C/SIGTERM or `count`, renewing
/// the lease every half second; the session's drop turns it off.
fn trace(
    pin_dir: &std::path::Path,
    vip: Option<String>,
    client: Option<String>,
    interface: Option<String>,
    count: Option<u64>,
    json: bool,
) -> Result<()> {
    use lb_userspace::trace;
    use std::sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    };
    const LEASE_NS: u64 = 2_000_000_000;
    let mut request = trace::Request::default();
    if let Some(text) = &vip {
        let (ip, port) = trace::parse_vip(text)?;
        request.vip = Some(ip);
        request.vip_port = port;
    }
    if let Some(text) = &client {
        request.client = Some(trace::parse_client(text)?);
    }
    if let Some(name) = &interface {
        request.ifindex = dataplane::interface(name)
            .with_context(|| format!("--interface {name:?}"))?
            .ifindex;
    }
    // Signals first, before any thread: Ctrl-C and SIGTERM end the trace cleanly.
    let signals = lb_userspace::signals::SignalSet::block(&[libc::SIGINT, libc::SIGTERM])?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let _ = signals.wait();
            stop.store(true, Ordering::SeqCst);
        });
    }
    let mut session = dataplane::TraceSession::start(pin_dir, trace::filter(&request), LEASE_NS)
        .with_context(|| format!("tracing the data plane pinned at {}", pin_dir.display()))?;
    use std::io::Write;
    // Stderr may be closed by now (a pipe whose reader left): never panic on it.
    let _ = writeln!(
        std::io::stderr(),
        "tracing (Ctrl-C to stop){}",
        count.map_or(String::new(), |n| format!(", {n} events"))
    );
    let mut seen: u64 = 0;
    let mut renewed = std::time::Instant::now();
    let mut out = std::io::stdout().lock();
    'outer: while !stop.load(Ordering::SeqCst) {
        for raw in session.events() {
            let event = trace::decode(&raw, dataplane::interface_name);
            let text = if json {
                serde_json::to_string(&event)?
            } else {
                trace::line(&event)
            };
            if writeln!(out, "{text}").and_then(|_| out.flush()).is_err() {
                break 'outer; // stdout closed (a pipe into head): done
            }
            seen += 1;
            if count.is_some_and(|n| seen >= n) {
                break 'outer;
            }
        }
        if renewed.elapsed() >= std::time::Duration::from_millis(500) {
            session.renew(LEASE_NS)?;
            renewed = std::time::Instant::now();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let lost = session.lost();
    drop(session);
    let _ = writeln!(
        std::io::stderr(),
        "{seen} events{}",
        if lost > 0 {
            format!(", {lost} lost (the reader fell behind)")
        } else {
            String::new()
        }
    );
    Ok(())
}

fn inspect(
    pin_dir: Option<PathBuf>,
    configs: &[PathBuf],
    status_file: Option<PathBuf>,
    json: bool,
    flow_limit: usize,
) -> Result<()> {
    let config = if configs.is_empty() {
        None
    } else {
        Some(lb_userspace::config::load(configs)?)
    };
    let pin_dir = pin_dir
        .or_else(|| config.as_ref().map(|c| c.dataplane.pin_dir.clone()))
        .unwrap_or_else(dataplane::default_pin_dir);
    let state_file = config.as_ref().map_or_else(
        || PathBuf::from(lb_userspace::config::DEFAULT_STATE_FILE),
        |c| c.dataplane.state_file.clone(),
    );
    let status = match status_file {
        Some(path) => std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok()),
        // Without --config: what the daemon serving this pin directory says, else the default.
        None if config.is_none() => lb_userspace::standalone::read_status_of(&pin_dir)
            .or_else(|| lb_userspace::standalone::read_status(&state_file)),
        None => lb_userspace::standalone::read_status(&state_file),
    }
    .unwrap_or_default();
    let name_of = |key: &str| status.service_name(key);
    let health_of = |name: &Option<String>, backend: &str| {
        status
            .health
            .iter()
            .find(|h| {
                let ip = |k: &str| k.rsplit_once(':').map(|(ip, _)| ip.to_string());
                Some(&h.service) == name.as_ref() && ip(&h.backend) == ip(backend)
            })
            .map(|h| if h.healthy { "healthy" } else { "unhealthy" })
            .unwrap_or("unchecked")
    };
    let view = PinnedView::open(&pin_dir)
        .with_context(|| format!("inspecting the data plane pinned at {}", pin_dir.display()))?;
    let vips = view.l2_vips()?;
    let interfaces = view.interfaces();
    let stats = view.stats()?;
    let services = view.services()?;
    let census = view.flow_census();
    let flows = census.total();
    let flood = view.flood_stats().unwrap_or_default();
    let tunnels = dataplane::traffic_by_node(&services, &view.tunnel_peers()?);
    let listed = view.flows(flow_limit);
    if json {
        let services: Vec<_> = services
            .iter()
            .map(|s| {
                let name = name_of(&s.service.to_string());
                serde_json::json!({
                    "name": name,
                    "service": s.service.to_string(),
                    "packets": s.traffic.packets,
                    "bytes": s.traffic.bytes,
                    "newFlows": s.traffic.new_flows,
                    "backends": s.backends.iter().map(|(b, t)| serde_json::json!({
                        "backend": b.maglev_key(),
                        "node": b.node.map(|n| n.to_string()),
                        "health": health_of(&name, &b.maglev_key()),
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
        let unhealthy: Vec<_> = status
            .health
            .iter()
            .filter(|h| !h.healthy)
            .map(|h| serde_json::json!({"name": h.service, "backend": h.backend}))
            .collect();
        let doc = serde_json::json!({
            "interfaces": interfaces,
            "l2Vips": vips,
            "unhealthyBackends": unhealthy,
            "pools": status.pools.iter().map(|(p, used, total)| serde_json::json!({"pool": p, "inUse": used, "total": whole(*total)})).collect::<Vec<_>>(),
            "bgpSessions": status.bgp,
            "mesh": status.mesh_enabled.then_some(&status.mesh),
            "bfd": (!status.bfd.sessions.is_empty()).then_some(&status.bfd),
            "services": services,
            "trackedFlows": flows,
            "flowsByState": {
                "open": census.open,
                "halfClosed": census.half_closed,
                "closed": census.closed,
            },
            "floodGuard": {
                "untrackedFlows": flood.untracked,
                "activations": flood.activations,
            },
            "counters": {
                "arpReplies": stats.arp_replies,
                "naReplies": stats.na_replies,
                "passed": stats.passed,
                "malformed": stats.malformed,
                "forwarded": stats.lb_forwarded,
                "forwardedViaKernel": stats.lb_to_kernel,
                "droppedNoBackend": stats.lb_no_backend,
                "reverseNat": stats.reverse_nat,
                "icmpErrorsToBackend": stats.icmp_to_backend,
                "icmpErrorsToClient": stats.icmp_to_client,
                "icmpErrorsUnmatched": stats.icmp_unmatched,
                "tunnelled": stats.tunnel_out,
                "droppedTunnelForged": stats.tunnel_forged,
                "droppedTunnelMismatch": stats.tunnel_mismatch,
                "tunnelTooBig": stats.tunnel_too_big,
            },
            "flows": listed.iter().map(|f| serde_json::json!({
                "client": f.client.to_string(),
                "service": f.service.to_string(),
                "protocol": f.protocol,
                "backend": f.backend.map(|b| b.to_string()),
                "via": match (f.backend, f.node) {
                    (None, _) => "gone",
                    (Some(_), None) => "local",
                    (Some(_), Some(_)) => "tunnel",
                },
                "node": f.node.map(|n| n.to_string()),
                "state": f.state,
            })).collect::<Vec<_>>(),
            "tunnels": tunnels.iter().map(|t| serde_json::json!({
                "node": t.node.map(|n| n.to_string()),
                "inPackets": t.in_packets,
                "inBytes": t.in_bytes,
                "outPackets": t.out_packets,
                "outBytes": t.out_bytes,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!("Interfaces (the XDP program runs on these)");
    println!(
        "  {:<16} {:<8} {:<8} {:<8} {:<22} OTHER HOSTS' FRAMES",
        "INTERFACE", "IFINDEX", "MODE", "KIND", "ROLE"
    );
    if interfaces.is_empty() {
        println!("  (none)");
    }
    for i in &interfaces {
        let role = match (&i.port_of, i.standby) {
            (Some(bond), false) => format!("port of {bond}, active"),
            (Some(bond), true) => format!("port of {bond}, standby"),
            (None, _) => "attached".to_string(),
        };
        println!(
            "  {:<16} {:<8} {:<8} {:<8} {:<22} {}",
            i.name.as_deref().unwrap_or("?"),
            i.ifindex,
            i.mode,
            i.kind,
            role,
            i.other_host_frames
        );
        if let Some(note) = i.note {
            println!("    warning: generic mode: {note}");
        }
    }
    println!();
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
    println!(
        "Services ({flows} tracked flows: {} open, {} half-closed, {} closed)",
        census.open, census.half_closed, census.closed
    );
    if flood.untracked > 0 {
        println!(
            "  flood guard: {} new flows balanced but not tracked, over the limit in {} CPU-seconds",
            flood.untracked, flood.activations
        );
    }
    if services.is_empty() {
        println!("  (none)");
    }
    for s in &services {
        let name = name_of(&s.service.to_string());
        println!(
            "  {:<44} packets {:<10} bytes {:<12} new flows {}",
            match &name {
                Some(n) => format!("{n} {}", s.service),
                None => s.service.to_string(),
            },
            s.traffic.packets,
            s.traffic.bytes,
            s.traffic.new_flows
        );
        if s.backends.is_empty() {
            println!("    (no backend: new flows are dropped)");
        }
        for (b, t) in &s.backends {
            println!(
                "    → {:<40} packets {:<10} bytes {:<12} new flows {}{}{}",
                format!("{} ({})", b.maglev_key(), health_of(&name, &b.maglev_key())),
                t.packets,
                t.bytes,
                t.new_flows,
                if b.weight == 1 {
                    String::new()
                } else {
                    format!("  (weight {})", b.weight)
                },
                b.node
                    .map(|n| format!("  (on node {n}: tunnelled)"))
                    .unwrap_or_default()
            );
        }
    }
    for h in status.health.iter().filter(|h| !h.healthy) {
        println!(
            "  {} → {} is unhealthy: out of the Maglev table",
            h.service, h.backend
        );
    }
    if !status.bgp.is_empty() {
        println!();
        println!("BGP sessions");
        for b in &status.bgp {
            let up = b
                .uptime_seconds
                .map(|s| format!("up {s} s"))
                .unwrap_or_else(|| "down".into());
            println!(
                "  {:<40} {:<12} {:<10} prefixes {:<4} updates out {:<5} in {:<5}{}",
                b.peer,
                b.state,
                up,
                b.prefixes_sent,
                b.updates_sent,
                b.updates_received,
                b.last_error
                    .as_ref()
                    .map(|e| format!("  last error: {e}"))
                    .unwrap_or_default()
            );
        }
    }
    if !status.bfd.sessions.is_empty() {
        println!();
        println!(
            "BFD sessions ({} packets dropped)",
            status.bfd.dropped.values().sum::<u64>()
        );
        for s in &status.bfd.sessions {
            let downs: u64 = s
                .transitions
                .iter()
                .filter(|(to, _, _)| to == "Down")
                .map(|(_, _, n)| n)
                .sum();
            println!(
                "  {:<40} {:<9} for {:.1} s  (peer says {}) {}, sends every {} ms, detection {} ms, profile {}, {} down{}{}",
                s.peer,
                s.state,
                s.since_seconds,
                s.remote_state,
                if s.multihop { "multi-hop" } else { "single-hop" },
                s.transmit_interval_ms,
                s.detection_time_ms,
                s.profile,
                downs,
                if s.last_down_reason != "none" {
                    format!(", last: {}", s.last_down_reason)
                } else {
                    String::new()
                },
                s.error
                    .as_ref()
                    .map(|e| format!("  error: {e}"))
                    .unwrap_or_default()
            );
        }
        for (reason, n) in &status.bfd.dropped {
            println!("  dropped ({reason}): {n}");
        }
    }
    if status.mesh_enabled {
        println!();
        println!(
            "Speaker mesh ({} datagrams in, {} out, {} dropped)",
            status.mesh.received,
            status.mesh.sent,
            status.mesh.dropped.values().sum::<u64>()
        );
        if status.mesh.members.is_empty() {
            println!("  (no other speaker yet)");
        }
        for m in &status.mesh.members {
            println!(
                "  {:<24} {:<24} {:<8} for {:.1} s{}{}",
                m.node,
                m.address,
                m.state,
                m.since_seconds,
                m.last_heard_seconds_ago
                    .map(|s| format!(", heard {s:.1} s ago"))
                    .unwrap_or_default(),
                m.noticed_after_seconds
                    .map(|s| format!(", declared down {s:.2} s after its last message"))
                    .unwrap_or_default()
            );
        }
        for (reason, n) in &status.mesh.dropped {
            println!("  dropped ({reason}): {n}");
        }
    }
    if !status.pools.is_empty() {
        println!();
        println!("Pools");
        for (pool, used, total) in &status.pools {
            println!("  {pool:<20} {used} of {total} in use");
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
    println!(
        "  ICMP errors  {} to backends, {} to clients, {} matching no flow",
        stats.icmp_to_backend, stats.icmp_to_client, stats.icmp_unmatched
    );
    println!(
        "  tunnelled    {} out; {} too big (ICMP sent back); dropped: {} forged, {} to another node again",
        stats.tunnel_out, stats.tunnel_too_big, stats.tunnel_forged, stats.tunnel_mismatch
    );
    if !listed.is_empty() {
        println!();
        println!("Flows (the first {} of {flows})", listed.len());
        for f in &listed {
            let to = match (f.backend, f.node) {
                (None, _) => "(its backend is gone)".to_string(),
                (Some(b), None) => format!("{b} (this node)"),
                (Some(b), Some(n)) => format!("{b} (tunnelled to node {n})"),
            };
            println!(
                "  {} {} → {} → {to}  {}",
                f.protocol, f.client, f.service, f.state
            );
        }
    }
    if !tunnels.is_empty() {
        println!();
        println!("Tunnels (cluster-wide balancing), per other node");
        for t in &tunnels {
            println!(
                "  {:<40} in {} packets ({} bytes), out {} packets ({} bytes)",
                t.node.map(|n| n.to_string()).unwrap_or_default(),
                t.in_packets,
                t.in_bytes,
                t.out_packets,
                t.out_bytes
            );
        }
    }
    Ok(())
}
