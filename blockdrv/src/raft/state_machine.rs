//! A volume's raft state machine: its blocks in a sparse file (`volume.img`), and the log
//! segments where it holds large writes, changed by [`BlockOp`]s in log order.
//!
//! Durability comes from the log, not from here: applying does not fsync, and what was applied
//! is recorded only with a snapshot. After a crash the group applies again every committed entry
//! after the last snapshot; every operation sets its range outright, so applying an entry a
//! second time, in order, yields the same blocks.
//!
//! A write of [`BY_REFERENCE`] bytes or more that the group's own log has written (its
//! [`Place`](super::data::Place)) is applied by reference: that range of the volume becomes a
//! piece of the [`Overlay`], read from the log segment, and the blocks are left alone; a
//! range written again, or zeroed, is cut out of the pieces. The pieces keep their segments
//! past the log's purge (the log holds them, see `segment_log.rs`), up to `budget` bytes of
//! segments (each counted as the segment size, or as far as its pieces reach if further: an
//! append goes whole into the segment it starts in): past it, the pieces of the segment that
//! holds the fewest bytes of them are copied to the blocks (`copy_file_range`), so a segment
//! is given back. Each byte is copied at most once, and a volume rewritten within the budget
//! never is: its old segments empty as it is rewritten. Other operations go to the blocks, then
//! cut what pieces held of their range.
//!
//! A snapshot is fuzzy, as ZooKeeper's are: taking one is an fdatasync of `volume.img` and
//! recording the last log id applied and the pieces at that id (where in which segment each
//! range is: `current.json`, replaced by rename, and `snapshots/<id>.json`); the segments the
//! current snapshot names are held until a newer one no longer does, so a restart finds them.
//! The blocks are not copied, and may by then hold later writes too (as may the pieces'
//! ranges, which later entries cut); every such range is set by an entry after the id. So a
//! snapshot stands for "this log id, and the entries after it": whoever installs it, or
//! restarts from it, applies every entry after that id again, which, since entries are
//! idempotent and applied in order, brings the volume to exactly the state of the last one
//! applied. (The log is purged only up to a snapshot's id, so those entries are always there
//! to apply; and a node serves reads only once it has applied up to the read index, which is
//! past anything the snapshot could hold.) Sending a snapshot reads the live volume in chunks,
//! the blocks' data and the pieces ([`next_chunk`]; holes and zero runs are not
//! sent); receiving one writes them to `snapshots/incoming.img` (the rest stays holes), and
//! installing it turns its other 64 KiB runs of zeroes into holes in place and renames it over
//! the blocks, no copy, with no pieces. Nothing is ever held whole in memory, and a snapshot
//! costs a sync, not a copy of the volume, so the log can be compacted often.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::claims::{self, Claims};
use super::overlay::{Overlay, Piece, Recorded, Source};
use super::{BlockOp, Entry, LogId, NodeId, StorageError, TypeConfig};

type Membership = StoredMembership<NodeId, openraft::BasicNode>;
type Meta = SnapshotMeta<NodeId, openraft::BasicNode>;

/// What a snapshot's `.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotFile {
    meta: Meta,
    /// The ranges of the volume that were in the log at the snapshot's log id, and where.
    #[serde(default)]
    pieces: Vec<Recorded>,
    /// The volume's users at the snapshot's log id.
    #[serde(default)]
    claims: Claims,
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
    /// What was applied, for deciding when to snapshot and how much log to keep.
    applied: std::sync::Arc<Applied>,
    /// Writes applied by reference: their bytes are in the log, not in the blocks.
    pieces: Pieces,
    /// Bytes of log segments the pieces may keep: past it, the segments that hold the fewest
    /// bytes of pieces have those copied to the blocks.
    budget: u64,
    /// How long a segment of the log is.
    seg_bytes: u64,
    /// The log (`SegmentLog::id`) whose data writes are applied by reference to, if any.
    log: Option<u64>,
    /// The segment files the current snapshot records pieces in; locked while it changes.
    current: Current,
    /// The volume's users (`claims.rs`): kept in memory, recorded with each snapshot.
    claims: claims::Shared,
}

/// The least an entry counts for in [`Applied`].
const MIN_ENTRY_KIB: u64 = 64;

/// KiB applied, each entry counted as at least [`MIN_ENTRY_KIB`]: since the last snapshot
/// (built or installed; when the next one is due is decided on it), and entry by entry, so that
/// the log can be purged by bytes, not entries (openraft keeps a number of entries; entries here
/// carry from 4 KiB to 4 MiB). After a restart it counts, from their records, the entries the
/// log still holds up to the snapshot the state machine opens at ([`Applied::seed`]), and
/// then the entries applied again.
#[derive(Debug, Default)]
pub struct Applied {
    inner: std::sync::Mutex<AppliedCount>,
}

#[derive(Debug, Default)]
struct AppliedCount {
    since_snapshot: u64,
    total: u64,
    /// (index, `total` once it was applied), oldest first; forgotten by `purge_point`.
    marks: std::collections::VecDeque<(u64, u64)>,
    /// The last mark `purge_point` forgot (the log's purge point).
    purged: Option<(u64, u64)>,
}

impl AppliedCount {
    /// Counts entry `index` of `bytes`: its KiB.
    fn count(&mut self, index: u64, bytes: usize) -> u64 {
        let kib = (bytes as u64 >> 10).max(MIN_ENTRY_KIB);
        self.total += kib;
        self.marks.push_back((index, self.total));
        kib
    }
}

impl Applied {
    fn lock(&self) -> std::sync::MutexGuard<'_, AppliedCount> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, entries: impl Iterator<Item = (u64, usize)>) {
        let mut c = self.lock();
        for (index, bytes) in entries {
            c.since_snapshot += c.count(index, bytes);
        }
    }

    /// Counts `entries` (index, bytes), the log's up to the snapshot this state machine
    /// opened at, after the log's purge point `purged`: they were applied before a restart,
    /// not since the snapshot. Nothing must have been counted yet.
    fn seed(&self, purged: Option<u64>, entries: Vec<(u64, usize)>) {
        let mut c = self.lock();
        debug_assert!(c.total == 0 && c.marks.is_empty());
        c.purged = purged.map(|i| (i, 0));
        for (index, bytes) in entries {
            c.count(index, bytes);
        }
    }

    fn snapshot_taken(&self) {
        self.lock().since_snapshot = 0;
    }

    /// A snapshot up to `index` was installed: what was counted before it no longer says how
    /// far behind anyone is; counting goes on from it.
    fn installed(&self, index: u64) {
        let mut c = self.lock();
        c.since_snapshot = 0;
        c.marks.clear();
        c.purged = Some((index, c.total));
    }

    /// KiB applied since the last snapshot.
    pub fn since_snapshot(&self) -> u64 {
        self.lock().since_snapshot
    }

    /// The newest index at or below `snapshot` (the last index in a snapshot: the log can be
    /// purged no further) with at least `keep_kib` applied after it, and not past what `hold`
    /// keeps for a follower, if there is a newer one than last time. Indexes past that are kept
    /// for a later call.
    pub fn purge_point(&self, keep_kib: u64, snapshot: u64, hold: Option<Hold>) -> Option<u64> {
        let mut c = self.lock();
        let total = c.total;
        let mut point = None;
        while let Some(&(index, at)) = c.marks.front() {
            if total - at < keep_kib || index > snapshot {
                break;
            }
            if hold.is_some_and(|h| index > h.matched && total - at < h.most_kib) {
                break;
            }
            point = Some(index);
            c.purged = c.marks.pop_front();
        }
        point
    }

    /// KiB applied after entry `index` (0 if it is the newest applied, or newer), if the
    /// entries after it are counted: `index` is not before the last [`Applied::purge_point`]
    /// (the log no longer has what follows it), nor before the log's first entry when this
    /// process opened it, nor before the last snapshot installed.
    pub fn kib_after(&self, index: u64) -> Option<u64> {
        let c = self.lock();
        let counted = c.marks.partition_point(|&(i, _)| i <= index);
        let (_, at) = match counted.checked_sub(1) {
            Some(last) => c.marks[last],
            None => c.purged.filter(|&(i, _)| i <= index)?,
        };
        Some(c.total - at)
    }
}

/// Log a follower still needs: the entries after `matched` (the last it has) stay unless
/// `most_kib` or more were applied after them, past which a snapshot is cheaper to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    pub matched: u64,
    pub most_kib: u64,
}

/// The blocks file of a volume, shared by the state machine and the readers.
pub type Blocks = std::sync::Arc<std::sync::RwLock<File>>;
/// The writes of a volume held in the log, shared by the state machine and the readers.
pub type Pieces = std::sync::Arc<std::sync::RwLock<Overlay>>;

/// Writes of at least this many bytes are applied by reference to where the log holds them.
const BY_REFERENCE: usize = 64 << 10;
/// Bytes of log segments a volume's writes applied by reference may keep, by default.
pub const HOLD_BYTES: u64 = 512 << 20;

fn read_pieces(p: &Pieces) -> std::sync::RwLockReadGuard<'_, Overlay> {
    p.read().unwrap_or_else(|e| e.into_inner())
}

fn write_pieces(p: &Pieces) -> std::sync::RwLockWriteGuard<'_, Overlay> {
    p.write().unwrap_or_else(|e| e.into_inner())
}

/// `len` bytes of the volume at `offset`: from the blocks, and from the log where it holds
/// them.
pub fn read_volume(
    blocks: &Blocks,
    pieces: &Pieces,
    offset: u64,
    len: usize,
) -> io::Result<Vec<u8>> {
    read_over(
        &blocks.read().unwrap_or_else(|e| e.into_inner()),
        pieces,
        offset,
        len,
    )
}

/// [`read_volume`] from the blocks file `blocks`.
fn read_over(blocks: &File, pieces: &Pieces, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let parts = read_pieces(pieces).resolve(offset, len as u64);
    let mut out = Vec::with_capacity(len);
    for (at, n, source) in parts {
        match source {
            Source::Blocks => crate::sys::read_onto(blocks, &mut out, n as usize, at)?,
            Source::Log(file, at) => crate::sys::read_onto(&file, &mut out, n as usize, at)?,
        }
    }
    Ok(out)
}

/// The next data of the volume (blocks file `blocks`, `size` bytes) at or after `at`, at most
/// `max` bytes of it, and its offset: what a snapshot sends (the blocks' holes where no piece
/// is are left out). None once there is none.
pub fn next_chunk(
    blocks: &File,
    pieces: &Pieces,
    at: u64,
    size: u64,
    max: u64,
) -> io::Result<Option<(u64, Vec<u8>)>> {
    let Some((start, end)) = next_data(blocks, pieces, at, size)? else {
        return Ok(None);
    };
    let len = (end - start).min(max);
    Ok(Some((
        start,
        read_over(blocks, pieces, start, len as usize)?,
    )))
}

/// Where the next data of the volume (blocks file `blocks`, `size` bytes) at or after `at`
/// is, and where it ends: the blocks' next data, or the next piece, whichever comes first
/// (the range may hold holes of the blocks where pieces are not). None if there is none.
fn next_data(blocks: &File, pieces: &Pieces, at: u64, size: u64) -> io::Result<Option<(u64, u64)>> {
    let data = crate::sys::next_data(blocks, at, size)?;
    let piece = read_pieces(pieces)
        .next_piece(at)
        .filter(|(start, _)| *start < size)
        .map(|(start, end)| (start, end.min(size)));
    Ok(match (data, piece) {
        (Some(d), Some(p)) => Some(if d.0 <= p.0 { d } else { p }),
        (d, p) => d.or(p),
    })
}

/// Where `len` bytes of the volume at `offset` are, if in one file: the blocks or the log.
pub fn volume_region(
    blocks: &Blocks,
    pieces: &Pieces,
    offset: u64,
    len: u32,
) -> io::Result<Option<crate::volume::FileRegion>> {
    let parts = read_pieces(pieces).resolve(offset, len.into());
    Ok(match parts.as_slice() {
        [(_, _, Source::Blocks)] => Some(crate::volume::FileRegion {
            file: std::sync::Arc::new(dup(blocks)?),
            offset,
            len,
        }),
        [(_, _, Source::Log(file, at))] => Some(crate::volume::FileRegion {
            file: file.clone(),
            offset: *at,
            len,
        }),
        _ => None,
    })
}

/// The allocation of `[offset, offset + length)` of the volume (`size` bytes): the blocks'
/// holes and data, and data where the log holds the bytes.
pub fn volume_extents(
    blocks: &Blocks,
    pieces: &Pieces,
    size: u64,
    offset: u64,
    length: u64,
) -> io::Result<Vec<crate::volume::Extent>> {
    let end = offset.saturating_add(length).min(size);
    let parts = read_pieces(pieces).resolve(offset, end.saturating_sub(offset));
    let f = blocks.read().unwrap_or_else(|e| e.into_inner());
    let mut out: Vec<crate::volume::Extent> = Vec::new();
    for (at, n, source) in parts {
        let these = match source {
            Source::Blocks => crate::volume::file_extents(&f, size, at, n)?,
            Source::Log(..) => vec![crate::volume::Extent {
                length: n,
                hole: false,
                zero: false,
            }],
        };
        for e in these {
            match out.last_mut() {
                Some(l) if l.hole == e.hole && l.zero == e.zero => l.length += e.length,
                _ => out.push(e),
            }
        }
    }
    Ok(out)
}
/// A volume's size, shared by the state machine and the front end.
pub type Size = std::sync::Arc<std::sync::atomic::AtomicU64>;

fn load(size: &Size) -> u64 {
    size.load(std::sync::atomic::Ordering::SeqCst)
}

pub(super) fn dup(blocks: &Blocks) -> io::Result<File> {
    blocks.read().unwrap_or_else(|e| e.into_inner()).try_clone()
}

fn sm_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_state_machine(super::any(e)).into()
}

fn snap_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_snapshot(None, super::any(e)).into()
}

/// The snapshot data `received` as the file at `incoming`: it is that file when it came from
/// [`StateMachine::begin_receiving_snapshot`] (as openraft does it); any other is copied there.
fn into_incoming(received: File, incoming: &Path) -> io::Result<File> {
    use std::os::unix::fs::MetadataExt;
    let (a, b) = (received.metadata()?, std::fs::metadata(incoming).ok());
    if b.is_some_and(|b| (a.dev(), a.ino()) == (b.dev(), b.ino())) {
        return Ok(received);
    }
    let mut out = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(incoming)?;
    let mut from = &received;
    std::io::Seek::rewind(&mut from)?;
    std::io::copy(&mut from, &mut out)?;
    Ok(out)
}

/// Makes `file` sparse in place: every aligned 64 KiB run of zeroes in its data becomes a hole
/// (its holes are skipped, not read). Returns the bytes of data it read.
fn punch_zero_runs(file: &File) -> io::Result<u64> {
    const RUN: usize = 64 << 10;
    const BUF: usize = 16 * RUN;
    let size = file.metadata()?.len();
    let mut read = 0;
    let mut at = 0;
    while let Some((data, end)) = crate::sys::next_data(file, at, size)? {
        // Whole runs only, aligned to the file's start.
        let mut pos = data - data % RUN as u64;
        while pos < end {
            let len = (end.div_ceil(RUN as u64) * RUN as u64)
                .min(size)
                .min(pos + BUF as u64)
                - pos;
            let buf = crate::sys::read_at(file, len as usize, pos)?;
            read += len;
            for (i, run) in buf.chunks(RUN).enumerate() {
                if super::is_zero(run) {
                    crate::sys::zero_range(file, pos + (i * RUN) as u64, run.len() as u64, false)?;
                }
            }
            pos += len;
        }
        at = end.max(pos);
    }
    Ok(read)
}

fn meta_path(dir: &Path, id: &str) -> PathBuf {
    dir.join("snapshots").join(format!("{id}.json"))
}

/// The current snapshot (`current.json`), if there is one.
fn current_file(dir: &Path) -> io::Result<Option<SnapshotFile>> {
    match std::fs::read(dir.join("current.json")) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).map_err(super::io_err)?)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The current snapshot's metadata, if there is one.
fn current(dir: &Path) -> io::Result<Option<Meta>> {
    Ok(current_file(dir)?.map(|f| f.meta))
}

/// Makes `meta`, with `pieces` in the log, the current snapshot of `dir` and removes what
/// older ones left (their metadata, and the images of snapshots an older blockdrv copied).
fn set_current(dir: &Path, meta: &Meta, pieces: &[Recorded], claims: &Claims) -> io::Result<()> {
    let file = SnapshotFile {
        meta: meta.clone(),
        pieces: pieces.to_vec(),
        claims: claims.clone(),
    };
    let bytes = serde_json::to_vec(&file).map_err(super::io_err)?;
    super::write_atomic(&meta_path(dir, &meta.snapshot_id), &bytes)?;
    super::write_atomic(&dir.join("current.json"), &bytes)?;
    // What older ones left goes if it can: the snapshot is current already.
    let keep = format!("{}.json", meta.snapshot_id);
    for e in std::fs::read_dir(dir.join("snapshots"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name != keep && name != INCOMING {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(())
}

/// Where a snapshot being received is written (in `snapshots/`).
const INCOMING: &str = "incoming.img";

/// Entries writing at most this many bytes are applied on the runtime's thread.
const INLINE_APPLY: usize = 256 << 10;

fn op_bytes(op: &BlockOp) -> usize {
    match op {
        BlockOp::Write { data, .. } => data.len(),
        BlockOp::Batch(ops) => ops.iter().map(op_bytes).sum(),
        // Zeroing and growing touch no data, but may take the filesystem a while.
        BlockOp::Zero { .. } | BlockOp::Resize { .. } => INLINE_APPLY,
        BlockOp::Attach(_) | BlockOp::Detach { .. } | BlockOp::Delete => 0,
    }
}

/// Applies entries to the blocks and the pieces (on the runtime's thread or off it).
struct Apply<'a> {
    blocks: &'a File,
    pieces: &'a Pieces,
    /// As [`StateMachine::log`].
    log: Option<u64>,
}

/// Where the write is, if it is applied by reference: it is large, and log `log` (the
/// state machine's own) has written it in the record of entry `entry` (the one applied).
fn by_reference(data: &super::Data, log: Option<u64>, entry: LogId) -> Option<&super::data::Place> {
    data.place()
        .filter(|p| data.len() >= BY_REFERENCE && Some(p.log) == log && p.entry == entry)
}

impl Apply<'_> {
    /// Applies entry `e`.
    fn entry(&mut self, e: &Entry) -> io::Result<()> {
        match &e.payload {
            EntryPayload::Normal(op) => self.op(op, e.log_id),
            _ => Ok(()),
        }
    }

    fn op(&mut self, op: &BlockOp, entry: LogId) -> io::Result<()> {
        match op {
            BlockOp::Batch(ops) => ops.iter().try_for_each(|o| self.op(o, entry)),
            BlockOp::Write { offset, data } => {
                let len = data.len() as u64;
                match by_reference(data, self.log, entry) {
                    Some(place) => write_pieces(self.pieces).set(*offset, len, place),
                    None => {
                        // Into the blocks first: a reader meanwhile reads the older write.
                        self.blocks.write_all_at(data, *offset)?;
                        write_pieces(self.pieces).cut(*offset, len);
                    }
                }
                Ok(())
            }
            BlockOp::Resize { size } => {
                if self.blocks.metadata()?.len() < *size {
                    self.blocks.set_len(*size)?;
                }
                Ok(())
            }
            BlockOp::Zero {
                offset,
                length,
                allocate,
            } => {
                crate::sys::zero_range(self.blocks, *offset, *length, *allocate)?;
                write_pieces(self.pieces).cut(*offset, *length);
                Ok(())
            }
            // The claims, after the blocks ([`StateMachine::apply`]).
            BlockOp::Attach(_) | BlockOp::Detach { .. } | BlockOp::Delete => Ok(()),
        }
    }
}

/// Whether the pieces keep more than `budget` bytes of log segments of `seg_bytes`.
fn over_budget(pieces: &Pieces, budget: u64, seg_bytes: u64) -> bool {
    read_pieces(pieces).held_bytes(seg_bytes) > budget
}

/// Gives back log segments until the pieces keep at most `budget` bytes of them: the pieces
/// of the segment that holds the fewest bytes of them are copied to the blocks, and so on (the
/// newest segment, where writes go now, only if the budget has no room for it). Each byte
/// is copied at most once: once in the blocks, it stays there.
fn settle(blocks: &File, pieces: &Pieces, budget: u64, seg_bytes: u64) -> io::Result<()> {
    while over_budget(pieces, budget, seg_bytes) {
        let newest_too = read_pieces(pieces)
            .newest_held(seg_bytes)
            .is_some_and(|n| n > budget);
        let Some(seg) = read_pieces(pieces).leanest(newest_too) else {
            return Ok(());
        };
        let these = read_pieces(pieces).in_segment(seg);
        for (off, p) in &these {
            crate::sys::copy_range(&p.file, p.at, blocks, *off, p.len)?;
        }
        // Only the applying thread changes the pieces: each offset still holds its piece.
        let mut w = write_pieces(pieces);
        for (off, p) in these {
            w.cut(off, p.len);
        }
    }
    Ok(())
}

/// The bytes applying `op` copies (zeroing and growing count as [`INLINE_APPLY`]: they touch
/// no data, but may take the filesystem a while).
fn copied_bytes(op: &BlockOp, log: Option<u64>, entry: LogId) -> usize {
    match op {
        BlockOp::Write { data, .. } if by_reference(data, log, entry).is_some() => 0,
        BlockOp::Write { data, .. } => data.len(),
        BlockOp::Batch(ops) => ops.iter().map(|o| copied_bytes(o, log, entry)).sum(),
        BlockOp::Zero { .. } | BlockOp::Resize { .. } => INLINE_APPLY,
        BlockOp::Attach(_) | BlockOp::Detach { .. } | BlockOp::Delete => 0,
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
        let (cur, claims) = match current_file(dir)? {
            Some(f) => (Some(f.meta), f.claims),
            None => (None, Claims::default()),
        };
        let membership = cur
            .as_ref()
            .map(|m| m.last_membership.clone())
            .unwrap_or_default();
        Ok(StateMachine {
            dir: dir.to_owned(),
            size: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(size)),
            blocks: std::sync::Arc::new(std::sync::RwLock::new(blocks)),
            last_applied: cur.and_then(|m| m.last_log_id),
            membership,
            seq: 0,
            applied: Default::default(),
            pieces: Default::default(),
            budget: 0,
            seg_bytes: 1,
            log: None,
            current: Current::default(),
            claims: std::sync::Arc::new(std::sync::Mutex::new(claims::Cell {
                now: claims,
                incoming: Default::default(),
            })),
        })
    }

    /// The state machine of the group whose log is `log`: the pieces its current snapshot
    /// records are taken from the log's segments, and large writes are applied by reference to
    /// where the log holds them, keeping at most `budget` bytes of its segments (0: none is,
    /// every write is copied to the blocks as it is applied).
    pub fn with_log(
        mut self,
        log: &super::segment_log::SegmentLog,
        budget: u64,
    ) -> io::Result<StateMachine> {
        if let Some(snapshot) = current_file(&self.dir)? {
            let mut pieces = write_pieces(&self.pieces);
            let mut files = std::collections::BTreeMap::new();
            for r in snapshot.pieces {
                let file = log.segment(r.seg).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{}: snapshot {} has {} bytes at offset {} in log segment {}, which is missing",
                            self.dir.display(),
                            snapshot.meta.snapshot_id,
                            r.len,
                            r.offset,
                            r.seg
                        ),
                    )
                })?;
                files.insert(r.seg, file.clone());
                pieces.put(
                    r.offset,
                    Piece {
                        len: r.len,
                        seg: r.seg,
                        file,
                        at: r.at,
                    },
                );
            }
            // A segment counts as long as its file, whatever of it the pieces still hold.
            for (seg, file) in &files {
                pieces.reaches(*seg, file.metadata()?.len());
            }
            *lock_current(&self.current) = files.into_values().collect();
        }
        // What the log holds up to the snapshot is not applied again, but counts for how far
        // behind a follower is. A log that ends before the snapshot (one installed, the log not
        // yet purged when the node stopped) is purged up to it as openraft starts: counting
        // starts at the snapshot then, as after an install.
        if let Some(at) = self.last_applied {
            let (purged, sizes) = log.sizes_upto(at.index);
            match sizes.last() {
                Some(&(last, _)) if last == at.index => self.applied.seed(purged, sizes),
                _ => self.applied.installed(at.index),
            }
        }
        // Nothing held: copied from the entry at once (a piece would be read back).
        self.log = Some(log.id()).filter(|_| budget > 0);
        self.budget = budget;
        self.seg_bytes = log.segment_bytes();
        Ok(self)
    }

    /// The writes held in the log, for reads.
    pub fn pieces(&self) -> Pieces {
        self.pieces.clone()
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

    /// What was applied, shared with whoever decides on snapshots and purges.
    /// The volume's users, as applied.
    pub fn claims(&self) -> claims::Shared {
        self.claims.clone()
    }

    pub fn applied(&self) -> std::sync::Arc<Applied> {
        self.applied.clone()
    }
}

/// Builds a snapshot from the blocks and the applied state at the time it was asked for.
#[derive(Debug)]
pub struct SnapshotBuilder {
    dir: PathBuf,
    blocks: io::Result<File>,
    meta: Meta,
    /// The pieces at the snapshot's log id, and the segments they are in.
    pieces: Vec<Recorded>,
    files: Vec<std::sync::Arc<File>>,
    /// The claims at the snapshot's log id.
    claims: Claims,
    /// As [`StateMachine::current`].
    current: Current,
    /// The state machine's, held while the snapshot is built (openraft builds it on a task of
    /// its own, which may outlive the state machine): a node reopens a replica whose raft
    /// stopped only once nothing holds this (`node.rs`, `Remains`).
    applied: std::sync::Arc<Applied>,
}

/// The segment files the current snapshot records pieces in (held, so that the log does not
/// reuse them while a restart may need them), locked while `current.json` is replaced:
/// openraft builds a snapshot on a task of its own, which may end after a newer snapshot was
/// installed.
type Current = std::sync::Arc<std::sync::Mutex<Vec<std::sync::Arc<File>>>>;

fn lock_current(c: &Current) -> std::sync::MutexGuard<'_, Vec<std::sync::Arc<File>>> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

/// The current snapshot's data: the live blocks, opened by path (a descriptor of its own,
/// whose position openraft moves as it reads chunks).
fn snapshot_data(dir: &Path) -> io::Result<Box<tokio::fs::File>> {
    Ok(Box::new(tokio::fs::File::from_std(File::open(
        dir.join("volume.img"),
    )?)))
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let blocks = self
            .blocks
            .as_ref()
            .map_err(snap_err)?
            .try_clone()
            .map_err(snap_err)?;
        let (dir, meta, lock) = (self.dir.clone(), self.meta.clone(), self.current.clone());
        let (pieces, files) = (self.pieces.clone(), self.files.clone());
        let (applied, claims) = (self.applied.clone(), self.claims.clone());
        tokio::task::spawn_blocking(move || {
            let _applied = applied;
            // Everything applied up to the snapshot's log id (and maybe more) is on disk, in
            // the blocks or in the log (synced before it was acknowledged).
            blocks.sync_data()?;
            let mut held = lock_current(&lock);
            // Not over a newer one installed meanwhile (its log is purged up to it: a restart
            // from this one would find entries missing).
            match current(&dir)? {
                Some(c) if c.last_log_id >= meta.last_log_id => Ok::<_, io::Error>(()),
                _ => {
                    // Held before `current.json` may name them (it may be replaced and a later
                    // step fail); those only the older one named may be reused once it is.
                    held.extend(files.iter().cloned());
                    set_current(&dir, &meta, &pieces, &claims)?;
                    *held = files;
                    Ok(())
                }
            }
        })
        .await
        .map_err(snap_err)?
        .map_err(snap_err)?;
        Ok(Snapshot {
            meta: self.meta.clone(),
            snapshot: snapshot_data(&self.dir).map_err(snap_err)?,
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
        let (budget, seg_bytes, log) = (self.budget, self.seg_bytes, self.log);
        // Applies the entries, then gives back segments if `settling` (off the runtime).
        let write_all = move |blocks: &Blocks, pieces: &Pieces, entries: &[Entry], settling| {
            let f = blocks.read().unwrap_or_else(|e| e.into_inner());
            let mut apply = Apply {
                blocks: &f,
                pieces,
                log,
            };
            for e in entries {
                apply.entry(e)?;
            }
            if settling {
                settle(&f, pieces, budget, seg_bytes)?;
            }
            Ok::<_, io::Error>(())
        };
        let sizes = entries.iter().map(|e| match &e.payload {
            EntryPayload::Normal(op) => op_bytes(op),
            _ => 0,
        });
        self.applied
            .add(entries.iter().map(|e| e.log_id.index).zip(sizes));
        let copied: usize = entries
            .iter()
            .map(|e| match &e.payload {
                EntryPayload::Normal(op) => copied_bytes(op, log, e.log_id),
                _ => 0,
            })
            .sum();
        let entries = if copied <= INLINE_APPLY {
            // Into the page cache (no fsync): quicker here than a hop to the blocking pool.
            write_all(&self.blocks, &self.pieces, &entries, false).map_err(sm_err)?;
            if over_budget(&self.pieces, budget, seg_bytes) {
                let (blocks, pieces) = (self.blocks.clone(), self.pieces.clone());
                tokio::task::spawn_blocking(move || {
                    let f = blocks.read().unwrap_or_else(|e| e.into_inner());
                    settle(&f, &pieces, budget, seg_bytes)
                })
                .await
                .map_err(sm_err)?
                .map_err(sm_err)?;
            }
            entries
        } else {
            let (blocks, pieces) = (self.blocks.clone(), self.pieces.clone());
            tokio::task::spawn_blocking(move || {
                write_all(&blocks, &pieces, &entries, true).map(|()| entries)
            })
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
            if let EntryPayload::Normal(op) = &e.payload {
                claims::lock(&self.claims).now.apply(op);
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
        self.applied.snapshot_taken();
        // The last entry applied: the blocks hold what it left outside the pieces, and the
        // pieces, recorded with it, the rest.
        let upto = self.last_applied;
        let (pieces, files) = read_pieces(&self.pieces).record();
        let id = format!(
            "{}-{}-{}",
            upto.map_or(0, |l| l.leader_id.term),
            upto.map_or(0, |l| l.index),
            self.seq
        );
        SnapshotBuilder {
            dir: self.dir.clone(),
            blocks: dup(&self.blocks),
            meta: Meta {
                last_log_id: upto,
                last_membership: self.membership.clone(),
                snapshot_id: id,
            },
            pieces,
            files,
            claims: claims::lock(&self.claims).now.clone(),
            current: self.current.clone(),
            applied: self.applied.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let path = self.dir.join("snapshots").join(INCOMING);
        // A new file, not the last one truncated: a part still being written to that one (a
        // receive given up, a replica reopened after its raft stopped) does not land in this.
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(snap_err(e)),
            _ => {}
        }
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(snap_err)?;
        Ok(Box::new(tokio::fs::File::from_std(f)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let received = snapshot.into_std().await;
        let (dir, size, m) = (self.dir.clone(), load(&self.size), meta.clone());
        let lock = self.current.clone();
        // The claims the sender had (`SnapshotEnd` always carries them).
        let incoming = claims::lock(&self.claims)
            .incoming
            .remove(&meta.snapshot_id);
        let claims = incoming.unwrap_or_else(|| {
            tracing::error!(snapshot = %meta.snapshot_id, "installed without its users");
            Claims::default()
        });
        let now = claims.clone();
        let blocks = tokio::task::spawn_blocking(move || {
            let mut held = lock_current(&lock);
            // The blocks become the snapshot's: the file received (zero chunks are holes in it
            // already) loses its other runs of zeroes, is synced and renamed over them, then
            // reopened; the snapshot is current once they are in place. No copy: a copy would
            // put every byte in fresh pages or blocks a second time.
            let incoming = dir.join("snapshots").join(INCOMING);
            let received = into_incoming(received, &incoming)?;
            punch_zero_runs(&received)?;
            if received.metadata()?.len() < size {
                received.set_len(size)?;
            }
            received.sync_all()?;
            drop(received);
            std::fs::rename(&incoming, dir.join("volume.img"))?;
            File::open(&dir)?.sync_all()?;
            set_current(&dir, &m, &[], &claims)?;
            held.clear();
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
        {
            // The pieces are older than the snapshot: gone with the blocks they were over. The
            // blocks' lock first, as readers take them (`read_volume`).
            let mut old = self.blocks.write().unwrap_or_else(|e| e.into_inner());
            let mut pieces = write_pieces(&self.pieces);
            *old = blocks;
            pieces.clear();
        }
        tracing::info!(snapshot = %meta.snapshot_id, "snapshot installed");
        self.applied
            .installed(meta.last_log_id.map_or(0, |l| l.index));
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        claims::lock(&self.claims).now = now;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let Some(meta) = current(&self.dir).map_err(snap_err)? else {
            return Ok(None);
        };
        Ok(Some(Snapshot {
            meta,
            snapshot: snapshot_data(&self.dir).map_err(snap_err)?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries of writes (large, some overlapping in one batch, and small), zeroings, after a
    /// blank entry at 1; and the volume of `size` bytes they leave.
    fn workload(size: u64, n: u64) -> (Vec<Entry>, Vec<u8>) {
        let mut x = 7u64;
        let mut next = move || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            x >> 33
        };
        let mut model = vec![0u8; size as usize];
        let log_id = |i| LogId::new(openraft::CommittedLeaderId::new(1, 0), i);
        let mut entries = vec![Entry {
            log_id: log_id(1),
            payload: EntryPayload::Blank,
        }];
        for i in 0..n {
            let off = (next() % (size / 4096 - 96)) * 4096;
            let fill = (i % 250) as u8 + 1;
            let write = |off: u64, len: usize| BlockOp::Write {
                offset: off,
                data: vec![fill; len].into(),
            };
            let op = match i % 6 {
                0 => write(off, 4096),
                1 => BlockOp::Zero {
                    offset: off,
                    length: 128 << 10,
                    allocate: false,
                },
                2 => BlockOp::Batch(vec![
                    write(off, 128 << 10),
                    write(off + (32 << 10), 64 << 10),
                ]),
                _ => write(off, 256 << 10),
            };
            let mut model_op = |op: &BlockOp| match op {
                BlockOp::Write { offset, data } => {
                    model[*offset as usize..*offset as usize + data.len()].copy_from_slice(data)
                }
                BlockOp::Zero { offset, length, .. } => {
                    model[*offset as usize..(*offset + *length) as usize].fill(0)
                }
                _ => unreachable!(),
            };
            match &op {
                BlockOp::Batch(ops) => ops.iter().for_each(&mut model_op),
                op => model_op(op),
            }
            entries.push(Entry {
                log_id: log_id(i + 2),
                payload: EntryPayload::Normal(op),
            });
        }
        (entries, model)
    }

    fn volume(sm: &StateMachine, size: u64) -> Vec<u8> {
        read_volume(&sm.blocks(), &sm.pieces(), 0, size as usize).unwrap()
    }

    async fn snapshot(sm: &mut StateMachine) -> Snapshot<TypeConfig> {
        use openraft::RaftSnapshotBuilder;
        sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap()
    }

    /// What a leader sends of a snapshot (`node.rs`): the data of the volume, read through the
    /// pieces, written at its offsets into the file a replica receives it in.
    async fn send(snap: Snapshot<TypeConfig>, pieces: &Pieces, to: &mut StateMachine) {
        let rx = to.begin_receiving_snapshot().await.unwrap();
        let blocks = snap.snapshot.into_std().await;
        let size = blocks.metadata().unwrap().len();
        let dst = rx.try_clone().await.unwrap().into_std().await;
        let mut at = 0;
        while let Some((start, data)) = next_chunk(&blocks, pieces, at, size, 1 << 20).unwrap() {
            dst.write_all_at(&data, start).unwrap();
            at = start + data.len() as u64;
        }
        to.install_snapshot(&snap.meta, rx).await.unwrap();
    }

    /// The length of the log segment files the pieces of `sm` are in.
    fn held_file_bytes(sm: &StateMachine) -> u64 {
        let (_, files) = read_pieces(&sm.pieces()).record();
        files.iter().map(|f| f.metadata().unwrap().len()).sum()
    }

    /// A log of 1 MiB segments in `dir`, its entries appended one by one (as a leader's come).
    async fn log_with(dir: &Path, entries: &[Entry]) -> super::super::segment_log::SegmentLog {
        let mut log = super::super::segment_log::SegmentLog::open_small(dir, 1 << 20).unwrap();
        for e in entries {
            log.append_durably(vec![e.clone()]).await.unwrap();
        }
        log
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn writes_held_in_the_log_survive_a_restart_from_a_snapshot_past_them_and_go_elsewhere() {
        use openraft::storage::{RaftLogReader, RaftLogStorage};
        const SIZE: u64 = 4 << 20;
        const BUDGET: u64 = 3 << 20;
        let dir = tempfile::tempdir().unwrap();
        let (entries, model) = workload(SIZE, 60);
        let log_dir = dir.path().join("log");
        let open = |log: &super::super::segment_log::SegmentLog| {
            StateMachine::open(&dir.path().join("sm"), SIZE)
                .unwrap()
                .with_log(log, BUDGET)
                .unwrap()
        };
        let mut log = log_with(&log_dir, &entries).await;
        let mut sm = open(&log);
        // Up to entry 46, then a snapshot of it, with the log purged up to it.
        sm.apply(entries[..46].to_vec()).await.unwrap();
        let pieces = sm.pieces();
        let (kept, held) = {
            let p = read_pieces(&pieces);
            (p.segments(), p.bytes())
        };
        assert!(
            kept > 0 && kept <= 3 && held > 0,
            "{kept} segments, {held} bytes"
        );
        let snap = snapshot(&mut sm).await;
        let at = snap.meta.last_log_id.unwrap();
        assert_eq!(at.index, 46);
        let recorded = current_file(&dir.path().join("sm"))
            .unwrap()
            .unwrap()
            .pieces;
        assert_eq!(recorded.iter().map(|r| r.len).sum::<u64>(), held);
        log.purge(at).await.unwrap();
        // The rest; the blocks alone are not the volume.
        sm.apply(entries[46..].to_vec()).await.unwrap();
        assert!(volume(&sm, SIZE) == model, "the volume differs");
        let blocks = crate::sys::read_at(&sm.blocks().read().unwrap(), SIZE as usize, 0).unwrap();
        assert!(blocks != model, "the blocks have every write");
        assert!(read_pieces(&sm.pieces()).segments() <= 3);

        // A restart: the pieces the snapshot recorded, in purged segments the log held, then
        // the entries after it, applied again from the log (by reference).
        drop((sm, log));
        assert!(!held_segs(&log_dir).is_empty(), "no purged segment held");
        let reopen =
            || super::super::segment_log::SegmentLog::open_small(&log_dir, 1 << 20).unwrap();
        let mut log = reopen();
        let mut sm = open(&log);
        assert_eq!(sm.applied_state().await.unwrap().0, Some(at));
        // Up to entry 55 again, a second snapshot there, the log purged up to it, the rest.
        let again = log.try_get_log_entries(at.index + 1..56).await.unwrap();
        sm.apply(again).await.unwrap();
        let snap = snapshot(&mut sm).await;
        let at = snap.meta.last_log_id.unwrap();
        assert_eq!(at.index, 55);
        log.purge(at).await.unwrap();
        applies_from_log(&mut sm, &mut log, 56, &model, "after a restart").await;
        // What only the first snapshot named is given back (at the log's next job); what the
        // second names, or the pieces now hold, is there.
        log.save_vote(&openraft::Vote::new(1, 1)).await.unwrap();
        let named: std::collections::BTreeSet<u64> = current_file(&dir.path().join("sm"))
            .unwrap()
            .unwrap()
            .pieces
            .iter()
            .map(|r| r.seg)
            .collect();
        let live: std::collections::BTreeSet<u64> = read_pieces(&sm.pieces())
            .record()
            .0
            .iter()
            .map(|r| r.seg)
            .collect();
        for seg in named.iter().chain(&live) {
            let path = |ext| log_dir.join(format!("{seg:020}.{ext}"));
            assert!(
                path("held").exists() || path("seg").exists(),
                "segment {seg} is gone"
            );
        }
        for seg in held_segs(&log_dir) {
            assert!(
                named.contains(&seg) || live.contains(&seg),
                "segment {seg} still held"
            );
        }

        // Another restart, from the second snapshot: the same volume.
        drop((sm, log));
        let mut log = reopen();
        let mut sm = open(&log);
        assert_eq!(sm.applied_state().await.unwrap().0, Some(at));
        applies_from_log(
            &mut sm,
            &mut log,
            56,
            &model,
            "after a restart from the second snapshot",
        )
        .await;

        // Another replica installs it (the volume as it is now: newer than the snapshot) and
        // applies the entries after it: the same volume.
        let mut other = StateMachine::open(&dir.path().join("other"), SIZE).unwrap();
        send(snap, &sm.pieces(), &mut other).await;
        other.apply(entries[55..].to_vec()).await.unwrap();
        assert!(read_pieces(&other.pieces()).is_empty());
        assert!(volume(&other, SIZE) == model, "the other replica differs");
    }

    /// Applies the entries of `log` from index `from` on to `sm`, which then reads as `model`.
    async fn applies_from_log(
        sm: &mut StateMachine,
        log: &mut super::super::segment_log::SegmentLog,
        from: u64,
        model: &[u8],
        when: &str,
    ) {
        use openraft::storage::RaftLogReader;
        sm.apply(log.try_get_log_entries(from..).await.unwrap())
            .await
            .unwrap();
        assert!(
            volume(sm, model.len() as u64) == model,
            "the volume differs {when}"
        );
    }

    /// The segments `log_dir` holds past the purge.
    fn held_segs(log_dir: &Path) -> Vec<u64> {
        std::fs::read_dir(log_dir)
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".held")?.parse().ok()
            })
            .collect()
    }

    /// `blocks` (a snapshot's, without pieces) received by `to`, to install.
    async fn receive(blocks: Box<tokio::fs::File>, to: &mut StateMachine) -> Box<tokio::fs::File> {
        let rx = to.begin_receiving_snapshot().await.unwrap();
        let mut src = blocks.into_std().await;
        let mut dst = rx.try_clone().await.unwrap().into_std().await;
        std::io::copy(&mut src, &mut dst).unwrap();
        rx
    }

    /// A reader holds the blocks' lock while it resolves the pieces (`read_volume`); an
    /// install that took the pieces' first and then waited for the blocks' would leave both
    /// waiting for ever.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_install_waits_for_a_read_in_progress_without_locking_it_out() {
        const SIZE: u64 = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let (entries, _) = workload(SIZE, 12);
        let mut a = StateMachine::open(&dir.path().join("a"), SIZE).unwrap();
        a.apply(entries).await.unwrap();
        let snap = snapshot(&mut a).await;
        let mut b = StateMachine::open(&dir.path().join("b"), SIZE).unwrap();
        let rx = receive(snap.snapshot, &mut b).await;
        let (blocks, pieces) = (b.blocks(), b.pieces());
        let reading = blocks.read().unwrap();
        let meta = snap.meta.clone();
        let install = tokio::spawn(async move { b.install_snapshot(&meta, rx).await });
        // Once the snapshot is current, the install is at the swap, waiting for the read.
        while current(&dir.path().join("b"))
            .unwrap()
            .map(|m| m.snapshot_id)
            != Some(snap.meta.snapshot_id.clone())
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(
            pieces.try_read().is_ok(),
            "the install holds the pieces while it waits for the blocks"
        );
        drop(reading);
        install.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_users_are_recorded_with_a_snapshot_and_sent_with_it() {
        const SIZE: u64 = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let at = |node, domain: &str| super::super::Attachment {
            node,
            domain: domain.into(),
            disk: "vdb".into(),
            readonly: true,
        };
        let entry = |i, op| Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 0), i),
            payload: EntryPayload::Normal(op),
        };
        let claims = |sm: &StateMachine| claims::lock(&sm.claims()).now.clone();
        let mut a = StateMachine::open(&dir.path().join("a"), SIZE).unwrap();
        a.apply([
            entry(1, BlockOp::Attach(at(1, "web"))),
            entry(2, BlockOp::Batch(vec![BlockOp::Attach(at(2, "db"))])),
        ])
        .await
        .unwrap();
        let snap = snapshot(&mut a).await;
        let at_snapshot = claims(&a);
        assert_eq!(at_snapshot.attachments, vec![at(1, "web"), at(2, "db")]);
        // After the snapshot: in the log only.
        let after = || {
            let op = BlockOp::Detach {
                node: 1,
                domain: "web".into(),
                disk: None,
            };
            [entry(3, op)]
        };
        a.apply(after()).await.unwrap();
        assert_eq!(claims(&a).attachments, vec![at(2, "db")]);
        // A restart opens at the snapshot; the entries after it are applied again.
        let mut again = StateMachine::open(&dir.path().join("a"), SIZE).unwrap();
        assert_eq!(claims(&again), at_snapshot);
        again.apply(after()).await.unwrap();
        assert_eq!(claims(&again), claims(&a));
        // A replica sent the snapshot gets the claims the sender gave it (`SnapshotEnd`), and
        // keeps them across a restart.
        let mut b = StateMachine::open(&dir.path().join("b"), SIZE).unwrap();
        // (Another snapshot's, received meanwhile, are not taken for them.)
        claims::lock(&b.claims()).receiving("other", Claims::default());
        claims::lock(&b.claims()).receiving(&snap.meta.snapshot_id, claims(&a));
        send(snap, &a.pieces(), &mut b).await;
        assert_eq!(claims(&b), claims(&a));
        let b = StateMachine::open(&dir.path().join("b"), SIZE).unwrap();
        assert_eq!(claims(&b), claims(&a));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_snapshot_built_late_does_not_replace_a_newer_one_installed_meanwhile() {
        const SIZE: u64 = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let (entries, _) = workload(SIZE, 12);
        let mut a = StateMachine::open(&dir.path().join("a"), SIZE).unwrap();
        a.apply(entries[..4].to_vec()).await.unwrap();
        let mut late = a.get_snapshot_builder().await;
        // Another replica's newer snapshot is installed before the build ends.
        let mut b = StateMachine::open(&dir.path().join("b"), SIZE).unwrap();
        b.apply(entries.clone()).await.unwrap();
        let newer = snapshot(&mut b).await;
        let rx = receive(newer.snapshot, &mut a).await;
        a.install_snapshot(&newer.meta, rx).await.unwrap();
        late.build_snapshot().await.unwrap();
        let cur = current(&dir.path().join("a")).unwrap().unwrap();
        assert_eq!(cur.last_log_id, newer.meta.last_log_id);
        assert_eq!(cur.last_log_id.unwrap().index, 13);
    }

    /// A write proposed again (its first entry truncated, the retry a new entry) keeps the
    /// place of its first record, where another entry is now: it is not applied from there.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_write_proposed_again_is_not_applied_from_its_truncated_record() {
        use openraft::storage::RaftLogStorage;
        const SIZE: u64 = 4 << 20;
        let dir = tempfile::tempdir().unwrap();
        let mut log = super::super::segment_log::SegmentLog::open(&dir.path().join("log")).unwrap();
        let mut sm = StateMachine::open(&dir.path().join("sm"), SIZE)
            .unwrap()
            .with_log(&log, HOLD_BYTES)
            .unwrap();
        let id = |term, index| LogId::new(openraft::CommittedLeaderId::new(term, 0), index);
        let write = |fill: u8| BlockOp::Write {
            offset: 1 << 20,
            data: vec![fill; 256 << 10].into(),
        };
        let entry = |log_id, op| Entry {
            log_id,
            payload: EntryPayload::Normal(op),
        };
        let blank = Entry {
            log_id: id(1, 1),
            payload: EntryPayload::Blank,
        };
        let first = write(1);
        log.append_durably(vec![blank.clone(), entry(id(1, 2), first.clone())])
            .await
            .unwrap();
        // A new leader's entry replaces it; the write comes again after it.
        log.truncate(id(1, 2)).await.unwrap();
        let other = entry(id(2, 2), write(2));
        let retry = entry(id(2, 3), first);
        log.append_durably(vec![other.clone(), retry.clone()])
            .await
            .unwrap();
        sm.apply(vec![blank, other, retry]).await.unwrap();
        let got = read_volume(&sm.blocks(), &sm.pieces(), 1 << 20, 256 << 10).unwrap();
        assert!(
            got == vec![1; 256 << 10],
            "the retried write reads {}",
            got[0]
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_volume_written_over_within_the_budget_is_never_copied_and_past_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let id = |index| LogId::new(openraft::CommittedLeaderId::new(1, 0), index);
        // Volume of `size` written `times` over in 256 KiB writes, filled with the pass number.
        let passes = |size: u64, times: u8| -> Vec<Entry> {
            let mut v = vec![];
            for pass in 1..=times {
                for off in (0..size).step_by(256 << 10) {
                    v.push(BlockOp::Write {
                        offset: off,
                        data: vec![pass; 256 << 10].into(),
                    });
                }
            }
            v.into_iter()
                .enumerate()
                .map(|(i, op)| Entry {
                    log_id: id(i as u64 + 1),
                    payload: EntryPayload::Normal(op),
                })
                .collect()
        };
        // Segments of 1 MiB and a little more (the record that crosses 1 MiB goes in whole): a
        // 2 MiB volume written over sequentially spans at most three of them.
        const BUDGET: u64 = 4 << 20;
        for (name, size, copied) in [("within", 2u64 << 20, false), ("past", 8 << 20, true)] {
            let entries = passes(size, 3);
            let log = log_with(&dir.path().join(name).join("log"), &entries).await;
            let mut sm = StateMachine::open(&dir.path().join(name).join("sm"), size)
                .unwrap()
                .with_log(&log, BUDGET)
                .unwrap();
            for e in entries {
                sm.apply(vec![e]).await.unwrap();
                let held = held_file_bytes(&sm);
                assert!(held <= BUDGET, "{name}: {held} bytes of segments held");
            }
            assert!(
                volume(&sm, size) == vec![3; size as usize],
                "{name}: the volume differs"
            );
            let blocks =
                crate::sys::read_at(&sm.blocks().read().unwrap(), size as usize, 0).unwrap();
            assert_eq!(
                blocks.iter().any(|b| *b != 0),
                copied,
                "{name}: copied to the blocks"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn segments_longer_than_the_segment_size_count_as_long_as_they_are() {
        const SIZE: u64 = 12 << 20;
        const BUDGET: u64 = 4 << 20;
        let dir = tempfile::tempdir().unwrap();
        // 3 MiB writes into a log of 1 MiB segments: each goes whole into a segment of its own.
        let entries: Vec<Entry> = (0..4u8)
            .map(|i| Entry {
                log_id: LogId::new(openraft::CommittedLeaderId::new(1, 0), u64::from(i) + 1),
                payload: EntryPayload::Normal(BlockOp::Write {
                    offset: u64::from(i) * (3 << 20),
                    data: vec![i + 1; 3 << 20].into(),
                }),
            })
            .collect();
        let log = log_with(&dir.path().join("log"), &entries).await;
        let mut sm = StateMachine::open(&dir.path().join("sm"), SIZE)
            .unwrap()
            .with_log(&log, BUDGET)
            .unwrap();
        for e in entries {
            sm.apply(vec![e]).await.unwrap();
            let held = held_file_bytes(&sm);
            assert!(held > 0 && held <= BUDGET, "{held} bytes of segments held");
        }
        let model: Vec<u8> = (1..=4u8).flat_map(|i| vec![i; 3 << 20]).collect();
        assert!(volume(&sm, SIZE) == model, "the volume differs");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn with_nothing_deferred_every_write_is_in_the_blocks_once_applied() {
        const SIZE: u64 = 4 << 20;
        let dir = tempfile::tempdir().unwrap();
        let (entries, model) = workload(SIZE, 30);
        let mut log = super::super::segment_log::SegmentLog::open(&dir.path().join("log")).unwrap();
        let mut sm = StateMachine::open(&dir.path().join("sm"), SIZE)
            .unwrap()
            .with_log(&log, 0)
            .unwrap();
        log.append_durably(entries.clone()).await.unwrap();
        sm.apply(entries).await.unwrap();
        assert!(read_pieces(&sm.pieces()).is_empty());
        let blocks = crate::sys::read_at(&sm.blocks().read().unwrap(), SIZE as usize, 0).unwrap();
        assert!(blocks == model, "the blocks differ");
    }

    #[test]
    fn a_snapshot_is_installed_from_the_file_it_was_received_in_or_copied_there() {
        use std::io::Write;
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let incoming = dir.path().join(INCOMING);
        let mut f = File::create(&incoming).unwrap();
        f.write_all(b"received").unwrap();
        let ino = f.metadata().unwrap().ino();
        let same = into_incoming(File::open(&incoming).unwrap(), &incoming).unwrap();
        assert_eq!(same.metadata().unwrap().ino(), ino);
        let mut other = tempfile::tempfile().unwrap();
        other.write_all(b"another snapshot").unwrap();
        into_incoming(other, &incoming).unwrap();
        assert_eq!(std::fs::read(&incoming).unwrap(), b"another snapshot");
    }

    #[test]
    fn zero_runs_of_a_received_snapshot_become_holes_and_the_data_stays() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("s"))
            .unwrap();
        const K: u64 = 1024;
        // 4 MiB of zeroes written out, a 64 KiB run with one byte set in the middle of them,
        // a hole (never written), then data that ends off a run boundary.
        f.write_all_at(&vec![0; 4 << 20], 0).unwrap();
        f.write_all_at(&[5], (1 << 20) + 7).unwrap();
        let mut tail = vec![0u8; 100 * K as usize];
        tail[99 * K as usize] = 9;
        f.write_all_at(&tail, 8 << 20).unwrap();
        let before: Vec<u8> = crate::sys::read_at(&f, ((8 << 20) + 100 * K) as usize, 0).unwrap();
        let read = punch_zero_runs(&f).unwrap();
        assert!(read < (5 << 20), "holes were read: {read} bytes");
        let after = crate::sys::read_at(&f, before.len(), 0).unwrap();
        assert!(after == before, "the contents changed");
        let data = |at| crate::sys::seek(&f, at, libc::SEEK_DATA).unwrap();
        let hole = |at| crate::sys::seek(&f, at, libc::SEEK_HOLE).unwrap();
        // What is left allocated: the run with the byte, and the tail's last run.
        assert_eq!(data(0), Some(1 << 20));
        assert_eq!(hole(1 << 20), Some((1 << 20) + 64 * K));
        assert_eq!(data((1 << 20) + 64 * K), Some((8 << 20) + 64 * K));
        assert_eq!(f.metadata().unwrap().len(), (8 << 20) + 100 * K);
    }

    #[test]
    fn the_purge_point_keeps_that_many_kib_after_it_counting_small_entries_as_64() {
        let a = Applied::default();
        // 1: 1 MiB, 2..=5: 4 KiB (64 each), 6: 512 KiB.
        a.add([(1, 1 << 20), (2, 4096), (3, 4096), (4, 4096), (5, 4096)].into_iter());
        a.add([(6, 512 << 10)].into_iter());
        assert_eq!(a.since_snapshot(), 1024 + 4 * 64 + 512);
        assert_eq!(
            a.purge_point(10_000, 7, None),
            None,
            "not that much applied"
        );
        // Not past the snapshot; what is past it comes later.
        assert_eq!(
            a.purge_point(512 + 3 * 64, 0, None),
            None,
            "no snapshot yet"
        );
        assert_eq!(a.purge_point(512 + 3 * 64, 1, None), Some(1));
        assert_eq!(a.purge_point(512 + 3 * 64, 7, None), Some(2));
        assert_eq!(
            a.purge_point(512 + 3 * 64, 7, None),
            None,
            "nothing new since"
        );
        a.add([(7, 128 << 10)].into_iter());
        assert_eq!(a.purge_point(512, 7, None), Some(5));
        a.snapshot_taken();
        assert_eq!(a.since_snapshot(), 0);
        assert_eq!(a.purge_point(0, 7, None), Some(7));
    }

    #[test]
    fn the_purge_point_stops_at_what_a_follower_needs_unless_that_is_too_far_behind() {
        let a = Applied::default();
        // 1..=8: 1 MiB each.
        a.add((1..=8).map(|i| (i, 1 << 20)));
        let hold = |matched, most_kib| Some(Hold { matched, most_kib });
        // The follower has up to 2: entries 3.. stay while fewer than 6 MiB follow them.
        assert_eq!(a.purge_point(1024, 8, hold(2, 6 * 1024)), Some(2));
        // How far behind the follower is stays known (writes are paced by it).
        assert_eq!(a.kib_after(2), Some(6 * 1024));
        // Entry 3 has 5 MiB after it: it stays; then the follower gets further.
        assert_eq!(a.purge_point(1024, 8, hold(2, 6 * 1024)), None);
        assert_eq!(a.purge_point(1024, 8, hold(4, 6 * 1024)), Some(4));
        // Entries more than 2 MiB behind go, whatever the follower has.
        assert_eq!(a.purge_point(1024, 8, hold(4, 2 * 1024)), Some(6));
        // Without a follower to keep it for, down to the 1 MiB kept.
        assert_eq!(a.purge_point(1024, 8, None), Some(7));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn after_a_restart_how_far_behind_an_entry_is_counts_the_log_up_to_the_snapshot() {
        use openraft::storage::RaftLogStorage;
        const SIZE: u64 = 4 << 20;
        let dir = tempfile::tempdir().unwrap();
        let log_id = |i| LogId::new(openraft::CommittedLeaderId::new(1, 0), i);
        // Entries 1..=30, each a write of 256 KiB.
        let entries: Vec<Entry> = (1..=30)
            .map(|i| Entry {
                log_id: log_id(i),
                payload: EntryPayload::Normal(BlockOp::Write {
                    offset: (i % 16) * (256 << 10),
                    data: vec![i as u8; 256 << 10].into(),
                }),
            })
            .collect();
        let log_dir = dir.path().join("log");
        let mut log = log_with(&log_dir, &entries).await;
        // Every write in the blocks (the log is cut short below).
        let open = |log: &super::super::segment_log::SegmentLog| {
            StateMachine::open(&dir.path().join("sm"), SIZE)
                .unwrap()
                .with_log(log, 0)
                .unwrap()
        };
        let mut sm = open(&log);
        sm.apply(entries[..20].to_vec()).await.unwrap();
        assert_eq!(snapshot(&mut sm).await.meta.last_log_id, Some(log_id(20)));
        log.purge(log_id(5)).await.unwrap();
        drop((sm, log));

        let mut log = super::super::segment_log::SegmentLog::open_small(&log_dir, 1 << 20).unwrap();
        let mut sm = open(&log);
        let a = sm.applied();
        // Each record: the 256 KiB and the skeleton (under 1 KiB).
        assert_eq!(
            a.kib_after(10),
            Some(10 * 256),
            "entries 11..=20, from the log"
        );
        assert_eq!(a.kib_after(5), Some(15 * 256), "the log's purge point");
        assert_eq!(a.kib_after(4), None, "purged after it");
        assert_eq!(a.since_snapshot(), 0);
        let again = {
            use openraft::storage::RaftLogReader;
            log.try_get_log_entries(21..=30).await.unwrap()
        };
        sm.apply(again).await.unwrap();
        assert_eq!(a.kib_after(10), Some(20 * 256));
        assert_eq!(a.kib_after(30), Some(0));
        assert_eq!(a.since_snapshot(), 10 * 256);

        // A log that ends before the snapshot (openraft purges it up to the snapshot as it
        // starts): counted from the snapshot.
        log.truncate(log_id(16)).await.unwrap();
        drop((sm, log));
        let log = super::super::segment_log::SegmentLog::open_small(&log_dir, 1 << 20).unwrap();
        let a = open(&log).applied();
        assert_eq!(a.kib_after(10), None);
        assert_eq!(a.kib_after(20), Some(0));
    }

    #[test]
    fn how_much_was_applied_after_an_entry_is_known_while_it_is_counted() {
        let a = Applied::default();
        assert_eq!(a.kib_after(0), None, "nothing applied yet");
        // 3..=6: 1 MiB, 4 KiB (64), 1 MiB, 1 MiB.
        a.add([(3, 1 << 20), (4, 4096), (5, 1 << 20), (6, 1 << 20)].into_iter());
        assert_eq!(a.kib_after(6), Some(0));
        assert_eq!(
            a.kib_after(9),
            Some(0),
            "a follower ahead of what is applied"
        );
        assert_eq!(a.kib_after(4), Some(2048));
        assert_eq!(a.kib_after(3), Some(64 + 2048));
        assert_eq!(a.kib_after(2), None, "before the first counted");
        assert_eq!(a.purge_point(1024, 6, None), Some(5));
        assert_eq!(a.kib_after(5), Some(1024), "the purge point");
        assert_eq!(a.kib_after(4), None, "purged after it");
        assert_eq!(a.kib_after(6), Some(0));
        // A snapshot installed at 9: counted from there.
        a.installed(9);
        assert_eq!(a.kib_after(6), None);
        assert_eq!(a.kib_after(9), Some(0));
        a.add([(10, 1 << 20)].into_iter());
        assert_eq!(a.kib_after(9), Some(1024));
    }
}
