//! The fleet launcher of `flota_scheduler::fleet`, with test-friendly
//! wrappers that fail the test when a child cannot start.

use std::collections::HashMap;
use std::sync::Mutex;

pub use flota_scheduler::fleet::{Proc, binary};

/// Workers and schedulers by the prefix they serve, so [`crate::TestEnv::cleanup`]
/// can stop them before deleting the prefix: a live worker whose queue is
/// deleted reconnects and declares it again, undoing the cleanup.
static BY_PREFIX: Mutex<Option<HashMap<String, Vec<u32>>>> = Mutex::new(None);

fn remember(env: &[(String, String)], p: &Proc) {
    let Some((_, prefix)) = env.iter().rev().find(|(k, _)| k == "FLOTA_PREFIX") else { return };
    if let Ok(mut map) = BY_PREFIX.lock() {
        map.get_or_insert_with(HashMap::new).entry(prefix.clone()).or_default().push(p.pid());
    }
}

/// SIGKILL the workers and schedulers started for `prefix` (those still running).
pub fn kill_for_prefix(prefix: &str) {
    let pids = BY_PREFIX.lock().ok().and_then(|mut m| m.as_mut()?.remove(prefix)).unwrap_or_default();
    for pid in pids.into_iter().filter(|p| *p != 0) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// gpusim on a free port with extra flags.
pub async fn gpusim(args: &[&str]) -> Proc {
    flota_scheduler::fleet::gpusim(args, None).await.expect("gpusim starts")
}

/// A worker pointed at `gpu_url`, with extra env.
pub async fn worker(env: &[(String, String)], gpu_url: &str, extra: &[(&str, &str)]) -> Proc {
    let p = flota_scheduler::fleet::worker(env, gpu_url, extra, None).await.expect("worker starts");
    remember(env, &p);
    p
}

/// The scheduler on a free port.
pub async fn scheduler(env: &[(String, String)], extra: &[(&str, &str)]) -> Proc {
    let p = flota_scheduler::fleet::scheduler(env, extra, None).await.expect("scheduler starts");
    remember(env, &p);
    p
}
