//! Least privilege (issue #8, item 2): a worker runs end to end under a Redis
//! ACL user limited to its prefix's keys and the commands Flota uses, and
//! under a RabbitMQ user whose permissions are limited to its prefix's
//! topology; each user is then shown refused outside that. The exact ACL line
//! and permission regexes are the ones in `docs/least-privilege.md`.

use std::collections::HashMap;
use std::process::Command;

use flota_shared::amqp;
use flota_shared::config::Config;
use flota_shared::envelope::Status;
use flota_shared::store::{self, Store, redis};
use flota_tests::{TestEnv, procs};
use lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde_json::json;

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

/// Deletes the Redis ACL user when dropped, also when the test panics.
struct RedisUser {
    admin_url: String,
    name: String,
}

impl Drop for RedisUser {
    fn drop(&mut self) {
        let deleted = redis::Client::open(self.admin_url.as_str())
            .and_then(|c| c.get_connection())
            .and_then(|mut c| redis::cmd("ACL").arg("DELUSER").arg(&self.name).query::<i64>(&mut c));
        if let Err(e) = deleted {
            eprintln!("could not delete Redis ACL user {}: {e}", self.name);
        }
    }
}

/// Deletes the RabbitMQ user when dropped, also when the test panics.
struct RabbitUser {
    name: String,
}

impl Drop for RabbitUser {
    fn drop(&mut self) {
        if let Err(e) = rabbitmqctl(&["delete_user", &self.name]) {
            eprintln!("could not delete RabbitMQ user {}: {e}", self.name);
        }
    }
}

/// Run `rabbitmqctl`, failing clearly when it is missing or refuses.
fn rabbitmqctl(args: &[&str]) -> Result<(), String> {
    let out = Command::new("rabbitmqctl").args(args).output().map_err(|e| {
        format!("`rabbitmqctl` is required for this test (RabbitMQ user management) and cannot run: {e}")
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "rabbitmqctl {} failed ({}): {}{}",
            args.first().copied().unwrap_or(""),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_acl_user_runs_a_worker_and_nothing_more() {
    let env = TestEnv::new("lp-redis").await;
    let name = format!("flota-t-{}", &random_secret()[..10]);
    let password = random_secret();
    let admin = redis::Client::open(env.config.redis_url.as_str()).expect("admin client");
    let mut admin_conn = admin.get_multiplexed_async_connection().await.expect("admin connection");
    let _user = RedisUser { admin_url: env.config.redis_url.clone(), name: name.clone() };
    let mut setuser = redis::cmd("ACL");
    setuser.arg("SETUSER").arg(&name).arg(acl_rules(&env.prefix, &password));
    let _: () =
        setuser.query_async(&mut admin_conn).await.expect("ACL SETUSER (the shared Redis must allow ACL)");

    let user_url = format!("redis://{name}:{password}@127.0.0.1:6379/0");
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
    let other_key = format!("{{t-lp-other-{}}}:secret", &random_secret()[..8]);
    let _: () = redis::cmd("SET")
        .arg(&other_key)
        .arg("s3cret")
        .query_async(&mut admin_conn)
        .await
        .expect("admin SET");
    let mut user_conn = redis::Client::open(user_url.as_str())
        .expect("user client")
        .get_multiplexed_async_connection()
        .await
        .expect("the ACL user authenticates");
    assert_refused("FLUSHALL", redis::cmd("FLUSHALL").query_async::<String>(&mut user_conn).await);
    assert_refused(
        "CONFIG GET *",
        redis::cmd("CONFIG").arg("GET").arg("*").query_async::<Vec<String>>(&mut user_conn).await,
    );
    assert_refused(
        "GET of a key outside its prefix",
        redis::cmd("GET").arg(&other_key).query_async::<Option<String>>(&mut user_conn).await,
    );
    assert_refused(
        "SET of a key outside its prefix",
        redis::cmd("SET").arg(&other_key).arg("x").query_async::<String>(&mut user_conn).await,
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
        redis::cmd("GET").arg(&other_key).query_async(&mut admin_conn).await.expect("admin GET");
    assert_eq!(still.as_deref(), Some("s3cret"), "the other key is untouched");
    let _: i64 = redis::cmd("DEL").arg(&other_key).query_async(&mut admin_conn).await.expect("admin DEL");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_worker_user_runs_a_worker_and_cannot_delete_queues() {
    let env = TestEnv::new("lp-amqp").await;
    let name = format!("flota-t-{}", &random_secret()[..10]);
    let password = random_secret();
    rabbitmqctl(&["add_user", &name, &password]).unwrap_or_else(|e| panic!("{e}"));
    let _user = RabbitUser { name: name.clone() };
    let [configure, write, read] = worker_permissions(&env.prefix);
    rabbitmqctl(&["set_permissions", "-p", "/", &name, &configure, &write, &read])
        .unwrap_or_else(|e| panic!("{e}"));
    // The worker declares the whole topology itself, as on a fresh broker:
    // RabbitMQ checks the dead-letter and alternate exchanges of a declare only
    // when it creates the queue or exchange, so a pre-declared topology would
    // hide missing permissions.
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

    let user_url = format!("amqp://{name}:{password}@127.0.0.1:5672/%2f");
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
    let refused = |what: &str, res: Result<_, lapin::Error>| match res {
        Ok(v) => panic!("{what} must be refused to the worker user, got {v:?}"),
        Err(e) => {
            let msg = format!("{e} {e:?}");
            assert!(
                msg.contains("ACCESS_REFUSED") || msg.contains("ACCESS-REFUSED"),
                "{what}: not ACCESS_REFUSED: {msg}"
            );
        }
    };
    let channel = conn.create_channel().await.expect("channel");
    refused(
        "deleting P.plans",
        channel
            .queue_delete(ShortString::from(env.topo.plans_queue()), QueueDeleteOptions::default())
            .await
            .map(|_| ()),
    );
    let channel = conn.create_channel().await.expect("channel");
    let outside = format!("t-lp-outside-{}", &random_secret()[..8]);
    refused(
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
    let name = format!("flota-t-{}", &random_secret()[..10]);
    let password = random_secret();
    rabbitmqctl(&["add_user", &name, &password]).unwrap_or_else(|e| panic!("{e}"));
    let _user = RabbitUser { name: name.clone() };
    let [_, write, read] = worker_permissions(&env.prefix);
    rabbitmqctl(&["set_permissions", "-p", "/", &name, "^$", &write, &read])
        .unwrap_or_else(|e| panic!("{e}"));

    let user_url = format!("amqp://{name}:{password}@127.0.0.1:5672/%2f");
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
