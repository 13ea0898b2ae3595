//! Making versions: the one place a set of files becomes a version of an image.
//!
//! Version 1 (a push, [`first`]) and every later version (an adaptation block or a
//! rollback, [`next`]) go through [`commit`]: the files are validated, every chunk they name
//! must be held with the length the recipe gives, the manifest is built and named, and the
//! image record, manifest, placements, note and chunk reference counts are written as one
//! synced batch. [`make`] runs that on a blocking thread under the engine's version lock, so
//! two blocks cannot build on the same parent and reference counts have one writer; then it
//! wakes the target sites and tells watchers.

use std::collections::BTreeSet;
use std::sync::Arc;

use seedcast_core::manifest::{MANIFEST_FORMAT, validate_files, validate_image_name};
use seedcast_core::protocol::{ImageStatus, PlacementState};
use seedcast_core::source::ChunkSource;
use seedcast_core::{ChunkId, Extent, FileEntry, GlobalId, Manifest};
use tracing::info;

use crate::catalog::{
    ImageCommit, ImageRecord, ManifestRecord, PlacementRecord, VersionNote, unix_now,
};
use crate::state::Shared;
use crate::{EngineError, sites, status};

/// The files of a version to be made, and what made them.
#[derive(Debug, Clone)]
pub(crate) struct Draft {
    pub files: Vec<FileEntry>,
    /// What changed, for people (`history`).
    pub change: String,
    /// Chunk bytes the client uploaded for this version.
    pub bytes_uploaded: u64,
}

/// A version that was made: which image and which sites must now get it.
#[derive(Debug, Clone)]
pub(crate) struct Made {
    pub global_id: GlobalId,
    pub sites: Vec<String>,
}

/// Make a version on a blocking thread, one at a time per engine; then wake its sites,
/// tell watchers, and answer with its status.
pub(crate) async fn make(
    shared: &Arc<Shared>,
    f: impl FnOnce(&Shared) -> Result<Made, EngineError> + Send + 'static,
) -> Result<ImageStatus, EngineError> {
    let sh = shared.clone();
    let made = tokio::task::spawn_blocking(move || {
        let _one_at_a_time = sh.versions.lock();
        f(&sh)
    })
    .await??;
    prepare_bases(shared, &made);
    for s in &made.sites {
        shared.wake_site(s);
    }
    shared.changed();
    status::image(shared, &made.global_id)
}

/// Start indexing the versions the target sites hold of this image as delta bases, and
/// encoding the first delta groups each will be sent, now: each site asks a round trip
/// later, and its first byte would wait for both. The groups are those the sender will
/// plan when a site lacks exactly the chunks its held version does not have (the usual
/// case); other sites find nothing prepared and encode as before.
fn prepare_bases(shared: &Arc<Shared>, made: &Made) {
    let Ok(Some(image)) = shared.catalog.image(&made.global_id) else {
        return;
    };
    let mut versions = std::collections::BTreeSet::new();
    for site in &made.sites {
        if let Ok(Some(p)) = shared.catalog.placement(&made.global_id, site)
            && let Some(v) = p.published_version
            && v != image.current_version
        {
            versions.insert(v);
        }
    }
    for version in versions {
        let sh = shared.clone();
        let (g, target) = (made.global_id, image.current_version);
        tokio::spawn(async move {
            if let Err(e) = prepare(&sh, g, version, target).await {
                tracing::debug!("delta bases not prepared: {e}");
            }
        });
    }
}

/// Index version `held` of `g` as bases and encode the first groups of `target` against it.
async fn prepare(
    shared: &Arc<Shared>,
    g: GlobalId,
    held: u32,
    target: u32,
) -> Result<(), EngineError> {
    let bases = vec![seedcast_core::protocol::HeldVersion {
        global_id: g,
        version: held,
    }];
    let Some(deltas) = crate::distribute::index_bases(shared, bases, Vec::new()).await? else {
        return Ok(());
    };
    let (Some(old), Some(new)) = (
        shared.catalog.manifest(&g, held)?,
        shared.catalog.manifest(&g, target)?,
    ) else {
        return Ok(());
    };
    let have = old.manifest.first_uses();
    let mut seen = std::collections::HashSet::new();
    let need: Vec<_> = new
        .manifest
        .files
        .iter()
        .flat_map(|f| f.recipe.chunks_at())
        .filter(|(_, id, _)| !have.contains_key(id) && seen.insert(*id))
        .map(|(_, id, _)| id)
        .collect();
    let groups =
        seedcast_core::sender::plan_groups(&need, &new.manifest.first_uses(), &shared.cfg.send);
    let level = crate::data_streams::start_level(&deltas);
    let first = groups.into_iter().take(shared.cfg.streams_per_transfer);
    let encodes = first.map(|chunks| {
        let source = shared.reads.clone() as Arc<dyn seedcast_core::source::ChunkSource>;
        deltas
            .cache
            .group(source, deltas.index.clone(), deltas.key, chunks, level)
    });
    for r in futures::future::join_all(encodes).await {
        r?;
    }
    Ok(())
}

/// Version 1 of a new image named `name`, for `sites` (every site in good standing when
/// `None`).
pub(crate) fn first(
    shared: &Shared,
    name: String,
    sites: Option<Vec<String>>,
    draft: Draft,
) -> Result<Made, EngineError> {
    validate_image_name(&name)?;
    let mut draft = draft;
    let ids = check(shared, &mut draft.files)?;
    let sites = sites::targets(&shared.catalog, sites)?;
    let global_id = loop {
        let g = GlobalId(rand::random());
        if !shared.catalog.image_exists(&g)? {
            break g;
        }
    };
    let placements = sites
        .iter()
        .map(|s| (s.clone(), PlacementRecord::pending(1)))
        .collect();
    let image = ImageRecord {
        name,
        current_version: 1,
        sites,
        created_unix: unix_now(),
    };
    commit(shared, global_id, image, None, draft, ids, placements)
}

/// The next version of `g`, its files made by `f` from the current version's manifest.
/// Revoked sites are no longer targets: they keep their old mapping and get nothing new.
pub(crate) fn next(
    shared: &Shared,
    g: GlobalId,
    f: impl FnOnce(&ManifestRecord) -> Result<Draft, EngineError>,
) -> Result<Made, EngineError> {
    let mut image = shared
        .catalog
        .image(&g)?
        .ok_or(EngineError::UnknownImage(g))?;
    let parent = image.current_version;
    let cur = shared
        .catalog
        .manifest(&g, parent)?
        .ok_or(EngineError::ManifestMissing {
            global_id: g,
            version: parent,
        })?;
    let mut draft = f(&cur)?;
    let ids = check(shared, &mut draft.files)?;
    let revoked = sites::revoked(&shared.catalog)?;
    image.sites.retain(|s| !revoked.contains(s));
    let version = parent + 1;
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
    commit(shared, g, image, Some(parent), draft, ids, placements)
}

/// Validate a version's files against the rules and the engine's caps, give each the hash
/// of its recipe (files carried from a format-2 version had the hash of their bytes; a
/// client's is derived data and not trusted) and only permission bits, and check every
/// chunk they name; the distinct chunk ids.
fn check(shared: &Shared, files: &mut [FileEntry]) -> Result<BTreeSet<ChunkId>, EngineError> {
    shared.cfg.limits.check(files)?;
    validate_files(files, &shared.cfg.chunking)?;
    for f in files.iter_mut() {
        f.recipe.hash = f.recipe.content_hash();
        f.mode &= 0o777;
    }
    check_chunks(&*shared.store, files)
}

/// Every data extent must name a chunk the store holds, with the length it holds.
/// Returns the distinct chunk ids.
pub(crate) fn check_chunks(
    source: &dyn ChunkSource,
    files: &[FileEntry],
) -> Result<BTreeSet<ChunkId>, EngineError> {
    let mut ids = BTreeSet::new();
    let mut missing = Vec::new();
    for f in files {
        for e in &f.recipe.extents {
            let Extent::Data { id, len } = e else {
                continue;
            };
            match source.info(id) {
                None => missing.push(*id),
                Some(i) if i.raw_len != *len => {
                    return Err(EngineError::ChunkLength {
                        path: f.path.clone(),
                        id: *id,
                        held: i.raw_len,
                        recipe: *len,
                    });
                }
                Some(_) => {
                    ids.insert(*id);
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

/// Write version `image.current_version` of `g` atomically: image, manifest, placements,
/// note, chunk references.
fn commit(
    shared: &Shared,
    g: GlobalId,
    image: ImageRecord,
    parent: Option<u32>,
    draft: Draft,
    ids: BTreeSet<ChunkId>,
    placements: Vec<(String, PlacementRecord)>,
) -> Result<Made, EngineError> {
    let version = image.current_version;
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        global_id: g,
        version,
        parent,
        name: image.name.clone(),
        chunking: shared.cfg.chunking,
        files: draft.files,
    };
    let manifest_id = manifest.id()?;
    let mrec = ManifestRecord {
        manifest,
        manifest_id,
        bytes_uploaded: draft.bytes_uploaded,
        created_unix: unix_now(),
    };
    let chunk_refs = shared.store.with_ref(ids);
    let note = VersionNote {
        change: draft.change,
    };
    shared.catalog.commit_image(ImageCommit {
        global_id: g,
        image: &image,
        manifest: &mrec,
        placements,
        chunk_refs: chunk_refs.clone(),
        note: &note,
    })?;
    shared.store.apply_refs(&chunk_refs);
    info!(global_id = %g, name = %image.name, version, change = %note.change, sites = ?image.sites, "version committed");
    Ok(Made {
        global_id: g,
        sites: image.sites,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use seedcast_core::VerifiedChunk;
    use seedcast_core::manifest::FileRecipe;
    use seedcast_core::source::{ChunkStore, MemChunks};

    fn file(path: &str, extents: Vec<Extent>) -> FileEntry {
        let len = extents.iter().map(|e| e.len()).sum();
        FileEntry {
            path: path.into(),
            mode: 0o644,
            recipe: FileRecipe {
                len,
                hash: [0; 32],
                extents,
            },
            format: seedcast_core::manifest::FileFormat::Raw,
        }
    }

    #[test]
    fn every_chunk_must_be_held_with_its_length() {
        let store = MemChunks::new();
        let a = VerifiedChunk::from_raw(Bytes::from(vec![1u8; 3000]));
        store.insert(std::slice::from_ref(&a)).unwrap();
        let ok = file(
            "a",
            vec![
                Extent::Data {
                    id: a.id(),
                    len: 3000,
                },
                Extent::Hole { len: 1 << 20 },
                Extent::Data {
                    id: a.id(),
                    len: 3000,
                },
            ],
        );
        assert_eq!(
            check_chunks(&store, std::slice::from_ref(&ok)).unwrap(),
            [a.id()].into()
        );
        let wrong_len = file(
            "b",
            vec![Extent::Data {
                id: a.id(),
                len: 2999,
            }],
        );
        assert!(matches!(
            check_chunks(&store, &[wrong_len]),
            Err(EngineError::ChunkLength {
                held: 3000,
                recipe: 2999,
                ..
            })
        ));
        let lacking = file(
            "c",
            vec![
                Extent::Data {
                    id: ChunkId([7; 32]),
                    len: 10,
                },
                Extent::Data {
                    id: ChunkId([8; 32]),
                    len: 10,
                },
            ],
        );
        let e = check_chunks(&store, &[ok, lacking]).unwrap_err();
        assert!(
            matches!(e, EngineError::MissingChunks { count: 2, first } if first == ChunkId([7; 32])),
            "{e}"
        );
    }
}
