//! A route's `rateLimits`: token buckets per key, for requests per second
//! and model tokens per minute.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One rate limit of a route: token buckets kept per key, for requests per
/// second, model tokens per minute, or both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitPolicy {
    /// What buckets are kept per: `route` (one for the whole route),
    /// `caller` (the caller's mesh identity; callers without one share a
    /// bucket) or `{header: NAME}` (each value of a request header; requests
    /// without it share a bucket).
    #[serde(default)]
    pub key: RateLimitKey,
    /// Requests allowed per second, on average.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<f64>,
    /// Requests allowed at once above the rate; `requestsPerSecond`
    /// rounded up (at least 1) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Model tokens (input and output) allowed per minute. Each request is
    /// charged an estimate up front (body bytes / 4 plus `max_tokens` or
    /// `max_completion_tokens`), corrected to the response's
    /// `usage.total_tokens` when it ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    /// Model tokens allowed at once; `tokensPerMinute` when absent. A
    /// request estimated above it is charged this much.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_burst: Option<u64>,
    /// Most keys (callers, header values) with a bucket of their own at
    /// once; past it, buckets that have refilled are dropped, and new keys
    /// share one bucket until some are.
    #[serde(default = "defaults::max_keys")]
    pub max_keys: u32,
}

/// What a rate limit keeps its buckets per.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum RateLimitKey {
    /// One bucket for the whole route.
    Route,
    /// One bucket per caller mesh identity.
    #[default]
    Caller,
    /// One bucket per value of this request header.
    Header(String),
}

mod defaults {
    pub fn max_keys() -> u32 {
        10_000
    }
}
