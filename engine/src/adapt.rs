//! Adaptation blocks, history and rollback: every change to an image makes its next
//! version, with its parent recorded, committed atomically with the placements that move
//! every target site to it.

use std::collections::BTreeSet;

use bytes::Bytes;
use seedcast_core::edit::{EditError, apply_write};
use seedcast_core::manifest::{MANIFEST_FORMAT, validate_file_name, validate_files};
use seedcast_core::protocol::{AdaptOp, AdaptRequest, MAX_WRITE, PlacementState, VersionInfo};
use seedcast_core::{
    ChunkId, CompressedChunk, Extent, FileEntry, FileRecipe, GlobalId, Manifest, UnverifiedChunk,
};
use tracing::info;

use crate::catalog::{ImageCommit, ManifestRecord, PlacementRecord, VersionNote, unix_now};
use crate::delta::read_raw;
use crate::{EngineError, Shared};

/// Every data extent must name a chunk the store holds, with the length it holds.
/// Returns the distinct chunk ids.
pub(crate) fn check_chunks(
    shared: &Shared,
    files: &[FileEntry],
) -> Result<BTreeSet<ChunkId>, EngineError> {
    let mut ids = BTreeSet::new();
    let mut missing = Vec::new();
    for f in files {
        for e in &f.recipe.extents {
            if let Extent::Data { id, len } = e {
                match shared.store.record(id) {
                    None => missing.push(*id),
                    Some(r) if r.raw_len != *len => {
                        return Err(EngineError::Invalid(format!(
                            "file {:?}: chunk {id} is {} bytes, the recipe says {len}",
                            f.path, r.raw_len
                        )));
                    }
                    Some(_) => {
                        ids.insert(*id);
                    }
                }
            }
        }
    }
    if let Some(first) = missing.first() {
        return Err(EngineError::MissingChunks {
            count: missing.len(),
            first: *first,
        });
    }
    Ok(ids)
}

/// Commit `files` as the next version of `g`, moving every target site to it.
fn commit_next(
    shared: &Shared,
    g: GlobalId,
    files: Vec<FileEntry>,
    change: String,
    bytes_uploaded: u64,
) -> Result<(u32, Vec<String>), EngineError> {
    let mut image = shared
        .catalog
        .image(&g)?
        .ok_or(EngineError::UnknownImage(g))?;
    validate_files(&files, &shared.cfg.chunking)
        .map_err(|e| EngineError::Invalid(e.to_string()))?;
    let ids = check_chunks(shared, &files)?;
    let parent = image.current_version;
    let version = parent + 1;
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        global_id: g,
        version,
        parent: Some(parent),
        name: image.name.clone(),
        chunking: shared.cfg.chunking,
        files,
    };
    let manifest_id = manifest
        .id()
        .map_err(|e| EngineError::Internal(e.to_string()))?;
    let mrec = ManifestRecord {
        manifest,
        manifest_id,
        bytes_uploaded,
        created_unix: unix_now(),
    };
    // Revoked sites are no longer targets: they keep their old mapping and get nothing new.
    let revoked: BTreeSet<String> = shared
        .catalog
        .sites()?
        .into_iter()
        .filter(|(_, r)| r.revoked)
        .map(|(n, _)| n)
        .collect();
    image.sites.retain(|s| !revoked.contains(s));
    let mut placements = Vec::new();
    for site in &image.sites {
        let mut p = shared
            .catalog
            .placement(&g, site)?
            .unwrap_or_else(|| PlacementRecord::pending(version));
        // The site keeps serving what it has (local id, published version) until the new
        // version is published there.
        p.version = version;
        p.state = PlacementState::Pending;
        p.bytes_sent = 0;
        p.bytes_needed = 0;
        p.wire_bytes = 0;
        p.error = None;
        placements.push((site.clone(), p));
    }
    image.current_version = version;
    let chunk_refs = shared.store.with_ref(ids);
    let note = VersionNote { change };
    shared.catalog.commit_image(ImageCommit {
        global_id: g,
        image: &image,
        manifest: &mrec,
        placements,
        chunk_refs: chunk_refs.clone(),
        note: &note,
    })?;
    shared.store.apply_refs(&chunk_refs);
    info!(global_id = %g, version, change = %note.change, "new version");
    Ok((version, image.sites))
}

fn unknown_path(g: &GlobalId, version: u32, path: &str, files: &[FileEntry]) -> EngineError {
    let names: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
    EngineError::Invalid(format!(
        "{g} version {version} has no file {path:?} (its files: {})",
        names.join(", ")
    ))
}

fn human(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / (1 << 20) as f64)
    } else if n >= 1024 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} B")
    }
}

/// Apply an adaptation block (ops in order) to the current version. Blocking.
pub(crate) fn adapt(
    shared: &Shared,
    req: AdaptRequest,
    bytes_uploaded: u64,
) -> Result<(u32, Vec<String>), EngineError> {
    let g = req.global_id;
    let image = shared
        .catalog
        .image(&g)?
        .ok_or(EngineError::UnknownImage(g))?;
    let cur = shared
        .catalog
        .manifest(&g, image.current_version)?
        .ok_or_else(|| {
            EngineError::Internal(format!("manifest {g}@{} missing", image.current_version))
        })?;
    if req.ops.is_empty() {
        return Err(EngineError::Invalid(
            "an adaptation block needs at least one change".into(),
        ));
    }
    let v = cur.manifest.version;
    let mut files = cur.manifest.files;
    let mut changes = Vec::new();
    let find = |files: &[FileEntry], path: &str| files.iter().position(|f| f.path == path);
    for op in req.ops {
        match op {
            AdaptOp::Replace { path, mode, recipe } => {
                let i = find(&files, &path).ok_or_else(|| unknown_path(&g, v, &path, &files))?;
                changes.push(format!("replace {path} ({})", human(recipe.len)));
                files[i].recipe = recipe;
                files[i].mode = mode & 0o7777;
            }
            AdaptOp::Add(entry) => {
                validate_file_name(&entry.path).map_err(|e| EngineError::Invalid(e.to_string()))?;
                if find(&files, &entry.path).is_some() {
                    return Err(EngineError::Invalid(format!(
                        "{g} version {v} already has a file {:?} (replace it instead)",
                        entry.path
                    )));
                }
                changes.push(format!("add {} ({})", entry.path, human(entry.recipe.len)));
                files.push(entry);
            }
            AdaptOp::Remove { path } => {
                let i = find(&files, &path).ok_or_else(|| unknown_path(&g, v, &path, &files))?;
                files.remove(i);
                changes.push(format!("remove {path}"));
            }
            AdaptOp::Write { path, offset, data } => {
                let i = find(&files, &path).ok_or_else(|| unknown_path(&g, v, &path, &files))?;
                if data.len() > MAX_WRITE {
                    return Err(EngineError::Invalid(format!(
                        "a write of {} bytes exceeds the limit of {MAX_WRITE} (replace the file instead)",
                        data.len()
                    )));
                }
                let recipe = write(shared, &files[i].recipe, &path, offset, &data)?;
                files[i].recipe = recipe;
                changes.push(format!(
                    "write {path}@{offset} ({})",
                    human(data.len() as u64)
                ));
            }
        }
    }
    commit_next(shared, g, files, changes.join("; "), bytes_uploaded)
}

/// Apply one write: re-cut the touched region, store the new chunks, return the recipe.
fn write(
    shared: &Shared,
    recipe: &FileRecipe,
    path: &str,
    offset: u64,
    data: &[u8],
) -> Result<FileRecipe, EngineError> {
    let mut read =
        |id: &ChunkId| read_raw(shared, id).map_err(|e| std::io::Error::other(e.to_string()));
    let out =
        apply_write(recipe, shared.cfg.chunking, offset, data, &mut read).map_err(|e| match e {
            EditError::OffsetPastEnd { offset, len } => EngineError::Invalid(format!(
                "offset {offset} is past the end of {path:?} ({len} bytes)"
            )),
            EditError::EmptyWrite => EngineError::Invalid(format!("empty write to {path:?}")),
            e => EngineError::Internal(format!("write to {path:?}: {e}")),
        })?;
    let verified: Vec<_> = out
        .new_chunks
        .iter()
        .filter(|(id, _)| !shared.store.contains(id))
        .map(|(id, raw): &(ChunkId, Bytes)| {
            UnverifiedChunk(CompressedChunk::compress(*id, raw, 3))
                .verify(shared.cfg.chunking.max)
                .map_err(|e| EngineError::Internal(e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    shared.store.insert(&verified, &shared.catalog)?;
    Ok(out.recipe)
}

/// Make the next version a copy of version `to`. Blocking.
pub(crate) fn rollback(
    shared: &Shared,
    g: GlobalId,
    to: u32,
) -> Result<(u32, Vec<String>), EngineError> {
    let image = shared
        .catalog
        .image(&g)?
        .ok_or(EngineError::UnknownImage(g))?;
    if to == image.current_version {
        return Err(EngineError::Invalid(format!(
            "version {to} is already the current version of {g}"
        )));
    }
    let target = shared.catalog.manifest(&g, to)?.ok_or_else(|| {
        EngineError::Invalid(format!(
            "{g} has no version {to} (versions 1 to {})",
            image.current_version
        ))
    })?;
    commit_next(
        shared,
        g,
        target.manifest.files,
        format!("rollback to version {to}"),
        0,
    )
}

/// Every version of `g`, oldest first.
pub(crate) fn history(shared: &Shared, g: &GlobalId) -> Result<Vec<VersionInfo>, EngineError> {
    if shared.catalog.image(g)?.is_none() {
        return Err(EngineError::UnknownImage(*g));
    }
    shared
        .catalog
        .manifests(g)?
        .into_iter()
        .map(|m| {
            let change = match shared.catalog.note(g, m.manifest.version)? {
                Some(n) => n.change,
                None => "push".to_string(),
            };
            Ok(VersionInfo {
                version: m.manifest.version,
                parent: m.manifest.parent,
                created_unix: m.created_unix,
                total_len: m.manifest.total_len(),
                data_len: m.manifest.files.iter().map(|f| f.recipe.data_len()).sum(),
                files: m.manifest.files.iter().map(|f| f.path.clone()).collect(),
                change,
                bytes_uploaded: m.bytes_uploaded,
            })
        })
        .collect()
}
