//! Authorization of inbound requests by caller identity, per model, route,
//! gRPC method and port.
//!
//! Deny rules are checked first; a matching one refuses the request. Then,
//! once any `AuthorizationPolicy` reaches the proxy, a request is allowed
//! only when an allow rule matches it: what no rule allows is denied.
//!
//! The decision runs before routing, so a request that matches no route is
//! refused like any other (a denied caller cannot probe which models exist);
//! it is therefore a function called by the proxy's request path, not a
//! layer of a route's stack.

use std::sync::Arc;

use infermesh_proto::policy::{
    AuthorizationAction, AuthorizationPolicySpec, CallerMatch, RequestMatch, Resource,
};
use infermesh_proto::spiffe::SpiffeId;

use infermesh_filters::ProxyError;

/// What a decision looks at.
#[derive(Debug, Clone, Copy, Default)]
pub struct AuthzRequest<'a> {
    /// The caller's identity; `None` for a plaintext caller.
    pub caller: Option<&'a SpiffeId>,
    /// The model asked for, when the request names one.
    pub model: Option<&'a str>,
    /// The `ModelRoute` the request takes, when one matches.
    pub route: Option<&'a str>,
    /// `/package.Service/Method` for gRPC requests.
    pub grpc_method: Option<&'a str>,
    /// The port the request arrived on.
    pub port: u16,
}

/// A name pattern: exact, or a prefix when it ends in `*`.
#[derive(Debug, Clone)]
enum Pattern {
    Exact(Box<str>),
    Prefix(Box<str>),
}

impl Pattern {
    fn new(text: &str) -> Self {
        match text.strip_suffix('*') {
            Some(prefix) => Self::Prefix(prefix.into()),
            None => Self::Exact(text.into()),
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(exact) => value == &**exact,
            Self::Prefix(prefix) => value.starts_with(&**prefix),
        }
    }
}

#[derive(Debug, Clone)]
struct To {
    models: Vec<Pattern>,
    routes: Vec<Box<str>>,
    methods: Vec<Pattern>,
    ports: Vec<u16>,
}

impl To {
    fn new(m: &RequestMatch) -> Self {
        Self {
            models: m.models.iter().map(|p| Pattern::new(p)).collect(),
            routes: m.routes.iter().map(|r| r.as_str().into()).collect(),
            methods: m.methods.iter().map(|p| Pattern::new(p)).collect(),
            ports: m.ports.clone(),
        }
    }

    fn matches(&self, request: &AuthzRequest<'_>) -> bool {
        let any = |patterns: &[Pattern], value: Option<&str>| {
            patterns.is_empty() || value.is_some_and(|v| patterns.iter().any(|p| p.matches(v)))
        };
        any(&self.models, request.model)
            && any(&self.methods, request.grpc_method)
            && (self.routes.is_empty()
                || request
                    .route
                    .is_some_and(|r| self.routes.iter().any(|x| &**x == r)))
            && (self.ports.is_empty() || self.ports.contains(&request.port))
    }
}

#[derive(Debug, Clone)]
struct Rule {
    /// `POLICY rule N`, for the reason given to the caller.
    name: Arc<str>,
    from: Vec<CallerMatch>,
    to: Vec<To>,
}

impl Rule {
    fn matches(&self, request: &AuthzRequest<'_>, trust_domain: Option<&str>) -> bool {
        let caller_ok = self.from.is_empty()
            || request.caller.is_some_and(|caller| {
                self.from.iter().any(|m| match m {
                    CallerMatch::Identity(id) => id == caller,
                    CallerMatch::Namespace(ns) => {
                        caller.namespace() == ns
                            && trust_domain.is_none_or(|td| caller.trust_domain() == td)
                    }
                    CallerMatch::TrustDomain(td) => caller.trust_domain() == td,
                })
            });
        caller_ok && (self.to.is_empty() || self.to.iter().any(|t| t.matches(request)))
    }
}

/// The authorization policies in force for one proxy, compiled.
#[derive(Debug, Clone, Default)]
pub struct Authorizer {
    deny: Vec<Rule>,
    allow: Vec<Rule>,
    /// Whether any policy reaches this proxy (default deny applies).
    enforced: bool,
    /// Whether some rule names models: the model must then be proven.
    by_model: bool,
    /// The mesh's trust domain, for `namespace` callers.
    trust_domain: Option<String>,
}

impl Authorizer {
    /// Compiles `policies`; `trust_domain` is this proxy's (namespace rules
    /// match callers of that trust domain only).
    pub fn new(policies: &[Resource<AuthorizationPolicySpec>], trust_domain: Option<&str>) -> Self {
        let mut out = Self {
            enforced: !policies.is_empty(),
            trust_domain: trust_domain.map(str::to_owned),
            ..Self::default()
        };
        for policy in policies {
            for (i, rule) in policy.spec.rules.iter().enumerate() {
                let compiled = Rule {
                    name: format!(
                        "AuthorizationPolicy {} rule {}",
                        policy.metadata.name,
                        i + 1
                    )
                    .into(),
                    from: rule.from.clone(),
                    to: rule.to.iter().map(To::new).collect(),
                };
                out.by_model |= rule.to.iter().any(|t| !t.models.is_empty());
                match rule.action {
                    AuthorizationAction::Allow => out.allow.push(compiled),
                    AuthorizationAction::Deny => out.deny.push(compiled),
                }
            }
        }
        out
    }

    /// Whether any policy applies: without one every request is allowed.
    pub fn enforced(&self) -> bool {
        self.enforced
    }

    /// Whether a rule names models, so that a request's model must be
    /// known for certain (a body scanned to the end of its object).
    pub fn needs_model(&self) -> bool {
        self.by_model
    }

    /// Allows `request`, or refuses it with the reason.
    pub fn check(&self, request: &AuthzRequest<'_>) -> Result<(), ProxyError> {
        if !self.enforced {
            return Ok(());
        }
        let td = self.trust_domain.as_deref();
        if let Some(rule) = self.deny.iter().find(|r| r.matches(request, td)) {
            return Err(ProxyError::Forbidden(format!(
                "{} denies {}",
                rule.name,
                describe(request)
            )));
        }
        if self.allow.iter().any(|r| r.matches(request, td)) {
            return Ok(());
        }
        Err(ProxyError::Forbidden(format!(
            "no AuthorizationPolicy rule allows {}",
            describe(request)
        )))
    }
}

/// `spiffe://… calling model llama (route chat)`, for the refusal.
fn describe(request: &AuthzRequest<'_>) -> String {
    let mut out = match request.caller {
        Some(caller) => caller.to_string(),
        None => "an unauthenticated caller".to_owned(),
    };
    out.push_str(" calling");
    if let Some(model) = request.model {
        out.push_str(&format!(" model `{model}`"));
    }
    if let Some(method) = request.grpc_method {
        out.push_str(&format!(" method `{method}`"));
    }
    if let Some(route) = request.route {
        out.push_str(&format!(" (route `{route}`)"));
    }
    out.push_str(&format!(" on port {}", request.port));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use infermesh_proto::policy::load_str;
    use std::path::Path;

    fn authorizer(rules: &str) -> Authorizer {
        let text = format!(
            "apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {{name: b}}\nspec: {{endpoints: [\"127.0.0.1:1\"]}}\n---\napiVersion: infermesh.io/v1alpha1\nkind: ModelRoute\nmetadata: {{name: chat}}\nspec: {{listener: inbound, backends: [{{backend: b}}]}}\n---\napiVersion: infermesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p}}\nspec:\n  rules:\n{rules}"
        );
        let set = load_str(Path::new("p.yaml"), &text).unwrap();
        Authorizer::new(&set.authorizations, Some("cluster.local"))
    }

    /// Caller, model, route, gRPC method, port, and whether it is allowed.
    type Case<'a> = (
        Option<&'a SpiffeId>,
        Option<&'a str>,
        Option<&'a str>,
        Option<&'a str>,
        u16,
        bool,
    );

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    #[test]
    fn without_policies_everything_is_allowed() {
        let none = Authorizer::new(&[], None);
        assert!(!none.enforced());
        assert!(none.check(&AuthzRequest::default()).is_ok());
    }

    #[test]
    fn the_matrix_of_callers_models_methods_and_routes() {
        let authz = authorizer(
            "    - from: [{identity: spiffe://cluster.local/ns/apps/sa/web}]\n      to: [{models: [llama-*]}]\n    - from: [{namespace: batch}]\n      to: [{methods: [/inference.GRPCInferenceService/*]}]\n    - from: [{trustDomain: partner.org}]\n      to: [{routes: [chat], ports: [4143]}]\n    - action: deny\n      from: [{identity: spiffe://cluster.local/ns/batch/sa/rogue}]\n",
        );
        assert!(authz.needs_model());
        let web = id("spiffe://cluster.local/ns/apps/sa/web");
        let other = id("spiffe://cluster.local/ns/apps/sa/other");
        let batch = id("spiffe://cluster.local/ns/batch/sa/job");
        let rogue = id("spiffe://cluster.local/ns/batch/sa/rogue");
        let batch_elsewhere = id("spiffe://other.org/ns/batch/sa/job");
        let partner = id("spiffe://partner.org/ns/x/sa/y");
        let infer = "/inference.GRPCInferenceService/ModelInfer";
        let cases: [Case<'_>; 11] = [
            (Some(&web), Some("llama-3-8b"), None, None, 4143, true),
            (Some(&web), Some("mistral"), None, None, 4143, false),
            (Some(&web), None, None, None, 4143, false),
            (Some(&other), Some("llama-3-8b"), None, None, 4143, false),
            (None, Some("llama-3-8b"), None, None, 4143, false),
            (
                Some(&batch),
                Some("anything"),
                None,
                Some(infer),
                4143,
                true,
            ),
            (
                Some(&batch),
                Some("anything"),
                None,
                Some("/grpc.health.v1.Health/Check"),
                4143,
                false,
            ),
            (Some(&batch_elsewhere), None, None, Some(infer), 4143, false),
            (Some(&rogue), None, None, Some(infer), 4143, false),
            (Some(&partner), None, Some("chat"), None, 4143, true),
            (Some(&partner), None, Some("chat"), None, 8080, false),
        ];
        for (i, (caller, model, route, grpc_method, port, allowed)) in cases.into_iter().enumerate()
        {
            let request = AuthzRequest {
                caller,
                model,
                route,
                grpc_method,
                port,
            };
            let result = authz.check(&request);
            assert_eq!(
                result.is_ok(),
                allowed,
                "case {i}: {request:?} -> {result:?}"
            );
            if let Err(error) = result {
                assert_eq!(error.http_status(), http::StatusCode::FORBIDDEN);
                assert_eq!(
                    error.grpc_code(),
                    infermesh_filters::error::grpc_code::PERMISSION_DENIED
                );
            }
        }
        let denied = authz
            .check(&AuthzRequest {
                caller: Some(&rogue),
                grpc_method: Some(infer),
                port: 4143,
                ..AuthzRequest::default()
            })
            .unwrap_err()
            .to_string();
        assert!(
            denied.contains(
                "AuthorizationPolicy p rule 4 denies spiffe://cluster.local/ns/batch/sa/rogue"
            ),
            "{denied}"
        );
        let unallowed = authz
            .check(&AuthzRequest {
                caller: Some(&other),
                model: Some("llama-3-8b"),
                port: 4143,
                ..AuthzRequest::default()
            })
            .unwrap_err()
            .to_string();
        assert!(
            unallowed.contains("no AuthorizationPolicy rule allows spiffe://cluster.local/ns/apps/sa/other calling model `llama-3-8b` on port 4143"),
            "{unallowed}"
        );
    }

    #[test]
    fn a_policy_without_rules_denies_everything() {
        let authz = authorizer("    []\n");
        assert!(authz.enforced());
        assert!(authz.check(&AuthzRequest::default()).is_err());
    }
}
