//! Reading policy files into a checked [`PolicySet`], or into every error
//! found, each at the line and column of the node to fix.
//!
//! Loading runs in three passes, so that one mistake does not hide the next:
//! - `yaml` parses each file into a tree whose nodes know their position; a
//!   syntax error ends that file, the documents before it are still checked.
//! - The top level of each document (`apiVersion`, `kind`, `metadata`,
//!   `spec`) is checked here; `de` then types `metadata` and `spec` with the
//!   serde derives of the kind modules (`policy/backend.rs`, ...). When
//!   typing fails, the offending node is taken out and typing runs again,
//!   so every unknown field and bad value of a document is reported, not
//!   only the first.
//! - `check` looks at what types cannot express: name and endpoint formats,
//!   references between documents, limits.
//!
//! ```
//! use std::path::Path;
//! use infermesh_proto::policy::load_str;
//!
//! let errors = load_str(Path::new("p.yaml"), "apiVersion: infermesh.io/v1alpha1\nkind: Backnd\n")
//!     .unwrap_err();
//! assert_eq!(
//!     errors[0].to_string(),
//!     "p.yaml:2:7: unknown kind `Backnd`, did you mean `Backend`? \
//!      (expected `Backend`, `ModelRoute`, `MeshConfig`, `LocalModel` or `AuthorizationPolicy`)"
//! );
//! ```

mod check;
mod de;
mod shadow;
mod yaml;

pub(super) use check::local_model_problems;

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use super::{
    AuthorizationPolicySpec, BackendSpec, LocalModelSpec, MeshConfigSpec, Metadata, ModelRouteSpec,
    PolicySet, Resource, API_VERSION,
};
use de::{De, Step};
use yaml::{Node, Value};

/// At most this many errors are reported for one document; past that the
/// document is probably not a policy at all.
const MAX_ERRORS_PER_DOCUMENT: usize = 50;

/// A position in a policy file, 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Location {
    /// Line, from 1.
    pub line: usize,
    /// Column in characters, from 1.
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// One problem in a policy file, displayed as `FILE:LINE:COLUMN: message`.
///
/// Errors about a whole file or directory (it cannot be read) are located
/// at 1:1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}:{column}: {message}", file.display())]
pub struct PolicyError {
    /// The file, as it was named to [`load_path`] or [`load_str`].
    pub file: PathBuf,
    /// Line, from 1.
    pub line: usize,
    /// Column in characters, from 1.
    pub column: usize,
    /// What is wrong, and when it helps, how to fix it.
    pub message: String,
}

impl PolicyError {
    fn new(file: &Path, at: Location, message: impl Into<String>) -> Self {
        Self {
            file: file.to_owned(),
            line: at.line,
            column: at.column,
            message: message.into(),
        }
    }

    /// Where in [`PolicyError::file`] the problem is.
    pub fn location(&self) -> Location {
        Location {
            line: self.line,
            column: self.column,
        }
    }
}

const FILE_START: Location = Location { line: 1, column: 1 };

/// Loads the documents of one file's text; `file` only names it in errors.
pub fn load_str(file: &Path, text: &str) -> Result<PolicySet, Vec<PolicyError>> {
    let mut loader = Loader::default();
    loader.add_text(file, text);
    loader.finish()
}

/// Loads a policy file, or every `*.yaml` and `*.yml` file under a directory
/// (recursively, in path order). Entries whose name starts with `.` are
/// skipped, which also skips the `..data` links of a mounted Kubernetes
/// ConfigMap, whose files would otherwise be read twice.
pub fn load_path(path: &Path) -> Result<PolicySet, Vec<PolicyError>> {
    let mut loader = Loader::default();
    let files = match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => {
            let mut files = Vec::new();
            let mut visited = HashSet::new();
            walk(path, &mut files, &mut visited, &mut loader.errors);
            files.sort();
            files
        }
        Ok(_) => vec![path.to_owned()],
        Err(e) => {
            loader.errors.push(PolicyError::new(
                path,
                FILE_START,
                format!("cannot read: {e}"),
            ));
            Vec::new()
        }
    };
    for file in files {
        match read_text(&file) {
            Ok(text) => loader.add_text(&file, &text),
            Err(error) => loader.errors.push(error),
        }
    }
    loader.finish()
}

/// A file's text; a file that is not UTF-8 is an error at its first bad byte.
fn read_text(file: &Path) -> Result<String, PolicyError> {
    let bytes = std::fs::read(file)
        .map_err(|e| PolicyError::new(file, FILE_START, format!("cannot read: {e}")))?;
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        // Only the valid prefix is decoded, so this cannot fail.
        let before = std::str::from_utf8(valid).unwrap_or_default();
        let at = Location {
            line: before.matches('\n').count() + 1,
            column: before.rsplit('\n').next().unwrap_or("").chars().count() + 1,
        };
        PolicyError::new(file, at, "the file is not UTF-8 text; save it as UTF-8")
    })
}

/// Collects policy files under `dir`; symbolic links are followed, each
/// directory is read once.
fn walk(
    dir: &Path,
    files: &mut Vec<PathBuf>,
    visited: &mut HashSet<PathBuf>,
    errors: &mut Vec<PolicyError>,
) {
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    if !visited.insert(canonical) {
        return;
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            errors.push(PolicyError::new(
                dir,
                FILE_START,
                format!("cannot read directory: {e}"),
            ));
            return;
        }
    };
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                errors.push(PolicyError::new(
                    dir,
                    FILE_START,
                    format!("cannot read directory: {e}"),
                ));
                continue;
            }
        };
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => walk(&path, files, visited, errors),
            Ok(_) => {
                let policy = path
                    .extension()
                    .is_some_and(|ext| ext == "yaml" || ext == "yml");
                if policy {
                    files.push(path);
                }
            }
            Err(e) => errors.push(PolicyError::new(
                &path,
                FILE_START,
                format!("cannot read: {e}"),
            )),
        }
    }
}

/// The policy kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Backend,
    ModelRoute,
    MeshConfig,
    LocalModel,
    AuthorizationPolicy,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Backend,
        Kind::ModelRoute,
        Kind::MeshConfig,
        Kind::LocalModel,
        Kind::AuthorizationPolicy,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Kind::Backend => "Backend",
            Kind::ModelRoute => "ModelRoute",
            Kind::MeshConfig => "MeshConfig",
            Kind::LocalModel => "LocalModel",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
        }
    }

    fn parse(text: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == text)
    }

    fn names() -> String {
        de::list(&Kind::ALL.map(Kind::as_str))
    }
}

/// What every document with a known kind declares, typed or not.
struct Document {
    kind: Kind,
    file: PathBuf,
    /// Position of the `kind` value.
    kind_at: Location,
    /// `metadata.name` and its position, when it is a string.
    name: Option<(String, Location)>,
}

/// The fields every document has at its top level.
const TOP_LEVEL: [&str; 4] = ["apiVersion", "kind", "metadata", "spec"];

/// One typed top-level field; `repaired` when it had errors.
struct Part<T> {
    value: Option<T>,
    repaired: bool,
}

impl<T> Default for Part<T> {
    fn default() -> Self {
        Self {
            value: None,
            repaired: false,
        }
    }
}

/// A typed document and the tree it came from, for locating later errors.
struct Typed<S> {
    resource: Resource<S>,
    file: PathBuf,
    tree: Node,
    /// Parts of the document were dropped after errors; checks that a list
    /// is not empty would only repeat those errors.
    repaired: bool,
}

impl<S> Typed<S> {
    fn new(resource: Resource<S>, file: &Path, tree: Node, repaired: bool) -> Self {
        Self {
            resource,
            file: file.to_owned(),
            tree,
            repaired,
        }
    }
}

#[derive(Default)]
struct Loader {
    errors: Vec<PolicyError>,
    documents: Vec<Document>,
    backends: Vec<Typed<BackendSpec>>,
    local_models: Vec<Typed<LocalModelSpec>>,
    routes: Vec<Typed<ModelRouteSpec>>,
    meshes: Vec<Typed<MeshConfigSpec>>,
    authorizations: Vec<Typed<AuthorizationPolicySpec>>,
}

impl Loader {
    fn add_text(&mut self, file: &Path, text: &str) {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let parsed = yaml::parse(text);
        for (at, message) in parsed.problems {
            self.errors.push(PolicyError::new(file, at, message));
        }
        for document in parsed.documents {
            self.add_document(file, document);
        }
    }

    fn add_document(&mut self, file: &Path, mut root: Node) {
        let Value::Map(entries) = &root.value else {
            let message = format!(
                "expected a policy document (a mapping with {}), found {}",
                de::join(&TOP_LEVEL, "and"),
                root.describe()
            );
            self.errors.push(PolicyError::new(file, root.at, message));
            return;
        };
        // A document of another kind (a stray Kubernetes manifest) gets one
        // error, not one per field it does not share with ours.
        let kind = match root.get("kind").map(kind_of).transpose() {
            Ok(kind) => kind,
            Err((at, message)) => {
                self.errors.push(PolicyError::new(file, at, message));
                return;
            }
        };

        // The top level is checked here rather than by serde so that every
        // missing field is reported, and `metadata` and `spec` are typed
        // (and their errors found) independently of each other.
        for (key, _) in entries {
            let name = key.as_str().map_or_else(|| key.describe(), str::to_owned);
            if !TOP_LEVEL.contains(&name.as_str()) {
                let message = de::unknown_field(&name, &TOP_LEVEL);
                self.errors.push(PolicyError::new(file, key.at, message));
            }
        }
        let missing: Vec<&str> = TOP_LEVEL
            .into_iter()
            .filter(|field| root.get(field).is_none())
            .collect();
        if !missing.is_empty() {
            let mut message = match missing.as_slice() {
                [field] => format!("missing required field `{field}`"),
                fields => format!("missing required fields {}", de::join(fields, "and")),
            };
            if missing.contains(&"kind") {
                message.push_str(&format!(" (`kind` is one of {})", Kind::names()));
            }
            self.errors.push(PolicyError::new(file, root.at, message));
        }

        let Some((kind, kind_at)) = kind else {
            return;
        };
        if let Some(version) = root.get("apiVersion") {
            let problem = match version.as_str() {
                Some(API_VERSION) => None,
                Some(text) => Some(format!(
                    "unsupported apiVersion `{text}`: expected `{API_VERSION}`"
                )),
                None => Some(format!(
                    "`apiVersion` must be `{API_VERSION}`, found {}",
                    version.describe()
                )),
            };
            if let Some(message) = problem {
                self.errors
                    .push(PolicyError::new(file, version.at, message));
            }
        }
        let name = root
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str().map(|s| (s.to_owned(), n.at)));
        self.documents.push(Document {
            kind,
            file: file.to_owned(),
            kind_at,
            name,
        });

        let metadata = self.part::<Metadata>(file, &mut root, "metadata");
        match kind {
            Kind::Backend => {
                let spec = self.part::<BackendSpec>(file, &mut root, "spec");
                if let Some(resource) = resource(kind, &metadata, spec.value) {
                    self.backends
                        .push(Typed::new(resource, file, root, spec.repaired));
                }
            }
            Kind::LocalModel => {
                let spec = self.part::<LocalModelSpec>(file, &mut root, "spec");
                if let Some(resource) = resource(kind, &metadata, spec.value) {
                    self.local_models
                        .push(Typed::new(resource, file, root, spec.repaired));
                }
            }
            Kind::ModelRoute => {
                let spec = self.part::<ModelRouteSpec>(file, &mut root, "spec");
                if let Some(resource) = resource(kind, &metadata, spec.value) {
                    self.routes
                        .push(Typed::new(resource, file, root, spec.repaired));
                }
            }
            Kind::MeshConfig => {
                let spec = self.part::<MeshConfigSpec>(file, &mut root, "spec");
                if let Some(resource) = resource(kind, &metadata, spec.value) {
                    self.meshes
                        .push(Typed::new(resource, file, root, spec.repaired));
                }
            }
            Kind::AuthorizationPolicy => {
                let spec = self.part::<AuthorizationPolicySpec>(file, &mut root, "spec");
                if let Some(resource) = resource(kind, &metadata, spec.value) {
                    self.authorizations
                        .push(Typed::new(resource, file, root, spec.repaired));
                }
            }
        }
    }

    /// Types the value of the top-level `field`, records its errors and puts
    /// its repaired tree back in place.
    fn part<T: DeserializeOwned>(&mut self, file: &Path, root: &mut Node, field: &str) -> Part<T> {
        let Value::Map(entries) = &mut root.value else {
            return Part::default();
        };
        let Some((_, node)) = entries.iter_mut().find(|(k, _)| k.as_str() == Some(field)) else {
            return Part::default();
        };
        let (value, tree, errors) = deserialize::<T>(node.clone(), field);
        *node = tree;
        let repaired = !errors.is_empty();
        for error in errors {
            let at = error.at.unwrap_or(node.at);
            self.errors
                .push(PolicyError::new(file, at, error.to_string()));
        }
        Part { value, repaired }
    }

    fn finish(mut self) -> Result<PolicySet, Vec<PolicyError>> {
        let mut problems = check::set(&self);
        self.errors.append(&mut problems);
        if !self.errors.is_empty() {
            let mut errors = self.errors;
            errors.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
            errors.dedup();
            return Err(errors);
        }
        Ok(PolicySet {
            backends: self.backends.into_iter().map(|t| t.resource).collect(),
            local_models: self.local_models.into_iter().map(|t| t.resource).collect(),
            routes: self.routes.into_iter().map(|t| t.resource).collect(),
            mesh: self.meshes.into_iter().next().map(|t| t.resource),
            authorizations: self
                .authorizations
                .into_iter()
                .map(|t| t.resource)
                .collect(),
        })
    }
}

/// The kind a `kind` value names, and where it is written.
fn kind_of(node: &Node) -> Result<(Kind, Location), (Location, String)> {
    let Some(text) = node.as_str() else {
        let message = format!(
            "`kind` must be one of {}, found {}",
            Kind::names(),
            node.describe()
        );
        return Err((node.at, message));
    };
    if let Some(kind) = Kind::parse(text) {
        return Ok((kind, node.at));
    }
    let mut message = format!("unknown kind `{text}`");
    if let Some(close) = did_you_mean(text, Kind::ALL.map(Kind::as_str)) {
        message.push_str(&format!(", did you mean `{close}`?"));
    }
    message.push_str(&format!(" (expected {})", Kind::names()));
    Err((node.at, message))
}

/// A whole document, when both its typed parts are there.
fn resource<S>(kind: Kind, metadata: &Part<Metadata>, spec: Option<S>) -> Option<Resource<S>> {
    Some(Resource {
        api_version: API_VERSION.to_owned(),
        kind: kind.as_str().to_owned(),
        metadata: metadata.value.clone()?,
        spec: spec?,
    })
}

/// Types `tree` as a `T`, collecting every error: after each failure the
/// offending node is removed and typing runs again. Returns the value when
/// typing finally succeeded, and the tree as typed (for locating nodes by
/// the typed value's indices).
fn deserialize<T: DeserializeOwned>(
    mut tree: Node,
    field: &str,
) -> (Option<T>, Node, Vec<de::Error>) {
    let mut errors: Vec<de::Error> = Vec::new();
    // (mapping position, key) of entries taken out (and of the fields that
    // misspelt ones were meant to be), whose absence is no news.
    let mut removed: Vec<(Location, String)> = Vec::new();
    loop {
        let error = match T::deserialize(De(&tree)) {
            Ok(value) => return (Some(value), tree, errors),
            Err(error) => error.at_root(&tree, field),
        };
        let path = error.path();
        let meant = error.suggested_field();
        let echo = error.missing_field().is_some_and(|field| {
            removed
                .iter()
                .any(|(at, key)| Some(*at) == error.at && key == field)
        });
        if !echo {
            errors.push(error);
        }
        if errors.len() >= MAX_ERRORS_PER_DOCUMENT {
            return (None, tree, errors);
        }
        match remove(&mut tree, &path) {
            Removal::Entry { map_at, key } => {
                // A misspelt required field is not also a missing one.
                if let Some(meant) = meant {
                    removed.push((map_at, meant.to_owned()));
                }
                removed.push((map_at, key));
            }
            Removal::Item => {}
            Removal::Impossible => return (None, tree, errors),
        }
    }
}

enum Removal {
    Entry { map_at: Location, key: String },
    Item,
    Impossible,
}

/// Removes the node at `path`: its mapping entry or sequence item. A node
/// inside a `{variant: value}` mapping takes the whole mapping with it, as
/// an empty one would only be a second error.
fn remove(tree: &mut Node, path: &[Step]) -> Removal {
    let mut path = path;
    while let [rest @ .., Step::VariantKey | Step::VariantValue] = path {
        path = rest;
    }
    let Some((last, parent_path)) = path.split_last() else {
        return Removal::Impossible;
    };
    let Some(parent) = node_at_mut(tree, parent_path) else {
        return Removal::Impossible;
    };
    let parent_at = parent.at;
    match (last, &mut parent.value) {
        (Step::Key(i) | Step::Value(i), Value::Map(entries)) if *i < entries.len() => {
            let (key, _) = entries.remove(*i);
            Removal::Entry {
                map_at: parent_at,
                key: key.as_str().unwrap_or_default().to_owned(),
            }
        }
        (Step::Item(i), Value::Seq(items)) if *i < items.len() => {
            items.remove(*i);
            Removal::Item
        }
        _ => Removal::Impossible,
    }
}

fn node_at_mut<'n>(tree: &'n mut Node, path: &[Step]) -> Option<&'n mut Node> {
    let mut node = tree;
    for step in path {
        node = match (step, &mut node.value) {
            (Step::Key(i), Value::Map(entries)) => &mut entries.get_mut(*i)?.0,
            (Step::Value(i), Value::Map(entries)) => &mut entries.get_mut(*i)?.1,
            (Step::Item(i), Value::Seq(items)) => items.get_mut(*i)?,
            (Step::VariantKey, Value::Map(entries)) => &mut entries.first_mut()?.0,
            (Step::VariantValue, Value::Map(entries)) => &mut entries.first_mut()?.1,
            _ => return None,
        };
    }
    Some(node)
}

/// The candidate `word` was probably meant to be: equal but for case, `-`
/// and `_`, or within a few typos (a swap of two letters counts as one).
fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let squash = |s: &str| -> String {
        s.chars()
            .filter(|c| *c != '-' && *c != '_')
            .flat_map(char::to_lowercase)
            .collect()
    };
    let squashed = squash(word);
    let lower = word.to_lowercase();
    let mut best: Option<(usize, &str)> = None;
    for candidate in candidates {
        let distance = if squash(candidate) == squashed {
            0
        } else {
            strsim::osa_distance(&lower, &candidate.to_lowercase())
        };
        let limit = (word.chars().count().max(candidate.chars().count()) / 3).max(1);
        if distance <= limit && best.is_none_or(|(d, _)| distance < d) {
            best = Some((distance, candidate));
        }
    }
    best.map(|(_, candidate)| candidate)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::policy::{BalancerKind, StringMatch, UpstreamProtocol};

    fn load(text: &str) -> Result<PolicySet, Vec<String>> {
        load_str(Path::new("p.yaml"), text)
            .map_err(|errors| errors.iter().map(ToString::to_string).collect())
    }

    fn errors(text: &str) -> Vec<String> {
        match load(text) {
            Ok(set) => panic!("expected errors, loaded {set:?}"),
            Err(errors) => errors,
        }
    }

    const BACKEND: &str = "\
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata:
  name: vllm
spec:
  endpoints: [\"vllm:8000\"]
";

    #[test]
    fn a_backend_loads_with_defaults() {
        let set = load(BACKEND).unwrap();
        assert_eq!(set.backends.len(), 1);
        let spec = &set.backends[0].spec;
        assert_eq!(spec.endpoints, ["vllm:8000"]);
        assert_eq!(spec.protocol, UpstreamProtocol::Http1);
        assert_eq!(spec.balancer, BalancerKind::PeakEwma);
        assert_eq!(spec.connect_timeout, Duration::from_secs(2));
    }

    #[test]
    fn documents_load_in_order_and_empty_ones_are_skipped() {
        let text = format!(
            "---\n# nothing here\n---\n{BACKEND}---\n{}\n---\n",
            "apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: chat}
spec:
  match:
    - model: {prefix: llama-}
      headers: [{name: x-tenant, value: a}]
  backends: [{backend: vllm, weight: 3, model: llama-3}]
  timeouts: {firstByte: 10s, total: 2m, idle: none}"
        );
        let set = load(&text).unwrap();
        let route = &set.routes[0].spec;
        assert_eq!(
            route.matches[0].model,
            Some(StringMatch::Prefix("llama-".into()))
        );
        assert_eq!(route.backends[0].weight, 3);
        assert_eq!(route.timeouts.first_byte, Some(Duration::from_secs(10)));
        assert_eq!(route.timeouts.idle, None);
        assert_eq!(route.timeouts.total, Some(Duration::from_secs(120)));
    }

    const RETRY_ROUTE: &str = "apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: chat}
spec:
  backends: [{backend: vllm}]
  timeouts: {firstByte: 5s}
  retries:
";

    #[test]
    fn retries_load_with_defaults() {
        let text = format!("{BACKEND}---\n{RETRY_ROUTE}    maxAttempts: 4\n");
        let set = load(&text).unwrap();
        let retries = set.routes[0].spec.retries.clone().unwrap();
        assert_eq!(retries.max_attempts, 4);
        assert_eq!(retries.on.statuses, [429, 503]);
        assert_eq!(
            retries.on.grpc_codes,
            [crate::policy::GrpcCode::Unavailable]
        );
        assert_eq!(crate::policy::GrpcCode::Unavailable.code(), 14);
        assert_eq!(crate::policy::GrpcCode::ResourceExhausted.code(), 8);
        assert_eq!(retries.max_replay_bytes, 64 * 1024);
        assert_eq!(retries.budget.ratio, 0.2);
        assert!(load(&format!("{BACKEND}---\n{RETRY_ROUTE}    maxAttempts: 2\n    on: {{grpcCodes: [UNAVAILABLE, RESOURCE_EXHAUSTED]}}\n")).is_ok());
    }

    #[test]
    fn fallback_links_name_backends_or_local_models() {
        let route = RETRY_ROUTE.replace("  retries:\n", "  fallback:\n");
        let text = format!("{BACKEND}---\n{route}    - {{backend: vllm, model: small}}\n");
        let set = load(&text).unwrap();
        assert_eq!(
            set.routes[0].spec.fallback[0].model.as_deref(),
            Some("small")
        );
        let text = format!(
            "{BACKEND}---\n{route}    - {{backend: vlm}}\n    - {{backend: \"local:minilm\"}}\n"
        );
        let found = errors(&text);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].starts_with("p.yaml:15:17: "), "{found:?}");
        assert!(found[0].contains("vllm"), "did you mean: {found:?}");
        assert_eq!(
            found[1],
            "p.yaml:16:17: unknown local model `minilm`: no LocalModel has this name"
        );
        let text = format!("{LOCAL_MODEL}---\n{text}");
        let set = load(&text.replace("{backend: vlm}", "{backend: vllm}")).unwrap();
        assert_eq!(set.local_models[0].metadata.name, "minilm");
        assert_eq!(set.routes[0].spec.fallback[1].backend, "local:minilm");
    }

    const LOCAL_MODEL: &str = "apiVersion: infermesh.io/v1alpha1
kind: LocalModel
metadata: {name: minilm}
spec:
  modelDir: /models/all-MiniLM-L6-v2
";

    #[test]
    fn a_local_model_has_defaults_and_bounds() {
        let set = load(LOCAL_MODEL).unwrap();
        let spec = &set.local_models[0].spec;
        assert_eq!(spec.model_dir, "/models/all-MiniLM-L6-v2");
        assert_eq!(
            (
                spec.max_batch_size,
                spec.max_batch_tokens,
                spec.max_tokens,
                spec.max_inputs
            ),
            (32, 8192, 256, 2048)
        );
        assert_eq!(spec.max_wait, std::time::Duration::from_millis(2));
        assert_eq!(spec.adapter, None);
        let text = format!(
            "{LOCAL_MODEL}  maxBatchSize: 0\n  maxTokens: 1024\n  maxBatchTokens: 100\n  maxWait: 2s\n  maxInputs: 5000\n  adaptor: llvmpipe\n"
        );
        assert_eq!(
            errors(&text),
            [
                "p.yaml:6:17: `maxBatchSize` must be between 1 and 256, found 0",
                "p.yaml:7:14: `maxTokens` must be between 2 and 512, found 1024",
                "p.yaml:8:19: `maxBatchTokens` must be between 512 and 1048576, found 100",
                "p.yaml:9:12: `maxWait` (2000ms) must be at most 1s: every request waits this long when it is alone",
                "p.yaml:10:14: `maxInputs` must be between 1 and 2048, found 5000",
                "p.yaml:11:3: unknown field `adaptor`, did you mean `adapter`?",
            ]
        );
        assert_eq!(
            errors(&LOCAL_MODEL.replace("  modelDir: /models/all-MiniLM-L6-v2\n", "  modelDir: \"\"\n")),
            ["p.yaml:5:13: `modelDir` is empty: give the directory that holds config.json, model.safetensors and tokenizer.json"]
        );
        assert_eq!(
            errors(&LOCAL_MODEL.replace("kind: LocalModel", "kind: LocalModle")),
            ["p.yaml:2:7: unknown kind `LocalModle`, did you mean `LocalModel`? (expected `Backend`, `ModelRoute`, `MeshConfig`, `LocalModel` or `AuthorizationPolicy`)"]
        );
    }

    #[test]
    fn routes_name_local_models_with_the_local_prefix() {
        let route = |backend: &str| {
            format!("---\napiVersion: infermesh.io/v1alpha1\nkind: ModelRoute\nmetadata: {{name: r}}\nspec: {{backends: [{{backend: \"{backend}\"}}]}}\n")
        };
        let ok = format!("{BACKEND}---\n{LOCAL_MODEL}{}", route("local:minilm"));
        assert_eq!(
            load(&ok).unwrap().routes[0].spec.backends[0].backend,
            "local:minilm"
        );
        assert_eq!(
            errors(&format!("{BACKEND}---\n{LOCAL_MODEL}{}", route("local:minlm"))),
            ["p.yaml:17:29: unknown local model `minlm`: no LocalModel has this name; did you mean `local:minilm`?"]
        );
        assert_eq!(
            errors(&format!("{BACKEND}---\n{LOCAL_MODEL}{}", route("minilm"))),
            ["p.yaml:17:29: unknown backend `minilm`: no Backend has this name; `minilm` is a LocalModel: write `local:minilm`"]
        );
        assert_eq!(
            errors(&format!("{BACKEND}---\n{LOCAL_MODEL}{}", route("local:vllm"))),
            ["p.yaml:17:29: unknown local model `vllm`: no LocalModel has this name; `vllm` is a Backend: name it without `local:`"]
        );
        let mesh = "---\napiVersion: infermesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {opaque: {backend: \"local:minilm\"}}\n";
        assert_eq!(
            errors(&format!("{LOCAL_MODEL}{mesh}")),
            ["p.yaml:10:26: `local:minilm`: a local model cannot receive opaque TCP connections; name a Backend"]
        );
    }

    #[test]
    fn tracing_settings_are_checked_with_the_reason() {
        let mesh = |tracing: &str| {
            format!("apiVersion: infermesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\nspec:\n  tracing: {tracing}\n")
        };
        let good = load_str(
            Path::new("p.yaml"),
            &mesh("{endpoint: \"http://collector:4318\", protocol: http, sampling: 0.5}"),
        )
        .expect("valid");
        let tracing = good.mesh.unwrap().spec.tracing.unwrap();
        assert_eq!(tracing.protocol, crate::policy::TracingProtocol::Http);
        assert_eq!(tracing.sampling, 0.5);
        let default =
            load_str(Path::new("p.yaml"), &mesh("{endpoint: \"https://c:4317\"}")).expect("valid");
        let tracing = default.mesh.unwrap().spec.tracing.unwrap();
        assert_eq!(tracing.protocol, crate::policy::TracingProtocol::Grpc);
        assert_eq!(tracing.sampling, 0.01);
        assert_eq!(
            errors(&mesh("{endpoint: \"collector:4317\", sampling: 1.5}")),
            [
                "p.yaml:5:23: `collector:4317`: the collector endpoint is an http:// or https:// URL with a host, such as http://collector:4317",
                "p.yaml:5:51: `sampling` is the share of traces sampled, from 0 to 1 (0.01 for 1%), found 1.5",
            ]
        );
        assert_eq!(
            errors(&mesh("{endpoint: \"http://c\", protocol: json}")).len(),
            1
        );
    }

    #[test]
    fn access_log_and_otlp_metrics_settings_are_read_and_checked() {
        let mesh = |body: &str| {
            format!("apiVersion: infermesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\nspec:\n{body}")
        };
        let set = load_str(
            Path::new("p.yaml"),
            &mesh("  accessLog: {}\n  otlpMetrics: {endpoint: \"http://c:4318\", protocol: http, interval: 2s}\n"),
        )
        .expect("valid");
        let spec = set.mesh.unwrap().spec;
        let access = spec.access_log.unwrap();
        assert!(access.requests);
        assert_eq!(access.refusals_per_second, 10);
        let otlp = spec.otlp_metrics.unwrap();
        assert_eq!(otlp.interval, std::time::Duration::from_secs(2));
        assert_eq!(otlp.protocol, crate::policy::TracingProtocol::Http);
        assert_eq!(
            errors(&mesh("  otlpMetrics: {endpoint: \"c:4317\", interval: 100ms}\n  accessLog: {requests: maybe}\n")),
            [
                "p.yaml:5:27: `c:4317`: the collector endpoint is an http:// or https:// URL with a host, such as http://collector:4317",
                "p.yaml:5:47: `interval` must be at least 1s (metrics are pushed that often), found 100ms",
                "p.yaml:6:25: `requests` must be a boolean, found string \"maybe\"",
            ]
        );
    }

    #[test]
    fn bad_retry_settings_are_located_with_the_reason() {
        let text = format!(
            "{BACKEND}---\n{RETRY_ROUTE}    maxAttempts: 1\n    perTryTimeout: 5s\n    on: {{statuses: [503, 404]}}\n    budget: {{ratio: 1.5}}\n"
        );
        assert_eq!(
            errors(&text),
            [
                "p.yaml:15:18: `maxAttempts` counts the first attempt too: it must be between 2 and 10, found 1 (remove `retries` to turn retries off)",
                "p.yaml:16:20: `perTryTimeout` (5000ms) must be shorter than the route's `timeouts.firstByte` (5000ms), which bounds every attempt together",
                "p.yaml:17:26: status 404 cannot be retried: list 408, 429 or a 5xx status",
                "p.yaml:18:21: budget `ratio` must be between 0 and 1 (retries per request sent), found 1.5",
            ]
        );
        let text = format!("{BACKEND}---\n{RETRY_ROUTE}    on: {{grpcCodes: [UNAVALABLE]}}\n");
        let found = errors(&text);
        assert!(found[0].starts_with("p.yaml:15:"), "{found:?}");
        assert!(found[0].contains("UNAVALABLE"), "{found:?}");
    }

    #[test]
    fn outlier_detection_limits_and_hedging_load_with_defaults() {
        let text = format!(
            "{BACKEND}  outlierDetection: {{failureRate: {{threshold: 0.3}}}}\n  limits: {{maxInFlight: 8}}\n---\n{RETRY_ROUTE}    maxAttempts: 2\n  hedging: {{delay: 100ms}}\n"
        );
        let set = load(&text).unwrap();
        let outlier = set.backends[0].spec.outlier_detection.clone().unwrap();
        assert_eq!(outlier.consecutive_failures, 5);
        assert_eq!(outlier.base_ejection, Duration::from_secs(30));
        assert_eq!(outlier.max_ejection, Duration::from_secs(300));
        assert_eq!(outlier.max_ejected_percent, 50);
        let rate = outlier.failure_rate.unwrap();
        assert_eq!((rate.threshold, rate.min_requests), (0.3, 20));
        assert_eq!(rate.window, Duration::from_secs(10));
        let limits = set.backends[0].spec.limits.clone().unwrap();
        assert_eq!((limits.max_in_flight, limits.max_pending), (Some(8), None));
        let hedging = set.routes[0].spec.hedging.clone().unwrap();
        assert_eq!(hedging.delay, Duration::from_millis(100));
        assert_eq!(hedging.max_hedges, 1);
        assert!(load(BACKEND).unwrap().backends[0]
            .spec
            .outlier_detection
            .is_none());
    }

    #[test]
    fn bad_outlier_limit_and_hedging_settings_are_located_with_the_reason() {
        let text = format!(
            "{BACKEND}  outlierDetection:\n    consecutiveFailures: 0\n    baseEjection: 10m\n    maxEjectedPercent: 150\n  limits: {{maxInFlight: 4, maxPending: 10}}\n---\n{RETRY_ROUTE}    maxAttempts: 2\n  hedging: {{delay: 5s, maxHedges: 0}}\n"
        );
        assert_eq!(
            errors(&text),
            [
                "p.yaml:8:26: `consecutiveFailures: 0` without a `failureRate` never ejects an endpoint: set one of them, or remove `outlierDetection`",
                "p.yaml:9:19: `baseEjection` (600000ms) must be above zero and at most `maxEjection` (300000ms)",
                "p.yaml:10:24: `maxEjectedPercent` is a percentage of the endpoints: at most 100, found 150",
                "p.yaml:11:40: `maxPending` (10) can never be reached: pending requests are in flight too, and `maxInFlight` is 4",
                "p.yaml:21:20: hedging `delay` (5000ms) must be shorter than the route's `timeouts.firstByte` (5000ms), or no hedge is ever sent",
                "p.yaml:21:35: `maxHedges` must be between 1 and 4, found 0 (remove `hedging` to turn it off)",
            ]
        );
        let text = format!(
            "{BACKEND}  outlierDetection: {{failureRate: {{threshold: 0, window: 100ms}}}}\n  limits: {{maxPending: 0}}\n"
        );
        assert_eq!(
            errors(&text),
            [
                "p.yaml:7:47: failure-rate `threshold` is a share of requests: above 0 and at most 1, found 0",
                "p.yaml:7:58: failure-rate `window` must be between 1s and 1h, found 100ms",
                "p.yaml:8:24: `maxPending: 0` refuses every request: give at least 1, or remove it for no limit",
            ]
        );
    }

    #[test]
    fn bad_model_aware_settings_are_located_with_the_reason() {
        let text = format!(
            "{BACKEND}  balancer: model-aware\n  modelAware:\n    weights: {{queue: -1}}\n    loadFactor: 0.5\n    prefix: {{blocks: 0, blockSize: 8}}\n    metrics:\n      path: metrics\n      interval: 10ms\n      names: {{running: \"9bad name\"}}\n"
        );
        assert_eq!(
            errors(&text),
            [
                "p.yaml:9:22: weight `queue` must be between 0 and 100, found -1",
                "p.yaml:10:17: `loadFactor` bounds an endpoint's load as a multiple of the mean: between 1 and 100, found 0.5",
                "p.yaml:11:22: `blocks` must be between 1 and 64, found 0",
                "p.yaml:11:36: `blockSize` must be between 16 and 4096 bytes, found 8",
                "p.yaml:13:13: metrics `path` must start with `/` (or be `off`), found \"metrics\"",
                "p.yaml:14:17: metrics `interval` must be between 50ms and 60s, found 10ms",
                "p.yaml:15:24: \"9bad name\" is not a Prometheus metric name (letters, digits, `_` and `:`, not starting with a digit)",
            ]
        );
        let text = format!("{BACKEND}  modelAware: {{loadFactor: 2}}\n");
        assert_eq!(
            errors(&text),
            ["p.yaml:7:15: `modelAware` configures `balancer: model-aware`; set that balancer, or remove `modelAware`"]
        );
    }

    /// A route with `block` (unindented YAML) added to its spec.
    fn route_with(block: &str) -> String {
        let block: String = block.lines().map(|l| format!("  {l}\n")).collect();
        let shadow = "---\napiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {name: shadow}\nspec: {endpoints: [\"shadow:8000\"]}\n";
        format!(
            "{BACKEND}{shadow}---\n{}{block}",
            RETRY_ROUTE.replace("  retries:\n", "")
        )
    }

    #[test]
    fn rate_limits_faults_and_a_mirror_load_with_defaults() {
        let text = route_with(
            "rateLimits:\n  - {requestsPerSecond: 2.5}\n  - {key: {header: x-tenant}, tokensPerMinute: 60000, tokenBurst: 1000}\n  - {key: route, requestsPerSecond: 100, burst: 5, maxKeys: 10}\nfaults:\n  delay: {duration: 200ms, percent: 0.5}\n  abort: {grpcStatus: UNAVAILABLE, percent: 10}\nmirror: {backend: shadow}",
        );
        let set = load(&text).unwrap();
        let spec = &set.routes[0].spec;
        let limits = &spec.rate_limits;
        assert_eq!(limits[0].key, crate::policy::RateLimitKey::Caller);
        assert_eq!(limits[0].requests_per_second, Some(2.5));
        assert_eq!((limits[0].burst, limits[0].max_keys), (None, 10_000));
        assert_eq!(
            limits[1].key,
            crate::policy::RateLimitKey::Header("x-tenant".into())
        );
        assert_eq!(
            (limits[1].tokens_per_minute, limits[1].token_burst),
            (Some(60_000), Some(1000))
        );
        assert_eq!(limits[2].key, crate::policy::RateLimitKey::Route);
        let faults = spec.faults.as_ref().unwrap();
        assert_eq!(
            faults.delay.as_ref().unwrap().duration,
            Duration::from_millis(200)
        );
        let abort = faults.abort.as_ref().unwrap();
        assert_eq!(
            (abort.status, abort.grpc_status),
            (None, Some(crate::policy::GrpcCode::Unavailable))
        );
        let mirror = spec.mirror.as_ref().unwrap();
        assert_eq!(mirror.percent, 100.0);
        assert_eq!(mirror.max_in_flight, 100);
        assert_eq!(mirror.timeout, Duration::from_secs(10));
        let names: Vec<&str> = spec.backend_names().collect();
        assert_eq!(names, ["vllm", "shadow"]);
    }

    #[test]
    fn bad_rate_limits_faults_and_mirrors_are_located_with_the_reason() {
        let text = route_with(
            "rateLimits:\n  - {key: route}\n  - requestsPerSecond: 0\n    tokenBurst: 5\n    maxKeys: 0\n    key: {header: \"x tenant\"}\nfaults:\n  delay: {duration: 1s, percent: 150}\n  abort: {status: 200, percent: 1}\nmirror: {backend: \"local:minilm\", percent: -1, maxInFlight: 0, timeout: 0s}",
        );
        assert_eq!(
            errors(&text),
            [
                "p.yaml:20:7: a rate limit needs `requestsPerSecond`, `tokensPerMinute` or both",
                "p.yaml:21:26: `requestsPerSecond` must be above 0 and at most 1000000, found 0",
                "p.yaml:22:19: `tokenBurst` is the most tokens at once under `tokensPerMinute`, which is not set",
                "p.yaml:23:16: `maxKeys` must be between 1 and 1000000, found 0",
                "p.yaml:24:21: `x tenant` is not a valid HTTP header name: ' ' is not allowed (use letters, digits, `-` and `_`)",
                "p.yaml:26:36: `percent` must be between 0 and 100, found 150",
                "p.yaml:27:21: an abort `status` must be an error, 400 to 599, found 200",
                "p.yaml:28:21: `local:minilm`: copies go to a remote backend; a local model cannot be a mirror",
                "p.yaml:28:46: `percent` must be between 0 and 100, found -1",
                "p.yaml:28:63: `maxInFlight` must be between 1 and 10000, found 0",
                "p.yaml:28:75: `timeout` must be above zero: every copy would be abandoned",
            ]
        );
        let text = route_with("faults: {abort: {percent: 1}}\nmirror: {backend: shadw}");
        let found = errors(&text);
        assert_eq!(
            found[0],
            "p.yaml:19:19: an `abort` needs a `status` (HTTP), a `grpcStatus` or both"
        );
        assert!(
            found[1].starts_with("p.yaml:20:21: unknown backend `shadw`"),
            "{found:?}"
        );
        assert!(found[1].contains("did you mean `shadow`?"), "{found:?}");
        let text = route_with("rateLimits:\n  - {requestsPerSecond: 1, tokensPerMinut: 5}");
        let found = errors(&text);
        assert!(
            found[0].contains("did you mean `tokensPerMinute`?"),
            "{found:?}"
        );
    }

    const AUTHZ_ROUTE: &str = "\
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: chat}
spec:
  listener: inbound
  backends: [{backend: vllm}]
";

    #[test]
    fn authorization_policies_load_with_their_rules() {
        let text = format!(
            "{BACKEND}{AUTHZ_ROUTE}---
apiVersion: infermesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: llama-callers, namespace: models}}
spec:
  rules:
    - from: [{{identity: spiffe://cluster.local/ns/apps/sa/web}}, {{namespace: batch}}]
      to: [{{models: [llama-*], methods: [/inference.GRPCInferenceService/*]}}]
    - action: deny
      from: [{{trustDomain: other.org}}]
    - to: [{{routes: [chat], ports: [4143]}}]
"
        );
        let set = load(&text).unwrap();
        let policy = &set.authorizations[0];
        assert_eq!(policy.metadata.namespace.as_deref(), Some("models"));
        let rules = &policy.spec.rules;
        assert_eq!(rules.len(), 3);
        assert_eq!(rules[0].action, crate::policy::AuthorizationAction::Allow);
        assert_eq!(
            rules[0].from[0],
            crate::policy::CallerMatch::Identity(
                "spiffe://cluster.local/ns/apps/sa/web".parse().unwrap()
            )
        );
        assert_eq!(rules[0].to[0].models, ["llama-*"]);
        assert_eq!(rules[1].action, crate::policy::AuthorizationAction::Deny);
        assert_eq!(rules[2].to[0].ports, [4143]);
    }

    #[test]
    fn bad_authorization_rules_are_located_with_the_reason() {
        let text = format!(
            "{BACKEND}{AUTHZ_ROUTE}---
apiVersion: infermesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: bad}}
spec:
  rules:
    - from: [{{identity: spiffe://cluster.local/ns/apps}}, {{namespace: Apps}}, {{trustDomain: a/b}}]
      to: [{{models: [ll*ama], methods: [ModelInfer], routes: [chta], ports: [0]}}]
    - from: [{{namespace: a, trustDomain: b}}]
"
        );
        let errors = errors(&text);
        let expected = [
            "p.yaml:20:25: `identity`: `spiffe://cluster.local/ns/apps` is not a mesh identity",
            "p.yaml:20:70: invalid namespace `Apps`",
            "p.yaml:20:91: trust domain `a/b` has `/`",
            "p.yaml:21:22: `ll*ama`: `*` is allowed only at the end",
            "p.yaml:21:41: `ModelInfer` is not a gRPC method",
            "p.yaml:21:63: unknown route `chta`: no ModelRoute has this name; did you mean `chat`?",
            "p.yaml:21:78: port 0 is not a port",
            "p.yaml:22:14: expected a mapping with exactly one of `identity`, `namespace` or `trustDomain`",
        ];
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
        for (error, want) in errors.iter().zip(expected) {
            assert!(error.starts_with(want), "{error} !~ {want}\n{errors:#?}");
        }
    }

    #[test]
    fn an_unknown_field_is_located_at_its_key_with_a_suggestion() {
        let text = BACKEND.replace("  endpoints:", "  endpionts:");
        assert_eq!(
            errors(&text),
            ["p.yaml:6:3: unknown field `endpionts`, did you mean `endpoints`?",]
        );
    }

    #[test]
    fn an_unknown_field_far_from_any_lists_the_valid_ones() {
        let text = format!("{BACKEND}  colour: blue\n");
        assert_eq!(
            errors(&text),
            ["p.yaml:7:3: unknown field `colour`; valid fields here: `endpoints`, `service`, `addresses`, `protocol`, `balancer`, `modelAware`, `connectTimeout`, `dnsRefresh`, `mtls`, `outlierDetection` or `limits`"]
        );
    }

    #[test]
    fn every_error_of_a_document_is_reported() {
        let text = format!(
            "{BACKEND}  protocol: http3\n  balancer: round_robin\n  connectTimeout: 5 parsecs\n  extra: 1\n"
        );
        assert_eq!(
            errors(&text),
            [
                "p.yaml:7:13: unknown `protocol` value `http3`, did you mean `http1`?",
                "p.yaml:8:13: unknown `balancer` value `round_robin`, did you mean `round-robin`?",
                "p.yaml:9:19: `connectTimeout`: invalid duration \"5 parsecs\": unknown time unit \"parsecs\", supported units: ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few variations)",
                "p.yaml:10:3: unknown field `extra`; valid fields here: `endpoints`, `service`, `addresses`, `protocol`, `balancer`, `modelAware`, `connectTimeout`, `dnsRefresh`, `mtls`, `outlierDetection` or `limits`",
            ]
        );
    }

    #[test]
    fn a_wrong_type_names_the_field_and_what_was_found() {
        let text = BACKEND.replace("[\"vllm:8000\"]", "vllm:8000");
        assert_eq!(
            errors(&text),
            ["p.yaml:6:14: `endpoints` must be a list, found string \"vllm:8000\""]
        );
    }

    #[test]
    fn a_missing_field_is_located_at_the_mapping_that_lacks_it() {
        let text = "apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata:\n  namespace: x\nspec:\n  endpoints: [\"a:1\"]\n";
        assert_eq!(
            errors(text),
            ["p.yaml:4:3: `metadata` is missing required field `name`"]
        );
    }

    #[test]
    fn a_string_match_must_be_a_mapping() {
        let text = "apiVersion: infermesh.io/v1alpha1\nkind: ModelRoute\nmetadata: {name: r}\nspec:\n  match: [{model: gpt-4}]\n  backends: [{backend: b}]\n";
        let text = format!("{}---\n{text}", BACKEND.replace("vllm\n", "b\n"));
        assert_eq!(
            errors(&text),
            ["p.yaml:12:19: `model` must be a mapping with one of `exact` or `prefix`, e.g. `{exact: gpt-4}`, found string \"gpt-4\""]
        );
    }

    #[test]
    fn a_misspelt_match_kind_is_located_at_its_key() {
        let text = "apiVersion: infermesh.io/v1alpha1\nkind: ModelRoute\nmetadata: {name: r}\nspec:\n  match: [{path: {prefx: /v1}}]\n  backends: [{backend: b}]\n";
        let text = format!("{}---\n{text}", BACKEND.replace("vllm\n", "b\n"));
        assert_eq!(
            errors(&text),
            ["p.yaml:12:19: unknown field `prefx`, did you mean `prefix`?"]
        );
    }

    #[test]
    fn a_syntax_error_skips_the_rest_of_the_file_but_not_earlier_documents() {
        let text = format!(
            "{}---\nkind: Backend\nspec: [a, b\n",
            BACKEND.replace("[\"vllm:8000\"]", "[\"vllm\"]")
        );
        assert_eq!(
            errors(&text),
            [
                "p.yaml:6:15: endpoint `vllm` has no port: write `vllm:PORT`",
                "p.yaml:10:1: YAML syntax error: while parsing a flow sequence, expected ',' or ']'",
            ]
        );
    }

    #[test]
    fn bad_destination_patterns_are_located_and_the_passthrough_name_is_reserved() {
        let text = format!(
            "{BACKEND}  addresses: [\"10.96.0.10:8000\", \"llama.svc:8000\"]\n---\napiVersion: infermesh.io/v1alpha1\nkind: ModelRoute\nmetadata: {{name: passthrough}}\nspec:\n  match: [{{destination: [\"10.0.0.1/8\"]}}]\n  backends: [{{backend: vllm}}]\n"
        );
        assert_eq!(
            errors(&text),
            [
                "p.yaml:7:34: destination `llama.svc:8000` is not an IP address, a network in CIDR form, or either with `:PORT` (host names belong in `endpoints`)",
                "p.yaml:11:18: the ModelRoute name `passthrough` is reserved: metrics and logs name intercepted traffic that no route claims so; choose another name",
                "p.yaml:13:26: destination `10.0.0.1/8` has host bits set after its prefix length: write the network address (e.g. `10.0.0.0/16`)",
            ]
        );
    }

    #[test]
    fn duplicate_keys_are_reported_at_the_second_one() {
        let text = format!("{BACKEND}  endpoints: [\"other:1\"]\n");
        assert_eq!(
            errors(&text),
            ["p.yaml:7:3: duplicate key `endpoints`: it is already set at line 6"]
        );
    }

    #[test]
    fn a_wrong_api_version_and_an_unknown_kind_are_reported() {
        let text = "apiVersion: v1\nkind: ConfigMap\n---\napiVersion: infermesh.io/v1\nkind: Backend\nmetadata: {name: a}\nspec: {endpoints: [\"a:1\"]}\n";
        assert_eq!(
            errors(text),
            [
                "p.yaml:2:7: unknown kind `ConfigMap` (expected `Backend`, `ModelRoute`, `MeshConfig`, `LocalModel` or `AuthorizationPolicy`)",
                "p.yaml:4:13: unsupported apiVersion `infermesh.io/v1`: expected `infermesh.io/v1alpha1`",
            ]
        );
    }

    #[test]
    fn every_missing_top_level_field_is_reported_and_the_rest_still_checked() {
        let text = "kind: Backend\nspec:\n  endpoints: [\"a:1\"]\n  protocol: h2\nstatus: {}\n";
        assert_eq!(
            errors(text),
            [
                "p.yaml:1:1: missing required fields `apiVersion` and `metadata`",
                "p.yaml:4:13: unknown `protocol` value `h2`; expected one of `http1` or `http2`",
                "p.yaml:5:1: unknown field `status`; valid fields here: `apiVersion`, `kind`, `metadata` or `spec`",
            ]
        );
    }

    #[test]
    fn a_spec_of_the_wrong_type_names_it() {
        let text =
            "apiVersion: infermesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: m}\nspec: [a]\n";
        assert_eq!(
            errors(text),
            ["p.yaml:4:7: `spec` must be a mapping, found a list"]
        );
    }

    #[test]
    fn a_document_that_is_not_a_mapping_is_refused() {
        assert_eq!(
            errors("- a\n- b\n"),
            ["p.yaml:1:1: expected a policy document (a mapping with `apiVersion`, `kind`, `metadata` and `spec`), found a list"]
        );
    }

    #[test]
    fn names_must_be_unique_per_kind_and_dns_like() {
        let text = format!(
            "{BACKEND}---\n{BACKEND}---\n{}",
            BACKEND.replace("name: vllm", "name: My_Backend")
        );
        assert_eq!(
            errors(&text),
            [
                "p.yaml:11:9: duplicate Backend name `vllm`: already used at p.yaml:4:9",
                "p.yaml:18:9: invalid name `My_Backend`: use lowercase letters, digits, `-` and `.`, starting and ending with a letter or digit (e.g. `my-backend`)",
            ]
        );
    }

    #[test]
    fn routes_must_name_existing_backends_with_positive_weights() {
        let text = format!(
            "{BACKEND}---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {{name: a}}
spec:
  backends:
    - backend: vlm
      weight: 0
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {{name: b}}
spec:
  backends: []
  listener: inbound
"
        );
        assert_eq!(
            errors(&text),
            [
                "p.yaml:13:5: the backend weights of ModelRoute `a` add up to 0: give at least one backend a positive `weight`",
                "p.yaml:13:16: unknown backend `vlm`: no Backend has this name; did you mean `vllm`?",
                "p.yaml:20:13: ModelRoute `b` has no backends: list at least one `backend:`",
            ]
        );
    }

    #[test]
    fn a_reference_to_a_backend_with_errors_is_not_reported_again() {
        let text = format!(
            "{}---\napiVersion: infermesh.io/v1alpha1\nkind: ModelRoute\nmetadata: {{name: a}}\nspec: {{backends: [{{backend: vllm}}]}}\n",
            BACKEND.replace("endpoints", "endpoint")
        );
        assert_eq!(
            errors(&text),
            ["p.yaml:6:3: unknown field `endpoint`, did you mean `endpoints`?",]
        );
    }

    #[test]
    fn mesh_config_is_single_and_checked() {
        let mesh = "apiVersion: infermesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec:\n  classify: {maxBodyPrefix: 100}\n  opaque: {backend: tcp}\n";
        let text = format!("{BACKEND}---\n{mesh}---\n{mesh}");
        assert_eq!(
            errors(&text),
            [
                "p.yaml:12:29: `maxBodyPrefix` must be between 1024 (1 KiB) and 16777216 (16 MiB) bytes, found 100",
                "p.yaml:13:21: unknown backend `tcp`: no Backend has this name",
                "p.yaml:16:7: only one MeshConfig is allowed; the first one is at p.yaml:9:7",
                "p.yaml:19:29: `maxBodyPrefix` must be between 1024 (1 KiB) and 16777216 (16 MiB) bytes, found 100",
                "p.yaml:20:21: unknown backend `tcp`: no Backend has this name",
            ]
        );
    }

    /// A backend `vllm` and then the given routes, each `(name, extra)`
    /// where `extra` is the flow-mapping text after `backends`.
    fn with_routes(routes: &[(&str, &str)]) -> String {
        let mut text = BACKEND.to_owned();
        for (name, extra) in routes {
            text.push_str(&format!(
                "---\napiVersion: infermesh.io/v1alpha1\nkind: ModelRoute\nmetadata: {{name: {name}}}\nspec: {{backends: [{{backend: vllm}}]{extra}}}\n"
            ));
        }
        text
    }

    #[test]
    fn a_route_after_a_match_all_route_is_unreachable() {
        let text = with_routes(&[("all", ""), ("chat", ", match: [{model: {exact: a}}]")]);
        assert_eq!(
            errors(&text),
            ["p.yaml:15:18: ModelRoute `chat` is unreachable: ModelRoute `all` (p.yaml:10:18) comes before it and has no `match`, so it takes every request; move `chat` before it, or give `all` a `match`"]
        );
    }

    #[test]
    fn a_route_covered_by_earlier_conditions_is_unreachable() {
        let text = with_routes(&[
            ("v1", ", match: [{path: {prefix: /v1/}}]"),
            ("llama", ", match: [{model: {prefix: llama}}]"),
            (
                "both",
                ", match: [{path: {exact: /v1/chat/completions}}, {model: {exact: llama-3}, headers: [{name: x}]}]",
            ),
            ("same", ", match: [{path: {prefix: /v1/}}]"),
        ]);
        assert_eq!(
            errors(&text),
            [
                "p.yaml:20:18: ModelRoute `both` is unreachable: ModelRoutes `v1` (p.yaml:10:18) and `llama` (p.yaml:15:18) come before it and together match every request it matches; move `both` before them, or narrow their `match`",
                "p.yaml:25:18: ModelRoute `same` is unreachable: ModelRoute `v1` (p.yaml:10:18) comes before it and matches every request it matches; move `same` before it, or narrow the `match` of `v1`",
            ]
        );
    }

    #[test]
    fn routes_that_reach_other_proxies_or_listeners_do_not_shadow() {
        let text = with_routes(&[
            ("inbound", ", listener: inbound"),
            ("team-a", ""),
            (
                "canary",
                ", workloadSelector: {matchLabels: {track: canary}}",
            ),
            ("narrower", ", match: [{path: {prefix: /v1/chat}}]"),
            ("broader", ", match: [{path: {prefix: /v1/}}]"),
            ("rest", ""),
        ]);
        let text = text.replace("{name: team-a}", "{name: team-a, namespace: team-a}");
        assert!(load(&text).is_ok(), "{:?}", load(&text));
        // A selector narrower than an earlier one's is still shadowed.
        let text = with_routes(&[
            ("chat", ", workloadSelector: {matchLabels: {app: chat}}"),
            (
                "canary",
                ", workloadSelector: {matchLabels: {app: chat, track: canary}}",
            ),
        ]);
        assert_eq!(errors(&text).len(), 1);
        assert!(errors(&text)[0].starts_with("p.yaml:15:18: ModelRoute `canary` is unreachable"));
    }

    #[test]
    fn a_route_with_errors_of_its_own_is_not_called_unreachable() {
        // The misspelt condition is dropped while typing; what is left
        // would look like a match-all route.
        let text = with_routes(&[("typo", ", match: [{modl: {exact: a}}]"), ("b", "")]);
        assert_eq!(
            errors(&text),
            ["p.yaml:11:46: unknown field `modl`, did you mean `model`?"]
        );
    }

    #[test]
    fn namespaces_and_labels_follow_kubernetes_syntax() {
        let text = "apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata:
  name: a
  namespace: Team_A
  labels: {app.kubernetes.io/name: vllm, \"bad key\": x, tier: \"-gpu\", example.com/: y}
spec: {endpoints: [\"a:1\"]}
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: r}
spec:
  backends: [{backend: a}]
  workloadSelector:
    matchLabels: {app: chat, version: \"\", Bad_Prefix/x: \"1\"}
";
        assert_eq!(
            errors(text),
            [
                "p.yaml:5:14: invalid namespace `Team_A`: use at most 63 lowercase letters, digits and `-`, starting and ending with a letter or digit",
                "p.yaml:6:42: invalid label key `bad key`: the name must be 1 to 63 letters, digits, `-`, `_` and `.`, starting and ending with a letter or digit",
                "p.yaml:6:62: invalid label value `-gpu`: use at most 63 letters, digits, `-`, `_` and `.`, starting and ending with a letter or digit",
                "p.yaml:6:70: invalid label key `example.com/`: the name after `/` must be 1 to 63 letters, digits, `-`, `_` and `.`, starting and ending with a letter or digit",
                "p.yaml:15:43: invalid label key `Bad_Prefix/x`: the prefix before `/` must be a DNS subdomain (lowercase letters, digits, `-` and `.`), like `app.kubernetes.io`",
            ]
        );
    }

    #[test]
    fn path_matches_must_start_with_a_slash() {
        let text = format!(
            "{BACKEND}---\napiVersion: infermesh.io/v1alpha1\nkind: ModelRoute\nmetadata: {{name: a}}\nspec:\n  match: [{{path: {{prefix: v1/}}, headers: [{{name: \"a:b\"}}]}}]\n  backends: [{{backend: vllm}}]\n"
        );
        assert_eq!(
            errors(&text),
            [
                "p.yaml:12:27: path prefix `v1/` must start with `/`",
                "p.yaml:12:50: `a:b` is not a valid HTTP header name: ':' is not allowed (use letters, digits, `-` and `_`)",
            ]
        );
    }

    #[test]
    fn numbers_are_range_checked_and_quoted_numbers_are_strings() {
        let text = format!(
            "{BACKEND}---\napiVersion: infermesh.io/v1alpha1\nkind: ModelRoute\nmetadata: {{name: a}}\nspec:\n  backends: [{{backend: vllm, weight: -1}}, {{backend: vllm, weight: \"2\"}}, {{backend: vllm, weight: 1}}]\n"
        );
        assert_eq!(
            errors(&text),
            [
                "p.yaml:12:38: `weight` must be a whole number from 0 to 4294967295, found integer `-1`",
                "p.yaml:12:67: `weight` must be a whole number from 0 to 4294967295, found string \"2\"",
            ]
        );
    }

    #[test]
    fn anchors_and_aliases_are_expanded_within_a_document() {
        let route = "apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: r}
spec:
  match:
    - {path: {prefix: /v1/}, headers: &tenant [{name: x-tenant, value: a}]}
    - {path: {prefix: /v2/}, headers: *tenant}
  backends: [{backend: vllm}]
";
        let set = load(&format!("{BACKEND}---\n{route}")).unwrap();
        let matches = &set.routes[0].spec.matches;
        assert_eq!(matches[1].headers, matches[0].headers);

        let across = format!(
            "x: &tenant [{{name: x-tenant}}]\n---\n{}",
            route.replace("&tenant ", "")
        );
        assert_eq!(
            errors(&across),
            [
                "p.yaml:1:1: unknown field `x`; valid fields here: `apiVersion`, `kind`, `metadata` or `spec`",
                "p.yaml:1:1: missing required fields `apiVersion`, `kind`, `metadata` and `spec` (`kind` is one of `Backend`, `ModelRoute`, `MeshConfig`, `LocalModel` or `AuthorizationPolicy`)",
                "p.yaml:9:39: this alias names an anchor of another document; an anchor only reaches within its own document",
            ]
        );
    }

    #[test]
    fn alias_bombs_and_deep_nesting_are_refused() {
        let mut bomb = String::from("a: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..8 {
            let p = i - 1;
            bomb.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let errors = errors(&bomb);
        assert!(
            errors[0].contains("aliases expand to more than"),
            "{errors:?}"
        );

        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        let errors = super::tests::errors(&deep);
        assert!(errors[0].contains("nested more than"), "{errors:?}");
    }

    #[test]
    fn no_edit_of_a_valid_policy_makes_the_loader_panic() {
        let text = format!(
            "{BACKEND}---\napiVersion: infermesh.io/v1alpha1\nkind: ModelRoute\nmetadata: {{name: r}}\nspec:\n  match: [{{path: {{prefix: /v1}}, headers: [{{name: a}}]}}]\n  backends: [{{backend: vllm, weight: 2}}]\n  timeouts: {{idle: 5s}}\n"
        );
        for (i, _) in text.char_indices() {
            let mut cut = text.clone();
            cut.remove(i);
            let _ = load(&cut);
            let _ = load(&text[..i]);
            for insert in ["[", "{", ":", "-", "\"", "\t", "&a", "*a", "!!str "] {
                let mut edited = text.clone();
                edited.insert_str(i, insert);
                let _ = load(&edited);
            }
        }
    }

    #[test]
    fn suggestions_only_come_for_close_words() {
        let fields = ["endpoints", "protocol", "connectTimeout"];
        assert_eq!(did_you_mean("endpionts", fields), Some("endpoints"));
        assert_eq!(
            did_you_mean("connect_timeout", fields),
            Some("connectTimeout")
        );
        assert_eq!(did_you_mean("colour", fields), None);
    }

    #[test]
    fn a_directory_is_read_recursively_in_path_order_skipping_hidden_entries() {
        let dir = std::env::temp_dir().join(format!("infermesh-load-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("b")).unwrap();
        std::fs::create_dir_all(dir.join("..data")).unwrap();
        std::fs::write(dir.join("b/backend.yml"), BACKEND).unwrap();
        std::fs::write(dir.join("..data/backend.yaml"), BACKEND).unwrap();
        std::fs::write(dir.join("notes.txt"), "not yaml").unwrap();
        std::fs::write(
            dir.join("a.yaml"),
            "apiVersion: infermesh.io/v1alpha1\nkind: ModelRoute\nmetadata: {name: r}\nspec: {backends: [{backend: vllm}]}\n",
        )
        .unwrap();
        let set = load_path(&dir).unwrap();
        assert_eq!((set.backends.len(), set.routes.len()), (1, 1));

        std::fs::write(dir.join("c.yaml"), b"kind: \xff\n").unwrap();
        let errors = load_path(&dir).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].location(), Location { line: 1, column: 7 });
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_path_is_an_error_at_the_start_of_the_file() {
        let errors = load_path(Path::new("/nonexistent/policy.yaml")).unwrap_err();
        assert_eq!(errors[0].location(), FILE_START);
        assert!(errors[0].message.starts_with("cannot read: "));
    }
}
