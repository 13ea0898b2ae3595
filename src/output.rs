//! What the CLI prints. The JSON shapes are a contract that scripts rely on: fields may be
//! added, never renamed or removed. Text that came from a peer (image names, local ids,
//! errors an agent reported, adapter names) goes through [`printable`] in tables, so no
//! escape sequence reaches the operator's terminal; JSON escapes control characters itself.

use std::borrow::Cow;

use seedcast_core::GlobalId;
use seedcast_core::protocol::{ImageStatus, SiteInfo, SitePlacement, VersionInfo};
use serde_json::{Value, json};

fn placement_json(p: &SitePlacement) -> Value {
    json!({
        "site": p.site,
        "local_id": p.local_id,
        "version": p.version,
        "state": p.state.as_str(),
        "bytes_sent": p.bytes_sent,
        "bytes_needed": p.bytes_needed,
        "wire_bytes": p.wire_bytes,
        "rate": p.rate,
        "eta_secs": p.eta_secs,
        "error": p.error,
    })
}

/// `push --json`, `status ID --json`.
pub fn image_json(s: &ImageStatus) -> Value {
    json!({
        "global_id": s.global_id.to_string(),
        "name": s.name,
        "version": s.version,
        "bytes_uploaded": s.bytes_uploaded,
        "total_bytes": s.total_len,
        "data_bytes": s.data_len,
        "sites": s.sites.iter().map(placement_json).collect::<Vec<_>>(),
    })
}

/// `status --json` without an id.
pub fn images_json(v: &[ImageStatus]) -> Value {
    json!({ "images": v.iter().map(image_json).collect::<Vec<_>>() })
}

/// `history --json`.
pub fn history_json(g: &GlobalId, v: &[VersionInfo]) -> Value {
    json!({
        "global_id": g.to_string(),
        "versions": v.iter().map(|i| json!({
            "version": i.version,
            "parent": i.parent,
            "created_unix": i.created_unix,
            "total_bytes": i.total_len,
            "data_bytes": i.data_len,
            "files": i.files,
            "change": i.change,
            "bytes_uploaded": i.bytes_uploaded,
        })).collect::<Vec<_>>()
    })
}

pub fn history_table(v: &[VersionInfo]) -> String {
    let mut out = format!(
        "{:>7} {:>6} {:>11} {:>11} {:>11}  {}\n",
        "VERSION", "PARENT", "SIZE", "DATA", "UPLOADED", "CHANGE"
    );
    for i in v {
        out += &format!(
            "{:>7} {:>6} {:>11} {:>11} {:>11}  {}\n",
            i.version,
            i.parent
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            human_bytes(i.total_len),
            human_bytes(i.data_len),
            human_bytes(i.bytes_uploaded),
            printable(&i.change)
        );
    }
    out
}

/// `sites --json`.
pub fn sites_json(v: &[SiteInfo]) -> Value {
    json!({
        "sites": v.iter().map(|s| json!({
            "site": s.site,
            "adapter": s.adapter,
            "connected": s.connected,
            "revoked": s.revoked,
            "enrolled": s.enrolled,
            "cert_expires_unix": s.cert_expires_unix,
            "max_rate": s.max_rate,
            "congestion": s.congestion.map(|c| c.name()),
        })).collect::<Vec<_>>()
    })
}

/// `s` with every control character (ESC, CR, BEL, …) written as its escape, `\u{1b}`.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_unicode().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

pub use seedcast_core::units::human_bytes;

/// A duration left, for people: `45s`, `12m05s`, `3h20m`.
pub fn human_secs(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// A table of an image's sites, for people.
pub fn image_table(s: &ImageStatus) -> String {
    let mut out = format!(
        "{}  {:?}  version {}  {} ({} data)\n",
        s.global_id,
        s.name,
        s.version,
        human_bytes(s.total_len),
        human_bytes(s.data_len)
    );
    // Columns as wide as their longest entry: local ids range from a UUID to an OCI
    // digest; site names are the operator's.
    let w = |f: &dyn Fn(&SitePlacement) -> usize, min: usize| {
        s.sites.iter().map(f).chain([min]).max().unwrap_or(min)
    };
    let site_w = w(&|p| p.site.chars().count(), 12);
    let id_w = w(
        &|p| {
            p.local_id
                .as_deref()
                .map_or(1, |l| printable(l).chars().count())
        },
        38,
    );
    out += &format!(
        "  {:<site_w$} {:<id_w$} {:>7} {:<13} {:>12} {:>12} {:>12} {:>8}\n",
        "SITE", "LOCAL ID", "VERSION", "STATE", "BYTES SENT", "ON THE WIRE", "RATE", "ETA"
    );
    for p in &s.sites {
        out += &format!(
            "  {:<site_w$} {:<id_w$} {:>7} {:<13} {:>12} {:>12} {:>12} {:>8}{}\n",
            p.site,
            printable(p.local_id.as_deref().unwrap_or("-")),
            p.version,
            p.state.as_str(),
            human_bytes(p.bytes_sent),
            human_bytes(p.wire_bytes),
            if p.rate > 0 {
                seedcast_core::rate::human_rate(p.rate * 8)
            } else {
                "-".into()
            },
            p.eta_secs.map_or("-".into(), human_secs),
            p.error
                .as_deref()
                .map(|e| format!("  ({})", printable(e)))
                .unwrap_or_default()
        );
    }
    out
}

pub fn sites_table(v: &[SiteInfo]) -> String {
    let mut out = format!(
        "{:<16} {:<8} {:<12} {:<12} {:<10}\n",
        "SITE", "ADAPTER", "CONNECTED", "MAX RATE", "CONGESTION"
    );
    for s in v {
        let state = if s.revoked {
            "revoked"
        } else if s.connected {
            "yes"
        } else {
            "no"
        };
        let state = if !s.enrolled && !s.revoked {
            "not enrolled"
        } else {
            state
        };
        out += &format!(
            "{:<16} {:<8} {:<12} {:<12} {:<10}\n",
            s.site,
            printable(&s.adapter),
            state,
            s.max_rate
                .map_or("-".to_string(), seedcast_core::rate::human_rate),
            s.congestion.map_or("default", |c| c.name()),
        );
    }
    out
}

/// `check --json`: the report as it is (its field names are the contract).
pub fn check_json(r: &seedcast_core::check::Report) -> Value {
    let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
    v["ok"] = json!(r.unrepaired() == 0);
    v
}

/// `check`, for people: what was looked at, each problem with what it touches, what a
/// repair did.
pub fn check_text(r: &seedcast_core::check::Report) -> String {
    let role = match r.role {
        seedcast_core::check::Role::Engine => "engine",
        seedcast_core::check::Role::Agent => "agent",
    };
    let c = &r.checked;
    let mut out = format!(
        "{role} data {}: {} records, {} images, {} versions, {} chunks{}\n",
        r.data,
        c.records,
        c.images,
        c.versions,
        c.chunks,
        if r.read_data {
            format!(", {} read and hashed", human_bytes(c.bytes_read))
        } else {
            " (structure only; --read-data re-hashes every byte)".into()
        }
    );
    for p in &r.problems {
        out += &format!(
            "{} {:<16} {}: {}\n",
            if p.repaired { "repaired" } else { "PROBLEM " },
            p.kind.as_str(),
            printable(&p.item),
            printable(&p.detail)
        );
        for t in &p.images {
            let versions: Vec<String> = t.versions.iter().map(|v| format!("v{v}")).collect();
            out += &format!(
                "           touches {} {:?} {}\n",
                t.global_id,
                printable(&t.name),
                versions.join(", ")
            );
        }
    }
    for a in &r.actions {
        out += &format!("repair: {}\n", printable(a));
    }
    let left = r.unrepaired();
    out += &match (r.problems.len(), left) {
        (0, _) => "no problems found\n".to_string(),
        (n, 0) => format!("{n} problems found, all repaired\n"),
        (n, left) if r.repair => format!("{n} problems found, {left} not repaired\n"),
        (n, _) => format!("{n} problems found (--repair fixes what it can)\n"),
    };
    out
}

fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

fn per_sec(bytes: u64, us: u64) -> u64 {
    if us == 0 {
        0
    } else {
        (bytes as f64 / secs(us)) as u64
    }
}

/// `bench site --json`.
pub fn site_bench_json(b: &seedcast_core::protocol::SiteBench) -> Value {
    json!({
        "site": b.site,
        "rtt_quic_ms": b.rtt_quic_us as f64 / 1e3,
        "rtt_ping_ms": b.rtt_ping_us as f64 / 1e3,
        "raw_bytes": b.raw_bytes,
        "raw_seconds": secs(b.raw_us),
        "raw_bytes_per_sec": per_sec(b.raw_bytes, b.raw_us),
        "chunks": b.chunks,
        "chunk_payload_bytes": b.chunk_payload_bytes,
        "chunk_data_bytes": b.chunk_raw_bytes,
        "chunk_seconds": secs(b.chunk_us),
        "chunk_payload_bytes_per_sec": per_sec(b.chunk_payload_bytes, b.chunk_us),
        "chunk_data_bytes_per_sec": per_sec(b.chunk_raw_bytes, b.chunk_us),
        "verify_seconds": secs(b.verify_us),
        "write_seconds": secs(b.write_us),
        "limit": site_bench_limit(b),
    })
}

/// What holds the site back: `link` when the chunk pipeline moves its payload about as fast
/// as raw bytes go (the network is the limit), `site` when it is well below (the agent's
/// CPU verifying or its disk writing), and which of the two it spent longer on.
pub fn site_bench_limit(b: &seedcast_core::protocol::SiteBench) -> &'static str {
    let raw = per_sec(b.raw_bytes, b.raw_us) as f64;
    let pipe = per_sec(b.chunk_payload_bytes, b.chunk_us) as f64;
    if raw == 0.0 || pipe >= 0.8 * raw {
        "link"
    } else if b.write_us > b.verify_us {
        "site disk"
    } else {
        "site cpu"
    }
}

/// `bench site` as text.
pub fn site_bench_text(b: &seedcast_core::protocol::SiteBench) -> String {
    let rate = |bytes, us| format!("{}/s", human_bytes(per_sec(bytes, us)));
    format!(
        "site {}\n\
         round trip   {:.2} ms (ping through the agent; QUIC's estimate {:.2} ms)\n\
         raw          {} in {:.1} s: {}\n\
         chunks       {} chunks, {} on the wire, {} verified and written in {:.1} s: {} on the wire, {} of data\n\
         at the site  verifying {:.2} s, writing {:.2} s (summed over its threads)\n\
         limit        {}\n",
        printable(&b.site),
        b.rtt_ping_us as f64 / 1e3,
        b.rtt_quic_us as f64 / 1e3,
        human_bytes(b.raw_bytes),
        secs(b.raw_us),
        rate(b.raw_bytes, b.raw_us),
        b.chunks,
        human_bytes(b.chunk_payload_bytes),
        human_bytes(b.chunk_raw_bytes),
        secs(b.chunk_us),
        rate(b.chunk_payload_bytes, b.chunk_us),
        rate(b.chunk_raw_bytes, b.chunk_us),
        secs(b.verify_us),
        secs(b.write_us),
        site_bench_limit(b),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_from_peers_never_reach_the_terminal() {
        assert_eq!(printable("sc-1/v2"), "sc-1/v2");
        let hostile = "id\u{1b}]0;owned\u{7}\r\n";
        let shown = printable(hostile);
        assert!(!shown.chars().any(char::is_control), "{shown}");
        assert!(shown.contains("\\u{1b}"), "{shown}");
        let mut st = ImageStatus {
            global_id: GlobalId([1; 12]),
            name: "n\u{1b}[2J".into(),
            version: 1,
            bytes_uploaded: 0,
            total_len: 0,
            data_len: 0,
            sites: vec![SitePlacement {
                site: "a".into(),
                local_id: Some(hostile.into()),
                version: 1,
                state: seedcast_core::protocol::PlacementState::Failed,
                bytes_sent: 0,
                bytes_needed: 0,
                error: Some("bad\u{1b}[31m".into()),
                wire_bytes: 0,
                rate: 0,
                eta_secs: None,
            }],
        };
        let t = image_table(&st);
        assert!(
            !t.contains('\u{1b}') && !t.contains('\r') && !t.contains('\u{7}'),
            "{t}"
        );
        st.sites.clear();
        assert!(!image_table(&st).contains('\u{1b}'));
    }
}
