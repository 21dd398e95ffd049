//! Task and result envelopes, version 1 of the wire protocol.
//!
//! Parsing goes through `serde_json::Value` first so that validation can list
//! *every* problem of a bad envelope at once (serde's derive stops at the first).
//! The typed structs are what the rest of the code works with.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Largest accepted task body (contract: over 256 KiB is `payload_too_large`).
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Largest accepted interpretation message / deliberation task text.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024;
pub const MAX_ID_LEN: usize = 128;
pub const MAX_DEPENDENCIES: usize = 256;
pub const MAX_LOCK_KEYS: usize = 16;
pub const MAX_META_ENTRIES: usize = 32;
pub const MAX_HISTORY: usize = 64;
pub const MAX_CONSTRAINTS: usize = 32;
pub const MAX_AGENTS: u32 = 9;
pub const DEFAULT_AGENTS: u32 = 3;
/// One attempt may not ask for more than a day.
pub const MAX_TIMEOUT_MS: u64 = 24 * 60 * 60 * 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Interpret,
    Deliberate,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Interpret, Kind::Deliberate];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Interpret => "interpret",
            Kind::Deliberate => "deliberate",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "interpret" => Some(Kind::Interpret),
            "deliberate" => Some(Kind::Deliberate),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryTurn {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InterpretInput {
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<HistoryTurn>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliberateInput {
    pub role: String,
    pub task: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<String>,
    #[serde(default = "default_agents")]
    pub agents: u32,
}

fn default_agents() -> u32 {
    DEFAULT_AGENTS
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TaskInput {
    Interpret(InterpretInput),
    Deliberate(DeliberateInput),
}

/// A validated task. Construct it with [`parse_task`] (untrusted bytes) or
/// [`TaskEnvelope::validate`]; the fields are public for reading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskEnvelope {
    pub v: u32,
    pub id: String,
    pub kind: Kind,
    pub input: TaskInput,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lock_keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
}

impl TaskEnvelope {
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain structs of strings and numbers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Re-check a typed envelope (e.g. one built in code) against every rule.
    pub fn validate(&self) -> Result<(), Rejection> {
        parse_task(&self.to_json()).map(|_| ())
    }
}

/// Why a task was refused, with every problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: ErrorCode,
    /// The task id when it could be read and is valid, so a failed result can be reported.
    pub id: Option<String>,
    pub problems: Vec<String>,
}

impl Rejection {
    pub fn message(&self) -> String {
        self.problems.join("; ")
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message())
    }
}

impl std::error::Error for Rejection {}

pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Parse and validate an untrusted task body.
pub fn parse_task(body: &[u8]) -> Result<TaskEnvelope, Rejection> {
    if body.len() > MAX_BODY_BYTES {
        return Err(Rejection {
            code: ErrorCode::PayloadTooLarge,
            // Still parseable as an envelope: its producer is owed a failed result.
            id: head_of(body).id.filter(|id| is_valid_id(id)),
            problems: vec![format!("body is {} bytes, the limit is {MAX_BODY_BYTES}", body.len())],
        });
    }
    // serde_json refuses nesting deeper than 128 levels, so hostile depth is an error, not a stack overflow.
    let value: Value = serde_json::from_slice(body).map_err(|e| Rejection {
        code: ErrorCode::InvalidTask,
        id: None,
        problems: vec![format!("body is not valid JSON: {e}")],
    })?;
    validate_value(value)
}

/// The `id` and `kind` of a task body that will not be validated (too large,
/// or refused), read without building the rest of it in memory (pure).
#[derive(Debug, Default, Deserialize)]
pub struct Head {
    pub id: Option<String>,
    pub kind: Option<String>,
}

/// Read a body's [`Head`]; an empty one when the body is not a JSON object
/// with string `id`/`kind` (other fields are skipped, not kept).
pub fn head_of(body: &[u8]) -> Head {
    serde_json::from_slice(body).unwrap_or_default()
}

/// Validate an already-parsed JSON value as a task envelope.
pub fn validate_value(value: Value) -> Result<TaskEnvelope, Rejection> {
    let Value::Object(mut obj) = value else {
        return Err(Rejection {
            code: ErrorCode::InvalidTask,
            id: None,
            problems: vec!["envelope must be a JSON object".into()],
        });
    };
    let mut p = Problems::default();

    for key in obj.keys() {
        if !matches!(
            key.as_str(),
            "v" | "id" | "kind" | "input" | "depends_on" | "lock_keys" | "timeout_ms" | "meta"
        ) {
            p.push(format!("unknown field `{}`", truncate(key, 64)));
        }
    }

    match obj.get("v") {
        None => {}
        Some(Value::Number(n)) if n.as_u64() == Some(1) => {}
        Some(_) => p.push("`v` must be 1".into()),
    }

    let id = match obj.remove("id") {
        None => {
            p.push("`id` is required".into());
            None
        }
        Some(Value::String(s)) if is_valid_id(&s) => Some(s),
        Some(Value::String(_)) => {
            p.push("`id` must be 1-128 characters of [A-Za-z0-9._:-]".into());
            None
        }
        Some(_) => {
            p.push("`id` must be a string".into());
            None
        }
    };

    let kind = match obj.remove("kind") {
        None => {
            p.push("`kind` is required".into());
            None
        }
        Some(Value::String(s)) => match Kind::parse(&s) {
            Some(k) => Some(k),
            None => {
                p.push(format!("`kind` must be `interpret` or `deliberate`, not `{}`", truncate(&s, 32)));
                None
            }
        },
        Some(_) => {
            p.push("`kind` must be a string".into());
            None
        }
    };

    let input = match (obj.remove("input"), kind) {
        (None, _) => {
            p.push("`input` is required".into());
            None
        }
        (Some(Value::Object(input)), Some(Kind::Interpret)) => {
            parse_interpret(input, &mut p).map(TaskInput::Interpret)
        }
        (Some(Value::Object(input)), Some(Kind::Deliberate)) => {
            parse_deliberate(input, &mut p).map(TaskInput::Deliberate)
        }
        (Some(Value::Object(_)), None) => None,
        (Some(_), _) => {
            p.push("`input` must be an object".into());
            None
        }
    };

    let depends_on = string_list(obj.remove("depends_on"), "depends_on", MAX_DEPENDENCIES, &mut p);
    for dep in &depends_on {
        if !is_valid_id(dep) {
            p.push(format!("`depends_on` has an invalid id `{}`", truncate(dep, 64)));
        }
    }
    let lock_keys = string_list(obj.remove("lock_keys"), "lock_keys", MAX_LOCK_KEYS, &mut p);
    for key in &lock_keys {
        if key.is_empty() || key.len() > MAX_ID_LEN {
            p.push("`lock_keys` entries must be 1-128 characters".into());
        }
    }

    let timeout_ms = match obj.remove("timeout_ms") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(ms) if (1..=MAX_TIMEOUT_MS).contains(&ms) => Some(ms),
            _ => {
                p.push(format!("`timeout_ms` must be an integer in 1..={MAX_TIMEOUT_MS}"));
                None
            }
        },
        Some(_) => {
            p.push("`timeout_ms` must be an integer".into());
            None
        }
    };

    let mut meta = BTreeMap::new();
    match obj.remove("meta") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            if m.len() > MAX_META_ENTRIES {
                p.push(format!("`meta` may have at most {MAX_META_ENTRIES} entries"));
            }
            for (k, v) in m {
                match v {
                    Value::String(s) if s.len() <= 1024 && k.len() <= 128 => {
                        meta.insert(k, s);
                    }
                    Value::String(_) => p.push("`meta` keys are ≤ 128 and values ≤ 1024 bytes".into()),
                    _ => p.push(format!("`meta.{}` must be a string", truncate(&k, 64))),
                }
            }
        }
        Some(_) => p.push("`meta` must be an object of strings".into()),
    }

    match (p.0.is_empty(), id, kind, input) {
        (true, Some(id), Some(kind), Some(input)) => {
            Ok(TaskEnvelope { v: 1, id, kind, input, depends_on, lock_keys, timeout_ms, meta })
        }
        (_, id, _, _) => Err(Rejection { code: ErrorCode::InvalidTask, id, problems: p.0 }),
    }
}

#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn push(&mut self, s: String) {
        self.0.push(s);
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn string_list(v: Option<Value>, field: &str, max: usize, p: &mut Problems) -> Vec<String> {
    match v {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            if items.len() > max {
                p.push(format!("`{field}` may have at most {max} entries"));
            }
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::String(s) => out.push(s),
                    _ => {
                        p.push(format!("`{field}` must be an array of strings"));
                        break;
                    }
                }
            }
            out
        }
        Some(_) => {
            p.push(format!("`{field}` must be an array of strings"));
            Vec::new()
        }
    }
}

fn required_text(input: &mut Map<String, Value>, field: &str, p: &mut Problems) -> Option<String> {
    match input.remove(field) {
        None => {
            p.push(format!("`input.{field}` is required"));
            None
        }
        Some(Value::String(s)) if s.trim().is_empty() => {
            p.push(format!("`input.{field}` must not be empty"));
            None
        }
        Some(Value::String(s)) if s.len() > MAX_MESSAGE_BYTES => {
            p.push(format!("`input.{field}` is longer than {MAX_MESSAGE_BYTES} bytes"));
            None
        }
        Some(Value::String(s)) => Some(s),
        Some(_) => {
            p.push(format!("`input.{field}` must be a string"));
            None
        }
    }
}

fn reject_unknown(input: &Map<String, Value>, known: &[&str], p: &mut Problems) {
    for key in input.keys() {
        if !known.contains(&key.as_str()) {
            p.push(format!("unknown field `input.{}`", truncate(key, 64)));
        }
    }
}

fn parse_interpret(mut input: Map<String, Value>, p: &mut Problems) -> Option<InterpretInput> {
    reject_unknown(&input, &["message", "conversation_id", "history"], p);
    let message = required_text(&mut input, "message", p);
    let conversation_id = match input.remove("conversation_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.len() <= MAX_ID_LEN => Some(s),
        Some(_) => {
            p.push("`input.conversation_id` must be a string of at most 128 bytes".into());
            None
        }
    };
    let mut history = Vec::new();
    match input.remove("history") {
        None | Some(Value::Null) => {}
        Some(Value::Array(turns)) => {
            if turns.len() > MAX_HISTORY {
                p.push(format!("`input.history` may have at most {MAX_HISTORY} turns"));
            }
            for turn in turns {
                match serde_json::from_value::<HistoryTurn>(turn) {
                    Ok(t)
                        if (t.role == "user" || t.role == "assistant")
                            && t.content.len() <= MAX_MESSAGE_BYTES =>
                    {
                        history.push(t)
                    }
                    _ => {
                        p.push("`input.history` entries must be {\"role\": \"user\"|\"assistant\", \"content\": string ≤ 32 KiB}".into());
                        break;
                    }
                }
            }
        }
        Some(_) => p.push("`input.history` must be an array".into()),
    }
    Some(InterpretInput { message: message?, conversation_id, history })
}

fn parse_deliberate(mut input: Map<String, Value>, p: &mut Problems) -> Option<DeliberateInput> {
    reject_unknown(&input, &["role", "task", "constraints", "agents"], p);
    let role = match input.remove("role") {
        None => {
            p.push("`input.role` is required".into());
            None
        }
        Some(Value::String(s)) if is_valid_role(&s) => Some(s),
        Some(_) => {
            p.push("`input.role` must be 1-32 characters of [A-Za-z0-9_-]".into());
            None
        }
    };
    let task = required_text(&mut input, "task", p);
    let constraints = string_list(input.remove("constraints"), "input.constraints", MAX_CONSTRAINTS, p);
    if constraints.iter().any(|c| c.len() > 4096) {
        p.push("`input.constraints` entries must be at most 4096 bytes".into());
    }
    let agents = match input.remove("agents") {
        None | Some(Value::Null) => DEFAULT_AGENTS,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(a @ 1..=9) => a as u32,
            _ => {
                p.push(format!("`input.agents` must be an integer in 1..={MAX_AGENTS}"));
                DEFAULT_AGENTS
            }
        },
        Some(_) => {
            p.push("`input.agents` must be an integer".into());
            DEFAULT_AGENTS
        }
    };
    Some(DeliberateInput { role: role?, task: task?, constraints, agents })
}

pub fn is_valid_role(s: &str) -> bool {
    !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

// ---------------------------------------------------------------- results

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidTask,
    PayloadTooLarge,
    DependencyFailed,
    DependencyCycle,
    DependencyTimeout,
    InvalidRequest,
    GpuUnavailable,
    OutputInvalid,
    DeadlineExceeded,
    Cancelled,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidTask => "invalid_task",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::DependencyFailed => "dependency_failed",
            ErrorCode::DependencyCycle => "dependency_cycle",
            ErrorCode::DependencyTimeout => "dependency_timeout",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::GpuUnavailable => "gpu_unavailable",
            ErrorCode::OutputInvalid => "output_invalid",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Succeeded,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, rhs: Usage) {
        self.prompt_tokens += rhs.prompt_tokens;
        self.completion_tokens += rhs.completion_tokens;
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultEnvelope {
    pub v: u32,
    pub id: String,
    pub kind: Kind,
    pub status: Status,
    pub output: Option<Value>,
    pub error: Option<ErrorBody>,
    pub attempts: u32,
    pub worker: String,
    pub trace_id: String,
    pub started_at: String,
    pub finished_at: String,
    pub usage: Usage,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
}

impl ResultEnvelope {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn error_code(&self) -> Option<ErrorCode> {
        self.error.as_ref().map(|e| e.code)
    }
}

// ---------------------------------------------------------------- outputs

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Intent {
    OpenWork,
    UpdateWork,
    Confirm,
    Cancel,
    Chat,
}

impl Intent {
    pub fn as_str(self) -> &'static str {
        match self {
            Intent::OpenWork => "open_work",
            Intent::UpdateWork => "update_work",
            Intent::Confirm => "confirm",
            Intent::Cancel => "cancel",
            Intent::Chat => "chat",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Work {
    pub title: String,
    pub summary: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InterpretOutput {
    pub intent: Intent,
    pub confidence: f64,
    pub work: Option<Work>,
    pub reply: Option<String>,
    pub degraded: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Review {
    pub reviewer: String,
    pub score: f64,
    pub comment: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    pub agent: String,
    pub content: String,
    pub score: f64,
    pub reviews: Vec<Review>,
    pub usage: Usage,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliberateOutput {
    pub proposals: Vec<Proposal>,
    pub winner: String,
    pub agents_failed: u32,
}

/// RFC 3339 UTC timestamp with milliseconds, as the contract shows.
pub fn now_rfc3339() -> String {
    rfc3339_millis(time::OffsetDateTime::now_utc())
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` of a UTC time, written digit by digit: taken four
/// times a task, `time`'s general formatter was ~2.5 % of a worker's instructions.
/// Years outside 0..=9999 do not occur on a clock; they are clamped, not garbled.
fn rfc3339_millis(t: time::OffsetDateTime) -> String {
    fn digits(out: &mut Vec<u8>, value: u32, width: u32) {
        for place in (0..width).rev() {
            out.push(b'0' + (value / 10u32.pow(place) % 10) as u8);
        }
    }
    let mut out = Vec::with_capacity(24);
    digits(&mut out, t.year().clamp(0, 9999) as u32, 4);
    out.push(b'-');
    digits(&mut out, u8::from(t.month()) as u32, 2);
    out.push(b'-');
    digits(&mut out, t.day() as u32, 2);
    out.push(b'T');
    digits(&mut out, t.hour() as u32, 2);
    out.push(b':');
    digits(&mut out, t.minute() as u32, 2);
    out.push(b':');
    digits(&mut out, t.second() as u32, 2);
    out.push(b'.');
    digits(&mut out, t.millisecond() as u32, 3);
    out.push(b'Z');
    // Only ASCII digits and separators were written.
    String::from_utf8(out).unwrap_or_default()
}

/// Milliseconds between two of our RFC 3339 timestamps (`to` − `from`);
/// `None` when either does not parse (pure).
pub fn millis_between(from: &str, to: &str) -> Option<f64> {
    let parse = |s: &str| time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok();
    let (a, b) = (parse(from)?, parse(to)?);
    Some((b - a).as_seconds_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_between_timestamps() {
        assert_eq!(millis_between("2026-12-03T08:00:00.250Z", "2026-12-03T08:00:01.000Z"), Some(750.0));
        assert_eq!(millis_between("2026-12-03T08:00:01.000Z", "2026-12-03T08:00:00.000Z"), Some(-1000.0));
        assert_eq!(millis_between("yesterday", "2026-12-03T08:00:00.000Z"), None);
        let now = now_rfc3339();
        assert_eq!(millis_between(&now, &now), Some(0.0));
    }

    #[test]
    fn timestamps_are_written_as_the_general_formatter_writes_them() {
        let fmt = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        let at =
            |unix_ms: i128| time::OffsetDateTime::from_unix_timestamp_nanos(unix_ms * 1_000_000).unwrap();
        // The epoch, a leap day, the last millisecond of a year, and now.
        let now = time::OffsetDateTime::now_utc();
        for t in [at(0), at(951_782_400_007), at(1_798_761_599_999), now] {
            assert_eq!(rfc3339_millis(t), t.format(&fmt).unwrap());
        }
        assert_eq!(rfc3339_millis(at(1_798_761_599_999)), "2026-12-31T23:59:59.999Z");
    }
    use serde_json::json;

    fn parse(v: Value) -> Result<TaskEnvelope, Rejection> {
        parse_task(&serde_json::to_vec(&v).unwrap())
    }

    #[test]
    fn contract_example_parses() {
        let t = parse(json!({
            "v": 1, "id": "conv-42:msg-7", "kind": "interpret",
            "input": {"message": "Abrí un trabajo para cambiar la bomba del pozo 3"},
            "depends_on": [], "lock_keys": [], "timeout_ms": 60000,
            "meta": {"tenant": "acme"}
        }))
        .unwrap();
        assert_eq!(t.id, "conv-42:msg-7");
        assert_eq!(t.kind, Kind::Interpret);
        assert_eq!(t.meta["tenant"], "acme");
        assert_eq!(t.timeout_ms, Some(60000));
        // Round trip through our own serialisation stays valid.
        assert_eq!(parse_task(&t.to_json()).unwrap(), t);
    }

    #[test]
    fn deliberate_defaults_to_three_agents() {
        let t =
            parse(json!({"id": "d1", "kind": "deliberate", "input": {"role": "DEV", "task": "x"}})).unwrap();
        match t.input {
            TaskInput::Deliberate(d) => assert_eq!(d.agents, 3),
            other => panic!("wrong input {other:?}"),
        }
    }

    #[test]
    fn every_problem_is_listed() {
        let r = parse(json!({
            "id": "bad id!", "kind": "launch", "input": 3, "extra": true,
            "timeout_ms": -1, "meta": {"a": 1}, "lock_keys": "x"
        }))
        .unwrap_err();
        assert_eq!(r.code, ErrorCode::InvalidTask);
        assert_eq!(r.id, None);
        let all = r.message();
        for needle in [
            "unknown field `extra`",
            "`id` must be",
            "`kind` must be",
            "`input` must be an object",
            "`timeout_ms`",
            "`meta.a`",
            "`lock_keys`",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in {all}");
        }
        assert!(r.problems.len() >= 7, "{:?}", r.problems);
    }

    #[test]
    fn id_is_reported_when_valid_even_if_rest_is_bad() {
        let r = parse(json!({"id": "ok-1", "kind": "interpret", "input": {"message": ""}})).unwrap_err();
        assert_eq!(r.id.as_deref(), Some("ok-1"));
        assert!(r.message().contains("must not be empty"));
    }

    #[test]
    fn missing_fields_and_unknown_input_fields() {
        let r = parse(json!({"kind": "interpret", "input": {"msg": "hi"}})).unwrap_err();
        let all = r.message();
        assert!(all.contains("`id` is required"));
        assert!(all.contains("unknown field `input.msg`"));
        assert!(all.contains("`input.message` is required"));
    }

    #[test]
    fn oversize_body_is_payload_too_large() {
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        let refused = parse_task(&big).unwrap_err();
        assert_eq!((refused.code, refused.id), (ErrorCode::PayloadTooLarge, None));
        // An envelope, only too large: its id is read, so its producer gets a failed result.
        let message = "x".repeat(MAX_BODY_BYTES);
        let task = json!({"id": "big-1", "kind": "deliberate", "input": {"message": message}}).to_string();
        let refused = parse_task(task.as_bytes()).unwrap_err();
        assert_eq!((refused.code, refused.id.as_deref()), (ErrorCode::PayloadTooLarge, Some("big-1")));
        assert_eq!(head_of(task.as_bytes()).kind.as_deref(), Some("deliberate"));
        // An id that is not a valid id is not one to report under.
        let bad_id = json!({"id": "no spaces", "input": {"message": message}}).to_string();
        assert_eq!(parse_task(bad_id.as_bytes()).unwrap_err().id, None);
    }

    #[test]
    fn hostile_inputs_are_errors_not_panics() {
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        assert_eq!(parse_task(deep.as_bytes()).unwrap_err().code, ErrorCode::InvalidTask);
        assert!(parse_task(&[0xff, 0xfe, b'{']).is_err());
        assert!(parse_task(b"").is_err());
        assert!(parse_task(b"null").is_err());
        assert!(parse_task(b"[]").is_err());
    }

    #[test]
    fn agents_range_and_long_message() {
        let r = parse(
            json!({"id": "d", "kind": "deliberate", "input": {"role": "DEV", "task": "t", "agents": 10}}),
        )
        .unwrap_err();
        assert!(r.message().contains("input.agents"));
        let long = "x".repeat(MAX_MESSAGE_BYTES + 1);
        let r = parse(json!({"id": "i", "kind": "interpret", "input": {"message": long}})).unwrap_err();
        assert!(r.message().contains("longer than"));
    }

    #[test]
    fn ids() {
        assert!(is_valid_id("conv-42:msg-7"));
        assert!(is_valid_id(&"a".repeat(128)));
        assert!(!is_valid_id(&"a".repeat(129)));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id("ñ"));
    }

    #[test]
    fn result_envelope_round_trips() {
        let r = ResultEnvelope {
            v: 1,
            id: "x".into(),
            kind: Kind::Interpret,
            status: Status::Failed,
            output: None,
            error: Some(ErrorBody { code: ErrorCode::OutputInvalid, message: "m".into() }),
            attempts: 2,
            worker: "w".into(),
            trace_id: "t".into(),
            started_at: now_rfc3339(),
            finished_at: now_rfc3339(),
            usage: Usage::default(),
            meta: BTreeMap::new(),
        };
        let back: ResultEnvelope = serde_json::from_slice(&r.to_json()).unwrap();
        assert_eq!(back, r);
        assert!(String::from_utf8(r.to_json()).unwrap().contains("\"output_invalid\""));
    }
}
