//! Checks of a route's `retries`.

use crate::policy::RetryPolicy;

/// `retries.maxAttempts` bounds: more than 10 attempts only deepen an outage.
const MAX_ATTEMPTS: u32 = 10;
/// `retries.maxReplayBytes` bound: each retried request may hold this much.
const MAX_REPLAY_BYTES: u32 = 16 * 1024 * 1024;

/// Where in `retries` a problem is.
#[derive(Debug, PartialEq)]
pub(super) enum RetryField {
    /// A field of `retries`.
    Key(&'static str),
    /// A field of `retries.budget`.
    Budget(&'static str),
    /// An item of `retries.on.statuses`.
    Status(usize),
}

/// What is wrong with a retry policy: bounds, and settings that could never
/// take effect. `first_byte` is the route's `timeouts.firstByte`.
pub(super) fn retry_problems(
    retries: &RetryPolicy,
    first_byte: Option<std::time::Duration>,
) -> Vec<(RetryField, String)> {
    let mut problems = Vec::new();
    if !(2..=MAX_ATTEMPTS).contains(&retries.max_attempts) {
        problems.push((
            RetryField::Key("maxAttempts"),
            format!(
                "`maxAttempts` counts the first attempt too: it must be between 2 and {MAX_ATTEMPTS}, found {} (remove `retries` to turn retries off)",
                retries.max_attempts
            ),
        ));
    }
    for (i, &status) in retries.on.statuses.iter().enumerate() {
        if !(status == 408 || status == 429 || (500..=599).contains(&status)) {
            problems.push((
                RetryField::Status(i),
                format!("status {status} cannot be retried: list 408, 429 or a 5xx status"),
            ));
        }
    }
    if let (Some(per_try), Some(first_byte)) = (retries.per_try_timeout, first_byte) {
        if per_try >= first_byte {
            problems.push((
                RetryField::Key("perTryTimeout"),
                format!(
                    "`perTryTimeout` ({}ms) must be shorter than the route's `timeouts.firstByte` ({}ms), which bounds every attempt together",
                    per_try.as_millis(),
                    first_byte.as_millis()
                ),
            ));
        }
    }
    if retries.backoff_base.is_zero() || retries.backoff_base > retries.backoff_max {
        problems.push((
            RetryField::Key("backoffBase"),
            format!(
                "`backoffBase` ({}ms) must be above zero and at most `backoffMax` ({}ms)",
                retries.backoff_base.as_millis(),
                retries.backoff_max.as_millis()
            ),
        ));
    }
    if retries.max_replay_bytes > MAX_REPLAY_BYTES {
        problems.push((
            RetryField::Key("maxReplayBytes"),
            format!(
                "`maxReplayBytes` must be at most {MAX_REPLAY_BYTES} (16 MiB), found {}",
                retries.max_replay_bytes
            ),
        ));
    }
    let ratio = retries.budget.ratio;
    if !(0.0..=1.0).contains(&ratio) {
        problems.push((
            RetryField::Budget("ratio"),
            format!(
                "budget `ratio` must be between 0 and 1 (retries per request sent), found {ratio}"
            ),
        ));
    }
    if retries.budget.min_per_second > 1000 {
        problems.push((
            RetryField::Budget("minPerSecond"),
            format!(
                "budget `minPerSecond` must be at most 1000, found {}",
                retries.budget.min_per_second
            ),
        ));
    }
    problems
}
