//! A task the broker dead-letters by itself (over the work queue's
//! `x-delivery-limit`: every delivery ended without an ack), or that no queue
//! took (a routing key that is no kind, caught by the runbook's
//! alternate-exchange policy), gets a failed result from the scheduler, so its
//! status, its dependents and anyone tapping results learn of it; the message
//! stays in `P.dead`, and a replay runs it.

use futures::StreamExt;
use lapin::options::BasicNackOptions;
use serde_json::json;

use flota_shared::amqp::{self, HEADER_REASON, long_string, with_headers};
use flota_shared::envelope::{ErrorCode, Kind, ResultEnvelope, Status};
use flota_shared::telemetry::TraceParent;
use flota_tests::users::UnroutablePolicy;
use flota_tests::{TestEnv, consume, dlq_reasons, flotactl, procs};

fn interp(id: &str, deps: &[&str]) -> serde_json::Value {
    json!({"id": id, "kind": "interpret", "depends_on": deps,
           "input": {"message": format!("Abrí un trabajo para revisar la bomba {id}")}})
}

async fn status_of(api: &str, id: &str) -> (u16, serde_json::Value) {
    let r = reqwest::get(format!("{api}/v1/tasks/{id}")).await.expect("GET task");
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or_default())
}

/// The next result on the tap for `id` (others are skipped).
async fn result_for(tap: &mut flota_tests::ResultTap, id: &str) -> ResultEnvelope {
    loop {
        let r = tap.next().await.unwrap_or_else(|| panic!("a result for {id}"));
        if r.id == id {
            return r;
        }
    }
}

/// With a worker running: a task depending on the failed `id` fails with
/// `dependency_failed`; then, the cause gone, `flotactl dlq replay id` runs it
/// (its failure is set aside) and the scheduler records the success.
async fn dependent_fails_then_a_replay_runs_it(
    env: &TestEnv,
    tap: &mut flota_tests::ResultTap,
    api: &str,
    id: &str,
) {
    let dependent_id = format!("after-{id}");
    env.publish_task(&interp(&dependent_id, &[id])).await;
    let dependent = result_for(tap, &dependent_id).await;
    assert_eq!(dependent.error.map(|e| e.code), Some(ErrorCode::DependencyFailed));

    let (code, out, err) = flotactl(env, &["dlq", "replay", id]).await;
    assert_eq!(code, Some(0), "replay: {out} {err}");
    let replayed = result_for(tap, id).await;
    assert_eq!(replayed.status, Status::Succeeded, "{replayed:?}");
    flota_tests::eventually("the scheduler records the replay's success", || async {
        status_of(api, id).await.1["status"] == "succeeded"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_the_broker_dead_letters_is_failed_with_a_result_and_can_be_replayed() {
    // A delivery limit of 1: the second unacked return dead-letters the message.
    let limit = [("FLOTA_DELIVERY_LIMIT", "1")];
    let env = TestEnv::with_vars("broker-dl", &limit).await;
    let scheduler = procs::scheduler(&env.env(), &limit).await;
    let api = scheduler.url();
    let mut tap = env.tap_results().await;

    // A dead letter Flota wrote itself (it carries x-flota-reason): its task was
    // reported already, or had no id; the scheduler leaves it alone.
    let flota_dead = with_headers(
        &amqp::task_properties("flota-dl", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", 0),
        &[
            (HEADER_REASON, long_string("invalid_task")),
            ("x-first-death-queue", long_string(&env.topo.work_queue(Kind::Interpret))),
        ],
    );
    env.publisher
        .publish(
            &env.topo.dead_letter_exchange(),
            "",
            &serde_json::to_vec(&interp("flota-dl", &[])).unwrap(),
            flota_dead,
        )
        .await
        .expect("publish a Flota dead letter");

    // No worker: the test takes the task itself and returns it unacked, twice, as
    // two workers that died before claiming it would have.
    env.publish_task(&interp("doomed", &[])).await;
    let channel = env.conn.create_channel().await.expect("channel");
    let mut consumer = consume(&channel, &env.topo.work_queue(Kind::Interpret), "crashing").await;
    for _ in 0..2 {
        let delivery = consumer.next().await.expect("a delivery").expect("no error");
        delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await.expect("nack");
    }

    let failed = result_for(&mut tap, "doomed").await;
    assert_eq!(failed.status, Status::Failed);
    let error = failed.error.expect("an error");
    assert_eq!(error.code, ErrorCode::InvalidTask);
    assert!(error.message.contains("dead-lettered by RabbitMQ"), "{}", error.message);
    assert!(error.message.contains(&env.topo.work_queue(Kind::Interpret)), "{}", error.message);
    flota_tests::eventually("the scheduler records the failure", || async {
        status_of(&api, "doomed").await.1["status"] == "failed"
    })
    .await;
    // The message itself stays for the operators.
    let reasons = dlq_reasons(&env).await;
    assert!(reasons.contains(&("doomed".to_string(), "delivery_limit".to_string())), "{reasons:?}");
    // Nothing for the task whose dead letter Flota wrote: no result, unknown to the scheduler.
    assert_eq!(status_of(&api, "flota-dl").await.0, 404);

    // Its dependent learns of the failure like of any other.
    drop(consumer);
    let gpu = procs::gpusim(&[]).await;
    let _worker = procs::worker(&env.env(), &gpu.url(), &limit).await;
    dependent_fails_then_a_replay_runs_it(&env, &mut tap, &api, "doomed").await;
    assert_eq!(status_of(&api, "flota-dl").await.0, 404, "still nothing for Flota's own dead letter");
    env.cleanup().await;
}

/// A producer's typo: a task published to `P.tasks` with routing key `interpet`.
/// With the runbook's policy the broker dead-letters it instead of dropping it;
/// the scheduler fails it with a result that names the routing key, its
/// dependent fails, and once the producer is fixed a replay runs it by the kind
/// in its body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_task_is_failed_with_a_result_and_can_be_replayed() {
    let env = TestEnv::new("broker-unroutable").await;
    let _policy = UnroutablePolicy::set(&env);
    let scheduler = procs::scheduler(&env.env(), &[]).await;
    let api = scheduler.url();
    let mut tap = env.tap_results().await;

    // A policy applies within a moment; until then RabbitMQ drops what nobody
    // routes. Probes with no task id (which nobody can fail) show when it does.
    flota_tests::eventually("the alternate-exchange policy applies", || async {
        env.publish_raw(
            "probe",
            br#"{"probe": true}"#,
            amqp::task_properties("probe", &TraceParent::new_root().header(), 0),
        )
        .await;
        env.queue_depth(&env.topo.dead_queue()).await > 0
    })
    .await;

    let typo = interp("typo-1", &[]);
    let props = amqp::task_properties("typo-1", &TraceParent::new_root().header(), 0);
    env.publish_raw("interpet", &serde_json::to_vec(&typo).unwrap(), props).await;

    let failed = result_for(&mut tap, "typo-1").await;
    assert_eq!(failed.status, Status::Failed);
    let error = failed.error.expect("an error");
    assert_eq!(error.code, ErrorCode::InvalidTask);
    assert!(
        error.message.contains("unroutable") && error.message.contains("`interpet`"),
        "{}",
        error.message
    );
    flota_tests::eventually("the scheduler records the failure", || async {
        status_of(&api, "typo-1").await.1["status"] == "failed"
    })
    .await;
    let reasons = dlq_reasons(&env).await;
    assert!(reasons.contains(&("typo-1".to_string(), "unroutable".to_string())), "{reasons:?}");

    let gpu = procs::gpusim(&[]).await;
    let _worker = procs::worker(&env.env(), &gpu.url(), &[]).await;
    dependent_fails_then_a_replay_runs_it(&env, &mut tap, &api, "typo-1").await;
    env.cleanup().await;
}
