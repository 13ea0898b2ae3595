//! Where every image is: the catalog's placements, with live byte counts of transfers in
//! flight, in the shape clients print; and `watch`, which streams that until a version has
//! settled everywhere.

use std::time::Duration;

use quinn::SendStream;
use seedcast_core::GlobalId;
use seedcast_core::protocol::{ImageStatus, PlacementState, Response, SiteInfo, SitePlacement};
use seedcast_net::{FramedError, write_msg};

use crate::EngineError;
use crate::catalog::{ImageRecord, ManifestRecord, PlacementRecord};
use crate::state::Shared;

pub(crate) fn image(shared: &Shared, g: &GlobalId) -> Result<ImageStatus, EngineError> {
    image_with(shared, g, &mut None)
}

/// A version's sizes, from its manifest. A version never changes once made, so `watch`
/// reads them once instead of decoding the whole manifest every 200 ms (a 1 GiB image's
/// manifest decoded five times a second was a seventh of the engine's CPU while seeding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sizes {
    version: u32,
    total_len: u64,
    data_len: u64,
    bytes_uploaded: u64,
}

impl Sizes {
    fn of(version: u32, m: &ManifestRecord) -> Sizes {
        Sizes {
            version,
            total_len: m.manifest.total_len(),
            data_len: m.manifest.data_len(),
            bytes_uploaded: m.bytes_uploaded,
        }
    }
}

/// As [`image`], keeping the current version's sizes in `sizes` for the next call.
fn image_with(
    shared: &Shared,
    g: &GlobalId,
    sizes: &mut Option<Sizes>,
) -> Result<ImageStatus, EngineError> {
    let img = shared
        .catalog
        .image(g)?
        .ok_or(EngineError::UnknownImage(*g))?;
    let current = match *sizes {
        Some(s) if s.version == img.current_version => s,
        _ => {
            let m = shared.catalog.manifest(g, img.current_version)?.ok_or(
                EngineError::ManifestMissing {
                    global_id: *g,
                    version: img.current_version,
                },
            )?;
            *sizes.insert(Sizes::of(img.current_version, &m))
        }
    };
    let placements = shared.catalog.placements(g)?;
    Ok(build(g, &img, current, placements, |site| {
        shared.live.get(g, site)
    }))
}

/// An image's status from its records: `live` gives the bytes sent so far by a transfer in
/// flight to a site and its current rate (the record holds the last finished transfer's
/// count).
pub(crate) fn build(
    g: &GlobalId,
    img: &ImageRecord,
    current: Sizes,
    placements: Vec<(String, PlacementRecord)>,
    live: impl Fn(&str) -> Option<(u64, u64)>,
) -> ImageStatus {
    let mut sites: Vec<SitePlacement> = placements
        .into_iter()
        .map(|(site, p)| {
            let (bytes_sent, rate) = match p.state {
                PlacementState::Transferring => live(&site).unwrap_or((p.bytes_sent, 0)),
                _ => (p.bytes_sent, 0),
            };
            let eta_secs = (rate > 0 && p.bytes_needed > 0)
                .then(|| p.bytes_needed.saturating_sub(bytes_sent).div_ceil(rate));
            SitePlacement {
                site,
                local_id: p.local_id,
                version: p.version,
                state: p.state,
                bytes_sent,
                bytes_needed: p.bytes_needed,
                error: p.error,
                wire_bytes: p.wire_bytes,
                rate,
                eta_secs,
            }
        })
        .collect();
    sites.sort_by(|a, b| a.site.cmp(&b.site));
    ImageStatus {
        global_id: *g,
        name: img.name.clone(),
        version: img.current_version,
        bytes_uploaded: current.bytes_uploaded,
        total_len: current.total_len,
        data_len: current.data_len,
        sites,
    }
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
    let connected = shared.agents.lock().clone();
    shared
        .catalog
        .sites()?
        .into_iter()
        .map(|(name, r)| {
            let settings = shared.catalog.site_settings(&name)?;
            Ok(SiteInfo {
                connected: connected.contains_key(&name),
                site: name,
                adapter: r.adapter,
                revoked: r.revoked,
                enrolled: r.cert_fingerprint.is_some(),
                cert_expires_unix: r.cert_expires_unix,
                max_rate: settings.max_rate,
                congestion: settings.congestion,
            })
        })
        .collect()
}

/// Has every site `version` targets published or failed? (Sites left out of it, e.g.
/// revoked since, are not waited for.)
pub(crate) fn settled(s: &ImageStatus, version: u32) -> bool {
    s.sites
        .iter()
        .filter(|p| p.version == version)
        .all(|p| p.state.is_final())
}

/// Send `Progress` until every target site of `version` is published or failed.
pub(crate) async fn watch(
    shared: &Shared,
    send: &mut SendStream,
    g: GlobalId,
    version: u32,
) -> Result<(), FramedError> {
    let mut rx = shared.changes.subscribe();
    let mut sizes = None;
    loop {
        let s = match image_with(shared, &g, &mut sizes) {
            Ok(s) => s,
            Err(e) => {
                write_msg(send, &e.response()).await?;
                let _ = send.finish();
                return Ok(());
            }
        };
        let done = settled(&s, version);
        write_msg(send, &Response::Progress(s)).await?;
        if done {
            let _ = send.finish();
            return Ok(());
        }
        // Wake on a state change, or every 200 ms to report bytes sent.
        let _ = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use seedcast_core::manifest::{FileEntry, FileRecipe, MANIFEST_FORMAT};
    use seedcast_core::{ChunkId, ChunkerConfig, Extent, Manifest};

    fn records() -> (ImageRecord, ManifestRecord) {
        let recipe = FileRecipe {
            len: 5000,
            hash: [0; 32],
            extents: vec![
                Extent::Data {
                    id: ChunkId([1; 32]),
                    len: 1000,
                },
                Extent::Hole { len: 4000 },
            ],
        };
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            global_id: GlobalId([1; 12]),
            version: 2,
            parent: Some(1),
            name: "img".into(),
            chunking: ChunkerConfig::default(),
            files: vec![FileEntry {
                path: "d".into(),
                mode: 0o644,
                recipe,
                format: seedcast_core::manifest::FileFormat::Raw,
            }],
        };
        (
            ImageRecord {
                name: "img".into(),
                current_version: 2,
                sites: vec!["a".into(), "b".into()],
                created_unix: 0,
            },
            ManifestRecord {
                manifest,
                manifest_id: [0; 32],
                bytes_uploaded: 77,
                created_unix: 0,
            },
        )
    }

    #[test]
    fn status_sorts_sites_and_shows_live_bytes_only_while_transferring() {
        let (img, m) = records();
        let mut moving = PlacementRecord::pending(2);
        moving.state = PlacementState::Transferring;
        moving.bytes_sent = 5;
        moving.bytes_needed = 2500;
        let mut done = PlacementRecord::pending(2);
        done.state = PlacementState::Published;
        done.bytes_sent = 900;
        let s = build(
            &GlobalId([1; 12]),
            &img,
            Sizes::of(img.current_version, &m),
            vec![("b".into(), moving), ("a".into(), done)],
            |_| Some((500, 100)),
        );
        assert_eq!(
            s.sites.iter().map(|p| p.site.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(s.sites[0].bytes_sent, 900, "finished: the record's count");
        assert_eq!(s.sites[1].bytes_sent, 500, "in flight: the live count");
        assert_eq!((s.sites[1].rate, s.sites[1].eta_secs), (100, Some(20)));
        assert_eq!(
            (s.sites[0].rate, s.sites[0].eta_secs),
            (0, None),
            "done: no rate"
        );
        assert_eq!(
            (s.total_len, s.data_len, s.bytes_uploaded),
            (5000, 1000, 77)
        );
        assert_eq!((s.version, s.name.as_str()), (2, "img"));
    }

    #[test]
    fn a_version_settles_when_its_own_targets_are_final() {
        let (img, m) = records();
        let at = |state, version| {
            let mut p = PlacementRecord::pending(version);
            p.state = state;
            p
        };
        let s = |a, b| {
            build(
                &GlobalId([1; 12]),
                &img,
                Sizes::of(img.current_version, &m),
                vec![("a".into(), a), ("b".into(), b)],
                |_| None,
            )
        };
        assert!(!settled(
            &s(
                at(PlacementState::Published, 2),
                at(PlacementState::Pending, 2)
            ),
            2
        ));
        assert!(settled(
            &s(
                at(PlacementState::Published, 2),
                at(PlacementState::Failed, 2)
            ),
            2
        ));
        // b was left at version 1 (revoked): not waited for.
        assert!(settled(
            &s(
                at(PlacementState::Published, 2),
                at(PlacementState::Pending, 1)
            ),
            2
        ));
    }
}
