//! `serve --kubernetes`: the control plane reads the cluster.
//!
//! One [`kube::Client`] is made at start from `--kubeconfig`, `KUBECONFIG`
//! or the pod's service account. From it:
//! - `policies`: the infermesh.io custom resources, validated like files,
//!   each object's verdict written to its `status` (when `--policies` is
//!   not given);
//! - `services`: Services and EndpointSlices, which resolve each
//!   `Backend.service` into endpoints and destination addresses;
//! - `pods`: the Pods proxies run in, for their labels and service account;
//! - `bundle`: the trust bundle ConfigMap in every namespace, which
//!   injected pods mount;
//! - `tokens`: TokenReviews of projected service-account tokens, for
//!   identity.
//!
//! Watches use kube-runtime's watcher (list, then watch from the list's
//! `resourceVersion`, bookmarks, re-list on `410 Gone`, back-off on
//! errors), so a dropped connection or a compacted history costs a re-list,
//! never a stale view.

pub mod bundle;
pub mod pods;
pub mod policies;
pub mod services;

use std::path::PathBuf;

pub mod tokens;

/// How to reach the API server.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// A kubeconfig file; `None` infers (`KUBECONFIG`, then in-cluster).
    pub kubeconfig: Option<PathBuf>,
    /// Policy objects in this namespace are mesh-wide.
    pub root_namespace: String,
}

/// Why the API server cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The kubeconfig file cannot be read or parsed.
    #[error("kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// What kube said.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// Neither a kubeconfig nor an in-cluster service account was found.
    #[error("no Kubernetes API to talk to: {0} (give --kubeconfig, set KUBECONFIG, or run in a pod with a service account)")]
    Infer(#[source] kube::config::InferConfigError),
    /// The client could not be built from the configuration.
    #[error("Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// A client for the API server the settings name.
pub async fn client(settings: &Settings) -> Result<kube::Client, KubeError> {
    let config = match &settings.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                KubeError::Kubeconfig {
                    path: path.clone(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|source| KubeError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        None => kube::Config::infer().await.map_err(KubeError::Infer)?,
    };
    kube::Client::try_from(config).map_err(KubeError::Client)
}
