//! Editing a file's recipe: a write at an offset re-cuts only the region it touches.
//!
//! The chunker is resumed at the extent boundary before the write (in the state the first
//! cut was in there), fed the new bytes, and stopped as soon as one of its cuts lands on an
//! old boundary after the write, with the same kind of piece on both sides: from there on
//! the old extents are exactly what a fresh cut would give, so they are kept. The result is
//! the recipe a full re-chunking of the edited file would produce, at the cost of a few
//! chunks.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};

use crate::chunker::{Chunker, ChunkerConfig, ConfigError, Piece};
use crate::id::ChunkId;
use crate::manifest::{Extent, FileRecipe, hash_zeros};

/// Bytes fed to the chunker at a time while re-cutting.
const FEED: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum EditError<E: std::error::Error + 'static> {
    #[error("offset {offset} is past the end of the file ({len} bytes)")]
    OffsetPastEnd { offset: u64, len: u64 },
    #[error("an empty write changes nothing")]
    EmptyWrite,
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

struct Reader<'a, E, F: FnMut(&ChunkId) -> Result<Bytes, E>> {
    extents: &'a [Extent],
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
        let b = self.fetch(id, len)?;
        if !self.cache.iter().any(|(i, _)| i == id) {
            if self.cache.len() == CACHED_CHUNKS {
                self.cache.remove(0);
            }
            self.cache.push((*id, b.clone()));
        }
        Ok(b)
    }

    /// A chunk read once (for the whole-file hash): not kept, so memory stays flat however
    /// large the file.
    fn fetch(&mut self, id: &ChunkId, len: u32) -> Result<Bytes, EditError<E>> {
        if let Some((_, b)) = self.cache.iter().find(|(i, _)| i == id) {
            return Ok(b.clone());
        }
        let b = (self.read)(id).map_err(EditError::Read)?;
        if b.len() != len as usize {
            return Err(EditError::ChunkLength {
                id: *id,
                expected: len,
                actual: b.len(),
            });
        }
        Ok(b)
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

/// Write `data` at `offset` into the file `recipe` describes (the file grows if the write
/// runs past its end; `offset` may be at most the file's length). `read` returns an old
/// chunk's bytes; only chunks around the write and, for the new whole-file hash, the rest of
/// the file are read.
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
    let len = recipe.len;
    if offset > len {
        return Err(EditError::OffsetPastEnd { offset, len });
    }
    if data.is_empty() {
        return Err(EditError::EmptyWrite);
    }
    let wend = offset + data.len() as u64;
    let new_len = len.max(wend);
    let ext = &recipe.extents;
    let n = ext.len();
    let mut starts = Vec::with_capacity(n + 1);
    let mut p = 0u64;
    for e in ext {
        starts.push(p);
        p += e.len();
    }
    starts.push(p);

    // Where re-cutting starts: a boundary before `offset` that the write cannot move.
    // - The boundary at the end of the file was forced by the end of the file: an append
    //   starts at the last extent.
    // - A data chunk that ends where a hole starts was cut there because of the hole: if the
    //   write lands in that hole (and not deep inside a long one), the hole may be gone, so
    //   start at that data chunk.
    // - A hole ending where data starts is continued by a resumed chunker (`in_hole`), so a
    //   write that zeroes the data's first blocks simply lengthens the hole.
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
    let mut out: Vec<Extent> = ext[..s].to_vec();
    let mut start = starts[s];
    let mut in_hole = s > 0 && matches!(ext[s - 1], Extent::Hole { .. });
    // A write deep inside a long hole keeps the hole up to the block before the write.
    if long_hole(s) {
        out.push(Extent::Hole {
            len: aligned - start,
        });
        start = aligned;
        in_hole = true;
    }

    let mut rd = Reader {
        extents: ext,
        starts: starts.clone(),
        read,
        cache: Vec::new(),
    };
    let mut chunker = Chunker::resume(cfg, start, in_hole)?;
    let mut buf = BytesMut::new();
    let mut pos = start;
    let mut fed = start;
    let mut new_chunks: Vec<(ChunkId, Bytes)> = Vec::new();
    let mut suffix_from: Option<usize> = None;
    'cut: loop {
        let eof = fed >= new_len;
        while let Some(piece) = chunker.next(&mut buf, eof) {
            pos += piece.len();
            let is_hole = matches!(piece, Piece::Hole(_));
            match piece {
                Piece::Hole(l) => out.push(Extent::Hole { len: l }),
                Piece::Data(b) => {
                    let id = ChunkId::of(&b);
                    out.push(Extent::Data {
                        id,
                        len: b.len() as u32,
                    });
                    if !new_chunks.iter().any(|(i, _)| *i == id) {
                        new_chunks.push((id, b));
                    }
                }
            }
            // Back in step with the old cut?
            if pos >= wend && pos < len {
                let i = starts.partition_point(|&st| st < pos);
                if i > s
                    && i < n
                    && starts[i] == pos
                    && matches!(ext[i - 1], Extent::Hole { .. }) == is_hole
                {
                    suffix_from = Some(i);
                    break 'cut;
                }
            }
        }
        if eof {
            break;
        }
        let k = FEED.min(new_len - fed) as usize;
        let at = buf.len();
        buf.resize(at + k, 0);
        let old_end = len.min(fed + k as u64);
        if fed < old_end {
            rd.old_bytes(fed, &mut buf[at..at + (old_end - fed) as usize])?;
        }
        let (ws, we) = (offset.max(fed), wend.min(fed + k as u64));
        if ws < we {
            buf[at + (ws - fed) as usize..at + (we - fed) as usize]
                .copy_from_slice(&data[(ws - offset) as usize..(we - offset) as usize]);
        }
        fed += k as u64;
    }
    let recut = (start, pos);
    if let Some(i) = suffix_from {
        out.extend_from_slice(&ext[i..]);
    }
    let extents = normalize(out);

    // The whole-file hash of the edited file.
    let mut hasher = blake3::Hasher::new();
    let fresh: HashMap<ChunkId, Bytes> = new_chunks.iter().cloned().collect();
    let mut total = 0u64;
    for e in &extents {
        match e {
            Extent::Data { id, len } => {
                let b = match fresh.get(id) {
                    Some(b) => b.clone(),
                    None => rd.fetch(id, *len)?,
                };
                hasher.update(&b);
            }
            Extent::Hole { len } => hash_zeros(&mut hasher, *len),
        }
        total += e.len();
    }
    debug_assert_eq!(total, new_len);
    Ok(WriteOutcome {
        recipe: FileRecipe {
            len: new_len,
            hash: *hasher.finalize().as_bytes(),
            extents,
        },
        new_chunks,
        recut,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunker::chunk_all;
    use crate::manifest::RecipeBuilder;
    use crate::testutil::{noise, small};
    use proptest::prelude::*;

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

    fn edit(
        base: &[u8],
        offset: usize,
        data: &[u8],
        cfg: ChunkerConfig,
    ) -> (WriteOutcome, FileRecipe, usize) {
        let (r, store) = recipe_of(base, cfg);
        let mut reads = 0usize;
        let mut read = |id: &ChunkId| {
            reads += 1;
            store
                .get(id)
                .cloned()
                .ok_or_else(|| std::io::Error::other("missing"))
        };
        let out = apply_write(&r, cfg, offset as u64, data, &mut read).unwrap();
        let mut edited = base.to_vec();
        let end = offset + data.len();
        if end > edited.len() {
            edited.resize(end, 0);
        }
        edited[offset..end].copy_from_slice(data);
        let (fresh, _) = recipe_of(&edited, cfg);
        (out, fresh, reads)
    }

    #[test]
    fn a_small_write_recuts_a_few_chunks_and_matches_a_fresh_cut() {
        let cfg = ChunkerConfig::default();
        let base = noise(1, 4 << 20);
        let (out, fresh, _) = edit(&base, 2_000_000, b"patched!", cfg);
        assert_eq!(out.recipe, fresh);
        assert!(out.new_chunks.len() <= 2, "{}", out.new_chunks.len());
        assert!(out.recut.1 - out.recut.0 <= 2 * 256 * 1024);
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
            let (out, fresh, _) = edit(&base, off, &data, cfg);
            assert_eq!(out.recipe, fresh, "write at {off}");
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
            let (out, fresh, _) = edit(&base, offset, &data, cfg);
            if out.recipe != fresh {
                let l = |r: &FileRecipe| r.extents.iter().map(|e| match e { Extent::Data{len,..} => format!("D{len}"), Extent::Hole{len} => format!("H{len}") }).collect::<Vec<_>>().join(" ");
                eprintln!("offset {offset} len {} recut {:?}\nours  {}\nfresh {}", data.len(), out.recut, l(&out.recipe), l(&fresh));
            }
            prop_assert_eq!(out.recipe, fresh);
        }
    }
}
