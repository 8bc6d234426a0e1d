//! Checks of a route's `rateLimits`.

use crate::policy::load::check::format::header_name_problem;
use crate::policy::{RateLimitKey, RateLimitPolicy};

/// Rate-limit bounds: past a million requests a second one sidecar's bucket
/// means nothing; a million keys of buckets is tens of megabytes.
const MAX_REQUESTS_PER_SECOND: f64 = 1_000_000.0;
const MAX_RATE_LIMIT_KEYS: u32 = 1_000_000;

/// What is wrong with a rate limit, by field (`None`: the limit as a whole).
pub(super) fn rate_limit_problems(limit: &RateLimitPolicy) -> Vec<(Option<&'static str>, String)> {
    let mut problems = Vec::new();
    if limit.requests_per_second.is_none() && limit.tokens_per_minute.is_none() {
        problems.push((
            None,
            "a rate limit needs `requestsPerSecond`, `tokensPerMinute` or both".to_owned(),
        ));
    }
    if let Some(rate) = limit.requests_per_second {
        if !(rate > 0.0 && rate <= MAX_REQUESTS_PER_SECOND) {
            problems.push((
                Some("requestsPerSecond"),
                format!("`requestsPerSecond` must be above 0 and at most {MAX_REQUESTS_PER_SECOND}, found {rate}"),
            ));
        }
    }
    match (limit.burst, limit.requests_per_second) {
        (Some(_), None) => problems.push((
            Some("burst"),
            "`burst` is the most requests at once above `requestsPerSecond`, which is not set"
                .to_owned(),
        )),
        (Some(0), Some(_)) => problems.push((
            Some("burst"),
            "`burst` must be at least 1: a bucket that holds nothing refuses every request"
                .to_owned(),
        )),
        _ => {}
    }
    if limit.tokens_per_minute == Some(0) {
        problems.push((
            Some("tokensPerMinute"),
            "`tokensPerMinute` must be above 0 (remove the limit to turn it off)".to_owned(),
        ));
    }
    match (limit.token_burst, limit.tokens_per_minute) {
        (Some(_), None) => problems.push((
            Some("tokenBurst"),
            "`tokenBurst` is the most tokens at once under `tokensPerMinute`, which is not set"
                .to_owned(),
        )),
        (Some(0), Some(_)) => problems.push((
            Some("tokenBurst"),
            "`tokenBurst` must be at least 1: a bucket that holds nothing refuses every request"
                .to_owned(),
        )),
        _ => {}
    }
    if !(1..=MAX_RATE_LIMIT_KEYS).contains(&limit.max_keys) {
        problems.push((
            Some("maxKeys"),
            format!(
                "`maxKeys` must be between 1 and {MAX_RATE_LIMIT_KEYS}, found {}",
                limit.max_keys
            ),
        ));
    }
    if let RateLimitKey::Header(name) = &limit.key {
        if let Some(problem) = header_name_problem(name) {
            problems.push((Some("key"), problem));
        }
    }
    problems
}
