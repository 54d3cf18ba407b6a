//! The BGP speaker: one session per configured peer, on a tokio runtime of its own thread. The
//! daemon tells it which peers exist ([`Speaker::configure`]) and what each should be told
//! ([`Speaker::advertise`]); stopping it says BFD AdminDown and then Cease on every session.
//! Peers with a BFD profile get a BFD session (`bfd::agent`) that takes the BGP session down
//! with it.
//!
//! Graceful restart (RFC 4724) is advertised to every peer with a restart time of 120 s. A
//! planned restart ([`Speaker::prepare_restart`]) asks the BFD peers to wait for the next
//! process, which carries the BFD sessions on Up, and closes the BGP sessions without Cease:
//! routers keep the routes while the next process starts, and forwarding goes on in the pinned
//! data plane. That process says in its first OPEN that it restarted with forwarding kept (R and
//! F bits). A process that dies unplanned stops sending BFD, and routers withdraw its routes
//! after the detection time, whatever graceful restart says; a fresh start (no data plane
//! adopted) clears the F bit, so routers drop stale routes at once.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use tokio::sync::watch;

use super::{
    advertise::Advertisements,
    fsm::Timing,
    session::{self, Routes, SessionConfig, SessionStatus},
};
use crate::config::Peer;

/// The kernel's `struct tcp_md5sig` (linux/tcp.h): the peer's address and the key.
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: i32,
    key: [u8; 80],
}

const TCP_MD5SIG: libc::c_int = 14;

/// Sets the TCP-MD5 key (RFC 2385) for segments to and from `peer` on socket `fd`.
pub fn set_md5(fd: i32, peer: IpAddr, key: &str) -> std::io::Result<()> {
    if key.is_empty() || key.len() > 80 {
        return Err(std::io::Error::other("a TCP-MD5 key has 1 to 80 bytes"));
    }
    let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
    sig.addr = crate::sockopt::sockaddr(SocketAddr::new(peer, 0)).0;
    sig.keylen = key.len() as u16;
    sig.key[..key.len()].copy_from_slice(key.as_bytes());
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            TCP_MD5SIG,
            &sig as *const _ as *const libc::c_void,
            std::mem::size_of::<TcpMd5Sig>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Where accepted connections go, by peer address.
type Inboxes = std::sync::Arc<
    std::sync::Mutex<BTreeMap<IpAddr, tokio::sync::mpsc::Sender<tokio::net::TcpStream>>>,
>;

struct Handle {
    config: SessionConfig,
    password: Option<String>,
    routes: watch::Sender<Routes>,
    status: watch::Receiver<SessionStatus>,
    stop: watch::Sender<bool>,
    done: std::sync::mpsc::Receiver<()>,
}

pub struct Speaker {
    inboxes: Inboxes,
    /// Listening sockets on port 179 (IPv4, IPv6), for the peers' MD5 keys.
    listeners: Vec<(bool, i32)>,
    runtime: tokio::runtime::Handle,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    sessions: BTreeMap<IpAddr, Handle>,
    /// BFD, while some peer has a profile.
    bfd: Option<crate::bfd::agent::Agent>,
    /// This process adopted a data plane that kept forwarding.
    restarted: bool,
    /// Where BFD sessions held for a planned restart are kept for the next process.
    bfd_state: Option<std::path::PathBuf>,
    /// Read from `bfd_state` at start: sessions to resume.
    carried: Vec<crate::bfd::agent::Carried>,
}

/// The file of BFD sessions held for a restart.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct CarriedFile {
    /// Unix milliseconds after which the peers no longer wait.
    until_unix_ms: u64,
    sessions: Vec<crate::bfd::agent::Carried>,
}

/// Takes (reads and deletes) the sessions a previous process held, if they are still waited for.
fn take_carried(path: &std::path::Path) -> Vec<crate::bfd::agent::Carried> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let _ = std::fs::remove_file(path);
    match serde_json::from_str::<CarriedFile>(&text) {
        Ok(f) if f.until_unix_ms > crate::mesh::now_ms() => f.sessions,
        Ok(_) => Vec::new(),
        Err(error) => {
            tracing::warn!(event = "bfdStateUnreadable", path = %path.display(), %error);
            Vec::new()
        }
    }
}

/// The router ID to use when the config names none: the source address if it is IPv4, else
/// the first IPv4 address of this host that is not loopback.
pub fn default_router_id(source: Option<IpAddr>) -> Ipv4Addr {
    if let Some(IpAddr::V4(v4)) = source {
        return v4;
    }
    crate::dataplane::ipv4_addresses()
        .into_iter()
        .map(|(_, ip)| ip)
        .find(|ip| !ip.is_loopback())
        .unwrap_or(Ipv4Addr::UNSPECIFIED)
}

/// A configured peer as a session.
pub fn session_config(
    peer: &Peer,
    ipv6_next_hop: Option<std::net::Ipv6Addr>,
    restarted: bool,
) -> SessionConfig {
    SessionConfig {
        peer: SocketAddr::new(peer.peer_address, peer.peer_port),
        source: peer.source_address,
        local_asn: peer.my_asn,
        peer_asn: peer.peer_asn,
        router_id: peer
            .router_id
            .unwrap_or_else(|| default_router_id(peer.source_address)),
        timing: Timing {
            hold_time: peer.hold_time,
            keepalive_time: peer.keepalive_time,
            connect_time: peer.connect_time.max(Duration::from_millis(100)),
        },
        restart_time: 120,
        ebgp_multi_hop: peer.ebgp_multi_hop,
        ipv6_next_hop,
        restarted,
        bfd: peer.bfd.is_some(),
    }
}

/// A configured peer's BFD session, if its BGPPeer names a profile. `ebgpMultiHop` peers get
/// multi-hop BFD (RFC 5883), the others single-hop (RFC 5881).
pub fn peer_bfd(peer: &Peer) -> Option<crate::bfd::agent::PeerBfd> {
    let profile = peer.bfd.as_ref()?;
    Some(crate::bfd::agent::PeerBfd {
        peer: peer.peer_address,
        local: peer.source_address,
        multihop: peer.ebgp_multi_hop,
        minimum_ttl: profile.minimum_ttl,
        settings: crate::bfd::session::Settings {
            desired_min_tx: profile.transmit_interval,
            required_min_rx: profile.receive_interval,
            detect_mult: profile.detect_multiplier,
            passive: profile.passive_mode,
        },
        profile: profile.name.clone(),
    })
}

impl Speaker {
    /// `restarted`: this process adopted a data plane that kept forwarding (see the module
    /// documentation). `bfd_state`: where BFD sessions are kept across a planned restart.
    pub fn new(restarted: bool, bfd_state: Option<std::path::PathBuf>) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (shutdown, until) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bgp".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = until.await;
                });
            })?;
        let inboxes: Inboxes = Default::default();
        let mut listeners = Vec::new();
        for v4 in [true, false] {
            let boxes = inboxes.clone();
            let result = handle.block_on_listener(v4);
            match result {
                Ok(listener) => {
                    use std::os::fd::AsRawFd;
                    listeners.push((v4, listener.as_raw_fd()));
                    handle.spawn(accept_loop(listener, boxes));
                }
                Err(error) => tracing::warn!(
                    event = "bgpListenFailed",
                    family = if v4 { "IPv4" } else { "IPv6" },
                    %error,
                    "peers connecting to us will not be answered; we still connect to them"
                ),
            }
        }
        Ok(Self {
            inboxes,
            listeners,
            runtime: handle,
            shutdown: Some(shutdown),
            thread: Some(thread),
            sessions: BTreeMap::new(),
            bfd: None,
            restarted,
            carried: bfd_state.as_deref().map(take_carried).unwrap_or_default(),
            bfd_state,
        })
    }

    /// Makes the sessions match `peers`: new peers start, removed ones stop with Cease, changed
    /// ones restart.
    pub fn configure(&mut self, peers: &[Peer], ipv6_next_hop: Option<std::net::Ipv6Addr>) {
        let wanted: BTreeMap<IpAddr, (SessionConfig, Option<String>)> = peers
            .iter()
            .map(|p| {
                (
                    p.peer_address,
                    (
                        session_config(p, ipv6_next_hop, self.restarted),
                        p.password.clone(),
                    ),
                )
            })
            .collect();
        let bfd: Vec<_> = peers.iter().filter_map(peer_bfd).collect();
        if bfd.is_empty() {
            if let Some(agent) = self.bfd.take() {
                agent.admin_down();
            }
        } else {
            self.bfd
                .get_or_insert_with(|| {
                    crate::bfd::agent::Agent::start(
                        &self.runtime,
                        std::mem::take(&mut self.carried),
                    )
                })
                .set(bfd);
        }
        let stale: Vec<IpAddr> = self
            .sessions
            .iter()
            .filter(|(ip, h)| {
                wanted
                    .get(ip)
                    .is_none_or(|(c, pw)| *c != h.config || *pw != h.password)
            })
            .map(|(ip, _)| *ip)
            .collect();
        for ip in stale {
            self.inboxes.lock().unwrap().remove(&ip);
            if let Some(handle) = self.sessions.remove(&ip) {
                stop_session(handle);
            }
        }
        for (ip, (config, password)) in wanted {
            if self.sessions.contains_key(&ip) {
                continue;
            }
            let (routes_tx, routes_rx) = watch::channel(Routes::new());
            let (status_tx, status_rx) = watch::channel(SessionStatus::default());
            let (stop_tx, stop_rx) = watch::channel(false);
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            let (inbox_tx, inbox_rx) = tokio::sync::mpsc::channel(4);
            self.inboxes.lock().unwrap().insert(ip, inbox_tx);
            if let Some(key) = &password {
                for (v4, fd) in &self.listeners {
                    if *v4 == ip.is_ipv4() {
                        if let Err(error) = set_md5(*fd, ip, key) {
                            tracing::warn!(event = "bgpListenerKeyFailed", peer = %ip, %error);
                        }
                    }
                }
            }
            let session = config.clone();
            let key = password.clone();
            let bfd = self.bfd.as_ref().and_then(|b| b.subscribe(ip));
            self.runtime.spawn(async move {
                session::run(session, key, routes_rx, status_tx, stop_rx, inbox_rx, bfd).await;
                let _ = done_tx.send(());
            });
            self.sessions.insert(
                ip,
                Handle {
                    config,
                    password,
                    routes: routes_tx,
                    status: status_rx,
                    stop: stop_tx,
                    done: done_rx,
                },
            );
        }
    }

    /// What each peer should be told now.
    pub fn advertise(&self, advertisements: &Advertisements) {
        for (ip, handle) in &self.sessions {
            let routes = advertisements.get(ip).cloned().unwrap_or_default();
            handle.routes.send_if_modified(|current| {
                let changed = *current != routes;
                *current = routes;
                changed
            });
        }
    }

    /// Every session's state, by peer.
    pub fn status(&self) -> Vec<(IpAddr, SessionStatus)> {
        self.sessions
            .iter()
            .map(|(ip, h)| (*ip, h.status.borrow().clone()))
            .collect()
    }

    /// Every BFD session's state, as /metrics and `sluice inspect` show it.
    pub fn bfd_statuses(&self) -> crate::metrics::BfdStatus {
        let Some(agent) = &self.bfd else {
            return Default::default();
        };
        crate::metrics::BfdStatus {
            sessions: agent
                .views()
                .into_iter()
                .map(|(peer, v)| crate::metrics::BfdSessionStatus::from_view(peer, &v))
                .collect(),
            dropped: agent
                .dropped()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        }
    }

    /// Before a planned restart: BFD asks the routers to wait `window` for this node, and the
    /// sessions are saved for the next process, which carries them on Up. The caller then leaves
    /// the BGP sessions open until the process ends (no Cease).
    pub fn prepare_restart(&self, window: Duration) {
        let Some(agent) = &self.bfd else {
            return;
        };
        let sessions = agent.hold_for_restart(window);
        let Some(path) = &self.bfd_state else {
            return;
        };
        let file = CarriedFile {
            until_unix_ms: crate::mesh::now_ms() + window.as_millis() as u64,
            sessions,
        };
        let text = serde_json::to_string(&file).unwrap_or_default();
        if let Err(error) = crate::standalone::write_atomically(path, &text) {
            tracing::warn!(event = "bfdStateNotSaved", path = %path.display(), error = %format!("{error:#}"));
        }
    }

    /// Every session's state, as /metrics and `sluice inspect` show it.
    pub fn session_statuses(&self) -> Vec<crate::metrics::BgpSessionStatus> {
        self.status()
            .into_iter()
            .map(|(peer, s)| crate::metrics::BgpSessionStatus {
                peer: peer.to_string(),
                state: format!("{:?}", s.state),
                uptime_seconds: s
                    .up_since
                    .and_then(|t| t.elapsed().ok())
                    .map(|d| d.as_secs()),
                prefixes_sent: s.prefixes_sent,
                updates_sent: s.updates_sent,
                updates_received: s.updates_received,
                notifications: s.notifications,
                last_error: s.last_error,
            })
            .collect()
    }

    /// Stops every session: BFD AdminDown, then Cease, waiting up to 2 s for each to say it.
    pub fn shutdown(mut self) {
        if let Some(agent) = self.bfd.take() {
            agent.admin_down();
        }
        for (_, handle) in std::mem::take(&mut self.sessions) {
            stop_session(handle);
        }
    }
}

fn stop_session(handle: Handle) {
    let _ = handle.stop.send(true);
    let _ = handle.done.recv_timeout(Duration::from_secs(2));
}

impl Drop for Speaker {
    fn drop(&mut self) {
        for (_, handle) in std::mem::take(&mut self.sessions) {
            stop_session(handle);
        }
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

trait ListenerExt {
    fn block_on_listener(&self, v4: bool) -> std::io::Result<tokio::net::TcpListener>;
}

impl ListenerExt for tokio::runtime::Handle {
    /// Binds port 179 for one family (IPv6 only on the IPv6 socket, so each family has its own
    /// socket and MD5 keys).
    fn block_on_listener(&self, v4: bool) -> std::io::Result<tokio::net::TcpListener> {
        let _guard = self.enter();
        let socket = if v4 {
            tokio::net::TcpSocket::new_v4()?
        } else {
            let socket = tokio::net::TcpSocket::new_v6()?;
            use std::os::fd::AsRawFd;
            let on: libc::c_int = 1;
            unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::IPPROTO_IPV6,
                    libc::IPV6_V6ONLY,
                    &on as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
            socket
        };
        socket.set_reuseaddr(true)?;
        let addr: SocketAddr = if v4 {
            "0.0.0.0:179".parse().unwrap()
        } else {
            "[::]:179".parse().unwrap()
        };
        socket.bind(addr)?;
        socket.listen(16)
    }
}

/// Hands each accepted connection to the session of the peer it comes from; others are closed.
async fn accept_loop(listener: tokio::net::TcpListener, inboxes: Inboxes) {
    loop {
        let Ok((stream, from)) = listener.accept().await else {
            continue;
        };
        let inbox = inboxes.lock().unwrap().get(&from.ip()).cloned();
        match inbox {
            Some(inbox) => {
                let _ = inbox.try_send(stream);
            }
            None => tracing::debug!(event = "unknownPeerRefused", peer = %from),
        }
    }
}
