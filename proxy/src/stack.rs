//! The filter stack of a route, assembled in one place.
//!
//! Each route gets its own stack, built when the snapshot is compiled, so no
//! policy is parsed per request. Layers run outermost first. A route has two
//! parts: its front ([`RouteFront`]: rate limits, faults, mirror), which a
//! request passes once, and its layers ([`RouteLayers`]: timeouts, retries,
//! hedging), built once and put over each target's backend, so that every
//! target and fallback link has a [`RouteStack`] whose innermost `Forward`
//! names the backend it serves: no request carries its backend around.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::HeaderName;
use http::{Request, Response, StatusCode};
use infermesh_filters::fault::{Abort, Delay, FaultLayer, FaultMetrics};
use infermesh_filters::hedge::{Hedge, HedgeLayer, HedgeMetrics};
use infermesh_filters::mirror::{BodyCopy, MirrorLayer, MirrorMetrics};
use infermesh_filters::rate_limit::{Limit, LimitKey, Rate, RateLimitLayer, RateLimitMetrics};
use infermesh_filters::replay::ReplayBody;
use infermesh_filters::retry::{Retry, RetryBudget, RetryConditions, RetryLayer, RetryMetrics};
use infermesh_filters::timeout::{Timeout, TimeoutLayer};
use infermesh_filters::{BoxBody, ProxyError};
use infermesh_proto::policy::{
    FaultPolicy, HedgePolicy, ModelRouteSpec, RateLimitKey, RateLimitPolicy, RetryPolicy,
    RouteTimeouts,
};
use tower::layer::util::{Identity, Stack};
use tower::util::Either;
use tower::{Layer, Service, ServiceBuilder};

use crate::backend::Backend;
use crate::body::ProxyBody;
use crate::forward::Forward;
use crate::metrics::{
    FaultLabels, HedgeLabels, Metrics, MirrorLabels, Name, RateLimitedLabels, RetryLabels,
    TokenChargeLabels,
};

/// The concrete stack type of a route target: its route's layers over the
/// target's backend.
pub type RouteStack = Timeout<Retry<Hedge<Forward>>>;

/// A route's layers, built once per route and shared by every target's
/// stack (clones share the retry budget and metric handles).
pub type RouteLayers = Stack<HedgeLayer, Stack<RetryLayer, Stack<TimeoutLayer, Identity>>>;

/// The stack of one route target: the route's layers over `backend`.
pub fn target_stack(layers: &RouteLayers, backend: Arc<Backend>) -> RouteStack {
    layers.layer(Forward::to(backend))
}

/// Builds a route's layers from its policy.
pub fn route_layers(
    route: &Name,
    timeouts: &RouteTimeouts,
    retries: Option<&RetryPolicy>,
    hedging: Option<&HedgePolicy>,
    metrics: &Metrics,
) -> RouteLayers {
    ServiceBuilder::new()
        // Outermost, so the limits cover the request as the client sees it,
        // including the wait for an endpoint and a connection, and every
        // retry with its back-off.
        .layer(
            TimeoutLayer::new()
                .first_byte(timeouts.first_byte)
                .idle(timeouts.idle)
                .total(timeouts.total),
        )
        // Above the balancer, so each attempt picks an endpoint again; it
        // keeps the request body, which hedging copies.
        .layer(retry_layer(route, retries, metrics).keep_body(hedging.is_some()))
        // Below retries, so each attempt may be hedged and the retry filter
        // judges the winner's head; above the balancer, so a hedge picks
        // another endpoint.
        .layer(hedge_layer(route, hedging, metrics))
        // Below them all, each target's Forward balances over its backend's
        // endpoints and sends on a pooled connection (see `target_stack`).
        .into_inner()
}

fn hedge_layer(route: &Name, policy: Option<&HedgePolicy>, metrics: &Metrics) -> HedgeLayer {
    let Some(policy) = policy else {
        return HedgeLayer::disabled();
    };
    let counter = |outcome| {
        metrics
            .hedges
            .get_or_create(&HedgeLabels {
                route: route.clone(),
                outcome,
            })
            .clone()
    };
    HedgeLayer::new(policy.delay, policy.max_hedges).metrics(HedgeMetrics {
        sent: counter("sent"),
        won: counter("won"),
    })
}

fn retry_layer(route: &Name, policy: Option<&RetryPolicy>, metrics: &Metrics) -> RetryLayer {
    let Some(policy) = policy else {
        return RetryLayer::disabled();
    };
    let counter = |outcome| {
        metrics
            .retries
            .get_or_create(&RetryLabels {
                route: route.clone(),
                outcome,
            })
            .clone()
    };
    // The budget lives as long as the route's stack: a new snapshot with
    // the same route starts a new budget.
    let budget = RetryBudget::new(policy.budget.ratio, policy.budget.min_per_second);
    RetryLayer::new(policy.max_attempts, budget)
        .conditions(RetryConditions {
            connect_failure: policy.on.connect_failure,
            refused_stream: policy.on.refused_stream,
            statuses: policy.on.statuses.clone(),
            grpc_codes: policy.on.grpc_codes.iter().map(|c| c.code()).collect(),
        })
        .per_try_timeout(policy.per_try_timeout)
        .backoff(policy.backoff_base, policy.backoff_max)
        .max_retry_after(policy.max_retry_after)
        .max_replay_bytes(policy.max_replay_bytes as usize)
        .metrics(RetryMetrics {
            retried: counter("retried"),
            budget_exhausted: counter("budget_exhausted"),
            not_replayable: counter("not_replayable"),
            attempts_exhausted: counter("attempts_exhausted"),
        })
}

/// The layers a request passes once, before its route's backend and any
/// fallback link: rate limits, faults, mirror. `None` for a route that has
/// none, so a plain route pays nothing for them.
pub type RouteFront = ServiceBuilder<
    Stack<
        Either<MirrorLayer<MirrorSend>, Identity>,
        Stack<Either<FaultLayer, Identity>, Stack<Either<RateLimitLayer, Identity>, Identity>>,
    >,
>;

/// Builds a route's front layers from its policy; `mirror_to` is the
/// mirror's backend, looked up in the snapshot.
pub fn route_front(
    route: &Name,
    spec: &ModelRouteSpec,
    mirror_to: Option<Arc<Backend>>,
    metrics: &Metrics,
) -> Option<RouteFront> {
    if spec.rate_limits.is_empty() && spec.faults.is_none() && mirror_to.is_none() {
        return None;
    }
    let rate_limits =
        (!spec.rate_limits.is_empty()).then(|| rate_limit_layer(route, &spec.rate_limits, metrics));
    let faults = spec
        .faults
        .as_ref()
        .map(|faults| fault_layer(route, faults, metrics));
    let mirror = spec
        .mirror
        .as_ref()
        .zip(mirror_to)
        .map(|(policy, backend)| {
            let counter = |outcome| {
                metrics
                    .mirrored
                    .get_or_create(&MirrorLabels {
                        route: route.clone(),
                        outcome,
                    })
                    .clone()
            };
            MirrorLayer::with_metrics(
                MirrorSend(backend),
                policy.percent,
                policy.max_in_flight as usize,
                policy.timeout,
                MirrorMetrics {
                    sent: counter("sent"),
                    failed: counter("failed"),
                    dropped: counter("dropped"),
                    not_replayable: counter("not_replayable"),
                },
            )
        });
    Some(
        ServiceBuilder::new()
            // First, so a refused request costs nothing further and is
            // neither delayed, aborted nor copied.
            .option_layer(rate_limits)
            // Before the mirror: an aborted request reaches no backend at all.
            .option_layer(faults)
            // Last, right before the route's backend is called, which it
            // never waits for.
            .option_layer(mirror),
    )
}

fn rate_limit_layer(
    route: &Name,
    policies: &[RateLimitPolicy],
    metrics: &Metrics,
) -> RateLimitLayer {
    let limits = policies
        .iter()
        .map(|policy| Limit {
            key: match &policy.key {
                RateLimitKey::Route => LimitKey::Route,
                RateLimitKey::Caller => LimitKey::Caller,
                // Validated when the policy loaded.
                RateLimitKey::Header(name) => HeaderName::from_bytes(name.as_bytes())
                    .map_or(LimitKey::Route, LimitKey::Header),
            },
            requests: policy.requests_per_second.map(|rate| {
                let burst = policy.burst.map_or(rate.ceil(), f64::from);
                Rate::per_second(rate, burst)
            }),
            tokens: policy.tokens_per_minute.map(|rate| {
                let burst = policy.token_burst.unwrap_or(rate);
                Rate::per_minute(rate as f64, burst as f64)
            }),
            max_keys: policy.max_keys as usize,
        })
        .collect();
    let limited = |kind| {
        metrics
            .rate_limited
            .get_or_create(&RateLimitedLabels {
                route: route.clone(),
                kind,
            })
            .clone()
    };
    let tokens = |stage| {
        metrics
            .rate_limit_tokens
            .get_or_create(&TokenChargeLabels {
                route: route.clone(),
                stage,
            })
            .clone()
    };
    RateLimitLayer::with_metrics(
        route.as_str(),
        limits,
        RateLimitMetrics {
            limited_requests: limited("requests"),
            limited_tokens: limited("tokens"),
            tokens_estimated: tokens("estimated"),
            tokens_refunded: tokens("refunded"),
            tokens_added: tokens("added"),
        },
    )
}

fn fault_layer(route: &Name, policy: &FaultPolicy, metrics: &Metrics) -> FaultLayer {
    let counter = |kind| {
        metrics
            .faults
            .get_or_create(&FaultLabels {
                route: route.clone(),
                kind,
            })
            .clone()
    };
    FaultLayer::new(route.as_str())
        .delay(policy.delay.as_ref().map(|d| Delay {
            duration: d.duration,
            percent: d.percent,
        }))
        .abort(policy.abort.as_ref().map(|a| {
            Abort::new(
                a.status.and_then(|s| StatusCode::from_u16(s).ok()),
                a.grpc_status.map(|c| c.code()),
                a.percent,
            )
        }))
        .metrics(FaultMetrics {
            delayed: counter("delay"),
            aborted: counter("abort"),
        })
}

/// Sends a mirror's copies to its backend: balanced and pooled like any
/// request, with no retries.
#[derive(Debug, Clone)]
pub struct MirrorSend(Arc<Backend>);

impl Service<Request<BodyCopy>> for MirrorSend {
    type Response = Response<BoxBody>;
    type Error = ProxyError;
    type Future = <Forward as Service<Request<ReplayBody<ProxyBody>>>>::Future;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<BodyCopy>) -> Self::Future {
        let (parts, copy) = request.into_parts();
        let body = ProxyBody::replay(copy.chunks.into(), copy.trailers, None);
        Forward::to(self.0.clone()).call(Request::from_parts(parts, ReplayBody::direct(body)))
    }
}
