//! TLS end to end (issue #8, item 1), against real TLS servers only:
//!
//! - Redis over `rediss://`: a private TLS-only `redis-server` (plain port
//!   disabled) with the test's CA, once with `tls-auth-clients no` and once
//!   with `tls-auth-clients yes` (client certificate required).
//! - AMQP over `amqps://`: a TLS listener added at run time to the shared
//!   RabbitMQ (`rabbit_networking:start_ssl_listener` through `rabbitmqctl
//!   eval`, stopped by a drop guard), once with the client certificate optional
//!   and once with `fail_if_no_peer_cert`. The broker's own view
//!   (`rabbitmqctl list_connections`: port, `ssl`, `peer_cert_subject`) proves
//!   that the connections are TLS and present the client certificate, and that
//!   a refused client reached the broker on no port at all (no plain-text
//!   fallback).
//!
//! Each side is shown working with the right CA (a real worker runs a task)
//! and refusing, never downgrading, with the wrong one or none. The CA, the
//! server certificate (SAN `DNS:localhost`, `IP:127.0.0.1`), a client
//! certificate and an unrelated "wrong" CA are generated with `openssl` per
//! test. Tasks are published and results tapped over the plain connection of
//! [`TestEnv`] (the same broker); the worker's own connections are the TLS ones.

use std::collections::HashMap;
use std::process::Stdio;

use flota_shared::amqp;
use flota_shared::config::Config;
use flota_shared::envelope::{Kind, Status};
use flota_shared::store::{self, Store};
use flota_tests::tls::{
    Pki, RabbitTlsListener, TlsRedis, broker_connections, path_str, rabbit_listener_active,
};
use flota_tests::{PATIENCE, TestEnv, eventually, procs};
use lapin::options::QueueDeclareOptions;
use lapin::types::{FieldTable, ShortString};
use serde_json::json;
use tokio::io::AsyncReadExt;

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

/// Publish one task on the plain connection and wait for its result.
async fn run_one_task(env: &TestEnv, id: &str) -> flota_shared::envelope::ResultEnvelope {
    let mut tap = env.tap_results().await;
    env.publish_task(&interpret_task(id)).await;
    let r = tap.next().await.unwrap_or_else(|| panic!("no result for {id}"));
    assert_eq!(r.id, id);
    r
}

/// Connect with `cfg`, and prove AMQP works on that connection (a passive declare).
async fn connect_and_declare(env: &TestEnv, cfg: &Config, name: &str) -> lapin::Connection {
    let conn = amqp::connect(cfg, name).await.unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let channel = conn.create_channel().await.expect("channel over TLS");
    channel
        .queue_declare(
            ShortString::from(env.topo.work_queue(Kind::Interpret)),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .expect("passive declare over TLS");
    conn
}

/// Connect with `cfg`, expecting a refusal; its message, lower-cased.
async fn refused(cfg: &Config, name: &str, why: &str) -> String {
    let err = amqp::connect(cfg, name).await.err().unwrap_or_else(|| panic!("{why}: it connected"));
    format!("{err:#}").to_lowercase()
}

/// The broker's connections whose client named them with `needle` (on any port).
async fn broker_connections_named(needle: &str) -> Vec<flota_tests::tls::BrokerConnection> {
    broker_connections()
        .await
        .expect("list_connections")
        .into_iter()
        .filter(|c| c.name.contains(needle))
        .collect()
}

/// Stop the listener and check the broker no longer lists it.
async fn stop_listener(listener: RabbitTlsListener) {
    let port = listener.port;
    drop(listener);
    assert!(!rabbit_listener_active(port).await.expect("active_listeners"), "listener {port} was removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_round_trips_and_refuses_a_wrong_ca() {
    flota_tests::tls::install_crypto_provider();
    let env = TestEnv::new("tls-redis").await;
    let pki = Pki::generate().expect("test PKI");
    let redis = TlsRedis::start(&pki, false).await.expect("private TLS redis-server");

    // Right CA: a round trip through the store's own code (SET/GET inside Lua included).
    let cfg =
        config_with(&env, &[("FLOTA_REDIS_URL", redis.url()), ("FLOTA_TLS_CA_FILE", path_str(&pki.ca()))]);
    let tls_store = Store::new(store::pool(&cfg, 4).expect("pool"), &env.prefix);
    tokio::time::timeout(PATIENCE, tls_store.ping())
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
    let err = tokio::time::timeout(PATIENCE, wrong_store.ping())
        .await
        .expect("bounded")
        .expect_err("a server certificate from another CA must be refused");
    let msg = format!("{err} {err:?}").to_lowercase();
    assert!(msg.contains("certificate") || msg.contains("issuer"), "not a certificate error: {err:?}");
    // No CA file at all: the system roots do not know the test CA either.
    let no_ca = config_with(&env, &[("FLOTA_REDIS_URL", redis.url())]);
    let no_ca_store = Store::new(store::pool(&no_ca, 1).expect("pool"), &env.prefix);
    let res = tokio::time::timeout(PATIENCE, no_ca_store.ping()).await.expect("bounded");
    assert!(res.is_err(), "an unknown CA must be refused even without FLOTA_TLS_CA_FILE");
    drop(redis);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_client_certificate_is_required_and_accepted() {
    flota_tests::tls::install_crypto_provider();
    let env = TestEnv::new("tls-redis-mtls").await;
    let pki = Pki::generate().expect("test PKI");
    let redis = TlsRedis::start(&pki, true).await.expect("private TLS redis-server, tls-auth-clients yes");
    let server_only = [("FLOTA_REDIS_URL", redis.url()), ("FLOTA_TLS_CA_FILE", path_str(&pki.ca()))];

    // Without a client certificate: the server refuses (the server certificate itself verifies).
    let store_without =
        Store::new(store::pool(&config_with(&env, &server_only), 1).expect("pool"), &env.prefix);
    let res = tokio::time::timeout(PATIENCE, store_without.ping()).await.expect("bounded");
    assert!(res.is_err(), "a Redis with tls-auth-clients yes must refuse a client without a certificate");

    // With FLOTA_TLS_CERT_FILE / FLOTA_TLS_KEY_FILE: accepted, and commands work.
    let mut mtls = server_only.to_vec();
    mtls.push(("FLOTA_TLS_CERT_FILE", path_str(&pki.client_cert())));
    mtls.push(("FLOTA_TLS_KEY_FILE", path_str(&pki.client_key())));
    let tls_store = Store::new(store::pool(&config_with(&env, &mtls), 4).expect("pool"), &env.prefix);
    tokio::time::timeout(PATIENCE, tls_store.ping())
        .await
        .expect("bounded")
        .expect("PING over TLS with a client certificate");
    assert!(tls_store.put_plan("mtls-plan", "{}").await.expect("SETNX over mTLS"), "new key");
    assert_eq!(tls_store.plan("mtls-plan").await.expect("GET over mTLS").as_deref(), Some("{}"));

    // The client certificate does not replace server verification: the wrong CA is still refused.
    let mut wrong = mtls.clone();
    wrong.retain(|(k, _)| *k != "FLOTA_TLS_CA_FILE");
    wrong.push(("FLOTA_TLS_CA_FILE", path_str(&pki.other_ca())));
    let wrong_store = Store::new(store::pool(&config_with(&env, &wrong), 1).expect("pool"), &env.prefix);
    let err = tokio::time::timeout(PATIENCE, wrong_store.ping())
        .await
        .expect("bounded")
        .expect_err("a server certificate from another CA must be refused, client certificate or not");
    let msg = format!("{err} {err:?}").to_lowercase();
    assert!(msg.contains("certificate") || msg.contains("issuer"), "not a certificate error: {err:?}");
    drop(redis);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_serves_a_worker() {
    let env = TestEnv::new("tls-redis-w").await;
    let pki = Pki::generate().expect("test PKI");
    let redis = TlsRedis::start(&pki, false).await.expect("private TLS redis-server");
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
async fn amqp_over_a_rabbitmq_tls_listener_serves_a_worker_and_refuses_a_wrong_ca() {
    let env = TestEnv::new("tls-amqp").await;
    let pki = Pki::generate().expect("test PKI");
    let listener = RabbitTlsListener::start(&pki, false).await.expect("RabbitMQ TLS listener");
    let tls = [("FLOTA_AMQP_URL", listener.amqps_url()), ("FLOTA_TLS_CA_FILE", path_str(&pki.ca()))];

    // connect() with the right CA; the broker lists it on the TLS port as an ssl connection.
    let probe = format!("{} tls probe", env.prefix);
    let conn = connect_and_declare(&env, &config_with(&env, &tls), &probe).await;
    let seen = listener.connections().await.expect("list_connections");
    assert!(
        seen.iter().any(|c| c.name == probe && c.ssl && c.peer_cert_subject.is_none()),
        "the broker sees the probe as TLS, without a client certificate: {seen:?}"
    );
    let _ = conn.close(200, ShortString::from("done")).await;

    // A real worker end to end over TLS: every connection it opened is on the TLS listener.
    let worker_id = format!("{}-w1", env.prefix);
    let gpu = procs::gpusim(&[]).await;
    let worker =
        procs::worker(&vars_with(&env, &tls), &gpu.url(), &[("FLOTA_WORKER_ID", worker_id.as_str())]).await;
    let r = run_one_task(&env, "tls-amqp-1").await;
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    let mine = broker_connections_named(&worker_id).await;
    assert!(mine.len() >= 2, "the worker's consume and publish connections: {mine:?}");
    assert!(
        mine.iter().all(|c| c.port == listener.port && c.ssl),
        "every connection of the worker is TLS on the listener, none plain: {mine:?}"
    );
    assert_eq!(worker.terminate().await, Some(0), "worker drains and exits 0");

    // The wrong CA, and no CA file (the system roots do not know the test CA): refused.
    let wrong_ca =
        [("FLOTA_AMQP_URL", listener.amqps_url()), ("FLOTA_TLS_CA_FILE", path_str(&pki.other_ca()))];
    let wrong_name = format!("{} wrong ca", env.prefix);
    let msg =
        refused(&config_with(&env, &wrong_ca), &wrong_name, "a server certificate from another CA").await;
    assert!(msg.contains("certificate") || msg.contains("issuer"), "not a certificate error: {msg}");
    let no_ca = [("FLOTA_AMQP_URL", listener.amqps_url())];
    let msg =
        refused(&config_with(&env, &no_ca), &wrong_name, "an unknown CA without FLOTA_TLS_CA_FILE").await;
    assert!(msg.contains("certificate") || msg.contains("issuer"), "not a certificate error: {msg}");
    // amqps:// to the plain port: the client insists on TLS instead of talking AMQP in clear.
    let plain_port = [("FLOTA_AMQP_URL", "amqps://guest:guest@localhost:5672/%2f".to_string())];
    let msg = refused(&config_with(&env, &plain_port), &wrong_name, "amqps:// to a plain-text port").await;
    assert!(msg.contains("cannot connect"), "{msg}");
    assert!(broker_connections_named(&wrong_name).await.is_empty(), "no refused client reached the broker");

    // A worker with the wrong CA never consumes: it logs the refusal and keeps retrying.
    let wrong_id = format!("{}-wrong", env.prefix);
    let log = pki.dir.join("wrong-ca-worker.log");
    let mut child = tokio::process::Command::new(procs::binary("flota-worker"))
        .envs(vars_with(
            &env,
            &[
                ("FLOTA_AMQP_URL", listener.amqps_url()),
                ("FLOTA_TLS_CA_FILE", path_str(&pki.other_ca())),
                ("FLOTA_WORKER_ID", wrong_id.clone()),
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
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    // Two failed attempts: it retries rather than giving up (or falling back).
    eventually("the wrong-CA worker reports two failed connections", || {
        let failures = read_log().matches("reconnecting").count();
        async move { failures >= 2 }
    })
    .await;
    let logged = read_log();
    assert!(
        logged.to_lowercase().contains("certificate"),
        "worker log names the certificate problem: {logged}"
    );
    assert!(child.try_wait().expect("wait").is_none(), "the wrong-CA worker keeps retrying: {logged}");
    assert!(
        broker_connections_named(&wrong_id).await.is_empty(),
        "the wrong-CA worker has no connection on any port of the broker (no plain-text fallback)"
    );
    let _ = child.kill().await;
    let mut stdout = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut stdout).await;
    }
    assert!(!stdout.contains("ready"), "the wrong-CA worker must never become ready: {stdout}");
    stop_listener(listener).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_client_certificate_is_required_and_accepted_by_rabbitmq() {
    let env = TestEnv::new("tls-amqp-mtls").await;
    let pki = Pki::generate().expect("test PKI");
    let listener =
        RabbitTlsListener::start(&pki, true).await.expect("RabbitMQ TLS listener, peer cert required");
    let server_only = [("FLOTA_AMQP_URL", listener.amqps_url()), ("FLOTA_TLS_CA_FILE", path_str(&pki.ca()))];

    // Without a client certificate: refused by the broker, no connection made.
    let without = format!("{} mtls without cert", env.prefix);
    let msg = refused(&config_with(&env, &server_only), &without, "a client without a certificate").await;
    // TLS 1.3: the client's side of the handshake is done before the broker checks for a
    // certificate, and RabbitMQ closes with linger 0, so the client sees either the broker's
    // `CertificateRequired` alert or, when the reset wins the race, only "connection reset by
    // peer". Refused either way, by the broker: not the handshake timeout of `amqp::connect`.
    assert!(
        msg.contains("certificaterequired") || msg.contains("reset by peer"),
        "refused by the broker's certificate check: {msg}"
    );
    assert!(
        broker_connections_named(&without).await.is_empty(),
        "no connection without a client certificate"
    );

    // With FLOTA_TLS_CERT_FILE / FLOTA_TLS_KEY_FILE: accepted, and the broker saw the certificate.
    let mut mtls = server_only.to_vec();
    mtls.push(("FLOTA_TLS_CERT_FILE", path_str(&pki.client_cert())));
    mtls.push(("FLOTA_TLS_KEY_FILE", path_str(&pki.client_key())));
    let with = format!("{} mtls with cert", env.prefix);
    let conn = connect_and_declare(&env, &config_with(&env, &mtls), &with).await;
    let seen = listener.connections().await.expect("list_connections");
    assert!(
        seen.iter().any(|c| c.name == with
            && c.ssl
            && c.peer_cert_subject.as_deref().is_some_and(|s| s.contains("CN=flota-worker"))),
        "the broker sees the client certificate: {seen:?}"
    );
    let _ = conn.close(200, ShortString::from("done")).await;

    // A real worker with the one certificate for both: AMQP on the mTLS listener and a
    // Redis that requires client certificates too; it runs a task end to end.
    flota_tests::tls::install_crypto_provider();
    let redis = TlsRedis::start(&pki, true).await.expect("private TLS redis-server, tls-auth-clients yes");
    mtls.push(("FLOTA_REDIS_URL", redis.url()));
    let worker_id = format!("{}-w1", env.prefix);
    let gpu = procs::gpusim(&[]).await;
    let worker =
        procs::worker(&vars_with(&env, &mtls), &gpu.url(), &[("FLOTA_WORKER_ID", worker_id.as_str())]).await;
    let r = run_one_task(&env, "tls-mtls-1").await;
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    let mine = broker_connections_named(&worker_id).await;
    assert!(mine.len() >= 2, "the worker's consume and publish connections: {mine:?}");
    assert!(
        mine.iter().all(|c| c.port == listener.port
            && c.ssl
            && c.peer_cert_subject.as_deref().is_some_and(|s| s.contains("CN=flota-worker"))),
        "every connection of the worker is TLS on the listener with the client certificate: {mine:?}"
    );
    let tls_store = Store::new(store::pool(&config_with(&env, &mtls), 2).expect("pool"), &env.prefix);
    let state = tls_store.task_state("tls-mtls-1").await.expect("read over mTLS").expect("state over mTLS");
    assert_eq!(state.status, "succeeded");
    assert_eq!(worker.terminate().await, Some(0), "worker drains and exits 0");
    drop(redis);
    stop_listener(listener).await;
    env.cleanup().await;
}
