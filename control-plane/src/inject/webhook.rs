//! The mutating admission webhook: `POST /inject` over HTTPS, an
//! `admission.k8s.io/v1` `AdmissionReview` in, the same with its
//! `response` out, carrying the JSON patch (RFC 6902) from the pod as sent
//! to the pod as [`inject_pod`](super::inject_pod) makes it.
//!
//! Selection is the webhook configuration's: its `namespaceSelector`
//! (namespaces labelled `infermesh.io/inject=enabled`) and `objectSelector`
//! (pods labelled so) decide which pods are sent here, since the API server
//! does not send the namespace object. A pod that arrives is injected unless
//! it opts out with `infermesh.io/inject: disabled`; one that cannot be
//! (host network) is admitted unchanged with a warning. A review that is
//! not one is answered 400 with the reason.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ServerConfig;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::{inject_pod, Config, Outcome};

/// Largest review accepted; the API server's objects stay under 1.5 MiB.
const MAX_BODY: usize = 4 << 20;
/// Longest a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request is not an AdmissionReview.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The body is not JSON.
    #[error("the body is not JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// A field the review needs is missing or of the wrong type.
    #[error("not an admission.k8s.io/v1 AdmissionReview: {0}")]
    Shape(&'static str),
}

/// The answer to a review: the response body.
pub fn review(body: &[u8], config: &Config) -> Result<Value, ReviewError> {
    let review: Value = serde_json::from_slice(body).map_err(ReviewError::Json)?;
    if review.get("kind").and_then(Value::as_str) != Some("AdmissionReview") {
        return Err(ReviewError::Shape("kind is not AdmissionReview"));
    }
    let api_version = review
        .get("apiVersion")
        .and_then(Value::as_str)
        .ok_or(ReviewError::Shape("no apiVersion"))?;
    if api_version != "admission.k8s.io/v1" {
        return Err(ReviewError::Shape("apiVersion is not admission.k8s.io/v1"));
    }
    let request = review
        .get("request")
        .filter(|r| r.is_object())
        .ok_or(ReviewError::Shape("no request"))?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .ok_or(ReviewError::Shape("request.uid is missing"))?;
    let mut response = json!({"uid": uid, "allowed": true});
    let answer = |response: Value| {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": response,
        })
    };
    let kind = request
        .get("kind")
        .and_then(|k| k.get("kind"))
        .and_then(Value::as_str);
    let group = request
        .get("kind")
        .and_then(|k| k.get("group"))
        .and_then(Value::as_str);
    if kind != Some("Pod") || !matches!(group, Some("") | None) {
        // Not ours to change; the configuration should not send it.
        return Ok(answer(response));
    }
    let Some(pod) = request.get("object").filter(|o| o.is_object()) else {
        return Err(ReviewError::Shape("request.object is not a Pod"));
    };
    let namespace = request
        .get("namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    let name = pod
        .get("metadata")
        .and_then(|m| m.get("name").or_else(|| m.get("generateName")))
        .and_then(Value::as_str)
        .unwrap_or("");
    let mut after = pod.clone();
    let mut meta = after.get("metadata").cloned().unwrap_or_else(|| json!({}));
    let mut spec = after.get("spec").cloned().unwrap_or(Value::Null);
    match inject_pod(&mut meta, &mut spec, config) {
        Outcome::Injected => {
            after["metadata"] = meta;
            after["spec"] = spec;
            let patch = json_patch::diff(pod, &after);
            let patch = serde_json::to_vec(&patch).expect("a JSON patch serializes");
            response["patchType"] = json!("JSONPatch");
            response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch));
            tracing::info!(%namespace, pod = %name, "sidecar injected");
        }
        Outcome::Refused(reason) => {
            tracing::warn!(%namespace, pod = %name, %reason, "pod admitted without the sidecar");
            response["warnings"] = json!([format!(
                "infermesh: the sidecar was not injected into {namespace}/{name}: {reason}"
            )]);
        }
        Outcome::AlreadyInjected | Outcome::OptedOut => {}
    }
    Ok(answer(response))
}

fn respond(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid response")
}

fn error(status: StatusCode, reason: &str) -> Response<Full<Bytes>> {
    respond(status, &json!({"error": reason}))
}

async fn handle(request: Request<Incoming>, config: Arc<Config>) -> Response<Full<Bytes>> {
    if request.uri().path() != "/inject" {
        return error(StatusCode::NOT_FOUND, "the webhook answers at /inject");
    }
    if request.method() != Method::POST {
        return error(StatusCode::METHOD_NOT_ALLOWED, "POST an AdmissionReview");
    }
    let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(cause) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the review (at most {MAX_BODY} bytes): {cause}"),
            )
        }
    };
    match review(&body, &config) {
        Ok(answer) => respond(StatusCode::OK, &answer),
        Err(reason) => {
            tracing::info!(%reason, "malformed admission review refused");
            error(StatusCode::BAD_REQUEST, &reason.to_string())
        }
    }
}

/// Serves the webhook on `listener` until the process ends.
pub fn spawn(listener: TcpListener, tls: Arc<ServerConfig>, config: Config) {
    let acceptor = TlsAcceptor::from(tls);
    let config = Arc::new(config);
    tokio::spawn(async move {
        loop {
            let (stream, remote) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "cannot accept a webhook connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let config = config.clone();
            tokio::spawn(async move {
                let tls =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(error)) => {
                            tracing::info!(%remote, %error, "webhook TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(%remote, "webhook TLS handshake timed out");
                            return;
                        }
                    };
                let service = hyper::service::service_fn(move |request| {
                    let config = config.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(request, config).await) }
                });
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                // A client that connects and sends no request head does
                // not hold the connection for ever.
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HANDSHAKE_TIMEOUT);
                if let Err(error) = builder.serve_connection(TokioIo::new(tls), service).await {
                    tracing::debug!(%remote, %error, "webhook connection ended");
                }
            });
        }
    });
}
