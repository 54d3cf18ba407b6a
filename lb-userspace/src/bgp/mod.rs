//! BGP: Sluice's own speaker (issue 5, in progress). So far: `wire`, the message layer over
//! netgauze-bgp-pkt, checked against known bytes and malformed input. The session state
//! machine, timers, TCP-MD5 and the advertisement set come next.

pub mod wire;
