//! Upstream connection pools.
//!
//! [`Pool`] holds a backend's connections per endpoint: the balancer has
//! already chosen the endpoint, so a request takes an idle HTTP/1.1
//! connection of that endpoint (or opens one) or shares its HTTP/2
//! connection, over cleartext or, to meshed endpoints, mutual TLS 1.3 with
//! ALPN. It replaces `hyper_util`'s legacy client on the request path,
//! whose keyed pool (a hashed `(scheme, authority)` key, a checkout future
//! raced against a lazy connect, a task hop per request) cost about a
//! tenth of a proxied request's instructions. [`client`], the legacy
//! client, stays for HTTP passthrough, whose destinations are not
//! endpoints of a backend.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{ready, Either};
use futures_util::FutureExt;
use http::header::{self, HeaderValue};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use infermesh_proto::policy::UpstreamProtocol;
use parking_lot::Mutex;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::ProxyBody;

/// The connector of every pool: plain TCP for `http://` URIs, TLS for
/// `https://` ones (meshed endpoints).
pub type UpstreamConnector = HttpsConnector<HttpConnector>;

/// A pooled upstream client (HTTP passthrough).
pub type UpstreamClient = Client<UpstreamConnector, ProxyBody>;

/// How long an unused upstream connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How often a pool drops its closed and expired connections (on the next
/// checkout after this long).
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// TCP keep-alive probes on upstream connections start after this long idle.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// HTTP/2 flow-control windows: large, so that big tensors and long streams
/// keep flowing without waiting on WINDOW_UPDATE round trips.
const H2_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const H2_CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;
/// HTTP/2 PING interval, also while idle, to find dead connections.
const H2_KEEPALIVE: Duration = Duration::from_secs(30);

/// A client speaking `protocol`, failing connection attempts after
/// `connect_timeout`; with `tls`, connections are TLS (the request URIs
/// must then be `https://`).
pub fn client(
    protocol: UpstreamProtocol,
    connect_timeout: Duration,
    tls: Option<Arc<ClientConfig>>,
) -> UpstreamClient {
    let mut http = HttpConnector::new();
    // Model responses stream token by token: never let Nagle hold a chunk back.
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(TCP_KEEPALIVE));
    // The TLS layer decides by scheme; the TCP layer must accept both.
    http.enforce_http(false);
    let connector = match tls {
        Some(config) => {
            let builder = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config((*config).clone())
                .https_only();
            match protocol {
                UpstreamProtocol::Http1 => builder.enable_http1().wrap_connector(http),
                UpstreamProtocol::Http2 => builder.enable_http2().wrap_connector(http),
            }
        }
        None => HttpsConnector::from((http, plaintext_only())),
    };
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(IDLE_TIMEOUT);
    if protocol == UpstreamProtocol::Http2 {
        builder
            .http2_only(true)
            .http2_initial_stream_window_size(H2_STREAM_WINDOW)
            .http2_initial_connection_window_size(H2_CONNECTION_WINDOW)
            .http2_keep_alive_interval(H2_KEEPALIVE)
            .http2_keep_alive_while_idle(true);
    }
    builder.build(connector)
}

/// The TLS half of a plaintext pool's connector. Its URIs are always
/// `http://`, so it is never used; it trusts nothing, so that a mistake
/// could not turn into an unverified connection.
fn plaintext_only() -> Arc<ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("TLS 1.3 is supported by the ring provider")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

// === impl Pool ===

/// A backend's upstream connections, per endpoint: idle HTTP/1.1
/// connections (the most recently used first), or one shared HTTP/2
/// connection. Clones share the connections.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    protocol: UpstreamProtocol,
    connect_timeout: Duration,
    /// For meshed endpoints: mutual TLS, offering the backend's protocol
    /// by ALPN.
    tls: Option<tokio_rustls::TlsConnector>,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    conns: Mutex<Conns>,
}

struct Conns {
    by_endpoint: HashMap<SocketAddr, Idle, BuildAddrHasher>,
    swept: Instant,
}

/// Hashes endpoint addresses for the pool's map: the proxy's own keys, not
/// a client's, so a multiply-rotate hash (as rustc's Fx hash) does instead
/// of SipHash, which cost 0.7% of a request's instructions in the
/// checkout and the release.
#[derive(Clone, Copy, Default)]
struct BuildAddrHasher;

impl std::hash::BuildHasher for BuildAddrHasher {
    type Hasher = AddrHasher;

    fn build_hasher(&self) -> AddrHasher {
        AddrHasher(0)
    }
}

struct AddrHasher(u64);

impl AddrHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl std::hash::Hasher for AddrHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u16(&mut self, n: u16) {
        self.add(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[derive(Default)]
struct Idle {
    /// Idle HTTP/1.1 connections and since when each is idle; taken from
    /// the end.
    http1: Vec<(http1::SendRequest<ProxyBody>, Instant)>,
    /// The HTTP/2 connection and when it was last used.
    http2: Option<(http2::SendRequest<ProxyBody>, Instant)>,
    /// Held while an HTTP/2 connection is being made, so that requests
    /// arriving meanwhile wait for it instead of each opening their own.
    connecting: Arc<tokio::sync::Mutex<()>>,
}

impl Idle {
    fn is_empty(&self) -> bool {
        self.http1.is_empty() && self.http2.is_none() && Arc::strong_count(&self.connecting) == 1
    }

    /// Drops closed connections and those idle since before `expired`.
    fn sweep(&mut self, expired: Instant) {
        self.http1
            .retain(|(sender, since)| !sender.is_closed() && *since > expired);
        if self
            .http2
            .as_ref()
            .is_some_and(|(sender, used)| sender.is_closed() || *used <= expired)
        {
            self.http2 = None;
        }
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("protocol", &self.inner.protocol)
            .field("tls", &self.inner.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// An HTTP/1.1 connection whose response is still being read: given back
/// to its pool with [`Reusable::release`] once the response body ended.
pub struct Reusable {
    pool: Pool,
    addr: SocketAddr,
    sender: http1::SendRequest<ProxyBody>,
}

impl Reusable {
    /// Gives the connection back to the pool for the next request.
    pub fn release(self) {
        let mut conns = self.pool.inner.conns.lock();
        conns
            .by_endpoint
            .entry(self.addr)
            .or_default()
            .http1
            .push((self.sender, Instant::now()));
    }
}

impl Pool {
    /// A pool speaking `protocol`, failing connection attempts (TCP and
    /// TLS handshakes) after `connect_timeout`; with `tls`, connections are
    /// mutual TLS.
    pub fn new(
        protocol: UpstreamProtocol,
        connect_timeout: Duration,
        tls: Option<Arc<ClientConfig>>,
    ) -> Self {
        let tls = tls.map(|config| {
            let mut config = (*config).clone();
            config.alpn_protocols = vec![match protocol {
                UpstreamProtocol::Http1 => crate::identity::ALPN_HTTP1.to_vec(),
                UpstreamProtocol::Http2 => crate::identity::ALPN_H2.to_vec(),
            }];
            tokio_rustls::TlsConnector::from(Arc::new(config))
        });
        let http1 = http1::Builder::new();
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .keep_alive_interval(H2_KEEPALIVE)
            .keep_alive_while_idle(true);
        let pool = Self {
            inner: Arc::new(Inner {
                protocol,
                connect_timeout,
                tls,
                http1,
                http2,
                conns: Mutex::new(Conns {
                    by_endpoint: HashMap::default(),
                    swept: Instant::now(),
                }),
            }),
        };
        pool.sweep_in_background();
        pool
    }

    /// Drops idle connections past their time even when no request comes
    /// (a backend no longer used would otherwise keep them, and an HTTP/2
    /// one would keep pinging), until the pool itself is dropped. Without a
    /// runtime (a snapshot compiled in a test), checkouts sweep alone.
    fn sweep_in_background(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pool = Arc::downgrade(&self.inner);
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(inner) = pool.upgrade() else {
                    return;
                };
                inner.conns.lock().sweep(Instant::now());
            }
        });
    }

    /// Sends `request` (its URI absolute, pointing at `addr`, or for
    /// HTTP/1.1 already in [`origin_form`]) to the endpoint `addr`. An
    /// HTTP/1.1 response comes with its connection, to
    /// [`Reusable::release`] when its body has ended.
    ///
    /// On a pooled connection the request is handed to it at once, and the
    /// future only waits for the response head: it is part of the future of
    /// every request (boxed and moved once per request), so it keeps no
    /// second copy of the request. The rare steps (connecting, sending
    /// again on a new connection) are boxed: their futures are several KB.
    pub fn send(
        &self,
        addr: SocketAddr,
        mut request: Request<ProxyBody>,
    ) -> impl Future<Output = Result<(Response<Incoming>, Option<Reusable>), Error>> + Send + 'static
    {
        let pool = self.clone();
        match self.inner.protocol {
            UpstreamProtocol::Http1 => {
                // `Forward` prepares the origin form itself.
                if request.uri().scheme().is_some() {
                    origin_form(&mut request, None);
                }
                Either::Left(match self.idle_http1(addr) {
                    Some(mut sender) => {
                        let sending = sender.try_send_request(request);
                        // Combinators, not an `async` block, which would
                        // keep the sending future twice (as captured and
                        // as awaited).
                        Either::Left(sending.then(move |sent| match sent {
                            Ok(response) => {
                                let reusable = Reusable { pool, addr, sender };
                                Either::Left(ready(Ok((response, Some(reusable)))))
                            }
                            Err(mut error) => match error.take_message() {
                                // The connection closed before the request
                                // was written (the server ended an idle
                                // keep-alive connection): once more, on a
                                // new connection.
                                Some(request) => Either::Right(Box::pin(async move {
                                    let (response, sender) =
                                        pool.send_on_new_http1(addr, request).await?;
                                    Ok((response, Some(Reusable { pool, addr, sender })))
                                })),
                                None => Either::Left(ready(Err(Error::Send(error.into_error())))),
                            },
                        }))
                    }
                    // Boxed whole, as connecting is rare: the future of
                    // every request would otherwise carry room for it.
                    None => Either::Right(Box::pin(async move {
                        let (response, sender) = pool.send_on_new_http1(addr, request).await?;
                        Ok((response, Some(Reusable { pool, addr, sender })))
                    })),
                })
            }
            UpstreamProtocol::Http2 => Either::Right(match self.shared_http2(addr) {
                Some(mut sender) => {
                    let sending = sender.try_send_request(request);
                    Either::Left(sending.then(move |sent| match sent {
                        Ok(response) => Either::Left(ready(Ok((response, None)))),
                        Err(mut error) => match error.take_message() {
                            Some(request) => Either::Right(Box::pin(async move {
                                Ok((pool.send_on_new_http2(addr, request).await?, None))
                            })),
                            None => Either::Left(ready(Err(Error::Send(error.into_error())))),
                        },
                    }))
                }
                None => Either::Right(Box::pin(async move {
                    let (mut sender, reused) = pool.connect_http2_once(addr).await?;
                    let response = match sender.try_send_request(request).await {
                        Ok(response) => response,
                        Err(mut error) => match error.take_message() {
                            Some(request) if reused => {
                                pool.send_on_new_http2(addr, request).await?
                            }
                            _ => return Err(Error::Send(error.into_error())),
                        },
                    };
                    Ok((response, None))
                })),
            }),
        }
    }

    /// Sends `request` on a new HTTP/1.1 connection to `addr`.
    async fn send_on_new_http1(
        &self,
        addr: SocketAddr,
        request: Request<ProxyBody>,
    ) -> Result<(Response<Incoming>, http1::SendRequest<ProxyBody>), Error> {
        let mut sender = self.connect_http1(addr).await?;
        let response = sender.send_request(request).await.map_err(Error::Send)?;
        Ok((response, sender))
    }

    /// Sends `request` on a new HTTP/2 connection to `addr`.
    async fn send_on_new_http2(
        &self,
        addr: SocketAddr,
        request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, Error> {
        let mut sender = self.connect_http2(addr).await?;
        sender.send_request(request).await.map_err(Error::Send)
    }

    /// An idle HTTP/1.1 connection to `addr` that is ready for a request.
    fn idle_http1(&self, addr: SocketAddr) -> Option<http1::SendRequest<ProxyBody>> {
        let now = Instant::now();
        let mut conns = self.inner.conns.lock();
        conns.sweep(now);
        let idle = conns.by_endpoint.get_mut(&addr)?;
        let expired = now.checked_sub(IDLE_TIMEOUT);
        let mut at = idle.http1.len();
        while at > 0 {
            at -= 1;
            let (sender, since) = &idle.http1[at];
            if sender.is_closed() || expired.is_some_and(|e| *since <= e) {
                idle.http1.swap_remove(at);
            } else if sender.is_ready() {
                return Some(idle.http1.swap_remove(at).0);
            }
            // Else its last exchange is still finishing: left for later.
        }
        None
    }

    /// The open HTTP/2 connection to `addr`, if there is one.
    fn shared_http2(&self, addr: SocketAddr) -> Option<http2::SendRequest<ProxyBody>> {
        let now = Instant::now();
        let mut conns = self.inner.conns.lock();
        conns.sweep(now);
        let idle = conns.by_endpoint.get_mut(&addr)?;
        let (sender, used) = idle.http2.as_mut()?;
        if sender.is_closed() {
            idle.http2 = None;
            return None;
        }
        *used = now;
        Some(sender.clone())
    }

    /// The HTTP/2 connection to `addr` that another request finished
    /// making meanwhile (`true`), else a new one (`false`).
    async fn connect_http2_once(
        &self,
        addr: SocketAddr,
    ) -> Result<(http2::SendRequest<ProxyBody>, bool), Error> {
        let connecting = {
            let mut conns = self.inner.conns.lock();
            conns
                .by_endpoint
                .entry(addr)
                .or_default()
                .connecting
                .clone()
        };
        let _connecting = connecting.lock().await;
        match self.shared_http2(addr) {
            Some(sender) => Ok((sender, true)),
            None => Ok((self.connect_http2(addr).await?, false)),
        }
    }

    async fn connect_http1(
        &self,
        addr: SocketAddr,
    ) -> Result<http1::SendRequest<ProxyBody>, Error> {
        match self.connect(addr).await? {
            Io::Plain(tcp) => handshake_http1(&self.inner.http1, tcp).await,
            Io::Tls(tls) => handshake_http1(&self.inner.http1, tls).await,
        }
    }

    async fn connect_http2(
        &self,
        addr: SocketAddr,
    ) -> Result<http2::SendRequest<ProxyBody>, Error> {
        let sender = match self.connect(addr).await? {
            Io::Plain(tcp) => handshake_http2(&self.inner.http2, tcp).await?,
            Io::Tls(tls) => handshake_http2(&self.inner.http2, tls).await?,
        };
        let mut conns = self.inner.conns.lock();
        conns.by_endpoint.entry(addr).or_default().http2 = Some((sender.clone(), Instant::now()));
        Ok(sender)
    }

    /// A TCP connection to `addr`, with TLS over it for meshed endpoints.
    async fn connect(&self, addr: SocketAddr) -> Result<Io, Error> {
        let connect = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|cause| ConnectError::new("tcp connect error", cause))?;
            // Model responses stream token by token: never let Nagle hold a
            // chunk back.
            let _ = tcp.set_nodelay(true);
            let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
            let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
            match &self.inner.tls {
                None => Ok(Io::Plain(tcp)),
                Some(connector) => {
                    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                    let tls = connector
                        .connect(name, tcp)
                        .await
                        .map_err(|cause| ConnectError::new("tls handshake failed", cause))?;
                    Ok(Io::Tls(Box::new(tls)))
                }
            }
        };
        match tokio::time::timeout(self.inner.connect_timeout, connect).await {
            Ok(result) => result.map_err(Error::Connect),
            Err(_) => Err(Error::Connect(ConnectError::new(
                "tcp connect error",
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connection timed out"),
            ))),
        }
    }
}

impl Conns {
    /// Every [`SWEEP_EVERY`], drops the closed and expired connections of
    /// every endpoint, and the endpoints left with none.
    fn sweep(&mut self, now: Instant) {
        if now.duration_since(self.swept) < SWEEP_EVERY {
            return;
        }
        self.swept = now;
        let Some(expired) = now.checked_sub(IDLE_TIMEOUT) else {
            return;
        };
        self.by_endpoint.retain(|_, idle| {
            idle.sweep(expired);
            !idle.is_empty()
        });
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Runs a connection's I/O in a task of its own until it ends.
fn drive<C>(connection: C, protocol: &'static str)
where
    C: std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, protocol, "upstream connection ended with an error");
        }
    });
}

async fn handshake_http1<I>(
    builder: &http1::Builder,
    io: I,
) -> Result<http1::SendRequest<ProxyBody>, Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = builder
        .handshake(TokioIo::new(io))
        .await
        .map_err(|cause| Error::Connect(ConnectError::new("http handshake failed", cause)))?;
    drive(connection, "HTTP/1.1");
    Ok(sender)
}

async fn handshake_http2<I>(
    builder: &http2::Builder<TokioExecutor>,
    io: I,
) -> Result<http2::SendRequest<ProxyBody>, Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = builder
        .handshake(TokioIo::new(io))
        .await
        .map_err(|cause| Error::Connect(ConnectError::new("http2 handshake failed", cause)))?;
    drive(connection, "HTTP/2");
    Ok(sender)
}

/// Puts a request's target in the origin form of an HTTP/1.1 request line,
/// after giving a request without a `Host` header the URI's authority, else
/// `endpoint`.
pub(crate) fn origin_form(
    request: &mut Request<ProxyBody>,
    endpoint: Option<&http::uri::Authority>,
) {
    if !request.headers().contains_key(header::HOST) {
        if let Some(authority) = request.uri().authority().or(endpoint) {
            if let Ok(value) = HeaderValue::from_str(authority.as_str()) {
                request.headers_mut().insert(header::HOST, value);
            }
        }
    }
    if request.uri().scheme().is_some() || request.uri().authority().is_some() {
        let path = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        *request.uri_mut() = Uri::from(path);
    }
}

/// Why a request could not be sent to an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection could be made (refused, unreachable, timed out, TLS
    /// refused): the request never left the proxy.
    #[error("client error (Connect)")]
    Connect(#[source] ConnectError),
    /// The connection failed while the request was sent or its response
    /// head awaited.
    #[error("client error (SendRequest)")]
    Send(#[source] hyper::Error),
}

impl Error {
    /// Whether connecting failed.
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_))
    }
}

/// A failed connection attempt: which step failed, and why.
#[derive(Debug, thiserror::Error)]
#[error("{step}")]
pub struct ConnectError {
    step: &'static str,
    #[source]
    cause: Box<dyn std::error::Error + Send + Sync>,
}

impl ConnectError {
    fn new(step: &'static str, cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self {
            step,
            cause: cause.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A server that answers each request `ok`, keeping the connection
    /// open for `per_conn` requests; counts the connections it accepted.
    async fn server(per_conn: usize) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    for _ in 0..per_conn {
                        let mut head = Vec::new();
                        let mut byte = [0u8; 1];
                        while !head.ends_with(b"\r\n\r\n") {
                            if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                                return;
                            }
                            head.push(byte[0]);
                        }
                        assert!(head.starts_with(b"GET /x HTTP/1.1\r\n"), "origin form");
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                    // Closes the connection after `per_conn` answers.
                });
            }
        });
        (addr, accepted)
    }

    async fn get(pool: &Pool, addr: SocketAddr) -> Result<String, Error> {
        let request = Request::builder()
            .uri(format!("http://{addr}/x"))
            .body(ProxyBody::default())
            .unwrap();
        let (response, conn) = pool.send(addr, request).await?;
        let body = response.into_body().collect().await.unwrap().to_bytes();
        if let Some(conn) = conn {
            conn.release();
        }
        Ok(String::from_utf8(body.to_vec()).unwrap())
    }

    fn http1_pool() -> Pool {
        Pool::new(UpstreamProtocol::Http1, Duration::from_secs(1), None)
    }

    #[tokio::test]
    async fn http1_connections_are_kept_alive_and_reused() {
        let (addr, accepted) = server(usize::MAX).await;
        let pool = http1_pool();
        for _ in 0..3 {
            assert_eq!(get(&pool, addr).await.unwrap(), "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_while_idle_is_replaced() {
        let (addr, accepted) = server(1).await;
        let pool = http1_pool();
        for pause in [0, 0, 50, 0] {
            tokio::time::sleep(Duration::from_millis(pause)).await;
            assert_eq!(get(&pool, addr).await.unwrap(), "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_timeout_without_requests() {
        let (addr, _) = server(usize::MAX).await;
        let pool = http1_pool();
        assert_eq!(get(&pool, addr).await.unwrap(), "ok");
        let idle = || pool.inner.conns.lock().by_endpoint.len();
        assert_eq!(idle(), 1);
        tokio::time::pause();
        tokio::time::sleep(IDLE_TIMEOUT + 2 * SWEEP_EVERY).await;
        assert_eq!(idle(), 0, "swept by the background task");
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let error = get(&http1_pool(), addr).await.unwrap_err();
        assert!(error.is_connect(), "{error:?}");
        assert_eq!(
            infermesh_filters::error::causes(&error).split(':').next(),
            Some("tcp connect error")
        );
    }

    #[tokio::test]
    async fn concurrent_http2_requests_share_one_connection() {
        let (addr, accepted, _) = http2_server(Duration::ZERO, 100).await;
        let pool = Pool::new(UpstreamProtocol::Http2, Duration::from_secs(1), None);
        let requests = (0..8).map(|_| get(&pool, addr));
        for answer in futures_util::future::join_all(requests).await {
            assert_eq!(answer.unwrap(), "ok");
        }
        assert_eq!(get(&pool, addr).await.unwrap(), "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    /// The test servers' answer.
    fn ok() -> Response<http_body_util::Full<bytes::Bytes>> {
        Response::new(http_body_util::Full::new(bytes::Bytes::from_static(b"ok")))
    }

    /// An HTTP/2 server answering `ok` after `delay`, at most
    /// `max_streams` streams at once; counts the connections it accepted
    /// and the most streams it served at once.
    async fn http2_server(
        delay: Duration,
        max_streams: u32,
    ) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (count, most_seen) = (accepted.clone(), most.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let most = most_seen.clone();
                let open = Arc::new(AtomicUsize::new(0));
                let service = hyper::service::service_fn(move |_request| {
                    let (open, most) = (open.clone(), most.clone());
                    async move {
                        let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(delay).await;
                        open.fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, std::convert::Infallible>(ok())
                    }
                });
                let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                builder.max_concurrent_streams(max_streams);
                tokio::spawn(builder.serve_connection(TokioIo::new(stream), service));
            }
        });
        (addr, accepted, most)
    }

    #[tokio::test]
    async fn requests_past_the_http2_servers_stream_limit_wait_their_turn() {
        let (addr, accepted, most) = http2_server(Duration::from_millis(20), 2).await;
        let pool = Pool::new(UpstreamProtocol::Http2, Duration::from_secs(1), None);
        assert_eq!(
            get(&pool, addr).await.unwrap(),
            "ok",
            "the server's settings known"
        );
        let requests = (0..8).map(|_| get(&pool, addr));
        for answer in futures_util::future::join_all(requests).await {
            assert_eq!(answer.unwrap(), "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(
            most.load(Ordering::SeqCst),
            2,
            "never past the server's limit"
        );
    }

    /// An HTTP/2 server that starts to shut a connection down (GOAWAY) when
    /// a request for `/slow` arrives on it and answers that request 300 ms
    /// later, the connection open until then; it answers other requests at
    /// once. Counts the connections it accepted.
    async fn going_away_server() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let slow = Arc::new(tokio::sync::Notify::new());
                let started = slow.clone();
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let started = started.clone();
                    async move {
                        if request.uri().path() == "/slow" {
                            started.notify_one();
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                        Ok::<_, std::convert::Infallible>(ok())
                    }
                });
                tokio::spawn(async move {
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => return,
                        () = slow.notified() => {}
                    }
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                });
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn a_request_an_http2_connection_can_no_longer_take_goes_on_a_new_one() {
        let (addr, accepted) = going_away_server().await;
        let pool = Pool::new(UpstreamProtocol::Http2, Duration::from_secs(1), None);
        let slow = {
            let pool = pool.clone();
            tokio::spawn(async move {
                let request = Request::builder()
                    .uri(format!("http://{addr}/slow"))
                    .body(ProxyBody::default())
                    .unwrap();
                let (response, _) = pool.send(addr, request).await.unwrap();
                response.into_body().collect().await.unwrap().to_bytes()
            })
        };
        // The connection is going away (its final GOAWAY names the slow
        // stream as the last) but stays open for the slow answer: the
        // requests meanwhile cannot go on it, and go on a new one.
        tokio::time::sleep(Duration::from_millis(100)).await;
        for _ in 0..3 {
            assert_eq!(get(&pool, addr).await.unwrap(), "ok");
        }
        assert_eq!(&slow.await.unwrap()[..], b"ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn http1_requests_go_in_origin_form_with_a_host() {
        let mut request = Request::builder()
            .uri("http://10.0.0.7:8000/v1/models?x=1")
            .body(ProxyBody::default())
            .unwrap();
        origin_form(&mut request, None);
        assert_eq!(request.uri(), "/v1/models?x=1");
        assert_eq!(request.headers()[header::HOST], "10.0.0.7:8000");
        let mut request = Request::builder()
            .uri("http://10.0.0.7:8000/")
            .header(header::HOST, "models.local")
            .body(ProxyBody::default())
            .unwrap();
        origin_form(&mut request, None);
        assert_eq!(request.headers()[header::HOST], "models.local");
    }
}
