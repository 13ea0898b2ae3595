//! The one trait every local image service is reached through, and the verified image it
//! receives.
//!
//! An adapter only ever sees an [`AssembledImage`]: files that were rebuilt from verified
//! chunks and matched their whole-file hashes. Only [`crate::assemble`] can make one, so an
//! adapter cannot be handed something unchecked (received → verified → assembled →
//! published, each step a type).

use std::fmt;
use std::path::{Path, PathBuf};

use futures::future::BoxFuture;
use seedcast_core::GlobalId;
use seedcast_core::manifest::FileFormat;

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no image with local id {0:?} at this site")]
    NotFound(String),
    #[error("image {local_id:?} has no file {file:?}")]
    NoSuchFile { local_id: String, file: String },
    /// The adapter's options are incomplete or wrong.
    #[error("adapter configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Service(String),
    #[error(transparent)]
    Qemu(#[from] seedcast_qemu::QemuError),
    #[error("adapter task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl AdapterError {
    pub fn io<'a>(
        op: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(std::io::Error) -> AdapterError + 'a {
        move |source| AdapterError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// One file of an assembled image. Its staged bytes are what the recipe describes: for a
/// disk, the raw guest content, whatever format it was pushed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssembledFile {
    pub name: String,
    pub len: u64,
    pub mode: u32,
    /// The format the file was pushed in (a site rebuilds a qcow2 disk as qcow2 where its
    /// service keeps files).
    pub format: FileFormat,
    /// A VM disk (pushed as qcow2, or a raw `*.raw` file) rather than a kernel or metadata.
    pub disk: bool,
}

/// A verified image in a staging directory, ready to hand to a site's service.
///
/// Dropping it removes the staging directory, unless an adapter took it over with
/// [`AssembledImage::into_dir`].
pub struct AssembledImage {
    dir: Option<PathBuf>,
    pub global_id: GlobalId,
    pub version: u32,
    pub manifest_id: [u8; 32],
    pub name: String,
    pub files: Vec<AssembledFile>,
}

impl fmt::Debug for AssembledImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "AssembledImage({}@{} in {:?})",
            self.global_id, self.version, self.dir
        )
    }
}

impl AssembledImage {
    pub(crate) fn new(
        dir: PathBuf,
        global_id: GlobalId,
        version: u32,
        manifest_id: [u8; 32],
        name: String,
        files: Vec<AssembledFile>,
    ) -> Self {
        AssembledImage {
            dir: Some(dir),
            global_id,
            version,
            manifest_id,
            name,
            files,
        }
    }

    /// The staging directory holding the files (by their base names).
    pub fn dir(&self) -> &Path {
        self.dir.as_deref().expect("present until into_dir")
    }

    pub fn file_path(&self, name: &str) -> PathBuf {
        self.dir().join(name)
    }

    /// Take the staging directory over (e.g. to rename it into place); no cleanup follows.
    pub fn into_dir(mut self) -> PathBuf {
        self.dir.take().expect("present until into_dir")
    }
}

impl Drop for AssembledImage {
    fn drop(&mut self) {
        if let Some(d) = self.dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// A published file made readable here, as the bytes its recipe describes (a disk's guest
/// content): in place, a downloaded copy removed on drop, or the guest view of a disk
/// image exported by qemu while this lives.
#[derive(Debug)]
pub enum ReadBack {
    InPlace(PathBuf),
    Downloaded(tempfile::TempPath),
    Exported(seedcast_qemu::Export),
}

impl ReadBack {
    pub fn path(&self) -> &Path {
        match self {
            ReadBack::InPlace(p) => p,
            ReadBack::Downloaded(t) => t,
            ReadBack::Exported(e) => e.path(),
        }
    }
}

/// A next version published beside the old one ([`Adapter::publish_next`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Next {
    pub local_id: String,
    /// The old version's local id, to retire once the new one is recorded.
    pub retire: Option<String>,
}

impl Next {
    /// `new_id` replaces `old_id`, which is retired unless the service kept the id.
    pub fn replacing(new_id: String, old_id: &str) -> Next {
        let retire = (new_id != old_id).then(|| old_id.to_string());
        Next {
            local_id: new_id,
            retire,
        }
    }
}

/// What a retired image left on this host after it left the service's view (the dir pool's
/// renamed directory): removed by [`Leftover::free`], after the agent has answered.
#[derive(Debug, Default)]
#[must_use = "a retired image's bytes stay on disk until it is freed"]
pub struct Leftover(Option<PathBuf>);

impl Leftover {
    /// A directory, out of every reader's sight, to remove.
    pub fn dir(path: PathBuf) -> Leftover {
        Leftover(Some(path))
    }

    /// Remove it now (off the async runtime: a large image takes a while).
    pub async fn remove(self) -> Result<(), AdapterError> {
        let Some(path) = self.0 else { return Ok(()) };
        let p = path.clone();
        match tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&p)).await? {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(AdapterError::io("delete", &path)(e))
            }
            _ => Ok(()),
        }
    }

    /// [`Leftover::remove`], a failure logged: whatever stays is swept with the staging
    /// area when the agent next starts.
    pub async fn free(self) {
        if let Err(e) = self.remove().await {
            tracing::warn!("retired image not freed: {e}");
        }
    }
}

/// A site's local image service.
///
/// `publish` must be atomic as the service sees it: the image is either fully there under
/// its new local id or not at all. The local id is the service's own name for the image.
pub trait Adapter: Send + Sync + fmt::Debug {
    /// The name used on the command line (`--adapter`).
    fn kind(&self) -> &'static str;

    /// Whether published images stay readable on this host (a directory pool, qcow2 files):
    /// the agent then reads chunks of earlier versions from them as seeds. Services that
    /// keep images elsewhere (Glance, a registry, an object store) say `false`; the agent's
    /// chunk cache serves instead.
    fn keeps_copies(&self) -> bool;

    /// Does the service answer, with the credentials given? Called when the agent starts,
    /// so a site whose service is down or refuses says so plainly.
    fn check(&self) -> BoxFuture<'_, Result<(), AdapterError>> {
        Box::pin(async { Ok(()) })
    }

    /// Does the image known as `local_id` still exist in the service (an operator may have
    /// deleted it)? Cheap: reads no image bytes.
    fn exists<'a>(&'a self, local_id: &'a str) -> BoxFuture<'a, Result<bool, AdapterError>>;

    /// Where the assembler stages images for this adapter. For services on the local
    /// filesystem it is on the same filesystem, so publishing is a rename.
    fn staging_root(&self) -> &Path;

    /// Make `image` available in the service; returns its local id.
    fn publish(&self, image: AssembledImage) -> BoxFuture<'_, Result<String, AdapterError>>;

    /// Publish `image` as the next version of the image known as `local_id`, leaving the
    /// old one in place. Returns the new local id and the old one to retire once the new
    /// one is recorded (`None` when the service updated in place or the new version still
    /// needs the old, as a qcow2 overlay does). Splitting the two lets the agent record the
    /// new version *before* the old one goes: a crash in between leaves an extra image,
    /// never a record of a deleted one.
    fn publish_next<'a>(
        &'a self,
        local_id: &'a str,
        image: AssembledImage,
    ) -> BoxFuture<'a, Result<Next, AdapterError>> {
        Box::pin(async move { Ok(Next::replacing(self.publish(image).await?, local_id)) })
    }

    /// Take an image the site no longer needs out of the service; one already gone is
    /// fine, a failure is logged (the image is only extra). What it returns still holds the
    /// image's bytes until [`Leftover::free`]: the agent answers `Published` first, so
    /// deleting a large replaced image is not part of an update's time.
    fn retire<'a>(&'a self, local_id: &'a str) -> BoxFuture<'a, Leftover> {
        Box::pin(async move {
            match self.hide(local_id).await {
                Ok(left) => left,
                Err(AdapterError::NotFound(_)) => Leftover::default(),
                Err(e) => {
                    tracing::warn!(local_id, "old version not removed: {e}");
                    Leftover::default()
                }
            }
        })
    }

    /// Remove a published image from the service's view, leaving its space to be freed
    /// later. Services whose delete is one call do it all here.
    fn hide<'a>(&'a self, local_id: &'a str) -> BoxFuture<'a, Result<Leftover, AdapterError>> {
        Box::pin(async move { self.delete(local_id).await.map(|()| Leftover::default()) })
    }

    /// [`Adapter::publish_next`] then [`Adapter::retire`]: replace the image known as
    /// `local_id` with `image` (for callers with nothing to record in between).
    fn update<'a>(
        &'a self,
        local_id: &'a str,
        image: AssembledImage,
    ) -> BoxFuture<'a, Result<String, AdapterError>> {
        Box::pin(async move {
            let next = self.publish_next(local_id, image).await?;
            if let Some(old) = &next.retire {
                self.retire(old).await.free().await;
            }
            Ok(next.local_id)
        })
    }

    /// Read a published file back (to check it, or to seed new versions from it).
    fn read_back<'a>(
        &'a self,
        local_id: &'a str,
        file: &'a str,
    ) -> BoxFuture<'a, Result<ReadBack, AdapterError>>;

    /// The local ids of every image in the service that this adapter published, where the
    /// service can say so cheaply and unambiguously (a pool of its own); `None` otherwise.
    /// At start the agent retires those it has no record of: what a crash between
    /// publishing a version and recording it left behind.
    fn list(&self) -> BoxFuture<'_, Result<Option<Vec<String>>, AdapterError>> {
        Box::pin(async { Ok(None) })
    }

    /// Remove a published image.
    fn delete<'a>(&'a self, local_id: &'a str) -> BoxFuture<'a, Result<(), AdapterError>>;
}
