//! The filter stack of a route, assembled in one place.
//!
//! Each route gets its own stack, built when the snapshot is compiled, so no
//! policy is parsed per request. Layers run outermost first.

use infermesh_filters::timeout::{Timeout, TimeoutLayer};
use infermesh_proto::policy::RouteTimeouts;
use tower::ServiceBuilder;

use crate::forward::Forward;

/// The concrete stack type of a route.
pub type RouteStack = Timeout<Forward>;

/// Builds a route's stack from its policy.
pub fn route_stack(timeouts: &RouteTimeouts) -> RouteStack {
    ServiceBuilder::new()
        // Outermost, so the limits cover the request as the client sees it,
        // including the wait for an endpoint and a connection.
        .layer(
            TimeoutLayer::new()
                .first_byte(timeouts.first_byte)
                .idle(timeouts.idle)
                .total(timeouts.total),
        )
        // Balances over the backend's endpoints and sends on a pooled connection.
        .service(Forward)
}
