//! BGP-4 messages as vpcd's EVPN speaker needs them (RFC 4271, 4760, 6793, 2918, 7432, 8365),
//! sans-IO: [`decode`] turns the bytes of one message into a [`Message`] or a [`WireError`]
//! that carries the NOTIFICATION to send (RFC 4271 section 6) or says to treat the UPDATE as a
//! withdrawal (RFC 7606); [`Message::encode`] writes one. Nothing here panics on any input
//! (there is a fuzz target, `netdrv/fuzz/fuzz_targets/bgp_message.rs`).
//!
//! Covered: OPEN with capabilities (multiprotocol, route refresh, 4-octet AS), KEEPALIVE,
//! NOTIFICATION, ROUTE-REFRESH, UPDATE with ORIGIN, AS_PATH (4-octet), NEXT_HOP, MED,
//! LOCAL_PREF, ORIGINATOR_ID, CLUSTER_LIST, MP_REACH/MP_UNREACH for L2VPN EVPN (AFI 25, SAFI 70),
//! extended communities (route targets, the VxLAN encapsulation) and the PMSI tunnel attribute;
//! EVPN route types 2 (MAC/IP) and 3 (inclusive multicast) decoded, the others kept as bytes.
//! Unknown optional attributes are kept (and passed on if transitive); IPv4 unicast NLRI in
//! the plain UPDATE fields is skipped (the speaker does not carry it).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The fixed header: marker (16), length (2), type (1).
pub const HEADER_LEN: usize = 19;
/// Largest message without RFC 8654 extended messages.
pub const MAX_LEN: usize = 4096;
pub const AFI_L2VPN: u16 = 25;
pub const SAFI_EVPN: u8 = 70;
pub const AFI_IPV4: u16 = 1;
pub const SAFI_UNICAST: u8 = 1;
/// The 2-octet AS number that stands for a 4-octet one (RFC 6793).
pub const AS_TRANS: u16 = 23456;
/// PMSI tunnel type: ingress replication (RFC 6514, 8365).
pub const PMSI_INGRESS_REPLICATION: u8 = 6;
/// BGP tunnel encapsulation type VXLAN (RFC 9012 / 8365).
pub const TUNNEL_VXLAN: u16 = 8;

const TYPE_OPEN: u8 = 1;
const TYPE_UPDATE: u8 = 2;
const TYPE_NOTIFICATION: u8 = 3;
const TYPE_KEEPALIVE: u8 = 4;
const TYPE_ROUTE_REFRESH: u8 = 5;

// Path attribute type codes and flags (public so that tests can build malformed UPDATEs).
pub const ATTR_ORIGIN: u8 = 1;
pub const ATTR_AS_PATH: u8 = 2;
pub const ATTR_NEXT_HOP: u8 = 3;
pub const ATTR_MED: u8 = 4;
pub const ATTR_LOCAL_PREF: u8 = 5;
pub const ATTR_ORIGINATOR_ID: u8 = 9;
pub const ATTR_CLUSTER_LIST: u8 = 10;
pub const ATTR_MP_REACH: u8 = 14;
pub const ATTR_MP_UNREACH: u8 = 15;
pub const ATTR_EXT_COMMUNITIES: u8 = 16;
pub const ATTR_PMSI_TUNNEL: u8 = 22;

pub const FLAG_OPTIONAL: u8 = 0x80;
pub const FLAG_TRANSITIVE: u8 = 0x40;
pub const FLAG_PARTIAL: u8 = 0x20;
pub const FLAG_EXTENDED: u8 = 0x10;

/// NOTIFICATION error codes (RFC 4271 section 4.5) and the subcodes used here.
pub mod code {
    pub const HEADER: u8 = 1;
    pub const OPEN: u8 = 2;
    pub const UPDATE: u8 = 3;
    pub const HOLD_TIMER: u8 = 4;
    pub const FSM: u8 = 5;
    pub const CEASE: u8 = 6;
    pub const ROUTE_REFRESH: u8 = 7;

    pub const HEADER_NOT_SYNCHRONIZED: u8 = 1;
    pub const HEADER_BAD_LENGTH: u8 = 2;
    pub const HEADER_BAD_TYPE: u8 = 3;

    pub const OPEN_UNSUPPORTED_VERSION: u8 = 1;
    pub const OPEN_BAD_PEER_AS: u8 = 2;
    pub const OPEN_BAD_BGP_ID: u8 = 3;
    pub const OPEN_UNSUPPORTED_PARAMETER: u8 = 4;
    pub const OPEN_UNACCEPTABLE_HOLD_TIME: u8 = 6;
    pub const OPEN_UNSUPPORTED_CAPABILITY: u8 = 7;

    pub const UPDATE_MALFORMED_ATTRIBUTE_LIST: u8 = 1;
    pub const UPDATE_MISSING_WELL_KNOWN: u8 = 3;
    pub const UPDATE_ATTRIBUTE_FLAGS: u8 = 4;
    pub const UPDATE_ATTRIBUTE_LENGTH: u8 = 5;
    pub const UPDATE_INVALID_NETWORK_FIELD: u8 = 10;
    pub const UPDATE_OPTIONAL_ATTRIBUTE: u8 = 9;

    pub const ROUTE_REFRESH_BAD_LENGTH: u8 = 1;
}

/// Why a message was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Send this NOTIFICATION and close the session.
    #[error("BGP error {code}/{subcode}: {reason}")]
    Notify {
        code: u8,
        subcode: u8,
        data: Vec<u8>,
        reason: String,
    },
    /// An UPDATE whose attributes are malformed in a way RFC 7606 handles by withdrawing the
    /// routes it carries (which are returned): the session stays up.
    #[error("UPDATE treated as withdraw: {reason}")]
    TreatAsWithdraw {
        withdrawn: Vec<EvpnRoute>,
        reason: String,
    },
    /// Fewer bytes than the header says (a stream reader needs more).
    #[error("incomplete message: {need} more bytes")]
    Incomplete { need: usize },
}

fn notify(code: u8, subcode: u8, reason: impl Into<String>) -> WireError {
    WireError::Notify {
        code,
        subcode,
        data: Vec::new(),
        reason: reason.into(),
    }
}

/// One BGP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Open(Open),
    Update(Box<Update>),
    Notification(Notification),
    Keepalive,
    RouteRefresh { afi: u16, safi: u8 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub version: u8,
    /// The 4-octet AS (from the capability if present, else the 2-octet field).
    pub asn: u32,
    pub hold_time: u16,
    pub bgp_id: Ipv4Addr,
    pub capabilities: Vec<Capability>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capability {
    Multiprotocol { afi: u16, safi: u8 },
    RouteRefresh,
    FourOctetAs(u32),
    Other { code: u8, value: Vec<u8> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub code: u8,
    pub subcode: u8,
    pub data: Vec<u8>,
}

/// A Route Distinguisher (8 octets, RFC 4364), kept as it came.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rd(pub [u8; 8]);

impl Rd {
    /// Type 1: an IPv4 address and a 2-octet number (as FRR makes them: router id : VNI index).
    pub fn ip(ip: Ipv4Addr, n: u16) -> Rd {
        let mut b = [0u8; 8];
        b[1] = 1;
        b[2..6].copy_from_slice(&ip.octets());
        b[6..8].copy_from_slice(&n.to_be_bytes());
        Rd(b)
    }
}

impl std::fmt::Display for Rd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = &self.0;
        match u16::from_be_bytes([b[0], b[1]]) {
            0 => write!(
                f,
                "{}:{}",
                u16::from_be_bytes([b[2], b[3]]),
                u32::from_be_bytes([b[4], b[5], b[6], b[7]])
            ),
            1 => write!(
                f,
                "{}:{}",
                Ipv4Addr::new(b[2], b[3], b[4], b[5]),
                u16::from_be_bytes([b[6], b[7]])
            ),
            2 => write!(
                f,
                "{}:{}",
                u32::from_be_bytes([b[2], b[3], b[4], b[5]]),
                u16::from_be_bytes([b[6], b[7]])
            ),
            t => write!(f, "type{t}:{:02x?}", &b[2..]),
        }
    }
}

/// An EVPN route (the NLRI).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EvpnRoute {
    /// Type 2: a MAC (and maybe an IP) behind the advertising VTEP; `vni` from label 1.
    MacIp {
        rd: Rd,
        esi: [u8; 10],
        eth_tag: u32,
        mac: [u8; 6],
        ip: Option<IpAddr>,
        vni: u32,
        /// Label 2 (the L3 VNI), if present.
        vni2: Option<u32>,
    },
    /// Type 3: the advertising VTEP wants the broadcast domain's flooded traffic.
    InclusiveMulticast {
        rd: Rd,
        eth_tag: u32,
        origin: IpAddr,
    },
    /// Types 1, 4, 5 and unknown ones: kept as they came.
    Other { route_type: u8, value: Vec<u8> },
}

/// Path attributes of an UPDATE.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Attributes {
    pub origin: Option<u8>,
    /// AS_PATH segments: (segment type, ASNs), 4-octet ASNs.
    pub as_path: Vec<(u8, Vec<u32>)>,
    pub next_hop: Option<Ipv4Addr>,
    pub med: Option<u32>,
    pub local_pref: Option<u32>,
    pub originator_id: Option<Ipv4Addr>,
    pub cluster_list: Vec<Ipv4Addr>,
    pub ext_communities: Vec<[u8; 8]>,
    pub pmsi: Option<PmsiTunnel>,
    /// Optional attributes this code does not interpret: (flags, type, value).
    pub unknown: Vec<(u8, u8, Vec<u8>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PmsiTunnel {
    pub flags: u8,
    pub tunnel_type: u8,
    /// The 3-octet label field: the VNI for VxLAN (RFC 8365).
    pub label: u32,
    pub endpoint: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Update {
    pub attrs: Attributes,
    /// EVPN next hop (MP_REACH) and the routes it reaches.
    pub next_hop: Option<IpAddr>,
    pub announced: Vec<EvpnRoute>,
    pub withdrawn: Vec<EvpnRoute>,
    /// Routes of address families other than EVPN: (AFI, SAFI), skipped.
    pub other_families: Vec<(u16, u8)>,
}

/// The route target of a VNI as FRR derives it (`form_auto_rt` in bgpd/bgp_evpn.c), so that
/// FRR VTEPs import vpcd's routes and the other way round: a 2-octet-AS specific community
/// (type 0x00, subtype 0x02) with the low 16 bits of the AS as global administrator and the
/// whole VNI as the 4-octet local administrator, also for a 4-octet AS. (The 4-octet-AS form,
/// type 0x02, leaves only 16 bits for the value: VNIs from 65536 on would collide, and FRR
/// would not import the routes.)
pub fn route_target(asn: u32, vni: u32) -> [u8; 8] {
    let mut c = [0x00, 0x02, 0, 0, 0, 0, 0, 0];
    c[2..4].copy_from_slice(&((asn & 0xffff) as u16).to_be_bytes());
    c[4..8].copy_from_slice(&vni.to_be_bytes());
    c
}

/// The BGP encapsulation extended community for VxLAN (RFC 9012: opaque, subtype 0x0c).
pub fn vxlan_encapsulation() -> [u8; 8] {
    let mut c = [0x03, 0x0c, 0, 0, 0, 0, 0, 0];
    c[6..8].copy_from_slice(&TUNNEL_VXLAN.to_be_bytes());
    c
}

/// A reader over a byte slice that never panics.
struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn new(b: &'a [u8]) -> Self {
        Cursor { b }
    }
    fn left(&self) -> usize {
        self.b.len()
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.b.len() {
            return None;
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<u32> {
        self.take(3)
            .map(|b| u32::from_be_bytes([0, b[0], b[1], b[2]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn ipv4(&mut self) -> Option<Ipv4Addr> {
        self.u32().map(Ipv4Addr::from)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).and_then(|b| b.try_into().ok())
    }
}

/// The length of the message at the start of `buf`, once its header is there; `Err` for a
/// header that can never be valid (bad marker or length).
pub fn message_len(buf: &[u8]) -> Result<Option<usize>, WireError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    if buf[..16].iter().any(|b| *b != 0xff) {
        return Err(notify(
            code::HEADER,
            code::HEADER_NOT_SYNCHRONIZED,
            "marker is not all ones",
        ));
    }
    let len = usize::from(u16::from_be_bytes([buf[16], buf[17]]));
    if !(HEADER_LEN..=MAX_LEN).contains(&len) {
        return Err(WireError::Notify {
            code: code::HEADER,
            subcode: code::HEADER_BAD_LENGTH,
            data: buf[16..18].to_vec(),
            reason: format!("length {len}"),
        });
    }
    Ok(Some(len))
}

/// Decodes one whole message (exactly the bytes of one; see [`message_len`]). `four_octet`:
/// whether both sides announced 4-octet AS numbers (AS_PATH then carries 4-octet ASNs).
pub fn decode(buf: &[u8], four_octet: bool) -> Result<Message, WireError> {
    let len = match message_len(buf)? {
        Some(l) => l,
        None => {
            return Err(WireError::Incomplete {
                need: HEADER_LEN - buf.len(),
            })
        }
    };
    if buf.len() < len {
        return Err(WireError::Incomplete {
            need: len - buf.len(),
        });
    }
    let kind = buf[18];
    let body = &buf[HEADER_LEN..len];
    let bad_len = || WireError::Notify {
        code: code::HEADER,
        subcode: code::HEADER_BAD_LENGTH,
        data: (len as u16).to_be_bytes().to_vec(),
        reason: format!("length {len} for message type {kind}"),
    };
    match kind {
        TYPE_OPEN => {
            if body.len() < 10 {
                return Err(bad_len());
            }
            decode_open(body).map(Message::Open)
        }
        TYPE_UPDATE => {
            if body.len() < 4 {
                return Err(bad_len());
            }
            decode_update(body, four_octet).map(|u| Message::Update(Box::new(u)))
        }
        TYPE_NOTIFICATION => {
            if body.len() < 2 {
                return Err(bad_len());
            }
            Ok(Message::Notification(Notification {
                code: body[0],
                subcode: body[1],
                data: body[2..].to_vec(),
            }))
        }
        TYPE_KEEPALIVE => {
            if !body.is_empty() {
                return Err(bad_len());
            }
            Ok(Message::Keepalive)
        }
        TYPE_ROUTE_REFRESH => {
            if body.len() != 4 {
                return Err(WireError::Notify {
                    code: code::ROUTE_REFRESH,
                    subcode: code::ROUTE_REFRESH_BAD_LENGTH,
                    data: body.to_vec(),
                    reason: format!("ROUTE-REFRESH of {} bytes", body.len()),
                });
            }
            Ok(Message::RouteRefresh {
                afi: u16::from_be_bytes([body[0], body[1]]),
                safi: body[3],
            })
        }
        t => Err(WireError::Notify {
            code: code::HEADER,
            subcode: code::HEADER_BAD_TYPE,
            data: vec![t],
            reason: format!("message type {t}"),
        }),
    }
}

fn decode_open(body: &[u8]) -> Result<Open, WireError> {
    let mut c = Cursor::new(body);
    let malformed = || notify(code::OPEN, 0, "malformed OPEN");
    let version = c.u8().ok_or_else(malformed)?;
    if version != 4 {
        return Err(WireError::Notify {
            code: code::OPEN,
            subcode: code::OPEN_UNSUPPORTED_VERSION,
            data: 4u16.to_be_bytes().to_vec(),
            reason: format!("version {version}"),
        });
    }
    let as2 = c.u16().ok_or_else(malformed)?;
    let hold_time = c.u16().ok_or_else(malformed)?;
    if hold_time == 1 || hold_time == 2 {
        return Err(notify(
            code::OPEN,
            code::OPEN_UNACCEPTABLE_HOLD_TIME,
            format!("hold time {hold_time}"),
        ));
    }
    let bgp_id = c.ipv4().ok_or_else(malformed)?;
    if bgp_id.is_unspecified() || bgp_id.is_multicast() || bgp_id.is_broadcast() {
        return Err(notify(
            code::OPEN,
            code::OPEN_BAD_BGP_ID,
            format!("BGP identifier {bgp_id}"),
        ));
    }
    let opt_len = usize::from(c.u8().ok_or_else(malformed)?);
    if opt_len != c.left() {
        return Err(notify(
            code::OPEN,
            0,
            format!(
                "optional parameters length {opt_len}, {} bytes follow",
                c.left()
            ),
        ));
    }
    let mut capabilities = Vec::new();
    while c.left() > 0 {
        let ptype = c.u8().ok_or_else(malformed)?;
        let plen = usize::from(c.u8().ok_or_else(malformed)?);
        let pval = c.take(plen).ok_or_else(malformed)?;
        if ptype != 2 {
            return Err(notify(
                code::OPEN,
                code::OPEN_UNSUPPORTED_PARAMETER,
                format!("optional parameter type {ptype}"),
            ));
        }
        let mut p = Cursor::new(pval);
        while p.left() > 0 {
            let ccode = p.u8().ok_or_else(malformed)?;
            let clen = usize::from(p.u8().ok_or_else(malformed)?);
            let cval = p.take(clen).ok_or_else(malformed)?;
            capabilities.push(match (ccode, clen) {
                (1, 4) => Capability::Multiprotocol {
                    afi: u16::from_be_bytes([cval[0], cval[1]]),
                    safi: cval[3],
                },
                (2, 0) => Capability::RouteRefresh,
                (65, 4) => Capability::FourOctetAs(u32::from_be_bytes([
                    cval[0], cval[1], cval[2], cval[3],
                ])),
                (1 | 2 | 65, _) => {
                    return Err(notify(
                        code::OPEN,
                        0,
                        format!("capability {ccode} of length {clen}"),
                    ))
                }
                _ => Capability::Other {
                    code: ccode,
                    value: cval.to_vec(),
                },
            });
        }
    }
    let asn = capabilities
        .iter()
        .find_map(|c| match c {
            Capability::FourOctetAs(a) => Some(*a),
            _ => None,
        })
        .unwrap_or(u32::from(as2));
    if asn == 0 {
        return Err(notify(code::OPEN, code::OPEN_BAD_PEER_AS, "AS 0"));
    }
    Ok(Open {
        version,
        asn,
        hold_time,
        bgp_id,
        capabilities,
    })
}

/// Decodes EVPN NLRI (a sequence of route type, length, value).
fn decode_evpn_nlri(mut c: Cursor<'_>) -> Option<Vec<EvpnRoute>> {
    let mut out = Vec::new();
    while c.left() > 0 {
        let route_type = c.u8()?;
        let len = usize::from(c.u8()?);
        let v = c.take(len)?;
        out.push(decode_evpn_route(route_type, v)?);
    }
    Some(out)
}

fn decode_ip(c: &mut Cursor<'_>, bits: u8) -> Option<Option<IpAddr>> {
    match bits {
        0 => Some(None),
        32 => Some(Some(IpAddr::V4(c.ipv4()?))),
        128 => Some(Some(IpAddr::V6(Ipv6Addr::from(c.array::<16>()?)))),
        _ => None,
    }
}

fn decode_evpn_route(route_type: u8, v: &[u8]) -> Option<EvpnRoute> {
    let mut c = Cursor::new(v);
    match route_type {
        2 => {
            let rd = Rd(c.array::<8>()?);
            let esi = c.array::<10>()?;
            let eth_tag = c.u32()?;
            if c.u8()? != 48 {
                return None;
            }
            let mac = c.array::<6>()?;
            let bits = c.u8()?;
            let ip = decode_ip(&mut c, bits)?;
            let vni = c.u24()?;
            let vni2 = match c.left() {
                0 => None,
                3 => Some(c.u24()?),
                _ => return None,
            };
            Some(EvpnRoute::MacIp {
                rd,
                esi,
                eth_tag,
                mac,
                ip,
                vni,
                vni2,
            })
        }
        3 => {
            let rd = Rd(c.array::<8>()?);
            let eth_tag = c.u32()?;
            let bits = c.u8()?;
            let origin = decode_ip(&mut c, bits)??;
            if c.left() != 0 {
                return None;
            }
            Some(EvpnRoute::InclusiveMulticast {
                rd,
                eth_tag,
                origin,
            })
        }
        t => Some(EvpnRoute::Other {
            route_type: t,
            value: v.to_vec(),
        }),
    }
}

fn decode_update(body: &[u8], four_octet: bool) -> Result<Update, WireError> {
    let list = |reason: &str| {
        notify(
            code::UPDATE,
            code::UPDATE_MALFORMED_ATTRIBUTE_LIST,
            reason.to_string(),
        )
    };
    let mut c = Cursor::new(body);
    let wlen = usize::from(c.u16().ok_or_else(|| list("no withdrawn length"))?);
    // IPv4 unicast withdrawals: not carried by this speaker; skipped.
    c.take(wlen)
        .ok_or_else(|| list("withdrawn routes overrun the message"))?;
    let alen = usize::from(c.u16().ok_or_else(|| list("no attributes length"))?);
    let attrs = c
        .take(alen)
        .ok_or_else(|| list("attributes overrun the message"))?;

    let mut u = Update::default();
    // Problems that withdraw the routes rather than the session (RFC 7606).
    let mut soft: Option<String> = None;
    let mut seen = [false; 256];
    let mut a = Cursor::new(attrs);
    while a.left() > 0 {
        let flags = a.u8().ok_or_else(|| list("truncated attribute header"))?;
        let typ = a.u8().ok_or_else(|| list("truncated attribute header"))?;
        let len = if flags & FLAG_EXTENDED != 0 {
            a.u16().map(usize::from)
        } else {
            a.u8().map(usize::from)
        }
        .ok_or_else(|| list("truncated attribute length"))?;
        // Lengths that conflict with the Total Attribute Length reset the session: RFC 7606
        // section 4 would treat the UPDATE as withdraw, but only where its routes are known
        // (section 3.j), and EVPN routes live in MP_REACH/MP_UNREACH, which may be in the part
        // that cannot be parsed.
        let v = a.take(len).ok_or_else(|| {
            notify(
                code::UPDATE,
                code::UPDATE_ATTRIBUTE_LENGTH,
                format!("attribute {typ} overruns the attributes"),
            )
        })?;
        if std::mem::replace(&mut seen[usize::from(typ)], true) {
            // A repeated attribute: MP ones are fatal (RFC 7606 3.g), the rest are ignored.
            if typ == ATTR_MP_REACH || typ == ATTR_MP_UNREACH {
                return Err(list("MP_REACH/MP_UNREACH repeated"));
            }
            continue;
        }
        let mut vc = Cursor::new(v);
        let well_known = matches!(
            typ,
            ATTR_ORIGIN | ATTR_AS_PATH | ATTR_NEXT_HOP | ATTR_LOCAL_PREF
        );
        if well_known && flags & (FLAG_OPTIONAL | FLAG_TRANSITIVE) != FLAG_TRANSITIVE {
            soft.get_or_insert(format!("flags {flags:#x} of well-known attribute {typ}"));
            continue;
        }
        match typ {
            ATTR_ORIGIN => match (len, v.first()) {
                (1, Some(o)) if *o <= 2 => u.attrs.origin = Some(*o),
                _ => {
                    soft.get_or_insert("bad ORIGIN".into());
                }
            },
            ATTR_AS_PATH => match decode_as_path(v, four_octet) {
                Some(p) => u.attrs.as_path = p,
                None => {
                    soft.get_or_insert("malformed AS_PATH".into());
                }
            },
            ATTR_NEXT_HOP => match vc.ipv4() {
                Some(ip) if len == 4 => u.attrs.next_hop = Some(ip),
                _ => {
                    soft.get_or_insert("bad NEXT_HOP".into());
                }
            },
            ATTR_MED => match vc.u32() {
                Some(m) if len == 4 => u.attrs.med = Some(m),
                _ => {
                    soft.get_or_insert("bad MED".into());
                }
            },
            ATTR_LOCAL_PREF => match vc.u32() {
                Some(p) if len == 4 => u.attrs.local_pref = Some(p),
                _ => {
                    soft.get_or_insert("bad LOCAL_PREF".into());
                }
            },
            ATTR_ORIGINATOR_ID => match vc.ipv4() {
                Some(ip) if len == 4 => u.attrs.originator_id = Some(ip),
                _ => {
                    soft.get_or_insert("bad ORIGINATOR_ID".into());
                }
            },
            ATTR_CLUSTER_LIST if len % 4 == 0 => {
                while let Some(ip) = vc.ipv4() {
                    u.attrs.cluster_list.push(ip);
                }
            }
            ATTR_EXT_COMMUNITIES if len % 8 == 0 => {
                while let Some(x) = vc.array::<8>() {
                    u.attrs.ext_communities.push(x);
                }
            }
            ATTR_CLUSTER_LIST | ATTR_EXT_COMMUNITIES => {
                soft.get_or_insert(format!("attribute {typ} of length {len}"));
            }
            // A malformed PMSI tunnel attribute is discarded (RFC 7606 section 7.5).
            ATTR_PMSI_TUNNEL => u.attrs.pmsi = decode_pmsi(v),
            ATTR_MP_REACH => decode_mp_reach(v, &mut u)
                .map_err(|r| notify(code::UPDATE, code::UPDATE_OPTIONAL_ATTRIBUTE, r))?,
            ATTR_MP_UNREACH => decode_mp_unreach(v, &mut u)
                .map_err(|r| notify(code::UPDATE, code::UPDATE_OPTIONAL_ATTRIBUTE, r))?,
            _ if flags & FLAG_OPTIONAL == 0 => {
                // An unrecognized well-known attribute.
                return Err(WireError::Notify {
                    code: code::UPDATE,
                    subcode: 2,
                    data: vec![flags, typ],
                    reason: format!("unrecognized well-known attribute {typ}"),
                });
            }
            _ => u.attrs.unknown.push((flags, typ, v.to_vec())),
        }
    }
    if !u.announced.is_empty() {
        for (needed, name) in [
            (u.attrs.origin.is_some(), "ORIGIN"),
            (seen[usize::from(ATTR_AS_PATH)], "AS_PATH"),
        ] {
            if !needed {
                soft.get_or_insert(format!("missing {name}"));
            }
        }
    }
    if let Some(reason) = soft {
        let mut withdrawn = std::mem::take(&mut u.withdrawn);
        withdrawn.append(&mut u.announced);
        return Err(WireError::TreatAsWithdraw { withdrawn, reason });
    }
    Ok(u)
}

fn decode_as_path(v: &[u8], four_octet: bool) -> Option<Vec<(u8, Vec<u32>)>> {
    let mut c = Cursor::new(v);
    let mut out = Vec::new();
    while c.left() > 0 {
        let seg_type = c.u8()?;
        if !(1..=4).contains(&seg_type) {
            return None;
        }
        let n = usize::from(c.u8()?);
        if n == 0 {
            return None;
        }
        let mut asns = Vec::with_capacity(n);
        for _ in 0..n {
            asns.push(if four_octet {
                c.u32()?
            } else {
                u32::from(c.u16()?)
            });
        }
        out.push((seg_type, asns));
    }
    Some(out)
}

fn decode_pmsi(v: &[u8]) -> Option<PmsiTunnel> {
    let mut c = Cursor::new(v);
    let flags = c.u8()?;
    let tunnel_type = c.u8()?;
    let label = c.u24()?;
    let endpoint = match c.left() {
        4 => IpAddr::V4(c.ipv4()?),
        16 => IpAddr::V6(Ipv6Addr::from(c.array::<16>()?)),
        _ => return None,
    };
    Some(PmsiTunnel {
        flags,
        tunnel_type,
        label,
        endpoint,
    })
}

fn decode_mp_reach(v: &[u8], u: &mut Update) -> Result<(), String> {
    let mut c = Cursor::new(v);
    let afi = c.u16().ok_or("short MP_REACH_NLRI")?;
    let safi = c.u8().ok_or("short MP_REACH_NLRI")?;
    let nh_len = usize::from(c.u8().ok_or("short MP_REACH_NLRI")?);
    let nh = c.take(nh_len).ok_or("MP_REACH next hop overruns")?;
    c.u8().ok_or("MP_REACH without the reserved octet")?;
    if (afi, safi) != (AFI_L2VPN, SAFI_EVPN) {
        u.other_families.push((afi, safi));
        return Ok(());
    }
    u.next_hop = Some(match nh_len {
        4 => IpAddr::V4(Ipv4Addr::new(nh[0], nh[1], nh[2], nh[3])),
        16 | 32 => {
            let b: [u8; 16] = nh[..16].try_into().map_err(|_| "next hop")?;
            IpAddr::V6(Ipv6Addr::from(b))
        }
        n => return Err(format!("EVPN next hop of length {n}")),
    });
    u.announced = decode_evpn_nlri(c).ok_or("malformed EVPN NLRI in MP_REACH_NLRI")?;
    Ok(())
}

fn decode_mp_unreach(v: &[u8], u: &mut Update) -> Result<(), String> {
    let mut c = Cursor::new(v);
    let afi = c.u16().ok_or("short MP_UNREACH_NLRI")?;
    let safi = c.u8().ok_or("short MP_UNREACH_NLRI")?;
    if (afi, safi) != (AFI_L2VPN, SAFI_EVPN) {
        u.other_families.push((afi, safi));
        return Ok(());
    }
    u.withdrawn = decode_evpn_nlri(c).ok_or("malformed EVPN NLRI in MP_UNREACH_NLRI")?;
    Ok(())
}

// ---- encoding --------------------------------------------------------------------------------

fn put_attr(out: &mut Vec<u8>, flags: u8, typ: u8, v: &[u8]) {
    if v.len() > 255 {
        out.extend_from_slice(&[flags | FLAG_EXTENDED, typ]);
        out.extend_from_slice(&(v.len() as u16).to_be_bytes());
    } else {
        out.extend_from_slice(&[flags & !FLAG_EXTENDED, typ, v.len() as u8]);
    }
    out.extend_from_slice(v);
}

fn put_ip(out: &mut Vec<u8>, ip: Option<IpAddr>) {
    match ip {
        None => out.push(0),
        Some(IpAddr::V4(a)) => {
            out.push(32);
            out.extend_from_slice(&a.octets());
        }
        Some(IpAddr::V6(a)) => {
            out.push(128);
            out.extend_from_slice(&a.octets());
        }
    }
}

fn put_u24(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes()[1..]);
}

/// What identifies an EVPN route (RFC 7432 section 7): type 2 by RD, Ethernet tag, MAC and IP
/// (not the ESI or labels, which a withdrawal need not repeat); type 3 by RD, Ethernet tag and
/// originating router.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteKey {
    MacIp {
        rd: Rd,
        eth_tag: u32,
        mac: [u8; 6],
        ip: Option<IpAddr>,
    },
    InclusiveMulticast {
        rd: Rd,
        eth_tag: u32,
        origin: IpAddr,
    },
    Other {
        route_type: u8,
        value: Vec<u8>,
    },
}

impl EvpnRoute {
    pub fn key(&self) -> RouteKey {
        match self {
            EvpnRoute::MacIp {
                rd,
                eth_tag,
                mac,
                ip,
                ..
            } => RouteKey::MacIp {
                rd: *rd,
                eth_tag: *eth_tag,
                mac: *mac,
                ip: *ip,
            },
            EvpnRoute::InclusiveMulticast {
                rd,
                eth_tag,
                origin,
            } => RouteKey::InclusiveMulticast {
                rd: *rd,
                eth_tag: *eth_tag,
                origin: *origin,
            },
            EvpnRoute::Other { route_type, value } => RouteKey::Other {
                route_type: *route_type,
                value: value.clone(),
            },
        }
    }

    /// The NLRI bytes: route type, length, value.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut v = Vec::new();
        let t = match self {
            EvpnRoute::MacIp {
                rd,
                esi,
                eth_tag,
                mac,
                ip,
                vni,
                vni2,
            } => {
                v.extend_from_slice(&rd.0);
                v.extend_from_slice(esi);
                v.extend_from_slice(&eth_tag.to_be_bytes());
                v.push(48);
                v.extend_from_slice(mac);
                put_ip(&mut v, *ip);
                put_u24(&mut v, *vni);
                if let Some(l2) = vni2 {
                    put_u24(&mut v, *l2);
                }
                2
            }
            EvpnRoute::InclusiveMulticast {
                rd,
                eth_tag,
                origin,
            } => {
                v.extend_from_slice(&rd.0);
                v.extend_from_slice(&eth_tag.to_be_bytes());
                put_ip(&mut v, Some(*origin));
                3
            }
            EvpnRoute::Other { route_type, value } => {
                v.extend_from_slice(value);
                *route_type
            }
        };
        out.push(t);
        out.push(v.len() as u8);
        out.extend_from_slice(&v);
    }
}

impl Message {
    /// The whole message, header included. `four_octet` as for [`decode`].
    pub fn encode(&self, four_octet: bool) -> Vec<u8> {
        let mut body = Vec::new();
        let kind = match self {
            Message::Open(o) => {
                body.push(o.version);
                body.extend_from_slice(&u16::try_from(o.asn).unwrap_or(AS_TRANS).to_be_bytes());
                body.extend_from_slice(&o.hold_time.to_be_bytes());
                body.extend_from_slice(&o.bgp_id.octets());
                let mut caps = Vec::new();
                for c in &o.capabilities {
                    let (code, val): (u8, Vec<u8>) = match c {
                        Capability::Multiprotocol { afi, safi } => {
                            let mut v = afi.to_be_bytes().to_vec();
                            v.extend_from_slice(&[0, *safi]);
                            (1, v)
                        }
                        Capability::RouteRefresh => (2, Vec::new()),
                        Capability::FourOctetAs(a) => (65, a.to_be_bytes().to_vec()),
                        Capability::Other { code, value } => (*code, value.clone()),
                    };
                    caps.extend_from_slice(&[code, val.len() as u8]);
                    caps.extend_from_slice(&val);
                }
                if caps.is_empty() {
                    body.push(0);
                } else {
                    body.push((caps.len() + 2) as u8);
                    body.extend_from_slice(&[2, caps.len() as u8]);
                    body.extend_from_slice(&caps);
                }
                TYPE_OPEN
            }
            Message::Update(u) => {
                body.extend_from_slice(&[0, 0]); // no IPv4 withdrawals
                let mut attrs = Vec::new();
                let a = &u.attrs;
                if let Some(o) = a.origin {
                    put_attr(&mut attrs, FLAG_TRANSITIVE, ATTR_ORIGIN, &[o]);
                }
                if a.origin.is_some() || !a.as_path.is_empty() {
                    let mut p = Vec::new();
                    for (seg, asns) in &a.as_path {
                        p.extend_from_slice(&[*seg, asns.len() as u8]);
                        for asn in asns {
                            if four_octet {
                                p.extend_from_slice(&asn.to_be_bytes());
                            } else {
                                p.extend_from_slice(
                                    &u16::try_from(*asn).unwrap_or(AS_TRANS).to_be_bytes(),
                                );
                            }
                        }
                    }
                    put_attr(&mut attrs, FLAG_TRANSITIVE, ATTR_AS_PATH, &p);
                }
                if let Some(nh) = a.next_hop {
                    put_attr(&mut attrs, FLAG_TRANSITIVE, ATTR_NEXT_HOP, &nh.octets());
                }
                if let Some(m) = a.med {
                    put_attr(&mut attrs, FLAG_OPTIONAL, ATTR_MED, &m.to_be_bytes());
                }
                if let Some(p) = a.local_pref {
                    put_attr(
                        &mut attrs,
                        FLAG_TRANSITIVE,
                        ATTR_LOCAL_PREF,
                        &p.to_be_bytes(),
                    );
                }
                if let Some(id) = a.originator_id {
                    put_attr(&mut attrs, FLAG_OPTIONAL, ATTR_ORIGINATOR_ID, &id.octets());
                }
                if !a.cluster_list.is_empty() {
                    let v: Vec<u8> = a.cluster_list.iter().flat_map(|i| i.octets()).collect();
                    put_attr(&mut attrs, FLAG_OPTIONAL, ATTR_CLUSTER_LIST, &v);
                }
                if let Some(nh) = u.next_hop.filter(|_| !u.announced.is_empty()) {
                    let mut v = AFI_L2VPN.to_be_bytes().to_vec();
                    v.push(SAFI_EVPN);
                    match nh {
                        IpAddr::V4(a) => {
                            v.push(4);
                            v.extend_from_slice(&a.octets());
                        }
                        IpAddr::V6(a) => {
                            v.push(16);
                            v.extend_from_slice(&a.octets());
                        }
                    }
                    v.push(0);
                    for r in &u.announced {
                        r.encode(&mut v);
                    }
                    put_attr(&mut attrs, FLAG_OPTIONAL, ATTR_MP_REACH, &v);
                }
                if !u.withdrawn.is_empty() {
                    let mut v = AFI_L2VPN.to_be_bytes().to_vec();
                    v.push(SAFI_EVPN);
                    for r in &u.withdrawn {
                        r.encode(&mut v);
                    }
                    put_attr(&mut attrs, FLAG_OPTIONAL, ATTR_MP_UNREACH, &v);
                }
                if !a.ext_communities.is_empty() {
                    let v: Vec<u8> = a.ext_communities.iter().flatten().copied().collect();
                    put_attr(
                        &mut attrs,
                        FLAG_OPTIONAL | FLAG_TRANSITIVE,
                        ATTR_EXT_COMMUNITIES,
                        &v,
                    );
                }
                if let Some(p) = &a.pmsi {
                    let mut v = vec![p.flags, p.tunnel_type];
                    put_u24(&mut v, p.label);
                    match p.endpoint {
                        IpAddr::V4(e) => v.extend_from_slice(&e.octets()),
                        IpAddr::V6(e) => v.extend_from_slice(&e.octets()),
                    }
                    put_attr(
                        &mut attrs,
                        FLAG_OPTIONAL | FLAG_TRANSITIVE,
                        ATTR_PMSI_TUNNEL,
                        &v,
                    );
                }
                for (flags, typ, v) in &a.unknown {
                    if flags & FLAG_TRANSITIVE != 0 {
                        put_attr(&mut attrs, flags | FLAG_PARTIAL, *typ, v);
                    }
                }
                body.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
                body.extend_from_slice(&attrs);
                TYPE_UPDATE
            }
            Message::Notification(n) => {
                body.extend_from_slice(&[n.code, n.subcode]);
                body.extend_from_slice(&n.data);
                TYPE_NOTIFICATION
            }
            Message::Keepalive => TYPE_KEEPALIVE,
            Message::RouteRefresh { afi, safi } => {
                body.extend_from_slice(&afi.to_be_bytes());
                body.extend_from_slice(&[0, *safi]);
                TYPE_ROUTE_REFRESH
            }
        };
        let mut out = vec![0xff; 16];
        out.extend_from_slice(&((HEADER_LEN + body.len()) as u16).to_be_bytes());
        out.push(kind);
        out.extend_from_slice(&body);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> Open {
        Open {
            version: 4,
            asn: 4_200_000_001,
            hold_time: 90,
            bgp_id: Ipv4Addr::new(192, 0, 2, 1),
            capabilities: vec![
                Capability::Multiprotocol {
                    afi: AFI_L2VPN,
                    safi: SAFI_EVPN,
                },
                Capability::RouteRefresh,
                Capability::FourOctetAs(4_200_000_001),
            ],
        }
    }

    fn type2(ip: Option<IpAddr>) -> EvpnRoute {
        EvpnRoute::MacIp {
            rd: Rd::ip(Ipv4Addr::new(192, 0, 2, 1), 3),
            esi: [0; 10],
            eth_tag: 0,
            mac: [0x02, 0, 0, 0, 0, 0x10],
            ip,
            vni: 5001,
            vni2: None,
        }
    }

    fn type3() -> EvpnRoute {
        EvpnRoute::InclusiveMulticast {
            rd: Rd::ip(Ipv4Addr::new(192, 0, 2, 1), 3),
            eth_tag: 0,
            origin: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        }
    }

    fn update() -> Update {
        Update {
            attrs: Attributes {
                origin: Some(0),
                as_path: vec![],
                local_pref: Some(100),
                ext_communities: vec![route_target(65000, 5001), vxlan_encapsulation()],
                pmsi: Some(PmsiTunnel {
                    flags: 0,
                    tunnel_type: PMSI_INGRESS_REPLICATION,
                    label: 5001,
                    endpoint: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                }),
                ..Default::default()
            },
            next_hop: Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))),
            announced: vec![
                type3(),
                type2(None),
                type2(Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)))),
            ],
            withdrawn: vec![type2(Some(IpAddr::V6("fd00::5".parse().unwrap())))],
            other_families: vec![],
        }
    }

    #[test]
    fn messages_round_trip() {
        for m in [
            Message::Open(open()),
            Message::Update(Box::new(update())),
            Message::Keepalive,
            Message::Notification(Notification {
                code: code::CEASE,
                subcode: 2,
                data: vec![1, 2],
            }),
            Message::RouteRefresh {
                afi: AFI_L2VPN,
                safi: SAFI_EVPN,
            },
        ] {
            let b = m.encode(true);
            assert_eq!(message_len(&b).unwrap(), Some(b.len()));
            assert_eq!(decode(&b, true).unwrap(), m, "{m:?}");
        }
    }

    #[test]
    fn an_open_with_a_4_octet_as_carries_as_trans() {
        let b = Message::Open(open()).encode(true);
        assert_eq!(u16::from_be_bytes([b[20], b[21]]), AS_TRANS);
        let Message::Open(o) = decode(&b, true).unwrap() else {
            panic!()
        };
        assert_eq!(o.asn, 4_200_000_001);
    }

    #[test]
    fn keepalive_is_19_bytes() {
        let b = Message::Keepalive.encode(true);
        assert_eq!(b.len(), 19);
        assert_eq!(b[18], 4);
    }

    #[test]
    fn header_errors_notify() {
        let mut b = Message::Keepalive.encode(true);
        b[0] = 0;
        assert!(matches!(
            decode(&b, true),
            Err(WireError::Notify {
                code: 1,
                subcode: 1,
                ..
            })
        ));
        let mut b = Message::Keepalive.encode(true);
        b[17] = 18;
        assert!(matches!(
            decode(&b, true),
            Err(WireError::Notify {
                code: 1,
                subcode: 2,
                ..
            })
        ));
        let mut b = Message::Keepalive.encode(true);
        b[18] = 9;
        assert!(matches!(
            decode(&b, true),
            Err(WireError::Notify {
                code: 1,
                subcode: 3,
                ..
            })
        ));
        let b = Message::Open(open()).encode(true);
        assert!(matches!(
            decode(&b[..30], true),
            Err(WireError::Incomplete { .. })
        ));
    }

    #[test]
    fn open_errors_notify() {
        let mut o = open();
        o.hold_time = 2;
        let b = Message::Open(o).encode(true);
        assert!(matches!(
            decode(&b, true),
            Err(WireError::Notify {
                code: 2,
                subcode: 6,
                ..
            })
        ));
        let mut b = Message::Open(open()).encode(true);
        b[19] = 3;
        assert!(matches!(
            decode(&b, true),
            Err(WireError::Notify {
                code: 2,
                subcode: 1,
                ..
            })
        ));
    }

    #[test]
    fn a_bad_origin_withdraws_the_routes_and_keeps_the_session() {
        let mut u = update();
        u.attrs.origin = Some(7);
        let b = Message::Update(Box::new(u.clone())).encode(true);
        match decode(&b, true) {
            Err(WireError::TreatAsWithdraw { withdrawn, .. }) => {
                assert_eq!(withdrawn.len(), u.announced.len() + u.withdrawn.len());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_announcement_without_as_path_is_withdrawn() {
        let mut u = update();
        u.attrs.origin = None;
        let b = Message::Update(Box::new(u)).encode(true);
        assert!(matches!(
            decode(&b, true),
            Err(WireError::TreatAsWithdraw { .. })
        ));
    }

    #[test]
    fn unknown_optional_attributes_are_kept_and_other_families_skipped() {
        let mut u = update();
        u.attrs
            .unknown
            .push((FLAG_OPTIONAL | FLAG_TRANSITIVE, 99, vec![1, 2, 3]));
        let b = Message::Update(Box::new(u)).encode(true);
        let Message::Update(d) = decode(&b, true).unwrap() else {
            panic!()
        };
        assert_eq!(d.attrs.unknown.len(), 1);
        assert_eq!(d.attrs.unknown[0].1, 99);
        assert_ne!(
            d.attrs.unknown[0].0 & FLAG_PARTIAL,
            0,
            "passed on as partial"
        );

        // MP_UNREACH for IPv4 unicast.
        let mut attrs = Vec::new();
        put_attr(&mut attrs, FLAG_OPTIONAL, ATTR_MP_UNREACH, &[0, 1, 1]);
        let mut body = vec![0, 0];
        body.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        body.extend_from_slice(&attrs);
        let mut msg = vec![0xff; 16];
        msg.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
        msg.push(2);
        msg.extend_from_slice(&body);
        let Message::Update(d) = decode(&msg, true).unwrap() else {
            panic!()
        };
        assert_eq!(d.other_families, vec![(AFI_IPV4, SAFI_UNICAST)]);
    }

    #[test]
    fn every_truncation_and_byte_change_is_an_error_or_a_message_never_a_panic() {
        // The fuzz target's property, deterministically, so CI runs it on stable.
        for m in [Message::Open(open()), Message::Update(Box::new(update()))] {
            let b = m.encode(true);
            for cut in 0..b.len() {
                let mut t = b[..cut].to_vec();
                if cut >= HEADER_LEN {
                    t[16..18].copy_from_slice(&(cut as u16).to_be_bytes());
                }
                let _ = decode(&t, true);
            }
            for i in 0..b.len() {
                for v in [0u8, 1, 0x7f, 0x80, 0xff, b[i].wrapping_add(1)] {
                    let mut t = b.clone();
                    t[i] = v;
                    for four in [false, true] {
                        if let Ok(d) = decode(&t, four) {
                            assert!(decode(&d.encode(four), four).is_ok(), "{d:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn route_keys_ignore_labels_and_esi() {
        let a = type2(None);
        let mut b = a.clone();
        if let EvpnRoute::MacIp { vni, esi, .. } = &mut b {
            *vni = 0;
            esi[0] = 1;
        }
        assert_ne!(a, b);
        assert_eq!(a.key(), b.key());
        assert_ne!(
            a.key(),
            type2(Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)))).key()
        );
    }

    #[test]
    fn route_targets_are_frr_s_auto_derived_ones_also_for_4_octet_ases() {
        // 4200000001 is 0xfa56_ea01: FRR's RT for VNI 70001 is 59905:70001 (0xea01:0x11171).
        assert_eq!(
            route_target(4_200_000_001, 70_001),
            [0x00, 0x02, 0xea, 0x01, 0x00, 0x01, 0x11, 0x71]
        );
        assert_ne!(
            route_target(4_200_000_001, 5001),
            route_target(4_200_000_001, 5001 + 65536),
            "VNIs 65536 apart"
        );
        assert_eq!(
            route_target(65000, 0xff_ffff),
            [0x00, 0x02, 0xfd, 0xe8, 0x00, 0xff, 0xff, 0xff]
        );
    }

    #[test]
    fn an_attribute_overrunning_the_attributes_is_an_attribute_length_error() {
        // ORIGIN claiming 200 bytes where 1 follows.
        let mut msg = vec![0xff; 16];
        msg.extend_from_slice(&27u16.to_be_bytes());
        msg.extend_from_slice(&[2, 0, 0, 0, 4, FLAG_TRANSITIVE, ATTR_ORIGIN, 200, 0]);
        assert!(matches!(
            decode(&msg, true),
            Err(WireError::Notify {
                code: code::UPDATE,
                subcode: code::UPDATE_ATTRIBUTE_LENGTH,
                ..
            })
        ));
    }

    #[test]
    fn route_distinguishers_print_like_frr() {
        assert_eq!(
            Rd::ip(Ipv4Addr::new(192, 0, 2, 1), 3).to_string(),
            "192.0.2.1:3"
        );
        assert_eq!(
            route_target(65000, 5001),
            [0, 2, 0xfd, 0xe8, 0, 0, 0x13, 0x89]
        );
        assert_eq!(vxlan_encapsulation(), [3, 0x0c, 0, 0, 0, 0, 0, 8]);
    }
}
