//! Draw `seedcast bench local --json`'s report as an SVG a reader opens: each stage's data
//! rate beside its limit and its peer (left), and seeding time by site count beside the
//! loopback QUIC limit and rsync (right).
//!
//! ```sh
//! cargo run --release -- bench local --size 4GiB --sites 8 --json > bench-local.json
//! cargo run --release -p seedcast-bench --bin chart -- bench-local.json docs/bench-local.svg
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use clap::Parser;
use plotters::prelude::*;
use serde_json::Value;

#[derive(Parser)]
struct Args {
    /// The report (`seedcast bench local --json`).
    report: PathBuf,
    /// The SVG to write.
    out: PathBuf,
}

const MIB: f64 = (1 << 20) as f64;
const SEEDCAST: RGBColor = RGBColor(31, 119, 180);
const LIMIT: RGBColor = RGBColor(150, 150, 150);
const PEER: RGBColor = RGBColor(255, 127, 14);

/// One bar: what it is, MiB/s, colour. A group's caption names its bars.
type Bar = (String, f64, RGBColor);

fn f(v: &Value) -> Result<f64> {
    v.as_f64().with_context(|| format!("not a number: {v}"))
}

fn main() -> Result<()> {
    let a = Args::parse();
    let r: Value = serde_json::from_slice(&std::fs::read(&a.report)?)
        .with_context(|| format!("{} is not bench local's JSON", a.report.display()))?;
    let data = f(&r["image"]["data_len"])?;
    let rate = |secs: f64| data / secs / MIB;
    let slowest = r["slowest_stage"].as_str().unwrap_or("slowest stage");
    let limit_secs = f(&r["limits"][format!("{slowest}_secs")])?;
    let mut groups: Vec<(String, Vec<Bar>)> = Vec::new();
    let mut ingest = vec![
        (
            "seedcast push".to_string(),
            f(&r["ingest"]["data_rate"])? / MIB,
            SEEDCAST,
        ),
        (format!("{slowest}, every core"), rate(limit_secs), LIMIT),
    ];
    if let Some(s) = r["casync_make"]["seconds"].as_f64() {
        ingest.push(("casync make".into(), rate(s), PEER));
    }
    groups.push(("ingest".into(), ingest));
    let mut re = vec![(
        "seedcast".to_string(),
        f(&r["reassembly"]["data_rate"])? / MIB,
        SEEDCAST,
    )];
    if let Some(s) = r["casync_extract"]["seconds"].as_f64() {
        re.push(("casync extract".into(), rate(s), PEER));
    }
    groups.push(("reassembly at a site".into(), re));
    let rounds = r["seeding"].as_array().context("seeding rounds")?;
    ensure!(!rounds.is_empty(), "no seeding round in the report");
    if let Some(last) = rounds.last() {
        let n = f(&last["sites"])?;
        let secs = f(&last["phase"]["seconds"])?;
        let mut g = vec![
            ("seedcast".to_string(), data * n / secs / MIB, SEEDCAST),
            (
                "same payload, plain QUIC".to_string(),
                data * n / f(&last["loopback_secs"])? / MIB,
                LIMIT,
            ),
        ];
        if let Some(s) = last["rsync"]["seconds"].as_f64() {
            g.push(("rsync".into(), data * n / s / MIB, PEER));
        }
        groups.push((format!("seeding {n} sites, all sites"), g));
    }

    let root = SVGBackend::new(&a.out, (1200, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "seedcast bench local: {:.1} GiB image, {:.0} MiB of data, {} cores",
        f(&r["image"]["total_len"])? / 1024.0 / MIB,
        data / MIB,
        r["cores"]
    );
    let root = root.titled(&title, ("sans-serif", 20))?;
    let (left, right) = root.split_horizontally(640);

    // Left: grouped bars of data rates.
    let bars: usize = groups.iter().map(|g| g.1.len() + 1).sum();
    let top = groups
        .iter()
        .flat_map(|g| g.1.iter().map(|b| b.1))
        .fold(0.0, f64::max)
        * 1.15;
    let mut c = ChartBuilder::on(&left)
        .caption(
            "data rate — blue seedcast, grey its limit, orange its peer",
            ("sans-serif", 15),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..bars as f64, 0.0..top)?;
    c.configure_mesh()
        .disable_x_mesh()
        .disable_x_axis()
        .y_desc("MiB/s")
        .draw()?;
    let mut x = 0.5;
    for (name, bs) in &groups {
        let start = x;
        for (_, v, colour) in bs {
            c.draw_series(std::iter::once(Rectangle::new(
                [(x, 0.0), (x + 0.9, *v)],
                colour.filled(),
            )))?;
            c.draw_series(std::iter::once(Text::new(
                format!("{v:.0}"),
                (x + 0.15, *v + top * 0.02),
                ("sans-serif", 12),
            )))?;
            x += 1.0;
        }
        c.draw_series(std::iter::once(Text::new(
            name.clone(),
            (start, top * 0.97),
            ("sans-serif", 13),
        )))?;
        let what: Vec<&str> = bs.iter().map(|b| b.0.as_str()).collect();
        c.draw_series(std::iter::once(Text::new(
            what.join(" / "),
            (start, top * 0.92),
            ("sans-serif", 10),
        )))?;
        x += 1.0;
    }

    // Right: seeding seconds by site count.
    let pts = |k: &dyn Fn(&Value) -> Option<f64>| -> Vec<(f64, f64)> {
        rounds
            .iter()
            .filter_map(|r| Some((r["sites"].as_f64()?, k(r)?)))
            .collect()
    };
    let seed = pts(&|r| r["phase"]["seconds"].as_f64());
    let quic = pts(&|r| r["loopback_secs"].as_f64());
    let rsync = pts(&|r| r["rsync"]["seconds"].as_f64());
    let max_sites = seed.iter().map(|p| p.0).fold(1.0, f64::max);
    let max_secs = seed
        .iter()
        .chain(&quic)
        .chain(&rsync)
        .map(|p| p.1)
        .fold(0.0, f64::max)
        * 1.15;
    let mut c = ChartBuilder::on(&right)
        .caption("seeding: commit → every site published", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..max_sites + 0.5, 0.0..max_secs)?;
    c.configure_mesh()
        .x_desc("sites (fresh, empty caches)")
        .y_desc("seconds")
        .draw()?;
    for (name, p, colour) in [
        ("seedcast", &seed, SEEDCAST),
        ("same payload, plain QUIC", &quic, LIMIT),
        ("rsync to each site", &rsync, PEER),
    ] {
        if p.is_empty() {
            continue;
        }
        c.draw_series(LineSeries::new(p.iter().copied(), colour.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2)));
        c.draw_series(p.iter().map(|&q| Circle::new(q, 4, colour.filled())))?;
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()?;
    println!("wrote {}", a.out.display());
    Ok(())
}
