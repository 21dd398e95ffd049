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

/// JSON log lines of a child's log file (lines that are not JSON are skipped).
fn json_lines(log: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// A directory for this test's log files.
fn log_dir(env: &TestEnv) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("flota-logs-{}", env.prefix));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedulers_scrape_shows_records_queues_parked_tasks_and_dead_letters() {
    let env = TestEnv::new("schedmetrics").await;
    let gpu = procs::gpusim(&[]).await;
    let _worker = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let scheduler = procs::scheduler(&env.env(), &[]).await;
    let opened = "Abrí un trabajo para cambiar la bomba del pozo 3";
    for i in 0..5 {
        env.publish_task(
            &json!({"id": format!("open-{i}"), "kind": "interpret", "input": {"message": opened}}),
        )
        .await;
    }
    env.publish_task(
        &json!({"id": "delib", "kind": "deliberate", "input": {"role": "QA", "task": "Test the pump API"}}),
    )
    .await;
    // Waits for a dependency nobody submits: parked (the default timeout is far off).
    env.publish_task(&json!({"id": "waiting", "kind": "interpret", "input": {"message": "ok"}, "depends_on": ["never-submitted"]}))
        .await;
    // Not JSON: dead-lettered by the worker.
    env.publish_raw(
        "interpret",
        b"{not json",
        amqp::task_properties("x", &TraceParent::new_root().header(), 0),
    )
    .await;
    let url = format!("{}/metrics", scheduler.url());
    let interpret_queue = env.topo.work_queue(flota_shared::envelope::Kind::Interpret);
    let series = |name: &str, queue: &str| format!("{name}{{queue=\"{queue}\"}}");
    let dead = series("flota_queue_messages", &env.topo.dead_queue());
    let consumers = series("flota_queue_consumers", &interpret_queue);
    // The gauges refresh every few seconds: wait until they show the settled fleet.
    flota_tests::eventually("the scheduler's gauges settle", || async {
        let scrape = reqwest::get(&url).await.unwrap().text().await.unwrap();
        sample(&scrape, &dead) == 1.0
            && sample(&scrape, "flota_parked_tasks") == 1.0
            && sample(&scrape, "flota_live_workers") == 1.0
            && sample(&scrape, "flota_results_recorded_total{kind=\"interpret\",status=\"succeeded\"}") == 5.0
    })
    .await;
    let scrape = reqwest::get(&url).await.unwrap().text().await.unwrap();
    assert_eq!(
        sample(&scrape, "flota_results_recorded_total{kind=\"deliberate\",status=\"succeeded\"}"),
        1.0
    );
    // One worker, several consumers: its lanes share its prefetch (worker/src/credit.rs).
    assert!(sample(&scrape, &consumers) >= 1.0, "{scrape}");
    assert_eq!(sample(&scrape, &series("flota_queue_messages", &interpret_queue)), 0.0);
    // The WES metrics, fleet-wide from the results.
    assert_eq!(sample(&scrape, "wes_works_opened_total"), 5.0, "{scrape}");
    assert_eq!(sample(&scrape, "wes_interpreter_latency_seconds_count"), 5.0);
    assert_eq!(sample(&scrape, "wes_proposals_accepted_total"), 1.0);
    assert_eq!(sample(&scrape, "flota_results_duplicate_total"), 0.0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_id_crosses_every_process() {
    let env = TestEnv::new("trace").await;
    let dir = log_dir(&env);
    let json_logs = [("FLOTA_LOG_FORMAT", "json"), ("RUST_LOG", "info")];
    let gpu = procs::gpusim(&[]).await;
    let (worker_log, scheduler_log) = (dir.join("worker.log"), dir.join("scheduler.log"));
    let worker =
        flota_scheduler::fleet::worker(&env.env(), &gpu.url(), &json_logs, Some(&worker_log)).await.unwrap();
    let scheduler =
        flota_scheduler::fleet::scheduler(&env.env(), &json_logs, Some(&scheduler_log)).await.unwrap();
    let mut tap = env.tap_results().await;
    // The producer: a trace context of its own on the task's AMQP headers.
    let tp = TraceParent::new_root();
    let task =
        json!({"id": "traced", "kind": "interpret", "input": {"message": "Abrí un trabajo para medir"}});
    env.publish_raw(
        "interpret",
        task.to_string().as_bytes(),
        amqp::task_properties("traced", &tp.header(), 0),
    )
    .await;
    // The result envelope.
    let r = tap.next().await.unwrap();
    assert_eq!(r.trace_id, tp.trace_id, "result envelope carries the producer's trace");
    // The GPU request carried it as a W3C header, with a span of the worker's own.
    let recent: Vec<serde_json::Value> =
        reqwest::get(format!("{}/debug/requests?limit=10", gpu.url())).await.unwrap().json().await.unwrap();
    let forwarded: Vec<TraceParent> =
        recent.iter().filter_map(|r| r["traceparent"].as_str()).filter_map(TraceParent::parse).collect();
    assert!(
        forwarded.iter().any(|t| t.trace_id == tp.trace_id),
        "traceparent forwarded to the GPU: {recent:?}"
    );
    assert!(forwarded.iter().all(|t| t.span_id != tp.span_id), "a child span, not the producer's");
    // The scheduler's record, read through its API.
    let api = format!("{}/v1/tasks/traced", scheduler.url());
    flota_tests::eventually("the API shows the task succeeded", || async {
        let body: serde_json::Value = reqwest::get(&api).await.unwrap().json().await.unwrap();
        body["status"] == "succeeded"
    })
    .await;
    // The worker stores the status itself; the scheduler's own record comes after.
    flota_tests::wait_recorded(&scheduler.url(), 1, 1).await;
    let body: serde_json::Value = reqwest::get(&api).await.unwrap().json().await.unwrap();
    assert_eq!(body["result"]["trace_id"], tp.trace_id.as_str(), "{body}");
    // The worker's and the scheduler's logs, once both have flushed them.
    assert_eq!(worker.terminate().await, Some(0));
    assert_eq!(scheduler.terminate().await, Some(0));
    let mentions = |lines: &[serde_json::Value]| {
        lines
            .iter()
            .filter(|l| {
                let fields = [&l["task_id"], &l["span"]["task_id"]];
                let trace = [&l["trace_id"], &l["span"]["trace_id"]];
                fields.iter().any(|v| *v == "traced") && trace.iter().any(|v| *v == tp.trace_id.as_str())
            })
            .count()
    };
    assert!(mentions(&json_lines(&worker_log)) > 0, "the worker logged the task with its trace id");
    let scheduler_lines = json_lines(&scheduler_log);
    assert!(
        scheduler_lines.iter().any(|l| l["message"] == "Result recorded."
            && l["task_id"] == "traced"
            && l["trace_id"] == tp.trace_id.as_str()),
        "the scheduler logged the record with the trace id: {scheduler_lines:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
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

/// A worker (on its own gpusim) whose stderr goes to `worker.log` in the
/// test's log directory, with `vars` added to its environment.
async fn worker_logging_to_a_file(
    env: &TestEnv,
    vars: &[(&str, &str)],
) -> (procs::Proc, procs::Proc, std::path::PathBuf) {
    let gpu = procs::gpusim(&[]).await;
    let log = log_dir(env).join("worker.log");
    let mut worker_env = env.env();
    worker_env.push(("FLOTA_GPU_URL".into(), gpu.url()));
    worker_env.push(("FLOTA_METRICS_ADDR".into(), "127.0.0.1:0".into()));
    worker_env.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let worker =
        procs::Proc::start_with("flota-worker", &[], &worker_env, "ready", Some(&log)).await.unwrap();
    (worker, gpu, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_task_and_trace_ids() {
    let env = TestEnv::new("jsonlog").await;
    // Debug: the GPU client's and the libraries' lines inside a task count too.
    let (worker, _gpu, log) =
        worker_logging_to_a_file(&env, &[("FLOTA_LOG_FORMAT", "json"), ("RUST_LOG", "debug")]).await;
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
    for l in &about_task {
        let span = &l["span"];
        assert_eq!(span["task_id"], "logged", "{l}");
        assert_eq!(span["trace_id"], tp.trace_id.as_str(), "{l}");
    }
    // Every line logged while the task ran (the GPU calls' and the libraries' too)
    // has the task's span as its context: the trace-only spans never hide it.
    let in_task: Vec<&serde_json::Value> = lines.iter().filter(|l| !l["span"].is_null()).collect();
    assert!(in_task.iter().any(|l| l["level"] == "DEBUG"), "debug lines from inside the GPU calls: {text}");
    for l in in_task {
        assert_eq!(l["span"]["name"], "consume", "{l}");
        assert_eq!(l["span"]["trace_id"], tp.trace_id.as_str(), "{l}");
    }
    let _ = std::fs::remove_dir_all(log_dir(&env));
    env.cleanup().await;
}

/// At `RUST_LOG=warn` (info lines off) a warning logged inside a task still
/// carries the task's span: its `task_id` and `trace_id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warnings_inside_a_task_name_it_at_warn_level() {
    let env = TestEnv::new("warnlog").await;
    // Every GPU call fails: the attempt ends with "Attempt failed; retrying later." (warn).
    let gpu = procs::gpusim(&["--error-rate", "1"]).await;
    let log = log_dir(&env).join("worker.log");
    let mut worker_env = env.env();
    worker_env.push(("FLOTA_GPU_URL".into(), gpu.url()));
    worker_env.push(("FLOTA_METRICS_ADDR".into(), "127.0.0.1:0".into()));
    worker_env.push(("FLOTA_GPU_RETRIES".into(), "0".into()));
    worker_env.push(("FLOTA_LOG_FORMAT".into(), "json".into()));
    worker_env.push(("RUST_LOG".into(), "warn".into()));
    let worker =
        procs::Proc::start_with("flota-worker", &[], &worker_env, "ready", Some(&log)).await.unwrap();
    let tp = TraceParent::new_root();
    let task = json!({"id": "warned", "kind": "interpret", "input": {"message": "hola"}});
    env.publish_raw(
        "interpret",
        task.to_string().as_bytes(),
        amqp::task_properties("warned", &tp.header(), 0),
    )
    .await;
    flota_tests::eventually("the attempt's failure is logged", || async {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("Attempt failed"))
    })
    .await;
    assert_eq!(worker.terminate().await, Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let failed: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["message"].as_str().is_some_and(|m| m.starts_with("Attempt failed")))
        .collect();
    assert!(!failed.is_empty(), "{text}");
    for l in failed {
        assert_eq!(l["level"], "WARN", "{l}");
        assert_eq!(l["span"]["name"], "consume", "{l}");
        assert_eq!(l["span"]["task_id"], "warned", "{l}");
        assert_eq!(l["span"]["trace_id"], tp.trace_id.as_str(), "{l}");
    }
    assert!(!lines.iter().any(|l| l["level"] == "INFO"), "info lines stay off at warn: {text}");
    let _ = std::fs::remove_dir_all(log_dir(&env));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_written_to_a_file_carry_no_colour_escapes() {
    let env = TestEnv::new("plainlog").await;
    let (worker, _gpu, log) = worker_logging_to_a_file(&env, &[("RUST_LOG", "info")]).await;
    let mut tap = env.tap_results().await;
    let task =
        json!({"id": "plain", "kind": "interpret", "input": {"message": "Abrí un trabajo para la bomba 3"}});
    env.publish_raw(
        "interpret",
        task.to_string().as_bytes(),
        amqp::task_properties("plain", &TraceParent::new_root().header(), 0),
    )
    .await;
    let _ = tap.next().await.unwrap();
    assert_eq!(worker.terminate().await, Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("Task finished."), "the task's line is in the log: {text}");
    assert!(!text.contains('\u{1b}'), "no ANSI escape codes in a log file: {text:?}");
    let _ = std::fs::remove_dir_all(log_dir(&env));
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
    let otlp = [("OTEL_EXPORTER_OTLP_ENDPOINT", collector.as_str())];
    let worker = procs::worker(&env.env(), &gpu.url(), &otlp).await;
    let scheduler = procs::scheduler(&env.env(), &otlp).await;
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
    let api = format!("{}/v1/tasks/exported", scheduler.url());
    flota_tests::eventually("the API shows the task succeeded", || async {
        let body: serde_json::Value = reqwest::get(&api).await.unwrap().json().await.unwrap();
        body["status"] == "succeeded"
    })
    .await;
    // The worker stores the status itself; the scheduler's own record comes after.
    flota_tests::wait_recorded(&scheduler.url(), 1, 1).await;
    // Draining flushes the batch exporters.
    assert_eq!(worker.terminate().await, Some(0));
    assert_eq!(scheduler.terminate().await, Some(0));
    let unhex = |h: &str| -> Vec<u8> {
        (0..h.len() / 2).map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap()).collect()
    };
    let bodies: Vec<Vec<u8>> = bodies.lock().unwrap().clone();
    assert!(!bodies.is_empty(), "spans exported");
    let in_trace: Vec<&Vec<u8>> = bodies.iter().filter(|b| contains(b, &unhex(&tp.trace_id))).collect();
    assert!(!in_trace.is_empty(), "exported spans belong to the producer's trace");
    // In OTLP protobuf a span's name is field 5 (tag 0x2a, then its length):
    // every stage of the task is a span, in both services.
    for service in ["flota-worker", "flota-scheduler"] {
        assert!(
            in_trace.iter().any(|b| contains(b, service.as_bytes())),
            "{service} exported spans in the trace ({} bodies, {} in the trace, {} from {service})",
            bodies.len(),
            in_trace.len(),
            bodies.iter().filter(|b| contains(b, service.as_bytes())).count()
        );
    }
    for name in ["consume", "lock", "gpu.call", "publish", "record"] {
        let field = [&[0x2a, name.len() as u8], name.as_bytes()].concat();
        assert!(in_trace.iter().any(|b| contains(b, &field)), "span `{name}` exported");
    }
    // The GPU server was told the exported gpu.call span's id, so its spans join under it.
    let recent: Vec<serde_json::Value> =
        reqwest::get(format!("{}/debug/requests?limit=10", gpu.url())).await.unwrap().json().await.unwrap();
    let sent = recent.iter().filter_map(|r| r["traceparent"].as_str()).find_map(TraceParent::parse).unwrap();
    assert_eq!(sent.trace_id, tp.trace_id);
    assert!(
        in_trace.iter().any(|b| contains(b, &unhex(&sent.span_id))),
        "the forwarded span id is an exported span"
    );
    env.cleanup().await;
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
