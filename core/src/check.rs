//! What `seedcast check` finds in an engine's or an agent's data directory: the report both
//! sides make, so the command prints (and scripts read) one shape whichever it checked.
//!
//! A problem names the damaged item (a chunk and where it sits, a record's key, a published
//! image) and every image version it touches, so an operator knows what to push again or
//! which site to repair; the JSON field names are a contract.

use serde::{Deserialize, Serialize};

/// Which kind of data directory was checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Engine,
    Agent,
}

/// What is wrong with one item.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// Stored bytes that do not hash to their chunk id, or whose entry header or
    /// compression is broken.
    DamagedChunk,
    /// A chunk a manifest needs that the store does not hold.
    MissingChunk,
    /// A chunk whose bytes lie past the end of its (cut short) file.
    Truncated,
    /// A database record that does not decode, or does not match what refers to it.
    BadRecord,
    /// An image (or held version) without its manifest.
    MissingManifest,
    /// A published image whose content no longer matches its version (a VM booted from
    /// it, an operator's edit, bit rot).
    Drifted,
    /// A published image the site's service no longer has.
    MissingImage,
    /// Something the check could not read at all (it says why).
    Unreadable,
}

impl ProblemKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ProblemKind::DamagedChunk => "damaged_chunk",
            ProblemKind::MissingChunk => "missing_chunk",
            ProblemKind::Truncated => "truncated",
            ProblemKind::BadRecord => "bad_record",
            ProblemKind::MissingManifest => "missing_manifest",
            ProblemKind::Drifted => "drifted",
            ProblemKind::MissingImage => "missing_image",
            ProblemKind::Unreadable => "unreadable",
        }
    }
}

/// One image's versions a problem touches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Touched {
    pub global_id: String,
    pub name: String,
    pub versions: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub kind: ProblemKind,
    /// What is damaged, e.g. `chunk 3fa1… (pack-000000.pack @ 1234)`.
    pub item: String,
    pub detail: String,
    pub images: Vec<Touched>,
    /// Fixed by `--repair` in this run.
    pub repaired: bool,
}

/// How much was looked at.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checked {
    pub records: u64,
    pub images: u64,
    pub versions: u64,
    pub chunks: u64,
    /// Chunk bytes read and re-hashed (`--read-data`), and image bytes read back.
    pub bytes_read: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub data: String,
    pub role: Role,
    pub read_data: bool,
    pub repair: bool,
    pub checked: Checked,
    pub problems: Vec<Problem>,
    /// What `--repair` did, one line each.
    pub actions: Vec<String>,
}

impl Report {
    pub fn new(data: String, role: Role, read_data: bool, repair: bool) -> Self {
        Report {
            data,
            role,
            read_data,
            repair,
            checked: Checked::default(),
            problems: Vec::new(),
            actions: Vec::new(),
        }
    }

    pub fn add(&mut self, kind: ProblemKind, item: String, detail: String, images: Vec<Touched>) {
        self.problems.push(Problem {
            kind,
            item,
            detail,
            images,
            repaired: false,
        });
    }

    /// Problems `--repair` did not fix: the check's exit status is non-zero while any remain.
    pub fn unrepaired(&self) -> usize {
        self.problems.iter().filter(|p| !p.repaired).count()
    }
}
