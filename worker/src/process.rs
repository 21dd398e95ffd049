//! One delivery, start to finish, as a pure-ish pipeline that returns a
//! [`Decision`]; the consumer carries the decision out (publish, then ack).
//!
//! validate → claim (Redis lock + fencing token; a stored result is re-reported
//! without a GPU call) → run the handler under its deadline while the lease is
//! renewed → store the result through the fenced idempotent path → report.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use lapin::BasicProperties;
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use flota_shared::amqp::{HEADER_ATTEMPT, HEADER_TRACEPARENT, header_int, header_str};
use flota_shared::config::Config;
use flota_shared::envelope::{
    self, DeliberateOutput, ErrorBody, ErrorCode, Intent, InterpretOutput, Kind, ResultEnvelope, Status,
    TaskEnvelope, TaskInput, Usage,
};
use flota_shared::store::{Claim, Finish, Handoff, Park, Store};
use flota_shared::telemetry::{TRACE_ONLY, TraceParent};
use tracing::Instrument;

use crate::error::{TaskError, Verdict, decide};
use crate::gpu::GpuClient;
use crate::handlers::{self, HandlerOutput, TaskCtx};
use crate::metrics::Metrics;

/// Attempt deadline when the task gives no `timeout_ms`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a task waits before looking again when another attempt holds it.
pub const BUSY_RETRY_DELAY: Duration = Duration::from_secs(1);
/// How long a task waits out an unreachable Redis. It waits in a delay queue,
/// not by nack-requeue: an outage longer than `x-delivery-limit` requeues would
/// otherwise dead-letter healthy tasks. It spends no attempt.
pub const REDIS_RETRY_DELAY: Duration = Duration::from_secs(4);

/// Redis could not be asked: nothing was decided, look again later.
fn redis_unavailable(attempt: u32) -> Decision {
    Decision::Retry { attempt, delay: REDIS_RETRY_DELAY }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub reason: ErrorCode,
    pub error: String,
}

/// What the consumer must do with a delivery. Exactly one per delivery.
#[derive(Debug)]
pub enum Decision {
    /// Publish this result (confirmed), dead-letter a copy if asked, then ack.
    /// `wake`: tasks that waited for a lock key this attempt released; republish them after.
    Report {
        id: String,
        body: Vec<u8>,
        traceparent: String,
        dead_letter: Option<DeadLetter>,
        wake: Vec<Handoff>,
    },
    /// Nothing to report (no usable id): dead-letter, then ack.
    DeadLetter(DeadLetter),
    /// Republish through the delay tier for `delay` with this attempt number, then ack.
    Retry { attempt: u32, delay: Duration },
    /// Give the delivery back to the broker un-processed (shutdown, lost lease).
    HandBack,
    /// Parked in Redis until its dependencies are done, or queued behind a held
    /// lock key: ack, publish nothing (the release republishes it).
    Parked,
}

/// Everything a delivery needs; shared by all of a worker's tasks.
pub struct WorkerCtx {
    pub config: Config,
    pub store: Store,
    pub gpu: GpuClient,
    pub metrics: Arc<Metrics>,
    /// Fault injection for tests (`FLOTA_FAULT_PANIC_ID`): the handler of this task id panics.
    pub panic_on: Option<String>,
}

/// Decide what to do with one delivery. Runs inside the caller's `consume`
/// span, whose `task_id`, `kind` and `attempt` it records once they are read.
pub async fn process(
    ctx: &WorkerCtx,
    body: &[u8],
    props: &BasicProperties,
    trace: TraceParent,
    hand_back: &CancellationToken,
) -> Decision {
    if let Some(ct) = props.content_type().as_ref().map(|c| c.as_str().to_ascii_lowercase())
        && !(ct.is_empty() || ct.starts_with("application/json"))
    {
        return Decision::DeadLetter(DeadLetter {
            reason: ErrorCode::InvalidTask,
            error: format!(
                "content type `{}` is not application/json",
                ct.chars().take(64).collect::<String>()
            ),
        });
    }
    let attempt = header_int(props, HEADER_ATTEMPT).unwrap_or(0).clamp(0, 1000) as u32;

    let task = match envelope::parse_task(body) {
        Ok(t) => t,
        Err(rejection) => {
            tracing::warn!(message = "Task rejected.", task_id = rejection.id.as_deref().unwrap_or(""), trace_id = %trace.trace_id, reason = %rejection.code, error = %rejection.message());
            let dead_letter = DeadLetter { reason: rejection.code, error: rejection.message() };
            return match rejection.id.clone() {
                // The id is readable: tell the producer through a failed result too.
                Some(id) => {
                    // Read without building the body as a Value: it may be far over the size limit.
                    let kind = envelope::head_of(body)
                        .kind
                        .as_deref()
                        .and_then(Kind::parse)
                        .unwrap_or(Kind::Interpret);
                    let started = envelope::now_rfc3339();
                    let result = failed_envelope(
                        ctx,
                        &id,
                        kind,
                        &trace,
                        attempt,
                        started,
                        rejection.code,
                        &rejection.message(),
                        Default::default(),
                    );
                    report_new(ctx, &id, result, &trace, Some(dead_letter), attempt).await
                }
                None => Decision::DeadLetter(dead_letter),
            };
        }
    };

    let span = tracing::Span::current();
    span.record("task_id", task.id.as_str());
    span.record("kind", task.kind.as_str());
    span.record("attempt", attempt);
    if !task.depends_on.is_empty()
        && let Some(decision) = check_dependencies(ctx, &task, body, &trace, attempt).await
    {
        return decision;
    }
    run_claimed(ctx, body, task, trace, attempt, hand_back).await
}

/// The span one delivery is processed in, a child of the producer's context.
/// `process` fills in what only the envelope tells.
pub fn consume_span(props: &BasicProperties) -> (tracing::Span, TraceParent) {
    let trace = TraceParent::parse_or_new(header_str(props, HEADER_TRACEPARENT).as_deref());
    let span = tracing::info_span!(
        "consume",
        task_id = tracing::field::Empty,
        trace_id = %trace.trace_id,
        kind = tracing::field::Empty,
        attempt = tracing::field::Empty,
    );
    flota_shared::telemetry::set_remote_parent(&span, &trace);
    (span, trace)
}

/// Park the task until its dependencies succeeded, or fail it when one failed
/// or waiting would be forever. `None` means: run it now.
async fn check_dependencies(
    ctx: &WorkerCtx,
    task: &TaskEnvelope,
    body: &[u8],
    trace: &TraceParent,
    attempt: u32,
) -> Option<Decision> {
    let deadline_ms = epoch_ms() + ctx.config.dependency_timeout.as_millis() as u64;
    let failed = |code: ErrorCode, message: String| {
        failed_envelope_for(ctx, task, trace, attempt, envelope::now_rfc3339(), code, &message)
    };
    match ctx.store.park(&task.id, &task.depends_on, body, deadline_ms).await {
        Ok(Park::Ready) => None,
        Ok(Park::Done(stored)) => {
            ctx.metrics.rereported.inc();
            Some(Decision::Report {
                id: task.id.clone(),
                body: stored.into_bytes(),
                traceparent: trace.child().header(),
                dead_letter: None,
                wake: Vec::new(),
            })
        }
        Ok(Park::Parked(pending)) => {
            tracing::info!(message = "Task parked until its dependencies succeed.", pending);
            Some(Decision::Parked)
        }
        Ok(Park::Failed(dep)) => {
            let result = failed(ErrorCode::DependencyFailed, format!("dependency `{dep}` failed"));
            Some(report_new(ctx, &task.id, result, trace, None, attempt).await)
        }
        Ok(Park::Cycle(dep)) => {
            let result = failed(
                ErrorCode::DependencyCycle,
                format!("waiting on `{dep}` would wait forever: the dependencies form a cycle"),
            );
            Some(report_new(ctx, &task.id, result, trace, None, attempt).await)
        }
        Err(e) => {
            tracing::warn!(message = "Cannot check dependencies; Redis unavailable. Waiting in a delay queue.", error = %e);
            Some(redis_unavailable(attempt))
        }
    }
}

fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn run_claimed(
    ctx: &WorkerCtx,
    raw: &[u8],
    task: TaskEnvelope,
    trace: TraceParent,
    attempt: u32,
    hand_back: &CancellationToken,
) -> Decision {
    let token = flota_shared::store::new_token();
    let lease = ctx.config.lock_lease;
    let locks = ctx.store.lock_set(&task.id, &task.lock_keys);
    let claim = match ctx
        .store
        .claim(
            &task.id,
            &task.lock_keys,
            raw,
            &token,
            lease,
            &ctx.config.worker_id,
            task.kind.as_str(),
            ctx.config.max_attempts,
        )
        .instrument(tracing::info_span!(target: TRACE_ONLY, "lock"))
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(message = "Cannot claim task; Redis unavailable. Waiting in a delay queue.", error = %e);
            return redis_unavailable(attempt);
        }
    };
    let fence = match claim {
        Claim::Done(stored) => {
            ctx.metrics.rereported.inc();
            tracing::info!(message = "Result already stored; re-reporting without a GPU call.");
            return Decision::Report {
                id: task.id,
                body: stored.into_bytes(),
                traceparent: trace.child().header(),
                dead_letter: None,
                wake: Vec::new(),
            };
        }
        Claim::Busy => {
            ctx.metrics.lock_waits.inc();
            ctx.metrics.busy_retries.inc();
            tracing::info!(message = "Task held by another attempt; will look again later.");
            return Decision::Retry { attempt, delay: BUSY_RETRY_DELAY };
        }
        Claim::Queued(key) => {
            // No polling: the holder's unlock hands this body back to the queue.
            ctx.metrics.lock_waits.inc();
            tracing::info!(message = "Lock key held by another task; queued behind it.", lock_key = %key);
            return Decision::Parked;
        }
        Claim::Run(fence) => fence,
        Claim::Abandoned { fence, takeovers } => {
            // Sidekiq Pro's poison pill: a task whose every attempt ends with its worker
            // gone would otherwise kill workers for ever (each redelivery meets the dead
            // attempt's lock, is "busy", and comes back as a new message, so the
            // quorum queue's delivery limit never sees it).
            tracing::error!(message = "Task given up: the attempts before this one were abandoned by their workers.", takeovers, fence = %fence);
            let message = format!(
                "given up after {takeovers} attempts ended without a word: each worker that ran it died or froze (a task that crashes workers?); not run again"
            );
            let code = ErrorCode::InvalidTask;
            let started_at = envelope::now_rfc3339();
            let result = failed_envelope_for(ctx, &task, &trace, attempt, started_at, code, &message);
            let dead_letter = Some(DeadLetter { reason: code, error: message });
            let effect = Effect::Failed(task.kind, Duration::ZERO);
            let held = Held { token, fence, locks, attempt };
            return conclude(ctx, task, &trace, held, result, dead_letter, effect, Duration::ZERO).await;
        }
    };

    let started_at = envelope::now_rfc3339();
    let started = Instant::now();
    let timeout = task.timeout_ms.map(Duration::from_millis).unwrap_or(DEFAULT_TIMEOUT);
    let deadline = started + timeout;
    let tctx = TaskCtx {
        task_id: task.id.clone(),
        deadline,
        traceparent: trace.child().header(),
        output_retries: ctx.config.output_retries,
        gpu: ctx.gpu.clone(),
        checkpoints: Some(ctx.store.clone()),
    };

    ctx.metrics.in_flight.inc();
    let inject_panic = ctx.panic_on.as_deref() == Some(task.id.as_str());
    enum Stop {
        LeaseLost,
        Drain,
    }
    let outcome = tokio::select! {
        out = AssertUnwindSafe(execute(&tctx, &task, inject_panic)).catch_unwind() => Ok(out),
        _ = keep_lease(&ctx.store, &locks, &token, lease) => Err(Stop::LeaseLost),
        _ = hand_back.cancelled() => Err(Stop::Drain),
    };
    ctx.metrics.in_flight.dec();

    let outcome = match outcome {
        Ok(out) => out,
        Err(stop) => {
            // Apply nothing; the task runs again (or already did, under a newer fence).
            let _ = ctx.store.unlock(&task.id, &locks, &task.lock_keys, &token).await;
            if let Stop::LeaseLost = stop {
                ctx.metrics.fenced.inc();
                let _ = ctx.store.note_fenced(&task.id).await;
                tracing::warn!(message = "Lease lost: attempt fenced off before applying anything.", fence = %fence);
            } else {
                tracing::warn!(message = "Drain deadline reached; handing the task back.");
            }
            return Decision::HandBack;
        }
    };
    let outcome = match outcome {
        Ok(r) => r,
        Err(_panic) => {
            tracing::error!(message = "Handler panicked; failing this task only.");
            Err(TaskError::Failed {
                code: ErrorCode::InvalidTask,
                message: "the worker hit an internal error on this task".into(),
            })
        }
    };
    let elapsed = started.elapsed();

    let (result, dead_letter, effect) = match outcome {
        Ok(HandlerOutput { output, usage }) => {
            let effect = Effect::from_output(task.kind, &output, elapsed);
            let env = result_envelope(
                ctx,
                &task,
                &trace,
                attempt,
                started_at,
                Status::Succeeded,
                Some(output),
                None,
                usage,
            );
            (env, None, effect)
        }
        Err(err) => match decide(&err, attempt, ctx.config.max_attempts) {
            Verdict::RetryLater { delay, attempt: next } => {
                let _ = ctx.store.unlock(&task.id, &locks, &task.lock_keys, &token).await;
                ctx.metrics.retries_scheduled.inc();
                tracing::warn!(message = "Attempt failed; retrying later.", error = %err, next_attempt = next, delay_ms = delay.as_millis() as u64);
                return Decision::Retry { attempt: next, delay };
            }
            Verdict::Fail { code, message } => {
                let env = failed_envelope_for(ctx, &task, &trace, attempt, started_at, code, &message);
                (env, None, Effect::Failed(task.kind, elapsed))
            }
            Verdict::FailAndDeadLetter { code, message } => {
                let env = failed_envelope_for(ctx, &task, &trace, attempt, started_at, code, &message);
                (env, Some(DeadLetter { reason: code, error: message }), Effect::Failed(task.kind, elapsed))
            }
        },
    };

    conclude(ctx, task, &trace, Held { token, fence, locks, attempt }, result, dead_letter, effect, elapsed)
        .await
}

/// What an attempt that owns a task holds in Redis, and which attempt it is.
struct Held {
    token: String,
    fence: String,
    locks: Vec<String>,
    attempt: u32,
}

/// Store an owned task's result through the fenced idempotent path, let go of its
/// locks, and say what to report.
#[allow(clippy::too_many_arguments)]
async fn conclude(
    ctx: &WorkerCtx,
    task: TaskEnvelope,
    trace: &TraceParent,
    held: Held,
    result: ResultEnvelope,
    dead_letter: Option<DeadLetter>,
    effect: Effect,
    elapsed: Duration,
) -> Decision {
    let Held { token, fence, locks, attempt } = held;
    let body = result.to_json();
    let finished = ctx.store.finish(&task.id, &token, &fence, result.status.as_str(), &body).await;
    let mut wake = Vec::new();
    if finished.is_ok() && !task.lock_keys.is_empty() {
        // finish.lua freed the task lock; free the resource locks too and take the
        // first waiter of each, republished once this result is out. If that fails,
        // the scheduler's sweep republishes them from the hand-off hash.
        wake = ctx.store.unlock(&task.id, &locks, &task.lock_keys, &token).await.unwrap_or_default();
    }
    match finished {
        Ok(Finish::Applied) => {
            effect.count(&ctx.metrics);
            tracing::info!(
                message = "Task finished.",
                status = result.status.as_str(),
                error_code = result.error_code().map(|c| c.as_str()).unwrap_or(""),
                duration_ms = elapsed.as_millis() as u64
            );
            Decision::Report { id: task.id, body, traceparent: trace.child().header(), dead_letter, wake }
        }
        Ok(Finish::Exists(stored)) => {
            ctx.metrics.rereported.inc();
            Decision::Report {
                id: task.id,
                body: stored.into_bytes(),
                traceparent: trace.child().header(),
                dead_letter: None,
                wake,
            }
        }
        Ok(Finish::Fenced) => {
            ctx.metrics.fenced.inc();
            tracing::warn!(message = "Result fenced off: a newer attempt owns this task; nothing applied.", fence = %fence);
            Decision::Retry { attempt, delay: BUSY_RETRY_DELAY }
        }
        Err(e) => {
            // Nothing applied: the task runs again once Redis answers (its lease, if the
            // unlock fails too, expires first and the claim then succeeds).
            tracing::warn!(message = "Cannot store result; Redis unavailable. Waiting in a delay queue.", error = %e);
            let _ = ctx.store.unlock(&task.id, &locks, &task.lock_keys, &token).await;
            redis_unavailable(attempt)
        }
    }
}

/// Renew the lease every third of its length; returns only when it is lost.
async fn keep_lease(store: &Store, locks: &[String], token: &str, lease: Duration) {
    let mut failures = 0;
    loop {
        tokio::time::sleep(lease / 3).await;
        match store.extend(locks, token, lease).await {
            Ok(true) => failures = 0,
            Ok(false) => {
                tracing::warn!(message = "Task lease lost.");
                return;
            }
            // A transient Redis error: the lease still has time left; give up before it runs out.
            Err(e) => {
                failures += 1;
                tracing::warn!(message = "Lease renewal failed.", error = %e, failures);
                if failures >= 2 {
                    return;
                }
            }
        }
    }
}

async fn execute(tctx: &TaskCtx, task: &TaskEnvelope, inject_panic: bool) -> handlers::HandlerResult {
    assert!(!inject_panic, "injected panic (FLOTA_FAULT_PANIC_ID)");
    let work = async {
        match &task.input {
            TaskInput::Interpret(input) => handlers::interpret::run(tctx, input).await,
            TaskInput::Deliberate(input) => {
                let council = match &tctx.checkpoints {
                    Some(store) => store.council(&input.role).await,
                    None => Ok(flota_shared::council::Council::default_for(&input.role)),
                };
                let council = match council {
                    Ok(Some(c)) => c,
                    Ok(None) => {
                        return Err(TaskError::Failed {
                            code: ErrorCode::InvalidTask,
                            message: format!(
                                "unknown council role `{}`: register it with `flotactl councils set`",
                                input.role
                            ),
                        });
                    }
                    Err(e) => {
                        return Err(TaskError::Gpu(crate::gpu::GpuError::unavailable(format!(
                            "council registry unavailable: {e}"
                        ))));
                    }
                };
                let seats: Vec<_> = council.seats(input.agents as usize).into_iter().cloned().collect();
                handlers::deliberate::run(tctx, input, &seats, council.quorum_of(seats.len())).await
            }
        }
    };
    match tokio::time::timeout_at(tctx.deadline, work).await {
        Ok(r) => r,
        Err(_) => Err(TaskError::Gpu(crate::gpu::GpuError::Deadline)),
    }
}

/// What a finished task counts in the metrics, applied only once per task id.
enum Effect {
    Interpreted(Intent, Duration),
    Deliberated(Duration),
    Failed(Kind, Duration),
}

impl Effect {
    fn from_output(kind: Kind, output: &serde_json::Value, elapsed: Duration) -> Effect {
        match kind {
            // Read in place (`&Value` is a deserializer): no copy of the output.
            Kind::Interpret => InterpretOutput::deserialize(output)
                .map(|o| Effect::Interpreted(o.intent, elapsed))
                .unwrap_or(Effect::Failed(kind, elapsed)),
            Kind::Deliberate => match DeliberateOutput::deserialize(output) {
                Ok(_) => Effect::Deliberated(elapsed),
                Err(_) => Effect::Failed(kind, elapsed),
            },
        }
    }

    fn count(&self, m: &Metrics) {
        match self {
            Effect::Interpreted(intent, elapsed) => {
                m.interpreter_latency.observe(elapsed.as_secs_f64());
                match intent {
                    Intent::OpenWork => m.works_opened.inc(),
                    Intent::Confirm => m.semantic_confirmations.inc(),
                    _ => 0,
                };
                m.task_finished("interpret", "succeeded", *elapsed);
            }
            Effect::Deliberated(elapsed) => {
                m.proposals_accepted.inc();
                m.task_finished("deliberate", "succeeded", *elapsed);
            }
            Effect::Failed(kind, elapsed) => {
                if *kind == Kind::Interpret {
                    m.interpreter_latency.observe(elapsed.as_secs_f64());
                }
                m.task_finished(kind.as_str(), "failed", *elapsed);
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn result_envelope(
    ctx: &WorkerCtx,
    task: &TaskEnvelope,
    trace: &TraceParent,
    attempt: u32,
    started_at: String,
    status: Status,
    output: Option<serde_json::Value>,
    error: Option<ErrorBody>,
    usage: Usage,
) -> ResultEnvelope {
    ResultEnvelope {
        v: 1,
        id: task.id.clone(),
        kind: task.kind,
        status,
        output,
        error,
        attempts: attempt + 1,
        worker: ctx.config.worker_id.clone(),
        trace_id: trace.trace_id.clone(),
        started_at,
        finished_at: envelope::now_rfc3339(),
        usage,
        meta: task.meta.clone(),
    }
}

fn failed_envelope_for(
    ctx: &WorkerCtx,
    task: &TaskEnvelope,
    trace: &TraceParent,
    attempt: u32,
    started_at: String,
    code: ErrorCode,
    message: &str,
) -> ResultEnvelope {
    let mut env = failed_envelope(
        ctx,
        &task.id,
        task.kind,
        trace,
        attempt,
        started_at,
        code,
        message,
        Usage::default(),
    );
    env.meta = task.meta.clone();
    env
}

#[allow(clippy::too_many_arguments)]
fn failed_envelope(
    ctx: &WorkerCtx,
    id: &str,
    kind: Kind,
    trace: &TraceParent,
    attempt: u32,
    started_at: String,
    code: ErrorCode,
    message: &str,
    usage: Usage,
) -> ResultEnvelope {
    ResultEnvelope {
        v: 1,
        id: id.to_string(),
        kind,
        status: Status::Failed,
        output: None,
        error: Some(ErrorBody { code, message: message.chars().take(500).collect() }),
        attempts: attempt + 1,
        worker: ctx.config.worker_id.clone(),
        trace_id: trace.trace_id.clone(),
        started_at,
        finished_at: envelope::now_rfc3339(),
        usage,
        meta: Default::default(),
    }
}

/// Report a result decided before any claim (rejected envelope with a readable
/// id): stored through the same idempotent path so a later valid task with the
/// same id re-reports it rather than running.
async fn report_new(
    ctx: &WorkerCtx,
    id: &str,
    result: ResultEnvelope,
    trace: &TraceParent,
    dead_letter: Option<DeadLetter>,
    attempt: u32,
) -> Decision {
    let token = flota_shared::store::new_token();
    match ctx
        .store
        // Never given up (0): a rejected envelope is not run anyway.
        .claim(id, &[], &[], &token, ctx.config.lock_lease, &ctx.config.worker_id, result.kind.as_str(), 0)
        .await
    {
        Ok(Claim::Done(stored)) => Decision::Report {
            id: id.into(),
            body: stored.into_bytes(),
            traceparent: trace.child().header(),
            dead_letter,
            wake: Vec::new(),
        },
        Ok(Claim::Busy | Claim::Queued(_)) => Decision::Retry { attempt, delay: BUSY_RETRY_DELAY },
        Ok(Claim::Run(fence) | Claim::Abandoned { fence, .. }) => {
            let body = result.to_json();
            match ctx.store.finish(id, &token, &fence, "failed", &body).await {
                Ok(Finish::Applied) => {
                    ctx.metrics.task_finished(result.kind.as_str(), "failed", Duration::ZERO);
                    Decision::Report {
                        id: id.into(),
                        body,
                        traceparent: trace.child().header(),
                        dead_letter,
                        wake: Vec::new(),
                    }
                }
                Ok(Finish::Exists(stored)) => Decision::Report {
                    id: id.into(),
                    body: stored.into_bytes(),
                    traceparent: trace.child().header(),
                    dead_letter,
                    wake: Vec::new(),
                },
                Ok(Finish::Fenced) => Decision::Retry { attempt, delay: BUSY_RETRY_DELAY },
                Err(_) => redis_unavailable(attempt),
            }
        }
        Err(_) => redis_unavailable(attempt),
    }
}
