//! Wire headers as the XDP program reads and writes them in place.
//!
//! Every field is a byte array, so every struct has alignment 1 and can be read through a pointer
//! anywhere in the packet. Multi-byte numbers are in network order; use `u16::from_be_bytes`.

pub const ETH_HLEN: usize = 14;
pub const VLAN_HLEN: usize = 4;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;
/// Where a TCP header holds its flags, and the FIN and RST flags.
pub const TCP_FLAGS_OFFSET: usize = 13;
pub const TCP_RST: u8 = 0x04;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
/// Where TCP and UDP headers hold their checksums.
pub const TCP_CSUM_OFFSET: usize = 16;
pub const UDP_CSUM_OFFSET: usize = 6;
/// An IPv4 header without options.
pub const IPV4_HLEN: usize = 20;

/// ICMP (RFC 792) and ICMPv6 (RFC 4443): the protocol numbers, the 8-byte header before an
/// error's embedded packet, and the error types that embed one.
pub const IPPROTO_ICMP: u8 = 1;
pub const ICMP_HLEN: usize = 8;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;
pub const ICMPV6_PARAMETER_PROBLEM: u8 = 4;

pub const ARP_HTYPE_ETHERNET: u16 = 1;
pub const ARP_OP_REQUEST: u16 = 1;
pub const ARP_OP_REPLY: u16 = 2;

pub const IPV6_HLEN: usize = 40;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const ICMPV6_NS: u8 = 135;
pub const ICMPV6_NA: u8 = 136;
/// ICMPv6 NS/NA fixed part: type, code, checksum, 4 bytes of flags/reserved, target address.
pub const ND_FIXED_LEN: usize = 24;
/// The NA we send: fixed part plus one Target Link-Layer Address option (8 bytes).
pub const NA_LEN: usize = ND_FIXED_LEN + 8;
pub const ND_OPT_TARGET_LL_ADDR: u8 = 2;
/// NA flags, first byte: Router (0x80), Solicited (0x40), Override (0x20).
pub const NA_FLAG_SOLICITED: u8 = 0x40;
pub const NA_FLAG_OVERRIDE: u8 = 0x20;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: [u8; 2],
}

#[repr(C)]
pub struct VlanHdr {
    pub tci: [u8; 2],
    pub proto: [u8; 2],
}

/// ARP for Ethernet/IPv4 (RFC 826), 28 bytes.
#[repr(C)]
pub struct ArpEthIpv4 {
    pub htype: [u8; 2],
    pub ptype: [u8; 2],
    pub hlen: u8,
    pub plen: u8,
    pub oper: [u8; 2],
    pub sha: [u8; 6],
    pub spa: [u8; 4],
    pub tha: [u8; 6],
    pub tpa: [u8; 4],
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub total_len: [u8; 2],
    pub id: [u8; 2],
    pub frag: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

#[repr(C)]
pub struct Ipv6Hdr {
    pub vtcfl: [u8; 4],
    pub payload_len: [u8; 2],
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// The fixed part of a Neighbor Solicitation or Advertisement (RFC 4861 §4.3, §4.4).
#[repr(C)]
pub struct NdMsg {
    pub icmp_type: u8,
    pub code: u8,
    pub checksum: [u8; 2],
    pub flags: [u8; 4],
    pub target: [u8; 16],
}

/// The NA we write: fixed part and a Target Link-Layer Address option.
#[repr(C)]
pub struct NaWithTlla {
    pub nd: NdMsg,
    pub opt_type: u8,
    pub opt_len: u8,
    pub mac: [u8; 6],
}
