//! The continuous-batching model over HTTP, against the real binary and its
//! flags: at most `--slots` requests in service, the rest queued and served
//! first come, first served, and busy slot time that covers every service.
//!
//! Nothing here measures speed. Requests that must stay in service are made
//! to hold their slot for ten minutes and are then abandoned by the client
//! (which frees the slot), so every state asserted is held, not raced.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// Upper bound for "eventually": a failure detector, never a speed claim.
const PATIENCE: Duration = Duration::from_secs(60);
/// A service time no test outlives: requests with it leave only when abandoned.
const FOREVER_MS: &str = "600000";

struct Gpusim {
    url: String,
    http: reqwest::Client,
    _child: Child,
}

impl Gpusim {
    async fn start(flags: &[&str]) -> Gpusim {
        let mut child = Command::new(env!("CARGO_BIN_EXE_flota-gpusim"))
            .args(["--addr", "127.0.0.1:0"])
            .args(flags)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("gpusim binary starts");
        let stdout = child.stdout.take().expect("stdout");
        let line = BufReader::new(stdout).lines().next_line().await.unwrap().expect("the listening line");
        let url = line.rsplit(' ').next().expect("an address").to_string();
        Gpusim { url, http: reqwest::Client::new(), _child: child }
    }

    async fn stats(&self) -> Value {
        self.http.get(format!("{}/stats", self.url)).send().await.unwrap().json().await.unwrap()
    }

    async fn set_faults(&self, patch: Value) {
        let r = self.http.post(format!("{}/admin/faults", self.url)).json(&patch).send().await.unwrap();
        assert!(r.status().is_success(), "faults {patch} refused");
    }

    /// One chat request on its own task, so the test can abandon it (abort).
    fn send(&self, user: &str) -> JoinHandle<Value> {
        let (http, url) = (self.http.clone(), format!("{}/v1/chat/completions", self.url));
        let body = json!({
            "user": user,
            "max_tokens": 64,
            "messages": [{"role": "user", "content": format!("Status of the pump, asked by {user}")}],
        });
        tokio::spawn(async move {
            let r = http.post(url).json(&body).send().await.expect("gpusim answers");
            assert_eq!(r.status(), 200, "served");
            r.json().await.expect("a completion")
        })
    }

    /// Poll `/stats` until `holds` is true of it (bounded by PATIENCE).
    async fn until(&self, what: &str, holds: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let s = self.stats().await;
            if holds(&s) {
                return s;
            }
            assert!(tokio::time::Instant::now() < deadline, "never happened: {what}; last /stats: {s}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn int(s: &Value, field: &str) -> i64 {
    s[field].as_i64().unwrap_or_else(|| panic!("/stats has no integer `{field}`: {s}"))
}

/// Abandon requests (the client hangs up) and wait until gpusim has let them go.
async fn abandon(gpu: &Gpusim, requests: Vec<JoinHandle<Value>>, in_flight_after: i64) {
    for r in &requests {
        r.abort();
    }
    for r in requests {
        assert!(r.await.unwrap_err().is_cancelled(), "an abandoned request was answered");
    }
    gpu.until("abandoned requests leave", |s| int(s, "in_flight") <= in_flight_after).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_more_requests_in_service_than_slots() {
    let gpu = Gpusim::start(&["--slots", "4", "--base-ms", FOREVER_MS]).await;
    let holders: Vec<_> = (0..4).map(|i| gpu.send(&format!("holder-{i}"))).collect();
    gpu.until("4 requests in service", |s| int(s, "busy_slots") == 4).await;

    // 2 × slots more, each served for 50 ms once admitted.
    gpu.set_faults(json!({"base_ms": 50})).await;
    let queued: Vec<_> = (0..8).map(|i| gpu.send(&format!("queued-{i}"))).collect();
    let s = gpu.until("8 requests queued", |s| int(s, "waiting") == 8).await;
    assert_eq!(int(&s, "busy_slots"), 4, "{s}");
    assert_eq!(int(&s, "peak_busy_slots"), 4, "a fifth request was in service: {s}");
    assert_eq!(int(&s, "in_flight"), 12, "{s}");
    assert_eq!(int(&s, "served"), 0, "{s}");

    // The holders hang up; their slots go to the queue, 4 at a time.
    abandon(&gpu, holders, 8).await;
    for q in queued {
        q.await.expect("served");
    }
    let s = gpu.until("everything left", |s| int(s, "in_flight") == 0).await;
    assert_eq!(int(&s, "served"), 8, "only the queued requests were answered: {s}");
    assert_eq!((int(&s, "busy_slots"), int(&s, "waiting")), (0, 0), "{s}");
    assert_eq!(int(&s, "peak_busy_slots"), 4, "never more than --slots in service: {s}");
    assert_eq!(int(&s, "peak_in_flight"), 12, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_requests_are_served_first_come_first_served() {
    let gpu = Gpusim::start(&["--slots", "1", "--base-ms", FOREVER_MS]).await;
    let holder = gpu.send("holder");
    gpu.until("the only slot is taken", |s| int(s, "busy_slots") == 1).await;
    gpu.set_faults(json!({"base_ms": 0})).await;
    let mut queued = Vec::new();
    for i in 0..6 {
        queued.push(gpu.send(&format!("fifo-{i}")));
        // The next one is sent only once this one is known to be in the queue.
        gpu.until(&format!("fifo-{i} is queued"), |s| int(s, "waiting") == i + 1).await;
    }
    abandon(&gpu, vec![holder], 6).await;
    for q in queued {
        q.await.expect("served");
    }

    let log: Vec<Value> =
        gpu.http.get(format!("{}/debug/requests", gpu.url)).send().await.unwrap().json().await.unwrap();
    let order = |user: String| {
        let entry =
            log.iter().find(|e| e["user"] == user.as_str()).unwrap_or_else(|| panic!("{user} logged"));
        entry["slot_order"].as_u64().unwrap_or_else(|| panic!("{user} got a slot: {entry}"))
    };
    // The holder got slot grant 1; then the queue, in the order it was sent.
    let got: Vec<u64> = (0..6).map(|i| order(format!("fifo-{i}"))).collect();
    assert_eq!(got, [2, 3, 4, 5, 6, 7], "slots were granted out of arrival order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_slot_time_covers_every_service_and_counts_add_up() {
    let (base_ms, per_token_ms) = (20.0, 0.5);
    let gpu = Gpusim::start(&["--slots", "3", "--base-ms", "20", "--per-token-ms", "0.5"]).await;
    let requests: Vec<_> = (0..9).map(|i| gpu.send(&format!("u-{i}"))).collect();
    let mut service_seconds = 0.0;
    for r in requests {
        let completion = r.await.expect("served");
        let tokens = completion["usage"]["completion_tokens"].as_f64().expect("usage");
        assert!(tokens > 0.0);
        service_seconds += (base_ms + per_token_ms * tokens) / 1000.0;
    }
    let s = gpu.until("everything left", |s| int(s, "in_flight") == 0).await;
    assert_eq!(int(&s, "served"), 9, "{s}");
    for i in 0..9 {
        assert_eq!(s["served_by_user"][format!("u-{i}")], 1, "{s}");
    }
    assert!(int(&s, "peak_busy_slots") <= 3, "{s}");
    assert_eq!((int(&s, "busy_slots"), int(&s, "waiting")), (0, 0), "{s}");
    let busy = s["busy_slot_seconds"].as_f64().unwrap();
    // Lower bounds only: a slot is held at least the model's service time, and
    // 3 slots cannot be busy for longer than 3 × the time since start.
    assert!(busy >= service_seconds, "busy {busy} s < the model's {service_seconds} s");
    let utilisation = s["utilisation"].as_f64().unwrap();
    assert!(utilisation > 0.0 && utilisation <= 1.0, "{s}");
}
