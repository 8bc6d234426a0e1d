//! Identity bootstrap in a cluster: proxies started as the injector starts
//! them (`POD_NAMESPACE`/`POD_SERVICE_ACCOUNT` from the downward API, the
//! projected token file) present their service-account tokens, and
//! `infermesh-control serve --kubernetes` verifies each with a TokenReview
//! against the test API server (`KubeApi`) before it signs a certificate
//! for exactly that namespace and service account. Refusals reach the
//! proxy's `/ready` with their gRPC code; bootstrap tokens keep working
//! beside the cluster; an API server that is down or silent makes the
//! request UNAVAILABLE, and the control plane keeps serving.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use infermesh_tests::kube_api::KubeApi;
use infermesh_tests::mesh::{token_for, wait_ready, Mesh, Workload};
use infermesh_tests::{HttpClient, Metrics, ProxyBuilder, ProxyProcess};

const CHAT: &str = "spiffe://cluster.local/ns/ml/sa/chat";
const GATEWAY: &str = "spiffe://cluster.local/ns/edge/sa/gateway";
const REVIEWS: &str = "POST /apis/authentication.k8s.io/v1/tokenreviews";

/// Projected tokens are JWTs; the test API server only matches the string.
const CHAT_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.ml-chat-projected.c2lnbmF0dXJl";
const OTHER_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.ml-other-projected.c2lnbmF0dXJl";
const API_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.ml-chat-for-the-api.c2lnbmF0dXJl";
const UNKNOWN_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.issued-by-no-cluster.c2lnbmF0dXJl";

const POLICY: &[(&str, &str)] = &[(
    "mesh.yaml",
    "apiVersion: infermesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {}\n",
)];

/// The control plane as CA with `--kubernetes --kubeconfig FILE`.
fn cluster_mesh(kubeconfig: &Path, lifetime: &str, bootstrap: Option<&[Workload<'_>]>) -> Mesh {
    Mesh::start_with(
        POLICY,
        lifetime,
        bootstrap,
        &[
            "--kubernetes",
            "--kubeconfig",
            kubeconfig.to_str().expect("UTF-8 path"),
        ],
    )
}

/// A proxy with the arguments and environment the injector gives the
/// sidecar; its identity comes from `POD_NAMESPACE`/`POD_SERVICE_ACCOUNT`.
fn pod_proxy(mesh: &Mesh, ns: &str, sa: &str, token_file: &Path) -> ProxyBuilder {
    ProxyProcess::builder()
        .no_config()
        .arg("--control-plane")
        .arg(&mesh.url())
        .arg("--identity-token-file")
        .arg(token_file.to_str().expect("UTF-8 path"))
        .arg("--trust-bundle")
        .arg(mesh.ca_cert().to_str().expect("UTF-8 path"))
        .env("POD_NAME", &format!("{sa}-7f9c-x2"))
        .env("POD_NAMESPACE", ns)
        .env("POD_SERVICE_ACCOUNT", sa)
}

/// The URI SAN of the certificate the proxy serves on `inbound`, as
/// `openssl s_client` receives it.
fn served_identity(inbound: SocketAddr) -> String {
    let hello = Command::new("openssl")
        .args(["s_client", "-connect", &inbound.to_string(), "-tls1_3"])
        .stdin(Stdio::null())
        .output()
        .expect("openssl is installed (scripts/setup.sh installs it)");
    let mut x509 = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl runs");
    {
        use std::io::Write;
        x509.stdin
            .take()
            .expect("stdin")
            .write_all(&hello.stdout)
            .expect("write to openssl");
    }
    let out = x509.wait_with_output().expect("openssl x509");
    let text = String::from_utf8_lossy(&out.stdout);
    let sans: Vec<&str> = text
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter_map(|w| w.strip_prefix("URI:"))
        .collect();
    assert_eq!(
        sans.len(),
        1,
        "one URI SAN expected: {text}\n{}",
        String::from_utf8_lossy(&hello.stdout)
    );
    sans[0].to_string()
}

/// Waits until the proxy's `/ready` says every one of `parts` (the CA's
/// refusal, with its gRPC code), staying 503 meanwhile; returns the text.
async fn refused(proxy: &ProxyProcess, parts: &[&str]) -> String {
    let http = HttpClient::http1();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reply = http.get(&format!("{}/ready", proxy.admin_url())).await;
        assert_eq!(reply.status, 503, "became ready: {}", reply.text());
        let text = reply.text();
        if parts.iter().all(|p| text.contains(p)) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "/ready never said {parts:?}; it says: {text}\n--- stderr\n{}",
            proxy.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn metrics(mesh: &Mesh) -> Metrics {
    Metrics::parse(
        &HttpClient::http1()
            .get(&format!("{}/metrics", mesh.control.admin_url()))
            .await
            .text(),
    )
}

async fn identity(proxy: &ProxyProcess) -> serde_json::Value {
    HttpClient::http1()
        .get(&format!("{}/config", proxy.admin_url()))
        .await
        .json()["identity"]
        .clone()
}

fn reviews(api: &KubeApi) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.starts_with(REVIEWS))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_service_account_token_yields_exactly_its_spiffe_id() {
    let api = KubeApi::start();
    api.add_token(CHAT_TOKEN, "ml", "chat", &["infermesh"]);
    api.add_token(OTHER_TOKEN, "ml", "other", &["infermesh"]);
    api.add_token(API_TOKEN, "ml", "chat", &["api"]);
    // A bootstrap token file beside the cluster, for a proxy outside it.
    let mesh = cluster_mesh(&api.kubeconfig(), "1h", Some(&[("edge", "gateway")]));

    let chat = pod_proxy(&mesh, "ml", "chat", &mesh.token_file("chat", CHAT_TOKEN)).start();
    let gateway = mesh.proxy("edge", "gateway").start();
    // ml/chat's pod spec, with another service account's token mounted.
    let stolen = pod_proxy(&mesh, "ml", "chat", &mesh.token_file("other", OTHER_TOKEN)).start();
    // A token of ml/chat, but for the API server's audience, not infermesh.
    let api_only = pod_proxy(&mesh, "ml", "chat", &mesh.token_file("api", API_TOKEN)).start();
    let unknown = pod_proxy(
        &mesh,
        "ml",
        "chat",
        &mesh.token_file("unknown", UNKNOWN_TOKEN),
    )
    .start();

    wait_ready(&chat, Duration::from_secs(20)).await;
    wait_ready(&gateway, Duration::from_secs(20)).await;
    // The certificates they serve name exactly their identities.
    assert_eq!(served_identity(chat.inbound), CHAT);
    assert_eq!(served_identity(gateway.inbound), GATEWAY);
    assert_eq!(identity(&chat).await["certified"], true);

    refused(
        &stolen,
        &[
            "PermissionDenied",
            "the service-account token is bound to spiffe://cluster.local/ns/ml/sa/other, not to spiffe://cluster.local/ns/ml/sa/chat",
        ],
    )
    .await;
    refused(
        &api_only,
        &["Unauthenticated", "invalid for the target audiences"],
    )
    .await;
    let text = refused(
        &unknown,
        &[
            "Unauthenticated",
            "the Kubernetes API server does not authenticate the token",
        ],
    )
    .await;
    assert!(!text.contains(UNKNOWN_TOKEN), "{text}");

    // The reviews went to the API server's TokenReview endpoint.
    assert!(reviews(&api) >= 4, "{:?}", api.requests());
    let m = metrics(&mesh).await;
    assert_eq!(
        m.sum("infermesh_control_certificates_issued_total", &[]),
        2.0
    );
    // chat's and other's tokens, each reviewed once: other's proxy retries
    // from the cache of positive reviews.
    assert_eq!(
        m.sum(
            "infermesh_control_token_reviews_total",
            &[("outcome", "authenticated")]
        ),
        2.0
    );
    assert!(
        m.sum(
            "infermesh_control_certificate_refusals_total",
            &[("reason", "identity_mismatch")]
        ) >= 1.0
    );
    let not_for_us = m.sum(
        "infermesh_control_certificate_refusals_total",
        &[("reason", "token_not_authenticated")],
    ) + m.sum(
        "infermesh_control_certificate_refusals_total",
        &[("reason", "token_wrong_audience")],
    );
    assert!(not_for_us >= 2.0, "{not_for_us}");

    // Each refusal is logged with the identity asked for; no token is.
    let log = mesh.control.stderr();
    assert!(
        log.lines()
            .any(|l| l.contains("certificate request refused") && l.contains(CHAT)),
        "{log}"
    );
    for proxy in [&chat, &gateway, &stolen, &api_only, &unknown] {
        for token in [
            CHAT_TOKEN,
            OTHER_TOKEN,
            API_TOKEN,
            UNKNOWN_TOKEN,
            token_for("edge", "gateway").as_str(),
        ] {
            assert!(!proxy.stderr().contains(token));
            assert!(!log.contains(token), "a token in the control plane's log");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_reuse_a_review_and_a_rotated_or_newly_valid_token_is_taken_at_once() {
    let api = KubeApi::start();
    api.add_token(CHAT_TOKEN, "ml", "chat", &["infermesh"]);
    // No bootstrap token file at all: the cluster vouches for every proxy.
    let mesh = cluster_mesh(&api.kubeconfig(), "2s", None);
    let chat = pod_proxy(&mesh, "ml", "chat", &mesh.token_file("chat", CHAT_TOKEN)).start();
    wait_ready(&chat, Duration::from_secs(20)).await;
    assert_eq!(served_identity(chat.inbound), CHAT);

    // Certificates of 2s, renewed at about 70%: several renewals, one review.
    let deadline = Instant::now() + Duration::from_secs(30);
    while identity(&chat).await["certificatesObtained"]
        .as_u64()
        .unwrap_or(0)
        < 4
    {
        assert!(Instant::now() < deadline, "{}", identity(&chat).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(reviews(&api), 1, "{:?}", api.requests());
    let m = metrics(&mesh).await;
    assert!(m.sum("infermesh_control_token_review_cache_hits_total", &[]) >= 3.0);

    // The kubelet rotates the projected token in place: the proxy reads
    // the file again on its next attempt. Here the pod starts with a token
    // the cluster refuses, and the file then gets a valid one.
    let rotating = mesh.token_file("rotating", UNKNOWN_TOKEN);
    let batch = pod_proxy(&mesh, "ml", "batch", &rotating).start();
    refused(&batch, &["Unauthenticated"]).await;
    let rotated = "eyJhbGciOiJSUzI1NiJ9.ml-batch-rotated.c2lnbmF0dXJl";
    api.add_token(rotated, "ml", "batch", &["infermesh"]);
    mesh.token_file("rotating", rotated);
    wait_ready(&batch, Duration::from_secs(30)).await;
    assert_eq!(
        served_identity(batch.inbound),
        "spiffe://cluster.local/ns/ml/sa/batch"
    );

    // A refusal is not remembered: a token the cluster learns of after
    // refusing it works on the proxy's next attempt.
    let late_token = "eyJhbGciOiJSUzI1NiJ9.ml-late-bound.c2lnbmF0dXJl";
    let late = pod_proxy(&mesh, "ml", "late", &mesh.token_file("late", late_token)).start();
    refused(&late, &["Unauthenticated"]).await;
    api.add_token(late_token, "ml", "late", &["infermesh"]);
    wait_ready(&late, Duration::from_secs(30)).await;
    assert_eq!(
        served_identity(late.inbound),
        "spiffe://cluster.local/ns/ml/sa/late"
    );
}

/// A kubeconfig naming `server` (nothing valid answers there).
fn kubeconfig_for(dir: &Path, server: &str) -> std::path::PathBuf {
    let path = dir.join(format!("kubeconfig-{}", server.replace([':', '/'], "_")));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
             clusters: [{{name: c, cluster: {{server: \"{server}\", insecure-skip-tls-verify: true}}}}]\n\
             users: [{{name: u, user: {{token: control-plane-token}}}}]\n\
             contexts: [{{name: c, context: {{cluster: c, user: u}}}}]\n"
        ),
    )
    .expect("write a kubeconfig");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_down_or_silent_makes_requests_unavailable_and_the_ca_serves_on() {
    let scratch = tempfile::tempdir().expect("temp dir");
    // Down: a port nothing listens on.
    let down = infermesh_tests::free_addr();
    // Silent: accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let _held = std::thread::spawn(move || {
        let mut open = Vec::new();
        for stream in silent.incoming().flatten() {
            open.push(stream);
        }
    });

    for (server, reason) in [
        (
            format!("https://{down}"),
            "the Kubernetes API server cannot review the token",
        ),
        (
            format!("https://{silent_addr}"),
            "the Kubernetes API server did not review the token within",
        ),
    ] {
        let kubeconfig = kubeconfig_for(scratch.path(), &server);
        let mesh = cluster_mesh(&kubeconfig, "1h", Some(&[("edge", "gateway")]));
        let chat = pod_proxy(&mesh, "ml", "chat", &mesh.token_file("chat", CHAT_TOKEN)).start();
        let gateway = mesh.proxy("edge", "gateway").start();
        refused(&chat, &["Unavailable", reason]).await;
        // The CA still signs for bootstrap tokens, and stays up.
        wait_ready(&gateway, Duration::from_secs(20)).await;
        assert_eq!(served_identity(gateway.inbound), GATEWAY);
        let live = HttpClient::http1()
            .get(&format!("{}/live", mesh.control.admin_url()))
            .await;
        assert_eq!(live.status, 200);
        let m = metrics(&mesh).await;
        assert!(
            m.sum(
                "infermesh_control_certificate_refusals_total",
                &[("reason", "kubernetes_unavailable")]
            ) >= 1.0
        );
        assert!(
            m.sum(
                "infermesh_control_token_reviews_total",
                &[("outcome", "kubernetes_unavailable")]
            ) >= 1.0
        );
    }
}
