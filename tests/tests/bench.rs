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
    let overhead = bench("overhead", "100", &["--ceiling"]);
    assert!(overhead[0]["tasks_per_s"].is_number() && overhead[0]["ceiling_tasks_per_s"].is_number());
    assert!(bench("gpu-bound", "60", &[])[0]["gpu_utilisation"].is_number());
    assert!(bench("deliberation", "6", &[])[0]["p50_ms"].is_number());
    assert_eq!(bench("scale", "40", &[]).as_array().unwrap().len(), 3);
    assert!(bench("producers", "100", &[])[0]["submit_p99_ms"].is_number());
}
