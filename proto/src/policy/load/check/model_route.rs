//! `ModelRoute` checks: backends and weights, match formats, every part of
//! the route (retries, hedging, rate limits, faults, mirror), and routes
//! that an earlier route makes unreachable.

mod fault;
mod rate_limit;
mod retry;

use fault::fault_problems;
use rate_limit::rate_limit_problems;
use retry::{retry_problems, RetryField};

use super::format::{header_name_problem, percent_problem};
use super::path::{find, P};
use super::reference::BackendNames;
use crate::policy::load::{shadow, Location, PolicyError, Typed};
use crate::policy::{
    local_model_name, scope, DestinationPattern, HedgePolicy, Metadata, MirrorPolicy,
    ModelRouteSpec, StringMatch, WorkloadSelector, PASSTHROUGH_ROUTE,
};
use P::{Only, I, K};

/// `hedging.maxHedges` bound: each hedge multiplies the load of a slow tail.
const MAX_HEDGES: u32 = 4;

/// Mirror bound: each copy in flight holds a request body.
const MAX_MIRROR_IN_FLIGHT: u32 = 10_000;

pub(super) fn route_spec(
    route: &Typed<ModelRouteSpec>,
    backends: &BackendNames<'_>,
    errors: &mut Vec<PolicyError>,
) {
    let (file, tree, spec) = (&route.file, &route.tree, &route.resource.spec);
    let name = &route.resource.metadata.name;
    let mut error = |at: Location, message: String| {
        errors.push(PolicyError::new(file, at, message));
    };
    if name == PASSTHROUGH_ROUTE {
        error(
            find(tree, &[K("metadata"), K("name")]).at,
            format!("the ModelRoute name `{PASSTHROUGH_ROUTE}` is reserved: metrics and logs name intercepted traffic that no route claims so; choose another name"),
        );
    }
    let backends_at = find(tree, &[K("spec"), K("backends")]).at;
    let total_weight: u64 = spec.backends.iter().map(|b| u64::from(b.weight)).sum();
    // After errors dropped some items, these would only echo those errors.
    if !route.repaired {
        if spec.backends.is_empty() {
            error(
                backends_at,
                format!("ModelRoute `{name}` has no backends: list at least one `backend:`"),
            );
        } else if total_weight == 0 {
            error(
                backends_at,
                format!(
                    "the backend weights of ModelRoute `{name}` add up to 0: give at least one backend a positive `weight`"
                ),
            );
        }
    }
    for (i, weighted) in spec.backends.iter().enumerate() {
        if let Some(problem) = backends.unknown(&weighted.backend) {
            error(
                find(tree, &[K("spec"), K("backends"), I(i), K("backend")]).at,
                problem,
            );
        }
    }
    for (i, link) in spec.fallback.iter().enumerate() {
        if let Some(problem) = backends.unknown(&link.backend) {
            error(
                find(tree, &[K("spec"), K("fallback"), I(i), K("backend")]).at,
                problem,
            );
        }
    }
    if let Some(retries) = &spec.retries {
        for (field, problem) in retry_problems(retries, spec.timeouts.first_byte) {
            let at = match field {
                RetryField::Status(i) => {
                    find(
                        tree,
                        &[K("spec"), K("retries"), K("on"), K("statuses"), I(i)],
                    )
                    .at
                }
                RetryField::Key(key) => find(tree, &[K("spec"), K("retries"), K(key)]).at,
                RetryField::Budget(key) => {
                    find(tree, &[K("spec"), K("retries"), K("budget"), K(key)]).at
                }
            };
            error(at, problem);
        }
    }
    if let Some(hedging) = &spec.hedging {
        for (key, problem) in hedge_problems(hedging, spec.timeouts.first_byte) {
            error(find(tree, &[K("spec"), K("hedging"), K(key)]).at, problem);
        }
    }
    for (i, limit) in spec.rate_limits.iter().enumerate() {
        for (field, problem) in rate_limit_problems(limit) {
            let item = [K("spec"), K("rateLimits"), I(i)];
            let at = match field {
                None => find(tree, &item).at,
                Some("key") => find(tree, &[K("spec"), K("rateLimits"), I(i), K("key"), Only]).at,
                Some(field) => find(tree, &[K("spec"), K("rateLimits"), I(i), K(field)]).at,
            };
            error(at, problem);
        }
    }
    if let Some(faults) = &spec.faults {
        for (path, problem) in fault_problems(faults) {
            let mut steps = vec![K("spec"), K("faults")];
            steps.extend(path.iter().map(|key| K(key)));
            error(find(tree, &steps).at, problem);
        }
    }
    if let Some(mirror) = &spec.mirror {
        for (field, problem) in mirror_problems(mirror, backends) {
            error(find(tree, &[K("spec"), K("mirror"), K(field)]).at, problem);
        }
    }
    for (i, matches) in spec.matches.iter().enumerate() {
        for (j, header) in matches.headers.iter().enumerate() {
            if let Some(problem) = header_name_problem(&header.name) {
                let path = [K("spec"), K("match"), I(i), K("headers"), I(j), K("name")];
                error(find(tree, &path).at, problem);
            }
        }
        for (j, pattern) in matches.destination.iter().enumerate() {
            if let Err(problem) = pattern.parse::<DestinationPattern>() {
                let path = [K("spec"), K("match"), I(i), K("destination"), I(j)];
                error(find(tree, &path).at, problem.to_string());
            }
        }
        let (how, path) = match &matches.path {
            Some(StringMatch::Exact(path)) => ("exact", path),
            Some(StringMatch::Prefix(path)) => ("prefix", path),
            None => continue,
        };
        if !path.starts_with('/') {
            error(
                find(tree, &[K("spec"), K("match"), I(i), K("path"), Only]).at,
                format!("path {how} `{path}` must start with `/`"),
            );
        }
    }
}

/// What is wrong with a route's `hedging`; each problem comes with its key.
/// `first_byte` is the route's `timeouts.firstByte`.
pub(super) fn hedge_problems(
    hedging: &HedgePolicy,
    first_byte: Option<std::time::Duration>,
) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    if hedging.delay.is_zero() {
        problems.push((
            "delay",
            "a hedging `delay` of zero sends every request twice: give the time a response usually takes to start".into(),
        ));
    } else if let Some(first_byte) = first_byte.filter(|limit| hedging.delay >= *limit) {
        problems.push((
            "delay",
            format!(
                "hedging `delay` ({}ms) must be shorter than the route's `timeouts.firstByte` ({}ms), or no hedge is ever sent",
                hedging.delay.as_millis(),
                first_byte.as_millis()
            ),
        ));
    }
    if !(1..=MAX_HEDGES).contains(&hedging.max_hedges) {
        problems.push((
            "maxHedges",
            format!(
                "`maxHedges` must be between 1 and {MAX_HEDGES}, found {} (remove `hedging` to turn it off)",
                hedging.max_hedges
            ),
        ));
    }
    problems
}

/// What is wrong with a route's mirror, by field.
fn mirror_problems(
    mirror: &MirrorPolicy,
    backends: &BackendNames<'_>,
) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    let backend = &mirror.backend;
    let problem = if local_model_name(backend).is_some() {
        Some(format!(
            "`{backend}`: copies go to a remote backend; a local model cannot be a mirror"
        ))
    } else {
        backends.unknown(backend)
    };
    if let Some(problem) = problem {
        problems.push(("backend", problem));
    }
    if let Some(problem) = percent_problem(mirror.percent) {
        problems.push(("percent", problem));
    }
    if !(1..=MAX_MIRROR_IN_FLIGHT).contains(&mirror.max_in_flight) {
        problems.push((
            "maxInFlight",
            format!(
                "`maxInFlight` must be between 1 and {MAX_MIRROR_IN_FLIGHT}, found {}",
                mirror.max_in_flight
            ),
        ));
    }
    if mirror.timeout.is_zero() {
        problems.push((
            "timeout",
            "`timeout` must be above zero: every copy would be abandoned".to_owned(),
        ));
    }
    problems
}

/// A route is unreachable when, for every request it matches, an earlier
/// route of the same listener that reaches at least the same proxies
/// matches too. Routes with errors of their own are left out: what was
/// dropped from them could make them look broader or narrower than written.
pub(super) fn unreachable_routes(routes: &[Typed<ModelRouteSpec>], errors: &mut Vec<PolicyError>) {
    let routes: Vec<&Typed<ModelRouteSpec>> = routes.iter().filter(|r| !r.repaired).collect();
    for (i, later) in routes.iter().enumerate() {
        let earlier: Vec<&Typed<ModelRouteSpec>> = routes[..i]
            .iter()
            .copied()
            .filter(|e| scope::covers(scope_of(e), scope_of(later)))
            .collect();
        let specs: Vec<&ModelRouteSpec> = earlier.iter().map(|e| &e.resource.spec).collect();
        let Some(by) = shadow::shadowed_by(&later.resource.spec, &specs) else {
            continue;
        };
        let mut takers: Vec<&Typed<ModelRouteSpec>> = Vec::new();
        for index in by {
            if !takers.iter().any(|t| std::ptr::eq(*t, earlier[index])) {
                takers.push(earlier[index]);
            }
        }
        let name = &later.resource.metadata.name;
        let at = find(&later.tree, &[K("metadata"), K("name")]).at;
        let described = |r: &Typed<ModelRouteSpec>| {
            let at = find(&r.tree, &[K("metadata"), K("name")]).at;
            format!("`{}` ({}:{at})", r.resource.metadata.name, r.file.display())
        };
        let message = match takers.as_slice() {
            [one] if one.resource.spec.matches.is_empty() => format!(
                "ModelRoute `{name}` is unreachable: ModelRoute {} comes before it and has no `match`, so it takes every request; move `{name}` before it, or give `{}` a `match`",
                described(one),
                one.resource.metadata.name
            ),
            [one] => format!(
                "ModelRoute `{name}` is unreachable: ModelRoute {} comes before it and matches every request it matches; move `{name}` before it, or narrow the `match` of `{}`",
                described(one),
                one.resource.metadata.name
            ),
            many => {
                let mut list: Vec<String> = many.iter().map(|r| described(r)).collect();
                let last = list.pop().unwrap_or_default();
                format!(
                    "ModelRoute `{name}` is unreachable: ModelRoutes {} and {last} come before it and together match every request it matches; move `{name}` before them, or narrow their `match`",
                    list.join(", ")
                )
            }
        };
        errors.push(PolicyError::new(&later.file, at, message));
    }
}

fn scope_of(route: &Typed<ModelRouteSpec>) -> (&Metadata, Option<&WorkloadSelector>) {
    (
        &route.resource.metadata,
        route.resource.spec.workload_selector.as_ref(),
    )
}
