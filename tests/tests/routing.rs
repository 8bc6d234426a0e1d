//! Routing through the proxy: by model name (JSON body, KServe path, gRPC
//! field), host, path, headers and gRPC service/method; model aliases; and
//! bodies that reach the upstream byte for byte.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use infermesh_proto::kserve::{ModelMetadataRequest, ModelReadyRequest, ServerLiveRequest};
use infermesh_tests::client::{chat_body, full, json_request, paced};
use infermesh_tests::kserve::{grpc_client, infer_request};
use infermesh_tests::{policy, HttpClient, KServeGrpcServer, OpenAiServer, ProxyProcess};

#[tokio::test]
async fn routes_by_the_model_in_the_json_body() {
    let llama = OpenAiServer::start("llama");
    let gpt = OpenAiServer::start("gpt");
    let other = OpenAiServer::start("other");
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("llama", &[llama.addr()], ""),
        policy::backend("gpt", &[gpt.addr()], ""),
        policy::backend("other", &[other.addr()], ""),
        policy::route(
            "llama",
            "match:\n  - model: {exact: llama-3-8b}\nbackends:\n  - backend: llama\n",
        ),
        policy::route(
            "gpt",
            "match:\n  - model: {prefix: gpt-}\nbackends:\n  - backend: gpt\n",
        ),
        policy::route(
            "rest",
            "match:\n  - path: {prefix: /v1/}\nbackends:\n  - backend: other\n",
        ),
    ]));
    let base = proxy.url();
    let client = HttpClient::http1();
    let cases = [
        (
            "/v1/chat/completions",
            chat_body("llama-3-8b", false),
            "llama",
        ),
        (
            "/v1/chat/completions",
            chat_body("llama-3-8b-instruct", false),
            "other",
        ),
        (
            "/v1/completions",
            r#"{"model":"gpt-4o","prompt":"hi"}"#.to_string(),
            "gpt",
        ),
        (
            "/v1/embeddings",
            r#"{"input":"text","model":"gpt-embed"}"#.to_string(),
            "gpt",
        ),
        // The model member after a long messages array.
        (
            "/v1/chat/completions",
            format!(
                r#"{{"messages":[{{"role":"user","content":"{}"}}],"temperature":0,"model":"llama-3-8b"}}"#,
                "x".repeat(5000)
            ),
            "llama",
        ),
        (
            "/v1/embeddings",
            r#"{"model":"bert","input":"x"}"#.to_string(),
            "other",
        ),
    ];
    for (path, body, expected) in &cases {
        let reply = client.post_json(&format!("{base}{path}"), body).await;
        assert_eq!(
            reply.status,
            200,
            "{path} {}: {}",
            &body[..body.len().min(60)],
            reply.text()
        );
        assert_eq!(
            reply.upstream(),
            Some(*expected),
            "{path} with {}",
            &body[..body.len().min(60)]
        );
    }
    assert_eq!(
        (
            llama.request_count(),
            gpt.request_count(),
            other.request_count()
        ),
        (2, 2, 2)
    );
}

#[tokio::test]
async fn routes_kserve_rest_by_the_model_in_the_path() {
    let resnet = OpenAiServer::start("resnet");
    let bert = OpenAiServer::start("bert");
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("resnet", &[resnet.addr()], ""),
        policy::backend("bert", &[bert.addr()], ""),
        policy::route(
            "resnet",
            "match:\n  - model: {exact: resnet50}\nbackends:\n  - backend: resnet\n",
        ),
        policy::route(
            "bert",
            "match:\n  - model: {prefix: bert}\nbackends:\n  - backend: bert\n",
        ),
    ]));
    let base = proxy.url();
    let client = HttpClient::http1();
    let infer =
        r#"{"id":"q1","inputs":[{"name":"input0","datatype":"FP32","shape":[1],"data":[1.0]}]}"#;
    let reply = client
        .post_json(&format!("{base}/v2/models/resnet50/infer"), infer)
        .await;
    assert_eq!(reply.upstream(), Some("resnet"), "{}", reply.text());
    assert_eq!(reply.json()["model_name"], "resnet50");
    assert_eq!(reply.json()["id"], "q1");
    let reply = client
        .post_json(
            &format!("{base}/v2/models/resnet50/versions/2/infer"),
            infer,
        )
        .await;
    assert_eq!(reply.upstream(), Some("resnet"), "{}", reply.text());
    assert_eq!(reply.json()["model_version"], "2");
    let reply = client
        .get(&format!("{base}/v2/models/bert-base/ready"))
        .await;
    assert_eq!(reply.upstream(), Some("bert"), "{}", reply.text());
    let reply = client.get(&format!("{base}/v2/models/bert-large")).await;
    assert_eq!(reply.upstream(), Some("bert"), "{}", reply.text());
    assert_eq!(reply.json()["name"], "bert-large");
    let unknown = client
        .post_json(&format!("{base}/v2/models/gpt2/infer"), infer)
        .await;
    // KServe v2's error body: `error` is the message itself.
    assert_eq!(unknown.status, 404, "{}", unknown.text());
    assert_eq!(unknown.upstream(), None);
    assert!(
        unknown.json()["error"]
            .as_str()
            .is_some_and(|m| m.starts_with("no route matches POST /v2/models/gpt2/infer")),
        "{}",
        unknown.text()
    );
    let paths: Vec<String> = resnet
        .requests()
        .iter()
        .map(|r| r.uri.path().to_string())
        .collect();
    assert_eq!(
        paths,
        [
            "/v2/models/resnet50/infer",
            "/v2/models/resnet50/versions/2/infer"
        ]
    );
}

#[tokio::test]
async fn routes_kserve_grpc_by_the_model_name_field() {
    let resnet = KServeGrpcServer::start("grpc-resnet");
    let bert = KServeGrpcServer::start("grpc-bert");
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("resnet", &[resnet.addr()], "protocol: http2"),
        policy::backend("bert", &[bert.addr()], "protocol: http2"),
        policy::route(
            "resnet",
            "match:\n  - model: {exact: resnet50}\nbackends:\n  - backend: resnet\n",
        ),
        policy::route(
            "bert",
            "match:\n  - model: {prefix: bert}\nbackends:\n  - backend: bert\n",
        ),
    ]));
    let mut client = grpc_client(proxy.outbound).await;

    let reply = client
        .model_infer(infer_request("resnet50", "r1"))
        .await
        .expect("ModelInfer resnet50");
    assert_eq!(reply.metadata().get("x-upstream").unwrap(), "grpc-resnet");
    let reply = reply.into_inner();
    assert_eq!(
        (reply.model_name.as_str(), reply.id.as_str()),
        ("resnet50", "r1")
    );
    assert_eq!(
        reply.outputs[0].contents.as_ref().unwrap().fp32_contents,
        [3.0, -4.0]
    );

    let reply = client
        .model_infer(infer_request("bert-base", "b1"))
        .await
        .expect("ModelInfer bert-base");
    assert_eq!(reply.metadata().get("x-upstream").unwrap(), "grpc-bert");

    let ready = client
        .model_ready(ModelReadyRequest {
            name: "resnet50".into(),
            version: "1".into(),
        })
        .await
        .expect("ModelReady resnet50");
    assert_eq!(ready.metadata().get("x-upstream").unwrap(), "grpc-resnet");
    let metadata = client
        .model_metadata(ModelMetadataRequest {
            name: "bert-large".into(),
            version: String::new(),
        })
        .await
        .expect("ModelMetadata bert-large");
    assert_eq!(metadata.metadata().get("x-upstream").unwrap(), "grpc-bert");
    let stream = client
        .model_stream_infer(tokio_stream::iter(vec![infer_request("bert-tiny", "s1")]))
        .await
        .expect("ModelStreamInfer bert-tiny");
    assert_eq!(stream.metadata().get("x-upstream").unwrap(), "grpc-bert");
    let mut stream = stream.into_inner();
    while stream.message().await.expect("stream ends OK").is_some() {}

    let status = client
        .model_infer(infer_request("gpt2", "x"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");

    assert_eq!(resnet.model_names(), ["resnet50", "resnet50"]);
    assert_eq!(bert.model_names(), ["bert-base", "bert-large", "bert-tiny"]);
}

#[tokio::test]
async fn routes_by_grpc_service_and_method() {
    let main = KServeGrpcServer::start("grpc-main");
    let health = KServeGrpcServer::start("grpc-health");
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("main", &[main.addr()], "protocol: http2"),
        policy::backend("health", &[health.addr()], "protocol: http2"),
        policy::route(
            "health",
            "match:\n  - grpc: {service: inference.GRPCInferenceService, method: ServerLive}\nbackends:\n  - backend: health\n",
        ),
        policy::route("main", "match:\n  - grpc: {service: inference.GRPCInferenceService}\nbackends:\n  - backend: main\n"),
    ]));
    let mut client = grpc_client(proxy.outbound).await;
    let live = client
        .server_live(ServerLiveRequest {})
        .await
        .expect("ServerLive");
    assert_eq!(live.metadata().get("x-upstream").unwrap(), "grpc-health");
    let infer = client
        .model_infer(infer_request("any", "1"))
        .await
        .expect("ModelInfer");
    assert_eq!(infer.metadata().get("x-upstream").unwrap(), "grpc-main");

    // A plain HTTP request is not gRPC, so neither route matches.
    let reply = HttpClient::http1()
        .post_json(
            &format!("{}/v1/chat/completions", proxy.url()),
            &chat_body("any", false),
        )
        .await;
    reply.assert_proxy_error(404, "no_route");
}

#[tokio::test]
async fn routes_by_host_header_and_path() {
    let by_host = OpenAiServer::start("by-host");
    let by_header = OpenAiServer::start("by-header");
    let by_path = OpenAiServer::start("by-path");
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("host", &[by_host.addr()], ""),
        policy::backend("header", &[by_header.addr()], ""),
        policy::backend("path", &[by_path.addr()], ""),
        policy::route("host", "match:\n  - host: \"*.models.internal\"\nbackends:\n  - backend: host\n"),
        policy::route(
            "header",
            "match:\n  - headers: [{name: x-tenant, value: gold}]\n  - headers: [{name: x-canary}]\nbackends:\n  - backend: header\n",
        ),
        policy::route("path", "match:\n  - path: {exact: /v1/embeddings}\nbackends:\n  - backend: path\n"),
    ]));
    let url = format!("{}/v1/embeddings", proxy.url());
    let body = r#"{"model":"m","input":"x"}"#;
    let client = HttpClient::http1();
    let send = |headers: Vec<(&'static str, &'static str)>, url: String| {
        let client = client.clone();
        async move { client.fetch(json_request(&url, body, &headers)).await }
    };
    let reply = send(vec![("host", "llm.models.internal:8080")], url.clone()).await;
    assert_eq!(reply.upstream(), Some("by-host"), "{}", reply.text());
    let reply = send(vec![("x-tenant", "gold")], url.clone()).await;
    assert_eq!(reply.upstream(), Some("by-header"), "{}", reply.text());
    let reply = send(vec![("X-Canary", "")], url.clone()).await;
    assert_eq!(
        reply.upstream(),
        Some("by-header"),
        "header names are case-insensitive: {}",
        reply.text()
    );
    let reply = send(vec![("x-tenant", "silver")], url.clone()).await;
    assert_eq!(reply.upstream(), Some("by-path"), "{}", reply.text());
    let reply = send(vec![], format!("{}/v1/embeddings/extra", proxy.url())).await;
    reply.assert_proxy_error(404, "no_route");
    // The upstream sees the client's Host.
    assert_eq!(
        by_host.requests()[0].headers["host"],
        "llm.models.internal:8080"
    );
}

#[tokio::test]
async fn a_model_alias_rewrites_only_the_model_name_in_the_body() {
    let upstream = OpenAiServer::start("aliased");
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("llama", &[upstream.addr()], ""),
        policy::route(
            "fast",
            "match:\n  - model: {exact: fast}\nbackends:\n  - backend: llama\n    model: meta-llama/Llama-3.1-8B-Instruct\n",
        ),
    ]));
    let url = format!("{}/v1/chat/completions", proxy.url());
    // Odd spacing, the alias also inside a message, unicode and escapes: only
    // the value of the top-level `model` member may change.
    let before = "{\n  \"messages\": [{\"role\": \"user\", \"content\": \"model \\\"fast\\\" \u{1f680} caf\u{e9}\"}],\n  \"model\" :  ";
    let after = " ,\n  \"temperature\": 0.25,\n  \"stream\": false\n}";
    let body = format!("{before}\"fast\"{after}");
    let expected = format!("{before}\"meta-llama/Llama-3.1-8B-Instruct\"{after}");
    for client in [HttpClient::http1(), HttpClient::http2()] {
        let reply = client.post_json(&url, &body).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.upstream(), Some("aliased"));
    }
    // Streaming requests are rewritten the same way and still stream.
    let stream_body = chat_body("fast", true);
    let reply = HttpClient::http1().post_json(&url, &stream_body).await;
    assert!(
        reply.text().ends_with("data: [DONE]\n\n"),
        "{}",
        reply.text()
    );

    let requests = upstream.requests();
    assert_eq!(requests.len(), 3);
    for request in &requests[..2] {
        assert_eq!(
            String::from_utf8_lossy(&request.body),
            expected,
            "the upstream body differs from the client's beyond the model name"
        );
        if let Some(length) = request.headers.get("content-length") {
            assert_eq!(
                length.to_str().unwrap(),
                expected.len().to_string(),
                "content-length was not adjusted"
            );
        }
    }
    assert_eq!(
        String::from_utf8_lossy(&requests[2].body),
        chat_body("meta-llama/Llama-3.1-8B-Instruct", true)
    );
}

#[tokio::test]
async fn a_model_alias_rewrites_the_grpc_model_name() {
    let upstream = KServeGrpcServer::start("grpc-aliased");
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("bert", &[upstream.addr()], "protocol: http2"),
        policy::route(
            "embed",
            "match:\n  - model: {exact: embed}\nbackends:\n  - backend: bert\n    model: bert-base-uncased\n",
        ),
    ]));
    let mut client = grpc_client(proxy.outbound).await;
    let reply = client
        .model_infer(infer_request("embed", "a1"))
        .await
        .expect("ModelInfer")
        .into_inner();
    assert_eq!(
        reply.model_name, "bert-base-uncased",
        "the upstream answers for the model it was asked"
    );
    assert_eq!(reply.id, "a1");
    assert_eq!(
        reply.outputs[0].contents.as_ref().unwrap().fp32_contents,
        [3.0, -4.0],
        "inputs arrived intact"
    );
    let calls = upstream.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].model_name, "bert-base-uncased");
    assert_eq!(calls[0].id, "a1");
}

/// A JSON body of about `size` bytes, with the model after the messages.
fn big_body(model: &str, size: usize) -> String {
    let filler: String = "abc \u{e9}\u{4e16}\\n\\\"q\\\" \u{1f600} "
        .chars()
        .cycle()
        .take(size)
        .collect();
    format!(
        "{{\"messages\":[{{\"role\":\"system\",\"content\":\"{filler}\"}}],\"max_tokens\":16,\"model\":\"{model}\",\"extra\":{{\"nested\":[1,2.5e3,null,true]}}}}"
    )
}

#[tokio::test]
async fn bodies_reach_the_upstream_byte_for_byte() {
    let upstream = OpenAiServer::start("bytes");
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("bytes", &[upstream.addr()], ""),
        policy::route(
            "chat",
            "match:\n  - model: {exact: llama}\nbackends:\n  - backend: bytes\n",
        ),
        // The large bodies hold their model past the 64 KiB scan limit.
        policy::route(
            "rest",
            "match:\n  - path: {prefix: /v1/}\nbackends:\n  - backend: bytes\n",
        ),
    ]));
    let url = format!("{}/v1/chat/completions", proxy.url());
    let small = big_body("llama", 100);
    let large = big_body("llama", 300 * 1024);
    let mut sent = Vec::new();
    for client in [HttpClient::http1(), HttpClient::http2()] {
        for body in [&small, &large] {
            let reply = client.post_json(&url, body).await;
            assert_eq!(reply.status, 200, "{}", reply.text());
            sent.push(body.clone());
        }
    }
    // Chunked (no content-length), split inside the model member.
    let split = large.find("\"model\"").unwrap() + 5;
    let pieces = vec![
        (
            Duration::ZERO,
            Bytes::copy_from_slice(&large.as_bytes()[..split]),
        ),
        (
            Duration::from_millis(50),
            Bytes::copy_from_slice(&large.as_bytes()[split..]),
        ),
    ];
    let request = Request::post(&url)
        .header("content-type", "application/json")
        .body(paced(pieces))
        .unwrap();
    let reply = HttpClient::http1().fetch(request).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.upstream(), Some("bytes"));
    sent.push(large.clone());

    let requests = upstream.requests();
    assert_eq!(requests.len(), sent.len());
    for (i, (request, body)) in requests.iter().zip(&sent).enumerate() {
        assert!(request.body == body.as_bytes(), "request {i}: the upstream got {} bytes, the client sent {}; first difference at byte {:?}",
            request.body.len(), body.len(), request.body.iter().zip(body.as_bytes()).position(|(a, b)| a != b));
    }
}

#[tokio::test]
async fn a_model_beyond_the_scan_limit_is_routed_by_the_other_rules() {
    let by_model = OpenAiServer::start("by-model");
    let by_path = OpenAiServer::start("by-path");
    let routes = |mesh: Option<&str>| {
        let mut docs = vec![
            policy::backend("model", &[by_model.addr()], ""),
            policy::backend("path", &[by_path.addr()], ""),
            policy::route(
                "special",
                "match:\n  - model: {exact: special}\nbackends:\n  - backend: model\n",
            ),
            policy::route(
                "chat",
                "match:\n  - path: {prefix: /v1/}\nbackends:\n  - backend: path\n",
            ),
        ];
        docs.extend(mesh.map(policy::mesh));
        policy::docs(&docs)
    };

    // A configured 1 KiB limit.
    let proxy = ProxyProcess::start(&routes(Some("classify:\n  maxBodyPrefix: 1024\n")));
    let url = format!("{}/v1/chat/completions", proxy.url());
    let client = HttpClient::http1();
    let near = big_body("special", 200);
    let far = big_body("special", 4096);
    let reply = client.post_json(&url, &near).await;
    assert_eq!(
        reply.upstream(),
        Some("by-model"),
        "a model within the limit routes by model: {}",
        reply.text()
    );
    let reply = client.post_json(&url, &far).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.upstream(),
        Some("by-path"),
        "a model past the limit must not match the model route"
    );
    assert_eq!(
        by_path.requests()[0].body,
        far.as_bytes(),
        "the body changed"
    );
    drop(proxy);

    // The default limit, 64 KiB.
    let proxy = ProxyProcess::start(&routes(None));
    let url = format!("{}/v1/chat/completions", proxy.url());
    let near = big_body("special", 32 * 1024);
    let far = big_body("special", 100 * 1024);
    let reply = client.post_json(&url, &near).await;
    assert_eq!(reply.upstream(), Some("by-model"), "{}", reply.text());
    let reply = client.post_json(&url, &far).await;
    assert_eq!(reply.upstream(), Some("by-path"), "{}", reply.text());
    assert_eq!(
        by_path.requests()[1].body,
        far.as_bytes(),
        "the body changed"
    );
}

#[tokio::test]
async fn the_backend_protocol_decides_the_upstream_http_version() {
    let h1 = OpenAiServer::start("h1");
    let h2 = OpenAiServer::start("h2");
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("h1", &[h1.addr()], "protocol: http1"),
        policy::backend("h2", &[h2.addr()], "protocol: http2"),
        policy::route(
            "one",
            "match:\n  - model: {exact: one}\nbackends:\n  - backend: h1\n",
        ),
        policy::route(
            "two",
            "match:\n  - model: {exact: two}\nbackends:\n  - backend: h2\n",
        ),
    ]));
    let url = format!("{}/v1/chat/completions", proxy.url());
    for client in [HttpClient::http1(), HttpClient::http2()] {
        for model in ["one", "two"] {
            let reply = client.post_json(&url, &chat_body(model, false)).await;
            assert_eq!(reply.status, 200, "{}", reply.text());
        }
    }
    let versions = |s: &OpenAiServer| s.requests().iter().map(|r| r.version).collect::<Vec<_>>();
    assert_eq!(versions(&h1), [http::Version::HTTP_11; 2]);
    assert_eq!(versions(&h2), [http::Version::HTTP_2; 2]);
}

#[tokio::test]
async fn upstream_answers_pass_through_unchanged() {
    let upstream = OpenAiServer::start("plain");
    let proxy = ProxyProcess::start(&policy::docs(&[
        policy::backend("plain", &[upstream.addr()], ""),
        policy::route("all", "backends:\n  - backend: plain\n"),
    ]));
    let client = HttpClient::http1();
    for status in ["429", "500", "404"] {
        let reply = client
            .fetch(json_request(
                &format!("{}/v1/chat/completions", proxy.url()),
                &chat_body("m", false),
                &[("x-test-status", status)],
            ))
            .await;
        assert_eq!(reply.status.as_str(), status);
        assert_eq!(reply.upstream(), Some("plain"));
        assert_eq!(
            reply.json()["error"]["type"],
            "fixture_error",
            "the proxy replaced the upstream's body"
        );
    }
    // Plain HTTP (neither OpenAI nor KServe) with a query string.
    let reply = client
        .fetch(
            Request::put(format!("{}/echo/a/b?x=1&y=%20", proxy.url()))
                .body(full("abc"))
                .unwrap(),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["method"], "PUT");
    assert_eq!(reply.json()["path"], "/echo/a/b?x=1&y=%20");
    assert_eq!(reply.json()["bodyLength"], 3);
}
