//! `kind: AuthorizationPolicy`: who may call what on the inbound listener.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::selector::WorkloadSelector;

/// Who may call what on the inbound listener. Deny rules are checked first;
/// then, once any policy reaches a proxy, a request is allowed only when an
/// allow rule matches it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// The rules; a policy without rules denies everything it reaches.
    #[serde(default)]
    pub rules: Vec<AuthorizationRule>,
    /// The workloads whose proxies enforce this policy; every proxy in the
    /// policy's namespace (or in the mesh, without one) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<WorkloadSelector>,
}

/// One rule: an action for requests from any of `from` to any of `to`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationRule {
    /// `allow` (the default) or `deny`.
    #[serde(default)]
    pub action: AuthorizationAction,
    /// Callers the rule applies to, any of them; every caller, with or
    /// without an identity, when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<CallerMatch>,
    /// Requests the rule applies to, any of them; every request when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<RequestMatch>,
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AuthorizationAction {
    /// Let the request through.
    #[default]
    Allow,
    /// Refuse it: 403, or gRPC `PERMISSION_DENIED`.
    Deny,
}

/// A caller, by its mesh identity, written `{identity: spiffe://…}`,
/// `{namespace: …}` or `{trustDomain: …}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum CallerMatch {
    /// Exactly this SPIFFE ID.
    Identity(crate::spiffe::SpiffeId),
    /// Any workload of this namespace (in the proxy's trust domain).
    Namespace(String),
    /// Any workload of this trust domain.
    TrustDomain(String),
}

/// Conditions on the request; all given conditions must hold. In each list
/// any entry may match; a trailing `*` matches any suffix.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestMatch {
    /// Model names, as routes see them (OpenAI `model`, KServe model name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// Names of the `ModelRoute` the request takes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<String>,
    /// gRPC methods as `/package.Service/Method`; `/package.Service/*` for
    /// every method of a service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Ports of the inbound listener the request arrived on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}
