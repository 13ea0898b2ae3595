//! seedcast: distribute VM images, and the updates to them, from one engine to many sites,
//! moving only the content-defined chunks a site lacks, under one global id per image.
//!
//! This crate is the `seedcast` binary's library: [`client`] (push, status, sites as
//! library calls), [`cluster`] (an engine and agents on loopback in one process, for the
//! demo, tests and benchmarks), [`demo`], [`synth`] (synthetic images), [`output`] (what
//! the CLI prints), [`services`] (real image services started on loopback for tests,
//! the demo and benchmarks) and [`sites`] (a site of each kind built on them). The logic lives in the workspace crates: `seedcast-core` (pure),
//! `seedcast-net`, `seedcast-engine` and `seedcast-agents`.

pub mod bench;
pub mod client;
pub mod cluster;
pub mod demo;
pub mod output;
pub mod services;
pub mod sites;
pub mod synth;

pub use seedcast_agents as agents;
pub use seedcast_core as core;
pub use seedcast_engine as engine;
pub use seedcast_net as net;
