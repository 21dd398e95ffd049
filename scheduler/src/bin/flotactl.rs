//! flotactl: the operator's and producer's CLI. Settings from the same
//! environment variables as every Flota process (exit 64 on bad ones).

use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use flota_scheduler::ctl::{bench, councils, demo, dlq, inspect, submit};
use flota_shared::{config, shutdown, store, telemetry};

#[derive(Parser)]
#[command(
    name = "flotactl",
    version,
    about = "Operate a Flota fleet: submit, inspect, dead letters, councils, demo, bench"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Submit tasks straight to RabbitMQ: one envelope, a JSON array, or JSONL, from FILE or stdin.
    Submit { file: Option<String> },
    /// A task's status and result (from Redis; works without the scheduler).
    Status {
        id: String,
        /// Wait until it succeeded or failed.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Depth and consumers of every queue under the prefix.
    Queues {
        #[arg(long)]
        json: bool,
    },
    /// Live workers from their heartbeats.
    Workers {
        #[arg(long)]
        json: bool,
    },
    /// Dead letters: list, show, replay, purge.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Councils of agents per role.
    Councils {
        #[command(subcommand)]
        action: CouncilAction,
    },
    /// Start gpusim, a scheduler and workers, run a mixed workload, print a summary.
    Demo {
        #[arg(long, default_value_t = 2000)]
        interpretations: usize,
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Keep the demo's queues and Redis keys.
        #[arg(long)]
        keep: bool,
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Measure a scenario end to end (optionally beside the raw lapin ceiling).
    Bench {
        #[arg(long, value_enum, default_value = "overhead")]
        scenario: bench::Scenario,
        #[arg(long, default_value_t = 5000)]
        n: usize,
        #[arg(long, default_value_t = 32)]
        concurrency: u16,
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Also run the minimal lapin loop and print ratios.
        #[arg(long)]
        ceiling: bool,
        /// Run only the minimal lapin loop (for a profiler: `ops/bench-instructions.sh`).
        #[arg(long, conflicts_with_all = ["ceiling", "api"])]
        ceiling_only: bool,
        /// Measure this many times (Flota and the ceiling alternating which goes
        /// first) and add a row of medians: one pair of runs on a shared machine
        /// can be off by a third.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=100))]
        repeat: u16,
        /// Write the figures as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
        /// Measure the fleet already running under FLOTA_PREFIX, through its
        /// scheduler's API at this URL, instead of starting one.
        #[arg(long, value_name = "URL")]
        api: Option<String>,
        /// With --api: the GPU server's URL, for utilisation from gpusim's /stats.
        #[arg(long, value_name = "URL", requires = "api")]
        gpu: Option<String>,
        /// With --api: the scheduler's pid on this host, to count its CPU.
        #[arg(long, requires = "api")]
        scheduler_pid: Option<u32>,
    },
}

#[derive(Subcommand)]
enum DlqAction {
    List {
        #[arg(long)]
        json: bool,
    },
    Show {
        id: String,
    },
    /// Republish one dead letter (by id), or all of them, to P.tasks.
    Replay {
        id: Option<String>,
        #[arg(long)]
        all: bool,
    },
    Purge,
}

#[derive(Subcommand)]
enum CouncilAction {
    List,
    Show {
        role: String,
    },
    /// Set a council from a JSON file (or - for stdin): {"agents": [{"persona": "...", "temperature": 0.7, "model": null}]}
    Set {
        role: String,
        file: String,
    },
    Delete {
        role: String,
    },
}

fn read_input(file: Option<&str>) -> anyhow::Result<String> {
    let mut text = String::new();
    match file {
        None | Some("-") => {
            std::io::stdin().read_to_string(&mut text)?;
        }
        Some(path) => text = std::fs::read_to_string(path)?,
    }
    Ok(text)
}

/// With `RUST_LOG` set, logs as every Flota process does. Without it, only
/// warnings: a CLI's stderr is for its user's answers, and lapin reports every
/// channel the broker closes (the passive declare of a queue not yet declared)
/// as an error.
fn init_logs(format: config::LogFormat) {
    if std::env::var_os("RUST_LOG").is_some() {
        return telemetry::init(format);
    }
    let filter = tracing_subscriber::EnvFilter::new("warn,lapin=off");
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        config::LogFormat::Json => builder.json().try_init(),
        config::LogFormat::Text => builder.try_init(),
    };
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = config::load_or_exit("flotactl");
    init_logs(config.log_format);
    match run(cli, config).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("flotactl: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli, config: config::Config) -> anyhow::Result<ExitCode> {
    let store = || -> anyhow::Result<store::Store> {
        Ok(store::Store::new(store::pool(&config, 4)?, &config.prefix))
    };
    match cli.command {
        Command::Submit { file } => {
            let text = read_input(file.as_deref())?;
            let (tasks, problems) = submit::validate(submit::split_input(&text));
            for p in &problems {
                eprintln!("{p}");
            }
            let bar = if tasks.len() > 100 {
                indicatif::ProgressBar::new(tasks.len() as u64)
            } else {
                indicatif::ProgressBar::hidden()
            };
            let published = match submit::publish_all(&config, &tasks, || bar.inc(1)).await {
                Ok(n) => n,
                Err(e) => {
                    bar.abandon();
                    eprintln!("flotactl: broker failure: {e:#}");
                    return Ok(ExitCode::from(69));
                }
            };
            bar.finish_and_clear();
            println!("published {published}, rejected {}", problems.len());
            Ok(if problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(65) })
        }
        Command::Status { id, wait, timeout } => {
            let (body, finished) =
                inspect::status(&store()?, &id, wait, Duration::from_secs(timeout)).await?;
            println!("{}", serde_json::to_string_pretty(&body)?);
            Ok(match (body["status"].as_str(), wait, finished) {
                (Some("unknown"), false, _) => ExitCode::from(3),
                (_, true, false) => ExitCode::from(1),
                _ => ExitCode::SUCCESS,
            })
        }
        Command::Queues { json } => {
            let q = inspect::queues(&config).await?;
            if json {
                let v: Vec<_> = q
                    .iter()
                    .map(|(n, m, c)| serde_json::json!({"name": n, "messages": m, "consumers": c}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let rows: Vec<Vec<String>> =
                    q.iter().map(|(n, m, c)| vec![n.clone(), m.to_string(), c.to_string()]).collect();
                inspect::print_table(&["queue", "messages", "consumers"], &rows);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Workers { json } => {
            let list = inspect::workers(&store()?).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let s =
                    |v: &serde_json::Value| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|w| {
                        vec![
                            s(&w["id"]),
                            s(&w["host"]),
                            format!("{}/{}", w["in_flight"], w["concurrency"]),
                            s(&w["breaker"]),
                            s(&w["last_heartbeat"]),
                        ]
                    })
                    .collect();
                inspect::print_table(&["worker", "host", "in flight", "breaker", "last heartbeat"], &rows);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq { action } => {
            match action {
                DlqAction::List { json } => {
                    let list = dlq::walk(&config, dlq::Action::List).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&list)?);
                    } else {
                        let rows: Vec<Vec<String>> = list
                            .iter()
                            .map(|d| {
                                vec![
                                    d["id"].as_str().unwrap_or("-").to_string(),
                                    d["reason"].as_str().unwrap_or("").to_string(),
                                    d["error"].as_str().unwrap_or("").chars().take(80).collect(),
                                    d["bytes"].to_string(),
                                ]
                            })
                            .collect();
                        inspect::print_table(&["id", "reason", "error", "bytes"], &rows);
                    }
                }
                DlqAction::Show { id } => {
                    let found = dlq::walk(&config, dlq::Action::Show(&id)).await?;
                    if found.is_empty() {
                        eprintln!("no dead letter with id {id}");
                        return Ok(ExitCode::from(3));
                    }
                    println!("{}", serde_json::to_string_pretty(&found)?);
                }
                DlqAction::Replay { id, all } => {
                    if id.is_none() && !all {
                        anyhow::bail!("say which: `flotactl dlq replay ID` or `flotactl dlq replay --all`");
                    }
                    let store = store()?;
                    let done = dlq::walk(&config, dlq::Action::Replay(id.as_deref(), &store)).await?;
                    let replayed = done.iter().filter(|d| d.get("replayed").is_none()).count();
                    println!("replayed {replayed}");
                    for d in done.iter().filter(|d| d.get("revived").is_some()) {
                        eprintln!("{} runs again with its failed dependents: {}", d["id"], d["revived"]);
                    }
                    for d in done.iter().filter(|d| d["rerun"] == false) {
                        eprintln!("{} had succeeded: its result is re-reported, not run again", d["id"]);
                    }
                    for d in done.iter().filter(|d| d.get("replayed").is_some()) {
                        eprintln!("not replayed {}: {}", d["id"], d["why"]);
                    }
                }
                DlqAction::Purge => println!("purged {}", dlq::purge(&config).await?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Councils { action } => {
            let store = store()?;
            match action {
                CouncilAction::List => {
                    for c in store.councils().await? {
                        println!("{:<12} {} agents", c.role, c.agents.len());
                    }
                }
                CouncilAction::Show { role } => match store.council(&role).await? {
                    Some(c) => println!("{}", serde_json::to_string_pretty(&c)?),
                    None => {
                        eprintln!("no council for role {role}");
                        return Ok(ExitCode::from(3));
                    }
                },
                CouncilAction::Set { role, file } => {
                    let c = councils::set(&store, &role, &read_input(Some(&file))?).await?;
                    println!("council {} set with {} agents", c.role, c.agents.len());
                }
                CouncilAction::Delete { role } => {
                    if store.delete_council(&role).await? {
                        println!("council {role} deleted");
                    } else {
                        eprintln!("no stored council for role {role}");
                        return Ok(ExitCode::from(3));
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { interpretations, workers, keep, timeout } => {
            let opts =
                demo::Options { interpretations, workers, keep, timeout: Duration::from_secs(timeout) };
            // Ctrl-C or SIGTERM: the demo stops its children and cleans up before returning.
            let cancel = shutdown::on_signal();
            match demo::run(&config, opts, cancel).await {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(e) if e.is::<demo::Interrupted>() => {
                    eprintln!("flotactl: demo interrupted; everything it started was stopped");
                    Ok(ExitCode::from(130))
                }
                Err(e) => Err(e),
            }
        }
        Command::Bench {
            scenario,
            n,
            concurrency,
            workers,
            ceiling,
            ceiling_only,
            repeat,
            json,
            api,
            gpu,
            scheduler_pid,
        } => {
            let attach = api.map(|api| bench::Attach { api, gpu, scheduler_pid });
            let opts = bench::Options {
                scenario,
                n,
                concurrency,
                workers,
                ceiling,
                ceiling_only,
                repeat: repeat.into(),
                json,
                attach,
            };
            tokio::select! {
                r = bench::run(&config, opts) => { r?; Ok(ExitCode::SUCCESS) }
                _ = tokio::signal::ctrl_c() => Ok(ExitCode::from(130)),
            }
        }
    }
}
