//! The peers seedcast is chosen over, run on the same image in the same run: `casync make`
//! and `casync extract` (Debian's casync) for ingest and reassembly, `rsync` to each site
//! directory for seeding. Each is timed by wall clock and charged its CPU seconds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde::Serialize;

use super::BenchError;
use super::meter::Pid;

/// One run of a peer tool.
#[derive(Debug, Clone, Serialize)]
pub struct PeerRun {
    /// The command, as a person would type it.
    pub command: String,
    pub seconds: f64,
    /// CPU seconds of the tool's processes.
    pub cpu_secs: f64,
    /// Bytes it stored (casync's chunk store and index), where that means something.
    pub stored_bytes: Option<u64>,
    /// Seconds spent making its output durable afterwards (included in `seconds`), where
    /// the tool does not and seedcast's figure does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_secs: Option<f64>,
}

/// Is `tool` on the PATH?
pub fn installed(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(tool).is_file()))
}

/// Write back everything dirty in the page cache, so that a timed phase does not pay for
/// the writes of the one before it (a phase that ran after eight sites' copies took twice
/// as long as the same phase run first).
pub(crate) fn settle_disk() -> Result<(), BenchError> {
    let s = Command::new("sync").status()?;
    if !s.success() {
        return Err(BenchError::Failed(format!("sync: {s}")));
    }
    Ok(())
}

/// Run the commands at once (the disk settled first) and wait for all; their wall time and
/// CPU.
pub(crate) fn run_all(cmds: Vec<Command>, shown: String) -> Result<PeerRun, BenchError> {
    settle_disk()?;
    let me = Pid::This;
    let cpu0 = me.reaped_children_cpu_secs()?;
    let t = Instant::now();
    let mut children = Vec::new();
    for mut c in cmds {
        c.stdout(std::process::Stdio::null());
        c.stderr(std::process::Stdio::piped());
        children.push(
            c.spawn()
                .map_err(|e| BenchError::Peer(format!("{shown}: {e}")))?,
        );
    }
    let mut failed = None;
    for c in children {
        let out = c.wait_with_output()?;
        if !out.status.success() && failed.is_none() {
            failed = Some(format!(
                "{shown}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    let seconds = t.elapsed().as_secs_f64();
    if let Some(f) = failed {
        return Err(BenchError::Peer(f));
    }
    Ok(PeerRun {
        command: shown,
        seconds,
        cpu_secs: me.reaped_children_cpu_secs()? - cpu0,
        stored_bytes: None,
        sync_secs: None,
    })
}

/// `casync make` of `image` into a fresh store (zstd, casync's default chunk sizes:
/// 64 KiB average, as seedcast's).
pub fn casync_make(image: &Path, work: &Path) -> Result<(PeerRun, CasyncStore), BenchError> {
    let store = CasyncStore {
        store: work.join("casync.castr"),
        index: work.join("image.caibx"),
    };
    let mut c = Command::new("casync");
    c.args(["make", "--compression=zstd", "--store"])
        .arg(&store.store)
        .arg(&store.index)
        .arg(image);
    let mut run = run_all(
        vec![c],
        format!(
            "casync make --compression=zstd --store=STORE image.caibx {}",
            image.display()
        ),
    )?;
    run.stored_bytes = Some(dir_bytes(&store.store)? + std::fs::metadata(&store.index)?.len());
    Ok((run, store))
}

/// A casync chunk store and the index of the image in it.
#[derive(Debug)]
pub struct CasyncStore {
    store: PathBuf,
    index: PathBuf,
}

/// `casync extract` of the image from its local store into `out`, then `out` synced: a
/// site's reassembly ends with the image on disk before it is published, and casync
/// returns with it still in the page cache (the sync is timed and reported apart too).
pub fn casync_extract(s: &CasyncStore, out: &Path) -> Result<PeerRun, BenchError> {
    let mut c = Command::new("casync");
    c.args(["extract", "--store"])
        .arg(&s.store)
        .arg(&s.index)
        .arg(out);
    let mut run = run_all(
        vec![c],
        "casync extract --store=STORE image.caibx OUT; sync OUT".to_string(),
    )?;
    let t = Instant::now();
    std::fs::File::open(out)?.sync_all()?;
    let sync = t.elapsed().as_secs_f64();
    run.seconds += sync;
    run.sync_secs = Some(sync);
    Ok(run)
}

/// `rsync --sparse` of `image` into each of `dests` at once (local copies: rsync's sender
/// and receiver processes per site).
pub fn rsync_to(image: &Path, dests: &[PathBuf]) -> Result<PeerRun, BenchError> {
    let cmds = dests
        .iter()
        .map(|d| {
            std::fs::create_dir_all(d)?;
            let mut c = Command::new("rsync");
            c.arg("--sparse")
                .arg(image)
                .arg(format!("{}/", d.display()));
            Ok(c)
        })
        .collect::<Result<Vec<_>, std::io::Error>>()?;
    run_all(
        cmds,
        format!(
            "rsync --sparse {} SITE_DIR/ (x{} at once)",
            image.display(),
            dests.len()
        ),
    )
}

/// Bytes of the files under `p`.
pub fn dir_bytes(p: &Path) -> std::io::Result<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(p)? {
        let e = e?;
        let m = e.metadata()?;
        n += if m.is_dir() {
            dir_bytes(&e.path())?
        } else {
            m.len()
        };
    }
    Ok(n)
}
