//! The scheduler's metrics: results recorded (and, from them, the contract's
//! WES metrics fleet-wide), submissions, and queue depth / consumers per queue
//! from passive declares.

use std::sync::atomic::{AtomicI64, AtomicU64};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindStatus {
    pub kind: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    pub queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub recorded: Family<KindStatus, Counter>,
    pub duplicates: Counter,
    pub failures: Family<CodeLabel, Counter>,
    pub submitted: Counter,
    pub queue_messages: Family<QueueLabel, Gauge<i64, AtomicI64>>,
    pub queue_consumers: Family<QueueLabel, Gauge<i64, AtomicI64>>,
    pub parked: Gauge<i64, AtomicI64>,
    pub live_workers: Gauge<i64, AtomicI64>,
    pub redis_data_loss: Counter,
    pub works_opened: Counter<u64, AtomicU64>,
    pub interpreter_latency: Histogram,
    pub proposals_accepted: Counter<u64, AtomicU64>,
    pub semantic_confirmations: Counter<u64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::default();
        let recorded = Family::<KindStatus, Counter>::default();
        r.register(
            "flota_results_recorded",
            "Results recorded once per task id, by kind and status",
            recorded.clone(),
        );
        let duplicates = Counter::default();
        r.register("flota_results_duplicate", "Result messages for ids already recorded", duplicates.clone());
        let failures = Family::<CodeLabel, Counter>::default();
        r.register("flota_task_failures", "Failed tasks by error code", failures.clone());
        let submitted = Counter::default();
        r.register("flota_tasks_submitted", "Tasks accepted by POST /v1/tasks", submitted.clone());
        let queue_messages = Family::<QueueLabel, Gauge<i64, AtomicI64>>::default();
        r.register("flota_queue_messages", "Messages ready in each Flota queue", queue_messages.clone());
        let queue_consumers = Family::<QueueLabel, Gauge<i64, AtomicI64>>::default();
        r.register("flota_queue_consumers", "Consumers of each Flota queue", queue_consumers.clone());
        let parked = Gauge::default();
        r.register("flota_parked_tasks", "Tasks waiting for their dependencies", parked.clone());
        let live_workers = Gauge::default();
        r.register("flota_live_workers", "Workers with a fresh heartbeat", live_workers.clone());
        let redis_data_loss = Counter::default();
        r.register(
            "flota_redis_data_loss",
            "Times the scheduler found Redis had lost Flota's data (epoch marker gone)",
            redis_data_loss.clone(),
        );
        let works_opened = Counter::default();
        r.register(
            "wes_works_opened",
            "Interpretations whose intent is open_work (fleet-wide)",
            works_opened.clone(),
        );
        let interpreter_latency = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        r.register(
            "wes_interpreter_latency_seconds",
            "One interpretation, GPU call included (fleet-wide, from results)",
            interpreter_latency.clone(),
        );
        let proposals_accepted = Counter::default();
        r.register("wes_proposals_accepted", "Deliberation winners (fleet-wide)", proposals_accepted.clone());
        let semantic_confirmations = Counter::default();
        r.register(
            "wes_semantic_confirmations",
            "Interpretations whose intent is confirm (fleet-wide)",
            semantic_confirmations.clone(),
        );
        Metrics {
            registry: r,
            recorded,
            duplicates,
            failures,
            submitted,
            queue_messages,
            queue_consumers,
            parked,
            live_workers,
            redis_data_loss,
            works_opened,
            interpreter_latency,
            proposals_accepted,
            semantic_confirmations,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
