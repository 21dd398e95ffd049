//! `flota-gpusim`: an OpenAI-compatible GPU-server simulator, close enough to
//! vLLM to develop, test and benchmark Flota without a GPU. Answers are
//! deterministic, latency follows a continuous-batching model, faults can be
//! injected at startup or at runtime, and `/stats` shows what the "GPU" saw.
//!
//! # Layout
//! - [`config`]: the command-line flags (also `GPUSIM_*` variables) and the [`Config`] they make.
//! - `http`: the router and handlers, and the chat handler that ties the modules together.
//! - `openai`: the OpenAI wire format: requests, completions and error bodies.
//! - [`latency`]: the slots of the continuous-batching model and each request's service time.
//! - [`faults`]: the fault settings `/admin/faults` changes and the seeded draws against them.
//! - [`stats`]: lock-free counters, peaks and busy slot time for `/stats`, and the recent-request log.
//! - [`content`]: deterministic answers: interpretations, reviews, proposals and instances of any JSON Schema.

pub mod config;
pub mod content;
pub mod faults;
mod http;
pub mod latency;
mod openai;
pub mod stats;

use std::future::Future;

use axum::serve::ListenerExt;
use tokio_util::sync::CancellationToken;

pub use config::{Args, Config};

/// Serve on `listener` until `shutdown` resolves. Then no new connection is
/// accepted, hung requests and requests still waiting for a slot get 503,
/// requests in service finish, and this returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stop = CancellationToken::new();
    let app = http::router(config, stop.clone());
    // Small JSON answers on keep-alive connections: don't let Nagle hold them back.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY not set: {e}");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            stop.cancel();
        })
        .await
}
