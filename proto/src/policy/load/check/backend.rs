//! `Backend` checks: endpoints or a service, outlier detection and limits.

use super::format::{endpoint_problem, namespace_problem};
use super::path::{find, P};
use crate::policy::load::{PolicyError, Typed};
use crate::policy::{
    BackendLimits, BackendSpec, BalancerKind, DestinationPattern, ModelAware, OutlierDetection,
    ServicePort, ServiceRef,
};
use P::{I, K};

/// `outlierDetection` bounds: a failure-rate window shorter than a second
/// judges too few requests, one longer than an hour remembers an outage
/// long gone; an ejection longer than a day is a removal, which belongs in
/// the endpoint list.
const MIN_FAILURE_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);
const MAX_FAILURE_WINDOW: std::time::Duration = std::time::Duration::from_secs(3600);
const MAX_EJECTION: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
const MAX_CONSECUTIVE_FAILURES: u32 = 1000;

pub(super) fn backend_spec(backend: &Typed<BackendSpec>, errors: &mut Vec<PolicyError>) {
    let (file, tree, spec) = (&backend.file, &backend.tree, &backend.resource.spec);
    let name = &backend.resource.metadata.name;
    match &spec.service {
        None if spec.endpoints.is_empty() && !backend.repaired => {
            errors.push(PolicyError::new(
                file,
                find(tree, &[K("spec"), K("endpoints")]).at,
                format!(
                    "Backend `{name}` has no endpoints: list at least one `host:port`, \
                     or name a Kubernetes `service`"
                ),
            ));
        }
        None => {}
        Some(service) => {
            if !spec.endpoints.is_empty() {
                errors.push(PolicyError::new(
                    file,
                    find(tree, &[K("spec"), K("service")]).at,
                    format!(
                        "Backend `{name}` has both `endpoints` and `service`: the service's \
                         EndpointSlices give the endpoints; keep one of them"
                    ),
                ));
            }
            let namespace = backend.resource.metadata.namespace.as_deref();
            for (key, problem) in service_problems(service, namespace) {
                let at = find(tree, &[K("spec"), K("service"), K(key)]).at;
                errors.push(PolicyError::new(file, at, problem));
            }
        }
    }
    for (i, endpoint) in spec.endpoints.iter().enumerate() {
        if let Some(problem) = endpoint_problem(endpoint) {
            let at = find(tree, &[K("spec"), K("endpoints"), I(i)]).at;
            errors.push(PolicyError::new(file, at, problem));
        }
    }
    for (i, pattern) in spec.addresses.iter().enumerate() {
        if let Err(problem) = pattern.parse::<DestinationPattern>() {
            let at = find(tree, &[K("spec"), K("addresses"), I(i)]).at;
            errors.push(PolicyError::new(file, at, problem.to_string()));
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
        )
        .chain(
            spec.model_aware
                .as_ref()
                .map(|m| model_aware_problems(spec.balancer, m))
                .into_iter()
                .flatten()
                .map(|(keys, problem)| {
                    (
                        ["modelAware"]
                            .iter()
                            .chain(keys)
                            .copied()
                            .collect::<Vec<_>>(),
                        problem,
                    )
                }),
        );
    for (keys, problem) in problems {
        let path: Vec<P<'_>> = std::iter::once(K("spec"))
            .chain(keys.into_iter().map(K))
            .collect();
        errors.push(PolicyError::new(file, find(tree, &path).at, problem));
    }
}

/// What is wrong with a `service` reference, each problem with its key;
/// `namespace` is the Backend's own, which an absent one defaults to.
pub(super) fn service_problems(
    service: &ServiceRef,
    namespace: Option<&str>,
) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    if let Some(problem) = service_name_problem(&service.name) {
        problems.push(("name", problem));
    }
    match (&service.namespace, namespace) {
        (Some(ns), _) => {
            if let Some(problem) = namespace_problem(ns) {
                problems.push(("namespace", problem));
            }
        }
        (None, Some(_)) => {}
        (None, None) => problems.push((
            "namespace",
            format!(
                "service `{}` needs a `namespace`: the Backend has no `metadata.namespace` to \
                 default to",
                service.name
            ),
        )),
    }
    if let ServicePort::Name(port) = &service.port {
        if let Some(problem) = port_name_problem(port) {
            problems.push(("port", problem));
        }
    }
    problems
}

/// A Service name: a DNS-1035 label (lowercase letters, digits and `-`,
/// starting with a letter, at most 63 characters).
fn service_name_problem(name: &str) -> Option<String> {
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.last() != Some(&b'-');
    (!ok).then(|| {
        format!(
            "invalid Service name `{name}`: Service names are lowercase letters, digits and `-`, \
             start with a letter, end with a letter or digit, at most 63 characters"
        )
    })
}

/// A Service port name (an IANA service name, as Kubernetes checks it):
/// lowercase letters, digits and `-`, at least one letter, at most 15
/// characters. A port written as digits in quotes is a number meant.
fn port_name_problem(name: &str) -> Option<String> {
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) {
        return Some(format!(
            "port `{name}` is a number written as text: write it without quotes"
        ));
    }
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 15
        && bytes.iter().any(u8::is_ascii_lowercase)
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first() != Some(&b'-')
        && bytes.last() != Some(&b'-')
        && !name.contains("--");
    (!ok).then(|| {
        format!(
            "invalid port `{name}`: a Service port is its number (1-65535) or its name \
             (lowercase letters, digits and `-`, at most 15 characters)"
        )
    })
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

/// Longest metrics poll interval: a slower poll is stale before it helps.
const MAX_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);
/// Shortest: a model server's metrics page is not free to render.
const MIN_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// What is wrong with `modelAware`: it needs `balancer: model-aware`,
/// weights are finite and not negative, the load factor is at least 1, the
/// prefix is a sane size, and polling has a path and a useful interval.
/// Each problem comes with the keys of its field under `modelAware`.
pub(super) fn model_aware_problems(
    balancer: BalancerKind,
    settings: &ModelAware,
) -> Vec<(&'static [&'static str], String)> {
    let mut problems: Vec<(&'static [&'static str], String)> = Vec::new();
    if balancer != BalancerKind::ModelAware {
        problems.push((
            &[],
            "`modelAware` configures `balancer: model-aware`; set that balancer, or remove `modelAware`".into(),
        ));
    }
    let weights = &settings.weights;
    for (keys, name, value) in [
        (
            &["weights", "queue"] as &'static [&'static str],
            "queue",
            weights.queue,
        ),
        (&["weights", "running"], "running", weights.running),
        (&["weights", "kvCache"], "kvCache", weights.kv_cache),
        (&["weights", "latency"], "latency", weights.latency),
    ] {
        if !(value.is_finite() && (0.0..=100.0).contains(&value)) {
            problems.push((
                keys,
                format!("weight `{name}` must be between 0 and 100, found {value}"),
            ));
        }
    }
    if !(settings.load_factor.is_finite() && (1.0..=100.0).contains(&settings.load_factor)) {
        problems.push((
            &["loadFactor"],
            format!(
                "`loadFactor` bounds an endpoint's load as a multiple of the mean: between 1 and 100, found {}",
                settings.load_factor
            ),
        ));
    }
    let prefix = &settings.prefix;
    if !(1..=64).contains(&prefix.blocks) {
        problems.push((
            &["prefix", "blocks"],
            format!("`blocks` must be between 1 and 64, found {}", prefix.blocks),
        ));
    }
    if !(16..=4096).contains(&prefix.block_size) {
        problems.push((
            &["prefix", "blockSize"],
            format!(
                "`blockSize` must be between 16 and 4096 bytes, found {}",
                prefix.block_size
            ),
        ));
    }
    let metrics = &settings.metrics;
    if metrics.path != "off" && !metrics.path.starts_with('/') {
        problems.push((
            &["metrics", "path"],
            format!(
                "metrics `path` must start with `/` (or be `off`), found {:?}",
                metrics.path
            ),
        ));
    }
    if !(MIN_POLL_INTERVAL..=MAX_POLL_INTERVAL).contains(&metrics.interval) {
        problems.push((
            &["metrics", "interval"],
            format!(
                "metrics `interval` must be between 50ms and 60s, found {}ms",
                metrics.interval.as_millis()
            ),
        ));
    }
    if metrics.stale_after() < metrics.interval {
        problems.push((
            &["metrics", "staleAfter"],
            format!(
                "`staleAfter` ({}ms) is shorter than the poll `interval` ({}ms): every report would be ignored before the next",
                metrics.stale_after().as_millis(),
                metrics.interval.as_millis()
            ),
        ));
    }
    let names = &metrics.names;
    for (keys, value) in [
        (
            &["metrics", "names", "waiting"] as &'static [&'static str],
            &names.waiting,
        ),
        (&["metrics", "names", "running"], &names.running),
        (&["metrics", "names", "kvCacheUsage"], &names.kv_cache_usage),
        (&["metrics", "names", "loraInfo"], &names.lora_info),
    ] {
        if let Some(name) = value {
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
            if !valid {
                problems.push((
                    keys,
                    format!("{name:?} is not a Prometheus metric name (letters, digits, `_` and `:`, not starting with a digit)"),
                ));
            }
        }
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
