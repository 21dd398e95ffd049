//! Secrets and prompt text never reach logs, metrics or dead-letter headers:
//! a workload runs with canary strings in every credential and prompt at
//! `RUST_LOG=trace`, and no output contains any of them.

use std::process::Command;

use flota_tests::TestEnv;
use flota_tests::procs::{self, Proc};
use serde_json::json;

const AMQP_CANARY: &str = "canaryAmqpPw7731";
const REDIS_CANARY: &str = "canaryRedisPw5512";
const GPU_CANARY: &str = "canaryGpuKey9904";
const PROMPT_CANARY: &str = "canaryPrompt4417";

fn rabbitmqctl(args: &[&str]) -> bool {
    Command::new("rabbitmqctl").args(args).output().map(|o| o.status.success()).unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canaries_never_reach_any_output() {
    let env = TestEnv::new("canary").await;
    // A broker user and a Redis ACL user whose passwords are canaries.
    let amqp_user = format!("canary-{}", &env.prefix);
    assert!(rabbitmqctl(&["add_user", &amqp_user, AMQP_CANARY]), "rabbitmqctl add_user (run as root)");
    assert!(rabbitmqctl(&["set_permissions", "-p", "/", &amqp_user, ".*", ".*", ".*"]));
    let redis_user = format!("canary-{}", &env.prefix);
    {
        let client = flota_shared::store::redis::Client::open(env.config.redis_url.as_str()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = flota_shared::store::redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&redis_user)
            .arg("on")
            .arg(format!(">{REDIS_CANARY}"))
            .arg("~*")
            .arg("+@all")
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let amqp_url = format!("amqp://{amqp_user}:{AMQP_CANARY}@127.0.0.1:5672/%2f");
    let redis_url = format!("redis://{redis_user}:{REDIS_CANARY}@127.0.0.1:6379/0");

    let dir = std::env::temp_dir().join(format!("flota-canary-{}", env.prefix));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("all.log");
    let gpu = Proc::start_with(
        "flota-gpusim",
        &["--addr", "127.0.0.1:0", "--api-key", GPU_CANARY],
        &[],
        "listening on",
        None,
    )
    .await
    .unwrap();
    let worker_env = vec![
        ("FLOTA_PREFIX".to_string(), env.prefix.clone()),
        ("FLOTA_AMQP_URL".to_string(), amqp_url.clone()),
        ("FLOTA_REDIS_URL".to_string(), redis_url.clone()),
        ("FLOTA_GPU_URL".to_string(), gpu.url()),
        ("FLOTA_GPU_API_KEY".to_string(), GPU_CANARY.to_string()),
        ("FLOTA_METRICS_ADDR".to_string(), "127.0.0.1:0".to_string()),
        ("RUST_LOG".to_string(), "trace".to_string()),
    ];
    let worker = Proc::start_with("flota-worker", &[], &worker_env, "ready", Some(&log)).await.unwrap();
    let mut tap = env.tap_results().await;

    env.publish_task(&json!({"id": "c-1", "kind": "interpret", "input": {"message": format!("Abrí un trabajo para {PROMPT_CANARY}")}})).await;
    env.publish_task(&json!({"id": "c-2", "kind": "deliberate", "input": {"role": "DEV", "task": format!("Plan {PROMPT_CANARY}")}})).await;
    // A poison message carrying the canary: its dead-letter headers must not echo it.
    env.publish_raw("interpret", format!("{{\"id\": \"c-3\", \"kind\": \"interpret\", \"input\": {{\"message\": 5, \"x\": \"{PROMPT_CANARY}\"}}}}").as_bytes(),
        flota_shared::amqp::task_properties("c-3", &flota_shared::telemetry::TraceParent::new_root().header(), 0)).await;
    let (results, _) = tap.collect_distinct(3).await;
    assert_eq!(
        results["c-1"].status,
        flota_shared::envelope::Status::Succeeded,
        "the API key reached gpusim"
    );
    let dead = env.wait_dead(1).await;
    let metrics = reqwest::get(format!("{}/metrics", worker.url())).await.unwrap().text().await.unwrap();
    let stdout_line = worker.ready_line.clone();
    assert_eq!(worker.terminate().await, Some(0));
    // The bad-config path: a wrong URL with a password is reported without it.
    let bad = Command::new(procs::binary("flota-worker"))
        .env("FLOTA_AMQP_URL", format!("http://u:{AMQP_CANARY}@x"))
        .env("FLOTA_REDIS_URL", &redis_url)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(64));

    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.len() > 1000, "trace logs were written");
    let mut outputs = vec![("logs", logs), ("metrics", metrics), ("ready line", stdout_line)];
    outputs.push(("bad-config stderr", String::from_utf8_lossy(&bad.stderr).into_owned()));
    for d in &dead {
        outputs.push(("dead-letter headers", format!("{:?} {:?}", d.reason, d.error)));
    }
    for (what, text) in &outputs {
        for canary in [AMQP_CANARY, REDIS_CANARY, GPU_CANARY, PROMPT_CANARY] {
            assert!(!text.contains(canary), "{canary} found in {what}");
        }
    }
    rabbitmqctl(&["delete_user", &amqp_user]);
    let client = flota_shared::store::redis::Client::open(env.config.redis_url.as_str()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: Result<(), _> =
        flota_shared::store::redis::cmd("ACL").arg("DELUSER").arg(&redis_user).query_async(&mut c).await;
    let _ = std::fs::remove_dir_all(&dir);
    env.cleanup().await;
}
