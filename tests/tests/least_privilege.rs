//! Least privilege (issue #8): every Flota role runs under its own RabbitMQ
//! user, with permissions limited to its prefix's topology, and under a Redis
//! ACL user limited to the prefix's keys and the commands Flota uses; each user
//! is then shown refused what its role must not do.
//!
//! - a worker, under the worker grants (with and without `configure`) and the ACL user;
//! - the whole fleet at once: a producer submitting with `flotactl`, a worker,
//!   and the scheduler (creating the topology, releasing dependents, publishing
//!   events, dead-lettering, serving `/v1/queues` and `/v1/tasks/{id}`);
//! - `the_documented_grants_are_the_tested_ones`: the grants live in the helper
//!   functions below, and `docs/least-privilege.md` and the README's table
//!   must show exactly those, so the documentation cannot drift from what is tested.

use std::collections::HashMap;
use std::process::Command;

use flota_shared::amqp::{self, Publisher};
use flota_shared::config::Config;
use flota_shared::envelope::{Kind, Status};
use flota_shared::store::{self, Store, redis};
use flota_tests::users::{RabbitUser, RedisUser};
use flota_tests::{TestEnv, eventually, procs};
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde_json::{Value, json};

/// Every command Flota sends to Redis (worker, scheduler, flotactl), including
/// those run inside its Lua scripts, which ACLs check call by call.
const FLOTA_REDIS_COMMANDS: &[&str] = &[
    // Connection upkeep: deadpool's recycle check is `UNWATCH` + `PING`.
    "ping",
    "unwatch",
    // The scripts: redis-rs sends EVALSHA and, on NOSCRIPT, SCRIPT LOAD.
    "evalsha",
    "script|load",
    // Commands sent directly and from the Lua scripts.
    "get",
    "set",
    "setnx",
    "mget",
    "del",
    "exists",
    "expire",
    "pexpire",
    "hget",
    "hset",
    "hsetnx",
    "hmget",
    "hgetall",
    "hdel",
    "hincrby",
    "sadd",
    "srem",
    "smembers",
    "scard",
    "zadd",
    "zrem",
    "zcard",
    "zrangebyscore",
    "zremrangebyscore",
    "scan",
    "time",
];

/// `ACL SETUSER <user> ...` arguments for one prefix (docs/least-privilege.md).
fn acl_rules(prefix: &str, password: &str) -> Vec<String> {
    let mut rules = vec![
        "reset".to_string(),
        "on".to_string(),
        format!(">{password}"),
        format!("~{{{prefix}}}:*"),
        "resetchannels".to_string(),
        "-@all".to_string(),
    ];
    rules.extend(FLOTA_REDIS_COMMANDS.iter().map(|c| format!("+{c}")));
    rules
}

/// RabbitMQ permissions (configure, write, read) of the worker role for one
/// prefix (docs/least-privilege.md).
fn worker_permissions(prefix: &str) -> [String; 3] {
    let p = prefix.replace('.', "\\.");
    [
        format!("^{p}\\.(tasks|results|dlx|events|dead|interpret|deliberate|retry\\..+)$"),
        format!("^({p}\\.(tasks|results|dlx|dead|interpret|deliberate)|amq\\.default)$"),
        format!("^{p}\\.(tasks|results|dlx|interpret|deliberate|retry\\..+)$"),
    ]
}

/// The strictest worker: no `configure` (docs/least-privilege.md).
fn worker_without_configure_permissions(prefix: &str) -> [String; 3] {
    let [_, write, read] = worker_permissions(prefix);
    ["^$".to_string(), write, read]
}

/// RabbitMQ permissions of the scheduler role for one prefix
/// (docs/least-privilege.md): the worker's topology plus its own `P.plans` and
/// `P.dead.watch`, publishing tasks, events, results and dead letters, consuming
/// `P.results`, `P.plans` and `P.dead.watch`.
fn scheduler_permissions(prefix: &str) -> [String; 3] {
    let p = prefix.replace('.', "\\.");
    [
        format!("^{p}\\.(tasks|results|dlx|events|dead|dead\\.watch|interpret|deliberate|plans|retry\\..+)$"),
        format!("^{p}\\.(tasks|results|dlx|events|dead|dead\\.watch|interpret|deliberate|plans)$"),
        format!("^{p}\\.(tasks|results|dlx|events|dead\\.watch|interpret|deliberate|plans|retry\\..+)$"),
    ]
}

/// RabbitMQ permissions of a producer (`flotactl submit`, or any service that
/// publishes tasks): publishing to `P.tasks`, nothing else (docs/least-privilege.md).
fn producer_permissions(prefix: &str) -> [String; 3] {
    let p = prefix.replace('.', "\\.");
    ["^$".to_string(), format!("^{p}\\.tasks$"), "^$".to_string()]
}

fn random_secret() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn config_with(env: &TestEnv, overrides: &[(&str, String)]) -> Config {
    let mut vars: HashMap<String, String> = env.env().into_iter().collect();
    for (k, v) in overrides {
        vars.insert(k.to_string(), v.clone());
    }
    Config::from_lookup(|k| vars.get(k).cloned()).expect("test configuration")
}

fn vars_with(env: &TestEnv, overrides: &[(&str, String)]) -> Vec<(String, String)> {
    let mut vars = env.env();
    for (k, v) in overrides {
        vars.retain(|(name, _)| name != k);
        vars.push((k.to_string(), v.clone()));
    }
    vars
}

fn assert_refused<T: std::fmt::Debug>(what: &str, res: redis::RedisResult<T>) {
    match res {
        Ok(v) => panic!("{what} must be refused to the ACL user, got {v:?}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("NOPERM") || msg.contains("permission"),
                "{what}: not an ACL refusal: {msg}"
            );
        }
    }
}

/// A RabbitMQ user with `permissions` (configure, write, read) on vhost `/`,
/// deleted when dropped; and its AMQP URL.
fn rabbit_user(permissions: &[String; 3]) -> (RabbitUser, String) {
    let [configure, write, read] = permissions;
    let user = RabbitUser::create(
        format!("flota-t-{}", &random_secret()[..10]),
        &random_secret(),
        [configure, write, read],
    );
    let url = user.url();
    (user, url)
}

/// The fleet's Redis ACL user for the prefix (docs/least-privilege.md),
/// deleted when dropped; and its Redis URL.
async fn redis_user(env: &TestEnv) -> (RedisUser, String) {
    let password = random_secret();
    let name = format!("flota-t-{}", &random_secret()[..10]);
    let user =
        RedisUser::create(&env.config.redis_url, name, &password, &acl_rules(&env.prefix, &password)).await;
    let url = user.url();
    (user, url)
}

async fn admin_redis(env: &TestEnv) -> redis::aio::MultiplexedConnection {
    redis::Client::open(env.config.redis_url.as_str())
        .expect("admin client")
        .get_multiplexed_async_connection()
        .await
        .expect("admin connection")
}

/// The broker refused an AMQP operation for lack of permission.
fn assert_access_refused<T: std::fmt::Debug>(who: &str, what: &str, res: Result<T, lapin::Error>) {
    match res {
        Ok(v) => panic!("{what} must be refused to the {who} user, got {v:?}"),
        Err(e) => {
            let msg = format!("{e} {e:?}");
            assert!(
                msg.contains("ACCESS_REFUSED") || msg.contains("ACCESS-REFUSED"),
                "{what} ({who}): not ACCESS_REFUSED: {msg}"
            );
        }
    }
}

/// A confirmed publish the broker refuses: the channel is closed with 403.
async fn assert_publish_refused(who: &str, conn: &lapin::Connection, exchange: &str, routing_key: &str) {
    let publisher = Publisher::open(conn).await.expect("channel");
    let res = publisher.publish(exchange, routing_key, b"{}", amqp::task_properties("lp-x", "", 0)).await;
    match res {
        Ok(()) => panic!("publishing to {exchange:?} must be refused to the {who} user"),
        Err(e) => {
            let msg = format!("{e} {e:?}");
            assert!(
                msg.contains("ACCESS_REFUSED") || msg.contains("ACCESS-REFUSED"),
                "publishing to {exchange:?} ({who}): not ACCESS_REFUSED: {msg}"
            );
        }
    }
}

/// Delete the prefix's queues and exchanges (as the test's admin user), so the
/// process under test creates them, as on a fresh broker: RabbitMQ checks the
/// dead-letter and alternate exchanges of a declare only when it creates the
/// queue or exchange, so a pre-declared topology would hide missing permissions.
async fn delete_topology(env: &TestEnv) -> lapin::Channel {
    let admin = env.conn.create_channel().await.expect("admin channel");
    for q in env.topo.all_queues() {
        admin
            .queue_delete(ShortString::from(q), QueueDeleteOptions::default())
            .await
            .expect("admin queue delete");
    }
    for e in env.topo.all_exchanges() {
        admin
            .exchange_delete(ShortString::from(e), ExchangeDeleteOptions::default())
            .await
            .expect("admin exchange delete");
    }
    admin
}

/// What the fleet's Redis user must not do: dangerous commands, keys outside
/// its prefix (also from inside a script), ad-hoc scripts.
async fn assert_redis_user_confined(env: &TestEnv, user_url: &str) {
    let mut admin = admin_redis(env).await;
    let other_key = format!("{{t-lp-other-{}}}:secret", &random_secret()[..8]);
    let _: () =
        redis::cmd("SET").arg(&other_key).arg("s3cret").query_async(&mut admin).await.expect("admin SET");
    let mut user_conn = redis::Client::open(user_url)
        .expect("user client")
        .get_multiplexed_async_connection()
        .await
        .expect("the ACL user authenticates");
    assert_refused("FLUSHALL", redis::cmd("FLUSHALL").query_async::<String>(&mut user_conn).await);
    assert_refused("FLUSHDB", redis::cmd("FLUSHDB").query_async::<String>(&mut user_conn).await);
    assert_refused(
        "CONFIG GET *",
        redis::cmd("CONFIG").arg("GET").arg("*").query_async::<Vec<String>>(&mut user_conn).await,
    );
    assert_refused(
        "CONFIG SET",
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("appendonly")
            .arg("no")
            .query_async::<String>(&mut user_conn)
            .await,
    );
    assert_refused(
        "GET of a key outside its prefix",
        redis::cmd("GET").arg(&other_key).query_async::<Option<String>>(&mut user_conn).await,
    );
    assert_refused(
        "SET of a key outside its prefix",
        redis::cmd("SET").arg(&other_key).arg("x").query_async::<String>(&mut user_conn).await,
    );
    assert_refused(
        "DEL of a key outside its prefix",
        redis::cmd("DEL").arg(&other_key).query_async::<i64>(&mut user_conn).await,
    );
    assert_refused("KEYS *", redis::cmd("KEYS").arg("*").query_async::<Vec<String>>(&mut user_conn).await);
    assert_refused(
        "ACL LIST",
        redis::cmd("ACL").arg("LIST").query_async::<Vec<String>>(&mut user_conn).await,
    );
    assert_refused(
        "EVAL of an ad-hoc script",
        redis::cmd("EVAL").arg("return 1").arg(0).query_async::<i64>(&mut user_conn).await,
    );
    // A script may run, but what it calls is checked too: no escape through Lua.
    assert_refused(
        "a script reading outside the prefix",
        redis::Script::new("return redis.call('GET', KEYS[1])")
            .key(&other_key)
            .invoke_async::<Option<String>>(&mut user_conn)
            .await,
    );
    let still: Option<String> =
        redis::cmd("GET").arg(&other_key).query_async(&mut admin).await.expect("admin GET");
    assert_eq!(still.as_deref(), Some("s3cret"), "the other key is untouched");
    let _: i64 = redis::cmd("DEL").arg(&other_key).query_async(&mut admin).await.expect("admin DEL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_acl_user_runs_a_worker_and_nothing_more() {
    let env = TestEnv::new("lp-redis").await;
    let (_user, user_url) = redis_user(&env).await;
    let gpu = procs::gpusim(&[]).await;
    let worker =
        procs::worker(&vars_with(&env, &[("FLOTA_REDIS_URL", user_url.clone())]), &gpu.url(), &[]).await;
    let mut tap = env.tap_results().await;
    env.publish_task(&json!({"id": "lp-i", "kind": "interpret", "input": {"message": "Abrí un trabajo para cambiar la bomba del pozo 3"}}))
        .await;
    env.publish_task(&json!({"id": "lp-d", "kind": "deliberate", "input": {"role": "DEV", "task": "Add retries to the export job", "agents": 2}}))
        .await;
    let (results, _) = tap.collect_distinct(2).await;
    for id in ["lp-i", "lp-d"] {
        let r = results.get(id).unwrap_or_else(|| panic!("no result for {id}"));
        assert_eq!(r.status, Status::Succeeded, "{id} under the ACL user: {r:?}");
        let state = env.store.task_state(id).await.expect("admin read").expect("state written by the worker");
        assert_eq!(state.status, "succeeded");
    }

    // The same user through the store: the scheduler's / flotactl's reads work too.
    let user_cfg = config_with(&env, &[("FLOTA_REDIS_URL", user_url.clone())]);
    let user_store = Store::new(store::pool(&user_cfg, 2).expect("pool"), &env.prefix);
    assert_eq!(user_store.workers().await.expect("SCAN + MGET of heartbeats").len(), 1, "one live worker");
    assert_eq!(user_store.parked_count().await.expect("ZCARD"), 0);
    assert!(user_store.put_plan("lp-plan", "{}").await.expect("SETNX"));
    assert_eq!(worker.terminate().await, Some(0), "worker drains and exits 0");

    // ... and nothing more.
    assert_redis_user_confined(&env, &user_url).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_worker_user_runs_a_worker_and_cannot_delete_queues() {
    let env = TestEnv::new("lp-amqp").await;
    let (_user, user_url) = rabbit_user(&worker_permissions(&env.prefix));
    // The worker declares the whole topology itself, as on a fresh broker.
    let admin = delete_topology(&env).await;
    // The scheduler's own queue exists (declared by the test's admin user).
    let mut args = FieldTable::default();
    args.insert(ShortString::from("x-queue-type"), AMQPValue::LongString("quorum".into()));
    admin
        .queue_declare(
            ShortString::from(env.topo.plans_queue()),
            QueueDeclareOptions { durable: true, ..Default::default() },
            args,
        )
        .await
        .expect("declare P.plans");

    let gpu = procs::gpusim(&[]).await;
    let worker =
        procs::worker(&vars_with(&env, &[("FLOTA_AMQP_URL", user_url.clone())]), &gpu.url(), &[]).await;
    let mut tap = env.tap_results().await;
    // A plain success (consume, publish to P.results).
    env.publish_task(
        &json!({"id": "lp-a", "kind": "interpret", "input": {"message": "never mind, cancel it"}}),
    )
    .await;
    // A task whose lock another holder has for a moment: the worker retries it
    // through `P.retry.interpret.*` (published via the default exchange), and
    // the broker dead-letters it back to `P.tasks` after the queue's TTL.
    let mut c = env.store.conn().await.expect("admin redis");
    let _: () = redis::cmd("SET")
        .arg(env.store.keys.task_lock("lp-busy"))
        .arg("someone-else")
        .arg("PX")
        .arg(1500)
        .query_async(&mut c)
        .await
        .expect("hold the task lock");
    env.publish_task(&json!({"id": "lp-busy", "kind": "interpret", "input": {"message": "thanks for your help yesterday"}}))
        .await;
    // A poison message: dead-lettered by the worker through `P.dlx`.
    env.publish_raw(
        "interpret",
        b"{not json",
        amqp::task_properties("lp-poison", &flota_shared::telemetry::TraceParent::new_root().header(), 0),
    )
    .await;
    let (results, _) = tap.collect_distinct(2).await;
    for id in ["lp-a", "lp-busy"] {
        let r = results.get(id).unwrap_or_else(|| panic!("no result for {id} under the restricted user"));
        assert_eq!(r.status, Status::Succeeded, "{id}: {r:?}");
    }
    let metrics =
        reqwest::get(format!("{}/metrics", worker.url())).await.expect("metrics").text().await.expect("text");
    assert!(
        metrics.lines().any(|l| l.starts_with("flota_lock_waits_total ") && !l.ends_with(" 0")),
        "the busy task went through a retry queue:\n{metrics}"
    );
    let dead = env.wait_dead(1).await;
    assert_eq!(dead.len(), 1, "the poison message was dead-lettered");
    assert_eq!(worker.terminate().await, Some(0), "worker drains and exits 0");

    // The worker's user cannot delete the scheduler's queue, nor declare or
    // delete anything outside its prefix.
    let user_cfg = config_with(&env, &[("FLOTA_AMQP_URL", user_url)]);
    let conn = amqp::connect(&user_cfg, "least privilege probe").await.expect("the worker user connects");
    let channel = conn.create_channel().await.expect("channel");
    assert_access_refused(
        "worker",
        "deleting P.plans",
        channel
            .queue_delete(ShortString::from(env.topo.plans_queue()), QueueDeleteOptions::default())
            .await
            .map(|_| ()),
    );
    let channel = conn.create_channel().await.expect("channel");
    let outside = format!("t-lp-outside-{}", &random_secret()[..8]);
    assert_access_refused(
        "worker",
        "declaring a queue outside the prefix",
        channel
            .queue_declare(ShortString::from(outside), QueueDeclareOptions::default(), FieldTable::default())
            .await
            .map(|_| ()),
    );
    let _ = conn.close(200, ShortString::from("done")).await;
    // P.plans survived the attempt.
    let depth = env.queue_depth(&env.topo.plans_queue()).await;
    assert_eq!(depth, 0);
    env.cleanup().await;
}

/// The strictest worker user: no `configure` at all (in RabbitMQ, configure
/// also allows deleting). The topology is declared beforehand (here by the
/// test's admin user, in production by the scheduler or an operator); the
/// worker checks it passively, runs tasks, and can delete nothing, not even
/// its own work queues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_user_without_configure_runs_tasks_and_cannot_delete_its_queues() {
    let env = TestEnv::new("lp-noconf").await; // declares the topology as admin
    let (_user, user_url) = rabbit_user(&worker_without_configure_permissions(&env.prefix));
    let gpu = procs::gpusim(&[]).await;
    let worker =
        procs::worker(&vars_with(&env, &[("FLOTA_AMQP_URL", user_url.clone())]), &gpu.url(), &[]).await;
    let mut tap = env.tap_results().await;
    env.publish_task(&json!({"id": "nc-a", "kind": "interpret", "input": {"message": "Sí, confirmo"}})).await;
    let (results, _) = tap.collect_distinct(1).await;
    assert_eq!(results["nc-a"].status, Status::Succeeded, "{:?}", results["nc-a"]);
    assert_eq!(worker.terminate().await, Some(0), "worker drains and exits 0");

    let user_cfg = config_with(&env, &[("FLOTA_AMQP_URL", user_url)]);
    let conn = amqp::connect(&user_cfg, "least privilege probe").await.expect("the worker user connects");
    for q in [env.topo.work_queue(flota_shared::envelope::Kind::Interpret), env.topo.dead_queue()] {
        let channel = conn.create_channel().await.expect("channel");
        match channel.queue_delete(ShortString::from(q.clone()), QueueDeleteOptions::default()).await {
            Ok(n) => panic!("deleting {q} must be refused to the worker user, got {n:?}"),
            Err(e) => assert!(amqp::is_access_refused(&e), "deleting {q}: not ACCESS_REFUSED: {e}"),
        }
    }
    let _ = conn.close(200, ShortString::from("done")).await;
    env.cleanup().await;
}

/// `GET {api}{path}` as JSON (`Null` when it does not answer).
async fn get_json(api: &str, path: &str) -> Value {
    match reqwest::get(format!("{api}{path}")).await {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

async fn task_status(api: &str, id: &str) -> String {
    get_json(api, &format!("/v1/tasks/{id}")).await["status"].as_str().unwrap_or("").to_string()
}

/// The three roles together, each under its own RabbitMQ user, the worker and
/// the scheduler under the fleet's Redis ACL user: the scheduler creates the
/// topology, a producer submits with `flotactl`, the worker runs, the
/// scheduler records, releases dependents, fails the dependents of a failure,
/// publishes events, dispatches an approved plan and dead-letters an
/// unreadable result. Then each user is refused what its role must not do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_worker_and_scheduler_users_run_the_fleet_together() {
    let env = TestEnv::new("lp-fleet").await;
    let (_producer_user, producer_url) = rabbit_user(&producer_permissions(&env.prefix));
    let (_worker_user, worker_url) = rabbit_user(&worker_permissions(&env.prefix));
    let (_scheduler_user, scheduler_url) = rabbit_user(&scheduler_permissions(&env.prefix));
    let (_redis_user, redis_url) = redis_user(&env).await;
    let token = random_secret();

    // The scheduler creates the whole topology, P.plans included, under its grants.
    let admin = delete_topology(&env).await;
    let scheduler_vars =
        vars_with(&env, &[("FLOTA_AMQP_URL", scheduler_url.clone()), ("FLOTA_REDIS_URL", redis_url.clone())]);
    let scheduler = procs::scheduler(&scheduler_vars, &[("FLOTA_API_TOKEN", &token)]).await;
    let api = scheduler.url();
    let every_queue = env.topo.all_queues();
    eventually("the scheduler declared every queue (seen through its /v1/queues)", || async {
        let listed = get_json(&api, "/v1/queues").await;
        let names: Vec<&str> = listed
            .as_array()
            .map(|a| a.iter().filter_map(|q| q["name"].as_str()).collect())
            .unwrap_or_default();
        every_queue.iter().all(|q| names.contains(&q.as_str()))
    })
    .await;

    // Listen to P.events as the admin (an outside consumer of domain events).
    let events_channel = env.conn.create_channel().await.expect("channel");
    let events_queue = events_channel
        .queue_declare(
            ShortString::from(""),
            QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .expect("events tap");
    events_channel
        .queue_bind(
            events_queue.name().clone(),
            ShortString::from(env.topo.events_exchange()),
            ShortString::from("#"),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind the events tap");
    let mut events = events_channel
        .basic_consume(
            events_queue.name().clone(),
            ShortString::from("lp-events"),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .expect("consume events");

    // A message longer than the simulated context window gets a 400: a deterministic failure.
    let gpu = procs::gpusim(&["--max-context-chars", "3000"]).await;
    let worker_vars =
        vars_with(&env, &[("FLOTA_AMQP_URL", worker_url.clone()), ("FLOTA_REDIS_URL", redis_url.clone())]);
    let worker = procs::worker(&worker_vars, &gpu.url(), &[]).await;

    // The producer submits with flotactl: RabbitMQ only (its Redis URL is
    // deliberately unusable), no configure (the topology is checked passively).
    let dir = std::env::temp_dir().join(format!("flota-{}", env.prefix));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let tasks_file = dir.join("tasks.jsonl");
    let lines = [
        json!({"id": "lpf-child", "kind": "interpret", "input": {"message": "Sí, confirmo"}, "depends_on": ["lpf-root"]}),
        json!({"id": "lpf-i", "kind": "interpret", "input": {"message": "Abrí un trabajo para cambiar la bomba del pozo 3"}}),
        json!({"id": "lpf-d", "kind": "deliberate", "input": {"role": "DEV", "task": "Add retries to the export job", "agents": 2}}),
        json!({"id": "lpf-fail-child", "kind": "interpret", "input": {"message": "thanks for your help"}, "depends_on": ["lpf-fail"]}),
    ];
    let jsonl: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&tasks_file, jsonl).expect("write tasks");
    let submitted = Command::new(procs::binary("flotactl"))
        .arg("submit")
        .arg(&tasks_file)
        .env("FLOTA_PREFIX", &env.prefix)
        .env("FLOTA_AMQP_URL", &producer_url)
        .env("FLOTA_REDIS_URL", "redis://nobody:wrong@127.0.0.1:6379/0")
        .output()
        .expect("flotactl runs");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        submitted.status.success(),
        "flotactl submit under the producer user: {}\n{}{}",
        submitted.status,
        String::from_utf8_lossy(&submitted.stdout),
        String::from_utf8_lossy(&submitted.stderr)
    );
    assert!(String::from_utf8_lossy(&submitted.stdout).contains("published 4, rejected 0"));
    // Any service may publish tasks with the producer's grants too (no Flota code).
    let producer_cfg = config_with(&env, &[("FLOTA_AMQP_URL", producer_url.clone())]);
    let producer = amqp::connect(&producer_cfg, "least privilege producer").await.expect("producer connects");
    let raw = json!({"id": "lpf-raw", "kind": "interpret", "input": {"message": "never mind, cancel it"}});
    Publisher::open(&producer)
        .await
        .expect("producer channel")
        .publish(
            &env.topo.tasks_exchange(),
            "interpret",
            raw.to_string().as_bytes(),
            amqp::task_properties("lpf-raw", &flota_shared::telemetry::TraceParent::new_root().header(), 0),
        )
        .await
        .expect("the producer publishes a task, confirmed");

    for id in ["lpf-i", "lpf-d", "lpf-raw"] {
        eventually(&format!("{id} succeeded"), || async { task_status(&api, id).await == "succeeded" }).await;
    }
    for id in ["lpf-child", "lpf-fail-child"] {
        eventually(&format!("{id} waits for its dependency"), || async {
            task_status(&api, id).await == "waiting"
        })
        .await;
    }

    // Their dependencies through the scheduler's API (it publishes to P.tasks).
    let http = reqwest::Client::new();
    let deps = json!([
        {"id": "lpf-root", "kind": "interpret", "input": {"message": "Abrí un trabajo para medir"}},
        {"id": "lpf-fail", "kind": "interpret", "input": {"message": "revisar la bomba ".repeat(300)}},
    ]);
    let posted = http.post(format!("{api}/v1/tasks")).json(&deps).send().await.expect("POST /v1/tasks");
    assert_eq!(posted.status(), 401, "no token");
    let posted = http
        .post(format!("{api}/v1/tasks"))
        .bearer_auth("wrong")
        .json(&deps)
        .send()
        .await
        .expect("POST /v1/tasks");
    assert_eq!(posted.status(), 403, "wrong token");
    let posted = http
        .post(format!("{api}/v1/tasks"))
        .bearer_auth(&token)
        .json(&deps)
        .send()
        .await
        .expect("POST /v1/tasks");
    assert_eq!(posted.status(), 202, "{:?}", posted.text().await);

    // An approved plan arrives on P.events (from outside); the scheduler consumes P.plans.
    let plan = json!({"plan_id": "lpf-plan", "roles": ["DEV"], "task": "Add SSO to the portal"});
    env.publisher
        .publish(
            &env.topo.events_exchange(),
            "plan.approved",
            plan.to_string().as_bytes(),
            amqp::message_properties("lpf-plan", &flota_shared::telemetry::TraceParent::new_root().header()),
        )
        .await
        .expect("publish plan.approved");
    // Dead letters: an unreadable result (the scheduler's) and a poison task (the worker's).
    env.publisher
        .publish(
            &env.topo.results_exchange(),
            "",
            b"{not a result",
            amqp::message_properties(
                "lpf-bad-result",
                &flota_shared::telemetry::TraceParent::new_root().header(),
            ),
        )
        .await
        .expect("publish an unreadable result");
    env.publish_raw(
        "interpret",
        b"{not json",
        amqp::task_properties("lpf-poison", &flota_shared::telemetry::TraceParent::new_root().header(), 0),
    )
    .await;

    for id in ["lpf-root", "lpf-child", "plan:lpf-plan:DEV"] {
        eventually(&format!("{id} succeeded"), || async { task_status(&api, id).await == "succeeded" }).await;
    }
    for (id, code) in [("lpf-fail", "invalid_request"), ("lpf-fail-child", "dependency_failed")] {
        eventually(&format!("{id} failed with {code}"), || async {
            let t = get_json(&api, &format!("/v1/tasks/{id}")).await;
            t["status"] == "failed" && t["result"]["error"]["code"] == code
        })
        .await;
    }
    eventually("the plan completed", || async {
        get_json(&api, "/v1/plans/lpf-plan").await["status"] == "completed"
    })
    .await;
    let mut seen: Vec<(String, Value)> = Vec::new();
    let wanted = |seen: &[(String, Value)]| {
        seen.iter().any(|(k, v)| k == "task.failed" && v["id"] == "lpf-fail")
            && seen.iter().any(|(k, _)| k == "deliberation.completed")
            && seen.iter().any(|(k, _)| k == "plan.completed")
    };
    while !wanted(&seen) {
        let next = tokio::time::timeout(flota_tests::PATIENCE, events.next()).await;
        let Ok(Some(Ok(d))) = next else {
            panic!("the scheduler's events did not all arrive: {seen:?}");
        };
        seen.push((d.routing_key.to_string(), serde_json::from_slice(&d.data).unwrap_or(Value::Null)));
    }
    let dead = env.wait_dead(2).await;
    let mut bodies: Vec<String> =
        dead.iter().map(|d| String::from_utf8_lossy(&d.body).into_owned()).collect();
    bodies.sort();
    assert_eq!(bodies, ["{not a result", "{not json"], "both dead letters arrived");
    assert!(dead.iter().all(|d| d.reason.as_deref() == Some("invalid_task")), "reasons");

    // /v1/queues (passive declares) shows the consumers of each role.
    let listed = get_json(&api, "/v1/queues").await;
    let consumers = |name: String| {
        listed
            .as_array()
            .and_then(|a| a.iter().find(|q| q["name"] == name.as_str()))
            .and_then(|q| q["consumers"].as_u64())
            .unwrap_or(0)
    };
    for q in [env.topo.work_queue(Kind::Interpret), env.topo.results_queue(), env.topo.plans_queue()] {
        assert!(consumers(q.clone()) >= 1, "{q} has its consumer: {listed}");
    }

    // The producer: publish tasks, and nothing else.
    let who = "producer";
    for q in [env.topo.work_queue(Kind::Interpret), env.topo.results_queue(), env.topo.dead_queue()] {
        let ch = producer.create_channel().await.expect("channel");
        let got = ch.basic_get(ShortString::from(q.clone()), BasicGetOptions::default()).await;
        assert_access_refused(who, &format!("reading {q}"), got.map(|m| m.is_some()));
    }
    for q in [String::new(), format!("{}.sneaky", env.prefix)] {
        let ch = producer.create_channel().await.expect("channel");
        let declared = ch.queue_declare(
            ShortString::from(q.clone()),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        );
        assert_access_refused(who, &format!("declaring queue {q:?}"), declared.await.map(|_| ()));
    }
    let ch = producer.create_channel().await.expect("channel");
    let deleted = ch
        .queue_delete(ShortString::from(env.topo.work_queue(Kind::Interpret)), QueueDeleteOptions::default());
    assert_access_refused(who, "deleting P.interpret", deleted.await);
    let ch = producer.create_channel().await.expect("channel");
    let deleted =
        ch.exchange_delete(ShortString::from(env.topo.tasks_exchange()), ExchangeDeleteOptions::default());
    assert_access_refused(who, "deleting P.tasks", deleted.await);
    assert_publish_refused(who, &producer, &env.topo.results_exchange(), "").await;
    assert_publish_refused(who, &producer, &env.topo.events_exchange(), "plan.approved").await;
    let _ = producer.close(200, ShortString::from("done")).await;

    // The scheduler: nothing outside its prefix, no dead letters (an operator's), no default exchange.
    let who = "scheduler";
    let sched_cfg = config_with(&env, &[("FLOTA_AMQP_URL", scheduler_url)]);
    let sched =
        amqp::connect(&sched_cfg, "least privilege scheduler").await.expect("scheduler user connects");
    let other = format!("t-lp-other-{}.interpret", &random_secret()[..8]);
    let mut expires = FieldTable::default();
    expires.insert(ShortString::from("x-expires"), AMQPValue::LongInt(120_000));
    admin
        .queue_declare(ShortString::from(other.clone()), QueueDeclareOptions::default(), expires)
        .await
        .expect("admin declares another prefix's queue");
    let ch = sched.create_channel().await.expect("channel");
    let deleted = ch.queue_delete(ShortString::from(other.clone()), QueueDeleteOptions::default());
    assert_access_refused(who, "deleting another prefix's queue", deleted.await);
    let ch = sched.create_channel().await.expect("channel");
    let outside = format!("t-lp-outside-{}", &random_secret()[..8]);
    let declared =
        ch.queue_declare(ShortString::from(outside), QueueDeclareOptions::default(), FieldTable::default());
    assert_access_refused(who, "declaring a queue outside the prefix", declared.await.map(|_| ()));
    let ch = sched.create_channel().await.expect("channel");
    let got = ch.basic_get(ShortString::from(env.topo.dead_queue()), BasicGetOptions::default()).await;
    assert_access_refused(who, "reading P.dead", got.map(|m| m.is_some()));
    assert_publish_refused(who, &sched, "", &env.topo.work_queue(Kind::Interpret)).await;
    let _ = sched.close(200, ShortString::from("done")).await;
    let other_left = admin.queue_declare(
        ShortString::from(other.clone()),
        QueueDeclareOptions { passive: true, ..Default::default() },
        FieldTable::default(),
    );
    assert!(other_left.await.is_ok(), "the other prefix's queue survived");
    admin.queue_delete(ShortString::from(other), QueueDeleteOptions::default()).await.expect("admin delete");

    // The worker: no events, no plans, no dead letters to read, no scheduler queue to delete.
    let who = "worker";
    let worker_cfg = config_with(&env, &[("FLOTA_AMQP_URL", worker_url)]);
    let wconn = amqp::connect(&worker_cfg, "least privilege worker").await.expect("worker user connects");
    assert_publish_refused(who, &wconn, &env.topo.events_exchange(), "plan.approved").await;
    for q in [env.topo.plans_queue(), env.topo.dead_queue()] {
        let ch = wconn.create_channel().await.expect("channel");
        let got = ch.basic_get(ShortString::from(q.clone()), BasicGetOptions::default()).await;
        assert_access_refused(who, &format!("reading {q}"), got.map(|m| m.is_some()));
    }
    let ch = wconn.create_channel().await.expect("channel");
    let deleted = ch.queue_delete(ShortString::from(env.topo.plans_queue()), QueueDeleteOptions::default());
    assert_access_refused(who, "deleting P.plans", deleted.await);
    let _ = wconn.close(200, ShortString::from("done")).await;

    // The fleet's Redis user: its prefix's keys and Flota's commands only.
    assert_redis_user_confined(&env, &redis_url).await;

    assert_eq!(worker.terminate().await, Some(0), "worker drains and exits 0");
    assert_eq!(scheduler.terminate().await, Some(0), "scheduler exits 0");
    env.cleanup().await;
}

/// The grants are written once, in the helper functions above; the
/// documentation must show exactly those, so it cannot drift from what the
/// tests run under.
#[test]
fn the_documented_grants_are_the_tested_ones() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(root.join("docs/least-privilege.md")).expect("docs/least-privilege.md");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let cell = |re: &str| format!("`{}`", re.replace('|', "\\|"));

    let acl = format!("ACL SETUSER flota-P {}", acl_rules("P", "PASSWORD").join(" "));
    assert!(
        doc.contains(&format!("\n{acl}\n")),
        "docs/least-privilege.md must give the tested ACL line:\n{acl}"
    );

    let roles = [
        ("producer", "flota-producer-P", producer_permissions("P")),
        ("worker", "flota-worker-P", worker_permissions("P")),
        ("worker without configure", "flota-worker-P", worker_without_configure_permissions("P")),
        ("scheduler", "flota-scheduler-P", scheduler_permissions("P")),
    ];
    let mut commands = Vec::new();
    let mut regexes = Vec::new();
    for (role, user, perms) in &roles {
        let [c, w, r] = perms;
        let command = format!("rabbitmqctl set_permissions -p / {user} '{c}' '{w}' '{r}'");
        assert!(doc.contains(&format!("\n{command}\n")), "the doc must give the {role} command:\n{command}");
        commands.push(command);
        let row = format!("| {role} | {} | {} | {} |", cell(c), cell(w), cell(r));
        assert!(doc.contains(&row), "the doc's table must have the {role} row:\n{row}");
        assert!(readme.contains(&row), "the README's table must have the {role} row:\n{row}");
        regexes.extend(perms.iter().cloned());
    }
    // Nothing else: no other grant anywhere in either file.
    for line in doc.lines().filter(|l| l.contains("set_permissions")) {
        assert!(commands.iter().any(|c| c == line), "an untested grant in the doc: {line}");
    }
    for (name, text) in [("docs/least-privilege.md", &doc), ("README.md", &readme)] {
        for span in text.split('`').skip(1).step_by(2) {
            let span = span.replace("\\|", "|");
            if span.starts_with('^') && span.ends_with('$') {
                assert!(regexes.contains(&span), "{name} shows an untested permission regex: {span}");
            }
        }
    }
}
