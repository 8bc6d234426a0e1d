//! The request path of both listeners, in named phases: [`classify_body`]
//! (the model, from the head or a bounded body prefix, `prefix.rs`),
//! [`route_request`] (route and authorize), [`prepare`] (hold the body for
//! a replay, give the filters their keys, guard the rest of the body), then
//! the route's front filters and the fallback chain (`chain.rs`), and the
//! accounting of the response as it streams back.
//!
//! ```text
//! accept -> detect -> [classify -> route + authorize -> prepare -> rate limits
//!                      -> faults -> mirror -> timeouts -> retries/hedges
//!                      -> balance -> send] -> stream back
//!                         (fallback chain: the stack again, per link)
//!                              `local:` target -> read the body -> local engine -> answer
//! ```

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use crate::authz::{Authorizer, AuthzRequest};
use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use infermesh_filters::body::{Ended, Watch, Watched};
use infermesh_filters::error::ErrorShape;
use infermesh_filters::grpc::is_grpc;
use infermesh_filters::mirror::BodyCopy;
use infermesh_filters::rate_limit::{CallerKey, TokenEstimate};
use infermesh_filters::{BoxBody, ProxyError};
use infermesh_proto::policy::{AccessLogSettings, ListenerKind};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tower::ServiceExt;

use crate::access::{self, AccessLog};
use crate::balance::Hint;
use crate::body::{BodyFault, ClientBody, ProxyBody};
use crate::chain::{Asked, Chain, Replay};
use crate::classify::{self, ApiKind, HeadClass};
use crate::genai::{GenAiLabels, Meter};
use crate::identity::InboundConn;
use crate::inputs::Inputs;
use crate::local;
use crate::metrics::{
    grpc_status_label, grpc_status_of, listener_label, Name, RequestLabels, RouteLabels,
};
use crate::prefix::{
    complete_prefix, read_classified, rewrite_model, BodyState, Classified, Prefix, Scanned,
};
use crate::redirect::Redirected;
use crate::route::{self, RouteInput};
use crate::snapshot::{Route, RouteTarget, Snapshot};
use crate::summary;
use crate::traces::{self, ServerSpan};

/// Serves one request received on `listener`. Never fails: every error
/// becomes the response the client is owed.
pub async fn handle(
    inputs: Arc<Inputs>,
    listener: ListenerKind,
    mut request: Request<Incoming>,
) -> Result<Response<BoxBody>, std::convert::Infallible> {
    let started = Instant::now();
    let listener_name = listener_label(listener);
    // A guard, so that a client leaving before the response (the future is
    // dropped) still leaves the gauge.
    let in_flight = InFlightGauge::enter(inputs.metrics.in_flight_of(listener));
    // Each API's clients parse errors in their own shape.
    let shape = ErrorShape::of(request.uri().path(), request.headers());
    let version = request.version();
    let lists_models = local::lists_models(request.method(), request.uri().path());
    let snapshot = inputs.snapshot.load();
    let access_settings = snapshot.access_log().cloned();
    let mut access =
        (access_settings.is_some() || snapshot.routes_access_logged() || access::forced())
            .then(|| Box::new(AccessLog::new(listener_name, &request)));
    drop(snapshot);
    // Boxed, as is the access log: the response body's accounting then
    // stays small enough for the allocator's fast path when both are off.
    let mut span = traces::traces()
        .and_then(|traces| {
            let parent = traces::incoming(request.headers());
            traces.server_span(
                parent.as_ref(),
                listener_name,
                request.method(),
                request.uri().path(),
            )
        })
        .map(Box::new);
    if let Some(access) = access.as_mut() {
        access.trace_id = match &span {
            Some(span) => Some(span.trace_id()),
            None => traces::incoming(request.headers()).map(|parent| parent.trace_id()),
        };
    }
    if let Some(span) = &span {
        request.extensions_mut().insert(span.trace().clone());
    }
    if let Some(access) = &access {
        request.extensions_mut().insert(access.attempts.clone());
    }
    let mut seen = Seen::default();
    let outcome = route_and_send(
        &inputs,
        listener,
        request,
        access.as_deref_mut(),
        span.as_deref_mut(),
        &mut seen,
    )
    .await;
    let mut error_type = Name::default();
    let (response, route, backend, duration, ok, grpc_ok) = match outcome {
        Ok(Routed {
            response,
            route,
            backend,
            duration,
            ok,
            grpc_ok,
        }) => (response, route, backend, Some(duration), Some(ok), grpc_ok),
        // No route takes OpenAI's model list: the proxy answers it.
        Err(Failed {
            error: ProxyError::NoRoute(_),
            route,
            backend,
        }) if lists_models => {
            let snapshot = inputs.snapshot.load();
            let list = local::model_list(snapshot.policy(), listener);
            (list, route, backend, None, None, None)
        }
        Err(Failed {
            error,
            route,
            backend,
        }) => {
            // A drill's abort is no news: it is counted by the fault metric.
            let refused = error.fault() == infermesh_filters::Fault::Client;
            let level_is_warn = !refused && !matches!(error, ProxyError::FaultInjected { .. });
            error_type = Name(Arc::from(error.kind()));
            if let Some(access) = access.as_mut() {
                access.error = Some((error.kind(), error.to_string()));
                access.refused = refused;
            }
            if level_is_warn {
                tracing::warn!(listener = listener_name, route = route.as_str(), backend = backend.as_str(), %error, "request failed");
            } else {
                tracing::debug!(listener = listener_name, %error, "request refused");
            }
            let mut response = error.to_response(shape);
            // After a request the proxy found malformed, nothing more on an
            // HTTP/1.1 connection is trusted: hyper closes it once this
            // answer is written (HTTP/2 refuses the one stream).
            if matches!(error, ProxyError::BadRequest(_)) && version < http::Version::HTTP_2 {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
            }
            // A failed request takes its time too (a timeout, a refused
            // connection): it is in the duration histogram of its route.
            let duration = (!route.as_str().is_empty()).then(|| {
                inputs
                    .metrics
                    .duration
                    .get_or_create(&RouteLabels {
                        route: route.clone(),
                        backend: backend.clone(),
                    })
                    .clone()
            });
            (response, route, backend, duration, None, None)
        }
    };
    let status = response.status().as_u16();
    // The dashboard's failures, as a mesh's success rate counts them: a 5xx
    // or a failed gRPC status, not a request the proxy refused (4xx).
    let mut failed = status >= 500;
    let mut meter = Meter::new(started);
    meter.responded(response.headers());
    if status >= 500 && error_type.as_str().is_empty() {
        error_type = Name(Arc::from(status.to_string()));
    }
    let genai = seen.operation.map(|operation| GenAiLabels {
        gen_ai_operation_name: operation,
        gen_ai_request_model: seen.model_label.clone(),
        route: route.clone(),
        backend: backend.clone(),
        caller: seen.caller.clone(),
    });
    if let Some(span) = span.as_mut() {
        span.responded(status, response.headers(), route.as_str(), backend.as_str());
    }
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
    // Only a gRPC response's headers are looked at.
    let head_status = grpc
        .then(|| response.headers().get(infermesh_filters::grpc::GRPC_STATUS))
        .flatten();
    match (grpc, head_status, ok) {
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
            if let Some(span) = span.as_mut() {
                span.grpc_status(grpc_status);
            }
            failed |= grpc_status != "0";
            if grpc_status != "0" && error_type.as_str().is_empty() {
                error_type = grpc_error_type(grpc_status);
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
                ok: grpc_ok.filter(|_| status == 200),
                labels,
                grpc_status: None,
                ended: false,
            })
        }
    }
    let (parts, body) = response.into_parts();
    let body = Watched::new(
        body,
        Finish {
            started,
            duration,
            _in_flight: in_flight,
            access,
            access_settings,
            pending,
            span,
            meter,
            model: seen.model,
            genai,
            error_type,
            failed,
            metrics: inputs.metrics.clone(),
        },
    );
    Ok(Response::from_parts(parts, body.boxed_unsync()))
}

struct Routed {
    response: Response<BoxBody>,
    route: Name,
    backend: Name,
    duration: Histogram,
    ok: Counter,
    /// For a gRPC call, the counter of its success.
    grpc_ok: Option<Counter>,
}

struct Failed {
    error: ProxyError,
    route: Name,
    backend: Name,
}

impl Failed {
    /// `error`, met on `route` on the way to `backend`.
    fn at(route: &Route, backend: &Name, error: ProxyError) -> Self {
        Self {
            error,
            route: route.name().clone(),
            backend: backend.clone(),
        }
    }
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
    mut access: Option<&mut AccessLog>,
    span: Option<&mut ServerSpan>,
    seen: &mut Seen,
) -> Result<Routed, Failed> {
    let snapshot = inputs.snapshot.load_full();
    // Phases 1 to 3 in a block of their own: the request's parts and what
    // classification read move on into the prepared request, and the future
    // keeps no room for them while the request is sent.
    let (head, route, target, claimed, model, request, replay) = {
        let (mut parts, body) = request.into_parts();
        let body = ClientBody::new(body);
        route::normalize_authority(&mut parts)?;
        let head = classify::classify_head(
            &parts.method,
            parts.uri.path(),
            parts.headers.get(header::CONTENT_TYPE),
        );
        let authorizer = (listener == ListenerKind::Inbound)
            .then(|| snapshot.authorizer())
            .filter(|a| a.enforced());
        let mut classified = classify_body(&snapshot, &head, body, authorizer).await?;
        let caller = parts
            .extensions
            .get::<InboundConn>()
            .and_then(|c| c.caller.as_deref());
        seen.model.clone_from(&classified.model);
        seen.operation = crate::traces::operation_name(head.api);
        if seen.operation.is_some() {
            seen.model_label = classified
                .model
                .as_deref()
                .map_or_else(Name::default, |m| snapshot.model_label(m));
            seen.caller = crate::genai::caller_label(caller);
        }
        if let Some(access) = access.as_deref_mut() {
            access.api = head.api.as_str();
            access.model = classified.model.as_deref().map(str::to_owned);
            access.stream = classified.stream;
            access.caller = parts
                .extensions
                .get::<InboundConn>()
                .and_then(|c| c.caller.clone());
        }
        if let Some(span) = span {
            span.classified(
                head.api,
                classified.model.as_deref(),
                classified.stream,
                caller,
            );
        }
        let redirected = parts.extensions.get::<Redirected>().copied();
        let routed = route_request(&snapshot, listener, authorizer, &head, &parts, &classified);
        let (route, target, claimed) = match (routed, redirected) {
            (Ok(routed), _) => {
                if let Some(access) = access {
                    access.route_logged |= routed.0.access_logged();
                }
                routed
            }
            // Intercepted traffic that no route claims is not the mesh's: it
            // goes where the application sent it. Boxed, as are the other
            // rare steps: every request's future would carry room for them.
            (
                Err(Failed {
                    error: ProxyError::NoRoute(_),
                    ..
                }),
                Some(redirected),
            ) => {
                let passed = pass_through(inputs, listener, redirected, parts, classified);
                return Ok(Box::pin(passed).await?);
            }
            (Err(failed), _) => return Err(failed),
        };
        if !route.fallback().is_empty() || route.mirrored() {
            let limit = snapshot.classify_limit();
            classified.body = Box::pin(hold_body(limit, &head, classified.body))
                .await
                .map_err(|error| Failed::at(route, &target.name, error))?;
        }
        let model = classified.model.clone();
        let (request, replay) = prepare(&snapshot, route, target, parts, classified);
        (head, route, target, claimed, model, request, replay)
    };
    let asked = Asked {
        api: head.api,
        grpc_method: head.grpc.as_ref().map(|g| g.method.as_str()),
        model: model.as_deref(),
        claimed,
    };
    let served = AtomicUsize::new(0);
    let chain = Chain {
        inputs,
        route,
        target,
        replay: replay.as_deref(),
        asked: &asked,
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
            grpc_ok: head
                .grpc
                .is_some()
                .then(|| served_by.grpc_ok.counter().clone()),
        }),
        Err(error) => Err(Failed::at(route, &served_by.name, error)),
    }
}

/// Phase 1, classify: reads as much of the body as finding its model needs,
/// within `classify.readTimeout`. The body is replayed upstream unchanged
/// (unless a model alias renames the model).
async fn classify_body(
    snapshot: &Snapshot,
    head: &HeadClass,
    body: ClientBody,
    authorizer: Option<&Authorizer>,
) -> Result<Classified, ProxyError> {
    let limit = snapshot.classify_limit();
    // Authorization by model needs the model for certain: the whole
    // top-level object is scanned, to see a repeated `model`.
    let prove_model = authorizer.is_some_and(|a| a.needs_model());
    // A token limit estimates a request's cost from its `max_tokens`,
    // wherever it is in the object.
    let whole_object = prove_model || snapshot.token_limits();
    let read = read_classified(
        head,
        body,
        limit,
        prove_model,
        whole_object,
        snapshot.prompt_hashing(),
    );
    let Some(wait) = snapshot.classify_read_limit() else {
        return read.await;
    };
    // The timer is set only once the body keeps the read waiting: most
    // model requests arrive whole with their head, and a timer set and
    // dropped for each of them cost about 300 instructions. The limit then
    // counts from the first wait, a few microseconds after the head.
    let mut read = std::pin::pin!(read);
    let mut timer = std::pin::pin!(None::<tokio::time::Sleep>);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(result) = read.as_mut().poll(cx) {
            return Poll::Ready(result);
        }
        if timer.is_none() {
            timer.set(Some(tokio::time::sleep(wait)));
        }
        match timer.as_mut().as_pin_mut().map(|timer| timer.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(ProxyError::RequestTimeout(format!(
                "the request body did not arrive within {} (classify.readTimeout; the proxy reads up to {limit} bytes of it to find the model)",
                humantime::format_duration(wait)
            )))),
            _ => Poll::Pending,
        }
    })
    .await
}

/// Phase 2, route and authorize: the route the request matches, its chosen
/// target, and whether the route chose it by its model name. Authorization
/// runs before a missing route is reported, so that unroutable requests are
/// refused like any other.
fn route_request<'s>(
    snapshot: &'s Snapshot,
    listener: ListenerKind,
    authorizer: Option<&Authorizer>,
    head: &HeadClass,
    parts: &http::request::Parts,
    classified: &Classified,
) -> Result<(&'s Route, &'s RouteTarget, bool), Failed> {
    // The host is found only for a policy that routes by it.
    let host = snapshot
        .matches_hosts()
        .then(|| route::request_host(&parts.uri, &parts.headers))
        .flatten();
    let input = RouteInput {
        host: host.as_deref(),
        path: parts.uri.path(),
        grpc: head
            .grpc
            .as_ref()
            .map(|g| (g.service.as_str(), g.method.as_str())),
        headers: &parts.headers,
        model: classified.model.as_deref(),
        destination: parts
            .extensions
            .get::<Redirected>()
            .map(|redirected| redirected.original),
    };
    let route = snapshot.route(listener, &input);
    let claimed = route.is_some_and(|r| r.selects_model(&input));
    if let Some(authorizer) = authorizer {
        let conn = parts.extensions.get::<InboundConn>();
        authorizer.check(&AuthzRequest {
            caller: conn.and_then(|c| c.caller.as_deref()),
            model: classified.model.as_deref(),
            route: route.map(|r| r.name().as_str()),
            grpc_method: head.grpc.as_ref().map(|_| parts.uri.path()),
            port: conn.map_or(0, |c| c.port),
        })?;
    }
    let Some(route) = route else {
        // Still waiting for the control plane: "no route" would be a lie.
        if snapshot.source() == crate::snapshot::Source::Pending {
            return Err(ProxyError::NoPolicyYet.into());
        }
        return Err(ProxyError::NoRoute(describe(parts, classified.model.as_deref())).into());
    };
    let Some(target) = route.pick_target() else {
        let error =
            ProxyError::NoEndpoint(format!("(route {} has no backend)", route.name().as_str()));
        return Err(Failed::at(route, &Name::default(), error));
    };
    Ok((route, target, claimed))
}

/// Phase 3a, hold: a fallback chain and a mirror need the whole body to
/// send it again: reads the rest of a body that fits in the classification
/// limit. KServe REST names the model in the path, so its body was not
/// scanned: read now.
async fn hold_body(
    limit: usize,
    head: &HeadClass,
    body: BodyState,
) -> Result<BodyState, ProxyError> {
    let mut body = match body {
        BodyState::Streaming(incoming) if head.api == ApiKind::KServeRest => {
            let prefix = Prefix {
                chunks: VecDeque::new(),
                trailers: None,
                rest: Some(incoming),
            };
            BodyState::Scanned(prefix, Scanned::Path)
        }
        body => body,
    };
    if let BodyState::Scanned(prefix, _) = &mut body {
        complete_prefix(prefix, limit).await?;
    }
    Ok(body)
}

/// Phase 3b, prepare: keeps what a fallback chain or a mirror sends again,
/// gives the filters what they key on (token estimate, caller, the mirror's
/// copy), guards the rest of the body (verifier, idle limit, client-side
/// faults) and renames the model for an alias.
fn prepare(
    snapshot: &Snapshot,
    route: &Route,
    target: &RouteTarget,
    mut parts: http::request::Parts,
    classified: Classified,
) -> (Request<ProxyBody>, Option<Box<Replay>>) {
    let Classified {
        body,
        model,
        max_tokens,
        prompt,
        check,
        ..
    } = classified;
    // The model-aware balancer places the request by these.
    if route.hinted() && (prompt.is_some() || model.is_some()) {
        parts.extensions.insert(Hint {
            prompt: prompt.map(Arc::new),
            model: target.model.clone().or_else(|| model.clone()),
        });
    }
    let limit = snapshot.classify_limit();
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

    // Only a body still arriving can fail on the client's side or stall:
    // one read whole (most model requests) needs no guard and no extension.
    let arriving = match &body {
        BodyState::Streaming(body) => !body.is_end_stream(),
        BodyState::Scanned(prefix, _) => prefix.rest.is_some(),
    };
    let guard = arriving.then(|| {
        let fault = BodyFault::default();
        parts.extensions.insert(fault.clone());
        // A stalled upload is cut; a gRPC stream may be quiet for long, and
        // its limits are the route's.
        let idle = snapshot
            .body_idle_limit()
            .filter(|_| !is_grpc(&parts.headers));
        (idle, fault)
    });
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
    };
    let body = match guard {
        Some((idle, fault)) => body.guarded(check, idle, fault),
        None => body,
    };
    (Request::from_parts(parts, body), replay.map(Box::new))
}

/// Sends an intercepted request that no route claims to its passthrough
/// address (the original destination, or the local application) as it is:
/// its body replayed from what classification read, nothing held, no
/// filters, counted under the route `passthrough`.
async fn pass_through(
    inputs: &Inputs,
    listener: ListenerKind,
    redirected: Redirected,
    parts: http::request::Parts,
    classified: Classified,
) -> Result<Routed, ProxyError> {
    let listener_name = listener_label(listener);
    tracing::debug!(
        listener = listener_name,
        original = %redirected.original,
        to = %redirected.passthrough,
        method = %parts.method,
        path = parts.uri.path(),
        "no route claims the intercepted request: passing it through"
    );
    let body = match classified.body {
        BodyState::Streaming(body) => ProxyBody::streaming(body),
        BodyState::Scanned(prefix, _) => {
            ProxyBody::replay(prefix.chunks, prefix.trailers, prefix.rest)
        }
    };
    let sent = inputs
        .passthrough
        .send(redirected.passthrough, Request::from_parts(parts, body))
        .await;
    let counted = inputs.passthrough.counted(listener);
    match &sent {
        Ok(_) => counted.forwarded.inc(),
        Err(_) => counted.failed.inc(),
    };
    Ok(Routed {
        response: sent?,
        route: counted.route.clone(),
        backend: Name::default(),
        duration: counted.duration.clone(),
        ok: counted.ok.clone(),
        grpc_ok: None,
    })
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
    access: Option<Box<AccessLog>>,
    /// The mesh's access-log settings when the request arrived.
    access_settings: Option<AccessLogSettings>,
    /// A gRPC request still to be counted, once its status is known.
    pending: Option<PendingCount>,
    /// The request's server span, ended with the response.
    span: Option<Box<ServerSpan>>,
    /// Reads the response as it passes: first token, usage.
    meter: Meter,
    /// The model the client asked for, for the control plane's summary.
    model: Option<Arc<str>>,
    /// The GenAI metrics' labels of a model request; `None` for others.
    genai: Option<GenAiLabels>,
    /// Empty for a success; else the GenAI metrics' `error_type`.
    error_type: Name,
    /// A failure for the dashboard: a 5xx or a failed gRPC status.
    failed: bool,
    metrics: Arc<crate::metrics::Metrics>,
}

/// What routing learned of a request, for the accounting of its response.
#[derive(Default)]
struct Seen {
    /// The model the client asked for.
    model: Option<Arc<str>>,
    /// Its GenAI operation, for a model API.
    operation: Option<&'static str>,
    /// The model's metric label, bounded by the policy.
    model_label: Name,
    /// The caller's metric label.
    caller: Name,
}

/// The `error_type` of a failed gRPC status.
fn grpc_error_type(status: &'static str) -> Name {
    static TYPES: std::sync::OnceLock<Vec<Name>> = std::sync::OnceLock::new();
    let types = TYPES.get_or_init(|| (0..=16).map(|c| Name::new(&format!("grpc_{c}"))).collect());
    status
        .parse::<usize>()
        .ok()
        .and_then(|code| types.get(code).cloned())
        .unwrap_or_else(|| Name::new("grpc_unknown"))
}

/// A gRPC request whose `requests_total` waits for the response's trailers.
struct PendingCount {
    requests: prometheus_client::metrics::family::Family<RequestLabels, Counter>,
    /// The series of these labels with `grpc_status` 0, found already.
    ok: Option<Counter>,
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
            if let Some(span) = self.span.as_mut() {
                span.grpc_status(grpc_status);
            }
            self.failed |= grpc_status != "0";
            if grpc_status != "0" && self.error_type.as_str().is_empty() {
                self.error_type = grpc_error_type(grpc_status);
            }
            match &pending.ok {
                Some(ok) if grpc_status == "0" => ok.inc(),
                _ => pending
                    .requests
                    .get_or_create(&RequestLabels {
                        grpc_status,
                        ..pending.labels.clone()
                    })
                    .inc(),
            };
        }
        let measured = self.meter.measured();
        summary::summaries().record(self.model.as_deref(), self.failed, &measured);
        if let Some(labels) = self.genai.take() {
            let error_type = std::mem::take(&mut self.error_type);
            crate::otlp_metrics::record(&labels, &error_type, elapsed, &measured);
            self.metrics
                .genai
                .record(labels, error_type, elapsed, &measured);
        }
        if let Some(span) = self.span.as_mut() {
            span.measured(&measured);
        }
        if let Some(access) = &self.access {
            access.emit(self.access_settings.as_ref(), elapsed, &measured);
        }
    }
}

/// The response's accounting, done when its body ends or the client goes
/// away (the body is dropped): the duration, the in-flight gauge, a gRPC
/// request's count with the status from its trailers, the access log.
impl Watch for Finish {
    fn frame(&mut self, frame: &Frame<Bytes>) {
        if let (Some(trailers), Some(pending)) = (frame.trailers_ref(), self.pending.as_mut()) {
            pending.grpc_status = trailers
                .get(infermesh_filters::grpc::GRPC_STATUS)
                .map(grpc_status_of);
        }
        if let Some(data) = frame.data_ref() {
            self.meter.body(data);
            if let Some(span) = self.span.as_mut() {
                span.body(data);
            }
        }
    }

    fn end(mut self, ended: Ended) {
        if let (Ended::Complete, Some(span)) = (ended, self.span.as_mut()) {
            span.body_ended();
        }
        if let Some(pending) = self.pending.as_mut() {
            pending.ended = ended == Ended::Complete;
        }
    }
}
