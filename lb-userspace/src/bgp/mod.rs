//! BGP: Sluice's own speaker. What to say is decided purely (`advertise`: which prefixes, with
//! which attributes, to which peer; `fsm`: the RFC 4271 session state machine); saying it is
//! the edge (`session`: one tokio task per peer, TCP-MD5, collisions; `speaker`: the sessions,
//! the listeners on port 179). `wire` is the only module that knows the wire-format crate
//! (netgauze-bgp-pkt). Routes from peers are read and never installed.

pub mod advertise;
pub mod fsm;
pub mod session;
pub mod speaker;
pub mod wire;
