//! `flotactl bench`: one scenario at a time, measured end to end (first submit
//! → N-th result recorded by the scheduler), with the ceiling beside it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};

use flota_shared::config::Config;
use flota_shared::envelope::TaskEnvelope;

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
}

pub struct Options {
    pub scenario: Scenario,
    pub n: usize,
    pub concurrency: u16,
    pub workers: usize,
    pub ceiling: bool,
    pub json: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Figures {
    pub scenario: String,
    pub workers: usize,
    pub concurrency: u16,
    pub tasks: usize,
    pub seconds: f64,
    pub tasks_per_s: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub gpu_utilisation: f64,
    pub gpu_peak_in_flight: i64,
    pub cpu_s_per_1000: f64,
    pub worker_peak_rss_mb: Vec<f64>,
    pub submit_p50_ms: Option<f64>,
    pub submit_p99_ms: Option<f64>,
    pub ceiling_tasks_per_s: Option<f64>,
    pub ceiling_cpu_s_per_1000: Option<f64>,
    pub ratio_tasks_per_s: Option<f64>,
    pub ratio_cpu_per_task: Option<f64>,
}

fn gpusim_args(s: Scenario) -> Vec<&'static str> {
    match s {
        Scenario::Overhead | Scenario::Producers => vec!["--slots", "256"],
        Scenario::GpuBound | Scenario::Scale => vec!["--slots", "64", "--base-ms", "200"],
        Scenario::Deliberation => vec!["--slots", "64", "--base-ms", "500"],
    }
}

/// CPU seconds (user + system) of a process so far, from /proc.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
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

fn task(i: usize, prefix: &str, deliberate: bool) -> TaskEnvelope {
    let v = if deliberate {
        json!({"id": format!("{prefix}:{i}"), "kind": "deliberate", "input": {"role": "DEV", "task": format!("Plan change {i} to the billing export"), "agents": 3}})
    } else {
        json!({"id": format!("{prefix}:{i}"), "kind": "interpret", "input": {"message": format!("Abrí un trabajo para cambiar la bomba del pozo {i}")}})
    };
    flota_shared::envelope::validate_value(v).expect("bench tasks are valid")
}

async fn recorded(http: &reqwest::Client, api: &str) -> f64 {
    let Ok(r) = http.get(format!("{api}/metrics")).send().await else { return 0.0 };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("flota_results_recorded_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One measured run of a fleet of `workers`.
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
    let outcome = async {
        let http = reqwest::Client::new();
        let api = fleet.api_url();
        let deliberate = scenario == Scenario::Deliberation;
        let (_conn, mut results) = tap(&cfg, &prefix).await?;
        // Warm-up, not measured.
        let warm = (n / 10).clamp(10, 500);
        let warm_tasks: Vec<_> = (0..warm).map(|i| task(i, "warm", deliberate)).collect();
        submit::publish_all(&cfg, &warm_tasks, || {}).await?;
        let mut seen = 0;
        while seen < warm {
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(120), results.next()).await {
                seen += 1
            } else {
                anyhow::bail!("warm-up stalled")
            }
        }
        while recorded(&http, &api).await < warm as f64 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = http.post(format!("{}/admin/reset", fleet.gpu_url())).send().await;
        let pids: Vec<u32> = fleet.worker_pids().into_iter().chain([fleet.scheduler().pid()]).collect();
        let cpu_before: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();

        let tasks: Vec<_> = (0..n).map(|i| task(i, "m", deliberate)).collect();
        let started = Instant::now();
        let mut submitted: HashMap<String, Instant> = HashMap::new();
        let mut submit_ms = Vec::new();
        if scenario == Scenario::Producers {
            submit_ms = producers(&cfg, &api, &tasks).await?;
        } else {
            let publish = submit::publish_all(&cfg, &tasks, || {});
            let now = Instant::now();
            for t in &tasks {
                submitted.insert(t.id.clone(), now);
            }
            publish.await?;
        }
        let mut latencies = Vec::with_capacity(n);
        let mut got = std::collections::HashSet::new();
        while got.len() < n {
            match tokio::time::timeout(Duration::from_secs(300), results.next()).await {
                Ok(Some(Ok(d))) => {
                    let Ok(v) = serde_json::from_slice::<Value>(&d.data) else { continue };
                    let id = v["id"].as_str().unwrap_or("").to_string();
                    if id.starts_with("warm:") || !got.insert(id.clone()) {
                        continue;
                    }
                    let from = submitted.get(&id).copied().unwrap_or(started);
                    latencies.push(from.elapsed().as_secs_f64() * 1000.0);
                }
                _ => anyhow::bail!("stalled after {} of {n} results", got.len()),
            }
        }
        while recorded(&http, &api).await < (warm + n) as f64 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        let cpu: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - cpu_before;
        let stats: Value = http.get(format!("{}/stats", fleet.gpu_url())).send().await?.json().await?;
        latencies.sort_by(f64::total_cmp);
        submit_ms.sort_by(f64::total_cmp);
        anyhow::Ok(Figures {
            scenario: format!("{scenario:?}"),
            workers,
            concurrency,
            tasks: n,
            seconds,
            tasks_per_s: n as f64 / seconds,
            p50_ms: percentile(&latencies, 50.0),
            p90_ms: percentile(&latencies, 90.0),
            p99_ms: percentile(&latencies, 99.0),
            gpu_utilisation: stats["utilisation"].as_f64().unwrap_or(0.0),
            gpu_peak_in_flight: stats["peak_in_flight"].as_i64().unwrap_or(0),
            cpu_s_per_1000: cpu / n as f64 * 1000.0,
            worker_peak_rss_mb: fleet.worker_pids().into_iter().map(peak_rss_mb).collect(),
            submit_p50_ms: (!submit_ms.is_empty()).then(|| percentile(&submit_ms, 50.0)),
            submit_p99_ms: (!submit_ms.is_empty()).then(|| percentile(&submit_ms, 99.0)),
            ..Default::default()
        })
    }
    .await;
    let _ = fleet.stop().await;
    let _ = crate::fleet::cleanup_prefix(&cfg).await;
    outcome
}

/// 50 producers at once: half through the API, half straight to RabbitMQ; submit latencies in ms.
async fn producers(cfg: &Config, api: &str, tasks: &[TaskEnvelope]) -> anyhow::Result<Vec<f64>> {
    let chunks: Vec<Vec<TaskEnvelope>> =
        tasks.chunks(tasks.len().div_ceil(50).max(1)).map(|c| c.to_vec()).collect();
    let http = reqwest::Client::new();
    let runs = chunks.into_iter().enumerate().map(|(i, chunk)| {
        let (http, cfg) = (http.clone(), cfg.clone());
        let api = api.to_string();
        async move {
            let mut ms = Vec::new();
            for t in chunk {
                let at = Instant::now();
                if i % 2 == 0 {
                    let r = http
                        .post(format!("{api}/v1/tasks"))
                        .body(t.to_json())
                        .header("content-type", "application/json")
                        .send()
                        .await?;
                    anyhow::ensure!(r.status().as_u16() == 202, "API submit answered {}", r.status());
                } else {
                    submit::publish_all(&cfg, std::slice::from_ref(&t), || {}).await?;
                }
                ms.push(at.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(ms)
        }
    });
    let mut all = Vec::new();
    for r in futures::future::join_all(runs).await {
        all.extend(r?);
    }
    Ok(all)
}

pub async fn run(config: &Config, opts: Options) -> anyhow::Result<Vec<Figures>> {
    let worker_counts = if opts.scenario == Scenario::Scale { vec![1, 2, 4] } else { vec![opts.workers] };
    let mut all = Vec::new();
    for w in worker_counts {
        eprintln!(
            "bench {:?}: {} tasks, {w} worker(s), concurrency {} …",
            opts.scenario, opts.n, opts.concurrency
        );
        let mut f = measure(config, opts.scenario, w, opts.concurrency, opts.n).await?;
        if opts.ceiling {
            let gpu = crate::fleet::gpusim(&gpusim_args(opts.scenario), None).await?;
            let c =
                ceiling::run(config, &gpu.url(), opts.n as u64, opts.concurrency.saturating_mul(w as u16))
                    .await;
            let _ = gpu.terminate().await;
            let c = c?;
            let cps = c.tasks as f64 / c.elapsed.as_secs_f64();
            let ccpu = c.cpu_seconds / c.tasks as f64 * 1000.0;
            f.ceiling_tasks_per_s = Some(cps);
            f.ceiling_cpu_s_per_1000 = Some(ccpu);
            f.ratio_tasks_per_s = Some(f.tasks_per_s / cps);
            f.ratio_cpu_per_task = (ccpu > 0.0).then(|| f.cpu_s_per_1000 / ccpu);
        }
        all.push(f);
    }
    print(&all);
    if let Some(path) = &opts.json {
        std::fs::write(path, serde_json::to_vec_pretty(&all)?)?;
        eprintln!("figures written to {}", path.display());
    }
    Ok(all)
}

fn print(all: &[Figures]) {
    let opt =
        |v: Option<f64>, digits: usize| v.map(|x| format!("{x:.digits$}")).unwrap_or_else(|| "–".into());
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|f| {
            vec![
                f.scenario.clone(),
                f.workers.to_string(),
                f.tasks.to_string(),
                format!("{:.0}", f.tasks_per_s),
                format!("{:.0}/{:.0}/{:.0}", f.p50_ms, f.p90_ms, f.p99_ms),
                format!("{:.1}%", f.gpu_utilisation * 100.0),
                format!("{:.2}", f.cpu_s_per_1000),
                f.worker_peak_rss_mb.iter().map(|m| format!("{m:.0}")).collect::<Vec<_>>().join(","),
                opt(f.ceiling_tasks_per_s, 0),
                opt(f.ratio_tasks_per_s.map(|r| r * 100.0), 0),
                opt(f.ratio_cpu_per_task, 2),
                opt(f.submit_p99_ms, 1),
            ]
        })
        .collect();
    super::inspect::print_table(
        &[
            "scenario",
            "workers",
            "tasks",
            "tasks/s",
            "p50/p90/p99 ms",
            "GPU util",
            "CPU s/1k",
            "RSS MB",
            "ceiling/s",
            "% ceiling",
            "CPU ×ceiling",
            "submit p99 ms",
        ],
        &rows,
    );
}
