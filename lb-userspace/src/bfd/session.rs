//! One BFD session's state machine (RFC 5880 §6.8, asynchronous mode, no echo, no demand), pure:
//! received packets and the current time in, packets to send and state changes out. The edge
//! (`bfd::agent`) owns the sockets and the clock; tests drive this with a fake clock.
//!
//! Timing: while the session is not Up we send at most once a second (§6.8.3); once Up, a Poll
//! Sequence moves to the profile's transmit interval. We send every
//! max(our DesiredMinTx, the peer's RequiredMinRx), less 0–25 % jitter (§6.8.7), and declare the
//! peer gone when nothing arrived for its Detect Mult × max(our RequiredMinRx, its DesiredMinTx).
//!
//! A planned restart keeps the session Up across two processes: [`Session::hold_for`] tells the
//! peer to wait longer (Detect Mult 255, and a slower DesiredMinTx through a Poll Sequence), the
//! process saves [`Saved`], and the next one [`Session::resume`]s with the same discriminators.
//! Routers at hand (BIRD 2.0, FRR 8.4) take a peer's AdminDown as a failure and take BGP down
//! with it, so AdminDown is kept for stops, where the routes go anyway.

use std::time::{Duration, Instant};

use super::packet::{Diag, Packet, State};

/// A BFD profile's timing (MetalLB's BFDProfile fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub desired_min_tx: Duration,
    pub required_min_rx: Duration,
    pub detect_mult: u8,
    /// Wait for the peer to speak first (MetalLB's `passiveMode`).
    pub passive: bool,
}

/// The slowest transmit interval while the session is not Up (RFC 5880 §6.8.3).
const SLOW: Duration = Duration::from_secs(1);

/// What the next process needs to carry a session on after a planned restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Saved {
    pub local_discriminator: u32,
    pub remote_discriminator: u32,
    pub remote_desired_min_tx_us: u32,
    pub remote_detect_mult: u8,
}

/// What the edge must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Send(Packet),
    /// The session changed state; `diag` says why (our diagnostic after the change).
    Changed {
        from: State,
        to: State,
        diag: Diag,
    },
}

#[derive(Debug, Clone)]
pub struct Session {
    settings: Settings,
    state: State,
    remote_state: State,
    local_discriminator: u32,
    remote_discriminator: u32,
    diag: Diag,
    /// Our DesiredMinTx as advertised now (≥ 1 s while not Up).
    desired_min_tx: Duration,
    remote_min_rx: Duration,
    remote_desired_min_tx: Duration,
    remote_detect_mult: u8,
    /// A Poll Sequence is running: every packet we send has P set until the peer answers F.
    polling: bool,
    /// The Detect Mult we send: the profile's, or 255 while holding for a restart.
    detect_mult: u8,
    detect_at: Option<Instant>,
    send_at: Option<Instant>,
    /// When the peer's last packet arrived.
    last_rx: Option<Instant>,
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u32::MAX as u128) as u32
}

impl Session {
    /// A session in Down; `local_discriminator` must be non-zero and unique on this host.
    pub fn new(settings: Settings, local_discriminator: u32, now: Instant) -> Self {
        Self {
            settings,
            state: State::Down,
            remote_state: State::Down,
            local_discriminator,
            remote_discriminator: 0,
            diag: Diag::None,
            desired_min_tx: settings.desired_min_tx.max(SLOW),
            // RFC 5880 §6.8.1: 1 µs until the peer says otherwise.
            remote_min_rx: Duration::from_micros(1),
            remote_desired_min_tx: SLOW,
            remote_detect_mult: 0,
            polling: false,
            detect_mult: settings.detect_mult,
            detect_at: None,
            send_at: (!settings.passive).then_some(now),
            last_rx: None,
        }
    }

    /// Carries on a session the previous process saved: Up, with the same discriminators, and
    /// a Poll Sequence that brings the peer back to the profile's interval.
    pub fn resume(settings: Settings, saved: Saved, now: Instant) -> Self {
        let mut s = Self::new(settings, saved.local_discriminator, now);
        s.state = State::Up;
        s.remote_state = State::Up;
        s.remote_discriminator = saved.remote_discriminator;
        s.remote_desired_min_tx = Duration::from_micros(saved.remote_desired_min_tx_us.into());
        s.remote_detect_mult = saved.remote_detect_mult;
        s.desired_min_tx = settings.desired_min_tx;
        s.polling = true;
        s.detect_at = Some(now + s.detection_time().max(SLOW));
        s.send_at = Some(now);
        s
    }

    /// New timers for a running session (a profile changed): announced by a Poll Sequence
    /// (RFC 5880 §6.8.3), with no change of state, so the peer's BGP sees nothing.
    pub fn reconfigure(&mut self, settings: Settings) {
        if settings == self.settings {
            return;
        }
        self.settings = settings;
        self.detect_mult = settings.detect_mult;
        self.desired_min_tx = if self.state == State::Up {
            settings.desired_min_tx
        } else {
            settings.desired_min_tx.max(SLOW)
        };
        self.polling = self.state == State::Up;
        // A longer detection time applies at once; a shorter one only from the next packet.
        if let (Some(at), Some(last)) = (self.detect_at, self.last_rx) {
            self.detect_at = Some(at.max(last + self.detection_time()));
        }
        if !settings.passive || self.remote_discriminator != 0 {
            self.send_at.get_or_insert_with(Instant::now);
        }
    }

    /// Before a planned restart: asks the peer to wait about `window` before declaring us
    /// down: its detection time for us is our Detect Mult × max(its RequiredMinRx, our
    /// DesiredMinTx), so the Detect Mult we send grows to cover the window (and, past 255, a
    /// slower DesiredMinTx by Poll Sequence). `None` unless the session is Up.
    pub fn hold_for(&mut self, window: Duration) -> Option<(Saved, Packet)> {
        if self.state != State::Up {
            return None;
        }
        let unit = self
            .remote_min_rx
            .max(self.desired_min_tx)
            .max(Duration::from_micros(1));
        let mult = window.as_micros().div_ceil(unit.as_micros());
        if mult > 255 {
            self.detect_mult = 255;
            self.desired_min_tx = Duration::from_micros(window.as_micros().div_ceil(255) as u64);
            self.polling = true;
        } else {
            self.detect_mult = (mult as u8).max(self.settings.detect_mult);
        }
        let saved = Saved {
            local_discriminator: self.local_discriminator,
            remote_discriminator: self.remote_discriminator,
            remote_desired_min_tx_us: micros(self.remote_desired_min_tx),
            remote_detect_mult: self.remote_detect_mult,
        };
        Some((saved, self.packet(false)))
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn remote_state(&self) -> State {
        self.remote_state
    }

    pub fn diag(&self) -> Diag {
        self.diag
    }

    pub fn local_discriminator(&self) -> u32 {
        self.local_discriminator
    }

    pub fn remote_discriminator(&self) -> u32 {
        self.remote_discriminator
    }

    /// How long the peer may stay silent before we declare it down, as things stand now.
    pub fn detection_time(&self) -> Duration {
        self.settings
            .required_min_rx
            .max(self.remote_desired_min_tx)
            * u32::from(self.remote_detect_mult)
    }

    /// The interval we transmit at, before jitter.
    pub fn transmit_interval(&self) -> Duration {
        self.desired_min_tx.max(self.remote_min_rx)
    }

    /// When the edge must call [`Session::tick`] next.
    pub fn next_deadline(&self) -> Option<Instant> {
        [self.detect_at, self.send_at].into_iter().flatten().min()
    }

    fn packet(&self, final_: bool) -> Packet {
        Packet {
            diag: self.diag,
            state: self.state,
            poll: self.polling && !final_,
            final_,
            control_plane_independent: false,
            demand: false,
            detect_mult: self.detect_mult,
            my_discriminator: self.local_discriminator,
            your_discriminator: self.remote_discriminator,
            desired_min_tx_us: micros(self.desired_min_tx),
            required_min_rx_us: micros(self.settings.required_min_rx),
            required_min_echo_rx_us: 0,
        }
    }

    /// May we transmit at all? Not in passive mode before the peer spoke, and not to a peer
    /// that asks for no packets (RequiredMinRx 0).
    fn may_send(&self) -> bool {
        let waiting = self.settings.passive && self.remote_discriminator == 0;
        !waiting && !self.remote_min_rx.is_zero()
    }

    /// The next periodic transmission: the interval less 0–25 % jitter, or 10–25 % with a
    /// Detect Mult of 1 (§6.8.7); `jitter` is uniform in [0, 1).
    fn schedule(&mut self, now: Instant, jitter: f64) {
        let spread = if self.settings.detect_mult == 1 {
            0.15
        } else {
            0.25
        };
        let factor = 0.75 + spread * jitter.clamp(0.0, 1.0);
        self.send_at = self
            .may_send()
            .then(|| now + self.transmit_interval().mul_f64(factor));
    }

    fn change(&mut self, to: State, diag: Diag, out: &mut Vec<Output>) {
        let from = self.state;
        if from == to {
            return;
        }
        self.state = to;
        self.diag = diag;
        match to {
            State::Up => {
                // Faster now: a Poll Sequence announces the profile's interval (§6.8.3).
                self.desired_min_tx = self.settings.desired_min_tx;
                self.polling = true;
            }
            _ => {
                self.desired_min_tx = self.settings.desired_min_tx.max(SLOW);
                self.polling = false;
            }
        }
        if to == State::Down {
            // §6.8.1: forget the peer's discriminator when the session goes down.
            self.remote_discriminator = 0;
            self.detect_at = None;
        }
        out.push(Output::Changed { from, to, diag });
        // Tell the peer at once rather than at the next period.
        if self.may_send() || to == State::AdminDown {
            out.push(Output::Send(self.packet(false)));
        }
    }

    /// A packet for this session arrived (already decoded, and matched by discriminator or
    /// source address).
    pub fn receive(&mut self, packet: &Packet, now: Instant, jitter: f64) -> Vec<Output> {
        let mut out = Vec::new();
        if packet.your_discriminator != 0 && packet.your_discriminator != self.local_discriminator {
            return out;
        }
        let could_send = self.may_send();
        self.remote_discriminator = packet.my_discriminator;
        self.remote_state = packet.state;
        self.remote_min_rx = Duration::from_micros(packet.required_min_rx_us.into());
        self.remote_desired_min_tx = Duration::from_micros(packet.desired_min_tx_us.into());
        self.remote_detect_mult = packet.detect_mult;
        if packet.final_ {
            self.polling = false;
        }
        if self.state == State::AdminDown {
            return out;
        }
        self.detect_at = Some(now + self.detection_time());
        self.last_rx = Some(now);
        match (self.state, packet.state) {
            (State::Down, State::AdminDown) => {}
            (_, State::AdminDown) => {
                self.change(State::Down, Diag::NeighborSignaledDown, &mut out);
                // The peer is still there: keep listening to it while Down.
                self.remote_discriminator = packet.my_discriminator;
            }
            (State::Down, State::Down) => self.change(State::Init, Diag::None, &mut out),
            (State::Down, State::Init) => self.change(State::Up, Diag::None, &mut out),
            (State::Init, State::Init | State::Up) => self.change(State::Up, Diag::None, &mut out),
            (State::Up, State::Down) => {
                self.change(State::Down, Diag::NeighborSignaledDown, &mut out);
                self.remote_discriminator = packet.my_discriminator;
            }
            _ => {}
        }
        if packet.poll {
            // §6.8.6: answer a Poll at once with Final.
            out.push(Output::Send(self.packet(true)));
        }
        // The peer may have slowed us down, or let us start (passive mode, RequiredMinRx).
        let interval = self.transmit_interval();
        let too_late = self.send_at.is_none_or(|t| t > now + interval);
        if self.may_send() && (!could_send || too_late) {
            self.schedule(now, jitter);
        }
        out
    }

    /// Timers that are due: the detection time, the next periodic packet.
    pub fn tick(&mut self, now: Instant, jitter: f64) -> Vec<Output> {
        let mut out = Vec::new();
        if self.detect_at.is_some_and(|t| t <= now) {
            self.detect_at = None;
            if matches!(self.state, State::Init | State::Up) {
                self.change(State::Down, Diag::DetectionTimeExpired, &mut out);
            } else {
                self.remote_discriminator = 0;
            }
            self.remote_state = State::Down;
        }
        if self.send_at.is_some_and(|t| t <= now) {
            if self.may_send() {
                out.push(Output::Send(self.packet(false)));
            }
            self.schedule(now, jitter);
        }
        out
    }

    /// Administratively down (RFC 5880 §6.8.16): the peer is told the session is down on
    /// purpose, so it does not report a failure to its BGP (RFC 5882 §3.2). Used before a
    /// planned restart and when a peer is removed.
    pub fn admin_down(&mut self, now: Instant, jitter: f64) -> Vec<Output> {
        let mut out = Vec::new();
        self.change(State::AdminDown, Diag::AdministrativelyDown, &mut out);
        self.detect_at = None;
        self.schedule(now, jitter);
        out
    }

    /// The packet this session would send now (for AdminDown repeats at shutdown).
    pub fn current_packet(&self) -> Packet {
        self.packet(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast() -> Settings {
        Settings {
            desired_min_tx: Duration::from_millis(100),
            required_min_rx: Duration::from_millis(100),
            detect_mult: 3,
            passive: false,
        }
    }

    fn from_peer(state: State, your: u32) -> Packet {
        Packet {
            diag: Diag::None,
            state,
            poll: false,
            final_: false,
            control_plane_independent: false,
            demand: false,
            detect_mult: 3,
            my_discriminator: 99,
            your_discriminator: your,
            desired_min_tx_us: 100_000,
            required_min_rx_us: 100_000,
            required_min_echo_rx_us: 0,
        }
    }

    fn sent(out: &[Output]) -> Vec<Packet> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send(p) => Some(*p),
                _ => None,
            })
            .collect()
    }

    fn changes(out: &[Output]) -> Vec<(State, State, Diag)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Changed { from, to, diag } => Some((*from, *to, *diag)),
                _ => None,
            })
            .collect()
    }

    /// Down → Init → Up against a peer that starts Down; returns the session and the clock.
    fn up_session() -> (Session, Instant) {
        let t0 = Instant::now();
        let mut s = Session::new(fast(), 7, t0);
        let out = s.receive(&from_peer(State::Down, 0), t0, 0.5);
        assert_eq!(changes(&out), [(State::Down, State::Init, Diag::None)]);
        let out = s.receive(&from_peer(State::Up, 7), t0, 0.5);
        assert_eq!(changes(&out), [(State::Init, State::Up, Diag::None)]);
        (s, t0)
    }

    #[test]
    fn three_way_handshake_brings_the_session_up_and_starts_a_poll_for_the_fast_interval() {
        let t0 = Instant::now();
        let mut s = Session::new(fast(), 7, t0);
        // Active: the first packet goes out at once, Down, slow (1 s) while not Up.
        let out = s.tick(t0, 0.0);
        let first = sent(&out);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].state, State::Down);
        assert_eq!(first[0].your_discriminator, 0);
        assert_eq!(first[0].desired_min_tx_us, 1_000_000);
        assert_eq!(first[0].required_min_rx_us, 100_000);
        // The peer answers Init: we go straight to Up and say so at once, with Poll.
        let out = s.receive(&from_peer(State::Init, 7), t0, 0.0);
        assert_eq!(changes(&out), [(State::Down, State::Up, Diag::None)]);
        let p = sent(&out);
        assert_eq!(p.len(), 1);
        assert_eq!(
            (
                p[0].state,
                p[0].poll,
                p[0].desired_min_tx_us,
                p[0].your_discriminator
            ),
            (State::Up, true, 100_000, 99)
        );
        // The peer's Final ends the Poll Sequence.
        let mut fin = from_peer(State::Up, 7);
        fin.final_ = true;
        s.receive(&fin, t0, 0.0);
        let later = s.tick(s.next_deadline().unwrap(), 0.0);
        assert!(!sent(&later)[0].poll);
    }

    #[test]
    fn a_poll_from_the_peer_is_answered_at_once_with_final() {
        let (mut s, t0) = up_session();
        let mut poll = from_peer(State::Up, 7);
        poll.poll = true;
        let out = s.receive(&poll, t0, 0.0);
        let p = sent(&out);
        assert_eq!(p.len(), 1);
        assert!(p[0].final_ && !p[0].poll);
    }

    #[test]
    fn silence_for_the_detection_time_takes_the_session_down() {
        let (mut s, t0) = up_session();
        // The peer: 100 ms × 3, ours 100 ms: 300 ms.
        assert_eq!(s.detection_time(), Duration::from_millis(300));
        let out = s.tick(t0 + Duration::from_millis(299), 0.0);
        assert!(changes(&out).is_empty());
        let out = s.tick(t0 + Duration::from_millis(300), 0.0);
        assert_eq!(
            changes(&out),
            [(State::Up, State::Down, Diag::DetectionTimeExpired)]
        );
        assert_eq!(s.remote_discriminator(), 0);
        // Told at once, slow again.
        let p = sent(&out);
        assert_eq!(
            (p[0].state, p[0].diag, p[0].desired_min_tx_us),
            (State::Down, Diag::DetectionTimeExpired, 1_000_000)
        );
    }

    #[test]
    fn every_packet_from_the_peer_pushes_the_detection_time_back() {
        let (mut s, t0) = up_session();
        for i in 1..=10u64 {
            let now = t0 + Duration::from_millis(250 * i);
            assert!(changes(&s.tick(now, 0.0)).is_empty(), "went down at {i}");
            s.receive(&from_peer(State::Up, 7), now, 0.0);
        }
        assert_eq!(s.state(), State::Up);
    }

    #[test]
    fn the_detection_time_uses_the_slower_of_our_rx_and_the_peers_tx() {
        let (mut s, t0) = up_session();
        let mut slow = from_peer(State::Up, 7);
        slow.desired_min_tx_us = 300_000;
        slow.detect_mult = 5;
        s.receive(&slow, t0, 0.0);
        assert_eq!(s.detection_time(), Duration::from_millis(1500));
    }

    #[test]
    fn the_peer_signalling_down_or_admin_down_takes_the_session_down_with_diag_3() {
        for state in [State::Down, State::AdminDown] {
            let (mut s, t0) = up_session();
            let out = s.receive(&from_peer(state, 7), t0, 0.0);
            assert_eq!(
                changes(&out),
                [(State::Up, State::Down, Diag::NeighborSignaledDown)],
                "{state:?}"
            );
        }
    }

    #[test]
    fn init_goes_up_on_init_or_up_and_not_on_down() {
        let t0 = Instant::now();
        let mut s = Session::new(fast(), 7, t0);
        s.receive(&from_peer(State::Down, 0), t0, 0.0);
        assert_eq!(s.state(), State::Init);
        s.receive(&from_peer(State::Down, 0), t0, 0.0);
        assert_eq!(s.state(), State::Init);
        s.receive(&from_peer(State::Init, 7), t0, 0.0);
        assert_eq!(s.state(), State::Up);
    }

    #[test]
    fn init_without_an_answer_falls_back_to_down_after_the_detection_time() {
        let t0 = Instant::now();
        let mut s = Session::new(fast(), 7, t0);
        s.receive(&from_peer(State::Down, 0), t0, 0.0);
        // Slow while not Up: the peer sends every second, × 3.
        let out = s.tick(t0 + Duration::from_secs(3), 0.0);
        assert_eq!(
            changes(&out),
            [(State::Init, State::Down, Diag::DetectionTimeExpired)]
        );
    }

    #[test]
    fn packets_for_another_discriminator_change_nothing() {
        let (mut s, t0) = up_session();
        let out = s.receive(&from_peer(State::Down, 8), t0, 0.0);
        assert!(out.is_empty());
        assert_eq!(s.state(), State::Up);
    }

    #[test]
    fn admin_down_is_sent_at_once_and_ignores_the_peer_after() {
        let (mut s, t0) = up_session();
        let out = s.admin_down(t0, 0.0);
        assert_eq!(
            changes(&out),
            [(State::Up, State::AdminDown, Diag::AdministrativelyDown)]
        );
        let p = sent(&out);
        assert_eq!(
            (p[0].state, p[0].diag),
            (State::AdminDown, Diag::AdministrativelyDown)
        );
        assert!(s.receive(&from_peer(State::Up, 7), t0, 0.0).is_empty());
        // ... and keeps saying it, without ever expiring.
        let later = s.tick(t0 + Duration::from_secs(5), 0.0);
        assert!(changes(&later).is_empty());
        assert_eq!(sent(&later)[0].state, State::AdminDown);
    }

    #[test]
    fn holding_for_a_restart_makes_the_peer_wait_the_window_and_resuming_carries_on_up() {
        let (mut s, t0) = up_session();
        let (saved, packet) = s.hold_for(Duration::from_secs(30)).unwrap();
        // The peer's detection time for us: Detect Mult × max(its RequiredMinRx 100 ms, our
        // DesiredMinTx): the window, not more.
        let peer_detection = Duration::from_micros(packet.desired_min_tx_us.max(100_000).into())
            * u32::from(packet.detect_mult);
        assert!(
            peer_detection >= Duration::from_secs(30)
                && peer_detection < Duration::from_millis(30_010),
            "{peer_detection:?}"
        );
        // Past what 255 × the interval covers, a slower interval, by Poll Sequence.
        let (mut long, _) = up_session();
        let (_, p) = long.hold_for(Duration::from_secs(120)).unwrap();
        assert_eq!(p.detect_mult, 255);
        assert!(p.poll);
        assert!(
            Duration::from_micros(p.desired_min_tx_us.into()) * 255 >= Duration::from_secs(120)
        );
        assert_eq!(
            (saved.local_discriminator, saved.remote_discriminator),
            (7, 99)
        );

        let t1 = t0 + Duration::from_secs(5);
        let mut next = Session::resume(fast(), saved, t1);
        assert_eq!(next.state(), State::Up);
        let out = next.tick(t1, 0.0);
        let p = sent(&out);
        assert_eq!(
            (p[0].state, p[0].my_discriminator, p[0].your_discriminator),
            (State::Up, 7, 99)
        );
        assert_eq!(
            (p[0].detect_mult, p[0].desired_min_tx_us, p[0].poll),
            (3, 100_000, true)
        );
        // The peer carries on: no state change on its packets.
        assert!(changes(&next.receive(&from_peer(State::Up, 7), t1, 0.0)).is_empty());
        // A session not Up has nothing to hold.
        assert!(Session::new(fast(), 8, t0)
            .hold_for(Duration::from_secs(30))
            .is_none());
    }

    #[test]
    fn a_resumed_session_whose_peer_forgot_it_goes_down_after_the_detection_time() {
        let (mut s, t0) = up_session();
        let (saved, _) = s.hold_for(Duration::from_secs(30)).unwrap();
        let mut next = Session::resume(fast(), saved, t0);
        let out = next.tick(t0 + Duration::from_secs(1), 0.0);
        assert_eq!(
            changes(&out),
            [(State::Up, State::Down, Diag::DetectionTimeExpired)]
        );
    }

    #[test]
    fn new_timers_are_announced_by_a_poll_without_leaving_up() {
        let (mut s, t0) = up_session();
        s.reconfigure(Settings {
            desired_min_tx: Duration::from_millis(300),
            required_min_rx: Duration::from_millis(300),
            detect_mult: 5,
            passive: false,
        });
        assert_eq!(s.state(), State::Up);
        let p = s.current_packet();
        assert_eq!(
            (
                p.poll,
                p.desired_min_tx_us,
                p.required_min_rx_us,
                p.detect_mult
            ),
            (true, 300_000, 300_000, 5)
        );
        // The detection time follows our new RequiredMinRx at once.
        assert_eq!(s.detection_time(), Duration::from_millis(900));
        assert!(changes(&s.tick(t0 + Duration::from_millis(400), 0.0)).is_empty());
    }

    #[test]
    fn a_passive_session_waits_for_the_peer_before_sending() {
        let t0 = Instant::now();
        let mut s = Session::new(
            Settings {
                passive: true,
                ..fast()
            },
            7,
            t0,
        );
        assert_eq!(s.next_deadline(), None);
        assert!(s.tick(t0 + Duration::from_secs(10), 0.0).is_empty());
        let out = s.receive(&from_peer(State::Down, 0), t0, 0.0);
        assert_eq!(sent(&out)[0].state, State::Init);
        assert!(s.next_deadline().is_some());
    }

    #[test]
    fn a_peer_asking_for_no_packets_gets_none() {
        let (mut s, t0) = up_session();
        let mut quiet = from_peer(State::Up, 7);
        quiet.required_min_rx_us = 0;
        s.receive(&quiet, t0, 0.0);
        assert!(sent(&s.tick(t0 + Duration::from_millis(200), 0.0)).is_empty());
    }

    #[test]
    fn transmissions_follow_the_slower_side_with_up_to_25_percent_jitter() {
        let (mut s, t0) = up_session();
        let mut slow_rx = from_peer(State::Up, 7);
        slow_rx.required_min_rx_us = 400_000;
        s.receive(&slow_rx, t0, 0.0);
        assert_eq!(s.transmit_interval(), Duration::from_millis(400));
        for (jitter, low, high) in [(0.0, 300, 301), (0.999, 399, 400)] {
            s.tick(t0, jitter);
            s.send_at = Some(t0);
            s.tick(t0, jitter);
            let next = s.send_at.unwrap() - t0;
            assert!(
                next >= Duration::from_millis(low) && next <= Duration::from_millis(high),
                "jitter {jitter}: {next:?}"
            );
        }
    }
}
