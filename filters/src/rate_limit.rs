//! Rate limits: local token buckets per route and caller, for requests per
//! second and for model tokens per minute.
//!
//! Each proxy keeps its own buckets, with no shared counter to ask: a limit
//! is enforced per sidecar, so it costs no round trip and keeps working when
//! anything else is down. A bucket holds up to `burst` units and refills at a
//! steady rate; a request passes when its bucket holds its cost.
//!
//! Requests cost one unit. Model tokens are not known until the model has
//! answered, so a request is charged an estimate up front (its input size
//! plus `max_tokens`, see [`TokenEstimate`]) and the charge is corrected when
//! the response ends, from the `usage.total_tokens` the model server
//! reports: in the JSON body, or in the last SSE event of a stream that asked
//! for `stream_options.include_usage`. The correction reads response chunks
//! as they pass and never holds one back, so streams stay unbuffered. A
//! response without usage keeps the estimate; a failed one (no response, or
//! a status other than 2xx) gives the tokens back.
//!
//! Buckets are kept per key: the whole route, the caller's mesh identity
//! ([`CallerKey`]), or a request header such as `x-tenant`. Requests without
//! a key share one bucket. Keyed buckets live in a concurrent map bounded by
//! `max_keys`: when it is full, buckets that have refilled completely (which
//! behave exactly like new ones) are dropped, and if none has, new keys share
//! the keyless bucket until some do.
//!
//! ```
//! use std::time::Duration;
//! use infermesh_filters::rate_limit::{Limit, LimitKey, Rate, RateLimitLayer};
//!
//! let layer = RateLimitLayer::new(
//!     "chat",
//!     vec![Limit {
//!         key: LimitKey::Header(http::HeaderName::from_static("x-tenant")),
//!         requests: Some(Rate::per_second(10.0, 20.0)),
//!         tokens: Some(Rate::per_minute(100_000.0, 100_000.0)),
//!         max_keys: 10_000,
//!     }],
//! );
//! # let _ = layer;
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use http::header::{HeaderName, CONTENT_LENGTH};
use http::{Request, Response};
use http_body::Frame;
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::body::{BoxBody, Ended, Watch, Watched};
use crate::error::ProxyError;

/// Request extension: who is calling, as the proxy knows it (the caller's
/// mesh identity on the inbound listener).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CallerKey(pub Arc<str>);

/// Request extension: the model tokens the proxy expects the request to
/// use, input and output together. Without it a request is estimated at a
/// quarter of its `Content-Length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenEstimate(pub u64);

/// What a limit's buckets are kept per.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitKey {
    /// One bucket for the whole route.
    Route,
    /// One bucket per caller identity ([`CallerKey`]).
    Caller,
    /// One bucket per value of this request header.
    Header(HeaderName),
}

/// A refill rate and the most a bucket holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Units added each second.
    pub per_second: f64,
    /// The most a bucket holds, and what a new one starts with.
    pub burst: f64,
}

impl Rate {
    /// `n` units a second, up to `burst`.
    pub fn per_second(n: f64, burst: f64) -> Self {
        Self {
            per_second: n,
            burst: burst.max(1.0),
        }
    }

    /// `n` units a minute, up to `burst`.
    pub fn per_minute(n: f64, burst: f64) -> Self {
        Self::per_second(n / 60.0, burst)
    }
}

/// One limit of a route: its key and its rates.
#[derive(Debug, Clone, PartialEq)]
pub struct Limit {
    /// What buckets are kept per.
    pub key: LimitKey,
    /// Requests per second, if limited.
    pub requests: Option<Rate>,
    /// Model tokens, if limited.
    pub tokens: Option<Rate>,
    /// Most keyed buckets kept at once.
    pub max_keys: usize,
}

/// Which bucket refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// The requests-per-second bucket.
    Requests,
    /// The model-token bucket.
    Tokens,
}

/// Counters of a route's rate limits.
#[derive(Debug, Clone, Default)]
pub struct RateLimitMetrics {
    /// Requests refused by a requests-per-second limit.
    pub limited_requests: Counter,
    /// Requests refused by a token limit.
    pub limited_tokens: Counter,
    /// Tokens charged up front, by estimate.
    pub tokens_estimated: Counter,
    /// Tokens given back: usage below the estimate, or a failed request.
    pub tokens_refunded: Counter,
    /// Tokens charged on top: usage above the estimate.
    pub tokens_added: Counter,
}

// === buckets ===

/// A token bucket. Its level may go below zero when a correction charges
/// more than was estimated; it then refuses until it has refilled.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: Option<Rate>, now: Instant) -> Self {
        Self {
            level: rate.map_or(0.0, |r| r.burst),
            at: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + elapsed * rate.per_second).min(rate.burst);
        self.at = now;
    }

    /// How long until the bucket holds `cost`, `None` when it does now.
    fn wait_for(&self, rate: Rate, cost: f64) -> Option<Duration> {
        if self.level >= cost {
            return None;
        }
        let seconds = (cost - self.level) / rate.per_second.max(f64::MIN_POSITIVE);
        Some(Duration::from_secs_f64(seconds.min(86_400.0)))
    }

    /// Adds `delta` (negative to charge), keeping the level within one
    /// burst of debt and one burst of credit.
    fn adjust(&mut self, rate: Rate, now: Instant, delta: f64) {
        self.refill(rate, now);
        self.level = (self.level + delta).clamp(-rate.burst, rate.burst);
    }

    fn is_full(&self, rate: Option<Rate>, now: Instant) -> bool {
        let Some(rate) = rate else { return true };
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.level + elapsed * rate.per_second >= rate.burst
    }
}

/// The buckets of one key of one limit.
#[derive(Debug)]
struct KeyState {
    requests: Bucket,
    tokens: Bucket,
}

type SharedState = Arc<Mutex<KeyState>>;

fn lock(state: &Mutex<KeyState>) -> MutexGuard<'_, KeyState> {
    // The buckets are plain numbers: a panic elsewhere leaves them usable.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What admitting a request under one limit decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admission {
    /// Admitted; this many tokens were charged.
    Admitted(f64),
    /// Refused by this bucket; it allows the request after this wait.
    Refused(LimitKind, Duration),
}

/// Charges one request costing `tokens` to `state` under `limit`, or says
/// which bucket refuses it and for how long. A token cost above the burst
/// is charged as the burst, so no request is refused forever.
fn admit(state: &mut KeyState, limit: &Limit, tokens: u64, now: Instant) -> Admission {
    let mut refused: Option<(LimitKind, Duration)> = None;
    if let Some(rate) = limit.requests {
        state.requests.refill(rate, now);
        if let Some(wait) = state.requests.wait_for(rate, 1.0) {
            refused = Some((LimitKind::Requests, wait));
        }
    }
    let mut cost = 0.0;
    if let Some(rate) = limit.tokens {
        state.tokens.refill(rate, now);
        cost = (tokens.max(1) as f64).min(rate.burst);
        if let Some(wait) = state.tokens.wait_for(rate, cost) {
            if refused.is_none_or(|(_, w)| wait > w) {
                refused = Some((LimitKind::Tokens, wait));
            }
        }
    }
    if let Some((kind, wait)) = refused {
        return Admission::Refused(kind, wait);
    }
    if limit.requests.is_some() {
        state.requests.level -= 1.0;
    }
    if limit.tokens.is_some() {
        state.tokens.level -= cost;
    }
    Admission::Admitted(cost)
}

/// A limit with its buckets.
#[derive(Debug)]
struct LimitState {
    limit: Limit,
    /// The route's bucket, or for keyed limits the one requests without a
    /// key (and new keys past `max_keys`) share.
    shared: SharedState,
    keyed: DashMap<Arc<str>, SharedState>,
    last_sweep: Mutex<Option<Instant>>,
}

impl LimitState {
    fn new(limit: Limit, now: Instant) -> Self {
        let shared = Arc::new(Mutex::new(KeyState {
            requests: Bucket::full(limit.requests, now),
            tokens: Bucket::full(limit.tokens, now),
        }));
        Self {
            limit,
            shared,
            keyed: DashMap::new(),
            last_sweep: Mutex::new(None),
        }
    }

    fn key_of<'r, B>(&self, request: &'r Request<B>) -> Option<&'r str> {
        match &self.limit.key {
            LimitKey::Route => None,
            LimitKey::Caller => request
                .extensions()
                .get::<CallerKey>()
                .map(|c| c.0.as_ref()),
            LimitKey::Header(name) => request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty()),
        }
    }

    fn state_for(&self, key: Option<&str>, now: Instant) -> SharedState {
        let Some(key) = key else {
            return self.shared.clone();
        };
        if let Some(state) = self.keyed.get(key) {
            return state.value().clone();
        }
        if self.keyed.len() >= self.limit.max_keys {
            self.sweep(now);
            if self.keyed.len() >= self.limit.max_keys {
                return self.shared.clone();
            }
        }
        self.keyed
            .entry(Arc::from(key))
            .or_insert_with(|| {
                Arc::new(Mutex::new(KeyState {
                    requests: Bucket::full(self.limit.requests, now),
                    tokens: Bucket::full(self.limit.tokens, now),
                }))
            })
            .value()
            .clone()
    }

    /// Drops the buckets that have refilled and that no response still
    /// holds, at most once a second.
    fn sweep(&self, now: Instant) {
        {
            let Ok(mut last) = self.last_sweep.try_lock() else {
                return;
            };
            if last.is_some_and(|at| now.saturating_duration_since(at) < Duration::from_secs(1)) {
                return;
            }
            *last = Some(now);
        }
        let (requests, tokens) = (self.limit.requests, self.limit.tokens);
        self.keyed.retain(|_, state| {
            if Arc::strong_count(state) > 1 {
                return true;
            }
            let state = lock(state);
            !(state.requests.is_full(requests, now) && state.tokens.is_full(tokens, now))
        });
    }
}

// === layer ===

/// Configuration and buckets of the [`RateLimit`] filter of one route.
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    shared: Arc<Limits>,
}

#[derive(Debug)]
struct Limits {
    route: String,
    limits: Vec<LimitState>,
    metrics: RateLimitMetrics,
}

impl RateLimitLayer {
    /// The limits of route `route`; buckets start full.
    pub fn new(route: &str, limits: Vec<Limit>) -> Self {
        Self::with_metrics(route, limits, RateLimitMetrics::default())
    }

    /// The same, counting into `metrics`.
    pub fn with_metrics(route: &str, limits: Vec<Limit>, metrics: RateLimitMetrics) -> Self {
        let now = Instant::now();
        Self {
            shared: Arc::new(Limits {
                route: route.to_owned(),
                limits: limits
                    .into_iter()
                    .map(|l| LimitState::new(l, now))
                    .collect(),
                metrics,
            }),
        }
    }

    /// Keyed buckets held now, over every limit.
    pub fn keys_held(&self) -> usize {
        self.shared.limits.iter().map(|l| l.keyed.len()).sum()
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// Refuses requests past a route's rate limits with 429 (gRPC
/// `RESOURCE_EXHAUSTED`) and corrects token charges from the response.
#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    shared: Arc<Limits>,
}

impl Limits {
    /// Admits `request` under every limit, or refuses it and undoes the
    /// charges of the limits it passed.
    fn admit<B>(&self, request: &Request<B>, now: Instant) -> Result<Option<Charge>, ProxyError> {
        let tokens = request
            .extensions()
            .get::<TokenEstimate>()
            .map(|e| e.0)
            .unwrap_or_else(|| {
                request
                    .headers()
                    .get(CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .map_or(0, |bytes| bytes / 4)
            });
        let mut taken: Vec<(usize, SharedState, f64)> = Vec::with_capacity(self.limits.len());
        for (index, limit) in self.limits.iter().enumerate() {
            let key = limit.key_of(request);
            let state = limit.state_for(key, now);
            let admission = admit(&mut lock(&state), &limit.limit, tokens, now);
            match admission {
                Admission::Admitted(cost) => taken.push((index, state, cost)),
                Admission::Refused(kind, wait) => {
                    for (index, state, cost) in taken {
                        let limit = &self.limits[index].limit;
                        let mut state = lock(&state);
                        if let Some(rate) = limit.requests {
                            state.requests.adjust(rate, now, 1.0);
                        }
                        if let Some(rate) = limit.tokens {
                            state.tokens.adjust(rate, now, cost);
                        }
                    }
                    return Err(self.refusal(&limit.limit, key, kind, wait, tokens));
                }
            }
        }
        let charges: Vec<(SharedState, Rate, f64)> = taken
            .into_iter()
            .filter_map(|(index, state, cost)| {
                let rate = self.limits[index].limit.tokens?;
                Some((state, rate, cost))
            })
            .collect();
        if charges.is_empty() {
            return Ok(None);
        }
        let estimated: f64 = charges.iter().map(|(_, _, cost)| cost).sum();
        self.metrics.tokens_estimated.inc_by(estimated as u64);
        Ok(Some(Charge {
            charges,
            metrics: self.metrics.clone(),
        }))
    }

    fn refusal(
        &self,
        limit: &Limit,
        key: Option<&str>,
        kind: LimitKind,
        wait: Duration,
        tokens: u64,
    ) -> ProxyError {
        let whom = match (&limit.key, key) {
            (LimitKey::Route, _) => String::new(),
            (LimitKey::Caller, Some(caller)) => format!(" for caller {caller}"),
            (LimitKey::Caller, None) => " for callers without a mesh identity".to_owned(),
            (LimitKey::Header(name), Some(value)) => format!(" for {name}: {value}"),
            (LimitKey::Header(name), None) => format!(" for requests without {name}"),
        };
        let reason = match kind {
            LimitKind::Requests => {
                self.metrics.limited_requests.inc();
                let rate = limit.requests.map_or(0.0, |r| r.per_second);
                format!(
                    "route {} allows {} requests per second{whom}",
                    self.route,
                    round(rate)
                )
            }
            LimitKind::Tokens => {
                self.metrics.limited_tokens.inc();
                let rate = limit.tokens.map_or(0.0, |r| r.per_second * 60.0);
                format!(
                    "route {} allows {} model tokens per minute{whom}, and this request is estimated at {tokens}",
                    self.route,
                    round(rate)
                )
            }
        };
        ProxyError::RateLimited {
            reason,
            retry_after: wait,
        }
    }
}

fn round(rate: f64) -> String {
    if rate.fract() == 0.0 {
        format!("{rate:.0}")
    } else {
        format!("{rate:.2}")
    }
}

impl<S, B> Service<Request<B>> for RateLimit<S>
where
    S: Service<Request<B>, Response = Response<BoxBody>, Error = ProxyError>,
{
    type Response = Response<BoxBody>;
    type Error = ProxyError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        match self.shared.admit(&request, Instant::now()) {
            Err(error) => ResponseFuture::Refused { error },
            Ok(charge) => ResponseFuture::Admitted {
                future: self.inner.call(request),
                charge,
            },
        }
    }
}

pin_project! {
    /// The response future of [`RateLimit`].
    #[project = Projection]
    pub enum ResponseFuture<F> {
        /// Refused before reaching the inner service.
        Refused { error: ProxyError },
        /// Admitted; token charges are corrected when the response ends.
        Admitted {
            #[pin]
            future: F,
            charge: Option<Charge>,
        },
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<BoxBody>, ProxyError>>,
{
    type Output = Result<Response<BoxBody>, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Projection::Refused { error } => Poll::Ready(Err(error.clone())),
            Projection::Admitted { future, charge } => {
                let outcome = std::task::ready!(future.poll(cx));
                let Some(charge) = charge.take() else {
                    return Poll::Ready(outcome);
                };
                Poll::Ready(match outcome {
                    // No response, no tokens used.
                    Err(error) => {
                        charge.settle(None);
                        Err(error)
                    }
                    Ok(response) => {
                        let success = response.status().is_success();
                        let (parts, body) = response.into_parts();
                        let body = Watched::new(
                            body,
                            Settlement {
                                charge: Some(charge),
                                scanner: UsageScanner::default(),
                                success,
                            },
                        );
                        Ok(Response::from_parts(parts, body.boxed_unsync()))
                    }
                })
            }
        }
    }
}

// === correction ===

/// Tokens charged to buckets for one request, to correct when it ends.
#[derive(Debug)]
pub struct Charge {
    charges: Vec<(SharedState, Rate, f64)>,
    metrics: RateLimitMetrics,
}

impl Charge {
    /// Corrects every charge to `used` tokens, or gives it back when `None`.
    fn settle(self, used: Option<u64>) {
        let now = Instant::now();
        for (state, rate, charged) in &self.charges {
            let delta = charged - used.map_or(0.0, |u| u as f64);
            if delta > 0.0 {
                self.metrics.tokens_refunded.inc_by(delta as u64);
            } else {
                self.metrics.tokens_added.inc_by((-delta) as u64);
            }
            lock(state).tokens.adjust(*rate, now, delta);
        }
    }
}

#[derive(Debug)]
struct Settlement {
    charge: Option<Charge>,
    scanner: UsageScanner,
    success: bool,
}

impl Settlement {
    /// Corrects the charge once: to the usage reported, or back to nothing
    /// for a failed request; without usage the estimate stands.
    fn settle(&mut self) {
        let Some(charge) = self.charge.take() else {
            return;
        };
        match (self.scanner.total(), self.success) {
            (Some(used), _) => charge.settle(Some(used)),
            (None, false) => charge.settle(None),
            (None, true) => {}
        }
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        self.settle();
    }
}

/// Watches a response's chunks for `usage.total_tokens` and corrects the
/// request's token charge when the body ends (or, dropped, in `Drop`).
impl Watch for Settlement {
    fn frame(&mut self, frame: &Frame<Bytes>) {
        if let Some(data) = frame.data_ref() {
            self.scanner.feed(data);
        }
    }

    fn end(mut self, _ended: Ended) {
        self.settle();
    }
}

/// Finds the last `"total_tokens": N` in a JSON body or an SSE stream, chunk
/// by chunk, holding a few bytes of state. Inside a JSON string a quote is
/// escaped, so the quoted key cannot match text of a prompt or completion.
#[derive(Debug)]
pub struct UsageScanner {
    /// The quoted key whose number is read, and its searcher.
    key: &'static [u8],
    finder: &'static memchr::memmem::Finder<'static>,
    state: UsageState,
    last: Option<u64>,
}

impl Default for UsageScanner {
    fn default() -> Self {
        Self::for_key(&TOTAL_TOKENS)
    }
}

#[derive(Debug, Default, Clone, Copy)]
enum UsageState {
    /// This many bytes of the key matched.
    #[default]
    Key0,
    Key(u8),
    /// After the key: `:`.
    Colon,
    /// After `:`: the first digit.
    Value,
    Digits(u64),
}

/// A quoted numeric key a [`UsageScanner`] reads, with its searcher, built
/// on first use (building one costs more than a search through a small
/// body) and then shared: keys are constants of the code.
///
/// ```
/// use infermesh_filters::rate_limit::{UsageKey, UsageScanner};
///
/// static PROMPT_TOKENS: UsageKey = UsageKey::new(b"\"prompt_tokens\"");
/// let mut scanner = UsageScanner::for_key(&PROMPT_TOKENS);
/// scanner.feed(br#"{"usage":{"prompt_tokens":12}}"#);
/// assert_eq!(scanner.total(), Some(12));
/// ```
#[derive(Debug)]
pub struct UsageKey {
    key: &'static [u8],
    finder: OnceLock<memchr::memmem::Finder<'static>>,
}

impl UsageKey {
    /// The key `key`, given with its quotes (`b"\"prompt_tokens\""`).
    pub const fn new(key: &'static [u8]) -> Self {
        Self {
            key,
            finder: OnceLock::new(),
        }
    }

    fn finder(&self) -> &memchr::memmem::Finder<'static> {
        self.finder
            .get_or_init(|| memchr::memmem::Finder::new(self.key))
    }
}

static TOTAL_TOKENS: UsageKey = UsageKey::new(b"\"total_tokens\"");

impl UsageScanner {
    /// A scanner of another numeric key.
    pub fn for_key(key: &'static UsageKey) -> Self {
        Self {
            key: key.key,
            finder: key.finder(),
            state: UsageState::Key0,
            last: None,
        }
    }

    /// Reads the next chunk.
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut i = 0;
        while i < chunk.len() {
            if let UsageState::Key0 = self.state {
                // Between keys: find the next whole key at once (a SIMD
                // search; a step per byte cost several instructions a byte);
                // a key cut by the end of the chunk is matched as far as it goes.
                let rest = &chunk[i..];
                match self.finder.find(rest) {
                    Some(at) => {
                        i += at + self.key.len();
                        self.state = UsageState::Colon;
                        continue;
                    }
                    None => {
                        self.state = self.partial_key_at_end(rest);
                        return;
                    }
                }
            }
            self.step(chunk[i]);
            i += 1;
        }
    }

    /// The state after `tail`, which holds no whole key: the longest
    /// beginning of the key that `tail` ends with, if any.
    fn partial_key_at_end(&self, tail: &[u8]) -> UsageState {
        // The key opens with a quote: only a quote among the last bytes can
        // start it; the leftmost one that does gives the longest match.
        let from = tail.len().saturating_sub(self.key.len() - 1);
        (from..tail.len())
            .find(|&at| tail[at] == self.key[0] && self.key.starts_with(&tail[at..]))
            .map_or(UsageState::Key0, |at| {
                UsageState::Key((tail.len() - at) as u8)
            })
    }

    fn step(&mut self, b: u8) {
        let restart = |b: u8| {
            if b == b'"' {
                UsageState::Key(1)
            } else {
                UsageState::Key0
            }
        };
        self.state = match self.state {
            UsageState::Key0 => restart(b),
            UsageState::Key(n) => {
                if b == self.key[n as usize] {
                    if n as usize + 1 == self.key.len() {
                        UsageState::Colon
                    } else {
                        UsageState::Key(n + 1)
                    }
                } else {
                    restart(b)
                }
            }
            UsageState::Colon => match b {
                b':' => UsageState::Value,
                b' ' | b'\t' | b'\r' | b'\n' => UsageState::Colon,
                _ => restart(b),
            },
            UsageState::Value => match b {
                b'0'..=b'9' => UsageState::Digits(u64::from(b - b'0')),
                b' ' | b'\t' | b'\r' | b'\n' => UsageState::Value,
                _ => restart(b),
            },
            UsageState::Digits(n) => match b {
                b'0'..=b'9' => {
                    UsageState::Digits(n.saturating_mul(10).saturating_add(u64::from(b - b'0')))
                }
                _ => {
                    self.last = Some(n);
                    restart(b)
                }
            },
        };
    }

    /// The last `total_tokens` seen so far.
    pub fn total(&self) -> Option<u64> {
        match self.state {
            UsageState::Digits(n) => Some(n),
            _ => self.last,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, StatusCode};
    use tower::{service_fn, ServiceExt};

    fn limit(requests: Option<Rate>, tokens: Option<Rate>) -> Limit {
        Limit {
            key: LimitKey::Route,
            requests,
            tokens,
            max_keys: 100,
        }
    }

    fn fresh(limit: &Limit, now: Instant) -> KeyState {
        KeyState {
            requests: Bucket::full(limit.requests, now),
            tokens: Bucket::full(limit.tokens, now),
        }
    }

    #[test]
    fn a_burst_passes_then_requests_wait_for_the_refill() {
        let now = Instant::now();
        let limit = limit(Some(Rate::per_second(2.0, 3.0)), None);
        let mut state = fresh(&limit, now);
        for _ in 0..3 {
            assert!(matches!(
                admit(&mut state, &limit, 0, now),
                Admission::Admitted(_)
            ));
        }
        assert_eq!(
            admit(&mut state, &limit, 0, now),
            Admission::Refused(LimitKind::Requests, Duration::from_millis(500))
        );
        let later = now + Duration::from_millis(500);
        assert!(matches!(
            admit(&mut state, &limit, 0, later),
            Admission::Admitted(_)
        ));
    }

    #[test]
    fn a_token_cost_above_the_burst_is_charged_as_the_burst() {
        let now = Instant::now();
        let limit = limit(None, Some(Rate::per_minute(600.0, 100.0)));
        let mut state = fresh(&limit, now);
        assert_eq!(
            admit(&mut state, &limit, 5000, now),
            Admission::Admitted(100.0)
        );
        // Empty now; 10 tokens a second refill it.
        assert_eq!(
            admit(&mut state, &limit, 50, now),
            Admission::Refused(LimitKind::Tokens, Duration::from_secs(5))
        );
    }

    #[test]
    fn the_longer_wait_of_two_refusing_buckets_is_reported() {
        let now = Instant::now();
        let limit = limit(
            Some(Rate::per_second(1.0, 1.0)),
            Some(Rate::per_second(1.0, 10.0)),
        );
        let mut state = fresh(&limit, now);
        assert_eq!(
            admit(&mut state, &limit, 10, now),
            Admission::Admitted(10.0)
        );
        assert_eq!(
            admit(&mut state, &limit, 4, now),
            Admission::Refused(LimitKind::Tokens, Duration::from_secs(4))
        );
    }

    #[test]
    fn a_bucket_in_debt_refuses_until_it_refills() {
        let now = Instant::now();
        let rate = Rate::per_second(10.0, 100.0);
        let mut bucket = Bucket::full(Some(rate), now);
        bucket.adjust(rate, now, -150.0);
        assert_eq!(bucket.level, -50.0);
        assert_eq!(
            bucket.wait_for(rate, 1.0),
            Some(Duration::from_millis(5100))
        );
        bucket.adjust(rate, now, -1000.0);
        assert_eq!(bucket.level, -100.0, "debt is capped at one burst");
    }

    #[test]
    fn usage_is_found_in_json_and_in_the_last_sse_event_across_any_split() {
        let json = br#"{"id":"x","choices":[{"message":{"content":"say \"total_tokens\": 999"}}],"usage":{"prompt_tokens":7,"completion_tokens":5,"total_tokens":12}}"#;
        for cut in 0..json.len() {
            let mut scanner = UsageScanner::default();
            scanner.feed(&json[..cut]);
            scanner.feed(&json[cut..]);
            assert_eq!(scanner.total(), Some(12), "cut at {cut}");
        }
        let sse = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"total_tokens\": 40}}\n\ndata: [DONE]\n\n";
        let mut scanner = UsageScanner::default();
        for byte in sse.chunks(1) {
            scanner.feed(byte);
        }
        assert_eq!(scanner.total(), Some(40));
        let mut none = UsageScanner::default();
        none.feed(br#"{"usage":null,"total":3}"#);
        assert_eq!(none.total(), None);
        let mut at_end = UsageScanner::default();
        at_end.feed(br#""total_tokens":77"#);
        assert_eq!(at_end.total(), Some(77));
        // Quotes next to each other, and a near miss just before the key.
        let tight = br#"{"":"","total_tokens_x":1,""total_tokens":9}"#;
        for cut in 0..tight.len() {
            let mut scanner = UsageScanner::default();
            scanner.feed(&tight[..cut]);
            scanner.feed(&tight[cut..]);
            assert_eq!(scanner.total(), Some(9), "cut at {cut}");
        }
    }

    fn answer(usage: Option<u64>, status: StatusCode) -> Response<BoxBody> {
        let body = match usage {
            Some(n) => format!(r#"{{"usage":{{"total_tokens":{n}}}}}"#),
            None => "{}".to_owned(),
        };
        let mut response = Response::new(crate::body::full(body));
        *response.status_mut() = status;
        response
    }

    fn request(tenant: Option<&str>, estimate: u64) -> Request<()> {
        let mut request = Request::new(());
        if let Some(tenant) = tenant {
            request
                .headers_mut()
                .insert("x-tenant", HeaderValue::from_str(tenant).unwrap());
        }
        request.extensions_mut().insert(TokenEstimate(estimate));
        request
    }

    async fn call(
        layer: &RateLimitLayer,
        request: Request<()>,
        usage: Option<u64>,
        status: StatusCode,
    ) -> Result<u16, ProxyError> {
        let service = layer.layer(service_fn(move |_: Request<()>| async move {
            Ok::<_, ProxyError>(answer(usage, status))
        }));
        let response = service.oneshot(request).await?;
        let status = response.status().as_u16();
        response.into_body().collect().await.unwrap();
        Ok(status)
    }

    #[tokio::test(start_paused = true)]
    async fn reported_usage_gives_back_what_the_estimate_overcharged() {
        let metrics = RateLimitMetrics::default();
        let layer = RateLimitLayer::with_metrics(
            "chat",
            vec![limit(None, Some(Rate::per_minute(1.0, 5000.0)))],
            metrics.clone(),
        );
        // Each request is estimated at 1,000 tokens but uses 10: far more
        // than five fit in 5,000.
        for i in 0..50 {
            let outcome = call(&layer, request(None, 1000), Some(10), StatusCode::OK).await;
            assert_eq!(outcome.unwrap(), 200, "request {i}");
        }
        assert_eq!(metrics.tokens_estimated.get(), 50_000);
        assert_eq!(metrics.tokens_refunded.get(), 49_500);
        // Without usage the estimate stands: five more at most.
        let layer = RateLimitLayer::new(
            "chat",
            vec![limit(None, Some(Rate::per_minute(1.0, 5000.0)))],
        );
        let mut passed = 0;
        for _ in 0..10 {
            if call(&layer, request(None, 1000), None, StatusCode::OK)
                .await
                .is_ok()
            {
                passed += 1;
            }
        }
        assert_eq!(passed, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn usage_above_the_estimate_is_charged_and_failures_are_refunded() {
        let layer = RateLimitLayer::new(
            "chat",
            vec![limit(None, Some(Rate::per_minute(60.0, 100.0)))],
        );
        call(&layer, request(None, 10), Some(90), StatusCode::OK)
            .await
            .unwrap();
        // 10 left: an estimate of 20 waits 10 s.
        let refused = call(&layer, request(None, 20), None, StatusCode::OK).await;
        let Err(ProxyError::RateLimited {
            retry_after,
            reason,
        }) = refused
        else {
            panic!("{refused:?}");
        };
        assert_eq!(retry_after, Duration::from_secs(10));
        assert!(reason.contains("60 model tokens per minute"), "{reason}");
        // A failed request costs nothing.
        call(
            &layer,
            request(None, 10),
            None,
            StatusCode::SERVICE_UNAVAILABLE,
        )
        .await
        .unwrap();
        call(&layer, request(None, 10), None, StatusCode::OK)
            .await
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_fails_before_a_response_gets_its_tokens_back() {
        let metrics = RateLimitMetrics::default();
        let layer = RateLimitLayer::with_metrics(
            "chat",
            vec![limit(None, Some(Rate::per_minute(1.0, 100.0)))],
            metrics.clone(),
        );
        for _ in 0..5 {
            let service = layer.layer(service_fn(|_: Request<()>| async {
                Err::<Response<BoxBody>, _>(ProxyError::NoEndpoint("vllm".into()))
            }));
            let error = service.oneshot(request(None, 80)).await.unwrap_err();
            assert!(matches!(error, ProxyError::NoEndpoint(_)), "{error:?}");
        }
        assert_eq!(metrics.tokens_refunded.get(), 400);
    }

    #[tokio::test(start_paused = true)]
    async fn header_keys_have_buckets_of_their_own() {
        let layer = RateLimitLayer::new(
            "chat",
            vec![Limit {
                key: LimitKey::Header(HeaderName::from_static("x-tenant")),
                requests: Some(Rate::per_second(1.0, 2.0)),
                tokens: None,
                max_keys: 100,
            }],
        );
        for tenant in ["blue", "blue"] {
            assert!(call(&layer, request(Some(tenant), 0), None, StatusCode::OK)
                .await
                .is_ok());
        }
        let refused = call(&layer, request(Some("blue"), 0), None, StatusCode::OK).await;
        let Err(ProxyError::RateLimited { reason, .. }) = refused else {
            panic!("{refused:?}");
        };
        assert_eq!(
            reason,
            "route chat allows 1 requests per second for x-tenant: blue"
        );
        assert!(
            call(&layer, request(Some("green"), 0), None, StatusCode::OK)
                .await
                .is_ok()
        );
        assert!(call(&layer, request(None, 0), None, StatusCode::OK)
            .await
            .is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn caller_keys_have_buckets_of_their_own_and_anonymous_callers_share_one() {
        let layer = RateLimitLayer::new(
            "chat",
            vec![Limit {
                key: LimitKey::Caller,
                requests: Some(Rate::per_second(1.0, 1.0)),
                tokens: None,
                max_keys: 100,
            }],
        );
        let from = |caller: Option<&str>| {
            let mut request = request(None, 0);
            if let Some(caller) = caller {
                request
                    .extensions_mut()
                    .insert(CallerKey(Arc::from(caller)));
            }
            request
        };
        let web = Some("spiffe://cluster.local/ns/apps/sa/web");
        let batch = Some("spiffe://cluster.local/ns/batch/sa/job");
        assert!(call(&layer, from(web), None, StatusCode::OK).await.is_ok());
        let refused = call(&layer, from(web), None, StatusCode::OK).await;
        let Err(ProxyError::RateLimited { reason, .. }) = refused else {
            panic!("{refused:?}");
        };
        assert!(
            reason.ends_with("for caller spiffe://cluster.local/ns/apps/sa/web"),
            "{reason}"
        );
        assert!(call(&layer, from(batch), None, StatusCode::OK)
            .await
            .is_ok());
        assert!(call(&layer, from(None), None, StatusCode::OK).await.is_ok());
        let refused = call(&layer, from(None), None, StatusCode::OK).await;
        let Err(ProxyError::RateLimited { reason, .. }) = refused else {
            panic!("{refused:?}");
        };
        assert!(
            reason.ends_with("for callers without a mesh identity"),
            "{reason}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn keyed_buckets_stay_within_max_keys() {
        let layer = RateLimitLayer::new(
            "chat",
            vec![Limit {
                key: LimitKey::Header(HeaderName::from_static("x-tenant")),
                requests: Some(Rate::per_second(10.0, 1000.0)),
                tokens: None,
                max_keys: 8,
            }],
        );
        for i in 0..100 {
            let tenant = format!("t{i}");
            call(&layer, request(Some(&tenant), 0), None, StatusCode::OK)
                .await
                .unwrap();
            assert!(layer.keys_held() <= 8);
        }
        // Once refilled, old buckets make room for new keys.
        tokio::time::advance(Duration::from_secs(2)).await;
        call(&layer, request(Some("new"), 0), None, StatusCode::OK)
            .await
            .unwrap();
        assert_eq!(layer.keys_held(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_by_one_limit_undoes_the_charges_of_the_others() {
        let route_wide = limit(Some(Rate::per_second(1.0, 5.0)), None);
        let per_tenant = Limit {
            key: LimitKey::Header(HeaderName::from_static("x-tenant")),
            requests: Some(Rate::per_second(1.0, 1.0)),
            tokens: None,
            max_keys: 10,
        };
        let layer = RateLimitLayer::new("chat", vec![route_wide, per_tenant]);
        call(&layer, request(Some("a"), 0), None, StatusCode::OK)
            .await
            .unwrap();
        for _ in 0..10 {
            assert!(call(&layer, request(Some("a"), 0), None, StatusCode::OK)
                .await
                .is_err());
        }
        // The route-wide bucket lost only the one request that passed.
        for tenant in ["b", "c", "d", "e"] {
            call(&layer, request(Some(tenant), 0), None, StatusCode::OK)
                .await
                .unwrap();
        }
    }
}
