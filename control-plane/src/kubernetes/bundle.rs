//! The mesh's trust bundle in every namespace.
//!
//! An injected pod mounts the ConfigMap `infermesh-trust-bundle` (the
//! roots its proxy verifies the control plane with), and a pod can only
//! mount ConfigMaps of its own namespace. So the control plane writes that
//! ConfigMap into every namespace, with server-side apply (field manager
//! `infermesh-control`): when a namespace appears, on every re-list of the
//! namespaces, and whenever the copy in a namespace is edited or deleted.

use std::collections::BTreeSet;

use base64::Engine as _;
use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Patch, PatchParams};
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::Api;
use rustls_pki_types::CertificateDer;
use serde_json::json;

use crate::inject::TRUST_CONFIGMAP;

/// The field manager of the applied ConfigMaps.
const MANAGER: &str = "infermesh-control";

/// Certificates as PEM text.
pub fn pem(roots: &[CertificateDer<'_>]) -> String {
    let mut out = String::new();
    for root in roots {
        let b64 = base64::engine::general_purpose::STANDARD.encode(root.as_ref());
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// Keeps `infermesh-trust-bundle` holding `bundle` (PEM) in every
/// namespace, until the runtime ends.
pub fn distribute(client: kube::Client, bundle: String) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let configmaps: Api<ConfigMap> = Api::all(client.clone());
    tokio::spawn(async move {
        let mut events = futures_util::stream::select(
            watcher(namespaces, watcher::Config::default())
                .default_backoff()
                .map(|e| e.map(|e| relabel(e, Watched::Namespace)))
                .boxed(),
            watcher(
                configmaps,
                watcher::Config::default().fields(&format!("metadata.name={TRUST_CONFIGMAP}")),
            )
            .default_backoff()
            .map(|e| e.map(|e| relabel(e, Watched::ConfigMap)))
            .boxed(),
        );
        let mut live: BTreeSet<String> = BTreeSet::new();
        while let Some(event) = events.next().await {
            let (namespace, removed) = match event {
                Ok(watcher::Event::Apply(w) | watcher::Event::InitApply(w)) => {
                    (w.namespace(), false)
                }
                Ok(watcher::Event::Delete(w)) => (w.namespace(), true),
                Ok(_) => continue,
                Err(error) => {
                    tracing::warn!(%error, "watching namespaces for the trust bundle failed; retrying");
                    continue;
                }
            };
            let Some((namespace, watched)) = namespace else {
                continue;
            };
            match (watched, removed) {
                // A namespace going away needs no bundle.
                (Kind::Namespace, true) => {
                    live.remove(&namespace);
                    continue;
                }
                (Kind::Namespace, false) => {
                    live.insert(namespace.clone());
                }
                // A copy edited or deleted: put it back, if its namespace lives.
                (Kind::ConfigMap { current }, _) => {
                    if !live.contains(&namespace) || (!removed && current == Some(bundle.clone())) {
                        continue;
                    }
                }
            }
            tokio::spawn(apply(client.clone(), namespace, bundle.clone()));
        }
    });
}

/// The event with its object wrapped.
fn relabel<K>(event: watcher::Event<K>, wrap: fn(K) -> Watched) -> watcher::Event<Watched> {
    match event {
        watcher::Event::Apply(k) => watcher::Event::Apply(wrap(k)),
        watcher::Event::Delete(k) => watcher::Event::Delete(wrap(k)),
        watcher::Event::InitApply(k) => watcher::Event::InitApply(wrap(k)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

enum Watched {
    Namespace(Namespace),
    ConfigMap(ConfigMap),
}

enum Kind {
    Namespace,
    ConfigMap { current: Option<String> },
}

impl Watched {
    /// The namespace concerned, and what was seen; `None` for a namespace
    /// that is terminating.
    fn namespace(self) -> Option<(String, Kind)> {
        match self {
            Watched::Namespace(ns) => {
                let terminating = ns
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.as_deref())
                    .is_some_and(|p| p == "Terminating");
                (!terminating).then_some((ns.metadata.name?, Kind::Namespace))
            }
            Watched::ConfigMap(cm) => {
                let current = cm.data.and_then(|mut d| d.remove("ca.crt"));
                Some((cm.metadata.namespace?, Kind::ConfigMap { current }))
            }
        }
    }
}

async fn apply(client: kube::Client, namespace: String, bundle: String) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let object = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": TRUST_CONFIGMAP,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "infermesh"},
        },
        "data": {"ca.crt": bundle},
    });
    let params = PatchParams::apply(MANAGER).force();
    match api
        .patch(TRUST_CONFIGMAP, &params, &Patch::Apply(&object))
        .await
    {
        Ok(_) => tracing::debug!(%namespace, "trust bundle written"),
        Err(error) => {
            tracing::warn!(%namespace, %error, "cannot write the trust bundle ConfigMap")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_wraps_at_64_columns() {
        let der = CertificateDer::from(vec![7u8; 100]);
        let text = pem(&[der]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "-----BEGIN CERTIFICATE-----");
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines.last(), Some(&"-----END CERTIFICATE-----"));
        let body: String = lines[1..lines.len() - 1].concat();
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(body)
                .unwrap(),
            vec![7u8; 100]
        );
    }
}
