//! seedcast-agents: the agent that runs at each site.
//!
//! It dials the engine and stays connected ([`runtime`]); for each deployment it asks only
//! for the chunks it lacks, verifies every chunk before its cache ([`cache`]) accepts it,
//! reuses chunks of images the site already holds ([`seeds`]), rebuilds and checks every file ([`assemble`]), and hands the verified image to the site's
//! image service through an [`adapter::Adapter`] ([`adapters`]), reporting the service's own
//! local id back to the engine.
//!
//! Start at [`runtime::Agent::open`] and [`runtime::Agent::run`].

pub mod adapter;
pub mod adapters;
pub mod assemble;
pub mod cache;
pub mod runtime;
pub mod seeds;

pub use adapter::{Adapter, AdapterError, AssembledImage, ReadBack};
pub use runtime::{Agent, AgentConfig, AgentError};
