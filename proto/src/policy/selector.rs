//! The `workloadSelector` of routes, the `MeshConfig` and authorization
//! policies: which workloads' proxies receive a document.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Selects workloads by their labels, as a Kubernetes label selector does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Labels the workload must carry, each with exactly this value; an
    /// empty map selects every workload.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}
