//! The policy snapshot: everything a request needs to be routed, compiled
//! from a [`PolicySet`] once and then shared read-only.
//!
//! The proxy holds the current snapshot in an `ArcSwap`; each request loads
//! it once, so a new policy applies atomically while in-flight requests finish
//! on the one they started with. A snapshot is built from the one it replaces,
//! so backends whose spec did not change carry over whole: their endpoint
//! statistics, connection pool and DNS refresh survive a policy push, and so
//! do local models with their loaded engine.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::authz::Authorizer;
use infermesh_proto::policy::{
    local_model_name, AccessLogSettings, ClassifySettings, ListenerKind, ModelRouteSpec, MtlsMode,
    PolicySet, RateLimitKey, StringMatch,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use crate::backend::Backend;
use crate::balance::weighted_index;
use crate::classify::ApiKind;
use crate::identity::Identity;
use crate::local::{self, LocalModel};
use crate::metrics::{listener_label, Metrics, Name, RequestLabels, RouteLabels};
use crate::route::{Matcher, RouteInput};
use crate::stack::{self, RouteFront, RouteLayers, RouteStack};

/// Where the policy of a snapshot came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// No policy yet: the proxy waits for its control plane.
    Pending,
    /// No `--config` and no control plane: the empty embedded default.
    Default,
    /// A local policy file or directory (`--config`).
    File,
    /// A snapshot pushed by the control plane.
    ControlPlane,
    /// The last snapshot from the control plane, read back from disk
    /// (`--policy-cache`) because the control plane could not be reached.
    Cache,
}

impl Source {
    /// The name shown by `/config`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Pending => "none",
            Source::Default => "default",
            Source::File => "file",
            Source::ControlPlane => "control-plane",
            Source::Cache => "cache",
        }
    }
}

/// The version and source of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The control plane's version; 0 for a local policy.
    pub version: u64,
    /// Where the policy came from.
    pub source: Source,
}

impl Origin {
    /// A local policy: `--config`, the default, or nothing yet.
    pub fn local(source: Source) -> Self {
        Self { version: 0, source }
    }
}

/// A compiled policy.
#[derive(Debug)]
pub struct Snapshot {
    origin: Origin,
    policy: PolicySet,
    outbound: Vec<Route>,
    inbound: Vec<Route>,
    backends: HashMap<String, Arc<Backend>>,
    local_models: HashMap<String, Arc<LocalModel>>,
    opaque: Option<Arc<Backend>>,
    classify: ClassifySettings,
    drain_timeout: Duration,
    mtls_mode: MtlsMode,
    authorizer: Authorizer,
    /// Some route limits model tokens, so bodies are scanned for `max_tokens`.
    token_limits: bool,
    /// Some route matches on the request's host, so routing needs it.
    matches_hosts: bool,
    /// How request prompts are hashed for model-aware backends: bytes per
    /// recorded hash and how many; `None` without such a backend.
    prompt_hashing: Option<(usize, usize)>,
    /// The model names the policy names, as metric labels.
    model_labels: ModelLabels,
    /// The mesh's access-log settings; `None` when it keeps none.
    access_log: Option<AccessLogSettings>,
    /// Some route keeps an access log.
    any_route_logged: bool,
}

/// The `gen_ai_request_model` label of a model name: the name itself when
/// the policy names it (a route's exact match, an alias, a local model),
/// `PREFIX*` when a route matches it by prefix, else `other`. So the
/// label's values are bounded by the policy, whatever clients send.
#[derive(Debug)]
pub struct ModelLabels {
    exact: HashMap<Box<str>, Name>,
    prefixes: Vec<(String, Name)>,
    /// `other`, made once: most requests of a mesh without model routes get it.
    other: Name,
}

impl Default for ModelLabels {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            prefixes: Vec::new(),
            other: Name::new(crate::genai::OTHER),
        }
    }
}

impl ModelLabels {
    fn new(policy: &PolicySet) -> Self {
        let mut labels = Self::default();
        let mut exact = |name: &str| {
            labels
                .exact
                .entry(name.into())
                .or_insert_with(|| Name::new(name));
        };
        for route in &policy.routes {
            let spec = &route.spec;
            let aliases = spec.backends.iter().filter_map(|b| b.model.as_deref());
            let fallback = spec.fallback.iter().filter_map(|f| f.model.as_deref());
            aliases.chain(fallback).for_each(&mut exact);
            for model in spec.matches.iter().filter_map(|m| m.model.as_ref()) {
                if let StringMatch::Exact(name) = model {
                    exact(name);
                }
            }
        }
        for model in &policy.local_models {
            exact(&model.metadata.name);
        }
        for route in &policy.routes {
            for model in route.spec.matches.iter().filter_map(|m| m.model.as_ref()) {
                if let StringMatch::Prefix(prefix) = model {
                    if !labels.prefixes.iter().any(|(p, _)| p == prefix) {
                        labels
                            .prefixes
                            .push((prefix.clone(), Name::new(&format!("{prefix}*"))));
                    }
                }
            }
        }
        // The longest prefix names a model best.
        labels
            .prefixes
            .sort_by_key(|p| std::cmp::Reverse(p.0.len()));
        labels
    }

    /// The label of `model`.
    pub fn label(&self, model: &str) -> Name {
        if let Some(name) = self.exact.get(model) {
            return name.clone();
        }
        self.prefixes
            .iter()
            .find(|(prefix, _)| model.starts_with(prefix.as_str()))
            .map_or_else(|| self.other.clone(), |(_, name)| name.clone())
    }
}

/// A compiled route.
#[derive(Debug)]
pub struct Route {
    name: Name,
    matchers: Vec<Matcher>,
    targets: Vec<RouteTarget>,
    cumulative: Vec<u64>,
    fallback: Vec<FallbackLink>,
    /// Rate limits, faults and mirror, passed once per request.
    front: Option<RouteFront>,
    /// Mirrored: the body is read whole (within the replay limit) to copy it.
    mirrored: bool,
    /// A token limit needs each request's estimate.
    token_limited: bool,
    /// Some backend of the route balances by the request's prompt and model.
    hinted: bool,
    /// A rate limit is keyed by the caller's identity.
    caller_keyed: bool,
    /// How long a local model may take to answer: the route's first-byte
    /// or total limit, whichever is shorter (the local engine answers whole).
    local_limit: Option<Duration>,
    /// Each request gets an access-log line.
    access_log: bool,
}

/// One link of a route's fallback chain: a backend or a local model.
#[derive(Debug)]
pub struct FallbackLink {
    /// The backend or local model, its model alias and metric handles.
    pub target: RouteTarget,
    /// Requests this link was tried for.
    pub taken: Counter,
}

/// Where a route target's requests go.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A `Backend`'s endpoints, through the route's filter stack.
    Remote(Remote),
    /// A model served by this proxy (`local:<name>`).
    Local(Arc<LocalModel>),
}

/// A backend as a route target: the backend and the stack that serves it
/// (the route's layers over this backend).
#[derive(Debug, Clone)]
pub struct Remote {
    /// The backend.
    pub backend: Arc<Backend>,
    /// The route's timeouts, retries and hedging over this backend.
    pub stack: RouteStack,
}

/// A weighted backend of a route, with its metric handles.
#[derive(Debug)]
pub struct RouteTarget {
    /// Where requests go.
    pub destination: Destination,
    /// The backend name as routes write it (`vllm`, `local:minilm`), the
    /// `backend` label of metrics.
    pub name: Name,
    /// Model name sent upstream instead of the client's, if any.
    pub model: Option<Arc<str>>,
    /// Time to first byte for this route and backend.
    pub first_byte: Histogram,
    /// Whole-request duration for this route and backend.
    pub duration: Histogram,
    /// `requests_total` for this route and backend with status 200, the
    /// common case, resolved once so the request path skips the label lookup.
    pub ok: Counter,
    /// The same for a gRPC call that ended with `grpc-status: 0`.
    pub grpc_ok: GrpcOk,
}

/// `requests_total` of a route and backend's successful gRPC calls, found
/// on the first one: a route that serves no gRPC shows no such series.
#[derive(Debug)]
pub struct GrpcOk {
    requests: prometheus_client::metrics::family::Family<RequestLabels, Counter>,
    labels: RequestLabels,
    counter: std::sync::OnceLock<Counter>,
}

impl GrpcOk {
    fn new(metrics: &Metrics, labels: RequestLabels) -> Self {
        Self {
            requests: metrics.requests.clone(),
            labels: RequestLabels {
                status: 200,
                grpc_status: crate::metrics::grpc_status_label(0),
                ..labels
            },
            counter: std::sync::OnceLock::new(),
        }
    }

    /// The counter, found in its family on first use.
    pub fn counter(&self) -> &Counter {
        self.counter
            .get_or_init(|| self.requests.get_or_create(&self.labels).clone())
    }
}

impl RouteTarget {
    /// Whether this target can answer a request of `api`: a backend can
    /// answer anything, a local model only what its engine serves.
    pub fn serves(&self, api: ApiKind, grpc_method: Option<&str>) -> bool {
        match &self.destination {
            Destination::Remote(_) => true,
            Destination::Local(_) => local::serves(api, grpc_method),
        }
    }
}

impl Snapshot {
    /// Compiles a validated policy set, carrying over from `previous` (the
    /// snapshot it replaces) every backend whose spec is unchanged.
    pub fn build(
        policy: PolicySet,
        origin: Origin,
        previous: Option<&Snapshot>,
        metrics: &Metrics,
        identity: Option<&Arc<Identity>>,
    ) -> Self {
        let backends: HashMap<String, Arc<Backend>> = policy
            .backends
            .iter()
            .map(|b| {
                let name = &b.metadata.name;
                let old = previous.and_then(|p| p.backends.get(name));
                (
                    name.clone(),
                    Backend::carry_over(name, &b.spec, old, metrics, identity),
                )
            })
            .collect();
        let local_models: HashMap<String, Arc<LocalModel>> = policy
            .local_models
            .iter()
            .map(|m| {
                let name = &m.metadata.name;
                let old = previous.and_then(|p| p.local_models.get(name));
                (
                    name.clone(),
                    LocalModel::carry_over(name, &m.spec, old, metrics),
                )
            })
            .collect();
        let destination = |name: &str, layers: &RouteLayers| match local_model_name(name) {
            Some(local) => local_models
                .get(local)
                .map(|m| Destination::Local(m.clone())),
            None => backends.get(name).map(|b| {
                Destination::Remote(Remote {
                    backend: b.clone(),
                    stack: stack::target_stack(layers, b.clone()),
                })
            }),
        };
        let mut outbound = Vec::new();
        let mut inbound = Vec::new();
        let mesh_access = policy
            .mesh
            .as_ref()
            .and_then(|m| m.spec.access_log.as_ref());
        // A backend with `addresses` takes the intercepted requests for them
        // that no written route claims: a route of its own, after them all.
        let implied: Vec<(String, ModelRouteSpec)> = policy
            .backends
            .iter()
            .filter(|b| !b.spec.addresses.is_empty())
            .filter_map(|b| implied_route(&b.metadata.name, &b.spec.addresses))
            .collect();
        let written = policy
            .routes
            .iter()
            .map(|doc| (doc.metadata.name.as_str(), &doc.spec));
        let implied = implied.iter().map(|(name, spec)| (name.as_str(), spec));
        for (route_name, spec) in written.chain(implied) {
            let name = Name::new(route_name);
            let mut targets = Vec::new();
            let mut cumulative = Vec::new();
            let mut sum = 0u64;
            let listener = listener_label(spec.listener);
            let layers = stack::route_layers(
                &name,
                &spec.timeouts,
                spec.retries.as_ref(),
                spec.hedging.as_ref(),
                metrics,
            );
            let target = |destination: Destination, backend: &str, model: Option<&str>| {
                let backend = Name::new(backend);
                let labels = RouteLabels {
                    route: name.clone(),
                    backend: backend.clone(),
                };
                let ok_labels = RequestLabels {
                    listener,
                    route: name.clone(),
                    backend: backend.clone(),
                    status: 200,
                    grpc_status: "",
                };
                RouteTarget {
                    destination,
                    name: backend.clone(),
                    model: model.map(Arc::from),
                    first_byte: metrics.first_byte.get_or_create(&labels).clone(),
                    duration: metrics.duration.get_or_create(&labels).clone(),
                    ok: metrics.requests.get_or_create(&ok_labels).clone(),
                    grpc_ok: GrpcOk::new(metrics, ok_labels),
                }
            };
            for wb in &spec.backends {
                // The loader has checked every reference; skip rather than panic.
                let Some(to) = destination(&wb.backend, &layers) else {
                    continue;
                };
                sum += u64::from(wb.weight);
                cumulative.push(sum);
                targets.push(target(to, &wb.backend, wb.model.as_deref()));
            }
            let fallback: Vec<FallbackLink> = spec
                .fallback
                .iter()
                .filter_map(|link| {
                    let to = destination(&link.backend, &layers)?;
                    let taken = metrics
                        .fallbacks
                        .get_or_create(&RouteLabels {
                            route: name.clone(),
                            backend: Name::new(&link.backend),
                        })
                        .clone();
                    Some(FallbackLink {
                        target: target(to, &link.backend, link.model.as_deref()),
                        taken,
                    })
                })
                .collect();
            let mirror_to = spec
                .mirror
                .as_ref()
                .and_then(|m| backends.get(&m.backend).cloned());
            let mirrored = mirror_to.is_some();
            let front = stack::route_front(&name, spec, mirror_to, metrics);
            let limits = &spec.rate_limits;
            let token_limited = limits.iter().any(|l| l.tokens_per_minute.is_some());
            let hinted = targets
                .iter()
                .chain(fallback.iter().map(|link| &link.target))
                .any(|t| match &t.destination {
                    Destination::Remote(remote) => remote.backend.weighs_hints(),
                    Destination::Local(_) => false,
                });
            let caller_keyed = limits.iter().any(|l| l.key == RateLimitKey::Caller);
            let timeouts = &spec.timeouts;
            let local_limit = match (timeouts.first_byte, timeouts.total) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let access_log = spec
                .access_log
                .unwrap_or_else(|| mesh_access.is_some_and(|a| a.requests));
            let route = Route {
                access_log,
                name,
                matchers: spec.matches.iter().map(Matcher::new).collect(),
                targets,
                cumulative,
                fallback,
                front,
                mirrored,
                token_limited,
                hinted,
                caller_keyed,
                local_limit,
            };
            match spec.listener {
                ListenerKind::Outbound => outbound.push(route),
                ListenerKind::Inbound => inbound.push(route),
            }
        }
        let mesh = policy.mesh.as_ref().map(|m| &m.spec);
        let opaque = mesh
            .and_then(|m| m.opaque.backend.as_ref())
            .and_then(|name| backends.get(name).cloned());
        let classify = mesh.map(|m| m.classify.clone()).unwrap_or_default();
        let drain_timeout = mesh.map_or(Duration::from_secs(30), |m| m.drain_timeout);
        let mtls_mode = mesh.map_or(MtlsMode::Strict, |m| m.mtls.mode);
        let trust_domain = identity.map(|id| id.id().trust_domain().to_owned());
        let authorizer = Authorizer::new(&policy.authorizations, trust_domain.as_deref());
        let token_limits = outbound.iter().chain(&inbound).any(|r| r.token_limited);
        let matches_hosts = outbound
            .iter()
            .chain(&inbound)
            .flat_map(|r| &r.matchers)
            .any(Matcher::has_host);
        let prompt_hashing = prompt_hashing(&policy.backends);
        let model_labels = ModelLabels::new(&policy);
        let access_log = mesh.and_then(|m| m.access_log.clone());
        let any_route_logged = outbound.iter().chain(&inbound).any(|r| r.access_log);
        Self {
            any_route_logged,
            model_labels,
            access_log,
            origin,
            policy,
            outbound,
            inbound,
            backends,
            local_models,
            opaque,
            classify,
            drain_timeout,
            mtls_mode,
            authorizer,
            token_limits,
            matches_hosts,
            prompt_hashing,
        }
    }

    /// The metric label of a model name (see [`ModelLabels`]).
    pub fn model_label(&self, model: &str) -> Name {
        self.model_labels.label(model)
    }

    /// The mesh's access-log settings; `None` when it keeps none.
    pub fn access_log(&self) -> Option<&AccessLogSettings> {
        self.access_log.as_ref()
    }

    /// Whether some route keeps an access log of its own.
    pub fn routes_access_logged(&self) -> bool {
        self.any_route_logged
    }

    /// How prompts are hashed for model-aware backends (see
    /// [`crate::classify::JsonScanner::hash_prompt`]), when there is one.
    pub fn prompt_hashing(&self) -> Option<(usize, usize)> {
        self.prompt_hashing
    }

    /// Whether some route limits model tokens, so that request bodies are
    /// scanned for `max_tokens` to estimate their cost.
    pub fn token_limits(&self) -> bool {
        self.token_limits
    }

    /// Whether some route matches on the request's host: without one,
    /// routing does not look for it.
    pub fn matches_hosts(&self) -> bool {
        self.matches_hosts
    }

    /// What the inbound listener accepts once the proxy holds a certificate.
    pub fn mtls_mode(&self) -> MtlsMode {
        self.mtls_mode
    }

    /// The authorization policies of the inbound listener.
    pub fn authorizer(&self) -> &Authorizer {
        &self.authorizer
    }

    /// The control plane's version of this policy; 0 for a local one.
    pub fn version(&self) -> u64 {
        self.origin.version
    }

    /// Where the policy came from.
    pub fn source(&self) -> Source {
        self.origin.source
    }

    /// The backend called `name`, if the policy has one.
    pub fn backend(&self, name: &str) -> Option<&Arc<Backend>> {
        self.backends.get(name)
    }

    /// The local models of this snapshot, by name.
    pub fn local_models(&self) -> impl Iterator<Item = &Arc<LocalModel>> {
        self.local_models.values()
    }

    /// The local model called `name`, if the policy has one.
    pub fn local_model(&self, name: &str) -> Option<&Arc<LocalModel>> {
        self.local_models.get(name)
    }

    /// The policy this snapshot was built from.
    pub fn policy(&self) -> &PolicySet {
        &self.policy
    }

    /// The first route of `listener` whose conditions hold.
    pub fn route(&self, listener: ListenerKind, input: &RouteInput<'_>) -> Option<&Route> {
        let routes = match listener {
            ListenerKind::Outbound => &self.outbound,
            ListenerKind::Inbound => &self.inbound,
        };
        routes.iter().find(|r| r.matches(input))
    }

    /// The backend that receives opaque TCP connections, if any.
    pub fn opaque_backend(&self) -> Option<&Arc<Backend>> {
        self.opaque.as_ref()
    }

    /// Most body bytes read to classify a request.
    pub fn classify_limit(&self) -> usize {
        self.classify.max_body_prefix as usize
    }

    /// How long the client may take to send the body prefix classification
    /// reads; `None` for no limit.
    pub fn classify_read_limit(&self) -> Option<Duration> {
        Some(self.classify.read_timeout).filter(|d| !d.is_zero())
    }

    /// Longest wait for the next chunk of a request body on its way
    /// upstream; `None` for no limit.
    pub fn body_idle_limit(&self) -> Option<Duration> {
        Some(self.classify.body_idle_timeout).filter(|d| !d.is_zero())
    }

    /// How long in-flight requests may run after a shutdown signal.
    pub fn drain_timeout(&self) -> Duration {
        self.drain_timeout
    }

    /// Resolves the host names of every backend new in this snapshot (all
    /// at once), then keeps them fresh until `drain` is signaled;
    /// carried-over backends already are.
    pub async fn start_discovery(&self, drain: &drain::Watch) {
        futures_util::future::join_all(self.backends.values().map(|b| b.start_discovery(drain)))
            .await;
    }
}

/// The route a backend's `addresses` imply: the intercepted requests for
/// those destinations, to that backend, with a written route's defaults.
/// Named `addresses:BACKEND` in metrics and logs, a name no written route
/// can take (route names are DNS-1123 subdomains, without `:`).
fn implied_route(backend: &str, addresses: &[String]) -> Option<(String, ModelRouteSpec)> {
    let spec = serde_json::json!({
        "match": [{ "destination": addresses }],
        "backends": [{ "backend": backend }],
    });
    let spec = serde_json::from_value(spec).ok()?;
    Some((format!("addresses:{backend}"), spec))
}

impl Route {
    /// The route's name.
    pub fn name(&self) -> &Name {
        &self.name
    }

    /// Whether any of the route's matches holds (all requests when it has none).
    pub fn matches(&self, input: &RouteInput<'_>) -> bool {
        self.matchers.is_empty() || self.matchers.iter().any(|m| m.matches(input))
    }

    /// Whether a match of the route selects `input` by its model name, so
    /// that a local model of the route serves that name.
    pub fn selects_model(&self, input: &RouteInput<'_>) -> bool {
        self.matchers.iter().any(|m| m.selects_model(input))
    }

    /// Chooses a backend by weight.
    pub fn pick_target(&self) -> Option<&RouteTarget> {
        let total = *self.cumulative.last()?;
        if total == 0 {
            return None;
        }
        let index = weighted_index(&self.cumulative, fastrand::u64(..total));
        self.targets.get(index)
    }

    /// Whether each request of the route gets an access-log line.
    pub fn access_logged(&self) -> bool {
        self.access_log
    }

    /// The fallback chain, in the order it is tried.
    pub fn fallback(&self) -> &[FallbackLink] {
        &self.fallback
    }

    /// The route's rate limits, faults and mirror, if it has any.
    pub fn front(&self) -> Option<&RouteFront> {
        self.front.as_ref()
    }

    /// Whether requests are copied to a mirror.
    pub fn mirrored(&self) -> bool {
        self.mirrored
    }

    /// Whether a backend of the route balances by the request's prompt and
    /// model, so that requests carry a [`crate::balance::Hint`].
    pub fn hinted(&self) -> bool {
        self.hinted
    }

    /// Whether a rate limit counts model tokens.
    pub fn token_limited(&self) -> bool {
        self.token_limited
    }

    /// Whether a rate limit keeps buckets per caller identity.
    pub fn caller_keyed(&self) -> bool {
        self.caller_keyed
    }

    /// How long a local model may take to answer on this route.
    pub fn local_limit(&self) -> Option<Duration> {
        self.local_limit
    }
}

/// The granule and count of prompt hashes the model-aware backends of
/// `backends` need: the greatest common divisor of their block sizes, so
/// every block boundary is recorded, as far as the longest prefix any of
/// them hashes.
fn prompt_hashing(
    backends: &[infermesh_proto::policy::Resource<infermesh_proto::policy::BackendSpec>],
) -> Option<(usize, usize)> {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let prefixes = backends
        .iter()
        .filter(|b| b.spec.balancer == infermesh_proto::policy::BalancerKind::ModelAware)
        .map(|b| b.spec.model_aware.clone().unwrap_or_default().prefix);
    let mut granule = 0;
    let mut longest = 0;
    for prefix in prefixes {
        let block = prefix.block_size as usize;
        granule = gcd(granule, block);
        longest = longest.max(block * prefix.blocks as usize);
    }
    (granule > 0).then(|| (granule, longest.div_ceil(granule)))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn policy(yaml: &str) -> PolicySet {
        infermesh_proto::policy::load_str(Path::new("p.yaml"), yaml).expect("valid policy")
    }

    fn backend(name: &str, endpoints: &str, extra: &str) -> String {
        format!(
            "apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {{name: {name}}}\nspec:\n  endpoints: [{endpoints}]\n{extra}---\n"
        )
    }

    fn route(name: &str, backend: &str) -> String {
        format!(
            "apiVersion: infermesh.io/v1alpha1\nkind: ModelRoute\nmetadata: {{name: {name}}}\nspec:\n  backends: [{{backend: {backend}}}]\n"
        )
    }

    fn pushed(version: u64) -> Origin {
        Origin {
            version,
            source: Source::ControlPlane,
        }
    }

    fn first_target(snapshot: &Snapshot) -> &Arc<Backend> {
        match &snapshot.outbound[0].targets[0].destination {
            Destination::Remote(remote) => &remote.backend,
            Destination::Local(model) => panic!("local model {:?}", model.name()),
        }
    }

    #[test]
    fn only_a_route_that_reaches_a_model_aware_backend_carries_hints() {
        let metrics = Metrics::new();
        let plain = backend("plain", "\"127.0.0.1:1\"", "");
        let aware = backend("aware", "\"127.0.0.1:2\"", "  balancer: model-aware\n");
        let matched = |name: &str, model: &str, rest: &str| {
            format!(
                "apiVersion: infermesh.io/v1alpha1\nkind: ModelRoute\nmetadata: {{name: {name}}}\nspec:\n  match: [{{model: {{exact: {model}}}}}]\n{rest}---\n"
            )
        };
        let snapshot = Snapshot::build(
            policy(&format!(
                "{plain}{aware}{}{}{}",
                matched(
                    "f",
                    "m",
                    "  backends: [{backend: plain}]\n  fallback: [{backend: aware}]\n"
                ),
                matched("a", "n", "  backends: [{backend: aware}]\n"),
                route("p", "plain"),
            )),
            pushed(1),
            None,
            &metrics,
            None,
        );
        let hinted = |name: &str| {
            snapshot
                .outbound
                .iter()
                .find(|r| r.name().as_str() == name)
                .unwrap_or_else(|| panic!("route {name}"))
                .hinted()
        };
        assert!(!hinted("p"), "a round-robin backend never reads a hint");
        assert!(hinted("a"));
        assert!(
            hinted("f"),
            "a fallback link to a model-aware backend needs it too"
        );
    }

    #[test]
    fn an_unchanged_backend_carries_over_with_its_statistics() {
        let metrics = Metrics::new();
        let a = backend("a", "\"127.0.0.1:1\"", "");
        let b = backend("b", "\"127.0.0.1:2\"", "");
        let first = Snapshot::build(
            policy(&format!("{a}{b}{}", route("r", "a"))),
            pushed(1),
            None,
            &metrics,
            None,
        );
        let endpoint = first.backend("a").unwrap().endpoints()[0].clone();
        let _in_flight = endpoint.start();
        endpoint.observe_first_byte(Duration::from_millis(700));
        let load = endpoint.peak_ewma_load(std::time::Instant::now());

        // The route moves to b and a third backend appears; a and b are untouched.
        let c = backend("c", "\"127.0.0.1:3\"", "");
        let second = Snapshot::build(
            policy(&format!("{a}{b}{c}{}", route("r", "b"))),
            pushed(2),
            Some(&first),
            &metrics,
            None,
        );
        for name in ["a", "b"] {
            assert!(
                Arc::ptr_eq(first.backend(name).unwrap(), second.backend(name).unwrap()),
                "backend {name} was rebuilt"
            );
        }
        assert!(Arc::ptr_eq(
            first_target(&second),
            second.backend("b").unwrap()
        ));
        let kept = &second.backend("a").unwrap().endpoints()[0];
        assert_eq!(kept.in_flight(), 1, "in-flight count survives the push");
        assert!(kept.peak_ewma_load(std::time::Instant::now()) >= load * 0.9);
        assert_eq!(second.version(), 2);
        assert_eq!(second.source(), Source::ControlPlane);
    }

    #[test]
    fn a_changed_backend_keeps_the_endpoints_that_stay() {
        let metrics = Metrics::new();
        let first = Snapshot::build(
            policy(&format!(
                "{}{}",
                backend("a", "\"127.0.0.1:1\", \"127.0.0.1:2\"", ""),
                route("r", "a")
            )),
            Origin::local(Source::File),
            None,
            &metrics,
            None,
        );
        let old = first.backend("a").unwrap().endpoints();
        let _in_flight = old[1].start();
        let second = Snapshot::build(
            policy(&format!(
                "{}{}",
                backend(
                    "a",
                    "\"127.0.0.1:2\", \"127.0.0.1:3\"",
                    "  balancer: round-robin\n"
                ),
                route("r", "a")
            )),
            pushed(7),
            Some(&first),
            &metrics,
            None,
        );
        let changed = second.backend("a").unwrap();
        assert!(!Arc::ptr_eq(first.backend("a").unwrap(), changed));
        let new = changed.endpoints();
        let addrs: Vec<String> = new.iter().map(|e| e.addr().to_string()).collect();
        assert_eq!(addrs, ["127.0.0.1:2", "127.0.0.1:3"]);
        assert!(
            Arc::ptr_eq(&old[1], &new[0]),
            "127.0.0.1:2 stays the same endpoint"
        );
        assert_eq!(new[0].in_flight(), 1);
        assert_eq!(new[1].in_flight(), 0);
    }

    #[test]
    fn a_removed_backend_is_not_carried_over_and_a_readded_one_starts_afresh() {
        let metrics = Metrics::new();
        let a = backend("a", "\"127.0.0.1:1\"", "");
        let first = Snapshot::build(
            policy(&format!("{a}{}", route("r", "a"))),
            pushed(1),
            None,
            &metrics,
            None,
        );
        let b = backend("b", "\"127.0.0.1:2\"", "");
        let second = Snapshot::build(
            policy(&format!("{b}{}", route("r", "b"))),
            pushed(2),
            Some(&first),
            &metrics,
            None,
        );
        assert!(second.backend("a").is_none());
        let third = Snapshot::build(
            policy(&format!("{a}{}", route("r", "a"))),
            pushed(3),
            Some(&second),
            &metrics,
            None,
        );
        assert!(!Arc::ptr_eq(
            first.backend("a").unwrap(),
            third.backend("a").unwrap()
        ));
    }

    #[tokio::test]
    async fn resolved_host_names_carry_over_without_waiting_for_dns() {
        let metrics = Metrics::new();
        let a = backend("a", "\"localhost:8000\"", "");
        let first = Snapshot::build(
            policy(&format!("{a}{}", route("r", "a"))),
            pushed(1),
            None,
            &metrics,
            None,
        );
        assert!(first.backend("a").unwrap().endpoints().is_empty());
        first.start_discovery(&drain::channel().1).await;
        let resolved = first.backend("a").unwrap().endpoints();
        assert!(!resolved.is_empty(), "localhost resolves");

        // Unchanged: the same backend, resolved, its refresh task not doubled.
        let second = Snapshot::build(
            policy(&format!("{a}{}", route("other", "a"))),
            pushed(2),
            Some(&first),
            &metrics,
            None,
        );
        assert!(Arc::ptr_eq(
            first.backend("a").unwrap(),
            second.backend("a").unwrap()
        ));
        // Changed balancer: a new backend that serves the resolved addresses at once.
        let changed = backend("a", "\"localhost:8000\"", "  balancer: least-request\n");
        let third = Snapshot::build(
            policy(&format!("{changed}{}", route("r", "a"))),
            pushed(3),
            Some(&second),
            &metrics,
            None,
        );
        let carried = third.backend("a").unwrap().endpoints();
        assert_eq!(carried.len(), resolved.len());
        assert!(Arc::ptr_eq(&carried[0], &resolved[0]));
    }

    #[test]
    fn backend_addresses_take_the_intercepted_requests_no_written_route_claims() {
        let metrics = Metrics::new();
        let svc = backend(
            "svc",
            "\"10.244.0.5:8000\"",
            "  addresses: [\"10.96.0.10:8000\", \"10.244.0.0/24:8000\"]\n",
        );
        let other = backend("other", "\"127.0.0.1:2\"", "");
        let chat = "apiVersion: infermesh.io/v1alpha1\nkind: ModelRoute\nmetadata: {name: chat}\nspec:\n  match: [{destination: [\"10.96.0.10:8000\"], model: {exact: big}}]\n  backends: [{backend: other}]\n";
        let snapshot = Snapshot::build(
            policy(&format!("{svc}{other}{chat}")),
            pushed(1),
            None,
            &metrics,
            None,
        );
        let headers = http::HeaderMap::new();
        let input = |destination: Option<&str>, model: Option<&'static str>| RouteInput {
            host: None,
            path: "/v1/chat/completions",
            grpc: None,
            headers: &headers,
            model,
            destination: destination.map(|d| d.parse().unwrap()),
        };
        let name = |input: RouteInput<'_>| {
            snapshot
                .route(ListenerKind::Outbound, &input)
                .map(|r| r.name().as_str().to_owned())
        };
        // The written route first, then the backend's own.
        assert_eq!(
            name(input(Some("10.96.0.10:8000"), Some("big"))).as_deref(),
            Some("chat")
        );
        assert_eq!(
            name(input(Some("10.96.0.10:8000"), Some("small"))).as_deref(),
            Some("addresses:svc")
        );
        assert_eq!(
            name(input(Some("10.244.0.77:8000"), None)).as_deref(),
            Some("addresses:svc")
        );
        // Another port, another address, or a direct connection: no route.
        assert_eq!(name(input(Some("10.96.0.10:9000"), None)), None);
        assert_eq!(name(input(Some("10.97.0.10:8000"), None)), None);
        assert_eq!(name(input(None, Some("big"))), None);
        // Nothing of the kind on the inbound listener.
        assert!(snapshot
            .route(ListenerKind::Inbound, &input(Some("10.96.0.10:8000"), None))
            .is_none());
    }
}
