//! One BGP session, driven on tokio: performs what [`Fsm`] decides (connect, send, close),
//! feeds back what happens (bytes, timers, errors), and keeps the peer's view of our routes equal
//! to the latest advertisement set: the full table and End-of-RIB once Established, then only
//! the differences.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use ipnet::IpNet;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    sync::watch,
    time::Instant,
};

use super::{
    advertise::RouteAttributes,
    fsm::{Action, Event, Fsm, State, Timing},
    wire::{self, Attributes, BgpMessage, Families, OpenParams, Reader},
};

/// The routes owed to one peer.
pub type Routes = BTreeMap<IpNet, RouteAttributes>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    pub peer: SocketAddr,
    pub source: Option<IpAddr>,
    pub local_asn: u32,
    pub peer_asn: u32,
    pub router_id: std::net::Ipv4Addr,
    pub timing: Timing,
    pub restart_time: u16,
    /// eBGP to a peer more than one hop away: a normal TTL. Otherwise eBGP packets leave with
    /// TTL 1, as a directly connected eBGP session expects (RFC 4271 §5.1.3 practice).
    pub ebgp_multi_hop: bool,
    /// Next hop of IPv6 routes when the session runs over IPv4 (the node's IPv6 address).
    pub ipv6_next_hop: Option<std::net::Ipv6Addr>,
    /// This process took over a data plane that kept forwarding (pinned links adopted): the
    /// first OPEN says so (graceful restart R and F bits), and the peer keeps our routes until
    /// our End-of-RIB. A fresh start says the opposite, and the peer drops stale routes at once.
    pub restarted: bool,
    /// BFD runs with this peer.
    pub bfd: bool,
}

/// What the daemon sees of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionStatus {
    pub state: State,
    pub up_since: Option<std::time::SystemTime>,
    pub prefixes_sent: usize,
    pub updates_sent: u64,
    pub updates_received: u64,
    pub notifications: u64,
    pub last_error: Option<String>,
}

impl Default for SessionStatus {
    fn default() -> Self {
        Self {
            state: State::Idle,
            up_since: None,
            prefixes_sent: 0,
            updates_sent: 0,
            updates_received: 0,
            notifications: 0,
            last_error: None,
        }
    }
}

async fn connect(config: &SessionConfig, password: Option<&str>) -> std::io::Result<TcpStream> {
    let socket = if config.peer.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(key) = password {
        use std::os::fd::AsRawFd;
        super::speaker::set_md5(socket.as_raw_fd(), config.peer.ip(), key)?;
    }
    if config.local_asn != config.peer_asn && !config.ebgp_multi_hop {
        use std::os::fd::AsRawFd;
        crate::sockopt::set_ttl(socket.as_raw_fd(), config.peer.is_ipv4(), 1)?;
    }
    if let Some(source) = config.source {
        socket.bind(SocketAddr::new(source, 0))?;
    }
    tokio::time::timeout(Duration::from_secs(5), socket.connect(config.peer))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

struct Conn {
    stream: TcpStream,
    reader: Reader,
    next_hop: IpAddr,
    /// What the peer has from us now.
    sent: Routes,
    /// The families the peer's OPEN negotiated; nothing else is sent to it.
    families: Families,
}

/// Runs a session until `stop` turns true; then sends Cease and returns.
pub async fn run(
    config: SessionConfig,
    password: Option<String>,
    mut routes: watch::Receiver<Routes>,
    status: watch::Sender<SessionStatus>,
    mut stop: watch::Receiver<bool>,
    mut incoming: tokio::sync::mpsc::Receiver<TcpStream>,
    mut bfd: Option<watch::Receiver<crate::bfd::agent::View>>,
) {
    let mut fsm = Fsm::new(config.timing);
    let mut established_once = false;
    let mut bfd_up = bfd
        .as_ref()
        .is_some_and(|b| b.borrow().state == crate::bfd::packet::State::Up);
    let mut conn: Option<Conn> = None;
    // A connection the peer opened while ours was in OpenSent: kept until the peer's BGP
    // identifier (from its OPEN on our connection) decides the collision (RFC 4271 §6.8).
    let mut waiting: Option<TcpStream> = None;
    let mut pending = fsm.handle(Event::Start, std::time::Instant::now());
    loop {
        // Perform what the state machine asked for; each may produce more events.
        while !pending.is_empty() {
            let actions = std::mem::take(&mut pending);
            for action in actions {
                let restart = Restart {
                    restarting: config.restarted && !established_once,
                    forwarding_preserved: config.restarted || established_once,
                };
                let events = perform(
                    &config,
                    password.as_deref(),
                    &mut conn,
                    &routes,
                    &status,
                    action,
                    restart,
                )
                .await;
                for event in events {
                    pending.extend(fsm.handle(event, std::time::Instant::now()));
                }
            }
        }
        status.send_modify(|s| s.state = fsm.state());
        established_once |= fsm.state() == State::Established;
        if *stop.borrow() {
            for action in fsm.handle(Event::Stop, std::time::Instant::now()) {
                let _ = perform(
                    &config,
                    password.as_deref(),
                    &mut conn,
                    &routes,
                    &status,
                    action,
                    Restart::default(),
                )
                .await;
            }
            status.send_modify(|s| s.state = State::Idle);
            return;
        }
        let deadline = fsm
            .next_deadline()
            .map(Instant::from_std)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let mut buf = [0u8; 4096];
        // A collision waiting for the peer's identifier, now known (OpenConfirm)?
        if let (Some(_), State::OpenConfirm) = (&waiting, fsm.state()) {
            let stream = waiting.take().expect("checked");
            if let Some(actions) = resolve_collision(&config, &mut fsm, &mut conn, stream).await {
                pending.extend(actions);
                continue;
            }
        }
        if conn.is_none() {
            if let Some(stream) = waiting.take() {
                pending.extend(adopt(&config, &mut fsm, &mut conn, stream));
                continue;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                pending.extend(fsm.tick(std::time::Instant::now()));
            }
            _ = stop.changed() => {}
            changed = async {
                match bfd.as_mut() {
                    Some(view) => view.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                match changed {
                    Err(_) => bfd = None,
                    Ok(()) => {
                        let view = bfd.as_mut().expect("watching BFD").borrow_and_update().clone();
                        let up = view.state == crate::bfd::packet::State::Up;
                        if bfd_up && view.failed() {
                            let reason = view.diag.reason().to_string();
                            tracing::warn!(event = "bgpDownByBfd", peer = %config.peer, %reason);
                            pending.extend(fsm.handle(Event::BfdDown(reason), std::time::Instant::now()));
                        }
                        bfd_up = up;
                    }
                }
            }
            Some(stream) = incoming.recv() => {
                match fsm.state() {
                    State::Established => {
                        // RFC 4271 §6.8: an Established session wins; the new one is refused.
                        let mut stream = stream;
                        let _ = stream.write_all(&wire::notification_bytes(6, 7)).await;
                    }
                    State::OpenSent | State::OpenConfirm if conn.is_some() => {
                        waiting = Some(stream);
                    }
                    _ => {
                        if let Some(mut c) = conn.take() {
                            let _ = c.stream.shutdown().await;
                        }
                        pending.extend(adopt(&config, &mut fsm, &mut conn, stream));
                    }
                }
            }
            changed = routes.changed(), if fsm.state() == State::Established => {
                if changed.is_ok() {
                    if let Some(c) = conn.as_mut() {
                        let wanted = routes.borrow().clone();
                        if let Err(e) = sync_routes(&config, c, &wanted, &status).await {
                            pending.extend(fsm.handle(Event::TcpFailed, std::time::Instant::now()));
                            status.send_modify(|s| s.last_error = Some(e));
                        }
                    }
                }
            }
            read = async {
                match conn.as_mut() {
                    Some(c) => c.stream.read(&mut buf).await,
                    None => std::future::pending().await,
                }
            } => {
                let now = std::time::Instant::now();
                match read {
                    Ok(0) | Err(_) => pending.extend(fsm.handle(Event::TcpFailed, now)),
                    Ok(n) => {
                        let mut refresh = false;
                        let c = conn.as_mut().expect("reading from a connection");
                        c.reader.feed(&buf[..n]);
                        loop {
                            match c.reader.next_message() {
                                Ok(None) => break,
                                Ok(Some(message)) => {
                                    let event = match message {
                                        BgpMessage::Open(open) => match wire::check_open(&open, config.peer_asn) {
                                            Ok(peer) => {
                                                c.families = Families::of(&peer);
                                                Event::OpenReceived(peer)
                                            }
                                            Err(n) => Event::ProtocolError { code: n.code, subcode: n.subcode },
                                        },
                                        BgpMessage::KeepAlive => Event::KeepaliveReceived,
                                        BgpMessage::Update(_) => {
                                            // Routers echo our own routes (FRR does): read, count, never install.
                                            status.send_modify(|s| s.updates_received += 1);
                                            Event::UpdateReceived
                                        }
                                        BgpMessage::RouteRefresh(_) => {
                                            // RFC 2918: the peer wants our routes again.
                                            refresh = true;
                                            Event::UpdateReceived
                                        }
                                        BgpMessage::Notification(n) => {
                                            let bytes = wire::encode(&BgpMessage::Notification(n), true).unwrap_or_default();
                                            status.send_modify(|s| s.notifications += 1);
                                            Event::NotificationReceived {
                                                code: bytes.get(19).copied().unwrap_or(0),
                                                subcode: bytes.get(20).copied().unwrap_or(0),
                                            }
                                        }
                                    };
                                    pending.extend(fsm.handle(event, now));
                                }
                                Err(n) => {
                                    pending.extend(fsm.handle(Event::ProtocolError { code: n.code, subcode: n.subcode }, now));
                                    break;
                                }
                            }
                        }
                        if refresh && fsm.state() == State::Established {
                            if let Some(c) = conn.as_mut() {
                                c.sent.clear();
                                let wanted = routes.borrow().clone();
                                let resent = async {
                                    sync_routes(&config, c, &wanted, &status).await?;
                                    send_end_of_ribs(c).await
                                }
                                .await;
                                if resent.is_err() {
                                    pending.extend(fsm.handle(Event::TcpFailed, now));
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Takes a connection the peer opened as the session's connection: a fresh state machine that
/// starts from "connected" (it sends our OPEN).
fn adopt(
    config: &SessionConfig,
    fsm: &mut Fsm,
    conn: &mut Option<Conn>,
    stream: TcpStream,
) -> Vec<Action> {
    let now = std::time::Instant::now();
    *fsm = Fsm::new(config.timing);
    let _ = fsm.handle(Event::Start, now);
    *conn = Some(new_conn(stream));
    tracing::info!(event = "peerConnected", peer = %config.peer);
    fsm.handle(Event::TcpConnected, now)
}

fn new_conn(stream: TcpStream) -> Conn {
    let next_hop = stream
        .local_addr()
        .map(|a| a.ip())
        .map(|ip| match ip {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        })
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let _ = stream.set_nodelay(true);
    Conn {
        stream,
        reader: Reader::new(true),
        next_hop,
        sent: Routes::new(),
        families: Families {
            ipv4: true,
            ipv6: true,
        },
    }
}

/// RFC 4271 §6.8: of two connections, the one opened by the speaker with the higher BGP
/// identifier stays; the other gets Cease / Connection Collision Resolution (6/7).
/// `Some(actions)` when the peer's connection won and was adopted.
async fn resolve_collision(
    config: &SessionConfig,
    fsm: &mut Fsm,
    conn: &mut Option<Conn>,
    mut theirs: TcpStream,
) -> Option<Vec<Action>> {
    let peer_id = fsm.peer_router_id()?;
    if u32::from(config.router_id) > u32::from(peer_id) {
        let _ = theirs.write_all(&wire::notification_bytes(6, 7)).await;
        return None;
    }
    if let Some(mut ours) = conn.take() {
        let _ = ours.stream.write_all(&wire::notification_bytes(6, 7)).await;
        let _ = ours.stream.shutdown().await;
    }
    tracing::info!(event = "collisionResolved", peer = %config.peer, kept = "theirs");
    Some(adopt(config, fsm, conn, theirs))
}

async fn send_end_of_ribs(conn: &mut Conn) -> Result<(), String> {
    for message in wire::end_of_ribs(conn.families) {
        send(conn, &message).await?;
    }
    Ok(())
}

async fn send(conn: &mut Conn, message: &BgpMessage) -> Result<(), String> {
    let bytes = wire::encode(message, true)?;
    conn.stream
        .write_all(&bytes)
        .await
        .map_err(|e| format!("send: {e}"))
}

fn attributes(config: &SessionConfig, next_hop: IpAddr, route: &RouteAttributes) -> Attributes {
    Attributes {
        local_asn: config.local_asn,
        ebgp: config.local_asn != config.peer_asn,
        next_hop,
        communities: route.communities.iter().copied().collect(),
        large_communities: route.large_communities.iter().copied().collect(),
        local_pref: route.local_pref,
    }
}

/// Sends what changed between what the peer has and `wanted`: withdrawals, then announcements
/// (one UPDATE per prefix: each may carry its own attributes). Prefixes of the family the
/// session has no next hop for are left out.
async fn sync_routes(
    config: &SessionConfig,
    conn: &mut Conn,
    wanted: &Routes,
    status: &watch::Sender<SessionStatus>,
) -> Result<(), String> {
    let v6_next_hop: Option<IpAddr> = match conn.next_hop {
        IpAddr::V6(_) => Some(conn.next_hop),
        IpAddr::V4(_) => config.ipv6_next_hop.map(IpAddr::V6),
    };
    let wanted: Routes = wanted
        .iter()
        .filter(|(p, _)| match p {
            IpNet::V4(_) => conn.families.ipv4 && conn.next_hop.is_ipv4(),
            IpNet::V6(_) => conn.families.ipv6 && v6_next_hop.is_some(),
        })
        .map(|(p, a)| (*p, a.clone()))
        .collect();
    let gone: Vec<IpNet> = conn
        .sent
        .keys()
        .filter(|p| !wanted.contains_key(p))
        .copied()
        .collect();
    let mut updates = 0u64;
    for message in wire::withdrawals(&gone)? {
        send(conn, &message).await?;
        updates += 1;
    }
    for (prefix, route) in &wanted {
        if conn.sent.get(prefix) != Some(route) {
            let next_hop = match prefix {
                IpNet::V4(_) => conn.next_hop,
                IpNet::V6(_) => v6_next_hop.unwrap_or(conn.next_hop),
            };
            let message = wire::announce(&[*prefix], &attributes(config, next_hop, route))?;
            send(conn, &message).await?;
            updates += 1;
        }
    }
    conn.sent = wanted;
    let count = conn.sent.len();
    status.send_modify(|s| {
        s.updates_sent += updates;
        s.prefixes_sent = count;
    });
    Ok(())
}

/// What the next OPEN says about graceful restart.
#[derive(Debug, Clone, Copy, Default)]
struct Restart {
    restarting: bool,
    forwarding_preserved: bool,
}

async fn perform(
    config: &SessionConfig,
    password: Option<&str>,
    conn: &mut Option<Conn>,
    routes: &watch::Receiver<Routes>,
    status: &watch::Sender<SessionStatus>,
    action: Action,
    restart: Restart,
) -> Vec<Event> {
    match action {
        Action::Connect => match connect(config, password).await {
            Ok(stream) => {
                *conn = Some(new_conn(stream));
                vec![Event::TcpConnected]
            }
            Err(e) => {
                status.send_modify(|s| {
                    s.last_error = Some(format!("connect to {}: {e}", config.peer))
                });
                vec![Event::TcpFailed]
            }
        },
        Action::SendOpen => {
            let open = wire::open(&OpenParams {
                asn: config.local_asn,
                hold_time: config.timing.hold_time.as_secs() as u16,
                router_id: config.router_id,
                restart_time: config.restart_time,
                restarting: restart.restarting,
                forwarding_preserved: restart.forwarding_preserved,
            });
            send_or_fail(conn, &open).await
        }
        Action::SendKeepalive => send_or_fail(conn, &BgpMessage::KeepAlive).await,
        Action::SendRoutes => {
            let Some(c) = conn.as_mut() else {
                return vec![Event::TcpFailed];
            };
            let wanted = routes.borrow().clone();
            let result = async {
                sync_routes(config, c, &wanted, status).await?;
                send_end_of_ribs(c).await
            }
            .await;
            match result {
                Ok(()) => Vec::new(),
                Err(e) => {
                    status.send_modify(|s| s.last_error = Some(e));
                    vec![Event::TcpFailed]
                }
            }
        }
        Action::SendNotification { code, subcode } => {
            if let Some(c) = conn.as_mut() {
                let _ = c
                    .stream
                    .write_all(&wire::notification_bytes(code, subcode))
                    .await;
                let _ = c.stream.flush().await;
            }
            Vec::new()
        }
        Action::CloseConnection => {
            if let Some(mut c) = conn.take() {
                let _ = c.stream.shutdown().await;
            }
            Vec::new()
        }
        Action::Up => {
            tracing::info!(event = "sessionUp", peer = %config.peer);
            status.send_modify(|s| {
                s.up_since = Some(std::time::SystemTime::now());
                s.last_error = None;
            });
            Vec::new()
        }
        Action::Down(reason) => {
            tracing::warn!(event = "sessionDown", peer = %config.peer, %reason);
            status.send_modify(|s| {
                s.up_since = None;
                s.prefixes_sent = 0;
                s.last_error = Some(reason);
            });
            Vec::new()
        }
    }
}

async fn send_or_fail(conn: &mut Option<Conn>, message: &BgpMessage) -> Vec<Event> {
    match conn.as_mut() {
        Some(c) => match send(c, message).await {
            Ok(()) => Vec::new(),
            Err(_) => vec![Event::TcpFailed],
        },
        None => vec![Event::TcpFailed],
    }
}
