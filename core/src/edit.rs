//! Editing a file's recipe: a write at an offset re-cuts only the region it touches.
//!
//! The chunker is resumed at the extent boundary before the write (in the state the first
//! cut was in there), fed the new bytes, and stopped as soon as one of its cuts lands on an
//! old boundary after the write, with the same kind of piece on both sides: from there on
//! the old extents are exactly what a fresh cut would give, so they are kept. The result is
//! the recipe a full re-chunking of the edited file would produce, at the cost of a few
//! chunks.

use bytes::{Bytes, BytesMut};

use crate::chunker::{Chunker, ChunkerConfig, ConfigError, Piece};
use crate::id::ChunkId;
use crate::manifest::{Extent, FileRecipe};

#[derive(Debug, thiserror::Error)]
pub enum EditError<E: std::error::Error + 'static> {
    #[error("offset {offset} is past the end of the file ({len} bytes)")]
    OffsetPastEnd { offset: u64, len: u64 },
    #[error("an empty write changes nothing")]
    EmptyWrite,
    /// The recipe to edit is not well formed (its extents do not add up to its length, or
    /// one is empty or longer than a chunk may be). Refused before any arithmetic on it.
    #[error("the file's recipe is malformed: {0}")]
    BadRecipe(&'static str),
    #[error("chunk {id} is {actual} bytes, the recipe says {expected}")]
    ChunkLength {
        id: ChunkId,
        expected: u32,
        actual: usize,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("reading chunk: {0}")]
    Read(#[source] E),
}

/// The edited recipe and the chunks it introduced.
#[derive(Debug, Clone)]
pub struct WriteOutcome {
    pub recipe: FileRecipe,
    /// Data chunks cut from the re-cut region (distinct), with their bytes.
    pub new_chunks: Vec<(ChunkId, Bytes)>,
    /// The re-cut region of the new file.
    pub recut: (u64, u64),
}

/// Merge adjacent holes and drop empty extents.
pub fn normalize(extents: Vec<Extent>) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents {
        if e.is_empty() {
            continue;
        }
        match (out.last_mut(), e) {
            (Some(Extent::Hole { len }), Extent::Hole { len: more }) => *len += more,
            _ => out.push(e),
        }
    }
    out
}

/// Reads old bytes of the file being edited, a chunk at a time.
struct Reader<'a, E, F: FnMut(&ChunkId) -> Result<Bytes, E>> {
    extents: &'a [Extent],
    /// Offset of each extent, and the file's length last.
    starts: Vec<u64>,
    read: &'a mut F,
    /// The last few chunks read: a chunk is read in slices as the re-cut is fed; a short
    /// list keeps memory flat however long the re-cut runs.
    cache: Vec<(ChunkId, Bytes)>,
}

const CACHED_CHUNKS: usize = 8;

impl<E: std::error::Error + 'static, F: FnMut(&ChunkId) -> Result<Bytes, E>> Reader<'_, E, F> {
    /// A chunk around the write, kept: the re-cut reads it in several slices.
    fn chunk(&mut self, id: &ChunkId, len: u32) -> Result<Bytes, EditError<E>> {
        let b = fetch(self.read, &self.cache, id, len)?;
        if !self.cache.iter().any(|(i, _)| i == id) {
            if self.cache.len() == CACHED_CHUNKS {
                self.cache.remove(0);
            }
            self.cache.push((*id, b.clone()));
        }
        Ok(b)
    }

    /// Append the new file's bytes `[fed, fed + k)` to `buf`: the old bytes around the
    /// write (never those it overwrites), then the written ones.
    fn feed(
        &mut self,
        buf: &mut BytesMut,
        fed: u64,
        k: usize,
        offset: u64,
        data: &[u8],
    ) -> Result<(), EditError<E>> {
        let len = *self.starts.last().expect("the file's length");
        let wend = offset + data.len() as u64;
        let seg_end = fed + k as u64;
        let at = buf.len();
        buf.resize(at + k, 0);
        for (a, b) in [
            (fed, offset.min(seg_end)),
            (wend.max(fed), seg_end.min(len)),
        ] {
            if a < b {
                let (i, j) = (at + (a - fed) as usize, at + (b - fed) as usize);
                self.old_bytes(a, &mut buf[i..j])?;
            }
        }
        let (ws, we) = (offset.max(fed), wend.min(seg_end));
        if ws < we {
            buf[at + (ws - fed) as usize..at + (we - fed) as usize]
                .copy_from_slice(&data[(ws - offset) as usize..(we - offset) as usize]);
        }
        Ok(())
    }

    /// Old bytes `[p, p + out.len())` (within the old file) into `out`.
    fn old_bytes(&mut self, p: u64, out: &mut [u8]) -> Result<(), EditError<E>> {
        let end = p + out.len() as u64;
        let mut q = p;
        while q < end {
            let i = self.starts.partition_point(|&s| s <= q) - 1;
            let (es, ee) = (self.starts[i], self.starts[i + 1]);
            let take = ee.min(end);
            if let Extent::Data { id, len } = self.extents[i] {
                let b = self.chunk(&id, len)?;
                out[(q - p) as usize..(take - p) as usize]
                    .copy_from_slice(&b[(q - es) as usize..(take - es) as usize]);
            }
            q = take;
        }
        Ok(())
    }
}

/// Add a piece the re-cut made to the new extents (a data chunk to the new chunks, once);
/// whether it was a hole.
fn push_piece(piece: Piece, out: &mut Vec<Extent>, new_chunks: &mut Vec<(ChunkId, Bytes)>) -> bool {
    match piece {
        Piece::Hole(l) => {
            out.push(Extent::Hole { len: l });
            true
        }
        Piece::Data(b) => {
            let id = ChunkId::of(&b);
            out.push(Extent::Data {
                id,
                len: b.len() as u32,
            });
            if !new_chunks.iter().any(|(i, _)| *i == id) {
                new_chunks.push((id, b));
            }
            false
        }
    }
}

/// A chunk's bytes: from `cache` if there, else read (and checked for length).
fn fetch<E, F>(
    read: &mut F,
    cache: &[(ChunkId, Bytes)],
    id: &ChunkId,
    len: u32,
) -> Result<Bytes, EditError<E>>
where
    E: std::error::Error + 'static,
    F: FnMut(&ChunkId) -> Result<Bytes, E>,
{
    if let Some((_, b)) = cache.iter().find(|(i, _)| i == id) {
        return Ok(b.clone());
    }
    let b = read(id).map_err(EditError::Read)?;
    if b.len() != len as usize {
        return Err(EditError::ChunkLength {
            id: *id,
            expected: len,
            actual: b.len(),
        });
    }
    Ok(b)
}

/// Write `data` at `offset` into the file `recipe` describes (the file grows if the write
/// runs past its end; `offset` may be at most the file's length). `read` returns an old
/// chunk's bytes: [`recut_write`] reads only chunks around the write; the new file's hash
/// ([`Recut::finish`]) is its recipe's, so no other chunk is read and holes cost nothing.
pub fn apply_write<E, F>(
    recipe: &FileRecipe,
    cfg: ChunkerConfig,
    offset: u64,
    data: &[u8],
    read: &mut F,
) -> Result<WriteOutcome, EditError<E>>
where
    E: std::error::Error + 'static,
    F: FnMut(&ChunkId) -> Result<Bytes, E>,
{
    Ok(recut_write(recipe, cfg, offset, data, read)?.finish())
}

/// An edited file's extents, before its whole-file hash is known.
#[derive(Debug)]
pub struct Recut {
    pub extents: Vec<Extent>,
    /// Data chunks cut from the re-cut region (distinct), with their bytes.
    pub new_chunks: Vec<(ChunkId, Bytes)>,
    /// The re-cut region of the new file.
    pub recut: (u64, u64),
    /// The new file's length.
    pub len: u64,
}

impl Recut {
    /// The edited file's recipe with its hash ([`FileRecipe::content_hash`]): no chunk is
    /// read, and a hole costs no more than a chunk, whatever its length.
    pub fn finish(self) -> WriteOutcome {
        let mut recipe = FileRecipe {
            len: self.len,
            hash: [0; 32],
            extents: self.extents,
        };
        recipe.hash = recipe.content_hash();
        WriteOutcome {
            recipe,
            new_chunks: self.new_chunks,
            recut: self.recut,
        }
    }
}

/// Where re-cutting starts: the index of the first extent to re-cut, its offset, whether a
/// hole runs into it, and a hole kept before it.
struct Start {
    index: usize,
    at: u64,
    in_hole: bool,
    kept_hole: Option<u64>,
}

/// A boundary before `offset` that the write cannot move.
/// - The boundary at the end of the file was forced by the end of the file: an append
///   starts at the last extent.
/// - A data chunk that ends where a hole starts was cut there because of the hole: if the
///   write lands in that hole (and not deep inside a long one), the hole may be gone, so
///   start at that data chunk.
/// - A hole ending where data starts is continued by a resumed chunker (`in_hole`), so a
///   write that zeroes the data's first blocks simply lengthens the hole.
fn recut_start(ext: &[Extent], starts: &[u64], cfg: &ChunkerConfig, offset: u64) -> Start {
    let n = ext.len();
    let len = starts[n];
    let mut s = if offset == len {
        n
    } else {
        starts.partition_point(|&st| st <= offset) - 1
    };
    if s == n && n > 0 {
        s = n - 1;
    }
    // FastCDC decides a cut at `p` on the byte at `p` too (one byte of lookahead): a write
    // starting exactly at a data-to-data boundary may move it.
    if s > 0 && s < n && offset == starts[s] && matches!(ext[s - 1], Extent::Data { .. }) {
        s -= 1;
    }
    let block = cfg.hole_block as u64;
    let aligned = offset / block * block;
    let long_hole = |i: usize| {
        i < n && matches!(ext[i], Extent::Hole { .. }) && aligned >= starts[i] + cfg.hole_min as u64
    };
    if s < n && matches!(ext[s], Extent::Hole { .. }) && !long_hole(s) && s > 0 {
        s -= 1;
    }
    // A write deep inside a long hole keeps the hole up to the block before the write.
    if long_hole(s) {
        return Start {
            index: s,
            at: aligned,
            in_hole: true,
            kept_hole: Some(aligned - starts[s]),
        };
    }
    Start {
        index: s,
        at: starts[s],
        in_hole: s > 0 && matches!(ext[s - 1], Extent::Hole { .. }),
        kept_hole: None,
    }
}

/// Re-cut the region `data` written at `offset` touches. The chunker is fed old and new
/// bytes one maximum chunk at a time and stops at the first cut that lands on an old
/// boundary after the write (same kind of piece on both sides), so only chunks around the
/// write are read.
pub fn recut_write<E, F>(
    recipe: &FileRecipe,
    cfg: ChunkerConfig,
    offset: u64,
    data: &[u8],
    read: &mut F,
) -> Result<Recut, EditError<E>>
where
    E: std::error::Error + 'static,
    F: FnMut(&ChunkId) -> Result<Bytes, E>,
{
    let len = recipe.len;
    let mut sum = 0u64;
    for e in &recipe.extents {
        match e {
            Extent::Data { len, .. } if *len == 0 || *len > cfg.max => {
                return Err(EditError::BadRecipe("a data extent of a size no chunk has"));
            }
            Extent::Hole { len: 0 } => return Err(EditError::BadRecipe("an empty hole")),
            _ => {}
        }
        sum = sum
            .checked_add(e.len())
            .ok_or(EditError::BadRecipe("extents overflow"))?;
    }
    if sum != len {
        return Err(EditError::BadRecipe("extents do not add up to the length"));
    }
    if offset > len {
        return Err(EditError::OffsetPastEnd { offset, len });
    }
    if data.is_empty() {
        return Err(EditError::EmptyWrite);
    }
    let wend = offset
        .checked_add(data.len() as u64)
        .ok_or(EditError::BadRecipe("the write ends past the largest file"))?;
    let new_len = len.max(wend);
    let ext = &recipe.extents;
    let n = ext.len();
    let mut starts: Vec<u64> = recipe.extents_at().map(|(at, _)| at).collect();
    starts.push(len);

    let st = recut_start(ext, &starts, &cfg, offset);
    let s = st.index;
    let mut out: Vec<Extent> = ext[..s].to_vec();
    if let Some(h) = st.kept_hole {
        out.push(Extent::Hole { len: h });
    }
    let start = st.at;
    let mut rd = Reader {
        extents: ext,
        starts: starts.clone(),
        read,
        cache: Vec::new(),
    };
    let mut chunker = Chunker::resume(cfg, start, st.in_hole)?;
    let mut buf = BytesMut::new();
    let mut pos = start;
    let mut fed = start;
    let mut new_chunks: Vec<(ChunkId, Bytes)> = Vec::new();
    // Back in step with the old cut: a cut after the write on an old boundary, with the
    // same kind of piece before it as before.
    let resync = |pos: u64, is_hole: bool| {
        let i = starts.partition_point(|&st| st < pos);
        let same = i > s
            && i < n
            && starts[i] == pos
            && matches!(ext[i - 1], Extent::Hole { .. }) == is_hole;
        (pos >= wend && pos < len && same).then_some(i)
    };
    let mut suffix_from: Option<usize> = None;
    'cut: loop {
        let eof = fed >= new_len;
        while let Some(piece) = chunker.next(&mut buf, eof) {
            pos += piece.len();
            let is_hole = push_piece(piece, &mut out, &mut new_chunks);
            suffix_from = resync(pos, is_hole);
            if suffix_from.is_some() {
                break 'cut;
            }
            // Past the write, inside an old hole: the rest of it is zeros the chunker would
            // only add to this hole, and the old cut resumes where it ends. Skip it rather
            // than feed it (a hole may be terabytes).
            if is_hole && pos >= wend {
                let i = starts.partition_point(|&st| st <= pos).saturating_sub(1);
                if i < n && matches!(ext[i], Extent::Hole { .. }) && pos < starts[i + 1] {
                    out.push(Extent::Hole {
                        len: starts[i + 1] - pos,
                    });
                    pos = starts[i + 1];
                    suffix_from = Some(i + 1);
                    break 'cut;
                }
            }
        }
        if eof {
            break;
        }
        // A maximum chunk at a time.
        let k = (cfg.max as u64).min(new_len - fed) as usize;
        rd.feed(&mut buf, fed, k, offset, data)?;
        fed += k as u64;
    }
    if let Some(i) = suffix_from {
        out.extend_from_slice(&ext[i..]);
    }
    Ok(Recut {
        extents: normalize(out),
        new_chunks,
        recut: (start, pos),
        len: new_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunker::chunk_all;
    use crate::manifest::RecipeBuilder;
    use crate::testutil::{noise, small};
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn recipe_of(data: &[u8], cfg: ChunkerConfig) -> (FileRecipe, HashMap<ChunkId, Bytes>) {
        let mut rb = RecipeBuilder::new();
        let mut store = HashMap::new();
        for p in chunk_all(data, cfg).unwrap() {
            if let Some((id, b)) = rb.push(p) {
                store.insert(id, b);
            }
        }
        (rb.finish(), store)
    }

    /// What one edit did: its outcome, the recipe a fresh cut of the edited bytes gives, and
    /// which old chunks each phase read.
    struct Edited {
        out: WriteOutcome,
        fresh: FileRecipe,
        /// Chunks read by the re-cut.
        recut_reads: Vec<ChunkId>,
        /// Chunks read for the whole-file hash.
        hash_reads: Vec<ChunkId>,
    }

    impl Edited {
        /// Every chunk the re-cut read lies (in the old file) within the re-cut region or
        /// two maximum chunks past it: the chunker may hold up to one maximum chunk it has
        /// not cut yet when the re-cut feeds it the next maximum chunk, and a content cut in
        /// that buffer can end the re-cut (a bound of one maximum chunk failed now and then:
        /// seed 427); the hash read none twice.
        fn assert_reads_stay_near_the_write(&self, old: &FileRecipe, cfg: ChunkerConfig) {
            let (from, to) = (self.out.recut.0, self.out.recut.1 + 2 * cfg.max as u64);
            for id in &self.recut_reads {
                let near = old
                    .chunks_at()
                    .any(|(at, c, len)| c == *id && at < to && at + len as u64 > from);
                assert!(near, "re-cut read {id:?}, outside {from}..{to}");
            }
            let mut seen = std::collections::HashSet::new();
            for id in &self.hash_reads {
                assert!(seen.insert(*id), "hash read {id:?} twice");
            }
        }
    }

    fn edit(base: &[u8], offset: usize, data: &[u8], cfg: ChunkerConfig) -> Edited {
        let (r, store) = recipe_of(base, cfg);
        let reader = |log: &mut Vec<ChunkId>, id: &ChunkId| {
            log.push(*id);
            store
                .get(id)
                .cloned()
                .ok_or_else(|| std::io::Error::other("missing"))
        };
        let (mut recut_reads, hash_reads) = (Vec::new(), Vec::new());
        let recut = recut_write(&r, cfg, offset as u64, data, &mut |id: &ChunkId| {
            reader(&mut recut_reads, id)
        })
        .unwrap();
        let out = recut.finish();
        let mut edited = base.to_vec();
        let end = offset + data.len();
        if end > edited.len() {
            edited.resize(end, 0);
        }
        edited[offset..end].copy_from_slice(data);
        let (fresh, _) = recipe_of(&edited, cfg);
        let e = Edited {
            out,
            fresh,
            recut_reads,
            hash_reads,
        };
        e.assert_reads_stay_near_the_write(&r, cfg);
        e
    }

    #[test]
    fn a_small_write_recuts_a_few_chunks_and_matches_a_fresh_cut() {
        let cfg = ChunkerConfig::default();
        let base = noise(1, 4 << 20);
        let e = edit(&base, 2_000_000, b"patched!", cfg);
        assert_eq!(e.out.recipe, e.fresh);
        assert!(e.out.new_chunks.len() <= 2, "{}", e.out.new_chunks.len());
        assert!(e.out.recut.1 - e.out.recut.0 <= 2 * 256 * 1024);
        // Of the ~64 chunks of the file, the re-cut reads only the few around the write
        // (once each, however many slices it takes of them).
        let distinct: std::collections::HashSet<_> = e.recut_reads.iter().collect();
        assert!(
            !e.recut_reads.is_empty() && e.recut_reads.len() <= 8,
            "{:?}",
            e.recut_reads
        );
        assert_eq!(distinct.len(), e.recut_reads.len(), "no chunk read twice");
        // The new hash is the recipe's: no other chunk is read for it.
        assert!(e.hash_reads.is_empty(), "{:?}", e.hash_reads);
    }

    #[test]
    fn a_write_covering_whole_chunks_does_not_read_them() {
        let cfg = small();
        let base = noise(4, 300_000);
        let (r, _) = recipe_of(&base, cfg);
        let e = edit(&base, 100_000, &noise(5, 60_000), cfg);
        assert_eq!(e.out.recipe, e.fresh);
        for (at, id, len) in r.chunks_at() {
            if at >= 100_000 && at + len as u64 <= 160_000 {
                assert!(
                    !e.recut_reads.contains(&id),
                    "read a chunk the write replaces"
                );
            }
        }
    }

    #[test]
    fn writes_into_holes_at_the_end_and_past_it() {
        let cfg = small();
        let mut base = noise(2, 200_000);
        base[50_000..150_000].fill(0);
        for (off, data) in [
            (100_000usize, vec![1u8; 10]),
            (50_000, vec![2u8; 5000]),
            (200_000, vec![3u8; 300]),
            (199_990, vec![4u8; 3000]),
            (0, vec![0u8; 20_000]),
        ] {
            let e = edit(&base, off, &data, cfg);
            assert_eq!(e.out.recipe, e.fresh, "write at {off}");
        }
    }

    #[test]
    fn refuses_past_the_end_and_empty() {
        let cfg = small();
        let (r, _) = recipe_of(&noise(3, 1000), cfg);
        let mut read = |_: &ChunkId| -> Result<Bytes, std::io::Error> { unreachable!() };
        assert!(matches!(
            apply_write(&r, cfg, 1001, b"x", &mut read),
            Err(EditError::OffsetPastEnd {
                offset: 1001,
                len: 1000
            })
        ));
        assert!(matches!(
            apply_write(&r, cfg, 0, b"", &mut read),
            Err(EditError::EmptyWrite)
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_write_gives_the_recipe_of_a_fresh_cut(
            seed in 0u64..500,
            zeros in proptest::collection::vec((0usize..300_000, 0usize..60_000), 0..4),
            offset_frac in 0.0f64..1.0,
            data in proptest::collection::vec(prop_oneof![Just(0u8), any::<u8>()], 1..20_000),
        ) {
            let cfg = small();
            let mut base = noise(seed, 300_000);
            for (at, n) in zeros {
                let e = (at + n).min(base.len());
                base[at..e].fill(0);
            }
            let offset = (offset_frac * base.len() as f64) as usize;
            let e = edit(&base, offset, &data, cfg);
            if e.out.recipe != e.fresh {
                let l = |r: &FileRecipe| r.extents.iter().map(|e| match e { Extent::Data{len,..} => format!("D{len}"), Extent::Hole{len} => format!("H{len}") }).collect::<Vec<_>>().join(" ");
                eprintln!("offset {offset} len {} recut {:?}\nours  {}\nfresh {}", data.len(), e.out.recut, l(&e.out.recipe), l(&e.fresh));
            }
            prop_assert_eq!(e.out.recipe, e.fresh);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Recipes from a peer may be anything: a write into one is an error or an edit,
        /// never a panic, and reads only chunks the recipe names.
        #[test]
        fn any_recipe_and_write_is_an_error_or_an_edit_never_a_panic(
            len in prop_oneof![0u64..400_000, Just(u64::MAX), Just(u64::MAX - 3)],
            extents in proptest::collection::vec(
                prop_oneof![
                    (0u32..300_000).prop_map(|l| Extent::Data { id: ChunkId([7; 32]), len: l }),
                    prop_oneof![0u64..200_000, Just(u64::MAX)].prop_map(|l| Extent::Hole { len: l }),
                ],
                0..6,
            ),
            offset in prop_oneof![0u64..400_000, Just(u64::MAX)],
            data in proptest::collection::vec(any::<u8>(), 0..3000),
        ) {
            let r = FileRecipe { len, hash: [0; 32], extents };
            let mut read = |id: &ChunkId| -> Result<Bytes, std::io::Error> {
                assert_eq!(id, &ChunkId([7; 32]), "a chunk the recipe does not name");
                Ok(Bytes::from(vec![1u8; 300_000]))
            };
            let _ = apply_write(&r, small(), offset, &data, &mut read);
        }
    }
}
