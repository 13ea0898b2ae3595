//! The adapters, one module per kind of local image service.
//!
//! - [`dir`]: raw files in a directory pool; each image a directory named by a UUID.

pub mod dir;

use std::path::PathBuf;
use std::sync::Arc;

use crate::adapter::{Adapter, AdapterError};

/// Everything an adapter may need from the command line or a config file.
#[derive(Debug, Clone, Default)]
pub struct AdapterOptions {
    /// `dir`: the pool directory.
    pub pool: Option<PathBuf>,
}

/// Build the adapter named `kind`.
pub fn build(kind: &str, opts: &AdapterOptions) -> Result<Arc<dyn Adapter>, AdapterError> {
    match kind {
        "dir" => {
            let pool = opts
                .pool
                .clone()
                .ok_or_else(|| AdapterError::Service("the dir adapter needs --pool DIR".into()))?;
            Ok(Arc::new(dir::DirAdapter::new(pool)?))
        }
        other => Err(AdapterError::Service(format!(
            "unknown adapter {other:?} (available: dir)"
        ))),
    }
}
