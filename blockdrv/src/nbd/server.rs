//! The async NBD server: the handshake (fixed newstyle; options `EXPORT_NAME`, `ABORT`, `LIST`,
//! `INFO`, `GO`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and `SET_META_CONTEXT` with
//! `base:allocation`) and the transmission phase (`READ`, `WRITE`, `FLUSH`, `TRIM`, `CACHE`,
//! `WRITE_ZEROES` with `NO_HOLE` and `FAST_ZERO`, `BLOCK_STATUS`, `DISC`; `FUA`), over any byte
//! stream: unix sockets and TCP.
//!
//! TLS (optional, [`Server::with_tls`]): the server is then in the spec's forced-TLS mode. Until
//! the client sends `NBD_OPT_STARTTLS`, every option but `STARTTLS` and `ABORT` is refused with
//! `NBD_REP_ERR_TLS_REQD` (`EXPORT_NAME` closes the connection); after the ACK the connection is
//! wrapped in a rustls server stream (whatever the stream: unix, TCP) and option haggling starts
//! over inside TLS, with nothing negotiated before it kept. `proto::TlsState` makes these
//! decisions; this file only does the TLS handshake.
//!
//! A connection's requests run concurrently (up to [`IN_FLIGHT`], and up to [`BYTES_IN_FLIGHT`]
//! of their data until their replies are written: a client that sends many requests of the
//! largest size, or does not read its replies, waits rather than fills the server's memory, as
//! with qemu-nbd, which stops reading requests while its replies wait): the reader task reads a
//! request (and a write's data), hands it to a task of its own, and the replies go through one
//! writer, each written whole. A reply is sent only when its operation is done, so a write is
//! acknowledged only once the volume has it; `DISC` (or the client going away) waits for the
//! requests in flight. On a socket without TLS, large reads from a volume that keeps its bytes
//! in a file go out with `sendfile` from that file ([`Volume::read_sendable`]), not through a
//! buffer.
//!
//! Peer errors: a bad magic or malformed handshake closes the connection; a bad request (unknown
//! command or flags, out of range, too long) gets an NBD error and the connection goes on, except
//! a write whose data is longer than [`MAX_PAYLOAD`] (answered `EOVERFLOW`, then the connection
//! ends: its data cannot be skipped).

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::proto::{self, Command, Request, TlsGate, TlsState};
use super::tls::{TlsConfig, TlsError};
use crate::volume::{FileRegion, Sendable, Volume};

/// Requests of one connection executed at the same time.
pub const IN_FLIGHT: usize = 64;
/// Most bytes of data (written, or to be read) of one connection's requests in flight.
pub const BYTES_IN_FLIGHT: u32 = 64 << 20;
/// Largest READ or WRITE (the block-size maximum the server announces).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Block sizes announced: any alignment works, 4 KiB is preferred.
const MIN_BLOCK: u32 = 1;
const PREFERRED_BLOCK: u32 = 4096;
/// Most extents in one block-status reply.
const MAX_EXTENTS: usize = 1024;
/// The id of `base:allocation` once set.
const BASE_ALLOCATION_ID: u32 = 1;

/// A volume under a name.
#[derive(Debug, Clone)]
pub struct Export {
    pub name: String,
    pub description: String,
    pub volume: Arc<dyn Volume>,
    pub read_only: bool,
}

impl Export {
    /// The longest READ or WRITE this export takes.
    fn max_request(&self) -> u32 {
        self.volume.max_request().min(MAX_PAYLOAD)
    }

    fn flags(&self) -> u16 {
        let mut f = proto::FLAG_HAS_FLAGS
            | proto::FLAG_SEND_FLUSH
            | proto::FLAG_SEND_FUA
            | proto::FLAG_SEND_TRIM
            | proto::FLAG_SEND_WRITE_ZEROES
            | proto::FLAG_SEND_DF
            | proto::FLAG_CAN_MULTI_CONN
            | proto::FLAG_SEND_CACHE;
        if self.volume.fast_zero() {
            f |= proto::FLAG_SEND_FAST_ZERO;
        }
        if self.read_only {
            f |= proto::FLAG_READ_ONLY;
        }
        f
    }
}

/// How long a client has from connecting to the end of its handshake (option haggling, TLS
/// included), as qemu-nbd's `--handshake-limit` by default.
pub const HANDSHAKE_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// What a failed connection did.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("protocol: {0}")]
    Proto(#[from] proto::ProtoError),
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
    #[error("{0}")]
    Closed(String),
}

/// Finds an export the server's table does not hold when a client names it (a replicated
/// volume this node holds no replica of, served through the nodes that do). Each lookup gives
/// a new export, which the connection keeps; lists (`NBD_OPT_LIST`) show the table and what
/// [`Resolve::list`] names besides.
#[async_trait::async_trait]
pub trait Resolve: Send + Sync + std::fmt::Debug {
    async fn resolve(&self, name: &str) -> Option<Export>;

    /// The names (and descriptions) of the exports `resolve` would find now, as far as they
    /// can be learned: for `NBD_OPT_LIST`, which lists the table's own first.
    async fn list(&self) -> Vec<(String, String)>;
}

/// The NBD server of a set of exports (which may change while it serves: connections already in
/// transmission keep their export).
#[derive(Debug, Clone)]
pub struct Server {
    exports: Arc<std::sync::RwLock<BTreeMap<String, Export>>>,
    /// Where names the table does not hold are looked up (shared by the server's clones).
    resolver: Arc<std::sync::RwLock<Option<Arc<dyn Resolve>>>>,
    /// The export the empty name stands for.
    default: Option<String>,
    /// With TLS: connections must upgrade with `NBD_OPT_STARTTLS` before anything else.
    tls: Option<Arc<rustls::ServerConfig>>,
}

/// The state negotiated for one connection.
#[derive(Debug, Clone)]
struct Session {
    export: Export,
    structured: bool,
    base_allocation: bool,
    /// Large reads go out from the volume's file (`sendfile`), when it has one.
    send_files: bool,
}

/// The exports a connection's client named during its handshake, by name.
#[derive(Default)]
struct Named(Vec<(String, Option<Export>)>);

impl Named {
    async fn export(&mut self, server: &Server, name: &str) -> Option<Export> {
        if let Some((_, e)) = self.0.iter().find(|(n, _)| n == name) {
            return e.clone();
        }
        let e = server.export(name).await;
        self.0.push((name.to_string(), e.clone()));
        e
    }
}

/// How option haggling ended.
#[derive(Debug)]
enum Negotiated {
    /// On to transmission with this session.
    Transmission(Session),
    /// The client sent `NBD_OPT_ABORT` (and got its ACK).
    Aborted,
    /// `NBD_OPT_STARTTLS` was acknowledged: the TLS handshake comes next.
    StartTls,
}

impl Server {
    pub fn new(exports: Vec<Export>) -> Server {
        Server {
            exports: Arc::new(std::sync::RwLock::new(
                exports.into_iter().map(|e| (e.name.clone(), e)).collect(),
            )),
            resolver: Arc::default(),
            default: None,
            tls: None,
        }
    }

    /// Requires TLS on every connection (forced TLS), with the certificates of `tls`.
    pub fn with_tls(mut self, tls: &TlsConfig) -> Result<Server, TlsError> {
        self.tls = Some(tls.load()?);
        Ok(self)
    }

    /// Adds (or replaces) an export.
    pub fn add(&self, export: Export) {
        self.exports
            .write()
            .unwrap()
            .insert(export.name.clone(), export);
    }

    /// Removes an export (new connections no longer find it).
    pub fn remove(&self, name: &str) {
        self.exports.write().unwrap().remove(name);
    }

    /// Lets the empty export name (`nbd+unix:///?socket=...`, QEMU's default) mean `name`.
    pub fn with_default(mut self, name: &str) -> Server {
        self.default = Some(name.to_string());
        self
    }

    /// Looks names up in `resolver` too (and in every clone of this server) when the table
    /// does not hold them.
    pub fn set_resolver(&self, resolver: Arc<dyn Resolve>) {
        *self.resolver.write().unwrap() = Some(resolver);
    }

    async fn export(&self, name: &str) -> Option<Export> {
        let name = match (name, &self.default) {
            ("", Some(d)) => d.as_str(),
            (n, _) => n,
        };
        if let Some(e) = self.exports.read().unwrap().get(name) {
            return Some(e.clone());
        }
        let resolver = self.resolver.read().unwrap().clone();
        match resolver {
            Some(r) if !name.is_empty() => r.resolve(name).await,
            _ => None,
        }
    }

    /// What `NBD_OPT_LIST` shows: the table's exports, then those the resolver names that
    /// the table does not hold, each set by name.
    async fn list(&self) -> Vec<(String, String)> {
        let table: Vec<(String, String)> = self
            .exports
            .read()
            .unwrap()
            .values()
            .map(|e| (e.name.clone(), e.description.clone()))
            .collect();
        let resolver = self.resolver.read().unwrap().clone();
        let Some(r) = resolver else { return table };
        let mut more = r.list().await;
        more.retain(|(n, _)| !table.iter().any(|(t, _)| t == n));
        more.sort();
        more.dedup_by(|a, b| a.0 == b.0);
        table.into_iter().chain(more).collect()
    }

    /// Serves the connections of `listener` until it fails.
    pub async fn serve_unix(self, listener: tokio::net::UnixListener) -> io::Result<()> {
        loop {
            let (stream, _) = listener.accept().await?;
            self.spawn(stream);
        }
    }

    /// Serves the connections of `listener` until it fails.
    pub async fn serve_tcp(self, listener: tokio::net::TcpListener) -> io::Result<()> {
        loop {
            let (stream, peer) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tracing::debug!(%peer, "NBD connection");
            self.spawn(stream);
        }
    }

    /// Serves a socket's connection in a task of its own; reads from files go out with
    /// `sendfile` (the socket's descriptor, duplicated, is kept for it until the end).
    fn spawn<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + AsFd + Unpin + Send + 'static,
    {
        let server = self.clone();
        tokio::spawn(async move {
            let socket = match stream.as_fd().try_clone_to_owned() {
                Ok(fd) => Some(Arc::new(fd)),
                Err(e) => {
                    tracing::warn!("reads will be copied: no socket descriptor: {e}");
                    None
                }
            };
            if let Err(e) = server.serve(stream, socket).await {
                tracing::info!("NBD connection ended: {e}");
            }
        });
    }

    /// Serves one connection to its end.
    pub async fn serve_connection<S>(&self, stream: S) -> Result<(), ConnError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.serve(stream, None).await
    }

    /// Serves one connection; `socket`: its descriptor, for sending reads from files with
    /// `sendfile` while there is no TLS on it.
    async fn serve<S>(&self, mut stream: S, socket: Option<Arc<OwnedFd>>) -> Result<(), ConnError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // The handshake, TLS's included, ends within HANDSHAKE_LIMIT: a client that connects
        // and says nothing holds no task and descriptor for ever.
        let deadline = tokio::time::Instant::now() + HANDSHAKE_LIMIT;
        let by = |what: &'static str| {
            move |_| ConnError::Closed(format!("{what}: not done within {HANDSHAKE_LIMIT:?}"))
        };
        let opening = async {
            stream.write_all(&proto::greeting()).await?;
            let mut flags = [0u8; 4];
            stream.read_exact(&mut flags).await?;
            let client = proto::parse_client_flags(flags)?;
            let no_zeroes = client & proto::FLAG_C_NO_ZEROES != 0;
            let state = TlsState::new(self.tls.is_some());
            let negotiated = self.negotiate(&mut stream, no_zeroes, state).await?;
            Ok::<_, ConnError>((no_zeroes, negotiated))
        };
        let (no_zeroes, negotiated) = tokio::time::timeout_at(deadline, opening)
            .await
            .map_err(by("the handshake"))??;
        match negotiated {
            Negotiated::Transmission(session) => transmission(stream, session, socket).await,
            Negotiated::Aborted => Ok(()),
            Negotiated::StartTls => {
                // (Acknowledged only when the server has TLS.)
                let Some(config) = self.tls.clone() else {
                    return Err(ConnError::Closed("STARTTLS without TLS".into()));
                };
                let accepted = tokio_rustls::TlsAcceptor::from(config).accept(stream);
                let mut stream = tokio::time::timeout_at(deadline, accepted)
                    .await
                    .map_err(by("the TLS handshake"))?
                    .map_err(ConnError::Tls)?;
                tracing::debug!("TLS established");
                let negotiating = self.negotiate(&mut stream, no_zeroes, TlsState::Established);
                match tokio::time::timeout_at(deadline, negotiating)
                    .await
                    .map_err(by("the handshake"))??
                {
                    Negotiated::Transmission(session) => transmission(stream, session, None).await,
                    Negotiated::Aborted => {
                        // close_notify: whoever ends a TLS session shuts TLS down first.
                        let _ = stream.shutdown().await;
                        Ok(())
                    }
                    Negotiated::StartTls => Err(ConnError::Closed("STARTTLS inside TLS".into())),
                }
            }
        }
    }

    /// Option haggling, from the first option (again, inside TLS, after `STARTTLS`), and its
    /// last replies flushed: a TLS stream keeps what the socket did not take at once until it
    /// is flushed.
    async fn negotiate<S>(
        &self,
        s: &mut S,
        no_zeroes: bool,
        tls: TlsState,
    ) -> Result<Negotiated, ConnError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let negotiated = self.haggle(s, no_zeroes, tls).await?;
        s.flush().await?;
        Ok(negotiated)
    }

    /// The options, up to the one that ends the haggling. The replies to one option are
    /// flushed before the next is read.
    async fn haggle<S>(
        &self,
        s: &mut S,
        no_zeroes: bool,
        tls: TlsState,
    ) -> Result<Negotiated, ConnError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut structured = false;
        // `base:allocation` selected, and for which export name: a client that goes on to
        // another export has no context there (as nbdkit: the contexts are the export's).
        let mut base_allocation: Option<String> = None;
        let selected_for = |b: &Option<String>, name: &str| b.as_deref() == Some(name);
        // The exports named so far: a client names its export up to three times (meta
        // contexts, INFO, GO), looked up once.
        let mut named = Named::default();
        loop {
            s.flush().await?;
            let mut hdr = [0u8; 16];
            s.read_exact(&mut hdr).await?;
            let (option, len) = proto::parse_option_header(hdr)?;
            if len > proto::MAX_OPTION_DATA {
                let reply =
                    proto::option_error(option, proto::REP_ERR_TOO_BIG, "option data too long");
                s.write_all(&reply).await?;
                s.flush().await?;
                return Err(ConnError::Closed(format!(
                    "option {option} with {len} bytes of data"
                )));
            }
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data).await?;
            match tls.gate(option, &data) {
                TlsGate::Pass => {}
                TlsGate::Refuse(reply) => {
                    s.write_all(&reply).await?;
                    continue;
                }
                TlsGate::StartTls(ack) => {
                    s.write_all(&ack).await?;
                    return Ok(Negotiated::StartTls);
                }
                TlsGate::Close => {
                    return Err(ConnError::Closed(
                        "EXPORT_NAME before STARTTLS (TLS is required)".into(),
                    ))
                }
            }
            let reply = |kind: u32, d: &[u8]| proto::option_reply(option, kind, d);
            let invalid = |what: &str| proto::option_error(option, proto::REP_ERR_INVALID, what);
            match option {
                proto::OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data).into_owned();
                    let Some(export) = named.export(self, &name).await else {
                        // The protocol has no error reply here: the connection closes.
                        return Err(ConnError::Closed(format!("unknown export {name:?}")));
                    };
                    let r =
                        proto::export_name_reply(export.volume.size(), export.flags(), no_zeroes);
                    s.write_all(&r).await?;
                    return Ok(Negotiated::Transmission(Session {
                        export: export.clone(),
                        structured,
                        base_allocation: selected_for(&base_allocation, &name),
                        send_files: false,
                    }));
                }
                proto::OPT_ABORT => {
                    s.write_all(&reply(proto::REP_ACK, &[])).await?;
                    return Ok(Negotiated::Aborted);
                }
                proto::OPT_LIST => {
                    if !data.is_empty() {
                        s.write_all(&invalid("LIST takes no data")).await?;
                        continue;
                    }
                    for (name, description) in self.list().await {
                        let entry = proto::server_entry(&name, &description);
                        s.write_all(&reply(proto::REP_SERVER, &entry)).await?;
                    }
                    s.write_all(&reply(proto::REP_ACK, &[])).await?;
                }
                proto::OPT_INFO | proto::OPT_GO => {
                    let req = match proto::parse_info_request(option, &data) {
                        Ok(r) => r,
                        Err(e) => {
                            s.write_all(&invalid(&e.to_string())).await?;
                            continue;
                        }
                    };
                    let Some(export) = named.export(self, &req.name).await else {
                        let msg = format!("no export {:?}", req.name);
                        let r = proto::option_error(option, proto::REP_ERR_UNKNOWN, &msg);
                        s.write_all(&r).await?;
                        continue;
                    };
                    let mut infos = vec![proto::info_export(export.volume.size(), export.flags())];
                    for i in &req.infos {
                        match *i {
                            proto::INFO_NAME => {
                                infos.push(proto::info_string(proto::INFO_NAME, &export.name))
                            }
                            proto::INFO_DESCRIPTION => infos.push(proto::info_string(
                                proto::INFO_DESCRIPTION,
                                &export.description,
                            )),
                            proto::INFO_BLOCK_SIZE => infos.push(proto::info_block_size(
                                MIN_BLOCK,
                                PREFERRED_BLOCK,
                                export.max_request(),
                            )),
                            _ => {}
                        }
                    }
                    for d in infos {
                        s.write_all(&reply(proto::REP_INFO, &d)).await?;
                    }
                    s.write_all(&reply(proto::REP_ACK, &[])).await?;
                    if option == proto::OPT_GO {
                        return Ok(Negotiated::Transmission(Session {
                            export: export.clone(),
                            structured,
                            base_allocation: selected_for(&base_allocation, &req.name),
                            send_files: false,
                        }));
                    }
                }
                proto::OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        s.write_all(&invalid("STRUCTURED_REPLY takes no data"))
                            .await?;
                    } else if structured {
                        s.write_all(&invalid("structured replies are already on"))
                            .await?;
                    } else {
                        structured = true;
                        s.write_all(&reply(proto::REP_ACK, &[])).await?;
                    }
                }
                proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                    let set = option == proto::OPT_SET_META_CONTEXT;
                    if set && !structured {
                        s.write_all(&invalid("SET_META_CONTEXT needs structured replies"))
                            .await?;
                        continue;
                    }
                    let req = match proto::parse_meta_request(option, &data) {
                        Ok(r) => r,
                        Err(e) => {
                            s.write_all(&invalid(&e.to_string())).await?;
                            continue;
                        }
                    };
                    if named.export(self, &req.export).await.is_none() {
                        let msg = format!("no export {:?}", req.export);
                        let r = proto::option_error(option, proto::REP_ERR_UNKNOWN, &msg);
                        s.write_all(&r).await?;
                        continue;
                    }
                    let selected = (!set && req.queries.is_empty())
                        || req
                            .queries
                            .iter()
                            .any(|q| proto::selects_base_allocation(q));
                    if selected {
                        let id = if set { BASE_ALLOCATION_ID } else { 0 };
                        let ctx = proto::meta_context(id, proto::BASE_ALLOCATION);
                        s.write_all(&reply(proto::REP_META_CONTEXT, &ctx)).await?;
                    }
                    if set {
                        base_allocation = selected.then(|| req.export.clone());
                    }
                    s.write_all(&reply(proto::REP_ACK, &[])).await?;
                }
                // (STARTTLS never gets here: the TLS gate above answers it.)
                other => {
                    let r = proto::option_error(other, proto::REP_ERR_UNSUP, "unsupported option");
                    s.write_all(&r).await?;
                }
            }
        }
    }
}

/// The transmission phase of a connection; `socket`: the connection's own socket (no TLS on
/// it), to which reads from files are sent with `sendfile`.
async fn transmission<S>(
    stream: S,
    mut session: Session,
    socket: Option<Arc<OwnedFd>>,
) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tracing::debug!(export = %session.export.name, structured = session.structured, "transmission");
    session.send_files = socket.is_some();
    let session = Arc::new(session);
    let (mut rd, mut wr) = tokio::io::split(stream);
    // Each reply with its request's share of the byte budget, given back once it is written (a
    // read's data is held until then).
    let (tx, mut rx) = mpsc::channel::<(Reply, OwnedSemaphorePermit)>(IN_FLIGHT);
    let writer = tokio::spawn(async move {
        let written = async {
            while let Some((reply, _held)) = rx.recv().await {
                reply.write_to(&mut wr, socket.as_ref()).await?;
                // Replies already waiting go out before the flush, which a TLS stream needs:
                // what the socket did not take at once stays in its buffer until then.
                while let Ok((reply, _held)) = rx.try_recv() {
                    reply.write_to(&mut wr, socket.as_ref()).await?;
                }
                wr.flush().await?;
            }
            wr.shutdown().await
        }
        .await;
        // A reply cut off (its header sent, its data not: a file that could not be read, a
        // peer that took nothing for SEND_STALL) leaves the stream unusable: the connection
        // ends, for the peer and for the reader, rather than the peer waiting for the rest.
        if written.is_err() {
            if let Some(s) = &socket {
                let _ = crate::sys::shutdown(s.as_fd());
            }
        }
        written
    });
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    // In KiB.
    let budget = BYTES_IN_FLIGHT >> 10;
    let bytes = Arc::new(Semaphore::new(budget as usize));
    let result = loop {
        let mut hdr = [0u8; proto::REQUEST_LEN];
        match rd.read_exact(&mut hdr).await {
            Ok(_) => {}
            // The client went away between requests.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e.into()),
        }
        let req = match Request::parse(&hdr) {
            Ok(r) => r,
            Err(e) => break Err(e.into()),
        };
        if req.command == Command::Disc {
            break Ok(());
        }
        // Taken before a write's data is read. (A read longer than the budget, which is larger
        // than any request taken, is refused when it runs.)
        let data = match req.command {
            Command::Read => req.length,
            _ => req.payload_len(),
        };
        let kib = data.div_ceil(1024).min(budget);
        let held = bytes
            .clone()
            .acquire_many_owned(kib)
            .await
            .expect("never closed");
        let payload = match req.payload_len() {
            0 => None,
            n if n > session.export.max_request() => {
                // Its data is not read: the connection cannot go on, and ends once this
                // error (the spec's EOVERFLOW for a request over the maximum) and the replies
                // in flight are sent.
                let why = format!(
                    "write of {n} bytes (at most {})",
                    session.export.max_request()
                );
                let refused = reply(&session, &req, Err((proto::EOVERFLOW, why.clone())));
                let _ = tx.send((refused, held)).await;
                break Err(ConnError::Closed(why));
            }
            n => {
                // Read into spare capacity: zeroing a buffer about to be filled costs ~7% of a
                // replicated node's CPU on large writes.
                let mut data = Vec::with_capacity(n as usize);
                match (&mut rd).take(n.into()).read_to_end(&mut data).await {
                    Ok(got) if got == n as usize => Some(data),
                    // Cut off mid-request: nothing of it was acknowledged.
                    Ok(_) => break Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                    Err(e) => break Err(e.into()),
                }
            }
        };
        let slot = slots.clone().acquire_owned().await.expect("never closed");
        let (tx, session) = (tx.clone(), session.clone());
        tokio::spawn(async move {
            let reply = reply(&session, &req, execute(&session, &req, payload).await);
            let _ = tx.send((reply, held)).await;
            drop(slot);
        });
    };
    // Requests in flight finish and are answered before the connection closes.
    let _all = slots.acquire_many(IN_FLIGHT as u32).await;
    drop(tx);
    match writer.await {
        Ok(Err(e)) => {
            tracing::info!(export = %session.export.name, "replies not sent: {e}");
            result.and(Err(e.into()))
        }
        _ => result,
    }
}

/// What a request produced.
enum Outcome {
    Done,
    Data(bytes::Bytes),
    /// Read data to send from a file.
    Region(FileRegion),
    Extents(Vec<(u32, u32)>),
}

/// An NBD error: the errno on the wire and a message (structured replies carry it).
type Failure = (u32, String);

fn io_failure(what: &str, e: &io::Error) -> Failure {
    let errno = match e.raw_os_error() {
        Some(libc::ENOSPC) => proto::ENOSPC,
        Some(libc::EPERM | libc::EACCES | libc::EROFS) => proto::EPERM,
        Some(libc::EOPNOTSUPP) => proto::ENOTSUP,
        Some(libc::ENOMEM) => proto::ENOMEM,
        _ => proto::EIO,
    };
    (errno, format!("{what}: {e}"))
}

/// Checks a request against the export; what to answer if it is bad.
fn check(s: &Session, r: &Request) -> Result<(), Failure> {
    if r.unknown_flags() != 0 {
        return Err((
            proto::EINVAL,
            format!("unknown flags {:#x}", r.unknown_flags()),
        ));
    }
    if r.misplaced_flags() != 0 {
        return Err((
            proto::EINVAL,
            format!(
                "flags {:#x} mean nothing on {:?}",
                r.misplaced_flags(),
                r.command
            ),
        ));
    }
    let writes = matches!(
        r.command,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    match r.command {
        Command::Other(c) => return Err((proto::EINVAL, format!("unknown command {c}"))),
        Command::BlockStatus if !s.base_allocation => {
            return Err((proto::EINVAL, "no metadata context negotiated".into()))
        }
        _ if writes && s.export.read_only => {
            return Err((proto::EPERM, "the export is read-only".into()))
        }
        Command::Read if r.length > s.export.max_request() => {
            return Err((
                proto::EINVAL,
                format!(
                    "read of {} bytes (at most {})",
                    r.length,
                    s.export.max_request()
                ),
            ))
        }
        Command::WriteZeroes
            if r.has(proto::CMD_FLAG_FAST_ZERO) && !s.export.volume.fast_zero() =>
        {
            return Err((proto::ENOTSUP, "zeroing is not fast here".into()))
        }
        _ => {}
    }
    if r.command != Command::Flush {
        let size = s.export.volume.size();
        let end = r.offset.checked_add(u64::from(r.length));
        if end.is_none_or(|e| e > size) {
            let errno = if writes { proto::ENOSPC } else { proto::EINVAL };
            return Err((
                errno,
                format!(
                    "{} of {} bytes at {} is beyond the end ({size})",
                    r.command, r.length, r.offset
                ),
            ));
        }
    }
    if r.command == Command::BlockStatus && r.length == 0 {
        return Err((proto::EINVAL, "block status of 0 bytes".into()));
    }
    Ok(())
}

async fn execute(s: &Session, r: &Request, payload: Option<Vec<u8>>) -> Result<Outcome, Failure> {
    check(s, r)?;
    let v = &s.export.volume;
    let fua = r.has(proto::CMD_FLAG_FUA);
    let (off, len) = (r.offset, u64::from(r.length));
    match r.command {
        Command::Read if s.send_files && r.length as usize >= COPY_DATA_BELOW => {
            match v.read_sendable(off, r.length).await {
                Ok(Sendable::Region(region)) => Ok(Outcome::Region(region)),
                Ok(Sendable::Data(data)) => Ok(Outcome::Data(data)),
                Err(e) => Err(e),
            }
            .map_err(|e| io_failure("read", &e))
        }
        Command::Read => v
            .read(off, r.length)
            .await
            .map(|d| Outcome::Data(d.into()))
            .map_err(|e| io_failure("read", &e)),
        Command::Write => {
            let data = payload.unwrap_or_default();
            v.write(off, data, fua)
                .await
                .map(|_| Outcome::Done)
                .map_err(|e| io_failure("write", &e))
        }
        Command::Flush => v
            .flush()
            .await
            .map(|_| Outcome::Done)
            .map_err(|e| io_failure("flush", &e)),
        Command::Trim => v
            .trim(off, len, fua)
            .await
            .map(|_| Outcome::Done)
            .map_err(|e| io_failure("trim", &e)),
        Command::WriteZeroes => v
            .write_zeroes(off, len, r.has(proto::CMD_FLAG_NO_HOLE), fua)
            .await
            .map(|_| Outcome::Done)
            .map_err(|e| io_failure("write zeroes", &e)),
        Command::Cache => v
            .cache(off, len)
            .await
            .map(|_| Outcome::Done)
            .map_err(|e| io_failure("cache", &e)),
        Command::BlockStatus => {
            let extents = v
                .extents(off, len)
                .await
                .map_err(|e| io_failure("block status", &e))?;
            let one = r.has(proto::CMD_FLAG_REQ_ONE);
            let mut out = Vec::new();
            for e in extents {
                let flags = if e.hole { proto::STATE_HOLE } else { 0 }
                    | if e.zero { proto::STATE_ZERO } else { 0 };
                // Descriptor lengths have 32 bits; longer runs are cut (the client asks on).
                let length = u32::try_from(e.length).unwrap_or(!0xfff);
                out.push((length, flags));
                if one || out.len() == MAX_EXTENTS || length as u64 != e.length {
                    break;
                }
            }
            Ok(Outcome::Extents(out))
        }
        Command::Disc | Command::Other(_) => unreachable!("checked before"),
    }
}

/// The reply to one request: its header (a simple reply, or chunks) and, for a read, the data
/// that follows, kept in the buffer it was read into or, from a file, sent from there.
struct Reply {
    head: Vec<u8>,
    data: bytes::Bytes,
    file: Option<FileRegion>,
}

/// A peer that takes none of a read's data for this long loses its connection.
const SEND_STALL: std::time::Duration = std::time::Duration::from_secs(60);

/// Read data up to this size is copied after its header (one write); larger data is written
/// from its own buffer (copying a megabyte costs more than a second write).
const COPY_DATA_BELOW: usize = 64 << 10;

impl Reply {
    fn new(head: Vec<u8>, data: bytes::Bytes) -> Reply {
        if data.len() < COPY_DATA_BELOW {
            let mut head = head;
            head.extend_from_slice(&data);
            return Reply::bare(head);
        }
        Reply {
            head,
            data,
            file: None,
        }
    }

    fn bare(head: Vec<u8>) -> Reply {
        Reply {
            head,
            data: bytes::Bytes::new(),
            file: None,
        }
    }

    /// Writes the reply to `w`; data from a file goes to `socket` (`w`'s socket) with
    /// `sendfile`, on a blocking thread, once the header is out.
    async fn write_to<W: AsyncWrite + Unpin>(
        self,
        w: &mut W,
        socket: Option<&Arc<OwnedFd>>,
    ) -> io::Result<()> {
        w.write_all(&self.head).await?;
        w.write_all(&self.data).await?;
        let Some(region) = self.file else {
            return Ok(());
        };
        let socket = socket
            .cloned()
            .ok_or_else(|| io::Error::other("data from a file without a socket to send it to"))?;
        w.flush().await?;
        tokio::task::spawn_blocking(move || {
            crate::sys::send_file(
                socket.as_fd(),
                &region.file,
                region.offset,
                region.len as usize,
                SEND_STALL,
            )
            .map_err(|e| {
                let what = format!("read of {} bytes at {}: {e}", region.len, region.offset);
                io::Error::new(e.kind(), what)
            })
        })
        .await
        .map_err(io::Error::other)?
    }

    #[cfg(test)]
    fn bytes(&self) -> Vec<u8> {
        [&self.head[..], &self.data[..]].concat()
    }
}

/// The header of the one data chunk of a structured reply to a read.
fn data_chunk_head(cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut head = Vec::with_capacity(28);
    head.extend_from_slice(&proto::chunk_header(
        cookie,
        proto::REPLY_FLAG_DONE,
        proto::REPLY_TYPE_OFFSET_DATA,
        8 + len,
    ));
    head.extend_from_slice(&offset.to_be_bytes());
    head
}

/// The reply to a request, simple or structured.
fn reply(s: &Session, r: &Request, outcome: Result<Outcome, Failure>) -> Reply {
    let cookie = r.cookie;
    match (outcome, s.structured) {
        (Ok(Outcome::Done), false) => Reply::bare(proto::simple_reply(cookie, 0).to_vec()),
        (Ok(Outcome::Done), true) => Reply::bare(
            proto::chunk_header(cookie, proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, 0).to_vec(),
        ),
        (Ok(Outcome::Data(d)), false) => Reply::new(proto::simple_reply(cookie, 0).to_vec(), d),
        (Ok(Outcome::Region(f)), false) => Reply {
            file: Some(f),
            ..Reply::bare(proto::simple_reply(cookie, 0).to_vec())
        },
        (Ok(Outcome::Region(f)), true) => Reply {
            head: data_chunk_head(cookie, r.offset, f.len),
            file: Some(f),
            data: bytes::Bytes::new(),
        },
        // An empty read has no data chunk (its data may not be empty).
        (Ok(Outcome::Data(d)), true) if d.is_empty() => Reply::bare(
            proto::chunk_header(cookie, proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, 0).to_vec(),
        ),
        (Ok(Outcome::Data(d)), true) => {
            Reply::new(data_chunk_head(cookie, r.offset, d.len() as u32), d)
        }
        (Ok(Outcome::Extents(e)), _) => {
            Reply::bare(proto::block_status_chunk(cookie, BASE_ALLOCATION_ID, &e))
        }
        (Err((errno, msg)), false) => {
            tracing::debug!(command = %r.command, errno, "{msg}");
            Reply::bare(proto::simple_reply(cookie, errno).to_vec())
        }
        (Err((errno, msg)), true) => {
            tracing::debug!(command = %r.command, errno, "{msg}");
            Reply::bare(proto::error_chunk(cookie, errno, &msg))
        }
    }
}

/// Runs one connection of a server with a 64 KiB memory export `m` (also the default) on
/// `input` as everything the client sends, and returns what the server sent. For the
/// robustness test below and the fuzz target: whatever the input, this returns (no panic, no
/// hang).
pub async fn run_transcript(input: &[u8]) -> Vec<u8> {
    transcript(memory_server(), input).await
}

/// A server with a 64 KiB memory export `m`, also the default.
fn memory_server() -> Server {
    let volume = Arc::new(crate::volume::MemVolume::new(64 << 10));
    Server::new(vec![Export {
        name: "m".into(),
        description: String::new(),
        volume,
        read_only: false,
    }])
    .with_default("m")
}

/// What `server` sends on a connection where the client sends `input`, then hangs up.
async fn transcript(server: Server, input: &[u8]) -> Vec<u8> {
    let (mut client, conn) = tokio::io::duplex(1 << 16);
    let task = tokio::spawn(async move {
        let _ = server.serve_connection(conn).await;
    });
    let (mut rd, mut wr) = tokio::io::split(&mut client);
    let send = async {
        let _ = wr.write_all(input).await;
        let _ = wr.shutdown().await;
    };
    let mut out = Vec::new();
    let recv = rd.read_to_end(&mut out);
    let _ = tokio::join!(send, recv);
    let _ = task.await;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Option `o` with data `d`, as a client sends it.
    fn opt(b: &mut Vec<u8>, o: u32, d: &[u8]) {
        b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&o.to_be_bytes());
        b.extend_from_slice(&(d.len() as u32).to_be_bytes());
        b.extend_from_slice(d);
    }

    /// The client's flags, as the first bytes of a session.
    fn client_flags() -> Vec<u8> {
        (proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES)
            .to_be_bytes()
            .to_vec()
    }

    /// A whole well-formed session: flags, STRUCTURED_REPLY, SET_META_CONTEXT, GO, then a
    /// write, a read, a block status, a trim, a flush and DISC.
    fn session() -> Vec<u8> {
        let mut b = client_flags();
        opt(&mut b, proto::OPT_STRUCTURED_REPLY, &[]);
        let mut meta = 0u32.to_be_bytes().to_vec();
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&(proto::BASE_ALLOCATION.len() as u32).to_be_bytes());
        meta.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
        opt(&mut b, proto::OPT_SET_META_CONTEXT, &meta);
        let mut go = 1u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"m");
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
        opt(&mut b, proto::OPT_GO, &go);
        let req = |b: &mut Vec<u8>, command, flags, offset, length| {
            let r = Request {
                flags,
                command,
                cookie: b.len() as u64,
                offset,
                length,
            };
            b.extend_from_slice(&r.encode());
        };
        req(&mut b, Command::Write, proto::CMD_FLAG_FUA, 512, 16);
        b.extend_from_slice(&[0x42; 16]);
        req(&mut b, Command::Read, 0, 512, 16);
        req(&mut b, Command::BlockStatus, 0, 0, 4096);
        req(&mut b, Command::Trim, 0, 0, 4096);
        req(
            &mut b,
            Command::WriteZeroes,
            proto::CMD_FLAG_FAST_ZERO,
            0,
            512,
        );
        req(&mut b, Command::Flush, 0, 0, 0);
        req(&mut b, Command::Disc, 0, 0, 0);
        b
    }

    /// A read sent from a file that turns out shorter than the read (its header is out, its
    /// data cannot follow) ends the connection: the client reads the end, it does not wait.
    #[tokio::test]
    async fn a_read_cut_off_after_its_header_ends_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.img");
        let volume = crate::volume::FileVolume::open(&path, 1 << 20).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(64 << 10)
            .unwrap();
        let server = Server::new(vec![Export {
            name: "f".into(),
            description: String::new(),
            volume: Arc::new(volume),
            read_only: false,
        }]);
        let (mut client, conn) = tokio::net::UnixStream::pair().unwrap();
        server.spawn(conn);
        let mut b = client_flags();
        let mut go = 1u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"f");
        go.extend_from_slice(&0u16.to_be_bytes());
        opt(&mut b, proto::OPT_GO, &go);
        let read = Request {
            flags: 0,
            command: Command::Read,
            cookie: 9,
            offset: 512 << 10,
            length: 256 << 10,
        };
        b.extend_from_slice(&read.encode());
        client.write_all(&b).await.unwrap();
        let mut out = Vec::new();
        let ended = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            client.read_to_end(&mut out),
        )
        .await;
        assert!(ended.is_ok(), "the connection stayed open");
        let header = proto::simple_reply(9, 0);
        let at = out
            .windows(header.len())
            .position(|w| w == header)
            .expect("the read's header");
        assert!(
            out.len() - at - header.len() < 256 << 10,
            "all the data came"
        );
    }

    /// A memory volume counting the bytes being written at once; a write waits (up to 1 s)
    /// until 48 MiB are, so that two 24 MiB writes the budget lets in are in at the same time.
    #[derive(Debug)]
    struct Counting {
        inner: crate::volume::MemVolume,
        now: std::sync::atomic::AtomicU64,
        most: std::sync::atomic::AtomicU64,
    }

    #[async_trait::async_trait]
    impl Volume for Counting {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn fast_zero(&self) -> bool {
            true
        }
        async fn read(&self, offset: u64, length: u32) -> io::Result<Vec<u8>> {
            self.inner.read(offset, length).await
        }
        async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
            use std::sync::atomic::Ordering::SeqCst;
            let n = data.len() as u64;
            self.most
                .fetch_max(self.now.fetch_add(n, SeqCst) + n, SeqCst);
            let until = std::time::Instant::now() + std::time::Duration::from_secs(1);
            while self.now.load(SeqCst) < 48 << 20 && std::time::Instant::now() < until {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            // Long enough for a third write to come in, if the budget let it.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            self.now.fetch_sub(n, SeqCst);
            self.inner.write(offset, data, fua).await
        }
        async fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        async fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
            self.inner.trim(offset, length, fua).await
        }
        async fn write_zeroes(&self, o: u64, l: u64, a: bool, fua: bool) -> io::Result<()> {
            self.inner.write_zeroes(o, l, a, fua).await
        }
        async fn extents(
            &self,
            offset: u64,
            length: u64,
        ) -> io::Result<Vec<crate::volume::Extent>> {
            self.inner.extents(offset, length).await
        }
        async fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
            self.inner.cache(offset, length).await
        }
    }

    /// Eight 24 MiB writes sent back to back run two at a time (48 of the 64 MiB a connection
    /// may have in flight), not all at once, and all are answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connections_requests_in_flight_hold_at_most_its_byte_budget() {
        const MIB: usize = 1 << 20;
        let volume = Arc::new(Counting {
            inner: crate::volume::MemVolume::new(24 * MIB),
            now: Default::default(),
            most: Default::default(),
        });
        let server = Server::new(vec![Export {
            name: "m".into(),
            description: String::new(),
            volume: volume.clone(),
            read_only: false,
        }])
        .with_default("m");
        let mut b = client_flags();
        let mut go = 1u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"m");
        go.extend_from_slice(&0u16.to_be_bytes());
        opt(&mut b, proto::OPT_GO, &go);
        for cookie in 0..8 {
            let w = Request {
                flags: 0,
                command: Command::Write,
                cookie,
                offset: 0,
                length: 24 * MIB as u32,
            };
            b.extend_from_slice(&w.encode());
            b.resize(b.len() + 24 * MIB, 0x5a);
        }
        let out = transcript(server, &b).await;
        for cookie in 0..8 {
            let ok = proto::simple_reply(cookie, 0);
            assert!(out.windows(ok.len()).any(|w| w == ok), "write {cookie}");
        }
        let most = volume.most.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(most, 48 * MIB as u64, "bytes written at once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_says_nothing_is_let_go_after_the_handshake_limit() {
        let server = Server::new(Vec::new());
        let (client, theirs) = tokio::io::duplex(1 << 16);
        let began = tokio::time::Instant::now();
        let ended = server.serve_connection(theirs).await;
        assert!(
            matches!(&ended, Err(ConnError::Closed(why)) if why.contains("not done within")),
            "{ended:?}"
        );
        assert_eq!(began.elapsed(), HANDSHAKE_LIMIT);
        drop(client);
    }

    #[tokio::test]
    async fn a_whole_session_is_answered() {
        let out = run_transcript(&session()).await;
        // The greeting, then replies: six option replies and six transmission replies.
        assert_eq!(&out[..18], &proto::greeting());
        let data_chunk = out
            .windows(4)
            .filter(|w| *w == proto::STRUCTURED_REPLY_MAGIC.to_be_bytes())
            .count();
        assert_eq!(data_chunk, 6, "one chunk per request");
        assert!(out.windows(16).any(|w| w == [0x42; 16]), "the read's data");
    }

    /// A read's reply is the header and then the data, whether the data is copied after the
    /// header (small) or written from its own buffer (large).
    #[test]
    fn read_replies_are_the_header_then_the_data_small_or_large() {
        use futures::FutureExt;
        let export = memory_server()
            .export("m")
            .now_or_never()
            .flatten()
            .unwrap();
        let req = Request {
            flags: 0,
            command: Command::Read,
            cookie: 7,
            offset: 4096,
            length: 0,
        };
        for len in [1, COPY_DATA_BELOW - 1, COPY_DATA_BELOW, 1 << 20] {
            let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            for structured in [false, true] {
                let s = Session {
                    export: export.clone(),
                    structured,
                    base_allocation: false,
                    send_files: false,
                };
                let r = reply(&s, &req, Ok(Outcome::Data(data.clone().into())));
                assert_eq!(r.data.is_empty(), len < COPY_DATA_BELOW, "{len} bytes");
                let mut want = if structured {
                    let mut h = proto::chunk_header(
                        7,
                        proto::REPLY_FLAG_DONE,
                        proto::REPLY_TYPE_OFFSET_DATA,
                        8 + len as u32,
                    )
                    .to_vec();
                    h.extend_from_slice(&4096u64.to_be_bytes());
                    h
                } else {
                    proto::simple_reply(7, 0).to_vec()
                };
                want.extend_from_slice(&data);
                assert!(r.bytes() == want, "{len} bytes, structured {structured}");
            }
        }
    }

    #[tokio::test]
    async fn truncated_and_corrupted_sessions_end_without_a_panic_or_a_hang() {
        let s = session();
        for n in 0..s.len() {
            let out = tokio::time::timeout(Duration::from_secs(5), run_transcript(&s[..n]))
                .await
                .unwrap_or_else(|_| panic!("hung on a session cut at {n}"));
            assert_eq!(&out[..18], &proto::greeting());
        }
        for i in 0..s.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = s.clone();
                bad[i] ^= flip;
                tokio::time::timeout(Duration::from_secs(5), run_transcript(&bad))
                    .await
                    .unwrap_or_else(|_| panic!("hung with byte {i} ^ {flip:#x}"));
            }
        }
    }

    /// A client's bytes to a forced-TLS server: flags, LIST, GO, STRUCTURED_REPLY, an unknown
    /// option, STARTTLS, then what should be a TLS ClientHello.
    fn tls_session() -> Vec<u8> {
        let mut b = client_flags();
        opt(&mut b, proto::OPT_LIST, &[]);
        let mut go = 1u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"m");
        go.extend_from_slice(&0u16.to_be_bytes());
        opt(&mut b, proto::OPT_GO, &go);
        opt(&mut b, proto::OPT_STRUCTURED_REPLY, &[]);
        opt(&mut b, 77, &[]);
        opt(&mut b, proto::OPT_STARTTLS, &[]);
        // The start of a TLS record (handshake, TLS 1.0 record version), then junk.
        b.extend_from_slice(&[0x16, 0x03, 0x01, 0x00, 0x20]);
        b.extend_from_slice(&[0x5a; 32]);
        b
    }

    fn tls_server(dir: &std::path::Path) -> Server {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        memory_server()
            .with_tls(&TlsConfig {
                cert: dir.join("cert.pem"),
                key: dir.join("key.pem"),
                ca: None,
            })
            .unwrap()
    }

    /// The option replies in `out` (after the greeting), as (option, reply type).
    fn option_replies(out: &[u8]) -> Vec<(u32, u32)> {
        let mut r = Vec::new();
        let mut rest = &out[18..];
        while rest.len() >= 20 && rest[..8] == proto::REPLY_MAGIC.to_be_bytes() {
            let field = |i: usize| u32::from_be_bytes(rest[i..i + 4].try_into().unwrap());
            r.push((field(8), field(12)));
            rest = &rest[20 + field(16) as usize..];
        }
        r
    }

    /// Resolves `r` to a new 128 KiB memory volume, and counts the names asked for.
    #[derive(Debug, Default)]
    struct Resolver(std::sync::Mutex<Vec<String>>);

    #[async_trait::async_trait]
    impl Resolve for Resolver {
        async fn resolve(&self, name: &str) -> Option<Export> {
            self.0.lock().unwrap().push(name.to_string());
            (name == "r").then(|| Export {
                name: "r".into(),
                description: String::new(),
                volume: Arc::new(crate::volume::MemVolume::new(128 << 10)),
                read_only: false,
            })
        }

        async fn list(&self) -> Vec<(String, String)> {
            // "m" is the table's too: listed once.
            vec![("r".into(), "found".into()), ("m".into(), "again".into())]
        }
    }

    /// Names the table does not hold are looked up (the table's first, the empty name never),
    /// and are served; a name the lookup does not find is unknown; lists show the table's
    /// exports, then the resolver's others.
    #[tokio::test]
    async fn names_the_table_does_not_hold_are_resolved_and_served() {
        let server = memory_server();
        let resolver = Arc::new(Resolver::default());
        server.clone().set_resolver(resolver.clone());
        let info = |b: &mut Vec<u8>, o: u32, name: &str| {
            let mut d = (name.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            d.extend_from_slice(&0u16.to_be_bytes());
            opt(b, o, &d);
        };
        let mut b = client_flags();
        opt(&mut b, proto::OPT_LIST, &[]);
        info(&mut b, proto::OPT_INFO, "m");
        info(&mut b, proto::OPT_INFO, "");
        info(&mut b, proto::OPT_INFO, "x");
        info(&mut b, proto::OPT_GO, "r");
        let write = Request {
            flags: 0,
            command: Command::Write,
            cookie: 1,
            offset: (128 << 10) - 512,
            length: 512,
        };
        b.extend_from_slice(&write.encode());
        b.extend_from_slice(&[0x33; 512]);
        let out = transcript(server, &b).await;
        let replies = option_replies(&out);
        let kinds: Vec<(u32, u32)> = replies
            .iter()
            .copied()
            .filter(|r| r.1 != proto::REP_INFO)
            .collect();
        assert_eq!(
            kinds,
            [
                (proto::OPT_LIST, proto::REP_SERVER),
                (proto::OPT_LIST, proto::REP_SERVER),
                (proto::OPT_LIST, proto::REP_ACK),
                (proto::OPT_INFO, proto::REP_ACK),
                (proto::OPT_INFO, proto::REP_ACK),
                (proto::OPT_INFO, proto::REP_ERR_UNKNOWN),
                (proto::OPT_GO, proto::REP_ACK),
            ]
        );
        let listed = |name: &str, description: &str| {
            let e = proto::server_entry(name, description);
            out.windows(e.len()).any(|w| w == e)
        };
        assert!(listed("r", "found") && !listed("m", "again"));
        // Listing resolved nothing.
        assert_eq!(*resolver.0.lock().unwrap(), ["x", "r"]);
        // The resolved export's size (128 KiB, not the table's 64) and the write's reply at
        // its last 512 bytes: no error.
        let size = (128u64 << 10).to_be_bytes();
        assert!(out.windows(8).any(|w| w == size), "128 KiB announced");
        let mut ok = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        ok.extend_from_slice(&0u32.to_be_bytes());
        ok.extend_from_slice(&1u64.to_be_bytes());
        assert!(out.ends_with(&ok), "the write succeeded");
    }

    #[tokio::test]
    async fn forced_tls_answers_tls_reqd_until_starttls_then_wants_a_tls_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let server = tls_server(dir.path());
        let out = transcript(server.clone(), &tls_session()).await;
        assert_eq!(&out[..18], &proto::greeting());
        assert_eq!(
            option_replies(&out),
            [
                (proto::OPT_LIST, proto::REP_ERR_TLS_REQD),
                (proto::OPT_GO, proto::REP_ERR_TLS_REQD),
                (proto::OPT_STRUCTURED_REPLY, proto::REP_ERR_TLS_REQD),
                (77, proto::REP_ERR_TLS_REQD),
                (proto::OPT_STARTTLS, proto::REP_ACK),
            ]
        );
        // The junk after the ACK is not TLS: the connection fails (not served in the clear).
        let (mut client, conn) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(async move { server.serve_connection(conn).await });
        client.write_all(&tls_session()).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("no hang")
            .unwrap();
        assert!(matches!(r, Err(ConnError::Tls(_))), "{r:?}");
        // EXPORT_NAME before TLS closes the connection without a reply.
        let mut b = tls_session()[..4].to_vec();
        b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&proto::OPT_EXPORT_NAME.to_be_bytes());
        b.extend_from_slice(&1u32.to_be_bytes());
        b.push(b'm');
        let out = transcript(tls_server(dir.path()), &b).await;
        assert_eq!(out, proto::greeting());
    }

    #[tokio::test]
    async fn truncated_and_corrupted_forced_tls_sessions_end_without_a_panic_or_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let server = tls_server(dir.path());
        let s = tls_session();
        for n in 0..s.len() {
            tokio::time::timeout(Duration::from_secs(5), transcript(server.clone(), &s[..n]))
                .await
                .unwrap_or_else(|_| panic!("hung on a session cut at {n}"));
        }
        for i in 0..s.len() {
            let mut bad = s.clone();
            bad[i] ^= 0x80;
            tokio::time::timeout(Duration::from_secs(5), transcript(server.clone(), &bad))
                .await
                .unwrap_or_else(|_| panic!("hung with byte {i} ^ 0x80"));
        }
    }

    use std::time::Duration;
}
