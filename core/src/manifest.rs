//! File recipes and image manifests.
//!
//! A recipe lists a file's extents in order: data chunks (by id and length) and holes
//! (runs of zeros that are never stored). A manifest is one version of an image: its files,
//! each with a recipe, plus the version chain. Its id is the BLAKE3 of its canonical
//! encoding, so equal manifests have equal ids on every node.
//!
//! A file's hash (format 3) is a Merkle root over its recipe — BLAKE3 of its length and of
//! each extent (a chunk's id and length, a hole's length) — not of its bytes: the chunk ids
//! are BLAKE3 of the chunks, so it pins the content as firmly, and it costs nothing per
//! byte of hole (a 1 TiB sparse disk hashes in microseconds, not minutes) and needs no
//! chunk read when an edit changes a few chunks. Files of format-1/2 manifests carry the
//! BLAKE3 of their bytes and are checked that way.

use std::collections::{BTreeMap, HashMap, HashSet};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::chunker::{ChunkerConfig, Piece};
use crate::codec::{self, CodecError};
use crate::id::{ChunkId, GlobalId};

/// Persisted and sent format of [`Manifest`]; bump on any change to its fields or their
/// meaning. 2: every file records the format it was pushed in ([`FileFormat`]). 3: a
/// file's hash is [`FileRecipe::content_hash`] (same fields as 2).
pub const MANIFEST_FORMAT: u16 = 3;

/// The zstd level of manifest deltas. Every update's first message waits for one: at 19
/// the Debian update's (22 KB) took 76 ms on the engine; the shared entries are long exact
/// matches, which every level finds.
pub const MANIFEST_DELTA_LEVEL: i32 = 9;

/// What a manifest may describe: caps a node configures so that no peer can make it
/// allocate, write or work without bound (a file of 2^62 bytes, one chunk named a million
/// times). The defaults fit large VM images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest file, holes included (a disk's virtual size). 4 TiB.
    pub max_file_len: u64,
    /// Sum of an image's file lengths, holes included. 8 TiB.
    pub max_image_len: u64,
    /// Bytes of data (not holes) an image may make a site write. 1 TiB.
    pub max_data_len: u64,
    /// Files per image. 4096.
    pub max_files: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_file_len: 4 << 40,
            max_image_len: 8 << 40,
            max_data_len: 1 << 40,
            max_files: 4096,
        }
    }
}

impl Limits {
    /// Check `files` against the caps; the error names the cap that was passed.
    pub fn check(&self, files: &[FileEntry]) -> Result<(), ManifestError> {
        let over = |what: &str, size: u64, max: u64| ManifestError::TooLarge {
            what: what.to_string(),
            size,
            max,
        };
        if files.len() > self.max_files {
            return Err(over(
                "files per image",
                files.len() as u64,
                self.max_files as u64,
            ));
        }
        let (mut total, mut data) = (0u64, 0u64);
        for f in files {
            if f.recipe.len > self.max_file_len {
                let what = format!("length of file {:?}", f.path);
                return Err(over(&what, f.recipe.len, self.max_file_len));
            }
            total = total.saturating_add(f.recipe.len);
            data = data.saturating_add(f.recipe.data_len());
        }
        if total > self.max_image_len {
            return Err(over("image length", total, self.max_image_len));
        }
        if data > self.max_data_len {
            return Err(over("image data", data, self.max_data_len));
        }
        Ok(())
    }
}

/// Longest file name in an image (bytes), as on common filesystems.
pub const MAX_NAME_LEN: usize = 255;

/// One extent of a file, in file order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Extent {
    /// `len` bytes that are the chunk `id`.
    Data { id: ChunkId, len: u32 },
    /// `len` zero bytes: written sparse, never stored or sent.
    Hole { len: u64 },
}

impl Extent {
    pub fn len(&self) -> u64 {
        match self {
            Extent::Data { len, .. } => *len as u64,
            Extent::Hole { len } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How to rebuild one file from chunks, and the hash it must have when rebuilt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecipe {
    /// Length in bytes, holes included.
    pub len: u64,
    /// [`FileRecipe::content_hash`] (format 3); BLAKE3 of the whole file's bytes in
    /// manifests of format 1 and 2.
    pub hash: [u8; 32],
    pub extents: Vec<Extent>,
}

impl FileRecipe {
    /// Each extent with the file offset it starts at, in file order: the one walk over a
    /// file's layout (assembly, seeds, delta bases and edits all need the offsets).
    pub fn extents_at(&self) -> impl Iterator<Item = (u64, &Extent)> + '_ {
        self.extents.iter().scan(0u64, |offset, e| {
            let at = *offset;
            *offset += e.len();
            Some((at, e))
        })
    }

    /// Each data chunk with the file offset it starts at, in file order.
    pub fn chunks_at(&self) -> impl Iterator<Item = (u64, ChunkId, u32)> + '_ {
        self.extents_at().filter_map(|(at, e)| match e {
            Extent::Data { id, len } => Some((at, *id, *len)),
            Extent::Hole { .. } => None,
        })
    }

    /// Bytes that are data (not holes).
    pub fn data_len(&self) -> u64 {
        self.extents
            .iter()
            .map(|e| match e {
                Extent::Data { len, .. } => *len as u64,
                Extent::Hole { .. } => 0,
            })
            .fold(0u64, u64::saturating_add)
    }

    /// The file's hash from its recipe alone: BLAKE3 (in the key derived from
    /// `"seedcast file recipe v1"`) of the length and of each extent in order — `0`, the
    /// chunk id and its length for data; `1` and its length for a hole (integers
    /// little-endian). O(extents), whatever the length.
    pub fn content_hash(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("seedcast file recipe v1");
        h.update(&self.len.to_le_bytes());
        for e in &self.extents {
            match e {
                Extent::Data { id, len } => {
                    h.update(&[0]);
                    h.update(id.as_bytes());
                    h.update(&len.to_le_bytes());
                }
                Extent::Hole { len } => {
                    h.update(&[1]);
                    h.update(&len.to_le_bytes());
                }
            }
        }
        *h.finalize().as_bytes()
    }
}

/// The form a file was pushed in. Its recipe always describes what a reader of the file
/// sees: for a disk image, the guest-visible content, whatever container held it.
///
/// Encoded by variant index: append new formats at the end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FileFormat {
    /// The bytes as they are: a raw disk, a kernel, an initrd, metadata.
    #[default]
    Raw,
    /// A qcow2 disk image. Sites rebuild it from the guest content as their service keeps
    /// disks (a qcow2 file, a Glance image of either format, a layer of raw bytes).
    Qcow2,
}

impl FileFormat {
    pub fn as_str(&self) -> &'static str {
        match self {
            FileFormat::Raw => "raw",
            FileFormat::Qcow2 => "qcow2",
        }
    }
}

/// One file of an image, known by its base name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Base name as given to `push`; adaptation blocks refer to files by it.
    pub path: String,
    /// Unix permission bits (`0o644` and the like).
    pub mode: u32,
    pub recipe: FileRecipe,
    pub format: FileFormat,
}

impl FileEntry {
    /// Is this file a VM disk? Pushed as qcow2, or a raw file named `*.raw` (kernels,
    /// initrds and metadata are not).
    pub fn is_disk(&self) -> bool {
        self.format == FileFormat::Qcow2 || self.path.ends_with(".raw")
    }
}

/// One version of an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u16,
    pub global_id: GlobalId,
    pub version: u32,
    /// The version this one was made from (`None` for the first).
    pub parent: Option<u32>,
    pub name: String,
    pub chunking: ChunkerConfig,
    pub files: Vec<FileEntry>,
}

/// A manifest or file list that breaks the rules.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("unsupported manifest format {0} (this build reads format {MANIFEST_FORMAT})")]
    Format(u16),
    #[error("invalid file name {name:?}: {why}")]
    BadName { name: String, why: &'static str },
    #[error("file name {0:?} appears twice")]
    DuplicateName(String),
    #[error(
        "file names {0:?} and {1:?} differ only in case (one would overwrite the other on a case-insensitive pool)"
    )]
    CaseCollision(String, String),
    #[error("an image needs at least one file")]
    NoFiles,
    #[error("file {path:?}: extents add up to {sum} bytes but the file is {len}")]
    LengthMismatch { path: String, sum: u64, len: u64 },
    #[error("file {path:?}: empty extent or chunk larger than {max} bytes")]
    BadExtent { path: String, max: u32 },
    #[error("invalid image name {0:?}: must be 1 to 255 bytes without control characters")]
    BadImageName(String),
    #[error("{what} of {size} exceeds the cap of {max} (a limit this node is configured with)")]
    TooLarge { what: String, size: u64, max: u64 },
    #[error("file {0:?}: its hash is not the hash of its recipe")]
    HashMismatch(String),
}

/// Check a file's base name: what a site's filesystem and every adapter can hold.
pub fn validate_file_name(name: &str) -> Result<(), ManifestError> {
    let bad = |why| {
        Err(ManifestError::BadName {
            name: name.to_string(),
            why,
        })
    };
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return bad("must be 1 to 255 bytes");
    }
    if name == "." || name == ".." {
        return bad("is a directory reference");
    }
    if name.starts_with('.') {
        return bad("must not start with '.' (reserved for temporary files)");
    }
    if name.contains(['/', '\\', '\0']) || name.chars().any(char::is_control) {
        return bad("must be a base name without '/', '\\' or control characters");
    }
    Ok(())
}

/// Check an image's name (for people): 1 to 255 bytes without control characters.
pub fn validate_image_name(name: &str) -> Result<(), ManifestError> {
    if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
        return Err(ManifestError::BadImageName(name.to_string()));
    }
    Ok(())
}

/// Check the files of an image: names, uniqueness (also ignoring case: a site's pool may
/// be case-insensitive, where `Disk.raw` would overwrite a verified `disk.raw`), lengths.
pub fn validate_files(files: &[FileEntry], chunking: &ChunkerConfig) -> Result<(), ManifestError> {
    if files.is_empty() {
        return Err(ManifestError::NoFiles);
    }
    let mut seen = HashSet::new();
    let mut folded = HashMap::new();
    for f in files {
        validate_file(f, chunking)?;
        if !seen.insert(f.path.as_str()) {
            return Err(ManifestError::DuplicateName(f.path.clone()));
        }
        if let Some(other) = folded.insert(f.path.to_lowercase(), f.path.as_str()) {
            return Err(ManifestError::CaseCollision(
                other.to_string(),
                f.path.clone(),
            ));
        }
    }
    Ok(())
}

/// Check one file: its name, and that its extents are well formed and add up to its
/// length. Everything that edits a recipe relies on this holding.
pub fn validate_file(f: &FileEntry, chunking: &ChunkerConfig) -> Result<(), ManifestError> {
    validate_file_name(&f.path)?;
    let mut sum = 0u64;
    for e in &f.recipe.extents {
        let ok = match e {
            Extent::Data { len, .. } => *len > 0 && *len <= chunking.max,
            Extent::Hole { len } => *len > 0,
        };
        if !ok {
            return Err(ManifestError::BadExtent {
                path: f.path.clone(),
                max: chunking.max,
            });
        }
        sum = sum.saturating_add(e.len());
    }
    if sum != f.recipe.len {
        return Err(ManifestError::LengthMismatch {
            path: f.path.clone(),
            sum,
            len: f.recipe.len,
        });
    }
    Ok(())
}

impl Manifest {
    /// BLAKE3 of the canonical encoding. A format-1 manifest (written before files had a
    /// format) keeps the id it was given: it is hashed in its format-1 encoding.
    pub fn id(&self) -> Result<[u8; 32], CodecError> {
        let bytes = match self.format {
            1 => codec::encode(&v1::ManifestV1::from(self))?,
            _ => codec::encode(self)?,
        };
        Ok(*blake3::hash(&bytes).as_bytes())
    }

    /// Check the manifest's rules and the default [`Limits`].
    pub fn validate(&self) -> Result<(), ManifestError> {
        self.validate_within(&Limits::default())
    }

    /// Check the manifest's rules and `limits`: format, names, extents, sizes, and (format
    /// 3) every file's hash against its recipe.
    pub fn validate_within(&self, limits: &Limits) -> Result<(), ManifestError> {
        let old_and_raw =
            self.format == 1 && self.files.iter().all(|f| f.format == FileFormat::Raw);
        if !(2..=MANIFEST_FORMAT).contains(&self.format) && !old_and_raw {
            return Err(ManifestError::Format(self.format));
        }
        validate_image_name(&self.name)?;
        limits.check(&self.files)?;
        validate_files(&self.files, &self.chunking)?;
        if self.hashes_recipes() {
            for f in &self.files {
                if f.recipe.hash != f.recipe.content_hash() {
                    return Err(ManifestError::HashMismatch(f.path.clone()));
                }
            }
        }
        Ok(())
    }

    /// Are its files' hashes [`FileRecipe::content_hash`] (format 3 on), rather than
    /// BLAKE3 of the bytes?
    pub fn hashes_recipes(&self) -> bool {
        self.format >= 3
    }

    /// Every distinct chunk the manifest needs, with its length.
    pub fn chunks(&self) -> BTreeMap<ChunkId, u32> {
        let mut out = BTreeMap::new();
        for f in &self.files {
            for (_, id, len) in f.recipe.chunks_at() {
                out.insert(id, len);
            }
        }
        out
    }

    /// Sum of file lengths (holes included).
    pub fn total_len(&self) -> u64 {
        self.files.iter().map(|f| f.recipe.len).sum()
    }

    /// Sum of the files' data bytes (holes excluded).
    pub fn data_len(&self) -> u64 {
        self.files.iter().map(|f| f.recipe.data_len()).sum()
    }

    /// Each distinct data chunk with its length and the file offset of its first use (files
    /// in order): where a delta base for it is most likely to sit in an earlier version.
    pub fn first_uses(&self) -> std::collections::HashMap<ChunkId, (u32, u64)> {
        let mut out = std::collections::HashMap::new();
        for f in &self.files {
            for (at, id, len) in f.recipe.chunks_at() {
                out.entry(id).or_insert((len, at));
            }
        }
        out
    }

    /// The manifest as a zstd delta against `base` (most entries are shared between
    /// versions, so this is a small fraction of the full encoding), at
    /// [`MANIFEST_DELTA_LEVEL`].
    pub fn delta_against(&self, base: &Manifest) -> Result<Vec<u8>, ManifestDeltaError> {
        let b = codec::encode(base)?;
        let t = codec::encode(self)?;
        Ok(crate::delta::encode(&b, &t, MANIFEST_DELTA_LEVEL)?)
    }

    /// Rebuild a manifest from [`Manifest::delta_against`]'s output and check its id.
    pub fn from_delta(
        base: &Manifest,
        delta: &[u8],
        id: &[u8; 32],
    ) -> Result<Manifest, ManifestDeltaError> {
        let b = codec::encode(base)?;
        let bytes = crate::delta::decode_bounded(&b, delta, codec::MAX_ENCODED_LEN)?;
        let m: Manifest = codec::decode(&bytes)?;
        if &m.id()? != id {
            return Err(ManifestDeltaError::Id);
        }
        Ok(m)
    }

    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.path == path)
    }
}

/// Format 1, for reading what earlier builds persisted: the same fields, files without a
/// format (all raw). Converted manifests keep `format: 1`, so their ids do not change.
pub mod v1 {
    use serde::{Deserialize, Serialize};

    use super::{FileEntry, FileFormat, FileRecipe, Manifest};
    use crate::chunker::ChunkerConfig;
    use crate::id::GlobalId;

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct FileEntryV1 {
        pub path: String,
        pub mode: u32,
        pub recipe: FileRecipe,
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ManifestV1 {
        pub format: u16,
        pub global_id: GlobalId,
        pub version: u32,
        pub parent: Option<u32>,
        pub name: String,
        pub chunking: ChunkerConfig,
        pub files: Vec<FileEntryV1>,
    }

    impl From<ManifestV1> for Manifest {
        fn from(m: ManifestV1) -> Self {
            Manifest {
                format: m.format,
                global_id: m.global_id,
                version: m.version,
                parent: m.parent,
                name: m.name,
                chunking: m.chunking,
                files: m
                    .files
                    .into_iter()
                    .map(|f| FileEntry {
                        path: f.path,
                        mode: f.mode,
                        recipe: f.recipe,
                        format: FileFormat::Raw,
                    })
                    .collect(),
            }
        }
    }

    impl From<&Manifest> for ManifestV1 {
        fn from(m: &Manifest) -> Self {
            ManifestV1 {
                format: m.format,
                global_id: m.global_id,
                version: m.version,
                parent: m.parent,
                name: m.name.clone(),
                chunking: m.chunking,
                files: m
                    .files
                    .iter()
                    .map(|f| FileEntryV1 {
                        path: f.path.clone(),
                        mode: f.mode,
                        recipe: f.recipe.clone(),
                    })
                    .collect(),
            }
        }
    }
}

/// A manifest delta could not be made or applied.
#[derive(Debug, thiserror::Error)]
pub enum ManifestDeltaError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Delta(#[from] crate::delta::DeltaError),
    #[error("the rebuilt manifest does not match its id")]
    Id,
}

/// Zeros to hash holes with, without allocating.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Feed `n` zero bytes to a hasher.
pub fn hash_zeros(h: &mut blake3::Hasher, mut n: u64) {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

/// Builds a [`FileRecipe`] from pieces in file order.
#[derive(Debug, Default)]
pub struct RecipeBuilder {
    len: u64,
    extents: Vec<Extent>,
}

impl RecipeBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add the next piece; a data piece is named and returned with its id.
    pub fn push(&mut self, piece: Piece) -> Option<(ChunkId, Bytes)> {
        match piece {
            Piece::Hole(n) => {
                self.len += n;
                match self.extents.last_mut() {
                    Some(Extent::Hole { len }) => *len += n,
                    _ => self.extents.push(Extent::Hole { len: n }),
                }
                None
            }
            Piece::Data(b) => {
                self.len += b.len() as u64;
                let id = ChunkId::of(&b);
                self.extents.push(Extent::Data {
                    id,
                    len: b.len() as u32,
                });
                Some((id, b))
            }
        }
    }

    pub fn finish(self) -> FileRecipe {
        let mut r = FileRecipe {
            len: self.len,
            hash: [0; 32],
            extents: self.extents,
        };
        r.hash = r.content_hash();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunker::chunk_all;

    fn manifest_of(data: &[u8]) -> Manifest {
        let mut b = RecipeBuilder::new();
        for p in chunk_all(data, ChunkerConfig::default()).unwrap() {
            b.push(p);
        }
        Manifest {
            format: MANIFEST_FORMAT,
            global_id: GlobalId([1; 12]),
            version: 1,
            parent: None,
            name: "img".into(),
            chunking: ChunkerConfig::default(),
            files: vec![FileEntry {
                path: "disk.raw".into(),
                mode: 0o644,
                recipe: b.finish(),
                format: crate::manifest::FileFormat::Raw,
            }],
        }
    }

    #[test]
    fn the_file_hash_is_the_recipe_hash_and_the_id_is_stable() {
        let mut data = vec![7u8; 100_000];
        data.extend(vec![0u8; 1 << 20]);
        data.extend(vec![9u8; 50_000]);
        let m = manifest_of(&data);
        let r = &m.files[0].recipe;
        assert_eq!(r.hash, r.content_hash());
        // Any change to the content changes it: a byte of a chunk (its id), a hole's length.
        let mut other = data.clone();
        other[10] ^= 1;
        assert_ne!(manifest_of(&other).files[0].recipe.hash, r.hash);
        let mut longer = data.clone();
        longer.splice(200_000..200_000, vec![0u8; 4096]);
        assert_ne!(manifest_of(&longer).files[0].recipe.hash, r.hash);
        // A hole of 2^62 bytes hashes at once.
        let huge = FileRecipe {
            len: 1 << 62,
            hash: [0; 32],
            extents: vec![Extent::Hole { len: 1 << 62 }],
        };
        let t = std::time::Instant::now();
        let _ = huge.content_hash();
        assert!(t.elapsed() < std::time::Duration::from_millis(50));
        assert_eq!(r.len, data.len() as u64);
        assert!(r.extents.iter().any(|e| matches!(e, Extent::Hole { .. })));
        m.validate().unwrap();
        assert_eq!(m.id().unwrap(), manifest_of(&data).id().unwrap());
        let back: Manifest = codec::decode(&codec::encode(&m).unwrap()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn manifest_deltas_round_trip_and_check_the_id() {
        let mut data = vec![7u8; 3_000_000];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i * 7919 % 251) as u8;
        }
        let m1 = manifest_of(&data);
        data[1_500_000] ^= 1;
        let mut m2 = manifest_of(&data);
        m2.version = 2;
        m2.parent = Some(1);
        let d = m2.delta_against(&m1).unwrap();
        assert!(
            d.len() * 4 < codec::encode(&m2).unwrap().len(),
            "{}",
            d.len()
        );
        let back = Manifest::from_delta(&m1, &d, &m2.id().unwrap()).unwrap();
        assert_eq!(back, m2);
        assert!(matches!(
            Manifest::from_delta(&m1, &d, &[0; 32]),
            Err(ManifestDeltaError::Id)
        ));
        // Another base cannot rebuild it (and if it could, the id would say so).
        let other = manifest_of(&[9u8; 500_000]);
        assert!(Manifest::from_delta(&other, &d, &m2.id().unwrap()).is_err());
    }

    #[test]
    fn a_format_1_manifest_converts_and_keeps_its_id() {
        let mut m = manifest_of(&[5u8; 100_000]);
        m.format = 1;
        let old = v1::ManifestV1::from(&m);
        let old_id = *blake3::hash(&codec::encode(&old).unwrap()).as_bytes();
        let back = Manifest::from(old);
        assert_eq!(back, m);
        assert_eq!(
            back.id().unwrap(),
            old_id,
            "the id it was given at format 1"
        );
        back.validate().unwrap();
        // A format-1 manifest cannot carry a qcow2 file; an unknown format is refused.
        let mut q = back.clone();
        q.files[0].format = FileFormat::Qcow2;
        assert_eq!(q.validate(), Err(ManifestError::Format(1)));
        q.format = MANIFEST_FORMAT + 1;
        assert_eq!(
            q.validate(),
            Err(ManifestError::Format(MANIFEST_FORMAT + 1))
        );
        q.format = MANIFEST_FORMAT;
        q.validate().unwrap();
        assert_ne!(q.id().unwrap(), old_id);
    }

    #[test]
    fn caps_and_hashes_are_checked() {
        let m = manifest_of(&[3u8; 200_000]);
        let mut big = m.clone();
        big.files[0]
            .recipe
            .extents
            .push(Extent::Hole { len: 5 << 40 });
        big.files[0].recipe.len += 5 << 40;
        big.files[0].recipe.hash = big.files[0].recipe.content_hash();
        let e = big.validate().unwrap_err();
        assert!(
            matches!(&e, ManifestError::TooLarge { what, .. } if what.starts_with("length of file")),
            "{e}"
        );
        assert!(e.to_string().contains("cap"), "{e}");
        // One chunk named a million times: more data than a site is made to write.
        let mut rep = m.clone();
        let one = rep.files[0].recipe.extents[0];
        rep.files[0].recipe.extents = vec![one; 1_000_000];
        rep.files[0].recipe.len = one.len() * 1_000_000;
        rep.files[0].recipe.hash = rep.files[0].recipe.content_hash();
        let tight = Limits {
            max_data_len: 1 << 30,
            ..Limits::default()
        };
        assert!(matches!(
            rep.validate_within(&tight),
            Err(ManifestError::TooLarge { what, .. }) if what == "image data"
        ));
        // A hash that is not its recipe's.
        let mut forged = m.clone();
        forged.files[0].recipe.hash[0] ^= 1;
        assert_eq!(
            forged.validate(),
            Err(ManifestError::HashMismatch("disk.raw".into()))
        );
        // Format 2 hashes were of the bytes: not checked against the recipe.
        forged.format = 2;
        forged.validate().unwrap();
    }

    #[test]
    fn bad_names_and_lengths_are_refused() {
        let mut m = manifest_of(b"hello");
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "/etc/passwd",
            "../../x",
            "a\\b",
            ".hidden",
            "x\0y",
            "esc\x1b[2J",
            &"n".repeat(256),
        ] {
            m.files[0].path = bad.to_string();
            assert!(
                matches!(m.validate(), Err(ManifestError::BadName { .. })),
                "{bad:?}"
            );
        }
        m.files[0].path = "ok".into();
        m.files[0].recipe.len += 1;
        assert!(matches!(
            m.validate(),
            Err(ManifestError::LengthMismatch { .. })
        ));
        m.files[0].recipe.len -= 1;
        m.files.push(m.files[0].clone());
        assert_eq!(m.validate(), Err(ManifestError::DuplicateName("ok".into())));
        m.files[1].path = "OK".into();
        assert_eq!(
            m.validate(),
            Err(ManifestError::CaseCollision("ok".into(), "OK".into()))
        );
        m.files.clear();
        assert_eq!(m.validate(), Err(ManifestError::NoFiles));
    }
}
