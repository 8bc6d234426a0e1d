//! A published policy set, and its scoped wire form for each kind of proxy.
//!
//! One `Published` value is shared by every stream through a
//! `tokio::sync::watch` channel. What a proxy receives depends only on its
//! namespace and on those of its labels that some selector of the set reads,
//! so the scoped resources are computed once per such key and shared by the
//! thousands of streams that have it.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::SystemTime;

use infermesh_proto::policy::{PolicySet, Workload};
use infermesh_proto::policy_api::Resource;
use parking_lot::Mutex;

/// A valid policy set at one version.
#[derive(Debug)]
pub struct Published {
    /// Higher for every later publication, across restarts too (see
    /// [`first_version`]).
    pub version: u64,
    /// The whole set, as loaded.
    pub set: PolicySet,
    /// When it was published.
    pub at: SystemTime,
    /// Label keys that some selector of the set reads.
    selector_keys: BTreeSet<String>,
    /// Scoped resources per [`Published::key`].
    scoped: Mutex<HashMap<Workload, Arc<Scoped>>>,
}

/// The resources one kind of proxy receives at one version.
#[derive(Debug, PartialEq, Eq)]
pub struct Scoped {
    /// Wire resources: backends, then routes in order, then the MeshConfig.
    pub resources: Vec<Resource>,
    /// A hash of `resources`, to tell most changes apart without comparing.
    digest: u64,
}

impl Scoped {
    fn new(resources: Vec<Resource>) -> Self {
        let mut hasher = DefaultHasher::new();
        for r in &resources {
            (&r.kind, &r.name, &r.namespace, &r.json).hash(&mut hasher);
        }
        Self {
            resources,
            digest: hasher.finish(),
        }
    }

    /// Whether `other` holds the same resources (a proxy holding one needs
    /// no push of the other).
    pub fn same_content(self: &Arc<Self>, other: &Arc<Self>) -> bool {
        Arc::ptr_eq(self, other)
            || (self.digest == other.digest && self.resources == other.resources)
    }
}

impl Published {
    /// A snapshot of `set` at `version`.
    pub fn new(version: u64, set: PolicySet) -> Self {
        let selector_keys = set
            .routes
            .iter()
            .filter_map(|r| r.spec.workload_selector.as_ref())
            .chain(
                set.mesh
                    .iter()
                    .filter_map(|m| m.spec.workload_selector.as_ref()),
            )
            .flat_map(|s| s.match_labels.keys().cloned())
            .collect();
        Self {
            version,
            set,
            at: SystemTime::now(),
            selector_keys,
            scoped: Mutex::new(HashMap::new()),
        }
    }

    /// The resources `workload` receives, computed once per distinct key.
    pub fn scoped(&self, workload: &Workload) -> Arc<Scoped> {
        let key = self.key(workload);
        if let Some(scoped) = self.scoped.lock().get(&key) {
            return scoped.clone();
        }
        // Computed outside the lock; two streams racing on a new key both
        // compute it and one result is kept.
        let scoped = Arc::new(Scoped::new(self.set.scoped_to(&key).to_resources()));
        self.scoped.lock().entry(key).or_insert(scoped).clone()
    }

    /// The part of a workload that scoping reads: its namespace and the
    /// labels some selector names. Pod-specific labels drop out, so the
    /// cache holds one entry per kind of workload, not per pod.
    fn key(&self, workload: &Workload) -> Workload {
        let labels: BTreeMap<String, String> = workload
            .labels
            .iter()
            .filter(|(k, _)| self.selector_keys.contains(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Workload {
            namespace: workload.namespace.clone(),
            labels,
        }
    }
}

/// The version of the first snapshot a control plane publishes: the time in
/// milliseconds since the Unix epoch. Each later one adds 1, and a restarted
/// control plane starts above every version the previous process could have
/// reached (it publishes far less than once per millisecond), so a proxy
/// never sees the version go backwards.
pub fn first_version(now: SystemTime) -> u64 {
    now.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(1)
        .max(1)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use infermesh_proto::policy::load_str;

    const POLICY: &str = "
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {name: a}
spec: {endpoints: [\"a:1\"]}
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: canary}
spec:
  match: [{model: {exact: x}}]
  backends: [{backend: a}]
  workloadSelector: {matchLabels: {track: canary}}
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: team-a, namespace: team-a}
spec: {backends: [{backend: a}]}
";

    fn workload(namespace: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            namespace: namespace.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn published() -> Published {
        Published::new(7, load_str(Path::new("p.yaml"), POLICY).unwrap())
    }

    #[test]
    fn proxies_that_differ_only_in_unread_labels_share_one_scoped_value() {
        let p = published();
        let one = p.scoped(&workload("team-a", &[("pod", "x-1"), ("track", "canary")]));
        let two = p.scoped(&workload("team-a", &[("pod", "x-2"), ("track", "canary")]));
        assert!(Arc::ptr_eq(&one, &two));
        assert_eq!(p.scoped.lock().len(), 1);
        let names: Vec<&str> = one.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "canary", "team-a"]);
    }

    #[test]
    fn scoped_values_follow_namespace_and_read_labels() {
        let p = published();
        let stable = p.scoped(&workload("team-b", &[("track", "stable")]));
        let names: Vec<&str> = stable.resources.iter().map(|r| r.name.as_str()).collect();
        assert!(names.is_empty(), "{names:?}");
        let canary = p.scoped(&workload("team-b", &[("track", "canary")]));
        assert!(!stable.same_content(&canary));
    }

    #[test]
    fn the_same_content_at_another_version_is_recognised() {
        let (a, b) = (published(), published());
        let w = workload("team-a", &[]);
        let (x, y) = (a.scoped(&w), b.scoped(&w));
        assert!(!Arc::ptr_eq(&x, &y));
        assert!(x.same_content(&y));
    }

    #[test]
    fn first_versions_grow_with_time() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(first_version(t), 1_700_000_000_123);
        assert!(first_version(t + Duration::from_millis(1)) > first_version(t));
        assert_eq!(first_version(SystemTime::UNIX_EPOCH), 1);
    }
}
