//! Worker heartbeats: every few seconds a worker writes who it is and how it
//! is doing to `{P}:worker:<id>` with a TTL, so `GET /v1/workers` and
//! `flotactl workers` list live workers and a killed one disappears by itself.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use flota_shared::store::Store;

use crate::gpu::GpuClient;
use crate::metrics::Metrics;

pub const EVERY: Duration = Duration::from_secs(3);
/// A worker missing three beats is gone.
pub const TTL: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize)]
pub struct Heartbeat {
    pub id: String,
    pub host: String,
    pub pid: u32,
    pub concurrency: u16,
    pub in_flight: i64,
    pub breaker: &'static str,
    pub consuming_deliberations: bool,
    pub version: &'static str,
    pub started_at: String,
    pub last_heartbeat: String,
    pub metrics_url: String,
}

pub struct Identity {
    pub id: String,
    pub concurrency: u16,
    pub started_at: String,
    pub metrics_url: String,
}

pub async fn run(
    identity: Identity,
    store: Store,
    gpu: GpuClient,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let key = store.keys.worker(&identity.id);
    loop {
        let beat = Heartbeat {
            id: identity.id.clone(),
            host: host.clone(),
            pid: std::process::id(),
            concurrency: identity.concurrency,
            in_flight: metrics.in_flight.get(),
            breaker: gpu.breaker().state().as_str(),
            consuming_deliberations: metrics.consuming_deliberations.get() == 1,
            version: env!("CARGO_PKG_VERSION"),
            started_at: identity.started_at.clone(),
            last_heartbeat: flota_shared::envelope::now_rfc3339(),
            metrics_url: identity.metrics_url.clone(),
        };
        if let Err(e) = write(&store, &key, &beat).await {
            tracing::warn!(message = "Heartbeat not written.", error = %e);
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
    // A draining worker says goodbye at once rather than waiting for the TTL.
    if let Ok(mut c) = store.conn().await {
        let _: Result<i64, _> = flota_shared::store::redis::cmd("DEL").arg(&key).query_async(&mut c).await;
    }
}

async fn write(store: &Store, key: &str, beat: &Heartbeat) -> Result<(), flota_shared::store::StoreError> {
    let mut c = store.conn().await?;
    let body = serde_json::to_string(beat).unwrap_or_default();
    let _: () = flota_shared::store::redis::cmd("SET")
        .arg(key)
        .arg(body)
        .arg("PX")
        .arg(TTL.as_millis() as u64)
        .query_async(&mut c)
        .await?;
    Ok(())
}
