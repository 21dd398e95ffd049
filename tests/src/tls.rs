//! TLS test fixtures: a throwaway PKI made with `openssl`, a private
//! `redis-server` that speaks only TLS, and a TLS-terminating TCP proxy in
//! front of the shared RabbitMQ (which we cannot reconfigure), optionally
//! requiring client certificates.
//!
//! Nothing here touches the shared servers' configuration: the private Redis
//! listens on its own free port (plain port disabled), and the proxy forwards
//! decrypted bytes to RabbitMQ only after a completed handshake, counting
//! handshakes and forwarded sessions so tests can prove nothing leaked through
//! in clear after a refused handshake.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

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
    /// Start it with the PKI's server certificate; clients need not present one.
    pub async fn start(pki: &Pki) -> anyhow::Result<TlsRedis> {
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
            .args(["--tls-auth-clients", "no", "--save", "", "--appendonly", "no"])
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

/// What a [`TlsProxy`] saw.
#[derive(Default)]
pub struct ProxyStats {
    /// Handshakes completed (server certificate accepted, client certificate if required).
    pub handshakes: AtomicU64,
    /// Handshakes that failed: nothing of those connections reached the upstream.
    pub refused: AtomicU64,
    /// Completed handshakes whose client presented a certificate that verified.
    pub client_certs: AtomicU64,
}

/// A TLS-terminating TCP proxy: TLS on a free local port, plain TCP to the
/// upstream only after a completed handshake. Stops (and cuts its
/// connections) when dropped.
pub struct TlsProxy {
    pub addr: SocketAddr,
    pub stats: Arc<ProxyStats>,
    stop: CancellationToken,
}

impl TlsProxy {
    /// Serve the PKI's server certificate; with `require_client_cert`, refuse
    /// clients without a certificate signed by the PKI's CA.
    pub async fn start(
        pki: &Pki,
        upstream: SocketAddr,
        require_client_cert: bool,
    ) -> anyhow::Result<TlsProxy> {
        let certs = CertificateDer::pem_file_iter(pki.server_cert())?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(pki.server_key())?;
        // Explicit provider: feature unification enables both of rustls's
        // providers in this workspace, so the implicit default is ambiguous.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = if require_client_cert {
            let mut roots = rustls::RootCertStore::empty();
            for ca in CertificateDer::pem_file_iter(pki.ca())? {
                roots.add(ca?)?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder.with_single_cert(certs, key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(ProxyStats::default());
        let stop = CancellationToken::new();
        let (st, stop2) = (stats.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    _ = stop2.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => client,
                        Err(_) => return,
                    },
                };
                let (acceptor, st, stop3) = (acceptor.clone(), st.clone(), stop2.clone());
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(Duration::from_secs(30), acceptor.accept(client)).await;
                    let mut tls = match handshake {
                        Ok(Ok(tls)) => tls,
                        _ => {
                            st.refused.fetch_add(1, Ordering::AcqRel);
                            return;
                        }
                    };
                    st.handshakes.fetch_add(1, Ordering::AcqRel);
                    if tls.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty()) {
                        st.client_certs.fetch_add(1, Ordering::AcqRel);
                    }
                    let Ok(mut server) = TcpStream::connect(upstream).await else { return };
                    tokio::select! {
                        _ = stop3.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut tls, &mut server) => {}
                    }
                });
            }
        });
        Ok(TlsProxy { addr, stats, stop })
    }

    pub fn handshakes(&self) -> u64 {
        self.stats.handshakes.load(Ordering::Acquire)
    }
    pub fn refused(&self) -> u64 {
        self.stats.refused.load(Ordering::Acquire)
    }
    pub fn client_certs(&self) -> u64 {
        self.stats.client_certs.load(Ordering::Acquire)
    }

    /// `amqps://guest:guest@localhost:PORT/%2f` (the certificate names `localhost`).
    pub fn amqps_url(&self) -> String {
        format!("amqps://guest:guest@localhost:{}/%2f", self.addr.port())
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
