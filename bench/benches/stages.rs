//! Every stage of the data path on the same input (half random, half real binaries, zero
//! runs: `seedcast_bench::mixed_sample`), each beside the limit it is judged against, in
//! one run:
//! - `hash`: BLAKE3 per chunk (a chunk id) against one BLAKE3 over the buffer, on one and
//!   on two cores (the machine's limit);
//! - `compress`: zstd level 3 per chunk as the client stores chunks, on one core and split
//!   over two, beside a fresh zstd context per chunk (`zstd::bulk`, before `zstd_ctx`); `verify`: decompress and re-hash (what engine and agent do to every chunk);
//! - `delta`: a delta group of 2 MiB of changed chunks against their 2 MiB base at level 19
//!   (as the engine encodes once for all sites), and its decoding at a site;
//! - `sketch`: every chunk's super-features as computed, beside the single gear-hash run
//!   that defines them;
//! - `pack`: the engine's pack store writing and reading every stored chunk, against one
//!   plain file written, synced and read back with the same calls;
//! - `catalog`: chunk records written in batches of 1000, and read back at start;
//! - `frame`: a chunk header frame per chunk, and a manifest of the input.
//!
//! `cargo bench -p seedcast-bench --bench stages`

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use seedcast_core::chunker::chunk_all;
use seedcast_core::manifest::{FileEntry, FileFormat, MANIFEST_FORMAT, RecipeBuilder};
use seedcast_core::protocol::{ChunkHeader, DataRecord, MAX_MESSAGE_SIZE};
use seedcast_core::source::{ChunkSource, ChunkStore};
use seedcast_core::{
    ChunkId, ChunkerConfig, CompressedChunk, GlobalId, Manifest, UnverifiedChunk, VerifiedChunk,
};
use seedcast_engine::catalog::{Catalog, ChunkRecord};
use seedcast_engine::store::PackStore;

const SIZE: usize = 32 << 20;

/// Split `items` in two halves and run `f` on each on its own thread.
fn two_cores<T: Sync>(items: &[T], f: impl Fn(&[T]) -> u64 + Sync) -> u64 {
    let (a, b) = items.split_at(items.len() / 2);
    std::thread::scope(|s| {
        let h = s.spawn(|| f(a));
        f(b) ^ h.join().expect("thread")
    })
}

fn bench(c: &mut Criterion) {
    let data = seedcast_bench::mixed_sample(SIZE);
    let mut rb = RecipeBuilder::new();
    let mut chunks: Vec<Bytes> = Vec::new();
    for p in chunk_all(&data, ChunkerConfig::default()).unwrap() {
        if let Some((_, b)) = rb.push(p) {
            chunks.push(b);
        }
    }
    let recipe = rb.finish();
    let chunk_bytes: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    let joined: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();

    let mut g = c.benchmark_group("hash");
    g.throughput(Throughput::Bytes(chunk_bytes));
    g.sample_size(10);
    g.bench_function("seedcast: BLAKE3 per chunk", |b| {
        b.iter(|| {
            chunks
                .iter()
                .map(|c| ChunkId::of(c).0[0] as u64)
                .sum::<u64>()
        })
    });
    g.bench_function("limit: BLAKE3 one buffer, one core", |b| {
        b.iter(|| blake3::hash(&joined).as_bytes()[0])
    });
    g.bench_function("limit: BLAKE3 per chunk, two cores", |b| {
        b.iter(|| {
            two_cores(&chunks, |cs| {
                cs.iter().map(|c| ChunkId::of(c).0[0] as u64).sum()
            })
        })
    });
    g.finish();

    let ids: Vec<ChunkId> = chunks.iter().map(|c| ChunkId::of(c)).collect();
    let pairs: Vec<(ChunkId, Bytes)> = ids.iter().copied().zip(chunks.iter().cloned()).collect();
    let mut g = c.benchmark_group("compress");
    g.throughput(Throughput::Bytes(chunk_bytes));
    g.sample_size(10);
    g.bench_function("seedcast: zstd 3 per chunk, one core", |b| {
        b.iter(|| {
            pairs
                .iter()
                .map(|(id, raw)| CompressedChunk::compress(*id, raw, 3).payload.len() as u64)
                .sum::<u64>()
        })
    });
    g.bench_function(
        "baseline: zstd 3 per chunk, one core, a fresh context per chunk",
        |b| {
            b.iter(|| {
                pairs
                    .iter()
                    .map(|(_, raw)| zstd::bulk::compress(raw, 3).unwrap().len() as u64)
                    .sum::<u64>()
            })
        },
    );
    g.bench_function("limit: zstd 3 per chunk, two cores", |b| {
        b.iter(|| {
            two_cores(&pairs, |ps| {
                ps.iter()
                    .map(|(id, raw)| CompressedChunk::compress(*id, raw, 3).payload.len() as u64)
                    .sum()
            })
        })
    });
    g.finish();

    let stored: Vec<CompressedChunk> = pairs
        .iter()
        .map(|(id, raw)| CompressedChunk::compress(*id, raw, 3))
        .collect();
    let stored_bytes: u64 = stored.iter().map(|c| c.payload.len() as u64).sum();
    let mut g = c.benchmark_group("verify");
    g.throughput(Throughput::Bytes(chunk_bytes));
    g.sample_size(10);
    g.bench_function("seedcast: decompress + BLAKE3 per chunk", |b| {
        b.iter(|| {
            stored
                .iter()
                .map(|c| {
                    UnverifiedChunk(c.clone())
                        .verify(ChunkerConfig::MAX_CHUNK)
                        .unwrap()
                        .raw()
                        .len() as u64
                })
                .sum::<u64>()
        })
    });
    g.bench_function("limit: zstd decompress only", |b| {
        b.iter(|| {
            stored
                .iter()
                .filter(|c| c.encoding == seedcast_core::Encoding::Zstd)
                .map(|c| {
                    seedcast_core::zstd_ctx::decompress(&c.payload, c.raw_len as usize)
                        .unwrap()
                        .len() as u64
                })
                .sum::<u64>()
        })
    });
    g.bench_function(
        "baseline: zstd decompress only, a fresh context per chunk",
        |b| {
            b.iter(|| {
                stored
                    .iter()
                    .filter(|c| c.encoding == seedcast_core::Encoding::Zstd)
                    .map(|c| {
                        zstd::bulk::decompress(&c.payload, c.raw_len as usize)
                            .unwrap()
                            .len() as u64
                    })
                    .sum::<u64>()
            })
        },
    );
    g.finish();

    // A delta group: 2 MiB of chunks, each changed every 4 KiB, against the originals.
    let mut base = Vec::new();
    let mut targets: Vec<Vec<u8>> = Vec::new();
    for c in chunks.iter().filter(|c| c.len() > 4096) {
        if base.len() >= 2 << 20 {
            break;
        }
        base.extend_from_slice(c);
        let mut t = c.to_vec();
        for i in (100..t.len()).step_by(4096) {
            t[i] ^= 0x5a;
        }
        targets.push(t);
    }
    let target_refs: Vec<&[u8]> = targets.iter().map(|t| t.as_slice()).collect();
    let lens: Vec<u32> = targets.iter().map(|t| t.len() as u32).collect();
    let target_bytes: u64 = lens.iter().map(|l| *l as u64).sum();
    let group = seedcast_core::delta::encode_group(&base, &target_refs, 19).unwrap();
    let mut g = c.benchmark_group("delta");
    g.throughput(Throughput::Bytes(target_bytes));
    g.sample_size(10);
    g.bench_function("seedcast: encode a group, zstd 19 with a 2 MiB base", |b| {
        b.iter(|| {
            seedcast_core::delta::encode_group(&base, &target_refs, 19)
                .unwrap()
                .len()
        })
    });
    g.bench_function("seedcast: decode a group at a site", |b| {
        b.iter(|| {
            seedcast_core::delta::decode_group(&base, &group, &lens)
                .unwrap()
                .len()
        })
    });
    g.bench_function("limit: zstd 19 of the same bytes, no base", |b| {
        let whole: Vec<u8> = targets.concat();
        b.iter(|| zstd::bulk::compress(&whole, 19).unwrap().len())
    });
    g.finish();

    // Indexing a held version as delta bases sketches every chunk (engine: after a site
    // publishes; client: `adapt --base`).
    let mut g = c.benchmark_group("sketch");
    g.throughput(Throughput::Bytes(chunk_bytes));
    g.sample_size(10);
    g.bench_function("seedcast: sketch every chunk, four gear chains", |b| {
        b.iter(|| {
            chunks
                .iter()
                .filter_map(|c| seedcast_core::delta::sketch(c))
                .fold(0u64, |a, s| a ^ s.0[0])
        })
    });
    g.bench_function(
        "baseline: sketch every chunk, one gear chain (as defined)",
        |b| {
            b.iter(|| {
                chunks
                    .iter()
                    .filter_map(|c| seedcast_core::delta::sketch_reference(c))
                    .fold(0u64, |a, s| a ^ s.0[0])
            })
        },
    );
    g.finish();

    let verified: Vec<VerifiedChunk> = stored
        .iter()
        .map(|c| {
            UnverifiedChunk(c.clone())
                .verify(ChunkerConfig::MAX_CHUNK)
                .unwrap()
        })
        .collect();
    let mut g = c.benchmark_group("pack");
    g.throughput(Throughput::Bytes(stored_bytes));
    g.sample_size(10);
    g.bench_function("seedcast: PackStore insert (write, sync, index)", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().unwrap();
                let cat = Arc::new(Catalog::open(&dir.path().join("cat")).unwrap());
                let store = PackStore::open(&dir.path().join("packs"), cat).unwrap();
                (dir, store)
            },
            |(dir, store)| {
                for batch in verified.chunks(512) {
                    store.insert(batch).unwrap();
                }
                drop(store);
                dir
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function(
        "limit: one file, the same bytes written and synced per batch",
        |b| {
            b.iter_batched(
                || tempfile::tempdir().unwrap(),
                |dir| {
                    let mut f = File::create(dir.path().join("plain")).unwrap();
                    for batch in stored.chunks(512) {
                        for c in batch {
                            f.write_all(&c.payload).unwrap();
                        }
                        f.sync_data().unwrap();
                    }
                    dir
                },
                BatchSize::PerIteration,
            )
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let cat = Arc::new(Catalog::open(&dir.path().join("cat")).unwrap());
    let store = PackStore::open(&dir.path().join("packs"), cat).unwrap();
    store.insert(&verified).unwrap();
    let plain = dir.path().join("plain");
    let mut offsets = Vec::new();
    {
        let mut f = File::create(&plain).unwrap();
        let mut at = 0u64;
        for c in &stored {
            f.write_all(&c.payload).unwrap();
            offsets.push((at, c.payload.len()));
            at += c.payload.len() as u64;
        }
    }
    g.bench_function("seedcast: PackStore read every chunk (page cache)", |b| {
        b.iter(|| {
            ids.iter()
                .map(|id| store.read(id).unwrap().payload.len() as u64)
                .sum::<u64>()
        })
    });
    g.bench_function("limit: pread the same ranges of one file", |b| {
        let f = File::open(&plain).unwrap();
        b.iter(|| {
            offsets
                .iter()
                .map(|(at, len)| {
                    let mut buf = vec![0u8; *len];
                    f.read_exact_at(&mut buf, *at).unwrap();
                    buf.len() as u64
                })
                .sum::<u64>()
        })
    });
    g.finish();

    // 10,000 chunk records, as a large push writes them.
    let records: Vec<(ChunkId, ChunkRecord)> = (0..10_000u32)
        .map(|i| {
            (
                ChunkId::of(&i.to_le_bytes()),
                ChunkRecord {
                    pack: 0,
                    offset: i as u64 * 40_000,
                    stored_len: 30_000,
                    raw_len: 65_536,
                    encoding: 1,
                    refs: 1,
                },
            )
        })
        .collect();
    let mut g = c.benchmark_group("catalog");
    g.throughput(Throughput::Elements(records.len() as u64));
    g.sample_size(10);
    g.bench_function("seedcast: chunk records in batches of 1000", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().unwrap();
                let cat = Catalog::open(&dir.path().join("cat")).unwrap();
                (dir, cat)
            },
            |(dir, cat)| {
                for batch in records.chunks(1000) {
                    cat.put_chunks(batch).unwrap();
                }
                (dir, cat)
            },
            BatchSize::PerIteration,
        )
    });
    let cdir = tempfile::tempdir().unwrap();
    let cat = Catalog::open(&cdir.path().join("cat")).unwrap();
    for batch in records.chunks(1000) {
        cat.put_chunks(batch).unwrap();
    }
    g.bench_function("seedcast: every chunk record read at start", |b| {
        b.iter(|| cat.all_chunks().unwrap().len())
    });
    g.finish();

    let headers: Vec<DataRecord> = stored
        .iter()
        .map(|c| DataRecord::Chunk(ChunkHeader::of(c)))
        .collect();
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        global_id: GlobalId([1; 12]),
        version: 1,
        parent: None,
        name: "bench".into(),
        chunking: ChunkerConfig::default(),
        files: vec![FileEntry {
            path: "disk.raw".into(),
            mode: 0o644,
            recipe,
            format: FileFormat::Raw,
        }],
    };
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Elements(headers.len() as u64));
    g.sample_size(10);
    g.bench_function(
        "seedcast: chunk header frame encode + parse, per chunk",
        |b| {
            b.iter(|| {
                headers
                    .iter()
                    .map(|h| {
                        let f = seedcast_core::frame::encode(h, MAX_MESSAGE_SIZE).unwrap();
                        let (back, n): (DataRecord, usize) =
                            seedcast_core::frame::parse(&f, MAX_MESSAGE_SIZE)
                                .unwrap()
                                .unwrap();
                        drop(back);
                        n as u64
                    })
                    .sum::<u64>()
            })
        },
    );
    g.bench_function("seedcast: the input's manifest encode + parse", |b| {
        b.iter(|| {
            let f = seedcast_core::frame::encode(&manifest, MAX_MESSAGE_SIZE).unwrap();
            let (m, _): (Manifest, usize) = seedcast_core::frame::parse(&f, MAX_MESSAGE_SIZE)
                .unwrap()
                .unwrap();
            m.files.len()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
