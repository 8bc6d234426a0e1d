//! A TCP echo server, the upstream for opaque (non-HTTP) traffic.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Default)]
struct Shared {
    connections: AtomicUsize,
    received: Mutex<Vec<u8>>,
}

/// Echoes back every byte it reads, on `127.0.0.1:<port>`.
pub struct TcpEchoServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl TcpEchoServer {
    pub fn start() -> Self {
        Self::bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind 127.0.0.1:0")
    }

    /// An echo server on `addr`.
    pub fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let serving = shared.clone();
        let (addr, stop) = crate::spawn_fixture_on(addr, "tcp-echo", move |listener| async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                serving.connections.fetch_add(1, Ordering::SeqCst);
                let shared = serving.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                shared.received.lock().unwrap().extend_from_slice(&buf[..n]);
                                if stream.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                });
            }
        })?;
        Ok(Self {
            addr,
            shared,
            _stop: stop,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Every byte received so far, over all connections.
    pub fn received(&self) -> Vec<u8> {
        self.shared.received.lock().unwrap().clone()
    }
}
