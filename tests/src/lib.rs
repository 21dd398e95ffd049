//! Support for Flota's end-to-end tests: every test gets its own
//! `FLOTA_PREFIX` on the real RabbitMQ and Redis, starts real binaries, and
//! cleans up after itself, so tests run in parallel and reruns start clean.
//!
//! # Layout
//! - [`TestEnv`]: a prefix, its config, AMQP/Redis access, publishing raw
//!   messages, tapping results and dead letters, cleanup.
//! - [`procs`]: starting the workspace's binaries as child processes.
//! - [`private_rabbitmq`]: a throwaway RabbitMQ node a test may crash and restart.
//! - [`private_redis`]: a throwaway `redis-server` a test may kill and restart.
//! - [`tls`]: a throwaway CA (openssl), a TLS-only private Redis, a TLS listener added to
//!   the shared RabbitMQ at run time (both optionally requiring client certificates).
//! - [`proxy`]: a TCP fault proxy (cut, black-hole, delay) in front of RabbitMQ or Redis.

pub mod private_rabbitmq;
pub mod private_redis;
pub mod procs;
pub mod proxy;
pub mod tls;
pub mod users;

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};

use flota_shared::amqp::{self, Publisher, Topology};
use flota_shared::config::Config;
use flota_shared::envelope::ResultEnvelope;
use flota_shared::store::{self, Store};

/// Upper bound for "eventually" in tests: generous, never a performance claim.
pub const PATIENCE: Duration = Duration::from_secs(180);

pub struct TestEnv {
    pub prefix: String,
    pub config: Config,
    pub topo: Topology,
    pub conn: Connection,
    pub publisher: Publisher,
    pub store: Store,
}

impl TestEnv {
    /// A fresh prefix with the topology declared.
    pub async fn new(name: &str) -> TestEnv {
        TestEnv::with_vars(name, &[]).await
    }

    /// Like [`TestEnv::new`], with configuration variables overridden (say,
    /// `FLOTA_REDIS_URL` of a private Redis). Children get the prefix and the
    /// AMQP and Redis URLs through [`TestEnv::env`]; pass any other override to
    /// them yourself (say, `FLOTA_DELIVERY_LIMIT`).
    pub async fn with_vars(name: &str, overrides: &[(&str, &str)]) -> TestEnv {
        let prefix = format!("t-{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let mut vars = HashMap::from([("FLOTA_PREFIX".to_string(), prefix.clone())]);
        vars.extend(overrides.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let config = Config::from_lookup(|k| vars.get(k).cloned().or_else(|| std::env::var(k).ok()))
            .expect("test configuration");
        let conn = amqp::connect(&config, &format!("test {prefix}")).await.expect("RabbitMQ reachable");
        let topo = Topology::new(&prefix);
        amqp::declare_topology(&conn, &topo, config.delivery_limit).await.expect("declare topology");
        let publisher = Publisher::open(&conn).await.expect("publisher channel");
        let store = Store::new(store::pool(&config, 8).expect("redis pool"), &prefix);
        TestEnv { prefix, config, topo, conn, publisher, store }
    }

    /// Environment variables that point a child process at this prefix.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("FLOTA_PREFIX".into(), self.prefix.clone()),
            ("FLOTA_AMQP_URL".into(), self.config.amqp_url.clone()),
            ("FLOTA_REDIS_URL".into(), self.config.redis_url.clone()),
        ]
    }

    /// Publish a raw body to `P.tasks` with a routing key, confirmed.
    pub async fn publish_raw(&self, routing_key: &str, body: &[u8], props: BasicProperties) {
        self.publisher
            .publish(&self.topo.tasks_exchange(), routing_key, body, props)
            .await
            .expect("publish confirmed");
    }

    /// Publish a task envelope given as JSON, with the contract's properties.
    pub async fn publish_task(&self, task: &serde_json::Value) {
        let id = task["id"].as_str().unwrap_or("no-id");
        let kind = task["kind"].as_str().unwrap_or("interpret");
        let tp = flota_shared::telemetry::TraceParent::new_root().header();
        self.publish_raw(kind, &serde_json::to_vec(task).expect("json"), amqp::task_properties(id, &tp, 0))
            .await;
    }

    /// A queue bound to `P.results` that sees every result from now on.
    pub async fn tap_results(&self) -> ResultTap {
        let channel = self.conn.create_channel().await.expect("channel");
        let name = format!("{}.test-tap.{}", self.prefix, &uuid::Uuid::new_v4().simple().to_string()[..6]);
        channel
            .queue_declare(
                ShortString::from(name.clone()),
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .expect("tap queue");
        channel
            .queue_bind(
                ShortString::from(name.clone()),
                ShortString::from(self.topo.results_exchange()),
                ShortString::from(""),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind tap");
        let consumer = channel
            .basic_consume(
                ShortString::from(name),
                ShortString::from("tap"),
                BasicConsumeOptions { no_ack: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .expect("consume tap");
        ResultTap { _channel: channel, consumer }
    }

    /// `PTTL` of a Redis key: -1 when it never expires, -2 when it is gone.
    pub async fn pttl(&self, key: &str) -> i64 {
        let mut c = self.store.conn().await.expect("redis");
        redis::cmd("PTTL").arg(key).query_async(&mut c).await.expect("PTTL")
    }

    /// A queue's depth and consumers now, by passive declare (an error while it does not exist).
    async fn passive_declare(&self, queue: &str) -> lapin::Result<lapin::Queue> {
        let channel = self.conn.create_channel().await.expect("channel");
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        let q =
            channel.queue_declare(ShortString::from(queue.to_string()), passive, FieldTable::default()).await;
        // A missing queue closes the channel; otherwise close it here.
        let _ = channel.close(200, ShortString::from("done")).await;
        q
    }

    /// Messages currently in a queue (which must exist).
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        self.passive_declare(queue).await.expect("passive declare").message_count()
    }

    /// Take every message from `P.dead` (acked: the test owns them).
    pub async fn drain_dead(&self) -> Vec<DeadLetter> {
        let channel = self.conn.create_channel().await.expect("channel");
        let mut out = Vec::new();
        while let Some(msg) = channel
            .basic_get(ShortString::from(self.topo.dead_queue()), BasicGetOptions::default())
            .await
            .expect("basic_get")
        {
            let props = &msg.delivery.properties;
            out.push(DeadLetter {
                reason: amqp::header_str(props, amqp::HEADER_REASON),
                error: amqp::header_str(props, amqp::HEADER_ERROR),
                body: msg.delivery.data.clone(),
                properties: props.clone(),
            });
            msg.delivery.acker.ack(BasicAckOptions::default()).await.expect("ack");
        }
        out
    }

    /// Wait until `P.dead` holds at least `n` messages, then take them all.
    pub async fn wait_dead(&self, n: usize) -> Vec<DeadLetter> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut got = Vec::new();
        while got.len() < n && tokio::time::Instant::now() < deadline {
            got.extend(self.drain_dead().await);
            if got.len() < n {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        got
    }

    /// Stop this prefix's workers and schedulers, then delete its queues,
    /// exchanges and Redis keys.
    pub async fn cleanup(self) {
        procs::kill_for_prefix(&self.prefix);
        if let Ok(channel) = self.conn.create_channel().await {
            for q in self.topo.all_queues() {
                let _ = channel.queue_delete(ShortString::from(q), QueueDeleteOptions::default()).await;
            }
            for e in self.topo.all_exchanges() {
                let _ = channel.exchange_delete(ShortString::from(e), ExchangeDeleteOptions::default()).await;
            }
        }
        let _ = self.store.delete_all().await;
        let _ = self.conn.close(200, ShortString::from("test done")).await;
    }
}

/// Poll until `probe` holds, bounded by PATIENCE (never a speed claim).
pub async fn eventually<F, Fut>(what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !probe().await {
        assert!(tokio::time::Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One sample of a Prometheus scrape, by its full series name (0 when absent).
pub fn metric_sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// How many results a scheduler has recorded (once per task id), from its
/// `/metrics`; `None` while it does not answer.
pub async fn recorded_total(scheduler_url: &str) -> Option<u64> {
    let scrape = reqwest::get(format!("{scheduler_url}/metrics")).await.ok()?.text().await.ok()?;
    let total: f64 = scrape
        .lines()
        .filter(|l| l.starts_with("flota_results_recorded_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    Some(total as u64)
}

/// A consumer of `queue` on `channel`, named `tag`; acks are the caller's.
pub async fn consume(channel: &Channel, queue: &str, tag: &str) -> lapin::Consumer {
    channel
        .basic_consume(
            ShortString::from(queue),
            ShortString::from(tag),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume")
}

/// `flotactl ARGS` against this prefix's fleet (its environment, no stdin):
/// exit code, stdout, stderr. Bounded by PATIENCE.
pub async fn flotactl(env: &TestEnv, args: &[&str]) -> (Option<i32>, String, String) {
    let run = tokio::process::Command::new(procs::binary("flotactl"))
        .args(args)
        .envs(env.env())
        .stdin(std::process::Stdio::null())
        .output();
    let out = tokio::time::timeout(PATIENCE, run).await.expect("flotactl finishes").expect("flotactl built");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

/// `flotactl dlq list` of this prefix as sorted (id, reason) pairs.
pub async fn dlq_reasons(env: &TestEnv) -> Vec<(String, String)> {
    let (code, out, err) = flotactl(env, &["dlq", "list", "--json"]).await;
    assert_eq!(code, Some(0), "dlq list: {out} {err}");
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("dlq list JSON ({e}): {out}"));
    let field = |d: &serde_json::Value, k: &str| d[k].as_str().unwrap_or("-").to_string();
    let mut seen: Vec<(String, String)> = list.iter().map(|d| (field(d, "id"), field(d, "reason"))).collect();
    seen.sort();
    seen
}

/// Wait until a scheduler has recorded at least `at_least` results, failing
/// the test the moment it records more than `at_most` (bounded by PATIENCE).
pub async fn wait_recorded(scheduler_url: &str, at_least: u64, at_most: u64) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let n = recorded_total(scheduler_url).await.unwrap_or(0);
        assert!(n <= at_most, "recorded more than once: {n} > {at_most}");
        if n >= at_least {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the scheduler recorded {n} of {at_least}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Drop for TestEnv {
    /// A failed assertion unwinds past `cleanup`; delete the prefix anyway so a
    /// red test does not leave queues and keys behind on a shared broker.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        procs::kill_for_prefix(&self.prefix);
        let config = self.config.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(flota_scheduler::fleet::cleanup_prefix(&config)).ok()
        })
        .join();
    }
}

pub struct DeadLetter {
    pub reason: Option<String>,
    pub error: Option<String>,
    pub body: Vec<u8>,
    /// Every property and header as it arrived (`x-flota-attempt`, `x-death`, ...).
    pub properties: BasicProperties,
}

pub struct ResultTap {
    _channel: Channel,
    consumer: lapin::Consumer,
}

impl ResultTap {
    /// The next result, or `None` after `PATIENCE`.
    pub async fn next(&mut self) -> Option<ResultEnvelope> {
        loop {
            let delivery = tokio::time::timeout(PATIENCE, self.consumer.next()).await.ok()??.ok()?;
            if let Ok(r) = serde_json::from_slice::<ResultEnvelope>(&delivery.data) {
                return Some(r);
            }
        }
    }

    /// Results until `n` distinct ids were seen (duplicates are counted, not kept twice).
    pub async fn collect_distinct(&mut self, n: usize) -> (HashMap<String, ResultEnvelope>, usize) {
        let mut seen = HashMap::new();
        let mut duplicates = 0;
        while seen.len() < n {
            let Some(r) = self.next().await else { break };
            if seen.insert(r.id.clone(), r).is_some() {
                duplicates += 1;
            }
        }
        (seen, duplicates)
    }
}
