//! The scheduler's process body: the API on a bound listener, the results
//! consumer, the dependency sweep and the gauges, all watching one
//! cancellation token; on cancel, stop taking work, finish what is in hand
//! within `FLOTA_SHUTDOWN_GRACE`, return.
//!
//! The results consumer runs on a single-threaded runtime of its own, with its
//! own connections: every result is a delivery, a Lua call and an ack, each
//! arriving alone, and on the API's multi-threaded runtime each of them woke
//! another thread (the gpu-bound bench: 15-20 % of the scheduler's CPU).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::state::AppState;
use crate::{dataloss, http, results};

/// Serve until `shutdown` is cancelled, then drain. `main` and the in-process
/// tests both run the scheduler through this.
pub async fn run(state: AppState, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let grace = state.config.shutdown_grace;
    let tasks = TaskTracker::new();
    let results_state = state.with_own_connections()?;
    let results_shutdown = shutdown.clone();
    // A thread of its own, not `spawn_blocking`: dropping a runtime waits for its
    // blocking tasks, so a caller that never cancels would hang in the drop.
    let (results_done, results_finished) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new().name("flota-results".into()).spawn(move || {
        match single_threaded_runtime() {
            // Spawned, not the `block_on` future itself: a wake-up of that future goes
            // through the runtime's eventfd even from its own thread (a system call per
            // timer or delivery), while a spawned task's goes to its local queue.
            Ok(runtime) => {
                let results = runtime.spawn(results::run(results_state, results_shutdown));
                if let Err(e) = runtime.block_on(results) {
                    tracing::error!(message = "The results consumer panicked.", error = %e);
                }
            }
            // The watch below stops the scheduler: nothing is recorded without this runtime.
            Err(e) => tracing::error!(message = "Cannot start the results runtime.", error = %e),
        }
        let _ = results_done.send(());
    })?;
    let (watched, results_died) = (shutdown.clone(), Arc::new(AtomicBool::new(false)));
    tasks.spawn({
        let results_died = results_died.clone();
        async move {
            let _ = results_finished.await;
            // It returns only on shutdown; ending before (a panic) would leave a scheduler
            // that records nothing: stop instead, with an error, so a supervisor restarts it.
            if !watched.is_cancelled() {
                tracing::error!(message = "The results consumer stopped; stopping the scheduler.");
                results_died.store(true, Ordering::Relaxed);
                watched.cancel();
            }
        }
    });
    tasks.spawn(state.deps.clone().run(shutdown.clone()));
    tasks.spawn(results::refresh_gauges(state.clone(), shutdown.clone()));
    tasks.spawn(dataloss::watch(state.clone(), shutdown.clone()));
    let server_shutdown = shutdown.clone();
    let served = axum::serve(listener, http::app(state))
        .with_graceful_shutdown(async move { server_shutdown.cancelled().await })
        .await;
    // The server also stops on its own error: make every task stop with it.
    shutdown.cancel();
    tasks.close();
    // Each task bounds its own drain by the grace; this bounds them all, with a margin.
    if tokio::time::timeout(grace + std::time::Duration::from_secs(5), tasks.wait()).await.is_err() {
        tracing::warn!(
            message = "Drain exceeded the shutdown grace; stopping anyway.",
            grace_s = grace.as_secs()
        );
    }
    served?;
    anyhow::ensure!(!results_died.load(Ordering::Relaxed), "the results consumer stopped unexpectedly");
    Ok(())
}

/// A runtime that runs every task on the calling thread (the results consumer,
/// the bench's ceiling loop).
pub fn single_threaded_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}
