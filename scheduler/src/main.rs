//! flota-scheduler: read the settings (exit 64 on bad ones), start logging,
//! bind the API, consume results, run the dependency sweep; on SIGTERM/SIGINT
//! stop consuming, finish what is in hand, exit 0.

use std::io::Write;

use flota_scheduler::server;
use flota_scheduler::state::{AppState, REDIS_POOL_SIZE};
use flota_shared::config::{self, redact_url};
use flota_shared::{shutdown, store, telemetry};

/// How long the start waits for the broker to declare the topology before it
/// serves anyway (the results session declares it once the broker answers).
const DECLARE_AT_START_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = config::load_or_exit("flota-scheduler");
    let _telemetry = telemetry::init_with_config(&config, "flota-scheduler");
    let shutdown = shutdown::on_signal();
    let store = store::Store::new(store::pool(&config, REDIS_POOL_SIZE)?, &config.prefix);
    let state = AppState::new(config.clone(), store);

    // Before the line below: a producer that waits for it may publish `plan.approved` at once.
    flota_scheduler::results::declare_at_start(&config, state.broker.topology(), DECLARE_AT_START_WITHIN)
        .await;
    let listener = tokio::net::TcpListener::bind(config.http_addr).await?;
    let addr = listener.local_addr()?;
    tracing::info!(
        message = "Serving the API.",
        addr = %addr,
        prefix = %config.prefix,
        amqp = %redact_url(&config.amqp_url),
        redis = %redact_url(&config.redis_url),
    );
    // Parents (demo, tests) read this line to find the port.
    println!("flota-scheduler listening on http://{addr}");
    std::io::stdout().flush()?;

    server::run(state, listener, shutdown).await?;
    tracing::info!(message = "Scheduler stopped.");
    Ok(())
}
