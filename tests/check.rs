//! `seedcast check` against real engine and agent processes: damage injected on disk
//! (a flipped bit in a pack, a pack cut short, a flipped bit in an agent's chunk cache, a
//! published copy changed underneath the agent) is found and named with the images it
//! touches, beside the running process; `--repair` with it stopped fixes what it can, and
//! what it cannot (lost engine bytes) a push of the same content restores.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::procs::*;
use serde_json::Value;

/// `check --json` with `args`: its exit status and report.
fn check(data: &Path, args: &[&str]) -> Result<(bool, Value)> {
    check_with_env(data, args, &[])
}

/// As [`check`], with `env` (a service's credentials) in its environment.
fn check_with_env(data: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<(bool, Value)> {
    let mut a = vec!["check", "--data", data.to_str().context("path")?, "--json"];
    a.extend(args);
    let out: Output = run(&a, env)?;
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "stdout {:?} stderr {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    ensure!(
        v["ok"].as_bool() == Some(out.status.success()),
        "exit status and report disagree: {:?} {v}",
        out.status
    );
    Ok((out.status.success(), v))
}

fn problems<'a>(v: &'a Value, kind: &str) -> Vec<&'a Value> {
    v["problems"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["kind"] == kind)
        .collect()
}

fn touches(p: &Value, gid: &str) -> bool {
    p["images"]
        .as_array()
        .is_some_and(|i| i.iter().any(|t| t["global_id"] == gid))
}

/// Every entry of a pack: (chunk id hex, offset of the entry, offset and length of its
/// payload), from the pack format (8-byte magic; entries of a 45-byte header and payload).
fn pack_entries(pack: &Path) -> Result<Vec<(String, u64, u64, u64)>> {
    let b = std::fs::read(pack)?;
    let mut out = Vec::new();
    let mut at = 8usize;
    while at + 45 <= b.len() {
        ensure!(&b[at..at + 4] == b"SCCK", "no entry at {at}");
        let id = hex::encode(&b[at + 4..at + 36]);
        let stored = u32::from_le_bytes(b[at + 41..at + 45].try_into()?) as usize;
        out.push((id, at as u64, (at + 45) as u64, stored as u64));
        at += 45 + stored;
    }
    Ok(out)
}

fn flip_bit(path: &Path, at: u64) -> Result<()> {
    let f = OpenOptions::new().read(true).write(true).open(path)?;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at)?;
    b[0] ^= 0x10;
    f.write_all_at(&b, at)?;
    Ok(())
}

/// An image of one 6 MiB disk: random bytes from `seed`.
fn image(d: &Path, seed: &str) -> Result<PathBuf> {
    let p = d.join(format!("{seed}.raw"));
    let mut bytes = vec![0u8; 6 << 20];
    blake3::Hasher::new()
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut bytes);
    std::fs::write(&p, &bytes)?;
    Ok(p)
}

#[test]
fn engine_check_names_damage_beside_the_engine_and_repair_then_a_push_restores_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let engine = TestEngine::start(d, &[])?;
    let env = engine.env();
    let pool = d.join("pool");
    let _agent = TestAgent::start(d, &engine, "s1", &["--pool", pool.to_str().unwrap()])?;
    // A site is a target once it has enrolled: push only after it has connected.
    wait_connected(&env, 1, Duration::from_secs(60))?;
    let (a, b) = (image(d, "alpha")?, image(d, "beta")?);
    let ga = gid(&push_wait_json(&env, "alpha", &a)?)?;
    let gb = gid(&push_wait_json(&env, "beta", &b)?)?;
    let data = engine.data.clone();

    // Healthy, checked beside the running engine.
    let (ok, v) = check(&data, &["--read-data"])?;
    ensure!(ok && v["problems"].as_array().unwrap().is_empty(), "{v}");
    ensure!(v["role"] == "engine" && v["checked"]["chunks"].as_u64() > Some(150));
    ensure!(v["checked"]["bytes_read"].as_u64() >= Some(12 << 20), "{v}");

    // A flipped bit in a payload of alpha's, and beta's last chunk cut off the pack.
    let pack = data.join("packs").join("pack-000000.pack");
    let entries = pack_entries(&pack)?;
    let (flipped, _, payload, len) = entries[entries.len() / 4].clone();
    flip_bit(&pack, payload + len / 2)?;
    let (cut, entry, _, _) = entries.last().context("entries")?.clone();
    OpenOptions::new()
        .write(true)
        .open(&pack)?
        .set_len(entry + 50)?;

    // Structure only: the cut is found, the flipped bit (headers intact) is not.
    let (ok, v) = check(&data, &[])?;
    ensure!(!ok, "{v}");
    let t = problems(&v, "truncated");
    ensure!(t.len() == 1, "{v}");
    ensure!(t[0]["item"].as_str().unwrap().contains(&cut), "{v}");
    ensure!(touches(t[0], &gb) && !touches(t[0], &ga), "{v}");
    ensure!(problems(&v, "damaged_chunk").is_empty(), "{v}");
    // --read-data: the flipped bit too, naming the chunk, its pack and alpha.
    let (ok, v) = check(&data, &["--read-data"])?;
    ensure!(!ok, "{v}");
    let dmg = problems(&v, "damaged_chunk");
    ensure!(dmg.len() == 1, "{v}");
    let item = dmg[0]["item"].as_str().unwrap();
    ensure!(
        item.contains(&flipped) && item.contains("pack-000000.pack"),
        "{v}"
    );
    ensure!(touches(dmg[0], &ga) && !touches(dmg[0], &gb), "{v}");
    ensure!(dmg[0]["images"][0]["name"] == "alpha", "{v}");
    ensure!(problems(&v, "truncated").len() == 1, "{v}");

    // Repair needs the engine stopped, and says so.
    let out = run(
        &["check", "--data", data.to_str().unwrap(), "--repair"],
        &[],
    )?;
    ensure!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.contains("in use"), "{err}");

    // Stopped: the damaged copies are forgotten, and are now missing until pushed again.
    engine.kill()?;
    let (ok, v) = check(&data, &["--read-data", "--repair"])?;
    ensure!(!ok, "missing chunks remain: {v}");
    ensure!(
        problems(&v, "damaged_chunk")[0]["repaired"] == true
            && problems(&v, "truncated")[0]["repaired"] == true,
        "{v}"
    );
    let missing = problems(&v, "missing_chunk");
    ensure!(missing.len() == 2, "{v}");
    ensure!(missing.iter().all(|p| p["repaired"] == false), "{v}");
    let (ok, v) = check(&data, &[])?;
    ensure!(!ok && problems(&v, "missing_chunk").len() == 2, "{v}");

    // A push of the same content uploads just those two chunks again; then all is well.
    engine.restart()?;
    wait_for_file(&engine.data.join("admin.token"))?;
    let mut uploaded = 0;
    for (name, f) in [("alpha", &a), ("beta", &b)] {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let v = loop {
            match push_wait_json(&env, name, f) {
                Ok(v) => break v,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        };
        uploaded += v["bytes_uploaded"].as_u64().context("bytes_uploaded")?;
    }
    ensure!(
        uploaded > 0 && uploaded < 256 << 10,
        "re-pushing uploaded {uploaded} bytes: only the two lost chunks should travel"
    );
    let (ok, v) = check(&data, &["--read-data"])?;
    ensure!(ok, "{v}");
    Ok(())
}

/// Flip a bit inside the cached copy of `content`'s bytes somewhere in the agent's blob
/// files (the cache keeps chunks as they travelled, and the test image's random bytes
/// travel raw: zstd does not shrink them). Returns the file touched.
fn flip_in_cache(db: &Path, content: &[u8]) -> Result<PathBuf> {
    for probe in (0..32).map(|i| (1 << 20) + i * 97_531) {
        let needle = &content[probe..probe + 64];
        for e in std::fs::read_dir(db)? {
            let p = e?.path();
            if p.extension().is_none_or(|x| x != "blob") {
                continue;
            }
            let b = std::fs::read(&p)?;
            if let Some(at) = b.windows(64).position(|w| w == needle) {
                flip_bit(&p, at as u64 + 32)?;
                return Ok(p);
            }
        }
    }
    anyhow::bail!("no cached bytes of the image found in {}", db.display())
}

#[test]
fn agent_check_finds_cache_damage_and_drift_status_shows_it_and_repair_restores() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let engine = TestEngine::start(d, &[])?;
    let env = engine.env();
    let pool = d.join("pool");
    let mut agent = TestAgent::start(d, &engine, "s1", &["--pool", pool.to_str().unwrap()])?;
    wait_connected(&env, 1, Duration::from_secs(60))?;
    let a = image(d, "alpha")?;
    let content = std::fs::read(&a)?;
    let ga = gid(&push_wait_json(&env, "alpha", &a)?)?;
    let st = json(&run(&["status", &ga, "--json"], &env)?)?;
    let local = st["sites"][0]["local_id"]
        .as_str()
        .context("local id")?
        .to_string();
    let copy = pool.join(&local).join("alpha.raw");
    let data = agent.data.clone();

    let (ok, v) = check(&data, &["--read-data"])?;
    ensure!(ok && v["role"] == "agent", "{v}");
    ensure!(
        v["checked"]["images"] == 1 && v["checked"]["chunks"].as_u64() > Some(50),
        "{v}"
    );
    ensure!(
        v["checked"]["bytes_read"].as_u64() >= Some(12 << 20),
        "cache and copy: {v}"
    );

    // A bit flipped in the agent's chunk cache, and the published copy written to (as a
    // VM booted from it would): both found beside the running agent, naming the image.
    flip_in_cache(&data.join("db"), &content)?;
    let f = OpenOptions::new().write(true).open(&copy)?;
    f.write_all_at(b"a VM was here", 4096)?;
    let (ok, v) = check(&data, &[])?;
    ensure!(ok, "sizes and structure are intact: {v}");
    let (ok, v) = check(&data, &["--read-data"])?;
    ensure!(!ok, "{v}");
    let dmg = problems(&v, "damaged_chunk");
    ensure!(dmg.len() == 1 && touches(dmg[0], &ga), "{v}");
    ensure!(
        dmg[0]["item"].as_str().unwrap().starts_with("cache chunk "),
        "{v}"
    );
    let drift = problems(&v, "drifted");
    ensure!(drift.len() == 1 && touches(drift[0], &ga), "{v}");
    ensure!(drift[0]["item"].as_str().unwrap().contains(&local), "{v}");
    let detail = drift[0]["detail"].as_str().unwrap();
    ensure!(
        detail.contains("alpha.raw") && detail.contains("bytes 0.."),
        "{v}"
    );

    // The copy grows too; the next deployment at the site notices (its seeds are checked)
    // and the engine shows alpha drifted there, without redeploying it.
    f.write_all_at(b"!", content.len() as u64)?;
    drop(f);
    let (ok, v) = check(&data, &[])?;
    ensure!(!ok && problems(&v, "drifted").len() == 1, "{v}");
    push_wait_json(&env, "beta", &image(d, "beta")?)?;
    let st = wait_status(&env, &ga, 30, |st| st["sites"][0]["state"] == "drifted")?;
    ensure!(
        st["sites"][0]["error"]
            .as_str()
            .unwrap_or("")
            .contains("alpha.raw"),
        "{st}"
    );
    std::thread::sleep(std::time::Duration::from_secs(2));
    let st = json(&run(&["status", &ga, "--json"], &env)?)?;
    ensure!(
        st["sites"][0]["state"] == "drifted",
        "left for the operator: {st}"
    );
    ensure!(st["sites"][0]["local_id"] == local.as_str(), "{st}");

    // Repair, with the agent stopped: alpha is published again from the engine, under a
    // new local id; the drifted copy is retired; the cache chunk is fetched again.
    let out = run(
        &["check", "--data", data.to_str().unwrap(), "--repair"],
        &[],
    )?;
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "repair beside a running agent is refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.stop()?;
    let (ok, v) = check(&data, &["--read-data", "--repair", "--timeout", "90s"])?;
    ensure!(ok, "{v}");
    ensure!(
        v["problems"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["repaired"] == true),
        "{v}"
    );
    let actions = v["actions"].to_string();
    ensure!(
        actions.contains("dropped damaged cache chunk") && actions.contains("published image"),
        "{v}"
    );
    let st = json(&run(&["status", &ga, "--json"], &env)?)?;
    let p = &st["sites"][0];
    ensure!(p["state"] == "published" && p["version"] == 1, "{st}");
    let now = p["local_id"].as_str().context("local id")?;
    ensure!(now != local, "a new copy: {st}");
    ensure!(!pool.join(&local).exists(), "the drifted copy is retired");
    ensure!(std::fs::read(pool.join(now).join("alpha.raw"))? == content);

    agent.restart()?;
    let (ok, v) = check(&data, &["--read-data"])?;
    ensure!(ok, "{v}");
    Ok(())
}

/// A site whose service keeps no local copy (an S3 bucket): a damaged cache chunk cannot be
/// restored from the published image, so `check --repair` fetches it from the engine, and
/// leaves the (intact) published version as it is.
#[test]
fn agent_repair_fetches_lost_cache_chunks_from_the_engine_without_republishing() -> Result<()> {
    let swift = seedcast::services::swift::Swift::start()?;
    swift.create_bucket("vms")?;
    let (site, aws) = s3_site(&swift);
    let site: Vec<&str> = site.iter().map(String::as_str).collect();
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let engine = TestEngine::start(d, &[])?;
    let env = engine.env();
    let mut agent = TestAgent::start_with_env(d, &engine, "s3", &site, &aws)?;
    wait_connected(&env, 1, Duration::from_secs(60))?;
    let a = image(d, "alpha")?;
    let content = std::fs::read(&a)?;
    let ga = gid(&push_wait_json(&env, "alpha", &a)?)?;
    let local = json(&run(&["status", &ga, "--json"], &env)?)?["sites"][0]["local_id"]
        .as_str()
        .context("local id")?
        .to_string();
    let data = agent.data.clone();

    flip_in_cache(&data.join("db"), &content)?;
    let (ok, v) = check_with_env(&data, &["--read-data"], &aws)?;
    ensure!(!ok, "{v}");
    ensure!(problems(&v, "damaged_chunk").len() == 1, "{v}");
    ensure!(
        problems(&v, "drifted").is_empty(),
        "the copy in the bucket is intact: {v}"
    );

    agent.stop()?;
    let (ok, v) = check_with_env(
        &data,
        &["--read-data", "--repair", "--timeout", "90s"],
        &aws,
    )?;
    ensure!(ok, "{v}");
    let actions = v["actions"].to_string();
    ensure!(
        actions.contains("dropped damaged cache chunk") && actions.contains("fetched the chunks"),
        "{v}"
    );
    let st = json(&run(&["status", &ga, "--json"], &env)?)?;
    ensure!(st["sites"][0]["state"] == "published", "{st}");
    ensure!(
        st["sites"][0]["local_id"] == local.as_str(),
        "not republished: {st}"
    );
    ensure!(
        st["sites"][0]["bytes_sent"].as_u64() < Some(1 << 20),
        "only the lost chunk travels: {st}"
    );
    agent.restart()?;
    let (ok, v) = check_with_env(&data, &["--read-data"], &aws)?;
    ensure!(ok, "{v}");
    Ok(())
}
