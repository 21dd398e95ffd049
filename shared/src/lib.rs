//! Flota's shared library: what every process (worker, scheduler, flotactl)
//! agrees on. It depends on no other workspace crate.
//!
//! # Layout
//! - [`envelope`]: task and result envelopes v1, their validation (every problem listed) and outputs.
//! - [`council`]: councils of agents per role, their defaults and validation.
//! - [`config`]: settings from the environment; parse all, report all, exit 64.
//! - [`amqp`]: connections, the contract's topology, confirmed publishing, message headers.
//! - [`acks`]: acks that do not wait on lapin, batched per channel.
//! - [`store`]: Redis pool, key names and the Lua scripts that change task state.
//! - [`telemetry`]: log initialisation and W3C trace context.
//! - [`shutdown`]: SIGTERM/SIGINT into a cancellation token.

pub mod acks;
pub mod amqp;
pub mod config;
pub mod council;
pub mod envelope;
pub mod shutdown;
pub mod store;
pub mod telemetry;
