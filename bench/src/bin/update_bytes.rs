//! The update benchmark: bytes on the wire to take three sites from one real Debian image
//! to the next, side by side with the tools people use for the same job, in one run.
//!
//! Seeds v1 (built by `../shared/testdata/make-images.sh`) to three agents on 127.0.0.1,
//! adapts it to v2 with `--file`, and reports each site's bytes for the update: the chunk
//! payload and everything on the wire (QUIC datagrams with UDP/IP headers, both directions,
//! manifest and acknowledgements included). Then, on the same files in the same run:
//! `zstd -19 --long=31 --patch-from=v1 v2`, `xdelta3 -e -9 -s v1 v2`, `casync make` of v2
//! into a store that holds v1's chunks (new chunk files + the index), and
//! `rsync --no-whole-file --stats` onto a copy of v1 (total bytes sent).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use seedcast::bench::peers::dir_bytes;
use seedcast::client::{AdaptOptions, Change, PushOptions};
use seedcast::cluster::{LocalCluster, file_hash};
use seedcast_core::protocol::{ImageStatus, PlacementState};

#[derive(Parser, Debug)]
struct Args {
    /// Directory with v1.raw and v2.raw (make-images.sh OUTDIR).
    #[arg(long, default_value_t = default_images())]
    images: String,
    /// The new version's file in the images directory: `v2.raw` (a rebuilt filesystem) or
    /// `v2-inplace.raw` (v1 patched in place, as a running VM is; `INPLACE=1 make-images.sh`).
    #[arg(long, default_value = "v2.raw")]
    v2: String,
    /// Skip the baseline tools (seedcast only).
    #[arg(long)]
    no_baselines: bool,
    /// Write the results as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn default_images() -> String {
    format!(
        "{}/.cache/seedcast-images",
        std::env::var("HOME").unwrap_or_default()
    )
}

fn size(p: &Path) -> Result<u64> {
    Ok(std::fs::metadata(p)?.len())
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

struct Row {
    tool: String,
    bytes: u64,
    secs: f64,
    note: String,
}

/// What seedcast did: seeding v1, then the update to v2, at three sites.
struct SeedcastRun {
    seed: ImageStatus,
    seed_secs: f64,
    update: ImageStatus,
    update_secs: f64,
}

/// Seed v1 (as `disk.raw`) to three agents, adapt it to v2, check every site holds v2.
async fn run_seedcast(root: &Path, disk: &Path, v2: &Path) -> Result<SeedcastRun> {
    let cluster =
        LocalCluster::start(Some(root.to_path_buf()), &["site-a", "site-b", "site-c"]).await?;
    let client = cluster.client().await?;
    let all_published =
        |s: &ImageStatus| s.sites.iter().all(|p| p.state == PlacementState::Published);
    let t = Instant::now();
    let c1 = client
        .push(
            &PushOptions::new("debian", vec![disk.to_path_buf()]),
            |_| {},
        )
        .await?;
    let seed = client.watch(&c1.global_id, 1, |_| {}).await?;
    let seed_secs = t.elapsed().as_secs_f64();
    ensure!(all_published(&seed), "seeding failed: {seed:?}");

    let t = Instant::now();
    let change = Change::Replace {
        path: "disk.raw".into(),
        file: v2.to_path_buf(),
    };
    let c2 = client.adapt(&c1.global_id, &[change], 3).await?;
    let update = client.watch(&c1.global_id, c2.version, |_| {}).await?;
    let update_secs = t.elapsed().as_secs_f64();
    ensure!(all_published(&update), "update failed: {update:?}");
    // Every site now holds v2 byte for byte.
    let want = file_hash(v2)?;
    for p in &update.sites {
        holds(&cluster, p, want).await?;
    }
    client.close().await;
    cluster.shutdown().await?;
    Ok(SeedcastRun {
        seed,
        seed_secs,
        update,
        update_secs,
    })
}

/// Fail unless the site of `p` holds `disk.raw` with hash `want`, read back through its
/// service.
async fn holds(
    cluster: &LocalCluster,
    p: &seedcast_core::protocol::SitePlacement,
    want: blake3::Hash,
) -> Result<()> {
    let local = p
        .local_id
        .as_deref()
        .context("published without a local id")?;
    let rb = cluster
        .agent(&p.site)
        .adapter
        .read_back(local, "disk.raw")
        .await?;
    ensure!(file_hash(rb.path())? == want, "{} does not hold v2", p.site);
    Ok(())
}

/// The client's leg with the previous version at hand: a fresh engine and one site seeded
/// with v1, then `adapt --file disk.raw=v2 --base v1`, the site checked to hold v2. Returns
/// the bytes uploaded and the seconds from the adapt call to the commit (cutting and
/// indexing v1, cutting v2, delta encoding, upload, the engine's decoding and checks).
async fn run_base_upload(root: &Path, disk: &Path, v1: &Path, v2: &Path) -> Result<(u64, f64)> {
    let cluster = LocalCluster::start(Some(root.to_path_buf()), &["site-d"]).await?;
    let client = cluster.client().await?;
    let c1 = client
        .push(
            &PushOptions::new("debian", vec![disk.to_path_buf()]),
            |_| {},
        )
        .await?;
    client.watch(&c1.global_id, 1, |_| {}).await?;
    let t = Instant::now();
    let change = Change::Replace {
        path: "disk.raw".into(),
        file: v2.to_path_buf(),
    };
    let opts = AdaptOptions {
        bases: vec![v1.to_path_buf()],
        ..AdaptOptions::default()
    };
    let c2 = client.adapt_with(&c1.global_id, &[change], &opts).await?;
    let secs = t.elapsed().as_secs_f64();
    let done = client.watch(&c1.global_id, c2.version, |_| {}).await?;
    let p = &done.sites[0];
    ensure!(
        p.state == PlacementState::Published,
        "update failed: {done:?}"
    );
    holds(&cluster, p, file_hash(v2)?).await?;
    client.close().await;
    cluster.shutdown().await?;
    Ok((c2.bytes_uploaded, secs))
}

/// seedcast's rows: the update's bytes on the wire and its payload, per site.
fn seedcast_rows(r: &SeedcastRun) -> Vec<Row> {
    let per_site_wire = r
        .update
        .sites
        .iter()
        .map(|p| p.wire_bytes)
        .max()
        .unwrap_or(0);
    let per_site_payload = r
        .update
        .sites
        .iter()
        .map(|p| p.bytes_sent)
        .max()
        .unwrap_or(0);
    vec![
        Row {
            tool: "seedcast, on the wire per site".into(),
            bytes: per_site_wire,
            secs: r.update_secs,
            note: "QUIC datagrams + UDP/IP headers, both directions: manifest, control, delta groups, acks".into(),
        },
        Row {
            tool: "seedcast, chunk payload per site".into(),
            bytes: per_site_payload,
            secs: r.update_secs,
            note: "delta groups and stored chunks only".into(),
        },
    ]
}

/// `zstd -19 --long=31 --patch-from=v1 v2`: one delta file.
fn zstd_row(v1: &Path, v2: &Path, work: &Path) -> Result<Row> {
    let t = Instant::now();
    let out = work.join("v2.zst");
    run(Command::new("zstd")
        .args(["-q", "-f", "-19", "--long=31"])
        .arg(format!("--patch-from={}", v1.display()))
        .arg(v2)
        .arg("-o")
        .arg(&out))?;
    Ok(Row {
        tool: "zstd -19 --long=31 --patch-from".into(),
        bytes: size(&out)?,
        secs: t.elapsed().as_secs_f64(),
        note: "one delta file".into(),
    })
}

/// `xdelta3 -e -9 -s v1 v2`: one delta file.
fn xdelta_row(v1: &Path, v2: &Path, work: &Path) -> Result<Row> {
    let t = Instant::now();
    let out = work.join("v2.xd3");
    run(Command::new("xdelta3")
        .args(["-e", "-9", "-f", "-s"])
        .arg(v1)
        .arg(v2)
        .arg(&out))?;
    Ok(Row {
        tool: "xdelta3 -e -9".into(),
        bytes: size(&out)?,
        secs: t.elapsed().as_secs_f64(),
        note: "one delta file".into(),
    })
}

/// `casync make` of v2 into a store holding v1's chunks: new chunk files + the index.
fn casync_row(v1: &Path, v2: &Path, work: &Path) -> Result<Row> {
    let t = Instant::now();
    let store = work.join("casync.castr");
    let make = |index: &str, image: &Path| {
        run(Command::new("casync")
            .arg("make")
            .arg(format!("--store={}", store.display()))
            .arg(work.join(index))
            .arg(image))
    };
    make("v1.caibx", v1)?;
    let before = dir_bytes(&store)?;
    make("v2.caibx", v2)?;
    let new_chunks = dir_bytes(&store)? - before;
    let index = size(&work.join("v2.caibx"))?;
    Ok(Row {
        tool: "casync make (new chunks + index)".into(),
        bytes: new_chunks + index,
        secs: t.elapsed().as_secs_f64(),
        note: format!("{new_chunks} B of new compressed chunks, {index} B index"),
    })
}

/// `rsync --no-whole-file --stats` of v2 onto a copy of v1: total bytes sent.
fn rsync_row(v1: &Path, v2: &Path, work: &Path) -> Result<Row> {
    let t = Instant::now();
    let dest = work.join("rsync-dest");
    std::fs::create_dir_all(&dest)?;
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(v1)
        .arg(dest.join("disk.raw")))?;
    let stats = run(Command::new("rsync")
        .args(["--no-whole-file", "--stats"])
        .arg(v2)
        .arg(dest.join("disk.raw")))?;
    let grab = |key: &str| -> Option<u64> {
        stats.lines().find(|l| l.starts_with(key)).and_then(|l| {
            l[key.len()..]
                .split_whitespace()
                .next()
                .map(|n| n.replace(',', ""))
                .and_then(|n| n.parse().ok())
        })
    };
    let sent = grab("Total bytes sent:").context("rsync stats: no total bytes sent")?;
    let literal = grab("Literal data:").unwrap_or(0);
    Ok(Row {
        tool: "rsync --no-whole-file".into(),
        bytes: sent,
        secs: t.elapsed().as_secs_f64(),
        note: format!("total bytes sent ({literal} B literal data)"),
    })
}

/// The table, every row as a ratio to zstd's and casync's bytes.
fn print_table(rows: &[Row]) {
    let base = |prefix: &str| {
        rows.iter()
            .find(|r| r.tool.starts_with(prefix))
            .map(|r| r.bytes)
    };
    let (zstd, casync) = (base("zstd"), base("casync"));
    println!("| tool | bytes | × zstd --patch-from | × casync | seconds | what |");
    println!("| --- | ---: | ---: | ---: | ---: | --- |");
    let ratio = |b: u64, base: Option<u64>| {
        base.map(|x| format!("{:.2}", b as f64 / x as f64))
            .unwrap_or_else(|| "–".into())
    };
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {:.1} | {} |",
            r.tool,
            r.bytes,
            ratio(r.bytes, zstd),
            ratio(r.bytes, casync),
            r.secs,
            r.note
        );
    }
}

fn write_json(path: &Path, r: &SeedcastRun, rows: &[Row]) -> Result<()> {
    let (s1, s2) = (&r.seed, &r.update);
    let v = serde_json::json!({
        "seed": {"seconds": r.seed_secs, "bytes_uploaded": s1.bytes_uploaded, "payload_per_site": s1.sites[0].bytes_sent, "wire_per_site": s1.sites[0].wire_bytes},
        "update": {"seconds": r.update_secs, "bytes_uploaded": s2.bytes_uploaded,
            "bytes_uploaded_with_base": rows.iter().find(|r| r.tool.contains("--base")).map(|r| r.bytes),
            "sites": s2.sites.iter().map(|p| serde_json::json!({"site": p.site, "bytes_sent": p.bytes_sent, "wire_bytes": p.wire_bytes})).collect::<Vec<_>>()},
        "rows": rows.iter().map(|r| serde_json::json!({"tool": r.tool, "bytes": r.bytes, "seconds": r.secs, "note": r.note})).collect::<Vec<_>>(),
    });
    std::fs::write(path, serde_json::to_string_pretty(&v)?)?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let images = PathBuf::from(&args.images);
    let (v1, v2) = (images.join("v1.raw"), images.join(&args.v2));
    if !v1.exists() || !v2.exists() {
        bail!(
            "{} has no v1.raw / {}: build them with ../shared/testdata/make-images.sh {} (INPLACE=1 for v2-inplace.raw)",
            images.display(),
            args.v2,
            images.display()
        );
    }
    let tmp = tempfile::Builder::new()
        .prefix("seedcast-bench-")
        .tempdir()?;
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work)?;
    // The image's file is known as disk.raw in both versions.
    let disk = work.join("disk.raw");
    std::os::unix::fs::symlink(&v1, &disk)?;

    let r = run_seedcast(&tmp.path().join("cluster"), &disk, &v2).await?;
    let (base_upload, base_secs) =
        run_base_upload(&tmp.path().join("cluster-base"), &disk, &v1, &v2).await?;
    let mut rows = seedcast_rows(&r);
    rows.push(Row {
        tool: "seedcast upload, whole new chunks".into(),
        bytes: r.update.bytes_uploaded,
        secs: 0.0,
        note: "client → engine, zstd 3 chunks (no earlier version at hand)".into(),
    });
    rows.push(Row {
        tool: "**seedcast upload, `adapt --base v1`**".into(),
        bytes: base_upload,
        secs: base_secs,
        note: "client → engine, delta groups at zstd 19 against v1's chunks the engine holds"
            .into(),
    });
    if !args.no_baselines {
        rows.push(zstd_row(&v1, &v2, &work)?);
        rows.push(xdelta_row(&v1, &v2, &work)?);
        rows.push(casync_row(&v1, &v2, &work)?);
        rows.push(rsync_row(&v1, &v2, &work)?);
    }
    println!(
        "v1 → v2: {} → {} ({} / {} bytes of data)",
        v1.display(),
        v2.display(),
        r.seed.data_len,
        r.update.data_len
    );
    println!(
        "seeding v1 to 3 sites: {:.1} s, {} B uploaded, {} B payload per site",
        r.seed_secs, r.seed.bytes_uploaded, r.seed.sites[0].bytes_sent
    );
    println!(
        "update upload (client → engine): whole new chunks {} B; with --base v1 {} B in {:.1} s",
        r.update.bytes_uploaded, base_upload, base_secs
    );
    println!();
    print_table(&rows);
    if let Some(p) = args.json {
        write_json(&p, &r, &rows)?;
    }
    Ok(())
}
