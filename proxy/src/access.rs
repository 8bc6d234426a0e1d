//! Access logs: a JSON line per request on the proxy's standard output,
//! for the routes that keep one (`ModelRoute.spec.accessLog`, else the
//! mesh's `MeshConfig.spec.accessLog.requests`, or every route with the
//! proxy's `--access-log` flag), and a line per refusal, at most
//! `refusalsPerSecond` for each reason.
//!
//! Lines are written by a thread of their own: the request path formats
//! its line and appends it to a bounded buffer, never waiting on the pipe
//! and never waking the writer for one line; the writer writes the buffer
//! every 50 ms (sooner when 256 KiB wait). A full buffer (4 MiB: a reader
//! that stopped reading) drops lines and counts them in
//! `infermesh_access_log_lines_dropped_total`.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use infermesh_proto::policy::AccessLogSettings;
use infermesh_proto::spiffe::SpiffeId;
use parking_lot::{Condvar, Mutex};
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use crate::genai::Measured;
use crate::name::Name;

/// Most bytes of lines waiting for the writer; past it lines are dropped.
const MAX_PENDING: usize = 4 << 20;
/// Bytes waiting that wake the writer before its next round.
const WAKE_AT: usize = 256 << 10;
/// How often the writer writes what waits.
const FLUSH_EVERY: Duration = Duration::from_millis(50);

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

/// Lines waiting for the writer thread, and its wake-up call.
struct Pending {
    lines: Mutex<Vec<u8>>,
    full: Condvar,
}

fn pending() -> &'static Pending {
    static PENDING: OnceLock<Pending> = OnceLock::new();
    PENDING.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("infermesh-access-log".into())
            .spawn(writer);
        if let Err(error) = spawned {
            tracing::error!(%error, "cannot start the access-log writer: access lines are dropped");
        }
        Pending {
            lines: Mutex::new(Vec::with_capacity(WAKE_AT)),
            full: Condvar::new(),
        }
    })
}

/// Writes what the request path queued, every [`FLUSH_EVERY`] or as soon
/// as [`WAKE_AT`] bytes wait: one `write` for many lines, and no wake-up
/// per request.
fn writer() {
    let pending = pending();
    let stdout = std::io::stdout();
    let mut spare = Vec::with_capacity(WAKE_AT);
    loop {
        {
            let mut lines = pending.lines.lock();
            if lines.len() < WAKE_AT {
                pending.full.wait_for(&mut lines, FLUSH_EVERY);
            }
            std::mem::swap(&mut *lines, &mut spare);
        }
        if !spare.is_empty() {
            let mut out = stdout.lock();
            let _ = out.write_all(&spare);
            let _ = out.flush();
            spare.clear();
            spare.shrink_to(MAX_PENDING / 4);
        }
    }
}

fn write(line: &impl Serialize) {
    thread_local! {
        static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    LINE.with_borrow_mut(|text| {
        text.clear();
        if serde_json::to_writer(&mut *text, line).is_err() {
            return;
        }
        text.push(b'\n');
        let pending = pending();
        let mut lines = pending.lines.lock();
        if lines.len() + text.len() > MAX_PENDING {
            drop(lines);
            dropped().inc();
            return;
        }
        lines.extend_from_slice(text);
        if lines.len() >= WAKE_AT {
            pending.full.notify_one();
        }
    });
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
