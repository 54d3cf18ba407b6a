//! BGP: Sluice's own speaker (issue 5, in progress). So far, both pure and tested: `wire`, the
//! message layer over netgauze-bgp-pkt (checked against known bytes, malformed input, and BIRD),
//! `fsm`, the RFC 4271 session state machine, and `advertise`, what each peer should be told.
//! The session driver (tokio, TCP-MD5, collision handling) and the wiring into `sluice run`
//! come next.

pub mod advertise;
pub mod fsm;
pub mod session;
pub mod speaker;
pub mod wire;
