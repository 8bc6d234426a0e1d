//! The GenAI metrics pushed over OTLP, beside the Prometheus endpoint:
//! `gen_ai.client.token.usage`, `gen_ai.client.operation.duration`,
//! `gen_ai.server.time_to_first_token` and
//! `gen_ai.server.time_per_output_token` (semantic conventions v1.36.0),
//! with the same label values as Prometheus (`infermesh.route`,
//! `infermesh.backend`, `infermesh.caller` beside the `gen_ai.*` ones).
//!
//! Where: `MeshConfig.spec.otlpMetrics`, else the standard variables
//! (`OTEL_METRICS_EXPORTER=otlp` with `OTEL_EXPORTER_OTLP_ENDPOINT`, or
//! `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`; `..._PROTOCOL`;
//! `OTEL_METRIC_EXPORT_INTERVAL` in milliseconds). The SDK aggregates
//! in memory; a thread of its own, with its own runtime, collects and
//! exports every interval, so a slow or absent collector never touches a
//! request. A failed export is counted in
//! `infermesh_otlp_metric_exports_failed_total` and its data is sent again,
//! cumulated, at the next interval.

use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use infermesh_proto::policy::{OtlpMetricsSettings, TracingProtocol};
use opentelemetry::metrics::{Histogram, MeterProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{
    InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Temporality,
};
use opentelemetry_sdk::Resource;
use prometheus_client::metrics::counter::Counter;

use crate::genai::{self, GenAiLabels, Measured};
use crate::name::Name;

/// Where metrics go.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The collector's URL; for HTTP, with its `/v1/metrics` path.
    pub endpoint: String,
    /// OTLP/gRPC, else OTLP/HTTP with protobuf.
    pub grpc: bool,
    /// How often the metrics are pushed.
    pub interval: Duration,
}

impl Target {
    /// The target of the standard variables, if they ask for OTLP metrics.
    pub fn from_env() -> Result<Option<Target>, String> {
        Self::from_vars(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()))
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Target>, String> {
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let exporter = var("OTEL_METRICS_EXPORTER");
        let specific = var("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT");
        let asked = match exporter.as_deref().map(str::trim) {
            Some("none") => return Ok(None),
            Some("otlp") => true,
            Some(other) => {
                return Err(format!(
                    "OTEL_METRICS_EXPORTER={other:?}: the proxy exports metrics over `otlp` (or `none`)"
                ))
            }
            None => specific.is_some(),
        };
        if !asked {
            return Ok(None);
        }
        let protocol = var("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL")
            .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"));
        let grpc = match protocol.as_deref().map(str::trim) {
            None | Some("grpc") => true,
            Some("http/protobuf") => false,
            Some(other) => {
                return Err(format!(
                    "OTEL_EXPORTER_OTLP_PROTOCOL={other:?}: the proxy exports over `grpc` or `http/protobuf`"
                ))
            }
        };
        let endpoint = match (specific, var("OTEL_EXPORTER_OTLP_ENDPOINT")) {
            (Some(endpoint), _) => endpoint.trim().to_string(),
            (None, Some(base)) if grpc => base.trim().to_string(),
            (None, Some(base)) => format!("{}/v1/metrics", base.trim().trim_end_matches('/')),
            (None, None) => {
                return Err(
                    "OTEL_METRICS_EXPORTER=otlp needs OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"
                        .into(),
                )
            }
        };
        let interval = match var("OTEL_METRIC_EXPORT_INTERVAL") {
            None => Duration::from_secs(60),
            Some(ms) => match ms.trim().parse::<u64>() {
                Ok(ms) if ms >= 100 => Duration::from_millis(ms),
                _ => {
                    return Err(format!(
                        "OTEL_METRIC_EXPORT_INTERVAL={ms:?}: milliseconds, at least 100"
                    ))
                }
            },
        };
        Ok(Some(Target {
            endpoint,
            grpc,
            interval,
        }))
    }

    /// The target of a policy's `otlpMetrics`.
    pub fn from_mesh(mesh: &OtlpMetricsSettings) -> Target {
        let grpc = mesh.protocol == TracingProtocol::Grpc;
        Target {
            endpoint: crate::traces::policy_endpoint(&mesh.endpoint, !grpc, "metrics"),
            grpc,
            interval: mesh.interval,
        }
    }
}

/// The instruments, once metrics are exported.
struct Instruments {
    token_usage: Histogram<u64>,
    duration: Histogram<f64>,
    time_to_first_token: Histogram<f64>,
    time_per_output_token: Histogram<f64>,
    /// Where the export thread sends; `None` stops exporting.
    target: Arc<Mutex<Option<Target>>>,
    _provider: SdkMeterProvider,
}

static INSTRUMENTS: OnceLock<Instruments> = OnceLock::new();
static ENV: OnceLock<Option<Target>> = OnceLock::new();

/// Keeps the environment's target, the one in force while no policy sets
/// `otlpMetrics`.
pub fn set_env(target: Option<Target>) {
    let _ = ENV.set(target);
}

/// Exports to the policy's `otlpMetrics`, else to the environment's
/// target, else stops exporting. Starts the export thread the first time.
pub fn configure(mesh: Option<&OtlpMetricsSettings>, failed: &Counter) {
    let target = mesh
        .map(Target::from_mesh)
        .or_else(|| ENV.get().cloned().flatten());
    if let Some(instruments) = INSTRUMENTS.get() {
        let mut current = instruments.target.lock().unwrap_or_else(|p| p.into_inner());
        if *current != target {
            *current = target;
        }
        return;
    }
    let Some(target) = target else {
        return;
    };
    if let Err(error) = start(target, failed.clone()) {
        tracing::error!(%error, "cannot export metrics over OTLP");
    }
}

/// A reader both the provider and the export thread hold.
#[derive(Debug, Clone)]
struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline)
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

fn resource() -> Resource {
    let name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| "infermesh-proxy".into());
    Resource::builder().with_service_name(name).build()
}

fn start(target: Target, failed: Counter) -> Result<(), std::io::Error> {
    let reader = SharedReader(Arc::new(ManualReader::builder().build()));
    let provider = SdkMeterProvider::builder()
        .with_resource(resource())
        .with_reader(reader.clone())
        .build();
    let meter = provider.meter("infermesh-proxy");
    let instruments = Instruments {
        token_usage: meter
            .u64_histogram("gen_ai.client.token.usage")
            .with_unit("{token}")
            .with_description(
                "Tokens per request, input and output, as the model server reported them",
            )
            .with_boundaries(genai::TOKEN_BOUNDS.to_vec())
            .build(),
        duration: meter
            .f64_histogram("gen_ai.client.operation.duration")
            .with_unit("s")
            .with_description(
                "Time from receiving a model request to the end of its response, failures included",
            )
            .with_boundaries(genai::DURATION_BOUNDS.to_vec())
            .build(),
        time_to_first_token: meter
            .f64_histogram("gen_ai.server.time_to_first_token")
            .with_unit("s")
            .with_description(
                "Time from receiving a model request to its first token passing to the client",
            )
            .with_boundaries(genai::FIRST_TOKEN_BOUNDS.to_vec())
            .build(),
        time_per_output_token: meter
            .f64_histogram("gen_ai.server.time_per_output_token")
            .with_unit("s")
            .with_description("Time per output token after the first of a streamed response")
            .with_boundaries(genai::PER_TOKEN_BOUNDS.to_vec())
            .build(),
        target: Arc::new(Mutex::new(Some(target.clone()))),
        _provider: provider,
    };
    let thread_target = instruments.target.clone();
    std::thread::Builder::new()
        .name("otlp-metrics".into())
        .spawn(move || export_thread(reader, thread_target, failed))?;
    let _ = INSTRUMENTS.set(instruments);
    tracing::info!(endpoint = %target.endpoint, grpc = target.grpc, interval = ?target.interval, "exporting metrics over OTLP");
    Ok(())
}

/// Collects and exports every interval, on a runtime of its own.
fn export_thread(reader: SharedReader, target: Arc<Mutex<Option<Target>>>, failed: Counter) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the metric export runtime");
            return;
        }
    };
    let mut current: Option<(Target, opentelemetry_otlp::MetricExporter)> = None;
    loop {
        let wanted = target.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let interval = wanted
            .as_ref()
            .map_or(Duration::from_secs(1), |t| t.interval);
        std::thread::sleep(interval);
        let Some(wanted) = wanted else {
            current = None;
            continue;
        };
        if current.as_ref().is_none_or(|(t, _)| *t != wanted) {
            let _entered = runtime.enter();
            let builder = opentelemetry_otlp::MetricExporter::builder();
            let built = if wanted.grpc {
                builder
                    .with_tonic()
                    .with_endpoint(wanted.endpoint.clone())
                    .with_timeout(Duration::from_secs(10))
                    .build()
            } else {
                builder
                    .with_http()
                    .with_http_client(
                        opentelemetry_http::hyper::HyperClient::with_default_connector(
                            Duration::from_secs(10),
                            None,
                        ),
                    )
                    .with_endpoint(wanted.endpoint.clone())
                    .with_protocol(Protocol::HttpBinary)
                    .with_timeout(Duration::from_secs(10))
                    .build()
            };
            match built {
                Ok(exporter) => current = Some((wanted, exporter)),
                Err(error) => {
                    tracing::error!(endpoint = %wanted.endpoint, %error, "cannot export metrics there");
                    current = None;
                    continue;
                }
            }
        }
        let Some((_, exporter)) = &current else {
            continue;
        };
        let mut metrics = ResourceMetrics::default();
        if reader.collect(&mut metrics).is_err() {
            continue;
        }
        let outcome = runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), exporter.export(&metrics)).await
        });
        if !matches!(outcome, Ok(Ok(()))) {
            failed.inc();
            tracing::debug!(?outcome, "metric export failed");
        }
    }
}

/// Records a finished model request, when metrics are exported.
pub fn record(labels: &GenAiLabels, error_type: &Name, elapsed: Duration, m: &Measured) {
    let Some(instruments) = INSTRUMENTS.get() else {
        return;
    };
    let mut attributes = vec![
        KeyValue::new("gen_ai.operation.name", labels.gen_ai_operation_name),
        KeyValue::new(
            "gen_ai.request.model",
            labels.gen_ai_request_model.as_str().to_string(),
        ),
        KeyValue::new("infermesh.route", labels.route.as_str().to_string()),
        KeyValue::new("infermesh.backend", labels.backend.as_str().to_string()),
        KeyValue::new("infermesh.caller", labels.caller.as_str().to_string()),
    ];
    if error_type.as_str().is_empty() {
        if let Some(ttft) = m.time_to_first_token {
            instruments
                .time_to_first_token
                .record(ttft.as_secs_f64(), &attributes);
        }
        if let Some(per_token) = m.time_per_output_token() {
            instruments
                .time_per_output_token
                .record(per_token.as_secs_f64(), &attributes);
        }
    }
    for (tokens, kind) in [(m.input_tokens, "input"), (m.output_tokens, "output")] {
        if let Some(tokens) = tokens {
            attributes.push(KeyValue::new("gen_ai.token.type", kind));
            instruments.token_usage.record(tokens, &attributes);
            attributes.pop();
        }
    }
    if !error_type.as_str().is_empty() {
        attributes.push(KeyValue::new("error.type", error_type.as_str().to_string()));
    }
    instruments
        .duration
        .record(elapsed.as_secs_f64(), &attributes);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn the_standard_variables_choose_the_target() {
        assert_eq!(Target::from_vars(vars(&[])).unwrap(), None);
        assert_eq!(
            Target::from_vars(vars(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")])).unwrap(),
            None,
            "traces alone do not turn metrics on"
        );
        let grpc = Target::from_vars(vars(&[
            ("OTEL_METRICS_EXPORTER", "otlp"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "5000"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            grpc,
            Target {
                endpoint: "http://c:4317".into(),
                grpc: true,
                interval: Duration::from_secs(5)
            }
        );
        let http = Target::from_vars(vars(&[
            ("OTEL_METRICS_EXPORTER", "otlp"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(http.endpoint, "http://c:4318/v1/metrics");
        assert!(!http.grpc);
        assert!(Target::from_vars(vars(&[("OTEL_METRICS_EXPORTER", "prometheus")])).is_err());
        assert!(Target::from_vars(vars(&[("OTEL_METRICS_EXPORTER", "otlp")])).is_err());
        assert_eq!(
            Target::from_vars(vars(&[
                ("OTEL_METRICS_EXPORTER", "none"),
                ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://c:4317"),
            ]))
            .unwrap(),
            None
        );
    }
}
