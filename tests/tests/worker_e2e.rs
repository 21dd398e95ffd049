//! Worker end to end on real RabbitMQ and Redis against flota-gpusim:
//! interpretation, deliberation, output validation, poison messages.

use std::collections::BTreeMap;

use flota_shared::amqp;
use flota_shared::envelope::{DeliberateOutput, ErrorCode, Intent, InterpretOutput, Status};
use flota_shared::telemetry::TraceParent;
use flota_tests::{TestEnv, procs};
use lapin::BasicProperties;
use lapin::types::ShortString;
use serde_json::json;

async fn gpu_stats(gpu: &procs::Proc) -> serde_json::Value {
    reqwest::get(format!("{}/stats", gpu.url())).await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interpretations_yield_intent_and_title() {
    let env = TestEnv::new("interp").await;
    let gpu = procs::gpusim(&[]).await;
    let worker = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let mut tap = env.tap_results().await;

    let cases = [
        (
            "es-open",
            "Abrí un trabajo para cambiar la bomba del pozo 3",
            Intent::OpenWork,
            Some("bomba del pozo 3"),
        ),
        (
            "en-open",
            "Please open a work order to replace the valve on line 4",
            Intent::OpenWork,
            Some("valve on line 4"),
        ),
        ("es-confirm", "Sí, confirmo", Intent::Confirm, None),
        ("en-cancel", "never mind, cancel it", Intent::Cancel, None),
        ("en-chat", "thanks for your help yesterday", Intent::Chat, None),
    ];
    for (id, message, _, _) in &cases {
        env.publish_task(&json!({"v": 1, "id": id, "kind": "interpret", "input": {"message": message}, "meta": {"tenant": "acme"}}))
            .await;
    }
    let (results, duplicates) = tap.collect_distinct(cases.len()).await;
    assert_eq!(results.len(), cases.len(), "every task reported");
    assert_eq!(duplicates, 0);
    for (id, message, intent, title) in cases {
        let r = &results[id];
        assert_eq!(r.status, Status::Succeeded, "{id}: {r:?}");
        assert_eq!(r.meta, BTreeMap::from([("tenant".to_string(), "acme".to_string())]));
        assert_eq!(r.attempts, 1);
        let out: InterpretOutput = serde_json::from_value(r.output.clone().unwrap()).unwrap();
        assert_eq!(out.intent, intent, "{id}: {message}");
        assert!(!out.degraded);
        if let Some(fragment) = title {
            let work = out.work.expect("work for open_work");
            assert!(
                work.title.to_lowercase().contains(fragment),
                "{id}: title {:?} lacks {fragment:?}",
                work.title
            );
        }
        let state = env.store.task_state(id).await.unwrap().unwrap();
        assert_eq!(state.status, "succeeded");
        assert_eq!(env.store.ledger(id).await.unwrap().applies, 1);
    }
    assert_eq!(worker.terminate().await, Some(0), "worker drains and exits 0");
    // Acks are queued without waiting on lapin: they must still all have gone out.
    // The worker's channels are closed now, so an unacked delivery is back, ready.
    let queue = env.topo.work_queue(flota_shared::envelope::Kind::Interpret);
    assert_eq!(env.queue_depth(&queue).await, 0, "every reported task acked");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliberation_proposes_reviews_and_ranks() {
    let env = TestEnv::new("delib").await;
    let gpu = procs::gpusim(&["--base-ms", "20"]).await;
    let worker = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let mut tap = env.tap_results().await;

    env.publish_task(&json!({"id": "plan-1:DEV", "kind": "deliberate",
        "input": {"role": "DEV", "task": "Add retries with backoff to the billing export job", "constraints": ["no new services"], "agents": 3}}))
        .await;
    let r = tap.next().await.expect("a result");
    assert_eq!(r.id, "plan-1:DEV");
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    let out: DeliberateOutput = serde_json::from_value(r.output.unwrap()).unwrap();
    assert_eq!(out.proposals.len(), 3);
    assert_eq!(out.agents_failed, 0);
    for p in &out.proposals {
        assert_eq!(p.reviews.len(), 2, "each proposal reviewed by the two others");
        assert!(p.reviews.iter().all(|rv| rv.reviewer != p.agent && (0.0..=10.0).contains(&rv.score)));
        let mean = p.reviews.iter().map(|rv| rv.score).sum::<f64>() / 2.0;
        assert!((p.score - mean).abs() < 0.01);
    }
    assert!(out.proposals.windows(2).all(|w| w[0].score >= w[1].score), "ranked best first");
    assert_eq!(out.winner, out.proposals[0].agent);
    assert!(r.usage.completion_tokens > 0);
    // 3 proposals + 6 reviews, nothing more.
    assert_eq!(gpu_stats(&gpu).await["served"], 9);
    worker.terminate().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_model_output_ends_as_output_invalid() {
    let env = TestEnv::new("badout").await;
    let gpu = procs::gpusim(&["--invalid-rate", "1"]).await;
    let worker = procs::worker(&env.env(), &gpu.url(), &[("FLOTA_OUTPUT_RETRIES", "2")]).await;
    let mut tap = env.tap_results().await;
    env.publish_task(&json!({"id": "bad-out", "kind": "interpret", "input": {"message": "Abrí un trabajo para pintar la sala"}})).await;
    let r = tap.next().await.expect("a result");
    assert_eq!(r.status, Status::Failed);
    assert_eq!(r.error_code(), Some(ErrorCode::OutputInvalid));
    // One call plus two bounded re-asks.
    assert_eq!(gpu_stats(&gpu).await["invalid_outputs"], 3);
    worker.terminate().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_on_first_delivery() {
    let env = TestEnv::new("poison").await;
    let gpu = procs::gpusim(&[]).await;
    let worker = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let mut tap = env.tap_results().await;
    let tp = TraceParent::new_root().header();
    let props = || amqp::task_properties("poison", &tp, 0);

    let deep = "[".repeat(10_000) + &"]".repeat(10_000);
    let huge =
        json!({"id": "huge", "kind": "interpret", "input": {"message": "x".repeat(1024 * 1024)}}).to_string();
    let poison: Vec<(&str, Vec<u8>, BasicProperties, &str)> = vec![
        ("bad json", b"{not json".to_vec(), props(), "invalid_task"),
        (
            "wrong types",
            br#"{"id": 5, "kind": "interpret", "input": {"message": 1}}"#.to_vec(),
            props(),
            "invalid_task",
        ),
        ("unknown kind", br#"{"id": "k1", "kind": "launch", "input": {}}"#.to_vec(), props(), "invalid_task"),
        (
            "missing id",
            br#"{"kind": "interpret", "input": {"message": "hola"}}"#.to_vec(),
            props(),
            "invalid_task",
        ),
        (
            "unknown field",
            br#"{"id": "u1", "kind": "interpret", "input": {"message": "hola"}, "evil": true}"#.to_vec(),
            props(),
            "invalid_task",
        ),
        ("deep nesting", deep.into_bytes(), props(), "invalid_task"),
        ("invalid utf-8", vec![b'{', 0xff, 0xfe, b'}'], props(), "invalid_task"),
        (
            "content type",
            br#"{"id": "ct1", "kind": "interpret", "input": {"message": "hola"}}"#.to_vec(),
            props().with_content_type(ShortString::from("text/plain")),
            "invalid_task",
        ),
        ("1 MiB body", huge.into_bytes(), props(), "payload_too_large"),
    ];
    for (_, body, p, _) in &poison {
        env.publish_raw("interpret", body, p.clone()).await;
    }
    // An innocent neighbour is unaffected.
    env.publish_task(&json!({"id": "innocent", "kind": "interpret", "input": {"message": "Abrí un trabajo para revisar el tablero"}})).await;

    let dead = env.wait_dead(poison.len()).await;
    assert_eq!(dead.len(), poison.len(), "every poison message dead-lettered once");
    let mut reasons: Vec<String> = dead.iter().map(|d| d.reason.clone().unwrap_or_default()).collect();
    reasons.sort();
    let mut expected: Vec<String> = poison.iter().map(|(_, _, _, r)| r.to_string()).collect();
    expected.sort();
    assert_eq!(reasons, expected);
    assert!(
        dead.iter().all(|d| d.error.as_deref().is_some_and(|e| !e.is_empty())),
        "each carries x-flota-error"
    );

    // Results: the innocent one succeeded; the rejected ones with a readable id failed, the
    // too-large one (an envelope, only too large) as payload_too_large.
    let (results, _) = tap.collect_distinct(4).await;
    assert_eq!(results["innocent"].status, Status::Succeeded);
    for id in ["k1", "u1"] {
        assert_eq!(results[id].error_code(), Some(ErrorCode::InvalidTask), "{id}");
    }
    assert_eq!(results["huge"].error_code(), Some(ErrorCode::PayloadTooLarge));
    // Zero GPU calls for poison: only the innocent task reached the GPU.
    assert_eq!(gpu_stats(&gpu).await["served"], 1);
    assert_eq!(worker.terminate().await, Some(0), "no panic, clean exit");
    env.cleanup().await;
}
