//! Reviews: a score from 0 to 10 with a one-sentence comment, stable for the same proposal.

use serde_json::{Value, json};

/// Flota's workers put the proposal under review after this line; without it
/// the whole message is taken as the proposal.
pub const PROPOSAL_MARKER: &str = "--- proposal ---";

/// 6, plus up to 3 from the proposal's hash, plus 1 for a substantial (≥ 40
/// words) proposal; at most 10, one decimal.
pub fn score(proposal: &str) -> f64 {
    let proposal = proposal.trim();
    let from_hash = (super::fnv(proposal) % 31) as f64 / 10.0;
    let bonus = if proposal.split_whitespace().count() >= 40 { 1.0 } else { 0.0 };
    ((6.0 + from_hash + bonus).min(10.0) * 10.0).round() / 10.0
}

fn comment(score: f64) -> String {
    let verdict = if score >= 9.5 {
        "excellent: clear, concrete and actionable; I would adopt it as is."
    } else if score >= 8.5 {
        "strong and actionable; I would only add owners for each step."
    } else if score >= 7.5 {
        "solid plan; would add rollback steps and how success is measured."
    } else if score >= 6.5 {
        "reasonable direction, but the steps need more detail and a risk list."
    } else {
        "too vague to act on; it needs concrete steps, owners and risks."
    };
    format!("{score}/10: {verdict}")
}

/// The model's answer to a review request whose last user message is `request_text`.
pub fn answer(request_text: &str) -> Value {
    let proposal = match request_text.split_once(PROPOSAL_MARKER) {
        Some((_, p)) => p,
        None => request_text,
    };
    let s = score(proposal);
    json!({"score": s, "comment": comment(s)})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_are_stable_and_in_range() {
        let long = "word ".repeat(60);
        for p in ["", "a", "a longer proposal text", long.as_str()] {
            let s = score(p);
            assert!((6.0..=10.0).contains(&s), "{s}");
            assert_eq!(s, score(p));
            assert_eq!((s * 10.0).round() / 10.0, s, "one decimal");
        }
        assert!(score(&long) >= 7.0, "long proposals get the bonus");
    }

    #[test]
    fn the_proposal_follows_the_marker() {
        let a = answer("Task: x\nReview the proposal by DEV-1 below.\n--- proposal ---\nplan A");
        let b = answer("Task: y\nReview the proposal by DEV-2 below.\n--- proposal ---\nplan A");
        assert_eq!(a, b, "only the proposal matters");
        let s = a["score"].as_f64().unwrap();
        assert!(a["comment"].as_str().unwrap().starts_with(&format!("{s}/10")));
    }
}
