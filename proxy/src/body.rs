//! Request bodies on their way upstream: the prefix read for classification
//! is replayed first, then the rest of the client's body streams through.
//!
//! A client's body the proxy stops reading before its end, because it
//! answered first (a refusal, a failed upstream), is read on and discarded
//! for a short while ([`ClientBody`]), so that the client finishes its
//! upload and reads the answer rather than a reset stream.
//!
//! What goes wrong on the client's side of a body (a broken upload, a client
//! that leaves, a body that stalls, a body whose rest contradicts the model it
//! was routed by) is recorded in a [`BodyFault`] that the forwarding code
//! reads, so that the endpoint is never blamed for it.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use infermesh_filters::replay::ReplayBody;
use infermesh_filters::timeout::deadline;
use infermesh_filters::{BoxError, ProxyError};

use crate::classify::{Ambiguity, GrpcVerifier, JsonScanner};

/// A client's request body with its already-read prefix put back in front.
#[derive(Debug, Default)]
pub struct ProxyBody {
    prefix: VecDeque<Bytes>,
    prefix_len: u64,
    /// Boxed: rare in a request, and a request is moved whole through
    /// every layer of the stack.
    trailers: Option<Box<HeaderMap>>,
    rest: Option<ClientBody>,
    /// Checks the rest of the body as it streams.
    check: Option<BodyCheck>,
    /// Where a client-side failure of the rest is recorded.
    fault: Option<BodyFault>,
    /// Longest wait for the next chunk of the rest; `None` for no limit.
    idle: Option<Duration>,
    idle_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Set instead of the fields above on the way upstream, when the retry
    /// filter keeps the body to send it again.
    attempt: Option<Box<ReplayBody<ProxyBody>>>,
}

/// How long a client's body is read on after the proxy stopped needing it.
const LINGER_TIME: Duration = Duration::from_secs(2);
/// How much of it is read on at most.
const LINGER_BYTES: usize = 4 << 20;

/// A client's request body as it arrives. Dropped before its end, because
/// the proxy answered without reading all of it (a refusal, a failed
/// upstream), it is read on and discarded in the background, for at most
/// [`LINGER_TIME`] and [`LINGER_BYTES`]: an HTTP/2 client then finishes its
/// upload and its stream closes cleanly, where dropping the body would
/// reset the stream under a client still sending (which some clients
/// report as an error over the answer they were sent), and an HTTP/1.1
/// connection can carry the next request.
#[derive(Debug)]
pub struct ClientBody {
    /// Taken only by `drop`.
    body: Option<Incoming>,
    ended: bool,
}

impl ClientBody {
    /// The body of a request the proxy received.
    pub fn new(body: Incoming) -> Self {
        Self {
            body: Some(body),
            ended: false,
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let Some(body) = self.body.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = std::task::ready!(Pin::new(body).poll_frame(cx));
        // A failed body has nothing more to read either.
        if !matches!(frame, Some(Ok(_))) {
            self.ended = true;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Incoming::size_hint)
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        if self.is_end_stream() {
            return;
        }
        if let (Ok(runtime), Some(body)) = (tokio::runtime::Handle::try_current(), self.body.take())
        {
            runtime.spawn(linger(body));
        }
    }
}

/// Reads `body` to its end and discards it, for at most [`LINGER_TIME`] and
/// [`LINGER_BYTES`]; past either bound the body is dropped as it stands.
async fn linger(mut body: Incoming) {
    use http_body_util::BodyExt as _;
    let drain = async {
        let mut left = LINGER_BYTES;
        while let Some(Ok(frame)) = body.frame().await {
            let read = frame.data_ref().map_or(0, Bytes::len);
            let Some(rest) = left.checked_sub(read) else {
                return;
            };
            left = rest;
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}

/// Verifies the rest of a request body after it was routed by its model.
#[derive(Debug)]
pub enum BodyCheck {
    /// An OpenAI JSON body: no second top-level `model`, no second value.
    Json(Box<JsonScanner>),
    /// A gRPC body: every message names the model the first one named.
    Grpc(Box<GrpcVerifier>),
}

impl BodyCheck {
    /// Checks the next chunk; the reason when the body must not reach the
    /// upstream.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), Ambiguity> {
        match self {
            BodyCheck::Json(scanner) => {
                scanner.feed(chunk);
                match scanner.ambiguity() {
                    Some(why) => Err(why),
                    None => Ok(()),
                }
            }
            BodyCheck::Grpc(verifier) => verifier.feed(chunk),
        }
    }
}

/// What went wrong on the client's side of a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyProblem {
    /// The client's upload broke (bad chunk size, cut short, the client left).
    Broken(String),
    /// The rest of the body contradicts what the request was routed and
    /// authorized by.
    Refused(Ambiguity),
    /// Nothing arrived for this long.
    Stalled(Duration),
}

impl fmt::Display for BodyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyProblem::Broken(why) => write!(f, "reading the request body failed: {why}"),
            BodyProblem::Refused(why) => write!(f, "{why}"),
            BodyProblem::Stalled(limit) => write!(
                f,
                "the request body stalled: nothing arrived for {} (classify.bodyIdleTimeout)",
                humantime::format_duration(*limit)
            ),
        }
    }
}

impl std::error::Error for BodyProblem {}

impl BodyProblem {
    /// The error the client is owed: the client's fault, never retried.
    pub fn to_error(&self) -> ProxyError {
        match self {
            BodyProblem::Stalled(_) => ProxyError::RequestTimeout(self.to_string()),
            _ => ProxyError::BadRequest(self.to_string()),
        }
    }
}

/// The first client-side failure of a request body, shared by the body
/// (which sees it) and the forwarding code (which must not count it against
/// the endpoint). Travels as a request extension, so every attempt sees it.
#[derive(Debug, Clone, Default)]
pub struct BodyFault(Arc<OnceLock<BodyProblem>>);

impl BodyFault {
    /// The recorded failure, if any.
    pub fn get(&self) -> Option<&BodyProblem> {
        self.0.get()
    }

    fn record(&self, problem: BodyProblem) -> BoxError {
        let _ = self.0.set(problem.clone());
        Box::new(problem)
    }
}

impl ProxyBody {
    /// The client's body, nothing read from it yet.
    pub fn streaming(body: ClientBody) -> Self {
        Self {
            rest: Some(body),
            ..Default::default()
        }
    }

    /// A body whose first chunks were read already. `rest` is `None` when the
    /// client's body ended within the prefix; `trailers` are the client's, if
    /// they were read too.
    pub fn replay(
        prefix: VecDeque<Bytes>,
        trailers: Option<HeaderMap>,
        rest: Option<ClientBody>,
    ) -> Self {
        let prefix_len = prefix.iter().map(|b| b.len() as u64).sum();
        Self {
            prefix,
            prefix_len,
            trailers: trailers.map(Box::new),
            rest,
            ..Default::default()
        }
    }

    /// Verifies the rest of the body with `check`, cuts it when nothing
    /// arrives for `idle`, and records what goes wrong on the client's side
    /// in `fault`.
    pub fn guarded(
        mut self,
        check: Option<BodyCheck>,
        idle: Option<Duration>,
        fault: BodyFault,
    ) -> Self {
        self.check = check;
        self.idle = idle;
        self.fault = Some(fault);
        self
    }

    /// One attempt's body, as the retry filter hands it on: the body itself
    /// when it is not kept for a replay (no allocation, no extra layer).
    pub fn attempt(body: ReplayBody<ProxyBody>) -> Self {
        match body.into_direct() {
            Ok(body) => body,
            Err(kept) => Self {
                attempt: Some(Box::new(kept)),
                ..Default::default()
            },
        }
    }
}

impl ProxyBody {
    /// Ends the rest of the body with `problem`, recorded for the forwarding code.
    fn fail(&mut self, problem: BodyProblem) -> BoxError {
        self.rest = None;
        self.trailers = None;
        self.idle_timer = None;
        match &self.fault {
            Some(fault) => fault.record(problem),
            None => Box::new(problem),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(attempt) = this.attempt.as_mut() {
            return Pin::new(attempt.as_mut()).poll_frame(cx);
        }
        if let Some(chunk) = this.prefix.pop_front() {
            this.prefix_len -= chunk.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if let Some(rest) = this.rest.as_mut() {
            return match Pin::new(rest).poll_frame(cx) {
                Poll::Ready(None) => {
                    this.rest = None;
                    this.idle_timer = None;
                    Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(*t))))
                }
                Poll::Ready(Some(Ok(frame))) => {
                    if let (Some(check), Some(data)) = (this.check.as_mut(), frame.data_ref()) {
                        if let Err(why) = check.feed(data) {
                            // The chunk is withheld: the upstream never sees
                            // a complete body it could act on.
                            return Poll::Ready(Some(Err(this.fail(BodyProblem::Refused(why)))));
                        }
                    }
                    if let (Some(timer), Some(idle)) = (this.idle_timer.as_mut(), this.idle) {
                        timer
                            .as_mut()
                            .reset(deadline(tokio::time::Instant::now(), idle));
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(error))) => {
                    let problem = BodyProblem::Broken(error.to_string());
                    Poll::Ready(Some(Err(this.fail(problem))))
                }
                Poll::Pending => {
                    let Some(idle) = this.idle else {
                        return Poll::Pending;
                    };
                    let timer = this
                        .idle_timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                    match timer.as_mut().poll(cx) {
                        Poll::Ready(()) => {
                            Poll::Ready(Some(Err(this.fail(BodyProblem::Stalled(idle)))))
                        }
                        Poll::Pending => Poll::Pending,
                    }
                }
            };
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(*t))))
    }

    fn is_end_stream(&self) -> bool {
        if let Some(attempt) = &self.attempt {
            return attempt.is_end_stream();
        }
        self.prefix.is_empty()
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(|rest| rest.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if let Some(attempt) = &self.attempt {
            return attempt.size_hint();
        }
        let rest = match &self.rest {
            Some(rest) => rest.size_hint(),
            None => SizeHint::with_exact(0),
        };
        // Upper first: SizeHint asserts lower <= upper at every step.
        let mut hint = SizeHint::new();
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(self.prefix_len));
        }
        hint.set_lower(rest.lower().saturating_add(self.prefix_len));
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_hint_counts_the_replayed_prefix() {
        let body = ProxyBody::replay(
            VecDeque::from([
                Bytes::from_static(b"{\"model\""),
                Bytes::from_static(b":1}"),
            ]),
            None,
            None,
        );
        assert_eq!(body.size_hint().exact(), Some(11));
        assert!(!body.is_end_stream());
    }

    #[tokio::test]
    async fn replayed_chunks_come_first_and_unchanged() {
        use http_body_util::BodyExt;
        let body = ProxyBody::replay(
            VecDeque::from([Bytes::from_static(b"ab"), Bytes::from_static(b"cd")]),
            Some(HeaderMap::new()),
            None,
        );
        let collected = body.collect().await.unwrap();
        assert!(collected.trailers().is_some());
        assert_eq!(collected.to_bytes(), Bytes::from_static(b"abcd"));
    }
}
