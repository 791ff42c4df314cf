//! The netlink (rtnetlink) requests of the eBPF filter: the `clsact` qdisc and the direct-action
//! `bpf` filters of a port, all addressed by ifindex on one synchronous socket, plus the ifindexes
//! and names of the namespace's devices. Messages are built and parsed by hand (aya's netlink
//! helpers take device names and cannot query a filter).
//!
//! Our filters sit at a fixed place in both directions of a port: priority [`PRIO`] (the first
//! one consulted), handle [`HANDLE`], protocol `ETH_P_ALL`. Replacing the filter at that place
//! switches its program atomically (cls_bpf swaps it under RCU).

use std::collections::BTreeSet;
use std::io;

use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// The priority of our filters (lowest number: consulted first).
pub(crate) const PRIO: u16 = 1;
/// The handle of our filters at [`PRIO`].
pub(crate) const HANDLE: u32 = 1;

const NLMSG_HDR: usize = 16;
const TCMSG: usize = 20;
pub(crate) const IFINFOMSG: usize = 16;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_EXCL: u16 = 0x200;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

pub(crate) const RTM_NEWLINK: u16 = 16;
pub(crate) const RTM_GETLINK: u16 = 18;
const RTM_NEWQDISC: u16 = 36;
const RTM_DELQDISC: u16 = 37;
const RTM_NEWTFILTER: u16 = 44;
const RTM_DELTFILTER: u16 = 45;
const RTM_GETTFILTER: u16 = 46;

pub(crate) const IFLA_IFNAME: u16 = 3;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_FD: u16 = 6;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_FLAGS: u16 = 8;
const TCA_BPF_ID: u16 = 11;
const TCA_BPF_FLAG_ACT_DIRECT: u32 = 1;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// `TC_H_CLSACT`: the parent (and, with minor 0, the handle) of the clsact qdisc.
const TC_H_CLSACT: u32 = 0xffff_fff1;
const CLSACT_HANDLE: u32 = 0xffff_0000;
const ETH_P_ALL: u16 = 0x0003;

/// A direction of the clsact qdisc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    fn parent(self) -> u32 {
        match self {
            Hook::Ingress => 0xffff_fff2,
            Hook::Egress => 0xffff_fff3,
        }
    }
}

/// How [`TcSocket::set_filter`] treats an existing filter at our place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SetMode {
    /// Create it, or replace the program of the one there.
    Ensure,
    /// Replace the program of the one there; fail with `ENOENT` if there is none.
    Replace,
}

/// The `bpf` filter at our place of a port direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FilterInfo {
    pub name: String,
    pub prog_id: u32,
}

/// A netlink route socket, bound to the namespace it was opened in.
#[derive(Debug)]
pub(crate) struct TcSocket {
    sock: Socket,
    seq: u32,
}

pub(crate) fn put_attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// Iterates the attributes in `buf`: (type without flags, payload).
pub(crate) fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let data = &buf[4..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((kind, data))
    })
}

fn cstr(data: &[u8]) -> String {
    let end = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

fn tcmsg(ifindex: u32, handle: u32, parent: u32, info: u32) -> Vec<u8> {
    let mut b = vec![0u8; 4]; // family AF_UNSPEC, padding
    b.extend_from_slice(&ifindex.to_ne_bytes());
    b.extend_from_slice(&handle.to_ne_bytes());
    b.extend_from_slice(&parent.to_ne_bytes());
    b.extend_from_slice(&info.to_ne_bytes());
    b
}

/// `tcm_info` of our filters: priority in the upper half, protocol (network order) below.
fn filter_info() -> u32 {
    (u32::from(PRIO) << 16) | u32::from(ETH_P_ALL.to_be())
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("netlink: {what}"))
}

/// Whether `e` says that the device does not exist.
pub(crate) fn is_no_device(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENODEV)
}

/// Whether `e` says that the filter (or its qdisc or priority) is not there.
fn is_absent(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::EINVAL))
}

impl TcSocket {
    /// Opens a socket in the calling thread's network namespace.
    pub(crate) fn open() -> io::Result<TcSocket> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        Ok(TcSocket { sock, seq: 0 })
    }

    /// Sends one request and collects the payloads of its replies (up to the ACK, or up to
    /// NLMSG_DONE for a dump). An error reply becomes the matching `io::Error`.
    pub(crate) fn request(
        &mut self,
        kind: u16,
        flags: u16,
        body: &[u8],
    ) -> io::Result<Vec<(u16, Vec<u8>)>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let flags = NLM_F_REQUEST | flags | if dump { 0 } else { NLM_F_ACK };
        let mut msg = Vec::with_capacity(NLMSG_HDR + body.len());
        msg.extend_from_slice(&((NLMSG_HDR + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        self.sock.send_to(&msg, &SocketAddr::new(0, 0), 0)?;

        let mut replies = Vec::new();
        loop {
            let (buf, _) = self.sock.recv_from_full()?;
            let mut rest = &buf[..];
            while rest.len() >= NLMSG_HDR {
                let len = u32_at(rest, 0).ok_or_else(|| invalid("short header"))? as usize;
                if len < NLMSG_HDR || len > rest.len() {
                    return Err(invalid("bad message length"));
                }
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                let msg_seq = u32_at(rest, 8).ok_or_else(|| invalid("short header"))?;
                let payload = &rest[NLMSG_HDR..len];
                rest = &rest[len.next_multiple_of(4).min(rest.len())..];
                if msg_seq != seq {
                    continue; // a late reply to an earlier request
                }
                match kind {
                    NLMSG_ERROR => {
                        let code = u32_at(payload, 0).ok_or_else(|| invalid("short error"))? as i32;
                        if code != 0 {
                            return Err(io::Error::from_raw_os_error(-code));
                        }
                        return Ok(replies);
                    }
                    NLMSG_DONE => return Ok(replies),
                    _ => replies.push((kind, payload.to_vec())),
                }
            }
        }
    }

    /// The name of device `ifindex`; `None` if there is no such device.
    pub(crate) fn link_name(&mut self, ifindex: u32) -> io::Result<Option<String>> {
        let mut body = vec![0u8; IFINFOMSG];
        body[4..8].copy_from_slice(&ifindex.to_ne_bytes());
        let replies = match self.request(RTM_GETLINK, 0, &body) {
            Ok(r) => r,
            Err(e) if is_no_device(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        for (kind, payload) in replies {
            if kind != RTM_NEWLINK || payload.len() < IFINFOMSG {
                continue;
            }
            if let Some((_, name)) = attrs(&payload[IFINFOMSG..]).find(|(k, _)| *k == IFLA_IFNAME) {
                return Ok(Some(cstr(name)));
            }
        }
        Err(invalid("RTM_GETLINK reply without a name"))
    }

    /// The ifindexes of all devices of the namespace.
    pub(crate) fn link_indexes(&mut self) -> io::Result<BTreeSet<u32>> {
        let body = vec![0u8; IFINFOMSG];
        let replies = self.request(RTM_GETLINK, NLM_F_DUMP, &body)?;
        Ok(replies
            .iter()
            .filter(|(kind, _)| *kind == RTM_NEWLINK)
            .filter_map(|(_, p)| u32_at(p, 4))
            .collect())
    }

    /// Adds the clsact qdisc to `ifindex` unless it has one.
    pub(crate) fn add_clsact(&mut self, ifindex: u32) -> io::Result<()> {
        let mut body = tcmsg(ifindex, CLSACT_HANDLE, TC_H_CLSACT, 0);
        put_attr(&mut body, TCA_KIND, b"clsact\0");
        match self.request(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL, &body) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Deletes the clsact qdisc of `ifindex` (with every filter on it). No qdisc or no device:
    /// Ok.
    pub(crate) fn del_clsact(&mut self, ifindex: u32) -> io::Result<()> {
        let body = tcmsg(ifindex, CLSACT_HANDLE, TC_H_CLSACT, 0);
        match self.request(RTM_DELQDISC, 0, &body) {
            Ok(_) => Ok(()),
            Err(e) if is_absent(&e) || is_no_device(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Puts the program `prog_fd` (named `name`) as a direct-action filter at our place of
    /// `ifindex`/`hook`.
    pub(crate) fn set_filter(
        &mut self,
        ifindex: u32,
        hook: Hook,
        prog_fd: i32,
        name: &str,
        mode: SetMode,
    ) -> io::Result<()> {
        let mut body = tcmsg(ifindex, HANDLE, hook.parent(), filter_info());
        put_attr(&mut body, TCA_KIND, b"bpf\0");
        let mut opts = Vec::new();
        put_attr(&mut opts, TCA_BPF_FD, &prog_fd.to_ne_bytes());
        let mut cname = name.as_bytes().to_vec();
        cname.push(0);
        put_attr(&mut opts, TCA_BPF_NAME, &cname);
        put_attr(
            &mut opts,
            TCA_BPF_FLAGS,
            &TCA_BPF_FLAG_ACT_DIRECT.to_ne_bytes(),
        );
        put_attr(&mut body, TCA_OPTIONS, &opts);
        let flags = match mode {
            SetMode::Ensure => NLM_F_CREATE,
            SetMode::Replace => 0,
        };
        self.request(RTM_NEWTFILTER, flags, &body).map(drop)
    }

    /// The filter at our place of `ifindex`/`hook`, if it is a `bpf` one. No filter, no qdisc:
    /// `None`; no device: `ENODEV`.
    pub(crate) fn get_filter(
        &mut self,
        ifindex: u32,
        hook: Hook,
    ) -> io::Result<Option<FilterInfo>> {
        let body = tcmsg(ifindex, HANDLE, hook.parent(), filter_info());
        let replies = match self.request(RTM_GETTFILTER, 0, &body) {
            Ok(r) => r,
            Err(e) if is_absent(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(replies
            .iter()
            .filter(|(kind, p)| *kind == RTM_NEWTFILTER && p.len() >= TCMSG)
            .find_map(|(_, p)| parse_bpf_filter(&p[TCMSG..])))
    }

    /// Deletes the filter at our place of `ifindex`/`hook`. Returns whether there was one; no
    /// device: `ENODEV`.
    pub(crate) fn del_filter(&mut self, ifindex: u32, hook: Hook) -> io::Result<bool> {
        let body = tcmsg(ifindex, HANDLE, hook.parent(), filter_info());
        match self.request(RTM_DELTFILTER, 0, &body) {
            Ok(_) => Ok(true),
            Err(e) if is_absent(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether `ifindex` has filters other than ours in either direction (no device, no qdisc:
    /// false).
    pub(crate) fn has_other_filters(&mut self, ifindex: u32) -> io::Result<bool> {
        for hook in [Hook::Ingress, Hook::Egress] {
            let body = tcmsg(ifindex, 0, hook.parent(), 0);
            let replies = match self.request(RTM_GETTFILTER, NLM_F_DUMP, &body) {
                Ok(r) => r,
                Err(e) if is_absent(&e) || is_no_device(&e) => continue,
                Err(e) => return Err(e),
            };
            for (kind, p) in &replies {
                if *kind != RTM_NEWTFILTER {
                    continue;
                }
                let (Some(handle), Some(info)) = (u32_at(p, 8), u32_at(p, 16)) else {
                    continue;
                };
                let prio = (info >> 16) as u16;
                // A dump lists each priority once with handle 0, then its filters.
                if prio != PRIO || (handle != 0 && handle != HANDLE) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}

/// The name and program id of a `bpf` filter, from the attributes after its tcmsg.
fn parse_bpf_filter(buf: &[u8]) -> Option<FilterInfo> {
    let mut is_bpf = false;
    let mut info = None;
    for (kind, data) in attrs(buf) {
        match kind {
            TCA_KIND => is_bpf = cstr(data) == "bpf",
            TCA_OPTIONS => {
                let mut name = String::new();
                let mut prog_id = None;
                for (k, d) in attrs(data) {
                    match k {
                        TCA_BPF_NAME => name = cstr(d),
                        TCA_BPF_ID => prog_id = u32_at(d, 0),
                        _ => {}
                    }
                }
                info = prog_id.map(|prog_id| FilterInfo { name, prog_id });
            }
            _ => {}
        }
    }
    info.filter(|_| is_bpf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip() {
        let mut opts = Vec::new();
        put_attr(&mut opts, TCA_BPF_NAME, b"port_ingress\0");
        put_attr(&mut opts, TCA_BPF_ID, &42u32.to_ne_bytes());
        let mut buf = Vec::new();
        put_attr(&mut buf, TCA_KIND, b"bpf\0");
        put_attr(&mut buf, TCA_OPTIONS, &opts);
        assert_eq!(
            parse_bpf_filter(&buf),
            Some(FilterInfo {
                name: "port_ingress".into(),
                prog_id: 42
            })
        );
        let mut other = Vec::new();
        put_attr(&mut other, TCA_KIND, b"flower\0");
        put_attr(&mut other, TCA_OPTIONS, &opts);
        assert_eq!(parse_bpf_filter(&other), None);
    }

    #[test]
    fn filter_info_has_priority_and_all_protocols() {
        assert_eq!(filter_info() & 0xffff, u32::from(ETH_P_ALL.to_be()));
        assert_eq!(filter_info() >> 16, u32::from(PRIO));
    }
}
