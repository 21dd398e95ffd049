//! Task handlers: business logic only, no AMQP types inside. Each gets the
//! validated input and a [`TaskCtx`], and returns the output JSON or a
//! [`TaskError`] that `error.rs` turns into one delivery decision.

pub mod deliberate;
pub mod interpret;

use tokio::time::Instant;

use flota_shared::envelope::Usage;

use crate::error::TaskError;
use crate::gpu::GpuClient;

pub struct TaskCtx {
    pub task_id: String,
    pub deadline: Instant,
    pub traceparent: String,
    pub output_retries: u32,
    pub gpu: GpuClient,
    /// Where finished agent calls are checkpointed (None: no checkpoints, e.g. unit tests).
    pub checkpoints: Option<flota_shared::store::Store>,
}

pub struct HandlerOutput {
    pub output: serde_json::Value,
    pub usage: Usage,
}

pub type HandlerResult = Result<HandlerOutput, TaskError>;
