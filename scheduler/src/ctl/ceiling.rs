//! The physical ceiling beside which Flota is measured: a minimal lapin loop
//! over the same broker and GPU server (publish → consume → HTTP call →
//! publish result with confirm → ack), with none of Flota's guarantees.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde_json::json;

use flota_shared::config::Config;

pub struct CeilingRun {
    pub tasks: u64,
    pub elapsed: Duration,
    pub cpu_seconds: f64,
    /// Voluntary, of every thread of this process (flotactl's own idle ones too: a few).
    pub context_switches: u64,
}

impl CeilingRun {
    pub fn tasks_per_s(&self) -> f64 {
        self.tasks as f64 / self.elapsed.as_secs_f64()
    }
    pub fn cpu_s_per_1000(&self) -> f64 {
        self.cpu_seconds / self.tasks as f64 * 1000.0
    }
    pub fn switches_per_task(&self) -> f64 {
        self.context_switches as f64 / self.tasks as f64
    }
}

fn quorum() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(ShortString::from("x-queue-type"), AMQPValue::LongString("quorum".into()));
    t
}

/// Run the loop on a single-threaded runtime of its own, as the worker runs:
/// the ceiling must be the cheapest loop, or the ratios flatter Flota (a
/// multi-threaded runtime spends more CPU per task on thread wake-ups).
pub async fn run_single_threaded(
    config: &Config,
    gpu_url: &str,
    n: u64,
    concurrency: u16,
) -> anyhow::Result<CeilingRun> {
    let (config, gpu_url) = (config.clone(), gpu_url.to_string());
    tokio::task::spawn_blocking(move || {
        crate::server::single_threaded_runtime()?.block_on(run(&config, &gpu_url, n, concurrency))
    })
    .await?
}

pub async fn run(config: &Config, gpu_url: &str, n: u64, concurrency: u16) -> anyhow::Result<CeilingRun> {
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let work = format!("{}.ceiling.{tag}.work", config.prefix);
    let results = format!("{}.ceiling.{tag}.results", config.prefix);
    let consume_conn = flota_shared::amqp::connect(config, "ceiling consume").await?;
    let publish_conn = flota_shared::amqp::connect(config, "ceiling publish").await?;
    let pub_ch = publish_conn.create_channel().await?;
    pub_ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    for q in [&work, &results] {
        pub_ch.queue_declare(ShortString::from(q.as_str()), durable, quorum()).await?;
    }
    let http = reqwest::Client::builder().pool_max_idle_per_host(1024).build()?;
    let body = json!({
        "model": serde_json::Value::Null,
        "messages": [{"role": "user", "content": "Abrí un trabajo para cambiar la bomba del pozo 3"}],
        "max_tokens": 200,
        "response_format": {"type": "json_schema", "json_schema": {"name": "interpretation", "schema": {"type": "object"}}}
    });
    let body = Arc::new(serde_json::to_vec(&body)?);
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"));

    // Worker side: consume work, call the GPU, publish the result with confirm, ack.
    let work_ch = consume_conn.create_channel().await?;
    work_ch.basic_qos(concurrency, BasicQosOptions::default()).await?;
    let mut work_consumer = work_ch
        .basic_consume(
            ShortString::from(work.as_str()),
            ShortString::from("ceiling"),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let worker_pub = pub_ch.clone();
    let url = format!("{gpu_url}/v1/chat/completions");
    let worker = tokio::spawn({
        let (results, props, body) = (results.clone(), props.clone(), body.clone());
        async move {
            let mut inflight = FuturesUnordered::new();
            loop {
                tokio::select! {
                    Some(d) = work_consumer.next() => {
                        let Ok(d) = d else { break };
                        let (http, url, ch, results, props, body) = (http.clone(), url.clone(), worker_pub.clone(), results.clone(), props.clone(), body.clone());
                        inflight.push(async move {
                            let out = match http.post(&url).header("content-type", "application/json").body(body.to_vec()).send().await {
                                Ok(r) => r.bytes().await.map(|b| b.to_vec()).unwrap_or_default(),
                                Err(_) => Vec::new(),
                            };
                            if let Ok(c) = ch.basic_publish(ShortString::from(""), ShortString::from(results.as_str()), BasicPublishOptions::default(), &out, props).await
                                && c.await.is_ok()
                            {
                                let _ = d.acker.ack(BasicAckOptions::default()).await;
                            }
                        });
                    }
                    Some(()) = inflight.next(), if !inflight.is_empty() => {}
                    else => break,
                }
            }
        }
    });

    // Result side: count results.
    let res_ch = consume_conn.create_channel().await?;
    res_ch.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut res_consumer = res_ch
        .basic_consume(
            ShortString::from(results.as_str()),
            ShortString::from("ceiling-results"),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;

    let cpu_before = crate::ctl::bench::cpu_seconds(None);
    let switches_before = crate::ctl::bench::context_switches(None);
    let started = Instant::now();
    // Producer: publish N with a window of outstanding confirms.
    let producer = {
        let (ch, work, props) = (pub_ch.clone(), work.clone(), props.clone());
        tokio::spawn(async move {
            let mut window = FuturesUnordered::new();
            for i in 0..n {
                let payload = format!("{{\"id\":\"ceiling-{i}\"}}");
                if let Ok(c) = ch
                    .basic_publish(
                        ShortString::from(""),
                        ShortString::from(work.as_str()),
                        BasicPublishOptions::default(),
                        payload.as_bytes(),
                        props.clone(),
                    )
                    .await
                {
                    window.push(c);
                }
                while window.len() >= 512 {
                    let _ = window.next().await;
                }
            }
            while window.next().await.is_some() {}
        })
    };
    let done = AtomicU64::new(0);
    while done.load(Ordering::Relaxed) < n {
        match tokio::time::timeout(Duration::from_secs(120), res_consumer.next()).await {
            Ok(Some(Ok(_))) => {
                done.fetch_add(1, Ordering::Relaxed);
            }
            _ => anyhow::bail!("ceiling loop stalled after {} of {n} results", done.load(Ordering::Relaxed)),
        }
    }
    let elapsed = started.elapsed();
    let cpu_seconds = crate::ctl::bench::cpu_seconds(None) - cpu_before;
    let context_switches = crate::ctl::bench::context_switches(None).saturating_sub(switches_before);
    let _ = producer.await;
    worker.abort();
    // Consumers go first, so deleting the queues cancels nobody.
    let _ = consume_conn.close(200, ShortString::from("done")).await;
    for q in [&work, &results] {
        let _ = pub_ch.queue_delete(ShortString::from(q.as_str()), QueueDeleteOptions::default()).await;
    }
    let _ = publish_conn.close(200, ShortString::from("done")).await;
    Ok(CeilingRun { tasks: n, elapsed, cpu_seconds, context_switches })
}
