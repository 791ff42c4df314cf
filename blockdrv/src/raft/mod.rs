//! Raft replication of a volume (issue 6, in progress): the types of a volume's raft group, its
//! durable log (`log_store.rs`) and its state machine, the volume's blocks (`state_machine.rs`).
//! The network between nodes and the volume front end on top of `openraft::Raft` come next.

// openraft's StorageError (large) is what its storage traits return; the helpers return it too.
#[allow(clippy::result_large_err)]
pub mod log_store;
pub mod node;
#[allow(clippy::result_large_err)]
pub mod state_machine;

use serde::{Deserialize, Serialize};

/// A change to a volume's blocks: what the raft log carries. Every operation says what the
/// range holds afterwards, so applying one twice, in log order, gives the same blocks (the
/// state machine relies on it after a crash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockOp {
    Write {
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The volume grows to `size` bytes (never shrinks).
    Resize { size: u64 },
    /// Several operations in one entry, applied in order (writes that arrived together).
    Batch(Vec<BlockOp>),
    /// The range reads as zeroes; `allocate`: without a hole.
    Zero {
        offset: u64,
        length: u64,
        allocate: bool,
    },
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

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn any(e: impl std::fmt::Display) -> openraft::AnyError {
    openraft::AnyError::error(e.to_string())
}
