//! A throwaway RabbitMQ node (its own node name, ports and data directory)
//! that a test may crash and restart without touching the shared broker.
//! Boots in tens of seconds on this machine; use it only where a real broker
//! restart is the point of the test.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// Booting an Erlang node on a loaded 2-core machine is slow; generous on purpose.
const BOOT_PATIENCE: Duration = Duration::from_secs(240);
const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

pub struct PrivateRabbitMq {
    child: Child,
    node: String,
    port: u16,
    dist_port: u16,
    dir: PathBuf,
}

impl PrivateRabbitMq {
    pub async fn start() -> PrivateRabbitMq {
        let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let dir = std::env::temp_dir().join(format!("flota-rabbit-{id}"));
        std::fs::create_dir_all(&dir).expect("temp dir for the private RabbitMQ");
        let (port, dist_port) =
            (crate::tls::free_port().expect("a free port"), crate::tls::free_port().expect("a free port"));
        let node = format!("flota-t-{id}@localhost");
        let child = boot(&node, port, dist_port, &dir).await;
        PrivateRabbitMq { child, node, port, dist_port, dir }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// SIGKILL the whole node (a crash: no orderly shutdown), then boot it
    /// again on the same ports and data directory. Durable queues come back
    /// with their messages; every client connection is gone.
    pub async fn crash_and_restart(&mut self) {
        kill_group(&self.child);
        let _ = self.child.wait().await;
        self.child = boot(&self.node, self.port, self.dist_port, &self.dir).await;
    }
}

impl PrivateRabbitMq {
    /// Raise (or clear) a memory alarm on this node only: with the watermark
    /// near zero the node blocks every publishing connection, as a real alarm
    /// does, until it is set back.
    pub async fn memory_alarm(&self, on: bool) {
        let watermark = if on { "0.000001" } else { "0.4" };
        // The CLI beside the server script, not Debian's wrapper (which switches to
        // the rabbitmq user and its cookie): the node was started by this user.
        let status = Command::new(CTL)
            .args(["-n", &self.node, "set_vm_memory_high_watermark", watermark])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .await
            .unwrap_or_else(|e| panic!("cannot run {CTL}: {e}"));
        assert!(status.success(), "{CTL} set_vm_memory_high_watermark {watermark} on {}", self.node);
    }
}

impl Drop for PrivateRabbitMq {
    fn drop(&mut self) {
        kill_group(&self.child);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The server script starts Erlang as a child: kill its process group.
fn kill_group(child: &Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .stderr(Stdio::null())
            .status();
    }
}

async fn boot(node: &str, port: u16, dist_port: u16, dir: &std::path::Path) -> Child {
    let mut cmd = Command::new(SERVER);
    cmd.env("RABBITMQ_NODENAME", node)
        .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
        .env("RABBITMQ_NODE_PORT", port.to_string())
        .env("RABBITMQ_DIST_PORT", dist_port.to_string())
        .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
        .env("RABBITMQ_LOG_BASE", dir.join("log"))
        .env("RABBITMQ_PID_FILE", dir.join("pid"))
        .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
        .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
        .env("RABBITMQ_ENABLED_PLUGINS", "")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {SERVER} (RabbitMQ installed?): {e}"));
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let deadline = tokio::time::Instant::now() + BOOT_PATIENCE;
    loop {
        // The port opens before the broker finishes booting: wait for a real AMQP handshake.
        let props = lapin::ConnectionProperties::default();
        if let Ok(Ok(conn)) =
            tokio::time::timeout(Duration::from_secs(10), lapin::Connection::connect(&url, props)).await
        {
            let _ = conn.close(200, lapin::types::ShortString::from("booted")).await;
            return child;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "private RabbitMQ {node} never answered on port {port}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
