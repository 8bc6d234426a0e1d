//! An upstream that fails on cue: each request takes the next [`Step`] of a
//! script (the last one repeats), so a test says exactly which attempt fails
//! and how.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// What the server does with one request.
#[derive(Debug, Clone)]
pub enum Step {
    /// Answers `status` with a JSON body naming the server, and a
    /// `Retry-After` of that many seconds when given.
    Status(u16, Option<u64>),
    /// Answers 200 with `events` SSE events, then resets the stream
    /// instead of finishing it.
    SseThenReset(usize),
    /// A trailers-only gRPC response carrying `grpc-status: code`.
    GrpcStatus(u8),
    /// Waits this long, then answers 200.
    Delay(Duration),
}

#[derive(Default)]
struct Shared {
    script: Mutex<VecDeque<Step>>,
    bodies: Mutex<Vec<Bytes>>,
    /// Requests whose handling was dropped before the response head was
    /// ready: the client reset the stream or closed the connection.
    cancelled: AtomicUsize,
}

/// An HTTP/1.1 and HTTP/2 server following a script.
pub struct ScriptedServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl ScriptedServer {
    /// Starts a server; requests after the script's end repeat its last step.
    pub fn start(name: &str, script: Vec<Step>) -> Self {
        Self::bind(SocketAddr::from(([127, 0, 0, 1], 0)), name, script).expect("bind 127.0.0.1:0")
    }

    /// [`ScriptedServer::start`] on `addr`.
    pub fn bind(addr: SocketAddr, name: &str, script: Vec<Step>) -> std::io::Result<Self> {
        assert!(!script.is_empty(), "a script needs a step");
        let shared = Arc::new(Shared {
            script: Mutex::new(script.into()),
            ..Shared::default()
        });
        let serving = shared.clone();
        let name = name.to_string();
        let (addr, stop) =
            crate::spawn_fixture_on(addr, &format!("scripted-{name}"), move |listener| {
                accept_loop(listener, serving, name)
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

    /// Requests received so far.
    pub fn request_count(&self) -> usize {
        self.shared.bodies.lock().unwrap().len()
    }

    /// The body of every request received, in order.
    pub fn bodies(&self) -> Vec<Bytes> {
        self.shared.bodies.lock().unwrap().clone()
    }

    /// Requests the client gave up on (stream reset, connection closed)
    /// before their response head was ready, e.g. during a `Delay`.
    pub fn cancelled_count(&self) -> usize {
        self.shared.cancelled.load(Ordering::SeqCst)
    }
}

/// Counts a request as cancelled when dropped before it is disarmed.
struct CancelGuard(Arc<Shared>, bool);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if self.1 {
            self.0.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>, name: String) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                respond(shared.clone(), name.clone(), request)
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn respond(
    shared: Arc<Shared>,
    name: String,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let mut guard = CancelGuard(shared.clone(), true);
    let body = request
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    shared.bodies.lock().unwrap().push(body);
    let step = {
        let mut script = shared.script.lock().unwrap();
        if script.len() > 1 {
            script.pop_front()
        } else {
            script.front().cloned()
        }
    };
    let json = |status: u16| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .header("x-upstream", name.as_str())
            .body(full(format!(
                "{{\"upstream\":\"{name}\",\"status\":{status}}}"
            )))
            .unwrap()
    };
    let response = match step.unwrap_or(Step::Status(200, None)) {
        Step::Status(status, retry_after) => {
            let mut response = json(status);
            if let Some(seconds) = retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", seconds.to_string().parse().unwrap());
            }
            response
        }
        Step::Delay(delay) => {
            tokio::time::sleep(delay).await;
            json(200)
        }
        Step::GrpcStatus(code) => Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/grpc")
            .header("grpc-status", code.to_string())
            .header("grpc-message", "scripted")
            .body(full(Bytes::new()))
            .unwrap(),
        Step::SseThenReset(events) => {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
            tokio::spawn(async move {
                for i in 0..events {
                    let event = format!("data: {{\"upstream\":\"{name}\",\"event\":{i}}}\n\n");
                    if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let _ = tx.send(Err("scripted reset".into())).await;
            });
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
            Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "text/event-stream")
                .body(BodyExt::boxed_unsync(StreamBody::new(stream)))
                .unwrap()
        }
    };
    guard.1 = false;
    Ok(response)
}

fn full(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}
