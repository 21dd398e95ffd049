//! Releasing parked tasks: when a result is recorded, the tasks waiting on it
//! are republished (all their dependencies succeeded) or failed with
//! `dependency_failed`; parked tasks past their deadline fail with
//! `dependency_timeout`. Failures are published as results, so they propagate
//! transitively through this same path. No polling of dependencies: the only
//! timer is the deadline sweep.
//!
//! Every hand-off goes through Redis (`releasing` / `failing`) before it is
//! published and is cleared only after the publish is confirmed; on start the
//! scheduler finishes any hand-off a crash left behind.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use flota_shared::amqp::{self, Topology};
use flota_shared::envelope::{self, ErrorBody, ErrorCode, Kind, ResultEnvelope, Status, Usage};
use flota_shared::store::{Handoff, Store};
use flota_shared::telemetry::TraceParent;

/// How often parked tasks are checked against their dependency deadline.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// A task envelope's kind; `interpret` when it has none that parses.
fn kind_of(task: &serde_json::Value) -> Kind {
    task["kind"].as_str().and_then(Kind::parse).unwrap_or(Kind::Interpret)
}

#[derive(Clone)]
pub struct Dependencies {
    pub store: Store,
    pub broker: crate::broker::Broker,
    pub topo: Topology,
}

impl Dependencies {
    /// Publish what recording `id`'s result released or failed (see
    /// `store.record`, which moved them to the hand-off hashes atomically). A
    /// failed publish is retried by the sweep: the hand-off stays in Redis.
    pub async fn on_recorded(&self, id: &str, handoffs: Vec<Handoff>) {
        for h in handoffs {
            let why = format!("dependency `{id}` failed");
            if let Err(e) = self.complete(&h, ErrorCode::DependencyFailed, &why).await {
                tracing::warn!(message = "Hand-off not published yet; the sweep retries it.", task_id = %h.id, error = %e);
            }
        }
    }

    /// Republish a released task, or report a failed one; then clear the hand-off.
    pub async fn complete(&self, h: &Handoff, code: ErrorCode, why: &str) -> anyhow::Result<()> {
        if h.release {
            let task: serde_json::Value = serde_json::from_str(&h.body).unwrap_or_default();
            let trace = TraceParent::new_root();
            tracing::info!(message = "Releasing a waiting task (dependencies done or lock key free).", task_id = %h.id, trace_id = %trace.trace_id);
            self.broker
                .publisher()
                .await?
                .publish(
                    &self.topo.tasks_exchange(),
                    kind_of(&task).as_str(),
                    h.body.as_bytes(),
                    amqp::task_properties(&h.id, &trace.header(), 0),
                )
                .await?;
        } else {
            tracing::info!(message = "Failing a task whose dependency cannot succeed.", task_id = %h.id, code = code.as_str());
            self.report_failure(&h.id, h.body.as_bytes(), code, why).await?;
        }
        self.store.handoff_done(h).await?;
        Ok(())
    }

    /// Fail a task the fleet will not run, with a result like any other failure: stored
    /// unless the task already has one (the stored result wins, and is what is
    /// published), then published to `P.results`, where the scheduler records it
    /// and fails its dependents in turn. `task_body` is the task's envelope, for its
    /// kind and `meta` (a body that does not parse gives `interpret` and none).
    pub async fn report_failure(
        &self,
        id: &str,
        task_body: &[u8],
        code: ErrorCode,
        why: &str,
    ) -> anyhow::Result<()> {
        let task: serde_json::Value = serde_json::from_slice(task_body).unwrap_or_default();
        let kind = kind_of(&task);
        let trace = TraceParent::new_root();
        let now = envelope::now_rfc3339();
        let meta = serde_json::from_value(task["meta"].clone()).unwrap_or_default();
        let result = ResultEnvelope {
            v: 1,
            id: id.to_string(),
            kind,
            status: Status::Failed,
            output: None,
            error: Some(ErrorBody { code, message: why.to_string() }),
            attempts: 0,
            worker: "scheduler".into(),
            trace_id: trace.trace_id.clone(),
            started_at: now.clone(),
            finished_at: now,
            usage: Usage::default(),
            meta,
        };
        let stored = self.store.store_result(id, "failed", &result.to_json()).await?;
        self.broker
            .publisher()
            .await?
            .publish(
                &self.topo.results_exchange(),
                "",
                stored.as_bytes(),
                amqp::message_properties(id, &trace.header()),
            )
            .await?;
        Ok(())
    }

    /// Finish hand-offs a crash left between Redis and the broker.
    pub async fn recover(&self) -> anyhow::Result<usize> {
        let pending = self.store.pending_handoffs().await?;
        let n = pending.len();
        for h in pending {
            self.complete(&h, ErrorCode::DependencyFailed, "a dependency failed").await?;
        }
        Ok(n)
    }

    /// Fail parked tasks whose dependencies did not arrive in time.
    pub async fn sweep(&self) -> anyhow::Result<usize> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let due = self.store.expire_parked(now_ms, 500).await?;
        let n = due.len();
        for h in due {
            self.complete(&h, ErrorCode::DependencyTimeout, "a dependency did not succeed in time").await?;
        }
        Ok(n)
    }

    /// The deadline sweep, until shutdown. Recovers leftovers first.
    pub async fn run(self, shutdown: CancellationToken) {
        match self.recover().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(message = "Finished hand-offs left by a previous run.", count = n),
            Err(e) => tracing::warn!(message = "Cannot recover hand-offs yet.", error = %e),
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(SWEEP_EVERY) => {}
            }
            if let Err(e) = self.sweep().await {
                tracing::warn!(message = "Dependency deadline sweep failed.", error = %e);
            }
            // Waiters of lock keys whose holder died (its lease ran out) join the hand-offs.
            match self.store.wake_orphaned_waiters(500).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(message = "Woke tasks waiting for lock keys nobody holds.", count = n)
                }
                Err(e) => tracing::warn!(message = "Lock-wait sweep failed.", error = %e),
            }
            // Hand-offs whose publish failed (broker away) are retried here.
            if let Err(e) = self.recover().await {
                tracing::warn!(message = "Cannot finish pending hand-offs yet.", error = %e);
            }
        }
    }
}
