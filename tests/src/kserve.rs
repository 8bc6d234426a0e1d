//! A KServe v2 `GRPCInferenceService` model server (tonic), as a fixture.
//!
//! `ModelInfer` echoes `model_name` and `id` with an FP32 output;
//! `ModelStreamInfer` answers each request with N responses a gap apart and
//! can end the stream with a chosen status, message and trailer, to prove
//! that trailers pass through. Every response carries `x-upstream: <name>`
//! in its metadata, and every call is recorded.
//!
//! Per-call overrides travel in request metadata: `x-test-delay-ms` (time to
//! the response), `x-test-responses`, `x-test-gap-ms`, and
//! `x-test-grpc-code` / `x-test-grpc-message` (fail a unary call, or end a
//! stream, with that status).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use http::HeaderMap;
use infermesh_proto::kserve::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use infermesh_proto::kserve::{
    model_infer_request, model_infer_response, model_metadata_response, InferTensorContents,
    ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse,
    ModelReadyRequest, ModelReadyResponse, ModelStreamInferResponse, ServerLiveRequest,
    ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest,
    ServerReadyResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::openai::{StreamLog, StreamOutcome};

/// Behaviour of a [`KServeGrpcServer`]; every field can be changed while it runs.
#[derive(Debug, Clone)]
pub struct KServeSettings {
    /// Responses sent for each request of a `ModelStreamInfer` stream.
    pub stream_responses: usize,
    /// Pause between two streamed responses.
    pub stream_gap: Duration,
    /// Status that ends every `ModelStreamInfer` stream after its responses;
    /// `None` ends it with OK.
    pub stream_end: Option<(Code, String)>,
    /// Pause before answering a unary call.
    pub infer_delay: Duration,
}

impl Default for KServeSettings {
    fn default() -> Self {
        Self {
            stream_responses: 3,
            stream_gap: Duration::from_millis(10),
            stream_end: None,
            infer_delay: Duration::ZERO,
        }
    }
}

/// One call (or one request message of a stream) as the fixture received it.
#[derive(Debug, Clone)]
pub struct GrpcCall {
    /// `ModelInfer`, `ModelStreamInfer`, `ModelReady`, `ModelMetadata`, ….
    pub method: &'static str,
    /// `model_name` (or `name`) from the request message.
    pub model_name: String,
    /// `id` from the request message (empty where there is none).
    pub id: String,
    /// Request metadata (headers).
    pub metadata: HeaderMap,
    pub received_at: Instant,
}

/// Trailer metadata that a stream ended by [`KServeSettings::stream_end`] carries.
pub const END_TRAILER: &str = "x-fixture-trailer";

#[derive(Default)]
struct Shared {
    name: String,
    settings: Mutex<KServeSettings>,
    calls: Mutex<Vec<GrpcCall>>,
    streams: Mutex<Vec<StreamLog>>,
}

/// A KServe v2 gRPC upstream on `127.0.0.1:<port>` (HTTP/2 only).
pub struct KServeGrpcServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl KServeGrpcServer {
    /// Starts a server called `name` (sent back as `x-upstream`) with default settings.
    pub fn start(name: &str) -> Self {
        Self::with_settings(name, KServeSettings::default())
    }

    pub fn with_settings(name: &str, settings: KServeSettings) -> Self {
        Self::bind(SocketAddr::from(([127, 0, 0, 1], 0)), name, settings).expect("bind 127.0.0.1:0")
    }

    /// Starts a server on `addr` (for `infermesh-demo-upstream`, which
    /// needs known ports).
    pub fn bind(addr: SocketAddr, name: &str, settings: KServeSettings) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            name: name.to_string(),
            settings: Mutex::new(settings),
            ..Shared::default()
        });
        let service = Service {
            shared: shared.clone(),
        };
        let (addr, stop) = crate::spawn_fixture_on(
            addr,
            &format!("kserve-{name}"),
            move |listener| async move {
                let incoming = TcpListenerStream::new(listener).map(|accepted| {
                    accepted.inspect(|stream| {
                        let _ = stream.set_nodelay(true);
                    })
                });
                let _ = tonic::transport::Server::builder()
                    .add_service(GrpcInferenceServiceServer::new(service))
                    .serve_with_incoming(incoming)
                    .await;
            },
        )?;
        Ok(Self {
            addr,
            shared,
            _stop: stop,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn update(&self, change: impl FnOnce(&mut KServeSettings)) {
        change(&mut self.shared.settings.lock().unwrap());
    }

    /// Every call received so far.
    pub fn calls(&self) -> Vec<GrpcCall> {
        self.shared.calls.lock().unwrap().clone()
    }

    /// The model names of every call received so far.
    pub fn model_names(&self) -> Vec<String> {
        self.calls().into_iter().map(|c| c.model_name).collect()
    }

    /// Every `ModelStreamInfer` stream so far.
    pub fn streams(&self) -> Vec<StreamLog> {
        self.shared.streams.lock().unwrap().clone()
    }

    /// Waits until the stream at `index` has ended, or `timeout` passes.
    pub async fn wait_stream_end(&self, index: usize, timeout: Duration) -> Option<StreamLog> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.streams().get(index).cloned();
            match log {
                Some(log) if log.outcome != StreamOutcome::Streaming => return Some(log),
                log if Instant::now() >= deadline => return log,
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }
}

struct Service {
    shared: Arc<Shared>,
}

fn metadata_number(metadata: &MetadataMap, name: &str) -> Option<u64> {
    metadata.get(name)?.to_str().ok()?.trim().parse().ok()
}

fn requested_status(metadata: &MetadataMap) -> Option<Status> {
    let code = metadata_number(metadata, "x-test-grpc-code")?;
    let message = metadata
        .get("x-test-grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("status requested by x-test-grpc-code");
    Some(Status::new(Code::from_i32(code as i32), message))
}

impl Service {
    fn record(&self, method: &'static str, model_name: &str, id: &str, metadata: &MetadataMap) {
        self.shared.calls.lock().unwrap().push(GrpcCall {
            method,
            model_name: model_name.to_string(),
            id: id.to_string(),
            metadata: metadata.clone().into_headers(),
            received_at: Instant::now(),
        });
    }

    fn respond<T>(&self, message: T) -> Response<T> {
        let mut response = Response::new(message);
        response.metadata_mut().insert(
            "x-upstream",
            MetadataValue::try_from(self.shared.name.as_str()).expect("fixture name is ASCII"),
        );
        response
    }

    fn settings(&self, metadata: &MetadataMap) -> KServeSettings {
        let mut settings = self.shared.settings.lock().unwrap().clone();
        if let Some(ms) = metadata_number(metadata, "x-test-delay-ms") {
            settings.infer_delay = Duration::from_millis(ms);
        }
        if let Some(n) = metadata_number(metadata, "x-test-responses") {
            settings.stream_responses = n as usize;
        }
        if let Some(ms) = metadata_number(metadata, "x-test-gap-ms") {
            settings.stream_gap = Duration::from_millis(ms);
        }
        if let Some(status) = requested_status(metadata) {
            settings.stream_end = Some((status.code(), status.message().to_string()));
        }
        settings
    }
}

/// The response `ModelInfer` gives: the model name and id echoed, and an FP32
/// output holding each FP32 input value doubled (or `[1.0]` without input).
pub fn infer_response(request: &ModelInferRequest, id: String) -> ModelInferResponse {
    let inputs: Vec<f32> = request
        .inputs
        .iter()
        .filter_map(|t| t.contents.as_ref())
        .flat_map(|c| c.fp32_contents.iter().map(|v| v * 2.0))
        .collect();
    let values = if inputs.is_empty() { vec![1.0] } else { inputs };
    ModelInferResponse {
        model_name: request.model_name.clone(),
        model_version: request.model_version.clone(),
        id,
        parameters: Default::default(),
        outputs: vec![model_infer_response::InferOutputTensor {
            name: "output0".to_string(),
            datatype: "FP32".to_string(),
            shape: vec![values.len() as i64],
            parameters: Default::default(),
            contents: Some(InferTensorContents {
                fp32_contents: values,
                ..Default::default()
            }),
        }],
        raw_output_contents: Vec::new(),
    }
}

/// A `ModelInferRequest` for `model` with one FP32 input `[1.5, -2.0]`; the
/// fixture answers `[3.0, -4.0]`.
pub fn infer_request(model: &str, id: &str) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.to_string(),
        id: id.to_string(),
        inputs: vec![model_infer_request::InferInputTensor {
            name: "input0".to_string(),
            datatype: "FP32".to_string(),
            shape: vec![2],
            parameters: Default::default(),
            contents: Some(InferTensorContents {
                fp32_contents: vec![1.5, -2.0],
                ..Default::default()
            }),
        }],
        ..Default::default()
    }
}

/// A tonic client for the KServe service at `addr` (plaintext HTTP/2).
pub async fn grpc_client(
    addr: SocketAddr,
) -> infermesh_proto::kserve::grpc_inference_service_client::GrpcInferenceServiceClient<
    tonic::transport::Channel,
> {
    infermesh_proto::kserve::grpc_inference_service_client::GrpcInferenceServiceClient::connect(
        format!("http://{addr}"),
    )
    .await
    .unwrap_or_else(|e| panic!("gRPC connect to {addr}: {e}"))
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send>>;

#[tonic::async_trait]
impl GrpcInferenceService for Service {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(self.respond(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(self.respond(ServerReadyResponse { ready: true }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        self.record(
            "ModelReady",
            &request.get_ref().name,
            "",
            request.metadata(),
        );
        Ok(self.respond(ModelReadyResponse { ready: true }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(self.respond(ServerMetadataResponse {
            name: self.shared.name.clone(),
            version: "1".to_string(),
            extensions: Vec::new(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        self.record(
            "ModelMetadata",
            &request.get_ref().name,
            "",
            request.metadata(),
        );
        let tensor = |name: &str| model_metadata_response::TensorMetadata {
            name: name.to_string(),
            datatype: "FP32".to_string(),
            shape: vec![-1],
        };
        Ok(self.respond(ModelMetadataResponse {
            name: request.get_ref().name.clone(),
            versions: vec!["1".to_string()],
            platform: "infermesh-fixture".to_string(),
            inputs: vec![tensor("input0")],
            outputs: vec![tensor("output0")],
        }))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let message = request.get_ref();
        self.record(
            "ModelInfer",
            &message.model_name,
            &message.id,
            request.metadata(),
        );
        let settings = self.settings(request.metadata());
        if !settings.infer_delay.is_zero() {
            tokio::time::sleep(settings.infer_delay).await;
        }
        if let Some(status) = requested_status(request.metadata()) {
            return Err(status);
        }
        Ok(self.respond(infer_response(message, message.id.clone())))
    }

    type ModelStreamInferStream = ResponseStream;

    async fn model_stream_infer(
        &self,
        request: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let settings = self.settings(request.metadata());
        let metadata = request.metadata().clone();
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<ModelStreamInferResponse, Status>>(1);
        let index = {
            let mut streams = self.shared.streams.lock().unwrap();
            streams.push(StreamLog {
                model: String::new(),
                sent: Vec::new(),
                outcome: StreamOutcome::Streaming,
            });
            streams.len() - 1
        };
        let shared = self.shared.clone();
        let recorder = Service {
            shared: shared.clone(),
        };
        tokio::spawn(async move {
            let finish = |outcome: StreamOutcome| {
                if let Some(log) = shared.streams.lock().unwrap().get_mut(index) {
                    log.outcome = outcome;
                }
            };
            let sent = || {
                shared
                    .streams
                    .lock()
                    .unwrap()
                    .get(index)
                    .map_or(0, |l| l.sent.len())
            };
            loop {
                let next = tokio::select! {
                    next = incoming.message() => next,
                    _ = tx.closed() => return finish(StreamOutcome::ClientGone { at: Instant::now(), after_chunks: sent() }),
                };
                let request = match next {
                    Ok(Some(request)) => request,
                    Ok(None) => break,
                    Err(_) => {
                        return finish(StreamOutcome::ClientGone {
                            at: Instant::now(),
                            after_chunks: sent(),
                        })
                    }
                };
                recorder.record(
                    "ModelStreamInfer",
                    &request.model_name,
                    &request.id,
                    &metadata,
                );
                if let Some(log) = shared.streams.lock().unwrap().get_mut(index) {
                    log.model = request.model_name.clone();
                }
                for i in 0..settings.stream_responses {
                    if i > 0 {
                        tokio::select! {
                            _ = tokio::time::sleep(settings.stream_gap) => {}
                            _ = tx.closed() => return finish(StreamOutcome::ClientGone { at: Instant::now(), after_chunks: sent() }),
                        }
                    }
                    let response = ModelStreamInferResponse {
                        error_message: String::new(),
                        infer_response: Some(infer_response(
                            &request,
                            format!("{}-{i}", request.id),
                        )),
                    };
                    if tx.send(Ok(response)).await.is_err() {
                        return finish(StreamOutcome::ClientGone {
                            at: Instant::now(),
                            after_chunks: sent(),
                        });
                    }
                    if let Some(log) = shared.streams.lock().unwrap().get_mut(index) {
                        log.sent.push(Instant::now());
                    }
                }
            }
            if let Some((code, message)) = settings.stream_end {
                let mut trailers = MetadataMap::new();
                trailers.insert(END_TRAILER, MetadataValue::from_static("end-of-stream"));
                let _ = tx
                    .send(Err(Status::with_metadata(code, message, trailers)))
                    .await;
            }
            finish(StreamOutcome::Completed);
        });
        let stream: ResponseStream = Box::pin(ReceiverStream::new(rx));
        Ok(self.respond(stream))
    }
}
