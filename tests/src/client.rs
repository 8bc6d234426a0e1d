//! Clients the tests drive the proxy with: a hyper client (HTTP/1.1 or
//! HTTP/2 prior knowledge) that can record when each piece of a response body
//! arrived, an SSE parser over those arrivals, and a raw TCP exchange for
//! input no well-behaved client would send.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Request body type of [`HttpClient`].
pub type ReqBody = BoxBody<Bytes, BoxError>;

/// A whole request body.
pub fn full(body: impl Into<Bytes>) -> ReqBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A request body sent in pieces, each after its delay, with no
/// `content-length` (chunked on HTTP/1.1).
pub fn paced(pieces: Vec<(Duration, Bytes)>) -> ReqBody {
    let stream = futures_util::stream::unfold(pieces.into_iter(), |mut rest| async move {
        let (delay, bytes) = rest.next()?;
        tokio::time::sleep(delay).await;
        Some((Ok::<_, BoxError>(Frame::data(bytes)), rest))
    });
    StreamBody::new(stream).boxed()
}

/// A pooled hyper client speaking one HTTP version.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpConnector, ReqBody>,
}

impl HttpClient {
    /// HTTP/1.1 with keep-alive.
    pub fn http1() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Self {
            inner: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    /// HTTP/2 over cleartext with prior knowledge (as gRPC clients speak it).
    pub fn http2() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Self {
            inner: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(connector),
        }
    }

    /// Sends a request and returns the response head with its body unread.
    pub async fn send(&self, request: Request<ReqBody>) -> Result<Response<Incoming>, BoxError> {
        Ok(self.inner.request(request).await?)
    }

    /// Sends a request and reads the whole response; panics on a transport error.
    pub async fn fetch(&self, request: Request<ReqBody>) -> Reply {
        let description = format!("{} {}", request.method(), request.uri());
        let response = self
            .send(request)
            .await
            .unwrap_or_else(|e| panic!("{description}: no response: {e:?}"));
        Reply::read(response)
            .await
            .unwrap_or_else(|e| panic!("{description}: response body failed: {e:?}"))
    }

    /// `POST url` with a JSON body (given as text, sent byte for byte).
    pub async fn post_json(&self, url: &str, body: &str) -> Reply {
        self.fetch(json_request(url, body, &[])).await
    }

    /// `GET url`.
    pub async fn get(&self, url: &str) -> Reply {
        let request = Request::get(url).body(full(Bytes::new())).expect("request");
        self.fetch(request).await
    }
}

/// A `POST` with `content-type: application/json` and extra headers.
pub fn json_request(url: &str, body: &str, headers: &[(&str, &str)]) -> Request<ReqBody> {
    let mut builder = Request::post(url).header("content-type", "application/json");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(full(body.to_string())).expect("request")
}

/// A whole response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub async fn read(response: Response<Incoming>) -> Result<Self, BoxError> {
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Self {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body,
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics, showing the body, when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response ({}) is not JSON ({e}): {:?}",
                self.status,
                self.text()
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `x-upstream` header: which fixture answered.
    pub fn upstream(&self) -> Option<&str> {
        self.header("x-upstream")
    }

    /// Asserts a proxy error: this status, `content-type: application/json`,
    /// a body `{"error":{"type": error_type, "message": <non-empty>}}`, and no
    /// upstream involved. Returns the message.
    #[track_caller]
    pub fn assert_proxy_error(&self, status: u16, error_type: &str) -> String {
        assert_eq!(
            self.status.as_u16(),
            status,
            "expected a {status} {error_type} error, got {} with body {:?}",
            self.status,
            self.text()
        );
        let content_type = self.header("content-type").unwrap_or_default();
        assert!(
            content_type.starts_with("application/json"),
            "error content-type is {content_type:?}, body {:?}",
            self.text()
        );
        assert_eq!(
            self.upstream(),
            None,
            "the error came from an upstream fixture, not the proxy: {:?}",
            self.text()
        );
        let body = self.json();
        assert_eq!(
            body["error"]["type"].as_str(),
            Some(error_type),
            "error type in {body}"
        );
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            !message.trim().is_empty(),
            "error message is empty in {body}"
        );
        message.to_string()
    }
}

/// When each piece of a response body arrived.
#[derive(Debug)]
pub struct Arrivals {
    /// When the response head arrived.
    pub head_at: Instant,
    /// Each data frame as hyper handed it over, with the time it did.
    pub frames: Vec<(Instant, Bytes)>,
    /// How the body ended: trailers (if any), or the error that cut it.
    pub end: Result<Option<HeaderMap>, String>,
    /// When the body ended (cleanly or not).
    pub ended_at: Instant,
}

/// One SSE event and when the read that completed it arrived.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub data: String,
    pub at: Instant,
}

impl Arrivals {
    /// Reads a body to its end, timestamping each frame.
    pub async fn read(body: Incoming) -> Self {
        Self::read_limited(body, usize::MAX).await
    }

    /// Reads at most `max_frames` data frames, then drops the body.
    pub async fn read_limited(mut body: Incoming, max_frames: usize) -> Self {
        let head_at = Instant::now();
        let mut frames = Vec::new();
        let mut trailers = None;
        let end = loop {
            if frames.len() >= max_frames {
                break Ok(None);
            }
            match body.frame().await {
                None => break Ok(trailers),
                Some(Err(e)) => break Err(format!("{e:?}")),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => frames.push((Instant::now(), data)),
                    Err(frame) => trailers = frame.into_trailers().ok(),
                },
            }
        };
        Self {
            head_at,
            frames,
            end,
            ended_at: Instant::now(),
        }
    }

    /// Every byte received.
    pub fn bytes(&self) -> Vec<u8> {
        self.frames
            .iter()
            .flat_map(|(_, b)| b.iter().copied())
            .collect()
    }

    /// The SSE events (`data:` lines), each stamped with the arrival of the
    /// frame that completed it.
    pub fn sse_events(&self) -> Vec<SseEvent> {
        let mut events = Vec::new();
        let mut pending = Vec::<u8>::new();
        for (at, bytes) in &self.frames {
            pending.extend_from_slice(bytes);
            while let Some(end) = find(&pending, b"\n\n") {
                let raw: Vec<u8> = pending.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&raw);
                let data: Vec<&str> = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if !data.is_empty() {
                    events.push(SseEvent {
                        data: data.join("\n"),
                        at: *at,
                    });
                }
            }
        }
        events
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Groups instants into separate arrivals: two instants closer than `within`
/// count as one arrival. Returns how many arrivals there were.
pub fn distinct_arrivals(instants: &[Instant], within: Duration) -> usize {
    let mut count = 0;
    let mut last: Option<Instant> = None;
    for &at in instants {
        if last.is_none_or(|prev| at.duration_since(prev) >= within) {
            count += 1;
        }
        last = Some(at);
    }
    count
}

/// The content deltas of OpenAI chat chunks (`choices[0].delta.content`), in order.
pub fn chat_deltas(events: &[SseEvent]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.data != "[DONE]")
        .filter_map(|e| {
            let v: Value = serde_json::from_str(&e.data).ok()?;
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

/// What came back on a raw TCP connection.
#[derive(Debug)]
pub struct RawReply {
    pub bytes: Vec<u8>,
    /// The peer closed the connection (EOF or reset) before the timeout.
    pub closed: bool,
}

impl RawReply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// The status code of the first HTTP/1.x status line, if any.
    pub fn status(&self) -> Option<u16> {
        let text = self.text();
        let line = text.lines().next()?;
        let mut parts = line.split_whitespace();
        parts.next().filter(|v| v.starts_with("HTTP/1."))?;
        parts.next()?.parse().ok()
    }
}

/// Writes `bytes` to `addr` and reads until the peer closes or `timeout` passes.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> RawReply {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let _ = stream.write_all(bytes).await;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + timeout;
    let closed = loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    };
    RawReply {
        bytes: received,
        closed,
    }
}

/// A chat-completion request body.
pub fn chat_body(model: &str, stream: bool) -> String {
    format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"Say hello"}}],"stream":{stream}}}"#
    )
}

/// Runs `count` requests made by `make(i)`, at most `concurrency` at a time.
pub async fn drive<F, Fut>(count: usize, concurrency: usize, make: F) -> Vec<Reply>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Reply>,
{
    use futures_util::StreamExt;
    futures_util::stream::iter(0..count)
        .map(make)
        .buffer_unordered(concurrency)
        .collect()
        .await
}
