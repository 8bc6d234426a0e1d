//! Access logs: a JSON line per request on the proxy's standard output,
//! for the routes that keep one (`ModelRoute.spec.accessLog`, else the
//! mesh's `MeshConfig.spec.accessLog.requests`, or every route with the
//! proxy's `--access-log` flag), and a line per refusal, at most
//! `refusalsPerSecond` for each reason.
//!
//! Lines are written by a thread of their own from a bounded queue: the
//! request path formats its line and hands it over, never waiting on the
//! pipe. A full queue (a reader that stopped reading) drops lines and
//! counts them in `infermesh_access_log_lines_dropped_total`.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use infermesh_proto::policy::AccessLogSettings;
use infermesh_proto::spiffe::SpiffeId;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use crate::genai::Measured;
use crate::metrics::Name;

/// Lines waiting for the writer thread.
const QUEUE: usize = 8192;

static FORCED: AtomicBool = AtomicBool::new(false);

/// Every request gets a line, whatever the policy says (the proxy's
/// `--access-log` flag).
pub fn force() {
    FORCED.store(true, Ordering::Relaxed);
}

/// Whether `--access-log` is on.
pub fn forced() -> bool {
    FORCED.load(Ordering::Relaxed)
}

/// Lines dropped because the queue was full.
pub fn dropped() -> &'static Counter {
    static DROPPED: OnceLock<Counter> = OnceLock::new();
    DROPPED.get_or_init(Counter::default)
}

fn queue() -> &'static SyncSender<String> {
    static QUEUE_TX: OnceLock<SyncSender<String>> = OnceLock::new();
    QUEUE_TX.get_or_init(|| {
        let (tx, rx) = mpsc::sync_channel::<String>(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("infermesh-access-log".into())
            .spawn(move || {
                let stdout = std::io::stdout();
                let mut out = std::io::BufWriter::new(stdout.lock());
                while let Ok(line) = rx.recv() {
                    let _ = out.write_all(line.as_bytes());
                    // Whatever else is queued goes out in the same write.
                    while let Ok(line) = rx.try_recv() {
                        let _ = out.write_all(line.as_bytes());
                    }
                    let _ = out.flush();
                }
            });
        if let Err(error) = spawned {
            tracing::error!(%error, "cannot start the access-log writer: access lines are dropped");
        }
        tx
    })
}

fn write(line: &impl Serialize) {
    let Ok(mut text) = serde_json::to_string(line) else {
        return;
    };
    text.push('\n');
    match queue().try_send(text) {
        Ok(()) => {}
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
            dropped().inc();
        }
    }
}

/// Refusal lines per second and reason, with the count of those left out.
#[derive(Debug, Default)]
struct Windows {
    by_reason: HashMap<&'static str, Window>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    second: u64,
    lines: u32,
    suppressed: u64,
}

/// Whether a refusal line for `reason` may be written now, and how many
/// were left out before it; `None` when it is left out.
fn admit_refusal(reason: &'static str, per_second: u32) -> Option<u64> {
    static LIMITER: OnceLock<(Mutex<Windows>, Instant)> = OnceLock::new();
    if per_second == 0 {
        return None;
    }
    let (windows, start) = LIMITER.get_or_init(|| (Mutex::default(), Instant::now()));
    let second = start.elapsed().as_secs();
    let mut windows = windows.lock();
    let window = windows.by_reason.entry(reason).or_insert(Window {
        second,
        lines: 0,
        suppressed: 0,
    });
    if window.second != second {
        window.second = second;
        window.lines = 0;
    }
    if window.lines >= per_second {
        window.suppressed += 1;
        return None;
    }
    window.lines += 1;
    Some(std::mem::take(&mut window.suppressed))
}

fn timestamp() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

/// One request's line, filled in as the request goes.
#[derive(Debug)]
pub struct AccessLog {
    pub listener: &'static str,
    pub method: http::Method,
    pub path: String,
    pub api: &'static str,
    pub model: Option<String>,
    pub stream: bool,
    pub route: Name,
    pub backend: Name,
    pub status: u16,
    /// The gRPC status, for gRPC requests.
    pub grpc_status: &'static str,
    /// The caller's mesh identity (inbound, over mutual TLS).
    pub caller: Option<Arc<SpiffeId>>,
    /// The request's trace: its server span's, else the one it arrived with.
    pub trace_id: Option<opentelemetry::trace::TraceId>,
    /// The route keeps a line per request.
    pub route_logged: bool,
    /// Why the proxy refused or failed the request: its error type and
    /// message.
    pub error: Option<(&'static str, String)>,
    /// The request was refused by the proxy (a client error): its line is
    /// rate-limited.
    pub refused: bool,
    /// Upstream attempts and the last endpoint tried.
    pub attempts: Arc<Attempts>,
}

/// Upstream attempts of a request, counted as they are sent (mirror
/// copies excluded); carried in the request's extensions.
#[derive(Debug, Default)]
pub struct Attempts {
    inner: Mutex<(u32, Option<SocketAddr>)>,
}

impl Attempts {
    /// Counts an attempt to `endpoint`.
    pub fn attempted(&self, endpoint: SocketAddr) {
        let mut inner = self.inner.lock();
        inner.0 += 1;
        inner.1 = Some(endpoint);
    }

    fn get(&self) -> (u32, Option<SocketAddr>) {
        *self.inner.lock()
    }
}

#[derive(Serialize)]
struct RequestLine<'a> {
    timestamp: String,
    #[serde(rename = "type")]
    kind: &'static str,
    trace_id: String,
    listener: &'static str,
    method: &'a str,
    path: &'a str,
    api: &'static str,
    model: &'a str,
    stream: bool,
    caller: String,
    route: &'a str,
    backend: &'a str,
    endpoint: String,
    attempts: u32,
    status: u16,
    grpc_status: &'static str,
    ttft_ms: Option<f64>,
    duration_ms: f64,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    error: Option<&'static str>,
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    suppressed: Option<u64>,
}

impl AccessLog {
    /// A line for a request just received.
    pub fn new<B>(listener: &'static str, request: &http::Request<B>) -> Self {
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
            trace_id: None,
            route_logged: forced(),
            error: None,
            refused: false,
            attempts: Arc::default(),
        }
    }

    /// Writes the line, if the route keeps one or the request was refused
    /// (within the mesh's refusal rate).
    pub fn emit(&self, settings: Option<&AccessLogSettings>, elapsed: Duration, m: &Measured) {
        let suppressed = if self.refused {
            let per_second = match (settings, forced()) {
                (Some(settings), _) => settings.refusals_per_second,
                (None, true) => AccessLogSettings::default().refusals_per_second,
                (None, false) => 0,
            };
            match admit_refusal(self.error.as_ref().map_or("refused", |e| e.0), per_second) {
                Some(suppressed) => Some(suppressed),
                None => return,
            }
        } else if self.route_logged {
            None
        } else {
            return;
        };
        let (attempts, endpoint) = self.attempts.get();
        write(&RequestLine {
            timestamp: timestamp(),
            kind: "request",
            trace_id: self.trace_id.map(|id| id.to_string()).unwrap_or_default(),
            listener: self.listener,
            method: self.method.as_str(),
            path: &self.path,
            api: self.api,
            model: self.model.as_deref().unwrap_or(""),
            stream: self.stream,
            caller: self
                .caller
                .as_deref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            route: self.route.as_str(),
            backend: self.backend.as_str(),
            endpoint: endpoint.map(|e| e.to_string()).unwrap_or_default(),
            attempts,
            status: self.status,
            grpc_status: self.grpc_status,
            ttft_ms: m.time_to_first_token.map(|t| t.as_secs_f64() * 1000.0),
            duration_ms: elapsed.as_secs_f64() * 1000.0,
            input_tokens: m.input_tokens,
            output_tokens: m.output_tokens,
            error: self.error.as_ref().map(|e| e.0),
            reason: self.error.as_ref().map(|e| e.1.as_str()),
            suppressed,
        });
    }
}

#[derive(Serialize)]
struct RefusalLine<'a> {
    timestamp: String,
    #[serde(rename = "type")]
    kind: &'static str,
    listener: &'static str,
    peer: String,
    error: &'static str,
    reason: &'a str,
    suppressed: u64,
}

/// A connection refused before any request (malformed HTTP, a failed mTLS
/// handshake, …): a line when the mesh keeps access logs, within its
/// refusal rate.
pub fn refusal(
    settings: Option<&AccessLogSettings>,
    listener: &'static str,
    error: &'static str,
    peer: SocketAddr,
    detail: &dyn std::fmt::Display,
) {
    let per_second = match (settings, forced()) {
        (Some(settings), _) => settings.refusals_per_second,
        (None, true) => AccessLogSettings::default().refusals_per_second,
        (None, false) => return,
    };
    let Some(suppressed) = admit_refusal(error, per_second) else {
        return;
    };
    write(&RefusalLine {
        timestamp: timestamp(),
        kind: "refusal",
        listener,
        peer: peer.to_string(),
        error,
        reason: &detail.to_string(),
        suppressed,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_lines_are_limited_per_reason_and_second_with_the_rest_counted() {
        let admitted = (0..25)
            .filter(|_| admit_refusal("test_flood", 10).is_some())
            .count();
        // Two windows at most can be crossed in this loop.
        assert!((10..=20).contains(&admitted), "{admitted}");
        assert!(
            admit_refusal("test_other", 10).is_some(),
            "reasons are apart"
        );
        assert_eq!(admit_refusal("test_off", 0), None);
        std::thread::sleep(Duration::from_millis(1100));
        let suppressed = admit_refusal("test_flood", 10).expect("a new second");
        assert!(suppressed >= 5, "{suppressed}");
    }
}
