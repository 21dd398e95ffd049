//! flota-worker: read the settings (exit 64 on bad ones), start logging, serve
//! `/metrics`, consume until SIGTERM/SIGINT, drain, exit 0.

use std::io::Write;
use std::sync::Arc;

use flota_shared::{config, shutdown, store, telemetry};
use flota_worker::breaker::{Breaker, BreakerSettings};
use flota_worker::fleet::{self, Admission};
use flota_worker::heartbeat;
use flota_worker::{consumer, gpu::GpuClient, http, metrics::Metrics, process::WorkerCtx};

// One thread runs every task of a worker (lapin keeps its own I/O thread).
// Measured against the multi-threaded runtime in the gpu-bound bench, this
// spends 20-25 % less CPU per task, mostly thread wake-ups, at the same
// throughput: a worker waits on the GPU, it does not compute. Operators scale
// a fleet by adding worker replicas, not threads.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let config = config::load_or_exit("flota-worker");
    let _telemetry = telemetry::init_with_config(&config, "flota-worker");
    let shutdown = shutdown::on_signal();

    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(config.metrics_addr).await?;
    let metrics_addr = listener.local_addr()?;
    tracing::info!(message = "Serving /metrics.", addr = %metrics_addr, worker = %config.worker_id, prefix = %config.prefix);
    let server_shutdown = shutdown.clone();
    let server = tokio::spawn(
        axum::serve(listener, http::app(metrics.clone()))
            .with_graceful_shutdown(async move { server_shutdown.cancelled().await })
            .into_future(),
    );

    let pool = store::pool(&config, config.concurrency as usize + 8)?;
    let store = store::Store::new(pool, &config.prefix);
    let breaker = Arc::new(Breaker::new(BreakerSettings::default(), metrics.clone()));
    let admission =
        config.gpu_max_inflight.map(|cap| Arc::new(Admission::new(store.clone(), cap, config.gpu_timeout)));
    let gpu = GpuClient::new(&config, metrics.clone(), breaker, admission)?;
    let background = tokio_util::task::TaskTracker::new();
    background.spawn(fleet::sync_breaker(gpu.clone(), store.clone(), shutdown.clone()));
    background.spawn(heartbeat::run(
        heartbeat::Identity {
            id: config.worker_id.clone(),
            concurrency: config.concurrency,
            started_at: flota_shared::envelope::now_rfc3339(),
            metrics_url: format!("http://{metrics_addr}"),
        },
        store.clone(),
        gpu.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let panic_on = std::env::var("FLOTA_FAULT_PANIC_ID").ok().filter(|v| !v.is_empty());
    let ctx = Arc::new(WorkerCtx { store, gpu, metrics, config: config.clone(), panic_on });
    let worker_id = config.worker_id.clone();
    consumer::run(ctx, shutdown, move || {
        // Parents (flotactl demo, tests) wait for this line.
        println!("flota-worker {worker_id} ready, metrics on http://{metrics_addr}");
        let _ = std::io::stdout().flush();
    })
    .await?;
    let _ = server.await;
    background.close();
    background.wait().await;
    tracing::info!(message = "Worker stopped.");
    Ok(())
}
