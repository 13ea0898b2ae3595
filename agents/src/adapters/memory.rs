//! `memory`: images kept in memory. Not a site service: it stands for the services that
//! keep images away from the agent's host (Glance, a registry, an object store) in unit and
//! integration tests of the agent itself — it keeps no readable copies, so the agent's chunk
//! cache must serve delta bases, and `read_back` downloads a temporary copy.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::future::BoxFuture;

use crate::adapter::{Adapter, AdapterError, AssembledImage, ReadBack};

/// One image: its files by name.
type Files = HashMap<String, Vec<u8>>;

#[derive(Debug)]
pub struct MemoryAdapter {
    staging: tempfile::TempDir,
    images: Mutex<HashMap<String, Files>>,
    next: AtomicU64,
}

impl MemoryAdapter {
    pub fn new() -> Result<Self, AdapterError> {
        let staging = tempfile::Builder::new()
            .prefix("seedcast-memory-")
            .tempdir()
            .map_err(AdapterError::io("create", Path::new("staging")))?;
        Ok(MemoryAdapter {
            staging,
            images: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        })
    }

    /// Local ids of the images held.
    pub fn local_ids(&self) -> Vec<String> {
        let mut v: Vec<String> = self.images.lock().keys().cloned().collect();
        v.sort();
        v
    }
}

impl Adapter for MemoryAdapter {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn keeps_copies(&self) -> bool {
        false
    }

    fn exists<'a>(&'a self, local_id: &'a str) -> BoxFuture<'a, Result<bool, AdapterError>> {
        Box::pin(async move { Ok(self.images.lock().contains_key(local_id)) })
    }

    fn staging_root(&self) -> &Path {
        self.staging.path()
    }

    fn publish(&self, image: AssembledImage) -> BoxFuture<'_, Result<String, AdapterError>> {
        Box::pin(async move {
            let mut files = Files::new();
            for f in &image.files {
                let p = image.file_path(&f.name);
                files.insert(
                    f.name.clone(),
                    fs::read(&p).map_err(AdapterError::io("read", &p))?,
                );
            }
            let id = format!("mem-{}", self.next.fetch_add(1, Ordering::Relaxed));
            self.images.lock().insert(id.clone(), files);
            Ok(id)
        })
    }

    fn read_back<'a>(
        &'a self,
        local_id: &'a str,
        file: &'a str,
    ) -> BoxFuture<'a, Result<ReadBack, AdapterError>> {
        Box::pin(async move {
            let bytes = {
                let images = self.images.lock();
                let img = images
                    .get(local_id)
                    .ok_or_else(|| AdapterError::NotFound(local_id.to_string()))?;
                img.get(file)
                    .ok_or_else(|| AdapterError::NoSuchFile {
                        local_id: local_id.to_string(),
                        file: file.to_string(),
                    })?
                    .clone()
            };
            let mut t = tempfile::NamedTempFile::new_in(self.staging.path())
                .map_err(AdapterError::io("download", self.staging.path()))?;
            t.write_all(&bytes)
                .map_err(AdapterError::io("download", t.path()))?;
            Ok(ReadBack::Downloaded(t.into_temp_path()))
        })
    }

    fn delete<'a>(&'a self, local_id: &'a str) -> BoxFuture<'a, Result<(), AdapterError>> {
        Box::pin(async move {
            self.images
                .lock()
                .remove(local_id)
                .map(|_| ())
                .ok_or_else(|| AdapterError::NotFound(local_id.to_string()))
        })
    }
}
