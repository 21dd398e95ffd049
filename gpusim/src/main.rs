//! flota-gpusim: parse flags, bind, print the listening line, serve until SIGTERM or SIGINT.

use std::io::{IsTerminal, Write};

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

/// The exit code of a bad setting, as for every Flota process (clap's own is 2).
const EXIT_CONFIG: i32 = 64;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = match flota_gpusim::Args::try_parse() {
        Ok(args) => args,
        // A bad flag or GPUSIM_* value: clap's message, then the contract's exit code.
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            std::process::exit(EXIT_CONFIG);
        }
        // --help, --version.
        Err(e) => e.exit(),
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    // Installed before the listening line, so a parent that signals right after reading it is heard.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    let addr = listener.local_addr()?;
    // Parents (demo, tests, benchmarks) read this one line to learn the port.
    let mut out = std::io::stdout().lock();
    writeln!(out, "flota-gpusim listening on http://{addr}")?;
    out.flush()?;
    drop(out);
    let config = flota_gpusim::Config::from(args);
    tracing::info!(%addr, model = %config.model, slots = config.slots, faults = ?config.faults, "serving");
    flota_gpusim::serve(listener, config, async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    })
    .await?;
    tracing::info!("stopped");
    Ok(())
}
