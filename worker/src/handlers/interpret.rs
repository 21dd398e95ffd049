//! Interpretation: one GPU call with a JSON-schema response format; the answer
//! is parsed strictly into typed structs; invalid output is asked again a
//! bounded number of times, then the task fails with `output_invalid`.

use serde::Deserialize;

use flota_shared::envelope::{Intent, InterpretInput, InterpretOutput, Usage, Work};

use super::{HandlerOutput, HandlerResult, TaskCtx};
use crate::error::TaskError;
use crate::gpu::{ChatRequest, GpuError};
use crate::prompts;

/// What the model may say: unknown fields refused, enums checked, lengths capped.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelAnswer {
    intent: Intent,
    confidence: f64,
    #[serde(default)]
    work: Option<Work>,
    #[serde(default)]
    reply: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    degraded: Option<bool>,
}

/// Parse and check a model answer (pure).
pub fn parse_answer(content: &str) -> Result<InterpretOutput, String> {
    let a: ModelAnswer = serde_json::from_str(content.trim())
        .map_err(|e| crate::prompts::schema_problem("interpretation", &e))?;
    if !(0.0..=1.0).contains(&a.confidence) || a.confidence.is_nan() {
        return Err("confidence outside 0..1".into());
    }
    let needs_work = matches!(a.intent, Intent::OpenWork | Intent::UpdateWork);
    let work = match (needs_work, a.work) {
        (true, Some(w)) => {
            if w.title.trim().is_empty() || w.title.chars().count() > prompts::MAX_TITLE_CHARS {
                return Err("work title empty or too long".into());
            }
            if w.summary.chars().count() > prompts::MAX_SUMMARY_CHARS {
                return Err("work summary too long".into());
            }
            Some(Work { title: w.title.trim().to_string(), summary: w.summary })
        }
        (true, None) => return Err("work is required for open_work/update_work".into()),
        (false, _) => None,
    };
    if a.reply.as_ref().is_some_and(|r| r.chars().count() > prompts::MAX_REPLY_CHARS) {
        return Err("reply too long".into());
    }
    Ok(InterpretOutput { intent: a.intent, confidence: a.confidence, work, reply: a.reply, degraded: false })
}

/// The answer when the GPU path is unavailable: plain chat, as the product wants.
pub fn degraded_output() -> InterpretOutput {
    InterpretOutput { intent: Intent::Chat, confidence: 0.0, work: None, reply: None, degraded: true }
}

pub async fn run(ctx: &TaskCtx, input: &InterpretInput) -> HandlerResult {
    let request = ChatRequest {
        messages: prompts::interpretation_messages(input),
        max_tokens: prompts::INTERPRET_MAX_TOKENS,
        temperature: 0.0,
        response_format: Some(prompts::interpretation_format()),
        user: None,
        model: None,
    };
    let mut usage = Usage::default();
    let mut last_problem = String::new();
    for _ in 0..=ctx.output_retries {
        let completion = match ctx.gpu.chat(&request, ctx.deadline, &ctx.traceparent).await {
            Ok(c) => c,
            // The GPU path is down: answer as plain chat at once, as the product wants.
            Err(GpuError::BreakerOpen) => {
                tracing::info!(message = "Breaker open; interpretation degraded to chat.", task_id = %ctx.task_id);
                return Ok(HandlerOutput {
                    output: serde_json::to_value(degraded_output()).unwrap_or_default(),
                    usage,
                });
            }
            Err(e) => return Err(e.into()),
        };
        usage += completion.usage;
        match parse_answer(&completion.content) {
            Ok(out) => {
                return Ok(HandlerOutput { output: serde_json::to_value(&out).unwrap_or_default(), usage });
            }
            Err(problem) => {
                tracing::warn!(message = "Model output failed its schema.", task_id = %ctx.task_id, %problem);
                last_problem = problem;
            }
        }
    }
    Err(TaskError::OutputInvalid(last_problem))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_a_good_answer() {
        let out = parse_answer(r#"{"intent":"open_work","confidence":0.92,"work":{"title":"Cambiar bomba del pozo 3","summary":"s"},"reply":null,"degraded":false}"#).unwrap();
        assert_eq!(out.intent, Intent::OpenWork);
        assert_eq!(out.work.unwrap().title, "Cambiar bomba del pozo 3");
        assert!(!out.degraded);
    }

    #[test]
    fn refuses_bad_answers() {
        for bad in [
            r#"{"intent":"launch_rockets","confidence":0.5,"work":null,"reply":null}"#,
            r#"{"intent":"chat","confidence":7,"work":null,"reply":null}"#,
            r#"{"intent":"chat","confidence":0.5,"work":null,"reply":null,"extra":"x"}"#,
            r#"{"intent":"open_work","confidence":0.5,"work":null,"reply":null}"#,
            "I cannot answer in JSON",
            "",
        ] {
            assert!(parse_answer(bad).is_err(), "{bad}");
        }
        let huge = format!(
            r#"{{"intent":"open_work","confidence":0.5,"work":{{"title":"{}","summary":""}},"reply":null}}"#,
            "t".repeat(500)
        );
        assert!(parse_answer(&huge).is_err());
    }

    #[test]
    fn chat_drops_any_work_the_model_invents() {
        let out = parse_answer(
            r#"{"intent":"chat","confidence":0.6,"work":{"title":"x","summary":"y"},"reply":"hola"}"#,
        )
        .unwrap();
        assert!(out.work.is_none());
        assert_eq!(out.reply.as_deref(), Some("hola"));
    }
}
