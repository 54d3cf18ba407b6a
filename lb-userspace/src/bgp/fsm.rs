//! The BGP session state machine (RFC 4271 §8), pure: events and the current time in, actions
//! out. No sockets, no clocks: the session driver performs the actions and feeds back what
//! happened, and tests drive it with a fake clock.
//!
//! Timers are deadlines kept here; the driver asks [`Fsm::next_deadline`] when to wake up and
//! calls [`Fsm::tick`] then. Hold time is negotiated (the smaller of ours and the peer's; 0
//! disables hold and keepalives), the keepalive interval is min(configured, hold / 3), and
//! connection retries back off from `connect_time` by doubling, up to 60 s.

use std::time::{Duration, Instant};

use super::wire::PeerOpen;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Idle,
    Connect,
    Active,
    OpenSent,
    OpenConfirm,
    Established,
}

/// What the session configuration says about timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub hold_time: Duration,
    pub keepalive_time: Duration,
    pub connect_time: Duration,
}

/// Something that happened to the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Start,
    Stop,
    /// Our outgoing TCP connection is up, or the peer's incoming one was accepted.
    TcpConnected,
    TcpFailed,
    /// The peer's OPEN, already checked (`wire::check_open`).
    OpenReceived(PeerOpen),
    /// The peer's OPEN or another message was malformed: send this NOTIFICATION and close.
    ProtocolError {
        code: u8,
        subcode: u8,
    },
    KeepaliveReceived,
    UpdateReceived,
    NotificationReceived {
        code: u8,
        subcode: u8,
    },
    /// BFD with the peer went from Up to Down for a failure (the reason says which).
    BfdDown(String),
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Connect,
    SendOpen,
    SendKeepalive,
    /// Send every route we owe the peer, then End-of-RIB.
    SendRoutes,
    SendNotification {
        code: u8,
        subcode: u8,
    },
    CloseConnection,
    /// Log `sessionUp` (and count it).
    Up,
    /// Log `sessionDown` with the reason.
    Down(String),
}

const MAX_RETRY: Duration = Duration::from_secs(60);
/// RFC 4271 §8: a large hold time while waiting for the peer's OPEN.
const OPEN_HOLD: Duration = Duration::from_secs(240);

#[derive(Debug, Clone)]
pub struct Fsm {
    state: State,
    timing: Timing,
    retry: Duration,
    connect_retry_at: Option<Instant>,
    hold_at: Option<Instant>,
    keepalive_at: Option<Instant>,
    hold: Duration,
    keepalive: Duration,
    peer_router_id: Option<std::net::Ipv4Addr>,
}

impl Fsm {
    pub fn new(timing: Timing) -> Self {
        Self {
            state: State::Idle,
            timing,
            retry: timing.connect_time,
            connect_retry_at: None,
            hold_at: None,
            keepalive_at: None,
            hold: timing.hold_time,
            keepalive: timing.keepalive_time,
            peer_router_id: None,
        }
    }

    /// The peer's BGP identifier, once its OPEN arrived on this session.
    pub fn peer_router_id(&self) -> Option<std::net::Ipv4Addr> {
        self.peer_router_id
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// The negotiated hold time (meaningful once the peer's OPEN arrived).
    pub fn hold_time(&self) -> Duration {
        self.hold
    }

    /// When the driver must call [`Fsm::tick`] next.
    pub fn next_deadline(&self) -> Option<Instant> {
        [self.connect_retry_at, self.hold_at, self.keepalive_at]
            .into_iter()
            .flatten()
            .min()
    }

    fn reset_hold(&mut self, now: Instant) {
        self.hold_at = (!self.hold.is_zero()).then(|| now + self.hold);
    }

    fn reset_keepalive(&mut self, now: Instant) {
        self.keepalive_at = (!self.keepalive.is_zero()).then(|| now + self.keepalive);
    }

    /// Back to Idle after a failure: close, report, and retry later with backoff.
    fn fail(&mut self, now: Instant, reason: String, mut actions: Vec<Action>) -> Vec<Action> {
        let was_established = self.state == State::Established;
        actions.push(Action::CloseConnection);
        if was_established {
            actions.push(Action::Down(reason));
        } else {
            actions.push(Action::Down(format!(
                "{reason} (before the session was up)"
            )));
        }
        self.state = State::Active;
        self.hold_at = None;
        self.keepalive_at = None;
        self.connect_retry_at = Some(now + self.retry);
        self.retry = (self.retry * 2).min(MAX_RETRY);
        actions
    }

    /// Timers whose deadline has passed.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        if self.hold_at.is_some_and(|t| t <= now) {
            self.hold_at = None;
            return self.fail(
                now,
                "hold timer expired".into(),
                vec![Action::SendNotification {
                    code: 4,
                    subcode: 0,
                }],
            );
        }
        let mut actions = Vec::new();
        if self.keepalive_at.is_some_and(|t| t <= now) {
            actions.push(Action::SendKeepalive);
            self.reset_keepalive(now);
        }
        if self.connect_retry_at.is_some_and(|t| t <= now) {
            self.connect_retry_at = None;
            if matches!(self.state, State::Connect | State::Active) {
                self.state = State::Connect;
                actions.push(Action::Connect);
            }
        }
        actions
    }

    pub fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        use Event::*;
        match (self.state, event) {
            (State::Idle, Start) => {
                self.state = State::Connect;
                vec![Action::Connect]
            }
            (_, Start) => Vec::new(),
            (State::Idle, _) => Vec::new(),
            (_, Stop) => {
                let was_up = self.state == State::Established;
                let mut actions = Vec::new();
                if matches!(
                    self.state,
                    State::OpenSent | State::OpenConfirm | State::Established
                ) {
                    // Cease / Administrative Shutdown (RFC 4486).
                    actions.push(Action::SendNotification {
                        code: 6,
                        subcode: 2,
                    });
                }
                actions.push(Action::CloseConnection);
                if was_up {
                    actions.push(Action::Down("stopped by Sluice".into()));
                }
                *self = Self::new(self.timing);
                actions
            }
            (State::Connect | State::Active, TcpConnected) => {
                self.state = State::OpenSent;
                self.connect_retry_at = None;
                self.hold = OPEN_HOLD;
                self.reset_hold(now);
                vec![Action::SendOpen]
            }
            (State::Connect | State::Active, TcpFailed) => {
                self.state = State::Active;
                self.connect_retry_at = Some(now + self.retry);
                self.retry = (self.retry * 2).min(MAX_RETRY);
                Vec::new()
            }
            (State::OpenSent, OpenReceived(peer)) => {
                self.peer_router_id = Some(peer.router_id);
                let ours = self.timing.hold_time;
                let theirs = Duration::from_secs(peer.hold_time as u64);
                self.hold = ours.min(theirs);
                self.keepalive = if self.hold.is_zero() {
                    Duration::ZERO
                } else {
                    self.timing.keepalive_time.min(self.hold / 3)
                };
                self.state = State::OpenConfirm;
                self.reset_hold(now);
                self.reset_keepalive(now);
                vec![Action::SendKeepalive]
            }
            (State::OpenConfirm, KeepaliveReceived) => {
                self.state = State::Established;
                self.retry = self.timing.connect_time;
                self.reset_hold(now);
                vec![Action::Up, Action::SendRoutes]
            }
            (State::Established, KeepaliveReceived | UpdateReceived) => {
                self.reset_hold(now);
                Vec::new()
            }
            (_, ProtocolError { code, subcode }) => self.fail(
                now,
                format!("protocol error {code}/{subcode}"),
                vec![Action::SendNotification { code, subcode }],
            ),
            (_, NotificationReceived { code, subcode }) => self.fail(
                now,
                format!("peer sent NOTIFICATION {code}/{subcode}"),
                Vec::new(),
            ),
            (_, TcpFailed) => self.fail(now, "connection lost".into(), Vec::new()),
            // RFC 9384: Cease / BFD Down. Before OPEN there is no session to take down.
            (State::OpenSent | State::OpenConfirm | State::Established, BfdDown(reason)) => self
                .fail(
                    now,
                    format!("BFD down: {reason}"),
                    vec![Action::SendNotification {
                        code: 6,
                        subcode: 10,
                    }],
                ),
            (_, BfdDown(_)) => Vec::new(),
            // Anything else out of order is a finite state machine error (RFC 6608 subcodes).
            (state, event) => {
                let subcode = match state {
                    State::OpenSent => 1,
                    State::OpenConfirm => 2,
                    State::Established => 3,
                    _ => 0,
                };
                self.fail(
                    now,
                    format!("unexpected {event:?} in {state:?}"),
                    vec![Action::SendNotification { code: 5, subcode }],
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn timing() -> Timing {
        Timing {
            hold_time: Duration::from_secs(9),
            keepalive_time: Duration::from_secs(3),
            connect_time: Duration::from_secs(1),
        }
    }

    fn peer(hold: u16) -> PeerOpen {
        PeerOpen {
            asn: 64500,
            hold_time: hold,
            router_id: Ipv4Addr::new(10, 0, 0, 1),
            four_octet_as: true,
            ipv4_unicast: true,
            ipv6_unicast: true,
            graceful_restart: true,
        }
    }

    /// Start → connected → OPEN both ways → KEEPALIVE: Established, routes sent.
    fn established(t0: Instant, peer_hold: u16) -> Fsm {
        let mut fsm = Fsm::new(timing());
        assert_eq!(fsm.handle(Event::Start, t0), [Action::Connect]);
        assert_eq!(fsm.handle(Event::TcpConnected, t0), [Action::SendOpen]);
        assert_eq!(fsm.state(), State::OpenSent);
        assert_eq!(
            fsm.handle(Event::OpenReceived(peer(peer_hold)), t0),
            [Action::SendKeepalive]
        );
        assert_eq!(fsm.state(), State::OpenConfirm);
        assert_eq!(
            fsm.handle(Event::KeepaliveReceived, t0),
            [Action::Up, Action::SendRoutes]
        );
        assert_eq!(fsm.state(), State::Established);
        fsm
    }

    #[test]
    fn a_session_comes_up_through_every_state_and_sends_its_routes() {
        let fsm = established(Instant::now(), 90);
        assert_eq!(
            fsm.hold_time(),
            Duration::from_secs(9),
            "the smaller hold time wins"
        );
    }

    #[test]
    fn bfd_down_takes_an_established_session_down_with_cease_bfd_down_and_nothing_else() {
        let t0 = Instant::now();
        let mut fsm = established(t0, 90);
        let actions = fsm.handle(Event::BfdDown("detection time expired".into()), t0);
        assert_eq!(
            actions[0],
            Action::SendNotification {
                code: 6,
                subcode: 10
            }
        );
        assert!(actions.contains(&Action::CloseConnection));
        assert!(
            matches!(actions.last(), Some(Action::Down(r)) if r == "BFD down: detection time expired")
        );
        assert_eq!(fsm.state(), State::Active);
        // Before a connection there is no session to take down.
        assert!(fsm.handle(Event::BfdDown("x".into()), t0).is_empty());
        assert_eq!(fsm.state(), State::Active);
    }

    #[test]
    fn keepalives_go_out_every_min_of_configured_and_a_third_of_hold() {
        let t0 = Instant::now();
        let mut fsm = established(t0, 6); // hold 6 s → keepalive 2 s (< configured 3 s)
        assert_eq!(fsm.next_deadline(), Some(t0 + Duration::from_secs(2)));
        assert_eq!(
            fsm.tick(t0 + Duration::from_secs(2)),
            [Action::SendKeepalive]
        );
        // The peer's keepalives keep the session up.
        fsm.handle(Event::KeepaliveReceived, t0 + Duration::from_secs(5));
        assert!(fsm
            .tick(t0 + Duration::from_secs(10))
            .contains(&Action::SendKeepalive));
        assert_eq!(fsm.state(), State::Established);
    }

    #[test]
    fn silence_for_the_hold_time_sends_hold_timer_expired_and_retries_later() {
        let t0 = Instant::now();
        let mut fsm = established(t0, 9);
        let actions = fsm.tick(t0 + Duration::from_secs(9));
        assert_eq!(
            actions[0],
            Action::SendNotification {
                code: 4,
                subcode: 0
            }
        );
        assert!(actions.contains(&Action::CloseConnection));
        assert!(matches!(actions.last(), Some(Action::Down(r)) if r == "hold timer expired"));
        assert_eq!(fsm.state(), State::Active);
        // connect_time 1 s later, a new attempt.
        assert_eq!(fsm.tick(t0 + Duration::from_secs(10)), [Action::Connect]);
        assert_eq!(fsm.state(), State::Connect);
    }

    #[test]
    fn a_zero_hold_time_disables_hold_and_keepalives() {
        let t0 = Instant::now();
        let fsm = established(t0, 0);
        assert_eq!(fsm.next_deadline(), None);
    }

    #[test]
    fn failed_connections_back_off_by_doubling_up_to_a_minute() {
        let t0 = Instant::now();
        let mut fsm = Fsm::new(timing());
        fsm.handle(Event::Start, t0);
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..9 {
            fsm.handle(Event::TcpFailed, now);
            let next = fsm.next_deadline().unwrap();
            waits.push((next - now).as_secs());
            now = next;
            assert_eq!(fsm.tick(now), [Action::Connect]);
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        // Once up, the backoff starts over.
        fsm.handle(Event::TcpConnected, now);
        fsm.handle(Event::OpenReceived(peer(90)), now);
        fsm.handle(Event::KeepaliveReceived, now);
        fsm.handle(Event::TcpFailed, now);
        assert_eq!(fsm.next_deadline(), Some(now + Duration::from_secs(1)));
    }

    #[test]
    fn protocol_errors_are_answered_with_their_notification() {
        let t0 = Instant::now();
        let mut fsm = Fsm::new(timing());
        fsm.handle(Event::Start, t0);
        fsm.handle(Event::TcpConnected, t0);
        let actions = fsm.handle(
            Event::ProtocolError {
                code: 2,
                subcode: 2,
            },
            t0,
        );
        assert_eq!(
            actions[0],
            Action::SendNotification {
                code: 2,
                subcode: 2
            }
        );
        assert!(actions.contains(&Action::CloseConnection));
        assert_eq!(fsm.state(), State::Active);
    }

    #[test]
    fn messages_out_of_order_are_fsm_errors_with_the_state_as_subcode() {
        let t0 = Instant::now();
        let mut fsm = Fsm::new(timing());
        fsm.handle(Event::Start, t0);
        fsm.handle(Event::TcpConnected, t0);
        // An UPDATE before the OPEN exchange (RFC 6608: subcode 1, "in OpenSent").
        let actions = fsm.handle(Event::UpdateReceived, t0);
        assert_eq!(
            actions[0],
            Action::SendNotification {
                code: 5,
                subcode: 1
            }
        );
        let mut fsm = established(t0, 90);
        let actions = fsm.handle(Event::OpenReceived(peer(90)), t0);
        assert_eq!(
            actions[0],
            Action::SendNotification {
                code: 5,
                subcode: 3
            }
        );
        assert!(matches!(actions.last(), Some(Action::Down(_))));
    }

    #[test]
    fn stopping_an_established_session_sends_cease_and_goes_idle() {
        let t0 = Instant::now();
        let mut fsm = established(t0, 90);
        let actions = fsm.handle(Event::Stop, t0);
        assert_eq!(
            actions,
            [
                Action::SendNotification {
                    code: 6,
                    subcode: 2
                },
                Action::CloseConnection,
                Action::Down("stopped by Sluice".into()),
            ]
        );
        assert_eq!(fsm.state(), State::Idle);
        assert_eq!(fsm.next_deadline(), None);
    }

    #[test]
    fn a_peer_notification_ends_the_session_and_schedules_a_retry() {
        let t0 = Instant::now();
        let mut fsm = established(t0, 90);
        let actions = fsm.handle(
            Event::NotificationReceived {
                code: 6,
                subcode: 2,
            },
            t0,
        );
        assert_eq!(actions[0], Action::CloseConnection);
        assert!(matches!(&actions[1], Action::Down(r) if r.contains("6/2")));
        assert_eq!(fsm.next_deadline(), Some(t0 + Duration::from_secs(1)));
    }
}
