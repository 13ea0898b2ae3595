//! File recipes and image manifests.
//!
//! A recipe lists a file's extents in order: data chunks (by id and length) and holes
//! (runs of zeros that are never stored). A manifest is one version of an image: its files,
//! each with a recipe, plus the version chain. Its id is the BLAKE3 of its canonical
//! encoding, so equal manifests have equal ids on every node.

use std::collections::{BTreeMap, HashSet};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::chunker::{ChunkerConfig, Piece};
use crate::codec::{self, CodecError};
use crate::id::{ChunkId, GlobalId};

/// Persisted and sent format of [`Manifest`]; bump on any change to its fields.
/// 2: every file records the format it was pushed in ([`FileFormat`]).
pub const MANIFEST_FORMAT: u16 = 2;

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
    /// BLAKE3 of the whole file's bytes (holes hashed as the zeros they are).
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
            .sum()
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
    #[error("an image needs at least one file")]
    NoFiles,
    #[error("file {path:?}: extents add up to {sum} bytes but the file is {len}")]
    LengthMismatch { path: String, sum: u64, len: u64 },
    #[error("file {path:?}: empty extent or chunk larger than {max} bytes")]
    BadExtent { path: String, max: u32 },
    #[error("invalid image name {0:?}: must be 1 to 255 bytes without control characters")]
    BadImageName(String),
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

/// Check the files of an image: names, uniqueness, lengths.
pub fn validate_files(files: &[FileEntry], chunking: &ChunkerConfig) -> Result<(), ManifestError> {
    if files.is_empty() {
        return Err(ManifestError::NoFiles);
    }
    let mut seen = HashSet::new();
    for f in files {
        validate_file_name(&f.path)?;
        if !seen.insert(f.path.as_str()) {
            return Err(ManifestError::DuplicateName(f.path.clone()));
        }
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

    pub fn validate(&self) -> Result<(), ManifestError> {
        let old_and_raw =
            self.format == 1 && self.files.iter().all(|f| f.format == FileFormat::Raw);
        if self.format != MANIFEST_FORMAT && !old_and_raw {
            return Err(ManifestError::Format(self.format));
        }
        validate_image_name(&self.name)?;
        validate_files(&self.files, &self.chunking)
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
    /// versions, so this is a small fraction of the full encoding).
    pub fn delta_against(&self, base: &Manifest) -> Result<Vec<u8>, ManifestDeltaError> {
        let b = codec::encode(base)?;
        let t = codec::encode(self)?;
        Ok(crate::delta::encode(&b, &t, 19)?)
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

/// Builds a [`FileRecipe`] from pieces in file order, hashing as it goes.
#[derive(Debug, Default)]
pub struct RecipeBuilder {
    hasher: blake3::Hasher,
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
                hash_zeros(&mut self.hasher, n);
                self.len += n;
                match self.extents.last_mut() {
                    Some(Extent::Hole { len }) => *len += n,
                    _ => self.extents.push(Extent::Hole { len: n }),
                }
                None
            }
            Piece::Data(b) => {
                self.hasher.update(&b);
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
        FileRecipe {
            len: self.len,
            hash: *self.hasher.finalize().as_bytes(),
            extents: self.extents,
        }
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
    fn recipe_hash_is_whole_file_hash_and_id_is_stable() {
        let mut data = vec![7u8; 100_000];
        data.extend(vec![0u8; 1 << 20]);
        data.extend(vec![9u8; 50_000]);
        let m = manifest_of(&data);
        let r = &m.files[0].recipe;
        assert_eq!(r.hash, *blake3::hash(&data).as_bytes());
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
        q.format = 3;
        assert_eq!(q.validate(), Err(ManifestError::Format(3)));
        q.format = MANIFEST_FORMAT;
        q.validate().unwrap();
        assert_ne!(q.id().unwrap(), old_id);
    }

    #[test]
    fn bad_names_and_lengths_are_refused() {
        let mut m = manifest_of(b"hello");
        for bad in ["", ".", "..", "a/b", ".hidden", "x\0y", &"n".repeat(256)] {
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
        m.files.clear();
        assert_eq!(m.validate(), Err(ManifestError::NoFiles));
    }
}
