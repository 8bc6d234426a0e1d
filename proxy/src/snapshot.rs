//! The policy snapshot: everything a request needs to be routed, compiled
//! from a [`PolicySet`] once and then shared read-only.
//!
//! The proxy holds the current snapshot in an `ArcSwap`; each request loads
//! it once, so a new policy applies atomically while in-flight requests finish
//! on the one they started with.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use infermesh_proto::policy::{ListenerKind, PolicySet};
use prometheus_client::metrics::histogram::Histogram;

use crate::backend::Backend;
use crate::balance::weighted_index;
use crate::metrics::{Metrics, Name, RouteLabels};
use crate::route::{Matcher, RouteInput};
use crate::stack::{self, RouteStack};

/// A compiled policy.
#[derive(Debug)]
pub struct Snapshot {
    policy: PolicySet,
    outbound: Vec<Route>,
    inbound: Vec<Route>,
    backends: HashMap<String, Arc<Backend>>,
    opaque: Option<Arc<Backend>>,
    classify_limit: usize,
    drain_timeout: Duration,
}

/// A compiled route.
#[derive(Debug)]
pub struct Route {
    name: Name,
    matchers: Vec<Matcher>,
    targets: Vec<RouteTarget>,
    cumulative: Vec<u64>,
    stack: RouteStack,
}

/// A weighted backend of a route, with its metric handles.
#[derive(Debug)]
pub struct RouteTarget {
    /// Where requests go.
    pub backend: Arc<Backend>,
    /// Model name sent upstream instead of the client's, if any.
    pub model: Option<Arc<str>>,
    /// Time to first byte for this route and backend.
    pub first_byte: Histogram,
    /// Whole-request duration for this route and backend.
    pub duration: Histogram,
}

impl Snapshot {
    /// Compiles a validated policy set.
    pub fn build(policy: PolicySet, metrics: &Metrics) -> Self {
        let backends: HashMap<String, Arc<Backend>> = policy
            .backends
            .iter()
            .map(|b| {
                (
                    b.metadata.name.clone(),
                    Backend::new(&b.metadata.name, &b.spec, metrics),
                )
            })
            .collect();
        let mut outbound = Vec::new();
        let mut inbound = Vec::new();
        for doc in &policy.routes {
            let name = Name::new(&doc.metadata.name);
            let mut targets = Vec::new();
            let mut cumulative = Vec::new();
            let mut sum = 0u64;
            for wb in &doc.spec.backends {
                // The loader has checked every reference; skip rather than panic.
                let Some(backend) = backends.get(&wb.backend) else {
                    continue;
                };
                let labels = RouteLabels {
                    route: name.clone(),
                    backend: backend.name().clone(),
                };
                sum += u64::from(wb.weight);
                cumulative.push(sum);
                targets.push(RouteTarget {
                    backend: backend.clone(),
                    model: wb.model.as_deref().map(Arc::from),
                    first_byte: metrics.first_byte.get_or_create(&labels).clone(),
                    duration: metrics.duration.get_or_create(&labels).clone(),
                });
            }
            let route = Route {
                name,
                matchers: doc.spec.matches.iter().map(Matcher::new).collect(),
                targets,
                cumulative,
                stack: stack::route_stack(&doc.spec.timeouts),
            };
            match doc.spec.listener {
                ListenerKind::Outbound => outbound.push(route),
                ListenerKind::Inbound => inbound.push(route),
            }
        }
        let mesh = policy.mesh.as_ref().map(|m| &m.spec);
        let opaque = mesh
            .and_then(|m| m.opaque.backend.as_ref())
            .and_then(|name| backends.get(name).cloned());
        let classify_limit = mesh.map_or(64 * 1024, |m| m.classify.max_body_prefix as usize);
        let drain_timeout = mesh.map_or(Duration::from_secs(30), |m| m.drain_timeout);
        Self {
            policy,
            outbound,
            inbound,
            backends,
            opaque,
            classify_limit,
            drain_timeout,
        }
    }

    /// The policy this snapshot was built from.
    pub fn policy(&self) -> &PolicySet {
        &self.policy
    }

    /// The first route of `listener` whose conditions hold.
    pub fn route(&self, listener: ListenerKind, input: &RouteInput<'_>) -> Option<&Route> {
        let routes = match listener {
            ListenerKind::Outbound => &self.outbound,
            ListenerKind::Inbound => &self.inbound,
        };
        routes.iter().find(|r| r.matches(input))
    }

    /// The backend that receives opaque TCP connections, if any.
    pub fn opaque_backend(&self) -> Option<&Arc<Backend>> {
        self.opaque.as_ref()
    }

    /// Most body bytes read to classify a request.
    pub fn classify_limit(&self) -> usize {
        self.classify_limit
    }

    /// How long in-flight requests may run after a shutdown signal.
    pub fn drain_timeout(&self) -> Duration {
        self.drain_timeout
    }

    /// Resolves every backend's host names once, then keeps them fresh.
    pub async fn start_discovery(&self) {
        for backend in self.backends.values() {
            backend.resolve().await;
            backend.spawn_refresh();
        }
    }
}

impl Route {
    /// The route's name.
    pub fn name(&self) -> &Name {
        &self.name
    }

    /// Whether any of the route's matches holds (all requests when it has none).
    pub fn matches(&self, input: &RouteInput<'_>) -> bool {
        self.matchers.is_empty() || self.matchers.iter().any(|m| m.matches(input))
    }

    /// Chooses a backend by weight.
    pub fn pick_target(&self) -> Option<&RouteTarget> {
        let total = *self.cumulative.last()?;
        if total == 0 {
            return None;
        }
        let index = weighted_index(&self.cumulative, fastrand::u64(..total));
        self.targets.get(index)
    }

    /// The route's filter stack.
    pub fn stack(&self) -> &RouteStack {
        &self.stack
    }
}
