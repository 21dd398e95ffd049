//! Prompt shapes and the JSON schemas the model must answer in.
//!
//! The schema names ("interpretation", "review") are part of the prompt
//! contract: vLLM enforces the schema through guided decoding, and flota-gpusim
//! dispatches on the name. Prompts never contain anything but the task's own
//! text; model output is data and chooses nothing about where effects go.

use std::sync::LazyLock;

use serde_json::value::RawValue;
use serde_json::{Value, json};

use flota_shared::envelope::{DeliberateInput, InterpretInput};

use crate::gpu::ChatMessage;

pub const INTERPRET_MAX_TOKENS: u32 = 400;
pub const PROPOSAL_MAX_TOKENS: u32 = 700;
pub const REVIEW_MAX_TOKENS: u32 = 200;

pub const MAX_TITLE_CHARS: usize = 200;
pub const MAX_SUMMARY_CHARS: usize = 2_000;
pub const MAX_REPLY_CHARS: usize = 4_000;
pub const MAX_COMMENT_CHARS: usize = 1_000;

const INTERPRET_SYSTEM: &str = "You interpret messages sent to a field-service assistant. \
Decide the user's intent: open_work (they ask to open/create a work order), update_work \
(they change an existing one), confirm, cancel, or chat (anything else). For open_work and \
update_work give the work's short title and a one-sentence summary. For chat give a short reply. \
Answer only with JSON matching the schema.";

pub fn interpretation_schema() -> Value {
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["intent", "confidence", "work", "reply"],
        "properties": {
            "intent": {"type": "string", "enum": ["open_work", "update_work", "confirm", "cancel", "chat"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "work": {"anyOf": [
                {"type": "object", "additionalProperties": false, "required": ["title", "summary"],
                 "properties": {
                    "title": {"type": "string", "maxLength": MAX_TITLE_CHARS},
                    "summary": {"type": "string", "maxLength": MAX_SUMMARY_CHARS}}},
                {"type": "null"}]},
            "reply": {"anyOf": [{"type": "string", "maxLength": MAX_REPLY_CHARS}, {"type": "null"}]},
            "degraded": {"type": "boolean"}
        }
    })
}

pub fn review_schema() -> Value {
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["score", "comment"],
        "properties": {
            "score": {"type": "number", "minimum": 0, "maximum": 10},
            "comment": {"type": "string", "maxLength": MAX_COMMENT_CHARS}
        }
    })
}

/// A `response_format` already serialised: the request body embeds its bytes as they are.
fn response_format(name: &str, schema: Value) -> Box<RawValue> {
    let format =
        json!({"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": true}});
    // A `Value` always serialises; the fallback is never reached.
    serde_json::value::to_raw_value(&format).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

// Built once, and serialised once: walking the schema's `Value` to write it
// into every request was ~18 % of a worker's instructions in the gpu-bound
// profile (callgrind), and building it per call another ~4 % before that.
static INTERPRETATION_FORMAT: LazyLock<Box<RawValue>> =
    LazyLock::new(|| response_format("interpretation", interpretation_schema()));
static REVIEW_FORMAT: LazyLock<Box<RawValue>> = LazyLock::new(|| response_format("review", review_schema()));

pub fn interpretation_format() -> &'static RawValue {
    &INTERPRETATION_FORMAT
}

pub fn review_format() -> &'static RawValue {
    &REVIEW_FORMAT
}

pub fn interpretation_messages(input: &InterpretInput) -> Vec<ChatMessage> {
    let mut messages = Vec::with_capacity(input.history.len() + 2);
    messages.push(ChatMessage::system(INTERPRET_SYSTEM));
    for turn in &input.history {
        messages.push(if turn.role == "assistant" {
            ChatMessage::assistant(turn.content.clone())
        } else {
            ChatMessage::user(turn.content.clone())
        });
    }
    messages.push(ChatMessage::user(input.message.clone()));
    messages
}

/// Agent `i` (0-based) of a council: its name and persona.
pub fn agent_name(role: &str, index: usize) -> String {
    format!("{role}-{}", index + 1)
}

pub fn proposal_messages(persona: &str, input: &DeliberateInput) -> Vec<ChatMessage> {
    let mut task = format!("Task: {}\n", input.task);
    if !input.constraints.is_empty() {
        task.push_str("Constraints:\n");
        for c in &input.constraints {
            task.push_str("- ");
            task.push_str(c);
            task.push('\n');
        }
    }
    task.push_str("Write your proposal: a concrete plan in a few numbered steps.");
    vec![ChatMessage::system(persona.to_string()), ChatMessage::user(task)]
}

pub fn review_messages(
    persona: &str,
    input: &DeliberateInput,
    author: &str,
    proposal: &str,
) -> Vec<ChatMessage> {
    let user = format!(
        "Task: {}\nReview the proposal by {author} below. Score it from 0 (useless) to 10 (excellent) \
         and comment in one or two sentences. Answer only with JSON matching the schema.\n\
         --- proposal ---\n{proposal}",
        input.task
    );
    vec![ChatMessage::system(persona.to_string()), ChatMessage::user(user)]
}

/// Why model output failed its schema, without echoing the output itself
/// (serde's messages quote values, and model output may repeat the prompt).
pub fn schema_problem(schema: &str, e: &serde_json::Error) -> String {
    let what = match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => "is not JSON",
        serde_json::error::Category::Data => "does not match the schema (field, type or enum)",
        serde_json::error::Category::Io => "could not be read",
    };
    format!("model output {what} for `{schema}` at line {} column {}", e.line(), e.column())
}
