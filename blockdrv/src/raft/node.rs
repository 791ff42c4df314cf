//! A storage node: the raft groups of the volumes it holds, the RPC server the other nodes talk
//! to, and the network those groups send their RPCs through.
//!
//! RPCs travel over TCP, one frame each way: a 4-byte big-endian length and a bincode body.
//! Besides raft's own (append entries, vote, and a snapshot streamed as parts and an end) a
//! node answers the volume requests a node that is not the leader forwards (write, read,
//! extents) and status. A client of a peer keeps one connection and opens a new one after any
//! error.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use openraft::error::{
    ClientWriteError, Fatal, InitializeError, NetworkError, RPCError, RaftError, RemoteError,
    ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, ChangeMembers, Raft, Vote};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::claims::{self, Claims};
use super::coalesce::Coalesce;
use super::data;
use super::segment_log::SegmentLog;
use super::state_machine::{Applied, Blocks, Hold, Pieces, Size, StateMachine};
use super::{BlockOp, Data, NodeId, TypeConfig};

/// `impl Volume` for a replicated volume type: `$methods` (its size and reads), and the write
/// side, on its `write_op` (a write is committed on a majority's disks before it returns, so
/// FUA and flush hold already).
macro_rules! replicated_volume {
    ($ty:ty, { $($methods:tt)* }) => {
        #[async_trait::async_trait]
        impl crate::volume::Volume for $ty {
            $($methods)*

            fn fast_zero(&self) -> bool {
                true
            }

            async fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> io::Result<()> {
                write_in_parts(offset, data, |offset, data| {
                    self.write_op(BlockOp::Write { offset, data })
                })
                .await
            }

            async fn flush(&self) -> io::Result<()> {
                Ok(())
            }

            async fn trim(&self, offset: u64, length: u64, _fua: bool) -> io::Result<()> {
                self.write_op(BlockOp::Zero {
                    offset,
                    length,
                    allocate: false,
                })
                .await
            }

            async fn write_zeroes(
                &self,
                offset: u64,
                length: u64,
                allocate: bool,
                _fua: bool,
            ) -> io::Result<()> {
                self.write_op(BlockOp::Zero {
                    offset,
                    length,
                    allocate,
                })
                .await
            }

            async fn cache(&self, _offset: u64, _length: u64) -> io::Result<()> {
                Ok(())
            }
        }
    };
}

mod cluster;
mod remote;

/// Largest frame accepted (a 32 MiB write and its envelope).
const MAX_FRAME: u32 = 40 << 20;

#[derive(Debug, Serialize, Deserialize)]
enum Rpc {
    /// Raft's messages within the group of volume (name, id): a replica left from a deleted
    /// volume of that name takes no part in a new one's group (its votes and entries go
    /// unanswered), nor the new one's in its.
    Append(String, u64, AppendEntriesRequest<TypeConfig>),
    Vote(String, u64, VoteRequest<NodeId>),
    /// Data of a snapshot being streamed ([`Peer::full_snapshot`]).
    SnapshotPart(String, u64, SnapshotPart),
    /// The end of a streamed snapshot: install it.
    SnapshotEnd(String, u64, SnapshotEnd),
    /// A write forwarded to the leader of volume (name, id).
    Write(String, u64, BlockOp),
    /// The index a read must wait for (asked of the leader of volume (name, id) by a follower
    /// that serves a read).
    ReadIndex(String, u64),
    Status(String),
    /// Open (create if new) this node's replica of a volume and remember it.
    Open(VolumeSpec),
    /// Create a volume on its members (this node coordinates).
    Create(VolumeSpec),
    /// Drop this node's replica of volume (name, id): refused if the replica of that name is
    /// another volume (id 0: whichever it is).
    Drop(String, u64),
    /// Delete a volume on all its members (this node coordinates).
    Delete(String, bool),
    /// Grow a volume (through its log).
    Resize(String, u64),
    /// A change of the users of volume (name, id) ([`BlockOp::Attach`], `Detach`, `Delete`),
    /// to its leader, which decides.
    Claim(String, u64, BlockOp),
    /// Change the users of a volume (through its leader).
    ClaimVolume(String, BlockOp),
    /// [`Rpc::Claim`] by name, sent by a node that does not hold the volume to one that does.
    ClaimHere(String, BlockOp),
    List,
    /// Replace member `from` (alive or not) of a volume by node `to` at `addr`.
    Move(String, NodeId, NodeId, String),
    /// A volume's members changed: record the new spec.
    Update(VolumeSpec),
    /// The cluster's node list changed: record it.
    SetCluster(BTreeMap<NodeId, String>),
    /// Add node (id, address) to the cluster and spread replicas onto it (this node does it).
    AddNode(NodeId, String),
    /// Move every replica off a node and drop it from the cluster (this node does it).
    RemoveNode(NodeId),
    /// The cluster's node list as this node has it.
    Cluster,
    /// Volume (name, id) was deleted: remember it (a node that was down then drops its replica
    /// when it is back).
    Deleted(String, u64),
    /// The volumes this node knows were deleted: name -> ids.
    Tombstones,
    /// A request of a node that holds no replica of volume (name, id), to its leader
    /// ([`remote::RemoteVolume`]); for another volume of that name, `NoVolume`.
    Remote(String, u64, RemoteOp),
    /// [`Rpc::Resize`] and [`Rpc::Delete`] sent on by a node that does not hold the volume:
    /// not sent on again. (For `Delete`: whether `force`d.)
    ResizeHere(String, u64),
    DeleteHere(String, bool),
    /// Drop this node's replica of volume (name, id) if it is in no group
    /// ([`Node::drop_if_unformed`]); one in a group stays (refused).
    DropUnformed(String, u64),
    /// From the leader of volume (name, id), whose log ends at this log id: elect yourself
    /// (a leader handing the volume over, [`Node::hand_over`]); refused by a replica whose log
    /// does not reach it (it could not win).
    Elect(String, u64, Option<super::LogId>),
}

/// What a node without a replica asks of the leader.
#[derive(Debug, Serialize, Deserialize)]
enum RemoteOp {
    Write(BlockOp),
    /// A linearizable read of (offset, length).
    Read(u64, u32),
    /// The allocation of (offset, length), read the same way.
    Extents(u64, u64),
}

/// A volume as the nodes' catalogs keep it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub name: String,
    pub size: u64,
    /// The nodes holding a replica: id -> RPC address.
    pub members: BTreeMap<NodeId, String>,
    /// How many replicas a new volume without members gets (0: [`REPLICAS`]).
    #[serde(default)]
    pub replicas: u32,
    /// Which volume of that name this is: a random number given when it is created through
    /// the cluster (0: given on the nodes' command lines, or not created yet), so that a
    /// deleted volume is not taken for a later one of the same name.
    #[serde(default)]
    pub id: u64,
}

/// A volume group's state as a node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub node: NodeId,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_applied: Option<u64>,
    /// The voters.
    pub members: Vec<NodeId>,
    /// Members that do not vote yet: replicas being moved in, catching up.
    #[serde(default)]
    pub learners: Vec<NodeId>,
    /// On the leader: the voters whose last RPC failed (down, unreachable, failing), but for
    /// those in `stalled`.
    #[serde(default)]
    pub unreachable: Vec<NodeId>,
    /// The node this one is moving a replica to, if it is.
    #[serde(default)]
    pub moving: Option<NodeId>,
    /// On the leader: the voters that answer but are catching up ([`catching_up`]).
    #[serde(default)]
    pub behind: Vec<NodeId>,
    /// On the leader: the voters that answer but refuse data (a snapshot that fills their
    /// disk) and have taken nothing new for [`STALLED`] ([`Links::refusing`]), with the error
    /// they refused it with; not in `unreachable` or `behind`.
    #[serde(default)]
    pub stalled: Vec<(NodeId, String)>,
    /// The volume's size as this node's replica has it now.
    #[serde(default)]
    pub size: u64,
    /// The RPC address of the leader this node knows.
    #[serde(default)]
    pub leader_addr: Option<String>,
    /// Which volume of that name this is ([`VolumeSpec::id`]).
    #[serde(default)]
    pub id: u64,
    /// The volume's users, as this node's replica has applied them.
    #[serde(default)]
    pub claims: Claims,
}

impl Status {
    /// Whether the replica is in a group: initialized (it has members or learners) or told
    /// of a leader; one that is not was opened and never heard of its group.
    fn in_group(&self) -> bool {
        !self.members.is_empty() || !self.learners.is_empty() || self.leader.is_some()
    }
}

/// Data at `offset` of the blocks of snapshot `id`, sent by the leader of `vote`. Only data
/// travels: the holes and runs of zeroes of the blocks are left out.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotPart {
    vote: Vote<NodeId>,
    id: String,
    offset: u64,
    data: super::Data,
}

/// The end of snapshot `meta`: the blocks are `size` bytes long, and `parts` parts were sent
/// (the receiver installs it only if it has them all).
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotEnd {
    vote: Vote<NodeId>,
    meta: openraft::SnapshotMeta<NodeId, BasicNode>,
    size: u64,
    parts: u64,
    /// The volume's users as the sender has them now (at or after `meta`'s log id, as the
    /// blocks may be: applying the entries after it again gives the same, see `claims.rs`).
    claims: Claims,
}

/// The next piece of data of a snapshot's volume at or after `at` (at most
/// [`SNAPSHOT_CHUNK`] bytes, see `state_machine::next_chunk`), if there is one before `size`.
fn next_snapshot_chunk(
    blocks: &std::fs::File,
    pieces: &Pieces,
    at: u64,
    size: u64,
) -> io::Result<Option<(u64, Vec<u8>)>> {
    super::state_machine::next_chunk(blocks, pieces, at, size, SNAPSHOT_CHUNK)
}

#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    Snapshot(Result<SnapshotResponse<NodeId>, String>),
    Write(Result<(), String>),
    /// A claim's outcome: the leader's refusal inside, a failure (not the leader) outside.
    Claim(Result<Result<(), String>, String>),
    ReadIndex(Result<u64, String>),
    Status(Status),
    NoVolume(String),
    Done(Result<(), WireError>),
    Volumes(Vec<(VolumeSpec, Status)>),
    Moves(Result<Vec<super::placement::Move>, String>),
    Cluster(BTreeMap<NodeId, String>),
    Tombstones(Tombstones),
    Read(Result<Data, WireError>),
    /// Runs of (length, hole).
    Extents(Result<Vec<(u64, bool)>, WireError>),
}

/// An error as it crosses the wire between nodes: its message, and its kind where a caller
/// acts on it (a request that found no leader is tried again; one for a volume that does not
/// exist is not), so an error forwarded from node to node reaches the client as it began.
#[derive(Debug, Serialize, Deserialize)]
struct WireError {
    kind: WireKind,
    message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
enum WireKind {
    NotFound,
    InvalidInput,
    AlreadyExists,
    ResourceBusy,
    /// Nodes that must answer for it to be done do not.
    HostUnreachable,
    /// No leader yet, or it changed: try again.
    WouldBlock,
    TimedOut,
    Other,
}

const WIRE_KINDS: [(WireKind, io::ErrorKind); 7] = [
    (WireKind::NotFound, io::ErrorKind::NotFound),
    (WireKind::InvalidInput, io::ErrorKind::InvalidInput),
    (WireKind::AlreadyExists, io::ErrorKind::AlreadyExists),
    (WireKind::ResourceBusy, io::ErrorKind::ResourceBusy),
    (WireKind::HostUnreachable, io::ErrorKind::HostUnreachable),
    (WireKind::WouldBlock, io::ErrorKind::WouldBlock),
    (WireKind::TimedOut, io::ErrorKind::TimedOut),
];

impl From<io::Error> for WireError {
    fn from(e: io::Error) -> WireError {
        let kind = WIRE_KINDS
            .iter()
            .find(|(_, k)| *k == e.kind())
            .map_or(WireKind::Other, |(w, _)| *w);
        WireError {
            kind,
            message: e.to_string(),
        }
    }
}

impl From<WireError> for io::Error {
    fn from(e: WireError) -> io::Error {
        let kind = WIRE_KINDS
            .iter()
            .find(|(w, _)| *w == e.kind)
            .map_or(io::ErrorKind::Other, |(_, k)| *k);
        io::Error::new(kind, e.message)
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Sends `msg` as one frame: `[length u32 BE][skeleton length u32 BE][skeleton][write data]`
/// (the split of [`data::encode`]), the write data written from where it is, not copied.
async fn send_msg<T: Serialize>(s: &mut TcpStream, msg: &T) -> io::Result<()> {
    let (skeleton, chunks) =
        data::encode(msg).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let len = 4 + skeleton.len() + chunks.iter().map(|c| c.len()).sum::<usize>();
    let len = u32::try_from(len)
        .ok()
        .filter(|l| *l <= MAX_FRAME)
        .ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("frame of {len} bytes"))
        })?;
    let mut head = [0u8; 8];
    head[..4].copy_from_slice(&len.to_be_bytes());
    head[4..].copy_from_slice(&(skeleton.len() as u32).to_be_bytes());
    let mut slices: Vec<io::IoSlice<'_>> = [&head[..], &skeleton[..]]
        .into_iter()
        .chain(chunks.iter().map(|c| &c[..]))
        .filter(|p| !p.is_empty())
        .map(io::IoSlice::new)
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = s.write_vectored(&rest[..rest.len().min(1024)]).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        io::IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

/// Receives a frame [`send_msg`] sent; the write data in it are slices of the frame.
async fn recv_msg<T: serde::de::DeserializeOwned>(s: &mut TcpStream) -> io::Result<T> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len);
    if !(4..=MAX_FRAME).contains(&len) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    let mut b = bytes::BytesMut::with_capacity(len as usize);
    while b.len() < len as usize {
        if s.read_buf(&mut b).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    let frame = b.freeze();
    let sk = u32::from_be_bytes(frame[..4].try_into().expect("4 bytes")) as usize;
    if sk > frame.len() - 4 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("skeleton of {sk} bytes in a frame of {len}"),
        ));
    }
    data::decode(&frame[4..4 + sk], frame.slice(4 + sk..))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The version of the node-to-node protocol: the framing and the bincode of [`Rpc`],
/// [`Reply`] and everything they carry. Bump it with any change to those types: bincode has no
/// field names or tags to tell a changed type by, so nodes of different versions must refuse
/// each other, saying why, rather than misread each other.
const RPC_VERSION: u32 = 9;

/// What each side of a node-to-node connection sends first: `SBSR` and [`RPC_VERSION`].
fn hello() -> [u8; 8] {
    let mut h = *b"SBSR\0\0\0\0";
    h[4..].copy_from_slice(&RPC_VERSION.to_be_bytes());
    h
}

/// Checks the hello of the node at `peer`.
fn check_hello(peer: &str, h: [u8; 8]) -> io::Result<()> {
    let version = u32::from_be_bytes(h[4..].try_into().expect("4 bytes"));
    let what = if &h[..4] != b"SBSR" {
        format!("{peer} is not a blockdrv storage node (it did not greet as one)")
    } else if version != RPC_VERSION {
        format!(
            "{peer} speaks node protocol version {version}, this node {RPC_VERSION}: run one \
             release on every node"
        )
    } else {
        return Ok(());
    };
    Err(io::Error::new(io::ErrorKind::InvalidData, what))
}

/// Reads the greeting of the node at `peer` from `s` and checks it. The client of a
/// connection greets first and the server answers; [`call`] sends its first request right
/// behind its hello, and reads the server's hello before the reply.
async fn read_hello(s: &mut TcpStream, peer: &str) -> io::Result<()> {
    let mut h = [0u8; 8];
    s.read_exact(&mut h).await?;
    check_hello(peer, h)
}

/// One request to `addr` over `conn` (connected first if need be); the connection is dropped
/// after an error.
async fn call(conn: &mut Option<TcpStream>, addr: &str, rpc: &Rpc) -> io::Result<Reply> {
    let new = conn.is_none();
    if new {
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        s.write_all(&hello()).await?;
        *conn = Some(s);
    }
    let s = conn.as_mut().expect("connected above");
    let r = async {
        send_msg(s, rpc).await?;
        if new {
            read_hello(s, addr).await?;
        }
        recv_msg(s).await
    }
    .await;
    if r.is_err() {
        *conn = None;
    }
    r
}

/// The raft network of one volume's group.
#[derive(Debug, Clone)]
pub struct Network {
    volume: String,
    /// The volume's id ([`VolumeSpec::id`]).
    id: u64,
    links: Arc<Links>,
    /// The writes the group's state machine holds in the log (a snapshot's data is read
    /// through them).
    pieces: Pieces,
    /// Its users (sent with a snapshot).
    claims: claims::Shared,
}

/// How replication to each peer of a group goes, as this node's network sees it while it
/// leads: when the peer last answered and failed, any RPC (heartbeats too: for health), and
/// when it last took data (entries or a snapshot part) and failed to (for stalls: a learner
/// whose disk is full answers heartbeats all the same).
#[derive(Debug, Default)]
struct Links(std::sync::Mutex<HashMap<NodeId, Link>>);

#[derive(Debug)]
struct Link {
    /// When the peer last took something it had not taken before: a log index past `log`,
    /// a part of a snapshot ending past `snapshot` (the furthest any snapshot sent since it last
    /// took entries, or failed to be reached, got: one sent again after it refused a part, or
    /// a newer one sent instead, is no progress until it gets further than that).
    progress: Instant,
    log: u64,
    snapshot: Option<u64>,
    /// The last RPC the peer answered (heartbeats too), and the last that failed.
    answered: Option<Instant>,
    error: Option<(Instant, String)>,
    /// The last RPC carrying data the peer took, and the last that failed.
    took: Option<Instant>,
    data_error: Option<DataError>,
    /// Whether a snapshot is being sent to the peer.
    sending: bool,
}

/// An RPC carrying data that failed: when, why, and whether the peer refused it (it answered
/// with an error: its disk is full, say) rather than not answering or not being there.
#[derive(Debug)]
struct DataError {
    at: Instant,
    error: String,
    refused: bool,
}

/// How far a peer got (see [`Link::progress`]): the last log index it has, or the end of the
/// snapshot part it took.
enum Mark {
    Log(u64),
    Snapshot(u64),
}

impl Links {
    fn with<T>(&self, peer: NodeId, f: impl FnOnce(&mut Link) -> T) -> T {
        let mut links = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(links.entry(peer).or_insert_with(|| Link {
            progress: Instant::now(),
            log: 0,
            snapshot: None,
            answered: None,
            error: None,
            took: None,
            data_error: None,
            sending: false,
        }))
    }

    /// Whether a snapshot is being sent to `peer`.
    fn sending(&self, peer: NodeId) -> bool {
        self.with(peer, |l| l.sending)
    }

    fn answered(&self, peer: NodeId) {
        self.with(peer, |l| l.answered = Some(Instant::now()));
    }

    /// Whether `peer` answered an RPC (heartbeats too) within `within`.
    fn answered_within(&self, peer: NodeId, within: Duration) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&peer)
            .and_then(|l| l.answered)
            .is_some_and(|at| at.elapsed() <= within)
    }

    /// Whether `peer` took new log entries within `within`, and no RPC carrying data to it
    /// has failed since it last took one.
    fn taking(&self, peer: NodeId, within: Duration) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&peer)
            .is_some_and(|l| {
                l.log > 0
                    && l.progress.elapsed() <= within
                    && l.data_error
                        .as_ref()
                        .is_none_or(|d| l.took.is_some_and(|ok| ok >= d.at))
            })
    }

    /// Whether the last RPC to `peer` failed (it has not answered since).
    fn failing(&self, peer: NodeId) -> bool {
        self.with(peer, |l| {
            l.error
                .as_ref()
                .is_some_and(|(at, _)| l.answered.is_none_or(|ok| *at > ok))
        })
    }

    /// `peer` took an RPC carrying data (new or not), getting as far as `to`.
    fn progressed(&self, peer: NodeId, to: Mark) {
        self.with(peer, |l| {
            l.took = Some(Instant::now());
            let further = match to {
                Mark::Log(index) if index > l.log => {
                    l.log = index;
                    l.snapshot = None;
                    true
                }
                Mark::Log(_) => false,
                Mark::Snapshot(end) => {
                    let further = l.snapshot.is_none_or(|done| end > done);
                    l.snapshot = Some(l.snapshot.map_or(end, |done| done.max(end)));
                    further
                }
            };
            if further {
                l.progress = Instant::now();
            }
        })
    }

    fn failed(&self, peer: NodeId, e: &dyn std::fmt::Display) {
        self.with(peer, |l| l.error = Some((Instant::now(), e.to_string())));
    }

    /// An RPC carrying data to `peer` failed, `refused` by it or not (also recorded as a
    /// failure of any RPC). One not refused (a connection lost, a timeout) lets the parts of
    /// the snapshot sent next count as progress from its start.
    fn data_failed(&self, peer: NodeId, e: &dyn std::fmt::Display, refused: bool) {
        self.with(peer, |l| {
            let now = Instant::now();
            if !refused {
                l.snapshot = None;
            }
            l.error = Some((now, e.to_string()));
            l.data_error = Some(DataError {
                at: now,
                error: e.to_string(),
                refused,
            });
        });
    }

    /// The last data error of `peer` if it has taken nothing new for `stall` up to `now`,
    /// counting from `since` at the earliest, and its last RPC carrying data failed (one that
    /// takes again what it took before, say a snapshot sent again after an error, is not
    /// stalled; answering heartbeats does not count). For a move: any failure counts, and one
    /// that takes data again is given its time.
    fn stalled(
        &self,
        peer: NodeId,
        since: Instant,
        now: Instant,
        stall: Duration,
    ) -> Option<String> {
        self.with(peer, |l| {
            let progress = l.progress.max(since);
            let d = l.data_error.as_ref()?;
            let failing = l.took.is_none_or(|ok| d.at > ok);
            (failing && d.at >= progress && now.saturating_duration_since(progress) >= stall)
                .then(|| d.error.clone())
        })
    }

    /// The error with which `peer` refused data, if it has taken nothing new for `stall` up
    /// to `now` and the last RPC carrying data that failed since was refused (answered with an
    /// error), not failed to reach it: a full disk, where a snapshot's first parts are taken
    /// again and the next refused, over and over (however long the parts before take to send
    /// again), not a node down or just back. For health.
    fn refusing(&self, peer: NodeId, now: Instant, stall: Duration) -> Option<String> {
        self.with(peer, |l| {
            let d = l.data_error.as_ref().filter(|d| d.refused)?;
            (d.at >= l.progress && now.saturating_duration_since(l.progress) >= stall)
                .then(|| d.error.clone())
        })
    }

    /// Forgets what `peer` took and when (a replica moved to a node that held one before starts
    /// from nothing).
    fn reset(&self, peer: NodeId) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&peer);
    }
}

/// A client of one peer for one group.
#[derive(Debug)]
pub struct Peer {
    volume: String,
    /// The volume's id ([`VolumeSpec::id`]).
    id: u64,
    target: NodeId,
    addr: String,
    conn: Option<TcpStream>,
    links: Arc<Links>,
    pieces: Pieces,
    claims: claims::Shared,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer {
            volume: self.volume.clone(),
            id: self.id,
            target,
            addr: node.addr.clone(),
            conn: None,
            links: self.links.clone(),
            pieces: self.pieces.clone(),
            claims: self.claims.clone(),
        }
    }
}

type NetResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl Peer {
    /// One RPC to the peer. openraft bounds every call with its own timeout (`RPCOption`'s
    /// TTL), which drops this future: the connection is taken out for the call and put back only
    /// once the reply has been read, so a cancelled call never leaves its reply behind for the
    /// next one to read. (A timeout here would be reported as `Unreachable`, which makes
    /// openraft back off for 500 ms: a follower that is slow to take a large AppendEntries
    /// would then miss heartbeats and start an election.)
    async fn rpc(&mut self, rpc: Rpc, _option: &RPCOption) -> Result<Reply, Unreachable> {
        let mut conn = self.conn.take();
        let e = match call(&mut conn, &self.addr, &rpc).await {
            Ok(Reply::NoVolume(v)) => {
                io::Error::other(format!("node {} has no volume {v}", self.target))
            }
            Ok(r) => {
                self.conn = conn;
                self.links.answered(self.target);
                return Ok(r);
            }
            Err(e) => e,
        };
        self.failed(&e);
        Err(Unreachable::new(&e))
    }

    fn failed(&self, e: &dyn std::fmt::Display) {
        self.links.failed(self.target, e);
    }

    /// One RPC of a streamed snapshot: given up when openraft cancels the stream, an error
    /// after `ttl`.
    async fn snapshot_rpc(
        &mut self,
        rpc: Rpc,
        ttl: Duration,
        cancel: &mut std::pin::Pin<&mut impl std::future::Future<Output = ReplicationClosed>>,
        option: &RPCOption,
    ) -> Result<Reply, StreamingError<TypeConfig, Fatal<NodeId>>> {
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            r = tokio::time::timeout(ttl, self.rpc(rpc, option)) => match r {
                Ok(Ok(reply)) => Ok(reply),
                Ok(Err(unreachable)) => Err(StreamingError::Unreachable(unreachable)),
                Err(_) => Err(StreamingError::Network(NetworkError::new(&io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("volume {}: a snapshot RPC took over {ttl:?}", self.volume),
                )))),
            },
        }
    }
}

fn unexpected<E: std::error::Error>(
    r: &Reply,
) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
    RPCError::Network(NetworkError::new(&io::Error::other(format!(
        "unexpected reply {r:?}"
    ))))
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> NetResult<AppendEntriesResponse<NodeId>> {
        // At most APPEND_BYTES of write data (but at least one entry): the rest goes with the
        // next request, which openraft sends at once on a partial success.
        let mut bytes = 0;
        let keep = rpc
            .entries
            .iter()
            .position(|e| {
                bytes += super::entry_data_len(e);
                bytes > APPEND_BYTES
            })
            .map_or(rpc.entries.len(), |i| i.max(1));
        let partial = (keep < rpc.entries.len()).then(|| {
            rpc.entries.truncate(keep);
            rpc.entries.last().map(|e| e.log_id)
        });
        let last = rpc.entries.last().map(|e| e.log_id.index);
        let reply = self
            .rpc(Rpc::Append(self.volume.clone(), self.id, rpc), &option)
            .await;
        let r = match reply {
            Ok(Reply::Append(Ok(AppendEntriesResponse::Success))) if partial.is_some() => Ok(
                AppendEntriesResponse::PartialSuccess(partial.expect("checked")),
            ),
            Ok(Reply::Append(Ok(r))) => Ok(r),
            Ok(Reply::Append(Err(e))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(other) => Err(unexpected(&other)),
            Err(unreachable) => Err(RPCError::Unreachable(unreachable)),
        };
        // Heartbeats (no entries) tell whether the peer answers, not whether it takes data.
        match (&r, last) {
            (
                Ok(AppendEntriesResponse::Success | AppendEntriesResponse::PartialSuccess(_)),
                Some(last),
            ) => self.links.progressed(self.target, Mark::Log(last)),
            (Err(e), Some(_)) => {
                let refused = matches!(e, RPCError::RemoteError(_));
                self.links.data_failed(self.target, e, refused)
            }
            (Err(e), None) => self.failed(e),
            _ => {}
        }
        r
    }

    /// Streams a snapshot: the data of the blocks in chunks (one RPC each, holes and runs of
    /// zeroes left out, so a thin volume sends what it holds, not its size), then the end,
    /// on which the peer installs it.
    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: openraft::Snapshot<TypeConfig>,
        cancel: impl std::future::Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let last = snapshot.meta.last_log_id.map_or(0, |l| l.index);
        let _sending = Sending::new(self.links.clone(), self.target);
        let r = self.send_snapshot(vote, snapshot, cancel, option).await;
        match &r {
            Ok(_) => self.links.progressed(self.target, Mark::Log(last)),
            Err((StreamingError::Closed(_), _)) | Err((_, Recorded::Yes)) => {}
            Err((e, Recorded::No)) => self.links.data_failed(self.target, e, false),
        }
        r.map_err(|(e, _)| e)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> NetResult<VoteResponse<NodeId>> {
        match self
            .rpc(Rpc::Vote(self.volume.clone(), self.id, rpc), &option)
            .await?
        {
            Reply::Vote(Ok(r)) => Ok(r),
            Reply::Vote(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            other => Err(unexpected(&other)),
        }
    }
}

/// Marks a snapshot being sent to a peer (in [`Links`]) while it lives: openraft may drop the
/// sending future at any point.
struct Sending(Arc<Links>, NodeId);

impl Sending {
    fn new(links: Arc<Links>, peer: NodeId) -> Sending {
        links.with(peer, |l| l.sending = true);
        Sending(links, peer)
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        self.0.with(self.1, |l| l.sending = false);
    }
}

/// Whether [`Peer::send_snapshot`] recorded its error in [`Links`] itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recorded {
    Yes,
    No,
}

type SnapshotError = StreamingError<TypeConfig, Fatal<NodeId>>;

/// How long a leader waits before it sends a snapshot again to a peer that refused a part of
/// it: openraft sends it again at once otherwise, and with it the parts before the one refused,
/// over and over (a part of 4 MiB every 25 ms to a full disk in the test). The wait is in the
/// task that streams snapshots, not in the one that sends heartbeats.
const REFUSED_WAIT: Duration = Duration::from_millis(500);

impl Peer {
    /// [`RaftNetwork::full_snapshot`]: the data of the blocks in parts, then the end.
    async fn send_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: openraft::Snapshot<TypeConfig>,
        cancel: impl std::future::Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, (SnapshotError, Recorded)> {
        let read_err = |e: io::Error| {
            (
                StreamingError::StorageError(
                    openraft::StorageIOError::read_snapshot(
                        Some(snapshot.meta.signature()),
                        super::any(e),
                    )
                    .into(),
                ),
                Recorded::No,
            )
        };
        let net_err = |e: String| StreamingError::Network(NetworkError::new(&io::Error::other(e)));
        let unexpected = |r: Reply| (net_err(format!("unexpected reply {r:?}")), Recorded::No);
        let blocks = Arc::new(snapshot.snapshot.into_std().await);
        let size = blocks.metadata().map_err(read_err)?.len();
        let id = snapshot.meta.snapshot_id.clone();
        tokio::pin!(cancel);
        let (mut at, mut sent, mut parts) = (0, 0, 0);
        loop {
            let (b, p) = (blocks.clone(), self.pieces.clone());
            let next = tokio::task::spawn_blocking(move || next_snapshot_chunk(&b, &p, at, size))
                .await
                .map_err(|e| read_err(io::Error::other(e)))?
                .map_err(read_err)?;
            let Some((offset, data)) = next else {
                break;
            };
            at = offset + data.len() as u64;
            if super::is_zero(&data) {
                continue;
            }
            sent += data.len() as u64;
            parts += 1;
            let part = SnapshotPart {
                vote,
                id: id.clone(),
                offset,
                data: data.into(),
            };
            let rpc = Rpc::SnapshotPart(self.volume.clone(), self.id, part);
            match self
                .snapshot_rpc(rpc, option.hard_ttl(), &mut cancel, &option)
                .await
                .map_err(|e| (e, Recorded::No))?
            {
                Reply::Done(Ok(())) => self.links.progressed(self.target, Mark::Snapshot(at)),
                Reply::Done(Err(e)) => return Err(self.refused(e.message, &mut cancel).await),
                other => return Err(unexpected(other)),
            }
        }
        // Installing reads the data once more: time for that too.
        let install = Duration::from_secs(60 + size / (64 << 20));
        let end = SnapshotEnd {
            vote,
            meta: snapshot.meta.clone(),
            size,
            parts,
            claims: claims::lock(&self.claims).now.clone(),
        };
        let rpc = Rpc::SnapshotEnd(self.volume.clone(), self.id, end);
        match self
            .snapshot_rpc(rpc, install, &mut cancel, &option)
            .await
            .map_err(|e| (e, Recorded::No))?
        {
            Reply::Snapshot(Ok(r)) => {
                tracing::info!(
                    volume = %self.volume,
                    target = self.target,
                    "snapshot {id} sent: {sent} bytes of data, {} bytes of zeroes not sent",
                    size - sent
                );
                Ok(r)
            }
            Reply::Snapshot(Err(e)) => Err(self.refused(e, &mut cancel).await),
            other => Err(unexpected(other)),
        }
    }

    /// The peer refused a snapshot RPC with `error`: recorded as such, then [`REFUSED_WAIT`]
    /// (unless the stream is cancelled meanwhile) before the error is returned to openraft.
    async fn refused(
        &self,
        error: String,
        cancel: &mut std::pin::Pin<&mut impl std::future::Future<Output = ReplicationClosed>>,
    ) -> (SnapshotError, Recorded) {
        self.links.data_failed(self.target, &error, true);
        tokio::select! {
            closed = cancel => (StreamingError::Closed(closed), Recorded::Yes),
            _ = tokio::time::sleep(REFUSED_WAIT) => (
                StreamingError::Network(NetworkError::new(&io::Error::other(error))),
                Recorded::Yes,
            ),
        }
    }
}

/// Most bytes of write data in one AppendEntries: openraft allows it one heartbeat interval to
/// be sent, written and fsynced by the follower, and backs off after a timeout.
const APPEND_BYTES: usize = 8 << 20;

/// One volume's group on this node.
#[derive(Clone)]
pub struct Group {
    pub name: String,
    size: Size,
    pub raft: Raft<TypeConfig>,
    blocks: Blocks,
    /// The writes held in the log over `blocks`.
    pieces: Pieces,
    /// Writes queued for the group commit ([`batcher`]).
    queue: tokio::sync::mpsc::UnboundedSender<Pending>,
    /// The snapshot being received from the leader, if one is.
    receiving: Arc<tokio::sync::Mutex<Option<Receiving>>>,
    /// How replication to each peer goes (while this node leads).
    links: Arc<Links>,
    /// What this node is changing in the group's membership, if anything.
    busy: Arc<std::sync::Mutex<Option<Busy>>>,
    /// How far behind followers are (while this node leads).
    lag: Lag,
    incarnation: Incarnation,
    /// Whether anything of the group's log is left (see [`Remains`]).
    log: super::segment_log::LogAlive,
    /// The volume's users as applied here.
    claims: claims::Shared,
    /// Held by the leader while it decides a change of the users and has it applied, so that
    /// each is decided on the claims the last left.
    claiming: Arc<tokio::sync::Mutex<()>>,
    /// A hand-over of the lead to another member, while this node leads ([`Node::hand_over`]).
    handover: Arc<HandOver>,
}

/// What a leader handing its volume to another member ([`Node::hand_over`]) shares with the
/// group commit, the vote requests it answers and its lease reads.
#[derive(Debug, Default)]
struct HandOver {
    /// The group commit submits each entry under a read lock of it, and a lease read is served
    /// only under one; a hand-over holds it for writing, so that the log ends where the new
    /// leader's does and no read is served from a lease the node may have given up.
    hold: tokio::sync::RwLock<()>,
    /// The member asked to elect itself, if one is (the only candidate whose vote request a
    /// leader passes to raft: [`Group::vote`]).
    invited: std::sync::Mutex<Option<NodeId>>,
    /// Vote requests of the invited member being answered by raft.
    passing: std::sync::atomic::AtomicUsize,
}

/// Volumes deleted through the cluster: name -> the ids of the volumes of that name deleted.
type Tombstones = BTreeMap<String, std::collections::BTreeSet<u64>>;

/// Which replica of a name [`Node::drop_replica_of`] drops.
#[derive(Debug, Clone, Copy)]
enum Only<'a> {
    Any,
    /// Only this very spec (still in the catalog as it was).
    Spec(&'a VolumeSpec),
    /// Only the volume of this id (0: any); another one is an error.
    Id(u64),
}

/// A change of a group's membership this node has under way: one at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Busy {
    /// Moving a replica to this node.
    Moving(NodeId),
    /// Taking stray learners out ([`drop_stray_learners`]).
    Cleaning,
    /// Handing the lead to another member ([`Node::hand_over`]).
    HandingOver,
}

/// A membership change under way (see [`Group::busy`]); over when dropped.
struct BusyMark(Arc<std::sync::Mutex<Option<Busy>>>);

impl BusyMark {
    /// Marks `what` under way, if nothing else is.
    fn take(busy: &Arc<std::sync::Mutex<Option<Busy>>>, what: Busy) -> Result<BusyMark, Busy> {
        let mut b = busy.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(other) = *b {
            return Err(other);
        }
        *b = Some(what);
        Ok(BusyMark(busy.clone()))
    }
}

impl Drop for BusyMark {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// A snapshot being received: whose, which, the file its data goes to and how many parts
/// were written to it.
struct Receiving {
    vote: Vote<NodeId>,
    id: String,
    file: std::fs::File,
    /// The offsets of the parts written (a part sent again is counted once).
    parts: std::collections::BTreeSet<u64>,
}

/// A write waiting for the group commit, and who waits for its outcome.
type Pending = (BlockOp, tokio::sync::oneshot::Sender<Result<(), NotHereOr>>);

/// Most bytes of write data, and most operations, in one log entry.
const BATCH_BYTES: usize = 4 << 20;
const BATCH_OPS: usize = 256;

/// Log entries of the group commit in flight at once (submitted, not yet applied).
const BATCHES_IN_FLIGHT: usize = 4;

/// The writes gathered for the next log entry.
#[derive(Default)]
struct Batch {
    ops: Vec<BlockOp>,
    waiters: Vec<tokio::sync::oneshot::Sender<Result<(), NotHereOr>>>,
    bytes: usize,
}

impl Batch {
    fn push(&mut self, (op, waiter): Pending) {
        self.bytes += op.data_len();
        self.ops.push(op);
        self.waiters.push(waiter);
    }

    fn full(&self) -> bool {
        self.bytes >= BATCH_BYTES || self.ops.len() >= BATCH_OPS
    }
}

/// What tells how far behind a leader's followers are: the KiB its state machine applied
/// after their last entries ([`Applied::kib_after`]), against [`Lag::limit_kib`].
#[derive(Clone)]
struct Lag {
    /// The state machine's: not kept alive by this (see [`Remains`]).
    applied: std::sync::Weak<Applied>,
    size: Size,
    keep_kib: u64,
}

/// What a leader's writes are paced by ([`pace`]).
struct Pacing {
    volume: String,
    lag: Lag,
    links: Arc<Links>,
    heartbeat: Duration,
    /// When a wait was last logged (at most one line every [`PACE_LOG_EVERY`]).
    logged: Option<Instant>,
    /// [`HandOver::hold`].
    handover: Arc<HandOver>,
}

const PACE_LOG_EVERY: Duration = Duration::from_secs(10);

/// A follower that keeps up lags by the group commit's entries in flight at most.
const PACE_FLOOR_KIB: u64 = (BATCHES_IN_FLIGHT * BATCH_BYTES) as u64 >> 10;

impl Lag {
    /// How far (KiB applied after the last entry it has) a follower that takes entries may
    /// lag before writes wait for it: half the log every replica keeps behind what it applied
    /// (so that whichever replica leads next still has what a live follower needs, with the
    /// entries in flight, which are not counted yet, on top: with the default `keep_logs`,
    /// 64 MiB, and any of 32 MiB or more), but no less than [`PACE_FLOOR_KIB`], and no more
    /// than half what a leader keeps for a follower.
    fn limit_kib(&self) -> u64 {
        let size = self.size.load(std::sync::atomic::Ordering::SeqCst);
        (self.keep_kib / 2)
            .max(PACE_FLOOR_KIB)
            .min(hold_most_kib(size, self.keep_kib) / 2)
    }
}

/// On a leader: the voters other than itself, each with the last log index it has (`None`:
/// not known yet).
fn voter_followers(
    m: &openraft::RaftMetrics<NodeId, BasicNode>,
) -> impl Iterator<Item = (NodeId, Option<u64>)> + '_ {
    let membership = m.membership_config.membership();
    m.replication
        .iter()
        .flatten()
        .filter(move |(id, _)| **id != m.id && membership.voter_ids().any(|v| v == **id))
        .map(|(id, matched)| (*id, matched.map(|l| l.index)))
}

/// Whether a follower that has the log up to `matched` (`None`: not known yet; a snapshot
/// being sent is told apart by [`Links`]) is catching up with a leader whose log is purged up
/// to `purged`, `kib_after` saying how many KiB it applied after an entry (if it can tell, see
/// [`Applied::kib_after`]): it is behind the purge point (it needs a snapshot), or more than
/// `limit_kib` behind, which is set well above what writes let a live follower lag (so one
/// that sets their pace is not reported, a replica back from a restart or an outage is).
fn catching_up(
    matched: Option<u64>,
    purged: Option<u64>,
    kib_after: impl Fn(u64) -> Option<u64>,
    limit_kib: u64,
) -> bool {
    let Some(matched) = matched else {
        return false;
    };
    match kib_after(matched) {
        Some(kib) => kib > limit_kib,
        None => purged.is_some_and(|p| matched < p),
    }
}

/// The followers writes wait for, with the last entry each has and how far behind it is (KiB):
/// on a leader, the voters that took new entries within two heartbeats and have not failed to
/// take any since (one that hangs, dies or is cut off is not waited for, nor is a learner being
/// filled), whose next entries the log still has (one that needs a snapshot is not waited for
/// either), and that lag by more than [`Lag::limit_kib`].
fn lagging(
    m: &openraft::RaftMetrics<NodeId, BasicNode>,
    p: &Pacing,
) -> BTreeMap<NodeId, (u64, u64)> {
    let Some(applied) = p.lag.applied.upgrade() else {
        return BTreeMap::new();
    };
    let limit = p.lag.limit_kib();
    voter_followers(m)
        .filter(|(id, _)| p.links.taking(*id, 2 * p.heartbeat))
        .filter_map(|(id, matched)| {
            let matched = matched?;
            let behind = applied.kib_after(matched).filter(|kib| *kib > limit)?;
            Some((id, (matched, behind)))
        })
        .collect()
}

/// Before a leader's next log entry: while followers that take entries lag by more than the
/// limit, waits until each of them has taken more (or stopped taking), so that writes go at the
/// pace of the slowest live replica instead of leaving it behind. A replica systematically
/// slower than the others (a slower disk, a busier host) would otherwise fall further behind
/// with every write until the log it needs is purged, and be sent the whole volume, again and
/// again while the writes go on (the volume running on the other replicas meanwhile), as
/// synchronous replication (Ceph, DRBD, Longhorn) never lets happen. The wait ends at the latest
/// two heartbeats after the follower last took anything: one that hangs is not waited for.
async fn pace(raft: &Raft<TypeConfig>, p: &mut Pacing) {
    let mut metrics = raft.metrics();
    let waiting = lagging(&metrics.borrow_and_update().clone(), p);
    if waiting.is_empty() {
        return;
    }
    if p.logged.is_none_or(|at| at.elapsed() >= PACE_LOG_EVERY) {
        p.logged = Some(Instant::now());
        for (id, (_, kib)) in &waiting {
            tracing::info!(
                volume = %p.volume,
                "writes wait for node {id}, {} MiB behind",
                kib >> 10
            );
        }
    }
    loop {
        if let Ok(Err(_)) = tokio::time::timeout(p.heartbeat, metrics.changed()).await {
            return;
        }
        let now = lagging(&metrics.borrow_and_update().clone(), p);
        if waiting
            .iter()
            .all(|(id, (had, _))| now.get(id).is_none_or(|(m, _)| m > had))
        {
            return;
        }
    }
}

/// The group commit of one group: the writes that queue up while earlier entries are being
/// committed go into the log together as the next entry (one entry, one fsync per replica, one
/// round of replication for all of them). While an entry is in flight the next one waits to
/// fill up: a second (up to [`BATCHES_IN_FLIGHT`]) is submitted only when it is full, so small
/// writes make few large entries and a stream of large ones is pipelined. Entries are committed
/// in the order they were submitted (`client_write_ff` queues one in raft's order and returns);
/// the writes of each are answered once it is applied.
async fn batcher(
    raft: Raft<TypeConfig>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Pending>,
    mut pacing: Pacing,
) {
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (mut batch, mut in_flight, mut open) = (Batch::default(), 0usize, true);
    while open || !batch.ops.is_empty() {
        while !batch.full() {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let go = !batch.ops.is_empty()
            && (in_flight == 0 || !open || (batch.full() && in_flight < BATCHES_IN_FLIGHT));
        if go {
            pace(&raft, &mut pacing).await;
            // Writes that came meanwhile go with it.
            while !batch.full() {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            in_flight += 1;
            // (Held across the submission: once a hand-over holds the lock, every entry
            // submitted before is queued in raft ahead of what it asks raft next.)
            let handover = pacing.handover.clone();
            let _open = handover.hold.read().await;
            submit(&raft, std::mem::take(&mut batch), done_tx.clone()).await;
            continue;
        }
        tokio::select! {
            p = rx.recv(), if open && !batch.full() => match p {
                Some(p) => batch.push(p),
                None => open = false,
            },
            Some(()) = done_rx.recv() => in_flight -= 1,
        }
    }
}

/// Submits `batch` as one log entry; its writers are answered (and `done` told) once it is
/// applied or has failed.
async fn submit(
    raft: &Raft<TypeConfig>,
    mut batch: Batch,
    done: tokio::sync::mpsc::UnboundedSender<()>,
) {
    let op = if batch.ops.len() == 1 {
        batch.ops.pop().expect("one")
    } else {
        BlockOp::Batch(batch.ops)
    };
    let waiters = batch.waiters;
    let answer = move |outcome: Result<(), NotHereOr>| {
        let _ = done.send(());
        for w in waiters {
            let _ = w.send(outcome.clone());
        }
    };
    match raft.client_write_ff(op).await {
        Ok(applied) => {
            tokio::spawn(async move {
                answer(match applied.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(ClientWriteError::ForwardToLeader(f))) => {
                        Err(NotHereOr::NotHere(match f.leader_node {
                            Some(n) => NotHere::Leader(n.addr),
                            None => NotHere::NoLeader("no leader yet".into()),
                        }))
                    }
                    Ok(Err(e)) => Err(NotHereOr::Failed(e.to_string())),
                    Err(_) => Err(NotHereOr::Failed("the volume's raft stopped".into())),
                });
            });
        }
        Err(e) => answer(Err(NotHereOr::Failed(e.to_string()))),
    }
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("name", &self.name)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// A storage node.
#[derive(Debug)]
pub struct Node {
    pub id: NodeId,
    dir: PathBuf,
    timing: Timing,
    groups: RwLock<HashMap<String, Group>>,
    /// The volumes this node holds a replica of (`volumes.json`).
    catalog: tokio::sync::Mutex<BTreeMap<String, VolumeSpec>>,
    /// Volumes deleted through the cluster that this node was told of (`deleted.json`).
    tombstones: tokio::sync::Mutex<Tombstones>,
    /// The NBD server whose exports follow the volumes, if the node serves NBD.
    nbd: RwLock<Option<crate::nbd::Server>>,
    /// Where each volume is served over vhost-user-blk (`<dir>/<volume>.sock`), if it is, and
    /// the volumes served there.
    vhost: std::sync::Mutex<Option<(PathBuf, HashMap<String, crate::vhost_user::Served>)>>,
    /// The storage nodes of the cluster (id -> RPC address): where new volumes go.
    cluster: RwLock<BTreeMap<NodeId, String>>,
    /// On a client of the cluster ([`Node::client`]): the storage nodes it was given, which it
    /// asks for the node list.
    seeds: Option<BTreeMap<NodeId, String>>,
    /// When the node list was last taken from the storage nodes ([`Node::refresh_cluster`]);
    /// held while it is (one at a time).
    refreshed: tokio::sync::Mutex<Option<Instant>>,
}

/// Replicas of a new volume (fewer when the cluster is smaller).
pub const REPLICAS: usize = 3;

fn err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// The error of a membership change: `WouldBlock` (try again, through the new leader) when
/// this node no longer leads.
fn change_err(
    what: String,
    e: RaftError<NodeId, openraft::error::ClientWriteError<NodeId, BasicNode>>,
) -> io::Error {
    let kind = match e.api_error() {
        Some(openraft::error::ClientWriteError::ForwardToLeader(_)) => io::ErrorKind::WouldBlock,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("{what}: {e}"))
}

/// Whether `dir` holds a replica's files and nothing else: `log` (segments, `meta.json`,
/// `committed`) and `blocks` (`volume.img`, `current.json`, `snapshots`), either of them
/// (a replica cut short while it was opened has only its log), and temporary files.
fn is_replica_dir(dir: &Path) -> bool {
    let names = |d: &Path| -> Option<Vec<String>> {
        let entries = std::fs::read_dir(d).ok()?;
        entries
            .map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
            .collect()
    };
    let temporary = |n: &str| n.ends_with(".tmp");
    let log_file = |n: &str| {
        let segment = n.len() == 24
            && n[..20].bytes().all(|b| b.is_ascii_digit())
            && matches!(&n[20..], ".seg" | ".free" | ".held");
        segment || matches!(n, "meta.json" | "committed") || temporary(n)
    };
    let blocks_file =
        |n: &str| matches!(n, "volume.img" | "current.json" | "snapshots") || temporary(n);
    let Some(top) = names(dir) else {
        return false;
    };
    !top.is_empty()
        && top.iter().all(|n| match n.as_str() {
            "log" => names(&dir.join(n)).is_some_and(|l| l.iter().all(|f| log_file(f))),
            "blocks" => names(&dir.join(n)).is_some_and(|b| b.iter().all(|f| blocks_file(f))),
            _ => false,
        })
}

/// Whether `e`, from an `Open`, is the node's refusal (it holds another volume of the name,
/// or the spec is not for it): it opened nothing. Anything else (no answer in time, the
/// connection lost) may have opened the replica all the same.
fn refused_open(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::AlreadyExists | io::ErrorKind::InvalidInput
    )
}

/// A volume name's FNV-1a hash: where it is placed ([`Node::place`]).
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The nodes of `cluster` in the order a new volume `name` takes its members from: all of
/// them, from the one the name hashes to on.
fn placement_order(name: &str, cluster: &BTreeMap<NodeId, String>) -> Vec<(NodeId, String)> {
    let nodes: Vec<(NodeId, String)> = cluster.iter().map(|(i, a)| (*i, a.clone())).collect();
    let start = (name_hash(name) % nodes.len().max(1) as u64) as usize;
    nodes[start..]
        .iter()
        .chain(&nodes[..start])
        .cloned()
        .collect()
}

/// A volume's size: a whole number of 512-byte sectors (as disks are addressed), not 0.
fn check_size(name: &str, size: u64) -> io::Result<()> {
    if size == 0 || !size.is_multiple_of(512) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("volume {name}: size {size}: not a whole number of 512-byte sectors, or 0"),
        ));
    }
    Ok(())
}

/// Endings of the names of the node's own files beside its replicas' directories
/// (`volumes.json`, `deleted.json`, `cluster.json`, their `.tmp` while they are replaced,
/// vpcd's `nbd.sock`): no volume is named so.
const RESERVED_ENDINGS: [&str; 3] = [".json", ".tmp", ".sock"];

fn check_volume_name(name: &str) -> io::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("volume name {name:?}: 1 to 64 of a-z A-Z 0-9 - _ . (not leading .)"),
        ))
    }
}

/// [`check_volume_name`] for a volume to be made (a create, a node's command line), which no
/// name ending as the node's own files do may have; a replica of one made before is still
/// opened and moved.
pub fn check_new_volume_name(name: &str) -> io::Result<()> {
    check_volume_name(name)?;
    match RESERVED_ENDINGS.iter().find(|e| name.ends_with(*e)) {
        Some(e) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("volume name {name:?}: names ending in {e} are the storage node's own files"),
        )),
        None => Ok(()),
    }
}

/// Whether the filesystem of `dir` takes a file of `size` bytes (sparse: nothing is
/// allocated), for volume `name` to grow to it: an unnamed file (`O_TMPFILE`, gone with its
/// descriptor, whatever happens) set to that length. Growing past what a replica's
/// filesystem takes would stop its group for good: the grow is in the log, and applying it
/// again fails again.
fn check_room(dir: &Path, name: &str, size: u64) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let too_big = |e: io::Error| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "volume {name}: {size} bytes: more than the storage node's filesystem takes in \
                 a file ({e})"
            ),
        )
    };
    // Past what a file offset holds: refused before any call.
    let len = i64::try_from(size).map_err(|e| too_big(io::Error::other(e)))?;
    let probe = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(dir);
    let probe = match probe {
        Ok(f) => f,
        // A filesystem without unnamed files (NFS, older overlayfs): no telling.
        Err(e) => {
            tracing::debug!(
                volume = name,
                "grow not checked: O_TMPFILE in {}: {e}",
                dir.display()
            );
            return Ok(());
        }
    };
    match probe.set_len(len as u64) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EFBIG | libc::EINVAL)) => Err(too_big(e)),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("volume {name}: checking room for {size} bytes: {e}"),
        )),
        Ok(()) => Ok(()),
    }
}

/// How long a request waits for a leader (an election) before it fails, at least
/// ([`Node::leader_wait`]: longer if the election timeout is).
const LEADER_WAIT: Duration = Duration::from_secs(15);
/// Most bytes of a write in one operation of the log (a longer one is split, see
/// [`RaftVolume`]'s `write`).
const MAX_WRITE_OP: usize = 1 << 20;

/// Raft timing: heartbeats, and the election timeout range (which bounds failover).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub heartbeat_ms: u64,
    pub election_ms: (u64, u64),
    /// A snapshot once this many MiB have been applied since the last one, each entry counted
    /// as at least 64 KiB (so: after this many entries of 1 MiB). A snapshot is an fdatasync of
    /// the blocks (see `state_machine.rs`), so this is about how much log is kept, not about
    /// cost: the log is a rolling window that reuses the memory and disk it frees.
    pub snapshot_logs: u64,
    /// MiB of log kept (counted as for `snapshot_logs`) behind the newest entry applied, so
    /// that a replica that fell a little behind (a restart) catches up from the log instead of
    /// receiving the whole volume. A leader keeps more for a follower that answers (see
    /// `snapshot_when_due`).
    pub keep_logs: u64,
    /// MiB of log segments that writes of 64 KiB or more, applied by reference to where the
    /// log holds them, may keep after the log is purged: past it, the segments holding the
    /// fewest bytes of such writes have them copied to the blocks; a write overwritten before
    /// that is never written there. 0: every write goes to the blocks as it is applied.
    pub defer_logs: u64,
    /// MiB of log per segment file: a segment takes no more appends once it holds this much.
    /// Purged segments are reused, or held while writes applied by reference are in them.
    pub segment_mib: u64,
    /// Every this many seconds a leader hands the volumes it leads that their preferred member
    /// should lead back to it ([`rebalance`]); 0: never.
    pub rebalance_s: u64,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            heartbeat_ms: 250,
            election_ms: (1000, 2000),
            snapshot_logs: 64,
            keep_logs: 64,
            defer_logs: super::state_machine::HOLD_BYTES >> 20,
            segment_mib: super::segment_log::SEGMENT_BYTES >> 20,
            rebalance_s: 10,
        }
    }
}

/// The most log a leader keeps for a follower that is behind (see [`snapshot_when_due`]).
const HOLD_LOGS_MAX: u64 = 1 << 30;

/// Triggers a snapshot of a group whenever `applied` has `due_kib` since the last one, and
/// purges the log up to where `keep_kib` were applied after it (openraft purges only what a
/// snapshot holds); ends with the state machine.
///
/// A leader purges no entry a follower that answered within `answering` still needs, unless
/// the volume's `size` (at least `keep_kib`, at most [`HOLD_LOGS_MAX`]) or more was applied
/// after it: a snapshot would then be cheaper to send. openraft sends a follower whose next
/// entry is purged the whole volume instead, and under a steady stream of writes a follower a
/// little slower than the others never caught up: every snapshot took it longer than the log
/// it missed took them (the third replica of a volume written at ~570 MiB/s on this 2-core VM
/// was sent the whole volume 5 times in 2 GiB of writes, and held no log of its own). A
/// follower that does not answer is not waited for: it gets a snapshot when it is back.
/// Followers purge their own logs as before, so a newly elected leader has only `keep_kib`
/// behind it to offer a follower that lags.
async fn snapshot_when_due(
    raft: Raft<TypeConfig>,
    applied: std::sync::Weak<Applied>,
    links: Arc<Links>,
    size: Size,
    (due_kib, keep_kib): (u64, u64),
    answering: Duration,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        // Not kept alive by this task: it ends with the state machine.
        let Some(applied) = applied.upgrade() else {
            return;
        };
        if applied.since_snapshot() >= due_kib && raft.trigger().snapshot().await.is_err() {
            return;
        }
        let m = raft.metrics().borrow().clone();
        let most_kib = hold_most_kib(size.load(std::sync::atomic::Ordering::SeqCst), keep_kib);
        let hold =
            needed_by_followers(&m, &links, answering).map(|matched| Hold { matched, most_kib });
        // Up to the last snapshot only (one just asked for may not be built yet: its entries
        // stay marked until it is).
        let snapshot = m.snapshot.map(|l| l.index);
        if let Some(upto) = snapshot.and_then(|s| applied.purge_point(keep_kib, s, hold)) {
            if raft.trigger().purge_log(upto).await.is_err() {
                return;
            }
        }
    }
}

/// The most log (KiB applied after the last entry a follower has) a leader keeps for a
/// follower, of a volume of `size` bytes (see [`snapshot_when_due`]).
fn hold_most_kib(size: u64, keep_kib: u64) -> u64 {
    (size >> 10).min(HOLD_LOGS_MAX >> 10).max(keep_kib)
}

/// On a leader: the last log index of the follower furthest behind among those that answered
/// within `answering` (0 for one whose progress this leader does not know yet: just elected,
/// it has not heard back from it).
fn needed_by_followers(
    m: &openraft::RaftMetrics<NodeId, BasicNode>,
    links: &Links,
    answering: Duration,
) -> Option<u64> {
    m.replication
        .as_ref()?
        .iter()
        .filter(|(id, _)| **id != m.id && links.answered_within(**id, answering))
        .map(|(_, matched)| matched.map_or(0, |l| l.index))
        .min()
}

/// [`Node::orphaned`] from the statuses of the group other nodes gave (`answers`), this node
/// being `me` at term `mine`: only a leader of the newest term anyone knows, this node
/// included, decides; without one, nothing can be told (a node that has no such volume is no
/// proof: the volume may have one replica, or its other replicas may be lost).
fn orphan_verdict(me: NodeId, mine: u64, answers: &[Status]) -> Option<bool> {
    let newest = answers.iter().map(|s| s.term).max()?.max(mine);
    let s = answers
        .iter()
        .find(|s| s.leader == Some(s.node) && s.term == newest)?;
    Some(!s.members.contains(&me) && !s.learners.contains(&me) && s.moving != Some(me))
}

/// How long a replica stays in no group before [`Node::drop_if_unformed`] looks at it: longer
/// than a create takes from opening the replicas to initializing the group, or a move from
/// opening the replica to adding it as a learner ([`QUICK`] each).
const UNFORMED: Duration = Duration::from_secs(20);

/// Every 10 s: the replicas the node holds that have been in no group for [`UNFORMED`] are
/// dropped if no group will have them ([`Node::drop_if_unformed`]). Ends with the node.
async fn sweep_unformed(node: std::sync::Weak<Node>) {
    let mut since: BTreeMap<(String, u64), Instant> = BTreeMap::new();
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let Some(node) = node.upgrade() else {
            return;
        };
        let specs = node.catalog.lock().await.clone();
        let mut unformed = BTreeMap::new();
        // (Volumes given on the command line, id 0, are initialized by every node.)
        for spec in specs.into_values().filter(|s| s.id != 0) {
            let Some(g) = node.group(&spec.name) else {
                continue;
            };
            let st = g.status(node.id);
            if st.in_group() {
                continue;
            }
            let key = (spec.name.clone(), spec.id);
            let first = since.get(&key).copied().unwrap_or_else(Instant::now);
            unformed.insert(key, first);
            if first.elapsed() >= UNFORMED {
                node.drop_if_unformed(&spec, st.term).await;
            }
        }
        since = unformed;
    }
}

/// Every `every`: the volumes this node leads that another member should lead are handed to
/// it ([`Node::hand_over`]), one after the other, so that leaders spread over the nodes again
/// after a failure gathered them on the survivors (as Kafka's preferred leader election does).
/// A volume's preferred leader is the member its name hashes to ([`Node::first_member`]: the
/// one that led it first). Ends with the node.
async fn rebalance(node: std::sync::Weak<Node>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    // Volumes whose hand-over failed, and when.
    let mut failed: HashMap<String, Instant> = HashMap::new();
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else {
            return;
        };
        failed.retain(|_, at| at.elapsed() < HAND_OVER_BACK_OFF);
        let specs: Vec<VolumeSpec> = node.catalog.lock().await.values().cloned().collect();
        for spec in specs {
            if failed.contains_key(&spec.name) {
                continue;
            }
            let Some(g) = node.group(&spec.name) else {
                continue;
            };
            let Some(to) = node.preferred_leader(&g, &spec) else {
                continue;
            };
            match node.hand_over(&g, to).await {
                Ok(true) => tracing::info!(volume = %spec.name, "handed over to node {to}"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(volume = %spec.name, "not handed over to node {to}: {e}");
                    failed.insert(spec.name.clone(), Instant::now());
                }
            }
        }
    }
}

/// How long a leader handing a volume over waits for the member to have its log, for its
/// answer, and (twice this) for it to be elected.
const HAND_OVER_WAIT: Duration = Duration::from_secs(1);

/// How long a volume whose hand-over failed is left where it is.
const HAND_OVER_BACK_OFF: Duration = Duration::from_secs(60);

/// While this node leads and has no move under way: removes from the group every learner
/// (one left by a move that a leader change or a crash cut short), and has that node drop
/// the replica opened for it; no move starts meanwhile. Ends when the group's raft shuts
/// down.
async fn drop_stray_learners(
    volume: String,
    raft: Raft<TypeConfig>,
    busy: Arc<std::sync::Mutex<Option<Busy>>>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let m = raft.metrics().borrow().clone();
        match m.state {
            openraft::ServerState::Shutdown => return,
            openraft::ServerState::Leader => {}
            _ => continue,
        }
        let membership = m.membership_config.membership();
        if membership.learner_ids().next().is_none() {
            continue;
        }
        // No move under way (its learner is not a stray), and none starts until this is done.
        let Ok(_cleaning) = BusyMark::take(&busy, Busy::Cleaning) else {
            continue;
        };
        let stray: BTreeMap<NodeId, String> = membership
            .learner_ids()
            .filter_map(|id| Some((id, membership.get_node(&id)?.addr.clone())))
            .collect();
        let ids = stray.keys().copied().collect();
        if let Err(e) = raft
            .change_membership(ChangeMembers::RemoveNodes(ids), false)
            .await
        {
            tracing::warn!(volume, learners = ?stray.keys(), "stray learners not removed: {e}");
            continue;
        }
        for (id, addr) in stray {
            tracing::info!(volume, node = id, "stray learner removed");
            if let Err(e) = manage_quick(&addr, Rpc::Drop(volume.clone(), 0)).await {
                tracing::warn!(volume, node = id, "replica not dropped: {e}");
            }
        }
    }
}

/// How long a replica whose raft stopped on its own waits before it is reopened, at first and
/// at most ([`keep_open`]): each failed try, and each stop soon after a reopen, doubles it.
const REOPEN_FIRST: Duration = Duration::from_secs(1);
const REOPEN_MOST: Duration = Duration::from_secs(60);

/// Which replica a [`Group`] runs, of which volume (its id, [`VolumeSpec::id`]). A replica
/// keeps it when it is reopened ([`keep_open`]), so front ends that serve it ([`RaftVolume`])
/// go on with the reopened one; a replica of the same name opened after this one was dropped
/// has another.
#[derive(Clone)]
struct Incarnation(Arc<u64>);

impl Incarnation {
    fn of(volume_id: u64) -> Incarnation {
        Incarnation(Arc::new(volume_id))
    }

    fn is(&self, other: &Incarnation) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The volume's id (0: one given on the command line, which has none).
    fn volume_id(&self) -> u64 {
        *self.0
    }
}

/// What may be left of a replica (or of an attempt to open one) after its raft stopped: its
/// log's writer thread and its state machine (also held by a snapshot build openraft runs on a
/// task of its own), which write in its directory. A replica's directory is opened again, or
/// removed, only once none of it is.
#[derive(Default)]
struct Remains {
    logs: Vec<super::segment_log::LogAlive>,
    applied: Vec<std::sync::Weak<Applied>>,
}

impl Remains {
    fn of(g: &Group) -> Remains {
        Remains {
            logs: vec![g.log.clone()],
            applied: vec![g.lag.applied.clone()],
        }
    }

    fn gone(&mut self) -> bool {
        self.logs.retain(|l| l.alive());
        self.applied.retain(|a| a.strong_count() > 0);
        self.logs.is_empty() && self.applied.is_empty()
    }

    /// Waits until [`Remains::gone`] (a snapshot build, the log's last jobs: seconds at most),
    /// saying so every 10 s.
    async fn wait_gone(&mut self, volume: &str) {
        let since = Instant::now();
        let mut said = since;
        while !self.gone() {
            if said.elapsed() >= Duration::from_secs(10) {
                said = Instant::now();
                tracing::warn!(
                    volume,
                    "waiting {} s so far for the stopped replica's log and state machine to end",
                    since.elapsed().as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Waits until `raft` stops; why, if it stopped on its own (a storage error or a panic, not a
/// shutdown asked for). It wakes only when the server's state changes (elections), not with
/// every write.
async fn stopped(raft: &Raft<TypeConfig>) -> Option<Fatal<NodeId>> {
    let mut server = raft.server_metrics();
    // Ends when the raft core, which holds the sender, is gone.
    while server.changed().await.is_ok() {}
    Some(why_stopped(raft)).filter(|e| !matches!(e, Fatal::Stopped))
}

/// Why `raft`, whose core has ended, stopped: what it said, or a panic if it said nothing.
fn why_stopped(raft: &Raft<TypeConfig>) -> Fatal<NodeId> {
    let said = raft.metrics().borrow().running_state.clone();
    said.err().unwrap_or(Fatal::Panicked)
}

/// Keeps `node`'s replica `g` running: openraft treats every storage error as fatal, so a
/// replica whose log write fails (its disk full) would stop for good. Whenever its raft stops
/// on its own, the replica is reopened from its directory, as a restart of the node would, once
/// nothing of the stopped one is left ([`Remains`]), and tried again, waiting twice as long each
/// time up to [`REOPEN_MOST`], until it runs: a replica whose disk was full catches up by itself
/// once there is room again. The stopped group stays the node's until a reopen works (it answers
/// with errors meanwhile). Ends once the replica is dropped, or shut down on purpose.
async fn keep_open(node: std::sync::Weak<Node>, mut g: Group) {
    let mut wait = REOPEN_FIRST;
    loop {
        let ran = Instant::now();
        let Some(why) = stopped(&g.raft).await else {
            return;
        };
        if ran.elapsed() > REOPEN_MOST {
            wait = REOPEN_FIRST;
        }
        let (name, incarnation) = (g.name.clone(), g.incarnation.clone());
        let size = g.size.load(std::sync::atomic::Ordering::SeqCst);
        let mut remains = Remains::of(&g);
        drop(g);
        tracing::error!(volume = %name, "the replica's raft stopped: {why}; it is reopened once it can be");
        let mut failures = 0u32;
        g = loop {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(REOPEN_MOST);
            let Some(n) = node.upgrade() else { return };
            let tried = if remains.gone() {
                n.reopen(&name, size, &incarnation).await
            } else {
                Err(io::Error::other(
                    "the stopped replica's log or state machine is still in use",
                ))
            };
            match tried {
                Ok(Some(g)) => break g,
                Ok(None) => return,
                Err(e) => {
                    failures += 1;
                    // 1, 2, 4, ... failures: a disk that stays full does not flood the log.
                    if failures.is_power_of_two() {
                        tracing::warn!(
                            volume = %name,
                            "reopening the replica failed ({failures} times so far): {e}; tried again in {} s",
                            wait.as_secs()
                        );
                    }
                }
            }
        };
        tracing::info!(volume = %name, "the replica was reopened");
    }
}

/// Most bytes of data in one part of a streamed snapshot (one RPC).
const SNAPSHOT_CHUNK: u64 = 4 << 20;

/// How far (in log entries, each up to [`BATCH_BYTES`]) a learner may be behind to count as
/// caught up.
const CAUGHT_UP_ENTRIES: u64 = 8;

/// How long a leader whose connection ended has to answer, and how far apart the survivors of
/// a dead one elect again ([`Node::leader_gone`]).
const LEADER_PROBE: Duration = Duration::from_millis(200);

/// How long after a quorum acknowledged it a leader serves reads without asking the quorum
/// again: half the shortest election timeout (followers refuse to vote while they hear from
/// their leader; see [`Node::leader_gone`] for the one case where they do not wait for that).
fn read_lease(config: &openraft::Config) -> Duration {
    Duration::from_millis(config.election_timeout_min / 2)
}

/// The answer of a move sent to volume `name`'s leader at `leader`: a leader that died is for
/// the caller to try again with (`WouldBlock`).
fn answered(name: &str, leader: &str, r: io::Result<()>) -> io::Result<()> {
    r.map_err(|e| {
        if gone(&e) {
            again(name, leader, &e.to_string())
        } else {
            e
        }
    })
}

fn again(name: &str, leader: &str, e: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::WouldBlock,
        format!("volume {name}: its leader at {leader}: {e}"),
    )
}

/// Waits for `answer`, a move sent to volume `name`'s leader at `leader`, while that node
/// answers (probed every second); `WouldBlock` once it does not (it hangs, or is cut off).
async fn while_answering(
    name: &str,
    leader: &str,
    answer: impl std::future::Future<Output = io::Result<()>>,
) -> io::Result<()> {
    tokio::pin!(answer);
    loop {
        tokio::select! {
            r = &mut answer => return answered(name, leader, r),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if probe(leader, LEADER_PROBE * 5).await != Some(true) {
            return Err(again(name, leader, "it does not answer"));
        }
    }
}

/// The status of `volume` from its leader at `addr`, or `known` with the leader among the
/// unreachable if it does not answer within [`remote::ASK`].
async fn as_leader_sees(mut known: Status, addr: &str, volume: &str) -> Status {
    match tokio::time::timeout(remote::ASK, status(addr, volume)).await {
        Ok(Ok(s)) => s,
        _ => {
            known.unreachable.extend(known.leader);
            known
        }
    }
}

/// How the node at `addr` takes a request (any) within `within`: `Some(true)`, it answers;
/// `Some(false)`, its process is gone ([`gone`]); `None`, no telling (no answer in time, or
/// another error).
async fn probe(addr: &str, within: Duration) -> Option<bool> {
    let mut conn = None;
    match tokio::time::timeout(within, call(&mut conn, addr, &Rpc::Cluster)).await {
        Ok(Ok(_)) => Some(true),
        Ok(Err(e)) if gone(&e) => Some(false),
        _ => None,
    }
}

/// Whether `e`, from a request to a node, says its process is gone: nothing listens at its
/// address, or it closed the connection without answering.
fn gone(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionReset | UnexpectedEof | BrokenPipe
    )
}

/// A replica being moved in that takes no data for this long, and fails, ends the move; a
/// voter that does is reported stalled ([`Status::stalled`]).
const STALLED: Duration = Duration::from_secs(10);

fn raft_config(t: Timing) -> openraft::Config {
    openraft::Config {
        cluster_name: "sbs".into(),
        heartbeat_interval: t.heartbeat_ms,
        election_timeout_min: t.election_ms.0,
        election_timeout_max: t.election_ms.1,
        install_snapshot_timeout: 4 * t.heartbeat_ms.max(500),
        // An AppendEntries carries at most 8 entries, and at most APPEND_BYTES of data (a
        // partial success, see `Peer::append_entries`): it must arrive within a heartbeat
        // interval (openraft's timeout for it).
        max_payload_entries: 8,
        // A learner counts as caught up (`add_learner` returns, a moved replica becomes a
        // voter) within this many entries of the leader's log, i.e. streaming at line rate.
        // openraft's default, 5000, is a whole volume's worth here: a replica moved would
        // become a voter, and the old one be dropped, long before its snapshot arrived.
        replication_lag_threshold: CAUGHT_UP_ENTRIES,
        // By bytes applied instead (`snapshot_when_due`).
        snapshot_policy: openraft::SnapshotPolicy::Never,
        // Purged by bytes instead (`snapshot_when_due`).
        max_in_snapshot_log_to_keep: u64::MAX,
        ..Default::default()
    }
}

impl Node {
    /// A node keeping its state in `dir`; [`Node::start`] reopens the volumes it holds.
    pub fn new(id: NodeId, dir: &Path, timing: Timing) -> Arc<Node> {
        Node::build(id, dir, timing, None)
    }

    /// A client of the cluster whose storage nodes are `nodes` (id -> RPC address): a node
    /// that holds no replica and is in no node list (nothing is placed or moved onto it), and
    /// serves every volume through the nodes that hold them. Its id, another than the storage
    /// nodes', names it in volumes' users. It keeps the node list in memory only, taken from
    /// the storage nodes ([`Node::follow_cluster`]), as they do not tell it of changes.
    pub fn client(
        id: NodeId,
        dir: &Path,
        timing: Timing,
        nodes: BTreeMap<NodeId, String>,
    ) -> io::Result<Arc<Node>> {
        if let Some(addr) = nodes.get(&id) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("client {id}: the id of the storage node at {addr}"),
            ));
        }
        let node = Node::build(id, dir, timing, Some(nodes.clone()));
        node.set_cluster(nodes);
        Ok(node)
    }

    fn build(
        id: NodeId,
        dir: &Path,
        timing: Timing,
        seeds: Option<BTreeMap<NodeId, String>>,
    ) -> Arc<Node> {
        Arc::new(Node {
            id,
            dir: dir.to_owned(),
            timing,
            groups: RwLock::new(HashMap::new()),
            catalog: tokio::sync::Mutex::new(BTreeMap::new()),
            tombstones: tokio::sync::Mutex::new(BTreeMap::new()),
            nbd: RwLock::new(None),
            vhost: std::sync::Mutex::new(None),
            cluster: RwLock::new(BTreeMap::new()),
            seeds,
            refreshed: tokio::sync::Mutex::new(None),
        })
    }

    /// How long a request waits for a leader: [`LEADER_WAIT`], or three times the longest
    /// election timeout if that is longer (a leader that hangs is replaced after its lease,
    /// the longest timeout, and a timeout more).
    fn leader_wait(&self) -> Duration {
        LEADER_WAIT.max(Duration::from_millis(3 * self.timing.election_ms.1))
    }

    /// The storage nodes new volumes are placed on.
    pub fn set_cluster(&self, members: BTreeMap<NodeId, String>) {
        *self.cluster.write().unwrap() = members;
    }

    /// The members of a new volume `name`: `replicas` nodes of the cluster that answer (within
    /// [`remote::ASK`]), taken in turn from a place the name decides, so volumes (and their
    /// leaders) spread over the nodes, and a node that is down is passed over as Ceph's CRUSH
    /// passes over an OSD marked out. `HostUnreachable`, naming them, if too few answer.
    async fn place(&self, name: &str, replicas: usize) -> io::Result<BTreeMap<NodeId, String>> {
        use futures::StreamExt;
        let order = placement_order(name, &self.cluster());
        if order.is_empty() {
            return Err(err("no cluster members known (--member)"));
        }
        // All asked at once, the answers taken in order: a node that does not answer holds the
        // placement up only while it is among the first that could be taken.
        let mut answers: futures::stream::FuturesOrdered<_> = order
            .iter()
            .map(|(id, addr)| async move {
                *id == self.id || probe(addr, remote::ASK).await == Some(true)
            })
            .collect();
        let (mut up, mut down) = (Vec::new(), Vec::new());
        for member in &order {
            if up.len() == replicas {
                break;
            }
            match answers.next().await {
                Some(true) => up.push(member.clone()),
                _ => down.push(member.0),
            }
        }
        if up.len() < replicas {
            let down: Vec<String> = down.iter().map(|id| id.to_string()).collect();
            return Err(io::Error::new(
                io::ErrorKind::HostUnreachable,
                format!(
                    "volume {name}: not created: {replicas} replicas, but only {} of the \
                     cluster's nodes answer (not node {})",
                    up.len(),
                    down.join(", ")
                ),
            ));
        }
        Ok(up.into_iter().collect())
    }

    /// `AlreadyExists` if a node of the cluster that answers holds a volume named `name` (a
    /// volume's replicas need not be on the nodes its name places a new one on: joins, leaves
    /// and moves move them). A volume held only by nodes that do not answer is not seen.
    async fn check_name_free(&self, name: &str) -> io::Result<()> {
        let here = self.catalog.lock().await.get(name).map(|s| s.id);
        let holder = match here {
            Some(id) => Some((self.id, id)),
            // (None that answered holds it: an error.)
            None => self
                .locate_volume(name, None)
                .await
                .ok()
                .map(|s| (s.node, s.id)),
        };
        match holder {
            // (A leftover replica of a deleted volume, that a node cut off from the delete
            // still has, is dropped by the create; a node that did not hear of the delete
            // asks the others.)
            Some((node, id)) if !self.was_deleted(name, id).await => Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("volume {name} already exists (node {node} holds it)"),
            )),
            _ => Ok(()),
        }
    }

    /// The member of new volume `name` that starts its group, and so leads it first: the one
    /// its name hashes to among `members` (the same on every node, whatever cluster list each
    /// has: a create sent on is never sent on again), so that leaders spread over the nodes,
    /// whichever node the create came through.
    fn first_member(name: &str, members: &BTreeMap<NodeId, String>) -> (NodeId, String) {
        let i = (name_hash(name) % members.len().max(1) as u64) as usize;
        let (id, addr) = members.iter().nth(i).expect("members");
        (*id, addr.clone())
    }

    /// The member `g`'s volume (`spec`) should be led by, if this node leads it and should
    /// not: its preferred leader ([`Node::first_member`]), a voter that answers, takes
    /// entries and is within a few of this node's log, with no change of the members under
    /// way. Not for volumes given on the nodes' command lines (id 0: every node initializes
    /// them, none leads them first). Only in a group of up to three voters: the member is
    /// elected by its own vote and this node's, the others refusing while they hear from this
    /// leader (openraft 0.9 has no leadership transfer; a member that asked the others in a
    /// larger group would lose, and its higher term would then cost the group an election
    /// timeout without a leader).
    fn preferred_leader(&self, g: &Group, spec: &VolumeSpec) -> Option<NodeId> {
        let id = g.incarnation.volume_id();
        if id == 0 || spec.id != id || spec.members.len() < 2 {
            return None;
        }
        let (to, _) = Node::first_member(&spec.name, &spec.members);
        let m = g.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
        let busy = g.busy.lock().unwrap_or_else(|e| e.into_inner()).is_some();
        let quiet = membership.learner_ids().next().is_none() && !busy;
        let heartbeat = Duration::from_millis(self.timing.heartbeat_ms);
        let near = |matched: &Option<super::LogId>| {
            let last = m.last_log_index.unwrap_or(0);
            matched.is_some_and(|l| l.index + CAUGHT_UP_ENTRIES >= last)
        };
        let ready = m.state == openraft::ServerState::Leader
            && to != self.id
            && quiet
            && voters.len() <= 3
            // (Members as this node's catalog has them, and as the group has them: nodes whose
            // catalogs differ could otherwise prefer different members.)
            && spec.members.keys().copied().eq(voters.iter().copied())
            && g.links.answered_within(to, 2 * heartbeat)
            && !g.links.failing(to)
            && !g.links.sending(to)
            && m.replication
                .as_ref()
                .and_then(|r| r.get(&to))
                .is_some_and(near);
        ready.then_some(to)
    }

    /// Hands the volume of `g`, which this node leads, to member `to`: with no other change of
    /// the members under way, holds the group commit (and lease reads), waits until `to` has
    /// the whole log, invites it ([`Rpc::Elect`]: its vote request is the one this leader
    /// passes to raft, which grants it), and waits until it leads; then writes go on, to the
    /// new leader. `Ok(false)`: not now (this node has led for less than its lease from its
    /// election, within which raft refuses any vote; another change is under way).
    async fn hand_over(&self, g: &Group, to: NodeId) -> io::Result<bool> {
        let name = &g.name;
        let since = g
            .raft
            .with_raft_state(|s| s.vote_last_modified())
            .await
            .map_err(err)?;
        let lease = Duration::from_millis(g.raft.config().election_timeout_max);
        if since.is_none_or(|t| t.elapsed() <= lease + HAND_OVER_WAIT) {
            return Ok(false);
        }
        let Ok(_busy) = BusyMark::take(&g.busy, Busy::HandingOver) else {
            return Ok(false);
        };
        let addr = {
            let m = g.raft.metrics().borrow().clone();
            match m.membership_config.membership().get_node(&to) {
                Some(n) => n.addr.clone(),
                None => return Ok(false),
            }
        };
        let handover = g.handover.clone();
        let _held = handover.hold.write().await;
        // Through raft's queue, after every entry submitted before the hold (each appended to
        // the log as raft took it).
        g.raft.with_raft_state(|_| ()).await.map_err(err)?;
        let Some(last) = g.log.last_log_id() else {
            return Ok(false);
        };
        let has_log = |m: &openraft::RaftMetrics<NodeId, BasicNode>| {
            let matched = m.replication.as_ref().and_then(|r| r.get(&to));
            m.state == openraft::ServerState::Leader && matched.is_some_and(|l| *l >= last)
        };
        let wait = |within| g.raft.wait(Some(within));
        if wait(HAND_OVER_WAIT)
            .metrics(has_log, "the member has the log")
            .await
            .is_err()
        {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("volume {name}: node {to} did not have the log within {HAND_OVER_WAIT:?}"),
            ));
        }
        *handover.invited.lock().unwrap_or_else(|e| e.into_inner()) = Some(to);
        let id = g.incarnation.volume_id();
        let asked = match tokio::time::timeout(
            HAND_OVER_WAIT,
            manage(&addr, Rpc::Elect(name.clone(), id, last)),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{addr} did not answer within {HAND_OVER_WAIT:?}"),
            )),
        };
        let led = match &asked {
            Ok(()) => wait(2 * HAND_OVER_WAIT)
                .metrics(|m| m.current_leader == Some(to), "the member leads")
                .await
                .is_ok(),
            Err(_) => false,
        };
        // Before writes and lease reads go on: no more of its vote requests pass, those that
        // did are answered, and the metrics tell raft's vote (if it granted one, this node no
        // longer leads).
        *handover.invited.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let settled = std::time::Instant::now();
        while handover.passing.load(std::sync::atomic::Ordering::SeqCst) > 0
            && settled.elapsed() < HAND_OVER_WAIT
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let vote = g
            .raft
            .with_raft_state(|s| *s.vote_ref())
            .await
            .map_err(err)?;
        let _ = wait(HAND_OVER_WAIT)
            .metrics(|m| m.vote == vote, "the metrics tell the vote")
            .await;
        asked.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("volume {name}: node {to} asked to elect itself: {e}"),
            )
        })?;
        if !led {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "volume {name}: node {to} did not lead within {:?} of being asked to",
                    2 * HAND_OVER_WAIT
                ),
            ));
        }
        Ok(true)
    }

    /// Serves every volume (now and later) on `server` too: those it holds a replica of, and
    /// the cluster's others when a client names them (`remote.rs`).
    pub fn serve_nbd(self: &Arc<Node>, server: crate::nbd::Server) {
        server.set_resolver(Arc::new(remote::Remote(Arc::downgrade(self))));
        for g in self.groups.read().unwrap().values() {
            server.add(self.export(g));
        }
        *self.nbd.write().unwrap() = Some(server);
    }

    /// Serves every volume (now and later) over vhost-user-blk too, each on
    /// `<dir>/<volume>.sock`.
    pub fn serve_vhost_user(self: &Arc<Node>, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)?;
        *self.vhost.lock().unwrap() = Some((dir.to_owned(), HashMap::new()));
        let groups: Vec<Group> = self.groups.read().unwrap().values().cloned().collect();
        groups.iter().try_for_each(|g| self.vhost_add(g))
    }

    fn vhost_add(self: &Arc<Node>, g: &Group) -> io::Result<()> {
        let mut v = self.vhost.lock().unwrap();
        let Some((dir, served)) = v.as_mut() else {
            return Ok(());
        };
        if !served.contains_key(&g.name) {
            let volume = Arc::new(RaftVolume::new(self.clone(), g));
            let socket = dir.join(format!("{}.sock", g.name));
            let rt = tokio::runtime::Handle::current();
            served.insert(
                g.name.clone(),
                crate::vhost_user::serve(&g.name, volume, &socket, rt)?,
            );
        }
        Ok(())
    }

    fn vhost_remove(&self, name: &str) {
        let gone = self
            .vhost
            .lock()
            .unwrap()
            .as_mut()
            .and_then(|(_, served)| served.remove(name));
        if let Some(s) = gone {
            s.stop();
        }
    }

    fn export(self: &Arc<Node>, g: &Group) -> crate::nbd::Export {
        crate::nbd::Export {
            name: g.name.clone(),
            description: "replicated volume".into(),
            volume: Arc::new(RaftVolume::new(self.clone(), g)),
            read_only: false,
        }
    }

    fn catalog_path(&self) -> PathBuf {
        self.dir.join("volumes.json")
    }

    async fn save_catalog(&self, c: &BTreeMap<String, VolumeSpec>) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(c).map_err(err)?;
        let path = self.catalog_path();
        tokio::task::spawn_blocking(move || crate::raft::write_atomic(&path, &bytes))
            .await
            .map_err(err)?
    }

    /// Removes the directory of a replica of `name` that the catalog does not have: what a
    /// crash left between opening a replica and recording it, or between recording its drop
    /// and removing its files (the catalog is the truth; under its lock). Only a directory
    /// holding nothing but a replica's files ([`is_replica_dir`]) is touched.
    fn remove_leftover(&self, name: &str) -> io::Result<()> {
        let dir = self.dir.join(name);
        if !is_replica_dir(&dir) {
            return Ok(());
        }
        tracing::info!(volume = name, "removing a replica's leftover files");
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io::Error::new(
                e.kind(),
                format!(
                    "volume {name}: removing the leftover {}: {e}",
                    dir.display()
                ),
            )),
            _ => Ok(()),
        }
    }

    fn tombstones_path(&self) -> PathBuf {
        self.dir.join("deleted.json")
    }

    /// Remembers that volume (`name`, `id`) was deleted, durably, and drops this node's
    /// replica of it if it still has one (it was not reached by the delete).
    async fn remember_deleted(&self, name: &str, id: u64) -> io::Result<()> {
        {
            let mut t = self.tombstones.lock().await;
            if !t.entry(name.to_string()).or_default().insert(id) {
                return Ok(());
            }
            let bytes = serde_json::to_vec_pretty(&*t).map_err(err)?;
            let path = self.tombstones_path();
            tokio::task::spawn_blocking(move || crate::raft::write_atomic(&path, &bytes))
                .await
                .map_err(err)??;
        }
        let spec = self.catalog.lock().await.get(name).cloned();
        match spec {
            Some(spec) if spec.id == id => self.drop_replica_of(name, Only::Spec(&spec)).await,
            _ => Ok(()),
        }
    }

    /// Whether volume (`name`, `id`) was deleted, as this node or any other node of the
    /// cluster that answers knows.
    async fn was_deleted(&self, name: &str, id: u64) -> bool {
        if buried(&*self.tombstones.lock().await, name, id) {
            return true;
        }
        for (n, addr) in self.cluster() {
            if n != self.id && buried_on(&addr, name, id, QUICK).await {
                return true;
            }
        }
        false
    }

    /// Reopens the volumes of the catalog (after a restart).
    pub async fn start(self: &Arc<Node>) -> io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        match std::fs::read(self.tombstones_path()) {
            Ok(b) => *self.tombstones.lock().await = serde_json::from_slice(&b).map_err(err)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let c: Option<BTreeMap<String, VolumeSpec>> = match std::fs::read(self.catalog_path()) {
            Ok(b) => Some(serde_json::from_slice(&b).map_err(err)?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        // A client holds no replica: one that was a storage node must give its volumes up
        // first (moved away by `remove_node` while it was one).
        let held: Vec<&String> = c.iter().flat_map(|c| c.keys()).collect();
        if self.is_client() && !held.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a client of the cluster holds no replica, and {} holds replicas of {held:?} \
                     (it was a storage node): give it the storage role until they are moved off",
                    self.dir.display()
                ),
            ));
        }
        // (Without a catalog there is nothing to go by: nothing is removed.)
        if let Some(c) = &c {
            for entry in std::fs::read_dir(&self.dir)? {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if entry.file_type()?.is_dir()
                    && check_volume_name(&name).is_ok()
                    && !c.contains_key(&name)
                {
                    self.remove_leftover(&name)?;
                }
            }
        }
        let c = c.unwrap_or_default();
        for spec in c.values() {
            self.open_volume(spec).await?;
        }
        // Nodes that joined or left since the configuration was written (a client asks).
        if let Some(members) = self.saved_cluster()?.filter(|_| !self.is_client()) {
            self.set_cluster(members);
        }
        let specs: Vec<VolumeSpec> = c.values().cloned().collect();
        *self.catalog.lock().await = c;
        for spec in specs {
            tokio::spawn(self.clone().drop_if_orphaned(spec));
        }
        tokio::spawn(sweep_unformed(Arc::downgrade(self)));
        if self.timing.rebalance_s > 0 {
            let every = Duration::from_secs(self.timing.rebalance_s);
            tokio::spawn(rebalance(Arc::downgrade(self), every));
        }
        Ok(())
    }

    /// Drops this node's replica of `spec`, which is in no group yet (never initialized, no
    /// leader has sent it anything), if no group will ever have it: the group went on without
    /// this node ([`Node::orphaned`]: a move to it cut short), or the group never formed (a
    /// create cut short before its coordinator initialized the group: every other member
    /// answers, none has it in a group); then the other members drop theirs too.
    async fn drop_if_unformed(&self, spec: &VolumeSpec, term: u64) {
        match self.orphaned(spec, term).await {
            Some(true) => {
                tracing::info!(volume = %spec.name, "a replica no group has: dropped");
                return self.drop_orphan(spec).await;
            }
            Some(false) => return,
            None => {}
        }
        const ASK: Duration = Duration::from_secs(2);
        // The other members' replicas of this very volume, none in a group.
        let mut unformed = Vec::new();
        for (id, addr) in spec.members.iter().filter(|(id, _)| **id != self.id) {
            match tokio::time::timeout(ASK, status(addr, &spec.name)).await {
                // (Another volume of the name there: not this one's.)
                Ok(Ok(s)) if s.id != spec.id => {}
                Ok(Ok(s)) if !s.in_group() => unformed.push((*id, addr.clone())),
                Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => {}
                // In a group there, or it cannot be told.
                _ => {
                    tracing::debug!(volume = %spec.name, node = id, "not known to be unformed");
                    return;
                }
            }
        }
        tracing::info!(volume = %spec.name, "a group that never formed (its create was cut short): replicas dropped");
        // (Each drops its replica only if it is in no group still.)
        for (id, addr) in unformed {
            let rpc = Rpc::DropUnformed(spec.name.clone(), spec.id);
            if let Err(e) = manage_quick(&addr, rpc).await {
                tracing::warn!(volume = %spec.name, node = id, "replica not dropped: {e}");
            }
        }
        if let Err(e) = self.drop_unformed(&spec.name, spec.id).await {
            tracing::warn!(volume = %spec.name, "replica not dropped: {e}");
        }
    }

    /// Drops this node's replica of volume (`name`, `id`) if it is in no group (never
    /// initialized, nothing from a leader); refused (`InvalidInput`) if it is in one.
    async fn drop_unformed(&self, name: &str, id: u64) -> io::Result<()> {
        let spec = self.catalog.lock().await.get(name).cloned();
        let Some(spec) = spec.filter(|s| id != 0 && s.id == id) else {
            return Ok(());
        };
        if self
            .group(name)
            .is_some_and(|g| g.status(self.id).in_group())
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("volume {name}: node {}: its replica is in a group", self.id),
            ));
        }
        self.drop_replica_of(name, Only::Spec(&spec)).await
    }

    /// Drops this node's replica of `spec` if the group has gone on without it (see
    /// [`Node::orphaned`]), asking again every second until that can be told, for up to
    /// [`LEADER_WAIT`] times four.
    async fn drop_if_orphaned(self: Arc<Node>, spec: VolumeSpec) {
        // The term the replica had when it was opened: elections it may start later (a voter
        // the group no longer has) raise it with nobody following.
        let Some(term) = self.group(&spec.name).map(|g| g.status(self.id).term) else {
            return;
        };
        let deadline = tokio::time::Instant::now() + 4 * LEADER_WAIT;
        while tokio::time::Instant::now() < deadline {
            if self.catalog.lock().await.get(&spec.name) != Some(&spec) {
                return; // dropped, or changed, meanwhile
            }
            match self.orphaned(&spec, term).await {
                Some(true) => {
                    tracing::info!(volume = %spec.name, "the group went on without this node: replica dropped");
                    return self.drop_orphan(&spec).await;
                }
                Some(false) => return,
                None => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
        tracing::info!(volume = %spec.name, "no leader answered; replica kept");
    }

    /// Whether the group of `spec` went on without this node while it could not be told: a
    /// node has a tombstone of this volume (deleted while this node was down), or (a move off
    /// this node, or to it, that ended while it was down) its leader, of the newest
    /// term this node or any other node of the cluster knows (the cluster as the nodes know it
    /// now: some may have joined since), has it neither as a member nor as the node a move is
    /// under way to. None while that cannot be told. `term`: this node's term at start.
    async fn orphaned(&self, spec: &VolumeSpec, term: u64) -> Option<bool> {
        const ASK: Duration = Duration::from_secs(2);
        let mut nodes = spec.members.clone();
        nodes.extend(self.cluster());
        nodes.remove(&self.id);
        for addr in nodes.clone().values() {
            if let Ok(Ok(c)) = tokio::time::timeout(ASK, cluster(addr)).await {
                nodes.extend(c);
                nodes.remove(&self.id);
                break;
            }
        }
        let mut answers = Vec::new();
        for addr in nodes.values() {
            if buried_on(addr, &spec.name, spec.id, ASK).await {
                return Some(true);
            }
            if let Ok(Ok(s)) = tokio::time::timeout(ASK, status(addr, &spec.name)).await {
                answers.push(s);
            }
        }
        orphan_verdict(self.id, term, &answers)
    }

    async fn drop_orphan(&self, spec: &VolumeSpec) {
        if let Err(e) = self.drop_replica_of(&spec.name, Only::Spec(spec)).await {
            tracing::warn!(volume = %spec.name, "orphaned replica not dropped: {e}");
        }
    }

    /// This node's replica of `spec`: opened (created if new) and remembered.
    pub async fn open_replica(self: &Arc<Node>, spec: &VolumeSpec) -> io::Result<()> {
        check_volume_name(&spec.name)?;
        if !spec.members.contains_key(&self.id) {
            return Err(err(format!(
                "volume {}: node {} is not a member",
                spec.name, self.id
            )));
        }
        // A replica of a deleted volume of that name, left here because the delete did not
        // reach this node, goes first; one of a live volume is refused.
        let have = self.catalog.lock().await.get(&spec.name).cloned();
        if let Some(have) = have.filter(|h| h.id != 0 && spec.id != 0 && h.id != spec.id) {
            if !self.was_deleted(&have.name, have.id).await {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "volume {}: node {} holds another volume of that name",
                        spec.name, self.id
                    ),
                ));
            }
            tracing::info!(volume = %spec.name, "a deleted volume's replica dropped for a new one");
            self.drop_replica_of(&have.name, Only::Spec(&have)).await?;
        }
        let mut c = self.catalog.lock().await;
        if let Some(have) = c.get(&spec.name) {
            if have.members != spec.members || have.size != spec.size || have.id != spec.id {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("volume {} exists (with another size or members)", spec.name),
                ));
            }
            return Ok(());
        }
        // (Not another volume's data under this one's name.)
        self.remove_leftover(&spec.name)?;
        self.open_volume(spec).await?;
        c.insert(spec.name.clone(), spec.clone());
        self.save_catalog(&c).await
    }

    /// Creates `spec` on all its members and starts its group (from this node). Without
    /// members, the volume is placed on the cluster ([`Node::place`]).
    pub async fn create_volume(self: &Arc<Node>, spec: &VolumeSpec) -> io::Result<()> {
        check_new_volume_name(&spec.name)?;
        if spec.id == 0 {
            use std::hash::{BuildHasher, Hasher};
            // A random 64-bit number: std's randomly seeded hasher, fed the time.
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::UNIX_EPOCH
                    .elapsed()
                    .map_or(0, |d| d.as_nanos()),
            );
            let spec = VolumeSpec {
                id: h.finish().max(1),
                ..spec.clone()
            };
            return Box::pin(self.create_volume(&spec)).await;
        }
        if spec.members.is_empty() {
            // (A client's node list may be up to a refresh old.)
            if self.is_client() {
                self.refresh_cluster().await?;
            }
            let replicas = match spec.replicas {
                0 => REPLICAS.min(self.cluster.read().unwrap().len()),
                n => n as usize,
            };
            let nodes = self.cluster.read().unwrap().len();
            if replicas > nodes {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "volume {}: {replicas} replicas, but the cluster has {nodes} nodes",
                        spec.name
                    ),
                ));
            }
            self.check_name_free(&spec.name).await?;
            let members = self.place(&spec.name, replicas).await?;
            let spec = VolumeSpec {
                members,
                ..spec.clone()
            };
            return Box::pin(self.create_volume(&spec)).await;
        }
        let (id, addr) = Self::first_member(&spec.name, &spec.members);
        if id != self.id {
            // The member that starts the group coordinates (it leads the group first); its
            // opens take QUICK at most.
            let wait = 4 * QUICK;
            let Ok(done) =
                tokio::time::timeout(wait, manage(&addr, Rpc::Create(spec.clone()))).await
            else {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "volume {}: node {id}, which creates it, did not answer within {} s: it \
                         may be made yet (vol-info tells)",
                        spec.name,
                        wait.as_secs()
                    ),
                ));
            };
            return done.map_err(|e| {
                let why = if gone(&e) {
                    format!("volume {}: not created: node {id}: {e}", spec.name)
                } else {
                    format!("node {id}: {e}")
                };
                io::Error::new(e.kind(), why)
            });
        }
        if self.catalog.lock().await.contains_key(&spec.name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("volume {} already exists", spec.name),
            ));
        }
        check_size(&spec.name, spec.size)?;
        // Every member opens its replica (at once, [`QUICK`] each); if one cannot, those that
        // did (or may have) drop theirs again: a create is whole or not at all.
        let opens = spec.members.iter().map(|(id, addr)| async move {
            let opened = if *id == self.id {
                self.open_replica(spec).await
            } else {
                manage_quick(addr, Rpc::Open(spec.clone())).await
            };
            (*id, addr, opened)
        });
        let opened = futures::future::join_all(opens).await;
        let failed = opened.iter().find_map(|(id, _, r)| {
            r.as_ref()
                .err()
                .map(|e| io::Error::new(e.kind(), format!("node {id}: {e}")))
        });
        // The group starts here; a fresh replica that cannot start it (it took part in
        // another group's election meanwhile) fails the create too.
        let failed = match failed {
            Some(e) => e,
            None => match self.start_new_group(&spec.name, &spec.members).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            },
        };
        for (id, addr, r) in opened {
            if matches!(&r, Err(e) if refused_open(e)) {
                continue;
            }
            let undone = if id == self.id {
                self.drop_replica_of(&spec.name, Only::Spec(spec)).await
            } else {
                manage_quick(addr, Rpc::Drop(spec.name.clone(), spec.id)).await
            };
            if let Err(e) = undone {
                tracing::warn!(volume = %spec.name, node = id, "create not undone there: {e}");
            }
        }
        Err(io::Error::new(
            failed.kind(),
            format!("volume {}: not created: {failed}", spec.name),
        ))
    }

    /// Drops this node's replica of `name`: its raft stops, its export and files go.
    pub async fn drop_replica(&self, name: &str) -> io::Result<()> {
        self.drop_replica_of(name, Only::Any).await
    }

    /// [`Node::drop_replica`], if the replica of `name` is the one `only` says.
    async fn drop_replica_of(&self, name: &str, only: Only<'_>) -> io::Result<()> {
        let mut c = self.catalog.lock().await;
        match (only, c.get(name)) {
            (Only::Spec(s), have) if have != Some(s) => {
                tracing::info!(
                    volume = name,
                    "not dropped: the replica is another one by now"
                );
                return Ok(());
            }
            (Only::Id(id), Some(have)) if id != 0 && have.id != 0 && have.id != id => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "volume {name}: node {} holds another volume of that name ({:#x}, not {id:#x})",
                        self.id, have.id
                    ),
                ));
            }
            _ => {}
        }
        let g = self.groups.write().unwrap().remove(name);
        if let Some(server) = self.nbd.read().unwrap().as_ref() {
            server.remove(name);
        }
        self.vhost_remove(name);
        if let Some(g) = g {
            g.raft.shutdown().await.map_err(err)?;
            // Nothing of it writes in the directory once it is removed (a new replica of that
            // name may be opened there next).
            Remains::of(&g).wait_gone(name).await;
        }
        // (A node whose disk is full may fail to record the drop; the directory is left then,
        // and the replica, out of its group, is dropped as an orphan at the node's next start.)
        if c.remove(name).is_some() {
            self.save_catalog(&c).await.map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "volume {name}: node {} could not record the replica's drop: {e}",
                        self.id
                    ),
                )
            })?;
        }
        match std::fs::remove_dir_all(self.dir.join(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Deletes `name` on all its members: refused while a domain has it (see `claims.rs`), and
    /// unless `force`, when that cannot be told (its group has no leader that answers).
    pub async fn delete_volume(self: &Arc<Node>, name: &str, force: bool) -> io::Result<()> {
        let spec = self.catalog.lock().await.get(name).cloned();
        let Some(spec) = spec else {
            // Held by other nodes only: through one of them (its leader). (Dropping each
            // replica, and telling each node, takes up to QUICK.) A delete that took too long
            // to answer may have been done all the same.
            let rpc = || Rpc::DeleteHere(name.to_string(), force);
            let wait = QUICK * (3 + self.cluster().len() as u32);
            return self.on_holder(name, rpc, wait, true, force).await;
        };
        self.delete_held(name, spec, force).await
    }

    /// Deletes volume `spec`, which this node holds a replica of, on all its members
    /// ([`Node::delete_volume`]).
    async fn delete_held(
        self: &Arc<Node>,
        name: &str,
        spec: VolumeSpec,
        force: bool,
    ) -> io::Result<()> {
        // Not while it is attached, and nothing attaches it from now on. A volume whose group
        // cannot decide (no leader, or one cut off from the others) only if forced: its space
        // must be possible to free whatever state its replicas are in, but a node cut off
        // from the others cannot tell whether a domain uses it.
        let decided = self.claim_volume(name, BlockOp::Delete);
        let leaderless = self
            .group(name)
            .is_none_or(|g| g.status(self.id).leader.is_none());
        let decided = if force && leaderless {
            // Forced, with no leader known: an election's time for one to decide, not the
            // whole leader wait (a leader that decides later deletes it all the same). A
            // leader known is waited for: it may refuse (a domain has the volume).
            let wait = Duration::from_millis(2 * self.timing.election_ms.1);
            tokio::time::timeout(wait, decided)
                .await
                .unwrap_or_else(|_| {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("volume {name}: no leader decided within {wait:?}"),
                    ))
                })
        } else {
            decided.await
        };
        match decided {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::ResourceBusy => return Err(e),
            Err(e) if force => tracing::warn!(
                volume = name,
                "forced: deleted without knowing whether a domain has it: {e}"
            ),
            Err(e) => {
                return Err(io::Error::new(
                    io::ErrorKind::HostUnreachable,
                    format!(
                        "volume {name}: whether a domain has it could not be told ({e}); a \
                         forced delete deletes it all the same"
                    ),
                ))
            }
        }
        if spec.id != 0 {
            // Every node remembers the delete first (best effort: one is enough), so a member
            // down now drops its replica when it is back, whenever this stops (a node told
            // drops its replica too).
            let mut nodes = self.cluster();
            nodes.extend(spec.members.clone());
            for (id, addr) in nodes {
                let told = if id == self.id {
                    self.remember_deleted(name, spec.id).await
                } else {
                    manage_quick(&addr, Rpc::Deleted(name.to_string(), spec.id)).await
                };
                if let Err(e) = told {
                    tracing::warn!(volume = name, node = id, "delete not recorded there: {e}");
                }
            }
        }
        for (id, addr) in &spec.members {
            if *id == self.id {
                // (Not a new volume of the name made here meanwhile.)
                self.drop_replica_of(name, Only::Spec(&spec)).await?;
                continue;
            }
            match manage_quick(addr, Rpc::Drop(name.to_string(), spec.id)).await {
                // The member refused (it holds another volume of that name).
                Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                    return Err(err(format!("node {id}: {e}")))
                }
                // A member that is down (or cut off) drops its replica when it is back and
                // finds the volume's tombstone on another node (`orphaned`), or is told of it
                // (`Deleted`); the volume is gone for everyone else.
                Err(e) => tracing::warn!(volume = name, node = id, "not reached: {e}"),
                Ok(()) => {}
            }
        }
        Ok(())
    }

    /// Grows volume `name` (one this node holds) to `size` bytes.
    pub async fn resize_volume(self: &Arc<Node>, name: &str, size: u64) -> io::Result<()> {
        match self.group(name) {
            Some(g) => RaftVolume::new(self.clone(), &g).resize(size).await,
            // Held by other nodes only: through its leader.
            None => {
                let rpc = || Rpc::ResizeHere(name.to_string(), size);
                self.on_holder(name, rpc, self.leader_wait(), false, false)
                    .await
            }
        }
    }

    /// Changes the users of volume `name` ([`BlockOp::Attach`], `Detach`, `Delete`) on its
    /// leader, through this node's replica or, if it has none that runs, through a node that
    /// holds one: `ResourceBusy` naming why if the leader refuses (`claims.rs`).
    pub async fn claim_volume(self: &Arc<Node>, name: &str, op: BlockOp) -> io::Result<()> {
        match self.group(name).filter(|g| g.stopped().is_none()) {
            Some(g) => RaftVolume::new(self.clone(), &g).claim(op).await,
            None => {
                let rpc = || Rpc::ClaimHere(name.to_string(), op.clone());
                self.on_holder(name, rpc, self.leader_wait(), false, false)
                    .await
            }
        }
    }

    /// Sends management request `rpc` for volume `name`, which this node holds no replica
    /// of, to its leader (`ResizeHere`, `DeleteHere`: not sent on again), answered within
    /// `wait`; tried again, for up to the leader wait, while there is no leader, the one found
    /// does not answer or no longer holds the volume, or the nodes that did not answer may
    /// hold it. `done_if_gone`: a volume no node holds (every node answered) after a try that
    /// may have been carried out unanswered (not answered in time, the connection lost after
    /// the request went out) is done (a delete). `leaderless`: while the volume has no leader,
    /// a node that holds it takes the request (a forced delete).
    async fn on_holder(
        &self,
        name: &str,
        rpc: impl Fn() -> Rpc,
        wait: Duration,
        done_if_gone: bool,
        leaderless: bool,
    ) -> io::Result<()> {
        // Room for one try that is not answered in time, and the leader wait after it.
        let deadline = Instant::now() + wait + self.leader_wait();
        let mut unanswered = false;
        loop {
            let to = match self.locate_volume(name, None).await {
                Err(e) if e.kind() == io::ErrorKind::NotFound && unanswered && done_if_gone => {
                    return Ok(())
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(e),
                // Some nodes did not answer, and none that did holds it.
                Err(e) => Err(e),
                Ok(Status {
                    leader_addr: Some(addr),
                    ..
                }) => Ok(addr),
                Ok(s) => match self.cluster().get(&s.node).filter(|_| leaderless) {
                    Some(addr) => Ok(addr.clone()),
                    None => Err(io::Error::new(
                        io::ErrorKind::WouldBlock,
                        format!("volume {name}: no leader yet"),
                    )),
                },
            };
            let failed = match to {
                Err(e) => e,
                Ok(addr) => match tokio::time::timeout(wait, manage(&addr, rpc())).await {
                    // A node that no longer holds it, or is gone: the leader changed. One
                    // that refused the connection never had the request.
                    Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound || gone(&e) => {
                        unanswered |= gone(&e) && e.kind() != io::ErrorKind::ConnectionRefused;
                        e
                    }
                    Ok(r) => return r,
                    Err(_) => {
                        unanswered = true;
                        io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("volume {name}: its leader at {addr} did not answer"),
                        )
                    }
                },
            };
            if Instant::now() >= deadline {
                return Err(failed);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Records `spec` (new members of a volume this node holds).
    async fn update_spec(&self, spec: &VolumeSpec) -> io::Result<()> {
        let mut c = self.catalog.lock().await;
        if c.contains_key(&spec.name) {
            c.insert(spec.name.clone(), spec.clone());
            self.save_catalog(&c).await?;
        }
        Ok(())
    }

    /// Replaces member `from` of volume `name` (alive or dead) by node `to` at `addr`, on the
    /// group's leader (forwarded there): `to` opens an empty replica, joins as a learner and
    /// catches up (by snapshot if need be), then the membership becomes the new set; the
    /// members' catalogs follow, and `from` drops its replica if it can be reached.
    pub async fn move_replica(
        self: &Arc<Node>,
        name: &str,
        from: NodeId,
        to: NodeId,
        addr: &str,
    ) -> io::Result<()> {
        let Some(g) = self.group(name) else {
            // Held by other nodes only: through the node that says it leads (so it holds the
            // volume and does not send the request on); the caller tries again while there
            // is none.
            let found = self.locate(name).await?;
            let leader = found
                .leader_addr
                .filter(|_| found.leader == Some(found.node));
            let leader = leader.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("volume {name}: no leader answered"),
                )
            })?;
            let answer = manage(&leader, Rpc::Move(name.into(), from, to, addr.into()));
            return while_answering(name, &leader, answer).await;
        };
        if let Some(leader) = g.leader_addr(self.id) {
            // Through the leader. A leader that dies meanwhile, or hangs, is for the caller to
            // try again with (`WouldBlock`): its move dies with it, or fails when it hears of
            // the next leader, whose stray-learner cleanup takes out what it left. Another
            // leader known is not enough to give up: a leader that moved a replica off itself
            // steps down before it has told every member, and answers when it has.
            let rpc = Rpc::Move(name.into(), from, to, addr.into());
            let answer = manage(&leader, rpc);
            tokio::pin!(answer);
            tokio::select! {
                r = &mut answer => return answered(name, &leader, r),
                () = g.leader_moved(self.id, &leader) => {}
            }
            // Another leader is known: wait on while the old one answers.
            return while_answering(name, &leader, answer).await;
        }
        // Only the leader moves replicas: before it opens one anywhere (a group electing a new
        // leader has none yet), and one that a quorum still follows (one that hung and runs
        // again, say with this request queued, may not have heard of the next leader yet).
        if g.raft.metrics().borrow().state != openraft::ServerState::Leader
            || g.raft.ensure_linearizable().await.is_err()
        {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("volume {name}: no leader yet"),
            ));
        }
        let spec = self
            .catalog
            .lock()
            .await
            .get(name)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no volume {name}")))?;
        if !spec.members.contains_key(&from) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("volume {name}: node {from} holds no replica"),
            ));
        }
        if spec.members.contains_key(&to) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("volume {name}: node {to} holds a replica already"),
            ));
        }
        let _busy = g.start_move(to)?;
        let mut new = spec.clone();
        new.members.remove(&from);
        new.members.insert(to, addr.to_string());
        if let Err(e) = manage_quick(addr, Rpc::Open(new.clone())).await {
            if !refused_open(&e) {
                // Not refused: it may have opened the replica all the same (too late to say).
                if let Err(d) = manage_quick(addr, Rpc::Drop(name.into(), spec.id)).await {
                    tracing::warn!(volume = name, node = to, "replica not dropped: {d}");
                }
            }
            return Err(err(format!("node {to}: {e}")));
        }
        let voters: std::collections::BTreeSet<NodeId> = new.members.keys().copied().collect();
        // What `to` took when it held a replica before does not count for this move.
        g.links.reset(to);
        let joined = async {
            g.raft
                .add_learner(to, BasicNode::new(addr), false)
                .await
                .map_err(|e| change_err(format!("volume {name}: add node {to}"), e))?;
            // The learner catches up first (by snapshot if need be), at ~16 MiB/s at least.
            g.catch_up(to, Duration::from_secs(60 + spec.size / (16 << 20)))
                .await?;
            g.raft
                .change_membership(voters, false)
                .await
                .map_err(|e| change_err(format!("volume {name}: change members"), e))
        };
        if let Err(e) = joined.await {
            // Unless the membership change went through (then the group has it as a voter),
            // the learner leaves the group and drops the replica opened for it.
            // (When the learner cannot be taken out, this node no longer leads: the next leader
            // takes it out and has its replica dropped, `drop_stray_learners`.)
            // Only as the leader a quorum follows: a node that lost the lead sees an old
            // membership, in which `to` may be missing although the next leader made it a
            // voter (whose replica must stay).
            let leading = g.raft.ensure_linearizable().await.is_ok();
            let status = g.status(self.id);
            let out = if !leading {
                tracing::warn!(
                    volume = name,
                    node = to,
                    "no longer leading: the learner is the next leader's"
                );
                false
            } else if status.members.contains(&to) {
                false
            } else if status.learners.contains(&to) {
                let gone = ChangeMembers::RemoveNodes([to].into());
                match g.raft.change_membership(gone, false).await {
                    Ok(_) => true,
                    Err(r) => {
                        tracing::warn!(volume = name, node = to, "learner not taken out: {r}");
                        false
                    }
                }
            } else {
                true
            };
            if out {
                if let Err(d) = manage_quick(addr, Rpc::Drop(name.into(), spec.id)).await {
                    tracing::warn!(volume = name, node = to, "replica not dropped: {d}");
                }
            }
            return Err(e);
        }
        for (id, a) in &new.members {
            if *id == self.id {
                self.update_spec(&new).await?;
            } else if let Err(e) = manage_quick(a, Rpc::Update(new.clone())).await {
                tracing::warn!(volume = name, node = id, "catalog not updated: {e}");
            }
        }
        // The move is done: the next one may start while `from` is told to drop its replica.
        drop(_busy);
        let old = spec.members[&from].clone();
        let dropped = if from == self.id {
            self.drop_replica(name).await
        } else {
            manage_quick(&old, Rpc::Drop(name.into(), spec.id)).await
        };
        if let Err(e) = dropped {
            tracing::warn!(volume = name, node = from, "replica not dropped: {e}");
        }
        tracing::info!(volume = name, from, to, "replica moved");
        Ok(())
    }

    /// The volumes this node holds, with their status.
    pub async fn volumes(&self) -> Vec<(VolumeSpec, Status)> {
        let c = self.catalog.lock().await.clone();
        c.into_values()
            .filter_map(|mut spec| {
                let g = self.group(&spec.name)?;
                // The size now: resizes go through the log, the catalog has the first one.
                spec.size = g.size.load(std::sync::atomic::Ordering::SeqCst);
                Some((spec, g.status(self.id)))
            })
            .collect()
    }

    /// The status of `volume`'s group as its leader sees it (which voters it cannot reach, a
    /// move under way); this node's own when it leads or knows no leader, with the leader
    /// among the unreachable when it does not answer within 2 s. None if this node holds no
    /// such volume.
    pub async fn leader_status(&self, volume: &str) -> Option<Status> {
        let g = self.group(volume)?;
        let local = g.status(self.id);
        let Some(addr) = g.leader_addr(self.id) else {
            return Some(local);
        };
        Some(as_leader_sees(local, &addr, volume).await)
    }

    pub fn group(&self, volume: &str) -> Option<Group> {
        self.groups.read().unwrap().get(volume).cloned()
    }

    /// Opens (or creates) this node's replica of volume `spec`, starts its raft and serves it.
    pub async fn open_volume(self: &Arc<Node>, spec: &VolumeSpec) -> io::Result<Group> {
        let (volume, size) = (spec.name.as_str(), spec.size);
        if let Some(g) = self.group(volume) {
            return Ok(g);
        }
        let g = self
            .start_group(volume, size, Incarnation::of(spec.id))
            .await?;
        self.groups
            .write()
            .unwrap()
            .insert(volume.to_string(), g.clone());
        tokio::spawn(keep_open(Arc::downgrade(self), g.clone()));
        if let Some(server) = self.nbd.read().unwrap().as_ref() {
            server.add(self.export(&g));
        }
        if let Err(e) = self.vhost_add(&g) {
            tracing::warn!(volume, "serving over vhost-user-blk: {e}");
        }
        Ok(g)
    }

    /// Reopens replica `incarnation` of `volume` (its raft stopped, see [`keep_open`]) from its
    /// directory and makes it the node's in place of the stopped one; None if the node no
    /// longer has that replica (dropped meanwhile). Under the catalog's lock, as replicas are
    /// opened and dropped: never while the directory is removed or opened for another replica
    /// of that name. (The lock is held for the open: a log scan, seldom, see [`keep_open`].)
    async fn reopen(
        self: &Arc<Node>,
        volume: &str,
        size: u64,
        incarnation: &Incarnation,
    ) -> io::Result<Option<Group>> {
        let _catalog = self.catalog.lock().await;
        if !self
            .group(volume)
            .is_some_and(|g| g.incarnation.is(incarnation))
        {
            return Ok(None);
        }
        let g = self.start_group(volume, size, incarnation.clone()).await?;
        self.groups
            .write()
            .unwrap()
            .insert(volume.to_string(), g.clone());
        Ok(Some(g))
    }

    /// This node's replica of `volume` opened from its directory (created if new) and its raft
    /// started, with its tasks. An open that fails returns once nothing it opened is left
    /// (not tried again, nor dropped, while its log or state machine still runs).
    async fn start_group(
        &self,
        volume: &str,
        size: u64,
        incarnation: Incarnation,
    ) -> io::Result<Group> {
        let mut opened = Remains::default();
        let started = self
            .open_group(volume, size, incarnation, &mut opened)
            .await;
        if started.is_err() {
            opened.wait_gone(volume).await;
        }
        started
    }

    /// [`Node::start_group`]; what it opens goes into `opened` as it does.
    async fn open_group(
        &self,
        volume: &str,
        size: u64,
        incarnation: Incarnation,
        opened: &mut Remains,
    ) -> io::Result<Group> {
        let dir = self.dir.join(volume);
        // The log spans the entries kept behind the last snapshot and those after it (the
        // segments writes applied by reference hold are not the log's: given back, they are
        // spares, or deleted once there are enough). A leader's log spans more while it keeps
        // entries for a follower that lags (`snapshot_when_due`): those segments are new files.
        let span = (self.timing.snapshot_logs + self.timing.keep_logs) << 20;
        let log = SegmentLog::open_spanning(&dir.join("log"), span, self.timing.segment_mib << 20)?;
        let log_alive = log.alive();
        opened.logs.push(log_alive.clone());
        let sm = StateMachine::open(&dir.join("blocks"), size)?
            .with_log(&log, self.timing.defer_logs << 20)?;
        let (blocks, pieces, size, applied) = (sm.blocks(), sm.pieces(), sm.size(), sm.applied());
        let claims = sm.claims();
        opened.applied.push(Arc::downgrade(&applied));
        let config = Arc::new(
            raft_config(self.timing)
                .validate()
                .map_err(io::Error::other)?,
        );
        let links = Arc::<Links>::default();
        let network = Network {
            volume: volume.to_string(),
            id: incarnation.volume_id(),
            links: links.clone(),
            pieces: pieces.clone(),
            claims: claims.clone(),
        };
        let raft = Raft::new(self.id, config, network, log, sm)
            .await
            .map_err(io::Error::other)?;
        let (queue, rx) = tokio::sync::mpsc::unbounded_channel();
        let lag = Lag {
            applied: Arc::downgrade(&applied),
            size: size.clone(),
            keep_kib: self.timing.keep_logs << 10,
        };
        let pacing = Pacing {
            volume: volume.to_string(),
            lag: lag.clone(),
            links: links.clone(),
            heartbeat: Duration::from_millis(self.timing.heartbeat_ms),
            logged: None,
            handover: Arc::default(),
        };
        let handover = pacing.handover.clone();
        tokio::spawn(batcher(raft.clone(), rx, pacing));
        tokio::spawn(snapshot_when_due(
            raft.clone(),
            Arc::downgrade(&applied),
            links.clone(),
            size.clone(),
            (self.timing.snapshot_logs << 10, self.timing.keep_logs << 10),
            Duration::from_millis(2 * self.timing.election_ms.1),
        ));
        let g = Group {
            name: volume.to_string(),
            size,
            raft,
            blocks,
            pieces,
            queue,
            receiving: Arc::default(),
            links,
            busy: Arc::default(),
            lag,
            incarnation,
            log: log_alive,
            claims,
            claiming: Arc::default(),
            handover,
        };
        tokio::spawn(drop_stray_learners(
            volume.to_string(),
            g.raft.clone(),
            g.busy.clone(),
        ));
        Ok(g)
    }

    /// Makes `members` (id -> RPC address) the first membership of `volume` (on one node, once;
    /// again is fine).
    pub async fn initialize(
        &self,
        volume: &str,
        members: &BTreeMap<NodeId, String>,
    ) -> io::Result<()> {
        match self.initialize_raft(volume, members).await? {
            Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(io::Error::other(e)),
        }
    }

    /// Initializes the group of new volume `volume` with `members`, from this node's fresh
    /// replica: an error if the replica is not fresh (unlike [`Node::initialize`], which takes
    /// an initialized one as done).
    async fn start_new_group(
        &self,
        volume: &str,
        members: &BTreeMap<NodeId, String>,
    ) -> io::Result<()> {
        self.initialize_raft(volume, members).await?.map_err(|e| {
            io::Error::other(format!(
                "volume {volume}: node {}: its group could not be started: {e}",
                self.id
            ))
        })
    }

    async fn initialize_raft(
        &self,
        volume: &str,
        members: &BTreeMap<NodeId, String>,
    ) -> io::Result<Result<(), RaftError<NodeId, InitializeError<NodeId, BasicNode>>>> {
        let g = self
            .group(volume)
            .ok_or_else(|| io::Error::other(format!("volume {volume}: no replica here")))?;
        let nodes: BTreeMap<NodeId, BasicNode> = members
            .iter()
            .map(|(id, addr)| (*id, BasicNode::new(addr)))
            .collect();
        Ok(g.raft.initialize(nodes).await)
    }

    /// Serves the RPCs of the other nodes on `listener`.
    pub async fn serve(self: Arc<Node>, listener: tokio::net::TcpListener) -> io::Result<()> {
        loop {
            // Out of descriptors, say: the node must not stop listening while it runs (its
            // followers would take a refused connection for its death).
            let (mut s, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("RPC listener: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = s.set_nodelay(true);
            let node = self.clone();
            tokio::spawn(async move {
                // Greeted back whatever the peer is (so that it can say what it met), served
                // only if it speaks this version.
                let greeted = match read_hello(&mut s, &peer.to_string()).await {
                    Ok(()) => s.write_all(&hello()).await.is_ok(),
                    Err(e) => {
                        if e.kind() == io::ErrorKind::InvalidData {
                            tracing::warn!("{e}");
                            // Closed with its request unread, the connection would be reset,
                            // and the hello perhaps lost before the peer read it: the peer is
                            // left to close it.
                            let _ = s.write_all(&hello()).await;
                            let _ = s.shutdown().await;
                            let drain = async {
                                let mut b = [0u8; 4096];
                                while s.read(&mut b).await.is_ok_and(|n| n > 0) {}
                            };
                            let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
                        }
                        false
                    }
                };
                if !greeted {
                    return;
                }
                // The leader whose AppendEntries came over this connection last, and for
                // which group: when the connection ends, that leader may have died.
                let mut replicating = None;
                loop {
                    let rpc = match recv_msg::<Rpc>(&mut s).await {
                        Ok(rpc) => rpc,
                        Err(e) => {
                            if e.kind() == io::ErrorKind::InvalidData {
                                tracing::warn!("bad RPC frame: {e}");
                            }
                            break;
                        }
                    };
                    if let Rpc::Append(v, _, r) = &rpc {
                        replicating = r
                            .vote
                            .leader_id()
                            .voted_for()
                            .map(|l| (v.clone(), l, Instant::now()));
                    }
                    let reply = node.handle(rpc).await;
                    if let Err(e) = send_msg(&mut s, &reply).await {
                        if e.kind() == io::ErrorKind::InvalidInput {
                            tracing::warn!("RPC reply: {e}");
                        }
                        break;
                    }
                }
                if let Some((volume, leader, last)) = replicating {
                    node.leader_gone(&volume, leader, last).await;
                }
            });
        }
    }

    /// The connection over which `leader` replicated `volume` to this node has ended: if the
    /// leader's process is gone (its address refuses connections), elect a new one now instead
    /// of after openraft's election timer, which waits out the dead leader's lease first (the
    /// election timeout's maximum) and then a random timeout: 1.5-2 s with 500-1000 ms, 3-4 s
    /// by default. A leader whose host is down or cut off refuses nothing (its connections
    /// time out), and is left to the timer; one that is alive (a connection dropped after a
    /// timeout) answers, and stays.
    ///
    /// Every surviving voter sees its connection end and elects at once. A voter keeps the
    /// lease it gave the dead leader until it is a candidate itself, so it is the candidates
    /// that grant votes here: of two of the same term, the one with the lower id grants the
    /// other's (openraft orders the leaders of a term by node id), and one round elects the
    /// survivor with the highest id. Should a round elect nobody, the survivors elect again in
    /// turn, lowest id first, while nobody leads. Elections are safe at any time; this only
    /// decides when one starts.
    ///
    /// The election waits until the leader's read lease has run out, counted from the last
    /// AppendEntries it sent here (`last`): should it be alive after all (its listener gone,
    /// say), it must not serve a read from its lease while another leader takes writes.
    async fn leader_gone(&self, volume: &str, leader: NodeId, last: Instant) {
        let Some(g) = self.group(volume) else { return };
        let (addr, rank, survivors) = {
            let m = g.raft.metrics().borrow().clone();
            let membership = m.membership_config.membership();
            let survivors: Vec<NodeId> = membership.voter_ids().filter(|v| *v != leader).collect();
            let rank = survivors.iter().position(|v| *v == self.id);
            match (membership.get_node(&leader), rank) {
                (Some(n), Some(rank)) if m.current_leader == Some(leader) => {
                    (n.addr.clone(), rank as u32, survivors.len() as u32)
                }
                _ => return,
            }
        };
        // A dying process may still accept a connection (its listener closes after the
        // connections that ended): what tells is whether it answers.
        match probe(&addr, LEADER_PROBE).await {
            Some(false) => {}
            Some(true) => {
                tracing::info!(
                    volume,
                    leader,
                    "the leader's connection ended; it answers at {addr}: it stays"
                );
                return;
            }
            None => return,
        }
        let lease = read_lease(g.raft.config());
        tracing::info!(
            volume,
            leader,
            "the leader's process is gone (nothing answers at {addr}): electing once its read \
             lease has run out ({lease:?} after its last AppendEntries)"
        );
        tokio::time::sleep_until((last + lease).into()).await;
        let leads = |who| g.raft.metrics().borrow().current_leader == who;
        if !leads(Some(leader)) || g.raft.trigger().elect().await.is_err() {
            return;
        }
        // Up to two more rounds, each survivor in its turn, LEADER_PROBE apart (an election
        // on loopback takes milliseconds; a slow one is not cut short by the next survivor's).
        let mut wait = LEADER_PROBE / 4 + LEADER_PROBE * rank;
        for _ in 0..2 {
            tokio::time::sleep(wait).await;
            if !leads(None) || g.raft.trigger().elect().await.is_err() {
                return;
            }
            wait = LEADER_PROBE * survivors;
        }
    }

    /// A read for a node that holds no replica of `g`'s volume (`RemoteOp::Read`),
    /// linearizable as the front ends' reads here are.
    async fn read_for_peer(
        self: &Arc<Node>,
        g: &Group,
        offset: u64,
        length: u32,
    ) -> Result<Data, WireError> {
        let most = crate::nbd::server::MAX_PAYLOAD;
        let g = self.for_peer(g, offset, u64::from(length), most).await?;
        Ok(Data::from(g.local_read(offset, length).await?))
    }

    /// Block status for a node that holds no replica of `g`'s volume (`RemoteOp::Extents`).
    async fn extents_for_peer(
        self: &Arc<Node>,
        g: &Group,
        offset: u64,
        length: u64,
    ) -> Result<Vec<(u64, bool)>, WireError> {
        let g = self.for_peer(g, offset, length, u32::MAX).await?;
        Ok(g.local_extents(offset, length).await?)
    }

    /// The group a peer's read runs on, once it may: this node leads (a node that does not
    /// sends the peer to the leader, so reads do not settle on a former leader), the read
    /// barrier is passed, and the range is inside the volume as it is then, `most` bytes at
    /// most.
    async fn for_peer(
        self: &Arc<Node>,
        g: &Group,
        offset: u64,
        length: u64,
        most: u32,
    ) -> Result<Group, WireError> {
        if g.raft.metrics().borrow().current_leader != Some(self.id) {
            return Err(WireError::from(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("volume {}: node {} does not lead it", g.name, self.id),
            )));
        }
        let g = match RaftVolume::for_peer(self.clone(), g).read_barrier().await {
            Ok(g) => g,
            Err(NotServed::Behind(e) | NotServed::Failed(e)) => return Err(WireError::from(e)),
        };
        let size = g.size.load(std::sync::atomic::Ordering::SeqCst);
        if length > u64::from(most) || offset.checked_add(length).is_none_or(|end| end > size) {
            return Err(WireError::from(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "volume {}: {length} bytes at {offset} (it has {size}, requests at most {most})",
                    g.name
                ),
            )));
        }
        Ok(g)
    }

    async fn handle(self: &Arc<Node>, rpc: Rpc) -> Reply {
        let done = |r: io::Result<()>| Reply::Done(r.map_err(WireError::from));
        let volume = match &rpc {
            Rpc::Open(spec) => return done(self.open_replica(spec).await),
            Rpc::Create(spec) => return done(self.create_volume(spec).await),
            Rpc::Drop(name, id) => return done(self.drop_replica_of(name, Only::Id(*id)).await),
            Rpc::DropUnformed(name, id) => return done(self.drop_unformed(name, *id).await),
            Rpc::Delete(name, force) => return done(self.delete_volume(name, *force).await),
            Rpc::List => return Reply::Volumes(self.volumes().await),
            Rpc::Move(name, from, to, addr) => {
                return done(self.move_replica(name, *from, *to, addr).await)
            }
            Rpc::Update(spec) => return done(self.update_spec(spec).await),
            Rpc::SetCluster(members) => return done(self.save_cluster(members).await),
            Rpc::AddNode(id, addr) => {
                return Reply::Moves(self.add_node(*id, addr).await.map_err(|e| e.to_string()))
            }
            Rpc::RemoveNode(id) => {
                return Reply::Moves(self.remove_node(*id).await.map_err(|e| e.to_string()))
            }
            Rpc::Cluster => return Reply::Cluster(self.cluster()),
            Rpc::Deleted(name, id) => return done(self.remember_deleted(name, *id).await),
            Rpc::Tombstones => return Reply::Tombstones(self.tombstones.lock().await.clone()),
            Rpc::Resize(name, size) => return done(self.resize_volume(name, *size).await),
            Rpc::ResizeHere(name, size) => {
                let Some(g) = self.group(name) else {
                    return Reply::NoVolume(name.clone());
                };
                return done(RaftVolume::for_peer(self.clone(), &g).resize(*size).await);
            }
            Rpc::ClaimVolume(name, op) => return done(self.claim_volume(name, op.clone()).await),
            Rpc::ClaimHere(name, op) => {
                let Some(g) = self.group(name) else {
                    return Reply::NoVolume(name.clone());
                };
                return done(
                    RaftVolume::for_peer(self.clone(), &g)
                        .claim(op.clone())
                        .await,
                );
            }
            Rpc::DeleteHere(name, force) => {
                let spec = self.catalog.lock().await.get(name).cloned();
                let Some(spec) = spec else {
                    return Reply::NoVolume(name.clone());
                };
                return done(self.delete_held(name, spec, *force).await);
            }
            Rpc::Append(v, ..)
            | Rpc::Vote(v, ..)
            | Rpc::SnapshotPart(v, ..)
            | Rpc::SnapshotEnd(v, ..)
            | Rpc::Write(v, ..)
            | Rpc::Claim(v, ..)
            | Rpc::ReadIndex(v, _)
            | Rpc::Status(v)
            | Rpc::Elect(v, ..)
            | Rpc::Remote(v, ..) => v.clone(),
        };
        let Some(g) = self.group(&volume) else {
            return Reply::NoVolume(volume);
        };
        // Another volume of that name (a replica left from a deleted one asks).
        if let Rpc::Remote(_, id, _)
        | Rpc::Write(_, id, _)
        | Rpc::Claim(_, id, _)
        | Rpc::ReadIndex(_, id)
        | Rpc::Append(_, id, _)
        | Rpc::Vote(_, id, _)
        | Rpc::SnapshotPart(_, id, _)
        | Rpc::SnapshotEnd(_, id, _)
        | Rpc::Elect(_, id, _) = &rpc
        {
            if *id != g.incarnation.volume_id() {
                return Reply::NoVolume(volume);
            }
        }
        // A replica whose raft stopped (see `keep_open`) answers its peers with why, as its raft
        // would, but without openraft logging each refused message in full, and takes no
        // snapshot parts (it is reopened from its directory).
        let stopped = g.stopped();
        match (rpc, stopped) {
            (Rpc::Append(..), Some(e)) => Reply::Append(Err(RaftError::Fatal(e))),
            (Rpc::Vote(..), Some(e)) => Reply::Vote(Err(RaftError::Fatal(e))),
            (Rpc::SnapshotPart(..), Some(e)) => {
                Reply::Done(Err(WireError::from(io::Error::other(e.to_string()))))
            }
            (Rpc::SnapshotEnd(..), Some(e)) => Reply::Snapshot(Err(e.to_string())),
            (Rpc::Elect(..), Some(e)) => {
                Reply::Done(Err(WireError::from(io::Error::other(e.to_string()))))
            }
            (Rpc::Elect(_, _, last), None) => {
                Reply::Done(g.take_lead(self.id, last).await.map_err(WireError::from))
            }
            (Rpc::Append(_, _, r), None) => Reply::Append(g.raft.append_entries(r).await),
            (Rpc::Vote(_, _, r), None) => Reply::Vote(g.vote(self.id, r).await),
            (Rpc::SnapshotPart(_, _, part), None) => {
                Reply::Done(g.receive_part(part).await.map_err(WireError::from))
            }
            (Rpc::SnapshotEnd(_, _, end), None) => Reply::Snapshot(g.finish_receiving(end).await),
            (Rpc::Write(_, _, op), _) => {
                Reply::Write(g.leader_write(op).await.map_err(|e| e.to_string()))
            }
            (Rpc::Claim(_, _, op), _) => {
                Reply::Claim(g.leader_claim(op).await.map_err(|e| e.to_string()))
            }
            (Rpc::ReadIndex(..), _) => {
                Reply::ReadIndex(g.read_index().await.map_err(|e| e.to_string()))
            }
            (Rpc::Status(_), _) => Reply::Status(g.status(self.id)),
            (Rpc::Remote(_, _, RemoteOp::Write(op)), _) => {
                Reply::Write(g.leader_write(op).await.map_err(|e| e.to_string()))
            }
            (Rpc::Remote(_, _, RemoteOp::Read(offset, length)), _) => {
                Reply::Read(self.read_for_peer(&g, offset, length).await)
            }
            (Rpc::Remote(_, _, RemoteOp::Extents(offset, length)), _) => {
                Reply::Extents(self.extents_for_peer(&g, offset, length).await)
            }
            (
                Rpc::Open(_)
                | Rpc::Create(_)
                | Rpc::Drop(..)
                | Rpc::Delete(..)
                | Rpc::List
                | Rpc::Move(..)
                | Rpc::Update(_)
                | Rpc::SetCluster(_)
                | Rpc::AddNode(..)
                | Rpc::RemoveNode(_)
                | Rpc::Cluster
                | Rpc::Deleted(..)
                | Rpc::Tombstones
                | Rpc::Resize(..)
                | Rpc::ResizeHere(..)
                | Rpc::ClaimVolume(..)
                | Rpc::ClaimHere(..)
                | Rpc::DeleteHere(..)
                | Rpc::DropUnformed(..),
                _,
            ) => unreachable!("answered above"),
        }
    }
}

/// Why a request did not run here: another node leads, or none does yet.
#[derive(Debug, Clone)]
enum NotHere {
    Leader(String),
    NoLeader(String),
}

impl Group {
    /// Answers a vote request: passed to raft, but while this node leads (as its metrics
    /// say) only one from the member a hand-over invited ([`Node::hand_over`]); the others are
    /// refused here. A leader's raft grants any candidate whose log is as long as its own once
    /// its lease from its election has run out (openraft 0.9), and so steps down, which its
    /// metrics, the lease reads' guide, tell only a little later: a stale read could be served
    /// from a lease given up. (A leader ignores elections it did not call, as etcd's with
    /// CheckQuorum; a leader whose followers stopped hearing from it is unseated anyway: they
    /// elect without it.)
    async fn vote(
        &self,
        me: NodeId,
        req: VoteRequest<NodeId>,
    ) -> Result<VoteResponse<NodeId>, RaftError<NodeId>> {
        let m = self.raft.metrics().borrow().clone();
        if m.state != openraft::ServerState::Leader || m.current_leader != Some(me) {
            return self.raft.vote(req).await;
        }
        let candidate = req.vote.leader_id().voted_for();
        let invited = *self
            .handover
            .invited
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if candidate.is_none() || candidate != invited {
            let last = self.log.last_log_id().flatten();
            return Ok(VoteResponse::new(m.vote, last, false));
        }
        use std::sync::atomic::Ordering::SeqCst;
        self.handover.passing.fetch_add(1, SeqCst);
        let r = self.raft.vote(req).await;
        self.handover.passing.fetch_sub(1, SeqCst);
        r
    }

    /// Elects this node (`me`), asked by the leader whose log ends at `leader_last`
    /// ([`Node::hand_over`]); refused if this node is no voter or its log does not reach that
    /// far (it could not win: its higher term would only unseat the leader).
    async fn take_lead(&self, me: NodeId, leader_last: Option<super::LogId>) -> io::Result<()> {
        let refused = |why: String| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("volume {}: node {me}: {why}", self.name),
            )
        };
        let m = self.raft.metrics().borrow().clone();
        let voter = m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == me);
        if !voter {
            return Err(refused("not a voter".into()));
        }
        let mine = self
            .log
            .last_log_id()
            .ok_or_else(|| refused("its log is closed".into()))?;
        if mine < leader_last {
            return Err(refused(format!(
                "its log ends at {mine:?}, the leader's at {leader_last:?}"
            )));
        }
        self.raft.trigger().elect().await.map_err(err)
    }

    /// Why the group's raft stopped, if it has (shut down, a storage error: `keep_open`).
    fn stopped(&self) -> Option<Fatal<NodeId>> {
        // The raft core holds the sender of its metrics: closed once it has ended.
        let ended = self.raft.server_metrics().has_changed().is_err();
        ended.then(|| why_stopped(&self.raft))
    }

    /// Writes a part of a snapshot streamed by the leader. The first part of a snapshot (or of
    /// a newer leader's) starts receiving it afresh; a part from an older leader is refused.
    async fn receive_part(&self, part: SnapshotPart) -> io::Result<()> {
        let vote = self.raft.metrics().borrow().vote;
        if part.vote < vote {
            return Err(err(format!(
                "volume {}: snapshot {} from {} but the vote is {vote}",
                self.name, part.id, part.vote
            )));
        }
        let mut receiving = self.receiving.lock().await;
        if !receiving
            .as_ref()
            .is_some_and(|r| r.vote == part.vote && r.id == part.id)
        {
            let file = self.raft.begin_receiving_snapshot().await.map_err(err)?;
            *receiving = Some(Receiving {
                vote: part.vote,
                id: part.id.clone(),
                file: file.into_std().await,
                parts: Default::default(),
            });
        }
        let r = receiving.as_mut().expect("set above");
        let file = r.file.try_clone()?;
        let offset = part.offset;
        let what = format!(
            "volume {}: snapshot {} part at {offset}",
            self.name, part.id
        );
        tokio::task::spawn_blocking(move || {
            // Nothing checks a snapshot's data later (a log record's crc is checked when the
            // log is read): the crc it travelled with is checked here. A damaged part is
            // refused and not counted, so the snapshot does not install.
            if !part.data.intact() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{what}: the data does not match its crc32"),
                ));
            }
            std::os::unix::fs::FileExt::write_all_at(&file, &part.data, part.offset)
                .map_err(|e| io::Error::new(e.kind(), format!("{what}: {e}")))
        })
        .await
        .map_err(err)??;
        r.parts.insert(offset);
        Ok(())
    }

    /// Installs the snapshot received (see [`Peer::full_snapshot`]).
    async fn finish_receiving(&self, end: SnapshotEnd) -> Result<SnapshotResponse<NodeId>, String> {
        let id = end.meta.snapshot_id.clone();
        let taken = {
            let mut receiving = self.receiving.lock().await;
            match receiving.take() {
                Some(r) if r.vote == end.vote && r.id == id => Some(r),
                other => {
                    *receiving = other;
                    None
                }
            }
        };
        // Every part the sender sent must be in the file: one restarted in between (another
        // transfer took over the file) would have lost the ones before.
        let file = match taken {
            Some(r) if r.parts.len() as u64 == end.parts => r.file,
            Some(r) => {
                return Err(format!(
                    "volume {}: snapshot {id}: {} of its {} parts received",
                    self.name,
                    r.parts.len(),
                    end.parts
                ))
            }
            // A snapshot of nothing but holes has no parts: it starts here.
            None if end.parts == 0 && end.vote >= self.raft.metrics().borrow().vote => {
                self.raft
                    .begin_receiving_snapshot()
                    .await
                    .map_err(|e| e.to_string())?
                    .into_std()
                    .await
            }
            None => {
                return Err(format!(
                    "volume {}: snapshot {id} is not being received",
                    self.name
                ))
            }
        };
        // The blocks' length (their end may be a hole no part reached).
        if file.metadata().map_err(|e| e.to_string())?.len() < end.size {
            file.set_len(end.size).map_err(|e| e.to_string())?;
        }
        claims::lock(&self.claims).receiving(&id, end.claims);
        let snapshot = openraft::Snapshot {
            meta: end.meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        };
        self.raft
            .install_full_snapshot(end.vote, snapshot)
            .await
            .map_err(|e| e.to_string())
    }

    pub fn status(&self, node: NodeId) -> Status {
        let m = self.raft.metrics().borrow().clone();
        let stalled: BTreeMap<NodeId, String> = match m.state {
            openraft::ServerState::Leader => {
                // Answering (not dead; the refusals come every REFUSED_WAIT and more).
                let now = Instant::now();
                voter_followers(&m)
                    .filter(|(id, _)| self.links.answered_within(*id, STALLED / 2))
                    .filter_map(|(id, _)| Some((id, self.links.refusing(id, now, STALLED)?)))
                    .collect()
            }
            _ => BTreeMap::new(),
        };
        Status {
            node,
            leader: m.current_leader,
            term: m.current_term,
            last_applied: m.last_applied.map(|l| l.index),
            members: m.membership_config.membership().voter_ids().collect(),
            learners: m.membership_config.membership().learner_ids().collect(),
            unreachable: match m.state {
                openraft::ServerState::Leader => m
                    .membership_config
                    .membership()
                    .voter_ids()
                    .filter(|id| {
                        *id != node && self.links.failing(*id) && !stalled.contains_key(id)
                    })
                    .collect(),
                _ => Vec::new(),
            },
            moving: match *self.busy.lock().unwrap_or_else(|e| e.into_inner()) {
                Some(Busy::Moving(to)) => Some(to),
                _ => None,
            },
            behind: match self.lag.applied.upgrade() {
                Some(applied) => {
                    // Twice the pace limit, and at least the entries in flight (not counted)
                    // past it.
                    let pace = self.lag.limit_kib();
                    let limit = (2 * pace).max(pace + PACE_FLOOR_KIB);
                    voter_followers(&m)
                        .filter(|(id, matched)| {
                            !self.links.failing(*id)
                                && !stalled.contains_key(id)
                                && (self.links.sending(*id)
                                    || catching_up(
                                        *matched,
                                        m.purged.map(|l| l.index),
                                        |i| applied.kib_after(i),
                                        limit,
                                    ))
                        })
                        .map(|(id, _)| id)
                        .collect()
                }
                None => Vec::new(),
            },
            stalled: stalled.into_iter().collect(),
            size: self.size.load(std::sync::atomic::Ordering::SeqCst),
            id: self.incarnation.volume_id(),
            leader_addr: m.current_leader.and_then(|l| {
                let nodes = m.membership_config.membership();
                nodes.get_node(&l).map(|n| n.addr.clone())
            }),
            claims: claims::lock(&self.claims).now.clone(),
        }
    }

    /// Marks a move of a replica to `to` under way, until the mark is dropped; refused while
    /// another change of the membership is.
    fn start_move(&self, to: NodeId) -> io::Result<BusyMark> {
        BusyMark::take(&self.busy, Busy::Moving(to)).map_err(|other| {
            let what = match other {
                Busy::Moving(n) => format!("a replica is being moved to node {n}"),
                Busy::Cleaning => "stray learners are being taken out, try again".into(),
                Busy::HandingOver => "its lead is being handed to another member, try again".into(),
            };
            // Stray learners are taken out, or the lead handed over, in a moment; another
            // move may take long.
            let kind = match other {
                Busy::Moving(_) => io::ErrorKind::ResourceBusy,
                Busy::Cleaning | Busy::HandingOver => io::ErrorKind::WouldBlock,
            };
            io::Error::new(kind, format!("volume {}: {what}", self.name))
        })
    }

    /// Waits until learner `to` is within [`CAUGHT_UP_ENTRIES`] of this leader's log: an error
    /// after `within`, when this node stops leading, or once `to` has taken no data for
    /// [`STALLED`] and failed since (a dead node, a full disk), with its last error.
    async fn catch_up(&self, to: NodeId, within: Duration) -> io::Result<()> {
        let start = Instant::now();
        let mut metrics = self.raft.metrics();
        loop {
            {
                let m = metrics.borrow_and_update();
                if m.state != openraft::ServerState::Leader {
                    return Err(io::Error::new(
                        io::ErrorKind::WouldBlock,
                        format!(
                            "volume {}: this node stopped leading while node {to} caught up",
                            self.name
                        ),
                    ));
                }
                if m.membership_config.membership().get_node(&to).is_none() {
                    return Err(err(format!(
                        "volume {}: node {to} was taken out of the group",
                        self.name
                    )));
                }
                let matched = m.replication.as_ref().and_then(|r| r.get(&to).copied());
                if let (Some(Some(matched)), Some(last)) = (matched, m.last_log_index) {
                    if matched.index + CAUGHT_UP_ENTRIES >= last {
                        return Ok(());
                    }
                }
            }
            let now = Instant::now();
            if let Some(e) = self.links.stalled(to, start, now, STALLED) {
                return Err(err(format!(
                    "volume {}: node {to} took nothing for {} s: {e}",
                    self.name,
                    STALLED.as_secs()
                )));
            }
            if now - start > within {
                return Err(err(format!(
                    "volume {}: node {to} did not catch up within {} s",
                    self.name,
                    within.as_secs()
                )));
            }
            let _ = tokio::time::timeout(Duration::from_millis(250), metrics.changed()).await;
        }
    }

    /// The address of the leader (when it is not this node), if one is known.
    fn leader_addr(&self, node: NodeId) -> Option<String> {
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        if leader == node {
            return None;
        }
        m.membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.addr.clone())
    }

    /// Whether a node other than `me` leads, as far as this one knows.
    fn led_elsewhere(&self, me: NodeId) -> bool {
        let leader = self.raft.metrics().borrow().current_leader;
        leader.is_some_and(|l| l != me)
    }

    /// Returns once a leader other than the one at `addr` is known (this node, `me`, too), or
    /// the group is shut down.
    async fn leader_moved(&self, me: NodeId, addr: &str) {
        let mut metrics = self.raft.metrics();
        loop {
            let moved = {
                let m = metrics.borrow_and_update();
                m.current_leader.is_some_and(|l| {
                    l == me
                        || m.membership_config
                            .membership()
                            .get_node(&l)
                            .map(|n| n.addr.as_str())
                            != Some(addr)
                })
            };
            if moved || metrics.changed().await.is_err() {
                return;
            }
        }
    }

    /// A write on this node as the leader: done once committed on a majority and applied
    /// (through the group commit).
    async fn leader_write(&self, op: BlockOp) -> Result<(), NotHereOr> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.queue
            .send((op, tx))
            .map_err(|_| NotHereOr::Failed("the volume is closing".into()))?;
        rx.await
            .unwrap_or_else(|_| Err(NotHereOr::Failed("the volume is closing".into())))
    }

    /// A change of the volume's users on this node as the leader: refused (the inner error)
    /// if the claims applied so far forbid it ([`Claims::refusal`]), else committed and
    /// applied. One at a time, each after the read barrier: every change a former leader
    /// committed is applied by then.
    async fn leader_claim(&self, op: BlockOp) -> Result<Result<(), String>, NotHereOr> {
        let g = self.clone();
        // Decided and written to the end even if the caller goes away meanwhile (or gives
        // up: a leader cut off from the others after its lease was checked waits for ever),
        // holding the next decision off until this one is applied.
        let decided = tokio::spawn(async move {
            let one = tokio::time::timeout(LEADER_WAIT, g.claiming.clone().lock_owned());
            let Ok(_one) = one.await else {
                return Err(NotHereOr::Failed(format!(
                    "volume {}: an earlier change of its users has not finished",
                    g.name
                )));
            };
            let index = g.read_index().await?;
            g.wait_applied(index, LEADER_WAIT)
                .await
                .map_err(|e| NotHereOr::Failed(e.to_string()))?;
            if let Some(why) = claims::lock(&g.claims).now.refusal(&g.name, &op) {
                return Ok(Err(why));
            }
            g.leader_write(op).await.map(Ok)
        });
        match tokio::time::timeout(LEADER_WAIT, decided).await {
            Ok(r) => r.unwrap_or_else(|e| Err(NotHereOr::Failed(e.to_string()))),
            Err(_) => Err(NotHereOr::Failed(format!(
                "volume {}: a change of its users did not finish within {} s (its leader may \
                 have lost the other nodes)",
                self.name,
                LEADER_WAIT.as_secs()
            ))),
        }
    }

    /// The read index: on the leader, an index every write acknowledged so far is at or below;
    /// a node that has applied it may serve a linearizable read.
    async fn read_index(&self) -> Result<u64, NotHereOr> {
        // A leader lease: a quorum acknowledged this leader within half the shortest election
        // timeout (followers refuse to vote while they hear from their leader), and it has
        // applied an entry of its own term, so every write committed before it led is applied
        // (and every write it acknowledged was applied before it was acknowledged).
        // Not while the leader hands the volume over (`Node::hand_over`): it grants the new
        // leader its vote, which its metrics tell only a little later (held to the end of the
        // check: a hand-over starts after it, or ended, its vote in the metrics, before).
        let open = self.handover.hold.try_read();
        let m = self.raft.metrics().borrow().clone();
        let lease = read_lease(self.raft.config()).as_millis() as u64;
        if open.is_ok()
            && m.state == openraft::ServerState::Leader
            && m.millis_since_quorum_ack.is_some_and(|ms| ms < lease)
            && m.last_applied.map(|l| l.leader_id.term) == Some(m.current_term)
        {
            return Ok(m.last_applied.map_or(0, |l| l.index));
        }
        match self.raft.ensure_linearizable().await {
            Ok(read) => Ok(read.map_or(0, |l| l.index)),
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(NotHereOr::NotHere(match f.leader_node {
                    Some(n) => NotHere::Leader(n.addr),
                    None => NotHere::NoLeader("no leader yet".into()),
                }))
            }
            Err(e) => Err(NotHereOr::Failed(e.to_string())),
        }
    }

    /// Waits until this node has applied `index` (a read index from the leader), for up to
    /// `wait`.
    async fn wait_applied(&self, index: u64, wait: Duration) -> io::Result<()> {
        self.raft
            .wait(Some(wait))
            .applied_index_at_least(Some(index), "read index")
            .await
            .map(drop)
            .map_err(|e| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("volume {}: replica behind: {e}", self.name),
                )
            })
    }

    async fn local_read(&self, offset: u64, length: u32) -> io::Result<Vec<u8>> {
        let (blocks, pieces) = (self.blocks.clone(), self.pieces.clone());
        tokio::task::spawn_blocking(move || {
            super::state_machine::read_volume(&blocks, &pieces, offset, length as usize)
        })
        .await
        .map_err(err)?
    }

    async fn local_extents(&self, offset: u64, length: u64) -> io::Result<Vec<(u64, bool)>> {
        let (blocks, pieces, size) = (
            self.blocks.clone(),
            self.pieces.clone(),
            self.size.load(std::sync::atomic::Ordering::SeqCst),
        );
        tokio::task::spawn_blocking(move || {
            super::state_machine::volume_extents(&blocks, &pieces, size, offset, length)
                .map(|v| v.into_iter().map(|e| (e.length, e.hole)).collect())
        })
        .await
        .map_err(err)?
    }
}

/// A request that could not run on this node.
#[derive(Debug, Clone)]
enum NotHereOr {
    NotHere(NotHere),
    Failed(String),
}

impl std::fmt::Display for NotHereOr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotHereOr::NotHere(NotHere::Leader(a)) => write!(f, "not the leader (it is at {a})"),
            NotHereOr::NotHere(NotHere::NoLeader(m)) | NotHereOr::Failed(m) => f.write_str(m),
        }
    }
}

/// A replicated volume as the front ends see it, on one node: requests run on the leader, here
/// or forwarded to it, and wait out elections (up to 15 s).
pub struct RaftVolume {
    node: Arc<Node>,
    name: String,
    /// The replica served: each request runs on the node's group of it as it is then (a
    /// replica reopened after its raft stopped is the same one, see [`keep_open`]).
    incarnation: Incarnation,
    /// Connections to leaders, for forwarded requests.
    pool: Pool,
    /// The volume as a node without a replica serves it (through the leader): a front end's
    /// requests go there while this replica's raft is stopped (see [`keep_open`]) or the node
    /// no longer holds it (moved to another node); None for a peer's requests, which are not
    /// sent on again.
    elsewhere: Option<remote::RemoteVolume>,
    /// The size the replica had when last asked (a client keeps it after a move).
    size: std::sync::atomic::AtomicU64,
    /// Read indexes asked of the leader, shared by the reads waiting for the next.
    indexes: Coalesce<Result<u64, (io::ErrorKind, String)>>,
}

impl std::fmt::Debug for RaftVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftVolume")
            .field("node", &self.node.id)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl RaftVolume {
    pub fn new(node: Arc<Node>, group: &Group) -> RaftVolume {
        RaftVolume {
            elsewhere: Some(remote::RemoteVolume::unlocated(
                node.clone(),
                &group.name,
                group.incarnation.volume_id(),
            )),
            ..RaftVolume::for_peer(node, group)
        }
    }

    /// One that serves a request another node sent on: it does not send it on again.
    fn for_peer(node: Arc<Node>, group: &Group) -> RaftVolume {
        RaftVolume {
            elsewhere: None,
            node,
            name: group.name.clone(),
            incarnation: group.incarnation.clone(),
            pool: Pool::default(),
            indexes: Coalesce::default(),
            size: group.size.load(std::sync::atomic::Ordering::SeqCst).into(),
        }
    }

    /// The node's group of the replica served, now: the same replica, or (moved back) another
    /// of the same volume.
    fn group(&self) -> io::Result<Group> {
        let id = self.incarnation.volume_id();
        // Another replica of the volume once it votes (a learner being moved in may not
        // become a member).
        let voter = |g: &Group| {
            let m = g.raft.metrics().borrow().membership_config.clone();
            m.membership().voter_ids().any(|v| v == self.node.id)
        };
        self.node
            .group(&self.name)
            .filter(|g| {
                g.incarnation.is(&self.incarnation)
                    || (id != 0 && g.incarnation.volume_id() == id && voter(g))
            })
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "volume {}: node {} no longer holds this replica",
                        self.name, self.node.id
                    ),
                )
            })
    }

    /// Runs `here` on this node if it leads, else `there` on the leader; retries while there
    /// is no leader.
    async fn on_leader<T, F, Fut>(
        &self,
        here: F,
        there: Rpc,
        unpack: fn(Reply) -> Option<Result<T, String>>,
    ) -> io::Result<T>
    where
        F: Fn(Group) -> Fut,
        Fut: std::future::Future<Output = Result<T, NotHereOr>>,
    {
        let deadline = tokio::time::Instant::now() + self.node.leader_wait();
        let mut last = String::new();
        while tokio::time::Instant::now() < deadline {
            let g = self.group()?;
            let addr = match g.leader_addr(self.node.id) {
                None => match here(g.clone()).await {
                    Ok(v) => return Ok(v),
                    Err(NotHereOr::Failed(e)) => {
                        tracing::warn!(volume = %self.name, "request failed: {e}");
                        return Err(io::Error::other(e));
                    }
                    Err(NotHereOr::NotHere(NotHere::Leader(a))) => Some(a),
                    Err(NotHereOr::NotHere(NotHere::NoLeader(m))) => {
                        last = m;
                        None
                    }
                },
                Some(a) => Some(a),
            };
            if let Some(addr) = addr {
                // A leader that hangs (stopped, cut off) never answers: once another is
                // elected, the request goes there instead. (A write sent twice writes the same
                // bytes at the same place; the first, if the old leader ever takes it, cannot
                // commit in its old term, or commits before anything the new leader appends.)
                // (A replica whose raft stopped knows of no change: it waits for the answer.)
                let moved = async {
                    match g.stopped() {
                        Some(_) => std::future::pending().await,
                        None => g.leader_moved(self.node.id, &addr).await,
                    }
                };
                let answer = tokio::select! {
                    r = self.pool.call(&addr, &there) => Ok(r),
                    () = moved => {
                        Err(format!("{addr} stopped leading before it answered"))
                    }
                    () = tokio::time::sleep_until(deadline) => {
                        Err(format!("{addr} did not answer"))
                    }
                };
                match answer {
                    Ok(Ok(reply)) => match unpack(reply) {
                        Some(Ok(v)) => return Ok(v),
                        // The leader changed under us, or it failed: ask again.
                        Some(Err(e)) => last = e,
                        None => last = format!("unexpected reply from {addr}"),
                    },
                    Ok(Err(e)) => last = format!("{addr}: {e}"),
                    Err(e) => last = e,
                }
            }
            // A replica whose raft stopped asks the leader it knew, which may have changed,
            // less often until it is reopened.
            let again = match g.stopped() {
                Some(_) => Duration::from_millis(500),
                None => Duration::from_millis(50),
            };
            tokio::time::sleep(again).await;
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("volume {}: no leader answered: {last}", self.name),
        ))
    }

    /// Waits until this replica may serve a linearizable read: the read index comes from the
    /// leader (this node or another), and this replica has applied up to it. So any
    /// up-to-date node serves reads from its own blocks: the group returned, which has. A
    /// read index asked of another node is shared by the reads that arrive while the last is
    /// asked for ([`Coalesce`]). A front end's read waits [`CATCH_UP`] at most for this
    /// replica to apply it (a peer's, as long as any request).
    async fn read_barrier(&self) -> Result<Group, NotServed> {
        let stopped = |g: &Group| {
            g.stopped().map(|why| {
                io::Error::other(format!(
                    "volume {}: the replica on node {} stopped ({why}); it is reopened once it can be",
                    self.name, self.node.id
                ))
            })
        };
        let g = self.group().map_err(NotServed::Behind)?;
        if let Some(e) = stopped(&g) {
            return Err(NotServed::Behind(e));
        }
        let index = if g.led_elsewhere(self.node.id) {
            // Waiting for the fetch under way and then its own: bounded as one.
            let wait = self.node.leader_wait();
            let shared = self.indexes.get(|| async {
                self.read_index()
                    .await
                    .map_err(|e| (e.kind(), e.to_string()))
            });
            match tokio::time::timeout(wait, shared).await {
                Ok(r) => r.map_err(|(kind, e)| self.not_served(io::Error::new(kind, e)))?,
                Err(_) => {
                    return Err(NotServed::Failed(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "volume {}: no read index from the leader within {} s",
                            self.name,
                            wait.as_secs()
                        ),
                    )))
                }
            }
        } else {
            self.read_index().await.map_err(|e| self.not_served(e))?
        };
        let g = self.group().map_err(NotServed::Behind)?;
        if let Some(e) = stopped(&g) {
            return Err(NotServed::Behind(e));
        }
        let front_end = self.elsewhere.is_some();
        let wait = if front_end { CATCH_UP } else { LEADER_WAIT };
        match g.wait_applied(index, wait).await {
            Ok(()) => Ok(g),
            // Far behind (back from an outage, sent a snapshot), or stopped meanwhile.
            Err(e) if front_end => Err(NotServed::Behind(e)),
            Err(e) => Err(NotServed::Failed(e)),
        }
    }

    /// `request` on the volume through the leader, as a node without a replica sends it, if
    /// the read could not be served here because this replica is stopped or behind.
    async fn elsewhere<'a, T, F, Fut>(&'a self, why: NotServed, request: F) -> io::Result<T>
    where
        F: FnOnce(&'a remote::RemoteVolume) -> Fut,
        Fut: std::future::Future<Output = io::Result<T>>,
    {
        match (why, &self.elsewhere) {
            (NotServed::Behind(e), Some(there)) => request(there)
                .await
                .map_err(|t| io::Error::new(t.kind(), format!("{e}; through the leader: {t}"))),
            (NotServed::Behind(e) | NotServed::Failed(e), _) => Err(e),
        }
    }

    /// A read index from the leader (this node or another).
    async fn read_index(&self) -> io::Result<u64> {
        self.on_leader(
            |g| async move { g.read_index().await },
            Rpc::ReadIndex(self.name.clone(), self.incarnation.volume_id()),
            |r| match r {
                Reply::ReadIndex(r) => Some(r),
                _ => None,
            },
        )
        .await
    }

    /// Grows the volume to `size` bytes (through the log, so every replica grows).
    pub async fn resize(&self, size: u64) -> io::Result<()> {
        use crate::volume::Volume;
        check_size(&self.name, size)?;
        if size < self.size() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "volume {}: {size} bytes is smaller than its {} (volumes only grow)",
                    self.name,
                    self.size()
                ),
            ));
        }
        check_room(&self.node.dir, &self.name, size)?;
        self.write_op(BlockOp::Resize { size }).await
    }

    /// Changes the volume's users ([`BlockOp::Attach`], `Detach`, `Delete`) on its leader,
    /// which decides: `ResourceBusy` with its reason if it refuses.
    pub async fn claim(&self, op: BlockOp) -> io::Result<()> {
        let rpc = Rpc::Claim(self.name.clone(), self.incarnation.volume_id(), op.clone());
        self.on_leader(
            |g| {
                let op = op.clone();
                async move { g.leader_claim(op).await }
            },
            rpc,
            |r| match r {
                Reply::Claim(r) => Some(r),
                _ => None,
            },
        )
        .await?
        .map_err(|why| io::Error::new(io::ErrorKind::ResourceBusy, why))
    }

    /// Whether requests go through the leader instead: this replica's raft is stopped (until
    /// it is reopened, [`keep_open`]), or the node no longer holds it.
    fn away(&self) -> bool {
        self.group().map_or(true, |g| g.stopped().is_some())
    }

    /// Why a read failed here: for the leader to serve if this replica went away meanwhile.
    fn not_served(&self, e: io::Error) -> NotServed {
        if self.away() {
            NotServed::Behind(e)
        } else {
            NotServed::Failed(e)
        }
    }

    async fn write_op(&self, op: BlockOp) -> io::Result<()> {
        let elsewhere = self.elsewhere.as_ref();
        if let Some(there) = elsewhere.filter(|_| self.away()) {
            return there.write_op(op).await;
        }
        match self.write_here(op.clone()).await {
            // The replica went away meanwhile (stopped, moved off).
            Err(_) if elsewhere.is_some() && self.away() => {
                elsewhere.expect("checked").write_op(op).await
            }
            done => done,
        }
    }

    async fn write_here(&self, op: BlockOp) -> io::Result<()> {
        let rpc = Rpc::Write(self.name.clone(), self.incarnation.volume_id(), op.clone());
        self.on_leader(
            |g| {
                let op = op.clone();
                async move { g.leader_write(op).await }
            },
            rpc,
            |r| match r {
                Reply::Write(r) => Some(r),
                _ => None,
            },
        )
        .await
    }
}

replicated_volume!(RaftVolume, {
    fn size(&self) -> u64 {
        use std::sync::atomic::Ordering::SeqCst;
        // Once the node no longer holds the replica, the size it had (served through the
        // leader, which refuses what is out of range of a volume that did not grow).
        // (Volumes only grow: a replica opened here again may not have applied a grow yet.)
        if let Ok(g) = self.group() {
            self.size.fetch_max(g.size.load(SeqCst), SeqCst);
        }
        self.size.load(SeqCst)
    }

    async fn read(&self, offset: u64, length: u32) -> io::Result<Vec<u8>> {
        match self.read_barrier().await {
            Ok(g) => g.local_read(offset, length).await,
            Err(why) => self.elsewhere(why, |v| v.read(offset, length)).await,
        }
    }

    async fn read_sendable(&self, offset: u64, length: u32) -> io::Result<crate::volume::Sendable> {
        use crate::volume::Sendable;
        let g = match self.read_barrier().await {
            Ok(g) => g,
            Err(why) => {
                return self
                    .elsewhere(why, |v| v.read_sendable(offset, length))
                    .await;
            }
        };
        // The file that holds the range now, if one does (a snapshot installed later replaces
        // the blocks with newer ones; these hold at least what the barrier asked for), or the
        // bytes of the blocks and the log, without asking the leader again.
        let region = super::state_machine::volume_region(&g.blocks, &g.pieces, offset, length)?;
        match region {
            Some(r) => Ok(Sendable::Region(r)),
            None => Ok(Sendable::Data(g.local_read(offset, length).await?.into())),
        }
    }

    async fn extents(&self, offset: u64, length: u64) -> io::Result<Vec<crate::volume::Extent>> {
        match self.read_barrier().await {
            Ok(g) => Ok(extents(g.local_extents(offset, length).await?)),
            Err(why) => self.elsewhere(why, |v| v.extents(offset, length)).await,
        }
    }
});

/// Why a read is not served from a replica.
#[derive(Debug)]
enum NotServed {
    /// The leader may serve it: the replica's raft is stopped, the node no longer holds it,
    /// or it did not apply the read index within [`CATCH_UP`].
    Behind(io::Error),
    Failed(io::Error),
}

impl From<io::Error> for NotServed {
    fn from(e: io::Error) -> NotServed {
        NotServed::Failed(e)
    }
}

/// How long a front end's read waits for its replica to apply the read index before it goes
/// to the leader (a follower that keeps up applies within milliseconds).
const CATCH_UP: Duration = Duration::from_secs(1);

/// Most idle connections a [`Pool`] keeps to one node: as many as an NBD connection has
/// requests in flight (fewer made it open and close connections under load: 4 KiB writes at
/// queue depth 32 through a follower 15.8k IOPS with 8 instead of 18.6k).
const POOLED: usize = crate::nbd::server::IN_FLIGHT;

/// Idle connections to other nodes, by address, for requests forwarded to them.
#[derive(Debug, Default)]
struct Pool(std::sync::Mutex<HashMap<String, Vec<TcpStream>>>);

impl Pool {
    /// `rpc` to `addr` over a pooled connection (kept for the next request if it worked, and
    /// fewer than [`POOLED`] are idle).
    async fn call(&self, addr: &str, rpc: &Rpc) -> io::Result<Reply> {
        let mut conn = self.0.lock().unwrap().get_mut(addr).and_then(|v| v.pop());
        let r = call(&mut conn, addr, rpc).await;
        if let Some(c) = conn {
            let mut pool = self.0.lock().unwrap();
            let idle = pool.entry(addr.to_string()).or_default();
            if idle.len() < POOLED {
                idle.push(c);
            }
        }
        r
    }
}

/// Writes `data` at `offset` with `write`, as writes of at most [`MAX_WRITE_OP`].
async fn write_in_parts<F, Fut>(offset: u64, data: Vec<u8>, write: F) -> io::Result<()>
where
    F: Fn(u64, Data) -> Fut,
    Fut: std::future::Future<Output = io::Result<()>>,
{
    // The crc the log record (or the RPC to the leader) needs, now, while the front end has
    // just read the bytes and they are in this core's cache: computed later, by the log, it
    // costs twice as much (measured: 5.3% of the nodes' CPU writing, 3.0% here).
    let write = |offset: u64, data: Data| {
        data.crc();
        write(offset, data)
    };
    if data.len() <= MAX_WRITE_OP {
        return write(offset, data.into()).await;
    }
    // A longer request (up to the NBD maximum) as writes of at most 1 MiB, all at once (the
    // group commit puts them in as few entries as it can). NBD does not make a write atomic:
    // after a failure, as after a crash, some parts may be written.
    let data = bytes::Bytes::from(data);
    let parts = (0..data.len()).step_by(MAX_WRITE_OP).map(|at| {
        let part = data.slice(at..data.len().min(at + MAX_WRITE_OP));
        write(offset + at as u64, part.into())
    });
    // All waited for, then the first error: none goes on after the request is answered.
    let done = futures::future::join_all(parts).await;
    done.into_iter().collect::<io::Result<Vec<()>>>().map(drop)
}

/// Runs of (length, hole) as the front ends take them.
fn extents(runs: Vec<(u64, bool)>) -> Vec<crate::volume::Extent> {
    runs.into_iter()
        .map(|(length, hole)| crate::volume::Extent {
            length,
            hole,
            zero: hole,
        })
        .collect()
}

/// [`manage`] for a request that takes a node little time (opening or dropping a replica,
/// recording a spec): an error after [`QUICK`], so that a node that is down or hangs does not
/// hold up a move (a replica it keeps is found at its next start, `orphaned`).
async fn manage_quick(addr: &str, rpc: Rpc) -> io::Result<()> {
    tokio::time::timeout(QUICK, manage(addr, rpc))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{addr} did not answer within {} s", QUICK.as_secs()),
            )
        })?
}

/// How long a quick management request may take ([`manage_quick`]).
const QUICK: Duration = Duration::from_secs(10);

/// Sends a volume-management request to the node at `addr`.
async fn manage(addr: &str, rpc: Rpc) -> io::Result<()> {
    let mut conn = None;
    match call(&mut conn, addr, &rpc).await? {
        Reply::Done(r) => r.map_err(io::Error::from),
        Reply::NoVolume(v) => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no volume {v}"),
        )),
        other => Err(err(format!("unexpected reply {other:?}"))),
    }
}

/// What a node-joining or node-leaving request to `addr` did.
async fn moves(addr: &str, rpc: Rpc) -> io::Result<Vec<super::placement::Move>> {
    let mut conn = None;
    match call(&mut conn, addr, &rpc).await? {
        Reply::Moves(r) => r.map_err(err),
        other => Err(err(format!("unexpected reply {other:?}"))),
    }
}

/// Adds node `id` at `node_addr` to the cluster, through the node at `addr`.
pub async fn add_node(
    addr: &str,
    id: NodeId,
    node_addr: &str,
) -> io::Result<Vec<super::placement::Move>> {
    moves(addr, Rpc::AddNode(id, node_addr.to_string())).await
}

/// Removes node `id` from the cluster, through the node at `addr`.
pub async fn remove_node(addr: &str, id: NodeId) -> io::Result<Vec<super::placement::Move>> {
    moves(addr, Rpc::RemoveNode(id)).await
}

/// The cluster's node list as the node at `addr` has it.
pub async fn cluster(addr: &str) -> io::Result<BTreeMap<NodeId, String>> {
    let mut conn = None;
    match call(&mut conn, addr, &Rpc::Cluster).await? {
        Reply::Cluster(c) => Ok(c),
        other => Err(err(format!("unexpected reply {other:?}"))),
    }
}

/// Replaces member `from` of a volume by `to` at `to_addr`, through the node at `addr`. A move
/// that finds no leader, or whose leader changes or dies under it, starts again through the
/// next one (given up once it has failed so for [`LEADER_WAIT`], or after 20 attempts); one
/// that went through although its answer was lost is done.
pub async fn move_replica(
    addr: &str,
    name: &str,
    from: NodeId,
    to: NodeId,
    to_addr: &str,
) -> io::Result<()> {
    let (mut failing, mut attempts) = (None, 0);
    loop {
        attempts += 1;
        let began = Instant::now();
        let e = match manage(addr, Rpc::Move(name.into(), from, to, to_addr.into())).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        // An attempt that ran that long got somewhere: the count starts again.
        if began.elapsed() >= LEADER_WAIT {
            failing = None;
        }
        let since = *failing.get_or_insert_with(Instant::now);
        let done_trying = since.elapsed() >= LEADER_WAIT || attempts == 20;
        if e.kind() != io::ErrorKind::WouldBlock || done_trying {
            return Err(e);
        }
        if let Ok(s) = status(addr, name).await {
            if s.leader.is_some() && s.members.contains(&to) && !s.members.contains(&from) {
                return Ok(());
            }
        }
        tracing::info!(volume = name, from, to, "move not done ({e}); trying again");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Creates a volume through the node at `addr`.
pub async fn create(addr: &str, spec: VolumeSpec) -> io::Result<()> {
    manage(addr, Rpc::Create(spec)).await
}

/// Deletes a volume through the node at `addr` ([`Node::delete_volume`]).
pub async fn delete(addr: &str, name: &str, force: bool) -> io::Result<()> {
    manage(addr, Rpc::Delete(name.to_string(), force)).await
}

/// Changes a volume's users ([`BlockOp::Attach`], `Detach`) through the node at `addr`.
pub async fn claim(addr: &str, name: &str, op: BlockOp) -> io::Result<()> {
    manage(addr, Rpc::ClaimVolume(name.to_string(), op)).await
}

/// Grows a volume through the node at `addr`.
pub async fn resize(addr: &str, name: &str, size: u64) -> io::Result<()> {
    manage(addr, Rpc::Resize(name.to_string(), size)).await
}

/// The volumes the node at `addr` holds.
pub async fn list(addr: &str) -> io::Result<Vec<(VolumeSpec, Status)>> {
    let mut conn = None;
    match call(&mut conn, addr, &Rpc::List).await? {
        Reply::Volumes(v) => Ok(v),
        other => Err(err(format!("unexpected reply {other:?}"))),
    }
}

/// Whether `t` has the tombstone of volume (`name`, `id`): that very volume, not an older one
/// of its name (id 0, a volume of a node's command line, has none).
fn buried(t: &Tombstones, name: &str, id: u64) -> bool {
    id != 0 && t.get(name).is_some_and(|ids| ids.contains(&id))
}

/// Whether the node at `addr` has the tombstone of volume (`name`, `id`); no if it does not
/// answer within `within`.
async fn buried_on(addr: &str, name: &str, id: u64, within: Duration) -> bool {
    matches!(
        tokio::time::timeout(within, tombstones(addr)).await,
        Ok(Ok(t)) if buried(&t, name, id)
    )
}

/// The volumes the node at `addr` knows were deleted: name -> id.
async fn tombstones(addr: &str) -> io::Result<Tombstones> {
    let mut conn = None;
    match call(&mut conn, addr, &Rpc::Tombstones).await? {
        Reply::Tombstones(t) => Ok(t),
        other => Err(io::Error::other(format!("unexpected reply {other:?}"))),
    }
}

/// The status of `volume` as the node at `addr` sees it.
pub async fn status(addr: &str, volume: &str) -> io::Result<Status> {
    let mut conn = None;
    match call(&mut conn, addr, &Rpc::Status(volume.to_string())).await? {
        Reply::Status(s) => Ok(s),
        Reply::NoVolume(v) => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no volume {v} at {addr}"),
        )),
        other => Err(io::Error::other(format!("unexpected reply {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_volume_takes_its_members_in_turn_from_where_its_name_hashes_to() {
        let cluster: BTreeMap<NodeId, String> = (1..=4).map(|i| (i, format!("n{i}"))).collect();
        for name in ["a", "data", "p3", "volume-42"] {
            let start = name_hash(name) % 4;
            let want: Vec<NodeId> = (0..4).map(|k| (start + k) % 4 + 1).collect();
            let got: Vec<NodeId> = placement_order(name, &cluster)
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            assert_eq!(got, want, "{name}");
        }
        assert!(placement_order("a", &BTreeMap::new()).is_empty());
    }

    #[test]
    fn names_ending_as_the_nodes_own_files_are_refused_for_new_volumes_only() {
        for name in ["volumes.tmp", "cluster.json", "nbd.sock"] {
            let e = check_new_volume_name(name).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{name}");
            assert!(e.to_string().contains("own files"), "{e}");
            check_volume_name(name).unwrap();
        }
        check_new_volume_name("db.img").unwrap();
    }

    #[test]
    fn a_grow_past_what_a_file_can_be_is_refused_and_the_check_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let e = check_room(dir.path(), "v", 1 << 63).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("filesystem takes"), "{e}");
        check_room(dir.path(), "v", 1 << 30).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// A node serving on a loopback port, and its address.
    async fn serving() -> (Arc<Node>, String, tempfile::TempDir) {
        serving_with(Timing::default()).await
    }

    async fn serving_with(timing: Timing) -> (Arc<Node>, String, tempfile::TempDir) {
        serving_as(1, timing).await
    }

    async fn serving_as(id: NodeId, timing: Timing) -> (Arc<Node>, String, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::new(id, dir.path(), timing);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(node.clone().serve(listener));
        (node, addr, dir)
    }

    /// A client of the cluster takes the node list from the storage nodes (it is told of no
    /// join), finds a volume held by a node it did not know of by asking for the list again,
    /// and refuses a list that names its own id as a storage node's.
    #[tokio::test]
    async fn a_client_of_the_cluster_follows_its_node_list() {
        let (a, a_addr, _a_dir) = serving_as(1, Timing::default()).await;
        let (b, b_addr, _b_dir) = serving_as(2, Timing::default()).await;
        // Node 2 holds volume v alone, and is not among the nodes the client was given.
        let (spec, _) = led_alone(&b, &b_addr).await;
        let both: BTreeMap<NodeId, String> = [(1, a_addr.clone()), (2, b_addr.clone())].into();
        a.set_cluster(both.clone());
        let dir = tempfile::tempdir().unwrap();
        // A node list left from when this was a storage node (of id 9): not used, not changed.
        let stale = format!("{{\"9\": \"127.0.0.1:9\", \"1\": \"{a_addr}\"}}");
        std::fs::write(dir.path().join("cluster.json"), &stale).unwrap();
        let given: BTreeMap<NodeId, String> = [(1, a_addr.clone())].into();
        let client = Node::client(9, dir.path(), Timing::default(), given.clone()).unwrap();
        client.start().await.unwrap();
        assert!(client.is_client() && !a.is_client());
        assert_eq!(client.cluster(), given);
        let status = client.locate("v").await.unwrap();
        assert_eq!(status.leader, Some(2), "{status:?}");
        assert_eq!(client.cluster(), both);
        let file = std::fs::read_to_string(dir.path().join("cluster.json")).unwrap();
        assert_eq!(file, stale, "a client recorded the list");
        // Nor does it take its own id as a node's.
        let e = client.add_node(9, "127.0.0.1:9").await.unwrap_err();
        assert!(e.to_string().contains("this client's id"), "{e}");
        assert!(Node::client(1, dir.path(), Timing::default(), given.clone()).is_err());
        // One that holds replicas (it was a storage node) does not start as a client.
        let old = tempfile::tempdir().unwrap();
        let catalog = serde_json::to_vec(&BTreeMap::from([("v".to_string(), spec)])).unwrap();
        std::fs::write(old.path().join("volumes.json"), catalog).unwrap();
        let was_node = Node::client(9, old.path(), Timing::default(), given).unwrap();
        let e = was_node.start().await.unwrap_err();
        assert!(e.to_string().contains("holds replicas"), "{e}");
        // A storage node of the client's id: refused, the list kept.
        let mut with_nine = both.clone();
        with_nine.insert(9, "127.0.0.1:9".into());
        a.set_cluster(with_nine.clone());
        b.set_cluster(with_nine);
        let e = client.refresh_cluster().await.unwrap_err();
        assert!(e.to_string().contains("this client's id"), "{e}");
        assert_eq!(client.cluster(), both);
    }

    /// Volume `v` (id 7) on `node` at `addr` alone, its group started and led by it.
    async fn led_alone(node: &Arc<Node>, addr: &str) -> (VolumeSpec, Group) {
        let spec = VolumeSpec {
            name: "v".into(),
            size: 1 << 20,
            members: [(node.id, addr.to_string())].into(),
            replicas: 1,
            id: 7,
        };
        node.open_replica(&spec).await.unwrap();
        node.start_new_group("v", &spec.members).await.unwrap();
        let g = node.group("v").unwrap();
        let leads = g.raft.wait(Some(Duration::from_secs(10)));
        leads.current_leader(node.id, "leads").await.unwrap();
        (spec, g)
    }

    #[tokio::test]
    async fn nodes_of_another_protocol_version_refuse_each_other_and_say_so() {
        let (_node, addr, _dir) = serving().await;
        // Same version: served.
        let r = call(&mut None, &addr, &Rpc::Cluster).await.unwrap();
        assert!(matches!(r, Reply::Cluster(_)), "{r:?}");

        // A client of another version is greeted back, then the connection ends unserved.
        let other = [&b"SBSR"[..], &(RPC_VERSION + 1).to_be_bytes()].concat();
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(&other).await.unwrap();
        send_msg(&mut s, &Rpc::Cluster).await.unwrap();
        let mut h = [0u8; 8];
        s.read_exact(&mut h).await.unwrap();
        assert_eq!(h, hello());
        assert_eq!(s.read(&mut h).await.unwrap(), 0, "served anyway");

        // A server of another version, or something else altogether: the client says which.
        let other_version = format!(
            "speaks node protocol version {}, this node {RPC_VERSION}",
            RPC_VERSION + 1
        );
        for (greeting, says) in [
            (other.clone(), &other_version[..]),
            (b"SSH-2.0-".to_vec(), "is not a blockdrv storage node"),
        ] {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let other = l.local_addr().unwrap().to_string();
            tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                s.write_all(&greeting).await.unwrap();
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
            });
            let e = call(&mut None, &other, &Rpc::Cluster).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            assert!(e.to_string().contains(says), "{e}");
            assert!(e.to_string().contains(&other), "{e}");
        }
    }

    /// A replica left from a deleted volume (cut off from the delete, still a candidate) asks
    /// the new volume of its name for votes: unanswered, and nothing of it sticks (a vote
    /// granted would keep the new replica from starting its group).
    #[tokio::test]
    async fn a_replica_takes_no_part_in_the_group_of_another_volume_of_its_name() {
        let (node, addr, _dir) = serving().await;
        let spec = VolumeSpec {
            name: "v".into(),
            size: 1 << 20,
            members: [(1, addr.clone())].into(),
            replicas: 1,
            id: 7,
        };
        node.open_replica(&spec).await.unwrap();
        let last = openraft::LogId::new(openraft::CommittedLeaderId::new(9, 2), 100);
        let vote = VoteRequest::new(Vote::new(9, 2), Some(last));
        let r = call(&mut None, &addr, &Rpc::Vote("v".into(), 6, vote.clone()))
            .await
            .unwrap();
        assert!(matches!(r, Reply::NoVolume(_)), "{r:?}");
        node.start_new_group("v", &spec.members).await.unwrap();
        let r = call(&mut None, &addr, &Rpc::Vote("v".into(), 7, vote))
            .await
            .unwrap();
        assert!(matches!(r, Reply::Vote(_)), "its own group's: {r:?}");
    }

    /// A leader refuses the votes of candidates it did not invite (its raft, past its lease
    /// from its election, would grant one, and step down before its metrics said so), and
    /// passes the invited member's to raft, which grants it.
    #[tokio::test]
    async fn a_leader_grants_its_vote_only_to_the_member_it_hands_over_to() {
        let (node, addr, _dir) = serving_with(Timing {
            heartbeat_ms: 50,
            election_ms: (150, 300),
            ..Timing::default()
        })
        .await;
        let (_, g) = led_alone(&node, &addr).await;
        // Past its lease from its election.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let last = openraft::LogId::new(openraft::CommittedLeaderId::new(9, 2), 100);
        let vote = || Rpc::Vote("v".into(), 7, VoteRequest::new(Vote::new(9, 2), Some(last)));
        let granted = |r: Reply| match r {
            Reply::Vote(Ok(v)) => v.vote_granted,
            other => panic!("{other:?}"),
        };
        let r = call(&mut None, &addr, &vote()).await.unwrap();
        assert!(!granted(r), "an uninvited candidate's vote was granted");
        let m = g.raft.metrics().borrow().clone();
        assert!(m.current_leader == Some(1) && m.current_term < 9, "{m:?}");
        *g.handover.invited.lock().unwrap() = Some(2);
        let r = call(&mut None, &addr, &vote()).await.unwrap();
        assert!(granted(r), "the invited member's vote was refused");
        // It took the candidate's term, and stepped down (its metrics say so a little later;
        // the group's only voter, it is soon elected again, in a later term).
        g.raft
            .wait(Some(Duration::from_secs(5)))
            .metrics(|m| m.current_term >= 9, "took the candidate's term")
            .await
            .unwrap();
    }

    #[test]
    fn a_follower_is_catching_up_when_it_needs_a_snapshot_or_lags_past_the_limit() {
        // The leader applied up to 50, its log purged up to 15; what it counts after each
        // entry, from 20 on (it restarted there).
        let after = |i: u64| (i >= 20).then(|| (50 - i.min(50)) * 1024);
        let c = |matched| catching_up(matched, Some(15), after, 8 * 1024);
        assert!(!c(None), "progress not known yet");
        assert!(!c(Some(50)));
        assert!(!c(Some(60)), "ahead of what the leader applied");
        assert!(!c(Some(42)), "8 MiB behind: at the limit");
        assert!(c(Some(41)), "9 MiB behind");
        assert!(!c(Some(19)), "not counted since the restart: not known");
        assert!(!c(Some(15)), "at the purge point: the log has what follows");
        assert!(c(Some(14)), "behind the purge point");
        assert!(
            !catching_up(Some(14), None, after, 8 * 1024),
            "nothing purged"
        );
    }

    #[test]
    fn a_replica_is_orphaned_only_when_a_leader_of_the_newest_term_goes_on_without_it() {
        let st = |node, leader, term, members: &[u64], learners: &[u64], moving| Status {
            node,
            leader,
            term,
            last_applied: None,
            members: members.to_vec(),
            learners: learners.to_vec(),
            unreachable: Vec::new(),
            moving,
            behind: Vec::new(),
            stalled: Vec::new(),
            size: 0,
            leader_addr: None,
            claims: Default::default(),
            id: 0,
        };
        let v = orphan_verdict;
        // The leader has node 3 as a voter, a learner, or is moving a replica to it: kept.
        assert_eq!(
            v(3, 5, &[st(1, Some(1), 5, &[1, 2, 3], &[], None)]),
            Some(false)
        );
        assert_eq!(
            v(3, 5, &[st(1, Some(1), 5, &[1, 2, 4], &[3], None)]),
            Some(false)
        );
        assert_eq!(
            v(3, 5, &[st(1, Some(1), 5, &[1, 2, 4], &[], Some(3))]),
            Some(false)
        );
        // Without it: dropped.
        let moved_off = st(1, Some(1), 5, &[1, 2, 4], &[], None);
        assert_eq!(v(3, 4, std::slice::from_ref(&moved_off)), Some(true));
        // A node that still thinks it leads, in an older term than another node or this one
        // knows, is not listened to; followers do not decide either.
        let newer = st(2, Some(4), 6, &[2, 3, 4], &[], None);
        assert_eq!(v(3, 5, &[moved_off.clone(), newer.clone()]), None);
        assert_eq!(v(3, 6, std::slice::from_ref(&moved_off)), None);
        assert_eq!(v(3, 5, &[newer]), None);
        // Nobody answering with the volume is no proof (a single replica, lost replicas).
        assert_eq!(v(3, 5, &[]), None);
    }

    #[test]
    fn a_peer_is_stalled_once_it_failed_after_taking_nothing_for_that_long_and_failing_until_it_takes_data(
    ) {
        let links = Links::default();
        let stall = Duration::from_secs(10);
        let start = Instant::now();
        let later = |s| start + Duration::from_secs(s);
        // Never heard of, or only progress: not stalled.
        assert_eq!(links.stalled(4, start, later(60), stall), None);
        links.progressed(4, Mark::Log(10));
        assert_eq!(links.stalled(4, start, later(60), stall), None);
        // An error: stalled only once the stall has passed since the last progress.
        links.data_failed(4, &"No space left on device", true);
        assert_eq!(links.stalled(4, start, later(5), stall), None);
        assert_eq!(
            links.stalled(4, start, later(11), stall).as_deref(),
            Some("No space left on device")
        );
        // Counted from `since` at the earliest (a move that began after the error).
        assert_eq!(links.stalled(4, later(5), later(11), stall), None);
        // Answering heartbeats (its disk full, say) changes nothing; a heartbeat that fails
        // is no data error.
        links.answered(4);
        assert!(links.stalled(4, start, later(11), stall).is_some());
        links.failed(5, &"Connection refused");
        assert_eq!(links.stalled(5, start, later(60), stall), None);
        // Taking again what it took before (a snapshot sent again after an error): not
        // stalled while it takes it...
        links.progressed(4, Mark::Log(10));
        let after = || Instant::now() + Duration::from_secs(11);
        assert_eq!(
            links.stalled(4, start, after(), stall),
            None,
            "it takes data"
        );
        // ...stalled once it fails again with nothing new taken.
        links.progressed(4, Mark::Snapshot(4 << 20));
        links.progressed(4, Mark::Snapshot(4 << 20));
        links.data_failed(4, &"No space left on device", true);
        assert!(
            links.stalled(4, start, after(), stall).is_some(),
            "the same part again"
        );
        // For health: refusing data, with nothing new taken since, however long the parts
        // before the one refused take to send again (a snapshot's first part taken again, of
        // that one or a newer one sent instead, then the next refused, over and over).
        links.progressed(9, Mark::Snapshot(4 << 20));
        let refusing = |refused| {
            links.progressed(9, Mark::Snapshot(4 << 20));
            links.with(9, |l| {
                l.data_error = Some(DataError {
                    at: later(11),
                    error: "No space left on device".into(),
                    refused,
                });
                l.took = Some(later(11) + Duration::from_millis(25));
            });
        };
        refusing(true);
        assert_eq!(
            links.refusing(9, later(5), stall),
            None,
            "not for that long"
        );
        assert!(links.refusing(9, later(12), stall).is_some());
        assert!(links.refusing(9, later(60), stall).is_some());
        assert_eq!(
            links.stalled(9, start, later(12), stall),
            None,
            "a move gives it its time"
        );
        // Failing to reach it (a node down or just back) is not that; and the parts of the
        // snapshot sent next count from its start.
        links.data_failed(9, &"Connection refused", false);
        assert_eq!(links.refusing(9, later(60), stall), None);
        let before = links.with(9, |l| l.progress);
        links.progressed(9, Mark::Snapshot(1 << 20));
        assert!(links.with(9, |l| l.progress >= before && l.snapshot == Some(1 << 20)));
        // Entries taken start the count of snapshot parts again.
        links.progressed(9, Mark::Snapshot(8 << 20));
        links.progressed(9, Mark::Log(3));
        links.progressed(9, Mark::Snapshot(2 << 20));
        assert_eq!(links.with(9, |l| l.snapshot), Some(2 << 20));
        // Taking something new after a refusal: not refusing any more.
        links.data_failed(9, &"No space left on device", true);
        links.progressed(9, Mark::Snapshot(4 << 20));
        assert_eq!(links.refusing(9, Instant::now() + stall * 2, stall), None);
        // Getting further after the error: not stalled, however long ago.
        links.progressed(4, Mark::Snapshot(8 << 20));
        links.data_failed(4, &"No space left on device", true);
        assert_eq!(links.stalled(4, start, later(5), stall), None);
        links.progressed(4, Mark::Log(11));
        assert_eq!(links.stalled(4, start, later(60), stall), None);
        // Forgotten: a move to it starts from nothing.
        links.reset(4);
        links.data_failed(4, &"Connection refused", false);
        assert!(links.stalled(4, start, after(), stall).is_some());
        links.reset(4);
        links.progressed(4, Mark::Log(1));
        assert_eq!(links.stalled(4, start, after(), stall), None);
        assert_eq!(links.stalled(5, start, later(60), stall), None);
        // Failing: the last RPC failed, none answered since.
        assert!(!links.failing(6));
        links.answered(6);
        assert!(!links.failing(6));
        links.failed(6, &"Connection refused");
        assert!(links.failing(6));
        links.answered(6);
        assert!(!links.failing(6));
        links.failed(7, &"Connection refused");
        assert!(links.failing(7), "never answered");
        links.data_failed(8, &"No space left on device", true);
        assert!(links.failing(8), "a data error is an error");
    }

    #[test]
    fn a_snapshot_is_read_as_its_data_and_pieces_in_chunks_with_the_holes_skipped() {
        use std::os::unix::fs::FileExt;
        let f = tempfile::tempfile().unwrap();
        let size = 64 << 20;
        f.set_len(size).unwrap();
        // 9 MiB of data at 8 MiB, one byte at 40 MiB + 5, a hole to the end; and writes held
        // in a log: 64 KiB of 3s at 9 MiB (over the data) and 1 MiB of 5s at 30 MiB (a hole).
        f.write_all_at(&vec![1; 9 << 20], 8 << 20).unwrap();
        f.write_all_at(&[2], (40 << 20) + 5).unwrap();
        let log = Arc::new(tempfile::tempfile().unwrap());
        log.write_all_at(&vec![3; 64 << 10], 0).unwrap();
        log.write_all_at(&vec![5; 1 << 20], 64 << 10).unwrap();
        let pieces = Pieces::default();
        for (offset, len, at) in [(9 << 20, 64 << 10, 0), (30 << 20, 1 << 20, 64 << 10)] {
            let piece = super::super::overlay::Piece {
                len,
                seg: 0,
                file: log.clone(),
                at,
            };
            pieces.write().unwrap().put(offset, piece);
        }
        let mut chunks = Vec::new();
        let mut at = 0;
        while let Some((offset, data)) = next_snapshot_chunk(&f, &pieces, at, size).unwrap() {
            at = offset + data.len() as u64;
            chunks.push((
                offset,
                data.len() as u64,
                data.iter().map(|b| *b as u64).sum::<u64>(),
            ));
        }
        let (a, b, c) = (8 << 20, 12 << 20, 16 << 20);
        assert_eq!(
            &chunks[..4],
            &[
                (a, 4 << 20, (4 << 20) + 2 * (64 << 10)),
                (b, 4 << 20, 4 << 20),
                (c, 1 << 20, 1 << 20),
                (30 << 20, 1 << 20, 5 << 20),
            ]
        );
        // The lone byte comes in whatever block the filesystem keeps for it, and nothing after.
        assert_eq!(chunks.len(), 5, "{chunks:?}");
        let (offset, len, sum) = chunks[4];
        assert!(offset <= (40 << 20) + 5 && offset + len > (40 << 20) + 5 && sum == 2);
        // Only up to `size`: a file grown since is read as it was.
        assert!(next_snapshot_chunk(&f, &pieces, 0, 4 << 20)
            .unwrap()
            .is_none());
    }
}
