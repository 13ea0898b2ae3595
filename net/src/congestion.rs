//! The congestion controller a connection sends with, chosen per connection — and, on the
//! engine, changed once the peer has said which site it is.
//!
//! quinn builds a connection's controller when the connection is created, before the TLS
//! handshake names the peer. So every connection gets a [`Switchable`] controller: it runs
//! the default one and holds a [`Choice`] the engine sets after authentication (from the
//! site's settings, or later when an operator changes them); at the next congestion event
//! or acknowledgement the controller switches, starting the new one from the window the old
//! one had reached, so a switch neither floods the link nor starts from scratch.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use quinn::congestion::{
    BbrConfig, Controller, ControllerFactory, ControllerMetrics, CubicConfig, NewRenoConfig,
};
use quinn_proto::RttEstimator;
use seedcast_core::protocol::Congestion;

fn code(c: Congestion) -> u8 {
    match c {
        Congestion::Cubic => 1,
        Congestion::NewReno => 2,
        Congestion::Bbr => 3,
        Congestion::Delivery => 4,
    }
}

fn from_code(c: u8) -> Option<Congestion> {
    match c {
        1 => Some(Congestion::Cubic),
        2 => Some(Congestion::NewReno),
        3 => Some(Congestion::Bbr),
        4 => Some(Congestion::Delivery),
        _ => None,
    }
}

/// quinn's controller `c`, its first window `window` (bytes).
fn build(c: Congestion, window: u64, now: std::time::Instant, mtu: u16) -> Box<dyn Controller> {
    match c {
        Congestion::Cubic => {
            let mut f = CubicConfig::default();
            f.initial_window(window);
            Arc::new(f).build(now, mtu)
        }
        Congestion::NewReno => {
            let mut f = NewRenoConfig::default();
            f.initial_window(window);
            Arc::new(f).build(now, mtu)
        }
        Congestion::Bbr => {
            let mut f = BbrConfig::default();
            f.initial_window(window);
            Arc::new(f).build(now, mtu)
        }
        Congestion::Delivery => {
            let mut c = crate::delivery::Delivery::new(now, mtu);
            c.start_from(window);
            Box::new(c)
        }
    }
}

/// Which controller a connection should run; set from outside at any time.
#[derive(Debug, Clone, Default)]
pub struct Choice(Arc<AtomicU8>);

impl Choice {
    pub fn set(&self, c: Congestion) {
        self.0.store(code(c), Ordering::Relaxed);
    }

    pub fn get(&self) -> Option<Congestion> {
        from_code(self.0.load(Ordering::Relaxed))
    }
}

/// Builds one connection's [`Switchable`] controller, starting with `default`.
#[derive(Debug)]
pub struct SwitchableFactory {
    pub default: Congestion,
    pub choice: Choice,
}

impl ControllerFactory for SwitchableFactory {
    fn build(self: Arc<Self>, now: std::time::Instant, mtu: u16) -> Box<dyn Controller> {
        let active = self.choice.get().unwrap_or(self.default);
        let initial = Arc::new(CubicConfig::default())
            .build(now, mtu)
            .initial_window();
        Box::new(Switchable {
            choice: self.choice.clone(),
            active,
            inner: build(active, initial, now, mtu),
            mtu,
        })
    }
}

/// A controller that runs the one its [`Choice`] names.
pub struct Switchable {
    choice: Choice,
    active: Congestion,
    inner: Box<dyn Controller>,
    mtu: u16,
}

impl std::fmt::Debug for Switchable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Switchable")
            .field("active", &self.active)
            .field("window", &self.inner.window())
            .finish()
    }
}

impl Switchable {
    /// The controller running now.
    pub fn active(&self) -> Congestion {
        self.active
    }

    fn follow(&mut self, now: std::time::Instant) {
        if let Some(c) = self.choice.get()
            && c != self.active
        {
            let window = self.inner.window();
            self.inner = build(c, window, now, self.mtu);
            self.active = c;
        }
    }
}

impl Controller for Switchable {
    fn on_sent(&mut self, now: std::time::Instant, bytes: u64, last_packet_number: u64) {
        self.follow(now);
        self.inner.on_sent(now, bytes, last_packet_number)
    }

    fn on_ack(
        &mut self,
        now: std::time::Instant,
        sent: std::time::Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.inner.on_ack(now, sent, bytes, app_limited, rtt)
    }

    fn on_end_acks(
        &mut self,
        now: std::time::Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked)
    }

    fn on_congestion_event(
        &mut self,
        now: std::time::Instant,
        sent: std::time::Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes)
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = new_mtu;
        self.inner.on_mtu_update(new_mtu)
    }

    fn window(&self) -> u64 {
        self.inner.window()
    }

    fn metrics(&self) -> ControllerMetrics {
        self.inner.metrics()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Switchable {
            choice: self.choice.clone(),
            active: self.active,
            inner: self.inner.clone_box(),
            mtu: self.mtu,
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_switches_when_told_and_keeps_its_window() {
        let choice = Choice::default();
        let f = Arc::new(SwitchableFactory {
            default: Congestion::Cubic,
            choice: choice.clone(),
        });
        let now = std::time::Instant::now();
        let mut c = f.build(now, 1200);
        let w0 = c.window();
        let sw = |c: Box<dyn Controller>| {
            c.into_any()
                .downcast::<Switchable>()
                .expect("switchable")
                .active()
        };
        assert_eq!(sw(c.clone_box()), Congestion::Cubic);
        choice.set(Congestion::Bbr);
        // Nothing changes until the connection next sends.
        assert_eq!(sw(c.clone_box()), Congestion::Cubic);
        c.on_sent(now, 1200, 1);
        assert_eq!(sw(c.clone_box()), Congestion::Bbr);
        assert_eq!(
            c.window(),
            w0,
            "the new controller starts from the old window"
        );
        choice.set(Congestion::NewReno);
        c.on_sent(now, 1200, 2);
        assert_eq!(sw(c), Congestion::NewReno);
    }

    #[test]
    fn a_choice_made_before_the_connection_is_used_from_the_start() {
        let choice = Choice::default();
        choice.set(Congestion::NewReno);
        let f = Arc::new(SwitchableFactory {
            default: Congestion::Bbr,
            choice,
        });
        let c = f.build(std::time::Instant::now(), 1200);
        let s = c.into_any().downcast::<Switchable>().expect("switchable");
        assert_eq!(s.active(), Congestion::NewReno);
    }
}
