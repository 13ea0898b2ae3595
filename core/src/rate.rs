//! Link rates: read as operators write them (`5Mbit`, as `tc` does), shown back the same
//! way, and the token bucket the engine paces a site's data with.
//!
//! Rates are bits per second on the wire: what a link's capacity and a provider's contract
//! are given in. The bucket itself counts bytes; its caller charges it with the bytes it
//! puts on the wire (datagrams with their UDP/IP headers), not just payload, so a limit
//! holds for what the link carries.

use std::time::{Duration, Instant};

/// The slowest limit accepted: below this a single 64 KiB chunk takes minutes.
pub const MIN_RATE_BPS: u64 = 64_000;
/// The fastest: 1 Tbit/s (a bigger number is a typo).
pub const MAX_RATE_BPS: u64 = 1_000_000_000_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error(
        "rate {0:?}: give a number and a unit, e.g. 5Mbit, 500kbit, 1Gbit, 2MB/s (bytes), or off"
    )]
    Syntax(String),
    #[error("rate {0:?} is below 64kbit or above 1Tbit")]
    Range(String),
}

/// A rate in bits per second from `5Mbit`, `5 mbit/s`, `5Mbps`, `500kbit`, `1Gbit`, `2MB/s`
/// (bytes: ×8), `2MiB/s` (binary). `Ok(None)` for `off`, `none`, `0` and `unlimited`.
/// Decimal prefixes are 1000 (as tc and link vendors use them); `Ki`/`Mi`/`Gi` are 1024.
pub fn parse_rate(s: &str) -> Result<Option<u64>, RateError> {
    let t = s.trim().to_ascii_lowercase();
    if matches!(t.as_str(), "off" | "none" | "0" | "unlimited") {
        return Ok(None);
    }
    let syntax = || RateError::Syntax(s.to_string());
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(syntax)?;
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().map_err(|_| syntax())?;
    let unit = unit.trim();
    let unit = unit.strip_suffix("/s").unwrap_or(unit);
    let unit = unit
        .strip_suffix("bps")
        .map_or(unit.to_string(), |u| format!("{u}bit"));
    let (prefix, bits) = if let Some(p) = unit.strip_suffix("bit") {
        (p, 1.0)
    } else if let Some(p) = unit.strip_suffix('b') {
        (p, 8.0)
    } else {
        return Err(syntax());
    };
    let scale = match prefix {
        "" => 1.0,
        "k" => 1e3,
        "m" => 1e6,
        "g" => 1e9,
        "t" => 1e12,
        "ki" => 1024.0,
        "mi" => 1024.0 * 1024.0,
        "gi" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(syntax()),
    };
    let bps = num * scale * bits;
    if !bps.is_finite() || bps < MIN_RATE_BPS as f64 || bps > MAX_RATE_BPS as f64 {
        return Err(RateError::Range(s.to_string()));
    }
    Ok(Some(bps.round() as u64))
}

/// `bps` for people, in the unit `parse_rate` reads back: `5Mbit/s`, `1.5Gbit/s`.
pub fn human_rate(bps: u64) -> String {
    const UNITS: [&str; 5] = ["bit/s", "kbit/s", "Mbit/s", "Gbit/s", "Tbit/s"];
    let mut v = bps as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0}{}", UNITS[u])
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

/// A token bucket in bytes. A caller asks to send `n` bytes and is told how long to wait
/// first; the bucket goes into debt for a request larger than what it holds, so a chunk
/// bigger than the burst still goes (after its wait) and the average holds exactly.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Bytes per second.
    rate: f64,
    /// Most tokens saved up while idle.
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    /// A bucket for `bps` bits per second, saving up at most `burst` of time's worth
    /// (at least 16 KiB), starting full.
    pub fn new(bps: u64, burst: Duration) -> Self {
        let rate = bps as f64 / 8.0;
        let burst = (rate * burst.as_secs_f64()).max(16.0 * 1024.0);
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: None,
        }
    }

    /// The rate in bits per second.
    pub fn bps(&self) -> u64 {
        (self.rate * 8.0).round() as u64
    }

    /// A new rate from now on (what was saved up stays, within the new burst's time).
    pub fn set_bps(&mut self, bps: u64, burst: Duration) {
        let fresh = TokenBucket::new(bps, burst);
        self.rate = fresh.rate;
        self.burst = fresh.burst;
        self.tokens = self.tokens.min(self.burst);
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        }
        self.last = Some(now);
    }

    /// Take `n` bytes at `now`; how long the sender must wait before they go (zero when
    /// the bucket held them).
    pub fn take(&mut self, now: Instant, n: u64) -> Duration {
        self.refill(now);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_read_as_tc_writes_them() {
        let ok = |s: &str, v: u64| assert_eq!(parse_rate(s), Ok(Some(v)), "{s}");
        ok("5Mbit", 5_000_000);
        ok("5mbit/s", 5_000_000);
        ok("5Mbps", 5_000_000);
        ok(" 500kbit ", 500_000);
        ok("1.5Gbit", 1_500_000_000);
        ok("2MB/s", 16_000_000);
        ok("1MiB/s", 8 * 1024 * 1024);
        ok("64000bit", 64_000);
        for off in ["off", "0", "none", "Unlimited"] {
            assert_eq!(parse_rate(off), Ok(None));
        }
        for bad in [
            "", "5", "fast", "5Mbyte", "5Xbit", "-5Mbit", "1e3Mbit", "5..1Mbit",
        ] {
            assert!(
                matches!(parse_rate(bad), Err(RateError::Syntax(_))),
                "{bad}"
            );
        }
        for out in ["1kbit", "2Tbit", "63999bit"] {
            assert!(matches!(parse_rate(out), Err(RateError::Range(_))), "{out}");
        }
    }

    #[test]
    fn human_rates_parse_back() {
        for bps in [64_000, 2_000_000, 5_000_000, 1_500_000_000, 10_000_000_000] {
            let h = human_rate(bps);
            assert_eq!(parse_rate(&h), Ok(Some(bps)), "{h}");
        }
        assert_eq!(human_rate(5_000_000), "5Mbit/s");
        assert_eq!(human_rate(1_500_000), "1.5Mbit/s");
    }

    #[test]
    fn the_bucket_holds_the_average_rate_and_goes_into_debt_for_big_sends() {
        // 8 Mbit/s = 1 MB/s; burst 16 KiB (the floor).
        let mut b = TokenBucket::new(8_000_000, Duration::ZERO);
        let t0 = Instant::now();
        assert_eq!(b.take(t0, 16 * 1024), Duration::ZERO);
        // 1 MB more at once: a second of debt.
        let w = b.take(t0, 1_000_000);
        assert!((w.as_secs_f64() - 1.0).abs() < 1e-6, "{w:?}");
        // Sending 100 × 10 kB back to back, each after its wait, takes 1 s more.
        let mut now = t0 + w;
        for _ in 0..100 {
            now += b.take(now, 10_000);
        }
        assert!(
            ((now - t0).as_secs_f64() - 2.0).abs() < 0.02,
            "{:?}",
            now - t0
        );
        // Idle for a minute saves up only the burst.
        now += Duration::from_secs(60);
        assert_eq!(b.take(now, 16 * 1024), Duration::ZERO);
        assert!(b.take(now, 1) > Duration::ZERO);
    }

    #[test]
    fn a_new_rate_applies_at_once() {
        let mut b = TokenBucket::new(8_000_000, Duration::ZERO);
        let t0 = Instant::now();
        b.take(t0, 16 * 1024);
        b.set_bps(800_000, Duration::ZERO);
        assert_eq!(b.bps(), 800_000);
        let w = b.take(t0, 100_000);
        assert!((w.as_secs_f64() - 1.0).abs() < 1e-6, "{w:?}");
    }
}
