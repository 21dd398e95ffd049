//! The scheduler's publishing side of RabbitMQ: one connection, one confirm
//! channel, rebuilt on demand when the broker went away.

use std::sync::Arc;

use lapin::options::QueueDeclareOptions;
use lapin::types::{FieldTable, ShortString};
use tokio::sync::Mutex;

use flota_shared::amqp::{self, Publisher, Topology};
use flota_shared::config::Config;

#[derive(Clone)]
pub struct Broker {
    config: Config,
    topo: Topology,
    current: Arc<Mutex<Option<(lapin::Connection, Publisher)>>>,
    /// The channel passive declares are made on, kept between them: the gauges
    /// ask about every queue every few seconds, and a channel opened and
    /// closed per question was two more round trips each.
    inspect: Arc<Mutex<Option<lapin::Channel>>>,
}

impl Broker {
    pub fn new(config: &Config) -> Broker {
        Broker {
            config: config.clone(),
            topo: Topology::new(&config.prefix),
            current: Arc::new(Mutex::new(None)),
            inspect: Arc::new(Mutex::new(None)),
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.topo
    }

    /// A connected publisher: the current one, or a new connection (topology re-declared).
    pub async fn publisher(&self) -> anyhow::Result<Publisher> {
        let mut current = self.current.lock().await;
        if let Some((conn, publisher)) = current.as_ref()
            && conn.status().connected()
            && publisher.is_connected()
        {
            return Ok(publisher.clone());
        }
        let conn = amqp::connect(&self.config, "flota-scheduler publish").await?;
        amqp::declare_topology(&conn, &self.topo, self.config.delivery_limit).await?;
        let publisher = Publisher::open(&conn).await?;
        *current = Some((conn, publisher.clone()));
        Ok(publisher)
    }

    pub async fn is_connected(&self) -> bool {
        self.publisher().await.is_ok()
    }

    /// Depth and consumers of a queue, by passive declare. A passive declare
    /// of a missing queue closes its channel: the next question opens another.
    pub async fn queue_info(&self, queue: &str) -> anyhow::Result<(u32, u32)> {
        self.publisher().await?;
        let mut inspect = self.inspect.lock().await;
        let channel = match inspect.as_ref().filter(|c| c.status().connected()) {
            Some(channel) => channel.clone(),
            None => {
                let current = self.current.lock().await;
                let Some((conn, _)) = current.as_ref() else { anyhow::bail!("not connected to RabbitMQ") };
                let channel = conn.create_channel().await?;
                *inspect = Some(channel.clone());
                channel
            }
        };
        let q = channel
            .queue_declare(
                ShortString::from(queue.to_string()),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await;
        match q {
            Ok(q) => Ok((q.message_count(), q.consumer_count())),
            Err(e) => {
                *inspect = None;
                Err(e.into())
            }
        }
    }
}
