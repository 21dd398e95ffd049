//! `flotactl councils list | show ROLE | set ROLE FILE | delete ROLE`, on the
//! registry in Redis (the same one the scheduler's API manages).

use flota_shared::council::Council;
use flota_shared::store::Store;

pub async fn set(store: &Store, role: &str, json: &str) -> anyhow::Result<Council> {
    let mut value: serde_json::Value = serde_json::from_str(json)?;
    if value.get("role").is_none() {
        value["role"] = serde_json::json!(role);
    }
    let council: Council = serde_json::from_value(value)?;
    let mut problems = council.problems();
    if council.role != role {
        problems.push(format!("body role `{}` differs from `{role}`", council.role));
    }
    if !problems.is_empty() {
        anyhow::bail!("invalid council: {}", problems.join("; "));
    }
    store.put_council(&council).await?;
    Ok(council)
}
