//! Policy sets on the wire: each document travels as a [`Resource`] holding
//! its JSON form, and becomes a typed document again here, at one boundary.

use std::collections::HashSet;

use super::{local_model_name, PolicySet, Resource as Document, API_VERSION};
use crate::policy_api::Resource;

impl PolicySet {
    /// Every document as a wire resource: backends and local models first,
    /// routes in order.
    pub fn to_resources(&self) -> Vec<Resource> {
        fn one<S: serde::Serialize>(doc: &Document<S>) -> Resource {
            Resource {
                kind: doc.kind.clone(),
                name: doc.metadata.name.clone(),
                namespace: doc.metadata.namespace.clone().unwrap_or_default(),
                // Serializing plain data structures to JSON cannot fail.
                json: serde_json::to_string(doc).unwrap_or_default(),
            }
        }
        let mut out: Vec<Resource> = self.backends.iter().map(one).collect();
        out.extend(self.local_models.iter().map(one));
        out.extend(self.routes.iter().map(one));
        out.extend(self.mesh.iter().map(one));
        out.extend(self.authorizations.iter().map(one));
        out
    }

    /// Rebuilds a policy set from wire resources, refusing what this build
    /// cannot honour (an unknown kind from a newer control plane, a document
    /// that does not decode, a reference to a missing backend) with a reason.
    pub fn from_resources(resources: &[Resource]) -> Result<Self, String> {
        fn decode<S: serde::de::DeserializeOwned>(r: &Resource) -> Result<Document<S>, String> {
            let doc: Document<S> = serde_json::from_str(&r.json)
                .map_err(|e| format!("{} {:?}: {e}", r.kind, r.name))?;
            if doc.api_version != API_VERSION {
                return Err(format!(
                    "{} {:?}: unsupported apiVersion {:?} (this proxy understands {API_VERSION})",
                    r.kind, r.name, doc.api_version
                ));
            }
            Ok(doc)
        }
        let mut set = PolicySet::default();
        for r in resources {
            match r.kind.as_str() {
                "Backend" => set.backends.push(decode(r)?),
                "LocalModel" => {
                    let doc: Document<super::LocalModelSpec> = decode(r)?;
                    // The control plane checked it with the same rules; a
                    // proxy still refuses limits its engine cannot honour.
                    if let Some((field, problem)) = super::load::local_model_problems(&doc.spec)
                        .into_iter()
                        .next()
                    {
                        return Err(format!("LocalModel {:?}: {field}: {problem}", r.name));
                    }
                    set.local_models.push(doc);
                }
                "ModelRoute" => set.routes.push(decode(r)?),
                "MeshConfig" => {
                    if set.mesh.is_some() {
                        return Err("more than one MeshConfig".into());
                    }
                    set.mesh = Some(decode(r)?);
                }
                "AuthorizationPolicy" => set.authorizations.push(decode(r)?),
                other => {
                    return Err(format!(
                        "resource {:?} has kind {other:?}, which this proxy does not know",
                        r.name
                    ))
                }
            }
        }
        set.check_references()?;
        Ok(set)
    }

    /// Checks that every backend (and `local:` model) a route or the mesh
    /// names exists.
    pub fn check_references(&self) -> Result<(), String> {
        let names: HashSet<&str> = self
            .backends
            .iter()
            .map(|b| b.metadata.name.as_str())
            .collect();
        let local: HashSet<&str> = self
            .local_models
            .iter()
            .map(|m| m.metadata.name.as_str())
            .collect();
        for route in &self.routes {
            for backend in route.spec.backend_names() {
                let known = match local_model_name(backend) {
                    Some(model) => local.contains(model),
                    None => names.contains(backend),
                };
                if !known {
                    return Err(format!(
                        "ModelRoute {:?} names backend {:?}, which is not in the snapshot",
                        route.metadata.name, backend
                    ));
                }
            }
        }
        if let Some(name) = self
            .mesh
            .as_ref()
            .and_then(|m| m.spec.opaque.backend.as_ref())
        {
            if !names.contains(name.as_str()) {
                return Err(format!(
                    "MeshConfig names opaque backend {name:?}, which is not in the snapshot"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const POLICY: &str = r#"
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {name: vllm}
spec:
  endpoints: ["127.0.0.1:8000"]
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {name: chat}
spec:
  match: [{model: {prefix: llama}}]
  backends: [{backend: vllm, weight: 3, model: llama-3}]
  timeouts: {firstByte: 2s, total: 1m}
"#;

    #[test]
    fn a_policy_set_survives_the_wire_unchanged() {
        let set = crate::policy::load_str(Path::new("p.yaml"), POLICY).unwrap();
        let back = PolicySet::from_resources(&set.to_resources()).unwrap();
        assert_eq!(back, set);
    }

    #[test]
    fn a_model_aware_backend_survives_the_wire_with_every_setting() {
        let text = r#"
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {name: fleet}
spec:
  endpoints: ["127.0.0.1:8000", "127.0.0.1:8001"]
  balancer: model-aware
  modelAware:
    weights: {queue: 3, running: 0.5, kvCache: 2, latency: 0}
    loadFactor: 1.5
    prefix: {blocks: 8, blockSize: 64}
    metrics:
      path: /stats
      interval: 250ms
      staleAfter: 2s
      serverKind: sglang
      names: {waiting: "my:queue", loraInfo: "my:lora"}
"#;
        let set = crate::policy::load_str(Path::new("p.yaml"), text).unwrap();
        let back = PolicySet::from_resources(&set.to_resources()).unwrap();
        assert_eq!(back, set);
        let settings = back.backends[0].spec.model_aware.clone().unwrap();
        assert_eq!(settings.load_factor, 1.5);
        assert_eq!(settings.prefix.block_size, 64);
        assert_eq!(
            settings.metrics.stale_after(),
            std::time::Duration::from_secs(2)
        );
        let names = settings.metrics.resolved_names();
        assert_eq!(names.waiting.as_deref(), Some("my:queue"));
        assert_eq!(names.running.as_deref(), Some("sglang:num_running_reqs"));
        assert_eq!(names.lora_info.as_deref(), Some("my:lora"));
        // The defaults, when the block is absent, also travel as such.
        let plain = POLICY.replace(
            "endpoints: [\"127.0.0.1:8000\"]",
            "endpoints: [\"127.0.0.1:8000\"]\n  balancer: model-aware",
        );
        let set = crate::policy::load_str(Path::new("p.yaml"), &plain).unwrap();
        assert_eq!(
            set.backends[0].spec.balancer,
            crate::policy::BalancerKind::ModelAware
        );
        let back = PolicySet::from_resources(&set.to_resources()).unwrap();
        assert_eq!(back, set);
    }

    #[test]
    fn unknown_kinds_and_dangling_references_are_refused_with_a_reason() {
        let set = crate::policy::load_str(Path::new("p.yaml"), POLICY).unwrap();
        let mut resources = set.to_resources();
        resources.push(Resource {
            kind: "RateLimit".into(),
            name: "chat".into(),
            namespace: String::new(),
            json: "{}".into(),
        });
        let err = PolicySet::from_resources(&resources).unwrap_err();
        assert!(err.contains("kind \"RateLimit\""), "{err}");
        let routes_only: Vec<_> = set
            .to_resources()
            .into_iter()
            .filter(|r| r.kind == "ModelRoute")
            .collect();
        let err = PolicySet::from_resources(&routes_only).unwrap_err();
        assert!(err.contains("backend \"vllm\""), "{err}");
    }

    #[test]
    fn local_models_travel_and_their_references_are_checked() {
        let text = format!(
            "{POLICY}  fallback: [{{backend: \"local:minilm\"}}]\n---\napiVersion: infermesh.io/v1alpha1\nkind: LocalModel\nmetadata: {{name: minilm}}\nspec: {{modelDir: /m, maxBatchSize: 8, adapter: llvmpipe}}\n"
        );
        let set = crate::policy::load_str(Path::new("p.yaml"), &text).unwrap();
        let resources = set.to_resources();
        assert_eq!(resources[1].kind, "LocalModel");
        let back = PolicySet::from_resources(&resources).unwrap();
        assert_eq!(back, set);
        let without: Vec<_> = resources
            .into_iter()
            .filter(|r| r.kind != "LocalModel")
            .collect();
        let err = PolicySet::from_resources(&without).unwrap_err();
        assert!(err.contains("\"local:minilm\""), "{err}");
        let mut zero = set.to_resources();
        zero[1].json = zero[1]
            .json
            .replace("\"maxBatchSize\":8", "\"maxBatchSize\":0");
        let err = PolicySet::from_resources(&zero).unwrap_err();
        assert!(
            err.contains("`maxBatchSize` must be between 1 and 256"),
            "{err}"
        );
    }
}
