//! RabbitMQ crashing under a running fleet, on a private broker node (the
//! shared broker is never stopped). Workers and the scheduler reconnect by
//! themselves, re-declare, re-consume; messages in the quorum queues survive;
//! tasks parked before the crash are released after it; every task is applied
//! and recorded exactly once.

use flota_shared::amqp::{self, Publisher};
use flota_tests::private_rabbitmq::PrivateRabbitMq;
use flota_tests::{TestEnv, procs, wait_recorded};
use serde_json::json;

fn task(id: &str, deps: &[String]) -> serde_json::Value {
    json!({"id": id, "kind": "interpret", "depends_on": deps,
           "input": {"message": format!("Abrí un trabajo para revisar el tablero {id}")}})
}

async fn publish(publisher: &Publisher, env: &TestEnv, t: &serde_json::Value) {
    let id = t["id"].as_str().expect("id");
    let tp = flota_shared::telemetry::TraceParent::new_root().header();
    publisher
        .publish(
            &env.topo.tasks_exchange(),
            "interpret",
            &serde_json::to_vec(t).unwrap(),
            amqp::task_properties(id, &tp, 0),
        )
        .await
        .expect("publish confirmed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_crash_loses_and_doubles_nothing() {
    let mut broker = PrivateRabbitMq::start().await;
    let env = TestEnv::with_vars("rmq-crash", &[("FLOTA_AMQP_URL", &broker.url())]).await;
    let gpu = procs::gpusim(&["--base-ms", "20"]).await;
    let scheduler = procs::scheduler(&env.env(), &[]).await;
    let _w1 = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let _w2 = procs::worker(&env.env(), &gpu.url(), &[]).await;

    let (before, dependents, after) = (600, 20, 200);
    let total = (before + dependents + after) as u64;
    // Dependents wait (parked in Redis) for tasks that are published only after the crash.
    for i in 0..dependents {
        publish(&env.publisher, &env, &task(&format!("d-{i}"), &[format!("b-{i}")])).await;
    }
    for i in 0..before {
        publish(&env.publisher, &env, &task(&format!("a-{i}"), &[])).await;
    }
    wait_recorded(&scheduler.url(), 50, total).await;

    broker.crash_and_restart().await;

    // The test's own connection died with the broker; producers reconnect too.
    let conn = amqp::connect(&env.config, "test after the crash").await.expect("broker back");
    let publisher = Publisher::open(&conn).await.expect("publisher");
    for i in 0..after {
        publish(&publisher, &env, &task(&format!("b-{i}"), &[])).await;
    }
    wait_recorded(&scheduler.url(), total, total).await;

    let ids = (0..before)
        .map(|i| format!("a-{i}"))
        .chain((0..dependents).map(|i| format!("d-{i}")))
        .chain((0..after).map(|i| format!("b-{i}")));
    let mut wrong = Vec::new();
    for id in ids {
        let ledger = env.store.ledger(&id).await.expect("ledger");
        let state = env.store.task_state(&id).await.expect("state").map(|s| s.status);
        if ledger.applies != 1 || state.as_deref() != Some("succeeded") {
            wrong.push(format!("{id}: applies {} status {state:?}", ledger.applies));
        }
    }
    assert!(wrong.is_empty(), "not applied exactly once and succeeded: {wrong:?}");
    let _ = conn.close(200, lapin::types::ShortString::from("done")).await;
    // The private broker goes away with its data; only the Redis keys need deleting.
    env.cleanup().await;
}

/// A memory alarm longer than a publish's confirm timeout, on a private node
/// (it blocks every publisher of the node). The worker holds the deliveries
/// whose results it cannot publish yet, instead of giving them back each time
/// the confirm is late: a give-back spent one of the quorum queue's
/// `x-delivery-limit` deliveries (and a long alarm had the broker dead-letter
/// finished tasks), and each redelivery re-reported a stored result. When the
/// alarm clears, each result goes out once and each task is recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_memory_alarm_holds_results_and_spends_no_deliveries() {
    let broker = PrivateRabbitMq::start().await;
    let env = TestEnv::with_vars("rmq-alarm", &[("FLOTA_AMQP_URL", &broker.url())]).await;
    // Long enough GPU calls that the alarm is raised while the tasks run.
    let gpu = procs::gpusim(&["--base-ms", "2000"]).await;
    let scheduler = procs::scheduler(&env.env(), &[]).await;
    let worker = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let ids: Vec<String> = (0..3).map(|i| format!("alarm-{i}")).collect();
    for id in &ids {
        publish(&env.publisher, &env, &task(id, &[])).await;
    }
    flota_tests::eventually("the worker runs the three tasks", || async {
        let mut running = true;
        for id in &ids {
            let status = env.store.task_state(id).await.ok().flatten().map(|s| s.status);
            running &= status.as_deref() == Some("running");
        }
        running
    })
    .await;

    broker.memory_alarm(true).await;
    // Past the confirm timeout, with a margin: the old worker gave the deliveries back here.
    tokio::time::sleep(amqp::CONFIRM_TIMEOUT + std::time::Duration::from_secs(15)).await;
    broker.memory_alarm(false).await;

    wait_recorded(&scheduler.url(), 3, 3).await;
    for id in &ids {
        let state = env.store.task_state(id).await.expect("state").map(|s| s.status);
        assert_eq!(state.as_deref(), Some("succeeded"), "{id}");
        assert_eq!(env.store.ledger(id).await.expect("ledger").applies, 1, "{id}");
    }
    let scrape = reqwest::get(format!("{}/metrics", worker.url())).await.unwrap().text().await.unwrap();
    assert_eq!(
        flota_tests::metric_sample(&scrape, "flota_results_rereported_total"),
        0.0,
        "no delivery was given back and redelivered during the alarm"
    );
    assert!(env.drain_dead().await.is_empty(), "nothing dead-lettered");
    env.cleanup().await;
}
