//! The engine's memory as sites are added: one engine process and N agent processes
//! (`seedcast agent`, dir pools) on 127.0.0.1, an incompressible image pushed to all with
//! `--wait`; the engine's peak resident set (`VmHWM`) and the seeding time, for each
//! `--send-window` given, side by side in one run.
//!
//! ```sh
//! cargo build --release && cargo run --release -p seedcast-bench --bin engine_memory -- \
//!     --sites 20 --mib 64 --send-window 32MiB --send-window 8MiB --send-window 4MiB
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Agents (sites).
    #[arg(long, default_value_t = 20)]
    sites: usize,
    /// Image size in MiB (random bytes: nothing compresses or is a hole).
    #[arg(long, default_value_t = 64)]
    mib: usize,
    /// Engine send windows to compare (each a separate engine and set of agents).
    #[arg(long = "send-window", default_values_t = ["32MiB".to_string(), "8MiB".to_string()])]
    send_windows: Vec<String>,
    /// Also run each window with this in the engine's environment (e.g.
    /// `MALLOC_ARENA_MAX=2`, to tell allocator arenas from live data).
    #[arg(long)]
    engine_env: Option<String>,
    /// Engine binaries to compare (default: the `seedcast` built beside this bench), e.g. a
    /// copy of an earlier build against this one; the agents are always this build's.
    #[arg(long = "engine-bin")]
    engine_bins: Vec<PathBuf>,
    /// Extra engine flags, given to every engine (e.g. `--engine-arg=--read-cache=0`).
    #[arg(long = "engine-arg", allow_hyphen_values = true)]
    engine_args: Vec<String>,
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn seedcast() -> Result<PathBuf> {
    let p = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .join("seedcast");
    ensure!(
        p.exists(),
        "{} missing: run `cargo build --release` first",
        p.display()
    );
    Ok(p)
}

/// Peak resident set of `pid` in KiB (`VmHWM`).
fn peak_kib(pid: u32) -> Result<u64> {
    Ok(seedcast::bench::meter::Pid::Child(pid).peak_rss()? / 1024)
}

fn run(bin: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<String> {
    let out = Command::new(bin)
        .args(args)
        .envs(env.iter().copied())
        .output()?;
    ensure!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// One configuration: (peak engine RSS before the push, peak after, seconds to seed).
#[allow(clippy::too_many_arguments)]
fn measure(
    bin: &Path,
    engine_bin: &Path,
    engine_args: &[String],
    image: &Path,
    sites: usize,
    window: &str,
    engine_env: Option<(&str, &str)>,
) -> Result<(u64, u64, f64)> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let data = d.join("engine");
    let engine = Kill(
        Command::new(engine_bin)
            .args([
                "engine",
                "--data",
                data.to_str().unwrap(),
                "--listen",
                &addr,
            ])
            .args(["--send-window", window])
            .args(engine_args)
            .envs(engine_env)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let token = data.join("admin.token");
    let t0 = Instant::now();
    while !token.exists() {
        ensure!(
            t0.elapsed() < Duration::from_secs(60),
            "engine did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let token = token.to_str().unwrap().to_string();
    let env = [
        ("SEEDCAST_ENGINE", addr.as_str()),
        ("SEEDCAST_TOKEN", token.as_str()),
    ];
    let mut agents = Vec::new();
    for i in 0..sites {
        let site = format!("s{i}");
        let t = loop {
            match run(bin, &["site", "add", &site], &env) {
                Ok(t) => break t,
                Err(_) if t0.elapsed() < Duration::from_secs(60) => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => return Err(e),
            }
        };
        let tf = d.join(format!("{site}.token"));
        std::fs::write(&tf, t.trim())?;
        agents.push(Kill(
            Command::new(bin)
                .args(["agent", "--data"])
                .arg(d.join(format!("agent-{site}")))
                .args(["--engine", &addr, "--site", &site, "--token"])
                .arg(&tf)
                .arg("--pool")
                .arg(d.join(format!("pool-{site}")))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        ));
    }
    // Every agent connected.
    loop {
        let v: serde_json::Value = serde_json::from_str(&run(bin, &["sites", "--json"], &env)?)?;
        let up = v["sites"]
            .as_array()
            .map_or(0, |s| s.iter().filter(|s| s["connected"] == true).count());
        if up == sites {
            break;
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(120),
            "{up}/{sites} agents connected"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let pid = engine.0.id();
    let before = peak_kib(pid)?;
    let start = Instant::now();
    let out = run(
        bin,
        &[
            "push",
            "--name",
            "mem",
            image.to_str().unwrap(),
            "--wait",
            "--json",
        ],
        &env,
    )?;
    let secs = start.elapsed().as_secs_f64();
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let published = v["sites"].as_array().map_or(0, |s| {
        s.iter().filter(|p| p["state"] == "published").count()
    });
    if published != sites {
        bail!("{published}/{sites} sites published: {v}");
    }
    let after = peak_kib(pid)?;
    drop(agents);
    drop(engine);
    Ok((before, after, secs))
}

fn main() -> Result<()> {
    let a = Args::parse();
    let bin = seedcast()?;
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("disk.raw");
    let mut bytes = vec![0u8; a.mib << 20];
    blake3::Hasher::new()
        .update(b"engine memory")
        .finalize_xof()
        .fill(&mut bytes);
    std::fs::write(&image, &bytes)?;
    drop(bytes);
    println!(
        "{} sites, a {} MiB incompressible image, engine peak resident set (VmHWM)",
        a.sites, a.mib
    );
    println!(
        "| engine | send window | engine environment | peak before push | peak after seeding | per site | seconds to seed all |"
    );
    println!("| --- | --- | --- | ---: | ---: | ---: | ---: |");
    let extra = a.engine_env.as_deref().and_then(|e| e.split_once('='));
    let envs: Vec<Option<(&str, &str)>> = match extra {
        Some(e) => vec![None, Some(e)],
        None => vec![None],
    };
    let engines = if a.engine_bins.is_empty() {
        vec![bin.clone()]
    } else {
        a.engine_bins.clone()
    };
    for w in &a.send_windows {
        for env in &envs {
            for e in &engines {
                let (before, after, secs) =
                    measure(&bin, e, &a.engine_args, &image, a.sites, w, *env)?;
                println!(
                    "| {} | {w} | {} | {:.0} MiB | {:.0} MiB | {:.1} MiB | {secs:.1} |",
                    e.display(),
                    env.map_or("-".to_string(), |(k, v)| format!("{k}={v}")),
                    before as f64 / 1024.0,
                    after as f64 / 1024.0,
                    (after as f64 - before as f64) / 1024.0 / a.sites as f64
                );
            }
        }
    }
    Ok(())
}
