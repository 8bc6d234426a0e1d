//! Upstream connection pools: one hyper client per backend, HTTP/1.1 with
//! keep-alive or HTTP/2 multiplexed, over cleartext or, to meshed
//! endpoints, mutual TLS 1.3 with ALPN.

use std::sync::Arc;
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use infermesh_proto::policy::UpstreamProtocol;
use rustls::ClientConfig;

use crate::body::ProxyBody;

/// The connector of every pool: plain TCP for `http://` URIs, TLS for
/// `https://` ones (meshed endpoints).
pub type UpstreamConnector = HttpsConnector<HttpConnector>;

/// A pooled upstream client.
pub type UpstreamClient = Client<UpstreamConnector, ProxyBody>;

/// How long an unused upstream connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// A client speaking `protocol`, failing connection attempts after
/// `connect_timeout`; with `tls`, connections are TLS (the request URIs
/// must then be `https://`).
pub fn client(
    protocol: UpstreamProtocol,
    connect_timeout: Duration,
    tls: Option<Arc<ClientConfig>>,
) -> UpstreamClient {
    let mut http = HttpConnector::new();
    // Model responses stream token by token: never let Nagle hold a chunk back.
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    // The TLS layer decides by scheme; the TCP layer must accept both.
    http.enforce_http(false);
    let connector = match tls {
        Some(config) => {
            let builder = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config((*config).clone())
                .https_only();
            match protocol {
                UpstreamProtocol::Http1 => builder.enable_http1().wrap_connector(http),
                UpstreamProtocol::Http2 => builder.enable_http2().wrap_connector(http),
            }
        }
        None => HttpsConnector::from((http, plaintext_only())),
    };
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

/// The TLS half of a plaintext pool's connector. Its URIs are always
/// `http://`, so it is never used; it trusts nothing, so that a mistake
/// could not turn into an unverified connection.
fn plaintext_only() -> Arc<ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("TLS 1.3 is supported by the ring provider")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}
