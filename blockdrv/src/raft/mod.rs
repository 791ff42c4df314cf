//! Raft replication of a volume (issue 6, in progress): the types of a volume's raft group, its
//! durable log (`segment_log.rs`), its state machine, the volume's blocks (`state_machine.rs`),
//! and the storage node that runs groups and serves them (`node.rs`). Write data is shared, not
//! copied, on its way through them (`data.rs`).

// openraft's StorageError (large) is what its storage traits return; the helpers return it too.
pub mod claims;
pub mod coalesce;
pub mod data;
pub mod node;
pub mod overlay;
pub mod placement;
#[allow(clippy::result_large_err)]
pub mod segment_log;
#[allow(clippy::result_large_err)]
pub mod state_machine;

use serde::{Deserialize, Serialize};

pub use claims::Attachment;
pub use data::Data;

/// A change to a volume (its blocks, its size, its users): what the raft log carries. Every
/// operation says what the range (or the users) holds afterwards, so applying one twice, in
/// log order, gives the same volume (the state machine relies on it after a crash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockOp {
    Write {
        offset: u64,
        data: Data,
    },
    /// The volume grows to `size` bytes (never shrinks).
    Resize {
        size: u64,
    },
    /// Several operations in one entry, applied in order (writes that arrived together).
    Batch(Vec<BlockOp>),
    /// The range reads as zeroes; `allocate`: without a hole.
    Zero {
        offset: u64,
        length: u64,
        allocate: bool,
    },
    /// The volume is a disk of a domain on a node ([`claims`]; decided on the leader).
    Attach(Attachment),
    /// It is no longer a disk of the domain (`disk`: that one; none: any).
    Detach {
        node: NodeId,
        domain: String,
        disk: Option<String>,
    },
    /// A delete of the volume began: nothing attaches it any more.
    Delete,
}

impl BlockOp {
    /// The bytes of write data it carries.
    pub fn data_len(&self) -> usize {
        match self {
            BlockOp::Write { data, .. } => data.len(),
            BlockOp::Batch(ops) => ops.iter().map(BlockOp::data_len).sum(),
            _ => 0,
        }
    }
}

/// The write data of an entry, in the order [`data::encode`] lays them out.
pub fn entry_data(e: &Entry) -> Vec<&Data> {
    fn walk<'a>(op: &'a BlockOp, out: &mut Vec<&'a Data>) {
        match op {
            BlockOp::Write { data, .. } => out.push(data),
            BlockOp::Batch(ops) => ops.iter().for_each(|o| walk(o, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let openraft::EntryPayload::Normal(op) = &e.payload {
        walk(op, &mut out);
    }
    out
}

/// The bytes of write data an entry carries.
pub fn entry_data_len(e: &Entry) -> usize {
    match &e.payload {
        openraft::EntryPayload::Normal(op) => op.data_len(),
        _ => 0,
    }
}

openraft::declare_raft_types!(
    /// The raft types of a volume's group.
    pub TypeConfig:
        D = BlockOp,
        R = (),
        SnapshotData = tokio::fs::File,
);

pub type NodeId = u64;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;

/// Whether `b` is all zeroes (64 bytes at a time, which the compiler vectorizes).
pub(crate) fn is_zero(b: &[u8]) -> bool {
    let chunks = b.chunks_exact(64);
    let rest = chunks.remainder();
    chunks
        .into_iter()
        .all(|c| c.iter().fold(0u8, |acc, x| acc | x) == 0)
        && rest.iter().all(|x| *x == 0)
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn any(e: impl std::fmt::Display) -> openraft::AnyError {
    openraft::AnyError::error(e.to_string())
}

/// Writes `bytes` to `path` durably: a temporary file, fsync, rename, fsync of the directory.
pub(crate) fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(path.parent().unwrap_or(std::path::Path::new(".")))?.sync_all()
}
