//! Tasks the broker gave up on by itself.
//!
//! A work queue's message that reaches `x-delivery-limit` is dead-lettered by
//! RabbitMQ to `P.dlx`, without a result and without `x-flota-*` headers. Each
//! of its deliveries ended without an ack: its worker died before it claimed
//! the task, or was stopped past its grace again and again. Nobody else would
//! report it: its state would stay `queued`, its dependents would wait for
//! their deadline, a producer tapping results would wait for ever.
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

/// A task of a work queue that the broker dead-lettered by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GivenUp {
    pub id: String,
    pub queue: String,
    pub reason: String,
    pub deliveries: Option<i64>,
}

impl GivenUp {
    /// The failed result's message: what happened and where the message is.
    pub fn message(&self) -> String {
        let times = self.deliveries.map(|n| format!(" after {n} deliveries")).unwrap_or_default();
        format!(
            "dead-lettered by RabbitMQ from `{}`{times} ({}): no delivery of it ended with a result (did its workers crash or stop before claiming it?); it is in the dead-letter queue for `flotactl dlq replay`",
            self.queue, self.reason
        )
    }
}

/// Whether a dead letter is a task the broker gave up on (pure). Not one that
/// Flota dead-lettered itself (`x-flota-reason`), not one from another queue
/// than `P.interpret` or `P.deliberate` (a plan event, a result), not one
/// without a valid task id.
pub fn given_up_by_broker(props: &BasicProperties, body: &[u8], topo: &Topology) -> Option<GivenUp> {
    if amqp::header_str(props, HEADER_REASON).is_some() {
        return None;
    }
    let queue = amqp::header_str(props, HEADER_FIRST_DEATH_QUEUE)?;
    if !envelope::Kind::ALL.iter().any(|k| topo.work_queue(*k) == queue) {
        return None;
    }
    let id = envelope::head_of(body).id.filter(|id| envelope::is_valid_id(id))?;
    Some(GivenUp {
        id,
        queue,
        reason: amqp::header_str(props, HEADER_FIRST_DEATH_REASON)
            .unwrap_or_else(|| "no reason given".into()),
        deliveries: amqp::header_int(props, HEADER_DELIVERY_COUNT),
    })
}

/// Fail the task of one dead letter if the broker gave it up; then ack the copy.
/// If the failure cannot be reported yet (Redis or the broker away), the copy
/// goes back to its queue, which has no delivery limit, and is tried again.
pub async fn handle(state: &AppState, delivery: Delivery) {
    let topo = state.broker.topology();
    if let Some(given_up) = given_up_by_broker(&delivery.properties, &delivery.data, topo) {
        let why = given_up.message();
        let reported =
            state.deps.report_failure(&given_up.id, &delivery.data, ErrorCode::InvalidTask, &why).await;
        match reported {
            Ok(()) => {
                tracing::warn!(message = "Task dead-lettered by the broker; failed it with a result.", task_id = %given_up.id, queue = %given_up.queue, reason = %given_up.reason);
            }
            Err(e) => {
                tracing::warn!(message = "Cannot fail a task the broker dead-lettered yet; retrying.", task_id = %given_up.id, error = %e);
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
        let given_up = given_up_by_broker(&props, TASK, &topo).expect("given up");
        assert_eq!(
            given_up,
            GivenUp {
                id: "t-1".into(),
                queue: "p.interpret".into(),
                reason: "delivery_limit".into(),
                deliveries: Some(6)
            }
        );
        let message = given_up.message();
        assert!(message.contains("`p.interpret` after 6 deliveries (delivery_limit)"), "{message}");
    }

    #[test]
    fn what_flota_dead_lettered_or_what_is_no_task_is_left_alone() {
        let topo = Topology::new("p");
        let from = |queue: &str| (HEADER_FIRST_DEATH_QUEUE, long_string(queue));
        // Flota's own dead letters: their task was reported (or had no id).
        let flota = dead_letter(&[from("p.interpret"), (HEADER_REASON, long_string("invalid_task"))]);
        assert_eq!(given_up_by_broker(&flota, TASK, &topo), None);
        // Not from a work queue: a plan event, another prefix's queue.
        for queue in ["p.plans", "q.interpret", "p.results"] {
            assert_eq!(given_up_by_broker(&dead_letter(&[from(queue)]), TASK, &topo), None, "{queue}");
        }
        // No header at all: not the broker's.
        assert_eq!(given_up_by_broker(&BasicProperties::default(), TASK, &topo), None);
        // No valid id to fail.
        let props = dead_letter(&[from("p.deliberate")]);
        for body in [&b"not json"[..], br#"{"kind":"interpret"}"#, br#"{"id":"has space"}"#] {
            assert_eq!(given_up_by_broker(&props, body, &topo), None);
        }
        assert!(given_up_by_broker(&props, TASK, &topo).is_some());
    }
}
