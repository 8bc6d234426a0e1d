//! An HTTP/2 server that refuses its first streams with `REFUSED_STREAM`
//! (as a server at its concurrency limit, or shutting down, does) and
//! answers the later ones, so tests can see a refused request retried.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::Response;

#[derive(Default)]
struct Shared {
    streams: AtomicUsize,
    refused: AtomicUsize,
}

/// An HTTP/2 cleartext server refusing the first `refuse` streams.
pub struct RefusingH2Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl RefusingH2Server {
    /// Starts a server; streams after the first `refuse` get 200 with a
    /// JSON body and `x-upstream: <name>`.
    pub fn start(name: &str, refuse: usize) -> Self {
        let shared = Arc::new(Shared::default());
        let serving = shared.clone();
        let name = name.to_string();
        let (addr, stop) = crate::spawn_fixture(&format!("refusing-{name}"), move |listener| {
            accept_loop(listener, serving, name, refuse)
        });
        Self {
            addr,
            shared,
            _stop: stop,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Streams opened so far, refused ones included.
    pub fn stream_count(&self) -> usize {
        self.shared.streams.load(Ordering::SeqCst)
    }

    /// Streams refused so far.
    pub fn refused_count(&self) -> usize {
        self.shared.refused.load(Ordering::SeqCst)
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    name: String,
    refuse: usize,
) {
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            continue;
        };
        let (shared, name) = (shared.clone(), name.clone());
        tokio::spawn(async move {
            let Ok(mut connection) = h2::server::handshake(socket).await else {
                return;
            };
            while let Some(Ok((_request, mut respond))) = connection.accept().await {
                let n = shared.streams.fetch_add(1, Ordering::SeqCst);
                if n < refuse {
                    shared.refused.fetch_add(1, Ordering::SeqCst);
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                    continue;
                }
                let response = Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .header("x-upstream", name.as_str())
                    .body(())
                    .unwrap();
                if let Ok(mut stream) = respond.send_response(response, false) {
                    let body = format!("{{\"upstream\":\"{name}\",\"status\":200}}");
                    let _ = stream.send_data(Bytes::from(body), true);
                }
            }
        });
    }
}
