//! Listeners: accept connections, detect the protocol from the first bytes,
//! and serve HTTP/1.1 and HTTP/2 on the same port; anything else is
//! forwarded as opaque TCP or refused. The inbound listener of a proxy with
//! a mesh identity terminates mutual TLS and, in strict mode (the default),
//! refuses plaintext.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use infermesh_proto::policy::{ListenerKind, MtlsMode};
use infermesh_proto::spiffe::SpiffeId;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::detect::{self, Protocol};
use crate::identity::{self, InboundConn};
use crate::opaque;
use crate::service::{self, Inputs};

/// How long a new connection may stay silent before it is treated as opaque
/// (a server-speaks-first protocol).
const DETECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a client may take to finish a TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a client may take to send a request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Cap on an HTTP/1.1 connection's read buffer and queued writes (hyper's
/// default is about 400 KB). The read buffer grows with a fast stream and
/// body slices in flight keep it alive: with the default a 1 MiB upload
/// held about 1 MB at its peak, with 128 KiB about 0.35 MB, for a little
/// more CPU (docs/benchmarks.md). It also bounds a request head, still well
/// above nginx's 32 KB and HAProxy's 16 KB.
const HTTP1_MAX_BUF: usize = 128 * 1024;

/// A bound listener.
pub struct Listener {
    tcp: TcpListener,
    kind: ListenerKind,
    inputs: Arc<Inputs>,
}

impl Listener {
    /// Binds `addr`; a bad or busy address fails here, at start-up.
    pub async fn bind(
        addr: SocketAddr,
        kind: ListenerKind,
        inputs: Arc<Inputs>,
    ) -> std::io::Result<Self> {
        let tcp = TcpListener::bind(addr).await?;
        Ok(Self { tcp, kind, inputs })
    }

    /// The bound address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Accepts connections until `shutdown` turns true, then lets open
    /// connections finish their requests for up to the snapshot's drain
    /// timeout.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let graceful = GracefulShutdown::new();
        let builders = Arc::new(Builders::new());
        loop {
            let accepted = tokio::select! {
                accepted = self.tcp.accept() => accepted,
                _ = shutdown.wait_for(|stop| *stop) => break,
            };
            let (stream, peer) = match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let inputs = self.inputs.clone();
            let watcher = graceful.watcher();
            let builders = builders.clone();
            let kind = self.kind;
            tokio::spawn(async move {
                serve_connection(stream, peer, kind, inputs, builders, watcher).await;
            });
        }
        drop(self.tcp);
        let drain = self.inputs.snapshot.load().drain_timeout();
        let open = graceful.count();
        if open > 0 {
            tracing::info!(listener = ?self.kind, open, "draining connections");
        }
        if tokio::time::timeout(drain, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(listener = ?self.kind, "drain deadline passed; closing remaining connections");
        }
    }
}

struct Builders {
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    /// The inbound TLS configuration, built on first use; it reads the
    /// certificate and roots at each handshake, so renewals need no rebuild.
    tls: std::sync::OnceLock<Arc<rustls::ServerConfig>>,
}

impl Builders {
    fn new() -> Self {
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_buf_size(HTTP1_MAX_BUF)
            .keep_alive(true);
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .initial_stream_window_size(4 * 1024 * 1024)
            .initial_connection_window_size(8 * 1024 * 1024)
            .max_concurrent_streams(1024)
            .keep_alive_interval(Duration::from_secs(30));
        Self {
            http1,
            http2,
            tls: std::sync::OnceLock::new(),
        }
    }

    fn inbound_tls(&self, identity: &Arc<identity::Identity>) -> Arc<rustls::ServerConfig> {
        self.tls.get_or_init(|| identity.server_config()).clone()
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    kind: ListenerKind,
    inputs: Arc<Inputs>,
    builders: Arc<Builders>,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let protocol = match sniff(&stream).await {
        Ok(protocol) => protocol,
        Err(error) => {
            tracing::debug!(%peer, %error, "connection closed before its protocol was known");
            return;
        }
    };
    // The inbound listener of a proxy with a mesh identity terminates
    // mutual TLS; the outbound one passes an application's own TLS through
    // as bytes.
    let mesh = match kind {
        ListenerKind::Inbound => identity::mesh(),
        ListenerKind::Outbound => None,
    };
    let port = stream.local_addr().map_or(0, |a| a.port());
    match (protocol, mesh) {
        // The TLS and opaque paths are boxed: a task's future is as large as
        // its largest state, and every plaintext HTTP connection would
        // otherwise carry room for a TLS session and copy buffers.
        (Protocol::Tls, Some(identity)) => {
            Box::pin(serve_mtls(
                stream, peer, port, kind, identity, inputs, builders, watcher,
            ))
            .await;
        }
        (Protocol::Http1 | Protocol::Http2 | Protocol::Opaque, Some(_))
            if inputs.snapshot.load().mtls_mode() == MtlsMode::Strict =>
        {
            tracing::warn!(%peer, "plaintext connection refused: inbound mTLS is strict (a MeshConfig with mtls.mode: permissive accepts plaintext)");
        }
        (Protocol::Tls | Protocol::Opaque, _) => {
            Box::pin(opaque::serve(stream, peer, kind, &inputs)).await;
        }
        (Protocol::Http1 | Protocol::Http2, _) => {
            let conn =
                (kind == ListenerKind::Inbound).then_some(InboundConn { caller: None, port });
            serve_http(
                stream, peer, protocol, conn, kind, inputs, &builders, watcher,
            )
            .await;
        }
    }
}

/// Terminates mutual TLS on the inbound listener and serves HTTP over it,
/// with the caller's identity on every request.
#[allow(clippy::too_many_arguments)]
async fn serve_mtls(
    stream: TcpStream,
    peer: SocketAddr,
    port: u16,
    kind: ListenerKind,
    identity: &'static Arc<identity::Identity>,
    inputs: Arc<Inputs>,
    builders: Arc<Builders>,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(builders.inbound_tls(identity));
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            let error = identity::describe_handshake_error(&error);
            tracing::warn!(%peer, %error, "inbound mTLS handshake refused");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "inbound mTLS handshake timed out");
            return;
        }
    };
    let (_, session) = tls.get_ref();
    let caller = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| SpiffeId::from_certificate(leaf).ok())
        .map(Arc::new);
    let protocol = match session.alpn_protocol() {
        Some(identity::ALPN_H2) => Protocol::Http2,
        _ => Protocol::Http1,
    };
    tracing::debug!(%peer, caller = ?caller.as_deref().map(ToString::to_string), "inbound mTLS connection");
    let conn = InboundConn { caller, port };
    serve_http(
        tls,
        peer,
        protocol,
        Some(conn),
        kind,
        inputs,
        &builders,
        watcher,
    )
    .await;
}

/// Serves HTTP/1.1 or HTTP/2 on `io`; on the inbound listener every request
/// carries `conn` (who called, on which port) in its extensions.
#[allow(clippy::too_many_arguments)]
async fn serve_http<I>(
    io: I,
    peer: SocketAddr,
    protocol: Protocol,
    conn: Option<InboundConn>,
    kind: ListenerKind,
    inputs: Arc<Inputs>,
    builders: &Builders,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
        if let Some(conn) = &conn {
            request.extensions_mut().insert(conn.clone());
        }
        // Boxed per request: hyper keeps room for one service future per
        // connection for the connection's whole life, so an unboxed future
        // of several KB would be held by every idle keep-alive connection.
        Box::pin(service::handle(inputs.clone(), kind, request))
    });
    let io = TokioIo::new(io);
    let result = match protocol {
        Protocol::Http2 => {
            watcher
                .watch(builders.http2.serve_connection(io, svc))
                .await
        }
        _ => {
            watcher
                .watch(builders.http1.serve_connection(io, svc))
                .await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}

/// Peeks at the first bytes until the protocol is known.
async fn sniff(stream: &TcpStream) -> std::io::Result<Protocol> {
    let mut buf = [0u8; detect::H2_PREFACE.len()];
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    let mut seen = 0;
    loop {
        let peeked = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(result) => result?,
            // A silent client: whatever it speaks, it is not HTTP.
            Err(_) => return Ok(Protocol::Opaque),
        };
        if peeked == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if let Some(protocol) = detect::detect(&buf[..peeked]) {
            return Ok(protocol);
        }
        if peeked == seen {
            // Same partial prefix as before: peek returns at once while the
            // data is unchanged, so wait a little for the rest to arrive.
            if tokio::time::Instant::now() >= deadline {
                return Ok(Protocol::Opaque);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        seen = peeked;
    }
}
