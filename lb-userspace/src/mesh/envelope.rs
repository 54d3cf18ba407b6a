//! The mesh's datagram: who sent it, when, what it carries, sealed with HMAC-SHA256 under the
//! cluster's shared secret. Pure: sealing and opening touch no socket and no clock (the caller
//! passes the time), so every way a datagram can be wrong is a table test, and a fuzz target.
//!
//! ```text
//! magic "SLM1" | name length (1..=253) | node name | boot (u64) | seq (u64) | sent (u64, ms since
//! the epoch) | kind (u8) | body | HMAC-SHA256 of everything before it (32 bytes)
//! ```
//! - `boot` is the sender's start time (ms since the epoch) and `seq` counts its datagrams: a
//!   receiver accepts each (boot, seq) once, within a window of the newest 64, and never a boot
//!   older than the newest it has seen from that node (replays and reorderings past the window
//!   are dropped).
//! - `sent` must be within [`MAX_SKEW_MS`] of the receiver's clock, so a datagram captured long ago
//!   is not accepted by a receiver that restarted and remembers nothing.
//! - The node name must be one the receiver knows (a node of the cluster).
//!
//! Never panics on any input; everything it rejects is counted by reason by the caller.

use std::collections::BTreeMap;

use ring::hmac;

const MAGIC: &[u8; 4] = b"SLM1";
const TAG_LEN: usize = 32;
/// Magic, name length, then boot, seq, sent and kind after the name.
const FIXED_LEN: usize = 4 + 1 + 8 + 8 + 8 + 1;
/// How far a datagram's send time may be from the receiver's clock.
pub const MAX_SKEW_MS: u64 = 120_000;
/// Out-of-order datagrams accepted behind the newest one seen.
const WINDOW: u64 = 64;
/// The longest node name (a DNS subdomain).
pub const MAX_NAME_LEN: usize = 253;

/// What a datagram carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A SWIM message (foca's bytes).
    Swim = 0,
    /// "I am restarting: count me alive for this long" (body: milliseconds, u32).
    Restarting = 1,
}

/// Why a datagram was dropped (a label on `/metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, thiserror::Error)]
pub enum Reject {
    #[error("truncated")]
    Truncated,
    #[error("not a Sluice mesh datagram")]
    BadMagic,
    #[error("wrong key or altered")]
    BadTag,
    #[error("from a node this one does not know")]
    UnknownNode,
    #[error("sent too far from this node's clock")]
    Stale,
    #[error("replayed")]
    Replayed,
    #[error("unknown kind")]
    UnknownKind,
}

impl Reject {
    /// The label on `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            Reject::Truncated => "truncated",
            Reject::BadMagic => "bad_magic",
            Reject::BadTag => "bad_tag",
            Reject::UnknownNode => "unknown_node",
            Reject::Stale => "stale",
            Reject::Replayed => "replayed",
            Reject::UnknownKind => "unknown_kind",
        }
    }
}

/// A datagram that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened<'a> {
    pub node: &'a str,
    pub kind: Kind,
    pub body: &'a [u8],
}

/// The sending side: one per process.
pub struct Sealer {
    key: hmac::Key,
    node: String,
    boot: u64,
    seq: u64,
}

impl Sealer {
    /// `node` longer than [`MAX_NAME_LEN`] bytes is cut (node names never are).
    pub fn new(secret: &[u8], node: &str, boot: u64) -> Self {
        let mut node = node.to_string();
        while node.len() > MAX_NAME_LEN {
            node.pop();
        }
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            node,
            boot,
            seq: 0,
        }
    }

    pub fn seal(&mut self, kind: Kind, body: &[u8], now_ms: u64) -> Vec<u8> {
        self.seq += 1;
        let mut out = Vec::with_capacity(FIXED_LEN + self.node.len() + body.len() + TAG_LEN);
        out.extend_from_slice(MAGIC);
        out.push(self.node.len() as u8);
        out.extend_from_slice(self.node.as_bytes());
        out.extend_from_slice(&self.boot.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&now_ms.to_be_bytes());
        out.push(kind as u8);
        out.extend_from_slice(body);
        let tag = hmac::sign(&self.key, &out);
        out.extend_from_slice(tag.as_ref());
        out
    }
}

/// Replay state for one sender.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    boot: u64,
    newest: u64,
    /// Bit i: seq `newest - i` was seen.
    seen: u64,
}

impl Window {
    /// Records (boot, seq) if it is new; false for a replay.
    fn accept(&mut self, boot: u64, seq: u64) -> bool {
        if boot < self.boot {
            return false;
        }
        if boot > self.boot {
            *self = Window {
                boot,
                newest: seq,
                seen: 1,
            };
            return true;
        }
        if seq > self.newest {
            let shift = seq - self.newest;
            self.seen = if shift >= WINDOW {
                0
            } else {
                self.seen << shift
            } | 1;
            self.newest = seq;
            return true;
        }
        let behind = self.newest - seq;
        if behind >= WINDOW || self.seen & (1 << behind) != 0 {
            return false;
        }
        self.seen |= 1 << behind;
        true
    }
}

/// The receiving side: checks and remembers what each node sent.
pub struct Opener {
    key: hmac::Key,
    windows: BTreeMap<String, Window>,
}

struct Header<'a> {
    node: &'a str,
    boot: u64,
    seq: u64,
    sent: u64,
    kind: u8,
    body: &'a [u8],
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(b)
}

/// Splits a datagram into its fields and its tag, checking lengths only.
fn parse(datagram: &[u8]) -> Result<(Header<'_>, &[u8], &[u8]), Reject> {
    if datagram.len() < 5 {
        return Err(Reject::Truncated);
    }
    if &datagram[..4] != MAGIC {
        return Err(Reject::BadMagic);
    }
    let name_len = datagram[4] as usize;
    if name_len == 0 || datagram.len() < FIXED_LEN + name_len + TAG_LEN {
        return Err(Reject::Truncated);
    }
    let (signed, tag) = datagram.split_at(datagram.len() - TAG_LEN);
    let name = std::str::from_utf8(&signed[5..5 + name_len]).map_err(|_| Reject::BadTag)?;
    let at = 5 + name_len;
    Ok((
        Header {
            node: name,
            boot: read_u64(signed, at),
            seq: read_u64(signed, at + 8),
            sent: read_u64(signed, at + 16),
            kind: signed[at + 24],
            body: &signed[at + 25..],
        },
        signed,
        tag,
    ))
}

impl Opener {
    pub fn new(secret: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            windows: BTreeMap::new(),
        }
    }

    /// Checks a datagram: framing, tag, sender, freshness, replay, kind. Only a datagram that
    /// passes every check changes the replay state.
    pub fn open<'a>(
        &mut self,
        datagram: &'a [u8],
        now_ms: u64,
        known: impl Fn(&str) -> bool,
    ) -> Result<Opened<'a>, Reject> {
        let (header, signed, tag) = parse(datagram)?;
        hmac::verify(&self.key, signed, tag).map_err(|_| Reject::BadTag)?;
        if !known(header.node) {
            return Err(Reject::UnknownNode);
        }
        if header.sent.abs_diff(now_ms) > MAX_SKEW_MS {
            return Err(Reject::Stale);
        }
        let kind = match header.kind {
            0 => Kind::Swim,
            1 => Kind::Restarting,
            _ => return Err(Reject::UnknownKind),
        };
        let mut window = self.windows.get(header.node).copied().unwrap_or_default();
        if !window.accept(header.boot, header.seq) {
            return Err(Reject::Replayed);
        }
        self.windows.insert(header.node.to_string(), window);
        Ok(Opened {
            node: header.node,
            kind,
            body: header.body,
        })
    }

    /// Forgets nodes no longer in the cluster (bounded memory).
    pub fn retain(&mut self, known: impl Fn(&str) -> bool) {
        self.windows.retain(|node, _| known(node));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn known(node: &str) -> bool {
        matches!(node, "node-a" | "node-b")
    }

    #[test]
    fn a_sealed_datagram_opens_once_with_its_sender_kind_and_body() {
        let mut a = Sealer::new(b"secret", "node-a", 7);
        let mut opener = Opener::new(b"secret");
        let d = a.seal(Kind::Swim, b"hello", NOW);
        let opened = opener.open(&d, NOW + 5, known).unwrap();
        assert_eq!(
            opened,
            Opened {
                node: "node-a",
                kind: Kind::Swim,
                body: b"hello"
            }
        );
        assert_eq!(opener.open(&d, NOW + 5, known), Err(Reject::Replayed));
        let r = a.seal(Kind::Restarting, &10_000u32.to_be_bytes(), NOW);
        assert_eq!(opener.open(&r, NOW, known).unwrap().kind, Kind::Restarting);
    }

    #[test]
    fn every_bad_datagram_is_rejected_with_its_reason() {
        let mut a = Sealer::new(b"secret", "node-a", 7);
        let good = a.seal(Kind::Swim, b"payload", NOW);
        let mut flipped = good.clone();
        flipped[30] ^= 1;
        let mut bad_kind_sealer = a.seal(Kind::Swim, b"", NOW);
        // A kind byte no version knows, re-signed with the right key: rejected by kind.
        let kind_at = bad_kind_sealer.len() - TAG_LEN - 1;
        bad_kind_sealer[kind_at] = 9;
        bad_kind_sealer.truncate(bad_kind_sealer.len() - TAG_LEN);
        let tag = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, b"secret"),
            &bad_kind_sealer,
        );
        bad_kind_sealer.extend_from_slice(tag.as_ref());
        let cases: Vec<(&str, Vec<u8>, u64, Reject)> = vec![
            ("empty", vec![], NOW, Reject::Truncated),
            ("four bytes", b"SLM1".to_vec(), NOW, Reject::Truncated),
            (
                "other magic",
                b"SLM2xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
                    .to_vec(),
                NOW,
                Reject::BadMagic,
            ),
            (
                "truncated by one",
                good[..good.len() - 1].to_vec(),
                NOW,
                Reject::BadTag,
            ),
            (
                "header only",
                good[..FIXED_LEN + 6].to_vec(),
                NOW,
                Reject::Truncated,
            ),
            ("one bit flipped", flipped, NOW, Reject::BadTag),
            (
                "wrong key",
                Sealer::new(b"other", "node-a", 7).seal(Kind::Swim, b"x", NOW),
                NOW,
                Reject::BadTag,
            ),
            (
                "unknown node",
                Sealer::new(b"secret", "node-z", 7).seal(Kind::Swim, b"x", NOW),
                NOW,
                Reject::UnknownNode,
            ),
            (
                "sent long ago",
                good.clone(),
                NOW + MAX_SKEW_MS + 1,
                Reject::Stale,
            ),
            (
                "sent in the future",
                good.clone(),
                NOW - MAX_SKEW_MS - 1,
                Reject::Stale,
            ),
            ("unknown kind", bad_kind_sealer, NOW, Reject::UnknownKind),
        ];
        for (name, datagram, now, want) in cases {
            let mut opener = Opener::new(b"secret");
            assert_eq!(
                opener.open(&datagram, now, known).map(|_| ()),
                Err(want),
                "{name}"
            );
        }
    }

    #[test]
    fn replays_are_dropped_within_and_behind_the_window_and_across_boots() {
        let mut opener = Opener::new(b"k");
        let mut a = Sealer::new(b"k", "node-a", 100);
        let sealed: Vec<Vec<u8>> = (0..80).map(|_| a.seal(Kind::Swim, b"", NOW)).collect();
        // Out of order within the window: each accepted once.
        for i in [5usize, 3, 4, 0, 1, 2] {
            assert!(opener.open(&sealed[i], NOW, known).is_ok(), "seq {}", i + 1);
        }
        assert_eq!(opener.open(&sealed[3], NOW, known), Err(Reject::Replayed));
        // Far ahead, then something more than the window behind it.
        assert!(opener.open(&sealed[79], NOW, known).is_ok());
        assert_eq!(opener.open(&sealed[6], NOW, known), Err(Reject::Replayed));
        assert!(opener.open(&sealed[70], NOW, known).is_ok());
        // The sender restarts: its new boot resets the window, its old boot is over.
        let mut again = Sealer::new(b"k", "node-a", 200);
        assert!(opener
            .open(&again.seal(Kind::Swim, b"", NOW), NOW, known)
            .is_ok());
        assert_eq!(opener.open(&sealed[78], NOW, known), Err(Reject::Replayed));
        // Another node's sequence numbers are its own.
        let mut b = Sealer::new(b"k", "node-b", 100);
        assert!(opener
            .open(&b.seal(Kind::Swim, b"", NOW), NOW, known)
            .is_ok());
    }

    #[test]
    fn rejected_datagrams_do_not_move_the_replay_window() {
        let mut opener = Opener::new(b"k");
        let mut a = Sealer::new(b"k", "node-a", 100);
        let first = a.seal(Kind::Swim, b"", NOW);
        // A forged boot far in the future, with the wrong key, must not lock the sender out.
        let forged = Sealer::new(b"wrong", "node-a", u64::MAX).seal(Kind::Swim, b"", NOW);
        assert_eq!(opener.open(&forged, NOW, known), Err(Reject::BadTag));
        assert!(opener.open(&first, NOW, known).is_ok());
    }
}
