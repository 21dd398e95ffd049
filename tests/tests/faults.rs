//! Faults from ../shared/reliability.md on real services: killed, stopped and
//! drained workers, duplicate and requeued deliveries, and connections cut
//! under the fleet. After each: nothing lost, nothing applied twice.

use std::collections::HashMap;
use std::time::Duration;

use flota_shared::envelope::Status;
use flota_tests::proxy::FaultProxy;
use flota_tests::{TestEnv, procs};
use serde_json::json;

fn interp(id: &str) -> serde_json::Value {
    json!({"id": id, "kind": "interpret", "input": {"message": format!("Abrí un trabajo para revisar el equipo {id}")}})
}

async fn assert_applied_once(env: &TestEnv, ids: impl Iterator<Item = String>) {
    let mut doubles = Vec::new();
    let mut missing = Vec::new();
    for id in ids {
        let ledger = env.store.ledger(&id).await.unwrap();
        match ledger.applies {
            1 => {}
            0 => missing.push(id),
            _ => doubles.push(id),
        }
    }
    assert!(missing.is_empty(), "never applied: {missing:?}");
    assert!(doubles.is_empty(), "applied twice: {doubles:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_a_worker_holding_deliveries_loses_and_doubles_nothing() {
    let env = TestEnv::new("sigkill").await;
    let gpu = procs::gpusim(&["--base-ms", "5"]).await;
    let victim = procs::worker(&env.env(), &gpu.url(), &[("FLOTA_LOCK_LEASE_MS", "2000")]).await;
    let _survivor = procs::worker(&env.env(), &gpu.url(), &[("FLOTA_LOCK_LEASE_MS", "2000")]).await;
    let mut tap = env.tap_results().await;
    let n = 2000;
    for i in 0..n {
        env.publish_task(&interp(&format!("k-{i}"))).await;
    }
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 300 {
        seen.insert(tap.next().await.expect("results flow").id);
    }
    victim.signal("KILL").await;
    // Ids seen before the kill may be re-reported after it: count every id once.
    while seen.len() < n {
        seen.insert(tap.next().await.expect("the survivor finishes the victim's work").id);
    }
    for i in 0..n {
        let state = env.store.task_state(&format!("k-{i}")).await.unwrap().expect("known");
        assert_eq!(state.status, "succeeded", "k-{i}");
    }
    assert_applied_once(&env, (0..n).map(|i| format!("k-{i}"))).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_ids_twice_with_rogue_requeues_run_once() {
    let env = TestEnv::new("dupes").await;
    let gpu = procs::gpusim(&[]).await;
    let mut tap = env.tap_results().await;
    let n = 500;
    for round in 0..2 {
        for i in 0..n {
            env.publish_task(&interp(&format!("d-{i}"))).await;
        }
        let _ = round;
    }
    // A rogue consumer nack-requeues some deliveries before the workers start.
    {
        use futures::StreamExt;
        use lapin::options::{BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
        let ch = env.conn.create_channel().await.unwrap();
        ch.basic_qos(50, BasicQosOptions::default()).await.unwrap();
        let mut rogue = ch
            .basic_consume(
                lapin::types::ShortString::from(env.topo.work_queue(flota_shared::envelope::Kind::Interpret)),
                lapin::types::ShortString::from("rogue"),
                BasicConsumeOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap();
        for _ in 0..100 {
            let Some(Ok(d)) = rogue.next().await else { break };
            d.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await.unwrap();
        }
        ch.close(200, lapin::types::ShortString::from("rogue done")).await.unwrap();
    }
    let _w1 = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let _w2 = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let (results, _) = tap.collect_distinct(n).await;
    assert_eq!(results.len(), n);
    assert_applied_once(&env, (0..n).map(|i| format!("d-{i}"))).await;
    let stats: serde_json::Value =
        reqwest::get(format!("{}/stats", gpu.url())).await.unwrap().json().await.unwrap();
    assert_eq!(stats["served"], n as u64, "{n} executions for {} deliveries", 2 * n);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_frozen_past_its_lease_is_fenced_off() {
    let env = TestEnv::new("sigstop").await;
    // Slow GPU so the task is mid-flight when the worker freezes.
    let gpu = procs::gpusim(&["--base-ms", "3000"]).await;
    let lease = [("FLOTA_LOCK_LEASE_MS", "1000")];
    // Prefetch 1: the frozen worker cannot take the second copy (a stopped
    // process still gets deliveries pushed while its prefetch has room).
    let frozen =
        procs::worker(&env.env(), &gpu.url(), &[("FLOTA_LOCK_LEASE_MS", "1000"), ("FLOTA_CONCURRENCY", "1")])
            .await;
    let mut tap = env.tap_results().await;
    env.publish_task(&interp("fence-1")).await;
    // Wait until the frozen-to-be worker holds the task.
    for _ in 0..200 {
        if env.store.task_state("fence-1").await.unwrap().is_some_and(|s| s.status == "running") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    frozen.signal("STOP").await;
    // Its lease expires; the same task arrives again (a redelivery or a duplicate publish).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let other = procs::worker(&env.env(), &gpu.url(), &lease).await;
    env.publish_task(&interp("fence-1")).await;
    let first = tap.next().await.expect("a result");
    assert_eq!(first.status, Status::Succeeded);
    frozen.signal("CONT").await;
    // The resumed worker's late result is refused by the fence: applied once, fenced once.
    let mut ledger = env.store.ledger("fence-1").await.unwrap();
    for _ in 0..600 {
        if ledger.fenced >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        ledger = env.store.ledger("fence-1").await.unwrap();
    }
    assert_eq!(ledger.applies, 1, "{ledger:?}");
    assert!(ledger.fenced >= 1, "late work fenced off: {ledger:?}");
    drop(other);
    env.cleanup().await;
}

/// Sidekiq Pro's poison pill: a task whose every attempt ends with its worker gone
/// (here each worker is SIGKILLed while the task waits on the GPU) is given up once
/// `FLOTA_MAX_ATTEMPTS` attempts were abandoned — a failed result and a dead letter,
/// both saying why — instead of killing workers for ever. Without the rule the
/// third worker runs it a third time: each redelivery meets the dead attempt's lock,
/// is "busy" and comes back as a new message, so the delivery limit never counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_kills_its_workers_is_given_up_after_max_attempts() {
    let env = TestEnv::new("poison-pill").await;
    let gpu = procs::gpusim(&["--base-ms", "600000"]).await;
    let vars = [
        ("FLOTA_LOCK_LEASE_MS", "1000"),
        ("FLOTA_MAX_ATTEMPTS", "2"),
        ("FLOTA_CONCURRENCY", "1"),
        ("FLOTA_GPU_TIMEOUT_MS", "600000"),
    ];
    let mut tap = env.tap_results().await;
    env.publish_task(&interp("pill-1")).await;
    for attempt in 1..=2u64 {
        let worker = procs::worker(&env.env(), &gpu.url(), &vars).await;
        flota_tests::eventually(&format!("attempt {attempt} claimed pill-1"), || async {
            env.store.ledger("pill-1").await.unwrap().attempts == attempt
        })
        .await;
        worker.signal("KILL").await;
    }
    let _last = procs::worker(&env.env(), &gpu.url(), &vars).await;
    let result = tap.next().await.expect("a result");
    assert_eq!((result.id.as_str(), result.status), ("pill-1", Status::Failed), "{result:?}");
    let error = result.error.expect("an error");
    assert_eq!(error.code.as_str(), "invalid_task", "{error:?}");
    assert!(error.message.contains("given up after 2"), "{error:?}");
    let dead = env.wait_dead(1).await;
    assert_eq!(dead.len(), 1, "one dead letter");
    assert_eq!(dead[0].reason.as_deref(), Some("invalid_task"));
    assert!(dead[0].error.as_deref().unwrap_or("").contains("given up"), "{:?}", dead[0].error);
    let ledger = env.store.ledger("pill-1").await.unwrap();
    assert_eq!(
        (ledger.attempts, ledger.applies),
        (3, 1),
        "two abandoned attempts, then the give-up: {ledger:?}"
    );
    let stats: serde_json::Value =
        reqwest::get(format!("{}/stats", gpu.url())).await.unwrap().json().await.unwrap();
    assert_eq!(stats["served"], 0, "the GPU never answered any attempt: {stats}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero_losing_nothing() {
    let env = TestEnv::new("sigterm").await;
    let gpu = procs::gpusim(&["--base-ms", "50"]).await;
    let draining = procs::worker(&env.env(), &gpu.url(), &[("FLOTA_SHUTDOWN_GRACE", "30")]).await;
    let mut tap = env.tap_results().await;
    let n = 300;
    for i in 0..n {
        env.publish_task(&interp(&format!("t-{i}"))).await;
    }
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 50 {
        seen.insert(tap.next().await.expect("results flow").id);
    }
    assert_eq!(draining.terminate().await, Some(0), "drained and exited 0");
    let _finisher = procs::worker(&env.env(), &gpu.url(), &[]).await;
    while seen.len() < n {
        seen.insert(tap.next().await.expect("the rest is finished by another worker").id);
    }
    for i in 0..n {
        let s = env.store.task_state(&format!("t-{i}")).await.unwrap().expect("known");
        assert_eq!(s.status, "succeeded");
    }
    assert_applied_once(&env, (0..n).map(|i| format!("t-{i}"))).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connections_under_the_fleet_lose_and_double_nothing() {
    let env = TestEnv::new("cuts").await;
    let gpu = procs::gpusim(&["--base-ms", "5"]).await;
    let amqp_proxy = FaultProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let redis_proxy = FaultProxy::start("127.0.0.1:6379".parse().unwrap()).await;
    let amqp_url = env.config.amqp_url.replace("127.0.0.1:5672", &amqp_proxy.addr.to_string());
    let redis_url = env.config.redis_url.replace("127.0.0.1:6379", &redis_proxy.addr.to_string());
    let mut fleet_env: Vec<(String, String)> =
        env.env().into_iter().filter(|(k, _)| !k.ends_with("_URL")).collect();
    fleet_env.push(("FLOTA_AMQP_URL".into(), amqp_url));
    fleet_env.push(("FLOTA_REDIS_URL".into(), redis_url));
    // The scheduler sits behind the proxies too: it records every result and
    // releases the dependents below across the cuts.
    let scheduler = procs::scheduler(&fleet_env, &[]).await;
    let _w = procs::worker(&fleet_env, &gpu.url(), &[]).await;
    let mut tap = env.tap_results().await;
    let n = 1000;
    let dependents = 50;
    for i in 0..dependents {
        let mut t = interp(&format!("d-{i}"));
        t["depends_on"] = json!([format!("c-{}", i * 19)]);
        env.publish_task(&t).await;
    }
    for i in 0..n {
        env.publish_task(&interp(&format!("c-{i}"))).await;
    }
    let total = n + dependents;
    let mut seen: HashMap<String, Status> = HashMap::new();
    for cut in 0..3 {
        while seen.len() < (cut + 1) * 200 {
            let r = tap.next().await.expect("results keep coming");
            seen.insert(r.id.clone(), r.status);
        }
        amqp_proxy.cut_all();
        if cut == 1 {
            redis_proxy.cut_all();
        }
    }
    while seen.len() < total {
        let r = tap.next().await.expect("processing resumes after the cuts");
        seen.insert(r.id.clone(), r.status);
    }
    assert!(seen.values().all(|s| *s == Status::Succeeded));
    assert_applied_once(
        &env,
        (0..n).map(|i| format!("c-{i}")).chain((0..dependents).map(|i| format!("d-{i}"))),
    )
    .await;
    // The scheduler reconnected and recorded each task exactly once.
    flota_tests::wait_recorded(&scheduler.url(), total as u64, total as u64).await;
    let dead = env.drain_dead().await;
    assert!(
        dead.is_empty(),
        "dead-lettered across the cuts: {:?}",
        dead.iter().map(|d| &d.reason).collect::<Vec<_>>()
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_task_among_a_thousand_fails_alone() {
    let env = TestEnv::new("panic").await;
    let gpu = procs::gpusim(&[]).await;
    let worker = procs::worker(&env.env(), &gpu.url(), &[("FLOTA_FAULT_PANIC_ID", "p-500")]).await;
    let mut tap = env.tap_results().await;
    let n = 1000;
    for i in 0..n {
        env.publish_task(&interp(&format!("p-{i}"))).await;
    }
    let (results, _) = tap.collect_distinct(n).await;
    assert_eq!(results.len(), n);
    for (id, r) in &results {
        if id == "p-500" {
            assert_eq!(r.status, Status::Failed, "the panicking task fails");
        } else {
            assert_eq!(r.status, Status::Succeeded, "{id} unaffected");
        }
    }
    assert_eq!(worker.terminate().await, Some(0), "the worker survived the panic");
    env.cleanup().await;
}

/// Redis away for longer than the work queue's delivery limit of requeues would
/// last: tasks wait in the delay queues (no attempt spent, no requeue counted),
/// so nothing is dead-lettered and everything is applied once afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_redis_outage_dead_letters_nothing() {
    // A delivery limit of 3: the old nack-requeue loop would dead-letter within seconds.
    let env = TestEnv::with_vars("redisout", &[("FLOTA_DELIVERY_LIMIT", "3")]).await;
    let gpu = procs::gpusim(&["--base-ms", "5"]).await;
    let redis_proxy = FaultProxy::start("127.0.0.1:6379".parse().unwrap()).await;
    let redis_url = env.config.redis_url.replace("127.0.0.1:6379", &redis_proxy.addr.to_string());
    let mut fleet_env: Vec<(String, String)> =
        env.env().into_iter().filter(|(k, _)| k != "FLOTA_REDIS_URL").collect();
    fleet_env.push(("FLOTA_REDIS_URL".into(), redis_url));
    let _w = procs::worker(&fleet_env, &gpu.url(), &[("FLOTA_DELIVERY_LIMIT", "3")]).await;
    let mut tap = env.tap_results().await;
    let n = 300;
    for i in 0..200 {
        env.publish_task(&interp(&format!("r-{i}"))).await;
    }
    let mut seen: HashMap<String, Status> = HashMap::new();
    while seen.len() < 50 {
        let r = tap.next().await.expect("results before the outage");
        seen.insert(r.id.clone(), r.status);
    }
    redis_proxy.down(true);
    for i in 200..n {
        env.publish_task(&interp(&format!("r-{i}"))).await;
    }
    // The outage lasts a while (this is the fault, not a timing assertion).
    tokio::time::sleep(Duration::from_secs(12)).await;
    redis_proxy.down(false);
    while seen.len() < n {
        let r = tap.next().await.expect("processing resumes after the outage");
        seen.insert(r.id.clone(), r.status);
    }
    assert!(seen.values().all(|s| *s == Status::Succeeded));
    assert_applied_once(&env, (0..n).map(|i| format!("r-{i}"))).await;
    let dead = env.drain_dead().await;
    assert!(
        dead.is_empty(),
        "dead-lettered during the outage: {:?}",
        dead.iter().map(|d| (&d.reason, &d.error)).collect::<Vec<_>>()
    );
    env.cleanup().await;
}

/// The count behind the poison-pill rule, on Redis itself: an attempt that lets go
/// (unlock: a retry, a hand-back) is no takeover, and leaves the task `queued`; one
/// whose lease runs out is; a finished task's replay starts the count again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_abandoned_attempts_count_towards_giving_a_task_up() {
    use flota_shared::store::{Claim, Finish, Reopened};
    let env = TestEnv::new("takeovers").await;
    let (store, id) = (&env.store, "tk-1");
    let locks = store.lock_set(id, &[]);
    let lease = Duration::from_millis(300);
    // Claim with a limit of one takeover, looking again while the last attempt holds the lock.
    let claim = |token: &'static str| async move {
        loop {
            match store.claim(id, &[], b"", token, lease, "w", "interpret", 1).await.expect("claim") {
                Claim::Busy => tokio::time::sleep(Duration::from_millis(100)).await,
                other => return other,
            }
        }
    };

    assert!(matches!(claim("a").await, Claim::Run(_)));
    store.unlock(id, &locks, &[], "a").await.expect("unlock");
    let state = store.task_state(id).await.expect("state").expect("known");
    assert_eq!(state.status, "queued", "let go before a result, it waits for its next attempt");
    assert!(matches!(claim("b").await, Claim::Run(_)), "a clean let-go is no takeover");
    // b's worker dies holding the task: c takes over once the lease runs out.
    let fence = match claim("c").await {
        Claim::Abandoned { fence, takeovers: 1 } => fence,
        other => panic!("b was abandoned; one takeover is the limit: {other:?}"),
    };
    let failed = br#"{"status":"failed"}"#;
    assert_eq!(store.finish(id, "c", &fence, "failed", failed).await.expect("finish"), Finish::Applied);
    assert!(matches!(store.reopen(id).await.expect("reopen"), Reopened::Reopened));
    assert!(matches!(claim("d").await, Claim::Run(_)), "a replay starts the count again");
    match claim("e").await {
        Claim::Abandoned { takeovers: 1, .. } => {}
        other => panic!("d was abandoned, the first takeover since the replay: {other:?}"),
    }
    env.cleanup().await;
}
