//! Concurrency as the GPU sees it: a worker never has more than
//! `FLOTA_CONCURRENCY` tasks calling gpusim at once, yet does run that many
//! side by side; and one deliberation fans its agents' calls out at once,
//! whatever the worker's concurrency. gpusim's `/stats` counts requests in
//! flight (from arrival to answer) and keeps the peak, so these are counts,
//! never durations.

use std::collections::BTreeSet;

use flota_shared::envelope::{DeliberateOutput, Kind, Status};
use flota_tests::{TestEnv, procs};
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
/// proposals reached gpusim before any of them was answered (so they were
/// sent together, not one after another), the peak is at least 5, and the
/// GPU serves exactly 5 proposals and 5×4 reviews.
///
/// Read afterwards from gpusim's own request log (arrival and answer times),
/// so a stall of the test process cannot change the verdict; a 2 s service
/// time leaves the worker ample room to send the round. Were the proposals
/// sequential, the second would arrive after the first was answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_deliberation_sends_its_agents_calls_at_once() {
    const AGENTS: u64 = 5;
    let env = TestEnv::new("conc-fanout").await;
    let gpu = procs::gpusim(&["--base-ms", "2000", "--slots", "64"]).await;
    let _worker = procs::worker(&env.env(), &gpu.url(), &[("FLOTA_CONCURRENCY", "1")]).await;
    let mut tap = env.tap_results().await;
    env.publish_task(&json!({"id": "fanout-1", "kind": "deliberate", "input": {"role": "DEV", "task": "Refactor the exporter", "agents": AGENTS}}))
        .await;

    let r = tap.next().await.expect("the deliberation reports");
    assert_eq!(r.id, "fanout-1");
    assert_eq!(r.status, Status::Succeeded, "{:?}", r.error);
    let out: DeliberateOutput = serde_json::from_value(r.output.unwrap()).unwrap();
    assert_eq!(out.proposals.len(), AGENTS as usize);
    assert_eq!(out.agents_failed, 0);

    let log: Vec<Value> = reqwest::get(format!("{}/debug/requests?limit=100", gpu.url()))
        .await
        .expect("gpusim answers /debug/requests")
        .json()
        .await
        .expect("a JSON list");
    let proposals: Vec<&Value> = log.iter().filter(|r| r["kind"] == "proposal").collect();
    assert_eq!(proposals.len(), AGENTS as usize, "{log:?}");
    let last_arrival = proposals.iter().filter_map(|r| r["arrived_at"].as_u64()).max().unwrap();
    let first_answer = proposals.iter().filter_map(|r| r["at"].as_u64()).min().unwrap();
    assert!(
        last_arrival < first_answer,
        "every proposal arrived before the first was answered (last arrival {last_arrival}, first answer {first_answer})"
    );

    let stats = gpu_stats(&gpu).await;
    assert!(count(&stats, "peak_in_flight") >= AGENTS as i64, "{stats}");
    assert_eq!(served_kind(&stats, "proposal"), AGENTS, "{stats}");
    assert_eq!(served_kind(&stats, "review"), AGENTS * (AGENTS - 1), "{stats}");
    assert_eq!(stats["served"], json!(AGENTS * AGENTS), "{stats}");
    env.cleanup().await;
}

/// What RabbitMQ counts unacknowledged on a test's two work queues, summed.
fn unacked_on_work_queues(env: &TestEnv) -> u64 {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "--no-table-headers", "name", "messages_unacknowledged"])
        .output()
        .expect("rabbitmqctl runs");
    let queues = [env.topo.work_queue(Kind::Interpret), env.topo.work_queue(Kind::Deliberate)];
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(name, _)| queues.iter().any(|q| q == name.trim()))
        .map(|(_, n)| n.trim().parse::<u64>().unwrap_or(0))
        .sum()
}

/// Both queues backed up before a worker with `FLOTA_CONCURRENCY=4` starts:
/// its consumers share the prefetch (`credit.rs`), so RabbitMQ never counts
/// more than 4 + 1 (the slack: an eighth, at least one) of its deliveries
/// unacknowledged (one prefetch per queue
/// held 8: 4 running, 4 waiting for a slot that another replica could have
/// run). Every task still succeeds, once: neither kind is starved.
///
/// Counts read with `rabbitmqctl` while the tasks run, each one a count, not
/// a duration; gpusim answers in 1.5 s so that the worker is busy throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_queues_backed_up_share_the_prefetch_and_both_progress() {
    const CONCURRENCY: u64 = 4;
    let env = TestEnv::new("conc-share").await;
    let gpu = procs::gpusim(&["--base-ms", "1500", "--slots", "64"]).await;
    let mut tap = env.tap_results().await;
    let mut ids = BTreeSet::new();
    for i in 0..10 {
        let id = format!("share-i-{i:02}");
        env.publish_task(&json!({"id": id, "kind": "interpret", "input": {"message": "Abrí un trabajo para revisar la bomba"}}))
            .await;
        ids.insert(id);
    }
    for i in 0..6 {
        let id = format!("share-d-{i:02}");
        env.publish_task(&json!({"id": id, "kind": "deliberate", "input": {"role": "DEV", "task": "Refactor the exporter", "agents": 2}}))
            .await;
        ids.insert(id);
    }
    let worker = procs::worker(&env.env(), &gpu.url(), &[("FLOTA_CONCURRENCY", "4")]).await;

    let results = tokio::spawn(async move { tap.collect_distinct(16).await });
    let mut samples = Vec::new();
    while !results.is_finished() {
        samples.push(unacked_on_work_queues(&env));
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let (results, duplicates) = results.await.expect("the tap");
    assert_eq!(results.keys().cloned().collect::<BTreeSet<_>>(), ids, "every task reported");
    assert_eq!(duplicates, 0, "no task reported twice");
    for (id, r) in &results {
        assert_eq!(r.status, Status::Succeeded, "{id}: {:?}", r.error);
    }
    assert!(samples.iter().any(|n| *n > 0), "the samples saw the worker holding tasks: {samples:?}");
    let most = samples.iter().copied().max().unwrap_or(0);
    // The slack of `credit.rs` at this concurrency: an eighth of it, at least one.
    const SLACK: u64 = 1;
    assert!(
        most <= CONCURRENCY + SLACK,
        "held {most} unacked with FLOTA_CONCURRENCY={CONCURRENCY}: {samples:?}"
    );
    // The worker shows its shares: both queues consumed, within the same bound.
    let scrape = reqwest::get(format!("{}/metrics", worker.url())).await.unwrap().text().await.unwrap();
    let share =
        |kind: &str| flota_tests::metric_sample(&scrape, &format!("flota_prefetch{{kind=\"{kind}\"}}"));
    let (interpret, deliberate) = (share("interpret"), share("deliberate"));
    assert!(interpret >= 1.0 && deliberate >= 1.0, "{scrape}");
    assert!(interpret + deliberate <= (CONCURRENCY + SLACK) as f64, "{scrape}");
    env.cleanup().await;
}
