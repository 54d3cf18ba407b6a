//! The host facts the data plane depends on: privileges, bpffs, interfaces.

use std::{
    ffi::CString,
    fs,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use super::error::{DataplaneError, Result};

/// Where the kernel's BPF filesystem is mounted by convention.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// A network interface of this network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
    pub mac: [u8; 6],
}

/// An interface's MTU (from sysfs), `None` when it cannot be read.
pub fn mtu(name: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/class/net/{name}/mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Entries of `FLOW_CACHE`: [`lb_common::FLOW_CACHE_SLOTS`] for every possible CPU (CPU
/// numbers run up to the possible count, not just the online ones).
pub fn flow_cache_entries() -> Result<u32> {
    let cpus = aya::util::nr_cpus()
        .map_err(|(path, e)| DataplaneError::PossibleCpus(format!("{path}: {e}")))?;
    Ok(cpus as u32 * lb_common::FLOW_CACHE_SLOTS)
}

pub fn require_root() -> Result<()> {
    let uid = unsafe { libc::geteuid() };
    if uid != 0 {
        return Err(DataplaneError::NotRoot { uid });
    }
    Ok(())
}

/// True when `path` is on a bpffs mount.
pub fn on_bpffs(path: &Path) -> bool {
    is_bpffs(path)
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    rc == 0 && stat.f_type as i64 == BPF_FS_MAGIC
}

/// Makes sure bpffs is mounted at /sys/fs/bpf (mounting it if not), then creates `pin_dir`,
/// which must be on a bpffs.
pub fn prepare_pin_dir(pin_dir: &Path) -> Result<()> {
    let root = Path::new(BPFFS_ROOT);
    if pin_dir.starts_with(root) && !is_bpffs(root) {
        let source = CString::new("bpf").unwrap();
        let target = CString::new(BPFFS_ROOT).unwrap();
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                source.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(DataplaneError::BpffsNotMounted {
                path: root.to_path_buf(),
                source: std::io::Error::last_os_error(),
            });
        }
        tracing::info!(event = "bpffsMounted", path = BPFFS_ROOT);
    }
    fs::create_dir_all(pin_dir).map_err(|source| DataplaneError::PinDir {
        path: pin_dir.to_path_buf(),
        source,
    })?;
    if !is_bpffs(pin_dir) {
        return Err(DataplaneError::PinDirNotOnBpffs {
            path: pin_dir.to_path_buf(),
        });
    }
    Ok(())
}

/// Looks an interface up by name in the current network namespace.
pub fn interface(name: &str) -> Result<Interface> {
    let no_such = || DataplaneError::NoSuchInterface {
        name: name.to_string(),
    };
    let c_name = CString::new(name).map_err(|_| no_such())?;
    let ifindex = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if ifindex == 0 {
        return Err(no_such());
    }
    let mac = interface_mac(name)?;
    Ok(Interface {
        name: name.to_string(),
        ifindex,
        mac,
    })
}

/// Every IPv4 address of this network namespace, with its interface, in the kernel's order.
pub fn ipv4_addresses() -> Vec<(String, std::net::Ipv4Addr)> {
    addresses()
        .into_iter()
        .filter_map(|(name, net)| match net.addr() {
            std::net::IpAddr::V4(ip) => Some((name, ip)),
            std::net::IpAddr::V6(_) => None,
        })
        .collect()
}

/// Every interface's own subnets (its addresses with their prefix lengths, host bits cleared),
/// IPv4 and IPv6, in the kernel's order.
pub fn subnets() -> Vec<(String, ipnet::IpNet)> {
    addresses()
        .into_iter()
        .map(|(name, net)| (name, net.trunc()))
        .collect()
}

/// Every address of this network namespace with its prefix length, and its interface.
fn addresses() -> Vec<(String, ipnet::IpNet)> {
    let mut found = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we walk read-only and free once.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return found;
    }
    let mut cursor = list;
    while !cursor.is_null() {
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_addr.is_null() || entry.ifa_netmask.is_null() {
            continue;
        }
        // SAFETY: the kernel's entries hold sockaddrs of the family they say.
        let (ip, mask) = match unsafe { (*entry.ifa_addr).sa_family } as i32 {
            libc::AF_INET => unsafe {
                let addr = &*(entry.ifa_addr as *const libc::sockaddr_in);
                let mask = &*(entry.ifa_netmask as *const libc::sockaddr_in);
                (
                    std::net::IpAddr::from(addr.sin_addr.s_addr.to_ne_bytes()),
                    u32::from_be(mask.sin_addr.s_addr).count_ones() as u8,
                )
            },
            libc::AF_INET6 => unsafe {
                let addr = &*(entry.ifa_addr as *const libc::sockaddr_in6);
                let mask = &*(entry.ifa_netmask as *const libc::sockaddr_in6);
                (
                    std::net::IpAddr::from(addr.sin6_addr.s6_addr),
                    u128::from_be_bytes(mask.sin6_addr.s6_addr).count_ones() as u8,
                )
            },
            _ => continue,
        };
        let name = unsafe { std::ffi::CStr::from_ptr(entry.ifa_name) };
        if let Ok(net) = ipnet::IpNet::new(ip, mask) {
            found.push((name.to_string_lossy().into_owned(), net));
        }
    }
    unsafe { libc::freeifaddrs(list) };
    found
}

/// Is the interface up with a carrier (IFF_UP and IFF_RUNNING)? False when it is gone.
pub fn link_up(name: &str) -> bool {
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return false;
    }
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS fills ifr_flags of the request we own.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) };
    unsafe { libc::close(fd) };
    let flags = unsafe { req.ifr_ifru.ifru_flags } as libc::c_int;
    rc == 0 && flags & libc::IFF_UP != 0 && flags & libc::IFF_RUNNING != 0
}

/// The name of an interface index in the current network namespace, if it exists.
pub fn interface_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    let ptr = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if ptr.is_null() {
        return None;
    }
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// The interface's MAC address, read with the SIOCGIFHWADDR ioctl (works in any network
/// namespace, whatever /sys shows).
fn interface_mac(name: &str) -> Result<[u8; 6]> {
    let no_mac = |detail: String| DataplaneError::NoMacAddress {
        name: name.to_string(),
        detail,
    };
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(no_mac(std::io::Error::last_os_error().to_string()));
    }
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) };
    let err = std::io::Error::last_os_error();
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(no_mac(err.to_string()));
    }
    let addr = unsafe { req.ifr_ifru.ifru_hwaddr };
    if addr.sa_family != libc::ARPHRD_ETHER {
        return Err(no_mac(format!(
            "link type {} is not Ethernet",
            addr.sa_family
        )));
    }
    let mut mac = [0u8; 6];
    for (dst, src) in mac.iter_mut().zip(addr.sa_data.iter()) {
        *dst = *src as u8;
    }
    if mac == [0; 6] || mac[0] & 1 == 1 {
        return Err(no_mac(format!("{} is not a unicast MAC", format_mac(&mac))));
    }
    Ok(mac)
}

/// Every interface of the current network namespace: (name, ifindex).
pub fn interfaces() -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return out;
    }
    let mut entry = list;
    loop {
        let item = unsafe { &*entry };
        if item.if_index == 0 || item.if_name.is_null() {
            break;
        }
        let name = unsafe { std::ffi::CStr::from_ptr(item.if_name) };
        out.push((name.to_string_lossy().into_owned(), item.if_index));
        entry = unsafe { entry.add(1) };
    }
    unsafe { libc::if_freenameindex(list) };
    out
}

/// The kernel driver behind an interface (ETHTOOL_GDRVINFO), e.g. "veth", "virtio_net".
pub fn driver(name: &str) -> Option<String> {
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
    }
    const ETHTOOL_GDRVINFO: u32 = 3;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 160],
    };
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes().iter().take(15)) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_data = &mut info as *mut DrvInfo as *mut libc::c_char;
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut req) };
    unsafe { libc::close(fd) };
    if rc != 0 {
        return None;
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The default pin directory.
pub fn default_pin_dir() -> PathBuf {
    PathBuf::from(crate::config::DEFAULT_PIN_DIR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_interface_is_reported_by_name() {
        let err = interface("no-such-if0").unwrap_err();
        assert_eq!(err.to_string(), "no such interface: \"no-such-if0\"");
    }

    #[test]
    fn loopback_is_refused_for_lack_of_an_ethernet_mac() {
        let err = interface("lo").unwrap_err();
        assert!(
            matches!(err, DataplaneError::NoMacAddress { ref name, .. } if name == "lo"),
            "{err}"
        );
    }

    #[test]
    fn loopback_is_listed_and_has_no_veth_driver() {
        assert!(interfaces()
            .iter()
            .any(|(name, index)| name == "lo" && *index >= 1));
        assert_ne!(driver("lo").as_deref(), Some("veth"));
    }

    #[test]
    fn macs_print_as_colon_separated_hex() {
        assert_eq!(
            format_mac(&[2, 0, 0, 0xab, 0xcd, 0xef]),
            "02:00:00:ab:cd:ef"
        );
    }
}
