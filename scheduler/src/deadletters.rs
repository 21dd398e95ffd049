//! Dead letters whose task nobody reported.
//!
//! Two kinds of message reach `P.dlx` without a result and without `x-flota-*`
//! headers, and nobody else would report them: their state would stay
//! `queued` (or unknown), their dependents would wait for their deadline, a
//! producer tapping results would wait for ever.
//! - A work queue's message over its `x-delivery-limit`, dead-lettered by
//!   RabbitMQ. Each of its deliveries ended without an ack: its worker died
//!   before it claimed the task, or was stopped past its grace again and again.
//! - A task published to `P.tasks` with a routing key no queue is bound to,
//!   sent to `P.dlx` by the runbook's alternate-exchange policy. No worker saw it.
//!
//! The scheduler reads its own copy of every dead letter (`P.dead.watch`, bound
//! to `P.dlx` beside `P.dead`) and fails such a task the way every failure is
//! reported: a result stored once (a result already stored wins), published to
//! `P.results`, recorded, its dependents failed. `P.dead` keeps the message for
//! `flotactl dlq replay`. Dead letters that Flota wrote itself carry
//! `x-flota-reason`; their task was reported already (or had no id).

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};

use flota_shared::amqp::{self, HEADER_DELIVERY_COUNT, HEADER_REASON, Topology};
use flota_shared::envelope::{self, ErrorCode};

use crate::state::AppState;

/// The queue a dead letter was first dead-lettered from (RabbitMQ's header).
const HEADER_FIRST_DEATH_QUEUE: &str = "x-first-death-queue";
/// Why RabbitMQ dead-lettered it (`delivery_limit`, `rejected`, `expired`, `maxlen`).
const HEADER_FIRST_DEATH_REASON: &str = "x-first-death-reason";
/// How long a failure to report waits before the dead letter goes back to its queue.
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(500);

/// A dead letter whose task nobody reported: no worker's result will come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unanswered {
    pub id: String,
    pub cause: Cause,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// Dead-lettered by RabbitMQ from a work queue (over `x-delivery-limit`).
    GivenUp { queue: String, reason: String, deliveries: Option<i64> },
    /// Published to `P.tasks` with a routing key no queue is bound to; the
    /// runbook's alternate-exchange policy sent it to `P.dlx` (it keeps its
    /// exchange and routing key, and carries no headers of the broker's).
    Unroutable { routing_key: String },
}

impl Unanswered {
    /// The failed result's message: what happened and where the message is.
    pub fn message(&self) -> String {
        match &self.cause {
            Cause::GivenUp { queue, reason, deliveries } => {
                let times = deliveries.map(|n| format!(" after {n} deliveries")).unwrap_or_default();
                format!(
                    "dead-lettered by RabbitMQ from `{queue}`{times} ({reason}): no delivery of it ended with a result (did its workers crash or stop before claiming it?); it is in the dead-letter queue for `flotactl dlq replay`"
                )
            }
            Cause::Unroutable { routing_key } => format!(
                "unroutable: published to the tasks exchange with routing key `{routing_key}`, which no queue is bound to (it must be the task's kind: `interpret` or `deliberate`); no worker saw it. It is in the dead-letter queue: fix the producer, then `flotactl dlq replay` runs it by the kind in its body"
            ),
        }
    }

    /// A short name of the cause, for logs.
    pub fn cause_name(&self) -> &'static str {
        match self.cause {
            Cause::GivenUp { .. } => "given_up_by_broker",
            Cause::Unroutable { .. } => "unroutable",
        }
    }
}

/// Whether a dead letter is a task nobody reported (pure), and why: one the
/// broker gave up on in `P.interpret` or `P.deliberate`, or one that no queue
/// of `P.tasks` took. Not one that Flota dead-lettered itself
/// (`x-flota-reason`), not one from another queue (a plan event, a result),
/// not one without a valid task id.
pub fn unanswered(
    props: &BasicProperties,
    body: &[u8],
    exchange: &str,
    routing_key: &str,
    topo: &Topology,
) -> Option<Unanswered> {
    if amqp::header_str(props, HEADER_REASON).is_some() {
        return None;
    }
    let cause = match amqp::header_str(props, HEADER_FIRST_DEATH_QUEUE) {
        Some(queue) if envelope::Kind::ALL.iter().any(|k| topo.work_queue(*k) == queue) => Cause::GivenUp {
            queue,
            reason: amqp::header_str(props, HEADER_FIRST_DEATH_REASON)
                .unwrap_or_else(|| "no reason given".into()),
            deliveries: amqp::header_int(props, HEADER_DELIVERY_COUNT),
        },
        Some(_) => return None,
        // Never in a queue, and still carrying the exchange it was published to.
        None if exchange == topo.tasks_exchange() => {
            Cause::Unroutable { routing_key: routing_key.to_string() }
        }
        None => return None,
    };
    let id = envelope::head_of(body).id.filter(|id| envelope::is_valid_id(id))?;
    Some(Unanswered { id, cause })
}

/// Fail the task of one dead letter if the broker gave it up; then ack the copy.
/// If the failure cannot be reported yet (Redis or the broker away), the copy
/// goes back to its queue, which has no delivery limit, and is tried again.
pub async fn handle(state: &AppState, delivery: Delivery) {
    let topo = state.broker.topology();
    let (exchange, routing_key) = (delivery.exchange.as_str(), delivery.routing_key.as_str());
    if let Some(task) = unanswered(&delivery.properties, &delivery.data, exchange, routing_key, topo) {
        let why = task.message();
        let reported =
            state.deps.report_failure(&task.id, &delivery.data, ErrorCode::InvalidTask, &why).await;
        match reported {
            Ok(()) => {
                tracing::warn!(message = "Task dead-lettered with no result; failed it with one.", task_id = %task.id, cause = task.cause_name());
            }
            Err(e) => {
                tracing::warn!(message = "Cannot fail a dead-lettered task yet; retrying.", task_id = %task.id, error = %e);
                tokio::time::sleep(RETRY_PAUSE).await;
                let _ = delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
                return;
            }
        }
    }
    let _ = delivery.acker.ack(BasicAckOptions::default()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use flota_shared::amqp::{long_string, with_headers};
    use lapin::types::AMQPValue;

    fn dead_letter(headers: &[(&str, AMQPValue)]) -> BasicProperties {
        with_headers(&BasicProperties::default(), headers)
    }

    const TASK: &[u8] = br#"{"v":1,"id":"t-1","kind":"interpret","input":{"message":"m"}}"#;

    #[test]
    fn a_task_over_its_delivery_limit_is_given_up_by_the_broker() {
        let topo = Topology::new("p");
        let props = dead_letter(&[
            (HEADER_FIRST_DEATH_QUEUE, long_string("p.interpret")),
            (HEADER_FIRST_DEATH_REASON, long_string("delivery_limit")),
            (HEADER_DELIVERY_COUNT, AMQPValue::LongLongInt(6)),
        ]);
        let task = unanswered(&props, TASK, "p.dlx", "interpret", &topo).expect("unanswered");
        let cause = Cause::GivenUp {
            queue: "p.interpret".into(),
            reason: "delivery_limit".into(),
            deliveries: Some(6),
        };
        assert_eq!(task, Unanswered { id: "t-1".into(), cause });
        let message = task.message();
        assert!(message.contains("`p.interpret` after 6 deliveries (delivery_limit)"), "{message}");
    }

    /// The alternate exchange keeps the exchange and routing key it was published
    /// with, and adds no headers (checked on RabbitMQ 3.10).
    #[test]
    fn a_task_no_queue_of_the_tasks_exchange_took_is_unroutable() {
        let topo = Topology::new("p");
        let props = BasicProperties::default();
        let task = unanswered(&props, TASK, "p.tasks", "interpet", &topo).expect("unanswered");
        assert_eq!(
            task,
            Unanswered { id: "t-1".into(), cause: Cause::Unroutable { routing_key: "interpet".into() } }
        );
        assert!(task.message().contains("routing key `interpet`"), "{}", task.message());
        // Another prefix's tasks exchange, or no valid id: not ours to fail.
        assert_eq!(unanswered(&props, TASK, "q.tasks", "interpet", &topo), None);
        assert_eq!(unanswered(&props, br#"{"id":"has space"}"#, "p.tasks", "x", &topo), None);
        // A dead letter Flota wrote itself names its reason, whatever its exchange.
        let flota = dead_letter(&[(HEADER_REASON, long_string("invalid_task"))]);
        assert_eq!(unanswered(&flota, TASK, "p.tasks", "interpret", &topo), None);
    }

    #[test]
    fn what_flota_dead_lettered_or_what_is_no_task_is_left_alone() {
        let topo = Topology::new("p");
        let from = |queue: &str| (HEADER_FIRST_DEATH_QUEUE, long_string(queue));
        let dlx = |props: &BasicProperties, body: &[u8]| unanswered(props, body, "p.dlx", "", &topo);
        // Flota's own dead letters: their task was reported (or had no id).
        let flota = dead_letter(&[from("p.interpret"), (HEADER_REASON, long_string("invalid_task"))]);
        assert_eq!(dlx(&flota, TASK), None);
        // Not from a work queue: a plan event, another prefix's queue.
        for queue in ["p.plans", "q.interpret", "p.results"] {
            assert_eq!(dlx(&dead_letter(&[from(queue)]), TASK), None, "{queue}");
            // Not even when it was first published to the tasks exchange.
            assert_eq!(unanswered(&dead_letter(&[from(queue)]), TASK, "p.tasks", "", &topo), None, "{queue}");
        }
        // No header at all, and not from the tasks exchange: not the broker's.
        assert_eq!(dlx(&BasicProperties::default(), TASK), None);
        // No valid id to fail.
        let props = dead_letter(&[from("p.deliberate")]);
        for body in [&b"not json"[..], br#"{"kind":"interpret"}"#, br#"{"id":"has space"}"#] {
            assert_eq!(dlx(&props, body), None);
        }
        assert!(dlx(&props, TASK).is_some());
    }
}
