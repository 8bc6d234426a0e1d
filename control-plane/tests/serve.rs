//! `infermesh-control serve` end to end: the real binary on port 0, a real
//! tonic client in the role of a proxy, and the admin endpoints read over
//! HTTP, as operators and proxies see them. The admin helpers block, so the
//! tests run on a multi-threaded runtime where the client keeps running.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use infermesh_proto::policy_api::policy_discovery_client::PolicyDiscoveryClient;
use infermesh_proto::policy_api::proxy_message::Message;
use infermesh_proto::policy_api::{Ack, Hello, Nack, PolicySnapshot, ProxyMessage};
use serde_json::Value;
use tokio::sync::mpsc;
use tonic::Streaming;

// === the control plane ===

struct ControlPlane {
    child: Child,
    grpc: SocketAddr,
    admin: SocketAddr,
    dir: tempfile::TempDir,
}

impl ControlPlane {
    /// Starts `serve` over a directory holding `files`.
    fn start(files: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write policy");
        }
        Self::start_in(dir)
    }

    fn start_in(dir: tempfile::TempDir) -> Self {
        let policies = dir.path().to_owned();
        Self::start_with(dir, &policies)
    }

    /// Starts `serve --policies POLICIES`, a path inside `dir`.
    fn start_with(dir: tempfile::TempDir, policies: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_infermesh-control"))
            .args(["serve", "--policies"])
            .arg(policies)
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .env("INFERMESH_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("infermesh-control starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the listening line");
        let addr = |key: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|part| part.strip_prefix(key))
                .unwrap_or_else(|| panic!("no {key} in {line:?}"))
                .parse()
                .expect("an address")
        };
        assert!(line.starts_with("listening "), "{line:?}");
        let (grpc, admin) = (addr("grpc="), addr("admin="));
        Self {
            child,
            grpc,
            admin,
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A GET to the admin server: status and body.
    fn get(&self, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(self.admin).expect("connect to admin");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n"
        )
        .expect("send");
        let mut reply = String::new();
        stream.read_to_string(&mut reply).expect("read reply");
        let status = reply
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status");
        let body = reply
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    fn json(&self, path: &str) -> Value {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    /// The version in force, from `/policy`.
    fn version(&self) -> Option<u64> {
        self.json("/policy")["version"].as_u64()
    }

    /// The value of a metric without labels.
    fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.get("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{body}"))
    }

    /// Polls `check` on the admin server until it holds (5 s at most).
    fn wait_for(&self, what: &str, check: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !check(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `/proxies` entry with this id.
    fn proxy(&self, id: &str) -> Option<Value> {
        self.json("/proxies")
            .as_array()
            .expect("an array")
            .iter()
            .find(|p| p["id"] == id)
            .cloned()
    }

    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// === a proxy ===

struct Proxy {
    tx: mpsc::Sender<ProxyMessage>,
    inbound: Streaming<PolicySnapshot>,
}

fn hello(id: &str, namespace: &str, labels: &[(&str, &str)], version: u64) -> Hello {
    Hello {
        proxy_id: id.into(),
        identity: format!("spiffe://cluster.local/ns/{namespace}/sa/{id}"),
        namespace: namespace.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        version,
    }
}

/// Opens a policy stream whose first message is `first`.
async fn open(addr: SocketAddr, first: Message) -> Result<Proxy, tonic::Status> {
    let mut client = PolicyDiscoveryClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let (tx, rx) = mpsc::channel(8);
    tx.send(ProxyMessage {
        message: Some(first),
    })
    .await
    .expect("queue the first message");
    let outgoing =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let inbound = client.subscribe(outgoing).await?.into_inner();
    Ok(Proxy { tx, inbound })
}

impl Proxy {
    async fn connect(addr: SocketAddr, hello: Hello) -> Self {
        open(addr, Message::Hello(hello))
            .await
            .expect("the stream opens")
    }

    /// The next snapshot, within 5 s.
    async fn next(&mut self) -> PolicySnapshot {
        tokio::time::timeout(Duration::from_secs(5), self.inbound.message())
            .await
            .expect("a snapshot within 5s")
            .expect("a healthy stream")
            .expect("the stream is open")
    }

    /// Asserts that nothing arrives for `wait`.
    async fn nothing_for(&mut self, wait: Duration) {
        if let Ok(message) = tokio::time::timeout(wait, self.inbound.message()).await {
            panic!("expected no push, got {message:?}");
        }
    }

    async fn send(&self, message: Message) {
        self.tx
            .send(ProxyMessage {
                message: Some(message),
            })
            .await
            .expect("send");
    }

    async fn ack(&self, snapshot: &PolicySnapshot) {
        self.send(Message::Ack(Ack {
            version: snapshot.version,
            nonce: snapshot.nonce.clone(),
        }))
        .await;
    }
}

fn names(snapshot: &PolicySnapshot) -> Vec<String> {
    snapshot
        .resources
        .iter()
        .map(|r| format!("{}/{}", r.kind, r.name))
        .collect()
}

// === policies ===

fn backend(name: &str, endpoint: &str) -> String {
    format!(
        "apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {{name: {name}}}\nspec: {{endpoints: [\"{endpoint}\"]}}\n"
    )
}

fn route(name: &str, metadata: &str, spec: &str) -> String {
    format!(
        "apiVersion: infermesh.io/v1alpha1\nkind: ModelRoute\nmetadata: {{name: {name}{metadata}}}\nspec: {{{spec}}}\n"
    )
}

/// A backend `vllm` at `endpoint` and a mesh-wide route to it.
fn simple(endpoint: &str) -> String {
    [
        backend("vllm", endpoint),
        route("chat", "", "backends: [{backend: vllm}]"),
    ]
    .join("---\n")
}

/// Writes `text` over `path` in place, as `echo > file` does.
fn edit(path: &Path, text: &str) {
    std::fs::write(path, text).expect("edit policy");
}

// === tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_gets_the_current_snapshot_and_its_ack_shows_in_proxies() {
    let cp = ControlPlane::start(&[("policy.yaml", &simple("10.0.0.1:8000"))]);
    cp.wait_for("the first snapshot", |cp| cp.version().is_some());
    let version = cp.version().unwrap();
    assert_eq!(cp.get("/ready").0, 200);
    assert_eq!(cp.get("/live"), (200, "live\n".into()));

    let mut proxy = Proxy::connect(cp.grpc, hello("pod-1", "team-a", &[("app", "chat")], 0)).await;
    let snapshot = proxy.next().await;
    assert_eq!(snapshot.version, version);
    assert!(!snapshot.nonce.is_empty());
    assert_eq!(names(&snapshot), ["Backend/vllm", "ModelRoute/chat"]);
    let policy = infermesh_proto::policy::PolicySet::from_resources(&snapshot.resources)
        .expect("the snapshot decodes");
    assert_eq!(policy.backends[0].spec.endpoints, ["10.0.0.1:8000"]);

    proxy.ack(&snapshot).await;
    cp.wait_for("the ACK", |cp| {
        cp.proxy("pod-1")
            .is_some_and(|p| p["ackedVersion"].as_u64() == Some(version))
    });
    let entry = cp.proxy("pod-1").unwrap();
    assert_eq!(
        entry["identity"],
        "spiffe://cluster.local/ns/team-a/sa/pod-1"
    );
    assert_eq!(entry["namespace"], "team-a");
    assert_eq!(entry["labels"], serde_json::json!({"app": "chat"}));
    assert_eq!(entry["lastSent"]["version"].as_u64(), Some(version));
    assert_eq!(entry["lastSent"]["nonce"], snapshot.nonce.as_str());
    assert_eq!(entry["upToDate"], true);
    assert_eq!(entry["lastNack"], Value::Null);
    assert!(entry["connectedSince"].as_str().unwrap().ends_with('Z'));

    assert_eq!(
        cp.metric("infermesh_control_snapshot_version"),
        version as f64
    );
    assert_eq!(cp.metric("infermesh_control_connected_proxies"), 1.0);
    assert_eq!(cp.metric("infermesh_control_acks_total"), 1.0);
    assert_eq!(cp.metric("infermesh_control_publishes_total"), 1.0);

    drop(proxy);
    cp.wait_for("the proxy to leave", |cp| cp.proxy("pod-1").is_none());
    assert_eq!(cp.metric("infermesh_control_connected_proxies"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_shows_in_proxies_with_its_reason_and_the_acked_version_stays() {
    let cp = ControlPlane::start(&[("policy.yaml", &simple("10.0.0.1:8000"))]);
    let mut proxy = Proxy::connect(cp.grpc, hello("pod-1", "default", &[], 0)).await;
    let first = proxy.next().await;
    proxy.ack(&first).await;

    edit(&cp.path("policy.yaml"), &simple("10.0.0.2:8000"));
    let second = proxy.next().await;
    assert_eq!(second.version, first.version + 1);
    proxy
        .send(Message::Nack(Nack {
            version: second.version,
            nonce: second.nonce.clone(),
            error: "backend vllm: cannot resolve 10.0.0.2".into(),
        }))
        .await;
    cp.wait_for("the NACK", |cp| {
        cp.proxy("pod-1").is_some_and(|p| !p["lastNack"].is_null())
    });
    let entry = cp.proxy("pod-1").unwrap();
    assert_eq!(entry["lastNack"]["version"].as_u64(), Some(second.version));
    assert_eq!(
        entry["lastNack"]["error"],
        "backend vllm: cannot resolve 10.0.0.2"
    );
    assert_eq!(entry["ackedVersion"].as_u64(), Some(first.version));
    assert_eq!(entry["upToDate"], false);
    assert_eq!(cp.metric("infermesh_control_nacks_total"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_quoting_a_stale_nonce_are_ignored() {
    let cp = ControlPlane::start(&[("policy.yaml", &simple("10.0.0.1:8000"))]);
    let mut proxy = Proxy::connect(cp.grpc, hello("pod-1", "default", &[], 0)).await;
    let first = proxy.next().await;
    edit(&cp.path("policy.yaml"), &simple("10.0.0.2:8000"));
    let second = proxy.next().await;

    // Answers to the first push arrive after the second was sent.
    proxy.ack(&first).await;
    proxy
        .send(Message::Nack(Nack {
            version: first.version,
            nonce: first.nonce.clone(),
            error: "late".into(),
        }))
        .await;
    proxy
        .send(Message::Ack(Ack {
            version: second.version,
            nonce: "not-a-nonce-we-sent".into(),
        }))
        .await;
    cp.wait_for("three stale answers", |cp| {
        cp.metric("infermesh_control_stale_responses_total") == 3.0
    });
    let entry = cp.proxy("pod-1").unwrap();
    assert_eq!(entry["ackedVersion"], Value::Null);
    assert_eq!(entry["lastNack"], Value::Null);
    assert_eq!(cp.metric("infermesh_control_acks_total"), 0.0);

    proxy.ack(&second).await;
    cp.wait_for("the ACK of the latest nonce", |cp| {
        cp.proxy("pod-1")
            .is_some_and(|p| p["ackedVersion"].as_u64() == Some(second.version))
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_does_not_open_with_a_hello_is_refused() {
    let cp = ControlPlane::start(&[("policy.yaml", &simple("10.0.0.1:8000"))]);
    let status = match open(
        cp.grpc,
        Message::Ack(Ack {
            version: 1,
            nonce: "x".into(),
        }),
    )
    .await
    {
        Err(status) => status,
        Ok(mut proxy) => {
            match tokio::time::timeout(Duration::from_secs(5), proxy.inbound.message())
                .await
                .expect("an answer within 5s")
            {
                Err(status) => status,
                Ok(message) => panic!("expected INVALID_ARGUMENT, got {message:?}"),
            }
        }
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("Hello"), "{status:?}");
    assert!(cp.json("/proxies").as_array().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_receive_only_what_is_scoped_to_them() {
    let policy = [
        backend("shared", "10.0.0.1:80"),
        backend("team-a", "10.0.0.2:80"),
        backend("canary", "10.0.0.3:80"),
        route(
            "canary",
            "",
            "match: [{model: {exact: m}}], backends: [{backend: canary}], workloadSelector: {matchLabels: {track: canary}}",
        ),
        route(
            "team-a",
            ", namespace: team-a",
            "match: [{model: {exact: m}}], backends: [{backend: team-a}]",
        ),
        route("shared", "", "backends: [{backend: shared}]"),
    ]
    .join("---\n");
    let cp = ControlPlane::start(&[("policy.yaml", &policy)]);
    let mut a = Proxy::connect(cp.grpc, hello("a", "team-a", &[("app", "chat")], 0)).await;
    let mut b = Proxy::connect(
        cp.grpc,
        hello("b", "team-b", &[("app", "chat"), ("track", "canary")], 0),
    )
    .await;
    let (a1, b1) = (a.next().await, b.next().await);
    assert_eq!(a1.version, b1.version);
    assert_eq!(
        names(&a1),
        [
            "Backend/shared",
            "Backend/team-a",
            "ModelRoute/team-a",
            "ModelRoute/shared"
        ]
    );
    assert_eq!(
        names(&b1),
        [
            "Backend/shared",
            "Backend/canary",
            "ModelRoute/canary",
            "ModelRoute/shared"
        ]
    );
    a.ack(&a1).await;
    b.ack(&b1).await;

    // A change only team-a receives is pushed to team-a only.
    edit(
        &cp.path("policy.yaml"),
        &policy.replace("10.0.0.2:80", "10.0.0.9:80"),
    );
    let a2 = a.next().await;
    assert_eq!(a2.version, a1.version + 1);
    b.nothing_for(Duration::from_millis(500)).await;
    a.ack(&a2).await;
    cp.wait_for("both up to date", |cp| {
        ["a", "b"]
            .iter()
            .all(|id| cp.proxy(id).is_some_and(|p| p["upToDate"] == true))
    });
    let b_entry = cp.proxy("b").unwrap();
    assert_eq!(b_entry["ackedVersion"].as_u64(), Some(b1.version));
    assert_eq!(b_entry["checkedVersion"].as_u64(), Some(a2.version));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_reaches_proxies_within_a_second_however_the_file_is_saved() {
    let cp = ControlPlane::start(&[("policy.yaml", &simple("10.0.0.1:8000"))]);
    let mut proxy = Proxy::connect(cp.grpc, hello("pod-1", "default", &[], 0)).await;
    let mut version = proxy.next().await.version;

    type Save = fn(&Path, &str);
    let saves: [(&str, Save); 2] = [
        ("written in place", |path, text| edit(path, text)),
        ("renamed over", |path, text| {
            let temp = path.with_extension("yaml.tmp~");
            std::fs::write(&temp, text).expect("write temp");
            std::fs::rename(&temp, path).expect("rename");
        }),
    ];
    for (i, (how, save)) in saves.iter().enumerate() {
        let endpoint = format!("10.0.1.{i}:8000");
        let started = Instant::now();
        save(&cp.path("policy.yaml"), &simple(&endpoint));
        let snapshot = proxy.next().await;
        let took = started.elapsed();
        assert_eq!(snapshot.version, version + 1, "{how}");
        assert!(took < Duration::from_secs(1), "{how}: {took:?}");
        let set = infermesh_proto::policy::PolicySet::from_resources(&snapshot.resources).unwrap();
        assert_eq!(set.backends[0].spec.endpoints, [endpoint], "{how}");
        version = snapshot.version;
    }

    // An edit that changes no document (a comment) publishes nothing.
    edit(
        &cp.path("policy.yaml"),
        &format!("# reviewed\n{}", simple("10.0.1.1:8000")),
    );
    proxy.nothing_for(Duration::from_millis(500)).await;
    assert_eq!(cp.version(), Some(version));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_policy_file_is_followed_through_renames() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("mesh.yaml");
    std::fs::write(&file, simple("10.0.0.1:8000")).unwrap();
    let cp = ControlPlane::start_with(dir, &file);
    let mut proxy = Proxy::connect(cp.grpc, hello("pod-1", "default", &[], 0)).await;
    let mut version = proxy.next().await.version;
    for i in 2..4 {
        let started = Instant::now();
        let temp = file.with_extension("swp");
        std::fs::write(&temp, simple(&format!("10.0.0.{i}:8000"))).unwrap();
        std::fs::rename(&temp, &file).unwrap();
        let snapshot = proxy.next().await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(snapshot.version, version + 1);
        version = snapshot.version;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_configmap_update_is_followed() {
    // A mounted ConfigMap: `policy.yaml -> ..data/policy.yaml`, `..data`
    // a symlink to a timestamped directory that an update replaces.
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    std::fs::create_dir(root.join("..2024_01")).unwrap();
    std::fs::write(root.join("..2024_01/policy.yaml"), simple("10.0.0.1:8000")).unwrap();
    std::os::unix::fs::symlink("..2024_01", root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/policy.yaml", root.join("policy.yaml")).unwrap();
    let cp = ControlPlane::start_in(dir);
    let mut proxy = Proxy::connect(cp.grpc, hello("pod-1", "default", &[], 0)).await;
    let first = proxy.next().await;
    assert_eq!(names(&first), ["Backend/vllm", "ModelRoute/chat"]);

    let root = cp.dir.path();
    let started = Instant::now();
    std::fs::create_dir(root.join("..2024_02")).unwrap();
    std::fs::write(root.join("..2024_02/policy.yaml"), simple("10.0.0.2:8000")).unwrap();
    std::os::unix::fs::symlink("..2024_02", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(root.join("..2024_01")).unwrap();
    let second = proxy.next().await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(second.version, first.version + 1);
    let set = infermesh_proto::policy::PolicySet::from_resources(&second.resources).unwrap();
    assert_eq!(set.backends[0].spec.endpoints, ["10.0.0.2:8000"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_edit_publishes_nothing_and_policy_shows_why() {
    let cp = ControlPlane::start(&[("policy.yaml", &simple("10.0.0.1:8000"))]);
    let mut proxy = Proxy::connect(cp.grpc, hello("pod-1", "default", &[], 0)).await;
    let first = proxy.next().await;
    proxy.ack(&first).await;

    let broken = simple("10.0.0.2:8000").replace("backend: vllm", "backend: vlm");
    edit(&cp.path("policy.yaml"), &broken);
    cp.wait_for("the refusal", |cp| cp.json("/policy")["state"] == "refused");
    let policy = cp.json("/policy");
    assert_eq!(policy["version"].as_u64(), Some(first.version));
    let file = cp.path("policy.yaml").display().to_string();
    assert_eq!(
        policy["lastRefusal"]["errors"],
        serde_json::json!([{
            "file": file,
            "line": 9,
            "column": 29,
            "message": "unknown backend `vlm`: no Backend has this name; did you mean `vllm`?",
        }])
    );
    assert_eq!(cp.metric("infermesh_control_refused_changes_total"), 1.0);
    assert_eq!(cp.metric("infermesh_control_policy_refused"), 1.0);
    assert_eq!(
        cp.get("/ready").0,
        200,
        "the previous snapshot is still served"
    );
    proxy.nothing_for(Duration::from_millis(500)).await;

    edit(&cp.path("policy.yaml"), &simple("10.0.0.3:8000"));
    let fixed = proxy.next().await;
    assert_eq!(fixed.version, first.version + 1);
    assert_eq!(cp.json("/policy")["state"], "serving");
    assert_eq!(cp.metric("infermesh_control_policy_refused"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_policy_at_start_serves_nothing_until_it_is_fixed() {
    let broken = simple("10.0.0.1").to_string();
    let cp = ControlPlane::start(&[("policy.yaml", &broken)]);
    cp.wait_for("the refusal", |cp| {
        !cp.json("/policy")["lastRefusal"].is_null()
    });
    let policy = cp.json("/policy");
    assert_eq!(policy["state"], "waiting");
    assert_eq!(policy["version"], Value::Null);
    assert_eq!(
        policy["lastRefusal"]["errors"][0]["message"],
        "endpoint `10.0.0.1` has no port: write `10.0.0.1:PORT`"
    );
    let (status, body) = cp.get("/ready");
    assert_eq!(status, 503, "{body}");

    let mut proxy = Proxy::connect(cp.grpc, hello("pod-1", "default", &[], 0)).await;
    proxy.nothing_for(Duration::from_millis(300)).await;
    assert!(cp.proxy("pod-1").is_some(), "connected, waiting");

    edit(&cp.path("policy.yaml"), &simple("10.0.0.1:8000"));
    let snapshot = proxy.next().await;
    assert_eq!(names(&snapshot), ["Backend/vllm", "ModelRoute/chat"]);
    assert_eq!(cp.get("/ready").0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_proxy_stating_its_version_gets_the_current_one() {
    let cp = ControlPlane::start(&[("policy.yaml", &simple("10.0.0.1:8000"))]);
    let mut proxy = Proxy::connect(cp.grpc, hello("pod-1", "default", &[], 0)).await;
    let first = proxy.next().await;
    proxy.ack(&first).await;
    drop(proxy);
    cp.wait_for("the proxy to leave", |cp| cp.proxy("pod-1").is_none());

    edit(&cp.path("policy.yaml"), &simple("10.0.0.2:8000"));
    cp.wait_for("the new version", |cp| {
        cp.version() == Some(first.version + 1)
    });

    let mut proxy = Proxy::connect(cp.grpc, hello("pod-1", "default", &[], first.version)).await;
    let current = proxy.next().await;
    assert_eq!(current.version, first.version + 1);
    assert_ne!(current.nonce, first.nonce);
    proxy.ack(&current).await;
    cp.wait_for("the ACK", |cp| {
        cp.proxy("pod-1")
            .is_some_and(|p| p["ackedVersion"].as_u64() == Some(current.version))
    });
    assert_eq!(
        cp.proxy("pod-1").unwrap()["helloVersion"].as_u64(),
        Some(first.version)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_the_streams_and_exits_zero_promptly() {
    let mut cp = ControlPlane::start(&[("policy.yaml", &simple("10.0.0.1:8000"))]);
    let mut proxy = Proxy::connect(cp.grpc, hello("pod-1", "default", &[], 0)).await;
    proxy.next().await;
    let started = Instant::now();
    cp.sigterm();
    let ended = tokio::time::timeout(Duration::from_secs(5), proxy.inbound.message())
        .await
        .expect("the stream ends");
    assert!(!matches!(ended, Ok(Some(_))), "{ended:?}");
    let status = loop {
        if let Some(status) = cp.child.try_wait().expect("wait") {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "still running");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_busy_port_fails_start_up_with_the_reason() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_infermesh-control"))
        .args(["serve", "--policies", "/nonexistent", "--listen"])
        .arg(taken.local_addr().unwrap().to_string())
        .args(["--admin", "127.0.0.1:0"])
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot bind the policy server on"),
        "{stderr}"
    );
}

// === where the policy stream listens ===

/// What one `serve` run showed: its `listening` line (when it got that
/// far), its stderr, and its exit status when it stopped on its own.
struct Run {
    listening: Option<String>,
    stderr: String,
    exit: Option<std::process::ExitStatus>,
}

/// Runs `serve ARGS` until it prints its `listening` line or exits, lets
/// it log for a moment, and stops it.
fn run_serve(args: &[&str]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_infermesh-control"))
        .arg("serve")
        .args(args)
        .env("INFERMESH_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("infermesh-control starts");
    let mut stderr_pipe = child.stderr.take().expect("stderr");
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr_pipe.read_to_string(&mut text);
        text
    });
    let mut line = String::new();
    let read = BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line);
    let listening = match read {
        Ok(n) if n > 0 => Some(line.trim_end().to_owned()),
        _ => None,
    };
    let exit = if listening.is_some() {
        std::thread::sleep(Duration::from_millis(300));
        let _ = child.kill();
        let _ = child.wait();
        None
    } else {
        Some(child.wait().expect("wait"))
    };
    Run {
        listening,
        stderr: stderr.join().expect("stderr reader"),
        exit,
    }
}

fn policy_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("p.yaml"), simple("127.0.0.1:1")).expect("write policy");
    dir
}

/// Asserts that `run` listened on `expected`, or failed to bind exactly
/// that address (the default port may be taken on a shared machine).
fn assert_default_address(run: &Run, expected: &str) {
    match &run.listening {
        Some(line) => assert!(
            line.starts_with(&format!("listening grpc={expected} ")),
            "{line}\n{}",
            run.stderr
        ),
        None => assert!(
            run.stderr
                .contains(&format!("cannot bind the policy server on {expected}:")),
            "{}",
            run.stderr
        ),
    }
}

#[test]
fn without_a_ca_the_policy_stream_listens_on_loopback_by_default() {
    let dir = policy_dir();
    let policies = dir.path().to_str().unwrap();
    let run = run_serve(&["--policies", policies, "--admin", "127.0.0.1:0"]);
    assert_default_address(&run, "127.0.0.1:8080");
    assert!(!run.stderr.contains("INSECURE"), "{}", run.stderr);
}

#[test]
fn without_a_ca_another_address_is_refused_unless_acknowledged_and_then_warned_about() {
    let dir = policy_dir();
    let policies = dir.path().to_str().unwrap();
    for addr in ["0.0.0.0:0", "[::]:0"] {
        let run = run_serve(&[
            "--policies",
            policies,
            "--listen",
            addr,
            "--admin",
            "127.0.0.1:0",
        ]);
        assert_eq!(run.listening, None, "{}", run.stderr);
        assert_eq!(run.exit.and_then(|e| e.code()), Some(2), "{}", run.stderr);
        for needle in [
            "without a CA",
            "unauthenticated",
            "--ca-dir",
            "--insecure-listen",
        ] {
            assert!(run.stderr.contains(needle), "{needle}: {}", run.stderr);
        }
    }
    let run = run_serve(&[
        "--policies",
        policies,
        "--listen",
        "0.0.0.0:0",
        "--insecure-listen",
        "--admin",
        "127.0.0.1:0",
    ]);
    let line = run.listening.expect("it starts when told to");
    assert!(line.starts_with("listening grpc=0.0.0.0:"), "{line}");
    assert!(
        run.stderr.contains("INSECURE") && run.stderr.contains("any client that names a namespace"),
        "{}",
        run.stderr
    );
}

#[test]
fn with_a_ca_every_interface_is_the_default_and_the_ca_directory_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = policy_dir();
    let state = tempfile::tempdir().expect("temp dir");
    let tokens = state.path().join("tokens");
    std::fs::write(&tokens, "apps/web a-token-of-32-characters-or-so-0001\n").unwrap();
    let ca = state.path().join("ca");
    let args = |listen: Option<&str>| {
        let mut args = vec![
            "--policies".to_string(),
            dir.path().display().to_string(),
            "--admin".into(),
            "127.0.0.1:0".into(),
            "--ca-dir".into(),
            ca.display().to_string(),
            "--bootstrap-tokens".into(),
            tokens.display().to_string(),
            "--webhook-listen".into(),
            "127.0.0.1:0".into(),
        ];
        if let Some(listen) = listen {
            args.extend(["--listen".to_string(), listen.to_string()]);
        }
        args
    };
    let run = run_serve(&args(None).iter().map(String::as_str).collect::<Vec<_>>());
    assert_default_address(&run, "0.0.0.0:8080");
    let run = run_serve(
        &args(Some("0.0.0.0:0"))
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let line = run.listening.unwrap_or_else(|| panic!("{}", run.stderr));
    assert!(line.starts_with("listening grpc=0.0.0.0:"), "{line}");
    assert!(!run.stderr.contains("INSECURE"), "{}", run.stderr);
    let mode = std::fs::metadata(&ca).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the generated CA directory is {mode:o}");

    // A key someone made world-readable stops the start, naming the fix.
    let key = ca.join("ca.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let run = run_serve(
        &args(Some("127.0.0.1:0"))
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(run.listening, None);
    assert_eq!(run.exit.and_then(|e| e.code()), Some(1), "{}", run.stderr);
    assert!(
        run.stderr
            .contains(&format!("{}: the private key is open", key.display()))
            && run.stderr.contains("chmod 600"),
        "{}",
        run.stderr
    );
}
