//! What the adapters that keep images as local files share: the `.seedcast.json` sidecar
//! that says what each published file is, writing a staged raw disk as qcow2 with
//! `qemu-img`, and reading a published file back as the bytes its recipe describes (a
//! qcow2 disk through a guest-view export).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use seedcast_core::manifest::FileFormat;
use seedcast_qemu::{Compression, ConvertOptions, Export, Format};
use serde::{Deserialize, Serialize};

use crate::adapter::{AdapterError, AssembledImage, ReadBack};

/// The sidecar's name in each published image directory (hidden: not an image file).
pub(crate) const SIDECAR: &str = ".seedcast.json";

/// How one file of the image is kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Stored {
    /// The file in the image directory.
    pub path: String,
    /// `raw` or `qcow2`.
    pub format: String,
    /// A qcow2 overlay's backing file, relative to the image directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<String>,
}

/// What an image directory holds, for operators and for reading it back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Sidecar {
    pub global_id: String,
    pub version: u32,
    pub name: String,
    pub manifest_id: String,
    /// By the file's name in the image. Absent in directories published before files had
    /// formats: then every file is raw under its own name.
    #[serde(default)]
    pub files: BTreeMap<String, Stored>,
}

impl Sidecar {
    pub fn of(image: &AssembledImage) -> Sidecar {
        Sidecar {
            global_id: image.global_id.to_string(),
            version: image.version,
            name: image.name.clone(),
            manifest_id: hex::encode(image.manifest_id),
            files: BTreeMap::new(),
        }
    }

    /// Write it into `dir`, synced.
    pub fn write(&self, dir: &Path) -> Result<(), AdapterError> {
        let p = dir.join(SIDECAR);
        let text = serde_json::to_string_pretty(self).expect("plain data");
        fs::write(&p, format!("{text}\n")).map_err(AdapterError::io("write", &p))?;
        fs::File::open(&p)
            .and_then(|f| f.sync_all())
            .map_err(AdapterError::io("sync", &p))
    }

    pub fn read(dir: &Path) -> Result<Sidecar, AdapterError> {
        let p = dir.join(SIDECAR);
        let text = fs::read(&p).map_err(AdapterError::io("read", &p))?;
        serde_json::from_slice(&text).map_err(|e| {
            AdapterError::Service(format!("{}: not a seedcast sidecar: {e}", p.display()))
        })
    }

    /// How `file` is kept (a raw file of that name when the sidecar predates formats).
    pub fn stored(&self, file: &str) -> Stored {
        self.files.get(file).cloned().unwrap_or_else(|| Stored {
            path: file.to_string(),
            format: FileFormat::Raw.as_str().into(),
            backing: None,
        })
    }
}

/// Sync a directory, so a rename into it is durable.
pub(crate) fn sync_dir(p: &Path) -> Result<(), AdapterError> {
    fs::File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(AdapterError::io("sync", p))
}

/// Write the staged raw disk `src` as the qcow2 image `dst` (zero regions stay
/// unallocated), then remove `src`. Blocking.
pub(crate) fn raw_to_qcow2(
    src: &Path,
    dst: &Path,
    compression: Option<Compression>,
) -> Result<(), AdapterError> {
    let opts = ConvertOptions { compression };
    seedcast_qemu::convert(src, Format::Raw, dst, Format::Qcow2, &opts)?;
    fs::File::open(dst)
        .and_then(|f| f.sync_all())
        .map_err(AdapterError::io("sync", dst))?;
    fs::remove_file(src).map_err(AdapterError::io("remove", src))?;
    Ok(())
}

/// `file` of the image published in `dir` (known as `local_id`), as its recipe's bytes.
pub(crate) async fn read_back(
    dir: PathBuf,
    local_id: &str,
    file: &str,
) -> Result<ReadBack, AdapterError> {
    let no_such = || AdapterError::NoSuchFile {
        local_id: local_id.to_string(),
        file: file.to_string(),
    };
    seedcast_core::manifest::validate_file_name(file).map_err(|_| no_such())?;
    let sidecar = Sidecar::read(&dir)?;
    let stored = sidecar.stored(file);
    if !sidecar.files.is_empty() && !sidecar.files.contains_key(file) {
        return Err(no_such());
    }
    let p = dir.join(&stored.path);
    if !p.is_file() {
        return Err(no_such());
    }
    if stored.format == FileFormat::Qcow2.as_str() {
        let export =
            tokio::task::spawn_blocking(move || Export::open(&p, Format::Qcow2, false)).await??;
        return Ok(ReadBack::Exported(export));
    }
    Ok(ReadBack::InPlace(p))
}

/// A file as a stream of chunks of `size` bytes, for an upload that keeps one chunk in
/// memory at a time.
pub(crate) fn file_chunks(
    file: tokio::fs::File,
    size: usize,
) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
    use tokio::io::AsyncReadExt;
    futures::stream::unfold(Some(file), move |state| async move {
        let mut f = state?;
        let mut buf = vec![0u8; size];
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..]).await {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => return Some((Err(e), None)),
            }
        }
        if n == 0 {
            return None;
        }
        buf.truncate(n);
        Some((Ok(bytes::Bytes::from(buf)), Some(f)))
    })
}

/// SHA-256 and SHA-512 of a file (hex), read once. Blocking.
pub(crate) fn sha256_sha512(p: &Path) -> Result<(String, String), AdapterError> {
    use sha2::Digest;
    use std::io::Read;
    let (mut a, mut b) = (sha2::Sha256::new(), sha2::Sha512::new());
    let mut f = fs::File::open(p).map_err(AdapterError::io("open", p))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(AdapterError::io("read", p))?;
        if n == 0 {
            break;
        }
        a.update(&buf[..n]);
        b.update(&buf[..n]);
    }
    Ok((hex::encode(a.finalize()), hex::encode(b.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sidecar_without_files_means_raw_files_by_their_names() {
        let old = r#"{"global_id":"sc-1","version":1,"name":"n","manifest_id":"00"}"#;
        let s: Sidecar = serde_json::from_str(old).unwrap();
        assert_eq!(
            s.stored("disk.raw"),
            Stored {
                path: "disk.raw".into(),
                format: "raw".into(),
                backing: None
            }
        );
    }
}
