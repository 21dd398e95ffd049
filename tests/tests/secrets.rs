//! Secrets and prompt text never reach logs, metrics, dead-letter headers or
//! error messages (security item 4): the whole fleet (scheduler, worker,
//! flotactl) runs at `RUST_LOG=trace` with a canary in every credential
//! (RabbitMQ passwords, the Redis password, the GPU API key, the API token)
//! and in every prompt (interpretation messages and history, deliberation
//! tasks and constraints, a council persona, a plan's task), submitted
//! straight to RabbitMQ, through `POST /v1/tasks` and `POST /v1/plans`, and
//! with `flotactl submit`, with failures on every path (a poison task, a task
//! over the model's limit, an unreadable result, an invalid plan event, bad
//! tokens, bad credentials, bad configuration). No output contains a canary
//! in any form (as text in any case, as a `Debug` of its bytes, as hex), and
//! URLs are logged with their passwords redacted.
//!
//! What is *not* searched, because a canary legitimately lives there:
//! - gpusim's own output: it plays the GPU server, which is given the prompts
//!   and checks the API key (a real vLLM logs prompts at debug);
//! - the result of a task that succeeded (`GET /v1/tasks/{id}`, `flotactl
//!   status`): the model's output is derived from the prompt (gpusim's
//!   interpretation cuts a work title out of the message);
//! - a dead letter's body and `flotactl dlq show`'s `body`: the original
//!   message, kept so an operator can replay it;
//! - the council registry (`GET /v1/councils`, `flotactl councils show`):
//!   personas are what an operator stores there.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use flota_shared::amqp;
use flota_shared::telemetry::TraceParent;
use flota_tests::procs::{self, Proc};
use flota_tests::users::{RabbitUser, RedisUser};
use flota_tests::{PATIENCE, TestEnv, eventually};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};

/// The worker's RabbitMQ password.
const AMQP_CANARY: &str = "canaryAmqpPw7731";
/// The RabbitMQ password of the scheduler and the operator's flotactl.
const OPS_AMQP_CANARY: &str = "canaryOpsAmqpPw3390";
/// A password RabbitMQ refuses (flotactl reports the failed connect).
const BAD_AMQP_CANARY: &str = "canaryBadAmqpPw4450";
const REDIS_CANARY: &str = "canaryRedisPw5512";
/// A password Redis refuses.
const BAD_REDIS_CANARY: &str = "canaryBadRedisPw1187";
const GPU_CANARY: &str = "canaryGpuKey9904";
const API_TOKEN_CANARY: &str = "canaryApiToken6021";
/// A wrong API token.
const WRONG_TOKEN_CANARY: &str = "canaryWrongToken8163";
const PROMPT_CANARY: &str = "canaryPrompt4417";
const PERSONA_CANARY: &str = "canaryPersona2288";

const CANARIES: [&str; 10] = [
    AMQP_CANARY,
    OPS_AMQP_CANARY,
    BAD_AMQP_CANARY,
    REDIS_CANARY,
    BAD_REDIS_CANARY,
    GPU_CANARY,
    API_TOKEN_CANARY,
    WRONG_TOKEN_CANARY,
    PROMPT_CANARY,
    PERSONA_CANARY,
];

/// Configure, write and read on everything: the canary users are about what
/// gets logged, not about what they may do.
const ALL_PERMISSIONS: [&str; 3] = [".*", ".*", ".*"];

/// `vars` with `overrides` replacing (or adding) variables.
fn with(vars: &[(String, String)], overrides: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> =
        vars.iter().filter(|(k, _)| !overrides.iter().any(|(o, _)| o == k)).cloned().collect();
    out.extend(overrides.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    out
}

/// What one flotactl run printed.
struct Ctl {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// `flotactl ARGS` with exactly `vars` as its FLOTA_* settings (and RUST_LOG),
/// stdin closed; bounded by PATIENCE.
async fn flotactl(vars: &[(String, String)], args: &[&str]) -> Ctl {
    let mut cmd = tokio::process::Command::new(procs::binary("flotactl"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("FLOTA_") || k.starts_with("OTEL_")) {
        cmd.env_remove(k);
    }
    let run = cmd.args(args).envs(vars.iter().cloned()).stdin(Stdio::null()).output();
    let out = tokio::time::timeout(PATIENCE, run).await.expect("flotactl finishes").expect("flotactl built");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Ctl { code: out.status.code(), stdout: text(&out.stdout), stderr: text(&out.stderr) }
}

/// A binary run with a bad configuration whose values carry canaries: exit 64, its stderr.
fn bad_config_stderr(binary: &str, vars: &[(&str, String)]) -> String {
    let mut cmd = Command::new(procs::binary(binary));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("FLOTA_")) {
        cmd.env_remove(k);
    }
    if binary == "flotactl" {
        cmd.arg("queues");
    }
    let out = cmd
        .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
        .env("RUST_LOG", "trace")
        .stdin(Stdio::null())
        .output()
        .expect("binary built");
    assert_eq!(out.status.code(), Some(64), "{binary} refuses the bad configuration");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The forms a canary is searched in: as text (case-insensitive: a derived
/// output may capitalise it), as a `Debug` of its bytes (`[99, 97, ...]`,
/// how a dependency's frame dump would show a password or a message body),
/// and in hex.
fn canary_forms() -> Vec<(&'static str, String)> {
    CANARIES
        .iter()
        .flat_map(|c| {
            let bytes: Vec<String> = c.bytes().map(|b| b.to_string()).collect();
            let hex: String = c.bytes().map(|b| format!("{b:02x}")).collect();
            [(*c, c.to_lowercase()), (*c, bytes.join(", ")), (*c, hex)]
        })
        .collect()
}

/// The first canary found in `text`, in any of its forms, with the line it is on.
fn find_canary(text: &str) -> Option<(&'static str, String)> {
    let forms = canary_forms();
    text.lines().find_map(|line| {
        let lower = line.to_lowercase();
        let (canary, _) = forms.iter().find(|(_, form)| lower.contains(form.as_str()))?;
        Some((*canary, line.chars().take(400).collect()))
    })
}

/// An AMQP header value as text: a `LongString`'s `Debug` is its bytes as
/// numbers, which a search for a canary would never match.
fn render(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => format!("{:?}", String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::ShortString(s) => format!("{:?}", s.as_str()),
        AMQPValue::ByteArray(b) => format!("{:?}", String::from_utf8_lossy(b.as_slice())),
        AMQPValue::FieldArray(a) => {
            format!("[{}]", a.as_slice().iter().map(render).collect::<Vec<_>>().join(", "))
        }
        AMQPValue::FieldTable(t) => render_table(t),
        other => format!("{other:?}"),
    }
}

fn render_table(table: &FieldTable) -> String {
    let fields: Vec<String> =
        table.inner().iter().map(|(k, v)| format!("{}: {}", k.as_str(), render(v))).collect();
    format!("{{{}}}", fields.join(", "))
}

/// `GET {api}{path}` with a bearer token: status and body.
async fn get(http: &reqwest::Client, api: &str, path: &str, token: &str) -> (u16, String) {
    match http.get(format!("{api}{path}")).bearer_auth(token).send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

/// A task as the API shows it (`Null` while it does not answer).
async fn task_json(http: &reqwest::Client, api: &str, id: &str) -> Value {
    let (_, body) = get(http, api, &format!("/v1/tasks/{id}"), API_TOKEN_CANARY).await;
    serde_json::from_str(&body).unwrap_or(Value::Null)
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a test file");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canaries_never_reach_any_output() {
    let env = TestEnv::new("canary").await;
    // Users whose passwords are canaries: one for the worker, one for the
    // scheduler and the operator's flotactl, one Redis user for all.
    let worker_user = RabbitUser::create(format!("canary-w-{}", env.prefix), AMQP_CANARY, ALL_PERMISSIONS);
    let ops_user = RabbitUser::create(format!("canary-o-{}", env.prefix), OPS_AMQP_CANARY, ALL_PERMISSIONS);
    let all_keys_and_commands = ["on".to_string(), format!(">{REDIS_CANARY}"), "~*".into(), "+@all".into()];
    let redis_user = RedisUser::create(
        &env.config.redis_url,
        format!("canary-{}", env.prefix),
        REDIS_CANARY,
        &all_keys_and_commands,
    )
    .await;
    let worker_amqp = worker_user.url();
    let ops_amqp = ops_user.url();
    let redis_url = redis_user.url();

    let dir = std::env::temp_dir().join(format!("flota-canary-{}", env.prefix));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let worker_log = dir.join("worker.log");
    let scheduler_log = dir.join("scheduler.log");
    // The GPU server checks the canary key; a message over 3000 characters gets a 400.
    let gpu = Proc::start_with(
        "flota-gpusim",
        &["--addr", "127.0.0.1:0", "--api-key", GPU_CANARY, "--max-context-chars", "3000"],
        &[],
        "listening on",
        None,
    )
    .await
    .expect("gpusim starts");

    // Every process gets every secret (as from one shared environment file), at trace.
    let fleet_vars: Vec<(String, String)> = [
        ("FLOTA_PREFIX", env.prefix.as_str()),
        ("FLOTA_AMQP_URL", ops_amqp.as_str()),
        ("FLOTA_REDIS_URL", redis_url.as_str()),
        ("FLOTA_GPU_URL", gpu.url().as_str()),
        ("FLOTA_GPU_API_KEY", GPU_CANARY),
        ("FLOTA_API_TOKEN", API_TOKEN_CANARY),
        ("FLOTA_API_PROTECT_READS", "true"),
        ("RUST_LOG", "trace"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let worker_vars = with(&fleet_vars, &[("FLOTA_AMQP_URL", &worker_amqp)]);
    let ctl_vars = fleet_vars.clone();

    let scheduler = flota_scheduler::fleet::scheduler(&fleet_vars, &[], Some(&scheduler_log))
        .await
        .expect("scheduler starts");
    let worker = flota_scheduler::fleet::worker(&worker_vars, &gpu.url(), &[], Some(&worker_log))
        .await
        .expect("worker starts");
    let api = scheduler.url();
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    // Outputs searched for canaries at the end, by what they are.
    let mut outputs: Vec<(String, String)> = vec![
        ("worker ready line (stdout)".into(), worker.ready_line.clone()),
        ("scheduler ready line (stdout)".into(), scheduler.ready_line.clone()),
    ];

    // 1. Straight to RabbitMQ: an interpretation, a deliberation, a poison task
    //    (dead-lettered by the worker; its headers must not echo the canary).
    env.publish_task(&json!({"id": "c-1", "kind": "interpret", "input": {"message": format!("Abrí un trabajo para {PROMPT_CANARY}")}})).await;
    env.publish_task(&json!({"id": "c-2", "kind": "deliberate", "input": {"role": "DEV", "task": format!("Plan {PROMPT_CANARY}")}})).await;
    env.publish_raw(
        "interpret",
        format!("{{\"id\": \"c-3\", \"kind\": \"interpret\", \"input\": {{\"message\": 5, \"x\": \"{PROMPT_CANARY}\"}}}}")
            .as_bytes(),
        amqp::task_properties("c-3", &TraceParent::new_root().header(), 0),
    )
    .await;

    // 2. flotactl: a council whose persona is a canary, then tasks from a file
    //    (two lines invalid, one of them not even JSON: reported, never published).
    let council = json!({"agents": [
        {"persona": format!("You are a QA lead. {PERSONA_CANARY}")},
        {"persona": format!("You are a tester. {PERSONA_CANARY}")},
    ]});
    let council_file = write(&dir, "council.json", &council.to_string());
    let set = flotactl(&ctl_vars, &["councils", "set", "QA", council_file.to_str().unwrap()]).await;
    assert_eq!(set.code, Some(0), "councils set: {}{}", set.stdout, set.stderr);
    outputs.push(("flotactl councils set".into(), format!("{}\n{}", set.stdout, set.stderr)));
    let lines = [
        json!({"id": "f-1", "kind": "interpret", "input": {"message": format!("Creá una orden de trabajo para {PROMPT_CANARY}")}})
            .to_string(),
        json!({"id": "f-2", "kind": "deliberate", "input": {"role": "QA", "task": format!("Test {PROMPT_CANARY}"), "constraints": [PROMPT_CANARY], "agents": 2}})
            .to_string(),
        json!({"id": "f-3", "kind": "interpret", "input": {"message": "Sí, confirmo", "history": [{"role": "user", "content": PROMPT_CANARY}]}})
            .to_string(),
        json!({"id": "f-bad", "kind": "interpret", "input": {"message": PROMPT_CANARY, "extra": 1}}).to_string(),
        format!("{{\"id\": \"f-broken\", \"input\": {PROMPT_CANARY}"),
    ];
    let tasks_file = write(&dir, "tasks.jsonl", &(lines.join("\n") + "\n"));
    let submitted = flotactl(&ctl_vars, &["submit", tasks_file.to_str().unwrap()]).await;
    assert_eq!(submitted.code, Some(65), "two lines rejected: {}{}", submitted.stdout, submitted.stderr);
    assert!(submitted.stdout.contains("published 3, rejected 2"), "{}", submitted.stdout);
    outputs.push(("flotactl submit".into(), format!("{}\n{}", submitted.stdout, submitted.stderr)));

    // 3. The API: no token, a wrong token (itself a canary), an invalid task,
    //    then tasks and a plan with the right token; the dashboard's sign-in.
    let batch = json!([
        {"id": "a-1", "kind": "interpret", "input": {"message": format!("Open a work order for {PROMPT_CANARY}")}},
        {"id": "a-2", "kind": "deliberate", "input": {"role": "DEV", "task": format!("Refactor {PROMPT_CANARY}"), "agents": 2}},
        // Longer than the model's context: gpusim answers 400, the task fails (invalid_request).
        {"id": "a-fail", "kind": "interpret", "input": {"message": format!("{PROMPT_CANARY} {}", "revisar la bomba ".repeat(300))}},
    ]);
    let post = |token: Option<&str>, path: &str, body: &Value| {
        let mut req = http.post(format!("{api}{path}")).json(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move {
            let r = req.send().await.expect("POST answered");
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        }
    };
    let (status, body) = post(None, "/v1/tasks", &batch).await;
    assert_eq!(status, 401, "no token: {body}");
    outputs.push(("POST /v1/tasks without a token".into(), body));
    let (status, body) = post(Some(WRONG_TOKEN_CANARY), "/v1/tasks", &batch).await;
    assert_eq!(status, 403, "wrong token: {body}");
    outputs.push(("POST /v1/tasks with a wrong token".into(), body));
    let invalid =
        json!({"id": "a-bad", "kind": "interpret", "input": {"message": PROMPT_CANARY, "extra": 1}});
    let (status, body) = post(Some(API_TOKEN_CANARY), "/v1/tasks", &invalid).await;
    assert_eq!(status, 400, "invalid task: {body}");
    outputs.push(("POST /v1/tasks of an invalid task".into(), body));
    let (status, body) = post(Some(API_TOKEN_CANARY), "/v1/tasks", &batch).await;
    assert_eq!(status, 202, "accepted: {body}");
    outputs.push(("POST /v1/tasks accepted".into(), body));
    let plan = json!({"plan_id": "p-1", "roles": ["DEV"], "task": format!("Ship {PROMPT_CANARY}"), "constraints": [PROMPT_CANARY]});
    let (status, body) = post(Some(API_TOKEN_CANARY), "/v1/plans", &plan).await;
    assert_eq!(status, 202, "plan accepted: {body}");
    outputs.push(("POST /v1/plans accepted".into(), body));
    let (status, body) = get(&http, &api, "/v1/workers", WRONG_TOKEN_CANARY).await;
    assert_eq!(status, 403, "a read with a wrong token: {body}");
    outputs.push(("GET /v1/workers with a wrong token".into(), body));
    let signin = |token: &str| http.get(format!("{api}/?token={token}")).send();
    let wrong = signin(WRONG_TOKEN_CANARY).await.expect("sign-in answered");
    assert_eq!(wrong.status().as_u16(), 403);
    let headers = format!("{:?}", wrong.headers());
    outputs.push(("dashboard sign-in with a wrong token".into(), headers + &wrong.text().await.unwrap()));
    // The right token in a query string (the one place a token is in a URL):
    // accepted, never logged. (The answer's cookie is the token in hex, for the
    // browser: not searched.)
    let right = signin(API_TOKEN_CANARY).await.expect("sign-in answered");
    assert_eq!(right.status().as_u16(), 303, "the dashboard signs in");

    // 4. Malformed messages the scheduler dead-letters: a result whose error is
    //    prompt text instead of an object, a plan event whose constraints are a string.
    let bad_result = json!({"v": 1, "id": "r-bad", "kind": "interpret", "status": "failed",
        "error": format!("the model could not read: {PROMPT_CANARY}")});
    env.publisher
        .publish(
            &env.topo.results_exchange(),
            "",
            bad_result.to_string().as_bytes(),
            amqp::message_properties("r-bad", &TraceParent::new_root().header()),
        )
        .await
        .expect("publish an unreadable result");
    let bad_plan =
        json!({"plan_id": "p-bad", "roles": ["DEV"], "task": "Ship it", "constraints": PROMPT_CANARY});
    env.publisher
        .publish(
            &env.topo.events_exchange(),
            "plan.approved",
            bad_plan.to_string().as_bytes(),
            amqp::message_properties("p-bad", &TraceParent::new_root().header()),
        )
        .await
        .expect("publish an invalid plan.approved");

    // Every task finishes as expected.
    let succeeded = ["c-1", "c-2", "f-1", "f-2", "f-3", "a-1", "a-2", "plan:p-1:DEV"];
    let failed = [("c-3", "invalid_task"), ("a-fail", "invalid_request")];
    for id in succeeded {
        eventually(&format!("{id} succeeded"), || async {
            task_json(&http, &api, id).await["status"] == "succeeded"
        })
        .await;
    }
    for (id, code) in failed {
        eventually(&format!("{id} failed with {code}"), || async {
            let t = task_json(&http, &api, id).await;
            t["status"] == "failed" && t["result"]["error"]["code"] == code
        })
        .await;
        // A failure's result carries no model output: its error message is searched too.
        let (_, body) = get(&http, &api, &format!("/v1/tasks/{id}"), API_TOKEN_CANARY).await;
        outputs.push((format!("GET /v1/tasks/{id} (failed)"), body));
    }
    let dead_queue = env.topo.dead_queue();
    eventually("three dead letters (c-3, r-bad, p-bad)", || async {
        env.queue_depth(&dead_queue).await >= 3
    })
    .await;

    // 5. What an operator reads: the API, metrics, flotactl.
    for path in ["/v1/workers", "/v1/queues", "/v1/stats", "/metrics"] {
        let (status, body) = get(&http, &api, path, API_TOKEN_CANARY).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        outputs.push((format!("scheduler GET {path}"), body));
    }
    let worker_metrics =
        reqwest::get(format!("{}/metrics", worker.url())).await.unwrap().text().await.unwrap();
    assert!(worker_metrics.contains("flota_"), "worker metrics scraped");
    outputs.push(("worker /metrics".into(), worker_metrics));
    // Each with what it must show, so a search of an empty answer proves nothing.
    let worker_id = worker.ready_line.split_whitespace().nth(1).unwrap_or_default().to_string();
    for (args, shows) in [
        (&["status", "c-3"][..], vec!["invalid_task"]),
        (&["status", "a-fail"], vec!["invalid_request"]),
        (&["queues"], vec![dead_queue.as_str()]),
        (&["workers"], vec![worker_id.as_str()]),
        (&["dlq", "list"], vec!["c-3", "r-bad", "p-bad"]),
        (&["councils", "list"], vec!["QA"]),
    ] {
        let out = flotactl(&ctl_vars, args).await;
        assert_eq!(out.code, Some(0), "flotactl {args:?}: {}{}", out.stdout, out.stderr);
        for want in shows {
            assert!(out.stdout.contains(want), "flotactl {args:?} shows {want}: {}", out.stdout);
        }
        outputs.push((format!("flotactl {}", args.join(" ")), format!("{}\n{}", out.stdout, out.stderr)));
    }
    // A succeeded task's status: its result holds the model's output, derived
    // from the prompt, so only its stderr (the logs) is searched.
    let status = flotactl(&ctl_vars, &["status", "c-1"]).await;
    assert!(status.stdout.contains("succeeded"), "{}", status.stdout);
    outputs.push(("flotactl status c-1 (stderr)".into(), status.stderr));
    // `dlq show` prints the dead letter's body (the original message, canary
    // and all): its reason and error are searched, and its logs.
    let show = flotactl(&ctl_vars, &["dlq", "show", "c-3"]).await;
    assert_eq!(show.code, Some(0), "dlq show: {}{}", show.stdout, show.stderr);
    let shown: Vec<Value> = serde_json::from_str(&show.stdout).expect("dlq show prints JSON");
    assert_eq!(shown.len(), 1, "{}", show.stdout);
    assert!(
        shown[0]["body"].as_str().unwrap_or("").contains(PROMPT_CANARY),
        "the body is the original message"
    );
    outputs.push((
        "flotactl dlq show c-3 (all but the body)".into(),
        format!("{} {} {}\n{}", shown[0]["id"], shown[0]["reason"], shown[0]["error"], show.stderr),
    ));
    // Credentials the services refuse: the errors name the URL, redacted.
    let bad_amqp = format!("amqp://canary-nobody:{BAD_AMQP_CANARY}@127.0.0.1:5672/%2f");
    let refused = flotactl(&with(&ctl_vars, &[("FLOTA_AMQP_URL", &bad_amqp)]), &["queues"]).await;
    assert_eq!(refused.code, Some(1), "a refused RabbitMQ login: {}{}", refused.stdout, refused.stderr);
    assert!(
        refused.stderr.contains("amqp://canary-nobody:***@127.0.0.1:5672"),
        "the failed connect names the URL redacted: {}",
        refused.stderr
    );
    outputs.push((
        "flotactl queues, refused by RabbitMQ".into(),
        format!("{}\n{}", refused.stdout, refused.stderr),
    ));
    let bad_redis = format!("redis://{}:{BAD_REDIS_CANARY}@127.0.0.1:6379/0", redis_user.name());
    let refused = flotactl(&with(&ctl_vars, &[("FLOTA_REDIS_URL", &bad_redis)]), &["workers"]).await;
    assert_eq!(refused.code, Some(1), "a refused Redis login: {}{}", refused.stdout, refused.stderr);
    outputs.push((
        "flotactl workers, refused by Redis".into(),
        format!("{}\n{}", refused.stdout, refused.stderr),
    ));

    // Dead-letter headers (every property but the body): the worker's and the scheduler's.
    let dead = env.drain_dead().await;
    let mut ids: Vec<String> = dead
        .iter()
        .filter_map(|d| d.properties.message_id().as_ref().map(|m| m.as_str().to_string()))
        .collect();
    ids.sort();
    assert_eq!(ids, ["c-3", "p-bad", "r-bad"], "the dead letters");
    for d in &dead {
        assert_eq!(d.reason.as_deref(), Some("invalid_task"), "{:?}", d.properties);
        assert!(!d.error.as_deref().unwrap_or("").is_empty(), "a dead letter says why");
        assert!(String::from_utf8_lossy(&d.body).contains(PROMPT_CANARY), "the body is the original message");
        let headers = d.properties.headers().as_ref().map(render_table).unwrap_or_default();
        outputs.push(("dead-letter headers".into(), format!("{headers} {:?}", d.properties)));
    }

    assert_eq!(worker.terminate().await, Some(0), "the worker drains and exits 0");
    assert_eq!(scheduler.terminate().await, Some(0), "the scheduler exits 0");
    drop(gpu);

    // The bad-config path: wrong URLs with passwords are reported without them.
    for binary in ["flota-worker", "flota-scheduler", "flotactl"] {
        let stderr = bad_config_stderr(
            binary,
            &[
                ("FLOTA_AMQP_URL", format!("http://u:{AMQP_CANARY}@x")),
                ("FLOTA_REDIS_URL", format!("http://u:{REDIS_CANARY}@x")),
                ("FLOTA_GPU_URL", format!("ftp://u:{GPU_CANARY}@x")),
                ("FLOTA_API_TOKEN", API_TOKEN_CANARY.to_string()),
            ],
        );
        assert!(stderr.contains("FLOTA_AMQP_URL") && stderr.contains("u:***@x"), "{binary}: {stderr}");
        outputs.push((format!("{binary} bad-config stderr"), stderr));
    }

    // The logs: written at trace, URLs redacted.
    for (what, path) in [("worker log", &worker_log), ("scheduler log", &scheduler_log)] {
        let logs = std::fs::read_to_string(path).expect("log written");
        assert!(logs.contains("TRACE"), "{what} was written at trace level");
        outputs.push((what.into(), logs));
    }
    let scheduler_logs = &outputs.iter().find(|(w, _)| w == "scheduler log").unwrap().1;
    let serving = scheduler_logs.lines().find(|l| l.contains("Serving the API.")).expect("the serving line");
    assert!(
        serving.contains(&format!("amqp://{}:***@127.0.0.1:5672", ops_user.name()))
            && serving.contains(&format!("redis://{}:***@127.0.0.1:6379", redis_user.name())),
        "the scheduler logs its URLs redacted: {serving}"
    );

    let found: Vec<String> = outputs
        .iter()
        .filter_map(|(what, text)| {
            find_canary(text).map(|(canary, line)| format!("{canary} in {what}: {line}"))
        })
        .collect();
    assert!(found.is_empty(), "canaries found:\n{}", found.join("\n"));
    let _ = std::fs::remove_dir_all(&dir);
    drop((worker_user, ops_user, redis_user));
    env.cleanup().await;
}
