//! What the dashboard shows about the last minutes: completions and latency
//! per second, and the most recent failures. In memory; it is a view, not state.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;

use flota_shared::envelope::ResultEnvelope;

const WINDOW_SECONDS: u64 = 600;
const RECENT_FAILURES: usize = 20;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Second {
    pub t: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub latency_ms_sum: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub id: String,
    pub kind: String,
    pub code: String,
    pub message: String,
    pub at: String,
}

#[derive(Default)]
pub struct Activity {
    inner: Mutex<(VecDeque<Second>, VecDeque<Failure>)>,
}

/// Milliseconds between two RFC 3339 timestamps of the contract's shape (pure).
pub fn duration_ms(started: &str, finished: &str) -> Option<u64> {
    let parse = |s: &str| time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok();
    let (a, b) = (parse(started)?, parse(finished)?);
    let ms = (b - a).whole_milliseconds();
    (ms >= 0).then_some(ms as u64)
}

impl Activity {
    pub fn record(&self, r: &ResultEnvelope, now_s: u64) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (seconds, failures) = &mut *g;
        if seconds.back().is_none_or(|s| s.t != now_s) {
            seconds.push_back(Second { t: now_s, ..Default::default() });
        }
        while seconds.front().is_some_and(|s| s.t + WINDOW_SECONDS < now_s) {
            seconds.pop_front();
        }
        if let Some(s) = seconds.back_mut() {
            match r.status {
                flota_shared::envelope::Status::Succeeded => s.succeeded += 1,
                flota_shared::envelope::Status::Failed => s.failed += 1,
            }
            s.latency_ms_sum += duration_ms(&r.started_at, &r.finished_at).unwrap_or(0);
        }
        if let Some(e) = &r.error {
            if failures.len() == RECENT_FAILURES {
                failures.pop_front();
            }
            failures.push_back(Failure {
                id: r.id.clone(),
                kind: r.kind.to_string(),
                code: e.code.to_string(),
                message: e.message.chars().take(200).collect(),
                at: r.finished_at.clone(),
            });
        }
    }

    pub fn snapshot(&self) -> (Vec<Second>, Vec<Failure>) {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (g.0.iter().cloned().collect(), g.1.iter().rev().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration_ms("2026-11-22T10:00:00.120Z", "2026-11-22T10:00:00.410Z"), Some(290));
        assert_eq!(duration_ms("2026-11-22T10:00:01.000Z", "2026-11-22T10:00:00.000Z"), None);
        assert_eq!(duration_ms("garbage", "2026-11-22T10:00:00.000Z"), None);
    }
}
