//! The scheduler's process body: the API on a bound listener, the results
//! consumer, the dependency sweep and the gauges, all watching one
//! cancellation token; on cancel, stop taking work, finish what is in hand
//! within `FLOTA_SHUTDOWN_GRACE`, return.

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
    tasks.spawn(results::run(state.clone(), shutdown.clone()));
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
    Ok(())
}
