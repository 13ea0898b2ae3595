//! What the CLI prints. The JSON shapes are a contract that scripts rely on: fields may be
//! added, never renamed or removed.

use seedcast_core::protocol::{ImageStatus, SiteInfo, SitePlacement};
use serde_json::{Value, json};

fn placement_json(p: &SitePlacement) -> Value {
    json!({
        "site": p.site,
        "local_id": p.local_id,
        "version": p.version,
        "state": p.state.as_str(),
        "bytes_sent": p.bytes_sent,
        "bytes_needed": p.bytes_needed,
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

/// `sites --json`.
pub fn sites_json(v: &[SiteInfo]) -> Value {
    json!({
        "sites": v.iter().map(|s| json!({
            "site": s.site,
            "adapter": s.adapter,
            "connected": s.connected,
            "revoked": s.revoked,
        })).collect::<Vec<_>>()
    })
}

/// Bytes in binary units, for people.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
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
    out += &format!(
        "  {:<12} {:<38} {:>7} {:<13} {:>12}\n",
        "SITE", "LOCAL ID", "VERSION", "STATE", "BYTES SENT"
    );
    for p in &s.sites {
        out += &format!(
            "  {:<12} {:<38} {:>7} {:<13} {:>12}{}\n",
            p.site,
            p.local_id.as_deref().unwrap_or("-"),
            p.version,
            p.state.as_str(),
            human_bytes(p.bytes_sent),
            p.error
                .as_deref()
                .map(|e| format!("  ({e})"))
                .unwrap_or_default()
        );
    }
    out
}

pub fn sites_table(v: &[SiteInfo]) -> String {
    let mut out = format!("{:<16} {:<8} {:<10}\n", "SITE", "ADAPTER", "CONNECTED");
    for s in v {
        let state = if s.revoked {
            "revoked"
        } else if s.connected {
            "yes"
        } else {
            "no"
        };
        out += &format!("{:<16} {:<8} {:<10}\n", s.site, s.adapter, state);
    }
    out
}
