//! `bench local`'s report as a person reads it: one table per question, every seedcast
//! figure beside what it is judged against, as a ratio.

use std::fmt::Write;

use seedcast_core::units::human_bytes;

use super::{LocalReport, Phase};

fn rate(bytes_per_sec: f64) -> String {
    format!("{}/s", human_bytes(bytes_per_sec.max(0.0) as u64))
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn cpu(p: &Phase) -> String {
    let c = &p.cost;
    format!(
        "{:.1} / {:.1} / {:.1}",
        c.client_cpu_secs, c.engine_cpu_secs, c.agents_cpu_secs
    )
}

fn rss(p: &Phase) -> String {
    let c = &p.cost;
    let show = |b: u64| if b == 0 { "-".to_string() } else { mib(b) };
    format!(
        "{} / {} / {}",
        show(c.client_peak_rss),
        show(c.engine_peak_rss),
        show(c.agent_peak_rss)
    )
}

/// The whole report.
pub fn render(r: &LocalReport) -> String {
    let mut o = String::new();
    let data = r.image.data_len as f64;
    let _ = writeln!(
        o,
        "image {} ({}): {} with {} of data; {} cores",
        r.image.path.display(),
        if r.image.generated {
            "generated"
        } else {
            "given"
        },
        human_bytes(r.image.total_len),
        human_bytes(r.image.data_len),
        r.cores
    );
    let l = &r.limits;
    let _ = writeln!(
        o,
        "\nstage limits over the same bytes (the best a pipelined ingest could reach):"
    );
    let _ = writeln!(o, "| stage | seconds | data rate |");
    let _ = writeln!(o, "| --- | ---: | ---: |");
    for (name, secs) in [
        ("read the file, every core".to_string(), l.read_secs),
        ("cut (FastCDC), one core".to_string(), l.cut_secs),
        ("BLAKE3 per chunk, every core".to_string(), l.blake3_secs),
        (
            format!("zstd {} per chunk, every core", l.zstd_level),
            l.zstd_secs,
        ),
    ] {
        let _ = writeln!(o, "| {name} | {secs:.2} | {} |", rate(data / secs));
    }
    let _ = writeln!(
        o,
        "| write {} to disk and sync | {:.2} | {} |",
        human_bytes(l.disk_write_bytes),
        l.disk_write_secs,
        rate(l.disk_rate())
    );

    let _ = writeln!(
        o,
        "\ningest (chunk, hash, compress, upload, verify, store):"
    );
    let _ = writeln!(
        o,
        "| run | seconds | data rate | × {} limit | CPU s client / engine / agents | peak RSS client / engine / agent | stored |",
        r.slowest_stage
    );
    let _ = writeln!(o, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    let i = &r.ingest;
    let _ = writeln!(
        o,
        "| seedcast push | {:.2} | {} | {:.2} | {} | {} | {} |",
        i.seconds,
        rate(i.data_rate),
        r.ingest_of_limit,
        cpu(i),
        rss(i),
        human_bytes(r.ingest_stored_bytes)
    );
    if let Some(c) = &r.casync_make {
        let _ = writeln!(
            o,
            "| casync make | {:.2} | {} | {:.2} | {:.1} | - | {} |",
            c.seconds,
            rate(data / c.seconds),
            r.limits.slowest_parallel().1 / c.seconds,
            c.cpu_secs,
            c.stored_bytes.map_or("-".into(), human_bytes)
        );
        let _ = writeln!(
            o,
            "seedcast ingest: {:.2}× casync make's speed",
            c.seconds / i.seconds
        );
    }

    let _ = writeln!(
        o,
        "\nseeding (commit → every site published; the engine holds the chunks):"
    );
    let _ = writeln!(
        o,
        "| sites | seconds | data rate, all sites | × loopback QUIC | × site disk | wire | CPU s engine / agents | engine CPU s per site | peak RSS engine / agent | rsync seconds | × rsync |"
    );
    let _ = writeln!(
        o,
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for s in &r.seeding {
        let p = &s.phase;
        let (rs, vs) = match &s.rsync {
            Some(x) => (
                format!("{:.2}", x.seconds),
                format!("{:.2}", x.seconds / p.seconds),
            ),
            None => ("-".into(), "-".into()),
        };
        let _ = writeln!(
            o,
            "| {} | {:.2} | {} | {:.2} | {:.2} | {} | {:.1} / {:.1} | {:.2} | {} / {} | {rs} | {vs} |",
            s.sites,
            p.seconds,
            rate(p.data_rate),
            s.of_loopback,
            s.of_disk_limit,
            human_bytes(p.wire_bytes),
            p.cost.engine_cpu_secs,
            p.cost.agents_cpu_secs,
            s.engine_cpu_per_site,
            mib(p.cost.engine_peak_rss),
            mib(p.cost.agent_peak_rss),
        );
    }

    let _ = writeln!(
        o,
        "\nreassembly at a site from its cache (nothing sent), published:"
    );
    let a = &r.reassembly;
    let _ = writeln!(
        o,
        "| run | seconds | data rate | CPU s agent | peak RSS agent |"
    );
    let _ = writeln!(o, "| --- | ---: | ---: | ---: | ---: |");
    let _ = writeln!(
        o,
        "| seedcast | {:.2} | {} | {:.1} | {} |",
        a.seconds,
        rate(a.data_rate),
        a.cost.agents_cpu_secs,
        mib(a.cost.agent_peak_rss)
    );
    if let Some(c) = &r.casync_extract {
        let _ = writeln!(
            o,
            "| casync extract, then its output synced ({:.2} s of it) | {:.2} | {} | {:.1} | - |",
            c.sync_secs.unwrap_or(0.0),
            c.seconds,
            rate(data / c.seconds),
            c.cpu_secs
        );
        let _ = writeln!(
            o,
            "seedcast reassembly: {:.2}× casync extract's speed",
            c.seconds / a.seconds
        );
    }
    if !r.peers_missing.is_empty() {
        let _ = writeln!(
            o,
            "\nnot installed, not compared: {}",
            r.peers_missing.join(", ")
        );
    }
    o
}
