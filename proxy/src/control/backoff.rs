//! Reconnect delays: exponential back-off with full jitter.
//!
//! The ceiling doubles with every failure up to a cap, and each delay is
//! drawn uniformly below it ("full jitter"), so a thousand proxies cut off
//! by the same control-plane restart do not all come back in the same
//! millisecond.

use std::time::Duration;

/// Delays between attempts to reach the control plane.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
}

impl Backoff {
    /// Starts at `base`, doubling up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
            failures: 0,
        }
    }

    /// The longest the next delay can be.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The delay before the next attempt, drawn in `[0, ceiling]`; raises the
    /// ceiling for the attempt after.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling().as_millis() as u64;
        self.next_with(fastrand::u64(..=ceiling))
    }

    /// [`Backoff::next_delay`] with the random draw given, in milliseconds
    /// (clamped to the ceiling).
    pub fn next_with(&mut self, draw_ms: u64) -> Duration {
        let delay = Duration::from_millis(draw_ms).min(self.ceiling());
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// Back to `base`, after the control plane answered.
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
        let mut backoff = Backoff::new(ms(100), Duration::from_secs(10));
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            ceilings.push(backoff.ceiling().as_millis());
            backoff.next_with(0);
        }
        assert_eq!(
            ceilings,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
    }

    #[test]
    fn delays_are_drawn_below_the_ceiling() {
        let mut backoff = Backoff::new(ms(100), Duration::from_secs(10));
        assert_eq!(backoff.next_with(50), ms(50));
        assert_eq!(backoff.next_with(5_000), ms(200), "clamped to the ceiling");
        for _ in 0..1000 {
            let ceiling = backoff.ceiling();
            assert!(backoff.next_delay() <= ceiling);
        }
    }

    #[test]
    fn reset_returns_to_the_base() {
        let mut backoff = Backoff::new(ms(100), Duration::from_secs(10));
        for _ in 0..5 {
            backoff.next_delay();
        }
        backoff.reset();
        assert_eq!(backoff.ceiling(), ms(100));
    }

    #[test]
    fn many_failures_neither_overflow_nor_pass_the_cap() {
        let mut backoff = Backoff::new(ms(100), Duration::from_secs(10));
        for _ in 0..100_000 {
            backoff.next_with(u64::MAX);
        }
        assert_eq!(backoff.ceiling(), Duration::from_secs(10));
        assert_eq!(backoff.next_with(u64::MAX), Duration::from_secs(10));
    }
}
