//! What each measured figure is judged against, measured on the same bytes in the same run:
//! the machine's stage limits (read, BLAKE3, zstd on every core; the chunker on one) and
//! the loopback limit (the same bytes through plain quinn streams doing no other work).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use seedcast_core::ChunkerConfig;
use seedcast_core::chunker::{Piece, StreamingChunker};
use seedcast_net::endpoint::TransportOptions;
use seedcast_net::pki::EnginePki;
use seedcast_qemu::GuestReader;
use serde::Serialize;

use super::BenchError;

/// Seconds each ingest stage takes over the whole image on this machine.
#[derive(Debug, Clone, Serialize)]
pub struct StageLimits {
    /// Threads the parallel stages used (the machine's cores).
    pub threads: usize,
    /// Data chunks the image cuts into (holes excluded).
    pub chunks: u64,
    /// Reading the image file whole (page cache as it is), every core.
    pub read_secs: f64,
    /// Reading the guest view and cutting it (FastCDC, holes recognised): one core, as the
    /// chunker of one file is sequential.
    pub cut_secs: f64,
    /// BLAKE3 of every data chunk (its id), every core.
    pub blake3_secs: f64,
    /// zstd of every data chunk at the stored level, every core.
    pub zstd_secs: f64,
    pub zstd_level: i32,
    /// Writing `disk_write_bytes` of incompressible data to a file beside the sites' data
    /// and syncing it: the disk every site on this machine writes its copy and its cache to.
    pub disk_write_secs: f64,
    pub disk_write_bytes: u64,
}

impl StageLimits {
    /// The disk's sustained write rate, bytes per second.
    pub fn disk_rate(&self) -> f64 {
        self.disk_write_bytes as f64 / self.disk_write_secs.max(1e-9)
    }

    /// The slowest of the stages a pipelined ingest runs on every core: its name and
    /// seconds. The best a pipelined ingest could do here is this stage's time.
    pub fn slowest_parallel(&self) -> (&'static str, f64) {
        [
            ("read", self.read_secs),
            ("blake3", self.blake3_secs),
            ("zstd", self.zstd_secs),
        ]
        .into_iter()
        .fold(("read", 0.0), |a, b| if b.1 > a.1 { b } else { a })
    }
}

/// Chunks held in memory at once while measuring hashing and compression.
const SPAN_BYTES: usize = 256 << 20;

/// Measure every stage over `image` (its guest view when it is a qcow2 disk), and the
/// disk under `scratch` with `disk_bytes` of writes.
pub fn stage_limits(
    image: &Path,
    cfg: ChunkerConfig,
    zstd_level: i32,
    scratch: &Path,
    disk_bytes: u64,
) -> Result<StageLimits, BenchError> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let read_secs = read_all_cores(image, threads)?;
    let disk_write_secs = disk_write(&scratch.join("disk-limit.bin"), disk_bytes)?;

    let mut limits = StageLimits {
        threads,
        chunks: 0,
        read_secs,
        cut_secs: 0.0,
        blake3_secs: 0.0,
        zstd_secs: 0.0,
        zstd_level,
        disk_write_secs,
        disk_write_bytes: disk_bytes,
    };
    let reader = GuestReader::open(image).map_err(|e| BenchError::Image(e.to_string()))?;
    let chunker =
        StreamingChunker::new(reader, cfg).map_err(|e| BenchError::Image(e.to_string()))?;
    let mut span: Vec<Bytes> = Vec::new();
    let mut span_len = 0usize;
    let mut t = Instant::now();
    for piece in chunker {
        let (_, piece) = piece?;
        if let Piece::Data(b) = piece {
            span_len += b.len();
            span.push(b);
            if span_len >= SPAN_BYTES {
                limits.cut_secs += t.elapsed().as_secs_f64();
                measure_span(&std::mem::take(&mut span), threads, &mut limits);
                span_len = 0;
                t = Instant::now();
            }
        }
    }
    limits.cut_secs += t.elapsed().as_secs_f64();
    measure_span(&span, threads, &mut limits);
    Ok(limits)
}

/// Hash and compress one span of chunks on `threads` threads, adding the times.
fn measure_span(span: &[Bytes], threads: usize, limits: &mut StageLimits) {
    limits.chunks += span.len() as u64;
    let level = limits.zstd_level;
    limits.blake3_secs += on_threads(span, threads, |c| {
        std::hint::black_box(blake3::hash(c));
    });
    // One context per thread, reused, as the client compresses: the best zstd does here.
    limits.zstd_secs += on_threads(span, threads, |c| {
        std::hint::black_box(
            seedcast_core::zstd_ctx::compress(c, level)
                .map(|v| v.len())
                .ok(),
        );
    });
}

/// Run `f` over every chunk, chunk i on thread i mod `threads`; the wall seconds.
fn on_threads(span: &[Bytes], threads: usize, f: impl Fn(&[u8]) + Sync) -> f64 {
    let t = Instant::now();
    std::thread::scope(|s| {
        for k in 0..threads {
            let f = &f;
            s.spawn(move || {
                for c in span.iter().skip(k).step_by(threads) {
                    f(c);
                }
            });
        }
    });
    t.elapsed().as_secs_f64()
}

/// Write `bytes` of incompressible data to `path` in 4 MiB writes, sync it, remove it; the
/// seconds to the end of the sync.
fn disk_write(path: &Path, bytes: u64) -> Result<f64, BenchError> {
    use std::io::Write;
    let mut block = vec![0u8; 4 << 20];
    crate::synth::Stream::new("disk limit").fill(&mut block);
    let t = Instant::now();
    let mut f = File::create(path)?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    let secs = t.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(path)?;
    Ok(secs)
}

/// Read the whole file on `threads` threads (each its own stripe of 4 MiB blocks).
fn read_all_cores(path: &Path, threads: usize) -> Result<f64, BenchError> {
    const BLOCK: u64 = 4 << 20;
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    let t = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads as u64)
            .map(|k| {
                let f = &f;
                s.spawn(move || -> std::io::Result<()> {
                    let mut buf = vec![0u8; BLOCK as usize];
                    let mut off = k * BLOCK;
                    while off < len {
                        let n = (len - off).min(BLOCK) as usize;
                        f.read_exact_at(&mut buf[..n], off)?;
                        off += BLOCK * threads as u64;
                    }
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(std::io::Error::other("panic")))
        })
    })?;
    Ok(t.elapsed().as_secs_f64())
}

/// Send `bytes_each` over one plain quinn stream on each of `conns` connections from one
/// server endpoint (as the engine's) to `conns` client endpoints (as the agents'), with
/// seedcast's transport settings and TLS, receivers discarding. Returns the wall seconds
/// until every receiver has read everything.
pub async fn quic_loopback(conns: usize, bytes_each: u64) -> Result<f64, BenchError> {
    let err = |e: &dyn std::fmt::Display| BenchError::Loopback(e.to_string());
    let pki_dir = tempfile::tempdir()?;
    let pki = EnginePki::load_or_create(pki_dir.path(), false).map_err(|e| err(&e))?;
    let opts = TransportOptions::default();
    let sc = seedcast_net::tls::server_config(&pki, &opts).map_err(|e| err(&e))?;
    let server =
        seedcast_net::endpoint::server("127.0.0.1:0".parse().expect("literal"), sc, &opts)?;
    let addr = server.local_addr()?;
    let block = {
        let mut b = vec![0u8; 1 << 20];
        crate::synth::Stream::new("loopback limit").fill(&mut b);
        Bytes::from(b)
    };

    let t = Instant::now();
    let srv = server.clone();
    let sender = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..conns {
            let Some(inc) = srv.accept().await else { break };
            let block = block.clone();
            tasks.push(tokio::spawn(async move {
                let conn = inc.await?;
                let mut s = conn.open_uni().await?;
                let mut left = bytes_each;
                while left > 0 {
                    let n = left.min(block.len() as u64) as usize;
                    s.write_chunk(block.slice(..n)).await?;
                    left -= n as u64;
                }
                s.finish()?;
                // Hold the connection until the receiver has read everything and closed it.
                conn.closed().await;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    let cc = Arc::new(
        seedcast_net::tls::client_config(pki.fingerprint(), None, &opts).map_err(|e| err(&e))?,
    );
    let mut receivers = Vec::new();
    for _ in 0..conns {
        let ep = seedcast_net::endpoint::client(addr, &opts)?;
        let cc = (*cc).clone();
        receivers.push(tokio::spawn(async move {
            let conn = ep
                .connect_with(cc, addr, seedcast_core::protocol::SERVER_NAME)?
                .await?;
            let mut r = conn.accept_uni().await?;
            let mut got = 0u64;
            while let Some(c) = r.read_chunk(usize::MAX, true).await? {
                got += c.bytes.len() as u64;
            }
            conn.close(0u32.into(), b"done");
            ep.wait_idle().await;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(got)
        }));
    }
    for r in receivers {
        let got = r.await.map_err(|e| err(&e))?.map_err(|e| err(&e))?;
        if got != bytes_each {
            return Err(BenchError::Loopback(format!(
                "a receiver got {got} bytes of {bytes_each}"
            )));
        }
    }
    let secs = t.elapsed().as_secs_f64();
    sender.abort();
    server.close(0u32.into(), b"done");
    Ok(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_cover_the_image_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.raw");
        let data = crate::synth::write_disk(&p, 16 << 20, "limits").unwrap();
        let l = stage_limits(&p, ChunkerConfig::default(), 3, dir.path(), 8 << 20).unwrap();
        // Every data chunk is between the chunker's bounds, so the count bounds the data.
        assert!(l.chunks >= data / (256 << 10) && l.chunks <= data / (16 << 10) + 16);
        for s in [
            l.read_secs,
            l.cut_secs,
            l.blake3_secs,
            l.zstd_secs,
            l.disk_write_secs,
        ] {
            assert!(s > 0.0);
        }
        assert_eq!(l.disk_write_bytes, 8 << 20);
        assert!(
            !dir.path().join("disk-limit.bin").exists(),
            "scratch removed"
        );
        assert!(
            l.zstd_secs > l.blake3_secs,
            "zstd 3 is slower than BLAKE3: {l:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loopback_moves_every_byte() {
        let secs = quic_loopback(2, 8 << 20).await.unwrap();
        assert!(secs > 0.0 && secs < 60.0);
    }
}
