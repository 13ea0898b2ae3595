//! zstd one-shot compression and decompression with one context per thread, reused.
//!
//! `zstd::bulk::compress` and `decompress` create a context per call. Per chunk (tens of
//! KiB) that is a large share of the work: creating and zeroing a compression context was
//! ~9 % of a client's CPU while ingesting (`perf`, `docs/BENCHMARKS.md`), a decompression
//! context ~2–4 % of an engine's while verifying uploads. A context is reset between
//! frames, so the bytes produced are the same as a fresh context's.

use std::cell::RefCell;
use std::io;

use zstd::bulk::{Compressor, Decompressor};

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<Decompressor<'static>>> = const { RefCell::new(None) };
}

/// `data` as one zstd frame at `level` (what `zstd::bulk::compress` returns).
pub fn compress(data: &[u8], level: i32) -> io::Result<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        match &mut *c {
            Some((l, z)) if *l == level => z.compress(data),
            slot => {
                let mut z = Compressor::new(level)?;
                let out = z.compress(data);
                *slot = Some((level, z));
                out
            }
        }
    })
}

/// The frame `data` decoded into at most `capacity` bytes (what `zstd::bulk::decompress`
/// returns): a frame claiming more is an error, never a larger allocation.
pub fn decompress(data: &[u8], capacity: usize) -> io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        let z = match &mut *d {
            Some(z) => z,
            slot => slot.insert(Decompressor::new()?),
        };
        z.decompress(data, capacity)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::noise;

    #[test]
    fn reused_contexts_give_a_fresh_contexts_bytes() {
        let text: Vec<u8> = (0..20_000)
            .flat_map(|i| format!("row {i}\n").into_bytes())
            .collect();
        for (data, level) in [
            (&text[..], 3),
            (&noise(1, 70_000)[..], 3),
            (&text[..5000], 19),
            (&text[..], 3),
        ] {
            let ours = compress(data, level).unwrap();
            assert_eq!(ours, zstd::bulk::compress(data, level).unwrap());
            assert_eq!(decompress(&ours, data.len()).unwrap(), data);
        }
        // Too small a capacity is an error; the context is usable after it.
        let f = compress(&text, 3).unwrap();
        assert!(decompress(&f, text.len() - 1).is_err());
        assert!(decompress(b"not a frame", 100).is_err());
        assert_eq!(decompress(&f, text.len()).unwrap(), text);
    }
}
