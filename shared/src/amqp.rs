//! RabbitMQ: connections, the contract's topology, confirmed publishing and
//! the message headers Flota uses.
//!
//! Every process declares what it uses at start (declarations are idempotent).
//! Publishing always goes through [`Publisher`], which puts its channel in
//! confirm mode: `publish` returns only once the broker has taken the message,
//! and many publishes may await their confirms at once (the confirm window is
//! the number of concurrent callers), so there is no round trip per message.

use std::time::Duration;

use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};

use crate::config::{Config, redact_url};
use crate::envelope::Kind;

pub const HEADER_TRACEPARENT: &str = "traceparent";
/// Attempts already spent on this task (0 on first publish); travels through retry queues.
pub const HEADER_ATTEMPT: &str = "x-flota-attempt";
pub const HEADER_REASON: &str = "x-flota-reason";
pub const HEADER_ERROR: &str = "x-flota-error";
/// Set by RabbitMQ on quorum-queue redeliveries.
pub const HEADER_DELIVERY_COUNT: &str = "x-delivery-count";
/// The queue a dead letter came from (set by Flota when it dead-letters itself).
pub const HEADER_SOURCE_QUEUE: &str = "x-flota-queue";

/// Delay tiers for retries: a message waits in `P.retry.<kind>.<tier>` until its
/// TTL expires and RabbitMQ dead-letters it back to `P.tasks` with its kind as key.
/// Fixed per-queue TTLs avoid the head-of-line blocking of per-message TTLs.
pub const RETRY_TIERS_MS: [u64; 5] = [1_000, 4_000, 16_000, 64_000, 256_000];

/// Names of every exchange and queue under a prefix: built in one place only.
#[derive(Debug, Clone)]
pub struct Topology {
    prefix: String,
}

impl Topology {
    pub fn new(prefix: &str) -> Topology {
        Topology { prefix: prefix.to_string() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn tasks_exchange(&self) -> String {
        format!("{}.tasks", self.prefix)
    }
    pub fn work_queue(&self, kind: Kind) -> String {
        format!("{}.{}", self.prefix, kind.as_str())
    }
    pub fn results_exchange(&self) -> String {
        format!("{}.results", self.prefix)
    }
    pub fn results_queue(&self) -> String {
        format!("{}.results", self.prefix)
    }
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.prefix)
    }
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }
    pub fn retry_queue(&self, kind: Kind, tier_ms: u64) -> String {
        format!("{}.retry.{}.{}ms", self.prefix, kind.as_str(), tier_ms)
    }
    /// The scheduler's own queue of approved plans (declared by the scheduler).
    pub fn plans_queue(&self) -> String {
        format!("{}.plans", self.prefix)
    }
    /// The scheduler's own copy of every dead letter (bound to `P.dlx` beside
    /// `P.dead`, declared by the scheduler): what the broker dead-letters by
    /// itself (over `x-delivery-limit`) has no result yet, and the scheduler
    /// fails the task for it. `P.dead` stays the operators' queue.
    pub fn dead_watch_queue(&self) -> String {
        format!("{}.dead.watch", self.prefix)
    }

    /// Every queue Flota declares under this prefix, in display order.
    pub fn all_queues(&self) -> Vec<String> {
        let mut q = vec![
            self.work_queue(Kind::Interpret),
            self.work_queue(Kind::Deliberate),
            self.results_queue(),
            self.dead_queue(),
        ];
        for kind in Kind::ALL {
            for tier in RETRY_TIERS_MS {
                q.push(self.retry_queue(kind, tier));
            }
        }
        q.push(self.plans_queue());
        q.push(self.dead_watch_queue());
        q
    }

    pub fn all_exchanges(&self) -> Vec<String> {
        vec![
            self.tasks_exchange(),
            self.results_exchange(),
            self.dead_letter_exchange(),
            self.events_exchange(),
        ]
    }
}

/// The smallest retry tier that is at least `delay`, or the largest.
pub fn retry_tier_for(delay: Duration) -> u64 {
    let ms = delay.as_millis() as u64;
    RETRY_TIERS_MS.iter().copied().find(|t| *t >= ms).unwrap_or(RETRY_TIERS_MS[RETRY_TIERS_MS.len() - 1])
}

fn s(v: impl Into<String>) -> ShortString {
    ShortString::from(v.into())
}

/// Two rustls crypto back-ends end up in the build (ring through lapin,
/// aws-lc-rs through reqwest); with both present and none chosen, rustls
/// panics on the first `ClientConfig::builder()` (redis-rs calls it for
/// `rediss://`). Choose ring for the process, once; later calls are no-ops.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Connect with a name the broker's management UI shows, honouring a private CA.
pub async fn connect(config: &Config, name: &str) -> anyhow::Result<Connection> {
    install_crypto_provider();
    let props = ConnectionProperties::default().with_connection_name(LongString::from(name.to_string()));
    let tls = tls_config(config)?;
    let runtime = lapin::runtime::default_runtime()?;
    let url = redact_url(&config.amqp_url);
    // A TCP peer that accepts but never speaks AMQP would otherwise hang here.
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        Connection::connect_with_config(&config.amqp_url, props, tls, runtime),
    )
    .await
    {
        Ok(conn) => conn.map_err(|e| {
            let hint =
                connect_hint(&e.to_string(), url.starts_with("amqps://"), config.tls_cert_file.is_some())
                    .map(|h| format!(" ({h})"))
                    .unwrap_or_default();
            anyhow::anyhow!("cannot connect to RabbitMQ at {url}: {e}{hint}")
        }),
        Err(_) => {
            anyhow::bail!("cannot connect to RabbitMQ at {url}: no handshake within {CONNECT_TIMEOUT:?}")
        }
    }
}

/// What an operator should check, for the connect errors whose text does not
/// say it (pure): TLS spoken to a plain port, or a broker that wants a client
/// certificate and got none (RabbitMQ may reset before its alert is read).
pub fn connect_hint(error: &str, tls: bool, client_cert: bool) -> Option<&'static str> {
    if !tls {
        return None;
    }
    if error.contains("InvalidContentType") || error.contains("corrupt message") {
        return Some("the port does not speak TLS: is this the broker's amqps listener?");
    }
    let reset = error.contains("CertificateRequired") || error.contains("reset by peer");
    (reset && !client_cert).then_some(
        "the broker may require a client certificate: set FLOTA_TLS_CERT_FILE and FLOTA_TLS_KEY_FILE",
    )
}

/// Bound on the AMQP handshake (TCP, TLS, open).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// TLS settings for `amqps://`: extra roots from `FLOTA_TLS_CA_FILE` (added to
/// the system roots), and a client certificate from `FLOTA_TLS_CERT_FILE` +
/// `FLOTA_TLS_KEY_FILE` (PEM certificate chain, PEM key in PKCS#8, PKCS#1 or
/// SEC1 form) for brokers that require one. A certificate without a key (or the
/// reverse) is refused by [`Config`]; files that do not parse fail the connect.
fn tls_config(config: &Config) -> anyhow::Result<OwnedTLSConfig> {
    let read = |var: &str, path: &str| {
        std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {var} {path}: {e}"))
    };
    let cert_chain = match &config.tls_ca_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read FLOTA_TLS_CA_FILE {path}: {e}"))?,
        ),
        None => None,
    };
    let identity = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => Some(lapin::tcp::OwnedIdentity::PKCS8 {
            pem: read("FLOTA_TLS_CERT_FILE", cert)?,
            key: read("FLOTA_TLS_KEY_FILE", key)?,
        }),
        _ => None,
    };
    Ok(OwnedTLSConfig { identity, cert_chain })
}

/// Quorum queue arguments shared by every work queue.
fn quorum_args(dead_letter_exchange: &str, delivery_limit: Option<u32>) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(s("x-queue-type"), AMQPValue::LongString("quorum".into()));
    if !dead_letter_exchange.is_empty() {
        args.insert(s("x-dead-letter-exchange"), AMQPValue::LongString(dead_letter_exchange.into()));
    }
    if let Some(limit) = delivery_limit {
        args.insert(s("x-delivery-limit"), AMQPValue::LongInt(limit as i32));
    }
    args
}

/// Declare the whole topology of the contract (idempotent), on a channel of
/// its own: a refusal (a user without `configure`: [`is_access_refused`])
/// closes only that channel, and the caller's channels stay usable.
pub async fn declare_topology(conn: &Connection, topo: &Topology, delivery_limit: u32) -> lapin::Result<()> {
    let channel = declare_tasks_exchange(conn, topo).await?;
    declare_the_rest(&channel, topo, delivery_limit).await?;
    let _ = channel.close(200, s("topology declared")).await;
    Ok(())
}

/// `P.tasks` exactly as the contract gives it (durable direct, no arguments),
/// so a producer in any language may declare it too: RabbitMQ refuses a
/// declare whose arguments differ from the existing exchange's. Flota before
/// 2026-12-06 gave it an `alternate-exchange` (P.dlx, for routing keys that are
/// no kind); such an exchange is kept as it is. Returns a usable channel.
async fn declare_tasks_exchange(conn: &Connection, topo: &Topology) -> lapin::Result<Channel> {
    let channel = conn.create_channel().await?;
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    let declared = channel
        .exchange_declare(s(topo.tasks_exchange()), ExchangeKind::Direct, durable, FieldTable::default())
        .await;
    match declared {
        Ok(()) => Ok(channel),
        Err(e) if is_earlier_alternate_exchange(&e.to_string()) => {
            tracing::warn!(
                message = "The tasks exchange keeps the alternate exchange an earlier Flota gave it, so a producer that declares it must pass the same argument; delete it to have it re-created as the contract gives it (runbook dead-letters.md).",
                exchange = %topo.tasks_exchange()
            );
            // The refusal closed the channel.
            conn.create_channel().await
        }
        Err(e) => Err(e),
    }
}

/// The broker's refusal of a plain declare of an exchange that has an
/// `alternate-exchange` argument (and is otherwise the same).
pub fn is_earlier_alternate_exchange(refusal: &str) -> bool {
    refusal.contains("inequivalent arg 'alternate-exchange'")
}

async fn declare_the_rest(channel: &Channel, topo: &Topology, delivery_limit: u32) -> lapin::Result<()> {
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    let qdurable = QueueDeclareOptions { durable: true, ..Default::default() };
    let none = FieldTable::default;
    channel.exchange_declare(s(topo.results_exchange()), ExchangeKind::Fanout, durable, none()).await?;
    channel.exchange_declare(s(topo.dead_letter_exchange()), ExchangeKind::Fanout, durable, none()).await?;
    channel.exchange_declare(s(topo.events_exchange()), ExchangeKind::Topic, durable, none()).await?;

    channel.queue_declare(s(topo.dead_queue()), qdurable, quorum_args("", None)).await?;
    channel
        .queue_bind(
            s(topo.dead_queue()),
            s(topo.dead_letter_exchange()),
            s(""),
            QueueBindOptions::default(),
            none(),
        )
        .await?;

    channel
        .queue_declare(
            s(topo.results_queue()),
            qdurable,
            quorum_args(&topo.dead_letter_exchange(), Some(delivery_limit)),
        )
        .await?;
    channel
        .queue_bind(
            s(topo.results_queue()),
            s(topo.results_exchange()),
            s(""),
            QueueBindOptions::default(),
            none(),
        )
        .await?;

    for kind in Kind::ALL {
        let q = topo.work_queue(kind);
        channel
            .queue_declare(
                s(q.clone()),
                qdurable,
                quorum_args(&topo.dead_letter_exchange(), Some(delivery_limit)),
            )
            .await?;
        channel
            .queue_bind(s(q), s(topo.tasks_exchange()), s(kind.as_str()), QueueBindOptions::default(), none())
            .await?;
        for tier in RETRY_TIERS_MS {
            // Expired messages go back to P.tasks with the kind as routing key.
            let mut args = quorum_args(&topo.tasks_exchange(), None);
            args.insert(s("x-message-ttl"), AMQPValue::LongLongInt(tier as i64));
            args.insert(s("x-dead-letter-routing-key"), AMQPValue::LongString(kind.as_str().into()));
            channel.queue_declare(s(topo.retry_queue(kind, tier)), qdurable, args).await?;
        }
    }
    Ok(())
}

/// Declare the topology, or, for a user without `configure` (docs/least-privilege.md),
/// check that it exists: then the scheduler or an operator must have declared it.
/// Consume `queue` on `channel` as `tag`, with a prefetch of `prefetch`.
/// RabbitMQ gives a consumer the channel's prefetch when the consumer starts
/// (quorum queues have no channel-wide QoS), so the `basic.qos` comes first:
/// without it the broker pushes the whole backlog. The caller is the only one
/// starting consumers on `channel`.
pub async fn consume_with_prefetch(
    channel: &Channel,
    queue: &str,
    tag: &str,
    prefetch: u16,
) -> lapin::Result<lapin::Consumer> {
    channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
    channel.basic_consume(s(queue), s(tag), BasicConsumeOptions::default(), FieldTable::default()).await
}

pub async fn ensure_topology(conn: &Connection, topo: &Topology, delivery_limit: u32) -> anyhow::Result<()> {
    match declare_topology(conn, topo, delivery_limit).await {
        Ok(()) => Ok(()),
        Err(e) if is_access_refused(&e) => {
            tracing::info!(message = "No permission to declare the topology; checking that it exists.");
            check_topology(&conn.create_channel().await?, topo).await.map_err(|e| {
                anyhow::anyhow!(
                    "the topology of {} is missing and this user may not declare it: {e}",
                    topo.prefix()
                )
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// Check, without declaring anything, that the queues and exchanges a worker
/// uses exist. For a least-privilege worker user without `configure` (which
/// in RabbitMQ also allows deleting): the scheduler or an operator declared
/// the topology; passive declares need no permission.
pub async fn check_topology(channel: &Channel, topo: &Topology) -> lapin::Result<()> {
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    for kind in Kind::ALL {
        channel.queue_declare(s(topo.work_queue(kind)), passive, FieldTable::default()).await?;
        for tier in RETRY_TIERS_MS {
            channel.queue_declare(s(topo.retry_queue(kind, tier)), passive, FieldTable::default()).await?;
        }
    }
    let passive = ExchangeDeclareOptions { passive: true, ..Default::default() };
    for e in topo.all_exchanges() {
        channel.exchange_declare(s(e), ExchangeKind::Direct, passive, FieldTable::default()).await?;
    }
    Ok(())
}

/// The broker refused an operation for lack of permission (403).
pub fn is_access_refused(e: &lapin::Error) -> bool {
    let m = e.to_string();
    m.contains("ACCESS_REFUSED") || m.contains("ACCESS-REFUSED")
}

/// Why a publish did not land.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker refused the message (nack)")]
    Nacked,
    #[error("publish failed: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("no confirm from the broker within {0:?} (is it blocked by a resource alarm?)")]
    ConfirmTimeout(Duration),
    #[error("gave up waiting for the confirm")]
    GaveUp,
}

/// How long [`Publisher::publish`] waits for its confirm (and how often
/// [`Publisher::publish_holding`] says it still waits). A broker under a memory
/// or disk alarm blocks publishers silently; without a bound, a caller would hang
/// forever. A caller treats the timeout like any failed publish, and a late
/// confirm only makes a duplicate that the scheduler's record-once absorbs.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);

/// A channel in confirm mode. Clone freely; clones share the channel.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    pub async fn open(conn: &Connection) -> lapin::Result<Publisher> {
        let channel = conn.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Publisher { channel })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    pub fn is_connected(&self) -> bool {
        self.channel.status().connected()
    }

    /// Publish and wait for the broker's confirm. Returns only when the message
    /// is durably the broker's (persistent message on a quorum queue).
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        tokio::time::timeout(CONFIRM_TIMEOUT, self.publish_confirmed(exchange, routing_key, body, properties))
            .await
            .unwrap_or(Err(PublishError::ConfirmTimeout(CONFIRM_TIMEOUT)))
    }

    /// Like [`Publisher::publish`], but without a time limit: waits for the confirm
    /// of this one message until it comes, the channel fails, or `give_up` ends.
    ///
    /// For a publish that stands before a delivery's ack. A broker under a memory
    /// or disk alarm blocks publishers for as long as the alarm lasts; giving the
    /// delivery back after a timeout spent one of its quorum queue's
    /// `x-delivery-limit` deliveries per timeout, and a long enough alarm had the
    /// broker dead-letter finished tasks. Holding it costs nothing: the message is
    /// already in the connection's hands and goes out, once, when the alarm clears.
    ///
    /// `still_wanted` is asked each [`CONFIRM_TIMEOUT`] of waiting (say, whether the
    /// delivery's channel is still open: once it closed, the broker has it back).
    pub async fn publish_holding(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        give_up: impl std::future::Future<Output = ()>,
        still_wanted: impl Fn() -> bool,
    ) -> Result<(), PublishError> {
        let publish = self.publish_confirmed(exchange, routing_key, body, properties);
        tokio::pin!(publish, give_up);
        let mut waited = Duration::ZERO;
        loop {
            tokio::select! {
                published = &mut publish => return published,
                () = &mut give_up => return Err(PublishError::GaveUp),
                () = tokio::time::sleep(CONFIRM_TIMEOUT) => {
                    if !still_wanted() {
                        return Err(PublishError::GaveUp);
                    }
                    waited += CONFIRM_TIMEOUT;
                    tracing::warn!(
                        message = "Publish not confirmed yet; holding its delivery until it is (is the broker blocked by a resource alarm?).",
                        waited_s = waited.as_secs()
                    );
                }
            }
        }
    }

    async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let confirm = self
            .channel
            .basic_publish(s(exchange), s(routing_key), BasicPublishOptions::default(), body, properties)
            .await?;
        match confirm.await? {
            Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
            Confirmation::Nack(_) => Err(PublishError::Nacked),
        }
    }
}

/// Publishes that stand before the ack of a delivery held on `channel` (a
/// result, a retry or dead-letter copy, a deferred copy): each waits for its
/// confirm as long as the delivery is held ([`Publisher::publish_holding`]),
/// until `give_up` is cancelled (the drain's grace is over) or `channel` closed
/// (then the broker has the delivery back).
pub struct Holding<'a> {
    pub publisher: &'a Publisher,
    pub give_up: &'a tokio_util::sync::CancellationToken,
    pub channel: &'a Channel,
}

impl Holding<'_> {
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let channel_open = || self.channel.status().connected();
        let give_up = self.give_up.cancelled();
        self.publisher.publish_holding(exchange, routing_key, body, properties, give_up, channel_open).await
    }
}

/// Properties of a task message: JSON, persistent, id, trace context, attempt.
pub fn task_properties(id: &str, traceparent: &str, attempt: u32) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(s(HEADER_TRACEPARENT), AMQPValue::LongString(traceparent.into()));
    headers.insert(s(HEADER_ATTEMPT), AMQPValue::LongInt(attempt as i32));
    json_properties(id).with_headers(headers)
}

/// Properties of a result or event message.
pub fn message_properties(id: &str, traceparent: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(s(HEADER_TRACEPARENT), AMQPValue::LongString(traceparent.into()));
    json_properties(id).with_headers(headers)
}

fn json_properties(id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type(s("application/json"))
        .with_delivery_mode(2)
        .with_message_id(s(id))
        .with_timestamp(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        )
}

/// A copy of `properties` with extra string headers (dead letters, retries).
pub fn with_headers(properties: &BasicProperties, extra: &[(&str, AMQPValue)]) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    for (k, v) in extra {
        headers.insert(s(*k), v.clone());
    }
    properties.clone().with_headers(headers)
}

pub fn header_str(properties: &BasicProperties, name: &str) -> Option<String> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(v) => Some(String::from_utf8_lossy(v.as_bytes()).into_owned()),
        AMQPValue::ShortString(v) => Some(v.as_str().to_string()),
        _ => None,
    }
}

pub fn header_int(properties: &BasicProperties, name: &str) -> Option<i64> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::ShortShortInt(v) => Some(*v as i64),
        AMQPValue::ShortShortUInt(v) => Some(*v as i64),
        AMQPValue::ShortInt(v) => Some(*v as i64),
        AMQPValue::ShortUInt(v) => Some(*v as i64),
        AMQPValue::LongInt(v) => Some(*v as i64),
        AMQPValue::LongUInt(v) => Some(*v as i64),
        AMQPValue::LongLongInt(v) => Some(*v),
        _ => None,
    }
}

pub fn long_string(v: &str) -> AMQPValue {
    AMQPValue::LongString(v.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_earlier_alternate_exchange_is_kept() {
        // RabbitMQ 3.10's words, as lapin reports them.
        let earlier = "protocol error: AMQP soft error: PRECONDITION-FAILED: PRECONDITION_FAILED - inequivalent arg 'alternate-exchange' for exchange 'flota.tasks' in vhost '/': received none but current is the value 'flota.dlx' of type 'longstr'";
        assert!(is_earlier_alternate_exchange(earlier));
        // Another kind, or another difference, is still an error.
        let kind = "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'flota.tasks' in vhost '/': received 'direct' but current is 'fanout'";
        assert!(!is_earlier_alternate_exchange(kind));
        assert!(!is_earlier_alternate_exchange("ACCESS_REFUSED - access to exchange 'flota.tasks' refused"));
    }

    #[test]
    fn connect_hints_name_the_likely_cause() {
        let plain_port = "IO error: received corrupt message of type InvalidContentType";
        assert!(connect_hint(plain_port, true, false).unwrap().contains("does not speak TLS"));
        let no_cert = "IO error: received fatal alert: CertificateRequired";
        assert!(connect_hint(no_cert, true, false).unwrap().contains("FLOTA_TLS_CERT_FILE"));
        let reset = "IO error: Connection reset by peer (os error 104)";
        assert!(connect_hint(reset, true, false).is_some());
        // A certificate was given, or it is not TLS at all: no guess.
        assert_eq!(connect_hint(reset, true, true), None);
        assert_eq!(connect_hint(reset, false, false), None);
        assert_eq!(connect_hint("invalid peer certificate: UnknownIssuer", true, false), None);
    }

    #[test]
    fn names_live_under_the_prefix() {
        let t = Topology::new("p1");
        assert_eq!(t.tasks_exchange(), "p1.tasks");
        assert_eq!(t.work_queue(Kind::Interpret), "p1.interpret");
        assert_eq!(t.work_queue(Kind::Deliberate), "p1.deliberate");
        assert_eq!(t.results_queue(), "p1.results");
        assert_eq!(t.dead_queue(), "p1.dead");
        assert_eq!(t.dead_letter_exchange(), "p1.dlx");
        assert_eq!(t.events_exchange(), "p1.events");
        assert!(t.all_queues().iter().all(|q| q.starts_with("p1.")));
    }

    #[test]
    fn retry_tiers_round_up() {
        assert_eq!(retry_tier_for(Duration::from_millis(10)), 1_000);
        assert_eq!(retry_tier_for(Duration::from_millis(1_500)), 4_000);
        assert_eq!(retry_tier_for(Duration::from_secs(10_000)), 256_000);
    }

    #[test]
    fn headers_round_trip() {
        let p = task_properties("id-1", "00-abc-def-01", 2);
        assert_eq!(header_str(&p, HEADER_TRACEPARENT).as_deref(), Some("00-abc-def-01"));
        assert_eq!(header_int(&p, HEADER_ATTEMPT), Some(2));
        let p = with_headers(&p, &[(HEADER_REASON, long_string("invalid_task"))]);
        assert_eq!(header_str(&p, HEADER_REASON).as_deref(), Some("invalid_task"));
        assert_eq!(header_int(&p, HEADER_ATTEMPT), Some(2));
    }
}
