//! The one client of the OpenAI-compatible GPU server (vLLM or flota-gpusim).
//!
//! Every call has a deadline (the smaller of the task's remaining time and the
//! configured call timeout), always sets `max_tokens`, caps the response body,
//! sends the API key when configured and forwards `traceparent`. Failures are
//! classified by [`classify`] (pure): connect errors, timeouts, 5xx and 429 are
//! retried with exponential backoff and full jitter (backon), honouring
//! `Retry-After`; other 4xx are final (`invalid_request`).

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::OnceCell;
use tokio::time::Instant;
use tracing::Instrument;

use flota_shared::config::Config;
use flota_shared::envelope::Usage;
use flota_shared::telemetry::TRACE_ONLY;

use crate::breaker::{Breaker, call_verdict};
use crate::fleet::Admission;

/// Responses larger than this are refused: a model cannot flood a worker's memory.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, Serialize)]
pub struct ChatMessage {
    pub role: &'static str,
    pub content: String,
}

impl ChatMessage {
    pub fn system(content: impl Into<String>) -> Self {
        ChatMessage { role: "system", content: content.into() }
    }
    pub fn user(content: impl Into<String>) -> Self {
        ChatMessage { role: "user", content: content.into() }
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        ChatMessage { role: "assistant", content: content.into() }
    }
}

/// What a handler asks for; the client adds model, deadline and headers.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub max_tokens: u32,
    pub temperature: f32,
    pub response_format: Option<&'static RawValue>,
    /// The agent name for deliberation calls (OpenAI's `user` field).
    pub user: Option<String>,
    /// A model other than the fleet's default (a council agent's own).
    pub model: Option<String>,
}

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: &'a [ChatMessage],
    max_tokens: u32,
    temperature: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
}

#[derive(Deserialize)]
struct WireResponse {
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireChoice {
    message: WireMessage,
}

#[derive(Deserialize)]
struct WireMessage {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

#[derive(Debug, Clone)]
pub struct Completion {
    pub content: String,
    pub usage: Usage,
}

/// A failed call, already classified.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GpuError {
    /// Worth retrying: connect error, timeout, 5xx, 429.
    #[error("GPU server unavailable: {message}")]
    Transient {
        message: String,
        retry_after: Option<Duration>,
        /// A timeout: counted as a slow call by the breaker.
        timed_out: bool,
    },
    /// The server refused the request (4xx other than 429): never retried.
    #[error("GPU server refused the request ({status}): {message}")]
    Invalid { status: u16, message: String },
    /// The task's own deadline passed.
    #[error("deadline exceeded before the GPU answered")]
    Deadline,
    /// The circuit breaker is open: no call was made.
    #[error("GPU circuit breaker open")]
    BreakerOpen,
    /// The server answered with more than [`MAX_RESPONSE_BYTES`]: one task's
    /// output gone wrong (`max_tokens` should prevent it), not the server's
    /// health, so it is neither retried nor counted by the breaker.
    #[error("GPU response larger than the {cap}-byte cap")]
    Oversized { cap: usize },
}

impl GpuError {
    /// A transient failure that is neither a timeout nor carries `Retry-After`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        GpuError::Transient { message: message.into(), retry_after: None, timed_out: false }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self, GpuError::Transient { .. })
    }
}

/// What an HTTP status means for us (pure, unit-tested).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    Ok,
    Retry,
    Refused,
}

pub fn classify(status: u16) -> StatusClass {
    match status {
        200..=299 => StatusClass::Ok,
        429 | 408 => StatusClass::Retry,
        500..=599 => StatusClass::Retry,
        _ => StatusClass::Refused,
    }
}

/// Parse `Retry-After` in seconds (HTTP dates are rare from vLLM; treated as absent).
pub fn parse_retry_after(v: Option<&str>) -> Option<Duration> {
    let secs: u64 = v?.trim().parse().ok()?;
    Some(Duration::from_secs(secs.min(300)))
}

/// Backoff delays for `retries` retries: exponential from 100 ms, capped at
/// 5 s, full jitter.
pub fn backoff(retries: u32) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_factor(2.0)
        .with_jitter()
        .with_max_times(retries as usize)
        .build()
}

/// Observes each call (metrics live in the worker, not here).
pub trait CallObserver: Send + Sync {
    fn on_call(&self, outcome: &'static str, elapsed: Duration);
    fn on_retry(&self);
}

pub struct NoopObserver;
impl CallObserver for NoopObserver {
    fn on_call(&self, _: &'static str, _: Duration) {}
    fn on_retry(&self) {}
}

#[derive(Clone)]
pub struct GpuClient {
    http: reqwest::Client,
    base: Arc<str>,
    /// Parsed once: parsing it per call was ~1 % of a worker's CPU in gpu-bound.
    chat_url: reqwest::Url,
    configured_model: Option<Arc<str>>,
    model: Arc<OnceCell<String>>,
    api_key: Option<Arc<str>>,
    call_timeout: Duration,
    retries: u32,
    observer: Arc<dyn CallObserver>,
    breaker: Arc<Breaker>,
    admission: Option<Arc<Admission>>,
}

impl GpuClient {
    pub fn new(
        config: &Config,
        observer: Arc<dyn CallObserver>,
        breaker: Arc<Breaker>,
        admission: Option<Arc<Admission>>,
    ) -> anyhow::Result<GpuClient> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .build()?;
        Ok(GpuClient {
            http,
            base: config.gpu_url.as_str().into(),
            chat_url: chat_url(&config.gpu_url)?,
            configured_model: config.gpu_model.as_deref().map(Into::into),
            model: Arc::new(OnceCell::new()),
            api_key: config.gpu_api_key.as_deref().map(Into::into),
            call_timeout: config.gpu_timeout,
            retries: config.gpu_retries,
            observer,
            breaker,
            admission,
        })
    }

    /// The model to ask for: configured, or the server's first model (asked once).
    pub async fn model(&self, deadline: Instant) -> Result<String, GpuError> {
        if let Some(m) = &self.configured_model {
            return Ok(m.to_string());
        }
        self.model
            .get_or_try_init(|| async {
                let remaining = deadline.saturating_duration_since(Instant::now());
                let Some(timeout) = call_timeout_within(remaining, self.call_timeout) else {
                    return Err(GpuError::Deadline);
                };
                let req = models_http_request(&self.http, &self.base, timeout, self.api_key.as_deref());
                let resp = req.send().await.map_err(transport_error)?;
                let status = resp.status().as_u16();
                let body = read_capped(resp).await?;
                if classify(status) != StatusClass::Ok {
                    return Err(status_error(status, &body, None));
                }
                let v: Value = serde_json::from_slice(&body)
                    .map_err(|_| GpuError::unavailable("unreadable /v1/models answer"))?;
                v["data"][0]["id"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| GpuError::unavailable("the GPU server lists no model"))
            })
            .await
            .cloned()
    }

    pub fn breaker(&self) -> &Arc<Breaker> {
        &self.breaker
    }

    /// One chat completion with bounded retries, finishing by `deadline`.
    /// Every attempt asks the breaker first; while it is open no call is made.
    pub async fn chat(
        &self,
        req: &ChatRequest,
        deadline: Instant,
        traceparent: &str,
    ) -> Result<Completion, GpuError> {
        let mut delays = backoff(self.retries);
        loop {
            // Closed only: a half-open breaker is probed by the fleet's prober, not by tasks.
            if !self.breaker.admit_call() {
                return Err(GpuError::BreakerOpen);
            }
            let result = self.chat_once(req, deadline, traceparent, self.call_timeout).await;
            match result {
                Ok(c) => return Ok(c),
                Err(e) if e.is_retryable() => {
                    let Some(backoff_delay) = delays.next() else { return Err(e) };
                    let delay = retry_delay(backoff_delay, &e);
                    if Instant::now() + delay >= deadline {
                        return Err(e);
                    }
                    self.observer.on_retry();
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The breaker's probe: the smallest real request, with the probe timeout.
    pub async fn probe(&self, traceparent: &str) -> Result<(), GpuError> {
        let req = ChatRequest {
            messages: vec![ChatMessage::user("ping")],
            max_tokens: 1,
            temperature: 0.0,
            response_format: None,
            user: Some("flota-probe".into()),
            model: None,
        };
        let timeout = self.breaker.settings.probe_timeout;
        self.chat_once(&req, Instant::now() + timeout, traceparent, timeout).await.map(|_| ())
    }

    /// One HTTP round trip, no retry; its verdict is recorded by the breaker.
    async fn chat_once(
        &self,
        req: &ChatRequest,
        deadline: Instant,
        traceparent: &str,
        timeout: Duration,
    ) -> Result<Completion, GpuError> {
        let span = tracing::info_span!(target: TRACE_ONLY, "gpu.call", outcome = tracing::field::Empty);
        // The GPU server's span (vLLM exports one) becomes a child of this call.
        let traceparent = flota_shared::telemetry::traceparent_in(&span, traceparent);
        let result =
            self.chat_once_traced(req, deadline, &traceparent, timeout).instrument(span.clone()).await;
        span.record("outcome", call_outcome(&result));
        result
    }

    async fn chat_once_traced(
        &self,
        req: &ChatRequest,
        deadline: Instant,
        traceparent: &str,
        timeout: Duration,
    ) -> Result<Completion, GpuError> {
        // The model first (a one-time lookup when none is configured): the
        // slot's lease covers the chat call only.
        let model = match &req.model {
            Some(m) => m.clone(),
            None => self.model(deadline).await?,
        };
        // The fleet-wide cap: wait for a slot (bounded by the deadline) before calling.
        let _slot = match &self.admission {
            Some(a) => Some(a.acquire(deadline).await?),
            None => None,
        };
        let started = Instant::now();
        let result = self.chat_once_inner(req, &model, deadline, traceparent, timeout).await;
        let elapsed = started.elapsed();
        self.breaker.record(call_verdict(&result.as_ref().map(|_| ()), elapsed));
        self.observer.on_call(call_outcome(&result), elapsed);
        result
    }

    async fn chat_once_inner(
        &self,
        req: &ChatRequest,
        model: &str,
        deadline: Instant,
        traceparent: &str,
        call_timeout: Duration,
    ) -> Result<Completion, GpuError> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let Some(timeout) = call_timeout_within(remaining, call_timeout) else {
            return Err(GpuError::Deadline);
        };
        let body = wire_request(req, model);
        let http = chat_http_request(
            &self.http,
            &self.chat_url,
            &body,
            timeout,
            traceparent,
            self.api_key.as_deref(),
        );
        let resp = http.send().await.map_err(|e| {
            if e.is_timeout() && Instant::now() >= deadline { GpuError::Deadline } else { transport_error(e) }
        })?;
        let status = resp.status().as_u16();
        let retry_after = parse_retry_after(resp.headers().get("retry-after").and_then(|v| v.to_str().ok()));
        let bytes = match read_capped(resp).await {
            Ok(b) => b,
            // An error answer is judged by its status; its body only adds detail.
            Err(GpuError::Oversized { .. }) if classify(status) != StatusClass::Ok => Vec::new(),
            Err(e) => return Err(e),
        };
        if classify(status) != StatusClass::Ok {
            return Err(status_error(status, &bytes, retry_after));
        }
        let wire: WireResponse = serde_json::from_slice(&bytes)
            .map_err(|_| GpuError::unavailable("unreadable completion body"))?;
        let content = wire.choices.into_iter().next().and_then(|c| c.message.content).unwrap_or_default();
        let usage = wire
            .usage
            .map(|u| Usage { prompt_tokens: u.prompt_tokens, completion_tokens: u.completion_tokens })
            .unwrap_or_default();
        Ok(Completion { content, usage })
    }
}

/// A call's timeout: the smaller of the task's remaining time and the call timeout; `None` once spent.
fn call_timeout_within(remaining: Duration, call_timeout: Duration) -> Option<Duration> {
    (!remaining.is_zero()).then(|| remaining.min(call_timeout))
}

/// The pause before a retry: the backoff's, unless the server asked for longer with `Retry-After`.
fn retry_delay(backoff_delay: Duration, error: &GpuError) -> Duration {
    match error {
        GpuError::Transient { retry_after: Some(ra), .. } => backoff_delay.max(*ra),
        _ => backoff_delay,
    }
}

/// The wire body of a chat call: `max_tokens` is not optional, so it is always sent.
fn wire_request<'a>(req: &'a ChatRequest, model: &'a str) -> WireRequest<'a> {
    WireRequest {
        model,
        messages: &req.messages,
        max_tokens: req.max_tokens,
        temperature: req.temperature,
        response_format: req.response_format,
        user: req.user.as_deref(),
    }
}

/// The chat request, built unsent so its body and headers (traceparent, bearer key) can be checked.
fn chat_http_request(
    http: &reqwest::Client,
    url: &reqwest::Url,
    body: &WireRequest<'_>,
    timeout: Duration,
    traceparent: &str,
    api_key: Option<&str>,
) -> reqwest::RequestBuilder {
    let req = http.post(url.clone()).timeout(timeout).header("traceparent", traceparent).json(body);
    with_api_key(req, api_key)
}

/// The chat completions endpoint under the configured base URL (which the
/// config has already checked, with every other setting).
pub fn chat_url(base: &str) -> anyhow::Result<reqwest::Url> {
    let unusable = |why: String| anyhow::anyhow!("FLOTA_GPU_URL is not a usable URL: {why}");
    // The base alone first: appended to a host-less base, the path would be read as the host.
    reqwest::Url::parse(base).map_err(|e| unusable(e.to_string()))?;
    reqwest::Url::parse(&format!("{}/v1/chat/completions", base.trim_end_matches('/')))
        .map_err(|e| unusable(e.to_string()))
}

/// The `/v1/models` lookup, built without sending it; carries the key like every call.
fn models_http_request(
    http: &reqwest::Client,
    base: &str,
    timeout: Duration,
    api_key: Option<&str>,
) -> reqwest::RequestBuilder {
    with_api_key(http.get(format!("{base}/v1/models")).timeout(timeout), api_key)
}

/// The API key goes out as a bearer token only when one is configured.
fn with_api_key(req: reqwest::RequestBuilder, api_key: Option<&str>) -> reqwest::RequestBuilder {
    match api_key {
        Some(key) => req.bearer_auth(key),
        None => req,
    }
}

fn transport_error(e: reqwest::Error) -> GpuError {
    GpuError::Transient {
        // reqwest errors carry the URL, never credentials (the key is a header).
        message: if e.is_timeout() {
            "GPU call timed out".into()
        } else if e.is_connect() {
            "cannot connect to the GPU server".into()
        } else {
            "GPU transport error".into()
        },
        retry_after: None,
        timed_out: e.is_timeout(),
    }
}

fn status_error(status: u16, body: &[u8], retry_after: Option<Duration>) -> GpuError {
    // OpenAI nests the error (`{"error": {"message"}}`); older vLLM puts it at the top.
    let text = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v["error"]["message"].as_str().or_else(|| v["message"].as_str()).map(scrub_server_message)
        })
        .unwrap_or_default();
    match classify(status) {
        StatusClass::Refused => GpuError::Invalid { status, message: text },
        _ => GpuError::Transient { message: format!("HTTP {status}"), retry_after, timed_out: false },
    }
}

/// The GPU server's error text as far as it may travel (into results, logs,
/// dead-letter headers) (pure). Servers echo what they refused — vLLM's
/// validation errors quote the offending `input`, which can be the prompt — so
/// every quoted stretch longer than a name is cut out, and the rest is bounded.
pub fn scrub_server_message(message: &str) -> String {
    const LONGEST_QUOTED_NAME: usize = 24;
    const MAX_CHARS: usize = 200;
    let chars: Vec<char> = message.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\'' || c == '"' {
            // A quote closed before the end: a quoted value.
            if let Some(len) = chars[i + 1..].iter().position(|&q| q == c) {
                if len > LONGEST_QUOTED_NAME {
                    out.push(c);
                    out.push('…');
                    out.push(c);
                } else {
                    out.extend(&chars[i..=i + 1 + len]);
                }
                i += len + 2;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    out.chars().take(MAX_CHARS).collect()
}

async fn read_capped(mut resp: reqwest::Response) -> Result<Vec<u8>, GpuError> {
    let mut buf = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => append_capped(&mut buf, &chunk)?,
            Ok(None) => return Ok(buf),
            Err(e) => return Err(transport_error(e)),
        }
    }
}

/// Append one body chunk, refusing (before buffering it) any that would take the body
/// past [`MAX_RESPONSE_BYTES`]; the error names the cap, never the body.
fn append_capped(buf: &mut Vec<u8>, chunk: &[u8]) -> Result<(), GpuError> {
    if buf.len() + chunk.len() > MAX_RESPONSE_BYTES {
        return Err(GpuError::Oversized { cap: MAX_RESPONSE_BYTES });
    }
    buf.extend_from_slice(chunk);
    Ok(())
}

/// The `outcome` label of one call (metrics and the `gpu.call` span).
fn call_outcome<T>(result: &Result<T, GpuError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(GpuError::Transient { timed_out: true, .. }) => "timeout",
        Err(GpuError::Transient { .. }) => "unavailable",
        Err(GpuError::Invalid { .. }) => "refused",
        Err(GpuError::Deadline) => "deadline",
        Err(GpuError::BreakerOpen) => "rejected",
        Err(GpuError::Oversized { .. }) => "oversized",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(classify(200), StatusClass::Ok);
        assert_eq!(classify(429), StatusClass::Retry);
        assert_eq!(classify(500), StatusClass::Retry);
        assert_eq!(classify(503), StatusClass::Retry);
        assert_eq!(classify(400), StatusClass::Refused);
        assert_eq!(classify(404), StatusClass::Refused);
        assert_eq!(classify(401), StatusClass::Refused);
    }

    #[test]
    fn retry_after_parsing() {
        assert_eq!(parse_retry_after(Some("2")), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(Some(" 10 ")), Some(Duration::from_secs(10)));
        assert_eq!(parse_retry_after(Some("Wed, 21 Oct 2015 07:28:00 GMT")), None);
        assert_eq!(parse_retry_after(None), None);
        assert_eq!(parse_retry_after(Some("100000")), Some(Duration::from_secs(300)));
    }

    #[test]
    fn backoff_is_bounded_and_jittered() {
        let delays: Vec<_> = backoff(4).collect();
        assert_eq!(delays.len(), 4);
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(10)));
    }

    #[test]
    fn four_hundreds_are_final_and_errors_do_not_echo_much() {
        let long = format!("{{\"error\":{{\"message\":\"{}\"}}}}", "x".repeat(5000));
        match status_error(400, long.as_bytes(), None) {
            GpuError::Invalid { status, message } => {
                assert_eq!(status, 400);
                assert!(message.len() <= 200);
            }
            other => panic!("{other:?}"),
        }
        assert!(status_error(503, b"", Some(Duration::from_secs(1))).is_retryable());
    }
    #[test]
    fn call_timeout_is_the_call_timeout_when_the_task_has_more_time() {
        let t = call_timeout_within(Duration::from_secs(300), Duration::from_secs(30));
        assert_eq!(t, Some(Duration::from_secs(30)));
    }

    #[test]
    fn call_timeout_is_the_tasks_remaining_time_when_that_is_shorter() {
        let t = call_timeout_within(Duration::from_millis(1500), Duration::from_secs(30));
        assert_eq!(t, Some(Duration::from_millis(1500)));
    }

    #[test]
    fn call_timeout_when_both_sides_are_equal() {
        let t = call_timeout_within(Duration::from_secs(30), Duration::from_secs(30));
        assert_eq!(t, Some(Duration::from_secs(30)));
    }

    #[test]
    fn no_call_once_the_tasks_time_is_spent() {
        assert_eq!(call_timeout_within(Duration::ZERO, Duration::from_secs(30)), None);
        // What the real path feeds it once the deadline has passed.
        let past = Instant::now() - Duration::from_secs(1);
        let remaining = past.saturating_duration_since(Instant::now());
        assert_eq!(call_timeout_within(remaining, Duration::from_secs(30)), None);
        // A hair of time left is still a call, bounded by it.
        assert_eq!(
            call_timeout_within(Duration::from_nanos(1), Duration::from_secs(30)),
            Some(Duration::from_nanos(1))
        );
    }

    #[test]
    fn retry_after_lengthens_the_backoff_but_never_shortens_it() {
        let transient = |ra: Option<u64>| GpuError::Transient {
            message: "HTTP 503".into(),
            retry_after: ra.map(Duration::from_secs),
            timed_out: false,
        };
        let backoff_delay = Duration::from_millis(400);
        assert_eq!(retry_delay(backoff_delay, &transient(None)), backoff_delay);
        assert_eq!(retry_delay(backoff_delay, &transient(Some(3))), Duration::from_secs(3));
        assert_eq!(retry_delay(Duration::from_secs(5), &transient(Some(1))), Duration::from_secs(5));
        assert_eq!(retry_delay(backoff_delay, &transient(Some(0))), backoff_delay);
    }

    #[test]
    fn server_messages_lose_what_they_quote() {
        // vLLM's request validation quotes the input it refused.
        let pydantic = "[{'type': 'string_too_long', 'loc': ('body', 'messages', 0, 'content'), \
                        'msg': 'String should have at most 10 characters', 'input': 'Abrí un trabajo para la bomba del pozo 3 CANARY'}]";
        let kept = scrub_server_message(pydantic);
        assert!(!kept.contains("CANARY") && !kept.contains("bomba"), "{kept}");
        assert!(kept.contains("'type': 'string_too_long'"), "short names stay: {kept}");
        assert!(kept.contains("'input': '…'"), "{kept}");
        // The useful vLLM refusal survives whole (an apostrophe is not a quote).
        let context =
            "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens.";
        assert_eq!(scrub_server_message(context), context);
        assert_eq!(scrub_server_message(&"x".repeat(500)).chars().count(), 200);
        assert_eq!(scrub_server_message(r#"bad "prompt text that goes on and on" here"#), r#"bad "…" here"#);
    }

    #[test]
    fn refusals_keep_the_scrubbed_message_from_either_error_shape() {
        let nested = br#"{"error": {"message": "model 'x' not found", "type": "NotFoundError"}}"#;
        match status_error(404, nested, None) {
            GpuError::Invalid { status: 404, message } => assert_eq!(message, "model 'x' not found"),
            other => panic!("{other:?}"),
        }
        let flat =
            br#"{"object": "error", "message": "echo: 'a prompt long enough to be cut out'", "code": 400}"#;
        match status_error(400, flat, None) {
            GpuError::Invalid { message, .. } => assert_eq!(message, "echo: '…'"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn body_under_the_cap_is_kept() {
        let mut buf = Vec::new();
        append_capped(&mut buf, b"{\"choices\":").unwrap();
        append_capped(&mut buf, b"[]}").unwrap();
        assert_eq!(buf, b"{\"choices\":[]}");
    }

    #[test]
    fn body_exactly_at_the_cap_is_kept() {
        let mut buf = vec![b'a'; MAX_RESPONSE_BYTES - 10];
        append_capped(&mut buf, &[b'b'; 10]).unwrap();
        assert_eq!(buf.len(), MAX_RESPONSE_BYTES);
        // Even an empty chunk at the cap is fine.
        append_capped(&mut buf, b"").unwrap();
        assert_eq!(buf.len(), MAX_RESPONSE_BYTES);
    }

    #[test]
    fn body_over_the_cap_is_refused_final_without_echoing_it() {
        let mut buf = vec![b'a'; MAX_RESPONSE_BYTES];
        let secret = b"SECRET-PROMPT-TEXT";
        let err = append_capped(&mut buf, secret).unwrap_err();
        // One task's runaway answer: not retried, and no breaker failure for the fleet.
        assert!(!err.is_retryable(), "{err:?}");
        assert_eq!(
            crate::breaker::call_verdict(&Err(&err), Duration::ZERO),
            crate::breaker::CallVerdict::Ignored
        );
        assert_eq!(call_outcome::<()>(&Err(err.clone())), "oversized");
        assert!(matches!(err, GpuError::Oversized { cap: MAX_RESPONSE_BYTES }), "{err:?}");
        assert!(!err.to_string().contains("SECRET"), "{err}");
        // The refused chunk is not buffered.
        assert_eq!(buf.len(), MAX_RESPONSE_BYTES);
    }

    #[test]
    fn one_chunk_larger_than_the_cap_is_refused_on_an_empty_body() {
        let mut buf = Vec::new();
        assert!(append_capped(&mut buf, &vec![b'x'; MAX_RESPONSE_BYTES + 1]).is_err());
        assert!(buf.is_empty());
    }

    fn chat_request(max_tokens: u32) -> ChatRequest {
        ChatRequest {
            messages: vec![ChatMessage::system("be brief"), ChatMessage::user("hello")],
            max_tokens,
            temperature: 0.2,
            response_format: None,
            user: None,
            model: None,
        }
    }

    #[test]
    fn the_chat_url_is_parsed_once_and_a_hostless_one_is_refused() {
        assert_eq!(chat_url("http://gpu:8000/").unwrap().as_str(), "http://gpu:8000/v1/chat/completions");
        assert_eq!(chat_url("https://h/vllm").unwrap().as_str(), "https://h/vllm/v1/chat/completions");
        for hostless in ["http://", "https://:8000"] {
            let refused = chat_url(hostless).unwrap_err().to_string();
            assert!(refused.starts_with("FLOTA_GPU_URL is not a usable URL"), "{hostless}: {refused}");
        }
    }

    fn built_chat(req: &ChatRequest, api_key: Option<&str>) -> reqwest::Request {
        let body = wire_request(req, "m-1");
        chat_http_request(
            &reqwest::Client::new(),
            &chat_url("http://gpu:8000").unwrap(),
            &body,
            Duration::from_secs(7),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            api_key,
        )
        .build()
        .unwrap()
    }

    fn json_body(r: &reqwest::Request) -> Value {
        serde_json::from_slice(r.body().and_then(|b| b.as_bytes()).expect("a buffered body")).unwrap()
    }

    #[test]
    fn chat_body_always_carries_max_tokens_and_the_model() {
        let r = built_chat(&chat_request(64), None);
        let v = json_body(&r);
        assert_eq!(v["max_tokens"], 64);
        assert_eq!(v["model"], "m-1");
        assert_eq!(v["messages"][0]["role"], "system");
        assert_eq!(v["messages"][1]["content"], "hello");
        // Unset optional fields are left out, not sent as null.
        assert!(v.get("response_format").is_none() && v.get("user").is_none(), "{v}");
        // The probe's request (max_tokens 1) keeps it too.
        assert_eq!(json_body(&built_chat(&chat_request(1), None))["max_tokens"], 1);
    }

    #[test]
    fn chat_body_carries_response_format_and_user_when_given() {
        let mut req = chat_request(32);
        static JSON_OBJECT: std::sync::LazyLock<Box<RawValue>> =
            std::sync::LazyLock::new(|| RawValue::from_string(r#"{"type": "json_object"}"#.into()).unwrap());
        req.response_format = Some(&JSON_OBJECT);
        req.user = Some("agent-a".into());
        let v = json_body(&built_chat(&req, None));
        assert_eq!(v["response_format"]["type"], "json_object");
        assert_eq!(v["user"], "agent-a");
    }

    #[test]
    fn chat_request_sets_traceparent_timeout_and_url() {
        let r = built_chat(&chat_request(8), None);
        assert_eq!(*r.method(), reqwest::Method::POST);
        assert_eq!(r.url().as_str(), "http://gpu:8000/v1/chat/completions");
        assert_eq!(r.timeout(), Some(&Duration::from_secs(7)));
        assert_eq!(r.headers()["traceparent"], "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        assert_eq!(r.headers()["content-type"], "application/json");
    }

    #[test]
    fn authorization_only_when_a_key_is_configured() {
        let without = built_chat(&chat_request(8), None);
        assert!(without.headers().get("authorization").is_none());
        let with = built_chat(&chat_request(8), Some("sk-test"));
        assert_eq!(with.headers()["authorization"], "Bearer sk-test");
        // The key is a header, never part of the body.
        assert!(!json_body(&with).to_string().contains("sk-test"));
    }

    #[test]
    fn models_lookup_carries_the_key_only_when_configured() {
        let http = reqwest::Client::new();
        let r = models_http_request(&http, "http://gpu:8000", Duration::from_secs(3), None).build().unwrap();
        assert_eq!(*r.method(), reqwest::Method::GET);
        assert_eq!(r.url().as_str(), "http://gpu:8000/v1/models");
        assert_eq!(r.timeout(), Some(&Duration::from_secs(3)));
        assert!(r.headers().get("authorization").is_none());
        let r = models_http_request(&http, "http://gpu:8000", Duration::from_secs(3), Some("sk-test"))
            .build()
            .unwrap();
        assert_eq!(r.headers()["authorization"], "Bearer sk-test");
    }
}
