//! Deterministic answers for Flota's prompts: the same request always gets the
//! same content. What is generated depends on `response_format` (see the crate README).

pub mod interpret;
pub mod proposal;
pub mod review;
pub mod schema;

use serde_json::{Value, json};

/// What a request asked for; also the `served_by_kind` keys of `/stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Interpretation,
    Review,
    Proposal,
    Json,
    Text,
}

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::Interpretation, Kind::Review, Kind::Proposal, Kind::Json, Kind::Text];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Interpretation => "interpretation",
            Kind::Review => "review",
            Kind::Proposal => "proposal",
            Kind::Json => "json",
            Kind::Text => "text",
        }
    }

    /// Free text may be cut at `max_tokens` like a real model's; JSON is always
    /// sent whole, since a structured-output client cannot use half an object.
    pub fn is_free_text(self) -> bool {
        matches!(self, Kind::Proposal | Kind::Text)
    }
}

/// A request's `response_format`, understood.
#[derive(Debug, Clone, PartialEq)]
pub enum Format {
    /// No `response_format`: a free-text proposal.
    Proposal,
    /// `{"type": "text"}`: also a proposal, counted apart.
    Text,
    /// `{"type": "json_object"}`.
    JsonObject,
    /// A `json_schema` named like "interpretation".
    Interpretation,
    /// A `json_schema` named like "review".
    Review,
    /// Any other `json_schema`: an instance of its schema.
    Schema(Value),
}

impl Format {
    /// Read `response_format`; an error is a message for a 400, as vLLM refuses unknown types.
    pub fn parse(response_format: Option<&Value>) -> Result<Format, String> {
        let Some(rf) = response_format.filter(|v| !v.is_null()) else { return Ok(Format::Proposal) };
        match rf.get("type").and_then(Value::as_str) {
            Some("text") => Ok(Format::Text),
            Some("json_object") => Ok(Format::JsonObject),
            Some("json_schema") => {
                let Some(js) = rf.get("json_schema").filter(|v| v.is_object()) else {
                    return Err("response_format.json_schema must be an object".to_string());
                };
                let name = js.get("name").and_then(Value::as_str).unwrap_or("").to_lowercase();
                if name.contains("interpret") {
                    Ok(Format::Interpretation)
                } else if name.contains("review") {
                    Ok(Format::Review)
                } else {
                    Ok(Format::Schema(js.get("schema").cloned().unwrap_or_else(|| json!({}))))
                }
            }
            Some(other) => Err(format!(
                "response_format.type must be one of 'text', 'json_object', 'json_schema', got '{other}'"
            )),
            None => Err("response_format.type is required".to_string()),
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Format::Proposal => Kind::Proposal,
            Format::Text => Kind::Text,
            Format::JsonObject | Format::Schema(_) => Kind::Json,
            Format::Interpretation => Kind::Interpretation,
            Format::Review => Kind::Review,
        }
    }
}

/// The parts of a conversation the generators look at.
#[derive(Debug, Clone, Copy, Default)]
pub struct Prompt<'a> {
    /// The first system message (the agent's persona).
    pub system: &'a str,
    /// The last user message (the task, the message to interpret, or the proposal to review).
    pub last_user: &'a str,
    /// The OpenAI `user` field (the agent's name, e.g. "DEV-2").
    pub user: &'a str,
}

/// The assistant's content for `format`.
pub fn generate(format: &Format, p: Prompt<'_>) -> String {
    match format {
        Format::Proposal | Format::Text => proposal::answer(p.system, p.user, p.last_user),
        Format::JsonObject => json!({"result": "ok"}).to_string(),
        Format::Interpretation => interpret::answer(p.last_user).to_string(),
        Format::Review => review::answer(p.last_user).to_string(),
        Format::Schema(s) => schema::instance(s).to_string(),
    }
}

/// Content that breaks the contract the way a misbehaving model does.
pub fn invalid(kind: Kind) -> String {
    match kind {
        // Wrong enum value, out-of-range confidence, an extra field, required fields missing.
        Kind::Interpretation => r#"{"intent":"launch_rockets","confidence":7,"extra":"x"}"#.to_string(),
        Kind::Review => r#"{"score":"high"}"#.to_string(),
        _ => "I cannot answer in JSON".to_string(),
    }
}

/// FNV-1a: a hash that is stable across processes (std's hasher is randomised).
pub fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Rough token count, ~4 characters per token, rounded up.
pub fn tokens(s: &str) -> u64 {
    (s.chars().count() as u64).div_ceil(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_dispatch_by_type_and_name() {
        let js = |name: &str| json!({"type": "json_schema", "json_schema": {"name": name, "schema": {"type": "object"}}});
        assert_eq!(Format::parse(None), Ok(Format::Proposal));
        assert_eq!(Format::parse(Some(&Value::Null)), Ok(Format::Proposal));
        assert_eq!(Format::parse(Some(&json!({"type": "text"}))), Ok(Format::Text));
        assert_eq!(Format::parse(Some(&json!({"type": "json_object"}))), Ok(Format::JsonObject));
        assert_eq!(Format::parse(Some(&js("Interpretation"))), Ok(Format::Interpretation));
        assert_eq!(Format::parse(Some(&js("interpret_v2"))), Ok(Format::Interpretation));
        assert_eq!(Format::parse(Some(&js("REVIEW"))), Ok(Format::Review));
        assert_eq!(Format::parse(Some(&js("ticket"))), Ok(Format::Schema(json!({"type": "object"}))));
        assert!(Format::parse(Some(&json!({"type": "xml"}))).is_err());
        assert!(Format::parse(Some(&json!({"type": "json_schema"}))).is_err());
        assert!(Format::parse(Some(&json!("json"))).is_err());
    }

    #[test]
    fn invalid_outputs_break_the_contract() {
        let i: Value = serde_json::from_str(&invalid(Kind::Interpretation)).unwrap();
        assert_eq!(i["intent"], "launch_rockets");
        assert!(i.get("extra").is_some());
        assert!(serde_json::from_str::<Value>(&invalid(Kind::Review)).unwrap()["score"].is_string());
        assert!(serde_json::from_str::<Value>(&invalid(Kind::Json)).is_err());
    }

    #[test]
    fn tokens_and_hash() {
        assert_eq!(tokens(""), 0);
        assert_eq!(tokens("abcde"), 2);
        assert_eq!(tokens("ñññ"), 1);
        assert_eq!(fnv("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
