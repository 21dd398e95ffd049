//! The results consumer in-process on real RabbitMQ and Redis: one record per
//! id however often a result arrives; garbage dead-lettered with its reason;
//! failures announced as `task.failed` events.

mod common;

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use serde_json::{Value, json};

use common::Harness;
use flota_shared::amqp::{self, HEADER_ERROR, HEADER_REASON};

fn result(id: &str, status: &str, worker: &str) -> Value {
    let mut r = json!({
        "v": 1, "id": id, "kind": "interpret", "status": status,
        "output": {"intent": "open_work", "confidence": 0.9,
                   "work": {"title": "Cambiar bomba", "summary": "Cambiar la bomba del pozo 3"},
                   "reply": null, "degraded": false},
        "error": null, "attempts": 1, "worker": worker,
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "started_at": "2026-11-22T10:00:00.120Z", "finished_at": "2026-11-22T10:00:00.410Z",
        "usage": {"prompt_tokens": 120, "completion_tokens": 40}, "meta": {"tenant": "acme"}
    });
    if status == "failed" {
        r["output"] = Value::Null;
        r["error"] = json!({"code": "gpu_unavailable", "message": "retries exhausted"});
    }
    r
}

async fn publish_result(h: &Harness, id: &str, body: &[u8]) {
    h.publisher
        .publish(
            &h.topo.results_exchange(),
            "",
            body,
            amqp::message_properties(id, &flota_shared::telemetry::TraceParent::new_root().header()),
        )
        .await
        .expect("result published");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_delivered_twice_is_recorded_once() {
    let h = Harness::start("record", None).await;
    let first = serde_json::to_vec(&result("r-1", "succeeded", "worker-a")).unwrap();
    let second = serde_json::to_vec(&result("r-1", "succeeded", "worker-b")).unwrap();
    publish_result(&h, "r-1", &first).await;
    publish_result(&h, "r-1", &second).await;

    h.eventually("both deliveries handled", || async {
        h.metric("flota_results_duplicate_total").await >= 1.0
    })
    .await;
    assert_eq!(h.metric("flota_results_recorded_total{kind=\"interpret\",status=\"succeeded\"}").await, 1.0);
    assert_eq!(h.metric("flota_results_duplicate_total").await, 1.0);
    let (status, v) = h.get_json("/v1/tasks/r-1").await;
    assert_eq!(status, 200);
    assert_eq!(v["status"], "succeeded");
    // One of the two is kept whole (they are handled concurrently: either may be first).
    assert!(v["result"]["worker"] == "worker-a" || v["result"]["worker"] == "worker-b", "{v}");
    assert_eq!(v["result"]["output"]["intent"], "open_work");
    // Both acked: nothing left in the scheduler's queue, nothing dead.
    h.eventually("the results queue to drain", || async { h.depth(&h.topo.results_queue()).await == 0 })
        .await;
    assert_eq!(h.depth(&h.topo.dead_queue()).await, 0);
    h.stop().await;
}

/// Acks go out in batches and without waiting on lapin: every handled result
/// must still be acked. Once the scheduler has drained and closed its channel,
/// an unacked delivery would be back in its queue, ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_handled_result_is_acked_once_the_scheduler_has_drained() {
    let mut h = Harness::start("acks", None).await;
    // More than one batch can hold (`flota_shared::acks::FLUSH_AT`), and one unreadable.
    let n = flota_shared::acks::FLUSH_AT as u32 * 2 + 7;
    for i in 0..n {
        let id = format!("ack-{i}");
        publish_result(&h, &id, &serde_json::to_vec(&result(&id, "succeeded", "worker-a")).unwrap()).await;
    }
    publish_result(&h, "ack-garbage", b"{not json").await;
    let recorded = "flota_results_recorded_total{kind=\"interpret\",status=\"succeeded\"}";
    h.eventually("every result recorded", || async { h.metric(recorded).await == n as f64 }).await;
    h.eventually("the garbage dead-lettered", || async { h.depth(&h.topo.dead_queue()).await == 1 }).await;
    h.stop_scheduler().await;
    assert_eq!(h.depth(&h.topo.results_queue()).await, 0, "results left unacked came back to the queue");
    assert_eq!(h.depth(&h.topo.dead_queue()).await, 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_dead_lettered_and_failures_are_announced() {
    let h = Harness::start("garbage", None).await;

    // Watch task.failed events on a private queue, bound before anything is published.
    let ch = h.conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            ShortString::from(""),
            QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    ch.queue_bind(
        q.name().clone(),
        ShortString::from(h.topo.events_exchange()),
        ShortString::from("task.failed"),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut events = ch
        .basic_consume(
            q.name().clone(),
            ShortString::from("test-events"),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();

    publish_result(&h, "junk", b"{this is not a result").await;
    h.eventually("the garbage to reach P.dead", || async { h.depth(&h.topo.dead_queue()).await == 1 }).await;
    let dead = h.get(&h.topo.dead_queue()).await.expect("the dead letter");
    assert_eq!(&dead.data[..], b"{this is not a result");
    assert_eq!(amqp::header_str(&dead.properties, HEADER_REASON).as_deref(), Some("invalid_task"));
    let why = amqp::header_str(&dead.properties, HEADER_ERROR).unwrap_or_default();
    assert!(!why.is_empty() && why.len() < 500, "{why}");

    // A failed result: recorded as failed, and announced once.
    let failed = serde_json::to_vec(&result("f-1", "failed", "worker-a")).unwrap();
    publish_result(&h, "f-1", &failed).await;
    publish_result(&h, "f-1", &failed).await;
    let event = tokio::time::timeout(common::PATIENCE, events.next())
        .await
        .expect("a task.failed event")
        .expect("consumer open")
        .expect("delivery");
    let body: Value = serde_json::from_slice(&event.data).unwrap();
    assert_eq!((body["id"].as_str(), body["error"]["code"].as_str()), (Some("f-1"), Some("gpu_unavailable")));
    assert_eq!(event.properties.message_id().as_ref().map(|m| m.as_str()), Some("f-1"));
    h.eventually("the duplicate handled", || async {
        h.metric("flota_results_duplicate_total").await >= 1.0
    })
    .await;
    let (_, v) = h.get_json("/v1/tasks/f-1").await;
    assert_eq!(v["status"], "failed");
    // The duplicate did not announce it again.
    assert!(tokio::time::timeout(std::time::Duration::from_millis(500), events.next()).await.is_err());
    assert_eq!(h.depth(&h.topo.dead_queue()).await, 0);
    h.stop().await;
}
