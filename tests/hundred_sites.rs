//! One engine serves a hundred sites: 100 agent processes on 127.0.0.1 seeded at once, and
//! the engine's peak resident set stays within 256 MiB + 4 MiB per connected site (before
//! chunks were shared between sites' send buffers it grew by ~15 MiB per site: 1.49 GiB at
//! 100 sites, `docs/BENCHMARKS.md`).

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::procs::{TestAgent, TestEngine, push_wait_json, wait_connected};
use seedcast::bench::meter::Pid;

const SITES: usize = 100;

#[test]
fn a_hundred_sites_seeded_at_once_within_the_engines_memory_budget() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let engine = TestEngine::start(d, &[])?;
    let env = engine.env();
    let mut agents = Vec::new();
    for i in 0..SITES {
        let pool = d.join(format!("pool-{i}"));
        agents.push(TestAgent::start(
            d,
            &engine,
            &format!("s{i:03}"),
            &["--pool", pool.to_str().context("path")?],
        )?);
    }
    wait_connected(&env, SITES, Duration::from_secs(120))?;

    // Incompressible, so every site's send buffers hold real bytes.
    let img = d.join("disk.raw");
    let mut data = vec![0u8; 16 << 20];
    blake3::Hasher::new()
        .update(b"hundred sites")
        .finalize_xof()
        .fill(&mut data);
    std::fs::write(&img, &data)?;
    let pid = Pid::Child(engine.pid().context("engine pid")?);
    let before = pid.peak_rss()?;
    let status = push_wait_json(&env, "hundred", &img)?;
    let peak = pid.peak_rss()?;

    let sites = status["sites"].as_array().context("sites")?;
    ensure!(sites.len() == SITES, "{} placements", sites.len());
    for s in sites {
        ensure!(s["state"] == "published", "{s}");
        let i: usize = s["site"].as_str().context("site")?[1..].parse()?;
        let local = s["local_id"].as_str().context("local_id")?;
        let copy = d.join(format!("pool-{i}")).join(local).join("disk.raw");
        ensure!(
            std::fs::read(&copy)? == data,
            "{} differs from the image",
            copy.display()
        );
    }
    let budget = (256 << 20) + (4 << 20) * SITES as u64;
    eprintln!(
        "engine peak: {} MiB before the push, {} MiB after seeding {SITES} sites (budget {} MiB)",
        before >> 20,
        peak >> 20,
        budget >> 20
    );
    ensure!(
        peak <= budget,
        "engine peaked at {} MiB seeding {SITES} sites: over 256 MiB + 4 MiB per site ({} MiB)",
        peak >> 20,
        budget >> 20
    );
    drop(agents);
    Ok(())
}
