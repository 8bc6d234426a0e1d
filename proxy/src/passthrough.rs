//! HTTP passthrough: an intercepted request that no route claims is sent
//! to its original destination (outbound) or to the local application
//! (inbound) as it is, over a pool per protocol, so that meshing a pod
//! never breaks its traffic to a database's HTTP API, a metrics push or a
//! non-model service.
//!
//! The request keeps its method, path, headers and body; HTTP/1.1 keeps
//! its `Host`. Over HTTP/2 the `:authority` becomes the destination
//! address, as the connection pool keys connections by it.

use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response, Version};
use http_body_util::BodyExt;
use infermesh_filters::{BoxBody, ProxyError};
use infermesh_proto::policy::{ListenerKind, UpstreamProtocol, PASSTHROUGH_ROUTE};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use crate::body::ProxyBody;
use crate::forward::{prepare_upstream_request, strip_hop_by_hop};
use crate::metrics::{
    listener_label, Metrics, Name, PassthroughLabels, RequestLabels, RouteLabels,
};
use crate::pool::{self, UpstreamClient};

/// How long connecting to a passthrough destination may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The connection pools of passed-through requests, one per protocol; both
/// keep idle connections for a while and close them after, so pools to
/// destinations no longer called do not accumulate.
#[derive(Debug)]
pub struct Passthrough {
    http1: UpstreamClient,
    http2: UpstreamClient,
    /// The metric handles of each listener's passed-through requests, by
    /// [`ListenerKind`] (outbound, inbound), resolved once.
    counted: [Counted; 2],
}

/// The metric handles a passed-through request updates.
#[derive(Debug, Clone)]
pub struct Counted {
    /// `passthrough`, the `route` label.
    pub route: Name,
    /// Its duration histogram.
    pub duration: Histogram,
    /// `requests_total` with status 200.
    pub ok: Counter,
    /// `passthrough_total{protocol="http", outcome="forwarded"}`.
    pub forwarded: Counter,
    /// `passthrough_total{protocol="http", outcome="failed"}`.
    pub failed: Counter,
}

impl Counted {
    fn new(metrics: &Metrics, kind: ListenerKind) -> Self {
        let listener = listener_label(kind);
        let route = Name::new(PASSTHROUGH_ROUTE);
        let outcome = |outcome| {
            metrics
                .passthrough
                .get_or_create(&PassthroughLabels {
                    listener,
                    protocol: "http",
                    outcome,
                })
                .clone()
        };
        Self {
            duration: metrics
                .duration
                .get_or_create(&RouteLabels {
                    route: route.clone(),
                    backend: Name::default(),
                })
                .clone(),
            ok: metrics
                .requests
                .get_or_create(&RequestLabels {
                    listener,
                    route: route.clone(),
                    backend: Name::default(),
                    status: 200,
                    grpc_status: "",
                })
                .clone(),
            forwarded: outcome("forwarded"),
            failed: outcome("failed"),
            route,
        }
    }
}

impl Passthrough {
    /// Empty pools, counting into `metrics`.
    pub fn new(metrics: &Metrics) -> Self {
        Self {
            http1: pool::client(UpstreamProtocol::Http1, CONNECT_TIMEOUT, None),
            http2: pool::client(UpstreamProtocol::Http2, CONNECT_TIMEOUT, None),
            counted: [
                Counted::new(metrics, ListenerKind::Outbound),
                Counted::new(metrics, ListenerKind::Inbound),
            ],
        }
    }

    /// The metric handles of requests passed through on `kind`.
    pub fn counted(&self, kind: ListenerKind) -> &Counted {
        match kind {
            ListenerKind::Outbound => &self.counted[0],
            ListenerKind::Inbound => &self.counted[1],
        }
    }

    /// Sends `request` to `target` in the protocol the client spoke and
    /// streams the response back.
    pub async fn send(
        &self,
        target: SocketAddr,
        mut request: Request<ProxyBody>,
    ) -> Result<Response<BoxBody>, ProxyError> {
        let (protocol, client) = if request.version() == Version::HTTP_2 {
            (UpstreamProtocol::Http2, &self.http2)
        } else {
            (UpstreamProtocol::Http1, &self.http1)
        };
        let authority = http::uri::Authority::try_from(target.to_string())
            .map_err(|e| ProxyError::connect(target.to_string(), e))?;
        prepare_upstream_request(&mut request, http::uri::Scheme::HTTP, &authority, protocol);
        match client.request(request).await {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                parts.version = Version::HTTP_11;
                Ok(Response::from_parts(
                    parts,
                    body.map_err(Into::into).boxed_unsync(),
                ))
            }
            Err(error) if error.is_connect() => Err(ProxyError::connect(target.to_string(), error)),
            Err(error) => Err(ProxyError::upstream(target.to_string(), error, false)),
        }
    }
}
