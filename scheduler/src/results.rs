//! Consumes `P.results` (and `plan.approved` events, and its copy of the dead
//! letters: `crate::deadletters`): records each task's result once, releases
//! or fails its dependents, publishes the plan and failure events. A
//! supervisor loop reconnects, re-declares, re-applies prefetch and
//! re-consumes after any connection or consumer error; a result is acked only
//! after the record is in Redis, on its own channel, in batches
//! (`flota_shared::acks`).

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use tracing::Instrument;

use flota_shared::acks::AckBatcher;
use flota_shared::amqp::{self, HEADER_ERROR, HEADER_REASON, long_string, with_headers};
use flota_shared::envelope::{ErrorCode, Intent, Kind, ResultEnvelope, Status};
use flota_shared::telemetry::TraceParent;

use crate::plans::{self, PlanApproved};
use crate::state::AppState;

/// Results are small: a deep prefetch keeps the scheduler from being the bottleneck.
pub const PREFETCH: u16 = 512;
/// How long a recorded result's ack may wait to share a `multiple` ack with
/// the next ones. Far below what the prefetch allows: at 2,500 results/s, 50
/// unacked extra against 512. It delays the broker's view only; the result is
/// already recorded, and a redelivery after a crash is answered as a duplicate.
const ACK_WINDOW: Duration = Duration::from_millis(20);
/// How long the results loop waits, after a delivery wakes it, before it
/// takes what else has arrived and handles them together. Each wake-up of the
/// loop is a thread switch from lapin's I/O thread, and each lone record is a
/// Redis round trip with a wake-up of its own; at a few hundred results a
/// second they arrive a few milliseconds apart, so a short wait lets one
/// wake-up and one Redis write serve several. It delays the record (and the
/// release of dependents) by at most this; at high rates the loop is busy and
/// the wait is filled anyway.
const GATHER_WINDOW: Duration = Duration::from_millis(5);
/// Tries at recording one result before it goes back to its queue. A
/// nack-requeue counts toward the queue's delivery limit, so a Redis restart
/// is waited out here (about 11 s per delivery) rather than by requeueing.
const RECORD_ATTEMPTS: u32 = 10;
const RECORD_BACKOFF_FIRST: Duration = Duration::from_millis(100);
const RECORD_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// The supervisor's reconnect backoff, and how long a session must have run
/// for the next failure to start again from the first delay.
const RECONNECT_FIRST: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(10);
const HEALTHY_SESSION: Duration = Duration::from_secs(30);

/// Run until `shutdown`; then stop consuming and finish the deliveries in hand.
pub async fn run(state: AppState, shutdown: CancellationToken) {
    // Shared, not cloned, into each delivery's task: a clone copies the whole config.
    let state = Arc::new(state);
    let tracker = TaskTracker::new();
    let mut delay = RECONNECT_FIRST;
    while !shutdown.is_cancelled() {
        let began = tokio::time::Instant::now();
        match session(&state, &shutdown, &tracker).await {
            Ok(()) => break,
            Err(e) => {
                if began.elapsed() >= HEALTHY_SESSION {
                    delay = RECONNECT_FIRST;
                }
                tracing::warn!(message = "Results session ended; reconnecting.", error = %e, delay_ms = delay.as_millis() as u64);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => {}
                }
                delay = next_delay(delay, RECONNECT_MAX);
            }
        }
    }
    tracker.close();
    let _ = tokio::time::timeout(state.config.shutdown_grace, tracker.wait()).await;
}

/// What the scheduler consumes, declared (idempotently): the contract's topology
/// with `P.results`, and its own `P.plans` bound to `plan.approved` on `P.events`.
/// Until that binding exists an approved plan published to `P.events` is routed
/// nowhere, so `main` declares this once before it says it is listening, and
/// each results session again before it consumes.
pub async fn declare_own_topology(
    conn: &lapin::Connection,
    topo: &amqp::Topology,
    delivery_limit: u32,
) -> anyhow::Result<()> {
    amqp::declare_topology(conn, topo, delivery_limit).await?;
    let channel = conn.create_channel().await?;
    // The scheduler's own queue for approved plans.
    let plans_dead_letter_to = Some(topo.dead_letter_exchange());
    let approved = (topo.events_exchange(), plans::EVENT_APPROVED);
    declare_bound_queue(&channel, &topo.plans_queue(), plans_dead_letter_to, approved).await?;
    // Its own copy of every dead letter (crate::deadletters): no delivery limit, no
    // dead-lettering of its own; a copy it cannot handle yet goes back to it.
    let every_dead_letter = (topo.dead_letter_exchange(), "");
    declare_bound_queue(&channel, &topo.dead_watch_queue(), None, every_dead_letter).await?;
    // Its own channel: a refusal closes only this one.
    let _ = channel.close(200, ShortString::from("declared")).await;
    Ok(())
}

/// A durable quorum queue of the scheduler's own, bound to `(exchange, routing key)`.
async fn declare_bound_queue(
    channel: &lapin::Channel,
    queue: &str,
    dead_letter_exchange: Option<String>,
    (exchange, routing_key): (String, &str),
) -> lapin::Result<()> {
    let mut args = FieldTable::default();
    args.insert(ShortString::from("x-queue-type"), AMQPValue::LongString("quorum".into()));
    if let Some(dlx) = dead_letter_exchange {
        args.insert(ShortString::from("x-dead-letter-exchange"), AMQPValue::LongString(dlx.into()));
    }
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    channel.queue_declare(ShortString::from(queue), durable, args).await?;
    channel
        .queue_bind(
            ShortString::from(queue),
            ShortString::from(exchange),
            ShortString::from(routing_key),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// Declare [`declare_own_topology`] on a connection of its own, within `within`;
/// a broker that is down or slow is left to the results session, which retries.
pub async fn declare_at_start(
    config: &flota_shared::config::Config,
    topo: &amqp::Topology,
    within: Duration,
) {
    let declared = tokio::time::timeout(within, async {
        let conn = amqp::connect(config, "flota-scheduler declare").await?;
        let declared = declare_own_topology(&conn, topo, config.delivery_limit).await;
        let _ = conn.close(200, ShortString::from("declared")).await;
        declared
    })
    .await;
    match declared {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(message = "Cannot declare the topology at start; the results session will.", error = %e)
        }
        Err(_) => tracing::warn!(
            message = "The broker did not answer at start; the results session will declare the topology.",
            within_s = within.as_secs()
        ),
    }
}

/// A channel of its own with `prefetch`, consuming `queue` as `tag`.
async fn consume_on(
    conn: &lapin::Connection,
    queue: &str,
    tag: &str,
    prefetch: u16,
) -> lapin::Result<(lapin::Channel, lapin::Consumer)> {
    let channel = conn.create_channel().await?;
    let consumer = amqp::consume_with_prefetch(&channel, queue, tag, prefetch).await?;
    Ok((channel, consumer))
}

/// Which of the session's consumers a delivery came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// `P.results`: acked in batches ([`AckBatcher`]).
    Result,
    /// `P.plans`: `plan.approved` events.
    Plan,
    /// `P.dead.watch`: the scheduler's copy of every dead letter.
    DeadLetter,
}

async fn session(
    state: &Arc<AppState>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<()> {
    let topo = state.broker.topology().clone();
    let conn = amqp::connect(&state.config, "flota-scheduler consume").await?;
    declare_own_topology(&conn, &topo, state.config.delivery_limit).await?;
    let (channel, results) = consume_on(&conn, &topo.results_queue(), "flota-scheduler", PREFETCH).await?;
    let (_plans_channel, approved) =
        consume_on(&conn, &topo.plans_queue(), "flota-scheduler-plans", 16).await?;
    let (_dead_channel, dead) =
        consume_on(&conn, &topo.dead_watch_queue(), "flota-scheduler-dead", 16).await?;
    let mut deliveries = futures::stream::select(
        futures::stream::select(results.map(|d| (Source::Result, d)), approved.map(|d| (Source::Plan, d))),
        dead.map(|d| (Source::DeadLetter, d)),
    );
    // The results channel has this one consumer for its whole life, as the batcher needs.
    let acks = AckBatcher::new(channel.clone(), ACK_WINDOW);
    // Not a child of `shutdown`: the deliveries finished during the drain still need it.
    // Cancelled when the session ends, whatever ended it, and awaited there.
    let stop_acks = CancellationToken::new();
    let flusher = tokio::spawn(acks.clone().run(stop_acks.clone()));
    tracing::info!(message = "Consuming results.", prefix = %topo.prefix());

    let mut gathered = Vec::new();
    let outcome = loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            next = deliveries.next() => next,
        };
        // Let the ones close behind arrive before looking again (see GATHER_WINDOW).
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(GATHER_WINDOW) => {}
        }
        let mut next = first;
        let ended = loop {
            match next {
                Some((source, Ok(delivery))) => {
                    if source == Source::Result {
                        acks.delivered(&delivery);
                    }
                    gathered.push((source, delivery));
                }
                Some((_, Err(e))) => break Some(anyhow::anyhow!("consumer error: {e}")),
                None => break Some(anyhow::anyhow!("consumer stream ended")),
            }
            match deliveries.next().now_or_never() {
                Some(ready) => next = ready,
                None => break None,
            }
        };
        // Spawned in one go, so their Redis commands share a write and their replies a wake-up.
        for (source, delivery) in gathered.drain(..) {
            let (state, shutdown, acks) = (Arc::clone(state), shutdown.clone(), acks.clone());
            // Boxed: the future is ~11 KB, and tokio::spawn moved it by value several
            // times (a few per cent of the time; half of callgrind's count, which
            // counts a large copy one instruction per byte).
            tracker.spawn(Box::pin(async move {
                match source {
                    Source::Result => handle_result(&state, delivery, &shutdown, &acks).await,
                    Source::Plan => handle_plan(&state, delivery).await,
                    Source::DeadLetter => crate::deadletters::handle(&state, delivery).await,
                }
            }));
        }
        if let Some(e) = ended {
            break Err(e);
        }
    };
    if outcome.is_ok() {
        tracker.close();
        let _ = tokio::time::timeout(state.config.shutdown_grace, tracker.wait()).await;
    }
    // Sends what the drained deliveries made ready (on a failed session: nothing reaches the broker).
    stop_acks.cancel();
    let _ = flusher.await;
    if outcome.is_ok() {
        let _ = conn.close(200, ShortString::from("shutdown")).await;
    }
    outcome
}

async fn dead_letter(
    state: &AppState,
    delivery: &Delivery,
    reason: ErrorCode,
    error: &str,
) -> anyhow::Result<()> {
    let props = with_headers(
        &delivery.properties,
        &[(HEADER_REASON, long_string(reason.as_str())), (HEADER_ERROR, long_string(error))],
    );
    state
        .broker
        .publisher()
        .await?
        .publish(&state.broker.topology().dead_letter_exchange(), "", &delivery.data, props)
        .await?;
    Ok(())
}

/// A short pause (a fault is likely still there), then back to the queue.
const REQUEUE_PAUSE: Duration = Duration::from_millis(500);

async fn retry_later(delivery: Delivery) {
    tokio::time::sleep(REQUEUE_PAUSE).await;
    let _ = delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
}

/// [`retry_later`] for a result, through its channel's batcher.
async fn retry_result_later(acks: &AckBatcher, delivery: Delivery) {
    tokio::time::sleep(REQUEUE_PAUSE).await;
    let _ = acks.nack(&delivery, true).await;
}

/// Why a body did not parse, for logs and the `x-flota-error` header, without
/// any of its values: serde's message quotes the offending value (`invalid
/// type: string "…"`, an unknown variant's name), which may be prompt text
/// (pure). Only a missing field is named: its name is the schema's.
fn json_problem(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Data if e.to_string().starts_with("missing field `") => {
            e.to_string().split(" at line ").next().unwrap_or_default().to_string()
        }
        Category::Data => "a field has the wrong type or value, or is unknown".to_string(),
        Category::Syntax => "not valid JSON".to_string(),
        Category::Eof => "truncated JSON".to_string(),
        Category::Io => "unreadable".to_string(),
    };
    format!("{what} at line {} column {}", e.line(), e.column())
}

/// Doubled, up to `max` (pure).
pub fn next_delay(delay: Duration, max: Duration) -> Duration {
    (delay * 2).min(max)
}

async fn handle_result(
    state: &AppState,
    delivery: Delivery,
    shutdown: &CancellationToken,
    acks: &AckBatcher,
) {
    let result: ResultEnvelope = match serde_json::from_slice(&delivery.data) {
        Ok(r) => r,
        Err(e) => {
            let why = format!("not a result envelope: {}", json_problem(&e));
            tracing::warn!(message = "Unreadable result dead-lettered.", error = %why);
            match dead_letter(state, &delivery, ErrorCode::InvalidTask, &why).await {
                Ok(()) => acks.ack(&delivery),
                Err(_) => retry_result_later(acks, delivery).await,
            }
            return;
        }
    };
    // A child of the worker's publish span (its traceparent header), in the result's trace.
    let parent = amqp::header_str(&delivery.properties, amqp::HEADER_TRACEPARENT)
        .and_then(|h| TraceParent::parse(&h))
        .filter(|tp| tp.trace_id == result.trace_id)
        .unwrap_or_else(|| trace_of(&result));
    let span = tracing::info_span!("record", task_id = %result.id, trace_id = %result.trace_id, status = result.status.as_str());
    flota_shared::telemetry::set_remote_parent(&span, &parent);
    record_and_ack(state, delivery, result, shutdown, acks).instrument(span).await
}

async fn record_and_ack(
    state: &AppState,
    delivery: Delivery,
    result: ResultEnvelope,
    shutdown: &CancellationToken,
    acks: &AckBatcher,
) {
    let recorded = match record(state, &result, &delivery.data, shutdown).await {
        Ok(recorded) => recorded,
        Err(e) => {
            tracing::warn!(message = "Cannot record result; Redis unavailable. Returning it to the queue.", task_id = %result.id, trace_id = %result.trace_id, error = %e);
            return retry_result_later(acks, delivery).await;
        }
    };
    if recorded.first {
        on_first_record(state, &result, &delivery.data).await;
    } else {
        state.metrics.duplicates.inc();
    }
    // Released in the same Lua step as the record; their publish is crash-safe (hand-off hashes).
    state.deps.on_recorded(&result.id, recorded.handoffs).await;
    if let Err(e) = plans::on_result(&state.store, &state.broker, &result).await {
        tracing::warn!(message = "Plan events not published yet.", task_id = %result.id, trace_id = %result.trace_id, error = %e);
        return retry_result_later(acks, delivery).await;
    }
    // Only now, on the channel it came from, is the result the scheduler's.
    acks.ack(&delivery);
}

/// `store.record` (once per id, releasing dependents, in Lua), retried in
/// place with backoff while Redis is away; gives up early on shutdown so the
/// drain is not held up.
async fn record(
    state: &AppState,
    result: &ResultEnvelope,
    body: &[u8],
    shutdown: &CancellationToken,
) -> Result<flota_shared::store::Recorded, flota_shared::store::StoreError> {
    let token = flota_shared::store::new_token();
    let mut delay = RECORD_BACKOFF_FIRST;
    let mut attempt = 1;
    loop {
        match state.store.record(&result.id, result.status.as_str(), body, &token).await {
            Ok(recorded) => return Ok(recorded),
            Err(e) if attempt >= RECORD_ATTEMPTS || shutdown.is_cancelled() => return Err(e),
            Err(e) => {
                tracing::debug!(message = "Record failed; retrying.", task_id = %result.id, attempt, error = %e);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => {}
                }
                delay = next_delay(delay, RECORD_BACKOFF_MAX);
                attempt += 1;
            }
        }
    }
}

/// The hook for what happens once per task id, when its result is first
/// recorded: metrics, the dashboard's activity and, for a failure, the
/// `task.failed` event. (Dependents were released by the record itself, in
/// the same Lua call, on every delivery: see [`handle_result`].)
async fn on_first_record(state: &AppState, result: &ResultEnvelope, body: &[u8]) {
    count(state, result);
    tracing::info!(message = "Result recorded.", task_id = %result.id, trace_id = %result.trace_id, status = result.status.as_str());
    if result.status != Status::Failed {
        return;
    }
    let tp = trace_of(result).child();
    let published = match state.broker.publisher().await {
        Ok(p) => p
            .publish(
                &state.broker.topology().events_exchange(),
                plans::EVENT_TASK_FAILED,
                body,
                amqp::message_properties(&result.id, &tp.header()),
            )
            .await
            .map_err(anyhow::Error::from),
        Err(e) => Err(e),
    };
    // Best effort: the failure itself is recorded; the event is a notification.
    if let Err(e) = published {
        tracing::warn!(message = "task.failed event not published.", task_id = %result.id, trace_id = %result.trace_id, error = %e);
    }
}

/// The result's trace, continued (a new root if its trace id is not valid).
fn trace_of(result: &ResultEnvelope) -> TraceParent {
    // The span id is a placeholder: only the trace id travels in a result.
    TraceParent::parse(&format!("00-{}-{}-01", result.trace_id, "1".repeat(16)))
        .unwrap_or_else(TraceParent::new_root)
}

/// Metrics and the dashboard's activity, once per task id.
fn count(state: &AppState, r: &ResultEnvelope) {
    let m = &state.metrics;
    m.recorded
        .get_or_create(&crate::metrics::KindStatus {
            kind: r.kind.to_string(),
            status: r.status.as_str().into(),
        })
        .inc();
    if let Some(code) = r.error_code() {
        m.failures.get_or_create(&crate::metrics::CodeLabel { code: code.to_string() }).inc();
    }
    match r.kind {
        Kind::Interpret => {
            if let Some(ms) = crate::activity::duration_ms(&r.started_at, &r.finished_at) {
                m.interpreter_latency.observe(ms as f64 / 1000.0);
            }
            // Only the intent is counted: read it in place, not from a copy of the output.
            if let Some(intent) =
                r.output.as_ref().and_then(|o| o.get("intent")).and_then(|i| Intent::deserialize(i).ok())
            {
                match intent {
                    Intent::OpenWork => m.works_opened.inc(),
                    Intent::Confirm => m.semantic_confirmations.inc(),
                    _ => 0,
                };
            }
        }
        Kind::Deliberate => {
            if r.status == Status::Succeeded {
                m.proposals_accepted.inc();
            }
        }
    }
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    state.activity.record(r, now);
}

async fn handle_plan(state: &AppState, delivery: Delivery) {
    let plan: Result<PlanApproved, String> = serde_json::from_slice(&delivery.data)
        .map_err(|e| format!("not a plan.approved event: {}", json_problem(&e)));
    let plan = plan.and_then(|p| {
        let problems = p.problems();
        if problems.is_empty() { Ok(p) } else { Err(problems.join("; ")) }
    });
    let plan = match plan {
        Ok(p) => p,
        Err(why) => {
            tracing::warn!(message = "Invalid plan.approved event dead-lettered.", error = %why);
            match dead_letter(state, &delivery, ErrorCode::InvalidTask, &why).await {
                Ok(()) => {
                    let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                }
                Err(_) => retry_later(delivery).await,
            }
            return;
        }
    };
    let tp = TraceParent::parse_or_new(
        amqp::header_str(&delivery.properties, amqp::HEADER_TRACEPARENT).as_deref(),
    );
    match plans::dispatch(&state.store, &state.broker, &plan, &tp).await {
        Ok(ids) => {
            tracing::info!(message = "Plan dispatched.", plan_id = %plan.plan_id, deliberations = ids.len(), trace_id = %tp.trace_id);
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        }
        Err(e) => {
            tracing::warn!(message = "Plan not dispatched yet.", plan_id = %plan.plan_id, error = %e);
            retry_later(delivery).await;
        }
    }
}

/// Keep the queue gauges, parked count and live workers current for `/metrics`.
pub async fn refresh_gauges(state: AppState, shutdown: CancellationToken) {
    loop {
        for q in state.broker.topology().all_queues() {
            if let Ok((messages, consumers)) = state.broker.queue_info(&q).await {
                let label = crate::metrics::QueueLabel { queue: q };
                state.metrics.queue_messages.get_or_create(&label).set(messages as i64);
                state.metrics.queue_consumers.get_or_create(&label).set(consumers as i64);
            }
        }
        if let Ok(n) = state.store.parked_count().await {
            state.metrics.parked.set(n as i64);
        }
        if let Ok(w) = state.store.workers().await {
            state.metrics.live_workers.set(w.len() as i64);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut d = RECORD_BACKOFF_FIRST;
        let mut total = Duration::ZERO;
        for _ in 1..RECORD_ATTEMPTS {
            total += d;
            d = next_delay(d, RECORD_BACKOFF_MAX);
            assert!(d <= RECORD_BACKOFF_MAX);
        }
        // Long enough to ride out a Redis restart before touching the delivery limit.
        assert!(total >= Duration::from_secs(10), "{total:?}");
    }

    #[test]
    fn parse_errors_carry_no_values() {
        let secret = "s3cret prompt";
        for body in [
            serde_json::json!({"v": 1, "id": "a", "error": secret}).to_string(),
            serde_json::json!({"v": 1, "id": "a", "kind": secret}).to_string(),
            serde_json::json!({"v": secret}).to_string(),
        ] {
            let e = serde_json::from_str::<ResultEnvelope>(&body).unwrap_err();
            assert!(e.to_string().contains(secret), "serde echoes the value: {e}");
            let why = json_problem(&e);
            assert!(!why.contains(secret) && why.contains("at line 1"), "{why}");
        }
        let e = serde_json::from_str::<ResultEnvelope>("{}").unwrap_err();
        assert!(json_problem(&e).starts_with("missing field `"), "{}", json_problem(&e));
        let e = serde_json::from_str::<ResultEnvelope>("{not json").unwrap_err();
        assert!(json_problem(&e).starts_with("not valid JSON at line 1"), "{}", json_problem(&e));
    }

    #[test]
    fn a_results_trace_is_continued() {
        let mut r: ResultEnvelope = serde_json::from_value(serde_json::json!({
            "v": 1, "id": "a", "kind": "interpret", "status": "failed", "output": null,
            "error": {"code": "gpu_unavailable", "message": "m"}, "attempts": 1, "worker": "w",
            "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "started_at": "", "finished_at": "",
            "usage": {"prompt_tokens": 0, "completion_tokens": 0}
        }))
        .unwrap();
        assert_eq!(trace_of(&r).trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        r.trace_id = "not hex".into();
        assert_eq!(trace_of(&r).trace_id.len(), 32);
    }
}
