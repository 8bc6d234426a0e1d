//! Fault injection for chaos drills: a route can delay a share of its
//! requests, and answer a share with an error of its choosing, without
//! touching the model servers.
//!
//! Each request draws independently, so over many requests the shares come
//! out at the configured percentages (fractions of a percent included). The
//! abort is answered by the proxy itself, before any backend is picked, like
//! any other proxy error: a JSON body with the status for HTTP clients, a
//! trailers-only response with the gRPC status for gRPC clients. Faults sit
//! in front of retries and fallback chains, so an injected abort is what the
//! client sees, as it would see a backend that failed every attempt.
//!
//! ```
//! use std::time::Duration;
//! use http::StatusCode;
//! use infermesh_filters::fault::{Abort, Delay, FaultLayer};
//!
//! let layer = FaultLayer::new("chat")
//!     .delay(Some(Delay { duration: Duration::from_millis(200), percent: 10.0 }))
//!     .abort(Some(Abort::new(Some(StatusCode::SERVICE_UNAVAILABLE), None, 1.5)));
//! # let _ = layer;
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Response, StatusCode};
use pin_project_lite::pin_project;
use prometheus_client::metrics::counter::Counter;
use tokio::time::Sleep;
use tower::{Layer, Service};

use crate::body::BoxBody;
use crate::error::{grpc_code, ProxyError};

/// Delay a share of requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Delay {
    /// How long.
    pub duration: Duration,
    /// Share of requests delayed, 0 to 100.
    pub percent: f64,
}

/// Answer a share of requests with an error.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Abort {
    /// The HTTP status HTTP clients receive.
    pub status: StatusCode,
    /// The gRPC status gRPC clients receive.
    pub grpc: u8,
    /// Share of requests aborted, 0 to 100.
    pub percent: f64,
}

impl Abort {
    /// An abort with an HTTP status, a gRPC status, or both; the one not
    /// given follows from the other (503 and `UNAVAILABLE`, 429 and
    /// `RESOURCE_EXHAUSTED`, 504 and `DEADLINE_EXCEEDED`, ...).
    pub fn new(status: Option<StatusCode>, grpc: Option<u8>, percent: f64) -> Self {
        let (status, grpc) = match (status, grpc) {
            (Some(status), Some(grpc)) => (status, grpc),
            (Some(status), None) => (status, grpc_of_http(status)),
            (None, Some(grpc)) => (http_of_grpc(grpc), grpc),
            (None, None) => (StatusCode::SERVICE_UNAVAILABLE, grpc_code::UNAVAILABLE),
        };
        Self {
            status,
            grpc,
            percent,
        }
    }
}

/// The gRPC status gRPC's HTTP mapping gives an HTTP status.
fn grpc_of_http(status: StatusCode) -> u8 {
    match status.as_u16() {
        400 => grpc_code::INTERNAL,
        401 => 16, // UNAUTHENTICATED
        403 => grpc_code::PERMISSION_DENIED,
        404 => grpc_code::UNIMPLEMENTED,
        429 | 502..=504 => grpc_code::UNAVAILABLE,
        _ => 2, // UNKNOWN
    }
}

/// An HTTP status that says what a gRPC status means.
fn http_of_grpc(code: u8) -> StatusCode {
    match code {
        3 | 9 | 11 => StatusCode::BAD_REQUEST,
        4 => StatusCode::GATEWAY_TIMEOUT,
        5 | 12 => StatusCode::NOT_FOUND,
        7 => StatusCode::FORBIDDEN,
        8 => StatusCode::TOO_MANY_REQUESTS,
        14 => StatusCode::SERVICE_UNAVAILABLE,
        16 => StatusCode::UNAUTHORIZED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Counters of a route's injected faults.
#[derive(Debug, Clone, Default)]
pub struct FaultMetrics {
    /// Requests delayed.
    pub delayed: Counter,
    /// Requests aborted.
    pub aborted: Counter,
}

/// Configuration of the [`Faults`] filter of one route.
#[derive(Debug, Clone)]
pub struct FaultLayer {
    config: Arc<Config>,
}

#[derive(Debug, Clone)]
struct Config {
    route: String,
    delay: Option<Delay>,
    abort: Option<Abort>,
    metrics: FaultMetrics,
}

/// What the draws decided for one request.
#[derive(Debug, Clone)]
pub struct Decision {
    /// Wait this long first.
    pub delay: Option<Duration>,
    /// Then answer with this error instead of sending the request.
    pub abort: Option<ProxyError>,
}

impl FaultLayer {
    /// No faults yet for route `route`.
    pub fn new(route: &str) -> Self {
        Self {
            config: Arc::new(Config {
                route: route.to_owned(),
                delay: None,
                abort: None,
                metrics: FaultMetrics::default(),
            }),
        }
    }

    /// Delays a share of requests.
    pub fn delay(mut self, delay: Option<Delay>) -> Self {
        Arc::make_mut(&mut self.config).delay = delay;
        self
    }

    /// Aborts a share of requests.
    pub fn abort(mut self, abort: Option<Abort>) -> Self {
        Arc::make_mut(&mut self.config).abort = abort;
        self
    }

    /// Counters to update.
    pub fn metrics(mut self, metrics: FaultMetrics) -> Self {
        Arc::make_mut(&mut self.config).metrics = metrics;
        self
    }

    /// The faults for a request, from two draws in `[0, 1)`: a fault with
    /// `percent` p applies when its draw is below p / 100.
    pub fn decide(&self, delay_draw: f64, abort_draw: f64) -> Decision {
        let config = &self.config;
        let hit = |percent: f64, draw: f64| draw * 100.0 < percent;
        Decision {
            delay: config
                .delay
                .filter(|d| hit(d.percent, delay_draw))
                .map(|d| d.duration),
            abort: config
                .abort
                .filter(|a| hit(a.percent, abort_draw))
                .map(|a| ProxyError::FaultInjected {
                    route: config.route.clone(),
                    status: a.status,
                    grpc: a.grpc,
                }),
        }
    }
}

impl<S> Layer<S> for FaultLayer {
    type Service = Faults<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Faults {
            inner,
            layer: self.clone(),
        }
    }
}

/// Delays and aborts requests per a [`FaultLayer`].
#[derive(Debug, Clone)]
pub struct Faults<S> {
    inner: S,
    layer: FaultLayer,
}

impl<S, R> Service<R> for Faults<S>
where
    S: Service<R, Response = Response<BoxBody>, Error = ProxyError> + Clone,
{
    type Response = Response<BoxBody>;
    type Error = ProxyError;
    type Future = ResponseFuture<S, R>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let config = &self.layer.config;
        let draw = |present: bool| if present { fastrand::f64() } else { 1.0 };
        let decision = self
            .layer
            .decide(draw(config.delay.is_some()), draw(config.abort.is_some()));
        if decision.abort.is_some() {
            config.metrics.aborted.inc();
        }
        match decision {
            Decision {
                delay: Some(wait),
                abort,
            } => {
                config.metrics.delayed.inc();
                // The inner service was made ready for this call: keep that
                // one for after the delay.
                let mut ready = self.inner.clone();
                std::mem::swap(&mut ready, &mut self.inner);
                ResponseFuture::Delayed {
                    sleep: tokio::time::sleep(wait),
                    then: Some((ready, request)),
                    abort,
                }
            }
            Decision {
                delay: None,
                abort: Some(error),
            } => ResponseFuture::Aborted { error },
            Decision {
                delay: None,
                abort: None,
            } => ResponseFuture::Called {
                future: self.inner.call(request),
            },
        }
    }
}

pin_project! {
    /// The response future of [`Faults`].
    #[project = Projection]
    pub enum ResponseFuture<S, R>
    where
        S: Service<R>,
    {
        /// Waiting out an injected delay.
        Delayed {
            #[pin]
            sleep: Sleep,
            then: Option<(S, R)>,
            abort: Option<ProxyError>,
        },
        /// Sent on to the inner service.
        Called {
            #[pin]
            future: S::Future,
        },
        /// Answered by an injected abort.
        Aborted { error: ProxyError },
    }
}

impl<S, R> Future for ResponseFuture<S, R>
where
    S: Service<R, Response = Response<BoxBody>, Error = ProxyError>,
{
    type Output = Result<Response<BoxBody>, ProxyError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project() {
                Projection::Called { future } => return future.poll(cx),
                Projection::Aborted { error } => return Poll::Ready(Err(error.clone())),
                Projection::Delayed { sleep, then, abort } => {
                    std::task::ready!(sleep.poll(cx));
                    if let Some(error) = abort.take() {
                        ResponseFuture::Aborted { error }
                    } else {
                        let Some((mut service, request)) = then.take() else {
                            return Poll::Ready(Err(ProxyError::Misconfigured(
                                "fault filter polled after it completed".into(),
                            )));
                        };
                        ResponseFuture::Called {
                            future: service.call(request),
                        }
                    }
                }
            };
            self.set(next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{service_fn, ServiceExt};

    fn ok() -> Response<BoxBody> {
        Response::new(crate::body::empty())
    }

    #[test]
    fn a_fault_applies_when_its_draw_is_below_its_share() {
        let layer = FaultLayer::new("chat")
            .delay(Some(Delay {
                duration: Duration::from_millis(100),
                percent: 25.0,
            }))
            .abort(Some(Abort::new(Some(StatusCode::BAD_GATEWAY), None, 0.5)));
        let decision = layer.decide(0.2499, 0.004);
        assert_eq!(decision.delay, Some(Duration::from_millis(100)));
        assert!(matches!(
            decision.abort,
            Some(ProxyError::FaultInjected { status, grpc: 14, .. }) if status == 502
        ));
        let decision = layer.decide(0.25, 0.005);
        assert!(decision.delay.is_none() && decision.abort.is_none());
        let none = FaultLayer::new("chat").decide(0.0, 0.0);
        assert!(none.delay.is_none() && none.abort.is_none());
        let all = FaultLayer::new("chat").abort(Some(Abort::new(None, Some(8), 100.0)));
        assert!(matches!(
            all.decide(0.0, 0.999_999).abort,
            Some(ProxyError::FaultInjected { status, grpc: 8, .. }) if status == 429
        ));
    }

    #[test]
    fn a_missing_status_follows_from_the_other() {
        assert_eq!(
            Abort::new(Some(StatusCode::GATEWAY_TIMEOUT), None, 1.0).grpc,
            14
        );
        assert_eq!(
            Abort::new(None, Some(4), 1.0).status,
            StatusCode::GATEWAY_TIMEOUT
        );
        let both = Abort::new(Some(StatusCode::INTERNAL_SERVER_ERROR), Some(14), 1.0);
        assert_eq!((both.status.as_u16(), both.grpc), (500, 14));
    }

    #[tokio::test(start_paused = true)]
    async fn a_delayed_request_reaches_the_inner_service_after_the_delay() {
        let layer = FaultLayer::new("chat").delay(Some(Delay {
            duration: Duration::from_secs(2),
            percent: 100.0,
        }));
        let started = tokio::time::Instant::now();
        let reached = Arc::new(std::sync::Mutex::new(None));
        let seen = reached.clone();
        let service = layer.layer(service_fn(move |_: ()| {
            *seen.lock().unwrap() = Some(tokio::time::Instant::now());
            async { Ok::<_, ProxyError>(ok()) }
        }));
        service.oneshot(()).await.unwrap();
        let reached = reached.lock().unwrap().unwrap();
        assert_eq!(reached - started, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn an_aborted_request_never_reaches_the_inner_service() {
        let metrics = FaultMetrics::default();
        let layer = FaultLayer::new("chat")
            .delay(Some(Delay {
                duration: Duration::from_millis(300),
                percent: 100.0,
            }))
            .abort(Some(Abort::new(
                Some(StatusCode::SERVICE_UNAVAILABLE),
                None,
                100.0,
            )))
            .metrics(metrics.clone());
        let started = tokio::time::Instant::now();
        let service = layer.layer(service_fn(|_: ()| async {
            panic!("an aborted request reached the backend");
            #[allow(unreachable_code)]
            Ok::<_, ProxyError>(ok())
        }));
        let error = service.oneshot(()).await.unwrap_err();
        assert_eq!(error.http_status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        assert_eq!((metrics.delayed.get(), metrics.aborted.get()), (1, 1));
    }
}
