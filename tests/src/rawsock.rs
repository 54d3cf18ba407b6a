//! A raw AF_PACKET socket on one interface: send a frame we built, collect the frames that come
//! back within a timeout. Used to ask real ARP/NDP questions across a veth, in the caller's
//! network namespace.

use std::{
    ffi::CString,
    time::{Duration, Instant},
};

pub struct RawSocket {
    fd: i32,
    ifindex: i32,
}

impl RawSocket {
    /// Opens a raw socket bound to `ifname` that sees every frame on it.
    pub fn open(ifname: &str) -> std::io::Result<Self> {
        Self::open_with(ifname, (libc::ETH_P_ALL as u16).to_be() as i32)
    }

    /// Opens a raw socket on `ifname` that only sends (receives nothing, so a flood it sends
    /// fills no receive buffer).
    pub fn open_send_only(ifname: &str) -> std::io::Result<Self> {
        Self::open_with(ifname, 0)
    }

    fn open_with(ifname: &str, proto: i32) -> std::io::Result<Self> {
        let c = CString::new(ifname).unwrap();
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) } as i32;
        if ifindex == 0 {
            return Err(std::io::Error::other(format!("no interface {ifname}")));
        }
        let fd =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let sock = Self { fd, ifindex };
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto as u16;
        addr.sll_ifindex = ifindex;
        let rc = unsafe {
            libc::bind(
                fd,
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(sock)
    }

    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        let rc = unsafe {
            libc::sendto(
                self.fd,
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Every incoming frame (not our own transmissions) that satisfies `keep`, until `timeout`.
    pub fn collect(&self, timeout: Duration, keep: impl Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut kept = Vec::new();
        while let Some(frame) = self.next_frame(deadline) {
            if keep(&frame) {
                kept.push(frame);
            }
        }
        kept
    }

    /// The first incoming frame that satisfies `keep` and when it came, if one comes before
    /// `timeout`.
    pub fn first(
        &self,
        timeout: Duration,
        keep: impl Fn(&[u8]) -> bool,
    ) -> Option<(Instant, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        while let Some(frame) = self.next_frame(deadline) {
            if keep(&frame) {
                return Some((Instant::now(), frame));
            }
        }
        None
    }

    /// The next incoming frame (not our own transmissions), or `None` at the deadline.
    fn next_frame(&self, deadline: Instant) -> Option<Vec<u8>> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: self.fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let rc = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
            if rc <= 0 {
                continue;
            }
            let mut buf = [0u8; 2048];
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            let n = unsafe {
                libc::recvfrom(
                    self.fd,
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                    &mut from as *mut _ as *mut libc::sockaddr,
                    &mut len,
                )
            };
            if n <= 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            return Some(buf[..n as usize].to_vec());
        }
    }
}

/// Sends `count` copies of the IPv4 TCP `template` frame (IP header at byte 14, no options)
/// out of `ifname` in the caller's namespace, from pseudo-random source addresses in
/// 10.0.0.0/8 and source ports, each source twice in a row: a SYN flood of new flows whose
/// retransmission makes each look used (the kernel's LRU maps protect entries looked up after
/// their insertion from one-packet scans). Checksums are left stale (a receiving kernel drops
/// the segments). Returns how many the kernel accepted to send.
pub fn flood(ifname: &str, template: &[u8], count: usize) -> std::io::Result<usize> {
    let sock = RawSocket::open_send_only(ifname)?;
    let mut frame = template.to_vec();
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut sent = 0;
    for i in 0..count {
        if i % 2 == 0 {
            // xorshift64: cheap, and no two sources alike.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let r = state.to_be_bytes();
            frame[26..30].copy_from_slice(&[10, r[0], r[1], r[2]]);
            frame[34..36].copy_from_slice(&[r[3] | 0x80, r[4]]);
        }
        if sock.send(&frame).is_ok() {
            sent += 1;
        }
    }
    Ok(sent)
}

impl Drop for RawSocket {
    fn drop(&mut self) {
        unsafe { libc::close(self.fd) };
    }
}
