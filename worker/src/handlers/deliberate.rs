//! Deliberation: a council of N agents. Every agent writes a proposal
//! concurrently; then every surviving agent reviews every other proposal,
//! all reviews concurrently; proposals are ranked by mean review score. So a
//! deliberation costs about two GPU round trips, whatever N is.
//!
//! Agent failures are tolerated up to a quorum (the council's `quorum`
//! proposals must survive, a majority by default), and every finished agent call is checkpointed under the task, so
//! a redelivered deliberation resumes without repeating finished GPU calls.

use futures::future::join_all;
use serde::{Deserialize, Serialize};

use flota_shared::council::Agent;
use flota_shared::envelope::{DeliberateInput, DeliberateOutput, Proposal, Review, Usage};

use super::{HandlerOutput, HandlerResult, TaskCtx};
use crate::error::TaskError;
use crate::gpu::{ChatRequest, GpuError};
use crate::prompts;

const MAX_PROPOSAL_CHARS: usize = 20_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReviewAnswer {
    score: f64,
    comment: String,
}

/// A finished agent call, as checkpointed.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Done<T> {
    value: T,
    usage: Usage,
}

/// Parse and check one review answer (pure).
pub fn parse_review(content: &str) -> Result<(f64, String), String> {
    let r: ReviewAnswer =
        serde_json::from_str(content.trim()).map_err(|e| crate::prompts::schema_problem("review", &e))?;
    if !(0.0..=10.0).contains(&r.score) || r.score.is_nan() {
        return Err("score outside 0..10".into());
    }
    if r.comment.chars().count() > prompts::MAX_COMMENT_CHARS {
        return Err("comment too long".into());
    }
    Ok((r.score, r.comment))
}

/// Mean review score (0 when nobody could review).
pub fn mean_score(reviews: &[Review]) -> f64 {
    if reviews.is_empty() {
        return 0.0;
    }
    let mean = reviews.iter().map(|r| r.score).sum::<f64>() / reviews.len() as f64;
    (mean * 100.0).round() / 100.0
}

/// Sort best first: by mean score, ties broken by agent order (deterministic).
pub fn rank(mut proposals: Vec<(usize, Proposal)>) -> Vec<Proposal> {
    proposals.sort_by(|(ia, a), (ib, b)| b.score.total_cmp(&a.score).then(ia.cmp(ib)));
    proposals.into_iter().map(|(_, p)| p).collect()
}

/// Run one agent call unless it was checkpointed; checkpoint it when it succeeds.
async fn checkpointed<T, F>(ctx: &TaskCtx, field: String, call: F) -> Result<Done<T>, GpuError>
where
    T: Serialize + for<'de> Deserialize<'de>,
    F: std::future::Future<Output = Result<Done<T>, GpuError>>,
{
    if let Some(store) = &ctx.checkpoints
        && let Ok(Some(raw)) = store.checkpoint_get(&ctx.task_id, &field).await
        && let Ok(done) = serde_json::from_str::<Done<T>>(&raw)
    {
        return Ok(done);
    }
    let done = call.await?;
    if let Some(store) = &ctx.checkpoints {
        let raw = serde_json::to_string(&done).unwrap_or_default();
        if let Err(e) = store.checkpoint_put(&ctx.task_id, &field, &raw).await {
            // Losing a checkpoint costs a repeated call on redelivery, not correctness.
            tracing::warn!(message = "Checkpoint not written.", task_id = %ctx.task_id, error = %e);
        }
    }
    Ok(done)
}

/// `quorum`: proposals that must survive (`Council::quorum_of`).
pub async fn run(ctx: &TaskCtx, input: &DeliberateInput, seats: &[Agent], quorum: usize) -> HandlerResult {
    let n = seats.len();
    let names: Vec<String> = (0..n).map(|i| prompts::agent_name(&input.role, i)).collect();

    // Round 1: every agent proposes, concurrently.
    let proposals = join_all((0..n).map(|i| {
        let req = ChatRequest {
            messages: prompts::proposal_messages(&seats[i].persona, input),
            max_tokens: prompts::PROPOSAL_MAX_TOKENS,
            temperature: seats[i].temperature,
            response_format: None,
            user: Some(names[i].clone()),
            model: seats[i].model.clone(),
        };
        checkpointed(ctx, format!("p:{i}"), async move {
            let c = ctx.gpu.chat(&req, ctx.deadline, &ctx.traceparent).await?;
            Ok(Done { value: c.content, usage: c.usage })
        })
    }))
    .await;

    let mut usage = Usage::default();
    let mut agent_usage = vec![Usage::default(); n];
    let mut survivors: Vec<(usize, String)> = Vec::new();
    let mut last_error: Option<GpuError> = None;
    for (i, result) in proposals.into_iter().enumerate() {
        match result {
            Ok(d) if !d.value.trim().is_empty() && d.value.chars().count() <= MAX_PROPOSAL_CHARS => {
                usage += d.usage;
                agent_usage[i] += d.usage;
                survivors.push((i, d.value));
            }
            Ok(d) => {
                usage += d.usage;
                tracing::warn!(message = "Agent proposal empty or too long.", task_id = %ctx.task_id, agent = %names[i]);
            }
            Err(e) => {
                tracing::warn!(message = "Agent proposal failed.", task_id = %ctx.task_id, agent = %names[i], error = %e);
                last_error = Some(e);
            }
        }
    }
    let agents_failed = n - survivors.len();
    if survivors.len() < quorum {
        let err = match last_error {
            Some(e) => TaskError::Gpu(e),
            None => {
                TaskError::OutputInvalid(format!("{agents_failed} of {n} agents produced no usable proposal"))
            }
        };
        return Err(err.with_context(format!(
            "quorum not reached: {} of {n} proposals survived, {} needed",
            survivors.len(),
            quorum
        )));
    }

    // Round 2: every surviving agent reviews every other proposal, all at once.
    let pairs: Vec<(usize, usize)> = survivors
        .iter()
        .flat_map(|(reviewer, _)| {
            survivors
                .iter()
                .filter(move |(author, _)| author != reviewer)
                .map(move |(author, _)| (*reviewer, *author))
        })
        .collect();
    let content_of =
        |agent: usize| survivors.iter().find(|(i, _)| *i == agent).map(|(_, c)| c.as_str()).unwrap_or("");
    let reviews = join_all(pairs.iter().map(|&(reviewer, author)| {
        let req = ChatRequest {
            messages: prompts::review_messages(&seats[reviewer].persona, input, &names[author], content_of(author)),
            max_tokens: prompts::REVIEW_MAX_TOKENS,
            temperature: 0.0,
            response_format: Some(prompts::review_format()),
            user: Some(names[reviewer].clone()),
            model: seats[reviewer].model.clone(),
        };
        checkpointed(ctx, format!("r:{reviewer}:{author}"), async move {
            let mut used = Usage::default();
            for _ in 0..=ctx.output_retries {
                let c = ctx.gpu.chat(&req, ctx.deadline, &ctx.traceparent).await?;
                used += c.usage;
                match parse_review(&c.content) {
                    Ok(r) => return Ok(Done { value: r, usage: used }),
                    Err(p) => tracing::warn!(message = "Review failed its schema.", task_id = %ctx.task_id, problem = %p),
                }
            }
            Err(GpuError::Invalid { status: 0, message: "review output invalid".into() })
        })
    }))
    .await;

    let mut by_author: Vec<Vec<Review>> = vec![Vec::new(); n];
    for (&(reviewer, author), result) in pairs.iter().zip(reviews) {
        match result {
            Ok(Done { value: (score, comment), usage: used }) => {
                usage += used;
                agent_usage[reviewer] += used;
                by_author[author].push(Review { reviewer: names[reviewer].clone(), score, comment });
            }
            Err(e) => {
                tracing::warn!(message = "A review was lost.", task_id = %ctx.task_id, reviewer = %names[reviewer], error = %e);
            }
        }
    }

    let ranked = rank(
        survivors
            .into_iter()
            .map(|(i, content)| {
                let reviews = std::mem::take(&mut by_author[i]);
                let score = mean_score(&reviews);
                (i, Proposal { agent: names[i].clone(), content, score, reviews, usage: agent_usage[i] })
            })
            .collect(),
    );
    let winner = ranked.first().map(|p| p.agent.clone()).unwrap_or_default();
    let output = DeliberateOutput { proposals: ranked, winner, agents_failed: agents_failed as u32 };
    Ok(HandlerOutput { output: serde_json::to_value(&output).unwrap_or_default(), usage })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(agent: &str, score: f64) -> Proposal {
        Proposal {
            agent: agent.into(),
            content: String::new(),
            score,
            reviews: vec![],
            usage: Usage::default(),
        }
    }

    #[test]
    fn ranking_is_by_score_then_agent_order() {
        let ranked = rank(vec![(0, p("A", 7.0)), (1, p("B", 9.0)), (2, p("C", 9.0))]);
        let order: Vec<_> = ranked.iter().map(|p| p.agent.as_str()).collect();
        assert_eq!(order, ["B", "C", "A"]);
    }

    #[test]
    fn mean_of_reviews() {
        let r = |s| Review { reviewer: "x".into(), score: s, comment: String::new() };
        assert_eq!(mean_score(&[]), 0.0);
        assert_eq!(mean_score(&[r(8.0), r(9.0)]), 8.5);
    }

    #[test]
    fn review_parsing_is_strict() {
        assert_eq!(parse_review(r#"{"score": 8, "comment": "good"}"#).unwrap().0, 8.0);
        assert!(parse_review(r#"{"score": "high"}"#).is_err());
        assert!(parse_review(r#"{"score": 11, "comment": ""}"#).is_err());
        assert!(parse_review(r#"{"score": 5, "comment": "", "x": 1}"#).is_err());
    }
}
