//! Address ranges: CIDRs (`198.51.100.0/24`) and ranges (`198.51.100.10-198.51.100.20`), IPv4 or
//! IPv6, as pools hold them. Pure.

use std::{fmt, net::IpAddr, str::FromStr};

/// An inclusive range of addresses of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AddrRange {
    pub start: IpAddr,
    pub end: IpAddr,
}

pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4) as u128,
        IpAddr::V6(v6) => u128::from(v6),
    }
}

pub fn from_u128(value: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::from((value as u32).to_be_bytes())
    } else {
        IpAddr::from(value.to_be_bytes())
    }
}

impl AddrRange {
    /// Parses `CIDR` or `FIRST-LAST`; the error says what is wrong with the text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Some((first, last)) = text.split_once('-') {
            let start = IpAddr::from_str(first.trim())
                .map_err(|_| format!("{:?} is not an IP address", first.trim()))?;
            let end = IpAddr::from_str(last.trim())
                .map_err(|_| format!("{:?} is not an IP address", last.trim()))?;
            if start.is_ipv4() != end.is_ipv4() {
                return Err("the two ends are of different address families".into());
            }
            if to_u128(end) < to_u128(start) {
                return Err(format!("the range ends ({end}) below its start ({start})"));
            }
            return Ok(Self { start, end });
        }
        let (addr, len) = text
            .split_once('/')
            .ok_or_else(|| "expected a CIDR (a.b.c.d/len) or a range (first-last)".to_string())?;
        let ip = IpAddr::from_str(addr).map_err(|_| format!("{addr:?} is not an IP address"))?;
        let bits: u32 = if ip.is_ipv4() { 32 } else { 128 };
        let len: u32 = len
            .parse()
            .ok()
            .filter(|l| *l <= bits)
            .ok_or_else(|| format!("{len:?} is not a prefix length (0..={bits})"))?;
        let host_bits = bits - len;
        let mask: u128 = if host_bits == 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        let value = to_u128(ip);
        if value & mask != 0 {
            let network = from_u128(value & !mask, ip.is_ipv4());
            return Err(format!(
                "{ip} has host bits set for /{len}; did you mean {network}/{len}?"
            ));
        }
        Ok(Self {
            start: ip,
            end: from_u128(value | mask, ip.is_ipv4()),
        })
    }

    /// [`AddrRange::parse`] as MetalLB reads a CIDR (Go's `net.ParseCIDR`): host bits are
    /// ignored (`192.168.122.1/24` is `192.168.122.0/24`). The second value says so when it
    /// happened.
    pub fn parse_masking_host_bits(text: &str) -> Result<(Self, Option<String>), String> {
        match Self::parse(text) {
            Ok(r) => Ok((r, None)),
            Err(e) if e.contains("has host bits set") => {
                let (addr, len) = text.trim().split_once('/').ok_or(e.clone())?;
                let ip = IpAddr::from_str(addr).map_err(|_| e.clone())?;
                let len: u32 = len.parse().map_err(|_| e.clone())?;
                let bits: u32 = if ip.is_ipv4() { 32 } else { 128 };
                let mask: u128 = if bits - len == 128 {
                    u128::MAX
                } else {
                    (1u128 << (bits - len)) - 1
                };
                let network = from_u128(to_u128(ip) & !mask, ip.is_ipv4());
                let range = Self::parse(&format!("{network}/{len}"))?;
                Ok((
                    range,
                    Some(format!(
                        "{:?} has host bits set; read as {network}/{len}, as MetalLB does",
                        text.trim()
                    )),
                ))
            }
            Err(e) => Err(e),
        }
    }

    pub fn is_ipv4(&self) -> bool {
        self.start.is_ipv4()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.is_ipv4()
            && to_u128(self.start) <= to_u128(ip)
            && to_u128(ip) <= to_u128(self.end)
    }

    pub fn overlaps(&self, other: &AddrRange) -> bool {
        self.is_ipv4() == other.is_ipv4()
            && to_u128(self.start) <= to_u128(other.end)
            && to_u128(other.start) <= to_u128(self.end)
    }

    /// Number of addresses (saturating: an IPv6 /0 has 2^128).
    pub fn size(&self) -> u128 {
        (to_u128(self.end) - to_u128(self.start)).saturating_add(1)
    }
}

impl fmt::Display for AddrRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cidrs_and_ranges_of_both_families() {
        let r = AddrRange::parse("198.51.100.0/30").unwrap();
        assert_eq!(r.to_string(), "198.51.100.0-198.51.100.3");
        assert_eq!(r.size(), 4);
        let r = AddrRange::parse("198.51.100.10-198.51.100.20").unwrap();
        assert_eq!(r.size(), 11);
        let r = AddrRange::parse("2001:db8::/126").unwrap();
        assert_eq!(r.to_string(), "2001:db8::-2001:db8::3");
        assert!(r.contains("2001:db8::2".parse().unwrap()));
        assert!(!r.contains("198.51.100.1".parse().unwrap()));
        assert_eq!(
            AddrRange::parse("2001:db8::/64").unwrap().size(),
            1u128 << 64
        );
        assert_eq!(AddrRange::parse("198.51.100.7/32").unwrap().size(), 1);
    }

    #[test]
    fn malformed_ranges_say_what_is_wrong() {
        for (text, expected) in [
            (
                "198.51.100.20-198.51.100.10",
                "ends (198.51.100.10) below its start",
            ),
            ("198.51.100.1/24", "did you mean 198.51.100.0/24"),
            ("198.51.100.0/33", "not a prefix length"),
            ("198.51.100.0", "expected a CIDR"),
            ("198.51.100.300/32", "not an IP address"),
            ("198.51.100.1-2001:db8::1", "different address families"),
        ] {
            let err = AddrRange::parse(text).unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn overlap_is_per_family() {
        let a = AddrRange::parse("198.51.100.0/28").unwrap();
        let b = AddrRange::parse("198.51.100.15-198.51.100.30").unwrap();
        let c = AddrRange::parse("198.51.100.16/28").unwrap();
        assert!(a.overlaps(&b));
        assert!(!a.overlaps(&c));
        assert!(!a.overlaps(&AddrRange::parse("::/0").unwrap()));
    }
}
