//! A test OpenTelemetry collector: a real OTLP/gRPC receiver (tonic, the
//! generated `TraceService` server of `opentelemetry-proto`) and a real
//! OTLP/HTTP receiver (hyper, `POST /v1/traces` with a protobuf
//! `ExportTraceServiceRequest`), both decoding the official protobufs and
//! keeping every span they receive; and the same for metrics
//! (`MetricsService`, `POST /v1/metrics`), keeping each histogram point.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1::metric::Data as MetricData;
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

/// Which receiver a span came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    Http,
}

/// An attribute value, as the proxy can set them.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    String(String),
    Bool(bool),
    Int(i64),
    Double(f64),
    Other,
}

/// One received span, flattened.
#[derive(Debug, Clone)]
pub struct Span {
    pub transport: Transport,
    /// `service.name` of its resource.
    pub service: String,
    /// Lowercase hex.
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// OTLP `SpanKind`: 2 server, 3 client.
    pub kind: i32,
    pub attributes: BTreeMap<String, Value>,
    /// OTLP status code: 0 unset, 1 ok, 2 error.
    pub status: i32,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
}

impl Span {
    /// A string attribute.
    pub fn str(&self, key: &str) -> Option<&str> {
        match self.attributes.get(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    /// An integer attribute.
    pub fn int(&self, key: &str) -> Option<i64> {
        match self.attributes.get(key) {
            Some(Value::Int(i)) => Some(*i),
            _ => None,
        }
    }

    /// A boolean attribute.
    pub fn bool(&self, key: &str) -> Option<bool> {
        match self.attributes.get(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    pub fn is_server(&self) -> bool {
        self.kind == 2
    }

    pub fn is_client(&self) -> bool {
        self.kind == 3
    }
}

/// One histogram data point of an export, flattened.
#[derive(Debug, Clone)]
pub struct HistogramPoint {
    pub transport: Transport,
    pub service: String,
    /// The instrument's name and unit.
    pub name: String,
    pub unit: String,
    pub attributes: BTreeMap<String, Value>,
    pub count: u64,
    pub sum: f64,
    /// The boundaries of its buckets.
    pub bounds: Vec<f64>,
}

impl HistogramPoint {
    /// A string attribute.
    pub fn str(&self, key: &str) -> Option<&str> {
        match self.attributes.get(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }
}

#[derive(Default)]
struct Store {
    spans: Mutex<Vec<Span>>,
    /// Histogram points of every metrics export, in arrival order.
    histograms: Mutex<Vec<HistogramPoint>>,
    /// Export requests received, per transport.
    requests: Mutex<Vec<Transport>>,
}

impl Store {
    fn add(&self, transport: Transport, request: ExportTraceServiceRequest) {
        let mut spans = self.spans.lock().unwrap();
        self.requests.lock().unwrap().push(transport);
        for resource_spans in request.resource_spans {
            let service = service_name(resource_spans.resource.as_ref());
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Span {
                        transport,
                        service: service.clone(),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        name: span.name,
                        kind: span.kind,
                        attributes: span
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), value(kv)))
                            .collect(),
                        status: span.status.map_or(0, |s| s.code),
                        start_unix_nano: span.start_time_unix_nano,
                        end_unix_nano: span.end_time_unix_nano,
                    });
                }
            }
        }
    }
}

impl Store {
    fn add_metrics(&self, transport: Transport, request: ExportMetricsServiceRequest) {
        let mut points = self.histograms.lock().unwrap();
        for resource in request.resource_metrics {
            let service = service_name(resource.resource.as_ref());
            for scope in resource.scope_metrics {
                for metric in scope.metrics {
                    let Some(MetricData::Histogram(histogram)) = metric.data else {
                        continue;
                    };
                    for point in histogram.data_points {
                        points.push(HistogramPoint {
                            transport,
                            service: service.clone(),
                            name: metric.name.clone(),
                            unit: metric.unit.clone(),
                            attributes: point
                                .attributes
                                .iter()
                                .map(|kv| (kv.key.clone(), value(kv)))
                                .collect(),
                            count: point.count,
                            sum: point.sum.unwrap_or_default(),
                            bounds: point.explicit_bounds.clone(),
                        });
                    }
                }
            }
        }
    }
}

/// The `service.name` of an export's resource; empty without one.
fn service_name(resource: Option<&Resource>) -> String {
    resource
        .iter()
        .flat_map(|r| &r.attributes)
        .find(|kv| kv.key == "service.name")
        .map(|kv| match value(kv) {
            Value::String(s) => s,
            _ => String::new(),
        })
        .unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value(kv: &KeyValue) -> Value {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => Value::String(s.clone()),
        Some(AnyValue::BoolValue(b)) => Value::Bool(*b),
        Some(AnyValue::IntValue(i)) => Value::Int(*i),
        Some(AnyValue::DoubleValue(d)) => Value::Double(*d),
        _ => Value::Other,
    }
}

/// A running collector with both receivers.
pub struct OtlpCollector {
    grpc: SocketAddr,
    http: SocketAddr,
    store: Arc<Store>,
    _stops: [tokio::sync::oneshot::Sender<()>; 2],
}

struct Grpc(Arc<Store>);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.add(Transport::Grpc, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.0.add_metrics(Transport::Grpc, request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

async fn http_export(
    store: Arc<Store>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, body: Bytes| {
        Ok(Response::builder()
            .status(status)
            .header("content-type", "application/x-protobuf")
            .body(Full::new(body))
            .expect("response"))
    };
    if request.method() != http::Method::POST
        || !matches!(request.uri().path(), "/v1/traces" | "/v1/metrics")
    {
        return reply(StatusCode::NOT_FOUND, Bytes::new());
    }
    let metrics = request.uri().path() == "/v1/metrics";
    let Ok(body) = request.into_body().collect().await else {
        return reply(StatusCode::BAD_REQUEST, Bytes::new());
    };
    // Each export is kept and answered with its (empty) response.
    let body = body.to_bytes();
    let answer = if metrics {
        ExportMetricsServiceRequest::decode(body)
            .ok()
            .map(|export| {
                store.add_metrics(Transport::Http, export);
                ExportMetricsServiceResponse {
                    partial_success: None,
                }
                .encode_to_vec()
            })
    } else {
        ExportTraceServiceRequest::decode(body).ok().map(|export| {
            store.add(Transport::Http, export);
            ExportTraceServiceResponse {
                partial_success: None,
            }
            .encode_to_vec()
        })
    };
    match answer {
        Some(response) => reply(StatusCode::OK, Bytes::from(response)),
        None => reply(StatusCode::BAD_REQUEST, Bytes::new()),
    }
}

impl OtlpCollector {
    /// Starts both receivers on `127.0.0.1:0`.
    pub fn start() -> Self {
        let store = Arc::new(Store::default());
        let grpc_store = store.clone();
        let (grpc, grpc_stop) = crate::spawn_fixture("otlp-grpc", move |listener| async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(Grpc(grpc_store.clone())))
                .add_service(MetricsServiceServer::new(Grpc(grpc_store)))
                .serve_with_incoming(incoming)
                .await;
        });
        let http_store = store.clone();
        let (http, http_stop) = crate::spawn_fixture("otlp-http", move |listener| async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let store = http_store.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req| http_export(store.clone(), req));
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            grpc,
            http,
            store,
            _stops: [grpc_stop, http_stop],
        }
    }

    /// `OTEL_EXPORTER_OTLP_ENDPOINT` of the gRPC receiver.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// `OTEL_EXPORTER_OTLP_ENDPOINT` of the HTTP receiver (the exporter
    /// adds `/v1/traces`).
    pub fn http_endpoint(&self) -> String {
        format!("http://{}", self.http)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.store.spans.lock().unwrap().clone()
    }

    /// Every histogram point received so far, in arrival order (each
    /// export repeats the cumulated points).
    pub fn histograms(&self) -> Vec<HistogramPoint> {
        self.store.histograms.lock().unwrap().clone()
    }

    /// The spans of `trace_id`.
    pub fn trace(&self, trace_id: &str) -> Vec<Span> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }

    /// Waits until `check` accepts the spans received, or `timeout` passes;
    /// returns the spans as they are then.
    pub async fn wait_for(&self, timeout: Duration, check: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if check(&spans) || tokio::time::Instant::now() >= deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}
