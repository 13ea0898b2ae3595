//! `qemu-img`: info, extent maps, conversion, overlays, checks and comparisons.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

use serde::Deserialize;

use crate::{Format, QemuError};

const QEMU_IMG: &str = "qemu-img";

/// Run `qemu-img` with `args`; its output, or an error carrying its stderr.
fn qemu_img<I, S>(args: I) -> Result<Output, QemuError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = Command::new(QEMU_IMG)
        .args(&args)
        .output()
        .map_err(|source| QemuError::Spawn {
            tool: QEMU_IMG,
            source,
        })?;
    Ok(out)
}

fn failed(args: &[&OsStr], out: &Output) -> QemuError {
    QemuError::Failed {
        tool: QEMU_IMG,
        args: args
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" "),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    }
}

/// Run `qemu-img`, requiring success.
fn run(args: &[&OsStr]) -> Result<Output, QemuError> {
    let out = qemu_img(args)?;
    if !out.status.success() {
        return Err(failed(args, &out));
    }
    Ok(out)
}

fn json<T: for<'de> Deserialize<'de>>(out: &Output) -> Result<T, QemuError> {
    serde_json::from_slice(&out.stdout).map_err(|e| QemuError::Output {
        tool: QEMU_IMG,
        why: e.to_string(),
    })
}

/// What `qemu-img info` says of an image.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Info {
    pub format: String,
    /// The guest-visible size.
    pub virtual_size: u64,
    /// Bytes the image file occupies on disk.
    pub actual_size: Option<u64>,
    pub cluster_size: Option<u64>,
    pub backing_filename: Option<String>,
}

/// `qemu-img info` of `path` read as `format` (never probed: a raw file could claim any).
pub fn info(path: &Path, format: Format) -> Result<Info, QemuError> {
    let out = run(&[
        "info".as_ref(),
        "--output=json".as_ref(),
        "-f".as_ref(),
        format.as_str().as_ref(),
        path.as_os_str(),
    ])?;
    json(&out)
}

/// One extent of an image's guest view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    /// The image (or its backing chain) holds data for it.
    pub data: bool,
    /// It reads as zeros (known without reading it).
    pub zero: bool,
}

/// `qemu-img map --output=json`: the guest view's extents in order, covering it whole.
pub fn map(path: &Path, format: Format) -> Result<Vec<Extent>, QemuError> {
    let out = run(&[
        "map".as_ref(),
        "--output=json".as_ref(),
        "-f".as_ref(),
        format.as_str().as_ref(),
        path.as_os_str(),
    ])?;
    let extents: Vec<Extent> = json(&out)?;
    let mut at = 0;
    for e in &extents {
        if e.start != at {
            return Err(QemuError::Output {
                tool: QEMU_IMG,
                why: format!(
                    "map has a gap or overlap at {at} (next extent at {})",
                    e.start
                ),
            });
        }
        at += e.length;
    }
    Ok(extents)
}

/// Compression of written qcow2 clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Zstd,
}

/// How [`convert`] writes its output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConvertOptions {
    /// Compress the clusters (qcow2 output only).
    pub compression: Option<Compression>,
}

/// `qemu-img convert`: `src` (read as `from`) written to `dst` as `to`. Zero and unallocated
/// regions are not written (sparse in, sparse out).
pub fn convert(
    src: &Path,
    from: Format,
    dst: &Path,
    to: Format,
    opts: &ConvertOptions,
) -> Result<(), QemuError> {
    let mut args: Vec<&OsStr> = vec![
        "convert".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        from.as_str().as_ref(),
        "-O".as_ref(),
        to.as_str().as_ref(),
    ];
    if let (Some(Compression::Zstd), Format::Qcow2) = (opts.compression, to) {
        let compressed: [&OsStr; 3] = [
            "-c".as_ref(),
            "-o".as_ref(),
            "compression_type=zstd".as_ref(),
        ];
        args.extend(compressed);
    }
    args.push(src.as_os_str());
    args.push(dst.as_os_str());
    run(&args).map(|_| ())
}

/// A new qcow2 image at `path` of `size` bytes whose unwritten clusters read through to
/// `backing` (a qcow2 path, relative to `path`'s directory).
pub fn create_overlay(path: &Path, backing: &str, size: u64) -> Result<(), QemuError> {
    let size = size.to_string();
    run(&[
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-b".as_ref(),
        backing.as_ref(),
        "-F".as_ref(),
        "qcow2".as_ref(),
        path.as_os_str(),
        size.as_ref(),
    ])
    .map(|_| ())
}

/// `qemu-img check`: Ok when the image is consistent (no corruption, no leaked clusters).
pub fn check(path: &Path, format: Format) -> Result<(), QemuError> {
    run(&[
        "check".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        format.as_str().as_ref(),
        path.as_os_str(),
    ])
    .map(|_| ())
}

/// `qemu-img compare`: do the two images show the guest the same bytes?
pub fn compare(a: &Path, af: Format, b: &Path, bf: Format) -> Result<bool, QemuError> {
    let args: [&OsStr; 8] = [
        "compare".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        af.as_str().as_ref(),
        "-F".as_ref(),
        bf.as_str().as_ref(),
        a.as_os_str(),
        b.as_os_str(),
    ];
    let out = qemu_img(args)?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(failed(&args, &out)),
    }
}
