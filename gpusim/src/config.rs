//! Command-line flags (each also read from `GPUSIM_<NAME>`) and the [`Config`] they become.

use std::net::SocketAddr;

use clap::Parser;

use crate::faults::Faults;

const DEFAULT_MODEL: &str = "flota-sim-1";
const DEFAULT_SLOTS: usize = 64;
const DEFAULT_MAX_CONTEXT_CHARS: usize = 200_000;
const DEFAULT_SEED: u64 = 42;
/// More permits than this would make `tokio::sync::Semaphore::new` panic; no GPU has that many anyway.
const MAX_SLOTS: usize = 1_000_000;

#[derive(Debug, Clone, Parser)]
#[command(name = "flota-gpusim", version, about = "OpenAI-compatible GPU-server simulator for Flota")]
pub struct Args {
    /// Address to listen on; port 0 picks a free port (read it from the stdout line).
    #[arg(long, env = "GPUSIM_ADDR", default_value = "127.0.0.1:8000")]
    pub addr: SocketAddr,
    /// The only model name accepted; any other gets 404 like vLLM.
    #[arg(long, env = "GPUSIM_MODEL", default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Requests in service at once (continuous batching); the rest wait in FIFO order.
    #[arg(long, env = "GPUSIM_SLOTS", default_value_t = DEFAULT_SLOTS, value_parser = parse_slots)]
    pub slots: usize,
    /// Fixed service time per request, in milliseconds.
    #[arg(long, env = "GPUSIM_BASE_MS", default_value_t = 0)]
    pub base_ms: u64,
    /// Service time per completion token, in milliseconds.
    #[arg(long, env = "GPUSIM_PER_TOKEN_MS", default_value_t = 0.0, value_parser = parse_ms)]
    pub per_token_ms: f64,
    /// Probability of a 500.
    #[arg(long, env = "GPUSIM_ERROR_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub error_rate: f64,
    /// Probability of a 429.
    #[arg(long = "rate-429", env = "GPUSIM_RATE_429", default_value_t = 0.0, value_parser = parse_rate)]
    pub rate_429: f64,
    /// `Retry-After` sent with 429s; 0 sends none.
    #[arg(long, env = "GPUSIM_RETRY_AFTER_SECS", default_value_t = 1)]
    pub retry_after_secs: u64,
    /// Probability of a 400.
    #[arg(long = "rate-400", env = "GPUSIM_RATE_400", default_value_t = 0.0, value_parser = parse_rate)]
    pub rate_400: f64,
    /// Probability of accepting a request and never answering.
    #[arg(long, env = "GPUSIM_HANG_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub hang_rate: f64,
    /// Probability of adding `--slow-ms` to a request's service time.
    #[arg(long, env = "GPUSIM_SLOW_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub slow_rate: f64,
    /// Milliseconds added to a slow request's service time.
    #[arg(long, env = "GPUSIM_SLOW_MS", default_value_t = 5000)]
    pub slow_ms: u64,
    /// Probability of schema-invalid output (wrong enum, extra field, or not JSON).
    #[arg(long, env = "GPUSIM_INVALID_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub invalid_rate: f64,
    /// Requests whose OpenAI `user` field is NAME get 500 (repeatable; env: comma-separated).
    #[arg(long = "fail-user", env = "GPUSIM_FAIL_USER", value_name = "NAME", value_delimiter = ',')]
    pub fail_users: Vec<String>,
    /// Requests whose `user` is NAME get schema-invalid output (repeatable; env: comma-separated).
    #[arg(long = "invalid-user", env = "GPUSIM_INVALID_USER", value_name = "NAME", value_delimiter = ',')]
    pub invalid_users: Vec<String>,
    /// Requests whose messages hold more characters than this get 400 (context too long).
    #[arg(long, env = "GPUSIM_MAX_CONTEXT_CHARS", default_value_t = DEFAULT_MAX_CONTEXT_CHARS)]
    pub max_context_chars: usize,
    /// Seed for the fault draws, so a run can be replayed.
    #[arg(long, env = "GPUSIM_SEED", default_value_t = DEFAULT_SEED)]
    pub seed: u64,
    /// When set, requests without `Authorization: Bearer KEY` get 401.
    #[arg(long, env = "GPUSIM_API_KEY")]
    pub api_key: Option<String>,
}

/// Everything [`crate::serve`] needs; the fault part can change at runtime.
#[derive(Debug, Clone)]
pub struct Config {
    pub model: String,
    pub slots: usize,
    pub max_context_chars: usize,
    pub seed: u64,
    pub api_key: Option<String>,
    pub faults: Faults,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            model: DEFAULT_MODEL.to_string(),
            slots: DEFAULT_SLOTS,
            max_context_chars: DEFAULT_MAX_CONTEXT_CHARS,
            seed: DEFAULT_SEED,
            api_key: None,
            faults: Faults::default(),
        }
    }
}

impl From<Args> for Config {
    fn from(a: Args) -> Config {
        Config {
            model: a.model,
            slots: a.slots,
            max_context_chars: a.max_context_chars,
            seed: a.seed,
            api_key: a.api_key.filter(|k| !k.is_empty()),
            faults: Faults {
                error_rate: a.error_rate,
                rate_429: a.rate_429,
                rate_400: a.rate_400,
                hang_rate: a.hang_rate,
                slow_rate: a.slow_rate,
                invalid_rate: a.invalid_rate,
                slow_ms: a.slow_ms,
                retry_after_secs: a.retry_after_secs,
                fail_users: a.fail_users,
                invalid_users: a.invalid_users,
                base_ms: a.base_ms,
                per_token_ms: a.per_token_ms,
            },
        }
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    crate::faults::check_rate(v)
}

fn parse_ms(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    crate::faults::check_ms(v)
}

fn parse_slots(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=MAX_SLOTS).contains(&n) => Ok(n),
        _ => Err(format!("expected an integer between 1 and {MAX_SLOTS}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_config_default() {
        let c = Config::from(Args::try_parse_from(["flota-gpusim"]).unwrap());
        let d = Config::default();
        assert_eq!(c.model, d.model);
        assert_eq!(c.slots, d.slots);
        assert_eq!(c.max_context_chars, d.max_context_chars);
        assert_eq!(c.faults.slow_ms, 5000);
        assert_eq!(c.faults.retry_after_secs, 1);
    }

    #[test]
    fn flags_parse_and_are_checked() {
        let a = Args::try_parse_from([
            "flota-gpusim",
            "--fail-user",
            "DEV-1",
            "--fail-user",
            "DEV-2",
            "--rate-429",
            "0.5",
            "--per-token-ms",
            "0.25",
        ])
        .unwrap();
        assert_eq!(a.fail_users, ["DEV-1", "DEV-2"]);
        assert_eq!(a.rate_429, 0.5);
        assert!(Args::try_parse_from(["flota-gpusim", "--error-rate", "1.5"]).is_err());
        assert!(Args::try_parse_from(["flota-gpusim", "--per-token-ms", "-1"]).is_err());
        assert!(Args::try_parse_from(["flota-gpusim", "--slots", "0"]).is_err());
    }
}
