//! The NBD protocol (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md), the
//! fixed-newstyle handshake and the transmission phase, as pure parse and encode functions on
//! byte buffers: no I/O, no knowledge of what serves the data. `server.rs` drives it.
//!
//! Every multi-byte field is big-endian. Parsing checks magic numbers and lengths and returns a
//! [`ProtoError`] saying what the peer did wrong; what to answer to it is the server's choice.
//!
//! TLS (`NBD_OPT_STARTTLS`): [`TlsState::gate`] says, per option, whether to serve it, refuse it
//! (`NBD_REP_ERR_TLS_REQD` before the upgrade in forced-TLS mode), close, or start TLS now; the
//! server does the TLS handshake itself.

use std::fmt;

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: sent by the server after [`NBD_MAGIC`], and at the start of each option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic of an option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of a request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// The magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

/// Info types (in `NBD_OPT_INFO` / `NBD_OPT_GO`).
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
const CMD_FLAGS_KNOWN: u16 =
    CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;

/// Structured reply chunk types and flags.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// `base:allocation` status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
/// The one metadata context this server knows.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Error values on the wire (Linux errno numbers, as the protocol defines them).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Longest export name or metadata query the server accepts (the protocol's limit is 4096).
pub const MAX_STRING: usize = 4096;
/// Longest option payload the server reads; longer ones are answered `TOO_BIG` unread... and the
/// connection closes, since skipping that much is not worth it.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;

/// Length of a request header.
pub const REQUEST_LEN: usize = 28;

/// What the peer got wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("bad magic {0:#x}")]
    Magic(u64),
    #[error("unknown client flags {0:#x}")]
    ClientFlags(u32),
    #[error("malformed option {option}: {what}")]
    Option { option: u32, what: String },
    #[error("unknown command flags {0:#x}")]
    CommandFlags(u16),
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// The client's flags; unknown bits, or a client without fixed newstyle, end the handshake.
pub fn parse_client_flags(b: [u8; 4]) -> Result<u32, ProtoError> {
    let f = u32::from_be_bytes(b);
    if f & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 || f & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(ProtoError::ClientFlags(f));
    }
    Ok(f)
}

/// An option header: (option, length of its data).
pub fn parse_option_header(b: [u8; 16]) -> Result<(u32, u32), ProtoError> {
    let magic = be64(&b);
    if magic != IHAVEOPT {
        return Err(ProtoError::Magic(magic));
    }
    Ok((be32(&b[8..]), be32(&b[12..])))
}

/// The request of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

/// The request of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// A reader over option data that reports what is missing by option.
struct Fields<'a> {
    option: u32,
    data: &'a [u8],
}

impl<'a> Fields<'a> {
    fn err(&self, what: impl Into<String>) -> ProtoError {
        ProtoError::Option {
            option: self.option,
            what: what.into(),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ProtoError> {
        if self.data.len() < n {
            return Err(self.err(format!("{what} truncated")));
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }

    fn u16(&mut self, what: &str) -> Result<u16, ProtoError> {
        self.take(2, what).map(be16)
    }

    fn u32(&mut self, what: &str) -> Result<u32, ProtoError> {
        self.take(4, what).map(be32)
    }

    /// A string with a 32-bit length in front.
    fn string(&mut self, what: &str) -> Result<String, ProtoError> {
        let n = self.u32(what)? as usize;
        if n > MAX_STRING {
            return Err(self.err(format!("{what} longer than {MAX_STRING} bytes")));
        }
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err(format!("{what} is not UTF-8")))
    }

    fn end(&self) -> Result<(), ProtoError> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(self.err(format!("{} trailing bytes", self.data.len())))
        }
    }
}

pub fn parse_info_request(option: u32, data: &[u8]) -> Result<InfoRequest, ProtoError> {
    let mut f = Fields { option, data };
    let name = f.string("export name")?;
    let n = f.u16("number of info requests")?;
    let infos = (0..n)
        .map(|_| f.u16("info request"))
        .collect::<Result<_, _>>()?;
    f.end()?;
    Ok(InfoRequest { name, infos })
}

pub fn parse_meta_request(option: u32, data: &[u8]) -> Result<MetaRequest, ProtoError> {
    let mut f = Fields { option, data };
    let export = f.string("export name")?;
    let n = f.u32("number of queries")?;
    let mut queries = Vec::new();
    for _ in 0..n {
        queries.push(f.string("query")?);
    }
    f.end()?;
    Ok(MetaRequest { export, queries })
}

/// Whether a metadata query selects `base:allocation` (the exact name, or its namespace).
pub fn selects_base_allocation(query: &str) -> bool {
    query == BASE_ALLOCATION || query == "base:"
}

/// An option reply.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// An error reply with a message for humans.
pub fn option_error(option: u32, kind: u32, message: &str) -> Vec<u8> {
    option_reply(option, kind, message.as_bytes())
}

/// Where a connection stands with TLS (the spec's "TLS support": this server runs NOTLS or
/// FORCEDTLS, never SELECTIVETLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsState {
    /// The server has no TLS: `NBD_OPT_STARTTLS` is refused by policy, everything else goes.
    Off,
    /// FORCEDTLS before the upgrade: only `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` are served.
    Required,
    /// The connection runs over TLS; negotiation has started over inside it.
    Established,
}

/// What the handshake does with an option, given the connection's [`TlsState`], before (or
/// instead of) serving it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsGate {
    /// Serve the option as usual.
    Pass,
    /// Send this error reply and read the next option.
    Refuse(Vec<u8>),
    /// Send this `NBD_REP_ACK`, then run the TLS handshake on the connection; once it is done
    /// the state is [`TlsState::Established`] and negotiation starts over: nothing negotiated
    /// before (structured replies, metadata contexts) carries over.
    StartTls(Vec<u8>),
    /// Close the connection: `NBD_OPT_EXPORT_NAME` before TLS, which has no error reply.
    Close,
}

impl TlsState {
    /// The state a new connection starts in: [`TlsState::Required`] if the server has TLS.
    pub fn new(server_has_tls: bool) -> TlsState {
        if server_has_tls {
            TlsState::Required
        } else {
            TlsState::Off
        }
    }

    /// Decides what to do with option `option` carrying `data`.
    pub fn gate(self, option: u32, data: &[u8]) -> TlsGate {
        let refuse = |kind, msg: &str| TlsGate::Refuse(option_error(option, kind, msg));
        match (self, option) {
            (TlsState::Off, OPT_STARTTLS) => refuse(REP_ERR_POLICY, "TLS is not configured"),
            (TlsState::Established, OPT_STARTTLS) => refuse(REP_ERR_INVALID, "TLS is already on"),
            (TlsState::Required, OPT_STARTTLS) if !data.is_empty() => {
                refuse(REP_ERR_INVALID, "STARTTLS takes no data")
            }
            (TlsState::Required, OPT_STARTTLS) => {
                TlsGate::StartTls(option_reply(option, REP_ACK, &[]))
            }
            (TlsState::Required, OPT_ABORT) => TlsGate::Pass,
            (TlsState::Required, OPT_EXPORT_NAME) => TlsGate::Close,
            (TlsState::Required, _) => refuse(
                REP_ERR_TLS_REQD,
                "this server requires TLS: send NBD_OPT_STARTTLS first",
            ),
            (TlsState::Off | TlsState::Established, _) => TlsGate::Pass,
        }
    }
}

/// `NBD_REP_SERVER` data for `NBD_OPT_LIST`.
pub fn server_entry(name: &str, description: &str) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(description.as_bytes());
    b
}

/// `NBD_INFO_EXPORT` data.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = INFO_EXPORT.to_be_bytes().to_vec();
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

/// `NBD_INFO_NAME` / `NBD_INFO_DESCRIPTION` data.
pub fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut b = kind.to_be_bytes().to_vec();
    b.extend_from_slice(s.as_bytes());
    b
}

/// `NBD_INFO_BLOCK_SIZE` data.
pub fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [minimum, preferred, maximum] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b
}

/// `NBD_REP_META_CONTEXT` data.
pub fn meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut b = id.to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags, and no zeroes if the client
/// said so.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = size.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        b.extend_from_slice(&[0u8; 124]);
    }
    b
}

/// A command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Other(u16),
}

impl Command {
    pub fn from_wire(c: u16) -> Command {
        match c {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Other(other),
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Other(c) => write!(f, "command {c}"),
            c => write!(f, "{c:?}"),
        }
    }
}

/// A request header (a WRITE's data follows it on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    /// Parses a request header. A bad magic is fatal (the stream is out of step); unknown flags
    /// are reported too, but the request is still whole (the server answers EINVAL).
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Request, ProtoError> {
        let magic = be32(b);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::Magic(magic.into()));
        }
        Ok(Request {
            flags: be16(&b[4..]),
            command: Command::from_wire(be16(&b[6..])),
            cookie: be64(&b[8..]),
            offset: be64(&b[16..]),
            length: be32(&b[24..]),
        })
    }

    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Flags this server does not know.
    pub fn unknown_flags(&self) -> u16 {
        self.flags & !CMD_FLAGS_KNOWN
    }

    /// Known flags that the protocol gives no meaning on this command (`NO_HOLE` and
    /// `FAST_ZERO` but on `WRITE_ZEROES`, `DF` but on `READ`, `REQ_ONE` but on
    /// `BLOCK_STATUS`); `FUA` means nothing on some commands but is harmless on any.
    pub fn misplaced_flags(&self) -> u16 {
        let only = |flag: u16, on: Command| if self.command == on { 0 } else { flag };
        self.flags
            & (only(CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO, Command::WriteZeroes)
                | only(CMD_FLAG_DF, Command::Read)
                | only(CMD_FLAG_REQ_ONE, Command::BlockStatus))
    }

    /// Bytes of data that follow this header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::Write {
            self.length
        } else {
            0
        }
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        let c = match self.command {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Disc => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::Cache => CMD_CACHE,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::BlockStatus => CMD_BLOCK_STATUS,
            Command::Other(c) => c,
        };
        b[6..8].copy_from_slice(&c.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// A simple reply header (a READ's data follows it).
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header; `length` bytes of payload follow.
pub fn chunk_header(cookie: u64, flags: u16, kind: u16, length: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// A whole `NBD_REPLY_TYPE_ERROR` chunk (the last of its reply).
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(4096)];
    let mut b = chunk_header(
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        6 + msg.len() as u32,
    )
    .to_vec();
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg);
    b
}

/// A whole `NBD_REPLY_TYPE_BLOCK_STATUS` chunk: (length, flags) descriptors of context `id`.
pub fn block_status_chunk(cookie: u64, id: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut b = chunk_header(
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        4 + 8 * extents.len() as u32,
    )
    .to_vec();
    b.extend_from_slice(&id.to_be_bytes());
    for (len, flags) in extents {
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_is_nbdmagic_ihaveopt_and_fixed_newstyle_without_zeroes() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(be16(&g[16..]), 3);
    }

    #[test]
    fn flags_are_misplaced_on_commands_that_give_them_no_meaning() {
        let req = |command, flags| Request {
            flags,
            command,
            cookie: 0,
            offset: 0,
            length: 0,
        };
        let zeroes = CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO | CMD_FLAG_FUA;
        assert_eq!(req(Command::WriteZeroes, zeroes).misplaced_flags(), 0);
        assert_eq!(req(Command::Read, CMD_FLAG_DF).misplaced_flags(), 0);
        assert_eq!(
            req(Command::BlockStatus, CMD_FLAG_REQ_ONE).misplaced_flags(),
            0
        );
        assert_eq!(req(Command::Flush, CMD_FLAG_FUA).misplaced_flags(), 0);
        assert_eq!(
            req(Command::Write, zeroes).misplaced_flags(),
            CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO
        );
        assert_eq!(
            req(Command::Trim, CMD_FLAG_DF).misplaced_flags(),
            CMD_FLAG_DF
        );
        assert_eq!(
            req(Command::Read, CMD_FLAG_REQ_ONE).misplaced_flags(),
            CMD_FLAG_REQ_ONE
        );
    }

    #[test]
    fn client_flags_need_fixed_newstyle_and_nothing_unknown() {
        assert_eq!(parse_client_flags([0, 0, 0, 3]), Ok(3));
        assert!(parse_client_flags([0, 0, 0, 0]).is_err(), "old newstyle");
        assert_eq!(
            parse_client_flags([0, 0, 0, 5]),
            Err(ProtoError::ClientFlags(5))
        );
    }

    #[test]
    fn info_request_round_trip_and_truncation_named() {
        let mut d = Vec::new();
        d.extend_from_slice(&4u32.to_be_bytes());
        d.extend_from_slice(b"disk");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        let r = parse_info_request(OPT_GO, &d).unwrap();
        assert_eq!(r.name, "disk");
        assert_eq!(r.infos, [INFO_BLOCK_SIZE, INFO_NAME]);
        for n in 0..d.len() {
            let e = parse_info_request(OPT_GO, &d[..n]).unwrap_err();
            assert!(e.to_string().contains("truncated"), "{n}: {e}");
        }
        let mut long = d.clone();
        long.push(0);
        assert!(parse_info_request(OPT_GO, &long)
            .unwrap_err()
            .to_string()
            .contains("trailing"));
        // A name length beyond the data, and beyond the limit.
        let mut big = (u32::MAX).to_be_bytes().to_vec();
        big.extend_from_slice(b"x");
        assert!(parse_info_request(OPT_INFO, &big).is_err());
    }

    #[test]
    fn meta_request_parses_queries() {
        let mut d = Vec::new();
        d.extend_from_slice(&0u32.to_be_bytes());
        d.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "qemu:dirty-bitmap:x"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        let r = parse_meta_request(OPT_SET_META_CONTEXT, &d).unwrap();
        assert_eq!(r.export, "");
        assert_eq!(r.queries.len(), 2);
        assert!(selects_base_allocation(&r.queries[0]));
        assert!(!selects_base_allocation(&r.queries[1]));
        // A count of queries larger than the data is truncation, not an allocation.
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_request(OPT_LIST_META_CONTEXT, &d).is_err());
    }

    #[test]
    fn requests_round_trip_and_bad_magic_is_fatal() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            command: Command::Write,
            cookie: 0x1122_3344_5566_7788,
            offset: 4096,
            length: 512,
        };
        let b = r.encode();
        assert_eq!(Request::parse(&b), Ok(r));
        assert_eq!(r.payload_len(), 512);
        assert_eq!(r.unknown_flags(), 0);
        let mut bad = b;
        bad[0] ^= 1;
        assert!(matches!(Request::parse(&bad), Err(ProtoError::Magic(_))));
        let odd = Request {
            flags: 1 << 9,
            command: Command::Other(42),
            ..r
        };
        let parsed = Request::parse(&odd.encode()).unwrap();
        assert_eq!(parsed.command, Command::Other(42));
        assert_eq!(parsed.unknown_flags(), 1 << 9);
        assert_eq!(parsed.payload_len(), 0);
    }

    /// The reply type of a gate's reply, and that it answers `option`.
    fn reply_kind(option: u32, r: &[u8]) -> u32 {
        assert_eq!(be64(r), REPLY_MAGIC);
        assert_eq!(be32(&r[8..]), option, "a reply to the option asked");
        assert_eq!(be32(&r[16..]) as usize, r.len() - 20);
        be32(&r[12..])
    }

    /// Every option this server knows, and one it does not.
    const OPTIONS: [u32; 10] = [
        OPT_EXPORT_NAME,
        OPT_ABORT,
        OPT_LIST,
        OPT_STARTTLS,
        OPT_INFO,
        OPT_GO,
        OPT_STRUCTURED_REPLY,
        OPT_LIST_META_CONTEXT,
        OPT_SET_META_CONTEXT,
        77,
    ];

    #[test]
    fn forced_tls_refuses_every_option_but_starttls_and_abort_with_tls_reqd() {
        let s = TlsState::new(true);
        assert_eq!(s, TlsState::Required);
        for o in OPTIONS {
            match (o, s.gate(o, &[0, 0, 0, 0])) {
                (OPT_ABORT, g) => assert_eq!(g, TlsGate::Pass),
                (OPT_EXPORT_NAME, g) => assert_eq!(g, TlsGate::Close, "no error reply exists"),
                (OPT_STARTTLS, TlsGate::Refuse(r)) => {
                    assert_eq!(reply_kind(o, &r), REP_ERR_INVALID, "STARTTLS with data")
                }
                (_, TlsGate::Refuse(r)) => {
                    assert_eq!(reply_kind(o, &r), REP_ERR_TLS_REQD, "option {o}");
                    assert!(r.len() > 20, "a message for humans");
                }
                (o, g) => panic!("option {o}: {g:?}"),
            }
        }
    }

    #[test]
    fn starttls_is_acked_once_and_invalid_after_the_upgrade() {
        let TlsGate::StartTls(ack) = TlsState::Required.gate(OPT_STARTTLS, &[]) else {
            panic!("STARTTLS refused in FORCEDTLS");
        };
        assert_eq!(reply_kind(OPT_STARTTLS, &ack), REP_ACK);
        assert_eq!(ack.len(), 20, "an ACK has no data");
        let TlsGate::Refuse(r) = TlsState::Established.gate(OPT_STARTTLS, &[]) else {
            panic!("STARTTLS twice");
        };
        assert_eq!(reply_kind(OPT_STARTTLS, &r), REP_ERR_INVALID);
    }

    #[test]
    fn after_the_upgrade_and_without_tls_nothing_is_tls_reqd() {
        for s in [TlsState::Established, TlsState::Off] {
            for o in OPTIONS.into_iter().filter(|o| *o != OPT_STARTTLS) {
                assert_eq!(s.gate(o, &[]), TlsGate::Pass, "{s:?}, option {o}");
            }
        }
    }

    #[test]
    fn starttls_without_tls_configured_is_refused_by_policy() {
        assert_eq!(TlsState::new(false), TlsState::Off);
        for data in [&[][..], &[1, 2]] {
            let TlsGate::Refuse(r) = TlsState::Off.gate(OPT_STARTTLS, data) else {
                panic!("STARTTLS accepted without TLS");
            };
            assert_eq!(reply_kind(OPT_STARTTLS, &r), REP_ERR_POLICY);
        }
    }

    #[test]
    fn replies_have_their_magics_and_lengths() {
        let s = simple_reply(7, EINVAL);
        assert_eq!(be32(&s), SIMPLE_REPLY_MAGIC);
        assert_eq!(be32(&s[4..]), EINVAL);
        assert_eq!(be64(&s[8..]), 7);
        let e = error_chunk(9, EIO, "bad");
        assert_eq!(be32(&e), STRUCTURED_REPLY_MAGIC);
        assert_eq!(be16(&e[4..]), REPLY_FLAG_DONE);
        assert_eq!(be16(&e[6..]), REPLY_TYPE_ERROR);
        assert_eq!(be32(&e[16..]) as usize, e.len() - 20);
        let bs = block_status_chunk(9, 1, &[(4096, 0), (8192, STATE_HOLE | STATE_ZERO)]);
        assert_eq!(be32(&bs[16..]), 4 + 16);
        assert_eq!(be32(&bs[32..]), 8192);
        assert_eq!(be32(&bs[36..]), STATE_HOLE | STATE_ZERO);
        let r = option_reply(OPT_GO, REP_ACK, &[]);
        assert_eq!(be64(&r), REPLY_MAGIC);
        assert_eq!(r.len(), 20);
        assert_eq!(export_name_reply(1, 3, false).len(), 8 + 2 + 124);
        assert_eq!(export_name_reply(1, 3, true).len(), 10);
    }
}
