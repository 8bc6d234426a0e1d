//! Retries: a failed attempt is sent again, to another endpoint when there is
//! one, as long as nothing of its response has reached the client.
//!
//! The decision is taken on the response head only, never later: once the
//! headers of an acceptable response are returned, the body streams to the
//! client and a failure mid-stream ends the stream instead of retrying it, so
//! a retry never duplicates a token. A `grpc-status` can therefore be retried
//! when it is in the response headers (a trailers-only response, as servers
//! send for errors raised before the first message) but not when it arrives
//! in the trailers of a response that has started streaming.
//!
//! Unlike a plain "attempts" counter, every retry also draws from a
//! [`RetryBudget`] shared by the route: retries may add a ratio of the
//! route's requests, plus a small number per second. During an outage, when
//! every attempt fails, the budget keeps the load on the backends near the
//! client's own load instead of multiplying it by the attempt count.
//!
//! ```
//! use std::time::Duration;
//! use infermesh_filters::retry::{RetryBudget, RetryLayer, RetryConditions};
//!
//! let layer = RetryLayer::new(3, RetryBudget::new(0.2, 10))
//!     .conditions(RetryConditions {
//!         statuses: vec![429, 503],
//!         grpc_codes: vec![14],
//!         ..RetryConditions::default()
//!     })
//!     .per_try_timeout(Some(Duration::from_secs(2)));
//! # let _ = layer;
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::Either;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Body;
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use crate::backoff::{Backoff, Jitter};
use crate::body::{BoxBody, BoxError};
use crate::error::ProxyError;
use crate::replay::ReplayBody;

/// Request extension set on a retry: the endpoints earlier attempts went
/// to, which the balancer avoids when it has another choice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TriedEndpoints(pub Vec<SocketAddr>);

/// Response extension naming the endpoint that answered, set when the
/// request asked for it with [`NameServedBy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServedBy(pub SocketAddr);

/// Request extension of an attempt that may be retried: the sender names
/// the endpoint that answered in a [`ServedBy`] on the response, so that a
/// retry can avoid it. A request that is not retried asks for nothing, and
/// its response's extensions stay empty (a first insertion allocates).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameServedBy;

/// What is retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryConditions {
    /// A connection could not be opened.
    pub connect_failure: bool,
    /// The request was refused before processing (refused stream).
    pub refused_stream: bool,
    /// HTTP statuses retried.
    pub statuses: Vec<u16>,
    /// gRPC codes retried when in the response headers.
    pub grpc_codes: Vec<u8>,
}

impl Default for RetryConditions {
    fn default() -> Self {
        Self {
            connect_failure: true,
            refused_stream: true,
            statuses: vec![429, 503],
            grpc_codes: vec![14],
        }
    }
}

/// Retry counters of a route.
#[derive(Debug, Clone, Default)]
pub struct RetryMetrics {
    /// Retries sent.
    pub retried: Counter,
    /// Retries wanted but refused by the budget.
    pub budget_exhausted: Counter,
    /// Retries wanted but the request body was too long to replay.
    pub not_replayable: Counter,
    /// Requests that failed after their last allowed attempt.
    pub attempts_exhausted: Counter,
}

/// A retry budget shared by every request of a route: each request deposits
/// `ratio` of a retry, each retry withdraws one; when the deposits run out,
/// `min_per_second` retries a second are still allowed.
#[derive(Debug)]
pub struct RetryBudget {
    /// Deposits, in thousandths of a retry.
    balance: AtomicI64,
    deposit: i64,
    cap: i64,
    min_per_second: f64,
    reserve: Mutex<(f64, Instant)>,
}

impl RetryBudget {
    /// A budget of `ratio` retries per request plus `min_per_second`.
    pub fn new(ratio: f64, min_per_second: u32) -> Arc<Self> {
        let deposit = (ratio.clamp(0.0, 1.0) * 1000.0) as i64;
        Arc::new(Self {
            balance: AtomicI64::new(0),
            deposit,
            // What 1,000 requests earn: a long healthy period cannot bank a
            // burst of retries larger than that.
            cap: deposit * 1000,
            min_per_second: f64::from(min_per_second),
            reserve: Mutex::new((f64::from(min_per_second), Instant::now())),
        })
    }

    /// Records a request.
    pub fn deposit(&self) {
        let balance = self.balance.fetch_add(self.deposit, Ordering::Relaxed);
        if balance + self.deposit > self.cap {
            self.balance.fetch_sub(self.deposit, Ordering::Relaxed);
        }
    }

    /// Takes one retry from the budget, if there is one.
    pub fn withdraw(&self) -> bool {
        let taken = self
            .balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b >= 1000).then_some(b - 1000)
            })
            .is_ok();
        if taken {
            return true;
        }
        let mut reserve = self.reserve.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(reserve.1).as_secs_f64() * self.min_per_second;
        reserve.0 = (reserve.0 + refill).min(self.min_per_second);
        reserve.1 = now;
        if reserve.0 >= 1.0 {
            reserve.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Configuration of the [`Retry`] filter.
#[derive(Debug, Clone)]
pub struct RetryLayer {
    max_attempts: u32,
    conditions: Arc<RetryConditions>,
    per_try_timeout: Option<Duration>,
    backoff: Backoff,
    max_retry_after: Duration,
    max_replay_bytes: usize,
    keep_body: bool,
    budget: Arc<RetryBudget>,
    metrics: RetryMetrics,
}

impl RetryLayer {
    /// Up to `max_attempts` attempts (the first included), drawing retries
    /// from `budget`; 1 turns retries off.
    pub fn new(max_attempts: u32, budget: Arc<RetryBudget>) -> Self {
        Self {
            max_attempts: max_attempts.max(1),
            conditions: Arc::new(RetryConditions::default()),
            per_try_timeout: None,
            backoff: Backoff::new(
                Duration::from_millis(25),
                Duration::from_secs(1),
                Jitter::Equal,
            ),
            max_retry_after: Duration::from_secs(2),
            max_replay_bytes: 64 * 1024,
            keep_body: false,
            budget,
            metrics: RetryMetrics::default(),
        }
    }

    /// A layer that never retries.
    pub fn disabled() -> Self {
        Self::new(1, RetryBudget::new(0.0, 0))
    }

    /// What is retried.
    pub fn conditions(mut self, conditions: RetryConditions) -> Self {
        self.conditions = Arc::new(conditions);
        self
    }

    /// Limit on each attempt's wait for response headers.
    pub fn per_try_timeout(mut self, limit: Option<Duration>) -> Self {
        self.per_try_timeout = limit;
        self
    }

    /// Exponential back-off: `base` before the first retry, doubling, at most
    /// `max`, each wait drawn between half and all of it ([`Jitter::Equal`]:
    /// never an immediate retry into the failure just seen).
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.backoff = Backoff::new(base, max, Jitter::Equal);
        self
    }

    /// Longest `Retry-After` waited for; a longer one ends the retries.
    pub fn max_retry_after(mut self, limit: Duration) -> Self {
        self.max_retry_after = limit;
        self
    }

    /// Most request-body bytes kept for replay.
    pub fn max_replay_bytes(mut self, limit: usize) -> Self {
        self.max_replay_bytes = limit;
        self
    }

    /// Keeps the request body (up to the replay limit) even when retries
    /// are off, so that a hedging filter below can send copies of it.
    pub fn keep_body(mut self, keep: bool) -> Self {
        self.keep_body = keep;
        self
    }

    /// Counters to update.
    pub fn metrics(mut self, metrics: RetryMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The wait before retry number `retry` (1 for the first), with jitter:
    /// drawn between half and all of the exponential back-off.
    fn backoff_for(&self, retry: u32, draw: f64) -> Duration {
        self.backoff.delay(retry, draw)
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry {
            inner,
            config: Arc::new(self.clone()),
        }
    }
}

/// Retries failed attempts of an inner service per a [`RetryLayer`].
#[derive(Debug, Clone)]
pub struct Retry<S> {
    inner: S,
    config: Arc<RetryLayer>,
}

/// What to do with an attempt's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Give the outcome to the client.
    Return,
    /// Try again, after at least this long (from `Retry-After`).
    Retry(Duration),
}

/// Decides on an attempt's error: only failures that certainly did not
/// reach a server (or a per-try timeout, which exists to be retried).
pub fn decide_error(conditions: &RetryConditions, error: &ProxyError) -> Decision {
    let retry = match error {
        ProxyError::Connect { .. } | ProxyError::NoEndpoint(_) => conditions.connect_failure,
        ProxyError::Upstream { refused, .. } => *refused && conditions.refused_stream,
        _ => false,
    };
    if retry {
        Decision::Retry(Duration::ZERO)
    } else {
        Decision::Return
    }
}

/// Decides on a response head: a listed status, or a listed `grpc-status` in
/// the headers. A `Retry-After` longer than `max_retry_after` returns the
/// response, so the client can honour it.
pub fn decide_response(
    conditions: &RetryConditions,
    status: StatusCode,
    headers: &HeaderMap,
    max_retry_after: Duration,
) -> Decision {
    let listed_status = conditions.statuses.contains(&status.as_u16());
    let listed_grpc = status == StatusCode::OK
        && headers
            .get(crate::grpc::GRPC_STATUS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u8>().ok())
            .is_some_and(|code| conditions.grpc_codes.contains(&code));
    if !listed_status && !listed_grpc {
        return Decision::Return;
    }
    match retry_after(headers) {
        Some(wait) if wait > max_retry_after => Decision::Return,
        Some(wait) => Decision::Retry(wait),
        None => Decision::Retry(Duration::ZERO),
    }
}

/// `Retry-After` in seconds (the HTTP-date form is not used by model servers
/// and is ignored).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    text.trim().parse::<u64>().ok().map(Duration::from_secs)
}

fn endpoint_of_error(error: &ProxyError) -> Option<SocketAddr> {
    match error {
        ProxyError::Connect { endpoint, .. } | ProxyError::Upstream { endpoint, .. } => {
            endpoint.parse().ok()
        }
        _ => None,
    }
}

/// The response future of [`Retry`]: the inner service's own future when
/// the request gets one attempt (retries off, or a body too long to
/// replay), so a route without retries pays no allocation for them.
pub type ResponseFuture<F> = Either<F, Retrying>;

/// The future of a request that may be retried.
pub type Retrying = Pin<Box<dyn Future<Output = Result<Response<BoxBody>, ProxyError>> + Send>>;

impl<S, B> Service<Request<B>> for Retry<S>
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

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let config = self.config.clone();
        // The inner service was made ready for this call; use it for the
        // first attempt and clones for the others.
        let mut first = self.inner.clone();
        std::mem::swap(&mut first, &mut self.inner);
        let (parts, body) = request.into_parts();
        let too_long = body.size_hint().lower() > config.max_replay_bytes as u64;
        if config.max_attempts <= 1 || too_long {
            if too_long && config.max_attempts > 1 {
                config.budget.deposit();
            }
            if config.keep_body && !too_long {
                let (body, _) = ReplayBody::shared(body, config.max_replay_bytes);
                return Either::Left(first.call(Request::from_parts(parts, body)));
            }
            let request = Request::from_parts(parts, ReplayBody::direct(body));
            return Either::Left(first.call(request));
        }
        config.budget.deposit();
        let (body, handle) = ReplayBody::shared(body, config.max_replay_bytes);
        let mut head = parts;
        head.extensions.insert(NameServedBy);
        let mut service = first;
        Either::Right(Box::pin(async move {
            let mut tried = TriedEndpoints::default();
            let mut body = body;
            let mut attempt = 1u32;
            loop {
                let mut request = Request::from_parts(head.clone(), body);
                if !tried.0.is_empty() {
                    request.extensions_mut().insert(tried.clone());
                }
                let call = async {
                    if attempt > 1 {
                        service.ready().await?;
                    }
                    service.call(request).await
                };
                let outcome = match config.per_try_timeout {
                    Some(limit) => match tokio::time::timeout(limit, call).await {
                        Ok(outcome) => outcome,
                        Err(_) => Err(ProxyError::FirstByteTimeout(limit)),
                    },
                    None => call.await,
                };
                let per_try_timed_out = matches!(
                    (&outcome, config.per_try_timeout),
                    (Err(ProxyError::FirstByteTimeout(d)), Some(limit)) if *d == limit
                );
                let (decision, endpoint) = match &outcome {
                    Ok(response) => (
                        decide_response(
                            &config.conditions,
                            response.status(),
                            response.headers(),
                            config.max_retry_after,
                        ),
                        response.extensions().get::<ServedBy>().map(|s| s.0),
                    ),
                    Err(_) if per_try_timed_out => (Decision::Retry(Duration::ZERO), None),
                    Err(error) => (
                        decide_error(&config.conditions, error),
                        endpoint_of_error(error),
                    ),
                };
                let Decision::Retry(after) = decision else {
                    return outcome;
                };
                if attempt >= config.max_attempts {
                    config.metrics.attempts_exhausted.inc();
                    return outcome;
                }
                let Some(next) = handle.next_attempt() else {
                    config.metrics.not_replayable.inc();
                    return outcome;
                };
                if !config.budget.withdraw() {
                    config.metrics.budget_exhausted.inc();
                    return outcome;
                }
                // The failed response is dropped here, before the wait, so
                // its connection is released.
                drop(outcome);
                if let Some(endpoint) = endpoint {
                    if !tried.0.contains(&endpoint) {
                        tried.0.push(endpoint);
                    }
                }
                let wait = config.backoff_for(attempt, fastrand::f64()).max(after);
                tokio::time::sleep(wait).await;
                config.metrics.retried.inc();
                body = next;
                attempt += 1;
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    use http::HeaderValue;
    use http_body_util::{BodyExt, Full};
    use tower::service_fn;

    use crate::body;

    type Handler = Arc<dyn Fn(usize, Bytes) -> Result<Response<BoxBody>, ProxyError> + Send + Sync>;

    /// A service whose `n`-th call (from 0) answers `handler(n, body)`,
    /// counting calls.
    #[allow(clippy::type_complexity)] // an `impl Service` spelled out once
    fn upstream(
        handler: Handler,
    ) -> (
        impl Service<
                Request<ReplayBody<Full<Bytes>>>,
                Response = Response<BoxBody>,
                Error = ProxyError,
                Future = impl Send,
            > + Clone
            + Send
            + 'static,
        Arc<AtomicUsize>,
    ) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let service = service_fn(move |request: Request<ReplayBody<Full<Bytes>>>| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let handler = handler.clone();
            async move {
                let body = request.into_body().collect().await.unwrap().to_bytes();
                handler(n, body)
            }
        });
        (service, calls)
    }

    fn status(code: u16) -> Response<BoxBody> {
        let mut response = Response::new(body::full("x"));
        *response.status_mut() = StatusCode::from_u16(code).unwrap();
        response
    }

    fn connect_error() -> ProxyError {
        ProxyError::connect("10.0.0.1:80", "refused")
    }

    fn request(body: &'static str) -> Request<Full<Bytes>> {
        Request::new(Full::new(Bytes::from_static(body.as_bytes())))
    }

    fn layer(attempts: u32) -> RetryLayer {
        RetryLayer::new(attempts, RetryBudget::new(0.2, 100))
    }

    #[tokio::test(start_paused = true)]
    async fn a_listed_status_is_retried_with_the_same_body() {
        let (service, calls) = upstream(Arc::new(|n, body| {
            assert_eq!(body, "prompt");
            Ok(status(if n < 2 { 503 } else { 200 }))
        }));
        let response = layer(3)
            .layer(service)
            .oneshot(request("prompt"))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unlisted_status_is_not_retried() {
        let (service, calls) = upstream(Arc::new(|_, _| Ok(status(500))));
        let response = layer(3).layer(service).oneshot(request("p")).await.unwrap();
        assert_eq!(response.status(), 500);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connect_failure_is_retried_and_the_endpoint_avoided() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let service = service_fn(move |request: Request<ReplayBody<Full<Bytes>>>| {
            record
                .lock()
                .unwrap()
                .push(request.extensions().get::<TriedEndpoints>().cloned());
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    Err(connect_error())
                } else {
                    Ok(status(200))
                }
            }
        });
        let response = layer(2).layer(service).oneshot(request("p")).await.unwrap();
        assert_eq!(response.status(), 200);
        let seen = seen.lock().unwrap();
        assert_eq!(seen[0], None);
        assert_eq!(
            seen[1],
            Some(TriedEndpoints(vec!["10.0.0.1:80".parse().unwrap()]))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_failure_after_sending_is_not_retried() {
        let (service, calls) = upstream(Arc::new(|_, _| {
            Err(ProxyError::upstream("10.0.0.1:80", "reset", false))
        }));
        let error = layer(3)
            .layer(service)
            .oneshot(request("p"))
            .await
            .unwrap_err();
        assert!(matches!(error, ProxyError::Upstream { .. }));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn grpc_status_in_the_headers_is_retried() {
        let (service, calls) = upstream(Arc::new(|n, _| {
            let mut response = status(200);
            let code = if n == 0 { "14" } else { "0" };
            response
                .headers_mut()
                .insert("grpc-status", HeaderValue::from_static(code));
            Ok(response)
        }));
        let response = layer(3).layer(service).oneshot(request("p")).await.unwrap();
        assert_eq!(response.headers()["grpc-status"], "0");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_is_not_attempted_after_the_response_head() {
        // A stream that fails after its head reaches the caller as it is.
        let (service, calls) = upstream(Arc::new(|_, _| {
            let failing = http_body_util::StreamBody::new(futures_stream());
            Ok(Response::new(BodyExt::boxed_unsync(failing)))
        }));
        let response = layer(3).layer(service).oneshot(request("p")).await.unwrap();
        assert!(response.into_body().collect().await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    type Frames = std::vec::IntoIter<Result<http_body::Frame<Bytes>, BoxError>>;

    fn futures_stream() -> tokio_stream::Iter<Frames> {
        tokio_stream::iter(vec![
            Ok(http_body::Frame::data(Bytes::from_static(b"data: 1\n\n"))),
            Err("reset".into()),
        ])
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured_and_a_long_one_is_passed_on() {
        let (service, calls) = upstream(Arc::new(|n, _| {
            let mut response = status(if n == 0 { 429 } else { 200 });
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            Ok(response)
        }));
        let started = Instant::now();
        let response = layer(3).layer(service).oneshot(request("p")).await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(started.elapsed() >= Duration::from_secs(1));
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        let (service, calls) = upstream(Arc::new(|_, _| {
            let mut response = status(429);
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("30"));
            Ok(response)
        }));
        let response = layer(3).layer(service).oneshot(request("p")).await.unwrap();
        assert_eq!(response.status(), 429);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_attempt_is_abandoned_at_the_per_try_timeout() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let service = service_fn(move |_: Request<ReplayBody<Full<Bytes>>>| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                Ok::<_, ProxyError>(status(200))
            }
        });
        let started = Instant::now();
        let response = layer(2)
            .per_try_timeout(Some(Duration::from_secs(1)))
            .layer(service)
            .oneshot(request("p"))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_longer_than_the_replay_limit_is_not_retried() {
        let (service, calls) = upstream(Arc::new(|_, _| Ok(status(503))));
        let metrics = RetryMetrics::default();
        let response = layer(3)
            .max_replay_bytes(4)
            .metrics(metrics.clone())
            .layer(service)
            .oneshot(request("longer than four"))
            .await
            .unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn under_a_total_outage_the_budget_bounds_the_attempts() {
        let (service, calls) = upstream(Arc::new(|_, _| Err(connect_error())));
        let metrics = RetryMetrics::default();
        let retry = RetryLayer::new(5, RetryBudget::new(0.2, 10))
            .metrics(metrics.clone())
            .layer(service);
        let requests = 1000;
        let started = Instant::now();
        // Concurrent, as an outage meets them: every request is in flight
        // at once, so the per-second minimum cannot hide the ratio.
        futures_util::future::join_all((0..requests).map(|_| retry.clone().oneshot(request("p"))))
            .await;
        let attempts = calls.load(Ordering::SeqCst);
        // Back-off sleeps advance the paused clock; the minimum is allowed
        // for every second that passed.
        let seconds = started.elapsed().as_secs_f64().ceil() + 1.0;
        assert!(
            attempts as f64 <= 1.2 * requests as f64 + 10.0 * seconds,
            "{attempts} attempts for {requests} requests in {seconds}s"
        );
        // Without the budget it would have been 5,000.
        assert!(attempts < 2000, "{attempts}");
        assert!(metrics.budget_exhausted.get() > 0);
    }

    #[test]
    fn the_budget_allows_the_ratio_plus_the_minimum() {
        let budget = RetryBudget::new(0.2, 0);
        for _ in 0..100 {
            budget.deposit();
        }
        let granted = (0..100).filter(|_| budget.withdraw()).count();
        assert_eq!(granted, 20);
        let budget = RetryBudget::new(0.0, 5);
        let granted = (0..100).filter(|_| budget.withdraw()).count();
        assert_eq!(granted, 5);
    }

    #[test]
    fn backoff_grows_exponentially_with_jitter_and_a_cap() {
        let layer = layer(5).backoff(Duration::from_millis(100), Duration::from_millis(350));
        assert_eq!(layer.backoff_for(1, 1.0), Duration::from_millis(100));
        assert_eq!(layer.backoff_for(1, 0.0), Duration::from_millis(50));
        assert_eq!(layer.backoff_for(2, 1.0), Duration::from_millis(200));
        assert_eq!(layer.backoff_for(3, 1.0), Duration::from_millis(350));
        assert_eq!(layer.backoff_for(30, 1.0), Duration::from_millis(350));
    }

    #[test]
    fn decisions_on_response_heads() {
        let conditions = RetryConditions::default();
        let none = HeaderMap::new();
        let max = Duration::from_secs(2);
        assert_eq!(
            decide_response(&conditions, StatusCode::SERVICE_UNAVAILABLE, &none, max),
            Decision::Retry(Duration::ZERO)
        );
        assert_eq!(
            decide_response(&conditions, StatusCode::BAD_GATEWAY, &none, max),
            Decision::Return
        );
        let mut grpc = HeaderMap::new();
        grpc.insert("grpc-status", HeaderValue::from_static("8"));
        assert_eq!(
            decide_response(&conditions, StatusCode::OK, &grpc, max),
            Decision::Return
        );
        grpc.insert("grpc-status", HeaderValue::from_static("14"));
        assert_eq!(
            decide_response(&conditions, StatusCode::OK, &grpc, max),
            Decision::Retry(Duration::ZERO)
        );
    }
}
