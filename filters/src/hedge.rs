//! Hedging: when an attempt has not started a response within a delay, a
//! copy of the request goes to another endpoint, and the first response
//! head to arrive wins; the other attempts are dropped, which cancels them
//! upstream (HTTP/2 `RST_STREAM`, or the HTTP/1.1 connection is closed).
//!
//! It cuts the tail of a backend whose endpoints are sometimes slow (a
//! replica busy with a long prompt, a garbage collection) without waiting
//! for a timeout, as a retry would. It differs from a retry in that the
//! slow attempt keeps running, so a hedge costs load: it is opt-in, and a
//! hedge is sent only while nothing of any response has reached the client
//! and only when the whole request body has been read and kept (a copy of
//! the replay buffer, see [`crate::replay`]). A large upload, or a request
//! body still streaming in, is never hedged.
//!
//! The filter sits below the retry filter: each attempt the retry filter
//! makes may be hedged, and the winner's head is what the retry filter
//! judges.
//!
//! ```
//! use std::time::Duration;
//! use infermesh_filters::hedge::HedgeLayer;
//!
//! let layer = HedgeLayer::new(Duration::from_millis(100), 1);
//! # let _ = layer;
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::Either;
use http::{Request, Response};
use http_body::Body;
use prometheus_client::metrics::counter::Counter;
use tower::{Layer, Service, ServiceExt};

use crate::body::{BoxBody, BoxError};
use crate::error::ProxyError;
use crate::replay::ReplayBody;

/// Request extension shared by an attempt and its hedges: the endpoints
/// they went to, which the balancer avoids for the next hedge.
#[derive(Debug, Clone, Default)]
pub struct HedgeGroup(Arc<Mutex<Vec<SocketAddr>>>);

impl HedgeGroup {
    /// Endpoints the group's attempts went to so far.
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records that one attempt of the group went to `endpoint`.
    pub fn dispatched(&self, endpoint: SocketAddr) {
        let mut endpoints = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !endpoints.contains(&endpoint) {
            endpoints.push(endpoint);
        }
    }
}

/// Hedging counters of a route.
#[derive(Debug, Clone, Default)]
pub struct HedgeMetrics {
    /// Hedges sent.
    pub sent: Counter,
    /// Hedges whose response head arrived first.
    pub won: Counter,
}

/// Configuration of the [`Hedge`] filter.
#[derive(Debug, Clone)]
pub struct HedgeLayer {
    delay: Option<Duration>,
    max_hedges: u32,
    metrics: HedgeMetrics,
}

impl HedgeLayer {
    /// Sends up to `max_hedges` hedges, one each `delay` without a response
    /// head.
    pub fn new(delay: Duration, max_hedges: u32) -> Self {
        Self {
            delay: Some(delay),
            max_hedges,
            metrics: HedgeMetrics::default(),
        }
    }

    /// A layer that never hedges.
    pub fn disabled() -> Self {
        Self {
            delay: None,
            max_hedges: 0,
            metrics: HedgeMetrics::default(),
        }
    }

    /// Counters to update.
    pub fn metrics(mut self, metrics: HedgeMetrics) -> Self {
        self.metrics = metrics;
        self
    }
}

impl<S> Layer<S> for HedgeLayer {
    type Service = Hedge<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Hedge {
            inner,
            config: Arc::new(self.clone()),
        }
    }
}

/// Hedges slow attempts of an inner service per a [`HedgeLayer`].
#[derive(Debug, Clone)]
pub struct Hedge<S> {
    inner: S,
    config: Arc<HedgeLayer>,
}

/// The response future of [`Hedge`]: the inner service's own future when
/// the request is not hedged (hedging off, or a body that cannot be
/// copied), so a route without hedging pays no allocation for it.
pub type ResponseFuture<F> = Either<F, Hedging>;

/// The future of a request that may be hedged.
pub type Hedging = Pin<Box<dyn Future<Output = Result<Response<BoxBody>, ProxyError>> + Send>>;

/// What woke the hedging loop.
enum Event {
    /// Attempt number `.0` (0 for the original) finished.
    Done(usize, Result<Response<BoxBody>, ProxyError>),
    /// The delay passed with no response head.
    Delay,
}

impl<S, B> Service<Request<ReplayBody<B>>> for Hedge<S>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<BoxBody>, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<BoxBody>;
    type Error = ProxyError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReplayBody<B>>) -> Self::Future {
        let mut first = self.inner.clone();
        std::mem::swap(&mut first, &mut self.inner);
        let (Some(delay), Some(copies)) = (self.config.delay, request.body().copies()) else {
            return Either::Left(first.call(request));
        };
        let config = self.config.clone();
        let (mut parts, body) = request.into_parts();
        parts.extensions.insert(HedgeGroup::default());
        let head = parts.clone();
        let mut service = first.clone();
        let mut attempts: Vec<(usize, Pin<Box<S::Future>>)> =
            vec![(0, Box::pin(first.call(Request::from_parts(parts, body))))];
        Either::Right(Box::pin(async move {
            let mut timer = Box::pin(tokio::time::sleep(delay));
            let mut hedges = 0u32;
            let mut may_hedge = config.max_hedges > 0;
            loop {
                let event = std::future::poll_fn(|cx| {
                    for i in 0..attempts.len() {
                        if let Poll::Ready(outcome) = attempts[i].1.as_mut().poll(cx) {
                            let (number, _) = attempts.swap_remove(i);
                            return Poll::Ready(Event::Done(number, outcome));
                        }
                    }
                    if may_hedge && timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Event::Delay);
                    }
                    Poll::Pending
                })
                .await;
                match event {
                    Event::Done(number, Ok(response)) => {
                        if number > 0 {
                            config.metrics.won.inc();
                        }
                        // Dropping the other attempts cancels them.
                        return Ok(response);
                    }
                    Event::Done(_, Err(error)) => {
                        // Another attempt may still answer; with none left,
                        // the failure goes up to the retry filter, which
                        // decides whether a new attempt is worth it.
                        if attempts.is_empty() {
                            return Err(error);
                        }
                    }
                    Event::Delay => {
                        let Some(body) = copies.copy() else {
                            // The body is still streaming in, or too long
                            // to keep: this request is not hedged.
                            may_hedge = false;
                            continue;
                        };
                        service.ready().await?;
                        let request = Request::from_parts(head.clone(), body);
                        hedges += 1;
                        attempts.push((hedges as usize, Box::pin(service.call(request))));
                        config.metrics.sent.inc();
                        may_hedge = hedges < config.max_hedges;
                        timer
                            .as_mut()
                            .reset(crate::timeout::deadline(tokio::time::Instant::now(), delay));
                    }
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::StatusCode;
    use http_body_util::{BodyExt, Full};
    use tower::service_fn;

    use crate::body;

    /// Drops count their attempt as cancelled unless disarmed.
    struct Cancelled(Arc<AtomicUsize>, bool);

    impl Drop for Cancelled {
        fn drop(&mut self) {
            if self.1 {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// An upstream whose `n`-th call (from 0) answers after `delays[n]`
    /// with the attempt number in `x-attempt`, recording each call's body
    /// and its hedge group's endpoints.
    #[allow(clippy::type_complexity)]
    fn upstream(
        delays: Vec<Duration>,
    ) -> (
        impl Service<
                Request<ReplayBody<Full<Bytes>>>,
                Response = Response<BoxBody>,
                Error = ProxyError,
                Future = impl Send,
            > + Clone
            + Send
            + 'static,
        Arc<Mutex<Vec<Bytes>>>,
        Arc<AtomicUsize>,
    ) {
        let calls = Arc::new(AtomicUsize::new(0));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let cancelled = Arc::new(AtomicUsize::new(0));
        let (seen, dropped) = (bodies.clone(), cancelled.clone());
        let service = service_fn(move |request: Request<ReplayBody<Full<Bytes>>>| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            let delay = delays[n.min(delays.len() - 1)];
            let (seen, dropped) = (seen.clone(), dropped.clone());
            if let Some(group) = request.extensions().get::<HedgeGroup>() {
                group.dispatched(SocketAddr::from(([10, 0, 0, n as u8], 80)));
            }
            async move {
                let mut guard = Cancelled(dropped, true);
                let body = request.into_body().collect().await.unwrap().to_bytes();
                seen.lock().unwrap().push(body);
                tokio::time::sleep(delay).await;
                guard.1 = false;
                let mut response = Response::new(body::full("x"));
                response
                    .headers_mut()
                    .insert("x-attempt", n.to_string().parse().unwrap());
                Ok::<_, ProxyError>(response)
            }
        });
        (service, bodies, cancelled)
    }

    fn request() -> Request<ReplayBody<Full<Bytes>>> {
        let (body, _) = ReplayBody::shared(Full::new(Bytes::from_static(b"prompt")), 1024);
        Request::new(body)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_attempt_is_hedged_and_the_first_head_wins() {
        let (service, bodies, cancelled) = upstream(vec![ms(1000), ms(10)]);
        let metrics = HedgeMetrics::default();
        let started = tokio::time::Instant::now();
        let response = HedgeLayer::new(ms(100), 1)
            .metrics(metrics.clone())
            .layer(service)
            .oneshot(request())
            .await
            .unwrap();
        assert_eq!(response.headers()["x-attempt"], "1");
        assert!(started.elapsed() < ms(200), "{:?}", started.elapsed());
        assert_eq!(metrics.sent.get(), 1);
        assert_eq!(metrics.won.get(), 1);
        assert_eq!(cancelled.load(Ordering::SeqCst), 1, "the loser is dropped");
        let bodies = bodies.lock().unwrap();
        assert_eq!(*bodies, ["prompt", "prompt"], "both carried the whole body");
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_attempt_is_not_hedged() {
        let (service, bodies, _) = upstream(vec![ms(50)]);
        let metrics = HedgeMetrics::default();
        let response = HedgeLayer::new(ms(100), 1)
            .metrics(metrics.clone())
            .layer(service)
            .oneshot(request())
            .await
            .unwrap();
        assert_eq!(response.headers()["x-attempt"], "0");
        assert_eq!(metrics.sent.get(), 0);
        assert_eq!(bodies.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_original_can_still_win_over_its_hedge() {
        let (service, _, cancelled) = upstream(vec![ms(150), ms(1000)]);
        let metrics = HedgeMetrics::default();
        let response = HedgeLayer::new(ms(100), 1)
            .metrics(metrics.clone())
            .layer(service)
            .oneshot(request())
            .await
            .unwrap();
        assert_eq!(response.headers()["x-attempt"], "0");
        assert_eq!((metrics.sent.get(), metrics.won.get()), (1, 0));
        assert_eq!(cancelled.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn hedges_stop_at_the_maximum_and_avoid_earlier_endpoints() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let calls = Arc::new(AtomicUsize::new(0));
        let service = service_fn(move |request: Request<ReplayBody<Full<Bytes>>>| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            let group = request.extensions().get::<HedgeGroup>().cloned().unwrap();
            record.lock().unwrap().push(group.endpoints());
            group.dispatched(SocketAddr::from(([10, 0, 0, n as u8], 80)));
            async move {
                request.into_body().collect().await.unwrap();
                tokio::time::sleep(if n == 2 { ms(50) } else { ms(10_000) }).await;
                Ok::<_, ProxyError>(Response::new(body::empty()))
            }
        });
        let metrics = HedgeMetrics::default();
        let started = tokio::time::Instant::now();
        HedgeLayer::new(ms(100), 2)
            .metrics(metrics.clone())
            .layer(service)
            .oneshot(request())
            .await
            .unwrap();
        assert_eq!(metrics.sent.get(), 2);
        assert!(started.elapsed() < ms(300));
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3);
        assert!(seen[0].is_empty());
        assert_eq!(seen[2].len(), 2, "the second hedge knows where both went");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_is_not_kept_is_never_hedged() {
        let (service, bodies, _) = upstream(vec![ms(500)]);
        let metrics = HedgeMetrics::default();
        let request = Request::new(ReplayBody::direct(Full::new(Bytes::from_static(b"p"))));
        HedgeLayer::new(ms(100), 1)
            .metrics(metrics.clone())
            .layer(service)
            .oneshot(request)
            .await
            .unwrap();
        assert_eq!(metrics.sent.get(), 0);
        assert_eq!(bodies.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_attempt_waits_for_its_hedge() {
        let calls = Arc::new(AtomicUsize::new(0));
        let service = service_fn(move |request: Request<ReplayBody<Full<Bytes>>>| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                request.into_body().collect().await.unwrap();
                if n == 0 {
                    tokio::time::sleep(ms(150)).await;
                    Err(ProxyError::upstream("10.0.0.1:80", "reset", false))
                } else {
                    tokio::time::sleep(ms(100)).await;
                    let mut response = Response::new(body::empty());
                    *response.status_mut() = StatusCode::ACCEPTED;
                    Ok(response)
                }
            }
        });
        let response = HedgeLayer::new(ms(100), 1)
            .layer(service)
            .oneshot(request())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
}
