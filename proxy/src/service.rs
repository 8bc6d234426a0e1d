//! The request path of both listeners: classify, route, run the route's
//! filter stack, and account for the response.
//!
//! ```text
//! accept -> detect -> [classify -> route -> rate limits -> faults -> mirror
//!                      -> timeouts -> retries -> balance -> send] -> stream back
//!                         (fallback chain: the stack again, per link)
//!                              `local:` target -> read the body -> local engine -> answer
//! ```

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use infermesh_filters::authz::AuthzRequest;
use infermesh_filters::error::ErrorShape;
use infermesh_filters::mirror::BodyCopy;
use infermesh_filters::rate_limit::{CallerKey, TokenEstimate};
use infermesh_filters::timeout::is_grpc;
use infermesh_filters::{BoxBody, BoxError, ProxyError};
use infermesh_proto::policy::ListenerKind;
use infermesh_proto::spiffe::SpiffeId;
use pin_project_lite::pin_project;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tower::ServiceExt;

use crate::body::{BodyCheck, BodyFault, ProxyBody};
use crate::classify::{self, ApiKind, BodyScan, GrpcModelScanner, JsonScanner, Scan};
use crate::forward::Upstream;
use crate::identity::InboundConn;
use crate::inputs::Inputs;
use crate::local::{self, LocalRequest};
use crate::metrics::{
    grpc_status_label, grpc_status_of, listener_label, LocalRequestLabels, Name, RequestLabels,
};
use crate::route::{self, RouteInput};
use crate::snapshot::{Destination, RouteTarget};

/// Serves one request received on `listener`. Never fails: every error
/// becomes the response the client is owed.
pub async fn handle(
    inputs: Arc<Inputs>,
    listener: ListenerKind,
    request: Request<Incoming>,
) -> Result<Response<BoxBody>, std::convert::Infallible> {
    let started = Instant::now();
    let listener_name = listener_label(listener);
    // A guard, so that a client leaving before the response (the future is
    // dropped) still leaves the gauge.
    let in_flight = InFlightGauge::enter(inputs.metrics.in_flight_of(listener));
    // Each API's clients parse errors in their own shape.
    let shape = ErrorShape::of(request.uri().path(), request.headers());
    let lists_models = local::lists_models(request.method(), request.uri().path());
    let mut access = tracing::enabled!(target: "infermesh::access", tracing::Level::INFO)
        .then(|| AccessLog::new(listener_name, &request));
    let outcome = route_and_send(&inputs, listener, request, access.as_mut()).await;
    let (response, route, backend, duration, ok) = match outcome {
        Ok(Routed {
            response,
            route,
            backend,
            duration,
            ok,
        }) => (response, route, backend, Some(duration), Some(ok)),
        // No route takes OpenAI's model list: the proxy answers it.
        Err(Failed {
            error: ProxyError::NoRoute(_),
            route,
            backend,
        }) if lists_models => {
            let snapshot = inputs.snapshot.load();
            let list = local::model_list(snapshot.policy(), listener);
            (list, route, backend, None, None)
        }
        Err(Failed {
            error,
            route,
            backend,
        }) => {
            // A drill's abort is no news: it is counted by the fault metric.
            let level_is_warn = error.fault() != infermesh_filters::Fault::Client
                && !matches!(error, ProxyError::FaultInjected { .. });
            if level_is_warn {
                tracing::warn!(listener = listener_name, route = route.as_str(), backend = backend.as_str(), %error, "request failed");
            } else {
                tracing::debug!(listener = listener_name, %error, "request refused");
            }
            (error.to_response(shape), route, backend, None, None)
        }
    };
    let status = response.status().as_u16();
    if let Some(access) = access.as_mut() {
        access.route = route.clone();
        access.backend = backend.clone();
        access.status = status;
    }
    let labels = RequestLabels {
        listener: listener_name,
        route,
        backend,
        status,
        grpc_status: "",
    };
    // A gRPC request is counted with its gRPC status: from the head of a
    // trailers-only response, else when the trailers pass.
    let mut pending = None;
    let grpc = shape == ErrorShape::Grpc;
    match (grpc, response.headers().get("grpc-status"), ok) {
        (false, _, Some(ok)) if status == 200 => {
            ok.inc();
        }
        (false, _, _) => {
            inputs.metrics.requests.get_or_create(&labels).inc();
        }
        (true, Some(code), _) => {
            let grpc_status = grpc_status_of(code);
            if let Some(access) = access.as_mut() {
                access.grpc_status = grpc_status;
            }
            inputs
                .metrics
                .requests
                .get_or_create(&RequestLabels {
                    grpc_status,
                    ..labels
                })
                .inc();
        }
        (true, None, _) => {
            pending = Some(PendingCount {
                requests: inputs.metrics.requests.clone(),
                labels,
                grpc_status: None,
                ended: false,
            })
        }
    }
    let (parts, body) = response.into_parts();
    let body = Accounted {
        inner: body,
        finish: Some(Finish {
            started,
            duration,
            _in_flight: in_flight,
            access,
            pending,
        }),
    };
    Ok(Response::from_parts(parts, body.boxed_unsync()))
}

struct Routed {
    response: Response<BoxBody>,
    route: Name,
    backend: Name,
    duration: Histogram,
    ok: Counter,
}

struct Failed {
    error: ProxyError,
    route: Name,
    backend: Name,
}

impl From<ProxyError> for Failed {
    fn from(error: ProxyError) -> Self {
        Self {
            error,
            route: Name::default(),
            backend: Name::default(),
        }
    }
}

async fn route_and_send(
    inputs: &Inputs,
    listener: ListenerKind,
    request: Request<Incoming>,
    access: Option<&mut AccessLog>,
) -> Result<Routed, Failed> {
    let snapshot = inputs.snapshot.load_full();
    let (mut parts, body) = request.into_parts();
    normalize_authority(&mut parts)?;
    let head = classify::classify_head(
        &parts.method,
        parts.uri.path(),
        parts.headers.get(header::CONTENT_TYPE),
    );

    // Read as much of the body as classification needs; it is replayed
    // upstream unchanged (unless a model alias rewrites the name).
    let limit = snapshot.classify_limit();
    let authorizer = (listener == ListenerKind::Inbound)
        .then(|| snapshot.authorizer())
        .filter(|a| a.enforced());
    // Authorization by model needs the model for certain: the whole
    // top-level object is scanned, to see a repeated `model`.
    let prove_model = authorizer.is_some_and(|a| a.needs_model());
    // A token limit estimates a request's cost from its `max_tokens`,
    // wherever it is in the object.
    let whole_object = prove_model || snapshot.token_limits();
    let read = read_classified(&head, body, limit, prove_model, whole_object);
    let classified = match snapshot.classify_read_limit() {
        None => read.await,
        Some(wait) => tokio::time::timeout(wait, read).await.unwrap_or_else(|_| {
            Err(ProxyError::RequestTimeout(format!(
                "the request body did not arrive within {} (classify.readTimeout; the proxy reads up to {limit} bytes of it to find the model)",
                humantime::format_duration(wait)
            )))
        }),
    };
    let Classified {
        body,
        model,
        stream,
        max_tokens,
        check,
    } = classified?;

    let conn = parts.extensions.get::<InboundConn>();
    if let Some(access) = access {
        access.api = head.api.as_str();
        access.model = model.clone();
        access.stream = stream;
        access.caller = conn.and_then(|c| c.caller.clone());
    }

    let host = route::request_host(&parts.uri, &parts.headers);
    let input = RouteInput {
        host: host.as_deref(),
        path: parts.uri.path(),
        grpc: head
            .grpc
            .as_ref()
            .map(|g| (g.service.as_str(), g.method.as_str())),
        headers: &parts.headers,
        model: model.as_deref(),
    };
    let route = snapshot.route(listener, &input);
    let claimed = route.is_some_and(|r| r.selects_model(&input));
    if let Some(authorizer) = authorizer {
        let grpc_method = head.grpc.as_ref().map(|_| parts.uri.path());
        authorizer.check(&AuthzRequest {
            caller: conn.and_then(|c| c.caller.as_deref()),
            model: model.as_deref(),
            route: route.map(|r| r.name().as_str()),
            grpc_method,
            port: conn.map_or(0, |c| c.port),
        })?;
    }
    let Some(route) = route else {
        // Still waiting for the control plane: "no route" would be a lie.
        if snapshot.source() == crate::snapshot::Source::Pending {
            return Err(ProxyError::NoPolicyYet.into());
        }
        return Err(ProxyError::NoRoute(describe(&parts, model.as_deref())).into());
    };
    let fail = |error: ProxyError, backend: Name| Failed {
        error,
        route: route.name().clone(),
        backend,
    };
    let Some(target) = route.pick_target() else {
        return Err(fail(
            ProxyError::NoEndpoint(format!("(route {} has no backend)", route.name().as_str())),
            Name::default(),
        ));
    };

    // A fallback chain and a mirror need the whole body to send it again:
    // read the rest of a body that fits in the classification limit. KServe
    // REST names the model in the path, so its body was not scanned: read it now.
    let mut body = body;
    if !route.fallback().is_empty() || route.mirrored() {
        if head.api == ApiKind::KServeRest {
            if let BodyState::Streaming(incoming) = body {
                let prefix = Prefix {
                    chunks: VecDeque::new(),
                    trailers: None,
                    rest: Some(incoming),
                };
                body = BodyState::Scanned(prefix, Scanned::Path);
            }
        }
        if let BodyState::Scanned(prefix, _) = &mut body {
            complete_prefix(prefix, limit).await?;
        }
    }
    let held = if route.fallback().is_empty() && !route.mirrored() {
        None
    } else {
        match &body {
            BodyState::Scanned(prefix, scanned)
                if prefix.rest.is_none()
                    && prefix.chunks.iter().map(Bytes::len).sum::<usize>() <= limit =>
            {
                Some(Replay {
                    parts: parts.clone(),
                    chunks: prefix.chunks.clone(),
                    trailers: prefix.trailers.clone(),
                    scanned: Some(scanned.clone()),
                })
            }
            BodyState::Streaming(body) if body.is_end_stream() => Some(Replay {
                parts: parts.clone(),
                chunks: VecDeque::new(),
                trailers: None,
                scanned: None,
            }),
            _ => None,
        }
    };
    let copy = held
        .as_ref()
        .filter(|_| route.mirrored())
        .map(|held| BodyCopy {
            chunks: held.chunks.iter().cloned().collect(),
            trailers: held.trailers.clone(),
        });
    let replay = held.filter(|_| !route.fallback().is_empty());
    if route.token_limited() {
        let estimate = token_estimate(&parts.headers, &body, max_tokens);
        parts.extensions.insert(TokenEstimate(estimate));
    }
    if route.caller_keyed() {
        let caller = parts
            .extensions
            .get::<InboundConn>()
            .and_then(|c| c.caller.as_ref())
            .map(|id| CallerKey(Arc::from(id.to_string())));
        if let Some(caller) = caller {
            parts.extensions.insert(caller);
        }
    }
    if let Some(copy) = copy {
        parts.extensions.insert(copy);
    }

    // A stalled upload is cut; a gRPC stream may be quiet for long, and its
    // limits are the route's.
    let idle = snapshot
        .body_idle_limit()
        .filter(|_| !is_grpc(&parts.headers));
    let fault = BodyFault::default();
    parts.extensions.insert(fault.clone());
    let body = match body {
        BodyState::Streaming(body) => ProxyBody::streaming(body),
        BodyState::Scanned(mut prefix, scanned) => {
            if let Some(alias) = target.model.as_deref() {
                if model.as_deref() != Some(alias) {
                    rewrite_model(&mut prefix, &scanned, alias, &mut parts.headers);
                }
            }
            ProxyBody::replay(prefix.chunks, prefix.trailers, prefix.rest)
        }
    }
    .guarded(check, idle, fault);

    let what = Asked {
        api: head.api,
        grpc_method: head.grpc.as_ref().map(|g| g.method.as_str()),
        model: model.as_deref(),
        claimed,
    };
    let request = Request::from_parts(parts, body);
    let served = AtomicUsize::new(0);
    let chain = Chain {
        inputs,
        route,
        target,
        replay: replay.as_ref(),
        asked: &what,
        served: &served,
    };
    let result = match route.front() {
        None => chain.dispatch(request).await,
        // Rate limits, faults and the mirror see the request once, whichever
        // link of the chain answers it.
        Some(front) => {
            let chain = &chain;
            front
                .service(tower::service_fn(move |request| chain.dispatch(request)))
                .oneshot(request)
                .await
        }
    };
    let served_by = match served.load(Ordering::Relaxed) {
        0 => target,
        link => route
            .fallback()
            .get(link - 1)
            .map_or(target, |link| &link.target),
    };
    match result {
        Ok(response) => Ok(Routed {
            response,
            route: route.name().clone(),
            backend: served_by.name.clone(),
            duration: served_by.duration.clone(),
            ok: served_by.ok.clone(),
        }),
        Err(error) => Err(fail(error, served_by.name.clone())),
    }
}

/// Makes the request's authority one value that routing and forwarding both
/// see (RFC 9112 section 3.2, RFC 9113 section 8.3.1): a request with two
/// `Host` headers, an HTTP/1.1 request without one, a `Host` that is no
/// authority, and an HTTP/2 `host` that differs from `:authority` are
/// refused; an absolute-form target's authority replaces the `Host` header.
fn normalize_authority(parts: &mut http::request::Parts) -> Result<(), ProxyError> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest(
            "the request has more than one Host header".into(),
        ));
    }
    let host = match host {
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| v.parse::<http::uri::Authority>().ok())
                .ok_or_else(|| {
                    ProxyError::BadRequest(format!("the Host header {value:?} is not a host"))
                })?,
        ),
        None => None,
    };
    let target = parts.uri.authority().cloned();
    match (target, host) {
        (None, None) if parts.version == http::Version::HTTP_11 => Err(ProxyError::BadRequest(
            "an HTTP/1.1 request needs a Host header".into(),
        )),
        (Some(target), Some(host)) if target != host => {
            if parts.version == http::Version::HTTP_2 {
                Err(ProxyError::BadRequest(format!(
                    "the host header {host} differs from :authority {target}"
                )))
            } else {
                // The target's authority wins, and is what goes upstream.
                let value = HeaderValue::from_str(target.as_str()).map_err(|_| {
                    ProxyError::BadRequest(format!("the request target {target} is not a host"))
                })?;
                parts.headers.insert(header::HOST, value);
                Ok(())
            }
        }
        _ => Ok(()),
    }
}

/// A request body read as far as classification needs.
struct Classified {
    body: BodyState,
    model: Option<String>,
    stream: bool,
    max_tokens: Option<u64>,
    /// Verifies the rest of the body, when it streams on after the prefix
    /// and the request was routed by a model read from the prefix.
    check: Option<BodyCheck>,
}

/// Reads the body's prefix and finds the model in it. When a decision rests
/// on the model, the body must not name another one further on: checked now
/// for what was read, and by a [`BodyCheck`] for the rest as it streams.
async fn read_classified(
    head: &classify::HeadClass,
    body: Incoming,
    limit: usize,
    prove_model: bool,
    whole_object: bool,
) -> Result<Classified, ProxyError> {
    let mut model = head.model.clone();
    // Known up front only for the KServe streaming method; OpenAI says so in the body.
    let mut stream = head
        .grpc
        .as_ref()
        .is_some_and(|g| g.method == "ModelStreamInfer");
    let mut max_tokens = None;
    let mut check = None;
    let body = match head.body {
        BodyScan::None => BodyState::Streaming(body),
        BodyScan::OpenAiJson => {
            let mut scanner = JsonScanner::new(limit);
            if whole_object {
                scanner = scanner.whole_object();
            }
            let prefix = read_prefix(body, |chunk| scanner.feed(chunk)).await?;
            let fields = scanner.fields();
            if prove_model {
                if let Some(why) = fields.ambiguity() {
                    return Err(ProxyError::BadRequest(why));
                }
                if fields.truncated || prefix.rest.is_some() {
                    return Err(ProxyError::Forbidden(format!(
                        "the model of a JSON body longer than classify.maxBodyPrefix ({limit} bytes) cannot be verified for authorization; raise maxBodyPrefix in the MeshConfig"
                    )));
                }
                if fields.object_end.is_none() {
                    return Err(ProxyError::BadRequest(
                        "the JSON body ends before its top-level object does".into(),
                    ));
                }
            } else if fields.model.is_some() {
                if let Some(why) = fields.ambiguity() {
                    return Err(ProxyError::BadRequest(why));
                }
                // Routed by this model: nothing further on may name another.
                let consumed = scanner.consumed();
                let mut verifier = scanner.into_verifier();
                for chunk in unscanned(&prefix.chunks, consumed) {
                    verifier.feed(chunk);
                }
                if let Some(why) = verifier.ambiguity() {
                    return Err(ProxyError::BadRequest(why));
                }
                if prefix.rest.is_some() {
                    check = Some(BodyCheck::Json(Box::new(verifier)));
                }
            }
            model = fields.model.clone();
            stream = fields.stream;
            max_tokens = fields.max_tokens;
            BodyState::Scanned(prefix, Scanned::Json(fields))
        }
        BodyScan::GrpcModelName => {
            let mut scanner = GrpcModelScanner::new(limit);
            let prefix = read_prefix(body, |chunk| scanner.feed(chunk)).await?;
            let fields = scanner.fields();
            let consumed = scanner.consumed();
            // Every later message, and a repeated field 1 in the first, must
            // name the same model.
            if let Some(mut verifier) = scanner.into_verifier() {
                for chunk in unscanned(&prefix.chunks, consumed) {
                    verifier.feed(chunk).map_err(ProxyError::BadRequest)?;
                }
                if prefix.rest.is_some() {
                    check = Some(BodyCheck::Grpc(Box::new(verifier)));
                }
            }
            model = fields.model.clone();
            BodyState::Scanned(prefix, Scanned::Grpc(fields))
        }
    };
    Ok(Classified {
        body,
        model,
        stream,
        max_tokens,
        check,
    })
}

/// The parts of `chunks` from body offset `from` on.
fn unscanned(chunks: &VecDeque<Bytes>, from: usize) -> impl Iterator<Item = &[u8]> {
    let mut start = 0usize;
    chunks.iter().filter_map(move |chunk| {
        let begin = start;
        start += chunk.len();
        (start > from).then(|| &chunk[from.saturating_sub(begin)..])
    })
}

/// The request's way to a response: the route's chosen target, then its
/// fallback chain.
struct Chain<'a> {
    inputs: &'a Inputs,
    route: &'a crate::snapshot::Route,
    target: &'a RouteTarget,
    /// The request again for the fallback chain, when it has one and the
    /// body was held whole.
    replay: Option<&'a Replay>,
    asked: &'a Asked<'a>,
    /// Which target answered: 0 for `target`, `n` for fallback link `n - 1`.
    served: &'a AtomicUsize,
}

impl Chain<'_> {
    /// Sends `request` to the target and, while no response could start,
    /// down the fallback chain.
    async fn dispatch(&self, request: Request<ProxyBody>) -> Result<Response<BoxBody>, ProxyError> {
        let (inputs, route, what) = (self.inputs, self.route, self.asked);
        let mut result = send(inputs, route, self.target, request, what).await;
        let Some(replay) = self.replay else {
            return result;
        };
        for (index, link) in route.fallback().iter().enumerate() {
            if !cannot_start(&result) {
                break;
            }
            // A local embedding model cannot answer a chat completion: the
            // client is better told why the remote backend failed.
            if !link.target.serves(what.api, what.grpc_method) {
                continue;
            }
            link.taken.inc();
            tracing::debug!(
                route = route.name().as_str(),
                backend = link.target.name.as_str(),
                "falling back"
            );
            let request = replay.request(&link.target, what.model);
            result = send(inputs, route, &link.target, request, what).await;
            self.served.store(index + 1, Ordering::Relaxed);
        }
        result
    }
}

/// The model tokens a request is expected to use, for token rate limits:
/// its body bytes / 4 (roughly a token each for English text and JSON) plus
/// the output it allows (`max_completion_tokens` or `max_tokens`).
fn token_estimate(headers: &HeaderMap, body: &BodyState, max_tokens: Option<u64>) -> u64 {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let read = match body {
        BodyState::Scanned(prefix, _) => prefix.chunks.iter().map(|c| c.len() as u64).sum(),
        BodyState::Streaming(_) => 0,
    };
    declared.unwrap_or(read).max(read) / 4 + max_tokens.unwrap_or(0)
}

/// What the client asked for, as classification found it.
struct Asked<'a> {
    api: ApiKind,
    grpc_method: Option<&'a str>,
    /// The client's model name, before any alias.
    model: Option<&'a str>,
    /// The route selected the request by that name.
    claimed: bool,
}

/// Sends `request` to `target`: a backend through the route's stack, or a
/// local model.
async fn send(
    inputs: &Inputs,
    route: &crate::snapshot::Route,
    target: &RouteTarget,
    mut request: Request<ProxyBody>,
    asked: &Asked<'_>,
) -> Result<Response<BoxBody>, ProxyError> {
    let sent = Instant::now();
    let result = match &target.destination {
        Destination::Remote(backend) => {
            request.extensions_mut().insert(Upstream(backend.clone()));
            route.stack().clone().oneshot(request).await
        }
        Destination::Local(model) => {
            let result = answer_locally(model, route, request, asked).await;
            let outcome = match &result {
                Ok(response) if response.status().is_success() && !grpc_failed(response) => {
                    "served"
                }
                Ok(_) | Err(ProxyError::TooLarge(_) | ProxyError::BadRequest(_)) => "invalid",
                Err(_) => "unavailable",
            };
            inputs
                .metrics
                .local_requests
                .get_or_create(&LocalRequestLabels {
                    route: route.name().clone(),
                    model: model.name().clone(),
                    outcome,
                })
                .inc();
            result
        }
    };
    if result.is_ok() {
        target.first_byte.observe(sent.elapsed().as_secs_f64());
    }
    result
}

/// Reads the whole request body (the engine needs all of it) and has the
/// local model answer, within the route's time limit.
async fn answer_locally(
    model: &local::LocalModel,
    route: &crate::snapshot::Route,
    request: Request<ProxyBody>,
    asked: &Asked<'_>,
) -> Result<Response<BoxBody>, ProxyError> {
    let (parts, body) = request.into_parts();
    // Started before the timer below, so the engine gives up no later.
    let time_limit = route.local_limit().map(local::TimeLimit::starting_now);
    let answer = async {
        let body = read_whole(body, local::MAX_BODY_BYTES).await?;
        let request = LocalRequest {
            api: asked.api,
            method: &parts.method,
            path: parts.uri.path(),
            grpc_method: asked.grpc_method,
            model: asked.model,
            claimed: asked.claimed,
            time_limit,
        };
        local::serve(model, request, body).await
    };
    match route.local_limit() {
        Some(limit) => tokio::time::timeout(limit, answer)
            .await
            .unwrap_or(Err(ProxyError::FirstByteTimeout(limit))),
        None => answer.await,
    }
}

/// Whether a gRPC response carries a failure status in its headers.
fn grpc_failed(response: &Response<BoxBody>) -> bool {
    response
        .headers()
        .get("grpc-status")
        .is_some_and(|status| status != "0")
}

/// The whole of `body`, or 413 past `limit` bytes.
async fn read_whole(mut body: ProxyBody, limit: usize) -> Result<Bytes, ProxyError> {
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut read = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| {
            ProxyError::BadRequest(format!("reading the request body failed: {error}"))
        })?;
        if let Ok(data) = frame.into_data() {
            read += data.len();
            if read > limit {
                return Err(ProxyError::TooLarge(format!(
                    "a local model reads at most {limit} bytes of request body"
                )));
            }
            chunks.push(data);
        }
    }
    Ok(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => Bytes::from(chunks.concat()),
    })
}

/// Whether an outcome means the backend could not start a response, so the
/// next link of the fallback chain is tried: no endpoint (every endpoint
/// ejected included), no connection, a failure before the response headers,
/// the backend's own limits reached, or a 503 (what an overloaded server,
/// and the last of exhausted retries, answer). A timeout is not: the
/// client's time is spent.
fn cannot_start(result: &Result<Response<BoxBody>, ProxyError>) -> bool {
    match result {
        Ok(response) => response.status() == http::StatusCode::SERVICE_UNAVAILABLE,
        Err(error) => matches!(
            error,
            ProxyError::NoEndpoint(_)
                | ProxyError::Connect { .. }
                | ProxyError::Upstream { .. }
                | ProxyError::LocalUnavailable { .. }
                | ProxyError::Overloaded { .. }
        ),
    }
}

/// What it takes to send a request again down the fallback chain: its head
/// and its whole body as the client sent it.
struct Replay {
    parts: http::request::Parts,
    chunks: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    scanned: Option<Scanned>,
}

impl Replay {
    /// The request for `target`, with the model renamed to its alias.
    fn request(&self, target: &RouteTarget, model: Option<&str>) -> Request<ProxyBody> {
        let mut parts = self.parts.clone();
        let mut prefix = Prefix {
            chunks: self.chunks.clone(),
            trailers: self.trailers.clone(),
            rest: None,
        };
        if let (Some(alias), Some(scanned)) = (target.model.as_deref(), &self.scanned) {
            if model != Some(alias) {
                rewrite_model(&mut prefix, scanned, alias, &mut parts.headers);
            }
        }
        Request::from_parts(
            parts,
            ProxyBody::replay(prefix.chunks, prefix.trailers, None),
        )
    }
}

/// A short description of an unroutable request for its error message.
fn describe(parts: &http::request::Parts, model: Option<&str>) -> String {
    let host = route::request_host(&parts.uri, &parts.headers);
    let mut text = format!("{} {}", parts.method, parts.uri.path());
    if let Some(host) = host {
        text.push_str(&format!(" (host {host})"));
    }
    if let Some(model) = model {
        text.push_str(&format!(" for model {model:?}"));
    }
    text
}

// Lives on the stack of one request's classification; boxing the larger
// variant would cost an allocation per request for nothing.
#[allow(clippy::large_enum_variant)]
enum BodyState {
    Streaming(Incoming),
    Scanned(Prefix, Scanned),
}

#[derive(Clone)]
enum Scanned {
    Json(classify::JsonFields),
    Grpc(classify::GrpcFields),
    /// Read whole for a fallback chain; the model is in the path (KServe
    /// REST), so nothing in the body is renamed.
    Path,
}

/// The part of a body read before routing.
struct Prefix {
    chunks: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    /// The rest of the body, `None` when it ended within the prefix.
    rest: Option<Incoming>,
}

/// Reads body frames into a prefix until `feed` says it has seen enough or
/// the body ends.
async fn read_prefix(
    mut body: Incoming,
    mut feed: impl FnMut(&[u8]) -> Scan,
) -> Result<Prefix, ProxyError> {
    let mut chunks = VecDeque::new();
    if body.is_end_stream() {
        return Ok(Prefix {
            chunks,
            trailers: None,
            rest: None,
        });
    }
    loop {
        match body.frame().await {
            None => {
                return Ok(Prefix {
                    chunks,
                    trailers: None,
                    rest: None,
                })
            }
            Some(Err(error)) => {
                return Err(ProxyError::BadRequest(format!(
                    "reading the request body failed: {error}"
                )))
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let scan = feed(&data);
                    if !data.is_empty() {
                        chunks.push_back(data);
                    }
                    if matches!(scan, Scan::Done) {
                        let rest = (!body.is_end_stream()).then_some(body);
                        return Ok(Prefix {
                            chunks,
                            trailers: None,
                            rest,
                        });
                    }
                }
                Err(frame) => {
                    return Ok(Prefix {
                        chunks,
                        trailers: frame.into_trailers().ok(),
                        rest: None,
                    })
                }
            },
        }
    }
}

/// Reads the rest of a body into `prefix` while the whole stays within
/// `limit` bytes; a longer body keeps its rest to stream.
async fn complete_prefix(prefix: &mut Prefix, limit: usize) -> Result<(), ProxyError> {
    let mut read: usize = prefix.chunks.iter().map(Bytes::len).sum();
    while let Some(rest) = prefix.rest.as_mut() {
        if rest.is_end_stream() {
            prefix.rest = None;
            break;
        }
        if read >= limit {
            break;
        }
        match rest.frame().await {
            None => prefix.rest = None,
            Some(Err(error)) => {
                return Err(ProxyError::BadRequest(format!(
                    "reading the request body failed: {error}"
                )))
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    read += data.len();
                    if !data.is_empty() {
                        prefix.chunks.push_back(data);
                    }
                }
                Err(frame) => {
                    prefix.trailers = frame.into_trailers().ok();
                    prefix.rest = None;
                }
            },
        }
    }
    Ok(())
}

/// Replaces the model name in the prefix with `alias`, fixing the length.
fn rewrite_model(prefix: &mut Prefix, scanned: &Scanned, alias: &str, headers: &mut HeaderMap) {
    let joined: Bytes = if prefix.chunks.len() == 1 {
        prefix.chunks[0].clone()
    } else {
        let mut all = Vec::with_capacity(prefix.chunks.iter().map(Bytes::len).sum());
        for chunk in &prefix.chunks {
            all.extend_from_slice(chunk);
        }
        Bytes::from(all)
    };
    let rewritten = match scanned {
        Scanned::Json(fields) => fields
            .model_span
            .clone()
            .filter(|span| span.end <= joined.len())
            .map(|span| classify::rewrite_json_model(&joined, span, alias)),
        Scanned::Grpc(fields) => classify::rewrite_grpc_model(&joined, fields, alias),
        Scanned::Path => None,
    };
    let Some(rewritten) = rewritten else {
        return;
    };
    let delta = rewritten.len() as i64 - joined.len() as i64;
    if let Some(length) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok())
    {
        headers.insert(
            header::CONTENT_LENGTH,
            HeaderValue::from((length + delta).max(0) as u64),
        );
    }
    prefix.chunks.clear();
    prefix.chunks.push_back(rewritten);
}

/// Counts a request in the in-flight gauge until dropped.
struct InFlightGauge(Gauge);

impl InFlightGauge {
    fn enter(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for InFlightGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

struct Finish {
    started: Instant,
    duration: Option<Histogram>,
    /// Held for its `Drop`: leaves the gauge when the response ends.
    _in_flight: InFlightGauge,
    access: Option<AccessLog>,
    /// A gRPC request still to be counted, once its status is known.
    pending: Option<PendingCount>,
}

/// A gRPC request whose `requests_total` waits for the response's trailers.
struct PendingCount {
    requests: prometheus_client::metrics::family::Family<RequestLabels, Counter>,
    labels: RequestLabels,
    /// From the trailers, once they passed.
    grpc_status: Option<&'static str>,
    /// The response body ended (rather than being dropped by a client
    /// that went away).
    ended: bool,
}

impl PendingCount {
    /// The status the client saw: the trailers', else `UNKNOWN` for a
    /// response that ended without them, `CANCELLED` for a client that left.
    fn status(&self) -> &'static str {
        match (self.grpc_status, self.ended) {
            (Some(status), _) => status,
            (None, true) => grpc_status_label(2),
            (None, false) => grpc_status_label(1),
        }
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        if let Some(duration) = &self.duration {
            duration.observe(elapsed.as_secs_f64());
        }
        if let Some(pending) = &self.pending {
            let grpc_status = pending.status();
            if let Some(access) = self.access.as_mut() {
                access.grpc_status = grpc_status;
            }
            pending
                .requests
                .get_or_create(&RequestLabels {
                    grpc_status,
                    ..pending.labels.clone()
                })
                .inc();
        }
        if let Some(access) = &self.access {
            access.emit(elapsed);
        }
    }
}

/// One access-log line per request, written when its response ends. Off
/// unless the `infermesh::access` log target is enabled
/// (`INFERMESH_LOG=info,infermesh::access=info`), so the request path pays
/// nothing for it by default.
struct AccessLog {
    listener: &'static str,
    method: http::Method,
    path: String,
    api: &'static str,
    model: Option<String>,
    stream: bool,
    route: Name,
    backend: Name,
    status: u16,
    /// The gRPC status, for gRPC requests.
    grpc_status: &'static str,
    /// The caller's mesh identity (inbound, over mutual TLS).
    caller: Option<Arc<SpiffeId>>,
}

impl AccessLog {
    fn new(listener: &'static str, request: &Request<Incoming>) -> Self {
        Self {
            listener,
            method: request.method().clone(),
            path: request.uri().path().to_string(),
            api: "http",
            model: None,
            stream: false,
            route: Name::default(),
            backend: Name::default(),
            status: 0,
            grpc_status: "",
            caller: None,
        }
    }

    fn emit(&self, elapsed: std::time::Duration) {
        tracing::info!(
            target: "infermesh::access",
            listener = self.listener,
            method = %self.method,
            path = %self.path,
            api = self.api,
            model = self.model.as_deref().unwrap_or(""),
            stream = self.stream,
            route = self.route.as_str(),
            backend = self.backend.as_str(),
            status = self.status,
            grpc_status = self.grpc_status,
            caller = self.caller.as_deref().map(ToString::to_string).unwrap_or_default(),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
        );
    }
}

pin_project! {
    /// A response body that records the request's duration and leaves the
    /// in-flight gauge when it ends or the client goes away.
    struct Accounted<B> {
        #[pin]
        inner: B,
        finish: Option<Finish>,
    }
}

impl<B> Body for Accounted<B>
where
    B: Body<Data = Bytes, Error = BoxError>,
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
            Some(Ok(frame)) => {
                if let (Some(trailers), Some(pending)) = (
                    frame.trailers_ref(),
                    this.finish.as_mut().and_then(|f| f.pending.as_mut()),
                ) {
                    pending.grpc_status = trailers.get("grpc-status").map(grpc_status_of);
                }
            }
            None => {
                if let Some(pending) = this.finish.as_mut().and_then(|f| f.pending.as_mut()) {
                    pending.ended = true;
                }
                this.finish.take();
            }
            Some(Err(_)) => {
                this.finish.take();
            }
        }
        Poll::Ready(frame)
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

    fn parts(version: http::Version, uri: &str, hosts: &[&str]) -> http::request::Parts {
        let mut builder = Request::builder().version(version).uri(uri);
        for host in hosts {
            builder = builder.header(header::HOST, *host);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn normalized(version: http::Version, uri: &str, hosts: &[&str]) -> Result<String, String> {
        let mut parts = parts(version, uri, hosts);
        normalize_authority(&mut parts).map_err(|e| e.to_string())?;
        let host = route::request_host(&parts.uri, &parts.headers).map(|h| h.into_owned());
        let header = parts.headers.get(header::HOST).map(|h| h.to_str().unwrap());
        Ok(format!("{host:?} {header:?}"))
    }

    #[test]
    fn routing_and_forwarding_see_one_authority() {
        use http::Version;
        // Origin form: the Host header.
        assert_eq!(
            normalized(Version::HTTP_11, "/v1/x", &["a.example"]).unwrap(),
            r#"Some("a.example") Some("a.example")"#
        );
        // Absolute form: the target wins and replaces Host.
        assert_eq!(
            normalized(Version::HTTP_11, "http://a.example/x", &["b.example"]).unwrap(),
            r#"Some("a.example") Some("a.example")"#
        );
        assert_eq!(
            normalized(Version::HTTP_11, "http://a.example:8080/x", &[]).unwrap(),
            r#"Some("a.example") None"#
        );
        // HTTP/2: :authority and an equal host are fine.
        assert_eq!(
            normalized(Version::HTTP_2, "http://a.example/x", &["a.example"]).unwrap(),
            r#"Some("a.example") Some("a.example")"#
        );
        assert_eq!(
            normalized(Version::HTTP_2, "/x", &["a.example"]).unwrap(),
            r#"Some("a.example") Some("a.example")"#
        );
        // HTTP/1.0 may leave Host out.
        assert!(normalized(Version::HTTP_10, "/x", &[]).is_ok());
    }

    #[test]
    fn ambiguous_authorities_are_refused() {
        use http::Version;
        let refused = |version, uri, hosts: &[&str]| normalized(version, uri, hosts).unwrap_err();
        assert!(refused(Version::HTTP_11, "/x", &["a", "b"]).contains("more than one Host"));
        assert!(refused(Version::HTTP_11, "/x", &["a", "a"]).contains("more than one Host"));
        assert!(refused(Version::HTTP_11, "/x", &[]).contains("needs a Host"));
        assert!(refused(Version::HTTP_11, "/x", &["a b"]).contains("is not a host"));
        assert!(refused(Version::HTTP_2, "http://a/x", &["b"]).contains("differs from :authority"));
    }

    #[test]
    fn unscanned_parts_start_at_the_offset() {
        let chunks = VecDeque::from([
            Bytes::from_static(b"abc"),
            Bytes::from_static(b"de"),
            Bytes::from_static(b"fgh"),
        ]);
        let rest = |from| {
            unscanned(&chunks, from)
                .map(<[u8]>::to_vec)
                .collect::<Vec<_>>()
        };
        assert_eq!(rest(0), [b"abc".to_vec(), b"de".to_vec(), b"fgh".to_vec()]);
        assert_eq!(rest(2), [b"c".to_vec(), b"de".to_vec(), b"fgh".to_vec()]);
        assert_eq!(rest(3), [b"de".to_vec(), b"fgh".to_vec()]);
        assert_eq!(rest(7), [b"h".to_vec()]);
        assert!(rest(8).is_empty());
    }
}
