//! Councils in Redis, deliberations that tolerate agent failures and resume
//! after a crash, and approved plans dispatched once per role.

use std::time::Duration;

use flota_shared::envelope::{DeliberateOutput, ErrorCode, Status};
use flota_tests::{TestEnv, eventually, flotactl, procs};
use futures::StreamExt;
use serde_json::{Value, json};

async fn stats(gpu: &procs::Proc) -> Value {
    reqwest::get(format!("{}/stats", gpu.url())).await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn councils_crud_survives_restarts() {
    let env = TestEnv::new("councils").await;
    let http = reqwest::Client::new();
    let scheduler = procs::scheduler(&env.env(), &[]).await;
    let api = scheduler.url();
    let list: Vec<Value> = http.get(format!("{api}/v1/councils")).send().await.unwrap().json().await.unwrap();
    let roles: Vec<&str> = list.iter().filter_map(|c| c["role"].as_str()).collect();
    assert_eq!(roles, ["ARCHITECT", "DATA", "DEV", "DEVOPS", "QA"]);
    assert!(list.iter().all(|c| c["agents"].as_array().unwrap().len() == 3));

    let legal = json!({"agents": [
        {"persona": "You are LEGAL-1, a contracts lawyer.", "temperature": 0.2},
        {"persona": "You are LEGAL-2, a privacy officer.", "temperature": 0.5, "model": "flota-sim-1"}
    ]});
    assert_eq!(http.put(format!("{api}/v1/councils/LEGAL")).json(&legal).send().await.unwrap().status(), 200);
    let bad = json!({"agents": [{"persona": "", "temperature": 9}]});
    let r = http.put(format!("{api}/v1/councils/BAD")).json(&bad).send().await.unwrap();
    assert_eq!(r.status(), 400);

    // The registry outlives the scheduler.
    drop(scheduler);
    let scheduler = procs::scheduler(&env.env(), &[]).await;
    let api = scheduler.url();
    let legal: Value =
        http.get(format!("{api}/v1/councils/LEGAL")).send().await.unwrap().json().await.unwrap();
    assert_eq!(legal["agents"].as_array().unwrap().len(), 2);

    // A worker started afterwards deliberates with it; an unknown role fails clearly.
    let gpu = procs::gpusim(&[]).await;
    let _w = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let mut tap = env.tap_results().await;
    env.publish_task(&json!({"id": "legal-1", "kind": "deliberate", "input": {"role": "LEGAL", "task": "Review the data-sharing clause", "agents": 2}})).await;
    env.publish_task(
        &json!({"id": "nobody-1", "kind": "deliberate", "input": {"role": "NOBODY", "task": "x"}}),
    )
    .await;
    let (results, _) = tap.collect_distinct(2).await;
    let out: DeliberateOutput = serde_json::from_value(results["legal-1"].output.clone().unwrap()).unwrap();
    assert_eq!(out.proposals.len(), 2);
    assert!(out.winner.starts_with("LEGAL-"));
    let err = results["nobody-1"].error.clone().unwrap();
    assert!(err.message.contains("unknown council role `NOBODY`"), "{}", err.message);

    assert_eq!(http.delete(format!("{api}/v1/councils/LEGAL")).send().await.unwrap().status(), 204);
    assert_eq!(http.get(format!("{api}/v1/councils/LEGAL")).send().await.unwrap().status(), 404);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliberations_survive_failing_agents_up_to_a_quorum() {
    let env = TestEnv::new("quorum").await;
    let gpu = procs::gpusim(&["--fail-user", "QA-2"]).await;
    let _w = procs::worker(&env.env(), &gpu.url(), &[("FLOTA_GPU_RETRIES", "1")]).await;
    let mut tap = env.tap_results().await;
    env.publish_task(&json!({"id": "q-1", "kind": "deliberate", "input": {"role": "QA", "task": "Plan the regression suite"}})).await;
    let r = tap.next().await.unwrap();
    assert_eq!(r.status, Status::Succeeded, "{:?}", r.error);
    let out: DeliberateOutput = serde_json::from_value(r.output.unwrap()).unwrap();
    assert_eq!(out.agents_failed, 1);
    assert_eq!(out.proposals.len(), 2);
    assert!(out.proposals.iter().all(|p| p.usage.completion_tokens > 0), "token usage per agent");
    assert!(
        r.usage.completion_tokens >= out.proposals.iter().map(|p| p.usage.completion_tokens).sum::<u64>()
    );

    // Two of three failing: no quorum, a clear failure (after its bounded attempts).
    let gpu2 = procs::gpusim(&["--fail-user", "DEV-1", "--fail-user", "DEV-3"]).await;
    let _w2 =
        procs::worker(&env.env(), &gpu2.url(), &[("FLOTA_GPU_RETRIES", "0"), ("FLOTA_MAX_ATTEMPTS", "1")])
            .await;
    drop(_w);
    env.publish_task(&json!({"id": "q-2", "kind": "deliberate", "input": {"role": "DEV", "task": "Refactor the exporter"}})).await;
    let r = tap.next().await.unwrap();
    assert_eq!(r.id, "q-2");
    assert_eq!(r.status, Status::Failed);
    let e = r.error.unwrap();
    // The agents' calls failed on the GPU (HTTP 500): that is the code; the
    // message says the quorum was not reached.
    assert_eq!(e.code, ErrorCode::GpuUnavailable, "{e:?}");
    assert!(e.message.contains("quorum not reached: 1 of 3 proposals survived, 2 needed"), "{}", e.message);
    env.cleanup().await;
}

/// A council with three agents, written to a file.
fn council_file(dir: &std::path::Path, quorum: Option<u32>) -> String {
    let mut council = json!({"agents": [
        {"persona": "You are LEGAL-1, a contracts lawyer.", "temperature": 0.2},
        {"persona": "You are LEGAL-2, a privacy officer.", "temperature": 0.4},
        {"persona": "You are LEGAL-3, a compliance auditor.", "temperature": 0.6}
    ]});
    if let Some(k) = quorum {
        council["quorum"] = json!(k);
    }
    let path = dir.join(format!("legal-{}.json", quorum.unwrap_or(0)));
    std::fs::write(&path, council.to_string()).unwrap();
    path.to_string_lossy().into_owned()
}

/// `flotactl councils list|show|set|delete` against Redis, a council's own
/// `quorum` deciding how many proposals must survive, and a worker restarted
/// in between using what was stored while it was down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flotactl_manages_councils_with_their_quorum_across_a_worker_restart() {
    let env = TestEnv::new("ctl-councils").await;
    let dir = std::env::temp_dir().join(format!("flota-{}", env.prefix));
    std::fs::create_dir_all(&dir).unwrap();

    let (code, out, err) = flotactl(&env, &["councils", "list"]).await;
    assert_eq!(code, Some(0), "{err}");
    for role in ["DEV", "QA", "ARCHITECT", "DEVOPS", "DATA"] {
        assert!(out.lines().any(|l| l.starts_with(role) && l.ends_with("3 agents")), "{role} listed: {out}");
    }
    // Every agent must survive.
    let (code, out, err) = flotactl(&env, &["councils", "set", "LEGAL", &council_file(&dir, Some(3))]).await;
    assert_eq!(code, Some(0), "{out} {err}");
    assert!(out.contains("council LEGAL set with 3 agents"), "{out}");
    let (code, out, _) = flotactl(&env, &["councils", "show", "LEGAL"]).await;
    assert_eq!(code, Some(0));
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (shown["quorum"].clone(), shown["agents"].as_array().unwrap().len()),
        (json!(3), 3),
        "{shown}"
    );
    // A quorum the council cannot reach is refused, with the problem named, and nothing changes.
    let (code, _, err) = flotactl(&env, &["councils", "set", "LEGAL", &council_file(&dir, Some(4))]).await;
    assert_ne!(code, Some(0));
    assert!(err.contains("`quorum` must be 1..=the number of agents"), "{err}");
    let (_, out, _) = flotactl(&env, &["councils", "show", "LEGAL"]).await;
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["quorum"], 3);

    let settings = [("FLOTA_GPU_RETRIES", "0"), ("FLOTA_MAX_ATTEMPTS", "1")];
    let gpu = procs::gpusim(&["--fail-user", "LEGAL-2", "--fail-user", "LEGAL-3"]).await;
    let worker = procs::worker(&env.env(), &gpu.url(), &settings).await;
    let mut tap = env.tap_results().await;
    let legal = |id: &str| json!({"id": id, "kind": "deliberate", "input": {"role": "LEGAL", "task": "Review the data-sharing clause"}});
    env.publish_task(&legal("legal-all")).await;
    let r = tap.next().await.unwrap();
    assert_eq!((r.id.as_str(), r.status), ("legal-all", Status::Failed));
    let e = r.error.unwrap();
    assert!(e.message.contains("quorum not reached: 1 of 3 proposals survived, 3 needed"), "{}", e.message);

    // While the worker is down, one surviving proposal is made enough.
    assert_eq!(worker.terminate().await, Some(0));
    let (code, out, err) = flotactl(&env, &["councils", "set", "LEGAL", &council_file(&dir, Some(1))]).await;
    assert_eq!(code, Some(0), "{out} {err}");
    let _worker = procs::worker(&env.env(), &gpu.url(), &settings).await;
    env.publish_task(&legal("legal-one")).await;
    let r = tap.next().await.unwrap();
    assert_eq!((r.id.as_str(), r.status), ("legal-one", Status::Succeeded), "{:?}", r.error);
    let out: DeliberateOutput = serde_json::from_value(r.output.unwrap()).unwrap();
    assert_eq!((out.agents_failed, out.proposals.len()), (2, 1));
    assert_eq!(out.winner, "LEGAL-1");

    let (code, _, _) = flotactl(&env, &["councils", "delete", "LEGAL"]).await;
    assert_eq!(code, Some(0));
    let (code, _, err) = flotactl(&env, &["councils", "show", "LEGAL"]).await;
    assert_eq!(code, Some(3), "{err}");
    let (code, _, err) = flotactl(&env, &["councils", "delete", "LEGAL"]).await;
    assert_eq!(code, Some(3), "nothing left to delete: {err}");
    // A default role can be replaced, and deleting it brings back its built-in council.
    let persona = |out: &str| serde_json::from_str::<Value>(out).unwrap()["agents"][0]["persona"].clone();
    let (code, _, _) = flotactl(&env, &["councils", "set", "QA", &council_file(&dir, None)]).await;
    assert_eq!(code, Some(0));
    let (_, out, _) = flotactl(&env, &["councils", "show", "QA"]).await;
    assert_eq!(persona(&out), "You are LEGAL-1, a contracts lawyer.");
    let (code, _, _) = flotactl(&env, &["councils", "delete", "QA"]).await;
    assert_eq!(code, Some(0));
    let (_, out, _) = flotactl(&env, &["councils", "show", "QA"]).await;
    assert!(persona(&out).as_str().unwrap().starts_with("You are QA-1"), "{out}");
    let _ = std::fs::remove_dir_all(dir);
    env.cleanup().await;
}

/// `POST /v1/plans` while no worker runs: `GET /v1/plans/{id}` shows every
/// role queued and no winner; once a worker runs them, each role succeeded with
/// the winner and score of its own deliberation's result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plans_status_shows_each_roles_progress_and_winner() {
    let env = TestEnv::new("plan-view").await;
    let scheduler = procs::scheduler(&env.env(), &[]).await;
    let api = scheduler.url();
    let http = reqwest::Client::new();
    let plan = json!({"plan_id": "p-9", "story_id": "s-9", "roles": ["DEVOPS", "DATA"], "task": "Move the nightly export to the new cluster", "constraints": []});
    let r = http.post(format!("{api}/v1/plans")).json(&plan).send().await.unwrap();
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    let view: Value = http.get(format!("{api}/v1/plans/p-9")).send().await.unwrap().json().await.unwrap();
    assert_eq!(view["status"], "running", "{view}");
    for role in ["DEVOPS", "DATA"] {
        assert_eq!(view["roles"][role]["status"], "queued", "{view}");
        assert_eq!(view["roles"][role]["winner"], Value::Null, "{view}");
    }
    assert_eq!(http.get(format!("{api}/v1/plans/p-unknown")).send().await.unwrap().status(), 404);

    let gpu = procs::gpusim(&[]).await;
    let _w = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let plan_url = format!("{api}/v1/plans/p-9");
    eventually("the plan completes", || async {
        let v: Value = reqwest::get(&plan_url).await.unwrap().json().await.unwrap();
        v["status"] == "completed"
    })
    .await;
    let view: Value = http.get(&plan_url).send().await.unwrap().json().await.unwrap();
    for role in ["DEVOPS", "DATA"] {
        let entry = &view["roles"][role];
        assert_eq!(entry["status"], "succeeded", "{view}");
        let task: Value = http
            .get(format!("{api}/v1/tasks/{}", entry["task_id"].as_str().unwrap()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let out: DeliberateOutput = serde_json::from_value(task["result"]["output"].clone()).unwrap();
        assert_eq!(entry["winner"], out.winner.as_str(), "{view}");
        assert!(out.winner.starts_with(role));
        assert_eq!(entry["score"].as_f64(), Some(out.proposals[0].score), "{view}");
    }
    // The plan and its event claims are kept for the retention (a week by default), not for ever.
    let week = 7 * 24 * 3_600_000;
    for key in [env.store.keys.plan("p-9"), env.store.keys.plan_events("p-9")] {
        eventually(&format!("{key} expires within a week"), || async {
            let left = env.pttl(&key).await;
            left > 0 && left <= week
        })
        .await;
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_deliberation_resumes_without_repeating_finished_calls() {
    let env = TestEnv::new("resume").await;
    // Every call takes 400 ms, so the kill lands while the reviews are in flight.
    let gpu = procs::gpusim(&["--base-ms", "400"]).await;
    let victim = procs::worker(&env.env(), &gpu.url(), &[("FLOTA_LOCK_LEASE_MS", "1500")]).await;
    let mut tap = env.tap_results().await;
    env.publish_task(&json!({"id": "r-1", "kind": "deliberate", "input": {"role": "DATA", "task": "Deduplicate customers", "agents": 3}})).await;
    // Wait until the three proposals are checkpointed in Redis (gpusim having
    // served them is not enough: the worker writes each checkpoint after its
    // answer arrives), then kill.
    eventually("the three proposals are checkpointed", || async {
        let mut all = true;
        for i in 0..3 {
            all &= env.store.checkpoint_get("r-1", &format!("p:{i}")).await.ok().flatten().is_some();
        }
        all
    })
    .await;
    victim.signal("KILL").await;
    let served_before = stats(&gpu).await["served_by_kind"]["proposal"].as_u64().unwrap_or(0);
    assert_eq!(served_before, 3);
    let _w = procs::worker(&env.env(), &gpu.url(), &[]).await;
    let r = tap.next().await.unwrap();
    assert_eq!(r.status, Status::Succeeded, "{:?}", r.error);
    let s = stats(&gpu).await;
    assert_eq!(s["served_by_kind"]["proposal"], 3, "no proposal generated twice: {s}");
    // Reviews in flight at the kill may be asked again; finished ones are not.
    assert!(s["served_by_kind"]["review"].as_u64().unwrap() <= 12);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_plan_approved_twice_deliberates_each_role_once() {
    let env = TestEnv::new("plans").await;
    let gpu = procs::gpusim(&[]).await;
    let scheduler = procs::scheduler(&env.env(), &[]).await;
    let _w = procs::worker(&env.env(), &gpu.url(), &[]).await;
    // Listen to completion events.
    let ch = env.conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            lapin::types::ShortString::from(""),
            lapin::options::QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    for key in ["deliberation.completed", "plan.completed"] {
        ch.queue_bind(
            q.name().clone(),
            lapin::types::ShortString::from(env.topo.events_exchange()),
            lapin::types::ShortString::from(key),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    }
    let mut events = ch
        .basic_consume(
            q.name().clone(),
            lapin::types::ShortString::from("events"),
            lapin::options::BasicConsumeOptions { no_ack: true, ..Default::default() },
            Default::default(),
        )
        .await
        .unwrap();

    // Published at once: the scheduler declared and bound P.plans before it said it
    // was listening (topology.rs checks that an event published then is routed).
    let plan = json!({"plan_id": "p-77", "story_id": "s-1", "roles": ["DEV", "QA", "ARCHITECT"], "task": "Add SSO to the portal", "constraints": ["no downtime"]});
    let props = flota_shared::amqp::message_properties(
        "p-77",
        &flota_shared::telemetry::TraceParent::new_root().header(),
    );
    for _ in 0..2 {
        env.publisher
            .publish(&env.topo.events_exchange(), "plan.approved", plan.to_string().as_bytes(), props.clone())
            .await
            .unwrap();
    }
    let mut got: Vec<(String, Value)> = Vec::new();
    while !got.iter().any(|(k, _)| k == "plan.completed") {
        let d =
            tokio::time::timeout(Duration::from_secs(180), events.next()).await.unwrap().unwrap().unwrap();
        got.push((d.routing_key.to_string(), serde_json::from_slice(&d.data).unwrap()));
    }
    // A moment for any duplicate to show up, then count.
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(2), events.next()).await {
        got.push((d.routing_key.to_string(), serde_json::from_slice(&d.data).unwrap()));
    }
    let completed: Vec<&Value> =
        got.iter().filter(|(k, _)| k == "deliberation.completed").map(|(_, v)| v).collect();
    assert_eq!(completed.len(), 3, "one deliberation.completed per role: {got:?}");
    assert_eq!(got.iter().filter(|(k, _)| k == "plan.completed").count(), 1);
    let plan_done = &got.iter().find(|(k, _)| k == "plan.completed").unwrap().1;
    for role in ["DEV", "QA", "ARCHITECT"] {
        assert!(plan_done["roles"][role]["winner"].as_str().unwrap().starts_with(role), "{plan_done}");
    }
    let status: Value =
        reqwest::get(format!("{}/v1/plans/p-77", scheduler.url())).await.unwrap().json().await.unwrap();
    assert_eq!(status["status"], "completed");
    // Each role deliberated once: 3 roles × (3 proposals + 6 reviews).
    assert_eq!(stats(&gpu).await["served"], 27);
    // The API path dispatches nothing new for the same plan.
    let r: Value = reqwest::Client::new()
        .post(format!("{}/v1/plans", scheduler.url()))
        .json(&plan)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["task_ids"].as_array().unwrap().len(), 3);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stats(&gpu).await["served"], 27);
    env.cleanup().await;
}
