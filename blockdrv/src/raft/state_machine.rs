//! A volume's raft state machine: its blocks in a sparse file (`volume.img`), changed by
//! [`BlockOp`]s in log order.
//!
//! Durability comes from the log, not from here: applying does not fsync, and what was applied
//! is recorded only with a snapshot. After a crash the group applies again every committed entry
//! after the last snapshot; every operation sets its range outright, so applying an entry a
//! second time, in order, yields the same blocks.
//!
//! A snapshot is a sparse copy of the blocks (`snapshots/<id>.img`, holes kept) and its
//! metadata (`snapshots/<id>.json`), made after an fdatasync of `volume.img`; `current.json`
//! names the current one, replaced by rename. A snapshot is read and received as a file, in
//! chunks by openraft, never whole in memory. Installing one copies it over the blocks.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::{BlockOp, Entry, LogId, NodeId, StorageError, TypeConfig};

type Membership = StoredMembership<NodeId, openraft::BasicNode>;
type Meta = SnapshotMeta<NodeId, openraft::BasicNode>;

/// What a snapshot's `.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotFile {
    meta: Meta,
}

/// The state machine of one volume's group on this node.
#[derive(Debug)]
pub struct StateMachine {
    dir: PathBuf,
    /// The volume's size now (grown by `Resize`), shared with the front end.
    size: Size,
    /// Shared with the volume's readers; replaced whole when a snapshot is installed.
    blocks: Blocks,
    last_applied: Option<LogId>,
    membership: Membership,
    /// Numbers snapshots built here.
    seq: u64,
    /// KiB applied since the last snapshot (built or installed), each entry counted as at
    /// least [`MIN_ENTRY_KIB`]: when the next snapshot is due is decided on it.
    since_snapshot: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// The least an entry counts for in [`StateMachine::applied_since_snapshot`].
const MIN_ENTRY_KIB: u64 = 64;

/// The blocks file of a volume, shared by the state machine and the readers.
pub type Blocks = std::sync::Arc<std::sync::RwLock<File>>;
/// A volume's size, shared by the state machine and the front end.
pub type Size = std::sync::Arc<std::sync::atomic::AtomicU64>;

fn load(size: &Size) -> u64 {
    size.load(std::sync::atomic::Ordering::SeqCst)
}

fn dup(blocks: &Blocks) -> io::Result<File> {
    blocks.read().unwrap_or_else(|e| e.into_inner()).try_clone()
}

fn sm_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_state_machine(super::any(e)).into()
}

fn snap_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_snapshot(None, super::any(e)).into()
}

/// Copies `from` (from its start) to a new file `to`, leaving holes where `from` has zeroes in
/// whole 64 KiB runs, makes it `size` bytes long and syncs it.
fn sparse_copy(from: &mut File, to: &Path, size: u64) -> io::Result<()> {
    from.seek(SeekFrom::Start(0))?;
    let out = File::create(to)?;
    let mut buf = vec![0u8; 64 << 10];
    let mut at = 0u64;
    loop {
        let mut n = 0;
        while n < buf.len() {
            let r = from.read(&mut buf[n..])?;
            if r == 0 {
                break;
            }
            n += r;
        }
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|b| *b != 0) {
            out.write_all_at(&buf[..n], at)?;
        }
        at += n as u64;
    }
    out.set_len(size.max(at))?;
    out.sync_all()
}

fn snapshot_path(dir: &Path, id: &str, ext: &str) -> PathBuf {
    dir.join("snapshots").join(format!("{id}.{ext}"))
}

/// The current snapshot's metadata (`current.json`), if there is one.
fn current(dir: &Path) -> io::Result<Option<Meta>> {
    match std::fs::read(dir.join("current.json")) {
        Ok(b) => Ok(Some(
            serde_json::from_slice::<SnapshotFile>(&b)
                .map_err(super::io_err)?
                .meta,
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Makes `meta` the current snapshot of `dir` (its image must exist) and removes older ones.
fn set_current(dir: &Path, meta: &Meta) -> io::Result<()> {
    let bytes = serde_json::to_vec(&SnapshotFile { meta: meta.clone() }).map_err(super::io_err)?;
    super::write_atomic(&snapshot_path(dir, &meta.snapshot_id, "json"), &bytes)?;
    super::write_atomic(&dir.join("current.json"), &bytes)?;
    let keep = format!("{}.", meta.snapshot_id);
    for e in std::fs::read_dir(dir.join("snapshots"))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&keep) && name != "incoming.img" {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(())
}

/// Entries writing at most this many bytes are applied on the runtime's thread.
const INLINE_APPLY: usize = 256 << 10;

fn op_bytes(op: &BlockOp) -> usize {
    match op {
        BlockOp::Write { data, .. } => data.len(),
        BlockOp::Batch(ops) => ops.iter().map(op_bytes).sum(),
        // Zeroing and growing touch no data, but may take the filesystem a while.
        BlockOp::Zero { .. } | BlockOp::Resize { .. } => INLINE_APPLY,
    }
}

fn apply_op(blocks: &File, op: &BlockOp) -> io::Result<()> {
    match op {
        BlockOp::Batch(ops) => ops.iter().try_for_each(|o| apply_op(blocks, o)),
        BlockOp::Write { offset, data } => blocks.write_all_at(data, *offset),
        BlockOp::Resize { size } => {
            if blocks.metadata()?.len() < *size {
                blocks.set_len(*size)?;
            }
            Ok(())
        }
        BlockOp::Zero {
            offset,
            length,
            allocate,
        } => {
            let mode = if *allocate {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            };
            let (Ok(off), Ok(len)) = (i64::try_from(*offset), i64::try_from(*length)) else {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            };
            // SAFETY: fallocate on the descriptor this `File` owns; no memory is passed.
            let r = unsafe { libc::fallocate(blocks.as_raw_fd(), mode, off, len) };
            if r == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        }
    }
}

impl StateMachine {
    /// Opens the state machine of a volume of `size` bytes in `dir` (created if new; one that
    /// has grown keeps its size).
    pub fn open(dir: &Path, size: u64) -> io::Result<StateMachine> {
        std::fs::create_dir_all(dir.join("snapshots"))?;
        let blocks = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("volume.img"))?;
        let len = blocks.metadata()?.len();
        if len < size {
            blocks.set_len(size)?;
        }
        let size = len.max(size);
        let cur = current(dir)?;
        Ok(StateMachine {
            dir: dir.to_owned(),
            size: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(size)),
            blocks: std::sync::Arc::new(std::sync::RwLock::new(blocks)),
            last_applied: cur.as_ref().and_then(|m| m.last_log_id),
            membership: cur.map(|m| m.last_membership).unwrap_or_default(),
            seq: 0,
            since_snapshot: Default::default(),
        })
    }

    /// The blocks, for reads (positioned reads need no `&mut`); the same handle after a
    /// snapshot is installed.
    pub fn blocks(&self) -> Blocks {
        self.blocks.clone()
    }

    /// The volume's size, as it grows.
    pub fn size(&self) -> Size {
        self.size.clone()
    }

    /// KiB applied since the last snapshot (each entry counted as at least 64 KiB), reset when
    /// a snapshot is built or installed. (After a restart it counts from the entries applied
    /// again.)
    pub fn applied_since_snapshot(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        self.since_snapshot.clone()
    }
}

/// Builds a snapshot from the blocks and the applied state at the time it was asked for.
#[derive(Debug)]
pub struct SnapshotBuilder {
    dir: PathBuf,
    size: u64,
    blocks: io::Result<File>,
    meta: Meta,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let mut blocks = self
            .blocks
            .as_ref()
            .map_err(snap_err)?
            .try_clone()
            .map_err(snap_err)?;
        let (dir, size, meta) = (self.dir.clone(), self.size, self.meta.clone());
        let img = snapshot_path(&dir, &meta.snapshot_id, "img");
        let file = tokio::task::spawn_blocking(move || {
            blocks.sync_data()?;
            sparse_copy(&mut blocks, &img, size)?;
            set_current(&dir, &meta)?;
            File::open(&img)
        })
        .await
        .map_err(snap_err)?
        .map_err(snap_err)?;
        Ok(Snapshot {
            meta: self.meta.clone(),
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<()>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let write_all = |blocks: &Blocks, entries: &[Entry]| {
            let f = blocks.read().unwrap_or_else(|e| e.into_inner());
            for e in entries {
                if let EntryPayload::Normal(op) = &e.payload {
                    apply_op(&f, op)?;
                }
            }
            Ok::<_, io::Error>(())
        };
        let sizes = entries.iter().map(|e| match &e.payload {
            EntryPayload::Normal(op) => op_bytes(op),
            _ => 0,
        });
        let bytes: usize = sizes.clone().sum();
        let kib: u64 = sizes.map(|b| (b as u64 >> 10).max(MIN_ENTRY_KIB)).sum();
        self.since_snapshot
            .fetch_add(kib, std::sync::atomic::Ordering::Relaxed);
        let entries = if bytes <= INLINE_APPLY {
            // Into the page cache (no fsync): quicker here than a hop to the blocking pool.
            write_all(&self.blocks, &entries).map_err(sm_err)?;
            entries
        } else {
            let blocks = self.blocks.clone();
            tokio::task::spawn_blocking(move || write_all(&blocks, &entries).map(|()| entries))
                .await
                .map_err(sm_err)?
                .map_err(sm_err)?
        };
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            if let EntryPayload::Normal(op) = &e.payload {
                let grown = match op {
                    BlockOp::Resize { size } => Some(*size),
                    BlockOp::Batch(ops) => ops
                        .iter()
                        .filter_map(|o| match o {
                            BlockOp::Resize { size } => Some(*size),
                            _ => None,
                        })
                        .max(),
                    _ => None,
                };
                if let Some(size) = grown {
                    self.size
                        .fetch_max(size, std::sync::atomic::Ordering::SeqCst);
                }
            }
            if let EntryPayload::Membership(m) = e.payload {
                self.membership = StoredMembership::new(Some(e.log_id), m);
            }
            self.last_applied = Some(e.log_id);
            out.push(());
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        self.seq += 1;
        self.since_snapshot
            .store(0, std::sync::atomic::Ordering::Relaxed);
        let id = format!(
            "{}-{}-{}",
            self.last_applied.map_or(0, |l| l.leader_id.term),
            self.last_applied.map_or(0, |l| l.index),
            self.seq
        );
        SnapshotBuilder {
            dir: self.dir.clone(),
            size: load(&self.size),
            blocks: dup(&self.blocks),
            meta: Meta {
                last_log_id: self.last_applied,
                last_membership: self.membership.clone(),
                snapshot_id: id,
            },
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.dir.join("snapshots").join("incoming.img"))
            .map_err(snap_err)?;
        Ok(Box::new(tokio::fs::File::from_std(f)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let mut received = snapshot.into_std().await;
        let (dir, size, m) = (self.dir.clone(), load(&self.size), meta.clone());
        let blocks = tokio::task::spawn_blocking(move || {
            let img = snapshot_path(&dir, &m.snapshot_id, "img");
            sparse_copy(&mut received, &img, size)?;
            // The blocks become the snapshot's: a copy renamed over them, then reopened.
            let tmp = dir.join("volume.img.new");
            sparse_copy(&mut File::open(&img)?, &tmp, size)?;
            std::fs::rename(&tmp, dir.join("volume.img"))?;
            File::open(&dir)?.sync_all()?;
            set_current(&dir, &m)?;
            File::options()
                .read(true)
                .write(true)
                .open(dir.join("volume.img"))
        })
        .await
        .map_err(snap_err)?
        .map_err(snap_err)?;
        let len = blocks.metadata().map_err(snap_err)?.len();
        self.size
            .fetch_max(len, std::sync::atomic::Ordering::SeqCst);
        *self.blocks.write().unwrap_or_else(|e| e.into_inner()) = blocks;
        tracing::info!(snapshot = %meta.snapshot_id, "snapshot installed");
        self.since_snapshot
            .store(0, std::sync::atomic::Ordering::Relaxed);
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let Some(meta) = current(&self.dir).map_err(snap_err)? else {
            return Ok(None);
        };
        let f = File::open(snapshot_path(&self.dir, &meta.snapshot_id, "img")).map_err(snap_err)?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(f)),
        }))
    }
}
