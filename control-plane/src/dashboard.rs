//! The mesh dashboard: the proxies' traffic summaries (sent on their policy
//! streams), kept for a few minutes per proxy and aggregated per model for
//! the whole mesh and per proxy; `/dashboard.json` serves the figures and
//! `/dashboard` a page that draws them.
//!
//! Memory is bounded: [`WINDOW`] of summaries per proxy, [`MAX_MODELS`]
//! models per summary and [`MAX_PROXIES`] proxies (the one heard from
//! longest ago is forgotten first).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use infermesh_proto::policy_api::{ModelSummary, Summary, TTFT_BOUNDS_MS};
use parking_lot::Mutex;
use serde::Serialize;

/// How long summaries are kept.
pub const WINDOW: Duration = Duration::from_secs(300);
/// The span over which rates, success rates and percentiles are computed.
pub const RECENT: Duration = Duration::from_secs(60);
/// The width of one sparkline point.
pub const STEP: Duration = Duration::from_secs(10);
/// Models kept per summary (the busiest); the rest are dropped.
pub const MAX_MODELS: usize = 64;
/// Proxies whose summaries are kept.
pub const MAX_PROXIES: usize = 512;
/// Summaries kept per proxy, whatever their interval.
const MAX_SUMMARIES: usize = 600;

const BUCKETS: usize = TTFT_BOUNDS_MS.len() + 1;

/// One summary, as received.
#[derive(Debug)]
struct Received {
    at: Instant,
    /// The interval the summary covers, ending at `at`.
    interval: Duration,
    models: Vec<ModelSummary>,
}

/// Every proxy's recent summaries.
#[derive(Debug, Default)]
pub struct Figures {
    proxies: Mutex<HashMap<String, VecDeque<Received>>>,
}

impl Figures {
    /// Keeps a summary from `proxy`.
    pub fn record(&self, proxy: &str, summary: Summary) {
        self.record_at(proxy, summary, Instant::now());
    }

    fn record_at(&self, proxy: &str, summary: Summary, at: Instant) {
        // Rates are over the recent span, whatever each summary's interval.
        let Summary {
            interval_ms,
            mut models,
        } = summary;
        if models.len() > MAX_MODELS {
            models.sort_by_key(|m| std::cmp::Reverse(m.requests));
            models.truncate(MAX_MODELS);
        }
        for model in &mut models {
            model.ttft_buckets.truncate(BUCKETS);
            model.model.truncate(256);
        }
        let mut proxies = self.proxies.lock();
        if !proxies.contains_key(proxy) && proxies.len() >= MAX_PROXIES {
            let oldest = proxies
                .iter()
                .min_by_key(|(_, kept)| kept.back().map(|r| r.at))
                .map(|(name, _)| name.clone());
            if let Some(oldest) = oldest {
                proxies.remove(&oldest);
            }
        }
        let kept = proxies.entry(proxy.to_string()).or_default();
        kept.push_back(Received {
            at,
            interval: Duration::from_millis(interval_ms).min(WINDOW),
            models,
        });
        while kept.len() > MAX_SUMMARIES
            || kept
                .front()
                .is_some_and(|r| at.saturating_duration_since(r.at) > WINDOW)
        {
            kept.pop_front();
        }
    }

    /// The figures as `/dashboard.json` shows them.
    pub fn view(&self, now: Instant) -> View {
        let proxies = self.proxies.lock();
        let mut mesh: BTreeMap<String, Totals> = BTreeMap::new();
        let mut per_proxy = BTreeMap::new();
        // The longest a proxy was heard from over the recent span.
        let mut mesh_covered = Duration::ZERO;
        for (proxy, kept) in proxies.iter() {
            let covered = covered(kept, now);
            mesh_covered = mesh_covered.max(covered);
            let mut models: BTreeMap<String, Totals> = BTreeMap::new();
            for received in kept {
                let age = now.saturating_duration_since(received.at);
                if age > WINDOW {
                    continue;
                }
                for model in &received.models {
                    for totals in [
                        models.entry(model.model.clone()).or_default(),
                        mesh.entry(model.model.clone()).or_default(),
                    ] {
                        totals.add(model, age);
                    }
                }
            }
            per_proxy.insert(
                proxy.clone(),
                models
                    .into_iter()
                    .map(|(name, totals)| totals.row(name, covered))
                    .collect(),
            );
        }
        View {
            recent_seconds: RECENT.as_secs(),
            step_seconds: STEP.as_secs(),
            mesh: mesh
                .into_iter()
                .map(|(name, totals)| totals.row(name, mesh_covered))
                .collect(),
            proxies: per_proxy,
        }
    }
}

/// The part of the recent span a proxy's summaries cover: from the start of
/// its oldest kept summary's interval (a proxy sends none while idle, so a
/// gap is time without traffic), at most [`RECENT`].
fn covered(kept: &VecDeque<Received>, now: Instant) -> Duration {
    kept.front()
        .map(|first| now.saturating_duration_since(first.at) + first.interval)
        .unwrap_or_default()
        .min(RECENT)
}

/// One model's sums over the recent span, and its requests per step.
#[derive(Debug, Default)]
struct Totals {
    requests: u64,
    failures: u64,
    input_tokens: u64,
    output_tokens: u64,
    ttft: [u64; BUCKETS],
    /// Requests per step, the most recent last.
    steps: [u64; (WINDOW.as_secs() / STEP.as_secs()) as usize],
}

impl Totals {
    fn add(&mut self, model: &ModelSummary, age: Duration) {
        let steps = self.steps.len();
        let step = (age.as_secs() / STEP.as_secs()) as usize;
        if step < steps {
            self.steps[steps - 1 - step] += model.requests;
        }
        if age >= RECENT {
            return;
        }
        self.requests += model.requests;
        self.failures += model.failures.min(model.requests);
        self.input_tokens += model.input_tokens;
        self.output_tokens += model.output_tokens;
        for (sum, count) in self.ttft.iter_mut().zip(&model.ttft_buckets) {
            *sum += count;
        }
    }

    fn row(self, model: String, covered: Duration) -> ModelRow {
        // Rates are per second of the recent span the summaries cover (a
        // proxy silent for part of it had no traffic then: summaries are
        // sent only with traffic).
        let seconds = covered.as_secs_f64().max(0.001);
        ModelRow {
            model,
            seconds: covered.as_secs_f64(),
            requests: self.requests,
            failures: self.failures,
            request_rate: self.requests as f64 / seconds,
            success_rate: (self.requests > 0)
                .then(|| (self.requests - self.failures) as f64 / self.requests as f64),
            ttft_p50_ms: percentile(&self.ttft, 0.5),
            ttft_p90_ms: percentile(&self.ttft, 0.9),
            input_tokens_per_second: self.input_tokens as f64 / seconds,
            output_tokens_per_second: self.output_tokens as f64 / seconds,
            rate_steps: self
                .steps
                .iter()
                .map(|&n| n as f64 / STEP.as_secs_f64())
                .collect(),
        }
    }
}

/// The `q` quantile of bucketed times, in milliseconds: the upper bound of
/// the bucket that holds it, interpolated linearly inside the bucket;
/// `None` without times. Times past the last bound report that bound.
pub fn percentile(buckets: &[u64], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, &count) in buckets.iter().enumerate() {
        if count > 0 && (below + count) as f64 >= rank {
            let Some(&upper) = TTFT_BOUNDS_MS.get(i) else {
                return TTFT_BOUNDS_MS.last().map(|&b| b as f64);
            };
            let lower = if i == 0 { 0 } else { TTFT_BOUNDS_MS[i - 1] };
            let within = ((rank - below as f64) / count as f64).clamp(0.0, 1.0);
            return Some(lower as f64 + within * (upper - lower) as f64);
        }
        below += count;
    }
    TTFT_BOUNDS_MS.last().map(|&b| b as f64)
}

/// What `/dashboard.json` serves (with the proxies' registry beside it).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct View {
    /// The span of rates and percentiles, in seconds.
    pub recent_seconds: u64,
    /// The width of a sparkline point, in seconds.
    pub step_seconds: u64,
    /// Per model, every proxy summed.
    pub mesh: Vec<ModelRow>,
    /// Per proxy id, per model.
    pub proxies: BTreeMap<String, Vec<ModelRow>>,
}

/// One model's figures.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelRow {
    /// The model asked for (`""`: requests without one; `other`: past a
    /// proxy's cap of names).
    pub model: String,
    /// The seconds the rates are over: the recent span, or less when the
    /// summaries began later (a proxy that just connected).
    pub seconds: f64,
    /// Requests finished in the recent span.
    pub requests: u64,
    /// Of those, the failed ones.
    pub failures: u64,
    /// Requests per second over the recent span.
    pub request_rate: f64,
    /// The share of requests that did not fail; `None` without requests.
    pub success_rate: Option<f64>,
    /// Time to first token, median, in milliseconds.
    pub ttft_p50_ms: Option<f64>,
    /// Time to first token, 90th percentile, in milliseconds.
    pub ttft_p90_ms: Option<f64>,
    /// Input tokens per second over the recent span.
    pub input_tokens_per_second: f64,
    /// Output tokens per second over the recent span.
    pub output_tokens_per_second: f64,
    /// Requests per second in each step of the kept window, oldest first.
    pub rate_steps: Vec<f64>,
}

/// The dashboard page: self-contained, it polls `/dashboard.json`.
pub const PAGE: &str = include_str!("dashboard.html");

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str, requests: u64, failures: u64, ttft: &[(usize, u64)]) -> ModelSummary {
        let mut buckets = vec![0; BUCKETS];
        for &(i, n) in ttft {
            buckets[i] = n;
        }
        ModelSummary {
            model: name.into(),
            requests,
            failures,
            ttft_buckets: buckets,
            input_tokens: requests * 10,
            output_tokens: requests * 2,
        }
    }

    fn summary(models: Vec<ModelSummary>) -> Summary {
        Summary {
            interval_ms: 5000,
            models,
        }
    }

    #[test]
    fn percentiles_interpolate_inside_their_bucket() {
        let mut buckets = [0u64; BUCKETS];
        assert_eq!(percentile(&buckets, 0.5), None);
        // 10 times in (50, 100] ms.
        buckets[4] = 10;
        assert_eq!(percentile(&buckets, 0.5), Some(75.0));
        assert_eq!(percentile(&buckets, 0.9), Some(95.0));
        // 90 fast ones below 5 ms move the median there.
        buckets[0] = 90;
        assert!(percentile(&buckets, 0.5).unwrap() <= 5.0);
        assert!(percentile(&buckets, 0.9).unwrap() <= 5.0);
        assert!(percentile(&buckets, 0.95).unwrap() > 50.0);
        // Past the last bound: the last bound.
        let mut slow = [0u64; BUCKETS];
        slow[BUCKETS - 1] = 3;
        assert_eq!(percentile(&slow, 0.5), Some(16000.0));
    }

    #[test]
    fn rates_sum_the_recent_span_per_proxy_and_for_the_mesh() {
        let figures = Figures::default();
        let start = Instant::now();
        // Two proxies, 12 summaries each of 5 s: a minute.
        for i in 0..12 {
            let at = start + Duration::from_secs(5 * i);
            figures.record_at("a", summary(vec![model("m", 30, 3, &[(4, 30)])]), at);
            figures.record_at("b", summary(vec![model("m", 30, 0, &[(4, 30)])]), at);
        }
        let view = figures.view(start + Duration::from_secs(56));
        let mesh = &view.mesh[0];
        assert_eq!((mesh.requests, mesh.failures), (720, 36));
        assert!((mesh.request_rate - 12.0).abs() < 1e-9);
        assert!((mesh.success_rate.unwrap() - 0.95).abs() < 1e-9);
        assert!((mesh.input_tokens_per_second - 120.0).abs() < 1e-9);
        assert_eq!(mesh.ttft_p50_ms, Some(75.0));
        let a = &view.proxies["a"][0];
        assert!((a.request_rate - 6.0).abs() < 1e-9);
        assert!((a.success_rate.unwrap() - 0.9).abs() < 1e-9);
        assert_eq!(view.proxies["b"][0].success_rate, Some(1.0));
        // Each 10 s step holds two summaries of both proxies: 12 req/s.
        assert_eq!(*mesh.rate_steps.last().unwrap(), 12.0);
        // A minute later, the rates fall to 0 while the sparkline keeps them.
        let later = figures.view(start + Duration::from_secs(180));
        assert_eq!(later.mesh[0].requests, 0);
        assert!(later.mesh[0].rate_steps.iter().any(|&r| r > 0.0));
    }

    #[test]
    fn a_proxy_that_just_connected_is_rated_over_the_time_it_was_heard() {
        let figures = Figures::default();
        let start = Instant::now();
        figures.record_at("new", summary(vec![model("m", 50, 0, &[])]), start);
        let view = figures.view(start + Duration::from_secs(1));
        let row = &view.proxies["new"][0];
        // 5 s of interval and 1 s since: 50 requests in 6 s, not in 60.
        assert_eq!(row.seconds, 6.0);
        assert!((row.request_rate - 50.0 / 6.0).abs() < 1e-9);
        assert_eq!(view.mesh[0].seconds, 6.0);
    }

    #[test]
    fn summaries_models_and_proxies_are_capped() {
        let figures = Figures::default();
        let start = Instant::now();
        let many = (0..MAX_MODELS as u64 + 20)
            .map(|i| model(&format!("m{i}"), i + 1, 0, &[]))
            .collect();
        figures.record_at("p", summary(many), start);
        let view = figures.view(start);
        assert_eq!(view.proxies["p"].len(), MAX_MODELS);
        // The busiest were kept.
        assert!(view.proxies["p"].iter().all(|m| m.requests > 20));
        for i in 0..MAX_SUMMARIES + 50 {
            figures.record_at(
                "p",
                summary(vec![model("m", 1, 0, &[])]),
                start + Duration::from_millis(i as u64),
            );
        }
        assert!(figures.proxies.lock()["p"].len() <= MAX_SUMMARIES);
        // Old summaries leave the window.
        figures.record_at(
            "p",
            summary(vec![model("m", 1, 0, &[])]),
            start + WINDOW + Duration::from_secs(10),
        );
        assert_eq!(figures.proxies.lock()["p"].len(), 1);
        for i in 0..MAX_PROXIES + 5 {
            figures.record_at(
                &format!("proxy-{i}"),
                summary(vec![model("m", 1, 0, &[])]),
                start + WINDOW + Duration::from_secs(20 + i as u64),
            );
        }
        let proxies = figures.proxies.lock();
        assert_eq!(proxies.len(), MAX_PROXIES);
        assert!(
            proxies.contains_key(&format!("proxy-{}", MAX_PROXIES + 4)),
            "the newest proxy is kept"
        );
        assert!(
            !proxies.contains_key("p"),
            "the proxy heard from longest ago went first"
        );
    }
}
