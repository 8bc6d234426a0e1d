//! Mesh policy documents: YAML in Kubernetes resource form
//! (`apiVersion: infermesh.io/v1alpha1`, `kind`, `metadata`, `spec`).
//!
//! These are the typed documents as users write them. [`load_path`] reads a
//! file or a directory of files, checks every document and returns either a
//! [`PolicySet`] or every error found, each located as `FILE:LINE:COLUMN`.
//! The proxy compiles a `PolicySet` into its routing snapshot; the control
//! plane validates and distributes it.

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod load;
mod schema;
mod scope;
mod wire;

pub use load::{load_path, load_str, Location, PolicyError};
pub use schema::{schemas, SchemaFile};
pub use scope::Workload;

/// The only `apiVersion` this release understands.
pub const API_VERSION: &str = "infermesh.io/v1alpha1";

/// Every document of a policy set, in load order (files sorted by name,
/// documents in file order). Route order is match precedence.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySet {
    /// `kind: Backend` documents.
    pub backends: Vec<Resource<BackendSpec>>,
    /// `kind: LocalModel` documents: models the proxy serves itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub local_models: Vec<Resource<LocalModelSpec>>,
    /// `kind: ModelRoute` documents, in precedence order.
    pub routes: Vec<Resource<ModelRouteSpec>>,
    /// The `kind: MeshConfig` document, when one is given (at most one).
    pub mesh: Option<Resource<MeshConfigSpec>>,
    /// `kind: AuthorizationPolicy` documents. When any of them reaches a
    /// proxy, its inbound listener denies what no rule allows.
    pub authorizations: Vec<Resource<AuthorizationPolicySpec>>,
}

/// One policy document: `apiVersion`, `kind`, `metadata` and a typed `spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resource<S> {
    /// Always [`API_VERSION`].
    pub api_version: String,
    /// `Backend`, `LocalModel`, `ModelRoute`, `MeshConfig` or `AuthorizationPolicy`.
    pub kind: String,
    /// Name, namespace and labels.
    pub metadata: Metadata,
    /// The kind-specific body.
    pub spec: S,
}

/// Identifies a resource, as in Kubernetes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    /// Unique among resources of the same kind: lowercase letters, digits, `-` and `.`.
    pub name: String,
    /// Kubernetes namespace the resource belongs to. A `ModelRoute` or
    /// `MeshConfig` with a namespace reaches only the proxies of that
    /// namespace; without one it reaches the whole mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels with Kubernetes syntax, for people and tools; the mesh does
    /// not read them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

// === Backend ===

/// A set of model-server endpoints that routes send traffic to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendSpec {
    /// Endpoints as `host:port`; host names are resolved, and re-resolved
    /// every `dnsRefresh`.
    pub endpoints: Vec<String>,
    /// Protocol spoken to the endpoints.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// How an endpoint is chosen for each request.
    #[serde(default)]
    pub balancer: BalancerKind,
    /// Limit on establishing a TCP connection to one endpoint.
    #[serde(default = "defaults::connect_timeout", with = "duration")]
    #[schemars(with = "duration::Schema")]
    pub connect_timeout: Duration,
    /// How often host names in `endpoints` are resolved again.
    #[serde(default = "defaults::dns_refresh", with = "duration")]
    #[schemars(with = "duration::Schema")]
    pub dns_refresh: Duration,
    /// The endpoints are meshed workloads (their inbound sidecars): connect
    /// with mutual TLS 1.3, present this proxy's certificate, and accept
    /// only a peer whose certificate carries this identity. Plaintext when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<BackendMtls>,
    /// Takes endpoints that keep failing out of the balancer for a while
    /// (outlier ejection, a per-endpoint circuit breaker). Off when absent;
    /// `outlierDetection: {}` turns it on with the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Most requests the proxy keeps outstanding to this backend; past them
    /// a request fails at once with 503 `overloaded`. Unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<BackendLimits>,
}

/// When an endpoint is ejected, for how long, and how many may be.
///
/// A failure is a connection that cannot be opened, an upstream failure
/// before the response headers, a 5xx response, or a gRPC `UNAVAILABLE` in
/// the response headers; anything else that starts a response is a success.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// Ejects an endpoint after this many failures in a row; 0 turns the
    /// check off.
    #[serde(default = "defaults::consecutive_failures")]
    pub consecutive_failures: u32,
    /// Ejects an endpoint whose share of failures over a sliding window
    /// passes a threshold. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_rate: Option<FailureRate>,
    /// How long a first ejection lasts; the n-th ejection in a row lasts n
    /// times as long, up to `maxEjection`.
    #[serde(default = "defaults::base_ejection", with = "duration")]
    #[schemars(with = "duration::Schema")]
    pub base_ejection: Duration,
    /// Longest ejection.
    #[serde(default = "defaults::max_ejection", with = "duration")]
    #[schemars(with = "duration::Schema")]
    pub max_ejection: Duration,
    /// Most endpoints of the backend ejected at once, as a percentage of its
    /// endpoints (rounded down); an endpoint that fails past it stays in.
    #[serde(default = "defaults::max_ejected_percent")]
    pub max_ejected_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_failures: defaults::consecutive_failures(),
            failure_rate: None,
            base_ejection: defaults::base_ejection(),
            max_ejection: defaults::max_ejection(),
            max_ejected_percent: defaults::max_ejected_percent(),
        }
    }
}

/// Ejection by the share of failed requests over a sliding window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailureRate {
    /// Share of failed requests (above 0, at most 1) at which the endpoint
    /// is ejected: 0.5 ejects it when half its requests fail.
    #[serde(default = "defaults::failure_rate_threshold")]
    pub threshold: f64,
    /// Requests the endpoint must have answered in the window before its
    /// rate is judged, so one failure of one request does not eject it.
    #[serde(default = "defaults::failure_rate_min_requests")]
    pub min_requests: u32,
    /// Length of the sliding window.
    #[serde(default = "defaults::failure_rate_window", with = "duration")]
    #[schemars(with = "duration::Schema")]
    pub window: Duration,
}

/// Limits on the requests the proxy keeps outstanding to one backend,
/// across all its endpoints and every route that uses it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendLimits {
    /// Most requests in flight: sent to an endpoint and not yet finished
    /// (waiting for the response headers, or streaming the response body).
    /// Unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    /// Most requests pending: sent to an endpoint and still waiting for the
    /// response headers (connecting, sending, queued in the model server
    /// before its first byte). Unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending: Option<u32>,
}

/// Mutual TLS to a backend's endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendMtls {
    /// The SPIFFE ID the endpoints must prove:
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub identity: crate::spiffe::SpiffeId,
}

/// Protocol used between the proxy and a backend's endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive connection pooling.
    #[default]
    Http1,
    /// HTTP/2 over cleartext (prior knowledge), multiplexed; required for gRPC.
    Http2,
}

/// Endpoint selection strategy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BalancerKind {
    /// Each endpoint in turn.
    RoundRobin,
    /// Power of two choices by fewest requests in flight.
    LeastRequest,
    /// Power of two choices by in-flight requests times the peak-EWMA of the
    /// time to first byte: the default, because model servers' latency varies
    /// with what they are busy with.
    #[default]
    PeakEwma,
}

// === LocalModel ===

/// The prefix that makes a backend name refer to a `LocalModel`:
/// `local:minilm` is the `LocalModel` called `minilm`.
pub const LOCAL_PREFIX: &str = "local:";

/// The `LocalModel` a backend name refers to, when it is `local:<name>`.
pub fn local_model_name(backend: &str) -> Option<&str> {
    backend.strip_prefix(LOCAL_PREFIX)
}

/// A model the proxy serves itself, on its embedded wgpu engine (a GPU, or
/// lavapipe on the CPU). Routes send requests to it with the backend name
/// `local:<name>`, as their backend or as a link of a fallback chain. The
/// first supported model is all-MiniLM-L6-v2 (BERT sentence embeddings).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalModelSpec {
    /// Directory on the proxy's machine holding `config.json`,
    /// `model.safetensors` and `tokenizer.json`; a relative path is taken
    /// from the proxy's working directory. A missing or broken directory
    /// does not stop the proxy: the model is reported unavailable and its
    /// routes answer 503 with the reason.
    pub model_dir: String,
    /// Most sequences (inputs) in one forward pass (1 to 256).
    #[serde(default = "defaults::max_batch_size")]
    pub max_batch_size: u32,
    /// Most padded tokens (sequences × the longest one) in one forward pass;
    /// at least `maxTokens`, so that any input fits.
    #[serde(default = "defaults::max_batch_tokens")]
    pub max_batch_tokens: u32,
    /// Longest a request waits for other requests to join its batch (at
    /// most 1s).
    #[serde(default = "defaults::max_wait", with = "duration")]
    #[schemars(with = "duration::Schema")]
    pub max_wait: Duration,
    /// Inputs are cut to this many tokens, special tokens included, as
    /// sentence-transformers does (2 to 512; 256 for all-MiniLM-L6-v2).
    #[serde(default = "defaults::max_tokens")]
    pub max_tokens: u32,
    /// Most inputs one request may carry (1 to 2048, OpenAI's limit); a
    /// request with more is refused with 400.
    #[serde(default = "defaults::max_inputs")]
    pub max_inputs: u32,
    /// Most sequences waiting for or in a forward pass (1 to 1,000,000);
    /// a request that would queue past it is refused at once with 503,
    /// so a flood cannot pile up latency and memory behind the engine. A
    /// request alone in an empty queue is always admitted.
    #[serde(default = "defaults::max_queued")]
    pub max_queued: u32,
    /// Runs on the first adapter whose name contains this
    /// (case-insensitive), e.g. `llvmpipe` for lavapipe; by default a
    /// discrete GPU, then an integrated one, then a CPU implementation.
    /// wgpu's `WGPU_ADAPTER_NAME` environment variable applies when this is
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
}

// === ModelRoute ===

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

/// Selects workloads by their labels, as a Kubernetes label selector does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Labels the workload must carry, each with exactly this value; an
    /// empty map selects every workload.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
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
    #[serde(default = "defaults::first_byte", with = "opt_duration")]
    #[schemars(with = "opt_duration::Schema")]
    pub first_byte: Option<Duration>,
    /// Longest gap between two chunks of the response body.
    #[serde(default = "defaults::idle", with = "opt_duration")]
    #[schemars(with = "opt_duration::Schema")]
    pub idle: Option<Duration>,
    /// Whole request lifetime, response body included. Off by default.
    #[serde(default, with = "opt_duration")]
    #[schemars(with = "opt_duration::Schema")]
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

/// Retries of a route. An attempt is retried only while nothing of its
/// response has reached the client, so a retry never duplicates a token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryPolicy {
    /// Most attempts per request, the first one included (2 to 10).
    #[serde(default = "defaults::retry_attempts")]
    pub max_attempts: u32,
    /// Which failures are retried.
    #[serde(default)]
    pub on: RetryOn,
    /// Limit on each attempt's wait for response headers; an attempt that
    /// passes it is abandoned and retried. None by default: the route's
    /// `timeouts.firstByte` then bounds all attempts together.
    #[serde(default, with = "opt_duration")]
    #[schemars(with = "opt_duration::Schema")]
    pub per_try_timeout: Option<Duration>,
    /// Back-off before the first retry; it doubles for each further retry,
    /// and each wait is drawn at random between half and all of it (jitter).
    #[serde(default = "defaults::backoff_base", with = "duration")]
    #[schemars(with = "duration::Schema")]
    pub backoff_base: Duration,
    /// Longest back-off between two attempts.
    #[serde(default = "defaults::backoff_max", with = "duration")]
    #[schemars(with = "duration::Schema")]
    pub backoff_max: Duration,
    /// Longest `Retry-After` (seconds) the proxy waits for before a retry; a
    /// response asking for a longer wait is passed to the client as it is.
    #[serde(default = "defaults::max_retry_after", with = "duration")]
    #[schemars(with = "duration::Schema")]
    pub max_retry_after: Duration,
    /// Most bytes of a request body kept to send it again; a request whose
    /// body is longer is sent once and never retried.
    #[serde(default = "defaults::max_replay_bytes")]
    pub max_replay_bytes: u32,
    /// How many retries the route may send, so retries cannot multiply the
    /// load of an outage.
    #[serde(default)]
    pub budget: RetryBudget,
}

/// Failures that are retried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryOn {
    /// A connection to the endpoint could not be opened.
    #[serde(default = "defaults::yes")]
    pub connect_failure: bool,
    /// The endpoint refused the request before processing it (HTTP/2
    /// `REFUSED_STREAM`, or an idle connection closed under the request).
    #[serde(default = "defaults::yes")]
    pub refused_stream: bool,
    /// HTTP statuses of the response headers that are retried: 408, 429 or
    /// 5xx.
    #[serde(default = "defaults::retry_statuses")]
    pub statuses: Vec<u16>,
    /// gRPC status codes retried when the `grpc-status` is in the response
    /// headers (a trailers-only response). A status in the trailers of a
    /// response that has started streaming cannot be retried.
    #[serde(default = "defaults::retry_grpc_codes")]
    pub grpc_codes: Vec<GrpcCode>,
}

impl Default for RetryOn {
    fn default() -> Self {
        Self {
            connect_failure: true,
            refused_stream: true,
            statuses: defaults::retry_statuses(),
            grpc_codes: defaults::retry_grpc_codes(),
        }
    }
}

/// A gRPC status code, by its canonical name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[allow(missing_docs)]
pub enum GrpcCode {
    Cancelled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl GrpcCode {
    /// The numeric code carried in `grpc-status`.
    pub fn code(self) -> u8 {
        self as u8 + 1
    }
}

/// A retry budget: retries may add `ratio` of the route's recent requests,
/// plus `minPerSecond` retries each second whatever the traffic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudget {
    /// Retries allowed per request sent (0 to 1): 0.2 lets retries add at
    /// most 20% to the load.
    #[serde(default = "defaults::budget_ratio")]
    pub ratio: f64,
    /// Retries allowed each second even when there is little traffic.
    #[serde(default = "defaults::budget_min_per_second")]
    pub min_per_second: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            ratio: defaults::budget_ratio(),
            min_per_second: defaults::budget_min_per_second(),
        }
    }
}

/// One rate limit of a route: token buckets kept per key, for requests per
/// second, model tokens per minute, or both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitPolicy {
    /// What buckets are kept per: `route` (one for the whole route),
    /// `caller` (the caller's mesh identity; callers without one share a
    /// bucket) or `{header: NAME}` (each value of a request header; requests
    /// without it share a bucket).
    #[serde(default)]
    pub key: RateLimitKey,
    /// Requests allowed per second, on average.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<f64>,
    /// Requests allowed at once above the rate; `requestsPerSecond`
    /// rounded up (at least 1) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Model tokens (input and output) allowed per minute. Each request is
    /// charged an estimate up front (body bytes / 4 plus `max_tokens` or
    /// `max_completion_tokens`), corrected to the response's
    /// `usage.total_tokens` when it ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    /// Model tokens allowed at once; `tokensPerMinute` when absent. A
    /// request estimated above it is charged this much.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_burst: Option<u64>,
    /// Most keys (callers, header values) with a bucket of their own at
    /// once; past it, buckets that have refilled are dropped, and new keys
    /// share one bucket until some are.
    #[serde(default = "defaults::max_keys")]
    pub max_keys: u32,
}

/// What a rate limit keeps its buckets per.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum RateLimitKey {
    /// One bucket for the whole route.
    Route,
    /// One bucket per caller mesh identity.
    #[default]
    Caller,
    /// One bucket per value of this request header.
    Header(String),
}

/// Faults injected into a route's requests. Each request draws on its own,
/// so over many requests the shares match the percentages.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultPolicy {
    /// Hold a share of requests before sending them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<DelayFault>,
    /// Answer a share of requests with an error, without sending them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<AbortFault>,
}

/// A delay injected into a share of requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DelayFault {
    /// How long a delayed request waits before it is sent.
    #[serde(with = "duration")]
    #[schemars(with = "duration::Schema")]
    pub duration: Duration,
    /// Share of requests delayed, 0 to 100 (fractions allowed).
    pub percent: f64,
}

/// An error answered by the proxy to a share of requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AbortFault {
    /// HTTP status (400 to 599) for HTTP clients; follows from
    /// `grpcStatus` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// gRPC status for gRPC clients; follows from `status` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<GrpcCode>,
    /// Share of requests aborted, 0 to 100 (fractions allowed).
    pub percent: f64,
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

// === MeshConfig ===

/// Settings for the whole mesh (at most one document).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshConfigSpec {
    /// How requests are classified.
    #[serde(default)]
    pub classify: ClassifySettings,
    /// What happens to connections that are neither HTTP/1.1 nor HTTP/2.
    #[serde(default)]
    pub opaque: OpaqueSettings,
    /// Mutual TLS on the inbound listener.
    #[serde(default)]
    pub mtls: MtlsSettings,
    /// How long in-flight requests may run after SIGTERM.
    #[serde(default = "defaults::drain_timeout", with = "duration")]
    #[schemars(with = "duration::Schema")]
    pub drain_timeout: Duration,
    /// The workloads whose proxies receive these settings (the others keep
    /// the defaults); every proxy in the namespace (or in the mesh, without
    /// one) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<WorkloadSelector>,
}

/// Request classification settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClassifySettings {
    /// Most bytes of a request body read to find the model name; a body whose
    /// model is not found within them is routed by the other match rules.
    #[serde(default = "defaults::max_body_prefix")]
    pub max_body_prefix: u32,
    /// Longest time the client may take to send the part of its body read to
    /// find the model (at most `maxBodyPrefix` bytes); past it the request
    /// is refused with 408. `0s` for no limit.
    #[serde(default = "defaults::classify_read_timeout", with = "duration")]
    #[schemars(with = "duration::Schema")]
    pub read_timeout: Duration,
    /// Longest wait for the next chunk of a request body on its way
    /// upstream; past it the upload is cut and the client answered 408.
    /// gRPC streams are exempt (their limits are the route's). `0s` for no
    /// limit.
    #[serde(default = "defaults::body_idle_timeout", with = "duration")]
    #[schemars(with = "duration::Schema")]
    pub body_idle_timeout: Duration,
}

impl Default for ClassifySettings {
    fn default() -> Self {
        Self {
            max_body_prefix: defaults::max_body_prefix(),
            read_timeout: defaults::classify_read_timeout(),
            body_idle_timeout: defaults::body_idle_timeout(),
        }
    }
}

/// Handling of non-HTTP connections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OpaqueSettings {
    /// Backend that receives such connections as raw TCP; when absent they are
    /// refused and logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
}

/// Mutual TLS settings of the inbound listener.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MtlsSettings {
    /// `strict` (the default) refuses plaintext and callers without a valid
    /// mesh certificate; `permissive` also accepts plaintext, for workloads
    /// migrating into the mesh. Applies once the proxy holds a certificate.
    #[serde(default)]
    pub mode: MtlsMode,
}

/// What the inbound listener accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MtlsMode {
    /// Mutual TLS only.
    #[default]
    Strict,
    /// Mutual TLS, or plaintext (detected from the first bytes) without a
    /// caller identity.
    Permissive,
}

// === AuthorizationPolicy ===

/// Who may call what on the inbound listener. Deny rules are checked first;
/// then, once any policy reaches a proxy, a request is allowed only when an
/// allow rule matches it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// The rules; a policy without rules denies everything it reaches.
    #[serde(default)]
    pub rules: Vec<AuthorizationRule>,
    /// The workloads whose proxies enforce this policy; every proxy in the
    /// policy's namespace (or in the mesh, without one) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<WorkloadSelector>,
}

/// One rule: an action for requests from any of `from` to any of `to`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationRule {
    /// `allow` (the default) or `deny`.
    #[serde(default)]
    pub action: AuthorizationAction,
    /// Callers the rule applies to, any of them; every caller, with or
    /// without an identity, when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<CallerMatch>,
    /// Requests the rule applies to, any of them; every request when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<RequestMatch>,
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AuthorizationAction {
    /// Let the request through.
    #[default]
    Allow,
    /// Refuse it: 403, or gRPC `PERMISSION_DENIED`.
    Deny,
}

/// A caller, by its mesh identity, written `{identity: spiffe://…}`,
/// `{namespace: …}` or `{trustDomain: …}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum CallerMatch {
    /// Exactly this SPIFFE ID.
    Identity(crate::spiffe::SpiffeId),
    /// Any workload of this namespace (in the proxy's trust domain).
    Namespace(String),
    /// Any workload of this trust domain.
    TrustDomain(String),
}

/// Conditions on the request; all given conditions must hold. In each list
/// any entry may match; a trailing `*` matches any suffix.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestMatch {
    /// Model names, as routes see them (OpenAI `model`, KServe model name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// Names of the `ModelRoute` the request takes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<String>,
    /// gRPC methods as `/package.Service/Method`; `/package.Service/*` for
    /// every method of a service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Ports of the inbound listener the request arrived on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}

mod defaults {
    use std::time::Duration;

    pub fn connect_timeout() -> Duration {
        Duration::from_secs(2)
    }
    pub fn dns_refresh() -> Duration {
        Duration::from_secs(5)
    }
    pub fn weight() -> u32 {
        1
    }
    pub fn first_byte() -> Option<Duration> {
        Some(Duration::from_secs(300))
    }
    pub fn idle() -> Option<Duration> {
        Some(Duration::from_secs(300))
    }
    pub fn drain_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn max_body_prefix() -> u32 {
        64 * 1024
    }
    pub fn classify_read_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn body_idle_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn yes() -> bool {
        true
    }
    pub fn retry_attempts() -> u32 {
        3
    }
    pub fn backoff_base() -> Duration {
        Duration::from_millis(25)
    }
    pub fn backoff_max() -> Duration {
        Duration::from_secs(1)
    }
    pub fn max_retry_after() -> Duration {
        Duration::from_secs(2)
    }
    pub fn max_replay_bytes() -> u32 {
        64 * 1024
    }
    pub fn retry_statuses() -> Vec<u16> {
        vec![429, 503]
    }
    pub fn retry_grpc_codes() -> Vec<super::GrpcCode> {
        vec![super::GrpcCode::Unavailable]
    }
    pub fn budget_ratio() -> f64 {
        0.2
    }
    pub fn budget_min_per_second() -> u32 {
        10
    }
    pub fn consecutive_failures() -> u32 {
        5
    }
    pub fn base_ejection() -> Duration {
        Duration::from_secs(30)
    }
    pub fn max_ejection() -> Duration {
        Duration::from_secs(300)
    }
    pub fn max_ejected_percent() -> u32 {
        50
    }
    pub fn failure_rate_threshold() -> f64 {
        0.5
    }
    pub fn failure_rate_min_requests() -> u32 {
        20
    }
    pub fn failure_rate_window() -> Duration {
        Duration::from_secs(10)
    }
    pub fn max_hedges() -> u32 {
        1
    }
    pub fn max_keys() -> u32 {
        10_000
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
    pub fn max_batch_size() -> u32 {
        32
    }
    pub fn max_batch_tokens() -> u32 {
        8192
    }
    pub fn max_wait() -> Duration {
        Duration::from_millis(2)
    }
    pub fn max_tokens() -> u32 {
        256
    }
    pub fn max_inputs() -> u32 {
        2048
    }
    pub fn max_queued() -> u32 {
        4096
    }
}

/// Durations as humantime strings: `250ms`, `2s`, `5m`.
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }

    /// How a duration is written, for the JSON Schema.
    pub struct Schema;

    impl schemars::JsonSchema for Schema {
        fn schema_name() -> std::borrow::Cow<'static, str> {
            "Duration".into()
        }

        fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
            schemars::json_schema!({
                "type": "string",
                "description": "A number and a unit, like `250ms`, `2s`, `5m` or `1h 30m`.",
                "pattern": PATTERN,
                "examples": ["250ms", "2s", "5m"],
            })
        }
    }

    /// One or more `NUMBER UNIT` groups; the loader checks the units.
    pub(super) const PATTERN: &str = r"^\s*([0-9]+\s*[a-zA-Zµ]+\s*)+$";

    /// Parses a humantime duration, with a message that says how to write one.
    pub fn parse(text: &str) -> Result<Duration, String> {
        use humantime::DurationError as E;
        humantime::parse_duration(text).map_err(|e| match e {
            E::InvalidCharacter(_) | E::NumberExpected(_) | E::Empty => format!(
                "invalid duration {text:?}: write a number and a unit, like 250ms, 2s or 5m"
            ),
            e => format!("invalid duration {text:?}: {e}"),
        })
    }
}

/// Optional durations: a humantime string, or `none` / `off` for no limit.
mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.collect_str(&humantime::format_duration(*d)),
            None => s.serialize_str("none"),
        }
    }

    /// How an optional duration is written, for the JSON Schema.
    pub struct Schema;

    impl schemars::JsonSchema for Schema {
        fn schema_name() -> std::borrow::Cow<'static, str> {
            "OptionalDuration".into()
        }

        fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
            schemars::json_schema!({
                "type": "string",
                "description": "A number and a unit, like `250ms`, `2s` or `5m`; `none` (or `off`) for no limit.",
                "anyOf": [
                    {"enum": ["none", "off"]},
                    {"pattern": super::duration::PATTERN},
                ],
                "examples": ["2s", "5m", "none"],
            })
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        if matches!(text.as_str(), "none" | "off") {
            return Ok(None);
        }
        let parsed = super::duration::parse(&text).map_err(serde::de::Error::custom)?;
        if parsed.is_zero() {
            return Err(serde::de::Error::custom(
                "a zero duration is not a limit; write `none` to disable it",
            ));
        }
        Ok(Some(parsed))
    }
}
