//! The scheduler's HTTP API in-process on real RabbitMQ and Redis: submit,
//! deduplicate, validate, read state and queues, the token.

mod common;

use common::Harness;
use flota_shared::amqp::{self, HEADER_TRACEPARENT};
use flota_shared::envelope::Kind;
use serde_json::{Value, json};

fn interp(id: &str) -> Value {
    json!({"id": id, "kind": "interpret", "input": {"message": "Abrí un trabajo para cambiar la bomba del pozo 3"}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_deduplicate_validate_and_read() {
    let h = Harness::start("api", None).await;
    let interpret = h.topo.work_queue(Kind::Interpret);

    // One valid task, with the caller's trace: 202, queued in Redis, one message in P.interpret.
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = h
        .http
        .post(format!("{}/v1/tasks", h.url))
        .header("traceparent", tp)
        .json(&interp("a-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["ids"], json!(["a-1"]));
    assert_eq!(body["duplicates"], json!([]));
    assert_eq!(h.store.task_state("a-1").await.unwrap().unwrap().status, "queued");
    assert_eq!(h.depth(&interpret).await, 1);
    let (status, state) = h.get_json("/v1/tasks/a-1").await;
    assert_eq!((status, state["status"].as_str()), (200, Some("queued")));
    assert!(state.get("result").is_none(), "{state}");

    // The same id again, beside a new one: the known one is a duplicate, only the new one is published.
    let r = h.post("/v1/tasks", &json!([interp("a-1"), interp("a-2")]), None).await;
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["ids"], json!(["a-1", "a-2"]));
    assert_eq!(body["duplicates"], json!(["a-1"]));
    assert_eq!(h.depth(&interpret).await, 2);

    // The published message: the envelope, routed by kind, with the contract's properties.
    let first = h.get(&interpret).await.expect("a task message");
    let task = flota_shared::envelope::parse_task(&first.data).expect("a valid envelope");
    assert_eq!(task.id, "a-1");
    let props = &first.properties;
    assert_eq!(props.message_id().as_ref().map(|m| m.as_str()), Some("a-1"));
    assert_eq!(props.content_type().as_ref().map(|c| c.as_str()), Some("application/json"));
    assert_eq!(props.delivery_mode(), &Some(2));
    let sent_tp = amqp::header_str(props, HEADER_TRACEPARENT).expect("traceparent header");
    assert!(sent_tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{sent_tp}");

    // An invalid batch: 400, every problem by index, nothing published or registered.
    let r = h
        .post(
            "/v1/tasks",
            &json!([interp("ok-3"), {"id": "bad id", "kind": "nope", "input": {}}, {"kind": "interpret"}]),
            None,
        )
        .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "invalid_task");
    let problems = v["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 2, "{v}");
    assert_eq!((problems[0]["index"].as_u64(), problems[0]["id"].is_null()), (Some(1), true));
    assert!(problems[0]["problems"].as_array().unwrap().len() >= 2, "{v}");
    assert_eq!(problems[1]["index"], 2);
    assert_eq!(h.depth(&interpret).await, 1);
    assert!(h.store.task_state("ok-3").await.unwrap().is_none());

    // Not JSON: 400. Over the body limit: 413 with a JSON error.
    let r = h.http.post(format!("{}/v1/tasks", h.url)).body("{nope").send().await.unwrap();
    assert_eq!(r.status(), 400);
    let big = json!({"id": "big", "kind": "interpret", "input": {"message": "x".repeat(2 * 1024 * 1024)}});
    let r = h.post("/v1/tasks", &big, None).await;
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.expect("a JSON error");
    assert_eq!(v["error"], "payload_too_large");

    // Reads.
    let (status, v) = h.get_json("/v1/tasks/unknown-id").await;
    assert_eq!((status, v["error"].as_str()), (404, Some("not_found")));
    let (status, queues) = h.get_json("/v1/queues").await;
    assert_eq!(status, 200);
    let listed: Vec<&str> = queues.as_array().unwrap().iter().filter_map(|q| q["name"].as_str()).collect();
    for q in h.topo.all_queues() {
        assert!(listed.contains(&q.as_str()), "{q} missing from {listed:?}");
    }
    let row = queues.as_array().unwrap().iter().find(|q| q["name"] == interpret.as_str()).unwrap();
    assert_eq!(row["messages"], 1);
    assert!(row["consumers"].is_u64());

    assert_eq!(h.http.get(format!("{}/healthz", h.url)).send().await.unwrap().text().await.unwrap(), "ok");
    let (status, ready) = h.get_json("/readyz").await;
    assert_eq!((status, &ready), (200, &json!({"rabbitmq": true, "redis": true})));
    assert_eq!(h.metric("flota_tasks_submitted_total").await, 2.0);
    let page = h.http.get(&h.url).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("/v1/queues") && page.contains("<table"), "the dashboard reads the queues");

    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_routes_need_the_token_and_reads_stay_open() {
    let h = Harness::start("token", Some("s3cret-token")).await;
    let task = interp("t-1");
    assert_eq!(h.post("/v1/tasks", &task, None).await.status(), 401);
    assert_eq!(h.post("/v1/tasks", &task, Some("Basic czNjcmV0")).await.status(), 401);
    assert_eq!(h.post("/v1/tasks", &task, Some("Bearer wrong")).await.status(), 403);
    assert_eq!(h.post("/v1/tasks", &task, Some("Bearer s3cret-token-longer")).await.status(), 403);
    // Nothing was registered by the refused attempts.
    assert!(h.store.task_state("t-1").await.unwrap().is_none());
    assert_eq!(h.post("/v1/tasks", &task, Some("Bearer s3cret-token")).await.status(), 202);
    let (status, v) = h.get_json("/v1/tasks/t-1").await;
    assert_eq!((status, v["status"].as_str()), (200, Some("queued")));
    assert_eq!(h.get_json("/v1/queues").await.0, 200);
    h.stop().await;
}
