//! Pushing bytes: local files chunked on a thread of their own (streaming: memory stays at a
//! few batches), the engine asked which chunks it lacks, only those compressed (on every
//! core) and uploaded, two batches in flight.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::StreamExt;
use seedcast_core::chunker::StreamingChunker;
use seedcast_core::manifest::{FileFormat, RecipeBuilder, validate_file_name};
use seedcast_core::protocol::{ChunkHeader, MAX_UPLOAD_BATCH_BYTES, Request, Response};
use seedcast_core::{ChunkId, ChunkerConfig, CompressedChunk, FileEntry};
use seedcast_net::{FramedError, read_msg_required, write_msg};
use seedcast_qemu::GuestReader;
use std::sync::Arc;
use tokio::sync::mpsc;

use super::bases::{Bases, Outgoing};
use super::{Client, ClientError};

/// What to push.
#[derive(Debug, Clone)]
pub struct PushOptions {
    pub name: String,
    pub files: Vec<PathBuf>,
    /// Target sites; `None`: every site the engine knows.
    pub sites: Option<Vec<String>>,
    /// zstd level for uploaded chunks. 3: a good ratio at ~0.2–0.4 GB/s per core.
    pub zstd_level: i32,
    /// Raw bytes of new chunks per missing-check and upload round trip. 8 MiB.
    pub batch_bytes: usize,
    /// Files the client holds whose chunks the engine has (an earlier version): new chunks
    /// travel as delta groups against them.
    pub bases: Vec<PathBuf>,
    /// zstd level of those delta groups. 19.
    pub delta_level: i32,
}

/// Options of an adaptation block's upload.
#[derive(Debug, Clone)]
pub struct AdaptOptions {
    /// zstd level of chunks uploaded whole. 3.
    pub zstd_level: i32,
    /// Files the client holds whose chunks the engine has (the version being adapted):
    /// new chunks travel as delta groups against them.
    pub bases: Vec<PathBuf>,
    /// zstd level of those delta groups. 19, as `zstd -19 --patch-from`.
    pub delta_level: i32,
}

impl Default for AdaptOptions {
    fn default() -> Self {
        AdaptOptions {
            zstd_level: 3,
            bases: Vec::new(),
            delta_level: 19,
        }
    }
}

impl PushOptions {
    pub fn new(name: impl Into<String>, files: Vec<PathBuf>) -> Self {
        PushOptions {
            name: name.into(),
            files,
            sites: None,
            zstd_level: 3,
            batch_bytes: 8 << 20,
            bases: Vec::new(),
            delta_level: 19,
        }
    }
}

/// Progress of a push, for a progress bar.
#[derive(Debug, Clone, Copy, Default)]
pub struct PushProgress {
    /// Bytes of all files (holes included).
    pub total: u64,
    /// Bytes chunked so far.
    pub chunked: u64,
    /// Compressed bytes uploaded so far.
    pub uploaded: u64,
}

/// What the chunking thread sends.
enum Chunked {
    Batch {
        /// New distinct chunks with their file offsets.
        chunks: Vec<(ChunkId, Bytes, u64)>,
        chunked: u64,
    },
    File(FileEntry),
}

/// Files the client already has whose chunks the engine holds, and the zstd level of the
/// delta groups made against them.
#[derive(Debug, Clone)]
pub(crate) struct Deltas {
    pub bases: Bases,
    pub level: i32,
}

/// Base name of `p` as the image will know it.
pub(crate) fn base_name(p: &Path) -> Result<String, ClientError> {
    let name = p
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| ClientError::Usage(format!("{}: no usable file name", p.display())))?;
    validate_file_name(name).map_err(|e| ClientError::Usage(format!("{}: {e}", p.display())))?;
    Ok(name.to_string())
}

/// The total length of `files`, checking each is a regular file and names are unique.
fn total_len(files: &[(PathBuf, String)]) -> Result<u64, ClientError> {
    let mut names = HashSet::new();
    let mut total = 0u64;
    for (p, name) in files {
        if !names.insert(name.clone()) {
            return Err(ClientError::Usage(format!(
                "two files are named {name:?}: files of an image are known by their base names"
            )));
        }
        let md = std::fs::metadata(p).map_err(|source| ClientError::File {
            path: p.clone(),
            source,
        })?;
        if !md.is_file() {
            return Err(ClientError::Usage(format!(
                "{}: not a regular file",
                p.display()
            )));
        }
        total += seedcast_qemu::guest_len(p)?;
    }
    Ok(total)
}

impl Client {
    /// Chunk local files (each with the name the image knows it by), upload the chunks the
    /// engine lacks, return the files' entries.
    pub(crate) async fn upload_files(
        &self,
        files: Vec<(PathBuf, String)>,
        zstd_level: i32,
        batch_bytes: usize,
        deltas: Option<Deltas>,
        mut on_progress: impl FnMut(PushProgress),
    ) -> Result<Vec<FileEntry>, ClientError> {
        let listed = files.clone();
        let total = tokio::task::spawn_blocking(move || total_len(&listed))
            .await
            .map_err(|e| ClientError::Internal(e.to_string()))??;
        let mut progress = PushProgress {
            total,
            ..Default::default()
        };
        on_progress(progress);
        if files.is_empty() {
            return Ok(Vec::new());
        }

        let (tx, mut rx) = mpsc::channel::<Result<Chunked, ClientError>>(2);
        // At least 1 MiB per round trip; at most half what the engine holds of one batch
        // (a batch closes once it reaches this, plus one chunk).
        let batch_bytes = batch_bytes.clamp(
            1 << 20,
            MAX_UPLOAD_BATCH_BYTES as usize / 2 - 16 * 1024 * 1024,
        );
        let (cfg, batch_bytes) = (self.chunking, batch_bytes);
        let chunker = std::thread::spawn(move || chunk_files(files, cfg, batch_bytes, &tx));

        // Batches in flight at once: while one batch is uploaded and verified by the engine,
        // the next is asked about and compressed, so neither side's cores wait for the
        // other (one at a time, ingest ran at about half the speed of the work it did).
        const IN_FLIGHT: usize = 2;
        let deltas = deltas.as_ref();
        let batches = futures::stream::poll_fn(|cx| rx.poll_recv(cx)).map(|item| async move {
            match item? {
                Chunked::File(e) => Ok((Some(e), None)),
                Chunked::Batch { chunks, chunked } => {
                    let sent = self.upload_missing(chunks, zstd_level, deltas).await?;
                    Ok::<_, ClientError>((None, Some((chunked, sent))))
                }
            }
        });
        let mut batches = std::pin::pin!(batches.buffered(IN_FLIGHT));
        let mut entries = Vec::new();
        while let Some(done) = batches.next().await {
            match done? {
                (Some(e), _) => entries.push(e),
                (None, Some((chunked, sent))) => {
                    progress.chunked = chunked;
                    progress.uploaded += sent;
                    on_progress(progress);
                }
                (None, None) => {}
            }
        }
        chunker
            .join()
            .map_err(|_| ClientError::Internal("chunking thread panicked".into()))?;
        progress.chunked = total;
        on_progress(progress);
        Ok(entries)
    }

    /// Ask which of `chunks` the engine lacks; compress and upload those (as delta groups
    /// against the bases, given `deltas`). Returns the payload bytes uploaded.
    pub(crate) async fn upload_missing(
        &self,
        chunks: Vec<(ChunkId, Bytes, u64)>,
        level: i32,
        deltas: Option<&Deltas>,
    ) -> Result<u64, ClientError> {
        let ids: Vec<ChunkId> = chunks.iter().map(|(id, _, _)| *id).collect();
        let missing: HashSet<ChunkId> =
            match self.request(&Request::Missing { chunks: ids }).await? {
                Response::Missing { chunks } => chunks.into_iter().collect(),
                r => return Err(ClientError::Unexpected(format!("{r:?}"))),
            };
        let todo: Vec<(ChunkId, Bytes, u64)> = chunks
            .into_iter()
            .filter(|(id, _, _)| missing.contains(id))
            .collect();
        if todo.is_empty() {
            return Ok(0);
        }
        if let Some(d) = deltas {
            let records = encode_parallel(todo, level, d).await?;
            return self.upload_records(records).await;
        }
        let todo = todo.into_iter().map(|(id, raw, _)| (id, raw)).collect();
        let compressed = compress_parallel(todo, level).await?;
        let request = Request::Upload {
            count: compressed.len() as u32,
        };
        let records = compressed
            .into_iter()
            .map(|c| (ChunkHeader::of(&c), c.payload));
        self.send_records(&request, records).await
    }

    /// Upload chunk and delta-group records on one stream.
    async fn upload_records(&self, records: Vec<Outgoing>) -> Result<u64, ClientError> {
        let request = Request::UploadRecords {
            count: records.len() as u32,
        };
        let records = records
            .into_iter()
            .map(|r| (r.record(), r.payload().clone()));
        self.send_records(&request, records).await
    }

    /// Send `request` and its records (each a header frame and its payload) on a stream of
    /// their own; returns the payload bytes once the engine has stored them.
    async fn send_records<H: serde::Serialize>(
        &self,
        request: &Request,
        records: impl Iterator<Item = (H, Bytes)>,
    ) -> Result<u64, ClientError> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        write_msg(&mut send, request).await?;
        let mut bytes = 0u64;
        let mut written = Ok(());
        for (header, payload) in records {
            bytes += payload.len() as u64;
            written = async {
                write_msg(&mut send, &header).await?;
                send.write_chunk(payload).await.map_err(FramedError::from)
            }
            .await;
            if written.is_err() {
                break;
            }
        }
        let _ = send.finish();
        // An engine that refuses a record answers why and stops reading the rest, which can
        // fail a write still under way: its answer is the error to report.
        let answer = match (read_msg_required(&mut recv).await, written) {
            (Ok(r), _) => r,
            (Err(_), Err(w)) => return Err(w.into()),
            (Err(e), Ok(())) => return Err(e.into()),
        };
        match Self::check(answer)? {
            Response::Uploaded { .. } => Ok(bytes),
            r => Err(ClientError::Unexpected(format!("{r:?}"))),
        }
    }
}

/// Split a batch into one contiguous part per core (each keeps its file order, so groups
/// stay runs of neighbouring chunks).
fn split_per_core<T>(mut rest: Vec<T>) -> Vec<Vec<T>> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let per = rest.len().div_ceil(threads).max(1);
    let mut parts = Vec::new();
    while !rest.is_empty() {
        let tail = rest.split_off(per.min(rest.len()));
        parts.push(std::mem::replace(&mut rest, tail));
    }
    parts
}

/// Encode a batch as delta groups on every core.
async fn encode_parallel(
    todo: Vec<(ChunkId, Bytes, u64)>,
    level: i32,
    d: &Deltas,
) -> Result<Vec<Outgoing>, ClientError> {
    let mut handles = Vec::new();
    for part in split_per_core(todo) {
        let (bases, delta_level) = (Arc::clone(&d.bases), d.level);
        handles.push(tokio::task::spawn_blocking(move || {
            bases.encode(&part, level, delta_level)
        }));
    }
    let mut out = Vec::new();
    for h in handles {
        out.extend(
            h.await
                .map_err(|e| ClientError::Internal(e.to_string()))??,
        );
    }
    Ok(out)
}

/// Compress on every core: split the batch across blocking threads.
async fn compress_parallel(
    todo: Vec<(ChunkId, Bytes)>,
    level: i32,
) -> Result<Vec<CompressedChunk>, ClientError> {
    let mut handles = Vec::new();
    for part in split_per_core(todo) {
        handles.push(tokio::task::spawn_blocking(move || {
            part.into_iter()
                .map(|(id, raw)| CompressedChunk::compress(id, &raw, level))
                .collect::<Vec<_>>()
        }));
    }
    let mut out = Vec::new();
    for h in handles {
        out.extend(h.await.map_err(|e| ClientError::Internal(e.to_string()))?);
    }
    Ok(out)
}

/// Chunk every file (on the calling thread), sending batches of new distinct chunks and
/// each file's entry when it is done.
fn chunk_files(
    files: Vec<(PathBuf, String)>,
    cfg: ChunkerConfig,
    batch_bytes: usize,
    tx: &mpsc::Sender<Result<Chunked, ClientError>>,
) {
    let mut seen = HashSet::new();
    let mut batch = Vec::new();
    let mut batch_len = 0usize;
    let mut chunked = 0u64;
    let send = |item| tx.blocking_send(item).is_ok();
    for (path, name) in files {
        let fail = |source| ClientError::File {
            path: path.clone(),
            source,
        };
        let r = (|| {
            // Permission bits only: setuid, setgid and sticky are not carried to sites.
            let mode = std::fs::metadata(&path).map_err(fail)?.permissions().mode() & 0o777;
            // A qcow2 disk is read as its guest view, exported by qemu; anything else as is.
            let reader = GuestReader::open(&path)?;
            let format = match reader.format() {
                seedcast_qemu::Format::Qcow2 => FileFormat::Qcow2,
                seedcast_qemu::Format::Raw => FileFormat::Raw,
            };
            let mut rb = RecipeBuilder::new();
            let chunker = StreamingChunker::new(reader, cfg)
                .map_err(|e| ClientError::Usage(e.to_string()))?;
            for piece in chunker {
                let (offset, piece) = piece.map_err(fail)?;
                chunked += piece.len();
                if let Some((id, data)) = rb.push(piece)
                    && seen.insert(id)
                {
                    batch_len += data.len();
                    batch.push((id, data, offset));
                    if batch_len >= batch_bytes || batch.len() >= 1024 {
                        let chunks = std::mem::take(&mut batch);
                        batch_len = 0;
                        if !send(Ok(Chunked::Batch { chunks, chunked })) {
                            return Ok(None);
                        }
                    }
                }
            }
            Ok(Some(FileEntry {
                path: name.clone(),
                mode,
                recipe: rb.finish(),
                format,
            }))
        })();
        match r {
            Ok(Some(entry)) => {
                if !send(Ok(Chunked::File(entry))) {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                send(Err(e));
                return;
            }
        }
    }
    if !batch.is_empty() {
        send(Ok(Chunked::Batch {
            chunks: batch,
            chunked,
        }));
    }
}
