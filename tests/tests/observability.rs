//! What an operator sees: metric values after a known workload, one trace id
//! followed across processes, and worker heartbeats that vanish with the worker.

use std::collections::HashMap;
use std::time::Duration;

use flota_shared::amqp;
use flota_shared::telemetry::TraceParent;
use flota_tests::{TestEnv, metric_sample as sample, procs};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_match_a_known_workload() {
    let env = TestEnv::new("metrics").await;
    let gpu = procs::gpusim(&[]).await;
    let worker = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let mut tap = env.tap_results().await;
    let messages: HashMap<&str, (&str, usize)> = HashMap::from([
        ("open", ("Abrí un trabajo para cambiar la bomba del pozo 3", 7)),
        ("confirm", ("Sí, confirmo", 4)),
        ("chat", ("thanks for your help yesterday", 3)),
    ]);
    let mut total = 0;
    for (kind, (message, n)) in &messages {
        for i in 0..*n {
            env.publish_task(
                &json!({"id": format!("{kind}-{i}"), "kind": "interpret", "input": {"message": message}}),
            )
            .await;
            total += 1;
        }
    }
    env.publish_task(&json!({"id": "delib", "kind": "deliberate", "input": {"role": "DATA", "task": "Clean up the events table"}}))
        .await;
    // Publishing a finished id again re-reports it without counting twice.
    env.publish_task(&json!({"id": "open-0", "kind": "interpret", "input": {"message": "Abrí un trabajo para cambiar la bomba del pozo 3"}}))
        .await;
    // Every task once, plus the re-report of open-0.
    let (mut seen, mut duplicates) = (std::collections::HashSet::new(), 0);
    while seen.len() < total + 1 || duplicates < 1 {
        let r = tap.next().await.expect("results");
        if !seen.insert(r.id) {
            duplicates += 1;
        }
    }
    let scrape = reqwest::get(format!("{}/metrics", worker.url())).await.unwrap().text().await.unwrap();
    assert_eq!(sample(&scrape, "wes_works_opened_total"), 7.0, "{scrape}");
    assert_eq!(sample(&scrape, "wes_semantic_confirmations_total"), 4.0);
    assert_eq!(sample(&scrape, "wes_proposals_accepted_total"), 1.0);
    assert_eq!(sample(&scrape, "wes_interpreter_latency_seconds_count"), 14.0);
    assert_eq!(sample(&scrape, "flota_tasks_total{kind=\"interpret\",outcome=\"succeeded\"}"), 14.0);
    assert_eq!(sample(&scrape, "flota_tasks_total{kind=\"deliberate\",outcome=\"succeeded\"}"), 1.0);
    assert_eq!(sample(&scrape, "flota_results_rereported_total"), 1.0);
    // 14 interpretations + 3 proposals + 6 reviews.
    assert_eq!(sample(&scrape, "flota_gpu_requests_total{outcome=\"ok\"}"), 23.0);
    assert_eq!(sample(&scrape, "flota_tasks_in_flight"), 0.0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_id_crosses_every_process() {
    let env = TestEnv::new("trace").await;
    let gpu = procs::gpusim(&[]).await;
    let _worker = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let mut tap = env.tap_results().await;
    let tp = TraceParent::new_root();
    let task =
        json!({"id": "traced", "kind": "interpret", "input": {"message": "Abrí un trabajo para medir"}});
    env.publish_raw(
        "interpret",
        task.to_string().as_bytes(),
        amqp::task_properties("traced", &tp.header(), 0),
    )
    .await;
    let r = tap.next().await.unwrap();
    assert_eq!(r.trace_id, tp.trace_id, "result envelope carries the producer's trace");
    // The GPU request carried it as a W3C header.
    let recent: Vec<serde_json::Value> =
        reqwest::get(format!("{}/debug/requests?limit=10", gpu.url())).await.unwrap().json().await.unwrap();
    let forwarded: Vec<TraceParent> =
        recent.iter().filter_map(|r| r["traceparent"].as_str()).filter_map(TraceParent::parse).collect();
    assert!(
        forwarded.iter().any(|t| t.trace_id == tp.trace_id),
        "traceparent forwarded to the GPU: {recent:?}"
    );
    assert!(forwarded.iter().all(|t| t.span_id != tp.span_id), "a child span, not the producer's");
    // The stored record has it too.
    let state = env.store.task_state("traced").await.unwrap().unwrap();
    assert!(state.result.unwrap().contains(&tp.trace_id));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_come_and_go_with_the_worker() {
    let env = TestEnv::new("beats").await;
    let gpu = procs::gpusim(&[]).await;
    let worker = procs::worker(&env.env(), &gpu.url(), &[("FLOTA_WORKER_ID", "beating-1")]).await;
    let scheduler = procs::scheduler(&env.env(), &[]).await;
    // What operators see: the scheduler's GET /v1/workers (read from the heartbeats).
    let live = || async {
        let r = reqwest::get(format!("{}/v1/workers", scheduler.url())).await.unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Vec<serde_json::Value>>().await.unwrap()
    };
    let mut beats = Vec::new();
    for _ in 0..100 {
        beats = live().await;
        if !beats.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(beats.len(), 1);
    let beat = &beats[0];
    assert_eq!(beat["id"], "beating-1");
    assert_eq!(beat["breaker"], "closed");
    assert_eq!(beat["concurrency"], 32);
    assert_eq!(beat["in_flight"], 0);
    assert!(beat["host"].as_str().is_some_and(|h| !h.is_empty()), "{beat}");
    assert!(beat["pid"].as_u64().is_some() && beat["started_at"].is_string() && beat["version"].is_string());
    worker.signal("KILL").await;
    // A killed worker cannot say goodbye: it disappears when its heartbeat's TTL runs out.
    let mut gone = false;
    for _ in 0..600 {
        if live().await.is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "a killed worker disappears after its TTL");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_task_and_trace_ids() {
    let env = TestEnv::new("jsonlog").await;
    let gpu = procs::gpusim(&[]).await;
    let dir = std::env::temp_dir().join(format!("flota-jsonlog-{}", env.prefix));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("worker.log");
    let mut worker_env = env.env();
    worker_env.push(("FLOTA_GPU_URL".into(), gpu.url()));
    worker_env.push(("FLOTA_METRICS_ADDR".into(), "127.0.0.1:0".into()));
    worker_env.push(("FLOTA_LOG_FORMAT".into(), "json".into()));
    worker_env.push(("RUST_LOG".into(), "info".into()));
    let worker =
        procs::Proc::start_with("flota-worker", &[], &worker_env, "ready", Some(&log)).await.unwrap();
    let mut tap = env.tap_results().await;
    let tp = TraceParent::new_root();
    let task = json!({"id": "logged", "kind": "deliberate", "input": {"role": "DEV", "task": "Plan it", "agents": 2}});
    env.publish_raw(
        "deliberate",
        task.to_string().as_bytes(),
        amqp::task_properties("logged", &tp.header(), 0),
    )
    .await;
    let _ = tap.next().await.unwrap();
    assert_eq!(worker.terminate().await, Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(!lines.is_empty(), "JSON lines: {text}");
    let about_task: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l.to_string().contains("\"logged\"")).collect();
    assert!(!about_task.is_empty(), "the task's processing is logged");
    for l in about_task {
        let span = &l["span"];
        assert_eq!(span["task_id"], "logged", "{l}");
        assert_eq!(span["trace_id"], tp.trace_id.as_str(), "{l}");
    }
    let _ = std::fs::remove_dir_all(dir);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_with_the_producers_trace_id() {
    use std::sync::{Arc, Mutex};
    // A minimal OTLP/HTTP collector: remembers every body POSTed to /v1/traces.
    let bodies: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let seen = bodies.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(body.to_vec());
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let env = TestEnv::new("otlp").await;
    let gpu = procs::gpusim(&[]).await;
    let worker =
        procs::worker(&env.env(), &gpu.url(), &[("OTEL_EXPORTER_OTLP_ENDPOINT", collector.as_str())]).await;
    let mut tap = env.tap_results().await;
    let tp = TraceParent::new_root();
    let task =
        json!({"id": "exported", "kind": "interpret", "input": {"message": "Abrí un trabajo para medir"}});
    env.publish_raw(
        "interpret",
        task.to_string().as_bytes(),
        amqp::task_properties("exported", &tp.header(), 0),
    )
    .await;
    let _ = tap.next().await.unwrap();
    // Draining flushes the batch exporter.
    assert_eq!(worker.terminate().await, Some(0));
    let raw_trace_id: Vec<u8> =
        (0..16).map(|i| u8::from_str_radix(&tp.trace_id[2 * i..2 * i + 2], 16).unwrap()).collect();
    let bodies: Vec<Vec<u8>> = bodies.lock().unwrap().clone();
    assert!(!bodies.is_empty(), "spans exported");
    assert!(
        bodies.iter().any(|b| b.windows(16).any(|w| w == raw_trace_id.as_slice())),
        "an exported span belongs to the producer's trace"
    );
    env.cleanup().await;
}
