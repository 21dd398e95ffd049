//! The worker's metrics: the contract's four WES metrics plus `flota_` fleet
//! metrics, in one explicit prometheus-client registry served on `/metrics`.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindOutcome {
    pub kind: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub works_opened: Counter,
    pub interpreter_latency: Histogram,
    pub proposals_accepted: Counter,
    pub semantic_confirmations: Counter,
    pub tasks: Family<KindOutcome, Counter>,
    pub task_duration: Family<KindLabel, Histogram>,
    pub gpu_requests: Family<OutcomeLabel, Counter>,
    pub gpu_request_duration: Histogram,
    pub gpu_retries: Counter,
    pub in_flight: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub dead_letters: Family<ReasonLabel, Counter>,
    pub retries_scheduled: Counter,
    pub rereported: Counter,
    pub fenced: Counter,
    pub lock_waits: Counter,
    pub busy_retries: Counter,
    pub breaker_state: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub breaker_transitions: Family<StateLabel, Counter>,
    pub consuming_deliberations: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// The prefetch of this worker's active consumers (lanes), by kind.
    pub prefetch: Family<KindLabel, Gauge<i64, std::sync::atomic::AtomicI64>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub to: String,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.005, 2.0, 14)
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let works_opened = Counter::<u64, AtomicU64>::default();
        let interpreter_latency = Histogram::new(latency_buckets());
        let proposals_accepted = Counter::<u64, AtomicU64>::default();
        let semantic_confirmations = Counter::<u64, AtomicU64>::default();
        // prometheus-client appends `_total` to counters itself.
        registry.register(
            "wes_works_opened",
            "Interpretations whose intent is open_work",
            works_opened.clone(),
        );
        registry.register(
            "wes_interpreter_latency_seconds",
            "One interpretation, GPU call included",
            interpreter_latency.clone(),
        );
        registry.register("wes_proposals_accepted", "Deliberation winners", proposals_accepted.clone());
        registry.register(
            "wes_semantic_confirmations",
            "Interpretations whose intent is confirm",
            semantic_confirmations.clone(),
        );

        let tasks = Family::<KindOutcome, Counter>::default();
        registry.register("flota_tasks", "Tasks finished by kind and outcome", tasks.clone());
        let task_duration =
            Family::<KindLabel, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()));
        registry.register(
            "flota_task_duration_seconds",
            "Task execution time by kind",
            task_duration.clone(),
        );
        let gpu_requests = Family::<OutcomeLabel, Counter>::default();
        registry.register("flota_gpu_requests", "GPU requests by outcome", gpu_requests.clone());
        let gpu_request_duration = Histogram::new(latency_buckets());
        registry.register(
            "flota_gpu_request_duration_seconds",
            "GPU request duration",
            gpu_request_duration.clone(),
        );
        let gpu_retries = Counter::default();
        registry.register(
            "flota_gpu_retries",
            "GPU requests retried inside a task attempt",
            gpu_retries.clone(),
        );
        let in_flight = Gauge::default();
        registry.register("flota_tasks_in_flight", "Tasks this worker is running now", in_flight.clone());
        let dead_letters = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "flota_dead_letters",
            "Messages this worker dead-lettered, by reason",
            dead_letters.clone(),
        );
        let retries_scheduled = Counter::default();
        registry.register(
            "flota_task_retries",
            "Task attempts rescheduled through a delay queue",
            retries_scheduled.clone(),
        );
        let rereported = Counter::default();
        registry.register(
            "flota_results_rereported",
            "Deliveries answered from a stored result without a GPU call",
            rereported.clone(),
        );
        let fenced = Counter::default();
        registry.register(
            "flota_fenced_results",
            "Late results refused by the fencing token",
            fenced.clone(),
        );
        let lock_waits = Counter::default();
        registry.register(
            "flota_lock_waits",
            "Deliveries that found their task or a lock key held: they wait (a lock key in its wait list)",
            lock_waits.clone(),
        );
        let busy_retries = Counter::default();
        registry.register(
            "flota_busy_retries",
            "Deliveries whose task another attempt was running (a duplicate), looked at again via a delay queue",
            busy_retries.clone(),
        );

        let breaker_state = Gauge::default();
        registry.register(
            "flota_breaker_state",
            "GPU circuit breaker as this replica acts on it: 0 closed, 1 open, 2 half-open",
            breaker_state.clone(),
        );
        let breaker_transitions = Family::<StateLabel, Counter>::default();
        registry.register(
            "flota_breaker_transitions",
            "GPU breaker transitions by new state",
            breaker_transitions.clone(),
        );
        let consuming_deliberations = Gauge::default();
        registry.register(
            "flota_consuming_deliberations",
            "1 while this worker consumes the deliberation queue (0: paused by the breaker)",
            consuming_deliberations.clone(),
        );
        let prefetch = Family::<KindLabel, Gauge<i64, std::sync::atomic::AtomicI64>>::default();
        registry.register(
            "flota_prefetch",
            "Prefetch of this worker's consumers of a queue, by kind: its share of FLOTA_CONCURRENCY",
            prefetch.clone(),
        );
        Metrics {
            breaker_state,
            prefetch,
            breaker_transitions,
            consuming_deliberations,
            registry,
            works_opened,
            interpreter_latency,
            proposals_accepted,
            semantic_confirmations,
            tasks,
            task_duration,
            gpu_requests,
            gpu_request_duration,
            gpu_retries,
            in_flight,
            dead_letters,
            retries_scheduled,
            rereported,
            fenced,
            lock_waits,
            busy_retries,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn task_finished(&self, kind: &str, outcome: &str, elapsed: Duration) {
        self.tasks.get_or_create(&KindOutcome { kind: kind.into(), outcome: outcome.into() }).inc();
        self.task_duration.get_or_create(&KindLabel { kind: kind.into() }).observe(elapsed.as_secs_f64());
    }
}

impl crate::gpu::CallObserver for Metrics {
    fn on_call(&self, outcome: &'static str, elapsed: Duration) {
        self.gpu_requests.get_or_create(&OutcomeLabel { outcome: outcome.into() }).inc();
        self.gpu_request_duration.observe(elapsed.as_secs_f64());
    }

    fn on_retry(&self) {
        self.gpu_retries.inc();
    }
}

impl crate::breaker::TransitionObserver for Metrics {
    fn on_transition(&self, to: crate::breaker::BreakerState) {
        self.breaker_transitions.get_or_create(&StateLabel { to: to.as_str().into() }).inc();
    }
}
