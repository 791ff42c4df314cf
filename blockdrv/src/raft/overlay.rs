//! Writes a volume's state machine has applied by reference: ranges of the volume whose bytes
//! are where the raft log wrote them, not in the blocks file (see `state_machine.rs`).
//!
//! The ranges never overlap: a range set again replaces, wholly or in part, what was there.
//! Each range knows the log segment it is in, and the overlay counts the bytes each segment
//! still holds for it, so that the state machine can tell how many segments it keeps and
//! which one is cheapest to give back (its pieces copied to the blocks).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::data::Place;

/// A range of the volume held in the log.
#[derive(Debug, Clone)]
pub struct Piece {
    pub len: u64,
    /// The segment (its first index) and where in it the first byte is.
    pub seg: u64,
    pub file: Arc<File>,
    pub at: u64,
}

/// A piece as a snapshot records it: the segment file is found again by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    pub offset: u64,
    pub len: u64,
    pub seg: u64,
    pub at: u64,
}

/// Where a part of a read comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// The blocks file, at the same offset.
    Blocks,
    /// A log file, at this offset.
    Log(Arc<File>, u64),
}

/// The ranges held in the log, by offset in the volume.
#[derive(Debug, Default)]
pub struct Overlay {
    pieces: BTreeMap<u64, Piece>,
    /// (segment, offset) of every piece.
    by_seg: BTreeSet<(u64, u64)>,
    /// What each segment that holds any piece holds.
    live: BTreeMap<u64, Held>,
    bytes: u64,
}

/// What a segment holds for the pieces.
#[derive(Debug, Default, Clone, Copy)]
struct Held {
    /// Bytes of pieces in it.
    bytes: u64,
    /// The end of the furthest piece put in it (the file is at least this long).
    end: u64,
}

impl Held {
    /// The segment's length as the budget counts it: the segment size (the newest is still
    /// being filled), or as far as its pieces reach, if further.
    fn counted(&self, segment_bytes: u64) -> u64 {
        self.end.max(segment_bytes)
    }
}

impl Overlay {
    /// Bytes of the volume held in the log.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// How many log segments hold pieces.
    pub fn segments(&self) -> usize {
        self.live.len()
    }

    /// Bytes of the log segments that hold pieces, each counted as `segment_bytes` (the newest
    /// is still being filled) or as far as its furthest piece, if further: one append that
    /// does not fit in a segment's room still goes into it whole, so a segment can be longer.
    pub fn held_bytes(&self, segment_bytes: u64) -> u64 {
        self.live.values().map(|h| h.counted(segment_bytes)).sum()
    }

    /// The segment holding the fewest bytes of pieces (the oldest of those), leaving out the
    /// newest segment unless `newest_too`: what is cheapest to copy to the blocks to give a
    /// segment back.
    pub fn leanest(&self, newest_too: bool) -> Option<u64> {
        let skip = if newest_too {
            None
        } else {
            self.live.keys().next_back().copied()
        };
        self.live
            .iter()
            .filter(|(s, _)| Some(**s) != skip)
            .min_by_key(|(s, held)| (held.bytes, **s))
            .map(|(s, _)| *s)
    }

    /// The pieces in segment `seg`, and their offsets in the volume.
    pub fn in_segment(&self, seg: u64) -> Vec<(u64, Piece)> {
        self.by_seg
            .range((seg, 0)..=(seg, u64::MAX))
            .map(|(_, off)| (*off, self.pieces[off].clone()))
            .collect()
    }

    /// Every piece, as a snapshot records it, and the files they are in.
    pub fn record(&self) -> (Vec<Recorded>, Vec<Arc<File>>) {
        let mut files: BTreeMap<u64, Arc<File>> = BTreeMap::new();
        let pieces = self
            .pieces
            .iter()
            .map(|(off, p)| {
                files.entry(p.seg).or_insert_with(|| p.file.clone());
                Recorded {
                    offset: *off,
                    len: p.len,
                    seg: p.seg,
                    at: p.at,
                }
            })
            .collect();
        (pieces, files.into_values().collect())
    }

    /// The first byte at or after `at` that a piece holds, and where that piece ends.
    pub fn next_piece(&self, at: u64) -> Option<(u64, u64)> {
        let before = self
            .pieces
            .range(..at)
            .next_back()
            .filter(|(o, p)| **o + p.len > at)
            .map(|(o, p)| (at, *o + p.len));
        before.or_else(|| {
            self.pieces
                .range(at..)
                .next()
                .map(|(o, p)| (*o, *o + p.len))
        })
    }

    fn take(&mut self, off: u64) -> Option<Piece> {
        let p = self.pieces.remove(&off)?;
        self.by_seg.remove(&(p.seg, off));
        self.bytes -= p.len;
        let held = self
            .live
            .get_mut(&p.seg)
            .expect("a piece's segment is counted");
        held.bytes -= p.len;
        if held.bytes == 0 {
            self.live.remove(&p.seg);
        }
        Some(p)
    }

    /// Adds piece `p` at `off` (where nothing is).
    pub fn put(&mut self, off: u64, p: Piece) {
        if p.len == 0 {
            return;
        }
        self.by_seg.insert((p.seg, off));
        self.bytes += p.len;
        let held = self.live.entry(p.seg).or_default();
        held.bytes += p.len;
        held.end = held.end.max(p.at + p.len);
        self.pieces.insert(off, p);
    }

    /// `[off, off + len)` is no longer held in the log: what pieces had of it is dropped, the
    /// rest of them stays.
    pub fn cut(&mut self, off: u64, len: u64) {
        if len == 0 || self.pieces.is_empty() {
            return;
        }
        let end = off.saturating_add(len);
        // The piece that starts before `off`, if it reaches into the range.
        let mut hit: Vec<u64> = self
            .pieces
            .range(..off)
            .next_back()
            .filter(|(o, p)| **o + p.len > off)
            .map(|(o, _)| *o)
            .into_iter()
            .collect();
        hit.extend(self.pieces.range(off..end).map(|(o, _)| *o));
        for o in hit {
            // What is left of the piece keeps its segment counted as long as it was.
            let seg_end = self.live.get(&self.pieces[&o].seg).map_or(0, |h| h.end);
            let p = self.take(o).expect("a piece just found");
            let p_end = o + p.len;
            if o < off {
                self.put(
                    o,
                    Piece {
                        len: off - o,
                        ..p.clone()
                    },
                );
            }
            if p_end > end {
                let skip = end - o;
                self.put(
                    end,
                    Piece {
                        len: p_end - end,
                        at: p.at + skip,
                        ..p.clone()
                    },
                );
            }
            self.reaches(p.seg, seg_end);
        }
    }

    /// Segment `seg`, if it holds pieces, is at least `len` long (its file's length, say: the
    /// pieces of a segment need not reach its end).
    pub fn reaches(&mut self, seg: u64, len: u64) {
        if let Some(h) = self.live.get_mut(&seg) {
            h.end = h.end.max(len);
        }
    }

    /// How `held_bytes` counts the newest segment that holds pieces.
    pub fn newest_held(&self, segment_bytes: u64) -> Option<u64> {
        self.live
            .values()
            .next_back()
            .map(|h| h.counted(segment_bytes))
    }

    /// `[off, off + len)` is now at `place`.
    pub fn set(&mut self, off: u64, len: u64, place: &Place) {
        self.cut(off, len);
        self.put(
            off,
            Piece {
                len,
                seg: place.seg,
                file: place.file.clone(),
                at: place.offset,
            },
        );
    }

    /// Where the bytes of `[off, off + len)` are: (offset, length, source) in order, covering
    /// the range.
    pub fn resolve(&self, off: u64, len: u64) -> Vec<(u64, u64, Source)> {
        let end = off.saturating_add(len);
        let mut out = Vec::new();
        let mut at = off;
        let first = self
            .pieces
            .range(..off)
            .next_back()
            .filter(|(o, p)| **o + p.len > off);
        for (o, p) in first.into_iter().chain(self.pieces.range(off..end)) {
            let (from, to) = ((*o).max(off), (*o + p.len).min(end));
            if from > at {
                out.push((at, from - at, Source::Blocks));
            }
            out.push((
                from,
                to - from,
                Source::Log(p.file.clone(), p.at + (from - o)),
            ));
            at = to;
        }
        if at < end {
            out.push((at, end - at, Source::Blocks));
        }
        out
    }

    /// Drops every piece.
    pub fn clear(&mut self) {
        *self = Overlay::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(seg: u64, at: u64) -> Place {
        Place {
            log: 1,
            entry: super::super::LogId::new(openraft::CommittedLeaderId::new(1, 0), 1),
            seg,
            file: Arc::new(tempfile::tempfile().unwrap()),
            offset: at,
        }
    }

    /// The resolution as (offset, length, Some(offset in the log) or None for the blocks).
    fn map(o: &Overlay, off: u64, len: u64) -> Vec<(u64, u64, Option<u64>)> {
        o.resolve(off, len)
            .into_iter()
            .map(|(a, l, s)| {
                (
                    a,
                    l,
                    match s {
                        Source::Blocks => None,
                        Source::Log(_, at) => Some(at),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn set_replaces_what_it_overlaps_and_keeps_the_rest_of_older_pieces() {
        let mut o = Overlay::default();
        o.set(100, 100, &place(1, 1000));
        o.set(300, 50, &place(2, 5000));
        assert_eq!(o.bytes(), 150);
        // Into the middle of the first piece: it splits around the new one.
        o.set(120, 10, &place(3, 9000));
        assert_eq!(
            map(&o, 0, 400),
            vec![
                (0, 100, None),
                (100, 20, Some(1000)),
                (120, 10, Some(9000)),
                (130, 70, Some(1030)),
                (200, 100, None),
                (300, 50, Some(5000)),
                (350, 50, None),
            ]
        );
        assert_eq!(o.bytes(), 150);
        // Over the tail of one piece and the head of the next.
        o.set(190, 120, &place(4, 7000));
        assert_eq!(
            map(&o, 150, 250),
            vec![
                (150, 40, Some(1050)),
                (190, 120, Some(7000)),
                (310, 40, Some(5010)),
                (350, 50, None),
            ]
        );
        assert_eq!(o.bytes(), 20 + 10 + 60 + 120 + 40);
    }

    #[test]
    fn cut_drops_a_range_and_segments_are_counted_by_the_bytes_they_still_hold_and_reach() {
        let mut o = Overlay::default();
        o.set(0, 100, &place(5, 0));
        o.set(100, 100, &place(5, 100));
        o.set(300, 30, &place(6, 0));
        o.set(50, 10, &place(7, 900));
        assert_eq!(o.segments(), 3);
        // Segment 6 holds 30 bytes, 7 holds 10 but is the newest, 5 holds 190.
        assert_eq!(o.leanest(false), Some(6));
        assert_eq!(o.leanest(true), Some(7));
        // Each at least a segment's size, segment 7 as far as its piece reaches.
        assert_eq!(o.held_bytes(256), 256 + 256 + 910);
        assert_eq!(o.held_bytes(1000), 3000);
        let in5: Vec<(u64, u64, u64)> = o
            .in_segment(5)
            .iter()
            .map(|(off, p)| (*off, p.len, p.at))
            .collect();
        assert_eq!(in5, vec![(0, 50, 0), (60, 40, 60), (100, 100, 100)]);
        assert_eq!(o.next_piece(55), Some((55, 60)));
        assert_eq!(o.next_piece(200), Some((300, 330)));
        assert_eq!(o.next_piece(330), None);
        let (rec, files) = o.record();
        assert_eq!(rec.len(), 5);
        assert_eq!(files.len(), 3);
        // Segment 6 given back: it is no longer counted.
        o.cut(300, 30);
        assert_eq!(o.segments(), 2);
        assert_eq!(o.held_bytes(256), 256 + 910);
        // A piece cut down to its head leaves its segment counted as long as it was, as does
        // one whose file is known to be longer.
        o.cut(55, 5);
        assert_eq!(o.held_bytes(256), 256 + 910);
        o.reaches(5, 1000);
        assert_eq!(o.held_bytes(256), 1000 + 910);
        assert_eq!(o.newest_held(256), Some(910));
        o.cut(0, 50);
        o.cut(40, 1000);
        assert!(o.is_empty());
        assert_eq!((o.bytes(), o.segments()), (0, 0));
        assert_eq!(map(&o, 0, 10), vec![(0, 10, None)]);
        // A read inside one piece.
        o.set(1000, 100, &place(8, 40));
        assert_eq!(map(&o, 1010, 20), vec![(1010, 20, Some(50))]);
    }
}
