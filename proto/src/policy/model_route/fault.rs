//! A route's `faults`: delays and errors injected into a share of its
//! requests, for chaos drills.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::retry::GrpcCode;
use crate::policy::duration;

/// Faults injected into a route's requests. Each request draws on its own,
/// so over many requests the shares match the percentages.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultPolicy {
    /// Hold a share of requests before sending them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<DelayFault>,
    /// Answer a share of requests with an error, without sending them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<AbortFault>,
}

/// A delay injected into a share of requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DelayFault {
    /// How long a delayed request waits before it is sent.
    #[serde(with = "duration")]
    #[schemars(with = "duration::Schema")]
    pub duration: Duration,
    /// Share of requests delayed, 0 to 100 (fractions allowed).
    pub percent: f64,
}

/// An error answered by the proxy to a share of requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AbortFault {
    /// HTTP status (400 to 599) for HTTP clients; follows from
    /// `grpcStatus` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// gRPC status for gRPC clients; follows from `status` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<GrpcCode>,
    /// Share of requests aborted, 0 to 100 (fractions allowed).
    pub percent: f64,
}
