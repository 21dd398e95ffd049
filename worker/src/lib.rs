//! `flota-worker`: stateless; consumes tasks, calls the GPU server, publishes
//! results. Scale by running more.
//!
//! # Layout
//! - [`consumer`]: AMQP sessions, prefetch, reconnects, drain; the only place that acks.
//! - [`credit`]: how the prefetch is shared between the two queues (pure: lanes, saturation, shares).
//! - [`lanes`]: the consumers (lanes) that share it: started, cancelled, their deliveries counted.
//! - [`process`]: one delivery from validation to a [`process::Decision`] (claim, run, fence, store).
//! - [`error`]: task errors and the one delivery decision each maps to.
//! - [`handlers`]: interpretation and deliberation; no AMQP inside.
//! - [`prompts`]: prompt shapes and the JSON schemas of model answers.
//! - [`gpu`]: the OpenAI-compatible client: deadline, classification, retry.
//! - [`breaker`]: the circuit breaker (failsafe, wrapped): slow calls, one probe, state watch.
//! - [`fleet`]: what replicas share through Redis: breaker state, the one probe, the in-flight cap.
//! - [`heartbeat`]: the worker's liveness record in Redis, with a TTL.
//! - [`metrics`]: the WES and `flota_` metrics.
//! - [`http`]: `/metrics` and `/healthz`.

pub mod breaker;
pub mod consumer;
pub mod credit;
pub mod error;
pub mod fleet;
pub mod gpu;
pub mod handlers;
pub mod heartbeat;
pub mod http;
pub mod lanes;
pub mod metrics;
pub mod process;
pub mod prompts;
