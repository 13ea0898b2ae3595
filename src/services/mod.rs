//! Real image services started on 127.0.0.1 for tests, the demo and benchmarks: each in a
//! temporary directory, on a free port, stopped (by its PID) when dropped. Nothing here is
//! a mock: these are the servers an operator runs (`../shared/LOCAL-SERVICES.md`).
//!
//! - [`registry`]: the OCI distribution registry (Debian's `docker-registry`), optionally
//!   with htpasswd auth.
//! - [`swift`]: OpenStack Swift with `s3api`, an S3-compatible object store.
//! - [`openstack`]: Glance, alone or behind a real Keystone.

pub mod openstack;
pub mod registry;
pub mod swift;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Child;
use std::time::{Duration, Instant};

/// A service could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{service} did not start: {why}")]
    Start { service: &'static str, why: String },
}

impl ServiceError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServiceError {
        let what = what.into();
        move |source| ServiceError::Io { what, source }
    }
}

/// A port on 127.0.0.1 nobody listens on (now).
pub fn free_port() -> Result<u16, ServiceError> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(ServiceError::io("pick a free port"))?
        .port())
}

/// The status code of `GET path` on 127.0.0.1:`port`, if it answers.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Wait until `ready` holds, or the child exits, or `timeout` passes.
pub(crate) fn wait_ready(
    service: &'static str,
    child: &mut Child,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<(), ServiceError> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(ServiceError::Start {
                service,
                why: format!("exited with {status}"),
            });
        }
        if Instant::now() > deadline {
            return Err(ServiceError::Start {
                service,
                why: format!("not ready after {timeout:?}"),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops a server process when dropped.
#[derive(Debug)]
pub(crate) struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
