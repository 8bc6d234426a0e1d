//! A route's `retries`: which failures are tried again, how long to wait
//! between attempts, and the budget that keeps retries from multiplying an
//! outage.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::duration;

/// Retries of a route. An attempt is retried only while nothing of its
/// response has reached the client, so a retry never duplicates a token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryPolicy {
    /// Most attempts per request, the first one included (2 to 10).
    #[serde(default = "defaults::retry_attempts")]
    pub max_attempts: u32,
    /// Which failures are retried.
    #[serde(default)]
    pub on: RetryOn,
    /// Limit on each attempt's wait for response headers; an attempt that
    /// passes it is abandoned and retried. None by default: the route's
    /// `timeouts.firstByte` then bounds all attempts together.
    #[serde(default, with = "duration::optional")]
    #[schemars(with = "duration::optional::Schema")]
    pub per_try_timeout: Option<Duration>,
    /// Back-off before the first retry; it doubles for each further retry,
    /// and each wait is drawn at random between half and all of it (jitter).
    #[serde(default = "defaults::backoff_base", with = "duration")]
    #[schemars(with = "duration::Schema")]
    pub backoff_base: Duration,
    /// Longest back-off between two attempts.
    #[serde(default = "defaults::backoff_max", with = "duration")]
    #[schemars(with = "duration::Schema")]
    pub backoff_max: Duration,
    /// Longest `Retry-After` (seconds) the proxy waits for before a retry; a
    /// response asking for a longer wait is passed to the client as it is.
    #[serde(default = "defaults::max_retry_after", with = "duration")]
    #[schemars(with = "duration::Schema")]
    pub max_retry_after: Duration,
    /// Most bytes of a request body kept to send it again; a request whose
    /// body is longer is sent once and never retried.
    #[serde(default = "defaults::max_replay_bytes")]
    pub max_replay_bytes: u32,
    /// How many retries the route may send, so retries cannot multiply the
    /// load of an outage.
    #[serde(default)]
    pub budget: RetryBudget,
}

/// Failures that are retried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryOn {
    /// A connection to the endpoint could not be opened.
    #[serde(default = "defaults::yes")]
    pub connect_failure: bool,
    /// The endpoint refused the request before processing it (HTTP/2
    /// `REFUSED_STREAM`, or an idle connection closed under the request).
    #[serde(default = "defaults::yes")]
    pub refused_stream: bool,
    /// HTTP statuses of the response headers that are retried: 408, 429 or
    /// 5xx.
    #[serde(default = "defaults::retry_statuses")]
    pub statuses: Vec<u16>,
    /// gRPC status codes retried when the `grpc-status` is in the response
    /// headers (a trailers-only response). A status in the trailers of a
    /// response that has started streaming cannot be retried.
    #[serde(default = "defaults::retry_grpc_codes")]
    pub grpc_codes: Vec<GrpcCode>,
}

impl Default for RetryOn {
    fn default() -> Self {
        Self {
            connect_failure: true,
            refused_stream: true,
            statuses: defaults::retry_statuses(),
            grpc_codes: defaults::retry_grpc_codes(),
        }
    }
}

/// A gRPC status code, by its canonical name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[allow(missing_docs)]
pub enum GrpcCode {
    Cancelled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl GrpcCode {
    /// The numeric code carried in `grpc-status`.
    pub fn code(self) -> u8 {
        self as u8 + 1
    }
}

/// A retry budget: retries may add `ratio` of the route's recent requests,
/// plus `minPerSecond` retries each second whatever the traffic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudget {
    /// Retries allowed per request sent (0 to 1): 0.2 lets retries add at
    /// most 20% to the load.
    #[serde(default = "defaults::budget_ratio")]
    pub ratio: f64,
    /// Retries allowed each second even when there is little traffic.
    #[serde(default = "defaults::budget_min_per_second")]
    pub min_per_second: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            ratio: defaults::budget_ratio(),
            min_per_second: defaults::budget_min_per_second(),
        }
    }
}

mod defaults {
    use std::time::Duration;

    pub fn yes() -> bool {
        true
    }
    pub fn retry_attempts() -> u32 {
        3
    }
    pub fn backoff_base() -> Duration {
        Duration::from_millis(25)
    }
    pub fn backoff_max() -> Duration {
        Duration::from_secs(1)
    }
    pub fn max_retry_after() -> Duration {
        Duration::from_secs(2)
    }
    pub fn max_replay_bytes() -> u32 {
        64 * 1024
    }
    pub fn retry_statuses() -> Vec<u16> {
        vec![429, 503]
    }
    pub fn retry_grpc_codes() -> Vec<super::GrpcCode> {
        vec![super::GrpcCode::Unavailable]
    }
    pub fn budget_ratio() -> f64 {
        0.2
    }
    pub fn budget_min_per_second() -> u32 {
        10
    }
}
