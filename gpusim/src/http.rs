//! The router: the OpenAI-compatible endpoints, `/stats`, the admin API and
//! `/debug/requests`, and the chat handler that ties the other modules together.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::content::{self, Format, Prompt};
use crate::faults::{Dice, Faults, FaultsPatch, Verdict};
use crate::latency::{self, Slots};
use crate::openai::{ApiError, AssistantMessage, ChatCompletion, ChatRequest, Choice, Usage};
use crate::stats::{Event, LOG_CAPACITY, RequestLog, Stats, unix_millis};

/// A hung request is answered after this long at the latest; in practice the
/// client gives up first and axum drops the handler.
const HANG: std::time::Duration = std::time::Duration::from_secs(3600);

struct Sim {
    model: String,
    api_key: Option<String>,
    max_context_chars: usize,
    // Swapped whole by `/admin/faults`; requests clone the `Arc`, never the settings.
    faults: RwLock<Arc<Faults>>,
    dice: Dice,
    slots: Slots,
    stats: Stats,
    shutdown: CancellationToken,
    started_unix: u64,
    ids: AtomicU64,
}

/// The whole application; `shutdown` ends hung requests and the wait for a slot.
pub(crate) fn router(config: Config, shutdown: CancellationToken) -> Router {
    // Room for a context at the limit even if every character takes 4 bytes,
    // so an overlong context is refused by the context check, in the OpenAI format.
    let body_limit = config.max_context_chars.saturating_mul(4).saturating_add(1 << 20).max(2 << 20);
    let sim = Arc::new(Sim {
        model: config.model,
        api_key: config.api_key,
        max_context_chars: config.max_context_chars,
        faults: RwLock::new(Arc::new(config.faults)),
        dice: Dice::new(config.seed),
        slots: Slots::new(config.slots),
        stats: Stats::new(),
        shutdown,
        started_unix: unix_millis() / 1000,
        ids: AtomicU64::new(config.seed),
    });
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/stats", get(stats))
        .route("/admin/reset", post(reset))
        .route("/admin/faults", get(get_faults).post(set_faults))
        .route("/debug/requests", get(recent))
        .fallback(|| async { ApiError::not_found("Not Found") })
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(sim)
}

async fn chat(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let _in_flight = sim.stats.enter();
    let mut log = RequestLog {
        arrived_at: unix_millis(),
        at: 0,
        user: None,
        kind: None,
        traceparent: headers.get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_string),
        authorization_present: headers.contains_key(header::AUTHORIZATION),
        status: None,
        slot_order: None,
    };
    let response = match sim.complete(&headers, body, &mut log).await {
        Ok(r) => r,
        Err(e) => {
            sim.count_error(e.status);
            e.into_response()
        }
    };
    log.at = unix_millis();
    log.status = Some(response.status().as_u16());
    sim.stats.record(log);
    response
}

impl Sim {
    fn faults(&self) -> Arc<Faults> {
        self.faults.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn count_error(&self, status: StatusCode) {
        match status {
            StatusCode::BAD_REQUEST => self.stats.count(Event::Error400),
            StatusCode::TOO_MANY_REQUESTS => self.stats.count(Event::Error429),
            StatusCode::INTERNAL_SERVER_ERROR => self.stats.count(Event::Error500),
            _ => {}
        }
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(key) = &self.api_key else { return true };
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| given.trim() == key)
    }

    /// Checks in order: auth, parse, model, context length, faults; then
    /// generate, wait for a slot, and serve.
    async fn complete(
        &self,
        headers: &HeaderMap,
        body: Result<Bytes, BytesRejection>,
        log: &mut RequestLog,
    ) -> Result<Response, ApiError> {
        if !self.authorized(headers) {
            return Err(ApiError::unauthorized());
        }
        let body = body.map_err(|r| ApiError::from_status(r.status(), r.body_text()))?;
        let req: ChatRequest = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))?;
        log.user.clone_from(&req.user);
        let format = Format::parse(req.response_format.as_ref()).map_err(ApiError::bad_request)?;
        log.kind = Some(format.kind().as_str());
        validate(&req)?;
        if let Some(m) = req.model.as_deref().filter(|m| *m != self.model) {
            return Err(ApiError::unknown_model(m));
        }
        let texts: Vec<Cow<'_, str>> = req.messages.iter().map(|m| m.text()).collect();
        let context_chars: usize = texts.iter().map(|t| t.chars().count()).sum();
        if context_chars > self.max_context_chars {
            let prompt_tokens = (context_chars as u64).div_ceil(4);
            return Err(ApiError::context_too_long(
                self.max_context_chars / 4,
                prompt_tokens,
                req.token_cap().unwrap_or(0),
            ));
        }

        let faults = self.faults();
        let (slow, invalid) = match faults.draw(&self.dice, req.user.as_deref()) {
            Verdict::TooManyRequests { retry_after_secs } => {
                return Err(ApiError::too_many_requests(retry_after_secs));
            }
            Verdict::ServerError => return Err(ApiError::server_error()),
            Verdict::BadRequest => return Err(ApiError::bad_request("simulated bad request")),
            Verdict::Hang => {
                self.stats.count(Event::Hung);
                // Logged now: a hung request may never come back to be logged.
                self.stats.record(RequestLog { at: unix_millis(), ..log.clone() });
                tokio::select! {
                    () = tokio::time::sleep(HANG) => {}
                    () = self.shutdown.cancelled() => {}
                }
                return Err(ApiError::shutting_down());
            }
            Verdict::Serve { slow, invalid } => (slow, invalid),
        };

        let kind = format.kind();
        let mut content = if invalid {
            self.stats.count(Event::InvalidOutput);
            content::invalid(kind)
        } else {
            let prompt = Prompt {
                system: &req.first_text_of("system"),
                last_user: &req.last_text_of("user"),
                user: req.user.as_deref().unwrap_or(""),
            };
            content::generate(&format, prompt)
        };
        let full_tokens = content::tokens(&content);
        let completion_tokens = req.token_cap().map_or(full_tokens, |cap| full_tokens.min(cap));
        let capped = completion_tokens < full_tokens;
        if capped && kind.is_free_text() {
            let keep =
                content.char_indices().nth(completion_tokens as usize * 4).map_or(content.len(), |(i, _)| i);
            content.truncate(keep);
        }
        let prompt_tokens: u64 = texts.iter().map(|t| content::tokens(t)).sum();

        if slow {
            self.stats.count(Event::Slow);
        }
        let service = latency::service_time(
            faults.base_ms,
            faults.per_token_ms,
            completion_tokens,
            if slow { faults.slow_ms } else { 0 },
        );
        let order = self
            .slots
            .serve(&self.stats, service, &self.shutdown)
            .await
            .map_err(|_| ApiError::shutting_down())?;
        log.slot_order = Some(order);
        self.stats.served(req.user.as_deref(), kind);

        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        let completion = ChatCompletion {
            id: format!("chatcmpl-{:016x}{:016x}", self.started_unix, content::fnv(&n.to_string())),
            object: "chat.completion",
            created: unix_millis() / 1000,
            model: &self.model,
            choices: [Choice {
                index: 0,
                message: AssistantMessage { role: "assistant", content },
                logprobs: None,
                finish_reason: if capped { "length" } else { "stop" },
            }],
            usage: Usage {
                prompt_tokens,
                completion_tokens,
                total_tokens: prompt_tokens + completion_tokens,
            },
        };
        Ok(axum::Json(completion).into_response())
    }
}

/// What vLLM refuses before doing any work.
fn validate(req: &ChatRequest) -> Result<(), ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty"));
    }
    if req.token_cap() == Some(0) {
        return Err(ApiError::bad_request("max_tokens must be at least 1, got 0."));
    }
    if req.stream == Some(true) {
        return Err(ApiError::bad_request("stream=true is not supported by flota-gpusim"));
    }
    Ok(())
}

async fn models(State(sim): State<Arc<Sim>>, headers: HeaderMap) -> Response {
    // Like vLLM, the key guards every /v1 route; health, stats and admin stay open for tests.
    if !sim.authorized(&headers) {
        return ApiError::unauthorized().into_response();
    }
    axum::Json(json!({
        "object": "list",
        "data": [{"id": sim.model, "object": "model", "created": sim.started_unix, "owned_by": "flota-gpusim"}],
    }))
    .into_response()
}

async fn stats(State(sim): State<Arc<Sim>>) -> Response {
    axum::Json(sim.stats.snapshot(sim.slots.count())).into_response()
}

async fn reset(State(sim): State<Arc<Sim>>) -> Response {
    sim.stats.reset();
    tracing::info!("stats reset");
    axum::Json(json!({"reset": true})).into_response()
}

async fn get_faults(State(sim): State<Arc<Sim>>) -> Response {
    axum::Json(&*sim.faults()).into_response()
}

async fn set_faults(State(sim): State<Arc<Sim>>, body: Result<Bytes, BytesRejection>) -> Response {
    let patched = body
        .map_err(|r| ApiError::from_status(r.status(), r.body_text()))
        .and_then(|b| {
            serde_json::from_slice::<FaultsPatch>(&b).map_err(|e| ApiError::bad_request(e.to_string()))
        })
        .and_then(|patch| {
            let mut slot = sim.faults.write().unwrap_or_else(|e| e.into_inner());
            let next = slot.patched(patch).map_err(ApiError::bad_request)?;
            *slot = Arc::new(next.clone());
            Ok(next)
        });
    match patched {
        Ok(f) => {
            tracing::info!(faults = ?f, "fault settings changed");
            axum::Json(f).into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
struct RecentQuery {
    limit: Option<usize>,
}

async fn recent(State(sim): State<Arc<Sim>>, query: Result<Query<RecentQuery>, QueryRejection>) -> Response {
    match query {
        Ok(Query(q)) => {
            axum::Json(sim.stats.recent(q.limit.unwrap_or(LOG_CAPACITY).min(LOG_CAPACITY))).into_response()
        }
        Err(e) => ApiError::bad_request(e.body_text()).into_response(),
    }
}
