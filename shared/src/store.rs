//! Redis: the connection pool, every key name (built here and nowhere else),
//! and one typed wrapper per Lua script in `shared/lua/`.
//!
//! Task state changes only through those scripts, so every check-then-act is
//! atomic. Keys carry a `{prefix}` hash tag so a script's keys share one slot
//! on a Redis Cluster too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_redis::{Pool, Runtime};
pub use redis;
use redis::Script;
use redis::aio::MultiplexedConnection;

use crate::config::{Config, redact_url};

/// Key names under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    tag: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys { tag: format!("{{{prefix}}}") }
    }

    /// `{tag}{middle}{id}`, built by hand: several keys are named per task, and
    /// `format!` cost ~1,300 instructions a key against ~150 for this (callgrind).
    fn join(&self, middle: &str, id: &str) -> String {
        let mut key = String::with_capacity(self.tag.len() + middle.len() + id.len());
        key.push_str(&self.tag);
        key.push_str(middle);
        key.push_str(id);
        key
    }

    /// Task state hash: status, kind, worker, fence, result, recorded, timestamps.
    pub fn task(&self, id: &str) -> String {
        self.join(":task:", id)
    }
    /// The per-task execution lock (random token, leased).
    pub fn task_lock(&self, id: &str) -> String {
        self.join(":lock:task:", id)
    }
    /// A `lock_keys` resource lock. (`wake.lua` builds the same name from the tag.)
    pub fn resource_lock(&self, key: &str) -> String {
        self.join(":lock:res:", key)
    }
    /// Bodies of tasks waiting for a resource lock, FIFO (built in Lua from the tag:
    /// `claim.lua`, `unlock.lua`, `wake.lua`).
    pub fn lock_waiters(&self, key: &str) -> String {
        self.join(":lockwait:", key)
    }
    /// The resource lock names that have waiters.
    pub fn lock_waits(&self) -> String {
        self.join(":lockwaits", "")
    }
    /// The fencing counter shared by all tasks.
    pub fn fence_counter(&self) -> String {
        self.join(":fence", "")
    }
    /// Attempts / applies / fenced counts of a task, so tests can prove "applied once".
    pub fn ledger(&self, id: &str) -> String {
        self.join(":ledger:", id)
    }
    /// The `{prefix}` hash tag; Lua scripts build dependency keys from it.
    pub fn tag(&self) -> &str {
        &self.tag
    }
    /// Parked tasks by dependency deadline (zset id → ms since epoch).
    pub fn parked_index(&self) -> String {
        self.join(":parked", "")
    }
    /// Released tasks not yet republished (hash id → body): the crash-safe hand-off.
    pub fn releasing(&self) -> String {
        self.join(":releasing", "")
    }
    /// Tasks failed by a dependency not yet reported (hash id → body).
    pub fn failing(&self) -> String {
        self.join(":failing", "")
    }
    /// Fleet-wide GPU admission: leases of requests in flight (zset token → expiry ms).
    pub fn gpu_inflight(&self) -> String {
        self.join(":gpu:inflight", "")
    }
    /// Set while the fleet's GPU breaker is open (expires after the open period).
    pub fn breaker_open(&self) -> String {
        self.join(":breaker:open", "")
    }
    /// Held by the one replica probing a recovering GPU server.
    pub fn breaker_probe(&self) -> String {
        self.join(":breaker:probe", "")
    }
    /// Councils by role (hash role → council JSON).
    pub fn councils(&self) -> String {
        self.join(":councils", "")
    }
    /// Finished agent calls of a deliberation, so a redelivery resumes (hash).
    pub fn checkpoint(&self, id: &str) -> String {
        self.join(":ckpt:", id)
    }
    /// An approved plan: its event, as dispatched (JSON).
    pub fn plan(&self, id: &str) -> String {
        self.join(":plan:", id)
    }
    /// Completion events already published for a plan (hash role → 1, `plan` → 1).
    pub fn plan_events(&self, id: &str) -> String {
        self.join(":plan-events:", id)
    }
    /// A live worker's heartbeat (JSON, with a TTL).
    pub fn worker(&self, id: &str) -> String {
        self.join(":worker:", id)
    }
    /// Pattern of all heartbeats.
    pub fn workers_pattern(&self) -> String {
        self.join(":worker:*", "")
    }
    /// A marker only the fleet writes: if it vanishes or changes under a
    /// running scheduler, Redis lost data (see `flota_scheduler::dataloss`).
    pub fn epoch(&self) -> String {
        self.join(":epoch", "")
    }
    /// Every key of this prefix matches this pattern (cleanup in tests and tools).
    pub fn pattern(&self) -> String {
        self.join(":*", "")
    }
}

/// A pool whose waits, connects and replies time out, so a dead or
/// black-holed Redis turns into errors, not hangs. `rediss://` verifies the
/// server against the system roots, or against `FLOTA_TLS_CA_FILE` when set;
/// a certificate that does not verify is refused, never downgraded.
pub fn pool(config: &Config, max_size: usize) -> anyhow::Result<Pool> {
    crate::amqp::install_crypto_provider();
    let bad =
        |e: &dyn std::fmt::Display| anyhow::anyhow!("bad Redis URL {}: {e}", redact_url(&config.redis_url));
    let custom_tls = config.tls_ca_file.is_some() || config.tls_cert_file.is_some();
    let info = match (custom_tls, config.redis_url.starts_with("rediss://")) {
        (true, true) => {
            // No CA file: the system roots verify the server (a client certificate alone is fine).
            let root_cert = match &config.tls_ca_file {
                Some(ca) => Some(
                    std::fs::read(ca)
                        .map_err(|e| anyhow::anyhow!("cannot read FLOTA_TLS_CA_FILE {ca}: {e}"))?,
                ),
                None => None,
            };
            let client_tls = match (&config.tls_cert_file, &config.tls_key_file) {
                (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                    client_cert: std::fs::read(cert)
                        .map_err(|e| anyhow::anyhow!("cannot read FLOTA_TLS_CERT_FILE {cert}: {e}"))?,
                    client_key: std::fs::read(key)
                        .map_err(|e| anyhow::anyhow!("cannot read FLOTA_TLS_KEY_FILE {key}: {e}"))?,
                }),
                _ => None,
            };
            let client = redis::Client::build_with_tls(
                config.redis_url.as_str(),
                redis::TlsCertificates { client_tls, root_cert },
            )
            .map_err(|e| bad(&e))?;
            client.get_connection_info().clone()
        }
        _ => {
            redis::IntoConnectionInfo::into_connection_info(config.redis_url.as_str()).map_err(|e| bad(&e))?
        }
    };
    let timeouts = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(5)));
    let manager = deadpool_redis::Manager::new_with_config(info, timeouts).map_err(|e| bad(&e))?;
    Pool::builder(manager)
        .max_size(max_size)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| bad(&e))
}

/// A fresh lock, fence or lease token: 128 random bits as 32 hex characters.
/// From the thread's userspace RNG, not `Uuid::new_v4`, whose `getrandom`
/// system call per token was one of the ~20 a task costs the worker, and one
/// of the ~8 a result costs the scheduler.
pub fn new_token() -> String {
    crate::telemetry::random_hex(16)
}

/// Errors of the store: the pool (Redis unreachable) or a command.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis pool: {0}")]
    Pool(#[from] deadpool_redis::PoolError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected reply from script {0}")]
    Reply(&'static str),
}

/// The Lua scripts, loaded once (EVALSHA with automatic fallback to EVAL).
pub struct Scripts {
    pub claim: Script,
    pub finish: Script,
    pub unlock: Script,
    pub extend: Script,
    pub record: Script,
    pub submit: Script,
    pub park: Script,
    pub expire: Script,
    pub store_result: Script,
    pub admit: Script,
    pub wake: Script,
    pub reopen: Script,
    pub revive: Script,
}

/// The reopening that `reopen.lua` and `revive.lua` share (a Lua function).
const REOPEN_FAILED: &str = include_str!("../lua/reopen_failed.lua");

impl Default for Scripts {
    fn default() -> Self {
        Scripts {
            claim: Script::new(include_str!("../lua/claim.lua")),
            finish: Script::new(include_str!("../lua/finish.lua")),
            unlock: Script::new(include_str!("../lua/unlock.lua")),
            extend: Script::new(include_str!("../lua/extend.lua")),
            record: Script::new(include_str!("../lua/record.lua")),
            submit: Script::new(include_str!("../lua/submit.lua")),
            park: Script::new(include_str!("../lua/park.lua")),
            expire: Script::new(include_str!("../lua/expire.lua")),
            store_result: Script::new(include_str!("../lua/store_result.lua")),
            admit: Script::new(include_str!("../lua/admit.lua")),
            wake: Script::new(include_str!("../lua/wake.lua")),
            reopen: Script::new(&[REOPEN_FAILED, include_str!("../lua/reopen.lua")].concat()),
            revive: Script::new(&[REOPEN_FAILED, include_str!("../lua/revive.lua")].concat()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// A result is already stored: re-report it.
    Done(String),
    /// Another attempt holds the task.
    Busy,
    /// Another task holds this lock key; the body waits in its list (ack, publish nothing).
    Queued(String),
    /// This attempt runs the task under this fencing token.
    Run(String),
    /// This attempt owns the task under this fencing token, but the attempts before it
    /// were abandoned (their worker died or froze past its lease) `takeovers` times, the
    /// limit: the task is taken to kill its workers. End it failed without running it.
    Abandoned { fence: String, takeovers: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    Applied,
    Exists(String),
    Fenced,
}

/// Typed access to task state. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pub pool: Pool,
    pub keys: Keys,
    scripts: Arc<Scripts>,
    shared: Arc<SharedConn>,
    /// How long recorded state is kept ([`Store::with_retention`]); `None`: for ever.
    retention: Option<Duration>,
}

/// One multiplexed connection that every task of the process shares, taken
/// from the pool once and replaced when it breaks. A pool checkout costs a
/// round trip of its own (deadpool-redis sends `UNWATCH` + `PING` on every
/// recycle), which doubled Redis traffic; a multiplexed connection already
/// pipelines concurrent commands, so one is what Redis serves best. The pool's
/// health check is kept where it is cheap: a connection that has not answered
/// for [`CHECK_IDLE_AFTER`] is pinged before use (so a quiet process notices a
/// Redis restart before its first command, as the pool did); a busy one is not.
#[derive(Default)]
struct SharedConn {
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
    generation: AtomicU64,
    /// When the current connection last answered, in ms since `epoch`.
    last_ok_ms: AtomicU64,
    epoch: std::sync::OnceLock<std::time::Instant>,
    /// One task at a time makes the replacement; the others wait for it.
    connecting: tokio::sync::Mutex<()>,
}

/// A handle on the shared connection: use it as `&mut conn` wherever redis-rs
/// wants a connection. An error that means the connection is gone (I/O,
/// dropped, timed out) retires it, so the next [`Store::conn`] makes a new one.
pub struct Conn {
    inner: MultiplexedConnection,
    generation: u64,
    shared: Arc<SharedConn>,
}

/// A shared connection idle this long is pinged before it is used.
const CHECK_IDLE_AFTER: Duration = Duration::from_millis(20);

impl SharedConn {
    fn now_ms(&self) -> u64 {
        self.epoch.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64
    }

    fn retire(&self, generation: u64) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_some_and(|(g, _)| *g == generation) {
            *current = None;
        }
    }
}

impl Conn {
    fn check<T>(&self, result: &redis::RedisResult<T>) {
        if result.is_ok() {
            self.shared.last_ok_ms.store(self.shared.now_ms(), Ordering::Relaxed);
        }
        if let Err(e) = result
            && (e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_unrecoverable_error())
        {
            self.shared.retire(self.generation);
        }
    }
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            let result = self.inner.req_packed_command(cmd).await;
            self.check(&result);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        Box::pin(async move {
            let result = self.inner.req_packed_commands(cmd, offset, count).await;
            self.check(&result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

impl Store {
    pub fn new(pool: Pool, prefix: &str) -> Store {
        Store {
            pool,
            keys: Keys::new(prefix),
            scripts: Arc::new(Scripts::default()),
            shared: Arc::new(SharedConn::default()),
            retention: None,
        }
    }

    /// Recorded tasks (`record`) and plans (`put_plan`, `claim_plan_event`)
    /// expire after `keep` (`FLOTA_RESULT_TTL_MS`); `None` keeps them for ever.
    pub fn with_retention(mut self, keep: Option<Duration>) -> Store {
        self.retention = keep;
        self
    }

    /// The process's shared Redis connection (made through the pool, with its
    /// connect and response timeouts, the first time and after it broke).
    pub async fn conn(&self) -> Result<Conn, StoreError> {
        if let Some(mut conn) = self.cached() {
            let idle_ms = self.shared.now_ms().saturating_sub(self.shared.last_ok_ms.load(Ordering::Relaxed));
            if idle_ms < CHECK_IDLE_AFTER.as_millis() as u64 {
                return Ok(conn);
            }
            // Idle for a while: make sure it still answers (a failure retires it).
            if redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok() {
                return Ok(conn);
            }
            self.shared.retire(conn.generation);
        }
        let _connecting = self.shared.connecting.lock().await;
        if let Some(conn) = self.cached() {
            return Ok(conn);
        }
        let inner = deadpool_redis::Connection::take(self.pool.get().await?);
        let generation = self.shared.generation.fetch_add(1, Ordering::Relaxed) + 1;
        self.shared.last_ok_ms.store(self.shared.now_ms(), Ordering::Relaxed);
        *self.shared.current.lock().unwrap_or_else(|p| p.into_inner()) = Some((generation, inner.clone()));
        Ok(Conn { inner, generation, shared: self.shared.clone() })
    }

    fn cached(&self) -> Option<Conn> {
        let current = self.shared.current.lock().unwrap_or_else(|p| p.into_inner());
        let (generation, inner) = current.as_ref()?;
        Some(Conn { inner: inner.clone(), generation: *generation, shared: self.shared.clone() })
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let _: String = redis::cmd("PING").query_async(&mut c).await?;
        Ok(())
    }

    /// Claim the task and all its `lock_keys` (all or nothing). `body` is the
    /// task as delivered: kept in the key's wait list when a lock key is taken.
    #[allow(clippy::too_many_arguments)] // One Lua call, one argument per input.
    pub async fn claim(
        &self,
        id: &str,
        lock_keys: &[String],
        body: &[u8],
        token: &str,
        lease: Duration,
        worker: &str,
        kind: &str,
        max_takeovers: u32,
    ) -> Result<Claim, StoreError> {
        let mut c = self.conn().await?;
        let mut script = self.scripts.claim.prepare_invoke();
        script
            .key(self.keys.task(id))
            .key(self.keys.task_lock(id))
            .key(self.keys.fence_counter())
            .key(self.keys.ledger(id));
        for k in lock_keys {
            script.key(self.keys.resource_lock(k));
        }
        script
            .arg(token)
            .arg(lease.as_millis() as u64)
            .arg(worker)
            .arg(kind)
            .arg(crate::envelope::now_rfc3339())
            .arg(self.keys.tag())
            // Only a task with lock_keys can wait in a list; spare the bytes otherwise.
            .arg(if lock_keys.is_empty() { &[][..] } else { body })
            .arg(max_takeovers);
        for k in lock_keys {
            script.arg(k);
        }
        let reply: Vec<String> = script.invoke_async(&mut c).await?;
        match reply.as_slice() {
            [tag, result] if tag == "done" => Ok(Claim::Done(result.clone())),
            [tag] if tag == "busy" => Ok(Claim::Busy),
            [tag, key] if tag == "queued" => Ok(Claim::Queued(key.clone())),
            [tag, fence] if tag == "run" => Ok(Claim::Run(fence.clone())),
            [tag, fence, n] if tag == "abandoned" => Ok(Claim::Abandoned {
                fence: fence.clone(),
                takeovers: n.parse().map_err(|_| StoreError::Reply("claim"))?,
            }),
            _ => Err(StoreError::Reply("claim")),
        }
    }

    pub async fn finish(
        &self,
        id: &str,
        token: &str,
        fence: &str,
        status: &str,
        result_json: &[u8],
    ) -> Result<Finish, StoreError> {
        let mut c = self.conn().await?;
        let reply: Vec<String> = self
            .scripts
            .finish
            .key(self.keys.task(id))
            .key(self.keys.task_lock(id))
            .key(self.keys.ledger(id))
            .arg(token)
            .arg(fence)
            .arg(status)
            .arg(result_json)
            .arg(crate::envelope::now_rfc3339())
            .invoke_async(&mut c)
            .await?;
        match reply.as_slice() {
            [tag] if tag == "applied" => Ok(Finish::Applied),
            [tag, stored] if tag == "exists" => Ok(Finish::Exists(stored.clone())),
            [tag] if tag == "fenced" => Ok(Finish::Fenced),
            _ => Err(StoreError::Reply("finish")),
        }
    }

    /// The lock keys an attempt of this task holds: its own and its `lock_keys`.
    pub fn lock_set(&self, id: &str, lock_keys: &[String]) -> Vec<String> {
        let mut keys = vec![self.keys.task_lock(id)];
        keys.extend(lock_keys.iter().map(|k| self.keys.resource_lock(k)));
        keys
    }

    /// Extend held locks; `false` means a lease was lost.
    pub async fn extend(&self, locks: &[String], token: &str, lease: Duration) -> Result<bool, StoreError> {
        let mut c = self.conn().await?;
        let n: i64 = self
            .scripts
            .extend
            .key(locks)
            .arg(token)
            .arg(lease.as_millis() as u64)
            .invoke_async(&mut c)
            .await?;
        Ok(n == 1)
    }

    /// Release the locks still held with this token (`locks` from [`Store::lock_set`]
    /// with the same `lock_keys`). Returns the waiters woken: republish each, then
    /// [`Store::handoff_done`]; one left behind is republished by the scheduler.
    pub async fn unlock(
        &self,
        id: &str,
        locks: &[String],
        lock_keys: &[String],
        token: &str,
    ) -> Result<Vec<Handoff>, StoreError> {
        let mut c = self.conn().await?;
        let mut script = self.scripts.unlock.prepare_invoke();
        script
            .key(locks)
            .key(self.keys.task(id))
            .arg(token)
            .arg(self.keys.tag())
            .arg(crate::envelope::now_rfc3339());
        for k in lock_keys {
            script.arg(k);
        }
        let flat: Vec<String> = script.invoke_async(&mut c).await?;
        Ok(flat
            .get(1..)
            .unwrap_or_default()
            .chunks_exact(2)
            .map(|c| Handoff { release: true, id: c[0].clone(), body: c[1].clone() })
            .collect())
    }

    /// Wake one waiter of each lock key nobody holds (its holder died); they join
    /// the pending hand-offs. Returns how many were woken.
    pub async fn wake_orphaned_waiters(&self, max_keys: usize) -> Result<u64, StoreError> {
        let mut c = self.conn().await?;
        Ok(self
            .scripts
            .wake
            .key(self.keys.lock_waits())
            .key(self.keys.releasing())
            .arg(self.keys.tag())
            .arg(max_keys)
            .invoke_async(&mut c)
            .await?)
    }

    /// Check dependencies or park the task until they are done (atomic).
    pub async fn park(
        &self,
        id: &str,
        depends_on: &[String],
        body: &[u8],
        deadline_ms: u64,
    ) -> Result<Park, StoreError> {
        let mut c = self.conn().await?;
        let mut script = self.scripts.park.prepare_invoke();
        script.key(self.keys.task(id));
        for d in depends_on {
            script.key(self.keys.task(d));
        }
        script.arg(self.keys.tag()).arg(id).arg(body).arg(deadline_ms).arg(crate::envelope::now_rfc3339());
        for d in depends_on {
            script.arg(d);
        }
        let reply: Vec<String> = script.invoke_async(&mut c).await?;
        match reply.as_slice() {
            [tag, r] if tag == "done" => Ok(Park::Done(r.clone())),
            [tag] if tag == "ready" => Ok(Park::Ready),
            [tag, d] if tag == "failed" => Ok(Park::Failed(d.clone())),
            [tag, d] if tag == "cycle" => Ok(Park::Cycle(d.clone())),
            [tag, n] if tag == "parked" => Ok(Park::Parked(n.parse().unwrap_or(0))),
            _ => Err(StoreError::Reply("park")),
        }
    }

    /// Parked tasks whose dependency deadline passed, moved to `failing`.
    pub async fn expire_parked(&self, now_ms: u64, max: usize) -> Result<Vec<Handoff>, StoreError> {
        let mut c = self.conn().await?;
        let flat: Vec<String> = self
            .scripts
            .expire
            .key(self.keys.parked_index())
            .arg(self.keys.tag())
            .arg(now_ms)
            .arg(max)
            .invoke_async(&mut c)
            .await?;
        Ok(flat
            .chunks_exact(2)
            .map(|c| Handoff { release: false, id: c[0].clone(), body: c[1].clone() })
            .collect())
    }

    /// Hand-offs left by a crash between `release`/`expire` and their publish.
    pub async fn pending_handoffs(&self) -> Result<Vec<Handoff>, StoreError> {
        let mut c = self.conn().await?;
        let releasing: Vec<(String, String)> =
            redis::cmd("HGETALL").arg(self.keys.releasing()).query_async(&mut c).await?;
        let failing: Vec<(String, String)> =
            redis::cmd("HGETALL").arg(self.keys.failing()).query_async(&mut c).await?;
        Ok(releasing
            .into_iter()
            .map(|(id, body)| Handoff { release: true, id, body })
            .chain(failing.into_iter().map(|(id, body)| Handoff { release: false, id, body }))
            .collect())
    }

    /// The hand-off is done (republished, or its failure reported).
    pub async fn handoff_done(&self, h: &Handoff) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let key = if h.release { self.keys.releasing() } else { self.keys.failing() };
        let _: i64 = redis::cmd("HDEL").arg(key).arg(&h.id).query_async(&mut c).await?;
        Ok(())
    }

    /// Store a result decided outside a worker attempt unless one exists; returns the stored one.
    pub async fn store_result(
        &self,
        id: &str,
        status: &str,
        result_json: &[u8],
    ) -> Result<String, StoreError> {
        let mut c = self.conn().await?;
        Ok(self
            .scripts
            .store_result
            .key(self.keys.task(id))
            .key(self.keys.ledger(id))
            .arg(status)
            .arg(result_json)
            .arg(crate::envelope::now_rfc3339())
            .invoke_async(&mut c)
            .await?)
    }

    /// Take a fleet-wide GPU slot if fewer than `cap` are leased.
    pub async fn admit_gpu(&self, token: &str, cap: u32, lease: Duration) -> Result<bool, StoreError> {
        let mut c = self.conn().await?;
        let n: i64 = self
            .scripts
            .admit
            .key(self.keys.gpu_inflight())
            .arg(token)
            .arg(cap)
            .arg(lease.as_millis() as u64)
            .invoke_async(&mut c)
            .await?;
        Ok(n == 1)
    }

    pub async fn release_gpu(&self, token: &str) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let _: i64 = redis::cmd("ZREM").arg(self.keys.gpu_inflight()).arg(token).query_async(&mut c).await?;
        Ok(())
    }

    /// Record a result once per id and take the dependents it releases or
    /// fails, in one step. `first` is `true` the first time for this id; retries
    /// of one delivery pass the same `token`, so a lost reply does not turn the
    /// first record into a "duplicate". From then on the task's state lives as
    /// long as the retention says.
    pub async fn record(
        &self,
        id: &str,
        status: &str,
        result_json: &[u8],
        token: &str,
    ) -> Result<Recorded, StoreError> {
        let mut c = self.conn().await?;
        let flat: Vec<String> = self
            .scripts
            .record
            .key(self.keys.task(id))
            .arg(status)
            .arg(result_json)
            .arg(crate::envelope::now_rfc3339())
            .arg(token)
            .arg(self.keys.tag())
            .arg(id)
            .arg(self.retention.map_or(0, |d| d.as_millis() as u64))
            .invoke_async(&mut c)
            .await?;
        let Some((first, handoffs)) = flat.split_first() else { return Err(StoreError::Reply("record")) };
        Ok(Recorded {
            first: first == "1",
            handoffs: handoffs
                .chunks_exact(3)
                .map(|c| Handoff { release: c[0] == "release", id: c[1].clone(), body: c[2].clone() })
                .collect(),
        })
    }

    /// Register a submitted id; `false` when it is already known (not run again).
    pub async fn submit(&self, id: &str, kind: &str) -> Result<bool, StoreError> {
        let mut c = self.conn().await?;
        let n: i64 = self
            .scripts
            .submit
            .key(self.keys.task(id))
            .arg(kind)
            .arg(crate::envelope::now_rfc3339())
            .invoke_async(&mut c)
            .await?;
        Ok(n == 1)
    }

    /// Forget a registration whose publish failed, so the id can be submitted again.
    pub async fn forget_submission(&self, id: &str) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let _: () = redis::cmd("DEL").arg(self.keys.task(id)).query_async(&mut c).await?;
        Ok(())
    }

    /// Status and stored result of a task, if known.
    pub async fn task_state(&self, id: &str) -> Result<Option<TaskState>, StoreError> {
        let mut c = self.conn().await?;
        let (status, result): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(self.keys.task(id))
            .arg("status")
            .arg("result")
            .query_async(&mut c)
            .await?;
        Ok(status.map(|status| TaskState { status, result }))
    }

    /// Count an attempt that lost its lease and stopped before applying anything.
    pub async fn note_fenced(&self, id: &str) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let _: i64 =
            redis::cmd("HINCRBY").arg(self.keys.ledger(id)).arg("fenced").arg(1).query_async(&mut c).await?;
        Ok(())
    }

    /// Before a replay: let a task whose stored result is `failed` run again
    /// (the failure is kept as `previous_result`, the ledger counts the replay).
    pub async fn reopen(&self, id: &str) -> Result<Reopened, StoreError> {
        let mut c = self.conn().await?;
        let reply: String = self
            .scripts
            .reopen
            .key(self.keys.task(id))
            .key(self.keys.ledger(id))
            .arg(crate::envelope::now_rfc3339())
            .invoke_async(&mut c)
            .await?;
        match reply.as_str() {
            "reopened" => Ok(Reopened::Reopened),
            "kept" => Ok(Reopened::Kept),
            "none" => Ok(Reopened::Nothing),
            _ => Err(StoreError::Reply("reopen")),
        }
    }

    /// After [`Store::reopen`] reopened `id`: reopen the tasks that failed with
    /// `dependency_failed` because of it (transitively) and hand them to the
    /// scheduler to republish; they park on `id` again. Returns their ids.
    pub async fn revive_dependents(&self, id: &str) -> Result<Vec<String>, StoreError> {
        let mut c = self.conn().await?;
        let revived: Vec<String> = self
            .scripts
            .revive
            .key(self.keys.task(id))
            .arg(self.keys.tag())
            .arg(id)
            .arg(crate::envelope::now_rfc3339())
            .invoke_async(&mut c)
            .await?;
        Ok(revived)
    }

    /// Attempts / applies / fenced / replays counters of a task's ledger.
    pub async fn ledger(&self, id: &str) -> Result<Ledger, StoreError> {
        let mut c = self.conn().await?;
        let (attempts, applies, fenced, replays): (Option<u64>, Option<u64>, Option<u64>, Option<u64>) =
            redis::cmd("HMGET")
                .arg(self.keys.ledger(id))
                .arg("attempts")
                .arg("applies")
                .arg("fenced")
                .arg("replays")
                .query_async(&mut c)
                .await?;
        Ok(Ledger {
            attempts: attempts.unwrap_or(0),
            applies: applies.unwrap_or(0),
            fenced: fenced.unwrap_or(0),
            replays: replays.unwrap_or(0),
        })
    }

    /// A council: the stored one, else the built-in default for the five default roles.
    pub async fn council(&self, role: &str) -> Result<Option<crate::council::Council>, StoreError> {
        let mut c = self.conn().await?;
        let raw: Option<String> =
            redis::cmd("HGET").arg(self.keys.councils()).arg(role).query_async(&mut c).await?;
        Ok(match raw.and_then(|r| serde_json::from_str(&r).ok()) {
            Some(council) => Some(council),
            None => crate::council::Council::default_for(role),
        })
    }

    /// Every stored council, with the defaults for default roles not stored.
    pub async fn councils(&self) -> Result<Vec<crate::council::Council>, StoreError> {
        let mut c = self.conn().await?;
        let raw: Vec<(String, String)> =
            redis::cmd("HGETALL").arg(self.keys.councils()).query_async(&mut c).await?;
        let mut out: Vec<crate::council::Council> =
            raw.into_iter().filter_map(|(_, v)| serde_json::from_str(&v).ok()).collect();
        for role in crate::council::DEFAULT_ROLES {
            if !out.iter().any(|c| c.role == role) {
                out.extend(crate::council::Council::default_for(role));
            }
        }
        out.sort_by(|a, b| a.role.cmp(&b.role));
        Ok(out)
    }

    pub async fn put_council(&self, council: &crate::council::Council) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let body = serde_json::to_string(council).unwrap_or_default();
        let _: i64 = redis::cmd("HSET")
            .arg(self.keys.councils())
            .arg(&council.role)
            .arg(body)
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// Delete a stored council; `true` when one was stored.
    pub async fn delete_council(&self, role: &str) -> Result<bool, StoreError> {
        let mut c = self.conn().await?;
        let n: i64 = redis::cmd("HDEL").arg(self.keys.councils()).arg(role).query_async(&mut c).await?;
        Ok(n == 1)
    }

    /// A finished agent call of a deliberation, if checkpointed.
    pub async fn checkpoint_get(&self, id: &str, field: &str) -> Result<Option<String>, StoreError> {
        let mut c = self.conn().await?;
        Ok(redis::cmd("HGET").arg(self.keys.checkpoint(id)).arg(field).query_async(&mut c).await?)
    }

    /// Checkpoint a finished agent call (kept a day: a stored result supersedes it).
    pub async fn checkpoint_put(&self, id: &str, field: &str, value: &str) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let key = self.keys.checkpoint(id);
        let _: () = redis::pipe()
            .cmd("HSET")
            .arg(&key)
            .arg(field)
            .arg(value)
            .ignore()
            .cmd("EXPIRE")
            .arg(&key)
            .arg(86_400)
            .ignore()
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// Store a plan unless known (kept as long as the retention says); `true` when new.
    pub async fn put_plan(&self, id: &str, body: &str) -> Result<bool, StoreError> {
        let mut c = self.conn().await?;
        let mut set = redis::cmd("SET");
        set.arg(self.keys.plan(id)).arg(body).arg("NX");
        if let Some(keep) = self.retention {
            set.arg("PX").arg(keep.as_millis() as u64);
        }
        let stored: Option<String> = set.query_async(&mut c).await?;
        Ok(stored.is_some())
    }

    pub async fn plan(&self, id: &str) -> Result<Option<String>, StoreError> {
        let mut c = self.conn().await?;
        Ok(redis::cmd("GET").arg(self.keys.plan(id)).query_async(&mut c).await?)
    }

    /// Claim the right to publish one plan event once; `true` for the first caller.
    /// The claims are kept as long as the retention says after the last one.
    pub async fn claim_plan_event(&self, id: &str, field: &str) -> Result<bool, StoreError> {
        let mut c = self.conn().await?;
        let key = self.keys.plan_events(id);
        let mut pipe = redis::pipe();
        pipe.cmd("HSETNX").arg(&key).arg(field).arg(1);
        if let Some(keep) = self.retention {
            pipe.cmd("PEXPIRE").arg(&key).arg(keep.as_millis() as u64).ignore();
        }
        let (n,): (i64,) = pipe.query_async(&mut c).await?;
        Ok(n == 1)
    }

    /// Give a claimed event back (its publish failed), so a redelivery publishes it.
    pub async fn unclaim_plan_event(&self, id: &str, field: &str) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let _: i64 = redis::cmd("HDEL").arg(self.keys.plan_events(id)).arg(field).query_async(&mut c).await?;
        Ok(())
    }

    /// Set the data epoch marker to `candidate` if it is absent (`SET NX GET`,
    /// one atomic step) and return what it held before: `None` means it was
    /// absent and now holds `candidate`.
    pub async fn swap_epoch(&self, candidate: &str) -> Result<Option<String>, StoreError> {
        let mut c = self.conn().await?;
        Ok(redis::cmd("SET")
            .arg(self.keys.epoch())
            .arg(candidate)
            .arg("NX")
            .arg("GET")
            .query_async(&mut c)
            .await?)
    }

    /// Tasks parked on dependencies now.
    pub async fn parked_count(&self) -> Result<u64, StoreError> {
        let mut c = self.conn().await?;
        Ok(redis::cmd("ZCARD").arg(self.keys.parked_index()).query_async(&mut c).await?)
    }

    /// Live workers' heartbeats (JSON strings).
    pub async fn workers(&self) -> Result<Vec<String>, StoreError> {
        let mut c = self.conn().await?;
        let mut cursor: u64 = 0;
        let mut keys: Vec<String> = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(self.keys.workers_pattern())
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await?;
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let values: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(&mut c).await?;
        Ok(values.into_iter().flatten().collect())
    }

    /// Delete every key of this prefix (tests, `flotactl` cleanup).
    pub async fn delete_all(&self) -> Result<u64, StoreError> {
        let mut c = self.conn().await?;
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(self.keys.pattern())
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await?;
            if !keys.is_empty() {
                let n: u64 = redis::cmd("DEL").arg(&keys).query_async(&mut c).await?;
                deleted += n;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Park {
    /// The task already has a result: re-report it.
    Done(String),
    /// Every dependency succeeded: run now.
    Ready,
    /// This dependency failed: fail with `dependency_failed`.
    Failed(String),
    /// Waiting on this dependency would wait forever: fail with `dependency_cycle`.
    Cycle(String),
    /// Parked on this many unfinished dependencies; the scheduler republishes it.
    Parked(usize),
}

/// What recording a result did.
#[derive(Debug)]
pub struct Recorded {
    /// The first record of this task's result (not a duplicate).
    pub first: bool,
    /// Dependents it released or failed, to republish / report.
    pub handoffs: Vec<Handoff>,
}

/// A parked task the scheduler must republish (`release`) or fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    pub release: bool,
    pub id: String,
    pub body: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskState {
    pub status: String,
    pub result: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ledger {
    pub attempts: u64,
    /// Results stored: one per run, so `replays + 1` at most.
    pub applies: u64,
    pub fenced: u64,
    /// Operator replays that reopened a failed task (`flotactl dlq replay`), or
    /// revived it with the failed dependency it waited on.
    pub replays: u64,
}

/// What [`Store::reopen`] did before a replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reopened {
    /// The failed result was set aside: the replay runs the task again.
    Reopened,
    /// A succeeded result stays: the replay re-reports it, no GPU call.
    Kept,
    /// No result stored: the replay runs it as any delivery.
    Nothing,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag() {
        let k = Keys::new("p1");
        for key in [k.task("a"), k.task_lock("a"), k.fence_counter(), k.ledger("a"), k.resource_lock("r")] {
            assert!(key.starts_with("{p1}:"), "{key}");
        }
        assert_eq!(k.pattern(), "{p1}:*");
        // The names the Lua scripts also build from the tag.
        assert_eq!(k.task("a:1"), "{p1}:task:a:1");
        assert_eq!(k.task_lock("a"), "{p1}:lock:task:a");
        assert_eq!(k.resource_lock("r"), "{p1}:lock:res:r");
        assert_eq!(k.lock_waiters("r"), "{p1}:lockwait:r");
        assert_eq!(k.fence_counter(), "{p1}:fence");
    }
}
