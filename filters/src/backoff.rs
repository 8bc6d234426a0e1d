//! Back-off with jitter: the one schedule of waits between attempts that
//! every retry loop of the mesh uses — the retry filter between attempts of
//! a request, the proxy between reconnects to the control plane and between
//! requests for a certificate.
//!
//! The ceiling of the `n`-th wait is `base × 2ⁿ⁻¹`, capped, and the wait is
//! drawn at random below it, in one of the two ways the AWS Architecture
//! Blog ("Exponential Backoff And Jitter") names:
//!
//! - [`Jitter::Full`]: anywhere in `[0, ceiling]`. It spreads a crowd the
//!   most, which is what a thousand proxies cut off by one control-plane
//!   restart need.
//! - [`Jitter::Equal`]: in `[ceiling / 2, ceiling]`. Half the spread, but a
//!   floor: a retried request or a renewal never comes straight back to a
//!   server that has just failed.
//!
//! Without jitter, clients that failed together retry together, and a
//! server that comes back meets all of them in the same instant.
//!
//! [`Backoff`] is the schedule, a pure function of the wait's number and a
//! random draw, so its figures are tested exactly; [`BackoffState`] carries
//! a loop's count of failures and its own random source.
//!
//! ```
//! use std::time::Duration;
//! use infermesh_filters::backoff::{Backoff, BackoffState, Jitter};
//!
//! let schedule = Backoff::new(Duration::from_millis(100), Duration::from_secs(10), Jitter::Full);
//! assert_eq!(schedule.ceiling(3), Duration::from_millis(400));
//! assert_eq!(schedule.delay(3, 0.5), Duration::from_millis(200));
//!
//! let mut reconnect = BackoffState::new(schedule);
//! let first = reconnect.next_delay();
//! assert!(first <= Duration::from_millis(100));
//! reconnect.reset(); // after a success
//! ```

use std::time::Duration;

/// How a wait is drawn below its ceiling (AWS Architecture Blog terms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Uniform in `[0, ceiling]`.
    Full,
    /// Half the ceiling plus a uniform draw over the other half:
    /// `[ceiling / 2, ceiling]`.
    Equal,
}

impl Jitter {
    /// The wait for `ceiling` and a `draw` in `[0, 1]` (clamped; NaN counts
    /// as 0).
    pub fn apply(self, ceiling: Duration, draw: f64) -> Duration {
        let draw = if draw.is_nan() {
            0.0
        } else {
            draw.clamp(0.0, 1.0)
        };
        let share = match self {
            Jitter::Full => draw,
            Jitter::Equal => 0.5 + 0.5 * draw,
        };
        // `Duration::mul_f64` computed without its panic: a share of a
        // ceiling near `Duration::MAX` may round above it.
        Duration::try_from_secs_f64(share * ceiling.as_secs_f64())
            .map_or(ceiling, |d| d.min(ceiling))
    }
}

/// Exponential back-off with a cap and jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    jitter: Jitter,
}

impl Backoff {
    /// Ceilings start at `base` and double up to `cap` (at least `base`).
    pub const fn new(base: Duration, cap: Duration, jitter: Jitter) -> Self {
        // `Ord::max` is not `const`.
        let cap = if cap.as_nanos() < base.as_nanos() {
            base
        } else {
            cap
        };
        Self { base, cap, jitter }
    }

    /// The shortest ceiling.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The longest ceiling.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// The ceiling of wait number `wait` (1 for the first; 0 counts as 1).
    pub fn ceiling(&self, wait: u32) -> Duration {
        let doublings = wait.saturating_sub(1).min(31);
        self.base.saturating_mul(1u32 << doublings).min(self.cap)
    }

    /// Wait number `wait`, for a random `draw` in `[0, 1]`.
    pub fn delay(&self, wait: u32, draw: f64) -> Duration {
        self.jitter.apply(self.ceiling(wait), draw)
    }

    /// [`Backoff::delay`] with the ceiling lowered to `limit`, but never
    /// below `base`: for a loop that must act before a deadline.
    pub fn delay_within(&self, wait: u32, limit: Duration, draw: f64) -> Duration {
        let ceiling = self.ceiling(wait).min(limit).max(self.base);
        self.jitter.apply(ceiling, draw)
    }
}

/// A retry loop's back-off: consecutive failures so far, and a random
/// source of its own.
#[derive(Debug, Clone)]
pub struct BackoffState {
    schedule: Backoff,
    failures: u32,
    rng: fastrand::Rng,
}

impl BackoffState {
    /// No failures yet; draws seeded from the thread's generator, so two
    /// loops (or two processes) draw different waits.
    pub fn new(schedule: Backoff) -> Self {
        Self::with_rng(schedule, fastrand::Rng::new())
    }

    /// With a given random source (a seeded one in tests).
    pub fn with_rng(schedule: Backoff, rng: fastrand::Rng) -> Self {
        Self {
            schedule,
            failures: 0,
            rng,
        }
    }

    /// The schedule followed.
    pub fn schedule(&self) -> &Backoff {
        &self.schedule
    }

    /// Failures since the start or the last [`BackoffState::reset`].
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The longest the next wait can be.
    pub fn ceiling(&self) -> Duration {
        self.schedule.ceiling(self.failures.saturating_add(1))
    }

    /// The wait after one more failure.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_within(Duration::MAX)
    }

    /// The wait after one more failure, its ceiling lowered to `limit`
    /// (never below the base), as [`Backoff::delay_within`].
    pub fn next_delay_within(&mut self, limit: Duration) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.schedule
            .delay_within(self.failures, limit, self.rng.f64())
    }

    /// Back to the base, after a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_ceiling_doubles_from_the_base_up_to_the_cap() {
        let schedule = Backoff::new(ms(100), Duration::from_secs(10), Jitter::Full);
        let ceilings: Vec<u128> = (1..=10)
            .map(|wait| schedule.ceiling(wait).as_millis())
            .collect();
        assert_eq!(
            ceilings,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
        assert_eq!(schedule.ceiling(0), ms(100), "0 counts as the first");
    }

    #[test]
    fn full_jitter_draws_anywhere_below_the_ceiling() {
        let schedule = Backoff::new(ms(100), Duration::from_secs(10), Jitter::Full);
        assert_eq!(schedule.delay(1, 0.0), Duration::ZERO);
        assert_eq!(schedule.delay(1, 0.5), ms(50));
        assert_eq!(schedule.delay(1, 1.0), ms(100));
        assert_eq!(schedule.delay(3, 0.25), ms(100));
    }

    #[test]
    fn equal_jitter_draws_between_half_and_all_of_the_ceiling() {
        let schedule = Backoff::new(ms(100), ms(350), Jitter::Equal);
        assert_eq!(schedule.delay(1, 0.0), ms(50));
        assert_eq!(schedule.delay(1, 1.0), ms(100));
        assert_eq!(schedule.delay(2, 0.5), ms(150));
        assert_eq!(schedule.delay(3, 1.0), ms(350));
        assert_eq!(schedule.delay(3, 0.0), ms(175));
    }

    #[test]
    fn draws_out_of_range_are_clamped() {
        let schedule = Backoff::new(ms(100), Duration::from_secs(10), Jitter::Full);
        assert_eq!(schedule.delay(1, 5.0), ms(100));
        assert_eq!(schedule.delay(1, -1.0), Duration::ZERO);
        assert_eq!(schedule.delay(1, f64::NAN), Duration::ZERO);
        assert_eq!(schedule.delay(1, f64::INFINITY), ms(100));
    }

    #[test]
    fn a_cap_below_the_base_is_raised_to_it() {
        let schedule = Backoff::new(ms(100), ms(10), Jitter::Equal);
        assert_eq!(schedule.cap(), ms(100));
        assert_eq!(schedule.ceiling(5), ms(100));
    }

    #[test]
    fn a_limit_lowers_the_ceiling_but_not_below_the_base() {
        let schedule = Backoff::new(ms(200), Duration::from_secs(30), Jitter::Equal);
        // The sixth ceiling is 6.4 s; a 1 s limit wins.
        assert_eq!(
            schedule.delay_within(6, Duration::from_secs(1), 1.0),
            ms(1000)
        );
        assert_eq!(
            schedule.delay_within(6, Duration::from_secs(1), 0.0),
            ms(500)
        );
        // A limit below the base leaves the base.
        assert_eq!(schedule.delay_within(6, ms(10), 1.0), ms(200));
        // A limit above the ceiling changes nothing.
        assert_eq!(
            schedule.delay_within(2, Duration::MAX, 0.5),
            schedule.delay(2, 0.5)
        );
    }

    #[test]
    fn many_failures_neither_overflow_nor_pass_the_cap() {
        let schedule = Backoff::new(ms(100), Duration::from_secs(10), Jitter::Full);
        assert_eq!(schedule.ceiling(u32::MAX), Duration::from_secs(10));
        assert_eq!(schedule.delay(u32::MAX, 1.0), Duration::from_secs(10));
        let huge = Backoff::new(Duration::MAX / 2, Duration::MAX, Jitter::Equal);
        assert_eq!(huge.ceiling(40), Duration::MAX);
        assert_eq!(huge.delay(40, 1.0), Duration::MAX);
        let mut state = BackoffState::with_rng(schedule, fastrand::Rng::with_seed(7));
        for _ in 0..100_000 {
            assert!(state.next_delay() <= Duration::from_secs(10));
        }
        assert_eq!(state.ceiling(), Duration::from_secs(10));
    }

    #[test]
    fn the_state_grows_with_failures_and_resets_to_the_base() {
        let schedule = Backoff::new(ms(100), Duration::from_secs(10), Jitter::Full);
        let mut state = BackoffState::with_rng(schedule, fastrand::Rng::with_seed(1));
        let mut ceilings = Vec::new();
        for _ in 0..5 {
            let ceiling = state.ceiling();
            ceilings.push(ceiling.as_millis());
            assert!(state.next_delay() <= ceiling);
        }
        assert_eq!(ceilings, [100, 200, 400, 800, 1600]);
        assert_eq!(state.failures(), 5);
        state.reset();
        assert_eq!(state.failures(), 0);
        assert_eq!(state.ceiling(), ms(100));
        assert!(state.next_delay() <= ms(100));
    }

    #[test]
    fn two_loops_that_fail_together_do_not_wait_together() {
        let schedule = Backoff::new(ms(100), Duration::from_secs(10), Jitter::Full);
        let mut a = BackoffState::with_rng(schedule, fastrand::Rng::with_seed(1));
        let mut b = BackoffState::with_rng(schedule, fastrand::Rng::with_seed(2));
        let a: Vec<Duration> = (0..8).map(|_| a.next_delay()).collect();
        let b: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert_ne!(a, b);
        // Unseeded states, as two proxies start them, differ too.
        let mut c = BackoffState::new(schedule);
        let mut d = BackoffState::new(schedule);
        let c: Vec<Duration> = (0..8).map(|_| c.next_delay()).collect();
        let d: Vec<Duration> = (0..8).map(|_| d.next_delay()).collect();
        assert_ne!(c, d);
    }

    /// A thousand loops failing at once: their first waits cover the whole
    /// jitter window instead of piling up at one instant.
    fn first_waits(jitter: Jitter) -> Vec<Duration> {
        let schedule = Backoff::new(ms(1000), Duration::from_secs(10), jitter);
        (0..1000u64)
            .map(|seed| {
                BackoffState::with_rng(schedule, fastrand::Rng::with_seed(seed)).next_delay()
            })
            .collect()
    }

    /// How many of ten equal slices of `[low, high]` hold at least `min` waits.
    fn slices_filled(waits: &[Duration], low: Duration, high: Duration, min: usize) -> usize {
        let width = (high - low) / 10;
        (0..10u32)
            .filter(|&i| {
                let start = low + width * i;
                let end = start + width;
                waits.iter().filter(|&&w| w >= start && w <= end).count() >= min
            })
            .count()
    }

    #[test]
    fn full_jitter_spreads_a_crowd_over_the_whole_window() {
        let waits = first_waits(Jitter::Full);
        assert!(waits.iter().all(|&w| w <= ms(1000)));
        // Uniform: about 100 per slice; 50 leaves room for chance.
        assert_eq!(slices_filled(&waits, Duration::ZERO, ms(1000), 50), 10);
    }

    #[test]
    fn equal_jitter_spreads_a_crowd_over_the_upper_half() {
        let waits = first_waits(Jitter::Equal);
        assert!(waits.iter().all(|&w| w >= ms(500) && w <= ms(1000)));
        assert_eq!(slices_filled(&waits, ms(500), ms(1000), 50), 10);
    }
}
