//! The durable raft log and vote of a volume's group, in append-only segment files.
//!
//! The log directory holds:
//! - `<first index, 20 digits>.seg`: the entries in index order, each a record
//!   `[length u32 LE][crc32 of the body u32 LE][body]`, the body being the entry as
//!   [`super::data::encode`] splits it: `[skeleton length u32 LE][skeleton][write data]` (the
//!   skeleton is the bincode entry without its write data, and starts with the log id). Appends
//!   go to the last segment; once it holds [`SEGMENT_BYTES`] the next append starts a new one,
//!   named after its first entry.
//! - `meta.json`: the vote and the last purged log id, replaced atomically (temporary file,
//!   fsync, rename, fsync of the directory).
//! - `<first index>.held`: purged segments that something else still held when they were
//!   purged: the state machine, which applies large writes by reference to where the log wrote
//!   them ([`Place`]) and records those places in its snapshots, so these files outlive the
//!   entries in them. The writer gives one back (below) once nothing else holds it; the state
//!   machine takes again, when it opens ([`SegmentLog::segment`]), those its snapshot names
//!   (opening holds every purged segment it finds; the others go at the first job).
//! - `<first index>.free`: up to [`SPARES`] purged segments kept for reuse (more for a log
//!   that spans more, [`SegmentLog::open_spanning`]: as PostgreSQL recycles WAL segments, a log
//!   keeps the files of the longest it is to be, instead of freeing and allocating them as it
//!   breathes): the next segment is a spare that nothing holds any more (a read in progress)
//!   renamed, overwritten from its start, so the log's pages (page cache, tmpfs) and disk
//!   blocks are reused instead of freed and allocated again. A segment that fills up is cut to
//!   its last record (durably) before the next one is written, so only the last segment can have
//!   stale records after its end: records of older entries, which opening treats as its end.
//! - `committed`: the last committed log id (openraft's optional `save_committed`),
//!   `[length][crc32][json]` overwritten in place, by the writer thread whenever it has other work
//!   (no wake-up of its own), and never fsynced: it only spares a restarted node re-applying
//!   from its last snapshot, and a lost, stale or torn value (read as none) just means it
//!   re-applies more. It never names an entry that is not on disk.
//!
//! An append is encoded on the caller's task, indexed and kept in memory (readable at once, as
//! openraft requires), and handed to the log's writer thread, which writes all its records with
//! one vectored write (the write data straight from the entries, not copied), fdatasyncs,
//! records in each write's data where it is now (its [`Place`]: the state machine applies large
//! writes by reference to it) and only then calls openraft's callback: an entry is acknowledged
//! only once on disk. Entries read back from the files are placed too. Truncate,
//! purge and vote go through the same thread, in order, and return once durable. A new
//! segment's directory entry is fsynced before anything is written to it.
//!
//! Reads come from a cache of the newest entries (every entry not yet on disk, and the most
//! recent ones within [`CACHE_BYTES`]), so replication and the state machine rarely read the
//! files; older entries are read where the index says they are.
//!
//! Opening scans every segment and checks each record (length, crc, index continuity): a torn or
//! corrupt tail of the last segment (a write cut by a crash, never acknowledged) is cut off;
//! damage anywhere else is an error, as is a log with a hole. Segments wholly purged (a crash
//! between recording the purge and renaming them) are held.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Debug;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::ops::{Bound, RangeBounds};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};

use bytes::Bytes;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError, Vote};
use serde::{Deserialize, Serialize};

use super::data::Place;
use super::{Data, Entry, LogId, NodeId, StorageError, TypeConfig};

/// A segment takes no more appends once it holds this many bytes (by default).
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// Bytes of entries kept in memory once they are on disk (the newest ones).
const CACHE_BYTES: usize = 64 << 20;
/// A record's length and crc.
const HEADER: usize = 8;
/// A record body's skeleton length.
const SKELETON_LEN: usize = 4;
/// The longest record body accepted when reading one.
const MAX_RECORD: u32 = 256 << 20;
/// Purged segments kept for reuse.
const SPARES: usize = 2;

/// The durable part of the log besides its entries (`meta.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Meta {
    vote: Option<Vote<NodeId>>,
    purged: Option<LogId>,
}

/// Where an entry's record is.
#[derive(Debug, Clone, Copy)]
struct Loc {
    log_id: LogId,
    /// The segment (its first index).
    seg: u64,
    /// The record's offset in the segment.
    offset: u64,
    /// The record's body length.
    len: u32,
}

impl Loc {
    fn end(&self) -> u64 {
        self.offset + HEADER as u64 + u64::from(self.len)
    }
}

/// A cached entry: the entry, its size, and the writer job that puts it on disk.
#[derive(Debug)]
struct Cached {
    entry: Entry,
    bytes: usize,
    job: u64,
}

/// What the store, its readers and its writer share.
#[derive(Debug)]
struct State {
    /// This log, among those of this process (in the [`Place`]s of its entries' data).
    log: u64,
    /// The index of `locs[0]`.
    first: u64,
    /// Every entry not purged, in index order.
    locs: VecDeque<Loc>,
    /// The newest entries, `cache[0]` at `cache_first`; their sizes add up to `cache_bytes`.
    cache: VecDeque<Cached>,
    cache_first: u64,
    cache_bytes: usize,
    /// The segments (first index -> file, opened for reading and writing).
    segments: BTreeMap<u64, Arc<File>>,
    /// Purged segments something else still holds (`<first index>.held`): the state machine
    /// applied writes by reference to them ([`Place`]). Given back (made spares, or deleted)
    /// by the writer once nothing else holds them.
    held: BTreeMap<u64, Arc<File>>,
    /// Where the next record goes: the last segment and its length (none: a new segment).
    tail: Option<(u64, u64)>,
    meta: Meta,
    committed: Option<LogId>,
    /// `committed` changed since the writer last wrote it.
    committed_dirty: bool,
    /// Jobs handed to the writer, and done by it.
    jobs_sent: u64,
    jobs_done: u64,
    /// Why the writer failed, if it did: the log takes no more changes.
    failed: Option<String>,
    cache_limit: usize,
}

impl State {
    fn next_index(&self) -> u64 {
        self.first + self.locs.len() as u64
    }

    fn last_log_id(&self) -> Option<LogId> {
        self.locs.back().map(|l| l.log_id).or(self.meta.purged)
    }

    /// Drops cached entries that are on disk, oldest first, while the cache is over its limit.
    fn evict(&mut self) {
        while self.cache_bytes > self.cache_limit {
            match self.cache.front() {
                Some(c) if c.job <= self.jobs_done => {
                    self.cache_bytes -= c.bytes;
                    self.cache.pop_front();
                    self.cache_first += 1;
                }
                _ => break,
            }
        }
    }

    /// Forgets the cached entries from `index` on.
    fn uncache_from(&mut self, index: u64) {
        if index <= self.cache_first {
            self.cache.clear();
            self.cache_bytes = 0;
            self.cache_first = index;
        } else {
            let keep = ((index - self.cache_first) as usize).min(self.cache.len());
            for c in self.cache.drain(keep..) {
                self.cache_bytes -= c.bytes;
            }
        }
    }

    fn check(&self) -> Result<(), StorageError> {
        match &self.failed {
            Some(e) => Err(write_err(format!("the log failed earlier: {e}"))),
            None => Ok(()),
        }
    }
}

type Shared = Arc<Mutex<State>>;

fn lock(s: &Shared) -> MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// Called once a job is done (durable) or failed.
type Done = Box<dyn FnOnce(io::Result<()>) + Send>;

/// Work for the writer thread, done in the order sent.
enum Job {
    /// Write `parts` one after the other at `offset` of segment `seg` (starting it first if
    /// `new`, after cutting the segment before it, `close`, at its end) and fdatasync.
    Append {
        seg: u64,
        new: bool,
        close: Option<(u64, u64)>,
        offset: u64,
        parts: Vec<Bytes>,
        /// The write data in `parts`, their entries and their offsets in the segment: placed
        /// once written.
        places: Vec<(Data, LogId, u64)>,
        done: Done,
    },
    /// Delete the segments named `since` or later, cut segment `cut.0` at `cut.1`, fsync.
    /// Which segments those are is decided here, in job order: a segment an append queued
    /// before starts may not exist yet when the truncation is asked for.
    Truncate {
        cut: Option<(u64, u64)>,
        since: Option<u64>,
        done: Done,
    },
    /// Replace `meta.json`, then keep segments `remove` as spares or delete them.
    Meta {
        meta: Meta,
        remove: Vec<(u64, Arc<File>)>,
        done: Done,
    },
}

fn read_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::read_logs(super::any(e)).into()
}

fn write_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_logs(super::any(e)).into()
}

fn segment_path(dir: &Path, seg: u64) -> PathBuf {
    dir.join(format!("{seg:020}.seg"))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Appends the record of `entry` to `parts`: its header and skeleton, then its write data.
/// Returns the body's length, and the write data with their offsets in the record.
fn encode(parts: &mut Vec<Bytes>, entry: &Entry) -> Result<(u32, Vec<(Data, u64)>), StorageError> {
    let (skeleton, data) = super::data::encode(entry).map_err(write_err)?;
    let len = SKELETON_LEN + skeleton.len() + data.iter().map(|d| d.len()).sum::<usize>();
    let len = u32::try_from(len)
        .ok()
        .filter(|l| *l <= MAX_RECORD)
        .ok_or_else(|| write_err(format!("entry {} too large", entry.log_id)))?;
    let mut head = Vec::with_capacity(HEADER + SKELETON_LEN + skeleton.len());
    head.extend_from_slice(&len.to_le_bytes());
    head.extend_from_slice(&[0; 4]);
    head.extend_from_slice(&(skeleton.len() as u32).to_le_bytes());
    head.extend_from_slice(&skeleton);
    // The record's crc, from the head's and the data's own (computed once per write: a
    // follower's came with the data).
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head[HEADER..]);
    for d in &data {
        crc.combine(&crc32fast::Hasher::new_with_initial_len(
            d.crc(),
            d.len() as u64,
        ));
    }
    head[4..HEADER].copy_from_slice(&crc.finalize().to_le_bytes());
    let mut at = head.len() as u64;
    parts.push(Bytes::from(head));
    parts.extend(data.iter().map(|d| d.bytes().clone()));
    let placed = data
        .into_iter()
        .map(|d| {
            let here = at;
            at += d.len() as u64;
            (d, here)
        })
        .collect();
    Ok((len, placed))
}

/// A record's body, checked against its header.
fn check_record(header: &[u8], body: &[u8]) -> bool {
    let crc = u32::from_le_bytes(header[4..HEADER].try_into().expect("4 bytes"));
    crc32fast::hash(body) == crc
}

/// A record body's skeleton.
fn skeleton(body: &[u8]) -> Option<&[u8]> {
    let n = u32::from_le_bytes(body.get(..SKELETON_LEN)?.try_into().ok()?) as usize;
    body.get(SKELETON_LEN..SKELETON_LEN.checked_add(n)?)
}

/// The entry in a (checked) record body; its write data are slices of `body`, which is at
/// `offset` of `file` in log `log`, and they are placed there.
fn decode(body: Bytes, log: u64, seg: u64, file: &Arc<File>, offset: u64) -> io::Result<Entry> {
    let sk = skeleton(&body)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "record without a skeleton"))?;
    let start = SKELETON_LEN + sk.len();
    let e: Entry = super::data::decode(sk, body.slice(start..))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut at = offset + start as u64;
    for d in super::entry_data(&e) {
        d.placed(Place {
            log,
            entry: e.log_id,
            seg,
            file: file.clone(),
            offset: at,
        });
        at += d.len() as u64;
    }
    Ok(e)
}

/// The size an entry counts for in the cache.
fn entry_bytes(e: &Entry) -> usize {
    64 + super::entry_data_len(e)
}

/// The durable raft log of one group (its writer thread stops when this is dropped).
pub struct SegmentLog {
    dir: PathBuf,
    state: Shared,
    segment_bytes: u64,
    jobs: mpsc::Sender<Job>,
}

/// Tells whether anything of a [`SegmentLog`] is left: the log, its readers or its writer
/// thread (which ends after the last job queued).
#[derive(Debug, Clone)]
pub struct LogAlive(std::sync::Weak<Mutex<State>>);

impl LogAlive {
    pub fn alive(&self) -> bool {
        self.0.strong_count() > 0
    }

    /// The id of the last entry appended (written, or queued for the writer thread), if the
    /// log is left (`Some(None)`: it is empty).
    pub fn last_log_id(&self) -> Option<Option<LogId>> {
        self.0.upgrade().map(|st| lock(&st).last_log_id())
    }
}

/// The reading side of a [`SegmentLog`] (cheap to clone).
#[derive(Clone)]
pub struct SegmentLogReader {
    state: Shared,
}

impl Debug for SegmentLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentLog")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Debug for SegmentLogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentLogReader").finish_non_exhaustive()
    }
}

/// What opening found in a segment.
struct Scanned {
    locs: Vec<Loc>,
    /// Where the valid records end (the file's length unless the tail is torn).
    end: u64,
    len: u64,
}

/// Reads every record of segment `seg`, checking lengths, crcs and that indexes follow on
/// from `expected`; stops at the first bad record.
fn scan(file: &File, seg: u64, expected: Option<u64>) -> io::Result<Scanned> {
    let len = file.metadata()?.len();
    let mut r = io::BufReader::with_capacity(1 << 20, file);
    let (mut locs, mut offset, mut body) = (Vec::new(), 0u64, Vec::new());
    if expected.is_some_and(|e| e != seg) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "segment {seg} follows one ending before {}",
                expected.unwrap_or(seg)
            ),
        ));
    }
    let mut expected = seg;
    while len - offset >= HEADER as u64 {
        let mut header = [0u8; HEADER];
        r.read_exact(&mut header)?;
        let body_len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        if body_len == 0
            || body_len > MAX_RECORD
            || offset + (HEADER as u64) + u64::from(body_len) > len
        {
            break;
        }
        body.resize(body_len as usize, 0);
        r.read_exact(&mut body)?;
        if !check_record(&header, &body) {
            break;
        }
        // An entry's skeleton starts with its log id.
        let Some(Ok(log_id)) = skeleton(&body).map(bincode::deserialize::<LogId>) else {
            break;
        };
        if log_id.index < seg {
            // A record left from the segment's earlier use (a spare reused): the end.
            break;
        }
        if log_id.index != expected {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "segment {seg}: entry {} at offset {offset}, expected {expected}",
                    log_id.index
                ),
            ));
        }
        locs.push(Loc {
            log_id,
            seg,
            offset,
            len: body_len,
        });
        offset += HEADER as u64 + u64::from(body_len);
        expected += 1;
    }
    Ok(Scanned {
        locs,
        end: offset,
        len,
    })
}

fn read_committed(path: &Path) -> Option<LogId> {
    let b = std::fs::read(path).ok()?;
    let len = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
    let body = b.get(HEADER..HEADER + len)?;
    if !check_record(&b[..HEADER], body) {
        return None;
    }
    serde_json::from_slice(body).ok()?
}

impl SegmentLog {
    /// Opens (or creates) the log in directory `dir`, recovering from a crash (see the module
    /// documentation).
    pub fn open(dir: &Path) -> io::Result<SegmentLog> {
        SegmentLog::open_with(dir, SEGMENT_BYTES, CACHE_BYTES, SPARES)
    }

    /// [`SegmentLog::open`] for a log of segments of `segment_bytes` that grows to `span`
    /// bytes: it keeps the purged segments of that much (and at least [`SPARES`]) for reuse.
    pub fn open_spanning(dir: &Path, span: u64, segment_bytes: u64) -> io::Result<SegmentLog> {
        let segment_bytes = segment_bytes.max(1);
        let spares = (span.div_ceil(segment_bytes) as usize + 1).max(SPARES);
        SegmentLog::open_with(dir, segment_bytes, CACHE_BYTES, spares)
    }

    fn open_with(
        dir: &Path,
        segment_bytes: u64,
        cache_limit: usize,
        spares_max: usize,
    ) -> io::Result<SegmentLog> {
        std::fs::create_dir_all(dir)?;
        if dir.join("raft-log.redb").exists() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: a raft log of an older blockdrv (redb), which this one cannot read",
                    dir.display()
                ),
            ));
        }
        let meta: Meta = match std::fs::read(dir.join("meta.json")) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", dir.join("meta.json").display()),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Meta::default(),
            Err(e) => return Err(e),
        };
        let committed = read_committed(&dir.join("committed"));
        let (mut segs, mut spares, mut held) = (Vec::new(), Vec::new(), BTreeMap::new());
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") || (name.ends_with(".free") && spares.len() == spares_max) {
                std::fs::remove_file(e.path())?;
            } else if name.ends_with(".free") {
                let f = File::options().read(true).write(true).open(e.path())?;
                spares.push((e.path(), Arc::new(f)));
            } else if let Some(seg) = name.strip_suffix(".seg").and_then(|n| n.parse().ok()) {
                segs.push(seg);
            } else if let Some(seg) = name.strip_suffix(".held").and_then(|n| n.parse().ok()) {
                let f = File::options().read(true).write(true).open(e.path())?;
                held.insert(seg, Arc::new(f));
            }
        }
        segs.sort_unstable();

        let purged_next = meta.purged.map_or(0, |p| p.index + 1);
        let mut locs = VecDeque::new();
        let mut segments = BTreeMap::new();
        let mut expected = None;
        let mut removed = false;
        for (i, &seg) in segs.iter().enumerate() {
            let path = segment_path(dir, seg);
            let file = File::options().read(true).write(true).open(&path)?;
            let s = scan(&file, seg, expected)?;
            if s.end < s.len {
                if i + 1 < segs.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{}: damaged record at offset {} (not the end of the log)",
                            path.display(),
                            s.end
                        ),
                    ));
                }
                tracing::info!(
                    segment = %path.display(),
                    offset = s.end,
                    "cutting the raft log's tail (a torn write, or what a reused segment held)"
                );
                file.set_len(s.end)?;
                file.sync_all()?;
            }
            if s.locs.is_empty() {
                // Empty (a torn first record): not needed.
                std::fs::remove_file(&path)?;
                removed = true;
                continue;
            }
            if s.locs.last().is_some_and(|l| l.log_id.index < purged_next) {
                // Purged before a crash: held, as the purge would have if the state machine
                // still refers to it, and given back once it is known not to.
                std::fs::rename(&path, held_path(dir, seg))?;
                held.insert(seg, Arc::new(file));
                removed = true;
                expected = s.locs.last().map(|l| l.log_id.index + 1);
                continue;
            }
            expected = s.locs.last().map(|l| l.log_id.index + 1);
            locs.extend(s.locs.into_iter().filter(|l| l.log_id.index >= purged_next));
            segments.insert(seg, Arc::new(file));
        }
        if removed {
            sync_dir(dir)?;
        }
        if let (Some(p), Some(f)) = (meta.purged, locs.front()) {
            if f.log_id.index > p.index + 1 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: entries {}..{} are missing",
                        dir.display(),
                        p.index + 1,
                        f.log_id.index
                    ),
                ));
            }
        }
        let first = locs.front().map_or(purged_next, |l| l.log_id.index);
        let next = first + locs.len() as u64;
        static LOGS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let state = State {
            log: LOGS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            first,
            tail: locs.back().map(|l| (l.seg, l.end())),
            locs,
            cache: VecDeque::new(),
            cache_first: next,
            cache_bytes: 0,
            segments,
            held,
            meta,
            committed,
            committed_dirty: false,
            jobs_sent: 0,
            jobs_done: 0,
            failed: None,
            cache_limit,
        };
        let state = Arc::new(Mutex::new(state));
        let (tx, rx) = mpsc::channel();
        let mut writer = Writer {
            dir: dir.to_owned(),
            state: state.clone(),
            committed: None,
            spares,
            spares_max,
        };
        std::thread::Builder::new()
            .name("raft-log".into())
            .spawn(move || writer.run(rx))?;
        Ok(SegmentLog {
            dir: dir.to_owned(),
            state,
            segment_bytes,
            jobs: tx,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Hands `job` (made with the state locked, so jobs go in the order of their changes) to
    /// the writer.
    fn send(&self, st: &mut State, job: Job) -> Result<(), StorageError> {
        st.jobs_sent += 1;
        self.jobs
            .send(job)
            .map_err(|_| write_err("the log's writer stopped"))
    }

    /// Sends a job made by `make` (with the state locked) and returns what tells when it is
    /// done.
    fn submit(
        &self,
        st: &mut State,
        make: impl FnOnce(Done) -> Job,
    ) -> Result<tokio::sync::oneshot::Receiver<io::Result<()>>, StorageError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = make(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        self.send(st, job)?;
        Ok(rx)
    }

    /// Appends `entries` (readable when this returns); `done` is called once they are on disk.
    fn append_then(
        &mut self,
        entries: impl IntoIterator<Item = Entry>,
        done: Done,
    ) -> Result<(), StorageError> {
        let mut st = self.lock();
        st.check()?;
        let (mut seg, offset, new) = match st.tail {
            Some((seg, len)) if len < self.segment_bytes => (Some(seg), len, false),
            _ => (None, 0, true),
        };
        let close = st.tail.filter(|_| new);
        let empty = st.locs.is_empty() && st.cache.is_empty();
        let mut next = st.next_index();
        let job = st.jobs_sent + 1;
        let (mut parts, mut written, mut locs, mut cached, mut places) =
            (Vec::new(), 0u64, Vec::new(), Vec::new(), Vec::new());
        for e in entries {
            let index = e.log_id.index;
            if st.meta.purged.is_some_and(|p| index <= p.index) {
                // Covered by the state machine already (openraft's storage suite does this);
                // never in a running group.
                continue;
            }
            if empty && locs.is_empty() {
                next = index;
            }
            if index != next {
                return Err(write_err(format!(
                    "append {index}: the log's next index is {next}"
                )));
            }
            next += 1;
            let seg = *seg.get_or_insert(index);
            let (len, placed) = encode(&mut parts, &e)?;
            let at = offset + written;
            places.extend(placed.into_iter().map(|(d, rel)| (d, e.log_id, at + rel)));
            locs.push(Loc {
                log_id: e.log_id,
                seg,
                offset: offset + written,
                len,
            });
            written += HEADER as u64 + u64::from(len);
            cached.push(Cached {
                bytes: entry_bytes(&e),
                entry: e,
                job,
            });
        }
        let Some(seg) = seg.filter(|_| !locs.is_empty()) else {
            // Nothing to write: answered in order all the same.
            return self.send(
                &mut st,
                Job::Truncate {
                    cut: None,
                    since: None,
                    done,
                },
            );
        };
        if empty {
            st.first = locs[0].log_id.index;
            st.cache_first = st.first;
        }
        st.locs.extend(locs);
        st.cache_bytes += cached.iter().map(|c| c.bytes).sum::<usize>();
        st.cache.extend(cached);
        st.tail = Some((seg, offset + written));
        self.send(
            &mut st,
            Job::Append {
                seg,
                new,
                close,
                offset,
                parts,
                places,
                done,
            },
        )
    }

    /// This log among those of the process: what [`Place`]s of its entries' data name.
    pub fn id(&self) -> u64 {
        self.lock().log
    }

    /// Segment `seg` (its first index), in the log or purged and held: for a state machine
    /// that recorded pieces in it (holding the file keeps it from being reused).
    pub fn segment(&self, seg: u64) -> Option<Arc<File>> {
        let st = self.lock();
        st.segments.get(&seg).or_else(|| st.held.get(&seg)).cloned()
    }

    /// What tells when nothing of this log is left (see [`LogAlive`]).
    pub fn alive(&self) -> LogAlive {
        LogAlive(Arc::downgrade(&self.state))
    }

    /// How long a segment grows (it ends at the first record past this).
    pub fn segment_bytes(&self) -> u64 {
        self.segment_bytes
    }

    /// The index of the last entry purged, if any, and the index and record body length of
    /// every entry the log holds up to `upto`.
    pub fn sizes_upto(&self, upto: u64) -> (Option<u64>, Vec<(u64, usize)>) {
        let st = self.lock();
        let sizes = st
            .locs
            .iter()
            .take_while(|l| l.log_id.index <= upto)
            .map(|l| (l.log_id.index, l.len as usize))
            .collect();
        (st.meta.purged.map(|l| l.index), sizes)
    }

    fn reader(&self) -> SegmentLogReader {
        SegmentLogReader {
            state: self.state.clone(),
        }
    }
}

/// The writer thread's own state.
struct Writer {
    dir: PathBuf,
    state: Shared,
    committed: Option<File>,
    /// Purged segments kept for reuse: the path each has now, and the file.
    spares: Vec<(PathBuf, Arc<File>)>,
    /// How many spares are kept.
    spares_max: usize,
}

impl Writer {
    fn run(&mut self, jobs: mpsc::Receiver<Job>) {
        while let Ok(job) = jobs.recv() {
            let (failed, committed) = {
                let mut st = lock(&self.state);
                let c = st.committed_dirty.then_some(st.committed);
                st.committed_dirty = false;
                (st.failed.clone(), c)
            };
            if let (Some(c), None) = (committed, &failed) {
                if let Err(e) = self.save_committed(c) {
                    tracing::warn!(dir = %self.dir.display(), "save committed: {e}");
                }
            }
            if failed.is_none() {
                if let Err(e) = self.release_held() {
                    tracing::warn!(dir = %self.dir.display(), "giving back held segments: {e}");
                }
            }
            let (r, done) = match job {
                _ if failed.is_some() => {
                    let e = io::Error::other(format!(
                        "the log failed earlier: {}",
                        failed.unwrap_or_default()
                    ));
                    (Err(e), job_done(job))
                }
                Job::Append {
                    seg,
                    new,
                    close,
                    offset,
                    parts,
                    places,
                    done,
                } => (self.append(seg, new, close, offset, &parts, places), done),
                Job::Truncate { cut, since, done } => (self.truncate(cut, since), done),
                Job::Meta { meta, remove, done } => (self.meta(&meta, remove), done),
            };
            if let Err(e) = &r {
                tracing::error!(dir = %self.dir.display(), "raft log: {e}");
                lock(&self.state).failed = Some(e.to_string());
            }
            self.finished(r.is_ok());
            done(r);
        }
    }

    fn finished(&self, ok: bool) {
        let mut st = lock(&self.state);
        st.jobs_done += 1;
        if ok {
            st.evict();
        }
    }

    fn append(
        &mut self,
        seg: u64,
        new: bool,
        close: Option<(u64, u64)>,
        offset: u64,
        parts: &[Bytes],
        places: Vec<(Data, LogId, u64)>,
    ) -> io::Result<()> {
        let file = if new {
            if let Some((prev, end)) = close {
                // A reused segment may be longer than what it holds now.
                let f = lock(&self.state).segments.get(&prev).cloned();
                if let Some(f) = f.filter(|f| f.metadata().is_ok_and(|m| m.len() > end)) {
                    f.set_len(end)?;
                    f.sync_data()?;
                }
            }
            let path = segment_path(&self.dir, seg);
            // A spare nobody reads any more (readers hold the file while they read).
            let spare = self
                .spares
                .iter()
                .position(|(_, f)| Arc::strong_count(f) == 1);
            let f = match spare {
                Some(i) => {
                    let (old, f) = self.spares.swap_remove(i);
                    std::fs::rename(old, &path)?;
                    f
                }
                None => Arc::new(
                    File::options()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .open(&path)?,
                ),
            };
            sync_dir(&self.dir)?;
            lock(&self.state).segments.insert(seg, f.clone());
            f
        } else {
            lock(&self.state)
                .segments
                .get(&seg)
                .cloned()
                .ok_or_else(|| io::Error::other(format!("segment {seg} is gone")))?
        };
        // Only this thread writes: the file position is ours (readers read at offsets).
        let mut w = &*file;
        w.seek(SeekFrom::Start(offset))?;
        let parts: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
        if let Err(e) =
            super::data::write_all_vectored(&mut w, &parts).and_then(|()| file.sync_data())
        {
            // Nothing of this append is acknowledged. What it wrote goes: records written in
            // full whose fdatasync failed would be found whole in the page cache when the
            // replica is reopened (`node.rs`, `keep_open`), with no telling whether the disk
            // has them.
            if let Err(cut) = file.set_len(offset).and_then(|()| file.sync_data()) {
                tracing::warn!(dir = %self.dir.display(), seg, offset, "cutting back a failed append: {cut}");
            }
            return Err(e);
        }
        let log = lock(&self.state).log;
        for (d, entry, offset) in places {
            d.placed(Place {
                log,
                entry,
                seg,
                file: file.clone(),
                offset,
            });
        }
        Ok(())
    }

    fn truncate(&self, cut: Option<(u64, u64)>, since: Option<u64>) -> io::Result<()> {
        let remove: Vec<u64> = match since {
            Some(since) => {
                let mut st = lock(&self.state);
                let remove: Vec<u64> = st.segments.range(since..).map(|(s, _)| *s).collect();
                for s in &remove {
                    st.segments.remove(s);
                }
                remove
            }
            None => Vec::new(),
        };
        for seg in remove.iter().rev() {
            remove_segment(&self.dir, *seg)?;
        }
        if let Some((seg, at)) = cut {
            let f = lock(&self.state).segments.get(&seg).cloned();
            if let Some(f) = f {
                f.set_len(at)?;
                f.sync_data()?;
            }
        }
        if !remove.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    fn meta(&mut self, meta: &Meta, remove: Vec<(u64, Arc<File>)>) -> io::Result<()> {
        let bytes = serde_json::to_vec(meta).map_err(super::io_err)?;
        super::write_atomic(&self.dir.join("meta.json"), &bytes)?;
        let any = !remove.is_empty();
        for (seg, file) in remove {
            let from = segment_path(&self.dir, seg);
            // Held by the state machine (or a read): kept under another name until it is not.
            if Arc::strong_count(&file) > 1 {
                std::fs::rename(&from, held_path(&self.dir, seg))?;
                lock(&self.state).held.insert(seg, file);
            } else {
                self.give_back(seg, &from, file)?;
            }
        }
        if any {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Keeps purged segment `seg`, at `path`, as a spare, or deletes it.
    fn give_back(&mut self, seg: u64, path: &Path, file: Arc<File>) -> io::Result<()> {
        if self.spares.len() < self.spares_max {
            let spare = spare_path(&self.dir, seg);
            std::fs::rename(path, &spare)?;
            self.spares.push((spare, file));
            Ok(())
        } else {
            remove_file(path)
        }
    }

    /// Gives back the held segments nothing else holds any more.
    fn release_held(&mut self) -> io::Result<()> {
        let free: Vec<(u64, Arc<File>)> = {
            let mut st = lock(&self.state);
            let segs: Vec<u64> = st
                .held
                .iter()
                .filter(|(_, f)| Arc::strong_count(f) == 1)
                .map(|(s, _)| *s)
                .collect();
            segs.into_iter()
                .filter_map(|s| Some((s, st.held.remove(&s)?)))
                .collect()
        };
        if free.is_empty() {
            return Ok(());
        }
        for (seg, file) in free {
            self.give_back(seg, &held_path(&self.dir, seg), file)?;
        }
        sync_dir(&self.dir)
    }

    fn save_committed(&mut self, c: Option<LogId>) -> io::Result<()> {
        let body = serde_json::to_vec(&c).map_err(super::io_err)?;
        let mut b = Vec::with_capacity(HEADER + body.len());
        b.extend_from_slice(&(body.len() as u32).to_le_bytes());
        b.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        b.extend_from_slice(&body);
        if self.committed.is_none() {
            self.committed = Some(
                File::options()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(self.dir.join("committed"))?,
            );
        }
        self.committed
            .as_ref()
            .expect("opened above")
            .write_all_at(&b, 0)
    }
}

fn job_done(job: Job) -> Done {
    match job {
        Job::Append { done, .. } | Job::Truncate { done, .. } | Job::Meta { done, .. } => done,
    }
}

fn spare_path(dir: &Path, seg: u64) -> PathBuf {
    dir.join(format!("{seg:020}.free"))
}

fn held_path(dir: &Path, seg: u64) -> PathBuf {
    dir.join(format!("{seg:020}.held"))
}

fn remove_segment(dir: &Path, seg: u64) -> io::Result<()> {
    remove_file(&segment_path(dir, seg))
}

/// Deletes `path`; one already gone is fine.
fn remove_file(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The entries at `locs` (in index order): each run of records next to each other in a
/// segment read with one read, the entries' data slices of it.
fn read_records(log: u64, locs: &[(Arc<File>, Loc)]) -> io::Result<Vec<Entry>> {
    let mut out = Vec::with_capacity(locs.len());
    let mut rest = locs;
    while let Some((f, first)) = rest.first() {
        let n = 1 + rest
            .windows(2)
            .take_while(|w| w[1].1.seg == w[0].1.seg && w[1].1.offset == w[0].1.end())
            .count();
        let (run, next) = rest.split_at(n);
        rest = next;
        let end = run[n - 1].1.end();
        let buf = Bytes::from(crate::sys::read_at(
            f,
            (end - first.offset) as usize,
            first.offset,
        )?);
        for (_, l) in run {
            let at = (l.offset - first.offset) as usize;
            let header = &buf[at..at + HEADER];
            let body = buf.slice(at + HEADER..at + HEADER + l.len as usize);
            if u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) != l.len
                || !check_record(header, &body)
            {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "entry {}: bad record at offset {} of segment {}",
                        l.log_id.index, l.offset, l.seg
                    ),
                ));
            }
            out.push(decode(body, log, l.seg, f, l.offset + HEADER as u64)?);
        }
    }
    Ok(out)
}

impl RaftLogReader<TypeConfig> for SegmentLogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (mut out, on_disk, log) = {
            let st = lock(&self.state);
            let start = match range.start_bound() {
                Bound::Included(i) => *i,
                Bound::Excluded(i) => i.saturating_add(1),
                Bound::Unbounded => 0,
            }
            .max(st.first);
            let end = match range.end_bound() {
                Bound::Included(i) => i.saturating_add(1),
                Bound::Excluded(i) => *i,
                Bound::Unbounded => u64::MAX,
            }
            .min(st.next_index());
            if start >= end {
                return Ok(Vec::new());
            }
            let mut on_disk = Vec::new();
            for i in start..end.min(st.cache_first) {
                let l = st.locs[(i - st.first) as usize];
                let f = st
                    .segments
                    .get(&l.seg)
                    .cloned()
                    .ok_or_else(|| read_err(format!("entry {i}: segment {} is gone", l.seg)))?;
                on_disk.push((f, l));
            }
            let from = start.max(st.cache_first);
            let out: Vec<Entry> = (from..end)
                .map(|i| st.cache[(i - st.cache_first) as usize].entry.clone())
                .collect();
            (out, on_disk, st.log)
        };
        if on_disk.is_empty() {
            return Ok(out);
        }
        let mut older = tokio::task::spawn_blocking(move || read_records(log, &on_disk))
            .await
            .map_err(read_err)?
            .map_err(read_err)?;
        older.append(&mut out);
        Ok(older)
    }
}

impl RaftLogReader<TypeConfig> for SegmentLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.reader().try_get_log_entries(range).await
    }
}

impl RaftLogStorage<TypeConfig> for SegmentLog {
    type LogReader = SegmentLogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let st = self.lock();
        Ok(LogState {
            last_purged_log_id: st.meta.purged,
            last_log_id: st.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.reader()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let done = {
            let mut st = self.lock();
            st.check()?;
            st.meta.vote = Some(*vote);
            let meta = st.meta.clone();
            self.submit(&mut st, |done| Job::Meta {
                meta,
                remove: Vec::new(),
                done,
            })?
        };
        wait(done)
            .await
            .map_err(|e| StorageIOError::write_vote(super::any(e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        Ok(self.lock().meta.vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Written with the writer's next job (committed entries are on disk already).
        let mut st = self.lock();
        st.committed = committed;
        st.committed_dirty = true;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.append_then(entries, Box::new(move |r| callback.log_io_completed(r)))
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let since = log_id.index;
        let done = {
            let mut st = self.lock();
            st.check()?;
            if since >= st.next_index() {
                return Ok(());
            }
            let keep = since.saturating_sub(st.first) as usize;
            let cut_at = st.locs[keep];
            st.locs.truncate(keep);
            st.uncache_from(since);
            // Segments starting at `since` or later go; the one holding `since` is cut (also
            // when all before `since` is purged: it may hold writes the state machine refers
            // to, and goes with the next purge, held if need be).
            let cut = (cut_at.seg < since).then_some((cut_at.seg, cut_at.offset));
            if st.locs.is_empty() {
                // Nothing left: the next append starts a segment.
                st.first = since;
                st.cache_first = since;
            }
            st.tail = st.locs.back().map(|l| (l.seg, l.end()));
            let since = Some(since);
            self.submit(&mut st, |done| Job::Truncate { cut, since, done })?
        };
        wait(done).await.map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let upto = log_id.index;
        let done = {
            let mut st = self.lock();
            st.check()?;
            if st.meta.purged.is_some_and(|p| p.index >= upto) {
                return Ok(());
            }
            st.meta.purged = Some(log_id);
            if upto >= st.first {
                let n = ((upto - st.first + 1) as usize).min(st.locs.len());
                st.locs.drain(..n);
            }
            st.first = st.first.max(upto + 1);
            if st.cache_first <= upto {
                let n = ((upto - st.cache_first + 1) as usize).min(st.cache.len());
                let gone: usize = st.cache.drain(..n).map(|c| c.bytes).sum();
                st.cache_bytes -= gone;
                st.cache_first = upto + 1;
            }
            // Segments holding no entry after `upto` go, once the purge is recorded.
            let live = st.locs.front().map_or(u64::MAX, |l| l.seg);
            let gone: Vec<u64> = st.segments.range(..live).map(|(s, _)| *s).collect();
            let remove: Vec<(u64, Arc<File>)> = gone
                .into_iter()
                .filter_map(|s| Some((s, st.segments.remove(&s)?)))
                .collect();
            if st.locs.is_empty() {
                st.tail = None;
            }
            let meta = st.meta.clone();
            self.submit(&mut st, |done| Job::Meta { meta, remove, done })?
        };
        wait(done).await.map_err(write_err)
    }
}

#[cfg(test)]
impl SegmentLog {
    /// A log whose segments take no more appends past `segment_bytes`.
    pub(crate) fn open_small(dir: &Path, segment_bytes: u64) -> io::Result<SegmentLog> {
        SegmentLog::open_with(dir, segment_bytes, 0, SPARES)
    }

    /// Appends `entries` and waits until they are on disk (openraft's callback cannot be made
    /// outside openraft).
    pub(crate) async fn append_durably(&mut self, entries: Vec<Entry>) -> io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.append_then(
            entries,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )
        .map_err(io::Error::other)?;
        wait(rx).await
    }
}

/// Waits for a job sent with [`SegmentLog::submit`].
async fn wait(done: tokio::sync::oneshot::Receiver<io::Result<()>>) -> io::Result<()> {
    done.await
        .unwrap_or_else(|_| Err(io::Error::other("the log's writer stopped")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::BlockOp;

    fn entry(term: u64, index: u64, fill: u8) -> Entry {
        openraft::Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(term, 0), index),
            payload: openraft::EntryPayload::Normal(BlockOp::Write {
                offset: index * 4096,
                data: vec![fill; 4096].into(),
            }),
        }
    }

    async fn append(log: &mut SegmentLog, entries: Vec<Entry>) {
        log.append_durably(entries).await.unwrap();
    }

    async fn indexes(log: &mut SegmentLog) -> Vec<(u64, u64)> {
        log.try_get_log_entries(..)
            .await
            .unwrap()
            .iter()
            .map(|e| (e.log_id.leader_id.term, e.log_id.index))
            .collect()
    }

    fn segments(dir: &Path) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                let seg = n.strip_suffix(".seg")?.parse().ok()?;
                Some((seg, e.metadata().unwrap().len()))
            })
            .collect();
        v.sort_unstable();
        v
    }

    /// A small log: segments of 3 records or so (each record is ~4.1 KiB), no cache.
    fn small(dir: &Path) -> SegmentLog {
        SegmentLog::open_with(dir, 12 << 10, 0, SPARES).unwrap()
    }

    #[tokio::test]
    async fn entries_survive_reopen_across_segments_and_read_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = small(dir.path());
        append(&mut log, (0..5).map(|i| entry(1, i, i as u8)).collect()).await;
        append(&mut log, (5..10).map(|i| entry(1, i, i as u8)).collect()).await;
        assert_eq!(segments(dir.path()).len(), 2, "{:?}", segments(dir.path()));
        drop(log);
        let mut log = small(dir.path());
        let got = log.try_get_log_entries(3..8).await.unwrap();
        assert_eq!(got.len(), 5);
        assert_eq!(got[0], entry(1, 3, 3));
        assert_eq!(got[4], entry(1, 7, 7));
        assert_eq!(
            log.get_log_state()
                .await
                .unwrap()
                .last_log_id
                .unwrap()
                .index,
            9
        );
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_and_the_log_goes_on_from_there() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = small(dir.path());
        append(&mut log, (0..3).map(|i| entry(1, i, 1)).collect()).await;
        drop(log);
        // A crash in the middle of the next record.
        let (seg, len) = segments(dir.path())[0];
        let f = File::options()
            .write(true)
            .open(segment_path(dir.path(), seg))
            .unwrap();
        let mut torn = Vec::new();
        encode(&mut torn, &entry(1, 3, 3)).unwrap();
        let torn = torn.concat();
        f.write_all_at(&torn[..torn.len() / 2], len).unwrap();
        drop(f);
        let mut log = small(dir.path());
        assert_eq!(indexes(&mut log).await, vec![(1, 0), (1, 1), (1, 2)]);
        assert_eq!(
            segments(dir.path())[0].1,
            len,
            "cut where the torn record began"
        );
        append(&mut log, vec![entry(2, 3, 4)]).await;
        drop(log);
        let mut log = small(dir.path());
        assert_eq!(
            indexes(&mut log).await,
            vec![(1, 0), (1, 1), (1, 2), (2, 3)]
        );
    }

    #[tokio::test]
    async fn a_bad_crc_at_the_end_is_cut_but_one_before_the_end_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = small(dir.path());
        append(&mut log, (0..3).map(|i| entry(1, i, 1)).collect()).await;
        append(&mut log, (3..5).map(|i| entry(1, i, 1)).collect()).await;
        drop(log);
        let segs = segments(dir.path());
        assert_eq!(segs.len(), 2);
        let flip = |seg: u64, at: u64| {
            let f = File::options()
                .read(true)
                .write(true)
                .open(segment_path(dir.path(), seg))
                .unwrap();
            let mut b = [0u8];
            f.read_exact_at(&mut b, at).unwrap();
            f.write_all_at(&[b[0] ^ 0xff], at).unwrap();
        };
        // The last record of the last segment: cut.
        let last_record = segs[1].1 - 100;
        flip(segs[1].0, last_record);
        let mut log = small(dir.path());
        assert_eq!(
            indexes(&mut log).await,
            (0..4).map(|i| (1, i)).collect::<Vec<_>>()
        );
        drop(log);
        // A record of the first segment: the log is damaged, not torn.
        flip(segs[0].0, 100);
        let e = SegmentLog::open_with(dir.path(), 12 << 10, 0, SPARES).unwrap_err();
        assert!(e.to_string().contains("not the end of the log"), "{e}");
    }

    #[tokio::test]
    async fn truncate_then_append_replaces_the_tail_durably() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = small(dir.path());
        append(&mut log, (0..3).map(|i| entry(1, i, 1)).collect()).await;
        append(&mut log, (3..6).map(|i| entry(1, i, 1)).collect()).await;
        append(&mut log, (6..8).map(|i| entry(1, i, 1)).collect()).await;
        assert_eq!(segments(dir.path()).len(), 3);
        // Into the middle of the second segment: the third goes, the second is cut.
        log.truncate(openraft::LogId::new(
            openraft::CommittedLeaderId::new(1, 0),
            4,
        ))
        .await
        .unwrap();
        assert_eq!(
            log.get_log_state()
                .await
                .unwrap()
                .last_log_id
                .unwrap()
                .index,
            3
        );
        assert_eq!(segments(dir.path()).len(), 2);
        append(&mut log, (4..7).map(|i| entry(2, i, 2)).collect()).await;
        let want: Vec<(u64, u64)> = (0..4)
            .map(|i| (1, i))
            .chain((4..7).map(|i| (2, i)))
            .collect();
        assert_eq!(indexes(&mut log).await, want);
        drop(log);
        let mut log = small(dir.path());
        assert_eq!(indexes(&mut log).await, want);
        assert_eq!(
            log.try_get_log_entries(5..6).await.unwrap()[0],
            entry(2, 5, 2)
        );
        // At a segment's first entry: the whole segment goes.
        log.truncate(openraft::LogId::new(
            openraft::CommittedLeaderId::new(1, 0),
            3,
        ))
        .await
        .unwrap();
        assert_eq!(segments(dir.path()).len(), 1);
        append(&mut log, vec![entry(3, 3, 3)]).await;
        drop(log);
        let mut log = small(dir.path());
        assert_eq!(
            indexes(&mut log).await,
            vec![(1, 0), (1, 1), (1, 2), (3, 3)]
        );
    }

    #[tokio::test]
    async fn purge_deletes_whole_segments_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = small(dir.path());
        for i in 0..4 {
            append(
                &mut log,
                (i * 3..i * 3 + 3).map(|j| entry(1, j, 1)).collect(),
            )
            .await;
        }
        assert_eq!(segments(dir.path()).len(), 4);
        let purged = openraft::LogId::new(openraft::CommittedLeaderId::new(1, 0), 4);
        log.purge(purged).await.unwrap();
        // Segments 0 (0..=2) went; segment 3 (3..=5) still holds 5.
        assert_eq!(
            segments(dir.path()).iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![3, 6, 9]
        );
        assert_eq!(log.try_get_log_entries(0..6).await.unwrap().len(), 1);
        drop(log);
        let mut log = small(dir.path());
        let st = log.get_log_state().await.unwrap();
        assert_eq!(st.last_purged_log_id, Some(purged));
        assert_eq!(st.last_log_id.unwrap().index, 11);
        assert_eq!(indexes(&mut log).await.first(), Some(&(1, 5)));
        // Past the last entry (a snapshot installed): everything goes, appends go on after it.
        let purged = openraft::LogId::new(openraft::CommittedLeaderId::new(2, 0), 20);
        log.purge(purged).await.unwrap();
        assert!(segments(dir.path()).is_empty());
        assert_eq!(log.get_log_state().await.unwrap().last_log_id, Some(purged));
        append(&mut log, vec![entry(2, 21, 5)]).await;
        drop(log);
        let mut log = small(dir.path());
        assert_eq!(indexes(&mut log).await, vec![(2, 21)]);
        let st = log.get_log_state().await.unwrap();
        assert_eq!(st.last_purged_log_id, Some(purged));
    }

    #[tokio::test]
    async fn purged_segments_are_reused_and_what_they_held_reads_as_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let files = |ext: &str| {
            let mut v: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(ext))
                .collect();
            v.sort();
            v
        };
        let inode = |name: &str| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(dir.path().join(name)).unwrap().ino()
        };
        let mut log = small(dir.path());
        // Bigger records first (8 KiB), so a reused segment holds more than it is given later.
        let big = |index: u64| Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 0), index),
            payload: openraft::EntryPayload::Normal(BlockOp::Write {
                offset: 0,
                data: vec![7; 8192].into(),
            }),
        };
        for i in 0..4 {
            append(&mut log, vec![big(2 * i), big(2 * i + 1)]).await;
        }
        assert_eq!(segments(dir.path()).len(), 4);
        let first = inode("00000000000000000000.seg");
        log.purge(openraft::LogId::new(
            openraft::CommittedLeaderId::new(1, 0),
            5,
        ))
        .await
        .unwrap();
        // Three segments purged: two kept as spares, one deleted.
        assert_eq!(files(".free").len(), SPARES);
        assert_eq!(segments(dir.path()).len(), 1);
        // The next segments are the spares, cut to what they hold when the next one starts.
        append(&mut log, vec![entry(1, 8, 8)]).await;
        append(&mut log, vec![entry(1, 9, 9), entry(1, 10, 10)]).await;
        append(&mut log, vec![entry(1, 11, 11)]).await;
        assert!(files(".free").len() < SPARES, "{:?}", files(".free"));
        let inodes: Vec<u64> = files(".seg").iter().map(|n| inode(n)).collect();
        assert!(inodes.contains(&first), "segment 0's file was not reused");
        let segs = segments(dir.path());
        let (last, last_len) = *segs.last().unwrap();
        assert!(
            last_len > 12 << 10,
            "no stale records after one 4 KiB record"
        );
        drop(log);
        // The last segment is a reused one: stale 8 KiB records after its end; opening cuts
        // them and the log goes on.
        let mut log = small(dir.path());
        assert_eq!(
            indexes(&mut log).await,
            (6..=11).map(|i| (1, i)).collect::<Vec<_>>()
        );
        let got = log.try_get_log_entries(8..12).await.unwrap();
        assert_eq!(got[3], entry(1, 11, 11));
        assert!(segments(dir.path()).last().unwrap().1 < 8 << 10, "not cut");
        append(&mut log, vec![entry(1, 12, 12)]).await;
        drop(log);
        let mut log = small(dir.path());
        assert_eq!(indexes(&mut log).await.last(), Some(&(1, 12)));
        assert!(segments(dir.path()).iter().any(|s| s.0 == last));
    }

    #[tokio::test]
    async fn a_purged_segment_something_holds_is_kept_until_let_go_also_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let exists = |name: String| dir.path().join(name).exists();
        let mut log = small(dir.path());
        let entries: Vec<Entry> = (0..10).map(|i| entry(1, i, i as u8)).collect();
        for e in &entries {
            append(&mut log, vec![e.clone()]).await;
        }
        assert_eq!(
            segments(dir.path()).iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![0, 3, 6, 9]
        );
        // The state machine holds entry 4's write, in segment 3, and entry 7's, in 6.
        let place = |i: usize| {
            crate::raft::entry_data(&entries[i])[0]
                .place()
                .unwrap()
                .clone()
        };
        let (four, seven) = (place(4), place(7));
        assert_eq!((four.seg, seven.seg), (3, 6));
        drop(entries);
        let id = |i| openraft::LogId::new(openraft::CommittedLeaderId::new(1, 0), i);
        let held = |seg: u64| exists(format!("{seg:020}.held"));
        log.purge(id(7)).await.unwrap();
        assert!(held(3));
        assert!(!held(0) && !exists(format!("{:020}.seg", 0)));
        assert!(log.segment(3).is_some_and(|f| Arc::ptr_eq(&f, &four.file)));
        // Still held after other jobs; once let go, given back at the next one.
        log.save_vote(&Vote::new(1, 1)).await.unwrap();
        assert!(held(3));
        drop(four);
        log.save_vote(&Vote::new(1, 1)).await.unwrap();
        assert!(!held(3));
        assert!(log.segment(3).is_none());

        // Across a reopen, and a crash between recording a purge and renaming the segment:
        // a purged segment is held until the first job, and what takes it first keeps it.
        log.purge(id(8)).await.unwrap();
        assert!(held(6));
        drop(log);
        drop(seven);
        std::fs::rename(
            dir.path().join(format!("{:020}.held", 6)),
            dir.path().join(format!("{:020}.seg", 6)),
        )
        .unwrap();
        let mut log = small(dir.path());
        let six = log.segment(6).expect("segment 6 is held");
        assert!(held(6));
        log.save_vote(&Vote::new(1, 1)).await.unwrap();
        assert!(held(6));
        assert_eq!(indexes(&mut log).await, vec![(1, 9)]);
        drop(six);
        log.save_vote(&Vote::new(1, 1)).await.unwrap();
        assert!(!held(6));
    }

    /// Everything after the purge truncated (a new leader's log differs from the first entry
    /// not purged): the segment holding it is cut, not deleted, since it also holds purged
    /// entries whose writes the state machine may refer to.
    #[tokio::test]
    async fn a_truncation_of_all_after_a_purge_keeps_the_segment_for_what_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = small(dir.path());
        let entries: Vec<Entry> = (0..6).map(|i| entry(1, i, i as u8)).collect();
        for e in &entries {
            append(&mut log, vec![e.clone()]).await;
        }
        let place = crate::raft::entry_data(&entries[4])[0]
            .place()
            .unwrap()
            .clone();
        assert_eq!(place.seg, 3);
        drop(entries);
        let id = |term, i| openraft::LogId::new(openraft::CommittedLeaderId::new(term, 0), i);
        log.purge(id(1, 4)).await.unwrap();
        log.truncate(id(1, 5)).await.unwrap();
        append(&mut log, vec![entry(2, 5, 9)]).await;
        log.purge(id(2, 5)).await.unwrap();
        assert!(dir.path().join(format!("{:020}.held", 3)).exists());
        let bytes = crate::sys::read_at(&place.file, 4096, place.offset).unwrap();
        assert!(
            bytes == vec![4; 4096],
            "entry 4's write is not where it was"
        );
        drop(log);
        let mut log = small(dir.path());
        let held = log.segment(3).expect("segment 3 is held after a reopen");
        assert!(crate::sys::read_at(&held, 4096, place.offset).unwrap() == vec![4; 4096]);
        assert_eq!(indexes(&mut log).await, Vec::<(u64, u64)>::new());
        append(&mut log, vec![entry(2, 6, 6)]).await;
        assert_eq!(indexes(&mut log).await, vec![(2, 6)]);
    }

    /// openraft truncates without waiting for appends to be on disk: a truncation asked for
    /// while an append that starts a segment is queued removes that segment too (left behind,
    /// with entries of an older term, it made the log impossible to open).
    #[tokio::test]
    async fn a_truncation_removes_the_segment_an_append_queued_before_it_starts() {
        let dir = tempfile::tempdir().unwrap();
        let sized = |term: u64, index: u64, len: usize| Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(term, 0), index),
            payload: openraft::EntryPayload::Normal(BlockOp::Write {
                offset: 0,
                data: vec![index as u8; len].into(),
            }),
        };
        let mut log = SegmentLog::open_small(dir.path(), 1 << 20).unwrap();
        // Segment 0 full with entries 0 and 1; entry 2 (large: the writer takes a while) would
        // start segment 2.
        append(
            &mut log,
            vec![sized(1, 0, 600 << 10), sized(1, 1, 600 << 10)],
        )
        .await;
        let (tx, rx) = tokio::sync::oneshot::channel();
        log.append_then(
            vec![sized(1, 2, 16 << 20)],
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )
        .unwrap();
        log.truncate(openraft::LogId::new(
            openraft::CommittedLeaderId::new(1, 0),
            1,
        ))
        .await
        .unwrap();
        wait(rx).await.unwrap();
        // A new leader's small entries go on in segment 0.
        append(&mut log, (1..4).map(|i| sized(2, i, 4096)).collect()).await;
        assert_eq!(segments(dir.path()).len(), 1, "{:?}", segments(dir.path()));
        drop(log);
        let mut log = SegmentLog::open_small(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            indexes(&mut log).await,
            vec![(1, 0), (2, 1), (2, 2), (2, 3)]
        );
    }

    #[tokio::test]
    async fn vote_and_committed_survive_reopen_and_a_torn_committed_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = small(dir.path());
        let vote = Vote::new_committed(3, 2);
        log.save_vote(&vote).await.unwrap();
        append(&mut log, vec![entry(3, 0, 1)]).await;
        let c = Some(openraft::LogId::new(
            openraft::CommittedLeaderId::new(3, 0),
            0,
        ));
        log.save_committed(c).await.unwrap();
        // Written with the writer's next job.
        log.save_vote(&vote).await.unwrap();
        drop(log);
        let mut log = small(dir.path());
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
        assert_eq!(log.read_committed().await.unwrap(), c);
        drop(log);
        let f = File::options()
            .write(true)
            .open(dir.path().join("committed"))
            .unwrap();
        f.write_all_at(b"xx", 10).unwrap();
        let mut log = small(dir.path());
        assert_eq!(log.read_committed().await.unwrap(), None);
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    }

    #[tokio::test]
    async fn the_cache_serves_new_entries_and_evicts_only_what_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::open_with(dir.path(), SEGMENT_BYTES, 10 << 10, SPARES).unwrap();
        append(&mut log, (0..6).map(|i| entry(1, i, i as u8)).collect()).await;
        {
            let st = log.lock();
            assert!(st.cache_bytes <= 10 << 10);
            assert_eq!(st.cache_first as usize + st.cache.len(), 6);
        }
        let got = log.try_get_log_entries(..).await.unwrap();
        assert_eq!(
            got,
            (0..6).map(|i| entry(1, i, i as u8)).collect::<Vec<_>>()
        );
    }
}
