//! TLS end to end (issue #8, item 1): Redis over `rediss://` against a private
//! TLS-only `redis-server`, AMQP over `amqps://` through a TLS-terminating
//! proxy in front of the shared RabbitMQ, with and without client
//! certificates. Each side is shown working with the right CA (a real worker
//! runs a task) and refusing, never downgrading, with the wrong one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use flota_shared::amqp;
use flota_shared::config::Config;
use flota_shared::envelope::Status;
use flota_shared::store::{self, Store};
use flota_tests::tls::{Pki, TlsProxy, TlsRedis, path_str};
use flota_tests::{TestEnv, procs};
use lapin::options::QueueDeclareOptions;
use lapin::types::{FieldTable, ShortString};
use serde_json::json;
use tokio::io::AsyncReadExt;

/// Generous bound for anything that should fail or succeed "soon"; never a performance claim.
const BOUND: Duration = Duration::from_secs(60);

fn rabbitmq_plain() -> SocketAddr {
    "127.0.0.1:5672".parse().expect("address")
}

/// The test's environment with some variables replaced.
fn vars_with(env: &TestEnv, overrides: &[(&str, String)]) -> Vec<(String, String)> {
    let mut vars = env.env();
    for (k, v) in overrides {
        vars.retain(|(name, _)| name != k);
        vars.push((k.to_string(), v.clone()));
    }
    vars
}

fn config_with(env: &TestEnv, overrides: &[(&str, String)]) -> Config {
    let vars: HashMap<String, String> = vars_with(env, overrides).into_iter().collect();
    Config::from_lookup(|k| vars.get(k).cloned()).expect("test configuration")
}

fn interpret_task(id: &str) -> serde_json::Value {
    json!({"id": id, "kind": "interpret", "input": {"message": "Please open a work order to replace the valve on line 4"}})
}

/// Poll a condition until it holds or `BOUND` passes (the proxy counts on its own tasks).
async fn eventually(cond: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + BOUND;
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// Publish one task on the plain connection and wait for its result.
async fn run_one_task(env: &TestEnv, id: &str) -> flota_shared::envelope::ResultEnvelope {
    let mut tap = env.tap_results().await;
    env.publish_task(&interpret_task(id)).await;
    let r = tap.next().await.unwrap_or_else(|| panic!("no result for {id}"));
    assert_eq!(r.id, id);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_round_trips_and_refuses_a_wrong_ca() {
    flota_tests::tls::install_crypto_provider();
    let env = TestEnv::new("tls-redis").await;
    let pki = Pki::generate().expect("test PKI");
    let redis = TlsRedis::start(&pki).await.expect("private TLS redis-server");

    // Right CA: a round trip through the store's own code (SET/GET inside Lua included).
    let cfg =
        config_with(&env, &[("FLOTA_REDIS_URL", redis.url()), ("FLOTA_TLS_CA_FILE", path_str(&pki.ca()))]);
    let tls_store = Store::new(store::pool(&cfg, 4).expect("pool"), &env.prefix);
    tokio::time::timeout(BOUND, tls_store.ping())
        .await
        .expect("bounded")
        .expect("PING over TLS with the right CA");
    assert!(tls_store.put_plan("tls-plan", "{}").await.expect("SETNX over TLS"), "new key");
    assert_eq!(tls_store.plan("tls-plan").await.expect("GET over TLS").as_deref(), Some("{}"));
    assert!(
        env.store.plan("tls-plan").await.expect("shared redis").is_none(),
        "written to the TLS Redis only"
    );

    // The wrong CA: refused, with a certificate error, not downgraded to plain.
    let wrong = config_with(
        &env,
        &[("FLOTA_REDIS_URL", redis.url()), ("FLOTA_TLS_CA_FILE", path_str(&pki.other_ca()))],
    );
    let wrong_store =
        Store::new(store::pool(&wrong, 1).expect("pool builds; the handshake is lazy"), &env.prefix);
    let err = tokio::time::timeout(BOUND, wrong_store.ping())
        .await
        .expect("bounded")
        .expect_err("a server certificate from another CA must be refused");
    let msg = format!("{err} {err:?}").to_lowercase();
    assert!(msg.contains("certificate") || msg.contains("issuer"), "not a certificate error: {err:?}");
    // No CA file at all: the system roots do not know the test CA either.
    let no_ca = config_with(&env, &[("FLOTA_REDIS_URL", redis.url())]);
    let no_ca_store = Store::new(store::pool(&no_ca, 1).expect("pool"), &env.prefix);
    let res = tokio::time::timeout(BOUND, no_ca_store.ping()).await.expect("bounded");
    assert!(res.is_err(), "an unknown CA must be refused even without FLOTA_TLS_CA_FILE");
    drop(redis);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_serves_a_worker() {
    let env = TestEnv::new("tls-redis-w").await;
    let pki = Pki::generate().expect("test PKI");
    let redis = TlsRedis::start(&pki).await.expect("private TLS redis-server");
    let tls = [("FLOTA_REDIS_URL", redis.url()), ("FLOTA_TLS_CA_FILE", path_str(&pki.ca()))];
    flota_tests::tls::install_crypto_provider();
    let tls_store = Store::new(store::pool(&config_with(&env, &tls), 4).expect("pool"), &env.prefix);

    // A real worker (plain AMQP, Redis over TLS) keeps its task state there.
    let gpu = procs::gpusim(&[]).await;
    let worker = procs::worker(&vars_with(&env, &tls), &gpu.url(), &[]).await;
    let mut tap = env.tap_results().await;
    env.publish_task(&interpret_task("tls-redis-1")).await;
    let r = tap.next().await.expect(
        "no result: the worker could not use the TLS Redis (a rustls `CryptoProvider` panic on its \
         stderr means the process never installed a crypto provider)",
    );
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    let state =
        tls_store.task_state("tls-redis-1").await.expect("read over TLS").expect("state written over TLS");
    assert_eq!(state.status, "succeeded");
    assert!(
        env.store.task_state("tls-redis-1").await.expect("shared redis").is_none(),
        "the worker used the TLS Redis, not the shared one"
    );
    assert_eq!(worker.terminate().await, Some(0), "worker drains and exits 0");
    drop(redis);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_over_tls_serves_a_worker_and_refuses_a_wrong_ca() {
    let env = TestEnv::new("tls-amqp").await;
    let pki = Pki::generate().expect("test PKI");
    let proxy = TlsProxy::start(&pki, rabbitmq_plain(), false).await.expect("TLS proxy");
    let tls = [("FLOTA_AMQP_URL", proxy.amqps_url()), ("FLOTA_TLS_CA_FILE", path_str(&pki.ca()))];

    // connect() with the right CA, and AMQP works through it.
    let cfg = config_with(&env, &tls);
    let conn = amqp::connect(&cfg, "tls test").await.expect("amqps connect with the right CA");
    let channel = conn.create_channel().await.expect("channel over TLS");
    channel
        .queue_declare(
            ShortString::from(env.topo.work_queue(flota_shared::envelope::Kind::Interpret)),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .expect("passive declare over TLS");
    let _ = conn.close(200, ShortString::from("done")).await;
    assert_eq!(proxy.handshakes(), 1);

    // A real worker end to end through TLS (results tapped on the plain connection).
    let gpu = procs::gpusim(&[]).await;
    let worker = procs::worker(&vars_with(&env, &tls), &gpu.url(), &[]).await;
    let r = run_one_task(&env, "tls-amqp-1").await;
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    assert!(proxy.handshakes() >= 3, "the worker's consume and publish connections went through TLS");
    assert_eq!(worker.terminate().await, Some(0), "worker drains and exits 0");

    // The wrong CA: connect fails, and no byte reached RabbitMQ (no handshake completed).
    let handshakes = proxy.handshakes();
    let wrong = config_with(
        &env,
        &[("FLOTA_AMQP_URL", proxy.amqps_url()), ("FLOTA_TLS_CA_FILE", path_str(&pki.other_ca()))],
    );
    let err = amqp::connect(&wrong, "tls wrong ca")
        .await
        .expect_err("a server certificate from another CA must be refused");
    let msg = format!("{err:#}").to_lowercase();
    assert!(msg.contains("certificate") || msg.contains("issuer"), "not a certificate error: {err:#}");
    assert_eq!(proxy.handshakes(), handshakes, "nothing was forwarded after the refused handshake");
    assert!(eventually(|| proxy.refused() >= 1).await, "the proxy saw the client abort the handshake");

    // A worker with the wrong CA never consumes: it logs the refusal and keeps retrying.
    let log = pki.dir.join("wrong-ca-worker.log");
    let mut child = tokio::process::Command::new(procs::binary("flota-worker"))
        .envs(vars_with(
            &env,
            &[
                ("FLOTA_AMQP_URL", proxy.amqps_url()),
                ("FLOTA_TLS_CA_FILE", path_str(&pki.other_ca())),
                ("FLOTA_METRICS_ADDR", "127.0.0.1:0".into()),
                ("FLOTA_GPU_URL", gpu.url()),
                ("RUST_LOG", "warn".into()),
            ],
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(&log).expect("log file")))
        .kill_on_drop(true)
        .spawn()
        .expect("start flota-worker");
    let logged = tokio::time::timeout(BOUND, async {
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("reconnecting") {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the wrong-CA worker reports its failed connection");
    assert!(
        logged.to_lowercase().contains("certificate"),
        "worker log names the certificate problem: {logged}"
    );
    let _ = child.kill().await;
    let mut stdout = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut stdout).await;
    }
    assert!(!stdout.contains("ready"), "the wrong-CA worker must never become ready: {stdout}");
    assert_eq!(proxy.handshakes(), handshakes, "no wrong-CA session reached RabbitMQ");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_client_certificate_is_required_and_accepted() {
    let env = TestEnv::new("tls-mtls").await;
    let pki = Pki::generate().expect("test PKI");
    let proxy = TlsProxy::start(&pki, rabbitmq_plain(), true).await.expect("mTLS proxy");
    let server_only = [("FLOTA_AMQP_URL", proxy.amqps_url()), ("FLOTA_TLS_CA_FILE", path_str(&pki.ca()))];

    // Without a client certificate: refused by the server, nothing forwarded.
    let cfg = config_with(&env, &server_only);
    let err = amqp::connect(&cfg, "mtls without cert")
        .await
        .expect_err("a broker that requires a client certificate must refuse a client without one");
    assert_eq!(proxy.handshakes(), 0, "nothing forwarded without a client certificate: {err:#}");
    assert!(eventually(|| proxy.refused() >= 1).await, "the proxy refused the handshake");

    // With FLOTA_TLS_CERT_FILE / FLOTA_TLS_KEY_FILE: accepted, and AMQP works.
    let mut mtls = server_only.to_vec();
    mtls.push(("FLOTA_TLS_CERT_FILE", path_str(&pki.client_cert())));
    mtls.push(("FLOTA_TLS_KEY_FILE", path_str(&pki.client_key())));
    let cfg = config_with(&env, &mtls);
    let conn = amqp::connect(&cfg, "mtls with cert").await.expect("amqps connect with a client certificate");
    let channel = conn.create_channel().await.expect("channel over mTLS");
    channel
        .queue_declare(
            ShortString::from(env.topo.dead_queue()),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .expect("passive declare over mTLS");
    let _ = conn.close(200, ShortString::from("done")).await;
    assert_eq!(proxy.handshakes(), 1);
    assert_eq!(proxy.client_certs(), 1, "the client presented its certificate");

    // And a real worker with the client certificate runs a task end to end.
    let gpu = procs::gpusim(&[]).await;
    let worker = procs::worker(&vars_with(&env, &mtls), &gpu.url(), &[]).await;
    let r = run_one_task(&env, "tls-mtls-1").await;
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    assert!(proxy.client_certs() >= 3, "the worker's connections presented the client certificate");
    assert_eq!(worker.terminate().await, Some(0), "worker drains and exits 0");
    env.cleanup().await;
}
