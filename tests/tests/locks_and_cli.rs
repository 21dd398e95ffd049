//! `lock_keys` keep tasks sharing a resource apart; `flotactl` submits,
//! reports invalid lines, waits on status and works the dead-letter queue.

use std::process::Stdio;
use std::time::Duration;

use flota_tests::{TestEnv, metric_sample as sample, procs};
use serde_json::json;
use tokio::io::AsyncWriteExt;

async fn scrape(p: &procs::Proc) -> String {
    reqwest::get(format!("{}/metrics", p.url())).await.unwrap().text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_sharing_a_lock_key_never_overlap() {
    let env = TestEnv::new("lockkeys").await;
    let gpu = procs::gpusim(&["--base-ms", "100"]).await;
    let w1 = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let w2 = procs::worker(&env.env(), &gpu.url(), &[]).await;
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
    // Tasks did wait, and they waited queued behind the holder, woken by its
    // unlock: not by polling through the delay queues.
    let (m1, m2) = (scrape(&w1).await, scrape(&w2).await);
    let waits = sample(&m1, "flota_lock_waits_total") + sample(&m2, "flota_lock_waits_total");
    let retries = ["flota_task_retries_total", "flota_busy_retries_total"]
        .iter()
        .map(|series| sample(&m1, series) + sample(&m2, series))
        .sum::<f64>();
    assert!(waits >= 1.0, "8 tasks on one key on two workers: some must have waited");
    assert_eq!(retries, 0.0, "a lock wait went through the delay queues");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_of_a_dead_holder_are_woken_when_its_lease_runs_out() {
    let env = TestEnv::new("lockdead").await;
    let gpu = procs::gpusim(&["--base-ms", "50"]).await;
    let _scheduler = procs::scheduler(&env.env(), &[]).await;
    let _w = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let mut tap = env.tap_results().await;
    // What a worker killed while holding the key leaves behind: the lock, with a
    // lease, and nobody who will ever unlock it.
    let mut c = env.store.conn().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(env.store.keys.resource_lock("valve-9"))
        .arg("dead-holder")
        .arg("PX")
        .arg(3000)
        .query_async(&mut c)
        .await
        .unwrap();
    for i in 0..3 {
        env.publish_task(&json!({"id": format!("ld-{i}"), "kind": "interpret", "lock_keys": ["valve-9"],
            "input": {"message": format!("Actualiza el trabajo {i} de la válvula 9")}}))
            .await;
    }
    // They queue behind the dead holder; when its lease runs out the scheduler's
    // sweep wakes the first, and each finisher wakes the next.
    let (results, _) = tap.collect_distinct(3).await;
    for i in 0..3 {
        let r = &results[&format!("ld-{i}")];
        assert_eq!(r.status, flota_shared::envelope::Status::Succeeded, "ld-{i}: {:?}", r.error);
    }
    let len: u64 =
        redis::cmd("LLEN").arg(env.store.keys.lock_waiters("valve-9")).query_async(&mut c).await.unwrap();
    assert_eq!(len, 0, "no one left waiting");
    drop(c);
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
    for _ in 0..300 {
        if env.queue_depth(&env.topo.dead_queue()).await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, out, _) = flotactl(&env, &["dlq", "list", "--json"], None).await;
    let mut list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    list.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["id"], "dl-1");
    assert_eq!(list[0]["reason"], "invalid_task");
    let mut depth = 0;
    for _ in 0..100 {
        depth = env.queue_depth(&env.topo.dead_queue()).await;
        if depth == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(depth, 1, "listing leaves it in place");
    let (code, out, _) = flotactl(&env, &["dlq", "show", "dl-1"], None).await;
    assert_eq!(code, Some(0));
    assert!(out.contains("launch"));
    let (_, out, _) = flotactl(&env, &["dlq", "purge"], None).await;
    assert!(out.contains("purged 1"), "{out}");
    assert_eq!(env.queue_depth(&env.topo.dead_queue()).await, 0);

    let (code, out, _) = flotactl(&env, &["workers", "--json"], None).await;
    assert_eq!(code, Some(0));
    let workers: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(workers.len(), 1);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flotactl_submit_reconnects_after_a_cut_connection() {
    let env = TestEnv::new("cli-cut").await;
    let proxy = flota_tests::proxy::FaultProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let url = env.config.amqp_url.replace("127.0.0.1:5672", &proxy.addr.to_string());
    let n = 20_000;
    let jsonl: Vec<String> = (0..n)
        .map(|i| {
            json!({"id": format!("cc-{i}"), "kind": "interpret", "input": {"message": "hola"}}).to_string()
        })
        .collect();
    let mut cmd = tokio::process::Command::new(procs::binary("flotactl"));
    cmd.args(["submit", "-"])
        .envs(env.env())
        .env("FLOTA_AMQP_URL", &url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("flotactl built");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(jsonl.join("\n").as_bytes()).await.unwrap();
    drop(stdin);
    // Cut the connection once the submit is under way.
    let queue = env.topo.work_queue(flota_shared::envelope::Kind::Interpret);
    let deadline = tokio::time::Instant::now() + flota_tests::PATIENCE;
    let mut depth = 0;
    while depth == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the submit never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
        depth = env.queue_depth(&queue).await;
    }
    proxy.cut_all();
    assert!(depth < n, "the cut came after the submit had finished; nothing was tested");
    let out =
        tokio::time::timeout(Duration::from_secs(300), child.wait_with_output()).await.unwrap().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout} {stderr}");
    assert!(stdout.contains(&format!("published {n}, rejected 0")), "{stdout}");
    // Every task is in the queue (a publish in flight at the cut may be there twice).
    assert!(env.queue_depth(&queue).await >= n, "tasks lost across the cut");
    env.cleanup().await;
}

/// flota-gpusim keeps the contract's rule for bad settings (exit 64 with a message
/// naming the setting), from its flags or its GPUSIM_* variables; help is not an error.
#[test]
fn gpusim_refuses_a_bad_setting_with_exit_64() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        std::process::Command::new(procs::binary("flota-gpusim"))
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("flota-gpusim built")
    };
    for (args, env, named) in [
        (&[][..], &[("GPUSIM_SLOTS", "lots")][..], "--slots"),
        (&["--error-rate", "2"][..], &[][..], "--error-rate"),
        (&["--no-such-flag"][..], &[][..], "--no-such-flag"),
    ] {
        let out = run(args, env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains(named), "{args:?} {env:?}: {stderr}");
    }
    let help = run(&["--help"], &[]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("GPUSIM_SLOTS"));
}
