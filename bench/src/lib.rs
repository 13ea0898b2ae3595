//! What the benchmarks share: the input every stage is measured on.

use std::path::Path;

/// `size` bytes like a VM disk's data, the same on every run on this machine: 1 MiB regions
/// alternating random bytes and real binaries (the files under `/usr/lib` and `/usr/bin`
/// concatenated in name order), every eighth region zeros.
pub fn mixed_sample(size: usize) -> Vec<u8> {
    let mut binaries = Vec::with_capacity(size / 2 + (1 << 20));
    for dir in ["/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/lib"] {
        collect_files(Path::new(dir), &mut binaries, size / 2 + (1 << 20));
    }
    let mut random = seedcast::synth::Stream::new("bench mixed sample");
    let mut out = vec![0u8; size];
    let mut from_bin = 0usize;
    for (i, region) in out.chunks_mut(1 << 20).enumerate() {
        match i % 8 {
            7 => {}
            n if n % 2 == 0 || binaries.is_empty() => random.fill(region),
            _ => {
                for b in region.iter_mut() {
                    *b = binaries[from_bin % binaries.len()];
                    from_bin += 1;
                }
            }
        }
    }
    out
}

/// Append regular files under `dir` (sorted, not following links) until `out` holds `want`.
fn collect_files(dir: &Path, out: &mut Vec<u8>, want: usize) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = rd.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if out.len() >= want {
            return;
        }
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.is_file()
            && let Ok(bytes) = std::fs::read(&p)
        {
            let n = bytes.len().min(want - out.len());
            out.extend_from_slice(&bytes[..n]);
        }
    }
}
