//! What the proxy and the control plane share off their hot path: the admin
//! HTTP server, run on a thread of its own with a single-threaded runtime
//! so that rendering metrics or a slow scraper never takes time from the
//! data plane or the policy streams; the shutdown signal; the logging
//! set-up. Each binary brings its own endpoints ([`Respond`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;

/// How long an admin client may take to send a request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The endpoints of an admin server: a whole response per request, built
/// from state the binary shares with the server.
pub trait Respond: Send + Sync + 'static {
    /// Answers `request`.
    fn respond(&self, request: &Request<Incoming>) -> Response<Full<Bytes>>;
}

/// Binds `addr` now (so a bad or busy address fails start-up) and serves
/// `endpoints` on a thread named `infermesh-admin`; returns the bound
/// address (the real port when `addr` has port 0).
pub fn spawn<R: Respond>(addr: SocketAddr, endpoints: Arc<R>) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name("infermesh-admin".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    tracing::error!(%error, "admin runtime failed to start");
                    return;
                }
            };
            runtime.block_on(serve(listener, endpoints));
        })?;
    Ok(local)
}

async fn serve<R: Respond>(listener: std::net::TcpListener, endpoints: Arc<R>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, "admin listener failed");
            return;
        }
    };
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of file descriptors, most likely: wait rather than spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |request: Request<Incoming>| {
                let response = endpoints.respond(&request);
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// A plain-text response.
pub fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// `value` as pretty-printed JSON (a 500 in the unlikely case it does not
/// serialize).
pub fn json<T: Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(mut body) => {
            body.push(b'\n');
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(error) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{error}\n")),
    }
}

/// Resolves on SIGTERM or Ctrl-C; `who` names the binary in the error
/// logged when SIGTERM cannot be listened for.
pub async fn shutdown_signal(who: &str) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the {who}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Logs to stderr at the levels `INFERMESH_LOG` sets (an `EnvFilter`), or
/// `default` without it; colours only on a terminal.
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("INFERMESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
