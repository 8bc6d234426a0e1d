//! Sidecar injection: what is added to a pod so that it joins the mesh.
//!
//! One function, [`inject_pod`], changes a pod's metadata and spec; the two
//! doors call it: `infermesh-control inject` on YAML files
//! ([`yaml`](crate::inject::yaml)) and the mutating admission webhook of
//! `serve` ([`webhook`](crate::inject::webhook)), which answers with the
//! JSON patch between the pod before and after.
//!
//! Pods are handled as `serde_json::Value`: injection touches a handful of
//! fields and must keep every other one exactly as it was, including
//! fields newer than any typed model.

pub mod webhook;
pub mod yaml;

use serde_json::{json, Map, Value};

/// The annotation (or label) that opts a pod or namespace in (`enabled`)
/// or a pod out (`disabled`).
pub const INJECT: &str = "infermesh.io/inject";
/// The annotation recording the version that injected a pod.
pub const INJECTED_VERSION: &str = "infermesh.io/injected-version";
/// Outbound ports that bypass the proxy (`infermesh-init --skip-outbound-ports`).
pub const SKIP_OUTBOUND_PORTS: &str = "infermesh.io/skip-outbound-ports";
/// Outbound CIDRs that bypass the proxy (`--skip-outbound-cidrs`).
pub const SKIP_OUTBOUND_CIDRS: &str = "infermesh.io/skip-outbound-cidrs";
/// Inbound ports that bypass the proxy (`--skip-inbound-ports`).
pub const SKIP_INBOUND_PORTS: &str = "infermesh.io/skip-inbound-ports";
/// Resource overrides of the proxy container: annotation, field, default.
const RESOURCES: [(&str, &str, &str, Option<&str>); 4] = [
    (
        "infermesh.io/proxy-cpu-request",
        "requests",
        "cpu",
        Some("100m"),
    ),
    (
        "infermesh.io/proxy-memory-request",
        "requests",
        "memory",
        Some("64Mi"),
    ),
    ("infermesh.io/proxy-cpu-limit", "limits", "cpu", None),
    (
        "infermesh.io/proxy-memory-limit",
        "limits",
        "memory",
        Some("256Mi"),
    ),
];

/// The name of the sidecar container.
pub const PROXY_CONTAINER: &str = "infermesh-proxy";
/// The name of the init container that installs the redirection rules.
pub const INIT_CONTAINER: &str = "infermesh-init";
/// The proxy's user and group (DESIGN.md).
pub const PROXY_UID: i64 = 2102;
/// The proxy's inbound port.
pub const INBOUND_PORT: i64 = 4143;
/// The proxy's admin port: `/ready` and `/live` for the kubelet's probes.
pub const ADMIN_PORT: i64 = 4191;
/// The version written into `infermesh.io/injected-version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

const TOKEN_VOLUME: &str = "infermesh-identity-token";
const TOKEN_DIR: &str = "/var/run/secrets/infermesh";
const TRUST_VOLUME: &str = "infermesh-trust-bundle";
const TRUST_DIR: &str = "/var/run/infermesh/trust";
/// The ConfigMap holding the mesh's trust bundle under `ca.crt`.
pub const TRUST_CONFIGMAP: &str = "infermesh-trust-bundle";

/// What the injected containers point at.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Image of the proxy and of `infermesh-init`.
    #[arg(long, value_name = "IMAGE", default_value_t = default_image())]
    pub proxy_image: String,
    /// The control plane URL the proxy subscribes to.
    #[arg(
        long = "control-plane",
        value_name = "URL",
        default_value = "https://infermesh-control.infermesh-system.svc:8080"
    )]
    pub control_plane: String,
    /// The mesh's trust domain, which the proxy's identity names (`serve`
    /// takes it from its own `--trust-domain`).
    #[arg(skip = infermesh_proto::spiffe::DEFAULT_TRUST_DOMAIN.to_string())]
    pub trust_domain: String,
}

fn default_image() -> String {
    format!("infermesh/proxy:{VERSION}")
}

impl Default for Config {
    fn default() -> Self {
        Config {
            proxy_image: default_image(),
            control_plane: "https://infermesh-control.infermesh-system.svc:8080".into(),
            trust_domain: infermesh_proto::spiffe::DEFAULT_TRUST_DOMAIN.to_string(),
        }
    }
}

/// What injection did to one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The sidecar was added.
    Injected,
    /// It already has the sidecar (the annotation or the container).
    AlreadyInjected,
    /// The pod opts out with `infermesh.io/inject: disabled`.
    OptedOut,
    /// The pod cannot be injected; left unchanged for this reason.
    Refused(String),
}

/// Reads a string annotation or label value.
fn get<'a>(meta: &'a Value, field: &str, key: &str) -> Option<&'a str> {
    meta.get(field)?.get(key)?.as_str()
}

/// Whether the pod says `infermesh.io/inject: disabled` (annotation or label).
pub fn opted_out(meta: &Value) -> bool {
    get(meta, "annotations", INJECT) == Some("disabled")
        || get(meta, "labels", INJECT) == Some("disabled")
}

fn has_proxy(spec: &Value) -> bool {
    ["containers", "initContainers"].iter().any(|list| {
        spec.get(*list).and_then(Value::as_array).is_some_and(|cs| {
            cs.iter()
                .any(|c| c.get("name").and_then(Value::as_str) == Some(PROXY_CONTAINER))
        })
    })
}

fn object<'a>(parent: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    if !parent.is_object() {
        *parent = Value::Object(Map::new());
    }
    let map = parent.as_object_mut().expect("made an object above");
    let entry = map
        .entry(key.to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    if !entry.is_object() {
        *entry = Value::Object(Map::new());
    }
    entry.as_object_mut().expect("made an object above")
}

fn array<'a>(parent: &'a mut Value, key: &str) -> &'a mut Vec<Value> {
    let map = parent.as_object_mut().expect("a pod spec is an object");
    let entry = map
        .entry(key.to_string())
        .or_insert_with(|| Value::Array(Vec::new()));
    if !entry.is_array() {
        *entry = Value::Array(Vec::new());
    }
    entry.as_array_mut().expect("made an array above")
}

/// Adds the sidecar to a pod given its `metadata` and `spec` (a Pod's, or a
/// workload's pod template). Leaves both unchanged unless it says
/// [`Outcome::Injected`].
pub fn inject_pod(meta: &mut Value, spec: &mut Value, config: &Config) -> Outcome {
    if get(meta, "annotations", INJECTED_VERSION).is_some() || has_proxy(spec) {
        return Outcome::AlreadyInjected;
    }
    if opted_out(meta) {
        return Outcome::OptedOut;
    }
    if !spec.is_object() {
        return Outcome::Refused("its spec is missing or not a mapping".into());
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Outcome::Refused(
            "hostNetwork: the redirection rules would apply to the node's network namespace".into(),
        );
    }
    let annotation = |key: &str| get(meta, "annotations", key).map(str::to_string);

    let mut init_args = vec![json!("--proxy-uid"), json!(PROXY_UID.to_string())];
    for (key, flag) in [
        (SKIP_OUTBOUND_PORTS, "--skip-outbound-ports"),
        (SKIP_OUTBOUND_CIDRS, "--skip-outbound-cidrs"),
        (SKIP_INBOUND_PORTS, "--skip-inbound-ports"),
    ] {
        // `5432, 6379` as `5432,6379`: the flags take a bare comma list.
        let value: String = annotation(key)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|part| !part.is_empty())
            .collect::<Vec<_>>()
            .join(",");
        if !value.is_empty() {
            init_args.push(json!(flag));
            init_args.push(json!(value));
        }
    }
    let init = json!({
        "name": INIT_CONTAINER,
        "image": config.proxy_image,
        "command": ["infermesh-init"],
        "args": init_args,
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    });

    let mut resources = json!({});
    for (key, kind, field, default) in RESOURCES {
        if let Some(value) = annotation(key).or(default.map(str::to_string)) {
            object(&mut resources, kind).insert(field.into(), json!(value));
        }
    }
    let field_ref = |path: &str| json!({"valueFrom": {"fieldRef": {"fieldPath": path}}});
    let mut env = Vec::new();
    for (name, path) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_SERVICE_ACCOUNT", "spec.serviceAccountName"),
    ] {
        let mut var = field_ref(path);
        var["name"] = json!(name);
        env.push(var);
    }
    let probe = |path: &str, failures: i64| {
        json!({
            "httpGet": {"path": path, "port": ADMIN_PORT},
            "periodSeconds": 2,
            "failureThreshold": failures,
        })
    };
    let proxy = json!({
        "name": PROXY_CONTAINER,
        "image": config.proxy_image,
        "restartPolicy": "Always",
        "args": [
            "--control-plane", config.control_plane,
            "--identity-token-file", format!("{TOKEN_DIR}/token"),
            "--trust-bundle", format!("{TRUST_DIR}/ca.crt"),
            "--trust-domain", config.trust_domain,
            // Not loopback: the kubelet probes it from the node.
            "--admin", format!("0.0.0.0:{ADMIN_PORT}"),
        ],
        "env": env,
        "ports": [
            {"name": "infermesh-in", "containerPort": INBOUND_PORT, "protocol": "TCP"},
            {"name": "infermesh-adm", "containerPort": ADMIN_PORT, "protocol": "TCP"},
        ],
        "startupProbe": probe("/ready", 60),
        "livenessProbe": probe("/live", 3),
        "resources": resources,
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true},
            {"name": TRUST_VOLUME, "mountPath": TRUST_DIR, "readOnly": true},
        ],
    });
    // infermesh-init first, then the proxy, then whatever init containers
    // the pod had: those then run with the mesh's redirection in force
    // and the proxy ready.
    let inits = array(spec, "initContainers");
    inits.insert(0, proxy);
    inits.insert(0, init);
    array(spec, "volumes").extend([
        json!({
            "name": TOKEN_VOLUME,
            "projected": {"sources": [{"serviceAccountToken": {
                "audience": "infermesh",
                "expirationSeconds": 3600,
                "path": "token",
            }}]},
        }),
        json!({
            "name": TRUST_VOLUME,
            "configMap": {"name": TRUST_CONFIGMAP, "items": [{"key": "ca.crt", "path": "ca.crt"}]},
        }),
    ]);
    object(meta, "annotations").insert(INJECTED_VERSION.into(), json!(VERSION));
    Outcome::Injected
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> (Value, Value) {
        (
            json!({"name": "web", "annotations": {SKIP_OUTBOUND_PORTS: "5432, 6379"}}),
            json!({"initContainers": [{"name": "migrate", "image": "m"}],
                   "containers": [{"name": "app", "image": "a"}]}),
        )
    }

    #[test]
    fn the_init_container_comes_first_then_the_proxy_then_the_pods_own() {
        let (mut meta, mut spec) = pod();
        assert_eq!(
            inject_pod(&mut meta, &mut spec, &Config::default()),
            Outcome::Injected
        );
        let names: Vec<&str> = spec["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, [INIT_CONTAINER, PROXY_CONTAINER, "migrate"]);
        assert_eq!(
            spec["initContainers"][0]["args"],
            json!(["--proxy-uid", "2102", "--skip-outbound-ports", "5432,6379"])
        );
        assert_eq!(meta["annotations"][INJECTED_VERSION], json!(VERSION));
        let before = (meta.clone(), spec.clone());
        assert_eq!(
            inject_pod(&mut meta, &mut spec, &Config::default()),
            Outcome::AlreadyInjected
        );
        assert_eq!((meta, spec), before);
    }

    #[test]
    fn a_proxy_container_or_an_opt_out_leaves_the_pod_as_it_is() {
        let mut meta = json!({"name": "p"});
        let mut spec = json!({"containers": [{"name": "app"}, {"name": PROXY_CONTAINER}]});
        let before = (meta.clone(), spec.clone());
        assert_eq!(
            inject_pod(&mut meta, &mut spec, &Config::default()),
            Outcome::AlreadyInjected
        );
        assert_eq!((meta, spec), before);

        for (field, value) in [("annotations", "disabled"), ("labels", "disabled")] {
            let mut meta = json!({"name": "p", field: {INJECT: value}});
            let mut spec = json!({"containers": [{"name": "app"}]});
            let before = (meta.clone(), spec.clone());
            assert_eq!(
                inject_pod(&mut meta, &mut spec, &Config::default()),
                Outcome::OptedOut
            );
            assert_eq!((meta, spec), before);
        }
    }
}
