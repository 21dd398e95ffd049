//! The scheduler run in-process on port 0 against the real RabbitMQ and Redis,
//! on a random prefix that is deleted at the end.

#![allow(dead_code, unreachable_pub)] // Each test file uses a different part of this.

use std::collections::HashMap;
use std::time::Duration;

use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use tokio_util::sync::CancellationToken;

use flota_scheduler::state::AppState;
use flota_scheduler::{fleet, server};
use flota_shared::amqp::{self, Publisher, Topology};
use flota_shared::config::Config;
use flota_shared::store::{self, Store};

/// How long "eventually" may take on a noisy machine (never a performance claim).
pub const PATIENCE: Duration = Duration::from_secs(120);

pub struct Harness {
    pub config: Config,
    pub topo: Topology,
    pub store: Store,
    pub url: String,
    pub http: reqwest::Client,
    /// The test's own connection, for looking at queues and publishing.
    pub conn: lapin::Connection,
    pub publisher: Publisher,
    shutdown: CancellationToken,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Harness {
    /// A scheduler on a fresh prefix, with the API token when given.
    pub async fn start(name: &str, token: Option<&str>) -> Harness {
        let prefix = format!("t-sched-{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let mut vars = HashMap::from([
            ("FLOTA_PREFIX".to_string(), prefix.clone()),
            ("FLOTA_SHUTDOWN_GRACE".to_string(), "5".to_string()),
        ]);
        if let Some(t) = token {
            vars.insert("FLOTA_API_TOKEN".into(), t.into());
        }
        let config = Config::from_lookup(|k| vars.get(k).cloned().or_else(|| std::env::var(k).ok()))
            .expect("test configuration");
        let conn = amqp::connect(&config, &format!("test {prefix}")).await.expect("RabbitMQ reachable");
        let topo = Topology::new(&prefix);
        amqp::declare_topology(&conn, &topo, config.delivery_limit).await.expect("topology");
        let publisher = Publisher::open(&conn).await.expect("publisher channel");
        let store = Store::new(store::pool(&config, 4).expect("redis pool"), &prefix);

        let state = AppState::new(config.clone(), Store::new(store::pool(&config, 16).unwrap(), &prefix));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(server::run(state, listener, shutdown.clone()));
        let h = Harness {
            config,
            topo,
            store,
            url,
            // No keep-alive: the server may close a connection after refusing an
            // oversized body, and a pooled client would reuse it (broken pipe).
            http: reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("http client"),
            conn,
            publisher,
            shutdown,
            server: Some(server),
        };
        // Ready = the publishing side connected and Redis answering.
        h.eventually("the scheduler to be ready", || async {
            h.http.get(format!("{}/readyz", h.url)).send().await.is_ok_and(|r| r.status() == 200)
        })
        .await;
        h
    }

    /// Wait until `check` holds, or fail the test after [`PATIENCE`].
    pub async fn eventually<F, Fut>(&self, what: &str, check: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !check().await {
            assert!(tokio::time::Instant::now() < deadline, "gave up waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Messages ready in a queue (passive declare on a throwaway channel).
    pub async fn depth(&self, queue: &str) -> u32 {
        let ch = self.conn.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                ShortString::from(queue.to_string()),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .expect("queue exists");
        let _ = ch.close(200, ShortString::from("done")).await;
        q.message_count()
    }

    /// Take one message from a queue (acked), if any.
    pub async fn get(&self, queue: &str) -> Option<lapin::message::Delivery> {
        let ch = self.conn.create_channel().await.expect("channel");
        let msg = ch
            .basic_get(ShortString::from(queue.to_string()), BasicGetOptions { no_ack: true })
            .await
            .expect("basic_get");
        let _ = ch.close(200, ShortString::from("done")).await;
        msg.map(|m| m.delivery)
    }

    pub async fn post(&self, path: &str, body: &serde_json::Value, auth: Option<&str>) -> reqwest::Response {
        let mut r = self.http.post(format!("{}{path}", self.url)).json(body);
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send().await.expect("request")
    }

    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let r = self.http.get(format!("{}{path}", self.url)).send().await.expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// A sample's value in `/metrics` (0 when absent).
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self.http.get(format!("{}/metrics", self.url)).send().await.unwrap().text().await.unwrap();
        text.lines()
            .find(|l| l.starts_with(sample) && l[sample.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Stop the scheduler; it must drain and return cleanly. Its queues stay.
    pub async fn stop_scheduler(&mut self) {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            let served = server.await.expect("server task");
            served.expect("scheduler ran and drained without error");
        }
    }

    /// Stop the scheduler (see [`Harness::stop_scheduler`]) and delete the prefix.
    pub async fn stop(mut self) {
        self.stop_scheduler().await;
        let _ = self.conn.close(200, ShortString::from("done")).await;
        fleet::cleanup_prefix(&self.config).await.expect("cleanup");
    }
}
