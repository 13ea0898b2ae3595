//! Where every image is: the catalog's placements, with live byte counts of transfers in
//! flight, in the shape clients print.

use seedcast_core::GlobalId;
use seedcast_core::protocol::{ImageStatus, PlacementState, SiteInfo, SitePlacement};

use crate::{EngineError, Shared};

pub(crate) fn image(shared: &Shared, g: &GlobalId) -> Result<ImageStatus, EngineError> {
    let img = shared
        .catalog
        .image(g)?
        .ok_or(EngineError::UnknownImage(*g))?;
    let m = shared
        .catalog
        .manifest(g, img.current_version)?
        .ok_or_else(|| {
            EngineError::Internal(format!("manifest {g}@{} missing", img.current_version))
        })?;
    let live = shared.live.lock().expect("live lock").clone();
    let mut sites: Vec<SitePlacement> = shared
        .catalog
        .placements(g)?
        .into_iter()
        .map(|(site, p)| {
            let bytes_sent = if p.state == PlacementState::Transferring {
                live.get(&(*g, site.clone()))
                    .copied()
                    .unwrap_or(p.bytes_sent)
            } else {
                p.bytes_sent
            };
            SitePlacement {
                site,
                local_id: p.local_id,
                version: p.version,
                state: p.state,
                bytes_sent,
                bytes_needed: p.bytes_needed,
                error: p.error,
                wire_bytes: p.wire_bytes,
            }
        })
        .collect();
    sites.sort_by(|a, b| a.site.cmp(&b.site));
    Ok(ImageStatus {
        global_id: *g,
        name: img.name,
        version: img.current_version,
        bytes_uploaded: m.bytes_uploaded,
        total_len: m.manifest.total_len(),
        data_len: m.manifest.files.iter().map(|f| f.recipe.data_len()).sum(),
        sites,
    })
}

pub(crate) fn images(shared: &Shared) -> Result<Vec<ImageStatus>, EngineError> {
    shared
        .catalog
        .images()?
        .into_iter()
        .map(|(g, _)| image(shared, &g))
        .collect()
}

pub(crate) fn sites(shared: &Shared) -> Result<Vec<SiteInfo>, EngineError> {
    let connected = shared.agents.lock().expect("agents lock").clone();
    Ok(shared
        .catalog
        .sites()?
        .into_iter()
        .map(|(name, r)| SiteInfo {
            connected: connected.contains_key(&name),
            site: name,
            adapter: r.adapter,
            revoked: r.revoked,
        })
        .collect())
}
