//! KServe v2 (Open Inference Protocol) answered by a local model, over REST
//! and gRPC: model metadata and readiness, and inference taking one BYTES
//! input of shape `[n]` (or `[n, 1]`), the texts, and returning one FP32
//! output `embedding` of shape `[n, dimensions]`.
//!
//! gRPC inputs may come in `contents.bytes_contents` or, as Triton's
//! clients send them, in `raw_input_contents` (each element a 4-byte
//! little-endian length and its bytes); the output comes back the same way
//! the input came. REST errors are `{"error": "<message>"}`, the protocol's
//! error body; gRPC errors are `INVALID_ARGUMENT` with the message.

use bytes::{BufMut, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use infermesh_filters::error::{grpc_code, grpc_error_response};
use infermesh_filters::{body, BoxBody, BoxError, ProxyError};
use infermesh_proto::kserve::{
    model_infer_response::InferOutputTensor, model_metadata_response::TensorMetadata,
    InferTensorContents, ModelInferRequest, ModelInferResponse, ModelMetadataRequest,
    ModelMetadataResponse, ModelReadyRequest, ModelReadyResponse, ServerLiveRequest,
    ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest,
    ServerReadyResponse,
};
use prost::Message;
use serde_json::Value;

use super::{Failure, LocalModel, State, TimeLimit};

/// The input and output tensor names the metadata announces. Inference
/// accepts any name for the single input.
const INPUT: &str = "text";
const OUTPUT: &str = "embedding";
const PLATFORM: &str = "infermesh_wgpu";
/// The server name of the server metadata.
const SERVER: &str = "infermesh-local";

/// The gRPC methods a local model answers.
pub(super) fn grpc_method_served(method: &str) -> bool {
    matches!(
        method,
        "ModelInfer"
            | "ModelReady"
            | "ModelMetadata"
            | "ServerLive"
            | "ServerReady"
            | "ServerMetadata"
    )
}

/// What inference was asked for, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Infer {
    /// The request id, echoed.
    pub id: String,
    /// The texts, in order.
    pub texts: Vec<String>,
    /// gRPC: the texts came in `raw_input_contents`, so the vectors go back
    /// in `raw_output_contents`.
    pub raw: bool,
}

// === REST ===

/// What a KServe REST path asks of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action<'a> {
    Metadata,
    Ready,
    Infer,
    /// Another model action (`generate`, ...).
    Other(&'a str),
    /// A server endpoint: `/v2`, `/v2/health/live`, `/v2/health/ready`.
    Server(&'a str),
}

fn action(path: &str) -> Option<Action<'_>> {
    let rest = path.strip_prefix("/v2")?;
    if let Some(server) = match rest {
        "" | "/" => Some(""),
        "/health/live" => Some("live"),
        "/health/ready" => Some("ready"),
        _ => None,
    } {
        return Some(Action::Server(server));
    }
    let mut segments = rest.strip_prefix("/models/")?.split('/');
    segments.next()?;
    let mut action = segments.next();
    if action == Some("versions") {
        segments.next()?;
        action = segments.next();
    }
    Some(match action {
        None | Some("") => Action::Metadata,
        Some("ready") => Action::Ready,
        Some("infer") => Action::Infer,
        Some(other) => Action::Other(other),
    })
}

/// Answers a KServe v2 REST request.
pub(super) async fn rest(
    model: &LocalModel,
    method: &Method,
    path: &str,
    requested: &str,
    body: &[u8],
    time_limit: Option<TimeLimit>,
) -> Result<Response<BoxBody>, ProxyError> {
    let get = method == Method::GET || method == Method::HEAD;
    let Some(action) = action(path) else {
        return Ok(rest_error(
            StatusCode::NOT_FOUND,
            &format!("no KServe v2 endpoint at {path}"),
        ));
    };
    match action {
        Action::Metadata | Action::Ready | Action::Server(_) if !get => Ok(rest_error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{path} answers GET only"),
        )),
        Action::Infer if method != Method::POST => Ok(rest_error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{path} answers POST only"),
        )),
        Action::Server("") => Ok(json(
            StatusCode::OK,
            &serde_json::json!({"name": SERVER, "version": env!("CARGO_PKG_VERSION"), "extensions": []}),
        )),
        Action::Server("live") => Ok(json(StatusCode::OK, &serde_json::json!({"live": true}))),
        Action::Server(_) | Action::Ready => Ok(match &*model.state() {
            State::Ready(_) if action == Action::Ready => json(
                StatusCode::OK,
                &serde_json::json!({"name": requested, "ready": true}),
            ),
            State::Ready(_) => json(StatusCode::OK, &serde_json::json!({"ready": true})),
            // The protocol says not ready with a 4xx; the reason helps a person.
            State::Loading => rest_error(
                StatusCode::BAD_REQUEST,
                &format!("local model {} is still loading", model.name().as_str()),
            ),
            State::Unavailable(reason) => rest_error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "local model {} is unavailable: {reason}",
                    model.name().as_str()
                ),
            ),
        }),
        Action::Metadata => {
            let dimensions = model.engine()?.dimensions();
            Ok(json(StatusCode::OK, &rest_metadata(requested, dimensions)))
        }
        Action::Other(other) => Ok(rest_error(
            StatusCode::NOT_FOUND,
            &format!(
                "local model {} does not support `{other}`; it answers metadata, ready and infer",
                model.name().as_str()
            ),
        )),
        Action::Infer => {
            let infer = match parse_rest(body) {
                Ok(infer) => infer,
                Err(message) => return Ok(rest_error(StatusCode::BAD_REQUEST, &message)),
            };
            match model.embed(infer.texts, time_limit).await {
                Ok(embedded) => {
                    let data = embedded.vectors.concat();
                    let output = RestOutput {
                        model_name: requested,
                        id: (!infer.id.is_empty()).then_some(infer.id.as_str()),
                        outputs: [RestTensor {
                            name: OUTPUT,
                            datatype: "FP32",
                            shape: [embedded.vectors.len(), embedded.dimensions],
                            data: &data,
                        }],
                    };
                    // Plain data always serializes; f32 keeps its short form.
                    let bytes = serde_json::to_vec(&output).unwrap_or_default();
                    let mut response = Response::new(body::full(bytes));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    Ok(response)
                }
                Err(Failure::Invalid { message, .. }) => {
                    Ok(rest_error(StatusCode::BAD_REQUEST, &message))
                }
                Err(Failure::Proxy(error)) => Err(error),
            }
        }
    }
}

/// A REST inference response.
#[derive(serde::Serialize)]
struct RestOutput<'a> {
    model_name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: [RestTensor<'a>; 1],
}

#[derive(serde::Serialize)]
struct RestTensor<'a> {
    name: &'static str,
    datatype: &'static str,
    shape: [usize; 2],
    data: &'a [f32],
}

fn rest_metadata(name: &str, dimensions: usize) -> Value {
    serde_json::json!({
        "name": name,
        "versions": [],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, dimensions]}],
    })
}

/// Reads a REST inference request: one BYTES input whose `data` holds the
/// texts (flat, or nested as its shape says).
pub(super) fn parse_rest(body: &[u8]) -> Result<Infer, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        format!("the request body is not valid JSON ({e}); binary tensor data is not supported by the local engine, send the texts in `data`")
    })?;
    let Value::Object(fields) = value else {
        return Err("the request body must be a JSON object".into());
    };
    let id = match fields.get("id") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(id)) => id.clone(),
        Some(_) => return Err("`id` must be a string".into()),
    };
    let inputs = match fields.get("inputs") {
        Some(Value::Array(inputs)) => inputs,
        _ => return Err("`inputs` must be an array holding one BYTES input".into()),
    };
    let [input] = inputs.as_slice() else {
        return Err(format!(
            "expected exactly one input (BYTES, shape [n]), found {}",
            inputs.len()
        ));
    };
    let name = input.get("name").and_then(Value::as_str).unwrap_or("");
    let datatype = input.get("datatype").and_then(Value::as_str).unwrap_or("");
    if datatype != "BYTES" {
        return Err(format!(
            "input `{name}` must have datatype BYTES (texts), found {datatype:?}"
        ));
    }
    if input
        .get("parameters")
        .and_then(|p| p.get("binary_data_size"))
        .is_some()
    {
        return Err(format!("input `{name}`: binary tensor data is not supported by the local engine; send the texts in `data`"));
    }
    let shape: Vec<i64> = match input.get("shape") {
        Some(Value::Array(dims)) => dims
            .iter()
            .map(|d| d.as_i64().filter(|d| *d >= 0))
            .collect::<Option<_>>()
            .ok_or_else(|| format!("input `{name}`: `shape` must be non-negative integers"))?,
        _ => return Err(format!("input `{name}` has no `shape`")),
    };
    let mut texts = Vec::new();
    match input.get("data") {
        Some(data) => flatten(data, &mut texts, name)?,
        None => return Err(format!("input `{name}` has no `data`")),
    }
    check_shape(name, &shape, texts.len())?;
    if let Some(outputs) = fields.get("outputs") {
        let Value::Array(outputs) = outputs else {
            return Err("`outputs` must be an array".into());
        };
        for output in outputs {
            let wanted = output.get("name").and_then(Value::as_str).unwrap_or("");
            check_output(wanted)?;
        }
    }
    Ok(Infer {
        id,
        texts,
        raw: false,
    })
}

fn flatten(value: &Value, texts: &mut Vec<String>, name: &str) -> Result<(), String> {
    match value {
        Value::String(text) => texts.push(text.clone()),
        Value::Array(items) => {
            for item in items {
                flatten(item, texts, name)?;
            }
        }
        _ => {
            return Err(format!(
                "input `{name}`: element {} is not a string; BYTES data must be texts",
                texts.len()
            ))
        }
    }
    Ok(())
}

/// A shape of `[n]` or `[n, 1]` holding `count` elements.
fn check_shape(name: &str, shape: &[i64], count: usize) -> Result<(), String> {
    let ok = match shape {
        [n] | [n, 1] => *n as usize == count,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "input `{name}` has shape {shape:?} but {count} elements; use shape [n] with n texts"
        ))
    }
}

fn check_output(name: &str) -> Result<(), String> {
    if name == OUTPUT {
        Ok(())
    } else {
        Err(format!(
            "unknown output `{name}`: this model has one output, `{OUTPUT}`"
        ))
    }
}

fn json(status: StatusCode, value: &Value) -> Response<BoxBody> {
    let mut response = Response::new(body::full(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A model path for a name the local model does not serve: 404, so that
/// readiness is false and metadata and inference are not found.
pub(super) fn rest_not_served(model: &LocalModel, requested: &str) -> Response<BoxBody> {
    rest_error(StatusCode::NOT_FOUND, &not_served(model, requested))
}

/// A model method for a name the local model does not serve: `ModelReady`
/// answers `ready: false`, the others `NOT_FOUND`.
pub(super) fn grpc_not_served(
    model: &LocalModel,
    method: &str,
    requested: &str,
) -> Response<BoxBody> {
    match method {
        "ModelReady" => grpc_ok(&ModelReadyResponse { ready: false }),
        _ => grpc_error_response(grpc_code::NOT_FOUND, &not_served(model, requested)),
    }
}

fn not_served(model: &LocalModel, requested: &str) -> String {
    let name = model.name().as_str();
    format!("model `{requested}` is not found: local model {name} serves `{name}` and the names its routes select")
}

/// The protocol's error body, `{"error": "<message>"}`.
fn rest_error(status: StatusCode, message: &str) -> Response<BoxBody> {
    json(status, &serde_json::json!({ "error": message }))
}

// === gRPC ===

/// Answers a `inference.GRPCInferenceService` call.
pub(super) async fn grpc(
    model: &LocalModel,
    method: &str,
    requested: &str,
    body: &[u8],
    time_limit: Option<TimeLimit>,
) -> Result<Response<BoxBody>, ProxyError> {
    let message = match unframe(body) {
        Ok(message) => message,
        Err((code, text)) => return Ok(grpc_error_response(code, &text)),
    };
    let invalid = |text: String| Ok(grpc_error_response(grpc_code::INVALID_ARGUMENT, &text));
    match method {
        "ModelReady" => {
            if let Err(e) = ModelReadyRequest::decode(message) {
                return invalid(format!("malformed ModelReadyRequest: {e}"));
            }
            let ready = matches!(*model.state(), State::Ready(_));
            Ok(grpc_ok(&ModelReadyResponse { ready }))
        }
        "ServerLive" => {
            if let Err(e) = ServerLiveRequest::decode(message) {
                return invalid(format!("malformed ServerLiveRequest: {e}"));
            }
            Ok(grpc_ok(&ServerLiveResponse { live: true }))
        }
        "ServerReady" => {
            if let Err(e) = ServerReadyRequest::decode(message) {
                return invalid(format!("malformed ServerReadyRequest: {e}"));
            }
            let ready = matches!(*model.state(), State::Ready(_));
            Ok(grpc_ok(&ServerReadyResponse { ready }))
        }
        "ServerMetadata" => {
            if let Err(e) = ServerMetadataRequest::decode(message) {
                return invalid(format!("malformed ServerMetadataRequest: {e}"));
            }
            Ok(grpc_ok(&ServerMetadataResponse {
                name: SERVER.to_owned(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                extensions: Vec::new(),
            }))
        }
        "ModelMetadata" => {
            if let Err(e) = ModelMetadataRequest::decode(message) {
                return invalid(format!("malformed ModelMetadataRequest: {e}"));
            }
            let dimensions = model.engine()?.dimensions();
            Ok(grpc_ok(&grpc_metadata(requested, dimensions)))
        }
        "ModelInfer" => {
            let request = match ModelInferRequest::decode(message) {
                Ok(request) => request,
                Err(e) => return invalid(format!("malformed ModelInferRequest: {e}")),
            };
            let infer = match parse_grpc(&request) {
                Ok(infer) => infer,
                Err(text) => return invalid(text),
            };
            let raw = infer.raw;
            let id = infer.id.clone();
            match model.embed(infer.texts, time_limit).await {
                Ok(embedded) => {
                    let response = grpc_infer_response(
                        requested,
                        &request.model_version,
                        id,
                        &embedded.vectors,
                        embedded.dimensions,
                        raw,
                    );
                    Ok(grpc_ok(&response))
                }
                Err(Failure::Invalid { message, .. }) => invalid(message),
                Err(Failure::Proxy(error)) => Err(error),
            }
        }
        other => Ok(grpc_error_response(
            grpc_code::UNIMPLEMENTED,
            &format!(
                "local model {} does not implement {other}; it answers ModelInfer, ModelReady, ModelMetadata, ServerLive, ServerReady and ServerMetadata",
                model.name().as_str()
            ),
        )),
    }
}

/// The single uncompressed message of a unary gRPC request body.
pub(super) fn unframe(body: &[u8]) -> Result<&[u8], (u8, String)> {
    let invalid = |text: &str| (grpc_code::INVALID_ARGUMENT, text.to_owned());
    let [flag, a, b, c, d, rest @ ..] = body else {
        return Err(invalid("the request has no complete gRPC message"));
    };
    if *flag != 0 {
        return Err((
            grpc_code::UNIMPLEMENTED,
            "compressed messages are not supported by the local engine; send them uncompressed"
                .into(),
        ));
    }
    let length = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
    match rest.len().cmp(&length) {
        std::cmp::Ordering::Less => Err(invalid("the gRPC message is cut short")),
        std::cmp::Ordering::Greater => Err(invalid(
            "a unary method takes exactly one message; the request holds more",
        )),
        std::cmp::Ordering::Equal => Ok(rest),
    }
}

/// Reads a gRPC inference request: one BYTES input, in `contents` or raw.
pub(super) fn parse_grpc(request: &ModelInferRequest) -> Result<Infer, String> {
    let [input] = request.inputs.as_slice() else {
        return Err(format!(
            "expected exactly one input (BYTES, shape [n]), found {}",
            request.inputs.len()
        ));
    };
    let name = &input.name;
    if input.datatype != "BYTES" {
        return Err(format!(
            "input `{name}` must have datatype BYTES (texts), found {:?}",
            input.datatype
        ));
    }
    if input.shape.iter().any(|d| *d < 0) {
        return Err(format!("input `{name}`: `shape` must be non-negative"));
    }
    for output in &request.outputs {
        check_output(&output.name)?;
    }
    let (elements, raw): (Vec<&[u8]>, bool) = match request.raw_input_contents.as_slice() {
        [] => (
            input
                .contents
                .as_ref()
                .map(|c| c.bytes_contents.iter().map(Vec::as_slice).collect())
                .unwrap_or_default(),
            false,
        ),
        [raw] => (split_raw_bytes(raw, name)?, true),
        more => return Err(format!("{} raw_input_contents for one input", more.len())),
    };
    let texts = elements
        .into_iter()
        .enumerate()
        .map(|(i, bytes)| {
            String::from_utf8(bytes.to_vec())
                .map_err(|_| format!("input `{name}`: element {i} is not UTF-8 text"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    check_shape(name, &input.shape, texts.len())?;
    Ok(Infer {
        id: request.id.clone(),
        texts,
        raw,
    })
}

/// Splits raw BYTES tensor contents: each element is a 4-byte
/// little-endian length followed by that many bytes.
fn split_raw_bytes<'a>(mut raw: &'a [u8], name: &str) -> Result<Vec<&'a [u8]>, String> {
    let mut elements = Vec::new();
    while !raw.is_empty() {
        let cut = || {
            format!(
                "input `{name}`: raw BYTES contents are cut short at element {}",
                elements.len()
            )
        };
        let [a, b, c, d, rest @ ..] = raw else {
            return Err(cut());
        };
        let length = u32::from_le_bytes([*a, *b, *c, *d]) as usize;
        if rest.len() < length {
            return Err(cut());
        }
        let (element, next) = rest.split_at(length);
        elements.push(element);
        raw = next;
    }
    Ok(elements)
}

fn grpc_metadata(name: &str, dimensions: usize) -> ModelMetadataResponse {
    ModelMetadataResponse {
        name: name.to_owned(),
        versions: Vec::new(),
        platform: PLATFORM.to_owned(),
        inputs: vec![TensorMetadata {
            name: INPUT.to_owned(),
            datatype: "BYTES".to_owned(),
            shape: vec![-1],
        }],
        outputs: vec![TensorMetadata {
            name: OUTPUT.to_owned(),
            datatype: "FP32".to_owned(),
            shape: vec![-1, dimensions as i64],
        }],
    }
}

pub(super) fn grpc_infer_response(
    model: &str,
    version: &str,
    id: String,
    vectors: &[Vec<f32>],
    dimensions: usize,
    raw: bool,
) -> ModelInferResponse {
    let mut output = InferOutputTensor {
        name: OUTPUT.to_owned(),
        datatype: "FP32".to_owned(),
        shape: vec![vectors.len() as i64, dimensions as i64],
        ..Default::default()
    };
    let mut raw_output_contents = Vec::new();
    if raw {
        let bytes: Vec<u8> = vectors
            .iter()
            .flatten()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        raw_output_contents.push(bytes);
    } else {
        output.contents = Some(InferTensorContents {
            fp32_contents: vectors.concat(),
            ..Default::default()
        });
    }
    ModelInferResponse {
        model_name: model.to_owned(),
        model_version: version.to_owned(),
        id,
        outputs: vec![output],
        raw_output_contents,
        ..Default::default()
    }
}

/// A successful unary gRPC response: one message, then `grpc-status: 0`.
fn grpc_ok(message: &impl Message) -> Response<BoxBody> {
    let encoded = message.encode_to_vec();
    let mut frame = BytesMut::with_capacity(5 + encoded.len());
    frame.put_u8(0);
    frame.put_u32(encoded.len() as u32);
    frame.put_slice(&encoded);
    let mut trailers = HeaderMap::new();
    trailers.insert(
        infermesh_filters::grpc::GRPC_STATUS,
        HeaderValue::from_static("0"),
    );
    let frames: [Result<Frame<Bytes>, BoxError>; 2] = [
        Ok(Frame::data(frame.freeze())),
        Ok(Frame::trailers(trailers)),
    ];
    let body = StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync();
    let mut response = Response::new(body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

#[cfg(test)]
mod tests {
    use infermesh_proto::kserve::model_infer_request::{
        InferInputTensor, InferRequestedOutputTensor,
    };

    use super::*;

    #[test]
    fn rest_paths_name_their_action() {
        assert_eq!(action("/v2/models/m"), Some(Action::Metadata));
        assert_eq!(action("/v2/models/m/versions/1"), Some(Action::Metadata));
        assert_eq!(action("/v2/models/m/ready"), Some(Action::Ready));
        assert_eq!(action("/v2/models/m/versions/1/infer"), Some(Action::Infer));
        assert_eq!(
            action("/v2/models/m/generate"),
            Some(Action::Other("generate"))
        );
        assert_eq!(action("/v2/health/ready"), Some(Action::Server("ready")));
        assert_eq!(action("/v1/embeddings"), None);
    }

    #[test]
    fn a_rest_request_carries_texts_in_a_bytes_input() {
        let infer = parse_rest(
            br#"{"id":"7","inputs":[{"name":"text","shape":[2],"datatype":"BYTES","data":["a","b"]}],"outputs":[{"name":"embedding"}]}"#,
        )
        .unwrap();
        assert_eq!(infer.id, "7");
        assert_eq!(infer.texts, ["a", "b"]);
        let nested = parse_rest(
            br#"{"inputs":[{"name":"x","shape":[2,1],"datatype":"BYTES","data":[["a"],["b"]]}]}"#,
        )
        .unwrap();
        assert_eq!(nested.texts, ["a", "b"]);
    }

    #[test]
    fn bad_rest_requests_say_what_is_wrong() {
        let refused = |body: &str| parse_rest(body.as_bytes()).unwrap_err();
        assert!(refused("{").contains("not valid JSON"));
        assert_eq!(
            refused(r#"{"inputs":[]}"#),
            "expected exactly one input (BYTES, shape [n]), found 0"
        );
        assert_eq!(
            refused(r#"{"inputs":[{"name":"t","shape":[1],"datatype":"FP32","data":[1.0]}]}"#),
            "input `t` must have datatype BYTES (texts), found \"FP32\""
        );
        assert_eq!(
            refused(r#"{"inputs":[{"name":"t","shape":[2],"datatype":"BYTES","data":["a"]}]}"#),
            "input `t` has shape [2] but 1 elements; use shape [n] with n texts"
        );
        assert_eq!(
            refused(r#"{"inputs":[{"name":"t","shape":[1],"datatype":"BYTES","data":[3]}]}"#),
            "input `t`: element 0 is not a string; BYTES data must be texts"
        );
        assert_eq!(
            refused(
                r#"{"inputs":[{"name":"t","shape":[1],"datatype":"BYTES","data":["a"]}],"outputs":[{"name":"logits"}]}"#
            ),
            "unknown output `logits`: this model has one output, `embedding`"
        );
    }

    fn grpc_request(
        contents: Option<Vec<&str>>,
        raw: Option<Vec<&str>>,
        shape: Vec<i64>,
    ) -> ModelInferRequest {
        let mut request = ModelInferRequest {
            model_name: "m".into(),
            id: "r1".into(),
            inputs: vec![InferInputTensor {
                name: "text".into(),
                datatype: "BYTES".into(),
                shape,
                contents: contents.map(|texts| InferTensorContents {
                    bytes_contents: texts.iter().map(|t| t.as_bytes().to_vec()).collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        if let Some(texts) = raw {
            let mut bytes = Vec::new();
            for text in texts {
                bytes.extend_from_slice(&(text.len() as u32).to_le_bytes());
                bytes.extend_from_slice(text.as_bytes());
            }
            request.raw_input_contents.push(bytes);
        }
        request
    }

    #[test]
    fn grpc_texts_come_in_contents_or_raw() {
        let contents = parse_grpc(&grpc_request(Some(vec!["a", "bé"]), None, vec![2])).unwrap();
        assert_eq!(
            (contents.texts.as_slice(), contents.raw),
            (&["a".to_string(), "bé".to_string()][..], false)
        );
        assert_eq!(contents.id, "r1");
        let raw = parse_grpc(&grpc_request(None, Some(vec!["x", "", "yz"]), vec![3, 1])).unwrap();
        assert_eq!(
            (raw.texts, raw.raw),
            (vec!["x".to_string(), String::new(), "yz".to_string()], true)
        );
    }

    #[test]
    fn bad_grpc_requests_say_what_is_wrong() {
        let mut cut = grpc_request(None, Some(vec!["abc"]), vec![1]);
        cut.raw_input_contents[0].pop();
        assert!(parse_grpc(&cut).unwrap_err().contains("cut short"));
        assert!(parse_grpc(&grpc_request(Some(vec!["a"]), None, vec![2]))
            .unwrap_err()
            .contains("has shape [2] but 1 elements"));
        let mut fp32 = grpc_request(Some(vec!["a"]), None, vec![1]);
        fp32.inputs[0].datatype = "FP32".into();
        assert!(parse_grpc(&fp32).unwrap_err().contains("BYTES"));
        let mut other = grpc_request(Some(vec!["a"]), None, vec![1]);
        other.outputs.push(InferRequestedOutputTensor {
            name: "x".into(),
            ..Default::default()
        });
        assert!(parse_grpc(&other)
            .unwrap_err()
            .contains("unknown output `x`"));
        assert!(parse_grpc(&ModelInferRequest::default())
            .unwrap_err()
            .contains("found 0"));
    }

    #[test]
    fn a_unary_body_holds_exactly_one_uncompressed_message() {
        assert_eq!(unframe(&[0, 0, 0, 0, 2, 7, 8]), Ok(&[7u8, 8][..]));
        assert_eq!(unframe(&[0, 0, 0, 0, 0]), Ok(&[][..]));
        assert_eq!(
            unframe(&[0, 0, 0]).unwrap_err().0,
            grpc_code::INVALID_ARGUMENT
        );
        assert_eq!(
            unframe(&[0, 0, 0, 0, 3, 1]).unwrap_err().0,
            grpc_code::INVALID_ARGUMENT
        );
        assert_eq!(
            unframe(&[0, 0, 0, 0, 0, 1]).unwrap_err().0,
            grpc_code::INVALID_ARGUMENT
        );
        assert_eq!(
            unframe(&[1, 0, 0, 0, 0]).unwrap_err().0,
            grpc_code::UNIMPLEMENTED
        );
    }

    #[test]
    fn vectors_go_back_the_way_the_texts_came() {
        let vectors = vec![vec![1.0, 2.0], vec![3.0, 4.0]];
        let raw = grpc_infer_response("m", "", "id".into(), &vectors, 2, true);
        assert_eq!(raw.outputs[0].shape, [2, 2]);
        assert_eq!(raw.outputs[0].datatype, "FP32");
        assert_eq!(raw.raw_output_contents[0].len(), 16);
        assert_eq!(&raw.raw_output_contents[0][12..], &4.0f32.to_le_bytes());
        let typed = grpc_infer_response("m", "", "id".into(), &vectors, 2, false);
        assert!(typed.raw_output_contents.is_empty());
        assert_eq!(
            typed.outputs[0].contents.as_ref().unwrap().fp32_contents,
            [1.0, 2.0, 3.0, 4.0]
        );
        assert_eq!(typed.id, "id");
    }
}
