//! Services and EndpointSlices: what a `Backend.service` reference
//! resolves to.
//!
//! Two kube-runtime reflectors keep every Service and every
//! `discovery.k8s.io/v1` EndpointSlice of the cluster in memory (the
//! watcher lists, watches from the list's `resourceVersion`, and re-lists
//! after `410 Gone` or a dropped connection). Each event bumps a counter
//! the policy publisher follows; the publisher then resolves the policy set
//! again through [`ServiceView::resolve`], which reads the stores and calls
//! the pure [`resolve`] on one Service and its slices.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_util::StreamExt;
use infermesh_proto::policy::{PolicySet, ServicePort, ServiceRef};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::sync::watch;

/// Where a reference without a namespace looks when its Backend has none
/// either (which the loader refuses, so only a defensive default).
const DEFAULT_NAMESPACE: &str = "default";

/// The label an EndpointSlice names its Service with.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What a service reference resolved to, ready for a `BackendSpec`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolution {
    /// `IP:port` of every ready endpoint, sorted, without duplicates.
    pub endpoints: Vec<String>,
    /// `clusterIP:port` of every cluster IP, sorted.
    pub addresses: Vec<String>,
    /// Why there is no endpoint, when there is none.
    pub problem: Option<String>,
}

/// The Services and EndpointSlices the control plane has seen, and a
/// counter that moves on each change.
#[derive(Clone)]
pub struct ServiceView {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    ready: Arc<[AtomicBool; 2]>,
    changes: watch::Receiver<u64>,
}

impl fmt::Debug for ServiceView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceView")
            .field("ready", &self.ready())
            .field("version", &*self.changes.borrow())
            .finish()
    }
}

impl ServiceView {
    /// Starts watching Services and EndpointSlices in every namespace; the
    /// watches run until the process ends.
    pub fn watch(client: Client) -> Self {
        let (changed, changes) = watch::channel(0u64);
        let changed = Arc::new(changed);
        let ready: Arc<[AtomicBool; 2]> =
            Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
        let services = follow::<Service>(Api::all(client.clone()), 0, &ready, &changed);
        let slices = follow::<EndpointSlice>(Api::all(client), 1, &ready, &changed);
        Self {
            services,
            slices,
            ready,
            changes,
        }
    }

    /// A view over stores filled by hand, for tests; the writers change it.
    #[cfg(test)]
    pub fn fixed(
        services: Vec<Service>,
        slices: Vec<EndpointSlice>,
    ) -> (
        Self,
        reflector::store::Writer<Service>,
        reflector::store::Writer<EndpointSlice>,
    ) {
        let (services_store, mut services_writer) = reflector::store();
        for service in services {
            services_writer.apply_watcher_event(&watcher::Event::Apply(service));
        }
        let (slices_store, mut slices_writer) = reflector::store();
        for slice in slices {
            slices_writer.apply_watcher_event(&watcher::Event::Apply(slice));
        }
        let view = Self {
            services: services_store,
            slices: slices_store,
            ready: Arc::new([AtomicBool::new(true), AtomicBool::new(true)]),
            changes: watch::channel(0).1,
        };
        (view, services_writer, slices_writer)
    }

    /// Whether both kinds have been listed once.
    pub fn ready(&self) -> bool {
        self.ready.iter().all(|r| r.load(Ordering::Acquire))
    }

    /// A receiver that sees a new value after every change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    /// `raw` with every service reference resolved against the Services
    /// and EndpointSlices now (see [`resolve_set`]). The slices are read in
    /// one pass and grouped by the Services the set names, so a change
    /// costs one walk over the cluster's slices, not one per backend.
    pub fn resolve_set(&self, raw: &PolicySet) -> (PolicySet, Vec<ServiceStatus>) {
        let wanted: HashSet<(&str, &str)> = raw
            .backends
            .iter()
            .filter_map(|b| {
                let service = b.spec.service.as_ref()?;
                let namespace = service
                    .namespace
                    .as_deref()
                    .or(b.metadata.namespace.as_deref())
                    .unwrap_or(DEFAULT_NAMESPACE);
                Some((namespace, service.name.as_str()))
            })
            .collect();
        let mut slices: HashMap<(String, String), Vec<Arc<EndpointSlice>>> = HashMap::new();
        for slice in self.slices.state() {
            let namespace = slice.metadata.namespace.as_deref().unwrap_or_default();
            let service = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .map(String::as_str)
                .unwrap_or_default();
            if wanted.contains(&(namespace, service)) {
                let key = (namespace.to_owned(), service.to_owned());
                slices.entry(key).or_default().push(slice.clone());
            }
        }
        resolve_set(raw, |service, namespace| {
            let namespace = service.namespace.as_deref().unwrap_or(namespace);
            let key = ObjectRef::new(&service.name).within(namespace);
            let Some(object) = self.services.get(&key) else {
                return Resolution {
                    problem: Some(format!(
                        "no Service {namespace}/{} in the cluster",
                        service.name
                    )),
                    ..Resolution::default()
                };
            };
            let found: Vec<&EndpointSlice> = slices
                .get(&(namespace.to_owned(), service.name.clone()))
                .into_iter()
                .flatten()
                .map(|s| s.as_ref())
                .collect();
            resolve(&object, &found, &service.port)
        })
    }
}

/// How one `Backend.service` resolved, as `/policy` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    /// The Backend's name.
    pub backend: String,
    /// The Backend's namespace, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_namespace: Option<String>,
    /// The Service, as `namespace/name`.
    pub service: String,
    /// The Service port asked for.
    pub port: String,
    /// The endpoints sent to proxies.
    pub endpoints: Vec<String>,
    /// The cluster IPs and port, added to the backend's `addresses`.
    pub addresses: Vec<String>,
    /// Why there is no endpoint (the proxies answer 503), when there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// `raw` with every `Backend.service` replaced by what `lookup` resolves it
/// to, and the status of each.
///
/// The reference itself is taken out of the published Backend: proxies get
/// plain `endpoints` and `addresses`, so a proxy never needs (or tries) to
/// reach the Kubernetes API, and proxies built before the field existed
/// (whose Backend type refuses unknown fields) take the snapshot too.
pub fn resolve_set(
    raw: &PolicySet,
    lookup: impl Fn(&ServiceRef, &str) -> Resolution,
) -> (PolicySet, Vec<ServiceStatus>) {
    let mut set = raw.clone();
    let mut statuses = Vec::new();
    for backend in &mut set.backends {
        let Some(service) = backend.spec.service.take() else {
            continue;
        };
        // Checked at load: a reference without a namespace sits in a
        // Backend that has one.
        let default_namespace = backend
            .metadata
            .namespace
            .as_deref()
            .unwrap_or(DEFAULT_NAMESPACE);
        let namespace = service
            .namespace
            .clone()
            .unwrap_or_else(|| default_namespace.to_owned());
        let resolution = lookup(&service, default_namespace);
        backend.spec.endpoints = resolution.endpoints.clone();
        for address in &resolution.addresses {
            if !backend.spec.addresses.contains(address) {
                backend.spec.addresses.push(address.clone());
            }
        }
        statuses.push(ServiceStatus {
            backend: backend.metadata.name.clone(),
            backend_namespace: backend.metadata.namespace.clone(),
            service: format!("{namespace}/{}", service.name),
            port: service.port.to_string(),
            endpoints: resolution.endpoints,
            addresses: resolution.addresses,
            problem: resolution.problem,
        });
    }
    (set, statuses)
}

/// Whether any Backend of `set` names a Service.
pub fn has_references(set: &PolicySet) -> bool {
    set.backends.iter().any(|b| b.spec.service.is_some())
}

/// A reflector over every object of `K`, in the background; marks
/// `ready[slot]` after the first complete list and bumps `changed` on
/// every change.
fn follow<K>(
    api: Api<K>,
    slot: usize,
    ready: &Arc<[AtomicBool; 2]>,
    changed: &Arc<watch::Sender<u64>>,
) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let ready = ready.clone();
    let changed = changed.clone();
    let kind = K::kind(&());
    let stream =
        reflector::reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::InitDone) => {
                    if !ready[slot].swap(true, Ordering::AcqRel) {
                        tracing::info!(%kind, "listed every object; following changes");
                    }
                    changed.send_modify(|v| *v += 1);
                }
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                    changed.send_modify(|v| *v += 1)
                }
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                // The watcher retries with back-off; the stores keep what
                // they hold until the next complete list.
                Err(error) => tracing::warn!(%kind, %error, "watch failed; retrying"),
            }
        }
    });
    store
}

/// What one Service resolves to for `port`, given its EndpointSlices.
///
/// Endpoints are the addresses of every slice endpoint that is not known
/// to be unready or terminating, on the port the slice gives for the
/// Service port's name (the target port); addresses are the Service's
/// cluster IPs on the Service port. Headless Services have no address;
/// an `ExternalName` Service has neither.
pub fn resolve(service: &Service, slices: &[&EndpointSlice], port: &ServicePort) -> Resolution {
    let name = format!(
        "{}/{}",
        service.metadata.namespace.as_deref().unwrap_or_default(),
        service.metadata.name.as_deref().unwrap_or_default()
    );
    let spec = service.spec.clone().unwrap_or_default();
    if spec.type_.as_deref() == Some("ExternalName") {
        return Resolution {
            problem: Some(format!(
                "Service {name} is an ExternalName Service: it has no endpoints; use \
                 `endpoints: [\"{}:PORT\"]` instead",
                spec.external_name.as_deref().unwrap_or("HOST")
            )),
            ..Resolution::default()
        };
    }
    let ports = spec.ports.clone().unwrap_or_default();
    let found = ports.iter().find(|p| match port {
        ServicePort::Number(n) => p.port == i32::from(*n),
        ServicePort::Name(wanted) => p.name.as_deref() == Some(wanted.as_str()),
    });
    let Some(service_port) = found else {
        let known: Vec<String> = ports
            .iter()
            .map(|p| match &p.name {
                Some(n) if !n.is_empty() => format!("{} ({n})", p.port),
                _ => p.port.to_string(),
            })
            .collect();
        return Resolution {
            problem: Some(format!(
                "Service {name} has no port `{port}` (its ports: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            )),
            ..Resolution::default()
        };
    };
    let port_name = service_port.name.as_deref().unwrap_or_default();
    let numeric_target = match &service_port.target_port {
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(_)) => None,
        None => Some(service_port.port),
    };

    let mut endpoints = BTreeSet::new();
    for slice in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        let slice_port = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or_default() == port_name);
        let target = match slice_port {
            Some(p) => p.port.or(numeric_target),
            None => continue,
        };
        let Some(target) = target.and_then(|t| u16::try_from(t).ok()) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.clone().unwrap_or_default();
            if conditions.ready == Some(false) || conditions.terminating == Some(true) {
                continue;
            }
            for address in &endpoint.addresses {
                if let Ok(ip) = address.parse::<IpAddr>() {
                    endpoints.insert(host_port(ip, target));
                }
            }
        }
    }

    let cluster_ips = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.clone(),
        _ => spec.cluster_ip.clone().into_iter().collect(),
    };
    let addresses: BTreeSet<String> = u16::try_from(service_port.port)
        .ok()
        .into_iter()
        .flat_map(|p| {
            cluster_ips
                .iter()
                .filter_map(|ip| ip.parse::<IpAddr>().ok())
                .map(move |ip| host_port(ip, p))
        })
        .collect();
    let problem = endpoints.is_empty().then(|| {
        format!(
            "Service {name} has no ready endpoint for port `{port}` ({} EndpointSlice{})",
            slices.len(),
            if slices.len() == 1 { "" } else { "s" }
        )
    });
    Resolution {
        endpoints: endpoints.into_iter().collect(),
        addresses: addresses.into_iter().collect(),
        problem,
    }
}

/// `IP:port`, with an IPv6 address in brackets.
fn host_port(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn service(ports: serde_json::Value, cluster_ips: &[&str]) -> Service {
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "chat", "namespace": "ml"},
            "spec": {
                "clusterIP": cluster_ips.first().copied().unwrap_or("None"),
                "clusterIPs": cluster_ips,
                "ports": ports,
            },
        }))
        .unwrap()
    }

    pub(crate) fn slice(
        name: &str,
        address_type: &str,
        ports: serde_json::Value,
        endpoints: serde_json::Value,
    ) -> EndpointSlice {
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": "ml",
                "labels": {SERVICE_NAME_LABEL: "chat"},
            },
            "addressType": address_type,
            "ports": ports,
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    fn named() -> Service {
        service(
            json!([
                {"name": "http", "port": 80, "targetPort": "web"},
                {"name": "metrics", "port": 9090, "targetPort": 9100},
            ]),
            &["10.96.0.10"],
        )
    }

    fn name(n: &str) -> ServicePort {
        ServicePort::Name(n.into())
    }

    #[test]
    fn a_named_port_takes_the_slice_port_of_that_name() {
        let s = slice(
            "chat-1",
            "IPv4",
            json!([{"name": "http", "port": 8000}, {"name": "metrics", "port": 9100}]),
            json!([
                {"addresses": ["10.0.0.2"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.1"]},
            ]),
        );
        let r = resolve(&named(), &[&s], &name("http"));
        assert_eq!(r.endpoints, ["10.0.0.1:8000", "10.0.0.2:8000"]);
        assert_eq!(r.addresses, ["10.96.0.10:80"]);
        assert_eq!(r.problem, None);
        // The same port by its number.
        assert_eq!(resolve(&named(), &[&s], &ServicePort::Number(80)), r);
        let metrics = resolve(&named(), &[&s], &name("metrics"));
        assert_eq!(metrics.endpoints, ["10.0.0.1:9100", "10.0.0.2:9100"]);
        assert_eq!(metrics.addresses, ["10.96.0.10:9090"]);
    }

    #[test]
    fn an_unnamed_port_with_a_numeric_target_works() {
        let svc = service(json!([{"port": 80, "targetPort": 8080}]), &["10.96.0.11"]);
        let with_port = slice(
            "a",
            "IPv4",
            json!([{"port": 8080}]),
            json!([{"addresses": ["10.0.0.5"]}]),
        );
        // A slice port without a number: the Service's numeric target.
        let without = slice(
            "b",
            "IPv4",
            json!([{"name": ""}]),
            json!([{"addresses": ["10.0.0.6"]}]),
        );
        let r = resolve(&svc, &[&with_port, &without], &ServicePort::Number(80));
        assert_eq!(r.endpoints, ["10.0.0.5:8080", "10.0.0.6:8080"]);
        assert_eq!(r.addresses, ["10.96.0.11:80"]);
    }

    #[test]
    fn unready_and_terminating_endpoints_are_left_out() {
        let s = slice(
            "chat-1",
            "IPv4",
            json!([{"name": "http", "port": 8000}]),
            json!([
                {"addresses": ["10.0.0.1"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": true, "terminating": true}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": true, "serving": true}},
                {"addresses": ["10.0.0.3"], "conditions": {}},
            ]),
        );
        let r = resolve(&named(), &[&s], &name("http"));
        assert_eq!(r.endpoints, ["10.0.0.3:8000"], "deduplicated too");
        let none = slice(
            "chat-1",
            "IPv4",
            json!([{"name": "http", "port": 8000}]),
            json!([{"addresses": ["10.0.0.1"], "conditions": {"ready": false}}]),
        );
        let r = resolve(&named(), &[&none], &name("http"));
        assert!(r.endpoints.is_empty());
        assert_eq!(r.addresses, ["10.96.0.10:80"]);
        let problem = r.problem.unwrap();
        assert!(problem.contains("no ready endpoint"), "{problem}");
        assert!(problem.contains("ml/chat"), "{problem}");
    }

    #[test]
    fn ipv6_endpoints_and_cluster_ips_are_bracketed_and_fqdn_slices_skipped() {
        let svc = service(
            json!([{"name": "http", "port": 80, "targetPort": 8000}]),
            &["10.96.0.10", "fd00::10"],
        );
        let v6 = slice(
            "v6",
            "IPv6",
            json!([{"name": "http", "port": 8000}]),
            json!([{"addresses": ["fd00::1"]}]),
        );
        let fqdn = slice(
            "dns",
            "FQDN",
            json!([{"name": "http", "port": 8000}]),
            json!([{"addresses": ["chat.example.com"]}]),
        );
        let r = resolve(&svc, &[&v6, &fqdn], &name("http"));
        assert_eq!(r.endpoints, ["[fd00::1]:8000"]);
        assert_eq!(r.addresses, ["10.96.0.10:80", "[fd00::10]:80"]);
    }

    #[test]
    fn a_headless_service_has_endpoints_and_no_address() {
        let svc = service(
            json!([{"name": "http", "port": 80, "targetPort": 8000}]),
            &[],
        );
        let s = slice(
            "chat-1",
            "IPv4",
            json!([{"name": "http", "port": 8000}]),
            json!([{"addresses": ["10.0.0.1"]}]),
        );
        let r = resolve(&svc, &[&s], &name("http"));
        assert_eq!(r.endpoints, ["10.0.0.1:8000"]);
        assert!(r.addresses.is_empty(), "{:?}", r.addresses);
    }

    #[test]
    fn a_missing_port_or_an_external_name_says_why() {
        let r = resolve(&named(), &[], &name("grpc"));
        let problem = r.problem.unwrap();
        assert!(problem.contains("no port `grpc`"), "{problem}");
        assert!(problem.contains("80 (http), 9090 (metrics)"), "{problem}");
        let external: Service = serde_json::from_value(json!({
            "metadata": {"name": "chat", "namespace": "ml"},
            "spec": {"type": "ExternalName", "externalName": "chat.example.com"},
        }))
        .unwrap();
        let r = resolve(&external, &[], &ServicePort::Number(80));
        assert!(r.problem.unwrap().contains("ExternalName"));
        assert!(r.endpoints.is_empty() && r.addresses.is_empty());
    }

    #[test]
    fn the_view_reads_only_the_slices_of_the_named_service() {
        let mine = slice(
            "chat-1",
            "IPv4",
            json!([{"name": "http", "port": 8000}]),
            json!([{"addresses": ["10.0.0.1"]}]),
        );
        let mut other = slice(
            "other-1",
            "IPv4",
            json!([{"name": "http", "port": 8000}]),
            json!([{"addresses": ["10.0.0.9"]}]),
        );
        other.metadata.labels = Some([(SERVICE_NAME_LABEL.to_owned(), "other".to_owned())].into());
        let (view, ..) = ServiceView::fixed(vec![named()], vec![mine, other]);
        let raw = infermesh_proto::policy::load_str(
            std::path::Path::new("p.yaml"),
            "apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {name: a, namespace: ml}\n\
             spec: {service: {name: chat, port: http}}\n---\n\
             apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {name: b, namespace: ml}\n\
             spec: {service: {name: chat, namespace: prod, port: http}}\n",
        )
        .unwrap();
        let (set, statuses) = view.resolve_set(&raw);
        assert_eq!(set.backends[0].spec.endpoints, ["10.0.0.1:8000"]);
        assert_eq!(set.backends[0].spec.service, None);
        assert!(set.backends[1].spec.endpoints.is_empty());
        assert_eq!(statuses[1].service, "prod/chat");
        let problem = statuses[1].problem.clone().unwrap();
        assert!(problem.contains("no Service prod/chat"), "{problem}");
    }
}
