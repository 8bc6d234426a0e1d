//! Checks that serde's types cannot express: value formats (names,
//! endpoints, header names, paths, ranges, namespaces, labels) and
//! references across documents and files (backend names, one `MeshConfig`,
//! unique names, routes that an earlier route makes unreachable).
//!
//! The format checks are plain functions returning the message, tested on
//! their own; [`set`] walks the loaded documents and locates each problem at
//! the offending node.

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::path::Path;

use super::shadow;
use super::yaml::{Node, Value};
use super::{did_you_mean, Kind, Loader, Location, PolicyError, Typed};
use crate::policy::{
    local_model_name, scope, AuthorizationPolicySpec, BackendLimits, BackendSpec, CallerMatch,
    FaultPolicy, HedgePolicy, LocalModelSpec, MeshConfigSpec, Metadata, MirrorPolicy,
    ModelRouteSpec, OutlierDetection, RateLimitKey, RateLimitPolicy, RetryPolicy, StringMatch,
    WorkloadSelector,
};

/// `classify.maxBodyPrefix` bounds: below 1 KiB no model name is found in
/// practice, above 16 MiB the proxy would hold whole uploads in memory.
const MIN_BODY_PREFIX: u32 = 1024;
const MAX_BODY_PREFIX: u32 = 16 * 1024 * 1024;
/// `retries.maxAttempts` bounds: more than 10 attempts only deepen an outage.
const MAX_ATTEMPTS: u32 = 10;
/// `retries.maxReplayBytes` bound: each retried request may hold this much.
const MAX_REPLAY_BYTES: u32 = 16 * 1024 * 1024;
/// `LocalModel` bounds: a forward pass of more sequences only adds latency
/// on the devices the engine targets; BERT models have 512 positions; one
/// request carries at most OpenAI's 2048 inputs; a batch waits at most 1 s.
const MAX_LOCAL_BATCH_SIZE: u32 = 256;
const MAX_LOCAL_BATCH_TOKENS: u32 = 1 << 20;
const MAX_LOCAL_TOKENS: u32 = 512;
const MAX_LOCAL_INPUTS: u32 = 2048;
/// `LocalModel.maxQueued` bound.
const MAX_LOCAL_QUEUED: u32 = 1_000_000;
const MAX_LOCAL_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
/// `outlierDetection` bounds: a failure-rate window shorter than a second
/// judges too few requests, one longer than an hour remembers an outage
/// long gone; an ejection longer than a day is a removal, which belongs in
/// the endpoint list.
const MIN_FAILURE_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);
const MAX_FAILURE_WINDOW: std::time::Duration = std::time::Duration::from_secs(3600);
const MAX_EJECTION: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
const MAX_CONSECUTIVE_FAILURES: u32 = 1000;
/// `hedging.maxHedges` bound: each hedge multiplies the load of a slow tail.
const MAX_HEDGES: u32 = 4;
/// Rate-limit bounds: past a million requests a second one sidecar's bucket
/// means nothing; a million keys of buckets is tens of megabytes.
const MAX_REQUESTS_PER_SECOND: f64 = 1_000_000.0;
const MAX_RATE_LIMIT_KEYS: u32 = 1_000_000;
/// Mirror bound: each copy in flight holds a request body.
const MAX_MIRROR_IN_FLIGHT: u32 = 10_000;

/// Every cross-document and value-format check over a loaded set.
pub(super) fn set(loader: &Loader) -> Vec<PolicyError> {
    let backends = BackendNames::of(loader);
    let mut errors = Vec::new();
    names(loader, &mut errors);
    for backend in &loader.backends {
        metadata(
            &backend.file,
            &backend.tree,
            &backend.resource.metadata,
            &mut errors,
        );
        backend_spec(backend, &mut errors);
    }
    for model in &loader.local_models {
        metadata(
            &model.file,
            &model.tree,
            &model.resource.metadata,
            &mut errors,
        );
        local_model_spec(model, &mut errors);
    }
    for route in &loader.routes {
        metadata(
            &route.file,
            &route.tree,
            &route.resource.metadata,
            &mut errors,
        );
        let selector = route.resource.spec.workload_selector.as_ref();
        workload_selector(&route.file, &route.tree, selector, &mut errors);
        route_spec(route, &backends, &mut errors);
    }
    unreachable_routes(&loader.routes, &mut errors);
    for mesh in &loader.meshes {
        metadata(&mesh.file, &mesh.tree, &mesh.resource.metadata, &mut errors);
        let selector = mesh.resource.spec.workload_selector.as_ref();
        workload_selector(&mesh.file, &mesh.tree, selector, &mut errors);
        mesh_spec(mesh, &backends, &mut errors);
    }
    for policy in &loader.authorizations {
        metadata(
            &policy.file,
            &policy.tree,
            &policy.resource.metadata,
            &mut errors,
        );
        let selector = policy.resource.spec.workload_selector.as_ref();
        workload_selector(&policy.file, &policy.tree, selector, &mut errors);
        authorization_spec(loader, policy, &mut errors);
    }
    errors
}

/// Caller namespaces and trust domains are well formed, method patterns
/// look like gRPC paths, and named routes exist: a typo in an allow rule
/// would otherwise deny silently.
fn authorization_spec(
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

/// `metadata.namespace` and `metadata.labels` are what Kubernetes accepts.
fn metadata(file: &Path, tree: &Node, metadata: &Metadata, errors: &mut Vec<PolicyError>) {
    if let Some(problem) = metadata.namespace.as_deref().and_then(namespace_problem) {
        let at = find(tree, &[K("metadata"), K("namespace")]).at;
        errors.push(PolicyError::new(file, at, problem));
    }
    labels(
        file,
        tree,
        &[K("metadata"), K("labels")],
        &metadata.labels,
        errors,
    );
}

fn workload_selector(
    file: &Path,
    tree: &Node,
    selector: Option<&WorkloadSelector>,
    errors: &mut Vec<PolicyError>,
) {
    if let Some(selector) = selector {
        let path = [K("spec"), K("workloadSelector"), K("matchLabels")];
        labels(file, tree, &path, &selector.match_labels, errors);
    }
}

fn scope_of(route: &Typed<ModelRouteSpec>) -> (&Metadata, Option<&WorkloadSelector>) {
    (
        &route.resource.metadata,
        route.resource.spec.workload_selector.as_ref(),
    )
}

/// Each label key is checked at the key, each value at the value.
fn labels(
    file: &Path,
    tree: &Node,
    path: &[P<'_>],
    labels: &std::collections::BTreeMap<String, String>,
    errors: &mut Vec<PolicyError>,
) {
    for (key, value) in labels {
        let mut at = |step: P<'_>, problem: String| {
            let mut full = path.to_vec();
            full.push(step);
            errors.push(PolicyError::new(file, find(tree, &full).at, problem));
        };
        if let Some(problem) = label_key_problem(key) {
            at(KeyOf(key), problem);
        }
        if let Some(problem) = label_value_problem(value) {
            at(K(key), problem);
        }
    }
}

/// A route is unreachable when, for every request it matches, an earlier
/// route of the same listener that reaches at least the same proxies
/// matches too. Routes with errors of their own are left out: what was
/// dropped from them could make them look broader or narrower than written.
fn unreachable_routes(routes: &[Typed<ModelRouteSpec>], errors: &mut Vec<PolicyError>) {
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

/// Names are valid and unique per kind, and there is one `MeshConfig`.
/// They come from every document, typed or not, so that a document with a
/// mistake elsewhere still counts as defining its name.
fn names(loader: &Loader, errors: &mut Vec<PolicyError>) {
    let mut first_of: HashMap<(Kind, &str), (&Path, Location)> = HashMap::new();
    let mut first_mesh: Option<(&Path, Location)> = None;
    for doc in &loader.documents {
        if doc.kind == Kind::MeshConfig {
            match first_mesh {
                None => first_mesh = Some((&doc.file, doc.kind_at)),
                Some((file, at)) => errors.push(PolicyError::new(
                    &doc.file,
                    doc.kind_at,
                    format!(
                        "only one MeshConfig is allowed; the first one is at {}:{at}",
                        file.display()
                    ),
                )),
            }
        }
        let Some((name, at)) = &doc.name else {
            continue;
        };
        if let Some(problem) = name_problem(name) {
            errors.push(PolicyError::new(&doc.file, *at, problem));
            continue;
        }
        if doc.kind == Kind::MeshConfig {
            continue;
        }
        match first_of.get(&(doc.kind, name.as_str())) {
            Some((file, first)) => errors.push(PolicyError::new(
                &doc.file,
                *at,
                format!(
                    "duplicate {} name `{name}`: already used at {}:{first}",
                    doc.kind.as_str(),
                    file.display()
                ),
            )),
            None => {
                first_of.insert((doc.kind, name), (&doc.file, *at));
            }
        }
    }
}

/// The names `Backend` and `LocalModel` documents define, for checking
/// references.
struct BackendNames<'a> {
    backends: Vec<&'a str>,
    local_models: Vec<&'a str>,
}

impl<'a> BackendNames<'a> {
    fn of(loader: &'a Loader) -> Self {
        let names = |kind: Kind| {
            loader
                .documents
                .iter()
                .filter(|d| d.kind == kind)
                .filter_map(|d| d.name.as_ref().map(|(n, _)| n.as_str()))
                .collect()
        };
        Self {
            backends: names(Kind::Backend),
            local_models: names(Kind::LocalModel),
        }
    }

    /// The message for a reference to a backend (or, written `local:NAME`,
    /// a local model) that does not exist.
    fn unknown(&self, name: &str) -> Option<String> {
        if let Some(local) = local_model_name(name) {
            if self.local_models.contains(&local) {
                return None;
            }
            let mut message = format!("unknown local model `{local}`: no LocalModel has this name");
            if let Some(close) = did_you_mean(local, self.local_models.iter().copied()) {
                message.push_str(&format!("; did you mean `local:{close}`?"));
            } else if self.backends.contains(&local) {
                message.push_str(&format!(
                    "; `{local}` is a Backend: name it without `local:`"
                ));
            }
            return Some(message);
        }
        if self.backends.contains(&name) {
            return None;
        }
        let mut message = format!("unknown backend `{name}`: no Backend has this name");
        if let Some(close) = did_you_mean(name, self.backends.iter().copied()) {
            message.push_str(&format!("; did you mean `{close}`?"));
        } else if self.local_models.contains(&name) {
            message.push_str(&format!("; `{name}` is a LocalModel: write `local:{name}`"));
        }
        Some(message)
    }
}

/// Bounds of a `LocalModel`, each located at its field.
fn local_model_spec(model: &Typed<LocalModelSpec>, errors: &mut Vec<PolicyError>) {
    let (file, tree, spec) = (&model.file, &model.tree, &model.resource.spec);
    for (field, problem) in local_model_problems(spec) {
        let at = find(tree, &[K("spec"), K(field)]).at;
        errors.push(PolicyError::new(file, at, problem));
    }
}

/// What is wrong with a `LocalModel` spec, by field.
pub(in crate::policy) fn local_model_problems(
    spec: &LocalModelSpec,
) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    if spec.model_dir.trim().is_empty() {
        problems.push((
            "modelDir",
            "`modelDir` is empty: give the directory that holds config.json, model.safetensors and tokenizer.json".to_owned(),
        ));
    }
    let mut range = |field: &'static str, value: u32, min: u32, max: u32| {
        if !(min..=max).contains(&value) {
            problems.push((
                field,
                format!("`{field}` must be between {min} and {max}, found {value}"),
            ));
        }
    };
    range("maxBatchSize", spec.max_batch_size, 1, MAX_LOCAL_BATCH_SIZE);
    range("maxTokens", spec.max_tokens, 2, MAX_LOCAL_TOKENS);
    range("maxInputs", spec.max_inputs, 1, MAX_LOCAL_INPUTS);
    range("maxQueued", spec.max_queued, 1, MAX_LOCAL_QUEUED);
    range(
        "maxBatchTokens",
        spec.max_batch_tokens,
        spec.max_tokens.clamp(2, MAX_LOCAL_TOKENS),
        MAX_LOCAL_BATCH_TOKENS,
    );
    if spec.max_wait > MAX_LOCAL_WAIT {
        problems.push((
            "maxWait",
            format!(
                "`maxWait` ({}ms) must be at most 1s: every request waits this long when it is alone",
                spec.max_wait.as_millis()
            ),
        ));
    }
    problems
}

fn backend_spec(backend: &Typed<BackendSpec>, errors: &mut Vec<PolicyError>) {
    let (file, tree, spec) = (&backend.file, &backend.tree, &backend.resource.spec);
    if spec.endpoints.is_empty() && !backend.repaired {
        let name = &backend.resource.metadata.name;
        errors.push(PolicyError::new(
            file,
            find(tree, &[K("spec"), K("endpoints")]).at,
            format!("Backend `{name}` has no endpoints: list at least one `host:port`"),
        ));
    }
    for (i, endpoint) in spec.endpoints.iter().enumerate() {
        if let Some(problem) = endpoint_problem(endpoint) {
            let at = find(tree, &[K("spec"), K("endpoints"), I(i)]).at;
            errors.push(PolicyError::new(file, at, problem));
        }
    }
    let problems = spec
        .outlier_detection
        .as_ref()
        .map(outlier_problems)
        .into_iter()
        .flatten()
        .map(|(keys, problem)| {
            (
                ["outlierDetection"]
                    .iter()
                    .chain(keys)
                    .copied()
                    .collect::<Vec<_>>(),
                problem,
            )
        })
        .chain(
            spec.limits
                .as_ref()
                .map(limits_problems)
                .into_iter()
                .flatten()
                .map(|(key, problem)| (vec!["limits", key], problem)),
        );
    for (keys, problem) in problems {
        let path: Vec<P<'_>> = std::iter::once(K("spec"))
            .chain(keys.into_iter().map(K))
            .collect();
        errors.push(PolicyError::new(file, find(tree, &path).at, problem));
    }
}

/// What is wrong with an `outlierDetection`: bounds, and settings that
/// could never eject anything. Each problem comes with the keys of its
/// field under `outlierDetection`.
pub(super) fn outlier_problems(
    outlier: &OutlierDetection,
) -> Vec<(&'static [&'static str], String)> {
    let mut problems: Vec<(&'static [&'static str], String)> = Vec::new();
    if outlier.consecutive_failures > MAX_CONSECUTIVE_FAILURES {
        problems.push((
            &["consecutiveFailures"],
            format!(
                "`consecutiveFailures` must be at most {MAX_CONSECUTIVE_FAILURES}, found {}",
                outlier.consecutive_failures
            ),
        ));
    }
    if outlier.consecutive_failures == 0 && outlier.failure_rate.is_none() {
        problems.push((
            &["consecutiveFailures"],
            "`consecutiveFailures: 0` without a `failureRate` never ejects an endpoint: set one of them, or remove `outlierDetection`".into(),
        ));
    }
    if let Some(rate) = &outlier.failure_rate {
        if !(rate.threshold > 0.0 && rate.threshold <= 1.0) {
            problems.push((
                &["failureRate", "threshold"],
                format!(
                    "failure-rate `threshold` is a share of requests: above 0 and at most 1, found {}",
                    rate.threshold
                ),
            ));
        }
        if rate.min_requests == 0 {
            problems.push((
                &["failureRate", "minRequests"],
                "`minRequests` must be at least 1: a rate over no requests means nothing".into(),
            ));
        }
        if !(MIN_FAILURE_WINDOW..=MAX_FAILURE_WINDOW).contains(&rate.window) {
            problems.push((
                &["failureRate", "window"],
                format!(
                    "failure-rate `window` must be between 1s and 1h, found {}ms",
                    rate.window.as_millis()
                ),
            ));
        }
    }
    if outlier.base_ejection.is_zero() || outlier.base_ejection > outlier.max_ejection {
        problems.push((
            &["baseEjection"],
            format!(
                "`baseEjection` ({}ms) must be above zero and at most `maxEjection` ({}ms)",
                outlier.base_ejection.as_millis(),
                outlier.max_ejection.as_millis()
            ),
        ));
    }
    if outlier.max_ejection > MAX_EJECTION {
        problems.push((
            &["maxEjection"],
            format!(
                "`maxEjection` must be at most 24h, found {}s; remove an endpoint for good from `endpoints`",
                outlier.max_ejection.as_secs()
            ),
        ));
    }
    if outlier.max_ejected_percent > 100 {
        problems.push((
            &["maxEjectedPercent"],
            format!(
                "`maxEjectedPercent` is a percentage of the endpoints: at most 100, found {}",
                outlier.max_ejected_percent
            ),
        ));
    }
    problems
}

/// What is wrong with a backend's `limits`; each problem comes with its key.
pub(super) fn limits_problems(limits: &BackendLimits) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    for (key, value) in [
        ("maxInFlight", limits.max_in_flight),
        ("maxPending", limits.max_pending),
    ] {
        if value == Some(0) {
            problems.push((
                key,
                format!(
                    "`{key}: 0` refuses every request: give at least 1, or remove it for no limit"
                ),
            ));
        }
    }
    if let (Some(pending), Some(in_flight)) = (limits.max_pending, limits.max_in_flight) {
        if pending > in_flight {
            problems.push((
                "maxPending",
                format!(
                    "`maxPending` ({pending}) can never be reached: pending requests are in flight too, and `maxInFlight` is {in_flight}"
                ),
            ));
        }
    }
    problems
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

fn route_spec(
    route: &Typed<ModelRouteSpec>,
    backends: &BackendNames<'_>,
    errors: &mut Vec<PolicyError>,
) {
    let (file, tree, spec) = (&route.file, &route.tree, &route.resource.spec);
    let name = &route.resource.metadata.name;
    let mut error = |at: Location, message: String| {
        errors.push(PolicyError::new(file, at, message));
    };
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

fn mesh_spec(
    mesh: &Typed<MeshConfigSpec>,
    backends: &BackendNames<'_>,
    errors: &mut Vec<PolicyError>,
) {
    let (file, tree, spec) = (&mesh.file, &mesh.tree, &mesh.resource.spec);
    let opaque_problem = spec.opaque.backend.as_deref().and_then(|b| {
        if local_model_name(b).is_some() {
            Some(format!(
                "`{b}`: a local model cannot receive opaque TCP connections; name a Backend"
            ))
        } else {
            backends.unknown(b)
        }
    });
    if let Some(problem) = opaque_problem {
        let at = find(tree, &[K("spec"), K("opaque"), K("backend")]).at;
        errors.push(PolicyError::new(file, at, problem));
    }
    let prefix = spec.classify.max_body_prefix;
    if !(MIN_BODY_PREFIX..=MAX_BODY_PREFIX).contains(&prefix) {
        let at = find(tree, &[K("spec"), K("classify"), K("maxBodyPrefix")]).at;
        errors.push(PolicyError::new(
            file,
            at,
            format!(
                "`maxBodyPrefix` must be between {MIN_BODY_PREFIX} (1 KiB) and {MAX_BODY_PREFIX} (16 MiB) bytes, found {prefix}"
            ),
        ));
    }
}

/// One step of a lookup path.
#[derive(Clone, Copy)]
enum P<'a> {
    /// The value under a mapping key.
    K(&'a str),
    /// A mapping key itself (the last step).
    KeyOf(&'a str),
    /// A sequence item.
    I(usize),
    /// The value of a one-entry mapping (`{prefix: …}`).
    Only,
}
use P::{KeyOf, Only, I, K};

/// The node at `path`, or the deepest node on the way there (a defaulted
/// field has no node of its own).
fn find<'n>(tree: &'n Node, path: &[P<'_>]) -> &'n Node {
    let mut node = tree;
    for step in path {
        let next = match (step, &node.value) {
            (K(key), _) => node.get(key),
            (KeyOf(key), Value::Map(entries)) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(k, _)| k),
            (I(i), Value::Seq(items)) => items.get(*i),
            (Only, Value::Map(entries)) => entries.first().map(|(_, v)| v),
            _ => None,
        };
        match next {
            Some(next) => node = next,
            None => break,
        }
    }
    node
}

// === value formats ===

/// Name patterns in authorization rules: a `*` only at the end.
pub(super) fn pattern_problem(pattern: &str) -> Option<String> {
    if pattern.is_empty() {
        return Some("an empty pattern matches nothing; write `*` to match everything".into());
    }
    let body = pattern.strip_suffix('*').unwrap_or(pattern);
    body.contains('*')
        .then(|| format!("`{pattern}`: `*` is allowed only at the end, as a prefix match"))
}

/// gRPC method patterns: `/package.Service/Method`, `/package.Service/*`.
pub(super) fn method_problem(method: &str) -> Option<String> {
    if let Some(problem) = pattern_problem(method) {
        return Some(problem);
    }
    if method == "*" {
        return None;
    }
    let shape_ok = method
        .strip_prefix('/')
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(service, m)| !service.is_empty() && !m.is_empty() && !m.contains('/'));
    (!shape_ok).then(|| {
        format!(
            "`{method}` is not a gRPC method: write `/package.Service/Method` or `/package.Service/*`"
        )
    })
}

/// Where in `retries` a problem is.
#[derive(Debug, PartialEq)]
pub(super) enum RetryField {
    /// A field of `retries`.
    Key(&'static str),
    /// A field of `retries.budget`.
    Budget(&'static str),
    /// An item of `retries.on.statuses`.
    Status(usize),
}

/// What is wrong with a retry policy: bounds, and settings that could never
/// take effect. `first_byte` is the route's `timeouts.firstByte`.
pub(super) fn retry_problems(
    retries: &RetryPolicy,
    first_byte: Option<std::time::Duration>,
) -> Vec<(RetryField, String)> {
    let mut problems = Vec::new();
    if !(2..=MAX_ATTEMPTS).contains(&retries.max_attempts) {
        problems.push((
            RetryField::Key("maxAttempts"),
            format!(
                "`maxAttempts` counts the first attempt too: it must be between 2 and {MAX_ATTEMPTS}, found {} (remove `retries` to turn retries off)",
                retries.max_attempts
            ),
        ));
    }
    for (i, &status) in retries.on.statuses.iter().enumerate() {
        if !(status == 408 || status == 429 || (500..=599).contains(&status)) {
            problems.push((
                RetryField::Status(i),
                format!("status {status} cannot be retried: list 408, 429 or a 5xx status"),
            ));
        }
    }
    if let (Some(per_try), Some(first_byte)) = (retries.per_try_timeout, first_byte) {
        if per_try >= first_byte {
            problems.push((
                RetryField::Key("perTryTimeout"),
                format!(
                    "`perTryTimeout` ({}ms) must be shorter than the route's `timeouts.firstByte` ({}ms), which bounds every attempt together",
                    per_try.as_millis(),
                    first_byte.as_millis()
                ),
            ));
        }
    }
    if retries.backoff_base.is_zero() || retries.backoff_base > retries.backoff_max {
        problems.push((
            RetryField::Key("backoffBase"),
            format!(
                "`backoffBase` ({}ms) must be above zero and at most `backoffMax` ({}ms)",
                retries.backoff_base.as_millis(),
                retries.backoff_max.as_millis()
            ),
        ));
    }
    if retries.max_replay_bytes > MAX_REPLAY_BYTES {
        problems.push((
            RetryField::Key("maxReplayBytes"),
            format!(
                "`maxReplayBytes` must be at most {MAX_REPLAY_BYTES} (16 MiB), found {}",
                retries.max_replay_bytes
            ),
        ));
    }
    let ratio = retries.budget.ratio;
    if !(0.0..=1.0).contains(&ratio) {
        problems.push((
            RetryField::Budget("ratio"),
            format!(
                "budget `ratio` must be between 0 and 1 (retries per request sent), found {ratio}"
            ),
        ));
    }
    if retries.budget.min_per_second > 1000 {
        problems.push((
            RetryField::Budget("minPerSecond"),
            format!(
                "budget `minPerSecond` must be at most 1000, found {}",
                retries.budget.min_per_second
            ),
        ));
    }
    problems
}

/// What is wrong with a rate limit, by field (`None`: the limit as a whole).
pub(super) fn rate_limit_problems(limit: &RateLimitPolicy) -> Vec<(Option<&'static str>, String)> {
    let mut problems = Vec::new();
    if limit.requests_per_second.is_none() && limit.tokens_per_minute.is_none() {
        problems.push((
            None,
            "a rate limit needs `requestsPerSecond`, `tokensPerMinute` or both".to_owned(),
        ));
    }
    if let Some(rate) = limit.requests_per_second {
        if !(rate > 0.0 && rate <= MAX_REQUESTS_PER_SECOND) {
            problems.push((
                Some("requestsPerSecond"),
                format!("`requestsPerSecond` must be above 0 and at most {MAX_REQUESTS_PER_SECOND}, found {rate}"),
            ));
        }
    }
    match (limit.burst, limit.requests_per_second) {
        (Some(_), None) => problems.push((
            Some("burst"),
            "`burst` is the most requests at once above `requestsPerSecond`, which is not set"
                .to_owned(),
        )),
        (Some(0), Some(_)) => problems.push((
            Some("burst"),
            "`burst` must be at least 1: a bucket that holds nothing refuses every request"
                .to_owned(),
        )),
        _ => {}
    }
    if limit.tokens_per_minute == Some(0) {
        problems.push((
            Some("tokensPerMinute"),
            "`tokensPerMinute` must be above 0 (remove the limit to turn it off)".to_owned(),
        ));
    }
    match (limit.token_burst, limit.tokens_per_minute) {
        (Some(_), None) => problems.push((
            Some("tokenBurst"),
            "`tokenBurst` is the most tokens at once under `tokensPerMinute`, which is not set"
                .to_owned(),
        )),
        (Some(0), Some(_)) => problems.push((
            Some("tokenBurst"),
            "`tokenBurst` must be at least 1: a bucket that holds nothing refuses every request"
                .to_owned(),
        )),
        _ => {}
    }
    if !(1..=MAX_RATE_LIMIT_KEYS).contains(&limit.max_keys) {
        problems.push((
            Some("maxKeys"),
            format!(
                "`maxKeys` must be between 1 and {MAX_RATE_LIMIT_KEYS}, found {}",
                limit.max_keys
            ),
        ));
    }
    if let RateLimitKey::Header(name) = &limit.key {
        if let Some(problem) = header_name_problem(name) {
            problems.push((Some("key"), problem));
        }
    }
    problems
}

fn percent_problem(percent: f64) -> Option<String> {
    (!(0.0..=100.0).contains(&percent))
        .then(|| format!("`percent` must be between 0 and 100, found {percent}"))
}

/// What is wrong with a route's faults, by path under `faults`.
pub(super) fn fault_problems(faults: &FaultPolicy) -> Vec<(Vec<&'static str>, String)> {
    let mut problems = Vec::new();
    if faults.delay.is_none() && faults.abort.is_none() {
        problems.push((
            Vec::new(),
            "`faults` needs a `delay`, an `abort` or both".to_owned(),
        ));
    }
    if let Some(delay) = &faults.delay {
        if let Some(problem) = percent_problem(delay.percent) {
            problems.push((vec!["delay", "percent"], problem));
        }
    }
    if let Some(abort) = &faults.abort {
        if let Some(problem) = percent_problem(abort.percent) {
            problems.push((vec!["abort", "percent"], problem));
        }
        match (abort.status, abort.grpc_status) {
            (None, None) => problems.push((
                vec!["abort"],
                "an `abort` needs a `status` (HTTP), a `grpcStatus` or both".to_owned(),
            )),
            (Some(status), _) if !(400..=599).contains(&status) => problems.push((
                vec!["abort", "status"],
                format!("an abort `status` must be an error, 400 to 599, found {status}"),
            )),
            _ => {}
        }
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

/// `metadata.name`: a DNS-1123 subdomain, as Kubernetes names are.
pub(super) fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("`name` must not be empty".to_owned());
    }
    if name.len() > 253 {
        return Some(format!(
            "`name` is {} characters long; at most 253 are allowed",
            name.len()
        ));
    }
    let label_ok = |label: &str| {
        let bytes = label.as_bytes();
        let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        match (bytes.first(), bytes.last()) {
            (Some(first), Some(last)) => {
                alnum(first) && alnum(last) && bytes.iter().all(|b| alnum(b) || *b == b'-')
            }
            _ => false,
        }
    };
    if name.split('.').all(label_ok) {
        return None;
    }
    let mut message = format!(
        "invalid name `{name}`: use lowercase letters, digits, `-` and `.`, starting and ending with a letter or digit"
    );
    let fixed: String = name
        .to_lowercase()
        .chars()
        .map(|c| if c == '_' || c == ' ' { '-' } else { c })
        .collect();
    if fixed != name && fixed.split('.').all(label_ok) {
        message.push_str(&format!(" (e.g. `{fixed}`)"));
    }
    Some(message)
}

/// `metadata.namespace`: a DNS-1123 label, as Kubernetes namespaces are.
pub(super) fn namespace_problem(namespace: &str) -> Option<String> {
    let bytes = namespace.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let ok = match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            bytes.len() <= 63
                && alnum(first)
                && alnum(last)
                && bytes.iter().all(|b| alnum(b) || *b == b'-')
        }
        _ => false,
    };
    (!ok).then(|| {
        format!(
            "invalid namespace `{namespace}`: use at most 63 lowercase letters, digits and `-`, starting and ending with a letter or digit"
        )
    })
}

/// The name part of a label key, and a label value: at most 63 letters,
/// digits, `-`, `_` and `.`, starting and ending with a letter or digit.
fn label_word_ok(word: &str) -> bool {
    let bytes = word.as_bytes();
    let alnum = |b: &u8| b.is_ascii_alphanumeric();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            bytes.len() <= 63
                && alnum(first)
                && alnum(last)
                && bytes
                    .iter()
                    .all(|b| alnum(b) || matches!(b, b'-' | b'_' | b'.'))
        }
        _ => false,
    }
}

/// A label key: `name` or `prefix/name`, the prefix a DNS subdomain
/// (`app`, `app.kubernetes.io/name`), as in Kubernetes.
pub(super) fn label_key_problem(key: &str) -> Option<String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if name_problem(prefix).is_some() {
            return Some(format!(
                "invalid label key `{key}`: the prefix before `/` must be a DNS subdomain (lowercase letters, digits, `-` and `.`), like `app.kubernetes.io`"
            ));
        }
    }
    (!label_word_ok(name)).then(|| {
        format!(
            "invalid label key `{key}`: the name{} must be 1 to 63 letters, digits, `-`, `_` and `.`, starting and ending with a letter or digit",
            if prefix.is_some() { " after `/`" } else { "" }
        )
    })
}

/// A label value: empty, or a word as in [`label_word_ok`].
pub(super) fn label_value_problem(value: &str) -> Option<String> {
    (!value.is_empty() && !label_word_ok(value)).then(|| {
        format!(
            "invalid label value `{value}`: use at most 63 letters, digits, `-`, `_` and `.`, starting and ending with a letter or digit"
        )
    })
}

/// A backend endpoint: `host:port`, `ipv4:port` or `[ipv6]:port`.
pub(super) fn endpoint_problem(endpoint: &str) -> Option<String> {
    if let Some((scheme, _)) = endpoint.split_once("://") {
        return Some(format!(
            "endpoint `{endpoint}` must be `host:port` without a scheme: remove `{scheme}://`"
        ));
    }
    let port = if let Some(rest) = endpoint.strip_prefix('[') {
        let Some((address, after)) = rest.split_once(']') else {
            return Some(format!(
                "endpoint `{endpoint}` has no `]` after its IPv6 address"
            ));
        };
        if address.parse::<Ipv6Addr>().is_err() {
            return Some(format!(
                "`{address}` in endpoint `{endpoint}` is not an IPv6 address"
            ));
        }
        match after.strip_prefix(':') {
            Some(port) => port,
            None => {
                return Some(format!(
                    "endpoint `{endpoint}` has no port: write `[{address}]:PORT`"
                ))
            }
        }
    } else {
        let Some((host, port)) = endpoint.rsplit_once(':') else {
            return Some(format!(
                "endpoint `{endpoint}` has no port: write `{endpoint}:PORT`"
            ));
        };
        if host.contains(':') {
            return Some(format!(
                "endpoint `{endpoint}` looks like an IPv6 address: put the address in brackets, as in `[::1]:8000`"
            ));
        }
        if host.is_empty() {
            return Some(format!("endpoint `{endpoint}` has no host before the port"));
        }
        let host_ok = host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !host_ok {
            return Some(format!(
                "`{host}` in endpoint `{endpoint}` is not a valid host name or IPv4 address"
            ));
        }
        port
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Some(format!(
            "port `{port}` in endpoint `{endpoint}` must be a number from 1 to 65535"
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => None,
        _ => Some(format!(
            "port {port} in endpoint `{endpoint}` is out of range: use 1 to 65535"
        )),
    }
}

/// An HTTP header field name: an RFC 9110 token.
pub(super) fn header_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("header `name` must not be empty".to_owned());
    }
    if name.starts_with(':') {
        return Some(format!(
            "`{name}` is a pseudo-header, not a header; match it with `host` or `path`"
        ));
    }
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    let bad = name.chars().find(|c| !token(*c))?;
    Some(format!(
        "`{name}` is not a valid HTTP header name: {bad:?} is not allowed (use letters, digits, `-` and `_`)"
    ))
}
