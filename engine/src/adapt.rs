//! Adaptation blocks, history and rollback: what each changes. The versions they make are
//! made by [`crate::versions`].
//!
//! A block's operations apply in order to the current version's files ([`apply_ops`]);
//! any one that does not apply refuses the whole block. A write re-cuts only the chunks it
//! touches and stores the new ones ([`write`]).

use seedcast_core::edit::{EditError, apply_write};
use seedcast_core::manifest::validate_file;
use seedcast_core::protocol::{AdaptOp, AdaptRequest, MAX_WRITE, VersionInfo};
use seedcast_core::source::ChunkStore;
use seedcast_core::units::human_bytes;
use seedcast_core::{ChunkId, ChunkerConfig, FileEntry, FileRecipe, GlobalId, VerifiedChunk};

use crate::EngineError;
use crate::error::AdaptError;
use crate::state::Shared;
use crate::versions::{self, Draft, Made};

/// zstd level of chunks a write creates (as a push's client uses).
const WRITE_LEVEL: i32 = 3;

/// Apply an adaptation block as the next version. Blocking.
pub(crate) fn adapt(
    shared: &Shared,
    req: AdaptRequest,
    bytes_uploaded: u64,
) -> Result<Made, EngineError> {
    let g = req.global_id;
    versions::next(shared, g, |cur| {
        let (files, change) = apply_ops(
            g,
            cur.manifest.version,
            cur.manifest.files.clone(),
            req.ops,
            shared.cfg.chunking,
            &*shared.store,
        )?;
        Ok(Draft {
            files,
            change,
            bytes_uploaded,
        })
    })
}

/// Make the next version a copy of version `to`. Blocking.
pub(crate) fn rollback(shared: &Shared, g: GlobalId, to: u32) -> Result<Made, EngineError> {
    versions::next(shared, g, |cur| {
        let current = cur.manifest.version;
        if to == current {
            return Err(AdaptError::AlreadyCurrent {
                global_id: g,
                version: to,
            }
            .into());
        }
        let target = shared
            .catalog
            .manifest(&g, to)?
            .ok_or(AdaptError::NoSuchVersion {
                global_id: g,
                version: to,
                current,
            })?;
        Ok(Draft {
            files: target.manifest.files,
            change: format!("rollback to version {to}"),
            bytes_uploaded: 0,
        })
    })
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
                data_len: m.manifest.data_len(),
                files: m.manifest.files.iter().map(|f| f.path.clone()).collect(),
                change,
                bytes_uploaded: m.bytes_uploaded,
            })
        })
        .collect()
}

/// Apply `ops` in order to `files` (version `version` of `g`); new chunks of writes go to
/// `store`. Returns the new files and what changed, for people.
pub(crate) fn apply_ops(
    g: GlobalId,
    version: u32,
    mut files: Vec<FileEntry>,
    ops: Vec<AdaptOp>,
    chunking: ChunkerConfig,
    store: &dyn ChunkStore,
) -> Result<(Vec<FileEntry>, String), EngineError> {
    if ops.is_empty() {
        return Err(AdaptError::Empty.into());
    }
    let mut changes = Vec::new();
    for op in ops {
        let find = |files: &[FileEntry], path: &str| {
            files
                .iter()
                .position(|f| f.path == path)
                .ok_or_else(|| AdaptError::NoSuchFile {
                    global_id: g,
                    version,
                    path: path.to_string(),
                    files: files
                        .iter()
                        .map(|f| f.path.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
        };
        match op {
            AdaptOp::Replace {
                path,
                mode,
                recipe,
                format,
            } => {
                let i = find(&files, &path)?;
                changes.push(format!("replace {path} ({})", human_bytes(recipe.len)));
                files[i].recipe = recipe;
                files[i].mode = mode & 0o777;
                files[i].format = format;
                // Checked now, not only at commit: a later op of the block edits it.
                validate_file(&files[i], &chunking)?;
            }
            AdaptOp::Add(entry) => {
                validate_file(&entry, &chunking)?;
                if find(&files, &entry.path).is_ok() {
                    return Err(AdaptError::FileExists {
                        global_id: g,
                        version,
                        path: entry.path,
                    }
                    .into());
                }
                let size = human_bytes(entry.recipe.len);
                changes.push(format!("add {} ({size})", entry.path));
                files.push(entry);
            }
            AdaptOp::Remove { path } => {
                let i = find(&files, &path)?;
                files.remove(i);
                changes.push(format!("remove {path}"));
            }
            AdaptOp::Write { path, offset, data } => {
                let i = find(&files, &path)?;
                if data.len() > MAX_WRITE {
                    return Err(AdaptError::WriteTooLarge {
                        len: data.len(),
                        max: MAX_WRITE,
                    }
                    .into());
                }
                files[i].recipe = write(store, chunking, &files[i].recipe, &path, offset, &data)?;
                let size = human_bytes(data.len() as u64);
                changes.push(format!("write {path}@{offset} ({size})"));
            }
        }
    }
    Ok((files, changes.join("; ")))
}

/// Apply one write: re-cut the touched region, store the new chunks, return the recipe.
fn write(
    store: &dyn ChunkStore,
    chunking: ChunkerConfig,
    recipe: &FileRecipe,
    path: &str,
    offset: u64,
    data: &[u8],
) -> Result<FileRecipe, EngineError> {
    let mut read = |id: &ChunkId| store.read_verified(id).map(|v| v.raw().clone());
    let out = apply_write(recipe, chunking, offset, data, &mut read).map_err(|e| match e {
        EditError::OffsetPastEnd { offset, len } => AdaptError::OffsetPastEnd {
            path: path.to_string(),
            offset,
            len,
        },
        EditError::EmptyWrite => AdaptError::EmptyWrite {
            path: path.to_string(),
        },
        e => AdaptError::Edit {
            path: path.to_string(),
            source: Box::new(e) as Box<dyn std::error::Error + Send + Sync>,
        },
    })?;
    let fresh: Vec<VerifiedChunk> = out
        .new_chunks
        .into_iter()
        .filter(|(id, _)| !store.contains(id))
        .map(|(_, raw)| VerifiedChunk::compress(raw, WRITE_LEVEL))
        .collect();
    store.insert(&fresh)?;
    Ok(out.recipe)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{noise, stored_file as entry};
    use seedcast_core::manifest::Extent;
    use seedcast_core::source::ChunkSource;
    use seedcast_core::source::MemChunks;

    const G: GlobalId = GlobalId([6; 12]);

    fn apply(
        store: &MemChunks,
        files: &[FileEntry],
        ops: Vec<AdaptOp>,
    ) -> Result<(Vec<FileEntry>, String), EngineError> {
        apply_ops(G, 3, files.to_vec(), ops, ChunkerConfig::default(), store)
    }

    /// A Replace (or Add) whose recipe does not add up, followed by a Write to that file:
    /// refused as invalid, never a panic (which, under the version lock, once disabled
    /// every later adaptation).
    #[test]
    fn a_broken_recipe_then_a_write_is_refused_not_a_panic() {
        let store = MemChunks::new();
        let disk = noise(2, 300_000);
        let files = vec![entry(&store, "disk.raw", &disk)];
        let good = entry(&store, "x", &disk).recipe;
        let broken = [
            // Claims more bytes than its extents hold.
            FileRecipe {
                len: good.len + 1_000_000,
                ..good.clone()
            },
            // Extents that add up to more than its length.
            FileRecipe {
                len: 10,
                ..good.clone()
            },
            // A data extent longer than any chunk.
            FileRecipe {
                len: 1 << 30,
                hash: good.hash,
                extents: vec![seedcast_core::Extent::Data {
                    id: ChunkId([1; 32]),
                    len: 1 << 30,
                }],
            },
        ];
        for recipe in broken {
            for first in [
                AdaptOp::Replace {
                    path: "disk.raw".into(),
                    mode: 0o644,
                    recipe: recipe.clone(),
                    format: seedcast_core::manifest::FileFormat::Raw,
                },
                AdaptOp::Add(FileEntry {
                    path: "new".into(),
                    mode: 0o644,
                    recipe: recipe.clone(),
                    format: seedcast_core::manifest::FileFormat::Raw,
                }),
            ] {
                let target = match &first {
                    AdaptOp::Add(e) => e.path.clone(),
                    _ => "disk.raw".into(),
                };
                let ops = vec![
                    first,
                    AdaptOp::Write {
                        path: target,
                        offset: 5,
                        data: b"x".to_vec(),
                    },
                ];
                let e = apply(&store, &files, ops).unwrap_err();
                assert_eq!(e.kind(), seedcast_core::protocol::ErrorKind::Invalid, "{e}");
            }
        }
    }

    #[test]
    fn ops_apply_in_order_and_writes_match_the_edited_file() {
        let store = MemChunks::new();
        let disk = noise(1, 1 << 20);
        let files = vec![
            entry(&store, "disk.raw", &disk),
            entry(&store, "meta", b"m"),
        ];
        let added = entry(&store, "notes", b"hello");
        let ops = vec![
            AdaptOp::Write {
                path: "disk.raw".into(),
                offset: 500_000,
                data: b"patched".to_vec(),
            },
            AdaptOp::Remove {
                path: "meta".into(),
            },
            AdaptOp::Add(added.clone()),
        ];
        let (out, change) = apply(&store, &files, ops).unwrap();
        assert_eq!(
            change,
            "write disk.raw@500000 (7 B); remove meta; add notes (5 B)"
        );
        assert_eq!(
            out.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
            ["disk.raw", "notes"]
        );
        let mut edited = disk.clone();
        edited[500_000..500_007].copy_from_slice(b"patched");
        // The recipe rebuilds the edited bytes and names itself by its content hash.
        let mut rebuilt = Vec::new();
        for (_, e) in out[0].recipe.extents_at() {
            match e {
                Extent::Data { id, .. } => {
                    rebuilt.extend_from_slice(store.read_verified(id).unwrap().raw())
                }
                Extent::Hole { len } => rebuilt.resize(rebuilt.len() + *len as usize, 0),
            }
        }
        assert!(rebuilt == edited);
        assert_eq!(out[0].recipe.hash, out[0].recipe.content_hash());
        // Every chunk of the new recipe is in the store.
        assert!(versions::check_chunks(&store, &out).is_ok());
    }

    #[test]
    fn each_kind_of_bad_op_refuses_the_whole_block_with_its_reason() {
        let store = MemChunks::new();
        let files = vec![entry(&store, "disk.raw", &noise(2, 100_000))];
        let w = |path: &str, offset: u64, data: &[u8]| AdaptOp::Write {
            path: path.into(),
            offset,
            data: data.to_vec(),
        };
        let cases: Vec<(Vec<AdaptOp>, &str)> = vec![
            (vec![], "at least one change"),
            (
                vec![w("nope", 0, b"x")],
                "no file \"nope\" (its files: disk.raw)",
            ),
            (vec![w("disk.raw", 100_001, b"x")], "past the end"),
            (vec![w("disk.raw", 0, b"")], "empty write"),
            (
                vec![w("disk.raw", 0, &vec![0; MAX_WRITE + 1])],
                "exceeds the limit",
            ),
            (vec![AdaptOp::Add(files[0].clone())], "already has a file"),
            (vec![AdaptOp::Remove { path: "x".into() }], "no file \"x\""),
            (
                vec![AdaptOp::Add(FileEntry {
                    path: "a/b".into(),
                    ..files[0].clone()
                })],
                "invalid file name",
            ),
            // A valid op followed by a bad one: nothing applies.
            (
                vec![w("disk.raw", 0, b"ok"), w("disk.raw", 200_000, b"x")],
                "past the end",
            ),
        ];
        for (ops, want) in cases {
            let e = apply(&store, &files, ops.clone()).unwrap_err();
            assert!(e.to_string().contains(want), "{ops:?}: {e}");
            assert_eq!(e.kind(), seedcast_core::protocol::ErrorKind::Invalid, "{e}");
        }
    }

    #[test]
    fn an_unreadable_chunk_is_an_engine_fault_not_the_clients() {
        let store = MemChunks::new();
        let files = vec![entry(&store, "disk.raw", &noise(3, 300_000))];
        let first = files[0].recipe.chunks_at().next().unwrap().1;
        store.remove(&first);
        let e = apply(
            &store,
            &files,
            vec![AdaptOp::Write {
                path: "disk.raw".into(),
                offset: 10,
                data: b"x".to_vec(),
            }],
        )
        .unwrap_err();
        assert!(
            matches!(e, EngineError::Adapt(AdaptError::Edit { .. })),
            "{e}"
        );
        assert_eq!(e.kind(), seedcast_core::protocol::ErrorKind::Internal);
    }
}
