//! `seedcast check` of an agent's data directory: its records, its chunk cache (with
//! `read_data`, every chunk re-hashed) and every published copy, read back through the
//! site's service (`agent.toml`, saved at each start, says which) and compared with its
//! version — by size, and with `read_data` chunk by chunk and hole by hole.
//!
//! It runs beside a running agent: the database is opened as a RocksDB secondary and the
//! service is only read.
//!
//! `repair` (the agent stopped: it needs the database's lock) drops damaged cache chunks,
//! restoring each from an intact published copy where one holds it; images that still lack
//! chunks are marked to be fetched again, drifted or missing copies to be published again
//! (whole, under a new local id; the damaged copy is retired once the new one is recorded).
//! Then it connects to the engine as the site: marked images are left out of its
//! inventory, so the engine sends them again (only what the site lacks travels), and it
//! returns when every mark is cleared.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use seedcast_core::check::{ProblemKind, Report, Role, Touched};
use seedcast_core::{ChunkId, Extent, GlobalId, Manifest};

use crate::adapter::Adapter;
use crate::agent::Agent;
use crate::cache::{AgentDb, Repair};
use crate::config::SiteConfig;
use crate::error::AgentError;
use crate::seeds::SeedIndex;

/// What to check, and whether to repair.
#[derive(Debug, Clone, Copy)]
pub struct CheckOptions {
    /// Re-hash every cached chunk and read every published copy whole.
    pub read_data: bool,
    /// Fix what was found (needs the agent stopped).
    pub repair: bool,
    /// How long a repair may wait for the engine to send what the site lacks.
    pub repair_timeout: Duration,
}

/// A held image and its manifest.
struct HeldCopy {
    global_id: GlobalId,
    local_id: String,
    manifest: Manifest,
}

impl HeldCopy {
    fn touched(&self) -> Touched {
        Touched {
            global_id: self.global_id.to_string(),
            name: self.manifest.name.clone(),
            versions: vec![self.manifest.version],
        }
    }
}

/// Check the agent data directory `data`.
pub async fn check(data: &Path, opts: CheckOptions) -> Result<Report, AgentError> {
    let db_path = data.join("db");
    if !db_path.join("CURRENT").exists() {
        return Err(AgentError::Config(format!(
            "{} is not an agent data directory (no db in it)",
            data.display()
        )));
    }
    let saved = SiteConfig::saved(data)?;
    let adapter = match saved
        .as_ref()
        .and_then(|s| Some((s.adapter.clone()?, s.site.clone()?)))
    {
        Some((a, site)) => Some(a.build(data, &site)?),
        None => None,
    };
    let scratch = tempfile::tempdir().map_err(|e| AgentError::Config(format!("scratch: {e}")))?;
    let db = Arc::new(if opts.repair {
        AgentDb::open(&db_path)?
    } else {
        AgentDb::open_secondary(&db_path, scratch.path())?
    });
    let mut report = Report::new(
        data.display().to_string(),
        Role::Agent,
        opts.read_data,
        opts.repair,
    );

    let (records, bad) = db.audit_records();
    report.checked.records = records;
    for (what, why) in bad {
        report.add(
            ProblemKind::BadRecord,
            format!("agent db {what}"),
            why,
            vec![],
        );
    }
    let held = held_copies(&db, &mut report);
    report.checked.images = held.len() as u64;
    report.checked.versions = held.len() as u64;
    let mut users: HashMap<ChunkId, Vec<usize>> = HashMap::new();
    for (i, h) in held.iter().enumerate() {
        for id in h.manifest.chunks().keys() {
            users.entry(*id).or_default().push(i);
        }
    }
    let touched = |id: &ChunkId| -> Vec<Touched> {
        users
            .get(id)
            .into_iter()
            .flatten()
            .map(|i| held[*i].touched())
            .collect()
    };

    // The cache.
    let mut damaged: Vec<(ChunkId, usize)> = Vec::new();
    let d2 = db.clone();
    let read_data = opts.read_data;
    let (chunks, bytes, found) = tokio::task::spawn_blocking(move || scan_cache(&d2, read_data))
        .await
        .map_err(|e| AgentError::Config(format!("cache scan: {e}")))?;
    report.checked.chunks = chunks;
    report.checked.bytes_read += bytes;
    for f in found {
        match f {
            CacheFinding::Damaged(id) => {
                report.add(
                    ProblemKind::DamagedChunk,
                    format!("cache chunk {id}"),
                    "its cached bytes do not hash to its id".into(),
                    touched(&id),
                );
                damaged.push((id, report.problems.len() - 1));
            }
            CacheFinding::BadKey(k) => report.add(
                ProblemKind::BadRecord,
                format!("agent db chunks/{k}"),
                "key is not a chunk id".into(),
                vec![],
            ),
            CacheFinding::Unreadable(e) => report.add(
                ProblemKind::Unreadable,
                "agent db chunks".into(),
                format!("the cache cannot be read on: {e}"),
                vec![],
            ),
        }
    }

    // The published copies.
    let mut marks: BTreeMap<GlobalId, (Repair, Vec<usize>)> = BTreeMap::new();
    match &adapter {
        None => report.add(
            ProblemKind::Unreadable,
            "published images".into(),
            format!(
                "not checked: {} has no {} (start the agent once with this version)",
                data.display(),
                crate::config::SAVED_CONFIG
            ),
            vec![],
        ),
        Some(a) => {
            for h in &held {
                let item = format!(
                    "image {} v{} (local id {})",
                    h.global_id, h.manifest.version, h.local_id
                );
                let (kind, detail) = match a.exists(&h.local_id).await {
                    Ok(false) => (
                        ProblemKind::MissingImage,
                        format!("the site's {} service no longer has it", a.kind()),
                    ),
                    Err(e) => (ProblemKind::Unreadable, format!("asking the service: {e}")),
                    Ok(true) => match verify_copy(a.as_ref(), h, opts.read_data).await {
                        Ok(n) => {
                            report.checked.bytes_read += n;
                            continue;
                        }
                        Err(d) => (ProblemKind::Drifted, d),
                    },
                };
                report.add(kind, item, detail, vec![h.touched()]);
                if kind != ProblemKind::Unreadable {
                    marks
                        .entry(h.global_id)
                        .or_insert((Repair::Republish, vec![]))
                        .1
                        .push(report.problems.len() - 1);
                }
            }
        }
    }

    if opts.repair {
        repair(
            &db,
            adapter,
            &held,
            &users,
            damaged,
            &mut marks,
            &mut report,
        )
        .await?;
        drop(db);
        if !marks.is_empty() {
            let saved = saved.ok_or_else(|| {
                AgentError::Config(format!(
                    "cannot fetch from the engine: {} has no {}",
                    data.display(),
                    crate::config::SAVED_CONFIG
                ))
            })?;
            refetch(saved, &held, &marks, opts.repair_timeout, &mut report).await?;
        }
    }
    Ok(report)
}

/// Every held image with its manifest; what does not read is reported.
fn held_copies(db: &AgentDb, report: &mut Report) -> Vec<HeldCopy> {
    let inventory = match db.inventory() {
        Ok(i) => i,
        Err(e) => {
            report.add(
                ProblemKind::Unreadable,
                "agent db images".into(),
                e.to_string(),
                vec![],
            );
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for h in inventory {
        let what = format!("image {} v{}", h.global_id, h.version);
        match db.manifest(&h.global_id, h.version) {
            Ok(Some(m)) if m.id().is_ok_and(|id| id == h.manifest_id) => out.push(HeldCopy {
                global_id: h.global_id,
                local_id: h.local_id,
                manifest: m,
            }),
            Ok(Some(_)) => report.add(
                ProblemKind::BadRecord,
                what,
                "its manifest does not hash to the id recorded with the image".into(),
                vec![],
            ),
            Ok(None) => report.add(
                ProblemKind::MissingManifest,
                what,
                "the database has no manifest of the held version".into(),
                vec![],
            ),
            Err(e) => report.add(ProblemKind::BadRecord, what, e.to_string(), vec![]),
        }
    }
    out
}

enum CacheFinding {
    Damaged(ChunkId),
    BadKey(String),
    Unreadable(String),
}

/// Count (and with `read_data` re-hash) every cached chunk. Blocking.
fn scan_cache(db: &AgentDb, read_data: bool) -> (u64, u64, Vec<CacheFinding>) {
    let (mut n, mut bytes, mut found) = (0, 0, Vec::new());
    for item in db.scan_chunks_unchecked() {
        let (k, v) = match item {
            Ok(kv) => kv,
            Err(e) => {
                found.push(CacheFinding::Unreadable(e.to_string()));
                break;
            }
        };
        n += 1;
        let Ok(id) = <[u8; 32]>::try_from(&k[..]).map(ChunkId) else {
            found.push(CacheFinding::BadKey(hex::encode(&k)));
            continue;
        };
        if read_data {
            match v.raw() {
                Ok(raw) => {
                    bytes += raw.len() as u64;
                    if ChunkId::of(&raw) != id {
                        found.push(CacheFinding::Damaged(id));
                    }
                }
                Err(why) => {
                    tracing::debug!(chunk = %id, "cached chunk does not decode: {why}");
                    found.push(CacheFinding::Damaged(id));
                }
            }
        }
    }
    (n, bytes, found)
}

/// Compare a published copy with its version: each file's size, and with `read_data`
/// every data extent's hash and every hole's zeros. Returns the bytes read, or what
/// differs.
async fn verify_copy(a: &dyn Adapter, h: &HeldCopy, read_data: bool) -> Result<u64, String> {
    let mut total = 0;
    for f in &h.manifest.files {
        let rb = a
            .read_back(&h.local_id, &f.path)
            .await
            .map_err(|e| format!("file {:?}: {e}", f.path))?;
        let file = File::open(rb.path()).map_err(|e| format!("file {:?}: {e}", f.path))?;
        let len = file
            .metadata()
            .map_err(|e| format!("file {:?}: {e}", f.path))?
            .len();
        if len != f.recipe.len {
            return Err(format!(
                "file {:?} is {len} bytes; version {} has {}",
                f.path, h.manifest.version, f.recipe.len
            ));
        }
        if !read_data {
            continue;
        }
        let recipe = f.recipe.clone();
        let path = f.path.clone();
        total += tokio::task::spawn_blocking(move || {
            let r = compare_file(&file, &recipe).map_err(|e| format!("file {path:?}: {e}"));
            drop(rb);
            r
        })
        .await
        .map_err(|e| e.to_string())??;
    }
    Ok(total)
}

/// Read `file` against `recipe`. Blocking.
fn compare_file(file: &File, recipe: &seedcast_core::FileRecipe) -> Result<u64, String> {
    const BLOCK: usize = 1 << 20;
    let mut buf = vec![0u8; BLOCK];
    let mut read = 0u64;
    for (off, e) in recipe.extents_at() {
        match e {
            Extent::Data { id, len } => {
                let mut b = vec![0u8; *len as usize];
                file.read_exact_at(&mut b, off).map_err(|e| e.to_string())?;
                if ChunkId::of(&b) != *id {
                    return Err(format!(
                        "bytes {off}..{} no longer match",
                        off + *len as u64
                    ));
                }
                read += *len as u64;
            }
            Extent::Hole { len } => {
                let mut at = off;
                while at < off + len {
                    let n = ((off + len - at) as usize).min(BLOCK);
                    file.read_exact_at(&mut buf[..n], at)
                        .map_err(|e| e.to_string())?;
                    if let Some(i) = buf[..n].iter().position(|b| *b != 0) {
                        return Err(format!(
                            "byte {} lies in a hole of the version and is no longer zero",
                            at + i as u64
                        ));
                    }
                    at += n as u64;
                    read += n as u64;
                }
            }
        }
    }
    Ok(read)
}

/// Fix what can be fixed locally and mark the rest for the engine to send again.
async fn repair(
    db: &Arc<AgentDb>,
    adapter: Option<Arc<dyn Adapter>>,
    held: &[HeldCopy],
    users: &HashMap<ChunkId, Vec<usize>>,
    damaged: Vec<(ChunkId, usize)>,
    marks: &mut BTreeMap<GlobalId, (Repair, Vec<usize>)>,
    report: &mut Report,
) -> Result<(), AgentError> {
    let seeds = match &adapter {
        Some(a) => SeedIndex::build(db, a.as_ref()).await?,
        None => SeedIndex::default(),
    };
    for (id, problem) in damaged {
        db.delete_chunks(&[id])?;
        if let Some(c) = seeds.read(&id) {
            db.put_chunks(&[c])?;
            report.problems[problem].repaired = true;
            report
                .actions
                .push(format!("restored cache chunk {id} from a published copy"));
            continue;
        }
        report
            .actions
            .push(format!("dropped damaged cache chunk {id}"));
        let needed_by = users.get(&id).map(Vec::as_slice).unwrap_or_default();
        if needed_by.is_empty() {
            // Nothing held needs it: dropping it was the repair.
            report.problems[problem].repaired = true;
        }
        for i in needed_by {
            marks
                .entry(held[*i].global_id)
                .or_insert((Repair::Refetch, vec![]))
                .1
                .push(problem);
        }
    }
    db.flush_chunks()?;
    for (g, (kind, _)) in marks.iter() {
        db.mark_repair(g, *kind)?;
    }
    Ok(())
}

/// Connect as the site until the engine has sent every marked image again.
async fn refetch(
    saved: SiteConfig,
    held: &[HeldCopy],
    marks: &BTreeMap<GlobalId, (Repair, Vec<usize>)>,
    timeout: Duration,
    report: &mut Report,
) -> Result<(), AgentError> {
    let (cfg, adapter_cfg) = saved.resolve()?;
    let adapter = adapter_cfg.build(&cfg.data, &cfg.site)?;
    let agent = Agent::open(cfg, adapter)?;
    let db = agent.db().clone();
    let watch = db.clone();
    let all_done = async move {
        while watch.repairs_pending().unwrap_or(1) > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let ran = tokio::time::timeout(timeout, agent.run(all_done)).await;
    for (g, (kind, problems)) in marks {
        if db.repair(g)?.is_some() {
            continue;
        }
        for p in problems {
            report.problems[*p].repaired = true;
        }
        let before = held.iter().find(|h| h.global_id == *g);
        let now = db.held(g)?;
        report.actions.push(match (kind, before, now) {
            (Repair::Republish, Some(b), Some(n)) => format!(
                "published image {g} v{} again from the engine (local id {} replaces {})",
                n.version, n.local_id, b.local_id
            ),
            (Repair::Republish, _, _) => format!("published image {g} again from the engine"),
            (Repair::Refetch, _, _) => {
                format!("fetched the chunks of image {g} the cache lost from the engine")
            }
        });
    }
    match ran {
        Ok(r) => r,
        Err(_) => Err(AgentError::Config(format!(
            "repair: the engine did not send every marked image within {} s (is the engine \
             running, and are the images still placed at this site?); the marks stay, and \
             the agent completes them when it next connects",
            timeout.as_secs()
        ))),
    }
}
