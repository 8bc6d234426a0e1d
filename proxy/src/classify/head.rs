//! Classification from the request head: method, path and content-type.

use std::fmt;

use http::{HeaderValue, Method};

/// The API a request speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApiKind {
    /// OpenAI `POST /v1/chat/completions`.
    OpenAiChat,
    /// OpenAI `POST /v1/completions`.
    OpenAiCompletions,
    /// OpenAI `POST /v1/embeddings`.
    OpenAiEmbeddings,
    /// OpenAI `GET /v1/models` and `GET /v1/models/{id}`.
    OpenAiModels,
    /// KServe v2 (Open Inference Protocol) over REST.
    KServeRest,
    /// KServe v2 `inference.GRPCInferenceService`.
    KServeGrpc,
    /// Any other gRPC service.
    Grpc,
    /// Any other HTTP request.
    Http,
}

impl ApiKind {
    /// The stable name used in metrics, logs and policy matches.
    pub fn as_str(&self) -> &'static str {
        match self {
            ApiKind::OpenAiChat => "openai_chat",
            ApiKind::OpenAiCompletions => "openai_completions",
            ApiKind::OpenAiEmbeddings => "openai_embeddings",
            ApiKind::OpenAiModels => "openai_models",
            ApiKind::KServeRest => "kserve_rest",
            ApiKind::KServeGrpc => "kserve_grpc",
            ApiKind::Grpc => "grpc",
            ApiKind::Http => "http",
        }
    }

    /// Whether the request is gRPC, so errors must be answered with `grpc-status`.
    pub fn is_grpc(&self) -> bool {
        matches!(self, ApiKind::KServeGrpc | ApiKind::Grpc)
    }
}

impl fmt::Display for ApiKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the head of a request tells about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadClass {
    /// The API kind.
    pub api: ApiKind,
    /// The model name when the path carries it (KServe REST, OpenAI model retrieval).
    pub model: Option<String>,
    /// The gRPC service and method; `Some` exactly when `api.is_grpc()`.
    pub grpc: Option<GrpcMethod>,
    /// Which scan of the body, if any, finds the model name.
    pub body: BodyScan,
}

/// A gRPC service and method, from the path `/pkg.Service/Method`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GrpcMethod {
    /// The fully qualified service, e.g. `inference.GRPCInferenceService`.
    pub service: String,
    /// The method, e.g. `ModelInfer`.
    pub method: String,
}

/// Which body scan finds the model name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyScan {
    /// The body need not be read: the head told everything.
    None,
    /// Scan the JSON body for the top-level `model` and `stream` ([`super::JsonScanner`]).
    OpenAiJson,
    /// Read field 1 of the first gRPC message ([`super::GrpcModelScanner`]).
    GrpcModelName,
}

/// The KServe v2 gRPC service.
const KSERVE_SERVICE: &str = "inference.GRPCInferenceService";

/// Methods of [`KSERVE_SERVICE`] whose request carries the model name in field 1.
const KSERVE_MODEL_METHODS: [&str; 4] = [
    "ModelInfer",
    "ModelStreamInfer",
    "ModelReady",
    "ModelMetadata",
];

/// The last path segment of the KServe v2 REST model endpoints (empty for metadata).
///
/// `generate` and `generate_stream` are the KServe/Triton generate extension.
const KSERVE_MODEL_ACTIONS: [&str; 4] = ["infer", "ready", "generate", "generate_stream"];

/// Classifies a request from its method, path (a query string is ignored) and content-type.
pub fn classify_head(method: &Method, path: &str, content_type: Option<&HeaderValue>) -> HeadClass {
    let path = infermesh_filters::path_only(path);

    if content_type.is_some_and(infermesh_filters::grpc::is_grpc_content_type) {
        if let Some((service, method)) = grpc_path(path) {
            return grpc_class(service, method);
        }
    }
    if let Some(rest) = path.strip_prefix("/v1/") {
        if let Some(class) = openai(method, rest) {
            return class;
        }
    }
    if let Some(rest) = path.strip_prefix("/v2") {
        if let Some(class) = kserve_rest(rest) {
            return class;
        }
    }
    HeadClass::plain(ApiKind::Http, None)
}

impl HeadClass {
    fn plain(api: ApiKind, model: Option<String>) -> Self {
        HeadClass {
            api,
            model,
            grpc: None,
            body: BodyScan::None,
        }
    }
}

/// Splits `/service/method` into its two non-empty parts.
fn grpc_path(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/'))
        .then_some((service, method))
}

fn grpc_class(service: &str, method: &str) -> HeadClass {
    let (api, body) = if service != KSERVE_SERVICE {
        (ApiKind::Grpc, BodyScan::None)
    } else if KSERVE_MODEL_METHODS.contains(&method) {
        (ApiKind::KServeGrpc, BodyScan::GrpcModelName)
    } else {
        (ApiKind::KServeGrpc, BodyScan::None)
    };
    HeadClass {
        api,
        model: None,
        grpc: Some(GrpcMethod {
            service: service.to_owned(),
            method: method.to_owned(),
        }),
        body,
    }
}

/// OpenAI endpoints; `rest` is the path after `/v1/`.
fn openai(method: &Method, rest: &str) -> Option<HeadClass> {
    let api = match rest {
        "chat/completions" => ApiKind::OpenAiChat,
        "completions" => ApiKind::OpenAiCompletions,
        "embeddings" => ApiKind::OpenAiEmbeddings,
        _ => {
            if method != Method::GET {
                return None;
            }
            if rest == "models" || rest == "models/" {
                return Some(HeadClass::plain(ApiKind::OpenAiModels, None));
            }
            // Model ids may contain `/` (`org/model`), so the id is the whole rest.
            let id = rest.strip_prefix("models/")?;
            return Some(HeadClass::plain(ApiKind::OpenAiModels, percent_decode(id)));
        }
    };
    (method == Method::POST).then_some(HeadClass {
        api,
        model: None,
        grpc: None,
        body: BodyScan::OpenAiJson,
    })
}

/// KServe v2 REST endpoints; `rest` is the path after `/v2`.
fn kserve_rest(rest: &str) -> Option<HeadClass> {
    if matches!(rest, "" | "/" | "/health/live" | "/health/ready") {
        return Some(HeadClass::plain(ApiKind::KServeRest, None));
    }
    let mut segments = rest.strip_prefix("/models/")?.split('/');
    let name = segments.next().filter(|name| !name.is_empty())?;
    let mut action = segments.next();
    if action == Some("versions") {
        segments.next().filter(|version| !version.is_empty())?;
        action = segments.next();
    }
    if action.is_some_and(|action| !KSERVE_MODEL_ACTIONS.contains(&action))
        || segments.next().is_some()
    {
        return None;
    }
    Some(HeadClass::plain(ApiKind::KServeRest, percent_decode(name)))
}

/// Decodes `%XX` escapes; a malformed escape stays as written. `None` when the
/// result is empty or not UTF-8, since no model can be named so.
fn percent_decode(s: &str) -> Option<String> {
    if s.is_empty() {
        return None;
    }
    if !s.contains('%') {
        return Some(s.to_owned());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&hi), Some(&lo)) => hex(hi).zip(hex(lo)).map(|(hi, lo)| (hi << 4) | lo),
            _ => None,
        };
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRPC: &str = "application/grpc";
    const JSON: &str = "application/json";

    fn classify(method: Method, path: &str, content_type: Option<&str>) -> HeadClass {
        let content_type = content_type.map(|ct| HeaderValue::from_str(ct).unwrap());
        classify_head(&method, path, content_type.as_ref())
    }

    fn post(path: &str) -> HeadClass {
        classify(Method::POST, path, Some(JSON))
    }

    fn get(path: &str) -> HeadClass {
        classify(Method::GET, path, None)
    }

    fn grpc(path: &str) -> HeadClass {
        classify(Method::POST, path, Some(GRPC))
    }

    fn model(class: &HeadClass) -> Option<&str> {
        class.model.as_deref()
    }

    #[test]
    fn api_kind_names_are_stable() {
        let names = [
            (ApiKind::OpenAiChat, "openai_chat"),
            (ApiKind::OpenAiCompletions, "openai_completions"),
            (ApiKind::OpenAiEmbeddings, "openai_embeddings"),
            (ApiKind::OpenAiModels, "openai_models"),
            (ApiKind::KServeRest, "kserve_rest"),
            (ApiKind::KServeGrpc, "kserve_grpc"),
            (ApiKind::Grpc, "grpc"),
            (ApiKind::Http, "http"),
        ];
        for (kind, name) in names {
            assert_eq!(kind.as_str(), name);
            assert_eq!(kind.to_string(), name);
        }
    }

    #[test]
    fn openai_chat_completions_and_embeddings_need_a_json_scan() {
        for (path, api) in [
            ("/v1/chat/completions", ApiKind::OpenAiChat),
            ("/v1/completions", ApiKind::OpenAiCompletions),
            ("/v1/embeddings", ApiKind::OpenAiEmbeddings),
        ] {
            let class = post(path);
            assert_eq!(class.api, api, "{path}");
            assert_eq!(class.body, BodyScan::OpenAiJson);
            assert_eq!(class.model, None);
            assert_eq!(class.grpc, None);
        }
    }

    #[test]
    fn openai_post_endpoints_ignore_the_query_string() {
        let class = post("/v1/chat/completions?api-version=2024-02-01");
        assert_eq!(class.api, ApiKind::OpenAiChat);
        assert_eq!(class.body, BodyScan::OpenAiJson);
    }

    #[test]
    fn openai_post_endpoints_with_another_method_are_plain_http() {
        assert_eq!(get("/v1/chat/completions").api, ApiKind::Http);
        assert_eq!(get("/v1/embeddings").body, BodyScan::None);
    }

    #[test]
    fn openai_model_list_has_no_model() {
        let class = get("/v1/models");
        assert_eq!(class.api, ApiKind::OpenAiModels);
        assert_eq!(class.model, None);
        assert_eq!(class.body, BodyScan::None);
        assert_eq!(get("/v1/models/").api, ApiKind::OpenAiModels);
    }

    #[test]
    fn openai_model_retrieval_takes_the_model_from_the_path() {
        assert_eq!(model(&get("/v1/models/gpt-4o")), Some("gpt-4o"));
        assert_eq!(get("/v1/models/gpt-4o").api, ApiKind::OpenAiModels);
    }

    #[test]
    fn openai_model_ids_may_hold_slashes_and_percent_escapes() {
        assert_eq!(
            model(&get("/v1/models/meta-llama/Llama-3-8B")),
            Some("meta-llama/Llama-3-8B")
        );
        assert_eq!(
            model(&get("/v1/models/meta-llama%2FLlama-3-8B")),
            Some("meta-llama/Llama-3-8B")
        );
        assert_eq!(model(&get("/v1/models/m?x=1")), Some("m"));
    }

    #[test]
    fn openai_model_retrieval_with_another_method_is_plain_http() {
        assert_eq!(post("/v1/models/gpt-4o").api, ApiKind::Http);
    }

    #[test]
    fn unknown_v1_paths_are_plain_http() {
        for path in [
            "/v1/chat/completions/",
            "/v1/chat",
            "/v1/responses",
            "/v1",
            "/v1/",
        ] {
            assert_eq!(post(path), HeadClass::plain(ApiKind::Http, None), "{path}");
        }
    }

    #[test]
    fn kserve_infer_takes_the_model_from_the_path() {
        let class = post("/v2/models/resnet/infer");
        assert_eq!(class.api, ApiKind::KServeRest);
        assert_eq!(model(&class), Some("resnet"));
        assert_eq!(class.body, BodyScan::None);
    }

    #[test]
    fn kserve_paths_with_versions_name_the_model() {
        for path in [
            "/v2/models/resnet/versions/3/infer",
            "/v2/models/resnet/versions/3/ready",
            "/v2/models/resnet/versions/3",
            "/v2/models/resnet/ready",
            "/v2/models/resnet",
        ] {
            let class = get(path);
            assert_eq!(class.api, ApiKind::KServeRest, "{path}");
            assert_eq!(model(&class), Some("resnet"), "{path}");
        }
    }

    #[test]
    fn kserve_generate_extension_names_the_model() {
        assert_eq!(model(&post("/v2/models/llama/generate")), Some("llama"));
        assert_eq!(
            model(&post("/v2/models/llama/versions/1/generate_stream")),
            Some("llama")
        );
    }

    #[test]
    fn kserve_model_names_are_percent_decoded() {
        assert_eq!(
            model(&post("/v2/models/my%20model/infer")),
            Some("my model")
        );
        assert_eq!(
            model(&post("/v2/models/org%2Fm%C3%A9/infer")),
            Some("org/mé")
        );
        assert_eq!(model(&post("/v2/models/100%25/infer")), Some("100%"));
    }

    #[test]
    fn malformed_percent_escapes_stay_as_written() {
        assert_eq!(model(&post("/v2/models/a%zz/infer")), Some("a%zz"));
        assert_eq!(model(&post("/v2/models/a%2/infer")), Some("a%2"));
        assert_eq!(model(&post("/v2/models/a%/infer")), Some("a%"));
    }

    #[test]
    fn kserve_model_names_that_decode_to_invalid_utf8_have_no_model() {
        let class = post("/v2/models/%FF/infer");
        assert_eq!(class.api, ApiKind::KServeRest);
        assert_eq!(class.model, None);
    }

    #[test]
    fn kserve_server_endpoints_have_no_model() {
        for path in [
            "/v2",
            "/v2/",
            "/v2/health/live",
            "/v2/health/ready",
            "/v2?x",
        ] {
            let class = get(path);
            assert_eq!(class, HeadClass::plain(ApiKind::KServeRest, None), "{path}");
        }
    }

    #[test]
    fn kserve_query_strings_are_ignored() {
        assert_eq!(
            model(&post("/v2/models/resnet/infer?debug=1")),
            Some("resnet")
        );
    }

    #[test]
    fn malformed_kserve_paths_are_plain_http() {
        for path in [
            "/v2/models",
            "/v2/models/",
            "/v2/models//infer",
            "/v2/models/m/",
            "/v2/models/m/versions",
            "/v2/models/m/versions/",
            "/v2/models/m/versions/1/infer/x",
            "/v2/models/m/explain",
            "/v2/models/m/infer/extra",
            "/v2/repository/index",
            "/v2x/models/m/infer",
            "/v2/health",
        ] {
            assert_eq!(post(path).api, ApiKind::Http, "{path}");
        }
    }

    #[test]
    fn kserve_grpc_model_methods_need_a_protobuf_scan() {
        for method in KSERVE_MODEL_METHODS {
            let class = grpc(&format!("/inference.GRPCInferenceService/{method}"));
            assert_eq!(class.api, ApiKind::KServeGrpc);
            assert_eq!(class.body, BodyScan::GrpcModelName);
            let grpc = class.grpc.unwrap();
            assert_eq!(grpc.service, KSERVE_SERVICE);
            assert_eq!(grpc.method, method);
        }
    }

    #[test]
    fn kserve_grpc_server_methods_have_no_model() {
        for method in ["ServerLive", "ServerReady", "ServerMetadata"] {
            let class = grpc(&format!("/inference.GRPCInferenceService/{method}"));
            assert_eq!(class.api, ApiKind::KServeGrpc);
            assert_eq!(class.body, BodyScan::None);
            assert_eq!(class.model, None);
        }
    }

    #[test]
    fn other_grpc_services_are_grpc_with_their_method() {
        let class = grpc("/helloworld.Greeter/SayHello");
        assert_eq!(class.api, ApiKind::Grpc);
        assert_eq!(class.body, BodyScan::None);
        assert_eq!(
            class.grpc,
            Some(GrpcMethod {
                service: "helloworld.Greeter".into(),
                method: "SayHello".into(),
            })
        );
    }

    #[test]
    fn grpc_content_type_variants_are_recognised() {
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc;charset=utf-8",
            "Application/GRPC",
        ] {
            let class = classify(
                Method::POST,
                "/inference.GRPCInferenceService/ModelInfer",
                Some(ct),
            );
            assert_eq!(class.api, ApiKind::KServeGrpc, "{ct}");
        }
    }

    #[test]
    fn grpc_web_and_other_content_types_are_not_grpc() {
        for ct in [
            Some("application/grpc-web"),
            Some("application/grpc-web-text"),
            Some("application/json"),
            Some("application/gr"),
            None,
        ] {
            let class = classify(Method::POST, "/helloworld.Greeter/SayHello", ct);
            assert_eq!(class.api, ApiKind::Http, "{ct:?}");
        }
    }

    #[test]
    fn grpc_content_type_with_a_malformed_path_is_plain_http() {
        for path in ["/", "/svc", "/svc/", "//m", "/svc/m/extra", "svc/m"] {
            assert_eq!(grpc(path).api, ApiKind::Http, "{path}");
        }
    }

    #[test]
    fn grpc_content_type_wins_only_for_grpc_shaped_paths() {
        // Two segments: a gRPC service `v2` with method `models`.
        assert_eq!(grpc("/v2/models").api, ApiKind::Grpc);
        // Three segments are no gRPC path, so the REST rules apply.
        assert_eq!(grpc("/v1/chat/completions").api, ApiKind::OpenAiChat);
    }

    #[test]
    fn anything_else_is_plain_http() {
        for path in [
            "/",
            "",
            "/healthz",
            "/v3/models/m/infer",
            "/V1/chat/completions",
        ] {
            assert_eq!(post(path), HeadClass::plain(ApiKind::Http, None), "{path}");
        }
    }
}
