//! The OpenAI wire format: chat requests as clients send them, completions
//! and error bodies as vLLM returns them.

use std::borrow::Cow;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A chat completion request. Fields gpusim does not use (temperature,
/// top_p, seed…) are accepted and ignored, as vLLM ignores what it does not know.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    #[serde(default)]
    pub(crate) model: Option<String>,
    pub(crate) messages: Vec<ChatMessage>,
    #[serde(default)]
    pub(crate) max_tokens: Option<u64>,
    #[serde(default)]
    pub(crate) max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub(crate) response_format: Option<Value>,
    #[serde(default)]
    pub(crate) user: Option<String>,
    #[serde(default)]
    pub(crate) stream: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ChatMessage {
    pub(crate) role: String,
    /// A string, a list of content parts, or null (assistant turns with tool calls).
    #[serde(default)]
    pub(crate) content: Value,
}

impl ChatMessage {
    pub(crate) fn text(&self) -> Cow<'_, str> {
        match &self.content {
            Value::String(s) => Cow::Borrowed(s),
            Value::Array(parts) => {
                Cow::Owned(parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect())
            }
            _ => Cow::Borrowed(""),
        }
    }
}

impl ChatRequest {
    /// The completion budget; `max_completion_tokens` is the newer spelling.
    pub(crate) fn token_cap(&self) -> Option<u64> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    pub(crate) fn last_text_of(&self, role: &str) -> Cow<'_, str> {
        self.messages.iter().rev().find(|m| m.role == role).map(ChatMessage::text).unwrap_or_default()
    }

    pub(crate) fn first_text_of(&self, role: &str) -> Cow<'_, str> {
        self.messages.iter().find(|m| m.role == role).map(ChatMessage::text).unwrap_or_default()
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct ChatCompletion<'a> {
    pub(crate) id: String,
    pub(crate) object: &'static str,
    pub(crate) created: u64,
    pub(crate) model: &'a str,
    pub(crate) choices: [Choice; 1],
    pub(crate) usage: Usage,
}

#[derive(Debug, Serialize)]
pub(crate) struct Choice {
    pub(crate) index: u32,
    pub(crate) message: AssistantMessage,
    pub(crate) logprobs: Option<()>,
    pub(crate) finish_reason: &'static str,
}

#[derive(Debug, Serialize)]
pub(crate) struct AssistantMessage {
    pub(crate) role: &'static str,
    pub(crate) content: String,
}

#[derive(Debug, Serialize)]
pub(crate) struct Usage {
    pub(crate) prompt_tokens: u64,
    pub(crate) completion_tokens: u64,
    pub(crate) total_tokens: u64,
}

/// An error answered as `{"error": {"message", "type", "code"}}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) kind: &'static str,
    pub(crate) message: String,
    pub(crate) retry_after_secs: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, kind, message: message.into(), retry_after_secs: None }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "BadRequestError", message)
    }

    pub(crate) fn unauthorized() -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "AuthenticationError", "Unauthorized")
    }

    pub(crate) fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "NotFoundError", message)
    }

    pub(crate) fn unknown_model(model: &str) -> ApiError {
        ApiError::not_found(format!("The model `{model}` does not exist."))
    }

    pub(crate) fn context_too_long(max_tokens: usize, messages: u64, completion: u64) -> ApiError {
        ApiError::bad_request(format!(
            "This model's maximum context length is {max_tokens} tokens. However, you requested {} tokens \
             ({messages} in the messages, {completion} in the completion). Please reduce the length of \
             the messages or completion.",
            messages + completion
        ))
    }

    pub(crate) fn server_error() -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError", "simulated server error")
    }

    pub(crate) fn too_many_requests(retry_after_secs: u64) -> ApiError {
        ApiError {
            retry_after_secs: Some(retry_after_secs).filter(|s| *s > 0),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "RateLimitError",
                "simulated overload, retry later",
            )
        }
    }

    pub(crate) fn shutting_down() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailableError",
            "the server is shutting down",
        )
    }

    pub(crate) fn from_status(status: StatusCode, message: impl Into<String>) -> ApiError {
        let kind = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "PayloadTooLargeError",
            s if s.is_server_error() => "InternalServerError",
            _ => "BadRequestError",
        };
        ApiError::new(status, kind, message)
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    code: u16,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail { message: &self.message, kind: self.kind, code: self.status.as_u16() },
        };
        let mut r = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_leniently_and_text_is_extracted() {
        let r: ChatRequest = serde_json::from_str(
            r#"{"model": "m", "temperature": 0.2, "top_p": 1, "messages": [
                {"role": "system", "content": "persona"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": null},
                {"role": "user", "content": "last"}]}"#,
        )
        .unwrap();
        assert_eq!(r.first_text_of("system"), "persona");
        assert_eq!(r.messages[1].text(), "ab");
        assert_eq!(r.last_text_of("user"), "last");
        assert_eq!(r.last_text_of("tool"), "");
        assert!(serde_json::from_str::<ChatRequest>(r#"{"model": "m"}"#).is_err());
        assert!(serde_json::from_str::<ChatRequest>(r#"{"messages": [], "max_tokens": "x"}"#).is_err());
    }

    #[test]
    fn errors_have_the_openai_shape() {
        let r = ApiError::too_many_requests(3).into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
        assert!(ApiError::too_many_requests(0).into_response().headers().get(header::RETRY_AFTER).is_none());
        let e = ApiError::unknown_model("x");
        assert_eq!(e.message, "The model `x` does not exist.");
    }
}
