//! BFD packets from the wire: `bfd::packet::decode` must never panic, what it accepts must
//! encode back to the same packet, and a session fed any sequence of accepted packets (and
//! timer ticks) must never panic either.
//!
//! `cargo +nightly fuzz run bfd_packet -- -runs=10000000`
#![no_main]

use std::time::{Duration, Instant};

use lb_userspace::bfd::{
    packet::{decode, encode},
    session::{Session, Settings},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let mut session = Session::new(
        Settings {
            desired_min_tx: Duration::from_millis(100),
            required_min_rx: Duration::from_millis(100),
            detect_mult: 3,
            passive: data.first().is_some_and(|b| b & 1 == 1),
        },
        7,
        t0,
    );
    // The input is a sequence of 24-byte packets (the last one may be short), 10 ms apart.
    for (i, chunk) in data.chunks(24).enumerate() {
        let now = t0 + Duration::from_millis(10 * i as u64);
        if let Ok(packet) = decode(chunk) {
            assert_eq!(decode(&encode(&packet)), Ok(packet));
            let _ = session.receive(&packet, now, 0.5);
        }
        let _ = session.tick(now, 0.5);
        let _ = session.next_deadline();
    }
    let _ = session.hold_for(Duration::from_secs(30));
});
