//! The AMQP edge of the worker, and the only place that acks or nacks.
//!
//! A supervisor loop owns two connections (consume, publish) per session; on
//! any connection or consumer error it backs off, reconnects, re-declares,
//! re-applies prefetch and consumes again. A delivery is acked only after the
//! publish its decision requires has been confirmed by the broker, and only
//! on the channel it came from. Acks are queued on the channel without
//! waiting for lapin to write them (`flota_shared::acks`); nacks are waited for.

use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::BasicNackOptions;
use lapin::types::{AMQPValue, ShortString};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use flota_shared::acks;
use flota_shared::amqp::{
    self, HEADER_ATTEMPT, HEADER_ERROR, HEADER_REASON, HEADER_SOURCE_QUEUE, Holding, Publisher, Topology,
    long_string, with_headers,
};
use flota_shared::envelope::Kind;
use flota_shared::store::Handoff;
use flota_shared::telemetry::TRACE_ONLY;

use crate::breaker::BreakerState;
use crate::lanes::{Lanes, Taken};
use crate::process::{Decision, WorkerCtx, process};

/// Run until `shutdown`, then drain: stop consuming, let in-flight tasks finish
/// within the grace period, hand back the rest un-acked.
pub async fn run(
    ctx: Arc<WorkerCtx>,
    shutdown: CancellationToken,
    ready: impl FnOnce() + Send,
) -> anyhow::Result<()> {
    let topo = Topology::new(&ctx.config.prefix);
    let permits = Arc::new(Semaphore::new(ctx.config.concurrency as usize));
    let tracker = TaskTracker::new();
    // Cancelled when the grace period is over: running tasks give their delivery back.
    let hand_back = CancellationToken::new();
    let mut ready = Some(ready);
    let mut delay = Duration::from_millis(200);

    while !shutdown.is_cancelled() {
        match session(&ctx, &topo, &shutdown, &hand_back, &tracker, &permits, &mut ready).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(message = "AMQP session ended; reconnecting.", error = %e, delay_ms = delay.as_millis() as u64);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}

async fn session(
    ctx: &Arc<WorkerCtx>,
    topo: &Topology,
    shutdown: &CancellationToken,
    hand_back: &CancellationToken,
    tracker: &TaskTracker,
    permits: &Arc<Semaphore>,
    ready: &mut Option<impl FnOnce() + Send>,
) -> anyhow::Result<()> {
    let worker_id = &ctx.config.worker_id;
    // Separate connections: broker flow control on publishes cannot stall acks.
    let consume_conn = amqp::connect(&ctx.config, &format!("{worker_id} consume")).await?;
    let publish_conn = amqp::connect(&ctx.config, &format!("{worker_id} publish")).await?;
    // A user without `configure` (which would also let it delete queues) finds it declared.
    amqp::ensure_topology(&publish_conn, topo, ctx.config.delivery_limit).await?;
    let publisher = Publisher::open(&publish_conn).await?;

    // One channel per queue, consumed through lanes that share the concurrency
    // (`crate::credit`): quorum queues have no channel-wide QoS.
    let interpret_channel = consume_conn.create_channel().await?;
    let deliberate_channel = consume_conn.create_channel().await?;
    let mut lanes = Lanes::new(topo, worker_id, interpret_channel, deliberate_channel.clone());
    // Deliberations are consumed only while the GPU path is available: with the
    // breaker open they stay in their queue, spending no attempt.
    let breaker = ctx.gpu.breaker().clone();
    let concurrency = ctx.config.concurrency;
    lanes.start(concurrency, breaker.state() == BreakerState::Closed).await?;
    show_lanes(&ctx.metrics, &lanes);
    tracing::info!(message = "Consuming.", worker = %worker_id, concurrency);
    if let Some(ready) = ready.take() {
        ready();
    }
    let mut breaker_tick = tokio::time::interval(crate::fleet::SYNC_EVERY);

    let result = loop {
        let taken = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = breaker_tick.tick() => {
                let state = breaker.state();
                ctx.metrics.breaker_state.set(match state {
                    BreakerState::Closed => 0,
                    BreakerState::Open => 1,
                    BreakerState::HalfOpen => 2,
                });
                let available = state == BreakerState::Closed;
                match (available, lanes.consuming(Kind::Deliberate)) {
                    (false, true) => {
                        tracing::warn!(message = "GPU breaker open; pausing deliberations (basic.cancel).");
                        // Sent before the cancels took effect, never started: back to their queue
                        // through the delay tier an open breaker waits in (not nack-requeue,
                        // which spends a delivery each time the breaker opens), for a worker
                        // whose GPU path is up, not held here unacked. Taken here (complete once
                        // the cancels returned, so quick); sent off the loop: under a resource
                        // alarm the copies wait for their confirms as long as it lasts.
                        let mut buffered = Vec::new();
                        for cancelled in lanes.cancel_kind(Kind::Deliberate).await? {
                            buffered.extend(acks::take_buffered(cancelled).await);
                        }
                        if !buffered.is_empty() {
                            let tier = amqp::retry_tier_for(crate::error::BREAKER_OPEN_WAIT);
                            let delay_queue = topo.retry_queue(Kind::Deliberate, tier);
                            let (channel, publisher, hand_back) =
                                (deliberate_channel.clone(), publisher.clone(), hand_back.clone());
                            tracker.spawn(async move {
                                let deferred =
                                    acks::defer(buffered, &channel, &publisher, &delay_queue, &hand_back).await;
                                tracing::info!(message = "Buffered deliberations sent to wait out the open breaker.", deferred);
                            });
                        }
                    }
                    (true, false) => {
                        tracing::info!(message = "GPU path available; consuming deliberations again.");
                        lanes.add(Kind::Deliberate, 1, true).await?;
                    }
                    _ => {}
                }
                lanes.rebalance(concurrency, available).await?;
                show_lanes(&ctx.metrics, &lanes);
                continue;
            }
            taken = lanes.next() => taken,
        };
        let taken = match taken {
            Ok(taken) => taken,
            Err(e) => break Err(anyhow::anyhow!(e)),
        };
        let (ctx, publisher, topo, permits) = (ctx.clone(), publisher.clone(), topo.clone(), permits.clone());
        let (shutdown, hand_back) = (shutdown.clone(), hand_back.clone());
        // Boxed: the task's future is ~19 KB, and tokio::spawn moved it by value
        // several times (memcpy was ~5 % of a worker's instructions); a box moves once.
        tracker.spawn(Box::pin(async move {
            let Taken { kind, delivery, channel, in_flight: _in_flight } = taken;
            // The lanes may hold a few deliveries beyond the concurrency (what the kind
            // that is not saturated keeps and does not use): they wait here for a slot,
            // off the loop.
            let permit = tokio::select! {
                biased;
                _ = shutdown.cancelled() => None,
                p = permits.acquire_owned() => p.ok(),
            };
            let Some(permit) = permit else {
                // Not started: give it back at once.
                let _ = delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
                return;
            };
            handle(&ctx, &publisher, &topo, kind, Received { delivery, channel }, &hand_back).await;
            drop(permit);
        }));
    };

    if result.is_ok() {
        // Drain: stop deliveries, finish what runs within the grace period.
        lanes.cancel_all().await;
        tracing::info!(
            message = "Stopped consuming; draining in-flight tasks.",
            grace_s = ctx.config.shutdown_grace.as_secs()
        );
        tracker.close();
        if tokio::time::timeout(ctx.config.shutdown_grace, tracker.wait()).await.is_err() {
            tracing::warn!(message = "Grace period over; handing back unfinished tasks.");
            hand_back.cancel();
            tracker.wait().await;
        }
        // Prefetched deliveries never started are returned when the channels close.
        let _ = consume_conn.close(200, ShortString::from("shutdown")).await;
        let _ = publish_conn.close(200, ShortString::from("shutdown")).await;
    }
    result
}

fn show_lanes(metrics: &crate::metrics::Metrics, lanes: &Lanes) {
    metrics.consuming_deliberations.set(lanes.consuming(Kind::Deliberate) as i64);
    for kind in Kind::ALL {
        let label = crate::metrics::KindLabel { kind: kind.as_str().to_string() };
        metrics.prefetch.get_or_create(&label).set(i64::from(lanes.credit(kind)));
    }
}

/// Process one delivery and carry out its decision. Acks only after the
/// decision's publish is confirmed, however long the broker takes (a resource
/// alarm): the delivery is held meanwhile. When the publish fails (a nack, a
/// closed channel) or the grace period ends first, the delivery is returned to
/// the broker (it will be redelivered and answered from the store).
async fn handle(
    ctx: &WorkerCtx,
    publisher: &Publisher,
    topo: &Topology,
    kind: Kind,
    received: Received,
    hand_back: &CancellationToken,
) {
    let delivery = &received.delivery;
    let (span, trace) = crate::process::consume_span(&delivery.properties);
    async {
        let decision = process(ctx, &delivery.data, &delivery.properties, trace, hand_back).await;
        let publish = tracing::info_span!(target: TRACE_ONLY, "publish");
        let hold = Holding { publisher, give_up: hand_back, channel: &received.channel };
        let published = carry_out(ctx, &hold, topo, kind, delivery, &decision).instrument(publish).await;
        settle(ctx, publisher, topo, &received, decision, published).await;
    }
    .instrument(span)
    .await
}

/// Publish what the decision says must be published before the ack. `None`:
/// the delivery was handed back (nothing to ack).
async fn carry_out(
    ctx: &WorkerCtx,
    hold: &Holding<'_>,
    topo: &Topology,
    kind: Kind,
    delivery: &Delivery,
    decision: &Decision,
) -> Option<Result<(), amqp::PublishError>> {
    Some(match decision {
        Decision::Report { id, body, traceparent, dead_letter, .. } => {
            // The scheduler's span becomes a child of this publish.
            let traceparent = flota_shared::telemetry::traceparent_in(&tracing::Span::current(), traceparent);
            let props = amqp::message_properties(id, &traceparent);
            match hold.publish(&topo.results_exchange(), "", body, props).await {
                Ok(()) => match dead_letter {
                    Some(dl) => {
                        dead_letter_copy(ctx, hold, topo, kind, delivery, &dl.reason.to_string(), &dl.error)
                            .await
                    }
                    None => Ok(()),
                },
                Err(e) => Err(e),
            }
        }
        Decision::DeadLetter(dl) => {
            dead_letter_copy(ctx, hold, topo, kind, delivery, dl.reason.as_str(), &dl.error).await
        }
        Decision::Retry { attempt, delay } => {
            let tier = amqp::retry_tier_for(*delay);
            let props =
                with_headers(&delivery.properties, &[(HEADER_ATTEMPT, AMQPValue::LongInt(*attempt as i32))]);
            hold.publish("", &topo.retry_queue(kind, tier), &delivery.data, props).await
        }
        Decision::HandBack => return None,
        // The body is durably parked in Redis; the scheduler republishes it.
        Decision::Parked => Ok(()),
    })
}

/// A delivery and the channel it came on, the only one it can be acked on.
struct Received {
    delivery: Delivery,
    channel: lapin::Channel,
}

/// Ack once the decision's publish is confirmed; otherwise give the delivery back.
async fn settle(
    ctx: &WorkerCtx,
    publisher: &Publisher,
    topo: &Topology,
    received: &Received,
    decision: Decision,
    published: Option<Result<(), amqp::PublishError>>,
) {
    let delivery = &received.delivery;
    let Some(published) = published else {
        let _ = delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
        return;
    };
    match published {
        Ok(()) => {
            // Single acks, not batched: prefetch equals concurrency here, so an ack held
            // back for company would hold back the next delivery (see `flota_shared::acks`).
            if let Err(e) = acks::ack_detached(&received.channel, delivery) {
                // The channel died after the publish: the broker redelivers, the store answers.
                tracing::warn!(message = "Ack failed after a confirmed publish; the task will be re-reported.", error = %e);
            }
            if let Decision::Report { wake, .. } = &decision {
                wake_waiters(ctx, publisher, topo, wake).await;
            }
        }
        Err(e) => {
            tracing::warn!(message = "Publish failed or given up; returning the delivery.", error = %e);
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
        }
    }
}

/// Republish the tasks that waited for a lock key this task released, then
/// clear their hand-offs. One that cannot be published stays in the hand-off
/// hash, where the scheduler's sweep republishes it.
async fn wake_waiters(ctx: &WorkerCtx, publisher: &Publisher, topo: &Topology, wake: &[Handoff]) {
    for h in wake {
        let kind = serde_json::from_str::<serde_json::Value>(&h.body)
            .ok()
            .and_then(|t| t["kind"].as_str().and_then(Kind::parse))
            .unwrap_or(Kind::Interpret);
        let trace = flota_shared::telemetry::TraceParent::new_root();
        let props = amqp::task_properties(&h.id, &trace.header(), 0);
        match publisher.publish(&topo.tasks_exchange(), kind.as_str(), h.body.as_bytes(), props).await {
            Ok(()) => {
                tracing::info!(message = "Lock key free; waiter handed back to the queue.", waiter_id = %h.id);
                let _ = ctx.store.handoff_done(h).await;
            }
            Err(e) => {
                tracing::warn!(message = "Waiter not republished; the scheduler's sweep will.", waiter_id = %h.id, error = %e)
            }
        }
    }
}

async fn dead_letter_copy(
    ctx: &WorkerCtx,
    hold: &Holding<'_>,
    topo: &Topology,
    kind: Kind,
    delivery: &Delivery,
    reason: &str,
    error: &str,
) -> Result<(), amqp::PublishError> {
    ctx.metrics.dead_letters.get_or_create(&crate::metrics::ReasonLabel { reason: reason.to_string() }).inc();
    let props = with_headers(
        &delivery.properties,
        &[
            (HEADER_REASON, long_string(reason)),
            (HEADER_ERROR, long_string(error)),
            (HEADER_SOURCE_QUEUE, long_string(&topo.work_queue(kind))),
        ],
    );
    hold.publish(&topo.dead_letter_exchange(), kind.as_str(), &delivery.data, props).await
}
