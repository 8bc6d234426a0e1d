//! The admin server: liveness, readiness, metrics and the policy in force.
//!
//! It runs on its own thread with its own single-threaded runtime, so that
//! rendering metrics or a slow scraper never takes time from the data plane.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use infermesh_admin::{text, Respond};

use crate::control;
use crate::inputs::Inputs;
use crate::local::State;
use crate::snapshot::{Snapshot, Source};

/// State the admin endpoints report.
#[derive(Debug)]
pub struct Admin {
    inputs: Arc<Inputs>,
    control: Option<Arc<control::Status>>,
    ready: AtomicBool,
}

impl Admin {
    /// Admin state over the proxy's shared inputs and, when it follows one,
    /// its control-plane stream; not ready until told.
    pub fn new(inputs: Arc<Inputs>, control: Option<Arc<control::Status>>) -> Arc<Self> {
        Arc::new(Self {
            inputs,
            control,
            ready: AtomicBool::new(false),
        })
    }

    /// Marks the proxy ready (listeners bound) or not (draining). A proxy
    /// that follows a control plane is ready only once it also has a
    /// snapshot, from the control plane or its cache.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Why the proxy is not ready, or `None` when it is.
    fn not_ready_reason(&self) -> Option<String> {
        if !self.ready.load(Ordering::Acquire) {
            return Some("starting or draining".into());
        }
        if let Some(identity) = self.inputs.identity.as_ref() {
            if !identity.certified() {
                let mut reason = format!("no mesh certificate yet for {}", identity.id());
                if let Some(error) = identity.status().last_error {
                    reason.push_str(&format!(" (last attempt: {error})"));
                }
                return Some(reason);
            }
        }
        if self.inputs.snapshot.load().source() == Source::Pending {
            return Some("no policy snapshot yet".into());
        }
        None
    }

    /// The policy in force as JSON: its documents (`backends`, `routes`,
    /// `mesh`), `version` and `source`, and the control-plane stream's state.
    fn config(&self) -> Result<Vec<u8>, serde_json::Error> {
        let snapshot = self.inputs.snapshot.load();
        let mut value = serde_json::to_value(snapshot.policy())?;
        if let serde_json::Value::Object(map) = &mut value {
            map.insert("version".into(), snapshot.version().into());
            let mut local = serde_json::Map::new();
            for model in sorted_local_models(&snapshot) {
                let (state, detail) = describe(&model.state());
                local.insert(
                    model.name().as_str().to_owned(),
                    serde_json::json!({"state": state, "detail": detail}),
                );
            }
            if !local.is_empty() {
                map.insert("localModelStatus".into(), local.into());
            }
            map.insert("source".into(), snapshot.source().as_str().into());
            if let Some(control) = &self.control {
                let rejected = control
                    .last_rejected()
                    .map(|r| serde_json::json!({ "version": r.version, "error": r.error }));
                map.insert(
                    "controlPlane".into(),
                    serde_json::json!({
                        "url": control.url(),
                        "connected": control.connected(),
                        "lastRejected": rejected,
                    }),
                );
            }
            // Who the proxy is and when its certificate ends; never the
            // certificate, the key or the token.
            if let Some(identity) = self.inputs.identity.as_ref() {
                let status = identity.status();
                let not_after = status.not_after.and_then(|t| {
                    t.duration_since(std::time::UNIX_EPOCH)
                        .ok()
                        .map(|d| d.as_secs())
                });
                map.insert(
                    "identity".into(),
                    serde_json::json!({
                        "spiffeId": identity.id().to_string(),
                        "certified": identity.certified(),
                        "notAfter": not_after,
                        "certificatesObtained": status.renewals,
                        "lastError": status.last_error,
                        "inboundMtls": snapshot.mtls_mode(),
                    }),
                );
            }
        }
        serde_json::to_vec_pretty(&value)
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
                let local = local_model_lines(&self.inputs.snapshot.load());
                match self.not_ready_reason() {
                    None => text(StatusCode::OK, &format!("ready\n{local}")),
                    Some(reason) => text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!("not ready: {reason}\n{local}"),
                    ),
                }
            }
            "/metrics" => {
                let mut response =
                    Response::new(Full::new(Bytes::from(self.inputs.metrics.render())));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            "/config" => match self.config() {
                Ok(json) => {
                    let mut response = Response::new(Full::new(Bytes::from(json)));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("application/json"),
                    );
                    response
                }
                Err(error) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{error}\n")),
            },
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /live, /ready, /metrics or /config\n",
            ),
        }
    }
}

/// The local models of `snapshot`, by name.
fn sorted_local_models(snapshot: &Snapshot) -> Vec<&Arc<crate::local::LocalModel>> {
    let mut models: Vec<_> = snapshot.local_models().collect();
    models.sort_by(|a, b| a.name().as_str().cmp(b.name().as_str()));
    models
}

/// A state's name and what to say about it.
fn describe(state: &State) -> (&'static str, String) {
    match state {
        State::Loading => ("loading", String::new()),
        State::Ready(engine) => (
            "ready",
            format!(
                "adapter {}, {} dimensions",
                engine.adapter(),
                engine.dimensions()
            ),
        ),
        State::Unavailable(reason) => ("unavailable", reason.clone()),
    }
}

/// One line per local model for `/ready`: readiness does not depend on
/// them (they are fallbacks, and a pod taken out of service would lose its
/// remote routes too), but whoever reads it learns which cannot serve, and
/// why.
fn local_model_lines(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    for model in sorted_local_models(snapshot) {
        let (state, detail) = describe(&model.state());
        out.push_str(&format!("local model {}: {state}", model.name().as_str()));
        if !detail.is_empty() {
            out.push_str(&format!(" ({detail})"));
        }
        out.push('\n');
    }
    out
}

/// Binds the admin address now (so a bad one fails start-up) and serves it
/// on a dedicated thread.
pub fn spawn(addr: SocketAddr, admin: Arc<Admin>) -> std::io::Result<SocketAddr> {
    infermesh_admin::spawn(addr, admin)
}
