//! Exploration: how many bytes would v1 → v2 cost under different delta strategies?
use std::collections::{HashMap, HashSet};

use seedcast_core::ChunkId;
use seedcast_core::chunker::{ChunkerConfig, Piece, StreamingChunker};
use seedcast_core::delta;

struct C {
    id: ChunkId,
    off: u64,
    data: Vec<u8>,
}

fn chunks(path: &str, cfg: ChunkerConfig) -> Vec<C> {
    let f = std::fs::File::open(path).unwrap();
    let mut out = Vec::new();
    for r in StreamingChunker::new(f, cfg).unwrap() {
        let (off, p) = r.unwrap();
        if let Piece::Data(b) = p {
            out.push(C {
                id: ChunkId::of(&b),
                off,
                data: b.to_vec(),
            });
        }
    }
    out
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (v1, v2) = (&a[1], &a[2]);
    let avg: u32 = a.get(3).map(|s| s.parse().unwrap()).unwrap_or(65536);
    let level: i32 = a.get(4).map(|s| s.parse().unwrap()).unwrap_or(19);
    let cfg = ChunkerConfig {
        min: avg / 4,
        avg,
        max: avg * 4,
        ..Default::default()
    };
    let c1 = chunks(v1, cfg);
    let c2 = chunks(v2, cfg);
    let have: HashSet<ChunkId> = c1.iter().map(|c| c.id).collect();
    let mut seen = HashSet::new();
    let need: Vec<&C> = c2
        .iter()
        .filter(|c| !have.contains(&c.id) && seen.insert(c.id))
        .collect();
    let raw: usize = need.iter().map(|c| c.data.len()).sum();
    eprintln!(
        "v1 chunks {} v2 chunks {} need {} ({} raw)",
        c1.len(),
        c2.len(),
        need.len(),
        raw
    );
    let z3: usize = need
        .iter()
        .map(|c| {
            zstd::bulk::compress(&c.data, 3)
                .unwrap()
                .len()
                .min(c.data.len())
        })
        .sum();
    let z19: usize = need
        .iter()
        .map(|c| {
            zstd::bulk::compress(&c.data, level)
                .unwrap()
                .len()
                .min(c.data.len())
        })
        .sum();
    eprintln!("whole chunks zstd3 {z3} zstd{level} {z19}");
    // Sketch index of v1.
    let mut sf: HashMap<u64, usize> = HashMap::new();
    for (i, c) in c1.iter().enumerate() {
        if let Some(s) = delta::sketch(&c.data) {
            for x in s.0 {
                sf.entry(x).or_insert(i);
            }
        }
    }
    let offs: Vec<u64> = c1.iter().map(|c| c.off).collect();
    let (mut pos_total, mut sim_total, mut best_total, mut cat_total) =
        (0usize, 0usize, 0usize, 0usize);
    let t = std::time::Instant::now();
    let skip = std::env::var("FAST").is_ok();
    for c in need.iter().filter(|_| !skip) {
        let whole = zstd::bulk::compress(&c.data, level)
            .unwrap()
            .len()
            .min(c.data.len());
        // positional: v1 chunk containing the same offset
        let i = offs.partition_point(|&o| o <= c.off).saturating_sub(1);
        let pos = delta::encode(&c1[i].data, &c.data, level)
            .unwrap()
            .len()
            .min(whole);
        pos_total += pos;
        let mut cands: Vec<usize> = vec![i];
        if let Some(s) = delta::sketch(&c.data) {
            for x in s.0 {
                if let Some(&j) = sf.get(&x)
                    && !cands.contains(&j)
                {
                    cands.push(j);
                }
            }
        }
        let sim = cands[1..]
            .iter()
            .map(|&j| delta::encode(&c1[j].data, &c.data, level).unwrap().len())
            .min()
            .unwrap_or(whole)
            .min(whole);
        sim_total += sim;
        best_total += pos.min(sim);
        let mut cat = Vec::new();
        for &j in cands.iter().take(4) {
            cat.extend_from_slice(&c1[j].data);
        }
        if i + 1 < c1.len() {
            cat.extend_from_slice(&c1[i + 1].data);
        }
        if i > 0 {
            cat.extend_from_slice(&c1[i - 1].data);
        }
        cat_total += delta::encode(&cat, &c.data, level)
            .unwrap()
            .len()
            .min(whole);
    }
    eprintln!(
        "delta positional {pos_total} similar {sim_total} best-of {best_total} concat {cat_total} ({:?})",
        t.elapsed()
    );
    // Block index of v1: aligned 4 KiB blocks (file offsets) -> (chunk index, offset in chunk).
    let mut blocks: HashMap<[u8; 16], (usize, usize)> = HashMap::new();
    for (i, c) in c1.iter().enumerate() {
        let mut o = ((4096 - (c.off % 4096)) % 4096) as usize;
        while o + 4096 <= c.data.len() {
            let h: [u8; 16] = blake3::hash(&c.data[o..o + 4096]).as_bytes()[..16]
                .try_into()
                .unwrap();
            blocks.entry(h).or_insert((i, o));
            o += 4096;
        }
    }
    let (mut a_total, mut b_total, mut unmatched_raw) = (0usize, 0usize, 0usize);
    let mut unmatched = Vec::new();
    let t = std::time::Instant::now();
    for c in &need {
        let whole = zstd::bulk::compress(&c.data, level)
            .unwrap()
            .len()
            .min(c.data.len());
        let mut o = ((4096 - (c.off % 4096)) % 4096) as usize;
        let mut src_chunks: Vec<usize> = Vec::new();
        let mut exact = Vec::new();
        let mut last = 0usize;
        while o + 4096 <= c.data.len() {
            let h: [u8; 16] = blake3::hash(&c.data[o..o + 4096]).as_bytes()[..16]
                .try_into()
                .unwrap();
            if let Some(&(i, bo)) = blocks.get(&h) {
                if !src_chunks.contains(&i) {
                    src_chunks.push(i);
                }
                exact.extend_from_slice(&c1[i].data[bo..bo + 4096]);
            } else {
                unmatched_raw += 4096;
                unmatched.extend_from_slice(&c.data[o..o + 4096]);
            }
            last = o + 4096;
            o += 4096;
        }
        let _ = last;
        // similar candidate
        let mut sim = None;
        if let Some(s) = delta::sketch(&c.data) {
            for x in s.0 {
                if let Some(&j) = sf.get(&x) {
                    sim = Some(j);
                    break;
                }
            }
        }
        let mut base_a = Vec::new();
        for &i in src_chunks.iter().take(16) {
            base_a.extend_from_slice(&c1[i].data);
        }
        if let Some(j) = sim {
            if !src_chunks.contains(&j) {
                base_a.extend_from_slice(&c1[j].data);
            }
        }
        a_total += if base_a.is_empty() {
            whole
        } else {
            delta::encode(&base_a, &c.data, level)
                .unwrap()
                .len()
                .min(whole)
        };
        let mut base_b = exact;
        if let Some(j) = sim {
            base_b.extend_from_slice(&c1[j].data);
        }
        b_total += if base_b.is_empty() {
            whole
        } else {
            delta::encode(&base_b, &c.data, level)
                .unwrap()
                .len()
                .min(whole)
        };
    }
    let uz = zstd::bulk::compress(&unmatched, level).unwrap().len();
    // C: groups of consecutive needed chunks in one frame, base = union of candidates.
    let group: usize = std::env::var("GROUP")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    let cap: usize = std::env::var("CAP")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let t2 = std::time::Instant::now();
    let (mut c_total, mut c_nobase) = (0usize, 0usize);
    for g in need.chunks(group) {
        let mut cands: Vec<usize> = Vec::new();
        let mut data = Vec::new();
        for c in g {
            data.extend_from_slice(&c.data);
            let mut o = ((4096 - (c.off % 4096)) % 4096) as usize;
            while o + 4096 <= c.data.len() {
                let h: [u8; 16] = blake3::hash(&c.data[o..o + 4096]).as_bytes()[..16]
                    .try_into()
                    .unwrap();
                if let Some(&(i, _)) = blocks.get(&h)
                    && !cands.contains(&i)
                {
                    cands.push(i);
                }
                o += 4096;
            }
            if let Some(s) = delta::sketch(&c.data) {
                for x in s.0 {
                    if let Some(&j) = sf.get(&x) {
                        if !cands.contains(&j) {
                            cands.push(j);
                        }
                        break;
                    }
                }
            }
        }
        let mut base = Vec::new();
        for &i in cands.iter().take(cap) {
            base.extend_from_slice(&c1[i].data);
        }
        c_total += delta::encode(&base, &data, level).unwrap().len();
        c_nobase += zstd::bulk::compress(&data, level).unwrap().len();
    }
    eprintln!(
        "groups of {group} (cap {cap}): with base {c_total}, no base {c_nobase} ({:?})",
        t2.elapsed()
    );
    eprintln!(
        "blocks: A(chunks of matched blocks) {a_total} B(exact blocks+similar) {b_total}; unmatched blocks raw {unmatched_raw} -> zstd {uz} ({:?})",
        t.elapsed()
    );
}
