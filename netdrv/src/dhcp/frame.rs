//! Ethernet + IPv4 + UDP framing for DHCP, with the checksums filled in here. DHCP replies go
//! out through a packet socket: to a client without an address (unicast to its MAC, no ARP),
//! and with checksums that no offload can leave empty (busybox udhcpc drops such offers on
//! veth paths, see platform.md). Pure functions over bytes.

use std::net::Ipv4Addr;

use crate::ipam::Mac;

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const DHCP_SERVER_PORT: u16 = 67;
pub const DHCP_CLIENT_PORT: u16 = 68;

/// The UDP datagram inside a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram<'a> {
    pub src_mac: Mac,
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: &'a [u8],
}

/// The internet checksum (RFC 1071) over `parts`, concatenated.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for part in parts {
        for &b in *part {
            match odd.take() {
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Builds a complete frame: Ethernet (IPv4), IPv4 (TTL 64, DF clear), UDP, with both checksums.
pub fn build(
    src_mac: Mac,
    dst_mac: Mac,
    src_ip: Ipv4Addr,
    dst_ip: Ipv4Addr,
    src_port: u16,
    dst_port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = (UDP_HLEN + payload.len()) as u16;
    let ip_len = IPV4_HLEN as u16 + udp_len;
    let mut f = Vec::with_capacity(ETH_HLEN + ip_len as usize);
    f.extend_from_slice(&dst_mac.0);
    f.extend_from_slice(&src_mac.0);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_start = f.len();
    f.extend_from_slice(&[0x45, 0x00]);
    f.extend_from_slice(&ip_len.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 0]); // id, flags/fragment
    f.extend_from_slice(&[64, 17, 0, 0]); // TTL, UDP, checksum (below)
    f.extend_from_slice(&src_ip.octets());
    f.extend_from_slice(&dst_ip.octets());
    let ip_sum = checksum(&[&f[ip_start..ip_start + IPV4_HLEN]]);
    f[ip_start + 10..ip_start + 12].copy_from_slice(&ip_sum.to_be_bytes());
    let udp_start = f.len();
    f.extend_from_slice(&src_port.to_be_bytes());
    f.extend_from_slice(&dst_port.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    let pseudo = [
        &src_ip.octets()[..],
        &dst_ip.octets()[..],
        &[0, 17],
        &udp_len.to_be_bytes()[..],
    ]
    .concat();
    // A sum that comes out 0 goes as 0, "no checksum" (RFC 768 allows it over IPv4), not as
    // RFC 768's 0xffff: busybox udhcpc compares the field with its own sum, which is 0 then,
    // and drops the offer (its xid stays the same for every retry of a discover, so each one
    // would be dropped: one client in 65536 never got a lease).
    let udp_sum = checksum(&[&pseudo, &f[udp_start..]]);
    f[udp_start + 6..udp_start + 8].copy_from_slice(&udp_sum.to_be_bytes());
    f
}

/// Parses an untagged Ethernet frame carrying IPv4/UDP; None for anything else (other
/// protocols, fragments, IP options are fine, truncated or inconsistent lengths).
pub fn parse(frame: &[u8]) -> Option<Datagram<'_>> {
    if frame.len() < ETH_HLEN + IPV4_HLEN + UDP_HLEN || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let mut src_mac = [0u8; 6];
    src_mac.copy_from_slice(&frame[6..12]);
    let ip = &frame[ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < IPV4_HLEN || ip[9] != 17 {
        return None;
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if frag & 0x3fff != 0 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if total > ip.len() || total < ihl + UDP_HLEN {
        return None;
    }
    let udp = &ip[ihl..total];
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if udp_len < UDP_HLEN || udp_len > udp.len() {
        return None;
    }
    Some(Datagram {
        src_mac: Mac(src_mac),
        src_ip: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst_ip: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        src_port: u16::from_be_bytes([udp[0], udp[1]]),
        dst_port: u16::from_be_bytes([udp[2], udp[3]]),
        payload: &udp[UDP_HLEN..udp_len],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_carry_valid_checksums_and_parse_back() {
        let src = Mac([2, 0, 0, 0, 0, 1]);
        let dst = Mac([0xff; 6]);
        let payload = b"hello dhcp, odd length";
        let f = build(
            src,
            dst,
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::BROADCAST,
            67,
            68,
            payload,
        );
        // A correct header sums to zero with its checksum in place.
        assert_eq!(checksum(&[&f[ETH_HLEN..ETH_HLEN + IPV4_HLEN]]), 0);
        let udp = &f[ETH_HLEN + IPV4_HLEN..];
        let pseudo = [
            &[10, 0, 0, 1][..],
            &[255, 255, 255, 255],
            &[0, 17],
            &(udp.len() as u16).to_be_bytes(),
        ]
        .concat();
        assert_eq!(checksum(&[&pseudo, udp]), 0);
        let d = parse(&f).unwrap();
        assert_eq!(d.src_mac, src);
        assert_eq!((d.src_port, d.dst_port), (67, 68));
        assert_eq!(d.payload, payload);
    }

    /// A datagram whose UDP checksum comes out 0 carries 0, which busybox udhcpc takes as
    /// "no checksum" (the 0xffff of RFC 768 it would compare with its own sum, 0, and drop).
    #[test]
    fn a_udp_sum_of_zero_goes_as_no_checksum() {
        let (src, dst) = (Ipv4Addr::new(10, 0, 1, 1), Ipv4Addr::new(10, 0, 1, 7));
        let frame = |payload: &[u8]| build(Mac([2; 6]), Mac([4; 6]), src, dst, 67, 68, payload);
        let udp_check = |f: &[u8]| {
            let at = ETH_HLEN + IPV4_HLEN + 6;
            u16::from_be_bytes([f[at], f[at + 1]])
        };
        // A payload whose last word is chosen to make the one's complement sum 0xffff.
        let mut payload = b"offer for an xid".to_vec();
        payload.extend_from_slice(&[0, 0]);
        let sum = !udp_check(&frame(&payload));
        let word = 0xffff - sum;
        let n = payload.len();
        payload[n - 2..].copy_from_slice(&word.to_be_bytes());
        let f = frame(&payload);
        assert_eq!(udp_check(&f), 0);
        // And it is right: the datagram with its pseudo-header sums to zero.
        let udp = &f[ETH_HLEN + IPV4_HLEN..];
        let pseudo = [
            &src.octets()[..],
            &dst.octets(),
            &[0, 17],
            &(udp.len() as u16).to_be_bytes(),
        ]
        .concat();
        assert_eq!(checksum(&[&pseudo, udp]), 0);
        assert_eq!(parse(&f).unwrap().payload, &payload[..]);
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: 0001 f203 f4f5 f6f7 sums to ddf2 (checksum = !ddf2).
        assert_eq!(
            checksum(&[&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]]),
            !0xddf2
        );
    }

    #[test]
    fn parse_rejects_what_is_not_udp_over_ipv4() {
        let f = build(
            Mac([2; 6]),
            Mac([0xff; 6]),
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            68,
            67,
            b"x",
        );
        assert!(parse(&f[..30]).is_none());
        let mut arp = f.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(parse(&arp).is_none());
        let mut frag = f.clone();
        frag[ETH_HLEN + 6] = 0x20; // more fragments
        assert!(parse(&frag).is_none());
        let mut long = f.clone();
        long[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&0xffffu16.to_be_bytes());
        assert!(parse(&long).is_none());
        assert!(parse(&f).is_some());
    }
}
