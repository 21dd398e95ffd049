//! `P.tasks` as the contract gives it — a durable direct exchange, no
//! arguments — so a producer in any language may declare it before or after
//! Flota does (RabbitMQ refuses a declare whose arguments differ from the
//! existing exchange's), and the exchange an earlier Flota created, with an
//! alternate exchange, keeps working and keeps catching unroutable tasks.

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Confirmation, ExchangeKind};
use serde_json::{Value, json};

use flota_shared::amqp::{self, task_properties};
use flota_shared::envelope::{Kind, Status};
use flota_shared::telemetry::TraceParent;
use flota_tests::{TestEnv, dlq_reasons, flotactl, procs};

/// What a producer that follows the contract to the letter does before publishing.
async fn declare_like_a_producer(channel: &lapin::Channel, env: &TestEnv) -> lapin::Result<()> {
    channel
        .exchange_declare(
            ShortString::from(env.topo.tasks_exchange()),
            ExchangeKind::Direct,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
}

/// Start over with `P.tasks` as someone else declared it (the bindings to the
/// work queues go with the old exchange; Flota's declare puts them back).
async fn replace_tasks_exchange(env: &TestEnv, args: FieldTable) {
    let admin = env.conn.create_channel().await.expect("channel");
    admin
        .exchange_delete(ShortString::from(env.topo.tasks_exchange()), ExchangeDeleteOptions::default())
        .await
        .expect("delete P.tasks");
    admin
        .exchange_declare(
            ShortString::from(env.topo.tasks_exchange()),
            ExchangeKind::Direct,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            args,
        )
        .await
        .expect("declare P.tasks");
    let _ = admin.close(200, ShortString::from("done")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_may_declare_the_tasks_exchange_before_and_after_flota() {
    let env = TestEnv::new("topo-producer").await;
    // Before: the producer's plain exchange is there first; Flota's declare accepts it.
    replace_tasks_exchange(&env, FieldTable::default()).await;
    amqp::declare_topology(&env.conn, &env.topo, env.config.delivery_limit)
        .await
        .expect("Flota declares its topology beside a producer's P.tasks");

    // After: the producer declares again on its own channel, then publishes on it.
    let producer = env.conn.create_channel().await.expect("channel");
    producer.confirm_select(ConfirmSelectOptions::default()).await.expect("confirms");
    declare_like_a_producer(&producer, &env)
        .await
        .expect("the contract's P.tasks (durable direct, no arguments) is what Flota declared");
    let mut tap = env.tap_results().await;
    let task =
        json!({"id": "tp-1", "kind": "interpret", "input": {"message": "Abrí un trabajo para la bomba 3"}});
    let confirm = producer
        .basic_publish(
            ShortString::from(env.topo.tasks_exchange()),
            ShortString::from("interpret"),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&task).expect("json"),
            task_properties("tp-1", &TraceParent::new_root().header(), 0),
        )
        .await
        .expect("the producer's channel is still open")
        .await
        .expect("confirm");
    assert!(matches!(confirm, Confirmation::Ack(_)), "{confirm:?}");

    // A worker starting now declares the same topology and runs the task.
    let gpu = procs::gpusim(&[]).await;
    let _worker = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let result = tap.next().await.expect("a result");
    assert_eq!((result.id.as_str(), result.status), ("tp-1", Status::Succeeded), "{result:?}");
    env.cleanup().await;
}

/// An exchange an earlier Flota created still routes, and its alternate
/// exchange still puts a task with no kind as routing key into the dead letters,
/// where `flotactl dlq` names it and replays it by the kind in its body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_flotas_tasks_exchange_keeps_working_and_catching_unroutable_tasks() {
    let env = TestEnv::new("topo-earlier").await;
    let mut earlier = FieldTable::default();
    earlier.insert(
        ShortString::from("alternate-exchange"),
        AMQPValue::LongString(env.topo.dead_letter_exchange().into()),
    );
    replace_tasks_exchange(&env, earlier).await;
    amqp::declare_topology(&env.conn, &env.topo, env.config.delivery_limit)
        .await
        .expect("Flota keeps an exchange with the alternate exchange an earlier version gave it");

    let publish = |key: &'static str, body: Value| {
        let env = &env;
        async move {
            let id = body["id"].as_str().unwrap_or("-").to_string();
            let props = task_properties(&id, &TraceParent::new_root().header(), 0);
            env.publish_raw(key, &serde_json::to_vec(&body).expect("json"), props).await;
        }
    };
    // A misspelt routing key with a right body; a kind that does not exist.
    publish("interpretar", json!({"id": "ue-1", "kind": "interpret", "input": {"message": "Sí, confirmo"}}))
        .await;
    publish("launch", json!({"id": "ue-2", "kind": "launch", "input": {}})).await;
    flota_tests::eventually("both unroutable tasks are dead letters", || async {
        env.queue_depth(&env.topo.dead_queue()).await == 2
    })
    .await;
    let unroutable = [("ue-1".to_string(), "unroutable".to_string()), ("ue-2".into(), "unroutable".into())];
    assert_eq!(dlq_reasons(&env).await, unroutable);

    let (_, out, err) = flotactl(&env, &["dlq", "replay", "ue-2"]).await;
    assert!(out.contains("replayed 0"), "no kind to route it by: {out} {err}");
    let (code, out, err) = flotactl(&env, &["dlq", "replay", "ue-1"]).await;
    assert_eq!(code, Some(0), "{out} {err}");
    assert!(out.contains("replayed 1"), "{out} {err}");

    // The replayed task and a well-routed one run on a worker of this version.
    let mut tap = env.tap_results().await;
    let gpu = procs::gpusim(&[]).await;
    let _worker = procs::worker(&env.env(), &gpu.url(), &[]).await;
    publish("interpret", json!({"id": "ue-3", "kind": "interpret", "input": {"message": "Cancela eso"}}))
        .await;
    let (results, _) = tap.collect_distinct(2).await;
    for id in ["ue-1", "ue-3"] {
        let r = results.get(id).unwrap_or_else(|| panic!("{id} ran: {results:?}"));
        assert_eq!((r.kind, r.status), (Kind::Interpret, Status::Succeeded), "{r:?}");
    }
    assert_eq!(dlq_reasons(&env).await, vec![("ue-2".to_string(), "unroutable".to_string())]);
    env.cleanup().await;
}

/// The runbook's policy gives a plain `P.tasks` the catch an earlier Flota's
/// declare argument gave: tasks with no kind as routing key become dead
/// letters, and producers' declares still succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runbooks_policy_dead_letters_unroutable_tasks_on_a_plain_exchange() {
    let env = TestEnv::new("topo-policy").await;
    let policy = flota_tests::users::UnroutablePolicy::set(&env);

    let producer = env.conn.create_channel().await.expect("channel");
    declare_like_a_producer(&producer, &env)
        .await
        .expect("a policy does not make the producer's declare differ");
    amqp::declare_topology(&env.conn, &env.topo, env.config.delivery_limit).await.expect("Flota's neither");

    let mut sent = 0;
    flota_tests::eventually("an unroutable task is dead-lettered once the policy applies", || {
        sent += 1;
        let (env, id) = (&env, format!("up-{sent}"));
        async move {
            let body = json!({"id": id, "kind": "launch", "input": {}});
            let props = task_properties(&id, &TraceParent::new_root().header(), 0);
            env.publish_raw("launch", &serde_json::to_vec(&body).expect("json"), props).await;
            env.queue_depth(&env.topo.dead_queue()).await > 0
        }
    })
    .await;
    let listed = dlq_reasons(&env).await;
    assert!(!listed.is_empty() && listed.iter().all(|(_, reason)| reason == "unroutable"), "{listed:?}");
    drop(policy);
    env.cleanup().await;
}

/// The scheduler declares `P.plans` and binds it to `plan.approved` before it
/// says it is listening: an approved plan published the moment it does (here
/// `mandatory`, so an unroutable one would come back) reaches the scheduler.
/// Before, the binding came with the results session, after the line, and on a
/// broker where no scheduler had run yet such an event was dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_plan_published_as_soon_as_the_scheduler_listens_is_routed() {
    let env = TestEnv::new("topo-plans").await;
    let channel = env.conn.create_channel().await.expect("channel");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirms");
    let _scheduler = procs::scheduler(&env.env(), &[]).await;
    let confirm = channel
        .basic_publish(
            ShortString::from(env.topo.events_exchange()),
            ShortString::from("plan.approved"),
            BasicPublishOptions { mandatory: true, ..Default::default() },
            b"{\"not\": \"a plan\"}",
            task_properties("not-a-plan", &TraceParent::new_root().header(), 0),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(matches!(confirm, Confirmation::Ack(None)), "routed, not returned: {confirm:?}");
    // It reached the scheduler: an unreadable event is dead-lettered, not dropped.
    let dead = env.wait_dead(1).await;
    assert_eq!(dead.len(), 1, "the event reached the scheduler and was dead-lettered");
    assert_eq!(dead[0].reason.as_deref(), Some("invalid_task"));
    env.cleanup().await;
}
