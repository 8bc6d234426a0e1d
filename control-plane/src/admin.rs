//! The admin server: liveness, readiness, metrics, connected proxies and
//! the state of the policy files.
//!
//! It runs on its own thread with its own single-threaded runtime, so that
//! a slow scraper or a large `/proxies` never delays the policy streams.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use infermesh_admin::{json, text, Respond};
use serde::Serialize;

use crate::dashboard::View;
use crate::metrics::Metrics;
use crate::policies::Publisher;
use crate::proxies::{ProxyState, Registry};

/// What the admin endpoints read.
#[derive(Debug, Clone)]
pub struct Admin {
    /// The policy files and the snapshot in force.
    pub publisher: Arc<Publisher>,
    /// Connected proxies.
    pub registry: Arc<Registry>,
    /// Every metric.
    pub metrics: Arc<Metrics>,
}

/// One row of `/proxies`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ProxyRow {
    #[serde(flatten)]
    state: ProxyState,
    /// The proxy ACKed the latest snapshot sent to it, and no version
    /// published since changes what it receives.
    up_to_date: bool,
}

/// What `/dashboard.json` serves.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DashboardData {
    /// The policy version published.
    version: Option<u64>,
    /// The proxies with an open policy stream, as `/proxies` lists them.
    connected: Vec<ProxyRow>,
    /// Traffic per model, for the mesh and per proxy.
    figures: View,
}

impl Admin {
    fn proxy_rows(&self) -> Vec<ProxyRow> {
        let current = self.publisher.status().version.unwrap_or(0);
        self.registry
            .list()
            .into_iter()
            .map(|state| ProxyRow {
                up_to_date: state.checked_version == current
                    && state.last_sent.as_ref().map(|s| s.version) == state.acked_version,
                state,
            })
            .collect()
    }
}

impl Respond for Admin {
    fn respond(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported\n");
        }
        match request.uri().path() {
            "/live" => text(StatusCode::OK, "live\n"),
            "/ready" => {
                let status = self.publisher.status();
                // Why the files on disk are not what is published, if they are not.
                let refusal = match (status.state, &status.last_refusal) {
                    ("serving", _) | (_, None) => String::new(),
                    (_, Some(refused)) => {
                        let first = refused.errors.first().map_or("", |e| e.message.as_str());
                        let more = match refused.errors.len() {
                            0 | 1 => String::new(),
                            n => format!(" (and {} more)", n - 1),
                        };
                        format!(
                            "; the policy files are refused ({}): {first}{more}",
                            refused.reason
                        )
                    }
                };
                match status.version {
                    Some(version) if self.publisher.ready() => text(
                        StatusCode::OK,
                        &format!("ready: serving version {version}{refusal}\n"),
                    ),
                    _ => text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!(
                            "not ready: no valid policy published yet{refusal} (see /policy)\n"
                        ),
                    ),
                }
            }
            "/metrics" => {
                let mut response = Response::new(Full::new(Bytes::from(self.metrics.render())));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            "/proxies" => json(&self.proxy_rows()),
            "/dashboard" => {
                let mut response = Response::new(Full::new(Bytes::from_static(
                    crate::dashboard::PAGE.as_bytes(),
                )));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/html; charset=utf-8"),
                );
                response
            }
            "/dashboard.json" => json(&DashboardData {
                version: self.publisher.status().version,
                connected: self.proxy_rows(),
                figures: self.registry.figures.view(Instant::now()),
            }),
            "/policy" => json(&self.publisher.status()),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /live, /ready, /metrics, /proxies, /policy or /dashboard\n",
            ),
        }
    }
}

/// Binds the admin address now (so a bad one fails start-up) and serves it
/// on a dedicated thread.
pub fn spawn(addr: SocketAddr, admin: Admin) -> std::io::Result<SocketAddr> {
    infermesh_admin::spawn(addr, Arc::new(admin))
}
