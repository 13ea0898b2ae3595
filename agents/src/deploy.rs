//! One deployment: plan → `NeedFrom` → receive → assemble → publish → `Published` (or
//! `Failed` with the reason).
//!
//! The plan ([`plan`]) decides what to ask for: chunks neither in the cache nor readable
//! from an image the site holds (those found in one are read, checked and cached now), and
//! which held version may serve as delta bases. The chunks then arrive on data streams
//! ([`crate::receive`]); when all are here the files are rebuilt and checked
//! ([`crate::assemble`]) and handed to the site's service through its adapter.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use seedcast_core::protocol::{AgentMsg, HeldVersion};
use seedcast_core::transfer::{Transfer, TransferError};
use seedcast_core::{ChunkId, Manifest};
use seedcast_net::write_msg;
use tracing::{debug, info, warn};

use crate::adapter::Leftover;
use crate::agent::Agent;
use crate::assemble::{Staging, assemble};
use crate::cache::{AgentDb, HeldRecord, Repair};
use crate::error::{AgentError, ReceiveError};
use crate::receive::Active;
use crate::seeds::SeedIndex;
use crate::session::Control;

/// What to ask the engine for.
#[derive(Debug)]
pub(crate) struct Plan {
    pub transfer: Transfer,
    /// Versions whose chunks (except `unavailable`) may serve as delta bases.
    pub bases_from: Vec<HeldVersion>,
    pub unavailable: Vec<ChunkId>,
}

impl Plan {
    fn need_from(&self) -> AgentMsg {
        AgentMsg::NeedFrom {
            transfer: self.transfer.id(),
            chunks: self.transfer.need().to_vec(),
            bases_from: self.bases_from.clone(),
            unavailable: self.unavailable.clone(),
        }
    }
}

/// A deployment served: the image's local id, the payload bytes it took, and what the
/// version it replaced left to free once the engine has its answer.
struct Done {
    local_id: String,
    bytes_received: u64,
    leftover: Leftover,
}

impl Done {
    /// The image was already here.
    fn kept(local_id: String, bytes_received: u64) -> Done {
        Done {
            local_id,
            bytes_received,
            leftover: Leftover::default(),
        }
    }
}

/// The answer that asks for nothing (the image is here, or the deployment already failed):
/// sent so the engine's side of the exchange stays in step.
fn need_nothing(transfer: u64) -> AgentMsg {
    AgentMsg::NeedFrom {
        transfer,
        chunks: vec![],
        bases_from: vec![],
        unavailable: vec![],
    }
}

impl Agent {
    /// Serve one `Deploy` and answer it.
    pub(crate) async fn deploy(
        &self,
        ctl: &mut Control<'_>,
        transfer: u64,
        manifest: Manifest,
        signature: &[u8],
    ) -> Result<(), AgentError> {
        let (g, version) = (manifest.global_id, manifest.version);
        info!(site = %self.cfg.site, global_id = %g, version, transfer, "deploy");
        let result = match self.admissible(&manifest, &ctl.signing_key, signature) {
            Ok(manifest_id) => {
                self.receive_and_publish(ctl, transfer, manifest, manifest_id)
                    .await
            }
            Err(e) => Err(e),
        };
        ctl.slot.take();
        let mut leftover = Leftover::default();
        let reply = match result {
            Ok(done) => {
                leftover = done.leftover;
                AgentMsg::Published {
                    transfer,
                    local_id: done.local_id,
                    bytes_received: done.bytes_received,
                }
            }
            Err(e) if e.ends_session() => return Err(e),
            Err(e) => {
                warn!(global_id = %g, version, "deployment failed: {e}");
                AgentMsg::Failed {
                    transfer,
                    error: e.to_string(),
                }
            }
        };
        let answered = write_msg(ctl.send, &reply).await;
        // The replaced image left the service before the answer; its bytes go now, before
        // the next message is read (so space is free again before another deployment),
        // whether or not the answer got out.
        leftover.free().await;
        answered?;
        Ok(())
    }

    /// A manifest sent as a delta against one this site holds.
    pub(crate) async fn rebuild_manifest(
        &self,
        base: HeldVersion,
        delta: Vec<u8>,
        id: [u8; 32],
    ) -> Result<Manifest, AgentError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let m = db
                .manifest(&base.global_id, base.version)?
                .ok_or(AgentError::BaseNotHeld(base.global_id, base.version))?;
            Ok(Manifest::from_delta(&m, &delta, &id)?)
        })
        .await?
    }

    /// Retire images the service holds that this site has no record of (a crash between
    /// publishing a version and recording it). Only adapters that can list their own
    /// images take part; failures are logged, never fatal.
    pub(crate) async fn sweep_unrecorded(&self) {
        let listed = match self.adapter.list().await {
            Ok(Some(ids)) => ids,
            Ok(None) => return,
            Err(e) => {
                warn!("cannot list the site's images to sweep unrecorded ones: {e}");
                return;
            }
        };
        let db = self.db.clone();
        let inventory = async move {
            Ok::<_, AgentError>(tokio::task::spawn_blocking(move || db.inventory()).await??)
        };
        let recorded = match inventory.await {
            Ok(inv) => inv,
            Err(e) => return warn!("sweep: {e}"),
        };
        if recorded.is_empty() && !listed.is_empty() {
            // No record at all beside a pool with images: a lost database more likely than
            // a crash. Leave them for the operator.
            warn!(
                images = listed.len(),
                "the site's pool holds images this agent has no record of; leaving them"
            );
            return;
        }
        for id in listed {
            if !recorded.iter().any(|h| h.local_id == id) {
                info!(local_id = %id, "removing an image this site has no record of (left by an interrupted update)");
                self.adapter.retire(&id).await.free().await;
            }
        }
    }

    /// May this manifest be applied here? Signed by the engine's pinned key, and not older
    /// than the newest version of the image this site applied (nor that version with other
    /// content): forged images, replays and unsigned rollbacks stop here, before any chunk
    /// is asked for. Returns the manifest id.
    fn admissible(
        &self,
        manifest: &Manifest,
        signing_key: &[u8; 32],
        signature: &[u8],
    ) -> Result<[u8; 32], AgentError> {
        let (global_id, version) = (manifest.global_id, manifest.version);
        let manifest_id = manifest.id()?;
        seedcast_net::signing::verify(signing_key, &manifest_id, signature).map_err(|source| {
            AgentError::Unsigned {
                global_id,
                version,
                source,
            }
        })?;
        if let Some(floor) = self.db.floor(&global_id)? {
            let same_as_applied = || {
                self.db
                    .held(&global_id)
                    .ok()
                    .flatten()
                    .is_some_and(|h| h.version == version && h.manifest_id == manifest_id)
            };
            if version < floor.version || (version == floor.version && !same_as_applied()) {
                return Err(AgentError::Older {
                    global_id,
                    version,
                    floor: floor.version,
                });
            }
        }
        Ok(manifest_id)
    }

    /// Ask for what is missing, wait for it, assemble, publish.
    async fn receive_and_publish(
        &self,
        ctl: &mut Control<'_>,
        transfer_id: u64,
        manifest: Manifest,
        manifest_id: [u8; 32],
    ) -> Result<Done, AgentError> {
        let g = manifest.global_id;
        let held = self.db.held(&g)?;
        let repair = self.db.repair(&g)?;
        // Already published here (a repeated deployment): nothing to move — unless
        // `seedcast check --repair` marked it.
        if let Some(h) = &held
            && h.version == manifest.version
            && h.manifest_id == manifest_id
            && repair != Some(Repair::Republish)
            && self.adapter.exists(&h.local_id).await.unwrap_or(false)
        {
            if repair != Some(Repair::Refetch) {
                write_msg(ctl.send, &need_nothing(transfer_id)).await?;
                return Ok(Done::kept(h.local_id.clone(), 0));
            }
            // The copy is intact; the cache lost chunks of it: fetch them, keep the copy.
            let (transfer, _) = self.receive(ctl, transfer_id, manifest, None).await?;
            let db = self.db.clone();
            tokio::task::spawn_blocking(move || {
                db.flush_chunks()?;
                db.clear_repair(&g)
            })
            .await??;
            info!(global_id = %g, "chunks lost from the cache fetched again");
            return Ok(Done::kept(h.local_id.clone(), transfer.bytes_received()));
        }
        let dir = self.staging_dir(transfer_id);
        let (transfer, staging) = self.receive(ctl, transfer_id, manifest, Some(dir)).await?;
        let bytes_received = transfer.bytes_received();
        let manifest = transfer.into_manifest();
        // A republish is whole: never an overlay on (or an update of) a damaged copy.
        let held = held.filter(|_| repair != Some(Repair::Republish));
        let (local_id, leftover) = self
            .publish(
                transfer_id,
                manifest,
                manifest_id,
                held,
                repair.is_some(),
                staging,
            )
            .await?;
        Ok(Done {
            local_id,
            bytes_received,
            leftover,
        })
    }

    /// A fresh staging directory for transfer `transfer_id`.
    fn staging_dir(&self, transfer_id: u64) -> PathBuf {
        self.adapter
            .staging_root()
            .join(format!("t{transfer_id}-{}", uuid::Uuid::new_v4().simple()))
    }

    /// Plan, ask, and wait until every needed chunk is verified and cached — and, with a
    /// `stage` directory, written into the image being built there as it arrives.
    async fn receive(
        &self,
        ctl: &mut Control<'_>,
        transfer_id: u64,
        manifest: Manifest,
        stage: Option<PathBuf>,
    ) -> Result<(Transfer, Option<Arc<Staging>>), AgentError> {
        let seeds = Arc::new(SeedIndex::build(&self.db, self.adapter.as_ref()).await?);
        let (db, sd, limits) = (self.db.clone(), seeds.clone(), self.cfg.limits);
        let planned = tokio::task::spawn_blocking(move || {
            let plan = plan(&db, &sd, transfer_id, manifest, &limits)?;
            let staging = match stage {
                Some(dir) => Some(Arc::new(Staging::create(
                    plan.transfer.manifest(),
                    dir,
                    plan.transfer.need(),
                )?)),
                None => None,
            };
            Ok::<_, AgentError>((plan, staging))
        })
        .await?;
        let (plan, staging) = match planned {
            Ok(p) => p,
            Err(e) => {
                write_msg(ctl.send, &need_nothing(transfer_id)).await?;
                return Err(e);
            }
        };
        debug!(
            need = plan.transfer.need().len(),
            "asking for missing chunks"
        );
        // Copies found changed while reading seeds: the engine shows them drifted.
        for (hv, detail) in seeds.take_drifted() {
            warn!(global_id = %hv.global_id, version = hv.version, "published copy drifted: {detail}");
            let msg = AgentMsg::Drifted {
                global_id: hv.global_id,
                version: hv.version,
                detail,
            };
            write_msg(ctl.send, &msg).await?;
        }
        let ask = plan.need_from();
        let complete = plan.transfer.is_complete();
        // What the site holds is written into the image while the rest travels.
        let prefill = staging.clone().map(|s| {
            let (db, m) = (self.db.clone(), plan.transfer.manifest().clone());
            tokio::task::spawn_blocking(move || s.prefill(&db, &m))
        });
        let (active, done) = Active::new(plan.transfer, seeds, staging.clone());
        ctl.slot.begin(active);
        let received = async {
            write_msg(ctl.send, &ask).await?;
            if !complete {
                tokio::select! {
                    r = done => r.unwrap_or(Err(ReceiveError::Abandoned))?,
                    e = ctl.conn.closed() => return Err(e.into()),
                }
            }
            Ok::<_, AgentError>(ctl.slot.take().ok_or(ReceiveError::Abandoned)?)
        }
        .await;
        // The prefill is over before this returns, whatever happened: a failed transfer's
        // staging directory goes with it, not a moment later.
        if let (Some(p), Some(s)) = (prefill, &staging) {
            if received.is_err() {
                s.cancel();
            }
            let filled = p.await;
            if received.is_ok() {
                filled??;
            }
        }
        Ok((received?.transfer, staging))
    }

    /// Assemble (in `staging`, where the transfer's chunks were written as they came, or
    /// afresh) and verify every file, hand the image to the service, record it as held.
    async fn publish(
        &self,
        transfer_id: u64,
        manifest: Manifest,
        manifest_id: [u8; 32],
        held: Option<HeldRecord>,
        repairing: bool,
        staging: Option<Arc<Staging>>,
    ) -> Result<(String, Leftover), AgentError> {
        let g = manifest.global_id;
        // The copy being repaired, retired once its replacement is recorded.
        let damaged = if repairing && held.is_none() {
            self.db.held(&g)?.map(|h| h.local_id)
        } else {
            None
        };
        let db = self.db.clone();
        let dir = self.staging_dir(transfer_id);
        let m2 = manifest.clone();
        let image = tokio::task::spawn_blocking(move || {
            db.flush_chunks()?;
            let image = match staging {
                Some(s) => s.finish(&db, &m2)?,
                None => assemble(&db, &m2, dir)?,
            };
            Ok::<_, AgentError>(image)
        })
        .await??;
        info!(global_id = %g, version = manifest.version, adapter = self.adapter.kind(), "assembled and verified; publishing");
        // The new version is published beside the old, recorded (synced), and only then is
        // the old one retired: a crash at any point leaves the record naming an image that
        // exists.
        let (local_id, retire) = match &held {
            Some(h) => {
                let next = self.adapter.publish_next(&h.local_id, image).await?;
                (next.local_id, next.retire)
            }
            None => {
                let local_id = self.adapter.publish(image).await?;
                let retire = damaged.filter(|old| *old != local_id);
                (local_id, retire)
            }
        };
        let rec = HeldRecord {
            version: manifest.version,
            manifest_id,
            local_id: local_id.clone(),
            adapter: self.adapter.kind().to_string(),
        };
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.put_held(&g, &rec, &manifest)).await??;
        let leftover = match retire {
            Some(old) => self.adapter.retire(&old).await,
            None => Leftover::default(),
        };
        info!(global_id = %g, %local_id, "published");
        Ok((local_id, leftover))
    }
}

/// Decide what to ask for: chunks neither cached nor readable from a held image (those found
/// in one are read, checked and cached now), and which held version can serve as delta
/// bases. Blocking.
pub(crate) fn plan(
    db: &AgentDb,
    seeds: &SeedIndex,
    transfer_id: u64,
    manifest: Manifest,
    limits: &seedcast_core::manifest::Limits,
) -> Result<Plan, AgentError> {
    let g = manifest.global_id;
    let mut err = None;
    let mut seeded = Vec::new();
    // Chunks found here: the held version's chunks are mostly the same ones, and each
    // check reads the chunk's bytes (so a damaged one is found), so each is checked once.
    let mut here = HashSet::new();
    let t = Transfer::new(transfer_id, manifest, limits, |id| match db.has_chunk(id) {
        Ok(true) => {
            here.insert(*id);
            true
        }
        Ok(false) => match seeds.read(id) {
            Some(v) => {
                seeded.push(v);
                here.insert(*id);
                true
            }
            None => false,
        },
        Err(e) => {
            err.get_or_insert(e);
            false
        }
    });
    if let Some(e) = err {
        return Err(e.into());
    }
    let transfer = t.map_err(|e| match e {
        TransferError::Manifest(m) => AgentError::Manifest(m),
        e => ReceiveError::from(e).into(),
    })?;
    if !seeded.is_empty() {
        debug!(chunks = seeded.len(), "reused from images held here");
        db.put_chunks(&seeded)?;
    }
    let mut bases_from = Vec::new();
    let mut unavailable = Vec::new();
    if let Some(version) = seeds.held_version(&g)
        && let Some(m) = db.manifest(&g, version)?
    {
        bases_from.push(HeldVersion {
            global_id: g,
            version,
        });
        // A base must be readable when the engine names it: cache what the seeds hold
        // (checked), and report the rest (lost, or changed outside seedcast) unavailable.
        let mut from_seeds = Vec::new();
        for id in m.chunks().keys() {
            if here.contains(id) || db.has_chunk(id)? {
                continue;
            }
            match seeds.read(id) {
                Some(v) => from_seeds.push(v),
                None => unavailable.push(*id),
            }
        }
        db.put_chunks(&from_seeds)?;
    }
    Ok(Plan {
        transfer,
        bases_from,
        unavailable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::Adapter;
    use crate::adapters::dir::DirAdapter;
    use crate::cache::HeldRecord;
    use crate::testutil::{image, noise};
    use seedcast_core::{GlobalId, VerifiedChunk};

    fn manifest(version: u32, data: &[u8]) -> (Manifest, Vec<VerifiedChunk>) {
        image(GlobalId([5; 12]), version, data)
    }

    #[tokio::test]
    async fn the_plan_asks_only_for_what_neither_cache_nor_seeds_hold() {
        let tmp = tempfile::tempdir().unwrap();
        let db = AgentDb::open(&tmp.path().join("db")).unwrap();
        let dir = DirAdapter::new(tmp.path().join("pool")).unwrap();
        let v1 = noise("plan", 2 << 20);
        let (m1, c1) = manifest(1, &v1);
        // Version 1 is published here; then the cache loses all but its first two chunks.
        db.put_chunks(&c1).unwrap();
        let img = crate::assemble::assemble(&db, &m1, dir.staging_root().join("t")).unwrap();
        let local_id = dir.publish(img).await.unwrap();
        let rec = HeldRecord {
            version: 1,
            manifest_id: m1.id().unwrap(),
            local_id: local_id.clone(),
            adapter: "dir".into(),
        };
        db.put_held(&m1.global_id, &rec, &m1).unwrap();
        db.clear_chunks().unwrap();
        db.put_chunks(&c1[..2]).unwrap();
        // The published copy of the third chunk was changed outside seedcast.
        let (at, third, _) = m1.files[0].recipe.chunks_at().nth(2).unwrap();
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.image_dir(&local_id).join("disk.raw"))
            .unwrap()
            .write_all_at(b"tampered", at + 5)
            .unwrap();

        let mut v2 = v1.clone();
        v2[1_000_000..1_000_100].fill(7);
        let (m2, c2) = manifest(2, &v2);
        let seeds = SeedIndex::build(&db, &dir).await.unwrap();
        let plan = plan(&db, &seeds, 9, m2, &Default::default()).unwrap();
        let v1_ids: std::collections::HashSet<ChunkId> = c1.iter().map(|c| c.id()).collect();
        // Asked for: v2's new chunks and the damaged one; the rest came from the seed.
        let mut seen = std::collections::HashSet::new();
        let want: Vec<ChunkId> = c2
            .iter()
            .map(|c| c.id())
            .filter(|id| (!v1_ids.contains(id) || *id == third) && seen.insert(*id))
            .collect();
        assert_eq!(plan.transfer.need(), &want[..]);
        assert!(
            want.contains(&third) && want.len() < c2.len() / 4,
            "{}",
            want.len()
        );
        // Bases may come from version 1, all of it now cached except the damaged chunk.
        assert_eq!(
            plan.bases_from,
            [HeldVersion {
                global_id: GlobalId([5; 12]),
                version: 1
            }]
        );
        assert_eq!(plan.unavailable, [third]);
        for id in v1_ids.iter().filter(|id| **id != third) {
            assert!(db.has_chunk(id).unwrap(), "{id:?} cached from the seed");
        }
    }

    /// A dir pool that notes, each time an image is deleted, which version the agent's
    /// database records for the image at that moment.
    #[derive(Debug)]
    struct Spy {
        inner: DirAdapter,
        db: std::sync::OnceLock<Arc<AgentDb>>,
        deletes: parking_lot::Mutex<Vec<(String, Option<u32>)>>,
    }

    impl Adapter for Spy {
        fn kind(&self) -> &'static str {
            "dir"
        }
        fn keeps_copies(&self) -> bool {
            true
        }
        fn exists<'a>(
            &'a self,
            local_id: &'a str,
        ) -> futures::future::BoxFuture<'a, Result<bool, crate::AdapterError>> {
            self.inner.exists(local_id)
        }
        fn staging_root(&self) -> &std::path::Path {
            self.inner.staging_root()
        }
        fn publish(
            &self,
            image: crate::AssembledImage,
        ) -> futures::future::BoxFuture<'_, Result<String, crate::AdapterError>> {
            self.inner.publish(image)
        }
        fn read_back<'a>(
            &'a self,
            local_id: &'a str,
            file: &'a str,
        ) -> futures::future::BoxFuture<'a, Result<crate::ReadBack, crate::AdapterError>> {
            self.inner.read_back(local_id, file)
        }
        fn delete<'a>(
            &'a self,
            local_id: &'a str,
        ) -> futures::future::BoxFuture<'a, Result<(), crate::AdapterError>> {
            let recorded = self
                .db
                .get()
                .and_then(|db| db.held(&GlobalId([5; 12])).ok().flatten())
                .map(|h| h.version);
            self.deletes.lock().push((local_id.to_string(), recorded));
            self.inner.delete(local_id)
        }
    }

    #[tokio::test]
    async fn the_new_version_is_recorded_before_the_old_one_is_deleted() {
        let tmp = tempfile::tempdir().unwrap();
        let spy = Arc::new(Spy {
            inner: DirAdapter::new(tmp.path().join("pool")).unwrap(),
            db: Default::default(),
            deletes: Default::default(),
        });
        let cfg = crate::AgentConfig::new(tmp.path().join("agent"), "127.0.0.1:9", "s", None);
        let agent = Agent::open(cfg, spy.clone()).unwrap();
        spy.db.set(agent.db.clone()).unwrap();
        let v1 = noise("order", 1 << 20);
        let (m1, c1) = manifest(1, &v1);
        agent.db.put_chunks(&c1).unwrap();
        let id1 = agent
            .publish(1, m1.clone(), m1.id().unwrap(), None, false, None)
            .await
            .unwrap()
            .0;
        let mut v2 = v1.clone();
        v2[5000..5100].fill(1);
        let (mut m2, c2) = manifest(2, &v2);
        m2.parent = Some(1);
        agent.db.put_chunks(&c2).unwrap();
        let held = agent.db.held(&m2.global_id).unwrap();
        let (id2, leftover) = agent
            .publish(2, m2.clone(), m2.id().unwrap(), held, false, None)
            .await
            .unwrap();
        leftover.free().await;
        assert_ne!(id1, id2);
        // The old image went only once version 2 was on record.
        assert_eq!(*spy.deletes.lock(), [(id1.clone(), Some(2))]);
        assert!(!spy.inner.exists(&id1).await.unwrap());
        assert!(spy.inner.exists(&id2).await.unwrap());
    }

    #[tokio::test]
    async fn an_image_published_but_never_recorded_is_swept_at_start() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Arc::new(DirAdapter::new(tmp.path().join("pool")).unwrap());
        let cfg = crate::AgentConfig::new(tmp.path().join("agent"), "127.0.0.1:9", "s", None);
        let agent = Agent::open(cfg, dir.clone()).unwrap();
        let (m1, c1) = manifest(1, &noise("sweep", 1 << 20));
        agent.db.put_chunks(&c1).unwrap();
        let kept = agent
            .publish(1, m1.clone(), m1.id().unwrap(), None, false, None)
            .await
            .unwrap()
            .0;
        // Version 2 reached the pool, then the agent died before recording it.
        let (mut m2, c2) = manifest(2, &noise("sweep 2", 1 << 20));
        m2.parent = Some(1);
        agent.db.put_chunks(&c2).unwrap();
        let img = crate::assemble::assemble(&agent.db, &m2, dir.staging_root().join("t")).unwrap();
        let orphan = dir.publish(img).await.unwrap();
        let mut listed = dir.list().await.unwrap().unwrap();
        listed.sort();
        let mut both = vec![kept.clone(), orphan.clone()];
        both.sort();
        assert_eq!(listed, both);
        agent.sweep_unrecorded().await;
        assert_eq!(
            dir.list().await.unwrap().unwrap(),
            std::slice::from_ref(&kept)
        );
        assert!(dir.exists(&kept).await.unwrap() && !dir.exists(&orphan).await.unwrap());
    }
}
