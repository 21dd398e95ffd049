//! A consumer cancelled while lapin holds deliveries for it (the worker's
//! deliberation consumer when the breaker opens) sends them back to the queue
//! through a delay tier, instead of leaving them unacked on its channel until it
//! closes, and without spending the queue's delivery limit, even when the
//! broker is slow to confirm the copies (a resource alarm).

use futures::StreamExt;
use lapin::options::{BasicCancelOptions, BasicGetOptions, BasicQosOptions};
use lapin::types::ShortString;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use flota_shared::acks;
use flota_shared::amqp;
use flota_shared::envelope::Kind;
use flota_tests::private_rabbitmq::PrivateRabbitMq;
use flota_tests::{TestEnv, consume, eventually};

async fn publish_deliberations(env: &TestEnv, name: &str, n: usize) {
    for i in 0..n {
        env.publish_task(&json!({"v": 1, "id": format!("{name}-{i}"), "kind": "deliberate",
            "input": {"role": "DEV", "task": "t"}}))
            .await;
    }
}

async fn pushed_all(env: &TestEnv, queue: &str) {
    eventually("every message pushed to the consumer", || async { env.queue_depth(queue).await == 0 }).await;
}

async fn cancel(channel: &lapin::Channel, tag: &str) {
    channel.basic_cancel(ShortString::from(tag), BasicCancelOptions::default()).await.expect("cancel");
}

/// How many times the broker returned the first message of `queue` to it
/// (RabbitMQ's `x-delivery-count`; a copy starts again at 0).
async fn returns_of_first(channel: &lapin::Channel, queue: &str) -> (i64, lapin::BasicProperties) {
    let got = channel
        .basic_get(ShortString::from(queue), BasicGetOptions::default())
        .await
        .expect("get")
        .expect("a message");
    let props = got.delivery.properties.clone();
    (amqp::header_int(&props, amqp::HEADER_DELIVERY_COUNT).unwrap_or(0), props)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_consumer_hands_back_what_it_had_buffered() {
    let env = TestEnv::new("cancelled").await;
    let queue = env.topo.work_queue(Kind::Deliberate);
    let n = 5;
    publish_deliberations(&env, "buffered", n).await;
    let conn = amqp::connect(&env.config, "test cancelled consumer").await.expect("connect");
    let channel = conn.create_channel().await.expect("channel");
    channel.basic_qos(n as u16 + 1, BasicQosOptions::default()).await.expect("qos");
    let mut consumer = consume(&channel, &queue, "buffering").await;
    // One taken and kept (a task in hand), the rest pushed to this channel and buffered.
    let in_hand = consumer.next().await.expect("a delivery").expect("no error");
    pushed_all(&env, &queue).await;

    cancel(&channel, "buffering").await;
    let delay_queue = env.topo.retry_queue(Kind::Deliberate, 1_000);
    assert_eq!(
        acks::defer_buffered(consumer, &channel, &env.publisher, &delay_queue, &CancellationToken::new())
            .await,
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
    publish_deliberations(&env, "deferred", n).await;
    let conn = amqp::connect(&env.config, "test deferred consumer").await.expect("connect");
    let channel = conn.create_channel().await.expect("channel");
    channel.basic_qos(n as u16, BasicQosOptions::default()).await.expect("qos");
    // Two breaker openings: each time all of them are buffered, then deferred.
    for opening in 0..2 {
        let tag = format!("buffering-{opening}");
        let consumer = consume(&channel, &queue, &tag).await;
        pushed_all(&env, &queue).await;
        cancel(&channel, &tag).await;
        assert_eq!(
            acks::defer_buffered(consumer, &channel, &env.publisher, &delay_queue, &CancellationToken::new())
                .await,
            n
        );
        eventually("the deferred deliveries back in their queue", || async {
            env.queue_depth(&queue).await == n as u32
        })
        .await;
    }
    assert_eq!(env.queue_depth(&env.topo.dead_queue()).await, 0, "none was dead-lettered");
    let (returns, props) = returns_of_first(&conn.create_channel().await.expect("channel"), &queue).await;
    assert_eq!(returns, 0, "a new message, never returned: {props:?}");
    assert!(props.message_id().as_ref().is_some_and(|m| m.as_str().starts_with("deferred-")), "{props:?}");
    assert!(amqp::header_str(&props, amqp::HEADER_TRACEPARENT).is_some(), "headers kept: {props:?}");
    let _ = conn.close(200, ShortString::from("done")).await;
    env.cleanup().await;
}

/// Under a memory alarm (on a private RabbitMQ node: it blocks every publisher
/// of the node) longer than the confirm timeout, the copies wait for their
/// confirms, as results do. The bounded publish handed them back after the
/// timeout: a nack-requeue each, a delivery of the limit spent each time the
/// breaker opened during an alarm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_copies_wait_out_a_long_memory_alarm_without_spending_deliveries() {
    let broker = PrivateRabbitMq::start().await;
    let env = TestEnv::with_vars(
        "defer-alarm",
        &[("FLOTA_AMQP_URL", &broker.url()), ("FLOTA_DELIVERY_LIMIT", "1")],
    )
    .await;
    let queue = env.topo.work_queue(Kind::Deliberate);
    let n = 3;
    publish_deliberations(&env, "defer-alarm", n).await;
    let conn = amqp::connect(&env.config, "test deferred under alarm").await.expect("connect");
    let channel = conn.create_channel().await.expect("channel");
    channel.basic_qos(n as u16, BasicQosOptions::default()).await.expect("qos");
    let consumer = consume(&channel, &queue, "buffering").await;
    pushed_all(&env, &queue).await;
    cancel(&channel, "buffering").await;
    let buffered = acks::take_buffered(consumer).await;
    assert_eq!(buffered.len(), n);

    broker.memory_alarm(true).await;
    let deferring = tokio::spawn({
        let (channel, publisher) = (channel.clone(), env.publisher.clone());
        let delay_queue = env.topo.retry_queue(Kind::Deliberate, 1_000);
        async move { acks::defer(buffered, &channel, &publisher, &delay_queue, &CancellationToken::new()).await }
    });
    // Past the confirm timeout, with a margin: the bounded publish gave the deliveries back here.
    tokio::time::sleep(amqp::CONFIRM_TIMEOUT + std::time::Duration::from_secs(15)).await;
    assert!(!deferring.is_finished(), "the copies wait for the alarm to clear, holding their deliveries");
    broker.memory_alarm(false).await;

    assert_eq!(deferring.await.expect("defer task"), n, "every copy confirmed, every delivery acked");
    eventually("the copies back in the work queue", || async { env.queue_depth(&queue).await == n as u32 })
        .await;
    assert_eq!(env.queue_depth(&env.topo.dead_queue()).await, 0, "none was dead-lettered");
    let (returns, props) = returns_of_first(&channel, &queue).await;
    assert_eq!(returns, 0, "a copy, never returned to its queue: {props:?}");
    let _ = conn.close(200, ShortString::from("done")).await;
    env.cleanup().await;
}
