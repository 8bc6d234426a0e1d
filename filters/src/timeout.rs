//! Time limits for model traffic: time to first byte, idle time between
//! response chunks, and an optional total lifetime.
//!
//! A single request timeout, as most proxies offer, fits model traffic badly:
//! a chat completion may queue for seconds before its first token and then
//! stream for minutes. So the limits are separate. The time to first byte
//! bounds the wait for response headers; the idle limit bounds each gap
//! between body chunks, so a stalled stream is cut while a long healthy one
//! runs on; the total lifetime is off unless a route sets it.
//!
//! A limit that fires before the response starts becomes a
//! [`ProxyError`], which the stack's edge turns into a 504 (gRPC
//! `DEADLINE_EXCEEDED`). A limit that fires mid-stream cannot change the
//! status any more: a gRPC stream ends with `grpc-status: 4` trailers, any
//! other stream is reset.
//!
//! ```
//! use std::time::Duration;
//! use infermesh_filters::timeout::TimeoutLayer;
//!
//! let layer = TimeoutLayer::new()
//!     .first_byte(Some(Duration::from_secs(30)))
//!     .idle(Some(Duration::from_secs(60)));
//! # let _ = layer;
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use crate::body::{BoxBody, BoxError};
use crate::error::{grpc_code, grpc_percent_encode, ProxyError};
use crate::grpc::is_grpc;

/// How far a limit too long to reach is put off: decades, as tokio does
/// for a sleep past the end of its clock.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// The instant `limit` after `from`. A policy may write any duration
/// (`firstByte: 18446744073709551615s` parses), and an instant that far off
/// does not exist: such a limit is put off for decades instead, so it
/// never fires, where a plain addition would panic on every request.
pub fn deadline(from: Instant, limit: Duration) -> Instant {
    Instant::from_std(std_deadline(from.into_std(), limit))
}

/// [`deadline`] for the standard library's clock.
pub fn std_deadline(from: std::time::Instant, limit: Duration) -> std::time::Instant {
    from.checked_add(limit).unwrap_or(from + FAR_FUTURE)
}

/// Configuration of the [`Timeout`] filter; every limit is optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimeoutLayer {
    first_byte: Option<Duration>,
    idle: Option<Duration>,
    total: Option<Duration>,
}

impl TimeoutLayer {
    /// No limits.
    pub fn new() -> Self {
        Self::default()
    }

    /// Limit on the wait for response headers.
    pub fn first_byte(mut self, limit: Option<Duration>) -> Self {
        self.first_byte = limit;
        self
    }

    /// Limit on each gap between response body frames.
    pub fn idle(mut self, limit: Option<Duration>) -> Self {
        self.idle = limit;
        self
    }

    /// Limit on the whole exchange, response body included.
    pub fn total(mut self, limit: Option<Duration>) -> Self {
        self.total = limit;
        self
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Timeout {
            inner,
            config: *self,
        }
    }
}

/// Applies a [`TimeoutLayer`]'s limits to an inner service.
#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    config: TimeoutLayer,
}

impl<S, B> Service<Request<B>> for Timeout<S>
where
    S: Service<Request<B>, Response = Response<BoxBody>, Error = ProxyError>,
{
    type Response = Response<BoxBody>;
    type Error = ProxyError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let grpc = is_grpc(request.headers());
        let start = Instant::now();
        let total_deadline = self.config.total.map(|total| deadline(start, total));
        let first_byte_deadline = self.config.first_byte.map(|limit| deadline(start, limit));
        // Whichever limit comes first decides what the client is told.
        let (deadline, error) = match (first_byte_deadline, total_deadline) {
            (Some(fb), Some(total)) if total < fb => (
                Some(total),
                ProxyError::TotalTimeout(self.config.total.unwrap_or_default()),
            ),
            (Some(fb), _) => (
                Some(fb),
                ProxyError::FirstByteTimeout(self.config.first_byte.unwrap_or_default()),
            ),
            (None, Some(total)) => (
                Some(total),
                ProxyError::TotalTimeout(self.config.total.unwrap_or_default()),
            ),
            (None, None) => (None, ProxyError::TotalTimeout(Duration::ZERO)),
        };
        ResponseFuture {
            inner: self.inner.call(request),
            sleep: deadline.map(tokio::time::sleep_until),
            error: Some(error),
            body: BodyLimits {
                idle: self.config.idle,
                total: self.config.total,
                total_deadline,
                grpc,
            },
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct BodyLimits {
    idle: Option<Duration>,
    total: Option<Duration>,
    total_deadline: Option<Instant>,
    grpc: bool,
}

pin_project! {
    /// Response future of [`Timeout`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Option<Sleep>,
        error: Option<ProxyError>,
        body: BodyLimits,
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<BoxBody>, ProxyError>>,
{
    type Output = Result<Response<BoxBody>, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            let limits = *this.body;
            return Poll::Ready(result.map(|response| {
                if limits.idle.is_none() && limits.total_deadline.is_none() {
                    return response;
                }
                response.map(|body| TimeoutBody::new(body, limits).boxed_unsync())
            }));
        }
        if let Some(sleep) = this.sleep.as_pin_mut() {
            ready!(sleep.poll(cx));
            let error = this
                .error
                .take()
                .unwrap_or(ProxyError::TotalTimeout(Duration::ZERO));
            return Poll::Ready(Err(error));
        }
        Poll::Pending
    }
}

pin_project! {
    /// A response body cut off when it goes idle too long or outlives the
    /// request's total lifetime.
    ///
    /// The idle timer is armed only when the body waits: a frame records
    /// its time, and a wait arms (or moves on) the timer to that time plus
    /// the limit. A body that never waits, as a small answer read whole,
    /// registers no timer at all, and a stream moves its timer once per
    /// wait instead of once per frame.
    pub struct TimeoutBody<B> {
        #[pin]
        inner: B,
        #[pin]
        idle_sleep: Option<Sleep>,
        // When the body last made progress: the idle limit counts from here.
        idle_from: Instant,
        #[pin]
        total_sleep: Option<Sleep>,
        limits: BodyLimits,
        done: bool,
    }
}

impl<B> TimeoutBody<B> {
    fn new(inner: B, limits: BodyLimits) -> Self {
        Self {
            inner,
            idle_sleep: None,
            idle_from: Instant::now(),
            total_sleep: limits.total_deadline.map(tokio::time::sleep_until),
            limits,
            done: false,
        }
    }
}

/// The error a body yields when a limit cuts it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BodyTimeout(&'static str);

impl<B> Body for TimeoutBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            if this.limits.idle.is_some() {
                *this.idle_from = Instant::now();
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let total_fired = this
            .total_sleep
            .as_pin_mut()
            .is_some_and(|sleep| sleep.poll(cx).is_ready());
        let idle_fired = !total_fired
            && this.limits.idle.is_some_and(|idle| {
                let due = deadline(*this.idle_from, idle);
                match this.idle_sleep.as_mut().as_pin_mut() {
                    // Moving a timer later is cheap: it stays registered.
                    Some(sleep) if sleep.deadline() != due => sleep.reset(due),
                    Some(_) => {}
                    None => this.idle_sleep.set(Some(tokio::time::sleep_until(due))),
                }
                this.idle_sleep
                    .as_pin_mut()
                    .is_some_and(|sleep| sleep.poll(cx).is_ready())
            });
        if !total_fired && !idle_fired {
            return Poll::Pending;
        }
        *this.done = true;
        let message = if total_fired {
            format!(
                "stream exceeded its total lifetime of {}ms",
                this.limits.total.unwrap_or_default().as_millis()
            )
        } else {
            format!(
                "stream idle for longer than {}ms",
                this.limits.idle.unwrap_or_default().as_millis()
            )
        };
        if this.limits.grpc {
            let mut trailers = HeaderMap::new();
            trailers.insert(
                crate::grpc::GRPC_STATUS,
                HeaderValue::from(u16::from(grpc_code::DEADLINE_EXCEEDED)),
            );
            if let Ok(value) = HeaderValue::from_str(&grpc_percent_encode(&message)) {
                trailers.insert("grpc-message", value);
            }
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        Poll::Ready(Some(Err(Box::new(BodyTimeout(if total_fired {
            "total lifetime exceeded"
        } else {
            "idle timeout"
        })))))
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body;
    use tokio::sync::mpsc;
    use tower::{service_fn, ServiceExt};

    /// A body fed from a channel, so a test decides when frames arrive.
    struct ChannelBody(mpsc::Receiver<Bytes>);

    impl Body for ChannelBody {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.0
                .poll_recv(cx)
                .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
        }
    }

    /// `layer` over a service answering with a streaming response (gRPC's
    /// content type when `grpc`), and the sender of its body's chunks.
    fn streaming_through(
        layer: TimeoutLayer,
        grpc: bool,
    ) -> (
        mpsc::Sender<Bytes>,
        impl Service<Request<()>, Response = Response<BoxBody>, Error = ProxyError>,
    ) {
        let (tx, rx) = mpsc::channel(8);
        let mut response = Response::new(ChannelBody(rx).boxed_unsync());
        if grpc {
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
        }
        let response = std::sync::Mutex::new(Some(response));
        let svc = layer.layer(service_fn(move |_req: Request<()>| {
            let r = response.lock().unwrap().take().unwrap();
            async move { Ok::<_, ProxyError>(r) }
        }));
        (tx, svc)
    }

    fn request(grpc: bool) -> Request<()> {
        let mut request = Request::new(());
        if grpc {
            request.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
        }
        request
    }

    #[tokio::test(start_paused = true)]
    async fn first_byte_timeout_becomes_a_typed_error() {
        let svc = TimeoutLayer::new()
            .first_byte(Some(Duration::from_millis(100)))
            .layer(service_fn(|_req: Request<()>| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok::<_, ProxyError>(Response::new(body::full("late")))
            }));
        let err = svc.oneshot(request(false)).await.unwrap_err();
        assert!(matches!(err, ProxyError::FirstByteTimeout(d) if d == Duration::from_millis(100)));
    }

    #[tokio::test(start_paused = true)]
    async fn total_limit_shorter_than_first_byte_reports_the_total() {
        let svc = TimeoutLayer::new()
            .first_byte(Some(Duration::from_secs(10)))
            .total(Some(Duration::from_secs(1)))
            .layer(service_fn(|_req: Request<()>| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok::<_, ProxyError>(Response::new(body::full("late")))
            }));
        let err = svc.oneshot(request(false)).await.unwrap_err();
        assert!(matches!(err, ProxyError::TotalTimeout(d) if d == Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_keeps_flowing_outlives_the_idle_limit() {
        let (tx, svc) = streaming_through(
            TimeoutLayer::new().idle(Some(Duration::from_millis(100))),
            false,
        );
        let mut body = svc.oneshot(request(false)).await.unwrap().into_body();
        let feeder = tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(60)).await;
                tx.send(Bytes::from_static(b"tok")).await.unwrap();
            }
        });
        let mut frames = 0;
        while let Some(frame) = body.frame().await {
            frame.unwrap();
            frames += 1;
        }
        feeder.await.unwrap();
        assert_eq!(frames, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_http_stream_is_cut_with_an_error() {
        let (tx, svc) = streaming_through(
            TimeoutLayer::new().idle(Some(Duration::from_millis(100))),
            false,
        );
        let mut body = svc.oneshot(request(false)).await.unwrap().into_body();
        tx.send(Bytes::from_static(b"first")).await.unwrap();
        assert!(body.frame().await.unwrap().unwrap().is_data());
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(err.to_string(), "idle timeout");
        assert!(body.frame().await.is_none());
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn limits_too_long_to_reach_never_fire() {
        let (tx, svc) = streaming_through(
            TimeoutLayer::new()
                .first_byte(Some(Duration::MAX))
                .idle(Some(Duration::MAX))
                .total(Some(Duration::MAX)),
            false,
        );
        let mut body = svc.oneshot(request(false)).await.unwrap().into_body();
        let feeder = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(86_400 * 365)).await;
            tx.send(Bytes::from_static(b"a year on")).await.unwrap();
        });
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "a year on");
        feeder.await.unwrap();
        assert!(body.frame().await.is_none());
        assert!(deadline(Instant::now(), Duration::MAX) > Instant::now() + FAR_FUTURE / 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_limit_counts_from_the_last_frame() {
        let (tx, svc) = streaming_through(
            TimeoutLayer::new().idle(Some(Duration::from_millis(100))),
            false,
        );
        let start = Instant::now();
        let mut body = svc.oneshot(request(false)).await.unwrap().into_body();
        // The body waits first (its timer armed for 100 ms), then a frame
        // comes at 90 ms and another at 180 ms, each moving the limit on.
        let feeder = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(90)).await;
            tx.send(Bytes::from_static(b"a")).await.unwrap();
            tokio::time::sleep(Duration::from_millis(90)).await;
            tx.send(Bytes::from_static(b"b")).await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(tx);
        });
        assert!(body.frame().await.unwrap().unwrap().is_data());
        assert!(body.frame().await.unwrap().unwrap().is_data());
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(err.to_string(), "idle timeout");
        assert_eq!(start.elapsed(), Duration::from_millis(280));
        feeder.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_grpc_stream_ends_with_deadline_exceeded_trailers() {
        let (tx, svc) = streaming_through(
            TimeoutLayer::new().idle(Some(Duration::from_millis(100))),
            true,
        );
        let mut body = svc.oneshot(request(true)).await.unwrap().into_body();
        let frame = body.frame().await.unwrap().unwrap();
        let trailers = frame.into_trailers().unwrap();
        assert_eq!(trailers["grpc-status"], "4");
        assert!(trailers["grpc-message"]
            .to_str()
            .unwrap()
            .contains("idle for longer than 100ms"));
        drop(tx);
    }
}
