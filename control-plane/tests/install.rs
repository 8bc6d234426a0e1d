//! `infermesh-control install`: the manifests it prints are valid for every
//! Kubernetes version from 1.29 (`kubernetes-validate`, strict), its CRDs
//! accept the example policies, the copy in `deploy/kubernetes/` is
//! current, only the CA differs from run to run, and the control plane
//! starts with the Deployment's own arguments and mounts.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use base64::Engine as _;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_infermesh-control");
const REGENERATE: &str =
    "cargo run -p infermesh-control -- install --ca-placeholder --output deploy/kubernetes";
const PLACEHOLDER: &str = "REPLACE-WITH-infermesh-control-install";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

fn install(args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("install")
        .args(args)
        .output()
        .expect("infermesh-control runs")
}

/// The objects of an `install` stream: `---` documents whose bodies are JSON.
fn objects(text: &str) -> Vec<Value> {
    text.split("---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name}"))
}

/// The interpreter, as the end-to-end tests find it (tests/src/python.rs).
fn python() -> PathBuf {
    if let Some(path) = std::env::var_os("INFERMESH_PYTHON") {
        return PathBuf::from(path);
    }
    let venv = repo().join(".venv/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

#[test]
fn every_object_is_valid_for_kubernetes_1_29_and_newer_and_the_crds_take_the_examples() {
    if std::env::var_os("INFERMESH_SKIP_PYTHON").is_some_and(|v| !v.is_empty() && v != "0") {
        eprintln!("skipped: INFERMESH_SKIP_PYTHON");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    // A generated CA, so that the Secret and caBundle are real ones.
    let output = install(&[]);
    assert!(output.status.success(), "{output:?}");
    let manifests = dir.path().join("install.yaml");
    fs::write(&manifests, &output.stdout).expect("write");
    let run = Command::new(python())
        .arg(repo().join("tests/python/k8s_manifests.py"))
        .arg(&manifests)
        .arg(repo().join("deploy/examples"))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}; run scripts/setup.sh",
                python().display()
            )
        });
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}\n(kubernetes-validate comes from tests/python/requirements.txt: run scripts/setup.sh)",
        String::from_utf8_lossy(&run.stderr)
    );
    let versions = stdout
        .lines()
        .find_map(|l| l.strip_prefix("versions: "))
        .expect("versions line");
    assert!(versions.starts_with("1.29.0 1.30.0"), "{versions}");
    assert!(stdout.contains("broken: 8 refused"), "{stdout}");
    let examples: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("examples: "))
        .and_then(|n| n.parse().ok())
        .expect("examples line");
    assert!(examples >= 40, "{stdout}");
}

#[test]
fn the_committed_manifests_are_up_to_date() {
    let fresh = tempfile::tempdir().expect("temp dir");
    let output = install(&["--ca-placeholder", "--output"]);
    assert!(!output.status.success(), "--output needs a value");
    let output = Command::new(BIN)
        .args(["install", "--ca-placeholder", "--output"])
        .arg(fresh.path())
        .output()
        .expect("runs");
    assert!(output.status.success(), "{output:?}");
    let yaml_files = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}; run `{REGENERATE}`", dir.display()))
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".yaml"))
            .collect();
        names.sort();
        names
    };
    let committed = repo().join("deploy/kubernetes");
    let generated = yaml_files(fresh.path());
    assert_eq!(
        generated,
        [
            "00-namespace.yaml",
            "10-crds.yaml",
            "20-rbac.yaml",
            "30-ca.yaml",
            "40-config.yaml",
            "50-control-plane.yaml",
            "60-webhook.yaml"
        ]
    );
    assert_eq!(yaml_files(&committed), generated, "run `{REGENERATE}`");
    let mut all = String::new();
    for name in &generated {
        let want = fs::read_to_string(fresh.path().join(name)).expect("generated");
        let have = fs::read_to_string(committed.join(name)).expect("committed");
        assert!(
            want == have,
            "deploy/kubernetes/{name} is stale: run `{REGENERATE}`"
        );
        all.push_str(&have);
    }
    // The files together are what stdout prints, and hold no key.
    let stdout = install(&["--ca-placeholder"]);
    assert_eq!(String::from_utf8_lossy(&stdout.stdout), all);
    assert!(!all.contains("PRIVATE KEY"));
    let objects = objects(&all);
    let secret = find(&objects, "Secret", "infermesh-ca");
    assert_eq!(secret["stringData"]["tls.key"], PLACEHOLDER);
}

/// Blanks what comes from the CA.
fn without_ca(mut objects: Vec<Value>) -> Vec<Value> {
    for o in &mut objects {
        match (o["kind"].as_str(), o["metadata"]["name"].as_str()) {
            (Some("Secret"), Some("infermesh-ca")) => {
                o["stringData"]["tls.crt"] = PLACEHOLDER.into();
                o["stringData"]["tls.key"] = PLACEHOLDER.into();
            }
            (Some("ConfigMap"), Some("infermesh-trust-bundle")) => {
                o["data"]["ca.crt"] = PLACEHOLDER.into();
            }
            (Some("MutatingWebhookConfiguration"), _) => {
                for hook in o["webhooks"].as_array_mut().expect("webhooks") {
                    hook["clientConfig"]["caBundle"] = PLACEHOLDER.into();
                }
            }
            _ => {}
        }
    }
    objects
}

#[test]
fn each_run_makes_a_new_root_and_nothing_else_changes() {
    let runs: Vec<Vec<Value>> = (0..2)
        .map(|_| {
            let output = install(&[]);
            assert!(output.status.success(), "{output:?}");
            objects(&String::from_utf8_lossy(&output.stdout))
        })
        .collect();
    let placeholder = objects(&String::from_utf8_lossy(
        &install(&["--ca-placeholder"]).stdout,
    ));
    let (a, b) = (&runs[0], &runs[1]);
    let cert = |o: &[Value]| {
        find(o, "Secret", "infermesh-ca")["stringData"]["tls.crt"]
            .as_str()
            .expect("cert")
            .to_owned()
    };
    assert_ne!(cert(a), cert(b), "each run generates its own root");
    assert!(cert(a).starts_with("-----BEGIN CERTIFICATE-----"));
    // The trust bundle and the webhook's caBundle are that root.
    assert_eq!(
        find(a, "ConfigMap", "infermesh-trust-bundle")["data"]["ca.crt"],
        cert(a)
    );
    let hooks = &find(
        a,
        "MutatingWebhookConfiguration",
        "infermesh-sidecar-injector",
    )["webhooks"];
    for hook in hooks.as_array().expect("webhooks") {
        let bundle = base64::engine::general_purpose::STANDARD
            .decode(hook["clientConfig"]["caBundle"].as_str().expect("caBundle"))
            .expect("base64");
        assert_eq!(String::from_utf8_lossy(&bundle), cert(a));
    }
    // openssl reads it as a CA.
    let dir = tempfile::tempdir().expect("temp dir");
    let pem = dir.path().join("ca.crt");
    fs::write(&pem, cert(a)).expect("write");
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&pem)
        .output()
        .expect("openssl runs");
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("CA:TRUE"),
        "{text:?}"
    );

    assert_eq!(without_ca(runs[0].clone()), without_ca(runs[1].clone()));
    assert_eq!(without_ca(runs[0].clone()), placeholder);
}

fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl runs");
    assert!(status.success(), "openssl {args:?}");
}

#[test]
fn a_given_ca_is_used_and_a_certificate_that_is_not_a_ca_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    openssl(
        dir.path(),
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "30",
            "-subj",
            "/CN=test root",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    openssl(
        dir.path(),
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "leaf.key",
            "-out",
            "leaf.crt",
            "-days",
            "30",
            "-subj",
            "/CN=leaf",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
        ],
    );
    use std::os::unix::fs::PermissionsExt;
    for key in ["ca.key", "leaf.key"] {
        fs::set_permissions(dir.path().join(key), fs::Permissions::from_mode(0o600))
            .expect("chmod");
    }
    let path = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    let output = install(&["--ca-cert", &path("ca.crt"), "--ca-key", &path("ca.key")]);
    assert!(output.status.success(), "{output:?}");
    let objects = objects(&String::from_utf8_lossy(&output.stdout));
    let secret = find(&objects, "Secret", "infermesh-ca");
    assert_eq!(
        secret["stringData"]["tls.crt"],
        fs::read_to_string(dir.path().join("ca.crt")).expect("read")
    );
    assert_eq!(
        secret["stringData"]["tls.key"],
        fs::read_to_string(dir.path().join("ca.key")).expect("read")
    );

    let output = install(&[
        "--ca-cert",
        &path("leaf.crt"),
        "--ca-key",
        &path("leaf.key"),
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty(), "nothing is printed on failure");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("leaf.crt"), "{stderr}");

    let output = install(&["--ca-cert", &path("ca.crt")]);
    assert_eq!(output.status.code(), Some(2), "--ca-cert needs --ca-key");
}

#[test]
fn the_rbac_rules_are_least_privilege() {
    let all = objects(&String::from_utf8_lossy(
        &install(&["--ca-placeholder"]).stdout,
    ));
    let role = find(&all, "ClusterRole", "infermesh-control");
    let mut grants: Vec<String> = Vec::new();
    for rule in role["rules"].as_array().expect("rules") {
        for group in rule["apiGroups"].as_array().expect("groups") {
            for resource in rule["resources"].as_array().expect("resources") {
                for verb in rule["verbs"].as_array().expect("verbs") {
                    grants.push(format!(
                        "{}/{}:{}",
                        group.as_str().expect("group"),
                        resource.as_str().expect("resource"),
                        verb.as_str().expect("verb")
                    ));
                }
            }
        }
    }
    grants.sort();
    let mut want: Vec<String> = Vec::new();
    for kind in [
        "backends",
        "localmodels",
        "modelroutes",
        "meshconfigs",
        "authorizationpolicies",
    ] {
        for verb in ["get", "list", "watch"] {
            want.push(format!("infermesh.io/{kind}:{verb}"));
        }
        for verb in ["update", "patch"] {
            want.push(format!("infermesh.io/{kind}/status:{verb}"));
        }
    }
    for resource in ["services", "pods", "namespaces"] {
        for verb in ["get", "list", "watch"] {
            want.push(format!("/{resource}:{verb}"));
        }
    }
    for verb in ["get", "list", "watch"] {
        want.push(format!("discovery.k8s.io/endpointslices:{verb}"));
    }
    want.push("authentication.k8s.io/tokenreviews:create".into());
    // The trust bundle, written into every namespace.
    for verb in ["get", "list", "watch", "create", "patch", "update"] {
        want.push(format!("/configmaps:{verb}"));
    }
    want.sort();
    assert_eq!(grants, want);
}

/// The Deployment's arguments, with its mount paths and ports mapped to a
/// temporary directory and free ports.
#[test]
fn the_control_plane_starts_with_the_deployments_arguments_and_mounts() {
    let output = install(&[]);
    assert!(output.status.success(), "{output:?}");
    let all = objects(&String::from_utf8_lossy(&output.stdout));
    let deployment = find(&all, "Deployment", "infermesh-control");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string").to_owned())
        .collect();
    assert!(args.contains(&"$(INFERMESH_PROXY_IMAGE)".to_owned()));

    // Every flag exists.
    let help = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .expect("runs");
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        let flag = flag.split('=').next().unwrap_or_default();
        // `--flag <VALUE>`, or a switch alone on its line.
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "`serve` has no {flag}"
        );
    }

    // The volumes, laid out as the kubelet lays out a Secret or ConfigMap
    // volume: files behind a `..data` link, made group-readable for the
    // pod's fsGroup.
    let root = tempfile::tempdir().expect("temp dir");
    use std::os::unix::fs::PermissionsExt;
    let volume = |mount: &str, files: Vec<(String, String)>, mode: u32| {
        let dir = root.path().join(mount.trim_start_matches('/'));
        let data = dir.join("..2026_12_06_00_00_00.000000001");
        fs::create_dir_all(&data).expect("mkdir");
        for (name, contents) in files {
            let file = data.join(&name);
            fs::write(&file, contents).expect("write");
            fs::set_permissions(&file, fs::Permissions::from_mode(mode)).expect("chmod");
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(&name)).expect("link");
        }
        std::os::unix::fs::symlink(data.file_name().expect("name"), dir.join("..data"))
            .expect("link");
    };
    let pod = &deployment["spec"]["template"]["spec"];
    let fs_group = pod["securityContext"]["fsGroup"].as_u64();
    assert_eq!(fs_group, Some(2101));
    for mount in container["volumeMounts"].as_array().expect("mounts") {
        let name = mount["name"].as_str().expect("name");
        let source = pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == name)
            .expect("volume");
        let (object, mode) = if let Some(secret) = source["secret"]["secretName"].as_str() {
            let object = find(&all, "Secret", secret);
            // defaultMode, with the group read bits the kubelet adds for fsGroup.
            let mode = source["secret"]["defaultMode"].as_u64().unwrap_or(0o644) as u32 | 0o040;
            (object["stringData"].clone(), mode)
        } else {
            let name = source["configMap"]["name"].as_str().expect("configMap");
            (find(&all, "ConfigMap", name)["data"].clone(), 0o644)
        };
        let files = object
            .as_object()
            .expect("data")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().expect("text").to_owned()))
            .collect();
        volume(mount["mountPath"].as_str().expect("path"), files, mode);
    }
    let prefix = root.path().to_string_lossy().into_owned();
    // `$(NAME)` from the container's env, as the kubelet expands it.
    let mut env = Vec::new();
    for var in container["env"].as_array().expect("env") {
        let from = &var["valueFrom"]["configMapKeyRef"];
        let map = find(&all, "ConfigMap", from["name"].as_str().expect("name"));
        let value = map["data"][from["key"].as_str().expect("key")]
            .as_str()
            .unwrap_or_else(|| panic!("{from} is not in the ConfigMap"))
            .to_owned();
        env.push((format!("$({})", var["name"].as_str().expect("name")), value));
    }
    let mapped: Vec<String> = args
        .iter()
        .map(|a| {
            let a = &env
                .iter()
                .fold(a.clone(), |a, (name, value)| a.replace(name, value));
            if a.starts_with("/etc/infermesh/") {
                format!("{prefix}{a}")
            } else if a.starts_with("0.0.0.0:") {
                "127.0.0.1:0".to_owned()
            } else {
                a.clone()
            }
        })
        .collect();
    // In a pod, `--kubernetes` finds the API server from the pod's service
    // account; here it is the fixture API server (an empty cluster), named
    // by a kubeconfig.
    let api = infermesh_tests::kube_api::KubeApi::start();
    let kubeconfig = api.kubeconfig();
    assert!(args.contains(&"--kubernetes".to_owned()));
    let mut child = Command::new(BIN)
        .args(&mapped)
        .env("KUBECONFIG", &kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve starts");
    let mut line = String::new();
    let read = BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line);
    if read.is_err() || !line.starts_with("listening grpc=") {
        let _ = child.kill();
        let exit = child.wait_with_output().expect("wait");
        panic!(
            "serve {mapped:?} did not start: {line}{}",
            String::from_utf8_lossy(&exit.stderr)
        );
    }
    let addr = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name}= in {line}"))
            .to_owned()
    };
    // The probes' endpoint answers, and the webhook's certificate verifies
    // against the webhook configuration's caBundle for the Service's name.
    let get = |path: &str| {
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--noproxy",
                "*",
            ])
            .arg(format!("http://{}{path}", addr("admin")))
            .output()
            .expect("curl runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let live = get("/live");
    // Ready (so the Service, and the webhook, have an endpoint) once every
    // policy kind is listed (none: an empty cluster is served as it is); a
    // generous limit for a loaded machine.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut ready = get("/ready");
    while ready != "200" && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        ready = get("/ready");
    }
    let hooks = &find(
        &all,
        "MutatingWebhookConfiguration",
        "infermesh-sidecar-injector",
    )["webhooks"];
    let service = &hooks[0]["clientConfig"]["service"];
    let dns = format!(
        "{}.{}.svc",
        service["name"].as_str().expect("name"),
        service["namespace"].as_str().expect("namespace")
    );
    let bundle = root.path().join("ca-bundle.pem");
    fs::write(
        &bundle,
        base64::engine::general_purpose::STANDARD
            .decode(
                hooks[0]["clientConfig"]["caBundle"]
                    .as_str()
                    .expect("caBundle"),
            )
            .expect("base64"),
    )
    .expect("write");
    let tls = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr("webhook"),
            "-servername",
            &dns,
        ])
        .args(["-verify_hostname", &dns, "-verify_return_error", "-CAfile"])
        .arg(&bundle)
        .stdin(Stdio::null())
        .output()
        .expect("openssl runs");
    let _ = child.kill();
    let exit = child.wait_with_output().expect("wait");
    assert_eq!(live, "200");
    assert_eq!(
        ready,
        "200",
        "/ready in an empty cluster; the control plane said:\n{}",
        String::from_utf8_lossy(&exit.stderr)
    );
    // It listed every policy kind from the API server.
    let requests = api.requests();
    for plural in [
        "backends",
        "modelroutes",
        "meshconfigs",
        "localmodels",
        "authorizationpolicies",
    ] {
        assert!(
            requests
                .iter()
                .any(|r| r.starts_with(&format!("GET /apis/infermesh.io/v1alpha1/{plural}"))),
            "no list of {plural}: {requests:?}"
        );
    }
    let tls_out = String::from_utf8_lossy(&tls.stdout);
    assert!(
        tls_out.contains("Verify return code: 0 (ok)"),
        "{tls_out}{}",
        String::from_utf8_lossy(&tls.stderr)
    );
}

#[test]
fn another_namespace_is_used_throughout() {
    let output = install(&["--ca-placeholder", "--namespace", "mesh-cp"]);
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(!text.contains("infermesh-system"), "{text}");
    let all = objects(&text);
    for o in &all {
        let kind = o["kind"].as_str().expect("kind");
        let cluster_wide = [
            "Namespace",
            "CustomResourceDefinition",
            "ClusterRole",
            "ClusterRoleBinding",
            "MutatingWebhookConfiguration",
        ];
        if !cluster_wide.contains(&kind) {
            assert_eq!(o["metadata"]["namespace"], "mesh-cp", "{o}");
        }
    }
    assert!(find(&all, "Namespace", "mesh-cp").is_object());
    let args = find(&all, "Deployment", "infermesh-control")["spec"]["template"]["spec"]
        ["containers"][0]["args"]
        .to_string();
    assert!(
        args.contains(
            "--identity=spiffe://$(INFERMESH_TRUST_DOMAIN)/ns/mesh-cp/sa/infermesh-control"
        ),
        "{args}"
    );
    assert!(args.contains("infermesh-control.mesh-cp.svc"), "{args}");
    let hooks = &find(
        &all,
        "MutatingWebhookConfiguration",
        "infermesh-sidecar-injector",
    )["webhooks"];
    for hook in hooks.as_array().expect("webhooks") {
        assert_eq!(hook["clientConfig"]["service"]["namespace"], "mesh-cp");
        let own = hook["namespaceSelector"]["matchExpressions"]
            .as_array()
            .expect("expressions")
            .iter()
            .any(|e| e["operator"] == "NotIn" && e["values"] == serde_json::json!(["mesh-cp"]));
        assert!(own, "{hook}");
    }
    assert_eq!(
        find(&all, "ConfigMap", "infermesh-config")["data"]["controlPlaneUrl"],
        "https://infermesh-control.mesh-cp.svc:8080"
    );
}
