//! Free-text proposals: 60–150 words built from the task and the persona. The
//! phrasing follows a stable hash of the agent (`user` field and system
//! prompt), so agents of a council propose different plans, and the same
//! request always gets the same text.

const OPENERS: &[&str] = &["To address", "For", "My plan for", "Regarding", "To deliver"];
const PLANS: &[[&str; 4]] = &[
    [
        "map the current behaviour and who owns each part",
        "write the failing tests first",
        "ship the change behind a feature flag",
        "watch the error rate for a week before removing the flag",
    ],
    [
        "agree on the interface and its limits with the consumers",
        "implement the smallest slice end to end",
        "load-test it at twice today's peak",
        "write the runbook and hand it to on-call",
    ],
    [
        "list the risks and how each one is detected",
        "automate the rollback before anything else",
        "roll out to one site, then to all of them",
        "review the metrics with the team after each stage",
    ],
    [
        "measure the baseline so we know what good looks like",
        "split the work into independent, reviewable changes",
        "pair on the riskiest change",
        "run a short retrospective and fold the lessons into the checklist",
    ],
    [
        "interview the people who do this work today",
        "prototype the simplest version in a day",
        "pilot it with one crew and collect their feedback",
        "iterate twice before the general rollout",
    ],
];
const ASIDES: &[&str] = &[
    "Keep every change small and reversible.",
    "Prefer boring, proven tools over clever ones.",
    "Measure before and after every step.",
    "Write down each decision and why it was taken.",
    "Make failures loud and cheap to recover from.",
];

/// The lens the persona suggests, from a few telling words in the system prompt.
fn focus(system: &str) -> &'static str {
    let s = system.to_lowercase();
    let has = |ws: &[&str]| ws.iter().any(|w| s.contains(w));
    if has(&["secur", "segur"]) {
        "security"
    } else if has(&["qa", "test", "quality", "calidad"]) {
        "quality"
    } else if has(&["ops", "sre", "operat", "reliab"]) {
        "operations"
    } else if has(&["product", "user", "usuario", "client"]) {
        "product"
    } else {
        "engineering"
    }
}

fn with_article(word: &str) -> String {
    let article = if word.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
    format!("{article} {word}")
}

/// The task itself: the text after "Task:" on its line if the prompt has one,
/// else the first line.
fn task_words(task: &str) -> Vec<&str> {
    let line = task
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("Task:"))
        .or_else(|| task.lines().find(|l| !l.trim().is_empty()))
        .unwrap_or("");
    line.split_whitespace().take(12).collect()
}

pub fn answer(system: &str, user_field: &str, task: &str) -> String {
    let h = super::fnv(&format!("{user_field}\u{0}{system}"));
    let pick = |shift: u32, n: usize| ((h >> shift) % n as u64) as usize;
    let who = if user_field.trim().is_empty() { "agent" } else { user_field.trim() };
    let words = task_words(task);
    let topic = if words.is_empty() { "this task".to_string() } else { words.join(" ") };
    let topic = topic.trim_end_matches(|c: char| !c.is_alphanumeric());
    let plan = &PLANS[pick(0, PLANS.len())];
    let first_aside = pick(16, ASIDES.len());
    let second_aside = (first_aside + 1 + pick(24, ASIDES.len() - 1)) % ASIDES.len();
    format!(
        "Proposal ({who}): {opener} {topic}, I would 1) {}, 2) {}, 3) {}, and 4) {}. \
         From {focus} point of view, the first step matters most, because it tells us early \
         whether the rest of the plan holds. {} {} This keeps the blast radius small, gives the \
         team clear checkpoints, and leaves an audit trail for every decision taken along the way.",
        plan[0],
        plan[1],
        plan[2],
        plan[3],
        ASIDES[first_aside],
        ASIDES[second_aside],
        opener = OPENERS[pick(8, OPENERS.len())],
        focus = with_article(focus(system)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_differ_and_answers_repeat() {
        let task = "Task: add retries to the billing client\nWrite your proposal";
        let a = answer("You are a careful QA engineer.", "QA-1", task);
        let b = answer("You are a pragmatic developer.", "DEV-2", task);
        assert_eq!(a, answer("You are a careful QA engineer.", "QA-1", task));
        assert_ne!(a, b);
        assert!(a.starts_with("Proposal (QA-1): "), "{a}");
        assert!(a.contains("add retries to the billing client,"), "{a}");
        assert!(a.contains("From a quality point of view"), "{a}");
        assert!(b.contains("From an engineering point of view"), "{b}");
    }

    #[test]
    fn length_stays_between_60_and_150_words() {
        let long_task = format!("Task: {}", "very ".repeat(500));
        for (sys, user, task) in
            [("", "", ""), ("persona", "DEV-1", "do it"), ("ops", "OPS-3", long_task.as_str())]
        {
            for i in 0..20 {
                let n = answer(sys, &format!("{user}{i}"), task).split_whitespace().count();
                assert!((60..=150).contains(&n), "{n} words");
            }
        }
    }

    #[test]
    fn the_first_twelve_words_of_the_task() {
        assert_eq!(task_words("  Task: a b c d e f g h i j k l m n\nConstraints: x").len(), 12);
        assert_eq!(task_words("Plan the regression suite\nmore"), ["Plan", "the", "regression", "suite"]);
        assert!(task_words("").is_empty());
    }
}
