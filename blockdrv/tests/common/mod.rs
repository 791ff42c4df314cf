//! What the NBD tests share: a client that speaks the protocol byte by byte over any stream, to
//! send what well-behaved clients do not (nbd_clients.rs), to walk the option haggling around
//! STARTTLS (nbd_tls.rs, which adds the TLS upgrade) and to leave in the middle of a request
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

/// A client that speaks the protocol byte by byte over any stream (simple replies, and
/// structured chunks read one at a time).
pub struct Raw<S: Read + Write = UnixStream> {
    pub s: S,
}

impl Raw<UnixStream> {
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

    pub fn connected(sock: &Path, export: &str) -> Raw {
        let mut r = Raw::hello(sock);
        assert_eq!(r.go(export), proto::REP_ACK);
        r
    }
}

/// `NBD_OPT_GO` (or `INFO`) data for `export`, no info requests.
pub fn go_data(export: &str) -> Vec<u8> {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

/// `NBD_OPT_SET_META_CONTEXT` (or `LIST_`) data: `base:allocation` for `export`.
pub fn meta_data(export: &str) -> Vec<u8> {
    let q = proto::BASE_ALLOCATION;
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&(q.len() as u32).to_be_bytes());
    d.extend_from_slice(q.as_bytes());
    d
}

impl<S: Read + Write> Raw<S> {
    pub fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
        self.s.flush().unwrap();
    }

    /// Reads one option reply: (type, data).
    pub fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let (_, kind, d) = self.any_option_reply();
        (kind, d)
    }

    /// Reads one option reply, which must answer `option`: (type, data).
    pub fn answer_to(&mut self, option: u32) -> (u32, Vec<u8>) {
        let (answers, kind, d) = self.any_option_reply();
        assert_eq!(answers, option, "the reply's option");
        (kind, d)
    }

    fn any_option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let (h, d) = self.frame();
        assert_eq!(&h[..8], &proto::REPLY_MAGIC.to_be_bytes());
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        (option, kind, d)
    }

    /// A 20-byte header whose last 4 bytes are the length of the data that follows (an option
    /// reply, a structured reply chunk), and that data.
    fn frame(&mut self) -> ([u8; 20], Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).unwrap();
        (h, d)
    }

    /// Sends `option` and returns the type of its (single) reply.
    pub fn ask(&mut self, option: u32, data: &[u8]) -> u32 {
        self.option(option, data);
        self.answer_to(option).0
    }

    /// `NBD_OPT_GO` for `export`: the reply type that ended it (ACK or an error).
    pub fn go(&mut self, export: &str) -> u32 {
        self.option(proto::OPT_GO, &go_data(export));
        loop {
            let (kind, _) = self.answer_to(proto::OPT_GO);
            if kind != proto::REP_INFO {
                return kind;
            }
        }
    }

    /// `NBD_OPT_LIST`: the export names.
    pub fn list(&mut self) -> Vec<String> {
        self.option(proto::OPT_LIST, &[]);
        let mut names = Vec::new();
        loop {
            match self.answer_to(proto::OPT_LIST) {
                (proto::REP_SERVER, d) => {
                    let n = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
                    names.push(String::from_utf8(d[4..4 + n].to_vec()).unwrap());
                }
                (proto::REP_ACK, _) => return names,
                (other, _) => panic!("LIST answered {other:#x}"),
            }
        }
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

    /// One structured reply chunk: (type, cookie, payload).
    pub fn chunk(&mut self) -> (u16, u64, Vec<u8>) {
        let (h, d) = self.frame();
        assert_eq!(&h[..4], &proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
        let kind = u16::from_be_bytes(h[6..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        (kind, cookie, d)
    }

    /// A write of `data` and its simple reply's error.
    pub fn write(&mut self, cookie: u64, offset: u64, data: &[u8], flags: u16) -> u32 {
        self.send(Cmd::Write, flags, cookie, offset, data.len() as u32);
        self.s.write_all(data).unwrap();
        let (e, c, _) = self.reply(0);
        assert_eq!(c, cookie);
        e
    }

    /// Whether the server closed the connection: EOF or an error (a TLS alert) after whatever
    /// it still sent; a read timing out means the connection is still up.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 256];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) => {
                    use std::io::ErrorKind::{TimedOut, WouldBlock};
                    return !matches!(e.kind(), WouldBlock | TimedOut);
                }
            }
        }
    }
}
