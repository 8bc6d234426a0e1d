//! Identity from Kubernetes: a proxy presents its pod's projected
//! service-account token (audience `infermesh`) and the API server says,
//! through a `TokenReview`, whose it is. Only a service account's token
//! makes a workload identity; a user's or a node's is refused.
//!
//! Positive reviews are kept for a minute at most (never past the token's
//! own `exp`), keyed by the token's SHA-256, so that the renewals of many
//! proxies do not each cost the API server a request; refusals and errors
//! are never kept, so a fixed RBAC rule or a recovered API server counts at
//! once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use infermesh_proto::spiffe::{IdentityError, SpiffeId};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use parking_lot::Mutex;

use crate::metrics::Metrics;

/// The audience the injector's projected tokens carry, and the only one a
/// review accepts.
pub const AUDIENCE: &str = "infermesh";

/// How long a positive review is trusted without asking again.
const CACHE_TTL: Duration = Duration::from_secs(60);
/// Most reviews kept; beyond it the one closest to expiring goes.
const CACHE_CAPACITY: usize = 4096;
/// Longest wait for the API server's answer; the proxy retries after it.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a token does not make an identity.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The API server could not be asked (down, unreachable, timed out,
    /// or it refused the control plane's own request): retry later.
    #[error("the Kubernetes API server cannot review the token: {0}")]
    Unavailable(#[source] kube::Error),
    /// The API server did not answer in time.
    #[error("the Kubernetes API server did not review the token within {}s", REVIEW_TIMEOUT.as_secs())]
    Timeout,
    /// The API server does not accept the token (unknown, expired, bound
    /// to a deleted pod, or not meant for the `infermesh` audience).
    #[error("the Kubernetes API server does not authenticate the token: {reason}")]
    NotAuthenticated {
        /// The API server's `status.error`, or a default.
        reason: String,
    },
    /// The token is valid but its audiences, as reviewed, leave out ours.
    #[error(
        "the token is not meant for audience `{AUDIENCE}` (reviewed audiences: {audiences:?})"
    )]
    WrongAudience {
        /// `status.audiences`.
        audiences: Vec<String>,
    },
    /// The token is a user's or a node's, not a service account's.
    #[error("the token authenticates `{username}`, which is not a service account (system:serviceaccount:<namespace>:<name>)")]
    NotServiceAccount {
        /// `status.user.username`.
        username: String,
    },
    /// The service account's names cannot make a SPIFFE ID.
    #[error("the token's service account `{username}` makes no SPIFFE ID: {source}")]
    Identity {
        /// `status.user.username`.
        username: String,
        /// Why.
        #[source]
        source: IdentityError,
    },
}

impl ReviewError {
    /// The label this refusal is counted under.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unavailable(_) | Self::Timeout => "kubernetes_unavailable",
            Self::NotAuthenticated { .. } => "token_not_authenticated",
            Self::WrongAudience { .. } => "token_wrong_audience",
            Self::NotServiceAccount { .. } | Self::Identity { .. } => "not_service_account",
        }
    }
}

/// The identity a reviewed token stands for: `status.authenticated`, one
/// of `status.audiences` is [`AUDIENCE`], and the user is
/// `system:serviceaccount:<namespace>:<name>`.
pub fn identity_of(
    status: &TokenReviewStatus,
    trust_domain: &str,
) -> Result<SpiffeId, ReviewError> {
    if status.authenticated != Some(true) {
        let reason = status
            .error
            .clone()
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| "the token is not authenticated".to_string());
        return Err(ReviewError::NotAuthenticated { reason });
    }
    // An empty list means "valid for the API server's own audience", which
    // is not ours: an audience-unaware reviewer is refused too.
    let audiences = status.audiences.clone().unwrap_or_default();
    if !audiences.iter().any(|a| a == AUDIENCE) {
        return Err(ReviewError::WrongAudience { audiences });
    }
    let username = status
        .user
        .as_ref()
        .and_then(|u| u.username.clone())
        .unwrap_or_default();
    let Some((namespace, name)) = service_account(&username) else {
        return Err(ReviewError::NotServiceAccount { username });
    };
    SpiffeId::new(trust_domain, namespace, name)
        .map_err(|source| ReviewError::Identity { username, source })
}

/// `(namespace, name)` of `system:serviceaccount:<namespace>:<name>`.
fn service_account(username: &str) -> Option<(&str, &str)> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (namespace, name) = rest.split_once(':')?;
    (!namespace.is_empty() && !name.is_empty() && !name.contains(':')).then_some((namespace, name))
}

/// The `exp` claim of a JWT, read without verifying it: only to keep a
/// cached review from outliving the token. `None` when it is no JWT or
/// has no `exp`.
fn expiry(token: &str) -> Option<SystemTime> {
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    Some(UNIX_EPOCH + Duration::from_secs(exp))
}

/// How long a review of a token expiring at `expiry` may be kept.
fn cache_ttl(expiry: Option<SystemTime>, now: SystemTime) -> Option<Duration> {
    match expiry {
        None => Some(CACHE_TTL),
        Some(expiry) => expiry
            .duration_since(now)
            .ok()
            .filter(|left| !left.is_zero())
            .map(|left| left.min(CACHE_TTL)),
    }
}

/// Positive reviews, by token digest.
#[derive(Default)]
struct Cache {
    entries: HashMap<[u8; 32], (SpiffeId, Instant)>,
}

impl Cache {
    fn get(&mut self, key: &[u8; 32], now: Instant) -> Option<SpiffeId> {
        match self.entries.get(key) {
            Some((id, until)) if *until > now => Some(id.clone()),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn insert(&mut self, key: [u8; 32], id: SpiffeId, until: Instant, now: Instant) {
        if self.entries.len() >= CACHE_CAPACITY && !self.entries.contains_key(&key) {
            self.entries.retain(|_, (_, until)| *until > now);
            if self.entries.len() >= CACHE_CAPACITY {
                let soonest = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, until))| *until)
                    .map(|(k, _)| *k);
                if let Some(soonest) = soonest {
                    self.entries.remove(&soonest);
                }
            }
        }
        self.entries.insert(key, (id, until));
    }
}

/// Reviews tokens with the API server.
pub struct TokenReviewer {
    api: Api<TokenReview>,
    trust_domain: String,
    metrics: Arc<Metrics>,
    cache: Mutex<Cache>,
}

impl TokenReviewer {
    /// Reviews through `client`, naming identities in `trust_domain`.
    pub fn new(client: kube::Client, trust_domain: String, metrics: Arc<Metrics>) -> Self {
        Self {
            api: Api::all(client),
            trust_domain,
            metrics,
            cache: Mutex::new(Cache::default()),
        }
    }

    /// The identity `token` stands for.
    pub async fn review(&self, token: &str) -> Result<SpiffeId, ReviewError> {
        let key = digest(token);
        if let Some(id) = self.cache.lock().get(&key, Instant::now()) {
            self.metrics.token_review_cached();
            return Ok(id);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![AUDIENCE.to_owned()]),
            },
            ..Default::default()
        };
        let answer = tokio::time::timeout(
            REVIEW_TIMEOUT,
            self.api.create(&PostParams::default(), &review),
        )
        .await;
        let result = match answer {
            Err(_) => Err(ReviewError::Timeout),
            Ok(Err(error)) => Err(ReviewError::Unavailable(error)),
            Ok(Ok(answer)) => identity_of(&answer.status.unwrap_or_default(), &self.trust_domain),
        };
        match &result {
            Ok(id) => {
                self.metrics.token_reviewed("authenticated");
                if let Some(ttl) = cache_ttl(expiry(token), SystemTime::now()) {
                    let now = Instant::now();
                    self.cache.lock().insert(key, id.clone(), now + ttl, now);
                }
            }
            Err(error) => self.metrics.token_reviewed(error.reason()),
        }
        result
    }
}

fn digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;

    fn status(authenticated: bool, username: &str, audiences: &[&str]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(username.to_string()),
                ..Default::default()
            }),
            error: None,
        }
    }

    #[test]
    fn a_service_accounts_token_for_infermesh_is_its_spiffe_id() {
        let id = identity_of(
            &status(true, "system:serviceaccount:ml:chat", &["infermesh"]),
            "cluster.local",
        )
        .unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/ml/sa/chat");
        let id = identity_of(
            &status(true, "system:serviceaccount:ml:chat", &["api", "infermesh"]),
            "mesh.example",
        )
        .unwrap();
        assert_eq!(id.to_string(), "spiffe://mesh.example/ns/ml/sa/chat");
    }

    #[test]
    fn users_nodes_and_malformed_names_are_not_workloads() {
        for username in [
            "alice",
            "system:node:worker-1",
            "system:serviceaccount:ml",
            "system:serviceaccount::chat",
            "system:serviceaccount:ml:",
            "system:serviceaccount:ml:chat:extra",
            "system:serviceaccounts:ml:chat",
            "",
        ] {
            let error =
                identity_of(&status(true, username, &["infermesh"]), "cluster.local").unwrap_err();
            assert!(
                matches!(error, ReviewError::NotServiceAccount { .. }),
                "{username}: {error}"
            );
            assert_eq!(error.reason(), "not_service_account");
            assert!(
                error.to_string().contains(&format!("`{username}`")),
                "{error}"
            );
        }
        let error = identity_of(
            &status(true, "system:serviceaccount:ML:chat", &["infermesh"]),
            "cluster.local",
        )
        .unwrap_err();
        assert!(matches!(error, ReviewError::Identity { .. }), "{error}");
    }

    #[test]
    fn a_token_for_another_audience_or_an_audience_unaware_review_is_refused() {
        for audiences in [&["api"][..], &[][..], &["infermesh-other"][..]] {
            let error = identity_of(
                &status(true, "system:serviceaccount:ml:chat", audiences),
                "cluster.local",
            )
            .unwrap_err();
            assert!(
                matches!(error, ReviewError::WrongAudience { .. }),
                "{error}"
            );
            assert_eq!(error.reason(), "token_wrong_audience");
        }
        let mut missing = status(true, "system:serviceaccount:ml:chat", &[]);
        missing.audiences = None;
        assert!(matches!(
            identity_of(&missing, "cluster.local"),
            Err(ReviewError::WrongAudience { .. })
        ));
    }

    #[test]
    fn an_unauthenticated_token_carries_the_api_servers_reason() {
        let mut refused = status(false, "", &[]);
        refused.error = Some(
            "token audiences [\"api\"] is invalid for the target audiences [\"infermesh\"]".into(),
        );
        let error = identity_of(&refused, "cluster.local").unwrap_err();
        assert!(matches!(error, ReviewError::NotAuthenticated { .. }));
        assert!(
            error
                .to_string()
                .contains("is invalid for the target audiences"),
            "{error}"
        );
        assert_eq!(error.reason(), "token_not_authenticated");
        let empty = TokenReviewStatus::default();
        let error = identity_of(&empty, "cluster.local").unwrap_err();
        assert!(error.to_string().contains("not authenticated"), "{error}");
    }

    fn jwt(claims: &str) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!(
            "{}.{}.{}",
            b64(r#"{"alg":"RS256"}"#),
            b64(claims),
            b64("signature")
        )
    }

    #[test]
    fn a_cached_review_never_outlives_the_token_nor_a_minute() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let exp = |s: u64| expiry(&jwt(&format!(r#"{{"aud":["infermesh"],"exp":{s}}}"#)));
        assert_eq!(
            exp(1_000_030),
            Some(UNIX_EPOCH + Duration::from_secs(1_000_030))
        );
        assert_eq!(
            cache_ttl(exp(1_000_030), now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(cache_ttl(exp(1_003_600), now), Some(CACHE_TTL));
        assert_eq!(cache_ttl(exp(1_000_000), now), None);
        assert_eq!(cache_ttl(exp(999_000), now), None);
        // Not a JWT, or no exp: the minute alone bounds it.
        assert_eq!(expiry("test-token-ml-chat-0123456789"), None);
        assert_eq!(expiry(&jwt(r#"{"sub":"x"}"#)), None);
        assert_eq!(expiry("a.!!!.c"), None);
        assert_eq!(cache_ttl(None, now), Some(CACHE_TTL));
    }

    #[test]
    fn the_cache_forgets_expired_reviews_and_stays_bounded() {
        let id = SpiffeId::new("cluster.local", "ml", "chat").unwrap();
        let mut cache = Cache::default();
        let t0 = Instant::now();
        cache.insert(digest("a"), id.clone(), t0 + Duration::from_secs(10), t0);
        assert_eq!(cache.get(&digest("a"), t0), Some(id.clone()));
        assert_eq!(cache.get(&digest("a"), t0 + Duration::from_secs(10)), None);
        assert!(cache.entries.is_empty());
        for i in 0..CACHE_CAPACITY + 10 {
            let until = t0 + Duration::from_secs(100 + i as u64);
            cache.insert(digest(&i.to_string()), id.clone(), until, t0);
        }
        assert_eq!(cache.entries.len(), CACHE_CAPACITY);
        // The ones closest to expiring went first.
        for gone in 0..10 {
            assert_eq!(cache.get(&digest(&gone.to_string()), t0), None);
        }
        assert!(cache.get(&digest("10"), t0).is_some());
    }
}
