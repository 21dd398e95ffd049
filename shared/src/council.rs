//! Councils: the agents that deliberate for a role. Stored in Redis (so they
//! survive restarts of every process), managed through the scheduler's API
//! and `flotactl councils`; DEV, QA, ARCHITECT, DEVOPS and DATA exist by
//! default with three agents each.

use serde::{Deserialize, Serialize};

pub const DEFAULT_ROLES: [&str; 5] = ["DEV", "QA", "ARCHITECT", "DEVOPS", "DATA"];
pub const MAX_COUNCIL_AGENTS: usize = 9;
pub const MAX_PERSONA_CHARS: usize = 4000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    /// The agent's persona: its system prompt.
    pub persona: String,
    #[serde(default = "default_temperature")]
    pub temperature: f32,
    /// A model other than the fleet's default, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

fn default_temperature() -> f32 {
    0.7
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Council {
    pub role: String,
    pub agents: Vec<Agent>,
    /// Proposals that must survive for a deliberation to succeed; a majority
    /// of the agents deliberating when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum: Option<usize>,
}

impl Council {
    /// Every problem of a council definition (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !crate::envelope::is_valid_role(&self.role) {
            p.push("`role` must be 1-32 characters of [A-Za-z0-9_-]".into());
        }
        if self.agents.is_empty() || self.agents.len() > MAX_COUNCIL_AGENTS {
            p.push(format!("`agents` must have 1..={MAX_COUNCIL_AGENTS} entries"));
        }
        if self.quorum.is_some_and(|k| k == 0 || k > self.agents.len()) {
            p.push("`quorum` must be 1..=the number of agents".into());
        }
        for (i, a) in self.agents.iter().enumerate() {
            if a.persona.trim().is_empty() || a.persona.chars().count() > MAX_PERSONA_CHARS {
                p.push(format!("`agents[{i}].persona` must be 1..={MAX_PERSONA_CHARS} characters"));
            }
            if !(0.0..=2.0).contains(&a.temperature) {
                p.push(format!("`agents[{i}].temperature` must be in 0..=2"));
            }
            if a.model.as_ref().is_some_and(|m| m.is_empty() || m.len() > 256) {
                p.push(format!("`agents[{i}].model` must be 1..=256 characters"));
            }
        }
        p
    }

    /// The built-in council of a default role.
    pub fn default_for(role: &str) -> Option<Council> {
        let focus: [&str; 3] = match role {
            "DEV" => ["pragmatic implementation", "code quality and tests", "delivery speed"],
            "QA" => ["test strategy", "edge cases and regressions", "release risk"],
            "ARCHITECT" => ["system boundaries", "scalability", "long-term maintainability"],
            "DEVOPS" => ["deployment safety", "observability", "cost and capacity"],
            "DATA" => ["data quality", "pipelines and lineage", "privacy"],
            _ => return None,
        };
        Some(Council {
            role: role.to_string(),
            agents: focus
                .iter()
                .enumerate()
                .map(|(i, f)| Agent {
                    persona: format!(
                        "You are {role}-{}, a senior {role} specialist on a council of agents, focused on {f}. \
                         Be concrete and brief.",
                        i + 1
                    ),
                    temperature: 0.7,
                    model: None,
                })
                .collect(),
            quorum: None,
        })
    }

    /// Proposals that must survive among `n` deliberating agents (pure): the
    /// council's quorum (never more than `n`), else a majority.
    pub fn quorum_of(&self, n: usize) -> usize {
        match self.quorum {
            Some(k) => k.clamp(1, n.max(1)),
            None => n / 2 + 1,
        }
    }

    /// The agents taking part in a deliberation of `n` agents: the council's
    /// own, in order, repeated when more are asked for than it has.
    pub fn seats(&self, n: usize) -> Vec<&Agent> {
        (0..n).filter_map(|i| self.agents.get(i % self.agents.len().max(1))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_exist_with_three_agents() {
        for role in DEFAULT_ROLES {
            let c = Council::default_for(role).unwrap();
            assert_eq!(c.agents.len(), 3);
            assert!(c.problems().is_empty());
        }
        assert!(Council::default_for("UNKNOWN").is_none());
    }

    #[test]
    fn validation_lists_problems() {
        let c = Council {
            role: "bad role".into(),
            agents: vec![Agent { persona: "".into(), temperature: 5.0, model: Some(String::new()) }],
            quorum: Some(2),
        };
        assert_eq!(c.problems().len(), 5);
        let none = Council { role: "X".into(), agents: vec![], quorum: None };
        assert_eq!(none.problems().len(), 1);
        let zero = Council { quorum: Some(0), ..Council::default_for("QA").unwrap() };
        assert_eq!(zero.problems(), ["`quorum` must be 1..=the number of agents"]);
    }

    #[test]
    fn quorum_is_a_majority_unless_the_council_says() {
        let mut c = Council::default_for("DEV").unwrap();
        assert_eq!([1, 3, 4, 9].map(|n| c.quorum_of(n)), [1, 2, 3, 5]);
        c.quorum = Some(1);
        assert_eq!(c.quorum_of(3), 1);
        c.quorum = Some(3);
        assert_eq!(c.quorum_of(3), 3);
        // Fewer agents asked for than the quorum: all of them must survive.
        assert_eq!(c.quorum_of(2), 2);
    }

    #[test]
    fn seats_cycle_through_the_council() {
        let c = Council::default_for("DEV").unwrap();
        assert_eq!(c.seats(5).len(), 5);
        assert_eq!(c.seats(5)[3], &c.agents[0]);
        assert_eq!(c.seats(1).len(), 1);
    }
}
