//! The model of what the operator asked for, and its validation. Pure: never touches the kernel.
//!
//! `file` parses the config file (Sluice's YAML or MetalLB's legacy ConfigMap), `model` validates
//! it into a [`Config`], `address` holds CIDRs and ranges. The command line's own specs
//! (`IP@INTERFACE`, `VIP:PORT/proto=...`) are parsed here too. Every error names the field and
//! the value it rejects.

pub mod address;
pub mod file;
pub mod model;

pub use model::*;

use std::{
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
};

/// Where the data plane pins its maps unless told otherwise (under the kernel's bpffs mount).
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/sluice";

/// One problem in a config file: where (a field path like `services[0].ports[1].port`) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Why a set of config files was rejected: every problem, one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct LoadError {
    pub problems: Vec<String>,
}

/// Parses one file's text (`name` is used in messages).
pub fn parse_text(name: &str, text: &str) -> Result<file::SluiceFile, LoadError> {
    file::parse(text).map_err(|e| LoadError {
        problems: vec![format!("{name}: {e}")],
    })
}

/// Reads, parses and validates the files: the whole configuration, or every problem found.
pub fn load(paths: &[PathBuf]) -> Result<Config, LoadError> {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    for path in paths {
        let name = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => match parse_text(&name, &text) {
                Ok(f) => files.push((name, f)),
                Err(e) => problems.extend(e.problems),
            },
            Err(e) => problems.push(format!("{name}: cannot read: {e}")),
        }
    }
    if !problems.is_empty() {
        return Err(LoadError { problems });
    }
    build_from(files)
}

/// Validates parsed files into the model.
pub fn build_from(files: Vec<(String, file::SluiceFile)>) -> Result<Config, LoadError> {
    model::build(files).map_err(|errors| LoadError {
        problems: errors.iter().map(|e| e.to_string()).collect(),
    })
}

/// The file names, for log lines.
pub fn describe(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| Path::new(p).display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

// ---- Services ----

/// TCP or UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// A service: traffic to (VIP, port, protocol) is balanced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Service {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.vip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}/{}", self.port, self.protocol),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}/{}", self.port, self.protocol),
        }
    }
}

/// One backend of a service. Weight 0 drains it: established flows stay, new ones go elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub ip: IpAddr,
    pub port: u16,
    pub weight: u32,
    /// The node the backend runs on, when that is another node: its packets are tunnelled
    /// there (cluster-wide balancing). `None`: this node's own backend, reached by DNAT.
    pub node: Option<IpAddr>,
}

impl Backend {
    /// The backend's identity for Maglev ("ip:port"): weight changes do not move it.
    pub fn maglev_key(&self) -> String {
        match self.ip {
            IpAddr::V4(ip) => format!("{ip}:{}", self.port),
            IpAddr::V6(ip) => format!("[{ip}]:{}", self.port),
        }
    }
}

/// Why a piece of configuration was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{field}: {value:?} is not of the form IP@INTERFACE (e.g. 198.51.100.10@eth1)")]
    NotIpAtInterface { field: String, value: String },
    #[error("{field}: {value:?} is not an IP address")]
    NotAnIp { field: String, value: String },
    #[error("{field}: {value} is not a valid unicast address for a service: {reason}")]
    NotUnicast {
        field: String,
        value: IpAddr,
        reason: &'static str,
    },
    #[error("{field}: {value:?} is not a service (VIP:PORT/tcp|udp=BACKEND:PORT[*WEIGHT],...): {reason}")]
    BadService {
        field: String,
        value: String,
        reason: String,
    },
    #[error("{field}: {value:?} is not a valid interface name: {reason}")]
    BadInterfaceName {
        field: String,
        value: String,
        reason: &'static str,
    },
}

/// An IP to answer ARP (IPv4) or NDP (IPv6) for, on one interface only.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct L2Announcement {
    pub ip: IpAddr,
    pub interface: String,
}

impl fmt::Display for L2Announcement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.ip, self.interface)
    }
}

impl L2Announcement {
    /// Parses `IP@INTERFACE`; `field` names where the text came from, for the error.
    pub fn parse(field: &str, text: &str) -> Result<Self, ConfigError> {
        let (ip_text, interface) =
            text.rsplit_once('@')
                .ok_or_else(|| ConfigError::NotIpAtInterface {
                    field: field.to_string(),
                    value: text.to_string(),
                })?;
        let ip = IpAddr::from_str(ip_text).map_err(|_| ConfigError::NotAnIp {
            field: field.to_string(),
            value: ip_text.to_string(),
        })?;
        validate_service_ip(field, ip)?;
        validate_interface_name(field, interface)?;
        Ok(Self {
            ip,
            interface: interface.to_string(),
        })
    }
}

/// Parses `IP:PORT` or `[IPv6]:PORT`.
fn parse_socket(text: &str) -> Result<(IpAddr, u16), String> {
    let (ip, port) = if let Some(rest) = text.strip_prefix('[') {
        let (ip, port) = rest
            .split_once("]:")
            .ok_or_else(|| format!("{text:?}: expected [IPv6]:PORT"))?;
        (ip, port)
    } else {
        text.rsplit_once(':')
            .ok_or_else(|| format!("{text:?}: expected IP:PORT"))?
    };
    let ip = IpAddr::from_str(ip).map_err(|_| format!("{ip:?} is not an IP address"))?;
    if ip.is_ipv6() && !text.starts_with('[') {
        return Err(format!("{text:?}: write IPv6 addresses as [IPv6]:PORT"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{port:?} is not a port number"))?;
    if port == 0 {
        return Err(format!("{text:?}: port 0"));
    }
    Ok((ip, port))
}

/// Parses a service and its backends from `VIP:PORT/PROTO=BACKEND:PORT[*WEIGHT],...`, e.g.
/// `198.51.100.10:80/tcp=10.0.0.11:8080,10.0.0.12:8080*2` or `[2001:db8::10]:53/udp=[2001:db8::53]:53`.
/// An empty list after `=` is a service with no backend (its new flows are dropped).
pub fn parse_service(field: &str, text: &str) -> Result<(Service, Vec<Backend>), ConfigError> {
    let bad = |reason: String| ConfigError::BadService {
        field: field.to_string(),
        value: text.to_string(),
        reason,
    };
    let (front, backends_text) = text
        .split_once('=')
        .ok_or_else(|| bad("missing '=' before the backends".into()))?;
    let (socket, protocol) = front
        .rsplit_once('/')
        .ok_or_else(|| bad("missing /tcp or /udp after the port".into()))?;
    let protocol = match protocol {
        "tcp" | "TCP" => Protocol::Tcp,
        "udp" | "UDP" => Protocol::Udp,
        other => return Err(bad(format!("protocol {other:?} is neither tcp nor udp"))),
    };
    let (vip, port) = parse_socket(socket).map_err(bad)?;
    validate_service_ip(field, vip)?;
    let mut backends = Vec::new();
    for item in backends_text.split(',').filter(|s| !s.is_empty()) {
        let (socket, weight) = match item.split_once('*') {
            Some((s, w)) => (
                s,
                w.parse::<u32>()
                    .map_err(|_| bad(format!("weight {w:?} is not a whole number")))?,
            ),
            None => (item, 1),
        };
        let (ip, port) = parse_socket(socket).map_err(bad)?;
        if ip.is_ipv4() != vip.is_ipv4() {
            return Err(bad(format!(
                "backend {socket} is not of the VIP's address family"
            )));
        }
        validate_service_ip(field, ip)?;
        backends.push(Backend {
            ip,
            port,
            weight,
            node: None,
        });
    }
    Ok((
        Service {
            vip,
            port,
            protocol,
        },
        backends,
    ))
}

/// A service IP must be one a host can own and answer for: unicast, not loopback, not
/// unspecified, not broadcast.
pub fn validate_service_ip(field: &str, ip: IpAddr) -> Result<(), ConfigError> {
    let reason = match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => Some("it is the unspecified address"),
        IpAddr::V4(v4) if v4.is_loopback() => Some("it is a loopback address"),
        IpAddr::V4(v4) if v4.is_multicast() => Some("it is a multicast address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("it is the broadcast address"),
        IpAddr::V4(v4) if v4.octets()[0] == 0 => Some("0.0.0.0/8 means \"this network\""),
        IpAddr::V4(v4) if v4.octets()[0] >= 240 => Some("240.0.0.0/4 is reserved"),
        IpAddr::V6(v6) if v6.is_unspecified() => Some("it is the unspecified address"),
        IpAddr::V6(v6) if v6.is_loopback() => Some("it is the loopback address"),
        IpAddr::V6(v6) if v6.is_multicast() => Some("it is a multicast address"),
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
            Some("IPv4-mapped IPv6 addresses are not announced; use the IPv4 address")
        }
        _ => None,
    };
    match reason {
        Some(reason) => Err(ConfigError::NotUnicast {
            field: field.to_string(),
            value: ip,
            reason,
        }),
        None => Ok(()),
    }
}

/// Linux interface names: 1 to 15 bytes, no '/', no whitespace, not "." or "..".
pub fn validate_interface_name(field: &str, name: &str) -> Result<(), ConfigError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 15 {
        Some("Linux interface names have at most 15 bytes")
    } else if name.contains('/') || name.chars().any(char::is_whitespace) {
        Some("it contains '/' or whitespace")
    } else if name == "." || name == ".." {
        Some("it is not a name")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ConfigError::BadInterfaceName {
            field: field.to_string(),
            value: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ipv4_and_ipv6_announcements() {
        let a = L2Announcement::parse("--vip", "198.51.100.10@eth1").unwrap();
        assert_eq!(a.ip, "198.51.100.10".parse::<IpAddr>().unwrap());
        assert_eq!(a.interface, "eth1");
        let b = L2Announcement::parse("--vip", "2001:db8::10@bond0.100").unwrap();
        assert_eq!(b.ip, "2001:db8::10".parse::<IpAddr>().unwrap());
        assert_eq!(b.interface, "bond0.100");
        assert_eq!(b.to_string(), "2001:db8::10@bond0.100");
    }

    #[test]
    fn rejects_text_without_an_interface_naming_field_and_value() {
        let err = L2Announcement::parse("--vip", "198.51.100.10").unwrap_err();
        assert_eq!(
            err.to_string(),
            "--vip: \"198.51.100.10\" is not of the form IP@INTERFACE (e.g. 198.51.100.10@eth1)"
        );
    }

    #[test]
    fn rejects_a_non_ip() {
        let err = L2Announcement::parse("--vip", "10.0.0.300@eth0").unwrap_err();
        assert!(matches!(err, ConfigError::NotAnIp { ref value, .. } if value == "10.0.0.300"));
    }

    #[test]
    fn rejects_every_kind_of_non_unicast_address() {
        for bad in [
            "0.0.0.0",
            "127.0.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "0.1.2.3",
            "240.0.0.1",
            "::",
            "::1",
            "ff02::1",
            "::ffff:198.51.100.1",
        ] {
            let err = L2Announcement::parse("--vip", &format!("{bad}@eth0")).unwrap_err();
            assert!(
                matches!(err, ConfigError::NotUnicast { .. }),
                "{bad} was accepted or misreported: {err}"
            );
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn parses_services_with_weights_ipv6_and_empty_backend_lists() {
        let (s, b) = parse_service(
            "--service",
            "198.51.100.10:80/tcp=10.0.0.11:8080,10.0.0.12:8080*3",
        )
        .unwrap();
        assert_eq!(s.to_string(), "198.51.100.10:80/tcp");
        assert_eq!(b.len(), 2);
        assert_eq!(b[1].weight, 3);
        assert_eq!(b[0].port, 8080);
        let (s, b) =
            parse_service("--service", "[2001:db8::10]:53/udp=[2001:db8::53]:5353").unwrap();
        assert_eq!(s.to_string(), "[2001:db8::10]:53/udp");
        assert_eq!(b[0].maglev_key(), "[2001:db8::53]:5353");
        let (_, b) = parse_service("--service", "198.51.100.10:80/tcp=").unwrap();
        assert!(b.is_empty());
    }

    #[test]
    fn rejects_malformed_services_naming_what_is_wrong() {
        for (text, expected) in [
            ("198.51.100.10:80/tcp", "missing '='"),
            ("198.51.100.10:80=10.0.0.1:80", "missing /tcp or /udp"),
            (
                "198.51.100.10:80/sctp=10.0.0.1:80",
                "\"sctp\" is neither tcp nor udp",
            ),
            ("198.51.100.10:0/tcp=10.0.0.1:80", "port 0"),
            (
                "198.51.100.10:http/tcp=10.0.0.1:80",
                "\"http\" is not a port number",
            ),
            ("2001:db8::1:80/tcp=[2001:db8::2]:80", "[IPv6]:PORT"),
            ("198.51.100.10:80/tcp=[2001:db8::2]:80", "address family"),
            ("198.51.100.10:80/tcp=10.0.0.1:80*x", "weight \"x\""),
            ("224.0.0.1:80/tcp=10.0.0.1:80", "multicast"),
        ] {
            let err = parse_service("--service", text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text}: {err}");
            assert!(err.contains("--service"), "{err}");
        }
    }

    #[test]
    fn rejects_impossible_interface_names() {
        for bad in ["", "a-name-longer-than-15", "eth/0", "eth 0", ".."] {
            let err = L2Announcement::parse("--vip", &format!("198.51.100.1@{bad}")).unwrap_err();
            assert!(
                matches!(err, ConfigError::BadInterfaceName { .. }),
                "{bad}: {err}"
            );
        }
    }
}
