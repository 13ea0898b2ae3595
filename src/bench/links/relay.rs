//! The UDP impairment relay: what `netem` would do, in userspace (this kernel has no
//! `netem`). It sits between a site's agent and the engine, forwarding datagrams both ways
//! after a delay, dropping some (random loss), holding back a few (reordering), and
//! dropping everything while the link is cut ([`Relay::cut`]).
//!
//! It is bounded and self-stopping: at most [`MAX_CLIENTS`] agent addresses, at most
//! [`MAX_QUEUED_BYTES`] waiting in each direction (more is dropped, as a full queue would),
//! it stops when dropped or after its lifetime, and it only ever sends to the engine's
//! loopback address and to the agents that wrote to it from the harness's own namespace.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Agent addresses one relay serves (an agent that restarts comes from a new port).
pub const MAX_CLIENTS: usize = 16;
/// Bytes waiting out their delay, per direction, at most.
pub const MAX_QUEUED_BYTES: usize = 64 << 20;
/// Largest datagram forwarded.
const MAX_DATAGRAM: usize = 65_535;
/// Socket buffers asked for (the kernel caps them at `net.core.rmem_max`).
const BUFFER: usize = 4 << 20;
/// UDP and IPv4 headers: counted with every datagram, as the link carries them.
const HEADERS: u64 = 28;

/// What the relay does to every datagram.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Impairment {
    /// Added to each direction (half the round trip it adds).
    pub one_way_delay: Duration,
    /// Probability a datagram is dropped, each direction.
    pub loss: f64,
    /// Probability a datagram is held back by another half of the one-way delay (so it
    /// arrives after some that were sent after it).
    pub reorder: f64,
}

/// Datagrams and bytes (with UDP/IP headers) in one direction.
#[derive(Debug, Default)]
pub struct Flow {
    pub datagrams: AtomicU64,
    pub bytes: AtomicU64,
    /// Dropped: loss, the cut, or a full queue.
    pub dropped: AtomicU64,
}

impl Flow {
    fn count(&self, n: usize) {
        self.datagrams.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(n as u64 + HEADERS, Ordering::Relaxed);
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// What the relay saw.
#[derive(Debug, Default)]
pub struct Stats {
    /// Received from the engine (what the engine put into the link).
    pub from_engine: Flow,
    /// Received from the agents.
    pub from_agents: Flow,
}

#[derive(Debug)]
struct State {
    impair: Mutex<Impairment>,
    /// While `now < cut_until`, everything is dropped.
    cut_until: Mutex<Option<Instant>>,
    stats: Stats,
}

impl State {
    /// Drop this datagram?
    fn drops(&self) -> bool {
        if self.cut_until.lock().is_some_and(|t| Instant::now() < t) {
            return true;
        }
        let loss = self.impair.lock().loss;
        loss > 0.0 && rand::random::<f64>() < loss
    }

    /// When a datagram received now goes out.
    fn due(&self) -> Instant {
        let i = *self.impair.lock();
        let mut d = i.one_way_delay;
        if i.reorder > 0.0 && rand::random::<f64>() < i.reorder {
            d += i.one_way_delay / 2;
        }
        Instant::now() + d
    }
}

/// Where a queued datagram goes.
#[derive(Debug, Clone)]
enum To {
    Engine(Arc<UdpSocket>),
    Agent(SocketAddr),
}

/// A running relay; stops when dropped.
#[derive(Debug)]
pub struct Relay {
    /// The address agents dial (in the hub namespace).
    pub addr: SocketAddr,
    state: Arc<State>,
    tasks: JoinSet<()>,
}

impl Relay {
    /// Relay between `listen` (a socket opened where the agents can reach it) and the
    /// engine at `engine` (on this namespace's loopback), stopping after `lifetime`.
    pub fn start(
        listen: std::net::UdpSocket,
        engine: SocketAddr,
        impair: Impairment,
        lifetime: Duration,
    ) -> std::io::Result<Relay> {
        listen.set_nonblocking(true)?;
        // Large buffers (as far as the kernel allows): the relay must not be where an
        // unshaped link drops datagrams.
        big_buffers(&listen);
        let down = Arc::new(UdpSocket::from_std(listen)?);
        let addr = down.local_addr()?;
        let state = Arc::new(State {
            impair: Mutex::new(impair),
            cut_until: Mutex::new(None),
            stats: Stats::default(),
        });
        let mut tasks = JoinSet::new();
        let (to_engine, q_up) = mpsc::unbounded_channel();
        let (to_agents, q_down) = mpsc::unbounded_channel();
        tasks.spawn(deliver(q_up, down.clone()));
        tasks.spawn(deliver(q_down, down.clone()));
        let st = state.clone();
        tasks.spawn(async move {
            let run = from_agents(down, engine, st, to_engine, to_agents);
            let _ = tokio::time::timeout(lifetime, run).await;
        });
        Ok(Relay { addr, state, tasks })
    }

    pub fn stats(&self) -> &Stats {
        &self.state.stats
    }

    pub fn set(&self, impair: Impairment) {
        *self.state.impair.lock() = impair;
    }

    /// Cut the link for `d` from now: every datagram, both ways, is dropped.
    pub fn cut(&self, d: Duration) {
        *self.state.cut_until.lock() = Some(Instant::now() + d);
    }

    /// Is the link cut now?
    pub fn is_cut(&self) -> bool {
        self.state
            .cut_until
            .lock()
            .is_some_and(|t| Instant::now() < t)
    }

    /// Stop now (also on drop).
    pub fn stop(&mut self) {
        self.tasks.abort_all();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

/// Plain setsockopt: quinn's socket set-up would also turn on GRO, and a relay reading
/// coalesced datagrams as one would forward garbage.
fn big_buffers(s: &std::net::UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(s, sockopt::RcvBuf, &BUFFER);
    let _ = setsockopt(s, sockopt::SndBuf, &BUFFER);
}

type Queue = mpsc::UnboundedSender<(Instant, To, Vec<u8>)>;

/// Datagrams from agents: each agent address gets its own socket towards the engine (the
/// engine sees one peer per agent, as without the relay), whose replies come back here.
async fn from_agents(
    down: Arc<UdpSocket>,
    engine: SocketAddr,
    st: Arc<State>,
    to_engine: Queue,
    to_agents: Queue,
) {
    let mut ups: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut readers = JoinSet::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((n, from)) = down.recv_from(&mut buf).await else {
            continue;
        };
        st.stats.from_agents.count(n);
        let up = match ups.get(&from) {
            Some(u) => u.clone(),
            None if ups.len() >= MAX_CLIENTS => continue,
            None => {
                let Ok(u) = std::net::UdpSocket::bind("127.0.0.1:0") else {
                    continue;
                };
                big_buffers(&u);
                let Ok(u) = u
                    .set_nonblocking(true)
                    .and_then(|()| UdpSocket::from_std(u))
                else {
                    continue;
                };
                if u.connect(engine).await.is_err() {
                    continue;
                }
                let u = Arc::new(u);
                ups.insert(from, u.clone());
                readers.spawn(from_engine(u.clone(), from, st.clone(), to_agents.clone()));
                u
            }
        };
        if st.drops() {
            st.stats.from_agents.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let _ = to_engine.send((st.due(), To::Engine(up), buf[..n].to_vec()));
    }
}

/// Datagrams from the engine to one agent.
async fn from_engine(up: Arc<UdpSocket>, agent: SocketAddr, st: Arc<State>, to_agents: Queue) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok(n) = up.recv(&mut buf).await else {
            continue;
        };
        st.stats.from_engine.count(n);
        if st.drops() {
            st.stats.from_engine.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let _ = to_agents.send((st.due(), To::Agent(agent), buf[..n].to_vec()));
    }
}

/// Send queued datagrams when they are due, earliest first; beyond
/// [`MAX_QUEUED_BYTES`] waiting, new ones are dropped.
async fn deliver(mut q: mpsc::UnboundedReceiver<(Instant, To, Vec<u8>)>, down: Arc<UdpSocket>) {
    let mut heap: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut items: HashMap<u64, (To, Vec<u8>)> = HashMap::new();
    let (mut seq, mut queued) = (0u64, 0usize);
    loop {
        let next = heap.peek().map(|Reverse((t, _))| *t);
        tokio::select! {
            m = q.recv() => match m {
                Some((due, to, pkt)) => {
                    if queued + pkt.len() > MAX_QUEUED_BYTES {
                        continue;
                    }
                    queued += pkt.len();
                    heap.push(Reverse((due, seq)));
                    items.insert(seq, (to, pkt));
                    seq += 1;
                }
                None => return,
            },
            _ = tokio::time::sleep_until(next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))), if next.is_some() => {
                let now = Instant::now();
                while let Some(Reverse((t, id))) = heap.peek().copied() {
                    if t > now {
                        break;
                    }
                    heap.pop();
                    if let Some((to, pkt)) = items.remove(&id) {
                        queued -= pkt.len();
                        let _ = match to {
                            To::Engine(u) => u.send(&pkt).await,
                            To::Agent(a) => down.send_to(&pkt, a).await,
                        };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair(impair: Impairment) -> (Relay, UdpSocket, UdpSocket) {
        let engine = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let listen = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let relay = Relay::start(
            listen,
            engine.local_addr().unwrap(),
            impair,
            Duration::from_secs(30),
        )
        .unwrap();
        let agent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        agent.connect(relay.addr).await.unwrap();
        (relay, engine, agent)
    }

    #[tokio::test]
    async fn forwards_both_ways_after_the_delay() {
        let d = Duration::from_millis(60);
        let (relay, engine, agent) = pair(Impairment {
            one_way_delay: d,
            ..Default::default()
        })
        .await;
        let t = std::time::Instant::now();
        agent.send(b"hello").await.unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = engine.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert!(t.elapsed() >= d, "{:?}", t.elapsed());
        engine.send_to(b"back", from).await.unwrap();
        let n = agent.recv(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"back");
        assert!(t.elapsed() >= 2 * d, "{:?}", t.elapsed());
        assert_eq!(relay.stats().from_agents.bytes(), 5 + HEADERS);
        assert_eq!(relay.stats().from_engine.bytes(), 4 + HEADERS);
    }

    #[tokio::test]
    async fn loses_about_the_share_asked_and_drops_everything_while_cut() {
        let (relay, engine, agent) = pair(Impairment {
            loss: 0.2,
            ..Default::default()
        })
        .await;
        // Read while sending, so no socket buffer overflows and every datagram is counted.
        let reader = tokio::spawn(async move {
            let mut got = 0u64;
            let mut buf = [0u8; 8];
            while let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_millis(300), engine.recv_from(&mut buf)).await
            {
                got += 1;
            }
            (got, engine)
        });
        for i in 0..2000 {
            agent.send(b"x").await.unwrap();
            if i % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let (got, engine) = reader.await.unwrap();
        let dropped = relay.stats().from_agents.dropped();
        assert_eq!(
            relay.stats().from_agents.datagrams.load(Ordering::Relaxed),
            2000
        );
        assert!((300..500).contains(&dropped), "{dropped} of 2000 dropped");
        assert_eq!(got + dropped, 2000);
        let mut buf = [0u8; 8];

        relay.set(Impairment::default());
        relay.cut(Duration::from_millis(300));
        assert!(relay.is_cut());
        agent.send(b"lost").await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(100), engine.recv_from(&mut buf))
                .await
                .is_err()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        agent.send(b"back").await.unwrap();
        let (n, _) = engine.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"back");
    }
}
