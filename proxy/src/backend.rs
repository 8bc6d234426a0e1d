//! Backends: a named endpoint set with its balancer, connection pool and
//! periodic DNS re-resolution (`discovery.rs`), outlier ejection of its
//! endpoints and limits on its outstanding requests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use infermesh_filters::ProxyError;
use infermesh_proto::policy::{BackendSpec, UpstreamProtocol};
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::balance::model_aware::{self, Affinity};
use crate::balance::{Balancer, Endpoint, Hint};
use crate::discovery::{self, Target};
use crate::identity::Identity;
use crate::metrics::{
    AffinityLabels, BackendLabels, EjectionLabels, EndpointLabels, Metrics, Name, OverloadLabels,
};
use crate::outlier::{self, OutlierPolicy, ProbeVerdict, Trip};
use crate::pool::Pool;

/// A named set of endpoints and the means to reach them.
#[derive(Debug)]
pub struct Backend {
    name: Name,
    spec: BackendSpec,
    protocol: UpstreamProtocol,
    balancer: Balancer,
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    targets: Vec<Target>,
    dns_refresh: Duration,
    pool: Pool,
    connect_errors: Counter,
    discovery_started: AtomicBool,
    metrics_poll_started: AtomicBool,
    outlier: Option<OutlierPolicy>,
    /// Serialises ejection decisions, so that two endpoints tripping at
    /// once cannot both pass the maximum share. Taken only on a trip.
    trip: Mutex<()>,
    load: Arc<Load>,
    max_in_flight: Option<u32>,
    max_pending: Option<u32>,
    /// Meshed (`mtls`) and this proxy has no identity to speak mutual TLS
    /// with: every request fails with the reason.
    lacks_identity: bool,
    handles: Handles,
}

/// Metric handles of a backend, resolved once.
#[derive(Debug)]
struct Handles {
    ejected: Gauge,
    ejections: [Counter; 3],
    overloaded_in_flight: Counter,
    overloaded_pending: Counter,
    penalties: Counter,
    affinity_hit: Counter,
    affinity_spill: Counter,
    server_queue: prometheus_client::metrics::family::Family<
        EndpointLabels,
        Gauge<f64, std::sync::atomic::AtomicU64>,
    >,
    kv_cache_usage: prometheus_client::metrics::family::Family<
        EndpointLabels,
        Gauge<f64, std::sync::atomic::AtomicU64>,
    >,
}

impl Handles {
    fn new(name: &Name, metrics: &Metrics) -> Self {
        let backend = || BackendLabels {
            backend: name.clone(),
        };
        let ejections = [Trip::Consecutive, Trip::FailureRate, Trip::ProbeFailed].map(|trip| {
            metrics
                .outlier_ejections
                .get_or_create(&EjectionLabels {
                    backend: name.clone(),
                    reason: trip.as_str(),
                })
                .clone()
        });
        let overloaded = |limit| {
            metrics
                .overloaded
                .get_or_create(&OverloadLabels {
                    backend: name.clone(),
                    limit,
                })
                .clone()
        };
        // One at a time: a family's guard must be dropped before the next
        // `get_or_create` on it.
        let affinity = |outcome: Affinity| {
            metrics
                .prefix_affinity
                .get_or_create(&AffinityLabels {
                    backend: name.clone(),
                    outcome: outcome.as_str(),
                })
                .clone()
        };
        Self {
            ejected: metrics.outlier_ejected.get_or_create(&backend()).clone(),
            ejections,
            overloaded_in_flight: overloaded("in_flight"),
            overloaded_pending: overloaded("pending"),
            penalties: metrics.penalties.get_or_create(&backend()).clone(),
            affinity_hit: affinity(Affinity::Hit),
            affinity_spill: affinity(Affinity::Spill),
            server_queue: metrics.server_queue.clone(),
            kv_cache_usage: metrics.kv_cache_usage.clone(),
        }
    }

    fn ejections(&self, trip: Trip) -> &Counter {
        match trip {
            Trip::Consecutive => &self.ejections[0],
            Trip::FailureRate => &self.ejections[1],
            Trip::ProbeFailed => &self.ejections[2],
        }
    }
}

/// Requests outstanding to a backend, across its endpoints and routes.
/// Shared by the backends that replace each other across policy pushes, so
/// a push does not reset the counts.
#[derive(Debug, Default)]
struct Load {
    in_flight: AtomicU32,
    pending: AtomicU32,
}

/// An endpoint chosen for one attempt.
#[derive(Debug)]
pub struct Picked {
    /// Where the attempt goes.
    pub endpoint: Arc<Endpoint>,
    /// The attempt is the probe of an endpoint whose ejection is over: its
    /// outcome re-admits or re-ejects the endpoint.
    pub probe: bool,
}

/// One attempt counted against a backend's limits: pending until
/// [`Admitted::responded`], in flight until dropped.
#[derive(Debug)]
pub struct Admitted {
    load: Arc<Load>,
    pending: bool,
}

impl Admitted {
    /// The response headers arrived: the attempt is no longer pending.
    pub fn responded(&mut self) {
        if std::mem::take(&mut self.pending) {
            self.load.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.responded();
        self.load.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Takes one from `counter` unless that passes `max`.
fn take(counter: &AtomicU32, max: Option<u32>) -> bool {
    match max {
        None => {
            counter.fetch_add(1, Ordering::Relaxed);
            true
        }
        Some(max) => counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok(),
    }
}

impl Backend {
    /// Builds a backend; IP endpoints are usable at once, host names after
    /// [`Backend::resolve`].
    pub fn new(name: &str, spec: &BackendSpec, metrics: &Metrics) -> Arc<Self> {
        Self::carry_over(name, spec, None, metrics, None)
    }

    /// The backend for `spec`, keeping what it can of `previous`, the backend
    /// of the same name in the snapshot being replaced, so that a policy push
    /// neither resets balancing nor drops pooled connections: `previous`
    /// itself when its spec is unchanged; otherwise a new backend that keeps
    /// the endpoints that stay (with their load statistics) and, when the
    /// protocol and connect timeout are unchanged, the connection pool.
    pub fn carry_over(
        name: &str,
        spec: &BackendSpec,
        previous: Option<&Arc<Backend>>,
        metrics: &Metrics,
        identity: Option<&Arc<Identity>>,
    ) -> Arc<Self> {
        if let Some(previous) = previous {
            if previous.spec == *spec && previous.name.as_str() == name {
                return previous.clone();
            }
        }
        let targets: Vec<Target> = spec
            .endpoints
            .iter()
            .filter_map(|e| Target::parse(e))
            .collect();
        let name = Name::new(name);
        let old: Vec<Arc<Endpoint>> = previous.map(|p| p.endpoints().to_vec()).unwrap_or_default();
        let reuse = |addr: SocketAddr| {
            old.iter()
                .find(|e| e.addr() == addr)
                .cloned()
                .unwrap_or_else(|| Arc::new(Endpoint::new(addr)))
        };
        let mut endpoints: Vec<Arc<Endpoint>> = targets
            .iter()
            .filter_map(|t| match t {
                Target::Addr(addr) => Some(reuse(*addr)),
                Target::Dns { .. } => None,
            })
            .collect();
        // Addresses resolved for a host name both specs share serve until the
        // new backend resolves it again, so a push does not wait on DNS.
        if let Some(previous) = previous {
            for e in old.iter() {
                let from_shared_name = !previous.is_static(e.addr())
                    && targets.iter().any(|t| {
                        matches!(t, Target::Dns { port, .. } if *port == e.addr().port())
                            && previous.targets.contains(t)
                    });
                if from_shared_name && !endpoints.iter().any(|n| n.addr() == e.addr()) {
                    endpoints.push(e.clone());
                }
            }
        }
        // Meshed endpoints need this proxy's certificate; without an
        // identity the backend exists but every request to it fails with
        // the reason (see `Backend::mtls_problem`).
        let tls = spec.mtls.as_ref().and_then(|mtls| {
            identity.map(|identity| identity.client_config(mtls.identity.clone()))
        });
        let pool = match previous {
            Some(p)
                if p.spec.protocol == spec.protocol
                    && p.spec.connect_timeout == spec.connect_timeout
                    && p.spec.mtls == spec.mtls =>
            {
                p.pool.clone()
            }
            _ => Pool::new(spec.protocol, spec.connect_timeout, tls.clone()),
        };
        if spec.outlier_detection.is_none() {
            // Without outlier detection nothing would ever re-admit them.
            for endpoint in endpoints.iter().filter(|e| e.is_ejected()) {
                *endpoint.health() = crate::outlier::Health::new(Instant::now());
                endpoint.set_ejected(false, &Gauge::default());
            }
        }
        let limits = spec.limits.clone().unwrap_or_default();
        let lacks_identity = spec.mtls.is_some() && tls.is_none();
        Arc::new(Self {
            lacks_identity,
            handles: Handles::new(&name, metrics),
            outlier: spec.outlier_detection.as_ref().map(OutlierPolicy::from),
            trip: Mutex::new(()),
            load: previous.map(|p| p.load.clone()).unwrap_or_default(),
            max_in_flight: limits.max_in_flight,
            max_pending: limits.max_pending,
            connect_errors: metrics
                .connect_errors
                .get_or_create(&BackendLabels {
                    backend: name.clone(),
                })
                .clone(),
            name,
            spec: spec.clone(),
            protocol: spec.protocol,
            balancer: match spec.balancer {
                infermesh_proto::policy::BalancerKind::ModelAware => Balancer::model_aware(
                    model_aware::Settings::from(&spec.model_aware.clone().unwrap_or_default()),
                ),
                kind => Balancer::new(kind),
            },
            metrics_poll_started: AtomicBool::new(false),
            endpoints: ArcSwap::from_pointee(endpoints),
            targets,
            dns_refresh: spec.dns_refresh,
            pool,
            discovery_started: AtomicBool::new(false),
        })
    }

    /// The backend's name.
    pub fn name(&self) -> &Name {
        &self.name
    }

    /// Protocol spoken to the endpoints.
    pub fn protocol(&self) -> UpstreamProtocol {
        self.protocol
    }

    /// The URI scheme of requests to this backend: `https` for meshed
    /// endpoints (mutual TLS), `http` otherwise.
    pub fn scheme(&self) -> http::uri::Scheme {
        if self.spec.mtls.is_some() {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        }
    }

    /// Why requests to this backend cannot be sent, when they cannot: its
    /// endpoints require mutual TLS and this proxy has no mesh identity.
    pub fn mtls_problem(&self) -> Option<String> {
        self.lacks_identity.then(|| {
            format!(
                "backend `{}` requires mutual TLS, and this proxy has no mesh identity (start it with --identity-token-file)",
                self.name.as_str()
            )
        })
    }

    /// The connections to this backend's endpoints.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Counts a failed connection attempt.
    pub fn connect_failed(&self) {
        self.connect_errors.inc();
    }

    /// Whether the balancer places requests by their prompt and model
    /// ([`Hint`]); the others never look at a hint.
    pub fn weighs_hints(&self) -> bool {
        self.balancer.model_aware_settings().is_some()
    }

    /// Chooses an endpoint that is not ejected, for a connection whose
    /// outcome is not judged (opaque TCP): it never takes a probe.
    pub fn pick(&self) -> Option<Arc<Endpoint>> {
        let endpoints = self.endpoints.load();
        if self.outlier.is_some() && endpoints.iter().any(|e| e.is_ejected()) {
            let healthy: Vec<Arc<Endpoint>> = endpoints
                .iter()
                .filter(|e| !e.is_ejected())
                .cloned()
                .collect();
            return self.balancer.pick(&healthy);
        }
        self.balancer.pick(&endpoints)
    }

    /// Chooses the endpoint of one attempt: the probe of an endpoint whose
    /// ejection is over when there is one, else the balancer's choice among
    /// the endpoints that are not ejected, avoiding those in `avoid` (where
    /// earlier attempts or a hedged sibling went) when there is another.
    /// `None` when the backend has no endpoint, or every one is ejected.
    pub fn pick_for_request(&self, avoid: &[SocketAddr], hint: &Hint) -> Option<Picked> {
        let endpoints = self.endpoints.load();
        let normal = |endpoint| Picked {
            endpoint,
            probe: false,
        };
        if self.outlier.is_none() || !endpoints.iter().any(|e| e.is_ejected()) {
            return self.pick_among(&endpoints, avoid, hint).map(normal);
        }
        let now = Instant::now();
        // A probe goes first, so an endpoint comes back as soon as its
        // ejection is over rather than when the balancer happens upon it.
        for endpoint in endpoints.iter() {
            if endpoint.is_ejected()
                && !avoid.contains(&endpoint.addr())
                && endpoint.health().try_probe(now)
            {
                return Some(Picked {
                    endpoint: endpoint.clone(),
                    probe: true,
                });
            }
        }
        let healthy: Vec<Arc<Endpoint>> = endpoints
            .iter()
            .filter(|e| !e.is_ejected())
            .cloned()
            .collect();
        self.pick_among(&healthy, avoid, hint).map(normal)
    }

    /// The balancer's choice among `endpoints`, not in `avoid` when there is
    /// another, else any.
    fn pick_among(
        &self,
        endpoints: &[Arc<Endpoint>],
        avoid: &[SocketAddr],
        hint: &Hint,
    ) -> Option<Arc<Endpoint>> {
        if avoid.is_empty() {
            let (picked, affinity) = self.balancer.pick_hinted(endpoints, hint)?;
            match affinity {
                Some(Affinity::Hit) => self.handles.affinity_hit.inc(),
                Some(Affinity::Spill) => self.handles.affinity_spill.inc(),
                None => 0,
            };
            return Some(picked);
        }
        if self.balancer.model_aware_settings().is_some() {
            // A retry or hedge: the model-aware choice among the others.
            let others: Vec<Arc<Endpoint>> = endpoints
                .iter()
                .filter(|e| !avoid.contains(&e.addr()))
                .cloned()
                .collect();
            if !others.is_empty() {
                return self.balancer.pick_hinted(&others, hint).map(|(e, _)| e);
            }
        }
        // The balancer's own choice first, so load still counts.
        for _ in 0..2 {
            let picked = self.balancer.pick(endpoints)?;
            if !avoid.contains(&picked.addr()) {
                return Some(picked);
            }
        }
        endpoints
            .iter()
            .find(|e| !avoid.contains(&e.addr()))
            .cloned()
            .or_else(|| self.balancer.pick(endpoints))
    }

    /// Counts one attempt against the backend's limits, or refuses it with
    /// [`ProxyError::Overloaded`] when a limit is reached.
    pub fn admit(&self) -> Result<Admitted, ProxyError> {
        if !take(&self.load.in_flight, self.max_in_flight) {
            self.handles.overloaded_in_flight.inc();
            return Err(self.overloaded("in-flight", self.max_in_flight));
        }
        if !take(&self.load.pending, self.max_pending) {
            self.load.in_flight.fetch_sub(1, Ordering::Relaxed);
            self.handles.overloaded_pending.inc();
            return Err(self.overloaded("pending", self.max_pending));
        }
        Ok(Admitted {
            load: self.load.clone(),
            pending: true,
        })
    }

    fn overloaded(&self, limit: &'static str, max: Option<u32>) -> ProxyError {
        ProxyError::Overloaded {
            backend: self.name.as_str().to_string(),
            limit,
            max: max.unwrap_or_default(),
        }
    }

    /// Attempts outstanding to the backend: `(in flight, pending)`.
    pub fn outstanding(&self) -> (u32, u32) {
        (
            self.load.in_flight.load(Ordering::Relaxed),
            self.load.pending.load(Ordering::Relaxed),
        )
    }

    /// Records how an attempt sent to `picked` ended, as outlier detection
    /// judges it: `failed` for a connection or upstream failure, a 5xx, or
    /// a gRPC `UNAVAILABLE` in the response headers.
    pub fn record(&self, picked: &Picked, failed: bool) {
        let Some(policy) = &self.outlier else {
            return;
        };
        let endpoint = &picked.endpoint;
        let now = Instant::now();
        if picked.probe {
            let verdict = endpoint.health().probe_result(policy, now, failed);
            match verdict {
                ProbeVerdict::Readmitted => {
                    endpoint.set_ejected(false, &self.handles.ejected);
                    tracing::info!(backend = %self.name.as_str(), endpoint = %endpoint.addr(), "endpoint re-admitted after a successful probe");
                }
                ProbeVerdict::Ejected(length) => {
                    self.handles.ejections(Trip::ProbeFailed).inc();
                    tracing::warn!(backend = %self.name.as_str(), endpoint = %endpoint.addr(), ejected_for = ?length, "probe failed; endpoint ejected again");
                }
                ProbeVerdict::Ignored => {}
            }
            return;
        }
        let Some(trip) = endpoint.health().record(policy, now, failed) else {
            return;
        };
        let _deciding = self.trip.lock();
        let endpoints = self.endpoints.load();
        let ejected = endpoints.iter().filter(|e| e.is_ejected()).count();
        if !outlier::may_eject(policy, ejected, endpoints.len()) {
            tracing::debug!(backend = %self.name.as_str(), endpoint = %endpoint.addr(), "endpoint keeps failing but stays: the backend's maximum ejected share is reached");
            return;
        }
        let mut health = endpoint.health();
        if health.is_ejected() {
            return;
        }
        let length = health.eject(policy, now);
        let count = health.ejections();
        drop(health);
        endpoint.set_ejected(true, &self.handles.ejected);
        self.handles.ejections(trip).inc();
        tracing::warn!(backend = %self.name.as_str(), endpoint = %endpoint.addr(), reason = trip.as_str(), ejected_for = ?length, ejections = count, "endpoint ejected");
    }

    /// The probe of `picked` ended without an outcome (the attempt was
    /// cancelled): the next request may probe instead.
    pub fn probe_abandoned(&self, picked: &Picked) {
        if picked.probe {
            picked.endpoint.health().probe_abandoned(Instant::now());
        }
    }

    /// Penalises `endpoint` in the balancer for `length`, after a 429 or a
    /// `Retry-After`.
    pub fn penalize(&self, endpoint: &Endpoint, length: Duration) {
        endpoint.penalize(Instant::now(), length);
        self.handles.penalties.inc();
    }

    /// The current endpoints.
    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.load_full()
    }

    fn has_dns_targets(&self) -> bool {
        self.targets.iter().any(|t| matches!(t, Target::Dns { .. }))
    }

    /// Resolves host names once and installs the resulting endpoint set
    /// (see [`discovery::next_endpoints`]).
    pub async fn resolve(&self) {
        if !self.has_dns_targets() {
            return;
        }
        let lookups = discovery::lookup(&self.targets).await;
        for (target, lookup) in self.targets.iter().zip(&lookups) {
            if let (Target::Dns { host, .. }, Err(error)) = (target, lookup) {
                tracing::warn!(backend = %self.name.as_str(), %host, %error, "resolving endpoint failed; keeping its previous addresses");
            }
        }
        let current = self.endpoints.load_full();
        let next = discovery::next_endpoints(&self.targets, &current, &lookups);
        self.endpoints.store(Arc::new(next));
    }

    fn is_static(&self, addr: SocketAddr) -> bool {
        self.targets.contains(&Target::Addr(addr))
    }

    /// Resolves host names and keeps them fresh until `drain` is signaled;
    /// does nothing after the first call, so a backend carried over into a
    /// new snapshot keeps its one refresh task.
    pub async fn start_discovery(self: &Arc<Self>, drain: &drain::Watch) {
        if self.discovery_started.swap(true, Ordering::AcqRel) {
            return;
        }
        self.spawn_metrics_poll(drain.clone());
        self.resolve().await;
        self.spawn_refresh(drain.clone());
    }

    /// Records a model server's per-response load report (the ORCA
    /// `endpoint-load-metrics` header), for a model-aware backend.
    pub fn load_report(&self, endpoint: &Endpoint, headers: &http::HeaderMap) {
        if self.balancer.model_aware_settings().is_none() {
            return;
        }
        let Some(report) = headers
            .get("endpoint-load-metrics")
            .and_then(|v| v.to_str().ok())
            .and_then(model_aware::parse_orca)
        else {
            return;
        };
        endpoint.report_load(report, Instant::now());
        self.set_server_gauges(endpoint, report);
    }

    fn set_server_gauges(&self, endpoint: &Endpoint, load: model_aware::ServerLoad) {
        let labels = EndpointLabels {
            backend: self.name.clone(),
            endpoint: endpoint.addr().to_string(),
        };
        self.handles
            .server_queue
            .get_or_create(&labels)
            .set(load.waiting);
        self.handles
            .kv_cache_usage
            .get_or_create(&labels)
            .set(load.kv_cache);
    }

    /// Polls every endpoint's model-server metrics each `interval`, for a
    /// model-aware backend with polling on, until the backend is dropped or
    /// the drain is signaled; does nothing after the first call. Meshed
    /// (mTLS) endpoints are not polled: their metrics are behind their
    /// sidecar, which serves only authorized model requests; their
    /// per-response load reports still count.
    pub fn spawn_metrics_poll(self: &Arc<Self>, drain: drain::Watch) {
        let Some(settings) = self.balancer.model_aware_settings() else {
            return;
        };
        let Some(path) = settings.path.clone() else {
            return;
        };
        if self.spec.mtls.is_some() || self.metrics_poll_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let (interval, names) = (settings.interval, settings.names.clone());
        let weak: Weak<Self> = Arc::downgrade(self);
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
        tokio::spawn(async move {
            let poll = async move {
                let mut ticks = tokio::time::interval(interval);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticks.tick().await;
                    let Some(backend) = weak.upgrade() else {
                        return;
                    };
                    let endpoints = backend.endpoints();
                    let scrapes = endpoints
                        .iter()
                        .map(|endpoint| scrape(&client, endpoint.addr(), &path, interval, &names));
                    let results = futures_util::future::join_all(scrapes).await;
                    for (endpoint, result) in endpoints.iter().zip(results) {
                        match result {
                            Ok((scraped, at)) => {
                                if let Some(load) = scraped.load() {
                                    endpoint.report_load(load, at);
                                    backend.set_server_gauges(endpoint, load);
                                }
                                if let Some(adapters) = scraped.adapters {
                                    endpoint.report_adapters(adapters, at);
                                }
                            }
                            Err(error) => {
                                tracing::debug!(backend = %backend.name.as_str(), endpoint = %endpoint.addr(), %error, "polling the model server's metrics failed; its load is what this proxy sees");
                            }
                        }
                    }
                }
            };
            tokio::select! {
                release = drain.signaled() => drop(release),
                () = poll => {}
            }
        });
    }

    /// Re-resolves host names every `dnsRefresh` until the backend is
    /// dropped or the drain is signaled.
    pub fn spawn_refresh(self: &Arc<Self>, drain: drain::Watch) {
        if !self.has_dns_targets() {
            return;
        }
        let weak: Weak<Self> = Arc::downgrade(self);
        let period = self.dns_refresh;
        tokio::spawn(async move {
            let refresh = async move {
                loop {
                    tokio::time::sleep(period).await;
                    let Some(backend) = weak.upgrade() else {
                        return;
                    };
                    backend.resolve().await;
                }
            };
            tokio::select! {
                release = drain.signaled() => drop(release),
                () = refresh => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infermesh_proto::policy::BalancerKind;

    fn spec(endpoints: &[&str]) -> BackendSpec {
        BackendSpec {
            endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
            service: None,
            addresses: Vec::new(),
            protocol: UpstreamProtocol::Http1,
            balancer: BalancerKind::RoundRobin,
            model_aware: None,
            connect_timeout: Duration::from_secs(1),
            dns_refresh: Duration::from_secs(5),
            mtls: None,
            outlier_detection: None,
            limits: None,
        }
    }

    fn guarded(outlier: &str, limits: &str) -> BackendSpec {
        let yaml = format!(
            "apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {{name: b}}\nspec:\n  endpoints: [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n  balancer: round-robin\n{outlier}{limits}"
        );
        infermesh_proto::policy::load_str(std::path::Path::new("b.yaml"), &yaml)
            .expect("valid policy")
            .backends
            .remove(0)
            .spec
    }

    fn port(picked: &Picked) -> u16 {
        picked.endpoint.addr().port()
    }

    #[tokio::test]
    async fn a_tripped_endpoint_is_skipped_until_its_one_probe() {
        let spec = guarded(
            "  outlierDetection: {consecutiveFailures: 2, baseEjection: 50ms}\n",
            "",
        );
        let backend = Backend::new("b", &spec, &Metrics::new());
        let eps = backend.endpoints();
        let first = Picked {
            endpoint: eps[0].clone(),
            probe: false,
        };
        backend.record(&first, true);
        assert!(!eps[0].is_ejected());
        backend.record(&first, true);
        assert!(eps[0].is_ejected());
        for _ in 0..10 {
            assert_eq!(
                port(&backend.pick_for_request(&[], &Hint::default()).unwrap()),
                2
            );
            assert_eq!(backend.pick().unwrap().addr().port(), 2);
        }
        // The other endpoint fails too, but 50% of two is one.
        let second = Picked {
            endpoint: eps[1].clone(),
            probe: false,
        };
        for _ in 0..5 {
            backend.record(&second, true);
        }
        assert!(!eps[1].is_ejected());
        tokio::time::sleep(Duration::from_millis(60)).await;
        let probe = backend.pick_for_request(&[], &Hint::default()).unwrap();
        assert_eq!((port(&probe), probe.probe), (1, true));
        // Half-open: the probe is the only request it gets.
        for _ in 0..5 {
            let other = backend.pick_for_request(&[], &Hint::default()).unwrap();
            assert_eq!((port(&other), other.probe), (2, false));
        }
        backend.record(&probe, false);
        assert!(!eps[0].is_ejected());
        let ports: Vec<u16> = (0..4)
            .map(|_| port(&backend.pick_for_request(&[], &Hint::default()).unwrap()))
            .collect();
        assert!(ports.contains(&1) && ports.contains(&2), "{ports:?}");
    }

    #[tokio::test]
    async fn an_abandoned_probe_is_taken_again_by_the_next_request() {
        let spec = guarded(
            "  outlierDetection: {consecutiveFailures: 1, baseEjection: 10ms, maxEjectedPercent: 100}\n",
            "",
        );
        let backend = Backend::new("b", &spec, &Metrics::new());
        for endpoint in backend.endpoints().iter() {
            let picked = Picked {
                endpoint: endpoint.clone(),
                probe: false,
            };
            backend.record(&picked, true);
        }
        assert!(
            backend.pick_for_request(&[], &Hint::default()).is_none(),
            "every endpoint is out"
        );
        assert!(backend.pick().is_none());
        tokio::time::sleep(Duration::from_millis(20)).await;
        let a = backend.pick_for_request(&[], &Hint::default()).unwrap();
        let b = backend.pick_for_request(&[], &Hint::default()).unwrap();
        assert!(a.probe && b.probe && port(&a) != port(&b));
        assert!(
            backend.pick_for_request(&[], &Hint::default()).is_none(),
            "both probing"
        );
        backend.probe_abandoned(&a);
        let again = backend.pick_for_request(&[], &Hint::default()).unwrap();
        assert_eq!((port(&again), again.probe), (port(&a), true));
    }

    #[tokio::test]
    async fn attempts_past_a_limit_are_refused_as_overloaded() {
        let spec = guarded("", "  limits: {maxInFlight: 2, maxPending: 1}\n");
        let backend = Backend::new("b", &spec, &Metrics::new());
        let mut first = backend.admit().unwrap();
        let refused = backend.admit().unwrap_err();
        assert!(matches!(
            refused,
            ProxyError::Overloaded {
                limit: "pending",
                max: 1,
                ..
            }
        ));
        first.responded();
        let second = backend.admit().unwrap();
        assert_eq!(backend.outstanding(), (2, 1));
        let refused = backend.admit().unwrap_err();
        assert!(matches!(
            refused,
            ProxyError::Overloaded {
                limit: "in-flight",
                max: 2,
                ..
            }
        ));
        drop(first);
        drop(second);
        assert_eq!(backend.outstanding(), (0, 0));
        assert!(backend.admit().is_ok());
    }

    #[test]
    fn targets_parse_ips_and_host_names() {
        assert_eq!(
            Target::parse("10.0.0.1:80"),
            Some(Target::Addr("10.0.0.1:80".parse().unwrap()))
        );
        assert_eq!(
            Target::parse("[::1]:8080"),
            Some(Target::Addr("[::1]:8080".parse().unwrap()))
        );
        assert_eq!(
            Target::parse("vllm.models.svc:8000"),
            Some(Target::Dns {
                host: "vllm.models.svc".into(),
                port: 8000
            })
        );
        assert_eq!(Target::parse("no-port"), None);
        assert_eq!(Target::parse(":80"), None);
    }

    #[tokio::test]
    async fn host_names_resolve_into_endpoints_and_keep_their_statistics() {
        let backend = Backend::new(
            "b",
            &spec(&["localhost:8000", "127.0.0.9:81"]),
            &Metrics::new(),
        );
        assert_eq!(
            backend.endpoints().len(),
            1,
            "IP endpoints need no resolution"
        );
        backend.resolve().await;
        let first = backend.endpoints();
        assert!(first
            .iter()
            .any(|e| e.addr().ip().is_loopback() && e.addr().port() == 8000));
        let _guard = first[0].start();
        backend.resolve().await;
        let second = backend.endpoints();
        assert!(
            Arc::ptr_eq(&first[0], &second[0]),
            "an endpoint that stays is the same endpoint"
        );
        assert_eq!(second[0].in_flight(), 1);
    }
}

/// Why polling one endpoint's metrics failed.
#[derive(Debug, thiserror::Error)]
enum ScrapeError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("request failed")]
    Request(#[source] hyper_util::client::legacy::Error),
    #[error("answered {0}")]
    Status(http::StatusCode),
    #[error("reading the page failed")]
    Body(#[source] hyper::Error),
    #[error("bad metrics URL")]
    Uri(#[source] http::Error),
}

/// Most of a metrics page read: vLLM's is a few tens of kilobytes.
const MAX_METRICS_PAGE: usize = 4 << 20;

/// Reads `http://addr{path}` within `timeout` and the gauges in it, with
/// when the page was asked for.
async fn scrape(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Empty<bytes::Bytes>,
    >,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    names: &infermesh_proto::policy::ResolvedNames,
) -> Result<(model_aware::Scraped, Instant), ScrapeError> {
    use http_body_util::BodyExt;
    let at = Instant::now();
    let request = http::Request::get(format!("http://{addr}{path}"))
        .header(http::header::ACCEPT, "text/plain")
        .body(http_body_util::Empty::new())
        .map_err(ScrapeError::Uri)?;
    let read = async {
        let response = client
            .request(request)
            .await
            .map_err(ScrapeError::Request)?;
        if !response.status().is_success() {
            return Err(ScrapeError::Status(response.status()));
        }
        let body = http_body_util::Limited::new(response.into_body(), MAX_METRICS_PAGE);
        let bytes = body
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(e) => ScrapeError::Body(*e),
                Err(_) => ScrapeError::Status(http::StatusCode::PAYLOAD_TOO_LARGE),
            })?
            .to_bytes();
        Ok(model_aware::parse_metrics(
            &String::from_utf8_lossy(&bytes),
            names,
        ))
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(result) => result.map(|scraped| (scraped, at)),
        Err(_) => Err(ScrapeError::Timeout(timeout)),
    }
}
