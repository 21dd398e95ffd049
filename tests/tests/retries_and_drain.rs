//! Delivery guarantees end to end (issue 3): attempts that run out through the
//! retry queues, replaying dead letters with `flotactl`, a drain that hands back
//! what its grace cannot finish, dependencies submitted through the API, and a
//! fleet whose connections are black-holed and slowed. Real services only; every
//! wait is bounded by `PATIENCE`, never a speed claim.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use lapin::BasicProperties;
use lapin::options::{BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, ShortString};
use serde_json::{Value, json};

use flota_shared::amqp::{self, HEADER_ATTEMPT, HEADER_ERROR, HEADER_SOURCE_QUEUE};
use flota_shared::envelope::{ErrorCode, Kind, Status};
use flota_tests::proxy::FaultProxy;
use flota_tests::{
    PATIENCE, TestEnv, consume, dlq_reasons, eventually, flotactl, metric_sample, procs, wait_recorded,
};

/// The model gpusim serves by default (set so no `/v1/models` lookup is needed).
const GPUSIM_MODEL: &str = "flota-sim-1";

fn interp(id: &str) -> Value {
    json!({"id": id, "kind": "interpret", "input": {"message": format!("Abrí un trabajo para revisar la bomba {id}")}})
}

async fn gpu_stats(gpu: &procs::Proc) -> Value {
    let resp = reqwest::get(format!("{}/stats", gpu.url())).await.expect("gpusim answers /stats");
    resp.json().await.expect("gpusim /stats is JSON")
}

async fn metrics_of(p: &procs::Proc) -> String {
    let resp = reqwest::get(format!("{}/metrics", p.url())).await.expect("metrics answer");
    resp.text().await.expect("metrics text")
}

/// Every id's ledger shows exactly one applied result.
async fn each_applied_once(env: &TestEnv, ids: &[String]) {
    let mut wrong = Vec::new();
    for id in ids {
        let ledger = env.store.ledger(id).await.expect("ledger readable");
        if ledger.applies != 1 {
            wrong.push((id.clone(), ledger.applies));
        }
    }
    assert!(wrong.is_empty(), "applied other than once (id, applies): {wrong:?}");
}

/// P.dead is empty (what is there is taken, and named in the failure).
async fn nothing_dead(env: &TestEnv) {
    let dead: Vec<_> = env.drain_dead().await.into_iter().map(|d| (d.reason, d.error)).collect();
    assert!(dead.is_empty(), "dead-lettered (reason, error): {dead:?}");
}

/// A GPU that answers every call with a 500, a scheduler, and a worker that
/// makes one HTTP call per attempt (`FLOTA_GPU_RETRIES=0`) and gives up after
/// `max_attempts`.
async fn failing_fleet(env: &TestEnv, max_attempts: u32) -> (procs::Proc, procs::Proc, procs::Proc) {
    let gpu = procs::gpusim(&["--error-rate", "1"]).await;
    let scheduler = procs::scheduler(&env.env(), &[]).await;
    let attempts = max_attempts.to_string();
    let settings = [
        ("FLOTA_MAX_ATTEMPTS", attempts.as_str()),
        ("FLOTA_GPU_RETRIES", "0"),
        ("FLOTA_GPU_MODEL", GPUSIM_MODEL),
    ];
    let worker = procs::worker(&env.env(), &gpu.url(), &settings).await;
    (gpu, scheduler, worker)
}

/// Stop gpusim's injected errors: the GPU is back.
async fn heal(gpu: &procs::Proc) {
    let healed = reqwest::Client::new()
        .post(format!("{}/admin/faults", gpu.url()))
        .json(&json!({"error_rate": 0.0}))
        .send()
        .await
        .expect("gpusim admin");
    assert_eq!(healed.status(), 200);
}

/// `GET /v1/tasks/{id}`, `None` while unknown or unreachable.
async fn task_view(http: &reqwest::Client, api: &str, id: &str) -> Option<Value> {
    let resp = http.get(format!("{api}/v1/tasks/{id}")).send().await.ok()?;
    if resp.status() != 200 {
        return None;
    }
    resp.json().await.ok()
}

/// Wait until the scheduler shows `id` in a final state (succeeded or failed), and return it.
async fn final_view(http: &reqwest::Client, api: &str, id: &str) -> Value {
    eventually(&format!("{id} ends at the scheduler"), || async move {
        task_view(http, api, id).await.is_some_and(|v| v["status"] == "succeeded" || v["status"] == "failed")
    })
    .await;
    task_view(http, api, id).await.unwrap_or_default()
}

/// The queues an `x-death` header says a message was dead-lettered from, with why.
fn deaths(props: &BasicProperties) -> Vec<(String, String)> {
    let text = |v: Option<&AMQPValue>| match v {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(s)) => s.as_str().to_string(),
        _ => String::new(),
    };
    let Some(AMQPValue::FieldArray(list)) = props.headers().as_ref().and_then(|h| h.inner().get("x-death"))
    else {
        return Vec::new();
    };
    list.as_slice()
        .iter()
        .filter_map(|d| match d {
            AMQPValue::FieldTable(t) => Some((text(t.inner().get("queue")), text(t.inner().get("reason")))),
            _ => None,
        })
        .collect()
}

/// Every call fails with a 500; with `FLOTA_MAX_ATTEMPTS=2` each task tries,
/// waits in the 1 s delay queue, tries again, and then ends failed
/// `gpu_unavailable` *and* dead-lettered.
///
/// The breaker opens after five failed calls in a row (`BreakerSettings::default`,
/// not settable by environment) and an open breaker degrades interpretations to
/// chat instead of failing them. So the run is sized below that: two tasks, two
/// attempts each, one HTTP call per attempt (`FLOTA_GPU_RETRIES=0`) = four failed
/// calls. The test checks the breaker stayed closed, so it fails loudly if the
/// premise changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_exhaust_through_the_retry_queues_then_fail_and_dead_letter() {
    let env = TestEnv::new("exhaust").await;
    let max_attempts: u32 = 2;
    let (gpu, scheduler, worker) = failing_fleet(&env, max_attempts).await;
    let mut tap = env.tap_results().await;
    let ids: Vec<String> = (0..2).map(|i| format!("x-{i}")).collect();
    for id in &ids {
        env.publish_task(&interp(id)).await;
    }

    let (results, _) = tap.collect_distinct(ids.len()).await;
    assert_eq!(results.len(), ids.len(), "every task ends with a result");
    for id in &ids {
        let r = &results[id];
        assert_eq!(r.status, Status::Failed, "{id}: {r:?}");
        assert_eq!(r.error_code(), Some(ErrorCode::GpuUnavailable), "{id}: {r:?}");
        assert_eq!(r.attempts, max_attempts, "{id}: the failed result counts every attempt");
    }

    // Each message is in P.dead, with its reason, after passing through the 1 s delay queue.
    let dead = env.wait_dead(ids.len()).await;
    assert_eq!(dead.len(), ids.len(), "one dead letter per task");
    let retry_queue = env.topo.retry_queue(Kind::Interpret, 1_000);
    let mut dead_ids = HashSet::new();
    for d in &dead {
        let id = d.properties.message_id().as_ref().map(|m| m.as_str().to_string()).unwrap_or_default();
        assert_eq!(d.reason.as_deref(), Some(ErrorCode::GpuUnavailable.as_str()), "{id}");
        assert!(d.error.as_deref().is_some_and(|e| !e.is_empty()), "{id}: {HEADER_ERROR} is set");
        assert_eq!(
            amqp::header_str(&d.properties, HEADER_SOURCE_QUEUE),
            Some(env.topo.work_queue(Kind::Interpret)),
            "{id}"
        );
        assert_eq!(
            amqp::header_int(&d.properties, HEADER_ATTEMPT),
            Some(i64::from(max_attempts) - 1),
            "{id}: dead-lettered on its last attempt"
        );
        let went_through = deaths(&d.properties);
        assert!(
            went_through.iter().any(|(q, why)| *q == retry_queue && why == "expired"),
            "{id} never waited in {retry_queue}: x-death {went_through:?}"
        );
        let body: Value = serde_json::from_slice(&d.body).expect("the task body is kept");
        assert_eq!(body["id"], id.as_str(), "the dead letter is the task itself");
        dead_ids.insert(id);
    }
    assert_eq!(dead_ids, ids.iter().cloned().collect::<HashSet<_>>());

    // The GPU saw exactly one call per attempt, and none succeeded.
    let stats = gpu_stats(&gpu).await;
    assert_eq!(stats["errors_500"], json!(ids.len() as u32 * max_attempts), "{stats}");
    assert_eq!(stats["served"], 0, "{stats}");
    let m = metrics_of(&worker).await;
    assert_eq!(metric_sample(&m, "flota_task_retries_total"), (ids.len() as u32 * (max_attempts - 1)) as f64);
    assert_eq!(
        metric_sample(&m, "flota_breaker_transitions_total{to=\"open\"}"),
        0.0,
        "the breaker opened: this run no longer exercises exhausted attempts"
    );

    // One result each, recorded once, failed.
    wait_recorded(&scheduler.url(), ids.len() as u64, ids.len() as u64).await;
    let http = reqwest::Client::new();
    for id in &ids {
        let v = final_view(&http, &scheduler.url(), id).await;
        assert_eq!(v["status"], "failed", "{id}: {v}");
        assert_eq!(v["result"]["error"]["code"], "gpu_unavailable", "{id}: {v}");
    }
    each_applied_once(&env, &ids).await;
    env.cleanup().await;
}

/// Dead letters whose cause is gone come back with `flotactl dlq replay`: one by
/// id, then the rest with `--all`, and each then succeeds once. The causes here
/// are ones replay can fix: deliveries a crashing consumer returned until the
/// broker's delivery limit dead-lettered them. (A task published with a routing
/// key nobody binds, replayed by the kind in its body: `tests/topology.rs`.)
///
/// Not covered, on purpose: a task dead-lettered because its attempts ran out has
/// its failed result stored, and a replay only re-reports that result; see
/// `replaying_a_task_whose_attempts_ran_out_runs_it_again` below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_by_id_and_all_brings_tasks_back() {
    let limit = [("FLOTA_DELIVERY_LIMIT", "1")];
    let env = TestEnv::with_vars("replay", &limit).await;
    let crashed: Vec<String> = (0..3).map(|i| format!("rp-{i}")).collect();
    for id in &crashed {
        env.publish_task(&interp(id)).await;
    }

    // A consumer that dies on every delivery (it hands each one back) until the
    // broker's delivery limit dead-letters them all.
    {
        let ch = env.conn.create_channel().await.expect("channel");
        ch.basic_qos(10, BasicQosOptions::default()).await.expect("qos");
        let mut crashing = consume(&ch, &env.topo.work_queue(Kind::Interpret), "crashing").await;
        let dead_queue = env.topo.dead_queue();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while env.queue_depth(&dead_queue).await < crashed.len() as u32 {
            assert!(tokio::time::Instant::now() < deadline, "the delivery limit dead-lettered them all");
            // The broker dead-letters after the last nack, on its own time: poll
            // the depth again when nothing is delivered for a moment.
            match tokio::time::timeout(Duration::from_millis(200), crashing.next()).await {
                Ok(Some(Ok(d))) => {
                    d.acker
                        .nack(BasicNackOptions { requeue: true, ..Default::default() })
                        .await
                        .expect("nack");
                }
                Ok(other) => panic!("the consumer ended: {other:?}"),
                Err(_) => continue,
            }
        }
        let _ = ch.close(200, ShortString::from("crashed")).await;
    }
    let mut expected: Vec<(String, String)> =
        crashed.iter().map(|id| (id.clone(), "delivery_limit".to_string())).collect();
    expected.sort();
    assert_eq!(dlq_reasons(&env).await, expected, "what the operator sees before replaying");

    // The cause is gone: a healthy fleet.
    let gpu = procs::gpusim(&[]).await;
    let scheduler = procs::scheduler(&env.env(), &limit).await;
    let _worker = procs::worker(&env.env(), &gpu.url(), &limit).await;
    let (http, api) = (reqwest::Client::new(), scheduler.url());

    let (code, out, err) = flotactl(&env, &["dlq", "replay", &crashed[0]]).await;
    assert_eq!(code, Some(0), "{out} {err}");
    assert!(out.contains("replayed 1"), "{out} {err}");
    let v = final_view(&http, &api, &crashed[0]).await;
    assert_eq!(v["status"], "succeeded", "{v}");
    let rest: Vec<(String, String)> = expected.iter().filter(|(id, _)| *id != crashed[0]).cloned().collect();
    assert_eq!(dlq_reasons(&env).await, rest, "replaying one id leaves the others in place");

    let (code, out, err) = flotactl(&env, &["dlq", "replay", "--all"]).await;
    assert_eq!(code, Some(0), "{out} {err}");
    assert!(out.contains(&format!("replayed {}", rest.len())), "{out} {err}");
    let all: Vec<String> = expected.iter().map(|(id, _)| id.clone()).collect();
    for id in &all {
        let v = final_view(&http, &api, id).await;
        assert_eq!(v["status"], "succeeded", "{id}: {v}");
        assert_eq!(v["result"]["attempts"], 1, "{id}: a replay starts its attempts afresh: {v}");
    }
    wait_recorded(&api, all.len() as u64, all.len() as u64).await;
    assert_eq!(dlq_reasons(&env).await, Vec::<(String, String)>::new(), "P.dead is empty after the replays");
    assert_eq!(env.queue_depth(&env.topo.dead_queue()).await, 0);
    assert_eq!(gpu_stats(&gpu).await["served"], json!(all.len()), "each replayed task ran once");
    each_applied_once(&env, &all).await;
    env.cleanup().await;
}

/// What an operator expects of `flotactl dlq replay` after a GPU outage: the
/// task that ran out of attempts runs again once the GPU is back (replay
/// reopens a failed task in Redis; the failure stays as `previous_result`), and
/// the scheduler records the new outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_task_whose_attempts_ran_out_runs_it_again() {
    let env = TestEnv::new("replayx").await;
    let (gpu, scheduler, _worker) = failing_fleet(&env, 1).await;
    let mut tap = env.tap_results().await;
    env.publish_task(&interp("rx-1")).await;
    let first = tap.next().await.expect("a result");
    assert_eq!(first.error_code(), Some(ErrorCode::GpuUnavailable), "{first:?}");
    eventually("rx-1 dead-lettered", || async { env.queue_depth(&env.topo.dead_queue()).await == 1 }).await;
    wait_recorded(&scheduler.url(), 1, 1).await;

    // The GPU is back; the operator replays.
    heal(&gpu).await;
    let (code, out, err) = flotactl(&env, &["dlq", "replay", "rx-1"]).await;
    assert_eq!(code, Some(0), "{out} {err}");
    assert!(out.contains("replayed 1"), "{out} {err}");
    let again = tap.next().await.expect("the replay reports");
    assert_eq!(again.status, Status::Succeeded, "the replay re-reported the stored failure: {again:?}");
    let v = final_view(&reqwest::Client::new(), &scheduler.url(), "rx-1").await;
    assert_eq!(v["status"], "succeeded", "{v}");
    // The scheduler recorded the new outcome as a record of its own.
    wait_recorded(&scheduler.url(), 2, 2).await;
    let ledger = env.store.ledger("rx-1").await.expect("ledger");
    assert_eq!((ledger.replays, ledger.applies), (1, 2), "one replay, one result per run: {ledger:?}");
    assert_eq!(env.queue_depth(&env.topo.dead_queue()).await, 0, "nothing dead after the replay");
    // A second replay finds nothing to replay: the task is not run a third time.
    let (code, out, err) = flotactl(&env, &["dlq", "replay", "rx-1"]).await;
    assert_eq!(code, Some(0), "{out} {err}");
    assert!(out.contains("replayed 0"), "{out} {err}");
    env.cleanup().await;
}

/// The other side of the same rule: a task that succeeded keeps its result
/// when its message is replayed from `P.dead` (say, a copy an operator moved
/// there by hand): it is re-reported without a GPU call, applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_task_that_succeeded_re_reports_it_without_running_it() {
    let env = TestEnv::new("replayok").await;
    let gpu = procs::gpusim(&[]).await;
    let scheduler = procs::scheduler(&env.env(), &[]).await;
    let _worker = procs::worker(&env.env(), &gpu.url(), &[("FLOTA_GPU_MODEL", GPUSIM_MODEL)]).await;
    let mut tap = env.tap_results().await;
    let task = interp("ok-1");
    env.publish_task(&task).await;
    assert_eq!(tap.next().await.expect("a result").status, Status::Succeeded);
    wait_recorded(&scheduler.url(), 1, 1).await;

    let tp = flota_shared::telemetry::TraceParent::new_root().header();
    let body = serde_json::to_vec(&task).expect("json");
    env.publisher
        .publish(&env.topo.dead_letter_exchange(), "", &body, amqp::task_properties("ok-1", &tp, 0))
        .await
        .expect("a copy in P.dead");
    let (code, out, err) = flotactl(&env, &["dlq", "replay", "ok-1"]).await;
    assert_eq!(code, Some(0), "{out} {err}");
    assert!(out.contains("replayed 1"), "{out} {err}");
    assert!(err.contains("re-reported"), "the operator is told it did not run again: {err}");
    let again = tap.next().await.expect("the replay reports");
    assert_eq!(again.status, Status::Succeeded, "{again:?}");
    assert_eq!(gpu_stats(&gpu).await["served"], json!(1), "no second GPU call");
    let ledger = env.store.ledger("ok-1").await.expect("ledger");
    assert_eq!((ledger.replays, ledger.applies), (0, 1), "{ledger:?}");
    // The scheduler counts the re-report as a duplicate, not a second record.
    eventually("the scheduler sees the duplicate", || async {
        metric_sample(&metrics_of(&scheduler).await, "flota_results_duplicate_total") == 1.0
    })
    .await;
    wait_recorded(&scheduler.url(), 1, 1).await;
    env.cleanup().await;
}

/// SIGTERM with a one-second grace while every task hangs on the GPU: the worker
/// stops consuming, waits out its grace, hands every unfinished delivery back
/// un-acked and exits 0 having reported nothing. A second worker on a healthy
/// GPU then finishes all of them, each with exactly one result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_hands_back_what_the_grace_cannot_finish() {
    let env = TestEnv::new("handback").await;
    let hung = procs::gpusim(&["--hang-rate", "1"]).await;
    let concurrency = 4;
    let draining = procs::worker(
        &env.env(),
        &hung.url(),
        &[("FLOTA_SHUTDOWN_GRACE", "1"), ("FLOTA_CONCURRENCY", "4"), ("FLOTA_GPU_MODEL", GPUSIM_MODEL)],
    )
    .await;
    let ids: Vec<String> = (0..concurrency + 2).map(|i| format!("h-{i}")).collect();
    for id in &ids {
        env.publish_task(&interp(id)).await;
    }
    // In flight: the worker holds as many as it may run, all waiting on the GPU.
    eventually("the worker's tasks are all on the GPU", || async {
        gpu_stats(&hung).await["in_flight"] == json!(concurrency)
    })
    .await;

    assert_eq!(draining.terminate().await, Some(0), "drained and exited 0");
    let results_queue = env.topo.results_queue();
    assert_eq!(env.queue_depth(&results_queue).await, 0, "the drained worker reported nothing");
    // Every delivery is back in its queue, none acked away or dead-lettered.
    let work_queue = env.topo.work_queue(Kind::Interpret);
    eventually("every delivery handed back", || async {
        env.queue_depth(&work_queue).await == ids.len() as u32
    })
    .await;
    let mut claimed_once = 0;
    for id in &ids {
        claimed_once += env.store.ledger(id).await.expect("ledger").attempts;
    }
    assert_eq!(claimed_once, concurrency as u64, "the drained worker had started exactly {concurrency}");

    // The tap listens before the finisher starts: the handed-back tasks are
    // queued, so its first results can come before a later tap would exist.
    let mut tap = env.tap_results().await;
    let healthy = procs::gpusim(&[]).await;
    let finisher = procs::worker(&env.env(), &healthy.url(), &[]).await;
    let (results, _) = tap.collect_distinct(ids.len()).await;
    assert_eq!(results.len(), ids.len(), "none lost");
    assert!(results.values().all(|r| r.status == Status::Succeeded), "{results:?}");
    assert_eq!(finisher.terminate().await, Some(0));
    // Both workers are gone: P.results holds everything ever reported.
    assert_eq!(env.queue_depth(&results_queue).await, ids.len() as u32, "one result per task, none doubled");
    assert_eq!(gpu_stats(&healthy).await["served"], json!(ids.len()));
    each_applied_once(&env, &ids).await;
    nothing_dead(&env).await;
    env.cleanup().await;
}

/// A child submitted through `POST /v1/tasks` before its parent exists waits
/// (`waiting`, no GPU call), and runs once the parent, submitted later, succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn depends_on_via_the_api() {
    let env = TestEnv::new("apideps").await;
    let gpu = procs::gpusim(&[]).await;
    let scheduler = procs::scheduler(&env.env(), &[]).await;
    let _worker = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let (http, api) = (reqwest::Client::new(), scheduler.url());
    let submit = |task: Value| {
        let (http, api) = (&http, &api);
        async move {
            let resp = http.post(format!("{api}/v1/tasks")).json(&task).send().await.expect("submit");
            let status = resp.status();
            let body: Value = resp.json().await.unwrap_or_default();
            assert_eq!(status, 202, "{body}");
            body
        }
    };

    let mut child = interp("api-child");
    child["depends_on"] = json!(["api-parent"]);
    let accepted = submit(child).await;
    assert_eq!(accepted["ids"], json!(["api-child"]));
    eventually("the child waits for its parent", || async {
        task_view(&http, &api, "api-child").await.is_some_and(|v| v["status"] == "waiting")
    })
    .await;
    assert!(task_view(&http, &api, "api-parent").await.is_none(), "the parent is not known yet");
    assert_eq!(gpu_stats(&gpu).await["served"], 0, "a waiting child makes no GPU call");

    let accepted = submit(interp("api-parent")).await;
    assert_eq!(accepted["duplicates"], json!([]), "the child's wait did not register the parent");
    let parent = final_view(&http, &api, "api-parent").await;
    let child = final_view(&http, &api, "api-child").await;
    assert_eq!(parent["status"], "succeeded", "{parent}");
    assert_eq!(child["status"], "succeeded", "{child}");
    let (started, parent_done) = (&child["result"]["started_at"], &parent["result"]["finished_at"]);
    assert!(
        started.as_str().zip(parent_done.as_str()).is_some_and(|(s, f)| s >= f),
        "the child started {started} before its parent finished {parent_done}"
    );
    assert_eq!(child["result"]["attempts"], 1, "{child}");
    wait_recorded(&api, 2, 2).await;
    assert_eq!(gpu_stats(&gpu).await["served"], 2);
    each_applied_once(&env, &["api-parent".into(), "api-child".into()]).await;
    env.cleanup().await;
}

/// Connections that stay open but carry nothing (black hole), and slow ones
/// (delay), between a worker and both Redis and RabbitMQ during a run of 200
/// tasks: once healed, every task has one result, applied once, nothing dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holed_and_slow_connections_lose_and_double_nothing() {
    let env = TestEnv::new("blackhole").await;
    let gpu = procs::gpusim(&["--base-ms", "100"]).await;
    let amqp_proxy = FaultProxy::start("127.0.0.1:5672".parse().expect("addr")).await;
    let redis_proxy = FaultProxy::start("127.0.0.1:6379".parse().expect("addr")).await;
    let mut fleet_env: Vec<(String, String)> =
        env.env().into_iter().filter(|(k, _)| !k.ends_with("_URL")).collect();
    fleet_env.push((
        "FLOTA_AMQP_URL".into(),
        env.config.amqp_url.replace("127.0.0.1:5672", &amqp_proxy.addr.to_string()),
    ));
    fleet_env.push((
        "FLOTA_REDIS_URL".into(),
        env.config.redis_url.replace("127.0.0.1:6379", &redis_proxy.addr.to_string()),
    ));
    // The scheduler talks to the servers directly: it counts what the worker reports.
    let scheduler = procs::scheduler(&env.env(), &[]).await;
    let _worker = procs::worker(&fleet_env, &gpu.url(), &[("FLOTA_CONCURRENCY", "4")]).await;
    let mut tap = env.tap_results().await;
    let n = 200;
    let ids: Vec<String> = (0..n).map(|i| format!("b-{i}")).collect();
    for id in &ids {
        env.publish_task(&interp(id)).await;
    }

    let mut seen: HashMap<String, Status> = HashMap::new();
    let mut until = async |count: usize, seen: &mut HashMap<String, Status>| {
        while seen.len() < count {
            let r = tap.next().await.expect("results keep coming");
            seen.insert(r.id.clone(), r.status);
        }
    };
    // The faults last a while: these sleeps are the faults, not timing assertions.
    until(30, &mut seen).await;
    redis_proxy.black_hole(true);
    tokio::time::sleep(Duration::from_secs(4)).await;
    redis_proxy.black_hole(false);
    let work_queue = env.topo.work_queue(Kind::Interpret);
    assert!(
        env.queue_depth(&work_queue).await > 0,
        "the run ended before the Redis black hole: nothing tested"
    );

    until(80, &mut seen).await;
    redis_proxy.delay(Duration::from_millis(30));
    amqp_proxy.delay(Duration::from_millis(30));

    until(130, &mut seen).await;
    amqp_proxy.black_hole(true);
    tokio::time::sleep(Duration::from_secs(3)).await;
    amqp_proxy.black_hole(false);
    assert!(
        env.queue_depth(&work_queue).await > 0,
        "the run ended before the RabbitMQ black hole: nothing tested"
    );
    redis_proxy.delay(Duration::ZERO);
    amqp_proxy.delay(Duration::ZERO);

    until(n, &mut seen).await;
    assert!(seen.values().all(|s| *s == Status::Succeeded), "{seen:?}");
    each_applied_once(&env, &ids).await;
    wait_recorded(&scheduler.url(), n as u64, n as u64).await;
    nothing_dead(&env).await;
    env.cleanup().await;
}

/// Replaying a failed task brings back the tasks that failed only because it
/// did: those parked on it when it failed (failed by the scheduler), one that
/// arrived after (failed when it tried to park), and, transitively, a task
/// parked on one of those. Each runs again, once, after the replayed task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_failed_dependency_revives_the_tasks_that_failed_with_it() {
    replay_revives_dependents("revive", false).await;
}

/// The same after a replay that stopped between reopening the task and
/// reviving its dependents (the task is reopened, its dependents still failed,
/// its dead letter still there): the next replay revives them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_cut_short_before_reviving_is_finished_by_the_next() {
    replay_revives_dependents("revive-cut", true).await;
}

async fn replay_revives_dependents(name: &str, cut_short: bool) {
    let env = TestEnv::new(name).await;
    let (gpu, scheduler, _worker) = failing_fleet(&env, 1).await;
    let (http, api) = (reqwest::Client::new(), scheduler.url());
    let waiting_on = |id: &str, dep: &str| {
        let mut task = interp(id);
        task["depends_on"] = json!([dep]);
        task
    };
    env.publish_task(&waiting_on("rv-2", "rv-1")).await;
    env.publish_task(&waiting_on("rv-3", "rv-2")).await;
    eventually("rv-2 and rv-3 parked", || async { env.store.parked_count().await.unwrap_or(0) == 2 }).await;
    env.publish_task(&interp("rv-1")).await;
    for id in ["rv-1", "rv-2", "rv-3"] {
        assert_eq!(final_view(&http, &api, id).await["status"], "failed", "{id}");
    }
    env.publish_task(&waiting_on("rv-4", "rv-1")).await;
    let late = final_view(&http, &api, "rv-4").await;
    assert_eq!(late["result"]["error"]["code"], "dependency_failed", "{late}");
    eventually("rv-1 dead-lettered", || async { env.queue_depth(&env.topo.dead_queue()).await == 1 }).await;

    heal(&gpu).await;
    if cut_short {
        assert_eq!(env.store.reopen("rv-1").await.expect("reopen"), flota_shared::store::Reopened::Reopened);
    }
    let (code, out, err) = flotactl(&env, &["dlq", "replay", "rv-1"]).await;
    assert_eq!(code, Some(0), "{out} {err}");
    assert!(out.contains("replayed 1"), "{out} {err}");
    for id in ["rv-2", "rv-3", "rv-4"] {
        assert!(err.contains(id), "the operator is told {id} runs again: {err}");
    }
    for id in ["rv-1", "rv-2", "rv-3", "rv-4"] {
        eventually(&format!("{id} succeeds on the replay"), || async {
            task_view(&http, &api, id).await.is_some_and(|v| v["status"] == "succeeded")
        })
        .await;
        let ledger = env.store.ledger(id).await.expect("ledger");
        assert_eq!(ledger.replays, 1, "{id}: reopened once: {ledger:?}");
    }
    // Nothing is left to revive: a second replay of the (now empty) queue does nothing.
    let (code, out, err) = flotactl(&env, &["dlq", "replay", "--all"]).await;
    assert_eq!(code, Some(0), "{out} {err}");
    assert!(out.contains("replayed 0"), "{out} {err}");
    env.cleanup().await;
}
