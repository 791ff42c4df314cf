//! The DHCPv4 server, sans I/O: a request's bytes in, the reply's bytes and where to send them
//! out. It answers only for MACs it has a lease for (static MAC -> address leases from the
//! IPAM): OFFER for DISCOVER, ACK or NAK for REQUEST (selecting, init-reboot, renewing,
//! rebinding), ACK for INFORM; RELEASE and DECLINE need no answer.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

use crate::ipam::{Ipv4Cidr, Mac};

/// What the server hands out on one subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpConfig {
    /// The server's own address on the subnet (the router leg's, the gateway).
    pub server: Ipv4Addr,
    pub subnet: Ipv4Cidr,
    /// Default router (option 3, and 0.0.0.0/0 in option 121).
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    /// Interface MTU (option 26).
    pub mtu: Option<u16>,
    pub lease_secs: u32,
    /// Classless static routes (option 121), besides the default route.
    pub routes: Vec<(ipnet::Ipv4Net, Ipv4Addr)>,
}

/// Where a reply goes (RFC 2131 section 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// 255.255.255.255 at ff:ff:ff:ff:ff:ff.
    Broadcast,
    /// An address the client has not configured yet, at its MAC (no ARP).
    Unicast { mac: Mac, ip: Ipv4Addr },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub kind: MessageType,
    pub payload: Vec<u8>,
    pub to: Destination,
}

#[derive(Debug, Clone)]
pub struct DhcpServer {
    cfg: DhcpConfig,
    leases: BTreeMap<Mac, Ipv4Addr>,
}

impl DhcpServer {
    pub fn new(cfg: DhcpConfig) -> DhcpServer {
        DhcpServer {
            cfg,
            leases: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &DhcpConfig {
        &self.cfg
    }

    /// Replaces the static leases (MAC -> address); addresses outside the subnet are skipped.
    pub fn set_leases(&mut self, leases: impl IntoIterator<Item = (Mac, Ipv4Addr)>) {
        self.leases = leases
            .into_iter()
            .filter(|(_, ip)| self.cfg.subnet.contains(*ip))
            .collect();
    }

    /// Handles one DHCP message (the UDP payload). None: nothing to send (not a request, not
    /// for us, unknown client, malformed).
    pub fn handle(&self, request: &[u8]) -> Option<Reply> {
        if !options_are_sane(request) {
            return None;
        }
        let msg = Message::decode(&mut Decoder::new(request)).ok()?;
        if msg.opcode() != Opcode::BootRequest || msg.hlen() != 6 || msg.chaddr().len() < 6 {
            return None;
        }
        if !msg.giaddr().is_unspecified() {
            return None; // relayed requests are not served
        }
        let mut m = [0u8; 6];
        m.copy_from_slice(&msg.chaddr()[..6]);
        let mac = Mac(m);
        let lease = self.leases.get(&mac).copied();
        let opts = msg.opts();
        match opts.msg_type()? {
            MessageType::Discover => {
                let ip = lease?;
                Some(self.reply(&msg, MessageType::Offer, ip))
            }
            MessageType::Request => {
                let server_id = match opts.get(OptionCode::ServerIdentifier) {
                    Some(DhcpOption::ServerIdentifier(s)) => Some(*s),
                    _ => None,
                };
                if server_id.is_some_and(|s| s != self.cfg.server) {
                    return None; // the client chose another server
                }
                let requested = match opts.get(OptionCode::RequestedIpAddress) {
                    Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
                    _ => None,
                };
                let asked = requested.unwrap_or(msg.ciaddr());
                match lease {
                    Some(ip) if ip == asked => Some(self.reply(&msg, MessageType::Ack, ip)),
                    // INIT-REBOOT for an address on another network: stay silent (RFC 2131
                    // 4.3.2); otherwise tell the client its address is wrong.
                    None if server_id.is_none() => None,
                    _ if server_id.is_none() && !self.cfg.subnet.contains(asked) => None,
                    _ => Some(self.nak(&msg)),
                }
            }
            MessageType::Inform => {
                lease?;
                Some(self.reply(&msg, MessageType::Ack, Ipv4Addr::UNSPECIFIED))
            }
            _ => None,
        }
    }

    fn base(&self, req: &Message, kind: MessageType, yiaddr: Ipv4Addr) -> Message {
        let mut m = Message::new_with_id(
            req.xid(),
            req.ciaddr(),
            yiaddr,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            req.chaddr(),
        );
        m.set_opcode(Opcode::BootReply);
        m.set_flags(req.flags());
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        m.opts_mut()
            .insert(DhcpOption::ServerIdentifier(self.cfg.server));
        m
    }

    fn reply(&self, req: &Message, kind: MessageType, ip: Ipv4Addr) -> Reply {
        let c = &self.cfg;
        let mut m = self.base(req, kind, ip);
        let inform = ip.is_unspecified();
        let o = m.opts_mut();
        if !inform {
            o.insert(DhcpOption::AddressLeaseTime(c.lease_secs));
            o.insert(DhcpOption::Renewal(c.lease_secs / 2));
            o.insert(DhcpOption::Rebinding(c.lease_secs / 8 * 7));
        }
        o.insert(DhcpOption::SubnetMask(prefix_mask(c.subnet.prefix())));
        o.insert(DhcpOption::BroadcastAddr(c.subnet.broadcast()));
        if let Some(r) = c.router {
            o.insert(DhcpOption::Router(vec![r]));
        }
        if !c.dns.is_empty() {
            o.insert(DhcpOption::DomainNameServer(c.dns.clone()));
        }
        if let Some(d) = &c.domain {
            o.insert(DhcpOption::DomainName(d.clone()));
        }
        if let Some(mtu) = c.mtu {
            o.insert(DhcpOption::InterfaceMtu(mtu));
        }
        if !c.routes.is_empty() {
            // With option 121 present clients ignore option 3 (RFC 3442): repeat the default
            // route in it.
            let mut routes = c.routes.clone();
            if let Some(r) = c.router {
                routes.push((ipnet::Ipv4Net::default(), r));
            }
            o.insert(DhcpOption::ClasslessStaticRoute(routes));
        }
        Reply {
            kind,
            payload: encode(&m),
            to: self.destination(req, ip),
        }
    }

    fn nak(&self, req: &Message) -> Reply {
        let mut m = self.base(req, MessageType::Nak, Ipv4Addr::UNSPECIFIED);
        m.set_ciaddr(Ipv4Addr::UNSPECIFIED);
        m.set_flags(Flags::default().set_broadcast());
        Reply {
            kind: MessageType::Nak,
            payload: encode(&m),
            to: Destination::Broadcast,
        }
    }

    /// RFC 2131 4.1: to ciaddr if the client has one, broadcast if it asks, else to yiaddr at
    /// its MAC.
    fn destination(&self, req: &Message, yiaddr: Ipv4Addr) -> Destination {
        let mut m = [0u8; 6];
        m.copy_from_slice(&req.chaddr()[..6]);
        let mac = Mac(m);
        if !req.ciaddr().is_unspecified() {
            Destination::Unicast {
                mac,
                ip: req.ciaddr(),
            }
        } else if req.flags().broadcast() || yiaddr.is_unspecified() {
            Destination::Broadcast
        } else {
            Destination::Unicast { mac, ip: yiaddr }
        }
    }
}

/// dhcproto's decoder asserts (with `debug_assert!`) the lengths of a few fixed-size options
/// instead of returning an error, so a crafted request could panic a debug build (found by the
/// fuzz target). Walks the options first and refuses such messages, and messages that overload
/// sname/file with options (option 52), which no client needs with this server.
fn options_are_sane(msg: &[u8]) -> bool {
    const OPTIONS: usize = 240;
    let mut count = [0u8; 256];
    let mut i = OPTIONS;
    while i < msg.len() {
        let code = msg[i];
        match code {
            0 => {
                i += 1;
                continue;
            }
            255 => break,
            52 => return false,
            _ => {}
        }
        let Some(&len) = msg.get(i + 1) else {
            break; // truncated: the decoder rejects it
        };
        let ok = match code {
            80 => len == 0,
            81 => len >= 3,
            94 => len == 3,
            152..=155 => len == 4,
            _ => true,
        };
        // The checked options must also appear once: repeated options are concatenated.
        count[usize::from(code)] = count[usize::from(code)].saturating_add(1);
        let once = !matches!(code, 80 | 81 | 94 | 152..=155) || count[usize::from(code)] == 1;
        if !ok || !once {
            return false;
        }
        i += 2 + usize::from(len);
    }
    true
}

fn prefix_mask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0))
}

fn encode(m: &Message) -> Vec<u8> {
    let mut buf = Vec::with_capacity(576);
    m.encode(&mut Encoder::new(&mut buf))
        .expect("encoding a message we built cannot fail");
    // BOOTP minimum size: some clients drop shorter replies.
    if buf.len() < 300 {
        buf.resize(300, 0);
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: Mac = Mac([2, 0, 0, 0, 0, 7]);
    const STRANGER: Mac = Mac([2, 0, 0, 0, 0, 8]);

    fn server() -> DhcpServer {
        let mut s = DhcpServer::new(DhcpConfig {
            server: Ipv4Addr::new(10, 0, 1, 1),
            subnet: "10.0.1.0/24".parse().unwrap(),
            router: Some(Ipv4Addr::new(10, 0, 1, 1)),
            dns: vec![Ipv4Addr::new(10, 0, 1, 1)],
            domain: Some("vpc.internal".into()),
            mtu: Some(1450),
            lease_secs: 3600,
            routes: vec![(
                "169.254.169.254/32".parse().unwrap(),
                Ipv4Addr::new(10, 0, 1, 1),
            )],
        });
        s.set_leases([
            (CLIENT, Ipv4Addr::new(10, 0, 1, 7)),
            (Mac([2, 0, 0, 0, 0, 9]), Ipv4Addr::new(10, 5, 0, 1)), // outside: skipped
        ]);
        s
    }

    fn request(mac: Mac, kind: MessageType, f: impl FnOnce(&mut Message)) -> Vec<u8> {
        let mut m = Message::new_with_id(
            0x1234,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &mac.0,
        );
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        f(&mut m);
        encode(&m)
    }

    fn decode(r: &Reply) -> Message {
        Message::decode(&mut Decoder::new(&r.payload)).unwrap()
    }

    #[test]
    fn discover_from_a_known_mac_gets_an_offer_with_every_option() {
        let r = server()
            .handle(&request(CLIENT, MessageType::Discover, |_| {}))
            .unwrap();
        assert_eq!(r.kind, MessageType::Offer);
        assert_eq!(
            r.to,
            Destination::Unicast {
                mac: CLIENT,
                ip: Ipv4Addr::new(10, 0, 1, 7)
            }
        );
        let m = decode(&r);
        assert_eq!(m.opcode(), Opcode::BootReply);
        assert_eq!(m.xid(), 0x1234);
        assert_eq!(m.yiaddr(), Ipv4Addr::new(10, 0, 1, 7));
        let o = m.opts();
        assert_eq!(
            o.get(OptionCode::SubnetMask),
            Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
        );
        assert_eq!(
            o.get(OptionCode::InterfaceMtu),
            Some(&DhcpOption::InterfaceMtu(1450))
        );
        assert_eq!(
            o.get(OptionCode::AddressLeaseTime),
            Some(&DhcpOption::AddressLeaseTime(3600))
        );
        assert_eq!(
            o.get(OptionCode::DomainName),
            Some(&DhcpOption::DomainName("vpc.internal".into()))
        );
        assert!(
            matches!(o.get(OptionCode::Router), Some(DhcpOption::Router(r)) if r == &[Ipv4Addr::new(10, 0, 1, 1)])
        );
        match o.get(OptionCode::ClasslessStaticRoute) {
            Some(DhcpOption::ClasslessStaticRoute(routes)) => {
                assert_eq!(routes.len(), 2);
                assert_eq!(
                    routes[1].0,
                    ipnet::Ipv4Net::default(),
                    "default route repeated in 121"
                );
            }
            other => panic!("no option 121: {other:?}"),
        }
        assert!(r.payload.len() >= 300);
    }

    #[test]
    fn unknown_macs_and_other_subnets_get_nothing() {
        let s = server();
        assert!(s
            .handle(&request(STRANGER, MessageType::Discover, |_| {}))
            .is_none());
        assert!(s
            .handle(&request(
                Mac([2, 0, 0, 0, 0, 9]),
                MessageType::Discover,
                |_| {}
            ))
            .is_none());
    }

    #[test]
    fn request_for_the_lease_is_acked_and_a_wrong_one_naked() {
        let s = server();
        let selecting = |ip: [u8; 4]| {
            request(CLIENT, MessageType::Request, |m| {
                m.opts_mut()
                    .insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 0, 1, 1)));
                m.opts_mut()
                    .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::from(ip)));
            })
        };
        let ack = s.handle(&selecting([10, 0, 1, 7])).unwrap();
        assert_eq!(ack.kind, MessageType::Ack);
        assert_eq!(decode(&ack).yiaddr(), Ipv4Addr::new(10, 0, 1, 7));
        let nak = s.handle(&selecting([10, 0, 1, 8])).unwrap();
        assert_eq!(nak.kind, MessageType::Nak);
        assert_eq!(nak.to, Destination::Broadcast);
        assert_eq!(decode(&nak).yiaddr(), Ipv4Addr::UNSPECIFIED);
    }

    #[test]
    fn request_for_another_server_is_ignored() {
        let req = request(CLIENT, MessageType::Request, |m| {
            m.opts_mut()
                .insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 0, 1, 99)));
            m.opts_mut()
                .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 1, 7)));
        });
        assert!(server().handle(&req).is_none());
    }

    #[test]
    fn renewing_is_unicast_to_ciaddr_and_init_reboot_elsewhere_is_silent() {
        let s = server();
        let renew = request(CLIENT, MessageType::Request, |m| {
            m.set_ciaddr(Ipv4Addr::new(10, 0, 1, 7));
        });
        let r = s.handle(&renew).unwrap();
        assert_eq!(r.kind, MessageType::Ack);
        assert_eq!(
            r.to,
            Destination::Unicast {
                mac: CLIENT,
                ip: Ipv4Addr::new(10, 0, 1, 7)
            }
        );
        let reboot_elsewhere = request(CLIENT, MessageType::Request, |m| {
            m.opts_mut()
                .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(
                    192, 168, 0, 5,
                )));
        });
        assert!(s.handle(&reboot_elsewhere).is_none());
        let reboot_wrong = request(CLIENT, MessageType::Request, |m| {
            m.opts_mut()
                .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 1, 99)));
        });
        assert_eq!(s.handle(&reboot_wrong).unwrap().kind, MessageType::Nak);
    }

    #[test]
    fn broadcast_flag_and_inform_and_release() {
        let s = server();
        let b = request(CLIENT, MessageType::Discover, |m| {
            m.set_flags(Flags::default().set_broadcast());
        });
        assert_eq!(s.handle(&b).unwrap().to, Destination::Broadcast);
        let inform = request(CLIENT, MessageType::Inform, |m| {
            m.set_ciaddr(Ipv4Addr::new(10, 0, 1, 7));
        });
        let r = s.handle(&inform).unwrap();
        assert_eq!(r.kind, MessageType::Ack);
        assert!(decode(&r)
            .opts()
            .get(OptionCode::AddressLeaseTime)
            .is_none());
        assert!(s
            .handle(&request(CLIENT, MessageType::Release, |_| {}))
            .is_none());
    }

    #[test]
    fn options_with_lengths_the_decoder_would_assert_on_are_refused() {
        let s = server();
        for (code, len) in [(80u8, 1u8), (81, 2), (94, 2), (152, 3), (52, 1)] {
            let mut req = request(CLIENT, MessageType::Discover, |_| {});
            // Replace the end option (and padding) with the bad option, then end.
            let end = req.iter().rposition(|b| *b == 255).unwrap();
            req.truncate(end);
            req.push(code);
            req.push(len);
            req.extend(std::iter::repeat_n(0xff, usize::from(len)));
            req.push(255);
            assert!(s.handle(&req).is_none(), "option {code} len {len}");
        }
    }

    /// What the fuzz target (`fuzz/fuzz_targets/dhcp_request.rs`) checks, deterministically
    /// in CI: every truncation of a request, and every byte of it flipped, never panics, and
    /// what is answered decodes and is not answered again.
    #[test]
    fn truncated_and_corrupted_requests_never_panic() {
        let s = server();
        let requested = |m: &mut Message| {
            m.opts_mut()
                .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 1, 7)));
            m.opts_mut()
                .insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 0, 1, 1)));
            m.opts_mut().insert(DhcpOption::ParameterRequestList(vec![
                OptionCode::SubnetMask,
                OptionCode::Router,
                OptionCode::ClasslessStaticRoute,
            ]));
        };
        for kind in [MessageType::Discover, MessageType::Request] {
            let whole = request(CLIENT, kind, requested);
            let check = |b: &[u8]| {
                if let Some(r) = s.handle(b) {
                    assert!(Message::decode(&mut Decoder::new(&r.payload)).is_ok());
                    assert!(s.handle(&r.payload).is_none());
                }
            };
            for end in 0..whole.len() {
                check(&whole[..end]);
            }
            for at in 0..whole.len() {
                for flip in [0x01, 0x80, 0xff] {
                    let mut b = whole.clone();
                    b[at] ^= flip;
                    check(&b);
                }
            }
        }
    }

    #[test]
    fn garbage_and_replies_are_ignored() {
        let s = server();
        assert!(s.handle(&[]).is_none());
        assert!(s.handle(&[1, 2, 3]).is_none());
        let offer = s
            .handle(&request(CLIENT, MessageType::Discover, |_| {}))
            .unwrap();
        assert!(
            s.handle(&offer.payload).is_none(),
            "a reply is not a request"
        );
    }
}
