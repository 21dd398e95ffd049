//! TLS test fixtures: a throwaway PKI made with `openssl`, a private
//! `redis-server` that speaks only TLS, and a TLS listener added at run time
//! to the shared RabbitMQ (and removed again), optionally requiring client
//! certificates.
//!
//! Neither touches the shared servers' existing configuration: the private
//! Redis listens on its own free port (plain port disabled); the RabbitMQ
//! listener is started with `rabbit_networking:start_ssl_listener` on a free
//! port of 127.0.0.1 through `rabbitmqctl eval` (no restart: other tests share
//! the broker) and stopped when its guard is dropped, panics included. The
//! broker sees which of its connections are TLS and which client certificate
//! they presented ([`broker_connections`]), so tests assert on the server's
//! view, not only the client's.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// A throwaway PKI in a temporary directory (removed on drop): a CA, a server
/// certificate for `localhost` / `127.0.0.1` signed by it, a client
/// certificate signed by it, and an unrelated second CA ("the wrong CA").
pub struct Pki {
    pub dir: PathBuf,
}

const CA_EXT: &str = "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = Flota test CA\n\
[v3_ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n\
subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid:always\n";
const SERVER_EXT: &str = "basicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\n\
extendedKeyUsage = serverAuth\nsubjectAltName = DNS:localhost,IP:127.0.0.1\n\
subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n";
const CLIENT_EXT: &str = "basicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\n\
extendedKeyUsage = clientAuth\nsubjectAltName = DNS:flota-worker\n\
subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n";

impl Pki {
    /// Generate everything with the system's `openssl` (EC P-256 keys, PKCS#8 PEM).
    pub fn generate() -> anyhow::Result<Pki> {
        let dir = std::env::temp_dir().join(format!("flota-pki-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        let pki = Pki { dir };
        std::fs::write(pki.dir.join("ca.cnf"), CA_EXT)?;
        std::fs::write(pki.dir.join("server.ext"), SERVER_EXT)?;
        std::fs::write(pki.dir.join("client.ext"), CLIENT_EXT)?;
        pki.make_ca("ca")?;
        pki.make_ca("other-ca")?;
        pki.make_leaf("server", "localhost", "server.ext")?;
        pki.make_leaf("client", "flota-worker", "client.ext")?;
        Ok(pki)
    }

    fn openssl(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .context("cannot run `openssl` (is it installed?)")?;
        if !out.status.success() {
            bail!("openssl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    fn make_ca(&self, name: &str) -> anyhow::Result<()> {
        let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
        self.openssl(&[
            "req",
            "-x509",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &pem,
            "-days",
            "2",
            "-config",
            "ca.cnf",
            "-extensions",
            "v3_ca",
        ])
    }

    fn make_leaf(&self, name: &str, cn: &str, ext: &str) -> anyhow::Result<()> {
        let (key, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
        let subj = format!("/CN={cn}");
        self.openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &subj,
        ])?;
        let serial = format!("0x{}", uuid::Uuid::new_v4().simple());
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            &serial,
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            ext,
        ])
    }

    /// The CA that signed the server and client certificates.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// A CA that signed nothing we serve: verifying against it must fail.
    pub fn other_ca(&self) -> PathBuf {
        self.dir.join("other-ca.pem")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("client.pem")
    }
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client.key")
    }
}

impl Pki {
    /// Directory 0755, files 0644: a broker running as another user must read
    /// the server's key (a throwaway test key, so that is fine).
    pub fn make_world_readable(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o755))?;
        for entry in std::fs::read_dir(&self.dir)? {
            std::fs::set_permissions(entry?.path(), std::fs::Permissions::from_mode(0o644))?;
        }
        Ok(())
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Install ring as this process's rustls provider (idempotent). Feature
/// unification enables both of rustls's providers in this workspace (ring via
/// lapin, aws-lc-rs via reqwest), and then `rustls::ClientConfig::builder()`
/// (which redis-rs calls for `rediss://`) panics unless a process default is
/// installed. Tests call this so in-process TLS checks do not depend on which
/// test happened to install one first.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Path as a `String` for environment variables and arguments.
pub fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A free local port (bound then released: the usual small race, fine for tests).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A private `redis-server` that only speaks TLS (`--port 0`), with no
/// persistence; killed when dropped. Never the shared Redis.
pub struct TlsRedis {
    pub port: u16,
    child: Child,
}

impl TlsRedis {
    /// Start it with the PKI's server certificate; with `require_client_cert`
    /// (`tls-auth-clients yes`) it refuses clients without a certificate
    /// signed by the PKI's CA, otherwise clients need not present one.
    pub async fn start(pki: &Pki, require_client_cert: bool) -> anyhow::Result<TlsRedis> {
        let binary = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("redis-server"));
        let port = free_port()?;
        let log = std::fs::File::create(pki.dir.join("redis.log"))?;
        let child = Command::new(&binary)
            .args(["--port", "0", "--bind", "127.0.0.1", "--tls-port", &port.to_string()])
            .args(["--tls-cert-file", &path_str(&pki.server_cert())])
            .args(["--tls-key-file", &path_str(&pki.server_key())])
            .args(["--tls-ca-cert-file", &path_str(&pki.ca())])
            .args(["--tls-auth-clients", if require_client_cert { "yes" } else { "no" }])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--dir", &path_str(&pki.dir), "--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let mut redis = TlsRedis { port, child };
        // Ready once the TLS port accepts TCP connections (bounded).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Ok(redis);
            }
            if let Ok(Some(status)) = redis.child.try_wait() {
                let log = std::fs::read_to_string(pki.dir.join("redis.log")).unwrap_or_default();
                bail!("redis-server exited ({status}) before listening: {log}");
            }
            if tokio::time::Instant::now() > deadline {
                bail!("redis-server did not listen on {port} within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `rediss://127.0.0.1:PORT/0`
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/0", self.port)
    }
}

/// A TLS listener on the shared RabbitMQ, on a free port of 127.0.0.1,
/// serving the PKI's server certificate; stopped when dropped (panics too).
pub struct RabbitTlsListener {
    pub port: u16,
}

impl RabbitTlsListener {
    /// Add the listener to the running broker. With `require_client_cert` the
    /// broker refuses clients without a certificate signed by the PKI's CA
    /// (`fail_if_no_peer_cert`); otherwise a certificate is optional (but
    /// verified when presented). The broker runs as another user (`rabbitmq`),
    /// so the PKI is made readable first (a throwaway test key) and the broker
    /// is asked to read the files itself: `start_ssl_listener` returns `ok`
    /// even for files it cannot read, which would only show later as failed
    /// handshakes.
    pub async fn start(pki: &Pki, require_client_cert: bool) -> anyhow::Result<RabbitTlsListener> {
        pki.make_world_readable()?;
        let files = [pki.ca(), pki.server_cert(), pki.server_key()].map(|p| erl_string(&p));
        let readable =
            rabbitmqctl_eval(&format!("[element(1, file:read_file(F)) || F <- [{}]].", files.join(", ")))
                .await?;
        if readable.trim() != "[ok,ok,ok]" {
            bail!(
                "the broker cannot read the PKI in {} ({readable}): is the path traversable?",
                pki.dir.display()
            );
        }
        let port = free_port()?;
        let [ca, cert, key] = files;
        let out = rabbitmqctl_eval(&format!(
            "rabbit_networking:start_ssl_listener({{\"127.0.0.1\", {port}}}, [{{cacertfile, {ca}}}, \
             {{certfile, {cert}}}, {{keyfile, {key}}}, {{verify, verify_peer}}, \
             {{fail_if_no_peer_cert, {require_client_cert}}}], 1)."
        ))
        .await?;
        if out.trim() != "ok" {
            // Not ours (say, the port was taken since): nothing for a guard to stop.
            bail!("start_ssl_listener on {port} answered {out}");
        }
        Ok(RabbitTlsListener { port })
    }

    /// `amqps://guest:guest@localhost:PORT/%2f` (the certificate names
    /// `localhost` and 127.0.0.1; guest may only connect from localhost).
    pub fn amqps_url(&self) -> String {
        format!("amqps://guest:guest@localhost:{}/%2f", self.port)
    }

    /// The broker's connections on this listener.
    pub async fn connections(&self) -> anyhow::Result<Vec<BrokerConnection>> {
        Ok(broker_connections().await?.into_iter().filter(|c| c.port == self.port).collect())
    }
}

/// Whether the shared broker lists a listener on `port` (any protocol).
pub async fn rabbit_listener_active(port: u16) -> anyhow::Result<bool> {
    let out = rabbitmqctl_eval(&format!(
        "lists:any(fun(L) -> element(6, L) =:= {port} end, rabbit_networking:active_listeners())."
    ))
    .await?;
    Ok(out.trim() == "true")
}

impl Drop for RabbitTlsListener {
    fn drop(&mut self) {
        // Blocking on purpose: a drop may run while a panic unwinds, with no runtime to await on.
        let _ = std::process::Command::new("rabbitmqctl")
            .args([
                "eval",
                &format!("rabbit_networking:stop_tcp_listener({{\"127.0.0.1\", {}}}).", self.port),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// One AMQP connection as the broker sees it.
#[derive(Debug, Clone)]
pub struct BrokerConnection {
    /// The broker's port the client connected to.
    pub port: u16,
    /// Whether the connection is TLS.
    pub ssl: bool,
    /// The subject of the client certificate (`None` without one).
    pub peer_cert_subject: Option<String>,
    /// The client's connection name (`connection_name` client property).
    pub name: String,
}

/// Every AMQP connection on the shared broker, from `rabbitmqctl list_connections`.
pub async fn broker_connections() -> anyhow::Result<Vec<BrokerConnection>> {
    let out = rabbitmqctl(&[
        "list_connections",
        "port",
        "ssl",
        "peer_cert_subject",
        "client_properties",
        "--formatter",
        "json",
        "-q",
    ])
    .await?;
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&out).with_context(|| format!("list_connections output: {out}"))?;
    Ok(rows
        .iter()
        .map(|row| BrokerConnection {
            port: row["port"].as_u64().unwrap_or(0) as u16,
            ssl: row["ssl"].as_bool().unwrap_or(false),
            peer_cert_subject: row["peer_cert_subject"]
                .as_str()
                .filter(|s| !s.is_empty() && *s != "none")
                .map(str::to_string),
            name: connection_name(&row["client_properties"]).unwrap_or_default(),
        })
        .collect())
}

/// `connection_name` from the JSON form of client properties (`[name, type, value]` triples).
fn connection_name(props: &serde_json::Value) -> Option<String> {
    props.as_array()?.iter().find_map(|p| {
        let p = p.as_array()?;
        (p.first()?.as_str()? == "connection_name").then(|| p.get(2)?.as_str().map(str::to_string))?
    })
}

async fn rabbitmqctl(args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new("rabbitmqctl").args(args).stdin(Stdio::null()).kill_on_drop(true).output(),
    )
    .await
    .context("rabbitmqctl did not answer within 60 s")?
    .context("cannot run `rabbitmqctl`")?;
    if !out.status.success() {
        bail!("rabbitmqctl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn rabbitmqctl_eval(expr: &str) -> anyhow::Result<String> {
    rabbitmqctl(&["eval", expr]).await
}

/// A path as an Erlang string literal (a charlist, as `ssl` options expect).
fn erl_string(p: &Path) -> String {
    let s = path_str(p);
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}
