//! The scheduler's HTTP API: `fn app(state) -> Router`. Routes per the
//! contract plus councils, plans, workers and the dashboard's data.

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use futures::future::join_all;
use serde_json::{Value, json};

use tracing::Instrument;

use flota_shared::amqp;
use flota_shared::council::Council;
use flota_shared::envelope::{self, TaskEnvelope};
use flota_shared::telemetry::TraceParent;

use crate::auth;
use crate::graph;
use crate::plans::{self, PlanApproved};
use crate::state::AppState;

/// Largest request body: four tasks of the largest size (256 KiB each) or a
/// thousand ordinary ones; larger gets 413 (bigger batches: split them).
pub const MAX_REQUEST_BYTES: usize = 4 * envelope::MAX_BODY_BYTES;
/// Readiness answers within this, even when a dependency black-holes.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// Most tasks in one POST.
pub const MAX_BATCH: usize = 1000;
/// An oversized body up to this size is read to its end before the 413 (see
/// [`bounded_body`]); a larger one gets the 413 at once and the connection closes.
const DRAIN_LIMIT: usize = 64 * 1024 * 1024;
/// A request body must arrive within this.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/v1/tasks", post(submit))
        .route("/v1/tasks/{id}", get(task))
        .route("/v1/queues", get(queues))
        .route("/v1/workers", get(workers))
        .route("/v1/councils", get(councils))
        .route("/v1/councils/{role}", get(council).put(put_council).delete(delete_council))
        .route("/v1/plans", post(post_plan))
        .route("/v1/plans/{id}", get(plan))
        .route("/v1/stats", get(stats))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .layer(middleware::from_fn(bounded_body))
        .layer(middleware::from_fn_with_state(state.clone(), read_guard))
        .with_state(state)
}

/// With `FLOTA_API_PROTECT_READS`, every `GET` but the probes needs the token
/// (bearer header, or the cookie `/?token=…` sets for a browser). Mutating
/// routes check the bearer header themselves ([`guard`]).
async fn read_guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let probe = matches!(path, "/healthz" | "/readyz");
    if !state.config.api_protect_reads || probe || !matches!(request.method().as_str(), "GET" | "HEAD") {
        return next.run(request).await;
    }
    let token = state.config.api_token.as_deref();
    if path == "/"
        && let Some(given) = request.uri().query().and_then(auth::query_token)
    {
        // Dashboard sign-in: trade the query token for a cookie, and drop it from the address bar.
        return match token {
            Some(t) if auth::constant_time_eq(given.as_bytes(), t.as_bytes()) => (
                StatusCode::SEE_OTHER,
                [(header::LOCATION, "/".to_string()), (header::SET_COOKIE, auth::session_cookie(t))],
            )
                .into_response(),
            _ => err(StatusCode::FORBIDDEN, "forbidden", json!({"message": "wrong token"})),
        };
    }
    let headers = request.headers();
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let cookie = headers.get(header::COOKIE).and_then(|v| v.to_str().ok());
    match auth::check_read(token, true, bearer, cookie) {
        auth::Verdict::Allowed => next.run(request).await,
        auth::Verdict::Missing => err(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            json!({"message": "Authorization: Bearer <token> required (a browser: open /?token=<token> once)"}),
        ),
        auth::Verdict::Wrong => err(StatusCode::FORBIDDEN, "forbidden", json!({"message": "wrong token"})),
    }
}

fn payload_too_large() -> Response {
    err(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        json!({"message": format!("request bodies are limited to {MAX_REQUEST_BYTES} bytes; split the batch")}),
    )
}

/// Buffer the request body, at most [`MAX_REQUEST_BYTES`] of it. An oversized
/// body is still read to its end (up to [`DRAIN_LIMIT`]) before the 413 is
/// sent: a server that answers and closes with unread bytes in its socket makes
/// the kernel reset the connection, and the client, still sending, would see
/// "connection reset" instead of the 413 (nginx's lingering close, for the same reason).
async fn bounded_body(request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let declared =
        parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > DRAIN_LIMIT as u64) {
        return payload_too_large();
    }
    let mut kept = Vec::new();
    let mut seen = 0usize;
    let mut chunks = body.into_data_stream();
    let read = async {
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            seen += chunk.len();
            if seen <= MAX_REQUEST_BYTES {
                kept.extend_from_slice(&chunk);
            } else if seen > DRAIN_LIMIT {
                break;
            }
        }
        Ok::<(), axum::Error>(())
    };
    match tokio::time::timeout(BODY_TIMEOUT, read).await {
        Err(_) => return err(StatusCode::REQUEST_TIMEOUT, "request_timeout", json!({})),
        Ok(Err(e)) => return err(StatusCode::BAD_REQUEST, "bad_request", json!({"message": e.to_string()})),
        Ok(Ok(())) => {}
    }
    if seen > MAX_REQUEST_BYTES {
        return payload_too_large();
    }
    next.run(Request::from_parts(parts, Body::from(kept))).await
}

fn err(status: StatusCode, code: &str, extra: Value) -> Response {
    let mut body = json!({"error": code});
    if let (Some(b), Value::Object(extra)) = (body.as_object_mut(), extra) {
        b.extend(extra);
    }
    (status, Json(body)).into_response()
}

/// `None` when allowed; otherwise the 401/403 answer.
fn guard(state: &AppState, headers: &HeaderMap) -> Option<Response> {
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match auth::check(state.config.api_token.as_deref(), given) {
        auth::Verdict::Allowed => None,
        auth::Verdict::Missing => Some(err(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            json!({"message": "Authorization: Bearer <token> required"}),
        )),
        auth::Verdict::Wrong => {
            Some(err(StatusCode::FORBIDDEN, "forbidden", json!({"message": "wrong token"})))
        }
    }
}

/// The body of a mutating request once the token is checked, or the JSON
/// answer: 401/403 first, then a body that could not be read (413 over
/// [`MAX_REQUEST_BYTES`]; axum's own rejection is plain text).
fn authorized_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Bytes, Box<Response>> {
    if let Some(denied) = guard(state, headers) {
        return Err(denied.into());
    }
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            payload_too_large()
        } else {
            err(rejection.status(), "bad_request", json!({"message": rejection.body_text()}))
        }
        .into()
    })
}

fn traceparent(headers: &HeaderMap) -> TraceParent {
    TraceParent::parse_or_new(headers.get("traceparent").and_then(|v| v.to_str().ok()))
}

async fn submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match authorized_body(&state, &headers, body) {
        Ok(b) => b,
        Err(answer) => return *answer,
    };
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return err(
                StatusCode::BAD_REQUEST,
                "invalid_task",
                json!({"problems": [{"index": 0, "id": null, "problems": [format!("body is not valid JSON: {e}")]}]}),
            );
        }
    };
    let items = match value {
        Value::Array(items) if items.len() > MAX_BATCH => {
            return err(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                json!({"message": format!("at most {MAX_BATCH} tasks per request")}),
            );
        }
        Value::Array(items) => items,
        one => vec![one],
    };
    let mut tasks: Vec<TaskEnvelope> = Vec::with_capacity(items.len());
    let mut problems = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (index, item) in items.into_iter().enumerate() {
        let size = serde_json::to_vec(&item).map(|b| b.len()).unwrap_or(0);
        if size > envelope::MAX_BODY_BYTES {
            problems.push(json!({"index": index, "id": item["id"].as_str(), "code": "payload_too_large", "problems": [format!("task is {size} bytes, the limit is {}", envelope::MAX_BODY_BYTES)]}));
            continue;
        }
        match envelope::validate_value(item) {
            Ok(t) if !seen.insert(t.id.clone()) => {
                problems.push(json!({"index": index, "id": t.id, "problems": ["the same id appears twice in this request"]}));
            }
            Ok(t) => tasks.push(t),
            Err(r) => problems
                .push(json!({"index": index, "id": r.id, "code": r.code.as_str(), "problems": r.problems})),
        }
    }
    if !problems.is_empty() {
        return err(StatusCode::BAD_REQUEST, "invalid_task", json!({"problems": problems}));
    }
    if let Some(cycle) = graph::find_cycle(tasks.iter().map(|t| (t.id.as_str(), t.depends_on.as_slice()))) {
        return err(StatusCode::BAD_REQUEST, "dependency_cycle", json!({"cycle": cycle}));
    }
    let tp = traceparent(&headers);
    let span = tracing::info_span!("submit", tasks = tasks.len(), trace_id = %tp.trace_id);
    flota_shared::telemetry::set_remote_parent(&span, &tp);
    submit_tasks(state, tasks, tp).instrument(span).await
}

/// Register and publish validated tasks; the answer lists duplicates and failures.
async fn submit_tasks(state: AppState, tasks: Vec<TaskEnvelope>, tp: TraceParent) -> Response {
    let publisher = match state.broker.publisher().await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(message = "Broker unavailable for submit.", error = %e);
            return err(StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable", json!({}));
        }
    };
    let exchange = state.broker.topology().tasks_exchange();
    // One registration + confirmed publish per task, all at once: the confirm window.
    let outcomes = join_all(tasks.iter().map(|t| {
        let (state, publisher, exchange, tp) = (&state, &publisher, &exchange, &tp);
        async move {
            match state.store.submit(&t.id, t.kind.as_str()).await {
                Ok(false) => Submitted::Duplicate,
                Ok(true) => {
                    let header = flota_shared::telemetry::traceparent_in(
                        &tracing::Span::current(),
                        &tp.child().header(),
                    );
                    let props = amqp::task_properties(&t.id, &header, 0);
                    match publisher.publish(exchange, t.kind.as_str(), &t.to_json(), props).await {
                        Ok(()) => Submitted::Published,
                        Err(e) => {
                            // Unregister, so the producer's retry is not taken for a duplicate.
                            let _ = state.store.forget_submission(&t.id).await;
                            Submitted::BrokerFailed(e.to_string())
                        }
                    }
                }
                Err(e) => Submitted::StoreFailed(e.to_string()),
            }
        }
    }))
    .await;
    let mut duplicates = Vec::new();
    let mut not_submitted = Vec::new();
    let mut redis_failed = false;
    for (t, outcome) in tasks.iter().zip(outcomes) {
        match outcome {
            Submitted::Published => {
                state.metrics.submitted.inc();
            }
            Submitted::Duplicate => duplicates.push(t.id.clone()),
            Submitted::BrokerFailed(e) => {
                tracing::warn!(message = "Task not published.", task_id = %t.id, trace_id = %tp.trace_id, error = %e);
                not_submitted.push(t.id.clone());
            }
            Submitted::StoreFailed(e) => {
                tracing::warn!(message = "Task not registered.", task_id = %t.id, trace_id = %tp.trace_id, error = %e);
                redis_failed = true;
                not_submitted.push(t.id.clone());
            }
        }
    }
    if !not_submitted.is_empty() {
        // The others of the batch were accepted: a retry of the whole batch lists them as duplicates.
        let code = if redis_failed { "redis_unavailable" } else { "broker_unavailable" };
        return err(StatusCode::SERVICE_UNAVAILABLE, code, json!({"not_submitted": not_submitted}));
    }
    tracing::info!(message = "Tasks submitted.", count = tasks.len(), duplicates = duplicates.len(), trace_id = %tp.trace_id);
    let ids: Vec<&str> = tasks.iter().map(|t| t.id.as_str()).collect();
    (StatusCode::ACCEPTED, Json(json!({"ids": ids, "duplicates": duplicates, "trace_id": tp.trace_id})))
        .into_response()
}

/// What became of one task of a `POST /v1/tasks`.
enum Submitted {
    Published,
    /// Its id was already known: not run again.
    Duplicate,
    BrokerFailed(String),
    StoreFailed(String),
}

async fn task(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    if !envelope::is_valid_id(&id) {
        return err(StatusCode::NOT_FOUND, "not_found", json!({}));
    }
    match state.store.task_state(&id).await {
        Ok(Some(s)) => {
            let mut body = json!({"id": id, "status": s.status});
            if let Some(r) = s.result.and_then(|r| serde_json::from_str::<Value>(&r).ok()) {
                body["result"] = r;
            }
            Json(body).into_response()
        }
        Ok(None) => err(StatusCode::NOT_FOUND, "not_found", json!({})),
        Err(e) => {
            err(StatusCode::SERVICE_UNAVAILABLE, "redis_unavailable", json!({"message": e.to_string()}))
        }
    }
}

pub async fn queue_list(state: &AppState) -> Vec<Value> {
    let mut out = Vec::new();
    for q in state.broker.topology().all_queues() {
        if let Ok((messages, consumers)) = state.broker.queue_info(&q).await {
            out.push(json!({"name": q, "messages": messages, "consumers": consumers}));
        }
    }
    out
}

async fn queues(State(state): State<AppState>) -> Response {
    Json(queue_list(&state).await).into_response()
}

async fn workers(State(state): State<AppState>) -> Response {
    match state.store.workers().await {
        Ok(beats) => {
            let mut list: Vec<Value> = beats.iter().filter_map(|b| serde_json::from_str(b).ok()).collect();
            list.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
            Json(list).into_response()
        }
        Err(e) => {
            err(StatusCode::SERVICE_UNAVAILABLE, "redis_unavailable", json!({"message": e.to_string()}))
        }
    }
}

async fn councils(State(state): State<AppState>) -> Response {
    match state.store.councils().await {
        Ok(list) => Json(list).into_response(),
        Err(e) => {
            err(StatusCode::SERVICE_UNAVAILABLE, "redis_unavailable", json!({"message": e.to_string()}))
        }
    }
}

async fn council(State(state): State<AppState>, Path(role): Path<String>) -> Response {
    match state.store.council(&role).await {
        Ok(Some(c)) => Json(c).into_response(),
        Ok(None) => err(
            StatusCode::NOT_FOUND,
            "not_found",
            json!({"message": format!("no council for role `{role}`")}),
        ),
        Err(e) => {
            err(StatusCode::SERVICE_UNAVAILABLE, "redis_unavailable", json!({"message": e.to_string()}))
        }
    }
}

async fn put_council(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(role): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match authorized_body(&state, &headers, body) {
        Ok(b) => b,
        Err(answer) => return *answer,
    };
    let mut value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return err(StatusCode::BAD_REQUEST, "invalid_council", json!({"problems": [e.to_string()]}));
        }
    };
    if value.get("role").is_none() {
        value["role"] = json!(role);
    }
    let council: Council = match serde_json::from_value(value) {
        Ok(c) => c,
        Err(e) => {
            return err(StatusCode::BAD_REQUEST, "invalid_council", json!({"problems": [e.to_string()]}));
        }
    };
    let mut problems = council.problems();
    if council.role != role {
        problems.push(format!("body role `{}` differs from the path's `{role}`", council.role));
    }
    if !problems.is_empty() {
        return err(StatusCode::BAD_REQUEST, "invalid_council", json!({"problems": problems}));
    }
    match state.store.put_council(&council).await {
        Ok(()) => Json(council).into_response(),
        Err(e) => {
            err(StatusCode::SERVICE_UNAVAILABLE, "redis_unavailable", json!({"message": e.to_string()}))
        }
    }
}

async fn delete_council(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(role): Path<String>,
) -> Response {
    if let Some(denied) = guard(&state, &headers) {
        return denied;
    }
    match state.store.delete_council(&role).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => err(
            StatusCode::NOT_FOUND,
            "not_found",
            json!({"message": format!("no stored council for role `{role}`")}),
        ),
        Err(e) => {
            err(StatusCode::SERVICE_UNAVAILABLE, "redis_unavailable", json!({"message": e.to_string()}))
        }
    }
}

async fn post_plan(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match authorized_body(&state, &headers, body) {
        Ok(b) => b,
        Err(answer) => return *answer,
    };
    let plan: PlanApproved = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => return err(StatusCode::BAD_REQUEST, "invalid_plan", json!({"problems": [e.to_string()]})),
    };
    let problems = plan.problems();
    if !problems.is_empty() {
        return err(StatusCode::BAD_REQUEST, "invalid_plan", json!({"problems": problems}));
    }
    match plans::dispatch(&state.store, &state.broker, &plan, &traceparent(&headers)).await {
        Ok(ids) => {
            (StatusCode::ACCEPTED, Json(json!({"plan_id": plan.plan_id, "task_ids": ids}))).into_response()
        }
        Err(e) => {
            err(StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable", json!({"message": e.to_string()}))
        }
    }
}

async fn plan(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let raw = match state.store.plan(&id).await {
        Ok(Some(raw)) => raw,
        Ok(None) => return err(StatusCode::NOT_FOUND, "not_found", json!({})),
        Err(e) => {
            return err(
                StatusCode::SERVICE_UNAVAILABLE,
                "redis_unavailable",
                json!({"message": e.to_string()}),
            );
        }
    };
    let Ok(plan) = serde_json::from_str::<PlanApproved>(&raw) else {
        return err(StatusCode::INTERNAL_SERVER_ERROR, "corrupt_plan", json!({}));
    };
    match plans::status(&state.store, &plan).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => {
            err(StatusCode::SERVICE_UNAVAILABLE, "redis_unavailable", json!({"message": e.to_string()}))
        }
    }
}

async fn stats(State(state): State<AppState>) -> Response {
    let (seconds, failures) = state.activity.snapshot();
    let dead = state.broker.queue_info(&state.broker.topology().dead_queue()).await.map(|(m, _)| m).ok();
    let parked = state.store.parked_count().await.ok();
    Json(json!({"seconds": seconds, "recent_failures": failures, "dead_letters": dead, "parked": parked}))
        .into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.metrics.encode(),
    )
        .into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    let (rabbit, redis) = tokio::join!(
        tokio::time::timeout(READY_TIMEOUT, state.broker.is_connected()),
        tokio::time::timeout(READY_TIMEOUT, state.store.ping()),
    );
    let rabbit = rabbit.unwrap_or(false);
    let redis = matches!(redis, Ok(Ok(())));
    let status = if rabbit && redis { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({"rabbitmq": rabbit, "redis": redis}))).into_response()
}

async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}
