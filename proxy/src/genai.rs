//! What a model response did, measured once as it streams to the client:
//! the time to its first token, the time per output token after it, and
//! the tokens the server reported in its `usage`. [`Meter`] reads each
//! chunk as it passes (never holding one back) and [`Measured`] is handed
//! to every consumer when the response ends: the GenAI metrics
//! (`gen_ai_*`, OpenTelemetry GenAI semantic conventions v1.36.0), the
//! dashboard's summary, the server span and the access log.
//!
//! The first token is the first SSE `data:` event of a stream, the first
//! gRPC message of a gRPC response, or the first byte of a whole JSON
//! answer; never the response headers.

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::HeaderMap;
use infermesh_filters::rate_limit::{UsageKey, UsageScanner};
use infermesh_proto::spiffe::SpiffeId;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::name::Name;

/// The label value of models the policy does not name, and of callers past
/// [`MAX_CALLERS`].
pub const OTHER: &str = "other";

/// Labels of the GenAI histograms: the operation, the model asked for
/// (bounded by the policy), the route and backend, and the caller's mesh
/// identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct GenAiLabels {
    /// `chat`, `text_completion`, `embeddings` or `inference` (KServe).
    pub gen_ai_operation_name: &'static str,
    /// The model the client asked for; `other` for a name no policy names.
    pub gen_ai_request_model: Name,
    /// Route name.
    pub route: Name,
    /// Backend that served (or failed) the request.
    pub backend: Name,
    /// The caller's SPIFFE ID (inbound, over mutual TLS), else empty.
    pub caller: Name,
}

/// Labels of `gen_ai_client_token_usage`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TokenLabels {
    #[prometheus(flatten)]
    pub request: GenAiLabels,
    /// `input` or `output`.
    pub gen_ai_token_type: &'static str,
}

/// Labels of `gen_ai_client_operation_duration_seconds`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DurationLabels {
    #[prometheus(flatten)]
    pub request: GenAiLabels,
    /// Empty for a success; else what went wrong: the proxy's error type
    /// (`timeout`, `upstream_connect_error`, …), the HTTP status of a 5xx,
    /// or `grpc_<code>` for a failed gRPC status.
    pub error_type: Name,
}

/// The GenAI metric families, exposed without the `infermesh_` prefix
/// under the names the OpenTelemetry conventions give them in Prometheus.
#[derive(Debug)]
pub struct GenAiMetrics {
    /// `gen_ai.client.token.usage`, from the `usage` the server reported.
    pub token_usage: Family<TokenLabels, Histogram, fn() -> Histogram>,
    /// `gen_ai.client.operation.duration`, failures included.
    pub duration: Family<DurationLabels, Histogram, fn() -> Histogram>,
    /// `gen_ai.server.time_to_first_token`.
    pub time_to_first_token: Family<GenAiLabels, Histogram, fn() -> Histogram>,
    /// `gen_ai.server.time_per_output_token`.
    pub time_per_output_token: Family<GenAiLabels, Histogram, fn() -> Histogram>,
    /// The histograms a successful request of each label set records,
    /// found in the families once and then kept: a family looks its
    /// series up by SipHash of every label, under a lock, for each of the
    /// up to five histograms a request records.
    series: dashmap::DashMap<GenAiLabels, Arc<Series>, foldhash::fast::RandomState>,
    /// Tells this set of families apart in a thread's [`LAST_SERIES`].
    id: u64,
}

thread_local! {
    /// The series a thread found last, with the families it belongs to
    /// (their `id`) and its labels: a run of requests to one route and
    /// model finds its series by five pointer comparisons instead of
    /// hashing five label values into the map and comparing them (about
    /// 400 instructions a request).
    static LAST_SERIES: RefCell<Option<(u64, GenAiLabels, Arc<Series>)>> =
        const { RefCell::new(None) };
}

impl GenAiLabels {
    /// Whether `other` holds the very same values: the same shared names
    /// (empty ones count as the same, however made). Equal values in
    /// different allocations do not count: the map decides for those.
    fn same_as(&self, other: &GenAiLabels) -> bool {
        fn same(a: &Name, b: &Name) -> bool {
            Arc::ptr_eq(&a.0, &b.0) || (a.0.is_empty() && b.0.is_empty())
        }
        std::ptr::eq(self.gen_ai_operation_name, other.gen_ai_operation_name)
            && same(&self.gen_ai_request_model, &other.gen_ai_request_model)
            && same(&self.route, &other.route)
            && same(&self.backend, &other.backend)
            && same(&self.caller, &other.caller)
    }
}

/// The most label sets whose series are kept at hand; past it a request
/// looks its series up in the families (the label sets are bounded by the
/// policy and [`MAX_CALLERS`], so this is only reached across many policy
/// changes).
const MAX_KEPT_SERIES: usize = 4096;

/// A label set's series, each taken from its family when first recorded,
/// so that a histogram appears in the exposition only once observed.
#[derive(Debug, Default)]
struct Series {
    time_to_first_token: OnceLock<Histogram>,
    time_per_output_token: OnceLock<Histogram>,
    input_tokens: OnceLock<Histogram>,
    output_tokens: OnceLock<Histogram>,
    /// The duration of a success (`error_type` empty).
    duration: OnceLock<Histogram>,
}

// The bucket boundaries the conventions advise for each instrument, for
// Prometheus here and for OTLP (`otlp_metrics.rs`).

/// `gen_ai.client.token.usage`.
pub const TOKEN_BOUNDS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];
/// `gen_ai.client.operation.duration`.
pub const DURATION_BOUNDS: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
/// `gen_ai.server.time_to_first_token`.
pub const FIRST_TOKEN_BOUNDS: [f64; 16] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
/// `gen_ai.server.time_per_output_token`.
pub const PER_TOKEN_BOUNDS: [f64; 13] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
];

fn token_buckets() -> Histogram {
    Histogram::new(TOKEN_BOUNDS)
}

fn duration_buckets() -> Histogram {
    Histogram::new(DURATION_BOUNDS)
}

fn first_token_buckets() -> Histogram {
    Histogram::new(FIRST_TOKEN_BOUNDS)
}

fn per_token_buckets() -> Histogram {
    Histogram::new(PER_TOKEN_BOUNDS)
}

impl GenAiMetrics {
    /// The families, registered in `registry` (one without a prefix).
    pub fn register(registry: &mut Registry) -> Self {
        let token_usage = Family::new_with_constructor(token_buckets as fn() -> Histogram);
        registry.register(
            "gen_ai_client_token_usage",
            "Tokens per request, input and output, as the model server reported them in its usage (gen_ai.client.token.usage)",
            token_usage.clone(),
        );
        let duration = Family::new_with_constructor(duration_buckets as fn() -> Histogram);
        registry.register_with_unit(
            "gen_ai_client_operation_duration",
            "Time from receiving a model request to the end of its response, failed requests included (gen_ai.client.operation.duration)",
            Unit::Seconds,
            duration.clone(),
        );
        let time_to_first_token =
            Family::new_with_constructor(first_token_buckets as fn() -> Histogram);
        registry.register_with_unit(
            "gen_ai_server_time_to_first_token",
            "Time from receiving a model request to its first token passing to the client: the first SSE data event, the first gRPC message, or a whole answer's first byte (gen_ai.server.time_to_first_token)",
            Unit::Seconds,
            time_to_first_token.clone(),
        );
        let time_per_output_token =
            Family::new_with_constructor(per_token_buckets as fn() -> Histogram);
        registry.register_with_unit(
            "gen_ai_server_time_per_output_token",
            "Time per output token after the first of a streamed response: from the first to the last token, over the output tokens less one (gen_ai.server.time_per_output_token)",
            Unit::Seconds,
            time_per_output_token.clone(),
        );
        Self {
            token_usage,
            duration,
            time_to_first_token,
            time_per_output_token,
            series: dashmap::DashMap::with_hasher(foldhash::fast::RandomState::default()),
            id: {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            },
        }
    }

    /// The kept series of `labels`, found or made; `None` past
    /// [`MAX_KEPT_SERIES`].
    fn series(&self, labels: &GenAiLabels) -> Option<Arc<Series>> {
        let last = LAST_SERIES.with_borrow(|last| {
            last.as_ref()
                .filter(|(id, kept, _)| *id == self.id && kept.same_as(labels))
                .map(|(_, _, series)| series.clone())
        });
        if last.is_some() {
            return last;
        }
        let series = match self.series.get(labels) {
            Some(series) => series.clone(),
            None if self.series.len() >= MAX_KEPT_SERIES => return None,
            None => self.series.entry(labels.clone()).or_default().clone(),
        };
        LAST_SERIES.set(Some((self.id, labels.clone(), series.clone())));
        Some(series)
    }

    /// Records one finished request; `error_type` is empty for a success.
    pub fn record(&self, labels: GenAiLabels, error_type: Name, elapsed: Duration, m: &Measured) {
        let success = error_type.as_str().is_empty();
        // A success's histograms are kept; a failure's (and any past the
        // bound) are looked up in their families.
        let series = if success { self.series(&labels) } else { None };
        let series = series.as_deref();
        if success {
            if let Some(ttft) = m.time_to_first_token {
                observe(
                    series.map(|s| &s.time_to_first_token),
                    || self.time_to_first_token.get_or_create(&labels).clone(),
                    ttft.as_secs_f64(),
                );
            }
            if let Some(per_token) = m.time_per_output_token() {
                observe(
                    series.map(|s| &s.time_per_output_token),
                    || self.time_per_output_token.get_or_create(&labels).clone(),
                    per_token.as_secs_f64(),
                );
            }
        }
        for (tokens, kind, kept) in [
            (m.input_tokens, "input", series.map(|s| &s.input_tokens)),
            (m.output_tokens, "output", series.map(|s| &s.output_tokens)),
        ] {
            if let Some(tokens) = tokens {
                let find = || {
                    self.token_usage
                        .get_or_create(&TokenLabels {
                            request: labels.clone(),
                            gen_ai_token_type: kind,
                        })
                        .clone()
                };
                observe(kept, find, tokens as f64);
            }
        }
        let find = || {
            self.duration
                .get_or_create(&DurationLabels {
                    request: labels.clone(),
                    error_type,
                })
                .clone()
        };
        observe(series.map(|s| &s.duration), find, elapsed.as_secs_f64());
    }
}

/// Observes `value` in the histogram `kept` holds, taken by `find` the
/// first time; without `kept`, in the one `find` gives.
fn observe(kept: Option<&OnceLock<Histogram>>, find: impl FnOnce() -> Histogram, value: f64) {
    match kept {
        Some(kept) => kept.get_or_init(find).observe(value),
        None => find().observe(value),
    }
}

/// The most distinct callers a proxy labels; later ones are `other`.
/// Callers are identities certified by the mesh's own authority, not names
/// a client can choose, so this bound is rarely reached.
pub const MAX_CALLERS: usize = 256;

/// The `caller` label of an identity (empty for none).
pub fn caller_label(caller: Option<&SpiffeId>) -> Name {
    use std::sync::OnceLock;
    static CALLERS: OnceLock<dashmap::DashMap<SpiffeId, Name>> = OnceLock::new();
    let Some(caller) = caller else {
        return Name::default();
    };
    let callers = CALLERS.get_or_init(dashmap::DashMap::new);
    if let Some(name) = callers.get(caller) {
        return name.clone();
    }
    if callers.len() >= MAX_CALLERS {
        return Name::new(OTHER);
    }
    callers
        .entry(caller.clone())
        .or_insert_with(|| Name::new(&caller.to_string()))
        .clone()
}

/// How a response body is framed, for counting its output chunks.
#[derive(Debug)]
enum Framing {
    /// A whole answer: one chunk.
    Whole,
    /// Server-sent events: each `data:` line is a chunk.
    Sse(SseEvents),
    /// gRPC: each length-prefixed message is a chunk.
    Grpc(GrpcMessages),
}

/// Counts `data:` fields at the start of SSE lines, across chunk borders.
#[derive(Debug, Default)]
struct SseEvents {
    /// Bytes of `data:` matched at the start of the current line; `None`
    /// inside a line that is not a data line.
    matched: Option<u8>,
    events: u64,
}

const DATA: &[u8] = b"data:";

impl SseEvents {
    fn new() -> Self {
        Self {
            matched: Some(0),
            events: 0,
        }
    }

    fn feed(&mut self, chunk: &[u8]) {
        for &b in chunk {
            if b == b'\n' || b == b'\r' {
                self.matched = Some(0);
                continue;
            }
            self.matched = match self.matched {
                Some(n) if (n as usize) < DATA.len() && DATA[n as usize] == b => {
                    if n as usize + 1 == DATA.len() {
                        self.events += 1;
                        // Past the field name: the rest of the line is data.
                        None
                    } else {
                        Some(n + 1)
                    }
                }
                _ => None,
            };
        }
    }
}

/// Counts gRPC length-prefixed messages, across chunk borders.
#[derive(Debug, Default)]
struct GrpcMessages {
    /// Bytes of the current 5-byte prefix read so far.
    prefix: [u8; 5],
    prefix_read: u8,
    /// Bytes of the current message still to skip.
    remaining: u64,
    messages: u64,
}

impl GrpcMessages {
    fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            if self.remaining > 0 {
                let skip = chunk
                    .len()
                    .min(self.remaining.min(usize::MAX as u64) as usize);
                self.remaining -= skip as u64;
                chunk = &chunk[skip..];
                continue;
            }
            self.prefix[self.prefix_read as usize] = chunk[0];
            self.prefix_read += 1;
            chunk = &chunk[1..];
            if self.prefix_read == 5 {
                self.prefix_read = 0;
                self.messages += 1;
                let length = u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]);
                self.remaining = u64::from(length);
            }
        }
    }
}

/// The usage counts of an OpenAI answer.
static PROMPT_TOKENS: UsageKey = UsageKey::new(b"\"prompt_tokens\"");
static COMPLETION_TOKENS: UsageKey = UsageKey::new(b"\"completion_tokens\"");

/// Measures one response as its body passes to the client.
#[derive(Debug)]
pub struct Meter {
    started: Instant,
    framing: Framing,
    /// `prompt_tokens` and `completion_tokens` of an OpenAI answer or
    /// stream (the last chunk of a stream with `include_usage`).
    /// Kept in place: the meter rides in the response body's accounting,
    /// which is boxed once per request anyway.
    usage: Option<[UsageScanner; 2]>,
    first: Option<Duration>,
    last: Option<Duration>,
}

impl Meter {
    /// A meter for a request that arrived at `started`.
    pub fn new(started: Instant) -> Self {
        Self {
            started,
            framing: Framing::Whole,
            usage: None,
            first: None,
            last: None,
        }
    }

    /// The response's head: its content type says how to read the body.
    pub fn responded(&mut self, headers: &HeaderMap) {
        let content_type = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let (framing, usage) = if content_type.starts_with("text/event-stream") {
            (Framing::Sse(SseEvents::new()), true)
        } else if content_type.starts_with("application/grpc") {
            (Framing::Grpc(GrpcMessages::default()), false)
        } else {
            (Framing::Whole, content_type.starts_with("application/json"))
        };
        self.framing = framing;
        if usage {
            self.usage = Some([
                UsageScanner::for_key(&PROMPT_TOKENS),
                UsageScanner::for_key(&COMPLETION_TOKENS),
            ]);
        }
    }

    /// A chunk of the body passed to the client.
    pub fn body(&mut self, chunk: &[u8]) {
        if chunk.is_empty() {
            return;
        }
        let token = match &mut self.framing {
            Framing::Whole => true,
            Framing::Sse(events) => {
                let before = events.events;
                events.feed(chunk);
                events.events > before
            }
            Framing::Grpc(messages) => {
                let before = messages.messages;
                messages.feed(chunk);
                messages.messages > before
            }
        };
        if token {
            let now = self.started.elapsed();
            self.first.get_or_insert(now);
            self.last = Some(now);
        }
        if let Some(scanners) = self.usage.as_mut() {
            for scanner in scanners.iter_mut() {
                scanner.feed(chunk);
            }
        }
    }

    /// What was measured.
    pub fn measured(&self) -> Measured {
        let (input_tokens, output_tokens) = match &self.usage {
            Some(scanners) => (scanners[0].total(), scanners[1].total()),
            None => (None, None),
        };
        let chunks = match &self.framing {
            Framing::Whole => None,
            Framing::Sse(events) => Some(events.events),
            Framing::Grpc(messages) => Some(messages.messages),
        };
        Measured {
            time_to_first_token: self.first,
            last_token: self.last,
            input_tokens,
            output_tokens,
            chunks,
        }
    }
}

/// One response's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Measured {
    /// From the request's arrival to its first token reaching the client.
    pub time_to_first_token: Option<Duration>,
    /// From the request's arrival to its last token.
    pub last_token: Option<Duration>,
    /// `usage.prompt_tokens`, as the server reported it.
    pub input_tokens: Option<u64>,
    /// `usage.completion_tokens`, as the server reported it.
    pub output_tokens: Option<u64>,
    /// SSE data events or gRPC messages of a streamed response; `None` for
    /// a whole answer.
    pub chunks: Option<u64>,
}

impl Measured {
    /// The mean time per output token after the first, for a streamed
    /// response of at least two tokens: the reported output tokens, else
    /// its chunks (an SSE event or gRPC message per token).
    pub fn time_per_output_token(&self) -> Option<Duration> {
        let chunks = self.chunks?;
        let tokens = self.output_tokens.unwrap_or(chunks);
        let (first, last) = (self.time_to_first_token?, self.last_token?);
        (tokens >= 2 && chunks >= 2)
            .then(|| (last - first) / (tokens - 1).min(u32::MAX as u64) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(content_type: &str) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert(http::header::CONTENT_TYPE, content_type.parse().unwrap());
        map
    }

    #[test]
    fn sse_data_events_are_counted_across_chunk_borders() {
        let mut events = SseEvents::new();
        for chunk in [
            &b"data: {\"a\":1}\n\nda"[..],
            b"ta: x\n\n: comment data: no\n\nevent: e\ndata:",
            b"y\r\n\r\ndata: [DONE]\n\n",
        ] {
            events.feed(chunk);
        }
        assert_eq!(events.events, 4);
    }

    #[test]
    fn grpc_messages_are_counted_across_chunk_borders() {
        let mut messages = GrpcMessages::default();
        let mut body = Vec::new();
        for length in [3u32, 0, 300] {
            body.push(0);
            body.extend_from_slice(&length.to_be_bytes());
            body.extend(std::iter::repeat_n(7u8, length as usize));
        }
        for chunk in body.chunks(4) {
            messages.feed(chunk);
        }
        assert_eq!(messages.messages, 3);
        assert_eq!((messages.prefix_read, messages.remaining), (0, 0));
    }

    #[test]
    fn a_stream_gives_its_first_token_usage_and_time_per_token() {
        let started = Instant::now() - Duration::from_millis(50);
        let mut meter = Meter::new(started);
        meter.responded(&headers("text/event-stream; charset=utf-8"));
        meter.body(b": keep-alive\n\n");
        assert_eq!(
            meter.measured().time_to_first_token,
            None,
            "a comment is no token"
        );
        meter.body(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n");
        std::thread::sleep(Duration::from_millis(20));
        meter.body(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3}}\n\ndata: [DONE]\n\n");
        let m = meter.measured();
        assert!(m.time_to_first_token.unwrap() >= Duration::from_millis(50));
        assert_eq!(
            (m.input_tokens, m.output_tokens, m.chunks),
            (Some(12), Some(3), Some(3))
        );
        let per_token = m.time_per_output_token().unwrap();
        assert!(per_token >= Duration::from_millis(10), "{per_token:?}");
    }

    #[test]
    fn a_whole_answer_has_usage_but_no_time_per_token() {
        let mut meter = Meter::new(Instant::now());
        meter.responded(&headers("application/json"));
        meter.body(br#"{"usage":{"prompt_tokens":7,"completion_tokens":5}}"#);
        let m = meter.measured();
        assert_eq!(
            (m.input_tokens, m.output_tokens, m.chunks),
            (Some(7), Some(5), None)
        );
        assert!(m.time_to_first_token.is_some());
        assert_eq!(m.time_per_output_token(), None);
    }

    #[test]
    fn callers_past_the_bound_are_other() {
        let id = |sa: &str| {
            format!("spiffe://t.local/ns/n/sa/{sa}")
                .parse::<SpiffeId>()
                .unwrap()
        };
        assert_eq!(
            caller_label(Some(&id("first"))).as_str(),
            "spiffe://t.local/ns/n/sa/first"
        );
        for i in 0..MAX_CALLERS + 5 {
            caller_label(Some(&id(&format!("s{i}"))));
        }
        assert_eq!(caller_label(Some(&id("late"))).as_str(), OTHER);
        assert_eq!(
            caller_label(Some(&id("first"))).as_str(),
            "spiffe://t.local/ns/n/sa/first"
        );
        assert_eq!(caller_label(None).as_str(), "");
    }

    #[test]
    fn kept_series_are_the_families_own_and_appear_only_once_observed() {
        let mut registry = Registry::default();
        let metrics = GenAiMetrics::register(&mut registry);
        let labels = GenAiLabels {
            gen_ai_operation_name: "chat",
            gen_ai_request_model: Name::new("m"),
            route: Name::new("r"),
            backend: Name::new("b"),
            caller: Name::default(),
        };
        let whole = Measured {
            time_to_first_token: Some(Duration::from_millis(5)),
            input_tokens: Some(7),
            ..Measured::default()
        };
        let elapsed = Duration::from_millis(10);
        for _ in 0..3 {
            metrics.record(labels.clone(), Name::default(), elapsed, &whole);
        }
        metrics.record(labels.clone(), Name::new("timeout"), elapsed, &whole);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let count = |series: &str| {
            text.lines()
                .find(|line| line.starts_with(series))
                .and_then(|line| line.rsplit(' ').next())
                .map(|n| n.parse::<u64>().unwrap())
        };
        let base = r#"gen_ai_request_model="m",route="r",backend="b",caller="""#;
        assert_eq!(
            count(&format!(
                "gen_ai_client_operation_duration_seconds_count{{gen_ai_operation_name=\"chat\",{base},error_type=\"\"}}"
            )),
            Some(3),
            "{text}"
        );
        assert_eq!(
            count(&format!(
                "gen_ai_client_operation_duration_seconds_count{{gen_ai_operation_name=\"chat\",{base},error_type=\"timeout\"}}"
            )),
            Some(1),
            "{text}"
        );
        assert_eq!(
            count(&format!(
                "gen_ai_server_time_to_first_token_seconds_count{{gen_ai_operation_name=\"chat\",{base}}}"
            )),
            Some(3),
            "{text}"
        );
        assert_eq!(
            count(&format!(
                "gen_ai_client_token_usage_count{{gen_ai_operation_name=\"chat\",{base},gen_ai_token_type=\"input\"}}"
            )),
            Some(4),
            "{text}"
        );
        // Never observed: no output tokens, no time per token.
        assert!(!text.contains("gen_ai_token_type=\"output\""), "{text}");
        assert!(
            !text.contains("time_per_output_token_seconds_count{"),
            "{text}"
        );
    }

    #[test]
    fn a_threads_last_series_serves_only_its_own_families_and_labels() {
        let durations = |registry: &Registry, route: &str| {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
            text.lines()
                .find(|line| {
                    line.starts_with("gen_ai_client_operation_duration_seconds_count{")
                        && line.contains(&format!("route=\"{route}\""))
                })
                .and_then(|line| line.rsplit(' ').next())
                .map_or(0, |n| n.parse::<u64>().unwrap())
        };
        let labels = |route: &str| GenAiLabels {
            gen_ai_operation_name: "chat",
            gen_ai_request_model: Name::new("m"),
            route: Name::new(route),
            backend: Name::new("b"),
            caller: Name::default(),
        };
        let (mut first, mut second) = (Registry::default(), Registry::default());
        let (a, b) = (
            GenAiMetrics::register(&mut first),
            GenAiMetrics::register(&mut second),
        );
        let elapsed = Duration::from_millis(10);
        let ok = Name::default;
        let r = labels("r");
        a.record(r.clone(), ok(), elapsed, &Measured::default());
        // The very same labels on other families: counted there, not in
        // the series the thread found last.
        b.record(r.clone(), ok(), elapsed, &Measured::default());
        // The same values made again, and the same labels again.
        a.record(labels("r"), ok(), elapsed, &Measured::default());
        a.record(r.clone(), ok(), elapsed, &Measured::default());
        // Another route between two of the first.
        a.record(labels("s"), ok(), elapsed, &Measured::default());
        a.record(r, ok(), elapsed, &Measured::default());
        assert_eq!(durations(&first, "r"), 4);
        assert_eq!(durations(&first, "s"), 1);
        assert_eq!(durations(&second, "r"), 1);
        assert_eq!(durations(&second, "s"), 0);
    }
}
