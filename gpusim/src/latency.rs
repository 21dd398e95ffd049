//! The continuous-batching latency model: `slots` requests in service at once,
//! the rest waiting in arrival order, each holding its slot for its service time.

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
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
    /// Slots granted so far: a request's grant number is its place in the order of service.
    granted: AtomicU64,
}

impl Slots {
    pub fn new(count: usize) -> Slots {
        let count = count.clamp(1, Semaphore::MAX_PERMITS);
        Slots { sem: Semaphore::new(count), count, granted: AtomicU64::new(0) }
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// Wait for a slot, hold it for `service`, release it; returns the grant
    /// number (1 for the first request served since start). A zero service time
    /// does not touch the timer at all, so the 0 ms configuration stays cheap.
    /// Shutdown ends the wait for a slot, not a service already started, so
    /// every request that got a slot is answered.
    pub async fn serve(
        &self,
        stats: &Stats,
        service: Duration,
        shutdown: &CancellationToken,
    ) -> Result<u64, ShuttingDown> {
        let mut acquire = pin!(self.sem.acquire());
        // The first poll takes a free slot or joins the queue; only a request
        // really in the queue counts as waiting, so `/stats` can tell a client
        // "everything sent so far is queued" and the order of service is then known.
        let first = poll_fn(|cx| Poll::Ready(acquire.as_mut().poll(cx))).await;
        let permit = match first {
            Poll::Ready(p) => p.map_err(|_| ShuttingDown)?,
            Poll::Pending => {
                let waiting = stats.waiting();
                let p = tokio::select! {
                    biased;
                    p = acquire => p.map_err(|_| ShuttingDown)?,
                    () = shutdown.cancelled() => return Err(ShuttingDown),
                };
                // No longer waiting before it counts as busy: never counted twice.
                drop(waiting);
                p
            }
        };
        let order = self.granted.fetch_add(1, Ordering::Relaxed) + 1;
        let busy = stats.busy();
        if !service.is_zero() {
            tokio::time::sleep(service).await;
        }
        drop(busy);
        drop(permit);
        Ok(order)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

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
        assert_eq!(stats.snapshot(1).waiting, 0, "a request that gave up no longer waits");
    }

    /// Yield (no clock involved) until `done` holds; on a current-thread
    /// runtime every spawned task runs between two yields.
    async fn settle(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..10_000 {
            if done() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("never happened: {what}");
    }

    fn shared(slots: usize) -> (Arc<Slots>, Arc<Stats>, CancellationToken) {
        (Arc::new(Slots::new(slots)), Arc::new(Stats::new()), CancellationToken::new())
    }

    #[tokio::test]
    async fn never_more_requests_in_service_than_slots() {
        let (slots, stats, token) = shared(3);
        // 3 × slots requests that would each hold a slot for an hour.
        let requests: Vec<_> = (0..9)
            .map(|_| {
                let (slots, stats, token) = (slots.clone(), stats.clone(), token.clone());
                tokio::spawn(async move { slots.serve(&stats, MAX_SERVICE, &token).await })
            })
            .collect();
        settle("3 in service and 6 waiting", || {
            let s = stats.snapshot(3);
            (s.busy_slots, s.waiting) == (3, 6)
        })
        .await;
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        let s = stats.snapshot(3);
        assert_eq!((s.busy_slots, s.waiting, s.peak_busy_slots), (3, 6, 3), "no fourth request in service");
        // Requests dropped mid-service or mid-wait (a client hanging up) give their slot back.
        for r in &requests {
            r.abort();
        }
        for r in requests {
            assert!(r.await.unwrap_err().is_cancelled());
        }
        let s = stats.snapshot(3);
        assert_eq!((s.busy_slots, s.waiting, s.peak_busy_slots), (0, 0, 3));
        for _ in 0..3 {
            slots.serve(&stats, Duration::ZERO, &token).await.expect("every slot is free again");
        }
    }

    #[tokio::test]
    async fn waiting_requests_get_their_slot_in_arrival_order() {
        let (slots, stats, token) = shared(1);
        // The only slot is taken, so every request below queues.
        let held = slots.sem.acquire().await.unwrap();
        let finished = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut requests = Vec::new();
        for i in 0..6 {
            let (slots, st, token, finished) =
                (slots.clone(), stats.clone(), token.clone(), finished.clone());
            requests.push(tokio::spawn(async move {
                let order = slots.serve(&st, Duration::ZERO, &token).await.unwrap();
                finished.lock().unwrap().push((i, order));
            }));
            // The next one is sent only once this one is known to be in the queue.
            settle("the request is queued", || stats.snapshot(1).waiting == i + 1).await;
        }
        drop(held);
        for r in requests {
            r.await.unwrap();
        }
        let finished = finished.lock().unwrap().clone();
        assert_eq!(
            finished,
            (0..6).map(|i| (i, i as u64 + 1)).collect::<Vec<_>>(),
            "first come, first served"
        );
        let s = stats.snapshot(1);
        assert_eq!((s.waiting, s.busy_slots, s.peak_busy_slots), (0, 0, 1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grants_and_busy_time_add_up() {
        let (slots, stats, token) = shared(2);
        let service = Duration::from_millis(20);
        let requests: Vec<_> = (0..6)
            .map(|_| {
                let (slots, stats, token) = (slots.clone(), stats.clone(), token.clone());
                tokio::spawn(async move { slots.serve(&stats, service, &token).await.unwrap() })
            })
            .collect();
        let mut orders = Vec::new();
        for r in requests {
            orders.push(r.await.unwrap());
        }
        orders.sort_unstable();
        assert_eq!(orders, [1, 2, 3, 4, 5, 6], "one grant per request, none skipped or repeated");
        let s = stats.snapshot(2);
        assert_eq!((s.busy_slots, s.waiting), (0, 0));
        assert!(s.peak_busy_slots <= 2);
        // A lower bound only: each request held its slot at least its service time.
        assert!(s.busy_slot_seconds >= 6.0 * service.as_secs_f64(), "{}", s.busy_slot_seconds);
    }
}
