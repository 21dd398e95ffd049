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
