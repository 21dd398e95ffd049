//! `flotactl dlq list | show ID | replay [ID|--all] | purge`: what an
//! operator does with dead letters.

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, ShortString};
use serde_json::{Value, json};

use flota_shared::amqp::{self, HEADER_ERROR, HEADER_REASON, Publisher, Topology};
use flota_shared::config::Config;
use flota_shared::envelope::Kind;
use flota_shared::store::{Reopened, Store};

/// One dead letter as shown to an operator.
pub fn describe(delivery: &lapin::message::Delivery) -> Value {
    let props = &delivery.properties;
    let id = props.message_id().as_ref().map(|m| m.as_str().to_string());
    // Dead-lettered by Flota: x-flota-*; by the broker (delivery limit): x-first-death-reason.
    let reason = amqp::header_str(props, HEADER_REASON)
        .or_else(|| amqp::header_str(props, "x-first-death-reason"))
        // Neither: it reached P.dead through P.tasks' alternate exchange (nobody routes its key).
        .unwrap_or_else(|| "unroutable".into());
    let error = amqp::header_str(props, HEADER_ERROR).unwrap_or_default();
    let body = String::from_utf8_lossy(&delivery.data).into_owned();
    json!({"id": id, "reason": reason, "error": error, "bytes": delivery.data.len(), "body": body})
}

/// Where a dead letter goes back to: the kind in its body, else its routing key.
pub fn replay_key(delivery: &lapin::message::Delivery) -> Option<&'static str> {
    let from_body = serde_json::from_slice::<Value>(&delivery.data)
        .ok()
        .and_then(|v| v["kind"].as_str().and_then(Kind::parse));
    from_body.or_else(|| Kind::parse(delivery.routing_key.as_str())).map(Kind::as_str)
}

pub enum Action<'a> {
    List,
    Show(&'a str),
    /// The id (`None`: all), and the store where failed tasks are reopened.
    Replay(Option<&'a str>, &'a Store),
}

/// Walk the dead-letter queue once: every message is taken, looked at, and
/// either replayed (then acked) or returned (nack-requeue; `P.dead` has no delivery limit).
///
/// A replayed task whose stored result is `failed` is reopened in Redis first
/// (so it runs again instead of re-reporting its failure); one that succeeded
/// keeps its result and is only re-reported.
pub async fn walk(config: &Config, action: Action<'_>) -> anyhow::Result<Vec<Value>> {
    let topo = Topology::new(&config.prefix);
    let conn = amqp::connect(config, "flotactl dlq").await?;
    let channel = conn.create_channel().await?;
    let publisher = Publisher::open(&conn).await?;
    let mut seen = Vec::new();
    let mut held = Vec::new();
    while let Some(msg) =
        channel.basic_get(ShortString::from(topo.dead_queue()), BasicGetOptions::default()).await?
    {
        let delivery = msg.delivery;
        let info = describe(&delivery);
        let id = info["id"].as_str().map(str::to_string);
        let wanted = match &action {
            Action::List => true,
            Action::Show(want) | Action::Replay(Some(want), _) => id.as_deref() == Some(*want),
            Action::Replay(None, _) => true,
        };
        if let (true, Action::Replay(_, store)) = (wanted, &action) {
            match replay_key(&delivery) {
                Some(key) => {
                    // Reopen before publishing: a worker taking the replay must not
                    // find the old failure. (If the publish fails, the dead letter
                    // stays and a second replay works the same way.)
                    let reopened = match id.as_deref() {
                        Some(id) => store.reopen(id).await?,
                        None => Reopened::Nothing,
                    };
                    // The tasks that failed only because this one did run again with it:
                    // the scheduler republishes them, and they wait for this one. Also when
                    // nothing was stored: an earlier replay may have reopened it and stopped
                    // before reviving them.
                    let revived = match (id.as_deref(), &reopened) {
                        (Some(id), Reopened::Reopened | Reopened::Nothing) => {
                            store.revive_dependents(id).await?
                        }
                        _ => Vec::new(),
                    };
                    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
                    // A replay starts its attempts afresh.
                    headers.insert(ShortString::from(amqp::HEADER_ATTEMPT), AMQPValue::LongInt(0));
                    let props = delivery.properties.clone().with_headers(headers);
                    publisher.publish(&topo.tasks_exchange(), key, &delivery.data, props).await?;
                    delivery.acker.ack(BasicAckOptions::default()).await?;
                    let mut info = info;
                    info["rerun"] = json!(reopened != Reopened::Kept);
                    if !revived.is_empty() {
                        info["revived"] = json!(revived);
                    }
                    seen.push(info);
                    continue;
                }
                None => {
                    let mut info = info;
                    info["replayed"] = json!(false);
                    info["why"] = json!("no kind to route it by: fix the producer and purge");
                    seen.push(info);
                }
            }
        } else if wanted {
            seen.push(info);
        }
        held.push(delivery);
    }
    for d in held {
        d.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await?;
    }
    let _ = conn.close(200, ShortString::from("done")).await;
    Ok(seen)
}

pub async fn purge(config: &Config) -> anyhow::Result<u32> {
    let topo = Topology::new(&config.prefix);
    let conn = amqp::connect(config, "flotactl dlq purge").await?;
    let channel = conn.create_channel().await?;
    let n = channel.queue_purge(ShortString::from(topo.dead_queue()), QueuePurgeOptions::default()).await?;
    let _ = conn.close(200, ShortString::from("done")).await;
    Ok(n)
}
