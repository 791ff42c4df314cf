//! IP address management for subnets: CIDRs, the next free address, stable MACs.
//!
//! In a subnet `a.b.c.d/n` the network and broadcast addresses are never given out, the first
//! host address is the gateway (kept for the subnet's router) and the last one the service
//! address (kept for the DHCP and metadata leg each host has on the subnet). Ports get the
//! lowest free address after the gateway unless they ask for one.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// An IPv4 network in CIDR form, always with the host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Ipv4Cidr> {
        if !(8..=30).contains(&prefix) {
            return Err(Error::Invalid(format!(
                "CIDR {addr}/{prefix}: prefix must be 8..=30"
            )));
        }
        let c = Ipv4Cidr { addr, prefix };
        if c.network() != addr {
            return Err(Error::Invalid(format!(
                "CIDR {addr}/{prefix} has host bits set (network is {}/{prefix})",
                c.network()
            )));
        }
        Ok(c)
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - self.prefix)
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()) | !self.mask())
    }

    /// The first host address, reserved for the gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()) + 1)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }

    pub fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        self.contains(other.network()) || other.contains(self.network())
    }

    /// The last host address, reserved for the hosts' DHCP and metadata legs.
    pub fn service(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.broadcast()) - 1)
    }

    /// Checks that `ip` may be given to a port: inside, not network, broadcast, gateway or
    /// service address.
    pub fn check_host(&self, ip: Ipv4Addr) -> Result<()> {
        if !self.contains(ip) {
            return Err(Error::Invalid(format!("address {ip} is outside {self}")));
        }
        if ip == self.network() || ip == self.broadcast() || ip == self.gateway() {
            return Err(Error::Invalid(format!(
                "address {ip} is the network, broadcast or gateway address of {self}"
            )));
        }
        if ip == self.service() {
            return Err(Error::Invalid(format!(
                "address {ip} is the service (DHCP and metadata) address of {self}"
            )));
        }
        Ok(())
    }

    /// The lowest address after the gateway that is not in `taken` (nor the service address).
    pub fn next_free(&self, taken: &BTreeSet<Ipv4Addr>) -> Result<Ipv4Addr> {
        let first = u32::from(self.gateway()) + 1;
        let last = u32::from(self.service()) - 1;
        (first..=last)
            .map(Ipv4Addr::from)
            .find(|ip| !taken.contains(ip))
            .ok_or_else(|| Error::Invalid(format!("subnet {self} has no free address")))
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Ipv4Cidr> {
        let bad = || Error::Invalid(format!("{s:?} is not an IPv4 CIDR (a.b.c.d/n)"));
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        Ipv4Cidr::new(addr, prefix)
    }
}

impl TryFrom<String> for Ipv4Cidr {
    type Error = Error;

    fn try_from(s: String) -> Result<Ipv4Cidr> {
        s.parse()
    }
}

impl From<Ipv4Cidr> for String {
    fn from(c: Ipv4Cidr) -> String {
        c.to_string()
    }
}

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// A stable, locally administered, unicast MAC for port `port` of the vpcd instance whose id
    /// is `owner`: `02:` then 5 bytes of a hash of both (FNV-1a), so ports of different hosts
    /// differ too.
    pub fn for_port(owner: &str, port: u32) -> Mac {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in owner.bytes().chain(port.to_be_bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let b = h.to_be_bytes();
        Mac([0x02, b[3], b[4], b[5], b[6], b[7]])
    }

    /// Unicast and not all zeros.
    pub fn check_unicast(&self) -> Result<()> {
        if self.0[0] & 1 == 1 || self.0 == [0; 6] {
            return Err(Error::Invalid(format!(
                "MAC {self} is not a unicast address"
            )));
        }
        Ok(())
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl FromStr for Mac {
    type Err = Error;

    fn from_str(s: &str) -> Result<Mac> {
        let bad = || Error::Invalid(format!("{s:?} is not a MAC address"));
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(out))
    }
}

impl TryFrom<String> for Mac {
    type Error = Error;

    fn try_from(s: String) -> Result<Mac> {
        s.parse()
    }
}

impl From<Mac> for String {
    fn from(m: Mac) -> String {
        m.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Ipv4Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_parses_and_rejects_host_bits() {
        let c = cidr("10.1.2.0/24");
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 1, 2, 1));
        assert_eq!(c.broadcast(), Ipv4Addr::new(10, 1, 2, 255));
        assert!("10.1.2.5/24"
            .parse::<Ipv4Cidr>()
            .unwrap_err()
            .to_string()
            .contains("host bits"));
        for bad in [
            "10.1.2.0",
            "10.1.2.0/33",
            "10.1.2.0/31",
            "x/24",
            "10.1.2.0/7",
        ] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn next_free_skips_gateway_service_address_and_taken() {
        let c = cidr("10.0.0.0/29");
        assert_eq!(c.service(), Ipv4Addr::new(10, 0, 0, 6));
        let mut taken = BTreeSet::new();
        assert_eq!(c.next_free(&taken).unwrap(), Ipv4Addr::new(10, 0, 0, 2));
        taken.insert(Ipv4Addr::new(10, 0, 0, 2));
        taken.insert(Ipv4Addr::new(10, 0, 0, 4));
        assert_eq!(c.next_free(&taken).unwrap(), Ipv4Addr::new(10, 0, 0, 3));
        for i in 3..=5 {
            taken.insert(Ipv4Addr::new(10, 0, 0, i));
        }
        assert!(c
            .next_free(&taken)
            .unwrap_err()
            .to_string()
            .contains("no free address"));
    }

    #[test]
    fn host_check_names_the_problem() {
        let c = cidr("192.168.5.0/24");
        c.check_host(Ipv4Addr::new(192, 168, 5, 9)).unwrap();
        assert!(c
            .check_host(Ipv4Addr::new(192, 168, 6, 9))
            .unwrap_err()
            .to_string()
            .contains("outside"));
        for ip in [
            [192, 168, 5, 0],
            [192, 168, 5, 1],
            [192, 168, 5, 254],
            [192, 168, 5, 255],
        ] {
            assert!(c.check_host(Ipv4Addr::from(ip)).is_err());
        }
    }

    #[test]
    fn overlap_is_symmetric() {
        assert!(cidr("10.0.0.0/16").overlaps(&cidr("10.0.5.0/24")));
        assert!(cidr("10.0.5.0/24").overlaps(&cidr("10.0.0.0/16")));
        assert!(!cidr("10.0.0.0/24").overlaps(&cidr("10.0.1.0/24")));
    }

    #[test]
    fn port_macs_are_stable_local_unicast_and_distinct() {
        let a = Mac::for_port("host-a", 1);
        assert_eq!(a, Mac::for_port("host-a", 1));
        assert_eq!(a.0[0], 0x02);
        a.check_unicast().unwrap();
        assert_ne!(a, Mac::for_port("host-a", 2));
        assert_ne!(a, Mac::for_port("host-b", 1));
        assert_eq!(a.to_string().parse::<Mac>().unwrap(), a);
        assert!("01:00:5e:00:00:01"
            .parse::<Mac>()
            .unwrap()
            .check_unicast()
            .is_err());
        assert!("02:00:00:00:00".parse::<Mac>().is_err());
    }
}
