//! Mirroring: a shadow copy of a share of a route's requests goes to another
//! backend, to try a new model server on real traffic without its answers
//! reaching anyone.
//!
//! The copy is sent from a task of its own and its response is read to the
//! end and dropped, so the primary request never waits for it: a slow or
//! failing mirror cannot slow or fail the client. Copies in flight are
//! capped per route; past the cap a copy is dropped (and counted) rather
//! than queued, so a stalled mirror cannot pile up memory either.
//!
//! Only requests whose whole body the proxy holds can be copied: the proxy
//! reads bodies up to its replay limit before sending, and attaches them as
//! a [`BodyCopy`]; a longer body is not mirrored. The copy is the client's
//! request as it came (method, path, headers and body byte for byte) plus
//! the header `x-infermesh-mirror: 1`; a request that already carries that
//! header is never mirrored again, so two mirroring proxies cannot loop.
//!
//! ```
//! use std::time::Duration;
//! use infermesh_filters::mirror::MirrorLayer;
//! # use infermesh_filters::mirror::BodyCopy;
//! # use infermesh_filters::{BoxBody, ProxyError};
//! # let sender = tower::service_fn(|_: http::Request<BodyCopy>| async {
//! #     Ok::<_, ProxyError>(http::Response::new(infermesh_filters::body::empty()))
//! # });
//!
//! // `sender` sends a copy to the mirror backend.
//! let layer = MirrorLayer::new(sender, 10.0, 100, Duration::from_secs(10));
//! # let _ = layer;
//! ```

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::Semaphore;
use tower::{Layer, Service, ServiceExt};

use crate::body::BoxBody;
use crate::error::ProxyError;

/// The header that marks a shadow copy.
pub const MIRROR_HEADER: HeaderName = HeaderName::from_static("x-infermesh-mirror");

/// Request extension: the request's whole body, as the client sent it, when
/// the proxy holds all of it.
#[derive(Debug, Clone, Default)]
pub struct BodyCopy {
    /// The body's chunks, in order.
    pub chunks: Vec<Bytes>,
    /// The body's trailers, if it had any.
    pub trailers: Option<HeaderMap>,
}

/// Counters of a route's mirror.
#[derive(Debug, Clone, Default)]
pub struct MirrorMetrics {
    /// Copies the mirror answered (any status below 500).
    pub sent: Counter,
    /// Copies that failed: no response, a 5xx, or past the time limit.
    pub failed: Counter,
    /// Copies not sent because the route had its cap of copies in flight.
    pub dropped: Counter,
    /// Requests picked for mirroring whose body the proxy did not hold whole.
    pub not_replayable: Counter,
}

/// Configuration of the [`Mirror`] filter of one route: the service that
/// sends copies to the mirror backend, and the share to copy.
#[derive(Debug, Clone)]
pub struct MirrorLayer<M> {
    sender: M,
    config: Arc<Config>,
}

#[derive(Debug)]
struct Config {
    percent: f64,
    timeout: Duration,
    slots: Arc<Semaphore>,
    metrics: MirrorMetrics,
}

impl<M> MirrorLayer<M> {
    /// Copies `percent` (0 to 100) of requests through `sender`, at most
    /// `max_in_flight` at a time, each given `timeout` to be answered whole.
    pub fn new(sender: M, percent: f64, max_in_flight: usize, timeout: Duration) -> Self {
        Self::with_metrics(
            sender,
            percent,
            max_in_flight,
            timeout,
            MirrorMetrics::default(),
        )
    }

    /// The same, counting into `metrics`.
    pub fn with_metrics(
        sender: M,
        percent: f64,
        max_in_flight: usize,
        timeout: Duration,
        metrics: MirrorMetrics,
    ) -> Self {
        Self {
            sender,
            config: Arc::new(Config {
                percent,
                timeout,
                slots: Arc::new(Semaphore::new(max_in_flight)),
                metrics,
            }),
        }
    }
}

impl<S, M: Clone> Layer<S> for MirrorLayer<M> {
    type Service = Mirror<S, M>;

    fn layer(&self, inner: S) -> Self::Service {
        Mirror {
            inner,
            sender: self.sender.clone(),
            config: self.config.clone(),
        }
    }
}

/// Sends shadow copies of requests per a [`MirrorLayer`], then the request
/// itself to the inner service, unchanged.
#[derive(Debug, Clone)]
pub struct Mirror<S, M> {
    inner: S,
    sender: M,
    config: Arc<Config>,
}

/// The shadow copy of a request: its head with the mirror header, and its body.
pub fn shadow_of<B>(request: &Request<B>, body: BodyCopy) -> Request<BodyCopy> {
    let mut copy = Request::new(body);
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy.headers_mut()
        .insert(MIRROR_HEADER, HeaderValue::from_static("1"));
    // The copy is an attempt of the same request in its trace.
    if let Some(trace) = request.extensions().get::<crate::trace::RequestTrace>() {
        copy.extensions_mut().insert(trace.clone());
    }
    copy
}

impl<S, M, B> Service<Request<B>> for Mirror<S, M>
where
    S: Service<Request<B>>,
    M: Service<Request<BodyCopy>, Response = Response<BoxBody>, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    M::Future: Send,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let config = &self.config;
        let picked = fastrand::f64() * 100.0 < config.percent
            && !request.headers().contains_key(MIRROR_HEADER);
        if picked {
            match request.extensions().get::<BodyCopy>() {
                None => {
                    config.metrics.not_replayable.inc();
                }
                Some(body) => match config.slots.clone().try_acquire_owned() {
                    Err(_) => {
                        config.metrics.dropped.inc();
                    }
                    Ok(slot) => {
                        let copy = shadow_of(&request, body.clone());
                        let sender = self.sender.clone();
                        let config = config.clone();
                        tokio::spawn(async move {
                            let _slot = slot;
                            let answered =
                                tokio::time::timeout(config.timeout, send_and_drain(sender, copy))
                                    .await;
                            let outcome = match answered {
                                Ok(true) => &config.metrics.sent,
                                Ok(false) | Err(_) => &config.metrics.failed,
                            };
                            outcome.inc();
                        });
                    }
                },
            }
        }
        self.inner.call(request)
    }
}

/// Sends the copy and reads its response to the end, frame by frame;
/// whether the mirror answered without a server error.
async fn send_and_drain<M>(sender: M, copy: Request<BodyCopy>) -> bool
where
    M: Service<Request<BodyCopy>, Response = Response<BoxBody>, Error = ProxyError>,
{
    let Ok(response) = sender.oneshot(copy).await else {
        return false;
    };
    let ok = !response.status().is_server_error();
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            return false;
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tower::service_fn;

    type Seen = Arc<Mutex<Vec<Request<BodyCopy>>>>;

    /// A mirror that records each copy and answers after `delay`.
    fn recording_mirror(
        delay: Duration,
    ) -> (
        impl Service<
                Request<BodyCopy>,
                Response = Response<BoxBody>,
                Error = ProxyError,
                Future = impl Send,
            > + Clone
            + Send
            + 'static,
        Seen,
    ) {
        let seen: Seen = Arc::default();
        let record = seen.clone();
        let mirror = service_fn(move |copy: Request<BodyCopy>| {
            record.lock().unwrap().push(copy);
            async move {
                tokio::time::sleep(delay).await;
                Ok::<_, ProxyError>(Response::new(crate::body::full("ignored")))
            }
        });
        (mirror, seen)
    }

    fn primary() -> impl Service<Request<()>, Response = &'static str, Error = ProxyError> + Clone {
        service_fn(|_: Request<()>| async { Ok::<_, ProxyError>("primary") })
    }

    fn request_with_body() -> Request<()> {
        let mut request = Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(())
            .unwrap();
        request.extensions_mut().insert(BodyCopy {
            chunks: vec![
                Bytes::from_static(b"{\"model\":"),
                Bytes::from_static(b"\"m\"}"),
            ],
            trailers: None,
        });
        request
    }

    #[tokio::test(start_paused = true)]
    async fn the_copy_carries_the_marker_and_the_primary_does_not_wait_for_it() {
        let (mirror, seen) = recording_mirror(Duration::from_secs(2));
        let metrics = MirrorMetrics::default();
        let layer =
            MirrorLayer::with_metrics(mirror, 100.0, 10, Duration::from_secs(10), metrics.clone());
        let started = tokio::time::Instant::now();
        let answer = layer.layer(primary()).oneshot(request_with_body()).await;
        assert_eq!(answer.unwrap(), "primary");
        assert_eq!(started.elapsed(), Duration::ZERO);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].headers()[MIRROR_HEADER], "1");
        assert_eq!(seen[0].headers()["content-type"], "application/json");
        assert_eq!(seen[0].uri(), "/v1/chat/completions");
        assert_eq!(seen[0].body().chunks.concat(), b"{\"model\":\"m\"}");
        assert_eq!(metrics.sent.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn copies_past_the_cap_are_dropped_and_slow_ones_fail() {
        let (mirror, seen) = recording_mirror(Duration::from_secs(60));
        let metrics = MirrorMetrics::default();
        let layer =
            MirrorLayer::with_metrics(mirror, 100.0, 2, Duration::from_secs(5), metrics.clone());
        for _ in 0..5 {
            layer
                .layer(primary())
                .oneshot(request_with_body())
                .await
                .unwrap();
        }
        tokio::task::yield_now().await;
        assert_eq!(seen.lock().unwrap().len(), 2);
        assert_eq!(metrics.dropped.get(), 3);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(metrics.failed.get(), 2);
        // The slots are free again.
        layer
            .layer(primary())
            .oneshot(request_with_body())
            .await
            .unwrap();
        tokio::task::yield_now().await;
        assert_eq!(seen.lock().unwrap().len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn bodies_not_held_whole_and_copies_are_not_mirrored() {
        let (mirror, seen) = recording_mirror(Duration::ZERO);
        let metrics = MirrorMetrics::default();
        let layer =
            MirrorLayer::with_metrics(mirror, 100.0, 10, Duration::from_secs(5), metrics.clone());
        layer
            .layer(primary())
            .oneshot(Request::new(()))
            .await
            .unwrap();
        let mut copy = request_with_body();
        copy.headers_mut()
            .insert(MIRROR_HEADER, HeaderValue::from_static("1"));
        layer.layer(primary()).oneshot(copy).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(seen.lock().unwrap().is_empty());
        assert_eq!(metrics.not_replayable.get(), 1);
        let none = MirrorLayer::new(
            recording_mirror(Duration::ZERO).0,
            0.0,
            10,
            Duration::from_secs(1),
        );
        none.layer(primary())
            .oneshot(request_with_body())
            .await
            .unwrap();
    }
}
