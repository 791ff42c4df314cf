//! Write data in the raft log without copies: [`Data`] is shared bytes, so an entry is cloned
//! (log cache, replication, state machine) without copying what it writes, and [`encode`] /
//! [`decode`] keep the data out of the bincode body, so it goes to a socket or a segment file
//! straight from where it is (vectored writes) and comes back as slices of the buffer it was
//! read into.
//!
//! An encoded value is a *skeleton* (the bincode of the value, each `Data` in it replaced by its
//! length and crc32) and the data, the `Data`s' bytes one after the other in the order they
//! appear. Outside [`encode`] and [`decode`] (plain bincode) a `Data` is an ordinary byte string.
//!
//! A `Data`'s crc32 is computed once, by the node whose front end takes the write, as it hands
//! it over (while its bytes are in cache; the leader's log would need it otherwise), and shared
//! by its clones; it travels in the skeleton, so a follower writes its log record without going
//! over the data again (the record's crc is combined from the data's). A crc that came with the
//! data is trusted as it is: if the data were damaged on the way, the log record would not match
//! its crc and opening the log would say so. Data that no log keeps (a snapshot's parts) is
//! checked against its crc where it arrives ([`Data::intact`]).

use std::cell::RefCell;
use std::io;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Bytes a write carries (cheap to clone), their crc32 once known, and where a log wrote them.
#[derive(Clone, Default)]
pub struct Data {
    bytes: Bytes,
    known: Arc<Known>,
}

/// What is learnt of a [`Data`] once, shared by its clones.
#[derive(Default)]
struct Known {
    crc: OnceLock<u32>,
    place: OnceLock<Place>,
}

/// Where a log holds a [`Data`]'s bytes: a file that keeps them unchanged while the entry is in
/// the log, or anyone holds the file (see `segment_log.rs`), and their offset in it.
#[derive(Debug, Clone)]
pub struct Place {
    /// Which log of the process (`SegmentLog::id`).
    pub log: u64,
    /// The entry whose record holds them. A `Data` proposed again (a write retried through
    /// another leader) keeps its first place: that record may have been truncated and its bytes
    /// overwritten since, and only an entry with this id is sure to be at it.
    pub entry: super::LogId,
    /// The segment (its name in the log's directory: its first index).
    pub seg: u64,
    pub file: Arc<std::fs::File>,
    pub offset: u64,
}

impl Data {
    fn with_crc(bytes: Bytes, crc: u32) -> Data {
        Data {
            bytes,
            known: Arc::new(Known {
                crc: OnceLock::from(crc),
                place: OnceLock::new(),
            }),
        }
    }

    /// Where a log wrote the bytes, once they are there (written and synced).
    pub fn place(&self) -> Option<&Place> {
        self.known.place.get()
    }

    /// Records where a log wrote the bytes (the first place only).
    pub fn placed(&self, place: Place) {
        let _ = self.known.place.set(place);
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The bytes, shared.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The crc32 of the bytes, computed on the first call (by this value or a clone of it).
    pub fn crc(&self) -> u32 {
        *self.known.crc.get_or_init(|| crc32fast::hash(&self.bytes))
    }

    /// Whether the bytes match the crc32 they came with (one that came with none is computed
    /// now, and matches): for data nothing else checks later.
    pub fn intact(&self) -> bool {
        match self.known.crc.get() {
            Some(crc) => crc32fast::hash(&self.bytes) == *crc,
            None => true,
        }
    }
}

impl PartialEq for Data {
    fn eq(&self, other: &Data) -> bool {
        self.bytes == other.bytes
    }
}

impl Eq for Data {}

impl std::ops::Deref for Data {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl From<Vec<u8>> for Data {
    fn from(v: Vec<u8>) -> Data {
        Data::from(Bytes::from(v))
    }
}

impl From<Bytes> for Data {
    fn from(bytes: Bytes) -> Data {
        Data {
            bytes,
            known: Arc::default(),
        }
    }
}

impl std::fmt::Debug for Data {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Data({} bytes)", self.bytes.len())
    }
}

thread_local! {
    /// While [`encode`] runs on this thread: the data of the `Data`s serialized so far.
    static ENCODING: RefCell<Option<Vec<Data>>> = const { RefCell::new(None) };
    /// While [`decode`] runs on this thread: the data, and how much of it was taken.
    static DECODING: RefCell<Option<(Bytes, usize)>> = const { RefCell::new(None) };
}

impl Serialize for Data {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let apart = ENCODING.with(|e| match e.borrow_mut().as_mut() {
            Some(chunks) => {
                chunks.push(self.clone());
                true
            }
            None => false,
        });
        if apart {
            (self.bytes.len() as u64, self.crc()).serialize(s)
        } else {
            s.serialize_bytes(&self.bytes)
        }
    }
}

struct DataVisitor;

impl<'de> Visitor<'de> for DataVisitor {
    type Value = Data;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("bytes")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Data, E> {
        Ok(Data::from(Bytes::copy_from_slice(v)))
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Data, E> {
        Ok(Data::from(v))
    }
}

impl<'de> Deserialize<'de> for Data {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Data, D::Error> {
        if !DECODING.with(|s| s.borrow().is_some()) {
            return d.deserialize_byte_buf(DataVisitor);
        }
        let (len, crc) = <(u64, u32)>::deserialize(d)?;
        DECODING.with(|s| {
            let mut s = s.borrow_mut();
            let (data, at) = s.as_mut().expect("checked above");
            let end = usize::try_from(len)
                .ok()
                .and_then(|l| at.checked_add(l))
                .filter(|end| *end <= data.len())
                .ok_or_else(|| de::Error::custom(format!("{len} bytes of data missing")))?;
            let chunk = data.slice(*at..end);
            *at = end;
            Ok(Data::with_crc(chunk, crc))
        })
    }
}

/// Clears a thread-local slot when dropped (also when serde panics).
struct Reset<T: 'static>(&'static std::thread::LocalKey<RefCell<Option<T>>>);

impl<T> Drop for Reset<T> {
    fn drop(&mut self) {
        self.0.with(|s| *s.borrow_mut() = None);
    }
}

/// `v` as a skeleton and its `Data`s, in order.
pub fn encode<T: Serialize>(v: &T) -> bincode::Result<(Vec<u8>, Vec<Data>)> {
    ENCODING.with(|e| *e.borrow_mut() = Some(Vec::new()));
    let reset = Reset(&ENCODING);
    // Not `bincode::serialize`: it serializes twice (sizing first).
    let mut skeleton = Vec::new();
    bincode::serialize_into(&mut skeleton, v)?;
    let chunks = ENCODING.with(|e| e.borrow_mut().take()).unwrap_or_default();
    drop(reset);
    Ok((skeleton, chunks))
}

/// The value [`encode`] gave `skeleton` and `data` for; its `Data`s are slices of `data`.
pub fn decode<T: DeserializeOwned>(skeleton: &[u8], data: Bytes) -> bincode::Result<T> {
    let total = data.len();
    DECODING.with(|s| *s.borrow_mut() = Some((data, 0)));
    let reset = Reset(&DECODING);
    let v = bincode::deserialize(skeleton)?;
    let taken = DECODING.with(|s| s.borrow().as_ref().map_or(0, |(_, at)| *at));
    drop(reset);
    if taken != total {
        return Err(Box::new(bincode::ErrorKind::Custom(format!(
            "{} bytes of data left over",
            total - taken
        ))));
    }
    Ok(v)
}

/// Writes `parts` to `w` in full, with as few vectored writes as it takes.
pub fn write_all_vectored(w: &mut impl io::Write, parts: &[&[u8]]) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice<'_>> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| io::IoSlice::new(p))
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        // At most IOV_MAX (1024) slices a call.
        let n = rest.len().min(1024);
        match w.write_vectored(&rest[..n]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => io::IoSlice::advance_slices(&mut rest, written),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::BlockOp;

    #[test]
    fn data_travels_apart_and_comes_back_as_slices_of_the_buffer() {
        let op = BlockOp::Batch(vec![
            BlockOp::Write {
                offset: 0,
                data: vec![1; 4096].into(),
            },
            BlockOp::Resize { size: 1 << 30 },
            BlockOp::Write {
                offset: 8192,
                data: vec![2; 100].into(),
            },
        ]);
        let (skeleton, chunks) = encode(&op).unwrap();
        assert!(skeleton.len() < 100, "{} bytes", skeleton.len());
        assert_eq!(
            chunks.iter().map(|c| c.len()).collect::<Vec<_>>(),
            [4096, 100]
        );
        let data = Bytes::from(
            chunks
                .iter()
                .flat_map(|c| c.iter().copied())
                .collect::<Vec<u8>>(),
        );
        let back: BlockOp = decode(&skeleton, data.clone()).unwrap();
        assert_eq!(back, op);
        let BlockOp::Batch(ops) = back else { panic!() };
        let BlockOp::Write { data: d, .. } = &ops[2] else {
            panic!()
        };
        assert_eq!(d.as_ptr(), data[4096..].as_ptr(), "not copied");
        // The crcs came in the skeleton, and are those of the data.
        assert_eq!(d.known.crc.get(), Some(&crc32fast::hash(&[2; 100])));
        assert_eq!(chunks[0].crc(), crc32fast::hash(&[1; 4096]));

        // Too little or too much data is an error; plain bincode still works.
        assert!(decode::<BlockOp>(&skeleton, data.slice(..4000)).is_err());
        assert!(decode::<BlockOp>(&skeleton, Bytes::from(vec![0; 5000])).is_err());
        let plain = bincode::serialize(&op).unwrap();
        assert_eq!(bincode::deserialize::<BlockOp>(&plain).unwrap(), op);
    }

    #[test]
    fn data_damaged_on_the_way_is_not_intact() {
        let (skeleton, chunks) = encode(&Data::from(vec![7u8; 4096])).unwrap();
        let mut bytes: Vec<u8> = chunks.iter().flat_map(|d| d.to_vec()).collect();
        let good: Data = decode(&skeleton, Bytes::from(bytes.clone())).unwrap();
        assert!(good.intact());
        bytes[100] ^= 1;
        let bad: Data = decode(&skeleton, Bytes::from(bytes)).unwrap();
        assert!(!bad.intact());
        assert!(Data::from(vec![1u8; 10]).intact());
    }

    #[test]
    fn a_crc_is_computed_once_and_shared_by_clones() {
        let a = Data::from(vec![9u8; 1000]);
        let b = a.clone();
        assert!(b.known.crc.get().is_none());
        assert_eq!(a.crc(), crc32fast::hash(&[9; 1000]));
        assert_eq!(b.known.crc.get(), Some(&a.crc()), "the clone has it too");
        // Equality is the bytes'.
        assert_eq!(Data::from(vec![9u8; 1000]), a);
    }

    #[test]
    fn vectored_writes_cover_more_slices_than_one_call_takes() {
        let parts: Vec<Vec<u8>> = (0..3000u32).map(|i| vec![i as u8; 3]).collect();
        let refs: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
        let mut out = Vec::new();
        write_all_vectored(&mut out, &refs).unwrap();
        assert_eq!(out, parts.concat());
    }
}
