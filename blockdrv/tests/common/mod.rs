//! What the NBD tests share: a client that speaks the protocol byte by byte, to send what
//! well-behaved clients do not (nbd_clients.rs) and to leave in the middle of a request
//! (raft_cluster.rs). Each test crate uses what it needs of it.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use blockdrv::nbd::proto::{self, Command as Cmd, Request};

/// What `nbdinfo --list` says of the server and of every export (a file's, a replicated
/// volume's).
pub const FEATURES: [&str; 12] = [
    "newstyle-fixed",
    "structured",
    "base:allocation",
    "can_multi_conn: true",
    "can_flush: true",
    "can_fua: true",
    "can_trim: true",
    "can_zero: true",
    "can_fast_zero: true",
    "can_cache: true",
    "is_read_only: false",
    "block_size_maximum: 33554432",
];

/// A client that speaks the protocol byte by byte (simple replies, no structured ones).
pub struct Raw {
    pub s: UnixStream,
}

impl Raw {
    /// Connects and does the handshake up to (not including) the first option.
    pub fn hello(sock: &Path) -> Raw {
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        assert_eq!(greeting, proto::greeting());
        s.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes())
            .unwrap();
        Raw { s }
    }

    pub fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// Reads one option reply: (type, data).
    pub fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(&h[..8], &proto::REPLY_MAGIC.to_be_bytes());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).unwrap();
        (kind, d)
    }

    /// `NBD_OPT_GO` for `export`: the reply type that ended it (ACK or an error).
    pub fn go(&mut self, export: &str) -> u32 {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(proto::OPT_GO, &d);
        loop {
            let (kind, _) = self.option_reply();
            if kind != proto::REP_INFO {
                return kind;
            }
        }
    }

    pub fn connected(sock: &Path, export: &str) -> Raw {
        let mut r = Raw::hello(sock);
        assert_eq!(r.go(export), proto::REP_ACK);
        r
    }

    pub fn send(&mut self, command: Cmd, flags: u16, cookie: u64, offset: u64, length: u32) {
        let req = Request {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        self.s.write_all(&req.encode()).unwrap();
    }

    /// A simple reply: (error, cookie), then `data` bytes of data if it succeeded.
    pub fn reply(&mut self, data: usize) -> (u32, u64, Vec<u8>) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(&h[..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
        let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let mut d = vec![0u8; if error == 0 { data } else { 0 }];
        self.s.read_exact(&mut d).unwrap();
        (error, cookie, d)
    }

    pub fn write(&mut self, cookie: u64, offset: u64, data: &[u8], flags: u16) -> u32 {
        self.send(Cmd::Write, flags, cookie, offset, data.len() as u32);
        self.s.write_all(data).unwrap();
        let (e, c, _) = self.reply(0);
        assert_eq!(c, cookie);
        e
    }

    /// One structured reply chunk: (type, cookie, payload).
    pub fn chunk(&mut self) -> (u16, u64, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(&h[..4], &proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
        let kind = u16::from_be_bytes(h[6..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).unwrap();
        (kind, cookie, d)
    }

    /// Whether the server closed the connection (reads EOF).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}
