//! The simulator over real HTTP, in-process on a free port: the OpenAI surface,
//! `/stats`, runtime faults, configured faults, auth, and shutdown with a hung request.

use std::time::Duration;

use flota_gpusim::Config;
use flota_gpusim::faults::Faults;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct Server {
    url: String,
    http: reqwest::Client,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(config: Config) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(flota_gpusim::serve(listener, config, async move {
            let _ = stopped.await;
        }));
        Server { url, http: reqwest::Client::new(), stop, task }
    }

    async fn chat(&self, body: &Value) -> reqwest::Response {
        self.http.post(format!("{}/v1/chat/completions", self.url)).json(body).send().await.unwrap()
    }

    async fn get(&self, path: &str) -> Value {
        self.http.get(format!("{}{path}", self.url)).send().await.unwrap().json().await.unwrap()
    }

    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http.post(format!("{}{path}", self.url)).json(body).send().await.unwrap()
    }

    /// Stop and check `serve` returned cleanly.
    async fn shut_down(self) {
        let _ = self.stop.send(());
        self.task.await.expect("serve task").expect("serve returned an error");
    }
}

fn request(user: &str, message: &str, response_format: Option<Value>) -> Value {
    let mut r = json!({
        "model": "flota-sim-1",
        "user": user,
        "max_tokens": 400,
        "temperature": 0.2,
        "messages": [
            {"role": "system", "content": "You interpret messages sent to a field-service assistant."},
            {"role": "user", "content": message},
        ],
    });
    if let Some(rf) = response_format {
        r["response_format"] = rf;
    }
    r
}

fn interpretation_format() -> Value {
    json!({"type": "json_schema", "json_schema": {"name": "interpretation", "strict": true, "schema": {
        "type": "object", "additionalProperties": false,
        "required": ["intent", "confidence", "work", "reply"],
        "properties": {
            "intent": {"type": "string", "enum": ["open_work", "update_work", "confirm", "cancel", "chat"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "work": {"anyOf": [{"type": "object"}, {"type": "null"}]},
            "reply": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "degraded": {"type": "boolean"}
        }
    }}})
}

async fn content_of(r: reqwest::Response) -> Value {
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    let content = body["choices"][0]["message"]["content"].as_str().expect("content").to_string();
    serde_json::from_str(&content).unwrap_or(Value::String(content))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_surface_and_stats() {
    let s = Server::start(Config::default()).await;

    let health = s.http.get(format!("{}/health", s.url)).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert!(health.bytes().await.unwrap().is_empty());
    let models = s.get("/v1/models").await;
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "flota-sim-1");
    assert_eq!(models["data"][0]["owned_by"], "flota-gpusim");

    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = s
        .http
        .post(format!("{}/v1/chat/completions", s.url))
        .header("traceparent", tp)
        .header("authorization", "Bearer anything")
        .json(&request(
            "DEV-1",
            "Abrí un trabajo para cambiar la bomba del pozo 3",
            Some(interpretation_format()),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["model"], "flota-sim-1");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let usage = &body["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap())
    );
    let interpretation: Value =
        serde_json::from_str(body["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert_eq!(interpretation["intent"], "open_work");
    assert_eq!(interpretation["work"]["title"], "Cambiar bomba del pozo 3");
    assert_eq!(interpretation["degraded"], false);

    let proposal = content_of(s.chat(&request("DEV-2", "Task: plan the regression suite", None)).await).await;
    assert!(proposal.as_str().unwrap().starts_with("Proposal (DEV-2): "), "{proposal}");
    let review_format = json!({"type": "json_schema", "json_schema": {"name": "review", "schema": {}}});
    let review = content_of(
        s.chat(&request("QA-1", "Review it.\n--- proposal ---\nShip it", Some(review_format))).await,
    )
    .await;
    assert!((0.0..=10.0).contains(&review["score"].as_f64().unwrap()));
    let ticket = json!({"type": "json_schema", "json_schema": {"name": "ticket", "schema": {
        "type": "object", "required": ["priority"], "properties": {"priority": {"enum": ["low", "high"]}}}}});
    assert_eq!(content_of(s.chat(&request("x", "hi", Some(ticket))).await).await, json!({"priority": "low"}));
    let capped =
        s.chat(&json!({"messages": [{"role": "user", "content": "Task: x"}], "max_tokens": 3})).await;
    let capped: Value = capped.json().await.unwrap();
    assert_eq!(capped["choices"][0]["finish_reason"], "length");
    assert_eq!(capped["usage"]["completion_tokens"], 3);

    let unknown = s.chat(&json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let err: Value = unknown.json().await.unwrap();
    assert_eq!(err["error"]["message"], "The model `gpt-9` does not exist.");
    assert_eq!(err["error"]["type"], "NotFoundError");
    assert_eq!(err["error"]["code"], 404);
    let garbage =
        s.http.post(format!("{}/v1/chat/completions", s.url)).body("{not json").send().await.unwrap();
    assert_eq!(garbage.status(), StatusCode::BAD_REQUEST);
    let err: Value = garbage.json().await.unwrap();
    assert_eq!(err["error"]["type"], "BadRequestError");

    let stats = s.get("/stats").await;
    assert_eq!(stats["served"], 5);
    assert_eq!(stats["errors_400"], 1);
    assert!(stats["peak_in_flight"].as_i64().unwrap() >= 1);
    assert!(stats["peak_busy_slots"].as_i64().unwrap() >= 1);
    assert_eq!(stats["in_flight"], 0, "only chat requests count");
    assert_eq!(stats["slots"], 64);
    assert_eq!(stats["served_by_user"]["DEV-1"], 1);
    assert_eq!(stats["served_by_kind"]["interpretation"], 1);
    assert_eq!(stats["served_by_kind"]["proposal"], 2);
    assert_eq!(stats["served_by_kind"]["review"], 1);
    assert_eq!(stats["served_by_kind"]["json"], 1);

    let log = s.get("/debug/requests?limit=1000").await;
    let first = log.as_array().unwrap().iter().find(|e| e["traceparent"] == tp).expect("traced request");
    assert_eq!(first["authorization_present"], true);
    assert_eq!(first["user"], "DEV-1");
    assert_eq!(first["kind"], "interpretation");
    assert_eq!(first["status"], 200);
    assert_eq!(s.get("/debug/requests?limit=2").await.as_array().unwrap().len(), 2);

    assert!(s.post("/admin/reset", &json!({})).await.status().is_success());
    let stats = s.get("/stats").await;
    assert_eq!(stats["served"], 0);
    assert_eq!(stats["peak_in_flight"], 0);
    assert!(stats["served_by_user"].as_object().unwrap().is_empty());
    s.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_at_runtime_and_from_config() {
    let config = Config {
        max_context_chars: 100,
        faults: Faults { fail_users: vec!["QA-9".into()], ..Faults::default() },
        ..Config::default()
    };
    let s = Server::start(config).await;
    let ok = request("DEV-1", "hola", None);

    let set = s.post("/admin/faults", &json!({"rate_429": 1.0, "retry_after_secs": 2})).await;
    assert_eq!(set.status(), StatusCode::OK);
    assert_eq!(s.get("/admin/faults").await["rate_429"], 1.0);
    let r = s.chat(&ok).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("2"));
    let refused = s.post("/admin/faults", &json!({"rate_429": 3})).await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    s.post("/admin/faults", &json!({"rate_429": 0.0})).await;
    assert_eq!(s.chat(&ok).await.status(), StatusCode::OK);

    let r = s.chat(&request("QA-9", "hola", None)).await;
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"]["message"], "simulated server error");
    assert_eq!(err["error"]["type"], "InternalServerError");

    let r = s.chat(&request("DEV-1", &"x".repeat(101), None)).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let err: Value = r.json().await.unwrap();
    assert!(err["error"]["message"].as_str().unwrap().starts_with("This model's maximum context length is"));

    s.post("/admin/faults", &json!({"invalid_users": ["DEV-3"]})).await;
    let invalid = content_of(s.chat(&request("DEV-3", "hola", Some(interpretation_format()))).await).await;
    assert_eq!(invalid["intent"], "launch_rockets");

    let stats = s.get("/stats").await;
    assert_eq!(
        [&stats["errors_429"], &stats["errors_500"], &stats["errors_400"], &stats["invalid_outputs"]],
        [1, 1, 1, 1]
    );
    assert_eq!(stats["served"], 2);
    s.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_required_when_set() {
    let s = Server::start(Config { api_key: Some("sekret".into()), ..Config::default() }).await;
    let body = request("DEV-1", "hola", None);
    assert_eq!(s.chat(&body).await.status(), StatusCode::UNAUTHORIZED);
    let models = s.http.get(format!("{}/v1/models", s.url)).send().await.unwrap();
    assert_eq!(models.status(), StatusCode::UNAUTHORIZED);
    let health = s.http.get(format!("{}/health", s.url)).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let r = s
        .http
        .post(format!("{}/v1/chat/completions", s.url))
        .bearer_auth("sekret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    s.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_hung_requests() {
    let s =
        Server::start(Config { faults: Faults { hang_rate: 1.0, ..Faults::default() }, ..Config::default() })
            .await;
    let (http, url) = (s.http.clone(), s.url.clone());
    let hung = tokio::spawn(async move {
        http.post(format!("{url}/v1/chat/completions")).json(&request("DEV-1", "hola", None)).send().await
    });
    while s.get("/stats").await["hung"] != 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let log = s.get("/debug/requests").await;
    assert_eq!(log[0]["status"], Value::Null, "logged while hanging");
    s.shut_down().await;
    let r = hung.await.unwrap().expect("an answer at shutdown");
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
}
