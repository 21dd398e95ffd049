//! `flotactl submit`: one envelope, a JSON array, or JSONL, from a file or
//! stdin; each validated, the valid ones published straight to RabbitMQ with
//! a window of outstanding confirms; invalid ones reported per line, never published.

use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde_json::Value;

use flota_shared::amqp::{self, Publisher, Topology};
use flota_shared::config::Config;
use flota_shared::envelope::{self, TaskEnvelope};
use flota_shared::telemetry::TraceParent;

/// Confirms awaited at once.
pub const WINDOW: usize = 512;

/// One input item: where it came from and what it holds.
#[derive(Debug)]
pub struct Item {
    /// 1-based line (JSONL) or array index + 1.
    pub line: usize,
    pub value: Result<Value, String>,
}

/// Split input into items: a JSON array, one JSON object, or JSON Lines (pure).
pub fn split_input(text: &str) -> Vec<Item> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        return match serde_json::from_str::<Value>(trimmed) {
            Ok(Value::Array(items)) => {
                items.into_iter().enumerate().map(|(i, v)| Item { line: i + 1, value: Ok(v) }).collect()
            }
            Ok(_) => vec![Item { line: 1, value: Err("expected a JSON array".into()) }],
            Err(e) => vec![Item { line: 1, value: Err(format!("not valid JSON: {e}")) }],
        };
    }
    if let Ok(v @ Value::Object(_)) = serde_json::from_str::<Value>(trimmed) {
        return vec![Item { line: 1, value: Ok(v) }];
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| Item {
            line: i + 1,
            value: serde_json::from_str(l).map_err(|e| format!("not valid JSON: {e}")),
        })
        .collect()
}

/// Validate every item; the valid envelopes, and `line (id X): problems` for the rest.
pub fn validate(items: Vec<Item>) -> (Vec<TaskEnvelope>, Vec<String>) {
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for item in items {
        let result = item.value.and_then(|v| {
            let size = serde_json::to_vec(&v).map(|b| b.len()).unwrap_or(0);
            if size > envelope::MAX_BODY_BYTES {
                return Err(format!(
                    "payload_too_large: {size} bytes, the limit is {}",
                    envelope::MAX_BODY_BYTES
                ));
            }
            envelope::validate_value(v).map_err(|r| {
                format!(
                    "{}{}",
                    r.id.map(|id| format!("(id {id}) ")).unwrap_or_default(),
                    r.problems.join("; ")
                )
            })
        });
        match result {
            Ok(t) => ok.push(t),
            Err(why) => bad.push(format!("line {}: {why}", item.line)),
        }
    }
    (ok, bad)
}

/// Reconnects after a lost connection before `publish_all` gives up; the
/// count starts again whenever a session confirms something.
const RECONNECTS: u32 = 6;
const RECONNECT_FIRST: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// Publish with a window of outstanding confirms; calls `progress` per confirm.
/// A dropped connection (broker restart, network cut) is survived: reconnect
/// with backoff and publish what was not confirmed yet. A task whose publish
/// was in flight may arrive twice; ids make that harmless (one execution).
pub async fn publish_all(
    config: &Config,
    tasks: &[TaskEnvelope],
    progress: impl Fn(),
) -> anyhow::Result<usize> {
    let mut confirmed = vec![false; tasks.len()];
    let mut done = 0;
    let mut failures = 0;
    let mut delay = RECONNECT_FIRST;
    loop {
        let before = done;
        match publish_session(config, tasks, &mut confirmed, &mut done, &progress).await {
            Ok(()) => return Ok(done),
            Err(e) => {
                if done > before {
                    failures = 0;
                    delay = RECONNECT_FIRST;
                }
                failures += 1;
                if failures > RECONNECTS {
                    return Err(e.context(format!("published {done} of {}", tasks.len())));
                }
                tracing::warn!(message = "Broker connection lost while submitting; reconnecting.", error = %e, confirmed = done, delay_ms = delay.as_millis() as u64);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RECONNECT_MAX);
            }
        }
    }
}

/// Publish one task to the tasks exchange under its kind, with a new trace;
/// returns once the broker confirmed it.
pub async fn publish_task(
    publisher: &Publisher,
    exchange: &str,
    t: &TaskEnvelope,
) -> Result<(), amqp::PublishError> {
    let props = amqp::task_properties(&t.id, &TraceParent::new_root().header(), 0);
    publisher.publish(exchange, t.kind.as_str(), &t.to_json(), props).await
}

/// One connection's worth of `publish_all`: the unconfirmed tasks, in order.
async fn publish_session(
    config: &Config,
    tasks: &[TaskEnvelope],
    confirmed: &mut [bool],
    done: &mut usize,
    progress: &impl Fn(),
) -> anyhow::Result<()> {
    let conn = amqp::connect(config, "flotactl submit").await?;
    let topo = Topology::new(&config.prefix);
    amqp::ensure_topology(&conn, &topo, config.delivery_limit).await?;
    let publisher = Publisher::open(&conn).await?;
    let exchange = topo.tasks_exchange();
    let pending: Vec<usize> = (0..tasks.len()).filter(|i| !confirmed[*i]).collect();
    let mut window = FuturesUnordered::new();
    let mut settle = |r: (usize, Result<(), amqp::PublishError>)| -> anyhow::Result<()> {
        r.1?;
        confirmed[r.0] = true;
        *done += 1;
        progress();
        Ok(())
    };
    for i in pending {
        let (publisher, exchange) = (&publisher, &exchange);
        window.push(async move { (i, publish_task(publisher, exchange, &tasks[i]).await) });
        while window.len() >= WINDOW {
            if let Some(r) = window.next().await {
                settle(r)?;
            }
        }
    }
    while let Some(r) = window.next().await {
        settle(r)?;
    }
    let _ = conn.close(200, lapin::types::ShortString::from("done")).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_detected() {
        let one = r#"{"id":"a","kind":"interpret","input":{"message":"hola"}}"#;
        assert_eq!(split_input(one).len(), 1);
        let array = format!("[{one},{one}]");
        assert_eq!(split_input(&array).len(), 2);
        let jsonl = format!("{one}\n\n{one}\nnot json\n");
        let items = split_input(&jsonl);
        assert_eq!(items.len(), 3);
        assert_eq!(items[2].line, 4);
        assert!(items[2].value.is_err());
        // A pretty-printed single object spanning lines is one item, not JSONL.
        let pretty =
            "{\n  \"id\": \"a\",\n  \"kind\": \"interpret\",\n  \"input\": {\"message\": \"hola\"}\n}";
        assert_eq!(split_input(pretty).len(), 1);
    }

    #[test]
    fn invalid_lines_are_reported_with_their_line_and_id() {
        let text = "{\"id\":\"ok\",\"kind\":\"interpret\",\"input\":{\"message\":\"hola\"}}\n{\"id\":\"bad\",\"kind\":\"nope\",\"input\":{}}\n";
        let (ok, bad) = validate(split_input(text));
        assert_eq!(ok.len(), 1);
        assert_eq!(bad.len(), 1);
        assert!(bad[0].starts_with("line 2: (id bad)"), "{}", bad[0]);
    }
}
