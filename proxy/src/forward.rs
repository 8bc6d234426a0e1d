//! The innermost service: picks an endpoint of the request's backend and
//! sends the request over a pooled connection, streaming both ways.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use infermesh_filters::replay::ReplayBody;
use infermesh_filters::retry::{ServedBy, TriedEndpoints};
use infermesh_filters::{BoxBody, BoxError, ProxyError};
use infermesh_proto::policy::UpstreamProtocol;
use pin_project_lite::pin_project;
use tower::Service;

use crate::backend::Backend;
use crate::balance::InFlight;
use crate::body::ProxyBody;

/// Request extension naming the backend chosen for this request.
#[derive(Debug, Clone)]
pub struct Upstream(pub Arc<Backend>);

/// Sends requests to an endpoint of their [`Upstream`] backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct Forward;

impl Service<Request<ReplayBody<ProxyBody>>> for Forward {
    type Response = Response<BoxBody>;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<BoxBody>, ProxyError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ReplayBody<ProxyBody>>) -> Self::Future {
        Box::pin(forward(request.map(ProxyBody::attempt)))
    }
}

async fn forward(mut request: Request<ProxyBody>) -> Result<Response<BoxBody>, ProxyError> {
    let Some(Upstream(backend)) = request.extensions_mut().remove::<Upstream>() else {
        return Err(ProxyError::NoEndpoint("(none chosen)".into()));
    };
    // A retry goes elsewhere when the backend has another endpoint.
    let endpoint = match request.extensions().get::<TriedEndpoints>() {
        Some(tried) => backend.pick_avoiding(&tried.0),
        None => backend.pick(),
    }
    .ok_or_else(|| ProxyError::NoEndpoint(backend.name().as_str().to_string()))?;
    if let Some(problem) = backend.mtls_problem() {
        return Err(ProxyError::Misconfigured(problem));
    }
    prepare_upstream_request(
        &mut request,
        backend.scheme(),
        endpoint.authority(),
        backend.protocol(),
    );
    let guard = endpoint.start();
    let started = Instant::now();
    match backend.client().request(request).await {
        Ok(response) => {
            endpoint.observe_first_byte(started.elapsed());
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            // The client's connection has its own version; an HTTP/1.0
            // upstream must not turn the client's keep-alive off.
            parts.version = Version::HTTP_11;
            parts.extensions.insert(ServedBy(endpoint.addr()));
            Ok(Response::from_parts(
                parts,
                EndpointBody {
                    inner: body,
                    guard: Some(guard),
                }
                .boxed_unsync(),
            ))
        }
        Err(error) => {
            // A failure counts against the endpoint's latency too, so a
            // broken endpoint does not look fast.
            endpoint.observe_first_byte(started.elapsed());
            let reason = error_chain(&error);
            if error.is_connect() {
                backend.connect_failed();
                Err(ProxyError::Connect {
                    endpoint: endpoint.addr().to_string(),
                    reason,
                })
            } else {
                Err(ProxyError::Upstream {
                    endpoint: endpoint.addr().to_string(),
                    reason,
                    refused: false,
                })
            }
        }
    }
}

/// Points the request at `authority` and removes what must not cross a hop.
fn prepare_upstream_request(
    request: &mut Request<ProxyBody>,
    scheme: http::uri::Scheme,
    authority: &http::uri::Authority,
    protocol: UpstreamProtocol,
) {
    // Keep the authority the client used as the Host header, so virtual
    // hosting upstream still works when the client spoke HTTP/2.
    if !request.headers().contains_key(header::HOST) {
        if let Some(original) = request.uri().authority() {
            if let Ok(value) = HeaderValue::from_str(original.as_str()) {
                request.headers_mut().insert(header::HOST, value);
            }
        }
    }
    let path_and_query = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(scheme);
    parts.authority = Some(authority.clone());
    parts.path_and_query = Some(path_and_query);
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
    let te_trailers = request
        .headers()
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    strip_hop_by_hop(request.headers_mut());
    match protocol {
        UpstreamProtocol::Http1 => *request.version_mut() = Version::HTTP_11,
        UpstreamProtocol::Http2 => {
            *request.version_mut() = Version::HTTP_2;
            // HTTP/2 carries the host as :authority; a Host header is redundant there.
            request.headers_mut().remove(header::HOST);
            if te_trailers {
                request
                    .headers_mut()
                    .insert(header::TE, HeaderValue::from_static("trailers"));
            }
        }
    }
}

/// Removes connection-specific headers (RFC 9110, section 7.6.1).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the names (comparisons
    // of standard names are enum compares) is cheaper than seven hashed
    // removals, which the profile showed as 5% of a request's instructions.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// Whether a header only concerns one connection.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::TE
        || name == header::PROXY_AUTHORIZATION
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// The causes of a client error, without the client's own generic wrapper
/// ("client error (Connect)") that says nothing to the user.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let Some(first) = error.source() else {
        return error.to_string();
    };
    let mut message = first.to_string();
    let mut source = first.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

pin_project! {
    /// An upstream response body that counts as in flight on its endpoint
    /// until it ends or is dropped.
    struct EndpointBody<B> {
        #[pin]
        inner: B,
        guard: Option<InFlight>,
    }
}

impl<B> Body for EndpointBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        match &frame {
            None | Some(Err(_)) => {
                this.guard.take();
            }
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_listed_in_connection_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert("x-private", "1".parse().unwrap());
        headers.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn upstream_requests_point_at_the_endpoint_and_keep_the_path() {
        let mut request = Request::builder()
            .uri("http://models.local/v1/chat/completions?x=1")
            .header(header::TE, "trailers")
            .body(ProxyBody::default())
            .unwrap();
        let authority: http::uri::Authority = "10.0.0.7:8000".parse().unwrap();
        prepare_upstream_request(
            &mut request,
            http::uri::Scheme::HTTP,
            &authority,
            UpstreamProtocol::Http1,
        );
        assert_eq!(
            request.uri(),
            "http://10.0.0.7:8000/v1/chat/completions?x=1"
        );
        assert_eq!(request.headers()[header::HOST], "models.local");
        assert!(!request.headers().contains_key(header::TE));
        assert_eq!(request.version(), Version::HTTP_11);
    }

    #[test]
    fn grpc_keeps_te_trailers_over_http2() {
        let mut request = Request::builder()
            .uri("/inference.GRPCInferenceService/ModelInfer")
            .header(header::TE, "trailers")
            .header(header::HOST, "models.local")
            .body(ProxyBody::default())
            .unwrap();
        let authority: http::uri::Authority = "10.0.0.7:8001".parse().unwrap();
        prepare_upstream_request(
            &mut request,
            http::uri::Scheme::HTTP,
            &authority,
            UpstreamProtocol::Http2,
        );
        assert_eq!(request.headers()[header::TE], "trailers");
        assert!(!request.headers().contains_key(header::HOST));
        assert_eq!(request.version(), Version::HTTP_2);
    }
}
