//! The dashboard in real headless Chromium against a running fleet: what it
//! shows (queues, live workers with their breaker, failures, dead letters),
//! that it refreshes itself,
//! with a screenshot kept as test output.

use std::path::Path;
use std::process::Command;

use flota_tests::{TestEnv, procs};
use serde_json::json;

fn chromium(args: &[&str], url: &str) -> std::process::Output {
    let profile = tempdir();
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=6000",
            &format!("--user-data-dir={}", profile.display()),
        ])
        .args(args)
        .arg(url)
        .output()
        .expect("chromium installed (ops/test.sh installs Debian's chromium)");
    let _ = std::fs::remove_dir_all(profile);
    out
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("flota-chromium-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet() {
    let env = TestEnv::new("dash").await;
    let gpu = procs::gpusim(&[]).await;
    let scheduler = procs::scheduler(&env.env(), &[]).await;
    let _w = procs::worker(&env.env(), &gpu.url(), &[("FLOTA_WORKER_ID", "dash-worker-1")]).await;
    let mut tap = env.tap_results().await;
    for i in 0..50 {
        env.publish_task(&json!({"id": format!("ok-{i}"), "kind": "interpret", "input": {"message": "Abrí un trabajo para medir"}})).await;
    }
    // One failure (unknown council) and one dead letter (poison).
    env.publish_task(
        &json!({"id": "fails-1", "kind": "deliberate", "input": {"role": "NOBODY", "task": "x"}}),
    )
    .await;
    env.publish_raw(
        "interpret",
        b"{broken",
        flota_shared::amqp::task_properties(
            "x",
            &flota_shared::telemetry::TraceParent::new_root().header(),
            0,
        ),
    )
    .await;
    let _ = tap.collect_distinct(51).await;
    // Let the scheduler record them and the heartbeat land.
    let http = reqwest::Client::new();
    for _ in 0..300 {
        let s: serde_json::Value =
            http.get(format!("{}/v1/stats", scheduler.url())).send().await.unwrap().json().await.unwrap();
        let w: Vec<serde_json::Value> =
            http.get(format!("{}/v1/workers", scheduler.url())).send().await.unwrap().json().await.unwrap();
        if !s["recent_failures"].as_array().unwrap().is_empty() && s["dead_letters"] == 1 && !w.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    let url = format!("{}/", scheduler.url());
    let dom = chromium(&["--dump-dom"], &url);
    let html = String::from_utf8_lossy(&dom.stdout);
    assert!(html.contains("data-loaded=\"true\""), "the page loaded its data:\n{html}");
    // It updates itself: within Chromium's virtual 6 s the 2 s timer fetched again.
    let refreshes: u32 = html
        .split("data-refreshes=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(refreshes >= 2, "the page refreshed itself ({refreshes} times)");
    assert!(html.contains(&env.topo.work_queue(flota_shared::envelope::Kind::Interpret)), "queues listed");
    assert!(html.contains("dash-worker-1"), "live worker listed");
    assert!(html.contains("closed"), "breaker state shown");
    assert!(html.contains("fails-1") && html.contains("invalid_task"), "recent failure shown");
    assert!(html.contains("id=\"dead-letters\">1<"), "dead-letter count shown");
    assert!(html.contains("<path"), "throughput chart drawn");

    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-output");
    std::fs::create_dir_all(&out_dir).unwrap();
    let shot = out_dir.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let r = chromium(&["--window-size=1280,900", &format!("--screenshot={}", shot.display())], &url);
    assert!(shot.is_file(), "screenshot written: {}", String::from_utf8_lossy(&r.stderr));
    env.cleanup().await;
}
