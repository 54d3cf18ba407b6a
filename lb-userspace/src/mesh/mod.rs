//! The speaker mesh: every speaker talks to the others directly over UDP, so a node that dies
//! is known dead in about a second, and liveness does not depend on the Kubernetes API server.
//!
//! Membership is SWIM (Das et al., 2002) as implemented by the `foca` crate: each period a member
//! probes one random other member, asks others to probe it indirectly when it does not answer,
//! suspects it, and declares it down when the suspicion is not refuted in time; updates ride on
//! the probes. Traffic per node is constant whatever the cluster size (see the README).
//!
//! This module owns the socket, the timers and the membership view; it never decides who
//! announces what (that is `election`, fed by the speaker). Every datagram is sealed and checked
//! by [`envelope`]: a wrong key, a truncated, garbled, replayed or stale datagram, or one from a
//! node the speaker does not know, is dropped and counted, and changes nothing.

pub mod envelope;

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap},
    net::SocketAddr,
    num::{NonZeroU32, NonZeroUsize},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use foca::{AccumulatingRuntime, Foca, OwnedNotification, PostcardCodec, Timer};
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::{
    net::UdpSocket,
    sync::{mpsc, Notify},
};
use tracing::{debug, info, warn};

use envelope::{Kind, Opener, Sealer};

/// The mesh's default UDP port (MetalLB's memberlist uses 7946).
pub const DEFAULT_PORT: u16 = 7947;
/// The default failure timeout: a member that stops answering is declared down within it.
pub const DEFAULT_FAILURE_TIMEOUT: Duration = Duration::from_secs(1);
/// The largest datagram sent or read.
const MAX_DATAGRAM: usize = 1400;
/// How often members the speaker knows of (from the Leases) but the mesh does not count as
/// active are asked to join.
const JOIN_EVERY: Duration = Duration::from_secs(1);
/// How many such members are asked each time.
const JOIN_FANOUT: usize = 3;

/// How the mesh runs.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// This node's name (the Node object's).
    pub node: String,
    /// Where to listen (`0.0.0.0:7947`).
    pub bind: SocketAddr,
    /// Where the others reach this node (its node IP and the port).
    pub advertise: SocketAddr,
    /// The shared secret every speaker of the cluster holds.
    pub secret: Vec<u8>,
    /// A member that stops answering is declared down within this.
    pub failure_timeout: Duration,
}

/// A member's identity: its node, where it listens, and which run of its speaker this is (a
/// restarted speaker, or one declared down that rejoins, is a new identity of the same node).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Id {
    pub node: String,
    pub addr: SocketAddr,
    pub bump: u64,
}

impl foca::Identity for Id {
    type Addr = String;

    fn renew(&self) -> Option<Self> {
        Some(Id {
            bump: self.bump.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> String {
        self.node.clone()
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.bump > adversary.bump
    }
}

/// What the mesh says of one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    Alive,
    /// Not answering, not yet declared down: still counted alive.
    Suspect,
    Down,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Down => "down",
        }
    }
}

/// One node as the mesh sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub addr: SocketAddr,
    pub state: MemberState,
    /// When it entered this state.
    pub since: Instant,
    /// The last datagram that came from it.
    pub last_heard: Option<Instant>,
    /// For a member declared down: how long after its last datagram that was.
    pub noticed_after: Option<Duration>,
    /// It said it is restarting: count it alive until then.
    pub restarting_until: Option<Instant>,
    /// Heard from within this, it counts alive whatever the gossip says ([`heard_lately`]).
    pub heard_lately: Duration,
}

/// A member heard from this recently is alive, whatever the gossip says: a node back from a
/// partition spreads its stale verdicts ("everyone else is down") until they are refuted, and
/// those must not move anything. A really dead member has been silent for longer than this
/// by the time it is declared down: its next probe, the indirect probes and the suspicion take
/// at least 0.6 × the timeout. Live members of a small mesh are normally heard from every two
/// or three probe periods (0.4–0.6 × the timeout): less than that (0.3 × at first) let a stale
/// verdict take a live member's IP now and then.
pub fn heard_lately(failure_timeout: Duration) -> Duration {
    failure_timeout.mul_f64(0.6)
}

impl Member {
    /// Alive for the election: active in the mesh, heard from lately, or restarting within its
    /// grace.
    pub fn counts_alive(&self, now: Instant) -> bool {
        self.state != MemberState::Down
            || self.restarting_until.is_some_and(|t| now < t)
            || self
                .last_heard
                .is_some_and(|t| now.saturating_duration_since(t) < self.heard_lately)
    }
}

/// A snapshot of the mesh.
#[derive(Debug, Clone, Default)]
pub struct MeshView {
    /// Every other node the mesh has heard of, by name.
    pub members: BTreeMap<String, Member>,
    /// Datagrams dropped, by reason (see [`envelope::Reject::label`]).
    pub dropped: BTreeMap<&'static str, u64>,
    pub received: u64,
    pub sent: u64,
}

impl MeshView {
    /// Other members counted alive now.
    pub fn alive_peers(&self, now: Instant) -> usize {
        self.members
            .values()
            .filter(|m| m.counts_alive(now))
            .count()
    }
}

enum Input {
    Data(Bytes),
    Timer(Timer<Id>),
    JoinTick,
    Restarting(Duration),
    Leave,
}

#[derive(Default)]
struct Shared {
    view: MeshView,
    /// [`heard_lately`] of the failure timeout.
    heard_lately: Duration,
    /// Nodes of the cluster and where their speakers listen (from their Leases).
    peers: BTreeMap<String, SocketAddr>,
}

/// A running mesh. Dropping it stops nothing: the tasks end with the runtime.
#[derive(Clone)]
pub struct Mesh {
    shared: Arc<Mutex<Shared>>,
    tx: mpsc::UnboundedSender<Input>,
    node: String,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The cluster size foca is tuned for: the next power of two at or above the nodes known,
/// at least 32 (how many times each update is retransmitted grows with its logarithm).
pub fn size_bucket(nodes: usize) -> u32 {
    (nodes.max(32) as u32).next_power_of_two()
}

/// foca's settings for a failure timeout and a cluster of about `cluster_size`: probe every
/// fifth of the timeout, wait a tenth for the direct answer, declare down two fifths after
/// suspecting. A dead member is probed within one period (any member probes it), its probe
/// fails within the next, then the suspicion runs out: about 0.8 × the timeout in the worst
/// case. Updates ride on 4 × log10(size + 1) messages each, as memberlist's LAN settings do.
pub fn swim_config(failure_timeout: Duration, cluster_size: u32) -> foca::Config {
    let timeout = failure_timeout.max(Duration::from_millis(100));
    let size = NonZeroU32::new(cluster_size.max(1)).expect("non-zero");
    let mut config = foca::Config::new_lan(size);
    config.probe_period = timeout / 5;
    config.probe_rtt = timeout / 10;
    config.suspect_to_down_after = timeout * 2 / 5;
    config.max_packet_size = NonZeroUsize::new(MAX_DATAGRAM - 300).expect("non-zero");
    // Updates ride on the probes; one extra gossip per period to one member spreads a verdict
    // to the rest within a period or two.
    config.periodic_gossip = Some(foca::PeriodicParams {
        frequency: timeout / 5,
        num_members: NonZeroUsize::new(1).expect("non-zero"),
    });
    config.periodic_announce_to_down_members = Some(foca::PeriodicParams {
        frequency: Duration::from_secs(2),
        num_members: NonZeroUsize::new(2).expect("non-zero"),
    });
    config
}

impl Mesh {
    /// Binds the socket and starts the mesh; `changed` is woken whenever a member's state
    /// changes.
    pub async fn start(options: MeshOptions, changed: Arc<Notify>) -> std::io::Result<Mesh> {
        let socket = UdpSocket::bind(options.bind).await?;
        // Room for bursts (a flood of forged datagrams must not crowd out the real ones).
        let size: libc::c_int = 1 << 20;
        // SAFETY: setsockopt reads an int we own, on a socket we own.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        let socket = Arc::new(socket);
        let shared = Arc::new(Mutex::new(Shared {
            heard_lately: heard_lately(options.failure_timeout),
            ..Shared::default()
        }));
        let (tx, rx) = mpsc::unbounded_channel();
        let boot = now_ms();
        let identity = Id {
            node: options.node.clone(),
            addr: options.advertise,
            bump: boot,
        };
        let mut seed = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .map_err(|_| std::io::Error::other("no randomness for the mesh"))?;
        let foca = Foca::new(
            identity,
            swim_config(options.failure_timeout, size_bucket(0)),
            StdRng::from_seed(seed),
            PostcardCodec,
        );
        let mesh = Mesh {
            shared: shared.clone(),
            tx: tx.clone(),
            node: options.node.clone(),
        };
        let timers = scheduler(tx.clone());
        // Receive: open each datagram; only what passes reaches foca.
        {
            let socket = socket.clone();
            let shared = shared.clone();
            let tx = tx.clone();
            let changed = changed.clone();
            let me = options.node.clone();
            let mut opener = Opener::new(&options.secret);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_536];
                loop {
                    let (len, from) = match socket.recv_from(&mut buf).await {
                        Ok(x) => x,
                        Err(e) => {
                            warn!(error = %e, "meshReceiveFailed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let mut s = shared.lock().unwrap();
                    let known = |n: &str| n != me && s.peers.contains_key(n);
                    match opener.open(&buf[..len], now_ms(), known) {
                        Ok(opened) => {
                            s.view.received += 1;
                            let node = opened.node.to_string();
                            let now = Instant::now();
                            if let Some(m) = s.view.members.get_mut(&node) {
                                m.last_heard = Some(now);
                            }
                            match opened.kind {
                                Kind::Swim => {
                                    let _ =
                                        tx.send(Input::Data(Bytes::copy_from_slice(opened.body)));
                                }
                                Kind::Restarting => {
                                    let ms = opened
                                        .body
                                        .get(..4)
                                        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                                        .unwrap_or(0);
                                    let addr = s.peers.get(&node).copied().unwrap_or(from);
                                    let heard_lately = s.heard_lately;
                                    let m = s.view.members.entry(node.clone()).or_insert(Member {
                                        addr,
                                        state: MemberState::Down,
                                        since: now,
                                        last_heard: Some(now),
                                        noticed_after: None,
                                        restarting_until: None,
                                        heard_lately,
                                    });
                                    m.restarting_until =
                                        Some(now + Duration::from_millis(ms.into()));
                                    info!(node = %node, grace_ms = ms, "meshMemberRestarting");
                                    changed.notify_one();
                                }
                            }
                        }
                        Err(reject) => {
                            *s.view.dropped.entry(reject.label()).or_default() += 1;
                            debug!(%from, reason = %reject, "meshDatagramDropped");
                        }
                    }
                }
            });
        }
        // Ask the known members to join, now and then.
        {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(JOIN_EVERY);
                loop {
                    tick.tick().await;
                    if tx.send(Input::JoinTick).is_err() {
                        break;
                    }
                }
            });
        }
        tokio::spawn(drive(
            foca,
            options.failure_timeout,
            rx,
            Outputs {
                timers,
                socket,
                shared,
                changed,
            },
            Sealer::new(&options.secret, &options.node, boot),
        ));
        info!(node = %options.node, bind = %options.bind, advertise = %options.advertise,
              failure_timeout_ms = options.failure_timeout.as_millis() as u64, "meshStarted");
        Ok(mesh)
    }

    /// The nodes of the cluster and where their speakers listen: the only senders accepted, and
    /// whom to ask to join. This node is left out.
    pub fn set_peers(&self, peers: BTreeMap<String, SocketAddr>) {
        let mut s = self.shared.lock().unwrap();
        s.peers = peers;
        s.peers.remove(&self.node);
    }

    pub fn view(&self) -> MeshView {
        self.shared.lock().unwrap().view.clone()
    }

    /// Tells every member this speaker is restarting: they count it alive for `grace`.
    pub fn restarting(&self, grace: Duration) {
        let _ = self.tx.send(Input::Restarting(grace));
    }

    /// Leaves the cluster: the others count this node down at once.
    pub fn leave(&self) {
        let _ = self.tx.send(Input::Leave);
    }
}

/// Delivers foca's timers in order, each at its time.
fn scheduler(tx: mpsc::UnboundedSender<Input>) -> mpsc::UnboundedSender<(Instant, Timer<Id>)> {
    let (timer_tx, mut timer_rx) = mpsc::unbounded_channel::<(Instant, Timer<Id>)>();
    tokio::spawn(async move {
        let mut queue: BinaryHeap<Reverse<(Instant, u64, Timer<Id>)>> = BinaryHeap::new();
        let mut order = 0u64;
        loop {
            let next = queue.peek().map(|Reverse((at, _, _))| *at);
            tokio::select! {
                incoming = timer_rx.recv() => match incoming {
                    Some((at, timer)) => {
                        order += 1;
                        queue.push(Reverse((at, order, timer)));
                    }
                    None => break,
                },
                _ = async {
                    match next {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                } => {
                    while queue.peek().is_some_and(|Reverse((at, _, _))| *at <= Instant::now()) {
                        let Reverse((_, _, timer)) = queue.pop().expect("peeked");
                        if tx.send(Input::Timer(timer)).is_err() {
                            return;
                        }
                    }
                }
            }
        }
    });
    timer_tx
}

type Swim = Foca<Id, PostcardCodec, StdRng, foca::NoCustomBroadcast>;

/// Where what foca decides goes: timers to the scheduler, datagrams to the socket, what it
/// noticed to the shared view (and a wake-up to the speaker).
struct Outputs {
    timers: mpsc::UnboundedSender<(Instant, Timer<Id>)>,
    socket: Arc<UdpSocket>,
    shared: Arc<Mutex<Shared>>,
    changed: Arc<Notify>,
}

/// The one task that owns foca: feeds it datagrams, timers and joins, then sends what it wants
/// sent, schedules its timers and records what it noticed.
async fn drive(
    mut foca: Swim,
    failure_timeout: Duration,
    mut rx: mpsc::UnboundedReceiver<Input>,
    out: Outputs,
    mut sealer: Sealer,
) {
    let Outputs {
        timers,
        socket,
        shared,
        changed,
    } = out;
    let mut runtime = AccumulatingRuntime::new();
    let mut join_round = 0usize;
    let mut tuned_for = size_bucket(0);
    while let Some(input) = rx.recv().await {
        let mut direct: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        let result = match input {
            Input::Data(data) => foca.handle_data(&data, &mut runtime),
            Input::Timer(timer) => foca.handle_timer(timer, &mut runtime),
            Input::JoinTick => {
                // A cluster that grew past what foca is tuned for: more retransmissions.
                let bucket = size_bucket(shared.lock().unwrap().peers.len() + 1);
                if bucket != tuned_for
                    && foca
                        .set_config(swim_config(failure_timeout, bucket))
                        .is_ok()
                {
                    info!(cluster_size = bucket, "meshRetuned");
                    tuned_for = bucket;
                }
                let candidates: Vec<Id> = {
                    let s = shared.lock().unwrap();
                    let active: Vec<&str> =
                        foca.iter_members().map(|m| m.id().node.as_str()).collect();
                    s.peers
                        .iter()
                        .filter(|(node, _)| !active.contains(&node.as_str()))
                        .map(|(node, addr)| Id {
                            node: node.clone(),
                            addr: *addr,
                            bump: 0,
                        })
                        .collect()
                };
                let mut result = Ok(());
                if !candidates.is_empty() {
                    for i in 0..JOIN_FANOUT.min(candidates.len()) {
                        let id = candidates[(join_round + i) % candidates.len()].clone();
                        result = result.and(foca.announce(id, &mut runtime));
                    }
                    join_round = join_round.wrapping_add(JOIN_FANOUT);
                }
                result
            }
            Input::Restarting(grace) => {
                let body = (grace.as_millis().min(u32::MAX as u128) as u32).to_be_bytes();
                for m in foca.iter_members() {
                    let sealed = sealer.seal(Kind::Restarting, &body, now_ms());
                    // Twice: one lost datagram must not cost the node its IPs.
                    direct.push((m.id().addr, sealed.clone()));
                    direct.push((m.id().addr, sealed));
                }
                Ok(())
            }
            Input::Leave => foca.leave_cluster(&mut runtime),
        };
        if let Err(e) = result {
            debug!(error = %e, "meshProtocolError");
        }
        let mut sent = 0u64;
        while let Some((to, data)) = runtime.to_send() {
            direct.push((to.addr, sealer.seal(Kind::Swim, &data, now_ms())));
        }
        for (addr, datagram) in direct {
            if socket.send_to(&datagram, addr).await.is_ok() {
                sent += 1;
            }
        }
        let now = Instant::now();
        while let Some((after, timer)) = runtime.to_schedule() {
            let _ = timers.send((now + after, timer));
        }
        let mut notifications = Vec::new();
        while let Some(n) = runtime.to_notify() {
            notifications.push(n);
        }
        let mut s = shared.lock().unwrap();
        s.view.sent += sent;
        let mut any = false;
        for n in notifications {
            match n {
                OwnedNotification::MemberUp(id) | OwnedNotification::Rename(_, id) => {
                    any = true;
                    let heard_lately = s.heard_lately;
                    let m = s.view.members.entry(id.node.clone()).or_insert(Member {
                        addr: id.addr,
                        state: MemberState::Down,
                        since: now,
                        last_heard: None,
                        noticed_after: None,
                        restarting_until: None,
                        heard_lately,
                    });
                    m.addr = id.addr;
                    m.restarting_until = None;
                    if m.state == MemberState::Down {
                        m.state = MemberState::Alive;
                        m.since = now;
                        m.noticed_after = None;
                        info!(node = %id.node, addr = %id.addr, "meshMemberUp");
                    }
                }
                OwnedNotification::MemberDown(id) => {
                    // A new run of the same node may be up already: only its current identity
                    // going down counts.
                    if foca.iter_members().any(|m| m.id().node == id.node) {
                        continue;
                    }
                    any = true;
                    if let Some(m) = s.view.members.get_mut(&id.node) {
                        if m.state != MemberState::Down {
                            m.state = MemberState::Down;
                            m.since = now;
                            m.noticed_after =
                                m.last_heard.map(|t| now.saturating_duration_since(t));
                            warn!(node = %id.node,
                                  noticed_after_ms = m.noticed_after.map(|d| d.as_millis() as u64),
                                  "meshMemberDown");
                        }
                    }
                }
                OwnedNotification::Rejoin(id) => {
                    info!(bump = id.bump, "meshRejoined");
                }
                OwnedNotification::Idle => debug!("meshIdle"),
                OwnedNotification::Active => debug!("meshActive"),
                OwnedNotification::Defunct => warn!("meshDefunct"),
            }
        }
        // Suspicion is a state too (still counted alive).
        for member in foca.iter_members() {
            let state = match member.state() {
                foca::State::Suspect => MemberState::Suspect,
                _ => MemberState::Alive,
            };
            if let Some(m) = s.view.members.get_mut(&member.id().node) {
                if m.state != MemberState::Down && m.state != state {
                    m.state = state;
                    m.since = now;
                    any = true;
                }
            }
        }
        drop(s);
        if any {
            changed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swim_settings_put_the_worst_case_detection_within_the_failure_timeout() {
        for (ms, size) in [(500u64, 32), (1000, 32), (3000, 32), (1000, 1024)] {
            let timeout = Duration::from_millis(ms);
            let c = swim_config(timeout, size);
            // Worst case: the probe starts a period late, fails, and the suspicion runs out.
            let worst = c.probe_period * 2 + c.suspect_to_down_after;
            assert!(worst <= timeout, "{ms} ms: {worst:?}");
            assert!(c.probe_rtt < c.probe_period);
        }
        assert_eq!(size_bucket(3), 32);
        assert_eq!(size_bucket(1000), 1024);
        assert!(
            swim_config(DEFAULT_FAILURE_TIMEOUT, 1024).max_transmissions
                > swim_config(DEFAULT_FAILURE_TIMEOUT, 32).max_transmissions,
            "larger clusters retransmit each update more"
        );
    }

    #[test]
    fn a_member_counts_alive_while_active_or_restarting_within_its_grace() {
        let now = Instant::now();
        let member = |state, restarting_until| Member {
            addr: "192.0.2.1:7947".parse().unwrap(),
            state,
            since: now,
            last_heard: None,
            noticed_after: None,
            restarting_until,
            heard_lately: heard_lately(DEFAULT_FAILURE_TIMEOUT),
        };
        assert!(member(MemberState::Alive, None).counts_alive(now));
        assert!(member(MemberState::Suspect, None).counts_alive(now));
        assert!(!member(MemberState::Down, None).counts_alive(now));
        let heard = Member {
            last_heard: Some(now),
            ..member(MemberState::Down, None)
        };
        assert!(
            heard.counts_alive(now),
            "heard from just now: gossip is stale"
        );
        assert!(heard.counts_alive(now + Duration::from_millis(599)));
        assert!(!heard.counts_alive(now + Duration::from_millis(600)));
        let later = now + Duration::from_secs(5);
        assert!(member(MemberState::Down, Some(later)).counts_alive(now));
        assert!(!member(MemberState::Down, Some(now)).counts_alive(later));
    }
}
