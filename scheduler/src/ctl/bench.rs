//! `flotactl bench`: one scenario at a time, measured end to end (first submit
//! → N-th result recorded by the scheduler), with the ceiling beside it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};

use flota_shared::amqp;
use flota_shared::config::Config;
use flota_shared::envelope::{Kind, TaskEnvelope};

use super::demo::{percentile, tap};
use super::{ceiling, submit};
use crate::fleet::{Fleet, FleetOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// gpusim 0 ms: what the fleet itself costs.
    Overhead,
    /// gpusim 200 ms, 64 slots: does the fleet keep the GPU full?
    GpuBound,
    /// gpusim 500 ms, 3-agent deliberations: latency against two GPU round trips.
    Deliberation,
    /// gpu-bound with 1, 2 and 4 workers at a fixed per-worker concurrency.
    Scale,
    /// 50 concurrent producers through the API and AMQP while the fleet runs.
    Producers,
    /// Half the tasks a backlog of 3-agent deliberations, half interpretations
    /// arriving one by one at a quarter of what the fleet could serve (gpusim
    /// 200 ms, 256 slots): does a short task wait behind long ones? Each kind's
    /// latency is reported.
    Mixed,
}

pub struct Options {
    pub scenario: Scenario,
    pub n: usize,
    pub concurrency: u16,
    pub workers: usize,
    pub ceiling: bool,
    /// Run the ceiling alone (its figures in the Flota columns and the ceiling's).
    pub ceiling_only: bool,
    /// Measure each fleet size this many times (with `ceiling`, Flota and the
    /// ceiling alternate which goes first) and add a row of medians.
    pub repeat: usize,
    pub json: Option<std::path::PathBuf>,
    /// Measure a fleet that is already running (its scheduler's API) instead of starting one.
    pub attach: Option<Attach>,
}

/// A running fleet to measure: the prefix is the caller's `FLOTA_PREFIX`.
#[derive(Debug, Clone)]
pub struct Attach {
    pub api: String,
    /// gpusim's URL, for GPU utilisation (`/stats`); a real vLLM has none.
    pub gpu: Option<String>,
    /// The scheduler's pid, when it runs on this host, for its CPU.
    pub scheduler_pid: Option<u32>,
}

/// The fleet a workload runs against, started by the bench or found running.
struct Target {
    cfg: Config,
    api: String,
    gpu: Option<String>,
    /// Worker pids readable here (their CPU and RSS are measured).
    worker_pids: Vec<u32>,
    scheduler_pid: Option<u32>,
    /// Task ids start with this, so a running fleet's other work is told apart.
    run: String,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Figures {
    pub scenario: String,
    /// Which of the `--repeat` runs this is (from 1); 0 on the row of medians.
    pub run: usize,
    /// `Some("median of N runs")` on the row that summarises repeated runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    pub workers: usize,
    pub concurrency: u16,
    pub tasks: usize,
    pub seconds: f64,
    pub tasks_per_s: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    /// Time inside the worker (the result's `finished_at` − `started_at`): for
    /// deliberations, what is compared with two GPU round trips.
    pub run_p50_ms: f64,
    pub run_p99_ms: f64,
    pub gpu_utilisation: f64,
    pub gpu_peak_in_flight: i64,
    pub cpu_s_per_1000: f64,
    /// The part of `cpu_s_per_1000` spent by the scheduler (the rest: workers).
    pub scheduler_cpu_s_per_1000: Option<f64>,
    /// Voluntary context switches per task of the same processes (every thread): how
    /// often a thread went to sleep to wait and was woken. Steadier than CPU time on a
    /// shared machine, where a wake-up costs more or less as the neighbours come and
    /// go; the involuntary ones (preemptions) are left out, as they count the neighbours.
    pub switches_per_task: f64,
    pub worker_peak_rss_mb: Vec<f64>,
    pub submit_p50_ms: Option<f64>,
    pub submit_p99_ms: Option<f64>,
    /// Latency (submit → result) of each kind alone; None when the run had none of it.
    pub interpret_p50_ms: Option<f64>,
    pub interpret_p99_ms: Option<f64>,
    pub deliberate_p50_ms: Option<f64>,
    pub deliberate_p99_ms: Option<f64>,
    pub ceiling_tasks_per_s: Option<f64>,
    pub ceiling_cpu_s_per_1000: Option<f64>,
    pub ceiling_switches_per_task: Option<f64>,
    pub ratio_tasks_per_s: Option<f64>,
    pub ratio_cpu_per_task: Option<f64>,
    pub ratio_switches_per_task: Option<f64>,
}

fn gpusim_args(s: Scenario) -> Vec<&'static str> {
    match s {
        Scenario::Overhead | Scenario::Producers => vec!["--slots", "256"],
        Scenario::GpuBound | Scenario::Scale => vec!["--slots", "64", "--base-ms", "200"],
        // Room for every call a worker's deliberations fan out (up to 6 at once each):
        // what is measured is how a worker shares its concurrency, not a GPU queue.
        Scenario::Mixed => vec!["--slots", "256", "--base-ms", "200"],
        Scenario::Deliberation => vec!["--slots", "64", "--base-ms", "500"],
    }
}

/// A process's directory in /proc (`pid` None: this process).
fn proc_dir(pid: Option<u32>) -> String {
    pid.map_or_else(|| "/proc/self".to_string(), |p| format!("/proc/{p}"))
}

/// CPU seconds (user + system) of a process so far, from /proc (`pid` None:
/// this process). 0 when the process is gone.
pub fn cpu_seconds(pid: Option<u32>) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("{}/stat", proc_dir(pid))) else { return 0.0 };
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Voluntary context switches of every thread of a process so far, from /proc
/// (`pid` None: this process). 0 when the process is gone.
pub fn context_switches(pid: Option<u32>) -> u64 {
    let Ok(threads) = std::fs::read_dir(format!("{}/task", proc_dir(pid))) else { return 0 };
    threads
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .map(|status| switches_in_status(&status))
        .sum()
}

/// The `voluntary_ctxt_switches:` line of a /proc status file (pure).
fn switches_in_status(status: &str) -> u64 {
    status
        .lines()
        .find(|l| l.starts_with("voluntary_ctxt_switches:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
}

/// Peak resident set of a process in MB (VmHWM).
pub fn peak_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn task(i: usize, run: &str, phase: &str, deliberate: bool) -> TaskEnvelope {
    let prefix = format!("{run}-{phase}");
    let v = if deliberate {
        json!({"id": format!("{prefix}:{i}"), "kind": "deliberate", "input": {"role": "DEV", "task": format!("Plan change {i} to the billing export"), "agents": 3}})
    } else {
        json!({"id": format!("{prefix}:{i}"), "kind": "interpret", "input": {"message": format!("Abrí un trabajo para cambiar la bomba del pozo {i}")}})
    };
    flota_shared::envelope::validate_value(v).expect("bench tasks are valid")
}

/// The pids of the heartbeats (`GET /v1/workers`) that say they run on this
/// host, whose CPU and RSS can be read here (pure).
pub fn local_pids(workers: &[Value], host: &str) -> Vec<u32> {
    workers
        .iter()
        .filter(|w| w["host"].as_str() == Some(host))
        .filter_map(|w| w["pid"].as_u64().and_then(|p| u32::try_from(p).ok()))
        .collect()
}

/// How long the scheduler may go without recording one more result before the
/// bench gives up on it: it may have died, and a bench must fail, not hang.
const RECORD_STALL: Duration = Duration::from_secs(60);

/// The scheduler's count of recorded results, from its `/metrics`.
async fn recorded(http: &reqwest::Client, api: &str) -> anyhow::Result<f64> {
    let text = http.get(format!("{api}/metrics")).send().await?.error_for_status()?.text().await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("flota_results_recorded_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Poll until the scheduler has recorded `count` results; an error once it has
/// recorded none more (or not answered) for `stall`.
async fn wait_recorded(
    http: &reqwest::Client,
    api: &str,
    count: f64,
    every: Duration,
    stall: Duration,
) -> anyhow::Result<()> {
    let (mut best, mut progressed) = (f64::NEG_INFINITY, Instant::now());
    loop {
        let now = recorded(http, api).await;
        match &now {
            Ok(seen) if *seen >= count => return Ok(()),
            Ok(seen) if *seen > best => (best, progressed) = (*seen, Instant::now()),
            _ if progressed.elapsed() >= stall => {
                let last = match now {
                    Ok(seen) => format!("it has recorded {seen} of {count}"),
                    Err(e) => format!("it does not answer ({e})"),
                };
                anyhow::bail!(
                    "the scheduler at {api} recorded no result for {} s; {last}: is it still running?",
                    stall.as_secs()
                );
            }
            _ => {}
        }
        tokio::time::sleep(every).await;
    }
}

/// One measured run of a fleet of `workers`, started for it and stopped after.
async fn measure(
    config: &Config,
    scenario: Scenario,
    workers: usize,
    concurrency: u16,
    n: usize,
) -> anyhow::Result<Figures> {
    let prefix = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut fleet_opts = FleetOptions::new(config, &prefix, workers);
    fleet_opts.gpusim_args = gpusim_args(scenario).iter().map(|s| s.to_string()).collect();
    fleet_opts.worker_env = vec![("FLOTA_CONCURRENCY".into(), concurrency.to_string())];
    let cfg = fleet_opts.config.clone();
    let fleet = Fleet::start(fleet_opts).await?;
    let target = Target {
        cfg: cfg.clone(),
        api: fleet.api_url(),
        gpu: Some(fleet.gpu_url()),
        worker_pids: fleet.worker_pids(),
        scheduler_pid: Some(fleet.scheduler().pid()),
        run: "b".into(),
    };
    let outcome = workload(&target, scenario, workers, concurrency, n).await;
    let _ = fleet.stop().await;
    let _ = crate::fleet::cleanup_prefix(&cfg).await;
    outcome
}

/// One measured run against a fleet that is already running (`--api`): the
/// same workload under the caller's prefix, with ids of its own; CPU and RSS
/// of the workers whose heartbeats say they run on this host.
async fn measure_running(
    config: &Config,
    attach: &Attach,
    scenario: Scenario,
    n: usize,
) -> anyhow::Result<Figures> {
    let http = reqwest::Client::new();
    let api = attach.api.trim_end_matches('/').to_string();
    let workers: Vec<Value> =
        http.get(format!("{api}/v1/workers")).send().await?.error_for_status()?.json().await?;
    anyhow::ensure!(
        !workers.is_empty(),
        "no live worker under prefix {}: start the fleet first",
        config.prefix
    );
    // The name the workers put in their heartbeats (worker/src/heartbeat.rs).
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let worker_pids: Vec<u32> = local_pids(&workers, host.trim())
        .into_iter()
        .filter(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
        .collect();
    // The running fleet's own setting, as its heartbeats report it.
    let concurrency = workers.iter().filter_map(|w| w["concurrency"].as_u64()).max().unwrap_or(0) as u16;
    let target = Target {
        cfg: config.clone(),
        api,
        gpu: attach.gpu.clone(),
        worker_pids,
        scheduler_pid: attach.scheduler_pid,
        run: format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
    };
    workload(&target, scenario, workers.len(), concurrency, n).await
}

/// Warm up, then submit `n` tasks and wait for every result to be recorded by
/// the scheduler; what that took, from the fleet's own processes.
async fn workload(
    target: &Target,
    scenario: Scenario,
    workers: usize,
    concurrency: u16,
    n: usize,
) -> anyhow::Result<Figures> {
    let cfg = &target.cfg;
    let http = reqwest::Client::new();
    let api = target.api.clone();
    let deliberate = scenario == Scenario::Deliberation;
    let (_conn, mut results) = tap(cfg, &cfg.prefix).await?;
    let mine = |id: &str, phase: &str| id.starts_with(&format!("{}-{phase}:", target.run));
    // What the scheduler had recorded before (a running fleet has a history).
    let recorded_before = recorded(&http, &api).await?;
    // Warm-up, not measured.
    // ops/bench-instructions.sh counts on this formula (`tasks` there).
    let warm = (n / 10).clamp(10, 500);
    let warm_tasks: Vec<_> = (0..warm).map(|i| task(i, &target.run, "warm", deliberate)).collect();
    submit::publish_all(cfg, &warm_tasks, || {}).await?;
    let mut seen = std::collections::HashSet::new();
    while seen.len() < warm {
        match tokio::time::timeout(Duration::from_secs(120), results.next()).await {
            Ok(Some(Ok(d))) => {
                let Ok(v) = serde_json::from_slice::<Value>(&d.data) else { continue };
                let id = v["id"].as_str().unwrap_or("");
                if mine(id, "warm") {
                    seen.insert(id.to_string());
                }
            }
            _ => anyhow::bail!("warm-up stalled"),
        }
    }
    wait_recorded(&http, &api, recorded_before + warm as f64, Duration::from_millis(50), RECORD_STALL)
        .await?;
    if let Some(gpu) = &target.gpu {
        let _ = http.post(format!("{gpu}/admin/reset")).send().await;
    }
    let pids: Vec<u32> = target.worker_pids.iter().copied().chain(target.scheduler_pid).collect();
    let cpu_before: f64 = pids.iter().map(|p| cpu_seconds(Some(*p))).sum();
    let switches_before: u64 = pids.iter().map(|p| context_switches(Some(*p))).sum();
    let scheduler_cpu_before = target.scheduler_pid.map(|p| cpu_seconds(Some(p)));

    let tasks: Vec<_> =
        (0..n).map(|i| task(i, &target.run, "m", measured_is_deliberation(scenario, i, n))).collect();
    let started = Instant::now();
    // In the mixed and producers scenarios tasks arrive over the whole run: their
    // results are collected while they submit, so that each latency runs from the
    // task's own submit to its result. The others submit first, as they always have,
    // so that their figures stay comparable with earlier runs' (the bench's own
    // reading of results competes with the fleet for this machine's two cores).
    let submitting = async {
        match scenario {
            Scenario::Producers => anyhow::Ok(producers(cfg, &api, &tasks).await?),
            Scenario::Mixed => {
                anyhow::Ok((submit_mixed(cfg, &tasks, mixed_gap(workers, concurrency)).await?, Vec::new()))
            }
            _ => {
                let now = Instant::now();
                submit::publish_all(cfg, &tasks, || {}).await?;
                anyhow::Ok((tasks.iter().map(|t| (t.id.clone(), now)).collect(), Vec::new()))
            }
        }
    };
    let collecting = async {
        let mut arrivals = Vec::with_capacity(n);
        let mut run_ms = Vec::with_capacity(n);
        let mut got = std::collections::HashSet::new();
        while got.len() < n {
            match tokio::time::timeout(Duration::from_secs(300), results.next()).await {
                Ok(Some(Ok(d))) => {
                    let Ok(v) = serde_json::from_slice::<Value>(&d.data) else { continue };
                    let id = v["id"].as_str().unwrap_or("").to_string();
                    if !mine(&id, "m") || !got.insert(id.clone()) {
                        continue;
                    }
                    arrivals.push((id, Instant::now()));
                    let (start, end) =
                        (v["started_at"].as_str().unwrap_or(""), v["finished_at"].as_str().unwrap_or(""));
                    run_ms.extend(flota_shared::envelope::millis_between(start, end));
                }
                _ => anyhow::bail!("stalled after {} of {n} results", got.len()),
            }
        }
        anyhow::Ok((arrivals, run_ms))
    };
    let ((submitted, mut submit_ms), (arrivals, mut run_ms)) =
        if matches!(scenario, Scenario::Mixed | Scenario::Producers) {
            tokio::try_join!(submitting, collecting)?
        } else {
            (submitting.await?, collecting.await?)
        };
    let deliberations: std::collections::HashSet<&str> =
        tasks.iter().filter(|t| t.kind == Kind::Deliberate).map(|t| t.id.as_str()).collect();
    let (mut latencies, mut interpret_ms, mut deliberate_ms) =
        (Vec::with_capacity(n), Vec::new(), Vec::new());
    for (id, at) in &arrivals {
        let from = submitted.get(id).copied().unwrap_or(started);
        let ms = at.saturating_duration_since(from).as_secs_f64() * 1000.0;
        latencies.push(ms);
        if deliberations.contains(id.as_str()) { &mut deliberate_ms } else { &mut interpret_ms }.push(ms);
    }
    let all = recorded_before + (warm + n) as f64;
    wait_recorded(&http, &api, all, Duration::from_millis(20), RECORD_STALL).await?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu: f64 = pids.iter().map(|p| cpu_seconds(Some(*p))).sum::<f64>() - cpu_before;
    let switches =
        pids.iter().map(|p| context_switches(Some(*p))).sum::<u64>().saturating_sub(switches_before);
    let scheduler_cpu =
        target.scheduler_pid.zip(scheduler_cpu_before).map(|(p, before)| cpu_seconds(Some(p)) - before);
    let stats: Value = match &target.gpu {
        Some(gpu) => match http.get(format!("{gpu}/stats")).send().await {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => Value::Null,
        },
        None => Value::Null,
    };
    for v in [&mut latencies, &mut run_ms, &mut submit_ms, &mut interpret_ms, &mut deliberate_ms] {
        v.sort_by(f64::total_cmp);
    }
    let p = |v: &[f64], at: f64| (!v.is_empty()).then(|| percentile(v, at));
    Ok(Figures {
        scenario: format!("{scenario:?}"),
        run: 1,
        workers,
        concurrency,
        tasks: n,
        seconds,
        tasks_per_s: n as f64 / seconds,
        p50_ms: percentile(&latencies, 50.0),
        p90_ms: percentile(&latencies, 90.0),
        p99_ms: percentile(&latencies, 99.0),
        run_p50_ms: percentile(&run_ms, 50.0),
        run_p99_ms: percentile(&run_ms, 99.0),
        gpu_utilisation: stats["utilisation"].as_f64().unwrap_or(0.0),
        gpu_peak_in_flight: stats["peak_in_flight"].as_i64().unwrap_or(0),
        cpu_s_per_1000: cpu / n as f64 * 1000.0,
        scheduler_cpu_s_per_1000: scheduler_cpu.map(|c| c / n as f64 * 1000.0),
        switches_per_task: switches as f64 / n as f64,
        worker_peak_rss_mb: target.worker_pids.iter().copied().map(peak_rss_mb).collect(),
        submit_p50_ms: p(&submit_ms, 50.0),
        submit_p99_ms: p(&submit_ms, 99.0),
        interpret_p50_ms: p(&interpret_ms, 50.0),
        interpret_p99_ms: p(&interpret_ms, 99.0),
        deliberate_p50_ms: p(&deliberate_ms, 50.0),
        deliberate_p99_ms: p(&deliberate_ms, 99.0),
        ..Default::default()
    })
}

/// Whether the `i`-th of a scenario's `n` measured tasks is a deliberation
/// (pure): all in the deliberation scenario, the first half in the mixed one
/// (its backlog), none otherwise.
fn measured_is_deliberation(scenario: Scenario, i: usize, n: usize) -> bool {
    match scenario {
        Scenario::Deliberation => true,
        Scenario::Mixed => i < n / 2,
        _ => false,
    }
}

/// What share of the fleet's capacity the mixed scenario's interpretations use.
const MIXED_LOAD: f64 = 0.25;
/// gpusim's service time in the mixed scenario (`gpusim_args`).
const MIXED_GPU_CALL: Duration = Duration::from_millis(200);

/// The time between two of the mixed scenario's interpretations (pure): the
/// fleet could serve `workers × concurrency` of them per GPU call's time; they
/// arrive at `MIXED_LOAD` of that, so alone they would never queue, and any
/// wait they show is for the deliberations.
fn mixed_gap(workers: usize, concurrency: u16) -> Duration {
    let slots = (workers.max(1) * usize::from(concurrency.max(1))) as f64;
    MIXED_GPU_CALL.div_f64(slots * MIXED_LOAD)
}

/// The mixed scenario's submission: its deliberations at once (a backlog),
/// then its interpretations one at a time, `gap` apart, each confirmed before
/// the next; when each task was submitted.
async fn submit_mixed(
    cfg: &Config,
    tasks: &[TaskEnvelope],
    gap: Duration,
) -> anyhow::Result<HashMap<String, Instant>> {
    let (backlog, stream): (Vec<TaskEnvelope>, Vec<TaskEnvelope>) =
        tasks.iter().cloned().partition(|t| t.kind == Kind::Deliberate);
    let now = Instant::now();
    submit::publish_all(cfg, &backlog, || {}).await?;
    let mut submitted: HashMap<String, Instant> = backlog.into_iter().map(|t| (t.id, now)).collect();
    let producer = Producer::open(cfg).await?;
    let first = tokio::time::Instant::now();
    for (i, t) in stream.iter().enumerate() {
        // Paced from the first, not from the last: a slow confirm is caught up, not carried.
        tokio::time::sleep_until(first + gap.mul_f64(i as f64)).await;
        submitted.insert(t.id.clone(), Instant::now());
        producer.publish(t).await?;
    }
    producer.close().await;
    Ok(submitted)
}

/// One producer's own AMQP connection, as a real producer keeps one: tasks
/// published one at a time, each confirmed before `publish` returns.
struct Producer {
    conn: lapin::Connection,
    publisher: amqp::Publisher,
    exchange: String,
}

impl Producer {
    async fn open(cfg: &Config) -> anyhow::Result<Producer> {
        let conn = amqp::connect(cfg, "flotactl bench producer").await?;
        let publisher = amqp::Publisher::open(&conn).await?;
        Ok(Producer { conn, publisher, exchange: amqp::Topology::new(&cfg.prefix).tasks_exchange() })
    }

    async fn publish(&self, t: &TaskEnvelope) -> anyhow::Result<()> {
        Ok(submit::publish_task(&self.publisher, &self.exchange, t).await?)
    }

    async fn close(self) {
        let _ = self.conn.close(200, lapin::types::ShortString::from("done")).await;
    }
}

/// 50 producers at once, each with a connection of its own, submitting one
/// task at a time: half through the API, half straight to RabbitMQ. When each
/// task was submitted, and how long each submit took (ms).
async fn producers(
    cfg: &Config,
    api: &str,
    tasks: &[TaskEnvelope],
) -> anyhow::Result<(HashMap<String, Instant>, Vec<f64>)> {
    let chunks: Vec<Vec<TaskEnvelope>> =
        tasks.chunks(tasks.len().div_ceil(50).max(1)).map(|c| c.to_vec()).collect();
    let runs = chunks.into_iter().enumerate().map(|(i, chunk)| {
        let cfg = cfg.clone();
        let api = api.to_string();
        async move {
            let (mut submitted, mut ms) = (Vec::new(), Vec::new());
            let (http, amqp) = if i % 2 == 0 {
                (Some(reqwest::Client::new()), None)
            } else {
                (None, Some(Producer::open(&cfg).await?))
            };
            for t in chunk {
                let at = Instant::now();
                if let Some(http) = &http {
                    let r = http
                        .post(format!("{api}/v1/tasks"))
                        .body(t.to_json())
                        .header("content-type", "application/json")
                        .send()
                        .await?;
                    anyhow::ensure!(r.status().as_u16() == 202, "API submit answered {}", r.status());
                } else if let Some(producer) = &amqp {
                    producer.publish(&t).await?;
                }
                ms.push(at.elapsed().as_secs_f64() * 1000.0);
                submitted.push((t.id, at));
            }
            if let Some(producer) = amqp {
                producer.close().await;
            }
            anyhow::Ok((submitted, ms))
        }
    });
    let (mut submitted, mut all) = (HashMap::new(), Vec::new());
    for r in futures::future::join_all(runs).await {
        let (at, ms) = r?;
        submitted.extend(at);
        all.extend(ms);
    }
    Ok((submitted, all))
}

pub async fn run(config: &Config, opts: Options) -> anyhow::Result<Vec<Figures>> {
    anyhow::ensure!(
        !(opts.scenario == Scenario::Mixed && (opts.ceiling || opts.ceiling_only)),
        "the ceiling loop makes one GPU call per task: it has nothing to set beside the mixed scenario's deliberations"
    );
    if let Some(attach) = &opts.attach {
        anyhow::ensure!(
            !opts.ceiling && opts.scenario != Scenario::Scale,
            "--api measures the running fleet as it is: no --ceiling, no scale scenario"
        );
        eprintln!(
            "bench {:?}: {} tasks against the running fleet at {} …",
            opts.scenario, opts.n, attach.api
        );
        let all =
            repeated(opts.repeat, async |_| measure_running(config, attach, opts.scenario, opts.n).await)
                .await?;
        return report(&all, opts.json.as_deref());
    }
    let worker_counts = if opts.scenario == Scenario::Scale { vec![1, 2, 4] } else { vec![opts.workers] };
    let repeat = opts.repeat.max(1);
    if opts.ceiling_only {
        let w = opts.workers;
        let runs = repeated(repeat, async |_| {
            let c = measure_ceiling(config, opts.scenario, opts.n, opts.concurrency, w).await?;
            Ok(Figures::of_ceiling(opts.scenario, w, opts.concurrency, &c))
        })
        .await?;
        return report(&runs, opts.json.as_deref());
    }
    let mut all = Vec::new();
    for w in worker_counts {
        let runs = repeated(repeat, async |run| {
            eprintln!(
                "bench {:?}: {} tasks, {w} worker(s), concurrency {} (run {run} of {repeat}) …",
                opts.scenario, opts.n, opts.concurrency
            );
            let ceiling = async || measure_ceiling(config, opts.scenario, opts.n, opts.concurrency, w).await;
            // The machine drifts over minutes: alternate which side goes first, so
            // neither is always measured on the quieter half of a pair.
            let mut beside = None;
            if opts.ceiling && run % 2 == 0 {
                beside = Some(ceiling().await?);
            }
            let mut f = measure(config, opts.scenario, w, opts.concurrency, opts.n).await?;
            if opts.ceiling && beside.is_none() {
                beside = Some(ceiling().await?);
            }
            if let Some(c) = beside {
                f.set_ceiling(&c);
            }
            Ok(f)
        })
        .await?;
        all.extend(runs);
    }
    report(&all, opts.json.as_deref())
}

/// `repeat` runs of `one` (given the run's number, from 1), numbered, then
/// their row of medians when there is more than one.
async fn repeated(
    repeat: usize,
    mut one: impl AsyncFnMut(usize) -> anyhow::Result<Figures>,
) -> anyhow::Result<Vec<Figures>> {
    let repeat = repeat.max(1);
    let mut runs = Vec::with_capacity(repeat + 1);
    for run in 1..=repeat {
        let mut f = one(run).await?;
        f.run = run;
        runs.push(f);
    }
    if repeat > 1 {
        runs.push(medians(&runs));
    }
    Ok(runs)
}

/// The raw lapin loop on a gpusim of the scenario's shape, with the fleet's
/// total concurrency.
async fn measure_ceiling(
    config: &Config,
    scenario: Scenario,
    n: usize,
    concurrency: u16,
    workers: usize,
) -> anyhow::Result<ceiling::CeilingRun> {
    let gpu = crate::fleet::gpusim(&gpusim_args(scenario), None).await?;
    let c = ceiling::run_single_threaded(
        config,
        &gpu.url(),
        n as u64,
        concurrency.saturating_mul(workers as u16),
    )
    .await;
    let _ = gpu.terminate().await;
    c
}

impl Figures {
    /// The ceiling's run alone, as if it were the measured fleet, and beside itself.
    fn of_ceiling(scenario: Scenario, workers: usize, concurrency: u16, c: &ceiling::CeilingRun) -> Figures {
        let mut f = Figures {
            scenario: format!("{scenario:?} (ceiling only)"),
            run: 1,
            workers,
            concurrency,
            tasks: c.tasks as usize,
            seconds: c.elapsed.as_secs_f64(),
            tasks_per_s: c.tasks_per_s(),
            cpu_s_per_1000: c.cpu_s_per_1000(),
            switches_per_task: c.switches_per_task(),
            ..Default::default()
        };
        f.set_ceiling(c);
        f
    }

    /// Put the ceiling's run beside this one, as figures and as ratios.
    fn set_ceiling(&mut self, c: &ceiling::CeilingRun) {
        let (cps, ccpu) = (c.tasks_per_s(), c.cpu_s_per_1000());
        self.ceiling_tasks_per_s = Some(cps);
        self.ceiling_cpu_s_per_1000 = Some(ccpu);
        self.ratio_tasks_per_s = Some(self.tasks_per_s / cps);
        self.ratio_cpu_per_task = (ccpu > 0.0).then(|| self.cpu_s_per_1000 / ccpu);
        let cswitches = c.switches_per_task();
        self.ceiling_switches_per_task = Some(cswitches);
        self.ratio_switches_per_task = (cswitches > 0.0).then(|| self.switches_per_task / cswitches);
    }
}

/// The middle value; the mean of the two middle ones for an even count (pure).
pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// One row of medians over repeated runs of the same fleet (pure). Ratios are
/// the median of each run's own ratio (Flota and the ceiling measured side by
/// side), not a ratio of medians taken at different times.
pub fn medians(runs: &[Figures]) -> Figures {
    let of = |get: fn(&Figures) -> f64| median(runs.iter().map(get)).unwrap_or(0.0);
    let of_some = |get: fn(&Figures) -> Option<f64>| median(runs.iter().filter_map(get));
    let first = runs.first().cloned().unwrap_or_default();
    let rss_columns = runs.iter().map(|r| r.worker_peak_rss_mb.len()).max().unwrap_or(0);
    Figures {
        scenario: first.scenario,
        run: 0,
        summary: Some(format!("median of {} runs", runs.len())),
        workers: first.workers,
        concurrency: first.concurrency,
        tasks: first.tasks,
        seconds: of(|f| f.seconds),
        tasks_per_s: of(|f| f.tasks_per_s),
        p50_ms: of(|f| f.p50_ms),
        p90_ms: of(|f| f.p90_ms),
        p99_ms: of(|f| f.p99_ms),
        run_p50_ms: of(|f| f.run_p50_ms),
        run_p99_ms: of(|f| f.run_p99_ms),
        gpu_utilisation: of(|f| f.gpu_utilisation),
        gpu_peak_in_flight: runs.iter().map(|f| f.gpu_peak_in_flight).max().unwrap_or(0),
        cpu_s_per_1000: of(|f| f.cpu_s_per_1000),
        scheduler_cpu_s_per_1000: of_some(|f| f.scheduler_cpu_s_per_1000),
        switches_per_task: of(|f| f.switches_per_task),
        // The peak is what the memory target is about: the largest seen per worker.
        worker_peak_rss_mb: (0..rss_columns)
            .map(|i| runs.iter().filter_map(|r| r.worker_peak_rss_mb.get(i)).copied().fold(0.0, f64::max))
            .collect(),
        submit_p50_ms: of_some(|f| f.submit_p50_ms),
        submit_p99_ms: of_some(|f| f.submit_p99_ms),
        interpret_p50_ms: of_some(|f| f.interpret_p50_ms),
        interpret_p99_ms: of_some(|f| f.interpret_p99_ms),
        deliberate_p50_ms: of_some(|f| f.deliberate_p50_ms),
        deliberate_p99_ms: of_some(|f| f.deliberate_p99_ms),
        ceiling_tasks_per_s: of_some(|f| f.ceiling_tasks_per_s),
        ceiling_cpu_s_per_1000: of_some(|f| f.ceiling_cpu_s_per_1000),
        ceiling_switches_per_task: of_some(|f| f.ceiling_switches_per_task),
        ratio_tasks_per_s: of_some(|f| f.ratio_tasks_per_s),
        ratio_cpu_per_task: of_some(|f| f.ratio_cpu_per_task),
        ratio_switches_per_task: of_some(|f| f.ratio_switches_per_task),
    }
}

fn report(all: &[Figures], json: Option<&std::path::Path>) -> anyhow::Result<Vec<Figures>> {
    print(all);
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_vec_pretty(all)?)?;
        eprintln!("figures written to {}", path.display());
    }
    Ok(all.to_vec())
}

/// "interpret 210/260, deliberate 900/1400" where the run had both kinds
/// (pure); "–" where it had one kind, whose latency is the run's own.
fn by_kind(f: &Figures) -> String {
    let kinds = [
        ("interpret", f.interpret_p50_ms, f.interpret_p99_ms),
        ("deliberate", f.deliberate_p50_ms, f.deliberate_p99_ms),
    ];
    let seen: Vec<String> = kinds
        .iter()
        .filter_map(|(name, p50, p99)| Some(format!("{name} {:.0}/{:.0}", (*p50)?, (*p99)?)))
        .collect();
    if seen.len() < 2 { "–".into() } else { seen.join(", ") }
}

fn print(all: &[Figures]) {
    let opt =
        |v: Option<f64>, digits: usize| v.map(|x| format!("{x:.digits$}")).unwrap_or_else(|| "–".into());
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|f| {
            vec![
                f.scenario.clone(),
                match f.run {
                    0 => "median".into(),
                    run => run.to_string(),
                },
                f.workers.to_string(),
                f.tasks.to_string(),
                format!("{:.0}", f.tasks_per_s),
                format!("{:.0}/{:.0}/{:.0}", f.p50_ms, f.p90_ms, f.p99_ms),
                format!("{:.0}/{:.0}", f.run_p50_ms, f.run_p99_ms),
                format!("{:.1}%", f.gpu_utilisation * 100.0),
                format!("{:.2}", f.cpu_s_per_1000),
                f.worker_peak_rss_mb.iter().map(|m| format!("{m:.0}")).collect::<Vec<_>>().join(","),
                opt(f.ceiling_tasks_per_s, 0),
                opt(f.ratio_tasks_per_s.map(|r| r * 100.0), 0),
                opt(f.ratio_cpu_per_task, 2),
                match f.ratio_switches_per_task {
                    Some(r) => format!("{:.1} ({r:.2}×)", f.switches_per_task),
                    None => format!("{:.1}", f.switches_per_task),
                },
                opt(f.submit_p99_ms, 1),
                by_kind(f),
            ]
        })
        .collect();
    super::inspect::print_table(
        &[
            "scenario",
            "run",
            "workers",
            "tasks",
            "tasks/s",
            "p50/p90/p99 ms",
            "run p50/p99 ms",
            "GPU util",
            "CPU s/1k",
            "RSS MB",
            "ceiling/s",
            "% ceiling",
            "CPU ×ceiling",
            "switches/task (×ceiling)",
            "submit p99 ms",
            "p50/p99 ms by kind",
        ],
        &rows,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_workers_on_this_host_are_measured() {
        let workers = vec![
            json!({"host": "here", "pid": 41}),
            json!({"host": "elsewhere", "pid": 42}),
            json!({"host": "here", "pid": "not a number"}),
            json!({"host": "here", "pid": 43}),
        ];
        assert_eq!(local_pids(&workers, "here"), [41, 43]);
        assert!(local_pids(&workers, "nowhere").is_empty());
    }

    #[test]
    fn the_mixed_scenario_is_a_backlog_of_deliberations_then_interpretations_at_a_quarter_of_capacity() {
        let kinds: Vec<bool> = (0..5).map(|i| measured_is_deliberation(Scenario::Mixed, i, 5)).collect();
        assert_eq!(kinds, [true, true, false, false, false]);
        assert!((0..3).all(|i| measured_is_deliberation(Scenario::Deliberation, i, 3)));
        assert!(!(0..3).any(|i| measured_is_deliberation(Scenario::GpuBound, i, 3)));
        // 32 slots × 200 ms serve 160 a second; a quarter of that is one every 25 ms.
        assert_eq!(mixed_gap(1, 32), Duration::from_millis(25));
        assert_eq!(mixed_gap(2, 32), Duration::from_micros(12_500));
        // Nonsense sizes still give a finite pace, not a division by zero.
        assert_eq!(mixed_gap(0, 0), Duration::from_millis(800));
    }

    #[test]
    fn latency_by_kind_is_shown_only_when_a_run_had_both_kinds() {
        let mut f =
            Figures { interpret_p50_ms: Some(210.4), interpret_p99_ms: Some(260.0), ..Default::default() };
        assert_eq!(by_kind(&f), "–");
        (f.deliberate_p50_ms, f.deliberate_p99_ms) = (Some(900.0), Some(1400.2));
        assert_eq!(by_kind(&f), "interpret 210/260, deliberate 900/1400");
    }

    #[test]
    fn median_of_odd_and_even_counts_ignores_what_is_not_a_number() {
        assert_eq!(median([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median([4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median([f64::NAN, 5.0, f64::INFINITY]), Some(5.0));
        assert_eq!(median(std::iter::empty()), None);
    }

    fn run(run: usize, tasks_per_s: f64, cpu: f64, ceiling: Option<(f64, f64)>, rss: f64) -> Figures {
        let mut f = Figures {
            scenario: "GpuBound".into(),
            run,
            workers: 1,
            tasks: 100,
            tasks_per_s,
            cpu_s_per_1000: cpu,
            switches_per_task: cpu * 10.0,
            worker_peak_rss_mb: vec![rss],
            ..Default::default()
        };
        if let Some((tasks, cpu_seconds)) = ceiling {
            f.set_ceiling(&ceiling::CeilingRun {
                tasks: 100,
                elapsed: Duration::from_secs_f64(100.0 / tasks),
                cpu_seconds,
                context_switches: 400,
            });
        }
        f
    }

    #[test]
    fn switches_are_the_voluntary_ones_of_a_status_file() {
        let status = "Name:\tflota-worker\nvoluntary_ctxt_switches:\t1200\nnonvoluntary_ctxt_switches:\t34\n";
        assert_eq!(switches_in_status(status), 1200);
        assert_eq!(switches_in_status("Name:\tgone\n"), 0);
        // This process has at least one thread that has waited for something by now.
        assert!(context_switches(None) > 0);
    }

    #[test]
    fn the_row_of_medians_takes_each_runs_own_ratio_and_the_largest_peak() {
        // Run 1: a quiet minute for both; run 2: a busy one for both; run 3: in between.
        let runs = [
            run(1, 100.0, 0.4, Some((200.0, 0.02)), 30.0),
            run(2, 50.0, 0.9, Some((80.0, 0.03)), 33.0),
            run(3, 80.0, 0.6, Some((100.0, 0.025)), 31.0),
        ];
        let m = medians(&runs);
        assert_eq!((m.run, m.summary.as_deref()), (0, Some("median of 3 runs")));
        assert_eq!(m.tasks_per_s, 80.0);
        assert_eq!(m.cpu_s_per_1000, 0.6);
        // Per-run ratios 0.5, 0.625, 0.8 (tasks/s) and 2.0, 3.0, 2.4 (CPU): their medians,
        // not 80/100 and 0.6/0.25 from medians taken in different runs.
        assert_eq!(m.ratio_tasks_per_s, Some(0.625));
        assert!((m.ratio_cpu_per_task.unwrap() - 2.4).abs() < 1e-9, "{:?}", m.ratio_cpu_per_task);
        // 4, 9, 6 switches a task against the ceiling's 4.
        assert_eq!((m.switches_per_task, m.ceiling_switches_per_task), (6.0, Some(4.0)));
        assert_eq!(m.ratio_switches_per_task, Some(1.5));
        assert_eq!(m.worker_peak_rss_mb, vec![33.0]);
        // Without a ceiling there is no ratio to take a median of.
        let plain = medians(&[run(1, 10.0, 1.0, None, 1.0), run(2, 20.0, 2.0, None, 2.0)]);
        assert_eq!((plain.tasks_per_s, plain.ratio_cpu_per_task), (15.0, None));
    }

    /// A scheduler that serves `/metrics` with a fixed count of recorded results.
    async fn scheduler_that_recorded(count: u32) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let body = format!(
            "flota_results_recorded_total{{status=\"succeeded\"}} {count}\nflota_results_recorded_total{{status=\"failed\"}} 1\n"
        );
        let app = axum::Router::new().route("/metrics", axum::routing::get(move || async move { body }));
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    #[tokio::test]
    async fn waiting_for_results_ends_when_they_are_recorded() {
        let (http, api) = (reqwest::Client::new(), scheduler_that_recorded(4).await);
        assert_eq!(recorded(&http, &api).await.unwrap(), 5.0);
        wait_recorded(&http, &api, 5.0, Duration::from_millis(1), Duration::from_secs(3600)).await.unwrap();
    }

    #[tokio::test]
    async fn waiting_fails_instead_of_hanging_when_the_scheduler_stalls_or_is_gone() {
        let (http, api) = (reqwest::Client::new(), scheduler_that_recorded(4).await);
        let stalled = wait_recorded(&http, &api, 6.0, Duration::from_millis(1), Duration::ZERO).await;
        assert!(stalled.unwrap_err().to_string().contains("recorded 5 of 6"));
        // Nothing listens on port 1.
        let gone =
            wait_recorded(&http, "http://127.0.0.1:1", 1.0, Duration::from_millis(1), Duration::ZERO).await;
        assert!(gone.unwrap_err().to_string().contains("does not answer"));
    }
}
