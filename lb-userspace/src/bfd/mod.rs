//! BFD (RFC 5880 asynchronous mode; RFC 5881 single-hop on UDP 3784, RFC 5883 multi-hop on UDP
//! 4784) for the BGP sessions that ask for it. `packet` is the wire format and its checks,
//! `session` the state machine, both pure; `agent` is the edge: the sockets, the TTL checks, the
//! timers of every session on one task, and what BGP sessions watch.

pub mod agent;
pub mod packet;
pub mod session;
