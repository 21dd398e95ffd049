//! Redis data-loss detection. A restart without persistence, a `FLUSHALL` or
//! a failover to an empty replica silently drops parked tasks, task state and
//! councils. The scheduler keeps an epoch marker in Redis and checks it every
//! few seconds: if the marker it saw is gone or replaced, Redis lost data while
//! the fleet ran. That is reported loudly (an error log naming what is at risk
//! and `flota_redis_data_loss_total`), never silently. With persistence on
//! (AOF, as in `docker-compose.yml`) the marker survives a restart like
//! everything else and nothing is reported.
//!
//! Limit: a loss that happens while no scheduler runs looks like a fresh
//! prefix to the next one; there is no marker outside Redis to compare with.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::state::AppState;

/// How often the marker is checked: one `SET NX GET` per period.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);

/// What the scheduler knows about the marker (pure; the I/O is in [`watch`]).
#[derive(Debug, Default)]
pub struct EpochWatch {
    known: Option<String>,
}

impl EpochWatch {
    /// One check's outcome. `previous` is what the marker held before the
    /// check (`None`: it was absent and the check set it to `ours`). Returns
    /// true when data was lost since the last check.
    pub fn observe(&mut self, previous: Option<String>, ours: &str) -> bool {
        let now = previous.unwrap_or_else(|| ours.to_string());
        let lost = self.known.as_ref().is_some_and(|known| *known != now);
        self.known = Some(now);
        lost
    }
}

/// Check the marker until `shutdown`. Redis errors are not losses: they are
/// retried at the next period (the pool reconnects on its own).
pub async fn watch(state: AppState, shutdown: CancellationToken) {
    let mut epoch = EpochWatch::default();
    loop {
        let ours = uuid::Uuid::new_v4().simple().to_string();
        match state.store.swap_epoch(&ours).await {
            Ok(previous) => {
                if epoch.observe(previous, &ours) {
                    state.metrics.redis_data_loss.inc();
                    tracing::error!(
                        message = "Redis lost Flota's data (restarted without persistence, flushed, or failed \
                                   over to an empty replica): parked tasks, task states and councils written \
                                   before now may be gone. Turn on AOF persistence; resubmit waiting tasks.",
                        prefix = %state.config.prefix,
                    );
                }
            }
            Err(e) => tracing::debug!(message = "Epoch check skipped: Redis unavailable.", error = %e),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(CHECK_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_check_adopts_whatever_it_finds() {
        let mut w = EpochWatch::default();
        assert!(!w.observe(None, "a"));
        let mut w = EpochWatch::default();
        assert!(!w.observe(Some("other".into()), "a"));
    }

    #[test]
    fn an_unchanged_marker_is_no_loss() {
        let mut w = EpochWatch::default();
        assert!(!w.observe(None, "a"));
        assert!(!w.observe(Some("a".into()), "b"));
        assert!(!w.observe(Some("a".into()), "c"));
    }

    #[test]
    fn a_vanished_marker_is_a_loss_once() {
        let mut w = EpochWatch::default();
        assert!(!w.observe(None, "a"));
        assert!(w.observe(None, "b"), "marker gone: Redis lost data");
        assert!(!w.observe(Some("b".into()), "c"), "the new marker is adopted");
    }

    #[test]
    fn a_marker_replaced_by_another_scheduler_after_a_loss_is_a_loss() {
        let mut w = EpochWatch::default();
        assert!(!w.observe(Some("a".into()), "x"));
        assert!(w.observe(Some("b".into()), "y"));
    }
}
