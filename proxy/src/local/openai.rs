//! OpenAI `POST /v1/embeddings` (and `GET /v1/models`) answered by a local
//! model, with OpenAI's request checks, response shape and error bodies;
//! and the proxy's own `GET /v1/models` list when no route takes it.
//!
//! `encoding_format: base64` carries each vector as the base64 of its
//! little-endian f32 bytes, as OpenAI sends it (the `openai` Python package
//! asks for it by default and decodes it with numpy). `usage.prompt_tokens`
//! counts the tokens the model processed, `[CLS]` and `[SEP]` included.

use base64::Engine as _;
use http::{header, HeaderValue, Response, StatusCode};
use infermesh_filters::{body, BoxBody, ProxyError};
use infermesh_proto::policy::{ListenerKind, PolicySet, StringMatch};
use serde::Serialize;
use serde_json::Value;

use super::{Embedded, Failure, LocalModel, State, TimeLimit};
use crate::classify::ApiKind;

/// How vectors are written in the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Format {
    /// JSON arrays of numbers.
    Float,
    /// base64 of the little-endian f32 bytes.
    Base64,
}

/// An embeddings request, checked.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct EmbeddingsRequest {
    pub inputs: Vec<String>,
    pub format: Format,
    pub dimensions: Option<u64>,
}

/// A refused request: the message and the offending parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Invalid {
    pub message: String,
    pub param: Option<&'static str>,
}

fn invalid(message: impl Into<String>, param: &'static str) -> Invalid {
    Invalid {
        message: message.into(),
        param: Some(param),
    }
}

/// Answers `/v1/embeddings` with `model`, echoing `requested` as `model`.
pub(super) async fn embeddings(
    model: &LocalModel,
    requested: &str,
    body: &[u8],
    time_limit: Option<TimeLimit>,
) -> Result<Response<BoxBody>, ProxyError> {
    let request = match parse(body) {
        Ok(request) => request,
        Err(refused) => return Ok(error(StatusCode::BAD_REQUEST, &refused)),
    };
    if let (Some(wanted), State::Ready(engine)) = (request.dimensions, &*model.state()) {
        if wanted != engine.dimensions() as u64 {
            let refused = invalid(
                format!(
                    "this model makes {}-dimensional vectors and cannot shorten them: remove `dimensions` or set it to {}",
                    engine.dimensions(),
                    engine.dimensions()
                ),
                "dimensions",
            );
            return Ok(error(StatusCode::BAD_REQUEST, &refused));
        }
    }
    match model.embed(request.inputs, time_limit).await {
        Ok(embedded) => Ok(json(
            StatusCode::OK,
            render(&embedded, requested, request.format),
        )),
        Err(Failure::Invalid { message, param }) => {
            Ok(error(StatusCode::BAD_REQUEST, &Invalid { message, param }))
        }
        Err(Failure::Proxy(error)) => Err(error),
    }
}

/// Reads an embeddings request body as OpenAI does.
pub(super) fn parse(body: &[u8]) -> Result<EmbeddingsRequest, Invalid> {
    let value: Value = serde_json::from_slice(body).map_err(|e| Invalid {
        message: format!("the request body is not valid JSON: {e}"),
        param: None,
    })?;
    let Value::Object(fields) = value else {
        return Err(Invalid {
            message: format!(
                "the request body must be a JSON object, found {}",
                describe(&value)
            ),
            param: None,
        });
    };
    let inputs = match fields.get("input") {
        None | Some(Value::Null) => {
            return Err(invalid("missing required parameter: `input`", "input"))
        }
        Some(Value::String(text)) => vec![text.clone()],
        Some(Value::Array(items)) => {
            let mut inputs = Vec::with_capacity(items.len());
            for (index, item) in items.iter().enumerate() {
                match item {
                    Value::String(text) => inputs.push(text.clone()),
                    Value::Number(_) | Value::Array(_) => {
                        return Err(invalid(
                            format!("input[{index}]: token arrays are not accepted by the local engine (its tokenizer is not the remote model's); send the input as text"),
                            "input",
                        ))
                    }
                    other => {
                        return Err(invalid(
                            format!("input[{index}] must be a string, found {}", describe(other)),
                            "input",
                        ))
                    }
                }
            }
            inputs
        }
        Some(other) => {
            return Err(invalid(
                format!(
                    "`input` must be a string or an array of strings, found {}",
                    describe(other)
                ),
                "input",
            ))
        }
    };
    let format = match fields.get("encoding_format") {
        None | Some(Value::Null) => Format::Float,
        Some(Value::String(f)) if f == "float" => Format::Float,
        Some(Value::String(f)) if f == "base64" => Format::Base64,
        Some(other) => {
            return Err(invalid(
                format!(
                    "`encoding_format` must be `float` or `base64`, found {}",
                    describe_value(other)
                ),
                "encoding_format",
            ))
        }
    };
    let dimensions = match fields.get("dimensions") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_u64().is_some_and(|d| d > 0) => n.as_u64(),
        Some(other) => {
            return Err(invalid(
                format!(
                    "`dimensions` must be a positive integer, found {}",
                    describe_value(other)
                ),
                "dimensions",
            ))
        }
    };
    Ok(EmbeddingsRequest {
        inputs,
        format,
        dimensions,
    })
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A short rendering of a scalar, or what kind of value it is.
fn describe_value(value: &Value) -> String {
    match value {
        Value::String(s) if s.len() <= 40 => format!("{s:?}"),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => describe(other).to_owned(),
    }
}

#[derive(Serialize)]
struct List<'a> {
    object: &'static str,
    data: Vec<Item<'a>>,
    model: &'a str,
    usage: Usage,
}

#[derive(Serialize)]
struct Item<'a> {
    object: &'static str,
    index: usize,
    embedding: Vector<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Vector<'a> {
    Float(&'a [f32]),
    Base64(String),
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
}

/// The response body for `embedded`.
pub(super) fn render(embedded: &Embedded, model: &str, format: Format) -> Vec<u8> {
    let data = embedded
        .vectors
        .iter()
        .enumerate()
        .map(|(index, vector)| Item {
            object: "embedding",
            index,
            embedding: match format {
                Format::Float => Vector::Float(vector),
                Format::Base64 => Vector::Base64(base64_f32(vector)),
            },
        })
        .collect();
    let list = List {
        object: "list",
        data,
        model,
        usage: Usage {
            prompt_tokens: embedded.prompt_tokens,
            total_tokens: embedded.prompt_tokens,
        },
    };
    // Plain data always serializes.
    serde_json::to_vec(&list).unwrap_or_default()
}

/// base64 of the little-endian bytes of `vector`.
fn base64_f32(vector: &[f32]) -> String {
    let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `GET /v1/models` and `GET /v1/models/{id}` for the local model.
pub(super) fn model(
    model: &LocalModel,
    path: &str,
    requested: &str,
) -> Result<Response<BoxBody>, ProxyError> {
    let entry = serde_json::json!({
        "id": requested,
        "object": "model",
        "created": 0,
        "owned_by": format!("infermesh local:{}", model.name().as_str()),
    });
    let listing = path.trim_end_matches('/').ends_with("/v1/models");
    let body = if listing {
        serde_json::json!({"object": "list", "data": [entry]})
    } else {
        entry
    };
    Ok(json(StatusCode::OK, body.to_string().into_bytes()))
}

/// A model name the local model does not serve: OpenAI's 404
/// `model_not_found`.
pub(super) fn model_not_found(model: &LocalModel, requested: &str) -> Response<BoxBody> {
    let body = serde_json::json!({
        "error": {
            "message": format!(
                "The model `{requested}` does not exist: local model {} serves `{}` and the names its routes select",
                model.name().as_str(),
                model.name().as_str()
            ),
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    });
    json(StatusCode::NOT_FOUND, body.to_string().into_bytes())
}

/// The models a client of `listener` can name: every exact `model`
/// condition of its routes, in policy order, once each, owned by the
/// route's first backend. Prefix conditions name no model to list.
pub(super) fn route_models(policy: &PolicySet, listener: ListenerKind) -> Value {
    let mut seen = std::collections::HashSet::new();
    let mut data = Vec::new();
    for route in policy.routes.iter().filter(|r| r.spec.listener == listener) {
        let owner = route
            .spec
            .backends
            .first()
            .map_or("infermesh", |b| b.backend.as_str());
        for condition in &route.spec.matches {
            if let Some(StringMatch::Exact(name)) = &condition.model {
                if seen.insert(name.as_str()) {
                    data.push(serde_json::json!({
                        "id": name,
                        "object": "model",
                        "created": 0,
                        "owned_by": owner,
                    }));
                }
            }
        }
    }
    serde_json::json!({"object": "list", "data": data})
}

/// `GET /v1/models` answered by the proxy: [`route_models`] in OpenAI's list shape.
pub(super) fn model_list(policy: &PolicySet, listener: ListenerKind) -> Response<BoxBody> {
    json(
        StatusCode::OK,
        route_models(policy, listener).to_string().into_bytes(),
    )
}

/// A chat or text completion sent to an embedding model: OpenAI answers
/// 404 with an `invalid_request_error` naming the endpoint to use.
pub(super) fn not_an_embedding_api(api: ApiKind, requested: &str) -> Response<BoxBody> {
    let endpoint = match api {
        ApiKind::OpenAiChat => "v1/chat/completions",
        _ => "v1/completions",
    };
    error(
        StatusCode::NOT_FOUND,
        &invalid(
            format!(
                "`{requested}` is an embedding model served by the proxy's local engine and is not supported in the {endpoint} endpoint; use v1/embeddings"
            ),
            "model",
        ),
    )
}

/// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.
pub(super) fn error(status: StatusCode, refused: &Invalid) -> Response<BoxBody> {
    let body = serde_json::json!({
        "error": {
            "message": refused.message,
            "type": "invalid_request_error",
            "param": refused.param,
            "code": Value::Null,
        }
    });
    json(status, body.to_string().into_bytes())
}

fn json(status: StatusCode, bytes: Vec<u8>) -> Response<BoxBody> {
    let mut response = Response::new(body::full(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(body: &str) -> Invalid {
        parse(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn input_may_be_a_string_or_an_array_of_strings() {
        let one = parse(br#"{"model":"m","input":"hello"}"#).unwrap();
        assert_eq!(one.inputs, ["hello"]);
        assert_eq!(one.format, Format::Float);
        let many =
            parse(br#"{"model":"m","input":["a","b"],"encoding_format":"base64","user":"u"}"#)
                .unwrap();
        assert_eq!(many.inputs, ["a", "b"]);
        assert_eq!(many.format, Format::Base64);
        let dims = parse(br#"{"input":"a","dimensions":384,"encoding_format":null}"#).unwrap();
        assert_eq!(dims.dimensions, Some(384));
    }

    #[test]
    fn malformed_requests_are_refused_with_the_parameter() {
        assert_eq!(refused("not json").param, None);
        assert!(refused("not json")
            .message
            .starts_with("the request body is not valid JSON"));
        assert_eq!(
            refused("[1]").message,
            "the request body must be a JSON object, found an array"
        );
        assert_eq!(
            refused(r#"{"model":"m"}"#),
            invalid("missing required parameter: `input`", "input")
        );
        assert_eq!(
            refused(r#"{"input":42}"#),
            invalid(
                "`input` must be a string or an array of strings, found a number",
                "input"
            )
        );
        assert_eq!(
            refused(r#"{"input":["a",{"x":1}]}"#),
            invalid("input[1] must be a string, found an object", "input")
        );
        assert!(refused(r#"{"input":[1,2,3]}"#)
            .message
            .contains("token arrays are not accepted"));
        assert_eq!(
            refused(r#"{"input":"a","encoding_format":"int8"}"#),
            invalid(
                "`encoding_format` must be `float` or `base64`, found \"int8\"",
                "encoding_format"
            )
        );
        assert_eq!(
            refused(r#"{"input":"a","dimensions":0}"#).param,
            Some("dimensions")
        );
        assert_eq!(
            refused(r#"{"input":"a","dimensions":"x"}"#).param,
            Some("dimensions")
        );
    }

    #[test]
    fn the_response_has_openai_shape_in_both_encodings() {
        let embedded = Embedded {
            dimensions: 2,
            vectors: vec![vec![0.5, -1.0], vec![0.1, 2.0]],
            prompt_tokens: 7,
        };
        let float: Value =
            serde_json::from_slice(&render(&embedded, "client-name", Format::Float)).unwrap();
        assert_eq!(
            float,
            serde_json::json!({
                "object": "list",
                "data": [
                    {"object": "embedding", "index": 0, "embedding": [0.5, -1.0]},
                    {"object": "embedding", "index": 1, "embedding": [0.1, 2.0]},
                ],
                "model": "client-name",
                "usage": {"prompt_tokens": 7, "total_tokens": 7},
            })
        );
        let b64: Value = serde_json::from_slice(&render(&embedded, "m", Format::Base64)).unwrap();
        let text = b64["data"][0]["embedding"].as_str().unwrap();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap();
        assert_eq!(
            bytes,
            [0.5f32.to_le_bytes(), (-1.0f32).to_le_bytes()].concat()
        );
    }

    #[tokio::test]
    async fn errors_have_openai_shape() {
        use http_body_util::BodyExt;
        let response = not_an_embedding_api(ApiKind::OpenAiChat, "minilm");
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["type"], "invalid_request_error");
        assert_eq!(json["error"]["param"], "model");
        assert!(json["error"]["code"].is_null());
        assert!(json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("v1/chat/completions"));
    }
}
