//! Writes a volume's state machine has applied by reference: ranges of the volume whose bytes
//! are where the raft log wrote them, not (yet) in the blocks file (see `state_machine.rs`).
//!
//! The ranges never overlap: a range set again replaces, wholly or in part, what was there.
//! Each range remembers the entry that wrote it and how far into the applied entries that entry
//! was, so the oldest can be found (to be written to the blocks) and the log kept back to it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::sync::Arc;

use super::data::Place;
use super::LogId;

/// A range of the volume held in the log.
#[derive(Debug, Clone)]
pub struct Piece {
    pub len: u64,
    /// Where its first byte is.
    pub file: Arc<File>,
    pub at: u64,
    /// The index of the entry that wrote it, and the entry applied before that one.
    pub index: u64,
    pub before: Option<LogId>,
    /// The bytes of entries applied before that entry, as the state machine counts them (its
    /// age).
    pub pos: u64,
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
    /// (index, offset) of every piece: oldest first.
    by_age: BTreeSet<(u64, u64)>,
    bytes: u64,
}

impl Overlay {
    /// Bytes of the volume held in the log.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// The oldest piece, and its offset.
    pub fn oldest(&self) -> Option<(u64, &Piece)> {
        let (_, off) = self.by_age.first()?;
        Some((*off, &self.pieces[off]))
    }

    fn take(&mut self, off: u64) -> Option<Piece> {
        let p = self.pieces.remove(&off)?;
        self.by_age.remove(&(p.index, off));
        self.bytes -= p.len;
        Some(p)
    }

    fn put(&mut self, off: u64, p: Piece) {
        if p.len == 0 {
            return;
        }
        self.by_age.insert((p.index, off));
        self.bytes += p.len;
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
                        ..p
                    },
                );
            }
        }
    }

    /// `[off, off + len)` is now at `place`, written by entry `index` (`before`: the entry
    /// applied before it) at `pos` bytes of entries applied.
    pub fn set(
        &mut self,
        off: u64,
        len: u64,
        place: &Place,
        index: u64,
        before: Option<LogId>,
        pos: u64,
    ) {
        self.cut(off, len);
        self.put(
            off,
            Piece {
                len,
                file: place.file.clone(),
                at: place.offset,
                index,
                before,
                pos,
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

    fn place(at: u64) -> Place {
        Place {
            log: 1,
            entry: LogId::new(openraft::CommittedLeaderId::new(1, 0), 1),
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
        o.set(100, 100, &place(1000), 1, None, 0);
        o.set(300, 50, &place(5000), 2, None, 100);
        assert_eq!(o.bytes(), 150);
        // Into the middle of the first piece: it splits around the new one.
        o.set(120, 10, &place(9000), 3, None, 150);
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
        o.set(190, 120, &place(7000), 4, None, 160);
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
    fn cut_drops_a_range_and_the_oldest_piece_is_the_earliest_entry() {
        let mut o = Overlay::default();
        o.set(0, 100, &place(0), 5, None, 0);
        o.set(100, 100, &place(100), 6, None, 100);
        o.set(50, 10, &place(900), 7, None, 200);
        assert_eq!(o.oldest().map(|(off, p)| (off, p.index)), Some((0, 5)));
        o.cut(0, 50);
        // What is left of entry 5 is still the oldest.
        assert_eq!(o.oldest().map(|(off, p)| (off, p.at)), Some((60, 60)));
        o.cut(40, 1000);
        assert!(o.is_empty());
        assert_eq!(o.bytes(), 0);
        assert_eq!(map(&o, 0, 10), vec![(0, 10, None)]);
        // A read inside one piece.
        o.set(1000, 100, &place(40), 8, None, 300);
        assert_eq!(map(&o, 1010, 20), vec![(1010, 20, Some(50))]);
    }
}
