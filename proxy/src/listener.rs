//! Listeners: accept connections, detect the protocol from the first bytes,
//! and serve HTTP/1.1 and HTTP/2 on the same port; anything else is
//! forwarded as opaque TCP or refused. The inbound listener of a proxy with
//! a mesh identity terminates mutual TLS and, in strict mode (the default),
//! refuses plaintext.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::Either;
use futures_util::FutureExt;

use http::{header, HeaderValue, Response, StatusCode};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use infermesh_filters::error::{grpc_code, grpc_error_response};
use infermesh_filters::grpc::is_grpc;
use infermesh_filters::BoxBody;
use infermesh_proto::policy::{ListenerKind, MtlsMode};
use infermesh_proto::spiffe::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::detect::{self, Protocol};
use crate::identity::{self, InboundConn};
use crate::inputs::Inputs;
use crate::metrics::{listener_label, CallerLabels, PassthroughLabels};
use crate::opaque;
use crate::redirect::{Interception, Redirected};
use crate::refusal::{self, Reason};
use crate::service;
use closing::Closing;

mod closing;

/// How long a new connection may stay silent before it is treated as opaque
/// (a server-speaks-first protocol).
const DETECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a client may take to finish a TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a client may take to send a request head (HTTP/1.1), unless
/// the `--header-read-timeout` flag says otherwise.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The budget of a request's header list, counted as HTTP/2 counts it
/// (name + value + 32 bytes per field) plus the request target, the same on
/// HTTP/1.1 and HTTP/2. Over it the proxy answers 431 with a JSON body.
/// Envoy's default is 60 KiB; nginx and HAProxy allow less.
pub const MAX_HEADER_LIST: usize = 64 * 1024;
/// Most header fields a request may carry, on both protocols: hyper's
/// HTTP/1.1 parser holds this many on the stack (more would cost a heap
/// allocation per request), and Envoy's default is the same.
pub const MAX_HEADER_FIELDS: usize = 100;
/// The HTTP/2 `SETTINGS_MAX_HEADER_LIST_SIZE` the proxy advertises: twice
/// the budget, so that a head over the budget still reaches the proxy's own
/// 431 with a JSON body and a count (hyper's default, 16 KiB, made h2 close
/// the whole connection for a 100 KB header: h2 calls four times the limit
/// abuse). Above it the h2 library answers 431 on the stream by itself;
/// a block of more than 10 frames (`(limit / frame size) * 1.25`, about
/// 160 KiB on the wire) or 512 KiB decoded it treats as a flood and closes
/// the connection with ENHANCE_YOUR_CALM.
const H2_MAX_HEADER_LIST: u32 = 2 * MAX_HEADER_LIST as u32;
/// Cap on an HTTP/1.1 connection's read buffer and queued writes (hyper's
/// default is about 400 KB). The read buffer grows with a fast stream and
/// body slices in flight keep it alive: with the default a 1 MiB upload
/// held about 1 MB at its peak, with 128 KiB about 0.35 MB, for a little
/// more CPU (docs/benchmarks.md). It is also the hard limit of an HTTP/1.1
/// request head (hyper answers 431 and closes the connection), above the
/// [`MAX_HEADER_LIST`] budget the proxy answers itself.
const HTTP1_MAX_BUF: usize = 128 * 1024;

/// A bound listener.
pub struct Listener {
    tcp: TcpListener,
    kind: ListenerKind,
    inputs: Arc<Inputs>,
    header_read_timeout: Duration,
    interception: Arc<Interception>,
}

impl Listener {
    /// Binds `addr`; a bad or busy address fails here, at start-up.
    pub async fn bind(
        addr: SocketAddr,
        kind: ListenerKind,
        inputs: Arc<Inputs>,
    ) -> std::io::Result<Self> {
        let tcp = if addr.is_ipv6() {
            bind_ipv6_only(addr)?
        } else {
            TcpListener::bind(addr).await?
        };
        Ok(Self {
            tcp,
            kind,
            inputs,
            header_read_timeout: HEADER_READ_TIMEOUT,
            interception: Arc::default(),
        })
    }

    /// Sets how redirected connections are treated (where inbound
    /// passthrough goes, which ports are opaque, which are the proxy's own).
    pub fn with_interception(mut self, interception: Arc<Interception>) -> Self {
        self.interception = interception;
        self
    }

    /// Sets how long an HTTP/1.1 client may take to send a request head
    /// ([`HEADER_READ_TIMEOUT`] by default); a slower one is refused.
    pub fn with_header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    /// The bound address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Accepts connections until the drain is signaled, then lets open
    /// connections finish their requests for up to the snapshot's drain
    /// timeout, and releases the drain.
    pub async fn run(self, drain: drain::Watch) {
        let graceful = Closing::new();
        let builders = Arc::new(Builders::new(self.header_read_timeout));
        let signaled = drain.signaled();
        tokio::pin!(signaled);
        let release = loop {
            let accepted = tokio::select! {
                accepted = self.tcp.accept() => accepted,
                release = &mut signaled => break release,
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
            let interception = self.interception.clone();
            tokio::spawn(async move {
                serve_connection(stream, peer, kind, inputs, builders, &interception, watcher)
                    .await;
            });
        };
        drop(self.tcp);
        let drain = self.inputs.snapshot.load().drain_timeout();
        let open = graceful.count();
        if open > 0 {
            tracing::info!(listener = ?self.kind, open, "draining connections");
        }
        if tokio::time::timeout(drain, graceful.close()).await.is_err() {
            tracing::warn!(listener = ?self.kind, "drain deadline passed; closing remaining connections");
        }
        drop(release);
    }
}

/// Binds an IPv6 address for IPv6 alone, so `[::]:4143` can sit beside
/// `0.0.0.0:4143` (Linux would otherwise make it take IPv4 as well).
fn bind_ipv6_only(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol as IpProtocol, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(IpProtocol::TCP))?;
    socket.set_only_v6(true)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

struct Builders {
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    /// The inbound TLS configuration, built on first use; it reads the
    /// certificate and roots at each handshake, so renewals need no rebuild.
    tls: std::sync::OnceLock<Arc<rustls::ServerConfig>>,
}

impl Builders {
    fn new(header_read_timeout: Duration) -> Self {
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .max_buf_size(HTTP1_MAX_BUF)
            // hyper's default field limit is MAX_HEADER_FIELDS, parsed into
            // an array on the stack; a larger limit would put that array on
            // the heap for every request.
            .keep_alive(true);
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .initial_stream_window_size(4 * 1024 * 1024)
            .initial_connection_window_size(8 * 1024 * 1024)
            .max_concurrent_streams(1024)
            .max_header_list_size(H2_MAX_HEADER_LIST)
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
    interception: &Interception,
    watcher: closing::Watcher,
) {
    let redirected = match interception.classify(kind, &stream, peer) {
        Ok(redirected) => redirected,
        Err(looped) => {
            inputs
                .metrics
                .passthrough
                .get_or_create(&PassthroughLabels {
                    listener: listener_label(kind),
                    protocol: "tcp",
                    outcome: "loop",
                })
                .inc();
            refuse(&inputs, kind, peer, Reason::Loop, &looped);
            return;
        }
    };
    // Server-speaks-first protocols say nothing to detect: copy them at once.
    // Outbound only: inbound, mutual TLS (when strict) comes first.
    let opaque =
        redirected.filter(|r| kind == ListenerKind::Outbound && interception.opaque(r.original));
    if let Some(redirected) = opaque {
        Box::pin(opaque::pass_through(
            stream,
            peer,
            kind,
            &inputs,
            redirected.passthrough,
        ))
        .await;
        return;
    }
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
        ListenerKind::Inbound => inputs.identity.clone(),
        ListenerKind::Outbound => None,
    };
    // Authorization speaks of the port the caller dialled.
    let port = match redirected {
        Some(redirected) => redirected.original.port(),
        None => stream.local_addr().map_or(0, |a| a.port()),
    };
    match (protocol, mesh) {
        // The TLS and opaque paths are boxed: a task's future is as large as
        // its largest state, and every plaintext HTTP connection would
        // otherwise carry room for a TLS session and copy buffers.
        (Protocol::Tls, Some(identity)) => {
            Box::pin(serve_mtls(
                stream, peer, port, kind, identity, inputs, builders, redirected, watcher,
            ))
            .await;
        }
        (Protocol::Http1 | Protocol::Http2 | Protocol::Opaque, Some(_))
            if inputs.snapshot.load().mtls_mode() == MtlsMode::Strict =>
        {
            refuse(
                &inputs,
                kind,
                peer,
                Reason::PlaintextRefused,
                &"plaintext connection refused: inbound mTLS is strict (a MeshConfig with mtls.mode: permissive accepts plaintext)",
            );
        }
        (Protocol::Tls | Protocol::Opaque, _) => match redirected {
            Some(redirected) => {
                Box::pin(opaque::pass_through(
                    stream,
                    peer,
                    kind,
                    &inputs,
                    redirected.passthrough,
                ))
                .await;
            }
            None => Box::pin(opaque::serve(stream, peer, kind, &inputs)).await,
        },
        (Protocol::Http1 | Protocol::Http2, _) => {
            let conn =
                (kind == ListenerKind::Inbound).then_some(InboundConn { caller: None, port });
            // A task of its own: this one, with room for detection, ends,
            // and a keep-alive connection holds hyper's state and little else.
            tokio::spawn(serve_http(
                stream, peer, protocol, conn, redirected, kind, inputs, &builders, watcher,
            ));
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
    identity: Arc<identity::Identity>,
    inputs: Arc<Inputs>,
    builders: Arc<Builders>,
    redirected: Option<Redirected>,
    watcher: closing::Watcher,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(builders.inbound_tls(&identity));
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        // The client went away (a probe, `openssl s_time`, a client that
        // closes right after its handshake while the session tickets are
        // written): nothing was refused.
        Ok(Err(error)) if identity::client_went_away(&error) => {
            tracing::debug!(%peer, %error, "the client closed the connection during the mTLS handshake");
            return;
        }
        Ok(Err(error)) => {
            let reason = identity::handshake_refusal(&error);
            let error = identity::describe_handshake_error(&error);
            refuse(
                &inputs,
                kind,
                peer,
                reason,
                &format_args!("inbound mTLS handshake refused: {error}"),
            );
            return;
        }
        Err(_) => {
            refuse(
                &inputs,
                kind,
                peer,
                Reason::TlsTimeout,
                &"inbound mTLS handshake timed out",
            );
            return;
        }
    };
    let (_, session) = tls.get_ref();
    let leaf = session.peer_certificates().and_then(|chain| chain.first());
    // A resumed session skips the certificate check: its ticket holds the
    // caller's chain as it was. A chain that has expired since is refused,
    // as a full handshake would refuse it.
    if session.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
        let expired = leaf
            .and_then(|leaf| infermesh_proto::spiffe::certificate_not_after(leaf))
            .is_none_or(|not_after| not_after <= std::time::SystemTime::now());
        if expired {
            refuse(
                &inputs,
                kind,
                peer,
                Reason::TlsExpired,
                &"inbound mTLS session refused: it resumed a session whose client certificate has expired since",
            );
            return;
        }
    }
    let caller = leaf
        .and_then(|leaf| SpiffeId::from_certificate(leaf).ok())
        .map(Arc::new);
    let protocol = match session.alpn_protocol() {
        Some(identity::ALPN_H2) => Protocol::Http2,
        _ => Protocol::Http1,
    };
    tracing::debug!(%peer, caller = ?caller.as_deref().map(ToString::to_string), "inbound mTLS connection");
    inputs
        .metrics
        .inbound_mtls
        .get_or_create(&CallerLabels {
            caller: caller
                .as_deref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        })
        .inc();
    let conn = InboundConn { caller, port };
    // A task of its own, as in `serve_connection`: the handshake's state ends here.
    tokio::spawn(serve_http(
        tls,
        peer,
        protocol,
        Some(conn),
        redirected,
        kind,
        inputs,
        &builders,
        watcher,
    ));
}

/// Serves HTTP/1.1 or HTTP/2 on `io`; on the inbound listener every request
/// carries `conn` (who called, on which port) in its extensions.
///
/// Not an `async fn`: it returns hyper's connection future itself, with the
/// refusal check chained on, so a connection's task is little more than
/// hyper's own state (an `async fn` would keep its arguments, the service
/// and the connection future side by side for the connection's life). The
/// HTTP/2 connection is boxed: an HTTP/1.1 connection then carries no room
/// for it.
#[allow(clippy::too_many_arguments)]
fn serve_http<I>(
    io: I,
    peer: SocketAddr,
    protocol: Protocol,
    conn: Option<InboundConn>,
    redirected: Option<Redirected>,
    kind: ListenerKind,
    inputs: Arc<Inputs>,
    builders: &Builders,
    watcher: closing::Watcher,
) -> impl Future<Output = ()> + Send
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shared = inputs.clone();
    let svc = service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
        // Boxed per request: hyper keeps room for one service future per
        // connection for the connection's whole life, so an unboxed future
        // of several KB would be held by every idle keep-alive connection.
        let future: ServiceFuture = match head_refusal(&request) {
            Some((reason, detail)) => {
                refuse(
                    &inputs,
                    kind,
                    peer,
                    reason,
                    &format_args!("request refused with 431: {detail}"),
                );
                let response = head_refused_response(&request, &detail);
                Box::pin(std::future::ready(Ok(response)))
            }
            None => {
                if let Some(conn) = &conn {
                    request.extensions_mut().insert(conn.clone());
                }
                if let Some(redirected) = redirected {
                    request.extensions_mut().insert(redirected);
                }
                Box::pin(service::handle(inputs.clone(), kind, request))
            }
        };
        future
    });
    let refused = move |result: Result<(), hyper::Error>, head_started: bool| {
        if let Err(error) = result {
            match refusal::http_reason(&error, head_started) {
                Some(reason) => refuse(
                    &shared,
                    kind,
                    peer,
                    reason,
                    &format_args!("HTTP connection refused: {error}"),
                ),
                None => tracing::debug!(%peer, %error, "connection ended with an error"),
            }
        }
    };
    match protocol {
        Protocol::Http2 => {
            let io = TokioIo::new(io);
            let serve = Box::pin(watcher.watch(builders.http2.serve_connection(io, svc)));
            Either::Left(serve.map(move |result| refused(result, false)))
        }
        _ => {
            let head_started = Arc::new(AtomicBool::new(false));
            let io = TokioIo::new(Watched {
                io,
                head_started: head_started.clone(),
            });
            let serve = watcher.watch(builders.http1.serve_connection(io, svc));
            Either::Right(
                serve.map(move |result| refused(result, head_started.load(Ordering::Relaxed))),
            )
        }
    }
}

type ServiceFuture =
    Pin<Box<dyn Future<Output = Result<Response<BoxBody>, std::convert::Infallible>> + Send>>;

/// Counts a refusal and logs it through the shared rate limiter.
fn refuse(
    inputs: &Inputs,
    kind: ListenerKind,
    peer: SocketAddr,
    reason: Reason,
    detail: &dyn std::fmt::Display,
) {
    inputs.metrics.refused(kind, reason);
    refusal::log(listener_label(kind), reason, peer, detail);
    crate::access::refusal(
        inputs.snapshot.load().access_log(),
        listener_label(kind),
        reason.as_str(),
        peer,
        detail,
    );
}

/// Why a request head that the HTTP library accepted is still over the
/// proxy's budget, if it is: too many fields, or too many bytes as HTTP/2
/// counts them.
fn head_refusal<B>(request: &hyper::Request<B>) -> Option<(Reason, String)> {
    let fields = request.headers().len();
    if fields > MAX_HEADER_FIELDS {
        return Some((
            Reason::TooManyHeaders,
            format!("the request has {fields} header fields; the limit is {MAX_HEADER_FIELDS}"),
        ));
    }
    let size = header_list_size(request);
    (size > MAX_HEADER_LIST).then(|| {
        (
            Reason::HeaderTooLarge,
            format!(
                "the request's headers take {size} bytes (name + value + 32 per field, and the target); the limit is {MAX_HEADER_LIST}"
            ),
        )
    })
}

/// The size of a request's head as HTTP/2 counts a header list (RFC 9113,
/// section 6.5.2): name, value and 32 bytes per field, plus the target.
fn header_list_size<B>(request: &hyper::Request<B>) -> usize {
    let target = request
        .uri()
        .path_and_query()
        .map_or(0, |p| p.as_str().len());
    request
        .headers()
        .iter()
        .fold(target, |size, (name, value)| {
            size + name.as_str().len() + value.len() + 32
        })
}

/// 431 with the reason, in the caller's protocol: a JSON error body, or a
/// gRPC status.
fn head_refused_response<B>(request: &hyper::Request<B>, detail: &str) -> Response<BoxBody> {
    if is_grpc(request.headers()) {
        return grpc_error_response(grpc_code::RESOURCE_EXHAUSTED, detail);
    }
    let body = serde_json::json!({
        "error": { "type": "request_header_fields_too_large", "message": detail }
    });
    let mut response = Response::new(infermesh_filters::body::full(body.to_string()));
    *response.status_mut() = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // A head over the parser's hard limit closes an HTTP/1.1 connection, as
    // when hyper refuses it: the read that brings such a head may bring all
    // of it at once (a read may fill the buffer past its cap), and then
    // hyper parses it and the proxy refuses it here. Below the hard limit
    // the connection serves on.
    if request.version() < http::Version::HTTP_2 && header_list_size(request) > HTTP1_MAX_BUF {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// An HTTP/1.1 connection's transport, noting whether bytes of a request
/// head arrived since the last response bytes went out: a header timeout
/// then means a slow client, and without them an idle keep-alive
/// connection being closed.
struct Watched<I> {
    io: I,
    head_started: Arc<AtomicBool>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.head_started.store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.head_started.store(false, Ordering::Relaxed);
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.head_started.store(false, Ordering::Relaxed);
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(String, String)]) -> hyper::Request<()> {
        let mut builder = hyper::Request::get("http://a/v1/models");
        for (name, value) in headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn heads_within_the_budget_pass() {
        let fields: Vec<_> = (0..MAX_HEADER_FIELDS)
            .map(|i| (format!("x-{i}"), "v".repeat(500)))
            .collect();
        assert_eq!(head_refusal(&request(&fields)), None);
        assert_eq!(head_refusal(&request(&[])), None);
    }

    #[test]
    fn heads_over_the_budget_are_refused_with_the_reason() {
        let many: Vec<_> = (0..=MAX_HEADER_FIELDS)
            .map(|i| (format!("x-{i}"), "v".into()))
            .collect();
        let (reason, detail) = head_refusal(&request(&many)).unwrap();
        assert_eq!(reason, Reason::TooManyHeaders);
        assert!(detail.contains("101 header fields"), "{detail}");

        let big = [("x-big".to_string(), "b".repeat(MAX_HEADER_LIST))];
        let (reason, detail) = head_refusal(&request(&big)).unwrap();
        assert_eq!(reason, Reason::HeaderTooLarge);
        assert!(detail.contains("the limit is 65536"), "{detail}");
    }

    #[test]
    fn the_header_list_is_sized_as_http2_counts_it() {
        let one = [("x-a".to_string(), "bc".to_string())];
        // "/v1/models" + "x-a" + "bc" + 32
        assert_eq!(header_list_size(&request(&one)), 10 + 3 + 2 + 32);
    }

    #[test]
    fn refused_heads_answer_431_in_the_callers_protocol() {
        let plain = request(&[]);
        let response = head_refused_response(&plain, "too big");
        assert_eq!(
            response.status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let grpc = request(&[("content-type".into(), "application/grpc".into())]);
        let response = head_refused_response(&grpc, "too big");
        assert_eq!(response.headers()["grpc-status"], "8");
    }
}
