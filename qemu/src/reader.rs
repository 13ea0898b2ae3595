//! An image's guest view as a sequential reader.
//!
//! A qcow2 image is exported by qemu itself ([`Export`]); its extent map ([`map`]) says
//! which regions read as zeros, and those are filled in memory, never read: an unallocated
//! or zero cluster costs nothing but the zeros the chunker then recognises as a hole. A raw
//! file is read as it is.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::{Export, Extent, Format, QemuError, is_qcow2, map};

/// The bytes a VM sees, in order.
#[derive(Debug)]
pub struct GuestReader {
    file: File,
    /// The regions in order; `None` for a raw file (read as it is).
    extents: Option<Vec<Extent>>,
    /// The extent holding `pos`.
    next: usize,
    pos: u64,
    len: u64,
    format: Format,
    /// Keeps the export mounted while reading.
    _export: Option<Export>,
}

impl GuestReader {
    /// Open `path`: a qcow2 image (detected by its magic) through an export of its guest
    /// view, anything else as raw bytes.
    pub fn open(path: &Path) -> Result<GuestReader, QemuError> {
        if !is_qcow2(path)? {
            let file = File::open(path).map_err(QemuError::io("open", path))?;
            let len = file.metadata().map_err(QemuError::io("stat", path))?.len();
            return Ok(GuestReader {
                file,
                extents: None,
                next: 0,
                pos: 0,
                len,
                format: Format::Raw,
                _export: None,
            });
        }
        let extents = map(path, Format::Qcow2)?;
        let export = Export::open(path, Format::Qcow2, false)?;
        let file = File::open(export.path()).map_err(QemuError::io("open", export.path()))?;
        Ok(GuestReader {
            file,
            len: export.len(),
            extents: Some(extents),
            next: 0,
            pos: 0,
            format: Format::Qcow2,
            _export: Some(export),
        })
    }

    /// The guest view's length.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The format the file is in.
    pub fn format(&self) -> Format {
        self.format
    }
}

impl Read for GuestReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(extents) = &self.extents else {
            return self.file.read(buf);
        };
        while let Some(e) = extents.get(self.next)
            && self.pos >= e.start + e.length
        {
            self.next += 1;
        }
        let Some(e) = extents.get(self.next) else {
            return Ok(0);
        };
        let n = ((e.start + e.length - self.pos) as usize).min(buf.len());
        if e.zero {
            buf[..n].fill(0);
        } else {
            self.file.read_exact_at(&mut buf[..n], self.pos)?;
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ConvertOptions, check, compare, convert, create_overlay, info};
    use std::io::Write;

    /// A raw disk of `len` bytes: noise at 1 MiB, a text-like run at 5 MiB, zeros elsewhere.
    fn raw_disk(path: &Path, len: u64) -> Vec<u8> {
        let mut data = vec![0u8; len as usize];
        let mut noise = vec![0u8; 700_000];
        for (i, b) in noise.iter_mut().enumerate() {
            *b = (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3];
        }
        data[1 << 20..(1 << 20) + noise.len()].copy_from_slice(&noise);
        data[5 << 20..(5 << 20) + 300_000].fill(b'x');
        let mut f = File::create(path).unwrap();
        f.write_all(&data).unwrap();
        data
    }

    fn read_all(r: &mut GuestReader) -> Vec<u8> {
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn a_qcow2_disk_reads_as_its_guest_view_and_zero_clusters_are_mapped() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.raw");
        let q = dir.path().join("disk.qcow2");
        let data = raw_disk(&raw, 8 << 20);
        convert(
            &raw,
            Format::Raw,
            &q,
            Format::Qcow2,
            &ConvertOptions::default(),
        )
        .unwrap();
        check(&q, Format::Qcow2).unwrap();
        assert!(is_qcow2(&q).unwrap() && !is_qcow2(&raw).unwrap());
        assert_eq!(info(&q, Format::Qcow2).unwrap().virtual_size, 8 << 20);
        let extents = map(&q, Format::Qcow2).unwrap();
        let zeros: u64 = extents.iter().filter(|e| e.zero).map(|e| e.length).sum();
        assert!(
            zeros >= 6 << 20,
            "unallocated clusters are mapped as zeros: {zeros}"
        );

        let mut r = GuestReader::open(&q).unwrap();
        assert_eq!((r.format(), r.len()), (Format::Qcow2, 8 << 20));
        let export = r._export.as_ref().unwrap().path().to_path_buf();
        assert_eq!(read_all(&mut r), data, "byte-identical guest view");
        drop(r);
        assert!(
            !export.exists() || std::fs::metadata(&export).unwrap().len() == 0,
            "the export is gone once the reader is"
        );
        // A raw file reads as it is.
        let mut r = GuestReader::open(&raw).unwrap();
        assert_eq!(r.format(), Format::Raw);
        assert_eq!(read_all(&mut r), data);
    }

    #[test]
    fn an_overlay_written_through_a_writable_export_holds_only_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("v1.raw");
        let mut data = raw_disk(&raw, 8 << 20);
        let base = dir.path().join("v1.qcow2");
        convert(
            &raw,
            Format::Raw,
            &base,
            Format::Qcow2,
            &ConvertOptions::default(),
        )
        .unwrap();
        let over = dir.path().join("v2.qcow2");
        create_overlay(&over, "v1.qcow2", 8 << 20).unwrap();
        let e = Export::open(&over, Format::Qcow2, true).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(e.path())
            .unwrap();
        f.write_all_at(b"changed", 3 << 20).unwrap();
        f.sync_all().unwrap();
        drop(f);
        e.close().unwrap();
        data[3 << 20..(3 << 20) + 7].copy_from_slice(b"changed");
        std::fs::write(&raw, &data).unwrap();
        check(&over, Format::Qcow2).unwrap();
        assert!(compare(&over, Format::Qcow2, &raw, Format::Raw).unwrap());
        assert!(!compare(&base, Format::Qcow2, &raw, Format::Raw).unwrap());
        let i = info(&over, Format::Qcow2).unwrap();
        assert_eq!(i.backing_filename.as_deref(), Some("v1.qcow2"));
        // One cluster allocated (plus metadata), not the disk.
        assert!(i.actual_size.unwrap() < 1 << 20, "{i:?}");
    }

    #[test]
    fn a_broken_image_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.qcow2");
        std::fs::write(&bad, b"QFI\xfbnot really").unwrap();
        let e = GuestReader::open(&bad).unwrap_err();
        assert!(e.to_string().contains("qemu-img"), "{e}");
        let e = info(&dir.path().join("absent"), Format::Raw).unwrap_err();
        assert!(e.to_string().contains("absent"), "{e}");
    }
}
