//! Models the proxy serves itself: `LocalModel` documents, loaded on the
//! embedded wgpu engine (`infermesh-fallback`) and answered in the APIs
//! clients already speak — OpenAI `/v1/embeddings`, KServe v2 REST and gRPC.
//!
//! Loading takes seconds (weights, pipelines), so it happens on a thread of
//! its own, off the request path: a snapshot that names a local model is in
//! force at once, and its local routes answer 503 ("loading") until the
//! model is ready. A model that cannot load (a missing file, no compute
//! adapter) never stops the proxy: it is reported unavailable, with the
//! reason, in the logs, in `/ready` and in every 503 its routes answer,
//! while remote routes keep working. A model whose spec did not change is
//! carried over to the next snapshot with its engine; an unavailable one is
//! loaded again, so a policy push after the files appear brings it up.
//!
//! Which model names a local model answers for: its own `LocalModel` name,
//! and the name a request carries when the route that sent it selected the
//! request by that name (a `model` condition of the route held, as in
//! `model: {exact: text-embedding-3-small}` with a `local:` fallback). A
//! route without a `model` condition (a path or gRPC-service route) sends
//! every name, and those are not the model's: readiness is false for them
//! and inference answers "not found", as a real server does for a model it
//! does not hold. Server health (`/v2/health/*`, gRPC `ServerLive`,
//! `ServerReady`, `ServerMetadata`) is answered the same way over REST and
//! gRPC.
//!
//! The engine knows nothing of HTTP; this module turns requests into texts
//! and vectors into responses. The parsing and rendering functions
//! (`openai`, `kserve`) are pure and tested on their own.

mod kserve;
mod openai;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Response};
use infermesh_fallback::{
    AdapterPreference, DropReason, EngineConfig, EngineError, EngineObserver, LocalEmbedder,
    PassStats,
};
use infermesh_filters::{BoxBody, ProxyError};
use infermesh_proto::policy::{ListenerKind, LocalModelSpec, PolicySet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use crate::classify::ApiKind;
use crate::metrics::{LocalDroppedLabels, LocalModelLabels, Metrics, Name};

/// Most request-body bytes read to answer a request locally; a longer body
/// is refused with 413. 8 MiB holds 2048 inputs of about 1,000 words each,
/// far past what the engine truncates them to.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// A model served by this proxy, in whatever state its loading reached.
#[derive(Debug)]
pub struct LocalModel {
    name: Name,
    spec: LocalModelSpec,
    state: ArcSwap<State>,
    ready: Gauge,
    queue: Queue,
}

/// Sequences waiting for or in a forward pass, bounded by `maxQueued`.
#[derive(Debug)]
struct Queue {
    queued: AtomicUsize,
    limit: usize,
}

/// Sequences admitted to a [`Queue`]; they leave it when this is dropped
/// (the request answered, failed or abandoned by its client).
struct Admitted<'a> {
    queue: &'a Queue,
    sequences: usize,
}

impl Queue {
    fn new(limit: usize) -> Self {
        Self {
            queued: AtomicUsize::new(0),
            limit,
        }
    }

    /// Admits `sequences` unless the queue would pass its limit; a request
    /// finding the queue empty is always admitted, so that one larger than
    /// the limit is not refused forever. `Err` holds the sequences queued.
    fn admit(&self, sequences: usize) -> Result<Admitted<'_>, usize> {
        let before = self.queued.fetch_add(sequences, Ordering::AcqRel);
        if before > 0 && before + sequences > self.limit {
            self.queued.fetch_sub(sequences, Ordering::AcqRel);
            return Err(before);
        }
        Ok(Admitted {
            queue: self,
            sequences,
        })
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.queue
            .queued
            .fetch_sub(self.sequences, Ordering::AcqRel);
    }
}

/// Where a local model stands.
#[derive(Debug)]
pub enum State {
    /// The engine is loading the model.
    Loading,
    /// The model answers requests.
    Ready(Arc<LocalEmbedder>),
    /// The model could not be loaded, for this reason.
    Unavailable(String),
}

impl LocalModel {
    /// The model for `spec`: `old` itself when it has the same spec and did
    /// not fail (its engine and batches carry on), otherwise a new one that
    /// starts loading now.
    pub fn carry_over(
        name: &str,
        spec: &LocalModelSpec,
        old: Option<&Arc<LocalModel>>,
        metrics: &Metrics,
    ) -> Arc<Self> {
        if let Some(old) = old {
            if carries_over(&old.spec, &old.state.load(), spec) {
                return old.clone();
            }
        }
        Self::start(name, spec, metrics)
    }

    /// Starts loading on a thread of its own and returns at once.
    fn start(name: &str, spec: &LocalModelSpec, metrics: &Metrics) -> Arc<Self> {
        let labels = LocalModelLabels {
            model: Name::new(name),
        };
        let ready = metrics.local_model_ready.get_or_create(&labels).clone();
        ready.set(0);
        let model = Arc::new(Self {
            name: Name::new(name),
            spec: spec.clone(),
            state: ArcSwap::from_pointee(State::Loading),
            ready,
            queue: Queue::new(spec.max_queued as usize),
        });
        let observer = Arc::new(Observer::new(metrics, name));
        let config = engine_config(name, spec);
        let loading = model.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("local-load-{name}"))
            .spawn(move || loading.load(config, observer));
        if let Err(error) = spawned {
            model.fail(format!("cannot start the loading thread: {error}"));
        }
        model
    }

    /// Loads the engine (seconds) and records the outcome.
    fn load(&self, config: EngineConfig, observer: Arc<Observer>) {
        let started = Instant::now();
        tracing::info!(
            model = self.name.as_str(),
            model_dir = %config.model_dir.display(),
            max_batch_size = config.max_batch_size,
            max_batch_tokens = config.max_batch_tokens,
            max_wait = ?config.max_wait,
            "loading local model"
        );
        match LocalEmbedder::start_observed(config, observer) {
            Ok(engine) => {
                tracing::info!(
                    model = self.name.as_str(),
                    adapter = engine.adapter(),
                    dimensions = engine.dimensions(),
                    load_ms = started.elapsed().as_millis() as u64,
                    "local model serving"
                );
                self.state.store(Arc::new(State::Ready(Arc::new(engine))));
                self.ready.set(1);
            }
            Err(error) => self.fail(error.to_string()),
        }
    }

    fn fail(&self, reason: String) {
        tracing::error!(
            model = self.name.as_str(),
            %reason,
            "local model unavailable: its routes answer 503 until a policy change loads it again"
        );
        self.state.store(Arc::new(State::Unavailable(reason)));
        self.ready.set(0);
    }

    /// The `LocalModel`'s name.
    pub fn name(&self) -> &Name {
        &self.name
    }

    /// The spec it was loaded from.
    pub fn spec(&self) -> &LocalModelSpec {
        &self.spec
    }

    /// Its current state.
    pub fn state(&self) -> Arc<State> {
        self.state.load_full()
    }

    /// The engine, or why there is none.
    fn engine(&self) -> Result<Arc<LocalEmbedder>, ProxyError> {
        match &**self.state.load() {
            State::Ready(engine) => Ok(engine.clone()),
            State::Loading => Err(self.unavailable("still loading".into())),
            State::Unavailable(reason) => Err(self.unavailable(reason.clone())),
        }
    }

    fn unavailable(&self, reason: String) -> ProxyError {
        ProxyError::LocalUnavailable {
            model: self.name.as_str().to_owned(),
            reason,
        }
    }

    /// Embeds `inputs` after checking them as the remote APIs do, within
    /// the route's time limit: past it, the engine drops what it has not
    /// computed and the answer is the route's timeout.
    async fn embed(
        &self,
        inputs: Vec<String>,
        time_limit: Option<TimeLimit>,
    ) -> Result<Embedded, Failure> {
        let engine = self.engine().map_err(Failure::Proxy)?;
        check_inputs(&inputs, self.spec.max_inputs as usize)?;
        let _admitted = self.queue.admit(inputs.len()).map_err(|queued| {
            Failure::Proxy(self.unavailable(format!(
                "overloaded: {queued} sequences are already queued (maxQueued {}); try again shortly",
                self.queue.limit
            )))
        })?;
        // Tokenizing thousands of texts takes a while: not on a tokio worker.
        let tokenizer = engine.clone();
        let sequences = tokio::task::spawn_blocking(move || tokenizer.tokenize(&inputs))
            .await
            .map_err(|e| Failure::Proxy(self.unavailable(format!("tokenizer task failed: {e}"))))?
            .map_err(|e| self.engine_failure(e))?;
        let prompt_tokens = sequences.iter().map(Vec::len).sum();
        let vectors = engine
            .embed_tokens_by(sequences, time_limit.map(|limit| limit.ends))
            .await
            .map_err(|e| match (e, time_limit) {
                (EngineError::Expired, Some(limit)) => {
                    Failure::Proxy(ProxyError::FirstByteTimeout(limit.limit))
                }
                (e, _) => self.engine_failure(e),
            })?;
        Ok(Embedded {
            dimensions: engine.dimensions(),
            vectors,
            prompt_tokens,
        })
    }

    fn engine_failure(&self, error: EngineError) -> Failure {
        match error {
            EngineError::InvalidInput(message) => Failure::Invalid {
                message,
                param: Some("input"),
            },
            other => Failure::Proxy(self.unavailable(other.to_string())),
        }
    }
}

/// Whether a model loaded (or loading) from `old` serves `new` as it is:
/// the same spec, and not failed (a failed one is tried again, so a push
/// after the files appear brings it up).
fn carries_over(old: &LocalModelSpec, state: &State, new: &LocalModelSpec) -> bool {
    old == new && !matches!(state, State::Unavailable(_))
}

/// The engine settings of a `LocalModel` spec.
fn engine_config(name: &str, spec: &LocalModelSpec) -> EngineConfig {
    let mut config = EngineConfig::new(name, PathBuf::from(&spec.model_dir));
    config.max_batch_size = spec.max_batch_size as usize;
    config.max_batch_tokens = spec.max_batch_tokens as usize;
    config.max_wait = spec.max_wait;
    config.max_tokens = spec.max_tokens as usize;
    config.adapter = match &spec.adapter {
        Some(name) => AdapterPreference {
            name: Some(name.clone()),
        },
        None => AdapterPreference::from_env(),
    };
    config
}

/// Refuses what the remote APIs refuse: no input, too many, empty strings.
fn check_inputs(inputs: &[String], max_inputs: usize) -> Result<(), Failure> {
    let invalid = |message: String| Failure::Invalid {
        message,
        param: Some("input"),
    };
    if inputs.is_empty() {
        return Err(invalid("input must not be empty".into()));
    }
    if inputs.len() > max_inputs {
        return Err(invalid(format!(
            "too many inputs: {} (this model takes at most {max_inputs} per request)",
            inputs.len()
        )));
    }
    if let Some(index) = inputs.iter().position(String::is_empty) {
        return Err(invalid(format!(
            "input[{index}] is an empty string; every input must have text"
        )));
    }
    Ok(())
}

/// Vectors for a request.
#[derive(Debug, Clone, PartialEq)]
struct Embedded {
    dimensions: usize,
    vectors: Vec<Vec<f32>>,
    prompt_tokens: usize,
}

/// Why a local request was not answered with vectors.
#[derive(Debug)]
enum Failure {
    /// The request is wrong: 400 (gRPC `INVALID_ARGUMENT`), in the API's
    /// own error format. `param` names the offending field (OpenAI).
    Invalid {
        message: String,
        param: Option<&'static str>,
    },
    /// The model cannot answer: a proxy error (503).
    Proxy(ProxyError),
}

impl From<ProxyError> for Failure {
    fn from(error: ProxyError) -> Self {
        Failure::Proxy(error)
    }
}

/// Feeds the engine's reports into the model's metrics.
struct Observer {
    batch_size: Histogram,
    queue_wait: Histogram,
    forward: Histogram,
    sequences: Counter,
    tokens: Counter,
    /// Indexed by [`DropReason`]: cancelled, expired.
    dropped: [Counter; 2],
}

impl Observer {
    /// The metric handles of model `name`, resolved once.
    fn new(metrics: &Metrics, name: &str) -> Self {
        let labels = LocalModelLabels {
            model: Name::new(name),
        };
        Self {
            batch_size: metrics.local_batch_size.get_or_create(&labels).clone(),
            queue_wait: metrics.local_queue_wait.get_or_create(&labels).clone(),
            forward: metrics.local_forward.get_or_create(&labels).clone(),
            sequences: metrics.local_sequences.get_or_create(&labels).clone(),
            tokens: metrics.local_tokens.get_or_create(&labels).clone(),
            dropped: [DropReason::Cancelled, DropReason::Expired].map(|reason| {
                metrics
                    .local_dropped
                    .get_or_create(&LocalDroppedLabels {
                        model: Name::new(name),
                        reason: reason.as_str(),
                    })
                    .clone()
            }),
        }
    }
}

impl EngineObserver for Observer {
    fn queued(&self, wait: Duration) {
        self.queue_wait.observe(wait.as_secs_f64());
    }

    fn pass(&self, pass: &PassStats) {
        self.batch_size.observe(pass.sequences as f64);
        self.forward.observe(pass.elapsed.as_secs_f64());
        self.sequences.inc_by(pass.sequences as u64);
        self.tokens.inc_by(pass.tokens as u64);
    }

    fn dropped(&self, reason: DropReason, sequences: usize) {
        let counter = match reason {
            DropReason::Cancelled => &self.dropped[0],
            DropReason::Expired => &self.dropped[1],
        };
        counter.inc_by(sequences as u64);
    }
}

// === the request side ===

/// What the local engine needs to know about a request besides its body.
#[derive(Debug, Clone, Copy)]
pub struct LocalRequest<'a> {
    /// The API, from classification.
    pub api: ApiKind,
    /// The HTTP method.
    pub method: &'a Method,
    /// The request path.
    pub path: &'a str,
    /// The gRPC method, for gRPC requests.
    pub grpc_method: Option<&'a str>,
    /// The model name the client asked for, echoed in responses.
    pub model: Option<&'a str>,
    /// The route selected the request by its model name (a `model`
    /// condition held), so the local model serves that name.
    pub claimed: bool,
    /// The route's time limit, when it has one.
    pub time_limit: Option<TimeLimit>,
}

/// A route's time limit for one request, started when the request was
/// taken up: the engine drops the request's uncomputed sequences once it
/// ends, and the answer is then the route's timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeLimit {
    /// The limit, as the policy gives it.
    pub limit: Duration,
    /// When it runs out.
    pub ends: Instant,
}

impl TimeLimit {
    /// A limit of `limit` starting now.
    pub fn starting_now(limit: Duration) -> Self {
        Self {
            limit,
            ends: infermesh_filters::timeout::std_deadline(Instant::now(), limit),
        }
    }
}

impl LocalRequest<'_> {
    /// Whether `model` answers for the name the request carries: a request
    /// naming no model, the model's own name, or a name its route selected.
    fn names_served_model(&self, model: &LocalModel) -> bool {
        self.claimed || self.model.is_none_or(|name| name == model.name.as_str())
    }
}

/// Whether a local model answers requests of this API: embeddings, model
/// information and KServe v2 inference. A fallback chain skips a local link
/// for anything else (a chat completion), so the client gets the remote
/// failure rather than a confusing "not a chat model".
pub fn serves(api: ApiKind, grpc_method: Option<&str>) -> bool {
    match api {
        ApiKind::OpenAiEmbeddings | ApiKind::OpenAiModels | ApiKind::KServeRest => true,
        ApiKind::KServeGrpc => grpc_method.is_some_and(kserve::grpc_method_served),
        ApiKind::OpenAiChat | ApiKind::OpenAiCompletions | ApiKind::Grpc | ApiKind::Http => false,
    }
}

/// Answers a request with `model`. `Ok` carries every answer the API
/// defines, client errors included; `Err` is a proxy error: the model is
/// unavailable (503) or the body too large (413).
pub async fn serve(
    model: &LocalModel,
    request: LocalRequest<'_>,
    body: Bytes,
) -> Result<Response<BoxBody>, ProxyError> {
    let requested = request.model.unwrap_or(model.name.as_str());
    if !request.names_served_model(model) {
        return Ok(match request.api {
            ApiKind::KServeRest => kserve::rest_not_served(model, requested),
            ApiKind::KServeGrpc => {
                kserve::grpc_not_served(model, request.grpc_method.unwrap_or(""), requested)
            }
            _ => openai::model_not_found(model, requested),
        });
    }
    match request.api {
        ApiKind::OpenAiEmbeddings => {
            openai::embeddings(model, requested, &body, request.time_limit).await
        }
        ApiKind::OpenAiModels => openai::model(model, request.path, requested),
        ApiKind::OpenAiChat | ApiKind::OpenAiCompletions => {
            Ok(openai::not_an_embedding_api(request.api, requested))
        }
        ApiKind::KServeRest => {
            kserve::rest(
                model,
                request.method,
                request.path,
                requested,
                &body,
                request.time_limit,
            )
            .await
        }
        ApiKind::KServeGrpc => {
            kserve::grpc(
                model,
                request.grpc_method.unwrap_or(""),
                requested,
                &body,
                request.time_limit,
            )
            .await
        }
        ApiKind::Grpc => Ok(infermesh_filters::error::grpc_error_response(
            infermesh_filters::error::grpc_code::UNIMPLEMENTED,
            &format!(
                "local model {} serves only inference.GRPCInferenceService",
                model.name.as_str()
            ),
        )),
        ApiKind::Http => Err(ProxyError::NoRoute(format!(
            "{} {} (local model {} answers OpenAI /v1/embeddings and KServe v2 only)",
            request.method,
            request.path,
            model.name.as_str()
        ))),
    }
}

/// `GET /v1/models` when no route takes it: the models the routes of
/// `listener` select by exact name, in OpenAI's list shape, so that an
/// OpenAI client's `models.list()` shows what it can ask for.
pub fn model_list(policy: &PolicySet, listener: ListenerKind) -> Response<BoxBody> {
    openai::model_list(policy, listener)
}

/// Whether a request is OpenAI's `GET /v1/models` (the list, not one model).
pub fn lists_models(method: &Method, path: &str) -> bool {
    method == Method::GET
        && matches!(
            infermesh_filters::path_only(path),
            "/v1/models" | "/v1/models/"
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn message(result: Result<(), Failure>) -> String {
        match result {
            Err(Failure::Invalid { message, param }) => {
                assert_eq!(param, Some("input"));
                message
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn inputs_are_checked_as_the_remote_apis_do() {
        assert!(check_inputs(&strings(&["a", "b"]), 2).is_ok());
        assert_eq!(message(check_inputs(&[], 2)), "input must not be empty");
        assert_eq!(
            message(check_inputs(&strings(&["a", "b", "c"]), 2)),
            "too many inputs: 3 (this model takes at most 2 per request)"
        );
        assert_eq!(
            message(check_inputs(&strings(&["a", ""]), 2)),
            "input[1] is an empty string; every input must have text"
        );
    }

    #[test]
    fn the_engine_answers_embeddings_and_kserve_but_not_chat() {
        assert!(serves(ApiKind::OpenAiEmbeddings, None));
        assert!(serves(ApiKind::KServeRest, None));
        assert!(serves(ApiKind::KServeGrpc, Some("ModelInfer")));
        assert!(serves(ApiKind::KServeGrpc, Some("ModelReady")));
        assert!(!serves(ApiKind::KServeGrpc, Some("ModelStreamInfer")));
        for health in ["ServerLive", "ServerReady", "ServerMetadata"] {
            assert!(serves(ApiKind::KServeGrpc, Some(health)), "{health}");
        }
        assert!(!serves(ApiKind::OpenAiChat, None));
        assert!(!serves(ApiKind::Http, None));
    }

    fn spec() -> LocalModelSpec {
        LocalModelSpec {
            model_dir: "/m".into(),
            max_batch_size: 32,
            max_batch_tokens: 8192,
            max_wait: Duration::from_millis(2),
            max_tokens: 256,
            max_inputs: 2048,
            max_queued: 4096,
            adapter: None,
        }
    }

    #[test]
    fn the_queue_refuses_past_its_limit_and_frees_what_leaves() {
        let queue = Queue::new(10);
        // Alone in an empty queue, even a request past the limit goes in.
        let big = queue.admit(25).unwrap();
        assert_eq!(queue.admit(1).err(), Some(25));
        drop(big);
        let a = queue.admit(6).unwrap();
        let b = queue.admit(4).unwrap();
        assert_eq!(queue.admit(1).err(), Some(10));
        drop(a);
        let c = queue.admit(5).unwrap();
        assert_eq!(queue.queued.load(Ordering::Acquire), 9);
        drop((b, c));
        assert_eq!(queue.queued.load(Ordering::Acquire), 0);
    }

    #[test]
    fn dropped_sequences_are_counted_under_their_reason() {
        let metrics = Metrics::new();
        let observer = Observer::new(&metrics, "m");
        observer.dropped(DropReason::Cancelled, 7);
        observer.dropped(DropReason::Expired, 5);
        observer.dropped(DropReason::Cancelled, 1);
        let count = |reason| {
            metrics
                .local_dropped
                .get_or_create(&LocalDroppedLabels {
                    model: Name::new("m"),
                    reason,
                })
                .get()
        };
        assert_eq!((count("cancelled"), count("expired")), (8, 5));
    }

    #[test]
    fn a_model_carries_over_while_its_spec_stays_and_it_has_not_failed() {
        let old = spec();
        assert!(carries_over(&old, &State::Loading, &spec()));
        let failed = State::Unavailable("config.json is missing".into());
        assert!(!carries_over(&old, &failed, &spec()));
        let mut wider = spec();
        wider.max_batch_size = 64;
        assert!(!carries_over(&old, &State::Loading, &wider));
        let mut elsewhere = spec();
        elsewhere.model_dir = "/n".into();
        assert!(!carries_over(&old, &State::Loading, &elsewhere));
    }

    #[test]
    fn a_spec_becomes_the_engine_settings() {
        let spec = LocalModelSpec {
            model_dir: "models/m".into(),
            max_batch_size: 8,
            max_batch_tokens: 1024,
            max_wait: Duration::from_millis(5),
            max_tokens: 128,
            max_inputs: 16,
            max_queued: 64,
            adapter: Some("llvmpipe".into()),
        };
        let config = engine_config("m", &spec);
        assert_eq!(config.name, "m");
        assert_eq!(config.model_dir, PathBuf::from("models/m"));
        assert_eq!(
            (
                config.max_batch_size,
                config.max_batch_tokens,
                config.max_tokens
            ),
            (8, 1024, 128)
        );
        assert_eq!(config.max_wait, Duration::from_millis(5));
        assert_eq!(config.adapter.name.as_deref(), Some("llvmpipe"));
    }

    /// A model whose files are missing, once it has given up loading.
    fn missing_model(metrics: &Metrics) -> Arc<LocalModel> {
        let spec = LocalModelSpec {
            model_dir: "/nonexistent/model".into(),
            ..spec()
        };
        let model = LocalModel::carry_over("minilm", &spec, None, metrics);
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(*model.state(), State::Loading) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        model
    }

    fn request<'a>(api: ApiKind, path: &'a str, grpc_method: Option<&'a str>) -> LocalRequest<'a> {
        static GET: Method = Method::GET;
        LocalRequest {
            api,
            method: &GET,
            path,
            grpc_method,
            model: None,
            claimed: false,
            time_limit: None,
        }
    }

    /// A unary gRPC body holding `message`.
    fn framed(message: &[u8]) -> Bytes {
        let mut body = vec![0];
        body.extend_from_slice(&(message.len() as u32).to_be_bytes());
        body.extend_from_slice(message);
        Bytes::from(body)
    }

    /// The message of a unary gRPC response, or its `grpc-status`.
    async fn grpc_answer(response: Response<BoxBody>) -> Result<Bytes, String> {
        use http_body_util::BodyExt;
        if let Some(status) = response.headers().get(infermesh_filters::grpc::GRPC_STATUS) {
            return Err(status.to_str().unwrap().to_owned());
        }
        let collected = response.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap_or_default();
        assert_eq!(trailers["grpc-status"], "0");
        Ok(collected.to_bytes().slice(5..))
    }

    #[test]
    fn a_model_serves_its_own_name_and_the_names_its_route_selects() {
        let metrics = Metrics::new();
        let model = missing_model(&metrics);
        let mut request = request(ApiKind::KServeRest, "/v2/models/x/ready", None);
        assert!(request.names_served_model(&model), "no name at all");
        request.model = Some("minilm");
        assert!(request.names_served_model(&model));
        request.model = Some("other");
        assert!(!request.names_served_model(&model));
        request.claimed = true;
        assert!(request.names_served_model(&model));
    }

    #[tokio::test]
    async fn grpc_server_health_is_answered_as_rest_health_is() {
        use infermesh_proto::kserve::{
            ModelReadyResponse, ServerLiveResponse, ServerMetadataResponse, ServerReadyResponse,
        };
        use prost::Message;
        let metrics = Metrics::new();
        let model = missing_model(&metrics);
        let grpc = |method| request(ApiKind::KServeGrpc, "/", Some(method));
        let live = serve(&model, grpc("ServerLive"), framed(&[]))
            .await
            .unwrap();
        let live = ServerLiveResponse::decode(grpc_answer(live).await.unwrap()).unwrap();
        assert!(live.live);
        // The model could not load: live, but not ready, over both APIs.
        let ready = serve(&model, grpc("ServerReady"), framed(&[]))
            .await
            .unwrap();
        let ready = ServerReadyResponse::decode(grpc_answer(ready).await.unwrap()).unwrap();
        assert!(!ready.ready);
        let rest = serve(
            &model,
            request(ApiKind::KServeRest, "/v2/health/ready", None),
            Bytes::new(),
        )
        .await
        .unwrap();
        assert_eq!(rest.status(), http::StatusCode::BAD_REQUEST);
        let rest = serve(
            &model,
            request(ApiKind::KServeRest, "/v2/health/live", None),
            Bytes::new(),
        )
        .await
        .unwrap();
        assert_eq!(rest.status(), http::StatusCode::OK);
        let metadata = serve(&model, grpc("ServerMetadata"), framed(&[]))
            .await
            .unwrap();
        let metadata =
            ServerMetadataResponse::decode(grpc_answer(metadata).await.unwrap()).unwrap();
        assert_eq!(metadata.name, "infermesh-local");

        // A name the route did not select: not ready, and not found.
        let mut other = grpc("ModelReady");
        other.model = Some("other");
        let ready = serve(&model, other, framed(&[])).await.unwrap();
        let ready = ModelReadyResponse::decode(grpc_answer(ready).await.unwrap()).unwrap();
        assert!(!ready.ready);
        let mut infer = grpc("ModelInfer");
        infer.model = Some("other");
        let refused = serve(&model, infer, framed(&[])).await.unwrap();
        assert_eq!(grpc_answer(refused).await.unwrap_err(), "5");
        let mut rest = request(ApiKind::KServeRest, "/v2/models/other/ready", None);
        rest.model = Some("other");
        let refused = serve(&model, rest, Bytes::new()).await.unwrap();
        assert_eq!(refused.status(), http::StatusCode::NOT_FOUND);
        let mut embeddings = request(ApiKind::OpenAiEmbeddings, "/v1/embeddings", None);
        embeddings.model = Some("other");
        let refused = serve(&model, embeddings, Bytes::new()).await.unwrap();
        assert_eq!(refused.status(), http::StatusCode::NOT_FOUND);
    }

    #[test]
    fn the_model_list_holds_the_exact_names_of_the_listeners_routes() {
        let policy = infermesh_proto::policy::load_str(
            std::path::Path::new("p.yaml"),
            "apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {name: vllm}\nspec: {endpoints: [\"127.0.0.1:1\"]}\n---\napiVersion: infermesh.io/v1alpha1\nkind: ModelRoute\nmetadata: {name: chat}\nspec:\n  match: [{model: {exact: llama}}, {model: {prefix: llama-}}, {model: {exact: mistral}}]\n  backends: [{backend: vllm}]\n---\napiVersion: infermesh.io/v1alpha1\nkind: ModelRoute\nmetadata: {name: in}\nspec:\n  listener: inbound\n  match: [{model: {exact: inside}}]\n  backends: [{backend: vllm}]\n",
        );
        let policy = policy.unwrap_or_else(|e| panic!("{e:?}"));
        let list = openai::route_models(&policy, ListenerKind::Outbound);
        assert_eq!(
            list,
            serde_json::json!({"object": "list", "data": [
                {"id": "llama", "object": "model", "created": 0, "owned_by": "vllm"},
                {"id": "mistral", "object": "model", "created": 0, "owned_by": "vllm"},
            ]})
        );
        let inbound = openai::route_models(&policy, ListenerKind::Inbound);
        assert_eq!(inbound["data"][0]["id"], "inside");
        assert!(lists_models(&Method::GET, "/v1/models?limit=5"));
        assert!(!lists_models(&Method::GET, "/v1/models/llama"));
        assert!(!lists_models(&Method::POST, "/v1/models"));
    }

    #[test]
    fn a_model_whose_files_are_missing_is_unavailable_with_the_reason() {
        let metrics = Metrics::new();
        let spec = LocalModelSpec {
            model_dir: "/nonexistent/model".into(),
            max_batch_size: 8,
            max_batch_tokens: 1024,
            max_wait: Duration::from_millis(5),
            max_tokens: 128,
            max_inputs: 16,
            max_queued: 64,
            adapter: None,
        };
        let model = LocalModel::carry_over("m", &spec, None, &metrics);
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(*model.state(), State::Loading) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        match &*model.state() {
            State::Unavailable(reason) => {
                assert!(reason.contains("config.json is missing"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        let error = model.engine().unwrap_err();
        assert_eq!(error.http_status(), http::StatusCode::SERVICE_UNAVAILABLE);
        // The same spec again: a failed model is loaded again, not kept.
        let again = LocalModel::carry_over("m", &spec, Some(&model), &metrics);
        assert!(!Arc::ptr_eq(&model, &again));
    }
}
