//! Deterministic link names, at most 15 bytes (IFNAMSIZ - 1):
//!
//! | object | name | example (prefix `vpc`) |
//! |---|---|---|
//! | tenant bridge | `<prefix>b<tenant id, hex>` | `vpcb1a` |
//! | subnet VxLAN device | `<prefix>x<VNI, hex>` | `vpcx2710` (VNI 10000) |
//! | VM port (tap) | `<prefix>t<port id, hex>` | `vpct7` |
//! | namespace port (veth, host end) | `<prefix>v<port id, hex>` | `vpcv8` |
//! | router's external leg (veth, host end) | `<prefix>e<tenant id, hex>` | `vpce1a` |
//! | subnet's VLAN device on a VLAN-filtering bridge (ARP suppression) | `<prefix>n<VNI, hex>` | `vpcn2710` |
//!
//! The prefix is 1-4 characters of `[a-z0-9]` (configuration `link_prefix`, default `vpc`), so a
//! name is at most 4 + 1 + 8 = 13 bytes. Every link vpcd makes also carries the alias
//! `vpcd:<owner>` (IFLA_IFALIAS): only links with both the prefix and that alias are vpcd's.

use crate::error::{Error, Result};

pub const MAX_PREFIX: usize = 4;
pub const IFNAMSIZ_MAX: usize = 15;

/// Checks a link-name prefix.
pub fn validate_prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty()
        || prefix.len() > MAX_PREFIX
        || !prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(Error::Invalid(format!(
            "link prefix {prefix:?}: 1 to {MAX_PREFIX} characters of a-z 0-9"
        )));
    }
    Ok(())
}

pub fn bridge(prefix: &str, tenant: u32) -> String {
    format!("{prefix}b{tenant:x}")
}

pub fn vxlan(prefix: &str, vni: u32) -> String {
    format!("{prefix}x{vni:x}")
}

pub fn tap(prefix: &str, port: u32) -> String {
    format!("{prefix}t{port:x}")
}

pub fn veth(prefix: &str, port: u32) -> String {
    format!("{prefix}v{port:x}")
}

pub fn neigh_vlan(prefix: &str, vni: u32) -> String {
    format!("{prefix}n{vni:x}")
}

pub fn external(prefix: &str, tenant: u32) -> String {
    format!("{prefix}e{tenant:x}")
}

/// The alias that marks a link as made by the vpcd instance `owner`.
pub fn alias(owner: &str) -> String {
    format!("vpcd:{owner}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_ifnamsiz_at_the_extremes() {
        for name in [
            bridge("abcd", u32::MAX),
            vxlan("abcd", 16_777_215),
            tap("abcd", u32::MAX),
            veth("abcd", u32::MAX),
            external("abcd", u32::MAX),
        ] {
            assert!(name.len() <= IFNAMSIZ_MAX, "{name}");
        }
        assert_eq!(bridge("vpc", 26), "vpcb1a");
        assert_eq!(vxlan("vpc", 10000), "vpcx2710");
        assert_eq!(tap("vpc", 7), "vpct7");
        assert_eq!(veth("vpc", 8), "vpcv8");
    }

    #[test]
    fn names_of_different_kinds_never_collide() {
        let p = "vpc";
        let all = [
            bridge(p, 1),
            vxlan(p, 1),
            tap(p, 1),
            veth(p, 1),
            external(p, 1),
        ];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn prefixes_are_checked() {
        for bad in ["", "abcde", "Vpc", "v-p", "vé"] {
            assert!(validate_prefix(bad).is_err(), "{bad}");
        }
        for good in ["vpc", "t1", "abcd"] {
            validate_prefix(good).unwrap();
        }
    }
}
