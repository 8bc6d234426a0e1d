//! The mesh in a "cluster": `infermesh-control serve --kubernetes` fed by
//! the fixture API server (`tests/src/kube_api.rs`, the real list/watch
//! protocol), and a pod injected by `infermesh-control inject` whose
//! containers run as the kubelet would run them, as real processes in the
//! network namespaces of `tests/src/netns.rs`: `infermesh-init` as root,
//! then the proxy with exactly the injected arguments, environment and
//! mounted files, as the injected UID, then the application (curl, calling
//! a Service's cluster IP as if there were no mesh).
//!
//! No live Kubernetes cluster runs here: the API server is the fixture,
//! the kubelet is this file (it resolves `fieldRef` variables and mounts
//! the projected token and the trust bundle as files), and nothing proxies
//! the cluster IP but the sidecar.
//!
//! Needs root, `ip`, `setpriv`, `nft` and `curl`, like `pods.rs`; where the
//! kernel refuses network namespaces the test prints `SKIP: <reason>`.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use infermesh_tests::control_plane::{control_binary, parse_listening};
use infermesh_tests::kube_api::KubeApi;
use infermesh_tests::netns::{Cluster, Pod, PodProcess};
use infermesh_tests::process::{init_binary, proxy_binary};
use serde_json::{json, Value};

const CLUSTER_IP: &str = "10.96.0.10";
const TOKEN: &str = "projected-token-of-apps-web";

fn cluster_or_skip() -> Option<Cluster> {
    match Cluster::new() {
        Ok(cluster) => Some(cluster),
        Err(reason) => {
            println!("SKIP: {reason}");
            eprintln!("SKIP: {reason}");
            None
        }
    }
}

/// Runs `f` on a thread inside the network namespace `ns`; threads and
/// sockets it creates stay there.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns on this thread only, with a namespace file we hold open.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("the thread in the namespace")
}

/// A directory every user may read, for what the proxy (UID 2102) reads.
fn open_dir(parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir_all(&dir).expect("create a directory");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod 755");
    dir
}

fn write_open(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).expect("chmod 644");
}

/// `infermesh-control inject` on one pod, returning the injected pod.
fn inject(pod: &Value, control_plane: &str) -> Value {
    let mut child = Command::new(control_binary())
        .args(["inject", "-", "--control-plane", control_plane])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run infermesh-control inject");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(serde_json::to_string(pod).expect("JSON").as_bytes())
        .expect("write the pod");
    let out = child.wait_with_output().expect("inject's output");
    assert!(
        out.status.success(),
        "inject failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_yaml_ng::from_str(&text)
        .unwrap_or_else(|e| panic!("the injected pod is not readable: {e}\n{text}"))
}

/// The value of `env` entry `var` of a container, resolving the
/// `fieldRef`s the kubelet resolves from the pod.
fn resolve_env(container: &Value, pod: &Value) -> Vec<(String, String)> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|var| {
            let name = var["name"].as_str().expect("env name").to_string();
            let value = match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.name") => pod["metadata"]["name"].as_str().unwrap_or_default(),
                Some("metadata.namespace") => {
                    pod["metadata"]["namespace"].as_str().unwrap_or_default()
                }
                Some("spec.serviceAccountName") => pod["spec"]["serviceAccountName"]
                    .as_str()
                    .unwrap_or("default"),
                Some(other) => panic!("the test's kubelet does not resolve {other}"),
                None => var["value"].as_str().unwrap_or_default(),
            };
            (name, value.to_string())
        })
        .collect()
}

/// A container's arguments with each volume's mount path replaced by the
/// directory standing in for it.
fn mounted_args(container: &Value, mounts: &[(String, PathBuf)]) -> Vec<String> {
    container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| {
            let mut arg = a.as_str().expect("a string argument").to_string();
            for (path, dir) in mounts {
                arg = arg.replace(path.as_str(), dir.to_str().expect("UTF-8 path"));
            }
            arg
        })
        .collect()
}

/// POSTs a chat completion for `model` to the cluster IP from `pod`, as
/// the unchanged application: (status, `x-upstream`).
fn chat(pod: &Pod, model: &str) -> (u16, String) {
    let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    let url = format!("http://{CLUSTER_IP}/v1/chat/completions");
    let (code, out, err) = pod.curl(&[
        "--include",
        "-H",
        "content-type: application/json",
        "--data-binary",
        &body.to_string(),
        &url,
    ]);
    assert_eq!(code, 0, "curl {url} from {}: {err}", pod.ns);
    let head = out.split("\r\n\r\n").next().unwrap_or_default();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let upstream = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("x-upstream")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, upstream)
}

/// Polls `check` until it holds, for at most `within`; the time it took.
fn until(what: &str, within: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

fn slice(endpoints: &[(Ipv4Addr, bool)]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "chat-x1", "namespace": "ml",
                     "labels": {"kubernetes.io/service-name": "chat"}},
        "addressType": "IPv4",
        "endpoints": endpoints.iter().map(|(ip, ready)| json!({
            "addresses": [ip.to_string()],
            "conditions": {"ready": ready},
        })).collect::<Vec<_>>(),
        "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
    })
}

fn web_pod(labels: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "apps", "labels": labels},
        "spec": {
            "serviceAccountName": "web",
            "containers": [{"name": "app", "image": "curlimages/curl"}],
        },
    })
}

#[test]
fn an_injected_pod_is_identified_by_its_token_scoped_by_its_labels_and_follows_endpoint_slices() {
    let Some(cluster) = cluster_or_skip() else {
        return;
    };
    // The API server, in the node's namespace beside the control plane.
    let api = in_netns(cluster.node(), KubeApi::start);
    let work = tempfile::Builder::new()
        .prefix("infermesh-k8s-")
        .tempdir()
        .expect("a temporary directory");
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod 755");

    // Two model pods (not meshed), each naming itself in `x-upstream`.
    let upstream = cluster.install(&PathBuf::from(env!(
        "CARGO_BIN_EXE_infermesh-demo-upstream"
    )));
    let upstream = upstream.to_str().expect("UTF-8 path").to_string();
    let model_a = cluster.pod("model-a");
    let model_b = cluster.pod("model-b");
    let _a = model_a.spawn(
        "model-a",
        &[&upstream, "--addr", "0.0.0.0:8000", "--name", "model-a"],
        Some("listening addr="),
    );
    let _b = model_b.spawn(
        "model-b",
        &[&upstream, "--addr", "0.0.0.0:8000", "--name", "model-b"],
        Some("listening addr="),
    );

    // The cluster's objects: namespaces, the Service and its slice (model-a), the
    // policy resources, and the application's pod.
    for ns in ["apps", "ml", "infermesh-system"] {
        api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}));
    }
    api.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "chat", "namespace": "ml"},
        "spec": {"clusterIP": CLUSTER_IP, "clusterIPs": [CLUSTER_IP],
                 "ports": [{"name": "http", "port": 80, "targetPort": 8000, "protocol": "TCP"}]},
    }));
    api.apply(slice(&[(model_a.ip, true)]));
    api.apply(json!({
        "apiVersion": "infermesh.io/v1alpha1", "kind": "Backend",
        "metadata": {"name": "chat", "namespace": "ml"},
        "spec": {"service": {"name": "chat", "port": "http"}},
    }));
    // Only for pods labelled tier=gold: the `gold` model is refused (418).
    api.apply(json!({
        "apiVersion": "infermesh.io/v1alpha1", "kind": "ModelRoute",
        "metadata": {"name": "gold-only", "namespace": "apps"},
        "spec": {
            "workloadSelector": {"matchLabels": {"tier": "gold"}},
            "match": [{"model": {"exact": "gold"}}],
            "backends": [{"backend": "chat"}],
            "faults": {"abort": {"status": 418, "percent": 100}},
        },
    }));
    let pod = web_pod(json!({"app": "web", "tier": "gold"}));
    api.apply(pod.clone());
    api.add_token(TOKEN, "apps", "web", &["infermesh"]);

    // The control plane: a CA, no token file, everything else from the
    // API server.
    let ca_dir = work.path().join("ca");
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", cluster.node()])
        .arg(control_binary())
        .args(["serve", "--kubernetes", "--kubeconfig"])
        .arg(api.kubeconfig())
        .arg("--ca-dir")
        .arg(&ca_dir)
        .args(["--listen", &format!("{}:0", cluster.node_ip())])
        .args(["--admin", "127.0.0.1:0", "--webhook-listen", "127.0.0.1:0"])
        .env("INFERMESH_LOG", "info");
    let control = PodProcess::spawn("infermesh-control", command, Some("listening grpc="));
    let output = control.output();
    let line = output
        .lines()
        .find(|l| l.contains("listening grpc="))
        .unwrap_or_else(|| panic!("no listening line from the control plane:\n{output}"))
        .to_string();
    let (grpc, admin) = parse_listening(&line).expect("the listening line's addresses");
    let control_url = format!("https://{grpc}");

    // Injection, then the kubelet's part: volumes become directories.
    let injected = inject(&pod, &control_url);
    let spec = &injected["spec"];
    let inits = spec["initContainers"].as_array().expect("init containers");
    assert_eq!(inits[0]["name"], "infermesh-init");
    assert_eq!(inits[1]["restartPolicy"], "Always", "a native sidecar");
    let sidecar = &inits[1];
    let token_dir = open_dir(work.path(), "token");
    write_open(&token_dir.join("token"), TOKEN);
    let trust_dir = open_dir(work.path(), "trust");
    // The trust bundle the pod mounts is the ConfigMap the control plane
    // wrote into the pod's namespace.
    let ca_pem = std::fs::read_to_string(ca_dir.join("ca.crt")).expect("the mesh's root");
    let mut bundle = String::new();
    until(
        "the control plane writes the trust bundle into namespace apps",
        Duration::from_secs(10),
        || {
            bundle = api
                .get("v1", "ConfigMap", Some("apps"), "infermesh-trust-bundle")
                .and_then(|cm| cm["data"]["ca.crt"].as_str().map(str::to_string))
                .unwrap_or_default();
            !bundle.is_empty()
        },
    );
    let der = |pem: &str| -> String { pem.lines().filter(|l| !l.starts_with("-----")).collect() };
    assert_eq!(der(&bundle), der(&ca_pem), "the bundle is the mesh's root");
    write_open(&trust_dir.join("ca.crt"), &bundle);
    let mut mounts = Vec::new();
    for mount in sidecar["volumeMounts"].as_array().expect("mounts") {
        let volume = spec["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == mount["name"])
            .expect("the mounted volume");
        let dir = if volume.get("projected").is_some() {
            assert_eq!(
                volume["projected"]["sources"][0]["serviceAccountToken"]["audience"],
                "infermesh"
            );
            token_dir.clone()
        } else {
            trust_dir.clone()
        };
        mounts.push((mount["mountPath"].as_str().expect("path").to_string(), dir));
    }

    let app = cluster.pod("web");
    let init_args = mounted_args(&inits[0], &mounts);
    let init = cluster.install(&init_binary());
    let mut args = vec![init.to_str().expect("UTF-8 path")];
    args.extend(init_args.iter().map(String::as_str));
    app.must(&args);

    let uid = sidecar["securityContext"]["runAsUser"]
        .as_u64()
        .expect("runAsUser") as u32;
    let mut command = app.command_as(uid, uid, cluster.install(&proxy_binary()));
    command
        .args(mounted_args(sidecar, &mounts))
        .envs(resolve_env(sidecar, &pod))
        .env("INFERMESH_LOG", "info");
    let proxy = PodProcess::spawn("sidecar", command, None);
    until(
        "the injected sidecar is ready",
        Duration::from_secs(30),
        || {
            let (_, status, _) = app.curl(&[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "http://127.0.0.1:4191/ready",
            ]);
            status == "200"
        },
    );

    // The token path: the control plane reviewed the projected token and
    // the proxy holds exactly its service account's SPIFFE ID; its labels
    // are the pod's.
    let node_curl = |url: &str| -> String {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                cluster.node(),
                "curl",
                "-sS",
                "--max-time",
                "10",
                url,
            ])
            .output()
            .expect("curl in the node");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let proxies: Value =
        serde_json::from_str(&node_curl(&format!("http://{admin}/proxies"))).expect("/proxies");
    let web = proxies["proxies"]
        .as_array()
        .or_else(|| proxies.as_array())
        .into_iter()
        .flatten()
        .find(|p| p["id"] == "web")
        .unwrap_or_else(|| panic!("proxy `web` in {proxies}"))
        .clone();
    assert_eq!(
        web["identity"], "spiffe://cluster.local/ns/apps/sa/web",
        "{web}"
    );
    assert_eq!(web["namespace"], "apps");
    assert_eq!(web["labels"]["tier"], "gold", "labels from the Pod: {web}");
    let status: Value = api
        .get("infermesh.io/v1alpha1", "Backend", Some("ml"), "chat")
        .expect("the Backend");
    assert_eq!(
        status["status"]["conditions"][0]["status"], "True",
        "the Backend's Ready condition: {status}"
    );

    // The application calls the Service's cluster IP; the sidecar sends
    // it to the endpoint of the slice.
    let (code, upstream) = chat(&app, "chat-model");
    assert_eq!(
        (code, upstream.as_str()),
        (200, "model-a"),
        "{}",
        proxy.output()
    );

    // The slice moves to model-b: traffic follows.
    api.apply(slice(&[(model_a.ip, false), (model_b.ip, true)]));
    let moved = until("traffic moves to model-b", Duration::from_secs(10), || {
        chat(&app, "chat-model") == (200, "model-b".to_string())
    });
    println!("endpoint change to traffic moved: {moved:?}");
    for _ in 0..5 {
        assert_eq!(chat(&app, "chat-model"), (200, "model-b".to_string()));
    }

    // Scoping by the pod's labels: gold is refused while the pod has
    // tier=gold, and served once the label is gone.
    assert_eq!(chat(&app, "gold").0, 418, "the gold-only route applies");
    api.apply(web_pod(json!({"app": "web"})));
    until(
        "the relabelled pod loses the gold route",
        Duration::from_secs(10),
        || chat(&app, "gold") == (200, "model-b".to_string()),
    );

    // A broken edit of the route keeps the accepted one, and says why.
    api.apply(json!({
        "apiVersion": "infermesh.io/v1alpha1", "kind": "ModelRoute",
        "metadata": {"name": "gold-only", "namespace": "apps"},
        "spec": {
            "match": [{"model": {"exact": "gold"}}],
            "backends": [{"backend": "no-such-backend"}],
        },
    }));
    until(
        "the bad route's status says why",
        Duration::from_secs(10),
        || {
            api.get(
                "infermesh.io/v1alpha1",
                "ModelRoute",
                Some("apps"),
                "gold-only",
            )
            .is_some_and(|r| {
                r["status"]["conditions"][0]["status"] == "False"
                    && r["status"]["conditions"][0]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("no-such-backend"))
            })
        },
    );
    assert_eq!(chat(&app, "chat-model"), (200, "model-b".to_string()));

    // Watches cut while the history is compacted: the control plane
    // re-lists (410 Gone) and sees the fix made in the gap.
    let lists_before = api
        .requests()
        .iter()
        .filter(|r| {
            r.starts_with("GET /apis/infermesh.io/v1alpha1/modelroutes?") && !r.contains("watch=")
        })
        .count();
    api.refuse_watches(true);
    api.drop_watches();
    api.apply(json!({
        "apiVersion": "infermesh.io/v1alpha1", "kind": "ModelRoute",
        "metadata": {"name": "gold-only", "namespace": "apps"},
        "spec": {
            "match": [{"model": {"exact": "gold"}}],
            "backends": [{"backend": "chat"}],
            "faults": {"abort": {"status": 418, "percent": 100}},
        },
    }));
    api.compact();
    api.refuse_watches(false);
    until(
        "the fix made during the gap is in force",
        Duration::from_secs(20),
        || chat(&app, "gold").0 == 418,
    );
    let lists_after = api
        .requests()
        .iter()
        .filter(|r| {
            r.starts_with("GET /apis/infermesh.io/v1alpha1/modelroutes?") && !r.contains("watch=")
        })
        .count();
    assert!(lists_after > lists_before, "the route watch re-listed");
    let route = api
        .get(
            "infermesh.io/v1alpha1",
            "ModelRoute",
            Some("apps"),
            "gold-only",
        )
        .expect("the route");
    assert_eq!(
        route["status"]["conditions"][0]["status"], "True",
        "{route}"
    );
    drop(proxy);
    drop(control);
}
