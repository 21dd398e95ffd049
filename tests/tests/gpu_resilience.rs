//! The GPU server failing in every way: the breaker opens, interpretations
//! degrade, deliberations wait in their queue without spending attempts,
//! 4xx are final, hung calls end by their deadline, and the fleet-wide cap
//! holds however many workers run.

use flota_shared::envelope::{ErrorCode, InterpretOutput, Status};
use flota_tests::{TestEnv, eventually, procs};
use serde_json::json;

async fn stats(gpu: &procs::Proc) -> serde_json::Value {
    reqwest::get(format!("{}/stats", gpu.url())).await.unwrap().json().await.unwrap()
}

async fn faults(gpu: &procs::Proc, body: serde_json::Value) {
    let r =
        reqwest::Client::new().post(format!("{}/admin/faults", gpu.url())).json(&body).send().await.unwrap();
    assert!(r.status().is_success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_opens_the_breaker_degrades_interpretations_and_parks_deliberations() {
    let env = TestEnv::new("outage").await;
    let gpu = procs::gpusim(&["--error-rate", "1"]).await;
    let worker = procs::worker(&env.env(), &gpu.url(), &[("FLOTA_GPU_RETRIES", "2")]).await;
    let mut tap = env.tap_results().await;

    // Trip the breaker with a few interpretations.
    for i in 0..30 {
        env.publish_task(&json!({"id": format!("o-{i}"), "kind": "interpret", "input": {"message": "Abrí un trabajo para cambiar la bomba"}}))
            .await;
    }
    let (interps, _) = tap.collect_distinct(30).await;
    assert_eq!(interps.len(), 30, "nothing lost during the outage");
    let degraded = interps
        .values()
        .filter(|r| {
            r.status == Status::Succeeded
                && serde_json::from_value::<InterpretOutput>(r.output.clone().unwrap())
                    .is_ok_and(|o| o.degraded)
        })
        .count();
    assert!(degraded > 0, "with the breaker open interpretations come back degraded");
    let during = stats(&gpu).await;
    let calls = during["errors_500"].as_u64().unwrap();
    // 30 tasks × 3 calls each would be 90 without a breaker; it must cut that short.
    assert!(calls < 60, "GPU requests during the outage stay bounded, saw {calls}");

    // The worker notices the open breaker and cancels its deliberation consumer.
    let metrics_url = format!("{}/metrics", worker.url());
    let mut metrics = String::new();
    for _ in 0..600 {
        metrics = reqwest::get(&metrics_url).await.unwrap().text().await.unwrap();
        if metrics.contains("flota_consuming_deliberations 0") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(metrics.contains("flota_consuming_deliberations 0"), "deliberations paused:\n{metrics}");
    assert!(metrics.contains("flota_breaker_transitions_total{to=\"open\"}"));

    // Deliberations published while open wait in their queue, not in retries.
    for i in 0..3 {
        env.publish_task(&json!({"id": format!("d-{i}"), "kind": "deliberate", "input": {"role": "QA", "task": "Plan the regression suite"}}))
            .await;
    }
    assert_eq!(env.queue_depth(&env.topo.work_queue(flota_shared::envelope::Kind::Deliberate)).await, 3);

    // Recovery: the probe succeeds, deliberations are consumed again and finish on their first attempt.
    faults(&gpu, json!({"error_rate": 0.0})).await;
    let (delibs, _) = tap.collect_distinct(3).await;
    assert_eq!(delibs.len(), 3);
    for r in delibs.values() {
        assert_eq!(r.status, Status::Succeeded, "{:?}", r.error);
        assert_eq!(r.attempts, 1, "no attempt spent while the breaker was open");
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_final_and_429s_are_retried() {
    let env = TestEnv::new("4xx").await;
    let gpu = procs::gpusim(&["--rate-400", "1"]).await;
    let _worker = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let mut tap = env.tap_results().await;
    env.publish_task(&json!({"id": "refused", "kind": "interpret", "input": {"message": "hola"}})).await;
    let r = tap.next().await.unwrap();
    assert_eq!(r.error_code(), Some(ErrorCode::InvalidRequest));
    assert_eq!(stats(&gpu).await["errors_400"], 1, "not retried");

    faults(&gpu, json!({"rate_400": 0.0, "rate_429": 0.5, "retry_after_secs": 1})).await;
    for i in 0..6 {
        env.publish_task(&json!({"id": format!("busy-{i}"), "kind": "interpret", "input": {"message": "Abrí un trabajo para medir"}}))
            .await;
    }
    let (results, _) = tap.collect_distinct(6).await;
    assert!(results.values().all(|r| r.status == Status::Succeeded), "429s retried until served");
    assert!(stats(&gpu).await["errors_429"].as_u64().unwrap() > 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_calls_end_by_their_deadline() {
    let env = TestEnv::new("hang").await;
    let gpu = procs::gpusim(&["--hang-rate", "1"]).await;
    let _worker =
        procs::worker(&env.env(), &gpu.url(), &[("FLOTA_GPU_TIMEOUT_MS", "500"), ("FLOTA_GPU_RETRIES", "1")])
            .await;
    let mut tap = env.tap_results().await;
    for i in 0..8 {
        env.publish_task(&json!({"id": format!("h-{i}"), "kind": "interpret", "input": {"message": "hola"}, "timeout_ms": 20000}))
            .await;
    }
    // Every task ends: degraded (breaker opened on slow calls) or failed; none hangs.
    let (results, _) = tap.collect_distinct(8).await;
    assert_eq!(results.len(), 8);
    assert!(
        results.values().any(|r| r.output.as_ref().is_some_and(|o| o["degraded"] == true)),
        "slow calls opened the breaker"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_wide_cap_holds_across_workers() {
    let env = TestEnv::new("cap").await;
    let gpu = procs::gpusim(&["--slots", "64", "--base-ms", "40"]).await;
    let cap = [("FLOTA_GPU_MAX_INFLIGHT", "16"), ("FLOTA_CONCURRENCY", "32")];
    let _w1 = procs::worker(&env.env(), &gpu.url(), &cap).await;
    let _w2 = procs::worker(&env.env(), &gpu.url(), &cap).await;
    let w3 = procs::worker(&env.env(), &gpu.url(), &cap).await;
    let mut tap = env.tap_results().await;
    for i in 0..300 {
        env.publish_task(&json!({"id": format!("c-{i}"), "kind": "interpret", "input": {"message": "Abrí un trabajo para revisar"}}))
            .await;
    }
    let _ = tap.collect_distinct(100).await;
    // A worker killed while holding permits: its leases expire, the cap is not shrunk for good.
    w3.signal("KILL").await;
    let (rest, _) = tap.collect_distinct(150).await;
    assert!(!rest.is_empty());
    let s = stats(&gpu).await;
    let peak = s["peak_in_flight"].as_u64().unwrap();
    assert!(peak <= 16, "gpusim saw {peak} requests at once; the cap is 16");
    assert!(peak >= 2, "the cap is shared, not serialised: peak {peak}");
    env.cleanup().await;
}

/// The worker's breaker transitions to `to` so far, from its `/metrics`.
async fn transitions(worker: &procs::Proc, to: &str) -> f64 {
    let scrape = reqwest::get(format!("{}/metrics", worker.url())).await.unwrap().text().await.unwrap();
    flota_tests::metric_sample(&scrape, &format!("flota_breaker_transitions_total{{to=\"{to}\"}}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_server_opens_the_breaker() {
    let env = TestEnv::new("slow").await;
    // Every call takes 3 s more than it should; the worker allows 300 ms.
    let gpu = procs::gpusim(&["--slow-rate", "1", "--slow-ms", "3000"]).await;
    let worker =
        procs::worker(&env.env(), &gpu.url(), &[("FLOTA_GPU_TIMEOUT_MS", "300"), ("FLOTA_GPU_RETRIES", "0")])
            .await;
    let mut tap = env.tap_results().await;
    for i in 0..20 {
        env.publish_task(
            &json!({"id": format!("s-{i}"), "kind": "interpret", "input": {"message": "Abrí un trabajo"}}),
        )
        .await;
    }
    let (results, _) = tap.collect_distinct(20).await;
    assert_eq!(results.len(), 20, "nothing lost");
    assert!(results.values().all(|r| r.status == Status::Succeeded), "slow calls are retried, then degraded");
    assert!(
        results.values().any(|r| r.output.as_ref().is_some_and(|o| o["degraded"] == true)),
        "timed-out calls count as failures and open the breaker"
    );
    assert!(transitions(&worker, "open").await >= 1.0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_half_open_probe_reopens_the_breaker() {
    let env = TestEnv::new("hungprobe").await;
    let gpu = procs::gpusim(&["--error-rate", "1"]).await;
    let worker = procs::worker(&env.env(), &gpu.url(), &[("FLOTA_GPU_RETRIES", "0")]).await;
    let mut tap = env.tap_results().await;
    for i in 0..10 {
        env.publish_task(
            &json!({"id": format!("hp-{i}"), "kind": "interpret", "input": {"message": "hola"}}),
        )
        .await;
    }
    eventually("the breaker opens", || async { transitions(&worker, "open").await >= 1.0 }).await;
    // Recovering, but every call now hangs: the probe must end by its own timeout.
    faults(&gpu, json!({"error_rate": 0.0, "hang_rate": 1.0})).await;
    let (half_open, open) = (transitions(&worker, "half_open").await, transitions(&worker, "open").await);
    eventually("a probe is let through", || async { transitions(&worker, "half_open").await > half_open })
        .await;
    // Nothing answers with an error any more: only the hung probe's timeout can re-open it.
    eventually("the hung probe re-opens the breaker", || async { transitions(&worker, "open").await > open })
        .await;
    // Healthy again: the next probe closes it and the waiting work completes.
    let closed = transitions(&worker, "closed").await;
    faults(&gpu, json!({"hang_rate": 0.0})).await;
    eventually("the breaker closes", || async { transitions(&worker, "closed").await > closed }).await;
    let (results, _) = tap.collect_distinct(10).await;
    assert_eq!(results.len(), 10, "nothing lost");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_gpu_permits_come_back() {
    let env = TestEnv::new("permits").await;
    // Every call hangs: the first worker fills the whole fleet cap and holds it.
    let gpu = procs::gpusim(&["--hang-rate", "1"]).await;
    let cap = [("FLOTA_GPU_MAX_INFLIGHT", "4"), ("FLOTA_GPU_TIMEOUT_MS", "1000"), ("FLOTA_GPU_RETRIES", "0")];
    let holder = procs::worker(&env.env(), &gpu.url(), &cap).await;
    let mut tap = env.tap_results().await;
    for i in 0..8 {
        env.publish_task(&json!({"id": format!("p-{i}"), "kind": "interpret", "input": {"message": "Abrí un trabajo"}, "timeout_ms": 120000}))
            .await;
    }
    let inflight = env.store.keys.gpu_inflight();
    let held = || async {
        let mut c = env.store.conn().await.unwrap();
        redis::cmd("ZCARD").arg(&inflight).query_async::<u64>(&mut c).await.unwrap()
    };
    eventually("the cap is full", || async { held().await == 4 }).await;
    // Killed while holding permits: nobody releases them; their leases must expire.
    holder.signal("KILL").await;
    faults(&gpu, json!({"hang_rate": 0.0})).await;
    let _other = procs::worker(&env.env(), &gpu.url(), &cap).await;
    let (results, _) = tap.collect_distinct(8).await;
    assert_eq!(results.len(), 8, "nothing lost");
    for (id, r) in &results {
        let degraded = r.output.as_ref().is_some_and(|o| o["degraded"] == true);
        assert!(
            r.status == Status::Succeeded && !degraded,
            "{id} ran on the GPU once the dead leases expired: {r:?}"
        );
    }
    eventually("no permit is left held", || async { held().await == 0 }).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_respected() {
    let env = TestEnv::new("retryafter").await;
    // Every call is refused with 429 and `Retry-After: 2`.
    let gpu = procs::gpusim(&["--rate-429", "1", "--retry-after-secs", "2"]).await;
    let _worker = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let mut tap = env.tap_results().await;
    env.publish_task(&json!({"id": "ra-1", "kind": "interpret", "input": {"message": "Abrí un trabajo"}}))
        .await;
    let refusals = || async {
        let log: Vec<serde_json::Value> =
            reqwest::get(format!("{}/debug/requests", gpu.url())).await.unwrap().json().await.unwrap();
        log.into_iter().filter(|r| r["status"] == 429).filter_map(|r| r["at"].as_u64()).collect::<Vec<u64>>()
    };
    eventually("three 429s", || async { refusals().await.len() >= 3 }).await;
    faults(&gpu, json!({"rate_429": 0.0})).await;
    let r = tap.next().await.unwrap();
    assert_eq!(r.status, Status::Succeeded, "served once the server accepts");
    // The only task waited at least Retry-After between its tries (a lower bound:
    // a slow machine only makes the gaps longer). Without it, backoff alone is far shorter.
    let mut at = refusals().await;
    at.sort();
    for pair in at.windows(2) {
        assert!(
            pair[1] - pair[0] >= 1900,
            "retried {} ms after a 429 with Retry-After: 2",
            pair[1] - pair[0]
        );
    }
    env.cleanup().await;
}

/// gpusim's request log (oldest first), as much of it as it holds (up to 1000).
async fn requests(gpu: &procs::Proc) -> Vec<serde_json::Value> {
    let url = format!("{}/debug/requests?limit=1000", gpu.url());
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

fn is_probe(r: &serde_json::Value) -> bool {
    r["user"] == "flota-probe"
}

async fn scrape(worker: &procs::Proc, series: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", worker.url())).await.unwrap().text().await.unwrap();
    flota_tests::metric_sample(&text, series)
}

/// The breaker's open state and the probe lease live in Redis: with three
/// replicas open, tasks send the server nothing, and a failing, then
/// recovering, server sees one probe at a time from the whole fleet, never one
/// per replica side by side; the first healthy probe closes every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_probe_at_a_time_reaches_a_recovering_server_from_three_workers() {
    const RETRIES: u64 = 1;
    const PARKED: usize = 30;
    let env = TestEnv::new("oneprobe").await;
    let gpu = procs::gpusim(&["--error-rate", "1"]).await;
    let retries = RETRIES.to_string();
    let extra = [("FLOTA_GPU_RETRIES", retries.as_str())];
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(procs::worker(&env.env(), &gpu.url(), &extra).await);
    }
    let mut tap = env.tap_results().await;

    // Enough failing interpretations that every replica sees 5 failures in a row
    // (prefetch spreads them over the three) and opens its own breaker.
    for i in 0..PARKED {
        env.publish_task(
            &json!({"id": format!("trip-{i}"), "kind": "interpret", "input": {"message": "Abrí un trabajo"}}),
        )
        .await;
    }
    let (tripped, _) = tap.collect_distinct(PARKED).await;
    assert_eq!(tripped.len(), PARKED, "nothing lost while the breakers open");
    for (n, w) in workers.iter().enumerate() {
        eventually(&format!("worker {n} opens its own breaker"), || async {
            transitions(w, "open").await >= 1.0
        })
        .await;
        eventually(&format!("worker {n} acts on an open breaker and parks deliberations"), || async {
            scrape(w, "flota_breaker_state").await != 0.0
                && scrape(w, "flota_consuming_deliberations").await == 0.0
        })
        .await;
    }

    // With every breaker open, new work reaches no GPU: interpretations degrade
    // without a call, deliberations wait in their queue.
    let calls_before = requests(&gpu).await.iter().filter(|r| !is_probe(r)).count();
    for i in 0..PARKED {
        env.publish_task(
            &json!({"id": format!("open-{i}"), "kind": "interpret", "input": {"message": "Abrí un trabajo"}}),
        )
        .await;
    }
    for i in 0..3 {
        env.publish_task(&json!({"id": format!("wait-{i}"), "kind": "deliberate", "input": {"role": "QA", "task": "Plan the regression suite"}}))
            .await;
    }
    let (degraded, duplicates) = tap.collect_distinct(PARKED).await;
    assert_eq!(degraded.len(), PARKED, "nothing lost");
    assert_eq!(duplicates, 0, "each id one result");
    for (id, r) in &degraded {
        assert!(id.starts_with("open-"), "{id} answered while the breakers are open");
        assert!(
            r.status == Status::Succeeded && r.output.as_ref().is_some_and(|o| o["degraded"] == true),
            "{id} degraded without the GPU: {r:?}"
        );
    }

    // Several probe rounds against the failing server.
    let failed_probes =
        || async { requests(&gpu).await.iter().filter(|r| is_probe(r) && r["status"] == 500).count() };
    eventually("three probes fail", || async { failed_probes().await >= 3 }).await;
    let calls_open = requests(&gpu).await.iter().filter(|r| !is_probe(r)).count();
    assert_eq!(
        calls_open,
        calls_before,
        "while every breaker was open only probes reached the server; without the breaker \
         the {PARKED} interpretations would have sent up to {} calls",
        PARKED as u64 * (RETRIES + 1)
    );

    // Recovering, slowly: each probe now stays in flight for a second, so a
    // second replica probing alongside would show up as an overlap.
    faults(&gpu, json!({"error_rate": 0.0, "base_ms": 1000})).await;
    for (n, w) in workers.iter().enumerate() {
        eventually(&format!("worker {n}'s breaker closes"), || async {
            scrape(w, "flota_breaker_state").await == 0.0
        })
        .await;
    }
    faults(&gpu, json!({"base_ms": 0})).await;
    let (delibs, duplicates) = tap.collect_distinct(3).await;
    assert_eq!(delibs.len(), 3, "the parked deliberations are not lost");
    assert_eq!(duplicates, 0, "each id one result");
    for (id, r) in &delibs {
        assert!(id.starts_with("wait-"), "{id}");
        assert_eq!(r.status, Status::Succeeded, "{id}: {:?}", r.error);
        assert_eq!(r.attempts, 1, "{id} spent no attempt while the breakers were open");
    }

    let log = requests(&gpu).await;
    assert!(log.len() < 1000, "gpusim's log still holds every request");
    let mut probes: Vec<&serde_json::Value> = log.iter().filter(|r| is_probe(r)).collect();
    probes.sort_by_key(|r| r["arrived_at"].as_u64().unwrap());
    let failed = probes.iter().filter(|r| r["status"] == 500).count();
    let served = probes.iter().filter(|r| r["status"] == 200).count();
    assert!(probes.len() >= 2 && failed >= 3, "several probe rounds: {probes:?}");
    assert!(served >= 1, "a probe found the server healthy: {probes:?}");
    for pair in probes.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        assert!(
            b["arrived_at"].as_u64().unwrap() >= a["at"].as_u64().unwrap(),
            "two probes in flight at once: {a} and {b}"
        );
    }
    // The first healthy probe closes every replica's breaker (the others trust
    // it rather than probing again): fewer healthy probes than replicas.
    assert!(served < workers.len(), "{served} healthy probes for {} replicas", workers.len());
    // Each failed probe re-opened its sender's breaker (a replica probes only in
    // its own half-open period, and a failure ends it): the server saw no probe
    // the workers do not account for.
    let mut opened = 0.0;
    let mut half_opened = 0.0;
    for w in &workers {
        opened += transitions(w, "open").await;
        half_opened += transitions(w, "half_open").await;
    }
    assert!(
        failed as f64 <= opened - workers.len() as f64,
        "{failed} failed probes, {opened} openings of {} breakers",
        workers.len()
    );
    assert!(probes.len() as f64 <= half_opened, "{} probes, {half_opened} half-open periods", probes.len());
    assert!(
        (probes.len() as u64) < PARKED as u64 * (RETRIES + 1),
        "{} probes: fewer than the {} calls the parked interpretations' retries would be",
        probes.len(),
        PARKED as u64 * (RETRIES + 1)
    );
    env.cleanup().await;
}
