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
use infermesh_proto::policy::UpstreamProtocol;

use crate::body::ProxyBody;
use crate::forward::{prepare_upstream_request, strip_hop_by_hop};
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
}

impl Default for Passthrough {
    fn default() -> Self {
        Self::new()
    }
}

impl Passthrough {
    /// Empty pools.
    pub fn new() -> Self {
        Self {
            http1: pool::client(UpstreamProtocol::Http1, CONNECT_TIMEOUT, None),
            http2: pool::client(UpstreamProtocol::Http2, CONNECT_TIMEOUT, None),
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
