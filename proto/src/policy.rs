//! Mesh policy documents: YAML in Kubernetes resource form
//! (`apiVersion: infermesh.io/v1alpha1`, `kind`, `metadata`, `spec`).
//!
//! These are the typed documents as users write them. [`load_path`] reads a
//! file or a directory of files, checks every document and returns either a
//! [`PolicySet`] or every error found, each located as `FILE:LINE:COLUMN`.
//! The proxy compiles a `PolicySet` into its routing snapshot; the control
//! plane validates and distributes it.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod authorization;
mod backend;
mod destination;
mod duration;
mod load;
mod local_model;
mod mesh_config;
mod model_route;
mod schema;
mod scope;
mod selector;
mod wire;

pub use authorization::{
    AuthorizationAction, AuthorizationPolicySpec, AuthorizationRule, CallerMatch, RequestMatch,
};
pub use backend::{
    BackendLimits, BackendMtls, BackendSpec, BalancerKind, FailureRate, MetricNames, ModelAware,
    OutlierDetection, PrefixHashing, ResolvedNames, ScoreWeights, ServerKind, ServerMetrics,
    ServicePort, ServiceRef, UpstreamProtocol,
};
pub use destination::{DestinationError, DestinationPattern};
pub use load::{load_path, load_str, Location, PolicyError};
pub use local_model::{local_model_name, LocalModelSpec, LOCAL_PREFIX};
pub use mesh_config::{
    AccessLogSettings, ClassifySettings, MeshConfigSpec, MtlsMode, MtlsSettings, OpaqueSettings,
    OtlpMetricsSettings, TracingProtocol, TracingSettings,
};
pub use model_route::{
    AbortFault, DelayFault, FallbackTarget, FaultPolicy, GrpcCode, GrpcMatch, HeaderMatch,
    HedgePolicy, ListenerKind, MirrorPolicy, ModelRouteSpec, RateLimitKey, RateLimitPolicy,
    RetryBudget, RetryOn, RetryPolicy, RouteMatch, RouteTimeouts, StringMatch, WeightedBackend,
    PASSTHROUGH_ROUTE,
};
pub use schema::{schemas, SchemaFile};
pub use scope::Workload;
pub use selector::WorkloadSelector;

/// The only `apiVersion` this release understands.
pub const API_VERSION: &str = "infermesh.io/v1alpha1";

/// Every document of a policy set, in load order (files sorted by name,
/// documents in file order). Route order is match precedence.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySet {
    /// `kind: Backend` documents.
    pub backends: Vec<Resource<BackendSpec>>,
    /// `kind: LocalModel` documents: models the proxy serves itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub local_models: Vec<Resource<LocalModelSpec>>,
    /// `kind: ModelRoute` documents, in precedence order.
    pub routes: Vec<Resource<ModelRouteSpec>>,
    /// The `kind: MeshConfig` document, when one is given (at most one).
    pub mesh: Option<Resource<MeshConfigSpec>>,
    /// `kind: AuthorizationPolicy` documents. When any of them reaches a
    /// proxy, its inbound listener denies what no rule allows.
    pub authorizations: Vec<Resource<AuthorizationPolicySpec>>,
}

/// One policy document: `apiVersion`, `kind`, `metadata` and a typed `spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resource<S> {
    /// Always [`API_VERSION`].
    pub api_version: String,
    /// `Backend`, `LocalModel`, `ModelRoute`, `MeshConfig` or `AuthorizationPolicy`.
    pub kind: String,
    /// Name, namespace and labels.
    pub metadata: Metadata,
    /// The kind-specific body.
    pub spec: S,
}

/// Identifies a resource, as in Kubernetes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    /// Unique among resources of the same kind: lowercase letters, digits, `-` and `.`.
    pub name: String,
    /// Kubernetes namespace the resource belongs to. A `ModelRoute` or
    /// `MeshConfig` with a namespace reaches only the proxies of that
    /// namespace; without one it reaches the whole mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels with Kubernetes syntax, for people and tools; the mesh does
    /// not read them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}
