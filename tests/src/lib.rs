//! Support for Sluice's packet tests, end-to-end tests and benchmark: frame builders written
//! from the RFCs, network namespaces that clean up after themselves, and a raw-socket
//! ARP/NDP client.

pub mod frames;
pub mod netns;
pub mod rawsock;
pub mod servers;

/// Fails loudly (CI runs as root) when the test cannot do what it must.
pub fn require_root() {
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "this test loads XDP programs and builds network namespaces: run it as root (CI does)"
    );
}
