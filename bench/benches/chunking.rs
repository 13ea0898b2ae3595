//! Micro benchmarks of the ingest path, each beside its baseline in one run:
//! - `cut`: seedcast's streaming chunker (FastCDC v2020 plus zero-run holes) against the
//!   fastcdc crate's own `StreamCDC` over the same bytes (same 16/64/256 KiB parameters);
//! - `name`: chunk + BLAKE3 per chunk, the client's whole local pass.
//!
//! `cargo bench -p seedcast-bench --bench chunking`

use std::io::Cursor;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use seedcast_core::chunker::{ChunkerConfig, Piece, StreamingChunker};

/// 64 MiB like a disk image's data: text-like, random, and zero regions of 1 MiB.
fn sample() -> Vec<u8> {
    let mut s = seedcast::synth::Stream::new("bench sample");
    let mut out = vec![0u8; 64 << 20];
    for (i, region) in out.chunks_mut(1 << 20).enumerate() {
        match i % 4 {
            0 | 1 => seedcast::synth::text_like(&mut s, region),
            2 => s.fill(region),
            _ => {}
        }
    }
    out
}

fn bench(c: &mut Criterion) {
    let data = sample();
    let mut g = c.benchmark_group("cut");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    g.bench_function("seedcast StreamingChunker", |b| {
        b.iter(|| {
            StreamingChunker::new(Cursor::new(&data), ChunkerConfig::default())
                .unwrap()
                .map(|r| r.unwrap().1.len())
                .sum::<u64>()
        })
    });
    g.bench_function("fastcdc StreamCDC (baseline)", |b| {
        b.iter(|| {
            fastcdc::v2020::StreamCDC::new(Cursor::new(&data), 16384, 65536, 262144)
                .map(|r| r.unwrap().length as u64)
                .sum::<u64>()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("name");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    g.bench_function("seedcast cut + BLAKE3 data pieces", |b| {
        b.iter(|| {
            let mut n = 0u64;
            for r in StreamingChunker::new(Cursor::new(&data), ChunkerConfig::default()).unwrap() {
                if let (_, Piece::Data(d)) = r.unwrap() {
                    n ^= blake3::hash(&d).as_bytes()[0] as u64;
                }
            }
            n
        })
    });
    g.bench_function("fastcdc StreamCDC + BLAKE3 every chunk (baseline)", |b| {
        b.iter(|| {
            let mut n = 0u64;
            for ch in fastcdc::v2020::StreamCDC::new(Cursor::new(&data), 16384, 65536, 262144) {
                n ^= blake3::hash(&ch.unwrap().data).as_bytes()[0] as u64;
            }
            n
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
