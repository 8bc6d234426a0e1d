//! The fallback chain: a request goes to its route's chosen target and, while
//! no response could start, to each link of the route's fallback chain in
//! turn; a `local:` target is answered by the proxy's own engine.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use futures_util::future::Either;
use futures_util::FutureExt;
use http::header::HeaderMap;
use http::{Request, Response};
use http_body_util::BodyExt;
use infermesh_filters::{BoxBody, ProxyError};
use tower::ServiceExt;

use crate::body::ProxyBody;
use crate::classify::ApiKind;
use crate::inputs::Inputs;
use crate::local::{self, LocalRequest};
use crate::metrics::LocalRequestLabels;
use crate::prefix::{rewrite_model, Prefix, Scanned};
use crate::snapshot::{Destination, Route, RouteTarget};

/// The request's way to a response: the route's chosen target, then its
/// fallback chain.
pub(crate) struct Chain<'a> {
    pub(crate) inputs: &'a Inputs,
    pub(crate) route: &'a Route,
    pub(crate) target: &'a RouteTarget,
    /// The request again for the fallback chain, when it has one and the
    /// body was held whole.
    pub(crate) replay: Option<&'a Replay>,
    pub(crate) asked: &'a Asked<'a>,
    /// Which target answered: 0 for `target`, `n` for fallback link `n - 1`.
    pub(crate) served: &'a AtomicUsize,
}

impl Chain<'_> {
    /// Sends `request` to the target and, while no response could start,
    /// down the fallback chain.
    ///
    /// The future holds the first attempt's future and little else: the
    /// chain's further links are boxed, as every request's future (boxed
    /// and moved per request) would otherwise carry room for them.
    pub(crate) fn dispatch(
        &self,
        request: Request<ProxyBody>,
    ) -> impl Future<Output = Result<Response<BoxBody>, ProxyError>> + '_ {
        // Combinators, not `async` blocks: a block would keep the first
        // attempt's future twice (as captured and as awaited).
        send(self.inputs, self.route, self.target, request, self.asked).then(move |result| {
            match self.replay {
                Some(replay) if cannot_start(&result) => {
                    Either::Left(Box::pin(self.fall_back(replay, result)))
                }
                _ => Either::Right(std::future::ready(result)),
            }
        })
    }

    /// Down the fallback chain, from the target's `result`, while no
    /// response could start.
    async fn fall_back(
        &self,
        replay: &Replay,
        mut result: Result<Response<BoxBody>, ProxyError>,
    ) -> Result<Response<BoxBody>, ProxyError> {
        let (inputs, route, what) = (self.inputs, self.route, self.asked);
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
            let mut request = replay.request(&link.target, what.model);
            request.extensions_mut().insert(crate::traces::FallbackLink);
            result = send(inputs, route, &link.target, request, what).await;
            self.served.store(index + 1, Ordering::Relaxed);
        }
        result
    }
}

/// What the client asked for, as classification found it.
pub(crate) struct Asked<'a> {
    pub(crate) api: ApiKind,
    pub(crate) grpc_method: Option<&'a str>,
    /// The client's model name, before any alias.
    pub(crate) model: Option<&'a str>,
    /// The route selected the request by that name.
    pub(crate) claimed: bool,
}

/// Sends `request` to `target`: a backend through the route's stack, or a
/// local model.
pub(crate) fn send<'a>(
    inputs: &'a Inputs,
    route: &'a Route,
    target: &'a RouteTarget,
    request: Request<ProxyBody>,
    asked: &'a Asked<'_>,
) -> impl Future<Output = Result<Response<BoxBody>, ProxyError>> + use<'a> {
    let sent = Instant::now();
    // The remote stack's future is made here, holding the request: the
    // future returned keeps no second copy of it.
    let result = match &target.destination {
        Destination::Remote(remote) => Either::Left(remote.stack.clone().oneshot(request)),
        // Boxed: the engine's future is several KB, and every remote
        // request's future (boxed and moved per request) would carry room
        // for it.
        Destination::Local(model) => Either::Right(Box::pin(answer_counted(
            inputs, model, route, request, asked,
        ))),
    };
    result.map(move |result| {
        if result.is_ok() {
            target.first_byte.observe(sent.elapsed().as_secs_f64());
        }
        result
    })
}

/// Answers from the local engine, counting the outcome per model.
async fn answer_counted(
    inputs: &Inputs,
    model: &local::LocalModel,
    route: &Route,
    request: Request<ProxyBody>,
    asked: &Asked<'_>,
) -> Result<Response<BoxBody>, ProxyError> {
    let result = answer_locally(model, route, request, asked).await;
    let outcome = match &result {
        Ok(response) if response.status().is_success() && !grpc_failed(response) => "served",
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

pub(crate) async fn answer_locally(
    model: &local::LocalModel,
    route: &Route,
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
pub(crate) fn grpc_failed(response: &Response<BoxBody>) -> bool {
    response
        .headers()
        .get(infermesh_filters::grpc::GRPC_STATUS)
        .is_some_and(|status| status != "0")
}

/// The whole of `body`, or 413 past `limit` bytes.
pub(crate) async fn read_whole(mut body: ProxyBody, limit: usize) -> Result<Bytes, ProxyError> {
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
pub(crate) fn cannot_start(result: &Result<Response<BoxBody>, ProxyError>) -> bool {
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
pub(crate) struct Replay {
    pub(crate) parts: http::request::Parts,
    pub(crate) chunks: VecDeque<Bytes>,
    pub(crate) trailers: Option<HeaderMap>,
    pub(crate) scanned: Option<Scanned>,
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
