//! Outlier ejection: the per-endpoint circuit breaker.
//!
//! Each endpoint of a backend with `outlierDetection` keeps a small state
//! machine, [`Health`]. Failures in a row, or a failure rate over a sliding
//! window, trip it; the backend then ejects the endpoint unless that would
//! put more than its maximum share of endpoints out ([`may_eject`]). An
//! ejected endpoint gets no traffic until its ejection is over; then the
//! next request the balancer makes is sent to it as the one probe (no other
//! request goes to it meanwhile), whose outcome re-admits or re-ejects it.
//! Each ejection in a row lasts longer (base × count, capped), and the count
//! is forgotten once the endpoint has stayed in for the longest ejection.
//!
//! Everything here is plain data and decisions over an explicit `now`; the
//! balancer and the forwarding code hold it behind a per-endpoint lock.

use std::time::{Duration, Instant};

use infermesh_proto::policy::OutlierDetection;

/// Buckets of the failure-rate window: the window slides by a tenth.
const BUCKETS: usize = 10;

/// A backend's ejection settings, as the request path uses them.
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierPolicy {
    /// Failures in a row that trip the breaker; 0 for none.
    pub consecutive_failures: u32,
    /// Failure-rate trip, when set.
    pub failure_rate: Option<RatePolicy>,
    /// First ejection's length.
    pub base_ejection: Duration,
    /// Longest ejection.
    pub max_ejection: Duration,
    /// Most endpoints ejected at once, in percent of the backend's endpoints.
    pub max_ejected_percent: u32,
}

/// The failure-rate trip.
#[derive(Debug, Clone, PartialEq)]
pub struct RatePolicy {
    /// Share of failures (0 to 1] that trips.
    pub threshold: f64,
    /// Requests needed in the window before the rate counts.
    pub min_requests: u32,
    /// Length of the window.
    pub window: Duration,
}

impl From<&OutlierDetection> for OutlierPolicy {
    fn from(spec: &OutlierDetection) -> Self {
        Self {
            consecutive_failures: spec.consecutive_failures,
            failure_rate: spec.failure_rate.as_ref().map(|rate| RatePolicy {
                threshold: rate.threshold,
                min_requests: rate.min_requests,
                window: rate.window,
            }),
            base_ejection: spec.base_ejection,
            max_ejection: spec.max_ejection,
            max_ejected_percent: spec.max_ejected_percent,
        }
    }
}

/// Whether one more endpoint may be ejected when `ejected` of `total` are
/// out already: never past the maximum share, rounded down (two endpoints
/// at 50% allow one; a lone endpoint is ejected only at 100%).
pub fn may_eject(policy: &OutlierPolicy, ejected: usize, total: usize) -> bool {
    let allowed = total * policy.max_ejected_percent.min(100) as usize / 100;
    ejected < allowed
}

/// Why an endpoint was ejected; the `reason` label of the ejection counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trip {
    /// `consecutiveFailures` failures in a row.
    Consecutive,
    /// The failure rate over the window passed its threshold.
    FailureRate,
    /// The probe after an ejection failed.
    ProbeFailed,
}

impl Trip {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Trip::Consecutive => "consecutive_failures",
            Trip::FailureRate => "failure_rate",
            Trip::ProbeFailed => "probe_failed",
        }
    }
}

/// What became of an endpoint after its probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeVerdict {
    /// The probe succeeded: the endpoint takes traffic again.
    Readmitted,
    /// The probe failed: ejected again, for this long.
    Ejected(Duration),
    /// The endpoint was not probing (a late outcome); nothing changed.
    Ignored,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Takes traffic.
    Active,
    /// Out of the balancer until `until`.
    Ejected { until: Instant },
    /// Half-open: one probe request is in flight.
    Probing,
}

/// One endpoint's breaker.
#[derive(Debug, Clone)]
pub struct Health {
    state: State,
    consecutive: u32,
    window: Window,
    /// Ejections in a row, which lengthen the next one.
    ejections: u32,
    /// When the endpoint last came back (or was created).
    active_since: Instant,
}

impl Health {
    /// A healthy endpoint, as of `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            state: State::Active,
            consecutive: 0,
            window: Window::new(now),
            ejections: 0,
            active_since: now,
        }
    }

    /// Whether the endpoint is out of the balancer (ejected, or probing).
    pub fn is_ejected(&self) -> bool {
        self.state != State::Active
    }

    /// Ejections in a row so far.
    pub fn ejections(&self) -> u32 {
        self.ejections
    }

    /// Claims the one probe of an ejected endpoint whose ejection is over:
    /// true at most once until the probe's outcome (or abandonment).
    pub fn try_probe(&mut self, now: Instant) -> bool {
        match self.state {
            State::Ejected { until } if now >= until => {
                self.state = State::Probing;
                true
            }
            _ => false,
        }
    }

    /// Records the outcome of a request sent while the endpoint was in,
    /// and says whether the breaker trips. Outcomes of requests that were
    /// sent before an ejection and end after it are ignored.
    pub fn record(&mut self, policy: &OutlierPolicy, now: Instant, failed: bool) -> Option<Trip> {
        if self.state != State::Active {
            return None;
        }
        if let Some(rate) = &policy.failure_rate {
            self.window.record(rate.window, now, failed);
        }
        if !failed {
            self.consecutive = 0;
            return None;
        }
        self.consecutive = self.consecutive.saturating_add(1);
        if policy.consecutive_failures > 0 && self.consecutive >= policy.consecutive_failures {
            return Some(Trip::Consecutive);
        }
        let rate = policy.failure_rate.as_ref()?;
        let (failures, total) = self.window.counts(rate.window, now);
        (total >= u64::from(rate.min_requests)
            && total > 0
            && failures as f64 >= rate.threshold * total as f64)
            .then_some(Trip::FailureRate)
    }

    /// Ejects the endpoint (the caller checked the backend's share) and
    /// returns for how long.
    pub fn eject(&mut self, policy: &OutlierPolicy, now: Instant) -> Duration {
        if self.state == State::Active
            && now.saturating_duration_since(self.active_since) >= policy.max_ejection
        {
            // In long enough to start over: an old outage does not lengthen
            // a new ejection.
            self.ejections = 0;
        }
        self.ejections = self.ejections.saturating_add(1);
        let length = policy
            .base_ejection
            .saturating_mul(self.ejections)
            .min(policy.max_ejection);
        self.state = State::Ejected {
            // `maxEjection` may be any duration: one past the clock's end
            // ejects for decades rather than overflowing.
            until: infermesh_filters::timeout::std_deadline(now, length),
        };
        self.consecutive = 0;
        self.window = Window::new(now);
        length
    }

    /// Records the probe's outcome.
    pub fn probe_result(
        &mut self,
        policy: &OutlierPolicy,
        now: Instant,
        failed: bool,
    ) -> ProbeVerdict {
        if self.state != State::Probing {
            return ProbeVerdict::Ignored;
        }
        if failed {
            ProbeVerdict::Ejected(self.eject(policy, now))
        } else {
            self.state = State::Active;
            self.active_since = now;
            self.consecutive = 0;
            self.window = Window::new(now);
            ProbeVerdict::Readmitted
        }
    }

    /// The probe ended without an outcome (cancelled, say): the next
    /// request may probe instead.
    pub fn probe_abandoned(&mut self, now: Instant) {
        if self.state == State::Probing {
            self.state = State::Ejected { until: now };
        }
    }
}

/// Requests and failures over a sliding window, in [`BUCKETS`] buckets.
#[derive(Debug, Clone)]
struct Window {
    origin: Instant,
    /// `(bucket number since origin, requests, failures)`.
    buckets: [(u64, u32, u32); BUCKETS],
}

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            origin: now,
            buckets: [(u64::MAX, 0, 0); BUCKETS],
        }
    }

    fn bucket_of(&self, window: Duration, now: Instant) -> u64 {
        let width = (window / BUCKETS as u32).max(Duration::from_millis(1));
        (now.saturating_duration_since(self.origin).as_nanos() / width.as_nanos()) as u64
    }

    fn record(&mut self, window: Duration, now: Instant, failed: bool) {
        let number = self.bucket_of(window, now);
        let bucket = &mut self.buckets[(number % BUCKETS as u64) as usize];
        if bucket.0 != number {
            *bucket = (number, 0, 0);
        }
        bucket.1 = bucket.1.saturating_add(1);
        bucket.2 = bucket.2.saturating_add(u32::from(failed));
    }

    /// `(failures, requests)` in the window ending at `now`.
    fn counts(&self, window: Duration, now: Instant) -> (u64, u64) {
        let current = self.bucket_of(window, now);
        self.buckets
            .iter()
            .filter(|(number, _, _)| {
                *number != u64::MAX && *number <= current && current - number < BUCKETS as u64
            })
            .fold((0, 0), |(failures, total), (_, requests, failed)| {
                (failures + u64::from(*failed), total + u64::from(*requests))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> OutlierPolicy {
        OutlierPolicy {
            consecutive_failures: 3,
            failure_rate: None,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(25),
            max_ejected_percent: 50,
        }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn consecutive_failures_trip_and_a_success_resets_the_count() {
        let t0 = Instant::now();
        let mut health = Health::new(t0);
        let p = policy();
        assert_eq!(health.record(&p, t0, true), None);
        assert_eq!(health.record(&p, t0, true), None);
        assert_eq!(health.record(&p, t0, false), None);
        assert_eq!(health.record(&p, t0, true), None);
        assert_eq!(health.record(&p, t0, true), None);
        assert_eq!(health.record(&p, t0, true), Some(Trip::Consecutive));
    }

    #[test]
    fn an_ejected_endpoint_is_probed_once_after_its_ejection() {
        let t0 = Instant::now();
        let p = policy();
        let mut health = Health::new(t0);
        assert_eq!(health.eject(&p, t0), secs(10));
        assert!(health.is_ejected());
        assert!(!health.try_probe(t0 + secs(9)), "still ejected");
        assert!(health.try_probe(t0 + secs(10)));
        assert!(!health.try_probe(t0 + secs(11)), "one probe at a time");
        assert!(health.is_ejected(), "probing is still out of the balancer");
        assert_eq!(
            health.probe_result(&p, t0 + secs(11), false),
            ProbeVerdict::Readmitted
        );
        assert!(!health.is_ejected());
    }

    #[test]
    fn an_ejection_longer_than_the_clock_can_count_lasts_without_overflow() {
        let t0 = Instant::now();
        let p = OutlierPolicy {
            base_ejection: Duration::MAX,
            max_ejection: Duration::MAX,
            ..policy()
        };
        let mut health = Health::new(t0);
        assert_eq!(health.eject(&p, t0), Duration::MAX);
        assert!(!health.try_probe(t0 + secs(86_400 * 365)));
    }

    #[test]
    fn each_ejection_in_a_row_lasts_longer_up_to_the_maximum() {
        let t0 = Instant::now();
        let p = policy();
        let mut health = Health::new(t0);
        assert_eq!(health.eject(&p, t0), secs(10));
        assert!(health.try_probe(t0 + secs(10)));
        assert_eq!(
            health.probe_result(&p, t0 + secs(10), true),
            ProbeVerdict::Ejected(secs(20))
        );
        assert!(health.try_probe(t0 + secs(30)));
        assert_eq!(
            health.probe_result(&p, t0 + secs(30), true),
            ProbeVerdict::Ejected(secs(25)),
            "capped at maxEjection"
        );
        // Re-admitted, then failing again soon: the count goes on.
        assert!(health.try_probe(t0 + secs(55)));
        health.probe_result(&p, t0 + secs(55), false);
        assert_eq!(health.eject(&p, t0 + secs(60)), secs(25));
        // In for longer than the longest ejection: it starts over.
        assert!(health.try_probe(t0 + secs(85)));
        health.probe_result(&p, t0 + secs(85), false);
        assert_eq!(health.eject(&p, t0 + secs(85) + secs(25)), secs(10));
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_request_probe() {
        let t0 = Instant::now();
        let p = policy();
        let mut health = Health::new(t0);
        health.eject(&p, t0);
        assert!(health.try_probe(t0 + secs(10)));
        health.probe_abandoned(t0 + secs(11));
        assert!(health.try_probe(t0 + secs(11)));
    }

    #[test]
    fn outcomes_of_requests_sent_before_an_ejection_are_ignored() {
        let t0 = Instant::now();
        let p = policy();
        let mut health = Health::new(t0);
        health.eject(&p, t0);
        assert_eq!(health.record(&p, t0, true), None);
        assert_eq!(health.record(&p, t0, false), None);
        assert!(health.is_ejected());
        assert_eq!(
            health.probe_result(&p, t0, false),
            ProbeVerdict::Ignored,
            "not probing"
        );
    }

    #[test]
    fn the_failure_rate_trips_only_past_the_minimum_requests() {
        let t0 = Instant::now();
        let p = OutlierPolicy {
            consecutive_failures: 0,
            failure_rate: Some(RatePolicy {
                threshold: 0.5,
                min_requests: 10,
                window: secs(10),
            }),
            ..policy()
        };
        let mut health = Health::new(t0);
        // Alternating: never three in a row, but half of them fail.
        let mut tripped = None;
        for i in 0..10 {
            tripped = health.record(&p, t0 + Duration::from_millis(i * 100), i % 2 == 1);
            if i < 9 {
                assert_eq!(tripped, None, "request {i}");
            }
        }
        assert_eq!(tripped, Some(Trip::FailureRate));
    }

    #[test]
    fn old_failures_slide_out_of_the_window() {
        let t0 = Instant::now();
        let p = OutlierPolicy {
            consecutive_failures: 0,
            failure_rate: Some(RatePolicy {
                threshold: 0.5,
                min_requests: 4,
                window: secs(10),
            }),
            ..policy()
        };
        let mut health = Health::new(t0);
        for _ in 0..3 {
            assert_eq!(health.record(&p, t0, true), None, "below the minimum");
        }
        // Eleven seconds later those three are gone: the rate counts only
        // the recent requests.
        let later = t0 + secs(11);
        for _ in 0..3 {
            assert_eq!(health.record(&p, later, false), None);
        }
        assert_eq!(health.record(&p, later, true), None);
        assert_eq!(health.record(&p, later, true), None, "two in five");
        assert_eq!(health.record(&p, later, true), Some(Trip::FailureRate));
    }

    #[test]
    fn the_ejected_share_is_never_passed() {
        let p = policy();
        assert!(may_eject(&p, 0, 2));
        assert!(!may_eject(&p, 1, 2));
        assert!(!may_eject(&p, 0, 1), "a lone endpoint stays at 50%");
        assert!(may_eject(&p, 1, 4));
        assert!(!may_eject(&p, 2, 4));
        let all = OutlierPolicy {
            max_ejected_percent: 100,
            ..policy()
        };
        assert!(may_eject(&all, 0, 1));
        assert!(may_eject(&all, 1, 2));
        assert!(!may_eject(&all, 2, 2));
    }
}
