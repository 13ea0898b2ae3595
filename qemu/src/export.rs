//! A FUSE export of an image's guest view by `qemu-storage-daemon`: while it lives, a plain
//! file of the image's virtual size holds exactly what the VM sees. Read-only to read a
//! qcow2 disk's content; writable to write changed clusters into a fresh overlay.
//!
//! The daemon is stopped with SIGTERM (it then unmounts); an export dropped without
//! [`Export::close`] does the same, and a mount left behind by a daemon that died anyway is
//! lazily unmounted, so no stale mount outlives it. A process killed outright (SIGKILL)
//! runs no destructor: its daemons are told by the kernel instead ([`spawn_daemon`]).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{Format, QemuError, info};

const DAEMON: &str = "qemu-storage-daemon";
/// How long the export may take to appear, and the daemon to stop.
const READY: Duration = Duration::from_secs(15);
const STOP: Duration = Duration::from_secs(10);

/// A running guest-view export.
#[derive(Debug)]
pub struct Export {
    child: Option<Child>,
    /// Holds the mountpoint file.
    _dir: tempfile::TempDir,
    file: PathBuf,
    len: u64,
}

type SpawnRequest = (Command, std::sync::mpsc::Sender<std::io::Result<Child>>);

/// Start a daemon (`cmd`: its program and arguments; stdin and stdout null, stderr piped)
/// that stops (SIGTERM: it unmounts)
/// when this process dies, however it dies: it is started through util-linux's `setpriv
/// --pdeathsig TERM`, which asks the kernel for that signal and then runs the daemon.
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, so every daemon
/// is forked by one thread that lives as long as the process: forked from one of tokio's
/// blocking threads, a daemon would be stopped when that thread retires after idling,
/// while its export is still in use.
fn spawn_daemon(cmd: Command) -> std::io::Result<Child> {
    use std::sync::{Mutex, OnceLock, mpsc};
    static SPAWNER: OnceLock<Option<Mutex<mpsc::Sender<SpawnRequest>>>> = OnceLock::new();
    let mut wrapped = Command::new("setpriv");
    wrapped
        .args(["--pdeathsig", "TERM", "--"])
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let gone = || std::io::Error::other("the thread that starts qemu-storage-daemon is gone");
    let spawner = SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<SpawnRequest>();
            std::thread::Builder::new()
                .name("qemu-spawner".into())
                .spawn(move || {
                    for (mut cmd, reply) in rx {
                        let _ = reply.send(cmd.spawn());
                    }
                })
                .ok()
                .map(|_| Mutex::new(tx))
        })
        .as_ref()
        .ok_or_else(gone)?;
    let (tx, rx) = mpsc::channel();
    spawner
        .lock()
        .map_err(|_| std::io::Error::other("the qemu spawner's lock is poisoned"))?
        .send((wrapped, tx))
        .map_err(|_| gone())?;
    rx.recv().map_err(|_| gone())?
}

/// A path as a `--blockdev` option value (commas doubled).
fn opt_path(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

impl Export {
    /// Export `image` (read as `format`) at a new file in a temporary directory.
    pub fn open(image: &Path, format: Format, writable: bool) -> Result<Export, QemuError> {
        let len = info(image, format)?.virtual_size;
        let dir = tempfile::Builder::new()
            .prefix("seedcast-export-")
            .tempdir()
            .map_err(QemuError::io("create", Path::new("export directory")))?;
        let file = dir.path().join("guest");
        File::create(&file).map_err(QemuError::io("create", &file))?;
        let ro = if writable { "off" } else { "on" };
        let mut cmd = Command::new(DAEMON);
        cmd.arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file,filename={},read-only={ro}",
                opt_path(image)
            ))
            .arg("--blockdev")
            .arg(format!(
                "driver={},node-name=image,file=file,read-only={ro}",
                format.as_str()
            ))
            .arg("--export")
            .arg(format!(
                "type=fuse,id=guest,node-name=image,mountpoint={},writable={}",
                opt_path(&file),
                if writable { "on" } else { "off" }
            ));
        let child = spawn_daemon(cmd).map_err(|source| QemuError::Spawn {
            tool: DAEMON,
            source,
        })?;
        let mut e = Export {
            child: Some(child),
            _dir: dir,
            file,
            len,
        };
        e.wait_ready(image)?;
        Ok(e)
    }

    /// Wait until the mountpoint shows the guest view (its size becomes the virtual size).
    fn wait_ready(&mut self, image: &Path) -> Result<(), QemuError> {
        let deadline = Instant::now() + READY;
        loop {
            if std::fs::metadata(&self.file).is_ok_and(|m| m.len() == self.len) {
                return Ok(());
            }
            let child = self.child.as_mut().expect("running");
            if let Ok(Some(status)) = child.try_wait() {
                let mut stderr = String::new();
                if let Some(mut s) = child.stderr.take() {
                    use std::io::Read;
                    let _ = s.read_to_string(&mut stderr);
                }
                self.child = None;
                return Err(QemuError::Failed {
                    tool: DAEMON,
                    args: format!("export of {}", image.display()),
                    stderr: format!("{status}: {}", stderr.trim()),
                });
            }
            if Instant::now() > deadline {
                return Err(QemuError::ExportTimeout {
                    image: image.to_path_buf(),
                    secs: READY.as_secs(),
                    why: "the mountpoint never showed the image's size".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The file holding the guest view.
    pub fn path(&self) -> &Path {
        &self.file
    }

    /// The guest view's size.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stop the daemon (flushing any writes) and wait until the export is gone.
    pub fn close(mut self) -> Result<(), QemuError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), QemuError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + STOP;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        // A daemon that could not unmount leaves the mount behind: take it away.
        if std::fs::metadata(&self.file).is_ok_and(|m| m.len() != 0) {
            let _ = Command::new("umount").arg("-l").arg(&self.file).status();
        }
        match status {
            Some(s) if s.success() => Ok(()),
            other => Err(QemuError::Failed {
                tool: DAEMON,
                args: format!("stop of the export at {}", self.file.display()),
                stderr: format!("exited with {other:?}"),
            }),
        }
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!("{e}");
        }
    }
}
