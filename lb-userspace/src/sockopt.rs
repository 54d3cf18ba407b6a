//! Socket options and addresses the standard library does not set or build, for the sockets
//! the BGP and BFD edges configure before they bind or connect.

use std::{io, net::SocketAddr, os::fd::RawFd};

pub fn set_int(
    fd: RawFd,
    level: libc::c_int,
    option: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            option,
            &value as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The TTL (IPv4) or hop limit (IPv6) of the unicast packets the socket sends.
pub fn set_ttl(fd: RawFd, v4: bool, ttl: libc::c_int) -> io::Result<()> {
    if v4 {
        set_int(fd, libc::IPPROTO_IP, libc::IP_TTL, ttl)
    } else {
        set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, ttl)
    }
}

/// `addr` as the kernel's `sockaddr_storage`, and the length that matters of it.
pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = &mut storage as *mut _ as *mut libc::sockaddr_in;
            unsafe {
                (*sin).sin_family = libc::AF_INET as u16;
                (*sin).sin_port = a.port().to_be();
                (*sin).sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            }
            (storage, std::mem::size_of::<libc::sockaddr_in>() as u32)
        }
        SocketAddr::V6(a) => {
            let sin6 = &mut storage as *mut _ as *mut libc::sockaddr_in6;
            unsafe {
                (*sin6).sin6_family = libc::AF_INET6 as u16;
                (*sin6).sin6_port = a.port().to_be();
                (*sin6).sin6_addr.s6_addr = a.ip().octets();
                (*sin6).sin6_scope_id = a.scope_id();
            }
            (storage, std::mem::size_of::<libc::sockaddr_in6>() as u32)
        }
    }
}
