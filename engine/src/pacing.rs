//! Rate limits on what the engine sends: per site (`seedcast site set NAME --max-rate`) and
//! engine-wide (`seedcast engine --max-rate`).
//!
//! Each data stream asks its connection's [`Pacer`] before it writes a record. The pacer
//! charges the token buckets ([`seedcast_core::rate::TokenBucket`]) with what the connection
//! really puts on the wire: the payload as it is written, corrected by the connection's own
//! count of datagrams sent (with their UDP/IP headers: QUIC framing, acknowledgements,
//! retransmissions, the control stream), so a limit holds for the bytes a link carries,
//! not only for the chunks.
//!
//! A record is charged as it is written, before the connection has sent it, so it is
//! charged with the wire bytes it will at least take: its payload times the ratio of a
//! full datagram to the stream bytes it can carry ([`wire_ratio`]). Charging the bare
//! payload, as this did first, left the QUIC framing (about 4 % of a datagram) uncharged
//! for as long as the payload count led the wire count, which was most of a transfer:
//! sites ran 3–5 % over their limits. The ratio is a lower bound, so a site is never
//! charged for more than it sends, and the wire count takes over whenever it is ahead.
//!
//! A limit changed while a transfer runs applies from its next record; a slow site's waits
//! never hold back another site (each waits on its own bucket; the engine-wide bucket is
//! only charged, in turn, with what each sends).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use quinn::{Connection, ConnectionStats};
use seedcast_core::rate::TokenBucket;

/// Time's worth of sending a bucket saves up while idle: short, so a limit holds over any
/// second, yet a few datagrams so small records are not paced one by one.
const BURST: Duration = Duration::from_millis(20);

/// One limit: `None` while unlimited, so a limit set later applies to running transfers.
pub(crate) type Limit = Arc<Mutex<Option<TokenBucket>>>;

fn limit(bps: Option<u64>) -> Limit {
    Arc::new(Mutex::new(bps.map(|b| TokenBucket::new(b, BURST))))
}

/// Set (or clear) a limit in place.
pub(crate) fn set_limit(l: &Limit, bps: Option<u64>) {
    let mut g = l.lock();
    match (g.as_mut(), bps) {
        (Some(b), Some(bps)) => b.set_bps(bps, BURST),
        (_, bps) => *g = bps.map(|b| TokenBucket::new(b, BURST)),
    }
}

/// Every limit of a running engine.
#[derive(Debug)]
pub(crate) struct Limits {
    pub global: Limit,
    sites: Mutex<HashMap<String, Limit>>,
}

impl Limits {
    pub fn new(global_bps: Option<u64>) -> Self {
        Limits {
            global: limit(global_bps),
            sites: Mutex::default(),
        }
    }

    /// The site's limit, made from `bps` the first time it is asked for.
    pub fn site(&self, site: &str, bps: Option<u64>) -> Limit {
        self.sites
            .lock()
            .entry(site.to_string())
            .or_insert_with(|| limit(bps))
            .clone()
    }

    /// The site's limit is now `bps` (for its running transfers too).
    pub fn set_site(&self, site: &str, bps: Option<u64>) {
        let l = self.site(site, bps);
        set_limit(&l, bps);
    }
}

/// UDP and IP header bytes of each of a connection's datagrams.
pub(crate) fn header_bytes(conn: &Connection) -> u64 {
    if conn.remote_address().is_ipv6() {
        48
    } else {
        28
    }
}

/// Bytes a connection has sent: datagrams with their UDP and IP headers.
fn wire_tx(conn: &Connection) -> u64 {
    wire_of(&conn.stats(), header_bytes(conn))
}

/// [`wire_tx`] from a snapshot of the connection's stats.
fn wire_of(s: &ConnectionStats, header: u64) -> u64 {
    s.udp_tx.bytes + header * s.udp_tx.datagrams
}

/// The least QUIC adds to a datagram's stream bytes: a short header's first byte and a
/// one-byte packet number (no connection ID counted), the AEAD tag, and a STREAM frame's
/// type, stream ID and length at their smallest.
const MIN_QUIC_OVERHEAD: u64 = 1 + 1 + 16 + 3;

/// Wire bytes per payload byte, at least, for a connection sending full datagrams of `mtu`
/// bytes (UDP payload) with `header` bytes of UDP/IP header: the datagram with its headers
/// over the stream bytes it carries (≈ 1.034 for IPv4 at quinn's usual 1452-byte
/// datagrams; measured in full on a veth link: 1.044).
fn wire_ratio(mtu: u16, header: u64) -> f64 {
    // QUIC's datagrams are never below 1200 bytes; quinn reports that before MTU discovery.
    let mtu = u64::from(mtu).max(1200);
    (mtu + header) as f64 / (mtu - MIN_QUIC_OVERHEAD) as f64
}

/// What one connection has been charged for.
#[derive(Debug, Default)]
struct Account {
    /// Payload handed to [`Pacer::admit`], in the wire bytes it takes at least.
    payload: u64,
    /// Charged to the buckets so far.
    charged: u64,
}

/// Paces one site connection's data streams.
#[derive(Debug)]
pub(crate) struct Pacer {
    conn: Connection,
    site: Limit,
    global: Limit,
    wire_start: u64,
    account: Mutex<Account>,
}

impl Pacer {
    pub fn new(conn: Connection, site: Limit, global: Limit) -> Self {
        Pacer {
            wire_start: wire_tx(&conn),
            conn,
            site,
            global,
            account: Mutex::default(),
        }
    }

    /// How long to wait before writing `n` more payload bytes (zero when unlimited or
    /// within the limit). The charge is what the connection has sent on the wire since
    /// the last call, or the payload in the wire bytes it takes at least if more (it is
    /// written before it is sent).
    pub fn charge(&self, n: u64, now: Instant) -> Duration {
        // One snapshot for both: it takes the connection's lock, on every record.
        let (stats, header) = (self.conn.stats(), header_bytes(&self.conn));
        let wire = wire_of(&stats, header).saturating_sub(self.wire_start);
        let n = (n as f64 * wire_ratio(stats.path.current_mtu, header)) as u64;
        let charge = {
            let mut a = self.account.lock();
            a.payload += n;
            let due = a.payload.max(wire);
            let c = due.saturating_sub(a.charged);
            a.charged = a.charged.max(due);
            c
        };
        let site = self.site.lock().as_mut().map(|b| b.take(now, charge));
        let global = self.global.lock().as_mut().map(|b| b.take(now, charge));
        site.unwrap_or_default().max(global.unwrap_or_default())
    }

    /// Wait until `n` more payload bytes may be written.
    pub async fn admit(&self, n: u64) {
        // Under a limit, what was written stays close to what the connection has sent:
        // bytes charged while the connection could not send them yet (its window still
        // opening, or the host busy) would otherwise leave later in a burst above the limit.
        while let Some(ahead) = self.ahead_at_most()
            && self.unsent() > ahead
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let wait = self.charge(n, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Payload written and not yet sent, at most: 100 ms at the lowest limit that applies
    /// (at least 64 KiB). `None` when no limit applies.
    fn ahead_at_most(&self) -> Option<u64> {
        let bps = [&self.site, &self.global]
            .into_iter()
            .filter_map(|l| l.lock().as_ref().map(|b| b.bps()))
            .min()?;
        Some((bps / 8 / 10).max(64 * 1024))
    }

    /// Payload written beyond what the connection has put on the wire (both in wire
    /// bytes, the payload's at least: so this never counts more than is really waiting).
    fn unsent(&self) -> u64 {
        let wire = wire_tx(&self.conn).saturating_sub(self.wire_start);
        self.account.lock().payload.saturating_sub(wire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_charge_per_payload_byte_stays_below_what_a_link_carried() {
        // Measured on a veth link (tests/links.rs): 6 291 456 bytes of records took
        // 6 568 065 bytes of IPv4 datagrams at quinn's 1452-byte MTU, 1.044 per byte.
        let r = wire_ratio(1452, 28);
        assert!(r > 1.03 && r < 1.044, "{r}");
        // Smaller datagrams cost more per byte; IPv6 headers too.
        assert!(wire_ratio(1200, 28) > r);
        assert!(wire_ratio(1452, 48) > r);
        // A reported MTU below QUIC's minimum is read as the minimum.
        assert_eq!(wire_ratio(0, 28), wire_ratio(1200, 28));
    }
}
