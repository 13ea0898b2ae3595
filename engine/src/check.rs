//! `seedcast check` of an engine's data directory: the catalog's records, every manifest's
//! chunks against the chunk index, every index entry against its pack, and with
//! `read_data` every chunk's bytes re-hashed (as `restic check --read-data`).
//!
//! It runs beside a running engine: the catalog is opened as a RocksDB secondary (no lock,
//! nothing written) and packs are only read; packs are append-only and an entry is synced
//! before its record is written, so every record the check sees points at durable bytes.
//! What it reports names the damaged item and each image version that needs it.
//!
//! `repair` (the engine stopped: it needs the catalog's lock) forgets the records of
//! damaged and cut-off chunks, so the store no longer claims them: deployments that need
//! them fail naming the missing chunk instead of sending bad bytes, and the next push of
//! the same content uploads them again. It cannot make up lost bytes; a missing chunk stays
//! a problem until that push.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use seedcast_core::check::{ProblemKind, Report, Role, Touched};
use seedcast_core::{ChunkId, ChunkerConfig, GlobalId, UnverifiedChunk};

use crate::catalog::{Catalog, CatalogError};
use crate::store::{StoreError, entry_end, open_packs_read_only, read_entry};

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("{0} is not an engine data directory (no catalog in it)")]
    NotEngineData(String),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("scratch directory: {0}")]
    Scratch(std::io::Error),
}

/// What to check, and whether to repair.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckOptions {
    /// Re-hash every stored chunk (without: structure and indexes only).
    pub read_data: bool,
    /// Forget damaged chunks (needs the engine stopped).
    pub repair: bool,
}

/// Which image versions use each chunk, and the images' names.
struct Users {
    by_chunk: HashMap<ChunkId, Vec<(GlobalId, u32)>>,
    names: HashMap<GlobalId, String>,
}

impl Users {
    fn touched(&self, id: &ChunkId) -> Vec<Touched> {
        let mut per: BTreeMap<GlobalId, Vec<u32>> = BTreeMap::new();
        for (g, v) in self.by_chunk.get(id).into_iter().flatten() {
            per.entry(*g).or_default().push(*v);
        }
        per.into_iter()
            .map(|(g, mut versions)| {
                versions.sort_unstable();
                versions.dedup();
                Touched {
                    global_id: g.to_string(),
                    name: self.names.get(&g).cloned().unwrap_or_default(),
                    versions,
                }
            })
            .collect()
    }
}

/// Check the engine data directory `data`.
pub fn check(data: &Path, opts: CheckOptions) -> Result<Report, CheckError> {
    let cat_path = data.join("catalog");
    if !cat_path.join("CURRENT").exists() {
        return Err(CheckError::NotEngineData(data.display().to_string()));
    }
    let scratch = tempfile::tempdir().map_err(CheckError::Scratch)?;
    let catalog = if opts.repair {
        Catalog::open(&cat_path)?
    } else {
        Catalog::open_secondary(&cat_path, scratch.path())?
    };
    let mut report = Report::new(
        data.display().to_string(),
        Role::Engine,
        opts.read_data,
        opts.repair,
    );
    let audit = catalog.audit();
    report.checked.records = audit.records;
    report.checked.images = audit.images.len() as u64;
    report.checked.versions = audit.manifests.len() as u64;
    report.checked.chunks = audit.chunks.len() as u64;
    for (what, why) in &audit.bad {
        report.add(
            ProblemKind::BadRecord,
            format!("catalog {what}"),
            why.clone(),
            vec![],
        );
    }

    let mut users = Users {
        by_chunk: HashMap::new(),
        names: audit
            .images
            .iter()
            .map(|(g, r)| (*g, r.name.clone()))
            .collect(),
    };
    for (g, v, rec) in &audit.manifests {
        match rec.manifest.id() {
            Ok(id) if id == rec.manifest_id => {}
            _ => report.add(
                ProblemKind::BadRecord,
                format!("catalog manifest {g}@{v}"),
                "the manifest does not hash to the id recorded with it".into(),
                vec![Touched {
                    global_id: g.to_string(),
                    name: users.names.get(g).cloned().unwrap_or_default(),
                    versions: vec![*v],
                }],
            ),
        }
        for id in rec.manifest.chunks().keys() {
            users.by_chunk.entry(*id).or_default().push((*g, *v));
        }
    }
    let versions: std::collections::HashSet<(GlobalId, u32)> =
        audit.manifests.iter().map(|(g, v, _)| (*g, *v)).collect();
    for (g, img) in &audit.images {
        if !versions.contains(&(*g, img.current_version)) {
            report.add(
                ProblemKind::MissingManifest,
                format!("image {g} ({})", img.name),
                format!(
                    "the catalog has no manifest of its current version {}",
                    img.current_version
                ),
                vec![Touched {
                    global_id: g.to_string(),
                    name: img.name.clone(),
                    versions: vec![img.current_version],
                }],
            );
        }
    }

    // Every chunk a manifest names must be indexed …
    let indexed: HashMap<ChunkId, _> = audit.chunks.iter().copied().collect();
    let mut missing: Vec<&ChunkId> = users
        .by_chunk
        .keys()
        .filter(|id| !indexed.contains_key(id))
        .collect();
    missing.sort();
    for id in missing {
        report.add(
            ProblemKind::MissingChunk,
            format!("chunk {id}"),
            "no stored copy: push an image that holds it again to restore it".into(),
            users.touched(id),
        );
    }

    // … and every indexed chunk must be whole in its pack.
    let packs = open_packs_read_only(&data.join("packs"))?;
    let mut forget = Vec::new();
    let mut sorted = audit.chunks.clone();
    sorted.sort_by_key(|(_, r)| (r.pack, r.offset));
    for (id, rec) in &sorted {
        let Some((path, file, len)) = packs.get(rec.pack as usize) else {
            report.add(
                ProblemKind::MissingChunk,
                format!("chunk {id}"),
                format!("its pack {} is gone", rec.pack),
                users.touched(id),
            );
            forget.push((*id, report.problems.len() - 1));
            continue;
        };
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let item = format!("chunk {id} ({name} @ {})", rec.offset);
        if entry_end(rec) > *len {
            report.add(
                ProblemKind::Truncated,
                item,
                format!(
                    "the pack ends at byte {len}, before the entry's end at {}",
                    entry_end(rec)
                ),
                users.touched(id),
            );
            forget.push((*id, report.problems.len() - 1));
            continue;
        }
        let damage = match read_entry(file, path, id, rec, opts.read_data) {
            Err(e) => Some(e.to_string()),
            Ok(_) if !opts.read_data => None,
            Ok(c) => {
                report.checked.bytes_read += c.payload.len() as u64;
                UnverifiedChunk(c)
                    .verify(ChunkerConfig::MAX_CHUNK)
                    .err()
                    .map(|e| e.to_string())
            }
        };
        if let Some(detail) = damage {
            report.add(ProblemKind::DamagedChunk, item, detail, users.touched(id));
            forget.push((*id, report.problems.len() - 1));
        }
    }

    if opts.repair && !forget.is_empty() {
        catalog.forget_chunks(&forget.iter().map(|(id, _)| *id).collect::<Vec<_>>())?;
        for (id, problem) in forget {
            report.problems[problem].repaired = true;
            report
                .actions
                .push(format!("forgot the damaged copy of chunk {id}"));
            // The chunk is now missing until it is pushed again: say so, if anything needs it.
            if users.by_chunk.contains_key(&id) {
                report.add(
                    ProblemKind::MissingChunk,
                    format!("chunk {id}"),
                    "its damaged copy was forgotten: push an image that holds it again to restore it"
                        .into(),
                    users.touched(&id),
                );
            }
        }
    }
    Ok(report)
}
