//! `delivery`: a BBR-style congestion controller sized from what the path delivers, for
//! thin and far links.
//!
//! Measured on shaped links (`seedcast bench links`): Cubic and NewReno read every random
//! loss as congestion and keep a 10 Mbit/s link with 0.5 % loss less than half full;
//! quinn's BBR ignores random loss but overshoots a shallow bottleneck queue (its window is
//! 2–2.9× the path's bandwidth-delay product and quinn paces at 1.25 × window / RTT, not at
//! BBR's own pacing rate), so the engine sent 2–2.3× what reached the site.
//!
//! This controller keeps BBR's model and sizes the window from it alone:
//! - the path's bandwidth: the most bytes acknowledged per round trip over the last
//!   [`BW_ROUNDS`] rounds (rounds where the sender had nothing to send count only if they
//!   raise it);
//! - its base round trip: the least RTT of the last [`MIN_RTT_WINDOW`];
//! - the window: 1.15 × bandwidth × base RTT, plus [`ACK_ALLOWANCE`] of bandwidth for
//!   acknowledgements that arrive in bursts, plus a few datagrams. That keeps the queue it
//!   builds at the bottleneck to about a sixth of the round trip plus 10 ms, so a shallow
//!   buffer does not overflow; every [`PROBE_EVERY`] rounds one round probes with 1.4×, so
//!   freed capacity is found, and the next drains the queue (0.75×), so the base round trip
//!   is measured without it (the queue would otherwise inflate its own estimate).
//! - start-up doubles the window each round (never past twice what the measured bandwidth
//!   can use) until the bandwidth stops growing by a quarter for three rounds or a whole
//!   round's datagrams waited a quarter longer than the base round trip (a queue is
//!   forming): then the model takes over;
//! - a loss changes nothing by itself (random loss is not congestion); persistent congestion
//!   (every datagram of several round trips lost) starts over from a small window, and so
//!   does a connection that was silent for [`IDLE_RESTART`]: what it learnt may no longer
//!   hold (the link changed, or came back from an outage), and flooding a link with a window
//!   learnt on a faster one is what costs a thin link most.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory};
use quinn_proto::RttEstimator;

/// Rounds the bandwidth's maximum is kept over.
pub const BW_ROUNDS: usize = 10;
/// Bandwidth's worth of time added to the window for acknowledgements that come in bursts
/// (QUIC acknowledges every other datagram).
pub const ACK_ALLOWANCE: Duration = Duration::from_millis(10);
/// The base round trip is the least seen over this long (a path can change).
pub const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
/// After this long without an acknowledgement (or three round trips, if longer) the model
/// is stale — the link may have changed while idle, or come back from an outage — and
/// start-up begins again from the first window rather than flood it.
pub const IDLE_RESTART: Duration = Duration::from_secs(1);
/// One round in this many sends with a larger window, to find capacity that has freed up.
pub const PROBE_EVERY: u64 = 8;
/// The window's multiple of the bandwidth-delay product: the queue it keeps at the
/// bottleneck is this much above 1 (and the allowance), so a shallow buffer holds it.
const GAIN: f64 = 1.15;
/// ... in a probing round.
const PROBE_GAIN: f64 = 1.4;
/// ... and at most during start-up (which doubles the window each round).
const STARTUP_GAIN: f64 = 2.0;

/// Builds a [`Delivery`] controller per connection.
#[derive(Debug, Clone, Default)]
pub struct DeliveryConfig;

impl ControllerFactory for DeliveryConfig {
    fn build(self: Arc<Self>, now: Instant, mtu: u16) -> Box<dyn Controller> {
        Box::new(Delivery::new(now, mtu))
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct Delivery {
    mtu: u64,
    window: u64,
    starting: bool,
    /// Bytes acknowledged since the connection began.
    delivered: u64,
    /// The current round: when it began, what had been delivered then, and its number.
    round_start: Instant,
    round_delivered: u64,
    round: u64,
    /// Per round: bytes per second delivered (the last [`BW_ROUNDS`]).
    samples: std::collections::VecDeque<u64>,
    /// Start-up: the bandwidth at the last growth by a quarter, and rounds since.
    full_bw: u64,
    full_bw_rounds: u32,
    /// The least round trip of the last [`MIN_RTT_WINDOW`], from each round's least.
    min_rtt: Option<Duration>,
    rtt_rounds: std::collections::VecDeque<(Instant, Duration)>,
    srtt: Duration,
    /// The last acknowledgement: after a silence the model is stale.
    last_ack: Option<Instant>,
    /// Was any acknowledgement of this round for data sent while the sender had nothing
    /// more to send?
    round_app_limited: bool,
    /// The least round trip measured this round (send to acknowledgement).
    round_min_rtt: Option<Duration>,
}

impl Delivery {
    pub fn new(now: Instant, mtu: u16) -> Self {
        let mtu = mtu as u64;
        Delivery {
            mtu,
            window: (10 * mtu).max(14_720),
            starting: true,
            delivered: 0,
            round_start: now,
            round_delivered: 0,
            round: 0,
            samples: Default::default(),
            full_bw: 0,
            full_bw_rounds: 0,
            min_rtt: None,
            rtt_rounds: Default::default(),
            srtt: Duration::ZERO,
            last_ack: None,
            round_app_limited: false,
            round_min_rtt: None,
        }
    }

    fn initial(&self) -> u64 {
        (10 * self.mtu).max(14_720)
    }

    /// Start-up from `window` (a switch from another controller keeps its window).
    pub fn start_from(&mut self, window: u64) {
        self.window = window.max(self.min_window());
    }

    fn min_window(&self) -> u64 {
        4 * self.mtu
    }

    /// Bytes per second the path delivers (the recent rounds' most).
    pub fn bandwidth(&self) -> u64 {
        self.samples.iter().copied().max().unwrap_or(0)
    }

    pub fn starting(&self) -> bool {
        self.starting
    }

    /// The window the model gives for `gain`.
    fn model_window(&self, gain: f64) -> Option<u64> {
        let bw = self.bandwidth();
        let rtt = self.min_rtt?;
        if bw == 0 {
            return None;
        }
        let bdp = bw as f64 * rtt.as_secs_f64();
        let w = gain * bdp + bw as f64 * ACK_ALLOWANCE.as_secs_f64() + 3.0 * self.mtu as f64;
        Some((w as u64).max(self.min_window()))
    }

    /// Three quarters of the bandwidth-delay product, no allowance: the queue empties.
    fn drain_window(&self) -> Option<u64> {
        let (bw, rtt) = (self.bandwidth(), self.min_rtt?);
        (bw > 0).then(|| {
            ((0.75 * bw as f64 * rtt.as_secs_f64()) as u64 + 2 * self.mtu).max(self.min_window())
        })
    }

    /// A round ended at `now`: take its bandwidth sample and move the model on.
    fn end_round(&mut self, now: Instant) {
        let secs = now
            .saturating_duration_since(self.round_start)
            .as_secs_f64();
        let bytes = self.delivered - self.round_delivered;
        if secs > 0.0 && bytes > 0 {
            let bw = (bytes as f64 / secs) as u64;
            // A round the sender could not fill says only that the path does at least this.
            if !self.round_app_limited || bw > self.bandwidth() {
                self.samples.push_back(bw);
                if self.samples.len() > BW_ROUNDS {
                    self.samples.pop_front();
                }
            }
        }
        self.round += 1;
        self.round_start = now;
        self.round_delivered = self.delivered;
        self.round_app_limited = false;
        let round_rtt = self.round_min_rtt.take();
        // The base round trip: the least of the rounds of the last MIN_RTT_WINDOW (so it
        // can grow again when the path changed).
        if let Some(r) = round_rtt {
            self.rtt_rounds.push_back((now, r));
        }
        while self.rtt_rounds.len() > 1
            && self
                .rtt_rounds
                .front()
                .is_some_and(|(t, _)| now.saturating_duration_since(*t) > MIN_RTT_WINDOW)
        {
            self.rtt_rounds.pop_front();
        }
        if let Some(m) = self.rtt_rounds.iter().map(|(_, r)| *r).min() {
            self.min_rtt = Some(m);
        }
        if self.starting {
            let bw = self.bandwidth();
            if bw >= self.full_bw + self.full_bw / 4 {
                self.full_bw = bw;
                self.full_bw_rounds = 0;
            } else {
                self.full_bw_rounds += 1;
            }
            // Every datagram of the round waited longer than the path's base round trip
            // by a quarter (and 4 ms): a queue is forming; the pipe is full.
            let queueing = match (self.min_rtt, round_rtt) {
                (Some(m), Some(r)) => r > m + (m / 4).max(Duration::from_millis(4)),
                _ => false,
            };
            if self.full_bw_rounds >= 3 || queueing {
                self.starting = false;
            }
        }
        if !self.starting {
            let w = match self.round % PROBE_EVERY {
                0 => self.model_window(PROBE_GAIN),
                // The round after a probe drains the queue (less than the pipe holds), so
                // the next rounds measure the path's own round trip, not its queue.
                1 => self.drain_window(),
                _ => self.model_window(GAIN),
            };
            if let Some(w) = w {
                self.window = w;
            }
        }
    }
}

impl Controller for Delivery {
    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.acked(now, sent, bytes, app_limited, rtt.get(), rtt.min());
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        _sent: Instant,
        is_persistent_congestion: bool,
        _lost_bytes: u64,
    ) {
        if is_persistent_congestion {
            // Nothing got through for several round trips: the path is not what the
            // model says. Start over.
            *self = Delivery::new(now, self.mtu as u16);
            self.window = self.min_window();
        }
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = new_mtu as u64;
        self.window = self.window.max(self.min_window());
    }

    fn window(&self) -> u64 {
        self.window
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.initial()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

impl Delivery {
    /// An acknowledgement of `bytes` sent at `sent`, with the path's smoothed and least
    /// round trip (quinn's estimator, which only quinn can make: tests call this).
    pub fn acked(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        srtt: Duration,
        min_rtt: Duration,
    ) {
        let _ = min_rtt;
        let sample = now.saturating_duration_since(sent);
        if let Some(last) = self.last_ack
            && now.saturating_duration_since(last) > IDLE_RESTART.max(3 * srtt)
        {
            let mtu = self.mtu as u16;
            *self = Delivery::new(now, mtu);
        }
        self.last_ack = Some(now);
        self.delivered += bytes;
        self.srtt = srtt;
        if self.min_rtt.is_none_or(|m| sample < m) {
            self.min_rtt = Some(sample);
        }
        self.round_app_limited |= app_limited;
        self.round_min_rtt = Some(self.round_min_rtt.map_or(sample, |r| r.min(sample)));
        if self.starting && !app_limited {
            // Slow start: one more byte of window for every byte acknowledged, up to what
            // the path's measured bandwidth can use.
            let cap = self.model_window(STARTUP_GAIN).unwrap_or(u64::MAX);
            self.window = (self.window + bytes).min(cap.max(self.initial()));
        }
        // A round ends when data sent after it began is acknowledged.
        if sent >= self.round_start {
            self.end_round(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A link in 1 ms steps: a bottleneck of `rate` bytes/s with a queue of `queue` bytes
    /// (more is dropped, as tbf does), `rtt` of base round trip, random `loss`; the sender
    /// keeps the window full, paced at 1.25 × window / srtt as quinn paces. Returns
    /// (bytes delivered per second of the last half, datagrams dropped at the queue per
    /// datagram delivered).
    fn simulate(rate: f64, rtt_ms: u64, queue: u64, loss: f64, secs: u64) -> (f64, f64) {
        const PKT: u64 = 1200;
        let t0 = Instant::now();
        let mut cc = Delivery::new(t0, PKT as u16);
        let mut rng = 0x2545F4914F6CDD1Du64;
        let mut rand = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % 1_000_000) as f64 / 1_000_000.0
        };
        let (mut inflight, mut queued) = (0u64, 0u64);
        let mut queue_q: VecDeque<Instant> = VecDeque::new(); // send times, in the queue
        let mut acks: VecDeque<(Instant, Instant)> = VecDeque::new(); // (ack at, sent at)
        let mut losses: VecDeque<Instant> = VecDeque::new(); // declared lost at
        let (mut drops, mut delivered, mut late_delivered) = (0u64, 0u64, 0u64);
        let (mut tokens, mut drain) = (0.0f64, 0.0f64);
        let (mut srtt, mut min_rtt) = (Duration::from_millis(rtt_ms.max(1)), Duration::MAX);
        let steps = secs * 1000;
        for ms in 0..steps {
            let now = t0 + Duration::from_millis(ms);
            // Send, paced.
            let w = cc.window();
            tokens = (tokens + 1.25 * w as f64 / srtt.as_secs_f64() / 1000.0).min(w as f64);
            while inflight + PKT <= w && tokens >= PKT as f64 {
                tokens -= PKT as f64;
                inflight += PKT;
                if rand() < loss {
                    losses.push_back(now + Duration::from_millis(rtt_ms + 5));
                } else if queued + PKT > queue {
                    drops += 1;
                    losses.push_back(now + Duration::from_millis(rtt_ms + 5));
                } else {
                    queued += PKT;
                    queue_q.push_back(now);
                }
            }
            // The bottleneck drains.
            drain += rate / 1000.0;
            while drain >= PKT as f64 {
                let Some(sent) = queue_q.pop_front() else {
                    drain = 0.0;
                    break;
                };
                drain -= PKT as f64;
                queued -= PKT;
                acks.push_back((now + Duration::from_millis(rtt_ms), sent));
            }
            while acks.front().is_some_and(|(at, _)| *at <= now) {
                let (_, sent) = acks.pop_front().unwrap();
                inflight -= PKT;
                delivered += PKT;
                if ms >= steps / 2 {
                    late_delivered += PKT;
                }
                let sample = now - sent;
                min_rtt = min_rtt.min(sample);
                srtt = (srtt * 7 + sample) / 8;
                cc.acked(now, sent, PKT, false, srtt, min_rtt);
            }
            while losses.front().is_some_and(|at| *at <= now) {
                losses.pop_front();
                inflight -= PKT;
                cc.on_congestion_event(now, now, false, PKT);
            }
        }
        let _ = delivered;
        (
            late_delivered as f64 / (secs as f64 / 2.0),
            drops as f64 / (delivered / PKT) as f64,
        )
    }

    #[test]
    fn keeps_lossy_wan_and_thin_links_full_without_overflowing_their_queues() {
        // wan: 10 Mbit/s, 40 ms, 0.5 % loss, 100 ms of queue.
        let (got, drops) = simulate(1_250_000.0, 40, 125_000, 0.005, 30);
        assert!(got > 0.93 * 1_250_000.0, "wan: {got} B/s");
        assert!(drops < 0.01, "wan: {drops} drops per delivered");
        // thin: 2 Mbit/s, 120 ms, 1 %, 100 ms of queue.
        let (got, drops) = simulate(250_000.0, 120, 25_000, 0.01, 60);
        assert!(got > 0.93 * 250_000.0, "thin: {got} B/s");
        assert!(drops < 0.01, "thin: {drops}");
        // satellite: 1 Mbit/s, 600 ms, 1 %, 300 ms of queue.
        let (got, drops) = simulate(125_000.0, 600, 37_500, 0.01, 120);
        assert!(got > 0.9 * 125_000.0, "satellite: {got} B/s");
        assert!(drops < 0.01, "satellite: {drops}");
        // A 2 Mbit/s shaper alone, 300 ms of queue.
        let (got, drops) = simulate(250_000.0, 1, 75_000, 0.0, 30);
        assert!(got > 0.95 * 250_000.0, "tbf: {got} B/s");
        assert!(drops < 0.01, "tbf: {drops}");
    }

    #[test]
    fn random_loss_leaves_the_window_and_persistent_congestion_resets_it() {
        let t0 = Instant::now();
        let mut cc = Delivery::new(t0, 1200);
        let rtt = Duration::from_millis(40);
        // 1 MB/s delivered for a second, rounds of 40 ms.
        for r in 0..25u64 {
            let start = t0 + rtt * r as u32;
            for i in 0..33u64 {
                let at = start + Duration::from_micros(1200 * i);
                cc.acked(at + rtt, at, 1200, false, rtt, rtt);
            }
        }
        assert!(!cc.starting());
        let bw = cc.bandwidth();
        assert!((900_000..1_100_000).contains(&bw), "{bw}");
        let w = cc.window();
        let now = t0 + Duration::from_secs(2);
        cc.on_congestion_event(now, now, false, 1200);
        assert_eq!(cc.window(), w, "a loss alone changes nothing");
        cc.on_congestion_event(now, now, true, 1200);
        assert!(cc.window() <= 4 * 1200 + 1, "{}", cc.window());
        assert!(cc.starting());
    }

    #[test]
    fn a_window_learnt_on_a_fast_link_is_not_used_after_a_silence() {
        let t0 = Instant::now();
        let mut cc = Delivery::new(t0, 1200);
        let rtt = Duration::from_micros(200);
        // 100 MB/s for 50 ms: a big window.
        for i in 0..4000u64 {
            let at = t0 + Duration::from_micros(12 * i);
            cc.acked(at + rtt, at, 1200, false, rtt, rtt);
        }
        assert!(cc.window() > 512 << 10, "{}", cc.window());
        // Two seconds later, data again: start-up from the first window.
        let later = t0 + Duration::from_secs(2);
        cc.acked(
            later + Duration::from_millis(40),
            later,
            1200,
            false,
            rtt,
            rtt,
        );
        assert!(cc.starting());
        assert!(cc.window() < 32 * 1024, "{}", cc.window());
    }
}
