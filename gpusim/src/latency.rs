//! The continuous-batching latency model: `slots` requests in service at once,
//! the rest waiting in arrival order, each holding its slot for its service time.

use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::stats::Stats;

/// No simulated request is served for longer than this, so a silly `base_ms`
/// cannot overflow the clock arithmetic.
const MAX_SERVICE: Duration = Duration::from_secs(3600);

/// `base_ms + per_token_ms × completion_tokens + extra_ms`, capped at an hour.
pub fn service_time(base_ms: u64, per_token_ms: f64, completion_tokens: u64, extra_ms: u64) -> Duration {
    let per_token = per_token_ms * completion_tokens as f64;
    let ms = base_ms as f64 + extra_ms as f64 + if per_token.is_finite() { per_token.max(0.0) } else { 0.0 };
    Duration::from_secs_f64((ms / 1000.0).min(MAX_SERVICE.as_secs_f64()))
}

/// The server is shutting down; the request never got a slot.
#[derive(Debug)]
pub struct ShuttingDown;

pub struct Slots {
    // tokio's semaphore is FIFO-fair: waiting requests get slots in arrival order.
    sem: Semaphore,
    count: usize,
}

impl Slots {
    pub fn new(count: usize) -> Slots {
        let count = count.clamp(1, Semaphore::MAX_PERMITS);
        Slots { sem: Semaphore::new(count), count }
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// Wait for a slot, hold it for `service`, release it. A zero service time
    /// does not touch the timer at all, so the 0 ms configuration stays cheap.
    /// Shutdown ends the wait for a slot, not a service already started, so
    /// every request that got a slot is answered.
    pub async fn serve(
        &self,
        stats: &Stats,
        service: Duration,
        shutdown: &CancellationToken,
    ) -> Result<(), ShuttingDown> {
        let permit = tokio::select! {
            biased;
            p = self.sem.acquire() => p.map_err(|_| ShuttingDown)?,
            () = shutdown.cancelled() => return Err(ShuttingDown),
        };
        let busy = stats.busy();
        if !service.is_zero() {
            tokio::time::sleep(service).await;
        }
        drop(busy);
        drop(permit);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_time_adds_up_and_is_capped() {
        assert_eq!(service_time(0, 0.0, 500, 0), Duration::ZERO);
        assert_eq!(service_time(200, 0.5, 100, 0), Duration::from_millis(250));
        assert_eq!(service_time(10, 0.0, 7, 5000), Duration::from_millis(5010));
        assert_eq!(service_time(u64::MAX, f64::MAX, u64::MAX, u64::MAX), MAX_SERVICE);
    }

    #[tokio::test]
    async fn slots_are_held_and_released() {
        let slots = Slots::new(2);
        let stats = Stats::new();
        let token = CancellationToken::new();
        slots.serve(&stats, Duration::ZERO, &token).await.unwrap();
        slots.serve(&stats, Duration::from_millis(1), &token).await.unwrap();
        let s = stats.snapshot(slots.count());
        assert_eq!((s.busy_slots, s.peak_busy_slots), (0, 1));
        assert!(s.busy_slot_seconds > 0.0);
    }

    #[tokio::test]
    async fn shutdown_ends_the_wait_for_a_slot() {
        let slots = Slots::new(1);
        let stats = Stats::new();
        let token = CancellationToken::new();
        let _held = slots.sem.acquire().await.unwrap();
        token.cancel();
        assert!(slots.serve(&stats, Duration::ZERO, &token).await.is_err());
    }
}
