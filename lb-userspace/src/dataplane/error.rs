use std::{net::IpAddr, path::PathBuf};

/// Everything that can go wrong between Sluice and the kernel's BPF subsystem. Each variant says
/// what is wrong and, where there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("the data plane needs root (CAP_BPF, CAP_NET_ADMIN): running as uid {uid}")]
    NotRoot { uid: u32 },
    #[error(
        "bpffs is not mounted at {path} and mounting it failed ({source}); \
         mount it with `mount -t bpf bpf {path}` or mount the host's /sys/fs/bpf into the container"
    )]
    BpffsNotMounted {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the pin directory {path} is not on a bpffs mount")]
    PinDirNotOnBpffs { path: PathBuf },
    #[error("cannot create the pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot remove the stale pinned map {path}: {source}")]
    RemovePin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot count the possible CPUs (sizing the per-CPU flow cache): {0}")]
    PossibleCpus(String),
    #[error(
        "another trace is running (its lease ends in {seconds:.1} s); wait for it, or stop it"
    )]
    TraceRunning { seconds: f64 },
    #[error("no such interface: {name:?}")]
    NoSuchInterface { name: String },
    #[error("interface {name:?} has no usable MAC address ({detail})")]
    NoMacAddress { name: String, detail: String },
    #[error("{ip} is not a valid unicast service address: {reason}")]
    InvalidVip { ip: IpAddr, reason: String },
    #[error("interface index {ifindex} is not attached to this data plane")]
    NotAttached { ifindex: u32 },
    #[error(
        "the kernel refused to load program {program}: operation not permitted; it needs \
         CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (the systemd unit and the speaker's DaemonSet \
         grant them), or root"
    )]
    LoadNotPermitted { program: String },
    #[error("the kernel's verifier rejected program {program}: {io_error}\nverifier log:\n{log}")]
    VerifierRejected {
        program: String,
        io_error: std::io::Error,
        log: String,
    },
    #[error("cannot attach the XDP program to {interface}: {source}")]
    Attach {
        interface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot pin the links of interface {interface}: {reason}")]
    PinLink { interface: String, reason: String },
    #[error("cannot load the eBPF object {object}: {source}")]
    Load {
        object: &'static str,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("program {0} is missing from the eBPF object (was lb-ebpf built from this tree?)")]
    MissingProgram(&'static str),
    #[error("map {0} is missing from the eBPF object (was lb-ebpf built from this tree?)")]
    MissingMap(&'static str),
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("pinned map {path} cannot be opened ({source}); is the data plane loaded with this pin directory?")]
    Pinned {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("service {service}: {reason}")]
    InvalidService { service: String, reason: String },
    #[error(
        "no room for more {what}: the data plane holds {capacity} (raise the capacity at load)"
    )]
    Full { what: &'static str, capacity: u32 },
    #[error("Maglev table size: {0}")]
    InvalidTableSize(String),
    #[error("cannot count the CPUs: {0}")]
    Cpus(std::io::Error),
    #[error("benchmark: {0}")]
    InvalidBenchmark(String),
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
}

pub type Result<T, E = DataplaneError> = std::result::Result<T, E>;
