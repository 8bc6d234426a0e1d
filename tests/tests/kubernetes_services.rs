//! Backends that name a Kubernetes Service: the real `infermesh-control
//! serve --kubernetes` reads Services and EndpointSlices from the fixture
//! API server (`KubeApi`, the real list/watch protocol over HTTPS), a real
//! proxy follows it, and real requests reach the model servers the
//! EndpointSlice lists. The servers listen on 127.0.0.1, .2 and .3 with one
//! port, as pods with their own IPs would.

use std::collections::BTreeSet;

use std::net::SocketAddr;
use std::time::Duration;

use infermesh_tests::client::chat_body;
use infermesh_tests::control_plane::control_binary;
use infermesh_tests::eventually;
use infermesh_tests::openai::OpenAiSettings;
use infermesh_tests::{
    policy, ControlPlaneProcess, HttpClient, KubeApi, Metrics, OpenAiServer, ProxyProcess, Reply,
};
use serde_json::{json, Value};

const MODEL: &str = "chat-model";
/// Room for a loaded machine; the control plane's own delay is ~50 ms.
const MOVE: Duration = Duration::from_secs(10);

/// The Backend naming Service `ml/chat` by its port name, and a route to it.
fn policy_files() -> Vec<(&'static str, String)> {
    vec![
        (
            "backends.yaml",
            "apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {name: chat}\n\
             spec:\n  service: {name: chat, namespace: ml, port: http}\n  balancer: round-robin\n"
                .to_string(),
        ),
        (
            "routes.yaml",
            policy::route(
                "chat",
                &format!("match:\n  - model: {{exact: {MODEL}}}\nbackends:\n  - backend: chat\n"),
            ),
        ),
    ]
}

fn service(port: u16) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "chat", "namespace": "ml"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10"],
            "selector": {"app": "chat"},
            "ports": [{"name": "http", "port": 80, "targetPort": port, "protocol": "TCP"}],
        },
    })
}

/// The Service's one EndpointSlice: `(ip, ready)` on `port`.
fn slice(port: u16, endpoints: &[(&str, bool)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, ready)| {
            json!({
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": "chat-x7k2p", "namespace": "ml",
            "labels": {"kubernetes.io/service-name": "chat"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// Three model servers, one per "pod IP", on one port.
fn servers() -> (OpenAiServer, OpenAiServer, OpenAiServer) {
    let a = OpenAiServer::start("a");
    let port = a.addr().port();
    let on = |ip: [u8; 4], name: &str| {
        OpenAiServer::bind(
            SocketAddr::from((ip, port)),
            name,
            OpenAiSettings::default(),
        )
        .unwrap_or_else(|e| panic!("bind {ip:?}:{port}: {e}"))
    };
    let b = on([127, 0, 0, 2], "b");
    let c = on([127, 0, 0, 3], "c");
    (a, b, c)
}

fn follower(control_plane: &ControlPlaneProcess, id: &str) -> ProxyProcess {
    ProxyProcess::builder()
        .no_config()
        .arg("--control-plane")
        .arg(&control_plane.url())
        .arg("--proxy-id")
        .arg(id)
        .start()
}

async fn chat(client: &HttpClient, proxy: &ProxyProcess) -> Reply {
    client
        .post_json(
            &format!("{}/v1/chat/completions", proxy.url()),
            &chat_body(MODEL, false),
        )
        .await
}

/// The upstreams that answer six requests in a row (round robin over at
/// most three endpoints visits each), or `None` when one fails.
async fn answering(client: &HttpClient, proxy: &ProxyProcess) -> Option<BTreeSet<String>> {
    let mut seen = BTreeSet::new();
    for _ in 0..6 {
        let reply = chat(client, proxy).await;
        if reply.status != 200 {
            return None;
        }
        seen.insert(reply.upstream()?.to_string());
    }
    Some(seen)
}

/// Waits until exactly `names` answer; returns how long that took.
async fn wait_answering(client: &HttpClient, proxy: &ProxyProcess, names: &[&str]) -> Duration {
    let want: BTreeSet<String> = names.iter().map(|n| n.to_string()).collect();
    eventually(
        &format!("traffic reaches exactly {names:?}"),
        MOVE,
        || async { (answering(client, proxy).await.as_ref() == Some(&want)).then_some(()) },
    )
    .await
    .1
}

/// The control plane's `/policy` entry for the Backend `chat`.
async fn resolved(control_plane: &ControlPlaneProcess) -> Value {
    let policy = control_plane.policy().await;
    policy["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["backend"] == "chat"))
        .cloned()
        .unwrap_or_else(|| panic!("no service status for backend chat in /policy: {policy:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_follows_the_endpoint_slices_of_a_backends_service() {
    let (a, b, c) = servers();
    let port = a.addr().port();
    let api = KubeApi::start();
    api.apply(service(port));
    api.apply(slice(port, &[("127.0.0.1", true), ("127.0.0.2", true)]));
    let kubeconfig = api.kubeconfig();
    let files = policy_files();
    let files: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let control_plane = ControlPlaneProcess::start_with(
        &files,
        &["--kubernetes", "--kubeconfig", kubeconfig.to_str().unwrap()],
    );
    let proxy = follower(&control_plane, "services");
    let client = HttpClient::http1();

    // The slice's two ready endpoints, and nothing else.
    wait_answering(&client, &proxy, &["a", "b"]).await;
    assert_eq!(c.request_count(), 0);
    let status = resolved(&control_plane).await;
    assert_eq!(status["service"], "ml/chat");
    assert_eq!(status["port"], "http");
    assert_eq!(
        status["endpoints"],
        json!([format!("127.0.0.1:{port}"), format!("127.0.0.2:{port}")])
    );
    assert_eq!(status["addresses"], json!(["10.96.0.10:80"]));
    // The proxy received the endpoints and the cluster IP as an address,
    // not the reference.
    let config = HttpClient::http1()
        .get(&format!("{}/config", proxy.admin_url()))
        .await
        .json();
    let text = config.to_string();
    assert!(text.contains(&format!("127.0.0.2:{port}")), "{config:#}");
    assert!(text.contains("10.96.0.10:80"), "{config:#}");
    assert!(!text.contains("\"service\""), "{config:#}");

    // An endpoint replaced (a pod rolled): traffic moves.
    api.apply(slice(port, &[("127.0.0.1", true), ("127.0.0.3", true)]));
    let took = wait_answering(&client, &proxy, &["a", "c"]).await;
    eprintln!("endpoint replaced: traffic moved within {took:?}");

    // One endpoint not ready: it gets nothing.
    api.apply(slice(port, &[("127.0.0.1", false), ("127.0.0.3", true)]));
    let took = wait_answering(&client, &proxy, &["c"]).await;
    eprintln!("endpoint not ready: traffic moved within {took:?}");

    // Every watch connection dropped: the control plane watches again from
    // where it was and still sees changes.
    let watches_before = api
        .requests()
        .iter()
        .filter(|r| r.contains("watch=true") || r.contains("watch=1"))
        .count();
    api.drop_watches();
    api.apply(slice(port, &[("127.0.0.2", true), ("127.0.0.3", true)]));
    wait_answering(&client, &proxy, &["b", "c"]).await;
    let watches_after = api
        .requests()
        .iter()
        .filter(|r| r.contains("watch=true") || r.contains("watch=1"))
        .count();
    assert!(
        watches_after > watches_before,
        "no new watch after the drop: {:?}",
        api.requests()
    );

    // History compacted and the watches dropped: a watch from a
    // resourceVersion older than the compaction (the Services', unchanged
    // since the start) gets 410 Gone, the control plane lists again, and
    // changes made after that are seen.
    let lists = |api: &KubeApi| {
        api.requests()
            .iter()
            .filter(|r| r.starts_with("GET /api/v1/services?") && !r.contains("watch="))
            .count()
    };
    let lists_before = lists(&api);
    api.compact();
    api.drop_watches();
    let mut moved = service(port);
    moved["spec"]["clusterIP"] = json!("10.96.0.20");
    moved["spec"]["clusterIPs"] = json!(["10.96.0.20"]);
    api.apply(moved);
    api.apply(slice(port, &[("127.0.0.1", true)]));
    wait_answering(&client, &proxy, &["a"]).await;
    eventually("the new cluster IP in /policy", MOVE, || async {
        (resolved(&control_plane).await["addresses"] == json!(["10.96.0.20:80"])).then_some(())
    })
    .await;
    assert!(
        lists(&api) > lists_before,
        "no re-list after 410 Gone: {:?}",
        api.requests()
    );

    // No ready endpoint: 503 with the reason, and the control plane says so.
    api.apply(slice(port, &[("127.0.0.1", false), ("127.0.0.2", false)]));
    let (reply, _) = eventually("requests get 503", MOVE, || async {
        let reply = chat(&client, &proxy).await;
        (reply.status == 503).then_some(reply)
    })
    .await;
    let message = reply.assert_proxy_error(503, "no_endpoint");
    assert!(message.contains("chat"), "{message}");
    let status = resolved(&control_plane).await;
    assert_eq!(status["endpoints"], json!([]));
    let problem = status["problem"].as_str().unwrap_or_default().to_string();
    assert!(problem.contains("no ready endpoint"), "{status:#}");
    let metrics = Metrics::parse(
        &HttpClient::http1()
            .get(&format!("{}/metrics", control_plane.admin_url()))
            .await
            .text(),
    );
    let unresolved = metrics
        .find("infermesh_control_backends_without_endpoints", &[])
        .next()
        .map(|s| s.value);
    assert_eq!(unresolved, Some(1.0));
    assert!(
        control_plane.stderr().contains("no ready endpoint"),
        "{}",
        control_plane.stderr()
    );

    // Ready again, then the Service deleted: 503 again, "no Service".
    api.apply(slice(port, &[("127.0.0.3", true)]));
    wait_answering(&client, &proxy, &["c"]).await;
    assert!(api.delete("v1", "Service", Some("ml"), "chat"));
    eventually(
        "requests get 503 once the Service is gone",
        MOVE,
        || async { (chat(&client, &proxy).await.status == 503).then_some(()) },
    )
    .await;
    let status = resolved(&control_plane).await;
    assert!(
        status["problem"]
            .as_str()
            .is_some_and(|p| p.contains("no Service ml/chat")),
        "{status:#}"
    );
    drop((a, b, c));
}

#[tokio::test]
async fn an_unchanged_resolution_publishes_no_new_version() {
    let (a, _b, _c) = servers();
    let port = a.addr().port();
    let api = KubeApi::start();
    api.apply(service(port));
    api.apply(slice(port, &[("127.0.0.1", true)]));
    let kubeconfig = api.kubeconfig();
    let files = policy_files();
    let files: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let control_plane = ControlPlaneProcess::start_with(
        &files,
        &["--kubernetes", "--kubeconfig", kubeconfig.to_str().unwrap()],
    );
    let (version, _) = eventually("a snapshot is published", MOVE, || async {
        control_plane.policy().await["version"].as_u64()
    })
    .await;
    // Objects rewritten with the same endpoints (a label, another Service):
    // events arrive, the resolution is the same, nothing is published.
    let mut same = slice(port, &[("127.0.0.1", true)]);
    same["metadata"]["labels"]["team"] = json!("ml");
    api.apply(same);
    api.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "other", "namespace": "ml"},
        "spec": {"clusterIP": "10.96.0.11", "ports": [{"port": 80}]},
    }));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        control_plane.policy().await["version"].as_u64(),
        Some(version)
    );
    // A real change is a new version.
    api.apply(slice(port, &[("127.0.0.1", true), ("127.0.0.2", true)]));
    eventually("a new version", MOVE, || async {
        (control_plane.policy().await["version"].as_u64() == Some(version + 1)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn without_kubernetes_a_service_reference_is_refused_with_the_reason() {
    let files = policy_files();
    let files: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let control_plane = ControlPlaneProcess::start(&files);
    let (refusal, _) = eventually("the policy is refused", MOVE, || async {
        let policy = control_plane.policy().await;
        policy["lastRefusal"].is_object().then_some(policy)
    })
    .await;
    assert_eq!(refusal["state"], "waiting", "{refusal:#}");
    assert!(refusal["version"].is_null(), "{refusal:#}");
    let message = refusal["lastRefusal"]["errors"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(message.contains("Backend `chat`"), "{message}");
    assert!(message.contains("--kubernetes"), "{message}");

    // `validate` takes it: it is valid policy.
    let output = std::process::Command::new(control_binary())
        .arg("validate")
        .arg(control_plane.policy_dir())
        .output()
        .expect("run infermesh-control validate");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn a_proxy_refuses_a_local_policy_that_names_a_service() {
    let files = policy_files();
    let exit = ProxyProcess::builder()
        .file("backends.yaml", &files[0].1)
        .file("routes.yaml", &files[1].1)
        .config_dir()
        .run_to_exit(Duration::from_secs(15));
    assert_eq!(exit.status.code(), Some(2), "{}", exit.stderr);
    assert!(exit.stderr.contains("Service"), "{}", exit.stderr);
    assert!(exit.stderr.contains("--kubernetes"), "{}", exit.stderr);
}
