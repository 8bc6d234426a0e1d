//! The Pods proxies run in: their labels and service account, so that
//! `workloadSelector` scoping needs no `--workload-label` flags in a
//! cluster and a proxy cannot borrow another pod's labels.
//!
//! A proxy names its pod in its Hello (`proxy_id` is `POD_NAME`, the
//! namespace `POD_NAMESPACE`, both set by injection). The policy stream
//! looks the pod up here; when a stream's certificate names a service
//! account, the pod must run as that service account.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::Api;
use parking_lot::RwLock;
use tokio::sync::watch;

/// What the mesh takes from a Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `spec.serviceAccountName` (`default` when unset).
    pub service_account: String,
}

type Key = (String, String);

/// The cluster's pods, as far as the watch has seen them; cheap to clone.
#[derive(Debug, Clone)]
pub struct Pods {
    pods: Arc<RwLock<HashMap<Key, PodInfo>>>,
    /// Bumped on every change, for streams waiting on a pod.
    changes: watch::Receiver<u64>,
}

impl Pods {
    /// The pod `namespace/name`, if it is known.
    pub fn get(&self, namespace: &str, name: &str) -> Option<PodInfo> {
        self.pods
            .read()
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// A receiver that changes whenever any pod does.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }
}

fn info(pod: &Pod) -> Option<(Key, PodInfo)> {
    let namespace = pod.metadata.namespace.clone()?;
    let name = pod.metadata.name.clone()?;
    let service_account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_owned());
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    Some((
        (namespace, name),
        PodInfo {
            labels,
            service_account,
        },
    ))
}

/// Starts watching every pod of the cluster; the view fills as the watch
/// lists them, and the task ends with the runtime.
pub fn watch(client: kube::Client) -> Pods {
    let pods: Arc<RwLock<HashMap<Key, PodInfo>>> = Arc::default();
    let (tx, changes) = watch::channel(0u64);
    let view = Pods {
        pods: pods.clone(),
        changes,
    };
    tokio::spawn(async move {
        let api: Api<Pod> = Api::all(client);
        let mut events = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        // The listing in progress after an Init, swapped in at InitDone so
        // that a re-list never shows a half-filled view.
        let mut listing: Option<HashMap<Key, PodInfo>> = None;
        while let Some(event) = events.next().await {
            let changed = match event {
                Ok(watcher::Event::Init) => {
                    listing = Some(HashMap::new());
                    false
                }
                Ok(watcher::Event::InitApply(pod)) => {
                    if let (Some(listing), Some((key, info))) = (listing.as_mut(), info(&pod)) {
                        listing.insert(key, info);
                    }
                    false
                }
                Ok(watcher::Event::InitDone) => {
                    if let Some(listing) = listing.take() {
                        tracing::debug!(pods = listing.len(), "listed pods");
                        *pods.write() = listing;
                    }
                    true
                }
                Ok(watcher::Event::Apply(pod)) => match info(&pod) {
                    Some((key, info)) => pods.write().insert(key, info.clone()) != Some(info),
                    None => false,
                },
                Ok(watcher::Event::Delete(pod)) => match info(&pod) {
                    Some((key, _)) => pods.write().remove(&key).is_some(),
                    None => false,
                },
                Err(error) => {
                    tracing::warn!(%error, "watching pods failed; retrying");
                    false
                }
            };
            if changed {
                tx.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    });
    view
}
