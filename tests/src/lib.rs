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

/// The `sluice` binary of this build (target/<profile>/sluice next to the test executable's
/// deps/ directory), or $SLUICE_BIN.
pub fn sluice_bin() -> String {
    if let Ok(bin) = std::env::var("SLUICE_BIN") {
        return bin;
    }
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("sluice");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo xtask test` does)",
        bin.display()
    );
    bin.display().to_string()
}
