//! `infermesh-control inject`: real multi-document Kubernetes YAML through
//! the binary, what changed and what did not, and the output validated by
//! `kubernetes-validate` in strict mode against every Kubernetes version
//! from 1.29 (native sidecars) to the newest the package knows.

mod kube;

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const MANIFESTS: &str = r#"# An application.
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: apps
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
      annotations:
        infermesh.io/skip-outbound-ports: "5432, 6379"
        infermesh.io/skip-inbound-ports: "9100"
        infermesh.io/proxy-memory-limit: 512Mi
        infermesh.io/proxy-cpu-limit: "1"
    spec:
      initContainers:
        - name: migrate
          image: example/migrate:1
      containers:
        - name: app
          image: example/web:1
          ports: [{containerPort: 8000}]
---
apiVersion: v1
kind: Pod
metadata:
  name: solo
  namespace: apps
spec:
  containers:
    - name: app
      image: example/solo:1
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: apps
spec:
  selector: {zeta: last, app: web}
  ports: [{port: 80, targetPort: 8000}]
---
apiVersion: v1
kind: List
items:
  - apiVersion: apps/v1
    kind: StatefulSet
    metadata: {name: db}
    spec:
      serviceName: db
      selector: {matchLabels: {app: db}}
      template:
        metadata: {labels: {app: db}}
        spec:
          containers: [{name: db, image: example/db:1}]
  - apiVersion: v1
    kind: ConfigMap
    metadata: {name: settings}
    data: {a: "1"}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: done
spec:
  selector: {matchLabels: {app: done}}
  template:
    metadata:
      labels: {app: done}
      annotations: {infermesh.io/injected-version: "0.0.1"}
    spec:
      containers: [{name: app, image: example/done:1}]
---
apiVersion: v1
kind: Pod
metadata:
  name: node-agent
spec:
  hostNetwork: true
  containers: [{name: agent, image: example/agent:1}]
---
apiVersion: batch/v1
kind: CronJob
metadata:
  name: nightly
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers: [{name: job, image: example/job:1}]
---
"#;

fn inject(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_infermesh-control"))
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run infermesh-control inject");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("write stdin");
    }
    drop(input);
    child.wait_with_output().expect("wait for inject")
}

fn inject_file(text: &str, args: &[&str]) -> (Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("in.yaml");
    std::fs::write(&path, text).expect("write input");
    let mut all = vec![path.to_str().expect("UTF-8")];
    all.extend_from_slice(args);
    (inject(&all, None), dir)
}

fn docs(text: &str) -> Vec<Value> {
    kube::documents(text)
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .map(|l| l.iter().map(|c| c["name"].as_str().unwrap()).collect())
        .unwrap_or_default()
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "inject failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("UTF-8")
}

#[test]
fn workloads_get_the_sidecar_and_everything_else_passes_through() {
    let (output, _dir) = inject_file(MANIFESTS, &[]);
    let out = stdout(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let before = docs(MANIFESTS);
    let after = docs(&out);
    assert_eq!(after.len(), before.len(), "{out}");

    // The Deployment: init, proxy, then its own init container.
    let template = &after[0]["spec"]["template"];
    let spec = &template["spec"];
    assert_eq!(
        names(&spec["initContainers"]),
        ["infermesh-init", "infermesh-proxy", "migrate"]
    );
    assert_eq!(names(&spec["containers"]), ["app"]);
    let init = &spec["initContainers"][0];
    assert_eq!(
        init["image"],
        format!("infermesh/proxy:{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(init["command"], serde_json::json!(["infermesh-init"]));
    assert_eq!(
        init["args"],
        serde_json::json!([
            "--proxy-uid",
            "2102",
            "--skip-outbound-ports",
            "5432,6379",
            "--skip-inbound-ports",
            "9100"
        ])
    );
    let caps = &init["securityContext"]["capabilities"];
    assert_eq!(caps["add"], serde_json::json!(["NET_ADMIN", "NET_RAW"]));
    assert_eq!(caps["drop"], serde_json::json!(["ALL"]));
    assert_eq!(init["securityContext"]["runAsUser"], 0);

    let proxy = &spec["initContainers"][1];
    assert_eq!(proxy["restartPolicy"], "Always");
    let args: Vec<&str> = proxy["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        [
            "--control-plane",
            "https://infermesh-control.infermesh-system.svc:8080",
            "--identity-token-file",
            "/var/run/secrets/infermesh/token",
            "--trust-bundle",
            "/var/run/infermesh/trust/ca.crt",
            "--trust-domain",
            "cluster.local",
            "--admin",
            "0.0.0.0:4191"
        ]
    );
    assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(proxy["startupProbe"]["httpGet"]["port"], 4191);
    assert_eq!(proxy["livenessProbe"]["httpGet"]["path"], "/live");
    assert_eq!(proxy["securityContext"]["runAsUser"], 2102);
    assert_eq!(proxy["securityContext"]["runAsGroup"], 2102);
    assert_eq!(proxy["securityContext"]["runAsNonRoot"], true);
    let env: Vec<(&str, &str)> = proxy["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap(),
                e["valueFrom"]["fieldRef"]["fieldPath"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        env,
        [
            ("POD_NAME", "metadata.name"),
            ("POD_NAMESPACE", "metadata.namespace"),
            ("POD_SERVICE_ACCOUNT", "spec.serviceAccountName")
        ]
    );
    // Annotations override the limits; the requests keep their defaults.
    assert_eq!(
        proxy["resources"],
        serde_json::json!({"requests": {"cpu": "100m", "memory": "64Mi"},
                           "limits": {"cpu": "1", "memory": "512Mi"}})
    );
    let volumes = &spec["volumes"];
    assert_eq!(
        volumes[0]["projected"]["sources"][0]["serviceAccountToken"],
        serde_json::json!({"audience": "infermesh", "expirationSeconds": 3600, "path": "token"})
    );
    assert_eq!(volumes[1]["configMap"]["name"], "infermesh-trust-bundle");
    assert_eq!(
        template["metadata"]["annotations"]["infermesh.io/injected-version"],
        env!("CARGO_PKG_VERSION")
    );
    // The Deployment's own fields are kept.
    assert_eq!(after[0]["spec"]["replicas"], 2);
    assert_eq!(template["metadata"]["labels"]["app"], "web");

    // The Pod, with the default resources.
    let pod = &after[1]["spec"];
    assert_eq!(
        names(&pod["initContainers"]),
        ["infermesh-init", "infermesh-proxy"]
    );
    assert_eq!(
        pod["initContainers"][1]["resources"],
        serde_json::json!({"requests": {"cpu": "100m", "memory": "64Mi"},
                           "limits": {"memory": "256Mi"}})
    );
    // The Service is unchanged, key order included.
    assert_eq!(after[2], before[2]);
    assert!(
        out.contains("selector:\n    zeta: last\n    app: web\n"),
        "{out}"
    );
    // The List: the StatefulSet injected, the ConfigMap not.
    let items = &after[3]["items"];
    assert_eq!(
        names(&items[0]["spec"]["template"]["spec"]["initContainers"]),
        ["infermesh-init", "infermesh-proxy"]
    );
    assert_eq!(items[1], before[3]["items"][1]);
    // Already injected, and host network: as they were.
    assert_eq!(after[4], before[4]);
    assert_eq!(after[5], before[5]);
    // The CronJob's job template.
    assert_eq!(
        names(&after[6]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["initContainers"]),
        ["infermesh-init", "infermesh-proxy"]
    );

    for line in [
        "Deployment \"web\": injected",
        "Pod \"solo\": injected",
        "StatefulSet \"db\": injected",
        "Deployment \"done\": already injected",
        "CronJob \"nightly\": injected",
    ] {
        assert!(stderr.contains(line), "{line}: {stderr}");
    }
    assert!(
        stderr.contains("warning: ")
            && stderr.contains("Pod \"node-agent\": not injected: hostNetwork"),
        "{stderr}"
    );
    assert!(!stderr.contains("Service"), "{stderr}");

    // Every injected workload is valid Kubernetes, 1.29 onwards.
    kube::validate_all(&out);
}

#[test]
fn injecting_twice_is_injecting_once() {
    let (first, _dir) = inject_file(MANIFESTS, &[]);
    let once = stdout(&first);
    let (second, _dir2) = inject_file(&once, &[]);
    let twice = stdout(&second);
    assert_eq!(docs(&twice), docs(&once));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!stderr.contains(": injected"), "{stderr}");
}

#[test]
fn stdin_is_read_with_a_dash_or_no_file_and_flags_override_the_defaults() {
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: a, image: b}]\n";
    for args in [&["-"][..], &[][..]] {
        let mut all = args.to_vec();
        all.extend([
            "--proxy-image",
            "registry.local/proxy:dev",
            "--control-plane",
            "https://cp.mesh.svc:8080",
            "--trust-domain",
            "prod.example",
        ]);
        let output = inject(&all, Some(pod));
        let after = docs(&stdout(&output));
        let spec = &after[0]["spec"];
        assert_eq!(
            spec["initContainers"][0]["image"],
            "registry.local/proxy:dev"
        );
        assert_eq!(
            spec["initContainers"][1]["image"],
            "registry.local/proxy:dev"
        );
        assert_eq!(
            spec["initContainers"][1]["args"][1],
            "https://cp.mesh.svc:8080"
        );
        // The proxy asks for an identity in the mesh's trust domain.
        assert_eq!(spec["initContainers"][1]["args"][7], "prod.example");
    }
}

#[test]
fn bad_yaml_is_refused_with_file_line_and_column() {
    let (output, dir) = inject_file(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: [unclosed\n",
        &[],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty(), "nothing is printed on an error");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let file = dir.path().join("in.yaml");
    let prefix = format!("{}:", file.display());
    assert!(stderr.starts_with(&prefix), "{stderr}");
    let position: Vec<&str> = stderr[prefix.len()..].splitn(3, ':').collect();
    assert!(
        position[0].parse::<usize>().is_ok() && position[1].parse::<usize>().is_ok(),
        "no LINE:COLUMN: {stderr}"
    );
    let missing = inject(&["/nonexistent/in.yaml"], None);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&missing.stderr).starts_with("/nonexistent/in.yaml: cannot read"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
    let _ = Path::new("");
}
