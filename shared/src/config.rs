//! Settings from the environment, per the wire contract.
//!
//! Every variable has an `ENV_*` name beside a `DEFAULT_*` value. Parsing reads
//! *all* variables before failing, so one run reports every bad setting; the
//! binaries turn that into one message and exit code 64 ([`load_or_exit`]).

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

pub const ENV_AMQP_URL: &str = "FLOTA_AMQP_URL";
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const ENV_REDIS_URL: &str = "FLOTA_REDIS_URL";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";
pub const ENV_PREFIX: &str = "FLOTA_PREFIX";
pub const DEFAULT_PREFIX: &str = "flota";
pub const ENV_GPU_URL: &str = "FLOTA_GPU_URL";
pub const DEFAULT_GPU_URL: &str = "http://127.0.0.1:8000";
pub const ENV_GPU_MODEL: &str = "FLOTA_GPU_MODEL";
pub const ENV_GPU_API_KEY: &str = "FLOTA_GPU_API_KEY";
pub const ENV_CONCURRENCY: &str = "FLOTA_CONCURRENCY";
pub const DEFAULT_CONCURRENCY: u16 = 32;
pub const ENV_HTTP_ADDR: &str = "FLOTA_HTTP_ADDR";
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8080";
pub const ENV_METRICS_ADDR: &str = "FLOTA_METRICS_ADDR";
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";
pub const ENV_API_TOKEN: &str = "FLOTA_API_TOKEN";
/// `true`: the dashboard and the read routes need the token too (probes stay open).
pub const ENV_API_PROTECT_READS: &str = "FLOTA_API_PROTECT_READS";
pub const ENV_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
// Flota's own settings beyond the contract's table.
pub const ENV_LOG_FORMAT: &str = "FLOTA_LOG_FORMAT";
pub const ENV_SHUTDOWN_GRACE: &str = "FLOTA_SHUTDOWN_GRACE";
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 30;
pub const ENV_GPU_TIMEOUT_MS: &str = "FLOTA_GPU_TIMEOUT_MS";
pub const DEFAULT_GPU_TIMEOUT_MS: u64 = 30_000;
pub const ENV_GPU_RETRIES: &str = "FLOTA_GPU_RETRIES";
pub const DEFAULT_GPU_RETRIES: u32 = 3;
pub const ENV_GPU_MAX_INFLIGHT: &str = "FLOTA_GPU_MAX_INFLIGHT";
pub const ENV_OUTPUT_RETRIES: &str = "FLOTA_OUTPUT_RETRIES";
pub const DEFAULT_OUTPUT_RETRIES: u32 = 2;
pub const ENV_MAX_ATTEMPTS: &str = "FLOTA_MAX_ATTEMPTS";
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
pub const ENV_DELIVERY_LIMIT: &str = "FLOTA_DELIVERY_LIMIT";
pub const DEFAULT_DELIVERY_LIMIT: u32 = 20;
pub const ENV_LOCK_LEASE_MS: &str = "FLOTA_LOCK_LEASE_MS";
pub const DEFAULT_LOCK_LEASE_MS: u64 = 30_000;
pub const ENV_DEPENDENCY_TIMEOUT_MS: &str = "FLOTA_DEPENDENCY_TIMEOUT_MS";
pub const DEFAULT_DEPENDENCY_TIMEOUT_MS: u64 = 60 * 60 * 1000;
pub const ENV_RESULT_TTL_MS: &str = "FLOTA_RESULT_TTL_MS";
/// A recorded task's state is kept a week by default (0 = for ever).
pub const DEFAULT_RESULT_TTL_MS: u64 = 7 * 24 * 3_600_000;
pub const ENV_WORKER_ID: &str = "FLOTA_WORKER_ID";
pub const ENV_TLS_CA_FILE: &str = "FLOTA_TLS_CA_FILE";
pub const ENV_TLS_CERT_FILE: &str = "FLOTA_TLS_CERT_FILE";
pub const ENV_TLS_KEY_FILE: &str = "FLOTA_TLS_KEY_FILE";

/// Exit code for a bad configuration (BSD `EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone)]
pub struct Config {
    pub amqp_url: String,
    pub redis_url: String,
    pub prefix: String,
    pub gpu_url: String,
    pub gpu_model: Option<String>,
    pub gpu_api_key: Option<String>,
    pub concurrency: u16,
    pub http_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub api_token: Option<String>,
    /// The dashboard, `GET /v1/*` and `/metrics` need the token too.
    pub api_protect_reads: bool,
    pub otlp_endpoint: Option<String>,
    pub log_format: LogFormat,
    pub shutdown_grace: Duration,
    pub gpu_timeout: Duration,
    pub gpu_retries: u32,
    /// Fleet-wide cap on GPU requests in flight; `None` = no cap.
    pub gpu_max_inflight: Option<u32>,
    pub output_retries: u32,
    pub max_attempts: u32,
    pub delivery_limit: u32,
    pub lock_lease: Duration,
    pub dependency_timeout: Duration,
    /// How long the scheduler keeps a task's state once its result is recorded;
    /// `None` = for ever (`FLOTA_RESULT_TTL_MS=0`).
    pub result_ttl: Option<Duration>,
    pub worker_id: String,
    pub tls_ca_file: Option<String>,
    pub tls_cert_file: Option<String>,
    pub tls_key_file: Option<String>,
}

// Secrets never reach logs, so Debug redacts them.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("amqp_url", &redact_url(&self.amqp_url))
            .field("redis_url", &redact_url(&self.redis_url))
            .field("prefix", &self.prefix)
            .field("gpu_url", &redact_url(&self.gpu_url))
            .field("gpu_model", &self.gpu_model)
            .field("gpu_api_key", &self.gpu_api_key.as_ref().map(|_| "<redacted>"))
            .field("concurrency", &self.concurrency)
            .field("http_addr", &self.http_addr)
            .field("metrics_addr", &self.metrics_addr)
            .field("api_token", &self.api_token.as_ref().map(|_| "<redacted>"))
            .field("worker_id", &self.worker_id)
            .finish_non_exhaustive()
    }
}

/// Every bad variable, with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<(String, String)>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(var, why)| format!("{var}: {why}")).collect();
        write!(f, "invalid configuration: {}", parts.join("; "))
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    pub fn from_env() -> Result<Config, ConfigErrors> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Parse from any lookup (tests pass a map; no `set_var`).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
        let mut errs = Vec::new();
        let mut bad = |var: &str, why: String| errs.push((var.to_string(), why));
        let get = |name: &str| get(name).filter(|v| !v.trim().is_empty());

        let amqp_url = get(ENV_AMQP_URL).unwrap_or_else(|| DEFAULT_AMQP_URL.into());
        if !(amqp_url.starts_with("amqp://") || amqp_url.starts_with("amqps://")) {
            bad(ENV_AMQP_URL, format!("`{}` is not an amqp:// or amqps:// URL", redact_url(&amqp_url)));
        }
        let redis_url = get(ENV_REDIS_URL).unwrap_or_else(|| DEFAULT_REDIS_URL.into());
        if !(redis_url.starts_with("redis://") || redis_url.starts_with("rediss://")) {
            bad(ENV_REDIS_URL, format!("`{}` is not a redis:// or rediss:// URL", redact_url(&redis_url)));
        }
        let prefix = get(ENV_PREFIX).unwrap_or_else(|| DEFAULT_PREFIX.into());
        if !is_valid_prefix(&prefix) {
            bad(ENV_PREFIX, format!("`{prefix}` must be 1-64 characters of [A-Za-z0-9_.-]"));
        }
        let gpu_url = get(ENV_GPU_URL).unwrap_or_else(|| DEFAULT_GPU_URL.into());
        if !(gpu_url.starts_with("http://") || gpu_url.starts_with("https://")) {
            bad(ENV_GPU_URL, format!("`{}` is not an http(s):// URL", redact_url(&gpu_url)));
        } else if let Err(e) = url::Url::parse(&gpu_url) {
            // Checked here, with the others, rather than on the first call (`http://` has no host).
            bad(ENV_GPU_URL, format!("`{}` is not a usable URL: {e}", redact_url(&gpu_url)));
        }
        let concurrency = parse_num::<u16>(get(ENV_CONCURRENCY), DEFAULT_CONCURRENCY, 1, 4096)
            .unwrap_or_else(|why| {
                bad(ENV_CONCURRENCY, why);
                DEFAULT_CONCURRENCY
            });
        let http_addr = parse_addr(get(ENV_HTTP_ADDR), DEFAULT_HTTP_ADDR).unwrap_or_else(|why| {
            bad(ENV_HTTP_ADDR, why);
            fallback_addr()
        });
        let metrics_addr = parse_addr(get(ENV_METRICS_ADDR), DEFAULT_METRICS_ADDR).unwrap_or_else(|why| {
            bad(ENV_METRICS_ADDR, why);
            fallback_addr()
        });
        let log_format = match get(ENV_LOG_FORMAT).as_deref() {
            None | Some("text") | Some("pretty") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                bad(ENV_LOG_FORMAT, format!("`{other}` must be `text` or `json`"));
                LogFormat::Text
            }
        };
        let mut secs = |var: &str, default: u64, min: u64, max: u64| {
            parse_num::<u64>(get(var), default, min, max).unwrap_or_else(|why| {
                bad(var, why);
                default
            })
        };
        let shutdown_grace =
            Duration::from_secs(secs(ENV_SHUTDOWN_GRACE, DEFAULT_SHUTDOWN_GRACE_SECS, 0, 3600));
        let gpu_timeout =
            Duration::from_millis(secs(ENV_GPU_TIMEOUT_MS, DEFAULT_GPU_TIMEOUT_MS, 1, 3_600_000));
        let gpu_retries = secs(ENV_GPU_RETRIES, DEFAULT_GPU_RETRIES as u64, 0, 20) as u32;
        let gpu_max_inflight = match secs(ENV_GPU_MAX_INFLIGHT, 0, 0, 1_000_000) {
            0 => None,
            n => Some(n as u32),
        };
        let output_retries = secs(ENV_OUTPUT_RETRIES, DEFAULT_OUTPUT_RETRIES as u64, 0, 10) as u32;
        let max_attempts = secs(ENV_MAX_ATTEMPTS, DEFAULT_MAX_ATTEMPTS as u64, 1, 100) as u32;
        let delivery_limit = secs(ENV_DELIVERY_LIMIT, DEFAULT_DELIVERY_LIMIT as u64, 1, 1000) as u32;
        let lock_lease =
            Duration::from_millis(secs(ENV_LOCK_LEASE_MS, DEFAULT_LOCK_LEASE_MS, 100, 3_600_000));
        let dependency_timeout = Duration::from_millis(secs(
            ENV_DEPENDENCY_TIMEOUT_MS,
            DEFAULT_DEPENDENCY_TIMEOUT_MS,
            1,
            30 * 24 * 3_600_000,
        ));
        let result_ttl = match secs(ENV_RESULT_TTL_MS, DEFAULT_RESULT_TTL_MS, 0, 10 * 365 * 24 * 3_600_000) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        };
        let worker_id = get(ENV_WORKER_ID)
            .unwrap_or_else(|| format!("worker-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
        if !crate::envelope::is_valid_id(&worker_id) {
            bad(ENV_WORKER_ID, "must be 1-128 characters of [A-Za-z0-9._:-]".into());
        }
        let file = |var: &str, bad: &mut dyn FnMut(&str, String)| {
            let path = get(var)?;
            if std::path::Path::new(&path).is_file() {
                Some(path)
            } else {
                bad(var, format!("`{path}` is not a readable file"));
                None
            }
        };
        let tls_ca_file = file(ENV_TLS_CA_FILE, &mut bad);
        let tls_cert_file = file(ENV_TLS_CERT_FILE, &mut bad);
        let tls_key_file = file(ENV_TLS_KEY_FILE, &mut bad);
        if tls_cert_file.is_some() != tls_key_file.is_some() {
            bad(ENV_TLS_KEY_FILE, format!("{ENV_TLS_CERT_FILE} and {ENV_TLS_KEY_FILE} go together"));
        }

        let api_token = get(ENV_API_TOKEN);
        let api_protect_reads = match get(ENV_API_PROTECT_READS).as_deref().map(str::trim) {
            None | Some("false" | "0" | "no") => false,
            Some("true" | "1" | "yes") => true,
            Some(other) => {
                bad(ENV_API_PROTECT_READS, format!("`{other}` must be `true` or `false`"));
                false
            }
        };
        if api_protect_reads && api_token.is_none() {
            bad(ENV_API_PROTECT_READS, format!("protecting reads needs {ENV_API_TOKEN}"));
        }

        if !errs.is_empty() {
            return Err(ConfigErrors(errs));
        }
        Ok(Config {
            amqp_url,
            redis_url,
            prefix,
            gpu_url: gpu_url.trim_end_matches('/').to_string(),
            gpu_model: get(ENV_GPU_MODEL),
            gpu_api_key: get(ENV_GPU_API_KEY),
            concurrency,
            http_addr,
            metrics_addr,
            api_token,
            api_protect_reads,
            otlp_endpoint: get(ENV_OTLP_ENDPOINT),
            log_format,
            shutdown_grace,
            gpu_timeout,
            gpu_retries,
            gpu_max_inflight,
            output_retries,
            max_attempts,
            delivery_limit,
            lock_lease,
            dependency_timeout,
            result_ttl,
            worker_id,
            tls_ca_file,
            tls_cert_file,
            tls_key_file,
        })
    }
}

/// Load the configuration or stop the process with one message naming every
/// bad variable and exit code 64.
pub fn load_or_exit(process: &str) -> Config {
    match Config::from_env() {
        Ok(c) => c,
        Err(errs) => {
            eprintln!("{process}: {errs}");
            std::process::exit(EXIT_CONFIG);
        }
    }
}

pub fn is_valid_prefix(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 64
        && p.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn parse_num<T>(raw: Option<String>, default: T, min: T, max: T) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
{
    let Some(raw) = raw else { return Ok(default) };
    match raw.trim().parse::<T>() {
        Ok(n) if n >= min && n <= max => Ok(n),
        _ => Err(format!("`{raw}` must be an integer in {min}..={max}")),
    }
}

fn parse_addr(raw: Option<String>, default: &str) -> Result<SocketAddr, String> {
    let raw = raw.unwrap_or_else(|| default.to_string());
    raw.parse::<SocketAddr>().map_err(|_| format!("`{raw}` is not an IP:PORT address"))
}

fn fallback_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Hide the password of a URL (`scheme://user:***@host`), for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        None => url.to_string(),
        Some(at) => {
            let userinfo = &authority[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}://{}:***@{}", &url[..scheme_end], user, &rest[at + 1..])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(vars: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_follow_the_contract() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.amqp_url, DEFAULT_AMQP_URL);
        assert_eq!(c.redis_url, DEFAULT_REDIS_URL);
        assert_eq!(c.prefix, "flota");
        assert_eq!(c.gpu_url, DEFAULT_GPU_URL);
        assert_eq!(c.concurrency, 32);
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.metrics_addr.to_string(), "127.0.0.1:9464");
        assert_eq!(c.shutdown_grace, Duration::from_secs(30));
        assert!(c.api_token.is_none() && c.gpu_api_key.is_none() && c.gpu_max_inflight.is_none());
        assert_eq!(c.result_ttl, Some(Duration::from_secs(7 * 24 * 3600)));
    }

    #[test]
    fn result_ttl_zero_keeps_state_for_ever_and_nonsense_is_refused() {
        assert_eq!(cfg(&[(ENV_RESULT_TTL_MS, "0")]).unwrap().result_ttl, None);
        assert_eq!(cfg(&[(ENV_RESULT_TTL_MS, "60000")]).unwrap().result_ttl, Some(Duration::from_secs(60)));
        let e = cfg(&[(ENV_RESULT_TTL_MS, "a week")]).unwrap_err();
        assert!(e.0.iter().any(|(v, _)| v == ENV_RESULT_TTL_MS), "{e}");
    }

    #[test]
    fn every_bad_variable_is_named() {
        let e = cfg(&[
            (ENV_CONCURRENCY, "lots"),
            (ENV_AMQP_URL, "http://u:secretpw@x"),
            (ENV_PREFIX, "a b"),
            (ENV_HTTP_ADDR, "nowhere"),
            (ENV_LOG_FORMAT, "xml"),
            (ENV_SHUTDOWN_GRACE, "-1"),
            // The right scheme, but no host: every call would fail.
            (ENV_GPU_URL, "http://"),
        ])
        .unwrap_err();
        let vars: Vec<&str> = e.0.iter().map(|(v, _)| v.as_str()).collect();
        for v in [
            ENV_CONCURRENCY,
            ENV_AMQP_URL,
            ENV_PREFIX,
            ENV_HTTP_ADDR,
            ENV_LOG_FORMAT,
            ENV_SHUTDOWN_GRACE,
            ENV_GPU_URL,
        ] {
            assert!(vars.contains(&v), "{v} not reported in {e}");
        }
        assert!(!e.to_string().contains("secretpw"), "secret leaked: {e}");
    }

    #[test]
    fn zero_concurrency_is_refused_and_metrics_port_zero_allowed() {
        assert!(cfg(&[(ENV_CONCURRENCY, "0")]).is_err());
        let c = cfg(&[(ENV_METRICS_ADDR, "127.0.0.1:0"), (ENV_GPU_MAX_INFLIGHT, "16")]).unwrap();
        assert_eq!(c.metrics_addr.port(), 0);
        assert_eq!(c.gpu_max_inflight, Some(16));
    }

    #[test]
    fn protecting_reads_needs_a_token() {
        assert!(!cfg(&[]).unwrap().api_protect_reads);
        let e = cfg(&[(ENV_API_PROTECT_READS, "true")]).unwrap_err();
        assert_eq!(e.0[0].0, ENV_API_PROTECT_READS);
        assert!(cfg(&[(ENV_API_PROTECT_READS, "maybe"), (ENV_API_TOKEN, "t")]).is_err());
        let c = cfg(&[(ENV_API_PROTECT_READS, "true"), (ENV_API_TOKEN, "t")]).unwrap();
        assert!(c.api_protect_reads);
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redact_url("redis://h:6379/0"), "redis://h:6379/0");
        assert_eq!(redact_url("nonsense"), "nonsense");
        let c = cfg(&[(ENV_GPU_API_KEY, "sk-canary"), (ENV_REDIS_URL, "redis://u:canarypw@h/0")]).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("sk-canary") && !dbg.contains("canarypw"), "{dbg}");
    }
}
