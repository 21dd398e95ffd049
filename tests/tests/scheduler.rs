//! The scheduler on real services: the HTTP API, recording every result once,
//! dead-lettering garbage on the results queue, and the token.

use std::time::Duration;

use flota_shared::envelope::{ErrorCode, Kind, ResultEnvelope, Status};
use flota_tests::{TestEnv, procs};
use serde_json::{Value, json};

fn interp(id: &str) -> Value {
    json!({"id": id, "kind": "interpret", "input": {"message": "Abrí un trabajo para cambiar la bomba del pozo 3"}})
}

async fn wait_status(http: &reqwest::Client, api: &str, id: &str, want: &str) -> Value {
    for _ in 0..1800 {
        let r = http.get(format!("{api}/v1/tasks/{id}")).send().await.unwrap();
        if r.status() == 200 {
            let v: Value = r.json().await.unwrap();
            if v["status"] == want {
                return v;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{id} never reached {want}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_submits_deduplicates_validates_and_serves_state() {
    let env = TestEnv::new("api").await;
    let scheduler = procs::scheduler(&env.env(), &[]).await;
    let api = scheduler.url();
    let http = reqwest::Client::new();

    // One valid task: 202, queued in Redis, one message in P.interpret.
    let r = http.post(format!("{api}/v1/tasks")).json(&interp("a-1")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["ids"], json!(["a-1"]));
    assert_eq!(env.store.task_state("a-1").await.unwrap().unwrap().status, "queued");
    assert_eq!(env.queue_depth(&env.topo.work_queue(Kind::Interpret)).await, 1);

    // The same id again: known, not run again.
    let r: Value = http
        .post(format!("{api}/v1/tasks"))
        .json(&json!([interp("a-1"), interp("a-2")]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["duplicates"], json!(["a-1"]));
    assert_eq!(env.queue_depth(&env.topo.work_queue(Kind::Interpret)).await, 2);

    // An invalid batch: 400 listing every problem per index, nothing published.
    let r = http
        .post(format!("{api}/v1/tasks"))
        .json(&json!([interp("ok-3"), {"id": "bad id", "kind": "nope", "input": {}}, {"kind": "interpret"}]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "invalid_task");
    let problems = v["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 2);
    assert_eq!(problems[0]["index"], 1);
    assert!(problems[0]["problems"].as_array().unwrap().len() >= 2);
    assert_eq!(problems[1]["index"], 2);
    assert_eq!(env.queue_depth(&env.topo.work_queue(Kind::Interpret)).await, 2);
    assert!(env.store.task_state("ok-3").await.unwrap().is_none());

    // Not JSON: 400; too big: 413.
    assert_eq!(http.post(format!("{api}/v1/tasks")).body("{nope").send().await.unwrap().status(), 400);
    let huge = vec![b'x'; 9 * 1024 * 1024];
    assert_eq!(http.post(format!("{api}/v1/tasks")).body(huge).send().await.unwrap().status(), 413);

    // Reads.
    assert_eq!(http.get(format!("{api}/v1/tasks/unknown")).send().await.unwrap().status(), 404);
    let queues: Vec<Value> = http.get(format!("{api}/v1/queues")).send().await.unwrap().json().await.unwrap();
    let names: Vec<&str> = queues.iter().filter_map(|q| q["name"].as_str()).collect();
    for q in env.topo.all_queues() {
        assert!(names.contains(&q.as_str()), "{q} missing from {names:?}");
    }
    assert_eq!(http.get(format!("{api}/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(http.get(format!("{api}/readyz")).send().await.unwrap().status(), 200);
    let metrics = http.get(format!("{api}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("flota_tasks_submitted_total 2"), "{metrics}");
    for name in [
        "wes_works_opened_total",
        "wes_interpreter_latency_seconds",
        "wes_proposals_accepted_total",
        "wes_semantic_confirmations_total",
    ] {
        assert!(metrics.contains(name), "{name}");
    }
    assert_eq!(scheduler.terminate().await, Some(0));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_routes_need_the_token() {
    let env = TestEnv::new("token").await;
    let scheduler = procs::scheduler(&env.env(), &[("FLOTA_API_TOKEN", "s3cret-token")]).await;
    let api = scheduler.url();
    let http = reqwest::Client::new();
    let post = |auth: Option<&str>| {
        let mut r = http.post(format!("{api}/v1/tasks")).json(&interp("t-1"));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send()
    };
    assert_eq!(post(None).await.unwrap().status(), 401);
    assert_eq!(post(Some("Bearer wrong")).await.unwrap().status(), 403);
    assert_eq!(post(Some("Bearer s3cret-token")).await.unwrap().status(), 202);
    assert_eq!(http.delete(format!("{api}/v1/councils/DEV")).send().await.unwrap().status(), 401);
    // Reads stay open.
    assert_eq!(http.get(format!("{api}/v1/tasks/t-1")).send().await.unwrap().status(), 200);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_reads_need_the_token_and_the_dashboard_signs_in_once() {
    let env = TestEnv::new("reads").await;
    let token = "r3ad-token";
    let scheduler =
        procs::scheduler(&env.env(), &[("FLOTA_API_TOKEN", token), ("FLOTA_API_PROTECT_READS", "true")])
            .await;
    let api = scheduler.url();
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let bearer = format!("Bearer {token}");
    let get = |path: &str, auth: Option<&str>, cookie: Option<&str>| {
        let mut r = http.get(format!("{api}{path}"));
        if let Some(a) = auth {
            r = r.header("authorization", a.to_string());
        }
        if let Some(c) = cookie {
            r = r.header("cookie", c.to_string());
        }
        r.send()
    };
    for path in ["/", "/v1/tasks/x", "/v1/queues", "/v1/workers", "/v1/councils", "/v1/stats", "/metrics"] {
        assert_eq!(get(path, None, None).await.unwrap().status(), 401, "{path} open");
        assert_eq!(get(path, Some("Bearer wrong"), None).await.unwrap().status(), 403, "{path}");
    }
    assert_eq!(get("/v1/queues", Some(&bearer), None).await.unwrap().status(), 200);
    assert_eq!(get("/v1/tasks/x", Some(&bearer), None).await.unwrap().status(), 404);
    // Probes stay open for the orchestrator.
    assert_eq!(get("/healthz", None, None).await.unwrap().status(), 200);
    assert_eq!(get("/readyz", None, None).await.unwrap().status(), 200);

    // A browser signs in once with /?token=…, then the cookie carries it.
    assert_eq!(get("/?token=wrong", None, None).await.unwrap().status(), 403);
    let r = get(&format!("/?token={token}"), None, None).await.unwrap();
    assert_eq!(r.status(), 303);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"), "{set}");
    assert!(!set.contains(token), "the token itself is not in the cookie: {set}");
    let cookie = set.split(';').next().unwrap().to_string();
    assert_eq!(get("/", None, Some(&cookie)).await.unwrap().status(), 200);
    assert_eq!(get("/v1/stats", None, Some(&cookie)).await.unwrap().status(), 200);
    assert_eq!(get("/v1/stats", None, Some("flota_token=abcd")).await.unwrap().status(), 403);
    // The cookie never authorises a mutation (no cross-site request forgery).
    let r = http
        .post(format!("{api}/v1/tasks"))
        .header("cookie", cookie)
        .json(&interp("c-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        http.post(format!("{api}/v1/tasks"))
            .header("authorization", bearer)
            .json(&interp("c-2"))
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_tasks_give_a_thousand_records_and_results_are_recorded_once() {
    let env = TestEnv::new("thousand").await;
    let gpu = procs::gpusim(&[]).await;
    let scheduler = procs::scheduler(&env.env(), &[]).await;
    let _w1 = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let _w2 = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let http = reqwest::Client::new();
    let api = scheduler.url();
    let n = 1000;
    let tasks: Vec<Value> = (0..n).map(|i| interp(&format!("k-{i}"))).collect();
    for chunk in tasks.chunks(250) {
        assert_eq!(http.post(format!("{api}/v1/tasks")).json(&chunk).send().await.unwrap().status(), 202);
    }
    let mut recorded = 0.0;
    for _ in 0..1800 {
        let m = http.get(format!("{api}/metrics")).send().await.unwrap().text().await.unwrap();
        recorded = m
            .lines()
            .filter(|l| l.starts_with("flota_results_recorded_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if recorded >= n as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(recorded, n as f64, "exactly {n} distinct results recorded");
    for i in (0..n).step_by(97) {
        let v = wait_status(&http, &api, &format!("k-{i}"), "succeeded").await;
        assert_eq!(v["result"]["id"], format!("k-{i}"));
    }

    // The same result delivered again is not recorded twice; garbage goes to P.dead.
    let state = env.store.task_state("k-0").await.unwrap().unwrap();
    let stored: ResultEnvelope = serde_json::from_str(&state.result.unwrap()).unwrap();
    let props = flota_shared::amqp::message_properties(
        "k-0",
        &flota_shared::telemetry::TraceParent::new_root().header(),
    );
    env.publisher.publish(&env.topo.results_exchange(), "", &stored.to_json(), props.clone()).await.unwrap();
    env.publisher.publish(&env.topo.results_exchange(), "", b"not a result", props).await.unwrap();
    let dead = env.wait_dead(1).await;
    assert_eq!(dead[0].reason.as_deref(), Some(ErrorCode::InvalidTask.as_str()));
    let m = http.get(format!("{api}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(m.contains("flota_results_duplicate_total 1"), "{m}");
    assert!(
        m.contains(&format!("flota_results_recorded_total{{kind=\"interpret\",status=\"succeeded\"}} {n}"))
    );
    assert_eq!(stored.status, Status::Succeeded);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_wait_while_the_scheduler_is_down_and_are_recorded_once_after() {
    let env = TestEnv::new("schedown").await;
    let gpu = procs::gpusim(&[]).await;
    let _w = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let scheduler = procs::scheduler(&env.env(), &[]).await;
    scheduler.signal("KILL").await;
    for i in 0..200 {
        env.publish_task(&interp(&format!("d-{i}"))).await;
    }
    // Workers are not blocked: every result lands in P.results.
    for _ in 0..1800 {
        if env.queue_depth(&env.topo.results_queue()).await >= 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(env.queue_depth(&env.topo.results_queue()).await >= 200);
    let scheduler = procs::scheduler(&env.env(), &[]).await;
    let http = reqwest::Client::new();
    for i in (0..200).step_by(13) {
        wait_status(&http, &scheduler.url(), &format!("d-{i}"), "succeeded").await;
    }
    // Every waiting result is recorded, once: by this scheduler (the killed one never consumed).
    let mut m = String::new();
    for _ in 0..1800 {
        m = http.get(format!("{}/metrics", scheduler.url())).send().await.unwrap().text().await.unwrap();
        if m.contains("flota_results_recorded_total{kind=\"interpret\",status=\"succeeded\"} 200") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(m.contains("flota_results_recorded_total{kind=\"interpret\",status=\"succeeded\"} 200"), "{m}");
    assert!(!m.contains("flota_results_duplicate_total 1"));
    env.cleanup().await;
}

/// Queue depths come from passive declares on one kept channel. A missing queue
/// closes that channel; the next question opens another and is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_depths_survive_asking_about_a_missing_queue() {
    let env = TestEnv::new("queue-info").await;
    let broker = flota_scheduler::broker::Broker::new(&env.config);
    let work = env.topo.work_queue(Kind::Interpret);
    broker.publisher().await.expect("connected; topology declared");
    env.publish_task(&interp("depth-1")).await;
    assert_eq!(broker.queue_info(&work).await.unwrap(), (1, 0));
    let missing = format!("{}.no-such-queue", env.prefix);
    assert!(broker.queue_info(&missing).await.is_err(), "a missing queue is an error");
    // Asked again, on a fresh channel, both questions are answered as before.
    assert_eq!(broker.queue_info(&work).await.unwrap(), (1, 0));
    assert!(broker.queue_info(&missing).await.is_err());
    assert_eq!(broker.queue_info(&env.topo.dead_queue()).await.unwrap(), (0, 0));
    env.cleanup().await;
}
