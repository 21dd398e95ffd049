//! `flotactl status`, `queues`, `workers`: read straight from Redis and
//! RabbitMQ, so they work without the scheduler.

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::{FieldTable, ShortString};
use serde_json::{Value, json};

use flota_shared::amqp::{self, Topology};
use flota_shared::config::Config;
use flota_shared::store::Store;

pub async fn status(store: &Store, id: &str, wait: bool, timeout: Duration) -> anyhow::Result<(Value, bool)> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let state = store.task_state(id).await?;
        let finished = state.as_ref().is_some_and(|s| s.status == "succeeded" || s.status == "failed");
        if !wait || finished || tokio::time::Instant::now() >= deadline {
            let body = match state {
                None => json!({"id": id, "status": "unknown"}),
                Some(s) => {
                    let mut b = json!({"id": id, "status": s.status});
                    if let Some(r) = s.result.and_then(|r| serde_json::from_str::<Value>(&r).ok()) {
                        b["result"] = r;
                    }
                    b
                }
            };
            return Ok((body, finished));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `(name, messages, consumers)` of every queue under the prefix, by passive declare.
pub async fn queues(config: &Config) -> anyhow::Result<Vec<(String, u32, u32)>> {
    let topo = Topology::new(&config.prefix);
    let conn = amqp::connect(config, "flotactl queues").await?;
    let mut out = Vec::new();
    for q in topo.all_queues() {
        // A passive declare of a missing queue closes its channel: one channel per queue.
        let channel = conn.create_channel().await?;
        if let Ok(info) = channel
            .queue_declare(
                ShortString::from(q.clone()),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
        {
            out.push((q, info.message_count(), info.consumer_count()));
            let _ = channel.close(200, ShortString::from("done")).await;
        }
    }
    let _ = conn.close(200, ShortString::from("done")).await;
    Ok(out)
}

pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, c) in row.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
    };
    println!("{}", line(headers.iter().map(|h| h.to_string()).collect()));
    for row in rows {
        println!("{}", line(row.clone()));
    }
}

pub async fn workers(store: &Store) -> anyhow::Result<Vec<Value>> {
    let mut list: Vec<Value> =
        store.workers().await?.iter().filter_map(|b| serde_json::from_str(b).ok()).collect();
    list.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    Ok(list)
}
