//! `infermesh-control install`: every manifest a cluster needs, so that
//! `kubectl apply -f <(infermesh-control install)` is the whole
//! installation. Everything is the same from run to run except what comes
//! from the mesh CA (the `infermesh-ca` Secret, the trust bundle and the
//! webhook's `caBundle`): a root is generated on each run unless
//! `--ca-cert/--ca-key` give one, and `--ca-placeholder` leaves those
//! fields empty for a copy that is committed or reviewed.
//!
//! The objects are printed as YAML documents (`---`-separated) whose
//! bodies are JSON, which is YAML too; `kubectl` reads them as it reads any
//! manifest.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::{ca, crd};

/// Labels on every object, so that the installation can be listed (and
/// removed) as one.
const PART_OF: &str = "infermesh";
/// The label that sends a pod (or every pod of a namespace) to the injector.
pub const INJECT_LABEL: &str = "infermesh.io/inject";

/// Where the mesh CA comes from.
#[derive(Debug, Clone)]
pub enum CaSource {
    /// A new root, made now.
    Generate,
    /// A root and its key, as PEM files.
    Files { cert: PathBuf, key: PathBuf },
    /// No CA: the Secret, the trust bundle and the `caBundle` are left for
    /// the operator to fill.
    Placeholder,
}

/// What `install` was asked for.
#[derive(Debug, Clone)]
pub struct Settings {
    pub namespace: String,
    pub control_image: String,
    pub proxy_image: String,
    pub ca: CaSource,
}

/// Why the manifests cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The CA files are unreadable or not a CA.
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    /// A CA file cannot be read as text.
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `--output` cannot be written.
    #[error("cannot write {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The manifests of one file of `--output DIR`.
#[derive(Debug, Clone)]
pub struct Group {
    /// File name, e.g. `10-crds.yaml`.
    pub file: &'static str,
    pub objects: Vec<Value>,
}

/// The placeholder text that stands where CA material goes.
pub const PLACEHOLDER: &str = "REPLACE-WITH-infermesh-control-install";

/// Every object, grouped as `--output` writes them, in apply order.
pub fn manifests(settings: &Settings) -> Result<Vec<Group>, InstallError> {
    let (cert_pem, key_pem) = match &settings.ca {
        CaSource::Generate => {
            let (cert, key) = ca::new_root()?;
            (cert, key)
        }
        CaSource::Files { cert, key } => {
            ca::check_root(cert, key)?;
            let read = |path: &Path| {
                std::fs::read_to_string(path).map_err(|source| InstallError::Read {
                    path: path.to_owned(),
                    source,
                })
            };
            (read(cert)?, read(key)?)
        }
        CaSource::Placeholder => (PLACEHOLDER.to_owned(), PLACEHOLDER.to_owned()),
    };
    let ns = settings.namespace.as_str();
    let ca_bundle = match settings.ca {
        CaSource::Placeholder => PLACEHOLDER.to_owned(),
        _ => base64::engine::general_purpose::STANDARD.encode(cert_pem.as_bytes()),
    };
    Ok(vec![
        Group {
            file: "00-namespace.yaml",
            objects: vec![json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": ns, "labels": labels()},
            })],
        },
        Group {
            file: "10-crds.yaml",
            objects: crd::crds(),
        },
        Group {
            file: "20-rbac.yaml",
            objects: rbac(ns),
        },
        Group {
            file: "30-ca.yaml",
            objects: vec![
                json!({
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": meta("infermesh-ca", ns),
                    "type": "kubernetes.io/tls",
                    "stringData": {"tls.crt": cert_pem, "tls.key": key_pem},
                }),
                json!({
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": meta("infermesh-trust-bundle", ns),
                    "data": {"ca.crt": cert_pem},
                }),
                json!({
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": meta("infermesh-bootstrap-tokens", ns),
                    "type": "Opaque",
                    "stringData": {"tokens": "# Optional: pods prove their identity with their service-account tokens.\n# For proxies outside the cluster: <namespace>/<service-account> <token>, one a line (see docs/kubernetes.md)\n"},
                }),
            ],
        },
        Group {
            file: "40-config.yaml",
            objects: vec![json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": meta("infermesh-config", ns),
                "data": {
                    "proxyImage": settings.proxy_image,
                    "controlPlaneUrl": format!("https://infermesh-control.{ns}.svc:8080"),
                    "trustDomain": infermesh_proto::spiffe::DEFAULT_TRUST_DOMAIN,
                },
            })],
        },
        Group {
            file: "50-control-plane.yaml",
            objects: vec![deployment(settings), service(ns)],
        },
        Group {
            file: "60-webhook.yaml",
            objects: vec![webhook(ns, &ca_bundle)],
        },
    ])
}

/// The groups as one stream of YAML documents.
pub fn render(groups: &[Group]) -> String {
    let mut out = String::new();
    for object in groups.iter().flat_map(|g| &g.objects) {
        out.push_str("---\n");
        // Plain JSON values always serialize.
        out.push_str(&serde_json::to_string_pretty(object).unwrap_or_default());
        out.push('\n');
    }
    out
}

/// Writes one file per group into `dir`; returns the paths.
pub fn write(groups: &[Group], dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    std::fs::create_dir_all(dir).map_err(|source| InstallError::Write {
        path: dir.to_owned(),
        source,
    })?;
    groups
        .iter()
        .map(|group| {
            let path = dir.join(group.file);
            std::fs::write(&path, render(std::slice::from_ref(group)))
                .map(|()| path.clone())
                .map_err(|source| InstallError::Write { path, source })
        })
        .collect()
}

fn labels() -> Value {
    json!({"app.kubernetes.io/part-of": PART_OF})
}

fn meta(name: &str, ns: &str) -> Value {
    json!({"name": name, "namespace": ns, "labels": labels()})
}

fn rbac(ns: &str) -> Vec<Value> {
    let plurals = crd::plurals();
    let status: Vec<String> = plurals.iter().map(|p| format!("{p}/status")).collect();
    vec![
        json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": meta("infermesh-control", ns),
            "automountServiceAccountToken": true,
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "infermesh-control", "labels": labels()},
            "rules": [
                {"apiGroups": [crd::GROUP], "resources": plurals, "verbs": ["get", "list", "watch"]},
                {"apiGroups": [crd::GROUP], "resources": status, "verbs": ["update", "patch"]},
                {"apiGroups": [""], "resources": ["services", "pods", "namespaces"], "verbs": ["get", "list", "watch"]},
                // The trust bundle injected pods mount, kept in every namespace.
                {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch", "create", "patch", "update"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "infermesh-control", "labels": labels()},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "infermesh-control"},
            "subjects": [{"kind": "ServiceAccount", "name": "infermesh-control", "namespace": ns}],
        }),
    ]
}

/// The arguments of `serve` in the pod.
pub fn serve_args(ns: &str) -> Vec<String> {
    let svc = format!("infermesh-control.{ns}.svc");
    let identity =
        format!("--identity=spiffe://$(INFERMESH_TRUST_DOMAIN)/ns/{ns}/sa/infermesh-control");
    [
        "serve",
        // Policy (the infermesh.io resources), Services, EndpointSlices,
        // Pods and TokenReviews come from the cluster; pods prove their
        // identity with service-account tokens. Policy objects in the
        // control plane's own namespace are mesh-wide.
        "--kubernetes",
        "--root-namespace",
        ns,
        "--listen",
        "0.0.0.0:8080",
        "--admin",
        "0.0.0.0:9091",
        "--ca-cert",
        "/etc/infermesh/ca/tls.crt",
        "--ca-key",
        "/etc/infermesh/ca/tls.key",
        // Only for proxies outside the cluster; ships empty.
        "--bootstrap-tokens",
        "/etc/infermesh/tokens/tokens",
        "--server-name",
        &svc,
        "--server-name",
        &format!("{svc}.cluster.local"),
        "--webhook-listen",
        "0.0.0.0:8443",
        "--webhook-name",
        &svc,
        // The injector's settings, from `infermesh-config` (`env` below).
        "--proxy-image",
        "$(INFERMESH_PROXY_IMAGE)",
        "--control-plane",
        "$(INFERMESH_CONTROL_PLANE)",
        "--trust-domain",
        "$(INFERMESH_TRUST_DOMAIN)",
        // Its own identity follows the namespace it is installed in.
        &identity,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn deployment(settings: &Settings) -> Value {
    let ns = settings.namespace.as_str();
    let selector = json!({"app.kubernetes.io/name": "infermesh-control"});
    let probe = |path: &str| {
        json!({
            "httpGet": {"path": path, "port": "admin"},
            "periodSeconds": 10,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        })
    };
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta("infermesh-control", ns),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": {
                    "app.kubernetes.io/name": "infermesh-control",
                    "app.kubernetes.io/part-of": PART_OF,
                }},
                "spec": {
                    "serviceAccountName": "infermesh-control",
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": 2101,
                        "runAsGroup": 2101,
                        "fsGroup": 2101,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [{
                        "name": "control",
                        "image": settings.control_image,
                        "args": serve_args(ns),
                        // Kubernetes expands `$(NAME)` in `args` from these.
                        "env": [
                            config_env("INFERMESH_PROXY_IMAGE", "proxyImage"),
                            config_env("INFERMESH_CONTROL_PLANE", "controlPlaneUrl"),
                            config_env("INFERMESH_TRUST_DOMAIN", "trustDomain"),
                        ],
                        "ports": [
                            {"name": "grpc", "containerPort": 8080, "protocol": "TCP"},
                            {"name": "webhook", "containerPort": 8443, "protocol": "TCP"},
                            {"name": "admin", "containerPort": 9091, "protocol": "TCP"},
                        ],
                        "livenessProbe": probe("/live"),
                        "readinessProbe": probe("/ready"),
                        "resources": {
                            "requests": {"cpu": "100m", "memory": "64Mi"},
                            "limits": {"memory": "512Mi"},
                        },
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "runAsNonRoot": true,
                            "capabilities": {"drop": ["ALL"]},
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "volumeMounts": [
                            {"name": "ca", "mountPath": "/etc/infermesh/ca", "readOnly": true},
                            {"name": "tokens", "mountPath": "/etc/infermesh/tokens", "readOnly": true},
                        ],
                    }],
                    "volumes": [
                        // The key must not be readable by group or others.
                        {"name": "ca", "secret": {"secretName": "infermesh-ca", "defaultMode": 0o400}},
                        {"name": "tokens", "secret": {"secretName": "infermesh-bootstrap-tokens", "defaultMode": 0o400}},
                    ],
                },
            },
        },
    })
}

/// An environment variable from a key of `infermesh-config`.
fn config_env(name: &str, key: &str) -> Value {
    json!({
        "name": name,
        "valueFrom": {"configMapKeyRef": {"name": "infermesh-config", "key": key}},
    })
}

fn service(ns: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta("infermesh-control", ns),
        "spec": {
            "selector": {"app.kubernetes.io/name": "infermesh-control"},
            "ports": [
                {"name": "grpc", "port": 8080, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"},
                {"name": "webhook", "port": 8443, "targetPort": "webhook", "protocol": "TCP"},
            ],
        },
    })
}

fn webhook(ns: &str, ca_bundle: &str) -> Value {
    // Pods labelled for injection, or any pod of a namespace labelled for
    // it; never the control plane's own namespace.
    let own_namespace = json!({
        "key": "kubernetes.io/metadata.name",
        "operator": "NotIn",
        "values": [ns],
    });
    let hook = |name: &str, namespace_selector: Value, object_selector: Value| {
        json!({
            "name": name,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Ignore",
            "timeoutSeconds": 5,
            "reinvocationPolicy": "Never",
            "matchPolicy": "Equivalent",
            "clientConfig": {
                "service": {"name": "infermesh-control", "namespace": ns, "path": "/inject", "port": 8443},
                "caBundle": ca_bundle,
            },
            "rules": [{
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "operations": ["CREATE"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }],
            "namespaceSelector": namespace_selector,
            "objectSelector": object_selector,
        })
    };
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "infermesh-sidecar-injector", "labels": labels()},
        "webhooks": [
            hook(
                "namespace.inject.infermesh.io",
                json!({"matchExpressions": [
                    {"key": INJECT_LABEL, "operator": "In", "values": ["enabled"]},
                    own_namespace,
                ]}),
                // A pod may still opt out in a labelled namespace.
                json!({"matchExpressions": [
                    {"key": INJECT_LABEL, "operator": "NotIn", "values": ["disabled"]},
                ]}),
            ),
            hook(
                "pod.inject.infermesh.io",
                json!({"matchExpressions": [
                    {"key": INJECT_LABEL, "operator": "NotIn", "values": ["enabled"]},
                    own_namespace,
                ]}),
                json!({"matchExpressions": [
                    {"key": INJECT_LABEL, "operator": "In", "values": ["enabled"]},
                ]}),
            ),
        ],
    })
}
