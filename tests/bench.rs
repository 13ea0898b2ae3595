//! `seedcast bench local` end to end: a real engine, real agents and the peers (casync,
//! rsync; installed by `.ci/run`) on a small generated image. The figures are not judged
//! here (a timed test on a shared host proves nothing); what is checked is that every phase
//! ran, moved what it must, and was metered.

mod common;

use std::process::Command;

use anyhow::{Result, ensure};
use serde_json::Value;

fn seedcast() -> Command {
    Command::new(env!("CARGO_BIN_EXE_seedcast"))
}

#[test]
fn bench_local_measures_every_phase_beside_its_baselines() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = seedcast()
        .args([
            "bench", "local", "--size", "48MiB", "--sites", "2", "--json", "--dir",
        ])
        .arg(dir.path())
        .output()?;
    ensure!(
        out.status.success(),
        "bench local failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout)?;
    let f = |v: &Value| v.as_f64().unwrap_or(-1.0);
    let u = |v: &Value| v.as_u64().unwrap_or(0);

    let data = u(&r["image"]["data_len"]);
    ensure!(data > 8 << 20 && data < 48 << 20, "data bytes {data}");
    for stage in [
        "read_secs",
        "cut_secs",
        "blake3_secs",
        "zstd_secs",
        "disk_write_secs",
    ] {
        ensure!(f(&r["limits"][stage]) > 0.0, "{stage}: {}", r["limits"]);
    }
    ensure!(f(&r["ingest_of_limit"]) > 0.0);
    ensure!(
        u(&r["limits"]["disk_write_bytes"]) >= 64 << 20,
        "{}",
        r["limits"]
    );

    // Ingest: the client's own process and the engine both worked; the upload is compressed.
    let ingest = &r["ingest"];
    let uploaded = u(&ingest["payload_bytes"]);
    ensure!(
        uploaded > 0 && uploaded < data,
        "uploaded {uploaded} of {data}"
    );
    ensure!(f(&ingest["cost"]["client_cpu_secs"]) > 0.0, "{ingest}");
    ensure!(f(&ingest["cost"]["engine_cpu_secs"]) > 0.0, "{ingest}");
    ensure!(u(&ingest["cost"]["client_peak_rss"]) > 1 << 20, "{ingest}");

    // Seeding rounds of 1 and 2 fresh sites: each site is sent the stored chunks once.
    let rounds = r["seeding"].as_array().expect("rounds");
    ensure!(rounds.len() == 2, "{rounds:?}");
    for (round, n) in rounds.iter().zip([1u64, 2]) {
        ensure!(u(&round["sites"]) == n);
        let p = &round["phase"];
        ensure!(u(&p["payload_bytes"]) == n * uploaded, "round {n}: {p}");
        ensure!(
            u(&p["wire_bytes"]) > u(&p["payload_bytes"]),
            "round {n}: {p}"
        );
        ensure!(f(&p["cost"]["agents_cpu_secs"]) > 0.0, "round {n}: {p}");
        ensure!(u(&p["cost"]["agent_peak_rss"]) > 1 << 20, "round {n}: {p}");
        ensure!(f(&round["loopback_secs"]) > 0.0 && f(&round["of_loopback"]) > 0.0);
        // The disk limit scales with the sites writing to it.
        let disk = f(&round["disk_limit_secs"]);
        ensure!(
            disk > 0.0 && f(&round["of_disk_limit"]) > 0.0,
            "round {n}: {round}"
        );
        ensure!(
            (disk / f(&rounds[0]["disk_limit_secs"]) - n as f64).abs() < 0.01,
            "round {n}: {round}"
        );
        ensure!(
            f(&round["rsync"]["seconds"]) > 0.0,
            "round {n}: no rsync: {round}"
        );
    }

    // Reassembly sent nothing: the site rebuilt the image from its cache.
    let re = &r["reassembly"];
    ensure!(u(&re["payload_bytes"]) == 0, "{re}");
    ensure!(f(&re["seconds"]) > 0.0 && f(&re["cost"]["agents_cpu_secs"]) > 0.0);

    // The peers ran: casync's store holds about what seedcast's does.
    ensure!(
        r["peers_missing"].as_array().is_some_and(|m| m.is_empty()),
        "{}",
        r["peers_missing"]
    );
    ensure!(f(&r["casync_make"]["seconds"]) > 0.0 && f(&r["casync_extract"]["seconds"]) > 0.0);
    let casync_stored = u(&r["casync_make"]["stored_bytes"]);
    ensure!(
        casync_stored > uploaded / 2 && casync_stored < uploaded * 2,
        "casync stored {casync_stored}"
    );

    // Logs of every process are kept with the work.
    ensure!(dir.path().join("logs/engine.log").is_file());
    Ok(())
}

#[test]
fn bench_local_prints_a_table_and_refuses_bad_input() -> Result<()> {
    let out = seedcast()
        .args([
            "bench",
            "local",
            "--size",
            "16MiB",
            "--sites",
            "1",
            "--no-peers",
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    for want in ["stage limits", "ingest", "seeding", "reassembly", "| 1 |"] {
        ensure!(text.contains(want), "no {want:?} in:\n{text}");
    }
    ensure!(!text.contains('\x1b'), "colour codes in a pipe");

    let out = seedcast()
        .args(["bench", "local", "--image", "/nonexistent/disk.raw"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("/nonexistent/disk.raw"),
        "{err}"
    );

    let out = seedcast()
        .args(["bench", "local", "--sites", "0"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && err.contains("--sites"), "{err}");

    let out = seedcast()
        .args(["bench", "local", "--data-share", "2"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("--data-share") && err.contains("between"),
        "{err}"
    );
    Ok(())
}

/// `bench site` against a running engine and agent (separate processes): every figure
/// present, nothing published, the scratch file gone; unknown and offline sites refused.
#[test]
fn bench_site_measures_a_connected_site_and_publishes_nothing() -> Result<()> {
    use common::procs::{TestAgent, TestEngine, json, run, wait_connected};
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let engine = TestEngine::start(d, &[])?;
    let env = engine.env();
    let pool = d.join("pool");
    let mut agent = TestAgent::start(d, &engine, "probe-a", &["--pool", pool.to_str().unwrap()])?;
    wait_connected(&env, 1, std::time::Duration::from_secs(60))?;

    // An engine with no image yet probes with chunks it makes.
    let b = json(&run(
        &["bench", "site", "probe-a", "--seconds", "2", "--json"],
        &env,
    )?)?;
    let u = |k: &str| b[k].as_u64().unwrap_or(0);
    let f = |k: &str| b[k].as_f64().unwrap_or(-1.0);
    ensure!(b["site"] == "probe-a", "{b}");
    ensure!(f("rtt_ping_ms") > 0.0 && f("rtt_quic_ms") > 0.0, "{b}");
    ensure!(
        u("raw_bytes") > 1 << 20 && u("raw_bytes_per_sec") > 0,
        "{b}"
    );
    ensure!(
        u("chunks") > 0 && u("chunk_data_bytes") > u("chunk_payload_bytes"),
        "{b}"
    );
    ensure!(
        f("chunk_seconds") > 0.0 && f("verify_seconds") > 0.0 && f("write_seconds") > 0.0,
        "{b}"
    );
    ensure!(
        ["link", "site cpu", "site disk"].contains(&b["limit"].as_str().unwrap_or("")),
        "{b}"
    );

    // With an image stored, its chunks are what is sent; still nothing is published.
    let img = d.join("disk.raw");
    seedcast::synth::write_disk(&img, 8 << 20, "bench site")?;
    let pushed = common::procs::push_wait_json(&env, "probe-img", &img)?;
    let text =
        String::from_utf8(run(&["bench", "site", "probe-a", "--seconds", "1"], &env)?.stdout)?;
    for want in ["round trip", "raw", "chunks", "limit"] {
        ensure!(text.contains(want), "no {want:?} in:\n{text}");
    }
    let status = json(&run(&["status", "--json"], &env)?)?;
    ensure!(
        status["images"].as_array().map(|a| a.len()) == Some(1),
        "{status}"
    );
    ensure!(
        std::fs::read_dir(&pool)?
            .filter(|e| e
                .as_ref()
                .is_ok_and(|e| !e.file_name().to_string_lossy().starts_with('.')))
            .count()
            == 1
    );
    ensure!(!d.join("agent-probe-a/.probe-scratch").exists());
    ensure!(pushed["sites"][0]["state"] == "published", "{pushed}");

    // Unknown and offline sites are refused by name.
    let out = run(&["bench", "site", "nosuch", "--seconds", "1"], &env)?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("unknown site") && err.contains("nosuch"),
        "{err}"
    );
    agent.stop()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while json(&run(&["sites", "--json"], &env)?)?["sites"][0]["connected"] == true {
        ensure!(
            std::time::Instant::now() < deadline,
            "the stopped agent stays connected"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = run(&["bench", "site", "probe-a", "--seconds", "1"], &env)?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("not connected"),
        "{err}"
    );
    Ok(())
}
