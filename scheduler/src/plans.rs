//! Auto-dispatch of approved plans: a `plan.approved` event (or `POST
//! /v1/plans`) creates one deliberation per role, with ids derived from the
//! plan id so the same event delivered twice dispatches nothing twice. When a
//! role's deliberation ends, `deliberation.completed` is published; when all
//! have, `plan.completed` with each role's winner. Each event is published once.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use flota_shared::amqp;
use flota_shared::envelope::{self, DeliberateInput, Kind, ResultEnvelope, TaskEnvelope, TaskInput};
use flota_shared::store::Store;
use flota_shared::telemetry::TraceParent;

use crate::broker::Broker;

pub const EVENT_APPROVED: &str = "plan.approved";
pub const EVENT_DELIBERATION_COMPLETED: &str = "deliberation.completed";
pub const EVENT_PLAN_COMPLETED: &str = "plan.completed";
pub const EVENT_TASK_FAILED: &str = "task.failed";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanApproved {
    pub plan_id: String,
    #[serde(default)]
    pub story_id: Option<String>,
    pub roles: Vec<String>,
    pub task: String,
    #[serde(default)]
    pub constraints: Vec<String>,
}

/// The deliberation of one role of a plan (pure).
pub fn task_id(plan_id: &str, role: &str) -> String {
    format!("plan:{plan_id}:{role}")
}

/// `(plan_id, role)` of a plan's deliberation id (pure).
pub fn parse_task_id(id: &str) -> Option<(&str, &str)> {
    let rest = id.strip_prefix("plan:")?;
    let (plan, role) = rest.rsplit_once(':')?;
    (!plan.is_empty() && !role.is_empty()).then_some((plan, role))
}

impl PlanApproved {
    /// Every problem with the event (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !envelope::is_valid_id(&self.plan_id) || self.plan_id.len() > 80 {
            p.push("`plan_id` must be 1-80 characters of [A-Za-z0-9._:-]".into());
        }
        if self.roles.is_empty() || self.roles.len() > 16 {
            p.push("`roles` must list 1..=16 roles".into());
        }
        let mut seen = std::collections::HashSet::new();
        for r in &self.roles {
            if !envelope::is_valid_role(r) {
                p.push(format!(
                    "role `{}` must be 1-32 characters of [A-Za-z0-9_-]",
                    r.chars().take(32).collect::<String>()
                ));
            }
            if !seen.insert(r) {
                p.push(format!("role `{r}` is listed twice"));
            }
        }
        if self.task.trim().is_empty() || self.task.len() > envelope::MAX_MESSAGE_BYTES {
            p.push("`task` must be 1..=32 KiB".into());
        }
        p
    }

    /// One deliberation envelope per role (pure).
    pub fn tasks(&self) -> Vec<TaskEnvelope> {
        self.roles
            .iter()
            .map(|role| TaskEnvelope {
                v: 1,
                id: task_id(&self.plan_id, role),
                kind: Kind::Deliberate,
                input: TaskInput::Deliberate(DeliberateInput {
                    role: role.clone(),
                    task: self.task.clone(),
                    constraints: self.constraints.clone(),
                    agents: envelope::DEFAULT_AGENTS,
                }),
                depends_on: vec![],
                lock_keys: vec![],
                timeout_ms: None,
                meta: [("plan_id".to_string(), self.plan_id.clone())].into_iter().collect(),
            })
            .collect()
    }
}

/// Register the plan and publish its deliberations (each id at most once).
pub async fn dispatch(
    store: &Store,
    broker: &Broker,
    plan: &PlanApproved,
    traceparent: &TraceParent,
) -> anyhow::Result<Vec<String>> {
    let _ = store.put_plan(&plan.plan_id, &serde_json::to_string(plan)?).await?;
    let mut ids = Vec::new();
    for task in plan.tasks() {
        if store.submit(&task.id, task.kind.as_str()).await? {
            let publisher = broker.publisher().await?;
            let props = amqp::task_properties(&task.id, &traceparent.child().header(), 0);
            if let Err(e) = publisher
                .publish(&broker.topology().tasks_exchange(), task.kind.as_str(), &task.to_json(), props)
                .await
            {
                let _ = store.forget_submission(&task.id).await;
                return Err(e.into());
            }
            tracing::info!(message = "Plan role dispatched.", task_id = %task.id, plan_id = %plan.plan_id, trace_id = %traceparent.trace_id);
        }
        ids.push(task.id);
    }
    Ok(ids)
}

/// Each role's status and winner, and whether the plan is complete.
pub async fn status(store: &Store, plan: &PlanApproved) -> anyhow::Result<Value> {
    let mut roles = serde_json::Map::new();
    let mut all_done = true;
    for role in &plan.roles {
        let id = task_id(&plan.plan_id, role);
        let state = store.task_state(&id).await?;
        let status = state.as_ref().map(|s| s.status.clone()).unwrap_or_else(|| "queued".into());
        let result: Option<ResultEnvelope> =
            state.and_then(|s| s.result).and_then(|r| serde_json::from_str(&r).ok());
        let (winner, score) = winner_of(result.as_ref());
        all_done &= status == "succeeded" || status == "failed";
        roles
            .insert(role.clone(), json!({"task_id": id, "status": status, "winner": winner, "score": score}));
    }
    Ok(
        json!({"plan_id": plan.plan_id, "story_id": plan.story_id, "status": if all_done { "completed" } else { "running" }, "roles": roles}),
    )
}

fn winner_of(result: Option<&ResultEnvelope>) -> (Option<String>, Option<f64>) {
    let Some(out) = result.and_then(|r| r.output.as_ref()) else { return (None, None) };
    let winner = out["winner"].as_str().map(str::to_string);
    let score = out["proposals"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["agent"].as_str() == winner.as_deref()))
        .and_then(|p| p["score"].as_f64());
    (winner, score)
}

/// After a result is recorded: publish the plan's completion events, once each.
pub async fn on_result(store: &Store, broker: &Broker, result: &ResultEnvelope) -> anyhow::Result<()> {
    let Some((plan_id, role)) = parse_task_id(&result.id) else { return Ok(()) };
    let Some(raw) = store.plan(plan_id).await? else { return Ok(()) };
    let plan: PlanApproved = serde_json::from_str(&raw)?;
    let (winner, score) = winner_of(Some(result));
    let event = json!({"plan_id": plan_id, "role": role, "task_id": result.id, "status": result.status.as_str(), "winner": winner, "score": score});
    publish_once(
        store,
        broker,
        plan_id,
        &format!("role:{role}"),
        EVENT_DELIBERATION_COMPLETED,
        &event,
        &result.trace_id,
    )
    .await?;
    let summary = status(store, &plan).await?;
    if summary["status"] == "completed" {
        publish_once(store, broker, plan_id, "plan", EVENT_PLAN_COMPLETED, &summary, &result.trace_id)
            .await?;
    }
    Ok(())
}

async fn publish_once(
    store: &Store,
    broker: &Broker,
    plan_id: &str,
    field: &str,
    key: &str,
    body: &Value,
    trace_id: &str,
) -> anyhow::Result<()> {
    if !store.claim_plan_event(plan_id, field).await? {
        return Ok(());
    }
    let tp = TraceParent::parse(&format!("00-{trace_id}-{}-01", "1".repeat(16)))
        .unwrap_or_else(TraceParent::new_root)
        .child();
    let published = async {
        broker
            .publisher()
            .await?
            .publish(
                &broker.topology().events_exchange(),
                key,
                &serde_json::to_vec(body)?,
                amqp::message_properties(plan_id, &tp.header()),
            )
            .await?;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = published {
        // Give the claim back so the redelivered result publishes it.
        let _ = store.unclaim_plan_event(plan_id, field).await;
        return Err(e);
    }
    tracing::info!(message = "Plan event published.", event = key, plan_id);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> PlanApproved {
        PlanApproved {
            plan_id: "p-1".into(),
            story_id: Some("s-9".into()),
            roles: vec!["DEV".into(), "QA".into()],
            task: "Ship it".into(),
            constraints: vec![],
        }
    }

    #[test]
    fn ids_are_derived_from_the_plan() {
        assert_eq!(task_id("p-1", "DEV"), "plan:p-1:DEV");
        assert_eq!(parse_task_id("plan:p-1:DEV"), Some(("p-1", "DEV")));
        assert_eq!(parse_task_id("plan:a:b:QA"), Some(("a:b", "QA")));
        assert_eq!(parse_task_id("other"), None);
        let tasks = plan().tasks();
        assert_eq!(tasks.len(), 2);
        assert!(tasks.iter().all(|t| t.validate().is_ok()));
        assert_eq!(tasks[0].meta["plan_id"], "p-1");
    }

    #[test]
    fn bad_plans_list_every_problem() {
        let mut p = plan();
        p.plan_id = "bad id".into();
        p.roles = vec!["DEV".into(), "DEV".into(), "no spaces".into()];
        p.task = String::new();
        assert_eq!(p.problems().len(), 4);
        assert!(plan().problems().is_empty());
    }
}
