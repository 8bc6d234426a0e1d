//! The `Identity` gRPC service: proxies send a CSR and a token and get a
//! short-lived certificate for the identity the token is bound to. A token
//! is a bootstrap token from a file or, with `--kubernetes`, the pod's
//! projected service-account token, which the API server reviews
//! (`kubernetes::tokens`).
//!
//! Bootstrap tokens live in a file of lines `<namespace>/<service-account>
//! <token>` (`#` starts a comment), re-read when it changes. Only SHA-256
//! digests of the tokens are kept in memory, and no token is ever logged.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use infermesh_proto::identity_api::identity_server::Identity;
use infermesh_proto::identity_api::{CertifyRequest, CertifyResponse};
use infermesh_proto::spiffe::{IdentityError, SpiffeId};
use parking_lot::Mutex;
use tonic::{Request, Response, Status};

use crate::ca::{Authority, SignError};
use crate::kubernetes::tokens::{ReviewError, TokenReviewer};
use crate::metrics::Metrics;

/// Longest token accepted, so a huge header cannot cost a hash of it.
const MAX_TOKEN_LEN: usize = 4096;
/// Shortest token the file may hold: shorter ones are guessable.
const MIN_TOKEN_LEN: usize = 16;

/// Why the token file was refused: unreadable, or a line of it malformed
/// (`FILE:LINE: reason`).
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file cannot be read.
    #[error("{}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
    /// A line is not `<namespace>/<service-account> <token>`.
    #[error("{at}: expected `<namespace>/<service-account> <token>`")]
    Malformed {
        /// `FILE:LINE`.
        at: String,
    },
    /// The first word has no `/`.
    #[error("{at}: `{who}` is not `<namespace>/<service-account>`")]
    NotAccount {
        /// `FILE:LINE`.
        at: String,
        /// The word.
        who: String,
    },
    /// The namespace or service account cannot make a SPIFFE ID.
    #[error("{at}: {source}")]
    Identity {
        /// `FILE:LINE`.
        at: String,
        /// Why.
        #[source]
        source: IdentityError,
    },
    /// The token is guessable.
    #[error("{at}: the token is shorter than {MIN_TOKEN_LEN} characters")]
    TooShort {
        /// `FILE:LINE`.
        at: String,
    },
    /// The same token appears twice.
    #[error("{at}: this token is already bound to an identity")]
    Duplicate {
        /// `FILE:LINE`.
        at: String,
    },
}

/// Bootstrap tokens, by digest.
#[derive(Default)]
struct Tokens {
    by_digest: HashMap<[u8; 32], SpiffeId>,
    modified: Option<SystemTime>,
}

/// The token file, re-read when its modification time changes.
pub struct TokenFile {
    path: PathBuf,
    trust_domain: String,
    tokens: Mutex<Tokens>,
}

impl TokenFile {
    /// Reads `path`; a malformed line fails with `FILE:LINE: reason`.
    pub fn open(path: PathBuf, trust_domain: String) -> Result<Self, TokenFileError> {
        let file = Self {
            path,
            trust_domain,
            tokens: Mutex::new(Tokens::default()),
        };
        let tokens = file.read()?;
        *file.tokens.lock() = tokens;
        Ok(file)
    }

    fn read(&self) -> Result<Tokens, TokenFileError> {
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let text = std::fs::read_to_string(&self.path).map_err(|source| TokenFileError::Read {
            path: self.path.clone(),
            source,
        })?;
        let by_digest = parse_tokens(&self.path, &text, &self.trust_domain)?;
        Ok(Tokens {
            by_digest,
            modified,
        })
    }

    /// The identity `token` is bound to.
    fn identity_of(&self, token: &str) -> Option<SpiffeId> {
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let mut tokens = self.tokens.lock();
        if modified != tokens.modified {
            match self.read() {
                Ok(fresh) => {
                    tracing::info!(file = %self.path.display(), tokens = fresh.by_digest.len(), "bootstrap tokens reloaded");
                    *tokens = fresh;
                }
                Err(error) => {
                    // Keep the tokens in force; say so once per change.
                    tracing::warn!(%error, "bootstrap token file not reloaded");
                    tokens.modified = modified;
                }
            }
        }
        tokens.by_digest.get(&digest(token)).cloned()
    }
}

fn digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn parse_tokens(
    path: &Path,
    text: &str,
    trust_domain: &str,
) -> Result<HashMap<[u8; 32], SpiffeId>, TokenFileError> {
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let at = format!("{}:{}", path.display(), i + 1);
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(who), Some(token), None) = (words.next(), words.next(), words.next()) else {
            return Err(TokenFileError::Malformed { at });
        };
        let Some((ns, sa)) = who.split_once('/') else {
            return Err(TokenFileError::NotAccount {
                at,
                who: who.to_owned(),
            });
        };
        let id = match SpiffeId::new(trust_domain, ns, sa) {
            Ok(id) => id,
            Err(source) => return Err(TokenFileError::Identity { at, source }),
        };
        if token.len() < MIN_TOKEN_LEN {
            return Err(TokenFileError::TooShort { at });
        }
        if out.insert(digest(token), id).is_some() {
            return Err(TokenFileError::Duplicate { at });
        }
    }
    Ok(out)
}

/// The gRPC service.
pub struct IdentityService {
    authority: Arc<Authority>,
    tokens: Option<Arc<TokenFile>>,
    reviewer: Option<Arc<TokenReviewer>>,
    metrics: Arc<Metrics>,
}

/// Who vouches for a token.
enum Voucher {
    /// The bootstrap token file.
    File,
    /// A Kubernetes TokenReview.
    Kubernetes,
}

impl IdentityService {
    /// Signs with `authority` for the holders of bootstrap `tokens` and,
    /// with Kubernetes, of service-account tokens the `reviewer` accepts;
    /// a token the file knows is never sent to the API server.
    pub fn new(
        authority: Arc<Authority>,
        tokens: Option<Arc<TokenFile>>,
        reviewer: Option<Arc<TokenReviewer>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            authority,
            tokens,
            reviewer,
            metrics,
        }
    }

    fn refuse(&self, reason: &'static str, asked: &str, status: Status) -> Status {
        self.metrics.csr_refused(reason);
        tracing::warn!(
            reason,
            identity = asked,
            code = ?status.code(),
            message = status.message(),
            "certificate request refused"
        );
        status
    }

    /// The identity `token` is bound to, or the refusal (with its metric
    /// label) saying why there is none.
    async fn identity_of(
        &self,
        token: &str,
    ) -> Result<(SpiffeId, Voucher), (&'static str, Status)> {
        if let Some(bound) = self.tokens.as_ref().and_then(|t| t.identity_of(token)) {
            return Ok((bound, Voucher::File));
        }
        let Some(reviewer) = &self.reviewer else {
            return Err((
                "unknown_token",
                Status::unauthenticated("the bootstrap token is not known to this authority"),
            ));
        };
        reviewer
            .review(token)
            .await
            .map(|id| (id, Voucher::Kubernetes))
            .map_err(|error| (error.reason(), review_status(&error)))
    }
}

/// The gRPC status of a token Kubernetes did not vouch for: UNAVAILABLE
/// when the API server could not be asked (the proxy retries),
/// UNAUTHENTICATED when it refused the token, PERMISSION_DENIED when the
/// token is valid but no workload's.
fn review_status(error: &ReviewError) -> Status {
    let message = error.to_string();
    match error {
        ReviewError::Unavailable(_) | ReviewError::Timeout => Status::unavailable(message),
        ReviewError::NotAuthenticated { .. } | ReviewError::WrongAudience { .. } => {
            Status::unauthenticated(message)
        }
        ReviewError::NotServiceAccount { .. } | ReviewError::Identity { .. } => {
            Status::permission_denied(message)
        }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN_LEN)
            .map(str::to_owned);
        let request = request.into_inner();
        let asked: SpiffeId = request.identity.parse().map_err(|e| {
            self.refuse(
                "bad_identity",
                &request.identity,
                Status::invalid_argument(format!("identity: {e}")),
            )
        })?;
        let Some(token) = token else {
            return Err(self.refuse(
                "no_token",
                &request.identity,
                Status::unauthenticated(
                    "no token: send `authorization: Bearer <token>` metadata (a bootstrap token, \
                     or with Kubernetes the pod's service-account token)",
                ),
            ));
        };
        let (bound, voucher) = match self.identity_of(&token).await {
            Ok(found) => found,
            Err((reason, status)) => return Err(self.refuse(reason, &request.identity, status)),
        };
        if bound != asked {
            let token_kind = match voucher {
                Voucher::File => "bootstrap token",
                Voucher::Kubernetes => "service-account token",
            };
            return Err(self.refuse(
                "identity_mismatch",
                &request.identity,
                Status::permission_denied(format!(
                    "the {token_kind} is bound to {bound}, not to {asked}"
                )),
            ));
        }
        let lifetime =
            (request.lifetime_seconds > 0).then(|| Duration::from_secs(request.lifetime_seconds));
        let signed = match self.authority.sign_csr(&asked, &request.csr, lifetime) {
            Ok(signed) => signed,
            Err(SignError::BadRequest(message)) => {
                return Err(self.refuse(
                    "bad_csr",
                    &request.identity,
                    Status::invalid_argument(message),
                ))
            }
            Err(error) => {
                tracing::error!(%error, "signing failed");
                self.metrics.csr_refused("internal");
                return Err(Status::internal(error.to_string()));
            }
        };
        let not_after = signed
            .not_after
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.metrics.certificate_issued();
        let vouched_by = match voucher {
            Voucher::File => "bootstrap_token",
            Voucher::Kubernetes => "token_review",
        };
        tracing::info!(identity = %asked, vouched_by, not_after, "certificate issued");
        Ok(Response::new(CertifyResponse {
            chain: signed.chain.iter().map(|c| c.to_vec()).collect(),
            trust_anchors: self.authority.roots().iter().map(|c| c.to_vec()).collect(),
            not_after,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_lines_bind_identities_and_errors_are_located() {
        let path = Path::new("tokens");
        let tokens = parse_tokens(
            path,
            "# bootstrap tokens\n\nmodels/llama  0123456789abcdef0123  # the llama server\n",
            "cluster.local",
        )
        .unwrap();
        assert_eq!(
            tokens
                .get(&digest("0123456789abcdef0123"))
                .unwrap()
                .to_string(),
            "spiffe://cluster.local/ns/models/sa/llama"
        );
        for (text, reason) in [
            ("models/llama\n", "tokens:1: expected"),
            ("\nllama 0123456789abcdef0123\n", "tokens:2: `llama` is not"),
            (
                "models/Llama 0123456789abcdef0123\n",
                "tokens:1: service account `Llama`",
            ),
            ("models/llama short\n", "tokens:1: the token is shorter"),
            (
                "a/b 0123456789abcdef0123\nc/d 0123456789abcdef0123\n",
                "tokens:2: this token is already bound",
            ),
        ] {
            let error = parse_tokens(path, text, "cluster.local")
                .unwrap_err()
                .to_string();
            assert!(error.starts_with(reason), "{error}");
        }
    }
}
