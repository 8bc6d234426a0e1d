//! Upstream connection pools: one hyper client per backend, HTTP/1.1 with
//! keep-alive or HTTP/2 multiplexed over cleartext.

use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use infermesh_proto::policy::UpstreamProtocol;

use crate::body::ProxyBody;

/// A pooled upstream client.
pub type UpstreamClient = Client<HttpConnector, ProxyBody>;

/// How long an unused upstream connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// A client speaking `protocol`, failing connection attempts after
/// `connect_timeout`.
pub fn client(protocol: UpstreamProtocol, connect_timeout: Duration) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    // Model responses stream token by token: never let Nagle hold a chunk back.
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_keepalive(Some(Duration::from_secs(60)));
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(IDLE_TIMEOUT);
    if protocol == UpstreamProtocol::Http2 {
        builder
            .http2_only(true)
            // Large windows keep big tensors and long streams flowing without
            // waiting on WINDOW_UPDATE round trips.
            .http2_initial_stream_window_size(4 * 1024 * 1024)
            .http2_initial_connection_window_size(8 * 1024 * 1024)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_while_idle(true);
    }
    builder.build(connector)
}
