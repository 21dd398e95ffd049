//! `lock_keys` keep tasks sharing a resource apart; `flotactl` submits,
//! reports invalid lines, waits on status and works the dead-letter queue.

use std::process::Stdio;
use std::time::Duration;

use flota_tests::{TestEnv, procs};
use serde_json::json;
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_sharing_a_lock_key_never_overlap() {
    let env = TestEnv::new("lockkeys").await;
    let gpu = procs::gpusim(&["--base-ms", "100"]).await;
    let _w1 = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let _w2 = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let mut tap = env.tap_results().await;
    let n = 8;
    for i in 0..n {
        env.publish_task(&json!({"id": format!("l-{i}"), "kind": "interpret", "lock_keys": ["pump-3"],
            "input": {"message": format!("Actualiza el trabajo {i} de la bomba 3")}}))
            .await;
    }
    let (results, _) = tap.collect_distinct(n).await;
    let mut spans: Vec<(String, String)> =
        results.values().map(|r| (r.started_at.clone(), r.finished_at.clone())).collect();
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[1].0 >= w[0].1, "overlapping runs on one lock key: {:?} and {:?}", w[0], w[1]);
    }
    // Waiting did not burn the delivery limit: nothing was dead-lettered.
    assert!(env.drain_dead().await.is_empty());
    env.cleanup().await;
}

async fn flotactl(env: &TestEnv, args: &[&str], stdin: Option<&str>) -> (Option<i32>, String, String) {
    let mut cmd = tokio::process::Command::new(procs::binary("flotactl"));
    cmd.args(args)
        .envs(env.env())
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("flotactl built");
    if let Some(input) = stdin {
        let mut s = child.stdin.take().unwrap();
        s.write_all(input.as_bytes()).await.unwrap();
        drop(s);
    }
    let out =
        tokio::time::timeout(Duration::from_secs(300), child.wait_with_output()).await.unwrap().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flotactl_submits_reports_bad_lines_and_works_the_dead_letters() {
    let env = TestEnv::new("cli").await;
    let jsonl = [
        json!({"id": "cli-1", "kind": "interpret", "input": {"message": "Abrí un trabajo para cambiar la bomba"}}).to_string(),
        r#"{"id": "cli-bad", "kind": "interpret", "input": {"message": 5}}"#.to_string(),
        json!({"id": "cli-2", "kind": "interpret", "input": {"message": "Sí, confirmo"}}).to_string(),
    ]
    .join("\n");
    let (code, out, err) = flotactl(&env, &["submit", "-"], Some(&jsonl)).await;
    assert_eq!(code, Some(65), "some lines rejected: {out} {err}");
    assert!(out.contains("published 2, rejected 1"), "{out}");
    assert!(err.contains("line 2: (id cli-bad)"), "{err}");
    assert_eq!(
        env.queue_depth(&env.topo.work_queue(flota_shared::envelope::Kind::Interpret)).await,
        2,
        "the bad line was not published"
    );

    let gpu = procs::gpusim(&[]).await;
    let _w = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let (code, out, _) = flotactl(&env, &["status", "cli-1", "--wait", "--timeout", "120"], None).await;
    assert_eq!(code, Some(0), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"], "succeeded");
    assert_eq!(v["result"]["output"]["intent"], "open_work");

    let (_, out, _) = flotactl(&env, &["queues", "--json"], None).await;
    let queues: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert!(queues.iter().any(|q| q["name"] == env.topo.dead_queue()));

    // A dead letter: listed with its reason, shown, replayed once its cause is gone.
    let props = flota_shared::amqp::task_properties(
        "dl-1",
        &flota_shared::telemetry::TraceParent::new_root().header(),
        0,
    );
    env.publish_raw(
        "interpret",
        json!({"id": "dl-1", "kind": "launch", "input": {}}).to_string().as_bytes(),
        props,
    )
    .await;
    // An unknown kind as routing key is not lost either: P.tasks' alternate exchange catches it.
    let props2 = flota_shared::amqp::task_properties(
        "dl-2",
        &flota_shared::telemetry::TraceParent::new_root().header(),
        0,
    );
    env.publish_raw(
        "launch",
        json!({"id": "dl-2", "kind": "launch", "input": {}}).to_string().as_bytes(),
        props2,
    )
    .await;
    for _ in 0..300 {
        if env.queue_depth(&env.topo.dead_queue()).await == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, out, _) = flotactl(&env, &["dlq", "list", "--json"], None).await;
    let mut list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    list.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[0]["id"], "dl-1");
    assert_eq!(list[0]["reason"], "invalid_task");
    assert_eq!(list[1]["id"], "dl-2");
    assert_eq!(list[1]["reason"], "unroutable");
    let mut depth = 0;
    for _ in 0..100 {
        depth = env.queue_depth(&env.topo.dead_queue()).await;
        if depth == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(depth, 2, "listing leaves them in place");
    let (code, out, _) = flotactl(&env, &["dlq", "show", "dl-1"], None).await;
    assert_eq!(code, Some(0));
    assert!(out.contains("launch"));
    let (_, out, err) = flotactl(&env, &["dlq", "replay", "dl-2"], None).await;
    assert!(out.contains("replayed 0"), "no kind to route it by: {out} {err}");
    let (_, out, _) = flotactl(&env, &["dlq", "purge"], None).await;
    assert!(out.contains("purged 2"), "{out}");
    assert_eq!(env.queue_depth(&env.topo.dead_queue()).await, 0);

    let (code, out, _) = flotactl(&env, &["workers", "--json"], None).await;
    assert_eq!(code, Some(0));
    let workers: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(workers.len(), 1);
    env.cleanup().await;
}
