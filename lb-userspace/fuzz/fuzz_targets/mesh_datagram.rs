//! The speaker mesh's decoder on arbitrary bytes: `envelope::Opener::open` (framing, tag,
//! sender, freshness, replay, kind), then, for bytes sealed with the right key (a member that
//! holds the secret but sends garbage), foca's SWIM decoder. Neither may panic; nothing but a
//! correctly sealed datagram may pass the first.
#![no_main]

use foca::{AccumulatingRuntime, Foca, PostcardCodec};
use lb_userspace::mesh::{
    envelope::{Kind, Opener, Sealer},
    swim_config, Id,
};
use libfuzzer_sys::fuzz_target;
use rand::{rngs::StdRng, SeedableRng};

const NOW: u64 = 1_800_000_000_000;
const KEY: &[u8] = b"fuzzing key";

fn known(node: &str) -> bool {
    node == "node-a" || node == "node-b"
}

fuzz_target!(|data: &[u8]| {
    // Raw bytes off the wire.
    let mut opener = Opener::new(KEY);
    if let Ok(opened) = opener.open(data, NOW, known) {
        // Forging a tag by chance is not a thing a fuzzer does: only a datagram sealed with the
        // key opens, and then it opens once.
        assert!(known(opened.node));
        assert!(opener.open(data, NOW, known).is_err(), "a replay opened");
    }
    // The same bytes as the body of a datagram sealed with the key, into SWIM.
    let mut sealer = Sealer::new(KEY, "node-b", 7);
    let sealed = sealer.seal(Kind::Swim, data, NOW);
    let opened = Opener::new(KEY)
        .open(&sealed, NOW, known)
        .expect("sealed with the key");
    assert_eq!(opened.body, data);
    let me = Id {
        node: "node-a".into(),
        addr: "192.0.2.1:7947".parse().unwrap(),
        bump: 1,
    };
    let mut swim = Foca::new(
        me,
        swim_config(std::time::Duration::from_secs(1), 32),
        StdRng::seed_from_u64(0),
        PostcardCodec,
    );
    let mut runtime = AccumulatingRuntime::new();
    let _ = swim.handle_data(opened.body, &mut runtime);
});
