//! `kind: MeshConfig`: settings for the whole mesh, or for the workloads
//! it selects.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::duration;
use super::selector::WorkloadSelector;

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
    /// OpenTelemetry traces of the proxies (docs/observability.md); when
    /// absent, each proxy takes the standard `OTEL_*` environment variables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingSettings>,
    /// JSON access logs of the proxies (docs/observability.md); off when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<AccessLogSettings>,
    /// GenAI and request metrics pushed over OTLP beside the Prometheus
    /// endpoint (docs/observability.md); when absent, each proxy takes the
    /// standard `OTEL_METRICS_EXPORTER=otlp` and `OTEL_*` variables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_metrics: Option<OtlpMetricsSettings>,
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

/// Where and how much the proxies trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingSettings {
    /// The OTLP collector, an `http://` or `https://` URL:
    /// `http://collector:4317` for gRPC, `http://collector:4318` for HTTP
    /// (where `/v1/traces` is added unless the URL has a path).
    pub endpoint: String,
    /// `grpc` (OTLP/gRPC, the default) or `http` (OTLP/HTTP with protobuf).
    #[serde(default)]
    pub protocol: TracingProtocol,
    /// The share of traces started at a proxy that are sampled, from 0 to
    /// 1; a request whose caller sent a sampled (or unsampled) context
    /// follows its caller.
    #[serde(default = "defaults::sampling")]
    pub sampling: f64,
}

/// Access logs: a JSON line per request on the proxy's standard output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLogSettings {
    /// A line for every request on every route; a route's own `accessLog`
    /// decides for that route.
    #[serde(default = "defaults::yes")]
    pub requests: bool,
    /// Most lines per second for each refusal reason (requests the proxy
    /// refused itself: 4xx, and connections refused before routing); the
    /// lines left out are counted in the next one's `suppressed`. `0`
    /// writes no refusal lines.
    #[serde(default = "defaults::refusals_per_second")]
    pub refusals_per_second: u32,
}

impl Default for AccessLogSettings {
    fn default() -> Self {
        Self {
            requests: true,
            refusals_per_second: defaults::refusals_per_second(),
        }
    }
}

/// Where and how often the proxies push metrics over OTLP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OtlpMetricsSettings {
    /// The OTLP collector, as for traces: `http://collector:4317` for
    /// gRPC, `http://collector:4318` for HTTP (where `/v1/metrics` is added
    /// unless the URL has a path).
    pub endpoint: String,
    /// `grpc` (the default) or `http`.
    #[serde(default)]
    pub protocol: TracingProtocol,
    /// How often the metrics are pushed.
    #[serde(default = "defaults::otlp_interval", with = "duration")]
    #[schemars(with = "duration::Schema")]
    pub interval: Duration,
}

/// OTLP's transports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum TracingProtocol {
    /// OTLP/gRPC.
    #[default]
    Grpc,
    /// OTLP/HTTP with protobuf bodies.
    Http,
}

mod defaults {
    pub fn sampling() -> f64 {
        0.01
    }
    pub fn yes() -> bool {
        true
    }
    pub fn refusals_per_second() -> u32 {
        10
    }
    pub fn otlp_interval() -> Duration {
        Duration::from_secs(10)
    }

    use std::time::Duration;

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
}
