//! seedcast-qemu: disk images through qemu's own tools — never a hand-written parser of
//! their formats.
//!
//! - [`info`] and [`map`]: `qemu-img info` / `qemu-img map --output=json` (format, virtual
//!   size, and which extents hold data and which read as zeros).
//! - [`Export`]: a FUSE export of an image's guest view by `qemu-storage-daemon`: a plain file
//!   whose bytes are what the VM sees (read-only, or writable for building overlays).
//! - [`GuestReader`]: the guest view as a sequential reader that never reads zero extents
//!   from the image (it fills them in memory).
//! - [`convert`], [`create_overlay`], [`check`], [`compare`]: `qemu-img` itself.
//!
//! All calls block (they run a process): call them from a blocking thread.

mod export;
mod img;
mod reader;

pub use export::Export;
pub use img::{
    Compression, ConvertOptions, Extent, Info, check, compare, convert, create_overlay, info, map,
};
pub use reader::GuestReader;

use std::path::{Path, PathBuf};

/// The image formats seedcast reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    /// The name qemu's tools use.
    pub fn as_str(&self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// A qemu tool failed or answered something unexpected.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("cannot run {tool}: {source} (is qemu-utils installed?)")]
    Spawn {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} {args} failed: {stderr}")]
    Failed {
        tool: &'static str,
        args: String,
        stderr: String,
    },
    #[error("{tool}: unexpected output: {why}")]
    Output { tool: &'static str, why: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest view of {image} did not appear within {secs} s: {why}")]
    ExportTimeout {
        image: PathBuf,
        secs: u64,
        why: String,
    },
}

impl QemuError {
    pub(crate) fn io<'a>(
        what: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(std::io::Error) -> QemuError + 'a {
        move |source| QemuError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The first bytes of every qcow2 image.
pub const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// Is the file at `path` a qcow2 image (by its magic; qemu's probing of raw files is not
/// trusted)?
pub fn is_qcow2(path: &Path) -> Result<bool, QemuError> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(QemuError::io("open", path))?;
    let mut magic = [0u8; 4];
    match f.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == QCOW2_MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(QemuError::io("read", path)(e)),
    }
}

/// The length of what a reader of `path` sees: a qcow2 image's virtual size, a raw file's
/// length.
pub fn guest_len(path: &Path) -> Result<u64, QemuError> {
    if is_qcow2(path)? {
        Ok(info(path, Format::Qcow2)?.virtual_size)
    } else {
        Ok(std::fs::metadata(path)
            .map_err(QemuError::io("stat", path))?
            .len())
    }
}
