//! `seedcast bench local` end to end: a real engine, real agents and the peers (casync,
//! rsync; installed by `.ci/run`) on a small generated image. The figures are not judged
//! here (a timed test on a shared host proves nothing); what is checked is that every phase
//! ran, moved what it must, and was metered.

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
    for stage in ["read_secs", "cut_secs", "blake3_secs", "zstd_secs"] {
        ensure!(f(&r["limits"][stage]) > 0.0, "{stage}: {}", r["limits"]);
    }
    ensure!(f(&r["ingest_of_limit"]) > 0.0);

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
    Ok(())
}
