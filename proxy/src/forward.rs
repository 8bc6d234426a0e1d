//! The innermost service: picks an endpoint of its backend and
//! sends the request over a pooled connection, streaming both ways.
//!
//! Each attempt is counted against the backend's limits (refused with 503
//! `overloaded` past them), and its outcome is judged on the response head
//! for outlier detection and the balancer (latency samples, failure
//! back-off, the 429 penalty).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};
use http_body_util::BodyExt;
use infermesh_filters::body::{Ended, Watch, Watched};
use infermesh_filters::hedge::HedgeGroup;
use infermesh_filters::replay::ReplayBody;
use infermesh_filters::retry::{NameServedBy, ServedBy, TriedEndpoints};
use infermesh_filters::{BoxBody, ProxyError};
use infermesh_proto::policy::UpstreamProtocol;
use tower::Service;

use crate::backend::{Admitted, Backend, Picked};
use crate::balance::{Endpoint, Hint, InFlight, Outcome, DEFAULT_PENALTY};
use crate::body::{BodyFault, ProxyBody};
use crate::pool::Reusable;
use crate::traces::{self, AttemptSpan};

/// Sends requests to an endpoint of one backend: the innermost service of
/// each route target's stack, so the type says which backend it serves.
#[derive(Debug, Clone)]
pub struct Forward {
    backend: Arc<Backend>,
}

impl Forward {
    /// Sends to `backend`'s endpoints.
    pub fn to(backend: Arc<Backend>) -> Self {
        Self { backend }
    }
}

impl Service<Request<ReplayBody<ProxyBody>>> for Forward {
    type Response = Response<BoxBody>;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<BoxBody>, ProxyError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ReplayBody<ProxyBody>>) -> Self::Future {
        // What needs no waiting is done here, and the future keeps only what
        // the exchange needs: it is boxed and moved per request, so its
        // size is paid on every one.
        match Attempt::start(&self.backend, request.map(ProxyBody::attempt)) {
            Ok((attempt, request)) => {
                let sending = attempt
                    .backend
                    .pool()
                    .send(attempt.endpoint.addr(), request);
                // A combinator, not an `async` block: a block would keep
                // the pool's future twice (as captured and as awaited).
                Box::pin(sending.map(move |sent| attempt.finish(sent)))
            }
            Err(error) => Box::pin(std::future::ready(Err(error))),
        }
    }
}

/// An attempt on its way to an endpoint: admitted by the backend's limits,
/// its endpoint picked, counted in flight.
struct Attempt {
    backend: Arc<Backend>,
    admitted: Admitted,
    endpoint: Arc<Endpoint>,
    judged: Judged,
    /// Where the client's side of the body records its failures: those are
    /// the client's, never the endpoint's.
    client_body: Option<BodyFault>,
    /// Boxed: it is there only for a sampled request.
    span: Option<Box<AttemptSpan>>,
    /// The retry filter asked for the endpoint's address on the response.
    name_served_by: bool,
    guard: InFlight,
    started: Instant,
}

impl Attempt {
    /// Admits the attempt, picks its endpoint and points the request at it.
    fn start(
        backend: &Arc<Backend>,
        mut request: Request<ProxyBody>,
    ) -> Result<(Self, Request<ProxyBody>), ProxyError> {
        if let Some(problem) = backend.mtls_problem() {
            return Err(ProxyError::Misconfigured(problem));
        }
        // Limits first, so a refused attempt takes no probe slot.
        let admitted = backend.admit()?;
        // A retry, and a hedge, go elsewhere when the backend has another
        // endpoint.
        let hedged = request.extensions().get::<HedgeGroup>().cloned();
        let mut avoid = request
            .extensions()
            .get::<TriedEndpoints>()
            .map(|tried| tried.0.clone())
            .unwrap_or_default();
        let mut hedge = false;
        if let Some(group) = &hedged {
            let running = group.endpoints();
            hedge = !running.is_empty();
            avoid.extend(running);
        }
        // What the model-aware balancer weighs: the prompt prefix and model.
        let hint = request
            .extensions()
            .get::<Hint>()
            .cloned()
            .unwrap_or_default();
        let picked = backend.pick_for_request(&avoid, &hint).ok_or_else(|| {
            let all_ejected = !backend.endpoints().is_empty();
            ProxyError::NoEndpoint(if all_ejected {
                format!(
                    "{} (every endpoint is ejected or its probe is in flight)",
                    backend.name().as_str()
                )
            } else {
                backend.name().as_str().to_string()
            })
        })?;
        let endpoint = picked.endpoint.clone();
        if let Some(group) = &hedged {
            group.dispatched(endpoint.addr());
        }
        let judged = Judged {
            backend: backend.clone(),
            picked: Some(picked),
        };
        match backend.protocol() {
            UpstreamProtocol::Http1 => prepare_pooled_http1(&mut request, endpoint.authority()),
            protocol => prepare_upstream_request(
                &mut request,
                backend.scheme(),
                endpoint.authority(),
                protocol,
            ),
        }
        let client_body = request.extensions().get::<BodyFault>().cloned();
        let name_served_by = request.extensions().get::<NameServedBy>().is_some();
        if let Some(attempts) = request.extensions().get::<Arc<crate::access::Attempts>>() {
            attempts.attempted(endpoint.addr());
        }
        let span = traces::attempt(
            &mut request,
            hedge,
            backend.name().as_str(),
            endpoint.addr(),
        )
        .map(Box::new);
        // One reading of the clock for the endpoint's start and the attempt's.
        let now = Instant::now();
        let guard = endpoint.start_at(now);
        let attempt = Attempt {
            backend: backend.clone(),
            admitted,
            endpoint,
            judged,
            client_body,
            span,
            name_served_by,
            guard,
            started: now,
        };
        Ok((attempt, request))
    }

    /// Judges the exchange's outcome and hands the response on, its body
    /// holding the attempt's counts (and its HTTP/1.1 connection) until it
    /// ends.
    fn finish(
        self,
        sent: Result<(Response<hyper::body::Incoming>, Option<Reusable>), crate::pool::Error>,
    ) -> Result<Response<BoxBody>, ProxyError> {
        let Attempt {
            backend,
            mut admitted,
            endpoint,
            judged,
            client_body,
            mut span,
            name_served_by,
            guard,
            started,
        } = self;
        let now = Instant::now();
        match sent {
            Ok((response, conn)) => {
                admitted.responded();
                backend.load_report(&endpoint, response.headers());
                let verdict = judge(response.status(), response.headers());
                if let Some(span) = span.as_mut() {
                    span.responded(response.status(), response.headers());
                }
                endpoint.observe_at(now, now - started, verdict.outcome());
                judged.finish(verdict.failed);
                if let Some(length) = verdict.penalty {
                    backend.penalize(&endpoint, length);
                }
                // An HTTP/1.1 connection is reused once the response body has
                // ended; at once when it has none.
                let conn = match conn {
                    Some(conn) if body_is_empty(&response) => {
                        conn.release();
                        None
                    }
                    conn => conn,
                };
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                // The client's connection has its own version; an HTTP/1.0
                // upstream must not turn the client's keep-alive off.
                parts.version = Version::HTTP_11;
                if name_served_by {
                    parts.extensions.insert(ServedBy(endpoint.addr()));
                }
                Ok(Response::from_parts(
                    parts,
                    Watched::new(
                        body,
                        InFlightUntilEnd {
                            _endpoint: guard,
                            _backend: admitted,
                            _span: span,
                            conn,
                        },
                    )
                    .boxed_unsync(),
                ))
            }
            Err(error) => {
                if let Some(span) = span {
                    span.failed(&error);
                }
                if let Some(problem) = client_body.as_ref().and_then(BodyFault::get) {
                    // Neither judged, timed nor backed off: the endpoint did
                    // nothing wrong.
                    return Err(problem.to_error());
                }
                // Never a latency sample (a refused connection is fast): the
                // endpoint backs off instead.
                endpoint.observe_at(now, now - started, Outcome::Failed);
                judged.finish(true);
                let addr = endpoint.addr().to_string();
                if error.is_connect() {
                    backend.connect_failed();
                    Err(ProxyError::connect(addr, error))
                } else {
                    let refused = never_sent(&error);
                    Err(ProxyError::upstream(addr, error, refused))
                }
            }
        }
    }
}

/// An attempt whose outcome outlier detection waits for; dropped without
/// one (the attempt was cancelled), it gives up its probe slot.
struct Judged {
    backend: Arc<Backend>,
    picked: Option<Picked>,
}

impl Judged {
    fn finish(mut self, failed: bool) {
        if let Some(picked) = self.picked.take() {
            self.backend.record(&picked, failed);
        }
    }
}

impl Drop for Judged {
    fn drop(&mut self) {
        if let Some(picked) = self.picked.take() {
            self.backend.probe_abandoned(&picked);
        }
    }
}

/// What a response head says about its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Verdict {
    /// A failure for outlier detection: a 5xx, or gRPC `UNAVAILABLE` in
    /// the headers (a trailers-only response).
    failed: bool,
    /// How long to penalise the endpoint in the balancer: a 429, a gRPC
    /// `RESOURCE_EXHAUSTED` in the headers, or any failure status carrying
    /// `Retry-After`, for the `Retry-After` (seconds) or a default.
    penalty: Option<Duration>,
}

impl Verdict {
    /// What the balancer makes of the attempt: a failure backs the endpoint
    /// off, shedding is penalised, only the rest is a latency sample.
    fn outcome(&self) -> Outcome {
        if self.failed {
            Outcome::Failed
        } else if self.penalty.is_some() {
            Outcome::Shed
        } else {
            Outcome::Served
        }
    }
}

fn judge(status: http::StatusCode, headers: &HeaderMap) -> Verdict {
    // Each header is looked up only where it can change the verdict: a gRPC
    // status in the head of a 200, a `Retry-After` on an error status or
    // with gRPC `RESOURCE_EXHAUSTED`. A plain answer costs one lookup.
    let grpc_status = (status == http::StatusCode::OK)
        .then(|| headers.get(infermesh_filters::grpc::GRPC_STATUS))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u8>().ok());
    let error_status = status.is_client_error() || status.is_server_error();
    let retry_after = (error_status || grpc_status == Some(8))
        .then(|| headers.get(header::RETRY_AFTER))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let shedding = status == http::StatusCode::TOO_MANY_REQUESTS
        || (status == http::StatusCode::OK && grpc_status == Some(8))
        || (retry_after.is_some() && error_status);
    Verdict {
        failed: status.is_server_error()
            || (status == http::StatusCode::OK && grpc_status == Some(14)),
        penalty: shedding.then(|| retry_after.unwrap_or(DEFAULT_PENALTY)),
    }
}

/// Whether a failed exchange certainly did not reach the server, so that
/// sending it again cannot duplicate work: HTTP/2 `REFUSED_STREAM` (the
/// server refused the stream before processing it), or a request the client
/// cancelled before writing any of it (its connection closed first).
fn never_sent(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            if h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return true;
            }
        }
        if let Some(hyper) = cause.downcast_ref::<hyper::Error>() {
            if hyper.is_canceled() {
                return true;
            }
        }
        source = cause.source();
    }
    false
}

/// Points the request at `authority` and removes what must not cross a hop.
pub(crate) fn prepare_upstream_request(
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
    match protocol {
        UpstreamProtocol::Http1 => {
            strip_hop_by_hop(request.headers_mut());
            *request.version_mut() = Version::HTTP_11;
        }
        UpstreamProtocol::Http2 => {
            // `te: trailers` is the one TE HTTP/2 allows (RFC 9113, section
            // 8.2.2), and gRPC servers require it.
            strip_connection_specific(request.headers_mut(), true);
            *request.version_mut() = Version::HTTP_2;
            // HTTP/2 carries the host as :authority; a Host header is redundant there.
            request.headers_mut().remove(header::HOST);
        }
    }
}

/// Makes `request` an HTTP/1.1 request as the pool writes it on a
/// connection to the endpoint at `authority`: in origin form, with a `Host`
/// header (the authority the client used, else the endpoint's), and
/// without connection-specific headers.
///
/// [`prepare_upstream_request`] writes an absolute URI, which the pool
/// turned back into the origin form: two URIs built per request for none.
fn prepare_pooled_http1(request: &mut Request<ProxyBody>, authority: &http::uri::Authority) {
    crate::pool::origin_form(request, Some(authority));
    strip_hop_by_hop(request.headers_mut());
    *request.version_mut() = Version::HTTP_11;
}

/// Removes connection-specific headers (RFC 9110, section 7.6.1).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip_connection_specific(headers, false);
}

/// The connection-specific headers, as bits of the set a message carries.
const CONNECTION: u8 = 1;
const TE: u8 = 1 << 3;
const KEEP_ALIVE: u8 = 1 << 5;
const PROXY_CONNECTION: u8 = 1 << 6;
const HOP_BY_HOP: [(HeaderName, u8); 5] = [
    (header::CONNECTION, CONNECTION),
    (header::TRANSFER_ENCODING, 1 << 1),
    (header::UPGRADE, 1 << 2),
    (header::TE, TE),
    (header::PROXY_AUTHORIZATION, 1 << 4),
];

/// Removes connection-specific headers, keeping a lone `te: trailers`
/// when `keep_te_trailers` (the request goes out over HTTP/2).
///
/// Most messages carry none of them, and a gRPC request only its TE: one
/// pass over the names (comparisons of standard names are enum compares)
/// finds which are there, and only those are removed. Seven hashed
/// removals per message were 5% of a request's instructions.
fn strip_connection_specific(headers: &mut HeaderMap, keep_te_trailers: bool) {
    let mut present = 0;
    for name in headers.keys() {
        present |= hop_by_hop_bit(name);
    }
    if present == 0 {
        return;
    }
    // A TE to keep as it is, or to put back as `trailers` once removed.
    let (mut te_kept, mut te_trailers) = (false, false);
    if keep_te_trailers && present & TE != 0 {
        let mut values = headers.get_all(header::TE).iter();
        let first = values.next();
        if first.is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers")) {
            if values.next().is_none() && first.is_some_and(|v| v == "trailers") {
                // Already as HTTP/2 wants it: left in place.
                present &= !TE;
                te_kept = true;
            } else {
                te_trailers = true;
            }
        }
    }
    if present & CONNECTION != 0 {
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in listed {
            // `Connection: TE` goes with a TE sent over HTTP/1.1.
            if !(te_kept && name == header::TE) {
                headers.remove(name);
            }
        }
    }
    for (name, bit) in &HOP_BY_HOP {
        if present & bit != 0 {
            headers.remove(name);
        }
    }
    if present & KEEP_ALIVE != 0 {
        headers.remove("keep-alive");
    }
    if present & PROXY_CONNECTION != 0 {
        headers.remove("proxy-connection");
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The bit of a connection-specific header, or 0.
fn hop_by_hop_bit(name: &HeaderName) -> u8 {
    for (hop, bit) in &HOP_BY_HOP {
        if name == hop {
            return *bit;
        }
    }
    match name.as_str() {
        "keep-alive" => KEEP_ALIVE,
        "proxy-connection" => PROXY_CONNECTION,
        _ => 0,
    }
}

/// What an upstream response body holds until it ends: the attempt's count
/// in flight on its endpoint and on its backend, and its HTTP/1.1
/// connection, given back to the pool when the body ended whole.
struct InFlightUntilEnd {
    _endpoint: InFlight,
    _backend: Admitted,
    /// The attempt's span, ended with the body.
    _span: Option<Box<AttemptSpan>>,
    conn: Option<Reusable>,
}

impl Watch for InFlightUntilEnd {
    fn end(mut self, ended: Ended) {
        // A body that failed, or was dropped unfinished, takes its
        // connection with it (hyper closes it).
        if let (Ended::Complete, Some(conn)) = (ended, self.conn.take()) {
            conn.release();
        }
    }
}

/// Whether a response has no body to read, so that its connection is free
/// at once.
fn body_is_empty(response: &Response<hyper::body::Incoming>) -> bool {
    use http_body::Body as _;
    response.body().is_end_stream()
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
    fn over_http2_only_a_te_of_trailers_is_kept() {
        let te = |values: &[&str], connection: Option<&str>| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(header::TE, value.parse().unwrap());
            }
            if let Some(connection) = connection {
                headers.insert(header::CONNECTION, connection.parse().unwrap());
            }
            headers.insert("keep-alive", "timeout=5".parse().unwrap());
            headers.insert(header::CONTENT_TYPE, "application/grpc".parse().unwrap());
            strip_connection_specific(&mut headers, true);
            assert!(headers.contains_key(header::CONTENT_TYPE));
            let left: Vec<_> = headers.get_all(header::TE).iter().cloned().collect();
            assert_eq!(headers.len(), 1 + left.len(), "{headers:?}");
            left
        };
        assert_eq!(te(&["trailers"], None), ["trailers"]);
        assert_eq!(te(&["trailers"], Some("TE, keep-alive")), ["trailers"]);
        assert_eq!(te(&["Trailers"], Some("te")), ["trailers"]);
        assert_eq!(te(&["trailers", "gzip"], None), ["trailers"]);
        assert!(te(&["gzip"], Some("te")).is_empty());
        assert!(te(&["gzip", "trailers"], None).is_empty());

        // Over HTTP/1.1 every TE goes, as every other such header.
        let mut headers = HeaderMap::new();
        headers.insert(header::TE, "trailers".parse().unwrap());
        headers.insert(header::UPGRADE, "h2c".parse().unwrap());
        headers.insert("proxy-connection", "keep-alive".parse().unwrap());
        headers.insert(header::PROXY_AUTHORIZATION, "Basic x".parse().unwrap());
        headers.insert(header::ACCEPT, "*/*".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key(header::ACCEPT));
    }

    #[test]
    fn pooled_http1_requests_go_in_origin_form_with_the_clients_host() {
        let authority: http::uri::Authority = "10.0.0.7:8000".parse().unwrap();
        // An HTTP/2 client's request: its authority becomes the Host.
        let mut request = Request::builder()
            .uri("http://models.local/v1/chat/completions?x=1")
            .header(header::TE, "trailers")
            .version(Version::HTTP_2)
            .body(ProxyBody::default())
            .unwrap();
        prepare_pooled_http1(&mut request, &authority);
        assert_eq!(request.uri(), "/v1/chat/completions?x=1");
        assert_eq!(request.headers()[header::HOST], "models.local");
        assert!(!request.headers().contains_key(header::TE));
        assert_eq!(request.version(), Version::HTTP_11);
        // An HTTP/1.1 client's: its Host is kept, its target untouched.
        let mut request = Request::builder()
            .uri("/v1/models")
            .header(header::HOST, "api.local:8080")
            .body(ProxyBody::default())
            .unwrap();
        prepare_pooled_http1(&mut request, &authority);
        assert_eq!(request.uri(), "/v1/models");
        assert_eq!(request.headers()[header::HOST], "api.local:8080");
        // Neither (an HTTP/1.0 client without a Host): the endpoint's.
        let mut request = Request::builder()
            .uri("/v1/models")
            .version(Version::HTTP_10)
            .body(ProxyBody::default())
            .unwrap();
        prepare_pooled_http1(&mut request, &authority);
        assert_eq!(request.headers()[header::HOST], "10.0.0.7:8000");
        assert_eq!(request.version(), Version::HTTP_11);
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

    fn head(status: u16, headers: &[(&'static str, &'static str)]) -> Verdict {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, HeaderValue::from_static(value));
        }
        judge(http::StatusCode::from_u16(status).unwrap(), &map)
    }

    #[test]
    fn response_heads_are_judged_for_ejection_and_penalties() {
        let ok = Verdict {
            failed: false,
            penalty: None,
        };
        assert_eq!(head(200, &[]), ok);
        assert_eq!(head(404, &[]), ok, "the client's fault, not the endpoint's");
        assert_eq!(head(200, &[("grpc-status", "0")]), ok);
        assert!(head(500, &[]).failed);
        assert!(head(503, &[]).failed);
        assert!(head(200, &[("grpc-status", "14")]).failed);
        assert_eq!(
            head(429, &[]),
            Verdict {
                failed: false,
                penalty: Some(DEFAULT_PENALTY)
            }
        );
        assert_eq!(
            head(429, &[("retry-after", "7")]).penalty,
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            head(503, &[("retry-after", "3")]),
            Verdict {
                failed: true,
                penalty: Some(Duration::from_secs(3))
            }
        );
        assert_eq!(
            head(200, &[("grpc-status", "8")]).penalty,
            Some(DEFAULT_PENALTY)
        );
        assert_eq!(head(200, &[("retry-after", "3")]).penalty, None);
        // gRPC RESOURCE_EXHAUSTED takes the server's Retry-After too.
        assert_eq!(
            head(200, &[("grpc-status", "8"), ("retry-after", "5")]).penalty,
            Some(Duration::from_secs(5))
        );
        // A gRPC status counts only in the head of a 200.
        assert_eq!(head(204, &[("grpc-status", "8")]), ok);
        assert_eq!(head(204, &[("grpc-status", "14")]), ok);
        assert_eq!(
            head(404, &[("retry-after", "9")]).penalty,
            Some(Duration::from_secs(9))
        );
    }

    #[test]
    fn only_served_heads_are_latency_samples_for_the_balancer() {
        assert_eq!(head(200, &[]).outcome(), Outcome::Served);
        assert_eq!(head(404, &[]).outcome(), Outcome::Served);
        assert_eq!(head(500, &[]).outcome(), Outcome::Failed);
        assert_eq!(
            head(503, &[("retry-after", "3")]).outcome(),
            Outcome::Failed
        );
        assert_eq!(
            head(200, &[("grpc-status", "14")]).outcome(),
            Outcome::Failed
        );
        assert_eq!(head(429, &[]).outcome(), Outcome::Shed);
        assert_eq!(head(200, &[("grpc-status", "8")]).outcome(), Outcome::Shed);
    }

    #[test]
    fn refused_streams_and_unsent_requests_are_never_sent() {
        let refused = h2::Error::from(h2::Reason::REFUSED_STREAM);
        assert!(never_sent(&refused));
        let cancelled = h2::Error::from(h2::Reason::CANCEL);
        assert!(!never_sent(&cancelled));
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(!never_sent(&io));
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
