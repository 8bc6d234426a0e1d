//! Checks that serde's types cannot express: value formats (names,
//! endpoints, header names, paths, ranges, namespaces, labels) and
//! references across documents and files (backend names, one `MeshConfig`,
//! unique names, routes that an earlier route makes unreachable).
//!
//! The format checks are plain functions returning the message, tested on
//! their own (`format`); each kind has its checks in a module of its own;
//! [`set`] walks the loaded documents and locates each problem at the
//! offending node, and checks what every kind has: metadata, names and
//! selectors. `reference` resolves the backends documents name; `path`
//! finds the node a problem is blamed on.

mod authorization;
mod backend;
mod format;
mod local_model;
mod mesh_config;
mod model_route;
mod path;
mod reference;

pub(in crate::policy) use local_model::local_model_problems;

use std::collections::HashMap;
use std::path::Path;

use super::yaml::Node;
use super::{Kind, Loader, Location, PolicyError};
use crate::policy::{Metadata, WorkloadSelector};
use authorization::authorization_spec;
use backend::backend_spec;
use format::{label_key_problem, label_value_problem, name_problem, namespace_problem};
use local_model::local_model_spec;
use mesh_config::mesh_spec;
use model_route::{route_spec, unreachable_routes};
use path::{find, P};
use reference::BackendNames;
use P::{KeyOf, K};

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
