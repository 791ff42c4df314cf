//! The nftables ruleset generation of a namespace (`NFT_MSG_GETGEN` over nfnetlink): a number
//! the kernel bumps at every committed change to any table there. Comparing it with the one
//! seen right after vpcd wrote its own tables tells whether anything changed since (a table
//! deleted or edited by hand) without listing and parsing the ruleset.

use netlink_sys::{constants::NETLINK_NETFILTER, Socket, SocketAddr};

use crate::{Error, Netns, Result};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NFTA_GEN_ID: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;

fn failed(reason: impl std::fmt::Display) -> Error {
    Error::Netlink {
        op: "get",
        what: "nftables generation".into(),
        reason: reason.to_string(),
    }
}

/// The `NFT_MSG_GETGEN` request.
fn request(seq: u32) -> Vec<u8> {
    let len = (NLMSG_HDRLEN + NFGENMSG_LEN) as u32;
    let mut b = Vec::with_capacity(len as usize);
    b.extend_from_slice(&len.to_ne_bytes());
    b.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN).to_ne_bytes());
    b.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family AF_UNSPEC, version NFNETLINK_V0, resource id 0.
    b.extend_from_slice(&[0, 0, 0, 0]);
    b
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The generation id in the kernel's answer (`NFT_MSG_NEWGEN` with `NFTA_GEN_ID`).
fn parse(reply: &[u8]) -> Result<u32> {
    let len = u32_at(reply, 0).ok_or_else(|| failed("short reply"))? as usize;
    let kind = u16_at(reply, 4).ok_or_else(|| failed("short reply"))?;
    let msg = reply.get(..len).ok_or_else(|| failed("truncated reply"))?;
    if kind == NLMSG_ERROR {
        let errno = u32_at(msg, NLMSG_HDRLEN).map_or(0, |e| -(e as i32));
        return Err(failed(std::io::Error::from_raw_os_error(errno)));
    }
    if kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN {
        return Err(failed(format!("unexpected message type {kind:#x}")));
    }
    // Attributes: 2-byte length (header included), 2-byte type (value in network order),
    // padded to 4 bytes.
    let mut at = NLMSG_HDRLEN + NFGENMSG_LEN;
    while at + 4 <= msg.len() {
        let alen = u16_at(msg, at).ok_or_else(|| failed("bad attribute"))? as usize;
        let atype = u16_at(msg, at + 2).ok_or_else(|| failed("bad attribute"))? & 0x3fff;
        if alen < 4 {
            break;
        }
        if atype == NFTA_GEN_ID {
            let v = msg
                .get(at + 4..at + 8)
                .ok_or_else(|| failed("short generation id"))?;
            return Ok(u32::from_be_bytes(v.try_into().expect("4 bytes")));
        }
        at += (alen + 3) & !3;
    }
    Err(failed("no generation id in the reply"))
}

/// The current nftables ruleset generation of `netns`.
pub fn generation(netns: &Netns) -> Result<u32> {
    netns.run(|| {
        let mut s = Socket::new(NETLINK_NETFILTER).map_err(failed)?;
        s.bind_auto().map_err(failed)?;
        s.connect(&SocketAddr::new(0, 0)).map_err(failed)?;
        s.send(&request(1), 0).map_err(failed)?;
        let mut buf = vec![0u8; 4096];
        let n = s.recv(&mut &mut buf[..], 0).map_err(failed)?;
        parse(&buf[..n])
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newgen_reply_gives_its_id_and_an_error_reply_its_errno() {
        let mut ok = Vec::new();
        let len = (NLMSG_HDRLEN + NFGENMSG_LEN + 8) as u32;
        ok.extend_from_slice(&len.to_ne_bytes());
        ok.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN).to_ne_bytes());
        ok.extend_from_slice(&[0; 10]);
        ok.extend_from_slice(&[0; 4]);
        ok.extend_from_slice(&8u16.to_ne_bytes());
        ok.extend_from_slice(&NFTA_GEN_ID.to_ne_bytes());
        ok.extend_from_slice(&1234u32.to_be_bytes());
        assert_eq!(parse(&ok).unwrap(), 1234);

        let mut err = Vec::new();
        err.extend_from_slice(&36u32.to_ne_bytes());
        err.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err.extend_from_slice(&[0; 10]);
        err.extend_from_slice(&(-1i32).to_ne_bytes());
        err.extend_from_slice(&[0; 16]);
        let e = parse(&err).unwrap_err().to_string();
        assert!(e.contains("nftables generation"), "{e}");
        assert!(parse(&ok[..10]).is_err());
    }

    #[test]
    fn the_generation_moves_when_a_table_changes() {
        // Needs root (a namespace of its own); the CI runs as root.
        struct Gone(&'static str);
        impl Drop for Gone {
            fn drop(&mut self) {
                let _ = Netns::delete_named(self.0);
            }
        }
        let name = "vpcd-nftgen-test";
        let _gone = Gone(name);
        let ns = Netns::create_named(name).unwrap();
        let run = |args: &[&str]| {
            let mut cmd = std::process::Command::new("nft");
            cmd.args(args);
            ns.enter_in_child(&mut cmd);
            assert!(cmd.status().unwrap().success(), "nft {args:?}");
        };
        let g0 = generation(&ns).unwrap();
        assert_eq!(generation(&ns).unwrap(), g0, "moved without a change");
        run(&["add", "table", "ip", "t"]);
        let g1 = generation(&ns).unwrap();
        assert_ne!(g1, g0);
        run(&["delete", "table", "ip", "t"]);
        assert_ne!(generation(&ns).unwrap(), g1);
    }
}
