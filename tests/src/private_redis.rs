//! A throwaway `redis-server` on a free port, for tests that must restart
//! Redis (with or without persistence) without touching the shared one.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::PATIENCE;

pub struct PrivateRedis {
    child: Child,
    port: u16,
    dir: PathBuf,
    persistent: bool,
}

impl PrivateRedis {
    /// Start one; `persistent` turns AOF on with an fsync per write, so even
    /// a SIGKILL loses nothing that was acknowledged.
    pub async fn start(persistent: bool) -> PrivateRedis {
        let port = crate::tls::free_port().expect("a free port");
        let dir = std::env::temp_dir().join(format!("flota-redis-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("temp dir for the private Redis");
        let child = spawn(port, &dir, persistent).await;
        PrivateRedis { child, port, dir, persistent }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// SIGKILL it (a crash: no shutdown save), then start it again on the same
    /// port and data directory.
    pub async fn crash_and_restart(&mut self) {
        let _ = self.child.kill().await;
        self.child = spawn(self.port, &self.dir, self.persistent).await;
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn spawn(port: u16, dir: &std::path::Path, persistent: bool) -> Child {
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
        .arg("--dir")
        .arg(dir)
        .args(["--appendonly", if persistent { "yes" } else { "no" }, "--appendfsync", "always"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let child = cmd.spawn().expect("redis-server on PATH (ops/ensure-services.sh installs it)");
    let url = format!("redis://127.0.0.1:{port}/0");
    let client = redis::Client::open(url.as_str()).expect("redis url");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Ok(mut c) = client.get_multiplexed_async_connection().await
            && redis::cmd("PING").query_async::<String>(&mut c).await.is_ok()
        {
            return child;
        }
        assert!(tokio::time::Instant::now() < deadline, "private redis-server on port {port} never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
