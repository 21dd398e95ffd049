//! `flotactl demo`: gpusim, the scheduler and workers as child processes on a
//! fresh prefix, a realistic mixed workload in Spanish and English through the
//! API, a progress bar, a summary; then everything stopped and cleaned up,
//! also on Ctrl-C.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use flota_shared::amqp::{self, Topology};
use flota_shared::config::Config;
use flota_shared::envelope::{DeliberateOutput, InterpretOutput, Kind, ResultEnvelope};

use super::workload;
use crate::fleet::{self, Fleet, FleetOptions};

/// Tasks per `POST /v1/tasks`.
const BATCH: usize = 200;
/// gpusim's latency model for the demo: quick, but not free.
const GPUSIM_ARGS: [&str; 4] = ["--base-ms", "15", "--per-token-ms", "0.05"];

/// p-th percentile (0..=100) of sorted values, nearest rank (pure).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

pub struct Options {
    pub interpretations: usize,
    pub workers: usize,
    pub keep: bool,
    pub timeout: Duration,
}

/// The demo was interrupted (Ctrl-C or SIGTERM); everything was stopped.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// A private queue that sees every result of the prefix from now on.
pub async fn tap(config: &Config, prefix: &str) -> anyhow::Result<(lapin::Connection, lapin::Consumer)> {
    let topo = Topology::new(prefix);
    let conn = amqp::connect(config, "flotactl tap").await?;
    let ch = conn.create_channel().await?;
    let q = ch
        .queue_declare(
            ShortString::from(""),
            QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    ch.queue_bind(
        q.name().clone(),
        ShortString::from(topo.results_exchange()),
        ShortString::from(""),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let consumer = ch
        .basic_consume(
            q.name().clone(),
            ShortString::from("tap"),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    Ok((conn, consumer))
}

/// What the results said, counted once per task id (pure).
#[derive(Debug, Default)]
pub struct Tally {
    pub seen: std::collections::HashSet<String>,
    pub by_status: BTreeMap<String, usize>,
    pub by_intent: BTreeMap<String, usize>,
    /// Deliberation id → (winner, the winner's score).
    pub winners: BTreeMap<String, (String, f64)>,
}

impl Tally {
    /// Count a result; `false` for an id already counted.
    pub fn add(&mut self, r: &ResultEnvelope) -> bool {
        if !self.seen.insert(r.id.clone()) {
            return false;
        }
        *self.by_status.entry(r.status.as_str().to_string()).or_default() += 1;
        match (r.kind, &r.output) {
            (Kind::Interpret, Some(o)) => {
                if let Ok(out) = serde_json::from_value::<InterpretOutput>(o.clone()) {
                    *self.by_intent.entry(out.intent.as_str().to_string()).or_default() += 1;
                }
            }
            (Kind::Deliberate, Some(o)) => {
                if let Ok(out) = serde_json::from_value::<DeliberateOutput>(o.clone()) {
                    let score = out.proposals.iter().find(|p| p.agent == out.winner).map(|p| p.score);
                    self.winners.insert(r.id.clone(), (out.winner, score.unwrap_or(0.0)));
                }
            }
            _ => {}
        }
        true
    }

    pub fn failed(&self) -> usize {
        self.by_status.get("failed").copied().unwrap_or(0)
    }
}

/// `a 3, b 4` (pure).
fn counts(map: &BTreeMap<String, usize>) -> String {
    if map.is_empty() {
        return "–".into();
    }
    map.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
}

/// Run the demo. Cancelling `cancel` (Ctrl-C) stops the children and cleans
/// up like a normal end, then returns [`Interrupted`].
pub async fn run(config: &Config, opts: Options, cancel: CancellationToken) -> anyhow::Result<()> {
    let prefix = format!("demo-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut fleet_opts = FleetOptions::new(config, &prefix, opts.workers);
    fleet_opts.gpusim_args = GPUSIM_ARGS.iter().map(|s| s.to_string()).collect();
    let cfg = fleet_opts.config.clone();
    eprintln!("Starting gpusim, the scheduler and {} workers on prefix {prefix} …", opts.workers);
    if let Some(dir) = &fleet_opts.log_dir {
        eprintln!("Logs of the children: {}", dir.display());
    }

    let started = tokio::select! {
        f = Fleet::start(fleet_opts) => f,
        // Dropping the half-started fleet kills what it started.
        _ = cancel.cancelled() => Err(Interrupted.into()),
    };
    let (outcome, fleet) = match started {
        Ok(fleet) => {
            let outcome = tokio::select! {
                r = workload(&cfg, &fleet, &opts) => r,
                _ = cancel.cancelled() => Err(Interrupted.into()),
            };
            (outcome, Some(fleet))
        }
        Err(e) => (Err(e), None),
    };

    let teardown = async {
        if let Some(fleet) = fleet {
            let codes = fleet.stop().await;
            let unclean: Vec<_> = codes.iter().filter(|(_, c)| *c != Some(0)).collect();
            if !unclean.is_empty() {
                eprintln!("warning: children exited uncleanly (None = killed): {unclean:?}");
            }
        }
        if opts.keep {
            eprintln!("Kept prefix {prefix}: FLOTA_PREFIX={prefix} flotactl queues");
        } else if let Err(e) = fleet::cleanup_prefix(&cfg).await {
            eprintln!("warning: could not clean up prefix {prefix}: {e:#}");
        }
    };
    tokio::select! {
        () = teardown => {}
        // A second Ctrl-C: stop waiting; dropping the fleet kills the children.
        _ = tokio::signal::ctrl_c() => eprintln!("interrupted again: children killed, prefix {prefix} left behind"),
    }
    outcome
}

async fn workload(cfg: &Config, fleet: &Fleet, opts: &Options) -> anyhow::Result<()> {
    // Bound before the first submit, so no result is missed.
    let (_tap_conn, mut results) = tap(cfg, fleet.prefix()).await?;
    let (tasks, deliberations) = workload::tasks(opts.interpretations);
    let total = tasks.len();
    let http = reqwest::Client::new();
    let api = fleet.api_url();
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} results  {per_sec}  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );

    let started = Instant::now();
    // Submitting and observing run together, so a result's latency is not
    // inflated by the batches submitted after its own.
    let submit = async {
        let mut submitted_at: HashMap<String, Instant> = HashMap::with_capacity(total);
        for chunk in tasks.chunks(BATCH) {
            let now = Instant::now();
            let r = http.post(format!("{api}/v1/tasks")).json(&chunk).send().await?;
            if r.status() != reqwest::StatusCode::ACCEPTED {
                anyhow::bail!("submit failed: {} {}", r.status(), r.text().await.unwrap_or_default());
            }
            for t in chunk {
                submitted_at.insert(t["id"].as_str().unwrap_or_default().to_string(), now);
            }
        }
        anyhow::Ok(submitted_at)
    };
    let observe = async {
        let mut tally = Tally::default();
        let mut arrived: Vec<(String, Instant)> = Vec::with_capacity(total);
        let deadline = tokio::time::Instant::now() + opts.timeout;
        while tally.seen.len() < total {
            let next = tokio::time::timeout_at(deadline, results.next()).await;
            let Ok(Some(Ok(d))) = next else {
                anyhow::bail!(
                    "only {} of {total} results within {} s (see the logs)",
                    tally.seen.len(),
                    opts.timeout.as_secs()
                );
            };
            let Ok(r) = serde_json::from_slice::<ResultEnvelope>(&d.data) else { continue };
            if tally.add(&r) {
                arrived.push((r.id, Instant::now()));
                bar.inc(1);
            }
        }
        anyhow::Ok((tally, arrived))
    };
    // The first error (a refused submit, the timeout) ends both.
    let (submitted_at, (tally, arrived)) = match tokio::try_join!(submit, observe) {
        Ok(both) => both,
        Err(e) => {
            bar.abandon();
            return Err(e);
        }
    };
    bar.finish_and_clear();
    let last = arrived.iter().map(|(_, at)| *at).max().unwrap_or(started);
    let elapsed = last.duration_since(started).as_secs_f64().max(1e-3);
    let mut latencies: Vec<f64> = arrived
        .iter()
        .filter_map(|(id, at)| Some(at.duration_since(*submitted_at.get(id)?).as_secs_f64() * 1000.0))
        .collect();
    latencies.sort_by(f64::total_cmp);

    println!();
    println!(
        "Flota demo: {total} tasks ({} interpretations, {} deliberations) on {} workers, prefix {}",
        opts.interpretations,
        deliberations.len(),
        opts.workers,
        fleet.prefix()
    );
    println!(
        "  throughput   {:.0} tasks/s  ({elapsed:.1} s from first submit to last result)",
        total as f64 / elapsed
    );
    println!(
        "  latency      p50 {:.0} ms   p99 {:.0} ms   (submit → result)",
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0)
    );
    println!("  status       {}", counts(&tally.by_status));
    println!("  intents      {}", counts(&tally.by_intent));
    println!("  deliberations");
    for (id, role) in &deliberations {
        match tally.winners.get(id) {
            Some((winner, score)) => println!("    {role:<10} winner {winner:<12} score {score:.1}"),
            None => println!("    {role:<10} no winner (failed)"),
        }
    }
    // The scheduler recorded them too (it may be a moment behind the tap).
    let (probe, _) = &deliberations[0];
    let status = recorded_status(&http, &api, probe).await;
    println!("  scheduler    GET /v1/tasks/{probe} → {status}");
    if status != "succeeded" {
        anyhow::bail!("the scheduler reports {probe} as {status}; see the logs");
    }
    if tally.failed() > 0 {
        anyhow::bail!("{} tasks failed; see the logs", tally.failed());
    }
    Ok(())
}

/// The status the scheduler serves for `id`, once final (or after ~10 s).
async fn recorded_status(http: &reqwest::Client, api: &str, id: &str) -> String {
    let mut status = String::from("unknown");
    for _ in 0..50 {
        if let Ok(r) = http.get(format!("{api}/v1/tasks/{id}")).send().await
            && let Ok(v) = r.json::<Value>().await
        {
            status = v["status"].as_str().unwrap_or("unknown").to_string();
            if status == "succeeded" || status == "failed" {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use flota_shared::envelope::{Status, Usage};

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 51.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    fn result(id: &str, kind: Kind, output: Value) -> ResultEnvelope {
        ResultEnvelope {
            v: 1,
            id: id.into(),
            kind,
            status: Status::Succeeded,
            output: Some(output),
            error: None,
            attempts: 1,
            worker: "w".into(),
            trace_id: "t".into(),
            started_at: String::new(),
            finished_at: String::new(),
            usage: Usage::default(),
            meta: Default::default(),
        }
    }

    #[test]
    fn the_tally_counts_each_id_once_and_finds_the_winners_score() {
        let mut t = Tally::default();
        let interp = serde_json::json!({"intent": "open_work", "confidence": 0.9,
            "work": {"title": "t", "summary": "s"}, "reply": null, "degraded": false});
        assert!(t.add(&result("a", Kind::Interpret, interp.clone())));
        assert!(!t.add(&result("a", Kind::Interpret, interp)));
        let delib = serde_json::json!({"winner": "DEV-2", "agents_failed": 0, "proposals": [
            {"agent": "DEV-1", "content": "x", "score": 9.5, "reviews": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}},
            {"agent": "DEV-2", "content": "y", "score": 8.0, "reviews": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}]});
        assert!(t.add(&result("d", Kind::Deliberate, delib)));
        assert_eq!(t.by_status.get("succeeded"), Some(&2));
        assert_eq!(t.by_intent.get("open_work"), Some(&1));
        assert_eq!(t.winners.get("d"), Some(&("DEV-2".to_string(), 8.0)));
        assert_eq!(t.failed(), 0);
        assert_eq!(counts(&t.by_intent), "open_work 1");
    }
}
