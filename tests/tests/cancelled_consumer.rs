//! A consumer cancelled while lapin holds deliveries for it (the worker's
//! deliberation consumer when the breaker opens) sends them back to the queue
//! through a delay tier, instead of leaving them unacked on its channel until it
//! closes, and without spending the queue's delivery limit.

use futures::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use serde_json::json;

use flota_shared::acks;
use flota_shared::amqp;
use flota_shared::envelope::Kind;
use flota_tests::{TestEnv, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_consumer_hands_back_what_it_had_buffered() {
    let env = TestEnv::new("cancelled").await;
    let queue = env.topo.work_queue(Kind::Deliberate);
    let n = 5;
    for i in 0..n {
        env.publish_task(&json!({"v": 1, "id": format!("buffered-{i}"), "kind": "deliberate",
            "input": {"role": "DEV", "agents": 3, "ticket": {"title": "t", "body": "b"}}}))
            .await;
    }
    let conn = amqp::connect(&env.config, "test cancelled consumer").await.expect("connect");
    let channel = conn.create_channel().await.expect("channel");
    channel.basic_qos(n as u16 + 1, BasicQosOptions::default()).await.expect("qos");
    let mut consumer = channel
        .basic_consume(
            ShortString::from(queue.clone()),
            ShortString::from("buffering"),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    // One taken and kept (a task in hand), the rest pushed to this channel and buffered.
    let in_hand = consumer.next().await.expect("a delivery").expect("no error");
    eventually("every message pushed to the consumer", || async { env.queue_depth(&queue).await == 0 }).await;

    channel
        .basic_cancel(ShortString::from("buffering"), BasicCancelOptions::default())
        .await
        .expect("cancel");
    let delay_queue = env.topo.retry_queue(Kind::Deliberate, 1_000);
    assert_eq!(
        acks::defer_buffered(consumer, &channel, &env.publisher, &delay_queue).await,
        n - 1,
        "the buffered deliveries, not the one in hand"
    );
    // Back in the queue while the channel is still open (dropped, they would stay unacked).
    eventually("the buffered deliveries back in the queue", || async {
        env.queue_depth(&queue).await == (n - 1) as u32
    })
    .await;
    drop(in_hand);
    let _ = conn.close(200, ShortString::from("done")).await;
    env.cleanup().await;
}

/// The worker's deliberation consumer is cancelled each time the GPU breaker
/// opens. What it had buffered goes to the delay tier and comes back as new
/// messages, so a flapping breaker spends none of the quorum queue's deliveries:
/// with a delivery limit of 1, two nack-requeue hand-backs would dead-letter them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_deliveries_come_back_without_spending_the_delivery_limit() {
    let env = TestEnv::with_vars("deferred", &[("FLOTA_DELIVERY_LIMIT", "1")]).await;
    let queue = env.topo.work_queue(Kind::Deliberate);
    let delay_queue = env.topo.retry_queue(Kind::Deliberate, 1_000);
    let n = 4;
    for i in 0..n {
        env.publish_task(&json!({"v": 1, "id": format!("deferred-{i}"), "kind": "deliberate",
            "input": {"role": "DEV", "task": "t"}}))
            .await;
    }
    let conn = amqp::connect(&env.config, "test deferred consumer").await.expect("connect");
    let channel = conn.create_channel().await.expect("channel");
    channel.basic_qos(n as u16, BasicQosOptions::default()).await.expect("qos");
    // Two breaker openings: each time all of them are buffered, then deferred.
    for opening in 0..2 {
        let tag = format!("buffering-{opening}");
        let consumer = channel
            .basic_consume(
                ShortString::from(queue.clone()),
                ShortString::from(tag.clone()),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        eventually("every message pushed to the consumer", || async { env.queue_depth(&queue).await == 0 })
            .await;
        channel.basic_cancel(ShortString::from(tag), BasicCancelOptions::default()).await.expect("cancel");
        assert_eq!(acks::defer_buffered(consumer, &channel, &env.publisher, &delay_queue).await, n);
        eventually("the deferred deliveries back in their queue", || async {
            env.queue_depth(&queue).await == n as u32
        })
        .await;
    }
    assert_eq!(env.queue_depth(&env.topo.dead_queue()).await, 0, "none was dead-lettered");
    let ch = conn.create_channel().await.expect("channel");
    let got = ch
        .basic_get(ShortString::from(queue.clone()), lapin::options::BasicGetOptions::default())
        .await
        .expect("get")
        .expect("a message");
    let props = &got.delivery.properties;
    // RabbitMQ counts returns in x-delivery-count; a copy starts again at 0.
    let returns = amqp::header_int(props, amqp::HEADER_DELIVERY_COUNT).unwrap_or(0);
    assert_eq!(returns, 0, "a new message, never returned: {props:?}");
    assert!(props.message_id().as_ref().is_some_and(|m| m.as_str().starts_with("deferred-")), "{props:?}");
    assert!(amqp::header_str(props, amqp::HEADER_TRACEPARENT).is_some(), "headers kept: {props:?}");
    let _ = conn.close(200, ShortString::from("done")).await;
    env.cleanup().await;
}
