//! The proxy's error type: what went wrong, whose fault it was, whether the
//! request may be tried again, and how the client is told.
//!
//! Filters read [`ProxyError::fault`] and [`ProxyError::retryable`] instead of
//! matching on messages; the stack's edge turns the error into the response
//! the caller's API defines ([`ErrorShape`]): OpenAI's JSON error object on
//! OpenAI and other HTTP paths, KServe v2's `{"error": "<message>"}` on
//! `/v2` paths, a trailers-only response with `grpc-status` for gRPC.
//!
//! ```
//! use http::HeaderMap;
//! use infermesh_filters::error::{ErrorShape, ProxyError};
//!
//! let shape = ErrorShape::of("/v2/models/resnet/infer", &HeaderMap::new());
//! assert_eq!(shape, ErrorShape::KServe);
//! let response = ProxyError::NoRoute("model resnet".into()).to_response(shape);
//! assert_eq!(response.status(), 404);
//! ```

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderMap, HeaderValue, Response, StatusCode};

use crate::body::{self, BoxBody};

/// Who caused an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The request was bad, or asked for something that does not exist.
    Client,
    /// The upstream endpoint failed or was too slow.
    Upstream,
    /// The proxy could not serve the request (no endpoint, no capacity).
    Proxy,
}

/// A failure to serve a request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    /// No route matches the request.
    #[error("no route matches {0}")]
    NoRoute(String),
    /// The proxy follows a control plane and has received no policy from it
    /// yet (nor from its cache): it cannot tell whether a route would match.
    #[error("no policy yet: the proxy is waiting for its first snapshot from the control plane")]
    NoPolicyYet,
    /// The chosen backend has no endpoint to send to.
    #[error("backend {0} has no available endpoint")]
    NoEndpoint(String),
    /// A connection to the endpoint could not be established.
    #[error("connecting to {endpoint} failed: {}", causes(&**.cause))]
    Connect {
        /// `host:port` of the endpoint.
        endpoint: String,
        /// What the connection attempt reported (shared: a rate limit or a
        /// retry hands out clones of one outcome).
        #[source]
        cause: Cause,
    },
    /// The endpoint failed after the connection was established.
    #[error("upstream {endpoint} failed: {}", causes(&**.cause))]
    Upstream {
        /// `host:port` of the endpoint.
        endpoint: String,
        /// What the upstream connection reported.
        #[source]
        cause: Cause,
        /// The request did not reach the server (refused stream, closed idle
        /// connection), so sending it again is safe.
        refused: bool,
    },
    /// No response headers arrived in time.
    #[error("no response within the time-to-first-byte limit of {}", fmt_duration(.0))]
    FirstByteTimeout(Duration),
    /// The request outlived its total lifetime.
    #[error("request exceeded its total lifetime of {}", fmt_duration(.0))]
    TotalTimeout(Duration),
    /// The request is malformed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The client did not send its request (its body) in time.
    #[error("request timeout: {0}")]
    RequestTimeout(String),
    /// An authorization policy refuses the caller this request.
    #[error("permission denied: {0}")]
    Forbidden(String),
    /// The proxy cannot serve the request as configured (a meshed backend
    /// without a mesh identity, say).
    #[error("{0}")]
    Misconfigured(String),
    /// The request body is longer than the proxy will hold to answer it
    /// itself (local models read the whole body).
    #[error("request body too large: {0}")]
    TooLarge(String),
    /// A model the proxy serves itself cannot answer: it failed to load
    /// (missing files, no compute adapter), is still loading, or its device
    /// failed.
    #[error("local model {model} is unavailable: {reason}")]
    LocalUnavailable {
        /// The `LocalModel`'s name.
        model: String,
        /// Why, as the engine reported it.
        reason: String,
    },
    /// A backend's limit on outstanding requests is reached: the request
    /// was refused at once, before reaching any server.
    #[error("backend {backend} is overloaded: {limit} limit of {max} requests reached")]
    Overloaded {
        /// The `Backend`'s name.
        backend: String,
        /// Which limit: `in-flight` or `pending`.
        limit: &'static str,
        /// The limit's value.
        max: u32,
    },
    /// A rate limit of the route refuses the request for now.
    #[error("rate limited: {reason}")]
    RateLimited {
        /// Which limit, for whom.
        reason: String,
        /// How long until the limit would let the request through.
        retry_after: Duration,
    },
    /// A fault injected by the route's `faults` policy (a chaos drill).
    #[error("fault injected by route {route}")]
    FaultInjected {
        /// The route whose policy injected it.
        route: String,
        /// The HTTP status an HTTP client receives.
        status: StatusCode,
        /// The gRPC status a gRPC client receives.
        grpc: u8,
    },
}

/// The cause of an upstream failure, shared between clones of the error.
pub type Cause = Arc<dyn Error + Send + Sync + 'static>;

/// An error and its causes, `outer: inner: innermost`, each cause once.
pub fn error_chain(error: &(dyn Error + 'static)) -> String {
    let mut text = error.to_string();
    append_causes(&mut text, error.source());
    text
}

/// The causes of `error` without `error` itself, for a wrapper whose own
/// message says nothing to the user (hyper's "client error (Connect)");
/// `error` itself when it has no cause.
pub fn causes(error: &(dyn Error + 'static)) -> String {
    let Some(first) = error.source() else {
        return error.to_string();
    };
    let mut text = first.to_string();
    append_causes(&mut text, first.source());
    text
}

fn append_causes(text: &mut String, mut next: Option<&(dyn Error + 'static)>) {
    while let Some(cause) = next {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        next = cause.source();
    }
}

/// The error format of the API a request speaks: each API's clients parse
/// errors in their own shape (tritonclient reads `error` as a string, the
/// openai SDK reads `error.message`, gRPC clients read `grpc-status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorShape {
    /// `{"error": {"type", "message"}}`: OpenAI paths and any other HTTP.
    OpenAi,
    /// `{"error": "<message>"}`: the KServe v2 (Open Inference Protocol) REST
    /// error body, on `/v2` and every path under it.
    KServe,
    /// A trailers-only response with `grpc-status` and `grpc-message`.
    Grpc,
}

impl ErrorShape {
    /// The shape for a request with this path (a query is ignored) and
    /// headers: gRPC by its content type, KServe v2 by its path, OpenAI's
    /// otherwise.
    pub fn of(path: &str, headers: &HeaderMap) -> Self {
        if crate::grpc::is_grpc(headers) {
            return Self::Grpc;
        }
        let path = crate::path_only(path);
        match path.strip_prefix("/v2") {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => Self::KServe,
            _ => Self::OpenAi,
        }
    }
}

fn fmt_duration(d: &Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// gRPC status codes the proxy synthesizes.
pub mod grpc_code {
    /// `INVALID_ARGUMENT`
    pub const INVALID_ARGUMENT: u8 = 3;
    /// `PERMISSION_DENIED`
    pub const PERMISSION_DENIED: u8 = 7;
    /// `NOT_FOUND`
    pub const NOT_FOUND: u8 = 5;
    /// `RESOURCE_EXHAUSTED`
    pub const RESOURCE_EXHAUSTED: u8 = 8;
    /// `DEADLINE_EXCEEDED`
    pub const DEADLINE_EXCEEDED: u8 = 4;
    /// `UNIMPLEMENTED`
    pub const UNIMPLEMENTED: u8 = 12;
    /// `INTERNAL`
    pub const INTERNAL: u8 = 13;
    /// `UNAVAILABLE`
    pub const UNAVAILABLE: u8 = 14;
}

impl ProxyError {
    /// The connection to `endpoint` could not be established because of
    /// `cause`; its message names the causes under a generic wrapper's.
    pub fn connect(
        endpoint: impl Into<String>,
        cause: impl Into<Box<dyn Error + Send + Sync>>,
    ) -> Self {
        Self::Connect {
            endpoint: endpoint.into(),
            cause: Arc::from(cause.into()),
        }
    }

    /// `endpoint` failed after the connection was established; `refused`
    /// when the request certainly did not reach the server.
    pub fn upstream(
        endpoint: impl Into<String>,
        cause: impl Into<Box<dyn Error + Send + Sync>>,
        refused: bool,
    ) -> Self {
        Self::Upstream {
            endpoint: endpoint.into(),
            cause: Arc::from(cause.into()),
            refused,
        }
    }

    /// Who caused the error.
    pub fn fault(&self) -> Fault {
        match self {
            Self::NoRoute(_)
            | Self::BadRequest(_)
            | Self::RequestTimeout(_)
            | Self::Forbidden(_)
            | Self::TooLarge(_) => Fault::Client,
            Self::NoEndpoint(_)
            | Self::NoPolicyYet
            | Self::Misconfigured(_)
            | Self::LocalUnavailable { .. } => Fault::Proxy,
            Self::Overloaded { .. } => Fault::Proxy,
            Self::Connect { .. }
            | Self::Upstream { .. }
            | Self::FirstByteTimeout(_)
            | Self::TotalTimeout(_) => Fault::Upstream,
            Self::RateLimited { .. } => Fault::Client,
            // A drill plays the part of a failing upstream.
            Self::FaultInjected { .. } => Fault::Upstream,
        }
    }

    /// Whether the request certainly did not reach a server, so that trying
    /// it again cannot duplicate work.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::NoEndpoint(_) => true,
            Self::Upstream { refused, .. } => *refused,
            // Refused before any server saw it; the retry filter still
            // leaves it to the fallback chain (see `retry::decide_error`).
            Self::Overloaded { .. } => true,
            _ => false,
        }
    }

    /// Short machine-readable name, the `type` of the JSON error body.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NoRoute(_) => "no_route",
            Self::NoPolicyYet => "no_policy_yet",
            Self::NoEndpoint(_) => "no_endpoint",
            Self::Connect { .. } => "upstream_connect_error",
            Self::Upstream { .. } => "upstream_error",
            Self::FirstByteTimeout(_) | Self::TotalTimeout(_) => "timeout",
            Self::BadRequest(_) => "bad_request",
            Self::RequestTimeout(_) => "request_timeout",
            Self::Forbidden(_) => "permission_denied",
            Self::Misconfigured(_) => "proxy_misconfigured",
            Self::TooLarge(_) => "request_too_large",
            Self::LocalUnavailable { .. } => "local_model_unavailable",
            Self::Overloaded { .. } => "overloaded",
            Self::RateLimited { .. } => "rate_limited",
            Self::FaultInjected { .. } => "fault_injected",
        }
    }

    /// The HTTP status a plain HTTP client receives.
    pub fn http_status(&self) -> StatusCode {
        match self {
            Self::NoRoute(_) => StatusCode::NOT_FOUND,
            Self::NoEndpoint(_)
            | Self::NoPolicyYet
            | Self::Connect { .. }
            | Self::Misconfigured(_)
            | Self::LocalUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Self::FirstByteTimeout(_) | Self::TotalTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::FaultInjected { status, .. } => *status,
        }
    }

    /// The gRPC status a gRPC client receives.
    pub fn grpc_code(&self) -> u8 {
        match self {
            Self::NoRoute(_) => grpc_code::UNIMPLEMENTED,
            Self::NoEndpoint(_)
            | Self::NoPolicyYet
            | Self::Connect { .. }
            | Self::Upstream { .. }
            | Self::Misconfigured(_)
            | Self::LocalUnavailable { .. } => grpc_code::UNAVAILABLE,
            Self::Forbidden(_) => grpc_code::PERMISSION_DENIED,
            Self::FirstByteTimeout(_) | Self::TotalTimeout(_) => grpc_code::DEADLINE_EXCEEDED,
            Self::BadRequest(_) => grpc_code::INVALID_ARGUMENT,
            Self::RequestTimeout(_) => grpc_code::DEADLINE_EXCEEDED,
            Self::TooLarge(_) => grpc_code::RESOURCE_EXHAUSTED,
            // UNAVAILABLE, as gRPC maps HTTP 503: transient, try again or
            // elsewhere. RESOURCE_EXHAUSTED stays for quotas and rate limits,
            // which say "you asked too much" rather than "the server is full".
            Self::Overloaded { .. } => grpc_code::UNAVAILABLE,
            Self::RateLimited { .. } => grpc_code::RESOURCE_EXHAUSTED,
            Self::FaultInjected { grpc, .. } => *grpc,
        }
    }

    /// The response the client receives, in its API's shape: a JSON error
    /// body with the HTTP status, or for gRPC a trailers-only response
    /// carrying `grpc-status` and `grpc-message`.
    pub fn to_response(&self, shape: ErrorShape) -> Response<BoxBody> {
        let mut response = self.error_response(shape);
        if let Some(wait) = self.retry_after() {
            // Whole seconds, rounded up: a client that waits this long gets through.
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        response
    }

    /// How long the client should wait before trying again, when the proxy knows.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    fn error_response(&self, shape: ErrorShape) -> Response<BoxBody> {
        let message = self.to_string();
        let body = match shape {
            ErrorShape::Grpc => return grpc_error_response(self.grpc_code(), &message),
            ErrorShape::OpenAi => serde_json::json!({
                "error": { "type": self.kind(), "message": message }
            }),
            ErrorShape::KServe => serde_json::json!({ "error": message }),
        };
        let mut response = Response::new(body::full(body.to_string()));
        *response.status_mut() = self.http_status();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }
}

/// A trailers-only gRPC response: HTTP 200 whose headers end the stream with
/// `grpc-status` and a percent-encoded `grpc-message`.
pub fn grpc_error_response(code: u8, message: &str) -> Response<BoxBody> {
    let mut response = Response::new(body::empty());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(crate::grpc::GRPC_STATUS, HeaderValue::from(u16::from(code)));
    if let Ok(value) = HeaderValue::from_str(&grpc_percent_encode(message)) {
        headers.insert("grpc-message", value);
    }
    response
}

/// Percent-encodes a `grpc-message` as the gRPC HTTP/2 spec asks: printable
/// ASCII except `%` passes, everything else is `%XX`.
pub fn grpc_percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn no_route_is_a_404_with_a_json_body() {
        let response = ProxyError::NoRoute("model llama".into()).to_response(ErrorShape::OpenAi);
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["type"], "no_route");
        assert!(json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("model llama"));
    }

    #[tokio::test]
    async fn no_policy_yet_is_a_503_and_unavailable_for_grpc() {
        let error = ProxyError::NoPolicyYet;
        assert_eq!(error.fault(), Fault::Proxy);
        assert!(!error.retryable());
        let response = error.to_response(ErrorShape::OpenAi);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["type"], "no_policy_yet");
        let response = error.to_response(ErrorShape::Grpc);
        assert_eq!(response.headers()["grpc-status"], "14");
    }

    #[tokio::test]
    async fn kserve_paths_get_the_kserve_error_body() {
        let error = ProxyError::connect("10.0.0.1:8000", "connection refused");
        let response = error.to_response(ErrorShape::KServe);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"error": "connecting to 10.0.0.1:8000 failed: connection refused"})
        );
    }

    #[test]
    fn the_shape_follows_the_content_type_then_the_path() {
        let none = HeaderMap::new();
        let mut grpc = HeaderMap::new();
        grpc.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        let mut json = HeaderMap::new();
        json.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        for (path, headers, shape) in [
            ("/v2/models/m/infer", &none, ErrorShape::KServe),
            ("/v2/models/m/infer", &json, ErrorShape::KServe),
            ("/v2", &none, ErrorShape::KServe),
            ("/v2/", &none, ErrorShape::KServe),
            ("/v2?x=1", &none, ErrorShape::KServe),
            ("/v2/health/ready", &none, ErrorShape::KServe),
            ("/v2/repository/index", &json, ErrorShape::KServe),
            ("/v2x/models/m", &none, ErrorShape::OpenAi),
            ("/v1/chat/completions", &json, ErrorShape::OpenAi),
            ("/v1/models", &none, ErrorShape::OpenAi),
            ("/healthz", &none, ErrorShape::OpenAi),
            ("/", &none, ErrorShape::OpenAi),
            (
                "/inference.GRPCInferenceService/ModelInfer",
                &grpc,
                ErrorShape::Grpc,
            ),
            ("/v2/models/m/infer", &grpc, ErrorShape::Grpc),
        ] {
            assert_eq!(ErrorShape::of(path, headers), shape, "{path}");
        }
    }

    #[test]
    fn grpc_errors_are_trailers_only_responses() {
        let response =
            ProxyError::FirstByteTimeout(Duration::from_millis(250)).to_response(ErrorShape::Grpc);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], "4");
        assert_eq!(
            response.headers()["grpc-message"],
            "no response within the time-to-first-byte limit of 250ms"
        );
    }

    #[tokio::test]
    async fn an_unavailable_local_model_is_a_503_with_the_reason() {
        let error = ProxyError::LocalUnavailable {
            model: "minilm".into(),
            reason: "model directory /m: config.json is missing".into(),
        };
        assert_eq!(error.fault(), Fault::Proxy);
        assert!(!error.retryable());
        assert_eq!(error.grpc_code(), grpc_code::UNAVAILABLE);
        let response = error.to_response(ErrorShape::OpenAi);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["type"], "local_model_unavailable");
        assert_eq!(
            json["error"]["message"],
            "local model minilm is unavailable: model directory /m: config.json is missing"
        );
    }

    #[tokio::test]
    async fn an_overloaded_backend_is_a_503_overloaded_and_unavailable_for_grpc() {
        let error = ProxyError::Overloaded {
            backend: "vllm".into(),
            limit: "pending",
            max: 8,
        };
        assert_eq!(error.fault(), Fault::Proxy);
        assert!(error.retryable());
        assert_eq!(error.grpc_code(), grpc_code::UNAVAILABLE);
        let response = error.to_response(ErrorShape::OpenAi);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["type"], "overloaded");
        assert_eq!(
            json["error"]["message"],
            "backend vllm is overloaded: pending limit of 8 requests reached"
        );
    }

    #[tokio::test]
    async fn rate_limited_is_a_429_with_retry_after_in_whole_seconds() {
        let error = ProxyError::RateLimited {
            reason: "route chat allows 10 requests per second".into(),
            retry_after: Duration::from_millis(1200),
        };
        assert_eq!(error.fault(), Fault::Client);
        assert!(!error.retryable());
        let response = error.to_response(ErrorShape::OpenAi);
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["type"], "rate_limited");
        let grpc = error.to_response(ErrorShape::Grpc);
        assert_eq!(grpc.headers()["grpc-status"], "8");
        assert_eq!(grpc.headers()[header::RETRY_AFTER], "2");
        let soon = ProxyError::RateLimited {
            reason: String::new(),
            retry_after: Duration::from_millis(5),
        };
        assert_eq!(
            soon.to_response(ErrorShape::OpenAi).headers()[header::RETRY_AFTER],
            "1"
        );
    }

    #[test]
    fn an_injected_fault_answers_with_its_configured_statuses() {
        let error = ProxyError::FaultInjected {
            route: "chat".into(),
            status: StatusCode::SERVICE_UNAVAILABLE,
            grpc: grpc_code::UNAVAILABLE,
        };
        assert_eq!(error.to_response(ErrorShape::OpenAi).status(), 503);
        assert_eq!(
            error.to_response(ErrorShape::Grpc).headers()["grpc-status"],
            "14"
        );
        assert_eq!(error.kind(), "fault_injected");
        assert!(!error.retryable());
    }

    /// hyper's shape: a wrapper that says nothing, over the real causes.
    #[derive(Debug, thiserror::Error)]
    #[error("client error (Connect)")]
    struct Wrapper(#[source] std::io::Error);

    #[test]
    fn an_upstream_failure_keeps_its_cause_and_names_it_without_the_wrapper() {
        let refused =
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let error = ProxyError::connect("10.0.0.1:80", Wrapper(refused));
        assert_eq!(
            error.to_string(),
            "connecting to 10.0.0.1:80 failed: connection refused"
        );
        // The clone a rate limit or a retry hands out shares the cause.
        let clone = error.clone();
        for error in [&error, &clone] {
            let wrapper = error.source().expect("the cause is kept");
            assert_eq!(wrapper.to_string(), "client error (Connect)");
            let io = wrapper
                .source()
                .and_then(|e| e.downcast_ref::<std::io::Error>())
                .expect("the io error under the wrapper");
            assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
        }
        let reset = ProxyError::upstream("10.0.0.1:80", "connection reset", true);
        assert_eq!(
            reset.to_string(),
            "upstream 10.0.0.1:80 failed: connection reset"
        );
        assert!(reset.source().is_some());
        assert!(reset.retryable());
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(grpc_percent_encode("a%b\né"), "a%25b%0A%C3%A9");
    }

    #[test]
    fn only_requests_that_never_reached_a_server_are_retryable() {
        let connect = ProxyError::connect("10.0.0.1:80", "refused");
        assert!(connect.retryable());
        let reset = ProxyError::upstream("10.0.0.1:80", "reset", false);
        assert!(!reset.retryable());
        assert_eq!(reset.fault(), Fault::Upstream);
    }
}
