//! Deterministic synthetic VM-image-like files for the demo, tests and benchmarks.
//!
//! A disk is made of 1 MiB regions, each chosen by a seeded BLAKE3 stream: unused space
//! (zeros, ~40 %), text-like data (config files, logs, scripts: compressible, ~32 %),
//! incompressible data (compressed packages, ~13 %), and copies of earlier regions
//! (duplicated files, ~15 %). Real images behave much the same: mostly holes, then a mix of
//! compressible and packed data with some repetition (see `../shared/testdata` for real
//! Debian images, used by the benchmarks).

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

const REGION: usize = 1 << 20;

/// A seeded byte stream.
#[derive(Debug)]
pub struct Stream(blake3::OutputReader);

impl Stream {
    pub fn new(seed: &str) -> Self {
        Stream(blake3::Hasher::new().update(seed.as_bytes()).finalize_xof())
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        self.0.fill(buf);
    }

    pub fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.0.fill(&mut b);
        u32::from_le_bytes(b)
    }
}

const WORDS: &[&str] = &[
    "the",
    "kernel",
    "module",
    "config",
    "service",
    "root",
    "usr",
    "lib",
    "systemd",
    "unit",
    "network",
    "interface",
    "eth0",
    "address",
    "default",
    "enable",
    "true",
    "false",
    "daemon",
    "log",
    "error",
    "warning",
    "info",
    "package",
    "version",
    "debian",
    "bookworm",
    "amd64",
    "install",
    "path",
    "/etc/",
    "/var/lib/",
    "=",
    ";",
    "{",
    "}",
    "\n",
    "    ",
    "#",
    "0x1f",
    "return",
    "if",
    "else",
    "fn",
    "let",
    "mut",
    "struct",
    "impl",
    "python3",
    "openssl",
];

/// Text-like bytes: words drawn from a small vocabulary (compresses ~3–4×).
pub fn text_like(s: &mut Stream, out: &mut [u8]) {
    let mut i = 0;
    let mut picks = [0u8; 256];
    let mut k = picks.len();
    while i < out.len() {
        if k == picks.len() {
            s.fill(&mut picks);
            k = 0;
        }
        let w = WORDS[picks[k] as usize % WORDS.len()].as_bytes();
        k += 1;
        let n = w.len().min(out.len() - i);
        out[i..i + n].copy_from_slice(&w[..n]);
        i += n;
        if i < out.len() {
            out[i] = b' ';
            i += 1;
        }
    }
}

/// Write a synthetic disk of `size` bytes to `path`, sparse where it is zero.
/// Returns the bytes that are data (not zero regions).
pub fn write_disk(path: &Path, size: u64, seed: &str) -> io::Result<u64> {
    write_disk_share(path, size, seed, 0.6)
}

/// [`write_disk`] with about `data_share` of the regions data (the rest holes): a large
/// disk with little on it is `0.1`.
pub fn write_disk_share(path: &Path, size: u64, seed: &str, data_share: f64) -> io::Result<u64> {
    // Regions rolled below this are holes; above it the kinds keep their proportions.
    let holes = ((1.0 - data_share.clamp(0.0, 1.0)) * 100.0).round() as u32;
    let scale = |x: u32| holes + (x - 40) * (100 - holes) / 60;
    let mut s = Stream::new(seed);
    let mut f = File::create(path)?;
    let regions = size.div_ceil(REGION as u64) as usize;
    let mut made: Vec<Vec<u8>> = Vec::new(); // a few recent data regions, for copies
    let mut buf = vec![0u8; REGION];
    let mut data = 0u64;
    for r in 0..regions {
        let len = (size - (r * REGION) as u64).min(REGION as u64) as usize;
        let roll = s.u32() % 100;
        let kind = match roll {
            r if r < holes => 0,
            r if r < scale(72) => 1,
            r if r < scale(85) => 2,
            _ if !made.is_empty() => 3,
            _ => 1,
        };
        match kind {
            0 => {
                // Leave a hole: seek past it.
                use std::io::Seek;
                f.seek(io::SeekFrom::Current(len as i64))?;
                continue;
            }
            1 => text_like(&mut s, &mut buf[..len]),
            2 => s.fill(&mut buf[..len]),
            _ => {
                let src = &made[s.u32() as usize % made.len()];
                let n = len.min(src.len());
                buf[..n].copy_from_slice(&src[..n]);
            }
        }
        f.write_all(&buf[..len])?;
        data += len as u64;
        if made.len() < 16 {
            made.push(buf[..len].to_vec());
        } else {
            let i = s.u32() as usize % made.len();
            made[i] = buf[..len].to_vec();
        }
    }
    f.set_len(size)?;
    f.sync_all()?;
    Ok(data)
}

/// Write a small file of text-like and random data (a kernel, an initrd, metadata).
pub fn write_blob(path: &Path, size: usize, seed: &str, text_share: f64) -> io::Result<()> {
    let mut s = Stream::new(seed);
    let mut buf = vec![0u8; size];
    let split = (size as f64 * text_share) as usize;
    text_like(&mut s, &mut buf[..split]);
    s.fill(&mut buf[split..]);
    std::fs::write(path, buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_sparse() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        let da = write_disk(&a, 20 << 20, "x").unwrap();
        let db = write_disk(&b, 20 << 20, "x").unwrap();
        assert_eq!(da, db);
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert_eq!(std::fs::metadata(&a).unwrap().len(), 20 << 20);
        assert!(da < 20 << 20 && da > 4 << 20, "data {da}");
    }

    #[test]
    fn the_data_share_is_about_what_is_asked() {
        let d = tempfile::tempdir().unwrap();
        let size = 200u64 << 20;
        for share in [0.1, 0.25, 0.6, 1.0] {
            let p = d.path().join(format!("s{share}"));
            let data = write_disk_share(&p, size, "share", share).unwrap();
            let got = data as f64 / size as f64;
            assert!((got - share).abs() < 0.1, "asked {share}, got {got}");
            assert_eq!(std::fs::metadata(&p).unwrap().len(), size);
        }
        // The default is the 0.6 disk, byte for byte.
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        write_disk(&a, 20 << 20, "x").unwrap();
        write_disk_share(&b, 20 << 20, "x", 0.6).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    }
}
