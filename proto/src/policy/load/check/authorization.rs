//! `AuthorizationPolicy` checks: caller names, request patterns, and the
//! routes a rule names.

use super::format::{method_problem, namespace_problem, pattern_problem};
use super::path::{find, P};
use crate::policy::load::{did_you_mean, Kind, Loader, PolicyError, Typed};
use crate::policy::{AuthorizationPolicySpec, CallerMatch};
use P::{Only, I, K};

/// Caller namespaces and trust domains are well formed, method patterns
/// look like gRPC paths, and named routes exist: a typo in an allow rule
/// would otherwise deny silently.
pub(super) fn authorization_spec(
    loader: &Loader,
    policy: &Typed<AuthorizationPolicySpec>,
    errors: &mut Vec<PolicyError>,
) {
    let (file, tree, spec) = (&policy.file, &policy.tree, &policy.resource.spec);
    let routes: Vec<&str> = loader
        .documents
        .iter()
        .filter(|d| d.kind == Kind::ModelRoute)
        .filter_map(|d| d.name.as_ref().map(|(n, _)| n.as_str()))
        .collect();
    for (r, rule) in spec.rules.iter().enumerate() {
        for (c, caller) in rule.from.iter().enumerate() {
            let problem = match caller {
                CallerMatch::Identity(_) => None,
                CallerMatch::Namespace(ns) => namespace_problem(ns),
                CallerMatch::TrustDomain(td) => crate::spiffe::check_trust_domain(td)
                    .err()
                    .map(|e| e.to_string()),
            };
            if let Some(problem) = problem {
                let at = find(tree, &[K("spec"), K("rules"), I(r), K("from"), I(c), Only]).at;
                errors.push(PolicyError::new(file, at, problem));
            }
        }
        for (t, to) in rule.to.iter().enumerate() {
            let at = |field: &str, i: usize| {
                find(
                    tree,
                    &[K("spec"), K("rules"), I(r), K("to"), I(t), K(field), I(i)],
                )
                .at
            };
            for (i, pattern) in to.models.iter().enumerate() {
                if let Some(problem) = pattern_problem(pattern) {
                    errors.push(PolicyError::new(file, at("models", i), problem));
                }
            }
            for (i, method) in to.methods.iter().enumerate() {
                if let Some(problem) = method_problem(method) {
                    errors.push(PolicyError::new(file, at("methods", i), problem));
                }
            }
            for (i, route) in to.routes.iter().enumerate() {
                if routes.contains(&route.as_str()) {
                    continue;
                }
                let mut problem = format!("unknown route `{route}`: no ModelRoute has this name");
                if let Some(close) = did_you_mean(route, routes.iter().copied()) {
                    problem.push_str(&format!("; did you mean `{close}`?"));
                }
                errors.push(PolicyError::new(file, at("routes", i), problem));
            }
            for (i, port) in to.ports.iter().enumerate() {
                if *port == 0 {
                    errors.push(PolicyError::new(
                        file,
                        at("ports", i),
                        "port 0 is not a port a request can arrive on",
                    ));
                }
            }
        }
    }
}
