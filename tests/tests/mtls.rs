//! Mesh identity end to end: the control plane as CA, proxies that obtain
//! and renew SPIFFE certificates, mutual TLS between an outbound and an
//! inbound sidecar, real TLS peers (`curl`, `openssl s_client`) refused for
//! each bad certificate with a log line saying why, authorization by caller
//! identity per model and gRPC method, and rotation under steady traffic.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use infermesh_tests::client::json_request;
use infermesh_tests::kserve::{grpc_client, infer_request};
use infermesh_tests::mesh::{curl, meshed_client_policy, token_for, wait_ready, Mesh, San};
use infermesh_tests::{HttpClient, KServeGrpcServer, Metrics, OpenAiServer, ProxyProcess};

const SERVER: &str = "spiffe://cluster.local/ns/models/sa/llama";
const WEB: &str = "spiffe://cluster.local/ns/apps/sa/web";

/// A mesh with the model server's sidecar (`models/llama`) in front of
/// `openai` and `kserve`, its certificate obtained and ready.
async fn model_server(openai: &OpenAiServer, kserve: &KServeGrpcServer) -> (Mesh, ProxyProcess) {
    let mesh = Mesh::start(
        &[("server.yaml", &server_policy(openai.addr(), kserve.addr()))],
        "1h",
        &[("models", "llama")],
    );
    let server = mesh.proxy("models", "llama").start();
    wait_ready(&server, Duration::from_secs(20)).await;
    (mesh, server)
}

/// The model server's side: inbound routes in namespace `models` to an
/// OpenAI upstream and a KServe gRPC upstream.
fn server_policy(openai: SocketAddr, kserve: SocketAddr) -> String {
    format!(
        r#"apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {{name: llama-server}}
spec: {{endpoints: ["{openai}"]}}
---
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {{name: triton}}
spec: {{endpoints: ["{kserve}"], protocol: http2}}
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {{name: chat, namespace: models}}
spec:
  listener: inbound
  match: [{{path: {{prefix: /v1/}}}}]
  backends: [{{backend: llama-server}}]
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {{name: infer, namespace: models}}
spec:
  listener: inbound
  match: [{{grpc: {{service: inference.GRPCInferenceService}}}}]
  backends: [{{backend: triton}}]
"#
    )
}

const AUTHZ: &str = r#"apiVersion: infermesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: llama-access, namespace: models}
spec:
  rules:
    - from: [{identity: "spiffe://cluster.local/ns/apps/sa/web"}]
      to: [{models: [llama-*]}]
    - from: [{namespace: batch}]
      to: [{methods: [/inference.GRPCInferenceService/ModelInfer]}]
    - action: deny
      from: [{identity: "spiffe://cluster.local/ns/batch/sa/rogue"}]
"#;

fn chat(model: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#)
}

async fn config(proxy: &ProxyProcess) -> serde_json::Value {
    HttpClient::http1()
        .get(&format!("{}/config", proxy.admin_url()))
        .await
        .json()
}

/// Waits until `text` appears in `stderr()`; panics with it otherwise.
async fn wait_log(what: &str, stderr: impl Fn() -> String, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stderr().contains(text) {
        if Instant::now() >= deadline {
            panic!(
                "no log line with {text:?} in {what}'s stderr:\n{}",
                stderr()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_pair_speaks_mtls_and_authorizes_each_caller_per_model_and_method() {
    let openai = OpenAiServer::start("llama");
    let kserve = KServeGrpcServer::start("triton");
    let inbound = infermesh_tests::free_addr();
    let mesh = Mesh::start(
        &[
            ("server.yaml", &server_policy(openai.addr(), kserve.addr())),
            ("client.yaml", &meshed_client_policy(inbound, SERVER)),
            ("authz.yaml", AUTHZ),
        ],
        "1h",
        &[("models", "llama"), ("apps", "web"), ("batch", "job")],
    );
    let server = mesh
        .proxy("models", "llama")
        .inbound(inbound)
        .arg("--access-log")
        .start();
    let web = mesh.proxy("apps", "web").start();
    let job = mesh.proxy("batch", "job").start();
    for proxy in [&server, &web, &job] {
        wait_ready(proxy, Duration::from_secs(20)).await;
    }

    // Identity on /config, and nothing secret there.
    let identity = &config(&server).await["identity"];
    assert_eq!(identity["spiffeId"], SERVER);
    assert_eq!(identity["certified"], true);
    assert_eq!(identity["inboundMtls"], "strict");
    let whole = config(&server).await.to_string();
    assert!(!whole.contains("BEGIN") && !whole.contains(&token_for("models", "llama")));

    let http = HttpClient::http1();
    // web may call llama-* models over HTTP.
    let reply = http
        .post_json(
            &format!("{}/v1/chat/completions", web.url()),
            &chat("llama-3-8b"),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.upstream(), Some("llama"));
    // Not other models: 403 with the reason.
    let reply = http
        .post_json(
            &format!("{}/v1/chat/completions", web.url()),
            &chat("mistral-7b"),
        )
        .await;
    let message = reply.assert_proxy_error(403, "permission_denied");
    assert!(
        message.contains(&format!(
            "no AuthorizationPolicy rule allows {WEB} calling model `mistral-7b`"
        )),
        "{message}"
    );
    // Nor gRPC inference, which only namespace batch may call.
    let mut grpc = grpc_client(web.outbound).await;
    let status = grpc
        .model_infer(infer_request("resnet", "1"))
        .await
        .expect_err("web may not call ModelInfer");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status
            .message()
            .contains("/inference.GRPCInferenceService/ModelInfer"),
        "{status:?}"
    );

    // job may call ModelInfer, only ModelInfer, and no chat model.
    let mut grpc = grpc_client(job.outbound).await;
    let response = grpc
        .model_infer(infer_request("resnet", "2"))
        .await
        .expect("batch may call ModelInfer");
    assert_eq!(response.into_inner().id, "2");
    let status = grpc
        .model_ready(infermesh_proto::kserve::ModelReadyRequest {
            name: "resnet".into(),
            version: String::new(),
        })
        .await
        .expect_err("ModelReady is not allowed");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let reply = http
        .post_json(
            &format!("{}/v1/chat/completions", job.url()),
            &chat("llama-3-8b"),
        )
        .await;
    reply.assert_proxy_error(403, "permission_denied");

    // A deny rule wins over the namespace allow: rogue is in batch.
    let (rogue_cert, rogue_key) =
        mesh.mint_valid("rogue", "spiffe://cluster.local/ns/batch/sa/rogue");
    let (code, out, err) = curl(&[
        "--http2-prior-knowledge",
        "-k",
        "--http2",
        "--cert",
        rogue_cert.to_str().unwrap(),
        "--key",
        rogue_key.to_str().unwrap(),
        "-i",
        "-X",
        "POST",
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "--data-binary",
        "",
        &format!("https://{inbound}/inference.GRPCInferenceService/ModelInfer"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("grpc-status: 7"), "{out}");
    assert!(out.contains("rule 3 denies"), "{out}");

    // A body that names two models cannot slip past a model rule.
    let (web_cert, web_key) = mesh.mint_valid("web", WEB);
    let (code, out, err) = curl(&[
        "-k",
        "--cert",
        web_cert.to_str().unwrap(),
        "--key",
        web_key.to_str().unwrap(),
        "-H",
        "content-type: application/json",
        "--data",
        r#"{"model":"llama-3-8b","messages":[],"model":"mistral-7b"}"#,
        "-w",
        "\n%{http_code}",
        &format!("https://{inbound}/v1/chat/completions"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("\n400"), "{out}");
    assert!(out.contains("more than one top-level `model`"), "{out}");

    // Nor by a second model past the scan limit, in the frame that ends the
    // body, over HTTP/1.1 and HTTP/2 alike: the documented 403, as JSON.
    let body_file = mesh.dir().join("two-models.json");
    std::fs::write(
        &body_file,
        format!(
            r#"{{"model":"llama-3-8b","pad":"{}","model":"mistral-7b"}}"#,
            "x".repeat(100_000)
        ),
    )
    .unwrap();
    let data = format!("@{}", body_file.display());
    for version in ["--http1.1", "--http2"] {
        for _ in 0..5 {
            let (code, out, err) = curl(&[
                version,
                "-k",
                "--cert",
                web_cert.to_str().unwrap(),
                "--key",
                web_key.to_str().unwrap(),
                "-H",
                "content-type: application/json",
                "--data-binary",
                &data,
                "-w",
                "\n%{http_code}",
                &format!("https://{inbound}/v1/chat/completions"),
            ]);
            assert_eq!(code, 0, "{version}: {err}");
            assert!(out.ends_with("\n403"), "{version}: {out}");
            assert!(
                out.contains(r#""type":"permission_denied""#),
                "{version}: {out}"
            );
            assert!(out.contains("longer than classify.maxBodyPrefix"), "{out}");
        }
    }
    // Two objects one after the other are no single request.
    let (code, out, err) = curl(&[
        "-k",
        "--cert",
        web_cert.to_str().unwrap(),
        "--key",
        web_key.to_str().unwrap(),
        "-H",
        "content-type: application/json",
        "--data",
        r#"{"model":"llama-3-8b"}{"model":"mistral-7b"}"#,
        "-w",
        "\n%{http_code}",
        &format!("https://{inbound}/v1/chat/completions"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("\n400"), "{out}");
    assert!(
        out.contains("another value after its top-level object"),
        "{out}"
    );

    // Denied requests never reached the upstreams.
    let models: Vec<String> = openai.requests().iter().filter_map(|r| r.model()).collect();
    assert_eq!(models, ["llama-3-8b"]);
    assert_eq!(kserve.calls().len(), 1);

    // The caller's identity is in the server's access log.
    wait_log(
        "the server proxy",
        || server.stdout_lines().join("\n"),
        &format!(r#""caller":"{WEB}""#),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_listener_refuses_each_bad_peer_and_says_why() {
    let openai = OpenAiServer::start("llama");
    let kserve = KServeGrpcServer::start("triton");
    let (mesh, server) = model_server(&openai, &kserve).await;
    let url = format!("https://{}/v1/chat/completions", server.inbound);
    let post = |cert: &std::path::Path, key: &std::path::Path| {
        curl(&[
            "-k",
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "-H",
            "content-type: application/json",
            "--data",
            &chat("llama-3-8b"),
            "-w",
            "\n%{http_code}",
            &url,
        ])
    };

    // A good certificate passes, over HTTP/2 (ALPN) and HTTP/1.1.
    let (good_cert, good_key) = mesh.mint_valid("good", WEB);
    let (code, out, err) = post(&good_cert, &good_key);
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("\n200"), "{out}");
    let (code, out, _) = curl(&[
        "-k",
        "--http1.1",
        "--cert",
        good_cert.to_str().unwrap(),
        "--key",
        good_key.to_str().unwrap(),
        "-w",
        "\n%{http_version}",
        "-H",
        "content-type: application/json",
        "--data",
        &chat("llama-3-8b"),
        &url,
    ]);
    assert_eq!(code, 0);
    assert!(out.ends_with("\n1.1"), "{out}");

    // Clients that complete the handshake and close at once, as
    // `openssl s_time -new` and health probes do, are not refusals: no log
    // line, no count.
    let out = std::process::Command::new("openssl")
        .args([
            "s_time",
            "-connect",
            &server.inbound.to_string(),
            "-new",
            "-time",
            "1",
        ])
        .arg("-cert")
        .arg(&good_cert)
        .arg("-key")
        .arg(&good_key)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("connections in"),
        "openssl s_time made connections: {text}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !server.stderr().contains("handshake refused"),
        "a completed handshake closed by its client was logged as refused:\n{}",
        server.stderr()
    );

    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let cases: Vec<(&str, (std::path::PathBuf, std::path::PathBuf), &str)> = vec![
        (
            "a certificate from another CA",
            mesh.mint_untrusted("stranger", WEB),
            "UnknownIssuer",
        ),
        (
            "an expired certificate",
            mesh.mint("expired", &[San::Uri(WEB)], now - 3 * hour, now - hour),
            "expired",
        ),
        (
            "an identity of another trust domain",
            mesh.mint_valid("foreign", "spiffe://partner.org/ns/apps/sa/web"),
            "is not of this mesh's trust domain `cluster.local`",
        ),
        (
            "a certificate without a SPIFFE ID",
            mesh.mint(
                "dns-only",
                &[San::Dns("web.apps.svc")],
                now - hour,
                now + hour,
            ),
            "carries no SPIFFE ID",
        ),
    ];
    for (what, (cert, key), reason) in cases {
        let (code, out, err) = post(&cert, &key);
        assert_ne!(code, 0, "{what} was accepted: {out}");
        assert!(!out.ends_with("200"), "{what}: {out} {err}");
        wait_log("the server proxy", || server.stderr(), reason).await;
        let line = server
            .stderr()
            .lines()
            .find(|l| l.contains(reason))
            .unwrap_or_default()
            .to_string();
        assert!(
            line.contains("inbound mTLS handshake refused"),
            "{what}: {line}"
        );
    }

    // No client certificate: openssl completes its side of TLS 1.3, then the
    // proxy refuses the handshake.
    let mut child = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &server.inbound.to_string(),
            "-tls1_3",
            "-quiet",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl is installed (scripts/setup.sh installs it)");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n");
        std::thread::sleep(Duration::from_millis(500));
    }
    let output = child.wait_with_output().unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(!printed.contains("HTTP/1.1 200"), "{printed}");
    wait_log(
        "the server proxy",
        || server.stderr(),
        "peer sent no certificates",
    )
    .await;

    // Plaintext on the strict port: refused, and said so.
    let (code, out, _) = curl(&[
        "-H",
        "content-type: application/json",
        "--data",
        &chat("llama-3-8b"),
        &format!("http://{}/v1/chat/completions", server.inbound),
    ]);
    assert_ne!(code, 0, "plaintext was served: {out}");
    wait_log(
        "the server proxy",
        || server.stderr(),
        "plaintext connection refused: inbound mTLS is strict",
    )
    .await;
    // Nor is anything else that is not TLS forwarded as opaque bytes.
    let refusals = server
        .stderr()
        .matches("plaintext connection refused")
        .count();
    let raw = infermesh_tests::raw_exchange(
        server.inbound,
        b"\x00\x01 not TLS, not HTTP",
        Duration::from_secs(5),
    )
    .await;
    assert!(raw.closed && raw.bytes.is_empty(), "{raw:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while server
        .stderr()
        .matches("plaintext connection refused")
        .count()
        == refusals
    {
        assert!(
            Instant::now() < deadline,
            "no refusal logged for opaque bytes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Permissive mode lets plaintext in, for migrations.
    mesh.control.write(
        "mesh.yaml",
        "apiVersion: infermesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {mtls: {mode: permissive}}\n",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, out, err) = curl(&[
            "-H",
            "content-type: application/json",
            "--data",
            &chat("llama-3-8b"),
            "-w",
            "\n%{http_code}",
            &format!("http://{}/v1/chat/completions", server.inbound),
        ]);
        if code == 0 && out.ends_with("\n200") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "plaintext still refused in permissive mode: {code} {out} {err}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Only the first good requests and the plaintext one reached the upstream.
    assert_eq!(openai.requests().len(), 3);
}

/// `openssl s_client` with the caller's certificate, saving its session to
/// `sess_out` or offering the one in `sess_in`. Standard input stays open
/// half a second, so the session tickets the server sends after the
/// handshake arrive before the client closes.
fn s_client(
    addr: SocketAddr,
    cert: &std::path::Path,
    key: &std::path::Path,
    session: (&str, &std::path::Path),
) -> String {
    let mut child = std::process::Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string(), "-cert"])
        .arg(cert)
        .arg("-key")
        .arg(key)
        .arg(session.0)
        .arg(session.1)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl runs");
    std::thread::sleep(Duration::from_millis(500));
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("openssl ends");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_listener_resumes_tls_sessions_and_keeps_the_callers_identity() {
    let openai = OpenAiServer::start("llama");
    let kserve = KServeGrpcServer::start("triton");
    let (mesh, server) = model_server(&openai, &kserve).await;
    let (cert, key) = mesh.mint_valid("web", WEB);
    let session = mesh.dir().join("web.session");

    // A first connection gets a full handshake and a TLS 1.3 session
    // ticket; a second one that offers it resumes without certificates.
    let (inbound, c, k, s) = (server.inbound, cert.clone(), key.clone(), session.clone());
    let first = tokio::task::spawn_blocking(move || s_client(inbound, &c, &k, ("-sess_out", &s)))
        .await
        .unwrap();
    assert!(first.contains("New, TLSv1.3"), "{first}");
    assert!(session.exists(), "no session saved: {first}");

    // Full handshakes from another caller, enough to flush a server-side
    // session cache of 256 entries (two per handshake): the session still
    // resumes, as it lives in the ticket.
    let (other_cert, other_key) =
        mesh.mint_valid("probe", "spiffe://cluster.local/ns/apps/sa/probe");
    let mut handshakes = 0;
    while handshakes < 200 {
        let out = std::process::Command::new("openssl")
            .args([
                "s_time",
                "-connect",
                &inbound.to_string(),
                "-new",
                "-time",
                "1",
            ])
            .arg("-cert")
            .arg(&other_cert)
            .arg("-key")
            .arg(&other_key)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl runs");
        let text = String::from_utf8_lossy(&out.stdout);
        let made: u64 = text
            .split_once(" connections in")
            .and_then(|(head, _)| head.rsplit(char::is_whitespace).next()?.parse().ok())
            .unwrap_or_else(|| panic!("openssl s_time made no connections: {text}"));
        handshakes += made;
    }
    let (c, k, s) = (cert.clone(), key.clone(), session.clone());
    let second = tokio::task::spawn_blocking(move || s_client(inbound, &c, &k, ("-sess_in", &s)))
        .await
        .unwrap();
    assert!(second.contains("Reused, TLSv1.3"), "{second}");

    // The resumed connection still carries the caller's SPIFFE ID (the
    // session keeps the client's certificate): both are counted under it.
    let metrics = Metrics::parse(
        &HttpClient::http1()
            .get(&format!("{}/metrics", server.admin_url()))
            .await
            .text(),
    );
    assert_eq!(
        metrics.sum(
            "infermesh_inbound_mtls_connections_total",
            &[("caller", WEB)]
        ),
        2.0,
        "{}",
        server.stderr()
    );

    // A session whose client certificate has expired since is refused on
    // resumption, as a full handshake would refuse the certificate.
    let now = SystemTime::now();
    let brief = "spiffe://cluster.local/ns/apps/sa/brief";
    let (c, k) = mesh.mint(
        "brief",
        &[San::Uri(brief)],
        now - Duration::from_secs(60),
        now + Duration::from_secs(3),
    );
    let s = mesh.dir().join("brief.session");
    let (c2, k2, s2) = (c.clone(), k.clone(), s.clone());
    let fresh =
        tokio::task::spawn_blocking(move || s_client(inbound, &c2, &k2, ("-sess_out", &s2)))
            .await
            .unwrap();
    assert!(fresh.contains("New, TLSv1.3"), "{fresh}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let resumed = tokio::task::spawn_blocking(move || s_client(inbound, &c, &k, ("-sess_in", &s)))
        .await
        .unwrap();
    assert!(resumed.contains("Reused, TLSv1.3"), "{resumed}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = Metrics::scrape(&server).await;
        let refused = metrics.sum(
            "infermesh_refusals_total",
            &[("listener", "inbound"), ("reason", "tls_expired")],
        );
        if refused >= 1.0 {
            assert_eq!(refused, 1.0, "{}", metrics.text);
            // Only the full handshake was counted as the caller's connection.
            assert_eq!(
                metrics.sum(
                    "infermesh_inbound_mtls_connections_total",
                    &[("caller", brief)]
                ),
                1.0,
                "{}",
                metrics.text
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the expired session was not refused:\n{}\n{}",
            metrics.text,
            server.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_refuses_a_token_bound_to_another_identity() {
    let mesh = Mesh::start(&[], "1h", &[("apps", "web"), ("batch", "job")]);
    // web presents job's token.
    let stolen = mesh.token_file("stolen", &token_for("batch", "job"));
    let proxy = mesh.proxy_with_token("apps", "web", &stolen).start();
    let unknown = mesh.token_file("unknown", "a-token-nobody-issued-42");
    let stranger = mesh.proxy_with_token("apps", "web", &unknown).start();
    let http = HttpClient::http1();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let a = http.get(&format!("{}/ready", proxy.admin_url())).await;
        let b = http.get(&format!("{}/ready", stranger.admin_url())).await;
        assert_eq!(a.status, 503, "a proxy with another's token became ready");
        assert_eq!(b.status, 503, "a proxy with an unknown token became ready");
        if a.text().contains("bound to spiffe://cluster.local/ns/batch/sa/job, not to spiffe://cluster.local/ns/apps/sa/web")
            && b.text().contains("not known to this authority")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no refusal reason on /ready: {} / {}",
            a.text(),
            b.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = Metrics::parse(
        &http
            .get(&format!("{}/metrics", mesh.control.admin_url()))
            .await
            .text(),
    );
    assert!(
        metrics.sum(
            "infermesh_control_certificate_refusals_total",
            &[("reason", "identity_mismatch")]
        ) >= 1.0
    );
    assert!(
        metrics.sum(
            "infermesh_control_certificate_refusals_total",
            &[("reason", "unknown_token")]
        ) >= 1.0
    );
    assert_eq!(
        metrics.sum("infermesh_control_certificates_issued_total", &[]),
        0.0
    );
    // Tokens never reach a log.
    for log in [mesh.control.stderr(), proxy.stderr(), stranger.stderr()] {
        assert!(
            !log.contains(&token_for("batch", "job")) && !log.contains("a-token-nobody-issued-42"),
            "{log}"
        );
    }
}

/// Certificates that live 4 seconds, renewed at about 70%: over a minute
/// of steady traffic through an outbound → inbound pair spans more than a
/// dozen rotations on each side, and no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_failed_request() {
    let openai = OpenAiServer::start("llama");
    let kserve = KServeGrpcServer::start("triton");
    let inbound = infermesh_tests::free_addr();
    let mesh = Mesh::start(
        &[
            ("server.yaml", &server_policy(openai.addr(), kserve.addr())),
            ("client.yaml", &meshed_client_policy(inbound, SERVER)),
        ],
        "4s",
        &[("models", "llama"), ("apps", "web")],
    );
    let server = mesh.proxy("models", "llama").inbound(inbound).start();
    let web = mesh.proxy("apps", "web").start();
    wait_ready(&server, Duration::from_secs(20)).await;
    wait_ready(&web, Duration::from_secs(20)).await;
    let (cert, key) = mesh.mint_valid("probe", WEB);

    let run_for = Duration::from_secs(62);
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..3 {
        let url = format!("{}/v1/chat/completions", web.url());
        workers.push(tokio::spawn(async move {
            // HTTP/1.1 and HTTP/2 clients: pooled connections that stay up
            // across rotations.
            let client = if worker == 0 {
                HttpClient::http2()
            } else {
                HttpClient::http1()
            };
            let (mut ok, mut failed) = (0u32, Vec::new());
            while started.elapsed() < run_for {
                let reply = client
                    .fetch(json_request(&url, &chat("llama-3-8b"), &[]))
                    .await;
                if reply.status == 200 {
                    ok += 1;
                } else {
                    failed.push(format!("{} {}", reply.status, reply.text()));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failed)
        }));
    }
    // New handshakes all along: a fresh TLS connection to the inbound
    // listener every half second sees each certificate the server holds.
    let fresh = tokio::task::spawn_blocking(move || {
        let (mut ok, mut failed) = (0u32, Vec::new());
        while started.elapsed() < run_for {
            let (code, out, err) = curl(&[
                "-k",
                "--cert",
                cert.to_str().unwrap(),
                "--key",
                key.to_str().unwrap(),
                "-H",
                "content-type: application/json",
                "--data",
                &chat("llama-3-8b"),
                "-w",
                "\n%{http_code}",
                &format!("https://{inbound}/v1/chat/completions"),
            ]);
            if code == 0 && out.ends_with("\n200") {
                ok += 1;
            } else {
                failed.push(format!("curl {code}: {out} {err}"));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        (ok, failed)
    });
    let mut total = 0;
    for worker in workers {
        let (ok, failed) = worker.await.unwrap();
        assert!(
            failed.is_empty(),
            "failed requests through the pair: {failed:?}"
        );
        total += ok;
    }
    let (fresh_ok, fresh_failed) = fresh.await.unwrap();
    assert!(
        fresh_failed.is_empty(),
        "failed fresh handshakes: {fresh_failed:?}"
    );
    assert!(
        total > 300 && fresh_ok > 60,
        "too little traffic: {total} pooled, {fresh_ok} fresh"
    );
    for (name, proxy) in [("server", &server), ("web", &web)] {
        let identity = &config(proxy).await["identity"];
        let obtained = identity["certificatesObtained"].as_u64().unwrap();
        assert!(
            obtained >= 12,
            "{name} obtained only {obtained} certificates in a minute: {identity}"
        );
    }
    // The policy stream, over mutual TLS, stayed up through the rotations.
    let proxies = mesh.control.proxies().await;
    let list = proxies
        .as_array()
        .or_else(|| proxies["proxies"].as_array())
        .cloned()
        .unwrap_or_default();
    assert_eq!(list.len(), 2, "{proxies}");
    // Each stream is bound to the identity of the certificate it came with.
    let mut identities: Vec<&str> = list.iter().filter_map(|p| p["identity"].as_str()).collect();
    identities.sort();
    assert_eq!(identities, [WEB, SERVER], "{proxies}");
}

/// A rate limit keyed by `caller` gives every mesh identity its own bucket:
/// one caller past its burst is refused while another still passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_keyed_by_caller_identity_are_per_identity() {
    let openai = OpenAiServer::start("llama");
    let policy = format!(
        r#"apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {{name: llama-server}}
spec: {{endpoints: ["{}"]}}
---
apiVersion: infermesh.io/v1alpha1
kind: ModelRoute
metadata: {{name: chat, namespace: models}}
spec:
  listener: inbound
  backends: [{{backend: llama-server}}]
  rateLimits:
    - {{key: caller, requestsPerSecond: 0.01, burst: 2}}
"#,
        openai.addr()
    );
    let mesh = Mesh::start(&[("server.yaml", &policy)], "1h", &[("models", "llama")]);
    let server = mesh.proxy("models", "llama").start();
    wait_ready(&server, Duration::from_secs(20)).await;
    let url = format!("https://{}/v1/chat/completions", server.inbound);
    let web = mesh.mint_valid("web", WEB);
    let job = mesh.mint_valid("job", "spiffe://cluster.local/ns/batch/sa/job");
    let status = |(cert, key): &(std::path::PathBuf, std::path::PathBuf)| {
        let (code, out, err) = curl(&[
            "-k",
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "-H",
            "content-type: application/json",
            "--data",
            &chat("llama-3-8b"),
            "-w",
            "\n%{http_code}",
            &url,
        ]);
        assert_eq!(code, 0, "{err}");
        out.rsplit('\n').next().unwrap_or_default().to_string()
    };
    // web spends its burst of 2, then is limited...
    assert_eq!(status(&web), "200");
    assert_eq!(status(&web), "200");
    assert_eq!(status(&web), "429");
    // ...while job, another identity, has a bucket of its own.
    assert_eq!(status(&job), "200");
    assert_eq!(status(&job), "200");
    assert_eq!(status(&job), "429");
    assert_eq!(openai.requests().len(), 4);
}

/// The waits (`retry_in_ms`) a proxy logged after each failed request for a
/// certificate, in order.
fn renewal_waits(stderr: &str) -> Vec<u64> {
    stderr
        .lines()
        .filter(|line| line.contains("cannot obtain a mesh certificate"))
        .filter_map(|line| {
            let value = line.split("retry_in_ms=").nth(1)?;
            value.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// Proxies that fail to reach the CA together (here: started during its
/// outage) do not come back together: each wait is drawn at random between
/// half and all of a ceiling that doubles from 200 ms, so their requests
/// spread out instead of hitting the returning CA in the same instant. Once
/// the CA is back, every proxy gets its certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_that_lose_the_ca_together_do_not_retry_in_step() {
    let mut mesh = Mesh::start(&[], "1h", &[("apps", "web")]);
    mesh.control.kill();
    let proxies: Vec<ProxyProcess> = (0..3).map(|_| mesh.proxy("apps", "web").start()).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let waits = loop {
        let waits: Vec<Vec<u64>> = proxies.iter().map(|p| renewal_waits(&p.stderr())).collect();
        if waits.iter().all(|w| w.len() >= 4) {
            break waits;
        }
        assert!(
            Instant::now() < deadline,
            "fewer than four failed attempts logged: {waits:?}\n{}",
            proxies[0].stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (proxy, waits) in waits.iter().enumerate() {
        for (n, &wait) in waits.iter().take(4).enumerate() {
            let ceiling = 200u64 << n;
            assert!(
                (ceiling / 2..=ceiling).contains(&wait),
                "proxy {proxy}, wait {n}: {wait} ms outside [{}, {ceiling}]: {waits:?}",
                ceiling / 2
            );
        }
    }
    // Without jitter every proxy waited 200, 400, 800, 1600 ms.
    let first_four: Vec<&[u64]> = waits.iter().map(|w| &w[..4]).collect();
    assert!(
        first_four.windows(2).any(|pair| pair[0] != pair[1]),
        "the proxies retried in step: {first_four:?}"
    );
    mesh.control.restart();
    for proxy in &proxies {
        wait_log("a proxy", || proxy.stderr(), "mesh certificate in force").await;
    }
}
