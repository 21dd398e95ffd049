//! Dependencies end to end: parked tasks wait without spinning, are released
//! the moment their last dependency succeeds, fail when one fails (through
//! every level), and cycles and missing dependencies end with their codes.

use std::collections::HashMap;

use flota_shared::envelope::{ErrorCode, Status};
use flota_tests::{TestEnv, procs};
use serde_json::json;

fn interp(id: &str, deps: &[String], message: &str) -> serde_json::Value {
    json!({"id": id, "kind": "interpret", "input": {"message": message}, "depends_on": deps})
}

/// Deterministic shuffle (no rand dependency; the order only has to be scrambled).
fn scramble<T>(items: &mut [T]) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..items.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        items.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dag_published_in_random_order_runs_in_topological_order() {
    let env = TestEnv::new("dag").await;
    let gpu = procs::gpusim(&[]).await;
    let _scheduler = procs::scheduler(&env.env(), &[]).await;
    let _w1 = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let _w2 = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let mut tap = env.tap_results().await;

    // 1,000 tasks; task i depends on up to three earlier tasks.
    let n = 1000;
    let mut deps: Vec<Vec<String>> = Vec::with_capacity(n);
    for i in 0..n {
        let mut d: Vec<String> = [i / 2, i / 3, i.saturating_sub(7)]
            .into_iter()
            .filter(|&j| j < i)
            .map(|j| format!("dag-{j}"))
            .collect();
        d.sort();
        d.dedup();
        deps.push(d);
    }
    let mut tasks: Vec<serde_json::Value> = (0..n)
        .map(|i| interp(&format!("dag-{i}"), &deps[i], &format!("Abrí un trabajo para revisar la bomba {i}")))
        .collect();
    scramble(&mut tasks);
    for t in &tasks {
        env.publish_task(t).await;
    }

    let (results, duplicates) = tap.collect_distinct(n).await;
    assert_eq!(results.len(), n, "every task of the DAG finished");
    let _ = duplicates; // re-reports are allowed on the wire; the scheduler records once
    for i in 0..n {
        let r = &results[&format!("dag-{i}")];
        assert_eq!(r.status, Status::Succeeded, "dag-{i}: {:?}", r.error);
        for d in &deps[i] {
            let dep = &results[d];
            assert!(
                r.started_at >= dep.finished_at,
                "dag-{i} started {} before {d} finished {}",
                r.started_at,
                dep.finished_at
            );
        }
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_propagates_through_three_levels_and_missing_dependencies_time_out() {
    let env = TestEnv::new("depfail").await;
    // A message longer than the simulated context window gets a 400: a deterministic failure.
    let gpu = procs::gpusim(&["--max-context-chars", "3000"]).await;
    let _scheduler = procs::scheduler(&env.env(), &[]).await;
    let _w = procs::worker(&env.env(), &gpu.url(), &[("FLOTA_DEPENDENCY_TIMEOUT_MS", "3000")]).await;
    let mut tap = env.tap_results().await;

    let long = "revisar la bomba ".repeat(300);
    // Dependents first, so they park before their dependency fails.
    env.publish_task(&interp("lvl-3", &["lvl-2".into()], "Abrí un trabajo para pintar")).await;
    env.publish_task(&interp("lvl-2", &["lvl-1".into()], "Abrí un trabajo para limpiar")).await;
    env.publish_task(&interp("lvl-1", &["root".into()], "Abrí un trabajo para medir")).await;
    env.publish_task(&interp("orphan", &["never-submitted".into()], "Abrí un trabajo para esperar")).await;
    env.publish_task(&interp("root", &[], &long)).await;

    let (results, _) = tap.collect_distinct(5).await;
    assert_eq!(results["root"].error_code(), Some(ErrorCode::InvalidRequest), "{:?}", results["root"]);
    for id in ["lvl-1", "lvl-2", "lvl-3"] {
        assert_eq!(results[id].error_code(), Some(ErrorCode::DependencyFailed), "{id}: {:?}", results[id]);
    }
    assert_eq!(results["orphan"].error_code(), Some(ErrorCode::DependencyTimeout));
    // Nothing of the failed chain reached the GPU: only root's one refused call.
    let stats: serde_json::Value =
        reqwest::get(format!("{}/stats", gpu.url())).await.unwrap().json().await.unwrap();
    assert_eq!(stats["served"], 0);
    assert_eq!(stats["errors_400"], 1, "a 400 is not retried");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cycles_are_refused_at_submit_and_caught_at_run_time() {
    let env = TestEnv::new("cycle").await;
    let gpu = procs::gpusim(&[]).await;
    let scheduler = procs::scheduler(&env.env(), &[]).await;
    let _w = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let mut tap = env.tap_results().await;
    let http = reqwest::Client::new();

    // Through the API: refused at submit time, nothing published.
    let resp = http
        .post(format!("{}/v1/tasks", scheduler.url()))
        .json(&json!([interp("cx", &["cy".into()], "hola"), interp("cy", &["cx".into()], "hola")]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "dependency_cycle", "{body}");

    // Straight to RabbitMQ: caught when the second one parks.
    env.publish_task(&interp("ra", &["rb".into()], "Abrí un trabajo para a")).await;
    env.publish_task(&interp("rb", &["ra".into()], "Abrí un trabajo para b")).await;
    let (results, _) = tap.collect_distinct(2).await;
    let mut codes: Vec<_> = results.values().map(|r| r.error_code()).collect();
    codes.sort_by_key(|c| format!("{c:?}"));
    assert_eq!(codes, vec![Some(ErrorCode::DependencyCycle), Some(ErrorCode::DependencyFailed)]);
    let scheduled: HashMap<_, _> = results.iter().map(|(k, v)| (k.clone(), v.status)).collect();
    assert!(scheduled.values().all(|s| *s == Status::Failed));
    env.cleanup().await;
}

/// Recorded state does not pile up in Redis: from its record on, a task's hash
/// and ledger live `FLOTA_RESULT_TTL_MS` more (a week by default), and so does
/// the note of which dependents failed with it (plans: `councils_plans.rs`);
/// with 0 they are kept for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_state_is_kept_for_the_retention_then_expires() {
    let hour: i64 = 3_600_000;
    let week: i64 = 7 * 24 * hour;
    for (name, setting, limit) in
        [("keep-default", None, week), ("keep-hour", Some("3600000"), hour), ("keep-all", Some("0"), -1)]
    {
        let env = TestEnv::new(name).await;
        let gpu = procs::gpusim(&["--max-context-chars", "3000"]).await;
        let mut vars = env.env();
        vars.extend(setting.map(|ms| ("FLOTA_RESULT_TTL_MS".to_string(), ms.to_string())));
        let scheduler = procs::scheduler(&vars, &[]).await;
        let worker = procs::worker(&env.env(), &gpu.url(), &[]).await;
        // `after` parks on `root`, which fails (too long for gpusim's window), so it fails with it.
        env.publish_task(&interp("after", &["root".into()], "Abrí un trabajo para pintar")).await;
        env.publish_task(&interp("root", &[], &"revisar la bomba ".repeat(300))).await;
        flota_tests::wait_recorded(&scheduler.url(), 2, 2).await;
        let keys = &env.store.keys;
        let because = format!("{}:failed_because:root", keys.tag());
        for key in [keys.task("root"), keys.ledger("root"), keys.task("after"), because] {
            let left = env.pttl(&key).await;
            if limit < 0 {
                assert_eq!(left, -1, "{name}: {key} is kept for ever");
            } else {
                assert!(left > 0 && left <= limit, "{name}: {key} expires within {limit} ms, has {left}");
            }
        }
        drop((worker, scheduler, gpu));
        env.cleanup().await;
    }
}
