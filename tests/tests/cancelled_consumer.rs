//! A consumer cancelled while lapin holds deliveries for it (the worker's
//! deliberation consumer when the breaker opens) hands them back to the queue
//! at once, instead of leaving them unacked on its channel until it closes.

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
    assert_eq!(
        acks::hand_back_buffered(consumer).await,
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
