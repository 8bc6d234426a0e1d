//! `infermesh-bench-upstream`: the upstream of `scripts/bench.sh`.
//!
//! It answers every request from constants, so that a benchmark measures the
//! proxy in front of it and not this server. One port speaks HTTP/1.1 and
//! HTTP/2 cleartext (prior knowledge):
//!
//! - a request whose `content-type` starts with `application/grpc` gets one
//!   gRPC message (a valid length-prefixed frame) and `grpc-status: 0`
//!   trailers;
//! - `GET /sse?n=N&gap_ms=G` streams `N` server-sent events, the first at
//!   once and the others `G` milliseconds apart, each one flushed alone;
//! - `/blob?bytes=N` (any method) gets a body of `N` bytes (default 1 MiB,
//!   at most 1 GiB) with its `content-length`, sent as slices of one shared
//!   1 MiB buffer, so that a large response costs this server no copy;
//! - anything else gets a small JSON body. Request bodies of any size are
//!   read and dropped, so a large POST costs no memory here either.
//!
//! Each of `--threads` threads runs its own single-threaded runtime on its own
//! `SO_REUSEPORT` socket: no work moves between threads, which is the fastest
//! shape for a server that is pinned to a CPU.

use std::convert::Infallible;
use std::future::Future as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::time::Sleep;

/// A fixed-response HTTP/1.1 + h2c server for benchmarks.
#[derive(Debug, Parser)]
#[command(name = "infermesh-bench-upstream")]
struct Args {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
    /// Server threads, each with its own runtime and listening socket.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// The JSON answer: about the size of a short chat completion.
const JSON: &[u8] = br#"{"id":"bench-1","object":"chat.completion","model":"bench","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}"#;

/// One gRPC message: uncompressed flag, big-endian length 4, then the
/// protobuf `{1: "ok"}`.
const GRPC_MESSAGE: &[u8] = &[0, 0, 0, 0, 4, 0x0a, 0x02, b'o', b'k'];

/// Size of the shared buffer that `/blob` bodies are sliced from, and of
/// each body frame.
const BLOB_CHUNK: usize = 1 << 20;
/// The largest `/blob` body.
const BLOB_MAX: u64 = 1 << 30;

/// The buffer `/blob` bodies are sliced from: made once, shared by every
/// response (a `Bytes` slice is a reference count, not a copy).
fn blob_chunk() -> Bytes {
    static CHUNK: OnceLock<Bytes> = OnceLock::new();
    CHUNK
        .get_or_init(|| Bytes::from(vec![b'x'; BLOB_CHUNK]))
        .clone()
}

fn main() {
    let args = Args::parse();
    let threads = args.threads.max(1);
    let mut listeners = Vec::with_capacity(threads);
    let mut addr = args.addr;
    for _ in 0..threads {
        // The first bind may pick the port; the others share it.
        match bind(addr) {
            Ok(listener) => {
                addr = listener
                    .local_addr()
                    .expect("a bound socket has an address");
                listeners.push(listener);
            }
            Err(error) => {
                eprintln!("infermesh-bench-upstream: cannot listen on {addr}: {error}");
                std::process::exit(1);
            }
        }
    }
    {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "listening addr={addr}");
        let _ = stdout.flush();
    }
    let workers: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(i, listener)| {
            std::thread::Builder::new()
                .name(format!("upstream-{i}"))
                .spawn(move || serve(listener))
                .expect("spawn a server thread")
        })
        .collect();
    for worker in workers {
        let _ = worker.join();
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

fn serve(listener: std::net::TcpListener) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("register the listener");
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http2().max_concurrent_streams(1024);
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                // Out of descriptors and the like: back off instead of spinning.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let builder = builder.clone();
            tokio::spawn(async move {
                let service =
                    service_fn(|req| async move { Ok::<_, Infallible>(respond(req).await) });
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

async fn respond(req: Request<Incoming>) -> Response<Reply> {
    let grpc = req
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if !grpc && req.uri().path() == "/sse" {
        let (events, gap) = sse_params(req.uri().query().unwrap_or(""));
        return Response::builder()
            .header(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"))
            .header(CACHE_CONTROL, HeaderValue::from_static("no-cache"))
            .body(Reply::Sse(Sse {
                left: events,
                index: 0,
                gap,
                sleep: None,
            }))
            .expect("a valid response");
    }
    let blob =
        (!grpc && req.uri().path() == "/blob").then(|| blob_size(req.uri().query().unwrap_or("")));
    drain(req.into_body()).await;
    if let Some(left) = blob {
        return Response::builder()
            .header(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            )
            .body(Reply::Blob { left })
            .expect("a valid response");
    }
    if grpc {
        let mut trailers = HeaderMap::with_capacity(1);
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        return Response::builder()
            .header(CONTENT_TYPE, HeaderValue::from_static("application/grpc"))
            .body(Reply::Grpc {
                message: Some(Bytes::from_static(GRPC_MESSAGE)),
                trailers: Some(trailers),
            })
            .expect("a valid response");
    }
    Response::builder()
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .body(Reply::Full(Some(Bytes::from_static(JSON))))
        .expect("a valid response")
}

/// Reads a request body to its end without keeping it, so the connection
/// stays reusable.
async fn drain(mut body: Incoming) {
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            return;
        }
    }
}

/// `n` (default 200, at most 100,000) and `gap_ms` (default 10) from a query
/// string.
fn sse_params(query: &str) -> (u32, Duration) {
    let mut events = 200;
    let mut gap_ms = 10;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("n", v)) => events = v.parse().unwrap_or(events).min(100_000),
            Some(("gap_ms", v)) => gap_ms = v.parse().unwrap_or(gap_ms).min(60_000),
            _ => {}
        }
    }
    (events, Duration::from_millis(gap_ms))
}

/// `bytes` (default 1 MiB, at most [`BLOB_MAX`]) from a query string.
fn blob_size(query: &str) -> u64 {
    query
        .split('&')
        .find_map(|pair| match pair.split_once('=') {
            Some(("bytes", v)) => v.parse().ok(),
            _ => None,
        })
        .unwrap_or(BLOB_CHUNK as u64)
        .min(BLOB_MAX)
}

// === impl Reply ===

/// Every response body the server sends.
enum Reply {
    /// A whole body, sent with its `content-length`.
    Full(Option<Bytes>),
    /// One gRPC message, then trailers.
    Grpc {
        message: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
    /// Server-sent events, one frame per event.
    Sse(Sse),
    /// `left` more bytes of `/blob`, in frames of at most [`BLOB_CHUNK`].
    Blob { left: u64 },
}

struct Sse {
    left: u32,
    index: u32,
    gap: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Body for Reply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Reply::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Reply::Grpc { message, trailers } => {
                if let Some(message) = message.take() {
                    return Poll::Ready(Some(Ok(Frame::data(message))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            Reply::Sse(sse) => sse.poll_event(cx),
            Reply::Blob { left } => {
                if *left == 0 {
                    return Poll::Ready(None);
                }
                let n = (*left).min(BLOB_CHUNK as u64);
                *left -= n;
                Poll::Ready(Some(Ok(Frame::data(blob_chunk().slice(..n as usize)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Reply::Full(data) => data.is_none(),
            Reply::Grpc { message, trailers } => message.is_none() && trailers.is_none(),
            Reply::Sse(sse) => sse.left == 0,
            Reply::Blob { left } => *left == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Reply::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Reply::Blob { left } => SizeHint::with_exact(*left),
            _ => SizeHint::default(),
        }
    }
}

impl Sse {
    fn poll_event(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        if let Some(sleep) = self.sleep.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        let event = format!(
            "data: {{\"id\":\"bench\",\"object\":\"chat.completion.chunk\",\"index\":{},\"choices\":[{{\"delta\":{{\"content\":\"tok\"}}}}]}}\n\n",
            self.index
        );
        self.index += 1;
        self.left -= 1;
        if self.left > 0 {
            let deadline = tokio::time::Instant::now() + self.gap;
            match self.sleep.as_mut() {
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_params_read_the_query_and_keep_defaults() {
        assert_eq!(sse_params(""), (200, Duration::from_millis(10)));
        assert_eq!(sse_params("n=3&gap_ms=1"), (3, Duration::from_millis(1)));
        assert_eq!(
            sse_params("gap_ms=x&n=9999999"),
            (100_000, Duration::from_millis(10))
        );
    }

    #[test]
    fn blob_size_defaults_to_one_mebibyte_and_is_capped() {
        assert_eq!(blob_size(""), 1 << 20);
        assert_eq!(blob_size("bytes=10"), 10);
        assert_eq!(blob_size("x=1&bytes=0"), 0);
        assert_eq!(blob_size("bytes=nope"), 1 << 20);
        assert_eq!(blob_size("bytes=99999999999999"), BLOB_MAX);
    }

    #[test]
    fn blob_bodies_are_slices_of_one_buffer_with_an_exact_length() {
        let mut reply = Reply::Blob {
            left: BLOB_CHUNK as u64 + 5,
        };
        assert_eq!(reply.size_hint().exact(), Some(BLOB_CHUNK as u64 + 5));
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut lens = Vec::new();
        while let Poll::Ready(Some(Ok(frame))) = Pin::new(&mut reply).poll_frame(&mut cx) {
            lens.push(frame.into_data().expect("a data frame").len());
        }
        assert_eq!(lens, [BLOB_CHUNK, 5]);
        assert!(reply.is_end_stream());
    }

    #[test]
    fn grpc_message_is_one_length_prefixed_frame() {
        assert_eq!(GRPC_MESSAGE[0], 0);
        let len = u32::from_be_bytes([
            GRPC_MESSAGE[1],
            GRPC_MESSAGE[2],
            GRPC_MESSAGE[3],
            GRPC_MESSAGE[4],
        ]);
        assert_eq!(len as usize, GRPC_MESSAGE.len() - 5);
    }
}
