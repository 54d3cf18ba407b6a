//! The BFD edge: the sockets, and one task that runs every session's state machine and timers.
//!
//! Received packets arrive on four sockets, one per family and kind (single-hop UDP 3784,
//! multi-hop UDP 4784), read with their TTL (`IP_RECVTTL` / `IPV6_RECVHOPLIMIT`): single-hop
//! packets must arrive with 255 (RFC 5881 §5, the GTSM rule), multi-hop ones with at least the
//! profile's minimum TTL. Each session sends from a socket of its own, bound to a source port in
//! 49152–65535 with TTL 255. A packet is matched to its session by Your Discriminator, or by its
//! source address while the peer does not know ours yet. Whatever fails a check is dropped and
//! counted by reason, never logged per packet.
//!
//! BGP sessions watch their peer's [`View`]; a session that was Up and goes Down for a failure
//! (not because the peer said AdminDown) takes the BGP session down with it.
//!
//! Across a planned restart the sessions stay Up: [`Agent::hold_for_restart`] asks each peer to
//! wait (see `session`), and returns what the next process passes to [`Agent::start`] (the BGP
//! speaker keeps it in a file).

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, RawFd},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::sync::{mpsc, watch};

use crate::sockopt::{set_int, set_ttl, sockaddr};

use super::{
    packet::{self, Diag, Drop, Packet, State},
    session::{Output, Saved, Session, Settings},
};

/// A session carried over a planned restart.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Carried {
    pub peer: IpAddr,
    pub multihop: bool,
    pub saved: Saved,
}

pub const SINGLE_HOP_PORT: u16 = 3784;
pub const MULTI_HOP_PORT: u16 = 4784;

/// One peer's BFD, as the configuration asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerBfd {
    pub peer: IpAddr,
    /// The BGP session's source address, when configured.
    pub local: Option<IpAddr>,
    pub multihop: bool,
    /// Multi-hop only: packets with a lower TTL are dropped.
    pub minimum_ttl: u8,
    pub settings: Settings,
    /// The profile's name, for display.
    pub profile: String,
}

/// What the daemon and the BGP session see of a BFD session.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub profile: String,
    pub multihop: bool,
    pub state: State,
    pub remote_state: State,
    /// Why the session last left Up (or was never up: "none").
    pub diag: Diag,
    pub since: SystemTime,
    pub local_discriminator: u32,
    pub remote_discriminator: u32,
    pub detection_time: Duration,
    pub transmit_interval: Duration,
    /// Transitions by (new state, reason).
    pub transitions: BTreeMap<(&'static str, &'static str), u64>,
    pub error: Option<String>,
}

impl View {
    /// Down because the path failed: the detection time expired, or the peer said Down (not
    /// AdminDown, which RFC 5882 §3.2 says must not be taken as a failure).
    pub fn failed(&self) -> bool {
        self.state == State::Down && self.remote_state != State::AdminDown
    }
}

/// Drop counters, by reason.
pub type Dropped = Arc<Mutex<BTreeMap<&'static str, u64>>>;

enum Command {
    Set(Vec<PeerBfd>),
    /// Every session to AdminDown, said three times 20 ms apart; answers when done.
    AdminDown(std::sync::mpsc::Sender<()>),
    /// Every Up session asks its peer to wait this long (said three times 20 ms apart); answers
    /// with what the next process needs.
    Hold(Duration, std::sync::mpsc::Sender<Vec<Carried>>),
}

/// The handle the BGP speaker keeps; the task ends when it is dropped.
pub struct Agent {
    commands: mpsc::UnboundedSender<Command>,
    views: Arc<Mutex<BTreeMap<IpAddr, watch::Sender<View>>>>,
    dropped: Dropped,
}

impl Agent {
    /// Opens the receiving sockets and starts the task on `runtime`. A socket that cannot be
    /// opened (the port is taken, no IPv6) is reported in every session's `error` that needs it.
    /// `carried`: sessions the previous process held for its restart, resumed Up.
    pub fn start(runtime: &tokio::runtime::Handle, carried: Vec<Carried>) -> Self {
        let (commands, rx) = mpsc::unbounded_channel();
        let views: Arc<Mutex<BTreeMap<IpAddr, watch::Sender<View>>>> = Default::default();
        let dropped: Dropped = Default::default();
        let _guard = runtime.enter();
        let (packets_tx, packets_rx) = mpsc::channel(1024);
        let mut socket_errors = BTreeMap::new();
        for (v4, multihop) in [(true, false), (false, false), (true, true), (false, true)] {
            let port = if multihop {
                MULTI_HOP_PORT
            } else {
                SINGLE_HOP_PORT
            };
            match receive_socket(v4, port) {
                Ok(socket) => {
                    runtime.spawn(receive_loop(socket, multihop, packets_tx.clone()));
                }
                Err(error) => {
                    let family = if v4 { "IPv4" } else { "IPv6" };
                    tracing::warn!(event = "bfdListenFailed", family, port, %error);
                    socket_errors.insert((v4, multihop), format!("UDP {port}: {error}"));
                }
            }
        }
        runtime.spawn(run(
            rx,
            packets_rx,
            Task {
                sessions: BTreeMap::new(),
                views: views.clone(),
                dropped: dropped.clone(),
                socket_errors,
                carried,
            },
        ));
        Self {
            commands,
            views,
            dropped,
        }
    }

    /// Makes the sessions match `peers`: new ones start Down, removed ones say AdminDown and
    /// stop, changed ones restart.
    pub fn set(&self, peers: Vec<PeerBfd>) {
        {
            let mut views = self.views.lock().unwrap();
            views.retain(|ip, _| peers.iter().any(|p| p.peer == *ip));
            for p in &peers {
                views.entry(p.peer).or_insert_with(|| {
                    watch::channel(View {
                        profile: p.profile.clone(),
                        multihop: p.multihop,
                        state: State::Down,
                        remote_state: State::Down,
                        diag: Diag::None,
                        since: SystemTime::now(),
                        local_discriminator: 0,
                        remote_discriminator: 0,
                        detection_time: Duration::ZERO,
                        transmit_interval: Duration::ZERO,
                        transitions: BTreeMap::new(),
                        error: None,
                    })
                    .0
                });
            }
        }
        let _ = self.commands.send(Command::Set(peers));
    }

    /// What a BGP session watches; `None` when the peer has no BFD.
    pub fn subscribe(&self, peer: IpAddr) -> Option<watch::Receiver<View>> {
        self.views.lock().unwrap().get(&peer).map(|v| v.subscribe())
    }

    /// Every session's view, by peer.
    pub fn views(&self) -> Vec<(IpAddr, View)> {
        self.views
            .lock()
            .unwrap()
            .iter()
            .map(|(ip, v)| (*ip, v.borrow().clone()))
            .collect()
    }

    pub fn dropped(&self) -> BTreeMap<&'static str, u64> {
        self.dropped.lock().unwrap().clone()
    }

    /// Before a planned restart: every Up session asks its peer to wait `window` for us. Returns
    /// what [`Agent::start`] needs to carry the sessions on. Waits at most 200 ms; call from
    /// outside the agent's runtime.
    pub fn hold_for_restart(&self, window: Duration) -> Vec<Carried> {
        let (done, wait) = std::sync::mpsc::channel();
        if self.commands.send(Command::Hold(window, done)).is_ok() {
            return wait
                .recv_timeout(Duration::from_millis(200))
                .unwrap_or_default();
        }
        Vec::new()
    }

    /// Tells every peer the sessions go down on purpose (before a stop: routers take BGP down
    /// with it), waiting at most 200 ms. Call from outside the agent's runtime.
    pub fn admin_down(&self) {
        let (done, wait) = std::sync::mpsc::channel();
        if self.commands.send(Command::AdminDown(done)).is_ok() {
            let _ = wait.recv_timeout(Duration::from_millis(200));
        }
    }
}

/// A received datagram: bytes, source, TTL, and the socket's kind.
struct Received {
    bytes: Vec<u8>,
    from: IpAddr,
    ttl: Option<u8>,
    multihop: bool,
}

struct Entry {
    spec: PeerBfd,
    session: Session,
    socket: Option<UdpSocket>,
}

/// Everything the task owns: the sessions and what they publish.
struct Task {
    sessions: BTreeMap<IpAddr, Entry>,
    views: Arc<Mutex<BTreeMap<IpAddr, watch::Sender<View>>>>,
    dropped: Dropped,
    socket_errors: BTreeMap<(bool, bool), String>,
    /// Sessions held by the previous process, not yet taken back.
    carried: Vec<Carried>,
}

async fn run(
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut packets: mpsc::Receiver<Received>,
    mut task: Task,
) {
    loop {
        let deadline = task
            .sessions
            .values()
            .filter_map(|e| e.session.next_deadline())
            .min()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            command = commands.recv() => match command {
                // The handle is gone (the speaker stopped without saying how): AdminDown.
                None => {
                    task.admin_down(1).await;
                    return;
                }
                Some(Command::Set(peers)) => task.set(peers),
                Some(Command::AdminDown(done)) => {
                    task.admin_down(3).await;
                    let _ = done.send(());
                }
                Some(Command::Hold(window, done)) => {
                    let _ = done.send(task.hold(window).await);
                    // Nothing more is sent: the process is about to end.
                    return;
                }
            },
            _ = tokio::time::sleep_until(deadline) => task.tick(),
            Some(received) = packets.recv() => task.receive(received),
        }
    }
}

impl Task {
    fn count(&self, reason: Drop) {
        *self
            .dropped
            .lock()
            .unwrap()
            .entry(reason.label())
            .or_insert(0) += 1;
    }

    /// Makes the sessions match `peers` (see [`Agent::set`]).
    fn set(&mut self, peers: Vec<PeerBfd>) {
        let now = std::time::Instant::now();
        // Same peer, addresses and kind: new timers go in by a Poll Sequence.
        for spec in &peers {
            if let Some(entry) = self.sessions.get_mut(&spec.peer) {
                let same_path =
                    (spec.local, spec.multihop) == (entry.spec.local, entry.spec.multihop);
                if same_path && *spec != entry.spec {
                    entry.session.reconfigure(spec.settings);
                    entry.spec = spec.clone();
                    tracing::info!(event = "bfdSessionReconfigured", peer = %spec.peer, profile = %spec.profile);
                    publish(entry, &self.views, |_| {});
                }
            }
        }
        let stale: Vec<IpAddr> = self
            .sessions
            .iter()
            .filter(|(ip, e)| !peers.iter().any(|p| p.peer == **ip && *p == e.spec))
            .map(|(ip, _)| *ip)
            .collect();
        for ip in stale {
            if let Some(mut entry) = self.sessions.remove(&ip) {
                let out = entry.session.admin_down(now, 0.0);
                perform(&mut entry, out, &self.views);
            }
        }
        for spec in peers {
            if !self.sessions.contains_key(&spec.peer) {
                self.add(spec, now);
            }
        }
    }

    fn add(&mut self, spec: PeerBfd, now: std::time::Instant) {
        let socket_error = self
            .socket_errors
            .get(&(spec.peer.is_ipv4(), spec.multihop))
            .cloned();
        let (socket, error) = match send_socket(&spec) {
            Ok(s) => (Some(s), socket_error),
            Err(e) => (None, Some(format!("send socket: {e}"))),
        };
        if let Some(error) = &error {
            tracing::warn!(event = "bfdSocketFailed", peer = %spec.peer, %error);
        }
        let resumed = self
            .carried
            .iter()
            .position(|c| c.peer == spec.peer && c.multihop == spec.multihop)
            .map(|i| self.carried.swap_remove(i));
        let session = match resumed {
            Some(c) => {
                tracing::info!(event = "bfdSessionResumed", peer = %spec.peer, profile = %spec.profile, discriminator = c.saved.local_discriminator);
                Session::resume(spec.settings, c.saved, now)
            }
            None => {
                tracing::info!(event = "bfdSessionAdded", peer = %spec.peer, profile = %spec.profile, multihop = spec.multihop);
                Session::new(spec.settings, self.new_discriminator(), now)
            }
        };
        let entry = Entry {
            session,
            spec,
            socket,
        };
        publish(&entry, &self.views, |v| v.error = error.clone());
        self.sessions.insert(entry.spec.peer, entry);
    }

    /// A random non-zero discriminator no session uses, nor one still to be resumed.
    fn new_discriminator(&self) -> u32 {
        loop {
            let d = random_u32();
            let taken = self
                .sessions
                .values()
                .any(|e| e.session.local_discriminator() == d)
                || self
                    .carried
                    .iter()
                    .any(|c| c.saved.local_discriminator == d);
            if d != 0 && !taken {
                return d;
            }
        }
    }

    /// Every session to AdminDown, said `times` times 20 ms apart.
    async fn admin_down(&mut self, times: usize) {
        for round in 0..times {
            for entry in self.sessions.values_mut() {
                let out = if round == 0 {
                    entry.session.admin_down(std::time::Instant::now(), 0.0)
                } else {
                    vec![Output::Send(entry.session.current_packet())]
                };
                perform(entry, out, &self.views);
            }
            if round + 1 < times {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Every Up session asks its peer to wait `window` (said three times 20 ms apart); what the
    /// next process needs to carry them on.
    async fn hold(&mut self, window: Duration) -> Vec<Carried> {
        let mut kept = Vec::new();
        let mut packets = Vec::new();
        for (ip, entry) in self.sessions.iter_mut() {
            if let Some((saved, packet)) = entry.session.hold_for(window) {
                kept.push(Carried {
                    peer: *ip,
                    multihop: entry.spec.multihop,
                    saved,
                });
                packets.push((*ip, packet));
            }
        }
        for _ in 0..3 {
            for (ip, packet) in &packets {
                if let Some(entry) = self.sessions.get_mut(ip) {
                    perform(entry, vec![Output::Send(*packet)], &self.views);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!(
            event = "bfdHeldForRestart",
            sessions = kept.len(),
            window_s = window.as_secs_f64()
        );
        kept
    }

    /// The timers that are due.
    fn tick(&mut self) {
        let now = std::time::Instant::now();
        for entry in self.sessions.values_mut() {
            if entry.session.next_deadline().is_some_and(|t| t <= now) {
                let out = entry.session.tick(now, jitter());
                perform(entry, out, &self.views);
            }
        }
    }

    /// A datagram: decoded, matched to its session, its TTL checked, then the state machine's.
    fn receive(&mut self, received: Received) {
        let packet = match packet::decode(&received.bytes) {
            Ok(p) => p,
            Err(reason) => return self.count(reason),
        };
        let Some(entry) = find(&mut self.sessions, &packet, &received) else {
            return self.count(Drop::UnknownSession);
        };
        let ttl_ok = match (received.multihop, received.ttl) {
            (false, ttl) => ttl == Some(255),
            (true, ttl) => ttl.is_some_and(|t| t >= entry.spec.minimum_ttl),
        };
        if !ttl_ok {
            return self.count(Drop::Ttl);
        }
        let out = entry
            .session
            .receive(&packet, std::time::Instant::now(), jitter());
        perform(entry, out, &self.views);
    }
}

/// The session a packet belongs to: by Your Discriminator (and then it must come from that
/// session's peer, on the right port), or, while zero, by source address.
fn find<'a>(
    sessions: &'a mut BTreeMap<IpAddr, Entry>,
    packet: &Packet,
    received: &Received,
) -> Option<&'a mut Entry> {
    let entry = if packet.your_discriminator != 0 {
        sessions
            .values_mut()
            .find(|e| e.session.local_discriminator() == packet.your_discriminator)?
    } else {
        sessions.get_mut(&received.from)?
    };
    (entry.spec.peer == received.from && entry.spec.multihop == received.multihop).then_some(entry)
}

fn perform(
    entry: &mut Entry,
    out: Vec<Output>,
    views: &Arc<Mutex<BTreeMap<IpAddr, watch::Sender<View>>>>,
) {
    let port = if entry.spec.multihop {
        MULTI_HOP_PORT
    } else {
        SINGLE_HOP_PORT
    };
    for output in out {
        match output {
            Output::Send(packet) => {
                if let Some(socket) = &entry.socket {
                    // Non-blocking; a full buffer loses one packet, which BFD tolerates.
                    let _ = socket.send_to(
                        &packet::encode(&packet),
                        SocketAddr::new(entry.spec.peer, port),
                    );
                }
            }
            Output::Changed { from, to, diag } => {
                let peer = entry.spec.peer;
                let (from, to_name, reason) = (from.name(), to.name(), diag.reason());
                match to {
                    State::Up => {
                        tracing::info!(event = "bfdSessionUp", %peer, from)
                    }
                    State::Init => {
                        tracing::info!(event = "bfdSessionInit", %peer, from)
                    }
                    State::Down | State::AdminDown => {
                        tracing::warn!(event = "bfdSessionDown", %peer, from, to = to_name, reason)
                    }
                }
                publish(entry, views, |v| {
                    v.since = SystemTime::now();
                    *v.transitions.entry((to_name, reason)).or_insert(0) += 1;
                });
            }
        }
    }
    publish(entry, views, |_| {});
}

fn publish(
    entry: &Entry,
    views: &Arc<Mutex<BTreeMap<IpAddr, watch::Sender<View>>>>,
    extra: impl FnOnce(&mut View),
) {
    let views = views.lock().unwrap();
    let Some(view) = views.get(&entry.spec.peer) else {
        return;
    };
    let s = &entry.session;
    view.send_if_modified(|v| {
        let before = v.clone();
        v.profile = entry.spec.profile.clone();
        v.multihop = entry.spec.multihop;
        v.state = s.state();
        v.remote_state = s.remote_state();
        v.diag = s.diag();
        v.local_discriminator = s.local_discriminator();
        v.remote_discriminator = s.remote_discriminator();
        v.detection_time = s.detection_time();
        v.transmit_interval = s.transmit_interval();
        extra(v);
        // Only state changes wake the BGP sessions; the rest is read when asked.
        (v.state, v.remote_state) != (before.state, before.remote_state)
    });
}

fn random_u32() -> u32 {
    let mut bytes = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    u32::from_ne_bytes(bytes)
}

/// Uniform in [0, 1): the transmit jitter.
fn jitter() -> f64 {
    f64::from(random_u32()) / 4_294_967_296.0
}

fn udp_socket(v4: bool) -> io::Result<UdpSocket> {
    let family = if v4 { libc::AF_INET } else { libc::AF_INET6 };
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // Owned from here: dropped (closed) on any error below.
    let socket = unsafe { UdpSocket::from_raw_fd(fd) };
    if !v4 {
        set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    Ok(socket)
}

/// A receiving socket on `port` that reports each datagram's TTL / hop limit.
fn receive_socket(v4: bool, port: u16) -> io::Result<tokio::net::UdpSocket> {
    let socket = udp_socket(v4)?;
    let fd = socket.as_raw_fd();
    // No SO_REUSEADDR: another BFD daemon on the port is an error to report, not a silent share.
    if v4 {
        set_int(fd, libc::IPPROTO_IP, libc::IP_RECVTTL, 1)?;
    } else {
        set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT, 1)?;
    }
    let addr = if v4 {
        SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port)
    } else {
        SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port)
    };
    bind(&socket, addr)?;
    tokio::net::UdpSocket::from_std(socket)
}

fn bind(socket: &UdpSocket, addr: SocketAddr) -> io::Result<()> {
    let (storage, len) = sockaddr(addr);
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            &storage as *const _ as *const libc::sockaddr,
            len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A session's sending socket: source port in 49152–65535 (RFC 5881 §4), TTL 255.
fn send_socket(spec: &PeerBfd) -> io::Result<UdpSocket> {
    let v4 = spec.peer.is_ipv4();
    let socket = udp_socket(v4)?;
    let fd = socket.as_raw_fd();
    set_ttl(fd, v4, 255)?;
    let local = spec.local.filter(|l| l.is_ipv4() == v4).unwrap_or(if v4 {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    });
    let mut last = io::Error::other("no free source port");
    for _ in 0..64 {
        let port = 49152 + (random_u32() % 16384) as u16;
        match bind(&socket, SocketAddr::new(local, port)) {
            Ok(()) => return Ok(socket),
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn receive_loop(
    socket: tokio::net::UdpSocket,
    multihop: bool,
    packets: mpsc::Sender<Received>,
) {
    let mut buf = [0u8; 512];
    loop {
        // Ends (closing the socket) as soon as the agent is gone.
        tokio::select! {
            ready = socket.readable() => if ready.is_err() { return },
            _ = packets.closed() => return,
        }
        let fd = socket.as_raw_fd();
        match socket.try_io(tokio::io::Interest::READABLE, || {
            recv_with_ttl(fd, &mut buf)
        }) {
            Ok((n, from, ttl)) => {
                let from = match from {
                    IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(from),
                    v4 => v4,
                };
                let received = Received {
                    bytes: buf[..n].to_vec(),
                    from,
                    ttl,
                    multihop,
                };
                // A flood fills the queue; what does not fit is lost, as on a busy wire.
                if let Err(mpsc::error::TrySendError::Closed(_)) = packets.try_send(received) {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => {
                tracing::debug!(event = "bfdReceiveFailed", %error);
            }
        }
    }
}

/// `recvmsg` with the TTL (IPv4) or hop limit (IPv6) from the control messages.
fn recv_with_ttl(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, IpAddr, Option<u8>)> {
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut control = [0u64; 16];
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = &mut storage as *mut _ as *mut libc::c_void;
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&control);
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut ttl = None;
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let c = &*cmsg;
            if (c.cmsg_level == libc::IPPROTO_IP && c.cmsg_type == libc::IP_TTL)
                || (c.cmsg_level == libc::IPPROTO_IPV6 && c.cmsg_type == libc::IPV6_HOPLIMIT)
            {
                let value = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::c_int);
                ttl = u8::try_from(value).ok();
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    let from = match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            let sin = unsafe { &*(&storage as *const _ as *const libc::sockaddr_in) };
            IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
        }
        libc::AF_INET6 => {
            let sin6 = unsafe { &*(&storage as *const _ as *const libc::sockaddr_in6) };
            IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
        }
        _ => return Err(io::Error::other("datagram from an unknown address family")),
    };
    Ok((n as usize, from, ttl))
}
