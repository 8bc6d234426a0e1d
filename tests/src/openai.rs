//! An OpenAI-compatible and KServe v2 REST model server, as a fixture.
//!
//! It speaks HTTP/1.1 and HTTP/2 cleartext on one port, answers the OpenAI
//! endpoints and the KServe v2 REST endpoints with bodies that echo the model
//! name, tags every response with `x-upstream: <name>`, and records every
//! request it received (method, path, headers, whole body) and every streamed
//! response (when each chunk was handed to the connection, and whether the
//! client went away before the end), so tests can assert what reached it.
//!
//! Per-request overrides travel in headers, so one server can play several
//! parts in one test: `x-test-chunks`, `x-test-gap-ms`, `x-test-delay-ms`
//! (time to response headers), `x-test-status` (answer with that status) and
//! `x-test-usage-tokens` (the `usage.total_tokens` reported).
//!
//! Chat and text completions report `usage` as OpenAI does: in the JSON
//! body, or, for a stream whose request sets `stream_options.include_usage`,
//! as `"usage": null` in every chunk and a last chunk with no choices and
//! the usage, before `data: [DONE]`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;

/// Behaviour of an [`OpenAiServer`]; every field can be changed while it runs.
#[derive(Debug, Clone)]
pub struct OpenAiSettings {
    /// Content chunks in a streamed response (before the closing `[DONE]`).
    pub stream_chunks: usize,
    /// Pause between two streamed chunks (and before `[DONE]`).
    pub chunk_gap: Duration,
    /// Pause between receiving the whole request and sending the response headers.
    pub first_byte_delay: Duration,
    /// Models listed by `GET /v1/models`.
    pub models: Vec<String>,
    /// `usage.total_tokens` of completions (prompt and completion tokens
    /// are split from it).
    pub total_tokens: u64,
}

impl Default for OpenAiSettings {
    fn default() -> Self {
        Self {
            stream_chunks: 5,
            chunk_gap: Duration::from_millis(10),
            first_byte_delay: Duration::ZERO,
            models: vec!["gpt-fixture".to_string()],
            total_tokens: 6,
        }
    }
}

/// One request as the fixture received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    /// The whole request body, byte for byte.
    pub body: Bytes,
    /// When the request head arrived.
    pub received_at: Instant,
}

impl RecordedRequest {
    /// The request body parsed as JSON (panics when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "upstream body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// `model` from the JSON body, when there is one.
    pub fn model(&self) -> Option<String> {
        serde_json::from_slice::<Value>(&self.body)
            .ok()?
            .get("model")?
            .as_str()
            .map(str::to_string)
    }
}

/// How a streamed response ended, as the fixture saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamOutcome {
    /// Still sending.
    Streaming,
    /// Every chunk and `[DONE]` were handed to the connection.
    Completed,
    /// The response body was dropped before the end: the client (the proxy)
    /// reset the stream or closed the connection.
    ClientGone { at: Instant, after_chunks: usize },
}

/// One streamed response.
#[derive(Debug, Clone)]
pub struct StreamLog {
    pub model: String,
    /// When each content chunk was handed to the connection.
    pub sent: Vec<Instant>,
    pub outcome: StreamOutcome,
}

#[derive(Default)]
struct Shared {
    name: String,
    settings: Mutex<OpenAiSettings>,
    requests: Mutex<Vec<RecordedRequest>>,
    streams: Mutex<Vec<StreamLog>>,
    changed: Notify,
}

/// An OpenAI-compatible / KServe v2 REST upstream on `127.0.0.1:<port>`.
pub struct OpenAiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl OpenAiServer {
    /// Starts a server called `name` (sent back as `x-upstream`) with default settings.
    pub fn start(name: &str) -> Self {
        Self::with_settings(name, OpenAiSettings::default())
    }

    /// Starts a server on `127.0.0.1:0` with the given settings.
    pub fn with_settings(name: &str, settings: OpenAiSettings) -> Self {
        Self::bind(SocketAddr::from(([127, 0, 0, 1], 0)), name, settings).expect("bind 127.0.0.1:0")
    }

    /// Starts a server on `addr` (for the demo, which needs known ports).
    pub fn bind(addr: SocketAddr, name: &str, settings: OpenAiSettings) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            name: name.to_string(),
            settings: Mutex::new(settings),
            ..Shared::default()
        });
        let serving = shared.clone();
        let (addr, stop) =
            crate::spawn_fixture_on(addr, &format!("openai-{name}"), move |listener| {
                accept_loop(listener, serving)
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

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Changes the settings for requests that arrive from now on.
    pub fn update(&self, change: impl FnOnce(&mut OpenAiSettings)) {
        change(&mut self.shared.settings.lock().unwrap());
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// How many requests were received so far.
    pub fn request_count(&self) -> usize {
        self.shared.requests.lock().unwrap().len()
    }

    /// Forgets the requests recorded so far (streams stay, indexed by start order).
    pub fn clear_requests(&self) {
        self.shared.requests.lock().unwrap().clear();
    }

    /// Every streamed response so far.
    pub fn streams(&self) -> Vec<StreamLog> {
        self.shared.streams.lock().unwrap().clone()
    }

    /// Streamed responses whose client went away before the end.
    pub fn client_gone_count(&self) -> usize {
        self.streams()
            .iter()
            .filter(|s| matches!(s.outcome, StreamOutcome::ClientGone { .. }))
            .count()
    }

    /// Waits until `count` requests were received, or `timeout` passes; returns the requests.
    pub async fn wait_requests(&self, count: usize, timeout: Duration) -> Vec<RecordedRequest> {
        let shared = &self.shared;
        wait_until(shared, timeout, || {
            let requests = shared.requests.lock().unwrap();
            (requests.len() >= count).then(|| requests.clone())
        })
        .await
        .unwrap_or_else(|| self.requests())
    }

    /// Waits until the stream at `index` (in start order) has ended one way or
    /// the other, or `timeout` passes; returns its log as it stands then.
    pub async fn wait_stream_end(&self, index: usize, timeout: Duration) -> Option<StreamLog> {
        let shared = &self.shared;
        wait_until(shared, timeout, || {
            let streams = shared.streams.lock().unwrap();
            streams
                .get(index)
                .filter(|s| s.outcome != StreamOutcome::Streaming)
                .cloned()
        })
        .await
        .or_else(|| self.streams().get(index).cloned())
    }

    /// Waits until at least `count` streams were started.
    pub async fn wait_streams_started(&self, count: usize, timeout: Duration) -> bool {
        let shared = &self.shared;
        wait_until(shared, timeout, || {
            (shared.streams.lock().unwrap().len() >= count).then_some(())
        })
        .await
        .is_some()
    }
}

async fn wait_until<T>(
    shared: &Shared,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let notified = shared.changed.notified();
        if let Some(found) = check() {
            return Some(found);
        }
        // The fixture runs on another runtime, so poll as well as wait for the notification.
        let nap = tokio::time::sleep(Duration::from_millis(20));
        tokio::select! {
            _ = notified => {}
            _ = nap => {}
            _ = tokio::time::sleep_until(deadline) => return check(),
        }
    }
}

type ResBody = BoxBody<Bytes, Infallible>;

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // Small SSE chunks must leave at once, not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(shared.clone(), req));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn header_number(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<ResBody>, Infallible> {
    let received_at = Instant::now();
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return Ok(fixture_error(
                &shared,
                StatusCode::BAD_REQUEST,
                &format!("request body failed: {e}"),
            ))
        }
    };
    shared.requests.lock().unwrap().push(RecordedRequest {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
        body: body.clone(),
        received_at,
    });
    shared.changed.notify_waiters();

    let mut settings = shared.settings.lock().unwrap().clone();
    if let Some(n) = header_number(&parts.headers, "x-test-chunks") {
        settings.stream_chunks = n as usize;
    }
    if let Some(ms) = header_number(&parts.headers, "x-test-gap-ms") {
        settings.chunk_gap = Duration::from_millis(ms);
    }
    if let Some(ms) = header_number(&parts.headers, "x-test-delay-ms") {
        settings.first_byte_delay = Duration::from_millis(ms);
    }
    if let Some(tokens) = header_number(&parts.headers, "x-test-usage-tokens") {
        settings.total_tokens = tokens;
    }
    if !settings.first_byte_delay.is_zero() {
        tokio::time::sleep(settings.first_byte_delay).await;
    }
    if let Some(code) = header_number(&parts.headers, "x-test-status") {
        let status = StatusCode::from_u16(code as u16).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Ok(fixture_error(
            &shared,
            status,
            "status requested by x-test-status",
        ));
    }

    let path = parts.uri.path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let response = match (&parts.method, segments.as_slice()) {
        (&Method::POST, ["v1", "chat", "completions"]) => {
            openai_generate(&shared, &settings, &body, Kind::Chat)
        }
        (&Method::POST, ["v1", "completions"]) => {
            openai_generate(&shared, &settings, &body, Kind::Completion)
        }
        (&Method::POST, ["v1", "embeddings"]) => embeddings(&shared, &body),
        (&Method::GET, ["v1", "models"]) => json_response(
            &shared,
            StatusCode::OK,
            json!({
                "object": "list",
                "data": settings.models.iter().map(|m| json!({
                    "id": m, "object": "model", "created": 1_700_000_000, "owned_by": shared.name,
                })).collect::<Vec<_>>(),
            }),
        ),
        (_, ["v2", "models", rest @ ..]) => kserve_rest(&shared, &parts.method, rest, &body),
        (&Method::GET, ["v2", "health", "live" | "ready"]) | (&Method::GET, ["ready"]) => {
            json_response(&shared, StatusCode::OK, json!({"ready": true}))
        }
        (_, ["echo", ..]) => json_response(
            &shared,
            StatusCode::OK,
            json!({
                "method": parts.method.as_str(),
                "path": parts.uri.to_string(),
                "bodyLength": body.len(),
                "headers": parts
                    .headers
                    .iter()
                    .map(|(name, value)| {
                        json!([name.as_str(), String::from_utf8_lossy(value.as_bytes())])
                    })
                    .collect::<Vec<_>>(),
            }),
        ),
        _ => fixture_error(
            &shared,
            StatusCode::NOT_FOUND,
            &format!("no fixture handler for {path}"),
        ),
    };
    Ok(response)
}

#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Completion,
}

fn openai_generate(
    shared: &Arc<Shared>,
    settings: &OpenAiSettings,
    body: &Bytes,
    kind: Kind,
) -> Response<ResBody> {
    let request: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return fixture_error(
                shared,
                StatusCode::BAD_REQUEST,
                &format!("body is not JSON: {e}"),
            )
        }
    };
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let stream = request
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let usage = usage(settings.total_tokens);
    if stream {
        let include_usage = request
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        return sse_stream(
            shared.clone(),
            settings,
            model,
            kind,
            include_usage.then_some(usage),
        );
    }
    let text = format!("hello from {}", shared.name);
    let value = match kind {
        Kind::Chat => json!({
            "id": "chatcmpl-fixture",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }],
            "usage": usage,
        }),
        Kind::Completion => json!({
            "id": "cmpl-fixture",
            "object": "text_completion",
            "created": 1_700_000_000,
            "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": null}],
            "usage": usage,
        }),
    };
    json_response(shared, StatusCode::OK, value)
}

/// A `usage` object adding up to `total` tokens.
fn usage(total: u64) -> Value {
    let prompt = total / 2;
    json!({"prompt_tokens": prompt, "completion_tokens": total - prompt, "total_tokens": total})
}

/// The content of streamed chunk `index`, as the tests expect to see it.
pub fn chunk_text(index: usize) -> String {
    format!("tok{index} ")
}

fn sse_chunk(model: &str, kind: Kind, index: usize, last: bool, with_usage: bool) -> Bytes {
    let finish = if last { json!("stop") } else { Value::Null };
    let value = match kind {
        Kind::Chat => {
            let mut delta = json!({"content": chunk_text(index)});
            if index == 0 {
                delta["role"] = json!("assistant");
            }
            json!({
                "id": "chatcmpl-fixture",
                "object": "chat.completion.chunk",
                "created": 1_700_000_000,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            })
        }
        Kind::Completion => json!({
            "id": "cmpl-fixture",
            "object": "text_completion",
            "created": 1_700_000_000,
            "model": model,
            "choices": [{"index": 0, "text": chunk_text(index), "finish_reason": finish, "logprobs": null}],
        }),
    };
    let mut value = value;
    if with_usage {
        value["usage"] = Value::Null;
    }
    Bytes::from(format!("data: {value}\n\n"))
}

/// The last chunk of a stream that asked for usage: no choices, the usage.
fn sse_usage_chunk(model: &str, kind: Kind, usage: &Value) -> Bytes {
    let object = match kind {
        Kind::Chat => "chat.completion.chunk",
        Kind::Completion => "text_completion",
    };
    let value = json!({
        "id": "chatcmpl-fixture",
        "object": object,
        "created": 1_700_000_000,
        "model": model,
        "choices": [],
        "usage": usage,
    });
    Bytes::from(format!("data: {value}\n\n"))
}

fn sse_stream(
    shared: Arc<Shared>,
    settings: &OpenAiSettings,
    model: String,
    kind: Kind,
    usage: Option<Value>,
) -> Response<ResBody> {
    // Capacity 1: a chunk is produced only once the connection took the previous one.
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    let index = {
        let mut streams = shared.streams.lock().unwrap();
        streams.push(StreamLog {
            model: model.clone(),
            sent: Vec::new(),
            outcome: StreamOutcome::Streaming,
        });
        streams.len() - 1
    };
    shared.changed.notify_waiters();
    let chunks = settings.stream_chunks;
    let gap = settings.chunk_gap;
    let task_shared = shared.clone();
    tokio::spawn(async move {
        let shared = task_shared;
        let finish = |outcome: StreamOutcome| {
            if let Some(log) = shared.streams.lock().unwrap().get_mut(index) {
                log.outcome = outcome;
            }
            shared.changed.notify_waiters();
        };
        let gone = |after_chunks| StreamOutcome::ClientGone {
            at: Instant::now(),
            after_chunks,
        };
        for i in 0..=chunks {
            if i > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(gap) => {}
                    _ = tx.closed() => return finish(gone(i)),
                }
            }
            if i == chunks {
                if let Some(usage) = &usage {
                    let data = sse_usage_chunk(&model, kind, usage);
                    if tx.send(Ok(Frame::data(data))).await.is_err() {
                        return finish(gone(i));
                    }
                }
            }
            let data = if i == chunks {
                Bytes::from_static(b"data: [DONE]\n\n")
            } else {
                sse_chunk(&model, kind, i, i + 1 == chunks, usage.is_some())
            };
            if tx.send(Ok(Frame::data(data))).await.is_err() {
                return finish(gone(i));
            }
            if i < chunks {
                if let Some(log) = shared.streams.lock().unwrap().get_mut(index) {
                    log.sent.push(Instant::now());
                }
            }
        }
        finish(StreamOutcome::Completed);
    });
    let mut response = Response::new(StreamBody::new(ReceiverStream::new(rx)).boxed());
    let headers = response.headers_mut();
    headers.insert(
        "content-type",
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert("cache-control", HeaderValue::from_static("no-cache"));
    tag(&shared, response)
}

fn embeddings(shared: &Arc<Shared>, body: &Bytes) -> Response<ResBody> {
    let request: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return fixture_error(
                shared,
                StatusCode::BAD_REQUEST,
                &format!("body is not JSON: {e}"),
            )
        }
    };
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let inputs = match request.get("input") {
        Some(Value::Array(items)) => items.len().max(1),
        _ => 1,
    };
    let data: Vec<Value> = (0..inputs)
        .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.25, -0.5, 0.75]}))
        .collect();
    json_response(
        shared,
        StatusCode::OK,
        json!({
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": 2, "total_tokens": 2},
        }),
    )
}

/// `/v2/models/{name}[/versions/{v}][/infer|/ready]`.
fn kserve_rest(
    shared: &Arc<Shared>,
    method: &Method,
    rest: &[&str],
    body: &Bytes,
) -> Response<ResBody> {
    let (name, version, action) = match rest {
        [name] => (*name, None, ""),
        [name, action] => (*name, None, *action),
        [name, "versions", v] => (*name, Some(*v), ""),
        [name, "versions", v, action] => (*name, Some(*v), *action),
        _ => return fixture_error(shared, StatusCode::NOT_FOUND, "unknown KServe path"),
    };
    match (method, action) {
        (&Method::POST, "infer") => {
            let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let mut response = json!({
                "model_name": name,
                "outputs": [{"name": "output0", "datatype": "FP32", "shape": [1], "data": [0.5]}],
            });
            if let Some(v) = version {
                response["model_version"] = json!(v);
            }
            if let Some(id) = request.get("id") {
                response["id"] = id.clone();
            }
            json_response(shared, StatusCode::OK, response)
        }
        (&Method::GET, "ready") => {
            json_response(shared, StatusCode::OK, json!({"name": name, "ready": true}))
        }
        (&Method::GET, "") => json_response(
            shared,
            StatusCode::OK,
            json!({
                "name": name,
                "versions": ["1"],
                "platform": "infermesh-fixture",
                "inputs": [{"name": "input0", "datatype": "FP32", "shape": [-1]}],
                "outputs": [{"name": "output0", "datatype": "FP32", "shape": [-1]}],
            }),
        ),
        _ => fixture_error(shared, StatusCode::NOT_FOUND, "unknown KServe action"),
    }
}

fn tag(shared: &Shared, mut response: Response<ResBody>) -> Response<ResBody> {
    response.headers_mut().insert(
        "x-upstream",
        HeaderValue::from_str(&shared.name).expect("fixture name is a header value"),
    );
    response
}

fn json_response(shared: &Shared, status: StatusCode, value: Value) -> Response<ResBody> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    tag(shared, response)
}

/// An error answered by the fixture itself; its type says so, unlike the proxy's.
fn fixture_error(shared: &Shared, status: StatusCode, message: &str) -> Response<ResBody> {
    json_response(
        shared,
        status,
        json!({"error": {"type": "fixture_error", "message": message}}),
    )
}
