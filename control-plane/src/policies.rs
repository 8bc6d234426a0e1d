//! The policy directory: watched, validated as a whole, and published as a
//! new snapshot only when valid and changed.
//!
//! Changes are seen through inotify (the `notify` crate) on the directory
//! and everything under it, which also catches editors that save by renaming
//! a new file over the old one and Kubernetes ConfigMap volumes, whose
//! update swaps the `..data` symlink. Events are debounced: the set is
//! loaded once the directory has been quiet for [`QUIET`], and at the latest
//! [`MAX_DELAY`] after the first event, so a save that writes several files
//! is validated once. A periodic re-scan compares file sizes, times and
//! inodes, for what inotify cannot see (a directory created after start, a
//! network file system) and re-arms the watch.
//!
//! A valid set that routes nothing is not taken at its word: a file caught
//! between an editor's truncate and its write, a ConfigMap mid-swap or a
//! deleted file would otherwise publish zero routes to every proxy. A set
//! with no documents, or one without a `ModelRoute` replacing one that had
//! some, is refused like an invalid one (the snapshot in force stays)
//! unless the operator said so: `serve --allow-empty-policy`, or a set that
//! holds nothing but a `MeshConfig` (and authorization policies). So is a
//! set in which a file that held documents is now blank (a `gen >
//! routes.yaml` still running, say): deleting the file is how its
//! documents are removed on purpose.

use std::collections::{BTreeSet, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use infermesh_proto::policy::{self, PolicyError, PolicySet};
use notify::event::{EventKind, ModifyKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::kubernetes::services::{self, ServiceStatus, ServiceView};
use crate::metrics::Metrics;
use crate::snapshot::{first_version, Published};

/// How long the directory must be quiet before it is loaded.
pub const QUIET: Duration = Duration::from_millis(100);
/// The longest a change waits for the directory to be quiet.
pub const MAX_DELAY: Duration = Duration::from_millis(500);
/// How often the directory is compared with what was last loaded.
pub const RESCAN: Duration = Duration::from_secs(2);
/// How long the Services and EndpointSlices must be quiet before the
/// policy is resolved again: a rollout changes many slices at once.
pub const SERVICES_QUIET: Duration = Duration::from_millis(50);
/// The longest a Service change waits for quiet.
pub const SERVICES_MAX_DELAY: Duration = Duration::from_millis(250);

/// What a freshly loaded policy set means for what is published.
#[derive(Debug)]
pub enum Decision {
    /// Valid and different from the snapshot in force: publish it.
    Publish(Box<PolicySet>),
    /// Valid and equal to the snapshot in force (a comment, a touch).
    Unchanged,
    /// Invalid: the snapshot in force stays.
    Refuse(Vec<PolicyError>),
    /// Valid but routes nothing (or a file that held documents is blank),
    /// and nobody said that is meant: the snapshot in force stays. One
    /// error on the policy path (line 0), or one per emptied file, says why.
    RefuseEmpty(Vec<PolicyError>),
    /// Invalid with the same errors as the refusal already reported.
    StillRefused,
}

/// The decision, on plain values: `current` is the set in force, `refused`
/// the errors of a refusal not yet followed by a valid set, `path` the
/// policy path and `allow_empty` whether an empty set may be published.
/// `emptied` lists the files that held documents in the set in force and
/// are blank now.
pub fn decide(
    current: Option<&PolicySet>,
    refused: Option<&[PolicyError]>,
    loaded: Result<PolicySet, Vec<PolicyError>>,
    path: &Path,
    allow_empty: bool,
    emptied: &[PathBuf],
) -> Decision {
    match loaded {
        Ok(set) if current == Some(&set) => Decision::Unchanged,
        Ok(set) => {
            let errors = match emptiness(current, &set, allow_empty) {
                Some(message) => vec![PolicyError {
                    file: path.to_owned(),
                    line: 0,
                    column: 0,
                    message,
                }],
                None if allow_empty => Vec::new(),
                None => emptied
                    .iter()
                    .map(|file| PolicyError {
                        file: file.clone(),
                        line: 1,
                        column: 1,
                        message: "the file is empty but held documents in the version in force \
                                  (a write in progress?); delete the file to remove its documents, \
                                  or start the control plane with --allow-empty-policy"
                            .into(),
                    })
                    .collect(),
            };
            if errors.is_empty() {
                Decision::Publish(Box::new(set))
            } else if refused == Some(errors.as_slice()) {
                Decision::StillRefused
            } else {
                Decision::RefuseEmpty(errors)
            }
        }
        Err(errors) if refused == Some(errors.as_slice()) => Decision::StillRefused,
        Err(errors) => Decision::Refuse(errors),
    }
}

/// Why `set` must not be published without the operator's say-so, if it
/// must not: it holds no document at all, or it drops every `ModelRoute`
/// of the set in force without being an explicit empty mesh (a
/// `MeshConfig` with no `Backend`, `LocalModel` or `ModelRoute` beside it).
pub fn emptiness(
    current: Option<&PolicySet>,
    set: &PolicySet,
    allow_empty: bool,
) -> Option<String> {
    const HOW: &str = "to publish it, start the control plane with --allow-empty-policy, \
                       or leave a file holding only a MeshConfig document";
    if allow_empty {
        return None;
    }
    let documents = set.backends.len()
        + set.local_models.len()
        + set.routes.len()
        + set.authorizations.len()
        + usize::from(set.mesh.is_some());
    if documents == 0 {
        return Some(format!(
            "refused an empty policy set: no policy documents (every file is empty or gone, \
             or a write is in progress); {HOW}"
        ));
    }
    let explicit = set.mesh.is_some() && set.backends.is_empty() && set.local_models.is_empty();
    let had_routes = current.is_some_and(|c| !c.routes.is_empty());
    if had_routes && set.routes.is_empty() && !explicit {
        let n = current.map_or(0, |c| c.routes.len());
        return Some(format!(
            "refused a policy set without routes: it would drop all {n} ModelRoute documents \
             in force (a file emptied or deleted, or a write in progress?); {HOW}"
        ));
    }
    None
}

/// The state of the policy files, as `/policy` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// `waiting` (no valid policy yet), `serving` (the files are what is
    /// published) or `refused` (the files are invalid; an older snapshot,
    /// or none, is in force).
    pub state: &'static str,
    /// The policy directory.
    pub path: PathBuf,
    /// Version in force.
    pub version: Option<u64>,
    /// When it was published.
    pub published_at: Option<String>,
    /// What it holds.
    pub documents: Option<Documents>,
    /// The latest refused change, kept after a later valid one.
    pub last_refusal: Option<Refused>,
    /// Each `Backend.service` of the set in force and what it resolved to
    /// (with `--kubernetes`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceStatus>,
}

/// Document counts of a snapshot.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Documents {
    /// `Backend` documents.
    pub backends: usize,
    /// `LocalModel` documents.
    pub local_models: usize,
    /// `ModelRoute` documents.
    pub routes: usize,
    /// Whether there is a `MeshConfig`.
    pub mesh_config: bool,
}

/// A refused change.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Refused {
    /// When it was refused.
    pub at: String,
    /// `invalid` (the files do not validate) or `empty` (valid, but they
    /// route nothing and nobody said that is meant).
    pub reason: &'static str,
    /// Every problem, as `validate --output json` prints them.
    pub errors: Vec<ErrorJson>,
    #[serde(skip)]
    raw: Vec<PolicyError>,
}

/// One problem in a policy file.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorJson {
    /// The file.
    pub file: String,
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

/// Publishes snapshots into the watch channel every stream reads.
#[derive(Debug)]
pub struct Publisher {
    path: PathBuf,
    sender: watch::Sender<Option<Arc<Published>>>,
    status: Mutex<PolicyStatus>,
    metrics: Arc<Metrics>,
    allow_empty: bool,
    /// Policy files that held documents when the set in force was loaded.
    populated: Mutex<BTreeSet<PathBuf>>,
    /// The Services and EndpointSlices, with `--kubernetes`.
    services: std::sync::OnceLock<ServiceView>,
    /// The set in force as loaded, before its service references were
    /// resolved: what a change of the Services resolves again.
    raw: Mutex<Option<PolicySet>>,
}

/// What a loaded set became once its service references were resolved.
enum Resolved {
    /// Resolved (or nothing to resolve).
    Set(Box<PolicySet>, Vec<ServiceStatus>),
    /// References, and the Services not listed yet.
    NotYet,
    /// References, and no cluster to resolve them in.
    Refused(Vec<PolicyError>),
}

impl Publisher {
    /// A publisher for the policies under `path`, with nothing published;
    /// with `allow_empty`, a set that routes nothing is published too.
    pub fn new(path: PathBuf, metrics: Arc<Metrics>, allow_empty: bool) -> Arc<Self> {
        let (sender, _) = watch::channel(None);
        Arc::new(Self {
            status: Mutex::new(PolicyStatus {
                state: "waiting",
                path: path.clone(),
                version: None,
                published_at: None,
                documents: None,
                last_refusal: None,
                services: Vec::new(),
            }),
            path,
            sender,
            metrics,
            allow_empty,
            populated: Mutex::new(BTreeSet::new()),
            services: std::sync::OnceLock::new(),
            raw: Mutex::new(None),
        })
    }

    /// Resolves `Backend.service` references in `view` from now on; without
    /// it a set with references is refused.
    pub fn resolve_services_in(&self, view: ServiceView) {
        let _ = self.services.set(view);
    }

    /// `raw` with its service references resolved.
    fn resolve(&self, raw: &PolicySet) -> Resolved {
        if !services::has_references(raw) {
            return Resolved::Set(Box::new(raw.clone()), Vec::new());
        }
        match self.services.get() {
            Some(view) if view.ready() => {
                let (set, statuses) = view.resolve_set(raw);
                Resolved::Set(Box::new(set), statuses)
            }
            Some(_) => Resolved::NotYet,
            None => Resolved::Refused(
                raw.backends
                    .iter()
                    .filter_map(|b| b.spec.service.as_ref().map(|s| (b, s)))
                    .map(|(backend, service)| PolicyError {
                        file: self.path.clone(),
                        line: 0,
                        column: 0,
                        message: format!(
                            "Backend `{}` names the Kubernetes Service `{}`: only a control plane \
                             started with --kubernetes can resolve it into endpoints; start it \
                             with --kubernetes, or list the backend's `endpoints`",
                            backend.metadata.name, service.name
                        ),
                    })
                    .collect(),
            ),
        }
    }

    /// Resolves the set in force again, after the Services or
    /// EndpointSlices changed, and publishes it when that changed it.
    pub fn services_changed(&self) {
        let raw = self.raw.lock().clone();
        if let Some(raw) = raw {
            self.offer_inner(Ok(raw), None, true);
        }
    }

    /// A receiver of the current snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Published>>> {
        self.sender.subscribe()
    }

    /// What `/policy` shows.
    pub fn status(&self) -> PolicyStatus {
        self.status.lock().clone()
    }

    /// Whether a valid snapshot is published.
    pub fn ready(&self) -> bool {
        self.sender.borrow().is_some()
    }

    /// Loads the whole directory (blocking file I/O, off the runtime) and
    /// publishes it when valid and changed.
    pub async fn reload(&self) {
        let path = self.path.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let files = scan(&path);
            (policy::load_path(&path), Some(files))
        })
        .await
        .unwrap_or_else(|error| {
            let error = PolicyError {
                file: self.path.clone(),
                line: 1,
                column: 1,
                message: format!("loading failed: {error}"),
            };
            (Err(vec![error]), None)
        });
        self.offer_scanned(loaded.0, loaded.1);
    }

    /// Acts on a set loaded from somewhere other than the files (the
    /// cluster's policy resources), without the emptied-file check; the
    /// decision tests drive it too.
    pub fn offer(&self, loaded: Result<PolicySet, Vec<PolicyError>>) {
        self.offer_scanned(loaded, None);
    }

    /// Acts on a loaded set: publishes it, or refuses it and says why.
    /// `files` are the policy files and whether each holds anything but
    /// blank lines and comments, when they were read.
    fn offer_scanned(
        &self,
        loaded: Result<PolicySet, Vec<PolicyError>>,
        files: Option<Vec<(PathBuf, bool)>>,
    ) {
        self.offer_inner(loaded, files, false);
    }

    /// Resolves a loaded set and acts on the result; `again` when it is the
    /// set in force resolved again after a Service change (the state of the
    /// files, a refusal in particular, stays as it is).
    fn offer_inner(
        &self,
        loaded: Result<PolicySet, Vec<PolicyError>>,
        files: Option<Vec<(PathBuf, bool)>>,
        again: bool,
    ) {
        let (loaded, raw, statuses) = match loaded {
            Ok(raw) => match self.resolve(&raw) {
                Resolved::Set(set, statuses) => (Ok(*set), Some(raw), statuses),
                Resolved::NotYet => {
                    tracing::info!(
                        "the policy names Kubernetes Services; publishing once the Services and \
                         EndpointSlices are listed"
                    );
                    *self.raw.lock() = Some(raw);
                    return;
                }
                Resolved::Refused(errors) => (Err(errors), None, Vec::new()),
            },
            Err(errors) => (Err(errors), None, Vec::new()),
        };
        let current = self.sender.borrow().clone();
        let mut status = self.status.lock();
        let mut populated = self.populated.lock();
        let emptied: Vec<PathBuf> = files
            .iter()
            .flatten()
            .filter(|(file, filled)| !filled && populated.contains(file))
            .map(|(file, _)| file.clone())
            .collect();
        let accepted = || {
            files.as_ref().map(|files| {
                files
                    .iter()
                    .filter(|(_, filled)| *filled)
                    .map(|(file, _)| file.clone())
                    .collect::<BTreeSet<_>>()
            })
        };
        let refused = match status.state {
            "serving" => None,
            _ => status.last_refusal.as_ref().map(|r| r.raw.as_slice()),
        };
        match decide(
            current.as_ref().map(|p| &p.set),
            refused,
            loaded,
            &self.path,
            self.allow_empty,
            &emptied,
        ) {
            Decision::Publish(set) => {
                if let Some(files) = accepted() {
                    *populated = files;
                }
                *self.raw.lock() = raw;
                self.note_services(&mut status, statuses);
                let version = current.as_ref().map_or_else(
                    || first_version(SystemTime::now()),
                    |p| p.version.saturating_add(1),
                );
                let published = Arc::new(Published::new(version, *set));
                let documents = Documents {
                    backends: published.set.backends.len(),
                    local_models: published.set.local_models.len(),
                    routes: published.set.routes.len(),
                    mesh_config: published.set.mesh.is_some(),
                };
                tracing::info!(
                    version,
                    backends = documents.backends,
                    local_models = documents.local_models,
                    routes = documents.routes,
                    mesh_config = documents.mesh_config,
                    "published a policy snapshot"
                );
                if !again || status.state == "waiting" {
                    status.state = "serving";
                    self.metrics.policy_refused.set(0);
                }
                status.version = Some(version);
                status.published_at = Some(rfc3339(published.at));
                status.documents = Some(documents);
                self.metrics.snapshot_version.set(gauge(version));
                self.metrics.publishes.inc();
                self.sender.send_replace(Some(published));
            }
            // The same endpoints; a reason may still have changed (a
            // Service gone where its port was missing before).
            Decision::Unchanged if again => self.note_services(&mut status, statuses),
            Decision::Unchanged => {
                if let Some(files) = accepted() {
                    *populated = files;
                }
                *self.raw.lock() = raw;
                self.note_services(&mut status, statuses);
                if status.state != "serving" {
                    tracing::info!(
                        version = status.version,
                        "the policy files are valid again and equal to the snapshot in force"
                    );
                }
                status.state = "serving";
                self.metrics.policy_refused.set(0);
            }
            Decision::RefuseEmpty(errors) => {
                for error in &errors {
                    // Line 0: about the whole set, not a place in a file.
                    let what = if error.line == 0 {
                        error.message.clone()
                    } else {
                        error.to_string()
                    };
                    match status.version {
                        Some(version) => tracing::warn!(
                            version,
                            path = %self.path.display(),
                            "{what}; the snapshot in force stays"
                        ),
                        None => tracing::warn!(
                            path = %self.path.display(),
                            "{what}; serving nothing until there is a policy"
                        ),
                    }
                }
                self.metrics.empty_refusals.inc();
                self.refuse(&mut status, "empty", errors);
            }
            Decision::Refuse(errors) => {
                match status.version {
                    Some(version) => tracing::warn!(
                        problems = errors.len(),
                        version,
                        "refused a policy change; the snapshot in force stays"
                    ),
                    None => tracing::warn!(
                        problems = errors.len(),
                        "the policy files are invalid; serving nothing until they are valid"
                    ),
                }
                for error in &errors {
                    tracing::warn!("{error}");
                }
                self.refuse(&mut status, "invalid", errors);
            }
            Decision::StillRefused => {}
        }
    }

    /// Records how the service references resolved, and logs the ones
    /// whose resolution changed.
    fn note_services(&self, status: &mut PolicyStatus, statuses: Vec<ServiceStatus>) {
        for now in &statuses {
            let before = status
                .services
                .iter()
                .find(|s| s.backend == now.backend && s.backend_namespace == now.backend_namespace);
            if before.map(|b| (&b.endpoints, &b.problem)) == Some((&now.endpoints, &now.problem)) {
                continue;
            }
            match &now.problem {
                Some(problem) => tracing::warn!(
                    backend = %now.backend,
                    service = %now.service,
                    "{problem}; the backend has no endpoint and its requests get 503"
                ),
                None => tracing::info!(
                    backend = %now.backend,
                    service = %now.service,
                    endpoints = ?now.endpoints,
                    addresses = ?now.addresses,
                    "resolved the backend's Service"
                ),
            }
        }
        let empty = statuses.iter().filter(|s| s.endpoints.is_empty()).count();
        self.metrics
            .unresolved_services
            .set(i64::try_from(empty).unwrap_or(i64::MAX));
        status.services = statuses;
    }

    /// Records a refusal in the status and the metrics.
    fn refuse(&self, status: &mut PolicyStatus, reason: &'static str, errors: Vec<PolicyError>) {
        status.state = if status.version.is_some() {
            "refused"
        } else {
            "waiting"
        };
        status.last_refusal = Some(Refused {
            at: rfc3339(SystemTime::now()),
            reason,
            errors: errors
                .iter()
                .map(|e| ErrorJson {
                    file: e.file.display().to_string(),
                    line: e.line,
                    column: e.column,
                    message: e.message.clone(),
                })
                .collect(),
            raw: errors,
        });
        self.metrics.refused_changes.inc();
        self.metrics.policy_refused.set(1);
    }
}

fn gauge(version: u64) -> i64 {
    i64::try_from(version).unwrap_or(i64::MAX)
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

// === watching ===

/// Watches the directory until `shutdown`, reloading after each change.
pub async fn watch(publisher: Arc<Publisher>, mut shutdown: watch::Receiver<bool>) {
    let dir = publisher.path.clone();
    let (events_tx, mut events) = mpsc::unbounded_channel::<()>();
    let mut watcher = arm(&dir, &events_tx);
    if watcher.is_none() {
        tracing::warn!(
            path = %dir.display(),
            "cannot watch the policy directory yet; checking it every {}s",
            RESCAN.as_secs()
        );
    }
    let mut seen = fingerprint(&dir).await;
    publisher.reload().await;
    let mut rescan = tokio::time::interval(RESCAN);
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    rescan.reset();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            Some(()) = events.recv() => {
                let first = Instant::now();
                let mut last = first;
                loop {
                    let deadline = (last + QUIET).min(first + MAX_DELAY);
                    tokio::select! {
                        Some(()) = events.recv() => last = Instant::now(),
                        _ = tokio::time::sleep_until(deadline) => break,
                    }
                }
                seen = fingerprint(&dir).await;
                publisher.reload().await;
            }
            _ = rescan.tick() => {
                let now = fingerprint(&dir).await;
                if now != seen {
                    // A change inotify did not report: the watch may be
                    // gone (directory replaced); arm a new one.
                    tracing::debug!(path = %dir.display(), "re-scan found a change");
                    watcher = None;
                    // Let the change settle as the event path does: a re-scan
                    // that lands between an in-place edit's truncate and its
                    // write would otherwise publish a half-written file.
                    let first = Instant::now();
                    let mut settled = now;
                    loop {
                        tokio::time::sleep(QUIET).await;
                        let again = fingerprint(&dir).await;
                        if again == settled || first.elapsed() >= MAX_DELAY {
                            settled = again;
                            break;
                        }
                        settled = again;
                    }
                    seen = settled;
                    publisher.reload().await;
                }
                if watcher.is_none() {
                    watcher = arm(&dir, &events_tx);
                }
            }
        }
    }
}

/// Resolves the policy in force again after each change of the Services
/// and EndpointSlices, until `shutdown`. Changes are debounced: resolved
/// once they have been quiet for [`SERVICES_QUIET`], at the latest
/// [`SERVICES_MAX_DELAY`] after the first.
pub async fn follow_services(
    publisher: Arc<Publisher>,
    mut changes: watch::Receiver<u64>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                let first = Instant::now();
                loop {
                    let deadline = (Instant::now() + SERVICES_QUIET).min(first + SERVICES_MAX_DELAY);
                    tokio::select! {
                        Ok(()) = changes.changed() => {}
                        _ = tokio::time::sleep_until(deadline) => break,
                    }
                }
                changes.borrow_and_update();
                publisher.services_changed();
            }
        }
    }
}

/// Starts an inotify watch over `dir` and everything under it; for a single
/// policy file, over the directory holding it, since an editor that saves by
/// renaming replaces the file (and a watch on it would be lost).
fn arm(dir: &Path, events: &mpsc::UnboundedSender<()>) -> Option<RecommendedWatcher> {
    let events = events.clone();
    let handler = move |event: notify::Result<notify::Event>| {
        let relevant = match event {
            // Reading the files (our own loads included) is no change.
            Ok(event) => !matches!(
                event.kind,
                EventKind::Access(_) | EventKind::Modify(ModifyKind::Metadata(_))
            ),
            // A lost event (queue overflow) may hide a change.
            Err(_) => true,
        };
        if relevant {
            let _ = events.send(());
        }
    };
    let mut watcher = notify::recommended_watcher(handler).ok()?;
    let (target, mode) = match dir.parent() {
        Some(parent) if dir.is_file() => {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            (parent, RecursiveMode::NonRecursive)
        }
        _ => (dir, RecursiveMode::Recursive),
    };
    watcher.watch(target, mode).ok()?;
    Some(watcher)
}

/// Every file the loader would read, and whether it holds more than blank
/// lines, comments and document markers (a file mid-write is blank).
fn scan(dir: &Path) -> Vec<(PathBuf, bool)> {
    let mut found = Vec::new();
    walk(dir, &mut found, &mut HashSet::new());
    found
        .into_iter()
        .map(|(file, ..)| {
            let filled = std::fs::read(&file).map_or(true, |bytes| has_content(&bytes));
            (file, filled)
        })
        .collect()
}

/// Whether a policy file's text holds anything a document could be made of.
fn has_content(bytes: &[u8]) -> bool {
    String::from_utf8_lossy(bytes).lines().any(|line| {
        let line = line.trim();
        !(line.is_empty() || line.starts_with('#') || line == "---" || line == "...")
    })
}

/// Size, modification time and inode of every file the loader would read,
/// to tell whether anything changed since the last load.
async fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, i64, i64, u64)> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let mut visited = HashSet::new();
        walk(&dir, &mut out, &mut visited);
        out.sort();
        out
    })
    .await
    .unwrap_or_default()
}

fn walk(path: &Path, out: &mut Vec<(PathBuf, u64, i64, i64, u64)>, visited: &mut HashSet<PathBuf>) {
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    if meta.is_dir() {
        let canonical = path.canonicalize().unwrap_or_else(|_| path.to_owned());
        if !visited.insert(canonical) {
            return;
        }
        let Ok(entries) = std::fs::read_dir(path) else {
            return;
        };
        for entry in entries.flatten() {
            if !entry.file_name().to_string_lossy().starts_with('.') {
                walk(&entry.path(), out, visited);
            }
        }
    } else if path
        .extension()
        .is_some_and(|ext| ext == "yaml" || ext == "yml")
    {
        out.push((
            path.to_owned(),
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ino(),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(text: &str) -> PolicySet {
        policy::load_str(Path::new("p.yaml"), text).unwrap()
    }

    fn errors(text: &str) -> Vec<PolicyError> {
        policy::load_str(Path::new("p.yaml"), text).unwrap_err()
    }

    const VALID: &str = "apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {name: a}\nspec: {endpoints: [\"a:1\"]}\n";
    const INVALID: &str = "apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {name: a}\nspec: {endpoint: [\"a:1\"]}\n";

    #[test]
    fn a_valid_set_is_published_unless_it_equals_the_one_in_force() {
        assert!(matches!(
            decide(None, None, Ok(set(VALID)), Path::new("p"), false, &[]),
            Decision::Publish(_)
        ));
        let current = set(VALID);
        assert!(matches!(
            decide(
                Some(&current),
                None,
                Ok(set(&format!("# a comment\n{VALID}"))),
                Path::new("p"),
                false,
                &[]
            ),
            Decision::Unchanged
        ));
        let changed = set(&VALID.replace("a:1", "a:2"));
        assert!(matches!(
            decide(
                Some(&current),
                None,
                Ok(changed),
                Path::new("p"),
                false,
                &[]
            ),
            Decision::Publish(_)
        ));
    }

    const ROUTED: &str = "apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {name: a}\nspec: {endpoints: [\"a:1\"]}\n---\napiVersion: infermesh.io/v1alpha1\nkind: ModelRoute\nmetadata: {name: r}\nspec: {backends: [{backend: a}]}\n";
    const MESH_ONLY: &str =
        "apiVersion: infermesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {}\n";

    #[test]
    fn a_set_that_routes_nothing_is_refused_unless_asked_for() {
        let routed = set(ROUTED);
        let empty = PolicySet::default();
        let backends_only = set(VALID);
        let mesh_only = set(MESH_ONLY);
        // Every file empty or gone: refused, whatever was in force before.
        for current in [None, Some(&routed), Some(&backends_only)] {
            let why = emptiness(current, &empty, false).unwrap();
            assert!(why.contains("no policy documents"), "{why}");
            assert!(why.contains("--allow-empty-policy"), "{why}");
        }
        // The routes file emptied, the backends left: every route dropped.
        let why = emptiness(Some(&routed), &backends_only, false).unwrap();
        assert!(why.contains("drop all 1 ModelRoute"), "{why}");
        // Said so: the flag, or a set of nothing but a MeshConfig.
        assert_eq!(emptiness(Some(&routed), &empty, true), None);
        assert_eq!(emptiness(Some(&routed), &backends_only, true), None);
        assert_eq!(emptiness(Some(&routed), &mesh_only, false), None);
        // Nothing routed before, or routes still there: no question.
        assert_eq!(emptiness(Some(&backends_only), &backends_only, false), None);
        assert_eq!(emptiness(None, &backends_only, false), None);
        assert_eq!(emptiness(Some(&backends_only), &routed, false), None);
    }

    #[test]
    fn an_empty_set_is_refused_once_and_the_snapshot_in_force_stays() {
        let routed = set(ROUTED);
        let dir = Path::new("/etc/policies");
        let Decision::RefuseEmpty(errors) = decide(
            Some(&routed),
            None,
            Ok(PolicySet::default()),
            dir,
            false,
            &[],
        ) else {
            panic!("an empty set was not refused");
        };
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].file, dir);
        assert!(matches!(
            decide(
                Some(&routed),
                Some(&errors),
                Ok(PolicySet::default()),
                dir,
                false,
                &[]
            ),
            Decision::StillRefused
        ));
        assert!(matches!(
            decide(
                Some(&routed),
                None,
                Ok(PolicySet::default()),
                dir,
                true,
                &[]
            ),
            Decision::Publish(_)
        ));
    }

    #[test]
    fn the_publisher_reports_and_counts_an_empty_set_it_refuses() {
        let metrics = Arc::new(Metrics::new());
        let publisher = Publisher::new(PathBuf::from("p"), metrics.clone(), false);
        let current = publisher.subscribe();
        publisher.offer(Ok(set(ROUTED)));
        let first = current.borrow().as_ref().map(|p| p.version).unwrap();
        publisher.offer(Ok(PolicySet::default()));
        publisher.offer(Ok(PolicySet::default()));
        let status = publisher.status();
        assert_eq!(status.state, "refused");
        assert_eq!(status.version, Some(first));
        let refusal = status.last_refusal.unwrap();
        assert_eq!(refusal.reason, "empty");
        assert!(refusal.errors[0].message.contains("no policy documents"));
        assert_eq!(metrics.empty_refusals.get(), 1, "once per change");
        assert_eq!(metrics.policy_refused.get(), 1);
        assert_eq!(current.borrow().as_ref().map(|p| p.version), Some(first));
        // Written back as it was: serving again, same version.
        publisher.offer(Ok(set(ROUTED)));
        assert_eq!(publisher.status().state, "serving");
        assert_eq!(metrics.policy_refused.get(), 0);
        assert_eq!(current.borrow().as_ref().map(|p| p.version), Some(first));

        // With the opt-in the empty set is published.
        let publisher = Publisher::new(PathBuf::from("p"), Arc::new(Metrics::new()), true);
        publisher.offer(Ok(set(ROUTED)));
        publisher.offer(Ok(PolicySet::default()));
        assert_eq!(publisher.status().state, "serving");
        assert_eq!(publisher.status().documents.unwrap().routes, 0);
    }

    #[test]
    fn a_file_with_only_blank_lines_comments_and_markers_has_no_content() {
        for blank in ["", "\n\n", "# routes\n---\n  \n...\n"] {
            assert!(!has_content(blank.as_bytes()), "{blank:?}");
        }
        assert!(has_content(VALID.as_bytes()));
        assert!(has_content(b"# x\nkind: Backend"));
    }

    fn route_file(name: &str) -> String {
        format!(
            "apiVersion: infermesh.io/v1alpha1\nkind: ModelRoute\nmetadata: {{name: {name}}}\n\
             spec: {{match: [{{model: {{exact: {name}}}}}], backends: [{{backend: a}}]}}\n"
        )
    }

    #[tokio::test]
    async fn a_file_emptied_in_place_is_refused_and_a_deleted_one_is_published() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("backends.yaml", VALID);
        write("a.yaml", &route_file("ra"));
        write("b.yaml", &route_file("rb"));
        let metrics = Arc::new(Metrics::new());
        let publisher = Publisher::new(dir.path().to_owned(), metrics.clone(), false);
        let current = publisher.subscribe();
        publisher.reload().await;
        let first = current.borrow().as_ref().map(|p| p.version).unwrap();

        // Truncated, the writer not done yet: the routes of a.yaml stay.
        write("b.yaml", "");
        publisher.reload().await;
        let status = publisher.status();
        assert_eq!(status.state, "refused");
        let refusal = status.last_refusal.unwrap();
        assert_eq!(refusal.reason, "empty");
        assert!(refusal.errors[0].file.ends_with("b.yaml"), "{refusal:?}");
        assert!(refusal.errors[0].message.contains("delete the file"));
        assert_eq!(metrics.empty_refusals.get(), 1);
        assert_eq!(current.borrow().as_ref().map(|p| p.version), Some(first));

        // Written: the same set, nothing to publish.
        write("b.yaml", &route_file("rb"));
        publisher.reload().await;
        assert_eq!(publisher.status().state, "serving");
        assert_eq!(current.borrow().as_ref().map(|p| p.version), Some(first));

        // Deleted: its route goes, as asked.
        std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
        publisher.reload().await;
        let published = current.borrow().clone().unwrap();
        assert_eq!(published.version, first + 1);
        assert_eq!(published.set.routes.len(), 1);

        // A file that was blank all along is no refusal.
        write("c.yaml", "# to do\n");
        publisher.reload().await;
        assert_eq!(publisher.status().state, "serving");
        assert_eq!(metrics.empty_refusals.get(), 1);
    }

    #[tokio::test]
    async fn with_the_opt_in_an_emptied_file_is_published() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("backends.yaml", VALID);
        write("a.yaml", &route_file("ra"));
        write("b.yaml", &route_file("rb"));
        let publisher = Publisher::new(dir.path().to_owned(), Arc::new(Metrics::new()), true);
        publisher.reload().await;
        write("b.yaml", "");
        publisher.reload().await;
        assert_eq!(publisher.status().state, "serving");
        assert_eq!(publisher.status().documents.unwrap().routes, 1);
    }

    #[test]
    fn an_invalid_set_is_refused_once_per_distinct_set_of_errors() {
        let current = set(VALID);
        let first = errors(INVALID);
        assert!(matches!(
            decide(
                Some(&current),
                None,
                Err(first.clone()),
                Path::new("p"),
                false,
                &[]
            ),
            Decision::Refuse(_)
        ));
        assert!(matches!(
            decide(
                Some(&current),
                Some(&first),
                Err(first.clone()),
                Path::new("p"),
                false,
                &[]
            ),
            Decision::StillRefused
        ));
        let other = errors(&INVALID.replace("name: a", "name: A"));
        assert!(matches!(
            decide(
                Some(&current),
                Some(&first),
                Err(other),
                Path::new("p"),
                false,
                &[]
            ),
            Decision::Refuse(_)
        ));
    }

    #[test]
    fn the_publisher_counts_versions_up_and_keeps_the_last_good_snapshot() {
        let metrics = Arc::new(Metrics::new());
        let publisher = Publisher::new(PathBuf::from("p"), metrics.clone(), false);
        let current = publisher.subscribe();
        assert!(!publisher.ready());

        publisher.offer(Err(errors(INVALID)));
        assert_eq!(publisher.status().state, "waiting");
        assert!(current.borrow().is_none());

        publisher.offer(Ok(set(VALID)));
        let first = current.borrow().as_ref().map(|p| p.version).unwrap();
        assert!(first > 1_600_000_000_000, "seeded by the clock: {first}");
        assert_eq!(publisher.status().state, "serving");

        publisher.offer(Err(errors(INVALID)));
        let status = publisher.status();
        assert_eq!(status.state, "refused");
        assert_eq!(status.version, Some(first));
        let refusal = status.last_refusal.unwrap();
        assert_eq!(refusal.errors.len(), 1);
        assert_eq!(refusal.errors[0].line, 4);
        assert!(refusal.errors[0]
            .message
            .contains("did you mean `endpoints`"));
        assert_eq!(current.borrow().as_ref().map(|p| p.version), Some(first));

        // The same broken files again are not a second refusal.
        publisher.offer(Err(errors(INVALID)));
        assert_eq!(metrics.refused_changes.get(), 2);
        assert_eq!(metrics.policy_refused.get(), 1);

        publisher.offer(Ok(set(&VALID.replace("a:1", "a:2"))));
        assert_eq!(
            current.borrow().as_ref().map(|p| p.version),
            Some(first + 1)
        );
        assert_eq!(metrics.publishes.get(), 2);
        assert_eq!(metrics.policy_refused.get(), 0);
        let status = publisher.status();
        assert_eq!(status.state, "serving");
        assert!(status.last_refusal.is_some(), "kept for the record");
    }

    const SERVICE_BACKEND: &str = "apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {name: chat, namespace: ml}\nspec: {service: {name: chat, port: http}, addresses: [\"10.1.0.1:80\"]}\n---\napiVersion: infermesh.io/v1alpha1\nkind: ModelRoute\nmetadata: {name: r}\nspec: {backends: [{backend: chat}]}\n";

    fn chat_service() -> k8s_openapi::api::core::v1::Service {
        crate::kubernetes::services::tests::service(
            serde_json::json!([{"name": "http", "port": 80, "targetPort": 8000}]),
            &["10.96.0.10"],
        )
    }

    fn chat_slice(ips: &[&str]) -> k8s_openapi::api::discovery::v1::EndpointSlice {
        let endpoints: Vec<serde_json::Value> = ips
            .iter()
            .map(|ip| serde_json::json!({"addresses": [ip]}))
            .collect();
        crate::kubernetes::services::tests::slice(
            "chat-1",
            "IPv4",
            serde_json::json!([{"name": "http", "port": 8000}]),
            serde_json::json!(endpoints),
        )
    }

    #[test]
    fn without_a_cluster_a_service_reference_is_refused() {
        let publisher = Publisher::new(PathBuf::from("p"), Arc::new(Metrics::new()), false);
        publisher.offer(Ok(set(SERVICE_BACKEND)));
        let status = publisher.status();
        assert_eq!(status.state, "waiting");
        let refusal = status.last_refusal.unwrap();
        assert_eq!(refusal.reason, "invalid");
        assert!(
            refusal.errors[0].message.contains("--kubernetes"),
            "{refusal:?}"
        );
        assert!(!publisher.ready());
    }

    #[test]
    fn service_references_are_published_resolved_and_follow_the_slices() {
        use kube::runtime::watcher::Event;
        let metrics = Arc::new(Metrics::new());
        let publisher = Publisher::new(PathBuf::from("p"), metrics.clone(), false);
        let (view, _, mut slices) = ServiceView::fixed(
            vec![chat_service()],
            vec![chat_slice(&["10.0.0.2", "10.0.0.1"])],
        );
        publisher.resolve_services_in(view);
        let current = publisher.subscribe();
        publisher.offer(Ok(set(SERVICE_BACKEND)));
        let first = current.borrow().clone().unwrap();
        let backend = &first.set.backends[0].spec;
        assert_eq!(backend.endpoints, ["10.0.0.1:8000", "10.0.0.2:8000"]);
        assert_eq!(backend.addresses, ["10.1.0.1:80", "10.96.0.10:80"]);
        assert_eq!(
            backend.service, None,
            "proxies get endpoints, not the reference"
        );
        let status = publisher.status();
        assert_eq!(status.services[0].service, "ml/chat");
        assert_eq!(metrics.unresolved_services.get(), 0);

        // Nothing changed: no new version.
        publisher.services_changed();
        assert_eq!(
            current.borrow().as_ref().map(|p| p.version),
            Some(first.version)
        );

        // The files go bad: refused; the slices still move the endpoints,
        // and the state still says the files are refused.
        publisher.offer(Err(errors(INVALID)));
        slices.apply_watcher_event(&Event::Apply(chat_slice(&["10.0.0.3"])));
        publisher.services_changed();
        let second = current.borrow().clone().unwrap();
        assert_eq!(second.version, first.version + 1);
        assert_eq!(second.set.backends[0].spec.endpoints, ["10.0.0.3:8000"]);
        assert_eq!(publisher.status().state, "refused");
        assert_eq!(metrics.policy_refused.get(), 1);

        // No endpoint left: published empty, counted, said why.
        slices.apply_watcher_event(&Event::Apply(chat_slice(&[])));
        publisher.services_changed();
        let third = current.borrow().clone().unwrap();
        assert!(third.set.backends[0].spec.endpoints.is_empty());
        assert_eq!(metrics.unresolved_services.get(), 1);
        let problem = publisher.status().services[0].problem.clone().unwrap();
        assert!(problem.contains("no ready endpoint"), "{problem}");
    }
}
