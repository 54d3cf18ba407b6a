//! The BFD Control packet (RFC 5880 §4.1), pure: bytes in, a checked [`Packet`] or the reason it
//! is dropped out (the checks of §6.8.6 that need no session). Never panics on any input; the
//! fuzz target `bfd_packet` drives [`decode`] with arbitrary bytes.

/// Session states, as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum State {
    AdminDown = 0,
    Down = 1,
    Init = 2,
    Up = 3,
}

impl State {
    fn from_bits(bits: u8) -> Self {
        match bits & 3 {
            0 => Self::AdminDown,
            1 => Self::Down,
            2 => Self::Init,
            _ => Self::Up,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::AdminDown => "AdminDown",
            Self::Down => "Down",
            Self::Init => "Init",
            Self::Up => "Up",
        }
    }
}

/// Diagnostic codes (RFC 5880 §4.1): why the sender's session last left Up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Diag {
    None,
    DetectionTimeExpired,
    EchoFailed,
    NeighborSignaledDown,
    ForwardingPlaneReset,
    PathDown,
    ConcatenatedPathDown,
    AdministrativelyDown,
    ReverseConcatenatedPathDown,
    /// 9–31: reserved, carried as received.
    Other(u8),
}

impl Diag {
    pub fn from_code(code: u8) -> Self {
        match code & 0x1f {
            0 => Self::None,
            1 => Self::DetectionTimeExpired,
            2 => Self::EchoFailed,
            3 => Self::NeighborSignaledDown,
            4 => Self::ForwardingPlaneReset,
            5 => Self::PathDown,
            6 => Self::ConcatenatedPathDown,
            7 => Self::AdministrativelyDown,
            8 => Self::ReverseConcatenatedPathDown,
            other => Self::Other(other),
        }
    }

    pub fn code(self) -> u8 {
        match self {
            Self::None => 0,
            Self::DetectionTimeExpired => 1,
            Self::EchoFailed => 2,
            Self::NeighborSignaledDown => 3,
            Self::ForwardingPlaneReset => 4,
            Self::PathDown => 5,
            Self::ConcatenatedPathDown => 6,
            Self::AdministrativelyDown => 7,
            Self::ReverseConcatenatedPathDown => 8,
            Self::Other(code) => code & 0x1f,
        }
    }

    /// How logs, metrics and `sluice inspect` say it.
    pub fn reason(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::DetectionTimeExpired => "detection time expired",
            Self::EchoFailed => "echo failed",
            Self::NeighborSignaledDown => "neighbour signalled down",
            Self::ForwardingPlaneReset => "forwarding plane reset",
            Self::PathDown => "path down",
            Self::ConcatenatedPathDown => "concatenated path down",
            Self::AdministrativelyDown => "admin down",
            Self::ReverseConcatenatedPathDown => "reverse concatenated path down",
            Self::Other(_) => "reserved diagnostic",
        }
    }
}

/// A BFD Control packet's mandatory section. Intervals are in microseconds, as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub diag: Diag,
    pub state: State,
    pub poll: bool,
    pub final_: bool,
    /// Control Plane Independent.
    pub control_plane_independent: bool,
    pub demand: bool,
    pub detect_mult: u8,
    pub my_discriminator: u32,
    pub your_discriminator: u32,
    pub desired_min_tx_us: u32,
    pub required_min_rx_us: u32,
    pub required_min_echo_rx_us: u32,
}

/// Length of the mandatory section; Sluice sends no authentication section.
pub const LENGTH: usize = 24;

/// Why a packet is dropped; `label` is the `reason` of
/// `sluice_bfd_packets_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Drop {
    /// Shorter than 24 bytes, a Length field below the minimum, or above what arrived.
    Length,
    Version,
    /// Detect Mult is zero.
    DetectMult,
    /// The Multipoint bit is set.
    Multipoint,
    /// My Discriminator is zero, or Your Discriminator is zero outside Down/AdminDown.
    Discriminator,
    /// The A bit is set: Sluice configures no BFD authentication, so it cannot check it.
    Authentication,
    /// Single-hop packets must arrive with TTL/hop limit 255 (RFC 5881 §5); multi-hop ones at
    /// least the profile's minimum TTL (RFC 5883 §5).
    Ttl,
    /// No session has this discriminator or this source address.
    UnknownSession,
}

impl Drop {
    pub const ALL: [Drop; 8] = [
        Drop::Length,
        Drop::Version,
        Drop::DetectMult,
        Drop::Multipoint,
        Drop::Discriminator,
        Drop::Authentication,
        Drop::Ttl,
        Drop::UnknownSession,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Drop::Length => "length",
            Drop::Version => "version",
            Drop::DetectMult => "detect_mult",
            Drop::Multipoint => "multipoint",
            Drop::Discriminator => "discriminator",
            Drop::Authentication => "authentication",
            Drop::Ttl => "ttl",
            Drop::UnknownSession => "unknown_session",
        }
    }
}

fn word(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Decodes and checks a received packet (RFC 5880 §6.8.6, the checks before session lookup).
pub fn decode(bytes: &[u8]) -> Result<Packet, Drop> {
    if bytes.len() < LENGTH {
        return Err(Drop::Length);
    }
    if bytes[0] >> 5 != 1 {
        return Err(Drop::Version);
    }
    let flags = bytes[1];
    let authenticated = flags & 0x04 != 0;
    let length = bytes[3] as usize;
    let minimum = if authenticated { LENGTH + 2 } else { LENGTH };
    if length < minimum || length > bytes.len() {
        return Err(Drop::Length);
    }
    let packet = Packet {
        diag: Diag::from_code(bytes[0]),
        state: State::from_bits(flags >> 6),
        poll: flags & 0x20 != 0,
        final_: flags & 0x10 != 0,
        control_plane_independent: flags & 0x08 != 0,
        demand: flags & 0x02 != 0,
        detect_mult: bytes[2],
        my_discriminator: word(bytes, 4),
        your_discriminator: word(bytes, 8),
        desired_min_tx_us: word(bytes, 12),
        required_min_rx_us: word(bytes, 16),
        required_min_echo_rx_us: word(bytes, 20),
    };
    if packet.detect_mult == 0 {
        return Err(Drop::DetectMult);
    }
    if flags & 0x01 != 0 {
        return Err(Drop::Multipoint);
    }
    if packet.my_discriminator == 0
        || (packet.your_discriminator == 0
            && !matches!(packet.state, State::Down | State::AdminDown))
    {
        return Err(Drop::Discriminator);
    }
    if authenticated {
        return Err(Drop::Authentication);
    }
    Ok(packet)
}

/// The 24 bytes of a packet Sluice sends.
pub fn encode(packet: &Packet) -> [u8; LENGTH] {
    let mut bytes = [0u8; LENGTH];
    bytes[0] = (1 << 5) | packet.diag.code();
    bytes[1] = ((packet.state as u8) << 6)
        | (u8::from(packet.poll) << 5)
        | (u8::from(packet.final_) << 4)
        | (u8::from(packet.control_plane_independent) << 3)
        | (u8::from(packet.demand) << 1);
    bytes[2] = packet.detect_mult;
    bytes[3] = LENGTH as u8;
    bytes[4..8].copy_from_slice(&packet.my_discriminator.to_be_bytes());
    bytes[8..12].copy_from_slice(&packet.your_discriminator.to_be_bytes());
    bytes[12..16].copy_from_slice(&packet.desired_min_tx_us.to_be_bytes());
    bytes[16..20].copy_from_slice(&packet.required_min_rx_us.to_be_bytes());
    bytes[20..24].copy_from_slice(&packet.required_min_echo_rx_us.to_be_bytes());
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up() -> Packet {
        Packet {
            diag: Diag::None,
            state: State::Up,
            poll: true,
            final_: false,
            control_plane_independent: false,
            demand: false,
            detect_mult: 3,
            my_discriminator: 0x0102_0304,
            your_discriminator: 7,
            desired_min_tx_us: 100_000,
            required_min_rx_us: 300_000,
            required_min_echo_rx_us: 0,
        }
    }

    #[test]
    fn encoding_then_decoding_gives_the_same_packet() {
        let bytes = encode(&up());
        assert_eq!(bytes[0], 0x20);
        assert_eq!(bytes[1], 0b1110_0000);
        assert_eq!(&bytes[4..8], &[1, 2, 3, 4]);
        assert_eq!(decode(&bytes), Ok(up()));
        let down = Packet {
            state: State::Down,
            diag: Diag::DetectionTimeExpired,
            poll: false,
            final_: true,
            your_discriminator: 0,
            ..up()
        };
        assert_eq!(decode(&encode(&down)), Ok(down));
    }

    /// The shape of a router's packet before the session is up (state Init, 1 s intervals).
    #[test]
    fn decodes_an_init_packet_with_one_second_intervals() {
        let bytes = [
            0x20, 0x80, 0x03, 0x18, 0x6e, 0x1d, 0x4b, 0xa2, 0x00, 0x00, 0x12, 0x34, 0x00, 0x0f,
            0x42, 0x40, 0x00, 0x0f, 0x42, 0x40, 0x00, 0x00, 0x00, 0x00,
        ];
        let packet = decode(&bytes).unwrap();
        assert_eq!(packet.state, State::Init);
        assert_eq!(packet.my_discriminator, 0x6e1d_4ba2);
        assert_eq!(packet.your_discriminator, 0x1234);
        assert_eq!(packet.desired_min_tx_us, 1_000_000);
        assert_eq!(packet.detect_mult, 3);
    }

    #[test]
    fn malformed_packets_are_dropped_with_their_reason() {
        let good = encode(&up());
        let with = |at: usize, value: u8| {
            let mut b = good;
            b[at] = value;
            b
        };
        let cases: Vec<(Vec<u8>, Drop)> = vec![
            (Vec::new(), Drop::Length),
            (good[..23].to_vec(), Drop::Length),
            (with(3, 23).to_vec(), Drop::Length),
            (with(3, 25).to_vec(), Drop::Length),
            (with(0, 0x40).to_vec(), Drop::Version),
            (with(0, 0x00).to_vec(), Drop::Version),
            (with(2, 0).to_vec(), Drop::DetectMult),
            (with(1, 0xc1).to_vec(), Drop::Multipoint),
            (
                {
                    let mut b = good;
                    b[4..8].fill(0);
                    b.to_vec()
                },
                Drop::Discriminator,
            ),
            (
                {
                    let mut b = good;
                    b[8..12].fill(0);
                    b.to_vec()
                },
                Drop::Discriminator,
            ),
            // The A bit with an authentication section of 2 bytes, and without one.
            (
                {
                    let mut b = with(1, 0xc4).to_vec();
                    b[3] = 26;
                    b.extend([1, 2]);
                    b
                },
                Drop::Authentication,
            ),
            (with(1, 0xc4).to_vec(), Drop::Length),
        ];
        for (bytes, reason) in cases {
            assert_eq!(decode(&bytes), Err(reason), "{bytes:02x?}");
        }
        // Your Discriminator zero is fine while Down (the peer does not know ours yet), and
        // bytes after the Length are ignored.
        let mut b = good.to_vec();
        b[1] = 0x40;
        b[8..12].fill(0);
        b.extend([0xff; 8]);
        assert_eq!(decode(&b).map(|p| p.state), Ok(State::Down));
    }

    #[test]
    fn reserved_diagnostics_are_carried_not_refused() {
        let mut b = encode(&up());
        b[0] = 0x20 | 17;
        assert_eq!(decode(&b).unwrap().diag, Diag::Other(17));
        assert_eq!(Diag::Other(17).code(), 17);
    }
}
