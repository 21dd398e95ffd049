//! Redis restarting under a running fleet, on a private `redis-server` (the
//! shared one is never stopped). With AOF persistence a parked task survives a
//! crash and runs when its dependency completes; without persistence the loss
//! is detected and reported by the scheduler, never silent.

use flota_shared::envelope::Status;
use flota_tests::private_redis::PrivateRedis;
use flota_tests::{TestEnv, eventually, procs};
use serde_json::json;

fn task(id: &str, deps: &[&str]) -> serde_json::Value {
    json!({"id": id, "kind": "interpret", "depends_on": deps,
           "input": {"message": format!("Abrí un trabajo para revisar la bomba {id}")}})
}

async fn data_loss_count(scheduler_url: &str) -> Option<u64> {
    let text = reqwest::get(format!("{scheduler_url}/metrics")).await.ok()?.text().await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("flota_redis_data_loss_total "))
        .and_then(|v| v.trim().parse().ok())
}

/// A fleet on a private Redis, with `child` parked on a `parent` not yet published.
async fn fleet_with_a_parked_task(
    name: &str,
    redis: &PrivateRedis,
) -> (TestEnv, procs::Proc, procs::Proc, procs::Proc, procs::Proc) {
    let env = TestEnv::with_vars(name, &[("FLOTA_REDIS_URL", &redis.url())]).await;
    let gpu = procs::gpusim(&[]).await;
    let scheduler = procs::scheduler(&env.env(), &[]).await;
    let worker = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let worker2 = procs::worker(&env.env(), &gpu.url(), &[]).await;
    env.publish_task(&task("child", &["parent"])).await;
    eventually("the child is parked", || async { env.store.parked_count().await.ok() == Some(1) }).await;
    // The scheduler has seen the epoch marker before the crash.
    eventually("the scheduler exports its metrics", || async {
        data_loss_count(&scheduler.url()).await == Some(0)
    })
    .await;
    (env, gpu, scheduler, worker, worker2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_aof_a_parked_task_survives_a_redis_crash() {
    let mut redis = PrivateRedis::start(true).await;
    let (env, _gpu, scheduler, _w1, _w2) = fleet_with_a_parked_task("redis-aof", &redis).await;
    let mut tap = env.tap_results().await;

    redis.crash_and_restart().await;
    assert_eq!(env.store.parked_count().await.ok(), Some(1), "AOF kept the parked task");

    // The fleet reconnects by itself; completing the parent releases the child.
    env.publish_task(&task("parent", &[])).await;
    let (results, _) = tap.collect_distinct(2).await;
    assert_eq!(results.get("parent").map(|r| r.status), Some(Status::Succeeded), "{results:?}");
    assert_eq!(results.get("child").map(|r| r.status), Some(Status::Succeeded), "{results:?}");
    assert_eq!(data_loss_count(&scheduler.url()).await, Some(0), "nothing was lost, nothing reported");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_persistence_the_loss_is_detected_and_reported() {
    let mut redis = PrivateRedis::start(false).await;
    let (env, _gpu, scheduler, _w1, _w2) = fleet_with_a_parked_task("redis-volatile", &redis).await;
    let mut tap = env.tap_results().await;
    env.publish_task(&task("before", &[])).await;
    let (results, _) = tap.collect_distinct(1).await;
    assert_eq!(results.get("before").map(|r| r.status), Some(Status::Succeeded), "{results:?}");
    let fence_before = fence_of(&env, "before").await.expect("a run leaves its fence");

    redis.crash_and_restart().await;
    assert_eq!(env.store.parked_count().await.ok(), Some(0), "the volatile Redis came back empty");
    eventually("the scheduler reports the loss", || async {
        data_loss_count(&scheduler.url()).await.is_some_and(|n| n >= 1)
    })
    .await;

    // The fleet keeps working on the new, empty Redis.
    env.publish_task(&task("after", &[])).await;
    let (results, _) = tap.collect_distinct(1).await;
    assert_eq!(results.get("after").map(|r| r.status), Some(Status::Succeeded), "{results:?}");
    // The fencing token still only grows, though Redis forgot the counter.
    let fence_after = fence_of(&env, "after").await.expect("a run leaves its fence");
    assert!(fence_after > fence_before, "fence went back: {fence_after} after {fence_before}");
    env.cleanup().await;
}

/// The fencing token of a task's last run, from its state hash.
async fn fence_of(env: &TestEnv, id: &str) -> Option<u128> {
    let mut c = env.store.conn().await.ok()?;
    let fence: Option<String> =
        redis::cmd("HGET").arg(env.store.keys.task(id)).arg("fence").query_async(&mut c).await.ok()?;
    fence?.parse().ok()
}
