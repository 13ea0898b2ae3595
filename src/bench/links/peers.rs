//! The tools people use for the same update, over the same shaped link: `rsync` to a
//! daemon in the site's namespace (v2 onto a copy of v1 there), and `zstd --patch-from`
//! (make the patch beside the engine, copy it down the link, apply it at the site).
//!
//! Both run over TCP, straight down the veth pair between the hub and the site's
//! namespace: they get the link's `tbf` rate and queue, but not the relay's delay, loss
//! or reordering (the relay carries UDP only) — conditions in their favour.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::netns::{Counters, SiteLink};
use super::{BenchError, Proc};

/// The rsync daemon's port in the site's namespace.
const PORT: u16 = 8730;

/// One peer's run of the update.
#[derive(Debug, Clone)]
pub struct PeerRun {
    pub seconds: f64,
    /// IP bytes down the link to the site, and up from it (TCP acknowledgements and, for
    /// rsync, the site's block checksums).
    pub down: Counters,
    /// What each step took.
    pub detail: String,
}

/// An rsync daemon serving `dir` (read-write) inside the site's namespace.
struct Daemon {
    _proc: Proc,
    url: String,
}

fn start_daemon(link: &SiteLink, dir: &Path, logs: &Path) -> Result<Daemon, BenchError> {
    let conf = dir.with_extension("rsyncd.conf");
    std::fs::write(
        &conf,
        format!(
            "use chroot = no\nuid = root\ngid = root\n[img]\npath = {}\nread only = no\n",
            dir.display()
        ),
    )?;
    let proc = Proc::spawn(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &link.ns,
                "rsync",
                "--daemon",
                "--no-detach",
            ])
            .arg(format!("--config={}", conf.display()))
            .arg(format!("--address={}", link.site_ip))
            .arg(format!("--port={PORT}")),
        logs.join(format!("rsyncd-{}.log", link.ns)),
    )?;
    let url = format!("rsync://{}:{PORT}/img", link.site_ip);
    // Up once it lists its module from the hub's side.
    let t = Instant::now();
    loop {
        let up = Command::new("ip")
            .args(["netns", "exec", &link.hub_ns, "rsync", &format!("{url}/")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if up {
            break;
        }
        if t.elapsed() > Duration::from_secs(20) {
            return Err(BenchError::Failed(format!(
                "the rsync daemon in {} did not come up",
                link.ns
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(Daemon { _proc: proc, url })
}

/// Run `cmd` (the bench's peer runner: fails with its output), returning its seconds.
fn timed(what: &str, cmd: &mut Command) -> Result<f64, BenchError> {
    let cmd = std::mem::replace(cmd, Command::new("true"));
    Ok(crate::bench::peers::run_all(vec![cmd], what.into())?.seconds)
}

/// In the hub's namespace (the engine's side of the link).
fn at_hub(link: &SiteLink, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &link.hub_ns, program]);
    c
}

/// A copy of `old` in a directory of the site's, as `disk.raw`.
fn site_copy(work: &Path, link: &SiteLink, old: &Path) -> Result<PathBuf, BenchError> {
    let dir = work.join(format!("peer-{}", link.ns));
    std::fs::create_dir_all(&dir)?;
    timed(
        "copying the old image for the site",
        Command::new("cp")
            .arg("--sparse=always")
            .arg(old)
            .arg(dir.join("disk.raw")),
    )?;
    Ok(dir)
}

/// `rsync NEW rsync://site/img/disk.raw` over the link, onto the old image there (rsync's
/// delta transfer: the site sends block checksums of its copy, the sender the rest).
pub fn rsync(link: &SiteLink, work: &Path, old: &Path, new: &Path) -> Result<PeerRun, BenchError> {
    let dir = site_copy(work, link, old)?;
    let daemon = start_daemon(link, &dir, work)?;
    let before = link.hub_counters()?;
    let secs = timed(
        "rsync to the site",
        at_hub(link, "rsync")
            .arg("--stats")
            .arg(new)
            .arg(format!("{}/disk.raw", daemon.url)),
    )?;
    let down = link.hub_counters()?.since(&before);
    same_file(&dir.join("disk.raw"), new)?;
    std::fs::remove_dir_all(&dir)?;
    Ok(PeerRun {
        seconds: secs,
        down,
        detail: format!("rsync {secs:.1} s"),
    })
}

/// `zstd -19 --long=31 --patch-from=OLD NEW` beside the engine (both cores), the patch
/// copied down the link whole (`rsync --whole-file`), applied at the site.
pub fn zstd_patch(
    link: &SiteLink,
    work: &Path,
    old: &Path,
    new: &Path,
) -> Result<PeerRun, BenchError> {
    let dir = site_copy(work, link, old)?;
    let daemon = start_daemon(link, &dir, work)?;
    let patch = work.join(format!("{}.patch.zst", link.ns));
    let make = timed(
        "zstd --patch-from",
        Command::new("zstd")
            .args(["-q", "-f", "-19", "-T0", "--long=31"])
            .arg(format!("--patch-from={}", old.display()))
            .arg(new)
            .arg("-o")
            .arg(&patch),
    )?;
    let before = link.hub_counters()?;
    let copy = timed(
        "copying the patch to the site",
        at_hub(link, "rsync")
            .args(["--whole-file", "--stats"])
            .arg(&patch)
            .arg(format!("{}/patch.zst", daemon.url)),
    )?;
    let down = link.hub_counters()?.since(&before);
    let applied = dir.join("v2.raw");
    let apply = timed(
        "zstd -d --patch-from at the site",
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &link.ns,
                "zstd",
                "-q",
                "-f",
                "-d",
                "--long=31",
            ])
            .arg(format!("--patch-from={}", dir.join("disk.raw").display()))
            .arg(dir.join("patch.zst"))
            .arg("-o")
            .arg(&applied),
    )?;
    same_file(&applied, new)?;
    let size = std::fs::metadata(&patch)?.len();
    std::fs::remove_file(&patch)?;
    std::fs::remove_dir_all(&dir)?;
    Ok(PeerRun {
        seconds: make + copy + apply,
        down,
        detail: format!("make {make:.1} s + copy {copy:.1} s + apply {apply:.1} s; patch {size} B"),
    })
}

/// Fail unless the site's result is the new image byte for byte.
fn same_file(got: &Path, want: &Path) -> Result<(), BenchError> {
    if crate::cluster::file_hash(got)? != crate::cluster::file_hash(want)? {
        return Err(BenchError::Failed(format!(
            "{} is not {}",
            got.display(),
            want.display()
        )));
    }
    Ok(())
}
