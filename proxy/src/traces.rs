//! OpenTelemetry traces: a server span per request on each listener, a
//! client span per upstream attempt, W3C `traceparent`/`tracestate`
//! propagation (and B3 read), parent-based ratio sampling, export over
//! OTLP gRPC or HTTP/protobuf from a thread of its own.
//!
//! Off unless an OTLP endpoint is configured (`OTEL_EXPORTER_OTLP_ENDPOINT`
//! or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`). The request path never waits
//! for export: a finished span goes into a bounded queue with `try_send`,
//! and a span that finds it full, or is in a batch the collector did not
//! take, is counted in `infermesh_trace_spans_dropped_total`. An unsampled
//! request creates no span: the proxy forwards its headers unchanged.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use infermesh_filters::trace::RequestTrace;
use infermesh_proto::policy::{TracingProtocol, TracingSettings};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanBuilder, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags,
    TraceId, TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, Span, SpanData, SpanExporter as _, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use prometheus_client::metrics::counter::Counter;

/// How spans leave the proxy.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The collector: `http://host:4317` for gRPC, `http://host:4318` for
    /// HTTP (the `/v1/traces` path is added, as the OTLP spec says for
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; a `..._TRACES_ENDPOINT` is used as is).
    pub endpoint: String,
    /// OTLP over gRPC or HTTP/protobuf.
    pub protocol: ExportProtocol,
    /// The share of traces started here that are sampled (0 to 1); a
    /// request with a sampled parent is always sampled, one with an
    /// unsampled parent never.
    pub ratio: f64,
    /// `service.name` of the spans.
    pub service_name: String,
    /// Finished spans waiting for export; more are dropped.
    pub max_queue: usize,
    /// Spans per export request.
    pub max_batch: usize,
    /// How long a span may wait for its batch to fill.
    pub delay: Duration,
    /// How long an export may take before its batch is dropped.
    pub timeout: Duration,
}

/// OTLP's two protobuf transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportProtocol {
    /// OTLP/gRPC.
    Grpc,
    /// OTLP/HTTP with protobuf bodies.
    HttpProtobuf,
}

/// A tracing setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TracesError {
    /// An environment variable holds a value the proxy cannot use.
    #[error("{name}={value:?}: {reason}")]
    Env {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The exporter could not be built.
    #[error("cannot build the OTLP exporter")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
    /// The export thread could not start.
    #[error("cannot start the trace export thread")]
    Thread(#[source] std::io::Error),
}

impl Settings {
    /// The settings of the standard `OTEL_*` environment variables; the
    /// endpoint is empty (no export) when none is set or
    /// `OTEL_SDK_DISABLED=true`. The queue and batch settings also apply to
    /// a `MeshConfig`'s `tracing`.
    pub fn from_env() -> Result<Settings, TracesError> {
        Self::from_vars(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()))
    }

    /// Whether these settings export (an endpoint is set).
    pub fn exports(&self) -> bool {
        !self.endpoint.is_empty()
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Settings, TracesError> {
        let disabled =
            var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let protocol_name = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
        let (protocol_var, protocol) = match var(protocol_name) {
            Some(value) => (protocol_name, Some(value)),
            None => (
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                var("OTEL_EXPORTER_OTLP_PROTOCOL"),
            ),
        };
        let protocol = match protocol.as_deref().map(str::trim) {
            None | Some("grpc") => ExportProtocol::Grpc,
            Some("http/protobuf") => ExportProtocol::HttpProtobuf,
            Some(other) => {
                return Err(TracesError::Env {
                    name: protocol_var,
                    value: other.to_string(),
                    reason: "the proxy exports over `grpc` or `http/protobuf`",
                })
            }
        };
        let endpoint = match (
            var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            var("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            (Some(endpoint), _) => endpoint.trim().to_string(),
            (None, Some(base)) => match protocol {
                ExportProtocol::Grpc => base.trim().to_string(),
                ExportProtocol::HttpProtobuf => {
                    format!("{}/v1/traces", base.trim().trim_end_matches('/'))
                }
            },
            (None, None) => String::new(),
        };
        let endpoint = if disabled { String::new() } else { endpoint };
        let ratio = match var("OTEL_TRACES_SAMPLER_ARG") {
            None => 1.0,
            Some(value) => match value.trim().parse::<f64>() {
                Ok(ratio) if (0.0..=1.0).contains(&ratio) => ratio,
                _ => {
                    return Err(TracesError::Env {
                        name: "OTEL_TRACES_SAMPLER_ARG",
                        value,
                        reason: "the sampling ratio is a number from 0 to 1",
                    })
                }
            },
        };
        let number = |name: &'static str, default: u64| match var(name) {
            None => Ok(default),
            Some(value) => match value.trim().parse::<u64>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(TracesError::Env {
                    name,
                    value,
                    reason: "a positive whole number",
                }),
            },
        };
        Ok(Settings {
            endpoint,
            protocol,
            ratio,
            service_name: var("OTEL_SERVICE_NAME").unwrap_or_else(|| "infermesh-proxy".into()),
            max_queue: number("OTEL_BSP_MAX_QUEUE_SIZE", 2048)? as usize,
            max_batch: number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)? as usize,
            delay: Duration::from_millis(number("OTEL_BSP_SCHEDULE_DELAY", 5000)?),
            timeout: Duration::from_millis(number("OTEL_BSP_EXPORT_TIMEOUT", 30000)?),
        })
    }
}

impl Settings {
    /// A policy's settings (`MeshConfig` `spec.tracing`); the queue and
    /// batches as the environment sets them.
    fn from_mesh(mesh: &TracingSettings, env: &Settings) -> Settings {
        let protocol = match mesh.protocol {
            TracingProtocol::Grpc => ExportProtocol::Grpc,
            TracingProtocol::Http => ExportProtocol::HttpProtobuf,
        };
        let endpoint = policy_endpoint(
            &mesh.endpoint,
            protocol == ExportProtocol::HttpProtobuf,
            "traces",
        );
        Settings {
            endpoint,
            protocol,
            ratio: mesh.sampling,
            ..env.clone()
        }
    }
}

/// The collector URL of a policy's OTLP `endpoint`: for OTLP/HTTP, with
/// the signal's path (`/v1/traces`, `/v1/metrics`) unless it has one.
pub fn policy_endpoint(endpoint: &str, http: bool, signal: &str) -> String {
    let endpoint = endpoint.trim().trim_end_matches('/');
    let has_path = endpoint
        .split_once("://")
        .is_some_and(|(_, rest)| rest.contains('/'));
    if http && !has_path {
        format!("{endpoint}/v1/{signal}")
    } else {
        endpoint.to_string()
    }
}

/// The proxy's tracer, once tracing was turned on.
#[derive(Debug)]
pub struct Traces {
    tracer: SdkTracer,
    /// The sampling ratio in force, as `f64` bits.
    ratio: Arc<AtomicU64>,
    /// Off when a new policy turned tracing off.
    on: AtomicBool,
    /// Where the export thread sends.
    target: Arc<Mutex<Target>>,
    /// Held so that the provider lives as long as the process.
    _provider: SdkTracerProvider,
}

/// The collector the export thread sends to; a new generation makes it
/// build a new exporter.
#[derive(Debug, Clone)]
struct Target {
    endpoint: String,
    protocol: ExportProtocol,
    generation: u64,
}

static TRACES: OnceLock<Traces> = OnceLock::new();
static ENV: OnceLock<Settings> = OnceLock::new();

/// The tracer, when tracing is on.
pub fn traces() -> Option<&'static Traces> {
    TRACES.get().filter(|t| t.on.load(Ordering::Relaxed))
}

/// Records the environment's settings, used while no policy sets `tracing`
/// (and for the queue and batches always).
pub fn set_env(settings: Settings) {
    let _ = ENV.set(settings);
}

/// Applies a policy's `MeshConfig` `tracing` (the environment's settings
/// without one): turns tracing on, retargets the export, changes the
/// sampling ratio, or turns tracing off. `dropped` counts the spans that
/// never reached the collector.
pub fn configure(mesh: Option<&TracingSettings>, dropped: &Counter) -> Result<(), TracesError> {
    let env = ENV.get().cloned().map_or_else(Settings::from_env, Ok)?;
    let wanted = match mesh {
        Some(mesh) => Some(Settings::from_mesh(mesh, &env)),
        None => Some(env).filter(Settings::exports),
    };
    match (wanted, TRACES.get()) {
        (None, None) => Ok(()),
        (None, Some(traces)) => {
            if traces.on.swap(false, Ordering::Relaxed) {
                tracing::info!("tracing turned off");
            }
            Ok(())
        }
        (Some(settings), None) => start(settings, dropped.clone()),
        (Some(settings), Some(traces)) => {
            traces
                .ratio
                .store(settings.ratio.to_bits(), Ordering::Relaxed);
            let mut target = traces.target.lock().unwrap_or_else(|p| p.into_inner());
            let retarget =
                target.endpoint != settings.endpoint || target.protocol != settings.protocol;
            if retarget {
                target.endpoint = settings.endpoint.clone();
                target.protocol = settings.protocol;
                target.generation += 1;
            }
            let was_off = !traces.on.swap(true, Ordering::Relaxed);
            if retarget || was_off {
                tracing::info!(endpoint = %settings.endpoint, protocol = ?settings.protocol, ratio = settings.ratio, "exporting traces over OTLP");
            }
            Ok(())
        }
    }
}

/// Turns tracing on for the process: starts the export thread.
fn start(settings: Settings, dropped: Counter) -> Result<(), TracesError> {
    let (sender, receiver) = mpsc::sync_channel(settings.max_queue);
    let (built, ready) = mpsc::sync_channel(1);
    let target = Arc::new(Mutex::new(Target {
        endpoint: settings.endpoint.clone(),
        protocol: settings.protocol,
        generation: 0,
    }));
    let thread_settings = settings.clone();
    let thread_dropped = dropped.clone();
    let thread_target = target.clone();
    std::thread::Builder::new()
        .name("otlp-export".into())
        .spawn(move || {
            export_thread(
                thread_settings,
                thread_target,
                receiver,
                thread_dropped,
                built,
            )
        })
        .map_err(TracesError::Thread)?;
    if let Ok(Err(error)) = ready.recv() {
        return Err(TracesError::Exporter(error));
    }
    let ratio = Arc::new(AtomicU64::new(settings.ratio.to_bits()));
    let provider = SdkTracerProvider::builder()
        // The ratio is drawn in `server_span` before any span is built, so
        // that an unsampled request builds none; the spans built are the
        // sampled ones, and their children follow them.
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
        .with_resource(
            Resource::builder()
                .with_service_name(settings.service_name.clone())
                .build(),
        )
        .with_span_processor(Queue { sender, dropped })
        .build();
    let tracer = provider.tracer("infermesh-proxy");
    let _ = TRACES.set(Traces {
        tracer,
        ratio,
        on: AtomicBool::new(true),
        target,
        _provider: provider,
    });
    tracing::info!(endpoint = %settings.endpoint, protocol = ?settings.protocol, ratio = settings.ratio, "exporting traces over OTLP");
    Ok(())
}

/// Hands finished spans to the export thread without ever waiting.
#[derive(Debug)]
struct Queue {
    sender: SyncSender<SpanData>,
    dropped: Counter,
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        // Full (the collector is slower than the traffic) or disconnected
        // (the export thread is gone): dropped, never waited for.
        if self.sender.try_send(span).is_err() {
            self.dropped.inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Batches queued spans and exports them, on a runtime of its own so that
/// a slow collector never holds a request's worker thread.
fn export_thread(
    settings: Settings,
    target: Arc<Mutex<Target>>,
    spans: mpsc::Receiver<SpanData>,
    dropped: Counter,
    built: SyncSender<Result<(), opentelemetry_otlp::ExporterBuildError>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the trace export runtime");
            let _ = built.send(Ok(()));
            return;
        }
    };
    let build = |target: &Target| {
        let _entered = runtime.enter();
        let builder = opentelemetry_otlp::SpanExporter::builder();
        let built = match target.protocol {
            ExportProtocol::Grpc => builder
                .with_tonic()
                .with_endpoint(target.endpoint.clone())
                .with_timeout(settings.timeout)
                .build(),
            ExportProtocol::HttpProtobuf => builder
                .with_http()
                .with_http_client(
                    opentelemetry_http::hyper::HyperClient::with_default_connector(
                        settings.timeout,
                        None,
                    ),
                )
                .with_endpoint(target.endpoint.clone())
                .with_protocol(Protocol::HttpBinary)
                .with_timeout(settings.timeout)
                .build(),
        };
        built.map(|mut exporter| {
            exporter.set_resource(
                &Resource::builder()
                    .with_service_name(settings.service_name.clone())
                    .build(),
            );
            exporter
        })
    };
    let mut current = target.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut exporter = match build(&current) {
        Ok(exporter) => {
            let _ = built.send(Ok(()));
            Some(exporter)
        }
        Err(error) => {
            let _ = built.send(Err(error));
            return;
        }
    };
    let mut batch = Vec::with_capacity(settings.max_batch);
    loop {
        let wanted = target.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if wanted.generation != current.generation {
            exporter = match build(&wanted) {
                Ok(exporter) => Some(exporter),
                Err(error) => {
                    tracing::error!(endpoint = %wanted.endpoint, error = %error, "cannot export traces there: spans are dropped");
                    None
                }
            };
            current = wanted;
        }
        let deadline = infermesh_filters::timeout::std_deadline(Instant::now(), settings.delay);
        let mut closed = false;
        while batch.len() < settings.max_batch {
            let wait = deadline.saturating_duration_since(Instant::now());
            match spans.recv_timeout(wait) {
                Ok(span) => batch.push(span),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if !batch.is_empty() {
            let count = batch.len() as u64;
            let sent = std::mem::replace(&mut batch, Vec::with_capacity(settings.max_batch));
            let Some(exporter) = &exporter else {
                dropped.inc_by(count);
                continue;
            };
            let outcome = runtime.block_on(async {
                tokio::time::timeout(settings.timeout, exporter.export(sent)).await
            });
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    dropped.inc_by(count);
                    tracing::debug!(%error, spans = count, "trace export failed: spans dropped");
                }
                Err(_) => {
                    dropped.inc_by(count);
                    tracing::debug!(spans = count, "trace export timed out: spans dropped");
                }
            }
        }
        if closed {
            return;
        }
    }
}

/// The trace context a request arrived with: W3C `traceparent` and
/// `tracestate`, else B3 (`b3`, else `X-B3-TraceId`/`X-B3-SpanId`/
/// `X-B3-Sampled`). Malformed headers are ignored: the request starts a
/// trace of its own.
pub fn incoming(headers: &HeaderMap) -> Option<SpanContext> {
    if headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .is_some_and(well_formed_traceparent)
    {
        let cx =
            TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
        let span = cx.span().span_context().clone();
        if span.is_valid() {
            return Some(span);
        }
    }
    b3(headers)
}

/// Field widths the W3C format requires and the SDK's parser does not
/// check (it takes a 31-digit trace id).
fn well_formed_traceparent(value: &str) -> bool {
    let fields: Vec<&str> = value.trim().split('-').collect();
    let lower_hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    fields.len() >= 4
        && [2, 32, 16, 2]
            .iter()
            .zip(&fields)
            .all(|(width, field)| field.len() == *width && lower_hex(field))
}

fn b3(headers: &HeaderMap) -> Option<SpanContext> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (trace, span, sampled) = match text("b3") {
        Some(single) => {
            // {TraceId}-{SpanId}[-{SamplingState}[-{ParentSpanId}]]; a lone
            // sampling state carries no context.
            let mut parts = single.trim().split('-');
            let trace = parts.next()?;
            let span = parts.next()?;
            (trace, span, parts.next())
        }
        None => (
            text("x-b3-traceid")?,
            text("x-b3-spanid")?,
            text("x-b3-flags")
                .filter(|f| f.trim() == "1")
                .map(|_| "d")
                .or_else(|| text("x-b3-sampled")),
        ),
    };
    let (trace, span) = (trace.trim(), span.trim());
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
    if !(trace.len() == 32 || trace.len() == 16) || span.len() != 16 || !hex(trace) || !hex(span) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = match sampled.map(str::trim) {
        Some("1") | Some("d") | Some("true") => TraceFlags::SAMPLED,
        Some("0") | Some("false") => TraceFlags::default(),
        // Deferred: the decision is this proxy's.
        None => DEFERRED,
        Some(_) => return None,
    };
    let context = SpanContext::new(trace_id, span_id, flags, true, TraceState::default());
    context.is_valid().then_some(context)
}

/// The flags of a B3 context that left the sampling decision to this
/// proxy: a bit W3C flags never carry into [`ServerSpan`]s (it is replaced
/// by the decision).
const DEFERRED: TraceFlags = TraceFlags::new(0x80);

/// Whether a B3 context left the sampling decision to this proxy.
fn deferred(context: &SpanContext) -> bool {
    context.trace_flags().to_u8() & DEFERRED.to_u8() != 0
}

/// A request's server span, ended when dropped (with its response).
#[derive(Debug)]
pub struct ServerSpan {
    span: Span,
    trace: RequestTrace,
    /// A copy of a small JSON response body, read for its `model` and
    /// finish reasons when it ends (the response itself streams on
    /// unchanged).
    copy: Option<Vec<u8>>,
}

/// The largest response body copied for its GenAI attributes: a
/// non-streaming completion's JSON; streams are never copied.
const MAX_COPY: u64 = 256 * 1024;

impl Traces {
    /// The server span of a request that arrived with `parent` (its
    /// incoming context), if the request is sampled. An unsampled parent
    /// costs nothing more than parsing its header.
    pub fn server_span(
        &self,
        parent: Option<&SpanContext>,
        listener: &'static str,
        method: &http::Method,
        path: &str,
    ) -> Option<ServerSpan> {
        let ratio = f64::from_bits(self.ratio.load(Ordering::Relaxed));
        let parent_cx = match parent {
            Some(parent) if deferred(parent) => {
                // A B3 context without a decision: this proxy's ratio decides,
                // in the parent's trace.
                let flags = if fastrand::f64() < ratio {
                    TraceFlags::SAMPLED
                } else {
                    return None;
                };
                Context::new().with_remote_span_context(with_flags(parent, flags))
            }
            Some(parent) if !parent.is_sampled() => return None,
            Some(parent) => Context::new().with_remote_span_context(parent.clone()),
            // A trace that starts here: the ratio decides, before anything
            // is built.
            None if fastrand::f64() >= ratio => return None,
            None => Context::new(),
        };
        let span = self.tracer.build_with_context(
            SpanBuilder::from_name(format!("{method} {path}"))
                .with_kind(SpanKind::Server)
                .with_attributes([
                    KeyValue::new("http.request.method", method.to_string()),
                    KeyValue::new("url.path", path.to_string()),
                    KeyValue::new("infermesh.listener", listener),
                ]),
            &parent_cx,
        );
        if !span.span_context().is_sampled() {
            return None;
        }
        let trace = RequestTrace::new(span.span_context().clone());
        Some(ServerSpan {
            span,
            trace,
            copy: None,
        })
    }

    /// The client span of one upstream attempt of a sampled request.
    fn attempt(&self, trace: &RequestTrace, name: String, attributes: Vec<KeyValue>) -> Span {
        let parent = Context::new().with_remote_span_context(trace.parent.clone());
        self.tracer.build_with_context(
            SpanBuilder::from_name(name)
                .with_kind(SpanKind::Client)
                .with_attributes(attributes),
            &parent,
        )
    }
}

/// `context` with other flags.
fn with_flags(context: &SpanContext, flags: TraceFlags) -> SpanContext {
    SpanContext::new(
        context.trace_id(),
        context.span_id(),
        flags,
        context.is_remote(),
        context.trace_state().clone(),
    )
}

impl ServerSpan {
    /// What the request's attempts hang from.
    pub fn trace(&self) -> &RequestTrace {
        &self.trace
    }

    /// The trace id, for the access log.
    pub fn trace_id(&self) -> TraceId {
        self.span.span_context().trace_id()
    }

    /// Records what classifying the request found: the GenAI request
    /// attributes and the caller.
    pub fn classified(
        &mut self,
        api: crate::classify::ApiKind,
        model: Option<&str>,
        stream: bool,
        caller: Option<&infermesh_proto::spiffe::SpiffeId>,
    ) {
        if let Some(operation) = operation_name(api) {
            self.span
                .set_attribute(KeyValue::new("gen_ai.operation.name", operation));
            self.span
                .set_attribute(KeyValue::new("gen_ai.request.stream", stream));
        }
        if let Some(model) = model {
            self.span
                .set_attribute(KeyValue::new("gen_ai.request.model", model.to_string()));
        }
        if let Some(caller) = caller {
            self.span
                .set_attribute(KeyValue::new("infermesh.caller", caller.to_string()));
        }
    }

    /// Records the response the client got, and the route and backend
    /// that served it (empty names are left out).
    pub fn responded(&mut self, status: u16, headers: &HeaderMap, route: &str, backend: &str) {
        let json = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let length = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let (true, Some(length)) = (json, length) {
            if length <= MAX_COPY {
                self.copy = Some(Vec::with_capacity(length as usize));
            }
        }
        if !route.is_empty() {
            self.span
                .set_attribute(KeyValue::new("infermesh.route", route.to_string()));
        }
        if !backend.is_empty() {
            self.span
                .set_attribute(KeyValue::new("infermesh.backend", backend.to_string()));
        }
        self.span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if status >= 500 {
            self.span.set_status(Status::error(status.to_string()));
        }
        let retries = self.trace.attempts().saturating_sub(1);
        self.span
            .set_attribute(KeyValue::new("infermesh.retry_count", i64::from(retries)));
    }

    /// A chunk of the response body passed to the client.
    pub fn body(&mut self, chunk: &[u8]) {
        if let Some(copy) = self.copy.as_mut() {
            if copy.len() + chunk.len() <= MAX_COPY as usize {
                copy.extend_from_slice(chunk);
            } else {
                self.copy = None;
            }
        }
    }

    /// The response body ended: the GenAI response attributes of an
    /// OpenAI completion (`model`, the choices' `finish_reason`).
    pub fn body_ended(&mut self) {
        let Some(copy) = self.copy.take() else {
            return;
        };
        let Ok(answer) = serde_json::from_slice::<serde_json::Value>(&copy) else {
            return;
        };
        if let Some(model) = answer.get("model").and_then(|m| m.as_str()) {
            self.span
                .set_attribute(KeyValue::new("gen_ai.response.model", model.to_string()));
        }
        let reasons: Vec<opentelemetry::StringValue> = answer
            .get("choices")
            .and_then(|c| c.as_array())
            .into_iter()
            .flatten()
            .filter_map(|c| c.get("finish_reason").and_then(|r| r.as_str()))
            .map(|r| r.to_string().into())
            .collect();
        if !reasons.is_empty() {
            self.span.set_attribute(KeyValue::new(
                "gen_ai.response.finish_reasons",
                opentelemetry::Value::Array(reasons.into()),
            ));
        }
    }

    /// What the response measured: the usage the server reported, and the
    /// time to the first chunk of a stream.
    pub fn measured(&mut self, measured: &crate::genai::Measured) {
        for (tokens, key) in [
            (measured.input_tokens, "gen_ai.usage.input_tokens"),
            (measured.output_tokens, "gen_ai.usage.output_tokens"),
        ] {
            if let Some(tokens) = tokens {
                self.span
                    .set_attribute(KeyValue::new(key, tokens.min(i64::MAX as u64) as i64));
            }
        }
        if let (Some(_), Some(first)) = (measured.chunks, measured.time_to_first_token) {
            self.span.set_attribute(KeyValue::new(
                "infermesh.time_to_first_chunk_ms",
                first.as_secs_f64() * 1000.0,
            ));
        }
    }

    /// Records a gRPC status (from the trailers or a trailers-only head).
    pub fn grpc_status(&mut self, status: &str) {
        if let Ok(code) = status.parse::<i64>() {
            self.span
                .set_attribute(KeyValue::new("rpc.grpc.status_code", code));
        }
    }
}

/// Marks a request sent to a link of the fallback chain.
#[derive(Debug, Clone, Copy)]
pub struct FallbackLink;

/// Which kind of attempt a request upstream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptKind {
    /// The first attempt of a request.
    First,
    /// A retry after a failed attempt.
    Retry,
    /// A hedge beside one still in flight.
    Hedge,
    /// A link of the fallback chain.
    Fallback,
    /// A mirror copy (its answer is discarded).
    Mirror,
}

impl AttemptKind {
    fn as_str(self) -> &'static str {
        match self {
            AttemptKind::First => "first",
            AttemptKind::Retry => "retry",
            AttemptKind::Hedge => "hedge",
            AttemptKind::Fallback => "fallback",
            AttemptKind::Mirror => "mirror",
        }
    }
}

/// The client span of one upstream attempt, ended when dropped (with the
/// upstream response's body).
#[derive(Debug)]
pub struct AttemptSpan(Span);

/// Starts the span of an attempt of a sampled request (one that carries a
/// [`RequestTrace`]) and writes its context into the upstream request's
/// `traceparent`/`tracestate`; `hedge` when another attempt of the request
/// is in flight.
pub fn attempt<B>(
    request: &mut http::Request<B>,
    hedge: bool,
    backend: &str,
    address: std::net::SocketAddr,
) -> Option<AttemptSpan> {
    let trace = request.extensions().get::<RequestTrace>()?.clone();
    let traces = traces()?;
    let kind = if request
        .headers()
        .contains_key(infermesh_filters::mirror::MIRROR_HEADER)
    {
        AttemptKind::Mirror
    } else if request
        .extensions()
        .get::<infermesh_filters::retry::TriedEndpoints>()
        .is_some_and(|tried| !tried.0.is_empty())
    {
        AttemptKind::Retry
    } else if hedge {
        AttemptKind::Hedge
    } else if request.extensions().get::<FallbackLink>().is_some() {
        AttemptKind::Fallback
    } else {
        AttemptKind::First
    };
    let trace = &trace;
    let headers = request.headers_mut();
    let number = if kind == AttemptKind::Mirror {
        0
    } else {
        trace.attempt()
    };
    let span = traces.attempt(
        trace,
        format!("{} {backend}", kind.as_str()),
        vec![
            KeyValue::new("infermesh.attempt.kind", kind.as_str()),
            KeyValue::new("infermesh.attempt", i64::from(number)),
            KeyValue::new("infermesh.backend", backend.to_string()),
            KeyValue::new("server.address", address.ip().to_string()),
            KeyValue::new("server.port", i64::from(address.port())),
        ],
    );
    inject(headers, span.span_context());
    Some(AttemptSpan(span))
}

/// Writes `context` as the request's W3C trace context.
fn inject(headers: &mut HeaderMap, context: &SpanContext) {
    let parent = format!(
        "00-{}-{}-{:02x}",
        context.trace_id(),
        context.span_id(),
        context.trace_flags().to_u8() & 0x01
    );
    if let Ok(value) = HeaderValue::from_str(&parent) {
        headers.insert(HeaderName::from_static("traceparent"), value);
    }
    let state = context.trace_state().header();
    match HeaderValue::from_str(&state) {
        Ok(value) if !state.is_empty() => {
            headers.insert(HeaderName::from_static("tracestate"), value);
        }
        _ => {
            headers.remove("tracestate");
        }
    }
}

impl AttemptSpan {
    /// Records the upstream's response head.
    pub fn responded(&mut self, status: http::StatusCode, headers: &HeaderMap) {
        self.0.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status.as_u16()),
        ));
        if let Some(code) = headers
            .get(infermesh_filters::grpc::GRPC_STATUS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<i64>().ok())
        {
            self.0
                .set_attribute(KeyValue::new("rpc.grpc.status_code", code));
        }
        if status.is_server_error() {
            self.0.set_status(Status::error(status.to_string()));
        }
    }

    /// Records an attempt that got no response.
    pub fn failed(mut self, error: &dyn std::fmt::Display) {
        self.0
            .set_attribute(KeyValue::new("error.type", "no_response"));
        self.0.set_status(Status::error(error.to_string()));
    }
}

/// The GenAI operation of an API (`gen_ai.operation.name`, semantic
/// conventions v1.36.0; `inference` is ours, for KServe).
pub fn operation_name(api: crate::classify::ApiKind) -> Option<&'static str> {
    use crate::classify::ApiKind;
    match api {
        ApiKind::OpenAiChat => Some("chat"),
        ApiKind::OpenAiCompletions => Some("text_completion"),
        ApiKind::OpenAiEmbeddings => Some("embeddings"),
        ApiKind::KServeRest | ApiKind::KServeGrpc => Some("inference"),
        ApiKind::OpenAiModels | ApiKind::Grpc | ApiKind::Http => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn w3c_traceparent_and_tracestate_are_read() {
        let context = incoming(&headers(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tracestate", "vendor=value"),
        ]))
        .unwrap();
        assert_eq!(
            context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(context.span_id().to_string(), "00f067aa0ba902b7");
        assert!(context.is_sampled());
        assert!(context.is_remote());
        assert_eq!(context.trace_state().get("vendor"), Some("value"));
        let unsampled = incoming(&headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        )]))
        .unwrap();
        assert!(!unsampled.is_sampled());
    }

    #[test]
    fn malformed_traceparent_headers_are_ignored() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(incoming(&headers(&[("traceparent", bad)])), None, "{bad:?}");
        }
    }

    #[test]
    fn b3_single_and_multi_headers_are_read() {
        let single = incoming(&headers(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
        )]))
        .unwrap();
        assert_eq!(
            single.trace_id().to_string(),
            "80f198ee56343ba864fe8b2a57d3eff7"
        );
        assert_eq!(single.span_id().to_string(), "e457b5a2e4d86bd1");
        assert!(single.is_sampled());
        let multi = incoming(&headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "0"),
        ]))
        .unwrap();
        assert_eq!(
            multi.trace_id().to_string(),
            "0000000000000000463ac35c9f6413ad"
        );
        assert!(!multi.is_sampled());
        let deferred_decision = incoming(&headers(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1",
        )]))
        .unwrap();
        assert!(deferred(&deferred_decision));
        // W3C wins over B3 when both are sent.
        let both = incoming(&headers(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
        ]))
        .unwrap();
        assert_eq!(
            both.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    #[test]
    fn malformed_b3_headers_are_ignored() {
        for bad in [
            "0",
            "1",
            "nothex-e457b5a2e4d86bd1-1",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-x",
            "00000000000000000000000000000000-e457b5a2e4d86bd1-1",
        ] {
            assert_eq!(incoming(&headers(&[("b3", bad)])), None, "{bad:?}");
        }
    }

    #[test]
    fn the_attempt_context_is_written_as_traceparent() {
        let context = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            false,
            TraceState::from_key_value([("vendor", "value")]).unwrap(),
        );
        let mut map = headers(&[("tracestate", "old=1")]);
        inject(&mut map, &context);
        assert_eq!(
            map["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(map["tracestate"], "vendor=value");
        assert_eq!(
            incoming(&map),
            Some(SpanContext::new(
                context.trace_id(),
                context.span_id(),
                TraceFlags::SAMPLED,
                true,
                context.trace_state().clone(),
            ))
        );
    }

    #[test]
    fn settings_follow_the_standard_environment_variables() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert!(!Settings::from_vars(vars(&[])).unwrap().exports());
        let grpc = Settings::from_vars(vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.01"),
        ]))
        .unwrap();
        assert_eq!(grpc.endpoint, "http://collector:4317");
        assert_eq!(grpc.protocol, ExportProtocol::Grpc);
        assert_eq!(grpc.ratio, 0.01);
        let http = Settings::from_vars(vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ]))
        .unwrap();
        assert_eq!(http.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(http.ratio, 1.0);
        let error = Settings::from_vars(vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_TRACES_SAMPLER_ARG", "2"),
        ]))
        .unwrap_err();
        assert!(
            error.to_string().contains("OTEL_TRACES_SAMPLER_ARG"),
            "{error}"
        );
        let error = Settings::from_vars(vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ]))
        .unwrap_err();
        assert!(error.to_string().contains("http/json"), "{error}");
        assert!(!Settings::from_vars(vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_SDK_DISABLED", "true"),
        ]))
        .unwrap()
        .exports());
    }
}
