//! Workload identities: SPIFFE IDs of the form
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, and reading
//! them from X.509 certificates (the URI SAN of an X.509-SVID).

use std::fmt;
use std::str::FromStr;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The trust domain a mesh uses when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// A workload identity in the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Why a string or certificate does not carry a mesh identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct IdentityError(String);

impl SpiffeId {
    /// The identity of service account `service_account` in `namespace`.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        check_trust_domain(trust_domain)?;
        check_segment("namespace", namespace)?;
        check_segment("service account", service_account)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    /// The trust domain (the URI's authority).
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The single SPIFFE ID among a certificate's URI SANs. A certificate
    /// with none, with several, or with one that is not a mesh identity is
    /// refused with the reason.
    pub fn from_certificate(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|error| IdentityError(format!("unreadable certificate: {error}")))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|error| IdentityError(format!("bad subjectAltName extension: {error}")))?;
        let mut found = None;
        for name in san.iter().flat_map(|san| san.value.general_names.iter()) {
            if let GeneralName::URI(uri) = name {
                if uri.starts_with("spiffe://") {
                    if found.is_some() {
                        return Err(IdentityError(
                            "certificate carries more than one SPIFFE ID".into(),
                        ));
                    }
                    found = Some(uri.parse::<SpiffeId>()?);
                }
            }
        }
        found.ok_or_else(|| IdentityError("certificate carries no SPIFFE ID (URI SAN)".into()))
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.strip_prefix("spiffe://").ok_or_else(|| {
            IdentityError(format!(
                "`{s}` is not a SPIFFE ID: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
            ))
        })?;
        let mut parts = rest.split('/');
        let (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(IdentityError(format!(
                "`{s}` is not a mesh identity: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
            )));
        };
        Self::new(td, ns, sa).map_err(|error| IdentityError(format!("`{s}`: {error}")))
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl schemars::JsonSchema for SpiffeId {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "SpiffeId".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^spiffe://[a-z0-9._-]+/ns/[a-z0-9._-]+/sa/[a-z0-9._-]+$",
            "description": "A workload identity: spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>."
        })
    }
}

/// Trust domains are lower-case DNS-like names (SPIFFE ID spec, 2.1).
pub fn check_trust_domain(td: &str) -> Result<(), IdentityError> {
    if td.is_empty() {
        return Err(IdentityError("the trust domain is empty".into()));
    }
    if let Some(c) = td
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        return Err(IdentityError(format!(
            "trust domain `{td}` has `{c}`: only lower-case letters, digits, `.`, `-` and `_` are allowed"
        )));
    }
    Ok(())
}

/// Namespaces and service accounts are Kubernetes names.
fn check_segment(what: &str, value: &str) -> Result<(), IdentityError> {
    if value.is_empty() {
        return Err(IdentityError(format!("the {what} is empty")));
    }
    if value.len() > 253 {
        return Err(IdentityError(format!(
            "the {what} is longer than 253 characters"
        )));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-')))
    {
        return Err(IdentityError(format!(
            "{what} `{value}` has `{c}`: only lower-case letters, digits, `.` and `-` are allowed"
        )));
    }
    Ok(())
}

/// The end of a DER certificate's validity, or `None` when it does not parse.
pub fn certificate_not_after(der: &[u8]) -> Option<std::time::SystemTime> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let seconds = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_identities_round_trip() {
        let id: SpiffeId = "spiffe://cluster.local/ns/models/sa/llama".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "models");
        assert_eq!(id.service_account(), "llama");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/models/sa/llama");
    }

    #[test]
    fn malformed_identities_say_why() {
        for (input, reason) in [
            ("cluster.local/ns/a/sa/b", "not a SPIFFE ID"),
            ("spiffe://cluster.local/ns/a", "not a mesh identity"),
            ("spiffe://cluster.local/ns/a/sa/b/c", "not a mesh identity"),
            ("spiffe://cluster.local/sa/a/ns/b", "not a mesh identity"),
            (
                "spiffe://Cluster/ns/a/sa/b",
                "trust domain `Cluster` has `C`",
            ),
            ("spiffe://td/ns//sa/b", "namespace is empty"),
            ("spiffe://td/ns/a/sa/B", "service account `B` has `B`"),
        ] {
            let error = input.parse::<SpiffeId>().unwrap_err().to_string();
            assert!(error.contains(reason), "{input}: {error}");
        }
    }
}
