//! Concurrency as the GPU sees it: a worker never has more than
//! `FLOTA_CONCURRENCY` tasks calling gpusim at once, yet does run that many
//! side by side; and one deliberation fans its agents' calls out at once,
//! whatever the worker's concurrency. gpusim's `/stats` counts requests in
//! flight (from arrival to answer) and keeps the peak, so these are counts,
//! never durations.

use std::collections::BTreeSet;
use std::time::Duration;

use flota_shared::envelope::{DeliberateOutput, Status};
use flota_tests::{PATIENCE, TestEnv, procs};
use serde_json::{Value, json};

async fn gpu_stats(gpu: &procs::Proc) -> Value {
    reqwest::get(format!("{}/stats", gpu.url())).await.unwrap().json().await.unwrap()
}

fn count(stats: &Value, field: &str) -> i64 {
    stats[field].as_i64().unwrap_or_else(|| panic!("/stats has no integer `{field}`: {stats}"))
}

fn served_kind(stats: &Value, kind: &str) -> u64 {
    stats["served_by_kind"][kind].as_u64().unwrap_or_else(|| panic!("/stats has no `{kind}` count: {stats}"))
}

/// Twelve interpretations queued before a worker with `FLOTA_CONCURRENCY=3`
/// starts: gpusim never has more than 3 of its requests in flight (or in
/// service), and has more than one at some point, since the worker is handed
/// 3 deliveries at once and starts them together. Every task succeeds, once,
/// with one GPU call each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_runs_up_to_its_concurrency_and_never_more() {
    const TASKS: usize = 12;
    let env = TestEnv::new("conc-cap").await;
    // 64 slots: gpusim itself never queues, so what it sees in flight is what the worker sends.
    let gpu = procs::gpusim(&["--base-ms", "300", "--slots", "64"]).await;
    let mut tap = env.tap_results().await;
    let ids: BTreeSet<String> = (0..TASKS).map(|i| format!("cap-{i:02}")).collect();
    for id in &ids {
        env.publish_task(&json!({"id": id, "kind": "interpret", "input": {"message": "Abrí un trabajo para revisar la bomba"}}))
            .await;
    }
    // Started after the tasks are queued, so its first prefetch is full.
    let _worker = procs::worker(&env.env(), &gpu.url(), &[("FLOTA_CONCURRENCY", "3")]).await;

    let (results, duplicates) = tap.collect_distinct(TASKS).await;
    assert_eq!(results.keys().cloned().collect::<BTreeSet<_>>(), ids, "every task reported");
    assert_eq!(duplicates, 0, "no task reported twice");
    for (id, r) in &results {
        assert_eq!(r.status, Status::Succeeded, "{id}: {:?}", r.error);
        assert_eq!(r.attempts, 1, "{id}");
    }

    let stats = gpu_stats(&gpu).await;
    let peak = count(&stats, "peak_in_flight");
    assert!(peak <= 3, "more GPU calls at once than FLOTA_CONCURRENCY=3: {stats}");
    assert!(count(&stats, "peak_busy_slots") <= 3, "{stats}");
    assert!(peak >= 2, "the worker ran its tasks one at a time: {stats}");
    assert_eq!(served_kind(&stats, "interpretation"), TASKS as u64, "one GPU call per task: {stats}");
    assert_eq!(stats["served"], json!(TASKS), "{stats}");
    env.cleanup().await;
}

/// A 5-agent deliberation on a worker with `FLOTA_CONCURRENCY=1`: all 5
/// proposals are in flight at gpusim before any of them is answered (so they
/// are sent together, not one after another), the peak is at least 5, and the
/// GPU serves exactly 5 proposals and 5×4 reviews.
///
/// The proposal round is observed by sampling `/stats` until the first
/// proposal is answered; a 2 s service time keeps the 5 in flight long enough
/// to be seen. Were they sequential, the sampling would see 1 in flight until
/// the first answer and fail at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_deliberation_sends_its_agents_calls_at_once() {
    const AGENTS: u64 = 5;
    let env = TestEnv::new("conc-fanout").await;
    let gpu = procs::gpusim(&["--base-ms", "2000", "--slots", "64"]).await;
    let _worker = procs::worker(&env.env(), &gpu.url(), &[("FLOTA_CONCURRENCY", "1")]).await;
    let mut tap = env.tap_results().await;
    env.publish_task(&json!({"id": "fanout-1", "kind": "deliberate", "input": {"role": "DEV", "task": "Refactor the exporter", "agents": AGENTS}}))
        .await;

    // Sample until 5 are in flight with nothing answered yet, or until the first answer.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut most_before_first_answer = 0;
    loop {
        let stats = gpu_stats(&gpu).await;
        if count(&stats, "served") > 0 || served_kind(&stats, "proposal") > 0 {
            panic!(
                "the first proposal was answered while at most {most_before_first_answer} of {AGENTS} were in flight: {stats}"
            );
        }
        most_before_first_answer = most_before_first_answer.max(count(&stats, "in_flight"));
        if most_before_first_answer >= AGENTS as i64 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never {AGENTS} calls in flight: {stats}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    let r = tap.next().await.expect("the deliberation reports");
    assert_eq!(r.id, "fanout-1");
    assert_eq!(r.status, Status::Succeeded, "{:?}", r.error);
    let out: DeliberateOutput = serde_json::from_value(r.output.unwrap()).unwrap();
    assert_eq!(out.proposals.len(), AGENTS as usize);
    assert_eq!(out.agents_failed, 0);

    let stats = gpu_stats(&gpu).await;
    assert!(count(&stats, "peak_in_flight") >= AGENTS as i64, "{stats}");
    assert_eq!(served_kind(&stats, "proposal"), AGENTS, "{stats}");
    assert_eq!(served_kind(&stats, "review"), AGENTS * (AGENTS - 1), "{stats}");
    assert_eq!(stats["served"], json!(AGENTS * AGENTS), "{stats}");
    env.cleanup().await;
}
