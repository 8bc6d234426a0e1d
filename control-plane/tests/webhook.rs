//! The injection webhook of `infermesh-control serve`, over real HTTPS with
//! curl trusting the mesh CA: AdmissionReviews as the API server sends
//! them, the JSON patches applied to real Pod and Deployment specs and
//! validated by `kubernetes-validate`, malformed reviews answered 400.

mod kube;

use std::io::{BufRead, BufReader, Read, Write as _};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use base64::Engine as _;
use serde_json::{json, Value};

const NAMES: [&str; 2] = [
    "infermesh-control.infermesh-system.svc",
    "webhook.example.test",
];

struct Webhook {
    child: Child,
    port: u16,
    ca: PathBuf,
    stderr: Option<std::thread::JoinHandle<String>>,
    _dir: tempfile::TempDir,
}

impl Webhook {
    fn start() -> Self {
        Self::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let policies = dir.path().join("policies");
        std::fs::create_dir(&policies).unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::write(&tokens, "apps/web a-token-of-32-characters-or-so-0001\n").unwrap();
        let ca = dir.path().join("ca");
        let mut child = Command::new(env!("CARGO_BIN_EXE_infermesh-control"))
            .args(["serve", "--policies"])
            .arg(&policies)
            .arg("--ca-dir")
            .arg(&ca)
            .arg("--bootstrap-tokens")
            .arg(&tokens)
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--webhook-listen", "127.0.0.1:0"])
            .args(["--webhook-name", NAMES[0], "--webhook-name", NAMES[1]])
            .args(extra)
            .env("INFERMESH_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("infermesh-control starts");
        let mut pipe = child.stderr.take().expect("stderr");
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("the listening line");
        let webhook = line
            .split_whitespace()
            .find_map(|field| field.strip_prefix("webhook="))
            .unwrap_or_else(|| panic!("no webhook= in {line:?}"));
        let port = webhook.rsplit(':').next().unwrap().parse().expect("a port");
        Webhook {
            child,
            port,
            ca: ca.join("ca.crt"),
            stderr: Some(stderr),
            _dir: dir,
        }
    }

    /// `curl` to `https://NAME:PORT/inject`, NAME resolved to 127.0.0.1 and
    /// checked against the certificate: (curl's exit code, HTTP status, body).
    fn post_as(&self, name: &str, body: &str) -> (i32, u16, String) {
        let mut child = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--noproxy", "*", "--cacert"])
            .arg(&self.ca)
            .arg("--resolve")
            .arg(format!("{name}:{}:127.0.0.1", self.port))
            .args([
                "-H",
                "content-type: application/json",
                "--data-binary",
                "@-",
            ])
            .args(["-w", "\n%{http_code}"])
            .arg(format!("https://{name}:{}/inject", self.port))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("curl runs");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let output = child.wait_with_output().expect("curl ends");
        let text = String::from_utf8_lossy(&output.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
        (
            output.status.code().unwrap_or(-1),
            code.trim().parse().unwrap_or(0),
            format!("{body}{}", String::from_utf8_lossy(&output.stderr)),
        )
    }

    fn post(&self, body: &str) -> (u16, Value) {
        let (exit, status, text) = self.post_as(NAMES[0], body);
        assert_eq!(exit, 0, "curl failed: {text}");
        let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        (status, value)
    }

    /// The response of a review of `pod`; checks the envelope.
    fn review(&self, uid: &str, kind: Value, object: &Value) -> Value {
        let review = json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": uid,
                "kind": kind,
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "apps",
                "operation": "CREATE",
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "object": object,
                "dryRun": false,
            }
        });
        let (status, answer) = self.post(&review.to_string());
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["kind"], "AdmissionReview");
        let response = answer["response"].clone();
        assert_eq!(response["uid"], uid, "{answer}");
        assert_eq!(response["allowed"], true, "{answer}");
        response
    }

    fn pod_review(&self, uid: &str, pod: &Value) -> Value {
        self.review(
            uid,
            json!({"group": "", "version": "v1", "kind": "Pod"}),
            pod,
        )
    }

    fn logs(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stderr.take().unwrap().join().unwrap()
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pod(annotations: Value, labels: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "web-7d4b9-",
            "namespace": "apps",
            "labels": labels,
            "annotations": annotations,
        },
        "spec": {
            "serviceAccountName": "web",
            "containers": [{"name": "app", "image": "example/web:1", "ports": [{"containerPort": 8000}]}],
        }
    })
}

/// The pod with the response's patch applied.
fn patched(pod: &Value, response: &Value) -> Value {
    assert_eq!(response["patchType"], "JSONPatch", "{response}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().expect("a base64 patch"))
        .expect("base64");
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("an RFC 6902 patch");
    let mut pod = pod.clone();
    json_patch::patch(&mut pod, &patch).expect("the patch applies");
    pod
}

fn init_names(pod: &Value) -> Vec<String> {
    pod["spec"]["initContainers"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|c| c["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn unchanged(response: &Value) {
    assert!(response.get("patch").is_none(), "{response}");
    assert!(response.get("patchType").is_none(), "{response}");
}

/// What `infermesh-control inject` prints for `pod`.
fn cli_inject(pod: &Value) -> Value {
    let mut child = Command::new(env!("CARGO_BIN_EXE_infermesh-control"))
        .args(["inject", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_yaml_ng::to_string(pod).unwrap().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    kube::documents(&String::from_utf8(output.stdout).unwrap()).remove(0)
}

#[test]
fn opted_in_pods_get_a_patch_that_makes_a_valid_injected_pod_and_deployment() {
    let webhook = Webhook::start();
    let by_annotation = pod(
        json!({"infermesh.io/inject": "enabled"}),
        json!({"app": "web"}),
    );
    let by_label = pod(
        json!({}),
        json!({"app": "web", "infermesh.io/inject": "enabled"}),
    );
    // Neither: the namespace selector sent it, so it is selected.
    let by_namespace = pod(json!({}), json!({"app": "web"}));
    let mut injected = Vec::new();
    for (uid, pod) in [
        ("a-1", &by_annotation),
        ("l-2", &by_label),
        ("n-3", &by_namespace),
    ] {
        let response = webhook.pod_review(uid, pod);
        let after = patched(pod, &response);
        assert_eq!(
            init_names(&after),
            ["infermesh-init", "infermesh-proxy"],
            "{uid}"
        );
        assert_eq!(
            after["metadata"]["annotations"]["infermesh.io/injected-version"],
            env!("CARGO_PKG_VERSION")
        );
        // Both doors do the same.
        assert_eq!(after, cli_inject(pod), "{uid}");
        injected.push(after);
    }

    // A Deployment's template, sent as the ReplicaSet controller's pod.
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "apps"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}, "annotations": {"infermesh.io/proxy-cpu-limit": "500m"}},
                "spec": {"containers": [{"name": "app", "image": "example/web:1"}]},
            }
        }
    });
    let template_pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": deployment["spec"]["template"]["metadata"],
        "spec": deployment["spec"]["template"]["spec"],
    });
    let after = patched(&template_pod, &webhook.pod_review("d-4", &template_pod));
    assert_eq!(
        after["spec"]["initContainers"][1]["resources"]["limits"]["cpu"],
        "500m"
    );
    let mut patched_deployment = deployment.clone();
    patched_deployment["spec"]["template"]["metadata"] = after["metadata"].clone();
    patched_deployment["spec"]["template"]["spec"] = after["spec"].clone();

    let mut yaml = String::new();
    for resource in injected.iter().chain([&after, &patched_deployment]) {
        let mut resource = resource.clone();
        // A created pod has a name; generateName alone is not a manifest.
        if resource["kind"] == "Pod" {
            resource["metadata"]["name"] = json!("web-7d4b9-x2k4q");
        }
        yaml.push_str("---\n");
        yaml.push_str(&serde_yaml_ng::to_string(&resource).unwrap());
    }
    kube::validate_all(&yaml);

    // Already injected: no patch.
    unchanged(&webhook.pod_review("i-5", &injected[0]));
    let logs = webhook.logs();
    assert!(logs.contains("sidecar injected"), "{logs}");
}

#[test]
fn opted_out_host_network_and_other_kinds_are_admitted_unchanged() {
    let webhook = Webhook::start();
    let out = pod(
        json!({"infermesh.io/inject": "disabled"}),
        json!({"infermesh.io/inject": "enabled"}),
    );
    unchanged(&webhook.pod_review("o-1", &out));

    let mut host = pod(json!({"infermesh.io/inject": "enabled"}), json!({}));
    host["spec"]["hostNetwork"] = json!(true);
    let response = webhook.pod_review("h-2", &host);
    unchanged(&response);
    let warning = response["warnings"][0].as_str().unwrap_or_default();
    assert!(
        warning.contains("not injected") && warning.contains("hostNetwork"),
        "{response}"
    );

    let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {}});
    let response = webhook.review(
        "k-3",
        json!({"group": "apps", "version": "v1", "kind": "Deployment"}),
        &deployment,
    );
    unchanged(&response);
    assert!(response.get("warnings").is_none(), "{response}");

    let logs = webhook.logs();
    assert!(
        logs.contains("pod admitted without the sidecar") && logs.contains("hostNetwork"),
        "{logs}"
    );
}

#[test]
fn a_malformed_review_is_a_400_with_the_reason_and_the_webhook_serves_on() {
    let webhook = Webhook::start();
    for (body, reason) in [
        ("this is not json", "not JSON"),
        (
            r#"{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"}"#,
            "no request",
        ),
        (
            r#"{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1beta1", "request": {"uid": "x"}}"#,
            "apiVersion",
        ),
        (
            r#"{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {"kind": {"kind": "Pod"}}}"#,
            "uid",
        ),
        (
            r#"{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {"uid": "u", "kind": {"group": "", "kind": "Pod"}, "object": 7}}"#,
            "object",
        ),
        ("[1, 2]", "AdmissionReview"),
    ] {
        let (status, answer) = webhook.post(body);
        assert_eq!(status, 400, "{body}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(reason), "{body}: {answer}");
    }
    // Still serving.
    let response = webhook.pod_review("after", &pod(json!({}), json!({})));
    assert_eq!(response["patchType"], "JSONPatch");
}

#[test]
fn the_certificate_carries_the_webhook_names_and_chains_to_the_mesh_ca() {
    let webhook = Webhook::start();
    let body = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {"uid": "c", "kind": {"group": "", "version": "v1", "kind": "Service"}, "object": {}},
    })
    .to_string();
    for name in NAMES {
        let (exit, status, text) = webhook.post_as(name, &body);
        assert_eq!((exit, status), (0, 200), "{name}: {text}");
    }
    // curl checks the name: one not on the certificate fails (60: peer
    // certificate cannot be authenticated / 51: name mismatch).
    let (exit, _, text) = webhook.post_as("other.example.test", &body);
    assert!(exit == 51 || exit == 60, "{exit}: {text}");
}

/// The serving certificate as `openssl x509 -noout -serial -ext subjectAltName` prints it.
fn served_certificate(port: u16) -> String {
    let fetch = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} -servername {} </dev/null 2>/dev/null \
             | openssl x509 -noout -serial -ext subjectAltName",
            NAMES[0]
        ))
        .output()
        .expect("openssl runs");
    String::from_utf8_lossy(&fetch.stdout).to_string()
}

#[test]
fn the_certificate_names_every_webhook_name_and_is_renewed_before_it_expires() {
    // Two-second certificates: renewed at about 70% of their lifetime.
    let webhook = Webhook::start_with(&["--cert-lifetime", "2s"]);
    let first = served_certificate(webhook.port);
    for name in NAMES {
        assert!(first.contains(&format!("DNS:{name}")), "{name}: {first}");
    }
    let serial = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("serial="))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no serial: {text}"))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let now = served_certificate(webhook.port);
        if serial(&now) != serial(&first) {
            assert!(now.contains(&format!("DNS:{}", NAMES[1])), "{now}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not renewed in 10 s");
    }
    // And a review after the renewal is answered over the new certificate.
    let response = webhook.pod_review("r", &pod(json!({}), json!({})));
    assert_eq!(response["patchType"], "JSONPatch");
    let logs = webhook.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("certificate renewed") && l.contains("webhook")),
        "{logs}"
    );
}
