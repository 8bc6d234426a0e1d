//! Prometheus metrics of the control plane, rendered on the admin thread.

use std::fmt::Write as _;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Every metric of the control plane; the handles are atomics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Version of the snapshot in force; 0 before the first one.
    pub snapshot_version: Gauge,
    /// Snapshots published.
    pub publishes: Counter,
    /// Changes to the policy files that were refused as invalid.
    pub refused_changes: Counter,
    /// Of those, the valid sets refused because they route nothing (no
    /// document, or every `ModelRoute` gone) without the operator's say-so.
    pub empty_refusals: Counter,
    /// 1 while the latest policy files are refused (an older snapshot, or
    /// none, is in force), else 0.
    pub policy_refused: Gauge,
    /// Backends of the set in force whose Kubernetes Service resolves to
    /// no endpoint.
    pub unresolved_services: Gauge,
    /// Open policy streams that have said Hello.
    pub connected_proxies: Gauge,
    /// Snapshots sent to proxies.
    pub pushes: Counter,
    /// ACKs of the latest snapshot sent on a stream.
    pub acks: Counter,
    /// NACKs of the latest snapshot sent on a stream.
    pub nacks: Counter,
    /// ACKs and NACKs that quoted a nonce other than the latest, ignored.
    pub stale_responses: Counter,
    /// Certificates signed.
    pub certificates_issued: Counter,
    /// Certificate requests refused, by reason.
    pub certificate_refusals: Family<[(&'static str, &'static str); 1], Counter>,
    /// TokenReviews asked of the Kubernetes API server, by outcome.
    pub token_reviews: Family<[(&'static str, &'static str); 1], Counter>,
    /// Tokens whose identity came from a recent review instead of a new one.
    pub token_review_cache_hits: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `infermesh_control` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("infermesh_control");
        let snapshot_version = Gauge::default();
        registry.register(
            "snapshot_version",
            "Version of the policy snapshot in force; 0 before the first valid policy",
            snapshot_version.clone(),
        );
        let publishes = Counter::default();
        registry.register("publishes", "Policy snapshots published", publishes.clone());
        let refused_changes = Counter::default();
        registry.register(
            "refused_changes",
            "Changes to the policy files refused as invalid; the previous snapshot stayed in force",
            refused_changes.clone(),
        );
        let empty_refusals = Counter::default();
        registry.register(
            "empty_policy_refusals",
            "Policy sets refused because they route nothing (no document, or every ModelRoute gone) without --allow-empty-policy or an explicit MeshConfig",
            empty_refusals.clone(),
        );
        let policy_refused = Gauge::default();
        registry.register(
            "policy_refused",
            "1 while the policy files on disk are refused and an older snapshot (or none) is in force",
            policy_refused.clone(),
        );
        let unresolved_services = Gauge::default();
        registry.register(
            "backends_without_endpoints",
            "Backends whose Kubernetes Service resolves to no ready endpoint (unknown Service, missing port, nothing ready); their requests get 503",
            unresolved_services.clone(),
        );
        let connected_proxies = Gauge::default();
        registry.register(
            "connected_proxies",
            "Proxies with an open policy stream",
            connected_proxies.clone(),
        );
        let pushes = Counter::default();
        registry.register("pushes", "Policy snapshots sent to proxies", pushes.clone());
        let acks = Counter::default();
        registry.register(
            "acks",
            "Snapshots proxies acknowledged as applied",
            acks.clone(),
        );
        let nacks = Counter::default();
        registry.register(
            "nacks",
            "Snapshots proxies refused (they keep their previous one)",
            nacks.clone(),
        );
        let stale_responses = Counter::default();
        registry.register(
            "stale_responses",
            "ACKs and NACKs quoting a nonce other than the latest sent on their stream, ignored",
            stale_responses.clone(),
        );
        let certificates_issued = Counter::default();
        registry.register(
            "certificates_issued",
            "Workload certificates signed by the mesh CA",
            certificates_issued.clone(),
        );
        let certificate_refusals = Family::default();
        registry.register(
            "certificate_refusals",
            "Certificate requests refused, by reason (no_token, unknown_token, identity_mismatch, bad_identity, bad_csr, internal; with --kubernetes also kubernetes_unavailable, token_not_authenticated, token_wrong_audience, not_service_account)",
            certificate_refusals.clone(),
        );
        let token_reviews = Family::default();
        registry.register(
            "token_reviews",
            "TokenReviews of service-account tokens asked of the Kubernetes API server, by outcome (authenticated, kubernetes_unavailable, token_not_authenticated, token_wrong_audience, not_service_account)",
            token_reviews.clone(),
        );
        let token_review_cache_hits = Counter::default();
        registry.register(
            "token_review_cache_hits",
            "Service-account tokens whose identity came from a review of the last minute instead of a new TokenReview",
            token_review_cache_hits.clone(),
        );
        Self {
            registry,
            certificates_issued,
            certificate_refusals,
            token_reviews,
            token_review_cache_hits,
            snapshot_version,
            publishes,
            refused_changes,
            empty_refusals,
            policy_refused,
            unresolved_services,
            connected_proxies,
            pushes,
            acks,
            nacks,
            stale_responses,
        }
    }

    /// Counts a signed certificate.
    pub fn certificate_issued(&self) {
        self.certificates_issued.inc();
    }

    /// Counts a refused certificate request.
    pub fn csr_refused(&self, reason: &'static str) {
        self.certificate_refusals
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// Counts a TokenReview asked of the API server.
    pub fn token_reviewed(&self, outcome: &'static str) {
        self.token_reviews
            .get_or_create(&[("outcome", outcome)])
            .inc();
    }

    /// Counts a token answered from the review cache.
    pub fn token_review_cached(&self) {
        self.token_review_cache_hits.inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            let _ = writeln!(out, "# error encoding metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_rendered_with_its_prefix() {
        let metrics = Metrics::new();
        metrics.snapshot_version.set(42);
        metrics.acks.inc();
        let text = metrics.render();
        for line in [
            "infermesh_control_snapshot_version 42",
            "infermesh_control_publishes_total 0",
            "infermesh_control_refused_changes_total 0",
            "infermesh_control_empty_policy_refusals_total 0",
            "infermesh_control_policy_refused 0",
            "infermesh_control_connected_proxies 0",
            "infermesh_control_pushes_total 0",
            "infermesh_control_acks_total 1",
            "infermesh_control_nacks_total 0",
            "infermesh_control_stale_responses_total 0",
            "infermesh_control_certificates_issued_total 0",
            "infermesh_control_token_review_cache_hits_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
