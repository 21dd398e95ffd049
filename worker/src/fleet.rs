//! What the replicas of a fleet agree on through Redis, so adding workers can
//! never overload the GPU server:
//! - the breaker's open state: when one replica opens, every replica backs off;
//! - one probe at a time per fleet against a recovering server;
//! - a fleet-wide cap on GPU requests in flight (`FLOTA_GPU_MAX_INFLIGHT`),
//!   as leases that expire, so a killed worker's permits come back by themselves.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use flota_shared::store::Store;
use flota_shared::telemetry::TraceParent;

use crate::breaker::BreakerState;
use crate::gpu::{GpuClient, GpuError};

/// How often a replica looks at the fleet's breaker state.
pub const SYNC_EVERY: Duration = Duration::from_millis(250);

/// The first pause between admission attempts; it doubles up to [`ADMISSION_MAX_WAIT`].
const ADMISSION_FIRST_WAIT: Duration = Duration::from_millis(2);
/// The longest pause between admission attempts.
const ADMISSION_MAX_WAIT: Duration = Duration::from_millis(50);
/// How much longer than the call timeout a GPU slot's lease lasts.
const LEASE_MARGIN: Duration = Duration::from_secs(2);

/// A slot's lease outlives the longest call by a margin; a dead worker's lease expires after it.
fn admission_lease(call_timeout: Duration) -> Duration {
    call_timeout + LEASE_MARGIN
}

/// Whether waiting `wait` more for a slot still ends before the deadline (else give up now).
fn admission_wait_fits(now: Instant, wait: Duration, deadline: Instant) -> bool {
    now + wait < deadline
}

/// The pause before the next attempt, jittered within `wait/2..=wait` so polling replicas spread out.
fn admission_pause(wait: Duration, jitter: Duration) -> Duration {
    wait / 2 + jitter / 2
}

/// The next attempt's `wait`: doubled, capped so a freed slot is noticed quickly.
fn next_admission_wait(wait: Duration) -> Duration {
    (wait * 2).min(ADMISSION_MAX_WAIT)
}

/// The fleet-wide in-flight cap.
pub struct Admission {
    store: Store,
    cap: u32,
    lease: Duration,
}

impl Admission {
    pub fn new(store: Store, cap: u32, call_timeout: Duration) -> Admission {
        Admission { store, cap, lease: admission_lease(call_timeout) }
    }

    /// Wait for a slot, polling with jitter, until `deadline`. When Redis is
    /// unreachable the cap cannot be enforced; we fail the call as transient
    /// rather than overload the server blindly.
    pub async fn acquire(self: &Arc<Self>, deadline: Instant) -> Result<Slot, GpuError> {
        let token = flota_shared::store::new_token();
        let mut wait = ADMISSION_FIRST_WAIT;
        loop {
            match self.store.admit_gpu(&token, self.cap, self.lease).await {
                Ok(true) => return Ok(Slot { admission: self.clone(), token: Some(token) }),
                Ok(false) => {}
                Err(e) => {
                    return Err(GpuError::unavailable(format!("GPU admission unavailable: {e}")));
                }
            }
            if !admission_wait_fits(Instant::now(), wait, deadline) {
                return Err(GpuError::Deadline);
            }
            let jitter = Duration::from_micros(rand::random_range(0..=wait.as_micros() as u64));
            tokio::time::sleep(admission_pause(wait, jitter)).await;
            wait = next_admission_wait(wait);
        }
    }
}

/// A leased slot; released when dropped.
pub struct Slot {
    admission: Arc<Admission>,
    token: Option<String>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(token) = self.token.take() {
            let store = self.admission.store.clone();
            // Release off the hot path; if this never runs, the lease expires.
            tokio::spawn(async move {
                let _ = store.release_gpu(&token).await;
            });
        }
    }
}

/// Keep this replica's breaker and the fleet's in step, and run the one probe.
/// Returns when `shutdown` is cancelled.
/// How long the fleet's "open" flag lives unless a probe renews it (pure): longer
/// than any local open period plus a probe, so it only disappears when a probe
/// succeeded (which deletes it) — an expiry must never read as "healed".
pub fn fleet_open_ttl(open_max: Duration, probe_lease: Duration) -> Duration {
    open_max + probe_lease + 4 * SYNC_EVERY
}

pub async fn sync_breaker(gpu: GpuClient, store: Store, shutdown: CancellationToken) {
    let breaker = gpu.breaker().clone();
    let probe_lease = breaker.settings.probe_timeout + Duration::from_secs(1);
    let open_for = fleet_open_ttl(breaker.settings.open_max, probe_lease);
    let mut fleet_was_open = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(SYNC_EVERY) => {}
        }
        let local = breaker.local_state();
        if local == BreakerState::Open
            && !fleet_was_open
            && let Err(e) = set_px(&store, &store.keys.breaker_open(), open_for).await
        {
            tracing::warn!(message = "Cannot share the breaker state.", error = %e);
        }
        let fleet_open = exists(&store, &store.keys.breaker_open()).await.unwrap_or(false);
        if fleet_was_open && !fleet_open && local != BreakerState::Closed {
            // Another replica's probe succeeded: trust it rather than probing again.
            breaker.reset();
        }
        breaker.set_fleet_open(fleet_open);
        fleet_was_open = fleet_open;

        if breaker.local_state() == BreakerState::Closed {
            continue;
        }
        let Some(slot) = breaker.admit_probe() else { continue };
        // One probe per fleet: whoever holds the probe lease.
        if !set_nx_px(&store, &store.keys.breaker_probe(), probe_lease).await.unwrap_or(false) {
            drop(slot);
            continue;
        }
        let result = gpu.probe(&TraceParent::new_root().header()).await;
        drop(slot);
        match result {
            Ok(()) => {
                tracing::info!(message = "GPU probe succeeded; reopening the fleet's GPU path.");
                let _ = del(&store, &store.keys.breaker_open()).await;
                breaker.set_fleet_open(false);
                fleet_was_open = false;
            }
            Err(e) => {
                tracing::warn!(message = "GPU probe failed; breaker stays open.", error = %e);
                let _ = set_px(&store, &store.keys.breaker_open(), open_for).await;
            }
        }
        let _ = del(&store, &store.keys.breaker_probe()).await;
    }
}

async fn set_px(store: &Store, key: &str, ttl: Duration) -> Result<(), flota_shared::store::StoreError> {
    let mut c = store.conn().await?;
    let _: () =
        redis_cmd("SET").arg(key).arg("1").arg("PX").arg(ttl.as_millis() as u64).query_async(&mut c).await?;
    Ok(())
}

async fn set_nx_px(store: &Store, key: &str, ttl: Duration) -> Result<bool, flota_shared::store::StoreError> {
    let mut c = store.conn().await?;
    let r: Option<String> = redis_cmd("SET")
        .arg(key)
        .arg("1")
        .arg("NX")
        .arg("PX")
        .arg(ttl.as_millis() as u64)
        .query_async(&mut c)
        .await?;
    Ok(r.is_some())
}

async fn exists(store: &Store, key: &str) -> Result<bool, flota_shared::store::StoreError> {
    let mut c = store.conn().await?;
    let n: i64 = redis_cmd("EXISTS").arg(key).query_async(&mut c).await?;
    Ok(n == 1)
}

async fn del(store: &Store, key: &str) -> Result<(), flota_shared::store::StoreError> {
    let mut c = store.conn().await?;
    let _: i64 = redis_cmd("DEL").arg(key).query_async(&mut c).await?;
    Ok(())
}

fn redis_cmd(name: &str) -> flota_shared::store::redis::Cmd {
    flota_shared::store::redis::cmd(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_outlives_the_call_timeout_by_the_margin() {
        assert_eq!(admission_lease(Duration::from_secs(30)), Duration::from_secs(32));
        assert_eq!(admission_lease(Duration::from_millis(500)), Duration::from_millis(2500));
        assert!(admission_lease(Duration::ZERO) > Duration::ZERO);
    }

    #[test]
    fn the_fleet_flag_outlives_an_open_period_and_a_probe() {
        let (open_max, lease) = (Duration::from_secs(30), Duration::from_secs(6));
        let ttl = fleet_open_ttl(open_max, lease);
        assert!(ttl > open_max + lease, "{ttl:?}");
        assert_eq!(ttl, Duration::from_secs(37));
    }

    #[test]
    fn admission_gives_up_when_the_wait_would_reach_the_deadline() {
        let now = Instant::now();
        let wait = Duration::from_millis(10);
        assert!(admission_wait_fits(now, wait, now + Duration::from_millis(11)));
        // Ending exactly at the deadline is too late.
        assert!(!admission_wait_fits(now, wait, now + wait));
        assert!(!admission_wait_fits(now, wait, now + Duration::from_millis(5)));
        assert!(!admission_wait_fits(now, wait, now - Duration::from_secs(1)));
    }

    #[test]
    fn admission_pause_is_between_half_the_wait_and_the_wait() {
        let wait = Duration::from_millis(40);
        assert_eq!(admission_pause(wait, Duration::ZERO), Duration::from_millis(20));
        assert_eq!(admission_pause(wait, wait), wait);
        assert_eq!(admission_pause(wait, Duration::from_millis(10)), Duration::from_millis(25));
    }

    #[test]
    fn admission_wait_doubles_up_to_its_cap() {
        let mut wait = ADMISSION_FIRST_WAIT;
        let mut seen = vec![wait];
        for _ in 0..8 {
            wait = next_admission_wait(wait);
            seen.push(wait);
        }
        let ms: Vec<u128> = seen.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [2, 4, 8, 16, 32, 50, 50, 50, 50]);
    }
}
