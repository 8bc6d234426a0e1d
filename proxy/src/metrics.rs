//! Prometheus metrics of the data plane.
//!
//! Handles for each route and backend are created when a snapshot is built,
//! so the request path only touches atomics; the registry is rendered on the
//! admin thread.

use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;

use infermesh_proto::policy::ListenerKind;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::refusal::Reason;

pub use crate::name::Name;

/// Labels of per-request counters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// `outbound` or `inbound`.
    pub listener: &'static str,
    /// Route name; empty when no route matched.
    pub route: Name,
    /// Backend name; empty when none was chosen.
    pub backend: Name,
    /// HTTP status sent to the client.
    pub status: u16,
    /// gRPC status the client received (from the response headers of a
    /// trailers-only response, else from the trailers), as its number;
    /// empty for requests that are not gRPC.
    pub grpc_status: &'static str,
}

/// The `grpc_status` label of a gRPC status code.
pub fn grpc_status_label(code: u32) -> &'static str {
    const CODES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    CODES.get(code as usize).copied().unwrap_or("unknown")
}

/// The `grpc_status` label of a `grpc-status` header value.
pub fn grpc_status_of(value: &http::HeaderValue) -> &'static str {
    std::str::from_utf8(value.as_bytes())
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .map_or("unknown", grpc_status_label)
}

/// Labels of per-route-and-backend histograms.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RouteLabels {
    /// Route name.
    pub route: Name,
    /// Backend name.
    pub backend: Name,
}

/// Labels of per-backend counters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct BackendLabels {
    /// Backend name.
    pub backend: Name,
}

/// Labels of per-listener gauges.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `outbound` or `inbound`.
    pub listener: &'static str,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0, 120.0, 300.0,
    ]
    .into_iter()
}

fn new_latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

/// The `listener` label value of a listener.
pub fn listener_label(listener: ListenerKind) -> &'static str {
    match listener {
        ListenerKind::Outbound => "outbound",
        ListenerKind::Inbound => "inbound",
    }
}

/// Every metric family of the proxy.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// The GenAI families, under their OpenTelemetry names (no prefix).
    genai_registry: Registry,
    /// Tokens, time to first token, time per output token and duration of
    /// model requests, per model, route, backend and caller.
    pub genai: crate::genai::GenAiMetrics,
    /// Responses sent, by listener, route, backend and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Requests whose response has not finished.
    pub in_flight: Family<ListenerLabels, Gauge>,
    /// `in_flight` of each listener, resolved once.
    in_flight_by_listener: [Gauge; 2],
    /// Whole request duration, response body included.
    pub duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// Time to the upstream's response headers.
    pub first_byte: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// Failed attempts to connect to an endpoint.
    pub connect_errors: Family<BackendLabels, Counter>,
    /// Finished spans that never reached the trace collector.
    pub trace_spans_dropped: Counter,
    /// OTLP metric exports that failed (sent again, cumulated, next time).
    pub otlp_metric_exports_failed: Counter,
    /// Opaque TCP connections, by listener and outcome.
    pub opaque_connections: Family<OpaqueLabels, Counter>,
    /// Intercepted traffic no route claimed: HTTP requests and TCP
    /// connections passed through to their original destination.
    pub passthrough: Family<PassthroughLabels, Counter>,
    /// Inbound connections over mutual TLS, by the caller's identity.
    pub inbound_mtls: Family<CallerLabels, Counter>,
    /// Version of the policy snapshot in force (0 for a local file).
    pub policy_version: Gauge,
    /// Policy snapshots offered to the proxy, by outcome.
    pub policy_updates: Family<OutcomeLabels, Counter>,
    /// 1 while the policy stream to the control plane is open.
    pub control_plane_connected: Gauge,
    /// Retries, and retries not sent, by route and outcome.
    pub retries: Family<RetryLabels, Counter>,
    /// Requests sent down a route's fallback chain, by route and backend.
    pub fallbacks: Family<RouteLabels, Counter>,
    /// Requests the local engine answered, by route, model and outcome.
    pub local_requests: Family<LocalRequestLabels, Counter>,
    /// 1 while a local model is loaded and serving, else 0.
    pub local_model_ready: Family<LocalModelLabels, Gauge>,
    /// Sequences per forward pass of a local model.
    pub local_batch_size: Family<LocalModelLabels, Histogram, fn() -> Histogram>,
    /// Time a request waits for its batch to start.
    pub local_queue_wait: Family<LocalModelLabels, Histogram, fn() -> Histogram>,
    /// Time of one forward pass.
    pub local_forward: Family<LocalModelLabels, Histogram, fn() -> Histogram>,
    /// Sequences embedded by a local model.
    pub local_sequences: Family<LocalModelLabels, Counter>,
    /// Tokens embedded by a local model, before padding.
    pub local_tokens: Family<LocalModelLabels, Counter>,
    /// Sequences a local model dropped uncomputed, by reason.
    pub local_dropped: Family<LocalDroppedLabels, Counter>,
    /// Endpoint ejections, by backend and reason.
    pub outlier_ejections: Family<EjectionLabels, Counter>,
    /// Endpoints ejected now (probing included), by backend.
    pub outlier_ejected: Family<BackendLabels, Gauge>,
    /// Attempts refused because a backend's limit was reached.
    pub overloaded: Family<OverloadLabels, Counter>,
    /// 429 / `Retry-After` penalties given to endpoints, by backend.
    pub penalties: Family<BackendLabels, Counter>,
    /// Requests a model-aware balancer placed by their prompt prefix, by
    /// backend and outcome (`hit`, `spill`).
    pub prefix_affinity: Family<AffinityLabels, Counter>,
    /// Requests waiting in each endpoint's server, as last reported.
    pub server_queue: Family<EndpointLabels, Gauge<f64, AtomicU64>>,
    /// KV-cache usage of each endpoint's server (0 to 1), as last reported.
    pub kv_cache_usage: Family<EndpointLabels, Gauge<f64, AtomicU64>>,
    /// Hedged attempts sent, and hedges whose response won, by route.
    pub hedges: Family<HedgeLabels, Counter>,

    /// Requests refused by a route's rate limits, by route and kind.
    pub rate_limited: Family<RateLimitedLabels, Counter>,
    /// Model tokens charged to rate limits and corrected, by route and stage.
    pub rate_limit_tokens: Family<TokenChargeLabels, Counter>,
    /// Faults injected, by route and kind.
    pub faults: Family<FaultLabels, Counter>,
    /// Shadow copies of requests, by route and outcome.
    pub mirrored: Family<MirrorLabels, Counter>,
    /// Connections and requests refused before routing, by listener and
    /// reason; count through [`Metrics::refused`].
    pub refusals: Family<RefusalLabels, Counter>,
}

/// Labels of the refusal counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `outbound` or `inbound`.
    pub listener: &'static str,
    /// Why (`crate::refusal::Reason`), a bounded set.
    pub reason: Reason,
}

/// Labels of the ejection counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct EjectionLabels {
    /// Backend name.
    pub backend: Name,
    /// `consecutive_failures`, `failure_rate` or `probe_failed`.
    pub reason: &'static str,
}

/// Labels of the prefix-affinity counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct AffinityLabels {
    /// Backend name.
    pub backend: Name,
    /// `hit` (the prefix's own endpoint) or `spill` (the next within the bound).
    pub outcome: &'static str,
}

/// Labels of per-endpoint gauges.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct EndpointLabels {
    /// Backend name.
    pub backend: Name,
    /// `ip:port`.
    pub endpoint: String,
}

/// Labels of the overloaded counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OverloadLabels {
    /// Backend name.
    pub backend: Name,
    /// `in_flight` or `pending`.
    pub limit: &'static str,
}

/// Labels of the hedge counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HedgeLabels {
    /// Route name.
    pub route: Name,
    /// `sent` or `won`.
    pub outcome: &'static str,
}

/// Labels of the rate-limited counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RateLimitedLabels {
    /// Route name.
    pub route: Name,
    /// `requests` (requests per second) or `tokens` (model tokens per minute).
    pub kind: &'static str,
}

/// Labels of the rate-limit token counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TokenChargeLabels {
    /// Route name.
    pub route: Name,
    /// `estimated` (charged up front), `refunded` (given back after the
    /// response's usage, or a failure) or `added` (usage above the estimate).
    pub stage: &'static str,
}

/// Labels of the fault counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct FaultLabels {
    /// Route name.
    pub route: Name,
    /// `delay` or `abort`.
    pub kind: &'static str,
}

/// Labels of the mirror counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct MirrorLabels {
    /// Route name.
    pub route: Name,
    /// `sent`, `failed`, `dropped` or `not_replayable`.
    pub outcome: &'static str,
}

/// Labels of per-local-model metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LocalModelLabels {
    /// The `LocalModel`'s name.
    pub model: Name,
}

/// Labels of the local model's dropped-sequence counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LocalDroppedLabels {
    /// The `LocalModel`'s name.
    pub model: Name,
    /// `cancelled` (the caller has gone) or `expired` (the time limit passed).
    pub reason: &'static str,
}

/// Labels of the local-request counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LocalRequestLabels {
    /// Route name.
    pub route: Name,
    /// The `LocalModel`'s name.
    pub model: Name,
    /// `served` (200), `invalid` (refused with a 4xx) or `unavailable` (503).
    pub outcome: &'static str,
}

fn batch_size_buckets() -> Histogram {
    Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0])
}

/// Labels of the retry counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RetryLabels {
    /// Route name.
    pub route: Name,
    /// `retried`, `budget_exhausted`, `not_replayable` or `attempts_exhausted`.
    pub outcome: &'static str,
}

/// Labels of the policy-update counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `applied` or `rejected`.
    pub outcome: &'static str,
}

/// Labels of the opaque-connection counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OpaqueLabels {
    /// `outbound` or `inbound`.
    pub listener: &'static str,
    /// `forwarded` or `refused`.
    pub outcome: &'static str,
}

/// Labels of the passthrough counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PassthroughLabels {
    /// `outbound` or `inbound`.
    pub listener: &'static str,
    /// `http` (a request) or `tcp` (a connection).
    pub protocol: &'static str,
    /// `forwarded`, `failed` (the destination could not be reached) or
    /// `loop` (the destination was the proxy itself).
    pub outcome: &'static str,
}

/// Labels of the inbound mutual-TLS connection counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CallerLabels {
    /// The caller's SPIFFE ID (`""` when its certificate names none).
    pub caller: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family under the `infermesh` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("infermesh");
        let requests = Family::default();
        registry.register(
            "requests",
            "Responses sent to clients, by listener, route, backend and HTTP status",
            requests.clone(),
        );
        let in_flight: Family<ListenerLabels, Gauge> = Family::default();
        registry.register(
            "requests_in_flight",
            "Requests whose response has not finished",
            in_flight.clone(),
        );
        let duration = Family::new_with_constructor(new_latency_histogram as fn() -> Histogram);
        registry.register(
            "request_duration_seconds",
            "Time from receiving a request to the end of its response body",
            duration.clone(),
        );
        let first_byte = Family::new_with_constructor(new_latency_histogram as fn() -> Histogram);
        registry.register(
            "time_to_first_byte_seconds",
            "Time from sending a request upstream to its response headers",
            first_byte.clone(),
        );
        let trace_spans_dropped = Counter::default();
        registry.register(
            "trace_spans_dropped",
            "Finished spans dropped before reaching the OTLP collector (export queue full, or the collector refused, failed or timed out)",
            trace_spans_dropped.clone(),
        );
        let otlp_metric_exports_failed = Counter::default();
        registry.register(
            "otlp_metric_exports_failed",
            "Pushes of the metrics to the OTLP collector that failed or timed out (their figures go again, cumulated, with the next push)",
            otlp_metric_exports_failed.clone(),
        );
        registry.register(
            "access_log_lines_dropped",
            "Access-log lines dropped because standard output did not keep up (the writer's queue was full)",
            crate::access::dropped().clone(),
        );
        let connect_errors = Family::default();
        registry.register(
            "upstream_connect_errors",
            "Failed attempts to connect to a backend endpoint",
            connect_errors.clone(),
        );
        let opaque_connections = Family::default();
        registry.register(
            "opaque_connections",
            "Connections that were neither HTTP/1.1 nor HTTP/2, by outcome",
            opaque_connections.clone(),
        );
        let passthrough = Family::default();
        registry.register(
            "passthrough",
            "Intercepted HTTP requests and TCP connections no route claimed, passed through to their original destination",
            passthrough.clone(),
        );
        let inbound_mtls = Family::default();
        registry.register(
            "inbound_mtls_connections",
            "Inbound connections over mutual TLS, by the caller's SPIFFE ID",
            inbound_mtls.clone(),
        );
        let policy_version = Gauge::default();
        registry.register(
            "policy_version",
            "Version of the policy snapshot in force; 0 for a local policy file",
            policy_version.clone(),
        );
        let policy_updates = Family::default();
        registry.register(
            "policy_updates",
            "Policy snapshots offered to the proxy (file, cache or control plane), by outcome",
            policy_updates.clone(),
        );
        let control_plane_connected = Gauge::default();
        registry.register(
            "control_plane_connected",
            "1 while the policy stream to the control plane is open, else 0",
            control_plane_connected.clone(),
        );
        let retries = Family::default();
        registry.register(
            "retries",
            "Retries sent (retried), and retries wanted but not sent (budget_exhausted, not_replayable, attempts_exhausted), by route",
            retries.clone(),
        );
        let fallbacks = Family::default();
        registry.register(
            "fallbacks",
            "Requests sent to a fallback backend because the route's backend could not start a response, by route and fallback backend",
            fallbacks.clone(),
        );
        let local_requests = Family::default();
        registry.register(
            "local_requests",
            "Requests answered by the proxy's own engine, by route, local model and outcome (served, invalid, unavailable)",
            local_requests.clone(),
        );
        let local_model_ready = Family::default();
        registry.register(
            "local_model_ready",
            "1 while a local model is loaded and serving, 0 while it loads or when it is unavailable",
            local_model_ready.clone(),
        );
        let local_batch_size =
            Family::new_with_constructor(batch_size_buckets as fn() -> Histogram);
        registry.register(
            "local_batch_size",
            "Sequences in each forward pass of a local model",
            local_batch_size.clone(),
        );
        let local_queue_wait =
            Family::new_with_constructor(new_latency_histogram as fn() -> Histogram);
        registry.register(
            "local_queue_wait_seconds",
            "Time a request to a local model waits before its batch starts",
            local_queue_wait.clone(),
        );
        let local_forward =
            Family::new_with_constructor(new_latency_histogram as fn() -> Histogram);
        registry.register(
            "local_forward_seconds",
            "Time of each forward pass of a local model, read-back included",
            local_forward.clone(),
        );
        let local_sequences = Family::default();
        registry.register(
            "local_sequences",
            "Sequences (inputs) embedded by a local model",
            local_sequences.clone(),
        );
        let local_tokens = Family::default();
        registry.register(
            "local_tokens",
            "Tokens embedded by a local model, special tokens included, padding excluded",
            local_tokens.clone(),
        );
        let local_dropped = Family::default();
        registry.register(
            "local_sequences_dropped",
            "Sequences a local model dropped from its queue without computing them, by reason: cancelled (the client went away), expired (the route's time limit passed)",
            local_dropped.clone(),
        );
        let outlier_ejections = Family::default();
        registry.register(
            "outlier_ejections",
            "Endpoints ejected by outlier detection, by backend and reason (consecutive_failures, failure_rate, probe_failed)",
            outlier_ejections.clone(),
        );
        let outlier_ejected = Family::default();
        registry.register(
            "outlier_ejected_endpoints",
            "Endpoints out of the balancer now (ejected, or probing after an ejection), by backend",
            outlier_ejected.clone(),
        );
        let overloaded = Family::default();
        registry.register(
            "overloaded",
            "Attempts refused with 503 overloaded because a backend's limit was reached, by backend and limit (in_flight, pending)",
            overloaded.clone(),
        );
        let penalties = Family::default();
        registry.register(
            "endpoint_penalties",
            "Responses (429, or with Retry-After) that penalised their endpoint in the balancer, by backend",
            penalties.clone(),
        );
        let prefix_affinity = Family::default();
        registry.register(
            "prefix_affinity",
            "Requests a model-aware balancer placed by their prompt prefix, by backend and outcome: hit (the prefix's own endpoint on the hash ring), spill (a later one, the own endpoint being over the load bound)",
            prefix_affinity.clone(),
        );
        let server_queue = Family::default();
        registry.register(
            "endpoint_server_queue",
            "Requests waiting in an endpoint's model server, as its metrics or load reports last said (model-aware balancer), by backend and endpoint",
            server_queue.clone(),
        );
        let kv_cache_usage = Family::default();
        registry.register(
            "endpoint_kv_cache_usage",
            "KV-cache usage (0 to 1) of an endpoint's model server, as its metrics or load reports last said (model-aware balancer), by backend and endpoint",
            kv_cache_usage.clone(),
        );
        let hedges = Family::default();
        registry.register(
            "hedges",
            "Hedged attempts sent after the hedging delay (sent), and hedges whose response started first (won), by route",
            hedges.clone(),
        );

        let rate_limited = Family::default();
        registry.register(
            "rate_limited",
            "Requests refused with 429 by a route's rate limits, by route and kind (requests, tokens)",
            rate_limited.clone(),
        );
        let rate_limit_tokens = Family::default();
        registry.register(
            "rate_limit_tokens",
            "Model tokens charged to a route's token limits up front (estimated), given back after the response's usage or a failure (refunded), or charged on top when usage exceeded the estimate (added)",
            rate_limit_tokens.clone(),
        );
        let faults = Family::default();
        registry.register(
            "faults_injected",
            "Faults injected by a route's faults policy, by route and kind (delay, abort)",
            faults.clone(),
        );
        let mirrored = Family::default();
        registry.register(
            "mirrored_requests",
            "Shadow copies of requests for a route's mirror, by outcome: sent (answered), failed (error, 5xx or time limit), dropped (too many in flight), not_replayable (body not held whole)",
            mirrored.clone(),
        );

        let refusals = Family::default();
        registry.register(
            "refusals",
            "Connections and requests refused before routing (malformed or oversized HTTP, slow request heads, HTTP/2 floods, failed mTLS handshakes, plaintext on a strict port), by listener and reason",
            refusals.clone(),
        );

        let mut genai_registry = Registry::default();
        let genai = crate::genai::GenAiMetrics::register(&mut genai_registry);

        Self {
            registry,
            genai_registry,
            genai,
            refusals,
            outlier_ejections,
            outlier_ejected,
            overloaded,
            penalties,
            prefix_affinity,
            server_queue,
            kv_cache_usage,
            hedges,
            rate_limited,
            rate_limit_tokens,
            faults,
            mirrored,
            local_requests,
            local_model_ready,
            local_batch_size,
            local_queue_wait,
            local_forward,
            local_sequences,
            local_tokens,
            local_dropped,
            retries,
            fallbacks,
            requests,
            in_flight_by_listener: [ListenerKind::Outbound, ListenerKind::Inbound].map(|kind| {
                in_flight
                    .get_or_create(&ListenerLabels {
                        listener: listener_label(kind),
                    })
                    .clone()
            }),
            in_flight,
            duration,
            first_byte,
            connect_errors,
            trace_spans_dropped,
            otlp_metric_exports_failed,
            opaque_connections,
            passthrough,
            inbound_mtls,
            policy_version,
            policy_updates,
            control_plane_connected,
        }
    }

    /// Counts a policy snapshot that was applied or rejected.
    pub fn policy_update(&self, applied: bool) {
        let outcome = if applied { "applied" } else { "rejected" };
        self.policy_updates
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Counts one refusal on `listener` for `reason`.
    pub fn refused(&self, listener: ListenerKind, reason: Reason) {
        self.refusals
            .get_or_create(&RefusalLabels {
                listener: listener_label(listener),
                reason,
            })
            .inc();
    }

    /// The in-flight gauge of `listener`.
    pub fn in_flight_of(&self, listener: ListenerKind) -> &Gauge {
        match listener {
            ListenerKind::Outbound => &self.in_flight_by_listener[0],
            ListenerKind::Inbound => &self.in_flight_by_listener[1],
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // One exposition: the `# EOF` that ends the first is dropped.
        let encoded = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry)
            .and_then(|()| {
                prometheus_client::encoding::text::encode_registry(&mut out, &self.genai_registry)
            })
            .and_then(|()| prometheus_client::encoding::text::encode_eof(&mut out));
        if encoded.is_err() {
            let _ = writeln!(out, "# error encoding metrics");
        }
        out
    }
}
