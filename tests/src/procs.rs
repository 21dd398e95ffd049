//! The fleet launcher of `flota_scheduler::fleet`, with test-friendly
//! wrappers that fail the test when a child cannot start.

pub use flota_scheduler::fleet::{Proc, binary};

/// gpusim on a free port with extra flags.
pub async fn gpusim(args: &[&str]) -> Proc {
    flota_scheduler::fleet::gpusim(args, None).await.expect("gpusim starts")
}

/// A worker pointed at `gpu_url`, with extra env.
pub async fn worker(env: &[(String, String)], gpu_url: &str, extra: &[(&str, &str)]) -> Proc {
    flota_scheduler::fleet::worker(env, gpu_url, extra, None).await.expect("worker starts")
}

/// The scheduler on a free port.
pub async fn scheduler(env: &[(String, String)], extra: &[(&str, &str)]) -> Proc {
    flota_scheduler::fleet::scheduler(env, extra, None).await.expect("scheduler starts")
}
