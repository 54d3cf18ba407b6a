//! BGP messages on the wire: the only module that knows the wire-format crate
//! (netgauze-bgp-pkt). Builds what Sluice sends: OPEN with its capabilities, UPDATEs announcing
//! and withdrawing service prefixes with their attributes, End-of-RIB, KEEPALIVE, NOTIFICATION.
//! Reads what peers send, turning every malformed message into the NOTIFICATION (code,
//! subcode) RFC 4271 §6 prescribes, never a panic.

use std::net::{IpAddr, Ipv4Addr};

use bytes::BytesMut;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netgauze_bgp_pkt::{
    capabilities::{
        BgpCapability, FourOctetAsCapability, GracefulRestartAddressFamily,
        GracefulRestartCapability, MultiProtocolExtensionsCapability,
    },
    codec::{BgpCodec, BgpCodecDecoderError},
    community::{Community, LargeCommunity},
    nlri::{Ipv4Unicast, Ipv4UnicastAddress, Ipv6Unicast, Ipv6UnicastAddress},
    notification::{BgpNotificationMessage, CeaseError},
    open::{BgpOpenMessage, BgpOpenMessageParameter},
    path_attribute::{
        As4PathSegment, AsPath, AsPathSegmentType, Communities, LargeCommunities, LocalPreference,
        MpReach, MpUnreach, NextHop, Origin, PathAttribute, PathAttributeValue,
    },
    update::BgpUpdateMessage,
};
use netgauze_iana::address_family::AddressType;
use tokio_util::codec::{Decoder, Encoder};

/// A BGP message (the wire crate's type; other modules name it through here).
pub use netgauze_bgp_pkt::BgpMessage;

/// AS_TRANS (RFC 6793): the 2-octet "My AS" of a speaker whose ASN does not fit 16 bits.
pub const AS_TRANS: u16 = 23456;

/// What we say about ourselves in OPEN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenParams {
    pub asn: u32,
    pub hold_time: u16,
    pub router_id: Ipv4Addr,
    /// Graceful restart (RFC 4724): advertised with this restart time, so peers keep our routes
    /// while we restart.
    pub restart_time: u16,
    /// The R bit: this OPEN is the first after a restart.
    pub restarting: bool,
    /// The F bit of both families: forwarding went on through the restart (the data plane's
    /// links are pinned and were adopted). Without it, the peer drops our stale routes at once.
    pub forwarding_preserved: bool,
}

/// What a peer said about itself in OPEN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerOpen {
    pub asn: u32,
    pub hold_time: u16,
    pub router_id: Ipv4Addr,
    pub four_octet_as: bool,
    pub ipv4_unicast: bool,
    pub ipv6_unicast: bool,
    pub graceful_restart: bool,
}

/// The NOTIFICATION to send (or that was received): RFC 4271 code and subcode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub code: u8,
    pub subcode: u8,
    pub message: BgpNotificationMessage,
}

impl std::fmt::Display for Notification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.code {
            1 => "message header error",
            2 => "OPEN message error",
            3 => "UPDATE message error",
            4 => "hold timer expired",
            5 => "finite state machine error",
            6 => "cease",
            7 => "route refresh error",
            _ => "unknown",
        };
        write!(f, "{name} ({}/{})", self.code, self.subcode)
    }
}

impl Notification {
    fn from_message(message: BgpNotificationMessage) -> Self {
        let bytes = encode(&BgpMessage::Notification(message.clone()), true).unwrap_or_default();
        let (code, subcode) = (
            bytes.get(19).copied().unwrap_or(0),
            bytes.get(20).copied().unwrap_or(0),
        );
        Self {
            code,
            subcode,
            message,
        }
    }
}

/// The OPEN we send: 4-octet AS, multiprotocol IPv4 and IPv6 unicast, route refresh, graceful
/// restart.
pub fn open(params: &OpenParams) -> BgpMessage {
    let my_as = u16::try_from(params.asn).unwrap_or(AS_TRANS);
    let families = [AddressType::Ipv4Unicast, AddressType::Ipv6Unicast];
    let capabilities: Vec<BgpCapability> = vec![
        BgpCapability::MultiProtocolExtensions(MultiProtocolExtensionsCapability::new(
            AddressType::Ipv4Unicast,
        )),
        BgpCapability::MultiProtocolExtensions(MultiProtocolExtensionsCapability::new(
            AddressType::Ipv6Unicast,
        )),
        BgpCapability::RouteRefresh,
        BgpCapability::FourOctetAs(FourOctetAsCapability::new(params.asn)),
        BgpCapability::GracefulRestartCapability(GracefulRestartCapability::new(
            params.restarting,
            false,
            params.restart_time,
            families
                .iter()
                .map(|f| GracefulRestartAddressFamily::new(params.forwarding_preserved, *f))
                .collect::<Vec<_>>(),
        )),
    ];
    BgpMessage::Open(BgpOpenMessage::new(
        my_as,
        params.hold_time,
        params.router_id,
        vec![BgpOpenMessageParameter::new_capabilities(capabilities)],
    ))
}

/// Checks a peer's OPEN against what we expect (RFC 4271 §6.2, RFC 6793).
pub fn check_open(open: &BgpOpenMessage, expected_asn: u32) -> Result<PeerOpen, Notification> {
    let caps = open.capabilities();
    let four_octet = caps.iter().find_map(|c| match c {
        BgpCapability::FourOctetAs(cap) => Some(cap.asn4()),
        _ => None,
    });
    let asn = four_octet.unwrap_or(open.my_as() as u32);
    let open_error = |subcode: u8| {
        let message = match subcode {
            2 => netgauze_bgp_pkt::notification::OpenMessageError::BadPeerAs {
                value: Box::new([]),
            },
            3 => netgauze_bgp_pkt::notification::OpenMessageError::BadBgpIdentifier {
                value: Box::new([]),
            },
            _ => netgauze_bgp_pkt::notification::OpenMessageError::UnacceptableHoldTime {
                value: Box::new([]),
            },
        };
        Notification::from_message(BgpNotificationMessage::OpenMessageError(message))
    };
    if asn != expected_asn {
        return Err(open_error(2));
    }
    if open.bgp_id().is_unspecified() {
        return Err(open_error(3));
    }
    if matches!(open.hold_time(), 1 | 2) {
        return Err(open_error(6));
    }
    let mp = |t: AddressType| {
        caps.iter().any(
            |c| matches!(c, BgpCapability::MultiProtocolExtensions(m) if m.address_type() == t),
        )
    };
    let any_mp = caps
        .iter()
        .any(|c| matches!(c, BgpCapability::MultiProtocolExtensions(_)));
    Ok(PeerOpen {
        asn,
        hold_time: open.hold_time(),
        router_id: open.bgp_id(),
        four_octet_as: four_octet.is_some(),
        // No multiprotocol capability at all means IPv4 unicast only (RFC 4760 §8).
        ipv4_unicast: !any_mp || mp(AddressType::Ipv4Unicast),
        ipv6_unicast: mp(AddressType::Ipv6Unicast),
        graceful_restart: caps
            .iter()
            .any(|c| matches!(c, BgpCapability::GracefulRestartCapability(_))),
    })
}

/// The attributes every route of one UPDATE shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes {
    pub local_asn: u32,
    /// eBGP: our ASN is prepended; iBGP: the AS path is empty and LOCAL_PREF is sent.
    pub ebgp: bool,
    pub next_hop: IpAddr,
    pub communities: Vec<(u16, u16)>,
    pub large_communities: Vec<(u32, u32, u32)>,
    pub local_pref: Option<u32>,
}

fn attribute(value: PathAttributeValue, optional: bool, transitive: bool) -> PathAttribute {
    PathAttribute::from(optional, transitive, false, false, value)
        .expect("flags chosen to match the attribute type")
}

/// An UPDATE announcing `prefixes` (all of one family, matching the next hop's family for IPv4;
/// IPv6 prefixes go in MP_REACH_NLRI) with `attrs`.
pub fn announce(prefixes: &[IpNet], attrs: &Attributes) -> Result<BgpMessage, String> {
    let mut path = vec![
        attribute(PathAttributeValue::Origin(Origin::IGP), false, true),
        attribute(
            PathAttributeValue::AsPath(AsPath::As4PathSegments(if attrs.ebgp {
                vec![As4PathSegment::new(
                    AsPathSegmentType::AsSequence,
                    vec![attrs.local_asn],
                )]
                .into()
            } else {
                Box::new([])
            })),
            false,
            true,
        ),
    ];
    if !attrs.ebgp {
        path.push(attribute(
            PathAttributeValue::LocalPreference(LocalPreference::new(
                attrs.local_pref.unwrap_or(100),
            )),
            false,
            true,
        ));
    }
    if !attrs.communities.is_empty() {
        let communities: Vec<Community> = attrs
            .communities
            .iter()
            .map(|(a, v)| Community::new(((*a as u32) << 16) | *v as u32))
            .collect();
        path.push(attribute(
            PathAttributeValue::Communities(Communities::new(communities)),
            true,
            true,
        ));
    }
    if !attrs.large_communities.is_empty() {
        let large: Vec<LargeCommunity> = attrs
            .large_communities
            .iter()
            .map(|(g, a, b)| LargeCommunity::new(*g, *a, *b))
            .collect();
        path.push(attribute(
            PathAttributeValue::LargeCommunities(LargeCommunities::new(large)),
            true,
            true,
        ));
    }
    let (v4, v6) = split(prefixes)?;
    if !v6.is_empty() {
        let IpAddr::V6(next_hop) = attrs.next_hop else {
            return Err("IPv6 prefixes need an IPv6 next hop".into());
        };
        path.push(attribute(
            PathAttributeValue::MpReach(MpReach::Ipv6Unicast {
                next_hop_global: next_hop,
                next_hop_local: None,
                nlri: v6.into(),
            }),
            true,
            false,
        ));
    }
    if !v4.is_empty() {
        let IpAddr::V4(next_hop) = attrs.next_hop else {
            return Err("IPv4 prefixes need an IPv4 next hop".into());
        };
        path.push(attribute(
            PathAttributeValue::NextHop(NextHop::new(next_hop)),
            false,
            true,
        ));
    }
    Ok(BgpMessage::Update(BgpUpdateMessage::new(
        Vec::new(),
        path,
        v4,
    )))
}

/// An UPDATE withdrawing `prefixes` (IPv4 in the withdrawn routes, IPv6 in MP_UNREACH_NLRI).
/// Prefixes withdrawn per UPDATE at most: 200 IPv6 /128s take 3,400 bytes, so every such
/// message fits BGP's 4,096-byte limit (RFC 4271 §4.1).
pub const MAX_WITHDRAWN_PER_UPDATE: usize = 200;

/// UPDATEs withdrawing `prefixes`, [`MAX_WITHDRAWN_PER_UPDATE`] at a time.
pub fn withdrawals(prefixes: &[IpNet]) -> Result<Vec<BgpMessage>, String> {
    prefixes
        .chunks(MAX_WITHDRAWN_PER_UPDATE)
        .map(withdraw)
        .collect()
}

pub fn withdraw(prefixes: &[IpNet]) -> Result<BgpMessage, String> {
    let (v4, v6) = split(prefixes)?;
    let path = if v6.is_empty() {
        Vec::new()
    } else {
        // Extended length when the attribute is longer than a one-byte length can say (15
        // /128s are): AFI, SAFI, then each prefix's length byte and its significant bytes.
        let length: usize = 3 + prefixes
            .iter()
            .filter(|p| matches!(p, IpNet::V6(_)))
            .map(|p| 1 + (p.prefix_len() as usize).div_ceil(8))
            .sum::<usize>();
        vec![PathAttribute::from(
            true,
            false,
            false,
            length > 255,
            PathAttributeValue::MpUnreach(MpUnreach::Ipv6Unicast { nlri: v6.into() }),
        )
        .expect("flags chosen to match the attribute type")]
    };
    Ok(BgpMessage::Update(BgpUpdateMessage::new(
        v4,
        path,
        Vec::new(),
    )))
}

/// End-of-RIB (RFC 4724 §2): an empty UPDATE for IPv4, an empty MP_UNREACH_NLRI for IPv6.
/// The address families a session may carry: those the peer's OPEN offers (we offer IPv4 and
/// IPv6 unicast). RFC 4760 §8: a peer that offers no multiprotocol capability speaks IPv4
/// unicast only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Families {
    pub ipv4: bool,
    pub ipv6: bool,
}

impl Families {
    pub fn of(peer: &PeerOpen) -> Self {
        Self {
            ipv4: peer.ipv4_unicast,
            ipv6: peer.ipv6_unicast,
        }
    }
}

/// End-of-RIB (RFC 4724 §2) for each family of the session, IPv4 first: never for a family the
/// peer did not negotiate (RFC 4760 §6 forbids sending it UPDATEs of that family).
pub fn end_of_ribs(families: Families) -> Vec<BgpMessage> {
    let mut out = Vec::new();
    if families.ipv4 {
        out.push(end_of_rib(false));
    }
    if families.ipv6 {
        out.push(end_of_rib(true));
    }
    out
}

pub fn end_of_rib(ipv6: bool) -> BgpMessage {
    let path = if ipv6 {
        vec![attribute(
            PathAttributeValue::MpUnreach(MpUnreach::Ipv6Unicast { nlri: Box::new([]) }),
            true,
            false,
        )]
    } else {
        Vec::new()
    };
    BgpMessage::Update(BgpUpdateMessage::new(Vec::new(), path, Vec::new()))
}

/// A NOTIFICATION with no data, by code and subcode (RFC 4271 §4.5): 21 bytes.
pub fn notification_bytes(code: u8, subcode: u8) -> Vec<u8> {
    let mut bytes = vec![0xff; 16];
    bytes.extend_from_slice(&21u16.to_be_bytes());
    bytes.extend_from_slice(&[3, code, subcode]);
    bytes
}

/// Cease / Administrative Shutdown (RFC 4486), sent when Sluice stops.
pub fn cease() -> BgpMessage {
    BgpMessage::Notification(BgpNotificationMessage::CeaseError(
        CeaseError::AdministrativeShutdown {
            value: Box::new([]),
        },
    ))
}

/// IPv4 and IPv6 prefixes as NLRI, apart.
type Nlri = (Vec<Ipv4UnicastAddress>, Vec<Ipv6UnicastAddress>);

fn split(prefixes: &[IpNet]) -> Result<Nlri, String> {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for prefix in prefixes {
        match prefix {
            IpNet::V4(net) => v4.push(v4_nlri(*net)?),
            IpNet::V6(net) => v6.push(v6_nlri(*net)?),
        }
    }
    Ok((v4, v6))
}

fn v4_nlri(net: Ipv4Net) -> Result<Ipv4UnicastAddress, String> {
    Ipv4Unicast::from_net(net)
        .map(Ipv4UnicastAddress::new_no_path_id)
        .map_err(|_| format!("{net} is not a unicast prefix"))
}

fn v6_nlri(net: Ipv6Net) -> Result<Ipv6UnicastAddress, String> {
    Ipv6Unicast::from_net(net)
        .map(|n| Ipv6UnicastAddress::new(None, n))
        .map_err(|_| format!("{net} is not a unicast prefix"))
}

/// Encodes one message. `asn4`: whether 4-octet AS numbers were negotiated (AS_PATH width).
pub fn encode(message: &BgpMessage, asn4: bool) -> Result<Vec<u8>, String> {
    let mut codec = BgpCodec::new(asn4);
    let mut buf = BytesMut::new();
    codec
        .encode(message.clone(), &mut buf)
        .map_err(|e| format!("{e:?}"))?;
    Ok(buf.to_vec())
}

/// A stream decoder: feed it bytes, take whole messages out.
pub struct Reader {
    codec: BgpCodec,
    buffer: BytesMut,
}

impl Reader {
    pub fn new(asn4: bool) -> Self {
        Self {
            codec: BgpCodec::new(asn4),
            buffer: BytesMut::new(),
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next whole message, `Ok(None)` when more bytes are needed, or the NOTIFICATION the
    /// malformed input calls for (the session must send it and close).
    pub fn next_message(&mut self) -> Result<Option<BgpMessage>, Notification> {
        match self.codec.decode(&mut self.buffer) {
            Ok(message) => Ok(message.map(|(message, _ignored)| message)),
            Err(BgpCodecDecoderError::Incomplete(_)) => Ok(None),
            Err(BgpCodecDecoderError::BgpMessageParsingError(e)) => {
                Err(Notification::from_message(e.into()))
            }
            Err(BgpCodecDecoderError::IoError(e)) => Err(Notification::from_message(
                BgpNotificationMessage::CeaseError(CeaseError::OutOfResources {
                    value: e.as_bytes().to_vec().into(),
                }),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARKER: [u8; 16] = [0xff; 16];

    fn header(len: u16, kind: u8) -> Vec<u8> {
        let mut h = MARKER.to_vec();
        h.extend_from_slice(&len.to_be_bytes());
        h.push(kind);
        h
    }

    #[test]
    fn a_notification_by_code_reads_back_with_that_code() {
        let mut reader = Reader::new(true);
        reader.feed(&notification_bytes(6, 2));
        assert_eq!(reader.next_message().unwrap(), Some(cease()));
        assert_eq!(notification_bytes(4, 0).len(), 21);
    }

    #[test]
    fn a_cease_bfd_down_from_a_router_reads_as_a_notification() {
        // RFC 9384: FRR sends Cease / BFD Down (6/10) when BFD takes the session down.
        let mut reader = Reader::new(true);
        reader.feed(&notification_bytes(6, 10));
        let message = reader.next_message();
        assert!(
            matches!(message, Ok(Some(BgpMessage::Notification(_)))),
            "{message:?}"
        );
    }

    #[test]
    fn end_of_rib_goes_only_to_the_families_the_peer_negotiated() {
        let bytes = |f: Families| -> Vec<Vec<u8>> {
            end_of_ribs(f)
                .iter()
                .map(|m| encode(m, true).unwrap())
                .collect()
        };
        // IPv4: an empty UPDATE (23 bytes); IPv6: MP_UNREACH_NLRI with AFI 2, SAFI 1 and no
        // prefixes (RFC 4724 §2).
        let v4 = [header(23, 2), vec![0, 0, 0, 0]].concat();
        let v6 = [header(29, 2), vec![0, 0, 0, 6, 0x80, 15, 3, 0, 2, 1]].concat();
        assert_eq!(
            bytes(Families {
                ipv4: true,
                ipv6: true
            }),
            [v4.clone(), v6.clone()]
        );
        assert_eq!(
            bytes(Families {
                ipv4: true,
                ipv6: false
            }),
            [v4]
        );
        assert_eq!(
            bytes(Families {
                ipv4: false,
                ipv6: true
            }),
            [v6]
        );
        // A peer that offers no multiprotocol capability: IPv4 unicast only.
        let open = BgpOpenMessage::new(64500, 90, Ipv4Addr::new(10, 0, 0, 1), vec![]);
        let peer = check_open(&open, 64500).unwrap();
        assert_eq!(
            Families::of(&peer),
            Families {
                ipv4: true,
                ipv6: false
            }
        );
    }

    #[test]
    fn keepalive_is_the_19_byte_header() {
        assert_eq!(encode(&BgpMessage::KeepAlive, true).unwrap(), header(19, 4));
    }

    #[test]
    fn after_a_restart_that_kept_forwarding_open_sets_the_r_and_f_bits() {
        let params = |restarting, forwarding_preserved| OpenParams {
            asn: 64512,
            hold_time: 90,
            router_id: Ipv4Addr::new(192, 0, 2, 10),
            restart_time: 120,
            restarting,
            forwarding_preserved,
        };
        let gr = |p: OpenParams| {
            let bytes = encode(&open(&p), true).unwrap();
            let at = bytes
                .windows(2)
                .position(|w| w == [64, 10])
                .expect("a graceful restart capability");
            bytes[at + 2..at + 12].to_vec()
        };
        // Restart flags and time (R = 0x80 of the first byte), then AFI, SAFI, flags (F = 0x80).
        assert_eq!(gr(params(false, false)), [0, 120, 0, 1, 1, 0, 0, 2, 1, 0]);
        assert_eq!(
            gr(params(true, true)),
            [0x80, 120, 0, 1, 1, 0x80, 0, 2, 1, 0x80]
        );
        assert_eq!(
            gr(params(false, true)),
            [0, 120, 0, 1, 1, 0x80, 0, 2, 1, 0x80]
        );
    }

    #[test]
    fn our_open_carries_every_capability_in_rfc_order_of_fields() {
        let bytes = encode(
            &open(&OpenParams {
                asn: 4_200_000_001,
                hold_time: 90,
                router_id: Ipv4Addr::new(192, 0, 2, 10),
                restart_time: 120,
                restarting: false,
                forwarding_preserved: false,
            }),
            true,
        )
        .unwrap();
        let mut want = Vec::new();
        want.extend_from_slice(&[4]); // version
        want.extend_from_slice(&AS_TRANS.to_be_bytes()); // my AS: AS_TRANS for a 4-octet ASN
        want.extend_from_slice(&90u16.to_be_bytes());
        want.extend_from_slice(&[192, 0, 2, 10]);
        let caps: Vec<u8> = [
            vec![1, 4, 0, 1, 0, 1],              // MP: IPv4 unicast (AFI 1, SAFI 1)
            vec![1, 4, 0, 2, 0, 1],              // MP: IPv6 unicast (AFI 2, SAFI 1)
            vec![2, 0],                          // route refresh
            vec![65, 4, 0xfa, 0x56, 0xea, 0x01], // 4-octet AS 4200000001
            vec![64, 10, 0, 120, 0, 1, 1, 0, 0, 2, 1, 0], // GR: time 120, v4 + v6 unicast
        ]
        .concat();
        want.push((caps.len() + 2) as u8); // optional parameters length
        want.push(2); // parameter type: capabilities
        want.push(caps.len() as u8);
        want.extend_from_slice(&caps);
        let mut full = header((19 + want.len()) as u16, 1);
        full.extend_from_slice(&want);
        assert_eq!(bytes, full);
    }

    #[test]
    fn withdrawing_thousands_of_prefixes_takes_updates_that_each_fit_4096_bytes() {
        let v4: Vec<IpNet> = (0..5000u32)
            .map(|i| {
                IpNet::from(ipnet::Ipv4Net::from(std::net::Ipv4Addr::from(
                    0x0a5a_0000 + i,
                )))
            })
            .collect();
        let v6: Vec<IpNet> = (0..5000u128)
            .map(|i| {
                IpNet::from(ipnet::Ipv6Net::from(std::net::Ipv6Addr::from(
                    0xfd00_u128 << 112 | i,
                )))
            })
            .collect();
        for prefixes in [v4, v6] {
            let messages = withdrawals(&prefixes).unwrap();
            assert_eq!(messages.len(), 25);
            let mut withdrawn = 0;
            for m in &messages {
                let bytes = encode(m, true).unwrap();
                assert!(bytes.len() <= 4096, "{} bytes", bytes.len());
                let mut reader = Reader::new(true);
                reader.feed(&bytes);
                match reader.next_message() {
                    Ok(Some(BgpMessage::Update(u))) => {
                        withdrawn += u.withdraw_routes().len()
                            + u.path_attributes()
                                .iter()
                                .map(|a| match a.value() {
                                    PathAttributeValue::MpUnreach(MpUnreach::Ipv6Unicast {
                                        nlri,
                                    }) => nlri.len(),
                                    _ => 0,
                                })
                                .sum::<usize>();
                    }
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(withdrawn, 5000);
        }
    }

    #[test]
    fn an_ebgp_announcement_has_origin_path_next_hop_and_communities() {
        let msg = announce(
            &["198.51.100.10/32".parse().unwrap()],
            &Attributes {
                local_asn: 64512,
                ebgp: true,
                next_hop: "10.0.0.2".parse().unwrap(),
                communities: vec![(64512, 100)],
                large_communities: vec![(64512, 1, 2)],
                local_pref: None,
            },
        )
        .unwrap();
        let bytes = encode(&msg, true).unwrap();
        let attrs: Vec<u8> = [
            vec![0x40, 1, 1, 0],                                       // ORIGIN IGP
            vec![0x40, 2, 6, 2, 1, 0, 0, 0xfc, 0x00], // AS_PATH: SEQUENCE [64512], 4-octet
            vec![0xc0, 8, 4, 0xfc, 0x00, 0, 100],     // COMMUNITIES 64512:100
            vec![0xc0, 32, 12, 0, 0, 0xfc, 0, 0, 0, 0, 1, 0, 0, 0, 2], // LARGE 64512:1:2
            vec![0x40, 3, 4, 10, 0, 0, 2],            // NEXT_HOP
        ]
        .concat();
        let mut body = vec![0, 0]; // no withdrawn routes
        body.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        body.extend_from_slice(&attrs);
        body.extend_from_slice(&[32, 198, 51, 100, 10]); // NLRI 198.51.100.10/32
        let mut want = header((19 + body.len()) as u16, 2);
        want.extend_from_slice(&body);
        assert_eq!(bytes, want);
    }

    #[test]
    fn an_ibgp_ipv6_announcement_carries_local_pref_and_mp_reach() {
        let msg = announce(
            &["2001:db8::10/128".parse().unwrap()],
            &Attributes {
                local_asn: 64512,
                ebgp: false,
                next_hop: "fd53:179::2".parse().unwrap(),
                communities: vec![],
                large_communities: vec![],
                local_pref: Some(200),
            },
        )
        .unwrap();
        let next_hop: [u8; 16] = "fd53:179::2"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        let prefix: [u8; 16] = "2001:db8::10"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        let mut mp = vec![0, 2, 1, 16]; // AFI 2 (IPv6), SAFI 1, next hop length 16
        mp.extend_from_slice(&next_hop);
        mp.push(0); // reserved
        mp.push(128);
        mp.extend_from_slice(&prefix);
        let attrs: Vec<u8> = [
            vec![0x40, 1, 1, 0],                           // ORIGIN IGP
            vec![0x40, 2, 0],                              // AS_PATH empty (iBGP)
            vec![0x40, 5, 4, 0, 0, 0, 200],                // LOCAL_PREF 200
            [vec![0x80, 14, mp.len() as u8], mp].concat(), // MP_REACH_NLRI
        ]
        .concat();
        let mut body = vec![0, 0];
        body.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        body.extend_from_slice(&attrs);
        let mut want = header((19 + body.len()) as u16, 2);
        want.extend_from_slice(&body);
        assert_eq!(encode(&msg, true).unwrap(), want);
    }

    #[test]
    fn withdrawals_list_ipv4_prefixes_and_put_ipv6_in_mp_unreach() {
        let msg = withdraw(&[
            "198.51.100.10/32".parse().unwrap(),
            "2001:db8::10/128".parse().unwrap(),
        ])
        .unwrap();
        let prefix: [u8; 16] = "2001:db8::10"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        let mut unreach = vec![0, 2, 1, 128];
        unreach.extend_from_slice(&prefix);
        let mut body = vec![0, 5, 32, 198, 51, 100, 10]; // withdrawn routes: 198.51.100.10/32
        let attrs = [vec![0x80, 15, unreach.len() as u8], unreach].concat();
        body.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        body.extend_from_slice(&attrs);
        let mut want = header((19 + body.len()) as u16, 2);
        want.extend_from_slice(&body);
        assert_eq!(encode(&msg, true).unwrap(), want);
    }

    #[test]
    fn end_of_rib_and_cease_are_the_bytes_the_rfcs_give() {
        // RFC 4724 §2: IPv4 End-of-RIB is an UPDATE with nothing in it.
        let mut eor = header(23, 2);
        eor.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(encode(&end_of_rib(false), true).unwrap(), eor);
        // IPv6: an MP_UNREACH_NLRI with AFI 2, SAFI 1 and no prefixes.
        let mut eor6 = header(29, 2);
        eor6.extend_from_slice(&[0, 0, 0, 6, 0x80, 15, 3, 0, 2, 1]);
        assert_eq!(encode(&end_of_rib(true), true).unwrap(), eor6);
        // RFC 4486: Cease (6) / Administrative Shutdown (2).
        let mut cease_bytes = header(21, 3);
        cease_bytes.extend_from_slice(&[6, 2]);
        assert_eq!(encode(&cease(), true).unwrap(), cease_bytes);
        assert_eq!(notification_bytes(6, 2), cease_bytes);
    }

    #[test]
    fn messages_we_send_read_back_as_themselves() {
        let attrs = Attributes {
            local_asn: 64512,
            ebgp: false,
            next_hop: "2001:db8::2".parse().unwrap(),
            communities: vec![(0xffff, 0xff01)],
            large_communities: vec![],
            local_pref: Some(200),
        };
        let messages = [
            open(&OpenParams {
                asn: 64512,
                hold_time: 9,
                router_id: Ipv4Addr::new(10, 0, 0, 2),
                restart_time: 120,
                restarting: false,
                forwarding_preserved: false,
            }),
            announce(&["2001:db8::10/128".parse().unwrap()], &attrs).unwrap(),
            withdraw(&[
                "2001:db8::10/128".parse().unwrap(),
                "198.51.100.10/32".parse().unwrap(),
            ])
            .unwrap(),
            end_of_rib(false),
            end_of_rib(true),
            cease(),
            BgpMessage::KeepAlive,
        ];
        let mut reader = Reader::new(true);
        for m in &messages {
            reader.feed(&encode(m, true).unwrap());
        }
        for m in &messages {
            assert_eq!(reader.next_message().unwrap().as_ref(), Some(m));
        }
        assert_eq!(reader.next_message().unwrap(), None);
    }

    #[test]
    fn a_peer_open_is_checked_for_asn_identifier_and_hold_time() {
        let peer = |asn: u32, hold: u16, id: [u8; 4]| match open(&OpenParams {
            asn,
            hold_time: hold,
            router_id: Ipv4Addr::from(id),
            restart_time: 120,
            restarting: false,
            forwarding_preserved: false,
        }) {
            BgpMessage::Open(o) => o,
            _ => unreachable!(),
        };
        let ok = check_open(&peer(4_200_000_001, 90, [10, 0, 0, 1]), 4_200_000_001).unwrap();
        assert!(ok.four_octet_as && ok.ipv4_unicast && ok.ipv6_unicast && ok.graceful_restart);
        assert_eq!(ok.asn, 4_200_000_001);
        let wrong_as = check_open(&peer(64500, 90, [10, 0, 0, 1]), 64501).unwrap_err();
        assert_eq!((wrong_as.code, wrong_as.subcode), (2, 2), "bad peer AS");
        let no_id = check_open(&peer(64500, 90, [0, 0, 0, 0]), 64500).unwrap_err();
        assert_eq!((no_id.code, no_id.subcode), (2, 3), "bad BGP identifier");
        let hold = check_open(&peer(64500, 2, [10, 0, 0, 1]), 64500).unwrap_err();
        assert_eq!((hold.code, hold.subcode), (2, 6), "unacceptable hold time");
        assert_eq!(hold.to_string(), "OPEN message error (2/6)");
    }

    #[test]
    fn malformed_input_yields_the_right_notification_never_a_panic() {
        let mut bad_marker = header(19, 4);
        bad_marker[3] = 0;
        let mut bad_length = header(19, 4);
        bad_length[16..18].copy_from_slice(&18u16.to_be_bytes());
        let bad_type = header(19, 9);
        // An UPDATE whose ORIGIN is flagged optional (attribute flags error, RFC 4271 §6.3).
        let mut flags = header(0, 2);
        let attrs = [0xc0u8, 1, 1, 0];
        flags.extend_from_slice(&[0, 0, 0, attrs.len() as u8]);
        flags.extend_from_slice(&attrs);
        let len = flags.len() as u16;
        flags[16..18].copy_from_slice(&len.to_be_bytes());
        for (name, bytes, code) in [
            ("marker", bad_marker, 1u8),
            ("length", bad_length, 1),
            ("type", bad_type, 1),
            ("attribute flags", flags, 3),
        ] {
            let mut reader = Reader::new(true);
            reader.feed(&bytes);
            let n = reader.next_message().expect_err(name);
            assert_eq!(n.code, code, "{name}: {n}");
        }
        // Every truncation of a valid UPDATE waits for more bytes or errs: never panics.
        let update = encode(&end_of_rib(true), true).unwrap();
        for len in 0..update.len() {
            let mut reader = Reader::new(true);
            reader.feed(&update[..len]);
            let _ = reader.next_message();
        }
        // Random garbage after a valid header: an error, not a panic.
        for seed in 0..200u32 {
            let mut bytes = header(40, 2);
            bytes.extend(
                (0..21).map(|i| (seed.wrapping_mul(2654435761).rotate_left(i) & 0xff) as u8),
            );
            let mut reader = Reader::new(true);
            reader.feed(&bytes);
            let _ = reader.next_message();
        }
    }
}
