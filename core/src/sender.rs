//! The engine's side of one deployment to one site, as a state machine without I/O.
//!
//! The agent's side is [`crate::transfer`]; this is its mirror, in the quinn-proto style: an
//! async driver (the engine's `distribute`, later a relay serving nearby sites from its
//! cache) feeds it what the agent says ([`Sender::handle_reply`]) and what the driver has
//! finished ([`Sender::handle_bases`], [`Sender::handle_sent`]), and does what
//! [`Sender::poll`] asks. The sender decides everything the site gets:
//!
//! 1. the manifest, whole or as a delta against the version the site holds
//!    ([`Action::Deploy`]);
//! 2. from the agent's `NeedFrom`: which chunks (only chunks of this manifest, each once),
//!    which of the versions it offers as delta bases may serve (only versions it is known
//!    to hold), and what sending them costs ([`Action::Needed`]);
//! 3. whether a delta-base index is worth building ([`Action::IndexBases`]), and then the
//!    work in order — batches of stored chunks or delta groups ([`Action::Send`]);
//! 4. the end: the site's `Published` or `Failed` ([`Action::Done`]).
//!
//! Replies about other transfers (an earlier deployment's late answer) and inventories are
//! ignored; a reply out of order, or naming a chunk the manifest does not, is a
//! [`Violation`] and the driver closes the connection. Nothing a site sends makes the sender
//! plan more work than the manifest's own chunks.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::id::{ChunkId, GlobalId};
use crate::manifest::Manifest;
use crate::protocol::{AgentMsg, HeldVersion};

/// What a site is known to hold, by image: the version and its manifest id (from the site's
/// inventory when it connects, then kept up to date as it publishes).
pub type Held = HashMap<GlobalId, (u32, [u8; 32])>;

/// How the work is cut. The defaults are what the engine uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendConfig {
    /// Stored chunks per work item: one read from the store, one run of frames on a data
    /// stream. 16: enough to amortise the read, small enough that streams share the work.
    pub read_batch: usize,
    /// Raw bytes one delta group covers at most. 2 MiB (about 32 chunks of 64 KiB): a
    /// larger group finds more matches in its base but is encoded on one core.
    pub group_raw: u64,
    /// Chunks one delta group covers at most. 32.
    pub group_chunks: usize,
}

impl Default for SendConfig {
    fn default() -> Self {
        SendConfig {
            read_batch: 16,
            group_raw: 2 << 20,
            group_chunks: 32,
        }
    }
}

/// One unit of a data stream's work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Work {
    /// Chunks sent in their stored form.
    Stored(Vec<ChunkId>),
    /// Chunks sent as one delta group, each with the file offset of its first use (where
    /// the driver looks for resembling base chunks).
    Group(Vec<(ChunkId, u64)>),
}

/// What the driver must do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send the manifest: whole, or (when `base` is given) as a delta against the manifest of
    /// the version the site holds, whose id must be the one given. A driver that cannot make
    /// the delta sends the manifest whole.
    Deploy {
        base: Option<(HeldVersion, [u8; 32])>,
    },
    /// The site asked for `chunks` chunks costing `bytes` stored bytes (for status).
    Needed { chunks: usize, bytes: u64 },
    /// Index these versions' chunks (at the site: all but `unavailable`) as delta bases,
    /// then call [`Sender::handle_bases`].
    IndexBases {
        bases_from: Vec<HeldVersion>,
        unavailable: Vec<ChunkId>,
    },
    /// Send this work on data streams, items in this order; call [`Sender::handle_sent`]
    /// when every item is sent.
    Send { work: Vec<Work>, as_deltas: bool },
    /// The deployment is over.
    Done(Outcome),
}

/// How a deployment ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Published {
        local_id: String,
        /// The version and manifest id the site now holds.
        version: u32,
        manifest_id: [u8; 32],
    },
    Failed {
        error: String,
    },
}

/// A reply the sender accepted or chose to ignore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handled {
    Accepted,
    /// About another transfer (a late answer to an earlier deployment).
    OtherTransfer(u64),
    /// An inventory (only valid as a session's first message; the session handles it).
    Inventory,
    /// A second final answer after the deployment ended.
    AfterDone,
}

/// The agent broke the protocol; the connection should be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("transfer {transfer}: expected {expected}, got {got}")]
    OutOfOrder {
        transfer: u64,
        expected: &'static str,
        got: &'static str,
    },
    #[error("transfer {transfer}: asked for chunk {id}, which the manifest does not name")]
    UnknownChunk { transfer: u64, id: ChunkId },
    #[error("{0} does not belong on the control stream")]
    WrongStream(&'static str),
    #[error("transfer {transfer}: {what} lists {count} entries, more than {max}")]
    TooMany {
        transfer: u64,
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error("transfer {transfer}: a local id of {len} bytes (at most {max})")]
    LocalIdTooLong {
        transfer: u64,
        len: usize,
        max: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("agent broke the protocol: {0}")]
    Protocol(#[from] Violation),
    /// The engine's own store lacks a chunk of a committed manifest (damage or loss).
    #[error("chunk {0} of the manifest is not in the engine's store")]
    NotStored(ChunkId),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// The manifest is not sent yet.
    Start,
    AwaitNeed,
    AwaitBases(Vec<ChunkId>),
    Sending,
    AwaitResult,
    Done,
}

impl State {
    fn expects(&self) -> &'static str {
        match self {
            State::Start => "nothing before the manifest",
            State::AwaitNeed => "NeedFrom",
            State::AwaitBases(_) | State::Sending | State::AwaitResult => "Published or Failed",
            State::Done => "nothing after the end",
        }
    }
}

fn name(m: &AgentMsg) -> &'static str {
    match m {
        AgentMsg::Inventory { .. } => "Inventory",
        AgentMsg::Need { .. } => "Need",
        AgentMsg::Published { .. } => "Published",
        AgentMsg::Failed { .. } => "Failed",
        AgentMsg::NeedFrom { .. } => "NeedFrom",
        AgentMsg::Renew { .. } => "Renew",
        AgentMsg::Drifted { .. } => "Drifted",
    }
}

/// The engine's side of one deployment.
#[derive(Debug)]
pub struct Sender {
    transfer: u64,
    global_id: GlobalId,
    version: u32,
    manifest_id: [u8; 32],
    /// Every distinct chunk of the manifest: length and offset of its first use.
    chunks: HashMap<ChunkId, (u32, u64)>,
    held: Held,
    cfg: SendConfig,
    state: State,
    actions: VecDeque<Action>,
}

impl Sender {
    /// A deployment of `manifest` (whose id is `manifest_id`) as transfer `transfer` to a
    /// site holding `held`.
    pub fn new(
        transfer: u64,
        manifest: &Manifest,
        manifest_id: [u8; 32],
        held: &Held,
        cfg: SendConfig,
    ) -> Self {
        Sender {
            transfer,
            global_id: manifest.global_id,
            version: manifest.version,
            manifest_id,
            chunks: manifest.first_uses(),
            held: held.clone(),
            cfg,
            state: State::Start,
            actions: VecDeque::new(),
        }
    }

    pub fn transfer(&self) -> u64 {
        self.transfer
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The next thing to do, if any.
    pub fn poll(&mut self) -> Option<Action> {
        if self.state == State::Start {
            self.state = State::AwaitNeed;
            let base = self
                .held
                .get(&self.global_id)
                .filter(|(v, _)| *v != self.version)
                .map(|(v, mid)| {
                    let hv = HeldVersion {
                        global_id: self.global_id,
                        version: *v,
                    };
                    (hv, *mid)
                });
            return Some(Action::Deploy { base });
        }
        self.actions.pop_front()
    }

    /// What the agent said. `stored_len` is the engine's index: the stored bytes of a chunk
    /// it holds.
    pub fn handle_reply(
        &mut self,
        msg: AgentMsg,
        stored_len: impl Fn(&ChunkId) -> Option<u32>,
    ) -> Result<Handled, SendError> {
        let transfer = match &msg {
            AgentMsg::Inventory { .. } => return Ok(Handled::Inventory),
            AgentMsg::Renew { .. } => return Err(Violation::WrongStream("Renew").into()),
            // The session handles drift reports; one reaching a deployment is misrouted.
            AgentMsg::Drifted { .. } => return Err(Violation::WrongStream("Drifted").into()),
            AgentMsg::Need { transfer, .. }
            | AgentMsg::NeedFrom { transfer, .. }
            | AgentMsg::Published { transfer, .. }
            | AgentMsg::Failed { transfer, .. } => *transfer,
        };
        if transfer != self.transfer {
            return Ok(Handled::OtherTransfer(transfer));
        }
        let out_of_order = |state: &State, m: &AgentMsg| Violation::OutOfOrder {
            transfer,
            expected: state.expects(),
            got: name(m),
        };
        match (&self.state, msg) {
            (State::Done, AgentMsg::Published { .. } | AgentMsg::Failed { .. }) => {
                Ok(Handled::AfterDone)
            }
            (_, AgentMsg::Failed { mut error, .. }) if self.state != State::Start => {
                if crate::protocol::cut_text(&mut error, crate::protocol::MAX_ERROR_TEXT) {
                    error.push('…');
                }
                self.finish(Outcome::Failed { error });
                Ok(Handled::Accepted)
            }
            (State::AwaitNeed, AgentMsg::Need { chunks, .. }) => {
                self.on_need(chunks, Vec::new(), Vec::new(), stored_len)
            }
            (
                State::AwaitNeed,
                AgentMsg::NeedFrom {
                    chunks,
                    bases_from,
                    unavailable,
                    ..
                },
            ) => self.on_need(chunks, bases_from, unavailable, stored_len),
            (
                State::AwaitBases(_) | State::Sending | State::AwaitResult,
                AgentMsg::Published { local_id, .. },
            ) => {
                if local_id.len() > crate::protocol::MAX_LOCAL_ID {
                    return Err(Violation::LocalIdTooLong {
                        transfer,
                        len: local_id.len(),
                        max: crate::protocol::MAX_LOCAL_ID,
                    }
                    .into());
                }
                self.finish(Outcome::Published {
                    local_id,
                    version: self.version,
                    manifest_id: self.manifest_id,
                });
                Ok(Handled::Accepted)
            }
            (state, m) => Err(out_of_order(state, &m).into()),
        }
    }

    /// The delta-base index asked for by [`Action::IndexBases`] is ready; `usable` is false
    /// when it holds no chunk (then stored chunks are sent).
    pub fn handle_bases(&mut self, usable: bool) {
        let State::AwaitBases(need) = std::mem::replace(&mut self.state, State::Sending) else {
            return;
        };
        let work = if usable {
            plan_groups(&need, &self.chunks, &self.cfg)
                .into_iter()
                .map(Work::Group)
                .collect()
        } else {
            self.stored_work(&need)
        };
        self.actions.push_back(Action::Send {
            work,
            as_deltas: usable,
        });
    }

    /// Every item of the [`Action::Send`] work has been sent.
    pub fn handle_sent(&mut self) {
        if self.state == State::Sending {
            self.state = State::AwaitResult;
        }
    }

    fn finish(&mut self, outcome: Outcome) {
        self.state = State::Done;
        self.actions.clear();
        self.actions.push_back(Action::Done(outcome));
    }

    fn stored_work(&self, need: &[ChunkId]) -> Vec<Work> {
        need.chunks(self.cfg.read_batch.max(1))
            .map(|c| Work::Stored(c.to_vec()))
            .collect()
    }

    fn on_need(
        &mut self,
        chunks: Vec<ChunkId>,
        bases_from: Vec<HeldVersion>,
        mut unavailable: Vec<ChunkId>,
        stored_len: impl Fn(&ChunkId) -> Option<u32>,
    ) -> Result<Handled, SendError> {
        // Only chunks of this manifest, each once, in the order asked: the list can be no
        // longer than the manifest's own chunk list, whatever the site sends (one chunk
        // asked two million times is refused, not looked up two million times).
        let too_many = |what, count, max| Violation::TooMany {
            transfer: self.transfer,
            what,
            count,
            max,
        };
        if chunks.len() > self.chunks.len() {
            return Err(too_many("Need", chunks.len(), self.chunks.len()).into());
        }
        if bases_from.len() > self.held.len() {
            return Err(too_many("bases_from", bases_from.len(), self.held.len()).into());
        }
        let mut seen = HashSet::with_capacity(chunks.len().min(self.chunks.len()));
        let mut need = Vec::new();
        let mut bytes = 0u64;
        for id in chunks {
            if !self.chunks.contains_key(&id) {
                return Err(Violation::UnknownChunk {
                    transfer: self.transfer,
                    id,
                }
                .into());
            }
            if seen.insert(id) {
                bytes += stored_len(&id).ok_or(SendError::NotStored(id))? as u64;
                need.push(id);
            }
        }
        self.actions.push_back(Action::Needed {
            chunks: need.len(),
            bytes,
        });
        // Bases only from versions the site is known to hold, each once.
        let mut bases: Vec<HeldVersion> = Vec::new();
        for b in bases_from {
            let holds = self.held.get(&b.global_id).map(|(v, _)| *v) == Some(b.version);
            if holds && !bases.contains(&b) {
                bases.push(b);
            }
        }
        if need.is_empty() {
            self.state = State::AwaitResult;
        } else if bases.is_empty() {
            self.state = State::Sending;
            let work = self.stored_work(&need);
            self.actions.push_back(Action::Send {
                work,
                as_deltas: false,
            });
        } else {
            unavailable.sort_unstable();
            unavailable.dedup();
            self.state = State::AwaitBases(need);
            self.actions.push_back(Action::IndexBases {
                bases_from: bases,
                unavailable,
            });
        }
        Ok(Handled::Accepted)
    }
}

/// Split the needed chunks (in the order asked) into delta groups of at most
/// `cfg.group_raw` raw bytes and `cfg.group_chunks` chunks, each chunk with the offset of
/// its first use. Chunks the manifest does not name are left out.
pub fn plan_groups(
    need: &[ChunkId],
    chunks: &HashMap<ChunkId, (u32, u64)>,
    cfg: &SendConfig,
) -> Vec<Vec<(ChunkId, u64)>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut raw = 0u64;
    for id in need {
        let Some(&(len, offset)) = chunks.get(id) else {
            continue;
        };
        let len = len as u64;
        if !cur.is_empty() && (raw + len > cfg.group_raw || cur.len() >= cfg.group_chunks) {
            out.push(std::mem::take(&mut cur));
            raw = 0;
        }
        cur.push((*id, offset));
        raw += len;
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunker::{ChunkerConfig, chunk_all};
    use crate::manifest::{FileEntry, MANIFEST_FORMAT, RecipeBuilder};
    use crate::testutil::{noise, small};

    const G: GlobalId = GlobalId([4; 12]);

    fn manifest(version: u32) -> Manifest {
        let mut rb = RecipeBuilder::new();
        let mut data = noise(7, 400_000);
        data[100_000..200_000].fill(0);
        for p in chunk_all(&data, small()).unwrap() {
            rb.push(p);
        }
        Manifest {
            format: MANIFEST_FORMAT,
            global_id: G,
            version,
            parent: (version > 1).then(|| version - 1),
            name: "t".into(),
            chunking: small(),
            files: vec![FileEntry {
                path: "disk.raw".into(),
                mode: 0o644,
                recipe: rb.finish(),
                format: crate::manifest::FileFormat::Raw,
            }],
        }
    }

    fn ids(m: &Manifest) -> Vec<ChunkId> {
        m.files[0].recipe.chunks_at().map(|(_, id, _)| id).collect()
    }

    fn stored(_: &ChunkId) -> Option<u32> {
        Some(100)
    }

    fn need_from(transfer: u64, chunks: Vec<ChunkId>, bases: Vec<HeldVersion>) -> AgentMsg {
        AgentMsg::NeedFrom {
            transfer,
            chunks,
            bases_from: bases,
            unavailable: vec![],
        }
    }

    fn published(transfer: u64) -> AgentMsg {
        AgentMsg::Published {
            transfer,
            local_id: "L".into(),
            bytes_received: 0,
        }
    }

    fn drain(s: &mut Sender) -> Vec<Action> {
        std::iter::from_fn(|| s.poll()).collect()
    }

    fn fresh(version: u32, held: &Held) -> (Manifest, Sender) {
        let m = manifest(version);
        let s = Sender::new(7, &m, [version as u8; 32], held, SendConfig::default());
        (m, s)
    }

    /// What an enrolled but hostile agent sends is bounded by the manifest, not by it.
    #[test]
    fn a_hostile_agent_cannot_inflate_the_work_or_the_catalog() {
        // One chunk asked two million times: refused before any lookup.
        let (m, mut s) = fresh(1, &Held::new());
        drain(&mut s);
        let id = ids(&m)[0];
        let e = s
            .handle_reply(need_from(7, vec![id; 2_000_000], vec![]), stored)
            .unwrap_err();
        assert!(matches!(
            e,
            SendError::Protocol(Violation::TooMany { what: "Need", .. })
        ));
        // Asking for every chunk twice is also more than the manifest names.
        let (m, mut s) = fresh(1, &Held::new());
        drain(&mut s);
        let mut twice = ids(&m);
        twice.extend(ids(&m));
        assert!(s.handle_reply(need_from(7, twice, vec![]), stored).is_err());
        // Bases from more versions than the site holds.
        let held: Held = [(G, (1, [1; 32]))].into();
        let (m, mut s) = fresh(2, &held);
        drain(&mut s);
        let hv = HeldVersion {
            global_id: G,
            version: 1,
        };
        let e = s
            .handle_reply(need_from(7, ids(&m), vec![hv, hv]), stored)
            .unwrap_err();
        assert!(matches!(
            e,
            SendError::Protocol(Violation::TooMany {
                what: "bases_from",
                ..
            })
        ));
        // A local id of a megabyte is a violation; an error of a megabyte is cut.
        let (m, mut s) = fresh(1, &Held::new());
        drain(&mut s);
        s.handle_reply(need_from(7, ids(&m), vec![]), stored)
            .unwrap();
        drain(&mut s);
        s.handle_sent();
        let long = AgentMsg::Published {
            transfer: 7,
            local_id: "x".repeat(1 << 20),
            bytes_received: 0,
        };
        assert!(matches!(
            s.handle_reply(long, stored),
            Err(SendError::Protocol(Violation::LocalIdTooLong { .. }))
        ));
        let failed = AgentMsg::Failed {
            transfer: 7,
            error: "é".repeat(1 << 20),
        };
        s.handle_reply(failed, stored).unwrap();
        let Some(Action::Done(Outcome::Failed { error })) = drain(&mut s).pop() else {
            panic!("not failed")
        };
        assert!(
            error.len() <= crate::protocol::MAX_ERROR_TEXT + 3,
            "{}",
            error.len()
        );
    }

    #[test]
    fn a_new_site_gets_the_whole_manifest_then_stored_batches_in_the_order_asked() {
        let (m, mut s) = fresh(1, &Held::new());
        assert_eq!(drain(&mut s), vec![Action::Deploy { base: None }]);
        let mut need = ids(&m);
        need.reverse();
        assert!(need.len() > 16);
        s.handle_reply(need_from(7, need.clone(), vec![]), stored)
            .unwrap();
        let acts = drain(&mut s);
        assert_eq!(
            acts[0],
            Action::Needed {
                chunks: need.len(),
                bytes: 100 * need.len() as u64
            }
        );
        let Action::Send { work, as_deltas } = &acts[1] else {
            panic!("{acts:?}")
        };
        assert!(!as_deltas);
        let flat: Vec<ChunkId> = work
            .iter()
            .flat_map(|w| match w {
                Work::Stored(v) => v.clone(),
                Work::Group(_) => panic!("no groups for a new site"),
            })
            .collect();
        assert_eq!(flat, need, "every chunk once, in the order asked");
        assert!(
            work.iter()
                .all(|w| matches!(w, Work::Stored(v) if v.len() <= 16))
        );
        s.handle_sent();
        assert_eq!(drain(&mut s), vec![]);
        s.handle_reply(published(7), stored).unwrap();
        assert_eq!(
            drain(&mut s),
            vec![Action::Done(Outcome::Published {
                local_id: "L".into(),
                version: 1,
                manifest_id: [1; 32]
            })]
        );
        assert!(s.is_done());
        // A repeated final answer changes nothing.
        assert_eq!(
            s.handle_reply(published(7), stored).unwrap(),
            Handled::AfterDone
        );
        assert_eq!(drain(&mut s), vec![]);
    }

    #[test]
    fn a_site_holding_an_earlier_version_gets_a_manifest_delta_and_delta_groups() {
        let held: Held = [(G, (1, [1; 32]))].into();
        let (m, mut s) = fresh(2, &held);
        let base = HeldVersion {
            global_id: G,
            version: 1,
        };
        assert_eq!(
            drain(&mut s),
            vec![Action::Deploy {
                base: Some((base, [1; 32]))
            }]
        );
        let need = ids(&m);
        let msg = AgentMsg::NeedFrom {
            transfer: 7,
            chunks: need.clone(),
            bases_from: vec![base],
            unavailable: vec![need[0], need[0]],
        };
        s.handle_reply(msg, stored).unwrap();
        let acts = drain(&mut s);
        assert_eq!(
            acts[1],
            Action::IndexBases {
                bases_from: vec![base],
                unavailable: vec![need[0]]
            }
        );
        s.handle_bases(true);
        let Some(Action::Send { work, as_deltas }) = s.poll() else {
            panic!()
        };
        assert!(as_deltas);
        let first = m.first_uses();
        for w in &work {
            let Work::Group(g) = w else { panic!() };
            let raw: u64 = g.iter().map(|(id, _)| first[id].0 as u64).sum();
            assert!(g.len() <= 32 && (raw <= 2 << 20 || g.len() == 1));
            for (id, off) in g {
                assert_eq!(*off, first[id].1, "offset of first use");
            }
        }
        let n: usize = work
            .iter()
            .map(|w| match w {
                Work::Group(g) => g.len(),
                Work::Stored(_) => 0,
            })
            .sum();
        assert_eq!(n, need.len());
    }

    #[test]
    fn an_empty_base_index_falls_back_to_stored_chunks() {
        let held: Held = [(G, (1, [1; 32]))].into();
        let (m, mut s) = fresh(2, &held);
        drain(&mut s);
        let base = HeldVersion {
            global_id: G,
            version: 1,
        };
        s.handle_reply(need_from(7, ids(&m), vec![base]), stored)
            .unwrap();
        drain(&mut s);
        s.handle_bases(false);
        assert!(matches!(
            s.poll(),
            Some(Action::Send {
                as_deltas: false,
                ..
            })
        ));
    }

    #[test]
    fn nothing_needed_means_nothing_sent() {
        let (_, mut s) = fresh(1, &Held::new());
        drain(&mut s);
        s.handle_reply(need_from(7, vec![], vec![]), stored)
            .unwrap();
        assert_eq!(
            drain(&mut s),
            vec![Action::Needed {
                chunks: 0,
                bytes: 0
            }]
        );
        s.handle_reply(published(7), stored).unwrap();
        assert!(matches!(drain(&mut s)[..], [Action::Done(_)]));
    }

    #[test]
    fn replies_for_other_transfers_and_inventories_are_ignored_in_every_state() {
        let (m, mut s) = fresh(1, &Held::new());
        let stray = || published(6);
        let inv = || AgentMsg::Inventory { images: vec![] };
        assert_eq!(
            s.handle_reply(stray(), stored).unwrap(),
            Handled::OtherTransfer(6)
        );
        drain(&mut s);
        assert_eq!(s.handle_reply(inv(), stored).unwrap(), Handled::Inventory);
        assert_eq!(
            s.handle_reply(need_from(8, ids(&m), vec![]), stored)
                .unwrap(),
            Handled::OtherTransfer(8)
        );
        assert_eq!(drain(&mut s), vec![], "ignored replies plan nothing");
        s.handle_reply(need_from(7, ids(&m), vec![]), stored)
            .unwrap();
        drain(&mut s);
        assert_eq!(
            s.handle_reply(stray(), stored).unwrap(),
            Handled::OtherTransfer(6)
        );
        s.handle_sent();
        assert_eq!(s.handle_reply(inv(), stored).unwrap(), Handled::Inventory);
        assert!(!s.is_done());
    }

    #[test]
    fn out_of_order_replies_are_violations() {
        // Published before saying what it needs.
        let (m, mut s) = fresh(1, &Held::new());
        drain(&mut s);
        let e = s.handle_reply(published(7), stored).unwrap_err();
        assert!(
            matches!(
                e,
                SendError::Protocol(Violation::OutOfOrder {
                    expected: "NeedFrom",
                    got: "Published",
                    ..
                })
            ),
            "{e}"
        );
        // Anything about the transfer before the manifest went out.
        let (m2, mut s2) = fresh(1, &Held::new());
        assert!(
            s2.handle_reply(need_from(7, ids(&m2), vec![]), stored)
                .is_err()
        );
        assert!(
            s2.handle_reply(
                AgentMsg::Failed {
                    transfer: 7,
                    error: "x".into()
                },
                stored
            )
            .is_err()
        );
        // A second NeedFrom.
        let (_, mut s3) = fresh(1, &Held::new());
        drain(&mut s3);
        s3.handle_reply(need_from(7, ids(&m), vec![]), stored)
            .unwrap();
        let e = s3
            .handle_reply(need_from(7, ids(&m), vec![]), stored)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("expected Published or Failed, got NeedFrom"),
            "{e}"
        );
    }

    #[test]
    fn hostile_need_lists_cannot_make_more_work_than_the_manifest() {
        let (m, mut s) = fresh(1, &Held::new());
        drain(&mut s);
        let one = ids(&m)[3];
        // One chunk asked for as many times as the manifest has chunks: sent once.
        let msg = need_from(7, vec![one; ids(&m).len()], vec![]);
        s.handle_reply(msg, stored).unwrap();
        let acts = drain(&mut s);
        assert_eq!(
            acts[0],
            Action::Needed {
                chunks: 1,
                bytes: 100
            }
        );
        assert_eq!(
            acts[1],
            Action::Send {
                work: vec![Work::Stored(vec![one])],
                as_deltas: false
            }
        );
        // A chunk the manifest does not name.
        let (m, mut s) = fresh(1, &Held::new());
        drain(&mut s);
        let mut need = ids(&m);
        need[0] = ChunkId([0xee; 32]);
        let e = s
            .handle_reply(need_from(7, need, vec![]), stored)
            .unwrap_err();
        assert!(
            matches!(e, SendError::Protocol(Violation::UnknownChunk { .. })),
            "{e}"
        );
        assert!(e.to_string().contains("which the manifest does not name"));
    }

    #[test]
    fn bases_are_taken_only_from_versions_the_site_holds() {
        let held: Held = [(G, (1, [1; 32]))].into();
        // A version it does not hold, and an image it was never sent.
        for claimed in [
            HeldVersion {
                global_id: G,
                version: 5,
            },
            HeldVersion {
                global_id: GlobalId([9; 12]),
                version: 1,
            },
        ] {
            let (m, mut s) = fresh(2, &held);
            drain(&mut s);
            s.handle_reply(need_from(7, ids(&m), vec![claimed]), stored)
                .unwrap();
            let acts = drain(&mut s);
            assert!(
                matches!(
                    acts[1],
                    Action::Send {
                        as_deltas: false,
                        ..
                    }
                ),
                "{acts:?}"
            );
        }
    }

    #[test]
    fn a_failure_at_any_point_ends_the_deployment_and_cancels_the_work() {
        let (m, mut s) = fresh(1, &Held::new());
        drain(&mut s);
        let failed = || AgentMsg::Failed {
            transfer: 7,
            error: "disk full".into(),
        };
        s.handle_reply(failed(), stored).unwrap();
        assert_eq!(
            drain(&mut s),
            vec![Action::Done(Outcome::Failed {
                error: "disk full".into()
            })]
        );
        // While sending: the queued work is dropped, the driver stops its streams.
        let (_, mut s) = fresh(1, &Held::new());
        drain(&mut s);
        s.handle_reply(need_from(7, ids(&m), vec![]), stored)
            .unwrap();
        s.handle_reply(failed(), stored).unwrap();
        assert!(matches!(
            drain(&mut s)[..],
            [Action::Done(Outcome::Failed { .. })]
        ));
        // Published before the data was all sent (the agent had what it needed).
        let (_, mut s) = fresh(1, &Held::new());
        drain(&mut s);
        s.handle_reply(need_from(7, ids(&m), vec![]), stored)
            .unwrap();
        drain(&mut s);
        s.handle_reply(published(7), stored).unwrap();
        assert!(matches!(
            drain(&mut s)[..],
            [Action::Done(Outcome::Published { .. })]
        ));
        s.handle_sent();
        assert!(s.is_done());
    }

    #[test]
    fn a_chunk_missing_from_the_engine_store_is_an_engine_error_not_a_violation() {
        let (m, mut s) = fresh(1, &Held::new());
        drain(&mut s);
        let gone = ids(&m)[0];
        let e = s
            .handle_reply(need_from(7, ids(&m), vec![]), |id| {
                (*id != gone).then_some(10)
            })
            .unwrap_err();
        assert_eq!(e, SendError::NotStored(gone));
    }

    #[test]
    fn groups_respect_both_limits_and_keep_the_order() {
        let cfg = SendConfig {
            group_raw: 1000,
            group_chunks: 3,
            ..SendConfig::default()
        };
        let ids: Vec<ChunkId> = (0..10u8).map(|i| ChunkId([i; 32])).collect();
        let lens = [400u32, 400, 400, 100, 100, 100, 100, 2000, 10, 10];
        let chunks: HashMap<ChunkId, (u32, u64)> = ids
            .iter()
            .zip(lens)
            .enumerate()
            .map(|(i, (id, l))| (*id, (l, i as u64 * 7)))
            .collect();
        let mut need = ids.clone();
        need.push(ChunkId([0xff; 32])); // not in the manifest: left out
        let g = plan_groups(&need, &chunks, &cfg);
        let shape: Vec<Vec<u8>> = g
            .iter()
            .map(|grp| grp.iter().map(|(id, _)| id.0[0]).collect())
            .collect();
        // 400+400 (a third would pass 1000), 400+100+100, 100+100 then 2000 alone, 10+10.
        assert_eq!(
            shape,
            vec![vec![0, 1], vec![2, 3, 4], vec![5, 6], vec![7], vec![8, 9]]
        );
        assert_eq!(g[1][0], (ids[2], 14));
        assert!(plan_groups(&[], &chunks, &cfg).is_empty());
        let _ = ChunkerConfig::default();
    }

    #[derive(Debug, Clone)]
    enum Step {
        Reply(AgentMsgKind, bool),
        Bases(bool),
        Sent,
        Poll,
    }

    #[derive(Debug, Clone)]
    enum AgentMsgKind {
        /// Chunks by index into the manifest's (wrapping), some foreign, some repeated.
        NeedFrom(Vec<u16>, u8, Vec<u32>),
        Need(Vec<u16>),
        Published(usize),
        Failed(usize),
        Inventory,
        Renew,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        let ids = || proptest::collection::vec(any::<u16>(), 0..200);
        let kind = prop_oneof![
            4 => (ids(), any::<u8>(), proptest::collection::vec(any::<u32>(), 0..4))
                .prop_map(|(c, f, b)| AgentMsgKind::NeedFrom(c, f, b)),
            1 => ids().prop_map(AgentMsgKind::Need),
            2 => (0usize..3000).prop_map(AgentMsgKind::Published),
            1 => (0usize..10_000).prop_map(AgentMsgKind::Failed),
            1 => Just(AgentMsgKind::Inventory),
            1 => Just(AgentMsgKind::Renew),
        ];
        prop_oneof![
            4 => (kind, any::<bool>()).prop_map(|(k, t)| Step::Reply(k, t)),
            1 => any::<bool>().prop_map(Step::Bases),
            1 => Just(Step::Sent),
            3 => Just(Step::Poll),
        ]
    }

    fn message(k: &AgentMsgKind, transfer: u64, known: &[ChunkId]) -> AgentMsg {
        let pick = |v: &[u16]| -> Vec<ChunkId> {
            v.iter()
                .map(|i| match i % 5 {
                    // One in five is a chunk the manifest does not name.
                    0 => ChunkId::of(&i.to_le_bytes()),
                    _ => known[*i as usize % known.len()],
                })
                .collect()
        };
        match k {
            AgentMsgKind::NeedFrom(c, foreign, bases) => AgentMsg::NeedFrom {
                transfer,
                chunks: pick(c),
                bases_from: bases
                    .iter()
                    .map(|v| HeldVersion {
                        global_id: if foreign % 2 == 0 {
                            G
                        } else {
                            GlobalId([9; 12])
                        },
                        version: *v % 4,
                    })
                    .collect(),
                unavailable: pick(&c[..c.len().min(3)]),
            },
            AgentMsgKind::Need(c) => AgentMsg::Need {
                transfer,
                chunks: pick(c),
            },
            AgentMsgKind::Published(n) => AgentMsg::Published {
                transfer,
                local_id: "x".repeat(*n),
                bytes_received: 0,
            },
            AgentMsgKind::Failed(n) => AgentMsg::Failed {
                transfer,
                error: "é".repeat(*n),
            },
            AgentMsgKind::Inventory => AgentMsg::Inventory { images: vec![] },
            AgentMsgKind::Renew => AgentMsg::Renew { csr_der: vec![] },
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]
        /// Random agents against the sender: any order, duplicates, other transfers, chunks
        /// the manifest does not name, oversized strings. The sender never panics, stops at
        /// the first violation, never plans more work than the manifest has distinct chunks
        /// (however often they are asked for), keeps error text bounded, and plans nothing
        /// after the end.
        #[test]
        fn random_agents_never_make_the_sender_panic_or_overwork(
            steps in proptest::collection::vec(step(), 1..40),
            held_version in proptest::option::of(1u32..4),
        ) {
            let mut held = Held::new();
            if let Some(v) = held_version {
                held.insert(G, (v, [v as u8; 32]));
            }
            let (m, mut s) = fresh(3, &held);
            let known = ids(&m);
            let distinct = m.first_uses().len();
            let mut planned = 0usize;
            let mut done = false;
            for st in steps {
                match st {
                    Step::Reply(k, ours) => {
                        let t = if ours { 7 } else { 8 };
                        if s.handle_reply(message(&k, t, &known), stored).is_err() {
                            break;
                        }
                    }
                    Step::Bases(usable) => s.handle_bases(usable),
                    Step::Sent => s.handle_sent(),
                    Step::Poll => {}
                }
                for a in drain(&mut s) {
                    match a {
                        Action::Send { work, .. } => {
                            proptest::prop_assert!(!done, "work planned after the end");
                            planned += work
                                .iter()
                                .map(|w| match w {
                                    Work::Stored(v) => v.len(),
                                    Work::Group(v) => v.len(),
                                })
                                .sum::<usize>();
                        }
                        Action::Needed { chunks, .. } => {
                            proptest::prop_assert!(chunks <= distinct)
                        }
                        Action::IndexBases { bases_from, .. } => {
                            for b in bases_from {
                                proptest::prop_assert!(
                                    held.get(&b.global_id).is_some_and(|(v, _)| *v == b.version),
                                    "a base the site does not hold: {b:?}"
                                );
                            }
                        }
                        Action::Done(Outcome::Failed { error }) => {
                            proptest::prop_assert!(error.len() <= crate::protocol::MAX_ERROR_TEXT + 4);
                            done = true;
                        }
                        Action::Done(_) => done = true,
                        Action::Deploy { .. } => {}
                    }
                }
                proptest::prop_assert!(planned <= distinct, "{planned} > {distinct}");
            }
        }
    }
}
