//! seedcast-agents: the agent that runs at each site.
//!
//! Start at [`Agent::open`] and [`Agent::run`]. The parts:
//! - [`config`]: [`AgentConfig`], and the site config file ([`config::SiteConfig`]).
//! - [`agent`]: the agent itself; [`connect`]: enroll, dial, reconnect with backoff;
//!   [`session`]: one connection's control loop.
//! - [`deploy`]: one deployment — plan what to ask for (cache, then images held here as
//!   seeds: [`seeds`]), ask, receive, assemble, publish.
//! - [`receive`]: the engine's data streams into verified chunks in the [`cache`] (only a
//!   verified chunk is ever stored).
//! - [`assemble`]: files rebuilt from cached chunks and checked against their hashes; only
//!   that makes the [`adapter::AssembledImage`] an [`Adapter`] publishes
//!   ([`adapters`]: one per kind of local image service, built from its options).
//! - [`error`]: the error policy.

pub mod adapter;
pub mod adapters;
pub mod agent;
pub mod assemble;
pub mod cache;
mod cache_value;
pub mod check;
pub mod config;
pub mod connect;
pub mod deploy;
pub mod error;
pub mod probe;
pub mod receive;
pub mod seeds;
pub mod session;
#[cfg(test)]
mod testutil;

pub use adapter::{Adapter, AdapterError, AssembledImage, Leftover, Next, ReadBack};
pub use agent::Agent;
pub use config::{AgentConfig, SiteConfig};
pub use error::{AgentError, ReceiveError};
