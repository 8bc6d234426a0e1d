//! Requests read one way must never be forwarded another, and the client's
//! own faults are the client's: hostile and broken clients driven over raw
//! sockets (HTTP/1.1), the `h2` crate (HTTP/2) and curl against the real
//! proxy, checking what the client gets, what the upstream sees, and what is
//! counted against the endpoints.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use infermesh_tests::client::{chat_body, raw_exchange};
use infermesh_tests::kserve::{grpc_client, infer_request};
use infermesh_tests::{policy, HttpClient, KServeGrpcServer, Metrics, OpenAiServer, ProxyProcess};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHAT: &str = "/v1/chat/completions";

/// Two model routes (`allowed` and `forbidden`, each to its own upstream)
/// and a catch-all `/upload` route; `mesh` is the MeshConfig spec, if any.
fn two_models(allowed: &OpenAiServer, forbidden: &OpenAiServer, mesh: &str) -> ProxyProcess {
    let mut documents = vec![
        policy::backend(
            "allowed",
            &[allowed.addr()],
            "outlierDetection: {consecutiveFailures: 3}",
        ),
        policy::backend("forbidden", &[forbidden.addr()], ""),
        policy::route(
            "allowed",
            "match:\n  - model: {exact: allowed}\nbackends:\n  - backend: allowed",
        ),
        policy::route(
            "forbidden",
            "match:\n  - model: {exact: forbidden}\nbackends:\n  - backend: forbidden",
        ),
        policy::route(
            "upload",
            "match:\n  - path: {prefix: /upload}\nbackends:\n  - backend: allowed",
        ),
        policy::route(
            "by-host",
            "match:\n  - host: a.example\nbackends:\n  - backend: allowed",
        ),
        policy::route(
            "other-host",
            "match:\n  - host: b.example\nbackends:\n  - backend: forbidden",
        ),
    ];
    if !mesh.is_empty() {
        documents.push(policy::mesh(mesh));
    }
    ProxyProcess::start(&policy::docs(&documents))
}

/// `{"model":"allowed","stream":false,"pad":"xxx…","model":"forbidden"}` with
/// `pad` bytes of padding: the second model lies past the scan limit.
fn two_model_body(pad: usize) -> String {
    format!(
        r#"{{"model":"allowed","stream":false,"pad":"{}","model":"forbidden"}}"#,
        "x".repeat(pad)
    )
}

/// The JSON error body of a raw HTTP/1.1 reply: its `error.type`.
fn error_type(reply: &str) -> String {
    let body = reply.split("\r\n\r\n").nth(1).unwrap_or_default();
    let value: serde_json::Value = serde_json::from_str(body.trim())
        .unwrap_or_else(|e| panic!("not a JSON error body ({e}): {reply:?}"));
    value["error"]["type"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_named_again_past_the_routing_decision_never_reaches_an_upstream() {
    let allowed = OpenAiServer::start("allowed");
    let forbidden = OpenAiServer::start("forbidden");
    let proxy = two_models(&allowed, &forbidden, "");
    let url = format!("{}{CHAT}", proxy.url());
    for client in [HttpClient::http1(), HttpClient::http2()] {
        // Past the prefix, within it, in one frame and (HTTP/1.1) chunked.
        for pad in [100_000, 300_000, 1_000] {
            let reply = client.post_json(&url, &two_model_body(pad)).await;
            let message = reply.assert_proxy_error(400, "bad_request");
            assert!(
                message.contains("more than one top-level `model`"),
                "{message}"
            );
        }
        // Two JSON objects, one after the other.
        let reply = client
            .post_json(
                &url,
                r#"{"model":"allowed","stream":false}{"model":"forbidden"}"#,
            )
            .await;
        let message = reply.assert_proxy_error(400, "bad_request");
        assert!(message.contains("another value"), "{message}");
        // A lenient parser's NaN cannot hide a later model either.
        let reply = client
            .post_json(
                &url,
                r#"{"model":"allowed","stream":false,"t":NaN,"model":"forbidden"}"#,
            )
            .await;
        reply.assert_proxy_error(400, "bad_request");
    }
    // No upstream received a whole body naming `forbidden`.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for server in [&allowed, &forbidden] {
        let models: Vec<_> = server.requests().iter().filter_map(|r| r.model()).collect();
        assert!(models.is_empty(), "{} saw {models:?}", server.name());
    }
    // An ordinary request still goes through, and a large single-model body
    // streams to the upstream whole.
    let reply = HttpClient::http1()
        .post_json(
            &url,
            &format!(
                r#"{{"model":"allowed","stream":false,"pad":"{}"}}"#,
                "y".repeat(200_000)
            ),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(allowed.requests()[0].body.len(), 200_000 + 43);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_message_may_not_name_a_second_model() {
    let kserve = KServeGrpcServer::start("triton");
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("triton", &[kserve.addr()], "protocol: http2"),
        policy::route(
            "resnet",
            "match:\n  - model: {exact: resnet}\nbackends:\n  - backend: triton",
        ),
    ]));
    // field 1 twice: protobuf keeps the last, the scan read the first.
    let mut message = infer_request("resnet", "1").encode_to_vec();
    prost::encoding::string::encode(1, &"secret".to_string(), &mut message);
    let mut body = vec![0];
    body.extend((message.len() as u32).to_be_bytes());
    body.extend(&message);
    let client = HttpClient::http2();
    let request = http::Request::post(format!(
        "{}/inference.GRPCInferenceService/ModelInfer",
        proxy.url()
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(infermesh_tests::client::full(body))
    .unwrap();
    let reply = client.fetch(request).await;
    assert_eq!(reply.header("grpc-status"), Some("3"), "{reply:?}");
    assert!(
        reply
            .header("grpc-message")
            .is_some_and(|m| m.contains("another model")),
        "{reply:?}"
    );
    assert!(kserve.calls().is_empty(), "{:?}", kserve.calls());
    // The ordinary call passes.
    let mut grpc = grpc_client(proxy.outbound).await;
    grpc.model_infer(infer_request("resnet", "2"))
        .await
        .expect("one model name is fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_upload_is_the_clients_fault_and_never_ejects_the_endpoint() {
    let allowed = OpenAiServer::start("allowed");
    let forbidden = OpenAiServer::start("forbidden");
    let proxy = two_models(&allowed, &forbidden, "");
    let shapes: [(&str, &[u8]); 3] = [
        // A bad chunk size after the first chunk went upstream.
        (
            "bad chunk size",
            b"POST /upload HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n",
        ),
        // A body shorter than its Content-Length, the client half-closes.
        (
            "short body",
            b"POST /upload HTTP/1.1\r\nHost: x\r\ncontent-length: 1000\r\n\r\nonly a few bytes",
        ),
        // A JSON body routed by its model, then broken.
        (
            "broken JSON upload",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n1e\r\n{\"model\":\"allowed\",\"stream\":1\r\nq\r\n",
        ),
    ];
    for _ in 0..2 {
        for (what, bytes) in shapes {
            let mut stream = tokio::net::TcpStream::connect(proxy.outbound)
                .await
                .unwrap();
            stream.write_all(bytes).await.unwrap();
            stream.shutdown().await.unwrap();
            let mut reply = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut reply)).await;
            let reply = String::from_utf8_lossy(&reply).into_owned();
            assert!(reply.starts_with("HTTP/1.1 400"), "{what}: {reply:?}");
            assert_eq!(error_type(&reply), "bad_request", "{what}");
        }
    }
    // Six failed uploads, three consecutive failures eject: none counted.
    let after = Metrics::scrape(&proxy).await;
    assert_eq!(
        after.sum("infermesh_outlier_ejections_total", &[]),
        0.0,
        "{}",
        after.text
    );
    let reply = HttpClient::http1()
        .post_json(
            &format!("{}{CHAT}", proxy.url()),
            &chat_body("allowed", false),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(
        !proxy.stderr().contains("upstream_error"),
        "{}",
        proxy.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_and_forwarding_see_the_same_host() {
    let allowed = OpenAiServer::start("allowed");
    let forbidden = OpenAiServer::start("forbidden");
    let proxy = two_models(&allowed, &forbidden, "");
    let timeout = Duration::from_secs(5);
    // Two Host headers, and none: 400.
    for head in [
        "GET /x HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: a.example\r\nHost: a.example\r\n\r\n",
        "GET /x HTTP/1.1\r\nx-a: 1\r\n\r\n",
    ] {
        let reply = raw_exchange(proxy.outbound, head.as_bytes(), timeout).await;
        assert_eq!(reply.status(), Some(400), "{head:?}: {}", reply.text());
        assert_eq!(error_type(&reply.text()), "bad_request");
    }
    // Absolute form: the target's authority routes and is forwarded.
    let reply = raw_exchange(
        proxy.outbound,
        b"GET http://a.example/v1/models HTTP/1.1\r\nHost: b.example\r\nconnection: close\r\n\r\n",
        timeout,
    )
    .await;
    assert_eq!(reply.status(), Some(200), "{}", reply.text());
    let seen = allowed.requests();
    assert_eq!(seen.len(), 1, "routed by the target to `allowed`");
    assert_eq!(seen[0].headers["host"], "a.example");
    assert!(forbidden.requests().is_empty());

    // HTTP/2: a host header that differs from :authority is malformed.
    let tcp = tokio::net::TcpStream::connect(proxy.outbound)
        .await
        .unwrap();
    let (mut h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::get("http://a.example/v1/models")
        .header("host", "b.example")
        .body(())
        .unwrap();
    let (response, _) = h2.send_request(request, true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(allowed.requests().len(), 1);
    assert!(forbidden.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_is_cut_by_its_limits() {
    let allowed = OpenAiServer::start("allowed");
    let forbidden = OpenAiServer::start("forbidden");
    let proxy = two_models(
        &allowed,
        &forbidden,
        "classify: {readTimeout: 1s, bodyIdleTimeout: 1s}",
    );
    // The classification prefix trickles: 408 at its limit.
    let started = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(proxy.outbound)
        .await
        .unwrap();
    stream
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"mo")
        .await
        .unwrap();
    let mut reply = Vec::new();
    for _ in 0..6 {
        let _ = stream.write_all(b" ").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut reply)).await;
    let reply = String::from_utf8_lossy(&reply).into_owned();
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply:?}");
    assert_eq!(error_type(&reply), "request_timeout");
    assert!(started.elapsed() < Duration::from_secs(5));

    // After routing, a stalled upload is cut and answered 408; the endpoint
    // is not blamed.
    let mut stream = tokio::net::TcpStream::connect(proxy.outbound)
        .await
        .unwrap();
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\ncontent-length: 100\r\n\r\nfirst bytes")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut reply)).await;
    let reply = String::from_utf8_lossy(&reply).into_owned();
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply:?}");
    assert!(reply.contains("stalled"), "{reply:?}");
    let after = Metrics::scrape(&proxy).await;
    assert_eq!(after.sum("infermesh_outlier_ejections_total", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_failures_are_counted_with_their_grpc_status() {
    let kserve = KServeGrpcServer::start("triton");
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("triton", &[kserve.addr()], "protocol: http2"),
        policy::route(
            "resnet",
            "match:\n  - model: {exact: resnet}\nbackends:\n  - backend: triton",
        ),
    ]));
    // No call yet: no series of a successful gRPC call.
    let before = Metrics::scrape(&proxy).await;
    assert!(
        !before.text.contains("grpc_status=\"0\""),
        "{}",
        before.text
    );
    let mut grpc = grpc_client(proxy.outbound).await;
    for id in ["1", "2", "3"] {
        grpc.model_infer(infer_request("resnet", id)).await.unwrap();
    }
    // The proxy's own UNIMPLEMENTED (no route).
    let status = grpc
        .model_infer(infer_request("unrouted", "4"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    let after = Metrics::scrape(&proxy).await;
    assert_eq!(
        after.sum(
            "infermesh_requests_total",
            &[("route", "resnet"), ("status", "200"), ("grpc_status", "0")]
        ),
        3.0,
        "{}",
        after.text
    );
    assert_eq!(
        after.sum(
            "infermesh_requests_total",
            &[("status", "200"), ("grpc_status", "12")]
        ),
        1.0,
        "{}",
        after.text
    );
}

/// A body of `len` bytes whose model is found in its first bytes.
fn chain_body(len: usize) -> String {
    let head = r#"{"model":"allowed","stream":false,"pad":""#;
    let pad = len - head.len() - 2;
    format!("{head}{}\"}}", "z".repeat(pad))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_chain_takes_only_bodies_within_the_prefix_limit() {
    let fallback = OpenAiServer::start("fallback");
    let dead: SocketAddr = infermesh_tests::refused_addr();
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("dead", &[dead], "connectTimeout: 1s"),
        policy::backend("fallback", &[fallback.addr()], ""),
        policy::route(
            "chat",
            "match:\n  - model: {exact: allowed}\nbackends:\n  - backend: dead\nfallback:\n  - backend: fallback",
        ),
    ]));
    let url = format!("{}{CHAT}", proxy.url());
    let client = HttpClient::http1();
    let reply = client.post_json(&url, &chain_body(60 * 1024)).await;
    assert_eq!(reply.status, 200, "within the limit: {}", reply.text());
    // 82 KB, sent in one piece, is over the 64 KiB limit: not replayed.
    let request = http::Request::post(&url)
        .header("content-type", "application/json")
        .body(infermesh_tests::client::full(Bytes::from(chain_body(
            82_000,
        ))))
        .unwrap();
    let reply = client.fetch(request).await;
    reply.assert_proxy_error(503, "upstream_connect_error");
    assert_eq!(fallback.request_count(), 1);
}
