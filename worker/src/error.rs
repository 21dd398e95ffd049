//! Every way a task can go wrong, and the one delivery decision each maps to.
//!
//! [`decide`] is pure: given the error and the attempts spent, it says whether
//! the task ends with a failed result now, is retried later through a delay
//! queue, or ends failed *and* is dead-lettered (attempts exhausted).

use std::time::Duration;

use flota_shared::envelope::ErrorCode;

use crate::gpu::GpuError;

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("{0}")]
    Gpu(GpuError),
    #[error("model output invalid: {0}")]
    OutputInvalid(String),
    #[error("{message}")]
    Failed { code: ErrorCode, message: String },
    #[error("{context}: {inner}")]
    Context { context: String, inner: Box<TaskError> },
}

impl From<GpuError> for TaskError {
    fn from(e: GpuError) -> Self {
        TaskError::Gpu(e)
    }
}

impl TaskError {
    pub fn with_context(self, context: String) -> TaskError {
        TaskError::Context { context, inner: Box::new(self) }
    }

    fn root(&self) -> &TaskError {
        match self {
            TaskError::Context { inner, .. } => inner.root(),
            other => other,
        }
    }
}

/// How long a task that met the open breaker waits (in a delay queue) before it looks again.
pub const BREAKER_OPEN_WAIT: Duration = Duration::from_secs(4);

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// End the task with a failed result.
    Fail { code: ErrorCode, message: String },
    /// Try again later through a delay queue, as attempt `attempt`.
    RetryLater { delay: Duration, attempt: u32 },
    /// Attempts exhausted: failed result, and the message goes to `P.dead`.
    FailAndDeadLetter { code: ErrorCode, message: String },
}

/// `attempt` is the 0-based number of the attempt that just failed.
pub fn decide(err: &TaskError, attempt: u32, max_attempts: u32) -> Verdict {
    let message = err.to_string();
    match err.root() {
        TaskError::Gpu(GpuError::Transient { retry_after, .. }) => {
            let next = attempt + 1;
            if next >= max_attempts {
                Verdict::FailAndDeadLetter { code: ErrorCode::GpuUnavailable, message }
            } else {
                let delay = retry_delay(attempt).max(retry_after.unwrap_or_default());
                Verdict::RetryLater { delay, attempt: next }
            }
        }
        // The breaker is open: wait without spending an attempt.
        TaskError::Gpu(GpuError::BreakerOpen) => Verdict::RetryLater { delay: BREAKER_OPEN_WAIT, attempt },
        TaskError::Gpu(GpuError::Invalid { .. }) => {
            Verdict::Fail { code: ErrorCode::InvalidRequest, message }
        }
        TaskError::Gpu(GpuError::Deadline) => Verdict::Fail { code: ErrorCode::DeadlineExceeded, message },
        TaskError::OutputInvalid(_) | TaskError::Gpu(GpuError::Oversized { .. }) => {
            Verdict::Fail { code: ErrorCode::OutputInvalid, message }
        }
        TaskError::Failed { code, .. } => Verdict::Fail { code: *code, message },
        TaskError::Context { .. } => Verdict::Fail { code: ErrorCode::InvalidTask, message },
    }
}

/// Delay before retry `attempt + 1`: 1 s, 4 s, 16 s, 64 s, 256 s (the delay tiers).
pub fn retry_delay(attempt: u32) -> Duration {
    Duration::from_millis(1_000u64.saturating_mul(4u64.saturating_pow(attempt.min(4))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transient() -> TaskError {
        TaskError::Gpu(GpuError::Transient { message: "503".into(), retry_after: None, timed_out: false })
    }

    #[test]
    fn transient_retries_until_attempts_run_out() {
        assert_eq!(
            decide(&transient(), 0, 3),
            Verdict::RetryLater { delay: Duration::from_secs(1), attempt: 1 }
        );
        assert_eq!(
            decide(&transient(), 1, 3),
            Verdict::RetryLater { delay: Duration::from_secs(4), attempt: 2 }
        );
        assert!(matches!(
            decide(&transient(), 2, 3),
            Verdict::FailAndDeadLetter { code: ErrorCode::GpuUnavailable, .. }
        ));
    }

    #[test]
    fn retry_after_stretches_the_delay() {
        let e = TaskError::Gpu(GpuError::Transient {
            message: "429".into(),
            retry_after: Some(Duration::from_secs(30)),
            timed_out: false,
        });
        assert_eq!(decide(&e, 0, 5), Verdict::RetryLater { delay: Duration::from_secs(30), attempt: 1 });
    }

    #[test]
    fn breaker_open_waits_without_spending_an_attempt() {
        let e = TaskError::Gpu(GpuError::BreakerOpen);
        assert_eq!(decide(&e, 2, 3), Verdict::RetryLater { delay: Duration::from_secs(4), attempt: 2 });
    }

    #[test]
    fn final_errors_fail_at_once() {
        let refused = TaskError::Gpu(GpuError::Invalid { status: 400, message: "too long".into() });
        assert!(matches!(decide(&refused, 0, 5), Verdict::Fail { code: ErrorCode::InvalidRequest, .. }));
        assert!(matches!(
            decide(&TaskError::OutputInvalid("x".into()), 0, 5),
            Verdict::Fail { code: ErrorCode::OutputInvalid, .. }
        ));
        assert!(matches!(
            decide(&TaskError::Gpu(GpuError::Deadline), 0, 5),
            Verdict::Fail { code: ErrorCode::DeadlineExceeded, .. }
        ));
        // A runaway answer is the output's fault: failed at once, not retried.
        assert!(matches!(
            decide(&TaskError::Gpu(GpuError::Oversized { cap: 1 << 20 }), 0, 5),
            Verdict::Fail { code: ErrorCode::OutputInvalid, .. }
        ));
    }

    #[test]
    fn context_keeps_the_root_decision() {
        let e = transient().with_context("quorum not reached".into());
        assert!(matches!(decide(&e, 0, 5), Verdict::RetryLater { .. }));
        assert!(e.to_string().starts_with("quorum not reached"));
    }
}
