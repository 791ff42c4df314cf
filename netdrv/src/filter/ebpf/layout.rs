//! The map value layouts of `bpf/port_filter.h`, as plain byte and word arrays (so no `unsafe
//! impl Pod` is needed), with pure encode/decode functions.
//!
//! `struct port_cfg` (376 bytes, native byte order for `vlan`, network byte order for
//! addresses):
//!
//! | offset | size   | field                         |
//! |--------|--------|-------------------------------|
//! | 0      | 2      | vlan                          |
//! | 2      | 1      | security (0 off, 1 on)        |
//! | 3      | 1      | n_macs                        |
//! | 4      | 1      | n_ipv4                        |
//! | 5      | 1      | n_ipv6                        |
//! | 6      | 1      | flags (`PORT_F_*`)            |
//! | 7      | 1      | padding                       |
//! | 8      | 8 x 6  | macs                          |
//! | 56     | 16 x 4 | ipv4                          |
//! | 120    | 16x16  | ipv6                          |
//!
//! `struct port_counters`: six `u64` per CPU, in the order of [`PortCounters`]' fields.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::error::{Error, Result};
use crate::filter::{PortCounters, PortFilter, PortSecurity};

pub(crate) const MAX_MACS: usize = 8;
pub(crate) const MAX_IPV4: usize = 16;
pub(crate) const MAX_IPV6: usize = 16;
pub(crate) const CFG_SIZE: usize = 376;

const OFF_MACS: usize = 8;
const OFF_IPV4: usize = OFF_MACS + MAX_MACS * 6;
const OFF_IPV6: usize = OFF_IPV4 + MAX_IPV4 * 4;
const _: () = assert!(OFF_IPV6 + MAX_IPV6 * 16 == CFG_SIZE);

/// A `struct port_cfg` value.
pub(crate) type CfgBytes = [u8; CFG_SIZE];
/// A `struct port_counters` value (one CPU's).
pub(crate) type CounterWords = [u64; 6];

/// `PORT_F_BRIDGE_VLAN`: the bridge filters VLANs, the programs push and pop no tags.
pub(crate) const F_BRIDGE_VLAN: u8 = 0x01;

/// Checks `cfg` and encodes it for the port `ifname` (`ifindex`), naming the port in errors.
/// `flags` are `F_*` bits.
pub(crate) fn encode(ifindex: u32, ifname: &str, cfg: &PortFilter, flags: u8) -> Result<CfgBytes> {
    cfg.check(ifindex, ifname)?;
    let port = || format!("port {ifname} (ifindex {ifindex})");
    let mut b = [0u8; CFG_SIZE];
    b[0..2].copy_from_slice(&cfg.vlan.to_ne_bytes());
    b[6] = flags;
    let Some(sec) = &cfg.security else {
        return Ok(b);
    };
    let too_many = |what: &str, n: usize, max: usize| {
        Error::Invalid(format!("{}: {n} {what}, at most {max}", port()))
    };
    if sec.macs.len() > MAX_MACS {
        return Err(too_many("MACs", sec.macs.len(), MAX_MACS));
    }
    if sec.ipv4.len() > MAX_IPV4 {
        return Err(too_many("IPv4 addresses", sec.ipv4.len(), MAX_IPV4));
    }
    if sec.ipv6.len() > MAX_IPV6 {
        return Err(too_many("IPv6 addresses", sec.ipv6.len(), MAX_IPV6));
    }
    b[2] = 1;
    // The lengths fit in a u8: checked above.
    b[3] = sec.macs.len() as u8;
    b[4] = sec.ipv4.len() as u8;
    b[5] = sec.ipv6.len() as u8;
    for (i, mac) in sec.macs.iter().enumerate() {
        b[OFF_MACS + i * 6..][..6].copy_from_slice(mac);
    }
    for (i, ip) in sec.ipv4.iter().enumerate() {
        b[OFF_IPV4 + i * 4..][..4].copy_from_slice(&ip.octets());
    }
    for (i, ip) in sec.ipv6.iter().enumerate() {
        b[OFF_IPV6 + i * 16..][..16].copy_from_slice(&ip.octets());
    }
    Ok(b)
}

/// Decodes a `struct port_cfg` (counts beyond the maxima are clamped).
pub(crate) fn decode(b: &CfgBytes) -> PortFilter {
    let vlan = u16::from_ne_bytes([b[0], b[1]]);
    if b[2] == 0 {
        return PortFilter {
            vlan,
            security: None,
        };
    }
    let n_macs = usize::from(b[3]).min(MAX_MACS);
    let n_ipv4 = usize::from(b[4]).min(MAX_IPV4);
    let n_ipv6 = usize::from(b[5]).min(MAX_IPV6);
    let macs = (0..n_macs)
        .map(|i| {
            let mut m = [0u8; 6];
            m.copy_from_slice(&b[OFF_MACS + i * 6..][..6]);
            m
        })
        .collect();
    let ipv4 = (0..n_ipv4)
        .map(|i| {
            let o = &b[OFF_IPV4 + i * 4..][..4];
            Ipv4Addr::new(o[0], o[1], o[2], o[3])
        })
        .collect();
    let ipv6 = (0..n_ipv6)
        .map(|i| {
            let mut o = [0u8; 16];
            o.copy_from_slice(&b[OFF_IPV6 + i * 16..][..16]);
            Ipv6Addr::from(o)
        })
        .collect();
    PortFilter {
        vlan,
        security: Some(PortSecurity { macs, ipv4, ipv6 }),
    }
}

/// Sums the per-CPU counters of one port.
pub(crate) fn sum_counters<'a>(
    per_cpu: impl IntoIterator<Item = &'a CounterWords>,
) -> PortCounters {
    let mut c = PortCounters::default();
    for w in per_cpu {
        c.rx_packets += w[0];
        c.rx_bytes += w[1];
        c.tx_packets += w[2];
        c.tx_bytes += w[3];
        c.drop_vlan += w[4];
        c.drop_security += w[5];
    }
    c
}

/// The EUI-64 link-local address of `mac` (fe80::/64, universal/local bit flipped), which
/// port security allows besides the configured IPv6 addresses.
pub fn eui64_link_local(mac: [u8; 6]) -> Ipv6Addr {
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        mac[0] ^ 0x02,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secure() -> PortFilter {
        PortFilter {
            vlan: 42,
            security: Some(PortSecurity {
                macs: vec![[0x52, 0x54, 0, 1, 2, 3], [2, 0, 0, 0, 0, 9]],
                ipv4: vec![Ipv4Addr::new(10, 0, 0, 5)],
                ipv6: vec!["2001:db8::5".parse().unwrap()],
            }),
        }
    }

    #[test]
    fn encode_then_decode_round_trips() {
        for cfg in [
            secure(),
            PortFilter {
                vlan: 4094,
                security: None,
            },
        ] {
            assert_eq!(decode(&encode(3, "tap0", &cfg, 0).unwrap()), cfg);
        }
    }

    #[test]
    fn encoded_fields_sit_at_the_c_offsets() {
        let b = encode(3, "tap0", &secure(), F_BRIDGE_VLAN).unwrap();
        assert_eq!(u16::from_ne_bytes([b[0], b[1]]), 42);
        assert_eq!(&b[2..6], &[1, 2, 1, 1]);
        assert_eq!(b[6], 1, "flags");
        assert_eq!(&b[8..14], &[0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(&b[56..60], &[10, 0, 0, 5]);
        assert_eq!(b[120], 0x20);
        assert_eq!(b[121], 0x01);
    }

    #[test]
    fn vlan_out_of_range_is_invalid_and_names_the_port() {
        for vlan in [0, 4095] {
            let err = encode(
                7,
                "vm1",
                &PortFilter {
                    vlan,
                    security: None,
                },
                0,
            )
            .unwrap_err();
            assert!(
                matches!(&err, Error::Invalid(m) if m.contains("vm1")),
                "{err}"
            );
        }
    }

    #[test]
    fn too_many_addresses_is_invalid() {
        let mut cfg = secure();
        cfg.security.as_mut().unwrap().macs = vec![[2, 0, 0, 0, 0, 1]; MAX_MACS + 1];
        let err = encode(7, "vm1", &cfg, 0).unwrap_err();
        assert!(matches!(&err, Error::Invalid(m) if m.contains("vm1") && m.contains("9 MACs")));
        let mut cfg = secure();
        cfg.security.as_mut().unwrap().ipv4 = vec![Ipv4Addr::LOCALHOST; MAX_IPV4 + 1];
        assert!(encode(7, "vm1", &cfg, 0).is_err());
        let mut cfg = secure();
        cfg.security.as_mut().unwrap().ipv6 = vec![Ipv6Addr::LOCALHOST; MAX_IPV6 + 1];
        assert!(encode(7, "vm1", &cfg, 0).is_err());
    }

    #[test]
    fn counters_are_summed_over_cpus() {
        let c = sum_counters(&[[1, 2, 3, 4, 5, 6], [10, 20, 30, 40, 50, 60]]);
        assert_eq!(
            c,
            PortCounters {
                rx_packets: 11,
                rx_bytes: 22,
                tx_packets: 33,
                tx_bytes: 44,
                drop_vlan: 55,
                drop_security: 66,
            }
        );
    }

    #[test]
    fn eui64_link_local_flips_the_universal_bit() {
        assert_eq!(
            eui64_link_local([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]),
            "fe80::5054:ff:fe12:3456".parse::<Ipv6Addr>().unwrap()
        );
    }
}
