//! `kind: ModelRoute`: which requests a route takes and where it sends
//! them. Its larger parts (retries, rate limits, faults) have files of
//! their own.

mod fault;
mod rate_limit;
mod retry;

pub use fault::{AbortFault, DelayFault, FaultPolicy};
pub use rate_limit::{RateLimitKey, RateLimitPolicy};
pub use retry::{GrpcCode, RetryBudget, RetryOn, RetryPolicy};

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::duration;
use super::selector::WorkloadSelector;

/// The route name under which proxies count intercepted requests that no
/// route claims, passed through to their original destination; no
/// `ModelRoute` may take it.
pub const PASSTHROUGH_ROUTE: &str = "passthrough";

/// Matches requests and sends them to weighted backends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelRouteSpec {
    /// Which listener the route applies to.
    #[serde(default)]
    pub listener: ListenerKind,
    /// The route applies when any of these matches (all when empty).
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RouteMatch>,
    /// Where matching requests go, split by weight.
    pub backends: Vec<WeightedBackend>,
    /// Time limits for each request on this route.
    #[serde(default)]
    pub timeouts: RouteTimeouts,
    /// When and how a failed attempt is tried again; no retries when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetryPolicy>,
    /// Backends tried in order when the route's backend cannot start a
    /// response (no endpoint, connection refused, every attempt failed
    /// before the response headers, or a 503).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback: Vec<FallbackTarget>,
    /// Local rate limits, each with its own buckets; a request must pass
    /// every one. None when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<RateLimitPolicy>,
    /// Delays and errors injected into a share of requests, for chaos drills.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub faults: Option<FaultPolicy>,
    /// Shadow copies of a share of requests, sent to another backend; their
    /// responses are dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorPolicy>,
    /// The workloads whose proxies receive this route; every proxy in the
    /// route's namespace (or in the mesh, without one) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<WorkloadSelector>,
    /// Sends another attempt to another endpoint when the first has not
    /// started a response within a delay; the first response to start
    /// wins. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hedging: Option<HedgePolicy>,
    /// Whether this route's requests are written to the access log; the
    /// mesh's `accessLog.requests` decides when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<bool>,
}

/// Hedged requests: a cure for a slow tail, at the cost of extra load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HedgePolicy {
    /// How long an attempt may go without response headers before a hedge
    /// is sent (and again before each further hedge).
    #[serde(with = "duration")]
    #[schemars(with = "duration::Schema")]
    pub delay: Duration,
    /// Most hedges sent per attempt, besides the attempt itself (1 to 4).
    #[serde(default = "defaults::max_hedges")]
    pub max_hedges: u32,
}

impl ModelRouteSpec {
    /// Every backend the route names: its weighted backends, its fallback
    /// chain and its mirror.
    pub fn backend_names(&self) -> impl Iterator<Item = &str> {
        let fallback = self.fallback.iter().map(|f| f.backend.as_str());
        let mirror = self.mirror.iter().map(|m| m.backend.as_str());
        self.backends
            .iter()
            .map(|b| b.backend.as_str())
            .chain(fallback)
            .chain(mirror)
    }
}

/// The listener a route belongs to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ListenerKind {
    /// Traffic from the local application to the mesh.
    #[default]
    Outbound,
    /// Traffic from the mesh to the local model server.
    Inbound,
}

/// One set of conditions; all given conditions must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatch {
    /// Host or authority without port; `*.example.com` matches any subdomain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Request path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<StringMatch>,
    /// gRPC service and method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcMatch>,
    /// Headers that must be present (and equal, when a value is given).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    /// Model name, from the JSON body (OpenAI), the path (KServe REST) or the
    /// `model_name` field (KServe gRPC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<StringMatch>,
    /// Original destinations (any of them) of a connection the pod's
    /// redirect rules sent to the proxy, as `IP`, `IP:PORT`, `CIDR` or
    /// `CIDR:PORT` (`[…]` around IPv6 before a port). A request that
    /// reached the proxy directly has no original destination and does not
    /// match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination: Vec<String>,
}

/// Exact or prefix string match, written `{exact: …}` or `{prefix: …}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum StringMatch {
    /// The whole value equals this.
    Exact(String),
    /// The value starts with this.
    Prefix(String),
}

/// gRPC service and method, e.g. `inference.GRPCInferenceService` / `ModelInfer`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMatch {
    /// Fully qualified service name; any service when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Method name; any method when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// A header condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    /// Header name, case-insensitive.
    pub name: String,
    /// Exact value; when absent the header only has to be present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// A backend a route sends to, with its share of traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightedBackend {
    /// Name of a `Backend` resource, or `local:<name>` for a `LocalModel`
    /// served by the proxy itself.
    pub backend: String,
    /// Relative share of the route's requests.
    #[serde(default = "defaults::weight")]
    pub weight: u32,
    /// Model name sent upstream instead of the one the client asked for
    /// (a model alias). The only case where the proxy changes a body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// One link of a fallback chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FallbackTarget {
    /// Name of a `Backend` resource, or `local:<name>` for a `LocalModel`
    /// served by the proxy itself (usually the last link).
    pub backend: String,
    /// Model name sent to this backend instead of the client's, as a
    /// backend's `model` alias does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// Time limits for a request. Model traffic queues before the first token and
/// streams for minutes, so there is no total limit unless one is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteTimeouts {
    /// From sending the request to the response headers.
    #[serde(default = "defaults::first_byte", with = "duration::optional")]
    #[schemars(with = "duration::optional::Schema")]
    pub first_byte: Option<Duration>,
    /// Longest gap between two chunks of the response body.
    #[serde(default = "defaults::idle", with = "duration::optional")]
    #[schemars(with = "duration::optional::Schema")]
    pub idle: Option<Duration>,
    /// Whole request lifetime, response body included. Off by default.
    #[serde(default, with = "duration::optional")]
    #[schemars(with = "duration::optional::Schema")]
    pub total: Option<Duration>,
}

impl Default for RouteTimeouts {
    fn default() -> Self {
        Self {
            first_byte: defaults::first_byte(),
            idle: defaults::idle(),
            total: None,
        }
    }
}

/// Shadow copies of a route's requests, sent to another backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MirrorPolicy {
    /// The `Backend` that receives the copies.
    pub backend: String,
    /// Share of requests copied, 0 to 100.
    #[serde(default = "defaults::percent_all")]
    pub percent: f64,
    /// Most copies in flight at once; past it copies are dropped.
    #[serde(default = "defaults::mirror_max_in_flight")]
    pub max_in_flight: u32,
    /// Time a copy has to be answered whole before it is abandoned.
    #[serde(default = "defaults::mirror_timeout", with = "duration")]
    #[schemars(with = "duration::Schema")]
    pub timeout: Duration,
}

mod defaults {
    use std::time::Duration;

    pub fn weight() -> u32 {
        1
    }
    pub fn first_byte() -> Option<Duration> {
        Some(Duration::from_secs(300))
    }
    pub fn idle() -> Option<Duration> {
        Some(Duration::from_secs(300))
    }
    pub fn max_hedges() -> u32 {
        1
    }
    pub fn percent_all() -> f64 {
        100.0
    }
    pub fn mirror_max_in_flight() -> u32 {
        100
    }
    pub fn mirror_timeout() -> Duration {
        Duration::from_secs(10)
    }
}
