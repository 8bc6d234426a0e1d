//! Per-model traffic summaries for the control plane's dashboard: each
//! finished request adds what its response measured (`genai.rs`) to its
//! model's counters (atomics, found in a
//! sharded map, so requests share no lock), and the policy stream sends
//! and resets them every few seconds as a `Summary`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use infermesh_proto::policy_api::{ModelSummary, Summary, TTFT_BOUNDS_MS};
use parking_lot::Mutex;

use crate::genai::Measured;

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
    /// Hashed with foldhash, seeded per process, as the metric families'
    /// kept series are: a model name from a client is hashed for every
    /// request, and there are at most [`MAX_MODELS`] of them.
    models: DashMap<Arc<str>, Arc<Counts>, foldhash::fast::RandomState>,
    /// When the interval being counted began.
    since: Mutex<Instant>,
}

impl Default for Summaries {
    fn default() -> Self {
        Self {
            models: DashMap::with_hasher(foldhash::fast::RandomState::default()),
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

    /// Adds a finished request for `model`: whether it failed (a 5xx or
    /// a gRPC status other than OK) and what its response measured.
    pub fn record(&self, model: Option<&str>, failed: bool, measured: &Measured) {
        let counts = self.counts(model);
        counts.requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            counts.failures.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(ttft) = measured.time_to_first_token {
            counts.ttft[bucket(ttft)].fetch_add(1, Ordering::Relaxed);
        }
        if let Some(tokens) = measured.input_tokens {
            counts.input_tokens.fetch_add(tokens, Ordering::Relaxed);
        }
        if let Some(tokens) = measured.output_tokens {
            counts.output_tokens.fetch_add(tokens, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_summed_per_model_and_reset_when_taken() {
        let summaries = Summaries::default();
        let answered = Measured {
            time_to_first_token: Some(Duration::from_millis(3)),
            input_tokens: Some(7),
            output_tokens: Some(3),
            ..Measured::default()
        };
        for failed in [false, false, true] {
            summaries.record(Some("m1"), failed, &answered);
        }
        summaries.record(Some("m2"), true, &Measured::default());
        let summary = summaries.take().unwrap();
        let m1 = summary.models.iter().find(|m| m.model == "m1").unwrap();
        assert_eq!((m1.requests, m1.failures), (3, 1));
        assert_eq!((m1.input_tokens, m1.output_tokens), (21, 9));
        assert_eq!(m1.ttft_buckets.iter().sum::<u64>(), 3);
        assert_eq!(m1.ttft_buckets.len(), BUCKETS);
        let m2 = summary.models.iter().find(|m| m.model == "m2").unwrap();
        assert_eq!((m2.requests, m2.failures), (1, 1));
        assert_eq!(m2.ttft_buckets.iter().sum::<u64>(), 0);
        assert!(summaries.take().is_none(), "taken counts start again at 0");
    }

    #[test]
    fn model_names_past_the_cap_collapse_into_other() {
        let summaries = Summaries::default();
        for i in 0..MAX_MODELS + 10 {
            summaries.record(Some(&format!("model-{i}")), false, &Measured::default());
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
