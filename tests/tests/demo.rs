//! The README's first command, `flotactl demo`, on real services: a small run
//! ends with exit 0 and a summary naming a winner per council; Ctrl-C stops
//! everything it started and removes its prefix.

use std::process::Stdio;
use std::time::Duration;

use flota_tests::{PATIENCE, TestEnv, procs};
use lapin::options::QueueDeclareOptions;
use lapin::types::{FieldTable, ShortString};
use tokio::io::{AsyncBufReadExt, BufReader};

fn demo(args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(procs::binary("flotactl"));
    cmd.arg("demo").args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_demo_completes_with_a_winner_per_council() {
    let child = demo(&["--interpretations", "40", "--workers", "1"]).spawn().expect("flotactl built");
    let out = tokio::time::timeout(PATIENCE, child.wait_with_output()).await.expect("demo ends").unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("Flota demo: 45 tasks (40 interpretations, 5 deliberations)"), "{stdout}");
    assert!(stdout.contains("status       succeeded 45"), "every task succeeded:\n{stdout}");
    assert!(stdout.contains("open_work "), "intents counted:\n{stdout}");
    for role in ["DEV", "QA", "ARCHITECT", "DEVOPS", "DATA"] {
        assert!(
            stdout.lines().any(|l| l.trim_start().starts_with(role) && l.contains("winner ")),
            "{role} has a winner:\n{stdout}"
        );
    }
    assert!(stdout.contains("→ succeeded"), "the scheduler recorded it:\n{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_the_demo_and_removes_its_prefix() {
    let mut child = demo(&["--interpretations", "100000", "--workers", "1"]).spawn().expect("flotactl built");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut prefix = None;
    while let Ok(Ok(Some(line))) = tokio::time::timeout(PATIENCE, lines.next_line()).await {
        if let Some(rest) = line.split(" on prefix ").nth(1) {
            prefix = rest.split_whitespace().next().map(str::to_string);
            break;
        }
    }
    let prefix = prefix.expect("the demo names its prefix");
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    // Interrupt it mid-run: once its worker consumes.
    let env = TestEnv::new("demo-probe").await;
    let work_queue = format!("{prefix}.interpret");
    let consumers = |channel: lapin::Channel| {
        let q = work_queue.clone();
        async move {
            let declared = channel
                .queue_declare(
                    ShortString::from(q),
                    QueueDeclareOptions { passive: true, ..Default::default() },
                    FieldTable::default(),
                )
                .await;
            declared.map(|d| d.consumer_count()).ok()
        }
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while consumers(env.conn.create_channel().await.unwrap()).await.unwrap_or(0) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the demo's worker never consumed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = child.id().expect("running") as i32;
    let _ = std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status();
    let status = tokio::time::timeout(PATIENCE, child.wait()).await.expect("demo stops").unwrap();
    drain.abort();
    assert_eq!(status.code(), Some(130), "interrupted demo exits 130");
    // Its queues are gone: a passive declare of the work queue fails.
    assert!(
        consumers(env.conn.create_channel().await.unwrap()).await.is_none(),
        "the demo's queues were removed"
    );
    env.cleanup().await;
}
