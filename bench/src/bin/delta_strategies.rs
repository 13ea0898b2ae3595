//! How the update's delta strategy was chosen: bytes to send a site that holds v1 the
//! chunks of v2 it lacks, under each strategy, on the same images in one run.
//!
//! 1. whole chunks, zstd level 3 (as stored) and level L;
//! 2. each chunk as a delta against its most similar v1 chunk (sketch super-features);
//! 3. each chunk as a delta against the v1 chunks holding its aligned 4 KiB blocks;
//! 4. groups of G consecutive chunks as one frame, prefix = both kinds of bases (seedcast).
//!
//! `cargo run --release -p seedcast-bench --bin delta_strategies -- V1 V2 [--level 19]`

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use seedcast_core::chunker::{ChunkerConfig, Piece, StreamingChunker};
use seedcast_core::{ChunkId, delta};

#[derive(Parser, Debug)]
struct Args {
    v1: String,
    v2: String,
    #[arg(long, default_value_t = 19)]
    level: i32,
    /// Average chunk size (min = avg/4, max = avg*4).
    #[arg(long, default_value_t = 65536)]
    avg: u32,
    /// Chunks per group in strategy 4.
    #[arg(long, default_value_t = 32)]
    group: usize,
}

struct C {
    id: ChunkId,
    off: u64,
    data: Vec<u8>,
}

fn chunks(path: &str, cfg: ChunkerConfig) -> Result<Vec<C>> {
    let mut out = Vec::new();
    for r in StreamingChunker::new(std::fs::File::open(path)?, cfg)? {
        if let (off, Piece::Data(b)) = r? {
            out.push(C {
                id: ChunkId::of(&b),
                off,
                data: b.to_vec(),
            });
        }
    }
    Ok(out)
}

fn key(b: &[u8]) -> [u8; 16] {
    blake3::hash(b).as_bytes()[..16]
        .try_into()
        .expect("16 bytes")
}

/// Aligned 4 KiB blocks of a chunk at file offset `off`.
fn blocks(off: u64, data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let first = ((4096 - off % 4096) % 4096) as usize;
    data.get(first..).unwrap_or(&[]).chunks_exact(4096)
}

/// v1's chunks, indexed by super-feature and by aligned block.
struct Index<'a> {
    c1: &'a [C],
    features: HashMap<u64, usize>,
    blocks: HashMap<[u8; 16], usize>,
}

impl<'a> Index<'a> {
    fn new(c1: &'a [C]) -> Self {
        let mut ix = Index {
            c1,
            features: HashMap::new(),
            blocks: HashMap::new(),
        };
        for (i, c) in c1.iter().enumerate() {
            if let Some(s) = delta::sketch(&c.data) {
                for f in s.0 {
                    ix.features.entry(f).or_insert(i);
                }
            }
            for b in blocks(c.off, &c.data) {
                ix.blocks.entry(key(b)).or_insert(i);
            }
        }
        ix
    }

    /// v1 chunks sharing a super-feature with `c`.
    fn similar(&self, c: &C) -> Vec<usize> {
        let mut v = Vec::new();
        if let Some(s) = delta::sketch(&c.data) {
            for f in s.0 {
                if let Some(&j) = self.features.get(&f)
                    && !v.contains(&j)
                {
                    v.push(j);
                }
            }
        }
        v
    }

    /// v1 chunks holding one of `c`'s aligned blocks.
    fn by_blocks(&self, c: &C) -> Vec<usize> {
        let mut v = Vec::new();
        for b in blocks(c.off, &c.data) {
            if let Some(&j) = self.blocks.get(&key(b))
                && !v.contains(&j)
            {
                v.push(j);
            }
        }
        v
    }

    fn concat(&self, ids: &[usize]) -> Vec<u8> {
        ids.iter()
            .flat_map(|&j| self.c1[j].data.iter().copied())
            .collect()
    }
}

/// zstd at `level`, or the chunk's own size when that is smaller.
fn z(d: &[u8], level: i32) -> Result<usize> {
    Ok(zstd::bulk::compress(d, level)?.len().min(d.len()))
}

/// 2. Each chunk as a delta against its most similar v1 chunk.
fn most_similar(ix: &Index, need: &[&C], level: i32) -> Result<usize> {
    let mut n = 0;
    for c in need {
        let whole = z(&c.data, level)?;
        n += match ix.similar(c).first() {
            Some(&j) => delta::encode(&ix.c1[j].data, &c.data, level)?
                .len()
                .min(whole),
            None => whole,
        };
    }
    Ok(n)
}

/// 3. Each chunk as a delta against the v1 chunks holding its blocks.
fn block_bases(ix: &Index, need: &[&C], level: i32) -> Result<usize> {
    let mut n = 0;
    for c in need {
        let whole = z(&c.data, level)?;
        let base = ix.concat(&ix.by_blocks(c));
        n += delta::encode(&base, &c.data, level)?.len().min(whole);
    }
    Ok(n)
}

/// 4. Groups of chunks against both kinds of bases (what seedcast sends).
fn groups(ix: &Index, need: &[&C], group: usize, level: i32) -> Result<usize> {
    let mut n = 0;
    for g in need.chunks(group) {
        let mut ids = Vec::new();
        for c in g {
            for j in ix.by_blocks(c).into_iter().chain(ix.similar(c)) {
                if !ids.contains(&j) {
                    ids.push(j);
                }
            }
        }
        ids.truncate(96);
        let parts: Vec<&[u8]> = g.iter().map(|c| &c.data[..]).collect();
        n += delta::encode_group(&ix.concat(&ids), &parts, level)?.len();
    }
    Ok(n)
}

fn main() -> Result<()> {
    let a = Args::parse();
    let cfg = ChunkerConfig {
        min: a.avg / 4,
        avg: a.avg,
        max: a.avg * 4,
        ..Default::default()
    };
    let (c1, c2) = (chunks(&a.v1, cfg)?, chunks(&a.v2, cfg)?);
    let have: HashSet<ChunkId> = c1.iter().map(|c| c.id).collect();
    let mut seen = HashSet::new();
    let need: Vec<&C> = c2
        .iter()
        .filter(|c| !have.contains(&c.id) && seen.insert(c.id))
        .collect();
    let raw: usize = need.iter().map(|c| c.data.len()).sum();
    println!(
        "v1 {} chunks, v2 {} chunks; v2 needs {} chunks ({raw} B raw)",
        c1.len(),
        c2.len(),
        need.len()
    );
    let ix = Index::new(&c1);

    let t = Instant::now();
    let (mut w3, mut wl) = (0, 0);
    for c in &need {
        w3 += z(&c.data, 3)?;
        wl += z(&c.data, a.level)?;
    }
    println!(
        "1. whole chunks: zstd 3 {w3} B, zstd {} {wl} B ({:.1?})",
        a.level,
        t.elapsed()
    );
    let t = Instant::now();
    let n = most_similar(&ix, &need, a.level)?;
    println!(
        "2. delta vs most similar chunk: {n} B ({:.1?})",
        t.elapsed()
    );
    let t = Instant::now();
    let n = block_bases(&ix, &need, a.level)?;
    println!(
        "3. delta vs chunks holding its blocks: {n} B ({:.1?})",
        t.elapsed()
    );
    let t = Instant::now();
    let n = groups(&ix, &need, a.group, a.level)?;
    println!(
        "4. groups of {} with both kinds of bases (seedcast): {n} B ({:.1?})",
        a.group,
        t.elapsed()
    );
    Ok(())
}
