//! The REST side of the fixture API server: paths to resources, each verb
//! to its store operation, lists with selectors and pages, watches, and
//! TokenReview.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio_stream::wrappers::ReceiverStream;

use super::select::{FieldSelector, LabelSelector};
use super::store::{key_of, ApiError, Key, Resource, Store};
use super::watch::{event_line, WatchRequest};
use super::Shared;

pub(super) type Body = BoxBody<Bytes, std::io::Error>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

fn json_response(code: u16, value: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(
            serde_json::to_vec(value).expect("JSON values serialize"),
        ))
        .expect("a valid response")
}

fn error_response(error: &ApiError) -> Response<Body> {
    json_response(error.code, &error.status())
}

pub(super) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let target = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_default();
    shared
        .requests
        .lock()
        .unwrap()
        .push(format!("{} {target}", req.method()));
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if bearer != Some(shared.token.as_str()) {
        return Ok(error_response(&ApiError::new(
            401,
            "Unauthorized",
            "Unauthorized",
        )));
    }
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return Ok(error_response(&ApiError::bad_request(format!(
                "reading the request body: {e}"
            ))))
        }
    };
    let query: HashMap<String, String> = parts
        .uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let answer = route(
        &shared,
        &parts.method,
        parts.uri.path(),
        &query,
        &content_type,
        &body,
    );
    Ok(match answer {
        Ok(Answer::Json(code, value)) => json_response(code, &value),
        Ok(Answer::Stream(response)) => response,
        Err(error) => error_response(&error),
    })
}

enum Answer {
    Json(u16, Value),
    Stream(Response<Body>),
}

/// What a path names.
#[derive(Debug, PartialEq)]
struct Target {
    resource: Resource,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn not_found() -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

/// Parses `/api/v1/[namespaces/NS/]PLURAL[/NAME[/status]]` and its `/apis/GROUP/VERSION` form.
fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_string(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", _, "status" | "finalize"] => (None, rest),
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (plural, name, status) = match rest {
        [plural] => (plural, None, false),
        [plural, name] => (plural, Some(name.to_string()), false),
        [plural, name, "status"] => (plural, Some(name.to_string()), true),
        _ => return None,
    };
    if plural.is_empty() || name.as_deref() == Some("") {
        return None;
    }
    Some(Target {
        resource: Resource {
            api_version,
            plural: plural.to_string(),
        },
        namespace,
        name,
        status,
    })
}

fn route(
    shared: &Shared,
    method: &Method,
    path: &str,
    query: &HashMap<String, String>,
    content_type: &str,
    body: &Bytes,
) -> Result<Answer, ApiError> {
    if path == "/version" {
        return Ok(Answer::Json(
            200,
            json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-infermesh-fixture", "platform": "linux/amd64"}),
        ));
    }
    let target = parse_path(path).ok_or_else(not_found)?;
    let resource = &target.resource;
    if resource.api_version == "authentication.k8s.io/v1" && resource.plural == "tokenreviews" {
        if *method != Method::POST || target.name.is_some() {
            return Err(method_not_allowed(method));
        }
        return token_review(shared, body).map(|review| Answer::Json(201, review));
    }
    let namespace = target.namespace.as_deref();
    let mut store = shared.store.lock().unwrap();
    let kind = store.kind(resource).ok_or_else(not_found)?;
    let Some(name) = &target.name else {
        return match *method {
            Method::GET if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) => {
                drop(store);
                start_watch(shared, &target, kind, query).map(Answer::Stream)
            }
            Method::GET => {
                list(&store, resource, namespace, kind, query).map(|l| Answer::Json(200, l))
            }
            Method::POST => {
                let object = parse_json(body)?;
                store
                    .create(resource, namespace, object)
                    .map(|o| Answer::Json(201, o))
            }
            _ => Err(method_not_allowed(method)),
        };
    };
    let key = Key {
        resource: resource.clone(),
        namespace: target.namespace.clone(),
        name: name.clone(),
    };
    let object = match *method {
        Method::GET => store
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&key)),
        Method::PUT => store.replace(&key, parse_json(body)?, target.status),
        Method::PATCH => patch(&mut store, &key, content_type, body, target.status),
        Method::DELETE if !target.status => {
            store.remove(&key).ok_or_else(|| ApiError::not_found(&key))
        }
        _ => Err(method_not_allowed(method)),
    }?;
    Ok(Answer::Json(200, object))
}

fn method_not_allowed(method: &Method) -> ApiError {
    ApiError::new(
        405,
        "MethodNotAllowed",
        format!("the server does not allow this method on the requested resource: {method}"),
    )
}

fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))
}

fn patch(
    store: &mut Store,
    key: &Key,
    content_type: &str,
    body: &Bytes,
    status: bool,
) -> Result<Value, ApiError> {
    let media = content_type.split(';').next().unwrap_or("").trim();
    match media {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            store.merge_patch(key, &parse_json(body)?, status, false)
        }
        "application/apply-patch+yaml" => {
            let patch: Value = serde_yaml_ng::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("the apply patch is not YAML: {e}")))?;
            if key_of(&patch).is_ok_and(|k| k.name != key.name) {
                return Err(ApiError::bad_request("the apply patch names another object"));
            }
            store.merge_patch(key, &patch, status, true)
        }
        "application/json-patch+json" => {
            let ops: Vec<json_patch::PatchOperation> = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("the body is not a JSON patch: {e}")))?;
            store.json_patch(key, &ops, status)
        }
        other => Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})"),
        )),
    }
}

/// The position a continued list resumes after, and the list's resourceVersion.
#[derive(serde::Serialize, serde::Deserialize)]
struct Continue {
    rv: u64,
    namespace: Option<String>,
    name: String,
}

/// A list, or one page of it. Every page carries the first page's
/// resourceVersion (a watch from it sees every later change), but later
/// pages show the objects as they are now, not a snapshot at that version.
fn list(
    store: &Store,
    resource: &Resource,
    namespace: Option<&str>,
    kind: String,
    query: &HashMap<String, String>,
) -> Result<Value, ApiError> {
    let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))?;
    let fields = FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))?;
    let limit = match query.get("limit").map(String::as_str) {
        None | Some("") => 0,
        Some(n) => n
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request(format!("invalid limit {n:?}")))?,
    };
    let from = match query.get("continue").filter(|c| !c.is_empty()) {
        None => None,
        Some(token) => {
            let from: Continue = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(token)
                .ok()
                .and_then(|raw| serde_json::from_slice(&raw).ok())
                .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
            if from.rv < store.compacted() {
                return Err(ApiError::expired("The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter."));
            }
            Some(from)
        }
    };
    let rv = from.as_ref().map_or(store.resource_version(), |f| f.rv);
    let mut matching = store
        .objects(resource, namespace)
        .filter(|(key, _)| {
            from.as_ref()
                .is_none_or(|f| (&key.namespace, &key.name) > (&f.namespace, &f.name))
        })
        .filter(|(_, object)| labels.matches(object) && fields.matches(object));
    let mut items = Vec::new();
    let mut more = false;
    for (_, object) in matching.by_ref() {
        if limit > 0 && items.len() == limit {
            more = true;
            break;
        }
        items.push(object.clone());
    }
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if more {
        // The page's last item is where the next page starts after.
        let tail = items.last().expect("a full page");
        let token = Continue {
            rv,
            namespace: tail["metadata"]["namespace"].as_str().map(str::to_string),
            name: tail["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        };
        metadata["continue"] = json!(base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&token).expect("JSON")));
        // As kube-apiserver, the count is given only when no selector filters the list.
        if labels.is_empty() && fields.is_empty() {
            metadata["remainingItemCount"] = json!(1 + matching.count());
        }
    }
    Ok(json!({
        "apiVersion": resource.api_version,
        "kind": format!("{kind}List"),
        "metadata": metadata,
        "items": items,
    }))
}

fn start_watch(
    shared: &Shared,
    target: &Target,
    kind: String,
    query: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    if shared
        .watches_refused
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        return Err(ApiError::new(
            503,
            "ServiceUnavailable",
            "the server is currently unable to handle the request (watches are refused)",
        ));
    }
    let flag = |name: &str| matches!(query.get(name).map(String::as_str), Some("true" | "1"));
    // A streaming list (sendInitialEvents=true) starts with the current
    // objects, whatever the resourceVersion (NotOlderThan it).
    let initial_events = flag("sendInitialEvents");
    let from = match query.get("resourceVersion").map(String::as_str) {
        _ if initial_events => None,
        None | Some("" | "0") => None,
        Some(rv) => Some(
            rv.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?,
        ),
    };
    let timeout = match query.get("timeoutSeconds").map(String::as_str) {
        None | Some("") => None,
        Some(s) => Some(Duration::from_secs(s.parse().map_err(|_| {
            ApiError::bad_request(format!("invalid timeoutSeconds {s:?}"))
        })?)),
    };
    let request = WatchRequest {
        resource: target.resource.clone(),
        kind,
        labels: LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))?,
        fields: FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))?,
        bookmarks: flag("allowWatchBookmarks"),
        initial_events,
        timeout,
    };
    let subscription =
        shared
            .store
            .lock()
            .unwrap()
            .subscribe(&target.resource, target.namespace.as_deref(), from);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    match subscription {
        Ok(subscription) => {
            tokio::spawn(request.run(shared.store.clone(), subscription, tx));
        }
        // kube-apiserver answers 200 and sends the 410 as the stream's only event.
        Err(expired) => {
            tx.try_send(Ok(event_line("ERROR", &expired.status())))
                .expect("an empty channel");
        }
    }
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(StreamBody::new(ReceiverStream::new(rx)).boxed())
        .expect("a valid response"))
}

fn token_review(shared: &Shared, body: &Bytes) -> Result<Value, ApiError> {
    let mut review = parse_json(body)?;
    let token = review["spec"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if token.is_empty() {
        return Err(ApiError::bad_request(
            "token is required for TokenReview in authentication",
        ));
    }
    let audiences: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let status = shared
        .store
        .lock()
        .unwrap()
        .review_token(&token, &audiences);
    review["apiVersion"] = json!("authentication.k8s.io/v1");
    review["kind"] = json!("TokenReview");
    review["metadata"] = json!({"creationTimestamp": null});
    review["status"] = status;
    Ok(review)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_resources() {
        let t = parse_path("/api/v1/namespaces/ns/pods/a/status").unwrap();
        assert_eq!(t.resource.plural, "pods");
        assert_eq!(t.namespace.as_deref(), Some("ns"));
        assert_eq!(t.name.as_deref(), Some("a"));
        assert!(t.status);
        let t = parse_path("/apis/discovery.k8s.io/v1/endpointslices").unwrap();
        assert_eq!(t.resource.api_version, "discovery.k8s.io/v1");
        assert_eq!((t.namespace, t.name), (None, None));
        let t = parse_path("/api/v1/namespaces/ns").unwrap();
        assert_eq!(
            (t.resource.plural.as_str(), t.name.as_deref()),
            ("namespaces", Some("ns"))
        );
        let t = parse_path("/api/v1/namespaces").unwrap();
        assert_eq!(t.resource.plural, "namespaces");
        let t = parse_path("/api/v1/namespaces/ns/status").unwrap();
        assert!(t.status && t.namespace.is_none());
        assert!(parse_path("/api/v1/namespaces/ns/pods/a/log/x").is_none());
        assert!(parse_path("/healthz").is_none());
    }
}
