//! IPv4 networks and the addresses ferry hands out in them: the host (the bridge) takes the
//! first, guests the ones they are given.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An address with its prefix length, e.g. `10.77.0.2/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

/// A malformed address.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddrError {
    #[error("`{0}` is not ADDRESS/PREFIX (e.g. 10.77.0.2/24)")]
    Syntax(String),
    #[error("`{0}`: a prefix of /{1} leaves no room for a host and guests; use /8 to /29")]
    Prefix(String, u8),
    #[error(
        "`{0}` is the network's own, broadcast or gateway address; pick a guest address from .2 on"
    )]
    Reserved(String),
}

impl Ipv4Cidr {
    fn mask(&self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    /// The host's address on this network (the bridge's): the first one.
    pub fn gateway(&self) -> Ipv4Cidr {
        Ipv4Cidr {
            addr: Ipv4Addr::from(u32::from(self.network()) + 1),
            prefix: self.prefix,
        }
    }

    /// Whether `other` lies in this network.
    pub fn contains(&self, other: Ipv4Addr) -> bool {
        u32::from(other) & self.mask() == u32::from(self.network())
    }

    /// A locally administered MAC address derived from the IPv4 address, so a guest's NIC
    /// keeps its MAC as long as it keeps its address.
    pub fn mac(&self) -> [u8; 6] {
        let [a, b, c, d] = self.addr.octets();
        [0x02, 0xfe, a, b, c, d]
    }

    /// Parses a guest address: not the network, broadcast or gateway address.
    pub fn parse_guest(s: &str) -> Result<Self, AddrError> {
        let cidr: Ipv4Cidr = s.parse()?;
        let host = u32::from(cidr.addr) & !cidr.mask();
        if host <= 1 || host == !cidr.mask() {
            return Err(AddrError::Reserved(s.to_string()));
        }
        Ok(cidr)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, AddrError> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| AddrError::Syntax(s.to_string()))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| AddrError::Syntax(s.to_string()))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| AddrError::Syntax(s.to_string()))?;
        if !(8..=29).contains(&prefix) {
            return Err(AddrError::Prefix(s.to_string(), prefix));
        }
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_address_gives_network_gateway_and_mac() {
        let c = Ipv4Cidr::parse_guest("10.77.0.5/24").unwrap();
        assert_eq!(c.network(), Ipv4Addr::new(10, 77, 0, 0));
        assert_eq!(c.gateway().to_string(), "10.77.0.1/24");
        assert!(c.contains(Ipv4Addr::new(10, 77, 0, 200)));
        assert!(!c.contains(Ipv4Addr::new(10, 78, 0, 1)));
        assert_eq!(c.mac(), [0x02, 0xfe, 10, 77, 0, 5]);
    }

    #[test]
    fn bad_addresses_say_what_is_wrong() {
        assert!(matches!(
            Ipv4Cidr::parse_guest("10.77.0.5"),
            Err(AddrError::Syntax(_))
        ));
        assert!(matches!(
            Ipv4Cidr::parse_guest("10.77.0.5/31"),
            Err(AddrError::Prefix(_, 31))
        ));
        for reserved in ["10.77.0.0/24", "10.77.0.1/24", "10.77.0.255/24"] {
            assert!(matches!(
                Ipv4Cidr::parse_guest(reserved),
                Err(AddrError::Reserved(_))
            ));
        }
        assert!(matches!(
            Ipv4Cidr::parse_guest("300.1.1.1/24"),
            Err(AddrError::Syntax(_))
        ));
    }
}
