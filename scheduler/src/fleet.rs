//! Start Flota's binaries as child processes and find their ports: used by
//! `flotactl demo`, `flotactl bench` and the end-to-end tests.
//!
//! Each binary prints one line on stdout once it is ready, and we wait for it:
//! - `flota-gpusim listening on http://IP:PORT`
//! - `flota-scheduler listening on http://IP:PORT`
//! - `flota-worker <id> ready, metrics on http://IP:PORT` (printed once it consumes)
//!
//! Children are started with `kill_on_drop`, so dropping a [`Proc`] or a
//! [`Fleet`] (a failure, a Ctrl-C that drops the future) leaves nothing running.
//! Signals are sent with the system's `kill` command: the workspace forbids
//! `unsafe`, and this keeps `libc`/`nix` out of the dependencies.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures::future::join_all;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use flota_shared::config::Config;

/// How long a child may take to print its ready line (a cold debug build on a
/// noisy 2-core machine is slow to start).
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long [`Fleet::stop`] waits for each child after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(30);

/// A sibling binary: next to the running executable (flotactl), or one level
/// up (test binaries live in `target/<profile>/deps/`), else from `PATH`.
pub fn binary_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dirs = [exe.parent().map(PathBuf::from), exe.parent().and_then(|d| d.parent()).map(PathBuf::from)];
    for dir in dirs.into_iter().flatten() {
        let path = dir.join(name);
        if path.is_file() {
            return path;
        }
    }
    PathBuf::from(name)
}

/// Older name of [`binary_path`], kept for the end-to-end tests' support code.
pub fn binary(name: &str) -> PathBuf {
    binary_path(name)
}

/// The signals a parent sends its children.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Term,
    Int,
    Kill,
    Stop,
    Cont,
}

impl Signal {
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::Term => "TERM",
            Signal::Int => "INT",
            Signal::Kill => "KILL",
            Signal::Stop => "STOP",
            Signal::Cont => "CONT",
        }
    }
}

/// One child process that printed its ready line.
pub struct Proc {
    pub child: Child,
    /// What the ready line said (e.g. the URL).
    pub ready_line: String,
    pub name: String,
    /// Reads the child's stdout after the ready line, so it never blocks on a full pipe.
    stdout_drain: tokio::task::JoinHandle<()>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // The child itself is killed by `kill_on_drop`; its reader goes with it.
        self.stdout_drain.abort();
    }
}

impl Proc {
    /// Start `name` with `args` and `env`, and wait for a stdout line containing `ready`.
    pub async fn start(
        name: &str,
        args: &[&str],
        env: &[(String, String)],
        ready: &str,
    ) -> anyhow::Result<Proc> {
        Proc::start_with(name, args, env, ready, None).await
    }

    /// Like [`Proc::start`], with stderr (the logs) appended to `log`.
    pub async fn start_with(
        name: &str,
        args: &[&str],
        env: &[(String, String)],
        ready: &str,
        log: Option<&Path>,
    ) -> anyhow::Result<Proc> {
        let mut cmd = Command::new(binary_path(name));
        let stderr = match log {
            Some(path) => Stdio::from(std::fs::OpenOptions::new().create(true).append(true).open(path)?),
            None => Stdio::inherit(),
        };
        cmd.args(args)
            .env("RUST_LOG", std::env::var("FLOTA_CHILD_LOG").unwrap_or_else(|_| "warn".into()))
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            anyhow::anyhow!("cannot start {name}: {e} (build it with `cargo build --workspace --bins`)")
        })?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let ready_line = tokio::time::timeout(READY_TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains(ready) {
                    return Some(line);
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| {
            let logs = log.map(|p| format!(" (its log: {})", p.display())).unwrap_or_default();
            anyhow::anyhow!("{name} exited or never printed {ready:?}{logs}")
        })?;
        // Ends when the child closes its stdout (it exited), or is aborted with the Proc.
        let stdout_drain = tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Proc { child, ready_line, name: name.to_string(), stdout_drain })
    }

    /// The `http://...` URL in the ready line.
    pub fn url(&self) -> String {
        url_in(&self.ready_line).unwrap_or_default()
    }

    /// The child's pid; 0 once it has been waited for.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Send a signal by name (TERM, KILL, STOP, CONT).
    pub async fn signal(&self, sig: &str) {
        // Never `kill -SIG 0`: that would signal our own process group.
        let Some(pid) = self.child.id() else { return };
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
    }

    /// SIGTERM and wait for the exit code (`None` if it did not exit in 120 s
    /// or died by a signal).
    pub async fn terminate(mut self) -> Option<i32> {
        self.signal("TERM").await;
        match tokio::time::timeout(Duration::from_secs(120), self.child.wait()).await {
            Ok(Ok(status)) => status.code(),
            _ => None,
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; the exit code (`None` when killed).
    pub async fn stop_within(mut self, grace: Duration) -> Option<i32> {
        self.signal(Signal::Term.as_str()).await;
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(status)) => status.code(),
            _ => {
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
                None
            }
        }
    }
}

/// The first `http://` word of a ready line, without trailing punctuation (pure).
pub fn url_in(line: &str) -> Option<String> {
    line.split_whitespace()
        .find(|w| w.starts_with("http://"))
        .map(|w| w.trim_end_matches(['.', ',']).to_string())
}

/// gpusim on a free port with extra flags.
pub async fn gpusim(args: &[&str], log: Option<&Path>) -> anyhow::Result<Proc> {
    let mut all = vec!["--addr", "127.0.0.1:0"];
    all.extend_from_slice(args);
    Proc::start_with("flota-gpusim", &all, &[], "listening on", log).await
}

/// A worker pointed at `gpu_url`, with extra env.
pub async fn worker(
    env: &[(String, String)],
    gpu_url: &str,
    extra: &[(&str, &str)],
    log: Option<&Path>,
) -> anyhow::Result<Proc> {
    let mut all: Vec<(String, String)> = env.to_vec();
    all.push(("FLOTA_GPU_URL".into(), gpu_url.into()));
    all.push(("FLOTA_METRICS_ADDR".into(), "127.0.0.1:0".into()));
    for (k, v) in extra {
        all.push((k.to_string(), v.to_string()));
    }
    Proc::start_with("flota-worker", &[], &all, "ready", log).await
}

/// The scheduler on a free port.
pub async fn scheduler(
    env: &[(String, String)],
    extra: &[(&str, &str)],
    log: Option<&Path>,
) -> anyhow::Result<Proc> {
    let mut all: Vec<(String, String)> = env.to_vec();
    all.push(("FLOTA_HTTP_ADDR".into(), "127.0.0.1:0".into()));
    for (k, v) in extra {
        all.push((k.to_string(), v.to_string()));
    }
    Proc::start_with("flota-scheduler", &[], &all, "listening on", log).await
}

/// The environment that points a child at a prefix (and the same broker and Redis).
pub fn prefix_env(config: &Config, prefix: &str) -> Vec<(String, String)> {
    let mut env = vec![
        ("FLOTA_PREFIX".into(), prefix.to_string()),
        ("FLOTA_AMQP_URL".into(), config.amqp_url.clone()),
        ("FLOTA_REDIS_URL".into(), config.redis_url.clone()),
    ];
    // A private CA must reach the children too, or amqps:// / rediss:// fail there.
    for (var, value) in [
        ("FLOTA_TLS_CA_FILE", &config.tls_ca_file),
        ("FLOTA_TLS_CERT_FILE", &config.tls_cert_file),
        ("FLOTA_TLS_KEY_FILE", &config.tls_key_file),
    ] {
        if let Some(v) = value {
            env.push((var.into(), v.clone()));
        }
    }
    env
}

/// What [`Fleet::start`] starts.
#[derive(Clone)]
pub struct FleetOptions {
    /// RabbitMQ, Redis and TLS settings the children share (its prefix is ignored: `prefix` wins).
    pub config: Config,
    pub prefix: String,
    pub workers: usize,
    /// Flags for `flota-gpusim` after `--addr 127.0.0.1:0`.
    pub gpusim_args: Vec<String>,
    /// Extra environment of every worker (after the fleet's own, so it wins).
    pub worker_env: Vec<(String, String)>,
    /// Extra environment of the scheduler.
    pub scheduler_env: Vec<(String, String)>,
    /// One log file per child (its stderr) in this directory; `None`: children inherit stderr.
    pub log_dir: Option<PathBuf>,
}

impl FleetOptions {
    /// `workers` workers on `prefix`, logs under `$TMPDIR/flota-<prefix>/`.
    pub fn new(config: &Config, prefix: &str, workers: usize) -> FleetOptions {
        FleetOptions {
            config: Config { prefix: prefix.to_string(), ..config.clone() },
            prefix: prefix.to_string(),
            workers,
            gpusim_args: Vec::new(),
            worker_env: Vec::new(),
            scheduler_env: Vec::new(),
            log_dir: Some(std::env::temp_dir().join(format!("flota-{prefix}"))),
        }
    }
}

/// gpusim, a scheduler and workers on one prefix, as child processes.
///
/// Dropping a `Fleet` kills every child (SIGKILL, via `kill_on_drop`); call
/// [`Fleet::stop`] for an orderly SIGTERM shutdown.
pub struct Fleet {
    options: FleetOptions,
    gpu: Proc,
    scheduler: Proc,
    workers: Vec<Proc>,
    /// Workers ever started: numbers ids and log files uniquely.
    started_workers: usize,
}

impl Fleet {
    /// Start gpusim, then the scheduler, then the workers, each ready before the next.
    pub async fn start(options: FleetOptions) -> anyhow::Result<Fleet> {
        if let Some(dir) = &options.log_dir {
            std::fs::create_dir_all(dir)?;
        }
        let log = |file: &str| options.log_dir.as_ref().map(|d| d.join(file));
        let gpusim_args: Vec<&str> = options.gpusim_args.iter().map(String::as_str).collect();
        let gpu = gpusim(&gpusim_args, log("gpusim.log").as_deref()).await?;
        let mut env = prefix_env(&options.config, &options.prefix);
        env.extend(options.scheduler_env.iter().cloned());
        let scheduler = scheduler(&env, &[], log("scheduler.log").as_deref()).await?;
        let mut fleet = Fleet { options, gpu, scheduler, workers: Vec::new(), started_workers: 0 };
        for _ in 0..fleet.options.workers {
            fleet.add_worker().await?;
        }
        Ok(fleet)
    }

    pub fn prefix(&self) -> &str {
        &self.options.prefix
    }

    /// The configuration pointing at this fleet's prefix.
    pub fn config(&self) -> &Config {
        &self.options.config
    }

    pub fn log_dir(&self) -> Option<&Path> {
        self.options.log_dir.as_deref()
    }

    /// Base URL of gpusim, e.g. `http://127.0.0.1:41234`.
    pub fn gpu_url(&self) -> String {
        self.gpu.url()
    }

    /// Base URL of the scheduler's API.
    pub fn api_url(&self) -> String {
        self.scheduler.url()
    }

    pub fn gpusim(&self) -> &Proc {
        &self.gpu
    }

    pub fn scheduler(&self) -> &Proc {
        &self.scheduler
    }

    pub fn workers(&self) -> &[Proc] {
        &self.workers
    }

    pub fn worker_pids(&self) -> Vec<u32> {
        self.workers.iter().map(Proc::pid).collect()
    }

    /// Signal worker `i` (an index into [`Fleet::workers`]). It stays in the
    /// list: [`Fleet::stop`] reaps it whatever state it is in.
    pub async fn kill_worker(&self, i: usize, signal: Signal) -> anyhow::Result<()> {
        let w = self
            .workers
            .get(i)
            .ok_or_else(|| anyhow::anyhow!("no worker {i}: the fleet has {} workers", self.workers.len()))?;
        w.signal(signal.as_str()).await;
        Ok(())
    }

    /// Start one more worker; its index in [`Fleet::workers`].
    pub async fn add_worker(&mut self) -> anyhow::Result<usize> {
        self.started_workers += 1;
        let n = self.started_workers;
        let id = format!("{}-w{n}", self.options.prefix);
        let mut env = prefix_env(&self.options.config, &self.options.prefix);
        env.push(("FLOTA_WORKER_ID".into(), id));
        env.extend(self.options.worker_env.iter().cloned());
        let log = self.options.log_dir.as_ref().map(|d| d.join(format!("worker-{n}.log")));
        let w = worker(&env, &self.gpu.url(), &[], log.as_deref()).await?;
        self.workers.push(w);
        Ok(self.workers.len() - 1)
    }

    /// SIGTERM the workers (together), then the scheduler, then gpusim, each
    /// waited for up to [`STOP_GRACE`] before SIGKILL. In that order, workers
    /// finish what they hold and the scheduler records it. Exit codes by child
    /// (`worker-N`, `flota-scheduler`, `flota-gpusim`); `None` = killed.
    pub async fn stop(self) -> Vec<(String, Option<i32>)> {
        let Fleet { gpu, scheduler, workers, .. } = self;
        let mut codes: Vec<(String, Option<i32>)> = join_all(
            workers
                .into_iter()
                .enumerate()
                .map(|(i, w)| async move { (format!("worker-{}", i + 1), w.stop_within(STOP_GRACE).await) }),
        )
        .await;
        codes.push(("flota-scheduler".into(), scheduler.stop_within(STOP_GRACE).await));
        codes.push(("flota-gpusim".into(), gpu.stop_within(STOP_GRACE).await));
        codes
    }
}

/// Delete the queues, exchanges and Redis keys of `config.prefix`.
pub async fn cleanup_prefix(config: &Config) -> anyhow::Result<()> {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    use lapin::types::ShortString;
    let topo = flota_shared::amqp::Topology::new(&config.prefix);
    let conn = flota_shared::amqp::connect(config, "flota cleanup").await?;
    let mut channel = conn.create_channel().await?;
    for q in topo.all_queues() {
        // A failed delete closes the channel; carry on with a fresh one.
        if channel.queue_delete(ShortString::from(q), QueueDeleteOptions::default()).await.is_err() {
            channel = conn.create_channel().await?;
        }
    }
    for e in topo.all_exchanges() {
        if channel.exchange_delete(ShortString::from(e), ExchangeDeleteOptions::default()).await.is_err() {
            channel = conn.create_channel().await?;
        }
    }
    let _ = conn.close(200, ShortString::from("cleanup")).await;
    let store = flota_shared::store::Store::new(flota_shared::store::pool(config, 2)?, &config.prefix);
    store.delete_all().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_read_from_ready_lines() {
        assert_eq!(
            url_in("flota-scheduler listening on http://127.0.0.1:4321").as_deref(),
            Some("http://127.0.0.1:4321")
        );
        assert_eq!(
            url_in("flota-worker w1 ready, metrics on http://127.0.0.1:9,").as_deref(),
            Some("http://127.0.0.1:9")
        );
        assert_eq!(url_in("flota-worker w1 ready"), None);
    }

    #[test]
    fn options_point_children_at_the_prefix() {
        let base = Config::from_lookup(|_| None).unwrap();
        let o = FleetOptions::new(&base, "demo-1", 2);
        assert_eq!(o.config.prefix, "demo-1");
        let env = prefix_env(&o.config, &o.prefix);
        assert!(env.contains(&("FLOTA_PREFIX".into(), "demo-1".into())));
        assert!(env.iter().any(|(k, _)| k == "FLOTA_AMQP_URL"));
    }
}
