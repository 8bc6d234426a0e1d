//! Per-model traffic summaries for the control plane's dashboard: each
//! finished request adds to its model's counters (atomics, found in a
//! sharded map, so requests share no lock), and the policy stream sends
//! and resets them every few seconds as a `Summary`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use http::HeaderMap;
use infermesh_filters::rate_limit::UsageScanner;
use infermesh_proto::policy_api::{ModelSummary, Summary, TTFT_BOUNDS_MS};
use parking_lot::Mutex;

/// Distinct model names a proxy tracks; requests for any other name are
/// summed under [`OTHER`].
pub const MAX_MODELS: usize = 64;
/// The name that collects models past [`MAX_MODELS`].
pub const OTHER: &str = "other";

const BUCKETS: usize = TTFT_BOUNDS_MS.len() + 1;

/// One model's counters since the last summary.
#[derive(Debug, Default)]
struct Counts {
    requests: AtomicU64,
    failures: AtomicU64,
    input_tokens: AtomicU64,
    output_tokens: AtomicU64,
    ttft: [AtomicU64; BUCKETS],
}

/// The proxy's counters, per model.
#[derive(Debug)]
pub struct Summaries {
    models: DashMap<Arc<str>, Arc<Counts>>,
    /// When the interval being counted began.
    since: Mutex<Instant>,
}

impl Default for Summaries {
    fn default() -> Self {
        Self {
            models: DashMap::new(),
            since: Mutex::new(Instant::now()),
        }
    }
}

static SUMMARIES: OnceLock<Summaries> = OnceLock::new();

/// The process's summaries.
pub fn summaries() -> &'static Summaries {
    SUMMARIES.get_or_init(Summaries::default)
}

/// The bucket of a time to first token.
fn bucket(ttft: Duration) -> usize {
    let ms = ttft.as_millis();
    TTFT_BOUNDS_MS
        .iter()
        .position(|&bound| ms <= u128::from(bound))
        .unwrap_or(TTFT_BOUNDS_MS.len())
}

impl Summaries {
    /// The counters of `model` (requests without one count under ``).
    fn counts(&self, model: Option<&str>) -> Arc<Counts> {
        let model = model.unwrap_or("");
        if let Some(counts) = self.models.get(model) {
            return counts.clone();
        }
        let name: Arc<str> = if self.models.len() < MAX_MODELS {
            model.into()
        } else {
            OTHER.into()
        };
        self.models.entry(name).or_default().clone()
    }

    /// Starts recording a request for `model` that arrived at `started`.
    pub fn start(&self, model: Option<&str>, started: Instant) -> Recording {
        Recording {
            counts: self.counts(model),
            started,
            first_chunk: None,
            scanners: None,
            failed: false,
        }
    }

    /// The counts since the last call, and resets them; `None` when no
    /// request finished in between.
    pub fn take(&self) -> Option<Summary> {
        let mut since = self.since.lock();
        let now = Instant::now();
        let interval = now.duration_since(*since);
        *since = now;
        drop(since);
        let mut models = Vec::new();
        for entry in self.models.iter() {
            let counts = entry.value();
            let requests = counts.requests.swap(0, Ordering::Relaxed);
            if requests == 0 {
                continue;
            }
            models.push(ModelSummary {
                model: entry.key().to_string(),
                requests,
                failures: counts.failures.swap(0, Ordering::Relaxed),
                ttft_buckets: counts
                    .ttft
                    .iter()
                    .map(|b| b.swap(0, Ordering::Relaxed))
                    .collect(),
                input_tokens: counts.input_tokens.swap(0, Ordering::Relaxed),
                output_tokens: counts.output_tokens.swap(0, Ordering::Relaxed),
            });
        }
        (!models.is_empty()).then(|| Summary {
            interval_ms: interval.as_millis().min(u128::from(u64::MAX)) as u64,
            models,
        })
    }
}

/// One request's figures, added to its model's counters when dropped (its
/// response ended or the client went away).
#[derive(Debug)]
pub struct Recording {
    counts: Arc<Counts>,
    started: Instant,
    first_chunk: Option<Duration>,
    /// `prompt_tokens` and `completion_tokens` scanners of an OpenAI JSON
    /// answer or SSE stream (the same scanners the trace spans use).
    scanners: Option<Box<[UsageScanner; 2]>>,
    failed: bool,
}

impl Recording {
    /// The response's head: a 5xx is a failure; a JSON or SSE body is
    /// scanned for its `usage`.
    pub fn responded(&mut self, status: u16, headers: &HeaderMap) {
        self.failed = status >= 500;
        let scanned = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.starts_with("application/json") || v.starts_with("text/event-stream")
            });
        if scanned {
            self.scanners = Some(Box::new([
                UsageScanner::for_key(b"\"prompt_tokens\""),
                UsageScanner::for_key(b"\"completion_tokens\""),
            ]));
        }
    }

    /// A gRPC status (a label of `metrics::grpc_status_label`): anything
    /// but OK is a failure.
    pub fn grpc_status(&mut self, status: &str) {
        self.failed = status != "0";
    }

    /// A chunk of the response body passed to the client: the first one
    /// is the first token (an SSE data event, a gRPC message, the first
    /// byte of a whole answer).
    pub fn body(&mut self, chunk: &[u8]) {
        if chunk.is_empty() {
            return;
        }
        if self.first_chunk.is_none() {
            self.first_chunk = Some(self.started.elapsed());
        }
        if let Some(scanners) = self.scanners.as_mut() {
            for scanner in scanners.iter_mut() {
                scanner.feed(chunk);
            }
        }
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        let counts = &self.counts;
        counts.requests.fetch_add(1, Ordering::Relaxed);
        if self.failed {
            counts.failures.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(ttft) = self.first_chunk {
            counts.ttft[bucket(ttft)].fetch_add(1, Ordering::Relaxed);
        }
        if let Some(scanners) = &self.scanners {
            let [input, output] = &**scanners;
            if let Some(tokens) = input.total() {
                counts.input_tokens.fetch_add(tokens, Ordering::Relaxed);
            }
            if let Some(tokens) = output.total() {
                counts.output_tokens.fetch_add(tokens, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_summed_per_model_and_reset_when_taken() {
        let summaries = Summaries::default();
        let started = Instant::now();
        for status in [200, 200, 503] {
            let mut r = summaries.start(Some("m1"), started);
            let mut headers = HeaderMap::new();
            headers.insert(
                http::header::CONTENT_TYPE,
                "application/json".parse().unwrap(),
            );
            r.responded(status, &headers);
            r.body(br#"{"usage":{"prompt_tokens":7,"completion_tokens":3}}"#);
        }
        let mut grpc = summaries.start(Some("m2"), started);
        grpc.grpc_status("14");
        drop(grpc);
        let summary = summaries.take().unwrap();
        let m1 = summary.models.iter().find(|m| m.model == "m1").unwrap();
        assert_eq!((m1.requests, m1.failures), (3, 1));
        assert_eq!((m1.input_tokens, m1.output_tokens), (21, 9));
        assert_eq!(m1.ttft_buckets.iter().sum::<u64>(), 3);
        assert_eq!(m1.ttft_buckets.len(), BUCKETS);
        let m2 = summary.models.iter().find(|m| m.model == "m2").unwrap();
        assert_eq!((m2.requests, m2.failures), (1, 1));
        assert!(summaries.take().is_none(), "taken counts start again at 0");
    }

    #[test]
    fn model_names_past_the_cap_collapse_into_other() {
        let summaries = Summaries::default();
        for i in 0..MAX_MODELS + 10 {
            drop(summaries.start(Some(&format!("model-{i}")), Instant::now()));
        }
        let summary = summaries.take().unwrap();
        assert!(summary.models.len() <= MAX_MODELS + 1);
        let other = summary.models.iter().find(|m| m.model == OTHER).unwrap();
        assert_eq!(other.requests, 10);
    }

    #[test]
    fn times_fall_in_their_bucket() {
        assert_eq!(bucket(Duration::from_millis(0)), 0);
        assert_eq!(bucket(Duration::from_millis(5)), 0);
        assert_eq!(bucket(Duration::from_millis(6)), 1);
        assert_eq!(bucket(Duration::from_secs(60)), TTFT_BOUNDS_MS.len());
    }
}
