//! The policy custom resources (`infermesh.io/v1alpha1` Backend,
//! ModelRoute, MeshConfig, LocalModel, AuthorizationPolicy) as the policy
//! source, instead of a directory.
//!
//! Every kind is watched cluster-wide. Nothing is published until each
//! kind has been listed once, so a partial view (routes before their
//! backends) never reaches a proxy. After that, each change (debounced by
//! [`QUIET`]) compiles the whole set with the same loader and checks as
//! policy files, and each object gets a `Ready` condition in its `status`:
//! `True` when it is in force, `False` with the loader's reason when it is
//! not. An invalid object does not hold the others back: the version of it
//! last accepted stays in force (or, for an object never accepted, it is
//! left out), so a bad `kubectl apply` changes nothing that was working.
//!
//! Objects in the root namespace (the control plane's own, `--root-namespace`)
//! are mesh-wide, like policy documents without a namespace; objects in any
//! other namespace reach the proxies of that namespace. Names are unique
//! per kind across the mesh (routes name backends without a namespace). A
//! route's precedence is its age: older `ModelRoute`s match first, ties
//! broken by namespace and name.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt as _;
use infermesh_proto::policy::{self, PolicyError, PolicySet};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::Api;
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// How long the resources must be quiet before the set is compiled.
pub const QUIET: Duration = Duration::from_millis(100);

/// The file name policy errors carry for objects of the cluster.
const SOURCE: &str = "kubernetes";

/// One policy object as the watch saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// Index into the kinds of `crd::kinds()`.
    pub kind: &'static str,
    /// `metadata.uid`.
    pub uid: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `metadata.creationTimestamp`, RFC 3339 (sorts as time).
    pub created: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `spec`, as the API server holds it.
    pub spec: Value,
}

impl Object {
    fn from_dynamic(kind: &'static str, object: &DynamicObject) -> Option<Self> {
        let meta = &object.metadata;
        Some(Self {
            kind,
            uid: meta.uid.clone().unwrap_or_default(),
            namespace: meta.namespace.clone()?,
            name: meta.name.clone()?,
            generation: meta.generation,
            created: meta
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default(),
            labels: meta.labels.clone().unwrap_or_default(),
            spec: object.data.get("spec").cloned().unwrap_or(Value::Null),
        })
    }

    /// `Kind namespace/name`, as messages name it.
    pub fn display(&self) -> String {
        format!("{} {}/{}", self.kind, self.namespace, self.name)
    }

    /// The object as a policy document.
    fn document(&self, root_namespace: &str) -> Value {
        let mut metadata = json!({"name": self.name});
        if self.namespace != root_namespace {
            metadata["namespace"] = json!(self.namespace);
        }
        if !self.labels.is_empty() {
            metadata["labels"] = json!(self.labels);
        }
        json!({
            "apiVersion": policy::API_VERSION,
            "kind": self.kind,
            "metadata": metadata,
            "spec": self.spec,
        })
    }
}

/// What a compile says of one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// In force as it is.
    Accepted,
    /// Not in force: why, and whether an earlier version of it is.
    Invalid {
        /// The loader's messages.
        reason: String,
        /// The version last accepted stays in force.
        kept_previous: bool,
    },
}

/// The outcome of compiling the cluster's objects.
#[derive(Debug)]
pub struct Compiled {
    /// The set to offer; an error only for problems no object can be
    /// blamed for.
    pub set: Result<PolicySet, Vec<PolicyError>>,
    /// Each object's verdict, by uid.
    pub verdicts: HashMap<String, Verdict>,
    /// The documents now in force, by uid: the next compile's fallbacks.
    pub in_force: HashMap<String, Value>,
}

/// Kinds in document order: what others name first.
const ORDER: [&str; 5] = [
    "MeshConfig",
    "Backend",
    "LocalModel",
    "ModelRoute",
    "AuthorizationPolicy",
];

/// Compiles `objects` into a policy set. An object the loader blames is
/// replaced by its version in `previous` (the documents in force before),
/// or left out; then the set is loaded again, a few rounds at most.
pub fn compile(
    objects: &[Object],
    previous: &HashMap<String, Value>,
    root_namespace: &str,
) -> Compiled {
    let mut sorted: Vec<&Object> = objects.iter().collect();
    sorted.sort_by(|a, b| {
        let rank = |o: &Object| ORDER.iter().position(|k| *k == o.kind);
        (rank(a), &a.created, &a.namespace, &a.name).cmp(&(
            rank(b),
            &b.created,
            &b.namespace,
            &b.name,
        ))
    });
    // (object, document, whether it is the previous version)
    let mut docs: Vec<(&Object, Value, bool)> = sorted
        .into_iter()
        .map(|o| (o, o.document(root_namespace), false))
        .collect();
    let mut verdicts: HashMap<String, Verdict> = HashMap::new();
    for _round in 0..4 {
        let (text, starts) = render(docs.iter().map(|(_, doc, _)| doc));
        let errors = match policy::load_str(Path::new(SOURCE), &text) {
            Ok(set) => {
                let in_force = docs
                    .iter()
                    .map(|(o, doc, _)| (o.uid.clone(), doc.clone()))
                    .collect();
                for (object, _, _) in &docs {
                    verdicts
                        .entry(object.uid.clone())
                        .or_insert(Verdict::Accepted);
                }
                for object in objects {
                    // Left out: blamed in an earlier round.
                    verdicts
                        .entry(object.uid.clone())
                        .or_insert_with(|| Verdict::Invalid {
                            reason: "left out".into(),
                            kept_previous: false,
                        });
                }
                return Compiled {
                    set: Ok(set),
                    verdicts,
                    in_force,
                };
            }
            Err(errors) => errors,
        };
        // Which document each error is in.
        let mut blamed: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        let mut unplaced = Vec::new();
        for error in errors {
            match starts.iter().rposition(|&start| start <= error.line) {
                Some(index) if error.line > 0 => blamed
                    .entry(index)
                    .or_default()
                    .push(name_places(&error.message, &starts, &docs)),
                _ => unplaced.push(error),
            }
        }
        if blamed.is_empty() {
            return Compiled {
                set: Err(unplaced),
                verdicts,
                in_force: HashMap::new(),
            };
        }
        // Back to front, so that removals keep the earlier indices.
        for (index, messages) in blamed.into_iter().rev() {
            let (object, _, was_previous) = &docs[index];
            let object = *object;
            let fallback = previous
                .get(&object.uid)
                .filter(|doc| !*was_previous && **doc != docs[index].1)
                .cloned();
            verdicts
                .entry(object.uid.clone())
                .or_insert_with(|| Verdict::Invalid {
                    reason: messages.join("; "),
                    kept_previous: fallback.is_some(),
                });
            match fallback {
                Some(doc) => docs[index] = (object, doc, true),
                None => {
                    // Its previous version failed too: nothing of it stays.
                    if let Some(Verdict::Invalid { kept_previous, .. }) =
                        verdicts.get_mut(&object.uid)
                    {
                        *kept_previous = false;
                    }
                    docs.remove(index);
                }
            }
        }
    }
    let (text, _) = render(docs.iter().map(|(_, doc, _)| doc));
    Compiled {
        set: policy::load_str(Path::new(SOURCE), &text),
        verdicts,
        in_force: HashMap::new(),
    }
}

/// The documents as one YAML stream (JSON is YAML), and the line each
/// starts on.
fn render<'a>(docs: impl Iterator<Item = &'a Value>) -> (String, Vec<usize>) {
    let mut text = String::new();
    let mut starts = Vec::new();
    let mut line = 1;
    for doc in docs {
        text.push_str("---\n");
        line += 1;
        starts.push(line);
        let body = serde_json::to_string_pretty(doc).unwrap_or_default();
        line += body.lines().count();
        text.push_str(&body);
        text.push('\n');
    }
    (text, starts)
}

/// A message with its `kubernetes:LINE:COLUMN` references (the loader's
/// "already used at ...") replaced by the object they point into.
fn name_places(message: &str, starts: &[usize], docs: &[(&Object, Value, bool)]) -> String {
    let prefix = format!("{SOURCE}:");
    let mut out = String::new();
    let mut rest = message;
    while let Some(at) = rest.find(&prefix) {
        out.push_str(&rest[..at]);
        let after = &rest[at + prefix.len()..];
        let digits = after
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(after.len());
        let line: Option<usize> = after[..digits].parse().ok();
        let mut tail = &after[digits..];
        if let Some(stripped) = tail.strip_prefix(':') {
            let cols = stripped
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(stripped.len());
            tail = &stripped[cols..];
        }
        match line.and_then(|l| starts.iter().rposition(|&s| s <= l)) {
            Some(index) => out.push_str(&docs[index].0.display()),
            None => out.push_str(&prefix),
        }
        rest = tail;
    }
    out.push_str(rest);
    out
}

/// A change seen by one kind's watch.
enum Change {
    /// The kind was (re-)listed: these are all its objects.
    Listed(&'static str, Vec<Object>),
    /// An object was added or changed.
    Applied(Object),
    /// An object was deleted.
    Deleted(&'static str, String, String),
}

/// Watches every policy kind and hands each compiled set to `offer` (the
/// publisher's) until the runtime ends.
pub async fn run(
    client: kube::Client,
    offer: impl Fn(Result<PolicySet, Vec<PolicyError>>) + Send + 'static,
    root_namespace: String,
) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut kinds = Vec::new();
    for (kind, plural) in crate::crd::kinds() {
        let gvk = GroupVersionKind::gvk(crate::crd::GROUP, crate::crd::VERSION, kind);
        let resource = ApiResource::from_gvk_with_plural(&gvk, plural);
        tokio::spawn(watch_kind(
            client.clone(),
            kind,
            resource.clone(),
            tx.clone(),
        ));
        kinds.push((kind, resource));
    }
    drop(tx);
    let mut objects: BTreeMap<(&'static str, String, String), Object> = BTreeMap::new();
    let mut listed: Vec<&'static str> = Vec::new();
    let mut previous: HashMap<String, Value> = HashMap::new();
    let mut written: HashMap<String, (Option<i64>, Verdict)> = HashMap::new();
    loop {
        // Wait for a change, then for quiet.
        let Some(first) = rx.recv().await else { return };
        let mut batch = vec![first];
        loop {
            match tokio::time::timeout(QUIET, rx.recv()).await {
                Ok(Some(change)) => batch.push(change),
                Ok(None) => return,
                Err(_) => break,
            }
        }
        for change in batch {
            match change {
                Change::Listed(kind, list) => {
                    objects.retain(|(k, _, _), _| *k != kind);
                    for object in list {
                        objects.insert(
                            (kind, object.namespace.clone(), object.name.clone()),
                            object,
                        );
                    }
                    if !listed.contains(&kind) {
                        listed.push(kind);
                    }
                }
                Change::Applied(object) => {
                    objects.insert(
                        (object.kind, object.namespace.clone(), object.name.clone()),
                        object,
                    );
                }
                Change::Deleted(kind, namespace, name) => {
                    objects.remove(&(kind, namespace, name));
                }
            }
        }
        if listed.len() < kinds.len() {
            continue;
        }
        let current: Vec<Object> = objects.values().cloned().collect();
        let compiled = compile(&current, &previous, &root_namespace);
        for object in &current {
            let Some(verdict) = compiled.verdicts.get(&object.uid) else {
                continue;
            };
            match verdict {
                Verdict::Invalid {
                    reason,
                    kept_previous,
                } => tracing::warn!(
                    object = %object.display(),
                    kept_previous,
                    "policy object refused: {reason}"
                ),
                Verdict::Accepted => {}
            }
            let stamp = (object.generation, verdict.clone());
            if written.get(&object.uid) == Some(&stamp) {
                continue;
            }
            written.insert(object.uid.clone(), stamp);
            if let Some((_, resource)) = kinds.iter().find(|(k, _)| *k == object.kind) {
                tokio::spawn(write_status(
                    client.clone(),
                    resource.clone(),
                    object.clone(),
                    verdict.clone(),
                ));
            }
        }
        written.retain(|uid, _| current.iter().any(|o| &o.uid == uid));
        if compiled.set.is_ok() {
            previous = compiled.in_force;
        }
        offer(compiled.set);
    }
}

/// Follows one kind, sending its changes.
async fn watch_kind(
    client: kube::Client,
    kind: &'static str,
    resource: ApiResource,
    changes: mpsc::UnboundedSender<Change>,
) {
    let api: Api<DynamicObject> = Api::all_with(client, &resource);
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut listing: Option<Vec<Object>> = None;
    let mut last_error = String::new();
    while let Some(event) = events.next().await {
        let change = match event {
            Ok(watcher::Event::Init) => {
                listing = Some(Vec::new());
                None
            }
            Ok(watcher::Event::InitApply(object)) => {
                if let (Some(listing), Some(object)) =
                    (listing.as_mut(), Object::from_dynamic(kind, &object))
                {
                    listing.push(object);
                }
                None
            }
            Ok(watcher::Event::InitDone) => {
                last_error.clear();
                listing.take().map(|list| Change::Listed(kind, list))
            }
            Ok(watcher::Event::Apply(object)) => {
                Object::from_dynamic(kind, &object).map(Change::Applied)
            }
            Ok(watcher::Event::Delete(object)) => {
                let meta = &object.metadata;
                match (&meta.namespace, &meta.name) {
                    (Some(ns), Some(name)) => Some(Change::Deleted(kind, ns.clone(), name.clone())),
                    _ => None,
                }
            }
            Err(error) => {
                let text = error.to_string();
                if text != last_error {
                    tracing::warn!(
                        kind,
                        error = %text,
                        "watching the policy resources failed (is the CRD installed, and may \
                         the control plane list it?); retrying"
                    );
                    last_error = text;
                }
                None
            }
        };
        if let Some(change) = change {
            if changes.send(change).is_err() {
                return;
            }
        }
    }
}

/// Writes the object's `Ready` condition.
async fn write_status(
    client: kube::Client,
    resource: ApiResource,
    object: Object,
    verdict: Verdict,
) {
    let (status, reason, message) = match &verdict {
        Verdict::Accepted => ("True", "Accepted", "in force".to_owned()),
        Verdict::Invalid {
            reason,
            kept_previous: true,
        } => (
            "False",
            "Invalid",
            format!("{reason} (the version accepted before stays in force)"),
        ),
        Verdict::Invalid { reason, .. } => ("False", "Invalid", format!("{reason} (not in force)")),
    };
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let mut condition = json!({
        "type": "Ready",
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now,
    });
    let mut patch = json!({"status": {"conditions": [condition.clone()]}});
    if let Some(generation) = object.generation {
        condition["observedGeneration"] = json!(generation);
        patch = json!({"status": {"observedGeneration": generation, "conditions": [condition]}});
    }
    let api: Api<DynamicObject> = Api::namespaced_with(client, &object.namespace, &resource);
    if let Err(error) = api
        .patch_status(&object.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        tracing::warn!(object = %object.display(), %error, "cannot write the policy object's status");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(
        kind: &'static str,
        uid: &str,
        ns: &str,
        name: &str,
        created: &str,
        spec: Value,
    ) -> Object {
        Object {
            kind,
            uid: uid.into(),
            namespace: ns.into(),
            name: name.into(),
            generation: Some(1),
            created: created.into(),
            labels: BTreeMap::new(),
            spec,
        }
    }

    fn backend(uid: &str, name: &str) -> Object {
        object(
            "Backend",
            uid,
            "ml",
            name,
            "2026-01-01T00:00:00Z",
            json!({"endpoints": ["10.0.0.1:8000"]}),
        )
    }

    fn route(uid: &str, name: &str, created: &str, backend: &str) -> Object {
        object(
            "ModelRoute",
            uid,
            "ml",
            name,
            created,
            json!({"match": [{"model": {"exact": name}}], "backends": [{"backend": backend}]}),
        )
    }

    #[test]
    fn valid_objects_are_all_accepted_and_routes_ordered_by_age() {
        let objects = vec![
            route("r2", "newer", "2026-02-01T00:00:00Z", "vllm"),
            route("r1", "older", "2026-01-01T00:00:00Z", "vllm"),
            backend("b", "vllm"),
        ];
        let compiled = compile(&objects, &HashMap::new(), "infermesh-system");
        let set = compiled.set.unwrap();
        let names: Vec<_> = set
            .routes
            .iter()
            .map(|r| r.metadata.name.as_str())
            .collect();
        assert_eq!(names, ["older", "newer"]);
        assert_eq!(set.routes[0].metadata.namespace.as_deref(), Some("ml"));
        assert!(compiled.verdicts.values().all(|v| *v == Verdict::Accepted));
        assert_eq!(compiled.in_force.len(), 3);
    }

    #[test]
    fn the_root_namespace_is_mesh_wide() {
        let mut mesh = object("MeshConfig", "m", "infermesh-system", "mesh", "", json!({}));
        mesh.labels.insert("team".into(), "a".into());
        let set = compile(&[mesh], &HashMap::new(), "infermesh-system")
            .set
            .unwrap();
        let mesh = set.mesh.unwrap();
        assert_eq!(mesh.metadata.namespace, None);
        assert_eq!(mesh.metadata.labels["team"], "a");
    }

    #[test]
    fn an_invalid_object_is_left_out_and_the_others_stay() {
        let mut bad = backend("bad", "broken");
        bad.spec = json!({"endpoints": ["10.0.0.2:8000"], "balancr": "round-robin"});
        let objects = vec![backend("b", "vllm"), route("r", "chat", "", "vllm"), bad];
        let compiled = compile(&objects, &HashMap::new(), "infermesh-system");
        let set = compiled.set.unwrap();
        assert_eq!(set.backends.len(), 1);
        assert_eq!(set.routes.len(), 1);
        match &compiled.verdicts["bad"] {
            Verdict::Invalid {
                reason,
                kept_previous,
            } => {
                assert!(reason.contains("balancr"), "{reason}");
                assert!(!kept_previous);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(compiled.verdicts["b"], Verdict::Accepted);
    }

    #[test]
    fn a_bad_edit_keeps_the_version_in_force() {
        let good = vec![backend("b", "vllm"), route("r", "chat", "", "vllm")];
        let first = compile(&good, &HashMap::new(), "infermesh-system");
        // The route now names a backend that does not exist.
        let edited = vec![backend("b", "vllm"), route("r", "chat", "", "missing")];
        let second = compile(&edited, &first.in_force, "infermesh-system");
        let set = second.set.unwrap();
        assert_eq!(set, first.set.unwrap(), "the accepted route stays");
        match &second.verdicts["r"] {
            Verdict::Invalid {
                reason,
                kept_previous,
            } => {
                assert!(reason.contains("missing"), "{reason}");
                assert!(kept_previous);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_duplicate_name_names_the_object_that_has_it() {
        let mut other = backend("b2", "vllm");
        other.namespace = "team-b".into();
        other.created = "2026-03-01T00:00:00Z".into();
        let compiled = compile(&[backend("b1", "vllm"), other], &HashMap::new(), "root");
        assert_eq!(compiled.set.unwrap().backends.len(), 1);
        match &compiled.verdicts["b2"] {
            Verdict::Invalid { reason, .. } => {
                assert!(reason.contains("Backend ml/vllm"), "{reason}");
                assert!(!reason.contains("kubernetes:"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
}
