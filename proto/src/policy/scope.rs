//! Which documents of a policy set reach which proxy.
//!
//! A `ModelRoute`, an `AuthorizationPolicy` or the `MeshConfig` applies to a proxy when its
//! `metadata.namespace` is absent (mesh-wide) or equal to the proxy's
//! namespace, and when every label of its `spec.workloadSelector.matchLabels`
//! is on the proxy's workload with the same value. Backends and local models
//! carry no scope of their own: a proxy receives exactly the backends (and
//! the `LocalModel`s, named `local:<name>`) that the routes and the
//! `MeshConfig` it receives name, so a scoped set is always self-contained,
//! and a proxy loads only the local models its routes use. A backend with
//! `addresses` stands for those destinations wherever they are dialled
//! (it implies a route of its own), so it reaches every proxy.
//!
//! ```
//! use std::path::Path;
//! use infermesh_proto::policy::{load_str, Workload};
//!
//! let set = load_str(Path::new("p.yaml"), "
//! apiVersion: infermesh.io/v1alpha1
//! kind: Backend
//! metadata: {name: vllm}
//! spec: {endpoints: [\"vllm:8000\"]}
//! ---
//! apiVersion: infermesh.io/v1alpha1
//! kind: ModelRoute
//! metadata: {name: chat, namespace: team-a}
//! spec: {backends: [{backend: vllm}]}
//! ").unwrap();
//! let team_b = Workload { namespace: "team-b".into(), ..Workload::default() };
//! assert!(set.scoped_to(&team_b).routes.is_empty());
//! assert!(set.scoped_to(&team_b).backends.is_empty());
//! ```

use std::collections::{BTreeMap, HashSet};

use super::{local_model_name, Metadata, PolicySet, WorkloadSelector};

/// What a proxy says about the workload it serves: the inputs of scoping.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Workload {
    /// Kubernetes namespace of the workload; empty when it has none, in
    /// which case only mesh-wide documents apply.
    pub namespace: String,
    /// The workload's labels (the pod's, in Kubernetes).
    pub labels: BTreeMap<String, String>,
}

impl Workload {
    /// Whether a document with this metadata and selector applies here.
    pub fn selected_by(&self, metadata: &Metadata, selector: Option<&WorkloadSelector>) -> bool {
        let namespace_ok = metadata
            .namespace
            .as_deref()
            .is_none_or(|ns| ns == self.namespace);
        let labels_ok = selector.is_none_or(|s| {
            s.match_labels
                .iter()
                .all(|(key, value)| self.labels.get(key) == Some(value))
        });
        namespace_ok && labels_ok
    }
}

impl PolicySet {
    /// The documents that apply to `workload`: its routes (in order), its
    /// `MeshConfig`, and the backends and local models those name.
    pub fn scoped_to(&self, workload: &Workload) -> PolicySet {
        let routes: Vec<_> = self
            .routes
            .iter()
            .filter(|r| workload.selected_by(&r.metadata, r.spec.workload_selector.as_ref()))
            .cloned()
            .collect();
        let mesh = self
            .mesh
            .as_ref()
            .filter(|m| workload.selected_by(&m.metadata, m.spec.workload_selector.as_ref()))
            .cloned();
        let named: HashSet<&str> = routes
            .iter()
            .flat_map(|r| r.spec.backend_names())
            .chain(mesh.iter().filter_map(|m| m.spec.opaque.backend.as_deref()))
            .collect();
        let backends = self
            .backends
            .iter()
            .filter(|b| named.contains(b.metadata.name.as_str()) || !b.spec.addresses.is_empty())
            .cloned()
            .collect();
        let local_models = self
            .local_models
            .iter()
            .filter(|m| {
                named
                    .iter()
                    .any(|n| local_model_name(n) == Some(m.metadata.name.as_str()))
            })
            .cloned()
            .collect();
        let authorizations = self
            .authorizations
            .iter()
            .filter(|a| workload.selected_by(&a.metadata, a.spec.workload_selector.as_ref()))
            .cloned()
            .collect();
        PolicySet {
            backends,
            local_models,
            routes,
            mesh,
            authorizations,
        }
    }
}

/// Whether every proxy that `later` reaches is also reached by `earlier`,
/// so that `earlier`, coming first, is in force wherever `later` is.
pub(super) fn covers(
    earlier: (&Metadata, Option<&WorkloadSelector>),
    later: (&Metadata, Option<&WorkloadSelector>),
) -> bool {
    let namespace_ok = match (&earlier.0.namespace, &later.0.namespace) {
        (None, _) => true,
        (Some(a), Some(b)) => a == b,
        (Some(_), None) => false,
    };
    let labels_ok = earlier.1.is_none_or(|wanted| {
        let given = later.1.map(|s| &s.match_labels);
        wanted
            .match_labels
            .iter()
            .all(|(k, v)| given.and_then(|g| g.get(k)) == Some(v))
    });
    namespace_ok && labels_ok
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::load_str;

    /// Backends a, b, c, d; routes in several scopes; a MeshConfig that
    /// names `d` for opaque traffic.
    fn set(mesh_scope: &str) -> PolicySet {
        let backend = |name: &str| {
            format!(
                "apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {{name: {name}, namespace: models}}\nspec: {{endpoints: [\"{name}:80\"]}}\n"
            )
        };
        let route = |name: &str, metadata: &str, spec: &str, backend: &str| {
            format!(
                "apiVersion: infermesh.io/v1alpha1\nkind: ModelRoute\nmetadata: {{name: {name}{metadata}}}\nspec: {{match: [{{path: {{prefix: /{name}/}}}}], backends: [{{backend: {backend}}}]{spec}}}\n"
            )
        };
        let docs = [
            backend("a"),
            backend("b"),
            backend("c"),
            backend("d"),
            route("mesh-wide", "", "", "a"),
            route("team-a", ", namespace: team-a", "", "b"),
            route(
                "canary",
                ", namespace: team-a",
                ", workloadSelector: {matchLabels: {app: chat, track: canary}}",
                "c",
            ),
            route(
                "any-chat",
                "",
                ", workloadSelector: {matchLabels: {app: chat}}",
                "b",
            ),
            route("everyone", "", ", workloadSelector: {}", "a"),
            format!(
                "apiVersion: infermesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh{mesh_scope}}}\nspec: {{opaque: {{backend: d}}}}\n"
            ),
        ];
        load_str(Path::new("p.yaml"), &docs.join("---\n")).unwrap()
    }

    fn workload(namespace: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            namespace: namespace.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn route_names(set: &PolicySet) -> Vec<&str> {
        set.routes
            .iter()
            .map(|r| r.metadata.name.as_str())
            .collect()
    }

    fn backend_names(set: &PolicySet) -> Vec<&str> {
        set.backends
            .iter()
            .map(|b| b.metadata.name.as_str())
            .collect()
    }

    #[test]
    fn a_backend_with_addresses_reaches_every_proxy() {
        let text = "apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {name: svc}\nspec: {endpoints: [\"10.0.0.5:8000\"], addresses: [\"10.96.0.10:8000\"]}\n---\napiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {name: unused}\nspec: {endpoints: [\"u:80\"]}\n";
        let set = load_str(Path::new("p.yaml"), text).unwrap();
        let anyone = Workload {
            namespace: "team-b".into(),
            ..Workload::default()
        };
        let names: Vec<_> = set
            .scoped_to(&anyone)
            .backends
            .iter()
            .map(|b| b.metadata.name.clone())
            .collect();
        assert_eq!(names, ["svc"]);
    }

    #[test]
    fn a_route_brings_its_fallback_backends_along() {
        let text = "apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {name: a}\nspec: {endpoints: [\"a:80\"]}\n---\napiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {name: b}\nspec: {endpoints: [\"b:80\"]}\n---\napiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {name: unused}\nspec: {endpoints: [\"u:80\"]}\n---\napiVersion: infermesh.io/v1alpha1\nkind: ModelRoute\nmetadata: {name: r}\nspec: {backends: [{backend: a}], fallback: [{backend: b}]}\n";
        let set = load_str(Path::new("p.yaml"), text).unwrap();
        let scoped = set.scoped_to(&Workload::default());
        assert_eq!(backend_names(&scoped), ["a", "b"]);
        // The wire form checks fallback references too, and round-trips them.
        let back = PolicySet::from_resources(&scoped.to_resources()).unwrap();
        assert_eq!(back.routes[0].spec.fallback, scoped.routes[0].spec.fallback);
    }

    #[test]
    fn a_route_brings_its_mirror_backend_along_and_its_filters_round_trip() {
        let text = "apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {name: a}\nspec: {endpoints: [\"a:80\"]}\n---\napiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {name: shadow}\nspec: {endpoints: [\"s:80\"]}\n---\napiVersion: infermesh.io/v1alpha1\nkind: ModelRoute\nmetadata: {name: r}\nspec:\n  backends: [{backend: a}]\n  mirror: {backend: shadow, percent: 5}\n  rateLimits: [{key: {header: x-tenant}, tokensPerMinute: 1000}, {key: route, requestsPerSecond: 2}]\n  faults: {abort: {grpcStatus: UNAVAILABLE, percent: 0.5}}\n";
        let set = load_str(Path::new("p.yaml"), text).unwrap();
        let scoped = set.scoped_to(&Workload::default());
        assert_eq!(backend_names(&scoped), ["a", "shadow"]);
        let back = PolicySet::from_resources(&scoped.to_resources()).unwrap();
        assert_eq!(back.routes[0].spec, scoped.routes[0].spec);
        let mut missing = scoped.to_resources();
        missing.retain(|r| r.name != "shadow");
        let error = PolicySet::from_resources(&missing).unwrap_err();
        assert!(error.contains("\"shadow\""), "{error}");
    }

    #[test]
    fn a_route_brings_the_local_models_it_names_along() {
        let text = "apiVersion: infermesh.io/v1alpha1\nkind: LocalModel\nmetadata: {name: minilm}\nspec: {modelDir: /m}\n---\napiVersion: infermesh.io/v1alpha1\nkind: LocalModel\nmetadata: {name: unused}\nspec: {modelDir: /u}\n---\napiVersion: infermesh.io/v1alpha1\nkind: ModelRoute\nmetadata: {name: r, namespace: team-a}\nspec: {backends: [{backend: \"local:minilm\"}]}\n";
        let set = load_str(Path::new("p.yaml"), text).unwrap();
        let inside = set.scoped_to(&workload("team-a", &[]));
        let names: Vec<&str> = inside
            .local_models
            .iter()
            .map(|m| m.metadata.name.as_str())
            .collect();
        assert_eq!(names, ["minilm"]);
        inside.check_references().unwrap();
        assert!(set
            .scoped_to(&workload("team-b", &[]))
            .local_models
            .is_empty());
    }

    #[test]
    fn a_workload_without_namespace_or_labels_gets_only_mesh_wide_documents() {
        let scoped = set("").scoped_to(&Workload::default());
        assert_eq!(route_names(&scoped), ["mesh-wide", "everyone"]);
        assert_eq!(backend_names(&scoped), ["a", "d"]);
        assert!(scoped.mesh.is_some());
    }

    #[test]
    fn a_namespaced_route_reaches_only_its_namespace() {
        let team_a = set("").scoped_to(&workload("team-a", &[]));
        assert_eq!(route_names(&team_a), ["mesh-wide", "team-a", "everyone"]);
        let team_b = set("").scoped_to(&workload("team-b", &[]));
        assert_eq!(route_names(&team_b), ["mesh-wide", "everyone"]);
    }

    #[test]
    fn a_selector_needs_every_label_with_the_same_value() {
        let set = set("");
        let both = set.scoped_to(&workload("team-a", &[("app", "chat"), ("track", "canary")]));
        assert_eq!(
            route_names(&both),
            ["mesh-wide", "team-a", "canary", "any-chat", "everyone"]
        );
        let one = set.scoped_to(&workload("team-a", &[("app", "chat")]));
        assert_eq!(
            route_names(&one),
            ["mesh-wide", "team-a", "any-chat", "everyone"]
        );
        let other_value =
            set.scoped_to(&workload("team-a", &[("app", "chat"), ("track", "stable")]));
        assert!(!route_names(&other_value).contains(&"canary"));
        let wrong_namespace =
            set.scoped_to(&workload("team-b", &[("app", "chat"), ("track", "canary")]));
        assert_eq!(
            route_names(&wrong_namespace),
            ["mesh-wide", "any-chat", "everyone"]
        );
    }

    #[test]
    fn extra_labels_on_the_workload_do_not_matter() {
        let scoped = set("").scoped_to(&workload("x", &[("app", "chat"), ("zone", "eu")]));
        assert!(route_names(&scoped).contains(&"any-chat"));
    }

    #[test]
    fn an_empty_selector_selects_every_workload() {
        for w in [Workload::default(), workload("team-z", &[("k", "v")])] {
            assert!(route_names(&set("").scoped_to(&w)).contains(&"everyone"));
        }
    }

    #[test]
    fn backends_follow_the_routes_that_name_them_whatever_their_namespace() {
        let set = set("");
        // The backends live in `models`; nobody in `models` is needed.
        assert_eq!(
            backend_names(&set.scoped_to(&workload("team-b", &[]))),
            ["a", "d"]
        );
        assert_eq!(
            backend_names(
                &set.scoped_to(&workload("team-a", &[("app", "chat"), ("track", "canary")]))
            ),
            ["a", "b", "c", "d"]
        );
    }

    #[test]
    fn the_mesh_config_is_scoped_and_brings_its_opaque_backend() {
        let scoped = set(", namespace: team-a");
        let outside = scoped.scoped_to(&workload("team-b", &[]));
        assert!(outside.mesh.is_none());
        assert_eq!(backend_names(&outside), ["a"]);
        let inside = scoped.scoped_to(&workload("team-a", &[]));
        assert!(inside.mesh.is_some());
        assert_eq!(backend_names(&inside), ["a", "b", "d"]);
    }

    #[test]
    fn a_mesh_config_selector_picks_workloads_by_label() {
        let mut set = set("");
        if let Some(mesh) = &mut set.mesh {
            mesh.spec.workload_selector = Some(WorkloadSelector {
                match_labels: [("mesh".to_string(), "on".to_string())].into(),
            });
        }
        assert!(set.scoped_to(&workload("", &[])).mesh.is_none());
        assert!(set
            .scoped_to(&workload("", &[("mesh", "on")]))
            .mesh
            .is_some());
        assert!(set
            .scoped_to(&workload("", &[("mesh", "off")]))
            .mesh
            .is_none());
    }

    #[test]
    fn a_scoped_set_keeps_route_order_and_is_self_contained() {
        let set = set("");
        for w in [
            Workload::default(),
            workload("team-a", &[]),
            workload("team-a", &[("app", "chat"), ("track", "canary")]),
            workload("team-b", &[("app", "chat")]),
        ] {
            let scoped = set.scoped_to(&w);
            scoped.check_references().unwrap();
            let order: Vec<usize> = scoped
                .routes
                .iter()
                .map(|r| set.routes.iter().position(|s| s == r).unwrap())
                .collect();
            assert!(order.windows(2).all(|p| p[0] < p[1]), "{order:?}");
            // Scoping what is already scoped changes nothing.
            assert_eq!(scoped.scoped_to(&w), scoped);
        }
    }

    #[test]
    fn an_empty_set_scopes_to_an_empty_set() {
        assert_eq!(
            PolicySet::default().scoped_to(&workload("a", &[("b", "c")])),
            PolicySet::default()
        );
    }

    #[test]
    fn coverage_of_scopes_compares_namespaces_and_selectors() {
        let meta = |ns: Option<&str>| Metadata {
            name: "r".into(),
            namespace: ns.map(str::to_owned),
            labels: BTreeMap::new(),
        };
        let sel = |labels: &[(&str, &str)]| WorkloadSelector {
            match_labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let (global, ns_a, ns_b) = (meta(None), meta(Some("a")), meta(Some("b")));
        let (app, app_canary) = (sel(&[("app", "x")]), sel(&[("app", "x"), ("t", "c")]));
        assert!(covers((&global, None), (&ns_a, None)));
        assert!(!covers((&ns_a, None), (&global, None)));
        assert!(covers((&ns_a, None), (&ns_a, Some(&app))));
        assert!(!covers((&ns_a, None), (&ns_b, None)));
        assert!(covers((&global, Some(&app)), (&ns_a, Some(&app_canary))));
        assert!(!covers((&global, Some(&app_canary)), (&global, Some(&app))));
        assert!(covers((&global, Some(&sel(&[]))), (&global, None)));
        assert!(!covers((&global, Some(&app)), (&global, None)));
    }
}
