//! Content-defined chunking: FastCDC v2020 over data, with runs of zeros split out as holes.
//!
//! [`Chunker`] is buffer-in, piece-out (as bitar's chunker): the caller owns the buffer and
//! the refill policy; [`StreamingChunker`] is that policy over any [`Read`], so a 20 GiB image
//! is cut with a few MiB of memory.
//!
//! Holes: an aligned run of at least [`ChunkerConfig::hole_min`] zero bytes (counted in whole
//! [`ChunkerConfig::hole_block`]s, aligned to the file offset) is a [`Piece::Hole`]. Holes are
//! never hashed as data, stored or sent, and sites write them sparse. A raw disk image is
//! mostly zeros (a 512 MiB Debian image holds ~175 MiB of data), so this matters more than
//! dedup. Data between holes is cut with FastCDC; a hole ends a data segment, so cut points
//! depend only on content (and the block grid), and resynchronise after edits.

use std::io::{self, Read};

use bytes::{Bytes, BytesMut};
use fastcdc::v2020::{Normalization, cut, select_masks};
use serde::{Deserialize, Serialize};

/// Chunking parameters. Part of every manifest, so a site could re-cut identically.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkerConfig {
    /// Smallest data chunk (except at the end of a segment). Default 16 KiB.
    pub min: u32,
    /// Target average data chunk. Default 64 KiB.
    pub avg: u32,
    /// Largest data chunk. Default 256 KiB.
    pub max: u32,
    /// Holes are whole blocks of this size, aligned to the file offset. Default 4 KiB (the
    /// block size of the filesystems that will hold the image).
    pub hole_block: u32,
    /// Shortest zero run that becomes a hole. Shorter runs stay inside data chunks, where zstd
    /// makes them nearly free; longer ones would waste hashing and site disk. Default 32 KiB.
    pub hole_min: u32,
}

impl Default for ChunkerConfig {
    fn default() -> Self {
        ChunkerConfig {
            min: 16 * 1024,
            avg: 64 * 1024,
            max: 256 * 1024,
            hole_block: 4096,
            hole_min: 32 * 1024,
        }
    }
}

/// The chunking parameters are outside what FastCDC or the hole scanner accept.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid chunker configuration: {0}")]
pub struct ConfigError(&'static str);

impl ChunkerConfig {
    /// Largest chunk any configuration may produce; bounds decoder buffers.
    pub const MAX_CHUNK: u32 = 16 * 1024 * 1024;

    pub fn validate(&self) -> Result<(), ConfigError> {
        let even = |v: u32| v.is_multiple_of(2);
        if !(even(self.min) && even(self.avg) && even(self.max)) {
            return Err(ConfigError("min, avg and max must be even"));
        }
        if self.min < 64 || self.avg < 256 || self.max > Self::MAX_CHUNK {
            return Err(ConfigError(
                "need min >= 64, avg >= 256, max <= 16 MiB (FastCDC's bounds)",
            ));
        }
        if !(self.min <= self.avg && self.avg <= self.max) {
            return Err(ConfigError("need min <= avg <= max"));
        }
        if !self.hole_block.is_power_of_two() || self.hole_block < 512 {
            return Err(ConfigError("hole_block must be a power of two >= 512"));
        }
        if self.hole_min < self.hole_block || !self.hole_min.is_multiple_of(self.hole_block) {
            return Err(ConfigError(
                "hole_min must be a positive multiple of hole_block",
            ));
        }
        Ok(())
    }
}

/// One piece of a file, in file order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    /// Bytes to be named, stored and sent.
    Data(Bytes),
    /// This many zero bytes, never stored or sent.
    Hole(u64),
}

impl Piece {
    pub fn len(&self) -> u64 {
        match self {
            Piece::Data(b) => b.len() as u64,
            Piece::Hole(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Cuts pieces off the front of a caller-owned buffer.
#[derive(Debug, Clone)]
pub struct Chunker {
    cfg: ChunkerConfig,
    mask_s: u64,
    mask_l: u64,
    /// File offset of the first byte of the caller's buffer.
    offset: u64,
    /// The last piece was a hole: zero blocks at the front continue it even when fewer
    /// than `hole_min` remain, so where a refill splits a hole cannot change the cuts.
    in_hole: bool,
}

/// True when every byte is zero. Folds 256-byte groups without branching so the compiler
/// vectorises it, and stops at the first group that is not zero.
fn is_zero(b: &[u8]) -> bool {
    b.chunks(256)
        .all(|g| g.iter().fold(0u8, |a, &x| a | x) == 0)
}

/// Outcome of looking for the end of a data segment within a window.
enum SegmentEnd {
    /// A hole starts here: the segment ends for sure.
    Hole(usize),
    /// A zero run starts here but the buffer ends before we know whether it is long
    /// enough to be a hole.
    Undecided(usize),
    /// No hole starts before this (the end of the scanned window).
    None(usize),
}

impl Chunker {
    pub fn new(cfg: ChunkerConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let (mask_s, mask_l) = select_masks(cfg.avg as usize, Normalization::Level1);
        Ok(Chunker {
            cfg,
            mask_s,
            mask_l,
            offset: 0,
            in_hole: false,
        })
    }

    /// A chunker that continues a file at `offset` (an extent boundary of an earlier cut),
    /// in the state the original chunker was in there: `in_hole` when the extent before
    /// `offset` is a hole. Cutting from here gives the same pieces as cutting the whole file,
    /// which is what lets an edit re-cut only the region it touches.
    pub fn resume(cfg: ChunkerConfig, offset: u64, in_hole: bool) -> Result<Self, ConfigError> {
        let mut c = Self::new(cfg)?;
        c.offset = offset;
        c.in_hole = in_hole;
        Ok(c)
    }

    pub fn config(&self) -> &ChunkerConfig {
        &self.cfg
    }

    /// File offset of the next piece.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// How many bytes the caller should keep buffered (unless at end of input) for
    /// [`Chunker::next`] to always make progress.
    pub fn lookahead(&self) -> usize {
        (self.cfg.max + self.cfg.hole_min + self.cfg.hole_block) as usize
    }

    /// Length of the run of zero bytes at `buf[start..]`, in whole blocks, stopping once it
    /// reaches `enough` bytes. At end of input a final partial block counts too.
    fn zero_run(&self, buf: &[u8], start: usize, enough: usize, eof: bool) -> usize {
        let block = self.cfg.hole_block as usize;
        let mut n = 0;
        while n < enough {
            let s = start + n;
            let e = s + block;
            if e <= buf.len() {
                if !is_zero(&buf[s..e]) {
                    break;
                }
                n += block;
            } else {
                if eof && s < buf.len() && is_zero(&buf[s..]) {
                    n += buf.len() - s;
                }
                break;
            }
        }
        n
    }

    /// Find where the data segment starting at `buf[0]` ends, looking at aligned block
    /// starts in `(0, window)`.
    fn segment_end(&self, buf: &[u8], window: usize, eof: bool) -> SegmentEnd {
        let block = self.cfg.hole_block as usize;
        let hole_min = self.cfg.hole_min as usize;
        let misalign = (self.offset % block as u64) as usize;
        let mut p = if misalign == 0 {
            block
        } else {
            block - misalign
        };
        while p < window {
            if p + block <= buf.len() && is_zero(&buf[p..p + block]) {
                let run = self.zero_run(buf, p, hole_min, eof);
                if run >= hole_min {
                    return SegmentEnd::Hole(p);
                }
                if p + run + block > buf.len() && !eof {
                    return SegmentEnd::Undecided(p);
                }
                p += run.max(block);
            } else if p + block > buf.len() && !eof {
                // A partial block at the end of the buffer: it may start a hole.
                return SegmentEnd::Undecided(p);
            } else {
                p += block;
            }
        }
        SegmentEnd::None(window)
    }

    /// Cut the next piece off the front of `buf`, or return `None` when more input is
    /// needed (or, with `eof`, when `buf` is empty).
    pub fn next(&mut self, buf: &mut BytesMut, eof: bool) -> Option<Piece> {
        if buf.is_empty() {
            return None;
        }
        let block = self.cfg.hole_block as usize;
        let hole_min = self.cfg.hole_min as usize;
        let max = self.cfg.max as usize;

        // At a block boundary the front may be a hole.
        if self.offset.is_multiple_of(block as u64) {
            let run = self.zero_run(buf, 0, usize::MAX, eof);
            if run >= hole_min || (self.in_hole && run > 0) {
                let _ = buf.split_to(run);
                self.offset += run as u64;
                self.in_hole = true;
                return Some(Piece::Hole(run as u64));
            }
            if !eof && run + block > buf.len() {
                return None; // A zero run up to the end of what we have: undecided.
            }
        }
        self.in_hole = false;

        let window = buf.len().min(max);
        let (limit, decided) = match self.segment_end(buf, window, eof) {
            SegmentEnd::Hole(p) => (p, true),
            SegmentEnd::Undecided(p) => (p, false),
            SegmentEnd::None(w) => (w, w == max || (eof && w == buf.len())),
        };
        if limit == 0 {
            return None;
        }
        let (_, n) = cut(
            &buf[..limit],
            self.cfg.min as usize,
            self.cfg.avg as usize,
            max,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        // A cut before the window's end is a content cut; one at the end is only real if the
        // window ends at a hole, at `max`, or at the end of input.
        if n < limit || decided {
            let data = buf.split_to(n).freeze();
            self.offset += n as u64;
            return Some(Piece::Data(data));
        }
        None
    }
}

/// Reads a file and yields `(offset, piece)` in order, holding at most a few MiB.
#[derive(Debug)]
pub struct StreamingChunker<R> {
    reader: R,
    chunker: Chunker,
    buf: BytesMut,
    eof: bool,
    read_size: usize,
}

impl<R: Read> StreamingChunker<R> {
    pub fn new(reader: R, cfg: ChunkerConfig) -> Result<Self, ConfigError> {
        let chunker = Chunker::new(cfg)?;
        let read_size = (4 << 20).max(chunker.lookahead() * 2);
        Ok(StreamingChunker {
            reader,
            chunker,
            buf: BytesMut::with_capacity(read_size),
            eof: false,
            read_size,
        })
    }

    fn refill(&mut self) -> io::Result<()> {
        let start = self.buf.len();
        self.buf.resize(start + self.read_size, 0);
        let mut filled = start;
        // Fill the whole read size (short reads happen on pipes) or hit end of file.
        while filled < self.buf.len() {
            match self.reader.read(&mut self.buf[filled..]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(k) => filled += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.buf.truncate(filled);
                    return Err(e);
                }
            }
        }
        self.buf.truncate(filled);
        Ok(())
    }
}

impl<R: Read> Iterator for StreamingChunker<R> {
    type Item = io::Result<(u64, Piece)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let offset = self.chunker.offset();
            if let Some(p) = self.chunker.next(&mut self.buf, self.eof) {
                return Some(Ok((offset, p)));
            }
            if self.eof {
                return None;
            }
            if let Err(e) = self.refill() {
                return Some(Err(e));
            }
        }
    }
}

/// Cut a whole in-memory buffer (tests, benchmarks, small files).
pub fn chunk_all(data: &[u8], cfg: ChunkerConfig) -> Result<Vec<Piece>, ConfigError> {
    let mut c = Chunker::new(cfg)?;
    let mut buf = BytesMut::from(data);
    let mut out = Vec::new();
    while let Some(p) = c.next(&mut buf, true) {
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{noise, small};

    fn concat(pieces: &[Piece]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in pieces {
            match p {
                Piece::Data(b) => out.extend_from_slice(b),
                Piece::Hole(n) => out.resize(out.len() + *n as usize, 0),
            }
        }
        out
    }

    /// 0, 1, min-1, min, avg, max, max+1 and friends, for both configurations.
    const INTERESTING_SIZES: &[usize] = &[
        0, 1, 511, 512, 1023, 1024, 2047, 2048, 4095, 4096, 16383, 16384, 16385, 65536, 262143,
        262144, 262145, 1_000_000,
    ];

    #[test]
    fn interesting_sizes_round_trip_and_respect_bounds() {
        for cfg in [ChunkerConfig::default(), small()] {
            for &n in INTERESTING_SIZES {
                for data in [noise(n as u64, n), vec![0u8; n]] {
                    let pieces = chunk_all(&data, cfg).unwrap();
                    assert_eq!(concat(&pieces), data, "size {n}");
                    let datas: Vec<_> = pieces
                        .iter()
                        .filter_map(|p| match p {
                            Piece::Data(b) => Some(b.len()),
                            _ => None,
                        })
                        .collect();
                    for &l in &datas {
                        assert!(l as u32 <= cfg.max, "chunk {l} > max at size {n}");
                        assert!(l > 0);
                    }
                }
            }
        }
    }

    #[test]
    fn zeros_become_holes_and_are_never_data() {
        let cfg = ChunkerConfig::default();
        let mut data = noise(1, 300_000);
        data.extend(vec![0u8; 10 << 20]);
        data.extend(noise(2, 200_000));
        let pieces = chunk_all(&data, cfg).unwrap();
        assert_eq!(concat(&pieces), data);
        let hole: u64 = pieces
            .iter()
            .map(|p| if let Piece::Hole(n) = p { *n } else { 0 })
            .sum();
        // All of the 10 MiB except the part of the block shared with data.
        assert!(hole >= (10 << 20) - 4096, "hole {hole}");
        let data_bytes: u64 = pieces
            .iter()
            .map(|p| {
                if let Piece::Data(b) = p {
                    b.len() as u64
                } else {
                    0
                }
            })
            .sum();
        assert!(data_bytes <= 500_000 + 8192);
        // An all-zero file is one hole (split into pieces no larger than the input).
        let z = chunk_all(&vec![0u8; 1 << 20], cfg).unwrap();
        assert!(z.iter().all(|p| matches!(p, Piece::Hole(_))));
    }

    /// Golden cut points: changing these changes every chunk id ever stored.
    #[test]
    fn golden_cut_points() {
        let data = noise(42, 1 << 20);
        let lens: Vec<u64> = chunk_all(&data, ChunkerConfig::default())
            .unwrap()
            .iter()
            .map(Piece::len)
            .collect();
        assert_eq!(lens.iter().sum::<u64>(), 1 << 20);
        assert_eq!(lens, GOLDEN_1MIB_SEED42);
    }

    const GOLDEN_1MIB_SEED42: &[u64] = &[
        72462, 95088, 92685, 126641, 61257, 33809, 38933, 30628, 67662, 92703, 66969, 50006, 78032,
        99296, 42405,
    ];

    /// Without holes, the cuts are exactly the fastcdc crate's own v2020 cuts.
    #[test]
    fn same_cuts_as_fastcdc_reference() {
        let data = noise(7, 5 << 20);
        let ours: Vec<u64> = chunk_all(&data, ChunkerConfig::default())
            .unwrap()
            .iter()
            .map(Piece::len)
            .collect();
        let reference: Vec<u64> = fastcdc::v2020::FastCDC::new(&data, 16384, 65536, 262144)
            .map(|c| c.length as u64)
            .collect();
        assert_eq!(ours, reference);
    }

    fn data_ids(pieces: &[Piece]) -> std::collections::HashSet<Bytes> {
        pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Data(b) => Some(b.clone()),
                _ => None,
            })
            .collect()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]

        /// Cutting is deterministic, loses nothing, and resynchronises after an insertion:
        /// all but a few chunks around the edit are shared.
        #[test]
        fn resynchronises_after_insertion(
            seed in 0u64..1000,
            at in 0usize..400_000,
            insert in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..5000),
            zeros_at in 0usize..400_000,
            zeros_len in 0usize..100_000,
        ) {
            let cfg = small();
            let mut base = noise(seed, 400_000);
            let z_end = (zeros_at + zeros_len).min(base.len());
            base[zeros_at..z_end].fill(0);
            let a = chunk_all(&base, cfg).unwrap();
            proptest::prop_assert_eq!(concat(&a), base.clone());
            proptest::prop_assert_eq!(&a, &chunk_all(&base, cfg).unwrap());
            let mut edited = base.clone();
            edited.splice(at..at, insert.iter().copied());
            let b = chunk_all(&edited, cfg).unwrap();
            proptest::prop_assert_eq!(concat(&b), edited);
            let (ia, ib) = (data_ids(&a), data_ids(&b));
            let lost = ia.difference(&ib).count();
            // What may change: the chunks the inserted bytes fall in (a long insertion spans
            // several) and a few neighbours; and, when a zero region follows the insertion,
            // the chunks around it, because the insertion shifts the 4 KiB-style block grid
            // its hole is aligned to. Everything else is shared.
            let near_edit = insert.len() / cfg.min as usize + 5;
            let shifted_hole = if zeros_at >= at && zeros_len > 0 { 3 } else { 0 };
            proptest::prop_assert!(
                lost <= near_edit + shifted_hole,
                "{} of {} chunks changed",
                lost,
                ia.len()
            );
        }

        #[test]
        fn any_bytes_round_trip(data in proptest::collection::vec(0u8..4, 0..70_000)) {
            let pieces = chunk_all(&data, small()).unwrap();
            proptest::prop_assert_eq!(concat(&pieces), data);
        }
    }

    #[test]
    fn streaming_matches_in_memory() {
        let mut data = noise(5, 3 << 20);
        data[1_000_000..1_300_000].fill(0);
        let cfg = small();
        let whole = chunk_all(&data, cfg).unwrap();
        // A reader that returns odd-sized short reads.
        struct Jittery<'a>(&'a [u8], usize);
        impl Read for Jittery<'_> {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                self.1 = (self.1 * 7 + 3) % 5000 + 1;
                let n = self.1.min(out.len()).min(self.0.len());
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let streamed: Vec<Piece> = StreamingChunker::new(Jittery(&data, 1), cfg)
            .unwrap()
            .map(|r| r.unwrap().1)
            .collect();
        assert_eq!(concat(&streamed), data);
        // Holes may be split differently by refills; data chunks must be identical.
        let d = |v: &[Piece]| -> Vec<Bytes> {
            v.iter()
                .filter_map(|p| match p {
                    Piece::Data(b) => Some(b.clone()),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(d(&whole), d(&streamed));
    }

    #[test]
    fn bad_configs_are_refused() {
        let d = ChunkerConfig::default();
        assert!(
            Chunker::new(ChunkerConfig {
                min: d.avg * 2,
                ..d
            })
            .is_err()
        );
        assert!(
            Chunker::new(ChunkerConfig {
                hole_block: 3000,
                ..d
            })
            .is_err()
        );
    }
}
