//! The APIs infermesh components share: the mesh policy documents users write,
//! workload identities (SPIFFE IDs), and the gRPC services the proxy speaks or routes (KServe v2 inference).
//!
//! The control plane and the proxy both depend on this crate and on nothing
//! of each other.

pub mod policy;
pub mod spiffe;

/// The identity (CSR signing) API (`package infermesh.identity.v1`).
pub mod identity_api {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("infermesh.identity.v1");
}

/// The policy-distribution API (`package infermesh.policy.v1`).
pub mod policy_api {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("infermesh.policy.v1");

    /// Upper bounds, in milliseconds, of the time-to-first-token buckets of
    /// a `ModelSummary` (`ttft_buckets[i]` counts times up to
    /// `TTFT_BOUNDS_MS[i]`; one more bucket holds the rest).
    pub const TTFT_BOUNDS_MS: [u64; 14] = [
        5, 10, 25, 50, 100, 200, 350, 500, 750, 1000, 2000, 4000, 8000, 16000,
    ];
}

/// KServe v2 / Open Inference Protocol gRPC types (`package inference`).
pub mod kserve {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("inference");
}
