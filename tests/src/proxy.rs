//! A TCP fault proxy placed between the fleet and RabbitMQ or Redis, so fault
//! tests do not have to stop the shared servers: it can cut every open
//! connection, black-hole traffic (connections stay open, nothing flows), or
//! add delay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone)]
pub struct FaultProxy {
    pub addr: SocketAddr,
    state: Arc<State>,
}

struct State {
    /// Bumped to cut every connection open now.
    generation: watch::Sender<u64>,
    black_hole: AtomicBool,
    delay_ms: AtomicU64,
    /// Refuse new connections (server "down").
    refuse: AtomicBool,
}

impl FaultProxy {
    /// Listen on a free local port and forward to `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let (generation, _) = watch::channel(0);
        let state = Arc::new(State {
            generation,
            black_hole: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
            refuse: AtomicBool::new(false),
        });
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if st.refuse.load(Ordering::Acquire) {
                    drop(client);
                    continue;
                }
                let st = st.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        pipe(client, server, st).await;
                    }
                });
            }
        });
        FaultProxy { addr, state }
    }

    /// Close every connection open now (clients must reconnect).
    pub fn cut_all(&self) {
        self.state.generation.send_modify(|g| *g += 1);
    }

    /// Stop forwarding bytes while keeping connections open.
    pub fn black_hole(&self, on: bool) {
        self.state.black_hole.store(on, Ordering::Release);
    }

    /// Refuse new connections (and cut the open ones when `on`).
    pub fn down(&self, on: bool) {
        self.state.refuse.store(on, Ordering::Release);
        if on {
            self.cut_all();
        }
    }

    pub fn delay(&self, d: Duration) {
        self.state.delay_ms.store(d.as_millis() as u64, Ordering::Release);
    }
}

async fn pipe(client: TcpStream, server: TcpStream, st: Arc<State>) {
    let mut cut = st.generation.subscribe();
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = copy(cr, sw, st.clone());
    let down = copy(sr, cw, st.clone());
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = cut.changed() => {}
    }
}

async fn copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    st: Arc<State>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while st.black_hole.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let delay = st.delay_ms.load(Ordering::Acquire);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn forwards_then_cuts() {
        let proxy = FaultProxy::start(echo_server().await).await;
        let mut c = TcpStream::connect(proxy.addr).await.unwrap();
        c.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        proxy.cut_all();
        // After the cut the connection is closed: a read returns 0 (or an error).
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await.unwrap().unwrap_or(0);
        assert_eq!(n, 0);
        // New connections work again.
        let mut c2 = TcpStream::connect(proxy.addr).await.unwrap();
        c2.write_all(b"pong").await.unwrap();
        c2.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
    }
}
