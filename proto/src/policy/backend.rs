//! `kind: Backend`: the model-server endpoints routes send to, and how the
//! proxy connects to them, balances over them and ejects failing ones.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::duration;

/// A set of model-server endpoints that routes send traffic to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendSpec {
    /// Endpoints as `host:port`; host names are resolved, and re-resolved
    /// every `dnsRefresh`. Leave it out when `service` gives them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// A Kubernetes Service whose ready endpoints (from its EndpointSlices)
    /// are this backend's endpoints, and whose cluster IPs, with the port,
    /// join `addresses`. Resolved by the control plane (`serve
    /// --kubernetes`), which sends proxies the endpoints it found; a
    /// Backend has `endpoints` or `service`, not both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
    /// Original destinations that stand for this backend on intercepted
    /// traffic: a Service's virtual IP and port, a set of pod IPs (see
    /// [`DestinationPattern`](super::DestinationPattern) for the forms). A
    /// redirected request whose original destination is one of them and
    /// that no route claims goes to this backend.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Protocol spoken to the endpoints.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// How an endpoint is chosen for each request.
    #[serde(default)]
    pub balancer: BalancerKind,
    /// Settings of `balancer: model-aware`: score weights, the load bound of
    /// prefix affinity, the prefix hashed, and how model-server metrics are
    /// polled. The defaults apply when absent; refused with another balancer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_aware: Option<ModelAware>,
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

/// A Kubernetes Service that a backend stands for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceRef {
    /// The Service's name.
    pub name: String,
    /// The Service's namespace; the Backend's own `metadata.namespace`
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// One of the Service's ports: its number (`port`), or its name as in
    /// the Service's `ports[].name`. Endpoints take the port the
    /// EndpointSlices give for it (the target port).
    pub port: ServicePort,
}

/// A Service port, by number or by name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum ServicePort {
    /// The Service port's number (`ports[].port`).
    Number(#[schemars(range(min = 1, max = 65535))] u16),
    /// The Service port's name (`ports[].name`).
    Name(String),
}

impl std::fmt::Display for ServicePort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::Name(name) => f.write_str(name),
        }
    }
}

// Written by hand so that a wrong value says what a port is, where an
// untagged derive would say "did not match any variant".
impl<'de> Deserialize<'de> for ServicePort {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Port;
        impl serde::de::Visitor<'_> for Port {
            type Value = ServicePort;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a port number (1-65535) or a port name")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<ServicePort, E> {
                match u16::try_from(n) {
                    Ok(n) if n > 0 => Ok(ServicePort::Number(n)),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Unsigned(n), &self)),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<ServicePort, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::invalid_value(serde::de::Unexpected::Signed(n), &self)),
                }
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<ServicePort, E> {
                Ok(ServicePort::Name(s.to_owned()))
            }
        }
        d.deserialize_any(Port)
    }
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
    /// Scores endpoints by what the proxy sees (requests in flight,
    /// peak-EWMA of time to first byte) and by the model server's own load
    /// (waiting queue, running requests, KV-cache usage, polled from its
    /// metrics and read from per-response load reports); sends requests
    /// sharing a prompt prefix to the same endpoint by consistent hashing
    /// with bounded loads, and requests for a LoRA adapter to endpoints
    /// that have it loaded. See `modelAware`.
    ModelAware,
}

/// Settings of the model-aware balancer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelAware {
    /// Weights of the terms of an endpoint's load score.
    #[serde(default)]
    pub weights: ScoreWeights,
    /// The bound of consistent hashing with bounded loads: a request goes
    /// to the first endpoint clockwise from its prefix's hash whose load
    /// (plus this request) stays within `loadFactor` times the mean load,
    /// so a hot prefix spills to the next endpoint. At least 1 (1 is as
    /// even as possible, larger keeps more affinity).
    #[serde(default = "defaults::load_factor")]
    pub load_factor: f64,
    /// Which part of the prompt chooses the endpoint.
    #[serde(default)]
    pub prefix: PrefixHashing,
    /// How each endpoint's model-server metrics are polled.
    #[serde(default)]
    pub metrics: ServerMetrics,
}

impl Default for ModelAware {
    fn default() -> Self {
        Self {
            weights: ScoreWeights::default(),
            load_factor: defaults::load_factor(),
            prefix: PrefixHashing::default(),
            metrics: ServerMetrics::default(),
        }
    }
}

/// Weights of an endpoint's load. Its load is the larger of the requests
/// this proxy has in flight there and `queue × waiting + running × running`
/// from the server's own report, times `1 + kvCache × KV-cache usage`
/// (usage between 0 and 1). Requests without a prefix compare two endpoints
/// by `(load + 1) × TTFT estimate ^ latency`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScoreWeights {
    /// Weight of a request waiting in the server's queue.
    #[serde(default = "defaults::queue_weight")]
    pub queue: f64,
    /// Weight of a request the server is running.
    #[serde(default = "defaults::running_weight")]
    pub running: f64,
    /// How much a full KV cache adds to the load: 1 doubles it.
    #[serde(default = "defaults::kv_cache_weight")]
    pub kv_cache: f64,
    /// Exponent of the peak-EWMA time to first byte in the comparison of
    /// requests without a prefix; 0 compares by load alone.
    #[serde(default = "defaults::latency_weight")]
    pub latency: f64,
}

impl Default for ScoreWeights {
    fn default() -> Self {
        Self {
            queue: defaults::queue_weight(),
            running: defaults::running_weight(),
            kv_cache: defaults::kv_cache_weight(),
            latency: defaults::latency_weight(),
        }
    }
}

/// The prompt prefix that chooses an endpoint: the leading `blocks` blocks
/// of `blockSize` bytes of the decoded strings of `messages` (chat) or of
/// `prompt` (completions). Only whole blocks count, as in a model server's
/// prefix cache; a prompt shorter than one block has no prefix and is
/// balanced by load. Keep `blocks × blockSize` shorter than the part of
/// the prompts that is shared (a system prompt), and within
/// `classify.maxBodyPrefix`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrefixHashing {
    /// Leading blocks hashed (1 to 64).
    #[serde(default = "defaults::prefix_blocks")]
    pub blocks: u32,
    /// Bytes per block (16 to 4096).
    #[serde(default = "defaults::prefix_block_size")]
    pub block_size: u32,
}

impl Default for PrefixHashing {
    fn default() -> Self {
        Self {
            blocks: defaults::prefix_blocks(),
            block_size: defaults::prefix_block_size(),
        }
    }
}

/// Polling of each endpoint's Prometheus metrics (`http://<endpoint><path>`,
/// one background task per backend; a request never waits on a poll).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerMetrics {
    /// Path of the metrics page; `off` polls nothing (per-response load
    /// reports and the proxy's own view remain).
    #[serde(default = "defaults::metrics_path")]
    pub path: String,
    /// Time between polls of one endpoint; each poll times out after it too.
    #[serde(default = "defaults::metrics_interval", with = "duration")]
    #[schemars(with = "duration::Schema")]
    pub interval: Duration,
    /// A report older than this is ignored (the proxy's own view decides);
    /// three intervals when absent.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "duration::optional"
    )]
    #[schemars(with = "duration::optional::Schema")]
    pub stale_after: Option<Duration>,
    /// Which server's metric names to read.
    #[serde(default)]
    pub server_kind: ServerKind,
    /// Metric names that replace those of `serverKind`, one by one.
    #[serde(default)]
    pub names: MetricNames,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self {
            path: defaults::metrics_path(),
            interval: defaults::metrics_interval(),
            stale_after: None,
            server_kind: ServerKind::default(),
            names: MetricNames::default(),
        }
    }
}

impl ServerMetrics {
    /// Age past which a report is ignored.
    pub fn stale_after(&self) -> Duration {
        self.stale_after.unwrap_or(self.interval * 3)
    }

    /// The metric names read: the overrides, else the server kind's.
    pub fn resolved_names(&self) -> ResolvedNames {
        let kind = self.server_kind.names();
        let pick = |o: &Option<String>, d: Option<&str>| o.clone().or(d.map(str::to_string));
        ResolvedNames {
            waiting: pick(&self.names.waiting, Some(kind.0)),
            running: pick(&self.names.running, Some(kind.1)),
            kv_cache_usage: pick(&self.names.kv_cache_usage, Some(kind.2)),
            lora_info: pick(&self.names.lora_info, kind.3),
        }
    }
}

/// The metric names a model-aware balancer reads, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedNames {
    /// Gauge of requests waiting.
    pub waiting: Option<String>,
    /// Gauge of requests running.
    pub running: Option<String>,
    /// Gauge of KV-cache usage (0 to 1).
    pub kv_cache_usage: Option<String>,
    /// Info metric with `running_lora_adapters` and `waiting_lora_adapters` labels.
    pub lora_info: Option<String>,
}

/// The model server whose metric names are read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ServerKind {
    /// vLLM: `vllm:num_requests_waiting`, `vllm:num_requests_running`,
    /// `vllm:kv_cache_usage_perc`, `vllm:lora_requests_info`.
    #[default]
    Vllm,
    /// SGLang: `sglang:num_queue_reqs`, `sglang:num_running_reqs`,
    /// `sglang:token_usage` (no LoRA metric).
    Sglang,
}

impl ServerKind {
    /// Waiting, running, KV-cache usage and LoRA info metric names.
    pub fn names(
        self,
    ) -> (
        &'static str,
        &'static str,
        &'static str,
        Option<&'static str>,
    ) {
        match self {
            ServerKind::Vllm => (
                "vllm:num_requests_waiting",
                "vllm:num_requests_running",
                "vllm:kv_cache_usage_perc",
                Some("vllm:lora_requests_info"),
            ),
            ServerKind::Sglang => (
                "sglang:num_queue_reqs",
                "sglang:num_running_reqs",
                "sglang:token_usage",
                None,
            ),
        }
    }
}

/// Metric names replacing those of the server kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricNames {
    /// Gauge of requests waiting in the server's queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// Gauge of requests the server is running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<String>,
    /// Gauge of KV-cache usage, between 0 and 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_usage: Option<String>,
    /// Info metric whose `running_lora_adapters` and
    /// `waiting_lora_adapters` labels list loaded adapters, comma-separated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_info: Option<String>,
}

mod defaults {
    use std::time::Duration;

    pub fn connect_timeout() -> Duration {
        Duration::from_secs(2)
    }
    pub fn dns_refresh() -> Duration {
        Duration::from_secs(5)
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
    pub fn load_factor() -> f64 {
        2.0
    }
    pub fn queue_weight() -> f64 {
        2.0
    }
    pub fn running_weight() -> f64 {
        0.25
    }
    pub fn kv_cache_weight() -> f64 {
        1.0
    }
    pub fn latency_weight() -> f64 {
        1.0
    }
    pub fn prefix_blocks() -> u32 {
        4
    }
    pub fn prefix_block_size() -> u32 {
        256
    }
    pub fn metrics_path() -> String {
        "/metrics".into()
    }
    pub fn metrics_interval() -> Duration {
        Duration::from_secs(1)
    }
}
