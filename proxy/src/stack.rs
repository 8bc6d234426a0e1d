//! The filter stack of a route, assembled in one place.
//!
//! Each route gets its own stack, built when the snapshot is compiled, so no
//! policy is parsed per request. Layers run outermost first.

use infermesh_filters::hedge::{Hedge, HedgeLayer, HedgeMetrics};
use infermesh_filters::retry::{Retry, RetryBudget, RetryConditions, RetryLayer, RetryMetrics};
use infermesh_filters::timeout::{Timeout, TimeoutLayer};
use infermesh_proto::policy::{HedgePolicy, RetryPolicy, RouteTimeouts};
use tower::ServiceBuilder;

use crate::forward::Forward;
use crate::metrics::{HedgeLabels, Metrics, Name, RetryLabels};

/// The concrete stack type of a route.
pub type RouteStack = Timeout<Retry<Hedge<Forward>>>;

/// Builds a route's stack from its policy.
pub fn route_stack(
    route: &Name,
    timeouts: &RouteTimeouts,
    retries: Option<&RetryPolicy>,
    hedging: Option<&HedgePolicy>,
    metrics: &Metrics,
) -> RouteStack {
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
        // Balances over the backend's endpoints and sends on a pooled connection.
        .service(Forward)
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
