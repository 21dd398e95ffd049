//! The bench itself is tested: a small-N run of each scenario completes and
//! its JSON parses. Figures are never asserted (this machine is shared and noisy).

use std::process::Command;

use flota_tests::procs;

fn bench(scenario: &str, n: &str, extra: &[&str]) -> serde_json::Value {
    let out =
        std::env::temp_dir().join(format!("flota-bench-{scenario}-{}.json", uuid::Uuid::new_v4().simple()));
    let prefix = format!("t-bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let status = Command::new(procs::binary("flotactl"))
        .args(["bench", "--scenario", scenario, "--n", n, "--concurrency", "8", "--json"])
        .arg(&out)
        .args(extra)
        .env("FLOTA_PREFIX", &prefix)
        .status()
        .expect("flotactl built");
    assert!(status.success(), "bench {scenario} failed");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).expect("bench JSON");
    let _ = std::fs::remove_file(out);
    v
}

#[test]
fn every_scenario_runs_and_writes_json() {
    // Repeated: each run beside its own ceiling (the second with the ceiling first), then medians.
    let overhead = bench("overhead", "100", &["--ceiling", "--repeat", "2"]);
    let rows = overhead.as_array().expect("an array of rows");
    assert_eq!(rows.len(), 3, "{overhead}");
    for (i, row) in rows[..2].iter().enumerate() {
        assert_eq!(row["run"], i + 1, "{row}");
        assert!(row["tasks_per_s"].is_number() && row["ceiling_tasks_per_s"].is_number(), "{row}");
        assert!(row["ratio_cpu_per_task"].is_number() && row.get("summary").is_none(), "{row}");
        // Every process switches threads at least once over 100 tasks, the ceiling too.
        assert!(row["switches_per_task"].as_f64().is_some_and(|s| s > 0.0), "{row}");
        assert!(row["ratio_switches_per_task"].is_number(), "{row}");
    }
    assert_eq!(rows[2]["summary"], "median of 2 runs", "{overhead}");
    assert!(rows[2]["ratio_tasks_per_s"].is_number() && rows[2]["cpu_s_per_1000"].is_number());
    assert!(bench("gpu-bound", "60", &[])[0]["gpu_utilisation"].is_number());
    assert!(bench("deliberation", "6", &[])[0]["p50_ms"].is_number());
    assert_eq!(bench("scale", "40", &[]).as_array().unwrap().len(), 3);
    assert!(bench("producers", "100", &[])[0]["submit_p99_ms"].is_number());
    // Mixed: both kinds' latencies, each from its own tasks (10 deliberations, 10 interpretations).
    let mixed = &bench("mixed", "20", &[])[0];
    assert_eq!(mixed["tasks"], 20, "{mixed}");
    for field in ["interpret_p50_ms", "interpret_p99_ms", "deliberate_p50_ms", "deliberate_p99_ms"] {
        assert!(mixed[field].as_f64().is_some_and(|ms| ms > 0.0), "{field}: {mixed}");
    }
    // A single-kind run has no latency of the other kind.
    assert!(overhead[0]["deliberate_p99_ms"].is_null() && overhead[0]["interpret_p99_ms"].is_number());
    // The ceiling alone (what ops/bench-instructions.sh profiles): its own figures, no Flota run.
    let alone = bench("overhead", "100", &["--ceiling-only"]);
    assert_eq!(alone[0]["scenario"], "Overhead (ceiling only)", "{alone}");
    assert!(alone[0]["tasks_per_s"].is_number() && alone[0]["ceiling_tasks_per_s"].is_number(), "{alone}");
}

/// `--api`: the bench measures a fleet it did not start, under the caller's
/// prefix, finding the worker through its heartbeat (its RSS is reported),
/// and leaves the fleet running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bench_measures_a_running_fleet() {
    let env = flota_tests::TestEnv::new("bench-attach").await;
    let gpu = procs::gpusim(&[]).await;
    let scheduler = procs::scheduler(&env.env(), &[]).await;
    let _worker = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let api = scheduler.url();
    flota_tests::eventually("the worker's heartbeat is visible", || async {
        let list: serde_json::Value =
            reqwest::get(format!("{api}/v1/workers")).await.unwrap().json().await.unwrap();
        list.as_array().is_some_and(|l| !l.is_empty())
    })
    .await;
    let out = std::env::temp_dir().join(format!("flota-bench-attach-{}.json", env.prefix));
    let pid = scheduler.pid().to_string();
    let run = tokio::process::Command::new(procs::binary("flotactl"))
        .args(["bench", "--scenario", "overhead", "--n", "60", "--api", &api, "--gpu", &gpu.url()])
        .args(["--scheduler-pid", &pid, "--repeat", "2", "--json"])
        .arg(&out)
        .envs(env.env())
        .status();
    let status =
        tokio::time::timeout(flota_tests::PATIENCE, run).await.expect("bench ends").expect("flotactl");
    assert!(status.success(), "bench --api failed");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).expect("bench JSON");
    let _ = std::fs::remove_file(&out);
    // Two runs against the same fleet (each waits for its own results), then their medians.
    assert_eq!(v.as_array().map(Vec::len), Some(3), "{v}");
    assert_eq!((v[0]["run"].as_u64(), v[1]["run"].as_u64()), (Some(1), Some(2)), "{v}");
    assert_eq!(v[2]["summary"], "median of 2 runs", "{v}");
    let f = &v[0];
    assert_eq!(f["tasks"], 60, "{f}");
    assert_eq!(f["workers"], 1, "{f}");
    assert_eq!(f["worker_peak_rss_mb"].as_array().map(Vec::len), Some(1), "the local worker was found: {f}");
    assert!(f["tasks_per_s"].is_number() && f["cpu_s_per_1000"].is_number(), "{f}");
    // The fleet is still there and still working: the bench stopped nothing.
    let mut tap = env.tap_results().await;
    env.publish_task(
        &serde_json::json!({"id": "after-bench", "kind": "interpret", "input": {"message": "hola"}}),
    )
    .await;
    assert_eq!(tap.next().await.expect("a result").id, "after-bench");
    env.cleanup().await;
}

/// The ceiling loop has no deliberation: `--ceiling` with the mixed scenario is
/// refused before anything starts, and says why.
#[test]
fn the_mixed_scenario_refuses_a_ceiling_and_says_why() {
    let out = Command::new(procs::binary("flotactl"))
        .args(["bench", "--scenario", "mixed", "--n", "10", "--ceiling"])
        .env("FLOTA_PREFIX", format!("t-bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]))
        .output()
        .expect("flotactl built");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("one GPU call per task"), "{stderr}");
}
